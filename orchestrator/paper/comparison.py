"""The comparison with the paper, as tables: one place for its rows, markdown and csv.

Two reports, one formatter:
- a training run: its final (and best) validation errors beside the paper's number for the same
  model, protocol and shortcut (`training_rows`, `training_markdown`, `training_csv`), logged
  by orchestrator.tracking.tracker as `paper/comparison.{md,csv}`;
- an ensemble: each member and their ensemble beside the paper's Tables 2-6
  (`ensemble_rows`, `ensemble_markdown`), logged by orchestrator.ensemble_eval as
  `comparison.{md,json}`.

The numbers come from orchestrator.paper; errors are in percent here, as the paper prints them.
The curves are orchestrator.paper.plots'.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.paper.numbers import PaperResult, lookup

ERRORS = (("top-1", "top1"), ("top-5", "top5"))  # (how a table names it, the metric's key)
CSV_COLUMNS = (
    "metric",
    "model",
    "protocol",
    "this_run_final",
    "this_run_best",
    "paper",
    "gap_points",
    "paper_source",
)
ENSEMBLE_COLUMNS = (
    "member",
    "model",
    "step",
    "top-1 err %",
    "top-5 err %",
    "paper top-1 %",
    "paper top-5 %",
    "d top-1",
    "d top-5",
    "paper",
    "paper's set",
)
# the set each of the paper's numbers is measured on (He et al. 2016): Tables 2-4 and the
# released models on ImageNet's 50k validation images, Table 5's ensemble on its test set (the
# ILSVRC server's; its labels are not public), Table 6 on CIFAR-10's 10k test images (the
# project's CIFAR `val` split, datasets/cifar10.py)
TEST_SET_SOURCES = {"Table 5": "ImageNet test (server)", "Table 6": "CIFAR-10 test"}
VAL_SET = "ImageNet val"


def paper_set(paper: PaperResult) -> str:
    """The set `paper`'s number is measured on."""
    return TEST_SET_SOURCES.get(paper.source, VAL_SET)


def comparable(paper: PaperResult) -> bool:
    """Whether a gap to `paper` means something: never to an ImageNet test-set number, which
    no split here holds (an ensemble is evaluated on a validation split)."""
    return paper.source != "Table 5"


PAPER_CAVEAT = (
    "Errors in percent. The paper's numbers are on ImageNet val (CIFAR-10 test for the CIFAR "
    "nets): the gap means something only where this run trained and evaluated on that data."
)


def pct_cell(x: float | None) -> str:
    """A percent cell ("-" where there is no number)."""
    return "-" if x is None else f"{x:.2f}"


def gap_cell(ours: float | None, paper: float | None) -> str:
    """Ours minus the paper's, in points, signed ("-" where either is missing)."""
    return "-" if ours is None or paper is None else f"{ours - paper:+.2f}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A markdown table; `align` holds one letter per column, "l" or "r" (default: plain)."""

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(head)))
    return "\n".join([line(head), rule, *(line(row) for row in rows)])


# ----------------------------------------------------------------------------- a training run


@dataclass
class TrainingRow:
    """One error of a training run beside the paper's, in percent."""

    name: str  # "top-1 error (%)"
    final: float | None  # the last validation
    best: float | None  # the lowest validation
    paper: float | None
    gap: float | None  # final - paper, points


Points = Sequence[tuple[int, float]]  # (step, value) of a metric's history


def training_rows(
    ref: PaperResult | None, val_top1: Points, val_top5: Points
) -> tuple[list[TrainingRow], dict[str, float]]:
    """The rows of a training run's comparison, and its figures by name (`achieved/*`,
    `paper/*`, `gap/*`, percent: the tables' values, no longer logged as metrics); the
    validation histories hold fractions."""
    rows, metrics = [], {}
    for (name, key), val in zip(ERRORS, (val_top1, val_top5)):
        paper = getattr(ref, key) if ref is not None else None
        final = val[-1][1] * 100 if val else None
        best = min(v for _, v in val) * 100 if val else None
        gap = final - paper if final is not None and paper is not None else None
        for group, value in (("achieved", final), ("paper", paper), ("gap", gap)):
            if value is not None:
                metrics[f"{group}/{key}_err"] = float(value)
        rows.append(TrainingRow(f"{name} error (%)", final, best, paper, gap))
    return rows, metrics


def training_markdown(
    job: str,
    model: str,
    protocol: str,
    shortcut: Any,
    dataset: str,
    ref: PaperResult | None,
    rows: Sequence[TrainingRow],
    step: int,
) -> str:
    """paper/comparison.md of a training run."""
    if ref is None:
        paper = "no number for this model and protocol"
    else:
        paper = ref.source + (f" — {ref.note}" if ref.note else "")
    shortcut_text = shortcut or "paper default"
    head = ["", "this run (final)", "this run (best)", "paper", "gap (final − paper, points)"]
    cells = [
        [r.name, pct_cell(r.final), pct_cell(r.best), pct_cell(r.paper), gap_cell(r.final, r.paper)]
        for r in rows
    ]
    lines = [
        f"# {job}: {model} against He et al. (2016)",
        "",
        f"- model: `{model}` (shortcut {shortcut_text}), evaluation protocol: `{protocol}`",
        f"- dataset: `{dataset}`, final step: {step}",
        f"- paper: {paper}",
        "",
        markdown_table(head, cells, align="lrrrr"),
        "",
        PAPER_CAVEAT,
    ]
    return "\n".join(lines) + "\n"


