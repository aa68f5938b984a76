"""Nothing is lost: SIGKILLed workers, a SIGKILLed job, the object store restarting mid-run,
a DeepSpeed ZeRO-1/2 worker SIGKILLed (resumed from every rank's shards).

Every run here is the smoke job (2 Ray Train workers, DDP over gloo, shards on the real S3)
through the real Ray head; each faulted run must end with weights bit-identical to an
uninterrupted run of the same spec, and with per-step losses identical in MLflow. The one
uninterrupted run (DDP) is every kill test's reference, the ZeRO ones' too: DDP, ZeRO-1 and
ZeRO-2 train this job bit-identically (same data, same sums), so a ZeRO run that resumed
without every rank's optimizer shard drifts from it as it would from a ZeRO baseline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import time
import uuid

import pytest
from mlflow import MlflowClient

from orchestrator.stack import Stack
from orchestrator.tracking import liveness
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("chaos", ROOT / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chaos)

STORAGE = "s3://resnet/runs"
# long enough that a failure a second after a checkpoint strikes mid-run: a step of the smoke
# job takes 0.1-0.3 s on the 2-core box (a checkpoint every 4)
STEPS = 48
EXPERIMENT = f"fault-tolerance-{uuid.uuid4().hex[:6]}"


def times_logged(text: str, needle: str) -> int:
    """How many times a job log says `needle`: Ray folds alike lines of several workers (the
    ranks' numbers differ) into one ending '[repeated Nx across cluster]'."""
    found = 0
    for line in text.splitlines():
        if needle in line:
            folded = re.search(r"\[repeated (\d+)x across cluster\]", line)
            found += int(folded[1]) if folded else 1
    return found


def common(dataset: str) -> list[str]:
    return [
        f"data.url={dataset}",
        f"checkpoint.storage={STORAGE}",
        f"tracking.experiment={EXPERIMENT}",
        *chaos.CHAOS_SPEC,
        f"schedule.max_iters={STEPS}",
    ]


def job_runs(name: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`orchestrator.job` = '{name}'"
    )


def losses(stack: Stack, name: str) -> list[tuple[int, float]]:
    (run,) = job_runs(name)
    history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    return [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]


@pytest.fixture(scope="module")
def baseline(stack: Stack, smoke_dataset: str) -> tuple[dict, list]:
    name = f"ft-base-{uuid.uuid4().hex[:6]}"
    job = chaos.submit([f"name={name}", *common(smoke_dataset)])
    assert chaos.wait(job) == "SUCCEEDED", chaos.logs(job)[-3000:]
    return chaos.final_weights(chaos.store(STORAGE, name)), losses(stack, name)


def assert_same_run(stack: Stack, name: str, baseline: tuple[dict, list]) -> None:
    weights, history = baseline
    assert chaos.identical(chaos.final_weights(chaos.store(STORAGE, name)), weights), (
        "final weights differ"
    )
    got = losses(stack, name)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "each step logged once, in order"
    assert got == history, "per-step losses differ from the uninterrupted run"


def test_worker_sigkilled_twice_resumes_bit_identical(
    stack: Stack, smoke_dataset: str, baseline: tuple
) -> None:
    name = f"ft-kill-{uuid.uuid4().hex[:6]}"
    job = chaos.submit([f"name={name}", *common(smoke_dataset)])
    st = chaos.store(STORAGE, name)
    step = chaos.wait_for_checkpoint(st, 4, job)
    first = chaos.worker_pid(st, step, 0)
    time.sleep(0.5)  # mid-interval, between checkpoints
    os.kill(chaos.worker_pid(st, step, 1), signal.SIGKILL)
    # the second failure (within scaling.max_failures=3) strikes the restarted group: at its
    # first checkpoint, which a new rank 0 wrote
    while chaos.worker_pid(st, step, 0) == first:
        step = chaos.wait_for_checkpoint(st, step + 1, job)
    time.sleep(0.5)
    os.kill(chaos.worker_pid(st, step, 0), signal.SIGKILL)
    assert chaos.wait(job) == "SUCCEEDED", chaos.logs(job)[-3000:]
    text = chaos.logs(job)
    assert times_logged(text, "resumed from") >= 2 * 2, "both restarts resumed every rank"
    assert_same_run(stack, name, baseline)


def test_job_sigkilled_then_resubmitted_resumes(
    stack: Stack, smoke_dataset: str, baseline: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"ft-job-{uuid.uuid4().hex[:6]}"
    job = chaos.submit([f"name={name}", *common(smoke_dataset)])
    st = chaos.store(STORAGE, name)
    chaos.wait_for_checkpoint(st, 4, job)
    time.sleep(1.0)
    os.kill(chaos.driver_pid(name), signal.SIGKILL)  # the whole job: its driver dies
    assert chaos.wait(job) != "SUCCEEDED"
    # nothing closed its run; the sweep sees its Ray job ended and does
    (run,) = job_runs(name)
    assert run.info.status == "RUNNING"
    # the sweep's command in this process: a child would only add its imports (its CLI has
    # tests of its own)
    assert liveness.main(["--experiment", EXPERIMENT]) == 0
    out = capsys.readouterr().out
    assert f"{run.info.run_id}: its Ray job" in out and "ended FAILED" in out
    (run,) = job_runs(name)
    assert run.info.status == "FAILED" and "driver killed?" in run.data.tags["orchestrator.error"]
    again = chaos.submit([f"name={name}", *common(smoke_dataset)])  # same name, no flag
    assert chaos.wait(again) == "SUCCEEDED", chaos.logs(again)[-3000:]
    assert "resumed: True" in chaos.logs(again)
    assert_same_run(stack, name, baseline)


def test_object_store_restart_mid_run(stack: Stack, smoke_dataset: str, baseline: tuple) -> None:
    name = f"ft-s3-{uuid.uuid4().hex[:6]}"
    job = chaos.submit([f"name={name}", *common(smoke_dataset)])
    chaos.wait_for_checkpoint(chaos.store(STORAGE, name), 4, job)
    stack.stop_service("s3")
    time.sleep(6)
    stack.up(("s3",))
    assert chaos.wait(job) == "SUCCEEDED", chaos.logs(job)[-3000:]
    assert_same_run(stack, name, baseline)


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_worker_sigkilled_resumes_from_every_ranks_shards(
    stack: Stack, smoke_dataset: str, baseline: tuple, stage: int
) -> None:
    """DeepSpeed keeps each rank's optimizer partition (ZeRO-1: momentum; ZeRO-2: gradients
    too) in its own shard: a resumed group must load all of them, or the momentum of the
    parameters a rank owns restarts at zero and the weights drift from the uninterrupted run
    (the DDP one: uninterrupted, this job trains bit-identically under DDP and ZeRO-1/2)."""
    from orchestrator.storage import read_url

    spec = [*common(smoke_dataset), "scaling.strategy=deepspeed", f"scaling.zero_stage={stage}"]
    name = f"ft-zero{stage}-kill-{uuid.uuid4().hex[:6]}"
    job = chaos.submit([f"name={name}", *spec])
    st = chaos.store(STORAGE, name)
    step = chaos.wait_for_checkpoint(st, 4, job)
    marker = json.loads(read_url(f"{STORAGE}/{name}/checkpoints/step-{step:08d}/COMMITTED"))
    optim = [f for f in marker["files"] if f.startswith("shards/") and "optim_states" in f]
    assert sorted("rank_1" in f for f in optim) == [False, True], f"a shard per rank: {optim}"
    time.sleep(1.0)
    os.kill(chaos.worker_pid(st, step, 1), signal.SIGKILL)
    assert chaos.wait(job) == "SUCCEEDED", chaos.logs(job)[-3000:]
    assert times_logged(chaos.logs(job), "resumed from") >= 2, "every rank resumed"
    assert chaos.identical(chaos.final_weights(st), baseline[0]), (
        f"ZeRO-{stage}: final weights differ from the uninterrupted run (DDP, which trains this "
        "job bit-identically: were they to differ uninterrupted, after a DeepSpeed upgrade, "
        "give this test an uninterrupted ZeRO run of its own)"
    )
    got = losses(stack, name)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)) and got == baseline[1]


def test_failure_budget_exhausted_gives_a_summary(stack: Stack, smoke_dataset: str) -> None:
    name = f"ft-budget-{uuid.uuid4().hex[:6]}"
    job = chaos.submit([f"name={name}", *common(smoke_dataset), "scaling.max_failures=0"])
    st = chaos.store(STORAGE, name)
    step = chaos.wait_for_checkpoint(st, 4, job)
    os.kill(chaos.worker_pid(st, step, 1), signal.SIGKILL)
    assert chaos.wait(job) == "FAILED"
    text = chaos.logs(job)
    assert f"job {name} FAILED after 0 restarts" in text
    assert "Latest committed checkpoint: step" in text and "Resubmit the same name" in text
    client = MlflowClient(stack.env()["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`orchestrator.job` = '{name}'"
    )
    assert run.info.status == "FAILED" and "orchestrator.error" in run.data.tags
