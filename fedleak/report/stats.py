"""The report's statistics: medians with distribution-free intervals, means where they mean
something, success rates with exact binomial intervals, and the rule that defines success.

Leakage metrics are often bimodal (an attack either inverts a sample exactly, 80+ dB, or not at
all, ~5 dB), so a mean ± t-interval can be meaningless (41 ± 486 dB). The report therefore leads
with the median and its order-statistic interval: the sorted values x(1) <= ... <= x(n) give
P(x(k) <= median <= x(n-k+1)) = 1 - 2 P(Binomial(n, 1/2) <= k - 1) for any continuous
distribution, so k is the largest rank with that coverage >= 95%. It needs no resampling (so it
is deterministic) and needs n >= 6; below that the interval is the sample range, whose coverage
1 - 2^(1-n) is stated beside it. Samples are pooled over clients, rounds and seeds and treated
as independent draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95

# Success: a private sample counts as reconstructed recognisably when the attack's guess beats
# every floor on that sample (lower LPIPS, higher PSNR) and its LPIPS is at most
# SUCCESS_FRACTION of the label-free floor's (the mean auxiliary image, which uses nothing of
# the update) and at most SUCCESS_LPIPS (AlexNet).
# Calibrated by eye on 8 MNIST-5k digits (AlexNet LPIPS, per-sample updates, sigmoid LeNet and
# MLP): the aux-mean floor scored 0.44-0.52; digits a person reads correctly 0.05-0.34 (IG and
# LTI under sign compression, IG's binarised digits on the MLP); noise-like failures 0.54-0.64.
# LPIPS alone favours any sharp digit over the floor's blur: a random auxiliary digit of
# another class met the LPIPS bound for 57 of 100 MNIST-5k samples, 0 of 100 with the PSNR
# condition. On the embedded CIFAR-10 images (100 targets: 20 images x 5 crops and mirrors,
# floors from the other 19 and their mirrors, two draws) the mean auxiliary image sits at
# 0.66, so 0.7 of it alone counted 41% of 4x4-pixelated targets, 63-67% at 6x6 and 21-22% of
# another class's image matched to the target's colours; and a class mean of one or two
# auxiliary photos (LPIPS 0.26-0.6) made 0.7 of the best floor reject 17-18% of targets
# blurred at sigma 1 and 23-25% with noise of std 0.1. This rule, with both floors (aux-mean
# alone in brackets): pixelated 4x4 1% (1%), 6x6 26-27% (29-31%), 8x8 55-62%, the
# colour-matched other class 5% (7-8%), another class, blur sigma 3 and flat colours 0%;
# blur sigma 1 93-94% (95%), noise 0.1 85-91%, greyscale 85-88%, noise 0.05, JPEG quality 20
# and a 2-pixel shift 100%. Judged blind by eye (192 IG and DLG reconstructions of four
# small CIFAR-10 runs, two under sign compression), the rule agreed on 178 (46 recognised by
# both, 132 by neither), the earlier one on 176: every disagreement was IG's, at LPIPS
# 0.20-0.50, where AlexNet's LPIPS rates some smooth colour blobs (9 counted, e.g. 18.6 dB,
# 0.26) as close as noisy images that show the object (5 missed, e.g. 15.9 dB, 0.36).
SUCCESS_FRACTION = 0.7
# Calibrated for AlexNet only: VGG's LPIPS has no such level, and its fraction of the floor
# was never checked, so with VGG's alone success is left undecided.
SUCCESS_LPIPS = {"lpips_alex": 0.35}
LABEL_FREE_FLOOR = "aux-mean"
# Below this many values a median's interval is the values' range, of less than 95% coverage
# (at one value, a point): two such medians are not told apart by their intervals.
FEWEST_FOR_INTERVAL = 6


@dataclass(frozen=True)
class Median:
    """The median of n finite values and a two-sided interval of at least `coverage`."""

    value: float
    low: float
    high: float
    n: int
    coverage: float

    def overlaps(self, other: Median) -> bool:
        """Whether the two intervals share a point."""
        return not (self.high < other.low or other.high < self.low)

    def told_apart(self, other: Median) -> bool:
        """Whether both intervals reach 95% coverage and share no point: only then may one
        median be called larger (two single values differ in every run, audit EC5)."""
        fewest = min(self.n, other.n)
        return fewest >= FEWEST_FOR_INTERVAL and not self.overlaps(other)

    def text(self, digits: int) -> str:
        """`12.34 [11.02, 13.50]`, the value alone for n = 1, `–` without data."""
        if self.n == 0:
            return "–"
        if self.n == 1:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class Rate:
    """k successes of n trials with the Clopper–Pearson (exact) 95% interval."""

    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        """k / n (NaN for n = 0)."""
        return self.k / self.n if self.n else math.nan

    def overlaps(self, other: Rate) -> bool:
        """Whether the two intervals share a point."""
        return not (self.high < other.low or other.high < self.low)

    def told_apart(self, other: Rate) -> bool:
        """Whether the two exact intervals share no point (they keep 95% at any n)."""
        return min(self.n, other.n) > 0 and not self.overlaps(other)

    def percent(self) -> str:
        """`75%`; `<1%` and `>99%` where rounding would read as none or all (1/320 is not
        0%, audit DN2)."""
        share = 100 * self.k / self.n
        if self.k > 0 and round(share) == 0:
            return "<1%"
        if self.k < self.n and round(share) == 100:
            return ">99%"
        return f"{share:.0f}%"

    def text(self) -> str:
        """`75% (6/8) [35, 97]`, `–` without trials."""
        if self.n == 0:
            return "–"
        return f"{self.percent()} ({self.k}/{self.n}) [{100 * self.low:.0f}, {100 * self.high:.0f}]"


def finite(values: np.ndarray | pd.Series) -> np.ndarray:
    """The finite values as float64."""
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def order_rank(n: int, confidence: float = CONFIDENCE) -> tuple[int, float]:
    """(k, coverage): the 1-based rank k of the interval [x(k), x(n-k+1)] around the median
    with the highest coverage-respecting k, or k = 1 (the range) when n is too small."""
    best = 1
    for k in range(1, n // 2 + 1):
        if 1 - 2 * stats.binom.cdf(k - 1, n, 0.5) >= confidence:
            best = k
        else:
            break
    return best, float(1 - 2 * stats.binom.cdf(best - 1, n, 0.5))


def median_interval(values: np.ndarray | pd.Series) -> Median:
    """The median of the finite values with its order-statistic interval (module docstring)."""
    array = np.sort(finite(values))
    n = int(array.size)
    if n == 0:
        return Median(math.nan, math.nan, math.nan, 0, math.nan)
    median = float(np.median(array))
    if n == 1:
        return Median(median, median, median, 1, math.nan)
    k, coverage = order_rank(n)
    return Median(median, float(array[k - 1]), float(array[n - k]), n, coverage)


def mean_ci(values: np.ndarray | pd.Series) -> tuple[float, float, int]:
    """(mean, half-width of the 95% Student-t interval, n) of the finite values."""
    array = finite(values)
    n = int(array.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(array.mean())
    if n == 1:
        return mean, math.nan, 1
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * array.std(ddof=1) / math.sqrt(n))
    return mean, half, n


def passes_range(mean: float, half: float, low: float, high: float) -> bool:
    """Whether `mean ± half` reaches past the measure's range [low, high]."""
    return not math.isnan(half) and (mean - half < low or mean + half > high)


