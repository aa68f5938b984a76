"""Generate small, learnable stand-ins for ImageNet and CIFAR-10, in the real layouts.

    python datasets/synthetic.py imagenet --out DIR [--classes 10] [--train-per-class 60]
                                         [--val-per-class 10] [--size 500x375] [--quality 90]
    python datasets/synthetic.py cifar10  --out DIR [--train-per-class 500] [--test-per-class 100]

imagenet writes the ILSVRC2012 layout that datasets/imagenet.py reads:
    DIR/train/<wnid>/<wnid>_<i>.JPEG      wnids n00000000, n00000001, ... (sorted = class index)
    DIR/val/ILSVRC2012_val_<8 digits>.JPEG
    DIR/LOC_val_solution.csv              Kaggle style: ImageId,PredictionString
                                          ("wnid x0 y0 x1 y1")
    DIR/LOC_synset_mapping.txt            "wnid name" per line, sorted
cifar10 writes DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} in the
python-pickle format of the real download (see datasets/cifar10.py).

Each class has its own signature: a hue, a stripe texture (angle and frequency), a shape kind,
drawn at a random position and scale with noise on top, so a random crop still carries it and a
small CNN learns it in one short epoch. Output is identical for the same arguments and --seed.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import math
import multiprocessing
import os
import pickle
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from shardwriter import ConversionError, progress, run_cli

CIFAR_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}  # part of each image's seed


def wnid(label: int) -> str:
    """Synthetic WordNet-style id; sorting them gives the class order."""
    return f"n{label:08d}"


def paint(
    rng: np.random.Generator, label: int, num_classes: int, width: int, height: int
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One image of class `label`, and the bounding box of its main shape."""
    hue = label / num_classes
    # Golden-ratio steps spread angle and frequency, so neighbouring hues differ in texture too.
    angle = math.pi * ((label * 0.381966) % 1.0)
    cycles = 3 + 9 * ((label * 0.618034) % 1.0)  # stripes per shorter side, before zoom
    zoom = rng.uniform(0.6, 1.6)  # random scale: crops of any size still show the texture
    freq = 2 * math.pi * cycles / (min(width, height) * zoom)
    xs = np.arange(width, dtype=np.float32) * np.float32(math.cos(angle) * freq)
    ys = np.arange(height, dtype=np.float32) * np.float32(math.sin(angle) * freq)
    stripes = np.sin(ys[:, None] + xs[None, :] + np.float32(rng.uniform(0, 6.3)))

    def colour(h: float) -> np.ndarray:
        s, v = rng.uniform(0.45, 0.85), rng.uniform(0.5, 0.9)
        return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255

    bg = colour(hue + rng.normal(0, 0.01))
    base = (stripes[..., None] * np.float32(0.3) + np.float32(1)) * bg
    img = Image.fromarray(np.clip(base, 0, 255, out=base).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    box = (0, 0, width, height)
    for i in range(int(rng.integers(1, 4))):
        r = rng.uniform(0.12, 0.35) * min(width, height)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        x0, y0, x1, y1 = (int(v) for v in (cx - r, cy - r, cx + r, cy + r))
        fill = tuple(int(c) for c in colour(hue + 0.5 + rng.normal(0, 0.02)))
        kind = label % 3
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        if i == 0:
            box = (max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1))
    noisy = rng.standard_normal((height, width, 3), dtype=np.float32)
    noisy *= 8
    noisy += np.asarray(img, dtype=np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)), box


def _image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    # Seeded per image, so the result does not depend on which worker draws it.
    return np.random.default_rng([seed, SPLIT_CODES[split], label, index])


# ---------------------------------------------------------------- ImageNet


def _imagenet_job(job: tuple[Any, ...]) -> tuple[int, int, int, int]:
    path, split, label, index, a = job
    rng = _image_rng(a.seed, split, label, index)
    w0, h0 = a.size
    jitter = a.size_jitter
    w = max(8, round(w0 * rng.uniform(1 - jitter, 1 + jitter)))
    h = max(8, round(h0 * rng.uniform(1 - jitter, 1 + jitter)))
    if rng.random() < 0.2 * (jitter > 0):  # some portrait images, like the real set
        w, h = h, w
    img, box = paint(rng, label, a.classes, w, h)
    img.save(path, "JPEG", quality=a.quality)
    return box


