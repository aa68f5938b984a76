"""datasets/: the synthetic generators and the ImageNet / CIFAR-10 shard converters.

The scripts run as real subprocesses (`python datasets/X.py`, as a user runs them), on small
generated data, to a local folder and to the real S3 of the test stack.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

TARGET_MB = 0.1  # tiny shards, so a small dataset still spans several
SHARDS = ("--shard-size-mb", TARGET_MB)
CLASSES = 4
GEN = ("--classes", CLASSES, "--train-per-class", 30, "--val-per-class", 8, "--size", "96x72")


def run(script: str, *args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python datasets/<script> args...` from the repo root, as a user runs it."""
    return subprocess.run(
        [sys.executable, f"datasets/{script}", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )


def ok(script: str, *args: Any, **kw: Any) -> subprocess.CompletedProcess:
    out = run(script, *args, **kw)
    assert out.returncode == 0, out.stderr
    return out


def load_shardwriter() -> ModuleType:
    """datasets/shardwriter.py by file path (datasets/ is not a package, by design; its
    siblings, which it imports by name, on the path as a script has them)."""
    if str(ROOT / "datasets") not in sys.path:
        sys.path.insert(0, str(ROOT / "datasets"))
    spec = importlib.util.spec_from_file_location(
        "ds_shardwriter", ROOT / "datasets/shardwriter.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_shard(data: bytes) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a WebDataset tar, checking its fixed metadata on the way."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.mode) == (0, 0, 0, 0o444), m.name
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return samples


def expected_imagenet(src: Path) -> dict[str, dict[str, tuple[int, Path]]]:
    """{split: {key: (label, file)}} worked out from the source tree, independently of the code."""
    wnids = sorted(p.name for p in (src / "train").iterdir())
    train = {p.stem: (wnids.index(p.parent.name), p) for p in (src / "train").glob("*/*.JPEG")}
    rows = list(csv.reader((src / "LOC_val_solution.csv").read_text().splitlines()))[1:]
    val = {r[0]: (wnids.index(r[1].split()[0]), src / "val" / f"{r[0]}.JPEG") for r in rows}
    return {"train": train, "val": val}


def check_dataset(
    manifest: dict,
    read: Any,
    expected: dict[str, dict[str, tuple[int, Path]]],
    *,
    original_bytes: bool = True,
) -> dict[str, dict[str, bytes]]:
    """Each shard matches its manifest entry; each expected sample is there once, labelled right."""
    seen: dict[str, dict[str, bytes]] = {}
    for split, info in manifest["splits"].items():
        keys: list[str] = []
        for shard in info["shards"]:
            data = read(shard["name"])
            assert len(data) == shard["bytes"] and sha256(data) == shard["sha256"], shard["name"]
            samples = read_shard(data)
            assert len(samples) == shard["samples"]
            for key, parts in samples.items():
                label, path = expected[split][key]
                assert int(parts["cls"]) == label, key
                if original_bytes:
                    assert parts["jpg"] == path.read_bytes(), key
                seen[key] = parts
            keys += samples
        assert sorted(keys) == sorted(expected[split]), f"{split}: samples missing or repeated"
        assert info["samples"] == len(expected[split])
    return seen


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def imagenet_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "imagenet"
    ok("synthetic.py", "imagenet", "--out", out, *GEN, "--seed", 3)
    return out


@pytest.fixture(scope="module")
def local_shards(imagenet_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("shards") / "imagenet"
    ok("imagenet.py", "--src", imagenet_src, "--dest", dest, *SHARDS)
    return dest


def copy_src(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "src"))


# ---------------------------------------------------------------- synthetic.py


def test_synthetic_imagenet_layout_determinism_and_signal(
    imagenet_src: Path, tmp_path: Path
) -> None:
    wnids = sorted(p.name for p in (imagenet_src / "train").iterdir())
    assert wnids == [f"n{c:08d}" for c in range(CLASSES)]
    for w in wnids:
        names = sorted(p.name for p in (imagenet_src / "train" / w).iterdir())
        assert names == sorted(f"{w}_{i}.JPEG" for i in range(1, 31))
    val = sorted(p.name for p in (imagenet_src / "val").iterdir())
    assert val == [f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, CLASSES * 8 + 1)]
    rows = list(csv.reader((imagenet_src / "LOC_val_solution.csv").read_text().splitlines()))
    assert rows[0] == ["ImageId", "PredictionString"]
    assert sorted(r[0] for r in rows[1:]) == [v.removesuffix(".JPEG") for v in val]
    assert sorted(r[1].split()[0] for r in rows[1:]) == sorted(wnids * 8)
    with Image.open(imagenet_src / "train" / wnids[0] / f"{wnids[0]}_1.JPEG") as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        assert 50 <= min(im.size) and max(im.size) <= 120  # 96x72 +- 20%, maybe portrait

    # Same seed: the same bytes. Another seed: other images.
    again = tmp_path / "again"
    ok("synthetic.py", "imagenet", "--out", again, *GEN, "--seed", 3, "--workers", 1)
    assert tree_digest(again) == tree_digest(imagenet_src)
    other = tmp_path / "other"
    ok("synthetic.py", "imagenet", "--out", other, *GEN, "--train-per-class", 1, "--seed", 4)
    f = f"train/{wnids[0]}/{wnids[0]}_1.JPEG"
    assert (other / f).read_bytes() != (imagenet_src / f).read_bytes()
    # an existing output is refused, not mixed into
    refused = run("synthetic.py", "imagenet", "--out", other, "--classes", 2)
    assert refused.returncode == 2 and "already exists" in refused.stderr

    # Class signal, cheaply: a val image's mean colour is nearest its own class's mean colour.
    def colour(p: Path) -> np.ndarray:
        return np.asarray(Image.open(p).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)

    centres = np.stack(
        [np.mean([colour(p) for p in (imagenet_src / "train" / w).iterdir()], 0) for w in wnids]
    )

    def nearest(p: Path) -> str:
        return wnids[int(np.argmin(((centres - colour(p)) ** 2).sum(1)))]

    hits = [nearest(imagenet_src / "val" / f"{r[0]}.JPEG") == r[1].split()[0] for r in rows[1:]]
    assert np.mean(hits) >= 0.6  # chance is 0.25


