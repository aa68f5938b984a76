"""What a resubmitted job may change: every field of the job spec in one of three classes, and
the comparison of the spec a checkpoint recorded with a resubmission's.

A job resubmitted under its name resumes its own newest checkpoint: the same experiment,
continued. Each commit marker records the job's resolved spec (orchestrator.checkpoint), and
the pre-flight (orchestrator.preflight.check_resume) compares it with the new one, field by
field, by the class `FIELDS` gives each:

    identity  the net, the meaning of its data, or the checkpoint's format (model.*, data.url,
              the classes, the image size, the input's normalisation, the strategy): refused,
              naming `old -> new`; a new `name=` starts another job, or `name=NEW
              --resume-from URL` starts a new job from those weights
    recipe    how it is trained and measured (optim.*, schedule.*, augmentation, global batch,
              data order, precision, the evaluation protocol): refused unless named in
              `--allow-change FIELD[,FIELD]`; then recorded in the job's MLflow run
              (orchestrator.tracking.tracker.record_resume_changes) and said in the log
    free      how and where it runs (workers, loader, decoding, checkpoint cadence and storage,
              tracking, the evaluation's batch size): passes without a word

A field takes the class of its longest entry in `FIELDS` (a section's entry covers its fields,
new ones included); `data` and `scaling` have no section entry, so that a field added there
must be classified here (tests/test_resume_changes.py checks every field of JobSpec has a
class). Imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IDENTITY, RECIPE, FREE = "identity", "recipe", "free"

# the one table: dotted field (or section) -> class; why, where it is not plain
FIELDS: dict[str, str] = {
    "name": FREE,  # the checkpoint is found by it: never differs
    "seed": RECIPE,  # the data order and augmentation draws
    "model": IDENTITY,  # the net: its layers, classes, options, initialisation
    "model.channels_last": FREE,  # memory layout only
    "model.compile": FREE,  # the same net, compiled
    "data.url": IDENTITY,
    "data.source": IDENTITY,
    "data.train_split": IDENTITY,
    "data.image_size": IDENTITY,  # the input's shape
    "data.normalize": IDENTITY,  # what the input's values mean to the net
    "data.synthetic_classes": IDENTITY,  # the labels
    "data.val_split": RECIPE,  # what val/* measures
    "data.train_transform": RECIPE,  # augmentation
    "data.eval_resize": RECIPE,
    "data.scale_range": RECIPE,
    "data.pca_lighting": RECIPE,
    "data.shuffle_buffer": RECIPE,  # the data order
    "data.streams": RECIPE,  # the data order (0: the checkpoint's are kept)
    "data.epoch_mode": RECIPE,
    "data.samples_per_epoch": RECIPE,
    "data.synthetic_samples": RECIPE,  # the epoch's length
    "data.num_workers": FREE,
    "data.prefetch_factor": FREE,
    "data.ledger": FREE,
    "data.max_bad_fraction": FREE,
    "data.bad_check_after": FREE,
    "data.verify_shards": FREE,
    "data.eval_hold_mb": FREE,
    "data.timeout_s": FREE,
    "data.io_retry_s": FREE,
    "data.decode": FREE,  # where JPEGs are decoded, not what the net sees
    "data.split_cpu_share": FREE,
    "data.split_adapt": FREE,
    "optim": RECIPE,
    "schedule": RECIPE,  # max_iters too: a longer run is another schedule
    # DDP's optimizer state and DeepSpeed's shards do not load into each other
    "scaling.strategy": IDENTITY,
    "scaling.zero_stage": IDENTITY,
    "scaling.global_batch": RECIPE,
    "scaling.precision": RECIPE,
    "scaling.num_workers": FREE,  # any world size resumes exactly (orchestrator.data.epochs)
    "scaling.min_workers": FREE,
    "scaling.use_gpu": FREE,
    "scaling.cpus_per_worker": FREE,
    "scaling.micro_batch": FREE,  # accumulation keeps the global batch
    "scaling.placement": FREE,
    "scaling.max_failures": FREE,
    "scaling.max_preemption_failures": FREE,
    "scaling.resize_interval_s": FREE,
    "scaling.torch_threads": FREE,
    "checkpoint": FREE,
    "tracking": FREE,
    "eval": RECIPE,  # the protocol: what val/* means
    "eval.at_end": FREE,  # when, not what
    "eval.every_iters": FREE,
    "eval.batch_size": FREE,
}


def field_class(field: str) -> str | None:
    """The class of a dotted spec field by its longest entry in FIELDS; None if it has none."""
    parts = field.split(".")
    for n in range(len(parts), 0, -1):
        found = FIELDS.get(".".join(parts[:n]))
        if found:
            return found
    return None


@dataclass(frozen=True)
class Change:
    """One field that differs between the recorded spec and the new one."""

    field: str
    kind: str  # IDENTITY, RECIPE or FREE
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field} {show(self.old)} -> {show(self.new)}"


def show(value: Any) -> str:
    """A value as a user writes it on the command line (JSON: null, true, [1,2])."""
    plain = isinstance(value, str) and value and " " not in value
    return value if plain else json.dumps(value, separators=(",", ":"))


def flat_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A spec's dict (JobSpec.to_dict, or a marker's) as `section.key` -> value, one level
    deep (a dict-valued field such as tracking.tags stays one value), as JSON reads it back."""
    data = json.loads(json.dumps(spec))
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def compare(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[Change]:
    """Every field whose value differs, with its class, in the spec's order. A field only one
    side has (added or removed by a release in between) is not a change the user made."""
    old, new = flat_fields(recorded), flat_fields(now)
    return [
        Change(key, field_class(key) or RECIPE, old[key], value)
        for key, value in new.items()
        if key in old and old[key] != value
    ]


def parse_allow(values: Iterable[str] | None) -> list[str]:
    """--allow-change's values (each FIELD[,FIELD], repeatable) as a list of fields."""
    out: list[str] = []
    for value in values or ():
        for field in value.split(","):
            if field.strip() and field.strip() not in out:
                out.append(field.strip())
    return out


def ways_on(name: str, url: str) -> str:
    """The two ways to run a changed net or data: a new job, or a new job from these weights."""
    return (
        f"give the job a new name (name={name}-2: a new run from step 0), or start a new job "
        f"from these weights: name={name}-2 --resume-from {url}"
    )


def refusals(
    changes: Sequence[Change], allow: Sequence[str], fields: Iterable[str], name: str, url: str
) -> list[str]:
    """Why resuming checkpoint `url` of job `name` under these `changes` is refused, one
    message each (none: it may go on); `allow`: --allow-change's fields; `fields`: the spec's."""
    out = [problem for field in allow if (problem := _allow_problem(field, changes, fields))]
    identity = [c for c in changes if c.kind == IDENTITY]
    if identity:
        out.append(
            f"{'; '.join(map(str, identity))}: changes the net, its data or its checkpoint's "
            f"format, so it is another experiment than the one {url} holds; {ways_on(name, url)}"
        )
    recipe = [c for c in changes if c.kind == RECIPE and c.field not in allow]
    if recipe:
        fields_changed = ",".join(c.field for c in recipe)
        out.append(
            f"{'; '.join(map(str, recipe))}: changes the recipe of job {name}, which would "
            f"resume from {url}: two recipes in one run. To continue it under the new values "
            f"(recorded in its MLflow run), add --allow-change {fields_changed}; or resubmit "
            f"with the checkpoint's values; or {ways_on(name, url)}"
        )
    return out


def _allow_problem(field: str, changes: Sequence[Change], fields: Iterable[str]) -> str | None:
    """Why --allow-change `field` is refused, or None."""
    problem = allow_field_problem(field, fields)
    if problem is None and field not in {c.field for c in changes}:
        return (
            f"--allow-change {field}: {field} did not change since the checkpoint; drop it "
            "from --allow-change"
        )
    return problem


def allow_field_problem(field: str, fields: Iterable[str]) -> str | None:
    """Why --allow-change `field` can never apply (not a field, or not a recipe field), or
    None; whether it changed is the checkpoint's question."""
    known = set(fields)
    flag = f"--allow-change {field}"
    if field not in known:
        near = sorted(k for k in known if k.split(".")[-1] == field.split(".")[-1])
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        return f"{flag}: not a field of the job spec{hint}; name fields as section.key"
    kind = field_class(field)
    if kind == IDENTITY:
        return (
            f"{flag}: {field} defines the net, its data or its checkpoint's format, so a job "
            "cannot continue under another value; start a new job instead (a new name=, or "
            "name=NEW --resume-from URL)"
        )
    if kind == FREE:
        return f"{flag}: {field} does not change the experiment, so it needs none; drop it"
    return None
