"""Finding and reading the shards datasets/index_shards.py indexes: what a SOURCE names (a
folder or s3:// prefix, one shard, a brace pattern), each shard's split, and one shard streamed
once in a worker (its count, bytes, sha256, labels, formats, keys and bad samples).

Not a package: index_shards.py imports it as `shard_reading` from its own folder (sys.path[0]).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from destination import ConversionError

from orchestrator import s3, storage
from orchestrator.data.manifest import IMAGE_EXTS, SampleLayout
from orchestrator.data.streams import open_url
from orchestrator.data.tar import tar_groups

SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}


@dataclass(frozen=True)
class Extract:
    """What is read out of each sample: the options a shard's index entry depends on."""

    image_keys: tuple[str, ...] = IMAGE_EXTS
    label_key: str = "cls"
    label_field: str = ""
    check: str = "decode"  # decode: decode each image (JPEG at 1/8 scale); header: parse only

    def layout(self) -> SampleLayout:
        return SampleLayout(self.image_keys, self.label_key, self.label_field)


@dataclass(frozen=True)
class ShardRef:
    """A shard found at the source: its URL, its name in the manifest and its fingerprint."""

    url: str
    name: str  # relative to the manifest's root when below it, else the URL itself
    size: int
    fingerprint: str


# ---------------------------------------------------------------- finding the shards


def local_path(url: str) -> str:
    return str(Path(url).expanduser().resolve())


def _fingerprint(url: str) -> tuple[int, str] | None:
    """(size, fingerprint) without reading the shard: S3's ETag, a local file's mtime."""
    if s3.is_s3(url):
        root, _, name = url.rpartition("/")
        return storage.S3Storage(root).head(name)
    try:
        st = os.stat(url)
    except FileNotFoundError:
        return None
    return st.st_size, f"mtime_ns:{st.st_mtime_ns}"


def expand(source: str) -> list[str]:
    """The shard URLs a SOURCE names: a brace pattern, a single .tar, or a folder/prefix."""
    if "{" in source:
        import braceexpand

        urls = [u if s3.is_s3(u) else local_path(u) for u in braceexpand.braceexpand(source)]
        missing = [u for u in urls if _fingerprint(u) is None]
        if missing:
            raise ConversionError(
                f"{len(missing)} of the {len(urls)} shards {source} names do not exist, e.g. "
                f"{missing[0]}: fix the pattern's range"
            )
        return urls
    url = source.rstrip("/") if s3.is_s3(source) else local_path(source)
    if url.endswith(".tar") and _fingerprint(url) is not None:
        return [url]
    if not s3.is_s3(url) and not Path(url).is_dir():
        raise ConversionError(f"{source}: no such folder or shard")
    names = sorted(storage.open_storage(url).sizes())
    tars = [n for n in names if n.endswith(".tar") and not Path(n).name.startswith(".")]
    if not tars:
        packed = [n for n in names if n.endswith((".tgz", ".tar.gz"))]
        hint = (
            f" (it holds {len(packed)} compressed shards, e.g. {packed[0]}: the loaders read "
            "plain tar; decompress them with gunzip)"
            if packed
            else ""
        )
        raise ConversionError(f"{source}: no .tar shards found{hint}")
    return [f"{url}/{n}" for n in tars]


def root_of(urls: Sequence[str]) -> str:
    """The deepest folder holding every shard: where the manifest goes by default."""
    parts = [u.split("/")[:-1] for u in urls]
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return "/".join(common).rstrip("/") or "/"


def find_shards(urls: Sequence[str], root: str) -> list[ShardRef]:
    """Every shard of `urls` (from `expand`), once, with its name relative to `root` where
    below it."""
    seen: dict[str, ShardRef] = {}
    for url in urls:
        if url in seen:
            continue
        head = _fingerprint(url)
        if head is None:
            raise ConversionError(f"{url} disappeared while it was being listed")
        name = url[len(root) + 1 :] if url.startswith(root.rstrip("/") + "/") else url
        seen[url] = ShardRef(url, name, head[0], head[1])
    return list(seen.values())


