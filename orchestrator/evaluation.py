"""The paper's test protocols, with exact counts across ranks (He et al. 2016, Sec. 3.4 and 4).

    >>> result = evaluate(model, spec.data, protocol="ten_crop", device=device)
    >>> result.top1_err, result.top5_err, result.per_class_accuracy

Protocols (`PROTOCOLS`; anything else is an `UnknownProtocolError` listing these):

- ``center``: shorter side ``data.eval_resize`` (256), the centre ``data.image_size`` (224)
  crop: one view. For CIFAR data (``train_transform="cifar"``) the original image.
- ``ten_crop``: shorter side ``eval_resize``, the 4 corner crops and the centre crop of
  ``image_size``, and the horizontal flip of each: the softmax probabilities of the 10 views
  are averaged (the paper's comparison protocol, Tables 2-3).
- ``multiscale``: fully convolutional (Table 4). The whole image is resized to shorter side
  ``s`` for each ``s`` in ``scales`` (the paper's {224, 256, 384, 480, 640}) and, with
  ``flips``, mirrored too. At each (scale, flip) the class-score map
  ``model.score_map(x) -> [N, C, h, w]`` is averaged over its positions; the softmax of those
  mean scores is then averaged over flips and scales. Scores, not probabilities, are averaged
  over space because that is exactly what the net's own global average pooling does (the fc
  is linear), so a scale's prediction is the net's prediction at that input size; across views
  probabilities are averaged, as for 10-crop and for ensembles, so a view with large logits
  cannot outvote the others.

Counting: rank r of W evaluates the contiguous slice [N*r//W, N*(r+1)//W) of the validation
split that `data.eval_split.eval_loader` gives it (no padding, no duplicates), keeps one
probability row per sample (views accumulate into it, keyed by the sample's global position,
so several passes line up whatever their batching), and the sums behind top-1/top-5 error,
loss and per-class accuracy are all-reduced with torch.distributed when it is initialized.
With ``return_probs=True`` every rank also gets every sample's probabilities, labels and global
positions, gathered and sorted by position (a stable order for ensembles).

Loss is the mean negative log of the (view-averaged) probability of the true class; for the
single-view ``center`` protocol it equals the cross-entropy of the logits.

BN recalibration (`recalibrate_bn`): the authors' released models use BN statistics computed
as an exact average over many training batches, not the training-time moving average. With
``momentum=None`` PyTorch's BN keeps a cumulative average, so resetting the statistics and
forwarding N training batches in train mode (no gradients) gives the average over those N
batches; across ranks the averages are averaged again.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchestrator.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    DataError,
    DeviceNormalize,
    load_manifest,
    load_mean_image,
    rank_slice,
    split_shards,
)
from orchestrator.data.eval_split import eval_loader
from orchestrator.errors import UsageError
from orchestrator.models import unwrap
from orchestrator.runtime import all_reduce, distributed, rank_and_world
from orchestrator.spec import EvalConfig

log = logging.getLogger(__name__)

PROTOCOLS = ("center", "ten_crop", "multiscale")
PAPER_SCALES = (224, 256, 384, 480, 640)


class UnknownProtocolError(UsageError, ValueError):
    """A protocol name that is not one of `PROTOCOLS`; the message lists the valid ones."""


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise UnknownProtocolError(
            f"unknown evaluation protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}"
        )
    return protocol


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(s) for s in scales)
    if not out or any(s < 1 for s in out):
        raise ValueError(f"multiscale scales {list(scales)!r}: expected one or more sizes >= 1")
    return out


# ============================================================================================
# results


@dataclass
class EvalResult:
    """Errors are fractions (0.2143, not 21.43). Arrays are numpy, on the host."""

    protocol: str
    samples: int  # each validation sample counted once, across all ranks
    top1_err: float
    top5_err: float
    loss: float
    class_total: np.ndarray  # [C] samples per class
    class_correct: np.ndarray  # [C] top-1 hits per class
    views: int  # views averaged per sample (1, 10, or 2 x scales)
    # with return_probs=True: every sample, sorted by its global position in the split
    indices: np.ndarray | None = None  # [N] int64
    labels: np.ndarray | None = None  # [N] int64
    probs: np.ndarray | None = None  # [N, C] float32, rows sum to 1

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """Top-1 accuracy of each class; NaN for a class with no validation sample."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.class_total > 0, self.class_correct / self.class_total, np.nan)

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        """The keys the training loop logs: val/loss, val/top1_err, val/top5_err, val/samples
        (empty when no sample was evaluated)."""
        if not self.samples:
            return {}
        return {
            f"{prefix}/loss": self.loss,
            f"{prefix}/top1_err": self.top1_err,
            f"{prefix}/top5_err": self.top5_err,
            f"{prefix}/samples": float(self.samples),
        }


