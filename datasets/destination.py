"""Where the dataset scripts write, checked before any heavy work (scanning, the mean-image pass,
reading shards): the URL's scheme (orchestrator.storage.check_url), the store (S3: credentials,
endpoint, bucket), a probe object written and deleted (the credentials may write there), and
what an earlier run left at the destination.

Not a package: the scripts import it as `destination` from their own folder (sys.path[0]).
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

try:
    from orchestrator import s3, storage
except ImportError:  # a checkout where the package is not installed: the repo root is one up
    sys.path.append(str(Path(__file__).resolve().parent.parent))
    from orchestrator import s3, storage
from orchestrator.errors import UsageError

MANIFEST = "manifest.json"


class ConversionError(UsageError):
    """A problem the user must fix (bad input, unreachable store); shown without a traceback."""


class _Dest:
    """A storage root (orchestrator.storage) plus what a conversion needs on top of it: a
    preflight check, a temporary folder, and whether a stored shard is still the one built."""

    def __init__(self, store: storage.Storage) -> None:
        self.store = store
        self.url = store.root

    def matches(self, name: str, size: int, fingerprint: str) -> bool:
        # storage's head: (size, sha256) of a local file, (size, ETag) of an S3 object; any
        # rewrite of the object changes either, and S3 needs no re-read of the shard for it
        return self.store.head(name) == (size, fingerprint)

    def put_shard(self, tmp_path: str, name: str, sha256: str) -> str:
        """Store a finished shard (the local file goes); returns the fingerprint head gives."""
        self.store.put_file(tmp_path, name)
        if not self.store.remote:
            return sha256  # what head() would compute, without reading the file again
        head = self.store.head(name)
        if head is None:
            raise ConversionError(f"{self.url}/{name} is missing right after its upload")
        return head[1]


class LocalDest(_Dest):
    """A local folder; files appear by atomic rename, so a reader never sees half a file."""

    def __init__(self, path: str) -> None:
        super().__init__(storage.LocalStorage(str(Path(path).expanduser().resolve())))

    def preflight(self, what: str = "--dest") -> None:
        """The folder (or its nearest existing parent) takes a probe file; nothing is left."""
        root = self.store.path
        if root.exists() and not root.is_dir():
            raise ConversionError(f"{what} {self.url} exists and is not a folder: give a folder")
        probe = root
        while not probe.exists():
            probe = probe.parent
        try:  # a real write: os.access misses read-only mounts, ACLs and full disks
            with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-probe-") as f:
                f.write(b"probe")
                f.flush()
        except OSError as err:
            raise ConversionError(
                f"cannot write to {probe} (for {what} {self.url}): {err.strerror or err}. Give "
                "a folder you can write"
            ) from None

    def make_tmp_dir(self) -> str:
        # Inside the destination, so the final rename stays on one filesystem (atomic).
        self.store.path.mkdir(parents=True, exist_ok=True)
        path = self.store.path / f".tmp-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return str(path)


class S3Dest(_Dest):
    """An s3:// prefix, reached through orchestrator.storage and the project's one S3 client."""

    def __init__(self, url: str) -> None:
        super().__init__(storage.S3Storage(url))

    def preflight(self, what: str = "--dest") -> None:
        """Fail fast, before anything is written, when the store cannot be used or written."""
        check_s3(self.url)
        name = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.store.put(name, b"probe")
            self.store.delete(name)
        except Exception as err:  # noqa: BLE001 - botocore's many kinds: one message
            raise ConversionError(
                f"cannot write to {what} {self.url}: {_short(err)}. Give credentials that may "
                "write there (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), or another prefix"
            ) from None

    def make_tmp_dir(self) -> str:
        return tempfile.mkdtemp(prefix="shards-")


Dest = LocalDest | S3Dest


