"""A study's figures in the paper's style (He et al. 2016, Fig. 4 for ImageNet, Fig. 6 for
CIFAR-10): error (%) against iterations, one colour per cell, the mean over seeds as a line
and the seeds' range (min to max) as a band.

- `curves.png`: a panel per family as the paper lays them out (plain left, residual right),
  training error thin and dashed, test error bold;
- `test_error.png`: every cell's test error on one panel, plain nets dashed and residual nets
  solid, so depth-for-depth the two families meet in one picture.
Drawn with matplotlib's object API on the Agg canvas (orchestrator.paper.plots).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.paper.plots import COLOURS, iteration_scale
from orchestrator.study.results import TrialResult

Band = tuple[list[float], list[float], list[float], list[float]]  # steps, mean, low, high


def seed_band(results: Sequence[TrialResult], key: str) -> Band | None:
    """Mean, min and max over the trials' histories of `key` at the steps all of them have
    (percent); None when no trial has a point."""
    histories = [dict(r.history.get(key) or []) for r in results]
    histories = [h for h in histories if h]
    if not histories:
        return None
    steps = sorted(set.intersection(*(set(h) for h in histories)))
    values = [[h[s] * 100 for h in histories] for s in steps]
    mean = [sum(v) / len(v) for v in values]
    return [float(s) for s in steps], mean, [min(v) for v in values], [max(v) for v in values]


def _draw(ax: Any, band: Band, scale: float, colour: str, **line: Any) -> None:
    steps, mean, low, high = band
    xs = [s / scale for s in steps]
    ax.plot(xs, mean, color=colour, **line)
    if any(h > lo for lo, h in zip(low, high)):
        ax.fill_between(xs, low, high, color=colour, alpha=0.18, linewidth=0)


def _cells(results: Sequence[TrialResult]) -> dict[str, list[TrialResult]]:
    cells: dict[str, list[TrialResult]] = {}
    for r in results:
        if r.finished:
            cells.setdefault(r.trial.cell.label, []).append(r)
    return cells


def _axes_limits(results: Sequence[TrialResult]) -> tuple[float, str]:
    last = max((p[-1][0] for r in results for p in r.history.values() if p), default=1)
    return iteration_scale(float(last))


def _new_figure(panels: int) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * panels, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def curves_figure(title: str, results: Sequence[TrialResult], path: str | Path) -> Path | None:
    """`curves.png`: per family, training (thin, dashed) and test error (bold) of each cell."""
    cells = _cells(results)
    families = [
        f
        for f in ("plain", "residual")
        if any(rs[0].trial.cell.family(rs[0].trial.spec) == f for rs in cells.values())
    ]
    if not families:
        return None
    scale, xlabel = _axes_limits(results)
    fig, axes = _new_figure(len(families))
    colour_of = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(cells)}
    for ax, family in zip(axes, families):
        for label, rs in cells.items():
            if rs[0].trial.cell.family(rs[0].trial.spec) != family:
                continue
            colour = colour_of[label]
            train, test = seed_band(rs, "train/top1_err"), seed_band(rs, "val/top1_err")
            if train:
                _draw(ax, train, scale, colour, linewidth=0.9, linestyle="--")
            if test:
                _draw(ax, test, scale, colour, linewidth=2.4, label=f"{label} (n={len(rs)})")
        ax.set_title(f"{family} nets", fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("error (%)")
        ax.grid(True, color="#dddddd", linewidth=0.6)
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.suptitle(f"{title}: dashed = training error, bold = test error; band = seeds' range")
    fig.tight_layout()
    return _save(fig, path)


def test_error_figure(title: str, results: Sequence[TrialResult], path: str | Path) -> Path | None:
    """`test_error.png`: every cell's test error, plain dashed and residual solid; a cell's
    colour is its depth's, so plain-20 and ResNet-20 share one."""
    cells = _cells(results)
    if not cells:
        return None
    scale, xlabel = _axes_limits(results)
    fig, (ax,) = _new_figure(1)
    depths: dict[str, str] = {}
    for label, rs in cells.items():
        band = seed_band(rs, "val/top1_err")
        if band is None:
            continue
        depth = "".join(ch for ch in rs[0].trial.spec.model.name if ch.isdigit()) or label
        colour = depths.setdefault(depth, COLOURS[len(depths) % len(COLOURS)])
        plain = rs[0].trial.cell.family(rs[0].trial.spec) == "plain"
        style = {"linestyle": "--" if plain else "-", "linewidth": 2.0}
        _draw(ax, band, scale, colour, label=f"{label} (n={len(rs)})", **style)
    ax.set_title(f"{title}: test error, plain dashed, residual solid", fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test error (%)")
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
