"""The input pipeline: WebDataset shards (local, http(s) or s3://) -> uint8 batches per rank.

Dataset layout (written by datasets/*.py): a root URL holding `{split}-NNNNNN.tar` shards, each
sample a `<key>.jpg|png` + `<key>.cls` (decimal class) pair, and `manifest.json`, written last
as the dataset's commit marker (per-shard sample counts, classes, mean/std). Nothing is read
without a manifest: the counts it holds are what make exact epochs possible without a scan.

Epoch semantics, `epoch_mode="exact"` (the default)
---------------------------------------------------
For epoch e, with N samples in the split, W ranks, B = batch_size, K = max(1, num_workers):
1. The shard list is permuted by (seed, epoch): identical on every rank, so `seed` must be the
   job's seed, not seed + rank. Concatenated, the shards form one global sequence of N samples.
2. Rank r owns the contiguous slice [N*r//W, N*(r+1)//W) (sizes differ by at most one).
   Slices cross shard boundaries freely: a reader skips the first k samples of a shard without
   decoding them, and stops reading where its slice ends.
3. Every rank yields exactly M = ceil(N / (W*B)) batches (`batches_per_epoch`), so DDP never
   waits on a rank that ran dry. A rank holding n samples fills its M batches front to back:
   with q, d = divmod(M*B - n, M), every batch has B - q samples and the last d batches one
   fewer (`batch_sizes`). For a large dataset q = 0: full batches, then at most B batches at
   the end one sample short. Every sample of the split is seen exactly once per epoch.
4. Batch j of a rank comes from DataLoader worker j % K (the DataLoader visits workers round
   robin). Worker w reads the contiguous part of the rank's slice that its batches need, and a
   shuffle buffer (`shuffle_buffer` samples, seeded by (seed, epoch, rank, w)) mixes the order.
The buffer is simulated on sample positions up front (`shuffle_order`), so the emission order is
known before a byte is read; only raw bytes wait in memory, and only samples that are emitted
get decoded.

`epoch_mode="resampled"`: each worker draws whole shards with replacement (seeded by (seed,
epoch, rank, worker)) through the same shuffle buffer; every batch is full, and an epoch is
`samples_per_epoch` samples (0 = the split's size) in M = ceil(that / (W*B)) batches per rank.

Augmentation randomness is a function of (seed, epoch, shard, index in shard) (plus the draw
number in resampled mode), never of worker state, so the pixels do not depend on W or K.

Resume: `set_epoch(e, start_batch=k)` yields batches k..M-1 of the uninterrupted epoch, pixel
for pixel, provided W, B, K, shuffle_buffer and seed are unchanged (change any of them and
restart at an epoch boundary instead). Workers skip what came before without decoding it
(bytes are still read: a tar stream has no index). Bad-sample substitutes (below) resume
exactly too, except in a worker whose last batches hold no good sample at all. With
decode=gpu/split the samples, labels and order resume exactly; which samples the workers
augment follows the split's share, so split pixels repeat only with a fixed share.

Bad data: a sample that fails to decode, lacks its image or label, or is missing because its
shard is truncated or unreadable is counted, logged (key and shard URL) and replaced, so batch
counts and sizes never change: its slot gets a copy of the nearest good sample of the same
batch (or, for a batch with no good sample at all, of the first good sample of the worker's
next batch; at the very end of a worker, of its last good one). Once `bad_check_after`
samples have been seen, a rank whose bad fraction exceeds `max_bad_fraction` stops with a
`DataError` naming the shards. Eval loaders skip bad samples instead (no duplicates in a
score), with the same logging and limit. A worker that dies, or sends nothing for `timeout_s`,
raises in the training process (DataLoader timeout): never a silent hang.

Streams: s3:// objects are read through boto3 (orchestrator.s3 clients, one per process) as a
stream; a connection that breaks mid-shard is reopened with a Range request from the byte
reached, with backoff, for up to `io_retry_s` seconds, so an object store restarting mid-epoch
costs a pause, not the epoch. The same handler is registered with WebDataset's `gopen` for
s3:// URLs, so `webdataset.WebDataset("s3://...")` works too. http(s) URLs get the same
treatment through urllib; anything else is a local path. Shards are read by a forward-only
tar reader of our own (`_tar_files`).

Hand-off: each worker writes its decode=cpu batches into a ring of `prefetch_factor + 2`
shared-memory buffers that the training process views in place (orchestrator.batch_ring), not
into a fresh segment per batch as torch's collate does. A buffer is written again only once
every tensor viewing it is gone, so a loop may keep batches: they then travel the usual way.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import logging
import multiprocessing
import re
import tarfile
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from orchestrator import s3
from orchestrator import transforms as T
from orchestrator.batch_ring import BatchRing, RingWriter, SlotRef
from orchestrator.spec import DataConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0-255 scale, RGB
IMAGENET_STD = (58.395, 57.12, 57.375)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
_READ_BUFSIZE = 1 << 20  # storage is read in 1 MiB requests


class DataError(RuntimeError):
    """The dataset cannot be used as configured; the message says which URL or shards."""


# ============================================================================================
# manifest


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def load_manifest(url: str) -> dict[str, Any]:
    """Read and check `URL/manifest.json`; a clear error if the dataset has none (incomplete
    upload or wrong URL) or it is not a version-1 WebDataset manifest."""
    murl = _join(url, "manifest.json")
    try:
        if s3.is_s3(url):
            raw = s3.read_bytes(murl)
        elif url.startswith(("http://", "https://")):
            with urllib.request.urlopen(murl, timeout=60) as resp:
                raw = resp.read()
        else:
            with open(murl, "rb") as f:
                raw = f.read()
    except Exception as err:  # whichever client failed: one message
        missing = isinstance(err, FileNotFoundError) or "NoSuchKey" in str(err) or "404" in str(err)
        why = (
            "it has no manifest.json (not written yet: an unfinished or failed conversion?)"
            if missing
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


# ============================================================================================
# streams: local files, http(s) and s3 objects that survive a dropped connection


class _Permanent(Exception):
    """Wraps an error that retrying cannot fix (missing object, access denied)."""


class ReopeningStream(io.RawIOBase):
    """A read-only byte stream over `open_at(offset) -> (body, remaining bytes or None)`.

    A read that fails mid-way closes the body and calls open_at(bytes reached) again (a Range
    request), backing off 0.5 s, 1 s, 2 s ... (at most 8 s) for up to `retry_s` seconds in all.
    """

    def __init__(
        self, url: str, open_at: Callable[[int], tuple[Any, int | None]], *, retry_s: float = 120.0
    ):
        super().__init__()
        self.url = url
        self._open_at = open_at
        self._retry_s = retry_s
        self._body: Any = None
        self._pos = 0
        self._end: int | None = None
        self.reopens = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if len(buf) == 0:
            return 0
        first_failure: float | None = None
        delay = 0.5
        while True:
            try:
                if self._body is None:
                    if self._end is not None and self._pos >= self._end:
                        return 0
                    self._body, remaining = self._open_at(self._pos)
                    if remaining is not None:
                        self._end = self._pos + remaining
                data = self._body.read(len(buf))
                if not data and self._end is not None and self._pos < self._end:
                    raise ConnectionError(f"stream ended at byte {self._pos} of {self._end}")
                buf[: len(data)] = data
                self._pos += len(data)
                return len(data)
            except _Permanent as err:
                raise err.args[0] from None
            except Exception as err:  # network errors come in many classes
                self._close_body()
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure + delay > self._retry_s:
                    raise OSError(
                        f"{self.url}: gave up at byte {self._pos} after "
                        f"{now - first_failure:.0f} s: {err}"
                    ) from err
                log.warning(
                    "%s: read failed at byte %d (%s); reopening in %.1f s",
                    self.url,
                    self._pos,
                    err,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
                self.reopens += 1

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail too
                body.close()

    def close(self) -> None:
        self._close_body()
        super().close()


def _s3_open_at(url: str) -> Callable[[int], tuple[Any, int | None]]:
    bucket, key = s3.split_url(url)

    def open_at(offset: int) -> tuple[Any, int | None]:
        from botocore.exceptions import ClientError

        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        try:
            resp = s3.client().get_object(**kwargs)
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = err.response.get("Error", {}).get("Code", "")
            if status == 416 or code == "InvalidRange":  # offset == size: nothing left
                return io.BytesIO(b""), 0
            if status == 404 or code in ("NoSuchKey", "NoSuchBucket"):
                raise _Permanent(FileNotFoundError(f"{url}: {code or status}: {err}")) from err
            # anything else is retried, 403 included: the manifest was just read with the same
            # credentials, and a restarting store refuses keys until it has reloaded them
            raise
        return resp["Body"], int(resp["ContentLength"])

    return open_at


def _http_open_at(url: str) -> Callable[[int], tuple[Any, int | None]]:
    def open_at(offset: int) -> tuple[Any, int | None]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
        except urllib.error.HTTPError as err:
            if err.code == 416:
                return io.BytesIO(b""), 0
            if err.code < 500:
                raise _Permanent(FileNotFoundError(f"{url}: HTTP {err.code}")) from err
            raise
        if offset and resp.status != 206:  # server ignored Range: skip what we already have
            resp.read(offset)
        length = resp.headers.get("Content-Length")
        return resp, int(length) if length is not None else None

    return open_at


class _Counted:
    """Adds the bytes read through it to counter[0] (for the bytes/s metric)."""

    def __init__(self, f: Any, counter: list[int]):
        self.f, self.counter = f, counter

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.counter[0] += len(data)
        return data

    def close(self) -> None:
        self.f.close()


def open_url(url: str, *, retry_s: float = 120.0) -> io.BufferedIOBase:
    """Open a shard for streaming: s3://, http(s):// (both resuming after dropped
    connections) or a local path / file:// URL."""
    if s3.is_s3(url):
        return io.BufferedReader(
            ReopeningStream(url, _s3_open_at(url), retry_s=retry_s), _READ_BUFSIZE
        )
    if url.startswith(("http://", "https://")):
        return io.BufferedReader(
            ReopeningStream(url, _http_open_at(url), retry_s=retry_s), _READ_BUFSIZE
        )
    return open(url.removeprefix("file://"), "rb", buffering=_READ_BUFSIZE)


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> io.BufferedIOBase:
    """WebDataset gopen handler for s3:// (boto3 streaming; no `aws` CLI subprocess)."""
    if mode != "rb":
        raise ValueError(f"{url}: only reading is supported (mode {mode!r})")
    return open_url(url)


