"""Evaluate trained runs and their ensemble with the paper's protocols; log it all to MLflow.

    python -m orchestrator.ensemble_eval --runs RUN_ID [RUN_ID ...] [--protocol ten_crop]
    python -m orchestrator.ensemble_eval --experiment imagenet \\
        --filter "tags.model = 'resnet152'" --checkpoint best --protocol multiscale
    python -m orchestrator.ensemble_eval --model r152@champion --model r101/3 --weights 2 1
    ray job submit -- python jobs/ensemble_eval.py [the same flags]
    python -m orchestrator.ensemble_eval ... --check      # resolve and check members only

Members
    --runs ID ...                 MLflow run ids of training jobs
    --experiment NAME [--filter]  every active run of an experiment matching an MLflow filter
                                  string (ensemble runs themselves are left out)
    --model NAME@ALIAS, NAME/VERSION  registered model versions (repeatable); a version's
                                  source is its checkpoint URL (.../checkpoints/step-NNNNNNNN)
The selections add up, in this order: --runs, the experiment's runs (oldest first), --model
(a checkpoint selected twice counts once); --weights follow that order. A training run's
checkpoints are found from its tag `orchestrator.job` and its param `checkpoint.storage`:
`{checkpoint.storage}/{job}/checkpoints` (a `CheckpointStore`); `--checkpoint best` takes the
committed step with the lowest `checkpoint.best_metric` (val_top1_err) in its commit marker
(the newer on a tie), `latest` the newest committed step. A model version pins its own step.

Each member is rebuilt from the checkpoint's spec and weights and evaluated on the validation
split of its own data section (`--data-url`/`--split` override it; all members must read the
same split) with `orchestrator.evaluation.evaluate`: per-sample probabilities, lined up by
the samples' positions in the split. The ensemble is the (weighted, `--weights`) mean of the
members' probabilities. Top-1/top-5 errors are compared with the paper's Tables 3-5
(`orchestrator.paper.lookup`) in a table that is printed and logged.

Where it runs: one Ray task per member (a GPU each where the cluster has GPUs), or in this
process with `--local`. A tqdm bar shows progress.

MLflow: one parent run in `--output-experiment` (default "ensembles") with the ensemble's
metrics, the comparison table (comparison.md / comparison.json), and one nested child run per
member (tag mlflow.parentRunId) with its own. Metrics are fractions, as in training runs:
top1_err, top5_err, loss (mean -log p(true class)), samples; per_class_accuracy.json on every
run; with --log-probs, probs.npz (probs [N, C], labels, indices = positions in the split).
`--bn-recalibrate N` first recomputes each member's BN statistics as the exact average over N
training batches (the authors' practice). Everything is checked before the parent run is created: an
unknown protocol, a member without a committed checkpoint, an unreachable run, checkpoint or
dataset, members with different class counts, a weights list of the wrong length all stop with
exit code 2 and a message naming the run (or listing the valid choices), and nothing is
logged. If evaluation fails after that, the parent run (and its unfinished children) are
marked FAILED with the error in the tag `orchestrator.error`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.evaluation import (
    PAPER_SCALES,
    PROTOCOLS,
    EvalResult,
    UnknownProtocolError,
    check_protocol,
    check_scales,
    combine_probs,
    topk_errors,
)
from orchestrator.tracking import JOB_TAG
from orchestrator.train import Terminated, raise_on_sigterm

log = logging.getLogger(__name__)

ENSEMBLE_TAG = "orchestrator.ensemble"
PARENT_TAG = "mlflow.parentRunId"
CHECKPOINT_CHOICES = ("best", "latest")


class EnsembleError(ValueError):
    """Bad input: the message names the run, the object or the valid choices."""


# ============================================================================================
# configuration (the CLI's flags, or a job file's declaration)


@dataclass
class EnsembleConfig:
    """What to evaluate and how. A job file declares one; command-line flags override it."""

    name: str | None = None  # the parent run's name (default: ensemble-PROTOCOL-N)
    runs: list[str] = field(default_factory=list)  # MLflow run ids
    experiment: str | None = None  # select every run of this experiment matching `filter`
    filter: str = ""  # MLflow search filter, e.g. "tags.model = 'resnet152'"
    models: list[str] = field(default_factory=list)  # registered versions: NAME@ALIAS, NAME/VERSION
    checkpoint: str = "best"  # best (lowest best_metric in the commit marker) | latest
    protocol: str = "center"  # center | ten_crop | multiscale
    scales: list[int] = field(default_factory=lambda: list(PAPER_SCALES))  # multiscale sizes
    flips: bool = True  # multiscale: also the mirrored image
    weights: list[float] | None = None  # one per member, in member order; None = equal
    data_url: str | None = None  # evaluate on this dataset instead of the members' own
    split: str | None = None  # instead of the members' data.val_split
    batch_size: int = 100
    num_workers: int | None = None  # data loader workers per member (None: the member's)
    max_batches: int = 0  # > 0: only this many batches per pass (a quick look)
    bn_recalibrate: int = 0  # > 0: recompute BN statistics over this many training batches
    local: bool = False  # evaluate in this process instead of Ray tasks
    use_gpu: bool | None = None  # None: where there are GPUs
    cpus_per_member: float = 1.0  # Ray task resources
    output_experiment: str = "ensembles"
    log_probs: bool = False  # log each member's (and the ensemble's) probs.npz to MLflow
    save_probs: str | None = None  # also write them to this folder
    dry_run: bool = False  # print the resolved config and stop (no service is touched)
    check: bool = False  # resolve and check the members, list them, evaluate and log nothing
    progress: bool = True

    def validate(self) -> EnsembleConfig:
        check_protocol(self.protocol)
        if self.checkpoint not in CHECKPOINT_CHOICES:
            raise EnsembleError(
                f"--checkpoint {self.checkpoint!r}: valid choices: {', '.join(CHECKPOINT_CHOICES)}"
            )
        if not (self.runs or self.experiment or self.models):
            raise EnsembleError("no members: select them with --runs, --experiment or --model")
        if self.filter and not self.experiment:
            raise EnsembleError("--filter needs --experiment (the experiment to search)")
        try:
            self.scales = list(check_scales(self.scales))
        except ValueError as err:
            raise EnsembleError(str(err)) from None
        if self.batch_size < 1:
            raise EnsembleError(f"--batch-size {self.batch_size}: expected >= 1")
        if self.max_batches < 0 or self.bn_recalibrate < 0:
            raise EnsembleError("--max-batches and --bn-recalibrate must be >= 0")
        if self.weights is not None and any(not math.isfinite(w) or w < 0 for w in self.weights):
            raise EnsembleError(f"--weights {self.weights}: expected non-negative numbers")
        if self.weights is not None and sum(self.weights) <= 0:
            raise EnsembleError(f"--weights {self.weights}: at least one must be > 0")
        for spec in self.models:
            parse_model_ref(spec)
        return self


_SELECTION = ("runs", "experiment", "filter", "models")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.ensemble_eval",
        description="Evaluate trained runs and their ensemble (mean of softmax probabilities) "
        "with the paper's protocols; log a parent MLflow run with one child per member.",
        argument_default=argparse.SUPPRESS,  # unset flags keep the job file's values
    )
    sel = p.add_argument_group("members (these add up)")
    sel.add_argument("--runs", nargs="+", metavar="RUN_ID", help="MLflow run ids")
    sel.add_argument("--experiment", metavar="NAME", help="select runs of this experiment")
    sel.add_argument(
        "--filter", metavar="FILTER", help="MLflow filter, e.g. \"tags.model = 'resnet152'\""
    )
    sel.add_argument("--model", dest="models", action="append", metavar="NAME@ALIAS|NAME/VERSION",
                     help="a registered model version (repeatable)")  # fmt: skip
    sel.add_argument("--checkpoint", metavar="best|latest",
                     help="which committed checkpoint of a run (default: best)")  # fmt: skip
    how = p.add_argument_group("evaluation")
    how.add_argument("--protocol", metavar="|".join(PROTOCOLS), help="default: center")
    how.add_argument("--scales", nargs="+", type=int, metavar="S",
                     help=f"multiscale shorter sides (default: {' '.join(map(str, PAPER_SCALES))})")  # fmt: skip
    how.add_argument(
        "--flips", action=argparse.BooleanOptionalAction, help="multiscale flips (default: on)"
    )
    how.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="one per member, in member order"
    )
    how.add_argument("--data-url", help="evaluate on this dataset instead of the members' own")
    how.add_argument("--split", help="validation split name (default: the members' data.val_split)")
    how.add_argument("--batch-size", type=int)
    how.add_argument("--num-workers", type=int, help="data loader workers per member")
    how.add_argument("--max-batches", type=int, help="only this many batches per pass")
    how.add_argument("--bn-recalibrate", type=int, metavar="N",
                     help="recompute BN statistics over N training batches first")  # fmt: skip
    run = p.add_argument_group("where and what to log")
    run.add_argument("--local", action="store_true", help="evaluate in this process, not on Ray")
    run.add_argument("--gpu", dest="use_gpu", action=argparse.BooleanOptionalAction,
                     help="use GPUs (default: where present)")  # fmt: skip
    run.add_argument("--cpus-per-member", type=float)
    run.add_argument(
        "--output-experiment", help="MLflow experiment of the result (default: ensembles)"
    )
    run.add_argument("--name", help="the parent run's name (default: ensemble-PROTOCOL-N)")
    run.add_argument("--log-probs", action="store_true", help="log probs.npz per member to MLflow")
    run.add_argument("--save-probs", metavar="DIR", help="write member-I.npz and ensemble.npz here")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config, then stop")
    run.add_argument("--check", action="store_true",
                     help="resolve and check the members, list them; evaluate and log nothing")  # fmt: skip
    run.add_argument("--progress", action=argparse.BooleanOptionalAction)
    return p


def parse_args(argv: Sequence[str], base: EnsembleConfig | None = None) -> EnsembleConfig:
    """Flags over `base` (a job file's config). Any member flag replaces the base's whole
    member selection, so `jobs/ensemble_eval.py --runs A B` evaluates exactly A and B."""
    given = vars(build_parser().parse_args(list(argv)))
    base = dataclasses.replace(base) if base is not None else EnsembleConfig()
    if any(k in given for k in _SELECTION):
        base.runs, base.experiment, base.filter, base.models = [], None, "", []
    for key, value in given.items():
        setattr(base, key, value)
    return base.validate()


def to_yaml(config: EnsembleConfig) -> str:
    """The resolved config, one `key: json value` line each (what --dry-run prints)."""
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in dataclasses.asdict(config).items())


def argv_of(config: EnsembleConfig) -> list[str]:
    """The command line that reproduces `config` (for `ray job submit -- python -m ...`)."""
    out: list[str] = []
    default = EnsembleConfig()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + {"models": "model", "use_gpu": "gpu"}.get(f.name, f.name).replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif f.name == "models":
            for m in value:
                out += [flag, m]
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        elif value is not None:
            out += [flag, str(value)]
    return out


# ============================================================================================
# members


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`NAME@ALIAS` -> (NAME, ALIAS, None); `NAME/VERSION` -> (NAME, None, VERSION)."""
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise EnsembleError(
        f"--model {ref!r}: expected NAME@ALIAS or NAME/VERSION (e.g. resnet152@champion, resnet152/3)"
    )


@dataclass
class Member:
    label: str  # how tables and child runs name it
    selected_by: str  # "run", "experiment NAME", "model NAME@ALIAS"
    run_id: str | None
    run_name: str | None
    checkpoint_url: str  # .../checkpoints/step-NNNNNNNN
    step: int
    marker_metrics: dict[str, float]
    model_name: str
    model_options: dict[str, Any]
    shortcut: str | None
    num_classes: int
    data: Any  # DataConfig the member is evaluated on
    seed: int
    weight: float = 1.0


def _read_trainer_state(url: str, what: str) -> dict[str, Any]:
    """A committed checkpoint's trainer.pt (spec, model weights, optimizer ...)."""
    from orchestrator.checkpoint import CheckpointStore, split_checkpoint_url

    root, step = split_checkpoint_url(url)
    try:
        return CheckpointStore(root).read(step, "trainer.pt")
    except Exception as err:
        hint = ""
        if isinstance(err, FileNotFoundError) and "://" not in url.removeprefix("file://"):
            # a Ray task may run on another node than the one that wrote the checkpoint
            hint = (
                f" (a local path is read on the machine doing the evaluation, here "
                f"{socket.gethostname()}: on a multi-node Ray cluster, checkpoint.storage must be "
                "S3 or a filesystem every node mounts; or run with --local where it is)"
            )
        raise EnsembleError(
            f"{what}: cannot read {url}/trainer.pt: {type(err).__name__}: {err}{hint}"
        ) from err


def _load_member(
    label: str, selected_by: str, run_id: str | None, run_name: str | None, root: str, step: int,
    metrics: dict[str, float], what: str,
) -> Member:  # fmt: skip
    """Check a committed checkpoint's trainer.pt fits; its weights are not kept: each member's
    evaluation reads them itself (the driver never holds every member's weights at once, nor
    ships them to Ray tasks)."""
    from orchestrator.checkpoint import CheckpointStore
    from orchestrator.spec import JobSpec, from_dict

    url = f"{CheckpointStore(root).root}/step-{step:08d}"
    state = _read_trainer_state(url, what)
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
        label=label, selected_by=selected_by, run_id=run_id, run_name=run_name,
        checkpoint_url=url, step=step, marker_metrics=dict(metrics),
        model_name=spec.model.name, model_options=spec.model.options(),
        shortcut=spec.model.shortcut, num_classes=int(fc.shape[0]), data=spec.data,
        seed=spec.seed,
    )  # fmt: skip


