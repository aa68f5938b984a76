"""When the training loop checkpoints (every_iters, every_minutes) and when it stops (a
preemption notice), decided alike on every rank.

Without Ray (`--local`, torchrun under Slurm or Kubernetes) a preemption arrives as a signal:
SIGTERM (Kubernetes, `scancel`), or `checkpoint.preempt_signal` (Slurm's `--signal=USR1@120`).
Its handler only notes it and arms a timer of `checkpoint.grace_s`. After every optimizer step
the loop asks `StepBoundary.poll`; once a rank has the notice, every rank saves the same step,
commits it, and stops with `runtime.Terminated` (the run is marked KILLED, the process exits
with 128 + the signal's number). If no step ends before the timer (a stuck step), `Terminated`
is raised wherever the loop is, as a SIGTERM did before: the last committed checkpoint stands.
Under Ray the loop runs off the main thread, where Python installs no handler. There a reclaim
arrives as a drain of the node (a spot instance's notice, KubeRay's pod deletion: docs/
operators-guide.md, "Spot and preemptible nodes"), which Ray Train reports through
`ray.train.get_preemption_info()`. Every `checkpoint.preemption_poll_every` steps each rank
asks (a barrier: every rank asks at the same steps, and all get rank 0's answer); on a new
notice every rank saves the step at once and commits it before the next step, rank 0 logs it
once, and training goes on until the deadline is near (`RayNotices.last_save_due`): then every
rank commits once more and waits. Ray restarts the worker group when the node's deadline passes
(a preemption, counted against scaling.max_preemption_failures, never max_failures) and the
restart resumes from that last commit, on fewer workers if the job is elastic: no completed
step is lost.

`checkpoint.every_minutes` saves once that long has passed since the last save of any kind.

An elastic group that Ray resizes (growing back when the cluster has room again) is stopped
and started anew, resuming from the latest commit. Before that, Ray Train's controller asks
every worker (`commit_before_resize`, from orchestrator/ray_callbacks.py): every rank commits
the step it is on and waits, as before a preemption deadline, so the larger group resumes
there and no completed step is trained twice.

Agreement: the signal reaches ranks at different steps and their clocks differ, so each rank's
figures (the signal, whether its clock says a save is due, Ray's last-save and resize asks) go
into an all-reduce (MAX) of five integers on a gloo group, on the host: started without waiting
(async_op) after step s, read after step s+1. Every rank acts on the same figures at the same
step, one step late, and no step waits for the device (docs/operators-guide.md, "Preemption
without Ray", has its cost).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.runtime import Terminated, distributed, preemption_source
from orchestrator.spec import CheckpointConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What every rank does at this step boundary."""

    save: bool = False  # checkpoint this step
    stop_signal: int = 0  # then stop, for this signal (0: go on)
    # commit the save before the next step (a Ray preemption notice: the node may be gone
    # before the next save would commit it)
    commit: bool = False
    notice: str = ""  # a new Ray preemption notice arrived (what it said), once per notice
    # after this save's commit, train no more: wait this long for the reclaim (Ray's notice:
    # the last commit before its deadline, so no completed step is lost)
    wait_s: float = 0.0
    resize: bool = False  # Ray is about to resize the group: the commit is its resume point

    @property
    def reason(self) -> str:
        return signal.Signals(self.stop_signal).name if self.stop_signal else ""


# Ray Train's controller, about to resize this worker's elastic group, asks it to commit first:
# set from the worker actor's own thread (commit_before_resize), read at the step boundary
_resize_asked = threading.Event()
_resize_committed = threading.Event()


def commit_before_resize(timeout_s: float) -> bool:
    """Run on a Ray Train worker by the controller before it resizes the group: ask the loop to
    commit the step it is on at its next step boundary, and wait for that commit (False if it
    did not come within `timeout_s`)."""
    _resize_asked.set()
    return _resize_committed.wait(timeout_s)


def resize_committed() -> None:
    """The loop committed the step a resize asked for: `commit_before_resize` returns."""
    _resize_committed.set()


