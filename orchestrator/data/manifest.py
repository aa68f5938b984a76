"""A dataset's manifest: what is in it, read before any shard.

Dataset layout (written by datasets/*.py): a root URL holding `{split}-NNNNNN.tar` shards, each
sample a `<key>.jpg|png` + `<key>.cls` (decimal class) pair, and `manifest.json`, written last
as the dataset's commit marker (per-shard sample counts, classes, mean/std, and the name of the
mean image, `mean_image.npy`, where the converter stored one). Nothing is read without a
manifest: the counts it holds are what make exact epochs possible without a scan.

Shards other tools wrote are read where they lie once datasets/index_shards.py has written a
manifest for them: its `layout` section says which members hold the image and the label
(`SampleLayout`), and a shard's `name` may be a full URL when the manifest lives elsewhere.

No torch, PIL or webdataset here: the dataset converters (datasets/*.py) import this module
for the ImageNet statistics.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UsageError
from orchestrator.storage import NotFound, read_url

if TYPE_CHECKING:
    from orchestrator.spec import DataConfig

log = logging.getLogger(__name__)

# The usual ImageNet statistics (0-255 scale, RGB), as used by torchvision and the ResNet
# recipes: the converters write them into ImageNet's manifest, the loaders fall back on them.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")  # member names an image goes by
MEAN_IMAGE_FILE = "mean_image.npy"  # what the converters write beside manifest.json


class DataError(UsageError, RuntimeError):
    """The dataset cannot be used as configured; the message says which URL or shards."""

    retryable = False  # missing or bad data stays so on a restart (orchestrator.runtime)


class DataUnavailable(DataError):
    """The dataset's store did not answer (down, refused, timed out): a restart may succeed."""

    retryable = True
    exit_code = 1  # not bad input: the same command may pass once the store answers


class BadShard(DataError):
    """A shard is not what its manifest recorded (more samples, other bytes): replaced or
    damaged after the manifest was written. The message names the shard and the fix."""


def _join(root: str, name: str) -> str:
    if "://" in name or name.startswith("/"):  # indexed where it lies, outside the manifest's root
        return name
    return root.rstrip("/") + "/" + name


def load_manifest(url: str) -> dict[str, Any]:
    """Read and check `URL/manifest.json`; a clear error if the dataset has none (incomplete
    upload or wrong URL) or it is not a version-1 WebDataset manifest."""
    try:
        raw = read_url(_join(url, "manifest.json"))
    except NotFound as err:
        raise DataError(
            f"cannot read dataset {url}: it has no manifest.json (not written yet: an unfinished "
            "or failed conversion? the manifest is written last, as the commit marker)"
        ) from err
    except Exception as err:  # whichever backend failed: one message
        raise DataUnavailable(f"cannot read dataset {url}: {err}") from err
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


def mean_image_bytes(manifest: dict[str, Any], url: str) -> bytes:
    """The bytes of the dataset's mean image (the manifest's `mean_image` section names the
    file and its sha256), checked; a DataError saying why when the dataset has none."""
    entry = manifest.get("mean_image")
    if not isinstance(entry, dict) or not entry.get("file"):
        raise DataError(
            f"dataset {url} has no mean image: its manifest.json names none (converted before "
            "the converters stored one, or indexed by datasets/index_shards.py without "
            "--mean-image)"
        )
    try:
        raw = read_url(_join(url, str(entry["file"])))
    except NotFound as err:
        raise DataError(f"dataset {url}: its mean image {entry['file']} is missing") from err
    except Exception as err:  # whichever backend failed: one message
        raise DataUnavailable(f"cannot read {entry['file']} of dataset {url}: {err}") from err
    digest = hashlib.sha256(raw).hexdigest()
    if entry.get("sha256") and digest != entry["sha256"]:
        raise DataError(
            f"dataset {url}: {entry['file']} has sha256 {digest}, not the manifest's "
            f"{entry['sha256']} (replaced after the conversion?)"
        )
    return raw


def load_mean_image(manifest: dict[str, Any], url: str) -> Any:
    """The dataset's mean image: float32 numpy [3, H, W] on the 0-255 scale."""
    import numpy as np  # here, not at import: the pre-flight reads manifests numpy-free

    try:
        image = np.load(io.BytesIO(mean_image_bytes(manifest, url)), allow_pickle=False)
    except ValueError as err:
        raise DataError(f"dataset {url}: its mean image is not a .npy array: {err}") from None
    if image.ndim != 3 or image.shape[0] != 3:
        raise DataError(f"dataset {url}: its mean image has shape {image.shape}, not [3, H, W]")
    return image.astype(np.float32)


