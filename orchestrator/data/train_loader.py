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
    WorkerPlan,
    augmentation_rng,
    epoch_batches,
    plan_train_worker,
)
from orchestrator.data.manifest import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    Shard,
    check_decodable,
    load_manifest,
    load_mean_image,
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

    def pin_memory(self) -> MixedBatch:
        """Called by the DataLoader's pinning thread, as for a tensor."""
        return MixedBatch(*(t.pin_memory() for t in (self.pixels, self.jpeg_data, self.jpeg_ends)))


# one good sample of a batch: (uint8 pixels [3,S,S] or JPEG bytes [n], label, decoded here?)
_Item = tuple[np.ndarray, int, bool]
# (images, labels), or a ring slot that unpickles to them in the training process
_Batch = tuple[torch.Tensor | MixedBatch, torch.Tensor] | SlotRef


def _train_batches(
    plan: WorkerPlan,
    shards: Sequence[Shard],
    cfg: DataConfig,
    seed: int,
    epoch: int,
    cpu_share: Callable[[], float] = lambda: 1.0,
    ring: RingWriter | None = None,
) -> Iterator[tuple[_Batch, dict[str, Any]]]:
    """Decode, augment and batch one worker's share of an epoch; bad samples replaced.

    decode=cpu: every sample is decoded here, and batches go into `ring`'s slots when it has a
    free one. gpu/split: the first round(cpu_share() * size) samples of each batch are (gpu:
    none), the rest only have their JPEG header checked."""
    transform = train_transform(cfg)
    stream = plan_samples(plan, shards, counter := [0], cfg.io_retry_s)
    pending: dict[int, RawSample | None] = {}
    arrived = 0
    cursor = plan.skip
    held: list[tuple[list[RawSample], int, int]] = []  # batches with no good sample yet
    last_good: _Item | None = None
    bytes_seen = 0
    for bsize in plan.sizes:
        here = {"cpu": bsize, "gpu": 0, "split": round(cpu_share() * bsize)}[cfg.decode]
        items: list[_Item | None] = []
        bad: list[RawSample] = []
        for slot, pos in enumerate(plan.order[cursor : cursor + bsize]):
            while pos not in pending:  # read ahead until this position has arrived
                pending[arrived] = next(stream)
                arrived += 1
                if pending[arrived - 1] is None:
                    del pending[arrived - 1]
            sample = pending.pop(int(pos))
            assert sample is not None
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
        if not good:  # filled from the next good batch
            held.append((bad, bsize, nbytes))
            if len(held) * bsize >= max(cfg.bad_check_after, 1) and last_good is None:
                raise DataError(
                    f"no decodable sample in {sum(h[1] for h in held)} samples; "
                    f"e.g. {bad[0].key} in {bad[0].url}: {bad[0].error}"
                )
            continue
        for h_bad, h_size, h_bytes in held:
            yield build_batch([good[0]] * h_size, cfg, ring), batch_info(h_size, h_bad, h_bytes)
        held.clear()
        last_good = good[-1]
        yield build_batch(_fill(items), cfg, ring), batch_info(bsize, bad, nbytes)
    for h_bad, h_size, h_bytes in held:  # a bad tail: repeat the last good
        if last_good is None:
            raise DataError(
                f"no decodable sample in this worker's share; "
                f"e.g. {h_bad[0].key} in {h_bad[0].url}: {h_bad[0].error}"
            )
        yield build_batch([last_good] * h_size, cfg, ring), batch_info(h_size, h_bad, h_bytes)


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
    """One epoch of one rank; each DataLoader worker plays its slot of the plan."""

    def __init__(
        self, loader: TrainLoader, epoch: int, start_batch: int, ring: BatchRing | None = None
    ):
        super().__init__()
        self.ring = ring
        self.cfg, self.shards = loader.cfg, loader.shards
        self.seed, self.epoch, self.start_batch = loader.seed, epoch, start_batch
        self.rank, self.world_size, self.batch_size = (
            loader.rank,
            loader.world_size,
            loader.batch_size,
        )
        self.cpu_share = loader._cpu_share  # shared memory: workers see the loop's changes

    def __iter__(self) -> Iterator[tuple[_Batch, dict[str, Any]]]:
        info = get_worker_info()
        plan = plan_train_worker(
            [s.samples for s in self.shards],
            mode=self.cfg.epoch_mode,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            num_workers=self.cfg.num_workers,
            slot=info.id if info is not None else 0,
            start_batch=self.start_batch,
            shuffle_buffer=self.cfg.shuffle_buffer,
            samples_per_epoch=self.cfg.samples_per_epoch,
        )
        share = self.cpu_share
        ring = self.ring.writer(info.id) if self.ring is not None and info is not None else None
        return _train_batches(
            plan, self.shards, self.cfg, self.seed, self.epoch, lambda: share.value, ring
        )


