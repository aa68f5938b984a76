"""Ray's own floor under a job's first step: a bare Ray Train TorchTrainer whose train function
only says the time.

    ray job submit -- python bench/ray_floor.py [--cpus 2]

bench/overhead.py submits it beside our job, on the same cluster in the same minutes: what any
TorchTrainer pays before its first line of training code (Ray's job supervisor, the driver's
Ray Train and torch imports, Ray Train's controller and its actors, the worker's process, its
torch import and the gloo process group), with nothing of ours in it. One worker, as the
overhead job has, with the same CPUs and the same worker environment, and the same trainer
class: Ray's, less the two helper actors our jobs leave out (orchestrator.ray_callbacks
.torch_trainer; Ray's stock trainer starts them too, so it would set the floor higher). Prints
two lines, the driver's start and the train function's first line (Unix times): `parse` reads
them.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.ray_callbacks import torch_trainer
from orchestrator.startup_clock import process_start


def first_line() -> None:
    """The whole train function: the moment Ray hands the worker to user code."""
    print(f"ray floor first line at {time.time():.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs of the one worker")
    args = parser.parse_args()
    t0 = process_start()
    print(f"ray floor driver t0={t0:.3f}", flush=True)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    ray.init()
    trainer = torch_trainer(from_job_driver=True)(
        first_line,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.cpus}),
        run_config=RunConfig(  # type: ignore[call-arg]  # V2's at run time
            name=f"ray-floor-{int(t0)}",
            storage_path=str(Path(tempfile.gettempdir()) / "ray-floor"),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},  # as ours, on CPU
        ),
    )
    trainer.fit()


def parse(log: str) -> tuple[float, float]:
    """(the driver's start, the train function's first line), Unix times, from the job's log."""
    driver = re.search(r"ray floor driver t0=([\d.]+)", log)
    first = re.search(r"ray floor first line at ([\d.]+)", log)
    if not (driver and first):
        raise ValueError(f"no ray floor lines in the job log:\n{log[-3000:]}")
    return float(driver[1]), float(first[1])


if __name__ == "__main__":
    main()
