"""Where the test suite's time goes: a pytest plugin that records, for every test (set-up, call
and teardown), its worker, wall time and the whole box's busy CPU-seconds (/proc/stat), and a
summary of such a record per lane.

    SUITE_TIMELINE=/tmp/suite.jsonl PYTEST_ADDOPTS="-p bench.suite_timeline" make test
    python bench/suite_timeline.py /tmp/suite.jsonl

Run it once in order (`pytest -p bench.suite_timeline`, no -n) for the tests' own times and how
busy the box was between them; with make test's lanes each worker's tests overlap the other's,
so the busy share is only printed for one worker.

The run's main process also samples every process's CPU time once a second (bench/
process_cpu.py) and writes it by kind of process to FILE.kinds.json at the end: the summary
then says where the run's CPU went (Ray's worker processes by what they run, the stack's
services, the tests that run in process). A process that lives under a second is missed: the
summary says how much of the box's busy CPU the table covers.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

OUT = "SUITE_TIMELINE"
SAMPLE_EVERY_S = 1.0  # a pass over ~200 processes costs a few ms: well under 1% of a core
_sampling: dict[str, Any] = {}  # the main process's sampler and the box's busy CPU at its start


def cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU-seconds of the whole box since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle and iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    start, (busy0, all0), own0 = time.time(), cpu_seconds(), time.process_time()
    yield
    busy1, all1 = cpu_seconds()
    row = {
        "id": item.nodeid,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", ""),
        "start": start,
        "wall": time.time() - start,
        "busy": busy1 - busy0,
        "cpu": all1 - all0,
        "own": time.process_time() - own0,  # the pytest process's own, its threads' included
    }
    with open(os.environ.get(OUT, "suite-timeline.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get(OUT) and "PYTEST_XDIST_WORKER" not in os.environ:  # once a run
        from bench.process_cpu import Sampler

        _sampling["busy"] = cpu_seconds()[0]
        # this process too: without xdist it runs the tests; with it, it only samples
        _sampling["sampler"] = sampler = Sampler(SAMPLE_EVERY_S, include_self=True)
        sampler.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    sampler = _sampling.pop("sampler", None)
    if sampler is not None:
        sampler.halt.set()
        sampler.join()
        kinds = {"the box busy": cpu_seconds()[0] - _sampling.pop("busy"), **sampler.by_kind()}
        Path(os.environ[OUT] + ".kinds.json").write_text(json.dumps(kinds, indent=1))


def kinds_table(kinds: dict[str, float], top: int = 16) -> str:
    """The run's CPU by kind of process (a FILE.kinds.json's), the largest first."""
    processes = {kind: cpu for kind, cpu in kinds.items() if kind != "the box busy"}
    busy, sampled = kinds["the box busy"], sum(processes.values())
    head = f"the box busy {busy:.0f} CPU-seconds over the run, {sampled:.0f} of them "
    lines = [head + f"({sampled / busy:.0%}) in the processes sampled, by kind:"]
    for kind, cpu in collections.Counter(processes).most_common(top):
        lines.append(f"  {cpu:7.1f} CPU-s {cpu / busy:4.0%}  {kind}")
    return "\n".join(lines)


def _busy(rows: list[dict[str, Any]]) -> str:
    busy, cpu = sum(r["busy"] for r in rows), sum(r["cpu"] for r in rows)
    return f"the box busy {busy:.0f} of {cpu:.0f} CPU-seconds ({busy / cpu:.0%})"


def summary(rows: list[dict[str, Any]]) -> str:
    """Per worker: its tests, their summed wall time, when its last test ended, and how busy
    the box was over its tests (a worker's tests never overlap each other, so this holds with
    lanes too); for the worker that ended last, how busy the box was once it ran alone; the
    slowest modules."""
    first = min(r["start"] for r in rows)
    lines = []
    workers = sorted({r["worker"] for r in rows})
    ends = {w: max(r["start"] + r["wall"] for r in rows if r["worker"] == w) for w in workers}
    for worker in workers:
        mine = [r for r in rows if r["worker"] == worker]
        lines.append(
            f"worker {worker or '(none)'}: {len(mine)} tests, {sum(r['wall'] for r in mine):.0f} s "
            f"of tests, its last ended {ends[worker] - first:.0f} s in; {_busy(mine)}"
        )
    if len(workers) > 1:
        last = max(workers, key=ends.__getitem__)
        others_end = max(end for w, end in ends.items() if w != last)
        alone = [r for r in rows if r["worker"] == last and r["start"] >= others_end]
        if alone:
            wall = sum(r["wall"] for r in alone)
            lines.append(
                f"worker {last} alone, after the others ended: {wall:.0f} s; {_busy(alone)}"
            )
    modules: collections.Counter[str] = collections.Counter()
    for r in rows:
        modules[r["id"].split("::")[0]] += r["wall"]
    lines += [f"  {wall:7.1f} s  {module}" for module, wall in modules.most_common(8)]
    if any("own" in r for r in rows):  # records from before 2026-12-07 lack it
        own = sorted(rows, key=lambda r: -r.get("own", 0.0))[:8]
        total = sum(r.get("own", 0.0) for r in rows)
        head = f"the tests' CPU in the pytest processes themselves: {total:.0f} CPU-s; the most:"
        lines.append(head)
        lines += [f"  {r['own']:7.1f} CPU-s  {r['id']}" for r in own]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/suite_timeline.py SUITE_TIMELINE_FILE")
    record = Path(sys.argv[1])
    print(summary([json.loads(line) for line in record.read_text().splitlines()]))
    kinds = Path(f"{record}.kinds.json")
    if kinds.exists():
        print(kinds_table(json.loads(kinds.read_text())))
