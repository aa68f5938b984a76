"""A study's --allow-change (orchestrator.study.allow_change): a field that can never apply is
refused before any trial; each trial is allowed the named fields its own checkpoint differs in;
the dry run and a `--local` study (its trials as subprocess jobs) take it through to each
trial's pre-flight, which refused the changed recipe without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.checkpoint import CheckpointStore
from orchestrator.spec import JobSpec, SpecError
from orchestrator.study import main
from orchestrator.study.allow_change import say_allowance, study_allowance, trial_allowance
from orchestrator.study.grid import Study, apply_study_overrides
from tests.test_study_overrides import load_study
from tests.test_train import TINY

FAST = [o for o in TINY if not o.startswith("model.name=")]  # model.name is the study's axis


def args(storage: Path, *more: str, seeds: int = 2) -> list[str]:
    return [
        "study.cells=cifar_resnet20", f"study.seeds={seeds}", f"checkpoint.storage={storage}",
        "scaling.global_batch=8", "checkpoint.every_iters=2", "schedule.milestones=[]",
        "schedule.max_iters=2", *FAST, *more,
    ]  # fmt: skip


def study(storage: Path, *more: str) -> Study:
    return apply_study_overrides(load_study("cifar10_table6"), args(storage, *more))


def commit(job: JobSpec, step: int, recorded: JobSpec) -> None:
    """A committed checkpoint of `job` recording `recorded`'s spec (the checks read only its
    marker)."""
    store = CheckpointStore(f"{job.checkpoint.storage}/{job.name}/checkpoints")
    store.commit(step, {}, {}, recorded.to_dict())


def test_a_field_no_trial_could_continue_under_is_refused_naming_it(tmp_path: Path) -> None:
    trials = study(tmp_path).trials()
    assert study_allowance(["optim.lr,schedule.max_iters"], trials) == [
        "optim.lr",
        "schedule.max_iters",
    ]
    with pytest.raises(SpecError) as refused:
        study_allowance(["model.name", "data.num_workers", "lr"], trials)
    text = str(refused.value)
    assert "--allow-change model.name: model.name defines the net" in text
    assert "--allow-change data.num_workers: data.num_workers does not change" in text
    assert "--allow-change lr: not a field of the job spec (did you mean optim.lr?)" in text


def test_each_trial_is_allowed_what_its_own_checkpoint_differs_in(tmp_path: Path) -> None:
    before = study(tmp_path, "optim.lr=0.1").trials()
    now = study(tmp_path, "optim.lr=0.2").trials()
    commit(now[0].spec, 2, before[0].spec)  # seed 0: trained under lr 0.1
    commit(now[1].spec, 2, now[1].spec)  # seed 1: has the new value already
    fields = ["optim.lr", "schedule.max_iters"]
    assert trial_allowance(now[0].spec, fields) == ["optim.lr"]
    assert trial_allowance(now[1].spec, fields) == []
    assert trial_allowance(now[0].spec, []) == []
    said = say_allowance(fields, now)
    assert said is not None and "1 of 2 trials continue their checkpoints" in said
    assert say_allowance([], now) is None


def test_the_dry_run_refuses_a_changed_recipe_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [first, _] = study(tmp_path, "optim.lr=0.1").trials()
    commit(first.spec, 1, first.spec)  # before its last step: a resubmission resumes it
    changed = [*args(tmp_path, "optim.lr=0.2"), "--dry-run"]
    assert main(load_study("cifar10_table6"), changed) == 2
    err = capsys.readouterr().err
    assert "optim.lr 0.1 -> 0.2" in err and "add --allow-change optim.lr" in err, err
    assert main(load_study("cifar10_table6"), [*changed, "--allow-change", "optim.lr"]) == 0
    assert "pre-flight ok for every cell" in capsys.readouterr().out
    refused = main(load_study("cifar10_table6"), [*changed, "--allow-change", "model.name"])
    assert refused == 2 and "--allow-change model.name" in capsys.readouterr().err


def test_a_local_study_trains_longer_with_allow_change(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The real path: trials as `--local` subprocess jobs. Two steps, then four, resumed at
    step 2 under the allowed change (without it the trial's pre-flight refuses, as the dry
    run above shows)."""
    assert main(load_study("cifar10_table6"), args(tmp_path, "--local", seeds=1)) == 0
    longer = args(tmp_path, "--local", "schedule.max_iters=4", seeds=1)
    capfd.readouterr()
    code = main(load_study("cifar10_table6"), [*longer, "--allow-change", "schedule.max_iters"])
    out = capfd.readouterr()
    assert code == 0, out.err[-3000:]
    assert "1 of 1 trials continue their checkpoints" in out.out, out.out
    assert "recipe changed by --allow-change: schedule.max_iters 2 -> 4" in out.out + out.err
    [trial] = apply_study_overrides(load_study("cifar10_table6"), args(tmp_path, seeds=1)).trials()
    latest = CheckpointStore(f"{tmp_path}/{trial.job}/checkpoints").latest()
    assert latest is not None and latest.step == 4
