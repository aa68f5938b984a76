"""Ray Train callbacks a job's run installs (launch.fit_on_ray): an error no restart can fix
ends the run at once (`fail_fast`), and an elastic group commits its step before Ray resizes it
(`commit_before_resize`)."""

from __future__ import annotations

from typing import Any

from orchestrator.runtime import NotRetried, retryable
from orchestrator.spec import JobSpec


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

    from orchestrator import preemption

    timeout_s = spec.checkpoint.grace_s  # as long as a signal's save may take to its step

    class CommitBeforeResize(ControllerCallback, WorkerGroupCallback):
        def __init__(self) -> None:
            self.group: Any = None  # the running worker group, on the controller

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
            if group is None or not group.has_started():
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
