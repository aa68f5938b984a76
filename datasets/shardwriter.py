"""Write a dataset as WebDataset shards; shared by datasets/imagenet.py and datasets/cifar10.py.

Not a package: the scripts import it as `shardwriter` from their own folder (sys.path[0]).

What lands at DEST (an s3:// prefix, or a local folder for machines without S3):

    {split}-000000.tar ...       the shards: members `<key>.jpg|png` and `<key>.cls` (the class
                                 index in decimal), samples shuffled across classes
    {split}-000000.tar.json ...  one small sidecar per shard, written after the shard itself: its
                                 size, sha256, a fingerprint of the stored object (its sha256 on
                                 disk, its ETag on S3), a digest of the inputs that went into it,
                                 and the samples it had to skip. A rerun skips every shard whose
                                 sidecar still matches both the inputs and the stored object.
    mean_image.npy               the mean image of the train split (float32 [3, H, W], 0-255
                                 RGB), where the converter computed one; the manifest names it
    manifest.json                written last: the dataset's commit marker. Loaders read only it.

For an S3 destination each shard is first written to a temporary folder ($TMPDIR, default /tmp:
up to one shard per worker at a time); for a local one, to a hidden folder inside it.

Same input + same seed => byte-identical shards (fixed tar metadata, seeded shuffle, shard
boundaries planned up front). Shards are built in parallel, one process per core.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

try:
    from orchestrator import cli, storage
except ImportError:  # a checkout where the package is not installed: the repo root is one up
    sys.path.append(str(Path(__file__).resolve().parent.parent))
    from orchestrator import cli, storage
from destination import ConversionError, Dest, open_dest, prepare_dest

__all__ = ["ConversionError", "Dest", "open_dest", "prepare_dest"]  # the converters' one import

FORMAT_VERSION = 1
MB = 1_000_000  # --shard-size-mb counts in 10^6 bytes
MANIFEST = "manifest.json"
MEAN_IMAGE = "mean_image.npy"  # orchestrator.data.manifest.MEAN_IMAGE_FILE
SIDECAR = ".json"  # suffix appended to a shard's name
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads a closed archive to a multiple of this
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-\d{6}\.tar(\.json)?$")
SIZE_SAMPLE = 64  # samples encoded up front to estimate sizes when they are not known


class BadSample(Exception):
    """Raised by an encoder for one unusable sample: it is skipped and listed in the manifest."""


@dataclass(frozen=True)
class Sample:
    """One image to store, before encoding."""

    key: str  # unique within its split; no "." or "/" (webdataset splits member names at a dot)
    label: int
    source: str | bytes  # a file path, or raw data that the encoder understands
    origin: str  # how to name it to a person: "train/n01440764/x.JPEG", "data_batch_1[17]"
    size: int | None = None  # encoded size if known up front (exact shard packing), else estimated
    identity: str = ""  # changes when the source changes (e.g. size and mtime); for resuming


@dataclass(frozen=True)
class Encoded:
    """A sample's stored bytes."""

    data: bytes
    ext: str  # member extension: "jpg" or "png"
    note: str = ""  # why the bytes differ from the source, when they were converted


Encoder = Callable[[Sample], Encoded]  # must be picklable: a module-level function or class


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class ShardJob:
    """Everything one worker needs to build (or skip) one shard."""

    dest: Dest
    name: str
    samples: tuple[Sample, ...]
    encoder: Encoder
    plan: str  # digest of the inputs: a sidecar with another plan is stale
    tmp_dir: str = ""


