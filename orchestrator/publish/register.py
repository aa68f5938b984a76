"""A committed checkpoint as a registered MLflow model: logged, registered, aliased.

`publish_checkpoint` logs one checkpoint as an MLflow model (orchestrator.publish.flavor) and
registers it as a version of the registered model named after the job, with the given aliases;
a version already registered for the same checkpoint (and the same weights mode) is reused, so
publishing again only moves aliases. `publish_run_models` is what a finished job's driver
calls (orchestrator.publish.finished): the best checkpoint (alias `best`) and the last committed
one (alias `last`: MLflow reserves `latest`), each retried on registry trouble, never raising.

Where the weights live (`copy_weights`):
- False (the default): in the committed checkpoint on S3 only. The model holds the net's spec,
  classes, transform and the checkpoint's URL and sha256 (a few kB); loading reads trainer.pt
  (weights and optimizer state: about twice the weights) and checks its sha256. The step is
  pinned (checkpoint.PIN) before it is read, so retention keeps it. Loading needs the S3
  credentials too.
- True: the weights (no optimizer state) are copied into MLflow's artifact store: a model
  that stands alone (MLflow's credentials suffice), at the cost of a second copy of the weights.
  The step is held by a reader's lease while it is read.
Either way the checkpoint is loaded as data (weights_only; orchestrator.publish.classifier).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator.errors import UsageError
from orchestrator.publish.classifier import (
    NetByReference,
    NetCopy,
    build_net,
    meta_format,
    trainer_weights,
)
from orchestrator.tracking.redaction import log_tags, redact_tags, scrub
from orchestrator.tracking.tags import (
    BEST_CHECKPOINT_TAG,
    BEST_METRIC_TAG,
    BEST_MODEL_VERSION_TAG,
    CHECKPOINT_TAG,
    FORMAT_TAG,
    JOB_TAG,
    LAST_MODEL_VERSION_TAG,
    REGISTRATION_TAG,
    STEP_TAG,
    WEIGHTS_TAG,
)

log = logging.getLogger(__name__)

# MLflow reserves the alias `latest` (models:/NAME/latest is the newest version): the last
# committed checkpoint is `last`, in --checkpoint as in the alias (orchestrator.checkpoint_refs)
MODEL_VERSION_TAG_OF = {"best": BEST_MODEL_VERSION_TAG, "last": LAST_MODEL_VERSION_TAG}
# registry answers that a retry would only repeat
FINAL_ERRORS = {"INVALID_PARAMETER_VALUE", "PERMISSION_DENIED", "UNAUTHENTICATED"}


class PublishError(UsageError, RuntimeError):
    """The checkpoint cannot be made a model (unreadable, not a training checkpoint): retrying
    will not help, unlike registry trouble."""


@dataclass
class Published:
    """A registered version and what logging it cost."""

    version: Any  # mlflow ModelVersion
    model_uri: str  # models:/m-... (the logged model)
    checkpoint_url: str
    weights: str  # "reference" | "copy"
    seconds: float
    artifact_bytes: int
    aliases: list[str] = field(default_factory=list)
    reused: bool = False


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resnet-orchestrator")
    except PackageNotFoundError:
        return "0.1.0"


def _requirements() -> list[str]:
    import mlflow
    import torch

    # the project itself: its nets and transforms are the model's code
    return [
        f"resnet-orchestrator=={_package_version()}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
    ]


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        outputs=Schema(
            [
                ColSpec(Array(DataType.long), "class_ids"),
                ColSpec(Array(DataType.string), "class_names"),
                ColSpec(Array(DataType.double), "probabilities"),
            ]
        ),
    )


def example_jpeg(width: int, height: int) -> bytes:
    """A small generated JPEG (a colour gradient): the model's input example."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256])
    buf = io.BytesIO()
    Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class _Checkpoint:
    url: str
    step: int
    sha256: str
    size: int
    model: dict[str, Any]  # name, num_classes, options
    data: dict[str, Any]  # the eval transform's fields of the run's data section
    data_url: str  # the run's dataset (its manifest has the class names, mean and std)
    weights: Any  # the model's state dict
    marker_metrics: dict[str, float]
    store: Any


