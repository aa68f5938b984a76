"""The one metric naming scheme: `group/name`, so MLflow's UI charts each group together.

    train/...     the loop's running figures: loss, top1_err, top5_err, lr, epoch, samples_seen
    val/...       validation under eval.protocol: loss, top1_err, top5_err, samples
    system/...    throughput and costs: images_per_s, data_wait_frac, step_time_s,
                  checkpoint_stall_s, cpu_decode_share, gpu_mem_gib (MLflow's own system
                  metrics, CPU, memory, GPU, land in the same group)
    ensemble/...  an ensemble run's own errors; its members' runs use val/...
    responses/... Fig. 7's layer responses of a checkpoint (orchestrator.paper.layer_responses):
                  std_mean, std_max, std_min, layers, images, at the checkpoint's step
    paper/..., achieved/..., gap/...   the comparison with the paper's tables

Errors are fractions (0.2143, not 21.43) everywhere but in the paper comparison (percent).
Runs and checkpoints written before this scheme used a few flat names; `canonical` maps them,
so an old COMMITTED marker, an old `checkpoint.best_metric` and an old run's history still read.
"""

from __future__ import annotations

from collections.abc import Mapping

LEGACY_NAMES = {
    "val_top1_err": "val/top1_err",
    "val_top5_err": "val/top5_err",
    "lr": "train/lr",
    "epoch": "train/epoch",
    "samples_seen": "train/samples_seen",
    "step": "train/step",
    "images_per_s": "system/images_per_s",
    "data_wait_frac": "system/data_wait_frac",
    "step_time_s": "system/step_time_s",
    "checkpoint_stall_s": "system/checkpoint_stall_s",
    "cpu_decode_share": "system/cpu_decode_share",
    "gpu_mem_gib": "system/gpu_mem_gib",
}


# The loop's own figures in the system/ group, stepped by training step (MLflow's sampler steps
# its CPU/GPU samples by sample count: the two are told apart by name)
LOOP_SYSTEM_METRICS = frozenset(n for n in LEGACY_NAMES.values() if n.startswith("system/"))


def canonical(name: str) -> str:
    """The current name of a metric, given its current or its pre-scheme name."""
    return LEGACY_NAMES.get(name, name)


def canonical_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A metrics mapping under current names; a current name wins over its legacy twin."""
    out = {canonical(k): v for k, v in metrics.items() if k in LEGACY_NAMES}
    out.update({k: v for k, v in metrics.items() if k not in LEGACY_NAMES})
    return out


def legacy_names(name: str) -> list[str]:
    """The pre-scheme names that meant `name` (to read an old run's history)."""
    return [old for old, new in LEGACY_NAMES.items() if new == name]
