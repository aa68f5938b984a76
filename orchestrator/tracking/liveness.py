"""Runs whose job died without a word do not stay RUNNING.

A job closes its own MLflow run when it ends, fails, or is stopped (SIGTERM: the driver marks it
KILLED). A SIGKILLed driver, or a head node that is lost, closes nothing. Two facts tell such a
run from a live one, and neither compares one machine's clock with another's:

- its Ray job (tags `ray_job_id` and `ray_cluster`, the cluster's session name: job ids repeat
  across clusters) has ended (FAILED or STOPPED) on the cluster whose job server answers here;
- its heartbeat (tag `orchestrator.heartbeat`, stamped every HEARTBEAT_S by a thread of the
  rank-0 process with the tracking server's time, the Date of its answer) is older than STALE_S
  by the server's time now, at two sweeps CONFIRM_S apart (server time) with no beat between:
  the first notes it (tag `orchestrator.stale_seen`), the second marks it. So a run whose
  beats could not reach a server that was down is not marked when the server comes back: its
  heartbeat resumes before the confirming sweep.

`sweep` marks those runs FAILED (KILLED where Ray says the job was stopped) with the reason in
`orchestrator.error`. It runs at every job's start (for the job's experiment, before its
workers start) and on demand:

    python -m orchestrator.tracking.liveness [--experiment NAME ...] [--stale-min 10]

(every experiment when none is named; cron it on a team's server, every few minutes). A
resubmitted job continues the same run and sets it RUNNING again, whoever marked it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import logging
import os
import threading
import time
from typing import Any, NamedTuple

from orchestrator.cli import run_cli
from orchestrator.errors import UsageError
from orchestrator.tracking.tags import (
    ERROR_TAG,
    HEARTBEAT_TAG,
    JOB_TAG,
    RAY_CLUSTER_TAG,
    RAY_JOB_TAG,
    STALE_SEEN_TAG,
)
from orchestrator.tracking.uri import tracking_client

log = logging.getLogger(__name__)


HEARTBEAT_S = 60.0
STALE_S = 600.0  # ten beats missed: longer than any pause of a live process (a GC, a slow save)
CONFIRM_S = 2 * HEARTBEAT_S  # between the sweep that notes a stale beat and the one that marks
RETRY_S = 5.0  # a beat the server did not take is tried again this soon


ENDED = ("FAILED", "STOPPED")  # Ray job states of a driver that is gone


def server_time(uri: str | None = None) -> float:
    """Now by the tracking server's clock: the Date header of its answer to GET /health (every
    answer has one, a refusal too). A tracking store that is a local file or database has no
    server: then this machine's clock, the store's own."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return time.time()
    import requests

    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    answer = requests.get(f"{uri.rstrip('/')}/health", timeout=10, verify=cert or not insecure)
    date = answer.headers.get("Date")
    if not date:
        raise RuntimeError(f"the tracking server at {uri} answered without a Date header")
    return email.utils.parsedate_to_datetime(date).timestamp()


class Heartbeat:
    """Stamps a run's heartbeat tag with the server's time every `interval_s` from a daemon
    thread: it dies with the process, so the stamp stops exactly when the process does. A beat
    the server did not take is tried again after RETRY_S."""

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
            wait = self.interval_s
            try:
                self.client.set_tag(self.run_id, HEARTBEAT_TAG, str(int(server_time())))
            except Exception as err:  # noqa: BLE001 - a down server: retried soon
                log.debug("heartbeat of run %s not sent: %s", self.run_id, err)
                wait = min(wait, RETRY_S)
            self._stop.wait(wait)


class RayJobs(NamedTuple):
    """The job states of one Ray cluster, named by its session name."""

    cluster: str
    states: dict[str, str]  # Ray job id -> status


def ray_job_states() -> RayJobs | None:
    """The job server's in RAY_ADDRESS (http://...), or None where there is none or it does not
    answer."""
    address = os.environ.get("RAY_ADDRESS", "")
    if not address.startswith("http"):
        return None
    try:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
        jobs = client.list_jobs()
        # /api/version names the cluster (session_name); JobSubmissionClient has no public call
        # that returns it, so its own request helper (which carries Ray's auth token) asks
        cluster = str(client._do_request("GET", "/api/version").json().get("session_name", ""))
    except Exception as err:  # noqa: BLE001 - no job server: the heartbeat alone decides
        log.info("Ray job server at %s not read: %s", address, err)
        return None
    return RayJobs(cluster, {j.job_id: str(j.status) for j in jobs if j.job_id})


