"""Shards -> samples: a forward-only tar reader of our own, members grouped into samples.

A shard is read front to back, once: `tar_files` parses just the headers it needs, members
sharing a key (WebDataset's rule: the path up to the first dot) become one `RawSample`, and
`read_segment` yields samples [start, stop) of a shard, one item per index, whatever happens:
a sample the shard lacks (truncated or unreadable) comes out with its `error` set, so positions
never shift and the epoch's plan (orchestrator.data.epochs) holds.

Verification (data.verify_shards, on by default): a shard is always streamed from its first
byte (a segment that starts mid-shard parses and skips the samples before it; a dropped
connection reopens at the byte reached), so the segment that ends at the shard's last sample
(the manifest's count) has seen every byte before it. That segment, and only it, reads on to the
end of the archive before it hands over the last sample: the shard must hold no sample past the
manifest's count, and the sha256 of all its bytes must be the manifest's; else a `BadShard`
stops the job, naming the shard. Every shard of an epoch ends exactly one segment (one stream of
one rank: epochs.segments_for), so each is checked once per epoch, by whichever worker reads its
end. The count is checked even with verification off (it costs nothing: the reader has reached
the end blocks by then); a shard the manifest records no sha256 for gets the count check only.
A shard cut short keeps the tolerant path: its missing samples are bad samples, counted against
data.max_bad_fraction, and its digest is not compared.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from orchestrator.data.manifest import OWN_LAYOUT, BadShard, DataUnavailable, SampleLayout
from orchestrator.data.streams import Counted, open_url

log = logging.getLogger(__name__)

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


_NO_END = (
    "tar stream ends without its end-of-archive blocks (two 512-byte zero blocks): a shard "
    "still being written, or cut short at a member boundary"
)


def tar_files(f: Any, *, require_end: bool = False) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream, forward only: ustar, GNU long names
    and pax paths (what tarfile, GNU tar and WebDataset's writers produce); other members
    (directories, links) are skipped. Half the CPU of tarfile's stream mode, which parses
    every header field, twice for the checksum. tarfile.ReadError on a damaged header,
    EOFError where the stream stops inside a member, and with `require_end` where it stops
    without the two zero blocks that end an archive (every tar writer closes with them)."""
    long_name: str | None = None
    while True:
        header = f.read(_TAR_BLOCK)
        if require_end and (not header or (header == _TAR_END and f.read(_TAR_BLOCK) != _TAR_END)):
            raise EOFError(_NO_END)
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
            prefix = (
                header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
            )
            yield long_name or (f"{prefix}/{name}" if prefix else name), data
            long_name = None
        elif kind != b"g":  # a global pax header applies to all; anything else is not a file
            long_name = None


def tar_groups(f: Any, *, require_end: bool = False) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index, key, {ext: bytes}) for each run of tar members sharing a key (`require_end`:
    see tar_files)."""
    index, key = -1, None
    files: dict[str, bytes] = {}
    for name, data in tar_files(f, require_end=require_end):
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


def _to_sample(
    shard: int, index: int, url: str, key: str, files: dict[str, bytes], layout: SampleLayout
) -> RawSample:
    sample = RawSample(shard, index, url, key)
    sample.image = layout.image(files)
    if sample.image is None:
        sample.error = f"no image member (has {sorted(files)})"
        return sample
    try:
        sample.label = layout.label(files)
    except ValueError as err:
        sample.error = str(err)
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
    layout: SampleLayout = OWN_LAYOUT,
    retry_s: float = 120.0,
    samples: int | None = None,
    sha256: str = "",
) -> Iterator[RawSample | None]:
    """Exactly one item per index in [seg.start, seg.stop): a RawSample for wanted indices
    (possibly with `error` set), None for the others. Missing samples (truncated or unreadable
    shard) come out as RawSamples with an error, so positions never shift. `layout` says which
    members hold the image and the label. `samples`: the manifest's count for the whole shard;
    a segment ending there checks, before it yields the last sample, that the shard holds no
    more and (given `sha256`) that its bytes are the manifest's (module docstring)."""
    reached = seg.start
    error = "shard holds fewer samples than its manifest says (truncated?)"
    whole = samples is not None and seg.stop == samples
    f: Counted | None = None
    try:
        digest = hashlib.sha256() if whole and sha256 else None  # only where it is checked
        f = Counted(open_url(url, retry_s=retry_s), counter, digest)
        groups = tar_groups(f)
        for index, key, files in groups:
            if index < seg.start:
                continue
            if index >= seg.stop:
                break
            sample = _to_sample(seg.shard, index, url, key, files, layout) if want(index) else None
            if sample is not None:
                sample.salt = seg.salt
            if whole and index + 1 == seg.stop:  # before the last yield: a reader may stop there
                _check_whole(groups, f, url, seg.stop, sha256)
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


_REDO = (
    "re-run the converter that wrote it (datasets/imagenet.py, datasets/cifar10.py) or "
    "datasets/index_shards.py to record what it holds now, or put the recorded shard back"
)


def _check_whole(
    groups: Iterator[tuple[int, str, dict[str, bytes]]],
    f: Counted,
    url: str,
    samples: int,
    sha256: str,
) -> None:
    """At a shard's last sample by its manifest: BadShard if more samples follow or (given
    `sha256`) its bytes to the end are not the manifest's."""
    extra, why = 0, ""
    try:
        extra = sum(1 for _ in groups)
    except (tarfile.TarError, EOFError) as err:  # a member follows the last sample, at least
        extra, why = max(extra, 1), f", the rest unreadable: {err}"
    except OSError as err:
        raise DataUnavailable(f"{url}: the stream failed past its last sample: {err}") from err
    if extra:
        raise BadShard(
            f"shard {url} holds more samples than its manifest's {samples} (at least "
            f"{samples + extra}{why}): it changed after the manifest was written, whose "
            f"count would drop the rest silently; {_REDO}"
        )
    if not sha256:
        return
    try:
        f.drain()
    except OSError as err:
        raise DataUnavailable(f"{url}: the stream failed past its last sample: {err}") from err
    found = f.digest.hexdigest()
    if found != sha256:
        raise BadShard(
            f"shard {url}: its {f.bytes} bytes have sha256 {found}, not the manifest's "
            f"{sha256}: it was replaced or damaged after the manifest was written; {_REDO}"
        )