class TrainLoader:
    """The training batches of one rank, one epoch per iteration (orchestrator.data.epochs says
    which batches).

        loader = TrainLoader(cfg, rank=r, world_size=w, batch_size=32, seed=0)
        for epoch in range(start_epoch, epochs):
            loader.set_epoch(epoch, start_batch=k if epoch == start_epoch else 0)
            for images, labels in loader:  # uint8 [B,3,S,S] NCHW (pinned with CUDA), int64 [B]
                ...  # decode=gpu/split: images is a MixedBatch

    Without set_epoch, each completed pass moves on to the next epoch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        device: torch.device | str | None = None,
    ):
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"rank {rank} / world_size {world_size} / batch_size {batch_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.device = device  # only used by the synthetic source
        self._epoch, self._start = 0, 0
        self._totals = Totals()
        self._cpu_share = multiprocessing.RawValue("d", cfg.split_cpu_share)
        if cfg.synthetic:
            self.manifest: dict[str, Any] = {}
            self.shards: list[Shard] = []
            self.num_classes = cfg.synthetic_classes
            self.num_samples = cfg.synthetic_samples
            self.batches_per_epoch = max(1, cfg.synthetic_samples // (world_size * batch_size))
        else:
            self.manifest = load_manifest(cfg.url)
            self.shards = split_shards(self.manifest, cfg.url, cfg.train_split)
            check_decodable(self.manifest, cfg)
            self.num_classes = int(self.manifest["num_classes"])
            self.num_samples = sum(s.samples for s in self.shards)
            # fails now, not in a worker, if a rank cannot fill M batches (exact mode)
            self.batches_per_epoch = epoch_batches(
                self.num_samples, world_size, batch_size, cfg.epoch_mode, cfg.samples_per_epoch
            )
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
        """Choose the epoch the next iteration yields, starting at batch `start_batch`."""
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._start
        if self.cfg.synthetic:
            batches = synthetic_batches(
                self.batch_size,
                self.cfg.image_size,
                self.num_classes,
                self.device or "cpu",
                seed=self.seed,
            )
            for _ in range(self.batches_per_epoch - start):
                yield next(batches)
        else:
            what = f"{self.cfg.url} split {self.cfg.train_split!r} (rank {self.rank})"
            ring = None
            if self.cfg.num_workers and self.cfg.decode == "cpu":
                # a worker's batches in flight (prefetch_factor), the loop's, the pinning's
                shape = (self.batch_size, 3, self.cfg.image_size, self.cfg.image_size)
                ring = BatchRing(self.cfg.num_workers, self.cfg.prefetch_factor + 2, shape)
            batches = None
            try:
                batches = iter(dataloader(_TrainEpoch(self, epoch, start, ring), self.cfg))
                while True:
                    t0 = time.perf_counter()  # time the wait for a batch, not the loop's work
                    try:
                        (images, labels), info = next(batches)
                    except StopIteration:
                        break
                    finally:
                        self._totals.seconds += time.perf_counter() - t0
                    self._totals.add(self.cfg, info, len(labels), what)
                    yield images, labels
            finally:
                batches = None  # joins the workers (and the pinning thread) before the ring closes
                if ring is not None:
                    ring.close()
        self._epoch, self._start = epoch + 1, 0

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
