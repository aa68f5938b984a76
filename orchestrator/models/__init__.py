"""The paper's model zoo: plain and residual nets for ImageNet and CIFAR-10.

>>> from orchestrator.models import create_model, model_info
>>> net = create_model("resnet50")                      # option B, v1 bottleneck, 1000 classes
>>> net = create_model("resnet50", stride_in_1x1=False)  # torchvision's v1.5
>>> net = create_model("cifar_resnet110")                # option A, 10 classes
>>> model_info("cifar_resnet110")["input_size"]
32
"""

# Importing the modules registers their nets.
from . import cifar as cifar
from . import resnet as resnet
from .registry import (
    UnknownModelError,
    count_parameters,
    create_model,
    list_models,
    model_info,
    register_model,
    unwrap,
)
from .resnet import BasicBlock, Bottleneck, ResNet, ZeroPadShortcut

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "UnknownModelError",
    "ZeroPadShortcut",
    "count_parameters",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "unwrap",
]
