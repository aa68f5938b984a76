"""What a training run prints: one progress line per log interval on rank 0 (step of total,
loss, lr, images/s, data wait, ETA from the recent windows' pace, the validation errors where
validated), every figure only at DEBUG, and a last line with the run's best validation error
and its address."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from orchestrator.checkpoint import CheckpointStore
from orchestrator.metrics_window import MetricsWindow, duration, final_line, progress_line
from orchestrator.runtime import Runtime
from orchestrator.spec import apply_overrides
from orchestrator.tracking.runs import WORKFLOW_PARAM
from orchestrator.train import Trainer
from tests.conftest import load_job_spec, odd_shards_data
from tests.test_train import TINY

TRAIN = {
    "train/loss": 2.345678,
    "train/lr": 0.1,
    "system/images_per_s": 5310.4,
    "system/data_wait_frac": 0.024,
}


def test_the_progress_line() -> None:
    line = progress_line(1200, 64000, TRAIN, 11_520.0)
    assert line == (
        "step 1200 of 64000 (1.9%): loss 2.3457, lr 0.1, 5310 img/s, data wait 2%, ETA 3h12m"
    )
    gpu = {**TRAIN, "system/images_per_s": 12.345, "system/gpu_mem_gib": 12.06}
    assert progress_line(5, 10, gpu, None) == (
        "step 5 of 10 (50.0%): loss 2.3457, lr 0.1, 12.3 img/s, data wait 2%, "
        "GPU mem 12.1 GiB, ETA --"
    )
    val = {"val/top1_err": 0.524, "val/top5_err": 0.182, "val/loss": 1.9}
    assert progress_line(2000, 64000, val, 60.0) == (
        "step 2000 of 64000 (3.1%): val top-1 err 52.40%, top-5 err 18.20%"
    )
    both = progress_line(64000, 64000, {**TRAIN, **val}, 0.0)
    assert (
        both is not None
        and "ETA" not in both
        and both.endswith("; val top-1 err 52.40%, top-5 err 18.20%")
    )
    assert progress_line(7, 10, {"system/checkpoint_stall_s": 0.2}, 1.0) is None
    assert [duration(s) for s in (0.4, 42, 725, 11_520, 183_600)] == [
        "0s", "42s", "12m05s", "3h12m", "2d03h"
    ]  # fmt: skip


def test_the_eta_follows_the_recent_windows_not_the_start_up() -> None:
    import torch

    window = MetricsWindow(torch.device("cpu"))
    assert window.eta_s(100) is None

    def read(steps: int, seconds: float) -> None:
        window.add(torch.tensor(1.0), torch.tensor([1.0, 1.0]), 4)
        window.steps, window.t0 = steps, window.t0 - seconds
        window.read(world_size=1)

    read(1, 30.0)  # the first step: start-up (loader workers, compiling) and the step
    assert window.eta_s(100) == pytest.approx(3000, rel=0.01)  # all it knows yet
    read(10, 2.0)  # from the second window on the start-up no longer counts
    assert window.eta_s(100) == pytest.approx(20, rel=0.01)
    for _ in range(5):
        read(10, 1.0)  # a faster pace: the five newest windows
    assert window.eta_s(100) == pytest.approx(10, rel=0.01)


def test_the_final_line() -> None:
    url = "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert final_line("r110", 64000, "val/top1_err", (0.0643, 60000), url) == (
        f"job r110 finished at step 64000: best val/top1_err 6.43% (step 60000); run: {url}"
    )
    assert final_line("s", 6, "val/loss", (1.23456, 4), "/c").endswith(
        "val/loss 1.235 (step 4); run: /c"
    )
    assert "no val/top1_err was measured" in final_line("s", 6, "val/top1_err", None, "/c")


def _train(tmp_path: Path, caplog: pytest.LogCaptureFixture, *overrides: str) -> list[str]:
    spec = apply_overrides(
        load_job_spec("smoke"),
        [*TINY, f"checkpoint.storage={tmp_path}", "scaling.num_workers=1",
         "scaling.global_batch=4", "scaling.torch_threads=1", *overrides],
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="orchestrator.train"):
        Trainer(spec, Runtime()).fit()
    return [r.getMessage() for r in caplog.records if r.name == "orchestrator.train"]


def test_a_local_run_prints_one_line_per_log_step_and_a_final_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = _train(tmp_path, caplog, "name=prog", "schedule.max_iters=6", "tracking.log_every=2")
    steps = [ln for ln in lines if re.match(r"step \d+ of 6 ", ln)]
    assert [int(ln.split()[1]) for ln in steps] == [1, 2, 4, 6]
    rate = r"loss [\d.]+, lr [\d.e-]+, [\d.]+ img/s, data wait \d+%"
    assert re.fullmatch(rf"step 1 of 6 \(16\.7%\): {rate}, ETA \d+s", steps[0])
    assert re.fullmatch(rf"step 4 of 6 \(66\.7%\): {rate}, ETA \d+s", steps[2])
    assert "ETA" not in steps[-1]  # done
    assert not [ln for ln in lines if "train/loss=" in ln], "every figure is DEBUG's, not INFO's"
    assert lines[-1] == (
        "job prog finished at step 6: no val/top1_err was measured (eval off, or synthetic "
        f"data); run: {tmp_path}/prog/checkpoints"
    )


def test_validation_in_the_line_and_the_best_error_at_the_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, odd_local_shards: Path
) -> None:
    lines = _train(
        tmp_path,
        caplog,
        "name=prog-val",
        *odd_shards_data(odd_local_shards),
        "schedule.max_iters=4",
        "tracking.log_every=2",
        "eval.every_iters=2",
        "checkpoint.every_iters=0",
    )
    validated = [ln for ln in lines if "val top-1 err" in ln]
    assert [ln.split()[1] for ln in validated] == ["2", "4"]
    assert re.search(r"ETA \d+s; val top-1 err [\d.]+%, top-5 err [\d.]+%$", validated[0])
    found = CheckpointStore(f"{tmp_path}/prog-val/checkpoints").committed()
    # the last step was validated before its checkpoint: its marker keeps the figure
    assert [c.step for c in found] == [4] and "val/top1_err" in found[-1].metrics
    err = found[-1].metrics["val/top1_err"]
    assert lines[-1] == (
        f"job prog-val finished at step 4: best val/top1_err {err:.2%} (step 4); "
        f"run: {tmp_path}/prog-val/checkpoints"
    )


def test_a_tracked_runs_last_line_is_its_mlflow_page(
    stack: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import os
    import uuid

    from mlflow import MlflowClient

    experiment = f"progress-{uuid.uuid4().hex[:8]}"
    lines = _train(
        tmp_path,
        caplog,
        "name=prog-tracked",
        "schedule.max_iters=2",
        "tracking.log_every=1",
        "tracking.enabled=true",
        f"tracking.experiment={experiment}",
    )
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    [run] = client.search_runs([exp.experiment_id])
    uri = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    page = f"{uri}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}?{WORKFLOW_PARAM}"
    assert lines[-1].startswith("job prog-tracked finished at step 2: ")
    assert lines[-1].endswith(f"; run: {page}")