def _tar_cost(size: int) -> int:
    """Bytes a sample of `size` takes in a tar: image header + data padded, .cls header + data."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK + 2 * TAR_BLOCK


def plan_shards(sizes: Sequence[int], shard_bytes: int) -> list[range]:
    """Cut samples (in order) into consecutive shards whose tar files stay <= shard_bytes.

    A sample bigger than the target gets a shard of its own.
    """
    shards: list[range] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        cost = _tar_cost(size)
        closed = -(-(used + cost + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD  # end blocks + pad
        if i > start and closed > shard_bytes:
            shards.append(range(start, i))
            start, used = i, 0
        used += cost
    if start < len(sizes):
        shards.append(range(start, len(sizes)))
    return shards


def _identity(sample: Sample) -> str:
    if sample.identity:
        return sample.identity
    if isinstance(sample.source, bytes):
        return hashlib.sha1(sample.source).hexdigest()
    return ""


def _plan_digest(samples: Iterable[Sample], encoder: Encoder) -> str:
    items = [[s.key, s.label, s.origin, _identity(s)] for s in samples]
    # A function's repr holds its memory address: name it instead, so digests are stable.
    name = getattr(encoder, "__qualname__", None)
    described = f"{encoder.__module__}.{name}" if name else repr(encoder)
    blob = json.dumps({"v": FORMAT_VERSION, "encoder": described, "samples": items})
    return hashlib.sha256(blob.encode()).hexdigest()


def check_keys(splits: dict[str, list[Sample]]) -> None:
    """Keys must be unique within a split and free of "." and "/"."""
    for split, samples in splits.items():
        seen: set[str] = set()
        for s in samples:
            if not s.key or "." in s.key or "/" in s.key:
                raise ConversionError(f"{split}: bad sample key {s.key!r} for {s.origin}")
            if s.key in seen:
                raise ConversionError(f"{split}: two samples have the key {s.key!r} ({s.origin})")
            seen.add(s.key)


# ---------------------------------------------------------------- workers


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same bytes in give the same tar out, on any machine, at any time.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _encoded_size(args: tuple[Encoder, Sample]) -> int | None:
    encoder, sample = args
    try:
        return len(encoder(sample).data)
    except BadSample:
        return None


def _reusable(job: ShardJob) -> dict[str, Any] | None:
    """The shard's sidecar, if the shard at the destination was built from these inputs."""
    try:
        side = json.loads(job.dest.store.get(job.name + SIDECAR))
    except (storage.NotFound, ValueError):
        return None
    if side.get("plan") != job.plan:
        return None
    if not job.dest.matches(job.name, side.get("bytes", -1), side.get("fingerprint", "")):
        return None
    return side


def _build_shard(job: ShardJob) -> dict[str, Any]:
    """Encode, tar, hash and store one shard, then its sidecar. Returns the sidecar."""
    tmp = os.path.join(job.tmp_dir, f"{job.name}.{os.getpid()}.part")
    skipped: list[dict[str, str]] = []
    converted: list[dict[str, str]] = []
    count = 0
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for sample in job.samples:
            try:
                enc = job.encoder(sample)
            except BadSample as err:
                skipped.append({"path": sample.origin, "reason": str(err)})
                continue
            if enc.note:
                converted.append({"path": sample.origin, "reason": enc.note})
            _add_member(tar, f"{sample.key}.{enc.ext}", enc.data)
            _add_member(tar, f"{sample.key}.cls", str(sample.label).encode())
            count += 1
    size, sha = os.path.getsize(tmp), storage.sha256_file(tmp)
    fingerprint = job.dest.put_shard(tmp, job.name, sha)
    side = {
        "name": job.name,
        "samples": count,
        "bytes": size,
        "sha256": sha,
        "fingerprint": fingerprint,
        "plan": job.plan,
        "skipped": skipped,
        "converted": converted,
    }
    job.dest.store.put(job.name + SIDECAR, json.dumps(side, indent=1).encode())
    return side


