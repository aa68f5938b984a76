"""`make test`'s two lanes on pytest-xdist (`-n 2 --dist loadgroup`).

The services lane: every test that uses the local stack (conftest.py groups them as
`services`), in file order on worker gw0, at normal priority: it is the run's critical path (on
the 2-core box about two thirds of the tests' time, in order). The other lane: every other
test, a module at a time, on the other worker(s), niced, so that it takes the CPU the services'
tests leave idle while they wait on jobs, not the CPU they would use.

A fixture that tests of both lanes use is built once a run, not once in each (`built_once`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

SERVICES = "services"
SERVICES_WORKER = "gw0"
OTHER_LANE_NICE = 5  # a quarter of a core's share beside a busy normal-priority process


def nice_the_other_lane(option: Any) -> None:
    """In an xdist worker of a loadgroup run that is not the services worker: lower its priority
    (its children inherit it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and worker != SERVICES_WORKER and getattr(option, "loadgroup", False):
        os.nice(OTHER_LANE_NICE)


def make_scheduler(config: Any, log: Any) -> Any:
    """xdist's loadgroup, with the services group sent to gw0 and to no other worker."""
    from xdist.scheduler import LoadGroupScheduling

    class ServicesOnTheirWorker(LoadGroupScheduling):  # type: ignore[misc]
        def _assign_work_unit(self, node: Any) -> None:
            if SERVICES in self.workqueue:
                mine = node.gateway.id == SERVICES_WORKER
                self.workqueue.move_to_end(SERVICES, last=not mine)
                if not mine and next(iter(self.workqueue)) == SERVICES:
                    return  # only the services group is left: it waits for its worker
            super()._assign_work_unit(node)

    return ServicesOnTheirWorker(config, log)


def built_once(tmp_path_factory: Any, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that `build` fills once per test run, for every lane: a session or module
    fixture of a module whose tests run in both lanes would otherwise be built in each worker.
    The first worker to ask builds it under a lock; the others wait for it and reuse it. Tests
    only read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's, holding each worker's own folder
    folder, done = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():  # else built by another worker, whole (a failed build is redone)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder
