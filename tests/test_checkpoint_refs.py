"""orchestrator.checkpoint_refs on local folders: a job's checkpoint folder (one definition,
trailing slashes of checkpoint.storage do not count), model references, and which committed
checkpoint a run's `best` or `last` means (`latest` is refused naming `last`). Through MLflow's
registry and S3: tests/test_ensemble_eval.py and tests/test_publish.py; through a study:
tests/test_study.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.checkpoint import Checkpointer, CheckpointStore
from orchestrator.checkpoint_refs import (
    CheckpointRefError,
    ModelRef,
    job_checkpoints_url,
    parse_model_ref,
    read_trainer_state,
    run_checkpoint,
    spec_checkpoints_url,
)
from orchestrator.errors import UsageError
from orchestrator.spec import CheckpointConfig, JobSpec
from orchestrator.tracking.tags import JOB_TAG


@pytest.mark.parametrize(
    ("storage", "url"),
    [
        ("s3://resnet/runs", "s3://resnet/runs/r50/checkpoints"),
        ("s3://resnet/runs/", "s3://resnet/runs/r50/checkpoints"),
        ("s3://resnet/runs//", "s3://resnet/runs/r50/checkpoints"),
        ("s3://resnet", "s3://resnet/r50/checkpoints"),
        ("/data/runs", "/data/runs/r50/checkpoints"),
        ("/data/runs/", "/data/runs/r50/checkpoints"),
        ("runs/", "runs/r50/checkpoints"),
    ],
)
def test_a_jobs_checkpoint_folder_ignores_trailing_slashes(storage: str, url: str) -> None:
    assert job_checkpoints_url(storage, "r50") == url
    spec = JobSpec(name="r50", checkpoint=CheckpointConfig(storage=storage))
    assert spec_checkpoints_url(spec) == url


def test_the_checkpointer_writes_where_everyone_looks(tmp_path: Path) -> None:
    cfg = CheckpointConfig(storage=f"{tmp_path}/")
    spec = JobSpec(name="job", checkpoint=cfg)
    writer = Checkpointer(cfg, spec_checkpoints_url(spec), rank=0)  # as the Trainer builds it
    assert writer.store.root == CheckpointStore(spec_checkpoints_url(spec)).root
    assert writer.store.root == f"{tmp_path}/job/checkpoints"


def test_an_empty_storage_or_job_is_refused() -> None:
    with pytest.raises(CheckpointRefError, match="checkpoint.storage=''") as err:
        job_checkpoints_url("", "r50")
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2
    with pytest.raises(CheckpointRefError, match="job ''"):
        job_checkpoints_url("s3://resnet/runs", "")


def test_model_references() -> None:
    assert parse_model_ref("resnet152@champion") == ModelRef("resnet152", "champion", None)
    assert parse_model_ref("team/resnet152/3") == ModelRef("team/resnet152", None, "3")
    assert str(parse_model_ref("r@best")) == "r@best" and str(parse_model_ref("r/2")) == "r/2"
    for bad in ("resnet152", "@best", "r@", "r/latest", "r/"):
        with pytest.raises(CheckpointRefError, match=f"model {bad!r}: expected NAME@ALIAS"):
            parse_model_ref(bad)


def _run(tags: dict[str, str], params: dict[str, str]) -> Any:
    """What run_checkpoint reads of an mlflow Run: its id, name, tags and params."""
    return SimpleNamespace(
        info=SimpleNamespace(run_id="abc123", run_name="r20-s0"),
        data=SimpleNamespace(tags=tags, params=params),
    )


def test_a_runs_best_latest_and_last(tmp_path: Path) -> None:
    store = CheckpointStore(job_checkpoints_url(str(tmp_path), "r20"))
    for step, err in ((2, 0.5), (4, 0.3), (6, 0.4)):
        store.put(step, "trainer.pt", b"state")
        store.commit(step, {"val/top1_err": err, "val/loss": 1.0 / step})
    run = _run({JOB_TAG: "r20"}, {"checkpoint.storage": f"{tmp_path}/"})
    best = run_checkpoint(run, "best")
    assert best.step == 4 and best.url.endswith("/r20/checkpoints/step-00000004")
    assert best.metric == "val/top1_err" and best.job == "r20"
    assert run_checkpoint(run, "last").step == 6
    with pytest.raises(CheckpointRefError, match="checkpoint 'latest': say 'last'"):
        run_checkpoint(run, "latest")
    by_loss = _run(run.data.tags, {**run.data.params, "checkpoint.best_metric": "val/loss"})
    assert run_checkpoint(by_loss, "best").step == 6  # the run's own metric
    no_metric = _run(run.data.tags, {**run.data.params, "checkpoint.best_metric": "val/top5_err"})
    with pytest.raises(CheckpointRefError, match="'val/top5_err' in its marker"):
        run_checkpoint(no_metric, "best")
    with pytest.raises(CheckpointRefError, match="checkpoint 'newest': expected one of best"):
        run_checkpoint(run, "newest")


def test_runs_without_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointRefError, match=r"run abc123 \(r20-s0\) has no checkpoint"):
        run_checkpoint(_run({}, {"checkpoint.storage": str(tmp_path)}), "best")
    empty = _run({JOB_TAG: "never"}, {"checkpoint.storage": str(tmp_path)})
    with pytest.raises(CheckpointRefError, match="has no committed checkpoint under .*never"):
        run_checkpoint(empty, "last")


def test_reading_a_trainer_state_names_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointRefError, match="run x: 'nowhere' is not a checkpoint URL"):
        read_trainer_state("nowhere", "run x")
    url = f"{job_checkpoints_url(str(tmp_path), 'j')}/step-00000002"
    with pytest.raises(CheckpointRefError, match="run x: cannot read .*it does not exist"):
        read_trainer_state(url, "run x")
