"""Stratified draws: the class mix of a sample follows the class mix of the pool it comes from.

Used for the held-out test split, the attacker's auxiliary set and the public pool, so that a
small split still covers every class in proportion.
"""

from __future__ import annotations

import numpy as np

# Stream tag keeping the hold-out draw independent of the other draws made from the same seed.
_HOLDOUT_STREAM = 0x484F4C44


class DataSplitError(ValueError):
    """The data cannot be split or sampled as asked; the message names the setting and its limit."""


def stratified_counts(class_sizes: np.ndarray, total: int) -> np.ndarray:
    """How many of `total` draws each class gets: proportional, largest remainder first.

    A class never gets more than it holds: only classes whose exact share has a fractional part
    get rounded up, and their share is then below their size.
    """
    sizes = np.asarray(class_sizes, dtype=np.int64)
    available = int(sizes.sum())
    if not 0 <= total <= available:
        raise DataSplitError(f"cannot draw {total} samples from a pool of {available}")
    if total == 0:
        return np.zeros_like(sizes)
    exact = sizes * (total / available)
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def stratified_sample(
    labels: np.ndarray, candidates: np.ndarray, total: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw `total` of the `candidates` (indices into `labels`) without replacement, stratified
    by label; returns sorted indices."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if not 0 <= total <= len(candidates):
        raise DataSplitError(f"cannot draw {total} samples from a pool of {len(candidates)}")
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    _, inverse = np.unique(labels[candidates], return_inverse=True)
    counts = stratified_counts(np.bincount(inverse), total)
    # One draw per class (not per sample), so this loop is short.
    chosen = [
        rng.choice(candidates[inverse == k], size=int(c), replace=False)
        for k, c in enumerate(counts)
        if c
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def holdout_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified (train, test) index split with round(test_fraction * N) tests."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataSplitError(f"test_fraction={test_fraction}: expected a value in [0, 1)")
    n = len(labels)
    n_test = int(np.floor(test_fraction * n + 0.5))
    if n_test >= n:
        raise DataSplitError(
            f"test_fraction={test_fraction} leaves none of the {n} images for training; lower it"
        )
    rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
    test = stratified_sample(labels, np.arange(n), n_test, rng)
    train = np.setdiff1d(np.arange(n), test, assume_unique=True)
    return train, test
