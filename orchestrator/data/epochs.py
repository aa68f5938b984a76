"""Epoch plans: pure functions of the manifest counts and (seed, epoch, step), never of the
world size W or the loader workers K.

`epoch_mode="exact"` (the default)
----------------------------------
For epoch e, with N samples in the split, global batch G and C canonical streams (`data.streams`):
1. The shard list is permuted by (seed, epoch). Concatenated, the shards form one sequence of N
   samples.
2. The epoch has M = ceil(N / G) optimizer steps of L_s samples (`step_sizes`: all G - q, the
   last d one fewer, q, d = divmod(M*G - N, M)), so every sample is seen exactly once.
3. Step s takes `spread(L_s, C, c)` samples from stream c, the even split
   floor(L*(c+1)/C) - floor(L*c/C). Stream c is thus n_c samples long, and owns the contiguous
   part of the sequence after streams 0..c-1 (`stream_bounds`); slices cross shard boundaries
   freely (a reader skips the first k samples of a shard without decoding them).
4. Each stream mixes its samples with its own shuffle buffer (`shuffle_buffer` samples, seeded
   by (seed, epoch, stream)); `shuffle_order` simulates it on positions up front, so the
   emission order is known before a byte is read.
5. Step s's samples, in canonical order, are stream 0's chunk s, then stream 1's, ... That is
   the whole data order: a function of (dataset, seed, epoch, step) and of G, C and the buffer.
Who reads what (any W <= C, any K):
6. Rank r owns streams [floor(C*r/W), floor(C*(r+1)/W)) (`rank_slice` over streams) and trains
   on their chunks of each step; where W divides C its share of step s is spread(L_s, W, r),
   so shares differ by at most one sample. Each sample's loss is weighted alike whatever the
   shares (the trainer scales a rank's loss by its share x W / L_s), so the gradient is the
   global batch's mean at every world size.
7. A rank's K' = min(max(1, K), its streams) loader workers each own a contiguous block of its
   streams, and yield one piece per step (their streams' chunks, in order); the rank joins the
   K' pieces of a step in worker order, which is stream order again.

`epoch_mode="resampled"`: each stream draws whole shards with replacement (seeded by (seed,
epoch, stream)) through the same shuffle buffer; every step is full (L_s = G), and an epoch is
`samples_per_epoch` samples (0 = the split's size) in M = ceil(that / G) steps.

Augmentation randomness is a function of (seed, epoch, shard, index in shard) (plus the draw
number in resampled mode), never of worker state (`augmentation_rng`), so the pixels do not
depend on W or K either.

Resuming: a checkpoint holds the data position as (epoch, steps of the epoch done). Any world
size and loader worker count resume it exactly; G, C, the shuffle buffer and the seed must be
unchanged mid-epoch (`resume_problem`); at an epoch boundary anything goes.
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


def spread(n: int, parts: int, i: int) -> int:
    """Part i of n split evenly into `parts` contiguous parts (sizes differ by at most one)."""
    return n * (i + 1) // parts - n * i // parts


def step_sizes(
    num_samples: int, global_batch: int, mode: str = "exact", samples_per_epoch: int = 0
) -> list[int]:
    """L_s, the samples of each optimizer step of an epoch (see the module docstring)."""
    if mode == "resampled":
        total = samples_per_epoch or num_samples
        return [global_batch] * -(-total // global_batch)
    return batch_sizes(num_samples, -(-num_samples // global_batch), global_batch)


def check_layout(
    num_samples: int,
    global_batch: int,
    streams: int,
    world_size: int,
    mode: str = "exact",
    samples_per_epoch: int = 0,
) -> int:
    """M, the steps of an epoch; a DataError naming the fix when some rank would get a step
    with no sample (more workers than streams, or than samples in a step)."""
    if world_size > streams:
        raise DataError(
            f"{world_size} workers but data.streams={streams}: every worker needs a stream of "
            f"its own; raise data.streams to at least {world_size} (a multiple of every world "
            "size the job may run at keeps the shares equal)"
        )
    sizes = step_sizes(num_samples, global_batch, mode, samples_per_epoch)
    smallest = min(sizes)
    ranks = rank_shares(smallest, streams, world_size)
    if min(ranks) < 1:
        raise DataError(
            f"a step of {smallest} samples over {streams} streams leaves a worker of "
            f"{world_size} without a sample: lower the number of workers or data.streams, or "
            "raise scaling.global_batch"
        )
    return len(sizes)


def rank_shares(global_batch: int, streams: int, world_size: int) -> list[int]:
    """The samples each rank trains on in a full step of `global_batch` (item 6)."""
    bounds = [rank_slice(streams, world_size, r) for r in range(world_size)]
    return [global_batch * hi // streams - global_batch * lo // streams for lo, hi in bounds]


def default_streams(num_workers: int, max_world_size: int) -> int:
    """data.streams=0: one stream per loader worker at the largest world size."""
    return max_world_size * max(1, num_workers)


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


@dataclass
class PiecesPlan:
    """What one training DataLoader worker reads and yields: one piece per step, made of its
    streams' chunks in stream order."""

    streams: list[WorkerPlan]  # per owned stream: segments, emission order, skip
    pick_stream: np.ndarray  # the piece entries from the start step: which owned stream...
    pick_pos: np.ndarray  # ...and which of its positions
    sizes: list[int]  # piece size of each step from the start step (0 is possible)