def training_csv(
    model: str, protocol: str, ref: PaperResult | None, rows: Sequence[TrainingRow]
) -> str:
    """paper/comparison.csv of a training run (numbers rounded to 4 places, "" where none)."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(CSV_COLUMNS)
    for r in rows:
        cells = ["" if v is None else round(v, 4) for v in (r.final, r.best, r.paper, r.gap)]
        out.writerow([r.name, model, protocol, *cells, ref.source if ref else ""])
    return buf.getvalue()


# ----------------------------------------------------------------------------- an ensemble


class EnsembleMember(Protocol):
    """What a row needs of an ensemble member (orchestrator.ensemble_eval.Member)."""

    label: str
    run_id: str | None
    model_name: str
    step: int
    weight: float
    shortcut: str | None
    num_classes: int


class Errors(Protocol):
    """Errors as fractions (orchestrator.ensemble_eval.Scores)."""

    top1_err: float
    top5_err: float


def _pct(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(100 * x, 2)


def ensemble_rows(
    members: Sequence[EnsembleMember],
    scores: Sequence[Errors],
    ensemble: Errors,
    protocol: str,
    *,
    evaluated_on: str = "the members' validation split",
) -> list[dict[str, Any]]:
    """One row per member and one for the ensemble: our errors (on `evaluated_on`) beside the
    paper's for the same model and protocol (Tables 2-4, the authors' centre crops, Table 6
    for CIFAR nets); the ensemble beside Table 5 (ImageNet nets only), whose 3.57% top-5 is
    on the ImageNet test set: no gap is computed to it. Only on the paper's datasets' class
    counts (`paper.lookup`): a toy dataset gets no paper columns. These rows are
    comparison.json; each names its set (`set`, `paper_set`)."""
    from orchestrator.models import model_info

    def paper_cells(paper: PaperResult | None, source: str | None) -> dict[str, Any]:
        return {
            "paper_top1_err": paper.top1 if paper else None,
            "paper_top5_err": paper.top5 if paper else None,
            "paper_source": source if paper else None,
            "paper_set": paper_set(paper) if paper else None,
            "comparable": comparable(paper) if paper else None,
        }

    rows = []
    for m, s in zip(members, scores):
        paper = lookup(m.model_name, protocol, m.shortcut, m.num_classes)
        rows.append(
            {
                "member": m.label,
                "run_id": m.run_id,
                "model": m.model_name,
                "step": m.step,
                "weight": m.weight,
                "top1_err": _pct(s.top1_err),
                "top5_err": _pct(s.top5_err),
                "set": evaluated_on,
                **paper_cells(paper, f"{paper.source}, {paper.protocol}" if paper else None),
            }
        )
    imagenet = all(model_info(m.model_name)["family"] == "imagenet" for m in members)
    paper = lookup("ensemble", "ensemble", num_classes=members[0].num_classes) if imagenet else None
    rows.append(
        {
            "member": f"ensemble ({len(members)})",
            "run_id": None,
            "model": "ensemble",
            "step": None,
            "weight": None,
            "top1_err": _pct(ensemble.top1_err),
            "top5_err": _pct(ensemble.top5_err),
            "set": evaluated_on,
            **paper_cells(paper, f"{paper.source} ({paper.note})" if paper else None),
        }
    )
    return rows


def ensemble_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """comparison.md of an ensemble: `title`, then one line per row of `ensemble_rows`, then
    which set every number is on. A gap to a number on another set (Table 5's test set) is
    not computed: its cells say so."""

    def cell(x: Any) -> str:
        return pct_cell(x) if x is None or isinstance(x, float) else str(x)

    def gap(r: dict[str, Any], key: str) -> str:
        if r.get("comparable") is False and r[f"paper_{key}"] is not None:
            return "n/a: other set"
        return gap_cell(r[key], r[f"paper_{key}"])

    cells = [
        [
            r["member"],
            r["model"],
            cell(r["step"]),
            cell(r["top1_err"]),
            cell(r["top5_err"]),
            cell(r["paper_top1_err"]),
            cell(r["paper_top5_err"]),
            gap(r, "top1_err"),
            gap(r, "top5_err"),
            cell(r["paper_source"]),
            cell(r.get("paper_set")),
        ]
        for r in rows
    ]
    ours = rows[0].get("set", "the members' validation split") if rows else "-"
    sets = f"Our errors: on {ours}."
    if any(r["paper_source"] for r in rows):
        sets += " The paper's: on the set in the last column."
    if any(r.get("comparable") is False and r["paper_source"] for r in rows):
        sets += (
            " Table 5's ensemble (3.57% top-5) is the ImageNet test set, scored by the ILSVRC "
            "server, so no gap is computed to it: a validation error beside it is not the same "
            "measurement."
        )
    return f"{title}\n\n{markdown_table(ENSEMBLE_COLUMNS, cells)}\n\n{sets}\n"