def make_cifar(out: Path, seed: int = 0, workers: int = 2) -> Path:
    args = ("--train-per-class", 20, "--test-per-class", 5, "--seed", seed, "--workers", workers)
    ok("synthetic.py", "cifar10", "--out", out, *args)
    return out / "cifar-10-batches-py"


@pytest.fixture(scope="module")
def cifar_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("cifar"))


def test_synthetic_cifar10_format_determinism_and_signal(cifar_src: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in cifar_src.iterdir())
    assert names == ["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]
    meta = pickle.loads((cifar_src / "batches.meta").read_bytes(), encoding="bytes")
    assert (
        meta[b"label_names"][:2] == [b"airplane", b"automobile"] and len(meta[b"label_names"]) == 10
    )
    data, labels = [], []
    for i in range(1, 6):
        raw = (cifar_src / f"data_batch_{i}").read_bytes()
        b = pickle.loads(raw, encoding="bytes")
        assert set(b) == {b"data", b"labels", b"filenames", b"batch_label"}
        assert b[b"data"].dtype == np.uint8 and b[b"data"].shape == (40, 3072)
        assert len(b[b"labels"]) == len(b[b"filenames"]) == 40
        # Like the real files: str keys for loaders that pass encoding="latin1" (torchvision)
        b2 = pickle.loads(raw, encoding="latin1")
        assert set(b2) == {"data", "labels", "filenames", "batch_label"}
        assert np.array_equal(b2["data"], b[b"data"])
        data.append(b[b"data"])
        labels += b[b"labels"]
    test = pickle.loads((cifar_src / "test_batch").read_bytes(), encoding="bytes")
    assert test[b"data"].shape == (50, 3072)
    assert np.bincount(labels).tolist() == [20] * 10
    assert np.bincount(test[b"labels"]).tolist() == [5] * 10

    assert tree_digest(make_cifar(tmp_path / "again", workers=1)) == tree_digest(cifar_src)
    assert tree_digest(make_cifar(tmp_path / "other", seed=1)) != tree_digest(cifar_src)

    # Class signal: nearest mean colour beats chance (0.1) by far.
    x = np.concatenate(data).reshape(-1, 3, 1024).mean(2)
    y = np.array(labels)
    centres = np.stack([x[y == c].mean(0) for c in range(10)])
    tx = test[b"data"].reshape(-1, 3, 1024).mean(2)
    pred = ((tx[:, None, :] - centres[None]) ** 2).sum(2).argmin(1)
    assert (pred == np.array(test[b"labels"])).mean() >= 0.5


# ---------------------------------------------------------------- imagenet.py, local dest


def test_imagenet_local_manifest_and_shards(imagenet_src: Path, local_shards: Path) -> None:
    manifest = json.loads((local_shards / "manifest.json").read_text())
    assert manifest["format"] == "webdataset" and manifest["version"] == 1
    assert manifest["name"] == "imagenet" and manifest["created"]
    assert manifest["classes"] == [f"n{c:08d}" for c in range(CLASSES)]
    assert manifest["num_classes"] == CLASSES
    assert manifest["source"]["src"] == str(imagenet_src)
    assert manifest["skipped"] == [] and manifest["converted"] == []
    assert manifest["mean"] == [123.675, 116.28, 103.53] and len(manifest["std"]) == 3
    assert manifest["splits"]["train"]["samples"] == CLASSES * 30
    assert manifest["splits"]["val"]["samples"] == CLASSES * 8

    expected = expected_imagenet(imagenet_src)
    check_dataset(manifest, lambda name: (local_shards / name).read_bytes(), expected)

    # Shard size: several shards, none over the target, all but the last well filled.
    target = TARGET_MB * 1_000_000
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert [s["name"] for s in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        assert all(s["bytes"] <= target for s in shards)
        assert all(s["bytes"] >= 0.7 * target for s in shards[:-1])
    assert len(manifest["splits"]["train"]["shards"]) >= 4
    check_imagenet_mean_image(imagenet_src, local_shards, manifest, size=224, resize=256)
    # Shuffled across classes: the first shard mixes them.
    first = read_shard((local_shards / "train-000000.tar").read_bytes())
    assert len({int(p["cls"]) for p in first.values()}) == CLASSES

    # And the webdataset library reads it as samples with a decodable jpg and a class.
    import webdataset as wds

    ds = wds.WebDataset(str(local_shards / "val-000000.tar"), shardshuffle=False)
    sample = next(iter(ds.decode("pil").to_tuple("jpg", "cls")))
    assert sample[0].mode == "RGB" and 0 <= sample[1] < CLASSES


def check_imagenet_mean_image(
    src: Path, dest: Path, manifest: dict, size: int, resize: int, samples: int = 0
) -> None:
    """The stored mean image is numpy's mean over the centre views (shorter side `resize`,
    central `size`) of the train images (all of them, or `samples` of them) as the centre
    protocol decodes them (orchestrator.data.transforms)."""
    from orchestrator.data.transforms import center_view

    entry = manifest["mean_image"]
    raw = (dest / entry["file"]).read_bytes()
    assert entry["sha256"] == sha256(raw) and entry["shape"] == [3, size, size]
    image = np.load(io.BytesIO(raw))
    assert image.dtype == np.float32 and image.shape == (3, size, size)
    files = sorted((src / "train").glob("*/*.JPEG"))
    assert entry["split_samples"] == len(files)
    if samples:  # a seeded sample: its count, and a mean that is not the whole split's
        assert entry["samples"] == samples and "seed" in entry["sampled"]
        return
    assert entry["samples"] == len(files) and entry["sampled"] == "every train image"
    views = np.stack([center_view(f.read_bytes(), size=size, resize=resize) for f in files])
    want = views.astype(np.float64).mean(axis=0)
    # Pillow's bilinear resize and the loader's agree to a level or so per pixel
    assert np.abs(image - want).max() <= 1.0 and np.abs(image - want).mean() < 0.3


def test_imagenet_deterministic_and_resumable(
    imagenet_src: Path, local_shards: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "again"
    ok("imagenet.py", "--src", imagenet_src, "--dest", dest, *SHARDS, "--workers", 1)
    first = json.loads((local_shards / "manifest.json").read_text())
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["splits"] == first["splits"]  # same names, sizes, sha256: byte-identical
    assert manifest["mean_image"] == first["mean_image"]  # 1 worker or many: the same image
    reseeded = tmp_path / "reseeded"
    ok("imagenet.py", "--src", imagenet_src, "--dest", reseeded, *SHARDS, "--seed", 1)
    other = json.loads((reseeded / "manifest.json").read_text())
    assert (
        other["splits"]["train"]["shards"][0]["sha256"]
        != first["splits"]["train"]["shards"][0]["sha256"]
    )

    # A second run skips every shard and rewrites only the manifest.
    shards = sorted(dest.glob("*.tar"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    time.sleep(0.01)
    out = ok("imagenet.py", "--src", imagenet_src, "--dest", dest, *SHARDS)
    assert f"{len(shards)} already there and skipped" in out.stderr
    assert "(0 shards written" in out.stderr
    assert {p.name: p.stat().st_mtime_ns for p in shards} == mtimes

    # A deleted shard and a corrupted one (same size, one byte changed) are rebuilt.
    (dest / "train-000001.tar").unlink()
    corrupt = bytearray((dest / "val-000000.tar").read_bytes())
    corrupt[2000] ^= 0xFF
    (dest / "val-000000.tar").write_bytes(bytes(corrupt))
    out = ok("imagenet.py", "--src", imagenet_src, "--dest", dest, *SHARDS)
    assert "(2 shards written" in out.stderr
    changed = {p.name for p in shards if p.stat().st_mtime_ns != mtimes[p.name]}
    assert changed == {"train-000001.tar", "val-000000.tar"}
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["splits"] == first["splits"]
    for s in manifest["splits"]["val"]["shards"] + manifest["splits"]["train"]["shards"]:
        assert sha256((dest / s["name"]).read_bytes()) == s["sha256"]

    # A bigger shard size leaves fewer shards: the stale ones are cleaned up after the manifest.
    ok("imagenet.py", "--src", imagenet_src, "--dest", dest, "--shard-size-mb", 10)
    assert sorted(p.name for p in dest.iterdir()) == [
        "manifest.json",
        "mean_image.npy",
        "train-000000.tar",
        "train-000000.tar.json",
        "val-000000.tar",
        "val-000000.tar.json",
    ]


def test_imagenet_val_label_sources_agree(
    imagenet_src: Path, local_shards: Path, tmp_path: Path
) -> None:
    # Devkit ids number classes in an order of their own, not sorted by wnid: use a reversed one.
    wnids = sorted(p.name for p in (imagenet_src / "train").iterdir())
    synsets = list(reversed(wnids))
    (tmp_path / "synsets.txt").write_text("".join(f"{w}\n" for w in synsets))
    rows = sorted(csv.reader((imagenet_src / "LOC_val_solution.csv").read_text().splitlines()[1:]))
    truth = "".join(f"{synsets.index(r[1].split()[0]) + 1}\n" for r in rows)
    (tmp_path / "ground_truth.txt").write_text(truth)
    dest = tmp_path / "devkit"
    devkit = ("--val-labels", tmp_path / "ground_truth.txt")
    ok(
        "imagenet.py",
        "--src",
        imagenet_src,
        "--dest",
        dest,
        *SHARDS,
        *devkit,
        "--devkit-synsets",
        tmp_path / "synsets.txt",
    )
    manifest = json.loads((dest / "manifest.json").read_text())
    first = json.loads((local_shards / "manifest.json").read_text())
    assert manifest["splits"]["val"] == first["splits"]["val"]  # same labels: identical shards

    # val/<wnid>/*.JPEG (as valprep.sh leaves it) needs no label file, and agrees too.
    src = copy_src(imagenet_src, tmp_path)
    (src / "LOC_val_solution.csv").unlink()
    for r in rows:
        (src / "val" / r[1].split()[0]).mkdir(exist_ok=True)
        (src / "val" / f"{r[0]}.JPEG").rename(src / "val" / r[1].split()[0] / f"{r[0]}.JPEG")
    ok("imagenet.py", "--src", src, "--dest", tmp_path / "sorted", *SHARDS)
    manifest = json.loads((tmp_path / "sorted" / "manifest.json").read_text())
    assert manifest["splits"]["val"] == first["splits"]["val"]

    no_synsets = run("imagenet.py", "--src", imagenet_src, "--dest", tmp_path / "x", *devkit)
    assert no_synsets.returncode == 2 and "--devkit-synsets" in no_synsets.stderr


def test_imagenet_resize_shorter(imagenet_src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "small"
    mean = ["--mean-samples", 10, "--mean-min-samples", 10, "--mean-resize", 40, "--mean-size", 32]
    ok("imagenet.py", "--src", imagenet_src, "--dest", dest, "--resize-shorter", 40, *SHARDS, *mean)
    manifest = json.loads((dest / "manifest.json").read_text())
    check_imagenet_mean_image(imagenet_src, dest, manifest, size=32, resize=40, samples=10)
    seen = check_dataset(
        manifest,
        lambda n: (dest / n).read_bytes(),
        expected_imagenet(imagenet_src),
        original_bytes=False,
    )
    for parts in seen.values():
        with Image.open(io.BytesIO(parts["jpg"])) as im:
            assert im.format == "JPEG" and min(im.size) == 40


def test_imagenet_bad_files_skipped_or_fatal(imagenet_src: Path, tmp_path: Path) -> None:
    src = copy_src(imagenet_src, tmp_path)
    truncated = src / "train/n00000001/n00000001_3.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:600])
    garbage = src / "val/ILSVRC2012_val_00000005.JPEG"
    garbage.write_bytes(b"not a jpeg at all" * 50)
    # Odd but valid files are converted to plain RGB JPEGs, as ImageNet's few CMYK JPEGs and
    # its one PNG-named-.JPEG need.
    cmyk = src / "train/n00000002/n00000002_4.JPEG"
    Image.open(cmyk).convert("CMYK").save(cmyk, "JPEG")
    png = src / "train/n00000000/n00000000_5.JPEG"
    Image.open(png).save(png, "PNG")

    dest = tmp_path / "tolerant"
    ok("imagenet.py", "--src", src, "--dest", dest, *SHARDS, "--max-bad-fraction", 0.02)
    manifest = json.loads((dest / "manifest.json").read_text())
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"train/n00000001/n00000001_3.JPEG", "val/ILSVRC2012_val_00000005.JPEG"}
    assert all(skipped.values())
    assert {c["path"] for c in manifest["converted"]} == {
        "train/n00000002/n00000002_4.JPEG",
        "train/n00000000/n00000000_5.JPEG",
    }
    expected = expected_imagenet(src)
    del expected["train"]["n00000001_3"], expected["val"]["ILSVRC2012_val_00000005"]
    seen = check_dataset(
        manifest, lambda n: (dest / n).read_bytes(), expected, original_bytes=False
    )
    for key in ("n00000002_4", "n00000000_5"):
        with Image.open(io.BytesIO(seen[key]["jpg"])) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
    assert seen["n00000001_4"]["jpg"] == (src / "train/n00000001/n00000001_4.JPEG").read_bytes()

    # 2 bad of 152 is more than the default 0.001: fatal, naming them, and no manifest.
    dest = tmp_path / "strict"
    out = run("imagenet.py", "--src", src, "--dest", dest, *SHARDS)
    assert out.returncode == 2
    assert "--max-bad-fraction" in out.stderr and "among 152 images" in out.stderr
    assert "n00000001_3.JPEG" in out.stderr or "ILSVRC2012_val_00000005.JPEG" in out.stderr
    assert not (dest / "manifest.json").exists()
    assert not [p for p in dest.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no train", "no train folder"),
        ("empty class", "has no images"),
        ("missing class folder", "no train class folder: n00000003"),
        ("label for a missing file", "missing from"),
        ("file without a label", "have no label"),
        ("no label file", "no labels for the flat"),
    ],
)
def test_imagenet_input_errors_write_nothing(
    imagenet_src: Path, tmp_path: Path, case: str, message: str
) -> None:
    src = copy_src(imagenet_src, tmp_path)
    if case == "no train":
        shutil.rmtree(src / "train")
    elif case == "empty class":
        for p in (src / "train/n00000002").iterdir():
            p.unlink()
    elif case == "missing class folder":
        shutil.rmtree(src / "train/n00000003")
    elif case == "label for a missing file":
        (src / "val/ILSVRC2012_val_00000007.JPEG").unlink()
    elif case == "file without a label":
        shutil.copy(
            src / "val/ILSVRC2012_val_00000007.JPEG", src / "val/ILSVRC2012_val_00009999.JPEG"
        )
    elif case == "no label file":
        (src / "LOC_val_solution.csv").unlink()
    dest = tmp_path / "dest" / "imagenet"
    out = run("imagenet.py", "--src", src, "--dest", dest)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "dest").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_imagenet_unreachable_endpoint_or_no_credentials(imagenet_src: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {
        **base,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_REGION": "us-east-1",
    }
    started = time.monotonic()
    out = run("imagenet.py", "--src", imagenet_src, "--dest", "s3://resnet/datasets/x", env=env)
    assert out.returncode == 2 and "cannot reach the S3 endpoint" in out.stderr
    assert endpoint in out.stderr and time.monotonic() - started < 30

    env = {
        **base,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
    }
    out = run("imagenet.py", "--src", imagenet_src, "--dest", "s3://resnet/datasets/x", env=env)
    assert out.returncode == 2 and "no S3 credentials" in out.stderr


# ---------------------------------------------------------------- imagenet.py, real S3


@pytest.fixture
def s3_dest(s3_prefix: str) -> Iterator[str]:
    """A fresh s3:// prefix for one test; its objects are deleted afterwards."""
    from orchestrator.storage import open_storage

    yield f"{s3_prefix}/imagenet"
    open_storage(s3_prefix).delete_prefix("imagenet")


def test_imagenet_to_s3_matches_local_and_resumes(
    s3_dest: str, imagenet_src: Path, local_shards: Path
) -> None:
    from orchestrator.storage import open_storage

    store = open_storage(s3_dest)
    ok("imagenet.py", "--src", imagenet_src, "--dest", s3_dest, *SHARDS)
    manifest = json.loads(store.get("manifest.json"))
    check_dataset(manifest, store.get, expected_imagenet(imagenet_src))
    local = json.loads((local_shards / "manifest.json").read_text())
    assert manifest["splits"] == local["splits"]  # the same bytes on S3 as on disk

    def etags() -> dict[str, Any]:
        return {
            s["name"]: store.head(s["name"])
            for split in manifest["splits"].values()
            for s in split["shards"]
        }

    before = etags()
    out = ok("imagenet.py", "--src", imagenet_src, "--dest", s3_dest, *SHARDS)
    assert (
        f"{len(before)} already there and skipped" in out.stderr
        and "(0 shards written" in out.stderr
    )

    # Overwrite one shard with other bytes of the same size, delete another: both rebuilt.
    store.put("val-000000.tar", b"x" * manifest["splits"]["val"]["shards"][0]["bytes"])
    store.delete("train-000002.tar")
    out = ok("imagenet.py", "--src", imagenet_src, "--dest", s3_dest, *SHARDS)
    assert "(2 shards written" in out.stderr
    again = json.loads(store.get("manifest.json"))
    assert again["splits"] == manifest["splits"]
    check_dataset(again, store.get, expected_imagenet(imagenet_src))
    assert etags() == before  # rebuilt byte for byte: single-part ETags (MD5s) match again


def test_s3_refusals_write_nothing(s3_dest: str, imagenet_src: Path) -> None:
    from orchestrator.storage import open_storage

    out = run("imagenet.py", "--src", imagenet_src, "--dest", "s3://no-such-bucket-here/x")
    assert out.returncode == 2 and "does not exist" in out.stderr
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong"}
    out = run("imagenet.py", "--src", imagenet_src, "--dest", s3_dest, env=env)
    assert out.returncode == 2 and "refused" in out.stderr
    assert open_storage(s3_dest).sizes() == {}


# ---------------------------------------------------------------- cifar10.py


def test_cifar10_converter_counts_labels_and_exact_pixels(cifar_src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "cifar10"
    ok("cifar10.py", "--src", cifar_src.parent, "--dest", dest, "--shard-size-mb", 0.2)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["classes"][:3] == ["airplane", "automobile", "bird"]
    assert manifest["num_classes"] == 10
    assert manifest["splits"]["train"]["samples"] == 200
    assert manifest["splits"]["val"]["samples"] == 50
    assert len(manifest["splits"]["train"]["shards"]) >= 2

    rows: dict[str, tuple[bytes, int]] = {}
    train_rows = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        b = pickle.loads((cifar_src / name).read_bytes(), encoding="bytes")
        for i, (row, label) in enumerate(zip(b[b"data"], b[b"labels"])):
            rows[f"{name}_{i:05d}"] = (row.tobytes(), label)
        if name != "test_batch":
            train_rows.append(b[b"data"])
    found = 0
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            data = (dest / shard["name"]).read_bytes()
            assert sha256(data) == shard["sha256"]
            for key, parts in read_shard(data).items():
                assert key.startswith("test_batch") == (split == "val")
                row, label = rows[key]
                with Image.open(io.BytesIO(parts["png"])) as im:
                    assert im.format == "PNG"
                    assert np.asarray(im).transpose(2, 0, 1).tobytes() == row  # lossless
                assert int(parts["cls"]) == label
                found += 1
    assert found == len(rows) == 250

    planes = np.concatenate(train_rows).reshape(-1, 3, 1024).astype(np.float64)
    assert np.allclose(manifest["mean"], planes.mean(axis=(0, 2)), atol=1e-9)
    assert np.allclose(manifest["std"], planes.std(axis=(0, 2)), atol=1e-9)
    # the per-pixel mean: each pixel's mean over the 200 train images, float32 [3, 32, 32]
    entry = manifest["mean_image"]
    raw = (dest / entry["file"]).read_bytes()
    assert entry["sha256"] == sha256(raw) and entry["shape"] == [3, 32, 32]
    assert entry["samples"] == entry["split_samples"] == 200
    image = np.load(io.BytesIO(raw))
    assert image.dtype == np.float32
    want = planes.reshape(-1, 3, 32, 32).mean(axis=0)
    np.testing.assert_allclose(image, want, rtol=0, atol=1e-4)  # float32 rounding only
    assert np.ptp(want) > 1  # pixels differ: a per-channel mean would not pass

    missing = tmp_path / "broken"
    shutil.copytree(cifar_src, missing)
    (missing / "data_batch_3").unlink()
    out = run("cifar10.py", "--src", missing, "--dest", tmp_path / "never")
    assert out.returncode == 2 and "data_batch_3" in out.stderr
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- shardwriter unit tests, --help


def test_plan_shards_respects_target() -> None:
    sw = load_shardwriter()
    sizes = [3000, 9000, 500, 70000, 200000, 100, 100]
    shards = sw.plan_shards(sizes, 100_000)
    assert [i for r in shards for i in r] == list(range(len(sizes)))  # in order, each once
    for r in shards:
        cost = sum(sw._tar_cost(sizes[i]) for i in r) + 1024
        assert -(-cost // 10240) * 10240 <= 100_000 or len(r) == 1  # only a lone big sample over
    assert [list(r) for r in shards if 4 in r] == [[4]]


def test_check_keys_rejects_dots_and_duplicates() -> None:
    sw = load_shardwriter()
    good = sw.Sample("a_1", 0, b"", "a")
    sw.check_keys({"train": [good]})
    with pytest.raises(sw.ConversionError, match="bad sample key"):
        sw.check_keys({"train": [sw.Sample("a.1", 0, b"", "a")]})
    with pytest.raises(sw.ConversionError, match="two samples"):
        sw.check_keys({"train": [good, good]})


@pytest.mark.parametrize("script", ["synthetic.py", "imagenet.py", "cifar10.py"])
def test_help(script: str) -> None:
    out = ok(script, "--help")
    assert out.stdout.startswith("usage: python datasets/")
    assert "--out" in out.stdout if script == "synthetic.py" else "--dest" in out.stdout
