"""Preemption without Ray and time-based checkpoints (orchestrator.preemption): a notice signal
commits the step in progress (+1 at most) on every rank and the job exits 128 + the signal; a
resubmission resumes there and ends with the weights of an uninterrupted run, and continues
the MLflow run the notice marked KILLED; checkpoint.every_minutes saves on time, the same step
on every rank. Two torchrun workers (gloo) train CIFAR's ResNet-20 on synthetic batches."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from orchestrator.preemption import StepBoundary
from orchestrator.runtime import Terminated
from orchestrator.spec import CheckpointConfig, SpecError, apply_overrides
from orchestrator.tracking.tags import JOB_TAG
from tests import lanes
from tests.conftest import ROOT, odd_shards_data, run_script
from tests.test_train import local_job

STEPS = 80  # ~30 ms each here: the notice lands well before the end
TWO_WORKERS = [
    "scaling.num_workers=2",
    "scaling.global_batch=16",
    f"schedule.max_iters={STEPS}",
    "checkpoint.every_iters=0",
    "tracking.log_every=1",
]


def _job(storage: Path, name: str, *overrides: str) -> list[str]:
    return local_job(storage, name, *TWO_WORKERS, *overrides)


def _committed(storage: Path, name: str) -> list[Path]:
    return sorted(
        p for p in (storage / name / "checkpoints").glob("step-*") if (p / "COMMITTED").exists()
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    state = torch.load(io.BytesIO((folder / "trainer.pt").read_bytes()), weights_only=True)
    return state["strategy"]["model"]


def _interrupted(cmd: list[str], notice: signal.Signals) -> tuple[int, str]:
    """Run `cmd`, send `notice` once step 5 is logged; (exit code, output)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout is not None
    hung = threading.Timer(300, proc.kill)  # a job that never ends fails the test, not CI
    hung.start()
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not sent and re.search(r"orchestrator\.train: step 5 ", line):
                proc.send_signal(notice)
                sent = True
        code = proc.wait()
    finally:
        hung.cancel()
    return code, "".join(lines)


# the uninterrupted run saves on the clock as well: a save changes no weight (the notice tests
# end bit-identical to it), and test_every_minutes_saves_on_time... reads its commits
CLOCK = ["checkpoint.every_minutes=0.01", "checkpoint.keep_last=1000"]


