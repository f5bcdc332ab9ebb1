"""Release noise drawn in hash space: the same features as noising every coordinate, in
distribution (means and spreads of every feature over many draws), and exactly without noise;
LTI takes that path only where it is exact."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ks_2samp

from fedleak.attacks.learned.binned_noise import BinnedNoise, gaussian_release_std
from fedleak.attacks.learned.pairs import Featuriser, PairSource, Unit, make_groups
from fedleak.defenses import parse_defense_spec
from fedleak.defenses.noise import add_gaussian
from fedleak.models import ModelSpec, build_model

# A block much larger than the bins (most of its norm outside the bins' span), one about their
# size and one smaller (every coordinate alone in its bin).
SIZES = {"large": 300, "middle": 40, "small": 7}
BINS = 16


def _clean(rows: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    one = {name: torch.randn(1, size, generator=gen) for name, size in SIZES.items()}
    one["large"] = one["large"] * 0.1  # |r|^2 about 3: the noise's 284 x 0.06^2 is a quarter
    one["small"] = one["small"] * 3.0
    return {name: t.expand(rows, -1).contiguous() for name, t in one.items()}


def _binned(featuriser: Featuriser, std: float) -> BinnedNoise:
    assert featuriser.hasher is not None
    sizes = featuriser.sizes
    return BinnedNoise(
        featuriser.hasher, sizes, featuriser.block_normalise, std, torch.device("cpu")
    )


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_without_noise_the_binned_features_are_the_featurisers(
    normalise: bool, signed: bool
) -> None:
    featuriser = Featuriser(SIZES, BINS, 3, signed, block_normalise=normalise)
    clean = _clean(4)
    binned = _binned(featuriser, 0.0)
    out = binned.features(binned.clean(clean), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, featuriser(clean), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalise", [True, False])
def test_noise_in_hash_space_has_the_distribution_of_noise_on_every_coordinate(
    normalise: bool,
) -> None:
    """Over 6,000 draws, every feature's mean and standard deviation agree with those of
    featurising the noisy update itself. The noise (0.06 per coordinate) makes a quarter of
    the large block's squared norm, most of it in the 284 dimensions outside the bins' span,
    so a wrong norm (e.g. the chi-square's degrees of freedom) moves the means."""
    draws, std = 6000, 0.06
    featuriser = Featuriser(SIZES, BINS, 3, True, block_normalise=normalise)
    clean = _clean(draws)
    exact = featuriser(add_gaussian(clean, std, torch.Generator().manual_seed(1)))
    binned = _binned(featuriser, std)
    fast = binned.features(binned.clean(clean), torch.Generator().manual_seed(2))
    error = (exact.var(dim=0) / draws + fast.var(dim=0) / draws).sqrt()
    assert ((fast.mean(dim=0) - exact.mean(dim=0)).abs() <= 4.5 * error).all()
    spread = fast.std(dim=0) / exact.std(dim=0)
    assert ((spread - 1).abs() <= 0.08).all(), spread  # the ratio's standard error is ~0.018
    # The noise matters: the features move well beyond the tolerances above.
    assert (exact.std(dim=0) > 10 * error).all()
    # The features' squared length, which the blocks' norms set: one distribution.
    assert ks_2samp(exact.square().sum(dim=1), fast.square().sum(dim=1)).pvalue > 1e-3


def test_the_release_std_is_known_only_when_every_release_step_is_gaussian() -> None:
    def std(spec: str, batch: int = 1) -> float | None:
        return gaussian_release_std(parse_defense_spec(spec), batch)

    assert std("none") == 0.0
    assert std("gauss:0.1") == pytest.approx(0.1)
    assert std("dpsgd:1:2", 4) == pytest.approx(0.5)  # Z C / B on a mean of B
    assert std("dpsgd:1:2+gauss:0.1", 4) == pytest.approx(math.sqrt(0.25 + 0.01))
    for spec in ("prune:0.9+gauss:0.1", "sign+gauss:0.1", "mixup:2+gauss:0.1"):
        assert std(spec) is None


def _source(defense: str, bins: int | None, parts: int = 1) -> PairSource:
    spec = ModelSpec("lenet", (1, 12, 12), 10, seed=0)
    model = build_model(spec)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 12, 12, generator=gen), torch.randint(0, 10, (24,), generator=gen)
    unit = Unit("gradient", 2 * parts, 2 * parts, 1, 0.1, contributors=parts)
    groups = make_groups(24, unit.size, gen, x.device)
    featuriser = Featuriser(sizes, bins, 0, True, block_normalise=True)
    return PairSource(
        model, parse_defense_spec(defense), unit, x, y, 10, groups, featuriser, 8, 1 << 30
    )


@pytest.mark.parametrize("parts", [1, 2])
def test_lti_draws_noise_in_hash_space_only_where_it_is_exact(parts: int) -> None:
    """Hashed and only Gaussian noise released: hash space, the clean groups kept across
    epochs, fresh noise each call, and without noise the same features as the plain path."""
    source = _source("gauss:0.05", 64, parts)
    assert source._binned is not None
    assert source._binned.std == pytest.approx(0.05 / math.sqrt(parts))
    first = source.features(torch.Generator().manual_seed(0))
    kept = source._clean
    second = source.features(torch.Generator().manual_seed(1))
    assert kept is not None and source._clean is kept
    assert first.shape == second.shape == (source.num_pairs, 64)
    assert not torch.equal(first, second)
    quiet = _source("gauss:0", 64, parts)  # a deterministic release: the plain cached path
    assert quiet._binned is None
    zero = BinnedNoise(
        source._binned.hasher, quiet.featuriser.sizes, True, 0.0, torch.device("cpu")
    )
    assert source._clean is not None
    torch.testing.assert_close(
        zero.features(source._clean, torch.Generator()),
        quiet.features(torch.Generator()),
        rtol=1e-4,
        atol=1e-5,
    )
    for defense, bins in (("prune:0.5+gauss:0.05", 64), ("gauss:0.05", None)):
        assert _source(defense, bins, parts)._binned is None
