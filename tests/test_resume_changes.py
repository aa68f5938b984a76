"""A resubmitted job against the spec its checkpoint recorded (orchestrator.resume_changes):
a changed net or data refused, a changed recipe refused unless --allow-change names it (then
recorded in the run), a finished job said finished; the table itself; and one job through
the real path (--local, in this process, tracked in the test stack's MLflow)."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from orchestrator import launch
from orchestrator.checkpoint import CheckpointStore
from orchestrator.resume_changes import (
    FIELDS,
    FREE,
    IDENTITY,
    RECIPE,
    compare,
    field_class,
    flat_fields,
    parse_allow,
    refusals,
)
from orchestrator.spec import JobSpec, apply_overrides
from orchestrator.stack import Stack
from tests.conftest import load_job_spec
from tests.test_train import TINY

URL = "/runs/j/checkpoints/step-00000004"


def spec(*overrides: str) -> dict[str, Any]:
    return apply_overrides(JobSpec(name="j"), list(overrides)).to_dict()


# ------------------------------------------------------------------------------- the table


def test_every_field_of_the_spec_has_a_class_and_the_table_names_only_fields() -> None:
    fields = flat_fields(JobSpec(name="j").to_dict())
    unclassified = [f for f in fields if field_class(f) is None]
    assert not unclassified, f"classify these in orchestrator.resume_changes.FIELDS: {unclassified}"
    sections = {f.split(".")[0] for f in fields}
    stale = [k for k in FIELDS if k not in fields and k not in sections]
    assert not stale, f"FIELDS names what the spec has not: {stale}"
    assert {FIELDS[k] for k in FIELDS} == {IDENTITY, RECIPE, FREE}


def test_a_field_takes_its_longest_entry() -> None:
    assert field_class("model.name") == IDENTITY and field_class("model.compile") == FREE
    assert field_class("eval.protocol") == RECIPE and field_class("eval.batch_size") == FREE
    assert field_class("eval.every_iters") == FREE  # when it validates, not what val/* means
    assert field_class("optim.lr") == RECIPE and field_class("tracking.tags") == FREE
    assert field_class("data.url") == IDENTITY and field_class("data.num_workers") == FREE
    assert field_class("nothing.here") is None


def test_compare_classifies_each_change_and_ignores_what_did_not_change() -> None:
    old = spec()
    new = spec(
        "model.name=resnet18",
        "optim.lr=0.05",
        "scaling.num_workers=4",
        "tracking.log_every=7",
        "data.image_size=32",
        "data.scale_range=[32,64]",
    )
    found = {c.field: (c.kind, c.old, c.new) for c in compare(old, new)}
    assert found == {
        "model.name": (IDENTITY, "resnet50", "resnet18"),
        "data.image_size": (IDENTITY, 224, 32),
        "data.scale_range": (RECIPE, [256, 480], [32, 64]),
        "optim.lr": (RECIPE, None, 0.05),
        "scaling.num_workers": (FREE, 1, 4),
        "tracking.log_every": (FREE, 50, 7),
    }
    # a marker read back from JSON (tuples as lists) against the live spec: no change
    assert compare(json.loads(json.dumps(old)), old) == []
    # a field a release added or removed since the checkpoint is not the user's change
    older = {**old, "optim": {k: v for k, v in old["optim"].items() if k != "nesterov"}}
    assert compare(older, spec("optim.nesterov=true")) == []


def test_a_changed_net_is_refused_naming_old_new_and_the_two_ways_on() -> None:
    changes = compare(spec(), spec("model.name=resnet18", "data.url=/other"))
    (problem,) = refusals(changes, [], flat_fields(spec()), "j", URL)
    assert 'model.name resnet50 -> resnet18; data.url "" -> /other' in problem
    assert "name=j-2" in problem and f"--resume-from {URL}" in problem


def test_a_changed_recipe_needs_allow_change_and_only_for_what_changed() -> None:
    fields = flat_fields(spec())
    changes = compare(spec(), spec("optim.lr=0.05", "schedule.max_iters=10", "seed=3"))
    (problem,) = refusals(changes, [], fields, "j", URL)
    assert "seed 0 -> 3; optim.lr null -> 0.05; schedule.max_iters 600000 -> 10" in problem
    assert "--allow-change seed,optim.lr,schedule.max_iters" in problem
    # the free change passes without a word, the named recipe changes pass
    allowed = ["optim.lr", "schedule.max_iters", "seed"]
    free = compare(
        spec(), spec("optim.lr=0.05", "schedule.max_iters=10", "seed=3", "eval.batch_size=7")
    )
    assert refusals(free, allowed, fields, "j", URL) == []
    (left,) = refusals(changes, ["optim.lr", "seed"], fields, "j", URL)
    assert left.startswith("schedule.max_iters 600000 -> 10: changes the recipe")
    assert "--allow-change schedule.max_iters;" in left


def test_allow_change_of_an_unchanged_identity_free_or_unknown_field_is_refused() -> None:
    changes = compare(spec(), spec("optim.lr=0.05"))
    asked = ["optim.lr", "optim.momentum", "model.name", "data.num_workers", "lr", "foo.bar"]
    problems = refusals(changes, asked, flat_fields(spec()), "j", URL)
    assert len(problems) == 5, problems
    said = "\n".join(problems)
    assert "--allow-change optim.momentum: optim.momentum did not change" in said
    assert "--allow-change model.name: model.name defines the net" in said
    assert (
        "--allow-change data.num_workers: data.num_workers does not change the experiment" in said
    )
    assert "--allow-change lr: not a field of the job spec (did you mean optim.lr?)" in said
    assert "--allow-change foo.bar: not a field of the job spec;" in said


def test_allow_change_takes_commas_and_repeats() -> None:
    assert parse_allow(["optim.lr,schedule.max_iters", " seed ", "optim.lr"]) == [
        "optim.lr",
        "schedule.max_iters",
        "seed",
    ]
    assert parse_allow(None) == []
    # overrides may follow the flag on the command line
    args = launch.parse_args(["--allow-change", "optim.lr", "optim.lr=0.05", "--local", "seed=1"])
    assert args.overrides == ["optim.lr=0.05", "seed=1"] and args.allow_change == ["optim.lr"]


# ------------------------------------------------------------- the pre-flight, on markers


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records a worker start (none may start for a refused or finished job)."""
    out: list[str] = []
    monkeypatch.setattr(launch, "run_local", lambda spec: out.append("local"))
    monkeypatch.setattr(launch, "run_ray", lambda spec, **kw: out.append("ray"))
    return out


