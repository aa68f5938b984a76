"""What a job's process pays to end: the same job as its own program (orchestrator.cli skips
the interpreter's teardown) and run by another program in its process (Python's own exit,
teardown included: the baseline).

    python -m orchestrator.stack up && eval "$(python -m orchestrator.stack env)"
    python bench/job_exit.py [--runs 4]

The job: jobs/smoke.py's CIFAR ResNet-20, 1 worker, 4 steps on synthetic data, tracked in the
stack's MLflow, its checkpoint in the stack's S3 (so the process has imported torch, MLflow,
boto3 and, on Ray, Ray Train). Two ways, alternating, --runs of each:

- `--local`: the process's whole wall time (start to exit), and the seconds from its last
  output line to its exit.
- through the stack's Ray head: submit to the job's terminal status (polled every 0.1 s), the
  driver's exit on that path.

Each side goes first every other run (an even --runs balances them).

The baseline runs the very same command under `python -c` with runpy, the job's arguments
passed by environment, as a test runner or a notebook would run it in its own process:
orchestrator.cli then leaves the exit to Python. Medians. Last line:
`job_exit: ratio=R (local X s against Y s, its exit after the last line x s against y s; Ray
job Z s against W s)`, R being the local wall times' ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from chaos_cluster import client, logs, wait

ARGS = [
    "data.source=synthetic",
    "scaling.num_workers=1",
    "schedule.max_iters=4",
    "checkpoint.every_iters=4",
    "checkpoint.storage=s3://resnet/bench-job-exit",
    "tracking.experiment=bench-job-exit",
]
# another program running the job in its own process: its arguments come by environment, so
# that its command line is its own (orchestrator.cli.is_the_program)
RUNNER = (
    "import json, os, runpy, sys; sys.argv = json.loads(os.environ['JOB_ARGV']); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def command(args: list[str], as_program: bool) -> tuple[list[str], dict[str, str]]:
    """The job's command line and its extra environment, either way."""
    argv = ["jobs/smoke.py", *args]
    if as_program:
        return [sys.executable, *argv], {}
    return [sys.executable, "-c", RUNNER], {"JOB_ARGV": json.dumps(argv)}


def local(as_program: bool) -> tuple[float, float]:
    """(wall s, s from the last output line to the exit) of one --local job."""
    cmd, env = command(["--local", f"name=exit-{uuid.uuid4().hex[:6]}", *ARGS], as_program)
    t0 = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    last = t0
    for _ in proc.stdout:
        last = time.time()
    code = proc.wait()
    end = time.time()
    assert code == 0, f"the job failed ({code})"
    return end - t0, end - last


def on_ray(as_program: bool) -> float:
    """Seconds from submit to the job's terminal status, the job through the stack's Ray."""
    cmd, env = command([f"name=exit-{uuid.uuid4().hex[:6]}", *ARGS], as_program)
    entry = shlex.join(["python", *cmd[1:]])  # a shell runs it
    t0 = time.time()
    job = client().submit_job(entrypoint=entry, runtime_env={"env_vars": env} if env else None)
    status = wait(job, poll_s=0.1)
    end = time.time()
    assert status == "SUCCEEDED", logs(job)[-3000:]
    return end - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    if not os.environ.get("MLFLOW_TRACKING_URI") or not os.environ.get("RAY_ADDRESS"):
        sys.exit('needs the local stack: eval "$(python -m orchestrator.stack env)"')
    runs: dict[str, list[float]] = {}
    for i in range(args.runs):
        # the first of two jobs back to back tends to start slower here: each side goes first
        # every other run
        sides = [(True, "program"), (False, "baseline")]
        for as_program, side in sides if i % 2 == 0 else sides[::-1]:
            wall, tail = local(as_program)
            ray_s = on_ray(as_program)
            for key, value in (("local", wall), ("tail", tail), ("ray", ray_s)):
                runs.setdefault(f"{key} {side}", []).append(value)
            print(
                f"run {i + 1}, {side}: --local {wall:.2f} s (exit {tail:.2f} s after its last "
                f"line), on Ray submit -> end {ray_s:.2f} s",
                flush=True,
            )
    m = {key: statistics.median(values) for key, values in runs.items()}
    print(
        f"job_exit: ratio={m['local program'] / m['local baseline']:.3f} (local "
        f"{m['local program']:.2f} s against {m['local baseline']:.2f} s, its exit after the "
        f"last line {m['tail program']:.2f} s against {m['tail baseline']:.2f} s; Ray job "
        f"{m['ray program']:.2f} s against {m['ray baseline']:.2f} s; medians of {args.runs})"
    )


if __name__ == "__main__":
    main()
