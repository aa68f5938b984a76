"""Issue 32: every value has its range, every storage URL a scheme the project speaks, tracking
on needs a tracking URI, and free run tags (tracking.tags.KEY=VALUE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        ("tracking.tags.resume/optim.lr=x", ["resume/"]),  # what --allow-change records
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


# ------------------------------------------------- tracking needs a tracking server, said once


def test_tracking_on_without_a_tracking_uri_is_refused_by_the_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator import launch
    from tests.conftest import load_job_spec

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--dry-run", "data.source=synthetic", f"checkpoint.storage={tmp_path / 'runs'}"]
    assert launch.main(load_job_spec("cifar10_resnet"), args) == 2
    err = capsys.readouterr().err
    assert "tracking.enabled=true (the default) needs MLFLOW_TRACKING_URI" in err
    assert "python -m orchestrator.stack env" in err and "tracking.enabled=false" in err
    assert not (tmp_path / "runs").exists(), "a refused job wrote its storage probe"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:secret@127.0.0.1:9")
    assert launch.main(load_job_spec("cifar10_resnet"), args) == 0
    out = capsys.readouterr().out
    assert "# pre-flight ok: tracking: MLflow at http://127.0.0.1:9, experiment cifar10" in out


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("orchestrator.publish.__main__", ["--run", "0" * 32]),
        ("orchestrator.tracking.liveness", []),
        ("orchestrator.paper.layer_responses", ["--run", "0" * 32]),
    ],
)
def test_a_cli_without_a_tracking_uri_refuses_and_creates_no_local_store(
    module: str,
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Unset, MLflow's client would make ./mlflow.db here and answer 'not found'."""
    import importlib

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert importlib.import_module(module).main(argv) == 2
    err = capsys.readouterr().err
    assert "needs MLFLOW_TRACKING_URI, which is not set" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a local tracking store appeared"


def test_publish_exports_a_checkpoint_url_without_mlflow_but_checks_its_scheme(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.publish.__main__ import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["--checkpoint-url", "gs://b/job/checkpoints/step-00000010", "--torchvision", "x.pth"]
    assert main(argv) == 2
    assert "--checkpoint-url=gs://b/" in capsys.readouterr().err


# ------------------------------------------------------------ URLs in the spec, via a job file


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("data.url=gs://bucket/imagenet", "data.url=gs://bucket/imagenet: the project does not"),
        ("checkpoint.storage=gs://bucket/runs", "storage.googleapis.com"),
        ("checkpoint.storage=https://host/runs", "cannot be written to"),
        ("checkpoint.resume_from=s3a://b/j/checkpoints/step-1", "write s3://"),
    ],
)
def test_a_job_file_refuses_a_scheme_it_does_not_speak(
    override: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator import launch
    from tests.conftest import load_job_spec

    assert launch.main(load_job_spec("cifar10_resnet"), ["--dry-run", override]) == 2
    assert words in capsys.readouterr().err


def test_an_http_dataset_that_does_not_answer_gets_no_s3_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator import launch
    from tests.conftest import load_job_spec

    args = [
        "--dry-run",
        "data.url=http://127.0.0.1:9/ds",
        "tracking.enabled=false",
        f"checkpoint.storage={tmp_path}",
    ]
    assert launch.main(load_job_spec("smoke"), args) == 2
    err = capsys.readouterr().err
    assert "check that the server answers for http://127.0.0.1:9/ds/manifest.json" in err
    assert "AWS_" not in err


# --------------------------------------------------------------- a batch no larger than an epoch


def test_a_global_batch_larger_than_the_training_set_is_refused_naming_both(
    tmp_path: Path, odd_local_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator import launch
    from tests.conftest import load_job_spec, odd_shards_data

    args = ["--dry-run", *odd_shards_data(odd_local_shards), f"checkpoint.storage={tmp_path}"]
    args.append("tracking.enabled=false")
    smoke = load_job_spec("smoke")
    assert launch.main(smoke, [*args, "scaling.global_batch=1000000"]) == 2
    err = capsys.readouterr().err
    assert "scaling.global_batch=1000000 is larger than an epoch" in err
    assert "has 48 samples" in err and "at most 48" in err
    assert launch.main(smoke, [*args, "scaling.global_batch=48"]) == 0, capsys.readouterr().err


# ------------------------------------------------------------- --local: the GPUs present


@pytest.mark.parametrize(
    ("gpus", "given", "workers", "said"),
    [
        (0, [], 1, "--local starts 1 worker process(es): 0 GPU(s) in use here"),
        (4, [], 4, "--local starts 4 worker process(es): 4 GPU(s)"),
        (4, ["scaling.use_gpu=false"], 1, "--local starts 1 worker"),
        (4, ["scaling.num_workers=2"], 2, ""),
    ],
)
def test_local_starts_one_process_per_gpu_unless_told(
    gpus: int,
    given: list[str],
    workers: int,
    said: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    from orchestrator import launch
    from tests.conftest import load_job_spec

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    spec, _ = launch.resolve(load_job_spec("imagenet_r152"), ["--local", *given])
    assert spec.scaling.num_workers == workers and spec.scaling.global_batch == 256
    err = capsys.readouterr().err
    assert said in err and ("is a cluster's" in err) == bool(said)
    spec, _ = launch.resolve(load_job_spec("imagenet_r152"), given)  # not --local: the file's
    assert spec.scaling.num_workers == (2 if "scaling.num_workers=2" in given else 8)


# --------------------------------------------------------------- free tags on the MLflow run


def test_free_tags_land_on_the_jobs_mlflow_run(stack: Any) -> None:
    """The loop hands its tracker spec.tracking.tags beside its own (orchestrator.train)."""
    import uuid

    from mlflow import MlflowClient

    from orchestrator.tracking.tracker import start_tracker

    spec = apply_overrides(
        JobSpec(name=f"tags-{uuid.uuid4().hex[:8]}"),
        [f"tracking.experiment=tags-{uuid.uuid4().hex[:8]}", "tracking.tags.team=vision"],
    )
    tracker = start_tracker(spec, {"model": spec.model.name, **spec.tracking.tags})
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.finish("FINISHED")
    assert tracker.run_id
    tags = MlflowClient().get_run(tracker.run_id).data.tags
    assert tags["team"] == "vision" and tags["orchestrator.job"] == spec.name


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--checkpoint-url", "gs://bucket/job/checkpoints"], "--checkpoint-url"),
        (["--checkpoint-url", "https://host/job/checkpoints"], "--checkpoint-url"),
        (["--runs", "abc", "--data-url", "az://container/data"], "--data-url"),
    ],
)
def test_the_ensemble_refuses_urls_it_cannot_read(argv: list[str], words: str) -> None:
    from orchestrator.ensemble_eval.config import parse_args

    with pytest.raises(UnsupportedURL, match=words):
        parse_args(argv)
    parse_args(["--checkpoint-url", "s3://bucket/job/checkpoints", "--data-url", "https://h/d"])
