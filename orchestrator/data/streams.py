"""Shard streams: local files, http(s) and s3 objects that survive a dropped connection.

s3:// objects are read through boto3 (orchestrator.s3 clients, one per process) as a stream; a
connection that breaks mid-shard is reopened with a Range request from the byte reached, with
backoff, for up to `io_retry_s` seconds, so an object store restarting mid-epoch costs a pause,
not the epoch. The same handler is registered with WebDataset's `gopen` for s3:// URLs by
`register_webdataset_handler` (called when a loader module is imported: webdataset imports
torch, this module does not), so `webdataset.WebDataset("s3://...")` works too. http(s) URLs
get the same treatment through urllib; anything else is a local path.

Whole small objects (manifests) are read through orchestrator.storage instead: only shards are
streamed, and only they need to resume mid-object.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, BinaryIO

from orchestrator import s3

log = logging.getLogger(__name__)

_READ_BUFSIZE = 1 << 20  # storage is read in 1 MiB requests


class _Permanent(Exception):
    """Wraps an error that retrying cannot fix (missing object, access denied)."""

    # no OrchestratorError: control flow inside this module, unwrapped before it leaves


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


class Counted:
    """Adds the bytes read through it to counter[0] (for the bytes/s metric) and, given a
    hashlib object, feeds them to it as they arrive (shard verification: orchestrator.data.tar).
    A reopened connection resumes at the byte reached, so the digest still sees every byte
    once, in order."""

    def __init__(self, f: Any, counter: list[int], digest: Any = None):
        self.f, self.counter, self.digest = f, counter, digest
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.counter[0] += len(data)
        self.bytes += len(data)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read to the end of the stream (the tar's end blocks and padding, for the digest)."""
        while self.read(_READ_BUFSIZE):
            pass

    def close(self) -> None:
        self.f.close()


def open_url(url: str, *, retry_s: float = 120.0) -> BinaryIO:
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


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    """WebDataset gopen handler for s3:// (boto3 streaming; no `aws` CLI subprocess)."""
    if mode != "rb":
        raise ValueError(f"{url}: only reading is supported (mode {mode!r})")
    return open_url(url)


def register_webdataset_handler() -> bool:
    """Make `webdataset` open s3:// URLs with `gopen_s3`. False when webdataset is absent
    (the loaders do not need it: the GPU test machines have only torch)."""
    try:
        # the module, not the function of the same name that `webdataset` re-exports
        wds_gopen = importlib.import_module("webdataset.gopen")
    except ImportError:
        return False
    wds_gopen.gopen_schemes["s3"] = gopen_s3
    return True
