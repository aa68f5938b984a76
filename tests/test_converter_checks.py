"""The dataset scripts refuse bad arguments and destinations before any heavy work (issue 32
items 5 and 6), and index_shards --mean-image computes the converter's mean image from shards
others wrote (item 7). In process: the scripts' main() under orchestrator.cli.run_cli, as
their command lines run them, on a few dozen small generated images."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator import cli, launch, storage
from tests.conftest import ROOT, load_job_spec, odd_shards_data

sys.path.insert(0, str(ROOT / "datasets"))  # the scripts import their siblings by name
import cifar10
import destination
import imagenet
import index_shards
import synthetic

MEAN = ["--mean-resize", "40", "--mean-size", "32"]  # small views: a fast mean pass


def run(main: Any, capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str]:
    code = cli.run_cli(main, [str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 16 train, 4 val images of 64x48: an ILSVRC-layout folder."""
    out = tmp_path_factory.mktemp("checks") / "src"
    synthetic.main(
        ["imagenet", "--out", str(out), "--classes", "3", "--train-per-class", "16"]
        + ["--val-per-class", "4", "--size", "64x48", "--size-jitter", "0", "--workers", "1"]
    )
    return out


@pytest.fixture
def no_heavy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any scan, batch read or shard read fails the test: a refusal must come before them."""

    def heavy(*_: Any, **__: Any) -> Any:
        raise AssertionError("heavy work started before the refusal")

    monkeypatch.setattr(imagenet, "scan_train", heavy)
    monkeypatch.setattr(cifar10, "_load", heavy)
    monkeypatch.setattr(index_shards, "_pool_map", heavy)


# ---------------------------------------------------------------- refusals, at once


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--dest", "gs://bucket/x"], "does not speak gs://"),
        (["--shard-size-mb", "0"], "--shard-size-mb 0.0: give a number of MB of at least"),
        (["--shard-size-mb", "nan"], "--shard-size-mb nan"),
        (["--shard-size-mb", "0.001"], "--shard-size-mb 0.001"),
        (["--workers", "0"], "--workers 0: give a number of processes >= 1"),
        (["--max-bad-fraction", "1.5"], "--max-bad-fraction 1.5: give a fraction"),
        (["--mean-samples", "10"], "--mean-samples 10: a sample of fewer than"),
        (["--mean-samples", "-1"], "--mean-samples -1: give a number of images >= 0"),
        (["--mean-size", "300"], "--mean-size 300: give a size between 1 and --mean-resize"),
        (["--resize-shorter", "0"], "--resize-shorter 0: give a positive number"),
        (["--val-labels", "/no/such/labels.csv"], "--val-labels /no/such/labels.csv: no such"),
    ],
)
def test_imagenet_refuses_before_the_scan(
    src: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_heavy_work: None,
    args: list[str],
    said: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # a gs:// --dest once became ./gs:/bucket/x here
    dest = ["--dest", str(tmp_path / "out")]
    code, err = run(imagenet.main, capsys, "--src", src, *dest, *args)
    assert code == 2 and said in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, no ./gs: folder


def test_a_destination_that_cannot_be_written_is_refused(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_heavy_work: None
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run(imagenet.main, capsys, "--src", src, "--dest", blocker)
    assert code == 2 and f"--dest {blocker} exists and is not a folder" in err, err
    code, err = run(imagenet.main, capsys, "--src", src, "--dest", blocker / "below")
    assert code == 2 and f"cannot write to {blocker}" in err, err
    code, err = run(cifar10.main, capsys, "--src", tmp_path, "--dest", "gs://b/c")
    assert code == 2 and "does not speak gs://" in err, err
    code, err = run(cifar10.main, capsys, "--src", tmp_path, "--dest", tmp_path, "--workers", -2)
    assert code == 2 and "--workers -2" in err, err


def test_existing_output_policy(tmp_path: Path) -> None:
    """The same --src resumes; another --src only with --replace; another tool's dataset never."""
    store = storage.LocalStorage(str(tmp_path))
    script = "datasets/imagenet.py"
    destination.check_existing(store, script, "/data/a", replace=False)  # nothing there yet
    earlier = {"source": {"script": script, "src": "/data/a"}}
    store.put("manifest.json", json.dumps(earlier).encode())
    destination.check_existing(store, script, "/data/a", replace=False)  # a resume
    with pytest.raises(destination.ConversionError, match="Pass --replace"):
        destination.check_existing(store, script, "/data/b", replace=False)
    destination.check_existing(store, script, "/data/b", replace=True)
    store.put("manifest.json", json.dumps({"source": {"by": "datasets/index_shards.py"}}).encode())
    with pytest.raises(destination.ConversionError, match="index_shards.py wrote"):
        destination.check_existing(store, script, "/data/a", replace=True)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["gs://bucket/shards"], "SOURCE=gs://bucket/shards: the project does not speak gs://"),
        (["https://host/x.tar"], "SOURCE=https://host/x.tar: http(s):// cannot be read"),
        (["{peer}", "--dest", "az://c/x"], "--dest=az://c/x: the project does not speak az://"),
        (["{peer}", "--classes", "/no/such/classes.txt"], "--classes /no/such/classes.txt"),
        (["{peer}", "--mean-samples", "500"], "only --mean-image computes: add --mean-image"),
        (["{peer}", "--mean-image", "--mean-samples", "10"], "--mean-samples 10: a sample of"),
        (["{peer}", "--mean-image", "--split", "val=*"], "none of the 2 shards is in it"),
    ],
)
def test_index_shards_refuses_before_reading_a_shard(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_heavy_work: None,
    args: list[str],
    said: str,
) -> None:
    peer = tmp_path / "peer"
    peer.mkdir()
    for name in ("train-0.tar", "train-1.tar"):
        (peer / name).write_bytes(b"\0" * 1024)
    code, err = run(index_shards.main, capsys, *[a.replace("{peer}", str(peer)) for a in args])
    assert code == 2 and said in err, err
    assert sorted(p.name for p in peer.iterdir()) == ["train-0.tar", "train-1.tar"]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--out", "gs://bucket/x"], "a local folder only"),
        (["--quality", "0"], "--quality 0: give a JPEG quality in 1..100"),
        (["--size", "4x4"], "--size 4x4: give sides of >= 8 pixels"),
        (["--size-jitter", "nan"], "--size-jitter nan"),
        (["--workers", "0"], "--workers 0"),
    ],
)
def test_synthetic_refuses_bad_flags(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    said: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(synthetic.main, capsys, "imagenet", "--out", tmp_path / "out", *args)
    assert code == 2 and said in err, err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the mean image of indexed shards


def peer_shards(src: Path, out: Path) -> Path:
    """The converter's input as another team would have sharded it: webdataset's ShardWriter,
    shuffled, 10 samples a shard."""
    import webdataset as wds

    wnids = sorted(p.name for p in (src / "train").iterdir())
    train = [
        {"__key__": f.stem, "jpg": f.read_bytes(), "cls": wnids.index(f.parent.name)}
        for f in sorted((src / "train").glob("*/*.JPEG"))
    ]
    random.Random(0).shuffle(train)
    labels = dict(line.split(",", 1) for line in (src / "LOC_val_solution.csv").open())
    val = [
        {"__key__": f.stem, "jpg": f.read_bytes(), "cls": wnids.index(labels[f.stem].split()[0])}
        for f in sorted((src / "val").glob("*.JPEG"))
    ]
    out.mkdir(parents=True)
    for split, samples in (("train", train), ("val", val)):
        with wds.ShardWriter(str(out / f"{split}-%04d.tar"), maxcount=10, verbose=0) as sink:
            for sample in samples:
                sink.write(sample)
    return out


def mean_of(url: str) -> tuple[np.ndarray, dict[str, Any]]:
    from orchestrator.data.manifest import load_manifest, load_mean_image

    manifest = load_manifest(url)
    return load_mean_image(manifest, url), manifest["mean_image"]


@pytest.mark.parametrize("samples", ["0", "20"])
def test_indexed_shards_get_the_converters_mean_image_and_pass_the_preflight(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], samples: str
) -> None:
    """The same images, converted (mean over the files) and sharded by another tool (indexed
    with --mean-image, 2 processes over the shards): the same mean image, the same manifest
    note, whether every image or a seeded sample of 20; and the paper's per-pixel-mean
    recipe passes the pre-flight on the indexed shards."""
    mean = [*MEAN, "--mean-samples", samples, "--mean-min-samples", "5", "--seed", "3"]
    converted = tmp_path / "converted"
    code, err = run(imagenet.main, capsys, "--src", src, "--dest", converted, "--workers", 1, *mean)
    assert code == 0, err
    peer = peer_shards(src, tmp_path / "peer")
    code, err = run(index_shards.main, capsys, peer, "--workers", 2, "--mean-image", *mean)
    assert code == 0, err
    assert "mean image: averaged" in err
    want, want_note = mean_of(str(converted))
    got, note = mean_of(str(peer))
    assert np.abs(got - want).max() < 1e-3  # same views, same images: equal up to float32
    assert note == {**want_note, "sha256": note["sha256"]}
    assert note["samples"] == (48 if samples == "0" else 20) and note["split_samples"] == 48

    # a rerun with the same flags writes nothing; without --mean-image it says what goes
    code, err = run(index_shards.main, capsys, peer, "--mean-image", *mean)
    assert code == 0 and "up to date: nothing written" in err, err

    spec = load_job_spec("smoke")
    job = [
        "--dry-run",
        *odd_shards_data(peer),
        "data.normalize=per_pixel_mean",
        f"checkpoint.storage={tmp_path / 'runs'}",
        "tracking.enabled=false",
    ]
    assert launch.main(spec, job) == 0, capsys.readouterr().err
    assert ", mean image 3x32x32" in capsys.readouterr().out


def test_index_shards_mean_image_on_s3(
    src: Path, tmp_path: Path, s3_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shards on the test stack's S3, the manifest and mean image written beside them; the
    destination's probe object is gone."""
    peer = peer_shards(src, tmp_path / "peer")
    store = storage.open_storage(s3_prefix)
    for shard in sorted(peer.glob("*.tar")):
        store.put_file(str(shard), shard.name)
    mean = [*MEAN, "--mean-samples", "0"]
    code, err = run(index_shards.main, capsys, s3_prefix, "--workers", 2, "--mean-image", *mean)
    assert code == 0, err
    got, note = mean_of(s3_prefix)
    assert note["samples"] == 48 and got.shape == (3, 32, 32)
    names = sorted(store.sizes())
    assert [n for n in names if not n.endswith(".tar")] == [
        "manifest.json",
        "mean_image.npy",
        "shards.index.json",
    ]
    store.delete_prefix("")
