"""MLflow tracking from rank 0: one run per job for its whole life.

The run is the one whose id travels in the job's checkpoints (`run_id`), else the newest run
tagged `orchestrator.job = <job name>` in the spec's experiment, else a new one: a restarted
worker group, a resubmitted job, or one left RUNNING by a hard kill continues the same run.
Every metric key keeps strictly increasing steps: steps a resumed job replays are not logged
again.

What the run holds, from the tracker:
- params: the resolved spec as dotted keys (`JobSpec.flat`); tags: job, model, strategy, world
  size, device, git commit, Ray job id, dataset URL and manifest hash; `spec.yaml`; the dataset
  manifest as the run's input dataset (orchestrator.tracking.lineage);
- metrics from the loop, and system metrics (CPU, memory, disk, network, GPU where present)
  from MLflow's sampler (orchestrator.tracking.mlflow_internals);
- at the end (`finish`): the error, the last committed checkpoint, the count of lost metrics,
  the status. Nothing more: the tracker logs and closes.

What a finished job adds to its run afterwards comes from the driver, once the worker group has
released its resources (orchestrator.publish.finished): the registered models and the paper
report (orchestrator.tracking.run_report). The driver also writes here, before the workers
start, the recipe changes a resubmission made with --allow-change (`record_resume_changes`:
tags `resume/<field>` = `old -> new (step N)`, artifact `resume/step-NNNNNNNN.json` with every
field's before and after), and says where a finished job's run is (`finished_job_line`).

Secrets never reach params, tags, artifacts or log messages: everything written goes through
orchestrator.tracking.redaction (`scrub`, `redact`, `redact_tags`).

A tracking server that is down never stops training: the client's HTTP retries are kept short,
metrics are queued and flushed when the server answers again (retries back off), and what could
not be delivered is counted in the tag `orchestrator.metrics_lost`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from orchestrator.checkpoint import Committed
from orchestrator.resume_changes import Change, show
from orchestrator.spec import JobSpec, to_yaml
from orchestrator.tracking import mlflow_internals
from orchestrator.tracking.lineage import dataset_input, git_commit
from orchestrator.tracking.liveness import HEARTBEAT_S, Heartbeat
from orchestrator.tracking.redaction import log_tags, redact, redact_tags, scrub
from orchestrator.tracking.runs import experiment_id, find_job_run, job_run, run_view
from orchestrator.tracking.tags import (
    ATTEMPT_TAG,
    CHECKPOINT_TAG,
    ERROR_TAG,
    GIT_COMMIT_TAG,
    JOB_TAG,
    LOST_TAG,
    MANIFEST_TAG,
    MLFLOW_GIT_COMMIT_TAG,
    PARAMS_CHANGED_TAG,
    RESUME_PREFIX,
)

log = logging.getLogger(__name__)

# MLflow's client retries an unreachable server for minutes by default; the tracker queues and
# retries on its own, so each call may fail fast. Users can still set these themselves.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # no usage data sent out; and MLflow's telemetry thread, when it gives up on its server,
    # unsets an environment variable while a request may be iterating os.environ (KeyError)
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


class Tracker(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_text(self, text: str, path: str) -> None: ...
    def finish(
        self, status: str, error: str | None = None, *, checkpoint_url: str | None = None
    ) -> None: ...


class NullTracker:
    """Used off rank 0, with tracking disabled, or where MLflow is not installed."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, path: str) -> None:
        pass

    def finish(
        self, status: str, error: str | None = None, *, checkpoint_url: str | None = None
    ) -> None:
        pass


# ----------------------------------------------------------------------------- the tracker


