"""Studies through the real local stack: `ray job submit -- python jobs/cifar10_table6.py`
runs a small grid (ResNet-20 and plain-32 x 2 seeds, a few steps each, generated
CIFAR-layout data) on Ray Tune; one parent run with the trials nested under it; the table with
mean +- std; a resubmitted study reruns nothing; a trial whose worker is SIGKILLed resumes; a
trial whose spec fails stops alone and is named."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from orchestrator.paper.layer_responses import CSV_ARTIFACT, PLOT_ARTIFACT
from orchestrator.stack import Stack
from orchestrator.study.grid import Study, apply_study_overrides
from orchestrator.study.grid import grid as study_grid
from orchestrator.tracking.tags import CELL_TAG, ROLE_TAG, STUDY_TAG
from tests.conftest import (
    ROOT,
    STUDY_CELLS,
    load_job_spec,
    submit_study,
    tiny_study_args,
)

CELLS = STUDY_CELLS


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def parent_and_children(experiment: str, study: str) -> tuple:
    c = client()
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], f"tags.`{STUDY_TAG}` = '{study}'", max_results=100)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "study"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


TUNE_RESULT_FILES = ("result.json", "progress.csv", "params.json", "params.pkl")


def tune_experiment_files(study: str) -> list[str]:
    """The keys of a study's Tune experiment (its state and its trials' folders), on the test
    stack's S3 under the default checkpoint storage."""
    from orchestrator import s3

    pages = (
        s3.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket="resnet", Prefix=f"runs/studies/{study}-")
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def artifact_text(run_id: str, path: str) -> str:
    import mlflow.artifacts

    return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")


# ----------------------------------------------------------------------------- unit


def test_grid_names_every_trial_from_study_cell_and_seed() -> None:
    base = load_job_spec("cifar10_resnet")
    study = Study("s", base, study_grid({"model.name": ["cifar_resnet20", "cifar_plain20"]}), 3)
    ten = apply_study_overrides(study, ["schedule.max_iters=10"])
    trials = ten.trials(parent_run_id="p")
    assert [t.job for t in trials][:4] == [
        "s-cifar_resnet20-s0",
        "s-cifar_resnet20-s1",
        "s-cifar_resnet20-s2",
        "s-cifar_plain20-s0",
    ]
    assert {t.spec.seed for t in trials} == {0, 1, 2}
    assert all(t.spec.schedule.max_iters == 10 for t in trials)
    assert trials[3].spec.model.name == "cifar_plain20"
    assert trials[0].spec.tracking.parent_run_id == "p"
    assert trials[0].spec.tracking.tags == {STUDY_TAG: "s", CELL_TAG: "cifar_resnet20"}
    # the fingerprint follows the grid and the overrides, not the parent run
    again = apply_study_overrides(study, ["schedule.max_iters=10"])
    assert ten.fingerprint() == again.fingerprint()
    assert ten.fingerprint() != study.fingerprint()
    assert len(study_grid({"a.b": [1, 2], "c.d": ["x", "y", "z"]})) == 6


def test_study_overrides_and_their_errors() -> None:
    from orchestrator.spec import SpecError

    base = load_job_spec("cifar10_resnet")
    study = Study("s", base, study_grid({"model.name": ["cifar_resnet20", "cifar_resnet32"]}))
    changed = apply_study_overrides(
        study, ["study.seeds=4", "study.cells=cifar_resnet32", "optim.lr=0.2"]
    )
    assert changed.seeds == 4 and changed.base.optim.lr == 0.2
    assert all(t.spec.optim.lr == 0.2 for t in changed.trials())
    assert [c.label for c in changed.grid_cells()] == ["cifar_resnet32"]
    with pytest.raises(SpecError, match="no cell"):
        apply_study_overrides(study, ["study.cells=cifar_resnet99"])
    with pytest.raises(SpecError, match="KEY one of"):
        apply_study_overrides(study, ["study.bogus=1"])
    with pytest.raises(SpecError, match="cell 1: model.nope: unknown key"):
        Study("s", base, [{"model.nope": 1}]).trials()  # names the key, via the cell
    with pytest.raises(SpecError, match="seeds come from study.seeds"):
        Study("s", base, [{"seed": 1}]).trials()


