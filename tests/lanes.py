"""`make test`'s two lanes on pytest-xdist (`-n 2 --dist loadgroup`).

The services lane: every test that runs Ray jobs on the local stack or stops, starts or scans
services (conftest.py groups them as `services`), in file order on worker gw0, at normal
priority: it is the run's critical path (on the 2-core box about two thirds of the tests' time,
in order). The other lane: every other test, a module at a time, on the other worker(s), niced,
so that it takes the CPU the services' tests leave idle while they wait on jobs, not the CPU
they would use.

The other lane may use the stack's S3 and MLflow too, in tests marked `shares_stack` (no Ray,
nothing stopped, their own names): each holds the lanes' lock shared while it runs, and a
services test that stops a service holds it exclusively (`holding(..., exclusive=True)`), so
that none of them runs while S3 or MLflow is down.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SERVICES = "services"
SHARES_STACK = "shares_stack"
SERVICES_WORKER = "gw0"
OTHER_LANE_NICE = 5  # a quarter of a core's share beside a busy normal-priority process
# how long the other lane waits for the services lane to start the stack (its first test does)
STACK_WAIT_S = 300


def on_the_services_worker() -> bool:
    """Whether this process runs the services lane: xdist's gw0, or a run without xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", SERVICES_WORKER) == SERVICES_WORKER


def lock_path(rootdir: Path) -> Path:
    """The lanes' lock of a run (the same file for all its workers)."""
    return rootdir / ".stack-test" / "lanes.lock"


@contextlib.contextmanager
def holding(path: Path, exclusive: bool) -> Iterator[None]:
    """The lanes' lock at `path`, shared or exclusive, for the block (flock: released if the
    process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


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
