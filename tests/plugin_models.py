"""Models a user brings through `model.name=<module>:<factory>`, with buffers that are not
BatchNorm's: the simulation tests put this folder on the clients' PYTHONPATH."""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import Tensor, nn


class ForwardCounter(nn.Module):
    """Counts the training forward passes it sees in a buffer (a plug-in's own state)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.seen += 1
        return x


def instance_norm_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A convolution, an InstanceNorm that tracks running statistics, a forward counter and a
    linear head."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.ReLU(),
        ForwardCounter(),
        nn.Flatten(),
        nn.Linear(4 * height * width, num_classes),
    )


def frozen_head_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A linear model whose first layer is frozen (fine-tuning style)."""
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), 8), nn.Linear(8, num_classes)
    )
    model[1].requires_grad_(False)
    return model


class _WithFeatures(nn.Module):
    """Returns (logits, features), as many models of the user's own do."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 8), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return self.head(features), features


def tuple_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier whose forward returns a tuple, not the logits tensor."""
    return _WithFeatures(input_shape, num_classes)


def eleven_class_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A linear classifier with one class more than the data set has."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))


class _OneRow(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, pool: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        if self.pool:  # the batch's mean input: one row whatever the batch
            return self.linear(x.flatten(1).mean(dim=0, keepdim=True))
        return self.linear(x.view(1, -1))


def one_row_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier that flattens its whole batch into one row: right for one input only."""
    return _OneRow(input_shape, num_classes, pool=False)


def pooled_batch_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier that scores its batch's mean input: one row of scores for any batch."""
    return _OneRow(input_shape, num_classes, pool=True)


def double_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier in float64: every forward of float32 inputs fails."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes)).double()


class _NotFinite(nn.Module):
    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, *, always: bool, value: float
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)
        self.always, self.value = always, value

    def forward(self, x: Tensor) -> Tensor:
        scores = self.linear(x.flatten(1))
        return scores + self.value if self.always or self.training else scores


def nan_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier whose every score is NaN."""
    return _NotFinite(input_shape, num_classes, always=True, value=math.nan)


def nan_in_training_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier whose scores are NaN in training mode only."""
    return _NotFinite(input_shape, num_classes, always=False, value=math.nan)


def inf_in_training_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier whose scores are +inf in training mode only."""
    return _NotFinite(input_shape, num_classes, always=False, value=math.inf)


class _SmallBatches(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, exits: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)
        self.exits = exits

    def forward(self, x: Tensor) -> Tensor:
        if len(x) > 16 and os.environ.get("FEDLEAK_TEST_SMALL_BATCHES") != "0":
            if self.exits:
                sys.exit("batch too big, bye")
            raise RuntimeError("batch too big for my buffer")
        return self.linear(x.flatten(1))


def small_batch_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier whose forward takes at most 16 inputs (any number while
    FEDLEAK_TEST_SMALL_BATCHES=0): a client's batch, not the server's evaluation batch."""
    return _SmallBatches(input_shape, num_classes, exits=False)


def exiting_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """`small_batch_net` that calls sys.exit() where the other raises."""
    return _SmallBatches(input_shape, num_classes, exits=True)


class _BatchStandardised(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(math.prod(input_shape), 8)
        self.out = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.hidden(x.flatten(1))
        if self.training:  # NaN for a batch of one (the spread of one sample)
            centred = h - h.mean(0)
            h = centred / ((centred**2).sum(0) / (len(h) - 1)).sqrt()
        return self.out(h.relu())


def batch_std_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier that standardises its hidden layer over the batch in training."""
    return _BatchStandardised(input_shape, num_classes)


class _OneInfinite(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.linear(x.flatten(1))
        return torch.cat([torch.full_like(scores[:, :1], math.inf), scores[:, 1:]], dim=1)


def one_infinite_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A classifier whose first class always scores +inf, the others finite."""
    return _OneInfinite(input_shape, num_classes)


def batchnorm1d_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """An MLP with BatchNorm1d: its training forward fails on a batch of one sample."""
    features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes)
    )
