"""Overhead of the whole stack: our job through `ray job submit` vs a plain PyTorch loop.

    python bench/overhead.py [--steps 60]   # needs the local stack: make up

Same model (cifar_resnet20), same batch (128), same in-memory data (one batch made once and
reused), same thread count, on CPU; measured side by side in one run. Ours: the steady-state
step time the job logs (median over log windows, the first excluded), and the time from submit
to the first finished step, tracked to the stack's MLflow as a user's job is. Before it, where
the seconds to the first step go: the driver's and rank 0's start-up lines
(orchestrator/startup_clock.py) joined on one clock, and what one MLflow call costs. Beside
it, Ray's own floor: a bare TorchTrainer (bench/ray_floor.py), from submit to its train
function's first line, submitted just before ours and just after. The one after is the floor:
like ours, it comes right after another job; the one before comes after a pause (the previous
run's plain loop, or a fresh stack), and the first of two jobs submitted back to back often
starts seconds slower here, whether the pause before it was 2 s or 30 s. Last line:
`overhead: ratio=R (ray X steps/s, plain Y steps/s, first step after Z s, Ray's floor F s)`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from chaos import logs, submit, wait
from chaos_cluster import client
from ray_floor import parse as parse_floor

from orchestrator.models import create_model


def plain_loop(steps: int, threads: int) -> float:
    """The baseline: the shortest honest PyTorch training loop. Returns steps/s."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("cifar_resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times[5:])


def ours(steps: int, threads: int) -> tuple[float, float]:
    """Our job through the Ray head; returns (steps/s, seconds from submit to first step)."""
    name = f"overhead-{uuid.uuid4().hex[:8]}"
    t_submit = time.time()
    job = submit(
        [
            f"name={name}",
            "data.source=synthetic",
            "data.image_size=32",
            "data.synthetic_classes=10",
            "data.pca_lighting=0",
            "scaling.num_workers=1",
            "scaling.global_batch=128",
            f"scaling.cpus_per_worker={threads}",
            f"scaling.torch_threads={threads}",
            f"schedule.max_iters={steps}",
            "tracking.log_every=10",
            "tracking.experiment=overhead-bench",
            "eval.every_iters=0",
            "eval.at_end=false",
            "checkpoint.every_iters=0",
            "checkpoint.at_epoch_end=false",
            "checkpoint.storage=/tmp/overhead-bench",
        ]
    )
    status = wait(job)
    text = logs(job)
    assert status == "SUCCEEDED", text[-3000:]
    t_first = print_breakdown(text, t_submit)
    # the progress lines' images/s per log window (metrics_window.progress_line) / batch 128
    windows = [float(m) / 128 for m in re.findall(r"step \d+ of \d+ .*? ([\d.]+) img/s", text)]
    assert len(windows) >= 3, f"no step timings in the job log:\n{text[-3000:]}"
    return statistics.median(windows[2:]), t_first - t_submit  # skip step 1 and warm-up


MIN_STEPS = 30  # the job logs every 10 steps and step 1: 4 windows, the first two dropped
CLOCK = re.compile(
    r"startup of (?P<who>[^:]+): t0=(?P<t0>[\d.]+); (?P<phases>.*) = (?P<total>[\d.]+) s"
)


def ray_floor(threads: int) -> tuple[float, float]:
    """A bare TorchTrainer through the same head: (submit -> its driver, submit -> its train
    function's first line), seconds."""
    t_submit = time.time()
    job = client().submit_job(entrypoint=f"python bench/ray_floor.py --cpus {threads}")
    status = wait(job)
    text = logs(job)
    assert status == "SUCCEEDED", text[-3000:]
    driver, first = parse_floor(text)
    return driver - t_submit, first - t_submit


def print_breakdown(text: str, t_submit: float) -> float:
    """Print submit -> first step phase by phase, from the job's two start-up lines; returns
    the absolute time of the first finished step."""
    lines = {m["who"]: m for m in CLOCK.finditer(text)}
    assert {"the driver", "rank 0"} <= set(lines), f"no start-up lines in the log:\n{text[-3000:]}"
    rows: list[tuple[str, float]] = []
    driver, rank0 = lines["the driver"], lines["rank 0"]
    rows.append(("submit -> driver process (Ray's job supervisor)", float(driver["t0"]) - t_submit))
    rows += [("driver: " + name, float(sec)) for name, sec in _phases(driver["phases"])]
    driver_end = float(driver["t0"]) + float(driver["total"])
    rows.append(("Ray Train: controller and worker group", float(rank0["t0"]) - driver_end))
    rows += [("rank 0: " + name, float(sec)) for name, sec in _phases(rank0["phases"])]
    t_first = float(rank0["t0"]) + float(rank0["total"])
    print("submit -> first step, phase by phase:")
    for name, sec in rows:
        print(f"  {name:<52} {sec:6.2f} s")
    print(f"  {'total':<52} {t_first - t_submit:6.2f} s")
    return t_first


def _phases(text: str) -> list[tuple[str, str]]:
    return re.findall(r"([^,]+?) ([\d.]+) s(?:, |$)", text)


def mlflow_call_cost(calls: int = 20) -> str:
    """One authenticated MLflow REST call against the stack's server vs its unauthenticated
    /health: what each call of the start-up path costs, and how much of it is the server's."""
    import mlflow

    client = mlflow.MlflowClient()
    uri = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    import requests

    def median_ms(call) -> float:
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    authed = median_ms(lambda: client.get_experiment_by_name("overhead-bench"))
    health = median_ms(lambda: requests.get(f"{uri}/health", timeout=10).raise_for_status())
    return (
        f"an MLflow call (get-experiment, authenticated) {authed:.1f} ms, /health (no auth) "
        f"{health:.1f} ms: median of {calls}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.steps < MIN_STEPS:  # found after the job, not before: refuse it up front
        parser.error(
            f"--steps {args.steps}: at least {MIN_STEPS} (the steady-state rate is the median "
            "of the job's logged 10-step windows after its first two)"
        )
    if "RAY_ADDRESS" not in os.environ:
        sys.exit(
            "the local stack is not in the environment: run "
            '`eval "$(python -m orchestrator.stack env)"`'
        )
    paused = ray_floor(args.threads)  # also what makes ours come right after a job
    ray_rate, first = ours(args.steps, args.threads)
    driver, floor = ray_floor(args.threads)
    print(
        "Ray's floor, a bare TorchTrainer (bench/ray_floor.py) right after ours: submit -> its "
        f"driver {driver:.2f} s, -> its train function {floor:.2f} s; ours above it "
        f"{first - floor:.2f} s (the same just before ours, after a pause: {paused[0]:.2f} s, "
        f"{paused[1]:.2f} s)"
    )
    print(mlflow_call_cost())
    plain_rate = plain_loop(args.steps, args.threads)
    print(f"threads={args.threads} batch=128 model=cifar_resnet20 steps={args.steps}")
    print(
        f"overhead: ratio={ray_rate / plain_rate:.3f} (ray {ray_rate:.2f} steps/s, "
        f"plain {plain_rate:.2f} steps/s, first step after {first:.1f} s, Ray's floor "
        f"{floor:.1f} s)"
    )


if __name__ == "__main__":
    main()
