"""A study's command-line overrides, in process (no stack, no Ray): an override of an axis,
of seed or of the trials' parent run is refused at once (exit 2) naming study.cells= /
study.seeds=; every other override reaches every trial; name= renames the study."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from orchestrator.spec import SpecError
from orchestrator.study import main
from orchestrator.study.grid import Study, apply_study_overrides, grid
from orchestrator.tracking.tags import STUDY_TAG
from tests.conftest import ROOT, load_job_spec


def load_study(stem: str) -> Study:
    """A shipped study file's STUDY (jobs/STEM.py), imported as `python jobs/STEM.py` would."""
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        found = importlib.util.spec_from_file_location(stem, ROOT / "jobs" / f"{stem}.py")
        assert found is not None and found.loader is not None
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)
        return module.STUDY
    finally:
        sys.path.remove(str(ROOT / "jobs"))


@pytest.mark.parametrize(
    ("stem", "override", "way"),
    [
        ("cifar10_table6", "model.name=cifar_resnet56", "study.cells=cifar_resnet56"),
        ("imagenet_table3", "model.shortcut=C", "study.cells=resnet34-C"),
        ("imagenet_table2", "model.shortcut=B", "study.cells=LABEL"),  # no cell has B
        ("imagenet_table2", 'model={"name": "resnet50"}', "study.cells=LABEL"),  # the section
        ("cifar10_table6", "seed=7", "study.seeds=N"),
        ("cifar10_table6", "tracking.parent_run_id=abc", "its own parent run"),
    ],
)
def test_an_override_the_study_would_drop_exits_2_naming_the_way(
    stem: str, override: str, way: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(load_study(stem), [override, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {override}: ") and way in err, err


def test_every_other_override_reaches_every_trial() -> None:
    """One override per section, on the real Table 6 (its recipe rule included): each
    trial's resolved spec holds each value."""
    study = load_study("cifar10_table6")
    given = {
        "optim.lr": 0.05,
        "optim.weight_decay": 0.0002,
        "schedule.max_iters": 123,
        "schedule.warmup_iters": 7,  # the deep nets' warm-up rule keeps a chosen warm-up
        "scaling.num_workers": 3,
        "scaling.global_batch": 96,
        "data.url": "s3://b/cifar",
        "data.shuffle_buffer": 17,
        "checkpoint.every_iters": 11,
        "checkpoint.storage": "s3://b/runs",
        "tracking.experiment": "mine",
        "eval.every_iters": 13,
    }
    items = [f"{k}={v}" for k, v in given.items()] + ['tracking.tags={"team": "vision"}']
    trials = apply_study_overrides(study, items).trials(parent_run_id="p")
    assert len(trials) == 10 * 5
    for t in trials:
        flat = t.spec.flat()
        assert {k: flat[k] for k in given} == given, t.job
        assert t.spec.tracking.tags["team"] == "vision" and t.spec.tracking.parent_run_id == "p"
    assert {t.spec.model.name for t in trials} == {c["model.name"] for c in study.cells}


def test_a_recipe_rule_that_would_change_an_override_is_refused() -> None:
    """Table 6's warm-up rule sets warmup_factor=0.1 on ResNet-110 and -1202 unless a warm-up
    is chosen: warmup_factor alone would reach 8 cells and be overwritten in two."""
    study = apply_study_overrides(load_study("cifar10_table6"), ["schedule.warmup_factor=0.5"])
    with pytest.raises(SpecError, match=r"paper_warmup\) sets schedule.warmup_factor to 0.1"):
        study.trials()
    fine = apply_study_overrides(study, ["study.cells=cifar_resnet20,cifar_plain20"])
    assert {t.spec.schedule.warmup_factor for t in fine.trials()} == {0.5}


@pytest.mark.parametrize("rename", ["name=foo", "study.name=foo"])
def test_name_renames_the_study_its_trials_and_its_parent(rename: str) -> None:
    base = load_job_spec("cifar10_resnet")
    study = Study("s", base, grid({"model.name": ["cifar_resnet20", "cifar_plain20"]}), 2)
    renamed = apply_study_overrides(study, [rename, "optim.lr=0.2"])
    assert renamed.name == "foo" and renamed.base.name == "foo"
    trials = renamed.trials()
    assert [t.job for t in trials] == [
        "foo-cifar_resnet20-s0",
        "foo-cifar_resnet20-s1",
        "foo-cifar_plain20-s0",
        "foo-cifar_plain20-s1",
    ]
    # the parent run is found by this tag (study.parent.find_parent), the trials carry it
    assert {t.spec.tracking.tags[STUDY_TAG] for t in trials} == {"foo"}
    assert renamed.fingerprint() != apply_study_overrides(study, ["optim.lr=0.2"]).fingerprint()
    with pytest.raises(SpecError, match="given twice"):
        apply_study_overrides(study, ["name=foo", "study.name=bar"])
    with pytest.raises(SpecError, match="study.name='a b'"):
        apply_study_overrides(study, ["name=a b"])


def test_a_resubmission_names_the_finished_trials_whose_settings_changed() -> None:
    """A trial that finished before is not run again; where its run trained with other settings
    than the resubmitted study's, the summary names it with the keys (tracking.* aside)."""
    from orchestrator.study.cli import changed_since
    from orchestrator.study.results import TrialResult
    from orchestrator.tracking.redaction import redact

    base = load_job_spec("cifar10_resnet")
    study = Study("s", base, grid({"model.name": ["cifar_resnet20", "cifar_plain20"]}))
    before = study.trials()
    now = apply_study_overrides(study, ["optim.lr=0.2", "tracking.experiment=other"]).trials()
    results = [
        TrialResult(t, "r", "FINISHED", params=redact(old.spec.flat()))
        for t, old in zip(now, before)
    ]
    jobs = [t.job for t in now]
    assert changed_since(results, jobs) == [
        "s-cifar_resnet20-s0 (optim.lr 0.1 -> 0.2)",
        "s-cifar_plain20-s0 (optim.lr 0.1 -> 0.2)",
    ]
    assert changed_since(results, jobs[1:]) == ["s-cifar_plain20-s0 (optim.lr 0.1 -> 0.2)"]
    same = [TrialResult(t, "r", "FINISHED", params=redact(t.spec.flat())) for t in before]
    assert changed_since(same, jobs) == []


def test_a_tracked_study_without_a_tracking_uri_is_refused_before_any_trial(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused once, by the study (exit 2), not by each trial's pre-flight; and overrides may
    follow a flag, as on a job's command line."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["study.cells=cifar_resnet20", "--local", "optim.lr=0.2"]
    code = main(load_study("cifar10_table6"), argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "needs MLFLOW_TRACKING_URI" in err and "tracking.enabled=false" in err, err
