"""Where a job's start-up seconds go: named marks in one process, said in one line.

The driver marks its phases (imports, pre-flight, lease, tracking sweep) and says them before Ray
Train starts the workers; rank 0 marks its own (imports, trainer, resume, tracking, first batch,
first step) and says them after its first step. Each line carries the absolute time of its first
mark, so the gap between the two lines is Ray Train's controller and worker-group start
(bench/overhead.py joins them). A process says its line once; later marks are ignored.
"""

from __future__ import annotations

import itertools
import logging
import os
import time

_marks: list[tuple[str, float]] = []
_said = False


def process_start() -> float:
    """When this process started (Unix time), from /proc; now where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def start(at: float | None = None) -> None:
    """Begin the clock (at `at`, else now); marks before a start count from the process's."""
    global _said
    _marks.clear()
    _marks.append(("start", time.time() if at is None else at))
    _said = False


def mark(phase: str) -> None:
    """The phase that ended now."""
    if _said:
        return
    if not _marks:
        _marks.append(("start", process_start()))
    _marks.append((phase, time.time()))


def said() -> bool:
    """Whether this process has said its line (its start-up is over)."""
    return _said


def line(who: str) -> str:
    """`startup of WHO: t0=T; phase 1.23 s, ... = total S s`, once; later calls say ''."""
    global _said
    if _said or len(_marks) < 2:
        return ""
    _said = True
    parts = [
        f"{phase} {t - before:.2f} s" for (_, before), (phase, t) in itertools.pairwise(_marks)
    ]
    total = _marks[-1][1] - _marks[0][1]
    return f"startup of {who}: t0={_marks[0][1]:.3f}; {', '.join(parts)} = {total:.2f} s"


def first_step(say: bool) -> None:
    """After a step: the first time, mark it and (where `say`) log the process's line."""
    if _said:
        return
    mark("first step")
    text = line(who="rank 0" if say else "a rank")
    if say:
        logging.getLogger("orchestrator.train").info("%s", text)
