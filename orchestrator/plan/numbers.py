"""The numbers of a plan for one job on one cluster: every quantity from the formulas, and
the compute rate they start from (an anchor, --img-per-s-per-gpu, or a run's calibration)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.plan import anchors
from orchestrator.plan.calibrate import RunFigures
from orchestrator.plan.formulas import (
    BACKWARD_SHARE,
    BYTES_16BIT,
    BYTES_FP32,
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
    read_bytes_per_s_per_node,
    shards_needed,
    step_time_s,
    transfer_time_s,
    zero_bytes_per_gpu,
)
from orchestrator.plan.job import IMAGENET_TRAIN_IMAGES, PlanError, Resolved
from orchestrator.spec import JobSpec

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
