"""Chaos: kill a part of a running job at a random moment; it must finish bit-identical.

    python -m orchestrator.stack up && eval "$(python -m orchestrator.stack env)"
    python bench/chaos.py --trials 20 [--kinds worker,driver,s3,mlflow] [--dataset URL]

Each trial submits the smoke job (2 Ray Train workers, DDP over gloo, shards on S3, tracked in
MLflow) to the Ray head, waits for its first committed checkpoint, and kills one thing, in turn:
a training worker (SIGKILL: FailureConfig restarts the group from the latest commit), the driver
(SIGKILL, then the same job resubmitted: it resumes), the S3 server while a checkpoint uploads
(stopped 6 s: uploads and reads retry), or the MLflow server (stopped, started again 8 s
later: the tracker queues and catches up; the line says how long it was down, start-up
included). Each run's final weights are compared bit for bit with an uninterrupted run of the
same spec measured first, and its MLflow `train/loss` history must hold every step exactly once
with the uninterrupted run's values. Without --dataset the bench makes its own data (the
project's generator and converter, kept at s3://resnet/datasets/chaos-smoke). Last line:
`chaos: K/N identical (worker a/b, driver c/d, s3 e/f, mlflow g/h)`.

The harness functions here are also what tests/test_fault_tolerance.py uses.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import storage
from orchestrator.checkpoint import CheckpointStore
from orchestrator.checkpoint_refs import job_checkpoints_url

CHAOS_SPEC = [
    "schedule.max_iters=24",
    "checkpoint.every_iters=4",
    "checkpoint.keep_last=10",
    "eval.every_iters=0",
    "eval.at_end=false",
    "tracking.log_every=1",
    "scaling.max_failures=3",
    "data.pca_lighting=0.1",
]


def client():
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(os.environ["RAY_ADDRESS"])


def submit(args: list[str]) -> str:
    """Submit `python jobs/smoke.py ARGS` to the Ray head; returns the submission id."""
    return client().submit_job(
        entrypoint="python jobs/smoke.py " + " ".join(map(shlex.quote, args))
    )


def wait(job_id: str, timeout_s: float = 900) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client().get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status)
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still running after {timeout_s} s")


def logs(job_id: str) -> str:
    return client().get_job_logs(job_id)


def store(storage: str, name: str) -> CheckpointStore:
    return CheckpointStore(job_checkpoints_url(storage, name))


def wait_for_checkpoint(
    st: CheckpointStore, min_step: int, job_id: str, timeout_s: float = 600
) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = st.latest()
        if latest and latest.step >= min_step:
            return latest.step
        if wait_status_terminal(job_id):
            raise RuntimeError(f"job ended before step {min_step}:\n{logs(job_id)[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint at step >= {min_step} in {st.root}")


def wait_status_terminal(job_id: str) -> bool:
    from ray.job_submission import JobStatus

    return client().get_job_status(job_id) in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    )


def worker_pid(st: CheckpointStore, step: int, rank: int) -> int:
    """The pid of a rank's process, as recorded in its own checkpoint file."""
    return int(st.read(step, f"rank-{rank:05d}.pt")["pid"])


def driver_pid(name: str) -> int:
    """The job's driver process (`python jobs/smoke.py ... name=NAME ...`)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if f"name={name}" in cmd and any(c.endswith("jobs/smoke.py") for c in cmd):
            return proc.pid
    raise LookupError(f"no driver process for job {name}")


def final_weights(st: CheckpointStore) -> dict[str, torch.Tensor]:
    latest = st.latest()
    assert latest is not None, f"no committed checkpoint in {st.root}"
    return st.read(latest.step, "trainer.pt")["strategy"]["model"]


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KINDS = ("worker", "driver", "s3", "mlflow")


def metric_steps(experiment: str, name: str, key: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of a job's metric history, in step order (duplicates kept, to be seen)."""
    from mlflow import MlflowClient

    c = MlflowClient()
    exp = c.get_experiment_by_name(experiment)
    (run,) = c.search_runs([exp.experiment_id], filter_string=f"tags.`orchestrator.job` = '{name}'")
    return sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, key))


def _stack() -> Any:
    from orchestrator.stack import Stack, StackConfig

    return Stack(StackConfig.load())


def _during_upload(st: CheckpointStore, job: str, timeout_s: float = 300) -> int:
    """Wait until a checkpoint folder exists without its commit marker (an upload running);
    returns its step."""
    root = storage.open_storage(st.root)
    deadline = time.monotonic() + timeout_s
    committed = {c.step for c in st.committed()}
    while time.monotonic() < deadline:
        for d in root.list_dirs():
            step = int(d.removeprefix("step-")) if d.startswith("step-") else -1
            if step > 0 and step not in committed and not root.exists(f"{d}/COMMITTED"):
                return step
        committed = {c.step for c in st.committed()}
        if wait_status_terminal(job):
            raise RuntimeError("job ended before an upload was caught")
        time.sleep(0.05)
    raise TimeoutError("no checkpoint upload seen")


