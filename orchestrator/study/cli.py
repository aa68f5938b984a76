"""Entry point of every study file: `main(STUDY)`.

    ray job submit -- python jobs/cifar10_table6.py [section.key=value ...] [study.KEY=VALUE ...]
    python jobs/cifar10_table6.py --dry-run     # the grid, resources, GPU-hours; runs nothing
    python jobs/cifar10_table6.py --local       # trials one after another, without Ray

Overrides apply to every trial's spec; an override of a key the cells set (an axis, e.g.
model.name on Table 6), of seed or of the trials' parent run is refused (exit 2) naming the way:
study.cells=LABEL,LABEL (a subset of the cells), study.seeds=N. study.max_concurrent,
study.img_per_s (the dry run's measured img/s per GPU), study.trial_runner (auto: a one-worker
trial trains in its Tune actor; ray_train: every trial under Ray Train) change the study
itself, and name=NEW
(or study.name=NEW) renames it: its trials' names and its parent run follow.
The exit status is 0 when every trial finished, 1 when one did not (the summary names it),
2 for a bad study or spec.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from orchestrator.cli import job_keys_help, run_cli
from orchestrator.job_lease import study_lease
from orchestrator.spec import SpecError
from orchestrator.study.allow_change import say_allowance, study_allowance, trial_allowance
from orchestrator.study.grid import Study, Trial, apply_study_overrides
from orchestrator.tracking.redaction import scrub
from orchestrator.tracking.uri import tracking_uri

log = logging.getLogger(__name__)


def parse_args(argv: list[str], study: Study | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a study: a grid of jobs (overrides: section.key=value, study.KEY=VALUE).",
        epilog=_keys_help(study) if study else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value or study.KEY=VALUE")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the grid and its cost, check, run nothing"
    )
    parser.add_argument("--local", action="store_true", help="trials one after another, no Ray")
    parser.add_argument(
        "--take-over",
        action="store_true",
        help="take the study's lease from a driver you know is dead (before it expires)",
    )
    parser.add_argument(
        "--allow-change",
        action="append",
        metavar="FIELD[,FIELD]",
        help="trials resuming their checkpoints may continue under these changed recipe "
        "fields (e.g. schedule.max_iters to train the grid longer); recorded in each run",
    )
    return parser.parse_intermixed_args(argv)  # overrides may follow a flag, as on a job


def _keys_help(study: Study) -> str:
    """--help's list of every trial's keys (the recipe's values), and the keys the cells set."""
    axes = ", ".join(sorted({key for cell in study.cells for key in cell if key != "label"}))
    grid = "prints the grid, its resources and GPU-hours, and checks"
    return job_keys_help(study.base, study.finalize is not None, grid) + (
        f"\n\nset by the cells, not by overrides (study.cells=LABEL,... chooses cells): {axes}; "
        f"seeds 0..{study.seeds - 1} (study.seeds=N)"
    )


def main(study: Study, argv: list[str] | None = None) -> int:
    """Entry point of every study file; exit code 2, with the reason, for a bad study or spec
    (orchestrator.cli.run_cli)."""
    return run_cli(lambda args: _main(study, args), argv)


def _main(study: Study, argv: list[str]) -> int:
    args = parse_args(argv, study)
    study = apply_study_overrides(study, args.overrides)
    trials = study.trials()
    fingerprint = study.fingerprint()
    allow = study_allowance(args.allow_change, trials)  # a field that never applies: exit 2
    if args.dry_run:
        return dry_run(study, trials, allow)
    if study.base.tracking.enabled:  # refused before any trial, not in each trial's pre-flight
        tracking_uri(f"study {study.name}", "or set tracking.enabled=false")
    local = args.local or os.environ.get("ORCH_LOCAL") == "1"
    if not local:  # connected first, so that the lease names the study's Ray job and cluster
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=True)
    # one driver per study (orchestrator.job_lease): a second submission of a live study is
    # refused (exit 2) before anything runs; each trial's job takes its own lease too
    with study_lease(study.base.checkpoint.storage, study.name, args.take_over):
        return _run(study, trials, fingerprint, local, allow)