def read_checkpoint(url: str, pin: dict[str, Any] | None = None) -> _Checkpoint:
    """A committed checkpoint's model: spec and weights (strictly loadable), its sha256. Read
    under a reader's lease, so retention cannot delete it meanwhile; given `pin` (who pins it:
    a by-reference model will read the step for good) the step is pinned before it is read,
    and unpinned again where it cannot be a model (if this call pinned it)."""
    from orchestrator.checkpoint import PIN, CheckpointStore, split_checkpoint_url

    try:
        root, step = split_checkpoint_url(url)
        store = CheckpointStore(root)
    except Exception as err:
        raise PublishError(f"cannot read checkpoint {url}: {type(err).__name__}: {err}") from err
    if store.find(step) is None:  # checked before anything is written into its folder
        raise PublishError(f"{url} is not a committed checkpoint (no valid COMMITTED marker)")
    pinned_before = store.storage.exists(f"step-{step:08d}/{PIN}")
    try:
        if pin is not None and not pinned_before:
            store.pin(step, pin)
        with store.reading(step, f"publish of {url}"):
            ck = _read_held(store, url, step)
        if pin is not None:
            store.pin(step, {**pin, "sha256": ck.sha256})
        return ck
    except BaseException:
        if pin is not None and not pinned_before:
            store.unpin(step)
        raise


def _read_held(store: Any, url: str, step: int) -> _Checkpoint:
    """`read_checkpoint`'s reading, once the step is held."""
    from orchestrator.spec import JobSpec, from_dict

    try:
        committed = store.find(step)
        if committed is None:
            raise PublishError(f"{url} is not a committed checkpoint (no valid COMMITTED marker)")
        raw = store.read_bytes(step, "trainer.pt")
        spec_dict, weights = trainer_weights(raw, f"{url}/trainer.pt")
        spec = from_dict(JobSpec, spec_dict)
        fc = weights.get("fc.weight")
        if fc is None:
            raise PublishError(f"{url}/trainer.pt: the model state has no fc.weight")
        model = {
            "name": spec.model.name,
            "num_classes": int(fc.shape[0]),
            "options": spec.model.options(),
        }
        build_net(model, weights)  # fails here, not at a user's load, if they do not fit
    except PublishError:
        raise
    except Exception as err:
        raise PublishError(f"cannot read checkpoint {url}: {type(err).__name__}: {err}") from err
    data = {
        "train_transform": spec.data.train_transform,
        "image_size": spec.data.image_size,
        "eval_resize": spec.data.eval_resize,
        "normalize": spec.data.normalize,
    }
    return _Checkpoint(
        url=scrub(url),
        step=step,
        sha256=hashlib.sha256(raw).hexdigest(),
        size=len(raw),
        model=model,
        data=data,
        data_url=spec.data.url,
        weights=weights,
        marker_metrics=committed.metrics,
        store=store,
    )


def _classes_and_stats(
    data_url: str, num_classes: int, normalize: str = "per_channel"
) -> tuple[list[str], Any, Any, Any]:
    """Class names, mean/std (0-255) and, for data.normalize=per_pixel_mean, the mean image
    (else None) from the dataset's manifest, as the run evaluated."""
    from orchestrator.data import IMAGENET_MEAN, IMAGENET_STD, load_manifest, load_mean_image

    manifest: dict[str, Any] = {}
    if data_url:
        try:
            manifest = load_manifest(data_url)
        except Exception as err:  # noqa: BLE001 - names are a convenience, ids still work
            log.warning(
                "dataset manifest %s unreadable (%s): classes named by number", data_url, err
            )
    names = [str(c) for c in manifest.get("classes") or []]
    if len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    mean = list(manifest.get("mean") or IMAGENET_MEAN)
    std = list(manifest.get("std") or IMAGENET_STD)
    mean_image = None
    if normalize == "per_pixel_mean":  # without it the model would answer wrongly: refuse
        try:
            mean_image = load_mean_image(manifest, data_url)
        except Exception as err:  # whichever way it failed, the same refusal
            raise PublishError(
                f"the run normalized with the mean image of dataset {data_url}, which cannot be "
                f"read ({err}); restore the dataset, then publish again"
            ) from err
    return names, mean, std, mean_image


