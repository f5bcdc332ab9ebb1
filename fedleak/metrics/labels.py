"""How well an attack recovered the labels of the private batch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import binom


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices from indices [B], or from soft labels / scores [B, K] by argmax."""
    return labels.argmax(dim=1) if labels.dim() == 2 else labels.reshape(-1).long()


def label_accuracy(pred: torch.Tensor | None, true: torch.Tensor) -> float:
    """Fraction of positions where the predicted class equals the true one; NaN if no labels
    were predicted. Either side may be soft ([B, K], e.g. MixUp targets): its argmax counts."""
    if pred is None:
        return float("nan")
    p, t = hard_labels(pred), hard_labels(true)
    if p.shape != t.shape:
        raise ValueError(f"label batches differ in size: {tuple(p.shape)} vs {tuple(t.shape)}")
    if t.numel() == 0:
        return float("nan")
    return (p.cpu() == t.cpu()).float().mean().item()


def label_multiset_accuracy(pred: torch.Tensor | None, true: torch.Tensor) -> float:
    """Fraction of the true labels recovered regardless of order, counting repeats (the batch
    label-recovery score of iDLG / LLG-style attacks, which find labels but not positions)."""
    if pred is None:
        return float("nan")
    t = Counter(hard_labels(true).tolist())
    if not t:
        return float("nan")
    p = Counter(hard_labels(pred).tolist())
    return sum((p & t).values()) / sum(t.values())


def multiset_credit(
    pred: list[int], true: list[int], pool: list[int] | None = None, spare: Sequence[int] = ()
) -> list[bool]:
    """Which pairs' predicted labels count as recovered when a batch's labels are scored as a
    multiset, as label-recovery papers score them: an attack on a batch update finds which
    labels it holds, not which image carries which, and pairing images by pixels would turn an
    exactly recovered multiset into a lottery over permutations. `pool`: every label the batch
    holds (default `true`; more when the batch held samples no pair reached); `spare`: labels
    recovered by guesses no pair holds (more guesses than samples), which credit pairs left
    without. Each label of the pool is recovered at most as often as it occurs; pairs whose own
    truth agrees take the credit first."""
    if len(pred) != len(true):
        raise ValueError(f"label lists differ in length: {len(pred)} vs {len(true)}")
    left = Counter(true if pool is None else pool)
    credit = [False] * len(pred)
    for i, (p, t) in enumerate(zip(pred, true, strict=True)):
        if p == t and left[p] > 0:
            credit[i] = True
            left[p] -= 1
    for i, p in enumerate(pred):
        if not credit[i] and left[p] > 0:
            credit[i] = True
            left[p] -= 1
    for p in spare:
        waiting = [i for i, own in enumerate(credit) if not own]
        if not waiting or left[p] <= 0:
            continue
        credit[next((i for i in waiting if true[i] == p), waiting[0])] = True
        left[p] -= 1
    return credit


def multiset_chance(counts: Sequence[int], prior: Sequence[float]) -> float:
    """The share of a batch's labels (`counts[c]` samples of class c) that a guess of as many
    labels, each drawn from `prior`, recovers on average when scored as a multiset: the sum
    over classes of E[min(n_c, M_c)] / B, M_c ~ Binomial(B, p_c). It grows with B: with many
    samples per class almost any guess holds most of the batch's labels."""
    size = int(sum(counts))
    if size == 0:
        return float("nan")
    drawn = np.arange(size + 1)
    expected = sum(
        float((np.minimum(n, drawn) * binom.pmf(drawn, size, p)).sum())
        for n, p in zip(counts, prior, strict=True)
        if n
    )
    return expected / size
