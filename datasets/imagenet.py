"""Convert an ImageNet (ILSVRC2012) folder to WebDataset shards on S3 or in a local folder.

    python datasets/imagenet.py --src DIR --dest s3://BUCKET/datasets/imagenet
    python datasets/imagenet.py --src DIR --dest /data/imagenet-shards    # no S3 (e.g. a GPU box)

DIR layout (as unpacked from the ILSVRC2012 tars, or Kaggle's ILSVRC/Data/CLS-LOC):
    DIR/train/<wnid>/*.JPEG      one folder per class; class index = position in sorted wnids
    DIR/val/*.JPEG               flat, labelled by --val-labels (default DIR/LOC_val_solution.csv)
    or DIR/val/<wnid>/*.JPEG     already sorted into class folders: no label file needed

Val label files:
    LOC_val_solution.csv                     Kaggle: ImageId,PredictionString; the first token of
                                             PredictionString is the wnid
    ILSVRC2012_validation_ground_truth.txt   devkit: line i holds the ILSVRC2012_ID (1-1000) of
                                             ILSVRC2012_val_<i>; also pass --devkit-synsets FILE
                                             listing the wnids in ILSVRC2012_ID order (the devkit's
                                             meta.mat order; NOT the sorted LOC_synset_mapping.txt)

Original JPEG bytes are stored as they are (each is decoded once, at 1/8 scale, to prove it is
intact); --resize-shorter N re-encodes at quality 90 with the shorter side N (downscale only).
A file that is not a plain RGB/greyscale JPEG (ImageNet has a few CMYK JPEGs and one PNG) is
re-encoded as an RGB JPEG and listed under "converted" in the manifest. Unreadable files are
skipped and listed under "skipped"; more than --max-bad-fraction of them is fatal.
Rerunning with the same arguments resumes: shards already at --dest are skipped.

The mean image (`mean_image.npy`, float32 [3, S, S], 0-255, named in the manifest; for
data.normalize=per_pixel_mean, the paper's per-pixel mean): the mean of the train images'
centre views, each image's shorter side resized to --mean-resize (256) and its central
--mean-size (224) square cut out, the centre protocol's view of it (bilinear, antialiased;
libjpeg may first downscale in the DCT, never below the size the resize needs). Training crops
are random crops of other scales, so this is the mean of the images' central part as the net's
input size frames it; the normalizer resizes it to whatever size a batch has. Its cost is one
decode per image used: --mean-samples (default 100,000) draws a seeded sample of the train
split, whose per-pixel mean is within ~0.2 levels (of 255) of the full split's; 0 uses every
image (ImageNet: 1.28M decodes, about as much CPU as converting it). The manifest records
which and how many. It is recomputed on every run, resumed ones too.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import multiprocessing
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from shardwriter import (
    MB,
    BadSample,
    ConversionError,
    Encoded,
    Sample,
    add_shard_arguments,
    progress,
    run_cli,
    write_dataset,
)

try:  # the statistics the loaders fall back on (a module that imports no torch)
    from orchestrator.data.manifest import IMAGENET_MEAN, IMAGENET_STD
except ImportError:  # a checkout where the package is not installed
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # the repo root
    from orchestrator.data.manifest import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTS = {".jpeg", ".jpg", ".png"}


@dataclass(frozen=True)
class JpegEncoder:
    """Read one image file and return the JPEG bytes to store (module-level: it is pickled)."""

    resize_shorter: int | None = None
    quality: int = 90

    def __call__(self, sample: Sample) -> Encoded:
        try:
            data = Path(str(sample.source)).read_bytes()
        except OSError as err:
            raise BadSample(f"unreadable: {err.strerror or err}") from None
        try:
            return self._encode(data)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
            raise BadSample(f"cannot decode: {type(err).__name__}: {err}") from None

    def _encode(self, data: bytes) -> Encoded:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            plain = im.format == "JPEG" and im.mode in ("RGB", "L")
            n = self.resize_shorter
            shrink = n is not None and min(w, h) > n
            if plain and not shrink:
                # Decode at 1/8 scale (in the DCT domain: fast) only to prove the file is intact.
                im.draft(None, (max(1, w // 8), max(1, h // 8)))
                im.load()
                return Encoded(data, "jpg")
            note = "" if plain else f"{im.format} {im.mode} image re-encoded as an RGB JPEG"
            if shrink and n is not None:
                size = (n, round(h * n / w)) if w <= h else (round(w * n / h), n)
                im.draft("RGB", size)  # let libjpeg shrink by a power of two first: much faster
                out_im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            else:
                out_im = im.convert("RGB")
            out = io.BytesIO()
            out_im.save(out, "JPEG", quality=self.quality)
            return Encoded(out.getvalue(), "jpg", note)


@dataclass(frozen=True)
class CentreViewSum:
    """The summed centre views of some image files (module-level: it is pickled to workers):
    shorter side `resize`, the central `size` x `size` crop (torchvision's rounding), summed
    as integers (exact, in any order): int64 [3, size, size]."""

    size: int = 224
    resize: int = 256

    def __call__(self, paths: Sequence[str]) -> tuple[np.ndarray, int, int]:
        """(sum, images used, images tried)."""
        total = np.zeros((3, self.size, self.size), dtype=np.int64)
        used = 0
        for path in paths:
            try:
                view = self.view(path)
            except Exception:  # noqa: BLE001 - unreadable: the conversion skips and lists it
                view = None
            if view is not None:
                total += view
                used += 1
        return total, used, len(paths)

    def view(self, path: str) -> np.ndarray:
        """One image's centre view, uint8 [3, size, size]."""
        with Image.open(path) as im:
            w, h = im.size
            short = self.resize
            out = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            im.draft("RGB", out)  # a JPEG: libjpeg downscales in the DCT, never below `out`
            im = im.convert("RGB").resize(out, Image.Resampling.BILINEAR)
        top, left = round((out[1] - self.size) / 2.0), round((out[0] - self.size) / 2.0)
        pixels = np.asarray(im)[top : top + self.size, left : left + self.size]
        return pixels.transpose(2, 0, 1)


def mean_image(
    train: list[Sample], view: CentreViewSum, limit: int, seed: int, workers: int
) -> tuple[np.ndarray, dict[str, object]]:
    """The mean centre view over `limit` train images (a seeded sample; 0 or more than the
    split: every image), on `workers` processes; and the manifest's note on it."""
    chosen = sorted(train, key=lambda s: s.key)
    if 0 < limit < len(chosen):
        chosen = random.Random(f"{seed}:mean_image").sample(chosen, limit)
    paths = [str(s.source) for s in chosen]
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    total = np.zeros((3, view.size, view.size), dtype=np.int64)
    used = 0
    bar = progress(len(paths), "mean image")
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for part, n, tried in pool.imap_unordered(view, chunks) if pool else map(view, chunks):
            total += part
            used += n
            bar.update(tried)
    bar.close()
    if not used:
        raise ConversionError("no train image could be decoded for the mean image")
    sampled = len(chosen) < len(train)
    info: dict[str, object] = {
        "of": f"centre views: shorter side {view.resize}, central {view.size}x{view.size}",
        "samples": used,
        "split_samples": len(train),
        "sampled": f"seeded random sample (seed {seed})" if sampled else "every train image",
    }
    return total / used, info


def _images(folder: Path) -> list[os.DirEntry[str]]:
    """Image files in a folder, sorted by name (hidden files and other types ignored)."""
    with os.scandir(folder) as it:
        found = [
            e
            for e in it
            if e.is_file()
            and not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS
        ]
    return sorted(found, key=lambda e: e.name)


def _sample(entry: os.DirEntry[str], key: str, label: int, origin: str, keep: bool) -> Sample:
    st = entry.stat()
    return Sample(
        key=key.replace(".", "_"),
        label=label,
        source=entry.path,
        origin=origin,
        size=st.st_size if keep else None,  # original bytes: the shard planner knows sizes exactly
        identity=f"{st.st_size}:{st.st_mtime_ns}",
    )


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_train(src: Path, keep: bool) -> tuple[list[str], list[Sample]]:
    """Classes (sorted wnids) and train samples; errors for a missing or empty class folder."""
    train = src / "train"
    if not train.is_dir():
        raise ConversionError(f"no train folder: expected {train}/<wnid>/*.JPEG")
    classes = _class_dirs(train)
    if not classes:
        raise ConversionError(f"{train} has no class folders: expected {train}/<wnid>/*.JPEG")
    samples: list[Sample] = []
    for label, wnid in enumerate(classes):
        files = _images(train / wnid)
        if not files:
            raise ConversionError(
                f"class folder {train / wnid} has no images (*.JPEG, *.jpg, *.png); restore its "
                "images or remove the folder"
            )
        for e in files:
            stem = os.path.splitext(e.name)[0]
            key = stem if stem.startswith(wnid) else f"{wnid}_{stem}"  # unique across classes
            samples.append(_sample(e, key, label, f"train/{wnid}/{e.name}", keep))
    return classes, samples


def read_val_labels(path: Path, synsets: Path | None) -> dict[str, str]:
    """{image id (file stem): wnid} from a Kaggle LOC_val_solution.csv or a devkit ground truth."""
    if not path.is_file():
        raise ConversionError(f"val label file {path} does not exist")
    lines = path.read_text().splitlines()
    labels: dict[str, str] = {}
    if lines and lines[0].startswith("ImageId"):
        for row in csv.reader(lines[1:]):
            if not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise ConversionError(f"{path}: malformed row {row!r}")
            if row[0] in labels:
                raise ConversionError(f"{path}: {row[0]} is labelled twice")
            labels[row[0]] = row[1].split()[0]
        return labels
    ids = [line.strip() for line in lines if line.strip()]
    if not ids or not all(i.isdigit() for i in ids):
        raise ConversionError(
            f"{path}: not a LOC_val_solution.csv (header ImageId,PredictionString) nor a devkit "
            "ILSVRC2012_validation_ground_truth.txt (one class id per line)"
        )
    if synsets is None:
        raise ConversionError(
            f"{path} holds ILSVRC2012 class ids: also pass --devkit-synsets FILE with the wnids "
            "in ILSVRC2012_ID order"
        )
    wnids = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]
    for i, cid in enumerate(ids, start=1):
        if not 1 <= int(cid) <= len(wnids):
            raise ConversionError(f"{path} line {i}: class id {cid} not in 1..{len(wnids)}")
        labels[f"ILSVRC2012_val_{i:08d}"] = wnids[int(cid) - 1]
    return labels


