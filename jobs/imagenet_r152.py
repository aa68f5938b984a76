"""ResNet-152 on ImageNet, the paper's recipe (He et al. 2016, Sec. 3.4).

    ray job submit -- python jobs/imagenet_r152.py
    ray job submit -- python jobs/imagenet_r152.py scaling.num_workers=16 optim.lr=0.2
    python jobs/imagenet_r152.py --dry-run        # print the resolved spec
    python jobs/imagenet_r152.py --local          # one machine, no Ray (torchrun for N GPUs)

The recipe: shorter side resized to a random value in [256, 480], a random 224x224 crop or its
flip, per-pixel mean subtracted, AlexNet PCA colour augmentation; SGD with momentum 0.9 and
weight decay 1e-4 on a mini-batch of 256; lr 0.1 (scaled with the global batch), divided by 10
when the validation error plateaus; 60x10^4 iterations; He init, BN, no dropout. Option-B
shortcuts and the original (v1) bottleneck with the stride in the first 1x1 conv.
On GPUs: bf16 autocast and channels_last.

How the spec says it exactly:
- data.normalize=per_pixel_mean: each pixel minus the dataset's mean image (datasets/imagenet.py
  stores it: the mean of the train images' centre views, shorter side 256, central 224; resized
  to the crop a batch has), divided by one scalar (the pooled std, so the lr keeps its meaning).
  A dataset without one (converted before, or indexed by datasets/index_shards.py without
  --mean-image) is refused by the pre-flight: reconvert it (indexed shards: index them again
  with --mean-image), or set data.normalize=per_channel.
- optim.momentum_form=caffe: the authors' Caffe SGD (v = 0.9 v + lr g, w -= v): at each
  plateau drop the velocity keeps the old lr's steps, as theirs did, where torch's form
  (optim.momentum_form=pytorch) shrinks it tenfold at once.
The other ImageNet jobs (r34, r50, r101, plain34) take this recipe.
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
    name="imagenet_r152",
    model=ModelConfig(name="resnet152", shortcut="B", stride_in_1x1=True, channels_last=True),
    data=DataConfig(
        url="s3://resnet/datasets/imagenet",
        train_transform="paper",  # scale augmentation: shorter side ~ U[256, 480]
        scale_range=(256, 480),
        image_size=224,
        eval_resize=256,
        pca_lighting=0.1,
        normalize="per_pixel_mean",  # "the per-pixel mean subtracted"
        num_workers=8,
    ),
    optim=OptimConfig(
        name="sgd", base_lr=0.1, momentum=0.9, weight_decay=1e-4, momentum_form="caffe"
    ),
    schedule=ScheduleConfig(
        kind="plateau",  # "divided by 10 when the error plateaus"
        max_iters=600_000,
        gamma=0.1,
        plateau_patience=3,
        plateau_threshold=1e-3,
    ),
    scaling=ScalingConfig(
        strategy="ddp",
        num_workers=8,  # the paper: 8 GPUs x 32
        global_batch=256,
        precision="auto",  # bf16 on GPU, fp32 on CPU
        max_failures=3,
    ),
    checkpoint=CheckpointConfig(storage="s3://resnet/runs", every_iters=5000, keep_last=2),
    tracking=TrackingConfig(experiment="imagenet", log_every=100),
    eval=EvalConfig(every_iters=5000, protocol="center", batch_size=100),
)

if __name__ == "__main__":
    raise SystemExit(main(SPEC))
