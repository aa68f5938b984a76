"""Seconds from a job's last training step to the release of its Ray Train worker group.

    python bench/release.py [--runs 3] [--steps 20] [--code DIR]   # needs the local stack: make up

A worker group is released when `fit_on_ray` returns in the job's driver. Measured per job:
from the moment Ray Train's controller receives the workers' report of the last training step
(a callback's clock) to that return (the driver's clock, this script's `--drive` mode; one
machine, one clock; Ray's worker poll is set to 0.2 s, its default 2 s would blur both).
For tracked jobs the MLflow timestamp of the last step's train/loss is a cross-check. Whatever
runs in between holds the workers (and on a cluster their
GPUs): the end-of-run checkpoint commit, the tracker's finish, and in code from before the
driver published, the registration of the models and the paper report. Jobs: jobs/smoke.py's
CIFAR ResNet-20 on a small generated dataset in the stack's S3 (made once), 2 workers,
checkpoints every 10 steps, validation at each.

Baseline in the same run: the same job with tracking off (nothing to register, nothing to
report). Medians over --runs of each. `--code DIR` runs the jobs' drivers and workers on
another checkout (a git worktree of an older commit, e.g.): PYTHONPATH, and the job started
in that folder (Ray puts it first on its workers' sys.path); the output
names the checkout whose orchestrator the drivers imported and the commit the runs recorded.
Last line:
`release: ratio=R (tracked X s, untracked Y s, publishing after the release Z s; code C)`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATASET = "s3://resnet/datasets/release-bench"
STORAGE = "s3://resnet/bench-release"
EXPERIMENT = "bench-release"
# how often Ray Train's controller polls its workers (reports, the end of the group; Ray's
# default is 2 s): the precision of both clocks
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.2


# ---------------------------------------------------------------------------- in the Ray job


def last_step_clock(max_iters: int) -> object:
    """A Ray Train callback (it runs in the controller) that prints when the workers' report of
    step `max_iters`, the last, arrives."""
    from ray.train import UserCallback

    class LastStep(UserCallback):
        def __init__(self) -> None:
            self.seen = False

        def after_report(self, run_context: object, metrics: list, checkpoint: object) -> None:
            if not self.seen and any(m.get("train/step") == max_iters for m in metrics):
                self.seen = True
                print(f"LASTSTEP {time.time():.4f}", flush=True)

    return LastStep()


def drive(code: str, overrides: list[str]) -> None:
    """The job's driver, as launch.run_ray runs it: fit_on_ray, then (where this checkout has
    it) the driver's publishing. Prints when each ended."""
    import runpy

    import orchestrator
    from orchestrator import launch
    from orchestrator.spec import apply_overrides

    base = runpy.run_path(str(Path(code) / "jobs" / "smoke.py"))["SPEC"]
    spec = apply_overrides(base, overrides)
    launch.fit_on_ray(spec, [last_step_clock(spec.schedule.max_iters)])
    released = time.time()
    try:
        from orchestrator.publish.finished import publish_finished_job
    except ImportError:  # an older checkout: its workers published before the release
        publish_finished_job = None
    if publish_finished_job is not None:
        publish_finished_job(spec)
    done = {"released": released, "published": time.time(), "code": orchestrator.__file__}
    print("RELEASE " + json.dumps(done), flush=True)


# ---------------------------------------------------------------------------- the bench


def ensure_dataset() -> None:
    """A small generated dataset (4 classes) in the stack's S3, made the first time."""
    from orchestrator.storage import open_storage

    if open_storage(DATASET).exists("manifest.json"):
        return
    src = Path("/tmp/release-bench-src")
    py = sys.executable
    for cmd in (
        [py, "datasets/synthetic.py", "imagenet", "--out", str(src), "--classes", "4"]
        + ["--train-per-class", "40", "--val-per-class", "10", "--size", "160x120"],
        [py, "datasets/imagenet.py", "--src", str(src), "--dest", DATASET]
        + ["--shard-size-mb", "0.5"],
    ):
        subprocess.run(cmd, cwd=REPO, check=True)


