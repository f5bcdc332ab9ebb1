"""Noise defenses: additive Gaussian noise, and DP-SGD (per-sample clipping, then noise).

Noise is drawn per parameter tensor in `named_parameters` order from the caller's generator
(which must live on the tensors' device), so the same generator state gives the same noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedleak.defenses.grammar import DefenseSpecError
from fedleak.settings import format_number


def add_gaussian(
    tensors: dict[str, Tensor], std: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Each tensor plus independent N(0, std^2) noise of its own shape."""
    if std == 0.0:
        return dict(tensors)
    # In place on the fresh draw: the same bits as `t + std * noise` without two more
    # tensors of the update's size (LTI draws this for every training pair every epoch).
    return {
        name: torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
        .mul_(std)
        .add_(t)
        for name, t in tensors.items()
    }


# Updates are float32. Normal draws reach several standard deviations, so a scale within a
# few orders of float32's largest number made some coordinates infinite and failed the round
# (5e37 did, audit EF4); at this bound a draw would need 16 of them.
LARGEST_SCALE = float(torch.finfo(torch.float32).max) / 16
# float32's smallest normal number: a clip norm below it is 0 or a subnormal in float32, which
# zeroed every update (the run trained nothing and reported ε) or divided 0 by 0.
SMALLEST_CLIP = float(torch.finfo(torch.float32).tiny)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class GaussianNoise:
    """Add N(0, sigma^2) to every coordinate of what the client shares: the gradient in
    FedSGD (Zhu et al.'s and LTI's noise defense), the weight change in FedAvg."""

    sigma: float
    kind: ClassVar[str] = "gauss"
    stage: ClassVar[str] = "release"
    rank: ClassVar[float] = 2.0

    def __post_init__(self) -> None:
        if not (_finite(self.sigma) and self.sigma >= 0):
            raise DefenseSpecError(f"gauss: SIGMA={self.sigma!r} must be a finite number >= 0")
        if self.sigma > LARGEST_SCALE:
            raise DefenseSpecError(
                f"gauss: SIGMA={self.sigma:g} must be at most {LARGEST_SCALE:.4g} (float32's "
                "largest number over 16: a larger one makes shared updates infinite)"
            )

    @property
    def spec(self) -> str:
        """This step's canonical spec part."""
        return f"gauss:{format_number(self.sigma)}"

    def __call__(self, grads: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Noisy copies; any shape (with a leading batch dim every sample gets its own noise)."""
        return add_gaussian(grads, self.sigma, generator)

    def release(
        self,
        grads: dict[str, Tensor],
        generator: torch.Generator,
        *,
        batched: bool,
        dp_batch_size: int | None,
    ) -> dict[str, Tensor]:
        """The pipeline's hook: add the noise."""
        return self(grads, generator)


def clip_per_sample(per_sample: dict[str, Tensor], clip_norm: float) -> dict[str, Tensor]:
    """Per-sample gradients (leading dim B) scaled so that each sample's norm over all
    parameters is <= `clip_norm`: DP-SGD's clip, as clients and adaptive replays apply it."""
    if not per_sample:
        return {}
    # reshape, not flatten(1): a scalar parameter's per-sample gradient is one number a row.
    squares = sum(t.reshape(len(t), -1).square().sum(dim=1) for t in per_sample.values())
    norms = torch.sqrt(squares)
    scale = clip_norm / norms.clamp(min=clip_norm)
    return {name: t * scale.reshape(-1, *[1] * (t.dim() - 1)) for name, t in per_sample.items()}


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD (Abadi et al. 2016): clip each sample's gradient to L2 norm <= C over all
    parameters together, average, and add N(0, (Z*C/B)^2) to the mean (Z: noise multiplier)."""

    clip_norm: float
    noise_multiplier: float
    kind: ClassVar[str] = "dpsgd"
    stage: ClassVar[str] = "clip"
    rank: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        if not (_finite(self.clip_norm) and self.clip_norm > 0):
            raise DefenseSpecError(f"dpsgd: C={self.clip_norm!r} must be a finite number > 0")
        if self.clip_norm < SMALLEST_CLIP:
            raise DefenseSpecError(
                f"dpsgd: C={self.clip_norm:g} must be at least {SMALLEST_CLIP:.4g} (float32's "
                "smallest normal number: a smaller clip norm zeroes every update)"
            )
        if not (_finite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise DefenseSpecError(
                f"dpsgd: Z={self.noise_multiplier!r} must be a finite number >= 0"
            )
        if self.clip_norm * self.noise_multiplier > LARGEST_SCALE:
            raise DefenseSpecError(
                f"dpsgd: C x Z = {self.clip_norm * self.noise_multiplier:g} must be at most "
                f"{LARGEST_SCALE:.4g} (float32's largest number over 16: a larger noise scale "
                "makes shared updates infinite)"
            )

    @property
    def spec(self) -> str:
        """This step's canonical spec part."""
        return f"dpsgd:{format_number(self.clip_norm)}:{format_number(self.noise_multiplier)}"

    def noise_std(self, batch_size: int) -> float:
        """Standard deviation of the noise on the mean of `batch_size` clipped gradients."""
        return self.noise_multiplier * self.clip_norm / batch_size

    def clip(self, per_sample: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-sample gradients (leading dim B) scaled so that each sample's norm is <= C."""
        return clip_per_sample(per_sample, self.clip_norm)

    def noise(
        self, mean: dict[str, Tensor], batch_size: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """The mean of `batch_size` clipped gradients plus its DP noise."""
        return add_gaussian(mean, self.noise_std(batch_size), generator)

    def release(
        self,
        grads: dict[str, Tensor],
        generator: torch.Generator,
        *,
        batched: bool,
        dp_batch_size: int | None,
    ) -> dict[str, Tensor]:
        """The pipeline's hook: the noise of a mean of `dp_batch_size` clipped gradients; none
        for FedAvg's delta, whose local steps were noised one by one."""
        if dp_batch_size is None:
            return dict(grads)
        return self.noise(grads, dp_batch_size, generator)

    def __call__(
        self, per_sample: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """The privatised gradient of a batch: clip, average, add noise."""
        clipped = self.clip(per_sample)
        batch_size = next(iter(per_sample.values())).shape[0]
        return self.noise({k: t.mean(dim=0) for k, t in clipped.items()}, batch_size, generator)
