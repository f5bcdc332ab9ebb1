"""DP-SGD accounting: ε per client and per run, checked against references computed apart.

Clipping and the noise scale of DP-SGD itself are tested in test_defenses.py and
test_gradients.py; this file tests what the ledger adds on top.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from fedleak.config import parse_flat
from fedleak.data import poisson_rows
from fedleak.runtime import federated_data
from fedleak.server.privacy import PrivacyLedger
from fedleak.simulations.cli import main
from fedleak.simulations.presets import load_preset

DELTA = 1e-5


def _ledger(sizes: list[int], **settings: object) -> PrivacyLedger:
    flat = {"defense.spec": "dpsgd:1:1.1", "train.batch-size": 10, **settings}
    return PrivacyLedger.from_settings(parse_flat(flat), sizes)


def _reference(rate: float, noise: float, rounds: int, releases: int = 1) -> float:
    """The same model written directly in dp-accounting's own event language: the sampler
    draws a fixed number of examples, so an added one replaces a drawn one (sensitivity 2C,
    the multiplier halved)."""
    accountant = RdpAccountant()
    inner = SelfComposedDpEvent(GaussianDpEvent(noise / 2), releases)
    accountant.compose(PoissonSampledDpEvent(rate, inner), rounds)
    return accountant.get_epsilon(DELTA)


def test_fedsgd_epsilon_equals_the_accountants_reference() -> None:
    ledger = _ledger([500, 400, 1000])
    participation = {0: 30, 1: 30, 2: 12}
    sizes = [500, 400, 1000]
    expected = {c: _reference(10 / n, 1.1, participation[c]) for c, n in enumerate(sizes)}
    epsilons = ledger.epsilons(participation)
    for client, value in expected.items():
        assert epsilons[client] == pytest.approx(value, rel=1e-9)
    # The run reports the worst client: here the smallest partition, at the most rounds.
    assert ledger.epsilon(participation) == max(expected.values()) == epsilons[1]
    assert ledger.sampling_rate(1) == pytest.approx(0.025)
    # The worst case is found without asking the accountant about every client.
    uneven = _ledger([300, 200, 500, 200, 250, 120])
    pattern = {0: 5, 1: 3, 2: 7, 3: 2, 4: 6, 5: 0}
    assert uneven.epsilon(pattern) == max(uneven.epsilons(pattern).values())
    assert 2.0 < epsilons[1] < 12.0  # sanity: a finite budget, not 0 and not inf


def test_fedavg_steps_are_counted_and_reused_examples_are_not_fresh_draws() -> None:
    # One pass over the drawn examples: the 3 steps' 30 examples are one draw of 30, not 3
    # independent draws of 10 (the slices of one draw are not independent samples).
    one_pass = _ledger(
        [400], **{"train.mode": "fedavg", "train.local-steps": 3, "train.examples": 30}
    )
    assert (one_pass.sample_size, one_pass.releases) == (30, 1)
    assert one_pass.client_epsilon(0, 20) == pytest.approx(_reference(30 / 400, 1.1, 20))
    # 4 steps of 5 cycling through 10 drawn examples: each is used in 2 steps of one draw.
    cycled = _ledger(
        [400],
        **{
            "train.mode": "fedavg",
            "train.batch-size": 5,
            "train.local-steps": 4,
            "train.examples": 10,
        },
    )
    assert (cycled.sample_size, cycled.releases) == (10, 2)
    assert cycled.client_epsilon(0, 20) == pytest.approx(_reference(10 / 400, 1.1, 20, 2))
    # With examples = 0 the same batch serves all 3 local steps: worse than 3 fresh batches.
    same_batch = _ledger([400], **{"train.mode": "fedavg", "train.local-steps": 3})
    assert (same_batch.sample_size, same_batch.releases) == (10, 3)
    assert same_batch.client_epsilon(0, 20) > one_pass.client_epsilon(0, 20)
    # The per-sample threat model releases each clipped gradient a second time.
    per_sample = _ledger([400], **{"threat.share": "per-sample"})
    assert per_sample.releases == 2
    assert per_sample.client_epsilon(0, 20) == pytest.approx(_reference(10 / 400, 1.1, 20, 2))


def test_full_participation_matches_the_gaussian_mechanism_in_closed_form() -> None:
    # q = 1 (the client's whole partition every round): T rounds are one Gaussian mechanism
    # of sensitivity 2C (an added example replaces one of the fixed-size batch), i.e.
    # multiplier z' = z / 2 over sqrt(T), whose RDP is alpha * T / (2 z'^2).
    rounds, z = 10, 4.0
    ledger = _ledger([16], **{"train.batch-size": 16, "defense.spec": f"dpsgd:0.5:{2 * z}"})
    epsilon = ledger.client_epsilon(0, rounds)
    # RDP -> (ε, δ) conversion of Balle et al. 2020 (Prop. 12), minimised over a fine grid.
    alphas = np.linspace(1.02, 200, 400_000)
    rdp = alphas * rounds / (2 * z**2)
    optimum = np.min(rdp + np.log1p(-1 / alphas) - np.log(DELTA * alphas) / (alphas - 1))
    assert optimum <= epsilon <= optimum * 1.01
    # And RDP is an upper bound on the exact ε of that Gaussian (Balle & Wang 2018).
    mu = math.sqrt(rounds) / z

    def delta_of(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - DELTA

    exact = brentq(delta_of, 0.0, 50.0)
    assert exact < epsilon < 1.5 * exact


def _attained_epsilon(rate: float, noise: float, sensitivity: float = 2.0) -> float:
    """The exact ε at DELTA of one round on the worst pair of partitions for a fixed-size
    batch: every held example's clipped gradient is -C, the added one's +C (one coordinate),
    so the added example, drawn with probability `rate`, moves the noisy sum by 2C. Both
    orders of the pair, in closed form (the likelihood ratio is monotone). A Poisson batch
    adds the example beside the others: it moves the sum by C (`sensitivity` 1)."""
    shift = sensitivity / noise  # in units of the noise's standard deviation

    def delta(eps: float) -> float:
        # Q = (1 - q) N(0, 1) + q N(shift, 1) against P = N(0, 1), and P against Q.
        threshold = (math.exp(eps) - (1 - rate)) / rate
        x = (math.log(threshold) + shift**2 / 2) / shift
        forward = (1 - rate) * norm.sf(x) + rate * norm.sf(x - shift) - math.exp(eps) * norm.sf(x)
        backward = 0.0
        low = (math.exp(-eps) - (1 - rate)) / rate
        if low > 0:
            y = (math.log(low) + shift**2 / 2) / shift
            backward = norm.cdf(y) - math.exp(eps) * (
                (1 - rate) * norm.cdf(y) + rate * norm.cdf(y - shift)
            )
        return max(forward, backward) - DELTA

    return brentq(delta, 1e-6, 60.0)


@pytest.mark.parametrize(("batch", "size", "z"), [(8, 300, 0.5), (8, 300, 1.0), (32, 500, 1.1)])
def test_the_reported_epsilon_bounds_the_worst_case_the_sampler_attains(
    batch: int, size: int, z: float
) -> None:
    # With Poisson accounting at the full multiplier (the convention of most DP-SGD code) one
    # round of B = 8 of 300 at z = 1 reported 1.28, below the 4.54 this pair attains.
    ledger = _ledger([size], **{"train.batch-size": batch, "defense.spec": f"dpsgd:1:{z}"})
    attained = _attained_epsilon(batch / (size + 1), z)
    # RDP's conversion to (ε, δ) is loose by a few tenths at one round: not by a factor.
    assert attained <= ledger.client_epsilon(0, 1) <= 1.25 * attained


@pytest.mark.parametrize(("batch", "size", "z"), [(8, 300, 0.5), (8, 300, 1.0), (32, 500, 1.1)])
def test_poisson_sampling_is_accounted_at_the_full_multiplier_and_stays_a_bound(
    batch: int, size: int, z: float
) -> None:
    settings = {
        "train.batch-size": batch,
        "defense.spec": f"dpsgd:1:{z}",
        "defense.dp-sampling": "poisson",
    }
    poisson = _ledger([size], **settings)
    fixed = _ledger([size], **{**settings, "defense.dp-sampling": "fixed"})
    assert poisson.effective_noise_multiplier == z
    assert fixed.effective_noise_multiplier == z / 2
    # The same draw rate B / n, the sampled Gaussian at Z (dp-accounting's own events).
    accountant = RdpAccountant()
    accountant.compose(PoissonSampledDpEvent(batch / size, GaussianDpEvent(z)), 20)
    assert poisson.client_epsilon(0, 20) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)
    assert poisson.client_epsilon(0, 20) < fixed.client_epsilon(0, 20)
    # One round on the worst pair a Poisson batch allows: the reported ε bounds it, within
    # RDP's conversion to (ε, δ) (measured 0.9, 0.7 and 0.5 above it for these cases).
    attained = _attained_epsilon(batch / size, z, sensitivity=1.0)
    assert attained <= poisson.client_epsilon(0, 1) <= attained + 1.0


def test_poisson_fedavg_accounts_each_local_step_as_its_own_draw() -> None:
    settings = {
        "train.mode": "fedavg",
        "train.local-steps": 5,
        "train.batch-size": 8,
        "defense.spec": "dpsgd:1:1",
        "defense.dp-sampling": "poisson",
    }
    ledger = _ledger([300], **settings)
    accountant = RdpAccountant()
    accountant.compose(PoissonSampledDpEvent(8 / 300, GaussianDpEvent(1.0)), 5 * 10)
    assert ledger.client_epsilon(0, 10) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)
    # Five steps a round cost more than FedSGD's one batch, far less than five rounds of a
    # fixed draw of 40 (each example entering one step, at Z / 2).
    fedsgd = _ledger([300], **{**settings, "train.mode": "fedsgd", "train.local-steps": 1})
    fixed = _ledger([300], **{**settings, "defense.dp-sampling": "fixed", "train.examples": 40})
    assert fedsgd.client_epsilon(0, 10) < ledger.client_epsilon(0, 10)
    assert ledger.client_epsilon(0, 10) < fixed.client_epsilon(0, 10)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    ledger = _ledger([400])
    curve = [ledger.client_epsilon(0, rounds) for rounds in (0, 1, 2, 4, 8, 16)]
    assert curve[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(curve))
    noisier = _ledger([400], **{"defense.spec": "dpsgd:1:2"})
    assert noisier.client_epsilon(0, 16) < curve[-1]
    assert ledger.epsilon({}) == 0.0


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("none", "no dpsgd step"),
        ("gauss:0.1", "no dpsgd step"),
        ("prune:0.9+sign", "no dpsgd step"),
        ("mixup:2+dpsgd:1:1", "mixup:2 mixes each private image"),
        ("instahide:2+dpsgd:1:1", "instahide:2 mixes each private image"),
    ],
)
def test_runs_without_a_per_example_guarantee_report_nan(spec: str, reason: str) -> None:
    ledger = _ledger([400], **{"defense.spec": spec})
    assert not ledger.applies
    assert reason in ledger.not_dp
    assert math.isnan(ledger.epsilon({0: 5}))
    assert math.isnan(ledger.client_epsilon(0, 5))
    # A run with DP-SGD whose ε is blank says why (its report shows "–" as for no DP).
    if "dpsgd" in spec:
        assert ledger.warning == f"defense.spec: DP-SGD runs, but no ε is reported: {ledger.not_dp}"
    else:
        assert ledger.warning is None


def test_post_processing_keeps_the_guarantee_and_no_noise_has_none() -> None:
    plain = _ledger([400], **{"defense.spec": "dpsgd:1:1"}).client_epsilon(0, 5)
    # Extra noise, pruning and sign after DP-SGD are post-processing; inter InstaHide mixes
    # each private image with public ones only.
    for spec in ("gauss:0.5+dpsgd:1:1+prune:0.5+sign", "instahide:2:inter+dpsgd:1:1"):
        assert _ledger([400], **{"defense.spec": spec}).client_epsilon(0, 5) == plain
    assert _ledger([400], **{"defense.spec": "dpsgd:1:0"}).client_epsilon(0, 5) == math.inf
    assert _ledger([400], **{"defense.spec": "dpsgd:1:1"}).warning is None


def test_partition_sizes_come_from_the_federated_data() -> None:
    config = parse_flat({"defense.spec": "dpsgd:1:1", "train.batch-size": 4, "data.aux-size": 200})
    fd = federated_data(config, num_partitions=3)
    ledger = PrivacyLedger.from_config(config, fd)
    assert ledger.partition_sizes == tuple(len(p) for p in fd.partitions)
    assert ledger.delta == config.defense.dp_delta


def test_bad_queries_name_the_problem() -> None:
    ledger = _ledger([400, 8])
    with pytest.raises(ValueError, match=r"client=2: expected a partition id in 0..1"):
        ledger.client_epsilon(2, 1)
    with pytest.raises(ValueError, match=r"rounds=-1"):
        ledger.client_epsilon(0, -1)
    with pytest.raises(ValueError, match=r"partition 1 holds 8 examples"):
        ledger.epsilon({1: 1})


@pytest.mark.parametrize("mode", ["fedsgd", "fedavg"])
def test_a_poisson_run_scores_each_drawn_batch_and_reports_its_epsilon(
    mode: str, tmp_path: Path
) -> None:
    steps = 3 if mode == "fedavg" else 1
    settings: dict[str, object] = {
        "seed": 1,
        "num-server-rounds": 2,
        "threat.share": "batch",
        "train.mode": mode,
        "train.local-steps": steps,
        "train.batch-size": 1,
        "data.aux-size": 50,
        "defense.spec": "dpsgd:1:1",
        "defense.dp-sampling": "poisson",
        "attack.names": "aux-mean",
        "attack.clients-per-round": 0,
        "attack.rounds": "all",
        "attack.images-per-client": 0,
    }
    config = parse_flat(settings, load_preset("quickstart"))
    fd = federated_data(config, 4)
    drawn = {(r, c): len(poisson_rows(fd, c, r, 1, 1, steps)[0]) for r in (1, 2) for c in range(4)}
    if mode == "fedsgd":
        # Seed 1, B = 1: round 1 draws 2, 2, 0 and 0 examples, round 2 none at all.
        assert [drawn[1, c] for c in range(4)] == [2, 2, 0, 0]
        assert [drawn[2, c] for c in range(4)] == [0, 0, 0, 0]
    else:  # three steps of one on average: clients use fewer and more than the declared 3
        assert min(drawn.values()) < 3 < max(drawn.values())
    args = ["run", "quickstart", "--out", str(tmp_path / "run"), "--num-clients", "4"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    leakage = pd.read_parquet(tmp_path / "run" / "leakage.parquet")
    # Every drawn sample has one row: the attack reconstructed the declared B per step, and
    # the samples beyond those are unmatched (sample -1); a client that drew none has nothing
    # to score.
    rows = leakage.groupby(["round", "client_id"]).size().to_dict()
    assert rows == {key: n for key, n in drawn.items() if n}
    unmatched = leakage.groupby(["round", "client_id"])["sample"].agg(lambda s: int((s < 0).sum()))
    assert unmatched.to_dict() == {key: max(n - steps, 0) for key, n in drawn.items() if n}
    utility = pd.read_csv(tmp_path / "run" / "utility.csv")
    ledger = PrivacyLedger.from_config(config, fd)
    assert (ledger.effective_noise_multiplier, ledger.draws) == (1.0, steps)
    expected = [ledger.epsilon({c: r for c in range(4)}) for r in (0, 1, 2)]
    assert utility["epsilon"].tolist() == pytest.approx(expected)


def test_the_report_says_why_a_dpsgd_run_shows_no_epsilon(tmp_path: Path) -> None:
    """The reason was printed once at the run's start; the report showed a bare '–'."""
    args = ["run", "quickstart", "--out", str(tmp_path / "run"), "--num-clients", "2"]
    settings = {
        "num-server-rounds": 1,
        "defense.spec": "mixup:2+dpsgd:1:1",
        "attack.names": "aux-mean",
        "data.aux-size": 20,
    }
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    config = parse_flat(settings, load_preset("quickstart"))
    reason = PrivacyLedger.from_settings(config, [1]).not_dp
    assert "mixup:2 mixes each private image" in reason
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"No ε for mixup:2+dpsgd:1:1: {reason}." in report


