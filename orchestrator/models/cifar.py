"""The CIFAR-10 nets of Sec. 4.2: 6n+2 layers, 16/32/64 filters, option A shortcuts.

A 3x3 conv with 16 filters, then three stages of n basic blocks (2n layers each) on 32x32,
16x16 and 8x8 maps, global average pooling and a 10-way fc. ResNet-20/32/44/56/110/1202
(n = 3/5/7/9/18/200) and the plain nets of Fig. 6 (plain-20/32/44/56; plain-110 for
completeness). Built from the same ``ResNet`` class and blocks as the ImageNet nets.
"""

from __future__ import annotations

from collections.abc import Callable

from .registry import register_model
from .resnet import BasicBlock, ResNet, Shortcut

__all__: list[str] = []  # the nets are reached through the registry

CIFAR_WIDTHS = (16, 32, 64)


def cifar_net(
    depth: int,
    *,
    num_classes: int = 10,
    shortcut: Shortcut | None = "A",
    zero_init_residual: bool = False,
) -> ResNet:
    """A 6n+2-layer CIFAR net; ``shortcut=None`` builds the plain one."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR net has 6n+2 layers, n >= 1 (got depth {depth})")
    n = (depth - 2) // 6
    return ResNet(
        BasicBlock,
        (n, n, n),
        widths=CIFAR_WIDTHS,
        stem="cifar",
        num_classes=num_classes,
        shortcut=shortcut,
        zero_init_residual=zero_init_residual,
    )


def _cifar(depth: int, residual: bool) -> Callable[[Callable[..., ResNet]], Callable[..., ResNet]]:
    """``register_model`` shorthand for the CIFAR family (32x32 input, basic blocks)."""
    return register_model(
        family="cifar", depth=depth, block="basic", residual=residual, input_size=32
    )


@_cifar(20, residual=True)
def cifar_resnet20(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-20 (0.27M parameters)."""
    return cifar_net(
        20, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(32, residual=True)
def cifar_resnet32(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-32 (0.46M parameters)."""
    return cifar_net(
        32, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(44, residual=True)
def cifar_resnet44(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-44 (0.66M parameters)."""
    return cifar_net(
        44, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(56, residual=True)
def cifar_resnet56(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-56 (0.85M parameters)."""
    return cifar_net(
        56, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(110, residual=True)
def cifar_resnet110(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-110 (1.7M parameters; the paper warms up at lr 0.01)."""
    return cifar_net(
        110, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(1202, residual=True)
def cifar_resnet1202(
    num_classes: int = 10, *, shortcut: Shortcut = "A", zero_init_residual: bool = False
) -> ResNet:
    """ResNet-1202 (19.4M parameters)."""
    return cifar_net(
        1202, num_classes=num_classes, shortcut=shortcut, zero_init_residual=zero_init_residual
    )


@_cifar(20, residual=False)
def cifar_plain20(num_classes: int = 10) -> ResNet:
    """Plain-20 (Fig. 6)."""
    return cifar_net(20, num_classes=num_classes, shortcut=None)


@_cifar(32, residual=False)
def cifar_plain32(num_classes: int = 10) -> ResNet:
    """Plain-32 (Fig. 6)."""
    return cifar_net(32, num_classes=num_classes, shortcut=None)


@_cifar(44, residual=False)
def cifar_plain44(num_classes: int = 10) -> ResNet:
    """Plain-44 (Fig. 6)."""
    return cifar_net(44, num_classes=num_classes, shortcut=None)


@_cifar(56, residual=False)
def cifar_plain56(num_classes: int = 10) -> ResNet:
    """Plain-56 (Fig. 6)."""
    return cifar_net(56, num_classes=num_classes, shortcut=None)


@_cifar(110, residual=False)
def cifar_plain110(num_classes: int = 10) -> ResNet:
    """Plain-110 (Fig. 6 mentions it fails to converge well; kept for completeness)."""
    return cifar_net(110, num_classes=num_classes, shortcut=None)
