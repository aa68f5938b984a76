"""Studies on Ray Tune: the small study 2 trials at a time against the same trials one
after another, in one run.

    python -m orchestrator.stack up && eval "$(python -m orchestrator.stack env)"
    python bench/study.py [--rounds 1]

The study: jobs/cifar10_table6.py with 2 depths x plain/residual x 2 seeds (8 trials;
tests/test_study.py runs 4 of them: 2 cells x 2 seeds), 4 CPU steps each on generated
CIFAR-layout data (made here, kept at s3://resnet/datasets/bench-cifar), 1 worker per trial,
trained in its Tune actor (`--trial-runner ray_train`: under Ray Train, as before).
Each round submits it twice through `ray job submit`, under fresh study names (nothing is
skipped): study.max_concurrent=1 (the baseline: one trial after another, on Tune too) and
study.max_concurrent=2. Printed per round:
both wall times (the whole `ray job submit`) and their ratio; Tune's overhead per trial in
the sequential run: (Tune's wall time - the jobs' own time) / trials, from the study's
`study timing:` line; the trial's phases (`study phases:`: start-up, checks, pre-flight, the job,
and the follow-ups the driver runs after it); and a trial's fixed cost: in the sequential run,
(Tune's wall time, follow-ups included) / trials - a trial's busy time, its training steps and
validation (the loop's own clock: MLflow's system/step_time_s x the steps of each log window,
from the first batch to the last logged step). Last line: `study: ratio=R, trial fixed cost C s
(...)`, the medians, the load average seen, and the ratio's CPU floor: the box's busy
CPU-seconds in the sequential run over all its cores' time (the least two at a time could take
for the same CPU work), printed per round with the CPU of both runs.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.suite_timeline import cpu_seconds  # the box's busy CPU-seconds
from orchestrator import storage

DATASET = "s3://resnet/datasets/bench-cifar"
CELLS = "cifar_resnet20,cifar_resnet32,cifar_plain20,cifar_plain32"


def tiny_study_args(dataset: str, experiment: str, name: str, *extra: str) -> list[str]:
    """The small study's overrides (tests/test_study.py's study takes them too): a few CPU
    steps per trial, 1 worker, batch 16, validation at steps 2 and 4."""
    return [
        f"study.name={name}",
        f"data.url={dataset}",
        f"tracking.experiment={experiment}",
        "scaling.num_workers=1",
        "scaling.global_batch=16",
        "scaling.torch_threads=1",
        "schedule.max_iters=4",
        "schedule.milestones=[]",
        "eval.every_iters=2",
        "eval.batch_size=50",
        "checkpoint.every_iters=2",
        "tracking.log_every=2",
        "data.num_workers=0",
        "data.shuffle_buffer=32",
        *extra,
    ]


def make_dataset(url: str) -> str:
    if storage.open_storage(url).exists("manifest.json"):
        return url
    with tempfile.TemporaryDirectory(prefix="bench-cifar-") as src:
        for cmd in (
            ["datasets/synthetic.py", "cifar10", "--out", src, "--train-per-class", "20"]
            + ["--test-per-class", "5"],
            ["datasets/cifar10.py", "--src", src, "--dest", url, "--shard-size-mb", "0.1"],
        ):
            subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)
    return url


def busy_seconds(experiment: str, study: str) -> list[float]:
    """Each trial's training steps and validation, in seconds: the loop's windows (MLflow's
    system/step_time_s at each logged step x the steps since the one before)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, experiment
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`orchestrator.study` = '{study}'", max_results=100
    )
    out = []
    for run in runs:
        if run.data.tags.get("orchestrator.role") == "study":
            continue  # the parent
        points = sorted(
            (m.step, m.value)
            for m in client.get_metric_history(run.info.run_id, "system/step_time_s")
        )
        out.append(
            sum(v * (step - before) for (before, _), (step, v) in zip([(0, 0.0), *points], points))
        )
    return out


