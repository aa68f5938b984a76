"""Running a study's trials: on Ray Tune (a Tuner whose trials each run one ordinary job), or
`--local`, one job after another in subprocesses without Ray.

On Tune, a trial of one worker trains in its own Tune actor, which reserves that worker's
resources (orchestrator.study.in_actor: no Ray Train controller or worker group to start, about
10 s of a trial on the 2-core box); any other trial, or every one with
study.trial_runner=ray_train, is a small driver (no CPU reserved: TRIAL_DRIVER) that runs its
job as `ray job submit -- python jobs/X.py` would (orchestrator.launch.fit_on_ray: its Ray Train
worker group, restarts, checkpoints), its workers holding the resources. Either way the trial
takes its job's lease and MLflow run, and its actor is reused from trial to trial, so its
imports are paid once. What follows the training (the registered models and paper report,
orchestrator.publish.finished, and Fig. 7) runs in the study's driver once Tune has ended the
trial (FollowUps), so the next trial starts at once and never waits on a finished one's
bookkeeping.
Tune runs as many trials at once as the cluster's CPUs (or GPUs) fit trials' workers, or
study.max_concurrent. Tune's state lives in the checkpoint storage under
studies/<study>-<grid fingerprint>; a resubmitted study restores it (Tuner.restore), so trials
that finished are not run again and the others restart, each job resuming from its own
checkpoints. Should Tune's state be gone or the grid have changed, a trial whose job already
FINISHED at its last iteration returns at once instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from orchestrator.launch import storage_for_ray, uses_gpu, worker_resources
from orchestrator.spec import JobSpec, from_dict
from orchestrator.study.grid import Study, Trial
from orchestrator.study.in_actor import trains_in_actor, tune_max_failures

log = logging.getLogger(__name__)

# What a trial that runs its job under Ray Train reserves itself: no CPU (its job's worker group
# holds those, and a CPU per trial would keep a 2-CPU machine to one trial), but Tune needs a
# non-empty request: 64 MiB of Ray's logical memory, for the trial's Python process. A trial
# that trains in its actor reserves its worker's resources besides (trial_request).
TRIAL_DRIVER: dict[str, float] = {"memory": 64 * 2**20}


@dataclass
class Outcome:
    """How a trial's execution ended, as its runner saw it (MLflow holds the figures)."""

    job: str
    ok: bool
    error: str = ""
    skipped: bool = False  # finished before: not run again
    wall_s: float = 0.0  # the job's own time in the trial (its lease, Ray Train, the loop)
    phases: dict[str, float] = field(default_factory=dict)  # seconds, by phase (PHASES)


# A trial's phases, in the order they run (the keys run_trial and FollowUps time)
PHASES = {
    "t_startup": "trial start-up",  # Tune's actor to run_trial's first line
    "t_check": "finished-before check",
    "t_preflight": "pre-flight",
    "t_fit": "job (lease, workers, loop)",
    "t_publish": "models + report (driver)",
    "t_fig7": "Fig. 7 (driver)",
}


# ---------------------------------------------------------------------------- one trial


def finished_before(spec: JobSpec) -> bool:
    """The job has committed its last iteration and its MLflow run is FINISHED (or tracking
    is off): there is nothing left to run."""
    from orchestrator.checkpoint import CheckpointStore
    from orchestrator.checkpoint_refs import spec_checkpoints_url

    latest = CheckpointStore(spec_checkpoints_url(spec)).latest()
    if latest is None or latest.step < spec.schedule.max_iters:
        return False
    if not (spec.tracking.enabled and os.environ.get("MLFLOW_TRACKING_URI")):
        return True
    try:
        from orchestrator.tracking.runs import job_run

        found = job_run(spec.tracking.experiment, spec.name)
        return found is not None and found[1].info.status == "FINISHED"
    except Exception as err:  # noqa: BLE001 - not known: run the job (it resumes at its end)
        log.warning("could not read the MLflow run of %s: %s", spec.name, err)
        return False


