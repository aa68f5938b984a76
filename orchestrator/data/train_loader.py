"""The training batches of one rank: `TrainLoader`, its workers' batch building, `MixedBatch`.

Each epoch follows the plan of orchestrator.data.epochs (exact or resampled); every DataLoader
worker plays its slot of it, decodes and augments its samples (orchestrator.data.transforms) and
hands whole batches to the training process.

Resume: `set_epoch(e, start_batch=k)` yields batches k..M-1 of the uninterrupted epoch, pixel
for pixel, provided W, B, K, shuffle_buffer and seed are unchanged (change any of them and
restart at an epoch boundary instead). Workers skip what came before without decoding it
(bytes are still read: a tar stream has no index). Bad-sample substitutes (below) resume
exactly too, except in a worker whose last batches hold no good sample at all. With
decode=gpu/split the samples, labels and order resume exactly; which samples the workers
augment follows the split's share, so split pixels repeat only with a fixed share.

Bad data: a sample that fails to decode, lacks its image or label, or is missing because its
shard is truncated or unreadable is counted, logged (key and shard URL) and replaced, so batch
counts and sizes never change: its slot gets a copy of the nearest good sample of the same
batch (or, for a batch with no good sample at all, of the first good sample of the worker's
next batch; at the very end of a worker, of its last good one). The rank stops with a
`DataError` past `max_bad_fraction` (orchestrator.data.workers).

Hand-off: each worker writes its decode=cpu batches into a ring of `prefetch_factor + 2`
shared-memory buffers that the training process views in place (orchestrator.data.batch_ring),
not into a fresh segment per batch as torch's collate does. A buffer is written again only once
every tensor viewing it is gone, so a loop may keep batches: they then travel the usual way.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)

from orchestrator.data import transforms as T
from orchestrator.data.batch_ring import BatchRing, RingWriter, SlotRef
from orchestrator.data.epochs import (
    PiecesPlan,
    augmentation_rng,
    check_layout,
    default_streams,
    plan_pieces,
    rank_shares,
    step_sizes,
    worker_streams,
)
from orchestrator.data.manifest import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    Shard,
    check_decodable,
    load_manifest,
    load_mean_image,
    say_verification,
    split_shards,
)
from orchestrator.data.tar import RawSample
from orchestrator.data.workers import (
    Totals,
    batch_info,
    batch_tensor,
    dataloader,
    decode_or_error,
    plan_samples,
)
from orchestrator.spec import DataConfig


def train_transform(cfg: DataConfig) -> Callable[[bytes, np.random.Generator], np.ndarray]:
    """cfg.train_transform as a function (bytes, rng) -> uint8 [3, S, S]."""
    if cfg.train_transform == "paper":
        return functools.partial(T.paper_train, size=cfg.image_size, scale_range=cfg.scale_range)
    if cfg.train_transform == "rrc":
        return functools.partial(T.rrc_train, size=cfg.image_size)
    return functools.partial(T.cifar_train, size=cfg.image_size)


JPEG_TAIL = 4096  # where a JPEG's end marker is looked for: some writers append a few bytes


def _checked_jpeg(data: bytes) -> np.ndarray:
    """A JPEG whose header parses and whose end marker is there (the device decodes the
    rest), as a uint8 array. The marker check costs nothing and finds a cut-short body, the
    usual damage, here, where the sample can still be replaced and counted."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG: decode=gpu/split need JPEG shards")
    T.image_size(data)  # raises on a header no decoder can read
    if data.rfind(b"\xff\xd9", max(0, len(data) - JPEG_TAIL)) < 0:
        raise ValueError("JPEG without its end marker: the file is cut short")
    return np.frombuffer(data, dtype=np.uint8)


