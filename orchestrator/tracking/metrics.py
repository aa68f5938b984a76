"""The one metric naming scheme: `group/name`, so MLflow's UI charts each group together.

    train/...     the loop's running figures: loss, top1_err, top5_err, lr, epoch, samples_seen
    val/...       validation under eval.protocol: loss, top1_err, top5_err, samples
    system/...    throughput and costs: images_per_s, data_wait_frac, step_time_s,
                  checkpoint_stall_s, cpu_decode_share, gpu_mem_gib, nvjpeg_fallback_images
                  (MLflow's own system metrics, CPU, memory, GPU, land in the same group)
    ensemble/...  an ensemble run's own errors; its members' runs use val/...
    responses/... Fig. 7's layer responses of a checkpoint (orchestrator.paper.layer_responses):
                  std_mean, std_max, std_min, layers, images, at the checkpoint's step

The comparison with the paper's tables is no metric: a finished run holds it as the tables
paper/comparison.{md,csv} (orchestrator.tracking.run_report); as metrics, one value each,
it would open the UI's chart view (groups sorted by name: achieved/ before train/).

Errors are fractions (0.2143, not 21.43) everywhere but in the paper comparison (percent).
"""

from __future__ import annotations

# What `checkpoint.best_metric` may name: the figures a commit marker holds (the step's
# validation and training figures) for which lower is better.
CHECKPOINT_METRICS = (
    "val/top1_err",
    "val/top5_err",
    "val/loss",
    "train/top1_err",
    "train/top5_err",
    "train/loss",
)

# The loop's own figures in the system/ group, stepped by training step (MLflow's sampler steps
# its CPU/GPU samples by sample count: the two are told apart by name)
LOOP_SYSTEM_METRICS = frozenset(
    {
        "system/images_per_s",
        "system/data_wait_frac",
        "system/step_time_s",
        "system/checkpoint_stall_s",
        "system/cpu_decode_share",
        "system/gpu_mem_gib",
        "system/nvjpeg_fallback_images",
    }
)
