"""Central (server-side) DP through Flower's `DifferentialPrivacyServerSideFixedClipping`.

Flower's wrapper clips "reply minus the weights that were sent", but fedleak's clients reply
with a gradient g (FedSGD) or a weight delta Δ (FedAvg). So each reply is rewritten as the
weights the client proposes, w_t − η·g or w_t + Δ, before the wrapper clips, averages and adds
noise, and the released aggregate is turned back into an update afterwards. C thus bounds each
client's proposed change of the model: ‖Δ‖ in FedAvg, η·‖g‖ in FedSGD.

`CuriousStrategy` calls this after its attacks took every raw reply: central DP protects whole
clients in the released model, not the clients from the server.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from fedleak.attacks.types import UpdateKind
from fedleak.config import RunConfig
from fedleak.server.privacy import central_epsilon
from fedleak.server.selection import federation_size
from fedleak.server.step import unit_step

ARRAYS = "arrays"


class CentralNoiseOverflow(RuntimeError):
    """Central DP's noise made the global model non-finite: every later round would train and
    attack a model of NaN, so the run stops."""


@contextlib.contextmanager
def seeded_global_numpy(seed: int, server_round: int) -> Iterator[None]:
    """Flower draws the wrapper's noise from NumPy's global generator (`np.random.normal`):
    seed it from the run's seed and the round, and hand the caller's state back afterwards."""
    saved = np.random.get_state()
    # SeedSequence takes seeds of any size; np.random.seed only 32-bit ones.
    generator = np.random.MT19937(np.random.SeedSequence([seed, server_round, 0xCE7]))
    np.random.set_state(np.random.RandomState(generator).get_state())
    try:
        yield
    finally:
        np.random.set_state(saved)


class CentralDP(Strategy):
    """Flower's server-side fixed-clipping wrapper around `inner`, for replies that are updates.

    `releases[m]` counts the aggregates released with m sampled clients, for the client-level
    ε of `epsilon()`; `population` is the federation's size (the smallest seen, to stay safe).
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        clip: float,
        noise: float,
        update_kind: UpdateKind,
        learning_rate: float,
        seed: int,
        defense: str = "none",
        delta: float,
        prior_releases: Mapping[int, int] | int = 0,
    ) -> None:
        # m is known only once `inner` has sampled; configure_train sets it every round.
        self.dp = DifferentialPrivacyServerSideFixedClipping(inner, noise, clip, 1)
        self.noise = noise
        # The reply u becomes weights w_t + scale * u, the weight change it asks for (the
        # update's `defense` spec says whether it holds signs).
        self.scale = unit_step(update_kind, learning_rate, defense)
        self.seed = seed
        self.delta = delta
        self.population = 0
        # Releases before a resume: by m as the checkpoint recorded them, or (a checkpoint
        # written before it recorded them) a count of rounds, taken at the first round's m.
        exact = not isinstance(prior_releases, int)
        self.releases: Counter[int] = Counter(prior_releases if exact else {})
        self.prior_releases = 0 if exact else prior_releases
        self._sent: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(
        cls, inner: Strategy, config: RunConfig, prior_releases: Mapping[int, int] | int
    ) -> CentralDP:
        """The wrapper `config.defense` asks for; `prior_releases`: the releases before a
        resume (see `__init__`)."""
        train = config.train
        return cls(
            inner,
            clip=config.defense.central_clip,
            noise=config.defense.central_noise,
            update_kind="gradient" if train.mode == "fedsgd" else "delta",
            learning_rate=train.lr,
            seed=config.seed,
            defense=config.defense.spec,
            delta=config.defense.dp_delta,
            prior_releases=prior_releases,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keep w_t in float64 (so w_t + Δ − w_t gives Δ back), let `inner` sample, note m."""
        self._sent = {k: np.asarray(v, dtype=np.float64) for k, v in _arrays(arrays).items()}
        nodes = federation_size(grid)
        self.population = min(self.population or nodes, nodes)
        messages = list(self.dp.configure_train(server_round, arrays, config, grid))
        if messages:
            self.dp.num_sampled_clients = len(messages)
            # Rounds released before a resume are counted with this round's m.
            self.releases[len(messages)] += self.prior_releases
            self.prior_releases = 0
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Rewrite updates as weights, clip + mean + seeded noise by Flower, back to an update.

        A round with a failed reply is not released (Flower's wrapper refuses it): (None, None).
        An all-zero update (Flower's clipping would divide by its norm) adds nothing to the
        clipped sum: it is left out and the others' mean, noised for their count k, is scaled
        by k/m, which gives the same mean and the same noise std z·C/m as with it.
        """
        replies = list(replies)
        valid = [msg for msg in replies if not msg.has_error()]
        dtypes = {k: v.dtype for k, v in _arrays(valid[0].content[ARRAYS]).items()} if valid else {}
        sampled = self.dp.num_sampled_clients
        complete = bool(valid) and len(valid) == len(replies)
        nonzero = [msg for msg in valid if not _all_zero(msg.content[ARRAYS])]
        kept = nonzero if complete and nonzero else replies
        for msg in kept:
            if not msg.has_error():
                msg.content[ARRAYS] = self.as_weights(msg.content[ARRAYS])
        with seeded_global_numpy(self.seed, server_round):
            if complete and not nonzero:
                aggregate, metrics = self._noise_only(server_round, kept, sampled)
            else:
                self.dp.num_sampled_clients = len(kept)
                try:
                    aggregate, metrics = self.dp.aggregate_train(server_round, kept)
                finally:
                    self.dp.num_sampled_clients = sampled
        if aggregate is None:
            return None, metrics
        self.releases[sampled] += 1
        share = len(kept) / sampled if complete and nonzero else 1.0
        weights = _arrays(aggregate)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
            update = {
                k: ((weights[k] - self._sent[k]) / self.scale * share).astype(dtype)
                for k, dtype in dtypes.items()
            }
        if not all(np.isfinite(v).all() for v in update.values()):
            std = compute_stdv(self.noise, self.dp.clipping_norm, sampled)
            raise CentralNoiseOverflow(
                f"defense.central-noise={self.noise:g} with defense.central-clip="
                f"{self.dp.clipping_norm:g}: round {server_round}'s noised aggregate is not "
                f"finite in the model's precision (noise std {std:.3g}); expected a smaller "
                "noise multiplier or clipping norm"
            )
        return ArrayRecord({k: Array(v) for k, v in update.items()}), metrics

    def _noise_only(
        self, server_round: int, replies: list[Message], sampled: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Every update is zero: nothing to clip; the mean (w_t) plus Flower's noise."""
        aggregate, metrics = self.dp.strategy.aggregate_train(server_round, replies)
        if aggregate is None:
            return None, metrics
        arrays = aggregate.to_numpy_ndarrays()
        std = compute_stdv(self.noise, self.dp.clipping_norm, sampled)
        add_gaussian_noise_inplace(arrays, std)
        return ArrayRecord(dict(zip(aggregate.keys(), map(Array, arrays), strict=True))), metrics

    def as_weights(self, update: ArrayRecord) -> ArrayRecord:
        """w_t + scale·u for every array that was sent (w_t alone where the reply has none,
        such as BatchNorm buffers), in the order sent: the wrapper pairs arrays by position."""
        given = _arrays(update)
        return ArrayRecord(
            {
                k: Array(w + self.scale * given[k] if k in given else w.copy())
                for k, w in self._sent.items()
            }
        )

    def epsilon(self) -> float:
        """Client-level ε at `delta` of the aggregates released so far."""
        return central_epsilon(self.noise, self.population, self.releases, self.delta)

    # -- delegated hooks --------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation is the wrapped strategy's business."""
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Federated evaluation is the wrapped strategy's business."""
        return self.dp.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Flower's wrapper logs C and z, then the wrapped strategy."""
        self.dp.summary()


def _all_zero(record: ArrayRecord) -> bool:
    return not any(np.any(a) for a in record.to_numpy_ndarrays())


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True))
