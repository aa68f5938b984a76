"""Spot and elastic clusters on Ray (orchestrator.preemption, orchestrator.launch).

A grown group, then a drained node, on a 2-node local Ray cluster: an elastic job
(scaling.num_workers=[1,2], scaling.max_failures=0) trains on real shards in S3, started with one
worker on the head alone. A node joins and Ray grows the group to two: the one-worker group
commits its step first, and the larger group resumes there. That node is then drained as a spot
reclaim is (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds
N`), and killed at the deadline. The job must commit the step in progress when the notice
arrives and say so once, go on training, commit once more just before the deadline and then
wait, so that no completed step is lost; after the node is gone it must resume from that last
commit on the one node left, uncounted, with every step once in MLflow. (One job for both: a
job's start on Ray is most of such a test's time and CPU.)
A study's one-worker trial, which trains in its Tune actor without Ray Train, gets the same
drain on its node: the same commits, and Tune's restart (uncounted) resumes from the last one.

The unit tests drive the step boundary with a stand-in for ray.train.get_preemption_info (the
cadence and the once-per-notice rule); everything else here runs the real thing.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator import launch, preemption, runtime
from orchestrator.preemption import StepBoundary
from orchestrator.spec import CheckpointConfig, JobSpec, SpecError, apply_overrides
from orchestrator.stack import Stack
from tests.conftest import ROOT, joined_node
from tests.test_multinode import chaos

# ------------------------------------------------------------------ the step boundary alone
# (no `import ray` in this process before the stack's fixtures set RAY_AUTH_MODE: Ray reads
# its auth settings once, at import, and a cluster with token auth would then refuse us)


class PreemptionInfo:
    """ray.train.PreemptionInfo's fields, as the step boundary reads them."""

    def __init__(self, deadline_ms: int | None, preempted_node_to_ranks: dict[str, list[int]]):
        self.deadline_ms, self.preempted_node_to_ranks = deadline_ms, preempted_node_to_ranks


class FakeRay:
    """ray.train.get_preemption_info's stand-in: the notice Ray would broadcast, and the steps
    it was asked at."""

    def __init__(self) -> None:
        self.info: PreemptionInfo | None = None
        self.asked: list[int] = []
        self.step = 0

    def __call__(self) -> PreemptionInfo | None:
        self.asked.append(self.step)
        return self.info


def _boundary(fake: FakeRay, rank: int = 0, **fields: Any) -> StepBoundary:
    cfg = CheckpointConfig(storage="unused", every_iters=0, **fields)
    return StepBoundary(cfg, rank=rank, ask_ray=fake)


def _poll(boundary: StepBoundary, fake: FakeRay, step: int, saved_step: int = -1) -> Any:
    fake.step = step
    return boundary.poll(step, saved_step)


def test_the_last_commit_comes_before_the_deadline_and_training_then_waits() -> None:
    """After a notice, the step boundary measures what the notice's save and a step took, and
    once the deadline is within twice that (+5 s) it asks for one more commit and a wait: no
    step completed after the last commit, so none is lost when the node goes."""
    fake, now = FakeRay(), [1000.0]
    boundary = _boundary(fake, preemption_poll_every=1)
    assert boundary.ray is not None
    boundary.ray.clock = lambda: now[0]
    fake.info = PreemptionInfo(int((now[0] + 60) * 1000), {"node-b": [1]})
    first = _poll(boundary, fake, 10)
    assert first.save and first.commit and not first.wait_s  # the notice's own commit
    now[0] += 3.0  # the save, its commit and a step took 3 s: the margin is 2 x 3 + 5 = 11 s
    assert not _poll(boundary, fake, 11, saved_step=10).save
    assert boundary.ray.margin == 11.0
    now[0] = 1000 + 60 - 12  # 12 s left: not yet
    assert not _poll(boundary, fake, 12, saved_step=10).wait_s
    now[0] = 1000 + 60 - 10  # 10 s left: the last save, then wait out the deadline
    last = _poll(boundary, fake, 13, saved_step=10)
    assert last.save and last.commit and last.wait_s > 0
    assert not _poll(boundary, fake, 14, saved_step=13).wait_s  # once per notice


