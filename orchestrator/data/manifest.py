"""A dataset's manifest: what is in it, read before any shard.

Dataset layout (written by datasets/*.py): a root URL holding `{split}-NNNNNN.tar` shards, each
sample a `<key>.jpg|png` + `<key>.cls` (decimal class) pair, and `manifest.json`, written last
as the dataset's commit marker (per-shard sample counts, classes, mean/std). Nothing is read
without a manifest: the counts it holds are what make exact epochs possible without a scan.

No torch, PIL or webdataset here: the dataset converters (datasets/*.py) import this module
for the ImageNet statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from orchestrator.storage import NotFound, read_url

# The usual ImageNet statistics (0-255 scale, RGB), as used by torchvision and the ResNet
# recipes: the converters write them into ImageNet's manifest, the loaders fall back on them.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class DataError(RuntimeError):
    """The dataset cannot be used as configured; the message says which URL or shards."""


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def load_manifest(url: str) -> dict[str, Any]:
    """Read and check `URL/manifest.json`; a clear error if the dataset has none (incomplete
    upload or wrong URL) or it is not a version-1 WebDataset manifest."""
    try:
        raw = read_url(_join(url, "manifest.json"))
    except Exception as err:  # whichever backend failed: one message
        why = (
            "it has no manifest.json (not written yet: an unfinished or failed conversion?)"
            if isinstance(err, NotFound)
            else str(err)
        )
        raise DataError(f"cannot read dataset {url}: {why}") from err
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"dataset {url}: manifest.json is not valid JSON: {err}") from err
    if manifest.get("format") != "webdataset" or manifest.get("version") != 1:
        raise DataError(
            f"dataset {url}: manifest format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; this reader understands webdataset version 1"
        )
    for key in ("splits", "num_classes"):
        if key not in manifest:
            raise DataError(f"dataset {url}: manifest.json has no {key!r}")
    return manifest


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def split_shards(manifest: dict[str, Any], url: str, split: str) -> list[Shard]:
    """The shards of one split, in manifest order, with their sample counts."""
    splits = manifest["splits"]
    if split not in splits:
        raise DataError(f"dataset {url} has no split {split!r} (it has {sorted(splits)})")
    shards = [Shard(_join(url, s["name"]), int(s["samples"])) for s in splits[split]["shards"]]
    if not shards or sum(s.samples for s in shards) == 0:
        raise DataError(f"dataset {url}: split {split!r} is empty")
    return shards
