"""Epoch plans: pure functions of the manifest counts and (seed, epoch, rank, worker).

Epoch semantics, `epoch_mode="exact"` (the default)
---------------------------------------------------
For epoch e, with N samples in the split, W ranks, B = batch_size, K = max(1, num_workers):
1. The shard list is permuted by (seed, epoch): identical on every rank, so `seed` must be the
   job's seed, not seed + rank. Concatenated, the shards form one global sequence of N samples.
2. Rank r owns the contiguous slice [N*r//W, N*(r+1)//W) (sizes differ by at most one).
   Slices cross shard boundaries freely: a reader skips the first k samples of a shard without
   decoding them, and stops reading where its slice ends.
3. Every rank yields exactly M = ceil(N / (W*B)) batches (`batches_per_epoch`), so DDP never
   waits on a rank that ran dry. A rank holding n samples fills its M batches front to back:
   with q, d = divmod(M*B - n, M), every batch has B - q samples and the last d batches one
   fewer (`batch_sizes`). For a large dataset q = 0: full batches, then at most B batches at
   the end one sample short. Every sample of the split is seen exactly once per epoch.
4. Batch j of a rank comes from DataLoader worker j % K (the DataLoader visits workers round
   robin). Worker w reads the contiguous part of the rank's slice that its batches need, and a
   shuffle buffer (`shuffle_buffer` samples, seeded by (seed, epoch, rank, w)) mixes the order.
The buffer is simulated on sample positions up front (`shuffle_order`), so the emission order is
known before a byte is read; only raw bytes wait in memory, and only samples that are emitted
get decoded.

`epoch_mode="resampled"`: each worker draws whole shards with replacement (seeded by (seed,
epoch, rank, worker)) through the same shuffle buffer; every batch is full, and an epoch is
`samples_per_epoch` samples (0 = the split's size) in M = ceil(that / (W*B)) batches per rank.

Augmentation randomness is a function of (seed, epoch, shard, index in shard) (plus the draw
number in resampled mode), never of worker state (`augmentation_rng`), so the pixels do not
depend on W or K.

Resuming: a checkpoint holds the data position as (epoch, batches of B consumed by each rank).
Which samples those batches held depends on W, K and B (steps 2-4), and their order on the
shuffle buffer and the seed, so the position is exact mid-epoch only with all of them unchanged;
at an epoch boundary any resume exactly, the next epoch being planned afresh (`resume_problem`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.data.manifest import DataError
from orchestrator.data.tar import RawSample, Segment

if TYPE_CHECKING:
    import numpy as np

# numpy is imported where a plan is drawn, not here: the driver's pre-flight checks a split
# against the equal-batch rule (`epoch_batches`) without it.


def batches_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """M = ceil(total / (world_size * batch_size)), the same on every rank."""
    return -(-total // (world_size * batch_size))


def batch_sizes(n: int, num_batches: int, batch_size: int) -> list[int]:
    """Split n samples into num_batches batches of at most batch_size, front-loaded: all have
    batch_size - q samples, the last d one fewer, where q, d = divmod(num_batches*batch_size - n,
    num_batches)."""
    short = num_batches * batch_size - n
    if short < 0 or n < num_batches:
        raise DataError(
            f"{n} samples cannot fill {num_batches} batches of 1..{batch_size} samples: the split "
            "is too small for this world_size and batch_size"
        )
    q, d = divmod(short, num_batches)
    return [batch_size - q - (1 if i >= num_batches - d else 0) for i in range(num_batches)]


def epoch_batches(
    num_samples: int,
    world_size: int,
    batch_size: int,
    mode: str = "exact",
    samples_per_epoch: int = 0,
) -> int:
    """M, the batches every rank yields per epoch, for a split of `num_samples`; in exact mode
    a DataError when the smallest rank's slice cannot fill M batches (`batch_sizes`)."""
    total = (samples_per_epoch or num_samples) if mode == "resampled" else num_samples
    m = batches_per_epoch(total, world_size, batch_size)
    if mode == "exact":
        batch_sizes(num_samples // world_size, m, batch_size)  # rank slices differ by <= 1
    return m


def rank_slice(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous [lo, hi) of the global sequence; sizes differ by at most 1."""
    return total * rank // world_size, total * (rank + 1) // world_size


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard permutation: identical on every rank."""
    import numpy as np

    return np.random.default_rng([seed, epoch, 0]).permutation(num_shards)


def segments_for(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[Segment]:
    """The pieces of shards covering global positions [lo, hi) of the shards concatenated in
    `order`."""
    segs, start = [], 0
    for shard in order:
        end = start + counts[shard]
        a, b = max(lo, start), min(hi, end)
        if a < b:
            segs.append(Segment(int(shard), a - start, b - start))
        start = end
        if start >= hi:
            break
    return segs


def shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer over a stream of n items (positions 0..n-1): fill the
    buffer, then each arriving item replaces a random buffered one, which is emitted; the rest
    leave in random order at the end. Output t is always among the first t + buffer + 1
    arrivals, so a reader never holds more than `buffer` samples it has read but not emitted."""
    import numpy as np

    if buffer <= 1 or n <= 1:
        return np.arange(n)
    fill = min(buffer, n)
    buf = list(range(fill))
    picks = rng.integers(0, fill, size=max(n - fill, 0))
    out = np.empty(n, dtype=np.int64)
    for i, p in enumerate(range(fill, n)):
        k = picks[i]
        out[i] = buf[k]
        buf[k] = p
    tail = np.array(buf, dtype=np.int64)
    rng.shuffle(tail)
    out[n - fill :] = tail
    return out


@dataclass
class WorkerPlan:
    """What one DataLoader worker reads and emits."""

    segments: list[Segment]  # read in this order; their samples are stream positions 0..L-1
    order: np.ndarray  # stream positions in emission order
    sizes: list[int]  # the batches to emit, after the skipped ones
    skip: int = 0  # leading entries of `order` already emitted before a resume (not decoded)


def plan_train_worker(
    counts: Sequence[int],
    *,
    mode: str,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    slot: int,
    start_batch: int,
    shuffle_buffer: int,
    samples_per_epoch: int = 0,
) -> WorkerPlan:
    """The plan of DataLoader worker `slot` when the epoch starts at `start_batch`.

    Slot s handles global batches start_batch + s, start_batch + s + K, ...: those of the
    original worker w = (start_batch + s) % K from its local batch (start_batch + s) // K on.
    """
    import numpy as np

    k = max(1, num_workers)
    total = sum(counts)
    w = (start_batch + slot) % k
    first_local = (start_batch + slot) // k
    if mode == "exact":
        m = batches_per_epoch(total, world_size, batch_size)
        lo, hi = rank_slice(total, world_size, rank)
        sizes = batch_sizes(hi - lo, m, batch_size)
        per_worker = [sum(sizes[j::k]) for j in range(k)]
        wlo = lo + sum(per_worker[:w])
        order = shard_order(len(counts), seed, epoch).tolist()
        segs = segments_for(counts, order, wlo, wlo + per_worker[w])
        local = sizes[w::k]
    else:
        m = batches_per_epoch(samples_per_epoch or total, world_size, batch_size)
        local = [batch_size] * len(range(w, m, k))
        need, segs = sum(local), []
        draw = np.random.default_rng([seed, epoch, 3, rank, w])
        while need > 0:
            shard = int(draw.integers(len(counts)))
            take = min(counts[shard], need)
            if take:
                segs.append(Segment(shard, 0, take, salt=(1, rank, w, len(segs))))
            need -= take
    n = sum(s.stop - s.start for s in segs)
    order = shuffle_order(n, shuffle_buffer, np.random.default_rng([seed, epoch, 1, rank, w]))
    return WorkerPlan(segs, order, local[first_local:], skip=sum(local[:first_local]))


def augmentation_rng(seed: int, epoch: int, sample: RawSample) -> np.random.Generator:
    """The per-sample generator: a function of the sample's identity, not of worker state."""
    import numpy as np  # a dictionary look-up once numpy is loaded

    return np.random.default_rng([seed, epoch, 2, sample.shard, sample.index, *sample.salt])


# the position fields a mid-epoch resume needs unchanged, and the spec fields that set them
POSITION_FIELDS = {
    "world_size": "scaling.num_workers",
    "loader_workers": "data.num_workers",
    "micro_batch": "the micro-batch (scaling.global_batch / scaling.num_workers, or micro_batch)",
    "shuffle_buffer": "data.shuffle_buffer",
    "seed": "seed",
}


def at_epoch_boundary(position: dict[str, Any]) -> bool:
    """Whether a saved position stands between two epochs (none of the next one consumed)."""
    done, per_epoch = position.get("batch_in_epoch", 0), position.get("batches_per_epoch")
    return done == 0 or (per_epoch is not None and done >= per_epoch)


def resume_problem(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why resuming the saved data position with `now`'s world size, loader workers,
    micro-batch, shuffle buffer and seed (POSITION_FIELDS) would not be exact, naming both
    values of each field that changed; None when it is exact (nothing changed, or the
    checkpoint lies at an epoch boundary). K = 0 and 1 plan alike (one stream per rank); a
    field the saved position lacks (an older checkpoint) is not compared."""
    if saved.get("source") == "synthetic" or now.get("source") == "synthetic":
        return None  # random batches: no position to keep
    if at_epoch_boundary(saved):
        return None

    def norm(key: str, value: Any) -> Any:
        return max(1, value) if key == "loader_workers" and value is not None else value

    changed = [
        f"{field} was {saved[key]} and is now {now[key]}"
        for key, field in POSITION_FIELDS.items()
        if key in saved and key in now and norm(key, saved[key]) != norm(key, now[key])
    ]
    if not changed:
        return None
    per_epoch = saved.get("batches_per_epoch")
    where = f"batch {saved['batch_in_epoch']}" + (f" of {per_epoch}" if per_epoch else "")
    return (
        f"cannot resume exactly: the checkpoint stopped mid-epoch (epoch {saved['epoch']}, "
        f"{where}) and {'; '.join(changed)}. Mid-epoch, which samples were consumed depends on "
        "these (orchestrator/data/epochs.py), so some would be seen twice and others not at "
        "all. Resubmit with the checkpoint's values, or fork from a checkpoint taken at an "
        "epoch end (checkpoint.at_epoch_end) under a new job name with --resume-from"
    )