def test_a_resize_asked_by_ray_commits_the_step_then_waits_and_the_ask_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ray's controller, about to resize the group, asks each worker (commit_before_resize, on
    the actor's own thread): the next step boundary saves and commits that step and waits, and
    the ask returns once the loop says the commit is written; once per ask."""
    fake = FakeRay()
    boundary = _boundary(fake, preemption_poll_every=1, grace_s=30)
    try:
        assert not _poll(boundary, fake, 1).save
        answer: list[bool] = []
        asker = threading.Thread(target=lambda: answer.append(preemption.commit_before_resize(30)))
        asker.start()
        deadline = time.monotonic() + 10
        while not preemption._resize_asked.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with caplog.at_level(logging.WARNING, logger="orchestrator.preemption"):
            decision = _poll(boundary, fake, 2)
        assert (decision.save, decision.commit, decision.resize) == (True, True, True)
        assert decision.wait_s == 30 + 60  # the controller stops the group meanwhile
        assert "step 2: Ray is resizing the elastic worker group" in caplog.text
        assert asker.is_alive() and not answer  # it waits for the commit itself
        preemption.resize_committed()
        asker.join(10)
        assert answer == [True]
        assert not _poll(boundary, fake, 3, saved_step=2).resize  # once per ask
    finally:  # this process's state, for the tests after this one, pass or fail
        preemption.resize_committed()  # an asker still waiting returns
        preemption._resize_asked.clear()
        preemption._resize_committed.clear()


def test_ray_is_asked_every_preemption_poll_every_steps_and_nothing_is_saved_without_notice() -> (
    None
):
    fake = FakeRay()
    boundary = _boundary(fake, preemption_poll_every=4)
    decisions = [_poll(boundary, fake, step) for step in range(1, 13)]
    assert fake.asked == [4, 8, 12]  # the same steps on every rank: the call is a barrier
    assert not any(d.save or d.commit or d.stop_signal for d in decisions)


def test_a_notice_saves_and_commits_once_then_training_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeRay()
    boundary = _boundary(fake, preemption_poll_every=2)
    assert not _poll(boundary, fake, 2).save
    deadline_ms = int((time.time() + 30) * 1000)
    fake.info = PreemptionInfo(deadline_ms, {"a" * 56: [1]})
    with caplog.at_level(logging.WARNING, logger="orchestrator.preemption"):
        assert not _poll(boundary, fake, 3).save  # not asked at step 3: seen at step 4
        notice = _poll(boundary, fake, 4)
        later = [_poll(boundary, fake, step, saved_step=4) for step in range(5, 11)]
    assert (notice.save, notice.commit, notice.stop_signal) == (True, True, 0)
    assert "node aaaaaaaaaaaa (ranks 1)" in notice.notice
    # Ray keeps answering with the same notice until the group restarts: no second save
    assert not any(d.save or d.commit or d.notice for d in later)
    (line,) = [r.getMessage() for r in caplog.records if "preemption notice" in r.getMessage()]
    assert re.search(r"at step 4: node a{12} \(ranks 1\): (29|30) s to its deadline", line), line
    assert "training on" in line and "resume from step 4" in line


def test_a_second_node_reclaimed_is_a_new_notice_and_saves_again() -> None:
    fake = FakeRay()
    boundary = _boundary(fake, preemption_poll_every=1)
    fake.info = PreemptionInfo(None, {"node-a": [1]})
    first = _poll(boundary, fake, 1)
    assert first.save and "no deadline given" in first.notice
    fake.info = PreemptionInfo(None, {"node-a": [1], "node-b": [2, 3]})  # Ray merges them
    second = _poll(boundary, fake, 2, saved_step=1)
    assert second.save and second.commit and "node node-b (ranks 2, 3)" in second.notice


def test_a_notice_at_a_step_already_saved_commits_without_a_second_save() -> None:
    fake = FakeRay()
    boundary = _boundary(fake, preemption_poll_every=5)
    fake.info = PreemptionInfo(None, {"n": [0]})
    decision = _poll(boundary, fake, 5, saved_step=5)  # every_iters saved this very step
    assert (decision.save, decision.commit) == (False, True)


def test_only_rank_0_logs_the_notice(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRay()
    fake.info = PreemptionInfo(None, {"n": [0]})
    with caplog.at_level(logging.WARNING, logger="orchestrator.preemption"):
        assert _poll(_boundary(fake, rank=1, preemption_poll_every=1), fake, 1).save
    assert not [r for r in caplog.records if "preemption notice" in r.getMessage()]


def test_the_ray_worker_s_source_is_the_default_and_none_means_no_asking() -> None:
    fake = FakeRay()
    cfg = CheckpointConfig(storage="unused", every_iters=0, preemption_poll_every=1)
    assert StepBoundary(cfg, rank=0).ray is None  # outside Ray: never asked
    runtime.set_preemption_source(fake)
    try:
        boundary = StepBoundary(cfg, rank=0)
    finally:
        runtime.set_preemption_source(None)
    boundary.poll(1, -1)
    assert fake.asked == [0]


# ------------------------------------------------------------------ spec and launch


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "checkpoint.preemption_poll_every=0",
            "checkpoint.preemption_poll_every=0 is out of range",
        ),
        ("scaling.max_preemption_failures=-2", "scaling.max_preemption_failures=-2 is out of"),
        ("scaling.resize_interval_s=-1", "scaling.resize_interval_s=-1.0 is out of range"),
    ],
)
def test_bad_spot_fields_are_refused_by_name(override: str, message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        apply_overrides(JobSpec(name="x"), [override])


RAY_CONFIGS = """
from orchestrator import launch
from orchestrator.spec import JobSpec, apply_overrides
from ray.train import FailureConfig, ScalingConfig

