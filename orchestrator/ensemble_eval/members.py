"""Which checkpoints an ensemble evaluates: members resolved from MLflow runs, an experiment's
runs or registered model versions (through orchestrator.checkpoint_refs, whose
CheckpointRefError names a reference that does not resolve), each checked before anything is
logged."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from orchestrator.checkpoint_refs import (
    RunCheckpoint,
    VersionCheckpoint,
    read_trainer_state,
    run_checkpoint,
    trained_net,
    version_checkpoint,
)
from orchestrator.ensemble_eval.config import EnsembleConfig, EnsembleError
from orchestrator.tracking.tags import ENSEMBLE_TAG, PARENT_TAG

log = logging.getLogger(__name__)


@dataclass
class Member:
    label: str  # how tables and child runs name it
    selected_by: str  # "run", "experiment NAME", "model NAME@ALIAS"
    run_id: str | None
    run_name: str | None
    checkpoint_url: str  # .../checkpoints/step-NNNNNNNN
    step: int
    marker_metrics: dict[str, float]  # the commit marker's, under current metric names
    model_name: str
    model_options: dict[str, Any]
    shortcut: str | None
    num_classes: int
    data: Any  # DataConfig the member is evaluated on
    seed: int
    weight: float = 1.0


def _load_member(
    label: str, selected_by: str, run_name: str | None, ref: RunCheckpoint | VersionCheckpoint
) -> Member:
    """Check that a committed checkpoint's trainer.pt fits; its weights are not kept: each
    member's evaluation reads them itself (the driver never holds every member's weights at
    once, nor ships them to Ray tasks)."""
    net = trained_net(read_trainer_state(ref.url, ref.what), ref.url, ref.what)
    return Member(
        label=label,
        selected_by=selected_by,
        run_id=ref.run_id,
        run_name=run_name,
        checkpoint_url=ref.url,
        step=ref.step,
        marker_metrics=ref.committed.metrics,
        model_name=net.spec.model.name,
        model_options=net.spec.model.options(),
        shortcut=net.spec.model.shortcut,
        num_classes=net.num_classes,
        data=net.spec.data,
        seed=net.spec.seed,
    )


def member_from_run(run: Any, checkpoint: str, selected_by: str) -> Member:
    """The chosen committed checkpoint (`best` or `last`) of a training run."""
    ref = run_checkpoint(run, checkpoint)
    return _load_member(ref.run_name or ref.run_id, selected_by, ref.run_name, ref)


def member_from_version(client: Any, ref: str) -> Member:
    """A registered model version (NAME@ALIAS or NAME/VERSION) and the checkpoint it names."""
    found = version_checkpoint(client, ref)
    run_name = None
    if found.run_id:
        try:
            run_name = client.get_run(found.run_id).info.run_name
        except Exception as err:  # noqa: BLE001 - the version stands on its own
            log.debug("model %s: run %s not readable: %s", ref, found.run_id, err)
    return _load_member(str(found.ref), f"model {ref}", run_name, found)


def _experiment_runs(client: Any, name: str, filter_string: str) -> list[Any]:
    try:
        exp = client.get_experiment_by_name(name)
    except Exception as err:
        raise EnsembleError(f"--experiment {name!r}: cannot reach MLflow: {err}") from err
    if exp is None:
        raise EnsembleError(f"--experiment {name!r}: no such MLflow experiment")
    try:
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=filter_string,
            order_by=["attributes.start_time ASC"],
            max_results=1000,
        )
    except Exception as err:
        raise EnsembleError(f"--experiment {name!r} --filter {filter_string!r}: {err}") from err
    runs = [r for r in runs if ENSEMBLE_TAG not in r.data.tags and PARENT_TAG not in r.data.tags]
    if not runs:
        raise EnsembleError(f"--experiment {name!r} --filter {filter_string!r}: no run matches")
    return runs


def resolve_members(client: Any, cfg: EnsembleConfig) -> list[Member]:
    """Every member, its checkpoint read and checked; errors name the run."""
    members: list[Member] = []
    for run_id in cfg.runs:
        try:
            run = client.get_run(run_id)
        except Exception as err:
            raise EnsembleError(f"run {run_id}: not found in MLflow: {err}") from err
        members.append(member_from_run(run, cfg.checkpoint, "run"))
    if cfg.experiment:
        for run in _experiment_runs(client, cfg.experiment, cfg.filter):
            members.append(member_from_run(run, cfg.checkpoint, f"experiment {cfg.experiment}"))
    for ref in cfg.models:
        members.append(member_from_version(client, ref))
    unique: list[Member] = []
    seen: set[str] = set()
    for m in members:
        if m.checkpoint_url in seen:
            log.warning("%s selected twice: counted once", m.label)
            continue
        seen.add(m.checkpoint_url)
        unique.append(m)
    labels = [m.label for m in unique]
    for m in unique:  # a label names one member
        if labels.count(m.label) > 1:
            m.label = f"{m.label}-{(m.run_id or '')[:6]}-{m.step}"
    return unique


def check_members(members: list[Member], cfg: EnsembleConfig) -> dict[str, Any]:
    """Data, classes and weights agree; returns the dataset's manifest."""
    from orchestrator.data import DataError, load_manifest, split_shards

    if cfg.weights is not None and len(cfg.weights) != len(members):
        raise EnsembleError(
            f"--weights has {len(cfg.weights)} values for {len(members)} members "
            f"({', '.join(m.label for m in members)})"
        )
    for i, m in enumerate(members):
        m.weight = cfg.weights[i] if cfg.weights is not None else 1.0
        changes: dict[str, Any] = {}
        if cfg.data_url:
            changes.update(url=cfg.data_url, source="shards")
        if cfg.split:
            changes["val_split"] = cfg.split
        if cfg.num_workers is not None:
            changes["num_workers"] = cfg.num_workers
        m.data = dataclasses.replace(m.data, **changes)
        if m.data.synthetic:
            raise EnsembleError(f"{m.label}: trained on synthetic data: pass --data-url DATASET")
    classes = {m.label: m.num_classes for m in members}
    if len(set(classes.values())) > 1:
        raise EnsembleError(
            "members have different class counts: "
            + ", ".join(f"{m.label} (run {m.run_id}): {m.num_classes}" for m in members)
        )
    urls = {(m.data.url.rstrip("/"), m.data.val_split) for m in members}
    if len(urls) > 1:
        raise EnsembleError(
            "members were trained on different datasets; pass --data-url (and --split): "
            + ", ".join(f"{m.label}: {m.data.url} [{m.data.val_split}]" for m in members)
        )
    url, split = urls.pop()
    try:
        manifest = load_manifest(url)
        split_shards(manifest, url, split)
    except DataError as err:
        raise EnsembleError(f"evaluation data: {err}") from err
    if int(manifest["num_classes"]) != members[0].num_classes:
        raise EnsembleError(
            f"dataset {url} has {manifest['num_classes']} classes but the members have "
            f"{members[0].num_classes} ({', '.join(m.label for m in members)})"
        )
    return manifest