@dataclass(frozen=True)
class SampleLayout:
    """Which members of a sample hold its image and its label, and what the label is.

    This project's shards: the image under one of IMAGE_EXTS, the class index in decimal in
    `.cls`. Indexed shards of other tools may keep the label in a JSON member's field
    (`label_field`) or give class names (`label_kind="name"`, looked up in the manifest's
    classes)."""

    image_keys: tuple[str, ...] = IMAGE_EXTS
    label_key: str = "cls"
    label_field: str = ""  # the label member is JSON: its field (dotted for nested objects)
    label_kind: str = "index"  # "index": a class number; "name": a class name in `classes`
    num_classes: int = 0  # labels outside 0..num_classes-1 are bad samples (0: not checked)
    # label_kind="name": name -> index (left out of the hash: a dict has none)
    class_index: Mapping[str, int] = field(default_factory=dict, hash=False)

    def image(self, files: Mapping[str, bytes]) -> bytes | None:
        """The image member's bytes, or None when the sample has none of `image_keys`."""
        return next((files[k] for k in self.image_keys if k in files), None)

    def raw_label(self, files: Mapping[str, bytes]) -> str:
        """The label as written in the sample (a number or a class name); ValueError saying
        what is missing or unreadable."""
        if self.label_key not in files:
            raise ValueError(f"no .{self.label_key} member (has {sorted(files)})")
        data = files[self.label_key]
        try:
            if not self.label_field:
                return data.decode().strip()
            value: Any = json.loads(data)
            for part in self.label_field.split("."):
                value = value[part]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as err:
            what = f"field {self.label_field!r} of " if self.label_field else ""
            raise ValueError(
                f"no readable label in {what}.{self.label_key} {data[:40]!r} ({err})"
            ) from None
        return str(value).strip()

    def label(self, files: Mapping[str, bytes]) -> int:
        """The sample's class index; ValueError when it has none or one out of range."""
        raw = self.raw_label(files)
        if self.label_kind == "name":
            if raw not in self.class_index:
                raise ValueError(f"class name {raw[:40]!r} is not among the manifest's classes")
            return self.class_index[raw]
        try:
            label = int(raw)
        except ValueError:
            raise ValueError(f"bad .{self.label_key} label {raw[:20]!r}: not a number") from None
        if label < 0 or (self.num_classes and label >= self.num_classes):
            raise ValueError(f"label {label} outside 0..{self.num_classes - 1}")
        return label

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `layout` section (classes and their count live beside it)."""
        return {
            "image_keys": list(self.image_keys),
            "label_key": self.label_key,
            "label_field": self.label_field,
            "label_kind": self.label_kind,
        }


OWN_LAYOUT = SampleLayout()  # what datasets/*.py write


def sample_layout(manifest: dict[str, Any], url: str = "") -> SampleLayout:
    """The manifest's SampleLayout: its `layout` section, or this project's own layout."""
    num_classes = int(manifest.get("num_classes") or 0)
    section = manifest.get("layout") or {}
    if not isinstance(section, dict):
        raise DataError(f"dataset {url}: manifest.json's layout is not an object")
    kind = section.get("label_kind", "index")
    if kind not in ("index", "name"):
        raise DataError(f"dataset {url}: layout.label_kind {kind!r}, expected index or name")
    classes = [str(c) for c in manifest.get("classes") or []]
    if kind == "name" and len(classes) != num_classes:
        raise DataError(
            f"dataset {url}: labels are class names but the manifest lists {len(classes)} "
            f"classes for num_classes={num_classes}"
        )
    return SampleLayout(
        image_keys=tuple(section.get("image_keys") or IMAGE_EXTS),
        label_key=str(section.get("label_key") or "cls"),
        label_field=str(section.get("label_field") or ""),
        label_kind=kind,
        num_classes=num_classes,
        class_index={c: i for i, c in enumerate(classes)} if kind == "name" else {},
    )


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    layout: SampleLayout = OWN_LAYOUT
    sha256: str = ""  # the manifest's digest of the shard's bytes ("": none recorded)


def split_shards(manifest: dict[str, Any], url: str, split: str) -> list[Shard]:
    """The shards of one split, in manifest order, with their sample counts and layout."""
    splits = manifest["splits"]
    if split not in splits:
        raise DataError(f"dataset {url} has no split {split!r} (it has {sorted(splits)})")
    layout = sample_layout(manifest, url)
    shards = [
        Shard(_join(url, s["name"]), int(s["samples"]), layout, str(s.get("sha256") or ""))
        for s in splits[split]["shards"]
    ]
    if not shards or sum(s.samples for s in shards) == 0:
        raise DataError(f"dataset {url}: split {split!r} is empty")
    return shards


def check_decodable(manifest: dict[str, Any], cfg: DataConfig) -> None:
    """decode=gpu/split read JPEG only: refuse a split the manifest says holds other formats
    (indexed shards count them), before a worker finds every sample bad."""
    kinds = manifest["splits"][cfg.train_split].get("image_types") or {}
    other = {k: n for k, n in kinds.items() if k != "jpeg" and n}
    if cfg.decode != "cpu" and other:
        raise DataError(
            f"dataset {cfg.url}: data.decode={cfg.decode} decodes JPEG only, but split "
            f"{cfg.train_split!r} holds {other} images; use data.decode=cpu"
        )


_SAID: set[tuple[str, str, bool]] = set()


def say_verification(shards: list[Shard], url: str, split: str, verify: bool) -> None:
    """Say once per process (dataset, split) what the readers will not verify: everything's
    digest with data.verify_shards=false, or the shards whose manifest entry has no sha256."""
    if (url, split, verify) in _SAID:
        return
    _SAID.add((url, split, verify))
    unrecorded = [s for s in shards if not s.sha256]
    if not verify:
        log.warning(
            "data.verify_shards=false: the shards of %s split %r are read without checking "
            "their sha256 against the manifest (a shard replaced since is read as it is now; "
            "their sample counts are still checked)",
            url,
            split,
        )
    elif unrecorded:
        log.warning(
            "%d of %d shards of %s split %r have no sha256 in the manifest (e.g. %s): their "
            "bytes are not verified, only their sample counts; re-run the converter or "
            "datasets/index_shards.py to record them",
            len(unrecorded),
            len(shards),
            url,
            split,
            unrecorded[0].url,
        )
