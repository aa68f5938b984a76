"""Chaos: SIGKILL a training worker at a random moment; the job must finish bit-identical.

    python bench/chaos.py --trials 3   # needs the local stack (python -m orchestrator.stack up)

Each trial submits the smoke job (2 Ray Train workers, DDP over gloo, shards on S3) to the
Ray head, waits for its first committed checkpoint, SIGKILLs one worker process after a random
delay (so mid-epoch, between checkpoints), and lets FailureConfig restart the group from the
latest committed checkpoint. The final weights are compared with an uninterrupted run of the
same spec. Last line: `chaos: K/N identical`.

The harness functions here are also what tests/test_fault_tolerance.py uses.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.checkpoint import CheckpointStore

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
    return CheckpointStore(f"{storage}/{name}/checkpoints")


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


def trial(
    common: list[str], storage: str, baseline: dict[str, torch.Tensor], rng: random.Random
) -> bool:
    """One run with a worker SIGKILLed at a random moment after the first commit."""
    name = f"chaos-{uuid.uuid4().hex[:8]}"
    job = submit([f"name={name}", *common])
    st = store(storage, name)
    step = wait_for_checkpoint(st, 4, job)
    rank = rng.randrange(2)
    time.sleep(rng.uniform(0.0, 4.0))  # land between checkpoints, mid-epoch
    pid = worker_pid(st, step, rank)
    os.kill(pid, signal.SIGKILL)
    print(f"{name}: SIGKILLed rank {rank} (pid {pid}) after checkpoint step {step}", flush=True)
    status = wait(job)
    ok = status == "SUCCEEDED" and identical(final_weights(st), baseline)
    print(f"{name}: {status}, weights {'identical' if ok else 'DIFFERENT'}", flush=True)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument(
        "--dataset",
        default="s3://resnet/datasets/smoke",
        help="shards to train on (make demo / datasets/imagenet.py writes them)",
    )
    parser.add_argument("--storage", default="s3://resnet/runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if "RAY_ADDRESS" not in os.environ:
        sys.exit(
            "the local stack is not in the environment: run "
            '`eval "$(python -m orchestrator.stack env)"`'
        )
    common = [
        f"data.url={args.dataset}",
        f"checkpoint.storage={args.storage}",
        "tracking.enabled=false",
        *CHAOS_SPEC,
    ]
    base = f"chaos-base-{uuid.uuid4().hex[:8]}"
    job = submit([f"name={base}", *common])
    assert wait(job) == "SUCCEEDED", logs(job)[-3000:]
    baseline = final_weights(store(args.storage, base))
    rng = random.Random(args.seed)
    results = [trial(common, args.storage, baseline, rng) for _ in range(args.trials)]
    print(f"chaos: {sum(results)}/{len(results)} identical")


if __name__ == "__main__":
    main()
