"""A study's grid: a base job spec, cells (each a set of overrides) and seeds -> trial specs.

Torch-free, like orchestrator.spec: a dry run, the planner and the tests expand grids without
the loop. Every trial is an ordinary job; its name is derived from the study, its cell and
its seed, so a resubmitted study finds each trial's checkpoints and MLflow run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.spec import JobSpec, SpecError, apply_overrides, check_name, parse_value
from orchestrator.tracking.tags import CELL_TAG, STUDY_TAG

# What a user may set with study.KEY=VALUE on the command line
STUDY_KEYS = ("name", "seeds", "max_concurrent", "img_per_s", "cells", "trial_runner")
# How a study's trials run on Ray Tune (orchestrator.study.in_actor): "auto" trains a
# one-worker trial in its Tune actor and others under Ray Train; "ray_train" every one there
TRIAL_RUNNERS = ("auto", "ray_train")
# Spec keys the study sets on every trial itself: an override of one would be dropped
STUDY_OWNED = {
    "seed": "a study's trials take seeds 0..study.seeds-1: set study.seeds=N",
    "tracking.parent_run_id": "the study nests its trials under its own parent run",
}


def grid(axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The product of axes, each a dotted spec key over its values, as a list of cells:
    grid({"model.name": ["resnet18", "resnet34"], "model.shortcut": ["A", "B"]}) -> 4 cells."""
    keys = list(axes)
    for key in keys:
        if isinstance(axes[key], (str, bytes)) or not len(axes[key]):
            raise SpecError(f"study axis {key}: give a list of one or more values")
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its overrides and the label its trials and table rows carry."""

    overrides: dict[str, Any]
    label: str

    def family(self, base: JobSpec) -> str:
        """'plain' or 'residual': how the paper's figures split nets (dashed vs solid)."""
        name = self.overrides.get("model.name", base.model.name)
        return "plain" if "plain" in str(name) else "residual"


@dataclass(frozen=True)
class Trial:
    cell: Cell
    seed: int
    spec: JobSpec

    @property
    def job(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Study:
    """A grid of jobs declared like the paper's experiment: the recipe (`base`), the cells
    (`grid(...)` products or hand-written lists) and seeds 0..seeds-1.

    `finalize` is the job file's recipe rule, applied to every trial after its overrides
    (ResNet-110's warm-up depends on the depth a cell sets). `max_concurrent` caps the trials
    running at once (0: as many as the cluster's resources allow)."""

    name: str
    base: JobSpec
    cells: list[dict[str, Any]]
    seeds: int = 1
    max_concurrent: int = 0
    finalize: Callable[[JobSpec], JobSpec] | None = None
    img_per_s: float = 0.0  # measured training img/s per GPU, for the dry run's GPU-hours
    trial_runner: str = "auto"  # TRIAL_RUNNERS
    paper: str = ""  # which table or figure of the paper it reproduces, for the parent run
    # the command line's spec overrides (in `base` already), kept so that trials() can
    # refuse a recipe rule (`finalize`) that would quietly change one of them
    given: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.name, "study.name")  # the trials' job names and the lease's folder
        if not self.cells:
            raise SpecError(f"study {self.name}: no cells; give cells=grid({{...}})")
        if not (isinstance(self.seeds, int) and self.seeds >= 1):
            raise SpecError(f"study.seeds={self.seeds!r}: set it to 1 or more")
        if not (isinstance(self.max_concurrent, int) and self.max_concurrent >= 0):
            raise SpecError(f"study.max_concurrent={self.max_concurrent!r}: set it >= 0")
        if self.trial_runner not in TRIAL_RUNNERS:
            raise SpecError(
                f"study.trial_runner={self.trial_runner!r}: give one of {', '.join(TRIAL_RUNNERS)}"
                " (auto: a one-worker trial trains in its Tune actor; ray_train: every trial "
                "under Ray Train)"
            )

    @property
    def experiment(self) -> str:
        return self.base.tracking.experiment

    def axes(self) -> list[str]:
        """The dotted spec keys the cells set (model.name, model.shortcut, ...), in order."""
        keys: dict[str, None] = {}
        for given in self.cells:
            keys.update((k, None) for k in given if k != "label")
        return list(keys)

    def grid_cells(self) -> list[Cell]:
        """The cells, labelled: a cell's "label" key, else its values joined
        ("resnet34-A")."""
        cells: list[Any] = []
        seen: dict[str, dict[str, Any]] = {}
        for given in self.cells:
            overrides = {k: v for k, v in given.items() if k != "label"}
            if "seed" in overrides or "name" in overrides:
                raise SpecError(
                    f"study {self.name}: a cell sets {'seed' if 'seed' in overrides else 'name'}"
                    "; seeds come from study.seeds and trial names from the study"
                )
            label = _slug(given["label"]) if "label" in given else None
            label = label or "-".join(_slug(v) for v in overrides.values()) or "base"
            if label in seen:
                raise SpecError(f"study {self.name}: cells {seen[label]} and {given} repeat")
            seen[label] = given
            cells.append(Cell(overrides, label))
        return cells

    def trials(self, parent_run_id: str | None = None) -> list[Trial]:
        """Every trial's resolved, validated spec: the base (the command line's overrides are
        in it: `apply_study_overrides`), then the cell's own, the seed and the trial's name."""
        base = self.base
        out = []
        for cell in self.grid_cells():
            for seed in range(self.seeds):
                job = f"{self.name}-{cell.label}-s{seed}"
                items = [f"{k}={json.dumps(v)}" for k, v in cell.overrides.items()]
                try:
                    spec = apply_overrides(base, [*items, f"seed={seed}", f"name={job}"])
                    if self.finalize:
                        spec = self.finalize(spec).validate()
                except SpecError as err:
                    raise SpecError(f"study {self.name}, cell {cell.label}: {err}") from None
                self._check_kept(spec, cell)
                tracking = dataclasses.replace(
                    spec.tracking,
                    parent_run_id=parent_run_id,
                    tags={**spec.tracking.tags, STUDY_TAG: self.name, CELL_TAG: cell.label},
                )
                out.append(Trial(cell, seed, dataclasses.replace(spec, tracking=tracking)))
        return out

    def _check_kept(self, spec: JobSpec, cell: Cell) -> None:
        """Every command-line override reaches the trial: the recipe rule must not change one
        (e.g. a warm-up rule resetting schedule.warmup_factor for the deep nets)."""
        for item in self.given:
            path = item.split("=", 1)[0]
            wanted, got = _at(self.base, path), _at(spec, path)
            if isinstance(wanted, dict) and isinstance(got, dict):  # tags: the study adds its own
                wanted, got = wanted.items() <= got.items(), True
            if wanted != got:
                rule = getattr(self.finalize, "__name__", "finalize")
                raise SpecError(
                    f"{item}: the study's recipe rule ({rule}) sets {path} to {got!r} in cell "
                    f"{cell.label}, so the override would not reach that trial; leave {path} "
                    "to the rule there (study.cells=LABEL,... runs the other cells), or set "
                    "the keys the rule reads so that it keeps yours"
                )

    def fingerprint(self) -> str:
        """Changes when the grid or a trial's spec does: names the study's Tune experiment,
        so a resubmitted study restores Tune's state only for the grid it was made for."""
        specs = [t.spec.to_dict() for t in self.trials()]
        return hashlib.sha256(json.dumps(specs, sort_keys=True).encode()).hexdigest()[:10]


