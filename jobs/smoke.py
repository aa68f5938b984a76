"""The walking skeleton: a tiny net for a few steps, end to end through every real service.

    ray job submit -- python jobs/smoke.py data.url=s3://resnet/datasets/NAME
    python jobs/smoke.py --local data.url=/path/to/shards

2 Ray Train workers (DDP over gloo on CPU) read WebDataset shards from S3, train CIFAR's
ResNet-20 on 32x32 crops, log one MLflow run, and commit a checkpoint to S3.
"""

from orchestrator.launch import main
from orchestrator.spec import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    JobSpec,
    ModelConfig,
    OptimConfig,
    ScalingConfig,
    ScheduleConfig,
    TrackingConfig,
)

SPEC = JobSpec(
    name="smoke",
    model=ModelConfig(name="cifar_resnet20", channels_last=False),
    data=DataConfig(
        url="s3://resnet/datasets/smoke",
        train_transform="rrc",  # whole-image crops keep the generated classes visible at 32 px
        image_size=32,
        eval_resize=36,
        scale_range=(36, 48),
        pca_lighting=0.0,
        num_workers=1,
        shuffle_buffer=64,
    ),
    optim=OptimConfig(base_lr=0.1, weight_decay=1e-4),
    schedule=ScheduleConfig(kind="step", max_iters=30, milestones=[20]),
    scaling=ScalingConfig(num_workers=2, global_batch=32, max_failures=1),
    checkpoint=CheckpointConfig(storage="s3://resnet/runs", every_iters=10, keep_last=2),
    tracking=TrackingConfig(experiment="smoke", log_every=5),
    eval=EvalConfig(every_iters=0, batch_size=64),
)

if __name__ == "__main__":
    raise SystemExit(main(SPEC))
