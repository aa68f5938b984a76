"""make test's two lanes (tests/lanes.py, and conftest.py's hooks), on a pytest run of their own
over throwaway tests: the services group on gw0 at normal priority, every other test on the
other worker, niced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import lanes
from tests.conftest import ROOT

# the project's own hooks (tests/conftest.py): the throwaway tests are grouped as its are
CONFTEST = """
from tests.conftest import (
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_xdist_make_scheduler,
)
"""

TESTS = """
import json, os, time
import pytest

def _record(kind):
    with open({out!r}, "a") as f:
        f.write(json.dumps([kind, os.environ["PYTEST_XDIST_WORKER"], os.nice(0)]) + "\\n")
    time.sleep(0.05)

# fewer than the others: xdist alone would send the larger group to gw0
@pytest.mark.services
@pytest.mark.parametrize("k", range(3))
def test_services(k):
    _record("services")

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
    services = {(worker, nice - base) for kind, worker, nice in ran if kind == "services"}
    others = {(worker, nice - base) for kind, worker, nice in ran if kind == "other"}
    assert len(ran) == 11
    assert services == {(lanes.SERVICES_WORKER, 0)}, ran
    # the other tests ran beside them on gw1, niced (gw0 may take what is left once its group
    # is done: at its own priority)
    assert ("gw1", lanes.OTHER_LANE_NICE) in others, ran
    assert others <= {("gw1", lanes.OTHER_LANE_NICE), (lanes.SERVICES_WORKER, 0)}, ran


def test_a_folder_built_once_is_built_by_the_first_worker_and_reused_by_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Factory:  # two workers' tmp_path_factory: their own folders, under the run's
        def __init__(self, worker: str) -> None:
            self.base = tmp_path / worker

        def getbasetemp(self) -> Path:
            return self.base

    builds: list[str] = []

    def build(folder: Path) -> None:
        builds.append(folder.name)
        time.sleep(0.3)  # the other worker asks meanwhile
        (folder / "data").write_text("built")

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    with ThreadPoolExecutor(2) as pool:
        got = list(
            pool.map(lambda w: lanes.built_once(Factory(w), "shared", build), ["gw0", "gw1"])
        )
    assert builds == ["shared"] and got == [tmp_path / "shared"] * 2
    assert (tmp_path / "shared" / "data").read_text() == "built"

    def fails(folder: Path) -> None:
        (folder / "half").write_text("")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        lanes.built_once(Factory("gw0"), "again", fails)
    again = lanes.built_once(Factory("gw1"), "again", build)  # a failed build is redone, whole
    assert sorted(p.name for p in again.iterdir()) == ["data"]