def test_the_shipped_study_files_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    """Each shipped study prints its grid and GPU-hours; the pre-flight's dataset refusal (no
    such dataset here) is reported, not raised. name= renames a study (Table 3 here). In
    process (the entry point a study file calls): one torch import, not three."""
    from orchestrator.study import main
    from tests.test_study_overrides import load_study

    for name, cells in (("cifar10_table6", 10), ("imagenet_table2", 4), ("imagenet_table3", 6)):
        rename = ["name=t3b"] if name == "imagenet_table3" else []
        code = main(load_study(name), ["--dry-run", "data.url=/nonexistent", *rename])
        out, err = capsys.readouterr()
        assert code == 2, err  # the dataset is missing: refused
        assert f"{cells} cells x" in out, out
        assert "GPU-hours" in out and "data.url=/nonexistent" in err
        assert "every cell" in err
        if rename:
            assert out.startswith("study t3b (Table 3"), out
            assert "trial jobs: t3b-resnet34-A-s0" in out


def test_table_statistics_over_seeds() -> None:
    from orchestrator.study.results import TrialResult, cell_rows, table_csv

    base = load_job_spec("cifar10_resnet")
    study = Study("s", base, study_grid({"model.name": ["cifar_resnet20", "cifar_plain20"]}), 3)
    trials = study.trials()
    finals = [0.10, 0.12, 0.14, 0.30, 0.40, None]
    results = []
    for t, final in zip(trials, finals):
        hist = {"val/top1_err": [(2, 0.5), (4, final)]} if final is not None else {}
        results.append(TrialResult(t, "r", "FINISHED" if final else "FAILED", "", hist))
    rows = cell_rows(study, results)
    assert rows[0].n == 3 and rows[0].final_mean == pytest.approx(12.0)
    assert rows[0].final_std == pytest.approx(2.0)
    assert rows[0].best_mean == pytest.approx(12.0) and rows[0].paper == 8.75
    assert rows[0].diff == pytest.approx(3.25)
    assert rows[1].n == 2 and rows[1].final_mean == pytest.approx(35.0)
    assert rows[1].failed == ["s-cifar_plain20-s2"] and rows[1].paper is None
    parsed = list(csv.DictReader(io.StringIO(table_csv(rows))))
    assert parsed[0]["final_std"] == "2.0000" and parsed[1]["paper"] == ""
    # trained on 100 classes: CIFAR-10's number is not beside it
    for r in results:
        r.tags["num_classes"] = "100"
    assert cell_rows(study, results)[0].paper is None


def test_the_estimate_honours_the_trials_precision() -> None:
    """fp32 trains at about half bf16's rate on the anchors' GPU: a trial in fp32 is estimated
    at the planner's fp32 anchor (resnet50 has one; resnet34 is scaled from it), not bf16's."""
    from orchestrator.plan import anchors
    from orchestrator.spec import JobSpec, apply_overrides
    from orchestrator.study.estimate import estimate

    def rate(*overrides: str) -> float:
        spec = apply_overrides(JobSpec(name="e"), list(overrides))
        return estimate(spec).img_per_s_per_gpu

    assert rate() == anchors.IMG_PER_S_PER_GPU[("resnet50", "eager")]
    assert rate("scaling.precision=fp32") == anchors.IMG_PER_S_PER_GPU[("resnet50", "fp32")]
    assert rate("model.compile=true") == anchors.IMG_PER_S_PER_GPU[("resnet50", "compiled")]
    bf16, fp32 = rate("model.name=resnet34"), rate("model.name=resnet34", "scaling.precision=fp32")
    ratio = (
        anchors.IMG_PER_S_PER_GPU[("resnet50", "fp32")]
        / anchors.IMG_PER_S_PER_GPU[("resnet50", "eager")]
    )
    assert fp32 == pytest.approx(bf16 * ratio)
    spec = apply_overrides(JobSpec(name="e"), ["scaling.precision=fp32"])
    slow, fast = estimate(spec), estimate(apply_overrides(spec, ["scaling.precision=bf16"]))
    assert slow.gpu_hours > fast.gpu_hours


# ----------------------------------------------------------------------------- the stack


