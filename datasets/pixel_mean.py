"""The per-pixel mean image of a train split (the paper's "per-pixel mean", for
data.normalize=per_pixel_mean), shared by datasets/imagenet.py (over the image files it
converts) and datasets/index_shards.py --mean-image (over shards other tools wrote): the same
views, the same seeded sample, the same file and manifest fields, so the two agree on the same
images.

The views: each image's shorter side resized to --mean-resize (256), its central --mean-size
(224) square cut out, the centre protocol's view (bilinear, antialiased; libjpeg may first
downscale in the DCT, never below the size the resize needs), summed as integers (exact, in any
order). The sample: the split's keys sorted, then `random.Random(f"{seed}:mean_image")` draws
--mean-samples of them (0, or more than the split: every image). A sample under
--mean-min-samples (default 1000: the mean of 1000 ImageNet images is within about 2 levels of
255 per pixel) is refused; the whole split is exact whatever its size.

Not a package: the scripts import it as `pixel_mean` from their own folder (sys.path[0]).
"""

from __future__ import annotations

import argparse
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from destination import ConversionError
from PIL import Image

DEFAULT_SAMPLES = 100_000
MIN_SAMPLES = 1000
T = TypeVar("T")


@dataclass(frozen=True)
class CentreViewSum:
    """The summed centre views of some image files (module-level: it is pickled to workers):
    shorter side `resize`, the central `size` x `size` crop (torchvision's rounding), summed
    as integers: int64 [3, size, size]."""

    size: int = 224
    resize: int = 256

    def __call__(self, paths: Sequence[str]) -> tuple[np.ndarray, int, int]:
        """(sum, images used, images tried) over image files; an unreadable one is left out
        (the conversion skips and lists it)."""
        total = self.zeros()
        used = 0
        for path in paths:
            try:
                view = self.view(path)
            except Exception:  # noqa: BLE001 - PIL raises many kinds for a broken file
                view = None
            if view is not None:
                total += view
                used += 1
        return total, used, len(paths)

    def zeros(self) -> np.ndarray:
        return np.zeros((3, self.size, self.size), dtype=np.int64)

    def view(self, image: str | bytes) -> np.ndarray:
        """One image's centre view (a file path or the file's bytes), uint8 [3, size, size]."""
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            w, h = im.size
            short = self.resize
            out = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            im.draft("RGB", out)  # a JPEG: libjpeg downscales in the DCT, never below `out`
            resized = im.convert("RGB").resize(out, Image.Resampling.BILINEAR)
        top, left = round((out[1] - self.size) / 2.0), round((out[0] - self.size) / 2.0)
        pixels = np.asarray(resized)[top : top + self.size, left : left + self.size]
        return pixels.transpose(2, 0, 1)

    def describe(self) -> str:
        return f"centre views: shorter side {self.resize}, central {self.size}x{self.size}"


def choose(items: Sequence[T], key: Callable[[T], Any], limit: int, seed: int) -> list[T]:
    """The images the mean averages: `items` sorted by `key`, then a seeded sample of `limit`
    (0, or at least as many as there are: all of them). The order items were listed in, or
    which worker holds which, never changes the choice."""
    chosen = sorted(items, key=key)
    if 0 < limit < len(chosen):
        chosen = random.Random(f"{seed}:mean_image").sample(chosen, limit)
    return chosen


def check_used(used: int, tried: int, chosen: int, split: int, min_samples: int) -> None:
    """Refuse a mean over too few images: none, or a sample (fewer than the whole split) of
    which fewer than `min_samples` decoded. The whole split is exact whatever its size."""
    if tried < chosen:
        raise ConversionError(
            f"the mean image found only {tried} of its {chosen} drawn train images: a shard "
            "changed while it was being read; run again once the shards are final"
        )
    if used == 0:
        raise ConversionError(
            f"the mean image used no image: none of the {tried} train images tried decoded"
        )
    if chosen < split and used < min_samples:
        raise ConversionError(
            f"the mean image would average only {used} of the split's {split} train images "
            f"({tried - used} of the {tried} drawn did not decode), fewer than "
            f"--mean-min-samples={min_samples}: too few to estimate the per-pixel mean. Raise "
            "--mean-samples (0: every image), or fix the images that do not decode"
        )


def info(view: CentreViewSum, used: int, chosen: int, split: int, seed: int) -> dict[str, Any]:
    """The manifest's note on the mean image: what it is the mean of, of how many images."""
    return {
        "of": view.describe(),
        "samples": used,
        "split_samples": split,
        "sampled": f"seeded random sample (seed {seed})" if chosen < split else "every train image",
    }


