"""Chaos: break a part of a running job at a random moment; it must finish as if nothing had.

    STACK_RAY_LOOPBACK_ONLY=false python -m orchestrator.stack up   # a Ray head nodes can join
    eval "$(python -m orchestrator.stack env)"
    python bench/chaos.py --trials 20 [--kinds worker,driver,...] [--dataset URL]

Kinds, taken in turn (bench/chaos_kinds.py has the details):
- `worker`, `driver`, `s3`, `mlflow`: the smoke job (2 Ray Train workers, DDP over gloo, shards
  on S3, MLflow) with a training worker SIGKILLed, the driver SIGKILLed and the job
  resubmitted, the S3 server stopped 6 s while a checkpoint uploads, or the MLflow server
  stopped and started 8 s later;
- `preempt`, `node-loss`, `scale-up`: on two Ray nodes (the stack's head and a second raylet
  the bench starts, 2 CPUs each), an elastic job (`scaling.num_workers=[1,2]`, one worker per
  node) whose second node is drained with a 15 s deadline and killed at it (with
  `scaling.max_failures=0`), or SIGKILLed with no notice (the job goes on with one worker), or
  SIGKILLed and started again (the job grows back to 2 at its next resize);
- `sigterm`: `python jobs/smoke.py --local` (torchrun, 2 workers) SIGTERMed mid-run, then run
  again.

Every job keeps a sample ledger (`data.ledger=true`). Each trial must show: every step once in
MLflow; every sample once per epoch in the ledger, and each step's samples those of an
uninterrupted run; and bit-identical final weights against that run where the world size never
changed, or, where it changed, the same losses up to the change and a loss curve within the
tolerance measured between uninterrupted runs at world sizes 1 and 2. Without --dataset the
bench makes its own data (s3://resnet/datasets/chaos-smoke). Last lines:

    chaos: K/N passed (worker a/b, driver ..., preempt e/f, node-loss ..., sigterm h/i)
    preemption: 0 completed steps lost in e/e trials (...)
    ledger: every sample once per epoch in N/N trials (0 duplicates, 0 drops)
    training lost per failure, median s (...): worker ..., sigterm ...

"Completed steps lost" to a preemption: the newest step done before the kill less the step
the restart resumed from (a lost step fails the trial). The newest step done is read from the
job log just before the kill: the last commit before the deadline (after it training waits
for the node to go), or a logged step, whichever is newer. Training lost per failure: after
the failure, the longest interval between two logged steps less the time its steps take in
the uninterrupted run (a restart is one such interval: new processes, the checkpoint read, the
first batch, the steps trained again). The elastic jobs log every 10 steps, so it is resolved
to about one such interval.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import re
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench's own helpers

import chaos_kinds as kinds
from chaos_cluster import (  # noqa: F401 - the harness tests import from here
    BENCH_DATASET,
    REPO,
    SecondNode,
    client,
    curve_gap,
    driver_pid,
    during_upload,
    final_weights,
    history,
    identical,
    ledger_steps,
    logs,
    lost_seconds,
    make_dataset,
    metric_steps,
    stack,
    store,
    submit,
    wait,
    wait_for_checkpoint,
    wait_status_terminal,
    worker_pid,
)

CHAOS_SPEC = [
    "schedule.max_iters=24",
    "checkpoint.every_iters=4",
    "checkpoint.keep_last=10",
    "eval.every_iters=0",
    "eval.at_end=false",
    "tracking.log_every=1",
    "scaling.max_failures=3",
    "data.pca_lighting=0.1",
    "data.ledger=true",
]
FIXED = ("worker", "driver", "s3", "mlflow")
TWO_NODES = ("preempt", "node-loss", "scale-up")
KINDS = (*FIXED, *TWO_NODES, "sigterm")
EXPERIMENT = f"chaos-{uuid.uuid4().hex[:6]}"


def trial(kind: str, ctx: dict, rng: random.Random) -> tuple[kinds.Result, str, float]:
    """One run of the smoke job with `kind` broken once after the first commit: a training
    worker (SIGKILL), the driver (SIGKILL, then the job resubmitted), the S3 server while a
    checkpoint uploads, or the MLflow server (stopped, started 8 s later). Returns (result
    without verdicts, the Ray job id, time of the failure)."""
    name = f"chaos-{kind}-{uuid.uuid4().hex[:6]}"
    r = kinds.Result(kind, name)
    job = submit([f"name={name}", *ctx["common"], *CHAOS_SPEC])
    st = store(ctx["storage"], name)
    step = wait_for_checkpoint(st, 4, job)
    if kind == "worker":
        time.sleep(rng.uniform(0.0, 4.0))  # land between checkpoints, mid-epoch
        rank = rng.randrange(2)
        t_fail = time.time()
        os.kill(worker_pid(st, step, rank), signal.SIGKILL)
        r.what = f"SIGKILLed rank {rank} after checkpoint step {step}"
    elif kind == "driver":
        time.sleep(rng.uniform(0.0, 4.0))
        t_fail = time.time()
        os.kill(driver_pid(name), signal.SIGKILL)
        wait(job)
        job = submit([f"name={name}", *ctx["common"], *CHAOS_SPEC])  # the same name: it resumes
        r.what = f"SIGKILLed the driver after checkpoint step {step}, resubmitted"
    elif kind == "s3":
        uploading = during_upload(st, job)
        t_fail = time.time()
        stack().stop_service("s3")
        time.sleep(6)
        stack().up(("s3",))
        r.what = f"stopped S3 for 6 s while step {uploading} uploaded"
    else:
        time.sleep(rng.uniform(0.0, 3.0))
        t_fail = time.time()
        stack().stop_service("mlflow")
        time.sleep(8)
        stack().up(("mlflow",))  # returns once it answers again
        r.what = f"MLflow down {time.time() - t_fail:.0f} s after checkpoint step {step}"
    r.status = wait(job)
    return r, job, t_fail


def run_trial(kind: str, ctx: dict, base: kinds.Baselines, rng: random.Random) -> kinds.Result:
    """A trial of `kind` and its checks; a trial that breaks is a failed result, said why."""
    runner: Callable = {
        "preempt": kinds.preempt,
        "node-loss": kinds.node_loss,
        "scale-up": kinds.scale_up,
        "sigterm": kinds.sigterm,
    }.get(kind, lambda c, g: trial(kind, c, g))
    reference = {"sigterm": base.local, **dict.fromkeys(TWO_NODES, base.elastic)}.get(
        kind, base.fixed
    )
    assert reference is not None
    try:
        r, job, t_fail = runner(ctx, rng)
    except (kinds.TrialError, TimeoutError, RuntimeError) as err:
        return kinds.Result(kind, f"chaos-{kind}", what=f"trial broke: {err}", status="BROKE")
    groups = kinds.worker_groups(logs(job)) if job else []
    kinds.check(r, EXPERIMENT, ctx["storage"], reference, base.tolerance, groups)
    if r.status == "SUCCEEDED":
        if r.resumed is None and job:
            # Ray may suffix a line with "[repeated 2x across cluster]": match the step itself
            found = re.findall(r"rank 0 resumed from \S+ step (\d+)", logs(job))
            r.resumed = int(found[-1]) if found else None
        h = history(EXPERIMENT, r.name)
        r.lost_s, done = lost_seconds(h, t_fail, reference.history.step_time())
        if r.done_steps is not None:  # preempt: read from the job log, not extrapolated
            done = r.done_steps
        if r.resumed is not None:
            r.redone_steps = max(0, done - r.resumed)
        r.notes.append(
            f"lost {r.lost_s:.1f} s (done {done} at the failure, resumed from {r.resumed})"
        )
    elif job and not r.log_tail:
        r.log_tail = logs(job)[-3000:]
    return r


def _baseline(name: str, ctx: dict, spec: list[str], world_size: int) -> kinds.Baseline:
    """An uninterrupted run through Ray, or through torchrun for `local`."""
    if name.startswith("chaos-base-local"):
        code, _, out = kinds.run_local(kinds.local_cmd(name, ctx["common"], spec))
        assert code == 0, out[-3000:]
    else:
        job = submit([f"name={name}", *ctx["common"], *spec])
        assert wait(job) == "SUCCEEDED", logs(job)[-3000:]
    st = store(ctx["storage"], name)
    h = history(EXPERIMENT, name)
    steps = [s for s, _ in h.steps]
    assert steps == sorted(set(steps)), f"{name}: each logged step once, in order: {steps}"
    return kinds.Baseline(final_weights(st), h, ledger_steps(st.root), world_size)


def baselines(want: set[str], ctx: dict) -> kinds.Baselines:
    """The uninterrupted runs the wanted kinds compare with, and the loss tolerance."""
    b = kinds.Baselines()
    tag = uuid.uuid4().hex[:6]
    if want & set(FIXED):
        b.fixed = _baseline(f"chaos-base-{tag}", ctx, CHAOS_SPEC, 2)
    if "sigterm" in want:
        b.local = _baseline(f"chaos-base-local-{tag}", ctx, CHAOS_SPEC, 2)
    if want & set(TWO_NODES):
        ctx["node"].start()
        b.elastic = _baseline(f"chaos-base-ws2-{tag}", ctx, kinds.ELASTIC_SPEC, 2)
        # one attempt at 2 workers: a start on one (the node's resources not yet seen) would
        # leave that attempt's losses in MLflow
        assert b.elastic.ledger.raw_attempts == [(1, 2)], b.elastic.ledger.raw_attempts
        one = _baseline(
            f"chaos-base-ws1-{tag}", ctx, [*kinds.ELASTIC_SPEC, "scaling.num_workers=1"], 1
        )
        same = one.ledger.ids == b.elastic.ledger.ids
        spread = curve_gap(one.history.steps, b.elastic.history.steps, kinds.WINDOW)
        b.tolerance = kinds.TOLERANCE_FACTOR * spread
        final = [
            statistics.fmean(v for _, v in x.history.steps[-kinds.WINDOW :])
            for x in (b.elastic, one)
        ]
        print(
            f"uninterrupted at world sizes 2 and 1: per-step sample ids "
            f"{'identical' if same else 'DIFFERENT'}; loss curves (means over "
            f"{kinds.WINDOW * kinds.LOG_EVERY} steps) differ by at most {spread:.4f}, "
            f"last window {final[0]:.4f} vs "
            f"{final[1]:.4f}; tolerance for a changed world size {kinds.TOLERANCE_FACTOR:g} x "
            f"that = {b.tolerance:.4f}",
            flush=True,
        )
    return b


def summary(results: dict[str, list[kinds.Result]]) -> list[str]:
    """The bench's last lines."""
    flat = [r for rs in results.values() for r in rs]
    matrix = ", ".join(f"{k} {sum(r.passed for r in rs)}/{len(rs)}" for k, rs in results.items())
    out = [f"chaos: {sum(r.passed for r in flat)}/{len(flat)} passed ({matrix})"]
    pre = results.get("preempt", [])
    if pre:
        measured = [r for r in pre if r.lost_steps is not None]
        lost = sum(r.lost_steps or 0 for r in measured)
        pairs = ", ".join(f"{r.done_steps}->{r.resumed}" for r in measured)
        out.append(
            f"preemption: {lost} completed steps lost in {len(measured)}/{len(pre)} trials "
            "(steps done before the kill, per the job log read just before it, less the step "
            f"the restart resumed from; done->resumed: {pairs})"
        )
    ledger_ok = sum(r.ledger_ok for r in flat)
    out.append(
        f"ledger: every sample once per epoch in {ledger_ok}/{len(flat)} trials "
        f"({sum(r.duplicates for r in flat)} duplicates, {sum(r.drops for r in flat)} drops)"
    )
    per_kind = ", ".join(
        f"{k} {_median([r.lost_s for r in rs if not math.isnan(r.lost_s)]):.1f}"
        for k, rs in results.items()
    )
    out.append(
        "training lost per failure, median s (after the failure, the longest interval "
        "between logged steps less its steps' time in an unbroken run: restart + steps "
        f"trained again): {per_kind}"
    )
    return out


