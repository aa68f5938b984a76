"""Finding a job's MLflow run from outside its workers: experiments by name, the newest run of
a job, the address of an experiment's runs table, and a run's status set by the driver."""

from __future__ import annotations

import logging
import os
from typing import Any

from orchestrator.tracking.redaction import redact_tags, scrub
from orchestrator.tracking.tags import ERROR_TAG, EXPERIMENT_KIND_TAG, JOB_TAG

log = logging.getLogger(__name__)

MODEL_TRAINING = "custom_model_development"  # MLflow 3's kind for model training
WORKFLOW_PARAM = "workflowType=machine_learning"  # MLflow 3's UI in its Model training mode


def _error_code(err: BaseException) -> str | None:
    return getattr(err, "error_code", None)


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment `name`: restored if it was deleted, created if missing, with the
    model-training kind, so MLflow 3's UI opens it on the runs table, not the GenAI overview
    of traces (every experiment this project writes to: training, ensembles)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            log.warning("experiment %s was deleted: restoring it", name)
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by hand or by an older version
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except MlflowException as err:  # created meanwhile by another job
        if _error_code(err) != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def runs_view(tracking_uri: str, exp_id: str) -> str:
    """The address of an experiment's runs table in MLflow's UI (charts: one toggle away), in
    its Model training mode: MLflow 3's UI takes the mode from the address or the browser's
    last choice (GenAI by default), never from the experiment's kind."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{exp_id}/runs?{WORKFLOW_PARAM}"


def run_view(tracking_uri: str, exp_id: str, run_id: str) -> str:
    """The address of a run's page in MLflow's UI, in its Model training mode (`runs_view`)."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}?{WORKFLOW_PARAM}"


def experiment_runs_view(experiment: str) -> str | None:
    """`runs_view` of an experiment by name, or None (no server, no such experiment)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("http"):
        return None
    try:
        from mlflow import MlflowClient

        exp = MlflowClient().get_experiment_by_name(experiment)
        return runs_view(uri, exp.experiment_id) if exp else None
    except Exception:  # noqa: BLE001 - only a hint printed at the end of a job
        return None


def newest_run(client: Any, experiment_id: str, tags: dict[str, str]) -> Any:
    """The newest run of an experiment with every one of `tags`, or None."""

    def quoted(value: str) -> str:
        return value.replace("\\", "\\\\").replace("'", "\\'")

    found = client.search_runs(
        [experiment_id],
        filter_string=" and ".join(f"tags.`{k}` = '{quoted(v)}'" for k, v in tags.items()),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def find_job_run(client: Any, experiment_id: str, job: str) -> Any:
    """The newest run tagged `orchestrator.job = job` in an experiment, or None."""
    return newest_run(client, experiment_id, {JOB_TAG: job})


def job_run(experiment: str, job: str) -> tuple[Any, Any] | None:
    """An MLflow client and the newest run of `job` in `experiment`; None where there is no
    tracking server (MLFLOW_TRACKING_URI unset), no such experiment or no such run. A server
    that does not answer raises."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    run = exp and find_job_run(client, exp.experiment_id, job)
    return (client, run) if run else None


def mark_job_run(experiment: str, job: str, status: str, error: str | None = None) -> str | None:
    """Set the status of a job's run from outside its workers (the driver on Ray, where the loop
    runs off the main thread and cannot catch SIGTERM). Only a RUNNING run is changed; returns
    its id, or None where there is no tracking server or no such run."""
    try:
        found = job_run(experiment, job)
        if found is None or found[1].info.status != "RUNNING":
            return None
        client, run = found
        run_id = run.info.run_id
        if error:
            client.set_tag(run_id, ERROR_TAG, redact_tags({ERROR_TAG: error})[ERROR_TAG])
        client.set_terminated(run_id, status=status)
        return run_id
    except Exception as err:  # noqa: BLE001 - status bookkeeping must never mask the job's own error
        log.warning("could not mark MLflow run of %s %s: %s", job, status, scrub(err))
        return None
