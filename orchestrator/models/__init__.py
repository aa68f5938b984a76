"""The paper's model zoo: plain and residual nets for ImageNet and CIFAR-10.

>>> from orchestrator.models import create_model, model_info
>>> net = create_model("resnet50")                      # option B, v1 bottleneck, 1000 classes
>>> net = create_model("resnet50", stride_in_1x1=False)  # torchvision's v1.5
>>> net = create_model("cifar_resnet110")                # option A, 10 classes
>>> model_info("cifar_resnet110")["input_size"]
32
"""

from __future__ import annotations

import importlib
from typing import Any

# Importing the zoo registers every net; neither it nor the registry imports torch, so a
# driver checks a spec's model (check_model) without it. The classes below load on first use.
from . import zoo as zoo
from .registry import (
    UnknownModelError,
    check_model,
    count_parameters,
    create_model,
    list_models,
    model_info,
    register_model,
    unwrap,
)

_FROM_RESNET = ("BasicBlock", "Bottleneck", "ResNet", "ZeroPadShortcut")


def __getattr__(name: str) -> Any:
    if name in _FROM_RESNET:
        return getattr(importlib.import_module(f"{__name__}.resnet"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "UnknownModelError",
    "ZeroPadShortcut",
    "check_model",
    "count_parameters",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "unwrap",
]
