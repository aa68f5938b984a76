"""Registering a trained net: a ResNet-152 with random weights (v1.5, 1000 classes, 60.2 M
parameters, never trained) committed as a training checkpoint (weights and SGD momentum, as
training writes it), then logged and registered both ways, in the same run: its weights left in
the S3 checkpoint (the default) against copied into MLflow's artifact store (--copy-weights).

    eval "$(python -m orchestrator.stack env)"
    python bench/publish.py [--model resnet152]

Prints, per way: the logged model's bytes in MLflow, the time to log and register it
(`python -m orchestrator.publish`, the command's own figure, not counting its start-up), and
the time of `mlflow.pytorch.load_model("models:/NAME/VERSION")` in this process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet152")
    p.add_argument("--storage", default="s3://resnet/runs")
    args = p.parse_args()

    import mlflow.pytorch
    from mlflow import MlflowClient

    from orchestrator.checkpoint import CheckpointStore
    from orchestrator.checkpoint_refs import job_checkpoints_url
    from orchestrator.models import count_parameters, create_model
    from orchestrator.spec import CheckpointConfig, DataConfig, JobSpec, ModelConfig, OptimConfig
    from orchestrator.strategy import make_sgd
    from orchestrator.tracking.runs import experiment_id
    from orchestrator.tracking.tags import JOB_TAG

    job = f"bench-publish-{args.model}-{uuid.uuid4().hex[:6]}"
    spec = JobSpec(
        name=job,
        model=ModelConfig(name=args.model, stride_in_1x1=False),
        data=DataConfig(url=""),
        checkpoint=CheckpointConfig(storage=args.storage),
    )
    net = create_model(args.model, 1000, stride_in_1x1=False)
    opt = make_sgd(net, OptimConfig(), 0.1, torch.device("cpu"))
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()  # momentum buffers, as a training checkpoint holds them
    state = {
        "step": 100,
        "spec": spec.to_dict(),
        "strategy": {"model": net.state_dict(), "optimizer": opt.state_dict()},
    }
    store = CheckpointStore(job_checkpoints_url(args.storage, job))
    store.write(100, "trainer.pt", state)
    store.commit(100, {"val/top1_err": 0.5})
    size = store.storage.sizes("step-00000100")["trainer.pt"]
    params = count_parameters(net) / 1e6
    print(f"{args.model}: {params:.1f} M parameters, trainer.pt {size / 1e6:.0f} MB")

    client = MlflowClient()
    run = client.create_run(
        experiment_id(client, "bench-publish"), run_name=job, tags={JOB_TAG: job}
    )
    client.log_param(run.info.run_id, "checkpoint.storage", args.storage)
    print(f"{'weights':<12} {'in MLflow':>12} {'log+register':>13} {'load':>8}")
    for flag in ([], ["--copy-weights"]):
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator.publish", "--run", run.info.run_id, *flag],
            capture_output=True,
            text=True,
            check=True,
        )
        info = json.loads(next(x for x in out.stdout.splitlines() if x.startswith('{"model"')))
        t0 = time.perf_counter()
        mlflow.pytorch.load_model(f"models:/{job}/{info['version']}")
        load_s = time.perf_counter() - t0
        print(
            f"{info['weights']:<12} {info['artifact_bytes'] / 1e6:>10.3f}MB "
            f"{info['seconds']:>12.1f}s {load_s:>7.1f}s"
        )
    client.set_terminated(run.info.run_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
