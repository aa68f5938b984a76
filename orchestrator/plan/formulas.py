"""The scale model's formulas: bytes, seconds and bandwidths from sizes and rates.

Plain arithmetic, one function per formula of the package docstring (orchestrator/plan), each
checked on hand-computed cases in tests/test_plan.py. Units: MB = 10^6 bytes, Gbit/s = 10^9
bits/s.
"""

from __future__ import annotations

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