def _committed(root: str, what: str) -> list[Any]:
    from orchestrator.checkpoint import CheckpointStore

    try:
        return CheckpointStore(root).committed()
    except Exception as err:
        raise EnsembleError(
            f"{what}: cannot list checkpoints at {root}: {type(err).__name__}: {err}"
        ) from err


def member_from_run(run: Any, checkpoint: str, selected_by: str) -> Member:
    """The chosen committed checkpoint of a training run."""
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
        metric = run.data.params.get("checkpoint.best_metric", "val_top1_err")
        chosen = best_checkpoint(found, metric)
        if chosen is None:
            raise EnsembleError(
                f"{what}: no committed checkpoint under {root} has {metric!r} in its marker "
                "(was validation on?); use --checkpoint latest"
            )
    return _load_member(
        name or run_id, selected_by, run_id, name, root, chosen.step, chosen.metrics, what
    )


def member_from_version(client: Any, ref: str) -> Member:
    """A registered model version whose source is a checkpoint URL."""
    from orchestrator.checkpoint import split_checkpoint_url

    name, alias, version = parse_model_ref(ref)
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except Exception as err:
        raise EnsembleError(f"model {ref}: not found in the MLflow registry: {err}") from err
    what = f"model {ref} (version {mv.version}, run {mv.run_id or '-'})"
    try:
        root, step = split_checkpoint_url(mv.source or "")
    except ValueError:
        raise EnsembleError(
            f"{what}: source {mv.source!r} is not a checkpoint URL (.../checkpoints/step-NNNNNNNN)"
        ) from None
    found = {c.step: c for c in _committed(root, what)}
    if step not in found:
        raise EnsembleError(
            f"{what}: checkpoint {mv.source} is not committed or its files are missing/unreachable"
        )
    run_name = None
    if mv.run_id:
        try:
            run_name = client.get_run(mv.run_id).info.run_name
        except Exception as err:  # noqa: BLE001 - the version stands on its own
            log.debug("model %s: run %s not readable: %s", ref, mv.run_id, err)
    label = f"{name}@{alias}" if alias else f"{name}/{version}"
    return _load_member(
        label, f"model {ref}", mv.run_id, run_name, root, step, found[step].metrics, what
    )


