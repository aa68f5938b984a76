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
which and how many. It is recomputed on every run, resumed ones too. A sample smaller than
--mean-min-samples (1000) is refused (the whole split, exact, is taken whatever its size);
datasets/pixel_mean.py holds the views and the sampling, which index_shards.py --mean-image
shares.

Every flag, the label files and --dest (its scheme, the store, a probe write, and what an
earlier run left there: another --src's conversion is replaced only with --replace) are checked
before the scan and the mean pass: a bad argument costs seconds, not the mean pass.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pixel_mean import CentreViewSum, add_arguments, check_arguments, check_used, choose, info
from shardwriter import (
    MB,
    BadSample,
    ConversionError,
    Dest,
    Encoded,
    Sample,
    add_shard_arguments,
    check_shard_arguments,
    log,
    prepare_dest,
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


def mean_image(
    train: list[Sample], view: CentreViewSum, args: argparse.Namespace
) -> tuple[np.ndarray, dict[str, object]]:
    """The mean centre view over --mean-samples train images (pixel_mean's seeded sample),
    on --workers processes; and the manifest's note on it."""
    chosen = choose(train, lambda s: s.key, args.mean_samples, args.seed)
    paths = [str(s.source) for s in chosen]
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    total = view.zeros()
    used = tried_all = 0
    bar = progress(len(paths), "mean image")
    workers = args.workers
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for part, n, tried in pool.imap_unordered(view, chunks) if pool else map(view, chunks):
            total += part
            used += n
            tried_all += tried
            bar.update(tried)
    bar.close()
    check_used(used, tried_all, len(chosen), len(train), args.mean_min_samples)
    log(f"mean image: {used} of {len(chosen)} chosen train images ({len(train)} in the split)")
    return total / used, info(view, used, len(chosen), len(train), args.seed)


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
    add_arguments(
        p,
        "train images the mean image averages (a seeded sample; default 100000; 0: all)",
    )
    return p.parse_args(argv)


def check_arguments_and_dest(args: argparse.Namespace) -> tuple[Path, CentreViewSum, Dest]:
    """Every flag, the label files and the destination, before the scan and the mean pass:
    (src, the mean image's view, the prepared destination)."""
    src: Path = args.src.expanduser().resolve()
    if not src.is_dir():
        raise ConversionError(f"--src {src} is not a folder: give the folder holding train/")
    check_shard_arguments(args)
    if args.resize_shorter is not None and args.resize_shorter < 1:
        raise ConversionError(
            f"--resize-shorter {args.resize_shorter}: give a positive number of pixels, or "
            "leave it out to keep the original JPEGs"
        )
    view = check_arguments(args)
    for flag, path in (
        ("--val-labels", args.val_labels),
        ("--devkit-synsets", args.devkit_synsets),
    ):
        if path is not None and not path.is_file():
            raise ConversionError(f"{flag} {path}: no such file")
    dest = prepare_dest(args.dest, "datasets/imagenet.py", str(src), replace=args.replace)
    return src, view, dest


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Every argument and the destination are checked before the scan and the mean pass.
    src, view, dest = check_arguments_and_dest(args)
    keep = args.resize_shorter is None
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
    image, note = mean_image(train, view, args)
    write_dataset(
        dest,
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
        mean_image_info=note,
    )


if __name__ == "__main__":
    run_cli(main)
