"""A study's `--allow-change FIELD[,FIELD]`: its trials may continue under a changed recipe.

A resubmitted study with another recipe value (a longer schedule, another learning rate) has
trials that resume their own checkpoints; each trial's pre-flight refuses a changed recipe
field unless allowed (orchestrator.resume_changes), as a job's does. For a study the flag names
what may change across the grid: the driver refuses a field that can never apply (not a spec
field, or one that defines the net or its data, or one that needs no allowance) before any
trial runs, and each trial is allowed the named fields that changed since its own newest
checkpoint. Trials with no checkpoint, or whose checkpoint has the new value, need no
allowance; the driver says how many trials continue under the change, once.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.checkpoint import CheckpointStore
from orchestrator.checkpoint_refs import spec_checkpoints_url
from orchestrator.resume_changes import allow_field_problem, compare, flat_fields, parse_allow
from orchestrator.spec import JobSpec, SpecError
from orchestrator.study.grid import Trial


def study_allowance(values: Sequence[str] | None, trials: Sequence[Trial]) -> list[str]:
    """--allow-change's fields, each checked against the trials' spec; raises SpecError (exit
    2) naming every field that can never apply, and the fix."""
    fields = parse_allow(values)
    if not fields or not trials:
        return fields
    known = flat_fields(trials[0].spec.to_dict())
    problems = [p for f in fields if (p := allow_field_problem(f, known))]
    if problems:
        raise SpecError("; ".join(problems))
    return fields


def trial_allowance(spec: JobSpec, fields: Sequence[str]) -> list[str]:
    """The fields of `fields` that changed since trial job `spec`'s own newest checkpoint
    (none without one): what its pre-flight is allowed."""
    if not fields:
        return []
    latest = CheckpointStore(spec_checkpoints_url(spec)).latest()
    if latest is None or latest.spec is None:
        return []
    changed = {c.field for c in compare(latest.spec, spec.to_dict())}
    return [f for f in fields if f in changed]


def say_allowance(fields: Sequence[str], trials: Sequence[Trial]) -> str | None:
    """The driver's one line on what --allow-change lets through, or None without it."""
    if not fields:
        return None
    using = sum(1 for t in trials if trial_allowance(t.spec, fields))
    return (
        f"--allow-change {','.join(fields)}: {using} of {len(trials)} trials continue their "
        "checkpoints under the changed value (recorded in each one's MLflow run); the others "
        "start at step 0, finished before, or have the value already"
    )
