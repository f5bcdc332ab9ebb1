"""CIFAR-style residual networks: ResNet-20 (He et al. 2016, section 4.2) and ResNet-18 with a
3x3 stem for small inputs, each with BatchNorm or GroupNorm.

GroupNorm variants exist because BatchNorm mixes the samples of a batch: per-sample gradients
(torch.func.vmap) and DP-SGD need a normalisation that sees one sample at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Norm = Callable[[int], nn.Module]


def group_count(channels: int) -> int:
    """GroupNorm groups for a layer: Wu & He's 32, or fewer so that each group keeps at least
    4 channels (16 channels -> 4 groups, 32 -> 8, 64 -> 16, 128 and more -> 32)."""
    return max(1, min(32, channels // 4))


def norm_layer(kind: str) -> Norm:
    """A factory `channels -> normalisation module` for "bn" (BatchNorm) or "gn" (GroupNorm)."""
    if kind == "bn":
        return nn.BatchNorm2d
    return lambda channels: nn.GroupNorm(group_count(channels), channels)


class _PadShortcut(nn.Module):
    """ResNet-20's parameter-free shortcut ("option A"): subsample, then zero-pad the channels."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with normalisation and a residual connection."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, norm: Norm, projection: bool
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if projection:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                    norm(out_channels),
                )
            else:
                self.shortcut = _PadShortcut(stride, out_channels - in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem, stages of basic blocks (the first block of each later stage halves the
    resolution), global average pooling, one linear layer. Accepts any input size."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        widths: tuple[int, ...],
        blocks_per_stage: int,
        norm: Norm,
        projection: bool,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], widths[0], 3, 1, padding=1, bias=False),
            norm(widths[0]),
            nn.ReLU(),
        )
        blocks = []
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride, norm, projection))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(out, 1))


def resnet20(input_shape: tuple[int, int, int], num_classes: int, norm: str) -> ResNet:
    """He et al.'s CIFAR ResNet-20: 3 stages x 3 blocks of 16/32/64 channels, zero-padding
    shortcuts; 269,722 parameters on 3x32x32 with 10 classes (BatchNorm or GroupNorm)."""
    return ResNet(input_shape, num_classes, (16, 32, 64), 3, norm_layer(norm), projection=False)


def resnet18(input_shape: tuple[int, int, int], num_classes: int, norm: str) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max pooling (the usual CIFAR adaptation):
    4 stages x 2 blocks of 64/128/256/512 channels, 1x1 projection shortcuts;
    11,173,962 parameters on 3x32x32 with 10 classes."""
    return ResNet(
        input_shape, num_classes, (64, 128, 256, 512), 2, norm_layer(norm), projection=True
    )
