"""Overhead of the whole stack: our job through `ray job submit` vs a plain PyTorch loop.

    python bench/overhead.py [--steps 60]   # needs the local stack: make up

Same model (cifar_resnet20), same batch (128), same in-memory data (one batch made once and
reused), same thread count, on CPU; measured side by side in one run. Ours: the steady-state
step time the job logs (median over log windows, the first excluded), and the time from submit
to the first finished step. Last line:
`overhead: ratio=R (ray X steps/s, plain Y steps/s, first step after Z s)`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from chaos import logs, submit, wait
from chaos import wait_status_terminal as wait_done

from orchestrator.models import create_model


def plain_loop(steps: int, threads: int) -> float:
    """The baseline: the shortest honest PyTorch training loop. Returns steps/s."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("cifar_resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times[5:])


def ours(steps: int, threads: int) -> tuple[float, float]:
    """Our job through the Ray head; returns (steps/s, seconds from submit to first step)."""
    name = f"overhead-{uuid.uuid4().hex[:8]}"
    t_submit = time.time()
    job = submit(
        [
            f"name={name}",
            "data.source=synthetic",
            "data.image_size=32",
            "data.synthetic_classes=10",
            "data.pca_lighting=0",
            "scaling.num_workers=1",
            "scaling.global_batch=128",
            f"scaling.cpus_per_worker={threads}",
            f"scaling.torch_threads={threads}",
            f"schedule.max_iters={steps}",
            "tracking.log_every=10",
            "tracking.enabled=false",
            "eval.every_iters=0",
            "eval.at_end=false",
            "checkpoint.every_iters=0",
            "checkpoint.at_epoch_end=false",
            "checkpoint.storage=/tmp/overhead-bench",
        ]
    )
    t_first = None
    while t_first is None:  # poll the job's log for its first finished step (0.25 s resolution)
        if re.search(r"\bstep 1 train/loss=", logs(job)):
            t_first = time.time()
        elif wait_done(job):
            break
        time.sleep(0.25)
    status = wait(job)
    text = logs(job)
    assert status == "SUCCEEDED" and t_first, text[-3000:]
    windows = [
        float(m) for m in re.findall(r"step \d+ train/loss=.*?system/step_time_s=([\d.e+-]+)", text)
    ]
    assert len(windows) >= 3, f"no step timings in the job log:\n{text[-3000:]}"
    return 1.0 / statistics.median(windows[2:]), t_first - t_submit  # skip step 1 and warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if "RAY_ADDRESS" not in os.environ:
        sys.exit(
            "the local stack is not in the environment: run "
            '`eval "$(python -m orchestrator.stack env)"`'
        )
    ray_rate, first = ours(args.steps, args.threads)
    plain_rate = plain_loop(args.steps, args.threads)
    print(f"threads={args.threads} batch=128 model=cifar_resnet20 steps={args.steps}")
    print(
        f"overhead: ratio={ray_rate / plain_rate:.3f} (ray {ray_rate:.2f} steps/s, "
        f"plain {plain_rate:.2f} steps/s, first step after {first:.1f} s)"
    )


if __name__ == "__main__":
    main()
