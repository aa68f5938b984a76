"""A job file, resolved for a cluster of N GPUs: the plan's batch policy.

On more GPUs than the job file's, its per-GPU batch and accumulation are kept, so the global
batch grows with the cluster, the schedule's iteration counts are scaled so it covers the same
images, and above the paper's batch of 256 the lr warms up as Goyal et al. (2017) did; on fewer
GPUs, the job file's global batch is kept by gradient accumulation (the package docstring,
orchestrator/plan, states the rules).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import UsageError
from orchestrator.plan.formulas import scale_iterations
from orchestrator.spec import JobSpec, SpecError, apply_overrides, parse_value


class PlanError(UsageError, ValueError):
    """Bad input to the plan (a missing job file, a bad size, ...); the message says what to fix."""


IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_BATCH = 256  # the paper's mini-batch: the linear scaling rule's reference (spec.lr())
WARMUP_EPOCHS = 5  # Goyal et al. (2017): a linear warm-up over the first 5 epochs

# Iteration counts that describe the schedule; scaled together when the global batch changes.
# checkpoint.every_iters is not one of them: how often to save is about wall-clock time lost to
# a failure, not about the schedule, so the plan reports its cost instead.
ITERATION_FIELDS = (
    "schedule.max_iters",
    "schedule.milestones",
    "schedule.warmup_iters",
    "eval.every_iters",
)


def load_job_spec(path: str | Path) -> JobSpec:
    """Import a job file by path and return its SPEC.

    The file's folder goes on sys.path while it imports, as when it runs as a script, because
    job files import their siblings (jobs/imagenet_r50.py imports imagenet_r152).
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"job file not found: {path} (for example: jobs/imagenet_r152.py)")
    if path.suffix != ".py":
        raise PlanError(f"{path}: expected a Python job file (jobs/NAME.py)")
    folder = str(path.resolve().parent)
    module_spec = importlib.util.spec_from_file_location(f"_plan_job_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None  # a .py file always has one
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # what a normal import does (dataclasses look it up)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the job file's own error: show it, with the file's name
        raise PlanError(f"{path}: importing it failed: {type(err).__name__}: {err}") from err
    finally:
        if added:
            sys.path.remove(folder)
    spec = getattr(module, "SPEC", None)
    if spec is None:
        raise PlanError(
            f"{path} defines no SPEC; a job file builds `SPEC = JobSpec(...)` "
            "(see jobs/imagenet_r152.py)"
        )
    if not isinstance(spec, JobSpec):
        raise PlanError(
            f"{path}: SPEC is a {type(spec).__name__}, not an orchestrator.spec.JobSpec"
        )
    return spec


def _override_keys(overrides: list[str]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise PlanError(f"override {item!r}: expected section.key=value, e.g. optim.lr=0.2")
        key, value = item.split("=", 1)
        keys[key] = value
    return keys


def _get(spec: JobSpec, dotted: str) -> object:
    node: object = spec
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@dataclass(frozen=True)
class Resolved:
    """The job as it would run on the cluster, and how the plan got there."""

    spec: JobSpec
    num_gpus: int
    written_batch: int  # B0: the global batch the schedule's iteration counts were written for
    overrides: list[str]  # the user's
    added: list[str]  # the plan's: cluster size, batch policy, scaled schedule, warm-up
    base_max_iters: int  # schedule.max_iters in the job file
    why: list[str] = field(default_factory=list)  # the plan's choices, one sentence each


def resolve_for_cluster(
    base: JobSpec,
    overrides: list[str],
    num_gpus: int,
    train_images: int = IMAGENET_TRAIN_IMAGES,
) -> Resolved:
    """The user's overrides plus scaling.num_workers = num_gpus, with the batch policy (the
    package docstring) and, above the paper's batch, Goyal et al.'s warm-up over
    WARMUP_EPOCHS epochs of `train_images`."""
    if num_gpus < 1:
        raise PlanError(f"nodes x GPUs per node must be >= 1, got {num_gpus}")
    keys = _override_keys(overrides)
    if "scaling.num_workers" in keys:
        raise PlanError(
            "scaling.num_workers is set by --nodes x --gpus-per-node; drop the override"
        )
    written = base.scaling.global_batch
    added, why = [f"scaling.num_workers={num_gpus}"], list[str]()
    try:
        global_batch, batch_added = _batch_policy(base, overrides, keys, num_gpus, why)
        added += batch_added
        if global_batch < num_gpus:
            raise PlanError(
                f"scaling.global_batch={global_batch} is less than one image per GPU on {num_gpus} "
                f"GPUs; choose at least {num_gpus} (e.g. {32 * num_gpus} = 32 per GPU)"
            )
        if global_batch != written:
            added += _scaled_counts(base, keys, written / global_batch)
        spec = apply_overrides(base, [*overrides, *added])
        warm = _warmup(spec, keys, written, train_images, why)
        if warm:
            added += warm
            spec = apply_overrides(base, [*overrides, *added])
    except SpecError as err:
        raise PlanError(str(err)) from None
    return Resolved(
        spec=spec,
        num_gpus=num_gpus,
        written_batch=written,
        overrides=list(overrides),
        added=added,
        base_max_iters=base.schedule.max_iters,
        why=why,
    )


def _batch_policy(
    base: JobSpec, overrides: list[str], keys: dict[str, str], num_gpus: int, why: list[str]
) -> tuple[int, list[str]]:
    """The global batch on `num_gpus` GPUs and the overrides that set it. More GPUs than the
    job file's: its per-GPU batch x accumulation is kept, so the global batch grows. Fewer:
    the job file's global batch is kept by accumulating micro-batches of its per-GPU size."""
    if "scaling.global_batch" in keys:
        text = keys["scaling.global_batch"]
        global_batch = parse_value(text)
        if not isinstance(global_batch, int) or isinstance(global_batch, bool):
            raise PlanError(f"scaling.global_batch: expected an integer, got {text!r}")
        return global_batch, []
    at_own_size = apply_overrides(base, overrides)
    written = at_own_size.scaling.global_batch
    micro, steps = at_own_size.micro_batch(), at_own_size.accumulation()
    kept = micro * steps * num_gpus
    if kept >= written:
        if kept == written:
            return written, []
        if written >= num_gpus:
            per_gpu = f"{written / num_gpus:g}"
            why.append(
                f"to keep the job file's global batch {written:,} instead: "
                f"scaling.global_batch={written} ({per_gpu} images per GPU, BN over {per_gpu})"
            )
        return kept, [f"scaling.global_batch={kept}"]
    added = []
    if "scaling.micro_batch" not in keys and at_own_size.scaling.micro_batch != micro:
        added.append(f"scaling.micro_batch={micro}")
    per_step = -(-written // (num_gpus * micro))
    why.append(
        f"accumulation: {num_gpus} GPUs x {micro} is less than the job file's global batch "
        f"{written:,}, so each GPU accumulates {per_step} micro-batches of {micro} per step "
        f"(scaling.micro_batch={micro}): the batch, lr and schedule stay the recipe's, BN still "
        f"sees {micro} images, and an image costs the same time. Chosen over a smaller global "
        f"batch (scaling.global_batch={kept}: lr and schedule rescaled, no longer the recipe)"
    )
    return written, added


def _scaled_counts(base: JobSpec, keys: dict[str, str], factor: float) -> list[str]:
    """The schedule's iteration counts x `factor` (= written / new global batch), so the
    schedule covers the same images; a count the user set is left alone."""
    added = []
    for name in ITERATION_FIELDS:
        if name in keys:
            continue  # the user's own value wins
        current = _get(base, name)
        if isinstance(current, list):
            scaled: object = sorted({scale_iterations(int(m), factor) for m in current})
        else:
            scaled = scale_iterations(int(current), factor)  # type: ignore[call-overload]
        if scaled != current:
            added.append(f"{name}={scaled}".replace(" ", ""))
    return added


def _warmup(
    spec: JobSpec, keys: dict[str, str], written: int, train_images: int, why: list[str]
) -> list[str]:
    """Goyal et al. (2017)'s gradual warm-up where the linear scaling rule raises the lr above
    the paper's batch: linear from the lr of batch 256 (optim.base_lr) to spec.lr() over
    WARMUP_EPOCHS epochs. Left out, and said, where the job or the user chose a warm-up or a
    fixed lr."""
    B, s = spec.scaling.global_batch, spec.schedule
    if spec.optim.lr is not None:
        if B != written and "optim.lr" not in keys:
            why.append(
                f"optim.lr={spec.optim.lr:g} is fixed by the job file, so the global batch "
                f"{B:,} (the job file's is {written:,}) trains at the same lr; the linear "
                f"scaling rule would give optim.lr={spec.optim.lr * B / written:g}"
            )
        return []
    if B <= PAPER_BATCH:
        return []
    mine = sorted(k for k in keys if k.startswith("schedule.warmup_"))
    if mine or s.warmup_iters or s.warmup_until_train_err is not None:
        whose = f"yours ({', '.join(mine)})" if mine else "the job file's (scaled)"
        why.append(
            f"global batch {B:,} at lr {spec.lr():g}: the warm-up is {whose}, not Goyal et "
            f"al.'s {WARMUP_EPOCHS}-epoch linear one"
        )
        return []
    iters = math.ceil(WARMUP_EPOCHS * train_images / B)
    factor = PAPER_BATCH / B
    why.append(
        f"warm-up: global batch {B:,} trains at lr {spec.lr():g} (optim.base_lr "
        f"{spec.optim.base_lr:g} x {B:,}/{PAPER_BATCH}); as Goyal et al. (2017), the lr rises "
        f"linearly from {spec.optim.base_lr:g} (the lr of batch {PAPER_BATCH}) over the first "
        f"{WARMUP_EPOCHS} epochs: {iters:,} iterations of {B:,} out of {train_images:,} images "
        f"(--train-images)"
    )
    return [
        f"schedule.warmup_iters={iters}",
        f"schedule.warmup_factor={factor:.6g}",
        "schedule.warmup_linear=true",
    ]


def count_model_parameters(spec: JobSpec) -> int:
    """Parameters of the job's model, built on the meta device (no memory, no init cost)."""
    import torch

    from orchestrator.models import UnknownModelError, count_parameters, create_model

    try:
        with torch.device("meta"):
            model = create_model(spec.model.name, spec.model.num_classes, **spec.model.options())
    except (UnknownModelError, TypeError, ValueError) as err:
        raise PlanError(f"model.name={spec.model.name!r}: {err}") from None
    return count_parameters(model)
