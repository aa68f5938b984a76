"""Shards other tools wrote (webdataset's ShardWriter), indexed where they lie by
datasets/index_shards.py, then read by the loaders exactly as converted shards are."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, odd_shards_config, odd_shards_data, run_script, write_tar

INDEX = "datasets/index_shards.py"


def _images(src: Path) -> dict[str, list[tuple[str, bytes, int]]]:
    """{split: [(key, JPEG bytes, label)]} of the generated ImageNet folder."""
    wnids = sorted(p.name for p in (src / "train").iterdir())
    train = [
        (f.stem, f.read_bytes(), wnids.index(f.parent.name))
        for f in sorted((src / "train").glob("*/*.JPEG"))
    ]
    with open(src / "LOC_val_solution.csv") as f:
        val_wnid = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    val = [
        (f.stem, f.read_bytes(), wnids.index(val_wnid[f.stem]))
        for f in sorted((src / "val").glob("*.JPEG"))
    ]
    return {"train": train, "val": val}


def _write_wds(dest: Path, split: str, samples: list[dict[str, Any]], per_shard: int) -> None:
    """What another team would have: shards written by webdataset's own ShardWriter."""
    import webdataset as wds

    dest.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(dest / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture(scope="session")
def peer_images(generated_imagenet: Path) -> dict[str, list[tuple[str, bytes, int]]]:
    return _images(generated_imagenet)


def _peer_shards(root: Path, images: dict[str, list[tuple[str, bytes, int]]]) -> Path:
    train = list(images["train"])
    random.Random(0).shuffle(train)  # a shuffled dataset, as ShardWriter's users write them
    _write_wds(root, "train", [{"__key__": k, "jpg": b, "cls": c} for k, b, c in train], 64)
    _write_wds(root, "val", [{"__key__": k, "jpg": b, "cls": c} for k, b, c in images["val"]], 64)
    return root


@pytest.fixture
def peer_shards(tmp_path: Path, peer_images: dict) -> Path:
    return _peer_shards(tmp_path / "peer", peer_images)


def _index(*args: Any, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, INDEX, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert (out.returncode == 0) == ok, out.stderr[-3000:]
    if not ok:
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return out


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar"))}


def test_indexing_writes_only_a_manifest_and_reruns_only_what_changed(
    peer_shards: Path, peer_images: dict
) -> None:
    before = _digests(peer_shards)
    out = _index(peer_shards, "--workers", 2)
    assert "indexing 4 shards" in out.stderr
    assert _digests(peer_shards) == before  # the shards are never rewritten
    assert sorted(p.name for p in peer_shards.iterdir() if not p.name.endswith(".tar")) == [
        "manifest.json",
        "shards.index.json",
    ]
    manifest = json.loads((peer_shards / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        assert info["samples"] == len(peer_images[split])
        for shard in info["shards"]:
            data = (peer_shards / shard["name"]).read_bytes()
            assert shard["bytes"] == len(data)
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                assert shard["samples"] == len(tar.getnames()) // 2
    assert manifest["num_classes"] == 4 and manifest["bad_samples"] == []
    assert manifest["layout"]["label_key"] == "cls"

    stamp = (peer_shards / "manifest.json").stat().st_mtime_ns
    again = _index(peer_shards)
    assert "up to date: nothing written" in again.stderr
    assert (peer_shards / "manifest.json").stat().st_mtime_ns == stamp

    # one shard rewritten with a sample fewer: found by its fingerprint, and only it is read
    val = [{"__key__": k, "jpg": b, "cls": c} for k, b, c in peer_images["val"][:-1]]
    _write_wds(peer_shards, "val", val, 64)
    changed = _index(peer_shards)
    assert "1 changed" in changed.stderr and "val-000000.tar" in changed.stderr
    assert "indexing 1 shards" in changed.stderr
    manifest = json.loads((peer_shards / "manifest.json").read_text())
    assert manifest["splits"]["val"]["samples"] == len(peer_images["val"]) - 1


def _converted(tmp_path: Path, src: Path) -> Path:
    dest = tmp_path / "converted"
    run_script("datasets/imagenet.py", "--src", str(src), "--dest", str(dest))
    return dest


def _epoch(
    url: Path | str, decode: str = "gpu", **cfg: Any
) -> tuple[list[tuple[bytes, int]], list[int], Any]:
    """One epoch's (JPEG file, label) of the samples the batches carry as files (all of them
    with decode=gpu: a CPU stands in for the device, so the stored bytes tell samples apart),
    and every label."""
    from orchestrator.data import TrainLoader

    data = odd_shards_config(url, decode=decode, **cfg)
    loader = TrainLoader(data, rank=0, world_size=1, **_bs())
    files, labels = [], []
    for batch, y in loader:
        y = y.tolist()
        labels += y
        carried = y[len(batch.pixels) :]  # the workers' decoded samples come first
        files += [(j.numpy().tobytes(), c) for j, c in zip(batch.jpegs(), carried, strict=True)]
    return files, labels, loader


def test_loaders_read_indexed_shards_as_they_read_converted_ones(
    tmp_path: Path, peer_shards: Path, generated_imagenet: Path
) -> None:
    from orchestrator.data import TrainLoader, eval_loader

    _index(peer_shards)
    converted = _converted(tmp_path, generated_imagenet)
    # the same epoch: every image once, with the label the converter gave it
    peer, labels, loader = _epoch(peer_shards)
    own, _, _ = _epoch(converted)
    assert len(peer) == len(set(peer)) == loader.num_samples == 160
    assert sorted(peer) == sorted(own)
    # decode=split: the same samples, half of each batch decoded by the workers
    files, split_labels, _ = _epoch(peer_shards, "split", split_cpu_share=0.5, split_adapt=False)
    assert sorted(split_labels) == sorted(labels) and len(files) == 80
    assert set(files) <= set(peer)

    # exact mid-epoch resume on them: batches 4.. after a restart are the epoch's batches 4..
    cpu = odd_shards_config(peer_shards)
    full = [labels.tolist() for _, labels in TrainLoader(cpu, rank=0, world_size=1, **_bs())]
    resumed = TrainLoader(cpu, rank=0, world_size=1, **_bs())
    resumed.set_epoch(0, start_batch=4)
    assert [labels.tolist() for _, labels in resumed] == full[4:]
    # equal batches per rank, each sample on one rank
    ranks = [
        [labels.tolist() for _, labels in TrainLoader(cpu, rank=r, world_size=3, **_bs())]
        for r in range(3)
    ]
    assert len({len(r) for r in ranks}) == 1
    assert sorted(x for r in ranks for b in r for x in b) == sorted(x for b in full for x in b)

    # evaluation: the same pixels with the same labels
    def val(url: Path) -> list[tuple[int, str]]:
        cfg = odd_shards_config(url)
        return sorted(
            (int(label), hashlib.sha1(image.numpy().tobytes()).hexdigest())
            for images, labels in eval_loader(cfg, rank=0, world_size=1, batch_size=8)
            for image, label in zip(images, labels, strict=True)
        )

    assert val(peer_shards) == val(converted) and len(val(peer_shards)) == 40


def _bs() -> dict[str, int]:
    return {"batch_size": 16, "seed": 0}


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.services)])
def test_train_a_few_steps_on_indexed_shards(
    tmp_path: Path, peer_images: dict, where: str, request: pytest.FixtureRequest
) -> None:
    url: str = str(_peer_shards(tmp_path / "peer", peer_images))
    if where == "s3":
        from orchestrator import storage

        bucket = storage.open_storage(request.getfixturevalue("s3_prefix"))
        for shard in sorted(Path(url).glob("*.tar")):
            bucket.put_file(shard, shard.name)
        url = bucket.root
    _index(url)
    out = run_script(
        "jobs/smoke.py",
        "--local",
        "name=peer",
        f"checkpoint.storage={tmp_path / 'ckpt'}",
        "model.name=cifar_resnet20",
        "model.num_classes=4",
        *odd_shards_data(url),
        "scaling.global_batch=16",
        "schedule.max_iters=3",
        "tracking.enabled=false",
        "eval.every_iters=0",
        "checkpoint.every_iters=3",
        env={"OMP_NUM_THREADS": "1"},
    )
    steps = sorted((tmp_path / "ckpt" / "peer" / "checkpoints").glob("step-*"))
    assert steps and (steps[-1] / "COMMITTED").exists(), out
    state = torch.load(io.BytesIO((steps[-1] / "trainer.pt").read_bytes()), weights_only=True)
    assert state["step"] == 3


def _label_json(name: str) -> bytes:
    return json.dumps({"label": name, "source": "hub"}).encode()


def test_foreign_layouts_are_read_or_refused_with_the_flag_that_fixes_them(
    tmp_path: Path, peer_images: dict
) -> None:
    """imagenet-1k-wds style names, `jpeg` images, labels as class names in a JSON field; one
    sample without a label and one damaged JPEG."""
    wnids = [f"n{i:08d}" for i in range(4)]
    root = tmp_path / "hub"
    train = list(peer_images["train"])
    random.Random(1).shuffle(train)
    for s in range(2):
        members = []
        for key, data, label in train[s * 80 : (s + 1) * 80]:
            members += [(f"{key}.jpeg", data), (f"{key}.json", _label_json(wnids[label]))]
        write_tar(root / f"imagenet1k-train-{s:04d}.tar", members)
    val = []
    for i, (key, data, label) in enumerate(peer_images["val"]):
        if i == 3:
            data = data[: len(data) // 2]  # the body cut short: must be found damaged
        val.append((f"{key}.jpeg", data))
        if i != 5:  # sample 5 has no label
            val.append((f"{key}.json", _label_json(wnids[label])))
    write_tar(root / "imagenet1k-validation-00.tar", val)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(wnids) + "\n")
    pattern = f"{root}/imagenet1k-train-{{0000..0001}}.tar"
    val_shard = root / "imagenet1k-validation-00.tar"

    # default key cls: nothing has it; the message names a shard, a sample and the flags
    err = _index(pattern, val_shard, ok=False).stderr
    assert "have no label" in err and "imagenet1k-" in err and "--label-key" in err
    assert "no .cls member (has ['jpeg', 'json'])" in err
    # the right key: the one sample without a label is named, with the flag that keeps it
    args = (pattern, val_shard, "--label-key", "json:label", "--classes", classes)
    err = _index(*args, ok=False).stderr
    name = peer_images["val"][5][0]
    assert (
        f"1 samples have no label, e.g. shard imagenet1k-validation-00.tar: sample {name!r}" in err
    )
    assert "--unlabeled bad" in err
    # too many bad samples for the default 0.1%
    assert "--max-bad-fraction" in _index(*args, "--unlabeled", "bad", ok=False).stderr
    _index(*args, "--unlabeled", "bad", "--max-bad-fraction", "0.05")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["layout"] == {
        "image_keys": ["jpg", "jpeg", "png", "webp", "ppm", "bmp"],
        "label_key": "json",
        "label_field": "label",
        "label_kind": "name",
    }
    assert manifest["classes"] == wnids and manifest["splits"]["train"]["samples"] == 160
    bad = {(b["key"], b["member"]): b["reason"] for b in manifest["bad_samples"]}
    assert set(bad) == {(peer_images["val"][3][0], "jpeg"), (name, "json")}
    assert "does not decode" in bad[(peer_images["val"][3][0], "jpeg")]

    # the loaders: labels mapped through the class names; the two bad samples counted
    from orchestrator.data import TrainLoader, eval_loader

    truth = {data: label for _, data, label in peer_images["train"]}
    seen, _, _ = _epoch(root)
    assert len(seen) == 160 and all(truth[jpeg] == label for jpeg, label in seen)
    cfg = odd_shards_config(root, bad_check_after=1000)
    labels = [int(x) for _, y in eval_loader(cfg, rank=0, world_size=1, batch_size=8) for x in y]
    want = [lbl for i, (_, _, lbl) in enumerate(peer_images["val"]) if i not in (3, 5)]
    assert labels == want
    # as a training split: the two bad samples replaced and counted, the rest in one epoch each
    cfg = odd_shards_config(root, train_split="val", bad_check_after=1000)
    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=8, seed=0)
    trained = sorted(int(x) for _, y in loader for x in y)
    assert loader.stats()["bad_samples"] == 2 and len(trained) == 40
    assert set(trained) <= set(want)


def test_shards_the_loaders_would_misread_are_refused(tmp_path: Path, peer_images: dict) -> None:
    images = peer_images["train"]
    # no split in the name
    write_tar(tmp_path / "a" / "shard-0.tar", [(f"{k}.jpg", d) for k, d, _ in images[:2]])
    err = _index(tmp_path / "a", ok=False).stderr
    assert "shard shard-0.tar: its name names no split" in err and "--split NAME=GLOB" in err
    out = _index(
        tmp_path / "a",
        "--split",
        "train=shard-*",
        "--unlabeled",
        "bad",
        "--max-bad-fraction",
        "1",
        ok=True,
    )
    assert "train: 2 samples in 1 shards" in out.stderr

    # one class per training shard: batches would hold one class
    by_class = tmp_path / "sorted"
    for c in range(4):
        members = []
        for k, d, label in images:
            if label == c:
                members += [(f"{k}.jpg", d), (f"{k}.cls", str(label).encode())]
        write_tar(by_class / f"train-{c:03d}.tar", members)
    err = _index(by_class, ok=False).stderr
    assert "sorted by class" in err and "--allow-class-sorted" in err
    _index(by_class, "--allow-class-sorted")

    # members of one sample apart from each other
    k0, d0, _ = images[0]
    k1, d1, _ = images[1]
    write_tar(
        tmp_path / "t" / "train-0.tar",
        [(f"{k0}.jpg", d0), (f"{k1}.jpg", d1), (f"{k0}.cls", b"0"), (f"{k1}.cls", b"1")],
    )
    err = _index(tmp_path / "t", ok=False).stderr
    assert f"the members of sample {k0!r} are not next to each other" in err

    # a label past --num-classes names the shard and the flag
    write_tar(tmp_path / "n" / "train-0.tar", [(f"{k0}.jpg", d0), (f"{k0}.cls", b"7")])
    err = _index(tmp_path / "n", "--num-classes", "4", ok=False).stderr
    assert "shard train-0.tar holds label 7, outside 0..3" in err and "--num-classes" in err

    # a truncated tar
    data = (tmp_path / "sorted" / "train-000.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "train-0.tar").write_bytes(data[: len(data) // 2 + 100])
    err = _index(tmp_path / "cut", ok=False).stderr
    assert "shards cannot be read, e.g. train-0.tar" in err

    # a converted dataset's manifest is never replaced
    own = tmp_path / "own"
    shutil.copytree(by_class, own)
    (own / "manifest.json").write_text(json.dumps({"format": "webdataset", "version": 1}))
    err = _index(own, "--allow-class-sorted", ok=False).stderr
    assert "this tool did not write" in err
    assert json.loads((own / "manifest.json").read_text()) == {"format": "webdataset", "version": 1}


def test_gpu_decode_refuses_a_split_of_png_images(tmp_path: Path) -> None:
    from PIL import Image

    from orchestrator.data import DataError, TrainLoader

    members = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 40, 3), i * 20, np.uint8)).save(buf, "PNG")
        members += [(f"s{i}.png", buf.getvalue()), (f"s{i}.cls", str(i % 2).encode())]
    write_tar(tmp_path / "png" / "train-0.tar", members)
    _index(tmp_path / "png")
    manifest = json.loads((tmp_path / "png" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["image_types"] == {"png": 8}
    with pytest.raises(DataError, match=r"decode=gpu decodes JPEG only.*'png': 8.*decode=cpu"):
        TrainLoader(
            odd_shards_config(tmp_path / "png", decode="gpu"), rank=0, world_size=1, **_bs()
        )
    loader = TrainLoader(
        odd_shards_config(tmp_path / "png"), rank=0, world_size=1, batch_size=4, seed=0
    )
    assert sorted(x for _, y in loader for x in y.tolist()) == [0] * 4 + [1] * 4


def test_a_shard_still_being_written_is_refused_and_one_replaced_after_is_refused_by_the_loader(
    tmp_path: Path, peer_images: dict
) -> None:
    from orchestrator.data import BadShard, TrainLoader

    images = peer_images["train"][:8]
    members = [m for k, d, c in images for m in ((f"{k}.jpg", d), (f"{k}.cls", str(c).encode()))]
    shard = write_tar(tmp_path / "w" / "train-0.tar", members)
    whole = shard.read_bytes()
    with tarfile.open(shard) as tar:  # where the last member's data ends (512-aligned)
        last = tar.getmembers()[-1]
    shard.write_bytes(whole[: last.offset_data + -(-last.size // 512) * 512])
    err = _index(shard.parent, "--allow-class-sorted", ok=False).stderr
    assert "e.g. train-0.tar: EOFError: tar stream ends without its end-of-archive blocks" in err
    assert not (shard.parent / "manifest.json").exists()

    shard.write_bytes(whole)  # its writer closed it
    _index(shard.parent, "--allow-class-sorted")
    cfg = odd_shards_config(shard.parent, num_workers=0)
    assert len([y for _, y in TrainLoader(cfg, rank=0, world_size=1, batch_size=4, seed=0)]) == 2
    # replaced after indexing: the same members, two samples' images swapped (same size)
    swapped = [images[1], images[0], *images[2:]]
    write_tar(shard, [m for k, d, c in swapped for m in ((f"{k}.jpg", d), (f"{k}.cls", b"%d" % c))])
    assert shard.stat().st_size == len(whole) and shard.read_bytes() != whole
    with pytest.raises(BadShard, match=r"train-0\.tar: its \d+ bytes have sha256"):
        list(TrainLoader(cfg, rank=0, world_size=1, batch_size=4, seed=0))
