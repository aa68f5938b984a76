"""What a finished training run reports in MLflow, read back from the run itself.

- `log_paper_report`: the run's final and best validation errors beside the paper's number for
  the same model, protocol and shortcut (metrics `achieved/*`, `paper/*`, `gap/*`, tags
  `paper.source`/`paper.protocol`, `paper/comparison.{md,csv}`), and its curves in the paper's
  style (`plots/*.png`);
- `register_best`: the best checkpoint as a version of the registered model named after the
  job, alias `best`.

Both read the run's whole history from the server (`metric_history`), under current and
legacy metric names, so a run resumed across attempts, or across the metric rename, is
reported whole. orchestrator.tracking.tracker calls them when a job finishes.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.paper.comparison import training_csv, training_markdown, training_rows
from orchestrator.tracking.metrics import legacy_names
from orchestrator.tracking.redaction import redact_tags, scrub

log = logging.getLogger(__name__)

BEST_ALIAS = "best"
# what the paper report reads from the run's history (current names; legacy ones are read too)
REPORT_METRICS = (
    "train/top1_err",
    "train/top5_err",
    "val/top1_err",
    "val/top5_err",
    "train/loss",
    "val/loss",
)

History = list[tuple[int, float]]  # (step, value)


def metric_history(client: Any, run_id: str, name: str) -> History:
    """(step, value) of metric `name`, one point per step (the last logged). Its legacy names
    are read too (orchestrator.tracking.metrics): a run written before the rename and
    resumed after it holds its history under both; at a step under both, the current name wins."""
    points: dict[int, float] = {}
    for key in [*legacy_names(name), name]:  # the current name last, so it wins
        history = client.get_metric_history(run_id, key)
        for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
            points[m.step] = m.value
    return sorted(points.items())


def _set_tags(client: Any, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in redact_tags(tags).items()]
    client.log_batch(run_id, tags=items)


def log_paper_report(
    client: Any,
    run_id: str,
    job: str,
    params: dict[str, Any],
    tags: dict[str, str],
    logged_steps: dict[str, int],
) -> dict[str, float]:
    """Log the comparison with the paper and the curves; returns the comparison's metrics.
    `params` are the run's spec params (model.name, eval.protocol, ...), `tags` its tags
    (num_classes); `logged_steps` the largest step logged per metric key, updated here: the
    metrics are logged once per step, so a finished job submitted again reports nothing twice."""
    from mlflow.entities import Metric

    from orchestrator.paper import numbers as paper

    model = str(params.get("model.name", ""))
    protocol = str(params.get("eval.protocol", "center"))
    shortcut = params.get("model.shortcut")
    classes = tags.get("num_classes")  # the loop's tag; None: not known, compare
    ref = paper.lookup(
        model,
        protocol,
        shortcut if isinstance(shortcut, str) else None,
        int(classes) if classes else None,
    )
    hist = {key: metric_history(client, run_id, key) for key in REPORT_METRICS}
    last_step = max((pts[-1][0] for pts in hist.values() if pts), default=0)
    rows, metrics = training_rows(ref, hist["val/top1_err"], hist["val/top5_err"])
    now = int(time.time() * 1000)
    fresh = [
        Metric(k, v, now, last_step)
        for k, v in metrics.items()
        if last_step > logged_steps.get(k, -1)
    ]
    if fresh:
        client.log_batch(run_id, metrics=fresh)
        logged_steps.update({m.key: last_step for m in fresh})
    if ref is not None:
        _set_tags(client, run_id, {"paper.source": ref.source, "paper.protocol": ref.protocol})
    dataset = str(params.get("data.url") or "synthetic")
    md = training_markdown(job, model, protocol, shortcut, dataset, ref, rows, last_step)
    client.log_text(run_id, scrub(md), "paper/comparison.md")
    client.log_text(run_id, scrub(training_csv(model, protocol, ref, rows)), "paper/comparison.csv")
    log_plots(client, run_id, f"{job} ({model})", ref, hist)
    return metrics


def log_plots(client: Any, run_id: str, title: str, ref: Any, hist: dict[str, History]) -> None:
    """The training curves (orchestrator.paper.plots) as plots/*.png; skipped, with a warning, where
    matplotlib is not installed."""
    from orchestrator.paper import plots

    if not plots.available():
        log.warning("matplotlib is not installed: no training-curve plots (pip install matplotlib)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for path, plot in plots.training_figures(title, ref, hist):
            local = plots.render(plot, Path(tmp) / path)
            client.log_artifact(run_id, str(local), str(Path(path).parent))


def register_best(
    client: Any, run_id: str, job: str, url: str, metric: str, tags: dict[str, str]
) -> Any:
    """The best checkpoint (`url`, best by `metric`) as a version of the registered model named
    after the job, with alias `best`; a version already registered for the same URL is reused.
    `tags` go on the registered model and the version (the job's, to find them by job). A
    local path is only recorded (tag `best_checkpoint_url`): the registry takes local paths
    only inside a run's own artifacts. Returns the version, or None."""
    from mlflow.exceptions import MlflowException

    url = scrub(url)
    _set_tags(client, run_id, {"best_checkpoint_url": url})
    if not re.match(r"^[a-z][a-z0-9+.-]*://", url, re.IGNORECASE):
        log.info("best checkpoint %s is a local path: recorded as a tag, not registered", url)
        return None
    try:
        client.create_registered_model(
            job, tags=tags, description=f"Checkpoints of job {job} (best by {metric})."
        )
    except MlflowException as err:
        if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    try:
        current = client.get_model_version_by_alias(job, BEST_ALIAS)
    except MlflowException:
        current = None
    if current is not None and current.source == url:
        version = current
    else:
        version = client.create_model_version(
            job,
            source=url,
            run_id=run_id,
            tags={"checkpoint_url": url, "best_metric": metric, **tags},
            description=f"Best checkpoint of job {job} by {metric}: {url}",
        )
        client.set_registered_model_alias(job, BEST_ALIAS, version.version)
    _set_tags(client, run_id, {"best_model_version": f"{job}/{version.version}"})
    log.info(
        "best checkpoint %s registered as model %s version %s (@%s)",
        url,
        job,
        version.version,
        BEST_ALIAS,
    )
    return version
