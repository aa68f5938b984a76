"""Shards -> samples: a forward-only tar reader of our own, members grouped into samples.

A shard is read front to back, once: `tar_files` parses just the headers it needs, members
sharing a key (WebDataset's rule: the path up to the first dot) become one `RawSample`, and
`read_segment` yields samples [start, stop) of a shard, one item per index, whatever happens:
a sample the shard lacks (truncated or unreadable) comes out with its `error` set, so positions
never shift and the epoch's plan (orchestrator.data.epochs) holds.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from orchestrator.data.manifest import OWN_LAYOUT, SampleLayout
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


def tar_files(f: Any) -> Iterator[tuple[str, bytes]]:
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
            prefix = (
                header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
            )
            yield long_name or (f"{prefix}/{name}" if prefix else name), data
            long_name = None
        elif kind != b"g":  # a global pax header applies to all; anything else is not a file
            long_name = None


def tar_groups(f: Any) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index, key, {ext: bytes}) for each run of tar members sharing a key."""
    index, key = -1, None
    files: dict[str, bytes] = {}
    for name, data in tar_files(f):
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
) -> Iterator[RawSample | None]:
    """Exactly one item per index in [seg.start, seg.stop): a RawSample for wanted indices
    (possibly with `error` set), None for the others. Missing samples (truncated or unreadable
    shard) come out as RawSamples with an error, so positions never shift. `layout` says which
    members hold the image and the label."""
    reached = seg.start
    error = "shard holds fewer samples than its manifest says (truncated?)"
    f: Any = None
    try:
        f = Counted(open_url(url, retry_s=retry_s), counter)
        for index, key, files in tar_groups(f):
            if index < seg.start:
                continue
            if index >= seg.stop:
                break
            sample = _to_sample(seg.shard, index, url, key, files, layout) if want(index) else None
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
