"""Pre-flight: what a job can be refused for, checked by the driver before it takes anything.

`launch.main` runs `preflight(spec)` after the spec has resolved (its ranges are checked by
the sections themselves, orchestrator.spec) and before Ray or torchrun start a worker;
`--dry-run` prints what was checked. In order:

1. model: the name is registered and the net takes every option the spec sets
   (`models.check_model`, create_model's own checks, without building or importing torch);
2. data (data.source=shards): the manifest exists and is committed (manifest.json is written
   last), the splits the job reads exist, decode=gpu gets JPEGs only, data.normalize=
   per_pixel_mean finds the dataset's mean image (its manifest names it, its sha256 matches),
   the class count matches model.num_classes, and every step of an epoch gives each rank at
   least one sample (`data.epochs.check_layout`, what the loader itself enforces);
2b. world sizes (an elastic job, scaling.num_workers=[min,max]): every size in the range, with
   its micro-batch, accumulation and samples per worker, the global batch the same at each;
   a range reaching above scaling.global_batch or above the data's canonical streams
   (data.streams; 0: the most workers x max(1, data.num_workers)) is refused;
3. checkpoint storage: a local folder (not s3://) on a Ray cluster of more than one alive node
   is refused unless checkpoint.shared_filesystem=true (each rank would resume from its own
   disk; checked where this process is connected to Ray: `check_cluster`, which the Ray
   driver runs once connected); a probe object is written, read back and deleted under the
   job's checkpoint folder (only once 1-2 passed, so a refused job writes nothing);
4. resume: the checkpoint the job would resume from is committed, and its data position is
   exact with this run's global batch, streams, shuffle buffer and seed, at any world size
   (`data.epochs.resume_problem`). Resuming its own newest checkpoint, the job's spec is
   compared with the one that checkpoint recorded (orchestrator.resume_changes): a changed
   net or data is refused, a changed recipe unless named in --allow-change; a job whose newest
   checkpoint is its last step has finished (`ResumePlan.finished`: the driver says so and
   starts nothing).

Every refusal names the field and the fix; all of one stage's refusals are reported together.
Imports no torch: the driver stays light.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.checkpoint import CheckpointStore, Committed, split_checkpoint_url
from orchestrator.checkpoint_refs import spec_checkpoints_url
from orchestrator.data.epochs import check_layout, default_streams, rank_shares, resume_problem
from orchestrator.data.manifest import (
    DataError,
    DataUnavailable,
    check_decodable,
    load_manifest,
    mean_image_bytes,
    split_shards,
)
from orchestrator.models import UnknownModelError, check_model, model_info
from orchestrator.resume_changes import (
    IDENTITY,
    RECIPE,
    Change,
    compare,
    flat_fields,
    parse_allow,
    refusals,
    ways_on,
)
from orchestrator.s3 import is_s3
from orchestrator.spec import JobSpec, SpecError
from orchestrator.storage import LocalStorage, open_storage
from orchestrator.tracking.uri import TrackingURIUnset, shown_uri, tracking_uri

log = logging.getLogger(__name__)


class PreflightError(SpecError):
    """The pre-flight refused the job; `problems` holds one message per refusal."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Refused(Exception):
    """One check's refusals (collected by `preflight`), one message each."""

    # no OrchestratorError: never leaves `preflight`, which raises PreflightError instead
    def __init__(self, *problems: str) -> None:
        super().__init__(*problems)
        self.problems = list(problems)


@dataclass
class ResumePlan:
    """What check_resume found: the checkpoint the workers resume from (None: step 0), whether
    it is the job's own (not --resume-from's), whether the job has finished (its newest
    checkpoint is schedule.max_iters), and the recipe changes --allow-change let through (the
    driver records them in the job's run)."""

    checkpoint: Committed | None = None
    own: bool = False
    finished: bool = False
    allowed: list[Change] = field(default_factory=list)

    def say_finished(self, spec: JobSpec) -> int:
        """`job NAME already finished at step N; its run: ADDRESS`; the exit code, 0."""
        from orchestrator.tracking.tracker import finished_job_line

        assert self.checkpoint is not None, "only a job with a checkpoint has finished"
        print(finished_job_line(spec, self.checkpoint), flush=True)
        return 0

    @staticmethod
    def record(plan: ResumePlan | None, spec: JobSpec) -> None:
        """Record the recipe changes --allow-change let through in the job's run and say them
        (the driver, holding the job's lease, before any worker starts)."""
        if plan is not None and plan.allowed and plan.checkpoint is not None:
            from orchestrator.tracking.tracker import record_resume_changes

            record_resume_changes(spec, plan.checkpoint, plan.allowed)


