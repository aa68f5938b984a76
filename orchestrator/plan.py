"""The scale model: what a job asks of a cluster of a given size, before you rent it.

    python -m orchestrator.plan jobs/imagenet_r152.py --nodes 64 --gpus-per-node 8 \\
        [section.key=value ...] [--img-per-s-per-gpu 3084] [--interconnect-gbps 400] \\
        [--storage-gbps 10] [--kb-per-image 110] [--train-images 1281167]

It loads the job file's SPEC, applies the overrides (orchestrator.spec.apply_overrides) with
scaling.num_workers = N = nodes x GPUs per node, and prints one table. Nothing is measured:
every number comes from the formulas below and the inputs, and the output names its sources.

Formulas (units: MB = 10^6 bytes, Gbit/s = 10^9 bits/s):

  batch        The job's per-GPU batch b = spec.micro_batch() and accumulation a (at the size
               the job was written for) are kept, so the global batch grows with the cluster:
               B = b x a x N; overriding scaling.global_batch yourself sets B instead.
               lr = spec.lr() = optim.base_lr x B / 256 (the linear scaling rule) unless
               optim.lr is set. When B differs from the global batch B0 in the job file, the
               iteration counts (schedule.max_iters, milestones, warmup_iters, eval.every_iters)
               are scaled by B0 / B so the schedule covers the same images; a count you
               override yourself is left alone. The plan prints every override it added, and
               the `ray job submit` command that runs the job it describes.
  step time    t = b x a / r, with r the images per second one GPU trains (DESIGN.md's
               anchors unless --img-per-s-per-gpu is given).
  gradients    G = P x 4 bytes for P parameters: DDP all-reduces fp32 gradients even when the
               forward pass runs in bf16 autocast.
  all-reduce   A ring all-reduce sends (and receives) 2(N-1)/N x G per GPU per step. Hiding it
               within one step needs 2(N-1)/N x G x 8 / t bit/s per GPU (NCCL calls this the
               bus bandwidth). DDP overlaps it with the backward pass only, so treat this as a
               lower bound.
  object store Per node: GPUs per node x r x image size (about 110 KB per ImageNet JPEG).
  JPEG decode  Per node: GPUs per node x r / 292 cores (DESIGN.md: one core decodes and
               resizes about 292 ImageNet images per second with PIL).
  shards       At least N x max(1, data.num_workers), so every DataLoader worker has its own;
               shard size at most (train images x image size) / that.
  checkpoint   C = P x 4 x 2 bytes (fp32 weights + SGD momentum buffers); written at S Gbit/s
               in C x 8 / S seconds, every checkpoint.every_iters iterations or every epoch
               (ceil(train images / B) iterations) with checkpoint.at_epoch_end, whichever
               comes first.
  time         schedule.max_iters x t = max_iters x B / (N x r) seconds, ASSUMING throughput
               scales linearly with N (no communication or input stalls). When the schedule was
               rescaled, the job file's own max_iters at this step time is shown too.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec import JobSpec, SpecError, apply_overrides, parse_value


class PlanError(ValueError):
    """Bad input to the plan (a missing job file, a bad size, ...); the message says what to fix."""


# DESIGN.md "Performance anchors": plain PyTorch on one H200, bf16 + channels_last, synthetic
# data on the GPU, batch 256 (fp32 = TF32 eager NCHW). An H100 (p5) is somewhat slower.
ANCHORS_IMG_PER_S: dict[tuple[str, str], float] = {
    ("resnet50", "compiled"): 6670.0,
    ("resnet50", "eager"): 4699.0,
    ("resnet50", "fp32"): 2212.0,
    ("resnet152", "compiled"): 3084.0,
    ("resnet152", "eager"): 2233.0,
    ("resnet152", "fp32"): 1042.0,
}
DECODE_IMG_PER_S_PER_CORE = 292.0  # DESIGN.md: PIL decode + resize, one core
IMAGENET_TRAIN_IMAGES = 1_281_167
DEFAULT_KB_PER_IMAGE = 110.0  # ImageNet's train set is ~140 GB for 1.28M JPEGs
DEFAULT_STORAGE_GBPS = 10.0  # an assumption, not a measurement: pass --storage-gbps
BYTES_FP32 = 4

# Iteration counts that describe the schedule; scaled together when the global batch changes.
# checkpoint.every_iters is not one of them: how often to save is about wall-clock time lost to
# a failure, not about the schedule, so the plan reports its cost instead.
ITERATION_FIELDS = (
    "schedule.max_iters",
    "schedule.milestones",
    "schedule.warmup_iters",
    "eval.every_iters",
)


# ----------------------------------------------------------------------------- the formulas


def ring_allreduce_factor(num_gpus: int) -> float:
    """2(N-1)/N: the share of the gradient bytes each GPU sends in a ring all-reduce."""
    if num_gpus < 1:
        raise PlanError(f"number of GPUs must be >= 1, got {num_gpus}")
    return 2 * (num_gpus - 1) / num_gpus


def gradient_bytes(params: int, bytes_per_value: int = BYTES_FP32) -> int:
    """Bytes of one full set of gradients (fp32 unless told otherwise)."""
    return params * bytes_per_value


def allreduce_bytes_per_gpu(grad_bytes: float, num_gpus: int) -> float:
    """Bytes each GPU sends per optimizer step in a ring all-reduce of `grad_bytes`."""
    return ring_allreduce_factor(num_gpus) * grad_bytes


def step_time_s(micro_batch: int, accumulation: int, img_per_s_per_gpu: float) -> float:
    """Seconds per optimizer step: every GPU trains micro_batch x accumulation images."""
    return micro_batch * accumulation / img_per_s_per_gpu


def bandwidth_gbps(nbytes: float, seconds: float) -> float:
    """The bandwidth (Gbit/s) that moves `nbytes` in `seconds`."""
    return nbytes * 8 / seconds / 1e9


def transfer_time_s(nbytes: float, gbps: float) -> float:
    """Seconds to move `nbytes` at `gbps` Gbit/s."""
    return nbytes * 8 / (gbps * 1e9)


def read_bytes_per_s_per_node(gpus_per_node: int, img_per_s_per_gpu: float, bytes_per_image: float) -> float:
    """Object-store bytes one node must read per second to keep its GPUs fed."""
    return gpus_per_node * img_per_s_per_gpu * bytes_per_image


def decode_cores_per_node(gpus_per_node: int, img_per_s_per_gpu: float,
                          img_per_s_per_core: float = DECODE_IMG_PER_S_PER_CORE) -> float:
    """CPU cores one node needs to decode JPEGs as fast as its GPUs train."""
    return gpus_per_node * img_per_s_per_gpu / img_per_s_per_core


def shards_needed(nodes: int, gpus_per_node: int, loader_workers: int) -> int:
    """Shards so that every DataLoader worker of every rank has one of its own."""
    return nodes * gpus_per_node * max(1, loader_workers)


def max_shard_bytes(dataset_bytes: float, shards: int) -> float:
    """The largest shard size that still yields `shards` shards."""
    return dataset_bytes / shards


def checkpoint_bytes(params: int) -> int:
    """fp32 weights + one SGD momentum buffer per weight (BN statistics are negligible)."""
    return params * BYTES_FP32 * 2


def checkpoint_interval_iters(every_iters: int, at_epoch_end: bool, iters_per_epoch: int) -> int:
    """Iterations between checkpoints: every_iters, or an epoch if that comes first (0: never)."""
    candidates = [i for i in (every_iters, iters_per_epoch if at_epoch_end else 0) if i > 0]
    return min(candidates, default=0)


def train_time_s(iterations: int, global_batch: int, num_gpus: int, img_per_s_per_gpu: float) -> float:
    """Seconds for `iterations` steps of `global_batch`, assuming linear scaling."""
    return iterations * global_batch / (num_gpus * img_per_s_per_gpu)


def scale_iterations(iters: int, factor: float) -> int:
    """An iteration count scaled by `factor`, at least 1 (0 stays 0: "off")."""
    return 0 if iters == 0 else max(1, round(iters * factor))


# ----------------------------------------------------------------------- loading and resolving


def load_job_spec(path: str | Path) -> JobSpec:
    """Import a job file by path and return its SPEC.

    The file's folder goes on sys.path while it imports, as when it runs as a script, because
    job files import their siblings (jobs/imagenet_r50.py imports imagenet_r152).
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"job file not found: {path} (for example: jobs/imagenet_r152.py)")
    if path.suffix != ".py":
        raise PlanError(f"{path}: expected a Python job file (jobs/NAME.py)")
    folder = str(path.resolve().parent)
    module_spec = importlib.util.spec_from_file_location(f"_plan_job_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None  # a .py file always has one
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # what a normal import does (dataclasses look it up)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the job file's own error: show it, with the file's name
        raise PlanError(f"{path}: importing it failed: {type(err).__name__}: {err}") from err
    finally:
        if added:
            sys.path.remove(folder)
    spec = getattr(module, "SPEC", None)
    if spec is None:
        raise PlanError(
            f"{path} defines no SPEC; a job file builds `SPEC = JobSpec(...)` (see jobs/imagenet_r152.py)"
        )
    if not isinstance(spec, JobSpec):
        raise PlanError(f"{path}: SPEC is a {type(spec).__name__}, not an orchestrator.spec.JobSpec")
    return spec


def _override_keys(overrides: list[str]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise PlanError(f"override {item!r}: expected section.key=value, e.g. optim.lr=0.2")
        key, value = item.split("=", 1)
        keys[key] = value
    return keys


def _get(spec: JobSpec, dotted: str) -> object:
    node: object = spec
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@dataclass(frozen=True)
class Resolved:
    """The job as it would run on the cluster, and how the plan got there."""

    spec: JobSpec
    num_gpus: int
    written_batch: int  # B0: the global batch the schedule's iteration counts were written for
    overrides: list[str]  # the user's
    added: list[str]  # the plan's: cluster size, kept per-GPU batch, scaled schedule
    base_max_iters: int  # schedule.max_iters in the job file


def resolve_for_cluster(base: JobSpec, overrides: list[str], num_gpus: int) -> Resolved:
    """The user's overrides plus scaling.num_workers = num_gpus, with the batch policy above."""
    if num_gpus < 1:
        raise PlanError(f"nodes x GPUs per node must be >= 1, got {num_gpus}")
    keys = _override_keys(overrides)
    if "scaling.num_workers" in keys:
        raise PlanError("scaling.num_workers is set by --nodes x --gpus-per-node; drop the override")
    written = base.scaling.global_batch
    added = [f"scaling.num_workers={num_gpus}"]
    try:
        if "scaling.global_batch" in keys:
            global_batch = parse_value(keys["scaling.global_batch"])
            if not isinstance(global_batch, int) or isinstance(global_batch, bool):
                text = keys["scaling.global_batch"]
                raise PlanError(f"scaling.global_batch: expected an integer, got {text!r}")
        else:
            # keep the per-GPU batch and accumulation the job has at the size it was written for
            at_own_size = apply_overrides(base, overrides)
            global_batch = at_own_size.micro_batch() * at_own_size.accumulation() * num_gpus
            if global_batch != at_own_size.scaling.global_batch:
                added.append(f"scaling.global_batch={global_batch}")
        if global_batch < num_gpus:
            raise PlanError(
                f"scaling.global_batch={global_batch} is less than one image per GPU on {num_gpus} "
                f"GPUs; choose at least {num_gpus} (e.g. {32 * num_gpus} = 32 per GPU)"
            )
        if global_batch != written:
            # the same schedule in images: every iteration count x written / global_batch
            factor = written / global_batch
            for name in ITERATION_FIELDS:
                if name in keys:
                    continue  # the user's own value wins
                current = _get(base, name)
                if isinstance(current, list):
                    scaled: object = sorted({scale_iterations(int(m), factor) for m in current})
                else:
                    scaled = scale_iterations(int(current), factor)  # type: ignore[call-overload]
                if scaled != current:
                    added.append(f"{name}={scaled}".replace(" ", ""))
        spec = apply_overrides(base, [*overrides, *added])
    except SpecError as err:
        raise PlanError(str(err)) from None
    return Resolved(
        spec=spec, num_gpus=num_gpus, written_batch=written, overrides=list(overrides), added=added,
        base_max_iters=base.schedule.max_iters,
    )


def count_model_parameters(spec: JobSpec) -> int:
    """Parameters of the job's model, built on the meta device (no memory, no init cost)."""
    import torch

    from orchestrator.models import UnknownModelError, count_parameters, create_model

    try:
        with torch.device("meta"):
            model = create_model(spec.model.name, spec.model.num_classes, **spec.model.options())
    except (UnknownModelError, TypeError, ValueError) as err:
        raise PlanError(f"model.name={spec.model.name!r}: {err}") from None
    return count_parameters(model)


def throughput_anchor(spec: JobSpec) -> tuple[float, str]:
    """DESIGN.md's img/s per GPU for the job's model and precision, and where it comes from."""
    if spec.scaling.precision == "fp32":
        mode, how = "fp32", "fp32 (TF32) eager NCHW"
    elif spec.model.compile:
        mode, how = "compiled", "torch.compile, bf16 + channels_last"
    else:
        mode, how = "eager", "eager, bf16 + channels_last"
    rate = ANCHORS_IMG_PER_S.get((spec.model.name, mode))
    if rate is None:
        known = sorted({name for name, _ in ANCHORS_IMG_PER_S})
        raise PlanError(
            f"no throughput anchor for {spec.model.name} ({mode}); DESIGN.md measures only "
            f"{', '.join(known)}: pass --img-per-s-per-gpu (measured on your GPU)"
        )
    return rate, f"DESIGN.md anchor: {spec.model.name}, {how}, one H200, synthetic data"


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class ClusterInputs:
    """The cluster and the assumptions the plan is computed for."""

    nodes: int
    gpus_per_node: int
    img_per_s_per_gpu: float | None = None  # None: DESIGN.md's anchor for the job
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
        read_bytes_per_s_per_node=read_bytes_per_s_per_node(inputs.gpus_per_node, rate, image_bytes),
        decode_cores_per_node=decode_cores_per_node(inputs.gpus_per_node, rate),
        shards=shards_needed(inputs.nodes, inputs.gpus_per_node, spec.data.num_workers),
        dataset_bytes=inputs.train_images * image_bytes,
        checkpoint_bytes=ckpt,
        checkpoint_write_s=transfer_time_s(ckpt, inputs.storage_gbps),
        checkpoint_every_iters=checkpoint_interval_iters(
            spec.checkpoint.every_iters, spec.checkpoint.at_epoch_end, math.ceil(inputs.train_images / B)
        ),
        train_s=train_time_s(spec.schedule.max_iters, B, n, rate),
    )


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def _duration(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:,.1f} ms"
    if s < 120:
        return f"{s:,.1f} s"
    if s < 7200:
        return f"{s / 60:,.1f} min"
    if s < 172800:
        return f"{s / 3600:,.1f} h"
    return f"{s / 86400:,.1f} days"


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}" + ("" if n == 1 else "s")


