"""The scale model's formulas: bytes, seconds and bandwidths from sizes and rates.

Plain arithmetic, one function per formula of the package docstring (orchestrator/plan), each
checked on hand-computed cases in tests/test_plan.py. Units: MB = 10^6 bytes, Gbit/s = 10^9
bits/s.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.plan.anchors import DECODE_IMG_PER_S_PER_CORE

BYTES_FP32 = 4


def ring_allreduce_factor(num_gpus: int) -> float:
    """2(N-1)/N: the share of the gradient bytes each GPU sends in a ring all-reduce."""
    if num_gpus < 1:
        raise ValueError(f"number of GPUs must be >= 1, got {num_gpus}")
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


def read_bytes_per_s_per_node(
    gpus_per_node: int, img_per_s_per_gpu: float, bytes_per_image: float
) -> float:
    """Object-store bytes one node must read per second to keep its GPUs fed."""
    return gpus_per_node * img_per_s_per_gpu * bytes_per_image


def decode_cores_per_node(
    gpus_per_node: int,
    img_per_s_per_gpu: float,
    img_per_s_per_core: float = DECODE_IMG_PER_S_PER_CORE,
) -> float:
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


def train_time_s(
    iterations: int, global_batch: int, num_gpus: int, img_per_s_per_gpu: float
) -> float:
    """Seconds for `iterations` steps of `global_batch`, assuming linear scaling."""
    return iterations * global_batch / (num_gpus * img_per_s_per_gpu)


def scale_iterations(iters: int, factor: float) -> int:
    """An iteration count scaled by `factor`, at least 1 (0 stays 0: "off")."""
    return 0 if iters == 0 else max(1, round(iters * factor))


# ------------------------------------------------------------------ communication model
# Sources (docs/scaling-model.md cites each): torch DDP's defaults (bucket_cap_mb=25 MiB, a first
# bucket of dist._DEFAULT_FIRST_BUCKET_BYTES = 1 MiB), nccl-tests' PERFORMANCE.md (a ring moves
# 2(n-1)/n of the buffer per rank; its time is set by the slowest link), the ZeRO paper's volumes.

BYTES_16BIT = 2
DDP_BUCKET_CAP_BYTES = 25 * 2**20
DDP_FIRST_BUCKET_BYTES = 2**20
# Backward costs about twice the forward pass (two matrix products per layer instead of one), so
# it takes ~2/3 of a step's compute: the window DDP can hide gradient traffic in.
BACKWARD_SHARE = 2 / 3


def reduce_scatter_factor(num_gpus: int) -> float:
    """(N-1)/N: the share of a buffer each GPU sends in a ring reduce-scatter (or all-gather)."""
    if num_gpus < 1:
        raise ValueError(f"number of GPUs must be >= 1, got {num_gpus}")
    return (num_gpus - 1) / num_gpus


@dataclass(frozen=True)
class Links:
    """The two levels a collective crosses: NVLink inside a node, the NICs between nodes."""

    nodes: int
    gpus_per_node: int
    intra_gbps: float  # per GPU, one direction
    inter_gbps: float  # per node, all its NICs together


def level_times_s(nbytes: float, links: Links, passes: int) -> tuple[float, float]:
    """(intra-node, inter-node) seconds of a hierarchical collective on `nbytes` per GPU.

    passes = 2 for an all-reduce (reduce-scatter + all-gather), 1 for either half alone. Inside a
    node each GPU moves passes x (g-1)/g x nbytes over NVLink; between nodes each node moves
    passes x (n-1)/n x nbytes (its g GPUs each carry a 1/g shard) through its NICs.
    """
    g, n = links.gpus_per_node, links.nodes
    intra = passes * reduce_scatter_factor(g) * transfer_time_s(nbytes, links.intra_gbps)
    inter = passes * reduce_scatter_factor(n) * transfer_time_s(nbytes, links.inter_gbps)
    return intra, inter


def collective_time_s(nbytes: float, links: Links, passes: int) -> float:
    """Seconds of the collective: the slower level (NCCL pipelines chunks through both)."""
    return max(level_times_s(nbytes, links, passes))


def ddp_bucket_bytes(
    grad_bytes: float,
    cap: float = DDP_BUCKET_CAP_BYTES,
    first: float = DDP_FIRST_BUCKET_BYTES,
) -> list[float]:
    """DDP's buckets in the order backward fills them: a small first one, then `cap`-sized ones;
    the last holds the remainder (the first layers' gradients, ready when backward ends)."""
    if grad_bytes <= 0:
        return []
    sizes = [min(first, grad_bytes)]
    left = grad_bytes - sizes[0]
    while left > 0:
        sizes.append(min(cap, left))
        left -= sizes[-1]
    return sizes


def exposed_after_backward_s(
    bucket_bytes: list[float], bucket_s: list[float], backward_s: float
) -> float:
    """Communication time left after backward ends, for buckets reduced one after another.

    Gradient bytes are taken to become ready at an even rate over backward, so bucket i is ready
    at backward_s x (bytes up to and including it) / all bytes; each starts when it is ready and
    the previous one is done. The last bucket is ready only when backward ends, so at least its
    own time is exposed; the rest is hidden as long as the link keeps up with backward.
    """
    total = sum(bucket_bytes)
    if total <= 0:
        return 0.0
    done, filled = 0.0, 0.0
    for size, seconds in zip(bucket_bytes, bucket_s, strict=True):
        filled += size
        done = max(done, backward_s * filled / total) + seconds
    return max(0.0, done - backward_s)


def zero_exposed_s(
    stage: int,
    grad_bytes: float,
    param_bytes: float,
    links: Links,
    accumulation: int,
) -> float:
    """DeepSpeed's communication per optimizer step, none of it overlapped with backward.

    With the project's config (overlap_comm unset: off below stage 3; reduce_bucket_size 5e8
    elements, more than a ResNet's parameters) the gradients are reduced after backward. Stage 0:
    an all-reduce at the accumulation boundary. Stage 1: a reduce-scatter there, then an
    all-gather of the updated parameters. Stage 2: a reduce-scatter after every micro-batch
    (partitioned gradients are not kept whole between micro-batches), then the all-gather.
    """
    if stage == 0:
        return collective_time_s(grad_bytes, links, passes=2)
    scatters = accumulation if stage == 2 else 1
    scatter = collective_time_s(grad_bytes, links, passes=1)
    gather = collective_time_s(param_bytes, links, passes=1)
    return scatters * scatter + gather


def zero_bytes_per_gpu(
    stage: int, grad_bytes: float, param_bytes: float, num_gpus: int, accumulation: int
) -> float:
    """Bytes each GPU sends per optimizer step under ZeRO (flat ring volumes): stage 0 is DDP's
    2(N-1)/N x G; stages 1 and 2 send (N-1)/N x G per reduce-scatter plus (N-1)/N x the
    parameters' bytes for the all-gather, the ZeRO paper's Psi + Psi = 2 Psi."""
    if stage == 0:
        return allreduce_bytes_per_gpu(grad_bytes, num_gpus)
    scatters = accumulation if stage == 2 else 1
    return reduce_scatter_factor(num_gpus) * (scatters * grad_bytes + param_bytes)


@dataclass(frozen=True)
class StepShape:
    """What one optimizer step computes and communicates, per GPU."""

    strategy: str  # "ddp" | "deepspeed"
    zero_stage: int  # deepspeed only
    micro_batch: int
    accumulation: int
    grad_bytes: float
    param_bytes: float  # the parameters ZeRO all-gathers after the step


def ddp_exposed_s(grad_bytes: float, links: Links, backward_s: float) -> float:
    """DDP: each bucket's all-reduce starts when backward has filled it; what is left after
    backward ends (at least the last bucket's all-reduce) is exposed."""
    buckets = ddp_bucket_bytes(grad_bytes)
    times = [collective_time_s(b, links, passes=2) for b in buckets]
    return exposed_after_backward_s(buckets, times, backward_s)


def exposed_comm_s(shape: StepShape, links: Links, img_per_s_per_gpu: float) -> float:
    """Seconds of a step's communication that no computation hides."""
    if links.nodes * links.gpus_per_node == 1:
        return 0.0
    if shape.strategy == "deepspeed":
        return zero_exposed_s(
            shape.zero_stage, shape.grad_bytes, shape.param_bytes, links, shape.accumulation
        )
    # DDP all-reduces on the last micro-batch only (no_sync before it): its backward is the window
    backward = BACKWARD_SHARE * shape.micro_batch / img_per_s_per_gpu
    return ddp_exposed_s(shape.grad_bytes, links, backward)


def predicted_step_s(shape: StepShape, links: Links, img_per_s_per_gpu: float) -> float:
    """Compute (b x a / r) plus the exposed communication."""
    compute = step_time_s(shape.micro_batch, shape.accumulation, img_per_s_per_gpu)
    return compute + exposed_comm_s(shape, links, img_per_s_per_gpu)


def compute_rate_from_step(shape: StepShape, links: Links, measured_step_s: float) -> float:
    """The compute img/s per GPU whose predicted step on `links` is `measured_step_s`: a run's
    measured step with the model's share of its communication taken out. Predicted step time
    grows strictly as the rate falls, so bisection finds it."""
    images = shape.micro_batch * shape.accumulation
    slow, fast = images / measured_step_s, images / measured_step_s * 1e6  # rates, img/s
    if predicted_step_s(shape, links, fast) >= measured_step_s:
        raise ValueError(
            f"a step of {measured_step_s * 1e3:.3g} ms is shorter than the model's communication "
            "alone on this cluster: check --interconnect-gbps / --intra-node-gbps"
        )
    for _ in range(200):
        mid = (slow * fast) ** 0.5
        if predicted_step_s(shape, links, mid) > measured_step_s:
            slow = mid
        else:
            fast = mid
        if fast / slow < 1 + 1e-12:
            break
    return (slow * fast) ** 0.5
