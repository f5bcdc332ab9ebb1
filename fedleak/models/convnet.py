"""A small width-parameterised ConvNet, after the ConvNet of the Inverting Gradients paper."""

from __future__ import annotations

import torch
from torch import nn


def _block(in_channels: int, out_channels: int, batchnorm: bool) -> list[nn.Module]:
    if not batchnorm:
        return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
    # The BatchNorm shift makes a convolution bias redundant.
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class ConvNet(nn.Module):
    """Four 3x3 convolutions of width w, 2w, 4w, 4w with ReLU (and BatchNorm when asked),
    2x2 max pooling after the second and third, global average pooling, one linear layer.

    Global average pooling makes it accept any input of at least 4x4 pixels. With w = 32,
    3x32x32 inputs and 10 classes it has 242,122 parameters (242,474 with BatchNorm).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int = 32,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            *_block(channels, width, batchnorm),
            *_block(width, 2 * width, batchnorm),
            nn.MaxPool2d(2),
            *_block(2 * width, 4 * width, batchnorm),
            nn.MaxPool2d(2),
            *_block(4 * width, 4 * width, batchnorm),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