class _Runner:
    """multiprocessing.Pool, or plain in-process calls for workers <= 1 (easy to debug)."""

    def __init__(self, workers: int) -> None:
        self.pool = multiprocessing.Pool(workers) if workers > 1 else None

    def imap(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        if self.pool is None:
            return map(fn, items)
        return self.pool.imap_unordered(fn, items)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(map(fn, items)) if self.pool is None else self.pool.map(fn, items, chunksize=1)

    def close(self, *, kill: bool = False) -> None:
        if self.pool is not None:
            (self.pool.terminate if kill else self.pool.close)()
            self.pool.join()


def progress(total: int, desc: str, unit: str = "img") -> Any:
    """A tqdm bar on stderr (a plain fallback where tqdm is not installed, e.g. a GPU box)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    interval = 0.5 if sys.stderr.isatty() else 30.0  # logs get a line every 30 s, not a flood
    return tqdm(total=total, desc=desc, unit=unit, mininterval=interval, file=sys.stderr)


class _PlainProgress:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        log(f"{self.desc}: {self.n}/{self.total}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the whole run


def write_dataset(
    dest_url: str | Dest,
    splits: dict[str, list[Sample]],
    encoder: Encoder,
    *,
    classes: list[str],
    source: dict[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    mean_std_source: str,
    shard_bytes: int = 128 * MB,
    seed: int = 0,
    workers: int | None = None,
    max_bad_fraction: float = 0.001,
    mean_image: Any = None,
    mean_image_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Shard `splits` to dest_url (s3:// or a folder; or a Dest that `prepare_dest` checked
    already) and write manifest.json last.

    `mean_image` (numpy float [3, H, W], 0-255) is written as MEAN_IMAGE just before the
    manifest, which names it in its `mean_image` section with `mean_image_info` (what it is the
    mean of, how many images).

    Raises ConversionError before writing anything if keys are bad or the destination cannot
    be used, and, while writing shards (so before the manifest), as soon as more than
    max_bad_fraction of all samples could not be encoded.
    """
    check_keys(splits)
    if shard_bytes < TAR_RECORD:
        raise ConversionError(f"--shard-size-mb must be at least {TAR_RECORD / MB} (10 KB)")
    dest = _ready(dest_url)
    workers = workers or os.cpu_count() or 1
    total = sum(len(s) for s in splits.values())
    bad_limit = max_bad_fraction * total
    runner = _Runner(workers)
    tmp_dir = dest.make_tmp_dir()
    try:
        jobs = _plan(dest, splits, encoder, shard_bytes, seed, runner, tmp_dir)
        done: dict[str, dict[str, Any]] = {}
        for job, side in zip(jobs, runner.map(_reusable, jobs)):
            if side is not None:
                done[job.name] = side
        todo = [j for j in jobs if j.name not in done]
        log(f"{dest.url}: {len(jobs)} shards planned, {len(done)} already there and skipped")
        if todo and dest.store.exists(MANIFEST):
            # Shards an earlier manifest lists are about to change: withdraw it now, so a run
            # that dies midway does not leave a manifest describing a half-rewritten dataset.
            log(f"{dest.url}: removing the earlier {MANIFEST}; a new one is written at the end")
            dest.store.delete(MANIFEST)
        bad = [item for side in done.values() for item in side["skipped"]]
        _check_bad(bad, total, bad_limit, max_bad_fraction)
        if todo:
            bar = progress(sum(len(j.samples) for j in todo), f"writing {len(todo)} shards")
            for side in runner.imap(_build_shard, todo):
                done[side["name"]] = side
                bar.update(side["samples"] + len(side["skipped"]))
                bad.extend(side["skipped"])
                _check_bad(bad, total, bad_limit, max_bad_fraction)  # stop early, not at the end
            bar.close()
        runner.close()
    except BaseException:
        runner.close(kill=True)
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    manifest = _manifest(
        dest, list(splits), jobs, done, classes, source, mean, std, mean_std_source
    )
    if mean_image is not None:
        manifest["mean_image"] = put_mean_image(dest.store, mean_image, mean_image_info or {})
    dest.store.put(MANIFEST, json.dumps(manifest, indent=1).encode())  # the commit marker
    _remove_stale(dest, {j.name for j in jobs}, set(splits))
    for split, info in manifest["splits"].items():
        log(f"{split}: {info['samples']} samples in {len(info['shards'])} shards")
    log(
        f"wrote {dest.url}/{MANIFEST} ({len(todo)} shards written, {len(jobs) - len(todo)} skipped)"
    )
    return manifest


def _ready(dest: str | Dest) -> Dest:
    """A Dest that prepare_dest checked, or a URL opened and checked now."""
    if not isinstance(dest, str):
        return dest
    opened = open_dest(dest)
    opened.preflight()
    return opened


def _plan(
    dest: Dest,
    splits: dict[str, list[Sample]],
    encoder: Encoder,
    shard_bytes: int,
    seed: int,
    runner: _Runner,
    tmp_dir: str,
) -> list[ShardJob]:
    """Shuffle each split (seeded) and cut it into shards of about shard_bytes."""
    jobs: list[ShardJob] = []
    for split, samples in splits.items():
        # Sort first, so the order the files were listed in does not matter.
        order = sorted(samples, key=lambda s: s.key)
        random.Random(f"{seed}:{split}").shuffle(order)
        sizes = _sizes(order, encoder, seed, runner)
        for i, part in enumerate(plan_shards(sizes, shard_bytes)):
            chosen = tuple(order[j] for j in part)
            name = f"{split}-{i:06d}.tar"
            jobs.append(
                ShardJob(dest, name, chosen, encoder, _plan_digest(chosen, encoder), tmp_dir)
            )
    return jobs


def _sizes(samples: list[Sample], encoder: Encoder, seed: int, runner: _Runner) -> list[int]:
    """Known sizes, or the mean encoded size of a seeded random handful for the unknown ones."""
    unknown = [s for s in samples if s.size is None]
    if not unknown:
        return [s.size or 0 for s in samples]
    probe = random.Random(seed).sample(unknown, min(SIZE_SAMPLE, len(unknown)))
    measured = [n for n in runner.map(_encoded_size, [(encoder, s) for s in probe]) if n]
    guess = int(sum(measured) / len(measured)) if measured else 0
    return [guess if s.size is None else s.size for s in samples]


def _check_bad(bad: list[dict[str, str]], total: int, limit: float, fraction: float) -> None:
    if len(bad) > limit:
        first = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:5])
        raise ConversionError(
            f"found {len(bad)} unreadable or corrupt images among {total} images, more than "
            f"--max-bad-fraction={fraction} allows. First: {first}. Fix or remove them, or raise "
            "--max-bad-fraction. No manifest was written; rerunning resumes."
        )