def _run(study: Study, trials: list[Trial], fingerprint: str, local: bool, allow: list[str]) -> int:
    client = _mlflow_client(study)
    parent = None
    if client is not None:
        from orchestrator.study.parent import open_parent
        from orchestrator.tracking.liveness import sweep_experiment

        sweep_experiment(study.experiment)  # trial runs of a study stopped before: close them
        try:
            parent = open_parent(client, study, trials, fingerprint)
            trials = study.trials(parent_run_id=parent)
        except Exception as err:  # noqa: BLE001 - a down server never stops training
            print(
                f"MLflow: no parent run ({type(err).__name__}: {scrub(err)[:300]}); the trials "
                "run and track on their own; resubmit the study once the server answers to get "
                "its table (finished trials are not run again)",
                file=sys.stderr,
            )
            client = None
    if said := say_allowance(allow, trials):
        print(said, flush=True)
    if local:
        from orchestrator.study.run import run_locally

        outcomes = run_locally(trials, allow)
    else:
        from orchestrator.study.run import run_on_tune

        outcomes = run_on_tune(study, trials, fingerprint, allow)
    return summarize(study, trials, outcomes, client, parent)


def _mlflow_client(study: Study) -> Any:
    if not study.base.tracking.enabled:  # with it on, _main checked MLFLOW_TRACKING_URI
        print("MLflow: tracking off (tracking.enabled=false): no parent run, no study table")
        return None
    from orchestrator.tracking.tracker import load_mlflow

    load_mlflow()
    from mlflow import MlflowClient

    return MlflowClient()


# ---------------------------------------------------------------------------- dry run


def dry_run(study: Study, trials: Sequence[Trial], allow: Sequence[str] = ()) -> int:
    """The grid: cells, seeds, each trial's resources and GPU-hours, and the checks (each
    cell's first trial's, allowed the --allow-change fields that changed since its checkpoint)."""
    from orchestrator.paper.comparison import markdown_table
    from orchestrator.preflight import preflight
    from orchestrator.study.estimate import estimate

    print(f"study {study.name}" + (f" ({study.paper})" if study.paper else ""))
    print(
        f"{len(study.cells)} cells x {study.seeds} seeds = {len(trials)} trials; MLflow "
        f"experiment {study.experiment!r}; trials at once: "
        + (
            f"{study.max_concurrent} (study.max_concurrent)"
            if study.max_concurrent
            else "as many as the cluster's resources fit"
        )
    )
    rows, total = [], 0.0
    problems: dict[str, Any] = {}
    for cell in study.grid_cells():
        mine = [t for t in trials if t.cell.label == cell.label]
        spec = mine[0].spec
        est = estimate(spec, study.img_per_s or None)
        total += est.gpu_hours * len(mine)
        overrides = " ".join(f"{k}={v}" for k, v in cell.overrides.items())
        rows.append(
            [
                cell.label,
                overrides,
                str(len(mine)),
                f"{spec.scaling.num_workers} workers x ({spec.scaling.cpus_per_worker:g} CPU"
                + (" + 1 GPU)" if spec.scaling.use_gpu is not False else ")"),
                f"{spec.schedule.max_iters} x {spec.scaling.global_batch}",
                f"{est.img_per_s_per_gpu:,.0f}",
                f"{est.gpu_hours:.2f}",
                est.how,
            ]
        )
        try:
            preflight(spec, trial_allowance(spec, allow))
        except SpecError as err:
            for problem in getattr(err, "problems", [str(err)]):
                problems.setdefault(problem, []).append(cell.label)
    head = [
        "cell",
        "overrides",
        "seeds",
        "per trial",
        "iters x batch",
        "img/s/GPU",
        "GPU-h/trial",
        "rate from",
    ]
    print(markdown_table(head, rows, "llrlrrrl"))
    print(
        f"\ntotal: {total:.1f} GPU-hours on H200-class GPUs (compute only; "
        "orchestrator/study/estimate.py states the formula)"
    )
    print(
        "trial jobs: " + ", ".join(t.job for t in trials[:4]) + (", ..." if len(trials) > 4 else "")
    )
    if problems:
        print("\npre-flight problems (each fails its trials alone when run):", file=sys.stderr)
        for problem, cells in problems.items():
            where = "every cell" if len(cells) == len(study.cells) else ", ".join(cells)
            print(f"  - {where}: {problem}", file=sys.stderr)
        return 2
    print("pre-flight ok for every cell")
    return 0


