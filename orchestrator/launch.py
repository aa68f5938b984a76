"""Spec -> a running job: Ray Train's TorchTrainer, or `--local` without Ray.

Every job file ends with `main(SPEC)`:

    python jobs/imagenet_r152.py [--dry-run] [--local] [--resume-from URL] [section.key=value ...]
    ray job submit -- python jobs/imagenet_r152.py scaling.num_workers=16

`--local` runs the same worker loop in this process, or in N processes under torchrun when
scaling.num_workers > 1; it needs only torch (how GPU checks run where Ray is absent).

Before either starts a worker, the pre-flight (orchestrator.preflight) checks the model, the
dataset, the checkpoint storage and the resume; a refusal exits 2 with a message per problem.
A resubmission must match its checkpoint's spec (resume_changes: recipe with --allow-change).
Then the driver takes the job's lease (orchestrator.job_lease: one writer per job): a second
submission of a live job exits 2 naming the holder; `--take-over` replaces a dead holder's.
On Ray, a worker error no restart can fix (`runtime.retryable`) ends the job at once instead
of after scaling.max_failures restarts (`FailFast`). Once a job has finished and its workers are
released, the driver (run_ray; run_local's rank 0) registers its models and writes its paper
report (orchestrator.publish.finished).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

from orchestrator import s3, startup_clock
from orchestrator.checkpoint_refs import spec_checkpoints_url
from orchestrator.cli import job_keys_help, run_cli
from orchestrator.errors import OrchestratorError, UsageError
from orchestrator.job_lease import job_lease
from orchestrator.preflight import ResumePlan, check_cluster, in_torchrun_child, preflight
from orchestrator.ray_callbacks import commit_before_resize, fail_fast, torch_trainer
from orchestrator.runtime import NotRetried
from orchestrator.spec import JobSpec, SpecError, apply_overrides, to_yaml
from orchestrator.tracking.tags import RAY_CLUSTER_TAG, RAY_JOB_TAG


def parse_args(
    argv: list[str], spec: JobSpec | None = None, adjusted: bool = False
) -> argparse.Namespace:
    """A job file's command line; its --help lists `spec`'s keys and values (the job file's,
    not the dataclasses' defaults); `adjusted`: the job file adjusts the spec after overrides."""
    parser = argparse.ArgumentParser(
        description=f"Run job {spec.name if spec else 'spec'} on Ray (--local: without Ray).",
        epilog=job_keys_help(spec, adjusted) if spec else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="section.key=VALUE")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved spec, run the pre-flight checks, print them and exit",
    )
    parser.add_argument(
        "--local", action="store_true", help="run without Ray (torchrun for N workers)"
    )
    parser.add_argument(
        "--resume-from", help="fork from a checkpoint folder: .../checkpoints/step-NNNNNNNN"
    )
    parser.add_argument("--allow-change", action="append", metavar="FIELD[,FIELD]",
                        help="recipe fields that may differ from the checkpoint's spec (said, "
                        "and recorded in the job's run)")  # fmt: skip
    parser.add_argument(
        "--take-over",
        action="store_true",
        help="take the job's lease from a holder you know is dead (before it expires)",
    )
    return parser.parse_intermixed_args(argv)  # overrides before and after the flags


def resolve(
    spec: JobSpec, argv: list[str], finalize: Callable[[JobSpec], JobSpec] | None = None
) -> tuple[JobSpec, argparse.Namespace]:
    args = parse_args(argv, spec, adjusted=finalize is not None)
    overrides = list(args.overrides)
    if args.resume_from:
        overrides.append(f"checkpoint.resume_from={args.resume_from}")
    spec = apply_overrides(spec, overrides)
    if (args.local or os.environ.get("ORCH_LOCAL") == "1") and not any(
        o.startswith("scaling.num_workers=") for o in overrides
    ):  # --local: one process per GPU present (torchrun's children decide alike), said once
        import torch

        gpus = torch.cuda.device_count() if spec.scaling.use_gpu is not False else 0
        if not in_torchrun_child():
            print(
                f"job {spec.name}: --local starts {max(1, gpus)} worker process(es): "
                f"{gpus} GPU(s) in use here (the job file's scaling.num_workers="
                f"{spec.scaling.num_workers} is a cluster's; set scaling.num_workers=N to choose)",
                file=sys.stderr,
            )
        spec = apply_overrides(spec, [f"scaling.num_workers={max(1, gpus)}"])
    return (finalize(spec).validate() if finalize else spec), args