def stream_bounds(sizes: Sequence[int], streams: int, lo: int, hi: int) -> tuple[Any, Any]:
    """(shares [M, hi-lo]: each step's chunk of streams lo..hi-1, starts [hi-lo]: where each
    of those streams begins in the epoch's sequence)."""
    import numpy as np

    steps = np.asarray(sizes, dtype=np.int64)[:, None]
    cuts = steps * np.arange(lo, hi + 1, dtype=np.int64)[None, :] // streams  # [M, n+1]
    shares = np.diff(cuts, axis=1)
    starts = cuts[:, 0].sum()  # samples of streams 0..lo-1
    lengths = shares.sum(axis=0)
    return shares, starts + np.concatenate([[0], np.cumsum(lengths)[:-1]])


def worker_streams(streams: int, world_size: int, rank: int, num_workers: int) -> list[range]:
    """The streams of each of a rank's loader workers (item 7): K' contiguous blocks."""
    lo, hi = rank_slice(streams, world_size, rank)
    k = min(max(1, num_workers), hi - lo)
    return [range(lo + a, lo + b) for a, b in (rank_slice(hi - lo, k, w) for w in range(k))]


def plan_pieces(
    counts: Sequence[int],
    *,
    mode: str,
    seed: int,
    epoch: int,
    owned: range,
    streams: int,
    global_batch: int,
    start_step: int,
    shuffle_buffer: int,
    samples_per_epoch: int = 0,
) -> PiecesPlan:
    """The plan of the worker owning streams `owned` when the epoch starts at `start_step`."""
    import numpy as np

    total = sum(counts)
    sizes = step_sizes(total, global_batch, mode, samples_per_epoch)
    shares, starts = stream_bounds(sizes, streams, owned.start, owned.stop)
    order = shard_order(len(counts), seed, epoch).tolist() if mode == "exact" else []
    plans, chunks = [], []
    for j, c in enumerate(owned):
        n = int(shares[:, j].sum())
        if mode == "exact":
            segs = segments_for(counts, order, int(starts[j]), int(starts[j]) + n)
        else:
            segs = _resampled_segments(counts, n, np.random.default_rng([seed, epoch, 3, c]), c)
        emit = shuffle_order(n, shuffle_buffer, np.random.default_rng([seed, epoch, 1, c]))
        ends = np.cumsum(shares[:, j])  # where each step's chunk ends in the emission order
        plans.append(
            WorkerPlan(segs, emit, [], skip=int(ends[start_step - 1]) if start_step else 0)
        )
        chunks.append((emit, ends))
    pick_s, pick_p = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for s in range(start_step, len(sizes)):  # step-major: stream 0's chunk, stream 1's...
        for j, (emit, ends) in enumerate(chunks):
            a, b = (int(ends[s - 1]) if s else 0), int(ends[s])
            pick_s.append(np.full(b - a, j, dtype=np.int64))
            pick_p.append(emit[a:b])
    piece_sizes = shares[start_step:].sum(axis=1)
    return PiecesPlan(
        plans, np.concatenate(pick_s), np.concatenate(pick_p), [int(x) for x in piece_sizes]
    )


