"""A one-worker trial trained in its own Tune actor, with no Ray Train controller or worker group.

Ray Train's controller and worker-group start were about 10 s of a trial's 15.8 s fixed cost on
the 2-core box (docs/benchmarks.md, "Studies on Ray Tune"); a trial of one worker needs neither:
its Tune actor reserves that worker's resources (scaling.cpus_per_worker, a GPU where the trial
uses one) and runs the loop itself, as `--local` runs one process. What Ray Train did for such a
trial is done here or by Tune:

- restarts: an error in the loop fails the attempt and Tune restarts the trial (its
  FailureConfig.max_failures is the trials' scaling.max_failures; the job resumes from its own
  checkpoints); Tune does not count an actor lost with a reclaimed node (RayActorError.preempted),
  as Ray Train does not count a preemption. scaling.max_preemption_failures is Ray Train's alone.
- an error no restart can fix (`runtime.retryable`: NonFiniteLoss, bad data) is recorded in Ray's
  key-value store under this Ray job: Tune's further attempts of the trial fail at once with it
  (`failed_in_this_submission`), instead of training again to the same error. A resubmitted study
  is another Ray job: it tries again.
- a reclaim's notice: `NodeDrains` asks Ray's GCS whether this actor's node is draining (what Ray
  Train's preemption watcher asks), so the loop commits the step in progress and again before the
  deadline (orchestrator.preemption), and Tune's restart resumes there.

`study.trial_runner=ray_train` runs every trial under Ray Train instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from orchestrator.launch import JobFailed, job_failed
from orchestrator.spec import JobSpec

KV_NAMESPACE = "orchestrator-study"


def trains_in_actor(spec: JobSpec, runner: str) -> bool:
    """Whether this trial trains in its Tune actor: one worker, not elastic, runner "auto"."""
    return runner == "auto" and spec.scaling.num_workers == 1 and not spec.scaling.elastic


@dataclass(frozen=True)
class Drain:
    """What `ray.train.get_preemption_info` gives a worker, for the one rank of this trial."""

    deadline_ms: int | None
    preempted_node_to_ranks: dict[str, list[int]] = field(default_factory=dict)


class NodeDrains:
    """Asked by the loop's step boundary: whether this actor's node is being drained (a spot
    reclaim, a pod deletion). Asks Ray's GCS at most once every `every_s`."""

    def __init__(self, node: str, every_s: float = 1.0) -> None:
        self.node, self.every_s = node, every_s
        self._asked_at = -float("inf")
        self._answer: Drain | None = None

    def __call__(self) -> Drain | None:
        now = time.monotonic()
        if now - self._asked_at >= self.every_s:
            self._asked_at, self._answer = now, self._ask()
        return self._answer

    def _ask(self) -> Drain | None:
        import ray

        # Ray Train's own watcher reads the same table (ray/train/v2/_internal/execution/
        # preemption.py): {node id: deadline in ms, 0 for none}
        draining = ray._private.state.state.get_draining_nodes() or {}
        if self.node not in draining:
            return None
        deadline = int(draining[self.node]) or None
        return Drain(deadline, {self.node: [0]})


def fit_in_actor(spec: JobSpec) -> dict[str, float]:
    """Run the job's loop in this process (a Tune actor); returns its final metrics. An error
    no restart can fix becomes JobFailed; any other is raised as it is, for Tune to restart the
    trial."""
    import ray
    import torch

    from orchestrator import startup_clock
    from orchestrator.runtime import (
        Runtime,
        destroy_process_group,
        retryable,
        set_preemption_source,
    )
    from orchestrator.tracking.tags import RAY_CLUSTER_TAG, RAY_JOB_TAG
    from orchestrator.train import run_worker

    startup_clock.start()
    ctx = ray.get_runtime_context()
    node = ctx.get_node_id()
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave this actor: it is device 0 here
    device = torch.device("cuda:0") if ray.get_gpu_ids() else torch.device("cpu")
    final: dict[str, float] = {}
    rt = Runtime(
        device=device,
        report=final.update,  # the run's newest figures, once, at its end
        tags={RAY_JOB_TAG: ctx.get_job_id(), RAY_CLUSTER_TAG: ctx.get_session_name()},
        node=node,
    )
    set_preemption_source(NodeDrains(node))
    try:
        run_worker(spec.to_dict(), rt)
    except Exception as err:
        if retryable(err):
            raise  # Tune restarts the trial: it resumes from its checkpoints
        # the trial records it (run_trial): Tune's further attempts then fail at once
        raise job_failed(spec, f"{type(err).__name__}: {err}", restarted=False) from err
    finally:
        set_preemption_source(None)
        destroy_process_group()  # DeepSpeed's one-rank group: the actor runs the next trial
    return final


def _key(spec: JobSpec) -> str:
    import ray

    return f"failed/{ray.get_runtime_context().get_job_id()}/{spec.name}"


def record_failure(spec: JobSpec, failed: JobFailed) -> None:
    """Tune's further attempts of this trial in this Ray job fail at once with `failed`."""
    from ray.experimental import internal_kv

    body = json.dumps({"message": str(failed)[:4000], "error": failed.error[:4000]}).encode()
    internal_kv._internal_kv_put(_key(spec), body, overwrite=True, namespace=KV_NAMESPACE)


def failed_in_this_submission(spec: JobSpec) -> JobFailed | None:
    """How an earlier attempt of this trial in this Ray job (this study's submission) failed
    for good, or None."""
    from ray.experimental import internal_kv

    found = internal_kv._internal_kv_get(_key(spec), namespace=KV_NAMESPACE)
    if not found:
        return None
    recorded = json.loads(found)
    return JobFailed(str(recorded["message"]), str(recorded["error"]))


def tune_max_failures(specs: list[JobSpec], runner: str) -> int:
    """Tune's FailureConfig.max_failures: the restarts the in-actor trials may spend (-1 where
    any allows them without end); 0 where no trial trains in its actor (Ray Train restarts
    those, and a trial that still fails is reported)."""
    counts = [s.scaling.max_failures for s in specs if trains_in_actor(s, runner)]
    if not counts:
        return 0
    return -1 if -1 in counts else max(counts)