class NoticeSignals:
    """SIGTERM and `preempt_signal` set a flag instead of ending the process. The first one
    arms a timer: if the loop has not reached a step boundary `grace_s` later, `Terminated`
    is raised where it stands."""

    def __init__(self, preempt_signal: str, grace_s: float) -> None:
        self.signals = sorted({signal.SIGTERM, signal.Signals[preempt_signal]})
        self.grace_s = grace_s
        self.received = 0  # the first notice's signal number
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Take over the signals; False off the main thread (Ray's workers): Python allows
        handlers only there."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in [*self.signals, signal.SIGALRM]:
            self._previous[sig] = signal.getsignal(sig)
        for sig in self.signals:
            signal.signal(sig, self._noted)
        signal.signal(signal.SIGALRM, self._grace_expired)
        return True

    def uninstall(self) -> None:
        """Cancel the timer and give the signals back their previous handlers."""
        self.disarm()
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def disarm(self) -> None:
        """A step boundary came in time: the timer must not cut the save short."""
        if self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _noted(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:  # a repeat (torchrun forwards what Slurm also sent) changes nothing
            self.received = signum
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _grace_expired(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(self.received).name
        raise Terminated(
            f"{name}: no step ended within checkpoint.grace_s={self.grace_s:g} s; the last "
            "committed checkpoint stands",
            self.received,
        )


class RayNotices:
    """Ray Train's preemption notices, asked every `every` steps through `ask` (ray.train.
    get_preemption_info: a barrier, so every rank asks at the same steps and gets the same
    answer). `check` returns a notice once: a repeat of it changes nothing, a notice that
    names another node or deadline (Ray merges them) is new."""

    # Ray restarts the group this long after a notice that names no deadline (its default)
    NO_DEADLINE_S = 120.0

    def __init__(
        self, ask: Callable[[], Any], every: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.ask, self.every, self.clock = ask, every, clock
        self.seen: tuple[tuple[str, ...], int | None] | None = None
        self.count = 0  # notices acted on by this worker group
        self.deadline: float | None = None  # the newest notice's deadline (unix seconds)
        self.noticed_at = 0.0  # when it came (this rank's clock)
        self.margin: float | None = None  # the last save's lead on the deadline, once measured

    def check(self, step: int) -> str:
        """After `step` steps: what a new notice says ("" if none, or not asked this step)."""
        if step % self.every:
            return ""
        info = self.ask()
        if info is None:
            return ""
        nodes = dict(info.preempted_node_to_ranks)
        key = (tuple(sorted(nodes)), info.deadline_ms)
        if key == self.seen:
            return ""
        self.seen = key
        self.count += 1
        self.noticed_at = self.clock()
        self.deadline = (
            info.deadline_ms / 1000
            if info.deadline_ms is not None
            else self.noticed_at + self.NO_DEADLINE_S
        )
        self.margin = None
        return describe_notice(nodes, info.deadline_ms)

    def last_save_due(self) -> bool:
        """After a notice: whether the last save before its deadline is due. The margin is
        measured at the first step boundary after the notice: twice what the notice's save
        and a step took (the decision reaches every rank one step late), plus 5 s."""
        if self.deadline is None:
            return False
        now = self.clock()
        if self.margin is None:
            self.margin = 2 * (now - self.noticed_at) + 5.0
        return now + self.margin >= self.deadline


def describe_notice(nodes: dict[str, list[int]], deadline_ms: int | None) -> str:
    """`nodes` (node id -> the job's ranks there) and the time left, for one log line."""
    where = ", ".join(
        f"node {node[:12]} (ranks {', '.join(map(str, sorted(ranks)))})"
        for node, ranks in sorted(nodes.items())
    )
    if deadline_ms is None:
        left = "no deadline given (Ray restarts the group 120 s after the notice)"
    else:
        left = f"{deadline_ms / 1000 - time.time():.0f} s to its deadline"
    return f"{where}: {left}"


class StepBoundary:
    """Asked after every optimizer step whether to save now and whether to stop after it.
    Build it on every rank at the same point (it may create a process group)."""

    def __init__(
        self, cfg: CheckpointConfig, rank: int, ask_ray: Callable[[], Any] | None = None
    ) -> None:
        """`ask_ray`: Ray's preemption notice (default: the Ray Train worker's, from
        runtime.preemption_source; None outside Ray)."""
        self.rank = rank
        self.notices = NoticeSignals(cfg.preempt_signal, cfg.grace_s)
        ask = ask_ray or preemption_source()
        self.ray = RayNotices(ask, cfg.preemption_poll_every) if ask else None
        self.every_iters, self.every_s = cfg.every_iters, cfg.every_minutes * 60
        # the same answer on every rank: all run the loop in the main thread, or none
        self.listens = threading.current_thread() is threading.main_thread()
        self.group: Any = None
        if distributed() and (self.listens or self.every_s or self.ray is not None):
            self.group = dist.new_group(backend="gloo")  # host tensors, whatever the device
        self._saved_step, self._saved_at = -1, time.monotonic()
        self._vote: tuple[Any, torch.Tensor] | None = None
        self._seen = 0  # the notice this rank has logged

    def install(self) -> None:
        if self.listens:
            self.notices.install()

    def uninstall(self) -> None:
        if self.listens:
            self.notices.uninstall()

    def poll(self, step: int, saved_step: int) -> Decision:
        """The decision after `step` steps; `saved_step` is the newest save's step (a save
        restarts the every_minutes clock)."""
        on_schedule = bool(self.every_iters) and step % self.every_iters == 0
        notice = self.ray.check(step) if self.ray is not None else ""
        if notice:
            self._ray_notice(step, saved_step, notice)
            return Decision(save=saved_step != step, commit=True, notice=notice)
        if not self.listens and not self.every_s and self.ray is None:
            return Decision(save=on_schedule)
        now = time.monotonic()
        if saved_step != self._saved_step:
            self._saved_step, self._saved_at = saved_step, now
        received = self.notices.received
        if received and not self._seen:
            self._seen = received
            log.warning(
                "rank %d: %s arrived during step %d: saving at step %d at the latest, then "
                "stopping",
                self.rank,
                signal.Signals(received).name,
                step,
                step + (self.group is not None),
            )
        due = bool(self.every_s) and now - self._saved_at >= self.every_s
        # rank 0's clock decides the last save before a Ray notice's deadline, for all
        last = int(self.ray is not None and self.rank == 0 and self.ray.last_save_due())
        figures = torch.tensor([received, int(due), saved_step, last, int(_resize_asked.is_set())])
        signum, due_at, last, resize = self._agree(figures)
        if signum:
            self.notices.disarm()
            return Decision(save=saved_step != step, stop_signal=signum)
        if resize:
            _resize_asked.clear()  # once: should the group go on after all, it trains on
            if self.rank == 0:
                log.warning(
                    "step %d: Ray is resizing the elastic worker group: committing this step, "
                    "from which the new group resumes",
                    step,
                )
            wait = self.notices.grace_s + 60.0  # the controller stops this group meanwhile
            return Decision(save=saved_step != step, commit=True, wait_s=wait, resize=True)
        if last and self.ray is not None and self.ray.deadline is not None:
            wait = max(self.ray.deadline - self.ray.clock(), 0.0) + 60.0
            if self.rank == 0:
                log.warning(
                    "step %d: the last commit before the preemption deadline (in %.0f s); "
                    "training stops here until the node goes (or for %.0f s, if it stays)",
                    step, self.ray.deadline - self.ray.clock(), wait,
                )  # fmt: skip
            self.ray.deadline = None  # once per notice
            return Decision(save=saved_step != step, commit=True, wait_s=wait)
        # a vote started before the newest save asks for a save that is already there
        return Decision(save=on_schedule or due_at == saved_step)

    def _ray_notice(self, step: int, saved_step: int, notice: str) -> None:
        """Say a new Ray notice once (rank 0: every rank got the same one)."""
        if self.rank:
            return
        what = "committing it" if saved_step == step else "saving and committing it"
        log.warning(
            "preemption notice at step %d: %s; %s now, then training on: Ray restarts the "
            "workers when the node goes and they resume from step %d",
            step,
            notice,
            what,
            step,
        )

    def _agree(self, mine: torch.Tensor) -> tuple[int, int, int, int]:
        """(signal, the saved step the clock was due at or -2, the last save before a Ray
        deadline is due, Ray asks to commit before a resize) agreed by every rank: alone, this
        rank's figures; else those all ranks sent one step ago (nothing the first time)."""
        if self.group is None:
            received, due, saved, last, resize = mine.tolist()
            return received, saved if due else -2, last, resize
        agreed = (0, -2, 0, 0)
        if self._vote is not None:
            work, figures = self._vote
            work.wait()
            received, due, saved, last, resize = figures.tolist()
            agreed = (received, saved if due else -2, last, resize)
        work = dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._vote = (work, mine)
        return agreed