@pytest.fixture(scope="module")
def clock_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (every_minutes=0.01, every_iters=0); its checkpoint storage. One
    for both lanes (the SIGTERM case runs in the services lane, the SIGUSR1 one in the other)."""

    def train(storage: Path) -> None:
        run_script(*_job(storage, "whole", *CLOCK)[1:], env={"OMP_NUM_THREADS": "1"})

    return lanes.built_once(tmp_path_factory, "preemption-uninterrupted", train)


@pytest.fixture(scope="module")
def uninterrupted(clock_run: Path) -> dict[str, torch.Tensor]:
    final = _committed(clock_run, "whole")[-1]
    assert final.name == f"step-{STEPS:08d}"
    return _weights(final)


@pytest.mark.parametrize(
    "notice",
    [
        pytest.param(signal.SIGTERM, marks=pytest.mark.services, id="SIGTERM"),  # tracked
        pytest.param(signal.SIGUSR1, id="SIGUSR1"),
    ],
)
def test_notice_commits_the_step_in_progress_and_the_resubmission_ends_identical(
    tmp_path: Path,
    uninterrupted: dict[str, torch.Tensor],
    notice: signal.Signals,
    request: pytest.FixtureRequest,
) -> None:
    """SIGTERM's run is tracked too: the job's one MLflow run is KILLED after the notice and
    FINISHED after the resubmission, every step's training loss logged once (one job for both
    checks, not two)."""
    tracked = notice == signal.SIGTERM
    experiment = f"preemption-{uuid.uuid4().hex[:6]}"
    if tracked:
        request.getfixturevalue("stack")  # MLflow
    tracking = ["tracking.enabled=true", f"tracking.experiment={experiment}"] if tracked else []
    cmd = _job(tmp_path, "spot", f"checkpoint.preempt_signal={notice.name}", *tracking)
    code, out = _interrupted(cmd, notice)
    assert code == 128 + notice, f"exit {code}, not {128 + notice}:\n{out[-4000:]}"
    arrived = [
        int(s) for s in re.findall(rf"rank \d: {notice.name} arrived during step (\d+)", out)
    ]
    assert arrived, f"no rank logged the notice:\n{out[-4000:]}"
    committed = _committed(tmp_path, "spot")
    assert len(committed) == 1, committed  # every_iters=0: the notice's save only
    step = int(committed[0].name.split("-")[1])
    assert min(arrived) <= step <= min(arrived) + 1 < STEPS, (arrived, step)
    assert {p.name for p in committed[0].glob("rank-*.pt")} == {"rank-00000.pt", "rank-00001.pt"}
    if tracked:
        (run,) = _job_runs(experiment, "spot")
        assert run.info.status == "KILLED"

    resumed = run_script(*cmd[1:], env={"OMP_NUM_THREADS": "1"})
    assert f"from step {step} (resumed: True" in resumed
    final = _weights(_committed(tmp_path, "spot")[-1])
    assert final.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(final[key], value), key
    # equal weights prove nothing if the resumed run trained nothing after the notice's step
    assert not torch.equal(_weights(committed[0])["fc.weight"], final["fc.weight"])
    if tracked:
        (again,) = _job_runs(experiment, "spot")
        assert (again.info.run_id, again.info.status) == (run.info.run_id, "FINISHED")
        history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1))


def _job_runs(experiment: str, name: str) -> list:
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{name}'")


def test_every_minutes_saves_on_time_at_the_same_step_on_every_rank(clock_run: Path) -> None:
    steps = [int(p.name.split("-")[1]) for p in _committed(clock_run, "whole")]
    assert steps[-1] == STEPS
    on_time = steps[:-1]  # every_iters=0 and no epoch end: only the clock saved these
    assert len(on_time) >= 2, f"0.6 s apart over a run of {STEPS} steps, saved at {steps}"
    for step in on_time:  # a commit needs every rank's files for the step
        files = (clock_run / "whole" / "checkpoints" / f"step-{step:08d}").glob("rank-*.pt")
        assert {p.name for p in files} == {"rank-00000.pt", "rank-00001.pt"}


# ------------------------------------------------------------------ one process, no job


def _boundary(**fields: object) -> StepBoundary:
    return StepBoundary(CheckpointConfig(storage="unused", every_iters=0, **fields), rank=0)


def test_a_notice_sets_a_flag_that_the_next_step_boundary_acts_on() -> None:
    boundary = _boundary(preempt_signal="SIGUSR1")
    before = signal.getsignal(signal.SIGUSR1)
    boundary.install()
    try:
        assert boundary.poll(3, saved_step=-1).stop_signal == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # the process goes on: only a flag is set
        decision = boundary.poll(4, saved_step=-1)
        assert (decision.save, decision.stop_signal) == (True, signal.SIGUSR1)
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # in time: timer disarmed
    finally:
        boundary.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_step_that_outlasts_the_grace_ends_as_a_sigterm_did() -> None:
    boundary = _boundary(grace_s=0.05)
    boundary.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Terminated, match=r"grace_s=0.05") as stopped:
            time.sleep(5)  # a stuck step
        assert stopped.value.signum == signal.SIGTERM
    finally:
        boundary.uninstall()


def test_the_clock_saves_once_due_and_restarts_at_every_save() -> None:
    boundary = _boundary(every_minutes=0.001)  # 60 ms
    assert not boundary.poll(1, saved_step=-1).save
    time.sleep(0.1)
    assert boundary.poll(2, saved_step=-1).save
    assert not boundary.poll(3, saved_step=2).save  # saved at step 2: the clock restarted


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint.preempt_signal=USR1", "did you mean SIGUSR1"),
        ("checkpoint.preempt_signal=SIGKILL", "not a signal a preemption notice can be"),
        ("checkpoint.grace_s=0", "checkpoint.grace_s=0.0 is out of range"),
        ("checkpoint.every_minutes=-1", "checkpoint.every_minutes=-1.0 is out of range"),
    ],
)
def test_bad_notice_fields_are_refused_by_name(override: str, message: str) -> None:
    from orchestrator.spec import JobSpec

    with pytest.raises(SpecError, match=re.escape(message)):
        apply_overrides(JobSpec(name="x"), [override])


def test_a_notice_reaches_loader_workers_too_and_the_rank_still_commits(
    tmp_path: Path, odd_local_shards: Path
) -> None:
    """torchrun stops ranks by process group, so the rank's DataLoader workers get SIGTERM as
    well: they leave it to the rank, which commits at the next step boundary."""
    data = odd_shards_data(odd_local_shards, num_workers=1)
    cmd = _job(tmp_path, "shards", *data, "checkpoint.every_iters=4", "scaling.global_batch=8")
    code, out = _interrupted(cmd, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, f"exit {code}:\n{out[-4000:]}"
    assert "DataLoader worker" not in out, out[-4000:]
    arrived = [int(s) for s in re.findall(r"rank \d: SIGTERM arrived during step (\d+)", out)]
    step = int(_committed(tmp_path, "shards")[-1].name.split("-")[1])
    assert arrived and min(arrived) <= step <= min(arrived) + 1, (arrived, step)


class _Numbers(torch.utils.data.IterableDataset):
    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(torch.arange(3))


def test_a_notice_to_the_ranks_group_before_a_loader_worker_left_it_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the test above can hit on a loaded box, made wide: a loader worker that has
    set torch's signal handlers but not yet left the rank's process group (its init) gets the
    SIGTERM torchrun sends the group, from a process other than its parent, which torch's
    handler takes as fatal. It must live and hand over its batches."""
    from torch.utils.data._utils import signal_handling

    from orchestrator.data.workers import dataloader
    from orchestrator.spec import DataConfig

    at_window, sent = tmp_path / "at-window", tmp_path / "sent"
    torch_handlers = signal_handling._set_worker_signal_handlers

    def wide_window() -> None:  # runs in the forked worker, before its init
        torch_handlers()
        (tmp_path / "pid").write_text(str(os.getpid()))
        (tmp_path / "pid").rename(at_window)  # whole when it appears
        while not sent.exists():
            time.sleep(0.01)

    monkeypatch.setattr(signal_handling, "_set_worker_signal_handlers", wide_window)
    batches = iter(dataloader(_Numbers(), DataConfig(timeout_s=60), workers=1))
    deadline = time.monotonic() + 60
    while not at_window.exists():
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.01)
    # as torchrun's stop of the rank's group: sent by another process, not the worker's parent
    subprocess.run(["kill", "-TERM", at_window.read_text()], check=True)
    sent.touch()
    assert [int(b) for b in batches] == [0, 1, 2]
