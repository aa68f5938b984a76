"""A job file's --help lists its sections and keys with the job file's values (not the
dataclasses' defaults), one line per key, and says how an override is written."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from orchestrator.cli import keys_help
from orchestrator.launch import parse_args
from orchestrator.spec import JobSpec, OptimConfig, ScheduleConfig, TrackingConfig
from tests.conftest import ROOT


def _help(spec: JobSpec, capsys: pytest.CaptureFixture[str], adjusted: bool = False) -> str:
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"], spec, adjusted)
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_key_with_the_job_files_value(capsys: pytest.CaptureFixture[str]) -> None:
    spec = JobSpec(
        name="tiny",
        optim=OptimConfig(lr=0.05, momentum_form="caffe"),
        schedule=ScheduleConfig(max_iters=123, milestones=[60, 90]),
        tracking=TrackingConfig(experiment="exp", tags={"team": "vision"}),
    )
    out = _help(spec, capsys)
    assert "Run job tiny" in out and "section.key=VALUE" in out and "--dry-run" in out
    lines = out.split("keys, with this job file's values:\n", 1)[1].splitlines()
    for key, value in {
        "name": "tiny",
        "optim.lr": "0.05",
        "optim.momentum_form": "caffe",
        "schedule.max_iters": "123",
        "schedule.milestones": "[60, 90]",
        "tracking.tags": '{"team": "vision"}',
        "checkpoint.resume_from": "null",
        "model.name": JobSpec(name="x").model.name,  # the dataclass default where unset
    }.items():
        assert [ln for ln in lines if re.fullmatch(rf"  {re.escape(key)} +{re.escape(value)}", ln)]
    # every key once, under its section's heading
    flat = spec.flat()
    flat.pop("tracking.tags.team")
    flat["tracking.tags"] = spec.tracking.tags
    keys = [ln.split()[0] for ln in lines if re.match(r"  [a-z_]+(\.[a-z_0-9]+)* ", ln)]
    assert sorted(k for k in keys if k in flat) == sorted(flat)
    sections = [f.name for f in dataclasses.fields(JobSpec) if f.name not in ("name", "seed")]
    assert [ln[:-1] for ln in lines if re.fullmatch(r"[a-z]+:", ln)] == sections
    assert "adjusts the spec after the overrides" in _help(spec, capsys, adjusted=True)


def test_long_values_stay_on_one_line() -> None:
    spec = JobSpec(name="t", tracking=TrackingConfig(tags={f"k{i}": "v" * 9 for i in range(20)}))
    [line] = [ln for ln in keys_help(spec, "keys:").splitlines() if "tracking.tags" in ln]
    assert line.endswith("...") and len(line) < 120


def test_a_job_files_help_from_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, "jobs/cifar10_resnet.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert re.search(r"\n  optim\.momentum_form +caffe\n", out)  # the job file's, not pytorch
    assert re.search(r"\n  schedule\.max_iters +64000\n", out)
    assert "its docstring says how" in out  # cifar10_resnet adjusts ResNet-110's warm-up


def test_a_study_files_help_lists_its_recipe_and_the_keys_its_cells_set(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from orchestrator.study.cli import parse_args as study_args
    from orchestrator.study.grid import Study, grid

    base = JobSpec(name="t6", optim=OptimConfig(momentum_form="caffe"))
    study = Study(name="t6", base=base, cells=grid({"model.name": ["cifar_resnet20"]}), seeds=3)
    with pytest.raises(SystemExit):
        study_args(["--help"], study)
    out = capsys.readouterr().out
    assert re.search(r"\n  optim\.momentum_form +caffe\n", out)
    assert "--dry-run prints the grid" in out
    assert out.rstrip().endswith(": model.name; seeds 0..2 (study.seeds=N)")