class MlflowTracker:
    """One MLflow run per job; see the module docstring. Never raises for server trouble."""

    def __init__(
        self,
        spec: JobSpec,
        tags: dict[str, str],
        run_id: str | None = None,
        *,
        manifest: dict[str, Any] | None = None,
        system_metrics_interval_s: float | None = 10.0,
        max_pending: int = 100_000,
        finish_timeout_s: float = 120.0,
        max_backoff_s: float = 30.0,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        load_mlflow()
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.spec = spec
        self.experiment, self.job = spec.tracking.experiment, spec.name
        self.tags = {k: str(v) for k, v in tags.items() if v is not None}
        self.run_id = run_id  # a hint (from a checkpoint) until the run is open
        self.manifest = manifest  # the dataset's, as the loop read it (None: read it here)
        self.system_metrics_interval_s = system_metrics_interval_s
        self.max_pending = max_pending
        self.finish_timeout_s = finish_timeout_s
        self.max_backoff_s = max_backoff_s
        self.opened = False
        self.pending: list[Any] = []  # mlflow.entities.Metric not yet delivered
        self.last_steps: dict[str, int] = {}  # per metric key: the largest step logged
        self.dropped = 0  # metrics given up on (queue over max_pending)
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = 1.0
        self._monitor: mlflow_internals.SystemMetrics | None = None
        self._monitor_broken = False  # it failed to start: retrying each flush would not help
        self._finished = self._closing = False
        self._lost_reported = 0
        self.heartbeat_s = heartbeat_s
        self._heartbeat: Heartbeat | None = None
        self._flush(force=True)  # opens the run; if the server is down, later calls retry

    # ------------------------------------------------------------------ opening the run

    @property
    def _open_id(self) -> str:
        """The id of the open run (every call that writes to it runs after _open)."""
        assert self.run_id is not None, "the MLflow run is not open yet"
        return self.run_id

    def _experiment_id(self) -> str:
        return experiment_id(self.client, self.experiment)

    def _find_run(self, exp_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        if self.run_id:
            try:
                run = self.client.get_run(self.run_id)
                if run.info.lifecycle_stage == "active":
                    return run
                log.warning(
                    "MLflow run %s from the checkpoint was deleted; looking up the job",
                    self.run_id,
                )
            except MlflowException as err:
                if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise  # the server is down: open again later
                log.warning(
                    "MLflow run %s from the checkpoint is not on this server; looking up the job",
                    self.run_id,
                )
        return find_job_run(self.client, exp_id, self.job)

    def _run_tags(self) -> dict[str, str]:
        tags = {JOB_TAG: self.job, **self.tags}
        commit = git_commit()
        if commit:
            tags[GIT_COMMIT_TAG] = tags[MLFLOW_GIT_COMMIT_TAG] = commit
        return tags

    def _open(self) -> None:
        exp_id = self._experiment_id()
        run = self._find_run(exp_id)
        tags = self._run_tags()
        known: dict[str, int] = {}
        if run is None:
            # redacted, except the job's name: how the job finds its run again, kept exact
            first = {**redact_tags({**tags, ATTEMPT_TAG: "1"}), JOB_TAG: self.job}
            run = self.client.create_run(exp_id, run_name=self.job, tags=first)
            self.run_id = run.info.run_id
            log.info("MLflow run %s created for job %s", self.run_id, self.job)
        else:
            self.run_id = run.info.run_id
            attempt = int(run.data.tags.get(ATTEMPT_TAG, "1")) + 1
            self.client.update_run(self.run_id, status="RUNNING")
            self._set_tags({**tags, ATTEMPT_TAG: str(attempt)})
            known = mlflow_internals.last_steps(self.client, run)
            log.info(
                "continuing MLflow run %s of job %s (attempt %d, last step %d)",
                self.run_id,
                self.job,
                attempt,
                max(known.values(), default=-1),
            )
        self._sync_params(run.data.params)
        self._log_spec(run)
        self._log_dataset(run)
        # metrics queued before the run was known: drop the steps it already has
        self.pending = [m for m in self.pending if m.step > known.get(m.key, -1)]
        self.last_steps = dict(known)
        for m in self.pending:
            self.last_steps[m.key] = max(self.last_steps.get(m.key, -1), m.step)
        self.opened = True
        # stamps the run while this process lives, so a hard kill is seen (tracking.liveness)
        self._heartbeat = Heartbeat(self.client, self.run_id, self.heartbeat_s).start()

    def _set_tags(self, tags: dict[str, str]) -> None:
        log_tags(self.client, self._open_id, tags, exact=(JOB_TAG,))

    def _sync_params(self, existing: dict[str, str]) -> None:
        """Log the params the run lacks; params are immutable, so changed ones become a tag."""
        from mlflow.entities import Param

        params = redact(self.spec.flat())
        missing = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(missing), 100):
            self.client.log_batch(self._open_id, params=missing[i : i + 100])
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            log.warning(
                "job %s resumed with changed settings %s (params keep the first values)",
                self.job,
                changed,
            )
            self._set_tags({PARAMS_CHANGED_TAG: ",".join(changed)})

    def _log_spec(self, run: Any) -> None:
        text = scrub(to_yaml(self.spec))
        names = set()
        if run.data.params:
            names = {f.path for f in self.client.list_artifacts(self._open_id)}
        if "spec.yaml" not in names:
            self.client.log_text(self._open_id, text, "spec.yaml")
            return
        attempt = run.data.tags.get(ATTEMPT_TAG, "1")
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(self._open_id, "spec.yaml", tmp)
            current = Path(path).read_text()
        if current != text:  # a resubmission with other overrides: keep both
            self.client.log_text(self._open_id, text, f"spec-attempt-{int(attempt) + 1}.yaml")

    def _log_dataset(self, run: Any) -> None:
        digest = self.tags.get(MANIFEST_TAG)
        item = dataset_input(self.spec.data, digest, self.manifest)
        if item is None:
            return
        inputs = getattr(run, "inputs", None)
        have = {
            (d.dataset.name, d.dataset.digest) for d in (inputs.dataset_inputs if inputs else [])
        }
        if (item.dataset.name, item.dataset.digest) in have:
            return
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_inputs(self._open_id, datasets=[item])
        except MlflowException as err:
            # runs of one experiment starting together (a study's trials) each create the
            # experiment's dataset entity; the loser's insert breaks a UNIQUE constraint,
            # and a second call finds the entity the winner made
            if "UNIQUE constraint" not in str(err) and "Duplicate" not in str(err):
                raise
            self.client.log_inputs(self._open_id, datasets=[item])

    # ------------------------------------------------------------------ system metrics

    def _start_system_metrics(self) -> None:
        """(Re)start MLflow's sampler; it stops itself when the server fails, so restart it
        whenever the server answers again. Steps continue from the run's last system step."""
        if (
            self.system_metrics_interval_s is None
            or not self.opened
            or self._closing
            or self._monitor_broken
        ):
            return
        if self._monitor is not None and self._monitor.alive():
            return
        try:
            self._monitor = mlflow_internals.SystemMetrics(
                self.client, self._open_id, self.system_metrics_interval_s
            )
        except Exception as err:  # noqa: BLE001
            log.warning("system metrics off: %s", scrub(err)[:300])
            self._monitor, self._monitor_broken = None, True

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                monitor.stop()
            except Exception as err:  # noqa: BLE001
                log.warning("stopping system metrics: %s", scrub(err)[:300])

    # ------------------------------------------------------------------ metrics

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self.last_steps.get(key, -1):
                continue  # logged before a restart: steps stay strictly increasing
            try:
                self.pending.append(Metric(key, float(value), now, int(step)))
            except (TypeError, ValueError):
                continue
            self.last_steps[key] = step
        if not self._flush() and len(self.pending) > self.max_pending:
            excess = len(self.pending) - self.max_pending  # bounded memory: drop the oldest
            if not self.dropped:
                log.warning(
                    "MLflow backlog over %d metrics: dropping the oldest (counted in %s)",
                    self.max_pending,
                    LOST_TAG,
                )
            self.dropped += excess
            del self.pending[:excess]

    def _flush(self, force: bool = False) -> bool:
        """Open the run if needed and deliver the queue; False (never an exception) on failure."""
        if self.opened and not self.pending and not (self.dropped > self._lost_reported):
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        try:
            if not self.opened:
                self._open()
            while self.pending:
                batch = self.pending[:1000]
                self.client.log_batch(self._open_id, metrics=batch)
                del self.pending[: len(batch)]
            if self.dropped > self._lost_reported:
                self._set_tags({LOST_TAG: str(self.dropped)})
                self._lost_reported = self.dropped
        except Exception as err:  # noqa: BLE001
            self._failed(err)
            return False
        self._recovered()
        return True

    def _failed(self, err: Exception) -> None:
        now = time.monotonic()
        self._retry_at = now + min(self._backoff, self.max_backoff_s)
        self._backoff = min(self._backoff * 2, self.max_backoff_s)
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "MLflow unreachable (%s: %s); training goes on, %d metrics queued and retried",
                type(err).__name__,
                (scrub(err).splitlines() or [""])[0][:300],
                len(self.pending),
            )

    def _recovered(self) -> None:
        if self._down_since is not None:
            down_s = time.monotonic() - self._down_since
            log.info("MLflow reachable again after %.0f s; backlog delivered", down_s)
        self._down_since, self._backoff, self._retry_at = None, 1.0, 0.0
        self._start_system_metrics()

    def log_text(self, text: str, path: str) -> None:
        if not self._flush(force=True):
            log.warning("MLflow unreachable: %s not logged", path)
            return
        try:
            self.client.log_text(self._open_id, scrub(text), path)
        except Exception as err:  # noqa: BLE001
            log.warning("could not log %s to MLflow: %s", path, scrub(err)[:300])

    # ------------------------------------------------------------------ the end

    def finish(
        self, status: str, error: str | None = None, *, checkpoint_url: str | None = None
    ) -> None:
        """Close the run with `status`, recording `error` and the last committed checkpoint.
        A down server is waited for: up to finish_timeout_s for a run that finished (its whole
        history is the record of the job; a restarting server can take half a minute to answer
        again), at most 15 s otherwise (a failed attempt is restarted, a stopped job is
        SIGKILLed soon)."""
        if self._finished:
            return
        self._closing = True  # no monitor restarts from here on
        self._stop_system_metrics()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        wait_s = self.finish_timeout_s if status == "FINISHED" else min(15.0, self.finish_timeout_s)
        deadline = time.monotonic() + wait_s
        while not self._flush(force=True) and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        lost = self.dropped + len(self.pending)
        if not self.opened or self.pending:
            log.warning(
                "MLflow unreachable at the end of job %s: run %s not closed (%s), "
                "%d metrics lost; a resubmitted job continues it",
                self.job,
                self.run_id,
                status,
                lost,
            )
            if not self.opened:
                return
        if status == "FAILED" and self._stopped_by_its_driver():
            # the job was stopped (`ray job stop`): its driver marked the run first, and what a
            # worker hits as Ray tears the job down after that (a loader worker gone) is no failure
            status, error = "KILLED", error and f"after the job was stopped: {error}"
        tags: dict[str, str] = {}
        if error:
            tags[ERROR_TAG] = error
        if checkpoint_url:
            tags[CHECKPOINT_TAG] = checkpoint_url
        if lost > self._lost_reported:
            tags[LOST_TAG] = str(lost)
        steps: list[tuple[str, Callable[[], object]]] = []
        if tags:
            steps.append(("record the end", lambda: self._set_tags(tags)))
        steps.append(("close the run", lambda: self.client.set_terminated(self._open_id, status)))
        for what, step in steps:
            try:
                step()
            except Exception as err:  # noqa: BLE001
                log.warning(
                    "MLflow: could not %s for run %s: %s", what, self.run_id, scrub(err)[:500]
                )
        self._finished = True

    def _stopped_by_its_driver(self) -> bool:
        """Whether the run is KILLED on the server already (launch.run_ray marks it at once)."""
        try:
            return self.client.get_run(self._open_id).info.status == "KILLED"
        except Exception:  # noqa: BLE001 - the server is down: close the run as asked
            return False