class Checked(list[str]):
    """The pre-flight's lines, one per check passed; `resume`: what check_resume decided."""

    resume: ResumePlan | None = None


def preflight(spec: JobSpec, allow_change: Sequence[str] | None = None) -> Checked:
    """Check the job before any resource is taken; returns what was checked, one line each.
    `allow_change`: --allow-change's values (FIELD[,FIELD] each), the recipe fields that may
    differ from the job's checkpoint. Raises PreflightError listing every refusal."""
    done = Checked()
    problems: list[str] = []

    def run(check: Any, *args: Any) -> Any:
        try:
            line, value = check(spec, *args)
        except _Refused as refused:
            problems.extend(refused.problems)
            return None
        done.append(line)
        return value

    data = run(check_data)
    num_classes, samples = data if data else (None, None)
    run(check_world_sizes, samples)
    run(check_model_spec, num_classes)
    run(check_tracking)
    if problems:  # read-only checks failed: nothing is written, not even a probe
        raise PreflightError(problems)
    run(check_storage)  # the resume reads what the probe reached
    if not problems:
        done.resume = run(check_resume, parse_allow(allow_change))
    if problems:
        raise PreflightError(problems)
    return done


def check_model_spec(spec: JobSpec, num_classes: int | None) -> tuple[str, None]:
    """The model is registered and takes every option the spec sets."""
    m = spec.model
    options = m.options()
    try:
        check_model(m.name, num_classes or m.num_classes, **options)
    except UnknownModelError as err:
        raise _Refused(f"model.name={m.name}: {err}") from None
    except TypeError:
        takes = model_info(m.name)["options"]
        bad = [o for o in options if o not in takes]
        unset = ", ".join(
            f"model.{o}={'false' if o == 'zero_init_residual' else 'null'}" for o in bad
        )
        raise _Refused(
            f"model.{bad[0]}={_json(options[bad[0]])}: {m.name} does not take option "
            f"{', '.join(bad)} (it takes: {', '.join(takes) or 'no options'}); set {unset}, "
            "or choose a net that takes it"
        ) from None
    except ValueError as err:
        raise _Refused(f"model.num_classes: {err}") from None
    shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "its defaults"
    classes = num_classes or m.num_classes or model_info(m.name)["num_classes"]
    return f"model: {m.name} ({shown}, {classes} classes) is registered and takes them", None


