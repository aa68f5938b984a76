"""What the step boundary costs: two CPU ranks (gloo) train CIFAR's ResNet-20 with DDP, in
alternating blocks of 25 steps with and without the check after each step.

    python bench/step_boundary.py [--steps 600] [--batch 16]          # the vote (no Ray)
    python bench/step_boundary.py --ray [--steps 600] [--batch 16]    # Ray's preemption notice

Without --ray: the step-boundary vote (orchestrator.preemption.StepBoundary.poll, torchrun's
path), two processes. With --ray: a 2-worker Ray Train job on a local Ray (2 CPUs) asks
ray.train.get_preemption_info() after each step of the "with" blocks (a barrier of both
workers through Ray's synchronization actor); the default cadence checkpoint.
preemption_poll_every comes from its figure. Prints, per rank, the median step time without
and with the check, and the median check, as a share of a step, and the cadence that keeps
it under 1%.
"""

from __future__ import annotations

import argparse
import math
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


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: the same steps, with get_preemption_info after each step of
    the "with" blocks (every worker at the same steps: it is a barrier)."""
    import ray.train

    from orchestrator.models import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(create_model("cifar_resnet20", 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(config["batch"], 3, 32, 32)
    y = torch.randint(0, 10, (config["batch"],))
    with_check, without, check_s = [], [], []
    for step in range(1, config["steps"] + 1):
        check = (step // 25) % 2 == 1
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        t1 = time.perf_counter()
        if check:
            ray.train.get_preemption_info()
            check_s.append(time.perf_counter() - t1)
        if step > 25:
            (with_check if check else without).append(time.perf_counter() - t0)
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["out"], f"rank-{rank}.txt"), "w") as f:
        f.write(repr((with_check, without, check_s)))


def run_ray(steps: int, batch: int) -> dict[int, tuple]:
    """The Ray Train job on a local Ray of 2 CPUs; per rank (with, without, checks) seconds."""
    import ast
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tempfile.mkdtemp(prefix="step-boundary-")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        TorchTrainer(
            _ray_worker,
            train_loop_config={"steps": steps, "batch": batch, "out": out},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(name="step-boundary", storage_path=out),
        ).fit()
    finally:
        ray.shutdown()
    return {r: ast.literal_eval(open(os.path.join(out, f"rank-{r}.txt")).read()) for r in (0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--ray", action="store_true", help="Ray's preemption notice instead")
    args = parser.parse_args()
    if args.ray:
        results = run_ray(args.steps, args.batch)
        what = "get_preemption_info"
    else:
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(_rank, args=(args.steps, args.batch, args.port, out), nprocs=2)
            results = dict(out)
        what = "the vote"
    shares = []
    for rank, (with_check, without, check_s) in sorted(results.items()):
        on, off = statistics.median(with_check), statistics.median(without)
        check = statistics.median(check_s)
        shares.append(check / off)
        print(
            f"rank {rank}: step {off * 1e3:.2f} ms without {what}, {on * 1e3:.2f} ms with it "
            f"(medians, {on / off - 1:+.2%}); a call {check * 1e6:.0f} us (median), "
            f"{check / off:.2%} of a step; every {max(1, math.ceil(check / off / 0.01))} steps "
            "keeps it under 1%"
        )
    share = max(shares)
    print(
        f"step_boundary: ratio={share:.4f} ({what} per call / step time, the slower rank; "
        f"every {max(1, math.ceil(share / 0.01))} steps keeps it under 1%)"
    )


if __name__ == "__main__":
    main()