def format_ci(
    mean: float, half: float, digits: int, low: float = -math.inf, high: float = math.inf
) -> str:
    """`12.34 ± 0.56`; the mean alone when there is no interval; `–` without data.

    An interval that passes the measure's range (LPIPS below 0, an accuracy above 1: few
    seeds give t-intervals wider than the range) is cut to it, `0.081 [0.000, 0.322]`; the
    true mean lies in the range, so the cut interval keeps the interval's coverage."""
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    if passes_range(mean, half, low, high):
        cut_low, cut_high = max(low, mean - half), min(high, mean + half)
        return f"{mean:.{digits}f} [{cut_low:.{digits}f}, {cut_high:.{digits}f}]"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def success_rate(successes: np.ndarray | pd.Series) -> Rate:
    """Successes (booleans; NaN = not decidable, left out) as a rate with its exact interval."""
    array = np.asarray(successes, dtype=np.float64)
    array = array[np.isfinite(array)]
    n, k = int(array.size), int(array.sum())
    if n == 0:
        return Rate(0, 0, math.nan, math.nan)
    interval = stats.binomtest(k, n).proportion_ci(CONFIDENCE, method="exact")
    return Rate(k, n, float(interval.low), float(interval.high))


# A sample is named by its training, not its run: cells that differ only in `attack.names`
# share their samples, and the floor is scored once for all of them.
_SAMPLE = ["training", "round", "client_id", "target_index", "scored_against"]