def run_study(
    dataset: str, at_once: int, runner: str
) -> tuple[float, float, float, str, list[float], float]:
    """(wall s of `ray job submit`, Tune's wall s, the jobs' own s, the phases line, each
    trial's busy s, the box's busy CPU-s over the submission) of one study."""
    name = f"bench{uuid.uuid4().hex[:6]}"
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray), "job", "submit", "--", "python", "jobs/cifar10_table6.py"]
    args = tiny_study_args(
        dataset, "bench-study", name,
        f"study.cells={CELLS}", "study.seeds=2", f"study.max_concurrent={at_once}",
        f"study.trial_runner={runner}",
    )  # fmt: skip
    t0, (cpu0, _) = time.perf_counter(), cpu_seconds()
    proc = subprocess.run(
        [*cmd, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    wall, cpu = time.perf_counter() - t0, cpu_seconds()[0] - cpu0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "8/8 trials finished" not in out:
        sys.exit(f"study {name} failed:\n{out[-5000:]}")
    m = re.search(
        r"study timing: Tune wall ([\d.]+) s .*?; (\d+) trials ran, their jobs' own time "
        r"([\d.]+) s",
        out,
    )
    phases = re.search(r"study phases \(mean s per trial\): (.*)", out)
    if m is None or phases is None:
        sys.exit(f"no timing lines in the study's output:\n{out[-3000:]}")
    busy = busy_seconds("bench-study", name)
    rank0 = rank0_startup(out)
    return wall, float(m.group(1)), float(m.group(3)), f"{phases.group(1)}; {rank0}", busy, cpu


def rank0_startup(out: str) -> str:
    """The mean of rank 0's `startup of rank 0:` lines (orchestrator.startup_clock): the part
    of a trial's job from its worker's process start to its first step."""
    lines = re.findall(r"startup of rank 0: t0=[\d.]+; (.*) = ([\d.]+) s", out)
    if not lines:
        return "no rank 0 start-up lines"
    phases: dict[str, list[float]] = {}
    for parts, _ in lines:
        for label, value in re.findall(r"(.+?) ([\d.]+) s(?:, |$)", parts):
            phases.setdefault(label, []).append(float(value))
    total = statistics.fmean(float(t) for _, t in lines)
    said = ", ".join(f"{k} {statistics.fmean(v):.2f}" for k, v in phases.items())
    return f"of the job, rank 0's start-up (mean of {len(lines)}): {said} = {total:.2f}"


class LoadSampler(threading.Thread):
    """The 1-minute load average every 5 s while a study runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(5):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> list[float]:
        self.done.set()
        self.join()
        return self.samples or [os.getloadavg()[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--trial-runner",
        default="auto",
        choices=("auto", "ray_train"),
        help="study.trial_runner: auto (each one-worker trial in its Tune actor, the default) "
        "or ray_train (each under a Ray Train worker group)",
    )
    args = parser.parse_args()
    if "RAY_ADDRESS" not in os.environ or "MLFLOW_TRACKING_URI" not in os.environ:
        sys.exit(
            "the local stack is not in the environment: run `python -m orchestrator.stack up` "
            'and `eval "$(python -m orchestrator.stack env)"`'
        )
    dataset = make_dataset(DATASET)
    ratios, overheads, fixed, loads, floors = [], [], [], [], []
    cores = os.cpu_count() or 1
    for i in range(args.rounds):
        sampler = LoadSampler()
        sampler.start()
        seq, seq_tune, seq_jobs, seq_phases, busy, seq_cpu = run_study(
            dataset, 1, args.trial_runner
        )
        seq_load = sampler.stop()
        sampler = LoadSampler()
        sampler.start()
        par, par_tune, _, par_phases, _, par_cpu = run_study(dataset, 2, args.trial_runner)
        par_load = sampler.stop()
        loads += seq_load + par_load
        ratios.append(par / seq)
        overheads.append((seq_tune - seq_jobs) / 8)
        fixed.append(seq_tune / 8 - statistics.fmean(busy))
        # two at a time cannot take less than the serial run's CPU-seconds spread over every core
        floors.append(seq_cpu / (cores * seq))
        print(
            f"round {i + 1}: one at a time {seq:.1f} s, two at a time {par:.1f} s, "
            f"ratio {par / seq:.3f}; Tune overhead per trial {overheads[-1]:.2f} s "
            f"(Tune wall {seq_tune:.1f} s - jobs' own {seq_jobs:.1f} s, over 8 trials); "
            f"Tune's wall alone: ratio {par_tune / seq_tune:.3f}; trial fixed cost "
            f"{fixed[-1]:.2f} s (Tune wall / 8 - busy {statistics.fmean(busy):.2f} s: steps and "
            f"validation)\n  one at a time (load {statistics.fmean(seq_load):.1f}), mean s per "
            f"trial: {seq_phases}\n  two at a time (load {statistics.fmean(par_load):.1f}), "
            f"mean s per trial: {par_phases}\n  the box's CPU: one at a time {seq_cpu:.0f} "
            f"CPU-s ({seq_cpu / seq:.2f} of {cores} cores busy), two at a time {par_cpu:.0f} "
            f"CPU-s ({par_cpu / par:.2f} busy); the ratio's CPU floor {floors[-1]:.3f} (the "
            f"serial run's CPU-seconds on all {cores} cores)",
            flush=True,
        )
    print(
        f"study: ratio={statistics.median(ratios):.3f}, trial fixed cost "
        f"{statistics.median(fixed):.2f} s (study.trial_runner={args.trial_runner}; "
        "wall time, 2 trials at a time / one after "
        f"another, median of {len(ratios)}; Tune overhead per trial "
        f"{statistics.median(overheads):.2f} s; load average {min(loads):.1f}-{max(loads):.1f}, "
        f"mean {statistics.fmean(loads):.1f}; the ratio's CPU floor "
        f"{statistics.median(floors):.3f})"
    )


if __name__ == "__main__":
    main()
