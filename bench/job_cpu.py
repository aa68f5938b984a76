"""What one short training job costs in CPU through Ray, process by process, against the same
job run locally (torchrun) in the same run.

    python bench/job_cpu.py [--steps 32] [--runs 1]   # needs the local stack: make up
    python bench/job_cpu.py --idle-s 60 --runs 0      # the idle stack alone

The job is the test suite's unit of work: jobs/smoke.py (CIFAR ResNet-20, 2 workers, DDP over
gloo) on a small generated dataset in the stack's S3, with bench/chaos.py's spec (a checkpoint
every 4 steps, a step logged to MLflow each), tracked in the stack's MLflow. Each run submits it
with `ray job submit` and waits for its end, then runs it as `python jobs/smoke.py --local`.
For each: its wall time and the whole box's busy CPU-seconds from start to end (/proc/stat,
less this script's own), and every process's own CPU time by kind (psutil, sampled every 0.5 s:
a process that lives less than that is missed), counted from the bench's start; where some of a
kind's processes took that role meanwhile (Ray hands an actor an idle worker process, which
imported Ray before), also their CPU since each started, in brackets. Medians over --runs.
Last line:
`job_cpu: ratio=R (ray X CPU-s, local Y CPU-s; wall A s vs B s; N steps)`.

With --idle-s, first the stack alone, nothing submitted, for that long: what it costs a test
run (or a developer's box) just by running, a minute at a time, by process.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from chaos import CHAOS_SPEC  # bench/: the fault-tolerance harness's job spec
from chaos_cluster import BENCH_DATASET, make_dataset
from process_cpu import Sampler  # bench/: every process's CPU by kind
from suite_timeline import cpu_seconds  # bench/: the box's busy CPU-seconds

REPO = Path(__file__).resolve().parent.parent
TAIL_S = 1.0  # sampled after a command ends: Ray's driver ends after its job
Measured = tuple[float, float, dict[str, float], dict[str, float]]  # what `measure` returns


def measure(cmd: list[str]) -> Measured:
    """(wall s, the box's busy CPU-s less this script's, CPU-s by process kind, the same since
    each process started) of `cmd`."""
    sampler = Sampler()
    mine0, (busy0, _), t0 = time.process_time(), cpu_seconds(), time.monotonic()
    sampler.start()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    wall = time.monotonic() - t0
    time.sleep(TAIL_S)  # the job's processes' last samples
    sampler.halt.set()
    sampler.join()
    busy = cpu_seconds()[0] - busy0 - (time.process_time() - mine0)
    return wall, busy, sampler.by_kind(), sampler.by_kind(since_start=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--idle-s", type=float, default=0.0, help="the idle stack first, so long")
    args = parser.parse_args()
    if "RAY_ADDRESS" not in os.environ:
        parser.error(
            'the local stack\'s env: make up && eval "$(python -m orchestrator.stack env)"'
        )
    if args.idle_s > 0:
        wall, busy, by_kind, _ = measure(["sleep", str(args.idle_s)])
        per_minute = 60 / (wall + TAIL_S)  # measure() samples TAIL_S more after the command
        share = busy * per_minute / (60 * (os.cpu_count() or 1))
        print(f"the stack idle: {busy * per_minute:.1f} CPU-s a minute, {share:.1%} of the box")
        for kind, cpu in collections.Counter(by_kind).most_common():
            if cpu * per_minute >= 0.05:
                print(f"  {cpu * per_minute:6.1f} CPU-s a minute  {kind}")
        if not args.runs:
            return
    dataset = make_dataset(BENCH_DATASET)
    results: dict[str, list[Measured]] = {"ray": [], "local": []}
    for _ in range(args.runs):
        spec = [f"data.url={dataset}", "tracking.experiment=job-cpu-bench", *CHAOS_SPEC]
        spec += [f"schedule.max_iters={args.steps}"]
        name = f"job-cpu-{uuid.uuid4().hex[:6]}"
        ray = ["ray", "job", "submit", "--", sys.executable, "jobs/smoke.py", f"name={name}-ray"]
        # --local on a CPU machine starts one worker unless told: the same 2 as on Ray
        local = [sys.executable, "jobs/smoke.py", "--local", f"name={name}-local"]
        local += ["scaling.num_workers=2"]
        results["ray"].append(measure([*ray, *spec]))
        results["local"].append(measure([*local, *spec]))
    for how, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        busy = statistics.median(r[1] for r in runs)
        print(f"{how}: wall {wall:.1f} s, the box busy {busy:.1f} CPU-s (median of {len(runs)})")
        kinds, own = collections.Counter[str](), collections.Counter[str]()
        for _, _, by_kind, since_start in runs:
            kinds.update({k: v / len(runs) for k, v in by_kind.items()})
            own.update({k: v / len(runs) for k, v in since_start.items()})
        for kind, cpu in kinds.most_common():
            if cpu < 0.05:
                continue
            older = own[kind] - cpu >= 0.05  # some took this role during the run (by_kind)
            since = f" ({own[kind]:.1f} since its processes started)" if older else ""
            print(f"  {cpu:6.1f} CPU-s  {kind}{since}")
    ray_busy = statistics.median(r[1] for r in results["ray"])
    local_busy = statistics.median(r[1] for r in results["local"])
    ray_wall = statistics.median(r[0] for r in results["ray"])
    local_wall = statistics.median(r[0] for r in results["local"])
    print(
        f"job_cpu: ratio={ray_busy / local_busy:.2f} (ray {ray_busy:.1f} CPU-s, local "
        f"{local_busy:.1f} CPU-s; wall {ray_wall:.1f} s vs {local_wall:.1f} s; {args.steps} steps)"
    )


if __name__ == "__main__":
    main()