def _short(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code", "")
        return f"{code}: {response.get('Error', {}).get('Message', '')}".strip(": ")
    return f"{type(err).__name__}: {err}"


def check_s3(url: str) -> None:
    """The s3:// URL's store answers: credentials present, endpoint listening, bucket there
    and open to them. Seconds, where the client's own retries would take a minute."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise ConversionError(
            "boto3 is not installed; install the project (pip install -e .) or use a local folder"
        ) from None
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if boto3.Session().get_credentials() is None:
        raise ConversionError(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (for the local "
            "stack, see `python -m orchestrator.stack env`)"
        )
    endpoint = s3.endpoint_url()
    if endpoint:
        parsed = urlparse(endpoint)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "", port), timeout=5).close()
        except OSError as err:
            raise ConversionError(
                f"cannot reach the S3 endpoint {endpoint} (AWS_ENDPOINT_URL_S3 / "
                f"AWS_ENDPOINT_URL): {err}. Start the store (python -m orchestrator.stack up) "
                "or fix the variable."
            ) from None
    where = endpoint or "AWS S3"
    try:
        s3.client().head_bucket(Bucket=bucket)
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise ConversionError(
                f"bucket {bucket!r} does not exist at {where}; create it first"
            ) from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ConversionError(
                f"access to bucket {bucket!r} at {where} was refused ({code}); check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            ) from None
        raise ConversionError(f"cannot use bucket {bucket!r} at {where}: {err}") from None
    except BotoCoreError as err:
        raise ConversionError(f"cannot reach S3 at {where}: {err}") from None


def open_dest(url: str, what: str = "--dest") -> Dest:
    """An s3:// URL or a local folder path; any other scheme refused (storage.check_url)."""
    try:
        storage.check_url(url, what, write=True)
    except UsageError as err:
        raise ConversionError(str(err)) from None
    return S3Dest(url) if s3.is_s3(url) else LocalDest(url)


def prepare_dest(url: str, script: str, src: str, *, replace: bool) -> Dest:
    """A converter's --dest, ready: scheme, store, a probe write, and the existing-output
    policy (`check_existing`). Runs before any scan or decode."""
    dest = open_dest(url)
    dest.preflight()
    check_existing(dest.store, script, src, replace=replace)
    return dest


def check_existing(store: storage.Storage, script: str, src: str, *, replace: bool) -> None:
    """What an earlier run left at the destination: nothing, or this script's conversion of
    the same --src (resumed) pass; another source needs --replace; another tool's dataset is
    never replaced."""
    try:
        raw = store.get(MANIFEST)
    except storage.NotFound:
        return
    try:
        source: Any = json.loads(raw).get("source") or {}
    except (ValueError, AttributeError):
        source = {}
    if not isinstance(source, dict):
        source = {}
    where = f"{store.root}/{MANIFEST}"
    by = source.get("script") or source.get("by")
    if by != script:
        raise ConversionError(
            f"--dest {store.root} already holds a dataset that {by or 'another tool'} wrote "
            f"({where}); {script} does not replace it. Give another --dest, or remove that one "
            "first"
        )
    old = str(source.get("src") or "")
    if old and old != src and not replace:
        raise ConversionError(
            f"--dest {store.root} holds the conversion of {old}, not of --src {src}: its "
            "shards would be replaced. Pass --replace to replace them, or give another --dest"
        )
    if old and old != src:
        print(
            f"--replace: the conversion of {old} at {store.root} is replaced",
            file=sys.stderr,
            flush=True,
        )


def writable_store(url: str, what: str) -> storage.Storage:
    """A store that index_shards may write its manifest to, probed now."""
    dest = open_dest(url, what)
    dest.preflight(what)
    return dest.store


def readable_source(url: str, what: str) -> None:
    """A source the scripts read shards from: a local path or s3:// (answering now)."""
    try:
        storage.check_url(url, what, write=False, http=False)
    except UsageError as err:
        raise ConversionError(str(err)) from None
    if s3.is_s3(url):
        check_s3(url)