def measure_trial(spec: JobSpec) -> None:
    """Fig. 7 of a finished CIFAR trial, logged to its run (FollowUps runs it in the driver as
    the trial ends, beside the trials still training). Never raises: the study's summary
    measures whatever a trial is left without."""
    if not spec.model.name.startswith("cifar_") or not spec.tracking.enabled:
        return
    try:
        from orchestrator.paper import layer_responses as fig7
        from orchestrator.tracking.runs import job_run

        found = job_run(spec.tracking.experiment, spec.name)
        if found:
            client, run = found
            fig7.measure_once(client, run.info.run_id, spec.model.name)
    except Exception as err:  # noqa: BLE001 - the summary measures it instead
        from orchestrator.tracking.redaction import scrub

        log.warning("layer responses of %s not measured: %s", spec.name, scrub(err)[:500])


def follow_up(spec: JobSpec) -> dict[str, float]:
    """What a trial's job leaves to do once its workers are gone: its registered models and
    paper report, then Fig. 7; the seconds of each. Never raises (each part warns)."""
    from orchestrator.publish.finished import publish_finished_job

    t0 = time.perf_counter()
    publish_finished_job(spec)
    t1 = time.perf_counter()
    measure_trial(spec)
    return {"t_publish": t1 - t0, "t_fig7": time.perf_counter() - t1}


class FollowUps:
    """The follow-ups of the trials that ended, on a few threads of the study's driver (MLflow
    calls and torch release the GIL): started as Tune ends each trial (`on_trial_complete`,
    through tune_callback), waited for before the study's table (`wait`)."""

    def __init__(self, threads: int) -> None:
        self.pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max(1, threads), thread_name_prefix="trial-follow-up"
        )
        self.pending: dict[str, Future[dict[str, float]]] = {}
        self.started: dict[str, float] = {}  # job -> when Tune started its trial (Unix time)
        # no lock: Tune calls its callbacks, and run_on_tune calls wait, on the driver's thread

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with its state: the copy is inert (a restored Tuner's
        trials get their follow-ups from run_on_tune after fit)."""
        return {"pool": None, "pending": {}, "started": {}}

    def start(self, config: dict[str, Any], result: dict[str, Any] | None) -> None:
        if self.pool is None or not config or (result or {}).get("skipped"):
            return  # an inert copy, no spec, or finished before: published then
        spec = from_dict(JobSpec, config["spec"])
        if spec.name not in self.pending:
            self.pending[spec.name] = self.pool.submit(follow_up, spec)

    def wait(self) -> tuple[dict[str, dict[str, float]], float]:
        """Each job's follow-up seconds by phase, and how long this waited for them."""
        t0 = time.perf_counter()
        done = {}
        for job, future in self.pending.items():
            try:
                done[job] = future.result()
            except Exception as err:  # noqa: BLE001 - follow_up warns; this is a bug's net
                log.warning("the follow-up of %s failed: %s", job, err)
        if self.pool is not None:
            self.pool.shutdown()
        return done, time.perf_counter() - t0

    def tune_callback(self) -> Any:
        """A ray.tune Callback that starts each trial's follow-up as Tune ends the trial."""
        from ray import tune

        follow_ups = self

        class _Ended(tune.Callback):
            def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                job = (trial.config or {}).get("spec", {}).get("name")
                follow_ups.started.setdefault(job, time.time())

            def on_trial_complete(
                self, iteration: int, trials: list, trial: Any, **info: Any
            ) -> None:
                follow_ups.start(trial.config, trial.last_result)

        return _Ended()


