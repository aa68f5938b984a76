"""MLflow tracking: one run per job across restarts, secrets kept out, the paper beside the run,
the best checkpoint registered, and a tracking server that goes down mid-run.

Integration tests use the real local MLflow server (the `stack` fixture); the fault test starts
stops and restarts the test stack's MLflow server (and leaves it up).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from orchestrator.paper import numbers as paper
from orchestrator.paper import plots
from orchestrator.paper.comparison import training_csv, training_markdown, training_rows
from orchestrator.publish.finished import publish_finished_job
from orchestrator.spec import JobSpec, apply_overrides, to_yaml
from orchestrator.stack import Stack
from orchestrator.storage import open_storage
from orchestrator.tracking.lineage import manifest_sha256
from orchestrator.tracking.redaction import redact, redact_tags, scrub
from orchestrator.tracking.run_report import metric_history
from orchestrator.tracking.tags import ERROR_TAG, HEARTBEAT_TAG, JOB_TAG, LOST_TAG, STALE_SEEN_TAG
from orchestrator.tracking.tracker import MlflowTracker, NullTracker, start_tracker
from tests.conftest import ROOT, assert_no_secret_in_runs

ARTIFACTS = ROOT / "test-artifacts"


def uid() -> str:
    return uuid.uuid4().hex[:8]


def job_spec(experiment: str, job: str, *overrides: str) -> JobSpec:
    """Job `job`'s spec, tracked in `experiment`, with `overrides` (section.key=value)."""
    return apply_overrides(JobSpec(name=job), [f"tracking.experiment={experiment}", *overrides])


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    found = sorted(client().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in found]


def steps(run_id: str, key: str) -> list[int]:
    return [s for s, _ in history(run_id, key)]


