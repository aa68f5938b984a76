"""The S3 client layer: boto3 clients, URLs, retries (orchestrator.storage builds on it).

Configuration is the standard AWS environment (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION); boto3 reads it itself, so moving from
the local stack to a real bucket changes nothing here. Clients are cached per process (a
forked DataLoader worker gets its own), because boto3 clients are not fork-safe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")

_clients: dict[int, Any] = {}
_model_loader: Any = None  # botocore's parsed service definitions: pure data, fork-safe


def endpoint_url() -> str | None:
    """The S3 endpoint every client in the job must use (None = AWS's default)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def client() -> Any:
    """A boto3 S3 client for this process, with retries on throttling and 5xx."""
    global _model_loader
    pid = os.getpid()
    if pid not in _clients:
        import boto3
        import botocore.loaders
        import botocore.session
        from botocore.config import Config

        _clients.clear()  # inherited from a parent process: never reuse its connections
        # A fresh session reads the AWS_* variables now (boto3's default one caches the
        # first). Parsing botocore's JSON models costs ~0.1 CPU-s per session, paid by every
        # DataLoader worker every epoch; one loader, inherited by forked workers, makes a new
        # client ~4x cheaper.
        if _model_loader is None:
            _model_loader = botocore.loaders.create_loader()
        session = botocore.session.Session()
        session.register_component("data_loader", _model_loader)
        _clients[pid] = boto3.session.Session(botocore_session=session).client(
            "s3",
            endpoint_url=endpoint_url(),
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            config=Config(
                retries={"max_attempts": 8, "mode": "adaptive"},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"},
            ),
        )
    return _clients[pid]


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"); a clear error for anything else."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URL: {url!r} (expected s3://BUCKET/KEY)")
    return parsed.netloc, parsed.path.lstrip("/")


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def with_retries(
    fn: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.5
) -> T:
    """Call fn, retrying connection errors and 5xx with exponential backoff.

    botocore retries single requests; this covers whole operations (a streamed read that
    dies midway, an endpoint that restarts) where a fresh request is the fix.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    for attempt in range(attempts):
        try:
            return fn()
        except NoCredentialsError:
            raise  # no credentials now, none in a few seconds: waiting only delays the message
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status < 500 or attempt == attempts - 1:
                raise
        except (BotoCoreError, ConnectionError, OSError):
            if attempt == attempts - 1:
                raise
        time.sleep(base_delay * 2**attempt)
    raise AssertionError("unreachable")


def pyarrow_filesystem() -> Any:
    """A pyarrow S3 filesystem on the same endpoint, for Ray Train's storage_path."""
    from pyarrow import fs

    endpoint = endpoint_url()
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_REGION", "us-east-1")}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    return fs.S3FileSystem(**kwargs)
