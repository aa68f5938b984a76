"""MLflow tracking from rank 0: one run per job for its whole life.

The run is found by the job's name (tag `orchestrator.job`) in the spec's experiment, so a
restarted worker group or a resubmitted job continues the same run; metric steps already
logged are not logged again after a resume. Params are the resolved spec with secrets
redacted. A tracking server that is down never stops training: batches that fail are kept and
retried on the next call, and what could not be delivered is counted.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)

SECRET_NAME = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|private)", re.I)
JOB_TAG = "orchestrator.job"


def _secret_values() -> set[str]:
    return {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6}


def redact(params: dict[str, Any]) -> dict[str, str]:
    """Stringified params with secrets (by name, or by value from the environment) masked."""
    secrets = _secret_values()
    out = {}
    for key, value in params.items():
        text = str(value)
        if SECRET_NAME.search(key) or any(s in text for s in secrets):
            text = "***"
        out[key] = text[:6000]  # MLflow's param value limit
    return out


class Tracker(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_text(self, text: str, path: str) -> None: ...
    def finish(
        self, status: str, error: str | None = None, *,
        checkpoint_url: str | None = None, best_checkpoint_url: str | None = None,
    ) -> None: ...


class NullTracker:
    """Used off rank 0, with tracking disabled, or where MLflow is not installed."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, path: str) -> None:
        pass

    def finish(self, status: str, error: str | None = None, **checkpoints: str | None) -> None:
        pass


class MlflowTracker:
    def __init__(
        self, experiment: str, job: str, params: dict[str, Any], tags: dict[str, str], spec_yaml: str = ""
    ) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient()
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        found = self.client.search_runs(
            [exp_id], filter_string=f"tags.`{JOB_TAG}` = '{job}'", order_by=["start_time DESC"], max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "train/loss")
            self.last_step = max((m.step for m in history), default=-1)
            log.info("continuing MLflow run %s of job %s from step %d", self.run_id, job, self.last_step)
        else:
            run = self.client.create_run(exp_id, run_name=job, tags={JOB_TAG: job, **tags})
            self.run_id = run.info.run_id
            self.last_step = -1
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in redact(params).items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.pending: list[Any] = []
        self.dropped = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.last_step:
            return  # already logged before a restart: steps stay strictly increasing
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._flush()
        self.last_step = step

    def _flush(self) -> None:
        try:
            for i in range(0, len(self.pending), 1000):
                self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
            self.pending = []
        except Exception as err:  # the server is down: keep going, keep the backlog bounded
            if len(self.pending) > 100_000:
                self.dropped += len(self.pending) - 100_000
                self.pending = self.pending[-100_000:]
            log.warning("MLflow unreachable (%s); %d metrics queued", type(err).__name__, len(self.pending))

    def log_text(self, text: str, path: str) -> None:
        try:
            self.client.log_text(self.run_id, text, path)
        except Exception as err:
            log.warning("could not log %s to MLflow: %s", path, err)

    def finish(self, status: str, error: str | None = None, **checkpoints: str | None) -> None:
        self._flush()
        try:
            if error:
                self.client.set_tag(self.run_id, "orchestrator.error", error[:5000])
            if self.dropped or self.pending:
                self.client.set_tag(self.run_id, "orchestrator.metrics_lost", str(self.dropped + len(self.pending)))
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:
            log.warning("could not close MLflow run %s: %s", self.run_id, err)


def start_tracker(
    enabled: bool, experiment: str, job: str, params: dict[str, Any], tags: dict[str, str], spec_yaml: str = ""
) -> Tracker:
    """An MLflow tracker where MLFLOW_TRACKING_URI is set and MLflow imports; else a no-op."""
    if not enabled or not os.environ.get("MLFLOW_TRACKING_URI"):
        return NullTracker()
    try:
        return MlflowTracker(experiment, job, params, tags, spec_yaml)
    except ImportError:
        log.warning("MLflow is not installed: tracking off")
        return NullTracker()
