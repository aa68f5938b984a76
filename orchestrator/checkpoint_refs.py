"""Checkpoint references: where a job's checkpoints are, and which committed checkpoint a run,
a registered model version or an alias means.

    job_checkpoints_url("s3://resnet/runs/", "r50")   # s3://resnet/runs/r50/checkpoints
    run_checkpoint(run, "best")                       # the run's best committed step
    version_checkpoint(client, "resnet50@best")        # a registered version's committed step
    read_trainer_state(url, "run abc")                 # its trainer.pt, as data, under a lease
    with holding(url, "ensemble x"): ...                # retention keeps it meanwhile

`job_checkpoints_url` is the one definition of a job's checkpoint folder: the Checkpointer
writes there, and the launcher, the pre-flight, studies, publish, ensembles and Fig. 7 look
there. A run's `best` is the committed step with the lowest value of the run's own
`checkpoint.best_metric` in its commit marker (as training chooses: a marker holds only the
figures measured at its step; a tie goes to the older step); `last` is the newest committed
step. `last` is the one word for it in every command line and in the registry (MLflow reserves
the alias `latest`), so `latest` is refused naming `last` (`check_which`).

Light at import time (the pre-flight imports it): torch, MLflow and the checkpoint store are
imported inside the functions that need them. Bad input raises `CheckpointRefError` (a
UsageError and a ValueError) whose message names the run, version or URL, and the fix.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from orchestrator.errors import UsageError
from orchestrator.tracking.tags import CHECKPOINT_TAG, JOB_TAG

if TYPE_CHECKING:
    from orchestrator.checkpoint import Committed
    from orchestrator.spec import JobSpec

# which committed checkpoint of a run: its best, or its newest. `last` names the newest
# everywhere: the command lines' --checkpoint and the registered alias alike (MLflow reserves
# the alias `latest`, so the registry could not say `latest`)
WHICH = ("best", "last")
# words users reach for that mean one of WHICH: refused, naming the word to use
REFUSED_WHICH = {"latest": "last"}


class CheckpointRefError(UsageError, ValueError):
    """A checkpoint reference that does not resolve: the message names it and the fix (a
    command line exits 2 with it)."""


# ---------------------------------------------------------------------------- where


def job_checkpoints_url(storage: str, job: str) -> str:
    """`{storage}/{job}/checkpoints`: the folder of job `job`'s checkpoints under
    `checkpoint.storage` (an s3:// prefix or a local folder; trailing slashes do not count)."""
    root = storage.rstrip("/")
    if not root or not job:
        raise CheckpointRefError(
            f"checkpoint folder of job {job!r} under checkpoint.storage={storage!r}: both must "
            "be set (checkpoint.storage=s3://BUCKET/PREFIX or a folder, and the job's name)"
        )
    return f"{root}/{job}/checkpoints"


def spec_checkpoints_url(spec: JobSpec) -> str:
    """The checkpoint folder of the job a spec describes."""
    return job_checkpoints_url(spec.checkpoint.storage, spec.name)


def committed_checkpoints(root: str, what: str) -> list[Committed]:
    """The committed checkpoints under `root`, oldest first; listing errors name `what`."""
    from orchestrator.checkpoint import CheckpointStore

    try:
        return CheckpointStore(root).committed()
    except Exception as err:
        raise CheckpointRefError(
            f"{what}: cannot list checkpoints at {root}: {type(err).__name__}: {err}"
        ) from err


# ---------------------------------------------------------------------------- a run's


class Chosen:
    """A resolved reference: its committed checkpoint's URL and step."""

    committed: Committed

    @property
    def url(self) -> str:
        return self.committed.url

    @property
    def step(self) -> int:
        return self.committed.step


@dataclass(frozen=True)
class RunCheckpoint(Chosen):
    """The committed checkpoint a training run's `best` or `last` means."""

    run_id: str
    run_name: str | None
    job: str
    root: str  # the job's checkpoint folder
    committed: Committed
    metric: str  # the run's checkpoint.best_metric (what `best` is chosen by)

    @property
    def what(self) -> str:
        """How errors name it."""
        return _run_what(self.run_id, self.run_name)


def _run_what(run_id: str, run_name: str | None) -> str:
    return f"run {run_id} ({run_name})"


def check_which(which: str) -> str:
    """`which` if it is `best` or `last`; else CheckpointRefError naming the word to use."""
    if which in WHICH:
        return which
    meant = REFUSED_WHICH.get(which.strip().lower())
    if meant:
        raise CheckpointRefError(
            f"checkpoint {which!r}: say {meant!r} (the newest committed checkpoint is called "
            f"{meant!r} in every command and in the registry, where MLflow reserves 'latest')"
        )
    raise CheckpointRefError(
        f"checkpoint {which!r}: expected one of {', '.join(WHICH)} (the run's best committed "
        "step by its checkpoint.best_metric, or its newest)"
    )


def which_arg(text: str) -> str:
    """argparse's `type=` for a --checkpoint flag: check_which's refusal as argparse's own
    error (exit 2, the message shown; a ValueError would print only 'invalid value')."""
    import argparse

    try:
        return check_which(text)
    except CheckpointRefError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run_checkpoint(run: Any, which: str = "best") -> RunCheckpoint:
    """The committed checkpoint of MLflow run `run` (an mlflow Run) that `which` means, found
    from its tag `orchestrator.job` and its param `checkpoint.storage`."""
    from orchestrator.checkpoint import best_checkpoint
    from orchestrator.spec import CheckpointConfig

    choice = check_which(which)
    run_id, name = run.info.run_id, run.info.run_name
    what = _run_what(run_id, name)
    job = run.data.tags.get(JOB_TAG)
    storage = run.data.params.get("checkpoint.storage")
    if not job or not storage:
        raise CheckpointRefError(
            f"{what} has no checkpoint: it is not an orchestrator training run (no tag "
            f"{JOB_TAG!r} or param 'checkpoint.storage'); pass a training job's run id"
        )
    root = job_checkpoints_url(storage, job)
    found = committed_checkpoints(root, what)
    if not found:
        raise CheckpointRefError(
            f"{what} has no committed checkpoint under {root}: resubmit the job to train it"
        )
    metric = run.data.params.get("checkpoint.best_metric", CheckpointConfig().best_metric)
    chosen = found[-1] if choice == "last" else best_checkpoint(found, metric)
    if chosen is None:
        raise CheckpointRefError(
            f"{what}: no committed checkpoint under {root} has {metric!r} in its marker "
            "(was validation on?); use --checkpoint last"
        )
    return RunCheckpoint(run_id, name, job, root, chosen, metric)


# ---------------------------------------------------------------------------- a model version's


class ModelRef(NamedTuple):
    """A registered model version: by alias (`NAME@ALIAS`) or by number (`NAME/VERSION`)."""

    name: str
    alias: str | None
    version: str | None

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def parse_model_ref(ref: str) -> ModelRef:
    """`NAME@ALIAS` -> (NAME, ALIAS, None); `NAME/VERSION` -> (NAME, None, VERSION)."""
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if name and alias:
            return ModelRef(name, alias, None)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        if name and version.isdigit():
            return ModelRef(name, None, version)
    raise CheckpointRefError(
        f"model {ref!r}: expected NAME@ALIAS or NAME/VERSION (e.g. resnet152@champion, resnet152/3)"
    )


@dataclass(frozen=True)
class VersionCheckpoint(Chosen):
    """The committed checkpoint a registered model version reads its weights from."""

    ref: ModelRef
    version: str  # the version number the reference resolved to
    run_id: str | None  # the version's training run, if it has one
    root: str
    committed: Committed

    @property
    def what(self) -> str:
        """How errors name it."""
        return _version_what(str(self.ref), self.version, self.run_id)


def _version_what(ref: str, version: Any, run_id: str | None) -> str:
    return f"model {ref} (version {version}, run {run_id or '-'})"


def version_checkpoint(client: Any, ref: str) -> VersionCheckpoint:
    """The committed checkpoint of registered version `ref` (NAME@ALIAS or NAME/VERSION): its
    tag `checkpoint_url` (versions that orchestrator.publish logged) or its source (URL-only
    versions). `client` is an MlflowClient."""
    from orchestrator.checkpoint import split_checkpoint_url
    from orchestrator.tracking.redaction import scrub

    parsed = parse_model_ref(ref)
    try:
        if parsed.alias:
            mv = client.get_model_version_by_alias(parsed.name, parsed.alias)
        else:
            mv = client.get_model_version(parsed.name, parsed.version)
    except Exception as err:
        raise CheckpointRefError(
            f"model {ref}: not found in the MLflow registry ({type(err).__name__}: "
            f"{scrub(err)[:300]}); check the name and the alias or version number"
        ) from err
    what = _version_what(ref, mv.version, mv.run_id)
    url = (mv.tags or {}).get(CHECKPOINT_TAG) or mv.source or ""
    try:
        root, step = split_checkpoint_url(url)
    except ValueError:
        raise CheckpointRefError(
            f"{what}: source {url!r} is not a checkpoint URL (.../checkpoints/step-NNNNNNNN); "
            "register it again with python -m orchestrator.publish"
        ) from None
    found = {c.step: c for c in committed_checkpoints(root, what)}
    if step not in found:
        raise CheckpointRefError(
            f"{what}: checkpoint {url} is not committed or its files are missing/unreachable; "
            "check checkpoint.storage's endpoint and credentials, or publish another step"
        )
    return VersionCheckpoint(parsed, str(mv.version), mv.run_id or None, root, found[step])


# ---------------------------------------------------------------------------- reading one


def _url_step(url: str, what: str) -> tuple[str, int]:
    from orchestrator.checkpoint import split_checkpoint_url

    try:
        return split_checkpoint_url(url)
    except ValueError:
        raise CheckpointRefError(
            f"{what}: {url!r} is not a checkpoint URL (.../checkpoints/step-NNNNNNNN)"
        ) from None


@contextlib.contextmanager
def holding(url: str, what: str) -> Iterator[None]:
    """Hold committed checkpoint `url` (a reader's lease) for a `with` block: retention keeps
    it until the block ends. An ensemble holds its members from resolution to the end; where
    the lease cannot be written (read-only credentials), it reads unheld, and says so."""
    from orchestrator.checkpoint import CheckpointStore

    root, step = _url_step(url, what)
    store = CheckpointStore(root)
    try:
        lease = store.lease_or_warn(step, what)
    except FileNotFoundError as err:  # not committed (any more): nothing to read
        raise CheckpointRefError(f"{what}: cannot hold {url}: {err}") from err
    try:
        yield
    finally:
        if lease is not None:
            store.release(step, lease)


def read_trainer_state(url: str, what: str) -> dict[str, Any]:
    """A committed checkpoint's trainer.pt (spec, model weights, optimizer ...), loaded as
    data (orchestrator.checkpoint.load_state) under a reader's lease, so retention cannot
    delete it mid-read; `what` names the checkpoint in errors (e.g. "run abc (r50)")."""
    from orchestrator.checkpoint import CheckpointStore

    root, step = _url_step(url, what)
    try:
        with holding(url, what):
            return CheckpointStore(root).read(step, "trainer.pt")
    except Exception as err:
        cause = err.__cause__ if isinstance(err, CheckpointRefError) else err
        missing = isinstance(cause, FileNotFoundError)
        hint = ""
        if missing and "://" not in url.removeprefix("file://"):
            # a Ray task may run on another node than the one that wrote the checkpoint
            hint = (
                f" (a local path is read on the machine doing the reading, here "
                f"{socket.gethostname()}: on a multi-node Ray cluster, checkpoint.storage must be "
                "S3 or a filesystem every node mounts; or run with --local where it is)"
            )
        why = f"it does not exist ({cause})" if missing else f"{type(cause).__name__}: {cause}"
        raise CheckpointRefError(f"{what}: cannot read {url}/trainer.pt: {why}{hint}") from err


@dataclass
class TrainedNet:
    """What a training checkpoint's trainer.pt says about its net."""

    spec: JobSpec  # the job that trained it
    weights: dict[str, Any]  # the model's state dict
    num_classes: int  # from the classifier's rows (a subset run trains fewer than the data's)


def trained_net(state: dict[str, Any], url: str, what: str) -> TrainedNet:
    """The spec and weights in trainer.pt `state` read from `url`, checked to be a ResNet's."""
    from orchestrator.spec import JobSpec, from_dict

    try:
        weights = state["strategy"]["model"]
        spec = from_dict(JobSpec, state["spec"])
    except Exception as err:
        raise CheckpointRefError(
            f"{what}: {url}/trainer.pt is not a training checkpoint: {err}"
        ) from err
    fc = weights.get("fc.weight")
    if fc is None:
        raise CheckpointRefError(f"{what}: {url}: the model state has no fc.weight (not a ResNet?)")
    return TrainedNet(spec, weights, int(fc.shape[0]))
