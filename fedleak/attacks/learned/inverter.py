"""The LTI inversion model: an MLP from a (hashed) update to B images and B label logits.

For B > 1 the order of the samples in the update is unknown (the mean gradient is
symmetric in them), so the loss matches outputs to targets per training example before
averaging. For B <= `EXHAUSTIVE_MAX_B` all B! assignments are scored at once on the device
(exact, no host round trip); above it the Hungarian method (scipy's linear_sum_assignment)
runs on the detached cost matrices on the CPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

EXHAUSTIVE_MAX_B = 5

HEADS: tuple[str, ...] = ("sigmoid", "linear")

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class InverterError(ValueError):
    """An inverter setting is out of range."""


class Inverter(nn.Module):
    """MLP g_theta: standardised features [N, F] -> images [N, B, *shape], logits [N, B, C].

    The per-feature standardisation (mean, scale) is part of the model's state so that a
    saved inverter carries the input statistics it was trained with. `head`: `sigmoid` maps
    the pixel outputs into the data range; `linear` leaves them unbounded (the LTI paper's
    MLP regresses the flattened image directly; the attack clamps its final guess).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        image_shape: Sequence[int],
        num_targets: int,
        num_classes: int,
        activation: str = "relu",
        data_range: tuple[float, float] = (0.0, 1.0),
        head: str = "sigmoid",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise InverterError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        if head not in HEADS:
            raise InverterError(f"head={head!r} is not one of {list(HEADS)}")
        self.head = head
        if in_features < 1 or num_targets < 1 or num_classes < 1:
            raise InverterError(
                f"in_features={in_features}, num_targets={num_targets}, "
                f"num_classes={num_classes} must all be >= 1"
            )
        if any(h < 1 for h in hidden):
            raise InverterError(f"hidden={tuple(hidden)} must hold sizes >= 1")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_targets = num_targets
        self.num_classes = num_classes
        self.data_range = data_range
        self.image_size = int(np.prod(self.image_shape))
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(widths[-1], num_targets * (self.image_size + num_classes)))
        self.body = nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_scale", torch.ones(in_features))

    @torch.no_grad()
    def fit_standardisation(self, features: torch.Tensor, eps: float = 1e-8) -> None:
        """Input statistics from training features [N, F]; constant features keep scale 1."""
        self.feature_mean.copy_(features.mean(0))
        std = features.std(0, unbiased=False)
        self.feature_scale.copy_(torch.where(std > eps, std, torch.ones_like(std)))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.body((features - self.feature_mean) / self.feature_scale)
        n, b = features.shape[0], self.num_targets
        pixels, logits = z.split([b * self.image_size, b * self.num_classes], dim=1)
        pixels = pixels.reshape(n, b, *self.image_shape)
        if self.head == "sigmoid":
            low, high = self.data_range
            pixels = low + (high - low) * torch.sigmoid(pixels)
        return pixels, logits.reshape(n, b, self.num_classes)

    def initial_pixels(self, mean_image: torch.Tensor) -> torch.Tensor:
        """The last layer's pixel bias that makes every output the given image (the head's
        inverse of it): the inverter then starts from the aux-mean guess."""
        if self.head == "linear":
            return mean_image.flatten()
        low, high = self.data_range
        unit = (mean_image.flatten() - low) / (high - low)
        return torch.logit(unit.clamp(0.01, 0.99))


def _pair_costs(
    images: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    label_weight: float,
) -> torch.Tensor:
    """cost[n, i, j] = MSE(output i, target j) + label_weight * CE(logits i, label j)."""
    n, b = images.shape[:2]
    out = images.reshape(n, b, 1, -1)
    tgt = targets.reshape(n, 1, b, -1)
    cost = (out - tgt).pow(2).mean(-1)
    if label_weight:
        log_probs = F.log_softmax(logits, dim=-1)
        ce = -torch.gather(log_probs, 2, labels.unsqueeze(1).expand(n, b, b))
        cost = cost + label_weight * ce
    return cost


def best_assignment(cost: torch.Tensor) -> torch.Tensor:
    """For cost [N, B, B], the permutation perm [N, B] minimising sum_i cost[n, i, perm[n, i]]."""
    n, b = cost.shape[:2]
    if b == 1:
        return torch.zeros(n, 1, dtype=torch.int64, device=cost.device)
    if b <= EXHAUSTIVE_MAX_B:
        perms = torch.tensor(
            list(itertools.permutations(range(b))), dtype=torch.int64, device=cost.device
        )
        rows = torch.arange(b, device=cost.device)
        totals = cost[:, rows, perms].sum(-1)  # [N, B!]
        return perms[totals.argmin(1)]
    host = cost.detach().cpu().numpy()
    perm = np.stack([linear_sum_assignment(c)[1] for c in host])
    return torch.from_numpy(perm).to(cost.device)


def inversion_loss(
    images: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    label_weight: float = 1.0,
) -> torch.Tensor:
    """MSE on images + label_weight * CE on labels, after the best output-target assignment.

    images [N, B, *shape], logits [N, B, C], targets like images, labels [N, B] (int64).
    """
    n, b = images.shape[:2]
    if b > 1:
        with torch.no_grad():
            perm = best_assignment(_pair_costs(images, logits, targets, labels, label_weight))
        index = perm.reshape(n, b, *([1] * (targets.dim() - 2))).expand_as(targets)
        targets = torch.gather(targets, 1, index)
        labels = torch.gather(labels, 1, perm)
    loss = F.mse_loss(images, targets)
    if label_weight:
        loss = loss + label_weight * F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return loss
