"""The registered nets, one factory per name: the ImageNet nets of Table 1 and the CIFAR-10
nets of Sec. 4.2, with their plain counterparts.

Importing this module registers every name with its options (the factories' signatures), and
imports no torch: a driver checks a spec's model and options here (`registry.check_model`)
without loading it. A factory's body builds the net, importing resnet.py or cifar.py then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .registry import BlockKind, register_model

if TYPE_CHECKING:
    from .resnet import ResNet, Shortcut

__all__: list[str] = []  # the nets are reached through the registry


def _imagenet_net(depth: int, **kwargs: object) -> ResNet:
    from .resnet import imagenet_net

    return imagenet_net(depth, **kwargs)


def _cifar_net(depth: int, **kwargs: object) -> ResNet:
    from .cifar import cifar_net

    return cifar_net(depth, **kwargs)  # type: ignore[arg-type]


def _imagenet(
    depth: int, block: BlockKind, residual: bool
) -> Callable[[Callable[..., ResNet]], Callable[..., ResNet]]:
    """``register_model`` shorthand for the ImageNet family (224x224 input)."""
    return register_model(
        family="imagenet", depth=depth, block=block, residual=residual, input_size=224
    )


def _cifar(depth: int, residual: bool) -> Callable[[Callable[..., ResNet]], Callable[..., ResNet]]:
    """``register_model`` shorthand for the CIFAR family (32x32 input, basic blocks)."""
    return register_model(
        family="cifar", depth=depth, block="basic", residual=residual, input_size=32
    )


# ---------------------------------------------------------------------------------------------
# ImageNet nets (Table 1). Option B by default, v1 bottleneck (stride in the first 1x1).


@_imagenet(18, "basic", residual=True)
def resnet18(
    num_classes: int = 1000, *, shortcut: Shortcut = "B", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-18."""
    return _imagenet_net(
        18, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_imagenet(34, "basic", residual=True)
def resnet34(
    num_classes: int = 1000, *, shortcut: Shortcut = "B", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-34 (Table 3 compares its options A, B and C)."""
    return _imagenet_net(
        34, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_imagenet(50, "bottleneck", residual=True)
def resnet50(
    num_classes: int = 1000,
    *,
    shortcut: Shortcut = "B",
    stride_in_1x1: bool = True,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50."""
    return _imagenet_net(
        50,
        num_classes=num_classes,
        shortcut=shortcut,
        stride_in_1x1=stride_in_1x1,
        zero_init_residual=zero_init_residual,
    )


@_imagenet(101, "bottleneck", residual=True)
def resnet101(
    num_classes: int = 1000,
    *,
    shortcut: Shortcut = "B",
    stride_in_1x1: bool = True,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-101."""
    return _imagenet_net(
        101,
        num_classes=num_classes,
        shortcut=shortcut,
        stride_in_1x1=stride_in_1x1,
        zero_init_residual=zero_init_residual,
    )


@_imagenet(152, "bottleneck", residual=True)
def resnet152(
    num_classes: int = 1000,
    *,
    shortcut: Shortcut = "B",
    stride_in_1x1: bool = True,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-152."""
    return _imagenet_net(
        152,
        num_classes=num_classes,
        shortcut=shortcut,
        stride_in_1x1=stride_in_1x1,
        zero_init_residual=zero_init_residual,
    )


# Plain counterparts: the same layers without shortcuts, so no shortcut option.


@_imagenet(18, "basic", residual=False)
def plain18(num_classes: int = 1000) -> ResNet:
    """Plain-18 (Table 2)."""
    return _imagenet_net(18, num_classes=num_classes, shortcut=None)


@_imagenet(34, "basic", residual=False)
def plain34(num_classes: int = 1000) -> ResNet:
    """Plain-34 (Table 2, Fig. 4)."""
    return _imagenet_net(34, num_classes=num_classes, shortcut=None)


@_imagenet(50, "bottleneck", residual=False)
def plain50(num_classes: int = 1000, *, stride_in_1x1: bool = True) -> ResNet:
    """Plain-50: ResNet-50's layers without shortcuts (not trained in the paper)."""
    return _imagenet_net(50, num_classes=num_classes, shortcut=None, stride_in_1x1=stride_in_1x1)


@_imagenet(101, "bottleneck", residual=False)
def plain101(num_classes: int = 1000, *, stride_in_1x1: bool = True) -> ResNet:
    """Plain-101: ResNet-101's layers without shortcuts (not trained in the paper)."""
    return _imagenet_net(101, num_classes=num_classes, shortcut=None, stride_in_1x1=stride_in_1x1)


@_imagenet(152, "bottleneck", residual=False)
def plain152(num_classes: int = 1000, *, stride_in_1x1: bool = True) -> ResNet:
    """Plain-152: ResNet-152's layers without shortcuts (not trained in the paper)."""
    return _imagenet_net(152, num_classes=num_classes, shortcut=None, stride_in_1x1=stride_in_1x1)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 nets (Sec. 4.2): 6n+2 layers, option A by default.


@_cifar(20, residual=True)
def cifar_resnet20(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-20 (0.27M parameters)."""
    return _cifar_net(
        20, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(32, residual=True)
def cifar_resnet32(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-32 (0.46M parameters)."""
    return _cifar_net(
        32, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(44, residual=True)
def cifar_resnet44(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-44 (0.66M parameters)."""
    return _cifar_net(
        44, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(56, residual=True)
def cifar_resnet56(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-56 (0.85M parameters)."""
    return _cifar_net(
        56, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(110, residual=True)
def cifar_resnet110(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-110 (1.7M parameters; the paper warms up at lr 0.01)."""
    return _cifar_net(
        110, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(1202, residual=True)
def cifar_resnet1202(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-1202 (19.4M parameters)."""
    return _cifar_net(
        1202, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(20, residual=False)
def cifar_plain20(num_classes: int = 10) -> ResNet:
    """Plain-20 (Fig. 6)."""
    return _cifar_net(20, num_classes=num_classes, shortcut=None)


@_cifar(32, residual=False)
def cifar_plain32(num_classes: int = 10) -> ResNet:
    """Plain-32 (Fig. 6)."""
    return _cifar_net(32, num_classes=num_classes, shortcut=None)


@_cifar(44, residual=False)
def cifar_plain44(num_classes: int = 10) -> ResNet:
    """Plain-44 (Fig. 6)."""
    return _cifar_net(44, num_classes=num_classes, shortcut=None)


@_cifar(56, residual=False)
def cifar_plain56(num_classes: int = 10) -> ResNet:
    """Plain-56 (Fig. 6)."""
    return _cifar_net(56, num_classes=num_classes, shortcut=None)


@_cifar(110, residual=False)
def cifar_plain110(num_classes: int = 10) -> ResNet:
    """Plain-110 (Fig. 6 mentions it fails to converge well; kept for completeness)."""
    return _cifar_net(110, num_classes=num_classes, shortcut=None)