def trial(
    kind: str, common: list[str], storage_url: str, baseline: tuple, rng: random.Random
) -> tuple[bool, bool]:
    """One run with `kind` killed once after the first commit: a training worker (SIGKILL),
    the driver (SIGKILL, then the job resubmitted), the S3 server while a checkpoint uploads,
    or the MLflow server (stopped, started 8 s later). Returns (weights identical to the
    uninterrupted run, metric history complete: every step once, the same losses)."""
    name = f"chaos-{kind}-{uuid.uuid4().hex[:6]}"
    job = submit([f"name={name}", *common])
    st = store(storage_url, name)
    step = wait_for_checkpoint(st, 4, job)
    if kind == "worker":
        time.sleep(rng.uniform(0.0, 4.0))  # land between checkpoints, mid-epoch
        rank = rng.randrange(2)
        os.kill(worker_pid(st, step, rank), signal.SIGKILL)
        what = f"SIGKILLed rank {rank} after checkpoint step {step}"
    elif kind == "driver":
        time.sleep(rng.uniform(0.0, 4.0))
        os.kill(driver_pid(name), signal.SIGKILL)
        wait(job)
        job = submit([f"name={name}", *common])  # the same name: it resumes
        what = f"SIGKILLed the driver after checkpoint step {step}, resubmitted"
    elif kind == "s3":
        uploading = _during_upload(st, job)
        _stack().stop_service("s3")
        time.sleep(6)
        _stack().up(("s3",))
        what = f"stopped S3 for 6 s while step {uploading} uploaded"
    else:
        time.sleep(rng.uniform(0.0, 3.0))
        t0 = time.monotonic()
        _stack().stop_service("mlflow")
        time.sleep(8)
        _stack().up(("mlflow",))  # returns once it answers again
        what = f"MLflow down {time.monotonic() - t0:.0f} s after checkpoint step {step}"
    status = wait(job)
    weights, history = baseline
    same = status == "SUCCEEDED" and identical(final_weights(st), weights)
    complete = status == "SUCCEEDED" and metric_steps(EXPERIMENT, name) == history
    print(
        f"{name}: {what}; {status}, weights {'identical' if same else 'DIFFERENT'}, "
        f"metric history {'complete' if complete else 'WRONG'}",
        flush=True,
    )
    return same, complete


EXPERIMENT = f"chaos-{uuid.uuid4().hex[:6]}"
BENCH_DATASET = "s3://resnet/datasets/chaos-smoke"


def make_dataset(url: str) -> str:
    """A small learnable ImageNet-layout set (4 classes, 160x120 JPEGs), generated and
    converted by the project's own scripts; kept between runs (its manifest says it is whole)."""
    if storage.open_storage(url).exists("manifest.json"):
        return url
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="chaos-src-") as src:
        for cmd in (
            ["datasets/synthetic.py", "imagenet", "--out", src, "--classes", "4"]
            + ["--train-per-class", "40", "--val-per-class", "10", "--size", "160x120"],
            ["datasets/imagenet.py", "--src", src, "--dest", url, "--shard-size-mb", "0.5"],
        ):
            subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument(
        "--dataset", default="", help=f"shards to train on (default: made at {BENCH_DATASET})"
    )
    parser.add_argument("--storage", default="s3://resnet/runs")
    parser.add_argument("--kinds", default=",".join(KINDS), help="what to kill, in turn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if "RAY_ADDRESS" not in os.environ or "MLFLOW_TRACKING_URI" not in os.environ:
        sys.exit(
            "the local stack is not in the environment: run `python -m orchestrator.stack up` "
            'and `eval "$(python -m orchestrator.stack env)"`'
        )
    # the harness polls checkpoint folders while they upload: each poll would warn about them
    logging.getLogger("orchestrator.checkpoint").setLevel(logging.ERROR)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        sys.exit(f"--kinds: unknown {sorted(unknown)}; choose from {','.join(KINDS)}")
    common = [
        f"data.url={args.dataset or make_dataset(BENCH_DATASET)}",
        f"checkpoint.storage={args.storage}",
        f"tracking.experiment={EXPERIMENT}",
        *CHAOS_SPEC,
    ]
    base = f"chaos-base-{uuid.uuid4().hex[:6]}"
    job = submit([f"name={base}", *common])
    assert wait(job) == "SUCCEEDED", logs(job)[-3000:]
    history = metric_steps(EXPERIMENT, base)
    steps = int(next(a for a in CHAOS_SPEC if a.startswith("schedule.max_iters=")).split("=")[1])
    assert [s for s, _ in history] == list(range(1, steps + 1)), "the baseline logs every step"
    baseline = (final_weights(store(args.storage, base)), history)
    rng = random.Random(args.seed)
    results: dict[str, list[tuple[bool, bool]]] = {k: [] for k in kinds}
    for i in range(args.trials):
        kind = kinds[i % len(kinds)]
        results[kind].append(trial(kind, common, args.storage, baseline, rng))
    flat = [r for rs in results.values() for r in rs]
    matrix = ", ".join(f"{k} {sum(s for s, _ in rs)}/{len(rs)}" for k, rs in results.items())
    print(f"metric history: {sum(c for _, c in flat)}/{len(flat)} complete (every step once)")
    print(f"chaos: {sum(s for s, _ in flat)}/{len(flat)} identical ({matrix})")


if __name__ == "__main__":
    main()