def _why_dead(
    run: Any, now: float, stale_s: float, confirm_s: float, jobs: RayJobs | None
) -> tuple[str, str] | None:
    """("dead", why), ("stale", tag value to note) or None for a live run."""
    tags = run.data.tags
    job_id = tags.get(RAY_JOB_TAG, "")
    # a job id means that job only on the cluster the run recorded
    if jobs and job_id and jobs.cluster and tags.get(RAY_CLUSTER_TAG) == jobs.cluster:
        state = jobs.states.get(job_id, "")
        if state in ENDED:
            why = f"its Ray job {job_id} ended {state} while the run was RUNNING (driver killed?)"
            return "dead", why
    beat = tags.get(HEARTBEAT_TAG)
    if not beat or now - float(beat) <= stale_s:
        return None
    seen_beat, _, seen_at = tags.get(STALE_SEEN_TAG, "").partition("@")
    if seen_beat != beat or now - float(seen_at or now) < confirm_s:
        return "stale", f"{beat}@{int(now)}" if seen_beat != beat else ""
    last = dt.datetime.fromtimestamp(float(beat), dt.UTC).isoformat(timespec="seconds")
    return "dead", (
        f"no heartbeat for {(now - float(beat)) / 60:.0f} min by the tracking server's clock "
        f"(last {last}; still none {(now - float(seen_at)) / 60:.0f} min after a sweep saw it "
        "stale): the job died without a word (driver SIGKILLed or its node lost)"
    )


def sweep(
    client: Any,
    experiment_ids: list[str],
    *,
    stale_s: float = STALE_S,
    confirm_s: float = CONFIRM_S,
    jobs: RayJobs | None = None,
    now: float | None = None,
    skip_job: str | None = None,
) -> list[tuple[str, str]]:
    """Mark FAILED (or KILLED) every RUNNING run of this project in the experiments whose job
    is gone; returns (run id, reason) of each. `now` defaults to the tracking server's time.
    `skip_job`: a job starting now, whose rank 0 continues (or replaces) its own runs."""
    if not experiment_ids:
        return []
    now = server_time() if now is None else now
    runs = client.search_runs(
        experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    marked = []
    for run in runs:
        if JOB_TAG not in run.data.tags or run.data.tags[JOB_TAG] == skip_job:
            continue  # not one of ours, or the starting job's own
        verdict = _why_dead(run, now, stale_s, confirm_s, jobs)
        if verdict is None:
            continue
        kind, why = verdict
        run_id = run.info.run_id
        if kind == "stale":  # noted now, marked by a sweep CONFIRM_S later if still silent
            if why:
                client.set_tag(run_id, STALE_SEEN_TAG, why)
                log.info(
                    "run %s: heartbeat stale; marked at a sweep %.0f s from now if it stays silent",
                    run_id,
                    confirm_s,
                )
            continue
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


def sweep_in_background(experiment: str, starting_job: str) -> threading.Thread:
    """`sweep_experiment` beside a job's start instead of before it: bookkeeping (MLflow's
    import and a search, seconds on a busy server) off the path to the first step. The
    starting job's own runs are skipped: its rank 0 continues the newest, and a sweep racing
    it could mark a run that is training again. Join the thread before the process ends."""
    thread = threading.Thread(
        target=sweep_experiment,
        args=(experiment,),
        kwargs={"skip_job": starting_job},
        name="liveness-sweep",
        daemon=True,
    )
    thread.start()
    return thread


def sweep_experiment(name: str, skip_job: str | None = None) -> list[tuple[str, str]]:
    """`sweep` one experiment by name, with Ray's job states where a job server answers. Never
    raises: a job's start must not fail on bookkeeping."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return []
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return []
        return sweep(client, [exp.experiment_id], jobs=ray_job_states(), skip_job=skip_job)
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
    client = tracking_client("python -m orchestrator.tracking.liveness")
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
