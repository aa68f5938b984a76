"""The paper's ensemble as jobs/ensemble_eval.py declares it: members chosen by model and rank
(`--ranked MODEL#RANK`) among an experiment's runs, missing ones refused by name (or, with
--allow-missing, left out out loud), and a report that names the set of every number.

The ranking runs against the test stack's real MLflow, with runs shaped like training runs
(tags, params) whose committed checkpoints are tiny files in a local folder: no training."""

from __future__ import annotations

import runpy
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from orchestrator.checkpoint import CheckpointStore
from orchestrator.ensemble_eval import (
    EnsembleConfig,
    EnsembleError,
    Member,
    Scores,
    argv_of,
    parse_args,
)
from orchestrator.ensemble_eval.config import parse_ranked
from orchestrator.ensemble_eval.members import resolve_members
from orchestrator.paper.comparison import ensemble_markdown, ensemble_rows
from orchestrator.spec import JobSpec, ModelConfig
from orchestrator.stack import Stack
from orchestrator.tracking.tags import JOB_TAG, MODEL_TAG

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the declaration


def test_the_job_file_declares_six_models_two_of_them_152_layer() -> None:
    config: EnsembleConfig = runpy.run_path(str(ROOT / "jobs" / "ensemble_eval.py"))["CONFIG"]
    models = [parse_ranked(entry) for entry in config.ranked]
    assert len(models) == 6 and len({m for m, _ in models}) == 5  # six, of different depth
    assert [r for m, r in models if m == "resnet152"] == [1, 2]  # "only two 152-layer ones"
    assert config.experiment == "imagenet" and "FINISHED" in config.filter
    assert config.weights is None and not config.allow_missing
    assert (config.eval.protocol, config.eval.scales) == ("multiscale", [224, 256, 384, 480, 640])
    assert parse_args(argv_of(config)) == config  # the job as a command line, and back


def test_ranked_entries_and_flags_are_checked() -> None:
    assert parse_ranked("resnet34") == ("resnet34", 1)
    assert parse_ranked("resnet152#2") == ("resnet152", 2)
    for bad in ("resnet152#0", "resnet152#two", "#2"):
        with pytest.raises(EnsembleError, match="expected MODEL or MODEL#RANK"):
            parse_ranked(bad)
    with pytest.raises(EnsembleError, match="--ranked needs --experiment"):
        parse_args(["--ranked", "resnet50"])
    cfg = parse_args(
        ["--experiment", "e", "--ranked", "resnet50", "resnet152#2", "--allow-missing"]
        + ["--checkpoint-url", "/a/checkpoints", "--checkpoint-url", "s3://b/c/checkpoints"]
        + ["--output-dir", "out"]
    )
    assert cfg.ranked == ["resnet50", "resnet152#2"] and cfg.allow_missing
    assert cfg.checkpoint_urls == ["/a/checkpoints", "s3://b/c/checkpoints"]
    assert parse_args(argv_of(cfg)) == cfg
    # a member flag replaces a job file's whole selection, --ranked included
    assert parse_args(["--checkpoint-url", "/x/checkpoints"], cfg).ranked == []


def _member(name: str, model: str) -> Member:
    return Member(name, "run", name, name, "-", 1, {}, model, {}, None, 1000, None, 0)


def test_the_report_names_every_set_and_puts_no_gap_to_the_test_set() -> None:
    members = [_member("a", "resnet152"), _member("b", "resnet101")]
    scores = [Scores(0.20, 0.050, 50_000), Scores(0.21, 0.055, 50_000)]
    on = "the 'val' split of s3://resnet/datasets/imagenet"
    rows = ensemble_rows(
        members, scores, Scores(0.19, 0.040, 50_000), "multiscale", evaluated_on=on
    )
    assert [r["set"] for r in rows] == [on] * 3
    assert [r["paper_set"] for r in rows] == [
        "ImageNet val",
        "ImageNet val",
        "ImageNet test (server)",
    ]
    assert rows[-1]["paper_top5_err"] == 3.57 and rows[-1]["comparable"] is False
    table = ensemble_markdown(rows, "title")
    [ensemble] = [line for line in table.splitlines() if line.startswith("| ensemble (2)")]
    assert "| 4.00 | - | 3.57 | - | n/a: other set |" in ensemble
    assert ensemble.endswith("| ImageNet test (server) |")
    assert "| +0.62 | +0.51 | Table 4, multiscale | ImageNet val |" in table  # members: a gap
    assert "Table 5's ensemble (3.57% top-5) is the ImageNet test set" in table
    assert on in table