def _at(spec: JobSpec, path: str) -> Any:
    node: Any = spec.to_dict()
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_not_axis(study: Study, item: str) -> None:
    """Refuse an override the study would drop: a key its cells set (an axis), or one the
    study sets on every trial (the seed, the parent run); the error names the way instead."""
    path = item.split("=", 1)[0].strip()
    if path in STUDY_OWNED:
        raise SpecError(f"{item}: {STUDY_OWNED[path]}; the override would change no trial")
    hit = [a for a in study.axes() if a == path or a.startswith(path + ".")]
    if hit:
        cells = study.grid_cells()
        value = item.split("=", 1)[1] if "=" in item else ""
        mine = [c.label for c in cells if c.overrides.get(path, object()) == parse_value(value)]
        way = f"study.cells={','.join(mine)}" if mine else "study.cells=LABEL[,LABEL]"
        raise SpecError(
            f"{item}: {hit[0]} is an axis of study {study.name} (its cells set it), so the "
            f"override would change no trial; choose cells with {way} (cells: "
            f"{', '.join(c.label for c in cells)}), or add a cell to the study file"
        )


def apply_study_overrides(study: Study, overrides: Sequence[str]) -> Study:
    """The study with the command line's overrides applied: `study.KEY=VALUE` to the study
    (study.cells=LABEL,LABEL keeps only those cells: a quick rerun of a few), `name=NEW`
    renames the study (its trials and parent run follow), the others (section.key=value) to
    its base spec, so they reach every trial. An override of an axis (a key the cells set),
    of seed or of what the study sets itself is refused (SpecError, exit 2), naming the way."""
    rest: list[str] = []
    changes: dict[str, Any] = {}
    for item in overrides:
        if item.startswith("name="):  # the study's name: its trials' names derive from it
            item = "study." + item
        if not item.startswith("study."):
            check_not_axis(study, item)
            rest.append(item)
            continue
        key, _, text = item[len("study.") :].partition("=")
        if key not in STUDY_KEYS or not _:
            raise SpecError(f"{item}: expected study.KEY=VALUE with KEY one of {STUDY_KEYS}")
        value = parse_value(text)
        if key in changes and changes[key] != value:
            raise SpecError(f"{item}: study.{key} is given twice ({changes[key]!r}); give it once")
        changes[key] = value
    keep = changes.pop("cells", None)
    if "name" in changes:
        changes["name"] = str(changes["name"])
    base = apply_overrides(study.base, rest)
    if "name" in changes:  # the study's base job carries its name (the dry run, the lease)
        base = dataclasses.replace(base, name=changes["name"])
    given = (*study.given, *rest)
    study = dataclasses.replace(study, base=base, given=given, **changes)
    if keep is not None:
        wanted = str(keep).split(",")
        labels = [c.label for c in study.grid_cells()]
        missing = [w for w in wanted if w not in labels]
        if missing:
            raise SpecError(f"study.cells: no cell {missing}; cells: {', '.join(labels)}")
        by_label = dict(zip(labels, study.cells))
        study = dataclasses.replace(study, cells=[by_label[w] for w in wanted])
    return study