@dataclass(frozen=True)
class MixedBatch:
    """A decode=gpu/split batch of B samples: the first len(pixels) decoded and augmented by
    the loader's workers, the other B - len(pixels) as JPEG files for the training device to
    decode (nvJPEG) and augment. The batch's labels follow the same order."""

    pixels: torch.Tensor  # uint8 [k, 3, S, S]
    jpeg_data: torch.Tensor  # uint8 [total bytes]: the JPEG files back to back
    jpeg_ends: torch.Tensor  # int64 [B - k]: where each file ends in jpeg_data

    def __len__(self) -> int:
        return len(self.pixels) + len(self.jpeg_ends)

    def jpegs(self) -> list[torch.Tensor]:
        """The JPEG files as uint8 views into jpeg_data."""
        ends = self.jpeg_ends.tolist()
        starts = [0, *ends][: len(ends)]
        return [self.jpeg_data[a:b] for a, b in zip(starts, ends, strict=True)]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MixedBatch:
        """Pixels to `device`; the JPEG bytes stay on the host, where nvJPEG reads them."""
        pixels = self.pixels.to(device, non_blocking=non_blocking)
        return MixedBatch(pixels, self.jpeg_data, self.jpeg_ends)

    def take(self, lo: int, hi: int) -> MixedBatch:
        """Samples [lo, hi) of the batch's order (pixels first, then the JPEGs)."""
        k = len(self.pixels)
        a, b = min(max(lo - k, 0), len(self.jpeg_ends)), min(max(hi - k, 0), len(self.jpeg_ends))
        ends = self.jpeg_ends[a:b]
        first = int(self.jpeg_ends[a - 1]) if a else 0
        data = self.jpeg_data[first : int(ends[-1]) if len(ends) else first]
        return MixedBatch(self.pixels[min(lo, k) : min(hi, k)], data, ends - first)

    def pin_memory(self) -> MixedBatch:
        """Called by the DataLoader's pinning thread, as for a tensor."""
        return MixedBatch(*(t.pin_memory() for t in (self.pixels, self.jpeg_data, self.jpeg_ends)))


Images = torch.Tensor | MixedBatch


def join_batches(batches: list[tuple[Images, torch.Tensor]]) -> tuple[Images, torch.Tensor]:
    """The pieces of a step, one after the other (a MixedBatch: all pixels, then all JPEGs,
    labels to match)."""
    if len(batches) == 1:
        return batches[0]
    images = [b[0] for b in batches]
    labels = [b[1] for b in batches]
    if not isinstance(images[0], MixedBatch):
        return torch.cat(images), torch.cat(labels)  # type: ignore[arg-type]
    mixed: list[MixedBatch] = images  # type: ignore[assignment]
    offsets = np.cumsum([0, *(len(m.jpeg_data) for m in mixed)])
    joined = MixedBatch(
        torch.cat([m.pixels for m in mixed]),
        torch.cat([m.jpeg_data for m in mixed]),
        torch.cat([m.jpeg_ends + int(o) for m, o in zip(mixed, offsets, strict=False)]),
    )
    k = [len(m.pixels) for m in mixed]
    label = torch.cat(
        [y[:n] for y, n in zip(labels, k, strict=True)]
        + [y[n:] for y, n in zip(labels, k, strict=True)]
    )
    return joined, label


def split_batch(
    images: Images, labels: torch.Tensor, sizes: Sequence[int]
) -> list[tuple[Images, torch.Tensor]]:
    """Consecutive micro-batches of `sizes` samples (views, no copy for tensors)."""
    out: list[tuple[Images, torch.Tensor]] = []
    start = 0
    for n in sizes:
        if isinstance(images, MixedBatch):
            out.append((images.take(start, start + n), labels[start : start + n]))
        else:
            out.append((images[start : start + n], labels[start : start + n]))
        start += n
    return out


# one good sample of a batch: (uint8 pixels [3,S,S] or JPEG bytes [n], label, decoded here?)
_Item = tuple[np.ndarray, int, bool]
# (images, labels), or a ring slot that unpickles to them in the training process
_Batch = tuple[torch.Tensor | MixedBatch, torch.Tensor] | SlotRef


