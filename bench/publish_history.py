"""Registering the checkpoint of a run with a long metric history, as registration does it
against MLflow's Model.log given the run (what registration did before 2026-12-07), in the
same run.

    eval "$(python -m orchestrator.stack env)"
    python bench/publish_history.py [--keys 20 --points 12000 --pairs 2]

Model.log, given a run, copies the run's metrics of one step (0) to the logged model: it reads
the whole history of every metric of the run to find them. A ResNet-152 run on ImageNet logs
600,000 / 50 = 12,000 points per loop metric (tracking.log_every=50). The bench makes such a
run (--keys metrics x --points steps, from step 1: the loop logs no step 0), commits a small
checkpoint (cifar_resnet20) and registers it under a new model name each time, alternating
the two ways --pairs times: registration as it is, and the same call inside an active fluent
run of that run (registration then gives Model.log the run, as it used to). Last line:
`publish_history: ratio=R (now X s, given the run Y s, medians; K metrics x N points)`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=20)
    p.add_argument("--points", type=int, default=12_000)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--storage", default="s3://resnet/runs")
    args = p.parse_args()

    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from orchestrator.checkpoint import CheckpointStore
    from orchestrator.checkpoint_refs import job_checkpoints_url
    from orchestrator.models import create_model
    from orchestrator.publish.register import publish_checkpoint
    from orchestrator.spec import CheckpointConfig, DataConfig, JobSpec, ModelConfig
    from orchestrator.tracking.runs import experiment_id
    from orchestrator.tracking.tags import JOB_TAG

    job = f"bench-history-{uuid.uuid4().hex[:6]}"
    spec = JobSpec(
        name=job,
        model=ModelConfig(name="cifar_resnet20"),
        data=DataConfig(url=""),
        checkpoint=CheckpointConfig(storage=args.storage),
    )
    net = create_model("cifar_resnet20", 10)
    state = {"step": 100, "spec": spec.to_dict(), "strategy": {"model": net.state_dict()}}
    store = CheckpointStore(job_checkpoints_url(args.storage, job))
    store.write(100, "trainer.pt", state)
    store.commit(100, {"val/top1_err": 0.5})
    url = store.committed()[-1].url

    client = MlflowClient()
    run_id = client.create_run(
        experiment_id(client, "bench-publish"), run_name=job, tags={JOB_TAG: job}
    ).info.run_id
    t0 = time.perf_counter()
    now_ms = int(time.time() * 1000)
    batch: list[Metric] = []
    for step in range(1, args.points + 1):
        batch += [Metric(f"bench/m{k:02d}", float(step), now_ms, step) for k in range(args.keys)]
        if len(batch) >= 1000:
            client.log_batch(run_id, metrics=batch)
            batch = []
    if batch:
        client.log_batch(run_id, metrics=batch)
    print(
        f"run {run_id}: {args.keys} metrics x {args.points} points logged in "
        f"{time.perf_counter() - t0:.1f} s; checkpoint {url}"
    )

    def register(given_the_run: bool) -> float:
        name = f"{job}-{uuid.uuid4().hex[:4]}"
        t = time.perf_counter()
        if given_the_run:  # an active fluent run: registration names it to Model.log
            with mlflow.start_run(run_id=run_id):
                publish_checkpoint(client, url, name, run_id=run_id)
        else:
            publish_checkpoint(client, url, name, run_id=run_id)
        return time.perf_counter() - t

    register(False)  # warm-up: imports, the registered-model calls' first connections
    now, given = [], []
    for _ in range(args.pairs):
        now.append(register(False))
        given.append(register(True))
    print(f"now: {', '.join(f'{s:.2f}' for s in now)} s")
    print(f"given the run: {', '.join(f'{s:.2f}' for s in given)} s")
    a, b = statistics.median(now), statistics.median(given)
    print(
        f"publish_history: ratio={a / b:.3f} (now {a:.2f} s, given the run {b:.2f} s, medians; "
        f"{args.keys} metrics x {args.points} points)"
    )
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