def commit(storage: Path, job: JobSpec, step: int, recorded: dict[str, Any] | None) -> str:
    """A committed checkpoint of `job` at `step` (the pre-flight reads only its marker)."""
    store = CheckpointStore(f"{storage}/{job.name}/checkpoints")
    store.put(step, "trainer.pt", b"state")
    return store.commit(step, {}, {}, recorded)


SYNTHETIC = ["data.source=synthetic", "tracking.enabled=false", "schedule.max_iters=10"]


def test_a_checkpoint_without_a_recorded_spec_is_said_and_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: Any, started: list[str]
) -> None:
    smoke = load_job_spec("smoke")
    commit(tmp_path, smoke, 4, None)  # as a checkpoint written before markers held the spec
    args = [*SYNTHETIC, f"checkpoint.storage={tmp_path}", "model.name=cifar_resnet32"]
    with caplog.at_level(logging.WARNING):
        assert launch.main(smoke, ["--local", *args]) == 0, capsys.readouterr().err
    assert "recorded their job's spec: job smoke cannot be compared" in caplog.text
    assert "do not resume it: give the job a new name" in caplog.text
    assert "its marker records no spec" in capsys.readouterr().out
    assert started == ["local"]


def test_allow_change_without_a_checkpoint_of_its_own_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], started: list[str]
) -> None:
    smoke = load_job_spec("smoke")
    args = [*SYNTHETIC, f"checkpoint.storage={tmp_path}", "--allow-change", "optim.lr"]
    assert launch.main(smoke, args) == 2
    err = capsys.readouterr().err
    assert "--allow-change optim.lr: job smoke has no committed checkpoint of its own" in err
    assert started == []


