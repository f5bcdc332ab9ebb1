"""The sigmoid LeNet of the DLG and LTI papers: the standard small target of gradient inversion."""

from __future__ import annotations

import torch
from torch import nn


def _conv_out(size: int, stride: int) -> int:
    # 5x5 kernel with padding 2: the output is ceil(size / stride).
    return (size + 2 * 2 - 5) // stride + 1


class LeNet(nn.Module):
    """Three 5x5 convolutions of 12 channels (strides 2, 2, 1, padding 2) with sigmoids, then one
    linear layer. Sigmoid activations keep every gradient informative, which is why DLG chose it.

    On 3x32x32 inputs with 10 classes it has 15,826 parameters; on 1x28x28, 13,426.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, stride=2, padding=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, stride=2, padding=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, stride=1, padding=2),
            nn.Sigmoid(),
        )
        for stride in (2, 2, 1):
            height, width = _conv_out(height, stride), _conv_out(width, stride)
        self.classifier = nn.Linear(12 * height * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