# ---------------------------------------------------------------------------- the end


def summarize(
    study: Study,
    trials: Sequence[Trial],
    outcomes: Sequence[Any],
    client: Any,
    parent: str | None,
) -> int:
    """Read every trial back from MLflow, log the study table and figures on the parent run,
    and print the trials' states and the table; 1 if any trial did not finish."""
    by_job = {o.job: o for o in outcomes}
    failed = [o for o in outcomes if not o.ok]
    print(
        f"\nstudy {study.name}: {len(outcomes) - len(failed)}/{len(outcomes)} trials finished"
        + (
            f" ({sum(o.skipped for o in outcomes)} before, not run again)"
            if any(o.skipped for o in outcomes)
            else ""
        )
    )
    for o in failed:
        print(f"  FAILED {o.job}: {o.error}", file=sys.stderr)
    from orchestrator.checkpoint_refs import spec_checkpoints_url

    first = spec_checkpoints_url(trials[0].spec).rstrip("/")
    print(f"checkpoints: {first} (and each trial's beside it, named {study.name}-CELL-sSEED)")
    if client is None or parent is None:
        return 1 if failed else 0
    from orchestrator.study.parent import close_parent, log_layer_responses, log_results
    from orchestrator.study.results import read_trial
    from orchestrator.tracking.runs import experiment_id, runs_view

    exp_id = experiment_id(client, study.experiment)
    results = [
        read_trial(client, exp_id, t, by_job[t.job].error if t.job in by_job else "")
        for t in trials
    ]
    for r in results:  # the runner's word wins over a run left RUNNING by a dead trial
        outcome = by_job.get(r.trial.job)
        if outcome is not None and not outcome.ok and r.finished:
            r.status = "FAILED"
    stale = changed_since(results, [o.job for o in outcomes if o.skipped])
    if stale:
        print(
            f"study {study.name}: {len(stale)} trial(s) finished before under other settings "
            f"and were not run again: {'; '.join(stale[:5])}"
            + (f"; and {len(stale) - 5} more" if len(stale) > 5 else "")
            + ". Their results are the old settings'; name=NEW runs the changed study anew",
            file=sys.stderr,
        )
    dataset = trials[0].spec.data.url or "synthetic"
    print(log_results(client, parent, study, results, dataset))
    measured = log_layer_responses(client, parent, results)
    if measured:
        print(f"Fig. 7: {measured} trial(s) without their own layer responses measured here")
    status = close_parent(client, parent, results)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    print(
        f"MLflow: study {study.name} parent run {parent} ({status}); its trials are nested "
        f"under it: {runs_view(uri, exp_id)} (filter: tags.orchestrator.study = '{study.name}')"
    )
    return 1 if failed else 0


def changed_since(results: Sequence[Any], skipped: Sequence[str]) -> list[str]:
    """`JOB (key old -> new, ...)` for each trial not run again (finished before) whose run's
    params (the spec it trained with) differ from its spec now; tracking.* aside (where it
    logs, not what it trains)."""
    from orchestrator.tracking.redaction import redact

    out = []
    for r in results:
        if r.trial.job not in skipped or not r.params:
            continue
        now = redact(r.trial.spec.flat())
        diffs = [
            f"{k} {r.params[k]} -> {v}"
            for k, v in now.items()
            if k in r.params and r.params[k] != v and not k.startswith("tracking.")
        ]
        if diffs:
            out.append(f"{r.trial.job} ({', '.join(diffs[:3])}{', ...' if len(diffs) > 3 else ''})")
    return out