def test_small_study_through_ray_job_submit(small_study: dict) -> None:
    """4 trials (a residual and a plain cell of two depths, 2 seeds each), 2 at a time on Ray
    Tune: all FINISHED, one parent with 4 nested runs and the table; resubmitted, it reruns
    nothing."""
    exp, name, out = small_study["experiment"], small_study["name"], small_study["output"]
    assert "4/4 trials finished" in out, out[-4000:]
    assert "up to 2 at once" in out
    parent, children = parent_and_children(exp, name)
    assert parent.info.status == "FINISHED"
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags[CELL_TAG] for c in children} == set(CELLS.split(","))
    table = artifact_text(parent.info.run_id, "study/table.md")
    assert "| cifar_resnet20 |" in table and "2/2" in table and "±" in table
    assert "8.75" in table  # Table 6's ResNet-20 beside ours
    rows = list(csv.DictReader(io.StringIO(artifact_text(parent.info.run_id, "study/table.csv"))))
    assert len(rows) == 2 and all(r["n"] == "2" and r["final_std"] for r in rows)
    # the table's numbers are the children's: recompute one cell from its runs
    finals = [
        c.data.metrics["val/top1_err"] * 100
        for c in children
        if c.data.tags[CELL_TAG] == "cifar_plain32"
    ]
    row = next(r for r in rows if r["cell"] == "cifar_plain32")
    assert float(row["final_mean"]) == pytest.approx(sum(finals) / 2, abs=1e-3)
    arts = {a.path for a in client().list_artifacts(parent.info.run_id, "study")}
    assert {"study/curves.png", "study/test_error.png", "study/table.md"} <= arts
    metrics = parent.data.metrics
    assert metrics["cell/cifar_resnet20/n"] == 2 and "cell/cifar_plain32/final_err_mean" in metrics
    # Fig. 7: each trial measured its own, the parent drew one net per cell from them
    assert "measured here" not in out, out[-4000:]
    for c in children:
        assert c.data.tags["layer_responses.checkpoint_url"] == c.data.tags["checkpoint_url"]
    # 6n+1 3x3 layers: n = 3 for ResNet-20, 5 for plain-32
    layers = {(c.data.tags[CELL_TAG], c.data.metrics["responses/layers"]) for c in children}
    assert layers == {("cifar_resnet20", 19), ("cifar_plain32", 31)}
    fig7 = list(csv.DictReader(io.StringIO(artifact_text(parent.info.run_id, CSV_ARTIFACT))))
    assert {r["label"] for r in fig7} == {"ResNet-20", "plain-32"}
    assert {r["run_id"] for r in fig7} <= {c.info.run_id for c in children}
    assert PLOT_ARTIFACT in {a.path for a in client().list_artifacts(parent.info.run_id, "plots")}
    ids = {c.info.run_id for c in children}
    # Tune kept its state, and wrote no result files of its own per trial (MLflow has them)
    said = f"study {name}: Tune's own per-trial result files (CSV, JSON, TensorBoard) are off"
    assert said in out, out[-4000:]
    tune_files = tune_experiment_files(name)
    assert any("experiment_state" in k for k in tune_files), tune_files
    assert not [k for k in tune_files if k.endswith(TUNE_RESULT_FILES) or "tfevents" in k]

    again = submit_study("jobs/cifar10_table6.py", *small_study["args"])
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-6000:]
    assert "4/4 trials finished (4 before, not run again)" in out, out[-4000:]
    assert "measured here" not in out  # Fig. 7 read back from the runs, not measured again
    parent2, children2 = parent_and_children(exp, name)
    assert parent2.info.run_id == parent.info.run_id
    assert {c.info.run_id for c in children2} == ids
    # nothing trained again: every run's last step is still 4, and no run got a new attempt
    assert {c.data.tags["orchestrator.attempt"] for c in children2} == {"1"}