def _resampled_segments(counts: Sequence[int], need: int, draw: Any, stream: int) -> list[Segment]:
    """Whole shards drawn with replacement until `need` samples (resampled mode)."""
    segs: list[Segment] = []
    while need > 0:
        shard = int(draw.integers(len(counts)))
        take = min(counts[shard], need)
        if take:
            segs.append(Segment(shard, 0, take, salt=(1, stream, len(segs))))
        need -= take
    return segs


def augmentation_rng(seed: int, epoch: int, sample: RawSample) -> np.random.Generator:
    """The per-sample generator: a function of the sample's identity, not of worker state."""
    import numpy as np  # a dictionary look-up once numpy is loaded

    return np.random.default_rng([seed, epoch, 2, sample.shard, sample.index, *sample.salt])


# the position fields a mid-epoch resume needs unchanged, and the spec fields that set them
POSITION_FIELDS = {
    "global_batch": "scaling.global_batch",
    "streams": "data.streams",
    "shuffle_buffer": "data.shuffle_buffer",
    "seed": "seed",
    "epoch_mode": "data.epoch_mode",
    "samples_per_epoch": "data.samples_per_epoch",
}


def at_epoch_boundary(position: dict[str, Any]) -> bool:
    """Whether a saved position stands between two epochs (none of the next one consumed)."""
    if "step_in_epoch" not in position:  # saved before canonical streams: counted micro-batches
        done, per_epoch = position.get("batch_in_epoch", 0), position.get("batches_per_epoch")
    else:
        done, per_epoch = position["step_in_epoch"], position.get("steps_per_epoch")
    return done == 0 or (per_epoch is not None and done >= per_epoch)


def resume_problem(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why resuming the saved data position with `now`'s global batch, streams, shuffle buffer
    and seed (POSITION_FIELDS) would not be exact, naming both values of each field that
    changed; None when it is exact (nothing changed, or the checkpoint lies at an epoch
    boundary). The world size and the loader workers never matter."""
    if saved.get("source") == "synthetic" or now.get("source") == "synthetic":
        return None  # random batches: no position to keep
    if at_epoch_boundary(saved):
        return None
    if "step_in_epoch" not in saved:
        old = "it was saved by an earlier version, whose data order depended on the world size"
        changed = [f"{old} and the loader workers"]
    else:
        changed = [
            f"{field} was {saved[key]} and is now {now[key]}"
            for key, field in POSITION_FIELDS.items()
            if key in saved and key in now and saved[key] != now[key]
        ]
    if not changed:
        return None
    per_epoch = saved.get("steps_per_epoch", saved.get("batches_per_epoch"))
    done = saved.get("step_in_epoch", saved.get("batch_in_epoch"))
    where = f"step {done}" + (f" of {per_epoch}" if per_epoch else "")
    return (
        f"cannot resume exactly: the checkpoint stopped mid-epoch (epoch {saved['epoch']}, "
        f"{where}) and {'; '.join(changed)}. Mid-epoch, which samples were consumed depends on "
        "these (orchestrator/data/epochs.py), so some would be seen twice and others not at "
        "all. Resubmit with the checkpoint's values, or fork from a checkpoint taken at an "
        "epoch end (checkpoint.at_epoch_end) under a new job name with --resume-from"
    )
