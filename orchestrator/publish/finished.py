"""What a job's driver does once the job has finished and its worker group is gone.

`publish_finished_job(spec)` registers the job's best and last committed checkpoints as MLflow
models (orchestrator.publish.register: aliases `best` and `last`) and writes the paper report
of its run (orchestrator.tracking.run_report: the comparison with the paper as tables,
`paper/comparison.{md,csv}`, not metrics; `plots/*.png`). Its callers: launch.run_ray after
fit_on_ray, launch.run_local on rank 0 after the process group is destroyed, and a study's
driver as Tune ends each trial (study.run.FollowUps). It runs on the driver's CPU, after the
workers (and their GPUs) are released: the worker's tracker only logs and closes the run. A
spec with `tracking.publish=false` does neither, and says so once.

Nothing here raises for server trouble: each part is warned about and the other still runs
(registration retries and its run tag are publish_run_models'). Running it again for the same
job registers nothing twice (an existing version is reused) and logs the report's metrics at
the run's last step once.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.publish.register import Published, publish_run_models
from orchestrator.spec import JobSpec
from orchestrator.tracking.redaction import scrub
from orchestrator.tracking.tags import JOB_TAG

log = logging.getLogger(__name__)


@dataclass
class FinishedJob:
    """What publishing a finished job did."""

    run_id: str
    models: dict[str, Published] = field(default_factory=dict)  # alias -> registered version
    report: dict[str, float] = field(default_factory=dict)  # the paper comparison's metrics
    seconds: float = 0.0


def publish_finished_job(spec: JobSpec, client: Any = None) -> FinishedJob | None:
    """Register the models of finished job `spec` and write its run's paper report; None where
    tracking is off or the job's run cannot be found. `client`: the MLflow client to use
    (default: MLflow's, for MLFLOW_TRACKING_URI)."""
    if not spec.tracking.enabled or not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    if not spec.tracking.publish:
        print(
            f"job {spec.name}: tracking.publish=false: no models registered, no paper report "
            "(register its checkpoints later with python -m orchestrator.publish --run RUN_ID)",
            flush=True,
        )
        return None
    t0 = time.perf_counter()
    try:
        client, run_id = _job_run(spec, client)
    except Exception as err:  # noqa: BLE001 - the training is done and safe: never fail it here
        log.warning(
            "MLflow: cannot read the run of job %s (%s): models not registered, no paper "
            "report; register them later with: python -m orchestrator.publish --run RUN_ID",
            spec.name,
            scrub(err)[:300],
        )
        return None
    if run_id is None:
        log.warning(
            "no MLflow run of job %s in experiment %s: models not registered, no paper report",
            spec.name,
            spec.tracking.experiment,
        )
        return None
    done = FinishedJob(run_id)
    done.models = _register_models(client, run_id, spec)
    try:
        from orchestrator.tracking.run_report import log_paper_report

        done.report = log_paper_report(client, run_id, spec)
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow: could not compare run %s with the paper: %s", run_id, scrub(err)[:500])
    done.seconds = time.perf_counter() - t0
    log.info("job %s published in %.1f s (run %s)", spec.name, done.seconds, run_id)
    return done


def _job_run(spec: JobSpec, client: Any) -> tuple[Any, str | None]:
    """The client and the id of the job's run (the newest tagged with the job's name in the
    spec's experiment, where the tracker opened it), or None."""
    from mlflow import MlflowClient

    from orchestrator.tracking.runs import find_job_run

    client = client or MlflowClient()
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    run = exp and find_job_run(client, exp.experiment_id, spec.name)
    return client, (run.info.run_id if run else None)


def _register_models(client: Any, run_id: str, spec: JobSpec) -> dict[str, Published]:
    """The best (by checkpoint.best_metric) and the last committed checkpoints as versions of
    the registered model named after the job."""
    from orchestrator.checkpoint import best_checkpoint
    from orchestrator.checkpoint_refs import committed_checkpoints, spec_checkpoints_url

    try:
        committed = committed_checkpoints(spec_checkpoints_url(spec), f"job {spec.name}")
    except Exception as err:  # noqa: BLE001
        log.warning("job %s: models not registered: %s", spec.name, scrub(err)[:500])
        return {}
    if not committed:
        log.warning("job %s has no committed checkpoint: no model to register", spec.name)
        return {}
    metric = spec.checkpoint.best_metric
    best = best_checkpoint(committed, metric)
    return publish_run_models(
        client,
        run_id,
        spec.name,
        best_url=best.url if best else None,
        latest_url=committed[-1].url,
        metric=metric,
        tags={JOB_TAG: spec.name},
    )
