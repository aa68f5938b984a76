"""Local folder or s3:// prefix behind one small interface: put, get, list, delete.

Every component that stores or reads whole objects goes through here: checkpoints, the dataset
converters, dataset manifests, Ray's storage path. (The training loader's shard streams, which
reopen a broken read mid-object with a Range request, are the one exception: data/streams.py.)

    store = open_storage("s3://resnet/runs/job/checkpoints")   # or "/data/runs/job/checkpoints"
    store.put("step-00000100/trainer.pt", data)    # whole or not at all: readers never see half
    store.get("step-00000100/trainer.pt")          # bytes; NotFound if there is no such object
    store.sizes("step-00000100")                   # {relative path: size}, recursive, paginated
    store.list_dirs()                              # immediate sub-folders of the root
    store.read_versioned("LEASE")                  # (bytes, version, age by the store's clock)
    store.put_if("LEASE", data, version)           # only over that version (None: only if absent)

`put_if` is a conditional write: S3's If-None-Match / If-Match (AWS S3 honours both, and so
does SeaweedFS: tests/test_job_lease.py), a lock file on a local folder. Where a store answers
that it does not implement them, the write is made plainly, said once; callers read it back
(orchestrator.job_lease).

Object keys are relative paths under the root, with "/" separators on every backend.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from orchestrator import s3
from orchestrator.errors import OrchestratorError, UsageError

log = logging.getLogger(__name__)


class Versioned(NamedTuple):
    """An object read with what a conditional write compares (`put_if`)."""

    data: bytes
    version: str  # the S3 ETag, or the local file's sha256
    age_s: float  # since it was last written, by the store's own clock (never this machine's)


class NotFound(OrchestratorError, FileNotFoundError):
    """No object at this URL."""


class LocalStorage:
    """A local folder; files appear by atomic rename, so a reader never sees half a file."""

    remote = False

    def __init__(self, root: str) -> None:
        self.root = str(Path(root).expanduser()).rstrip("/") or "/"
        self.path = Path(self.root)

    def url(self, *parts: str) -> str:
        return "/".join([self.root, *(p for p in parts if p)])

    def put(self, rel: str, data: bytes) -> None:
        dest = self.path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def put_file(self, local: str | Path, rel: str) -> None:
        """Move a finished local file into place (same filesystem: an atomic rename)."""
        dest = self.path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, dest)

    def get(self, rel: str) -> bytes:
        try:
            return (self.path / rel).read_bytes()
        except FileNotFoundError:
            raise NotFound(self.url(rel)) from None

    def exists(self, rel: str) -> bool:
        return (self.path / rel).is_file()

    def head(self, rel: str) -> tuple[int, str] | None:
        """(size, sha256) of a file, or None: a fingerprint that changes with any rewrite."""
        p = self.path / rel
        return (p.stat().st_size, sha256_file(p)) if p.is_file() else None

    def sizes(self, prefix: str = "") -> dict[str, int]:
        base = self.path / prefix
        if not base.is_dir():
            return {}
        return {
            p.relative_to(base).as_posix(): p.stat().st_size for p in base.rglob("*") if p.is_file()
        }

    def list_dirs(self, prefix: str = "") -> list[str]:
        base = self.path / prefix
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def list_files(self, prefix: str = "") -> list[str]:
        base = self.path / prefix
        return sorted(p.name for p in base.iterdir() if p.is_file()) if base.is_dir() else []

    def delete(self, rel: str) -> None:
        (self.path / rel).unlink(missing_ok=True)

    def _lock(self, rel: str) -> Path:
        dest = self.path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest.with_name(f".{dest.name}.lock")

    def read_versioned(self, rel: str) -> Versioned | None:
        """The file, its sha256 and its age. The age is the folder's clock against itself: the
        lock file is touched now (on NFS the server sets both times), then the two compared."""
        import fcntl

        dest, lock = self.path / rel, self._lock(rel)
        with open(lock, "a+b") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            if not dest.is_file():
                return None
            data = dest.read_bytes()
            os.utime(lock, None)
            age = lock.stat().st_mtime - dest.stat().st_mtime
        return Versioned(data, hashlib.sha256(data).hexdigest(), max(0.0, age))

    def put_if(self, rel: str, data: bytes, version: str | None) -> str | None:
        """Write `data` only if the file is at `version` (None: only if there is none), under an
        exclusive lock of its own; returns the new version, or None when the condition failed."""
        import fcntl

        dest, lock = self.path / rel, self._lock(rel)
        with open(lock, "a+b") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            current = sha256_file(dest) if dest.is_file() else None
            if current != version:
                return None
            self.put(rel, data)
        return hashlib.sha256(data).hexdigest()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path / prefix, ignore_errors=True)


class S3Storage:
    """An s3:// prefix, through orchestrator.s3's clients (retries on 5xx and lost connections)."""

    remote = True

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.bucket, key = s3.split_url(self.root + "/")
        self.prefix = key  # "" or "a/b/"

    def url(self, *parts: str) -> str:
        return "/".join([self.root, *(p for p in parts if p)])

    def _key(self, rel: str) -> str:
        return self.prefix + rel

    def put(self, rel: str, data: bytes) -> None:
        # one PUT: the object appears whole or not at all
        s3.with_retries(
            lambda: s3.client().put_object(Bucket=self.bucket, Key=self._key(rel), Body=data),
            what=self.url(rel),
        )

    def put_file(self, local: str | Path, rel: str) -> None:
        """Upload a finished local file (multipart above 8 MB), then delete the local copy."""
        s3.with_retries(
            lambda: s3.client().upload_file(str(local), self.bucket, self._key(rel)),
            what=self.url(rel),
        )
        os.unlink(local)

    def _unless_missing(self, rel: str, call: Any) -> Any:
        """`call()` (retried), or None where the object `rel` does not exist."""
        from botocore.exceptions import ClientError

        try:
            return s3.with_retries(call, what=self.url(rel))
        except ClientError as err:
            if _missing(err):
                return None
            raise

    def get(self, rel: str) -> bytes:
        body = self._unless_missing(  # the body read inside the retries
            rel,
            lambda: s3.client().get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read(),
        )
        if body is None:
            raise NotFound(self.url(rel))
        return bytes(body)

    def head(self, rel: str) -> tuple[int, str] | None:
        """(size, ETag) of an object, or None: any rewrite of the object changes its ETag."""
        head = self._unless_missing(
            rel, lambda: s3.client().head_object(Bucket=self.bucket, Key=self._key(rel))
        )
        return None if head is None else (int(head["ContentLength"]), str(head["ETag"]))

    def exists(self, rel: str) -> bool:
        return self.head(rel) is not None

    def read_versioned(self, rel: str) -> Versioned | None:
        """The object, its ETag and its age: the response's Date less its Last-Modified, both
        the store's clock."""
        got = self._unless_missing(
            rel, lambda: s3.client().get_object(Bucket=self.bucket, Key=self._key(rel))
        )
        if got is None:
            return None
        data = got["Body"].read()
        date = got["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = email.utils.parsedate_to_datetime(date) if date else None
        age = (now - got["LastModified"]).total_seconds() if now else 0.0
        return Versioned(data, str(got["ETag"]), max(0.0, age))

    def put_if(self, rel: str, data: bytes, version: str | None) -> str | None:
        """PUT only over ETag `version` (If-Match), or only where there is no object (If-None-
        Match: *); returns the new ETag, or None when the store refused the condition."""
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        key = self._key(rel)

        def put() -> Any:
            try:
                return s3.client().put_object(Bucket=self.bucket, Key=key, Body=data, **condition)
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    return None
                if code != "NotImplemented":
                    raise
            _say_unconditional(self.root)
            return s3.client().put_object(Bucket=self.bucket, Key=key, Body=data)

        done = s3.with_retries(put, what=self.url(rel))
        return None if done is None else str(done["ETag"])

    def _pages(self, prefix: str, **kwargs: Any) -> Any:
        key = self._key(prefix.rstrip("/") + "/") if prefix else self.prefix
        pages = s3.client().get_paginator("list_objects_v2")
        return key, pages.paginate(Bucket=self.bucket, Prefix=key, **kwargs)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        key, pages = self._pages(prefix)
        return {
            obj["Key"][len(key) :]: obj["Size"]
            for page in pages
            for obj in page.get("Contents", [])
        }

    def list_dirs(self, prefix: str = "") -> list[str]:
        key, pages = self._pages(prefix, Delimiter="/")
        names = [
            p["Prefix"][len(key) :].rstrip("/")
            for page in pages
            for p in page.get("CommonPrefixes", [])
        ]
        return sorted(names)

    def list_files(self, prefix: str = "") -> list[str]:
        key, pages = self._pages(prefix, Delimiter="/")
        return sorted(obj["Key"][len(key) :] for page in pages for obj in page.get("Contents", []))

    def delete(self, rel: str) -> None:
        s3.with_retries(
            lambda: s3.client().delete_object(Bucket=self.bucket, Key=self._key(rel)),
            what=self.url(rel),
        )

    def delete_prefix(self, prefix: str) -> None:
        base = prefix.rstrip("/") + "/" if prefix else ""
        keys = [self._key(base + rel) for rel in self.sizes(prefix)]
        for i in range(0, len(keys), 1000):  # S3's limit per request
            chunk = [{"Key": k} for k in keys[i : i + 1000]]
            s3.client().delete_objects(Bucket=self.bucket, Delete={"Objects": chunk})


Storage = LocalStorage | S3Storage


class UnsupportedURL(UsageError, ValueError):
    """A storage URL in a scheme the project does not speak; the message names the ones it does."""


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# schemes people reach for, and the way each one reaches the project instead
_INSTEAD = {
    "gs": "Google Cloud Storage speaks S3 through its interoperability endpoint: set "
    "AWS_ENDPOINT_URL_S3=https://storage.googleapis.com, AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY to an HMAC key of the bucket's service account, and write "
    "s3://BUCKET/PREFIX (docs/storage.md)",
    "s3a": "write s3:// (s3a:// and s3n:// are Hadoop's names for the same buckets)",
    "s3n": "write s3:// (s3a:// and s3n:// are Hadoop's names for the same buckets)",
    "file": "write the path itself (/data/x, not file:///data/x)",
    "az": "Azure Blob Storage has no S3 API: copy the data to an S3-compatible store (MinIO, "
    "R2, ...) or a local folder",
    "abfs": "Azure Blob Storage has no S3 API: copy the data to an S3-compatible store (MinIO, "
    "R2, ...) or a local folder",
    "hdfs": "mount the filesystem (a local path every node sees) or copy the data to s3://",
}


def check_url(url: str, what: str, *, write: bool, http: bool | None = None) -> str:
    """Return `url` if the project speaks its scheme for this use, else raise UnsupportedURL
    naming `what` (e.g. "data.url", "--dest") and the supported schemes.

    Spoken: a local path, s3://BUCKET[/PREFIX], and http(s):// where the caller only reads
    (`http` defaults to `not write`; a reader that goes through open_storage, which has no
    http client, passes http=False)."""
    http = (not write) if http is None else http
    spoken = "a local path, s3://BUCKET/PREFIX" + (" or http(s)://HOST/PATH" if http else "")
    if not url.strip():
        raise UnsupportedURL(f"{what}: empty; give {spoken}")
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if not scheme:
        return url  # a local path (relative ones included)
    if scheme == "s3":
        if not url[len("s3://") :].split("/", 1)[0]:
            raise UnsupportedURL(f"{what}={url}: no bucket; write s3://BUCKET/PREFIX")
        return url
    if scheme in ("http", "https"):
        if http:
            return url
        use = "written to" if write else "read from here"
        raise UnsupportedURL(
            f"{what}={url}: http(s):// cannot be {use}; give "
            f"{spoken} (an S3-compatible service's bucket is s3://BUCKET/PREFIX with its "
            "endpoint in AWS_ENDPOINT_URL_S3: docs/storage.md)"
        )
    instead = _INSTEAD.get(scheme)
    raise UnsupportedURL(
        f"{what}={url}: the project does not speak {scheme}://; it speaks {spoken}"
        + (f". Fix: {instead}" if instead else "")
    )


def open_storage(url: str) -> Storage:
    """An s3:// URL or a local folder path."""
    return S3Storage(url) if s3.is_s3(url) else LocalStorage(url)


def read_url(url: str, timeout_s: float = 60.0) -> bytes:
    """The bytes of one object at an s3://, http(s):// or local URL; NotFound if it is missing."""
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                raise NotFound(url) from None
            raise
    root, _, name = url.rstrip("/").rpartition("/")
    return open_storage(root or "/").get(name)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_unconditional: set[str] = set()


def _say_unconditional(root: str) -> None:
    if root not in _unconditional:
        _unconditional.add(root)
        log.warning(
            "the store at %s does not implement conditional writes (If-None-Match, If-Match): "
            "writing plainly; the writer reads its object back to find out who won",
            root,
        )


def _missing(err: Any) -> bool:
    return str(err.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")