def start_tracker(
    spec: JobSpec,
    tags: dict[str, str],
    run_id: str | None = None,
    manifest: dict[str, Any] | None = None,
) -> Tracker:
    """An MLflow tracker for job `spec` where spec.tracking.enabled, MLFLOW_TRACKING_URI is set
    and MLflow imports; else a no-op. `run_id` (from the job's checkpoint) names the run to
    continue; `manifest` is the dataset's, already read (else the tracker reads it from
    data.url)."""
    if not spec.tracking.enabled:
        return NullTracker()
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # the driver's pre-flight had it: say so
        log.warning(
            "tracking.enabled=true, but MLFLOW_TRACKING_URI is not set where rank 0 runs: no "
            "MLflow record of job %s (set it in the cluster's environment too)",
            spec.name,
        )
        return NullTracker()
    try:
        return MlflowTracker(spec, tags, run_id, manifest=manifest)
    except ImportError:
        log.warning("MLflow is not installed: tracking off")
    except Exception as err:  # noqa: BLE001 (never stop training for tracking)
        log.warning("MLflow tracking off: %s: %s", type(err).__name__, scrub(err)[:500])
    return NullTracker()


def set_http_defaults() -> None:
    """Our MLflow client settings (HTTP_DEFAULTS), where the user set none: before MLflow's
    first import, in the main thread (a thread changing os.environ races readers of it)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def load_mlflow() -> None:
    """Import MLflow's client and set our HTTP defaults (short timeouts, one retry) now, where
    tracking is on: the first import takes seconds, too long to pay inside a signal handler."""
    set_http_defaults()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        pass


# ----------------------------------------------------------------------------- the driver's


def job_run_url(spec: JobSpec) -> str | None:
    """The page of job `spec`'s MLflow run, or None (tracking off, no server, no such run)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not (spec.tracking.enabled and uri.startswith("http")):
        return None
    load_mlflow()
    try:
        found = job_run(spec.tracking.experiment, spec.name)
    except Exception as err:  # noqa: BLE001 - an address to print: the checkpoint's instead
        log.warning("MLflow: cannot find the run of job %s: %s", spec.name, scrub(err)[:300])
        return None
    if found is None:
        return None
    info = found[1].info
    return run_view(uri, info.experiment_id, info.run_id)