def _train_batches(
    plan: PiecesPlan,
    shards: Sequence[Shard],
    cfg: DataConfig,
    seed: int,
    epoch: int,
    cpu_share: Callable[[], float] = lambda: 1.0,
    ring: RingWriter | None = None,
) -> Iterator[tuple[_Batch, dict[str, Any]]]:
    """Decode, augment and batch one worker's pieces of an epoch (one per step); bad samples
    replaced. The batch info carries the pieces' sample ids, in canonical order.

    decode=cpu: every sample is decoded here, and batches go into `ring`'s slots when it has a
    free one. gpu/split: the first round(cpu_share() * size) samples of each batch are (gpu:
    none), the rest only have their JPEG header checked."""
    transform = train_transform(cfg)
    counter = [0]
    streams = [plan_samples(p, shards, counter, cfg) for p in plan.streams]
    pending: list[dict[int, RawSample | None]] = [{} for _ in streams]
    arrived = [0] * len(streams)
    first_id = np.cumsum([0, *(s.samples for s in shards)])
    cursor = 0
    held: list[tuple[list[RawSample], int, int, np.ndarray]] = []  # pieces with no good sample
    last_good: _Item | None = None
    bytes_seen = 0
    for bsize in plan.sizes:
        here = {"cpu": bsize, "gpu": 0, "split": round(cpu_share() * bsize)}[cfg.decode]
        items: list[_Item | None] = []
        bad: list[RawSample] = []
        ids = np.empty(bsize, dtype=np.int64)
        here_j = plan.pick_stream[cursor : cursor + bsize]
        picks = zip(here_j.tolist(), plan.pick_pos[cursor : cursor + bsize].tolist(), strict=True)
        for slot, (j, pos) in enumerate(picks):
            while pos not in pending[j]:  # read ahead until this position has arrived
                pending[j][arrived[j]] = next(streams[j])
                arrived[j] += 1
                if pending[j][arrived[j] - 1] is None:
                    del pending[j][arrived[j] - 1]
            sample = pending[j].pop(int(pos))
            assert sample is not None
            ids[slot] = first_id[sample.shard] + sample.index
            if slot < here:
                work = lambda s=sample: transform(s.image, augmentation_rng(seed, epoch, s))
            else:
                work = lambda s=sample: _checked_jpeg(s.image)
            pixels = decode_or_error(work, sample)
            items.append(None if pixels is None else (pixels, sample.label, slot < here))
            if pixels is None:
                bad.append(sample)
        cursor += bsize
        nbytes, bytes_seen = counter[0] - bytes_seen, counter[0]
        good = [item for item in items if item is not None]
        if not bsize:  # a step that takes nothing from this worker's streams
            if held:  # pieces leave in step order
                held.append(([], 0, nbytes, ids))
            else:
                yield build_batch([], cfg), {**batch_info(0, [], nbytes), "ids": ids}
            continue
        if not good:  # filled from the next good piece
            held.append((bad, bsize, nbytes, ids))
            if sum(h[1] for h in held) >= max(cfg.bad_check_after, 1) and last_good is None:
                raise DataError(
                    f"no decodable sample in {sum(h[1] for h in held)} samples; "
                    f"e.g. {bad[0].key} in {bad[0].url}: {bad[0].error}"
                )
            continue
        for h_bad, h_size, h_bytes, h_ids in held:
            info = {**batch_info(h_size, h_bad, h_bytes), "ids": h_ids}
            yield build_batch([good[0]] * h_size, cfg, ring), info
        held.clear()
        last_good = good[-1]
        yield build_batch(_fill(items), cfg, ring), {**batch_info(bsize, bad, nbytes), "ids": ids}
    for h_bad, h_size, h_bytes, h_ids in held:  # a bad tail: repeat the last good
        if last_good is None:
            raise DataError(
                f"no decodable sample in this worker's share; "
                f"e.g. {h_bad[0].key} in {h_bad[0].url}: {h_bad[0].error}"
            )
        info = {**batch_info(h_size, h_bad, h_bytes), "ids": h_ids}
        yield build_batch([last_good] * h_size, cfg, ring), info


def _fill(items: list[_Item | None]) -> list[_Item]:
    """Give each bad slot a copy of the nearest good slot (the previous one if any)."""
    first = next(item for item in items if item is not None)
    out: list[_Item] = []
    for item in items:
        out.append(item if item is not None else (out[-1] if out else first))
    return out


