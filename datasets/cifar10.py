"""Convert CIFAR-10 (the python version) to WebDataset shards on S3 or in a local folder.

    python datasets/cifar10.py --src DIR/cifar-10-batches-py --dest s3://BUCKET/datasets/cifar10

DIR/cifar-10-batches-py is cifar-10-python.tar.gz extracted: data_batch_1..5, test_batch and
batches.meta, each a pickled dict (b"data": uint8 [N, 3072] rows of red, green and blue 32x32
planes; b"labels"; b"filenames"; b"batch_label"; batches.meta holds b"label_names").
train = data_batch_1..5, val = test_batch; classes in label_names order (label = index).
Images are stored losslessly as PNG; mean and std are computed exactly over the train pixels,
and so is the mean image (`mean_image.npy`, float32 [3, 32, 32], 0-255: each pixel's mean
over the 50,000 train images, the paper's "per-pixel mean", for data.normalize=per_pixel_mean).
Rerunning with the same arguments resumes: shards already at --dest are skipped. Every flag and
--dest (scheme, store, a probe write, an earlier conversion of another --src: --replace) are
checked before the batches are read.
"""

from __future__ import annotations

import argparse
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from shardwriter import (
    MB,
    ConversionError,
    Encoded,
    Sample,
    add_shard_arguments,
    check_shard_arguments,
    prepare_dest,
    run_cli,
    write_dataset,
)

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
VAL_BATCH = "test_batch"


@dataclass(frozen=True)
class PngEncoder:
    """A 3072-byte CIFAR row -> PNG bytes (a class, not a function: it is pickled and has a
    stable repr, which is part of each shard's resume check)."""

    def __call__(self, sample: Sample) -> Encoded:
        planes = np.frombuffer(bytes(sample.source), dtype=np.uint8).reshape(3, 32, 32)
        out = io.BytesIO()
        Image.fromarray(planes.transpose(1, 2, 0)).save(out, "PNG")
        return Encoded(out.getvalue(), "png")


def _load(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR file; keys as str whether the file has Python 2 or 3 strings."""
    if not path.is_file():
        raise ConversionError(
            f"missing {path}: --src must be the extracted cifar-10-batches-py folder "
            "(from cifar-10-python.tar.gz)"
        )
    with open(path, "rb") as f:
        try:
            raw = pickle.load(f, encoding="bytes")  # the CIFAR format is a pickle: trusted input
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
            raise ConversionError(f"{path} is not a CIFAR pickle: {err}") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """(data uint8 [N, 3072], labels) of one batch file, checked."""
    batch = _load(path)
    data = np.asarray(batch.get("data"), dtype=np.uint8)
    labels = [int(v) for v in batch.get("labels", [])]
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ConversionError(
            f"{path}: expected data [N, 3072] and N labels, got data {data.shape} and "
            f"{len(labels)} labels"
        )
    if labels and not 0 <= min(labels) <= max(labels) < num_classes:
        raise ConversionError(f"{path}: labels outside 0..{num_classes - 1}")
    return data, labels


def mean_std(data: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std (0-255 scale) over every pixel of uint8 rows [N, 3072]."""
    total = np.zeros(3, dtype=np.int64)
    squares = np.zeros(3, dtype=np.int64)  # integers: exact, and 50k images cannot overflow
    for start in range(0, len(data), 4096):
        planes = data[start : start + 4096].reshape(-1, 3, 1024).astype(np.int64)
        total += planes.sum(axis=(0, 2))
        squares += (planes * planes).sum(axis=(0, 2))
    count = len(data) * 1024
    mean = total / count
    std = np.sqrt(squares / count - mean**2)
    return mean.tolist(), std.tolist()


def mean_image(data: np.ndarray) -> np.ndarray:
    """Each pixel's mean over uint8 rows [N, 3072] (0-255 scale): float64 [3, 32, 32], exact
    (summed as integers)."""
    total = np.zeros(3072, dtype=np.int64)
    for start in range(0, len(data), 4096):
        total += data[start : start + 4096].astype(np.int64).sum(axis=0)
    return (total / len(data)).reshape(3, 32, 32)


def _samples(batch: str, data: np.ndarray, labels: list[int]) -> list[Sample]:
    return [
        Sample(
            key=f"{batch}_{i:05d}",
            label=labels[i],
            source=data[i].tobytes(),
            origin=f"{batch}[{i}]",
        )
        for i in range(len(data))
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python datasets/cifar10.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--src",
        type=Path,
        required=True,
        help="the extracted cifar-10-batches-py folder (or the folder holding it)",
    )
    add_shard_arguments(p)  # --dest, --shard-size-mb, --workers, --seed
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    src: Path = args.src.expanduser().resolve()
    if (src / "cifar-10-batches-py").is_dir():
        src = src / "cifar-10-batches-py"
    # Every argument and the destination are checked before the batches are read.
    check_shard_arguments(args)
    if not src.is_dir():
        raise ConversionError(
            f"--src {src} is not a folder: give the extracted cifar-10-batches-py folder"
        )
    dest = prepare_dest(args.dest, "datasets/cifar10.py", str(src), replace=args.replace)
    names = [
        n.decode() if isinstance(n, bytes) else str(n)
        for n in _load(src / "batches.meta").get("label_names", [])
    ]
    if not names:
        raise ConversionError(f"{src / 'batches.meta'} has no label_names")
    train: list[Sample] = []
    train_rows: list[np.ndarray] = []
    for batch in TRAIN_BATCHES:
        data, labels = read_batch(src / batch, len(names))
        train += _samples(batch, data, labels)
        train_rows.append(data)
    val_data, val_labels = read_batch(src / VAL_BATCH, len(names))
    train_data = np.concatenate(train_rows)
    mean, std = mean_std(train_data)
    write_dataset(
        dest,
        {"train": train, "val": _samples(VAL_BATCH, val_data, val_labels)},
        PngEncoder(),
        classes=names,
        source={
            "script": "datasets/cifar10.py",
            "src": str(src),
            "shard_size_mb": args.shard_size_mb,
            "seed": args.seed,
        },
        mean=mean,
        std=std,
        mean_std_source="computed on train",
        shard_bytes=int(args.shard_size_mb * MB),
        seed=args.seed,
        workers=args.workers,
        max_bad_fraction=0.0,  # decoded arrays cannot be corrupt files
        mean_image=mean_image(train_data),
        mean_image_info={
            "of": "every train image, exact (the paper's per-pixel mean)",
            "samples": len(train_data),
            "split_samples": len(train_data),
        },
    )


if __name__ == "__main__":
    run_cli(main)