def finished_job_line(spec: JobSpec, checkpoint: Committed) -> str:
    """What a resubmitted job that has finished says: its last step and its run's address
    (its MLflow run's page, else its newest checkpoint)."""
    where = job_run_url(spec) or checkpoint.url
    return f"job {spec.name} already finished at step {checkpoint.step}; its run: {where}"


def record_resume_changes(spec: JobSpec, checkpoint: Committed, changes: Sequence[Change]) -> None:
    """Record in job `spec`'s MLflow run the recipe `changes` it resumes `checkpoint` under
    (before and after), and say them in the log, with where they were recorded."""
    where = _record_changes(spec, checkpoint, changes)
    log.warning(
        "job %s resumes from step %d with a changed recipe (--allow-change): %s; %s",
        spec.name,
        checkpoint.step,
        "; ".join(map(str, changes)),
        where,
    )


def _record_changes(spec: JobSpec, checkpoint: Committed, changes: Sequence[Change]) -> str:
    """Tags `resume/<field>` and an artifact `resume/step-N.json`; returns where, or why not."""
    kept = "each commit marker keeps the spec it was trained under"
    if not spec.tracking.enabled or not os.environ.get("MLFLOW_TRACKING_URI"):
        off = "tracking.enabled=false" if not spec.tracking.enabled else "no MLFLOW_TRACKING_URI"
        return f"not recorded in MLflow ({off}); {kept}"
    load_mlflow()
    step = checkpoint.step
    record = {
        "step": step,
        "checkpoint": checkpoint.url,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "changes": {c.field: {"before": c.old, "after": c.new} for c in changes},
    }
    try:
        found = job_run(spec.tracking.experiment, spec.name)
        if found is None:
            return f"not recorded: job {spec.name} has no run in MLflow experiment " + (
                f"{spec.tracking.experiment!r}; {kept}"
            )
        client, run = found
        run_id = run.info.run_id
        path = f"{RESUME_PREFIX}step-{step:08d}.json"
        client.log_text(run_id, scrub(json.dumps(record, indent=1)), path)
        said = {f"{RESUME_PREFIX}{c.field}": f"{show(c.old)} -> {show(c.new)}" for c in changes}
        log_tags(client, run_id, {k: f"{v} (step {step})" for k, v in said.items()})
    except Exception as err:  # noqa: BLE001 - the job runs; the log says it was not recorded
        return f"not recorded in MLflow ({type(err).__name__}: {scrub(err)[:300]}); {kept}"
    return f"recorded in MLflow run {run_id} (tags {RESUME_PREFIX}<field>, artifact {path})"
