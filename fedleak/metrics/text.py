"""Text leakage metrics: position-wise token accuracy and ROUGE-1/2/L, per sequence.

Token accuracy compares token ids position by position (the LTI paper's "accuracy"). ROUGE
compares the decoded texts with the `rouge-score` package (the Python port of the reference
implementation): F-measures of unigram and bigram overlap and of the longest common
subsequence, on lower-cased alphanumeric words, without stemming. A truth with no such word
has no defined ROUGE (NaN).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # rouge_score imports nltk (a third of a second): only when scoring text
    from rouge_score import rouge_scorer, tokenizers

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")


class TokenShapeError(ValueError):
    """Token sequences that cannot be compared."""


def _check(recon: torch.Tensor, truth: torch.Tensor) -> None:
    if recon.dim() != 2 or recon.shape != truth.shape:
        raise TokenShapeError(
            f"token sequences must be equal [B, L] shapes, got {tuple(recon.shape)} and "
            f"{tuple(truth.shape)}"
        )


def token_accuracy(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Fraction of positions where the token equals the truth's, per sequence [B]."""
    _check(recon, truth)
    return (recon.long().cpu() == truth.long().cpu()).float().mean(dim=1)


def pairwise_token_mismatch(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1 - token accuracy between every reconstruction and every truth: shape [B, B2]."""
    if recon.dim() != 2 or truth.dim() != 2 or recon.shape[1] != truth.shape[1]:
        raise TokenShapeError(
            f"cannot compare token sequences {tuple(recon.shape)} and {tuple(truth.shape)}"
        )
    equal = recon.long().cpu()[:, None, :] == truth.long().cpu()[None, :, :]
    return 1.0 - equal.float().mean(dim=2)


@functools.lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


@functools.lru_cache(maxsize=1)
def _words() -> tokenizers.DefaultTokenizer:
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=False)


def rouge(recon_texts: Sequence[str], truth_texts: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of each reconstruction against its truth; NaN
    where the truth gives the measure nothing to count (no word; for ROUGE-2, no word pair),
    since ROUGE would score even an exact reconstruction 0 there."""
    if len(recon_texts) != len(truth_texts):
        raise TokenShapeError(f"{len(recon_texts)} reconstructions for {len(truth_texts)} texts")
    scores: dict[str, list[float]] = {name: [] for name in ROUGE_TYPES}
    for recon, truth in zip(recon_texts, truth_texts, strict=True):
        words = len(_words().tokenize(truth))
        if not words:
            for name in ROUGE_TYPES:
                scores[name].append(math.nan)
            continue
        result = _scorer().score(truth, recon)  # (target, prediction)
        for name in ROUGE_TYPES:
            undefined = name == "rouge2" and words < 2
            scores[name].append(math.nan if undefined else float(result[name].fmeasure))
    return scores
