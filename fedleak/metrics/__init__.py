"""Leakage metrics: image similarity, LPIPS, label recovery, text (token accuracy, ROUGE), and
matching to ground truth."""

from __future__ import annotations

import torch

from fedleak.metrics.assignment import ASSIGN_METRICS, assign, cost_matrix
from fedleak.metrics.image import PSNR_MAX_DB, ImageShapeError, mse, psnr, ssim
from fedleak.metrics.labels import (
    hard_labels,
    label_accuracy,
    label_multiset_accuracy,
    multiset_chance,
    multiset_credit,
)
from fedleak.metrics.lpips import (
    LPIPS_MIN_SIZE,
    LPIPS_NETS,
    LPIPSNetError,
    LPIPSScorer,
    UnsafePickleError,
    load_lpips,
)
from fedleak.metrics.text import (
    ROUGE_TYPES,
    TokenShapeError,
    pairwise_token_mismatch,
    rouge,
    token_accuracy,
)


def score_images(
    recon: torch.Tensor, truth: torch.Tensor, lpips_nets: tuple[str, ...] = ("alex",)
) -> dict[str, torch.Tensor]:
    """Per-sample scores of matched pairs (recon[i] against truth[i]), each of shape [B]:
    `mse`, `psnr`, `ssim`, and `lpips_<net>` per requested net (NaN where LPIPS is unavailable;
    small images follow the `LPIPS_MIN_SIZE` upsampling convention)."""
    scores = {"mse": mse(recon, truth), "psnr": psnr(recon, truth), "ssim": ssim(recon, truth)}
    for net in lpips_nets:
        scores[f"lpips_{net}"] = load_lpips(net, recon.device).score(recon, truth)
    return scores


__all__ = [
    "ASSIGN_METRICS",
    "LPIPS_MIN_SIZE",
    "LPIPS_NETS",
    "PSNR_MAX_DB",
    "ROUGE_TYPES",
    "ImageShapeError",
    "LPIPSNetError",
    "LPIPSScorer",
    "TokenShapeError",
    "UnsafePickleError",
    "assign",
    "cost_matrix",
    "hard_labels",
    "label_accuracy",
    "label_multiset_accuracy",
    "load_lpips",
    "mse",
    "multiset_chance",
    "multiset_credit",
    "pairwise_token_mismatch",
    "psnr",
    "rouge",
    "score_images",
    "ssim",
    "token_accuracy",
]