def test_a_sigkilled_worker_resumes_and_a_failing_trial_stops_alone(
    stack: Stack, cifar_dataset: str
) -> None:
    """Two cells, each trained in its Tune actor: ResNet-20 (its actor SIGKILLed after its first
    checkpoint) and a cell whose lr makes the loss non-finite (NonFiniteLoss: not retryable).
    Tune restarts the first, which takes its lease back and resumes; the second fails alone,
    once (Tune's restarts of it fail at once), named in the summary and trials.json."""
    from bench import chaos

    exp, name = f"study-{uuid.uuid4().hex[:6]}", f"sk{uuid.uuid4().hex[:6]}"
    args = tiny_study_args(
        cifar_dataset,
        exp,
        name,
        "study.cells=cifar_resnet20,cifar_plain20",
        "schedule.max_iters=8",
        "checkpoint.every_iters=2",
        "scaling.max_failures=2",
        "tracking.publish=false",  # no registered model read here: the driver ends sooner
    )
    ray = Path(sys.executable).with_name("ray")
    # the plain cell gets an lr no net survives through a cell-level override, which a study
    # file can carry: tests/study_with_bad_cell.py, a tiny study of its own, declares it
    proc = subprocess.Popen(
        [
            str(ray),
            "job",
            "submit",
            "--",
            "python",
            str(ROOT / "tests/study_with_bad_cell.py"),
            *args,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    job = f"{name}-cifar_resnet20-s0"
    st = chaos.store("s3://resnet/runs", job)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        latest = st.latest()
        if latest is not None and latest.step >= 2:
            break
        assert proc.poll() is None, proc.stdout.read()[-6000:]
        time.sleep(0.5)
    else:
        pytest.fail("no checkpoint of the trial's job")
    os.kill(chaos.worker_pid(st, latest.step, 0), signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode != 0, out[-6000:]  # a trial failed: the study says so
    assert "1/2 trials finished" in out, out[-6000:]
    assert f"FAILED {name}-cifar_plain20-s0" in out and "NonFiniteLoss" in out
    parent, children = parent_and_children(exp, name)
    states = {c.data.tags[CELL_TAG]: c.info.status for c in children}
    assert states == {"cifar_resnet20": "FINISHED", "cifar_plain20": "FAILED"}
    assert "2 of 2 trials (one worker each) train in their Tune actors" in out, out[-6000:]
    good = next(c for c in children if c.data.tags[CELL_TAG] == "cifar_resnet20")
    assert int(good.data.tags["orchestrator.attempt"]) >= 2  # Tune's restart of the trial
    bad_run = next(c for c in children if c.data.tags[CELL_TAG] == "cifar_plain20")
    assert bad_run.data.tags["orchestrator.attempt"] == "1", out[-6000:]  # trained once
    assert st.latest().step == 8
    trials = json.loads(artifact_text(parent.info.run_id, "study/trials.json"))
    bad = next(t for t in trials if t["cell"] == "cifar_plain20")
    assert bad["status"] == "FAILED" and "NonFiniteLoss" in bad["error"]
    assert parent.info.status == "FAILED"


def test_a_study_under_ray_train(stack: Stack, cifar_dataset: str) -> None:
    """study.trial_runner=ray_train: a one-worker trial runs its job under a Ray Train worker
    group (as a trial of several workers always does), and finishes."""
    exp, name = f"study-{uuid.uuid4().hex[:6]}", f"rt{uuid.uuid4().hex[:6]}"
    args = tiny_study_args(
        cifar_dataset, exp, name, "study.cells=cifar_resnet20", "study.seeds=1",
        "schedule.max_iters=2", "study.trial_runner=ray_train", "tracking.publish=false",
    )  # fmt: skip
    proc = submit_study("jobs/cifar10_table6.py", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "1/1 trials finished" in out, out[-6000:]
    assert "train in their Tune actors" not in out
    assert "RayTrainWorker" in out, out[-6000:]  # the job's worker, Ray Train's actor
    assert "tracking.publish=false: no models registered" in out, out[-6000:]  # the knob reached it
    _, children = parent_and_children(exp, name)
    assert [c.info.status for c in children] == ["FINISHED"]


def test_trials_at_once_follow_the_cluster_and_the_cap() -> None:
    from orchestrator.study.run import concurrency

    base = load_job_spec("cifar10_resnet")  # 2 workers x 1 CPU, a GPU each where there are any
    study = Study("s", base, study_grid({"model.name": ["cifar_resnet20", "cifar_plain20"]}), 4)
    trials = study.trials()
    assert concurrency(study, trials, {"CPU": 8}) == 4  # CPUs only: 2 per trial
    assert concurrency(study, trials, {"CPU": 64, "GPU": 6}) == 3  # 2 GPUs per trial
    assert concurrency(study, trials, {"CPU": 1}) == 1  # never 0: one waits for its workers
    capped = Study("s", base, study.cells, 4, max_concurrent=2)
    assert concurrency(capped, capped.trials(), {"CPU": 64, "GPU": 64}) == 2


def test_workers_take_a_gpu_where_asked_or_where_the_cluster_has_one() -> None:
    """One rule for a job's Ray workers and a study's trials (orchestrator.launch.uses_gpu)."""
    from orchestrator.launch import uses_gpu
    from orchestrator.spec import apply_overrides

    base = load_job_spec("cifar10_resnet")  # scaling.use_gpu unset
    assert uses_gpu(base, {"CPU": 8, "GPU": 2}) and not uses_gpu(base, {"CPU": 8})
    assert not uses_gpu(apply_overrides(base, ["scaling.use_gpu=false"]), {"CPU": 8, "GPU": 2})
    assert uses_gpu(apply_overrides(base, ["scaling.use_gpu=true"]), {"CPU": 8})


def study_in_process(*args: str) -> tuple[int, str]:
    """`python jobs/cifar10_table6.py ARGS` in this process: the entry point the study file calls
    (orchestrator.study.main), in the repository's folder; (exit code, the driver's output). A
    --local study's trials are subprocess jobs all the same: only the driver's interpreter start
    and imports are saved (seconds on the 2-core box)."""
    from orchestrator.study import main
    from tests.test_study_overrides import load_study

    said = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        code = main(load_study("cifar10_table6"), list(args))
    return code, said.getvalue()


@pytest.fixture(scope="module")
def local_study(stack: Stack, cifar_dataset: str) -> dict[str, Any]:
    """One --local study of one ResNet-20 trial, its checkpoint storage given with a trailing
    slash: test_a_local_study reads it, the trailing-slash test resubmits it (one trial trained
    for both). Returns experiment, name, args, output."""
    exp, name = f"study-{uuid.uuid4().hex[:6]}", f"lo{uuid.uuid4().hex[:6]}"
    storage = f"s3://resnet/tests/{uuid.uuid4().hex[:12]}/runs/"
    args = tiny_study_args(
        cifar_dataset, exp, name, "study.cells=cifar_resnet20", "study.seeds=1",
        f"checkpoint.storage={storage}", "--local",
    )  # fmt: skip
    code, out = study_in_process(*args)
    assert code == 0, out[-6000:]
    return {"experiment": exp, "name": name, "args": args, "output": out}


def test_a_local_study_runs_its_trials_one_after_another(local_study: dict[str, Any]) -> None:
    """--local: no Ray; the trial runs as a --local job, nested under the study's parent."""
    exp, name, out = local_study["experiment"], local_study["name"], local_study["output"]
    assert "1/1 trials finished" in out and "Ray Tune" not in out, out[-4000:]
    assert f"trial {name}-cifar_resnet20-s0: running" in out  # run_locally's subprocess job
    parent, children = parent_and_children(exp, name)
    assert parent.info.status == "FINISHED" and len(children) == 1
    assert children[0].info.run_name == f"{name}-cifar_resnet20-s0"
    assert children[0].info.status == "FINISHED"
    assert "| cifar_resnet20 |" in artifact_text(parent.info.run_id, "study/table.md")


def test_a_resubmitted_study_with_a_trailing_slash_in_its_storage_reruns_nothing(
    local_study: dict[str, Any],
) -> None:
    """checkpoint.storage=PREFIX/ (a trailing slash): the trial writes under PREFIX/JOB/..., and
    a resubmitted study must look there too (once it looked under PREFIX//JOB/..., another S3
    prefix, found nothing and trained the finished trial again)."""
    name, first = local_study["name"], local_study["output"]
    assert any(
        a.startswith("checkpoint.storage=") and a.endswith("/runs/") for a in local_study["args"]
    )
    assert "1/1 trials finished" in first and "before, not run again" not in first
    code, again = study_in_process(*local_study["args"])
    assert code == 0, again[-6000:]
    assert f"trial {name}-cifar_resnet20-s0: finished before, not run again" in again, again
    assert "1/1 trials finished (1 before, not run again)" in again, again[-4000:]