def strictly_increasing(xs: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


def artifact_text(run_id: str, path: str, tmp: Path) -> str:
    return Path(client().download_artifacts(run_id, path, str(tmp))).read_text()


def git_head() -> str | None:
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def train_metrics(step: int, offset: float = 0.0) -> dict[str, float]:
    """The loop's metric names with a learning-curve shape; `offset` marks who logged them."""
    m = {
        "train/loss": 2.0 * math.exp(-step / 12) + offset,
        "train/top1_err": 0.9 * math.exp(-step / 30),
        "train/top5_err": 0.6 * math.exp(-step / 30),
        "train/lr": 0.1,
        "system/images_per_s": 800.0,
        "system/data_wait_frac": 0.05,
        "train/epoch": float(step // 8),
    }
    if step % 5 == 0:
        m["val/top1_err"] = 0.85 * math.exp(-step / 40)
        m["val/top5_err"] = 0.5 * math.exp(-step / 40)
        m["val/loss"] = 2.1 * math.exp(-step / 14)
    return m


# ----------------------------------------------------------------------------- redaction


def test_scrub_masks_credentials_in_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_API_TOKEN", "tok-1234567890")
    text = (
        "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUt%2FK7MDENG@bucket/d "
        "https://u:p4ss@host/x?X-Amz-Signature=abc123&a=1 id ASIAABCDEFGHIJKLMNOP "
        "env tok-1234567890"
    )
    out = scrub(text)
    for secret in (
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUt",
        "p4ss",
        "abc123",
        "ASIAABCDEFGHIJKLMNOP",
        "tok-1234567890",
    ):
        assert secret not in out
    assert "s3://***@bucket/d" in out and "a=1" in out and "https://***@host/x" in out


def test_redact_masks_params_by_name_or_content(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_API_TOKEN", "tok-1234567890")
    params = {
        "data.url": "s3://bucket/x",
        "db.password": "hunter22",
        "tracking.note": "tok-1234567890",
        "optim.lr": 0.1,
        "model.shortcut": None,
    }
    assert redact(params) == {
        "data.url": "s3://bucket/x",
        "db.password": "***",
        "tracking.note": "***",
        "optim.lr": "0.1",
        "model.shortcut": "None",
    }


def test_redact_tags_scrubs_values_and_drops_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    tags = {"dataset": "s3://k:s@b/d", "error": "401 with hf_abcdefgh", "gone": None}
    assert redact_tags(tags) == {"dataset": "s3://***@b/d", "error": "401 with ***"}


def test_redact_tags_masks_secret_named_tags_whole_as_params() -> None:
    """A tag named like a secret loses its whole value, whatever it holds (a value no pattern
    and no environment variable knows); our own tag names are not secret-named."""
    from orchestrator.tracking import tags as names

    tags = {
        "api_token": "plain-value-1",
        "password": "hunter22",
        "db.secret": "x",
        "signing.key": "abc",
        "model": "resnet50",
        "keyboard": "qwerty",
    }
    assert redact_tags(tags) == {
        "api_token": "***",
        "password": "***",
        "db.secret": "***",
        "signing.key": "***",
        "model": "resnet50",
        "keyboard": "qwerty",
    }
    ours = {v: "kept" for k, v in vars(names).items() if k.endswith("_TAG")}
    assert redact_tags(ours) == ours


def test_log_tags_redacts_all_but_the_exact_keys(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request sets the tags on the run: values scrubbed, None left out, an `exact` key
    (a job's name, how the job finds its run) kept as given."""
    from orchestrator.tracking.redaction import log_tags
    from orchestrator.tracking.runs import experiment_id

    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    c = client()
    run_id = c.create_run(experiment_id(c, f"log-tags-{uuid.uuid4().hex[:8]}")).info.run_id
    job = "job-hf_abcdefgh"  # a name that happens to hold the secret's text
    tags = {JOB_TAG: job, "dataset": "s3://k:s@b/d", "gone": None}
    log_tags(c, run_id, tags, exact=[JOB_TAG])
    got = c.get_run(run_id).data.tags
    assert got[JOB_TAG] == job and got["dataset"] == "s3://***@b/d" and "gone" not in got
    log_tags(c, run_id, {"note": "401 with hf_abcdefgh"})
    assert c.get_run(run_id).data.tags["note"] == "401 with ***"


# ----------------------------------------------------------------------------- paper report


def test_training_comparison_rows_are_percent_beside_the_paper() -> None:
    ref = paper.lookup("resnet34", "ten_crop", "C")
    rows, metrics = training_rows(ref, [(5, 0.30), (10, 0.25), (15, 0.26)], [(15, 0.08)])
    assert [r.name for r in rows] == ["top-1 error (%)", "top-5 error (%)"]
    assert (rows[0].final, rows[0].best, rows[0].paper) == (pytest.approx(26.0), 25.0, 24.19)
    assert metrics == pytest.approx(
        {
            "achieved/top1_err": 26.0,
            "paper/top1_err": 24.19,
            "gap/top1_err": 26.0 - 24.19,
            "achieved/top5_err": 8.0,
            "paper/top5_err": 7.40,
            "gap/top5_err": 8.0 - 7.40,
        }
    )
    md = training_markdown("job", "resnet34", "ten_crop", "C", "s3://b/d", ref, rows, 15)
    assert "| top-1 error (%) | 26.00 | 25.00 | 24.19 | +1.81 |" in md and "Table 3" in md
    [top1, _] = csv.DictReader(io.StringIO(training_csv("resnet34", "ten_crop", ref, rows)))
    assert (top1["this_run_final"], top1["paper"], top1["paper_source"]) == (
        "26.0",
        "24.19",
        "Table 3",
    )


def test_paper_style_plot_thin_train_bold_val(tmp_path: Path) -> None:
    if not plots.available():
        pytest.skip("matplotlib is not installed (the dev extra)")
    train = [(i * 1000, 60 - 30 * (1 - math.exp(-i / 20))) for i in range(1, 61)]
    val = [(i * 5000, 58 - 28 * (1 - math.exp(-i / 4))) for i in range(1, 13)]
    plot = plots.Plot(
        title="ResNet-34: top-1 error",
        ylabel="top-1 error (%)",
        curves=[plots.Curve("resnet34", train, val), plots.Curve("plain34", train[:30], val[:6])],
        references=[plots.Reference("paper: 24.52%", 24.52)],
    )
    fig = plots.figure(plot)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["resnet34: train"].get_linewidth() < lines["resnet34: val"].get_linewidth() / 2
    assert lines["resnet34: train"].get_color() == lines["resnet34: val"].get_color()
    assert lines["resnet34: val"].get_color() != lines["plain34: val"].get_color()
    assert (
        "iterations" in ax.get_xlabel() and "10⁴" in ax.get_xlabel()
    )  # 60k iterations, like Fig. 4
    assert max(lines["resnet34: train"].get_xdata()) == pytest.approx(6.0)
    assert ax.get_ylabel() == "top-1 error (%)" and ax.get_title() == "ResNet-34: top-1 error"
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend >= {"resnet34: train", "plain34: val", "paper: 24.52%"}
    png = plots.render(plot, tmp_path / "x" / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_without_matplotlib_a_finished_run_has_its_table_but_no_plots(
    stack: Stack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert not plots.available()
    spec = job_spec(f"track-{uid()}", f"noplt-{uid()}", "model.name=resnet50", *SYNTHETIC)
    tracker = MlflowTracker(spec, {}, system_metrics_interval_s=None)
    for step in (5, 10):
        tracker.log_metrics(train_metrics(step), step)
    tracker.finish("FINISHED")
    with caplog.at_level(logging.WARNING):
        publish_finished_job(spec)
    assert "matplotlib is not installed" in caplog.text
    assert client().list_artifacts(tracker.run_id, "plots") == []
    assert "resnet50" in artifact_text(tracker.run_id, "paper/comparison.md", tmp_path)
    assert client().get_run(tracker.run_id).info.status == "FINISHED"


# ----------------------------------------------------------------------------- no server


def test_start_tracker_off_without_uri_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert isinstance(start_tracker(job_spec("e", "j"), {}), NullTracker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert isinstance(start_tracker(job_spec("e", "j", "tracking.enabled=false"), {}), NullTracker)


def test_server_unreachable_from_the_start_costs_little_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    tracker = start_tracker(job_spec("e", f"down-{uid()}"), {})
    assert isinstance(tracker, MlflowTracker) and not tracker.opened and tracker.run_id is None
    for step in range(1, 21):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    assert len(tracker.pending) == 20
    tracker.finish_timeout_s = 1.0
    tracker.finish("FINISHED")
    assert time.monotonic() - t0 < 20, "a down server must cost seconds, not minutes"
    assert any(
        "not closed" in r.getMessage() and "20 metrics lost" in r.getMessage()
        for r in caplog.records
    )


# ----------------------------------------------------------------------------- one run per job

SYNTHETIC = ("data.source=synthetic", "data.url=")
R34C = (
    "model.name=resnet34",
    "model.shortcut=C",
    "eval.protocol=ten_crop",
    "optim.lr=0.1",
    "scaling.num_workers=2",
    *SYNTHETIC,
)
R34C_TAGS = {
    "model": "resnet34",
    "strategy": "ddp",
    "world_size": "2",
    "device": "cpu",
    "ray_job_id": "02000000",
    "num_classes": "1000",
}
# the first attempt of a job, in a process of its own that is SIGKILLed after logging
KILLED_ATTEMPT = """
import json, os, signal, sys, time
from orchestrator.spec import JobSpec, from_dict
from orchestrator.tracking.tracker import MlflowTracker

a = json.loads(sys.argv[1])
tracker = MlflowTracker(from_dict(JobSpec, a["spec"]), a["tags"], system_metrics_interval_s=0.5)
for step, metrics in a["metrics"]:
    tracker.log_metrics(metrics, step)
time.sleep(2.0)  # a few system-metric samples
print(tracker.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no finish(), the run stays RUNNING
"""


def hard_killed_attempt(spec: JobSpec, metrics: list[tuple[int, dict]]) -> str:
    """Run a job's first attempt in a subprocess and kill it hard; returns its MLflow run id."""
    args = {"spec": spec.to_dict(), "tags": R34C_TAGS, "metrics": metrics}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_ATTEMPT, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    return proc.stdout.split()[-1]


@pytest.fixture(scope="module")
def resumed(stack: Stack) -> dict[str, Any]:
    """A ResNet-34 C job hard-killed at step 10 and resubmitted (a new Ray job id) from its
    checkpoint at step 5: steps 6..10 are replayed, then it runs to step 20 and finishes; then
    the driver publishes it (it has no committed checkpoint: the paper report only)."""
    exp, job = f"track-{uid()}", f"r34c-{uid()}"
    spec = job_spec(exp, job, *R34C)
    first = hard_killed_attempt(spec, [(s, train_metrics(s)) for s in range(1, 11)])
    first_status = client().get_run(first).info.status
    first_system_steps = steps(first, "system/cpu_utilization_percentage")
    second = MlflowTracker(
        spec, {**R34C_TAGS, "ray_job_id": "03000000"}, system_metrics_interval_s=0.5
    )
    for step in range(6, 21):
        second.log_metrics(train_metrics(step, offset=0.5), step)
    time.sleep(1.5)
    last = f"s3://resnet/runs/{job}/checkpoints/step-00000020"
    second.finish("FINISHED", checkpoint_url=last)
    closed = client().get_run(second.run_id)
    published = publish_finished_job(spec)
    return {
        "spec": spec,
        "experiment": exp,
        "job": job,
        "first_run_id": first,
        "first_status": first_status,
        "first_system_steps": first_system_steps,
        "run_id": second.run_id,
        "closed": closed,
        "published": published,
        "last": last,
    }


def test_a_resubmitted_job_continues_its_run(resumed: dict[str, Any]) -> None:
    assert resumed["first_status"] == "RUNNING", "a hard kill leaves the run RUNNING"
    assert resumed["run_id"] == resumed["first_run_id"]
    c = client()
    runs = c.search_runs([c.get_experiment_by_name(resumed["experiment"]).experiment_id])
    assert [r.info.run_id for r in runs] == [resumed["run_id"]], "one run per job"
    run = c.get_run(resumed["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == resumed["job"]
    assert run.data.tags["orchestrator.attempt"] == "2"
    assert run.data.tags["ray_job_id"] == "03000000", "the tags are the latest attempt's"


def test_replayed_steps_are_not_logged_again(resumed: dict[str, Any]) -> None:
    loss = history(resumed["run_id"], "train/loss")
    assert [s for s, _ in loss] == list(range(1, 21)), "strictly increasing steps, none twice"
    # steps 6..10 keep the first attempt's values: the replay did not log them again
    expected = [train_metrics(s, offset=0.5 * (s > 10))["train/loss"] for s in range(1, 21)]
    assert [v for _, v in loss] == pytest.approx(expected)
    assert steps(resumed["run_id"], "val/top1_err") == [5, 10, 15, 20]


def test_system_metrics_continue_across_attempts(resumed: dict[str, Any]) -> None:
    first = resumed["first_system_steps"]
    assert first, "the killed attempt logged system metrics"
    sys_steps = steps(resumed["run_id"], "system/cpu_utilization_percentage")
    assert sys_steps[: len(first)] == first and len(sys_steps) >= len(first) + 2
    assert strictly_increasing(sys_steps), sys_steps
    # right after the first attempt's samples, not after the loop's own system/ figures
    # (system/images_per_s, logged at training steps up to 10)
    assert sys_steps[len(first)] == first[-1] + 1, (first, sys_steps)
    assert (
        "system/system_memory_usage_megabytes" in client().get_run(resumed["run_id"]).data.metrics
    )
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"], (
        "the monitor stops at finish"
    )


def test_the_run_records_the_jobs_tags_params_and_spec(
    resumed: dict[str, Any], tmp_path: Path
) -> None:
    run = client().get_run(resumed["run_id"])
    t = run.data.tags
    assert t["orchestrator.job"] == resumed["job"]
    assert (t["model"], t["strategy"], t["world_size"], t["device"]) == (
        "resnet34",
        "ddp",
        "2",
        "cpu",
    )
    assert t.get("git_commit") == git_head()
    assert (
        run.data.params["model.shortcut"] == "C" and run.data.params["scaling.num_workers"] == "2"
    )
    assert artifact_text(resumed["run_id"], "spec.yaml", tmp_path) == to_yaml(resumed["spec"])


def test_a_finished_run_is_compared_with_the_paper(resumed: dict[str, Any], tmp_path: Path) -> None:
    """ResNet-34 C, 10-crop: Table 3's 24.19 / 7.40 (our errors are fractions, the paper's %)."""
    run_id = resumed["run_id"]
    m, t = client().get_run(run_id).data.metrics, client().get_run(run_id).data.tags
    final1 = history(run_id, "val/top1_err")[-1][1] * 100
    final5 = history(run_id, "val/top5_err")[-1][1] * 100
    report = resumed["published"].report
    assert (report["paper/top1_err"], report["paper/top5_err"]) == (24.19, 7.40)
    assert report["achieved/top1_err"] == pytest.approx(final1)
    assert report["achieved/top5_err"] == pytest.approx(final5)
    assert report["gap/top1_err"] == pytest.approx(final1 - 24.19)
    assert report["gap/top5_err"] == pytest.approx(final5 - 7.40)
    # tables, not metrics: a metric each would be a single-dot chart before train/ and val/
    assert not [k for k in m if k.split("/")[0] in ("paper", "achieved", "gap")]
    assert t["paper.source"] == "Table 3"
    md = artifact_text(run_id, "paper/comparison.md", tmp_path)
    assert "24.19" in md and "7.40" in md and f"{final1:.2f}" in md and "Table 3" in md
    rows = list(
        csv.DictReader(io.StringIO(artifact_text(run_id, "paper/comparison.csv", tmp_path)))
    )
    assert [r["metric"] for r in rows] == ["top-1 error (%)", "top-5 error (%)"]
    assert float(rows[0]["paper"]) == 24.19
    assert float(rows[0]["gap_points"]) == pytest.approx(final1 - 24.19, abs=1e-3)


def test_a_finished_run_plots_its_whole_history(resumed: dict[str, Any], tmp_path: Path) -> None:
    if not plots.available():
        pytest.skip("matplotlib is not installed (the dev extra)")
    out = ARTIFACTS / "tracking-plots"  # kept for a human to look at
    shutil.rmtree(out, ignore_errors=True)
    downloaded = client().download_artifacts(resumed["run_id"], "plots", str(tmp_path))
    shutil.copytree(downloaded, out)
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["loss.png", "top1_error.png", "top5_error.png"]
    for p in pngs:
        assert (out / p).read_bytes()[:4] == b"\x89PNG" and (out / p).stat().st_size > 15_000


def test_the_tracker_logs_and_closes_and_the_driver_publishes(resumed: dict[str, Any]) -> None:
    """At finish the run is closed with its last checkpoint, nothing compared or registered;
    the driver's publishing adds the report afterwards (no checkpoint committed: no model)."""
    closed = resumed["closed"]
    assert closed.info.status == "FINISHED"
    assert closed.data.tags["checkpoint_url"] == resumed["last"]
    assert not [k for k in closed.data.metrics if k.split("/")[0] in ("paper", "achieved", "gap")]
    assert "paper.source" not in closed.data.tags
    published = resumed["published"]
    assert published is not None and published.run_id == resumed["run_id"]
    assert published.models == {} and published.report["paper/top1_err"] == 24.19
    assert client().search_model_versions(f"name='{resumed['job']}'") == []
    assert "job" not in client().get_run(resumed["run_id"]).data.tags, "one job tag, not two"


def test_a_finished_job_submitted_again_reports_nothing_twice(stack: Stack) -> None:
    """The same run again (attempt 2), the comparison at one step; tests/test_publish.py checks
    that the models are not registered twice."""
    spec = job_spec(f"track-{uid()}", f"again-{uid()}", *R34C)
    first = MlflowTracker(spec, R34C_TAGS, system_metrics_interval_s=None)
    for step in (5, 10):
        first.log_metrics(train_metrics(step), step)
    first.finish("FINISHED")
    publish_finished_job(spec)
    again = MlflowTracker(spec, R34C_TAGS, system_metrics_interval_s=None)
    again.finish("FINISHED")
    publish_finished_job(spec)
    assert again.run_id == first.run_id
    assert client().get_run(first.run_id).data.tags["orchestrator.attempt"] == "2"
    rows = client().download_artifacts(first.run_id, "paper/comparison.csv")
    assert len(Path(rows).read_text().splitlines()) == 3, "the table rewritten, not appended to"


def test_run_id_from_the_checkpoint_wins_and_killed_status(stack: Stack) -> None:
    job, exp = f"ckpt-{uid()}", f"track-{uid()}"
    first = MlflowTracker(job_spec(exp, job), {}, system_metrics_interval_s=None)
    first.log_metrics({"train/loss": 1.0}, 1)
    # the same job id found through its checkpoint, even from another experiment setting
    again = MlflowTracker(
        job_spec(f"elsewhere-{uid()}", job), {}, run_id=first.run_id, system_metrics_interval_s=None
    )
    assert again.run_id == first.run_id
    again.log_metrics({"train/loss": 0.5}, 1)  # a replayed step: not logged twice
    again.log_metrics({"train/loss": 0.4}, 2)
    again.finish("KILLED")
    run = client().get_run(first.run_id)
    assert run.info.status == "KILLED" and history(first.run_id, "train/loss") == [
        (1, 1.0),
        (2, 0.4),
    ]
    # a run id this server does not know (another tracking server): the job found by its tag
    moved = MlflowTracker(job_spec(exp, job), {}, run_id="0" * 32, system_metrics_interval_s=None)
    assert moved.run_id == first.run_id
    moved.finish("FINISHED")
    # ... and in an experiment where the job never ran: a new run, tagged with the job
    lost = MlflowTracker(
        job_spec(f"other-{uid()}", job), {}, run_id="0" * 32, system_metrics_interval_s=None
    )
    assert (
        lost.run_id != first.run_id
        and client().get_run(lost.run_id).data.tags["orchestrator.job"] == job
    )
    lost.finish("FINISHED")


def test_a_system_monitor_that_cannot_start_is_tried_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow.system_metrics import system_metrics_monitor

    starts = []

    class Broken:
        def __init__(self, *args: object, **kwargs: object) -> None:
            starts.append(1)
            raise RuntimeError("no sensors here")

    monkeypatch.setattr(system_metrics_monitor, "SystemMetricsMonitor", Broken)
    tracker = MlflowTracker(
        job_spec(f"track-{uid()}", f"sysm-{uid()}"), {}, system_metrics_interval_s=5.0
    )
    for step in range(1, 6):  # each delivers a metric: a successful flush
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.finish("FINISHED")
    assert len(starts) == 1 and caplog.text.count("system metrics off: no sensors here") == 1
    assert [v for _, v in history(tracker.run_id, "train/loss")] == [1.0, 0.5, 1 / 3, 0.25, 0.2]


def test_the_loops_manifest_is_the_runs_dataset_without_a_second_read(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop hands over the manifest it read: the tracker records it as is (here for a URL
    where nothing exists, so a read of its own would fail with a warning)."""
    manifest = {
        "name": "given",
        "num_classes": 7,
        "splits": {"train": {"samples": 70, "shards": ["a", "b"]}},
    }
    url = f"s3://resnet/nothing-here-{uid()}"
    caplog.set_level(logging.WARNING)
    tracker = MlflowTracker(
        job_spec(f"track-{uid()}", f"mani-{uid()}", f"data.url={url}", "data.source=shards"),
        {"manifest_sha256": manifest_sha256(manifest)},
        manifest=manifest,
        system_metrics_interval_s=None,
    )
    tracker.finish("FINISHED")
    [item] = client().get_run(tracker.run_id).inputs.dataset_inputs
    assert item.dataset.name == "given" and item.dataset.digest == manifest_sha256(manifest)[:36]
    assert json.loads(item.dataset.profile)["splits"] == {"train": {"samples": 70, "shards": 2}}
    assert (
        "could not read the manifest" not in caplog.text and "manifest changed" not in caplog.text
    )


def test_secrets_never_reach_mlflow_or_the_logs(
    stack: Stack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture,
) -> None:
    aws_secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # the test stack's real S3 secret
    token = f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", token)
    url = (
        "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@resnet/datasets/imagenet"
    )
    secrets = [
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
        aws_secret,
        token,
    ]
    spec = job_spec(f"track-{uid()}", f"secret-{uid()}", f"data.url={url}", "data.source=shards")
    # free text in the spec (params, spec.yaml): a password-named key is tested in test_redact_*
    spec.tracking.tags = {"note": f"pulled with {token}", "other": f"key {aws_secret}"}
    tags = {"dataset": url, "manifest_sha256": "c" * 64, "model": "resnet50"}
    caplog.set_level(logging.INFO)
    tracker = MlflowTracker(spec, tags, system_metrics_interval_s=None)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.log_text(f"debug dump {url} {token}", "notes/debug.txt")
    tracker.finish("FAILED", error=f"DataError: cannot read dataset {url} (key {aws_secret})")

    run = client().get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["data.url"] == "s3://***@resnet/datasets/imagenet"
    assert run.data.params["tracking.tags.note"] == "pulled with ***"
    assert run.data.params["tracking.tags.other"] == "key ***"
    assert "DataError: cannot read dataset s3://***@resnet" in run.data.tags["orchestrator.error"]
    [item] = (
        run.inputs.dataset_inputs
    )  # the input dataset still records the data, minus credentials
    assert item.dataset.digest == "c" * 36
    assert json.loads(item.dataset.source)["uri"] == "s3://***@resnet/datasets/imagenet"
    seen = {
        "params": json.dumps(run.data.params),
        "tags": json.dumps(run.data.tags),
        "spec.yaml": artifact_text(tracker.run_id, "spec.yaml", tmp_path),
        "notes/debug.txt": artifact_text(tracker.run_id, "notes/debug.txt", tmp_path),
        "dataset input": json.dumps([item.dataset.source, item.dataset.name, item.dataset.profile]),
        "log records": "\n".join(r.getMessage() for r in caplog.records),
    }
    out, err = capfd.readouterr()
    seen["stdout"], seen["stderr"] = out, err
    assert (
        "s3://***@resnet" in seen["spec.yaml"]
        and "data.url carries credentials" in seen["log records"]
    )
    for where, text in seen.items():
        for secret in secrets:
            assert secret not in text, f"a secret reached {where}"


# ----------------------------------------------------------------------------- through the loop


def test_training_job_logs_lineage_paper_and_best_checkpoint(
    tracked_smoke_job: dict[str, str], tmp_path: Path
) -> None:
    """jobs/smoke.py --local with tracking on: the loop's own params, tags, metrics; the dataset
    manifest as the run's input; CIFAR ResNet-20 beside Table 6; the best committed checkpoint
    registered under the job's name (tests/test_publish.py loads and serves it)."""
    from orchestrator.data import load_manifest

    job, exp = tracked_smoke_job["job"], tracked_smoke_job["experiment"]
    smoke_dataset, token = tracked_smoke_job["dataset"], tracked_smoke_job["token"]
    output = tracked_smoke_job["output"]
    c = client()
    [run] = c.search_runs([c.get_experiment_by_name(exp).experiment_id])
    secrets = [token, os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["MLFLOW_TRACKING_PASSWORD"]]
    assert_no_secret_in_runs([run.info.run_id], secrets, output)
    run_id, t, m = run.info.run_id, run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert (
        run.data.params["model.name"] == "cifar_resnet20"
        and run.data.params["data.url"] == smoke_dataset
    )
    assert (t["model"], t["strategy"], t["world_size"], t["device"], t["dataset"]) == (
        "cifar_resnet20",
        "ddp",
        "1",
        "cpu",
        smoke_dataset,
    )
    digest = manifest_sha256(load_manifest(smoke_dataset))
    assert t["manifest_sha256"] == digest
    [item] = run.inputs.dataset_inputs
    assert (
        item.dataset.digest == digest[:36]
        and json.loads(item.dataset.source)["uri"] == smoke_dataset
    )
    assert json.loads(item.dataset.profile)["manifest_sha256"] == digest
    # the loop's metrics, under their names
    logged = set(m)
    expected = {
        "train/loss",
        "train/top1_err",
        "train/lr",
        "system/images_per_s",
        "system/data_wait_frac",
        "train/epoch",
        "val/top1_err",
        "system/cpu_utilization_percentage",
    }
    assert expected <= logged, expected - logged
    train_steps = steps(run_id, "train/loss")
    assert (
        strictly_increasing(train_steps) and {2, 4, 6} <= set(train_steps) and train_steps[-1] == 6
    )
    val = metric_history(c, run_id, "val/top1_err")
    assert [s for s, _ in val] == [3, 6]
    # a toy dataset's classes are not CIFAR-10's: the run's result is reported, no paper beside it
    [top1, _] = csv.DictReader(io.StringIO(artifact_text(run_id, "paper/comparison.csv", tmp_path)))
    assert float(top1["this_run_final"]) == pytest.approx(val[-1][1] * 100, abs=1e-3)
    assert not top1["paper"]
    assert t["num_classes"] == str(load_manifest(smoke_dataset)["num_classes"])
    assert {a.path for a in c.list_artifacts(run_id, "plots")} >= {
        "plots/top1_error.png",
        "plots/loss.png",
    }
    out = ARTIFACTS / "loop-plots"  # a real run's curves, for a human to look at
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(c.download_artifacts(run_id, "plots", str(tmp_path / "download")), out)
    version = c.get_model_version_by_alias(job, "best")
    assert version.tags["checkpoint_url"] == t["best_checkpoint_url"] and version.run_id == run_id
    assert version.source.startswith("models:/m-"), "a logged MLflow model, not a bare URL"
    assert t["best_model_version"] == f"{job}/{version.version}"
    assert open_storage(version.tags["checkpoint_url"]).exists("COMMITTED"), (
        "the registered checkpoint is committed"
    )
    last = c.get_model_version_by_alias(job, "last")
    assert last.tags["checkpoint_url"] == t["checkpoint_url"], "@last: the last committed step"
    assert "orchestrator.registration" not in t, t.get("orchestrator.registration")


# ----------------------------------------------------------------------------- faults


@pytest.fixture
def mlflow_restored(stack: Stack):
    """The test stack, with its MLflow server started again whatever the test did to it."""
    yield stack
    if stack.status(("mlflow",))["mlflow"] != "up":
        stack.up(("mlflow",))


def test_tracking_server_down_mid_run(mlflow_restored: Stack) -> None:
    """Stop the server while a tracker logs, start it again: no exception, seconds per step while
    it is down, the backlog delivered when it returns, and what had to be dropped counted."""
    stack = mlflow_restored
    tracker = MlflowTracker(
        job_spec(f"fault-{uid()}", f"fault-{uid()}"),
        {},
        system_metrics_interval_s=0.5,
        max_pending=8,
        max_backoff_s=1.0,
    )
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": 1.0 / step, "lr": 0.1}, step)
    run_id = tracker.run_id
    assert steps(run_id, "train/loss") == [1, 2, 3]

    stack.stop_service("mlflow")
    for step in range(4, 9):  # 10 metrics while down; the queue keeps 8: step 4's two are dropped
        t0 = time.monotonic()
        tracker.log_metrics({"train/loss": 1.0 / step, "lr": 0.1}, step)
        assert time.monotonic() - t0 < 5, "a down server must cost seconds per step, not minutes"
    assert (len(tracker.pending), tracker.dropped, tracker.opened) == (8, 2, True)

    stack.up(("mlflow",))
    back = time.time() * 1000
    deadline = time.monotonic() + 30
    step = 9
    while tracker.pending or step < 11:  # training goes on; the backlog goes out with it
        tracker.log_metrics({"train/loss": 1.0 / step, "lr": 0.1}, step)
        step += 1
        assert time.monotonic() < deadline, (
            f"backlog not delivered: {len(tracker.pending)} metrics left"
        )
        time.sleep(0.5)
    assert steps(run_id, "train/loss") == [1, 2, 3, *range(5, step)], (
        "queued steps flushed after the restart"
    )
    assert client().get_run(run_id).data.tags[LOST_TAG] == "2"
    time.sleep(1.5)  # the system-metrics monitor restarted with the server
    tracker.finish("FINISHED")
    run = client().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[LOST_TAG] == "2"
    sys_hist = client().get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert strictly_increasing([m.step for m in sorted(sys_hist, key=lambda m: m.timestamp)])
    assert any(m.timestamp > back for m in sys_hist), "system metrics resume after the outage"


# ----------------------------------------------------------------------------- liveness


def test_runs_whose_job_died_are_marked_and_live_ones_kept(stack: Stack) -> None:
    """A RUNNING run is closed when its Ray job has ended or its heartbeat is ten minutes old;
    live runs, finished ones, runs without a heartbeat and other tools' runs are left alone."""
    from orchestrator.tracking import liveness

    c = client()
    exp = c.create_experiment(f"liveness-{uid()}")
    now = time.time()

    def run(
        job: str,
        beat: float | None = None,
        ray_job: str = "",
        status: str = "",
        cluster: str = "c1",
    ) -> str:
        tags = {
            JOB_TAG: job,
            **({"ray_job_id": ray_job, "ray_cluster": cluster} if ray_job else {}),
        }
        if beat is not None:
            tags[liveness.HEARTBEAT_TAG] = str(int(beat))
        run_id = c.create_run(exp, tags=tags, run_name=job).info.run_id
        if status:
            c.set_terminated(run_id, status)
        return run_id

    stale = run("stale", now - 1200)
    live = run("live", now - 30)
    gone = run("gone", now - 30, "0a000000")
    stopped = run("stopped", now - 30, "0b000000")
    going = run("going", now - 30, "0c000000")
    elsewhere = run("elsewhere", now - 30, "0a000000", cluster="c2")  # the same id, another cluster
    done = run("done", now - 5000, status="FINISHED")
    unstamped = run("unstamped")  # an older version's run: nothing to judge it by
    foreign = c.create_run(exp).info.run_id
    states = {"0a000000": "FAILED", "0b000000": "STOPPED", "0c000000": "RUNNING"}
    jobs = liveness.RayJobs("c1", states)
    marked = dict(liveness.sweep(c, [exp], jobs=jobs, now=now))
    assert set(marked) == {gone, stopped}, "a stale heartbeat is only noted at a first sweep"
    assert c.get_run(stale).data.tags[STALE_SEEN_TAG] == f"{int(now - 1200)}@{int(now)}"
    early = now + liveness.CONFIRM_S - 1
    assert liveness.sweep(c, [exp], jobs=jobs, now=early) == []
    marked = dict(liveness.sweep(c, [exp], jobs=jobs, now=now + liveness.CONFIRM_S))
    assert set(marked) == {stale}
    status = {r: c.get_run(r).info.status for r in (stale, live, gone, stopped, going, done)}
    assert status == {
        stale: "FAILED",
        live: "RUNNING",
        gone: "FAILED",
        stopped: "KILLED",
        going: "RUNNING",
        done: "FINISHED",
    }
    assert c.get_run(elsewhere).info.status == "RUNNING"
    assert {c.get_run(r).info.status for r in (unstamped, foreign)} == {"RUNNING"}
    assert (
        "no heartbeat for 22 min by the tracking server's clock"
        in (c.get_run(stale).data.tags[ERROR_TAG])
    )
    assert "Ray job 0a000000 ended FAILED" in c.get_run(gone).data.tags[ERROR_TAG]
    assert liveness.sweep(c, [exp], jobs=jobs, now=now + 600) == []  # nothing twice


def test_liveness_never_compares_two_machines_clocks(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat written by a machine whose clock is an hour behind, and a sweep on one an
    hour ahead: the live run is kept (both read the tracking server's clock). A run whose beats
    stopped during an MLflow outage is noted, then kept once its beats resume."""
    from orchestrator.tracking import liveness

    c = client()
    exp = c.create_experiment(f"skew-{uid()}")
    real = time.time
    live = c.create_run(exp, tags={JOB_TAG: "skewed"}).info.run_id
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: real() - 3600)  # the writer's clock
        beat = liveness.Heartbeat(c, live, interval_s=0.2).start()
        deadline = time.monotonic() + 20
        while HEARTBEAT_TAG not in c.get_run(live).data.tags and time.monotonic() < deadline:
            time.sleep(0.1)
        beat.stop()
    assert abs(float(c.get_run(live).data.tags[HEARTBEAT_TAG]) - real()) < 60
    outage = c.create_run(exp, tags={JOB_TAG: "outage"}).info.run_id
    c.set_tag(outage, HEARTBEAT_TAG, str(int(liveness.server_time() - 1500)))  # 25 min unheard
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # the sweeper's clock
    assert liveness.sweep(c, [exp], confirm_s=0) == []
    assert STALE_SEEN_TAG not in c.get_run(live).data.tags
    assert STALE_SEEN_TAG in c.get_run(outage).data.tags  # noted, not marked
    c.set_tag(outage, HEARTBEAT_TAG, str(int(liveness.server_time())))  # the server is back
    assert liveness.sweep(c, [exp], confirm_s=0) == []
    assert {c.get_run(r).info.status for r in (live, outage)} == {"RUNNING"}


def test_tracker_stamps_a_heartbeat_until_it_finishes(stack: Stack) -> None:
    from orchestrator.tracking.tags import HEARTBEAT_TAG

    tracker = MlflowTracker(
        job_spec(f"beat-{uid()}", f"beat-{uid()}"),
        {},
        system_metrics_interval_s=None,
        heartbeat_s=0.3,
    )
    beat = lambda: int(client().get_run(tracker.run_id).data.tags.get(HEARTBEAT_TAG, "0"))
    deadline = time.monotonic() + 20
    first = 0
    while not first and time.monotonic() < deadline:
        first = beat()
        time.sleep(0.2)
    assert abs(first - time.time()) < 60
    while beat() <= first and time.monotonic() < deadline:
        time.sleep(0.3)
    assert beat() > first, "the heartbeat keeps beating"
    tracker.finish("FINISHED")
    last = beat()
    time.sleep(1.6)
    assert beat() == last, "a finished run is not stamped"


def test_a_worker_failing_after_its_job_was_stopped_leaves_the_run_killed(stack: Stack) -> None:
    """`ray job stop`: the driver marks the run KILLED at once; a rank that then dies of the
    teardown (its loader worker gone first) keeps it KILLED, its error noted; a run nobody
    stopped still ends FAILED."""
    stopped = MlflowTracker(
        job_spec(f"track-{uid()}", f"stop-{uid()}"), {}, system_metrics_interval_s=None
    )
    client().set_terminated(stopped.run_id, "KILLED")  # what launch.run_ray's mark_killed does
    stopped.finish("FAILED", error="RuntimeError: DataLoader worker (pid(s) 1) exited")
    run = client().get_run(stopped.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[ERROR_TAG] == (
        "after the job was stopped: RuntimeError: DataLoader worker (pid(s) 1) exited"
    )
    failed = MlflowTracker(
        job_spec(f"track-{uid()}", f"fail-{uid()}"), {}, system_metrics_interval_s=None
    )
    failed.finish("FAILED", error="RuntimeError: boom")
    assert client().get_run(failed.run_id).info.status == "FAILED"
