"""CIFAR-10 ResNets (6n+2 layers), the paper's recipe (He et al. 2016, Sec. 4.2, Table 6).

    ray job submit -- python jobs/cifar10_resnet.py name=cifar10_r110 model.name=cifar_resnet110
    python jobs/cifar10_resnet.py --local name=cifar10_r56 model.name=cifar_resnet56

Depth is the model name: cifar_resnet20, 32, 44, 56, 110 or 1202 (option-A shortcuts).
The recipe: per-pixel mean subtracted; 4 pixels padded on each side and a random 32x32 crop
or its flip; SGD with momentum 0.9 and weight decay 1e-4, mini-batch 128 on two GPUs; lr 0.1,
divided by 10 at 32k and 48k iterations, stopped at 64k. ResNet-110 starts at lr 0.01 until
the training error is below 80% (about 400 iterations), then goes back to 0.1.

How the spec says it exactly:
- data.normalize=per_pixel_mean: each pixel minus the mean image the converter computed over
  the 50k train images (datasets/cifar10.py), divided by one scalar (the pooled std, so the
  lr means what it means under per_channel). A dataset converted before mean images were
  stored is refused by the pre-flight: reconvert it, or data.normalize=per_channel.
- optim.momentum_form=caffe: the authors' Caffe SGD (v = 0.9 v + lr g, w -= v), so at the lr
  drops (and the warm-up's rise) the velocity carries over as theirs did; torch's form
  (optim.momentum_form=pytorch) rescales the velocity to the new lr at once.
- ResNet-110 and deeper (`paper_warmup`): schedule.warmup_until_train_err=0.8 with
  warmup_factor=0.1: lr 0.01 until the training error of the last schedule.warmup_check_every
  (20) steps, summed over every rank, is below 80%. schedule.warmup_iters=400 instead gives
  the fixed-length approximation.
"""

import dataclasses

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
    name="cifar10_resnet",
    model=ModelConfig(name="cifar_resnet20", channels_last=False),
    data=DataConfig(
        url="s3://resnet/datasets/cifar10",
        train_transform="cifar",  # pad 4, random 32x32 crop, flip
        image_size=32,
        eval_resize=32,  # test on the single original view
        scale_range=(32, 32),
        pca_lighting=0.0,
        normalize="per_pixel_mean",  # "per-pixel mean subtracted"
        num_workers=2,
    ),
    optim=OptimConfig(
        name="sgd",
        lr=0.1,  # the paper's lr at batch 128
        momentum=0.9,
        weight_decay=1e-4,
        momentum_form="caffe",  # the authors' solver
    ),
    schedule=ScheduleConfig(kind="step", max_iters=64_000, milestones=[32_000, 48_000], gamma=0.1),
    scaling=ScalingConfig(strategy="ddp", num_workers=2, global_batch=128),
    checkpoint=CheckpointConfig(storage="s3://resnet/runs", every_iters=2000, keep_last=2),
    tracking=TrackingConfig(experiment="cifar10", log_every=100),
    eval=EvalConfig(every_iters=2000, protocol="center", batch_size=500),
)


def paper_warmup(spec: JobSpec) -> JobSpec:
    """ResNet-110 (and deeper) starts at a tenth of the lr until the training error is below
    80% (Sec. 4.2), unless the command line chose a warm-up (warmup_iters or the rule)."""
    depth = int(spec.model.name.rsplit("resnet", 1)[-1] or 0) if "resnet" in spec.model.name else 0
    s = spec.schedule
    if depth >= 110 and s.warmup_iters == 0 and s.warmup_until_train_err is None:
        warm = dataclasses.replace(s, warmup_until_train_err=0.8, warmup_factor=0.1)
        spec = dataclasses.replace(spec, schedule=warm)
    return spec


if __name__ == "__main__":
    raise SystemExit(main(SPEC, finalize=paper_warmup))