Row = tuple[str, str, str]  # (quantity, value, how it was obtained); a header has no value


def plan_rows(job: str, resolved: Resolved, x: Numbers, inputs: ClusterInputs) -> list[Row]:
    """The table, one row per quantity, grouped under section headers."""
    spec, n = resolved.spec, resolved.num_gpus
    B, iters, loaders = spec.scaling.global_batch, spec.schedule.max_iters, spec.data.num_workers
    nodes, gpus = _count(inputs.nodes, "node"), _count(inputs.gpus_per_node, "GPU")
    lr_how = ("optim.lr, fixed" if spec.optim.lr is not None
              else f"optim.base_lr {spec.optim.base_lr:g} x {B:,} / 256, the linear scaling rule")
    shard_mb = max(1, math.floor(max_shard_bytes(x.dataset_bytes, x.shards) / 1e6))
    rows: list[Row] = [
        (f"{job} ({spec.name}, {spec.model.name}) on {nodes} x {gpus} = {_count(n, 'GPU')}", "", ""),
        ("batch", "", ""),
        ("  per-GPU batch", f"{spec.micro_batch():,}", "spec.micro_batch()"),
        ("  accumulation steps", f"{spec.accumulation():,}", "spec.accumulation()"),
        ("  global batch", f"{B:,}", "as in the job file" if B == resolved.written_batch
         else f"the job file says {resolved.written_batch:,}; per-GPU batch kept"),
        ("  learning rate", f"{spec.lr():g}", lr_how),
        ("throughput", "", ""),
        ("  img/s per GPU", f"{x.img_per_s_per_gpu:,.0f}", x.rate_source),
        ("  img/s, whole cluster", f"{x.img_per_s_per_gpu * n:,.0f}", "x N GPUs, assuming linear scaling"),
        ("  step time", _duration(x.step_s), "per-GPU batch x accumulation / img/s per GPU"),
        ("gradient all-reduce (DDP, ring)", "", ""),
        ("  parameters", f"{x.params:,}", f"create_model({spec.model.name!r}) on the meta device"),
        ("  gradients per step", _bytes(x.grad_bytes),
         "parameters x 4 bytes (fp32, even under bf16 autocast)"),
        ("  sent per GPU per step", _bytes(x.allreduce_bytes_per_gpu),
         f"2(N-1)/N = {ring_allreduce_factor(n):.4f} x gradients"),
    ]
    if n == 1:
        rows.append(("  bandwidth to hide it", "none", "one GPU: nothing to all-reduce"))
    else:
        rows.append(("  bandwidth to hide it", f"{x.allreduce_gbps_needed:,.1f} Gbit/s per GPU",
                     "sent per GPU / step time (DDP overlaps it with backward only)"))
        if inputs.interconnect_gbps is not None:
            comm = transfer_time_s(x.allreduce_bytes_per_gpu, inputs.interconnect_gbps)
            fits = "fits" if comm <= x.step_s else "does NOT fit"
            rows.append((f"  at {inputs.interconnect_gbps:g} Gbit/s per GPU", _duration(comm),
                         f"{comm / x.step_s:.0%} of a step: {fits} within one step"))
    rows += [
        ("input pipeline, per node", "", ""),
        ("  object-store reads", (f"{_bytes(x.read_bytes_per_s_per_node)}/s = "
                                  f"{bandwidth_gbps(x.read_bytes_per_s_per_node, 1):,.1f} Gbit/s"),
         f"{gpus} x img/s x {inputs.kb_per_image:g} KB per image"),
        ("  whole cluster", f"{_bytes(x.read_bytes_per_s_per_node * inputs.nodes)}/s", f"x {nodes}"),
        ("  JPEG decode", f"{x.decode_cores_per_node:,.0f} cores",
         (f"at {DECODE_IMG_PER_S_PER_CORE:g} ImageNet JPEGs/s per core (DESIGN.md, PIL); "
          f"{inputs.gpus_per_node * max(1, loaders)} loader processes (data.num_workers={loaders})")),
        ("shards", "", ""),
        ("  train shards needed", f">= {x.shards:,}", f"{nodes} x {gpus} x {max(1, loaders)} loader workers"),
        ("  shard size for that", f"<= {_bytes(max_shard_bytes(x.dataset_bytes, x.shards))}",
         (f"{inputs.train_images:,} images x {inputs.kb_per_image:g} KB = {_bytes(x.dataset_bytes)}: "
          f"datasets/*.py --shard-size-mb {shard_mb} (the default, 128, gives "
          f"~{_count(math.ceil(x.dataset_bytes / 128e6), 'shard')})")),
        ("checkpoint", "", ""),
        ("  size", _bytes(x.checkpoint_bytes), "parameters x 4 bytes x 2 (fp32 weights + SGD momentum)"),
        (f"  write at {inputs.storage_gbps:g} Gbit/s", _duration(x.checkpoint_write_s),
         "--storage-gbps" if inputs.storage_gbps != DEFAULT_STORAGE_GBPS
         else "the default --storage-gbps: an assumption, measure yours"),
    ]
    if x.checkpoint_every_iters > 0:
        every = x.checkpoint_every_iters
        why = ("checkpoint.every_iters" if every == spec.checkpoint.every_iters
               else "one epoch (checkpoint.at_epoch_end)")
        rows.append((f"  every {every:,} iterations", f"every {_duration(every * x.step_s)}",
                     f"{why}; writing takes {x.checkpoint_write_s / (every * x.step_s):.1%} of that"))
    rows += [
        ("time to train", "", ""),
        ("  schedule", f"{iters:,} iterations x {B:,} = {iters * B / 1e6:,.1f}M images",
         f"{iters * B / inputs.train_images:,.1f} epochs of {inputs.train_images:,}"),
        ("  expected time", _duration(x.train_s), "max_iters x step time, ASSUMING linear scaling with N"),
    ]
    written_iters = resolved.base_max_iters
    if written_iters != iters:  # what the job file's own count would cost at this global batch
        rows.append(("  unscaled max_iters", _duration(written_iters * x.step_s),
                     (f"the job file's {written_iters:,} iterations at {B:,} = "
                      f"{written_iters * B / inputs.train_images:,.0f} epochs")))
    return rows


