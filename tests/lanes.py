"""`make test`'s two lanes on pytest-xdist (`-n 2 --dist loadgroup`).

The services lane: every test that uses the local stack (conftest.py groups them as
`services`), in file order on worker gw0, at normal priority: it is the run's critical path (on
the 2-core box about two thirds of the tests' time, in order). The other lane: every other
test, a module at a time, on the other worker(s), niced, so that it takes the CPU the services'
tests leave idle while they wait on jobs, not the CPU they would use.
"""

from __future__ import annotations

import os
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