def _existing_version(client: Any, job: str, url: str, weights: str, fmt: int) -> Any:
    name = job.replace("'", "\\'")
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        if (
            tags.get(CHECKPOINT_TAG) == url
            and tags.get(FORMAT_TAG) == str(fmt)
            and tags.get(WEIGHTS_TAG) == weights
        ):
            return mv
    return None


def _ensure_registered_model(client: Any, job: str, tags: dict[str, str]) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            job, tags=tags, description=f"Trained nets of job {job} (orchestrator.publish)."
        )
    except MlflowException as err:
        if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise


def _artifact_bytes(client: Any, model_id: str) -> int:
    """The logged model's size in MLflow's artifact store (every file, listed)."""
    total, todo = 0, [None]
    while todo:
        path = todo.pop()
        for f in client.list_logged_model_artifacts(model_id, path):
            if f.is_dir:
                todo.append(f.path)
            else:
                total += f.file_size or 0
    return total


def publish_checkpoint(
    client: Any,
    url: str,
    job: str,
    *,
    run_id: str | None = None,
    aliases: tuple[str, ...] | list[str] = ("best",),
    copy_weights: bool = False,
    tags: dict[str, str] | None = None,
    metric: str = "",
    attempts: dict[str, Any] | None = None,
) -> Published:
    """Log committed checkpoint `url` as an MLflow model of run `run_id` and register it as a
    version of model `job` with `aliases`. PublishError where the checkpoint cannot be a model;
    MLflow's own errors (an unreachable registry) pass through for the caller to retry, giving
    the same `attempts` dict each time: what an attempt read and logged is kept there, so a
    retry neither reads the checkpoint again nor logs a second model."""
    t0 = time.perf_counter()
    attempts = {} if attempts is None else attempts
    weights = "copy" if copy_weights else "reference"
    # a by-reference model reads the step for good: pinned before it is read
    pin = None if copy_weights else {"model": job, "run_id": run_id}
    ck = attempts.get("checkpoint") or read_checkpoint(url, pin)
    attempts["checkpoint"] = ck
    tags = redact_tags(tags or {})
    _ensure_registered_model(client, job, tags)
    fmt = meta_format(ck.data)
    version = _existing_version(client, job, ck.url, weights, fmt)
    reused = version is not None
    artifact_bytes = 0
    if version is None:
        logged, info = _log_model(client, ck, job, run_id, weights, attempts)
        where = "" if copy_weights else f"; weights read from {ck.url}/trainer.pt"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(ck.marker_metrics.items()))
        version = client.create_model_version(
            job,
            source=info.model_uri,
            run_id=run_id,
            tags={
                **tags,
                CHECKPOINT_TAG: ck.url,
                FORMAT_TAG: str(fmt),
                WEIGHTS_TAG: weights,
                STEP_TAG: str(ck.step),
                **({BEST_METRIC_TAG: metric} if metric else {}),
            },
            description=f"Step {ck.step} of job {job} ({metrics}){where}.",
            model_id=logged.model_id,
        )
        artifact_bytes = _artifact_bytes(client, logged.model_id)
    for alias in aliases:
        client.set_registered_model_alias(job, alias, version.version)
    seconds = time.perf_counter() - t0
    log.info(
        "checkpoint %s %s model %s version %s (@%s, weights: %s) in %.1f s",
        ck.url,
        "already registered as" if reused else "registered as",
        job,
        version.version,
        ",".join(aliases),
        weights,
        seconds,
    )
    return Published(
        version=version,
        model_uri=version.source,
        checkpoint_url=ck.url,
        weights=weights,
        seconds=seconds,
        artifact_bytes=artifact_bytes,
        aliases=list(aliases),
        reused=reused,
    )


