"""What an ensemble evaluation evaluates and how: `EnsembleConfig`, from a job file's
declaration and the command line's flags (`parse_args`), and back (`argv_of`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.checkpoint_refs import WHICH, CheckpointRefError, check_which, parse_model_ref
from orchestrator.errors import UsageError
from orchestrator.evaluation import PAPER_SCALES, PROTOCOLS, check_protocol, check_scales
from orchestrator.spec import EvalConfig
from orchestrator.storage import check_url

CHECKPOINT_CHOICES = WHICH  # best, last: one word for the newest everywhere
# the flags that select members: any of them replaces a job file's whole selection
SELECTION = ("runs", "experiment", "filter", "models", "ranked", "checkpoint_urls")
# the fields of `EnsembleConfig.eval` the command line sets (every_iters and at_end schedule
# validation during training: an ensemble ignores them)
EVAL_FLAGS = ("protocol", "scales", "flips", "batch_size", "max_batches", "bn_recalibrate")


class EnsembleError(UsageError, ValueError):
    """Bad input: the message names the run, the object or the valid choices."""


@dataclass
class EnsembleConfig:
    """What to evaluate and how. A job file declares one; command-line flags override it."""

    name: str | None = None  # the parent run's name (default: ensemble-PROTOCOL-N)
    runs: list[str] = field(default_factory=list)  # MLflow run ids
    experiment: str | None = None  # select every run of this experiment matching `filter`
    filter: str = ""  # MLflow search filter, e.g. "tags.model = 'resnet152'"
    models: list[str] = field(default_factory=list)  # registered versions: NAME@ALIAS, NAME/VERSION
    # MODEL or MODEL#RANK: the RANK-th best run (1 = best, by its best checkpoint's
    # checkpoint.best_metric) among `experiment`'s runs matching `filter` tagged model=MODEL;
    # with it, `experiment` is where to rank, not a selection of its every run
    ranked: list[str] = field(default_factory=list)
    allow_missing: bool = False  # evaluate the ranked members that exist (said) instead of refusing
    # committed checkpoints by URL (.../checkpoints/step-N, or a job's .../checkpoints folder,
    # where `checkpoint` chooses): no MLflow needed to find them
    checkpoint_urls: list[str] = field(default_factory=list)
    checkpoint: str = "best"  # best (lowest best_metric in the commit marker) | last
    # protocol, scales, flips, batch_size, max_batches, bn_recalibrate: as in a job spec
    eval: EvalConfig = field(default_factory=EvalConfig)
    weights: list[float] | None = None  # one per member, in member order; None = equal
    data_url: str | None = None  # evaluate on this dataset instead of the members' own
    split: str | None = None  # instead of the members' data.val_split
    num_workers: int | None = None  # data loader workers per member (None: the member's)
    local: bool = False  # evaluate in this process instead of Ray tasks
    use_gpu: bool | None = None  # None: where there are GPUs
    cpus_per_member: float = 1.0  # Ray task resources
    output_experiment: str = "ensembles"
    log_probs: bool = False  # log each member's (and the ensemble's) probs.npz to MLflow
    save_probs: str | None = None  # also write them to this folder
    output_dir: str | None = None  # write comparison.md and comparison.json here
    dry_run: bool = False  # print the resolved config and stop (no service is touched)
    check: bool = False  # resolve and check the members, list them, evaluate and log nothing
    progress: bool = True

    def validate(self) -> EnsembleConfig:
        ev = self.eval
        check_protocol(ev.protocol)
        try:  # `latest` is refused naming `last`
            check_which(self.checkpoint)
        except CheckpointRefError as err:
            raise EnsembleError(f"--{err}") from None
        if not (self.runs or self.experiment or self.models or self.checkpoint_urls or self.ranked):
            raise EnsembleError(
                "no members: select them with --runs, --experiment [--ranked], --model or "
                "--checkpoint-url"
            )
        if self.data_url:
            check_url(self.data_url, "--data-url", write=False)
        for url in self.checkpoint_urls:  # read through open_storage: no http client there
            check_url(url, "--checkpoint-url", write=False, http=False)
        if self.filter and not self.experiment:
            raise EnsembleError("--filter needs --experiment (the experiment to search)")
        if self.ranked and not self.experiment:
            raise EnsembleError("--ranked needs --experiment (the experiment to rank runs in)")
        for entry in self.ranked:
            parse_ranked(entry)
        try:
            ev.scales = list(check_scales(ev.scales))
        except ValueError as err:
            raise EnsembleError(str(err)) from None
        if ev.batch_size < 1:
            raise EnsembleError(f"--batch-size {ev.batch_size}: expected >= 1")
        if ev.max_batches < 0 or ev.bn_recalibrate < 0:
            raise EnsembleError("--max-batches and --bn-recalibrate must be >= 0")
        if self.weights is not None and any(not math.isfinite(w) or w < 0 for w in self.weights):
            raise EnsembleError(f"--weights {self.weights}: expected non-negative numbers")
        if self.weights is not None and sum(self.weights) <= 0:
            raise EnsembleError(f"--weights {self.weights}: at least one must be > 0")
        for ref in self.models:
            try:
                parse_model_ref(ref)
            except CheckpointRefError as err:
                raise EnsembleError(f"--model: {err}") from None
        return self


def parse_ranked(entry: str) -> tuple[str, int]:
    """`resnet152#2` -> ("resnet152", 2); `resnet34` -> ("resnet34", 1)."""
    model, _, rank = entry.partition("#")
    if not model or (rank and not (rank.isdigit() and int(rank) >= 1)):
        raise EnsembleError(
            f"--ranked {entry!r}: expected MODEL or MODEL#RANK with RANK >= 1 (1 = the best "
            "run), e.g. resnet152#2"
        )
    return model, int(rank or 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.ensemble_eval",
        description="Evaluate trained runs and their ensemble (mean of softmax probabilities) "
        "with the paper's protocols; log a parent MLflow run with one child per member.",
        argument_default=argparse.SUPPRESS,  # unset flags keep the job file's values
    )
    _member_flags(p.add_argument_group("members (these add up)"))
    _evaluation_flags(p.add_argument_group("evaluation"))
    _run_flags(p.add_argument_group("where and what to log"))
    return p


def _member_flags(sel: argparse._ArgumentGroup) -> None:
    sel.add_argument("--runs", nargs="+", metavar="RUN_ID", help="MLflow run ids")
    sel.add_argument("--experiment", metavar="NAME", help="select runs of this experiment")
    sel.add_argument(
        "--filter", metavar="FILTER", help="MLflow filter, e.g. \"tags.model = 'resnet152'\""
    )
    sel.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME@ALIAS|NAME/VERSION",
        help="a registered model version (repeatable)",
    )
    sel.add_argument(
        "--ranked",
        nargs="+",
        metavar="MODEL[#RANK]",
        help="the RANK-th best run (default 1) tagged model=MODEL in --experiment (matching "
        "--filter), by its best checkpoint's val/top1_err, e.g. resnet101 resnet152#1 resnet152#2",
    )
    sel.add_argument(
        "--allow-missing",
        action="store_true",
        help="evaluate the --ranked members that exist (and say which are missing) instead of "
        "refusing",
    )
    sel.add_argument(
        "--checkpoint-url",
        dest="checkpoint_urls",
        action="append",
        metavar="URL",
        help="a committed checkpoint (.../checkpoints/step-NNNNNNNN) or a job's checkpoint "
        "folder (.../checkpoints: --checkpoint chooses); repeatable; needs no MLflow",
    )
    sel.add_argument(
        "--checkpoint",
        metavar="best|last",
        help="which committed checkpoint of a run (default: best)",
    )


def _evaluation_flags(how: argparse._ArgumentGroup) -> None:
    how.add_argument(
        "--protocol", dest="eval.protocol", metavar="|".join(PROTOCOLS), help="default: center"
    )
    scales = " ".join(map(str, PAPER_SCALES))
    how.add_argument(
        "--scales",
        dest="eval.scales",
        nargs="+",
        type=int,
        metavar="S",
        help=f"multiscale shorter sides (default: {scales})",
    )
    how.add_argument(
        "--flips",
        dest="eval.flips",
        action=argparse.BooleanOptionalAction,
        help="multiscale flips (default: on)",
    )
    how.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="one per member, in member order"
    )
    how.add_argument("--data-url", help="evaluate on this dataset instead of the members' own")
    how.add_argument("--split", help="validation split name (default: the members' data.val_split)")
    how.add_argument("--batch-size", dest="eval.batch_size", type=int, metavar="BATCH_SIZE")
    how.add_argument("--num-workers", type=int, help="data loader workers per member")
    how.add_argument(
        "--max-batches",
        dest="eval.max_batches",
        type=int,
        metavar="MAX_BATCHES",
        help="only this many batches per pass",
    )
    how.add_argument(
        "--bn-recalibrate",
        dest="eval.bn_recalibrate",
        type=int,
        metavar="N",
        help="recompute BN statistics over N training batches first",
    )


def _run_flags(run: argparse._ArgumentGroup) -> None:
    run.add_argument("--local", action="store_true", help="evaluate in this process, not on Ray")
    run.add_argument(
        "--gpu",
        dest="use_gpu",
        action=argparse.BooleanOptionalAction,
        help="use GPUs (default: where present)",
    )
    run.add_argument("--cpus-per-member", type=float)
    run.add_argument(
        "--output-experiment", help="MLflow experiment of the result (default: ensembles)"
    )
    run.add_argument("--name", help="the parent run's name (default: ensemble-PROTOCOL-N)")
    run.add_argument("--log-probs", action="store_true", help="log probs.npz per member to MLflow")
    run.add_argument("--save-probs", metavar="DIR", help="write member-I.npz and ensemble.npz here")
    run.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write comparison.md and comparison.json here (without MLflow: the only record "
        "besides the printed table)",
    )
    run.add_argument("--dry-run", action="store_true", help="print the resolved config, then stop")
    run.add_argument(
        "--check",
        action="store_true",
        help="resolve and check the members, list them; evaluate and log nothing",
    )
    run.add_argument("--progress", action=argparse.BooleanOptionalAction)


def parse_args(argv: Sequence[str], base: EnsembleConfig | None = None) -> EnsembleConfig:
    """Flags over `base` (a job file's config, left as it is). Any member flag replaces the
    base's whole member selection, so `jobs/ensemble_eval.py --runs A B` evaluates exactly A
    and B."""
    given = vars(build_parser().parse_args(list(argv)))
    cfg = dataclasses.replace(base) if base is not None else EnsembleConfig()
    cfg.eval = dataclasses.replace(cfg.eval)
    if any(k in given for k in SELECTION):
        cfg.runs, cfg.experiment, cfg.filter, cfg.models = [], None, "", []
        cfg.ranked, cfg.checkpoint_urls = [], []
    for key, value in given.items():
        section, _, name = key.rpartition(".")  # "eval.protocol": EnsembleConfig.eval's
        setattr(cfg.eval if section == "eval" else cfg, name, value)
    return cfg.validate()


def _flag(name: str, value: Any) -> list[str]:
    """The flag(s) that set field `name` to `value`."""
    renamed = {"models": "model", "use_gpu": "gpu", "checkpoint_urls": "checkpoint_url"}
    flag = "--" + renamed.get(name, name).replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if name in ("models", "checkpoint_urls"):
        return [arg for item in value for arg in (flag, item)]  # repeated flags
    if isinstance(value, list):
        return [flag, *map(str, value)]
    return [] if value is None else [flag, str(value)]


def argv_of(config: EnsembleConfig) -> list[str]:
    """The command line that reproduces `config` (for `ray job submit -- python -m ...`)."""
    default = EnsembleConfig()
    out: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name != "eval" and value != getattr(default, f.name):
            out += _flag(f.name, value)
    for name in EVAL_FLAGS:
        value = getattr(config.eval, name)
        if value != getattr(default.eval, name):
            out += _flag(name, value)
    return out