def _experiment_runs(client: Any, name: str, filter_string: str) -> list[Any]:
    try:
        exp = client.get_experiment_by_name(name)
    except Exception as err:
        raise EnsembleError(f"--experiment {name!r}: cannot reach MLflow: {err}") from err
    if exp is None:
        raise EnsembleError(f"--experiment {name!r}: no such MLflow experiment")
    try:
        runs = client.search_runs(
            [exp.experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"],
            max_results=1000,
        )  # fmt: skip
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


# ============================================================================================
# evaluating one member (here or in a Ray task)


def evaluate_member(
    payload: dict[str, Any], progress: bool | Callable[..., Any] = False
) -> dict[str, Any]:
    """Build the member's net, load its weights, (recalibrate BN,) evaluate: an EvalResult
    with probabilities, plus where it ran."""
    import torch

    from orchestrator.evaluation import evaluate, recalibrate_bn_on_data
    from orchestrator.models import create_model

    t0 = time.perf_counter()
    use_gpu = payload["use_gpu"]
    device = torch.device("cuda" if (use_gpu is not False and torch.cuda.is_available()) else "cpu")
    model = create_model(payload["model_name"], payload["num_classes"], **payload["model_options"])
    state = _read_trainer_state(payload["checkpoint_url"], payload["label"])
    model.load_state_dict(state["strategy"]["model"])
    del state  # the optimizer state too: not needed to evaluate
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    data = payload["data"]
    bn_batches = 0
    if payload["bn_recalibrate"]:
        bn_batches = recalibrate_bn_on_data(
            model, data, payload["bn_recalibrate"], batch_size=payload["batch_size"],
            rank=0, world_size=1, device=device, seed=payload["seed"],
        )  # fmt: skip
    result = evaluate(
        model, data, protocol=payload["protocol"], scales=payload["scales"], flips=payload["flips"],
        batch_size=payload["batch_size"], max_batches=payload["max_batches"], rank=0, world_size=1,
        device=device, bf16=device.type == "cuda", return_probs=True, progress=progress,
        desc=payload["label"],
    )  # fmt: skip
    return {"result": result, "device": str(device), "bn_batches": bn_batches,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _ray_member_task(payload: dict[str, Any]) -> dict[str, Any]:
    try:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        progress: Any = (
            (lambda total, desc: ray_tqdm(total=total, desc=desc)) if payload["progress"] else False
        )
    except ImportError:
        progress = False
    return evaluate_member(payload, progress)


def _payload(m: Member, cfg: EnsembleConfig) -> dict[str, Any]:
    return {
        "label": m.label, "model_name": m.model_name, "model_options": m.model_options,
        "num_classes": m.num_classes, "checkpoint_url": m.checkpoint_url, "data": m.data,
        "seed": m.seed, "protocol": cfg.protocol, "scales": list(cfg.scales), "flips": cfg.flips,
        "batch_size": cfg.batch_size, "max_batches": cfg.max_batches,
        "bn_recalibrate": cfg.bn_recalibrate, "use_gpu": cfg.use_gpu, "progress": cfg.progress,
    }  # fmt: skip


def connect_ray(cfg: EnsembleConfig) -> bool:
    """Join (or start) Ray before anything is logged; returns whether tasks get GPUs."""
    if os.environ.get("RAY_ADDRESS", "").startswith("http"):
        raise EnsembleError(
            "RAY_ADDRESS points at a Ray job server: submit this there with `ray job submit -- "
            "python -m orchestrator.ensemble_eval ...` (or jobs/ensemble_eval.py), or pass --local"
        )
    import ray

    try:
        if not ray.is_initialized():
            ray.init(log_to_driver=True)
    except Exception as err:
        raise EnsembleError(
            f"cannot connect to Ray ({os.environ.get('RAY_ADDRESS', 'local')}): {err}"
        ) from err
    if cfg.use_gpu is None:
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.use_gpu)


def evaluate_members(
    members: list[Member], cfg: EnsembleConfig, use_gpu: bool | None,
    on_done: Callable[[int, dict[str, Any]], None],
) -> list[dict[str, Any]]:  # fmt: skip
    """Evaluate every member here (--local) or as Ray tasks; `on_done(i, out)` as each ends."""
    from tqdm.auto import tqdm

    outs: list[dict[str, Any] | None] = [None] * len(members)
    if cfg.local:
        for i, m in enumerate(members):
            payload = _payload(m, cfg)
            outs[i] = evaluate_member(payload, progress=cfg.progress)
            on_done(i, outs[i])  # type: ignore[arg-type]
        return outs  # type: ignore[return-value]
    import ray

    task = ray.remote(num_cpus=cfg.cpus_per_member, num_gpus=1 if use_gpu else 0)(_ray_member_task)
    refs = {}
    for i, m in enumerate(members):
        payload = {**_payload(m, cfg), "use_gpu": use_gpu}
        refs[task.options(name=f"ensemble-eval:{m.label}").remote(payload)] = i
    pending = list(refs)
    with tqdm(total=len(members), desc="members", unit="member", disable=not cfg.progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = refs[done[0]]
            outs[i] = ray.get(done[0])
            on_done(i, outs[i])  # type: ignore[arg-type]
            bar.update(1)
    return outs  # type: ignore[return-value]


# ============================================================================================
# the ensemble and the comparison with the paper


@dataclass
class Scores:
    top1_err: float
    top5_err: float
    samples: int
    loss: float = math.nan


def ensemble_of(
    results: list[EvalResult], weights: list[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, labels, probs) of the weighted mean over the samples every member scored."""
    common = results[0].indices
    for r in results[1:]:
        if not np.array_equal(r.indices, common):
            common = np.intersect1d(common, r.indices)
    if any(len(r.indices) != len(common) for r in results):
        log.warning(
            "members scored different samples: the ensemble uses the %d they share", len(common)
        )
    aligned, labels = [], None
    for r in results:
        pick = np.searchsorted(r.indices, common)
        aligned.append(r.probs[pick])
        if labels is None:
            labels = r.labels[pick]
        elif not np.array_equal(labels, r.labels[pick]):
            raise RuntimeError(
                "members disagree on the labels of the same samples: different data?"
            )
    return common, labels, combine_probs(aligned, weights)  # type: ignore[return-value]


def comparison_rows(
    members: list[Member], scores: list[Scores], ensemble: Scores, protocol: str
) -> list[dict[str, Any]]:
    """One row per member and one for the ensemble: our errors beside the paper's for the same
    model and protocol (Tables 2-4, the authors' centre crops, Table 6 for CIFAR nets); the
    ensemble beside Table 5 (ImageNet nets only). Only on the paper's datasets' class counts
    (`paper.lookup`): a toy dataset gets no paper columns."""
    from orchestrator.models import model_info
    from orchestrator.paper import lookup

    def pct(x: float | None) -> float | None:
        return None if x is None or math.isnan(x) else round(100 * x, 2)

    rows = []
    for m, s in zip(members, scores):
        paper = lookup(m.model_name, protocol, m.shortcut, m.num_classes)
        rows.append({
            "member": m.label, "run_id": m.run_id, "model": m.model_name, "step": m.step,
            "weight": m.weight, "top1_err": pct(s.top1_err), "top5_err": pct(s.top5_err),
            "paper_top1_err": paper.top1 if paper else None, "paper_top5_err": paper.top5 if paper else None,
            "paper_source": f"{paper.source}, {paper.protocol}" if paper else None,
        })  # fmt: skip
    imagenet = all(model_info(m.model_name)["family"] == "imagenet" for m in members)
    paper = lookup("ensemble", "ensemble", num_classes=members[0].num_classes) if imagenet else None
    rows.append({
        "member": f"ensemble ({len(members)})", "run_id": None, "model": "ensemble", "step": None,
        "weight": None, "top1_err": pct(ensemble.top1_err), "top5_err": pct(ensemble.top5_err),
        "paper_top1_err": paper.top1 if paper else None, "paper_top5_err": paper.top5 if paper else None,
        "paper_source": f"{paper.source} ({paper.note})" if paper else None,
    })  # fmt: skip
    return rows


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    from orchestrator.paper import gap_cell, pct_cell

    def f(x: Any) -> str:
        return pct_cell(x) if x is None or isinstance(x, float) else str(x)

    head = ["member", "model", "step", "top-1 err %", "top-5 err %", "paper top-1 %",
            "paper top-5 %", "d top-1", "d top-5", "paper"]  # fmt: skip
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["member"], r["model"], f(r["step"]), f(r["top1_err"]), f(r["top5_err"]),
                 f(r["paper_top1_err"]), f(r["paper_top5_err"]),
                 gap_cell(r["top1_err"], r["paper_top1_err"]), gap_cell(r["top5_err"], r["paper_top5_err"]),
                 f(r["paper_source"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ============================================================================================
# MLflow


class _Runs:
    """The parent run and its children; `fail` closes whatever is still open."""

    def __init__(
        self, client: Any, cfg: EnsembleConfig, members: list[Member], data_url: str
    ) -> None:
        self.client = client
        exp = client.get_experiment_by_name(cfg.output_experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.output_experiment)
        name = cfg.name or f"ensemble-{cfg.protocol}-{len(members)}"
        tags = {ENSEMBLE_TAG: "parent", "protocol": cfg.protocol, "checkpoint": cfg.checkpoint,
                "orchestrator.members": ", ".join(m.label for m in members)[:5000]}  # fmt: skip
        self.parent = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        self.children: list[str] = []
        self.open = {self.parent}
        try:
            self._log_params(cfg, members, data_url)
            self._create_children(exp_id, cfg, members)
        except BaseException as err:
            self.fail(f"creating the runs: {type(err).__name__}: {err}")
            raise

    def _log_params(self, cfg: EnsembleConfig, members: list[Member], data_url: str) -> None:
        from mlflow.entities import Param

        params = {
            "protocol": cfg.protocol, "checkpoint": cfg.checkpoint, "num_members": len(members),
            "data.url": data_url, "data.val_split": members[0].data.val_split,
            "weights": [m.weight for m in members], "batch_size": cfg.batch_size,
            "max_batches": cfg.max_batches, "bn_recalibrate": cfg.bn_recalibrate,
            "members": [m.run_id or m.label for m in members],
            "executor": "local" if cfg.local else "ray",
        }  # fmt: skip
        if cfg.protocol == "multiscale":
            params.update(scales=list(cfg.scales), flips=cfg.flips)
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self.client.log_batch(self.parent, params=items)

    def _create_children(self, exp_id: str, cfg: EnsembleConfig, members: list[Member]) -> None:
        from mlflow.entities import Param

        client = self.client
        for i, m in enumerate(members):
            ctags = {PARENT_TAG: self.parent, ENSEMBLE_TAG: "member", "model": m.model_name,
                     "checkpoint_url": m.checkpoint_url, "selected_by": m.selected_by,
                     "source_run_id": m.run_id or "", "protocol": cfg.protocol}  # fmt: skip
            child = client.create_run(exp_id, run_name=m.label, tags=ctags).info.run_id
            cparams = {"member_index": i, "model.name": m.model_name, "checkpoint.step": m.step,
                       "checkpoint.url": m.checkpoint_url, "weight": m.weight,
                       "source_run_id": m.run_id or "", "source_run_name": m.run_name or "",
                       # what training's validation measured at this step, beside what this finds
                       **{f"checkpoint.{k}": v for k, v in m.marker_metrics.items() if k.startswith("val")}}  # fmt: skip
            self.children.append(child)
            self.open.add(child)
            client.log_batch(child, params=[Param(k, str(v)) for k, v in cparams.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, 0)
            for k, v in metrics.items()
            if v is not None and not math.isnan(v)
        ]
        self.client.log_batch(run_id, metrics=items)

    def log_json(self, run_id: str, obj: Any, path: str) -> None:
        self.client.log_text(run_id, json.dumps(obj, indent=1, default=_jsonable), path)

    def log_npz(self, run_id: str, name: str, **arrays: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            np.savez_compressed(path, **arrays)
            self.client.log_artifact(run_id, str(path))

    def close(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
        self.open.discard(run_id)

    def fail(self, error: str, status: str = "FAILED") -> None:
        for run_id in [r for r in [*self.children, self.parent] if r in self.open]:
            try:
                self.client.set_tag(run_id, "orchestrator.error", error[:5000])
                self.client.set_terminated(run_id, status=status)
            except Exception as err:  # noqa: BLE001 - keep the original error in front
                log.warning("could not mark MLflow run %s %s: %s", run_id, status, err)
        self.open.clear()


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _class_json(result: EvalResult) -> dict[str, Any]:
    acc = result.per_class_accuracy
    return {
        "class_total": result.class_total.tolist(),
        "class_correct": result.class_correct.tolist(),
        "accuracy": [None if np.isnan(a) else float(a) for a in acc],
    }


# ============================================================================================
# main




def run(cfg: EnsembleConfig) -> dict[str, Any]:
    """Resolve, check, evaluate, log. Raises EnsembleError (bad input) before logging anything."""
    from mlflow import MlflowClient

    if cfg.dry_run:
        print(to_yaml(cfg), end="")
        return {"members": []}
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise EnsembleError("MLFLOW_TRACKING_URI is not set: members are selected from MLflow")
    client = MlflowClient()
    members = resolve_members(client, cfg)
    manifest = check_members(members, cfg)
    data_url = members[0].data.url
    print(
        f"{len(members)} member(s), protocol {cfg.protocol}, data {data_url} [{members[0].data.val_split}]"
    )
    for m in members:
        print(
            f"  {m.label}: {m.model_name}, {m.checkpoint_url} (weight {m.weight:g}, {m.selected_by})"
        )
    if cfg.check:
        return {"members": members, "manifest": manifest}
    use_gpu = cfg.use_gpu if cfg.local else connect_ray(cfg)

    raise_on_sigterm()  # `ray job stop`, a preempted node: the runs end KILLED, not RUNNING
    runs = _Runs(client, cfg, members, data_url)
    print(f"MLflow: ensemble run {runs.parent} in experiment {cfg.output_experiment!r}")
    save_dir = Path(cfg.save_probs) if cfg.save_probs else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    scores: list[Scores | None] = [None] * len(members)

    def on_done(i: int, out: dict[str, Any]) -> None:
        r: EvalResult = out["result"]
        m, child = members[i], runs.children[i]
        if not r.samples:
            raise RuntimeError(
                f"{m.label}: no validation sample could be evaluated in {m.data.url} "
                f"[{m.data.val_split}] (every sample bad or unreadable?)"
            )
        scores[i] = Scores(r.top1_err, r.top5_err, r.samples, r.loss)
        runs.log_metrics(child, {"top1_err": r.top1_err, "top5_err": r.top5_err, "loss": r.loss,
                                 "samples": r.samples, "eval_seconds": out["seconds"],
                                 "bn_batches": out["bn_batches"]})  # fmt: skip
        runs.client.set_tag(child, "device", out["device"])
        runs.log_json(child, _class_json(r), "per_class_accuracy.json")
        arrays = {"probs": r.probs, "labels": r.labels, "indices": r.indices}
        if cfg.log_probs:
            runs.log_npz(child, "probs.npz", **arrays)
        if save_dir:
            np.savez_compressed(save_dir / f"member-{i}.npz", **arrays)
        runs.close(child)
        print(f"  {m.label}: top-1 err {100 * r.top1_err:.2f}%  top-5 err {100 * r.top5_err:.2f}%  "
              f"({r.samples} samples, {out['device']}, {out['seconds']:.1f} s)")  # fmt: skip

    try:
        outs = evaluate_members(members, cfg, use_gpu, on_done)
        results = [o["result"] for o in outs]
        indices, labels, probs = ensemble_of(results, [m.weight for m in members])
        top1, top5 = topk_errors(probs, labels)
        loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
        ens = Scores(top1, top5, len(labels), loss)
        rows = comparison_rows(members, scores, ens, cfg.protocol)  # type: ignore[arg-type]
        title = (f"Ensemble of {len(members)} (protocol {cfg.protocol}, checkpoint {cfg.checkpoint}, "
                 f"{len(labels)} samples of {data_url} [{members[0].data.val_split}]); errors in %")  # fmt: skip
        table = format_table(rows, title)
        member_top1 = [s.top1_err for s in scores if s is not None]
        runs.log_metrics(runs.parent, {
            "top1_err": top1, "top5_err": top5, "loss": loss, "samples": len(labels),
            "best_member_top1_err": min(member_top1), "mean_member_top1_err": float(np.mean(member_top1)),
        })  # fmt: skip
        runs.client.log_text(runs.parent, table, "comparison.md")
        runs.log_json(runs.parent, rows, "comparison.json")
        classes = members[0].num_classes
        hit = probs.argmax(1) == labels
        runs.log_json(runs.parent, {
            "class_total": np.bincount(labels, minlength=classes).tolist(),
            "class_correct": np.bincount(labels[hit], minlength=classes).tolist(),
        }, "per_class_accuracy.json")  # fmt: skip
        if cfg.log_probs:
            runs.log_npz(runs.parent, "probs.npz", probs=probs, labels=labels, indices=indices)
        if save_dir:
            np.savez_compressed(
                save_dir / "ensemble.npz", probs=probs, labels=labels, indices=indices
            )
        runs.close(runs.parent)
    except (KeyboardInterrupt, Terminated) as err:
        runs.fail(f"interrupted ({type(err).__name__}: {err})", status="KILLED")
        raise
    except BaseException as err:
        runs.fail(f"{type(err).__name__}: {err}")
        raise
    print()
    print(table, end="")
    return {"parent_run_id": runs.parent, "child_run_ids": runs.children, "rows": rows,
            "top1_err": top1, "top5_err": top5, "members": members}  # fmt: skip


def main(argv: Sequence[str] | None = None, base: EnsembleConfig | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("ORCH_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv, base)
        run(cfg)
    except (EnsembleError, UnknownProtocolError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
