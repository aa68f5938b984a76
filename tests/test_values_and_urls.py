"""Issue 32: every value has its range, every storage URL a scheme the project speaks, tracking
on needs a tracking URI, and free run tags (tracking.tags.KEY=VALUE)."""

from __future__ import annotations

import pytest

from orchestrator.errors import UsageError
from orchestrator.spec import JobSpec, SpecError, apply_overrides
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


# --------------------------------------------------------------------------- value ranges


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("seed=-1", "seed=-1 is out of range: set it between 0 and 4294967295"),
        ("seed=4294967296", "seed=4294967296 is out of range"),
        ("optim.weight_decay=Infinity", "optim.weight_decay=inf: not finite"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay=-0.0001 is out of range"),
        ("optim.lr=nan", "optim.lr=nan: not finite"),
        ("optim.lr=NaN", "optim.lr=nan: not finite"),
        ("optim.base_lr=-INF", "optim.base_lr=-inf: not finite"),
        ("data.timeout_s=infinity", "data.timeout_s=inf: not finite"),
        ("schedule.gamma=+Inf", "schedule.gamma=inf: not finite"),
    ],
)
def test_values_out_of_range_or_not_finite_are_refused(override: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        apply_overrides(JobSpec(name="x"), [override])
    assert words in str(err.value)


def test_a_seed_at_the_top_of_its_range_and_a_finite_float_pass() -> None:
    spec = apply_overrides(JobSpec(name="x"), ["seed=4294967295", "optim.weight_decay=0"])
    assert (spec.seed, spec.optim.weight_decay) == (2**32 - 1, 0.0)


def test_a_job_file_refuses_a_lower_case_nan_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real entry (jobs/cifar10_resnet.py's main) on a value the spec refuses: nothing runs."""
    from orchestrator import launch
    from tests.conftest import load_job_spec

    spec = load_job_spec("cifar10_resnet")
    assert launch.main(spec, ["--dry-run", "optim.lr=nan"]) == 2
    assert "optim.lr=nan: not finite" in capsys.readouterr().err


# ------------------------------------------------------------------------ free run tags


def test_free_tags_are_set_by_key() -> None:
    spec = apply_overrides(
        JobSpec(name="x"), ["tracking.tags.team=vision", "tracking.tags.run=7", "name=123"]
    )
    assert spec.tracking.tags == {"team": "vision", "run": "7"}  # a number stays its text
    assert spec.name == "123"


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("tracking.tags.model=x", ["writes 'model' itself", "world_size", "mlflow."]),
        ("tracking.tags.mlflow.runName=x", ["writes 'mlflow.runName' itself"]),
        ('tracking.tags={"orchestrator.job": "y"}', ["tracking.tags.orchestrator.job"]),
        ("tracking.tags.a!b=x", ["letters, digits"]),
        (f"tracking.tags.k={'v' * 5001}", ["at most 5000 characters"]),
    ],
)
def test_tags_the_project_writes_or_mlflow_cannot_keep_are_refused(
    override: str, words: list[str]
) -> None:
    with pytest.raises(SpecError) as err:
        apply_overrides(JobSpec(name="x"), [override])
    for word in words:
        assert word in str(err.value)
