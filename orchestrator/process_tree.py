"""Stopping a process and everything it started, in order: the local stack's services and the
tests' extra Ray nodes."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil


def stop_tree(pid: int, grace_s: float = 15.0) -> None:
    """Stop a process and all its descendants (Ray workers leave the group): SIGTERM to the root
    first, so that a supervisor stops its children in its own order, then to whatever of the
    tree is left (3 s more for those); SIGKILL for what is still there after `grace_s`."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    deadline = time.monotonic() + grace_s
    # signalled all at once, Ray's GCS flushes its metrics to the dashboard agent stopped
    # beside it and waits on it for 30 s and more; `ray start --block` alone stops them in ~2 s
    _signal(root, signal.SIGTERM)
    _wait_gone([root], deadline)
    rest = [p for p in tree if _alive(p)]
    for p in rest:  # what the root's stop left (a job's driver), or all where the root hung
        _signal(p, signal.SIGTERM)
    for p in _wait_gone(rest, max(deadline, time.monotonic() + 3)):
        _signal(p, signal.SIGKILL)
    _wait_gone(tree, time.monotonic() + 5)
    with contextlib.suppress(ChildProcessError):  # started by this process: reap it
        os.waitpid(pid, os.WNOHANG)


def _signal(proc: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(sig)


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie: a zombie has stopped, whether or not its parent reaped it
    (psutil's own wait counts an unreaped one as alive, and waits out its whole timeout)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Poll until none of `procs` is alive or `deadline` passes; the ones still alive."""
    while (alive := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive
