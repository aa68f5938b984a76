"""The plan for one job on one cluster: every number from the formulas, and the table and
notes that show them, each row naming how it was obtained."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

from orchestrator.plan import anchors
from orchestrator.plan.formulas import (
    allreduce_bytes_per_gpu,
    bandwidth_gbps,
    checkpoint_bytes,
    checkpoint_interval_iters,
    decode_cores_per_node,
    gradient_bytes,
    max_shard_bytes,
    read_bytes_per_s_per_node,
    ring_allreduce_factor,
    shards_needed,
    step_time_s,
    train_time_s,
    transfer_time_s,
)
from orchestrator.plan.job import PlanError, Resolved
from orchestrator.spec import JobSpec

IMAGENET_TRAIN_IMAGES = 1_281_167
DEFAULT_KB_PER_IMAGE = 110.0  # ImageNet's train set is ~140 GB for 1.28M JPEGs
DEFAULT_STORAGE_GBPS = 10.0  # an assumption, not a measurement: pass --storage-gbps


def throughput_anchor(spec: JobSpec) -> tuple[float, str]:
    """The anchor img/s per GPU for the job's model and precision, and where it comes from."""
    if spec.scaling.precision == "fp32":
        mode = "fp32"
    else:
        mode = "compiled" if spec.model.compile else "eager"
    rate = anchors.IMG_PER_S_PER_GPU.get((spec.model.name, mode))
    if rate is None:
        known = sorted({name for name, _ in anchors.IMG_PER_S_PER_GPU})
        raise PlanError(
            f"no throughput anchor for {spec.model.name} ({mode}); {anchors.SOURCE} has only "
            f"{', '.join(known)}: pass --img-per-s-per-gpu (measured on your GPU)"
        )
    how = anchors.MODE_DESCRIPTIONS[mode]
    return rate, (f"anchor ({anchors.SOURCE}): {spec.model.name}, {how}, one H200, synthetic data")


@dataclass(frozen=True)
class ClusterInputs:
    """The cluster and the assumptions the plan is computed for."""

    nodes: int
    gpus_per_node: int
    img_per_s_per_gpu: float | None = None  # None: the anchor for the job
    interconnect_gbps: float | None = None  # per GPU; None: report the need only
    storage_gbps: float = DEFAULT_STORAGE_GBPS
    kb_per_image: float = DEFAULT_KB_PER_IMAGE
    train_images: int = IMAGENET_TRAIN_IMAGES


@dataclass(frozen=True)
class Numbers:
    """Every quantity of the plan, from the formulas above (bytes, seconds, Gbit/s)."""

    img_per_s_per_gpu: float
    rate_source: str
    step_s: float
    params: int
    grad_bytes: int
    allreduce_bytes_per_gpu: float
    allreduce_gbps_needed: float  # per GPU, to fit the all-reduce in one step
    read_bytes_per_s_per_node: float
    decode_cores_per_node: float
    shards: int
    dataset_bytes: float
    checkpoint_bytes: int
    checkpoint_write_s: float
    checkpoint_every_iters: int  # 0: never (besides the end)
    train_s: float


def compute(resolved: Resolved, params: int, inputs: ClusterInputs) -> Numbers:
    """Apply the formulas to a resolved job on a cluster."""
    spec, n = resolved.spec, resolved.num_gpus
    if inputs.img_per_s_per_gpu is not None:
        rate, source = inputs.img_per_s_per_gpu, "--img-per-s-per-gpu"
    else:
        rate, source = throughput_anchor(spec)
    step = step_time_s(spec.micro_batch(), spec.accumulation(), rate)
    grads = gradient_bytes(params)
    ring = allreduce_bytes_per_gpu(grads, n)
    image_bytes = inputs.kb_per_image * 1e3
    ckpt = checkpoint_bytes(params)
    B = spec.scaling.global_batch
    return Numbers(
        img_per_s_per_gpu=rate,
        rate_source=source,
        step_s=step,
        params=params,
        grad_bytes=grads,
        allreduce_bytes_per_gpu=ring,
        allreduce_gbps_needed=bandwidth_gbps(ring, step),
        read_bytes_per_s_per_node=read_bytes_per_s_per_node(
            inputs.gpus_per_node, rate, image_bytes
        ),
        decode_cores_per_node=decode_cores_per_node(inputs.gpus_per_node, rate),
        shards=shards_needed(inputs.nodes, inputs.gpus_per_node, spec.data.num_workers),
        dataset_bytes=inputs.train_images * image_bytes,
        checkpoint_bytes=ckpt,
        checkpoint_write_s=transfer_time_s(ckpt, inputs.storage_gbps),
        checkpoint_every_iters=checkpoint_interval_iters(
            spec.checkpoint.every_iters,
            spec.checkpoint.at_epoch_end,
            math.ceil(inputs.train_images / B),
        ),
        train_s=train_time_s(spec.schedule.max_iters, B, n, rate),
    )


