"""Runs whose job died without a word do not stay RUNNING.

A job closes its own MLflow run when it ends, fails, or is stopped (SIGTERM: the driver marks it
KILLED). A SIGKILLed driver, or a head node that is lost, closes nothing. Two facts tell such a
run from a live one:

- its Ray job (tag `ray_job_id`) has ended (FAILED or STOPPED) while the run says RUNNING; or
- its heartbeat (tag `orchestrator.heartbeat`, stamped every HEARTBEAT_S by a thread of the
  rank-0 process, whatever the loop is doing) is older than STALE_S: the process is gone.

`sweep` marks those runs FAILED (KILLED where Ray says the job was stopped) with the reason in
`orchestrator.error`. It runs at every job's
start (for the job's experiment, before its workers start) and on demand:

    python -m orchestrator.tracking.liveness [--experiment NAME ...] [--stale-min 10]

(every experiment when none is named; cron it on a team's server). A resubmitted job
continues the same run and sets it RUNNING again, whoever marked it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import threading
import time
from typing import Any

from orchestrator.cli import run_cli
from orchestrator.errors import UsageError
from orchestrator.tracking.tags import ERROR_TAG, HEARTBEAT_TAG, JOB_TAG, RAY_JOB_TAG

log = logging.getLogger(__name__)


HEARTBEAT_S = 60.0
STALE_S = 600.0  # ten beats missed: longer than any pause of a live process (a GC, a slow save)


ENDED = ("FAILED", "STOPPED")  # Ray job states of a driver that is gone


class Heartbeat:
    """Stamps a run's heartbeat tag every `interval_s` from a daemon thread: it dies with the
    process, so the stamp stops exactly when the process does. Server errors are ignored (the
    next beat tries again)."""

    def __init__(self, client: Any, run_id: str, interval_s: float = HEARTBEAT_S) -> None:
        self.client, self.run_id, self.interval_s = client, run_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mlflow-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.set_tag(self.run_id, HEARTBEAT_TAG, str(int(time.time())))
            except Exception as err:  # noqa: BLE001 - a down server: the next beat retries
                log.debug("heartbeat of run %s not sent: %s", self.run_id, err)
            self._stop.wait(self.interval_s)


def ray_job_states() -> dict[str, str] | None:
    """{Ray job id: status} from the job server in RAY_ADDRESS (http://...), or None where
    there is none or it does not answer."""
    address = os.environ.get("RAY_ADDRESS", "")
    if not address.startswith("http"):
        return None
    try:
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(address).list_jobs()
    except Exception as err:  # noqa: BLE001 - no job server: the heartbeat alone decides
        log.info("Ray job server at %s not read: %s", address, err)
        return None
    return {j.job_id: str(j.status) for j in jobs if j.job_id}


def _why_dead(run: Any, now: float, stale_s: float, jobs: dict[str, str] | None) -> str | None:
    tags = run.data.tags
    job_id = tags.get(RAY_JOB_TAG, "")
    state = (jobs or {}).get(job_id, "")
    if state in ENDED:
        return f"its Ray job {job_id} ended {state} while the run was RUNNING (driver killed?)"
    beat = tags.get(HEARTBEAT_TAG)
    if beat and now - float(beat) > stale_s:
        last = dt.datetime.fromtimestamp(float(beat), dt.UTC).isoformat(timespec="seconds")
        return (
            f"no heartbeat for {(now - float(beat)) / 60:.0f} min (last {last}): the job died "
            "without a word (driver SIGKILLed or its node lost)"
        )
    return None


def sweep(
    client: Any,
    experiment_ids: list[str],
    *,
    stale_s: float = STALE_S,
    jobs: dict[str, str] | None = None,
    now: float | None = None,
) -> list[tuple[str, str]]:
    """Mark FAILED (or KILLED) every RUNNING run of this project in the experiments whose job
    is gone; returns (run id, reason) of each."""
    if not experiment_ids:
        return []
    now = time.time() if now is None else now
    runs = client.search_runs(
        experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    marked = []
    for run in runs:
        if JOB_TAG not in run.data.tags:
            continue  # not one of ours
        why = _why_dead(run, now, stale_s, jobs)
        if why is None:
            continue
        run_id = run.info.run_id
        status = "KILLED" if "ended STOPPED" in why else "FAILED"
        client.set_tag(run_id, ERROR_TAG, f"{why}; marked {status} at {_iso(now)}")
        client.set_terminated(run_id, status=status)
        log.warning(
            "MLflow run %s of job %s marked %s: %s", run_id, run.data.tags[JOB_TAG], status, why
        )
        marked.append((run_id, why))
    return marked


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def sweep_experiment(name: str) -> list[tuple[str, str]]:
    """`sweep` one experiment by name, with Ray's job states where a job server answers. Never
    raises: a job's start must not fail on bookkeeping."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return []
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        exp = client.get_experiment_by_name(name)
        return sweep(client, [exp.experiment_id], jobs=ray_job_states()) if exp else []
    except Exception as err:  # noqa: BLE001
        from orchestrator.tracking.redaction import scrub

        log.warning("could not check experiment %s for dead runs: %s", name, scrub(err)[:300])
        return []


def main(argv: list[str] | None = None) -> int:
    """The command line: mark the dead runs ended, one line each; exit code 2 on bad input."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.tracking.liveness",
        description="Mark FAILED the RUNNING runs whose job died without a word.",
    )
    p.add_argument("--experiment", action="append", default=[], help="default: all")
    p.add_argument("--stale-min", type=float, default=STALE_S / 60, help="heartbeat age")
    a = p.parse_args(argv)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise UsageError(
            "MLFLOW_TRACKING_URI is not set (local stack: python -m orchestrator.stack env)"
        )
    from mlflow import MlflowClient

    client = MlflowClient()
    if a.experiment:
        found = {n: client.get_experiment_by_name(n) for n in a.experiment}
        missing = [n for n, e in found.items() if e is None]
        if missing:
            raise UsageError(f"no such experiment: {', '.join(missing)}")
        ids = [e.experiment_id for e in found.values() if e is not None]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    marked = sweep(client, ids, stale_s=a.stale_min * 60, jobs=ray_job_states())
    for run_id, why in marked:
        print(f"{run_id}: {why}")
    print(f"{len(marked)} runs marked ended")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