def one_job(code: Path, tracked: bool, steps: int) -> dict[str, float | str]:
    """Submit one job to the stack's Ray head; returns its release and publishing seconds."""
    from ray.job_submission import JobSubmissionClient

    name = f"release-{uuid.uuid4().hex[:8]}"
    overrides = [
        f"name={name}",
        f"data.url={DATASET}",
        f"checkpoint.storage={STORAGE}",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.enabled={str(tracked).lower()}",
        f"schedule.max_iters={steps}",
        "schedule.milestones=[]",
        "eval.every_iters=10",
        "checkpoint.every_iters=10",
        "tracking.log_every=5",
    ]
    here = Path(__file__).resolve()
    entry = [sys.executable, str(here), "--drive", "--code", str(code), *overrides]
    env = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "AWS_", "S3_"))}
    env["PYTHONPATH"] = str(code)
    env[POLL_ENV] = str(POLL_S)
    client = JobSubmissionClient(os.environ["RAY_ADDRESS"])
    # from the checkout's folder: Ray puts the driver's working directory first on its
    # workers' sys.path (before PYTHONPATH), so they import that checkout's orchestrator too
    entrypoint = f"cd {shlex.quote(str(code))} && {shlex.join(entry)}"
    job = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
    deadline = time.monotonic() + 900
    while str(client.get_job_status(job)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {name} still running")
        time.sleep(1)
    text = client.get_job_logs(job)
    found = re.search(r"^RELEASE (\{.*\})$", text, re.MULTILINE)
    last = re.search(r"LASTSTEP ([\d.]+)", text)
    if not (found and last):
        raise RuntimeError(f"job {name}: no timings in its log\n{text[-4000:]}")
    times = json.loads(found.group(1))
    return {
        "release_s": times["released"] - float(last.group(1)),
        "released": times["released"],
        "publish_s": times["published"] - times["released"],
        "code": str(times["code"]),
        "job": name,
    }


def from_the_run(job: dict[str, float | str]) -> tuple[str, float]:
    """A tracked job's MLflow run: the git commit it recorded (its workers' checkout) and, a
    cross-check of the callback's clock, the seconds from the MLflow timestamp of its last
    training step (train/loss, logged by rank 0 right after it) to the release."""
    from orchestrator.tracking.runs import job_run

    found = job_run(EXPERIMENT, str(job["job"]))
    if not found:
        return "?", float("nan")
    client, run = found
    last = max(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    commit = run.data.tags.get("git_commit", "?")[:10]
    return commit, float(job["released"]) - last.timestamp / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout the jobs run")
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.drive:
        return drive(str(args.code), rest)
    if not os.environ.get("RAY_ADDRESS", "").startswith("http"):
        sys.exit(
            'the local stack is not in the environment: eval "$(python -m orchestrator.stack env)"'
        )
    sys.path.insert(0, str(REPO))
    ensure_dataset()
    tracked, untracked = [], []
    for _ in range(args.runs):  # interleaved, so the machine's load falls on both alike
        tracked.append(one_job(args.code.resolve(), True, args.steps))
        untracked.append(one_job(args.code.resolve(), False, args.steps))
    for label, runs in (("tracked", tracked), ("untracked", untracked)):
        print(label, " ".join(f"{r['release_s']:.2f}" for r in runs), "s to release")
    checks = [from_the_run(r) for r in tracked]
    commits = sorted({commit for commit, _ in checks})
    print("tracked, from MLflow's last-step stamp:", " ".join(f"{s:.2f}" for _, s in checks), "s")
    print(f"drivers imported {tracked[-1]['code']}; the runs recorded commit {','.join(commits)}")
    commit = ",".join(commits)
    med = statistics.median(float(r["release_s"]) for r in tracked)
    base = statistics.median(float(r["release_s"]) for r in untracked)
    after = statistics.median(float(r["publish_s"]) for r in tracked)
    print(
        f"release: ratio={med / base:.2f} (tracked {med:.2f} s, untracked {base:.2f} s, "
        f"publishing after the release {after:.2f} s; code {commit})"
    )


if __name__ == "__main__":
    main()
