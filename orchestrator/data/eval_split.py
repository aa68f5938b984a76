"""The validation split, each sample exactly once across ranks: `eval_loader`, `eval_samples`.

Rank r gets the contiguous slice [N*r//W, N*(r+1)//W) in manifest order, split among its
workers. Bad samples are skipped instead of replaced (no duplicates in a score), with the same
logging and the same `max_bad_fraction` limit as training (orchestrator.data.workers).
Multiscale evaluation feeds whole images, grouped by shape (`batches_by_shape`).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from orchestrator.data import transforms as T
from orchestrator.data.epochs import WorkerPlan, rank_slice, segments_for
from orchestrator.data.manifest import Shard, load_manifest, say_verification, split_shards
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

log = logging.getLogger(__name__)


def eval_transform(
    cfg: DataConfig, views: str, scale: int | None = None
) -> Callable[[bytes], np.ndarray]:
    """An eval view as a function bytes -> uint8 array: `center` [3,S,S], `ten_crop`
    [10,3,S,S], `full` [3,H,W] (shorter side `scale`, default eval_resize). For CIFAR
    (train_transform="cifar") the centre view is the original image."""
    if views == "center":
        if cfg.train_transform == "cifar":
            return functools.partial(T.cifar_eval, size=cfg.image_size)
        return functools.partial(T.center_view, size=cfg.image_size, resize=cfg.eval_resize)
    if views == "ten_crop":
        return functools.partial(T.ten_crop_view, size=cfg.image_size, resize=cfg.eval_resize)
    if views == "full":
        return functools.partial(T.full_view, resize=scale or cfg.eval_resize)
    raise ValueError(f"views={views!r}: expected 'center', 'ten_crop' or 'full'")


_Shaped = TypeVar("_Shaped")


def batches_by_shape(
    items: Iterable[_Shaped],
    shape: Callable[[_Shaped], Hashable],
    batch_size: int,
    max_held: float,
    weight: Callable[[_Shaped], float] = lambda item: 1,
) -> Iterator[list[_Shaped]]:
    """Group `items` into batches of one shape each, at most `batch_size` long, holding back
    items of total `weight` at most `max_held`: when more wait, the bucket that grew least
    recently goes out as it is (rare shapes; the common ones keep filling). Each item comes
    out exactly once.

    Why: the multiscale protocol feeds whole images, whose shapes follow their aspect ratios;
    batching only consecutive same-shape images gives batches of one or two on shuffled
    ImageNet, where a few shapes (500x375, 375x500, 500x333 ...) cover most images."""
    buckets: OrderedDict[Hashable, list[_Shaped]] = OrderedDict()
    held = 0.0
    for item in items:
        key = shape(item)
        bucket = buckets.setdefault(key, [])
        buckets.move_to_end(key)
        bucket.append(item)
        held += weight(item)
        if len(bucket) >= batch_size:
            held -= sum(map(weight, bucket))
            yield buckets.pop(key)
        while held > max_held:
            _, oldest = buckets.popitem(last=False)
            held -= sum(map(weight, oldest))
            yield oldest
    while buckets:
        yield buckets.popitem(last=False)[1]


class _EvalSplit(IterableDataset):
    def __init__(
        self,
        cfg: DataConfig,
        shards: list[Shard],
        rank: int,
        world_size: int,
        batch_size: int,
        views: str,
        scale: int | None,
    ):
        super().__init__()
        self.cfg, self.shards = cfg, shards
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.views, self.scale = views, scale

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """(images, labels, global positions in the split, info) per batch of this worker."""
        info = get_worker_info()
        k, w = (info.num_workers, info.id) if info is not None else (1, 0)
        counts = [s.samples for s in self.shards]
        lo, hi = rank_slice(sum(counts), self.world_size, self.rank)
        wlo, whi = lo + (hi - lo) * w // k, lo + (hi - lo) * (w + 1) // k
        plan = WorkerPlan(
            segments_for(counts, range(len(counts)), wlo, whi), np.arange(whi - wlo), []
        )
        transform = eval_transform(self.cfg, self.views, self.scale)
        counter, sent_bytes, seen = [0], 0, 0
        bad: list[RawSample] = []

        def good() -> Iterator[tuple[np.ndarray, int, int]]:
            """(pixels, label, position in the split) of each decodable sample; counts all."""
            nonlocal seen
            stream = plan_samples(plan, self.shards, counter, self.cfg)
            for pos, sample in enumerate(stream):
                assert sample is not None
                seen += 1
                pixels = decode_or_error(functools.partial(transform, sample.image or b""), sample)
                if pixels is None:
                    bad.append(sample)
                else:
                    yield pixels, sample.label, wlo + pos

        def flush(
            batch: list[tuple[np.ndarray, int, int]],
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
            nonlocal sent_bytes, seen
            images = torch.empty(0, dtype=torch.uint8)  # a batch of only bad samples
            if batch:
                images = batch_tensor((len(batch), *batch[0][0].shape), torch.uint8)
                np.stack([pixels for pixels, _, _ in batch], out=images.numpy())
            targets = batch_tensor((len(batch),), torch.int64)
            targets.numpy()[:] = [label for _, label, _ in batch]
            positions = batch_tensor((len(batch),), torch.int64)
            positions.numpy()[:] = [where for _, _, where in batch]
            out = (images, targets, positions, batch_info(seen, bad, counter[0] - sent_bytes))
            sent_bytes, seen = counter[0], 0
            bad.clear()
            return out

        # center/ten_crop views all have one shape: these are plain consecutive batches
        batches = batches_by_shape(
            good(),
            shape=lambda item: item[0].shape,
            batch_size=self.batch_size,
            max_held=self.cfg.eval_hold_mb * 2**20,
            weight=lambda item: item[0].nbytes,
        )
        for batch in batches:
            yield flush(batch)
        if seen or bad:  # a bad tail still reports
            yield flush([])


def eval_samples(
    cfg: DataConfig, *, rank: int, world_size: int, manifest: dict[str, Any] | None = None
) -> int:
    """How many validation samples rank `rank` is given (before any bad ones are skipped)."""
    manifest = manifest or load_manifest(cfg.url)
    lo, hi = rank_slice(
        sum(s.samples for s in split_shards(manifest, cfg.url, cfg.val_split)), world_size, rank
    )
    return hi - lo


def eval_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    views: str = "center",
    scale: int | None = None,
    with_index: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The validation split, each sample exactly once across ranks: rank r gets the contiguous
    slice [N*r//W, N*(r+1)//W) in manifest order (no padding, no duplicates; counts differ by
    at most one), split among its workers. Images: uint8 [B,3,S,S] (`center`), [B,10,3,S,S]
    (`ten_crop`) or [B,3,H,W] (`full`, shorter side `scale`: images are grouped by shape, see
    `batches_by_shape`, so batches may be smaller than batch_size and come out of order). Bad
    samples are skipped, counted and logged, within max_bad_fraction. `with_index`: a third
    tensor, int64 [B], holds each sample's position in the split (manifest order), whatever
    order the workers deliver in."""
    eval_transform(cfg, views, scale)  # reject a bad `views` here, not in a worker
    manifest = load_manifest(cfg.url)
    shards = split_shards(manifest, cfg.url, cfg.val_split)
    say_verification(shards, cfg.url, cfg.val_split, cfg.verify_shards)
    totals = Totals()
    what = f"{cfg.url} split {cfg.val_split!r} (rank {rank})"
    dataset = _EvalSplit(cfg, shards, rank, world_size, batch_size, views, scale)
    for images, labels, positions, info in dataloader(dataset, cfg):
        totals.add(cfg, info, len(labels), what)
        if len(labels):
            yield (images, labels, positions) if with_index else (images, labels)
    if totals.bad:
        log.warning("%s: skipped %d bad of %d samples", what, totals.bad, totals.seen)
