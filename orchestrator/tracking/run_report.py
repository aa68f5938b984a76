"""What a finished training run reports in MLflow, read back from the run itself.

`log_paper_report`: the run's final and best validation errors beside the paper's number for
the same model, protocol and shortcut (the tables `paper/comparison.{md,csv}`, which MLflow's
UI shows as a table, and tags `paper.source`/`paper.protocol`), and its curves in the paper's
style (`plots/*.png`). It reads the run's whole history from the server (`metric_history`), so
a run resumed across attempts is reported whole. The driver calls it once the job's workers are
gone (orchestrator.publish.finished).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.paper.comparison import training_csv, training_markdown, training_rows
from orchestrator.spec import JobSpec
from orchestrator.tracking.redaction import log_tags, scrub
from orchestrator.tracking.tags import NUM_CLASSES_TAG, PAPER_PROTOCOL_TAG, PAPER_SOURCE_TAG

log = logging.getLogger(__name__)

# what the paper report reads from the run's history
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
    """(step, value) of metric `name`, one point per step (the last logged)."""
    points: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp)):
        points[m.step] = m.value
    return sorted(points.items())


def log_paper_report(client: Any, run_id: str, spec: JobSpec) -> dict[str, float]:
    """Log the comparison with the paper and the curves of the run of job `spec`; returns the
    comparison's numbers (`achieved/*`, `paper/*`, `gap/*`, percent). They go into the run as
    tables, not metrics: one value each would be a single-dot chart, and its group (achieved/)
    would come before train/ and val/ in the UI's charts (sorted by name). Each artifact is
    rewritten whole: a finished job submitted again reports nothing twice."""
    from orchestrator.paper import numbers as paper

    run = client.get_run(run_id)
    model, protocol, shortcut = spec.model.name, spec.eval.protocol, spec.model.shortcut
    classes = run.data.tags.get(NUM_CLASSES_TAG)  # the loop's; None: not known, compare
    ref = paper.lookup(model, protocol, shortcut, int(classes) if classes else None)
    hist = {key: metric_history(client, run_id, key) for key in REPORT_METRICS}
    last_step = max((pts[-1][0] for pts in hist.values() if pts), default=0)
    rows, numbers = training_rows(ref, hist["val/top1_err"], hist["val/top5_err"])
    if ref is not None:
        log_tags(client, run_id, {PAPER_SOURCE_TAG: ref.source, PAPER_PROTOCOL_TAG: ref.protocol})
    dataset = spec.data.url or "synthetic"
    md = training_markdown(spec.name, model, protocol, shortcut, dataset, ref, rows, last_step)
    client.log_text(run_id, scrub(md), "paper/comparison.md")
    client.log_text(run_id, scrub(training_csv(model, protocol, ref, rows)), "paper/comparison.csv")
    log_plots(client, run_id, f"{spec.name} ({model})", ref, hist)
    return numbers


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