def format_table(rows: list[Row]) -> str:
    """Rows as aligned text: quantity, value, then how it was obtained."""
    width = max(len(q) for q, v, _ in rows if v)
    vwidth = max(len(v) for _, v, _ in rows)
    return "\n".join(q if not v else f"{q:<{width}}  {v:<{vwidth}}  {how}".rstrip() for q, v, how in rows)


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
            f"lr {spec.lr():g} comes from the linear scaling rule: Goyal et al. (2017) kept accuracy "
            f"up to a global batch of 8k with a 5-epoch warm-up, and lost some beyond it "
            f"(this job: schedule.warmup_iters={spec.schedule.warmup_iters})"
        )
    every = x.checkpoint_every_iters
    if every and every * x.step_s < 50 * x.checkpoint_write_s:  # saving > ~2% of the time
        out.append(
            f"a checkpoint every {every:,} iterations is every {_duration(every * x.step_s)} here: set "
            f"checkpoint.at_epoch_end=false and a checkpoint.every_iters minutes apart"
        )
    out.append("the img/s anchors are H200 numbers on synthetic data: an H100 (p5) is slower, "
               "and a real run can be bound by input or network; measure and pass --img-per-s-per-gpu")
    out.append(f"overrides the plan added: {' '.join(resolved.added)}")
    command = shlex.join(["ray", "job", "submit", "--", "python", job, *resolved.overrides, *resolved.added])
    out.append(f"submit (needs a real cluster): {command}")
    return out