def check_data(spec: JobSpec) -> tuple[str, tuple[int | None, int | None]]:
    """The dataset's manifest, its splits, its classes and its size for the most workers;
    returns (classes, training samples), None for synthetic data."""
    d, s = spec.data, spec.scaling
    if d.synthetic:
        return f"data: synthetic ({d.synthetic_classes} classes), no dataset to read", (
            spec.model.num_classes or d.synthetic_classes,
            None,
        )
    try:
        manifest = load_manifest(d.url)
    except DataUnavailable as err:
        raise _Refused(f"data.url={d.url}: {err}. Fix: {_reach_fix(d.url)}; resubmit") from None
    except DataError as err:
        raise _Refused(
            f"data.url={d.url}: {err}. Fix: convert the dataset there (datasets/*.py), or "
            "point data.url at a committed one"
        ) from None
    try:
        train = split_shards(manifest, d.url, d.train_split)
    except DataError as err:
        raise _Refused(f"data.train_split={d.train_split}: {err}") from None
    needs_val = spec.eval.every_iters > 0 or spec.eval.at_end
    val_note = ""
    if needs_val:
        try:
            val = split_shards(manifest, d.url, d.val_split)
        except DataError as err:
            raise _Refused(
                f"data.val_split={d.val_split}: {err} (evaluation needs it: or set "
                "eval.every_iters=0 and eval.at_end=false)"
            ) from None
        val_note = f", val {sum(x.samples for x in val)}"
    try:
        check_decodable(manifest, d)
    except DataError as err:
        raise _Refused(f"data.decode={d.decode}: {err}") from None
    mean_note = check_mean_image(spec, manifest)
    classes = int(manifest["num_classes"])
    if spec.model.num_classes is not None and spec.model.num_classes != classes:
        raise _Refused(
            f"model.num_classes={spec.model.num_classes}, but dataset {d.url} has {classes} "
            f"classes: set model.num_classes={classes}, or null to take the manifest's"
        )
    samples = sum(x.samples for x in train)
    streams = canonical_streams(spec)
    if s.elastic and s.num_workers > streams:
        low, high = s.worker_range()
        raise _Refused(
            f"scaling.num_workers=[{low},{high}]: {high} workers is above the {streams} "
            f"canonical streams (data.streams={d.streams}), so some worker would read nothing; "
            f"set data.streams to a multiple of every size in the range (e.g. "
            f"{_common_multiple(low, high)}), or lower the most workers to {streams}"
        )
    try:
        steps = check_layout(
            samples, s.global_batch, streams, s.num_workers, d.epoch_mode, d.samples_per_epoch
        )
    except DataError as err:
        raise _Refused(
            f"scaling.num_workers={s.num_workers}: split {d.train_split!r} of {d.url} has "
            f"{samples} samples: {err}"
        ) from None
    return (
        f"data: {d.url} committed (manifest.json), train {samples} samples in {len(train)} "
        f"shards{val_note}, {classes} classes{mean_note}; {steps} steps of "
        f"{s.global_batch} per epoch ({d.epoch_mode}) over {streams} streams"
    ), (classes, samples)


def _reach_fix(url: str) -> str:
    """How to make a dataset URL answer: S3's variables for s3://, never for http(s) or a path."""
    if is_s3(url):
        return (
            "check the store's endpoint and credentials (AWS_ENDPOINT_URL_S3, "
            "AWS_ACCESS_KEY_ID, ...; `python -m orchestrator.stack env` for the local stack)"
        )
    if url.startswith(("http://", "https://")):
        return f"check that the server answers for {url.rstrip('/')}/manifest.json"
    return f"check that the folder {url} exists on this machine and can be read"


def check_tracking(spec: JobSpec) -> tuple[str, None]:
    """tracking.enabled (the default) needs the tracking server: without MLFLOW_TRACKING_URI
    the job would train with no MLflow record, and say nothing."""
    if not spec.tracking.enabled:
        return "tracking: off (tracking.enabled=false): no MLflow run", None
    try:
        uri = tracking_uri(
            "tracking.enabled=true (the default)",
            "or set tracking.enabled=false to train without an MLflow record",
        )
    except TrackingURIUnset as err:
        raise _Refused(str(err)) from None
    shown = shown_uri(uri)
    return f"tracking: MLflow at {shown}, experiment {spec.tracking.experiment}", None


def canonical_streams(spec: JobSpec) -> int:
    """data.streams, or its default: the most workers x max(1, data.num_workers)."""
    return spec.data.streams or default_streams(spec.data.num_workers, spec.scaling.num_workers)