def _log_model(
    client: Any,
    ck: _Checkpoint,
    job: str,
    run_id: str | None,
    weights: str,
    attempts: dict[str, Any],
) -> tuple[Any, Any]:
    """The checkpoint logged as an MLflow model: (the logged model, Model.log's info). What
    is logged is kept in `attempts`, so a retry after an outage logs no second model."""
    from mlflow.models import Model

    from orchestrator.publish import flavor

    classes, mean, std, mean_image = _classes_and_stats(
        ck.data_url, ck.model["num_classes"], ck.data["normalize"]
    )
    meta = {
        "format": meta_format(ck.data),
        "model": ck.model,
        "classes": classes,
        "data": ck.data,
        "mean": mean,
        "std": std,
        "protocol": "center",
        "weights": weights,
        "checkpoint_url": ck.url,
        "step": ck.step,
        "trainer_sha256": ck.sha256,
        "job": job,
        "run_id": run_id,
        "checkpoint_metrics": ck.marker_metrics,
    }
    net: Any
    if weights == "copy":  # the state dict, pickled as a call to build_net (no module)
        net = NetCopy(ck.model, ck.weights)
    else:  # the step was pinned before it was read (read_checkpoint)
        ref = {"model": ck.model, "checkpoint_url": ck.url, "trainer_sha256": ck.sha256}
        net = NetByReference(ref)
    size = ck.data["eval_resize"]
    example = _example_frame(example_jpeg(size + size // 3, size))
    # created here, not by Model.log: that would file it under the process's current
    # experiment (Default), not the run's
    logged = attempts.get("model") or _create_logged_model(client, job, ck.step, run_id)
    attempts["model"] = logged
    # Model.log given the run also copies the run's metrics of one step (0) to the model: it
    # reads the whole history of every metric (a long run's: megabytes) for a step our loop
    # never logs. So it is not given the run, and the run's link to the model (its outputs,
    # at the checkpoint's step) is logged below. Where this process has an active fluent run,
    # Model.log would take that one: it is then given ours, as before.
    import mlflow

    log_run = run_id if mlflow.active_run() is not None else None
    info = attempts.get("logged") or Model.log(
        artifact_path=None,
        flavor=flavor,
        name=logged.name,
        model_id=logged.model_id,
        run_id=log_run,
        net=net,
        meta=meta,
        mean_image=mean_image,
        signature=_signature(),
        input_example=example,
        pip_requirements=_requirements(),
        metadata={k: meta[k] for k in ("job", "checkpoint_url", "step", "weights")},
        serialization_format="pickle",
        validate_serving_input=False,  # it would load the net (read the checkpoint) again
    )
    attempts["logged"] = info
    if run_id and log_run is None and not attempts.get("outputs"):
        from mlflow.entities import LoggedModelOutput

        client.log_outputs(run_id, models=[LoggedModelOutput(logged.model_id, step=ck.step)])
        attempts["outputs"] = True
    return logged, info


def _create_logged_model(client: Any, job: str, step: int, run_id: str | None) -> Any:
    """The MLflow logged model (models:/m-...) in the run's experiment, with the run's params
    (already redacted by the tracker); without a run, in MLflow's default experiment."""
    run = client.get_run(run_id) if run_id else None
    return client.create_logged_model(
        experiment_id=run.info.experiment_id if run else "0",
        name=f"{job}-step-{step}",
        source_run_id=run_id,
        params=dict(run.data.params) if run else None,
        tags={JOB_TAG: job},
    )


def _example_frame(jpeg: bytes) -> Any:
    import pandas as pd

    return pd.DataFrame({"image": [jpeg]})


def publish_run_models(
    client: Any,
    run_id: str,
    job: str,
    *,
    best_url: str | None,
    latest_url: str | None,
    metric: str,
    tags: dict[str, str],
    attempts: int = 3,
    backoff_s: float = 2.0,
) -> dict[str, Published]:
    """A finished run's models: `best_url` as alias `best`, `latest_url` as `last` (one
    version where they are the same checkpoint). Never raises: registry trouble is retried
    `attempts` times, then reported (a warning, and the run's tag REGISTRATION_TAG), as is a
    checkpoint that cannot be a model. A local folder is only recorded (the run's tag
    BEST_CHECKPOINT_TAG): only this machine could read its weights. The checkpoints on S3 are
    untouched."""
    wanted: dict[str, list[str]] = {}
    for url, alias in ((best_url, "best"), (latest_url, "last")):
        if url:
            wanted.setdefault(scrub(url), []).append(alias)
    if best_url:
        _try(lambda: log_tags(client, run_id, {BEST_CHECKPOINT_TAG: scrub(best_url)}))
    done: dict[str, Published] = {}
    problems: list[str] = []
    for url, aliases in wanted.items():
        if not re.match(r"^[a-z][a-z0-9+.-]*://", url, re.IGNORECASE) or url.startswith("file:"):
            log.info("checkpoint %s is a local folder: recorded, not registered", url)
            continue
        published = _publish_retrying(
            client, url, aliases, run_id, job, metric, tags, attempts, backoff_s, problems
        )
        if published is not None:
            done.update({alias: published for alias in aliases})
            version = f"{job}/{published.version.version}"
            run_tags = {MODEL_VERSION_TAG_OF[alias]: version for alias in aliases}
            _try(lambda t=run_tags: log_tags(client, run_id, t))
    if problems:
        _try(lambda: log_tags(client, run_id, {REGISTRATION_TAG: "; ".join(problems)[:4900]}))
    return done


def _publish_retrying(
    client: Any,
    url: str,
    aliases: list[str],
    run_id: str,
    job: str,
    metric: str,
    tags: dict[str, str],
    attempts: int,
    backoff_s: float,
    problems: list[str],
) -> Published | None:
    """`publish_checkpoint`, retried on registry trouble; None where it was not published,
    with the reason appended to `problems`."""
    kept: dict[str, Any] = {}  # what one attempt read and logged, for the next
    for attempt in range(1, attempts + 1):
        try:
            return publish_checkpoint(
                client,
                url,
                job,
                run_id=run_id,
                aliases=aliases,
                tags=tags,
                metric=metric,
                attempts=kept,
            )
        except PublishError as err:
            log.warning("%s: not registered", err)
            problems.append(f"{'/'.join(aliases)}: {err}")
            return None
        except Exception as err:  # noqa: BLE001 - the registry is down or refusing
            why = f"{type(err).__name__}: {(scrub(err).splitlines() or [''])[0][:300]}"
            if attempt < attempts and getattr(err, "error_code", None) not in FINAL_ERRORS:
                log.warning(
                    "registering %s (@%s) failed (%s); retry %d of %d in %.0f s",
                    url,
                    ",".join(aliases),
                    why,
                    attempt,
                    attempts - 1,
                    backoff_s * attempt,
                )
                time.sleep(backoff_s * attempt)
                continue
            log.warning(
                "could not register %s (@%s) after %d attempts (%s): the checkpoint is safe "
                "on S3; register it later with: python -m orchestrator.publish --run %s "
                "--checkpoint %s",
                url,
                ",".join(aliases),
                attempt,
                why,
                run_id,
                "best" if "best" in aliases else "last",
            )
            problems.append(f"{'/'.join(aliases)}: {why}")
            return None
    return None


def _try(step: Any) -> None:
    """A bookkeeping call that must not stop the others."""
    try:
        step()
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow bookkeeping failed: %s", scrub(err)[:300])