def run_trial(config: dict[str, Any]) -> dict[str, Any]:
    """Tune's trainable: one job, resumed from its own checkpoints where it has any, trained in
    this actor (one worker) or under Ray Train; its follow-ups (models, report, Fig. 7) are the
    driver's (FollowUps)."""
    t_enter = time.time()  # the driver knows when Tune started the trial: start-up = the gap
    from orchestrator.job_lease import job_lease
    from orchestrator.launch import JobFailed
    from orchestrator.preflight import ResumePlan, preflight
    from orchestrator.study.allow_change import trial_allowance
    from orchestrator.study.in_actor import failed_in_this_submission, fit_in_actor, record_failure
    from orchestrator.tracking.runs import mark_job_run

    os.chdir(config["cwd"])  # the study's folder: relative data and storage paths
    spec = from_dict(JobSpec, config["spec"])
    t0 = time.perf_counter()
    if finished_before(spec):
        return {"job": spec.name, "skipped": 1, "job_wall_s": 0.0}
    failed = failed_in_this_submission(spec)
    if failed is not None:  # Tune's restart of a trial that failed for good: no second try
        raise failed
    t1 = time.perf_counter()
    # a refusal fails this trial alone, with its problems as the error
    checked = preflight(spec, trial_allowance(spec, config.get("allow_change", [])))
    t2 = time.perf_counter()
    in_actor = trains_in_actor(spec, config.get("trial_runner", "auto"))
    # its job's own lease: the same job submitted beside the study is refused, or refuses this;
    # an earlier attempt of this trial (its actor lost) held it under this same Ray job
    final: dict[str, float] = {}
    with job_lease(spec, retake_own_ray_job=in_actor):
        ResumePlan.record(checked.resume, spec)  # the changes --allow-change let through
        try:
            if in_actor:
                final = fit_in_actor(spec)
            else:
                from ray.tune.integration.ray_train import TuneReportCallback

                from orchestrator.launch import fit_on_ray

                fit_on_ray(spec, [TuneReportCallback()])
        except JobFailed as err:
            mark_job_run(spec.tracking.experiment, spec.name, "FAILED", error=err.error)
            record_failure(spec, err)  # Tune may restart the trial: it fails at once then
            raise
    t3 = time.perf_counter()
    phases = {"t_check": t1 - t0, "t_preflight": t2 - t1, "t_fit": t3 - t2}
    return {
        **final,
        "job": spec.name,
        "skipped": 0,
        "job_wall_s": t3 - t2,
        "t_enter": t_enter,
        **phases,
    }


def trial_request(config: dict[str, Any]) -> Any:
    """What Tune reserves for a trial (its actor): TRIAL_DRIVER, plus its worker's resources
    where it trains in the actor."""
    from ray.tune import PlacementGroupFactory

    spec = from_dict(JobSpec, config["spec"])
    need = dict(TRIAL_DRIVER)
    if trains_in_actor(spec, config.get("trial_runner", "auto")):
        cluster = {"GPU": float(config.get("cluster_gpus", 0))}
        need.update(worker_resources(spec, uses_gpu(spec, cluster)))
    return PlacementGroupFactory([need])


# ---------------------------------------------------------------------------- on Ray Tune


def trial_resources(spec: JobSpec, cluster: dict[str, float]) -> dict[str, float]:
    """What one trial's job holds while it runs: its workers (in its actor, or its group)."""
    each = worker_resources(spec, uses_gpu(spec, cluster))
    return {k: v * spec.scaling.num_workers for k, v in each.items()}


