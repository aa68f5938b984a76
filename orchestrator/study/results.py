"""A study's results, read back from MLflow: each trial's run and histories, and the study
table, per cell the mean +- std over seeds of the final and the best validation error, with
the paper's number beside it and the difference.

Statistics are over the seeds that FINISHED; `n` says how many. std is the sample standard
deviation (ddof=1), blank for n=1. Errors are in percent here, as the paper prints them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.paper import numbers as paper
from orchestrator.paper.comparison import markdown_table, pct_cell
from orchestrator.study.grid import Study, Trial
from orchestrator.tracking.tags import ERROR_TAG, NUM_CLASSES_TAG

History = list[tuple[int, float]]  # (step, value)
CURVES = ("train/top1_err", "val/top1_err")  # what the figures draw, per trial


@dataclass
class TrialResult:
    """One trial as its MLflow run records it (run_id None: the trial never opened a run)."""

    trial: Trial
    run_id: str | None = None
    status: str = "MISSING"
    error: str = ""  # the run's error tag, or Tune's error for the trial
    history: dict[str, History] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # the run's, as read
    params: dict[str, str] = field(default_factory=dict)  # the run's: the spec it trained with

    @property
    def num_classes(self) -> int | None:
        """The trained dataset's class count (the loop's run tag), None where not known."""
        classes = self.tags.get(NUM_CLASSES_TAG)
        return int(classes) if classes else None

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    def final(self, key: str = "val/top1_err") -> float | None:
        points = self.history.get(key) or []
        return points[-1][1] * 100 if points else None

    def best(self, key: str = "val/top1_err") -> float | None:
        points = self.history.get(key) or []
        return min(v for _, v in points) * 100 if points else None


@dataclass
class CellRow:
    """One row of the study table (errors in percent)."""

    label: str
    model: str
    family: str
    n: int
    seeds: int
    final_mean: float | None
    final_std: float | None
    best_mean: float | None
    best_std: float | None
    paper: float | None
    paper_source: str
    failed: list[str]

    @property
    def diff(self) -> float | None:
        if self.final_mean is None or self.paper is None:
            return None
        return self.final_mean - self.paper


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1); (None, None) for no values, std None for one."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def read_trial(client: Any, experiment_id: str, trial: Trial, error: str = "") -> TrialResult:
    from orchestrator.tracking.run_report import metric_history
    from orchestrator.tracking.runs import find_job_run

    run = find_job_run(client, experiment_id, trial.job)
    if run is None:
        return TrialResult(trial, error=error or "no MLflow run: the trial never started")
    history = {key: metric_history(client, run.info.run_id, key) for key in CURVES}
    return TrialResult(
        trial,
        run.info.run_id,
        run.info.status,
        error or run.data.tags.get(ERROR_TAG, ""),
        history,
        dict(run.data.tags),
        dict(run.data.params),
    )


def cell_rows(study: Study, results: Sequence[TrialResult]) -> list[CellRow]:
    rows = []
    for cell in study.grid_cells():
        mine = [r for r in results if r.trial.cell.label == cell.label]
        done = [r for r in mine if r.finished and r.final() is not None]
        spec = mine[0].trial.spec
        final_mean, final_std = mean_std([r.final() for r in done])  # type: ignore[misc]
        best_mean, best_std = mean_std([r.best() for r in done])  # type: ignore[misc]
        # the paper's numbers are for its datasets' class counts: a 10-class ImageNet-layout
        # subset has nothing to compare with
        classes = next((r.num_classes for r in mine if r.num_classes), spec.model.num_classes)
        ref = paper.lookup(spec.model.name, spec.eval.protocol, spec.model.shortcut, classes)
        rows.append(
            CellRow(
                label=cell.label,
                model=spec.model.name
                + (f" ({spec.model.shortcut})" if spec.model.shortcut else ""),
                family=cell.family(study.base),
                n=len(done),
                seeds=len(mine),
                final_mean=final_mean,
                final_std=final_std,
                best_mean=best_mean,
                best_std=best_std,
                paper=ref.top1 if ref else None,
                paper_source=f"{ref.source}, {ref.protocol}" if ref else "",
                failed=[r.trial.job for r in mine if not r.finished],
            )
        )
    return rows


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def table_markdown(study: Study, rows: Sequence[CellRow], dataset: str) -> str:
    head = ["cell", "model", "n", "final top-1 err", "best top-1 err", "paper", "diff", "source"]
    body = [
        [
            r.label,
            r.model,
            f"{r.n}/{r.seeds}",
            _pm(r.final_mean, r.final_std),
            _pm(r.best_mean, r.best_std),
            pct_cell(r.paper),
            "-" if r.diff is None else f"{r.diff:+.2f}",
            r.paper_source or "no number",
        ]
        for r in rows
    ]
    failed = [job for r in rows for job in r.failed]
    lines = [
        f"# Study {study.name}" + (f": {study.paper}" if study.paper else ""),
        "",
        (
            f"Dataset: {dataset}. Validation top-1 error in percent, mean ± sample std over "
            "the seeds that finished (n of seeds); final = the last validation, best = the "
            "lowest. diff = final mean - the paper's number, in points. The paper's numbers "
            "are on ImageNet val / CIFAR-10 test: the diff means something only on that data."
        ),
        "",
        markdown_table(head, body, "llrrrrrl"),
    ]
    if failed:
        lines += ["", f"Not finished ({len(failed)}): {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def table_csv(rows: Sequence[CellRow]) -> str:
    head = "cell,model,family,n,seeds,final_mean,final_std,best_mean,best_std,paper,diff,source"

    def num(x: float | None) -> str:
        return "" if x is None or math.isnan(x) else f"{x:.4f}"

    lines = [head]
    for r in rows:
        values = (r.final_mean, r.final_std, r.best_mean, r.best_std, r.paper, r.diff)
        source = r.paper_source.replace(",", ";")
        lines.append(
            f"{r.label},{r.model},{r.family},{r.n},{r.seeds},"
            + ",".join(num(v) for v in values)
            + f",{source}"
        )
    return "\n".join(lines) + "\n"


def table_metrics(rows: Sequence[CellRow]) -> dict[str, float]:
    """The table as the parent run's metrics: `cell/<label>/final_err_mean`, ... (percent)."""
    out: dict[str, float] = {}
    for r in rows:
        values = {
            "final_err_mean": r.final_mean,
            "final_err_std": r.final_std,
            "best_err_mean": r.best_mean,
            "best_err_std": r.best_std,
            "paper_err": r.paper,
            "diff": r.diff,
        }
        out[f"cell/{r.label}/n"] = float(r.n)
        out.update({f"cell/{r.label}/{k}": v for k, v in values.items() if v is not None})
    return out
