"""bench/suite_timeline.py's CPU by kind of process, and bench/process_cpu.py's sampler it uses,
on real processes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from bench.process_cpu import Sampler
from bench.suite_timeline import kinds_table, summary

# a process that spends 1.5 CPU-seconds, however busy the box, then idles for the sampler's last
# look; a kind of its own, by its code (named after a real tool, it would add to that tool's
# line in the suite's own table)
BUSY = "import time\nwhile time.process_time() < 1.5: pass\ntime.sleep(1)"
KIND = f"other: {Path(sys.executable).name} -c {BUSY[:40]!r}"


def test_a_busy_process_s_cpu_is_counted_under_its_kind() -> None:
    sampler = Sampler(interval_s=0.1)
    sampler.start()
    subprocess.run([sys.executable, "-c", BUSY], check=True)
    sampler.halt.set()
    sampler.join()
    kinds = sampler.by_kind()
    assert 1.4 <= kinds[KIND] <= 2.0, kinds  # /proc counts in ticks; and the start
    table = kinds_table({"the box busy": 40.0, **kinds}).splitlines()
    assert table[0].startswith("the box busy 40 CPU-seconds over the run"), table
    (line,) = [line for line in table[1:] if line.endswith(f"  {KIND}")]
    assert line.split()[0] == f"{kinds[KIND]:.1f}", table


def test_the_summary_names_the_tests_that_spent_the_most_cpu_in_process() -> None:
    rows = [
        {"id": f"tests/test_m.py::t{i}", "worker": "gw0", "start": 100.0 + i, "wall": 1.0,
         "busy": 1.0, "cpu": 2.0, "own": float(i)}
        for i in range(10)
    ]  # fmt: skip
    lines = summary(rows).splitlines()
    at = lines.index("the tests' CPU in the pytest processes themselves: 45 CPU-s; the most:")
    assert [line.split()[-1] for line in lines[at + 1 :]] == [
        f"tests/test_m.py::t{i}" for i in range(9, 1, -1)
    ]
    older = [{k: v for k, v in r.items() if k != "own"} for r in rows]  # records before "own"
    assert "pytest processes" not in summary(older)


# a process that works under its `-c` kind, then renames itself as torch's loader workers do
# (prctl PR_SET_NAME) and works on
RENAMED = """import ctypes, time
def work(s):
    t = time.process_time() + s
    while time.process_time() < t: pass
work(0.4); time.sleep(0.5)
ctypes.CDLL(None).prctl(15, b"pt_data_worker", 0, 0, 0)
work(0.4); time.sleep(0.5)"""


def test_a_process_that_renames_itself_is_counted_under_its_new_kind() -> None:
    sampler = Sampler(interval_s=0.1)
    sampler.start()
    proc = subprocess.Popen([sys.executable, "-c", RENAMED])
    proc.wait()
    sampler.halt.set()
    sampler.join()
    assert proc.returncode == 0
    kind, cpu = sampler.last[proc.pid]
    assert kind == "data loader workers" and cpu >= 0.7, (kind, cpu)


class _Seen:
    """A psutil.Process as the sampler reads it in one look: a stand-in, since no real process
    can be held in the moment it exits."""

    def __init__(self, pid: int, name: str, cmdline: list[str], cpu: float) -> None:
        self.pid, self._name, self._cmdline, self._cpu = pid, name, cmdline, cpu

    def oneshot(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def name(self) -> str:
        return self._name

    def cmdline(self) -> list[str]:
        return list(self._cmdline)

    def cpu_times(self) -> tuple[float, float]:
        return (self._cpu, 0.0)

    def parent(self) -> None:
        return None


def test_an_exiting_process_keeps_its_kind_and_its_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On its way out a process has let its memory go and shows no command line. Its last look,
    which holds all its CPU, keeps its kind (a CI run once counted a test's busy child under
    "the kernel's threads"); a kernel thread, which never had a command line, stays the
    kernel's."""
    from bench import process_cpu

    work = ["python", "-c", "work()"]
    looks = iter(
        [
            [_Seen(7, "python", work, 0.0), _Seen(2, "kthreadd", [], 0.0)],  # the first look
            [_Seen(7, "python", work, 1.0), _Seen(2, "kthreadd", [], 0.1)],
            [_Seen(7, "python", [], 1.5), _Seen(2, "kthreadd", [], 0.2)],  # 7 exiting
        ]
    )
    monkeypatch.setattr(process_cpu.psutil, "process_iter", lambda: next(looks))
    sampler = Sampler(interval_s=0.1)
    for _ in range(2):  # the sampler thread's passes, without its clock
        sampler.last.update(sampler._look())
    assert sampler.by_kind() == {
        "other: python -c 'work()'": 1.5,
        "other: the kernel's threads": 0.2,
    }