def build_batch(items: list[_Item], cfg: DataConfig, ring: RingWriter | None = None) -> _Batch:
    """(images, labels), in shared memory when made in a worker (in a slot of `ring` when it
    has a free one): decode=cpu gives uint8 [B,3,S,S]; gpu/split give a MixedBatch, with the
    labels reordered to match it."""
    decoded = [item for item in items if item[2]]
    files = [item for item in items if not item[2]]
    size = cfg.image_size
    taken = ring.take((len(items), 3, size, size)) if ring and cfg.decode == "cpu" else None
    if taken is not None:
        slot_pixels, slot_labels, ref = taken
        slot_labels[:] = [label for _, label, _ in decoded]
        for i, (image, _, _) in enumerate(decoded):
            slot_pixels[i] = image
        return ref
    labels = batch_tensor((len(items),), torch.int64)
    labels.numpy()[:] = [label for _, label, _ in decoded + files]
    pixels = batch_tensor((len(decoded), 3, size, size), torch.uint8)
    arr = pixels.numpy()
    for slot, (image, _, _) in enumerate(decoded):
        arr[slot] = image
    if cfg.decode == "cpu":
        return pixels, labels
    ends = np.cumsum([len(data) for data, _, _ in files], dtype=np.int64)
    jpeg_data = batch_tensor((int(ends[-1]) if len(ends) else 0,), torch.uint8)
    flat = jpeg_data.numpy()
    for (data, _, _), stop in zip(files, ends, strict=True):
        flat[stop - len(data) : stop] = data
    jpeg_ends = batch_tensor((len(files),), torch.int64)
    jpeg_ends.numpy()[:] = ends
    return MixedBatch(pixels, jpeg_data, jpeg_ends), labels


class _TrainEpoch(IterableDataset):
    """One epoch of one rank; DataLoader worker w plays the streams of `workers[w]`."""

    def __init__(
        self,
        loader: TrainLoader,
        epoch: int,
        start_step: int,
        workers: list[range],
        ring: BatchRing | None = None,
    ):
        super().__init__()
        self.ring, self.workers = ring, workers
        self.cfg, self.shards = loader.cfg, loader.shards
        self.seed, self.epoch, self.start_step = loader.seed, epoch, start_step
        self.streams, self.global_batch = loader.streams, loader.global_batch
        self.cpu_share = loader._cpu_share  # shared memory: workers see the loop's changes

    def __iter__(self) -> Iterator[tuple[_Batch, dict[str, Any]]]:
        info = get_worker_info()
        plan = plan_pieces(
            [s.samples for s in self.shards],
            mode=self.cfg.epoch_mode,
            seed=self.seed,
            epoch=self.epoch,
            owned=self.workers[info.id if info is not None else 0],
            streams=self.streams,
            global_batch=self.global_batch,
            start_step=self.start_step,
            shuffle_buffer=self.cfg.shuffle_buffer,
            samples_per_epoch=self.cfg.samples_per_epoch,
        )
        share = self.cpu_share
        ring = self.ring.writer(info.id) if self.ring is not None and info is not None else None
        return _train_batches(
            plan, self.shards, self.cfg, self.seed, self.epoch, lambda: share.value, ring
        )