spec = apply_overrides(
    JobSpec(name="x"),
    ["scaling.num_workers=[2,8]", "scaling.max_failures=0", "scaling.resize_interval_s=5"],
)
scaling = ScalingConfig(
    num_workers=launch.worker_count(spec),
    elastic_resize_monitor_interval_s=spec.scaling.resize_interval_s,
)
failure = launch.failure_config(spec)
assert isinstance(failure, FailureConfig)
fixed = apply_overrides(JobSpec(name="x"), ["scaling.num_workers=4"])
print(scaling.min_workers, scaling.max_workers, scaling.elastic_resize_monitor_interval_s,
      failure.max_failures, failure.max_preemption_failures, launch.worker_count(fixed))
"""


def test_ray_gets_the_range_and_a_preemption_budget_apart_from_max_failures() -> None:
    """Ray's own classes read what launch gives them (in a child: Ray stays unimported here)."""
    out = subprocess.run(
        [sys.executable, "-c", RAY_CONFIGS], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["2", "8", "5.0", "0", "-1", "4"], out.stdout


def test_local_runs_an_elastic_range_at_its_most_workers_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[int] = []
    monkeypatch.setattr(launch, "_torchrun", lambda spec, n: started.append(n) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    spec = apply_overrides(JobSpec(name="x"), ["scaling.num_workers=[1,3]"])
    launch.run_local(spec)
    assert started == [3]
    err = capsys.readouterr().err
    assert "scaling.num_workers=[1,3] is elastic only on Ray; --local runs 3 workers" in err


# ------------------------------------------------------------------ a drained node on Ray


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants at once: a reclaimed VM gives no warning."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def spot_node(cluster_head: Stack, tmp_path: Path) -> Iterator[tuple[int, str, str]]:
    """A second raylet with 2 CPUs joined to the run's joinable head (which has 2): a worker of
    2 CPUs on each. Yields (its process, its node id, the head's GCS address); stopped
    afterwards if the test has not killed it."""
    with joined_node(cluster_head, 2, tmp_path / "spot.log") as (pid, node):
        yield pid, node, cluster_head.gcs_address


# the notice's lead: Ray's watcher on the test head (conftest.QUICK_RECOVERY) and a trial's actor
# look for drains every second; the first commit, then the last before the deadline (at most
# twice a save and a step, + 5 s, before it) fit in it with steps between them
DEADLINE_S = 12
# Long enough to outlast the group's start on one worker, the node's join, Ray growing the group
# (scaling.resize_interval_s), the notice and its deadline; the test stops the job three steps
# after the resume
STEPS = 3000


def _wait_for(what: str, check: Any, job: str, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        assert not chaos.wait_status_terminal(job), (
            f"job ended before {what}:\n" + chaos.logs(job)[-5000:]
        )
        time.sleep(0.5)
    raise AssertionError(f"no {what} in {timeout_s} s:\n{chaos.logs(job)[-5000:]}")


@contextlib.contextmanager
def _connected(gcs: str) -> Iterator[None]:
    """This process connected to the cluster at `gcs` for the block, unless it already is."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=gcs, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


def _wait_for_free_cpus(cpus: int, gcs: str, timeout_s: float = 120) -> None:
    """Wait until the cluster has `cpus` CPUs free: a Ray job or actor of an earlier test may
    still hold some of the head's while it tears down."""
    import ray

    with _connected(gcs):
        deadline = time.monotonic() + timeout_s
        while (free := ray.available_resources().get("CPU", 0)) < cpus:
            assert time.monotonic() < deadline, f"{free} CPUs free, not {cpus}: {ray.nodes()}"
            time.sleep(0.5)


def _forget_ray_train_reservations(gcs: str) -> None:
    """Drop what Ray Train jobs stopped earlier still reserve. An elastic job reserves nodes
    through Ray's AutoscalingCoordinator actor, and one stopped or killed never cancels its
    request: the reservation holds for 180 s (Ray's AUTOSCALING_REQUESTS_EXPIRE_TIME_S), and the
    next elastic job starts smaller (a CI run's drain test got one worker, with four CPUs free)
    or waits (the grow test waited 3 min after the drain test's stop). With no job running,
    between tests, the actor is killed; the next job's request creates a fresh one."""
    import ray

    with _connected(gcs), contextlib.suppress(ValueError):  # ValueError: no elastic job yet
        ray.kill(ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator"))


def _drain(gcs: str, node: str) -> float:
    """`ray drain-node` as a spot reclaim's notice (deadline DEADLINE_S); returns the latest time
    (time.time()) Ray's deadline can be: the GCS took the drain before the CLI returned. The
    node must not be killed before the deadline: with the test cluster's quick health checks
    (QUICK_RECOVERY) it would die of "missed heartbeats", not of its drain, and Ray Train and
    Tune count that as a failure."""
    drain = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"), "drain-node", f"--address={gcs}",
            f"--node-id={node}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message=spot reclaim (test)", f"--deadline-remaining-seconds={DEADLINE_S}",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert drain.returncode == 0, drain.stdout + drain.stderr
    return time.time() + DEADLINE_S


def _lines(text: str, pattern: str) -> list[str]:
    """The log's lines matching `pattern`: what an assertion shows of the job's story."""
    return [line[-200:] for line in text.splitlines() if re.search(pattern, line)][:20]


def _continued(logs: str, name: str) -> dict[int, int]:
    """Each restarted group's attempt and the run's last logged step its tracker found there
    (rank 0's line; not told apart by pid: Ray folds lines alike but for their numbers)."""
    said = rf"continuing MLflow run \w+ of job {name} \(attempt (\d+), last step (\d+)\)"
    return {int(attempt): int(step) for attempt, step in re.findall(said, logs)}


def _step_after_rank_1(logs: str, name: str, step: int) -> bool:
    started = logs.find(f"rank 1: {name} from step")
    return started >= 0 and re.search(rf"\bstep {step} of ", logs[started:]) is not None


@pytest.mark.slow
def test_an_elastic_group_grows_then_its_drained_node_commits_and_the_job_resumes_there(
    cluster_head: Stack, smoke_dataset: str, tmp_path: Path
) -> None:
    """One elastic job (scaling.num_workers=[1,2], 2 CPUs a worker, scaling.max_failures=0)
    through both halves of a spot cluster's life.

    It grows: started on the head alone, which has room for one worker, it trains; a node joins
    and Ray grows the group to two (after scaling.resize_interval_s=5). Before Ray stops the
    one-worker group, its worker commits the step it is on: the two-worker group resumes
    there, and no step is trained twice.

    It shrinks: that node is drained as a spot reclaim is, and killed at the deadline. The group
    commits the step in progress at the notice and says so once, trains on, commits once more
    just before the deadline and waits there; Ray restarts it on the head alone, uncounted, and
    it resumes from that last commit. Every step is in MLflow once."""
    gcs = cluster_head.gcs_address
    _wait_for_free_cpus(2, gcs)  # the head's own: the group starts there with one worker
    _forget_ray_train_reservations(gcs)
    name, experiment = f"spot-{uuid.uuid4().hex[:6]}", f"spot-{uuid.uuid4().hex[:6]}"
    job = chaos.submit(
        [
            f"name={name}", f"data.url={smoke_dataset}", f"tracking.experiment={experiment}",
            "scaling.num_workers=[1,2]", "scaling.cpus_per_worker=2", "scaling.max_failures=0",
            "scaling.resize_interval_s=5", "scaling.global_batch=16", "scaling.torch_threads=1",
            f"schedule.max_iters={STEPS}", "schedule.milestones=[]", "checkpoint.every_iters=0",
            "checkpoint.at_epoch_end=false", "checkpoint.preemption_poll_every=1",
            "checkpoint.keep_last=5", "tracking.log_every=1", "eval.every_iters=0",
            "eval.at_end=false", "data.num_workers=1", "tracking.publish=false",
        ]
    )  # fmt: skip
    st = chaos.store("s3://resnet/runs", name)
    try:
        _wait_for("step 3", lambda: re.search(r"\bstep 3 of ", chaos.logs(job)), job)
        assert not re.search(rf"rank 1: {name} from step", chaos.logs(job))  # one worker
        assert "world sizes 1..2 (elastic)" in chaos.logs(job)  # the pre-flight listed them
        assert st.latest() is None  # every_iters=0: nothing committed before the resize
        with joined_node(cluster_head, 2, tmp_path / "joined.log") as (node_pid, node):
            # ---- the group grows onto the node
            said = r"step (\d+): Ray is resizing the elastic worker group"
            found = _wait_for("the resize", lambda: re.search(said, chaos.logs(job)), job, 120)
            grown = _wait_for("its commit", lambda: st.find(int(found[1])), job, 60)
            _wait_for(
                "three steps of the two-worker group",
                lambda: _step_after_rank_1(chaos.logs(job), name, grown.step + 3),
                job,
                180,
            )
            out = chaos.logs(job)
            assert f"rank 1: {name} from step {grown.step} (resumed: True" in out, out[-5000:]
            # the larger group's tracker finds the run's last logged step (log_every=1): the
            # one-worker group trained nothing past its commit (it waited there)
            continued = _continued(out, name)
            assert continued == {2: grown.step}, _lines(out, "resumed|resizing|continuing")
            assert "did not commit their step first" not in out

            # ---- the node is drained, then reclaimed at the deadline
            latest_deadline = _drain(gcs, node)
            # steps are read from the job's own lines, never from what is newest at some
            # moment: on a loaded box a read can come late, after the next commit or Ray's
            # restart of the group
            notice = r"preemption notice at step (\d+): node (\w+) \(ranks (\d)\)"
            line = _wait_for(
                "the notice", lambda: re.search(notice, chaos.logs(job)), job, DEADLINE_S + 30
            )
            noticed = int(line[1])
            assert node.startswith(line[2]), line[0]
            committed = _wait_for("its commit", lambda: st.find(noticed), job, 60)
            # one message (Ray echoes a worker's log lines, some twice: count distinct ones)
            assert len(set(re.findall(r"preemption notice at step [^\n]*", chaos.logs(job)))) == 1
            files = set(st.storage.sizes(f"step-{committed.step:08d}"))
            assert {"rank-00000.pt", "rank-00001.pt"} <= files, files  # both ranks, a node each

            # the last commit before the deadline, after which the group waits for the node
            said_last = r"step (\d+): the last commit before the preemption deadline"
            found = _wait_for(
                "the last commit", lambda: re.search(said_last, chaos.logs(job)), job, 120
            )
            last = _wait_for("its marker", lambda: st.find(int(found[1])), job, 60)
            assert last.step > committed.step, (last, committed)
            # the reclaim comes at Ray's deadline (in the job log), never before it (_drain)
            said = re.findall(r"deadline_ms=(\d+)", chaos.logs(job))
            deadline = int(said[0]) / 1000 if said else latest_deadline
            time.sleep(max(0.0, deadline - time.time()))
            if not chaos.wait_status_terminal(job):  # Ray may have restarted it at its deadline
                _kill_tree(node_pid)  # the reclaim itself, at the deadline
            # the group restarted on the head resumes from the last commit and trains on
            resumed = f"rank 0 resumed from {st.root} step {last.step}"
            _wait_for("the resume", lambda: resumed in chaos.logs(job), job, 300)
            after = rf"\bstep {last.step + 3} of "
            _wait_for(
                "three steps after it",
                lambda: re.search(after, (text := chaos.logs(job))[text.find(resumed) :]),
                job,
                120,
            )
            # still running: with scaling.max_failures=0 a counted failure would have ended it
            assert not chaos.wait_status_terminal(job), chaos.logs(job)[-6000:]
    finally:
        if not chaos.wait_status_terminal(job):  # the rest of the steps prove nothing more
            chaos.client().stop_job(job)
            chaos.wait(job, timeout_s=120)
        _forget_ray_train_reservations(gcs)
    out = chaos.logs(job)
    # The group that trained to the last commit must not train past it (it waits there): the
    # group restarted after the reclaim, the last attempt, resumes from that commit, and its
    # tracker names the run's last logged step (log_every=1), the last step any earlier group
    # trained
    continued = _continued(out, name)
    assert continued[2] == grown.step and continued[max(continued)] == last.step, (
        continued,
        _lines(out, "resumed|preemption|continuing|last commit|resizing"),
    )
    assert f"rank 0: {name} from step {last.step} (resumed: True" in out, out[-6000:]
    # Ray's restart after the reclaim is no resize of a running group: no commit asked of the
    # workers gone, no warning that they did not (commit_before_resize)
    assert "did not commit their step first" not in out, _lines(out, "did not commit")
    # on the head alone: one worker
    assert not re.search(rf"rank 1: {name} from step {last.step}\b", out), out[-6000:]
    steps = [s for s, _ in chaos.metric_steps(experiment, name)]
    assert steps == list(range(1, len(steps) + 1)), steps  # every step once, the replayed too
    assert len(steps) >= last.step  # (the last few may not have reached MLflow before the stop)


STUDY_STEPS = (
    3000  # outlasts the notice and its deadline; the test stops the study after the resume
)


@pytest.mark.slow
def test_a_study_trial_in_its_actor_commits_on_a_drain_and_tune_restarts_it_uncounted(
    spot_node: tuple[int, str, str], cifar_dataset: str
) -> None:
    """A one-worker study trial training in its Tune actor (orchestrator.study.in_actor) on the
    drained node: the same commits as a Ray Train worker (the step in progress at the notice,
    the last one before the deadline, then a wait); the node killed at the deadline, Tune
    restarts the trial without counting it (scaling.max_failures=0 allows no failure) and it
    resumes from that last commit, having trained nothing after it."""
    import shlex

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_pid, node, gcs = spot_node
    _wait_for_free_cpus(4, gcs)
    # the head's 2 CPUs held, so that the trial's actor (2 CPUs) starts on the node drained
    head = ray.get_runtime_context().get_node_id()
    holder = (
        ray.remote(num_cpus=2)(_Holder)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False))
        .remote()
    )
    ray.get(holder.ready.remote(), timeout=120)
    name, experiment = f"sa{uuid.uuid4().hex[:6]}", f"spot-{uuid.uuid4().hex[:6]}"
    args = [
        f"study.name={name}", "study.cells=cifar_resnet20", "study.seeds=1",
        f"data.url={cifar_dataset}", f"tracking.experiment={experiment}",
        "scaling.num_workers=1", "scaling.cpus_per_worker=2", "scaling.max_failures=0",
        "scaling.global_batch=16", "scaling.torch_threads=1", f"schedule.max_iters={STUDY_STEPS}",
        "schedule.milestones=[]", "checkpoint.every_iters=0", "checkpoint.at_epoch_end=false",
        "checkpoint.preemption_poll_every=1", "tracking.log_every=1", "eval.every_iters=0",
        "eval.at_end=false", "data.num_workers=0", "tracking.publish=false",
    ]  # fmt: skip
    job = chaos.client().submit_job(
        entrypoint="python jobs/cifar10_table6.py " + " ".join(map(shlex.quote, args))
    )
    try:
        st = chaos.store("s3://resnet/runs", f"{name}-cifar_resnet20-s0")
        _wait_for("step 3", lambda: re.search(r"\bstep 3 of ", chaos.logs(job)), job)
        assert "train in their Tune actors" in chaos.logs(job)
        reclaim_at = _drain(gcs, node)
        notice = r"preemption notice at step (\d+): node (\w+) \(ranks 0\)"
        line = _wait_for("the notice", lambda: re.search(notice, chaos.logs(job)), job, 60)
        assert node.startswith(line[2]), line[0]  # the trial's actor ran on the drained node
        assert _wait_for("its commit", lambda: st.find(int(line[1])), job, 60)
        said_last = r"step (\d+): the last commit before the preemption deadline"
        found = _wait_for(
            "the last commit", lambda: re.search(said_last, chaos.logs(job)), job, 120
        )
        last = _wait_for("its marker", lambda: st.find(int(found[1])), job, 60)
        assert last.step > int(line[1])
        time.sleep(max(0.0, reclaim_at - time.time()))
        _kill_tree(node_pid)  # the reclaim, at the deadline (not before: see _drain)
        ray.kill(holder)  # the head's CPUs free for the restarted trial
        resumed = f"resumed from {st.root} step {last.step}"
        _wait_for("the resume", lambda: resumed in chaos.logs(job), job, 300)
        # the first attempt trained nothing after its last commit: the restarted one's tracker
        # finds the run's last logged step there (log_every=1)
        again = r"continuing MLflow run \w+ of job \S+ \(attempt 2, last step (\d+)\)"
        continued = _wait_for(
            "the run continued", lambda: re.search(again, chaos.logs(job)), job, 120
        )
        assert int(continued[1]) == last.step, (continued[0], last.step)
    finally:
        chaos.client().stop_job(job)  # the rest of the steps prove nothing more
        chaos.wait(job, timeout_s=120)


class _Holder:
    """A placeholder actor that holds the CPUs it was given."""

    def ready(self) -> bool:
        return True
