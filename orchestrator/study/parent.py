"""The study's parent run in MLflow: every trial's run is nested under it (MLflow's
`mlflow.parentRunId` tag), and it holds the study table and figures.

It is found again by its tags (`orchestrator.study` = the study's name, `orchestrator.role` =
study) in the study's experiment, so a resubmitted study reopens the same parent. The
dashboard filters a study with `tags.orchestrator.study = 'NAME'`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.spec import to_yaml
from orchestrator.study.grid import Study, Trial
from orchestrator.study.results import (
    TrialResult,
    cell_rows,
    table_csv,
    table_markdown,
    table_metrics,
)
from orchestrator.tracking.redaction import log_tags, redact, scrub
from orchestrator.tracking.tags import (
    ERROR_TAG,
    ROLE_TAG,
    RUN_NAME_TAG,
    STUDY_FINGERPRINT_TAG,
    STUDY_PAPER_TAG,
    STUDY_TAG,
)

log = logging.getLogger(__name__)


def find_parent(client: Any, experiment_id: str, study: str) -> Any:
    from orchestrator.tracking.runs import newest_run

    return newest_run(client, experiment_id, {STUDY_TAG: study, ROLE_TAG: "study"})


def open_parent(client: Any, study: Study, trials: Sequence[Trial], fingerprint: str) -> str:
    """The study's parent run id: reopened (RUNNING again) or created, with the grid logged."""
    from mlflow.entities import Param

    from orchestrator.tracking.runs import experiment_id

    exp_id = experiment_id(client, study.experiment)
    run = find_parent(client, exp_id, study.name)
    tags = {
        STUDY_TAG: study.name,
        ROLE_TAG: "study",
        STUDY_PAPER_TAG: study.paper,
        STUDY_FINGERPRINT_TAG: fingerprint,
        RUN_NAME_TAG: study.name,
    }
    if run is None:
        run = client.create_run(exp_id, run_name=study.name, tags=tags)
        log.info("MLflow parent run %s created for study %s", run.info.run_id, study.name)
    else:
        client.update_run(run.info.run_id, status="RUNNING")
        log_tags(client, run.info.run_id, tags)
        log.info("continuing MLflow parent run %s of study %s", run.info.run_id, study.name)
    run_id = run.info.run_id
    params = {
        "study.seeds": study.seeds,
        "study.cells": len(study.cells),
        "study.trials": len(trials),
        "study.max_concurrent": study.max_concurrent,
        "study.trial_runner": study.trial_runner,
    }
    new = {k: str(v) for k, v in redact(params).items() if k not in run.data.params}
    if new:
        client.log_batch(run_id, params=[Param(k, v) for k, v in new.items()])
    grid = [
        {"job": t.job, "cell": t.cell.label, "seed": t.seed, "overrides": t.cell.overrides}
        for t in trials
    ]
    client.log_text(run_id, scrub(json.dumps(grid, indent=1)), "study/grid.json")
    if trials:
        client.log_text(run_id, scrub(to_yaml(trials[0].spec)), "study/first_trial_spec.yaml")
    return run_id


def log_results(
    client: Any, run_id: str, study: Study, results: Sequence[TrialResult], dataset: str
) -> str:
    """The study table (markdown + csv + metrics) and figures on the parent run; returns the
    table's markdown."""
    from mlflow.entities import Metric

    from orchestrator.paper import plots
    from orchestrator.study import figures

    rows = cell_rows(study, results)
    md = table_markdown(study, rows, dataset)
    client.log_text(run_id, scrub(md), "study/table.md")
    client.log_text(run_id, table_csv(rows), "study/table.csv")
    status = [
        {
            "job": r.trial.job,
            "cell": r.trial.cell.label,
            "seed": r.trial.seed,
            "status": r.status,
            "run_id": r.run_id,
            "error": scrub(r.error)[:2000],
        }
        for r in results
    ]
    client.log_text(run_id, json.dumps(status, indent=1), "study/trials.json")
    step = sum(r.finished for r in results)  # the table at this many finished trials
    metrics = {
        **table_metrics(rows),
        "study/finished": float(step),
        "study/failed": float(sum(not r.finished for r in results)),
    }
    client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, v in metrics.items()])
    if plots.available():
        title = study.paper or study.name
        with tempfile.TemporaryDirectory() as tmp:
            for name, draw in (
                ("curves.png", figures.curves_figure),
                ("test_error.png", figures.test_error_figure),
            ):
                path = draw(title, results, Path(tmp) / name)
                if path is not None:
                    client.log_artifact(run_id, str(path), "study")
    return md


def log_layer_responses(client: Any, run_id: str, results: Sequence[TrialResult]) -> int:
    """Fig. 7 for a CIFAR study: one figure on the parent with a net per cell (its first
    finished seed), from the responses each trial logged to its run (the driver measures a
    trial's as Tune ends it: study.run.FollowUps); a finished trial without them is measured
    here. Returns the trials measured here. Never raises: a figure must not fail a study whose
    trials finished."""
    from orchestrator.paper import layer_responses as fig7

    done = [r for r in results if r.finished and r.run_id]
    if not done or not all(r.trial.spec.model.name.startswith("cifar_") for r in done):
        return 0
    measured = 0
    per_cell: dict[str, Any] = {}
    for r in done:
        try:
            if r.trial.cell.label in per_cell and fig7.measured_at_last_checkpoint(r.tags):
                continue  # its cell has its series: nothing to read or measure
            assert r.run_id  # `done` holds runs that have one
            responses, now = fig7.measure_once(client, r.run_id, r.trial.spec.model.name)
            measured += now
            per_cell.setdefault(r.trial.cell.label, responses)
        except Exception as err:  # noqa: BLE001 - reported, the study goes on
            log.warning("layer responses of %s not measured: %s", r.trial.job, scrub(err)[:500])
    series: dict[str, Any] = {}
    for responses in per_cell.values():
        series.setdefault(responses.label, responses)  # one per net (cells may repeat a net)
    if series:
        try:
            fig7.log_combined_layer_responses(
                client, run_id, list(series.values()), title="Fig. 7: std of layer responses"
            )
        except Exception as err:  # noqa: BLE001
            log.warning("the study's Fig. 7 was not logged: %s", scrub(err)[:500])
    return measured


def close_parent(client: Any, run_id: str, results: Sequence[TrialResult]) -> str:
    """FINISHED when every trial finished, else FAILED with the trials named."""
    failed = [r for r in results if not r.finished]
    status = "FAILED" if failed else "FINISHED"
    if failed:
        names = ", ".join(f"{r.trial.job} ({r.status})" for r in failed)
        client.set_tag(run_id, ERROR_TAG, scrub(f"{len(failed)} trial(s) not finished: {names}"))
    elif ERROR_TAG in client.get_run(run_id).data.tags:  # an earlier submission's failure
        client.delete_tag(run_id, ERROR_TAG)
    client.set_terminated(run_id, status)
    return status