def floor_values(
    leakage: pd.DataFrame,
    column: str,
    higher_is_better: bool = False,
    attacks: tuple[str, ...] | None = None,
) -> pd.Series:
    """Per row, the floor's `column` on the same private sample: the best value (lowest, or
    highest with `higher_is_better`) of the reference baselines that scored it (only those
    named in `attacks`, if given), else the median of those references in the same training.

    `leakage` holds scored rows with `training` and `reference` columns; NaN where the
    training has no such reference baseline.
    """
    references = leakage[leakage["reference"] & np.isfinite(leakage[column])]
    if attacks is not None:
        references = references[references["attack"].isin(attacks)]
    if references.empty:
        return pd.Series(np.nan, index=leakage.index)
    grouped = references.groupby(_SAMPLE)[column]
    per_sample = grouped.max() if higher_is_better else grouped.min()
    per_training = references.groupby("training")[column].median()
    keys = pd.MultiIndex.from_frame(leakage[_SAMPLE])
    exact = pd.Series(per_sample.reindex(keys).to_numpy(), index=leakage.index)
    fallback = leakage["training"].map(per_training)
    return exact.fillna(fallback)


def successes(leakage: pd.DataFrame, lpips: str) -> pd.Series:
    """Per row: 1.0 when the sample counts as reconstructed (the rule above SUCCESS_FRACTION),
    0.0 when not (and for every sample of a run that diverged, status "nan", or that no
    reconstruction was matched to, sample -1: nothing reconstructed it), NaN where LPIPS or the
    floor is missing, and everywhere for an LPIPS the rule was not calibrated on (VGG's)."""
    if lpips not in SUCCESS_LPIPS:
        return pd.Series(np.nan, index=leakage.index)
    best = floor_values(leakage, lpips)
    label_free = floor_values(leakage, lpips, attacks=(LABEL_FREE_FLOOR,))
    # A run without the label-free floor takes the fraction of its best floor.
    bound = SUCCESS_FRACTION * label_free.fillna(best)
    bound = bound.clip(upper=SUCCESS_LPIPS.get(lpips, np.inf))
    values = leakage[lpips]
    decided = np.isfinite(values) & np.isfinite(best)
    above = leakage["psnr"] > floor_values(leakage, "psnr", higher_is_better=True).fillna(-np.inf)
    hit = ((values <= bound) & (values < best) & above).astype(float)
    missed = (leakage["status"] == "nan") | unmatched(leakage)
    return hit.where(decided, np.nan).mask(missed & np.isfinite(best), 0.0)


def unmatched(leakage: pd.DataFrame) -> pd.Series:
    """Rows of private samples that no reconstruction was matched to (`sample` -1): the
    round's batch held more than the attack reconstructed (a Poisson batch)."""
    return (leakage["status"] == "ok") & (leakage["sample"] < 0) & (leakage["target_index"] >= 0)