class TrainLoader:
    """The training batches of one rank: per optimizer step, the rank's share of the global
    batch (orchestrator.data.epochs says which samples: the same whatever the world size).

        loader = TrainLoader(cfg, rank=r, world_size=w, global_batch=256, seed=0)
        for epoch in range(start_epoch, epochs):
            loader.set_epoch(epoch, start_batch=k if epoch == start_epoch else 0)
            for images, labels in loader:  # uint8 [n,3,S,S] NCHW (pinned with CUDA), int64 [n]
                ...  # decode=gpu/split: images is a MixedBatch; split_batch makes micro-batches

    `batch_size` instead of `global_batch` means global_batch = batch_size x world_size.
    `loader.step_sizes[s]` is the global batch of step s (the last steps of an exact epoch
    can be one short). With `record_ids`, `loader.ids[(epoch, step)]` holds the sample ids
    (orchestrator.data.ledger) of the rank's share, in canonical order.
    Without set_epoch, each completed pass moves on to the next epoch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        seed: int,
        batch_size: int | None = None,
        global_batch: int | None = None,
        streams: int | None = None,
        device: torch.device | str | None = None,
    ):
        g = global_batch or (batch_size or 0) * world_size
        if not 0 <= rank < world_size or g < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} / global batch {g}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.global_batch, self.seed = g, seed
        self.streams = streams or cfg.streams or default_streams(cfg.num_workers, world_size)
        self.device = device  # only used by the synthetic source
        self._epoch, self._start = 0, 0
        self._totals = Totals()
        self._cpu_share = multiprocessing.RawValue("d", cfg.split_cpu_share)
        self.record_ids = cfg.ledger
        self.ids: dict[tuple[int, int], np.ndarray] = {}
        self._said_workers = False
        if cfg.synthetic:
            self.manifest: dict[str, Any] = {}
            self.shards: list[Shard] = []
            self.num_classes = cfg.synthetic_classes
            self.num_samples = cfg.synthetic_samples
            self.step_sizes = [g] * max(1, cfg.synthetic_samples // g)
        else:
            self.manifest = load_manifest(cfg.url)
            self.shards = split_shards(self.manifest, cfg.url, cfg.train_split)
            say_verification(self.shards, cfg.url, cfg.train_split, cfg.verify_shards)
            check_decodable(self.manifest, cfg)
            self.num_classes = int(self.manifest["num_classes"])
            self.num_samples = sum(s.samples for s in self.shards)
            # fails now, not in a worker, if a rank would get a step with no sample
            check_layout(
                self.num_samples, g, self.streams, world_size, cfg.epoch_mode, cfg.samples_per_epoch
            )
            self.step_sizes = step_sizes(self.num_samples, g, cfg.epoch_mode, cfg.samples_per_epoch)
        self.batches_per_epoch = len(self.step_sizes)  # optimizer steps
        self.mean = tuple(self.manifest.get("mean") or IMAGENET_MEAN)
        self.std = tuple(self.manifest.get("std") or IMAGENET_STD)
        # data.normalize=per_pixel_mean: the dataset's mean image (synthetic data has none: a
        # flat image of the per-channel mean); None for per_channel
        self.mean_image: np.ndarray | None = None
        if cfg.normalize == "per_pixel_mean":
            self.mean_image = (
                np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
                if cfg.synthetic
                else load_mean_image(self.manifest, cfg.url)
            )

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch the next iteration yields, starting at step `start_batch`."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self._epoch, self._start = epoch, start_batch

    @property
    def cpu_share(self) -> float:
        """decode=split: the share of each batch the workers decode (the device does the rest).
        Setting it reaches running workers at their next batch."""
        return self._cpu_share.value

    @cpu_share.setter
    def cpu_share(self, share: float) -> None:
        self._cpu_share.value = min(max(float(share), 0.0), 1.0)

    def __len__(self) -> int:
        """Batches the next iteration yields."""
        return self.batches_per_epoch - self._start

    def _workers(self) -> list[range]:
        """Each loader worker's streams; said once when data.num_workers exceeds them."""
        workers = worker_streams(self.streams, self.world_size, self.rank, self.cfg.num_workers)
        if self.cfg.num_workers > len(workers) and not self._said_workers:
            log.warning(
                "data.num_workers=%d but rank %d owns only %d of data.streams=%d: it runs %d "
                "loader workers; raise data.streams to a multiple of the world size x %d",
                self.cfg.num_workers, self.rank, len(workers), self.streams, len(workers),
                self.cfg.num_workers,
            )  # fmt: skip
            self._said_workers = True
        return workers

    def __iter__(self) -> Iterator[tuple[Images, torch.Tensor]]:
        epoch, start = self._epoch, self._start
        if self.cfg.synthetic:  # one global batch made once; each rank takes its share
            shares = rank_shares(self.global_batch, self.streams, self.world_size)
            lo = sum(shares[: self.rank])
            images, labels = next(
                synthetic_batches(
                    self.global_batch,
                    self.cfg.image_size,
                    self.num_classes,
                    self.device or "cpu",
                    seed=self.seed,
                )
            )
            mine = images[lo : lo + shares[self.rank]], labels[lo : lo + shares[self.rank]]
            for _ in range(self.batches_per_epoch - start):
                yield mine
        else:
            yield from self._epoch_batches(epoch, start)
        self._epoch, self._start = epoch + 1, 0

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[Images, torch.Tensor]]:
        what = f"{self.cfg.url} split {self.cfg.train_split!r} (rank {self.rank})"
        workers = self._workers()
        ring = None
        if self.cfg.num_workers and self.cfg.decode == "cpu":
            # a worker's pieces in flight (prefetch_factor), the loop's, the pinning's
            most = max(len(w) for w in workers) * -(-self.global_batch // self.streams)
            shape = (most, 3, self.cfg.image_size, self.cfg.image_size)
            ring = BatchRing(len(workers), self.cfg.prefetch_factor + 2, shape)
        batches = None
        try:
            dataset = _TrainEpoch(self, epoch, start, workers, ring)
            count = len(workers) if self.cfg.num_workers else 0
            batches = iter(dataloader(dataset, self.cfg, workers=count))
            for step in range(start, self.batches_per_epoch):
                pieces = []
                t0 = time.perf_counter()  # time the wait for a batch, not the loop's work
                try:
                    for _ in workers:  # the DataLoader visits its workers in turn
                        (images, labels), info = next(batches)
                        self._totals.add(self.cfg, info, len(labels), what)
                        pieces.append((images, labels, info["ids"]))
                finally:
                    self._totals.seconds += time.perf_counter() - t0
                if self.record_ids:
                    self.ids[(epoch, step)] = np.concatenate([np.asarray(p[2]) for p in pieces])
                yield join_batches([(p[0], p[1]) for p in pieces])
        finally:
            batches = None  # joins the workers (and the pinning thread) before the ring closes
            if ring is not None:
                ring.close()

    def count_bad(self, n: int, what: str) -> None:
        """Count n samples the training device could not decode (decode=gpu/split) with the
        workers' bad samples, under the same max_bad_fraction."""
        self._totals.add_bad(self.cfg, n, what)

    def stats(self) -> dict[str, float]:
        """Throughput and data health so far: samples, samples_per_s, bytes_per_s (read from
        storage), bad_samples, bad_fraction... Rates are over the time spent producing
        batches (the loop's own time between batches is excluded)."""
        return self._totals.stats()


class SplitBalancer:
    """decode=split: moves `loader.cpu_share` so that neither the workers nor the device wait.

    Every `window` batches it looks at the share of the loop's time spent waiting for data.
    Waiting means the workers cannot keep up: the device gets a larger part (the share drops
    in proportion to the wait, by at least `step`). No wait means the device may be decoding
    what idle workers could: they get a little more (`step`). A window spans twice the batches
    the loader keeps queued, so each move is judged on batches made after it. The first window
    of an epoch is not judged: new workers start with empty queues, whatever the share.
    """

    def __init__(self, loader: TrainLoader, *, target_wait: float = 0.02, step: float = 0.05):
        self.loader, self.target_wait, self.step = loader, target_wait, step
        self.window = max(10, 2 * max(1, loader.cfg.num_workers) * loader.cfg.prefetch_factor)
        self._batches, self._wait, self._t0 = 0, 0.0, time.perf_counter()
        self._skip = 0

    def new_epoch(self) -> None:
        """The loader starts new workers: ignore the next window of batches."""
        self._skip = self.window

    def observe(self, wait_s: float) -> None:
        """Call once per batch with the seconds the loop waited for it."""
        if self._skip:
            self._skip -= 1
            self._batches, self._wait, self._t0 = 0, 0.0, time.perf_counter()
            return
        self._batches += 1
        self._wait += wait_s
        if self._batches < self.window:
            return
        waited = min(1.0, self._wait / max(time.perf_counter() - self._t0, 1e-9))
        share = self.loader.cpu_share
        if waited > self.target_wait:
            self.loader.cpu_share = share - max(self.step, share * waited)  # the setter clamps
        else:
            self.loader.cpu_share = share + self.step
        log.info(  # bench/gpu_check.py prints the share as each window closes
            "split balancer: a window of %d batches waited %.1f%%: CPU share %.2f -> %.2f",
            self.window,
            100 * waited,
            share,
            self.loader.cpu_share,
        )
        self._batches, self._wait, self._t0 = 0, 0.0, time.perf_counter()


def synthetic_batches(
    batch_size: int, image_size: int, num_classes: int, device: torch.device | str, *, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One random uint8 batch made on `device` once and yielded forever (to time the model
    without the input pipeline)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randint(
        0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=gen
    )
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    images, labels = images.to(device), labels.to(device)
    while True:
        yield images, labels
