"""Where a worker runs and how it talks to the launcher: rank, device, the distributed helpers
and SIGTERM handling, in one place (the training loop's graceful stop at a step boundary is
orchestrator.preemption's).

Drivers (launch, ensemble_eval, studies) import this module, never the training loop; it imports
torch only inside the helpers that need it, so a driver that never trains never loads torch.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.errors import OrchestratorError

if TYPE_CHECKING:
    import torch


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass
class Runtime:
    """Where this worker runs and how it talks to the launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=_cpu)
    report: Callable[[dict[str, float]], None] = lambda metrics: None
    tags: dict[str, str] = field(default_factory=dict)  # e.g. the Ray job id
    node: str = ""  # the Ray node id where this worker runs


def distributed() -> bool:
    """Whether a process group of more than one rank is up (collectives are then needed)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    """Sum (or `op`) `t` across ranks in place; a no-op in a single process."""
    if distributed():
        import torch.distributed as dist

        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if distributed():
        import torch.distributed as dist

        dist.barrier()


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The given rank and world size, else the process group's, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Terminated(BaseException):
    """SIGTERM (or checkpoint.preempt_signal) arrived: a cancelled job, a preempted node. Stop
    and mark the run KILLED; `signum` is the signal's number (a `--local` job exits with
    128 + signum, the shells' convention: 143 for SIGTERM)."""

    # a BaseException, not an OrchestratorError: `except Exception` on the way out must not
    # swallow a stop, as it would not swallow KeyboardInterrupt

    def __init__(self, message: str = "", signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # pickled across processes intact
        return type(self), (str(self), self.signum)


def raise_on_sigterm(
    error: type[BaseException] = Terminated, first: Callable[[], object] | None = None
) -> None:
    """Turn SIGTERM into `error`, raised in the main thread, so `finally`/`except` run.
    `first` runs before the raise: what must happen even if the unwinding is cut short."""

    def handler(signum: int, frame: Any) -> None:
        if first is not None:
            first()
        raise error(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (Ray runs the loop in a thread): Ray handles it
        pass


# Ray's preemption notice, for the step boundary (orchestrator.preemption) of a Ray Train
# worker: launch's Ray worker sets it to ray.train.get_preemption_info before the loop starts;
# None elsewhere (`--local`, a test). One training function per Ray Train worker process.
_preemption_source: Callable[[], Any] | None = None


def set_preemption_source(ask: Callable[[], Any] | None) -> None:
    """Where this worker asks whether a node of its job is being reclaimed (None: nowhere)."""
    global _preemption_source
    _preemption_source = ask


def preemption_source() -> Callable[[], Any] | None:
    """The callable `set_preemption_source` gave, or None outside a Ray Train worker."""
    return _preemption_source


class NotRetried(OrchestratorError, RuntimeError):
    """A worker failed with an error `retryable` says no restart can fix; the message names
    the rank and the error (raised on Ray's controller by ray_callbacks.fail_fast)."""

    retryable = False


def retryable(err: BaseException) -> bool:
    """Whether restarting the workers could fix `err`. An error class says no with
    `retryable = False` (a bad spec, missing or bad data, a non-finite loss, a resume that
    cannot be exact): the same spec on the same data fails the same way. Anything else (a
    lost worker, S3 down, a collective that timed out) may pass on a restart."""
    return getattr(type(err), "retryable", True) is not False