def topk_errors(probs: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Top-k error of score rows `probs` [N, C] against `labels` [N] (k capped at C)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if len(labels) == 0:
        return [float("nan")] * len(ks)
    order = np.argsort(-probs, axis=1, kind="stable")
    out = []
    for k in ks:
        hits = (order[:, : min(k, probs.shape[1])] == labels[:, None]).any(1)
        out.append(1.0 - float(hits.mean()))
    return out


def combine_probs(
    members: Sequence[np.ndarray], weights: Sequence[float] | None = None
) -> np.ndarray:
    """Weighted mean of the members' probability arrays (weights default to equal)."""
    if not members:
        raise ValueError("combine_probs: no members")
    w = np.ones(len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights {list(w)}: need {len(members)} non-negative values, sum > 0")
    out = np.zeros_like(members[0], dtype=np.float64)
    for p, wi in zip(members, w / w.sum()):
        out += wi * p
    return out.astype(np.float32)


# ============================================================================================
# the protocols: what each asks of the loader and of the net


@dataclass(frozen=True)
class _Protocol:
    """One protocol's passes over the split, its views per sample, and its batch scoring."""

    passes: tuple[tuple[str, int | None], ...]  # (eval_loader's views, scale) of each pass
    views: int  # views averaged per sample
    batch_probs: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # [B, C], rows sum to 1


def _center(net: nn.Module, scales: Sequence[int], flips: bool) -> _Protocol:
    """One view per sample: the centre crop (a CIFAR image as it is)."""

    def batch_probs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(net(x).float(), dim=1)

    return _Protocol(passes=(("center", None),), views=1, batch_probs=batch_probs)


def _ten_crop(net: nn.Module, scales: Sequence[int], flips: bool) -> _Protocol:
    """Ten views per sample (corners, centre, and their mirrors), probabilities averaged."""

    def batch_probs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:  # x: [B, 10, 3, S, S]
        b, v = x.shape[:2]
        flat = x.reshape(b * v, *x.shape[2:]).contiguous(memory_format=torch.channels_last)
        return F.softmax(net(flat).float(), dim=1).view(b, v, -1).mean(1)

    return _Protocol(passes=(("ten_crop", None),), views=10, batch_probs=batch_probs)


def _multiscale(net: nn.Module, scales: Sequence[int], flips: bool) -> _Protocol:
    """One pass per scale over whole images; scores averaged over space, then the softmax
    averaged over flips (here) and over scales (by the accumulation across passes)."""
    scales = check_scales(scales)
    if not hasattr(net, "score_map"):
        raise TypeError(
            f"{type(net).__name__} has no score_map(): the multiscale protocol needs a fully "
            "convolutional net (orchestrator.models.ResNet)"
        )

    def batch_probs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:  # one scale, same sizes
        b = x.shape[0]
        if flips:  # the image and its mirror in one forward pass
            x = torch.cat([x, x.flip(3)]).contiguous(memory_format=torch.channels_last)
        # nn.Module's attributes type as Tensor | Module: score_map is the net's own method
        probs = F.softmax(cast(Any, net).score_map(x).float().mean((2, 3)), dim=1)
        return probs.view(-1, b, probs.shape[1]).mean(0)

    return _Protocol(
        passes=tuple(("full", s) for s in scales),
        views=len(scales) * (2 if flips else 1),
        batch_probs=batch_probs,
    )


_PROTOCOL_BUILDERS: dict[str, Callable[[nn.Module, Sequence[int], bool], _Protocol]] = {
    "center": _center,
    "ten_crop": _ten_crop,
    "multiscale": _multiscale,
}
assert tuple(_PROTOCOL_BUILDERS) == PROTOCOLS


# ============================================================================================
# the evaluator


@dataclass
class _Tally:
    """This rank's per-sample sums over its slice [lo, lo + n) of the split: every view of a
    sample adds to the row of its global position, whatever pass or batch it came in."""

    lo: int
    counts: torch.Tensor  # [n] int32, views seen per sample
    labels: torch.Tensor  # [n] int64, -1 until seen
    prob_sum: torch.Tensor | None = None  # [n, C] float32, allocated at the first batch

    @classmethod
    def empty(cls, lo: int, n: int, device: torch.device) -> _Tally:
        counts = torch.zeros(n, dtype=torch.int32, device=device)
        return cls(lo, counts, torch.full((n,), -1, dtype=torch.int64, device=device))

    def add(self, probs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        device = self.counts.device
        if self.prob_sum is None:
            n = len(self.counts)
            self.prob_sum = torch.zeros(n, probs.shape[1], dtype=torch.float32, device=device)
        slots = index.to(device) - self.lo
        self.prob_sum.index_add_(0, slots, probs)
        self.counts.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
        self.labels[slots] = labels.to(device)

    def per_sample(self, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, view-averaged probabilities) of the samples seen, in position order;
        `classes` sizes the empty result of a rank that saw nothing (it still joins the
        collectives)."""
        seen = self.counts > 0
        prob_sum = self.prob_sum
        if prob_sum is None:
            prob_sum = torch.zeros(
                len(self.counts), classes, dtype=torch.float32, device=self.counts.device
            )
        return self.labels[seen], prob_sum[seen] / self.counts[seen, None].float()

    def positions(self) -> np.ndarray:
        """Global positions of the samples seen, in the order of `per_sample`."""
        return (torch.nonzero(self.counts > 0).squeeze(1) + self.lo).cpu().numpy()


def _progress(enabled: bool | Callable[..., Any], total: int, desc: str) -> Any:
    if not enabled:
        return None
    if callable(enabled):
        return enabled(total=total, desc=desc)
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()  # in a log file, a line every 10 s is enough
    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        leave=interactive,
        mininterval=0.1 if interactive else 10,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cfg: DataConfig,
    *,
    protocol: str = "center",
    scales: Sequence[int] = PAPER_SCALES,
    flips: bool = True,
    batch_size: int = 100,
    max_batches: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    device: torch.device | str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mean_image: np.ndarray | None = None,
    bf16: bool = False,
    return_probs: bool = False,
    progress: bool | Callable[..., Any] = False,
    desc: str = "eval",
) -> EvalResult:
    """Evaluate `model` on the validation split of `cfg` under `protocol`.

    Every rank must call it (collectives). `rank`/`world_size` default to torch.distributed's
    (else 0/1); `device` to the model's; `mean`/`std` (0-255 scale) to the manifest's, and
    with cfg.normalize=per_pixel_mean `mean_image` ([3, H, W], 0-255) to the dataset's.
    `max_batches` > 0 stops each pass early (a quick look; counts then cover what was seen).
    `progress`: True for a tqdm bar on rank 0, or a tqdm-like factory(total=, desc=).
    The model is put in eval mode and left in the mode it came in.
    """
    net = unwrap(model)
    plan = _PROTOCOL_BUILDERS[check_protocol(protocol)](net, scales, flips)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    rank, world_size = rank_and_world(rank, world_size)
    device = torch.device(device if device is not None else next(net.parameters()).device)
    manifest = load_manifest(cfg.url)
    num_classes = int(manifest["num_classes"])
    normalize = _normalizer(cfg, manifest, device, mean, std, mean_image)
    total = sum(s.samples for s in split_shards(manifest, cfg.url, cfg.val_split))
    lo, hi = rank_slice(total, world_size, rank)  # the positions eval_loader gives this rank
    tally = _Tally.empty(lo, hi - lo, device)
    bar = _progress(progress if rank == 0 else False, (hi - lo) * len(plan.passes), desc)
    loader = functools.partial(
        eval_loader, cfg, rank=rank, world_size=world_size, batch_size=batch_size, with_index=True
    )
    autocast = functools.partial(
        torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"
    )
    try:
        _accumulate(net, plan, loader, normalize, tally, max_batches, autocast, bar)
    finally:
        if bar is not None:
            bar.close()

    y, probs = tally.per_sample(_model_classes(net, num_classes))
    if len(y) and int(y.max()) >= probs.shape[1]:
        raise DataError(
            f"{cfg.url}: label {int(y.max())} but the model has {probs.shape[1]} classes "
            f"(the dataset has {num_classes})"
        )
    result = _result_from_sums(protocol, plan.views, _reduced_sums(y, probs), probs.shape[1])
    if return_probs:
        _gather_probs(result, tally.positions(), y, probs)
    return result


def _accumulate(
    net: nn.Module,
    plan: _Protocol,
    loader: Callable[..., Iterable[Any]],
    normalize: DeviceNormalize,
    tally: _Tally,
    max_batches: int,
    autocast: Callable[[], Any],
    bar: Any,
) -> None:
    """Every pass of `plan` over this rank's slice into `tally`, at most `max_batches` batches
    a pass when > 0; the net in eval mode, and left in the mode it came in."""
    was_training = net.training
    net.eval()
    try:
        for views_kind, scale in plan.passes:
            batches = loader(views=views_kind, scale=scale)
            for images, labels, index in itertools.islice(batches, max_batches or None):
                with autocast():
                    probs = plan.batch_probs(net, normalize(images, train=False))
                tally.add(probs, labels, index)
                if bar is not None:
                    bar.update(len(labels))
    finally:
        net.train(was_training)


def _normalizer(
    cfg: DataConfig,
    manifest: dict[str, Any],
    device: torch.device,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    mean_image: np.ndarray | None,
) -> DeviceNormalize:
    """The eval normalization: given mean/std, else the manifest's, else ImageNet's; the
    dataset's mean image only under cfg.normalize=per_pixel_mean."""
    mean = tuple(mean or manifest.get("mean") or IMAGENET_MEAN)
    std = tuple(std or manifest.get("std") or IMAGENET_STD)
    if cfg.normalize != "per_pixel_mean":
        mean_image = None
    elif mean_image is None:
        mean_image = load_mean_image(manifest, cfg.url)
    return DeviceNormalize(mean, std, 0.0, device, mean_image=mean_image)


def _reduced_sums(y: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The sums behind every metric, added up across ranks, on the host: [loss, top-1 hits,
    top-5 hits, samples, samples per class (C), top-1 hits per class (C)]."""
    classes = probs.shape[1]
    k = min(5, classes)
    top = probs.topk(k, dim=1).indices if len(y) else y.new_zeros(0, k)
    hits = top == y[:, None]
    hit1 = hits[:, 0] if k else torch.zeros_like(y, dtype=torch.bool)
    p_true = probs.gather(1, y[:, None]).squeeze(1) if len(y) else probs.new_zeros(0)
    sums = torch.zeros(4 + 2 * classes, dtype=torch.float64, device=probs.device)
    sums[0] = -torch.log(p_true.double().clamp_min(1e-12)).sum()
    sums[1] = hit1.sum()
    sums[2] = hits.any(1).sum()
    sums[3] = len(y)
    sums[4 : 4 + classes] = torch.bincount(y, minlength=classes)[:classes].double()
    sums[4 + classes :] = torch.bincount(y[hit1], minlength=classes)[:classes].double()
    return all_reduce(sums).cpu()


def _result_from_sums(protocol: str, views: int, sums: torch.Tensor, classes: int) -> EvalResult:
    n = int(sums[3].item())
    return EvalResult(
        protocol=protocol,
        samples=n,
        top1_err=1.0 - sums[1].item() / n if n else math.nan,
        top5_err=1.0 - sums[2].item() / n if n else math.nan,
        loss=sums[0].item() / n if n else math.nan,
        class_total=sums[4 : 4 + classes].numpy().astype(np.int64),
        class_correct=sums[4 + classes :].numpy().astype(np.int64),
        views=views,
    )


def _gather_probs(
    result: EvalResult, positions: np.ndarray, y: torch.Tensor, probs: torch.Tensor
) -> None:
    """Give `result` every rank's samples (positions, labels, probabilities), sorted by
    position."""
    parts = [(positions, y.cpu().numpy(), probs.float().cpu().numpy())]
    if distributed():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    index = np.concatenate([p[0] for p in parts]).astype(np.int64)
    order = np.argsort(index, kind="stable")
    result.indices = index[order]
    result.labels = np.concatenate([p[1] for p in parts]).astype(np.int64)[order]
    result.probs = np.concatenate([p[2] for p in parts]).astype(np.float32)[order]
    if len(np.unique(result.indices)) != len(result.indices):  # a bug, never data
        raise AssertionError("a validation sample was counted twice across ranks")


def evaluate_as(model: nn.Module, data: DataConfig, ev: EvalConfig, **kwargs: Any) -> EvalResult:
    """`evaluate` under a spec's eval section (protocol, scales, flips, batch size, limit);
    `kwargs` are evaluate's other arguments (rank, device, ...)."""
    return evaluate(
        model,
        data,
        protocol=ev.protocol,
        scales=ev.scales,
        flips=ev.flips,
        batch_size=ev.batch_size,
        max_batches=ev.max_batches,
        **kwargs,
    )


def _model_classes(net: nn.Module, default: int) -> int:
    fc = getattr(net, "fc", None)
    return int(fc.out_features) if isinstance(fc, nn.Linear) else default


# ============================================================================================
# BN recalibration


_BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    *,
    prepare: Callable[[Any], torch.Tensor] | None = None,
) -> int:
    """Recompute every BN layer's statistics as the exact average over `num_batches` batches.

    Each BN gets momentum=None (a cumulative moving average) and reset statistics; the batches
    are forwarded in train mode without gradients; momentum and the model's mode are restored.
    `prepare` turns an item of `batches` into the model's input (default: item[0]). With
    torch.distributed initialized, the ranks' averages are averaged (each rank must pass the
    same number of batches). Returns the number of batches used on this rank.
    """
    net = unwrap(model)
    bns = [m for m in net.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns or num_batches <= 0:
        return 0
    saved = [(m, m.momentum) for m in bns]
    was_training = net.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    prepare = prepare or (lambda item: item[0])
    used = 0
    try:
        net.train()
        for item in batches:
            if used >= num_batches:
                break
            net(prepare(item))
            used += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        net.train(was_training)
    if used < num_batches:
        log.warning("BN recalibration: only %d of %d batches available", used, num_batches)
    if distributed():
        world = dist.get_world_size()
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                assert buf is not None  # track_running_stats: recalibration keeps only those
                all_reduce(buf).div_(world)
    return used


def recalibrate_bn_on_data(
    model: nn.Module,
    cfg: DataConfig,
    num_batches: int,
    *,
    batch_size: int,
    rank: int | None = None,
    world_size: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> int:
    """`recalibrate_bn` over `num_batches` training batches of `cfg` (the training
    augmentation, decoded on the CPU, no PCA lighting), each rank its own part of the epoch."""
    from orchestrator.data import TrainLoader

    rank, world_size = rank_and_world(rank, world_size)
    net = unwrap(model)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    if cfg.decode != "cpu":  # decode=gpu ships JPEG bytes for the training loop's nvJPEG path
        cfg = dataclasses.replace(cfg, decode="cpu")
    loader = TrainLoader(
        cfg, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed, device=device
    )
    normalize = DeviceNormalize(loader.mean, loader.std, 0.0, device, mean_image=loader.mean_image)
    return recalibrate_bn(
        net, loader, num_batches, prepare=lambda item: normalize(item[0], train=False)
    )


__all__ = [
    "PAPER_SCALES",
    "PROTOCOLS",
    "EvalResult",
    "UnknownProtocolError",
    "check_protocol",
    "combine_probs",
    "evaluate",
    "recalibrate_bn",
    "recalibrate_bn_on_data",
    "topk_errors",
    "unwrap",
]
