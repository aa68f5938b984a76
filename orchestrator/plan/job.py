"""A job file, resolved for a cluster of N GPUs: the plan's batch policy.

The job's per-GPU batch and accumulation are kept, so the global batch grows with the cluster,
and the schedule's iteration counts are scaled so it covers the same images (the package
docstring, orchestrator/plan, states the rule).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UsageError
from orchestrator.plan.formulas import scale_iterations
from orchestrator.spec import JobSpec, SpecError, apply_overrides, parse_value


class PlanError(UsageError, ValueError):
    """Bad input to the plan (a missing job file, a bad size, ...); the message says what to fix."""


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
    added: list[str]  # the plan's: cluster size, kept per-GPU batch, scaled schedule
    base_max_iters: int  # schedule.max_iters in the job file


def resolve_for_cluster(base: JobSpec, overrides: list[str], num_gpus: int) -> Resolved:
    """The user's overrides plus scaling.num_workers = num_gpus, with the batch policy above."""
    if num_gpus < 1:
        raise PlanError(f"nodes x GPUs per node must be >= 1, got {num_gpus}")
    keys = _override_keys(overrides)
    if "scaling.num_workers" in keys:
        raise PlanError(
            "scaling.num_workers is set by --nodes x --gpus-per-node; drop the override"
        )
    written = base.scaling.global_batch
    added = [f"scaling.num_workers={num_gpus}"]
    try:
        if "scaling.global_batch" in keys:
            global_batch = parse_value(keys["scaling.global_batch"])
            if not isinstance(global_batch, int) or isinstance(global_batch, bool):
                text = keys["scaling.global_batch"]
                raise PlanError(f"scaling.global_batch: expected an integer, got {text!r}")
        else:
            # keep the per-GPU batch and accumulation the job has at the size it was written for
            at_own_size = apply_overrides(base, overrides)
            global_batch = at_own_size.micro_batch() * at_own_size.accumulation() * num_gpus
            if global_batch != at_own_size.scaling.global_batch:
                added.append(f"scaling.global_batch={global_batch}")
        if global_batch < num_gpus:
            raise PlanError(
                f"scaling.global_batch={global_batch} is less than one image per GPU on {num_gpus} "
                f"GPUs; choose at least {num_gpus} (e.g. {32 * num_gpus} = 32 per GPU)"
            )
        if global_batch != written:
            # the same schedule in images: every iteration count x written / global_batch
            factor = written / global_batch
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
    )


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