def _few(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" (and {len(items) - 5} more)" if len(items) > 5 else "")


def scan_val(
    src: Path, classes: list[str], labels_file: Path | None, synsets: Path | None, keep: bool
) -> list[Sample]:
    """Val samples, every one labelled with a train class; errors for any mismatch."""
    val = src / "val"
    if not val.is_dir():
        raise ConversionError(f"no val folder: expected {val}/*.JPEG or {val}/<wnid>/*.JPEG")
    index = {wnid: i for i, wnid in enumerate(classes)}
    samples: list[Sample] = []
    subdirs = _class_dirs(val)
    if subdirs:  # val/<wnid>/*.JPEG: the folder names are the labels
        unknown = [d for d in subdirs if d not in index]
        if unknown:
            raise ConversionError(f"val class folders with no train class: {_few(unknown)}")
        for wnid in subdirs:
            for e in _images(val / wnid):
                key = os.path.splitext(e.name)[0]
                samples.append(_sample(e, key, index[wnid], f"val/{wnid}/{e.name}", keep))
        return samples

    if labels_file is None:
        labels_file = src / "LOC_val_solution.csv"
        if not labels_file.is_file():
            raise ConversionError(
                f"no labels for the flat {val}: pass --val-labels LOC_val_solution.csv, or the "
                "devkit's ILSVRC2012_validation_ground_truth.txt with --devkit-synsets"
            )
    labels = read_val_labels(labels_file, synsets)
    files = {os.path.splitext(e.name)[0]: e for e in _images(val)}
    unlabelled = sorted(set(files) - set(labels))
    if unlabelled:
        raise ConversionError(
            f"{len(unlabelled)} val images have no label in {labels_file}: {_few(unlabelled)}"
        )
    absent = sorted(set(labels) - set(files))
    if absent:
        raise ConversionError(
            f"{labels_file} labels {len(absent)} images missing from {val}: {_few(absent)}"
        )
    unknown = sorted({w for w in labels.values() if w not in index})
    if unknown:
        raise ConversionError(
            f"{labels_file} uses wnids with no train class folder: {_few(unknown)}"
        )
    for stem, e in sorted(files.items()):
        samples.append(_sample(e, stem, index[labels[stem]], f"val/{e.name}", keep))
    return samples


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python datasets/imagenet.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--src", type=Path, required=True, help="folder holding train/ and val/")
    add_shard_arguments(p)  # --dest, --shard-size-mb, --workers, --seed
    p.add_argument(
        "--val-labels",
        type=Path,
        help="LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt "
        "(default: SRC/LOC_val_solution.csv)",
    )
    p.add_argument(
        "--devkit-synsets",
        type=Path,
        help="with a devkit ground-truth file: wnids in ILSVRC2012_ID order, one a line",
    )
    p.add_argument(
        "--resize-shorter",
        type=int,
        metavar="N",
        help="re-encode (JPEG quality 90) with the shorter side N; never upscales",
    )
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.001,
        help="fraction of unreadable images tolerated (skipped and listed) before the "
        "run fails (default 0.001)",
    )
    p.add_argument(
        "--mean-samples",
        type=int,
        default=100_000,
        metavar="N",
        help="train images the mean image averages (a seeded sample; default 100000; 0: all)",
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    src: Path = args.src.expanduser().resolve()
    if not src.is_dir():
        raise ConversionError(f"--src {src} is not a folder")
    if args.resize_shorter is not None and args.resize_shorter < 1:
        raise ConversionError("--resize-shorter must be a positive number of pixels")
    if args.mean_samples < 0:
        raise ConversionError("--mean-samples must be >= 0 (0: every train image)")
    if not 1 <= args.mean_size <= args.mean_resize:
        raise ConversionError("--mean-size must be between 1 and --mean-resize")
    keep = args.resize_shorter is None
    # Every input check runs before the destination is touched.
    classes, train = scan_train(src, keep)
    val = scan_val(src, classes, args.val_labels, args.devkit_synsets, keep)
    source = {
        "script": "datasets/imagenet.py",
        "src": str(src),
        "val_labels": str(args.val_labels.resolve()) if args.val_labels else None,
        "devkit_synsets": str(args.devkit_synsets.resolve()) if args.devkit_synsets else None,
        "resize_shorter": args.resize_shorter,
        "shard_size_mb": args.shard_size_mb,
        "seed": args.seed,
        "max_bad_fraction": args.max_bad_fraction,
        "mean_samples": args.mean_samples,
        "mean_resize": args.mean_resize,
        "mean_size": args.mean_size,
    }
    view = CentreViewSum(args.mean_size, args.mean_resize)
    image, info = mean_image(train, view, args.mean_samples, args.seed, args.workers or 1)
    write_dataset(
        args.dest,
        {"train": train, "val": val},
        JpegEncoder(args.resize_shorter),
        classes=classes,
        source=source,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        mean_std_source="imagenet-standard",
        shard_bytes=int(args.shard_size_mb * MB),
        seed=args.seed,
        workers=args.workers,
        max_bad_fraction=args.max_bad_fraction,
        mean_image=image,
        mean_image_info=info,
    )


if __name__ == "__main__":
    run_cli(main)