def register_webdataset_handler() -> bool:
    """Make `webdataset` open s3:// URLs with `gopen_s3`. False when webdataset is absent
    (this module does not need it: the GPU test machines have only torch)."""
    try:
        # the module, not the function of the same name that `webdataset` re-exports
        wds_gopen = importlib.import_module("webdataset.gopen")
    except ImportError:
        return False
    wds_gopen.gopen_schemes["s3"] = gopen_s3
    return True


register_webdataset_handler()


# ============================================================================================
# tar -> samples


_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key = path to first dot


@dataclass
class RawSample:
    """One sample's bytes (or why it has none), with where it came from."""

    shard: int  # index in the manifest's shard list
    index: int  # position inside the shard
    url: str
    key: str = ""
    image: bytes | None = None
    label: int = -1
    error: str | None = None  # None = usable
    salt: tuple[int, ...] = ()  # extra augmentation seed words (resampled mode)


_TAR_BLOCK = 512
_TAR_END = bytes(_TAR_BLOCK)


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _read_exact(f: Any, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"tar stream ends inside a member ({len(data)} of {n} bytes)")
    return data


def _tar_files(f: Any) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream, forward only: ustar, GNU long names
    and pax paths (what tarfile, GNU tar and WebDataset's writers produce); other members
    (directories, links) are skipped. Half the CPU of tarfile's stream mode, which parses
    every header field, twice for the checksum. tarfile.ReadError on a damaged header,
    EOFError where the stream stops inside a member."""
    long_name: str | None = None
    while True:
        header = f.read(_TAR_BLOCK)
        if not header or header == _TAR_END:
            return
        if len(header) < _TAR_BLOCK:
            raise EOFError("tar stream ends inside a header")
        try:
            stored = _tar_number(header[148:156])
        except ValueError:
            stored = -1
        if sum(header) - sum(header[148:156]) + 8 * ord(" ") != stored:
            raise tarfile.ReadError("bad tar header checksum (a damaged shard?)")
        size, kind = _tar_number(header[124:136]), header[156:157]
        data = _read_exact(f, size)
        _read_exact(f, -size % _TAR_BLOCK)
        if kind == b"L":  # GNU: the next member's name
            long_name = data.split(b"\0", 1)[0].decode()
        elif kind == b"x":  # pax: "LEN key=value\n" records for the next member
            for record in data.split(b"\n"):
                key, _, value = record.partition(b" ")[2].partition(b"=")
                if key == b"path":
                    long_name = value.decode()
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
            yield long_name or (f"{prefix}/{name}" if prefix else name), data
            long_name = None
        elif kind != b"g":  # a global pax header applies to all; anything else is not a file
            long_name = None


def _tar_groups(f: Any) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index, key, {ext: bytes}) for each run of tar members sharing a key."""
    index, key, files = -1, None, {}
    for name, data in _tar_files(f):
        match = _KEY_EXT.match(name)
        if match is None:
            continue
        k, ext = match.group(1), match.group(2).lower()
        if k != key:
            if key is not None:
                yield index, key, files
            index, key, files = index + 1, k, {}
        files[ext] = data
    if key is not None:
        yield index, key, files


def _to_sample(shard: int, index: int, url: str, key: str, files: dict[str, bytes]) -> RawSample:
    sample = RawSample(shard, index, url, key)
    sample.image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if sample.image is None:
        sample.error = f"no image member (has {sorted(files)})"
    elif "cls" not in files:
        sample.error = "no .cls member"
    else:
        try:
            sample.label = int(files["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            sample.error = f"bad .cls {files['cls'][:20]!r}"
    return sample


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of shard `shard` (manifest index)."""

    shard: int
    start: int
    stop: int
    salt: tuple[int, ...] = ()


def read_segment(
    seg: Segment,
    url: str,
    want: Callable[[int], bool],
    counter: list[int],
    *,
    retry_s: float = 120.0,
) -> Iterator[RawSample | None]:
    """Exactly one item per index in [seg.start, seg.stop): a RawSample for wanted indices
    (possibly with `error` set), None for the others. Missing samples (truncated or unreadable
    shard) come out as RawSamples with an error, so positions never shift."""
    reached = seg.start
    error = "shard holds fewer samples than its manifest says (truncated?)"
    f: Any = None
    try:
        f = _Counted(open_url(url, retry_s=retry_s), counter)
        for index, key, files in _tar_groups(f):
            if index < seg.start:
                continue
            if index >= seg.stop:
                break
            sample = _to_sample(seg.shard, index, url, key, files) if want(index) else None
            if sample is not None:
                sample.salt = seg.salt
            reached = index + 1
            yield sample
            if reached >= seg.stop:
                break
    except (tarfile.TarError, OSError, EOFError) as err:
        error = f"unreadable or truncated shard: {err}"
    finally:
        if f is not None:
            f.close()
    if reached < seg.stop:
        log.warning(
            "%s: %d of its samples [%d, %d) missing: %s",
            url,
            seg.stop - reached,
            seg.start,
            seg.stop,
            error,
        )
        for index in range(reached, seg.stop):
            yield (
                RawSample(seg.shard, index, url, f"#{index}", error=error, salt=seg.salt)
                if want(index)
                else None
            )


# ============================================================================================
# epoch planning: pure functions of the manifest counts and (seed, epoch, rank, worker)


def batches_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """M = ceil(total / (world_size * batch_size)), the same on every rank."""
    return -(-total // (world_size * batch_size))


def batch_sizes(n: int, num_batches: int, batch_size: int) -> list[int]:
    """Split n samples into num_batches batches of at most batch_size, front-loaded: all have
    batch_size - q samples, the last d one fewer, where q, d = divmod(num_batches*batch_size - n,
    num_batches)."""
    short = num_batches * batch_size - n
    if short < 0 or n < num_batches:
        raise DataError(
            f"{n} samples cannot fill {num_batches} batches of 1..{batch_size} samples: the split "
            "is too small for this world_size and batch_size"
        )
    q, d = divmod(short, num_batches)
    return [batch_size - q - (1 if i >= num_batches - d else 0) for i in range(num_batches)]


def rank_slice(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous [lo, hi) of the global sequence; sizes differ by at most 1."""
    return total * rank // world_size, total * (rank + 1) // world_size


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard permutation: identical on every rank."""
    return np.random.default_rng([seed, epoch, 0]).permutation(num_shards)


def segments_for(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[Segment]:
    """The pieces of shards covering global positions [lo, hi) of the shards concatenated in
    `order`."""
    segs, start = [], 0
    for shard in order:
        end = start + counts[shard]
        a, b = max(lo, start), min(hi, end)
        if a < b:
            segs.append(Segment(int(shard), a - start, b - start))
        start = end
        if start >= hi:
            break
    return segs


def shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer over a stream of n items (positions 0..n-1): fill the
    buffer, then each arriving item replaces a random buffered one, which is emitted; the rest
    leave in random order at the end. Output t is always among the first t + buffer + 1
    arrivals, so a reader never holds more than `buffer` samples it has read but not emitted."""
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    fill = min(buffer, n)
    buf = list(range(fill))
    picks = rng.integers(0, fill, size=max(n - fill, 0))
    out = np.empty(n, dtype=np.int64)
    for i, p in enumerate(range(fill, n)):
        k = picks[i]
        out[i] = buf[k]
        buf[k] = p
    tail = np.array(buf, dtype=np.int64)
    rng.shuffle(tail)
    out[n - fill :] = tail
    return out


@dataclass
class WorkerPlan:
    """What one DataLoader worker reads and emits."""

    segments: list[Segment]  # read in this order; their samples are stream positions 0..L-1
    order: np.ndarray  # stream positions in emission order
    sizes: list[int]  # the batches to emit, after the skipped ones
    skip: int = 0  # leading entries of `order` already emitted before a resume (not decoded)


def plan_train_worker(
    counts: Sequence[int],
    *,
    mode: str,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    slot: int,
    start_batch: int,
    shuffle_buffer: int,
    samples_per_epoch: int = 0,
) -> WorkerPlan:
    """The plan of DataLoader worker `slot` when the epoch starts at `start_batch`.

    Slot s handles global batches start_batch + s, start_batch + s + K, ...: those of the
    original worker w = (start_batch + s) % K from its local batch (start_batch + s) // K on.
    """
    k = max(1, num_workers)
    total = sum(counts)
    w = (start_batch + slot) % k
    first_local = (start_batch + slot) // k
    if mode == "exact":
        m = batches_per_epoch(total, world_size, batch_size)
        lo, hi = rank_slice(total, world_size, rank)
        sizes = batch_sizes(hi - lo, m, batch_size)
        per_worker = [sum(sizes[j::k]) for j in range(k)]
        wlo = lo + sum(per_worker[:w])
        segs = segments_for(counts, shard_order(len(counts), seed, epoch), wlo, wlo + per_worker[w])
        local = sizes[w::k]
    else:
        m = batches_per_epoch(samples_per_epoch or total, world_size, batch_size)
        local = [batch_size] * len(range(w, m, k))
        need, segs = sum(local), []
        draw = np.random.default_rng([seed, epoch, 3, rank, w])
        while need > 0:
            shard = int(draw.integers(len(counts)))
            take = min(counts[shard], need)
            if take:
                segs.append(Segment(shard, 0, take, salt=(1, rank, w, len(segs))))
            need -= take
    n = sum(s.stop - s.start for s in segs)
    order = shuffle_order(n, shuffle_buffer, np.random.default_rng([seed, epoch, 1, rank, w]))
    return WorkerPlan(segs, order, local[first_local:], skip=sum(local[:first_local]))


def augmentation_rng(seed: int, epoch: int, sample: RawSample) -> np.random.Generator:
    """The per-sample generator: a function of the sample's identity, not of worker state."""
    return np.random.default_rng([seed, epoch, 2, sample.shard, sample.index, *sample.salt])


# ============================================================================================
# decoding in workers


def train_transform(cfg: DataConfig) -> Callable[[bytes, np.random.Generator], np.ndarray]:
    """cfg.train_transform as a function (bytes, rng) -> uint8 [3, S, S]."""
    if cfg.train_transform == "paper":
        return functools.partial(T.paper_train, size=cfg.image_size, scale_range=cfg.scale_range)
    if cfg.train_transform == "rrc":
        return functools.partial(T.rrc_train, size=cfg.image_size)
    return functools.partial(T.cifar_train, size=cfg.image_size)


def _checked_jpeg(data: bytes) -> np.ndarray:
    """A JPEG whose header parses (the device decodes the rest), as a uint8 array."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG: decode=gpu/split need JPEG shards")
    T.image_size(data)  # raises on a header no decoder can read
    return np.frombuffer(data, dtype=np.uint8)


@dataclass(frozen=True)
class MixedBatch:
    """A decode=gpu/split batch of B samples: the first len(pixels) decoded and augmented by
    the loader's workers, the other B - len(pixels) as JPEG files for the training device to
    decode (nvJPEG) and augment. The batch's labels follow the same order."""

    pixels: torch.Tensor  # uint8 [k, 3, S, S]
    jpeg_data: torch.Tensor  # uint8 [total bytes]: the JPEG files back to back
    jpeg_ends: torch.Tensor  # int64 [B - k]: where each file ends in jpeg_data

    def __len__(self) -> int:
        return len(self.pixels) + len(self.jpeg_ends)

    def jpegs(self) -> list[torch.Tensor]:
        """The JPEG files as uint8 views into jpeg_data."""
        ends = self.jpeg_ends.tolist()
        starts = [0, *ends][: len(ends)]
        return [self.jpeg_data[a:b] for a, b in zip(starts, ends, strict=True)]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MixedBatch:
        """Pixels to `device`; the JPEG bytes stay on the host, where nvJPEG reads them."""
        pixels = self.pixels.to(device, non_blocking=non_blocking)
        return MixedBatch(pixels, self.jpeg_data, self.jpeg_ends)

    def pin_memory(self) -> MixedBatch:
        """Called by the DataLoader's pinning thread, as for a tensor."""
        return MixedBatch(*(t.pin_memory() for t in (self.pixels, self.jpeg_data, self.jpeg_ends)))


def eval_transform(
    cfg: DataConfig, views: str, scale: int | None = None
) -> Callable[[bytes], np.ndarray]:
    """An eval view as a function bytes -> uint8 array: `center` [3,S,S], `ten_crop`
    [10,3,S,S], `full` [3,H,W] (shorter side `scale`, default eval_resize). For CIFAR
    (train_transform="cifar") the centre view is the original image."""
    if views == "center":
        if cfg.train_transform == "cifar":
            return functools.partial(T.cifar_eval, size=cfg.image_size)
        return functools.partial(T.center_view, size=cfg.image_size, resize=cfg.eval_resize)
    if views == "ten_crop":
        return functools.partial(T.ten_crop_view, size=cfg.image_size, resize=cfg.eval_resize)
    if views == "full":
        return functools.partial(T.full_view, resize=scale or cfg.eval_resize)
    raise ValueError(f"views={views!r}: expected 'center', 'ten_crop' or 'full'")


def _decode_or_error(fn: Callable[[], np.ndarray], sample: RawSample) -> np.ndarray | None:
    if sample.error is None:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds for corrupt data
            sample.error = f"decode failed: {type(err).__name__}: {err}"
    if not sample.error.startswith(("unreadable", "shard holds")):  # truncation: logged per shard
        log.warning("bad sample %s in %s: %s", sample.key, sample.url, sample.error)
    return None


def _positions(
    plan: WorkerPlan, shards: Sequence[Shard], counter: list[int], retry_s: float
) -> Iterator[RawSample | None]:
    """The worker's stream: one item per stream position, bytes only for positions emitted
    after `plan.skip` (None for the others)."""
    needed = np.zeros(len(plan.order), dtype=bool)
    needed[plan.order[plan.skip :]] = True
    base = 0  # stream position of the current segment's first sample
    for seg in plan.segments:

        def want(index: int, base: int = base, start: int = seg.start) -> bool:
            return bool(needed[base + index - start])

        yield from read_segment(seg, shards[seg.shard].url, want, counter, retry_s=retry_s)
        base += seg.stop - seg.start


def _info(seen: int, bad: list[RawSample], nbytes: int) -> dict[str, Any]:
    return {
        "seen": seen,
        "bad": len(bad),
        "bytes": nbytes,
        "bad_shards": sorted({s.url for s in bad}),
        "bad_examples": [f"{s.key} in {s.url}: {s.error}" for s in bad[:3]],
    }


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch tensor; in a DataLoader worker, allocated in shared memory at once.

    A tensor made in private memory is copied to shared memory when it is sent to the main
    process, and workers then kept the private pages: +2 MB of RSS per batch, measured. (The
    default collate function allocates in shared memory for the same reason.)
    """
    tensor = torch.empty(shape, dtype=dtype)
    return tensor.share_memory_() if get_worker_info() is not None else tensor


# one good sample of a batch: (uint8 pixels [3,S,S] or JPEG bytes [n], label, decoded here?)
_Item = tuple[np.ndarray, int, bool]
# (images, labels), or a ring slot that unpickles to them in the training process
_Batch = tuple[torch.Tensor | MixedBatch, torch.Tensor] | SlotRef


def _train_batches(
    plan: WorkerPlan,
    shards: Sequence[Shard],
    cfg: DataConfig,
    seed: int,
    epoch: int,
    cpu_share: Callable[[], float] = lambda: 1.0,
    ring: RingWriter | None = None,
) -> Iterator[tuple[_Batch, dict[str, Any]]]:
    """Decode, augment and batch one worker's share of an epoch; bad samples replaced.

    decode=cpu: every sample is decoded here, and batches go into `ring`'s slots when it has a
    free one. gpu/split: the first round(cpu_share() * size) samples of each batch are (gpu:
    none), the rest only have their JPEG header checked."""
    transform = train_transform(cfg)
    stream = _positions(plan, shards, counter := [0], cfg.io_retry_s)
    pending: dict[int, RawSample | None] = {}
    arrived = 0
    cursor = plan.skip
    held: list[tuple[list[RawSample], int, int]] = []  # batches with no good sample yet
    last_good: _Item | None = None
    bytes_seen = 0
    for bsize in plan.sizes:
        here = {"cpu": bsize, "gpu": 0, "split": round(cpu_share() * bsize)}[cfg.decode]
        items: list[_Item | None] = []
        bad: list[RawSample] = []
        for slot, pos in enumerate(plan.order[cursor : cursor + bsize]):
            while pos not in pending:  # read ahead until this position has arrived
                pending[arrived] = next(stream)
                arrived += 1
                if pending[arrived - 1] is None:
                    del pending[arrived - 1]
            sample = pending.pop(int(pos))
            assert sample is not None
            if slot < here:
                work = lambda s=sample: transform(s.image, augmentation_rng(seed, epoch, s))
            else:
                work = lambda s=sample: _checked_jpeg(s.image)
            pixels = _decode_or_error(work, sample)
            items.append(None if pixels is None else (pixels, sample.label, slot < here))
            if pixels is None:
                bad.append(sample)
        cursor += bsize
        nbytes, bytes_seen = counter[0] - bytes_seen, counter[0]
        good = [item for item in items if item is not None]
        if not good:  # filled from the next good batch
            held.append((bad, bsize, nbytes))
            if len(held) * bsize >= max(cfg.bad_check_after, 1) and last_good is None:
                raise DataError(
                    f"no decodable sample in {sum(h[1] for h in held)} samples; "
                    f"e.g. {bad[0].key} in {bad[0].url}: {bad[0].error}"
                )
            continue
        for h_bad, h_size, h_bytes in held:
            yield _batch([good[0]] * h_size, cfg, ring), _info(h_size, h_bad, h_bytes)
        held.clear()
        last_good = good[-1]
        yield _batch(_fill(items), cfg, ring), _info(bsize, bad, nbytes)
    for h_bad, h_size, h_bytes in held:  # a bad tail: repeat the last good
        if last_good is None:
            raise DataError(
                f"no decodable sample in this worker's share; "
                f"e.g. {h_bad[0].key} in {h_bad[0].url}: {h_bad[0].error}"
            )
        yield _batch([last_good] * h_size, cfg, ring), _info(h_size, h_bad, h_bytes)


def _fill(items: list[_Item | None]) -> list[_Item]:
    """Give each bad slot a copy of the nearest good slot (the previous one if any)."""
    first = next(item for item in items if item is not None)
    out: list[_Item] = []
    for item in items:
        out.append(item if item is not None else (out[-1] if out else first))
    return out


def _batch(items: list[_Item], cfg: DataConfig, ring: RingWriter | None = None) -> _Batch:
    """(images, labels), in shared memory when made in a worker (in a slot of `ring` when it
    has a free one): decode=cpu gives uint8 [B,3,S,S]; gpu/split give a MixedBatch, with the
    labels reordered to match it."""
    decoded = [item for item in items if item[2]]
    files = [item for item in items if not item[2]]
    size = cfg.image_size
    taken = ring.take((len(items), 3, size, size)) if ring and cfg.decode == "cpu" else None
    if taken is not None:
        slot_pixels, slot_labels, ref = taken
        slot_labels[:] = [label for _, label, _ in decoded]
        for i, (image, _, _) in enumerate(decoded):
            slot_pixels[i] = image
        return ref
    labels = _batch_tensor((len(items),), torch.int64)
    labels.numpy()[:] = [label for _, label, _ in decoded + files]
    pixels = _batch_tensor((len(decoded), 3, size, size), torch.uint8)
    arr = pixels.numpy()
    for slot, (image, _, _) in enumerate(decoded):
        arr[slot] = image
    if cfg.decode == "cpu":
        return pixels, labels
    ends = np.cumsum([len(data) for data, _, _ in files], dtype=np.int64)
    jpeg_data = _batch_tensor((int(ends[-1]) if len(ends) else 0,), torch.uint8)
    flat = jpeg_data.numpy()
    for (data, _, _), stop in zip(files, ends, strict=True):
        flat[stop - len(data) : stop] = data
    jpeg_ends = _batch_tensor((len(files),), torch.int64)
    jpeg_ends.numpy()[:] = ends
    return MixedBatch(pixels, jpeg_data, jpeg_ends), labels


class _TrainEpoch(IterableDataset):
    """One epoch of one rank; each DataLoader worker plays its slot of the plan."""

    def __init__(
        self, loader: TrainLoader, epoch: int, start_batch: int, ring: BatchRing | None = None
    ):
        super().__init__()
        self.ring = ring
        self.cfg, self.shards = loader.cfg, loader.shards
        self.seed, self.epoch, self.start_batch = loader.seed, epoch, start_batch
        self.rank, self.world_size, self.batch_size = (
            loader.rank,
            loader.world_size,
            loader.batch_size,
        )
        self.cpu_share = loader._cpu_share  # shared memory: workers see the loop's changes

    def __iter__(self) -> Iterator[tuple[_Batch, dict[str, Any]]]:
        info = get_worker_info()
        plan = plan_train_worker(
            [s.samples for s in self.shards],
            mode=self.cfg.epoch_mode,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            num_workers=self.cfg.num_workers,
            slot=info.id if info is not None else 0,
            start_batch=self.start_batch,
            shuffle_buffer=self.cfg.shuffle_buffer,
            samples_per_epoch=self.cfg.samples_per_epoch,
        )
        share = self.cpu_share
        ring = self.ring.writer(info.id) if self.ring is not None and info is not None else None
        return _train_batches(
            plan, self.shards, self.cfg, self.seed, self.epoch, lambda: share.value, ring
        )


def _dataloader(dataset: IterableDataset, cfg: DataConfig) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=None,  # workers hand over whole batches
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        timeout=cfg.timeout_s if workers else 0,  # a dead or stuck worker: an error, not a hang
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=False,  # each epoch has its own plan
    )


@dataclass
class _Totals:
    samples: int = 0
    bytes: int = 0
    seen: int = 0
    bad: int = 0
    batches: int = 0
    seconds: float = 0.0
    bad_shards: set[str] = field(default_factory=set)
    bad_examples: list[str] = field(default_factory=list)


def _account(totals: _Totals, cfg: DataConfig, info: dict[str, Any], n: int, what: str) -> None:
    totals.samples += n
    totals.batches += 1
    totals.bytes += info["bytes"]
    totals.seen += info["seen"]
    totals.bad += info["bad"]
    totals.bad_shards.update(info["bad_shards"])
    totals.bad_examples.extend(info["bad_examples"][: max(0, 5 - len(totals.bad_examples))])
    if totals.seen >= cfg.bad_check_after and totals.bad > cfg.max_bad_fraction * totals.seen:
        raise DataError(
            f"{what}: {totals.bad} of {totals.seen} samples bad ({totals.bad / totals.seen:.1%} > "
            f"max_bad_fraction {cfg.max_bad_fraction:.1%}) in shards: "
            f"{', '.join(sorted(totals.bad_shards))}"
            f"; e.g. {'; '.join(totals.bad_examples)}"
        )


def _stats(totals: _Totals) -> dict[str, float]:
    secs = max(totals.seconds, 1e-9)
    return {
        "samples": float(totals.samples),
        "batches": float(totals.batches),
        "seconds": totals.seconds,
        "samples_per_s": totals.samples / secs,
        "bytes": float(totals.bytes),
        "bytes_per_s": totals.bytes / secs,
        "bad_samples": float(totals.bad),
        "bad_fraction": totals.bad / totals.seen if totals.seen else 0.0,
    }


# ============================================================================================
# public loaders


class TrainLoader:
    """The training batches of one rank, one epoch per iteration (see the module docstring).

        loader = TrainLoader(cfg, rank=r, world_size=w, batch_size=32, seed=0)
        for epoch in range(start_epoch, epochs):
            loader.set_epoch(epoch, start_batch=k if epoch == start_epoch else 0)
            for images, labels in loader:  # uint8 [B,3,S,S] NCHW (pinned with CUDA), int64 [B]
                ...  # decode=gpu/split: images is a MixedBatch

    Without set_epoch, each completed pass moves on to the next epoch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        device: torch.device | str | None = None,
    ):
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"rank {rank} / world_size {world_size} / batch_size {batch_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.device = device  # only used by the synthetic source
        self._epoch, self._start = 0, 0
        self._totals = _Totals()
        self._cpu_share = multiprocessing.RawValue("d", cfg.split_cpu_share)
        if cfg.synthetic:
            self.manifest: dict[str, Any] = {}
            self.shards: list[Shard] = []
            self.num_classes = cfg.synthetic_classes
            self.num_samples = cfg.synthetic_samples
            self.batches_per_epoch = max(1, cfg.synthetic_samples // (world_size * batch_size))
        else:
            self.manifest = load_manifest(cfg.url)
            self.shards = split_shards(self.manifest, cfg.url, cfg.train_split)
            self.num_classes = int(self.manifest["num_classes"])
            self.num_samples = sum(s.samples for s in self.shards)
            total = self.num_samples
            if cfg.epoch_mode == "resampled":
                total = cfg.samples_per_epoch or self.num_samples
            self.batches_per_epoch = batches_per_epoch(total, world_size, batch_size)
            if cfg.epoch_mode == "exact":  # fail now, not in a worker, if a rank cannot fill M
                batch_sizes(self.num_samples // world_size, self.batches_per_epoch, batch_size)
        self.mean = tuple(self.manifest.get("mean") or IMAGENET_MEAN)
        self.std = tuple(self.manifest.get("std") or IMAGENET_STD)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch the next iteration yields, starting at batch `start_batch`."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self._epoch, self._start = epoch, start_batch

    @property
    def cpu_share(self) -> float:
        """decode=split: the share of each batch the workers decode (the device does the rest).
        Setting it reaches running workers at their next batch."""
        return self._cpu_share.value

    @cpu_share.setter
    def cpu_share(self, share: float) -> None:
        self._cpu_share.value = min(max(float(share), 0.0), 1.0)

    def __len__(self) -> int:
        """Batches the next iteration yields."""
        return self.batches_per_epoch - self._start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._start
        if self.cfg.synthetic:
            batches = synthetic_batches(
                self.batch_size,
                self.cfg.image_size,
                self.num_classes,
                self.device or "cpu",
                seed=self.seed,
            )
            for _ in range(self.batches_per_epoch - start):
                yield next(batches)
        else:
            what = f"{self.cfg.url} split {self.cfg.train_split!r} (rank {self.rank})"
            ring = None
            if self.cfg.num_workers and self.cfg.decode == "cpu":
                # a worker's batches in flight (prefetch_factor), the loop's, the pinning's
                shape = (self.batch_size, 3, self.cfg.image_size, self.cfg.image_size)
                ring = BatchRing(self.cfg.num_workers, self.cfg.prefetch_factor + 2, shape)
            batches = None
            try:
                batches = iter(_dataloader(_TrainEpoch(self, epoch, start, ring), self.cfg))
                while True:
                    t0 = time.perf_counter()  # time the wait for a batch, not the loop's work
                    try:
                        (images, labels), info = next(batches)
                    except StopIteration:
                        break
                    finally:
                        self._totals.seconds += time.perf_counter() - t0
                    _account(self._totals, self.cfg, info, len(labels), what)
                    yield images, labels
            finally:
                batches = None  # joins the workers (and the pinning thread) before the ring closes
                if ring is not None:
                    ring.close()
        self._epoch, self._start = epoch + 1, 0

    def stats(self) -> dict[str, float]:
        """Throughput and data health so far: samples, samples_per_s, bytes_per_s (read from
        storage), bad_samples, bad_fraction... Rates are over the time spent producing
        batches (the loop's own time between batches is excluded)."""
        return _stats(self._totals)


class SplitBalancer:
    """decode=split: moves `loader.cpu_share` so that neither the workers nor the device wait.

    Every `window` batches it looks at the share of the loop's time spent waiting for data.
    Waiting means the workers cannot keep up: the device gets a larger part (the share drops
    in proportion to the wait, by at least `step`). No wait means the device may be decoding
    what idle workers could: they get a little more (`step`). A window spans twice the batches
    the loader keeps queued, so each move is judged on batches made after it. The first window
    of an epoch is not judged: new workers start with empty queues, whatever the share.
    """

    def __init__(self, loader: TrainLoader, *, target_wait: float = 0.02, step: float = 0.05):
        self.loader, self.target_wait, self.step = loader, target_wait, step
        self.window = max(10, 2 * max(1, loader.cfg.num_workers) * loader.cfg.prefetch_factor)
        self._batches, self._wait, self._t0 = 0, 0.0, time.perf_counter()
        self._skip = 0

    def new_epoch(self) -> None:
        """The loader starts new workers: ignore the next window of batches."""
        self._skip = self.window

    def observe(self, wait_s: float) -> None:
        """Call once per batch with the seconds the loop waited for it."""
        if self._skip:
            self._skip -= 1
            self._batches, self._wait, self._t0 = 0, 0.0, time.perf_counter()
            return
        self._batches += 1
        self._wait += wait_s
        if self._batches < self.window:
            return
        waited = min(1.0, self._wait / max(time.perf_counter() - self._t0, 1e-9))
        share = self.loader.cpu_share
        if waited > self.target_wait:
            self.loader.cpu_share = share - max(self.step, share * waited)  # the setter clamps
        else:
            self.loader.cpu_share = share + self.step
        self._batches, self._wait, self._t0 = 0, 0.0, time.perf_counter()


_Shaped = TypeVar("_Shaped")


def batches_by_shape(
    items: Iterable[_Shaped],
    shape: Callable[[_Shaped], Hashable],
    batch_size: int,
    max_held: float,
    weight: Callable[[_Shaped], float] = lambda item: 1,
) -> Iterator[list[_Shaped]]:
    """Group `items` into batches of one shape each, at most `batch_size` long, holding back
    items of total `weight` at most `max_held`: when more wait, the bucket that grew least
    recently goes out as it is (rare shapes; the common ones keep filling). Each item comes
    out exactly once.

    Why: the multiscale protocol feeds whole images, whose shapes follow their aspect ratios;
    batching only consecutive same-shape images gives batches of one or two on shuffled
    ImageNet, where a few shapes (500x375, 375x500, 500x333 ...) cover most images."""
    buckets: OrderedDict[Hashable, list[_Shaped]] = OrderedDict()
    held = 0
    for item in items:
        key = shape(item)
        bucket = buckets.setdefault(key, [])
        buckets.move_to_end(key)
        bucket.append(item)
        held += weight(item)
        if len(bucket) >= batch_size:
            held -= sum(map(weight, bucket))
            yield buckets.pop(key)
        while held > max_held:
            _, oldest = buckets.popitem(last=False)
            held -= sum(map(weight, oldest))
            yield oldest
    while buckets:
        yield buckets.popitem(last=False)[1]


class _EvalSplit(IterableDataset):
    def __init__(
        self,
        cfg: DataConfig,
        shards: list[Shard],
        rank: int,
        world_size: int,
        batch_size: int,
        views: str,
        scale: int | None,
    ):
        super().__init__()
        self.cfg, self.shards = cfg, shards
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.views, self.scale = views, scale

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """(images, labels, global positions in the split, info) per batch of this worker."""
        info = get_worker_info()
        k, w = (info.num_workers, info.id) if info is not None else (1, 0)
        counts = [s.samples for s in self.shards]
        lo, hi = rank_slice(sum(counts), self.world_size, self.rank)
        wlo, whi = lo + (hi - lo) * w // k, lo + (hi - lo) * (w + 1) // k
        plan = WorkerPlan(
            segments_for(counts, range(len(counts)), wlo, whi), np.arange(whi - wlo), []
        )
        transform = eval_transform(self.cfg, self.views, self.scale)
        counter, sent_bytes, seen = [0], 0, 0
        bad: list[RawSample] = []

        def good() -> Iterator[tuple[np.ndarray, int, int]]:
            """(pixels, label, position in the split) of each decodable sample; counts all."""
            nonlocal seen
            stream = _positions(plan, self.shards, counter, self.cfg.io_retry_s)
            for pos, sample in enumerate(stream):
                assert sample is not None
                seen += 1
                pixels = _decode_or_error(lambda s=sample: transform(s.image), sample)
                if pixels is None:
                    bad.append(sample)
                else:
                    yield pixels, sample.label, wlo + pos

        def flush(
            batch: list[tuple[np.ndarray, int, int]],
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
            nonlocal sent_bytes, seen
            images = torch.empty(0, dtype=torch.uint8)  # a batch of only bad samples
            if batch:
                images = _batch_tensor((len(batch), *batch[0][0].shape), torch.uint8)
                np.stack([pixels for pixels, _, _ in batch], out=images.numpy())
            targets = _batch_tensor((len(batch),), torch.int64)
            targets.numpy()[:] = [label for _, label, _ in batch]
            positions = _batch_tensor((len(batch),), torch.int64)
            positions.numpy()[:] = [where for _, _, where in batch]
            out = (images, targets, positions, _info(seen, bad, counter[0] - sent_bytes))
            sent_bytes, seen = counter[0], 0
            bad.clear()
            return out

        # center/ten_crop views all have one shape: these are plain consecutive batches
        batches = batches_by_shape(
            good(),
            shape=lambda item: item[0].shape,
            batch_size=self.batch_size,
            max_held=self.cfg.eval_hold_mb * 2**20,
            weight=lambda item: item[0].nbytes,
        )
        for batch in batches:
            yield flush(batch)
        if seen or bad:  # a bad tail still reports
            yield flush([])


def eval_samples(
    cfg: DataConfig, *, rank: int, world_size: int, manifest: dict[str, Any] | None = None
) -> int:
    """How many validation samples rank `rank` is given (before any bad ones are skipped)."""
    manifest = manifest or load_manifest(cfg.url)
    lo, hi = rank_slice(
        sum(s.samples for s in split_shards(manifest, cfg.url, cfg.val_split)), world_size, rank
    )
    return hi - lo


def eval_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    views: str = "center",
    scale: int | None = None,
    with_index: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The validation split, each sample exactly once across ranks: rank r gets the contiguous
    slice [N*r//W, N*(r+1)//W) in manifest order (no padding, no duplicates; counts differ by
    at most one), split among its workers. Images: uint8 [B,3,S,S] (`center`), [B,10,3,S,S]
    (`ten_crop`) or [B,3,H,W] (`full`, shorter side `scale`: images are grouped by shape, see
    `batches_by_shape`, so batches may be smaller than batch_size and come out of order). Bad
    samples are skipped, counted and logged, within max_bad_fraction. `with_index`: a third tensor, int64 [B], holds each
    sample's position in the split (manifest order), whatever order the workers deliver in."""
    eval_transform(cfg, views, scale)  # reject a bad `views` here, not in a worker
    manifest = load_manifest(cfg.url)
    shards = split_shards(manifest, cfg.url, cfg.val_split)
    totals = _Totals()
    what = f"{cfg.url} split {cfg.val_split!r} (rank {rank})"
    dataset = _EvalSplit(cfg, shards, rank, world_size, batch_size, views, scale)
    for images, labels, positions, info in _dataloader(dataset, cfg):
        _account(totals, cfg, info, len(labels), what)
        if len(labels):
            yield (images, labels, positions) if with_index else (images, labels)
    if totals.bad:
        log.warning("%s: skipped %d bad of %d samples", what, totals.bad, totals.seen)


# ============================================================================================
# on the training device


class DeviceNormalize:
    """uint8 batch -> normalized float on the training device, in channels_last.

    Train: AlexNet PCA lighting (Krizhevsky et al. 2012, as in fb.resnet.torch): each image gets
    eigvec @ (alpha * eigval) added to its RGB values, alpha ~ N(0, pca_lighting^2) per image,
    drawn from `generator` (seed it from (seed, step) for reproducible runs). Then
    (x - mean) / std with mean/std on the 0-255 scale (the manifest's, else ImageNet's).
    """

    EIGVAL = (0.2175, 0.0188, 0.0045)  # of the ImageNet RGB covariance, 0-1 scale
    EIGVEC = (
        (-0.5675, 0.7192, 0.4009),
        (-0.5808, -0.0045, -0.8140),
        (-0.5836, -0.6948, 0.4203),
    )

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pca_lighting: float = 0.1,
        device: torch.device | str = "cpu",
        *,
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.pca_lighting = float(pca_lighting)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=self.device).view(
            3, 1, 1
        )
        # column i of EIGVEC is eigenvector i; scaled to 0-255 pixels once here
        self.basis = (
            torch.tensor(self.EIGVEC, dtype=torch.float32) * torch.tensor(self.EIGVAL) * 255.0
        )

    def lighting(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The per-image RGB offsets [batch, 3] (0-255 scale) PCA lighting adds."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        alpha = torch.randn(batch, 3, generator=generator, device=gen_device) * self.pca_lighting
        # non_blocking: a blocking host-to-device copy waits for the GPU's queue, every step
        return (alpha.cpu() @ self.basis.T).to(self.device, non_blocking=True)

    def __call__(
        self, images_uint8: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[..., 3, H, W] uint8 (any device) -> float on self.device; 4-D results are
        channels_last."""
        x = images_uint8.to(self.device, non_blocking=True).to(torch.float32)
        if train and self.pca_lighting > 0:
            flat = x.reshape(-1, *x.shape[-3:])
            x = (flat + self.lighting(flat.shape[0], generator).view(-1, 3, 1, 1)).view(x.shape)
        x = ((x - self.mean) * self.inv_std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def synthetic_batches(
    batch_size: int, image_size: int, num_classes: int, device: torch.device | str, *, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One random uint8 batch made on `device` once and yielded forever (to time the model
    without the input pipeline)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randint(
        0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=gen
    )
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    images, labels = images.to(device), labels.to(device)
    while True:
        yield images, labels


__all__ = [
    "DataConfig",
    "DataError",
    "DeviceNormalize",
    "MixedBatch",
    "SplitBalancer",
    "TrainLoader",
    "batch_sizes",
    "batches_per_epoch",
    "eval_loader",
    "eval_samples",
    "load_manifest",
    "open_url",
    "register_webdataset_handler",
    "synthetic_batches",
]
