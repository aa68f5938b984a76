"""The walking skeleton through every real service: `ray job submit` -> 2 Ray Train workers
(DDP, gloo) reading shards from S3 -> one MLflow run -> a committed checkpoint on S3.
(`ray job stop` ending a job's run KILLED is tested in test_job_lease, on the running job whose
second submission is refused: one job for both.)"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from orchestrator.stack import Stack
from orchestrator.storage import open_storage
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
POLL_S = 0.25  # a job's status and the store are read this often (cheap HTTP calls)


def submit(stack: Stack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    ray = Path(sys.executable).parent / "ray"
    return subprocess.run(
        [str(ray), "job", "submit", "--", "python", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**__import__("os").environ, **stack.env()},
    )


def _chaos() -> Any:
    """bench/chaos.py's job helpers (submit, wait, logs through Ray's job API)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chaos", ROOT / "bench" / "chaos.py")
    assert spec is not None and spec.loader is not None
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    return chaos


def test_skeleton_job_via_ray_job_submit(stack: Stack, smoke_dataset: str) -> None:
    name = f"smoke-{uuid.uuid4().hex[:6]}"
    experiment = f"e2e-{name}"
    proc = submit(
        stack,
        "jobs/smoke.py",
        f"name={name}",
        f"data.url={smoke_dataset}",
        f"tracking.experiment={experiment}",
        "eval.every_iters=10",
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr

    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "one MLflow run per job, not one per worker"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == name
    assert run.data.params["model.name"] == "cifar_resnet20"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["world_size"] == "2"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in losses]
    assert steps == sorted(set(steps)) and steps[-1] == 30
    assert len({round(m.value, 6) for m in losses}) > 1, "the loss must change"
    assert losses[-1].value < losses[0].value, "a learnable dataset: the loss must fall"
    val = client.get_metric_history(run.info.run_id, "val/top1_err")
    assert val and val[-1].value < 0.75  # 4 classes: chance is 0.75
    # the driver published once the workers were released: the paper report and the models
    report = client.download_artifacts(run.info.run_id, "paper/comparison.csv")
    top1 = Path(report).read_text().splitlines()[1].split(",")  # this_run_final: 4th column
    assert float(top1[3]) == pytest.approx(val[-1].value * 100, abs=1e-3)
    last = client.get_model_version_by_alias(name, "last")
    assert last.tags["checkpoint_url"] == f"s3://resnet/runs/{name}/checkpoints/step-00000030"
    assert last.run_id == run.info.run_id

    step = open_storage(f"s3://resnet/runs/{name}/checkpoints/step-00000030")
    assert step.exists("COMMITTED")
    marker = json.loads(step.get("COMMITTED"))
    assert {"trainer.pt", "rank-00000.pt", "rank-00001.pt"} <= set(marker["files"])

    # Ray Train's controller ran, its DatasetManager and PlacementGroupCleaner did not
    # (orchestrator.ray_callbacks.torch_trainer): this job passes no Ray Datasets, nor does any
    # job before it on this stack; its controller died with its driver (a study's trials keep
    # the cleaner, hence this job's own actors)
    from ray.util.state import list_actors

    def actors(cls: str, *, of_this_job: bool = True) -> list:
        job = [("job_id", "=", run.data.tags["ray_job_id"])] if of_this_job else []
        filters = [("class_name", "=", cls), *job]
        return list_actors(stack.env()["RAY_ADDRESS"], filters=filters)

    assert actors("TrainController") and actors("SynchronizationActor")
    assert not actors("DatasetManager", of_this_job=False)
    assert not actors("PlacementGroupCleaner")


def test_an_error_no_restart_can_fix_fails_the_ray_job_at_once(stack: Stack) -> None:
    """A NonFiniteLoss in the workers ends the job on its first attempt, with its message,
    although scaling.max_failures allows 3 restarts (orchestrator.ray_callbacks.fail_fast).
    Submitted through Ray's job API (the skeleton test covers the `ray job submit` command
    itself)."""
    chaos = _chaos()
    name = f"nan-{uuid.uuid4().hex[:6]}"
    job = chaos.submit(
        [
            f"name={name}",
            "data.source=synthetic",
            "data.synthetic_classes=10",
            "optim.lr=1e12",
            "scaling.num_workers=1",  # Ray's failure policy is tested, not the ranks
            "scaling.max_failures=3",
            "checkpoint.every_iters=0",
            "tracking.enabled=false",
            "checkpoint.storage=s3://resnet/tests/nan-runs",
        ]
    )
    status, text = chaos.wait(job, timeout_s=600, poll_s=POLL_S), chaos.logs(job)
    assert status == "FAILED", text[-5000:]
    assert f"job {name} FAILED at once, not restarted" in text, text[-5000:]
    assert "Cause: rank " in text and "NonFiniteLoss: non-finite loss at step" in text
    assert "after 3 restarts" not in text
    assert "RETRY" not in text, "Ray's failure policy restarted the workers"