# ------------------------------------------------------------------------------------ the CLI


def _number(kind: type[int | float], minimum: float) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind`, at least `minimum`."""

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        return value

    return convert


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.plan",
        description="What a job asks of a cluster: batch, all-reduce, object-store reads, shards, "
        "checkpoints, time to train. Formulas: the module docstring and docs/operators-guide.md.",
    )
    parser.add_argument("job", help="a job file, e.g. jobs/imagenet_r152.py")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as the job file takes them")
    parser.add_argument("--nodes", type=_number(int, 1), required=True, help="number of nodes (>= 1)")
    parser.add_argument("--gpus-per-node", type=_number(int, 1), default=8, help="GPUs per node (default 8)")
    parser.add_argument(
        "--img-per-s-per-gpu", type=_number(float, 1e-9),
        help="training images/s one GPU sustains (default: DESIGN.md's anchor for the model)",
    )  # fmt: skip
    parser.add_argument(
        "--interconnect-gbps", type=_number(float, 1e-9),
        help="network bandwidth per GPU for the all-reduce, Gbit/s "
        "(p5.48xlarge: 3200 per node with EFA = 400 per GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--storage-gbps", type=_number(float, 1e-9), default=DEFAULT_STORAGE_GBPS,
        help=f"bandwidth for writing a checkpoint, Gbit/s (default {DEFAULT_STORAGE_GBPS:g}, an assumption)",
    )  # fmt: skip
    parser.add_argument(
        "--kb-per-image", type=_number(float, 1e-9), default=DEFAULT_KB_PER_IMAGE,
        help=f"average stored image size, KB (default {DEFAULT_KB_PER_IMAGE:g}: an ImageNet JPEG)",
    )  # fmt: skip
    parser.add_argument(
        "--train-images", type=_number(int, 1), default=IMAGENET_TRAIN_IMAGES,
        help=f"images in the train split (default {IMAGENET_TRAIN_IMAGES:,}: ImageNet)",
    )  # fmt: skip
    # overrides may come before or after the flags
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    inputs = ClusterInputs(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        img_per_s_per_gpu=args.img_per_s_per_gpu,
        interconnect_gbps=args.interconnect_gbps,
        storage_gbps=args.storage_gbps,
        kb_per_image=args.kb_per_image,
        train_images=args.train_images,
    )
    try:
        base = load_job_spec(args.job)
        resolved = resolve_for_cluster(base, list(args.overrides), inputs.nodes * inputs.gpus_per_node)
        numbers = compute(resolved, count_model_parameters(resolved.spec), inputs)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(plan_rows(args.job, resolved, numbers, inputs)))
    print()
    for line in notes(args.job, resolved, numbers):
        print(f"note: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
