"""What a study asks of a GPU cluster: GPU-hours per trial and in all, for the dry run.

A trial's compute time is max_iters x global_batch / rate, its GPU-hours that time x its GPUs
(communication left out: the paper's trials use 2 to 8 GPUs of one node, where the planner,
orchestrator.plan, finds it hidden behind backward). The rate is the planner's measured
anchor for the net in the trial's precision (orchestrator.plan.numbers.throughput_anchor: bf16
eager or compiled, or fp32) where there is one, else the ResNet-50 anchor in that precision
scaled by multiply-adds per image (counted here on the meta device, at the trial's crop size),
or a kernel-launch floor where that is slower (LAUNCH_FLOOR_S_PER_LAYER: small CIFAR
nets at batch 64 per GPU are bound by launches, not multiply-adds). Both are estimates until
measured: run one trial and pass its rate (`study.img_per_s=...`) for a calibrated figure.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from orchestrator.plan.job import PlanError
from orchestrator.plan.numbers import throughput_anchor
from orchestrator.spec import JobSpec

REFERENCE = "resnet50"  # the anchor other nets are scaled from
# An assumption, not a measurement: eager PyTorch launches ~10 kernels per conv layer per
# training step (forward, backward, BN, ReLU, optimizer) at >= ~5 us each, so a step takes at
# least this long per conv layer however few multiply-adds it has. It decides for the CIFAR
# nets; bench/gpu_check.py's figures, or study.img_per_s, replace it.
LAUNCH_FLOOR_S_PER_LAYER = 50e-6


@functools.cache  # a dry run asks for the reference net once per cell
def multiply_adds(
    model_name: str, image_size: int, num_classes: int | None = None
) -> tuple[int, int]:
    """Multiply-adds of one image's forward pass through convolutions and linear layers, and
    the number of conv layers."""
    import torch
    from torch import nn

    from orchestrator.models import create_model

    total, convs = 0, 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total, convs
        if isinstance(module, nn.Conv2d):
            convs += 1
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    with torch.device("meta"):
        model = create_model(model_name, num_classes or (10 if "cifar" in model_name else 1000))
        _drop_batch_norm(model)
        hooks = [m.register_forward_hook(count) for m in model.modules()]
        with torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return total, convs


def _drop_batch_norm(module: Any) -> None:
    """BatchNorm layers swapped for identities: they keep the shapes and count no multiply-adds
    here, and on the meta device torch decomposes each into dozens of ops (ResNet-1202's
    forward took minutes on a loaded 2-core box; with identities, a second)."""
    from torch import nn

    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _drop_batch_norm(child)


@dataclass(frozen=True)
class TrialEstimate:
    gpus: int
    img_per_s_per_gpu: float
    how: str
    hours: float  # wall-clock, compute only

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.gpus


def estimate(spec: JobSpec, img_per_s_per_gpu: float | None = None) -> TrialEstimate:
    """GPU-hours of one trial on GPUs like the anchors' (one H200 each), in its precision."""
    if img_per_s_per_gpu:
        rate, how = img_per_s_per_gpu, "study.img_per_s (given)"
    else:
        rate, how = anchored_rate(spec)
    gpus = spec.scaling.num_workers
    seconds = spec.schedule.max_iters * spec.scaling.global_batch / (rate * gpus)
    return TrialEstimate(gpus, rate, how, seconds / 3600)


def anchored_rate(spec: JobSpec) -> tuple[float, str]:
    """img/s per GPU from the planner's anchors, and where it comes from: the net's own anchor,
    else the reference's (same precision and mode) scaled by multiply-adds, or the launch
    floor where that is slower."""
    try:
        return throughput_anchor(spec)
    except PlanError:
        pass  # no anchor measured for this net: scaled from the reference's below
    reference = dataclasses.replace(spec, model=dataclasses.replace(spec.model, name=REFERENCE))
    ref_rate, _ = throughput_anchor(reference)
    ours, layers = multiply_adds(spec.model.name, spec.data.image_size, spec.model.num_classes)
    ref, _ = multiply_adds(REFERENCE, 224)
    rate = ref_rate * ref / ours
    how = f"{REFERENCE} anchor x multiply-adds {ref / 1e9:.2f}G/{ours / 1e9:.3f}G"
    floor = spec.micro_batch() / (layers * LAUNCH_FLOOR_S_PER_LAYER)
    if floor < rate:
        return floor, f"launch floor: {layers} conv layers x 50 us per step (assumed)"
    return rate, how
