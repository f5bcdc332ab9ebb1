"""Which reconstruction belongs to which private sample: a minimum-cost one-to-one matching.

Attacks return their guesses in no particular order, so each is scored against the ground-truth
sample it matches best overall (Hungarian algorithm on a pairwise cost matrix).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from fedleak.metrics.image import psnr_from_mse, ssim
from fedleak.metrics.lpips import LPIPSScorer
from fedleak.metrics.text import pairwise_token_mismatch

ASSIGN_METRICS: tuple[str, ...] = ("mse", "psnr", "ssim", "lpips", "tokens")

# Pixel values per chunk of pairs scored at once by SSIM, to bound memory on large batches.
_SSIM_CHUNK_VALUES = 1 << 22


def pairwise_mse(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """MSE between every reconstruction and every ground-truth sample: shape [B, B2]."""
    r = recon.flatten(1).double()
    t = truth.flatten(1).double()
    sq = r.square().sum(1)[:, None] + t.square().sum(1)[None, :] - 2 * r @ t.T
    return (sq.clamp_min(0) / r.shape[1]).float()


def pairwise_ssim(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """SSIM between every reconstruction and every ground-truth sample: shape [B, B2]."""
    rows, cols = torch.meshgrid(torch.arange(len(recon)), torch.arange(len(truth)), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    chunk = max(1, _SSIM_CHUNK_VALUES // recon[0].numel())
    values = [
        ssim(recon[r], truth[c]) for r, c in zip(rows.split(chunk), cols.split(chunk), strict=True)
    ]
    return torch.cat(values).view(len(recon), len(truth))


def cost_matrix(
    recon: torch.Tensor, truth: torch.Tensor, metric: str, scorer: LPIPSScorer | None = None
) -> torch.Tensor:
    """Pairwise matching cost [B, B2], lower is better: MSE, -PSNR, -SSIM, LPIPS, or the
    fraction of mismatched positions of token sequences (`tokens`)."""
    if metric == "tokens":
        return pairwise_token_mismatch(recon, truth)
    if metric == "mse":
        return pairwise_mse(recon, truth)
    if metric == "psnr":
        return -psnr_from_mse(pairwise_mse(recon, truth))
    if metric == "ssim":
        return -pairwise_ssim(recon, truth)
    if metric == "lpips":
        if scorer is None or not scorer.available:
            why = "no scorer given" if scorer is None else scorer.reason
            raise ValueError(f"assign metric='lpips' needs an available LPIPS scorer: {why}")
        return scorer.pairwise(recon, truth)
    raise ValueError(f"assign metric={metric!r} is unknown; choose one of {ASSIGN_METRICS}")


def assign(
    recon: torch.Tensor,
    truth: torch.Tensor,
    metric: str = "mse",
    scorer: LPIPSScorer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match reconstructions to ground truth one to one, minimising the summed cost.

    Returns int64 index tensors `(recon_idx, truth_idx)` of length min(B, B2), ordered by
    `truth_idx`, so `recon[recon_idx][k]` is scored against `truth[truth_idx][k]`. With
    unequal batch sizes the surplus on the larger side stays unmatched. Non-finite costs
    (diverged reconstructions) count as worse than every finite one.
    """
    if recon.shape[1:] != truth.shape[1:]:
        raise ValueError(
            f"cannot match reconstructions {tuple(recon.shape)} to truth {tuple(truth.shape)}"
        )
    cost = cost_matrix(recon.detach().cpu().float(), truth.detach().cpu().float(), metric, scorer)
    cost = cost.double()
    finite = torch.isfinite(cost)
    if not finite.all():
        worst = cost[finite].abs().max().item() if finite.any() else 0.0
        cost = torch.where(finite, cost, torch.full_like(cost, 2 * worst + 1))
    rows, cols = linear_sum_assignment(cost.numpy())
    order = cols.argsort()
    return torch.as_tensor(rows[order], dtype=torch.long), torch.as_tensor(
        cols[order], dtype=torch.long
    )
