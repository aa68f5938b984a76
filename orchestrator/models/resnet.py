"""Plain and residual nets of He et al. (2016), "Deep Residual Learning for Image Recognition".

One ``ResNet`` class builds every net in the paper: the ImageNet nets of Table 1 and the CIFAR-10
nets of Sec. 4.2 differ only in their stem, stage widths and block counts. A "plain" net is the
same stack with the shortcuts removed (``shortcut=None``).

Shortcut options (Sec. 3.3):
  A  identity; where the shape changes, subsample by striding and zero-pad the new channels
     (no parameters).
  B  identity, but a projection (1x1 conv + BN) where the shape changes.
  C  a projection on every block.

With option B the module names match torchvision's ``resnet18``..``resnet152`` (conv1, bn1,
layer1..layer4, ``downsample.0``/``downsample.1``, fc), so its checkpoints load with
``strict=True`` whichever stride placement is chosen.

Initialisation: He (fan-out, ReLU) normal for convs, BN weight 1 / bias 0, as in the paper
and torchvision. The fc layer keeps PyTorch's ``nn.Linear`` default (uniform, bound
1/sqrt(fan_in)), which is also what torchvision does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "Shortcut",
    "ZeroPadShortcut",
    "make_shortcut",
]

Shortcut = Literal["A", "B", "C"]
SHORTCUTS: tuple[str, ...] = get_args(Shortcut)


def check_shortcut(shortcut: object) -> None:
    """Raise ValueError unless ``shortcut`` is "A", "B", "C" or None (plain net)."""
    if shortcut is not None and shortcut not in SHORTCUTS:
        allowed = ", ".join(repr(s) for s in SHORTCUTS)
        raise ValueError(f"shortcut must be one of {allowed} (got {shortcut!r})")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BN, whose shift makes a bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: parameter-free shortcut for a block that changes shape.

    Subsamples by taking every ``stride``-th pixel (``x[:, :, ::2, ::2]``), as the paper's CIFAR
    nets do, and appends zero channels. ``ceil(h / stride)`` rows survive, which matches the
    residual branch's conv output for any input size.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("zero padding cannot reduce the number of channels")
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's pairs run from the last dim backwards: (W, W, H, H, C, C).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def make_shortcut(
    shortcut: Shortcut | None, in_channels: int, out_channels: int, stride: int
) -> nn.Module | None:
    """The shortcut's transform, or None where it is the identity (or absent, in a plain net)."""
    check_shortcut(shortcut)
    if shortcut is None:
        return None
    changes_shape = stride != 1 or in_channels != out_channels
    if shortcut == "C" or (shortcut == "B" and changes_shape):
        return nn.Sequential(
            conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
        )
    if shortcut == "A" and changes_shape:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR nets); ``shortcut=None`` makes it plain."""

    expansion = 1

    def __init__(
        self, in_channels: int, width: int, stride: int = 1, shortcut: Shortcut | None = "B"
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.residual = shortcut is not None
        self.downsample = make_shortcut(shortcut, in_channels, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)

    def zero_init_last(self) -> None:
        """Start the block as the identity (Goyal et al. 2017; not in the paper)."""
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 -> 1x1 (expand x4), for ResNet-50/101/152.

    ``stride_in_1x1=True`` is the paper's v1 block (stride in the first 1x1 conv);
    False is torchvision's v1.5 (stride in the 3x3; more multiply-adds, a little more accurate).
    Both have the same parameter shapes.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        shortcut: Shortcut | None = "B",
        stride_in_1x1: bool = True,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_channels, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.residual = shortcut is not None
        self.downsample = make_shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)

    def zero_init_last(self) -> None:
        """Start the block as the identity (Goyal et al. 2017; not in the paper)."""
        nn.init.zeros_(self.bn3.weight)


class ResNet(nn.Module):
    """Stem -> stages ``layer1..layerN`` -> global average pool -> fc.

    ``stem="imagenet"``: 7x7/2 conv + 3x3/2 max pool (Table 1). ``stem="cifar"``: one 3x3 conv
    (Sec. 4.2). Every stage after the first halves the resolution in its first block.
    ``shortcut=None`` builds the plain counterpart. ``stride_in_1x1`` applies to bottleneck
    nets only (default True, the paper's v1); a basic-block net rejects it.

    Fully convolutional: any input size works (ImageNet nets downsample 32x, so 32x32 is the
    smallest that keeps a real final map), and ``score_map`` gives the class scores at every
    position of the final map.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: Sequence[int],
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: Literal["imagenet", "cifar"] = "imagenet",
        num_classes: int = 1000,
        shortcut: Shortcut | None = "B",
        stride_in_1x1: bool | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        check_shortcut(shortcut)
        if len(widths) != len(blocks_per_stage):
            raise ValueError("need one width per stage")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (got {num_classes})")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar' (got {stem!r})")
        if zero_init_residual and shortcut is None:
            # With no shortcut, a zeroed last BN would cut the signal entirely.
            raise ValueError("zero_init_residual needs shortcuts; a plain net cannot use it")
        block_options = {}
        if issubclass(block, Bottleneck):
            block_options["stride_in_1x1"] = True if stride_in_1x1 is None else stride_in_1x1
        elif stride_in_1x1 is not None:
            raise ValueError("stride_in_1x1 only applies to bottleneck blocks")

        stem_width = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(3, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()

        in_channels = stem_width
        self.num_stages = len(blocks_per_stage)
        for i, (width, num_blocks) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            blocks = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_channels, width, stride, shortcut, **block_options))
                in_channels = width * block.expansion
            # torchvision's names, so its checkpoints load as they are.
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = in_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

        self.zero_init_residual = zero_init_residual
        # A net built on the meta device (to count parameters or FLOPs, or for deferred
        # init) has no values to set, and normal_ there is slower than on the CPU.
        if not self.conv1.weight.is_meta:
            self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise all weights; call it after ``to_empty()`` on a net built on meta.

        Convs: He normal, fan-out, ReLU gain. BN: weight 1, bias 0, fresh running statistics.
        fc: ``nn.Linear``'s default, as torchvision does.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.Linear)):
                m.reset_parameters()
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map, ``[N, num_features, h, w]``, before global pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        """Global average pool and fc: ``[N, C, h, w] -> [N, num_classes]``."""
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def score_map(self, x: Tensor) -> Tensor:
        """Class scores at every position, ``[N, num_classes, h, w]`` (fc as a 1x1 conv).

        The fc is linear, so the spatial mean of this map equals ``forward(x)``; the paper's
        multi-scale test averages these maps over positions, scales and flips.
        """
        weight = self.fc.weight[:, :, None, None]
        return F.conv2d(self.forward_features(x), weight, self.fc.bias)


# ---------------------------------------------------------------------------------------------
# ImageNet nets (Table 1), built by depth; the registered names are in zoo.py.

_IMAGENET_STAGES: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def imagenet_net(depth: int, **kwargs: object) -> ResNet:
    """An ImageNet net of Table 1 by depth (18, 34, 50, 101, 152); kwargs go to ResNet."""
    block, blocks_per_stage = _IMAGENET_STAGES[depth]
    return ResNet(block, blocks_per_stage, stem="imagenet", **kwargs)  # type: ignore[arg-type]
