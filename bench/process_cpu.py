"""Every process's CPU time by what the process is, sampled: what bench/job_cpu.py tables for
one job, and bench/suite_timeline.py for a whole test run.

    python bench/process_cpu.py [--seconds 30]   # what sampling itself costs, on this box now

Sampling is not free: the suite's run samples every second from its main process, so its own
CPU is part of the run it measures.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import threading
import time

import psutil

HEAD = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "DashboardAgent")
JOB_FILE = re.compile(r"jobs/\w+\.py")
# kinds a test run adds to a job's (bench/suite_timeline.py): a command line's word -> its kind
TOOLS = {  # the first that matches: mypy's command line names pytest's temporary folder
    "mypy": "mypy",
    "sys.stdin.readline": "pytest workers (the tests that run in process)",  # xdist's
    "pytest": "pytest workers (the tests that run in process)",
    "chrom": "Chromium (the dashboard's browser tests)",
    "/proc/self/exe --type=": "Chromium (the dashboard's browser tests)",  # its helpers
    "cc1plus": "the C++ compiler (torch.compile's kernels)",
    "-m pip": "pip",
}


def kind(proc: psutil.Process) -> str:
    """What a process is (Ray's worker processes by what they run); psutil.Error if it is gone."""
    args, parent = proc.cmdline(), proc.parent()
    cmd = " ".join(args)
    if "pt_data_worker" in (proc.name(), cmd):
        return "data loader workers"
    if m := re.match(r"ray::(\w+)", cmd):
        return f"Ray worker process: {m[1]}"
    if "default_worker.py" in cmd:
        return "Ray worker process: starting"
    if "torch.distributed.run" in cmd:
        return "torchrun"
    if "from multiprocessing.spawn" in cmd and parent is not None:  # until it names itself
        return f"{kind(parent).split(' (its children')[0]} (its children by multiprocessing)"
    if JOB_FILE.search(cmd):
        if "--local" in cmd:
            return "the local job's process"
        if parent is not None and "torch.distributed.run" in " ".join(parent.cmdline()):
            return "a local worker"
        if parent is not None and parent.name() in ("sh", "dash", "bash"):
            return "the Ray job's driver"  # Ray's job supervisor runs it through a shell
        return "data loader workers"  # forked, not yet renamed
    if proc.name() == "weed":  # before MLflow: its command line names the mlflow bucket
        return "SeaweedFS"
    if any(h in cmd for h in HEAD):
        return "Ray's head (raylet, GCS, dashboard, agents, log monitor)"
    if "mlflow" in cmd:
        return "MLflow server"
    return next((name for word, name in TOOLS.items() if word in cmd), None) or _other(args, proc)


def _other(args: list[str], proc: psutil.Process) -> str:
    """`other: ` and what the process runs (`args`): a Python module, script or `-c` code, else
    its name."""
    if not args:  # kthreadd's children (kdamond, kswapd: the VM's memory, not the tests')
        return "other: the kernel's threads"
    program = args[0].rsplit("/", 1)[-1]
    if "-m" in args[:-1]:
        return f"other: {program} -m {args[args.index('-m') + 1]}"
    if "-c" in args[:-1]:  # multiprocessing's spawned children among them
        return f"other: {program} -c {args[args.index('-c') + 1][:40]!r}"
    script = next((a for a in args[1:] if a.endswith(".py")), None)
    return f"other: {script.rsplit('/', 1)[-1] if script else proc.name()}"


class Sampler(threading.Thread):
    """Every process's user+system CPU time, every `interval_s`, until stopped (a process that
    lives less than that is missed)."""

    def __init__(self, interval_s: float = 0.5, include_self: bool = False) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.skip = None if include_self else os.getpid()  # a bench's own CPU is not its job's
        self.halt = threading.Event()
        self._known: dict[int, tuple[tuple[str, ...], str]] = {}  # pid -> (its names, kind)
        self.first = self._look()
        self.last: dict[int, tuple[str, float]] = {}

    def run(self) -> None:
        while not self.halt.is_set():
            self.last.update(self._look())  # a process gone keeps its last look
            self.halt.wait(self.interval_s)

    def _look(self) -> dict[int, tuple[str, float]]:
        """pid -> (kind, user+system CPU-s) of every live process. The newest name: a process
        is forked before it execs, and Ray names its workers once they run; a kind is worked
        out again only then (once a look for every process cost 4% of a core beside the dev
        stack)."""
        alive: dict[int, tuple[tuple[str, ...], str]] = {}
        looks: dict[int, tuple[str, float]] = {}
        for p in psutil.process_iter():
            try:
                with p.oneshot():  # /proc/PID/stat read once for its name and CPU times
                    names, cpu = (p.name(), *p.cmdline()), sum(p.cpu_times()[:2])
                    known = self._known.get(p.pid)
                    # exiting, a process has let its memory go and shows no command line: still
                    # the same one, not a kernel thread (its last look holds all its CPU)
                    exiting = known is not None and len(names) == 1 and len(known[0]) > 1
                    if known is None or (known[0] != names and not exiting):
                        known = (names, kind(p))
                    alive[p.pid] = known
                looks[p.pid] = (alive[p.pid][1], cpu)
            except psutil.Error:
                pass
        self._known = alive  # a process gone is forgotten (its pid may come back as another)
        return looks

    def by_kind(self, since_start: bool = False) -> dict[str, float]:
        """CPU-s by kind from this sampler's start; since_start: a process that took another
        role meanwhile (an idle Ray worker made an actor) from its own start."""
        out: dict[str, float] = collections.defaultdict(float)
        for pid, (kind_now, cpu) in self.last.items():
            first_kind, first_cpu = self.first.get(pid, (kind_now, 0.0))
            if pid != self.skip:
                out[kind_now] += cpu - (
                    0.0 if since_start and first_kind != kind_now else first_cpu
                )
        return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description="What sampling every second costs")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    sampler, cpu0 = Sampler(1.0, include_self=True), time.process_time()
    sampler.start()
    time.sleep(args.seconds)
    sampler.halt.set()
    sampler.join()
    cpu, seen = time.process_time() - cpu0, len(sampler.last)
    print(
        f"sampler: {cpu:.2f} CPU-s over {args.seconds:.0f} s, {seen} processes "
        f"({cpu / args.seconds:.1%} of a core)"
    )


if __name__ == "__main__":
    main()
