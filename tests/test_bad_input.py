"""Every kind of bad shard and bad image the loaders can meet, one row each: what the user sees.

The table in docs/operators-guide.md ("Bad input") lists the same cases; a test checks that it
names each one. Readers never write: the shards are byte-identical after every case.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.data import DataError, TrainLoader
from tests.conftest import ROOT, odd_shards_config, write_tar

GOOD = 7  # good samples next to the bad one, in the same shard


def _jpeg(seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.convert(mode).save(buf, "JPEG")
    return buf.getvalue()


def _huge_header() -> bytes:
    """A small JPEG whose frame header claims 60000 x 60000 pixels (a decompression bomb)."""
    data = bytearray(_jpeg(99))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(data)


# case -> (the bad sample's members, what the loader does: "ok" or a bad sample's reason)
SAMPLES: dict[str, tuple[dict[str, bytes], str]] = {
    "wrong member keys": ({"image": _jpeg(1), "cls": b"1"}, "no image member"),
    "label member missing": ({"jpg": _jpeg(1)}, "no .cls member"),
    "label not a number": ({"jpg": _jpeg(1), "cls": b"cat"}, "not a number"),
    "label out of range": ({"jpg": _jpeg(1), "cls": b"9"}, "label 9 outside 0..3"),
    "zero-byte image": ({"jpg": b"", "cls": b"1"}, "decode failed"),
    "not an image": ({"jpg": b"<html>not found</html>", "cls": b"1"}, "decode failed"),
    "JPEG cut short": ({"jpg": _jpeg(1)[:300], "cls": b"1"}, "decode failed"),
    "huge header": ({"jpg": _huge_header(), "cls": b"1"}, "decode failed"),
    "CMYK JPEG": ({"jpg": _jpeg(1, "CMYK"), "cls": b"1"}, "ok"),
}
# case -> (what is done to a good dataset, the DataError or the bad samples' reason)
DATASETS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated tar": (
        lambda d: _cut(d / "train-000000.tar", 0.6),
        "unreadable or truncated shard",
    ),
    "manifest missing": (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
    "manifest not JSON": (
        lambda d: (d / "manifest.json").write_text('{"format": "webdataset", '),
        "manifest.json is not valid JSON",
    ),
    "manifest counts more samples than the shard holds": (
        lambda d: _edit(d, lambda m: m["splits"]["train"]["shards"][0].update(samples=GOOD + 4)),
        "shard holds fewer samples than its manifest says",
    ),
    "manifest of another format": (
        lambda d: _edit(d, lambda m: m.update(version=7)),
        "this reader understands webdataset version 1",
    ),
}


def _cut(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _edit(root: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _dataset(root: Path, bad: dict[str, bytes] | None) -> Path:
    """One shard: GOOD good samples, then the bad one (if any); a manifest as the converters
    write it (4 classes)."""
    root.mkdir(parents=True)
    samples = [{"jpg": _jpeg(i), "cls": str(i % 4).encode()} for i in range(GOOD)]
    samples += [bad] if bad is not None else []
    members = [(f"s{i:03d}.{ext}", data) for i, m in enumerate(samples) for ext, data in m.items()]
    write_tar(root / "train-000000.tar", members)
    shard = {"name": "train-000000.tar", "samples": len(samples)}
    manifest = {
        "format": "webdataset",
        "version": 1,
        "num_classes": 4,
        "classes": ["a", "b", "c", "d"],
        "splits": {"train": {"samples": len(samples), "shards": [shard]}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _read(root: Path) -> tuple[list[int], float]:
    """Every label of one epoch, and the bad samples counted."""
    cfg = odd_shards_config(root, num_workers=0, bad_check_after=1000)
    loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    labels = [int(v) for _, y in loader for v in y]
    return labels, loader.stats()["bad_samples"]


def _digest(root: Path) -> str:
    return hashlib.sha256((root / "train-000000.tar").read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(SAMPLES))
def test_a_bad_sample_is_replaced_counted_and_named(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    members, reason = SAMPLES[case]
    root = _dataset(tmp_path / "d", members)
    before = _digest(root)
    with caplog.at_level(logging.WARNING, logger="orchestrator.data"):
        labels, bad = _read(root)
    assert len(labels) == GOOD + 1  # the epoch keeps its length: the bad one was replaced
    if reason == "ok":
        assert bad == 0 and labels.count(1) == 3  # 1, 5 and the extra sample
    else:
        assert bad == 1 and reason in caplog.text and "s007" in caplog.text, caplog.text
    assert _digest(root) == before


@pytest.mark.parametrize("case", list(DATASETS))
def test_a_bad_dataset_is_refused_or_its_missing_samples_counted(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A manifest that cannot be used stops the job before training; samples a shard lacks
    (cut short, or fewer than the manifest says) are counted bad and replaced, so positions
    and epoch lengths never shift."""
    damage, message = DATASETS[case]
    root = _dataset(tmp_path / "d", None)
    damage(root)
    if "manifest" in case and "samples" not in case:
        with pytest.raises(DataError, match=re.escape(message)):
            _read(root)
        return
    shards = json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"]
    expected = sum(s["samples"] for s in shards)
    with caplog.at_level(logging.WARNING, logger="orchestrator.data"):
        labels, bad = _read(root)
    assert len(labels) == expected and bad >= 1
    assert message in caplog.text and "train-000000.tar" in caplog.text


def test_the_operators_guide_lists_every_case() -> None:
    guide = (ROOT / "docs" / "operators-guide.md").read_text()
    table = guide[guide.index("## Bad input") :]
    for case in [*SAMPLES, *DATASETS]:
        assert f"| {case} |" in table, f"docs/operators-guide.md: no row for {case!r}"
