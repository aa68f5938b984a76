"""bench/chaos.py's trials and checks: what each kind breaks, and what every trial must show.

Kinds on one Ray node and a fixed world size of 2 (`worker`, `driver`, `s3`, `mlflow`), on two
Ray nodes with an elastic range `scaling.num_workers=[1,2]` (`preempt`, `node-loss`,
`scale-up`: one worker of 2 CPUs on each node), and without Ray (`sigterm`: torchrun through
`jobs/smoke.py --local`). Each trial returns a `Result`; `check` compares a finished job with
its uninterrupted baseline:

- MLflow: `train/loss` holds steps 1..N once each;
- the ledger (data.ledger=true): every sample once per epoch (orchestrator.data.ledger's own
  reader), no step missing, and each step's sample ids those of the baseline;
- the world size never changed: final weights bit-identical to the baseline's, every logged
  loss equal to it;
- it changed: the losses logged before the first change equal the baseline's (the same
  weights trained them), and the loss curve stays within `Baselines.tolerance` of the
  baseline's, a gap measured between two uninterrupted runs at world sizes 1 and 2.
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
from chaos_cluster import (
    REPO,
    History,
    LedgerSteps,
    SecondNode,
    curve_gap,
    final_weights,
    history,
    identical,
    ledger_steps,
    logs,
    store,
    submit,
    wait,
    wait_for_checkpoint,
    wait_status_terminal,
)

from orchestrator.data.ledger import read_ledger

LOG_EVERY = 10
ELASTIC_STEPS = 400  # at 1 worker, long enough for the node to come back and the job to grow
ELASTIC_SPEC = [
    "scaling.num_workers=[1,2]",
    "scaling.cpus_per_worker=2",  # one worker per node
    "scaling.torch_threads=1",
    "scaling.max_failures=3",
    "scaling.resize_interval_s=5",
    "data.streams=2",  # explicit: a run at world size 1 then reads the same streams
    "data.num_workers=1",
    "data.ledger=true",
    f"schedule.max_iters={ELASTIC_STEPS}",
    "schedule.milestones=[]",
    "checkpoint.every_iters=20",
    "checkpoint.at_epoch_end=false",
    "checkpoint.keep_last=3",
    "checkpoint.preemption_poll_every=1",
    f"tracking.log_every={LOG_EVERY}",  # the curve comparison's losses: means over 10 steps
    "eval.every_iters=0",
    "eval.at_end=false",
]
DEADLINE_S = 15  # the drain's deadline: Ray's drain watcher looks every 5 s
WINDOW = 4  # logged losses (each a mean over LOG_EVERY steps) per window of the comparison
TOLERANCE_FACTOR = 2.0  # x the gap between uninterrupted runs at world sizes 1 and 2


class TrialError(RuntimeError):
    """A trial that could not do what its kind means (the job ended too soon, no notice)."""


@dataclass
class Baseline:
    """An uninterrupted run: final weights, MLflow history, ledger, its world size."""

    weights: dict[str, torch.Tensor]
    history: History
    ledger: LedgerSteps
    world_size: int


@dataclass
class Baselines:
    fixed: Baseline | None = None  # Ray, 2 workers (worker, driver, s3, mlflow)
    elastic: Baseline | None = None  # Ray, [1,2] at 2 (preempt, node-loss, scale-up)
    local: Baseline | None = None  # torchrun, 2 workers (sigterm)
    tolerance: float = math.nan  # the loss curve's allowed windowed gap, world size changed


@dataclass
class Result:
    kind: str
    name: str
    what: str = ""
    status: str = ""
    weights_ok: bool = False  # bit-identical, or (world size changed) sequence + curve
    history_ok: bool = False
    ledger_ok: bool = False
    duplicates: int = 0
    drops: int = 0
    lost_s: float = math.nan
    lost_steps: int | None = None  # preempt: steps done before the kill, not resumed from
    done_steps: int | None = None  # preempt: the newest step done before the kill
    redone_steps: int | None = None  # steps done before the failure and trained again
    resumed: int | None = None  # the step the job resumed from after the failure
    log_tail: str = ""  # where it failed: the job's last output
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        kept = not self.lost_steps  # a preemption loses no completed step
        return self.weights_ok and self.history_ok and self.ledger_ok and kept

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        out = f"{self.name}: {self.what}; {self.status}; {verdict}"
        return out + "".join(f"; {n}" for n in self.notes)


def check(
    r: Result, experiment: str, storage_url: str, base: Baseline, tol: float, groups: list[int]
) -> None:
    """Fill `r`'s verdicts for the finished job `r.name` against its baseline; `groups`: the
    sizes of the worker groups Ray Train started, in order (from the job log; [] without
    Ray)."""
    if r.status != "SUCCEEDED":
        return
    h = history(experiment, r.name)
    steps = [s for s, _ in h.steps]
    expected = [s for s, _ in base.history.steps]  # every logged step of the run, once
    r.history_ok = steps == expected
    if not r.history_ok:
        r.notes.append(f"MLflow steps {_ranges(steps)} (expected {_ranges(expected)}, once each)")
    url = store(storage_url, r.name).root
    report = read_ledger(url)
    seen = ledger_steps(url)
    r.duplicates, r.drops = report.duplicates, report.drops
    same_ids = seen.ids == base.ledger.ids
    r.ledger_ok = report.ok and not report.gaps and same_ids
    if not r.ledger_ok:
        r.notes.append(
            f"ledger: {report.summary()}, gaps {report.gaps}, "
            f"per-step ids {'equal to' if same_ids else 'DIFFERENT from'} the baseline's"
        )
    worlds = seen.world_sizes
    raw = [w for _, w in seen.raw_attempts]
    # an attempt that saved nothing left no ledger file, yet MLflow kept its losses: a group
    # started at another size before the first save (the second node not yet counted)
    unledgered = bool(groups) and groups[0] != base.world_size and raw[:1] == [base.world_size]
    if unledgered:
        raw = [groups[0], *raw]
    r.notes.append(f"world sizes {'->'.join(map(str, raw))}")
    if all(w == base.world_size for w in raw):
        same = identical(final_weights(store(storage_url, r.name)), base.weights)
        r.weights_ok = same and h.steps == base.history.steps
        r.notes.append(f"weights {'identical' if same else 'DIFFERENT'}")
        return
    # the losses MLflow kept up to the first attempt at another world size (cut off ones
    # included: a replayed step is not logged again) came from the baseline's weights
    changes = [first for first, w in seen.raw_attempts if w != base.world_size]
    first_change = 1 if unledgered else changes[0]
    prefix = [p for p in h.steps if p[0] < first_change]
    before = prefix == base.history.steps[: len(prefix)]
    gap = curve_gap(h.steps, base.history.steps, WINDOW)
    r.weights_ok = before and same_ids and gap <= tol and bool(worlds)
    r.notes.append(
        f"losses before step {first_change} {'equal' if before else 'DIFFERENT'}, "
        f"loss curve gap {gap:.4f} (tolerance {tol:.4f})"
    )


def worker_groups(job_log: str) -> list[int]:
    """The sizes of the worker groups Ray Train started, in order (a line may be repeated)."""
    return [int(n) for n in re.findall(r"Started training worker group of size (\d+)", job_log)]


def _ranges(steps: list[int]) -> str:
    return f"{steps[:3]}...{steps[-3:]} ({len(steps)} values)" if steps else "none"


# ---------------------------------------------------------------------------- elastic kinds


def start_elastic(node: SecondNode, name: str, common: list[str], storage_url: str, *extra: str):
    """The node up, the elastic job submitted, its first commit with a rank on each node."""
    node.start()
    job = submit([f"name={name}", *common, *ELASTIC_SPEC, *extra])
    st = store(storage_url, name)
    step = wait_for_checkpoint(st, 20, job)
    files = st.storage.sizes(f"step-{step:08d}")
    if "rank-00001.pt" not in files:
        raise TrialError(f"{name} started with one worker ({sorted(files)}): the node was not used")
    return job, st, step


def _resumed_from(job: str) -> int:
    found = re.findall(r"rank 0 resumed from \S+ step (\d+)", logs(job))
    if not found:
        raise TrialError("no 'rank 0 resumed from' line in the job log")
    return int(found[-1])


def _wait_log(job: str, pattern: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, logs(job))
        if found:
            return found
        if wait_status_terminal(job):
            raise TrialError(f"the job ended before /{pattern}/ was logged")
        time.sleep(0.5)
    raise TrialError(f"no /{pattern}/ in the job log within {timeout_s:.0f} s")


def preempt(ctx: dict, rng: random.Random) -> tuple[Result, str, float]:
    """Drain the second node with a deadline, kill it at the deadline. With
    scaling.max_failures=0: a preemption must not spend it."""
    r = Result("preempt", f"chaos-preempt-{os.urandom(3).hex()}")
    node: SecondNode = ctx["node"]
    job, _, step = start_elastic(
        node, r.name, ctx["common"], ctx["storage"], "scaling.max_failures=0"
    )
    time.sleep(rng.uniform(0.0, 2.0))
    t_drain = time.time()
    node.drain(DEADLINE_S)
    notice = _wait_log(job, r"preemption notice at step (\d+)", DEADLINE_S)
    seen_after = time.time() - t_drain
    # the kill comes at Ray's deadline, as a reclaim's would: the drain CLI's own start-up
    # (seconds on a loaded box) lies between t_drain and the deadline Ray set
    said = re.findall(r"deadline_ms=(\d+)", logs(job))
    deadline = int(said[0]) / 1000 if said else time.time() - seen_after + DEADLINE_S
    time.sleep(max(0.0, deadline - time.time()))
    if wait_status_terminal(job):
        raise TrialError(
            f"the job ended before the deadline: raise ELASTIC_STEPS ({ELASTIC_STEPS})"
        )
    at_kill = logs(job)
    t_fail = node.kill()
    r.status = wait(job)
    r.done_steps = max(int(notice[1]), *steps_logged(at_kill))
    r.what = (
        f"drained the second node after commit {step} ({DEADLINE_S} s deadline): notice at "
        f"step {notice[1]} (seen {seen_after:.1f} s after the drain), killed at the deadline "
        f"after step {r.done_steps}"
    )
    if r.status == "SUCCEEDED":
        r.resumed = _resumed_from(job)
        r.lost_steps = max(0, r.done_steps - r.resumed)
        if r.lost_steps:
            r.notes.append(f"LOST {r.lost_steps} completed steps")
    return r, job, t_fail


# what rank 0 logs of a step: its metrics (every tracking.log_every steps), and the last
# commit before a preemption deadline
STEP_LINES = (r"\bstep (\d+) of \d+", r"\bstep (\d+): the last commit before the preemption")


def steps_logged(log: str) -> list[int]:
    """The steps a job log shows done: the newest of them is a lower bound of the steps done
    when the log was read, and exact where the last commit before a deadline is the newest
    (training waits there)."""
    return [int(m) for pattern in STEP_LINES for m in re.findall(pattern, log)]


def node_loss(ctx: dict, rng: random.Random) -> tuple[Result, str, float]:
    """SIGKILL the second node (its raylet and all under it) with no notice."""
    r = Result("node-loss", f"chaos-nodeloss-{os.urandom(3).hex()}")
    node: SecondNode = ctx["node"]
    job, _, step = start_elastic(node, r.name, ctx["common"], ctx["storage"])
    time.sleep(rng.uniform(0.0, 3.0))
    t_fail = node.kill()
    r.status = wait(job)
    r.what = f"SIGKILLed the second node after commit {step}, no notice"
    if r.status == "SUCCEEDED":
        r.resumed = _resumed_from(job)
    return r, job, t_fail


def scale_up(ctx: dict, rng: random.Random) -> tuple[Result, str, float]:
    """A node loss, then the node back once the job trains on one worker: the job must grow
    back to 2 workers at its next resize (scaling.resize_interval_s=5)."""
    r = Result("scale-up", f"chaos-scaleup-{os.urandom(3).hex()}")
    node: SecondNode = ctx["node"]
    job, st, step = start_elastic(node, r.name, ctx["common"], ctx["storage"])
    time.sleep(rng.uniform(0.0, 3.0))
    t_fail = node.kill()
    _wait_log(job, r"rank 0 resumed from \S+ step", 300)
    node.start()
    t_back = time.time()
    r.status = wait(job)
    r.what = (
        f"SIGKILLed the second node after commit {step}, "
        f"started it again {t_back - t_fail:.0f} s later"
    )
    if r.status == "SUCCEEDED":
        r.resumed = int(re.findall(r"rank 0 resumed from \S+ step (\d+)", logs(job))[0])
        final = st.latest()
        ranks = sorted(
            f for f in st.storage.sizes(f"step-{final.step:08d}") if f.startswith("rank-")
        )
        grew = len(ranks) == 2
        r.notes.append(f"final commit by {len(ranks)} ranks")
        if not grew:
            r.status = "SUCCEEDED but never grew back to 2 workers"
    return r, job, t_fail


# ---------------------------------------------------------------------------- torchrun


def local_cmd(name: str, common: list[str], spec: list[str]) -> list[str]:
    return [sys.executable, "jobs/smoke.py", "--local", f"name={name}", *common, *spec,
            "scaling.num_workers=2"]  # fmt: skip


def run_local(cmd: list[str], stop_at: int = 0) -> tuple[int, float, str]:
    """Run `cmd`; with `stop_at`, SIGTERM it once step `stop_at` is logged. Returns (exit
    code, time of the signal, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines, t_sig = [], math.nan
    for line in proc.stdout:
        lines.append(line)
        if (
            stop_at
            and math.isnan(t_sig)
            and re.search(rf"orchestrator\.train: step {stop_at} ", line)
        ):
            t_sig = time.time()
            proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=600), t_sig, "".join(lines)


