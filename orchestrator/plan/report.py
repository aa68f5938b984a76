"""The plan for one job on one cluster: every number from the formulas, and the table and
notes that show them, each row naming how it was obtained."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

from orchestrator.plan import anchors
from orchestrator.plan.calibrate import RunFigures
from orchestrator.plan.formulas import (
    BACKWARD_SHARE,
    BYTES_16BIT,
    BYTES_FP32,
    DDP_BUCKET_CAP_BYTES,
    Links,
    StepShape,
    allreduce_bytes_per_gpu,
    bandwidth_gbps,
    checkpoint_bytes,
    checkpoint_interval_iters,
    compute_rate_from_step,
    ddp_bucket_bytes,
    decode_cores_per_node,
    exposed_comm_s,
    level_times_s,
    max_shard_bytes,
    read_bytes_per_s_per_node,
    ring_allreduce_factor,
    shards_needed,
    step_time_s,
    transfer_time_s,
    zero_bytes_per_gpu,
)
from orchestrator.plan.job import PlanError, Resolved
from orchestrator.spec import JobSpec

IMAGENET_TRAIN_IMAGES = 1_281_167
DEFAULT_KB_PER_IMAGE = 110.0  # ImageNet's train set is ~140 GB for 1.28M JPEGs
DEFAULT_STORAGE_GBPS = 10.0  # an assumption, not a measurement: pass --storage-gbps
# NVLink 4 on H100/H200 SXM: 900 GB/s per GPU, both directions together ("NVLINK Gen4 900 GB/s"
# in NVIDIA's MLPerf Training v3.1 system descriptions), so 450 GB/s = 3,600 Gbit/s each way.
DEFAULT_INTRA_NODE_GBPS = 3600.0
# 8 x 400 Gbit/s NICs per node: a DGX H100 ("8x ConnectX-7 IB NDR 400Gb/s", the same source) and
# an AWS p5.48xlarge (3,200 Gbit/s of EFA).
DEFAULT_INTERCONNECT_GBPS = 3200.0
GRAD_DTYPE_BYTES = {"fp32": BYTES_FP32, "bf16": BYTES_16BIT, "fp16": BYTES_16BIT}


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
    img_per_s_per_gpu: float | None = None  # None: the anchor for the job (or from_run's)
    interconnect_gbps: float = DEFAULT_INTERCONNECT_GBPS  # per node, between nodes
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS  # per GPU, one direction, inside a node
    grad_dtype: str | None = None  # None: what the job's strategy and precision reduce
    from_run: RunFigures | None = None
    storage_gbps: float = DEFAULT_STORAGE_GBPS
    kb_per_image: float = DEFAULT_KB_PER_IMAGE
    train_images: int = IMAGENET_TRAIN_IMAGES


@dataclass(frozen=True)
class Numbers:
    """Every quantity of the plan, from the formulas above (bytes, seconds, Gbit/s)."""

    img_per_s_per_gpu: float  # compute only: the anchor, --img-per-s-per-gpu or --from-run
    rate_source: str
    compute_step_s: float  # b x a / r
    backward_s: float  # the last micro-batch's backward: DDP's window to hide the all-reduce
    params: int
    grad_bytes: int
    grad_dtype_how: str
    param_bytes: int  # what ZeRO all-gathers after the step
    sent_bytes_per_gpu: float  # flat ring volume per optimizer step
    allreduce_gbps_needed: float  # per GPU, to move it within one compute step
    intra_s: float  # the whole gradient's collective, inside a node
    inter_s: float  # ... and between nodes
    buckets: list[float]  # DDP's, in the order backward fills them; [] under DeepSpeed
    exposed_s: float  # communication no computation hides, per step
    step_s: float  # predicted: compute_step_s + exposed_s
    one_node_step_s: float  # the same per-GPU work on one node of gpus_per_node GPUs
    read_bytes_per_s_per_node: float
    decode_cores_per_node: float
    shards: int
    dataset_bytes: float
    checkpoint_bytes: int
    checkpoint_write_s: float
    checkpoint_every_iters: int  # 0: never (besides the end)
    train_s: float

    @property
    def predicted_img_per_s_per_gpu(self) -> float:
        return self.img_per_s_per_gpu * self.compute_step_s / self.step_s

    @property
    def efficiency_vs_one_node(self) -> float:
        return self.one_node_step_s / self.step_s

    @property
    def efficiency_vs_compute(self) -> float:
        return self.compute_step_s / self.step_s


def gradient_dtype(spec: JobSpec, override: str | None) -> tuple[int, str]:
    """Bytes per gradient value the job reduces, and why."""
    if override is not None:
        return GRAD_DTYPE_BYTES[override], f"{override}, --grad-dtype"
    if spec.scaling.precision == "fp32":
        return BYTES_FP32, "fp32 (scaling.precision=fp32)"
    if spec.scaling.strategy == "deepspeed":
        # DeepSpeed's bf16 mode trains bf16 weights and reduces in the model's dtype (its
        # communication_data_type default); "auto" is bf16 on the GPUs a cluster plan is for
        return BYTES_16BIT, "bf16 (DeepSpeed bf16: bf16 weights, reduced in bf16)"
    return BYTES_FP32, "fp32 (DDP under bf16 autocast keeps fp32 weights and gradients)"


def step_shape(spec: JobSpec, grad_bytes: float, param_bytes: float) -> StepShape:
    return StepShape(
        strategy=spec.scaling.strategy,
        zero_stage=spec.scaling.zero_stage,
        micro_batch=spec.micro_batch(),
        accumulation=spec.accumulation(),
        grad_bytes=grad_bytes,
        param_bytes=param_bytes,
    )


def links_for(nodes: int, gpus_per_node: int, inputs: ClusterInputs) -> Links:
    return Links(nodes, gpus_per_node, inputs.intra_node_gbps, inputs.interconnect_gbps)


def calibrated_rate(run: RunFigures, spec: JobSpec, params: int, inputs: ClusterInputs) -> float:
    """The compute img/s per GPU behind a run's measured step: its step time with the model's
    share of its communication taken out (its GPUs packed on nodes of --gpus-per-node)."""
    if run.model != spec.model.name:
        raise PlanError(
            f"--from-run {run.run_id} trained {run.model}, the job trains {spec.model.name}: "
            "calibrate from a run of the same model"
        )
    per_value, _ = gradient_dtype(_run_spec(run, spec), inputs.grad_dtype)
    shape = StepShape(
        strategy=run.strategy,
        zero_stage=run.zero_stage,
        micro_batch=run.micro_batch,
        accumulation=run.accumulation,
        grad_bytes=params * per_value,
        param_bytes=params * per_value,
    )
    g = min(inputs.gpus_per_node, run.world_size)
    links = links_for(math.ceil(run.world_size / g), g, inputs)
    try:
        return compute_rate_from_step(shape, links, run.step_s)
    except ValueError as err:
        raise PlanError(f"--from-run {run.run_id}: {err}") from None


def _run_spec(run: RunFigures, spec: JobSpec) -> JobSpec:
    """The job spec with the run's strategy and precision (for its gradient dtype)."""
    from orchestrator.spec import SpecError, apply_overrides

    try:
        return apply_overrides(
            spec,
            [
                f"scaling.strategy={run.strategy}",
                f"scaling.zero_stage={run.zero_stage}",
                f"scaling.precision={run.precision}",
            ],
        )
    except SpecError as err:
        raise PlanError(f"--from-run {run.run_id}: {err}") from None


