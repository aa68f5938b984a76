"""The measurement behind Fig. 7 (orchestrator.paper.layer_responses): which layers of a net
are read (every 3x3 conv, at the BN after it) and the population std of their responses,
combined exactly over chunks of images. Pure torch: no run, no checkpoint, no MLflow."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.errors import UsageError
from orchestrator.models import unwrap


class LayerResponsesError(UsageError, ValueError):
    """Bad input: the message names the run, model or argument, and the fix."""


# ============================================================================================
# the measurement


def response_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name of the 3x3 conv, the BN that follows it) for every 3x3 conv, in the order the net
    registers them (its forward order, in the project's ResNets).

    The BN is the conv's sibling `bn<k>` for a conv named `conv<k>` (the project's ResNets and
    torchvision's), or the next module of an nn.Sequential. Raises LayerResponsesError for a
    3x3 conv with no BN after it, or a net without 3x3 convs."""
    net = unwrap(model)
    found: list[tuple[str, nn.Module]] = []
    for parent_name, parent in net.named_modules():
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if not (isinstance(child, nn.Conv2d) and tuple(child.kernel_size) == (3, 3)):
                continue
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(parent, nn.Sequential):
                bn = children[i + 1][1] if i + 1 < len(children) else None
                expected = "the next module of its nn.Sequential"
            else:
                bn_name = "bn" + name.removeprefix("conv") if name.startswith("conv") else None
                bn = getattr(parent, bn_name, None) if bn_name else None
                expected = f"a sibling {bn_name}" if bn_name else "a conv<k>/bn<k> pair"
            if not isinstance(bn, nn.BatchNorm2d):
                raise LayerResponsesError(
                    f"{full} is a 3x3 conv without a BatchNorm2d after it (expected {expected}): "
                    "layer responses are read after BN, as in the paper's Fig. 7"
                )
            found.append((full, bn))
    if not found:
        raise LayerResponsesError(
            f"{type(net).__name__} has no 3x3 conv followed by BN: nothing to measure"
        )
    return found


@dataclass
class _Moments:
    """Count, mean and sum of squared deviations, merged chunk by chunk (Chan et al. 1979)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, n: int, mean: float, var: float) -> None:
        total = self.n + n
        delta = mean - self.mean
        self.m2 += var * n + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else math.nan


@torch.no_grad()
def layer_response_stds(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 100
) -> dict[str, float]:
    """The std of each 3x3 layer's response (after its BN, before ReLU/addition) over
    `images` (normalised, [N, 3, H, W]), in forward order: {conv name: std}.

    Population std over every element (batch, channels, H, W); the net in eval mode (BN's
    running statistics), no gradients, fed `batch_size` images at a time on its own device.
    The net's mode is restored and the hooks removed afterwards."""
    if images.dim() != 4 or len(images) == 0:
        raise LayerResponsesError(f"images: expected a non-empty [N, 3, H, W] batch, got {images}")
    if batch_size < 1:
        raise LayerResponsesError(f"batch_size={batch_size}: expected >= 1")
    net = unwrap(model)
    layers = response_layers(net)
    moments: dict[str, _Moments] = {}  # filled as the hooks fire: in forward order
    device = next(net.parameters()).device

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # measured here, not kept: the block's ReLU is in place and overwrites this tensor
            var, mean = torch.var_mean(output.detach().float(), correction=0)
            moments.setdefault(name, _Moments()).add(output.numel(), mean.item(), var.item())

        return hook

    handles = [bn.register_forward_hook(hook_for(name)) for name, bn in layers]
    was_training = net.training
    net.eval()
    try:
        for chunk in images.split(batch_size):
            net(chunk.to(device))
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    unused = [name for name, _ in layers if name not in moments]
    if unused:
        raise LayerResponsesError(f"the forward pass never reached the BN after {unused}")
    return {name: m.std for name, m in moments.items()}
