"""Privacy accounting: example-level ε of client-side DP-SGD (`PrivacyLedger`), and
client-level ε of central DP on the server (`central_epsilon`).

The guarantee is example-level and local to each client: two partitions that differ by one
example (add or remove) must give nearly the same distribution of everything that client sends
the server, over all the rounds it took part in. The server is the adversary, so nothing is
credited to aggregation, to secure aggregation or to the sampling of clients; a round a client
sat out costs it nothing (client selection does not look at the data).

One round of client c, holding n_c examples, drawing E of them (`train.examples`; the batch
size B in FedSGD) and taking K local steps of B examples (K = 1 in FedSGD), is accounted as one
sampled Gaussian release: the S = min(E, K * B) examples its steps use, drawn at rate
q = S / n_c, each entering m = ceil(K * B / E) noisy steps (FedAvg cycles through the E drawn
examples when K * B > E); m Gaussian releases of one example compose to one with multiplier
Z / sqrt(m), and under the per-sample threat model (FedSGD only) each clipped gradient is also
released on its own with noise Z * C, which doubles m.

By default (`defense.dp-sampling = "fixed"`) the sampler draws a fixed number of examples
without replacement (`fedleak.data.sample_batch`), not a Poisson sample, so an added example
does not join the batch: it takes the place of one already drawn, moving the clipped sum by up
to 2C rather than C. Adjacency stays add/remove, and that case is exactly a Poisson-sampled
Gaussian of sensitivity 2C (an upper bound by joint convexity over which example it replaces,
and attained when all other gradients are equal and opposite to the added one): the accounted
multiplier is halved (`FIXED_SIZE_SENSITIVITY`). The same coupling is why FedAvg's K steps
are one release per round rather than K at rate B / n_c: the K slices of one draw are not
independent samples.

With `defense.dp-sampling = "poisson"` each of the client's examples joins a batch on its own
with probability q = B / n_c (`fedleak.data.poisson_batch`): FedSGD's one batch, or a fresh
batch for each of FedAvg's K steps drawn from the whole partition. The clipped sum is divided
by B whatever the batch's size, and the client declares B per step: an added example joins a
batch or not, moves its sum by at most C, and each step is exactly the Poisson-sampled
Gaussian the accountant analyses, at multiplier Z, K of them per round (Abadi et al.'s
DP-SGD as Opacus runs it).

The accountant is Flower's `RdpAccountant` (the `flwr[dp]` extra, backed by Google's
`dp-accounting`): it ships with the framework this app is pinned to, and its Poisson path is
the standard Rényi-DP analysis of the sampled Gaussian mechanism (Mironov et al. 2019).
Its without-replacement path is defined under replace-one adjacency and scores the Gaussian
mechanism as if replacing an example moved the clipped sum by C, so it is not used.

ε is NaN ("not DP") when the defense has no DP-SGD step (`gauss:SIGMA` alone adds noise to an
unclipped gradient: no sensitivity bound, no guarantee), and when DP-SGD runs on the output of
an intra-client input encoding (MixUp, intra InstaHide): clipping then bounds each *encoded*
sample, but one private image is mixed into several encoded samples, so the accounted ε is not
a per-image guarantee. Inter InstaHide mixes each private image with public ones only and
keeps the guarantee (for the private images; the public pool is not protected). DP-SGD with
Z = 0 clips without noise: ε is infinite.

Central DP (`defense.central-clip`, `defense.central-noise`) is a different guarantee: the
server clips each client's whole update to C and adds N(0, (z·C/m)²) to the mean of the m
sampled clients. The mean's denominator m, and so the noise's scale on the released model,
follows from the federation's size N, which a released model therefore reveals (federations
of 3 and 4 clients, every client sampled, give noise of std z·C/3 and z·C/4: told apart at
any ε). So N is public and neighbouring federations have the same N and differ in one
client's data: replacing it moves the clipped sum by up to 2C, against noise z·C on the sum,
a Gaussian release of multiplier z / 2 (`REPLACED_CLIENT_SENSITIVITY`). Each released
aggregate is accounted as one such release sampled at rate m / N, with the Poisson analysis
at the halved multiplier (the coupling above; with every client sampled, m = N, there is no
sampling). It protects whole clients in the *released model* only: the curious server saw
every raw update before clipping, so it says nothing about leakage to the server.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)

from fedleak.config import RunConfig
from fedleak.data import FederatedData
from fedleak.defenses import (
    DPSGD,
    DefensePipeline,
    GaussianNoise,
    InstaHide,
    MixUp,
    parse_defense_spec,
)
from fedleak.settings import format_number

# How far one example added to the data moves a sum clipped to C, in units of C, when the
# sample drawn from the data has a fixed size: the added example takes a drawn one's place.
FIXED_SIZE_SENSITIVITY = 2.0
# How far replacing one client's data moves central DP's clipped sum, in units of C.
REPLACED_CLIENT_SENSITIVITY = 2.0


@dataclass(frozen=True)
class PrivacyLedger:
    """The DP-SGD accounting of one run: what a round costs each client, and ε after rounds.

    Each round of a client is `draws` sampled Gaussian releases, each drawing `sample_size` of
    the client's `partition_sizes[c]` examples (a fixed number, or that many on average under
    Poisson sampling), in which a drawn example is released `releases` times with multiplier
    `noise_multiplier`; one added example moves the clipped sum by `sensitivity` x C (see the
    module docstring).
    `not_dp` says why ε is NaN, and is empty when the accounting applies.
    """

    delta: float
    noise_multiplier: float
    sample_size: int
    releases: int
    partition_sizes: tuple[int, ...]
    not_dp: str = ""
    sensitivity: float = FIXED_SIZE_SENSITIVITY
    draws: int = 1
    clipped: bool = False  # the defense has a dpsgd step, whether or not ε applies

    @classmethod
    def from_config(cls, config: RunConfig, fd: FederatedData) -> PrivacyLedger:
        """The ledger of `config`, with n_c from `fd` (built with the run's number of clients)."""
        return cls.from_settings(config, [len(p) for p in fd.partitions])

    @classmethod
    def from_settings(cls, config: RunConfig, partition_sizes: Sequence[int]) -> PrivacyLedger:
        """The ledger of `config` for clients holding `partition_sizes` examples."""
        pipeline = parse_defense_spec(config.defense.spec)
        train = config.train
        dp = pipeline.find(DPSGD)
        reason = _not_dp(pipeline)
        drawn, used = train.examples_per_round, train.local_steps * train.batch_size
        per_sample = 2 if config.threat.share == "per-sample" else 1
        sample, reuse = min(drawn, used), -(-used // drawn)
        draws = 1
        poisson = config.defense.dp_sampling == "poisson"
        if poisson:  # every step its own Poisson batch of B on average, released once
            sample, reuse = train.batch_size, 1
            draws = train.local_steps if train.mode == "fedavg" else 1
        return cls(
            delta=config.defense.dp_delta,
            noise_multiplier=dp.noise_multiplier if dp else 0.0,
            sample_size=sample,
            releases=reuse * per_sample,
            partition_sizes=tuple(int(n) for n in partition_sizes),
            not_dp=reason,
            sensitivity=1.0 if poisson else FIXED_SIZE_SENSITIVITY,
            draws=draws,
            clipped=dp is not None,
        )

    @property
    def warning(self) -> str | None:
        """Why a DP-SGD run reports no ε (None when it reports one, or has no DP-SGD): its
        utility.csv and report show ε as blank, as for a run without DP."""
        if self.clipped and self.not_dp:
            return f"defense.spec: DP-SGD runs, but no ε is reported: {self.not_dp}"
        return None

    @property
    def applies(self) -> bool:
        """Whether the run is DP-SGD with a meaningful per-example ε."""
        return not self.not_dp

    @property
    def effective_noise_multiplier(self) -> float:
        """The multiplier a round is accounted with: its releases composed into one
        (Z / sqrt(releases)), halved for the fixed-size sampler's replacement (not for a
        Poisson sample, which an added example joins instead)."""
        return self.noise_multiplier / (self.sensitivity * math.sqrt(self.releases))

    def sampling_rate(self, client: int) -> float:
        """The sampling rate of one draw for client `client`."""
        return self.sample_size / self._size(client)

    def client_epsilon(self, client: int, rounds: int) -> float:
        """ε at `delta` after client `client` took part in `rounds` rounds."""
        size = self._size(client, rounds)
        if not self.applies:
            return math.nan
        if rounds == 0:
            return 0.0
        if self.noise_multiplier == 0.0:
            return math.inf
        events = ((self.sample_size, rounds * self.draws, self.effective_noise_multiplier),)
        return _epsilon(size, events, self.delta)

    def epsilons(self, participation: Mapping[int, int]) -> dict[int, float]:
        """ε per client, from how many rounds each client (partition id) has taken part in."""
        return {c: self.client_epsilon(c, rounds) for c, rounds in sorted(participation.items())}

    def epsilon(self, participation: Mapping[int, int]) -> float:
        """The worst case over clients: the ε a run reports (NaN when not DP, 0 before any
        round)."""
        if not self.applies:
            return math.nan
        # ε grows with rounds and with the sampling rate, so only clients that no other
        # client beats on both (more rounds, smaller partition) can be the worst: one
        # accountant call per such client instead of one per client.
        worst: dict[int, int] = {}
        for client, rounds in participation.items():
            size = self._size(client, rounds)
            if rounds not in worst or size < self.partition_sizes[worst[rounds]]:
                worst[rounds] = client
        candidates, smallest = [], math.inf
        for rounds in sorted(worst, reverse=True):
            client = worst[rounds]
            if self.partition_sizes[client] < smallest:
                candidates.append(self.client_epsilon(client, rounds))
                smallest = self.partition_sizes[client]
        return max(candidates, default=0.0)

    def _size(self, client: int, rounds: int = 0) -> int:
        if rounds < 0:
            raise ValueError(f"rounds={rounds}: expected an integer >= 0")
        if not 0 <= client < len(self.partition_sizes):
            raise ValueError(
                f"client={client}: expected a partition id in 0..{len(self.partition_sizes) - 1}"
            )
        size = self.partition_sizes[client]
        if size < self.sample_size:
            raise ValueError(
                f"partition {client} holds {size} examples: expected at least "
                f"{self.sample_size} (the examples one accounted release draws)"
            )
        return size


def _not_dp(pipeline: DefensePipeline) -> str:
    """Why a defense gets no per-example ε ('' where it does)."""
    encoder = pipeline.encoder
    if pipeline.find(DPSGD) is None:
        return "no dpsgd step in the defense (noise without clipping has no DP guarantee)"
    if isinstance(encoder, MixUp) or (isinstance(encoder, InstaHide) and not encoder.inter):
        return (
            f"dpsgd clips encoded samples, and {encoder.spec} mixes each private image into "
            "several of them: the accounted ε would not bound one image's influence"
        )
    return ""


def uncounted_noise(config: RunConfig) -> str | None:
    """A warning where `gauss` noise follows `dpsgd`: ε is accounted at dpsgd's Z alone, so
    it bounds the release from above, and `dpsgd:C:0+gauss:S` reads as inf though noised
    (audit EF2). Counting it would need the noise per step and per release of each mode."""
    pipeline = parse_defense_spec(config.defense.spec)
    dp, gauss = pipeline.find(DPSGD), pipeline.find(GaussianNoise)
    # Without an ε at all, the ledger's warning says why (audit EH6: the two contradicted).
    if dp is None or gauss is None or gauss.sigma == 0 or _not_dp(pipeline):
        return None
    alone = "inf, as for clipping without noise" if dp.noise_multiplier == 0 else "an upper bound"
    return (
        f"defense.spec={config.defense.spec!r}: the {gauss.spec} noise is not counted in ε, "
        f"which is accounted at dpsgd's Z={format_number(dp.noise_multiplier)} alone ({alone}); "
        "to have noise counted, give it as dpsgd's Z"
    )


def central_epsilon(
    noise_multiplier: float, population: int, releases: Mapping[int, int], delta: float
) -> float:
    """Client-level ε at `delta` of central DP after `releases[m]` aggregates of m sampled
    clients each, out of `population` (0 before any release; infinite without noise): one
    client's data replaced in a federation of public size (module docstring)."""
    if not any(count > 0 for count in releases.values()):
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    noise = noise_multiplier / REPLACED_CLIENT_SENSITIVITY
    events = tuple(sorted((m, count, noise) for m, count in releases.items() if count > 0))
    return _epsilon(population, events, delta)


@functools.lru_cache(maxsize=4096)
def _epsilon(population: int, events: tuple[tuple[int, int, float], ...], delta: float) -> float:
    """ε of Poisson-sampled Gaussian releases via Flower: `count` of them at rate
    `sample / population` with multiplier `noise` for each (sample, count, noise) of `events`.

    Cached: clients with equal partition sizes share it, and each call costs ~0.1 s.
    """
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON,
        )
    )
    # At small multipliers dp-accounting logs each Rényi order whose series did not converge;
    # it drops those orders, so ε stays a valid bound, and the lines would drown the run log.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        for sample, count, noise in events:
            event = GaussianPrivacyEvent(noise, sample, population)
            accountant.compose(event, count=count)
        return accountant.get_epsilon(delta)
    finally:
        absl.setLevel(level)
