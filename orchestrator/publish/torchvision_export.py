"""Weights for torchvision: `torchvision.models.resnetXX().load_state_dict(sd, strict=True)`.

The ImageNet nets of orchestrator.models use torchvision's module names, so a state dict maps
key for key. Exported only where the result computes what the net computed:
- resnet18..152 with shortcut B (torchvision's: a projection only where the shape changes);
- bottleneck nets (50/101/152) only in v1.5 (`stride_in_1x1=False`, the stride in the 3x3).
  A v1 net (the paper's: the stride in the first 1x1) has exactly the same parameter shapes,
  so torchvision would load it without a word, then subsample before the 1x1 instead of in
  the 3x3: a different function of the same weights. That is refused, saying so.
Plain nets, options A and C, and the CIFAR nets have no torchvision counterpart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import UsageError

TORCHVISION_NETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class NotTorchvisionEquivalent(UsageError, ValueError):
    """The net has no torchvision counterpart computing the same function; says why."""


def check_equivalent(model: dict[str, Any]) -> None:
    """Raise NotTorchvisionEquivalent unless `model` ({name, num_classes, options}) is a net
    torchvision builds identically."""
    from orchestrator.models import model_info

    name, options = model["name"], dict(model.get("options", {}))
    if name not in TORCHVISION_NETS:
        raise NotTorchvisionEquivalent(
            f"{name} has no torchvision counterpart (torchvision has {', '.join(TORCHVISION_NETS)})"
        )
    info = model_info(name)
    shortcut = options.get("shortcut", info["options"].get("shortcut"))
    if shortcut != "B":
        raise NotTorchvisionEquivalent(
            f"{name} uses shortcut option {shortcut}; torchvision's nets use option B "
            "(a projection only where the shape changes), so the weights would not fit"
        )
    if info["block"] == "bottleneck":
        stride_in_1x1 = options.get("stride_in_1x1", info["options"]["stride_in_1x1"])
        if stride_in_1x1:
            raise NotTorchvisionEquivalent(
                f"{name} is a v1 net (model.stride_in_1x1=true, the paper's: the stride of each "
                "stage's first block is in its first 1x1 conv); torchvision's is v1.5 (the "
                "stride in the 3x3). The parameter shapes are identical, so torchvision would "
                "load these weights with strict=True and then compute something else. Train "
                "with model.stride_in_1x1=false for a torchvision-compatible net."
            )


def torchvision_state_dict(
    model: dict[str, Any], weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The state dict torchvision's `model["name"](num_classes=...)` loads with strict=True:
    the same keys and shapes (checked against the project's own net), as contiguous CPU
    tensors. NotTorchvisionEquivalent where it would not compute the same function."""
    from orchestrator.publish.classifier import build_net

    check_equivalent(model)
    net = build_net(model, weights)  # strict: exactly the net's own keys
    return {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}


def export_torchvision(model: dict[str, Any], weights: dict[str, torch.Tensor], out: Path) -> Path:
    """Write `torchvision_state_dict` to `out` (torch.save of plain tensors: it loads with
    torch.load(..., weights_only=True))."""
    sd = torchvision_state_dict(model, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out)
    return out