def add_arguments(p: argparse.ArgumentParser, samples_help: str) -> None:
    """--mean-samples, --mean-min-samples, --mean-resize, --mean-size."""
    p.add_argument(
        "--mean-samples",
        type=int,
        default=DEFAULT_SAMPLES,
        metavar="N",
        help=samples_help,
    )
    p.add_argument(
        "--mean-min-samples",
        type=int,
        default=MIN_SAMPLES,
        metavar="N",
        help=f"the fewest images a sampled mean may average (default {MIN_SAMPLES}); the whole "
        "split is exact whatever its size",
    )
    p.add_argument(
        "--mean-resize",
        type=int,
        default=256,
        metavar="N",
        help="the mean image's views: shorter side N first (default 256)",
    )
    p.add_argument(
        "--mean-size",
        type=int,
        default=224,
        metavar="N",
        help="the mean image's size: the central NxN of each view (default 224)",
    )


def check_arguments(args: argparse.Namespace) -> CentreViewSum:
    """Refuse bad mean-image options at once, naming the flag and the fix; the view to use."""
    if args.mean_samples < 0:
        raise ConversionError(
            f"--mean-samples {args.mean_samples}: give a number of images >= 0 (0: every "
            "train image)"
        )
    if args.mean_min_samples < 1:
        raise ConversionError(f"--mean-min-samples {args.mean_min_samples}: give a number >= 1")
    if 0 < args.mean_samples < args.mean_min_samples:
        raise ConversionError(
            f"--mean-samples {args.mean_samples}: a sample of fewer than --mean-min-samples="
            f"{args.mean_min_samples} images is too small for a per-pixel mean (each pixel's "
            "standard error grows as 1/sqrt(N)); give --mean-samples 0 (every image) or at "
            f"least {args.mean_min_samples}, or lower --mean-min-samples"
        )
    if args.mean_resize < 1:
        raise ConversionError(f"--mean-resize {args.mean_resize}: give a size >= 1 pixel")
    if not 1 <= args.mean_size <= args.mean_resize:
        raise ConversionError(
            f"--mean-size {args.mean_size}: give a size between 1 and --mean-resize "
            f"({args.mean_resize})"
        )
    return CentreViewSum(args.mean_size, args.mean_resize)


# ---------------------------------------------------------------- from shards (index_shards)


@dataclass(frozen=True)
class ShardViews:
    """One shard's share of the mean (module-level: pickled to a worker): stream the shard
    once, and sum the centre views of the samples whose keys were drawn."""

    url: str
    keys: frozenset[str]
    view: CentreViewSum
    image_keys: tuple[str, ...]

    def __call__(self) -> tuple[np.ndarray, int, int]:
        """(sum, images used, images tried); an image that does not decode is left out (the
        index lists it among the bad samples)."""
        from orchestrator.data.streams import open_url
        from orchestrator.data.tar import tar_groups

        total, used, tried = self.view.zeros(), 0, 0
        with open_url(self.url) as f:
            for _, key, files in tar_groups(f):
                if key not in self.keys:
                    continue
                tried += 1
                image = next((files[k] for k in self.image_keys if k in files), None)
                try:
                    view = None if image is None else self.view.view(image)
                except Exception:  # noqa: BLE001 - PIL raises many kinds for a broken image
                    view = None
                if view is not None:
                    total += view
                    used += 1
        return total, used, tried


def _shard_views(job: ShardViews) -> tuple[np.ndarray, int, int]:
    return job()


def from_shards(
    train: Sequence[tuple[str, str]],
    view: CentreViewSum,
    image_keys: tuple[str, ...],
    args: argparse.Namespace,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The mean image over shards: `train` holds (key, shard URL) of every train sample; the
    sample is drawn as the converter draws it (by key), and each shard holding a drawn sample
    is streamed once, on up to args.workers processes. Returns the mean and its manifest note."""
    import multiprocessing

    from shardwriter import log, progress

    chosen = choose(train, lambda item: item, args.mean_samples, args.seed)
    by_shard: dict[str, set[str]] = {}
    for key, url in chosen:
        by_shard.setdefault(url, set()).add(key)
    jobs = [ShardViews(url, frozenset(keys), view, image_keys) for url, keys in by_shard.items()]
    log(
        f"mean image: {len(chosen)} of the {len(train)} train images, from {len(jobs)} shards "
        f"on {min(args.workers, len(jobs))} processes"
    )
    total, used, tried_all = view.zeros(), 0, 0
    bar = progress(len(chosen), "mean image")
    workers = min(args.workers, len(jobs))
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(_shard_views, jobs) if pool else map(_shard_views, jobs)
        for part, n, tried in results:
            total += part
            used += n
            tried_all += tried
            bar.update(tried)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    bar.close()
    check_used(used, tried_all, len(chosen), len(train), args.mean_min_samples)
    log(f"mean image: averaged {used} images ({tried_all - used} did not decode)")
    return total / used, info(view, used, len(chosen), len(train), args.seed)