def concurrency(study: Study, trials: Sequence[Trial], cluster: dict[str, float]) -> int:
    """How many trials fit the cluster at once (the largest trial's worker group decides),
    capped by study.max_concurrent; at least 1."""
    fits = len(trials)
    for trial in trials:
        for resource, amount in trial_resources(trial.spec, cluster).items():
            if amount > 0:
                fits = min(fits, int(cluster.get(resource, 0) // amount))
    if study.max_concurrent:
        fits = min(fits, study.max_concurrent)
    return max(1, fits)


def tune_experiment(
    study: Study, fingerprint: str, allow: Sequence[str] = ()
) -> tuple[str, str, Any]:
    """(Tune's storage_path, the experiment's name, its pyarrow filesystem or None). Each
    --allow-change set has its own: a restored trial keeps the config it was saved with, so
    a study refused for a changed recipe and resubmitted with --allow-change starts a new
    Tune experiment (finished trials return at once, the others resume their checkpoints)."""
    storage, filesystem = storage_for_ray(f"{study.base.checkpoint.storage}/studies")
    name = f"{study.name}-{fingerprint}"
    if study.trial_runner != "auto":  # a restored trial keeps the runner it was saved with
        name += f"-{study.trial_runner}"
    if allow:
        name += "-allow-" + hashlib.sha256(",".join(sorted(allow)).encode()).hexdigest()[:6]
    return storage, name, filesystem


# Ray Tune's switch for its default per-trial loggers (CSV, JSON, TensorBoard)
TUNE_LOGGERS_OFF = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


def turn_off_tune_loggers(study: Study) -> str:
    """Turn Tune's own per-trial result files off in this process, unless the user set the
    switch either way; returns the line that says so ("" when the user decided). Each trial's
    metrics, params and curves are in its MLflow run; Tune would upload five more files per
    trial to the study's storage, and its TensorBoard logger imports torch in the driver before
    the first trial may start."""
    if TUNE_LOGGERS_OFF in os.environ:
        return ""
    os.environ[TUNE_LOGGERS_OFF] = "1"
    return (
        f"study {study.name}: Tune's own per-trial result files (CSV, JSON, TensorBoard) are "
        f"off; each trial's metrics are in its MLflow run ({TUNE_LOGGERS_OFF}=0 writes them too)"
    )


def run_on_tune(
    study: Study, trials: Sequence[Trial], fingerprint: str, allow: Sequence[str] = ()
) -> list[Outcome]:
    import ray

    if line := turn_off_tune_loggers(study):
        print(line, flush=True)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    cluster = ray.cluster_resources()
    at_once = concurrency(study, trials, cluster)
    follow_ups = FollowUps(at_once)
    tuner = _tuner(study, trials, fingerprint, at_once, follow_ups, allow)
    print(
        f"study {study.name}: {len(trials)} trials on Ray Tune, up to {at_once} at once "
        f"({_resources_text(trials[0].spec, cluster)} each)",
        flush=True,
    )
    if line := _runner_line(study, trials):
        print(line, flush=True)
    t0, started = time.perf_counter(), time.time()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    outcomes: dict[str, Outcome] = {}
    for result in (grid[i] for i in range(len(grid))):  # a ResultGrid indexes, not iterates
        config = result.config or {}  # every trial has its param_space config
        job = config["spec"]["name"]
        metrics = result.metrics or {}
        # a trial Tune restored as finished reports its old result: it did not run now
        before = metrics.get("timestamp", started) < started
        if result.error is not None:
            outcomes[job] = Outcome(job, False, _error_text(result.error))
            continue
        skipped = before or bool(metrics.get("skipped"))
        phases = {k: float(v) for k, v in metrics.items() if k in PHASES}
        if not skipped and job in follow_ups.started and "t_enter" in metrics:
            phases["t_startup"] = max(0.0, metrics["t_enter"] - follow_ups.started[job])
        outcomes[job] = Outcome(job, True, skipped=skipped, wall_s=metrics.get("job_wall_s", 0))
        outcomes[job].phases = phases
        if not skipped:  # a restored Tuner has no callback: its trials' follow-ups start here
            follow_ups.start(config, metrics)
    done, drained = follow_ups.wait()
    for job, seconds in done.items():
        if job in outcomes:
            outcomes[job].phases.update(seconds)
    _say_timing(list(outcomes.values()), wall, drained, at_once)
    return [outcomes.get(t.job, Outcome(t.job, False, "Tune has no result")) for t in trials]


def _tuner(
    study: Study,
    trials: Sequence[Trial],
    fingerprint: str,
    at_once: int,
    follow_ups: FollowUps,
    allow: Sequence[str],
) -> Any:
    """A new Tuner for the grid, or the one Tune saved for it (a resubmitted study)."""
    import ray
    from ray import tune

    storage, name, filesystem = tune_experiment(study, fingerprint, allow)
    trainable = tune.with_resources(run_trial, trial_request)
    space = {
        "spec": tune.grid_search([t.spec.to_dict() for t in trials]),
        "cwd": os.getcwd(),
        "allow_change": list(allow),  # each trial is allowed those its checkpoint differs in
        "trial_runner": study.trial_runner,
        "cluster_gpus": ray.cluster_resources().get("GPU", 0),  # scaling.use_gpu unset
    }
    path = f"{storage}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        print(f"study {study.name}: restoring Tune's state from {path}", flush=True)
        return tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            restart_errored=True,  # the job resumes from its own checkpoints
            param_space=space,
            storage_filesystem=filesystem,
        )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=at_once,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
            # run_trial keeps no state: an ended trial's actor runs the next, so a trial
            # pays no process start and no imports after the first of each slot
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            storage_filesystem=filesystem,
            # Ray Train restarts its jobs' workers (scaling.max_failures), Tune the trials that
            # train in their actors (the same budget; in_actor): a trial that still fails is
            # reported, and a resubmitted study restarts it
            failure_config=tune.FailureConfig(
                max_failures=tune_max_failures([t.spec for t in trials], study.trial_runner)
            ),
            callbacks=[follow_ups.tune_callback()],
            verbose=1,
        ),
    )