def test_gauss_noise_after_dpsgd_is_said_not_to_count_in_epsilon() -> None:
    """`dpsgd:1:0+gauss:S` reported ε = inf (as clipping without noise) beside a noised
    release, without a word (audit EF2): a run now says that the noise is not counted."""
    from fedleak.server.privacy import uncounted_noise

    def warning(spec: str) -> str | None:
        return uncounted_noise(parse_flat({"defense.spec": spec}))

    assert warning("dpsgd:1:0+gauss:0.03") == (
        "defense.spec='dpsgd:1:0+gauss:0.03': the gauss:0.03 noise is not counted in ε, which "
        "is accounted at dpsgd's Z=0 alone (inf, as for clipping without noise); to have noise "
        "counted, give it as dpsgd's Z"
    )
    assert "(an upper bound)" in warning("prune:0.5+gauss:0.1+dpsgd:1:1")
    assert warning("dpsgd:1:1") is None
    assert warning("gauss:0.1") is None  # no ε at all: the ledger says why
    assert warning("dpsgd:1:1+gauss:0") is None
    # No ε at all under an encoding that mixes images: only the ledger's reason is said
    # (audit EH6: an "upper bound" followed a "no ε is reported").
    assert warning("mixup:2+dpsgd:1:1+gauss:0.1") is None
    assert warning("instahide:2:inter+dpsgd:1:1+gauss:0.1") is not None
