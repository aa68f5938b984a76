"""What finding a job's newest checkpoint costs, however many it keeps.

    python bench/checkpoint_latest.py [--kept 10] [--repeats 30] [--url s3://resnet/bench/...]
    # the default URL needs the local stack: make up && eval "$(python -m orchestrator.stack env)"

Every rank reads the newest committed checkpoint to resume, rank 0 lists them all to apply
retention after each commit, and the chaos and test harnesses poll the newest several times a
second. This writes `--kept` small committed checkpoints (a trainer file and a rank file each)
under a fresh prefix, then times, one after the other in the same run:
`CheckpointStore.latest()` (the newest step folder first), against the baseline, reading every
kept step folder and taking the last (`committed()[-1]`, which retention needs); both give the
same step. Medians over `--repeats`, wall time and this process's CPU time, and the storage
requests each makes. Last line:
`checkpoint_latest: ratio=R (latest X ms, every step Y ms; requests A vs B; K kept)`.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from orchestrator.checkpoint import CheckpointStore


def _fill(store: CheckpointStore, kept: int) -> None:
    for step in range(1, kept + 1):
        store.write(step, "trainer.pt", {"step": step, "payload": list(range(1000))})
        store.write(step, "rank-00000.pt", {"rng": step})
        store.commit(step, {"val/top1_err": 1.0 / step})


def count_requests(store: CheckpointStore) -> list[str]:
    """From now on, the storage requests the store makes (its listing and reading methods),
    by method name, in a list that grows as it makes them."""
    calls: list[str] = []
    for method in ("get", "sizes", "list_dirs"):
        real = getattr(store.storage, method)

        def counted(*args: Any, _real: Any = real, _name: str = method, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        setattr(store.storage, method, counted)
    return calls


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of `fn` (after one warm-up call)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kept", type=int, default=10, help="committed checkpoints to keep")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--url", default=f"s3://resnet/bench/checkpoint-latest-{uuid.uuid4().hex[:8]}"
    )
    args = parser.parse_args()
    if args.kept < 1 or args.repeats < 1:
        parser.error("--kept and --repeats: give positive numbers")

    store = CheckpointStore(args.url)
    _fill(store, args.kept)
    calls = count_requests(store)
    newest, every = store.latest(), store.committed()[-1]
    assert newest is not None and newest.step == every.step == args.kept, (newest, every)
    calls.clear()
    store.latest()
    latest_requests = len(calls)
    calls.clear()
    store.committed()
    every_requests = len(calls)

    latest_wall, latest_cpu = _time(store.latest, args.repeats)
    every_wall, every_cpu = _time(lambda: store.committed()[-1], args.repeats)
    store.storage.delete_prefix("")
    print(f"{args.kept} committed checkpoints at {args.url} (deleted after), {args.repeats} calls:")
    for what, wall, cpu, requests in (
        ("latest()", latest_wall, latest_cpu, latest_requests),
        ("committed()[-1]", every_wall, every_cpu, every_requests),
    ):
        print(f"  {what:16} {wall:7.1f} ms wall, {cpu:6.1f} ms CPU (medians), {requests} requests")
    print(
        f"checkpoint_latest: ratio={latest_wall / every_wall:.3f} (latest {latest_wall:.1f} ms, "
        f"every step {every_wall:.1f} ms; requests {latest_requests} vs {every_requests}; "
        f"{args.kept} kept)"
    )


if __name__ == "__main__":
    main()
