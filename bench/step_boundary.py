"""What the step-boundary vote costs (orchestrator.preemption.StepBoundary.poll): two CPU ranks
(gloo) train CIFAR's ResNet-20 with DDP, in alternating blocks of 25 steps with and without
a poll after each step.

    python bench/step_boundary.py [--steps 600] [--batch 16]

Prints, per rank, the median step time without and with the vote, and the median poll.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _rank(rank: int, steps: int, batch: int, port: int, out: dict[int, tuple]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from orchestrator.models import create_model
    from orchestrator.preemption import StepBoundary
    from orchestrator.spec import CheckpointConfig

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(create_model("cifar_resnet20", 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # every_iters=0 and a clock that never comes due: the vote alone
    boundary = StepBoundary(CheckpointConfig(storage="unused", every_iters=0, every_minutes=1e6), 0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    with_vote, without, poll_s = [], [], []
    for step in range(1, steps + 1):
        vote = (step // 25) % 2 == 1  # blocks of 25 steps with and without, alternated
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        t1 = time.perf_counter()
        if vote:
            boundary.poll(step, saved_step=-1)
            poll_s.append(time.perf_counter() - t1)
        if step > 25:  # past the warm-up
            (with_vote if vote else without).append(time.perf_counter() - t0)
    out[rank] = (with_vote, without, poll_s)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--port", type=int, default=29611)
    args = parser.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(args.steps, args.batch, args.port, out), nprocs=2)
        results = dict(out)
    for rank, (with_vote, without, poll_s) in sorted(results.items()):
        on, off = statistics.median(with_vote), statistics.median(without)
        poll = statistics.median(poll_s)
        print(
            f"rank {rank}: step {off * 1e3:.2f} ms without the vote, {on * 1e3:.2f} ms with it "
            f"(medians, {on / off - 1:+.2%}); a poll {poll * 1e6:.0f} us (median), "
            f"{poll / off:.2%} of a step"
        )


if __name__ == "__main__":
    main()