def split_of(name: str, rules: Sequence[tuple[str, str]]) -> str:
    """A shard's split: the first --split rule whose glob matches, else a word of its name."""
    base = name.rpartition("/")[2]
    for split, pattern in rules:
        if fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(base, pattern):
            return split
    words = {SPLIT_WORDS[w] for w in re.split(r"[^a-z]+", name.lower()) if w in SPLIT_WORDS}
    if len(words) == 1:
        return words.pop()
    why = f"names several splits ({sorted(words)})" if words else "names no split"
    raise ConversionError(
        f"shard {name}: its name {why} (train, val/validation or test); say which with "
        f"--split NAME=GLOB, e.g. --split train='{base}'"
    )


# ---------------------------------------------------------------- one shard, in a worker


class _Hashing(io.RawIOBase):
    """Reads through a stream, hashing and counting every byte."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner, self.sha, self.bytes = inner, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.inner.read(len(buf))
        buf[: len(data)] = data
        self.sha.update(data)
        self.bytes += len(data)
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _check_image(data: bytes, check: str) -> tuple[str, str | None]:
    """(format, why it is damaged or None). decode: JPEGs decode at 1/8 scale (in the DCT
    domain: several times cheaper than a full decode, and a truncated or corrupt body still
    fails), other formats whole."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = (im.format or "unknown").lower()
            if check == "decode":
                if im.format == "JPEG":
                    w, h = im.size
                    im.draft(None, (max(1, w // 8), max(1, h // 8)))
                im.load()
    except Image.DecompressionBombError as err:
        return "unknown", f"refused: {err}"
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for corrupt data
        return "unknown", f"does not decode: {type(err).__name__}: {err}"
    return ("jpeg" if kind == "jpeg" else kind), None


def index_shard(job: tuple[ShardRef, Extract]) -> dict[str, Any]:
    """Stream one shard once: its sample count, bytes, sha256, raw label counts, image
    formats and every sample the loaders would find bad, with the member and the reason."""
    ref, extract = job
    layout = extract.layout()
    labels: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    bad: list[dict[str, str]] = []
    unlabeled: list[dict[str, str]] = []
    keys: dict[str, None] = {}  # ordered: the entry lists them (the mean image draws from them)
    out_of_order: list[str] = []
    samples, error, f = 0, None, None
    try:
        f = _Hashing(open_url(ref.url))
        # require_end: a shard without its end blocks may still be being written
        for _, key, files in tar_groups(f, require_end=True):
            samples += 1
            if key in keys:
                out_of_order.append(key)
            keys[key] = None
            image = layout.image(files)
            if image is None:
                reason = f"no image member among {list(extract.image_keys)} (has {sorted(files)})"
                bad.append({"shard": ref.name, "key": key, "member": "", "reason": reason})
                continue
            member = next(k for k in extract.image_keys if k in files)
            kind, damaged = _check_image(image, extract.check)
            formats[kind] += 1
            if damaged:
                bad.append({"shard": ref.name, "key": key, "member": member, "reason": damaged})
            try:
                labels[layout.raw_label(files)] += 1
            except ValueError as err:
                unlabeled.append({"shard": ref.name, "key": key, "reason": str(err)})
        f.drain()
    except Exception as err:  # noqa: BLE001 - a damaged tar: reported, the shard refused
        error = f"{type(err).__name__}: {err}"
    finally:
        if f is not None:
            f.inner.close()
    return {
        "url": ref.url,
        "name": ref.name,
        "fingerprint": ref.fingerprint,
        "size": ref.size,
        "samples": samples,
        "bytes": f.bytes if f else 0,
        "sha256": f.sha.hexdigest() if f else "",
        "labels": dict(labels),
        "formats": dict(formats),
        "bad": bad,
        "unlabeled": unlabeled,
        "out_of_order": out_of_order[:5],
        "error": error,
        "keys": list(keys),
    }