def check_world_sizes(spec: JobSpec, samples: int | None) -> tuple[str, None]:
    """Every world size an elastic job may run at: the global batch is the spec's at each
    (micro-batch and accumulation recomputed), each worker gets a stream and a sample."""
    s, d = spec.scaling, spec.data
    low, high = s.worker_range()
    epoch = (d.samples_per_epoch if d.epoch_mode == "resampled" else 0) or samples
    if epoch is not None and s.global_batch > epoch:
        raise _Refused(
            f"scaling.global_batch={s.global_batch} is larger than an epoch: split "
            f"{d.train_split!r} of {d.url} has {epoch} samples, so one step would take more "
            f"than all of them (and the lr scales with the batch); set scaling.global_batch "
            f"to at most {epoch}"
        )
    if not s.elastic:
        return f"world size: {high} (fixed), micro-batch {_per_size(spec, high)}", None
    # above scaling.global_batch the spec itself refuses (JobSpec.validate); above the streams
    # check_data does, for shards (synthetic batches have no streams)
    streams = canonical_streams(spec)
    where = f"scaling.num_workers=[{low},{high}]"
    sizes = []
    for w in range(low, high + 1):
        if samples is not None:
            try:
                check_layout(samples, s.global_batch, streams, w, d.epoch_mode, d.samples_per_epoch)
            except DataError as err:
                raise _Refused(f"{where}: at {w} workers: {err}") from None
        sizes.append(f"{w}: {_per_size(spec, w)}")
    over = "" if d.synthetic else f" over {streams} streams"
    return (
        f"world sizes {low}..{high} (elastic), global batch {s.global_batch} at each{over}: "
        + "; ".join(sizes)
    ), None