def main(
    spec: JobSpec,
    argv: list[str] | None = None,
    finalize: Callable[[JobSpec], JobSpec] | None = None,
) -> int:
    """Entry point of every job file; `finalize` adjusts the spec after overrides (a recipe
    rule that depends on an overridden field, like ResNet-110's warm-up). Exit code 2, with
    the reasons, for a bad or refused spec (orchestrator.cli.run_cli)."""
    return run_cli(lambda args: _main(spec, args, finalize), argv)


def _main(spec: JobSpec, argv: list[str], finalize: Callable[[JobSpec], JobSpec] | None) -> int:
    startup_clock.mark("driver start and imports")
    spec, args = resolve(spec, argv, finalize)
    if args.dry_run:
        print(to_yaml(spec), end="")
    checked: list[str] = []
    if not in_torchrun_child():  # under torchrun the parent process checked already
        checked = _preflight(spec, lambda s: preflight(s, args.allow_change))
        startup_clock.mark("pre-flight")
    for line in checked:  # comments, so that a dry run's output stays the spec's YAML
        print(f"# pre-flight ok: {line}", flush=True)
    if args.dry_run:
        return 0
    resume = getattr(checked, "resume", None)
    if resume is not None and resume.finished:  # says so, with its run's address
        return resume.say_finished(spec)  # and starts nothing
    if args.local or os.environ.get("ORCH_LOCAL") == "1":
        if in_torchrun_child():  # the parent holds the job's lease
            run_local(spec)
        else:
            with job_lease(spec, args.take_over, on_lost=stop_this_job):
                ResumePlan.record(resume, spec)
                run_local(spec)
    else:
        run_ray(spec, take_over=args.take_over, resume=resume)
    return 0


def _preflight(spec: JobSpec, check: Callable[[JobSpec], list[str]]) -> list[str]:
    """`check(spec)`'s lines; a refusal is a UsageError listing each problem under the job."""
    try:
        return check(spec)
    except SpecError as err:  # one line per refusal, under the job's name
        problems = getattr(err, "problems", [str(err)])
        listed = "".join(f"\n  - {problem}" for problem in problems)
        raise UsageError(f"pre-flight refused job {spec.name}:{listed}") from err


