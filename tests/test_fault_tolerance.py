"""Nothing is lost: SIGKILLed workers, a SIGKILLed job, the object store restarting mid-run,
a DeepSpeed ZeRO-1/2 worker SIGKILLed (resumed from every rank's shards).

Every faulted run here is the smoke job (2 Ray Train workers, DDP over gloo, shards on the real S3)
through the real Ray head; each faulted run must end with weights bit-identical to an
uninterrupted run of the same spec, and with per-step losses identical in MLflow. The one
uninterrupted run (DDP) is every kill test's reference, the ZeRO ones' too: DDP, ZeRO-1 and
ZeRO-2 train this job bit-identically (same data, same sums), so a ZeRO run that resumed
without every rank's optimizer shard drifts from it as it would from a ZeRO baseline. It runs
under `--local` (torchrun, the same 2 ranks): this job trains bit-identically through Ray and
through torchrun, and a local run costs about half the CPU of a Ray job (no job supervisor, no
Ray Train helper actors; bench/job_cpu.py), CPU the kill tests' jobs beside it use.

Where the seconds go: each job's start (about 15 s: driver, Ray Train's group, MLflow) and a
restart (about 15 s); no job here publishes its models after the last step
(`tracking.publish=false`: no test here reads them). So jobs share the head's 2 CPUs
(`scaling.cpus_per_worker=0.33`, room for three; Ray gives a worker one thread either way): the
uninterrupted run (local) trains beside the first kill test's job; the ZeRO-1, ZeRO-2 and
failure-budget jobs side by side (one fixture kills all three); one job has the object store
restarted, then its driver SIGKILLed (two tests read it). A kill waits for a commit and then
for a step logged after it (a kill between checkpoints: steps are trained again after the
resume), never for a set time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
# long enough that the worker test's second kill strikes mid-run: it lands a step after the
# restarted group's first checkpoint (step 8 or 12; a checkpoint every 4), and a step of the
# smoke job takes 0.1-0.3 s on a quiet 2-core box, more with two jobs side by side
STEPS = 32
EXPERIMENT = f"fault-tolerance-{uuid.uuid4().hex[:6]}"
POLL_S = 0.2
SUBMITTED: list[str] = []  # this module's Ray jobs: those still running at its end are stopped


def times_logged(text: str, needle: str) -> int:
    """How many times a job log says `needle`: Ray folds alike lines of several workers (the
    ranks' numbers differ) into one ending '[repeated Nx across cluster]'."""
    found = 0
    for line in text.splitlines():
        if needle in line:
            folded = re.search(r"\[repeated (\d+)x across cluster\]", line)
            found += int(folded[1]) if folded else 1
    return found


def resumed_steps(text: str) -> list[int]:
    """The steps a job log's ranks say they resumed from (any rank: Ray may fold the lines)."""
    return [int(s) for s in re.findall(r"rank \d+ resumed from \S+ step (\d+)", text)]


def common(dataset: str) -> list[str]:
    return [
        f"data.url={dataset}",
        f"checkpoint.storage={STORAGE}",
        f"tracking.experiment={EXPERIMENT}",
        *chaos.CHAOS_SPEC,
        f"schedule.max_iters={STEPS}",
        # up to three jobs side by side on the 2-CPU head; only Ray's reservation changes
        "scaling.cpus_per_worker=0.33",
        "tracking.publish=false",  # no test here reads a registered model or the paper report
    ]


def submit(args: list[str]) -> str:
    job = chaos.submit(args)
    SUBMITTED.append(job)
    return job


@pytest.fixture(scope="module", autouse=True)
def stop_leftover_jobs(stack: Stack) -> Iterator[None]:
    """A failed test can leave its job (or the baseline) training: stop it, so that it does
    not hold the head's CPUs through the next module."""
    yield
    for job in SUBMITTED:
        if not chaos.wait_status_terminal(job):
            chaos.client().stop_job(job)


def job_runs(name: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`orchestrator.job` = '{name}'"
    )


def losses(name: str) -> list[tuple[int, float]]:
    (run,) = job_runs(name)
    history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    return [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]


RUN_IDS: dict[str, str] = {}  # job name -> its MLflow run (one per job, across restarts)


def newest_step(name: str) -> int:
    """The newest step the job's run has logged (0: none, or no run yet). Polled several times
    a second: the run is looked up once."""
    if name not in RUN_IDS:
        runs = job_runs(name)
        if not runs:
            return 0
        RUN_IDS[name] = runs[0].info.run_id
    history = MlflowClient().get_metric_history(RUN_IDS[name], "train/loss")
    return max((m.step for m in history), default=0)


def wait_for_step(name: str, after: int, job: str, timeout_s: float = 600) -> int:
    """Wait until the job has logged a step after `after` (log_every=1); returns it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        step = newest_step(name)
        if step > after:
            return step
        if chaos.wait_status_terminal(job):
            raise RuntimeError(f"job ended before step {after + 1}:\n{chaos.logs(job)[-3000:]}")
        time.sleep(POLL_S)
    raise TimeoutError(f"job {name} logged no step after {after} in {timeout_s} s")


class Baseline:
    """The uninterrupted run, under `--local`: started when the module's first test starts, so
    that it trains beside that test's job; waited for where a test first compares with it."""

    def __init__(self, dataset: str, log: Path) -> None:
        self.name = f"ft-base-{uuid.uuid4().hex[:6]}"
        self.log = log
        with open(log, "w") as out:  # a file, not a pipe: nobody reads it while it trains
            self.proc = subprocess.Popen(
                chaos.kinds.local_cmd(self.name, common(dataset), []),
                cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},  # as a Ray worker's one thread
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._result: tuple[dict, list] | None = None

    def get(self) -> tuple[dict, list]:
        """(final weights, per-step losses)."""
        if self._result is None:
            code = self.proc.wait(timeout=600)
            assert code == 0, self.log.read_text()[-3000:]
            weights = chaos.final_weights(chaos.store(STORAGE, self.name))
            self._result = weights, losses(self.name)
        return self._result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def baseline(
    stack: Stack, smoke_dataset: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Baseline]:
    run = Baseline(smoke_dataset, tmp_path_factory.mktemp("ft-baseline") / "local.log")
    yield run
    run.stop()  # a failed test can leave it training


def assert_same_run(name: str, baseline: Baseline) -> None:
    weights, history = baseline.get()
    assert chaos.identical(chaos.final_weights(chaos.store(STORAGE, name)), weights), (
        "final weights differ from the uninterrupted run (--local: were an uninterrupted Ray "
        "run of this spec to differ from it too, Ray and torchrun no longer train it alike)"
    )
    got = losses(name)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "each step logged once, in order"
    assert got == history, "per-step losses differ from the uninterrupted run"


def test_worker_sigkilled_twice_resumes_bit_identical(
    stack: Stack, smoke_dataset: str, baseline: Baseline
) -> None:
    name = f"ft-kill-{uuid.uuid4().hex[:6]}"
    job = submit([f"name={name}", *common(smoke_dataset)])
    st = chaos.store(STORAGE, name)
    step = chaos.wait_for_checkpoint(st, 4, job, poll_s=POLL_S)
    first = chaos.worker_pid(st, step, 0)
    wait_for_step(name, step, job)  # mid-interval, between checkpoints
    os.kill(chaos.worker_pid(st, step, 1), signal.SIGKILL)
    # the second failure (within scaling.max_failures=3) strikes the restarted group: after
    # its first checkpoint, which a new rank 0 wrote (a step after it is the new group's: the
    # killed one never got past that checkpoint's step)
    while chaos.worker_pid(st, step, 0) == first:
        step = chaos.wait_for_checkpoint(st, step + 1, job, poll_s=POLL_S)
    wait_for_step(name, step, job)
    os.kill(chaos.worker_pid(st, step, 0), signal.SIGKILL)
    assert chaos.wait(job, poll_s=POLL_S) == "SUCCEEDED", chaos.logs(job)[-3000:]
    text = chaos.logs(job)
    assert times_logged(text, "resumed from") >= 2 * 2, "both restarts resumed every rank"
    assert f"job {name}: tracking.publish=false: no models registered" in text, text[-3000:]
    assert_same_run(name, baseline)


def sweep_closed(name: str) -> dict[str, Any]:
    """The liveness sweep over the experiment, in this process (its CLI has tests of its own),
    with the job's run before and after it."""
    (before,) = job_runs(name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = liveness.main(["--experiment", EXPERIMENT])
    (after,) = job_runs(name)
    return {"before": before, "code": code, "out": out.getvalue(), "after": after}


def latest_step_once_readable(st: Any, timeout_s: float = 120) -> int:
    """The newest committed step, read as soon as S3, just started again, serves the list."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            latest = st.latest()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)
            continue
        return latest.step if latest else 0


def placement_groups_once_removed(stack: Stack, run: Any, timeout_s: float = 30) -> list[str]:
    """The states of the placement groups the run's Ray job created, once none is left placed
    (Ray's GCS removes a job's groups when its driver is gone; the job's driver starts no
    PlacementGroupCleaner: orchestrator.ray_callbacks.torch_trainer)."""
    from ray.util.state import list_placement_groups

    job = [("creator_job_id", "=", run.data.tags["ray_job_id"])]
    deadline = time.monotonic() + timeout_s
    while True:
        states = [pg.state for pg in list_placement_groups(stack.env()["RAY_ADDRESS"], filters=job)]
        if all(state == "REMOVED" for state in states) or time.monotonic() > deadline:
            return states
        time.sleep(POLL_S)


@pytest.fixture(scope="module")
def s3_restart_then_driver_killed(stack: Stack, smoke_dataset: str) -> dict[str, Any]:
    """One job, two faults: the object store stopped for 6 s after a commit and started
    again; once the job has committed a checkpoint after that, its driver is SIGKILLed
    (mid-interval); the sweep closes its run; the same name is resubmitted and resumes."""
    name = f"ft-job-{uuid.uuid4().hex[:6]}"
    job = submit([f"name={name}", *common(smoke_dataset)])
    st = chaos.store(STORAGE, name)
    chaos.wait_for_checkpoint(st, 4, job, poll_s=POLL_S)
    stack.stop_service("s3")
    time.sleep(6)  # the outage itself: a checkpoint (every 4 steps) is due within it
    stack.up(("s3",))  # returns once S3 answers
    back = latest_step_once_readable(st)
    # a commit S3 did not show when it came back: made after the outage, by the same job
    after = chaos.wait_for_checkpoint(st, back + 1, job, poll_s=POLL_S)
    wait_for_step(name, after, job)
    os.kill(chaos.driver_pid(name), signal.SIGKILL)  # the whole job: its driver dies
    first = {"status": chaos.wait(job, poll_s=POLL_S), "log": chaos.logs(job)}
    sweep = sweep_closed(name)
    first["placement_groups"] = placement_groups_once_removed(stack, sweep["before"])
    again = submit([f"name={name}", *common(smoke_dataset)])  # same name, no flag
    status = chaos.wait(again, poll_s=POLL_S)
    return {
        "name": name,
        "after_outage": after,
        "first": first,
        "sweep": sweep,
        "again": {"status": status, "log": chaos.logs(again)},
    }


def test_job_sigkilled_then_resubmitted_resumes(
    s3_restart_then_driver_killed: dict[str, Any], baseline: Baseline
) -> None:
    got = s3_restart_then_driver_killed
    assert got["first"]["status"] != "SUCCEEDED", got["first"]["log"][-3000:]
    # its worker group's placement group went with its driver: nothing holds the CPUs
    groups = got["first"]["placement_groups"]
    assert groups and set(groups) == {"REMOVED"}, groups
    # nothing closed its run; the sweep sees its Ray job ended and does
    sweep = got["sweep"]
    run_id = sweep["before"].info.run_id
    assert sweep["before"].info.status == "RUNNING"
    assert sweep["code"] == 0
    assert f"{run_id}: its Ray job" in sweep["out"] and "ended FAILED" in sweep["out"]
    after = sweep["after"]
    assert (
        after.info.status == "FAILED" and "driver killed?" in after.data.tags["orchestrator.error"]
    )
    assert got["again"]["status"] == "SUCCEEDED", got["again"]["log"][-3000:]
    assert "resumed: True" in got["again"]["log"]
    assert_same_run(got["name"], baseline)


def test_object_store_restart_mid_run(
    s3_restart_then_driver_killed: dict[str, Any], baseline: Baseline
) -> None:
    """S3 stopped for 6 s after a commit: the job goes on and commits again (the fixture waits
    for that), and the run, resumed from a checkpoint of after the outage, ends identical."""
    got = s3_restart_then_driver_killed
    resumed = resumed_steps(got["again"]["log"])
    assert resumed and min(resumed) >= got["after_outage"], (
        f"resumed from {resumed}, not from the commit after the outage ({got['after_outage']})"
    )
    assert got["again"]["status"] == "SUCCEEDED", got["again"]["log"][-3000:]
    assert_same_run(got["name"], baseline)


def kill_after_first_commit(jobs: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    """For each (name, job), side by side: after its first commit at step 4 or later and a
    step logged after it (mid-interval), SIGKILL rank 1. Returns, per key, the optimizer
    shard files that commit lists."""
    from orchestrator.storage import read_url

    commits: dict[str, int] = {}
    optim: dict[str, list[str]] = {}
    while len(optim) < len(jobs):
        for key, (name, job) in jobs.items():
            if key in optim:
                continue
            st = chaos.store(STORAGE, name)
            if key not in commits:
                latest = st.latest()
                if latest is not None and latest.step >= 4:
                    commits[key] = latest.step
            elif newest_step(name) > commits[key]:
                step = commits[key]
                url = f"{STORAGE}/{name}/checkpoints/step-{step:08d}/COMMITTED"
                files = json.loads(read_url(url))["files"]
                optim[key] = [f for f in files if f.startswith("shards/") and "optim_states" in f]
                os.kill(chaos.worker_pid(st, step, 1), signal.SIGKILL)
                continue
            if chaos.wait_status_terminal(job):
                raise RuntimeError(f"{name} ended before its kill:\n{chaos.logs(job)[-3000:]}")
        time.sleep(POLL_S)
    return optim


@pytest.fixture(scope="module")
def side_by_side_kills(stack: Stack, smoke_dataset: str) -> dict[str, dict[str, Any]]:
    """Three jobs side by side, each with rank 1 SIGKILLed mid-run: ZeRO-1 and ZeRO-2
    (scaling.max_failures=3: they resume) and a DDP one with scaling.max_failures=0 (it
    fails). Keys: zero1, zero2, budget."""
    specs = {
        f"zero{stage}": ["scaling.strategy=deepspeed", f"scaling.zero_stage={stage}"]
        for stage in (1, 2)
    }
    specs["budget"] = ["scaling.max_failures=0"]
    jobs = {}
    for key, extra in specs.items():
        name = f"ft-{key}-kill-{uuid.uuid4().hex[:6]}"
        jobs[key] = (name, submit([f"name={name}", *common(smoke_dataset), *extra]))
    optim = kill_after_first_commit(jobs)
    return {
        key: {
            "name": name,
            "optim": optim[key],
            "status": chaos.wait(job, poll_s=POLL_S),
            "log": chaos.logs(job),
        }
        for key, (name, job) in jobs.items()
    }


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_worker_sigkilled_resumes_from_every_ranks_shards(
    side_by_side_kills: dict[str, dict[str, Any]], baseline: Baseline, stage: int
) -> None:
    """DeepSpeed keeps each rank's optimizer partition (ZeRO-1: momentum; ZeRO-2: gradients
    too) in its own shard: a resumed group must load all of them, or the momentum of the
    parameters a rank owns restarts at zero and the weights drift from the uninterrupted run
    (the DDP one: uninterrupted, this job trains bit-identically under DDP and ZeRO-1/2)."""
    got = side_by_side_kills[f"zero{stage}"]
    optim = got["optim"]
    assert sorted("rank_1" in f for f in optim) == [False, True], f"a shard per rank: {optim}"
    assert got["status"] == "SUCCEEDED", got["log"][-3000:]
    assert times_logged(got["log"], "resumed from") >= 2, "every rank resumed"
    weights, history = baseline.get()
    assert chaos.identical(chaos.final_weights(chaos.store(STORAGE, got["name"])), weights), (
        f"ZeRO-{stage}: final weights differ from the uninterrupted run (DDP, which trains this "
        "job bit-identically: were they to differ uninterrupted, after a DeepSpeed upgrade, "
        "give this test an uninterrupted ZeRO run of its own)"
    )
    run = losses(got["name"])
    assert [s for s, _ in run] == list(range(1, STEPS + 1)) and run == history


def test_failure_budget_exhausted_gives_a_summary(
    side_by_side_kills: dict[str, dict[str, Any]],
) -> None:
    """scaling.max_failures=0 and a worker SIGKILLed: the job fails with a summary that says
    where it stands and how to resume, and its run is closed FAILED with the error."""
    got = side_by_side_kills["budget"]
    name, text = got["name"], got["log"]
    assert got["status"] == "FAILED", text[-3000:]
    assert f"job {name} FAILED after 0 restarts" in text
    assert "Latest committed checkpoint: step" in text and "Resubmit the same name" in text
    (run,) = job_runs(name)
    assert run.info.status == "FAILED" and "orchestrator.error" in run.data.tags