def bytes_text(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def duration_text(s: float) -> str:
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
        *_throughput_rows(x, n),
        *_allreduce_rows(x, n, spec.model.name, inputs.interconnect_gbps),
        *_input_rows(x, inputs, spec.data.num_workers),
        *_checkpoint_rows(x, inputs.storage_gbps, spec.checkpoint.every_iters),
        *_time_rows(resolved, x, inputs.train_images),
    ]


def _batch_rows(resolved: Resolved) -> list[Row]:
    spec, B, B0 = resolved.spec, resolved.spec.scaling.global_batch, resolved.written_batch
    if spec.optim.lr is not None:
        lr_how = "optim.lr, fixed"
    else:
        lr_how = f"optim.base_lr {spec.optim.base_lr:g} x {B:,} / 256, the linear scaling rule"
    batch_how = "as in the job file" if B == B0 else f"the job file says {B0:,}; per-GPU batch kept"
    return [
        ("batch", "", ""),
        ("  per-GPU batch", f"{spec.micro_batch():,}", "spec.micro_batch()"),
        ("  accumulation steps", f"{spec.accumulation():,}", "spec.accumulation()"),
        ("  global batch", f"{B:,}", batch_how),
        ("  learning rate", f"{spec.lr():g}", lr_how),
    ]


def _throughput_rows(x: Numbers, n: int) -> list[Row]:
    rate = x.img_per_s_per_gpu
    return [
        ("throughput", "", ""),
        ("  img/s per GPU", f"{rate:,.0f}", x.rate_source),
        ("  img/s, whole cluster", f"{rate * n:,.0f}", "x N GPUs, assuming linear scaling"),
        ("  step time", duration_text(x.step_s), "per-GPU batch x accumulation / img/s per GPU"),
    ]


def _allreduce_rows(x: Numbers, n: int, model: str, interconnect_gbps: float | None) -> list[Row]:
    rows: list[Row] = [
        ("gradient all-reduce (DDP, ring)", "", ""),
        ("  parameters", f"{x.params:,}", f"create_model({model!r}) on the meta device"),
        (
            "  gradients per step",
            bytes_text(x.grad_bytes),
            "parameters x 4 bytes (fp32, even under bf16 autocast)",
        ),
        (
            "  sent per GPU per step",
            bytes_text(x.allreduce_bytes_per_gpu),
            f"2(N-1)/N = {ring_allreduce_factor(n):.4f} x gradients",
        ),
    ]
    if n == 1:
        return [*rows, ("  bandwidth to hide it", "none", "one GPU: nothing to all-reduce")]
    need = f"{x.allreduce_gbps_needed:,.1f} Gbit/s per GPU"
    how = "sent per GPU / step time (DDP overlaps it with backward only)"
    rows.append(("  bandwidth to hide it", need, how))
    if interconnect_gbps is not None:
        comm = transfer_time_s(x.allreduce_bytes_per_gpu, interconnect_gbps)
        fits = "fits" if comm <= x.step_s else "does NOT fit"
        how = f"{comm / x.step_s:.0%} of a step: {fits} within one step"
        rows.append((f"  at {interconnect_gbps:g} Gbit/s per GPU", duration_text(comm), how))
    return rows


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
        (
            "  expected time",
            duration_text(x.train_s),
            "max_iters x step time, ASSUMING linear scaling with N",
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


def notes(job: str, resolved: Resolved, x: Numbers) -> list[str]:
    """What the table implies: caveats that apply, and the command to submit the job."""
    spec = resolved.spec
    B, B0 = spec.scaling.global_batch, resolved.written_batch
    out = []
    if B != B0:
        out.append(
            f"global batch {B:,} instead of the job file's {B0:,}; iteration counts you did not "
            f"override are scaled by {B0:,}/{B:,} so the schedule covers the same images"
        )
    if B > 8192 and spec.optim.lr is None:
        out.append(
            f"lr {spec.lr():g} comes from the linear scaling rule: Goyal et al. (2017) kept "
            "accuracy up to a global batch of 8k with a 5-epoch warm-up, and lost some beyond it "
            f"(this job: schedule.warmup_iters={spec.schedule.warmup_iters})"
        )
    every = x.checkpoint_every_iters
    if every and every * x.step_s < 50 * x.checkpoint_write_s:  # saving > ~2% of the time
        out.append(
            f"a checkpoint every {every:,} iterations is every {duration_text(every * x.step_s)} "
            "here: set checkpoint.at_epoch_end=false and a checkpoint.every_iters minutes apart"
        )
    out.append(
        "the img/s anchors are H200 numbers on synthetic data: an H100 (p5) is slower, "
        "and a real run can be bound by input or network; measure and pass --img-per-s-per-gpu"
    )
    out.append(f"overrides the plan added: {' '.join(resolved.added)}")
    command = shlex.join(
        ["ray", "job", "submit", "--", "python", job, *resolved.overrides, *resolved.added]
    )
    out.append(f"submit (needs a real cluster): {command}")
    return out