def stop_this_job(message: str) -> None:
    """What a driver does when it finds its lease taken by another (orchestrator.job_lease): it
    stops as on a SIGTERM (on Ray: the job is stopped; --local: a preemption notice)."""
    print(f"{message}; stopping this job", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


# ------------------------------------------------------------------------ without Ray


def run_local(spec: JobSpec) -> dict[str, float]:
    """One process, or this job file again under torchrun for scaling.num_workers processes.
    A preemption notice (SIGTERM, checkpoint.preempt_signal) commits a checkpoint at the next
    step boundary, then the job exits with 128 + the signal's number (orchestrator.preemption)."""
    import torch

    n = spec.scaling.num_workers
    if spec.scaling.elastic and "LOCAL_RANK" not in os.environ:
        low, high = spec.scaling.worker_range()
        print(
            f"job {spec.name}: scaling.num_workers=[{low},{high}] is elastic only on Ray; "
            f"--local runs {high} workers on this machine (the same global batch, so a later "
            "run on Ray at any size in the range resumes its checkpoints)",
            file=sys.stderr,
        )
    if n > 1 and "LOCAL_RANK" not in os.environ:
        code = _torchrun(spec, n)
        if code:
            raise SystemExit(code)
        return {}
    from orchestrator.runtime import Runtime, Terminated, destroy_process_group
    from orchestrator.train import run_worker

    use_gpu = torch.cuda.is_available() if spec.scaling.use_gpu is None else spec.scaling.use_gpu
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if use_gpu else "gloo", **_launcher_store(rank, world))
    try:
        result = run_worker(spec.to_dict(), Runtime(rank, world, local_rank, device))
    except Terminated as stop:
        if rank == 0:
            print(f"job {spec.name} stopped ({stop}); resubmit it to resume", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    finally:
        destroy_process_group()
    if rank == 0:  # the workers are done: models and report from here, on the CPU
        from orchestrator.publish.finished import publish_finished_job

        publish_finished_job(spec)
        _print_runs_view(spec)
    return result


# torchrun SIGKILLs its workers this long after passing a signal on: time for the step in
# progress (checkpoint.grace_s) and for writing the checkpoint after it
SAVE_ALLOWANCE_S = 300


def _torchrun(spec: JobSpec, n: int) -> int:
    """This job file under torchrun, n workers; its exit code. The notices a preemption sends
    this process (Kubernetes: SIGTERM to the container's first process; Slurm: --signal) go on
    to torchrun, which passes them to every worker; then the exit code is 128 + the signal's."""
    notices = sorted({signal.SIGTERM, signal.Signals[spec.checkpoint.preempt_signal]})
    handled = {"SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", *(s.name for s in notices)}
    # the rendezvous store is this process's, on loopback (`--standalone` listens on every
    # interface); held until torchrun ends
    store, endpoint = _loopback_store()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-conf=is_host=0",
        f"--rdzv-id={uuid.uuid4().hex}",
        f"--nproc-per-node={n}",
        f"--signals-to-handle={','.join(sorted(handled))}",
        f"--shutdown-timeout={math.ceil(spec.checkpoint.grace_s) + SAVE_ALLOWANCE_S}",
        # torchrun's parser would take --local for one of its own options: say it by environment
        *[a for a in sys.argv if a != "--local"],
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "ORCH_LOCAL": "1", **_loopback_env(endpoint)})
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in notices}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too: wait for its workers
                received.append(signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    del store  # torchrun and its workers are gone
    return 128 + received[0] if received and code else code


# `--local` is one machine: its rendezvous, the ranks' store and their collectives stay on
# loopback. torch's TCPStore server listens on every interface whatever its host name, except on
# a socket it is handed: the launcher binds one to 127.0.0.1 and hosts the one store; torchrun's
# agent joins it (is_host=0) and opens no store of its own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE),
# and the ranks build their process group on it (_launcher_store), not on MASTER_ADDR:MASTER_PORT
_RDZV_ENV = "ORCH_RDZV_ENDPOINT"


def _loopback_store() -> tuple[Any, str]:
    """A TCPStore server listening on 127.0.0.1 only, and its host:port."""
    import socket
    from datetime import timedelta

    from torch.distributed import TCPStore

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    store = TCPStore(
        "127.0.0.1",
        port,
        is_master=True,
        master_listen_fd=sock.detach(),  # the store owns the socket from here
        wait_for_workers=False,
        multi_tenant=True,
        timeout=timedelta(minutes=10),
    )
    return store, f"127.0.0.1:{port}"


def _loopback_env(endpoint: str) -> dict[str, str]:
    """torchrun's environment for a loopback rendezvous at `endpoint`; gloo's and NCCL's
    sockets on the loopback interface unless the user named one."""
    return {
        _RDZV_ENV: endpoint,
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        "NCCL_SOCKET_IFNAME": os.environ.get("NCCL_SOCKET_IFNAME", "lo"),
    }


def _launcher_store(rank: int, world: int) -> dict[str, Any]:
    """init_process_group's store, rank and world size: the launcher's loopback store, under a
    prefix per torchrun restart; none (MASTER_ADDR, MASTER_PORT) where no launcher hosts one."""
    endpoint = os.environ.get(_RDZV_ENV)
    if not endpoint:
        return {}
    from torch.distributed import PrefixStore, TCPStore

    host, port = endpoint.rsplit(":", 1)
    client = TCPStore(host, int(port), is_master=False, multi_tenant=True)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {
        "store": PrefixStore(f"/worker/attempt_{attempt}", client),
        "rank": rank,
        "world_size": world,
    }


# ------------------------------------------------------------------------ on Ray


def _ray_worker(config: dict[str, Any]) -> None:
    startup_clock.start()  # Ray may have started this process long before
    import ray
    import ray.train
    import ray.train.torch

    from orchestrator.runtime import Runtime, set_preemption_source
    from orchestrator.train import run_worker

    # the step boundary asks Ray whether a node of the job is being reclaimed
    set_preemption_source(ray.train.get_preemption_info)
    ctx = ray.train.get_context()
    rt = Runtime(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        device=ray.train.torch.get_device(),
        report=lambda metrics: ray.train.report(metrics),
        tags={  # Ray job ids repeat across clusters: the session names the cluster (liveness)
            RAY_JOB_TAG: ray.get_runtime_context().get_job_id(),
            RAY_CLUSTER_TAG: ray.get_runtime_context().get_session_name(),
        },
        node=ray.get_runtime_context().get_node_id(),
    )
    startup_clock.mark("imports")
    run_worker(config["spec"], rt)


def storage_for_ray(storage: str) -> tuple[str, Any]:
    """Ray Train's storage_path and filesystem for s3:// (same endpoint as every client)."""
    if s3.is_s3(storage):
        bucket, key = s3.split_url(storage)
        return f"{bucket}/{key}".rstrip("/"), s3.pyarrow_filesystem()
    return os.path.abspath(storage), None


class JobFailed(OrchestratorError, RuntimeError):
    """A job's Ray Train run failed; the message says where it stands and what killed it."""

    def __init__(self, message: str, error: str = "") -> None:
        super().__init__(message)
        self.error = error or message  # the cause alone, as the job's MLflow run records it

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # a Tune trial's error travels pickled
        return type(self), (str(self), self.error)


def _check_ray_address() -> None:
    if os.environ.get("RAY_ADDRESS", "").startswith("http"):
        raise SystemExit(
            "RAY_ADDRESS points at a Ray job server: submit the job there with "
            f"`ray job submit -- python {' '.join(sys.argv)}` "
            "(or unset RAY_ADDRESS for a local Ray)"
        )


def fit_on_ray(
    spec: JobSpec, callbacks: list[Any] | None = None, from_job_driver: bool = False
) -> Any:
    """Run one job as a Ray Train TorchTrainer and return its result; raises JobFailed.
    A job driver (run_ray, `from_job_driver`) and a study's trial (orchestrator.study) both run
    jobs this way."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    use_gpu = uses_gpu(spec)
    storage_path, filesystem = storage_for_ray(spec.checkpoint.storage)
    # our loop commits its own checkpoints (every rank's files, then a marker) and reports none
    # to Ray, so Ray's CheckpointConfig has nothing to keep; Ray's storage holds the run's
    # own state next to them under the same name
    trainer = torch_trainer(from_job_driver)(
        _ray_worker,
        train_loop_config={"spec": spec.to_dict()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # ray.train.ScalingConfig is V2's at run time (a (min, max) range, the resize interval)
        scaling_config=ScalingConfig(  # type: ignore[call-arg]
            num_workers=worker_count(spec),  # type: ignore[arg-type]
            use_gpu=use_gpu,
            resources_per_worker=worker_resources(spec, use_gpu),
            placement_strategy=spec.scaling.placement,
            elastic_resize_monitor_interval_s=spec.scaling.resize_interval_s,
        ),
        # ray.train.RunConfig is Train V2's at run time, which takes worker_runtime_env; mypy
        # reads Ray's V1 class
        run_config=RunConfig(  # type: ignore[call-arg]
            name=spec.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=failure_config(spec),
            callbacks=[
                fail_fast(),
                *([commit_before_resize(spec)] if spec.scaling.elastic else []),
                *(callbacks or []),
            ],
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not use_gpu else None,
        ),
    )
    startup_clock.mark("ray train import and set-up")
    if clock := startup_clock.line("the driver"):  # the rest: Ray Train, then rank 0's
        print(clock, flush=True)
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        raise
    except Exception as err:
        raise _failure(spec, err) from err


def worker_count(spec: JobSpec) -> int | tuple[int, int]:
    """Ray Train's num_workers: a count, or (min, max) for an elastic job (Ray starts the group
    at the most workers the cluster has room for in the range, and resizes it on a restart
    or, growing, every scaling.resize_interval_s)."""
    return spec.scaling.worker_range() if spec.scaling.elastic else spec.scaling.num_workers


def failure_config(spec: JobSpec) -> Any:
    """Ray Train's FailureConfig: worker failures spend scaling.max_failures, node reclaims
    (preemptions) scaling.max_preemption_failures, so that reclaims never end a long run.

    The loop commits its checkpoint on the notice, long before the node's deadline, with its
    own collectives (torch's): Ray's relax_collectives_on_preemption (for Ray's report and
    notice barriers) and preemption_grace_s (survivors running past the deadline, when the
    step after it would wait on ranks already gone) stay off."""
    from ray.train import FailureConfig

    return FailureConfig(  # type: ignore[call-arg]  # V2's at run time; mypy reads V1's
        max_failures=spec.scaling.max_failures,
        max_preemption_failures=spec.scaling.max_preemption_failures,
    )


def uses_gpu(spec: JobSpec, cluster: dict[str, float] | None = None) -> bool:
    """Whether the job's Ray workers take a GPU: scaling.use_gpu, or (unset) whether the
    cluster (default: the connected Ray cluster's resources) has one."""
    if spec.scaling.use_gpu is not None:
        return spec.scaling.use_gpu
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    return cluster.get("GPU", 0) > 0


def worker_resources(spec: JobSpec, use_gpu: bool) -> dict[str, float]:
    """What each Ray Train worker of the job reserves."""
    return {"CPU": spec.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}


def _failure(spec: JobSpec, err: Exception) -> JobFailed:
    cause = getattr(err, "controller_failure", None)  # ray.train.ControllerError's
    if isinstance(cause, NotRetried):
        return job_failed(spec, str(cause), restarted=False)
    return job_failed(spec, f"{type(err).__name__}: {err}", restarted=True)


def job_failed(spec: JobSpec, error: str, restarted: bool) -> JobFailed:
    """The JobFailed of a job that ended on `error`: after its restarts, or at once (`restarted`
    False: an error no restart can fix), naming its latest committed checkpoint."""
    from orchestrator.checkpoint import CheckpointStore

    latest = CheckpointStore(spec_checkpoints_url(spec)).latest()
    where = f"step {latest.step} ({latest.url})" if latest else "none yet"
    if restarted:
        how = f"after {spec.scaling.max_failures} restarts (scaling.max_failures)"
        then = "Resubmit the same name to resume from it"
    else:
        how = "at once, not restarted: a restart cannot fix this error"
        then = "Fix the cause, then resubmit the same name to resume from it"
    message = (
        f"job {spec.name} FAILED {how}. Latest committed checkpoint: {where}. {then}. "
        f"Cause: {error}"
    )
    return JobFailed(message, error)


def run_ray(spec: JobSpec, take_over: bool = False, resume: ResumePlan | None = None) -> Any:
    """A job file's driver on Ray: the job's lease (refused, exit 2, while another live driver
    holds it: before any worker starts), then the job, with `ray job stop` and failures
    reported; the lease is released at the end, whatever the outcome."""
    _check_ray_address()
    import ray

    if not ray.is_initialized():  # before our SIGTERM handler: ray.init installs its own
        ray.init(log_to_driver=True)
    startup_clock.mark("ray connect")
    for line in _preflight(spec, check_cluster):  # what needs Ray's nodes
        print(f"# pre-flight ok: {line}", flush=True)
    # taken connected, so that it names this Ray job and cluster, and a holder whose Ray job
    # has ended on this cluster is known to be gone
    with job_lease(spec, take_over, on_lost=stop_this_job):
        ResumePlan.record(resume, spec)  # the recipe changes --allow-change let through
        return _run_ray(spec)


def _run_ray(spec: JobSpec) -> Any:
    from orchestrator.publish.finished import publish_finished_job
    from orchestrator.runtime import raise_on_sigterm
    from orchestrator.tracking.runs import mark_job_run

    startup_clock.mark("cluster check and lease")
    # Ray Train's import (Ray Data, pandas and pyarrow with it: a second or two) before the
    # sweep's thread starts importing MLflow: both are Python work under this process's one
    # GIL, and Ray Train's is on the path to the first step; the sweep's then runs while Ray
    # starts the worker group
    import ray.train.torch  # noqa: F401

    sweeping = None
    if spec.tracking.enabled:  # runs of this experiment whose job died unseen: close them
        from orchestrator.tracking.liveness import sweep_in_background
        from orchestrator.tracking.tracker import set_http_defaults

        set_http_defaults()
        # it imports MLflow too: now, not inside the SIGTERM handler below
        sweeping = sweep_in_background(spec.tracking.experiment, starting_job=spec.name)
    # `ray job stop`, a preempted head node: Ray's fit() aborts in order on KeyboardInterrupt.
    # The loop runs in Ray's worker threads, which never see the signal, so the run is marked
    # here, first: Ray SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S after the SIGTERM (3 s
    # unless set), and the orderly abort can take longer than that on a busy machine.
    marked: list[bool] = []

    def mark_killed() -> None:
        if spec.tracking.enabled and not marked:
            marked.append(True)
            mark_job_run(spec.tracking.experiment, spec.name, "KILLED")

    raise_on_sigterm(KeyboardInterrupt, first=mark_killed)
    try:
        result = fit_on_ray(spec, from_job_driver=True)
        if sweeping is not None:  # on a failure it is left: a later sweep redoes what it left
            sweeping.join()
    except KeyboardInterrupt:
        mark_killed()  # Ctrl-C; after SIGTERM the handler has marked it already
        print(f"job {spec.name} stopped; resubmit the same name to resume", file=sys.stderr)
        raise SystemExit(143) from None
    except JobFailed as err:
        print(str(err), file=sys.stderr)
        if spec.tracking.enabled:
            mark_job_run(spec.tracking.experiment, spec.name, "FAILED", error=err.error)
        raise SystemExit(1) from None
    print(f"job {spec.name} finished; checkpoints under {spec_checkpoints_url(spec)}")
    try:  # the worker group is released: the driver registers the models, on its CPU
        publish_finished_job(spec)
    except KeyboardInterrupt:
        print(
            f"job {spec.name} stopped while publishing; its training is complete: register its "
            "models with python -m orchestrator.publish --run RUN_ID",
            file=sys.stderr,
        )
        raise SystemExit(143) from None
    _print_runs_view(spec)
    return result


def _print_runs_view(spec: JobSpec) -> None:
    """Where the job's runs are compared: the experiment's runs table (not MLflow's home)."""
    if spec.tracking.enabled:
        from orchestrator.tracking.runs import experiment_runs_view

        view = experiment_runs_view(spec.tracking.experiment)
        if view:
            print(f"MLflow: runs of experiment {spec.tracking.experiment!r}: {view}")