# ----------------------------------------------------------------------------- against MLflow


def _run(
    client: MlflowClient, exp: str, root: Path, model: str, err: float | None, finished: bool = True
) -> str:
    """A training run's shape in MLflow (tags, params) and, unless err is None, a committed
    checkpoint in a local folder whose marker says it validated at `err`."""
    job = f"{model}-{uuid.uuid4().hex[:6]}"
    tags = {JOB_TAG: job, MODEL_TAG: model}
    run_id = client.create_run(exp, run_name=job, tags=tags).info.run_id
    client.log_param(run_id, "checkpoint.storage", str(root))
    if err is not None:
        store = CheckpointStore(f"{root}/{job}/checkpoints")
        spec = JobSpec(name=job, model=ModelConfig(name=model))
        state = {"spec": spec.to_dict(), "strategy": {"model": {"fc.weight": torch.zeros(1000, 2)}}}
        store.write(10, "trainer.pt", state)
        store.commit(10, {"val/top1_err": err})
    if finished:
        client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def ranked_runs(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    client = MlflowClient()
    name = f"ranked-{uuid.uuid4().hex[:8]}"
    exp = client.create_experiment(name)
    root = tmp_path_factory.mktemp("ranked")
    ids = {
        "r34_worse": _run(client, exp, root, "resnet34", 0.30),
        "r34_best": _run(client, exp, root, "resnet34", 0.25),
        "r152_second": _run(client, exp, root, "resnet152", 0.21),
        "r152_best": _run(client, exp, root, "resnet152", 0.20),
        "r152_third": _run(client, exp, root, "resnet152", 0.23),
        "r152_unranked": _run(client, exp, root, "resnet152", None),  # no checkpoint
        "r152_running": _run(client, exp, root, "resnet152", 0.10, finished=False),
    }
    return {"client": client, "experiment": name, "ids": ids}


def _config(experiment: str, *ranked: str, allow_missing: bool = False) -> EnsembleConfig:
    return EnsembleConfig(
        experiment=experiment,
        filter="attributes.status = 'FINISHED'",
        ranked=list(ranked),
        allow_missing=allow_missing,
    ).validate()


def test_members_are_chosen_by_model_and_rank(
    ranked_runs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    ids, exp = ranked_runs["ids"], ranked_runs["experiment"]
    cfg = _config(exp, "resnet34", "resnet152#1", "resnet152#2")
    members = resolve_members(ranked_runs["client"], cfg)
    assert [m.run_id for m in members] == [ids["r34_best"], ids["r152_best"], ids["r152_second"]]
    assert members[2].selected_by.startswith("resnet152 #2 by its best val/top1_err")
    assert members[0].marker_metrics["val/top1_err"] == 0.25
    # the run without a checkpoint is left out out loud; the running one is filtered out
    assert ids["r152_unranked"] in caplog.text and "is left out" in caplog.text
    assert ids["r152_running"] not in {m.run_id for m in members}


def test_missing_members_are_refused_by_name_or_left_out_out_loud(
    ranked_runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    client, exp = ranked_runs["client"], ranked_runs["experiment"]
    declared = ("resnet34", "resnet101", "resnet152#1", "resnet152#4")
    with pytest.raises(EnsembleError) as refused:
        resolve_members(client, _config(exp, *declared))
    text = str(refused.value)
    assert "resnet101 (0 ranked resnet101 run(s))" in text
    assert "resnet152#4 (3 ranked resnet152 run(s))" in text
    assert "--allow-missing to evaluate the 2 that exist" in text
    members = resolve_members(client, _config(exp, *declared, allow_missing=True))
    assert [m.model_name for m in members] == ["resnet34", "resnet152"]
    out = capsys.readouterr().out
    assert "--allow-missing: evaluating 2 of 4 declared" in out and "resnet101" in out
