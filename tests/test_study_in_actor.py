"""A one-worker trial trains in its Tune actor (orchestrator.study.in_actor): the pieces, in
process. The path itself runs in tests/test_study.py: the small study (every trial in its
actor), the SIGKILL test (Tune's restart of a lost actor, the lease taken back, a failure no
restart fixes tried once) and the Ray Train study (study.trial_runner=ray_train)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from orchestrator import job_lease
from orchestrator.spec import JobSpec, SpecError, apply_overrides
from orchestrator.study import in_actor, run
from orchestrator.study.grid import Study, apply_study_overrides, grid
from tests.conftest import load_job_spec


def one_worker(*overrides: str) -> JobSpec:
    base = load_job_spec("cifar10_resnet")  # 2 workers in the job file
    return apply_overrides(base, ["scaling.num_workers=1", *overrides])


def test_only_a_fixed_single_worker_trains_in_its_actor() -> None:
    assert in_actor.trains_in_actor(one_worker(), "auto")
    assert not in_actor.trains_in_actor(one_worker(), "ray_train")
    assert not in_actor.trains_in_actor(one_worker("scaling.num_workers=2"), "auto")
    assert not in_actor.trains_in_actor(one_worker("scaling.num_workers=[1,2]"), "auto")


def test_tunes_restarts_are_the_in_actor_trials_budget() -> None:
    one, two = one_worker("scaling.max_failures=2"), one_worker("scaling.num_workers=2")
    assert in_actor.tune_max_failures([one, two], "auto") == 2
    assert in_actor.tune_max_failures([one, one_worker("scaling.max_failures=-1")], "auto") == -1
    # none in an actor: Ray Train restarts the workers, a trial that still fails is reported
    assert in_actor.tune_max_failures([two], "auto") == 0
    assert in_actor.tune_max_failures([one], "ray_train") == 0


def test_an_in_actor_trial_reserves_its_worker() -> None:
    spec = one_worker("scaling.cpus_per_worker=1.5")
    config = {"spec": spec.to_dict(), "trial_runner": "auto", "cluster_gpus": 8}
    (bundle,) = run.trial_request(config).bundles
    assert bundle == {**run.TRIAL_DRIVER, "CPU": 1.5, "GPU": 1}
    (bundle,) = run.trial_request({**config, "trial_runner": "ray_train"}).bundles
    assert bundle == run.TRIAL_DRIVER  # its Ray Train workers hold the rest


def test_the_runner_is_said_once_and_checked() -> None:
    base = one_worker("scaling.max_preemption_failures=3")
    study = Study("s", base, grid({"model.name": ["cifar_resnet20", "cifar_plain20"]}))
    line = run._runner_line(study, study.trials())
    assert "2 of 2 trials (one worker each) train in their Tune actors" in line
    assert "study.trial_runner=ray_train" in line and "max_preemption_failures" in line
    ray_train = apply_study_overrides(study, ["study.trial_runner=ray_train"])
    assert run._runner_line(ray_train, ray_train.trials()) == ""
    with pytest.raises(SpecError, match=r"study.trial_runner='fast': give one of auto, ray_train"):
        apply_study_overrides(study, ["study.trial_runner=fast"])
    # a restored Tune trial keeps its config: another runner is another Tune experiment
    _, auto_name, _ = run.tune_experiment(study, "f")
    _, other_name, _ = run.tune_experiment(ray_train, "f")
    assert auto_name != other_name


def test_a_drained_node_is_this_actors_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray._private.state

    asked: list[int] = []
    draining: dict[str, int] = {}

    def get_draining_nodes() -> dict[str, int]:
        asked.append(1)
        return dict(draining)

    monkeypatch.setattr(ray._private.state.state, "get_draining_nodes", get_draining_nodes)
    drains = in_actor.NodeDrains("mine", every_s=0.0)
    assert drains() is None
    draining["other"] = 123  # another node's drain is not this trial's
    assert drains() is None
    draining["mine"] = 456_000
    assert drains() == in_actor.Drain(456_000, {"mine": [0]})
    draining["mine"] = 0  # Ray's "no deadline"
    assert drains() == in_actor.Drain(None, {"mine": [0]})
    slow = in_actor.NodeDrains("mine", every_s=3600)
    slow(), slow(), slow()
    assert len(asked) == 4 + 1  # at most one GCS call per every_s


def test_only_this_ray_jobs_earlier_attempt_gives_its_lease_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A trial Tune restarts takes its job's lease back from its lost attempt (same Ray job,
    same cluster); anyone else still finds it held."""
    spec = dataclasses.replace(
        one_worker(), checkpoint=dataclasses.replace(one_worker().checkpoint, storage=str(tmp_path))
    )
    owner: dict[str, Any] = {"host": "h", "pid": 1, "ray_job": "01000000", "ray_cluster": "c1"}
    monkeypatch.setattr(job_lease, "this_owner", lambda: dict(owner))
    job_lease.job_lease(spec, retake_own_ray_job=True)  # the first attempt, then its actor dies
    with pytest.raises(job_lease.LeaseHeld):  # a driver that is not a restarted trial
        job_lease.job_lease(spec)
    for other in ({"ray_job": "02000000"}, {"ray_cluster": "c2"}):  # ids repeat across clusters
        monkeypatch.setattr(job_lease, "this_owner", lambda other=other: {**owner, **other})
        with pytest.raises(job_lease.LeaseHeld):
            job_lease.job_lease(spec, retake_own_ray_job=True)
    monkeypatch.setattr(job_lease, "this_owner", lambda: {"host": "h", "pid": 2})  # not on Ray
    with pytest.raises(job_lease.LeaseHeld):
        job_lease.job_lease(spec, retake_own_ray_job=True)
    monkeypatch.setattr(job_lease, "this_owner", lambda: dict(owner))
    again = job_lease.job_lease(spec, retake_own_ray_job=True)  # the restarted attempt
    assert again._still_mine()
