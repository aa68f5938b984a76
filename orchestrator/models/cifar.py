"""The CIFAR-10 nets of Sec. 4.2: 6n+2 layers, 16/32/64 filters, option A shortcuts.

A 3x3 conv with 16 filters, then three stages of n basic blocks (2n layers each) on 32x32,
16x16 and 8x8 maps, global average pooling and a 10-way fc. ResNet-20/32/44/56/110/1202
(n = 3/5/7/9/18/200) and the plain nets of Fig. 6 (plain-20/32/44/56; plain-110 for
completeness). Built from the same ``ResNet`` class and blocks as the ImageNet nets.
"""

from __future__ import annotations

from .resnet import BasicBlock, ResNet, Shortcut

__all__ = ["cifar_net"]  # the registered names are in zoo.py

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
