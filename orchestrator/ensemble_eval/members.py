"""Which checkpoints an ensemble evaluates: members resolved from MLflow runs, an experiment's
runs or registered model versions, each checked before anything is logged."""

from __future__ import annotations

import dataclasses
import logging
import socket
from dataclasses import dataclass
from typing import Any

from orchestrator.ensemble_eval.config import EnsembleConfig, EnsembleError, parse_model_ref
from orchestrator.spec import CheckpointConfig
from orchestrator.tracking.tags import CHECKPOINT_TAG, ENSEMBLE_TAG, JOB_TAG, PARENT_TAG

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


def read_trainer_state(url: str, what: str) -> dict[str, Any]:
    """A committed checkpoint's trainer.pt (spec, model weights, optimizer ...)."""
    from orchestrator.checkpoint import CheckpointStore, split_checkpoint_url

    root, step = split_checkpoint_url(url)
    try:
        return CheckpointStore(root).read(step, "trainer.pt")
    except Exception as err:
        why = "it does not exist" if isinstance(err, FileNotFoundError) else ""
        hint = ""
        if why and "://" not in url.removeprefix("file://"):
            # a Ray task may run on another node than the one that wrote the checkpoint
            hint = (
                f" (a local path is read on the machine doing the evaluation, here "
                f"{socket.gethostname()}: on a multi-node Ray cluster, checkpoint.storage must be "
                "S3 or a filesystem every node mounts; or run with --local where it is)"
            )
        why = why or f"{type(err).__name__}: {err}"
        raise EnsembleError(f"{what}: cannot read {url}/trainer.pt: {why}{hint}") from err


def _load_member(
    label: str,
    selected_by: str,
    run_id: str | None,
    run_name: str | None,
    root: str,
    committed: Any,
    what: str,
) -> Member:
    """Check that a committed checkpoint's trainer.pt fits; its weights are not kept: each
    member's evaluation reads them itself (the driver never holds every member's weights at
    once, nor ships them to Ray tasks)."""
    from orchestrator.checkpoint import CheckpointStore
    from orchestrator.spec import JobSpec, from_dict

    url = f"{CheckpointStore(root).root}/step-{committed.step:08d}"
    state = read_trainer_state(url, what)
    try:
        weights = state["strategy"]["model"]
        spec = from_dict(JobSpec, state["spec"])
    except Exception as err:
        raise EnsembleError(
            f"{what}: {url}/trainer.pt is not a training checkpoint: {err}"
        ) from err
    fc = weights.get("fc.weight")
    if fc is None:
        raise EnsembleError(f"{what}: {url}: the model state has no fc.weight (not a ResNet?)")
    return Member(
        label=label,
        selected_by=selected_by,
        run_id=run_id,
        run_name=run_name,
        checkpoint_url=url,
        step=committed.step,
        marker_metrics=committed.metrics,
        model_name=spec.model.name,
        model_options=spec.model.options(),
        shortcut=spec.model.shortcut,
        num_classes=int(fc.shape[0]),
        data=spec.data,
        seed=spec.seed,
    )


def _committed(root: str, what: str) -> list[Any]:
    from orchestrator.checkpoint import CheckpointStore

    try:
        return CheckpointStore(root).committed()
    except Exception as err:
        raise EnsembleError(
            f"{what}: cannot list checkpoints at {root}: {type(err).__name__}: {err}"
        ) from err


def member_from_run(run: Any, checkpoint: str, selected_by: str) -> Member:
    """The chosen committed checkpoint (`best` or `latest`) of a training run."""
    from orchestrator.checkpoint import best_checkpoint

    run_id, name = run.info.run_id, run.info.run_name
    what = f"run {run_id} ({name})"
    job = run.data.tags.get(JOB_TAG)
    storage = run.data.params.get("checkpoint.storage")
    if not job or not storage:
        raise EnsembleError(
            f"{what} has no checkpoint: it is not an orchestrator training run (no tag "
            f"{JOB_TAG!r} or param 'checkpoint.storage')"
        )
    root = f"{storage.rstrip('/')}/{job}/checkpoints"
    found = _committed(root, what)
    if not found:
        raise EnsembleError(f"{what} has no committed checkpoint under {root}")
    if checkpoint == "latest":
        chosen = found[-1]
    else:
        # the run's own choice (an old run's may be a legacy name), as training chose its best
        metric = run.data.params.get("checkpoint.best_metric", CheckpointConfig().best_metric)
        chosen = best_checkpoint(found, metric)
        if chosen is None:
            raise EnsembleError(
                f"{what}: no committed checkpoint under {root} has {metric!r} in its marker "
                "(was validation on?); use --checkpoint latest"
            )
    return _load_member(name or run_id, selected_by, run_id, name, root, chosen, what)


def member_from_version(client: Any, ref: str) -> Member:
    """A registered model version: its checkpoint is its tag `checkpoint_url` (versions that
    orchestrator.publish logged) or its source (URL-only versions)."""
    from orchestrator.checkpoint import split_checkpoint_url

    name, alias, version = parse_model_ref(ref)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, version)
    except Exception as err:
        raise EnsembleError(f"model {ref}: not found in the MLflow registry: {err}") from err
    what = f"model {ref} (version {mv.version}, run {mv.run_id or '-'})"
    # a logged model's version (source models:/m-...) names its checkpoint in a tag; an older,
    # URL-only version's source is the checkpoint itself
    url = (mv.tags or {}).get(CHECKPOINT_TAG) or mv.source or ""
    try:
        root, step = split_checkpoint_url(url)
    except ValueError:
        raise EnsembleError(
            f"{what}: source {url!r} is not a checkpoint URL (.../checkpoints/step-NNNNNNNN)"
        ) from None
    found = {c.step: c for c in _committed(root, what)}
    if step not in found:
        raise EnsembleError(
            f"{what}: checkpoint {url} is not committed or its files are missing/unreachable"
        )
    run_name = None
    if mv.run_id:
        try:
            run_name = client.get_run(mv.run_id).info.run_name
        except Exception as err:  # noqa: BLE001 - the version stands on its own
            log.debug("model %s: run %s not readable: %s", ref, mv.run_id, err)
    label = f"{name}@{alias}" if alias else f"{name}/{version}"
    return _load_member(label, f"model {ref}", mv.run_id, run_name, root, found[step], what)


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
