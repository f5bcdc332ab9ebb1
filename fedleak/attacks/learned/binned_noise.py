"""Gaussian release noise drawn in hash space: the features of a noisy update, exact in
distribution, without drawing the noise's D coordinates.

When every release step adds Gaussian noise (gauss, DP-SGD's noise) and the features are
hashed, the features of r + n, n ~ N(0, s^2 I), depend on n only through a few numbers per
parameter block b (d_b coordinates). Its non-empty bins j hold c_bj coordinates each, with
hash signs; the unit vectors e_bj (those signs / sqrt(c_bj) on bin j's coordinates) are
orthonormal, so with h_bj the clean block's hashed value and a_bj = h_bj / sqrt(c_bj):

- the noisy block hashes to h_bj + s sqrt(c_bj) z_bj, z_bj iid N(0, 1);
- its squared norm (for block normalisation) is
  sum_j (a_bj + s z_bj)^2 + (rho_b + s w_b)^2 + s^2 chi2(m_b - 1),
  rho_b^2 = |r_b|^2 - sum_j a_bj^2 the clean block outside the bins' span, m_b = d_b - k_b
  that span's complement (k_b non-empty bins), w_b ~ N(0, 1) and the chi-square independent
  of z and of each other (the noise outside the span, split along r_b's part there and
  across it).

So a pair costs k_b + 2 draws per block instead of d_b: at 4,096 bins the 1.1M-parameter
transformer's blocks have 59,082 non-empty bins (5% of the coordinates), at 10% hashing
657,800 (60%). The clean hashed blocks and squared norms of a round's pairs are small enough
to keep, so an epoch under noise redraws only these numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedleak.attacks.learned.hashing import FeatureHasher
from fedleak.defenses import DPSGD, DefensePipeline, GaussianNoise

# The featuriser's floor under a block's norm.
_NORM_FLOOR = 1e-12


def gaussian_release_std(pipeline: DefensePipeline, batch_size: int) -> float | None:
    """The standard deviation of the release's noise on a mean of `batch_size` clipped
    gradients when every release step adds Gaussian noise (their variances add); None when a
    step does anything else (pruning, sign, an encoding, a plugin)."""
    variance = 0.0
    for step in pipeline.steps:
        if step.stage == "clip" and isinstance(step, DPSGD):
            variance += step.noise_std(batch_size) ** 2
        elif step.stage == "release" and isinstance(step, GaussianNoise):
            variance += step.sigma**2
        else:
            return None
    return math.sqrt(variance)


@dataclass(frozen=True)
class CleanBins:
    """Clean updates as hash space needs them: each block's values at its non-empty bins,
    side by side [N, sum of k_b], and each block's squared norm [N, blocks] (float64)."""

    hashed: Tensor
    squares: Tensor

    def __getitem__(self, rows: slice) -> CleanBins:
        """The rows `rows` (views: writing into them writes into these)."""
        return CleanBins(self.hashed[rows], self.squares[rows])


@dataclass(frozen=True)
class _Block:
    name: str
    size: int
    bins: Tensor  # its non-empty bins [k_b]
    root_counts: Tensor  # sqrt(c_bj) [k_b]
    columns: slice  # its place in CleanBins.hashed
    # Each coordinate's slot among the block's own bins (x2 + sign bit when signed): hashing
    # a clean block scatters into k_b (or 2 k_b) slots, not into all of the hasher's bins.
    slots: Tensor  # [d_b] int64


class BinnedNoise:
    """Features of `clean + N(0, std^2)` for a hashed featuriser over `sizes` (name ->
    coordinates, in hashing order), with or without block normalisation."""

    def __init__(
        self,
        hasher: FeatureHasher,
        sizes: Mapping[str, int],
        block_normalise: bool,
        std: float,
        device: torch.device,
    ) -> None:
        self.hasher = hasher
        self.block_normalise = block_normalise
        self.std = std
        self.device = device
        self.blocks: list[_Block] = []
        offset = column = 0
        for name, size in sizes.items():
            bins, compact, counts = torch.unique(
                hasher.bin_ids(offset, offset + size, device),
                return_inverse=True,
                return_counts=True,
            )
            if hasher.signed:
                negative = hasher.signs(offset, offset + size, device) < 0
                compact = compact * 2 + negative.to(torch.int64)
            width = bins.numel()
            self.blocks.append(
                _Block(
                    name,
                    size,
                    bins,
                    counts.to(torch.float32).sqrt(),
                    slice(column, column + width),
                    compact,
                )
            )
            offset += size
            column += width
        self.columns = column

    def bytes_per_row(self) -> int:
        """Memory of one row of `CleanBins`."""
        return self.columns * 4 + len(self.blocks) * 8

    def empty(self, rows: int) -> CleanBins:
        """Room for `rows` clean updates."""
        return CleanBins(
            torch.empty(rows, self.columns, device=self.device),
            torch.empty(rows, len(self.blocks), dtype=torch.float64, device=self.device),
        )

    def clean(self, update: Mapping[str, Tensor], out: CleanBins | None = None) -> CleanBins:
        """The hashed blocks and squared norms of clean updates (leading dim N), written into
        `out` when given (e.g. rows of a round's kept groups, without a copy to join them)."""
        rows = next(iter(update.values())).shape[0]
        out = self.empty(rows) if out is None else out
        hashed, squares = out.hashed, out.squares
        for index, block in enumerate(self.blocks):
            flat = update[block.name].reshape(rows, -1).float()
            width = block.bins.numel()
            slots = torch.zeros(rows, width * (2 if self.hasher.signed else 1), device=flat.device)
            slots.scatter_add_(1, block.slots.expand(rows, -1), flat)
            if self.hasher.signed:
                slots = slots[:, 0::2] - slots[:, 1::2]
            hashed[:, block.columns] = slots
            # The featuriser's float32 norm, squared in float64 (no float64 copy of the block).
            squares[:, index] = flat.norm(dim=1).double().square()
        return out

    def features(self, clean: CleanBins, generator: torch.Generator) -> Tensor:
        """[N, bins] features of the clean updates plus fresh noise, as the featuriser would
        compute them from the noisy updates."""
        rows = clean.hashed.shape[0]
        s = self.std
        out = torch.zeros(rows, self.hasher.num_bins, device=self.device)
        for index, block in enumerate(self.blocks):
            width = block.bins.numel()
            h = clean.hashed[:, block.columns]
            z = torch.randn(rows, width, generator=generator, device=self.device)
            noisy = torch.addcmul(h, z, block.root_counts * s)
            if self.block_normalise:
                # Sums over the bins in float32 (as the featuriser's norm), combined in float64.
                inside = (noisy / block.root_counts).square().sum(dim=1).double()
                outside = torch.zeros_like(inside)
                complement = block.size - width
                if complement >= 1:
                    in_span = (h / block.root_counts).square().sum(dim=1).double()
                    rho = (clean.squares[:, index] - in_span).clamp_min(0).sqrt()
                    w = torch.randn(rows, generator=generator, device=self.device).double()
                    outside = (rho + s * w).square()
                if complement >= 2:
                    shape = torch.full(
                        (rows,), (complement - 1) / 2, dtype=torch.float64, device=self.device
                    )
                    chi2 = 2.0 * torch._standard_gamma(shape, generator=generator)
                    outside = outside + s * s * chi2
                norm = (inside + outside).sqrt().float().clamp_min(_NORM_FLOOR)
                noisy = noisy / norm.unsqueeze(1)
            out.index_add_(1, block.bins, noisy)
        return out