def compute(resolved: Resolved, params: int, inputs: ClusterInputs) -> Numbers:
    """Apply the formulas to a resolved job on a cluster."""
    spec, n = resolved.spec, resolved.num_gpus
    run = inputs.from_run
    if inputs.img_per_s_per_gpu is not None:
        rate, source = inputs.img_per_s_per_gpu, "--img-per-s-per-gpu"
    elif run is not None:
        rate = calibrated_rate(run, spec, params, inputs)
        source = f"--from-run {run.run_id} (compute only; rows below)"
    else:
        rate, source = throughput_anchor(spec)
    per_value, dtype_how = gradient_dtype(spec, inputs.grad_dtype)
    grads = params * per_value
    param_bytes = grads  # ZeRO all-gathers the weights it trains, in the gradients' dtype
    shape = step_shape(spec, grads, param_bytes)
    links = links_for(inputs.nodes, inputs.gpus_per_node, inputs)
    compute_step = step_time_s(spec.micro_batch(), spec.accumulation(), rate)
    exposed = exposed_comm_s(shape, links, rate)
    step = compute_step + exposed
    one_node = links_for(1, inputs.gpus_per_node, inputs)
    one_node_step = compute_step + exposed_comm_s(shape, one_node, rate)
    if spec.scaling.strategy == "deepspeed":
        sent = zero_bytes_per_gpu(
            spec.scaling.zero_stage, grads, param_bytes, n, spec.accumulation()
        )
        buckets: list[float] = []
    else:
        sent = allreduce_bytes_per_gpu(grads, n)
        buckets = ddp_bucket_bytes(grads)
    intra, inter = level_times_s(grads, links, passes=2)
    predicted_rate = rate * compute_step / step
    image_bytes = inputs.kb_per_image * 1e3
    ckpt = checkpoint_bytes(params)
    B = spec.scaling.global_batch
    return Numbers(
        img_per_s_per_gpu=rate,
        rate_source=source,
        compute_step_s=compute_step,
        backward_s=BACKWARD_SHARE * spec.micro_batch() / rate,
        params=params,
        grad_bytes=grads,
        grad_dtype_how=dtype_how,
        param_bytes=param_bytes,
        sent_bytes_per_gpu=sent,
        allreduce_gbps_needed=bandwidth_gbps(sent, compute_step),
        intra_s=intra,
        inter_s=inter,
        buckets=buckets,
        exposed_s=exposed,
        step_s=step,
        one_node_step_s=one_node_step,
        read_bytes_per_s_per_node=read_bytes_per_s_per_node(
            inputs.gpus_per_node, predicted_rate, image_bytes
        ),
        decode_cores_per_node=decode_cores_per_node(inputs.gpus_per_node, predicted_rate),
        shards=shards_needed(inputs.nodes, inputs.gpus_per_node, spec.data.num_workers),
        dataset_bytes=inputs.train_images * image_bytes,
        checkpoint_bytes=ckpt,
        checkpoint_write_s=transfer_time_s(ckpt, inputs.storage_gbps),
        checkpoint_every_iters=checkpoint_interval_iters(
            spec.checkpoint.every_iters,
            spec.checkpoint.at_epoch_end,
            math.ceil(inputs.train_images / B),
        ),
        train_s=spec.schedule.max_iters * step,
    )


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
    s = spec.scaling
    g, nodes = inputs.gpus_per_node, inputs.nodes
    if s.strategy == "deepspeed":
        title = f"gradient communication (DeepSpeed ZeRO-{s.zero_stage}, not overlapped)"
    else:
        title = "gradient all-reduce (DDP, buckets overlapped with backward)"
    per_value = x.grad_bytes // max(1, x.params)
    rows: list[Row] = [
        (title, "", ""),
        ("  parameters", f"{x.params:,}", f"create_model({spec.model.name!r}) on the meta device"),
        (
            "  gradients per step",
            bytes_text(x.grad_bytes),
            f"parameters x {per_value} bytes: {x.grad_dtype_how}",
        ),
    ]
    if s.strategy == "deepspeed" and s.zero_stage > 0:
        scatters = s.zero_stage == 2 and spec.accumulation() > 1
        times = f"{spec.accumulation()} x " if scatters else ""
        how = (
            f"(N-1)/N = {(n - 1) / n:.4f} x ({times}gradients reduce-scattered + "
            f"{bytes_text(x.param_bytes)} of weights all-gathered): the ZeRO paper's 2 Psi"
        )
    else:
        how = f"2(N-1)/N = {ring_allreduce_factor(n):.4f} x gradients (ring all-reduce)"
    rows.append(("  sent per GPU per step", bytes_text(x.sent_bytes_per_gpu), how))
    if n == 1:
        return [*rows, ("  bandwidth to hide it", "none", "one GPU: nothing to all-reduce")]
    need = f"{x.allreduce_gbps_needed:,.1f} Gbit/s per GPU"
    rows.append(("  bandwidth to hide it", need, "sent per GPU / compute per step"))
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
    rows += [
        (f"  all-reduce, inside a node of {g}", duration_text(x.intra_s), intra_how),
        (f"  all-reduce, across {count_text(nodes, 'node')}", duration_text(x.inter_s), inter_how),
        (
            "  all-reduce time",
            duration_text(max(x.intra_s, x.inter_s)),
            f"the slower level ({slower}): NCCL pipelines chunks through both",
        ),
    ]
    if s.strategy == "deepspeed":
        if s.zero_stage == 0:
            how = "one all-reduce after backward (DeepSpeed's data parallel)"
        else:
            per = "every micro-batch" if s.zero_stage == 2 else "the accumulation boundary"
            how = f"reduce-scatter at {per} + all-gather after the step; overlap_comm off"
        rows.append(("  exposed per step", duration_text(x.exposed_s), how))
        return rows
    last = x.buckets[-1] if x.buckets else 0.0
    last_s = max(level_times_s(last, links_for(nodes, g, inputs), passes=2))
    cap = DDP_BUCKET_CAP_BYTES / 2**20
    rows += [
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
            f"the last bucket's {duration_text(last_s)}"
            + (
                f" + {duration_text(x.exposed_s - last_s)} that backward did not hide"
                if x.exposed_s > last_s * (1 + 1e-9)
                else "; the others hide behind backward"
            ),
        ),
    ]
    return rows


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
    command = shlex.join(
        ["ray", "job", "submit", "--", "python", job, *resolved.overrides, *resolved.added]
    )
    out.append(f"submit (needs a real cluster): {command}")
    return out