def generate_imagenet(a: argparse.Namespace) -> None:
    """Write the ILSVRC2012-style folder described in the module docstring."""
    out: Path = a.out
    jobs: list[tuple[Any, ...]] = []
    for label in range(a.classes):
        folder = out / "train" / wnid(label)
        folder.mkdir(parents=True)
        for i in range(1, a.train_per_class + 1):
            jobs.append((folder / f"{wnid(label)}_{i}.JPEG", "train", label, i, a))
    (out / "val").mkdir(parents=True)
    # Val classes interleaved in a seeded order, like the real val set.
    val_labels = np.random.default_rng([a.seed, 99]).permutation(
        np.repeat(np.arange(a.classes), a.val_per_class)
    )
    val_ids = [f"ILSVRC2012_val_{k:08d}" for k in range(1, len(val_labels) + 1)]
    for k, label in enumerate(val_labels):
        jobs.append((out / "val" / f"{val_ids[k]}.JPEG", "val", int(label), k, a))
    boxes = _run(jobs, _imagenet_job, a.workers)
    with open(out / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for k, label in enumerate(val_labels):
            box = boxes[len(jobs) - len(val_labels) + k]
            writer.writerow([val_ids[k], " ".join([wnid(int(label)), *map(str, box)])])
    (out / "LOC_synset_mapping.txt").write_text(
        "".join(f"{wnid(c)} synthetic class {c}\n" for c in range(a.classes))
    )


# ---------------------------------------------------------------- CIFAR-10


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 `str`, as the real CIFAR files do.

    So a loader passing encoding="latin1" (torchvision) gets str keys like "data", and one
    passing encoding="bytes" gets b"data", exactly as with the real download.
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _dump_py2(obj: dict[bytes, Any], path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _cifar_job(job: tuple[int, str, int, int]) -> bytes:
    seed, split, label, index = job
    img, _ = paint(_image_rng(seed, split, label, index), label, 10, 32, 32)
    # CIFAR rows are channel planes: 1024 red, then 1024 green, then 1024 blue values.
    return np.asarray(img).transpose(2, 0, 1).tobytes()


def generate_cifar10(a: argparse.Namespace) -> None:
    """Write cifar-10-batches-py/ in the format of the real python download."""
    out: Path = a.out / "cifar-10-batches-py"
    out.mkdir(parents=True)
    for split, per_class, batches in (
        ("train", a.train_per_class, 5),
        ("test", a.test_per_class, 1),
    ):
        labels = np.random.default_rng([a.seed, SPLIT_CODES[split]]).permutation(
            np.repeat(np.arange(10), per_class)
        )
        rows = _run(
            [(a.seed, split, int(c), i) for i, c in enumerate(labels)], _cifar_job, a.workers
        )
        data = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), 3072)
        for b, part in enumerate(np.array_split(np.arange(len(rows)), batches), start=1):
            name = f"data_batch_{b}" if split == "train" else "test_batch"
            title = f"training batch {b} of 5" if split == "train" else "testing batch 1 of 1"
            _dump_py2(
                {
                    b"batch_label": title.encode(),
                    b"labels": [int(labels[i]) for i in part],
                    b"data": data[part],
                    b"filenames": [
                        f"synthetic_{CIFAR_NAMES[labels[i]]}_{i:06d}.png".encode() for i in part
                    ],
                },
                out / name,
            )
    meta = {
        b"num_cases_per_batch": 2 * a.train_per_class,
        b"num_vis": 3072,
        b"label_names": [n.encode() for n in CIFAR_NAMES],
    }
    _dump_py2(meta, out / "batches.meta")


# ---------------------------------------------------------------- CLI


def _run(jobs: list[Any], fn: Any, workers: int) -> list[Any]:
    """fn over jobs on all cores, in order, with a progress bar."""
    bar = progress(len(jobs), "generating")
    results = []
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            for r in pool.imap(fn, jobs, chunksize=8):
                results.append(r)
                bar.update()
    else:
        for job in jobs:
            results.append(fn(job))
            bar.update()
    bar.close()
    return results


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python datasets/synthetic.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="kind", required=True)
    im = sub.add_parser("imagenet", help="ILSVRC2012-style folder of JPEGs")
    im.add_argument("--classes", type=int, default=10)
    im.add_argument("--train-per-class", type=int, default=60)
    im.add_argument("--val-per-class", type=int, default=10)
    im.add_argument(
        "--size",
        type=_size,
        default=(500, 375),
        help="typical WIDTHxHEIGHT (default 500x375); see --size-jitter",
    )
    im.add_argument(
        "--size-jitter",
        type=float,
        default=0.2,
        help="each side varies by up to this fraction, and a fifth of the images are "
        "portrait (default 0.2; 0 = every image exactly --size)",
    )
    im.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    cf = sub.add_parser("cifar10", help="cifar-10-batches-py pickles, 10 classes of 32x32")
    cf.add_argument("--train-per-class", type=int, default=500)
    cf.add_argument("--test-per-class", type=int, default=100)
    for s in (im, cf):
        s.add_argument("--out", type=Path, required=True, help="output folder")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def check_arguments(a: argparse.Namespace) -> None:
    """Refuse a bad flag at once, naming it and the fix (before any image is drawn)."""
    if "://" in str(a.out) or str(a.out).startswith(("s3:/", "gs:/")):
        raise ConversionError(
            f"--out {a.out}: a local folder only (the generators write files; convert them to "
            "s3:// with datasets/imagenet.py or datasets/cifar10.py)"
        )
    if a.workers < 1:
        raise ConversionError(f"--workers {a.workers}: give a number of processes >= 1")
    if a.kind == "imagenet":
        if a.classes < 1 or a.train_per_class < 1 or a.val_per_class < 0:
            raise ConversionError(
                "--classes and --train-per-class must be >= 1, --val-per-class >= 0"
            )
        if min(a.size) < 8:
            raise ConversionError(f"--size {a.size[0]}x{a.size[1]}: give sides of >= 8 pixels")
        if not 0 <= a.size_jitter < 1:
            raise ConversionError(f"--size-jitter {a.size_jitter}: give a fraction in [0, 1)")
        if not 1 <= a.quality <= 100:
            raise ConversionError(f"--quality {a.quality}: give a JPEG quality in 1..100")
    elif a.train_per_class < 1 or a.test_per_class < 1:
        raise ConversionError("--train-per-class and --test-per-class must be >= 1")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    check_arguments(a)
    made = ["train", "val"] if a.kind == "imagenet" else ["cifar-10-batches-py"]
    existing = [str(a.out / m) for m in made if (a.out / m).exists()]
    if existing:
        # Refuse rather than mix with an earlier run (say, one with more classes).
        raise ConversionError(
            f"{', '.join(existing)} already exists; remove it or pick another --out"
        )
    if a.kind == "imagenet":
        generate_imagenet(a)
    else:
        generate_cifar10(a)
    print(f"wrote {a.kind} to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
