"""Which checkpoints an ensemble evaluates: members resolved from MLflow runs, an experiment's
runs or registered model versions (through orchestrator.checkpoint_refs, whose
CheckpointRefError names a reference that does not resolve), each checked before anything is
logged."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.checkpoint_refs import (
    CheckpointRefError,
    Chosen,
    RunCheckpoint,
    VersionCheckpoint,
    check_which,
    committed_checkpoints,
    read_trainer_state,
    run_checkpoint,
    trained_net,
    version_checkpoint,
)
from orchestrator.ensemble_eval.config import EnsembleConfig, EnsembleError, parse_ranked
from orchestrator.tracking.tags import ENSEMBLE_TAG, MODEL_TAG, PARENT_TAG

if TYPE_CHECKING:
    from orchestrator.checkpoint import Committed

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


@dataclass(frozen=True)
class UrlCheckpoint(Chosen):
    """A committed checkpoint named by its URL (--checkpoint-url): no MLflow run behind it."""

    committed: Committed
    run_id: None = None

    @property
    def what(self) -> str:
        return f"--checkpoint-url {self.url}"


def url_checkpoint(url: str, which: str = "best") -> UrlCheckpoint:
    """The committed checkpoint `url` names: a step (.../checkpoints/step-NNNNNNNN), or the
    `best` or `last` one of a job's checkpoint folder (.../checkpoints). Reads only the
    checkpoint store: no MLflow."""
    from orchestrator.checkpoint import best_checkpoint, split_checkpoint_url
    from orchestrator.spec import CheckpointConfig

    url = url.rstrip("/")
    what = f"--checkpoint-url {url}"
    try:
        root, step = split_checkpoint_url(url)
    except ValueError:
        root, step = url, None
    found = committed_checkpoints(root, what)
    if step is not None:
        chosen = next((c for c in found if c.step == step), None)
        if chosen is None:
            steps = ", ".join(str(c.step) for c in found) or "none"
            raise CheckpointRefError(
                f"{what}: step {step} is not a committed checkpoint under {root} (committed "
                f"steps: {steps})"
            )
        return UrlCheckpoint(chosen)
    if not found:
        raise CheckpointRefError(
            f"{what}: no committed checkpoint there; name a job's .../checkpoints folder or "
            "one of its step-NNNNNNNN folders"
        )
    # the job's own best_metric, as its marker records its spec (older markers: the default)
    recorded = (found[-1].spec or {}).get("checkpoint", {})
    metric = recorded.get("best_metric") or CheckpointConfig().best_metric
    choice = check_which(which)
    best = best_checkpoint(found, metric) if choice == "best" else None
    if choice == "best" and best is None:
        raise CheckpointRefError(
            f"{what}: no committed checkpoint has {metric!r} in its marker (was validation "
            "on?); use --checkpoint last"
        )
    return UrlCheckpoint(best or found[-1])


def member_from_url(url: str, which: str = "best") -> Member:
    """A committed checkpoint by URL (see url_checkpoint), labelled JOB-stepN."""
    ref = url_checkpoint(url, which)
    job = ref.url.rstrip("/").split("/")[-3] if ref.url.count("/") >= 3 else "checkpoint"
    return _load_member(f"{job}-step{ref.step}", "checkpoint URL", None, ref)


def _load_member(
    label: str,
    selected_by: str,
    run_name: str | None,
    ref: RunCheckpoint | VersionCheckpoint | UrlCheckpoint,
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


def _ranked_pool(client: Any, name: str, filter_string: str) -> list[Any]:
    """The runs `--ranked` chooses among: the experiment's runs matching the filter, study
    trials included, ensemble runs left out."""
    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise EnsembleError(f"--experiment {name!r}: no such MLflow experiment")
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=filter_string,
            order_by=["attributes.start_time ASC"],
            max_results=5000,
        )
    except EnsembleError:
        raise
    except Exception as err:
        raise EnsembleError(f"--experiment {name!r} --filter {filter_string!r}: {err}") from err
    return [r for r in runs if ENSEMBLE_TAG not in r.data.tags]


def ranked_members(client: Any, cfg: EnsembleConfig) -> list[Member]:
    """`cfg.ranked`'s members: for MODEL#RANK, the RANK-th best run tagged model=MODEL, by the
    value of checkpoint.best_metric at its best committed checkpoint (ties: the older run).
    A run that cannot be ranked (no committed checkpoint, no validation) is left out, said.
    Missing members are refused, naming them, unless cfg.allow_missing (then said)."""
    pool = _ranked_pool(client, str(cfg.experiment), cfg.filter)
    where = f"experiment {cfg.experiment!r}" + (f" ({cfg.filter})" if cfg.filter else "")
    order: dict[str, list[Any]] = {}
    for model in dict.fromkeys(parse_ranked(e)[0] for e in cfg.ranked):
        scored = []
        for run in (r for r in pool if r.data.tags.get(MODEL_TAG) == model):
            try:
                best = run_checkpoint(run, "best")
            except CheckpointRefError as err:
                log.warning("--ranked %s: %s is left out: %s", model, run.info.run_id, err)
                continue
            scored.append((best.committed.metrics[best.metric], run.info.start_time or 0, run))
        order[model] = [run for _, _, run in sorted(scored, key=lambda t: (t[0], t[1]))]
    chosen, missing = [], []
    for entry in cfg.ranked:
        model, rank = parse_ranked(entry)
        if rank > len(order[model]):
            missing.append(f"{entry} ({len(order[model])} ranked {model} run(s))")
        else:
            chosen.append((order[model][rank - 1], f"{model} #{rank} by its best val/top1_err"))
    if missing and not cfg.allow_missing:  # before any member's weights are read
        raise EnsembleError(
            f"--ranked: missing in {where}: {'; '.join(missing)}. Train them, or pass "
            f"--allow-missing to evaluate the {len(chosen)} that exist"
        )
    if missing:
        print(
            f"--allow-missing: evaluating {len(chosen)} of {len(cfg.ranked)} declared; "
            f"missing in {where}: {'; '.join(missing)}"
        )
    return [member_from_run(run, cfg.checkpoint, f"{how} in {where}") for run, how in chosen]


def resolve_members(client: Any, cfg: EnsembleConfig) -> list[Member]:
    """Every member, its checkpoint read and checked; errors name the run. `client` is None
    where every member is a --checkpoint-url and there is no MLflow."""
    members: list[Member] = []
    for run_id in cfg.runs:
        try:
            run = client.get_run(run_id)
        except Exception as err:
            raise EnsembleError(f"run {run_id}: not found in MLflow: {err}") from err
        members.append(member_from_run(run, cfg.checkpoint, "run"))
    if cfg.ranked:
        members += ranked_members(client, cfg)
    elif cfg.experiment:
        for run in _experiment_runs(client, cfg.experiment, cfg.filter):
            members.append(member_from_run(run, cfg.checkpoint, f"experiment {cfg.experiment}"))
    for ref in cfg.models:
        members.append(member_from_version(client, ref))
    for url in cfg.checkpoint_urls:
        members.append(member_from_url(url, cfg.checkpoint))
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
