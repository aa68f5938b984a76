"""Ray Train callbacks a job's run installs (launch.fit_on_ray): an error no restart can fix
ends the run at once (`fail_fast`), and an elastic group commits its step before Ray resizes it
(`commit_before_resize`); two of Ray's own it leaves out where they only start an actor
(`torch_trainer`)."""

from __future__ import annotations

import functools
import logging
from typing import Any

from orchestrator.runtime import NotRetried, retryable
from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)


@functools.cache  # one class per kind of caller, and one warning, a process
def torch_trainer(from_job_driver: bool = False) -> type:
    """Ray Train's TorchTrainer, less the default callbacks that only start a helper actor our
    jobs have no use for. Each is one more Python process importing Ray and Ray Train (1.5-2.5
    CPU-seconds, docs/benchmarks.md) at a job's start, while its workers start:

    - Ray Datasets' callback, when a job passes no Ray Datasets (ours never do: each worker
      streams its WebDataset shards itself): a DatasetManager actor at every worker group's
      start.
    - The PlacementGroupCleaner's callback, when the trainer runs in a job's driver
      (`from_job_driver`): a detached actor that removes the worker group's placement group
      should the controller die while its owner lives on. A driver's controller dies with the
      driver, and Ray's GCS removes the placement groups of a job whose driver is gone (a
      SIGKILLed driver's too: tests/test_fault_tolerance); a driver whose controller failed
      ends its job. A study's trial, whose Tune actor can outlive its controller, keeps it.

    The callback list is Ray's developer API (DataParallelTrainer._create_default_callbacks);
    where it is gone, the trainer is Ray's own, which costs that CPU and nothing else, and that
    is said once."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback as ray_datasets
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback as pg_cleaner,
        )
    except ImportError:
        ray_datasets = pg_cleaner = None  # type: ignore[assignment, misc]
    if ray_datasets is None or not hasattr(TorchTrainer, "_create_default_callbacks"):
        log.warning(
            "this Ray's TorchTrainer has no default callback list to leave its Ray Datasets "
            "and placement-group cleaner callbacks out of: each job's start also starts a "
            "DatasetManager and a PlacementGroupCleaner actor (1.5-2.5 CPU-seconds each); "
            "update orchestrator/ray_callbacks.torch_trainer for it"
        )
        return TorchTrainer
    unused = (pg_cleaner,) if from_job_driver else ()

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            # Train V2's method at run time; mypy reads Ray's V1 TorchTrainer
            callbacks = super()._create_default_callbacks()  # type: ignore[misc]
            left_out = unused if self.datasets else (*unused, ray_datasets)
            return [cb for cb in callbacks if not isinstance(cb, left_out)]

    return Trainer


def fail_fast() -> Any:
    """A Ray Train callback that ends the run at once when a worker fails with an error no
    restart can fix (`runtime.retryable`: a bad spec, missing data, NonFiniteLoss).

    Ray Train (2.x, V2) retries every worker-group error up to FailureConfig.max_failures
    and has no per-error setting; an exception raised by a callback on the controller is a
    ControllerError, which its DefaultFailurePolicy never retries. Lost workers and other
    errors still go through max_failures."""
    from ray.train import UserCallback

    class FailFast(UserCallback):
        def after_exception(
            self, run_context: Any, worker_exceptions: dict[int, Exception]
        ) -> None:
            for rank, wrapped in sorted(worker_exceptions.items()):
                # Ray wraps a worker's exception in UserExceptionWithTraceback, which keeps the
                # original as `_base_exc` (ray/train/v2/_internal/exceptions.py); a lost
                # worker's RayActorError has none and stays retryable
                err = getattr(wrapped, "_base_exc", wrapped)
                if not retryable(err):
                    raise NotRetried(f"rank {rank}: {type(err).__name__}: {err}")

    return FailFast()


def commit_before_resize(spec: JobSpec) -> Any:
    """A Ray Train callback of an elastic job. Ray resizes a running group (growing it when the
    cluster has room again) by stopping it and starting a new one from the latest commit; first,
    every worker commits the step it is on and waits (orchestrator.preemption), so the new group
    resumes there instead of at the last scheduled checkpoint. Ray's callback interfaces for the
    controller and the worker group are its developer API (ray.train.v2 ... callback)."""
    import ray
    from ray.train.v2._internal.execution.callback import (
        ControllerCallback,
        WorkerGroupCallback,
    )
    from ray.train.v2._internal.execution.controller.state import ResizingState

    from orchestrator import preemption

    timeout_s = spec.checkpoint.grace_s  # as long as a signal's save may take to its step

    class CommitBeforeResize(ControllerCallback, WorkerGroupCallback):
        def __init__(self) -> None:
            self.group: Any = None  # the running worker group, on the controller
            self.resizing = False  # the resize to come is of that group, running

        def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
            # Ray resizes a running group from ResizingState; a restart after a failure or a
            # reclaim comes from RestartingState, its group failed (a reclaimed node's workers
            # are gone, and committed before its deadline): nothing to ask, nothing to warn of
            self.resizing = isinstance(previous_state, ResizingState)

        def after_worker_group_start(self, worker_group: Any) -> None:
            self.group = worker_group

        def before_worker_group_shutdown(self, worker_group: Any) -> None:
            self.group = None

        def after_worker_group_abort(self, worker_group_context: Any) -> None:
            self.group = None

        def before_controller_execute_resize_decision(self, resize_decision: Any) -> None:
            group = self.group
            # None: a first start or a restart, nothing runs; not started: a start that failed
            # after after_worker_group_start, which no shutdown hook follows
            if group is None or not group.has_started() or not self.resizing:
                return
            asks = [
                w.actor.execute.remote(preemption.commit_before_resize, timeout_s)
                for w in group.get_workers()
            ]
            try:  # an error here would fail the job: the resize goes ahead all the same
                done = all(ray.get(asks, timeout=timeout_s + 30))
                why = f"not within checkpoint.grace_s={timeout_s:g} s"
            except Exception as err:  # noqa: BLE001 - a lost worker, a timeout: said, then on
                done, why = False, f"{type(err).__name__}: {err}"
            if not done:
                print(
                    f"warning: job {spec.name}: Ray resizes its worker group to "
                    f"{resize_decision.num_workers} workers, and the workers did not commit "
                    f"their step first ({why}): the new group resumes from the "
                    "latest commit",
                    flush=True,
                )

    return CommitBeforeResize()