def _per_size(spec: JobSpec, w: int) -> str:
    """Micro-batch x accumulation and the samples per worker of a step at world size w."""
    g = spec.scaling.global_batch
    # synthetic batches: the even split; shards: each rank's streams' share
    shares = [g * (r + 1) // w - g * r // w for r in range(w)]
    if not spec.data.synthetic:
        shares = rank_shares(g, canonical_streams(spec), w)
    lo, hi = min(shares), max(shares)
    each = f"{lo} each" if lo == hi else f"{lo} or {hi}" if hi - lo == 1 else f"{lo} to {hi}"
    uneven = (
        f" (uneven: {canonical_streams(spec)} streams over {w} workers; a multiple of {w} "
        "evens them)"
        if hi - lo > 1
        else ""
    )
    return (
        f"{spec.micro_batch(w)} x {spec.accumulation(w)} micro-batches, {each} samples per "
        f"worker{uneven}"
    )


def _common_multiple(low: int, high: int) -> int:
    """The least common multiple of every size in [low, high]."""
    import math

    out = 1
    for w in range(low, high + 1):
        out = math.lcm(out, w)
    return out


def check_mean_image(spec: JobSpec, manifest: dict[str, Any]) -> str:
    """data.normalize=per_pixel_mean: the dataset's mean image is there and intact (its bytes
    against the manifest's sha256; numpy-free). Returns a note for the data line."""
    d = spec.data
    if d.normalize != "per_pixel_mean":
        return ""
    try:
        mean_image_bytes(manifest, d.url)
    except DataUnavailable as err:
        raise _Refused(
            f"data.url={d.url}: {err}. Fix: check the store's endpoint and credentials, then "
            "resubmit"
        ) from None
    except DataError as err:
        raise _Refused(
            f"data.normalize=per_pixel_mean: {err}. Fix: set data.normalize=per_channel (the "
            "manifest's per-channel mean and std), or reconvert the dataset with "
            "datasets/cifar10.py or datasets/imagenet.py, which store its mean image (shards "
            "other tools wrote: datasets/index_shards.py --mean-image, no reconversion)"
        ) from None
    shape = manifest["mean_image"].get("shape") or []
    return f", mean image {'x'.join(str(n) for n in shape)}"


def check_cluster(spec: JobSpec) -> list[str]:
    """What the pre-flight checks once this process is connected to Ray (the Ray driver runs it
    after ray.init; `preflight` runs it too where Ray is connected already). Raises
    PreflightError."""
    try:
        line, _ = check_shared_storage(spec)
    except _Refused as refused:
        raise PreflightError(refused.problems) from None
    return [line]


def check_shared_storage(spec: JobSpec) -> tuple[str, None]:
    """A local checkpoint folder is one node's disk: refused on a Ray cluster of more than one
    alive node unless checkpoint.shared_filesystem says every node mounts the same one."""
    c = spec.checkpoint
    ray = sys.modules.get("ray")  # never imported here: a driver not yet connected checks later
    if is_s3(c.storage):
        return "checkpoint storage: s3://, one store for every node", None
    if ray is None or not ray.is_initialized():
        return (
            "checkpoint storage: a local folder (checked against Ray's nodes once connected)",
            None,
        )
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    if alive > 1 and not c.shared_filesystem:
        raise _Refused(
            f"checkpoint.storage={c.storage} is a local folder, but this Ray cluster has {alive} "
            "alive nodes: each rank would write its checkpoints to, and resume from, its own "
            "node's disk. Fix: set checkpoint.storage=s3://BUCKET/PREFIX, or, if every node "
            f"mounts {c.storage} from one shared filesystem (NFS, EFS, Lustre), set "
            "checkpoint.shared_filesystem=true"
        )
    shared = " (checkpoint.shared_filesystem=true)" if alive > 1 else ""
    return f"checkpoint storage: a local folder on {alive} Ray node(s){shared}", None


def check_storage(spec: JobSpec) -> tuple[str, None]:
    """Write, read back and delete a probe object under the job's checkpoint folder (a local
    one refused first on a multi-node Ray cluster this process is connected to)."""
    check_shared_storage(spec)
    root = spec_checkpoints_url(spec)
    store = open_storage(root)
    probe, data = f".preflight-{uuid.uuid4().hex[:12]}", b"pre-flight probe"
    created = _missing_dirs(store.path) if isinstance(store, LocalStorage) else []
    try:
        store.put(probe, data)
        if store.get(probe) != data:
            raise OSError("the probe read back differs from what was written")
        store.delete(probe)
    except Exception as err:  # noqa: BLE001 - any backend's failure is a refusal, named
        raise _Refused(
            f"checkpoint.storage={spec.checkpoint.storage}: cannot write, read and delete a "
            f"probe under {root} ({type(err).__name__}: {err}); fix the credentials or the "
            "permissions there, or point checkpoint.storage at a writable place"
        ) from None
    finally:
        for folder in created:  # leave a local store as it was found
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (another writer) or gone: leave the rest
    return f"checkpoint storage: wrote, read and deleted a probe under {root}", None


def _missing_dirs(path: Path) -> list[Path]:
    """The folders a write under `path` would create, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def check_resume(spec: JobSpec, allow_change: Sequence[str] = ()) -> tuple[str, ResumePlan]:
    """The checkpoint the workers would resume from, as Checkpointer.restore chooses it: the
    job's own newest (its recorded spec compared with this one: `_compare_recorded`), else
    --resume-from's; and whether its data position is exact here
    (orchestrator.data.epochs.resume_problem)."""
    root = spec_checkpoints_url(spec)
    own = CheckpointStore(root).latest()
    if own is None:
        if allow_change:
            fork = " (--resume-from starts a new job: its spec is its own)"
            raise _Refused(
                f"--allow-change {','.join(allow_change)}: job {spec.name} has no committed "
                f"checkpoint of its own under {root}, so nothing it resumes changes"
                f"{fork if spec.checkpoint.resume_from else ''}; drop --allow-change"
            )
        fork_from = _fork_source(spec)
        if fork_from is None:
            return f"resume: no committed checkpoint under {root}: starts at step 0", ResumePlan()
        return _position_line(spec, fork_from), ResumePlan(fork_from)
    plan, note = _compare_recorded(spec, own, allow_change)
    if plan.finished:
        return note, plan
    return _position_line(spec, own) + note, plan


def _fork_source(spec: JobSpec) -> Committed | None:
    """checkpoint.resume_from's committed checkpoint (refused where it is not), or None."""
    resume_from = spec.checkpoint.resume_from
    if not resume_from:
        return None
    try:
        fork_root, step = split_checkpoint_url(resume_from)
    except ValueError as err:
        raise _Refused(f"checkpoint.resume_from: {err}") from None
    found = CheckpointStore(fork_root).find(step)
    if found is None:
        raise _Refused(
            f"checkpoint.resume_from={resume_from}: no committed checkpoint there (no "
            "COMMITTED marker, or a file missing or truncated); pick one the job listed"
        )
    return found


def _compare_recorded(
    spec: JobSpec, own: Committed, allow_change: Sequence[str]
) -> tuple[ResumePlan, str]:
    """The job's own newest checkpoint against this spec: refused for a changed net or data,
    or a changed recipe --allow-change does not name; finished where it is the last step.
    Returns the plan and a note for the resume line (the whole line for a finished job)."""
    finished = own.step >= spec.schedule.max_iters
    if own.spec is None:  # committed before markers recorded the spec
        log.warning(
            "%s was committed before checkpoints recorded their job's spec: job %s cannot be "
            "compared with the spec it was trained under%s. If the model, the data or the "
            "recipe changed, do not resume it: %s",
            own.url,
            spec.name,
            " (--allow-change is not checked)" if allow_change else "",
            ways_on(spec.name, own.url),
        )
        note = "; its marker records no spec (an older checkpoint): not compared, said above"
        if finished:
            return ResumePlan(own, True, True), _finished_line(spec, own, []) + note
        return ResumePlan(own, True), note
    fork = spec.checkpoint.resume_from
    if fork and fork != (own.spec.get("checkpoint") or {}).get("resume_from"):
        raise _Refused(  # the job's own checkpoint wins (Checkpointer.restore): never silently
            f"checkpoint.resume_from={fork}: job {spec.name} has committed checkpoints of its "
            f"own (the newest: {own.url}), and a resubmission resumes those; --resume-from "
            f"starts a new job: name={spec.name}-2 --resume-from {fork}"
        )
    now = spec.to_dict()
    changes = compare(own.spec, now)
    if finished and not any(c.kind == IDENTITY for c in changes):
        recipe = [c for c in changes if c.kind == RECIPE]
        return ResumePlan(own, True, True), _finished_line(spec, own, recipe)
    problems = refusals(changes, allow_change, flat_fields(now), spec.name, own.url)
    if problems:
        raise _Refused(*problems)
    allowed = [c for c in changes if c.kind == RECIPE]  # every one named in allow_change
    if not allowed:
        return ResumePlan(own, True), "; the same net, data and recipe as its checkpoint"
    said = "; ".join(map(str, allowed))
    return ResumePlan(own, True, False, allowed), (
        f"; recipe changed by --allow-change: {said} (recorded in the job's MLflow run)"
    )


def _finished_line(spec: JobSpec, own: Committed, recipe: list[Change]) -> str:
    line = (
        f"resume: job {spec.name} already finished at step {own.step} "
        f"(schedule.max_iters={spec.schedule.max_iters}): nothing left to train"
    )
    if recipe:
        line += (
            f"; its recipe changes ({'; '.join(map(str, recipe))}) would apply to no step: "
            f"{ways_on(spec.name, own.url)}"
        )
    return line


def _position_line(spec: JobSpec, latest: Committed) -> str:
    """The resume line for `latest`; refused where its data position is not exact here."""
    if not latest.position:
        return (
            f"resume: from {latest.url} (its marker predates data positions: the workers "
            "check it against this run)"
        )
    streams, kept = canonical_streams(spec), ""
    was = latest.position.get("streams")
    if not spec.data.streams and was is not None and was != streams:  # as the workers do
        streams, kept = int(was), f" (keeps the checkpoint's {was} streams: data.streams=0)"
    now = {
        "global_batch": spec.scaling.global_batch,
        "streams": streams,
        "shuffle_buffer": spec.data.shuffle_buffer,
        "seed": spec.seed,
        "epoch_mode": spec.data.epoch_mode,
        "samples_per_epoch": spec.data.samples_per_epoch,
        "source": "synthetic" if spec.data.synthetic else "shards",
    }
    problem = resume_problem(latest.position, now)
    if problem:
        raise _Refused(f"resume from {latest.url}: {problem}")
    return f"resume: from {latest.url}, exact at any world size{kept}"


def _json(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def in_torchrun_child() -> bool:
    """Whether this process is one of the ranks `--local` re-executed under torchrun: the
    parent ran the pre-flight already."""
    return os.environ.get("ORCH_LOCAL") == "1" and "LOCAL_RANK" in os.environ
