"""make test's two lanes (tests/lanes.py, and conftest.py's hooks), on a pytest run of their own
over throwaway tests: the services group on gw0 at normal priority, every other test on the
other worker, niced; the other lane's `shares_stack` tests never run while a services test holds
the stack exclusively."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests import lanes
from tests.conftest import ROOT

# the project's own hooks (tests/conftest.py): the throwaway tests are grouped as its are
CONFTEST = """
from tests.conftest import (
    exclusive_stack,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_protocol,
    pytest_runtest_setup,
    pytest_xdist_make_scheduler,
)
"""

TESTS = """
import json, os, time
import pytest

def _record(kind, seconds=0.05):
    start = time.time()
    time.sleep(seconds)
    with open({out!r}, "a") as f:
        row = [kind, os.environ["PYTEST_XDIST_WORKER"], os.nice(0), start, time.time()]
        f.write(json.dumps(row) + "\\n")

# fewer than the others: xdist alone would send the larger group to gw0
@pytest.mark.services
@pytest.mark.parametrize("k", range(3))
def test_services(k, exclusive_stack):
    if k == 1:  # a service stopped and started again, while the other lane runs
        with exclusive_stack():
            _record("services", 1.0)
    else:
        _record("services")

@pytest.mark.shares_stack
@pytest.mark.parametrize("k", range(8))
def test_shares_stack(k):
    _record("shares_stack", 0.2)

@pytest.mark.parametrize("k", range(8))
def test_other(k):
    _record("other")
"""


def test_the_services_group_runs_on_gw0_and_the_rest_beside_it_niced(tmp_path: Path) -> None:
    out = tmp_path / "ran.jsonl"
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_throwaway.py").write_text(TESTS.format(out=str(out)))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2"]
        + ["--dist", "loadgroup", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
        cwd=tmp_path,
        # not this run's xdist worker variables, nor its PYTEST_ADDOPTS
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = [json.loads(line) for line in out.read_text().splitlines()]
    base = os.nice(0)
    services = {(worker, nice - base) for kind, worker, nice, *_ in ran if kind == "services"}
    others = {(worker, nice - base) for kind, worker, nice, *_ in ran if kind != "services"}
    assert len(ran) == 19
    assert services == {(lanes.SERVICES_WORKER, 0)}, ran
    # the other tests ran beside them on gw1, niced (gw0 may take what is left once its group
    # is done: at its own priority)
    assert ("gw1", lanes.OTHER_LANE_NICE) in others, ran
    assert others <= {("gw1", lanes.OTHER_LANE_NICE), (lanes.SERVICES_WORKER, 0)}, ran

    # no shares_stack test ran while the services test held the stack exclusively (1 s, while
    # the other lane's 8 x 0.2 s run)
    [(start, end)] = [row[3:] for row in ran if row[0] == "services" and row[4] - row[3] > 0.9]
    beside = [row[3:] for row in ran if row[0] == "shares_stack" and row[1] != "gw0"]
    assert beside, ran
    assert all(t1 <= start or t0 >= end for t0, t1 in beside), (start, end, beside)