def _say_timing(outcomes: list[Outcome], wall: float, drained: float, at_once: int) -> None:
    """What Tune and the trials' phases took (bench/study.py reads these lines)."""
    ran = [o for o in outcomes if o.ok and not o.skipped]
    print(
        f"study timing: Tune wall {wall + drained:.1f} s (of which {drained:.1f} s waiting for "
        f"the last follow-ups); {len(ran)} trials ran, their jobs' own time "
        f"{sum(o.wall_s for o in ran):.1f} s in all, up to {at_once} at once",
        flush=True,
    )
    if ran:
        means = {
            label: sum(o.phases.get(key, 0.0) for o in ran) / len(ran)
            for key, label in PHASES.items()
        }
        print(
            "study phases (mean s per trial): "
            + ", ".join(f"{label} {v:.2f}" for label, v in means.items()),
            flush=True,
        )


def _runner_line(study: Study, trials: Sequence[Trial]) -> str:
    """How the trials run, said once where any trains in its Tune actor."""
    in_actor = [t for t in trials if trains_in_actor(t.spec, study.trial_runner)]
    if not in_actor:
        return ""
    line = (
        f"study {study.name}: {len(in_actor)} of {len(trials)} trials (one worker each) train in "
        "their Tune actors, without a Ray Train worker group; Tune restarts them within "
        "scaling.max_failures (study.trial_runner=ray_train: every trial under Ray Train)"
    )
    if any(t.spec.scaling.max_preemption_failures != -1 for t in in_actor):
        line += (
            "; scaling.max_preemption_failures is Ray Train's: Tune restarts a trial whose node "
            "was reclaimed without counting it (study.trial_runner=ray_train to cap reclaims)"
        )
    return line


def _trial_name(trial: Any) -> str:
    return str(trial.config["spec"]["name"])


def _resources_text(spec: JobSpec, cluster: dict[str, float]) -> str:
    need = trial_resources(spec, cluster)
    return " + ".join(f"{v:g} {k}" for k, v in need.items())


def _error_text(error: BaseException) -> str:
    """The job's own error where Tune wrapped it (RayTaskError keeps the original as cause)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return (text[-1] if text else type(cause).__name__)[:2000]


# ---------------------------------------------------------------------------- --local


def run_locally(trials: Sequence[Trial], allow: Sequence[str] = ()) -> list[Outcome]:
    """One trial after another, each `python -m orchestrator.study.trial SPEC --local` (so a
    trial of N workers runs under torchrun like any --local job), with the --allow-change
    fields its checkpoint differs in."""
    from orchestrator.study.allow_change import trial_allowance

    outcomes = []
    for trial in trials:
        if finished_before(trial.spec):
            print(f"trial {trial.job}: finished before, not run again", flush=True)
            outcomes.append(Outcome(trial.job, True, skipped=True))
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(trial.spec.to_dict(), f)
        print(f"trial {trial.job}: running", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "orchestrator.study.trial", f.name, "--local"]
        cmd += [f"--allow-change={field}" for field in trial_allowance(trial.spec, allow)]
        proc = subprocess.run(cmd, check=False, stderr=subprocess.PIPE, text=True)
        os.unlink(f.name)
        sys.stderr.write(proc.stderr[-20_000:])
        wall = time.perf_counter() - t0
        error = "" if proc.returncode == 0 else _last_error(proc.stderr, proc.returncode)
        outcomes.append(Outcome(trial.job, proc.returncode == 0, error, wall_s=wall))
    return outcomes


def _last_error(stderr: str, code: int) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or ln.startswith("error")]
    return (errors[-1] if errors else f"exit status {code}")[:2000]
