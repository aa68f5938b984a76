"""Training curves in the paper's style (He et al. 2016, Figs. 4 and 6), and Fig. 7's layer
responses (`layer_responses_figure`, `plot_layer_responses`: orchestrator.paper.layer_responses
measures them).

Error (%) against iterations: a thin line for the training error and a bold line (with its
evaluation points marked) for the validation error, one colour per run, and the paper's number
as a dotted reference line. Drawn with matplotlib's object API on the Agg canvas, so it needs no
display and does not touch pyplot's global state; matplotlib is optional (the dev extra): where
it is missing, `available()` is False and callers skip their plots.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the paper's figures use a small palette of saturated colours; these stay apart in greyscale too
COLOURS = ("#1f4e9c", "#c0392b", "#2e8b57", "#8e44ad", "#d4a017", "#17a2b8")

Points = Sequence[tuple[float, float]]  # (iteration, value)


@dataclass
class Curve:
    """One run's curves: training (thin) and validation (bold) against iterations."""

    label: str
    train: Points = ()
    val: Points = ()


@dataclass
class Reference:
    """A horizontal reference line, e.g. the paper's final error."""

    label: str
    value: float
    colour: str = "#555555"


@dataclass
class Plot:
    title: str
    ylabel: str = "error (%)"
    curves: list[Curve] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)
    train_name: str = "train"
    val_name: str = "val"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def iteration_scale(max_iter: float) -> tuple[float, str]:
    """The paper labels its x axis 'iter. (1e4)'; short runs keep plain iteration counts."""
    if max_iter >= 20_000:
        return 1e4, "iterations (×10⁴)"
    if max_iter >= 2_000:
        return 1e3, "iterations (×10³)"
    return 1.0, "iterations"


def figure(plot: Plot, *, width_in: float = 7.0, height_in: float = 4.4, dpi: int = 130) -> Any:
    """`plot` drawn on a matplotlib Figure with an Agg canvas (no display, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [x for c in plot.curves for pts in (c.train, c.val) for x, _ in pts]
    ys = [y for c in plot.curves for pts in (c.train, c.val) for _, y in pts]
    ys += [r.value for r in plot.references]
    scale, xlabel = iteration_scale(max(xs, default=1.0))
    for i, curve in enumerate(plot.curves):
        colour = COLOURS[i % len(COLOURS)]
        prefix = f"{curve.label}: " if len(plot.curves) > 1 or curve.label else ""
        if curve.train:
            tx, ty = zip(*curve.train)
            ax.plot(
                [x / scale for x in tx],
                ty,
                color=colour,
                linewidth=0.9,
                alpha=0.85,
                label=f"{prefix}{plot.train_name}",
            )
        if curve.val:
            vx, vy = zip(*curve.val)
            ax.plot(
                [x / scale for x in vx],
                vy,
                color=colour,
                linewidth=2.6,
                marker="o",
                markersize=4.5,
                label=f"{prefix}{plot.val_name}",
            )
    for ref in plot.references:
        ax.axhline(ref.value, color=ref.colour, linestyle=":", linewidth=1.6, label=ref.label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(plot.ylabel)
    ax.set_title(plot.title, fontsize=11)
    if xs:
        ax.set_xlim(0, max(xs) / scale * 1.02)
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max((hi - lo) * 0.08, 0.5 if plot.ylabel.endswith("(%)") else 0.02)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=scale == 1.0))  # whole iterations
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    return fig


def render(plot: Plot, path: str | Path, **size: Any) -> Path:
    """Draw `plot` to a PNG at `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure(plot, **size).savefig(path, format="png")
    return path


def training_figures(title: str, ref: Any, history: Mapping[str, Points]) -> list[tuple[str, Plot]]:
    """A training run's figures as (artifact path, Plot): top-1 and top-5 error (%) with the
    paper's number `ref` (a PaperResult, or None) as a reference line, and the loss.
    `history` maps `train/top1_err`, `val/top1_err`, ..., `train/loss`, `val/loss` to (step,
    value) points, errors as fractions; a figure without points is left out."""
    figures = []
    for key, name in (("top1", "top-1"), ("top5", "top-5")):
        train = [(s, v * 100) for s, v in history.get(f"train/{key}_err", ())]
        val = [(s, v * 100) for s, v in history.get(f"val/{key}_err", ())]
        if not (train or val):
            continue
        value = getattr(ref, key, None) if ref else None
        refs = []
        if value is not None:
            refs.append(Reference(f"paper: {value:.2f}% ({ref.source}, {ref.protocol})", value))
        plot = Plot(
            title=f"{title}: {name} error",
            ylabel=f"{name} error (%)",
            curves=[Curve("", train, val)],
            references=refs,
            train_name="train (thin)",
            val_name="validation (bold)",
        )
        figures.append((f"plots/{key}_error.png", plot))
    train_loss, val_loss = history.get("train/loss", ()), history.get("val/loss", ())
    if train_loss or val_loss:
        plot = Plot(
            title=f"{title}: cross-entropy loss",
            ylabel="loss (nats per image)",
            curves=[Curve("", train_loss, val_loss)],
            train_name="train (thin)",
            val_name="validation (bold)",
        )
        figures.append(("plots/loss.png", plot))
    return figures


# ---------------------------------------------------------------------------- Fig. 7

LINE_STYLES = {True: "-", False: "--"}  # residual solid, plain dashed, as in the paper


def _check_series(series: Mapping[str, Sequence[float]], plain: Collection[str]) -> None:
    if not series:
        raise ValueError("plot_layer_responses: no series to draw")
    empty = [label for label, stds in series.items() if not len(stds)]
    if empty:
        raise ValueError(f"plot_layer_responses: series {empty} have no values")
    unknown = sorted(set(plain) - set(series))
    if unknown:
        raise ValueError(
            f"plot_layer_responses: plain={unknown} are not series labels ({', '.join(series)})"
        )


def layer_responses_figure(
    series: Mapping[str, Sequence[float]],
    plain: Collection[str] = (),
    *,
    title: str = "Standard deviations of layer responses",
) -> Any:
    """Fig. 7 as a matplotlib Figure (Agg canvas, no pyplot): top, each series' stds by layer
    index (from 1); bottom, the same sorted in descending order. Labels in `plain` are drawn
    dashed, the others solid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_series(series, plain)
    fig = Figure(figsize=(7.0, 6.4), dpi=130)
    FigureCanvasAgg(fig)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for i, (label, stds) in enumerate(series.items()):
        style: dict[str, Any] = {
            "color": COLOURS[i % len(COLOURS)],
            "linestyle": LINE_STYLES[label not in plain],
            "linewidth": 1.4,
            "label": label,
        }
        index = range(1, len(stds) + 1)
        top.plot(index, list(stds), **style)
        bottom.plot(index, sorted(stds, reverse=True), **style)
    top.set_title(title, fontsize=11)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, color="#dddddd", linewidth=0.6)
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return fig


def plot_layer_responses(
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    plain: Collection[str] = (),
    *,
    title: str = "Standard deviations of layer responses",
) -> Path:
    """Draw `layer_responses_figure` (label -> stds in layer order; `plain` labels dashed) to a
    PNG at `path`; returns the path. Needs matplotlib (the dev extra)."""
    if not available():
        raise RuntimeError("plot_layer_responses needs matplotlib: pip install matplotlib")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layer_responses_figure(series, plain, title=title).savefig(path, format="png")
    return path
