"""The table and notes that show a plan's numbers (orchestrator.plan.numbers), each row
naming how it was obtained."""

from __future__ import annotations

import math
import shlex

from orchestrator.plan import anchors
from orchestrator.plan.calibrate import RunFigures
from orchestrator.plan.formulas import (
    BACKWARD_SHARE,
    DDP_BUCKET_CAP_BYTES,
    bandwidth_gbps,
    level_times_s,
    max_shard_bytes,
    ring_allreduce_factor,
)
from orchestrator.plan.job import Resolved
from orchestrator.plan.numbers import (
    DEFAULT_INTERCONNECT_GBPS,
    DEFAULT_INTRA_NODE_GBPS,
    DEFAULT_STORAGE_GBPS,
    ClusterInputs,
    Numbers,
    links_for,
)
from orchestrator.spec import JobSpec


def bytes_text(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def duration_text(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:,.0f} us"
    if s < 1:
        return f"{s * 1e3:,.1f} ms"
    if s < 120:
        return f"{s:,.1f} s"
    if s < 7200:
        return f"{s / 60:,.1f} min"
    if s < 172800:
        return f"{s / 3600:,.1f} h"
    return f"{s / 86400:,.1f} days"


def count_text(n: int, what: str) -> str:
    return f"{n:,} {what}" + ("" if n == 1 else "s")


Row = tuple[str, str, str]  # (quantity, value, how it was obtained); a header has no value


def plan_rows(job: str, resolved: Resolved, x: Numbers, inputs: ClusterInputs) -> list[Row]:
    """The table, one row per quantity, grouped under section headers."""
    spec, n = resolved.spec, resolved.num_gpus
    nodes, gpus = count_text(inputs.nodes, "node"), count_text(inputs.gpus_per_node, "GPU")
    title = f"{job} ({spec.name}, {spec.model.name}) on {nodes} x {gpus} = {count_text(n, 'GPU')}"
    return [
        (title, "", ""),
        *_batch_rows(resolved),
        *_throughput_rows(x, inputs.from_run),
        *_comm_rows(x, n, spec, inputs),
        *_step_rows(x, n, inputs),
        *_input_rows(x, inputs, spec.data.num_workers),
        *_checkpoint_rows(x, inputs.storage_gbps, spec.checkpoint.every_iters),
        *_time_rows(resolved, x, inputs.train_images),
    ]


def _batch_rows(resolved: Resolved) -> list[Row]:
    spec, B, B0 = resolved.spec, resolved.spec.scaling.global_batch, resolved.written_batch
    s = spec.schedule
    if spec.optim.lr is not None:
        lr_how = "optim.lr, fixed"
    else:
        lr_how = f"optim.base_lr {spec.optim.base_lr:g} x {B:,} / 256, the linear scaling rule"
    batch_how = "as in the job file" if B == B0 else f"the job file says {B0:,}; per-GPU batch kept"
    steps = spec.accumulation()
    steps_how = "spec.accumulation()"
    if any(a.startswith("scaling.micro_batch=") for a in resolved.added):
        steps_how += ": keeps the job file's global batch on fewer GPUs"
    rows = [
        ("batch", "", ""),
        ("  per-GPU batch", f"{spec.micro_batch():,}", "spec.micro_batch()"),
        ("  accumulation steps", f"{steps:,}", steps_how),
        ("  global batch", f"{B:,}", batch_how),
        ("  learning rate", f"{spec.lr():g}", lr_how),
    ]
    if s.warmup_iters:
        start = spec.lr() * s.warmup_factor
        shape = "linearly" if s.warmup_linear else "constant"
        rows.append(
            (
                "  warm-up",
                f"{s.warmup_iters:,} iterations",
                f"lr {start:g} -> {spec.lr():g}, {shape} (schedule.warmup_*)",
            )
        )
    elif s.warmup_until_train_err is not None:
        rule = f"lr x {s.warmup_factor:g} until the training error < {s.warmup_until_train_err:g}"
        rows.append(("  warm-up", "by the error rule", rule))
    return rows


def _throughput_rows(x: Numbers, run: RunFigures | None) -> list[Row]:
    rows: list[Row] = [("compute, per GPU", "", "")]
    if run is not None and x.rate_source.startswith("--from-run"):
        shape = f"{run.world_size} GPUs x {run.micro_batch} x {run.accumulation} accumulation"
        rows += [
            (
                "  run's img/s per GPU",
                f"{run.img_per_s_per_gpu:,.0f}",
                (
                    f"median {run.img_per_s:,.0f} system/images_per_s / {run.world_size} GPUs, "
                    f"{count_text(run.windows, 'window')} after the first"
                ),
            ),
            (
                "  run's step time",
                duration_text(run.step_s),
                f"median system/step_time_s ({shape}, {run.strategy})",
            ),
        ]
    rows += [
        ("  img/s per GPU, compute", f"{x.img_per_s_per_gpu:,.0f}", x.rate_source),
        (
            "  compute per step",
            duration_text(x.compute_step_s),
            "per-GPU batch x accumulation / img/s per GPU",
        ),
    ]
    return rows


def _comm_rows(x: Numbers, n: int, spec: JobSpec, inputs: ClusterInputs) -> list[Row]:
    """The gradients' communication: its volume, the collective's time on each level of the
    cluster's links, and what of it the step cannot hide."""
    rows = _comm_volume_rows(x, n, spec)
    if n == 1:
        return [*rows, ("  bandwidth to hide it", "none", "one GPU: nothing to all-reduce")]
    need = f"{x.allreduce_gbps_needed:,.1f} Gbit/s per GPU"
    rows.append(("  bandwidth to hide it", need, "sent per GPU / compute per step"))
    rows += _link_level_rows(x, inputs)
    if spec.scaling.strategy == "deepspeed":
        return [*rows, _zero_exposed_row(x, spec.scaling.zero_stage)]
    return [*rows, *_ddp_overlap_rows(x, inputs)]


def _comm_volume_rows(x: Numbers, n: int, spec: JobSpec) -> list[Row]:
    s = spec.scaling
    if s.strategy == "deepspeed":
        title = f"gradient communication (DeepSpeed ZeRO-{s.zero_stage}, not overlapped)"
    else:
        title = "gradient all-reduce (DDP, buckets overlapped with backward)"
    per_value = x.grad_bytes // max(1, x.params)
    if s.strategy == "deepspeed" and s.zero_stage > 0:
        scatters = s.zero_stage == 2 and spec.accumulation() > 1
        times = f"{spec.accumulation()} x " if scatters else ""
        how = (
            f"(N-1)/N = {(n - 1) / n:.4f} x ({times}gradients reduce-scattered + "
            f"{bytes_text(x.param_bytes)} of weights all-gathered): the ZeRO paper's 2 Psi"
        )
    else:
        how = f"2(N-1)/N = {ring_allreduce_factor(n):.4f} x gradients (ring all-reduce)"
    return [
        (title, "", ""),
        ("  parameters", f"{x.params:,}", f"create_model({spec.model.name!r}) on the meta device"),
        (
            "  gradients per step",
            bytes_text(x.grad_bytes),
            f"parameters x {per_value} bytes: {x.grad_dtype_how}",
        ),
        ("  sent per GPU per step", bytes_text(x.sent_bytes_per_gpu), how),
    ]


def _link_level_rows(x: Numbers, inputs: ClusterInputs) -> list[Row]:
    """The whole gradient's collective inside a node and between nodes; the slower sets it."""
    intra_how = f"2(g-1)/g x gradients at {inputs.intra_node_gbps:,g} Gbit/s per GPU " + (
        "(--intra-node-gbps)"
        if inputs.intra_node_gbps != DEFAULT_INTRA_NODE_GBPS
        else "(default: NVLink 4, 450 GB/s each way)"
    )
    inter_how = f"2(n-1)/n x gradients at {inputs.interconnect_gbps:,g} Gbit/s per node " + (
        "(--interconnect-gbps)"
        if inputs.interconnect_gbps != DEFAULT_INTERCONNECT_GBPS
        else "(default: 8 x 400 Gbit/s NICs, a p5 / DGX H100)"
    )
    slower = "inter-node" if x.inter_s >= x.intra_s else "intra-node"
    g, nodes = inputs.gpus_per_node, count_text(inputs.nodes, "node")
    return [
        (f"  all-reduce, inside a node of {g}", duration_text(x.intra_s), intra_how),
        (f"  all-reduce, across {nodes}", duration_text(x.inter_s), inter_how),
        (
            "  all-reduce time",
            duration_text(max(x.intra_s, x.inter_s)),
            f"the slower level ({slower}): NCCL pipelines chunks through both",
        ),
    ]


def _zero_exposed_row(x: Numbers, zero_stage: int) -> Row:
    """DeepSpeed below stage 3 overlaps nothing: all its communication is exposed."""
    if zero_stage == 0:
        how = "one all-reduce after backward (DeepSpeed's data parallel)"
    else:
        per = "every micro-batch" if zero_stage == 2 else "the accumulation boundary"
        how = f"reduce-scatter at {per} + all-gather after the step; overlap_comm off"
    return ("  exposed per step", duration_text(x.exposed_s), how)


def _ddp_overlap_rows(x: Numbers, inputs: ClusterInputs) -> list[Row]:
    """DDP's buckets against the backward window: the last bucket, and whatever the links
    could not keep up with, is exposed."""
    last = x.buckets[-1] if x.buckets else 0.0
    links = links_for(inputs.nodes, inputs.gpus_per_node, inputs)
    last_s = max(level_times_s(last, links, passes=2))
    cap = DDP_BUCKET_CAP_BYTES / 2**20
    if x.exposed_s > last_s * (1 + 1e-9):
        rest = f" + {duration_text(x.exposed_s - last_s)} that backward did not hide"
    else:
        rest = "; the others hide behind backward"
    return [
        (
            "  DDP buckets",
            f"{len(x.buckets)}",
            (
                f"1 MiB first, then {cap:g} MiB (bucket_cap_mb); the last "
                f"{bytes_text(last)} is ready when backward ends"
            ),
        ),
        (
            "  backward window",
            duration_text(x.backward_s),
            f"{BACKWARD_SHARE:.2f} x the last micro-batch's compute (backward ~ 2x forward)",
        ),
        (
            "  exposed per step",
            duration_text(x.exposed_s),
            f"the last bucket's {duration_text(last_s)}{rest}",
        ),
    ]


def _step_rows(x: Numbers, n: int, inputs: ClusterInputs) -> list[Row]:
    g = inputs.gpus_per_node
    one_node_rate = x.img_per_s_per_gpu * x.compute_step_s / x.one_node_step_s
    return [
        ("predicted step", "", ""),
        (
            "  step time",
            duration_text(x.step_s),
            f"compute {duration_text(x.compute_step_s)} + exposed {duration_text(x.exposed_s)}",
        ),
        (
            "  img/s per GPU",
            f"{x.predicted_img_per_s_per_gpu:,.0f}",
            "per-GPU batch x accumulation / step time",
        ),
        ("  img/s, whole cluster", f"{x.predicted_img_per_s_per_gpu * n:,.0f}", "x N GPUs"),
        (
            "  scaling efficiency",
            f"{x.efficiency_vs_one_node:.1%}",
            (
                f"img/s per GPU / one node's ({count_text(g, 'GPU')}: {one_node_rate:,.0f} img/s "
                f"per GPU, step {duration_text(x.one_node_step_s)})"
            ),
        ),
        (
            "  vs compute alone",
            f"{x.efficiency_vs_compute:.1%}",
            "compute per step / step time (1.0 = linear scaling from one GPU)",
        ),
    ]


def _input_rows(x: Numbers, inputs: ClusterInputs, loaders: int) -> list[Row]:
    nodes, gpus = count_text(inputs.nodes, "node"), count_text(inputs.gpus_per_node, "GPU")
    per_node = x.read_bytes_per_s_per_node
    reads = f"{bytes_text(per_node)}/s = {bandwidth_gbps(per_node, 1):,.1f} Gbit/s"
    decode_how = (
        f"at {anchors.DECODE_IMG_PER_S_PER_CORE:g} ImageNet JPEGs/s per core "
        f"({anchors.SOURCE}, PIL); {inputs.gpus_per_node * max(1, loaders)} loader processes "
        f"(data.num_workers={loaders})"
    )
    shard_bytes = max_shard_bytes(x.dataset_bytes, x.shards)
    shard_how = (
        f"{inputs.train_images:,} images x {inputs.kb_per_image:g} KB = "
        f"{bytes_text(x.dataset_bytes)}: datasets/*.py --shard-size-mb "
        f"{max(1, math.floor(shard_bytes / 1e6))} (the default, 128, gives "
        f"~{count_text(math.ceil(x.dataset_bytes / 128e6), 'shard')})"
    )
    return [
        ("input pipeline, per node", "", ""),
        ("  object-store reads", reads, f"{gpus} x img/s x {inputs.kb_per_image:g} KB per image"),
        ("  whole cluster", f"{bytes_text(per_node * inputs.nodes)}/s", f"x {nodes}"),
        ("  JPEG decode", f"{x.decode_cores_per_node:,.0f} cores", decode_how),
        ("shards", "", ""),
        (
            "  train shards needed",
            f">= {x.shards:,}",
            f"{nodes} x {gpus} x {max(1, loaders)} loader workers",
        ),
        ("  shard size for that", f"<= {bytes_text(shard_bytes)}", shard_how),
    ]


def _checkpoint_rows(x: Numbers, storage_gbps: float, every_iters: int) -> list[Row]:
    if storage_gbps != DEFAULT_STORAGE_GBPS:
        write_how = "--storage-gbps"
    else:
        write_how = "the default --storage-gbps: an assumption, measure yours"
    rows: list[Row] = [
        ("checkpoint", "", ""),
        (
            "  size",
            bytes_text(x.checkpoint_bytes),
            "parameters x 4 bytes x 2 (fp32 weights + SGD momentum)",
        ),
        (f"  write at {storage_gbps:g} Gbit/s", duration_text(x.checkpoint_write_s), write_how),
    ]
    every = x.checkpoint_every_iters
    if every > 0:
        why = (
            "checkpoint.every_iters"
            if every == every_iters
            else "one epoch (checkpoint.at_epoch_end)"
        )
        share = x.checkpoint_write_s / (every * x.step_s)
        how = f"{why}; writing takes {share:.1%} of that"
        rows.append(
            (f"  every {every:,} iterations", f"every {duration_text(every * x.step_s)}", how)
        )
    return rows


def _time_rows(resolved: Resolved, x: Numbers, train_images: int) -> list[Row]:
    B, iters = resolved.spec.scaling.global_batch, resolved.spec.schedule.max_iters
    rows: list[Row] = [
        ("time to train", "", ""),
        (
            "  schedule",
            f"{iters:,} iterations x {B:,} = {iters * B / 1e6:,.1f}M images",
            f"{iters * B / train_images:,.1f} epochs of {train_images:,}",
        ),
        ("  expected time", duration_text(x.train_s), "max_iters x predicted step time"),
        (
            "  at linear scaling",
            duration_text(iters * x.compute_step_s),
            "max_iters x compute per step (no communication)",
        ),
    ]
    written = resolved.base_max_iters
    if written != iters:  # what the job file's own count would cost at this global batch
        epochs = written * B / train_images
        how = f"the job file's {written:,} iterations at {B:,} = {epochs:,.0f} epochs"
        rows.append(("  unscaled max_iters", duration_text(written * x.step_s), how))
    return rows


def format_table(rows: list[Row]) -> str:
    """Rows as aligned text: quantity, value, then how it was obtained."""
    width = max(len(q) for q, v, _ in rows if v)
    vwidth = max(len(v) for _, v, _ in rows)
    return "\n".join(
        q if not v else f"{q:<{width}}  {v:<{vwidth}}  {how}".rstrip() for q, v, how in rows
    )


def notes(job: str, resolved: Resolved, x: Numbers, inputs: ClusterInputs) -> list[str]:
    """What the table implies: caveats that apply, and the command to submit the job."""
    spec = resolved.spec
    B, B0 = spec.scaling.global_batch, resolved.written_batch
    out = []
    if B != B0:
        out.append(
            f"global batch {B:,} instead of the job file's {B0:,}; iteration counts you did not "
            f"override are scaled by {B0:,}/{B:,} so the schedule covers the same images"
        )
    out += resolved.why
    if B > 8192 and spec.optim.lr is None:
        out.append(
            f"lr {spec.lr():g} comes from the linear scaling rule: Goyal et al. (2017) kept "
            "accuracy up to a global batch of 8k with their 5-epoch warm-up, and lost some "
            "beyond it even with it"
        )
    every = x.checkpoint_every_iters
    if every and every * x.step_s < 50 * x.checkpoint_write_s:  # saving > ~2% of the time
        out.append(
            f"a checkpoint every {every:,} iterations is every {duration_text(every * x.step_s)} "
            "here: set checkpoint.at_epoch_end=false and a checkpoint.every_iters minutes apart"
        )
    if x.rate_source.startswith("anchor"):
        out.append(
            "the img/s anchors are H200 numbers on synthetic data at batch 256: an H100 (p5) is "
            "slower, and so is a smaller per-GPU batch; calibrate with --from-run RUN_ID"
        )
    run = inputs.from_run
    if run is not None and run.micro_batch != spec.micro_batch():
        out.append(
            f"the run trained {run.micro_batch} images per GPU per micro-batch, this job "
            f"{spec.micro_batch()}: a GPU's img/s depends on it, so the calibration carries over "
            "only roughly"
        )
    if run is not None:
        measured = run.micro_batch * run.accumulation / run.step_s
        if abs(run.img_per_s_per_gpu / measured - 1) > 0.1:
            out.append(
                f"the run's img/s per GPU ({run.img_per_s_per_gpu:,.0f}) and its step time "
                f"({measured:,.0f} img/s per GPU) disagree by more than 10%: the step time is used"
            )
    out.append(
        "the communication model counts bandwidth only: no per-message latency, no contention, "
        "no input stalls (docs/scaling-model.md compares it with published runs)"
    )
    out.append(f"overrides the plan added: {' '.join(resolved.added)}")
    args = [*resolved.overrides, *resolved.added]
    dry_run = shlex.join(["python", job, "--dry-run", *args])
    out.append(f"check it first (the pre-flight, where the job will run): {dry_run}")
    command = shlex.join(["ray", "job", "submit", "--", "python", job, *args])
    out.append(f"submit (needs a real cluster): {command}")
    return out
