"""The path from submit to the first step: the start-up clock's lines, and the liveness sweep
that runs beside Ray Train's start instead of before it (issue 31)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid

import pytest

from orchestrator import startup_clock
from orchestrator.stack import Stack
from orchestrator.tracking import liveness
from orchestrator.tracking.tags import HEARTBEAT_TAG, JOB_TAG, STALE_SEEN_TAG
from tests.conftest import ROOT


def test_the_clock_says_each_phase_once_with_its_absolute_start() -> None:
    startup_clock.start(at=time.time() - 1.0)
    startup_clock.mark("imports")
    time.sleep(0.05)
    startup_clock.mark("pre-flight")
    line = startup_clock.line("the driver")
    head, phases = line.split("; ", 1)
    assert head.startswith("startup of the driver: t0=")
    assert abs(float(head.split("t0=")[1]) - (time.time() - 1.05)) < 0.5
    names = [part.rsplit(" ", 2)[0] for part in phases.split(" = ")[0].split(", ")]
    assert names == ["imports", "pre-flight"]
    assert float(phases.split(", ")[0].split()[1]) >= 0.99  # imports: since the start given
    assert startup_clock.line("the driver") == "" and startup_clock.said()
    startup_clock.mark("later")  # ignored: the start-up is over
    startup_clock.start()
    assert startup_clock.line("x") == ""  # nothing marked since the new start


def test_only_rank_0_says_its_first_step_and_every_rank_stops_marking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.train")
    startup_clock.start()
    startup_clock.mark("first batch")
    startup_clock.first_step(say=False)
    assert startup_clock.said() and not caplog.records
    startup_clock.start()
    startup_clock.mark("first batch")
    startup_clock.first_step(say=True)
    startup_clock.first_step(say=True)
    (record,) = caplog.records
    assert record.getMessage().startswith("startup of rank 0: t0=")
    assert ", first step " in record.getMessage()


def _stale_run(client: object, exp: str, job: str) -> str:
    tags = {JOB_TAG: job, HEARTBEAT_TAG: str(int(time.time() - 3600))}
    return client.create_run(exp, tags=tags, run_name=job).info.run_id  # type: ignore[attr-defined]


def test_the_background_sweep_leaves_the_starting_jobs_own_runs_to_it(stack: Stack) -> None:
    """Beside a job's start the sweep still notes other jobs' silent runs, but never the
    starting job's own: its rank 0 is about to continue one of them."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name = f"startup-sweep-{uuid.uuid4().hex[:8]}"
    exp = client.create_experiment(name)
    own = _stale_run(client, exp, "starting-job")
    other = _stale_run(client, exp, "another-job")
    thread = liveness.sweep_in_background(name, starting_job="starting-job")
    assert thread.daemon and thread.name == "liveness-sweep"
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert STALE_SEEN_TAG in client.get_run(other).data.tags
    assert STALE_SEEN_TAG not in client.get_run(own).data.tags
    assert client.get_run(own).info.status == "RUNNING"


DRIVER_ORDER = """
import sys
from orchestrator import launch
from orchestrator.spec import JobSpec
from orchestrator.tracking import liveness

seen = []
class Done:
    def join(self): pass
def sweep(experiment, starting_job):
    seen.append("ray.train.torch" in sys.modules)
    return Done()
liveness.sweep_in_background = sweep
launch.fit_on_ray = lambda spec, **kw: seen.append("fit") or {}
assert "ray.train.torch" not in sys.modules
launch._run_ray(JobSpec(name="order"))
print(seen)
"""


def test_the_driver_imports_ray_train_before_the_sweeps_thread_imports_mlflow() -> None:
    """Both imports are Python work under the driver's one GIL, and Ray Train's is on the path
    to the first step: the sweep starts once it is done (in a child: a fresh interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(
        [sys.executable, "-c", DRIVER_ORDER], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "[True, 'fit']", out.stdout[-2000:]


def test_the_overhead_bench_refuses_too_few_steps_before_anything_runs() -> None:
    """bench/overhead.py's rate needs the job's 10-step windows: a shorter run is refused up
    front (it used to run the whole job first, then fail)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "bench/overhead.py", "--steps", "10"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "--steps 10: at least 30" in out.stderr, out.stderr[-2000:]


def test_ray_floor_lines_are_read_through_rays_worker_prefix() -> None:
    """bench/ray_floor.py's two times as Ray's job log carries them (the worker's line under
    Ray's colored prefix, printed twice); a log without them is refused by name."""
    sys.path.insert(0, str(ROOT / "bench"))
    from ray_floor import parse

    log = (
        "ray floor driver t0=1796636713.064\n"
        "\x1b[36m(RayTrainWorker pid=2529)\x1b[0m ray floor first line at 1796636725.712\n"
        "\x1b[36m(RayTrainWorker pid=2529)\x1b[0m ray floor first line at 1796636725.712\n"
    )
    assert parse(log) == (1796636713.064, 1796636725.712)
    with pytest.raises(ValueError, match="no ray floor lines"):
        parse("ray floor driver t0=1796636713.064\n")
