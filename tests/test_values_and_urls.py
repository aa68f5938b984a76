"""Issue 32: every value has its range, every storage URL a scheme the project speaks, tracking
on needs a tracking URI, and free run tags (tracking.tags.KEY=VALUE)."""

from __future__ import annotations

import pytest

from orchestrator.errors import UsageError
from orchestrator.storage import UnsupportedURL, check_url


@pytest.mark.parametrize(
    ("url", "write", "http"),
    [
        ("s3://bucket/a/b", True, None),
        ("/data/x", True, None),
        ("relative/dir", True, None),
        ("https://host/data", False, None),
        ("http://host/data", False, None),
    ],
)
def test_spoken_urls_pass(url: str, write: bool, http: bool | None) -> None:
    assert check_url(url, "data.url", write=write, http=http) == url


@pytest.mark.parametrize(
    ("url", "write", "words"),
    [
        ("gs://bucket/x", True, ["gs://", "s3://BUCKET/PREFIX", "storage.googleapis.com", "HMAC"]),
        ("GS://bucket/x", False, ["gs://", "interoperability"]),
        ("az://container/x", False, ["az://", "no S3 API"]),
        ("hdfs://nn/x", True, ["hdfs://", "mount"]),
        ("ftp://host/x", False, ["ftp://", "a local path, s3://BUCKET/PREFIX or http(s)"]),
        ("s3a://bucket/x", False, ["s3a://", "write s3://"]),
        ("file:///data/x", True, ["file://", "the path itself"]),
        ("s3:///x", True, ["no bucket"]),
        ("", False, ["empty"]),
        (
            "https://host/x",
            True,
            ["cannot be written to", "give a local path, s3://BUCKET/PREFIX ("],
        ),
    ],
)
def test_other_schemes_are_refused_naming_the_spoken_ones(
    url: str, write: bool, words: list[str]
) -> None:
    with pytest.raises(UnsupportedURL) as err:
        check_url(url, "--dest", write=write)
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2
    assert str(err.value).startswith("--dest")
    for word in words:
        assert word in str(err.value)


def test_a_reader_without_an_http_client_refuses_http() -> None:
    with pytest.raises(UnsupportedURL, match="cannot be read from here"):
        check_url("https://host/ckpt", "checkpoint.resume_from", write=False, http=False)