def test_resume_from_beside_a_checkpoint_of_its_own_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], started: list[str]
) -> None:
    """The job's own checkpoint would win over --resume-from: refused, not ignored; the same
    --resume-from as the job was started with (a fork resubmitted) resumes."""
    smoke = load_job_spec("smoke")
    fork = commit(tmp_path / "other", smoke, 6, None)
    args = [*SYNTHETIC, f"checkpoint.storage={tmp_path}", f"--resume-from={fork}"]
    job = apply_overrides(smoke, [*SYNTHETIC, f"checkpoint.storage={tmp_path}"])
    own = commit(tmp_path, job, 4, job.to_dict())
    assert launch.main(smoke, ["--local", *args]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.resume_from={fork}: job smoke has committed checkpoints of its own" in err
    assert f"(the newest: {own})" in err and f"name=smoke-2 --resume-from {fork}" in err
    forked = apply_overrides(job, [f"checkpoint.resume_from={fork}"])
    commit(tmp_path, forked, 5, forked.to_dict())
    assert launch.main(smoke, ["--local", *args]) == 0, capsys.readouterr().err
    assert started == ["local"]


def test_a_finished_job_says_so_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], started: list[str]
) -> None:
    smoke = load_job_spec("smoke")
    job = apply_overrides(smoke, [*SYNTHETIC, f"checkpoint.storage={tmp_path}"])
    url = commit(tmp_path, job, 10, job.to_dict())
    # free and recipe changes alike: nothing is left to train (a recipe change is said)
    args = [*SYNTHETIC, f"checkpoint.storage={tmp_path}", "data.num_workers=3", "optim.lr=0.5"]
    assert launch.main(smoke, ["--local", *args]) == 0
    out = capsys.readouterr().out
    assert f"job smoke already finished at step 10; its run: {url}" in out
    assert "its recipe changes (optim.lr null -> 0.5) would apply to no step" in out
    assert started == []
    # a changed net is still refused: it is another experiment
    assert launch.main(smoke, ["--local", *args, "model.name=cifar_resnet32"]) == 2
    assert "model.name cifar_resnet20 -> cifar_resnet32" in capsys.readouterr().err
    assert started == []


# --------------------------------------------------------------- the real path, end to end


def test_a_resubmitted_job_through_the_real_path(
    stack: Stack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tracked --local job in this process; resubmitted finished (exit 0, its run's page),
    with another net (exit 2), with another lr (exit 2, then accepted with --allow-change,
    recorded in its MLflow run before the one more step trains)."""
    from mlflow import MlflowClient

    import orchestrator.publish.finished

    # what a finished job's driver publishes has tests of its own (test_publish): 10 s a run
    monkeypatch.setattr(orchestrator.publish.finished, "publish_finished_job", lambda spec: None)

    smoke, name, exp = (
        load_job_spec("smoke"),
        f"rc-{uuid.uuid4().hex[:8]}",
        f"rc-{uuid.uuid4().hex[:8]}",
    )
    tracked = [t for t in TINY if not t.startswith("tracking.")]
    base = [
        "--local",
        f"name={name}",
        f"checkpoint.storage={tmp_path}",
        *tracked,
        f"tracking.experiment={exp}",
        "scaling.num_workers=1",
        "scaling.global_batch=8",
        "schedule.max_iters=2",
        "checkpoint.every_iters=2",
    ]
    assert launch.main(smoke, base) == 0, capsys.readouterr().err
    capsys.readouterr()

    assert launch.main(smoke, base) == 0
    out = capsys.readouterr().out
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name(exp).experiment_id])[0]
    page = f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert f"job {name} already finished at step 2; its run: http" in out and page in out, out

    assert launch.main(smoke, [*base, "model.name=cifar_resnet32"]) == 2
    err = capsys.readouterr().err
    assert "model.name cifar_resnet20 -> cifar_resnet32: changes the net" in err
    assert f"name={name}-2 --resume-from {tmp_path}/{name}/checkpoints/step-00000002" in err

    longer = [*base, "optim.lr=0.05", "schedule.max_iters=3"]
    assert launch.main(smoke, longer) == 2
    assert "--allow-change optim.lr,schedule.max_iters;" in capsys.readouterr().err

    with caplog.at_level(logging.WARNING):
        assert launch.main(smoke, [*longer, "--allow-change", "optim.lr,schedule.max_iters"]) == 0
    assert "resumes from step 2 with a changed recipe (--allow-change): optim.lr null -> 0.05" in (
        caplog.text
    )
    assert f"recorded in MLflow run {run.info.run_id}" in caplog.text
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["resume/optim.lr"] == "null -> 0.05 (step 2)"
    assert tags["resume/schedule.max_iters"] == "2 -> 3 (step 2)"
    record = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "resume/step-00000002.json", str(tmp_path))
        ).read_text()
    )
    assert record["changes"]["optim.lr"] == {"before": None, "after": 0.05}
    latest = CheckpointStore(f"{tmp_path}/{name}/checkpoints").latest()
    assert latest is not None and latest.step == 3  # the one more step trained
    assert latest.spec is not None and latest.spec["optim"]["lr"] == 0.05  # recorded as data
    assert compare(latest.spec, apply_overrides(smoke, longer[1:]).to_dict()) == []