def sigterm(ctx: dict, rng: random.Random) -> tuple[Result, str, float]:
    """torchrun's path: SIGTERM mid-run (commit at the next step boundary, exit 143), then the
    same command again: it resumes and finishes."""
    r = Result("sigterm", f"chaos-sigterm-{os.urandom(3).hex()}")
    cmd = local_cmd(r.name, ctx["common"], ctx["spec"])
    at = rng.randrange(3, 20)
    code, t_fail, out = run_local(cmd, stop_at=at)
    if code != 128 + signal.SIGTERM:
        r.status = f"exit {code} after SIGTERM (expected {128 + signal.SIGTERM})"
        r.log_tail = out[-3000:]
        return r, "", t_fail
    code2, _, out2 = run_local(cmd)
    r.status = "SUCCEEDED" if code2 == 0 else f"resubmission exit {code2}"
    found = re.findall(r"from step (\d+) \(resumed: True", out2)
    r.resumed = int(found[0]) if found else None
    r.what = f"SIGTERM at step {at}, exit {code}; run again, resumed from step {r.resumed}"
    if r.resumed is None or r.resumed < at:  # the notice's commit is at a step after `at`
        r.status = f"resumed from step {r.resumed}, before the SIGTERM's step {at}"
        r.log_tail = out[-3000:]
        return r, "", t_fail
    if code2 != 0:
        r.log_tail = out2[-3000:]
    return r, "", t_fail