def _manifest(
    dest: Dest,
    split_names: list[str],
    jobs: list[ShardJob],
    done: dict[str, dict[str, Any]],
    classes: list[str],
    source: dict[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    mean_std_source: str,
) -> dict[str, Any]:
    splits: dict[str, dict[str, Any]] = {s: {"samples": 0, "shards": []} for s in split_names}
    skipped: list[dict[str, str]] = []
    converted: list[dict[str, str]] = []
    for job in jobs:  # planned order: train-000000, train-000001, ..., val-000000, ...
        side = done[job.name]
        split = splits[job.name.rsplit("-", 1)[0]]
        split["samples"] += side["samples"]
        split["shards"].append({k: side[k] for k in ("name", "samples", "bytes", "sha256")})
        skipped.extend(side["skipped"])
        converted.extend(side["converted"])
    return {
        "name": Path(urlparse(dest.url).path).name or dest.url,
        "format": "webdataset",
        "version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": source,
        "classes": classes,
        "num_classes": len(classes),
        "splits": splits,
        "skipped": sorted(skipped, key=lambda b: b["path"]),
        "converted": sorted(converted, key=lambda b: b["path"]),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "mean_std_source": mean_std_source,
    }


def put_mean_image(store: storage.Storage, image: Any, info: dict[str, Any]) -> dict[str, Any]:
    """Store the mean image as float32 .npy; returns the manifest's `mean_image` section (the
    converters' and index_shards' alike)."""
    import numpy as np

    array = np.ascontiguousarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ConversionError(f"mean image of shape {array.shape}: expected [3, H, W]")
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    data = buf.getvalue()
    store.put(MEAN_IMAGE, data)
    return {
        "file": MEAN_IMAGE,
        "shape": list(array.shape),
        "dtype": "float32",
        "scale": "0-255 RGB",
        "sha256": hashlib.sha256(data).hexdigest(),
        **info,
    }


def _remove_stale(dest: Dest, current: set[str], splits: set[str]) -> None:
    """Delete shards (and sidecars) an earlier, larger run left that the manifest does not list."""
    for name in dest.store.list_files():
        m = SHARD_NAME.match(name)
        if m and m["split"] in splits and name.removesuffix(SIDECAR) not in current:
            dest.store.delete(name)


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main() (it reads sys.argv) under orchestrator.cli.run_cli: a
    ConversionError prints as one clear line and exits 2, Ctrl-C exits 130."""
    raise SystemExit(cli.run_cli(lambda _argv: main()))


def add_shard_arguments(p: argparse.ArgumentParser) -> None:
    """The options every converter takes: where the shards go, their size, cores, shuffle seed
    (checked by `check_shard_arguments`)."""
    p.add_argument(
        "--dest",
        required=True,
        help="s3://BUCKET/PREFIX (credentials and endpoint from the AWS_* variables) "
        "or a local folder",
    )
    p.add_argument(
        "--shard-size-mb",
        type=float,
        default=128,
        help="target shard size in MB of 10^6 bytes (default 128)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count(),
        help="processes building shards (default: all cores)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace the conversion of another --src that --dest holds (refused without it)",
    )


def check_shard_arguments(args: argparse.Namespace) -> None:
    """Refuse a bad shard option at once, naming the flag and the fix (before any scan)."""
    size = args.shard_size_mb
    if not math.isfinite(size) or size * MB < TAR_RECORD:
        raise ConversionError(
            f"--shard-size-mb {size}: give a number of MB of at least {TAR_RECORD / MB} (one "
            "tar record; 128 is the usual size)"
        )
    if args.workers is None or args.workers < 1:
        raise ConversionError(
            f"--workers {args.workers}: give a number of processes >= 1 (default: all cores)"
        )
    bad = getattr(args, "max_bad_fraction", 0.0)
    if not 0 <= bad <= 1:  # nan fails both
        raise ConversionError(
            f"--max-bad-fraction {bad}: give a fraction between 0 and 1 (default 0.001)"
        )
