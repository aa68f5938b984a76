"""A trial's follow-ups (models, report, Fig. 7) run in the study's driver after Tune ends the
trial, not in the trial's slot: the pieces, in process. The path itself runs in
tests/test_study.py's small study (every trial's Fig. 7 logged, nothing measured late)."""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any

import pytest

from orchestrator.study import run
from orchestrator.study.grid import Study, grid
from tests.conftest import load_job_spec


def a_config(job: str = "s-cifar_resnet20-s0") -> dict[str, Any]:
    base = load_job_spec("cifar10_resnet")
    study = Study("s", base, grid({"model.name": ["cifar_resnet20"]}))
    spec = study.trials()[0].spec
    assert spec.name == job
    return {"spec": spec.to_dict(), "cwd": "."}


def test_follow_ups_run_beside_each_other_and_skip_finished_trials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ran: list[str] = []
    both = threading.Barrier(2, timeout=5)  # both follow-ups run at once, or this times out

    def fake_follow_up(spec: Any) -> dict[str, float]:
        ran.append(spec.name)
        both.wait()
        return {"t_publish": 0.5, "t_fig7": 0.25}

    monkeypatch.setattr(run, "follow_up", fake_follow_up)
    follow_ups = run.FollowUps(2)
    config = a_config()
    other = {**config, "spec": {**config["spec"], "name": "s-cifar_resnet20-s1"}}
    follow_ups.start(config, {"skipped": 0})
    follow_ups.start(config, {"skipped": 0})  # Tune's callback and the fallback: once
    follow_ups.start(other, None)
    follow_ups.start({**config, "spec": {**config["spec"], "name": "x"}}, {"skipped": 1})
    t0 = time.perf_counter()
    done, waited = follow_ups.wait()
    assert sorted(ran) == ["s-cifar_resnet20-s0", "s-cifar_resnet20-s1"]
    assert done["s-cifar_resnet20-s0"] == {"t_publish": 0.5, "t_fig7": 0.25}
    assert 0 <= waited <= time.perf_counter() - t0 + 1e-6


def test_tunes_pickled_callback_is_inert() -> None:
    """Tune writes its callbacks into its experiment state: the pool must not go with them, and
    a restored copy starts nothing (run_on_tune starts a restored Tuner's follow-ups)."""
    follow_ups = run.FollowUps(1)
    from ray import cloudpickle  # here, not at collection: see conftest's pytest_configure

    copy = pickle.loads(cloudpickle.dumps(follow_ups.tune_callback()))
    restored = pickle.loads(cloudpickle.dumps(follow_ups))
    restored.start(a_config(), {"skipped": 0})
    assert restored.pending == {} and copy is not None
    assert follow_ups.wait() == ({}, pytest.approx(0, abs=1))


def test_the_phase_lines_name_every_phase(capsys: pytest.CaptureFixture[str]) -> None:
    outcomes = [
        run.Outcome("a", True, wall_s=3.0, phases={"t_fit": 3.0, "t_publish": 1.0}),
        run.Outcome("b", True, wall_s=5.0, phases={"t_fit": 5.0, "t_publish": 2.0}),
        run.Outcome("c", True, skipped=True),
    ]
    run._say_timing(outcomes, 20.0, 1.5, 1)
    out = capsys.readouterr().out
    assert "study timing: Tune wall 21.5 s (of which 1.5 s waiting" in out
    assert "2 trials ran, their jobs' own time 8.0 s in all, up to 1 at once" in out
    assert "job (lease, workers, loop) 4.00, models + report (driver) 1.50" in out