def _median(values: list) -> float:
    return statistics.median(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=len(KINDS))
    parser.add_argument(
        "--dataset", default="", help=f"shards to train on (default: made at {BENCH_DATASET})"
    )
    parser.add_argument("--storage", default="s3://resnet/runs")
    parser.add_argument("--kinds", default=",".join(KINDS), help="what to break, in turn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if "RAY_ADDRESS" not in os.environ or "MLFLOW_TRACKING_URI" not in os.environ:
        sys.exit(
            "the local stack is not in the environment: run `python -m orchestrator.stack up` "
            'and `eval "$(python -m orchestrator.stack env)"`'
        )
    # the harness polls checkpoint folders while they upload: each poll would warn about them
    logging.getLogger("orchestrator.checkpoint").setLevel(logging.ERROR)
    wanted = [k for k in args.kinds.split(",") if k]
    unknown = set(wanted) - set(KINDS)
    if unknown:
        sys.exit(f"--kinds: unknown {sorted(unknown)}; choose from {','.join(KINDS)}")
    st = stack()
    if set(wanted) & set(TWO_NODES) and st.cfg.ray_loopback_only:
        sys.exit(
            f"--kinds {','.join(TWO_NODES)} need a second Ray node, and the stack's Ray head "
            "listens on loopback only: start it with STACK_RAY_LOOPBACK_ONLY=false"
        )
    ctx = {
        "common": [
            f"data.url={args.dataset or make_dataset(BENCH_DATASET)}",
            f"checkpoint.storage={args.storage}",
            f"tracking.experiment={EXPERIMENT}",
        ],
        "storage": args.storage,
        "spec": CHAOS_SPEC,
        "node": SecondNode(st.gcs_address, st.dir / "logs" / "chaos-second-node.log"),
    }
    results: dict[str, list[kinds.Result]] = {k: [] for k in wanted}
    try:
        base = baselines(set(wanted[: args.trials]), ctx)
        rng = random.Random(args.seed)
        for i in range(args.trials):
            kind = wanted[i % len(wanted)]
            try:
                r = run_trial(kind, ctx, base, rng)
            except Exception as err:  # noqa: BLE001 - the bench's own bug fails one trial
                r = kinds.Result(kind, f"chaos-{kind}", what=f"bench error: {err!r}")
                r.status = "BROKE"
            results[kind].append(r)
            print(r.line(), flush=True)
            if r.log_tail:
                print(f"  {r.name}'s last output:\n{r.log_tail}", flush=True)
    finally:
        ctx["node"].stop()
    for line in summary({k: results[k] for k in KINDS if results.get(k)}):  # the order
        print(line, flush=True)


if __name__ == "__main__":
    main()
