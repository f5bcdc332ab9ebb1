"""What crosses the wall between the clients' updates and the attacker.

An `Observation` holds only what an honest-but-curious server legitimately sees; the
attacker's own resources are in `AttackerKnowledge`. Ground truth lives in
`fedleak.server.auditor` and never reaches this package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from fedleak.models.spec import ModelSpec

UpdateKind = Literal["gradient", "delta"]
Modality = Literal["image", "tokens"]


@dataclass(frozen=True)
class Observation:
    """One client's update in one round, exactly as the server received it.

    `update` maps parameter names (in `model.named_parameters()` order) to the shared tensor:
    the defended batch gradient in FedSGD, the weight delta w_after - w_t in FedAvg.
    `per_sample_updates` is set only when the threat model shares per-sample updates
    (leading dimension = batch size). `bn_statistics` is set only when the run shares BatchNorm
    batch statistics (keys `<module>.mean` / `<module>.var`). `contributors`: how many released
    updates `update` averages (1 for one client; the round's clients in the aggregate-only
    view), which adaptive losses need: the mean of several signs is not a sign. `model`'s seed
    is the attacker's, not the one that drew w_0: build the architecture from it, then load
    `weights`.
    """

    round: int
    client_id: int
    model: ModelSpec
    weights: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    update_kind: UpdateKind
    num_examples: int
    batch_size: int
    local_steps: int
    learning_rate: float
    defense: str
    per_sample_updates: dict[str, torch.Tensor] | None = None
    bn_statistics: dict[str, torch.Tensor] | None = None
    modality: Modality = "image"
    contributors: int = 1

    @property
    def num_targets(self) -> int:
        """How many private samples the update was computed from."""
        return self.num_examples


@dataclass(frozen=True)
class AttackerKnowledge:
    """The attacker's own resources: auxiliary data disjoint from every client, and priors."""

    aux_inputs: torch.Tensor
    aux_labels: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    data_range: tuple[float, float] = (0.0, 1.0)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0


@dataclass(frozen=True)
class Budget:
    """Limits every attack honours: whichever of iterations or seconds runs out first.

    `max_seconds` is per job: attacks that invert several observations as one batch may use
    the sum over its jobs. `max_batch` caps the problems (targets x restarts) optimised as
    one batch; 0 chooses from the device (free memory on CUDA).
    """

    max_iterations: int
    max_seconds: float
    show_progress: bool = False
    max_batch: int = 0


# One rule for every attack (applied by the server's runner): a finite reconstruction of the
# right shape is "ok" and scored, whatever budget it ran out of (that is `stopped_by` in the
# diagnostics); "nan" when it holds NaN or inf; "failed" when the attack raised or returned
# the wrong shape.
AttackStatus = Literal["ok", "failed", "nan"]

# An optimisation attack converged when its final matching loss is at most this fraction of
# the matching loss of its starting point: an order of magnitude (see `converged`).
CONVERGED_RATIO = 0.1


def converged(loss_start: float, loss_final: float) -> float:
    """1.0 when the final matching loss is at most `CONVERGED_RATIO` (1/10) times the starting
    one, 0.0 when it is not (a diverged, +inf, final loss included, from any start), NaN when
    the rule does not apply: no matching loss (NaN), or a finite final loss after a start that
    is not a positive finite number.

    A relative rule, because matching losses live on different scales (cosine distance in
    [0, 2], squared L2, hinges). Measured on MNIST-5k, sigmoid LeNet, B = 1 (final / start):
    IG 300 iterations 3e-5 to 2e-3 without defense, 1e-3 to 7e-3 under prune:0.9, 1e-5 under
    sign; IG stopped after 5 iterations 0.25 to 0.33; DLG 2e-4, or above 1 when it diverged;
    under gauss:0.1 0.6, gauss:1.0 and dpsgd:1:1 0.9 to 0.95. A row that did not converge did
    not fit the update: its poor reconstruction tells of a budget that ran out or of an update
    the attack could not match (noise sets a floor under the loss), not of an attack that
    matched the update and still found the wrong image. Sign hinges fall tenfold before the
    guess fits, so attacks matching one record no losses (`MatchingLoss.judges_fit`).
    """
    if math.isnan(loss_start) or math.isnan(loss_final):
        return math.nan
    if math.isinf(loss_final):  # diverged, whatever the start was (+inf too: never finite)
        return 0.0
    if not (math.isfinite(loss_start) and loss_start > 0):
        return math.nan
    return 1.0 if loss_final <= CONVERGED_RATIO * loss_start else 0.0


class RunStateError(Exception):
    """The state a run's attacks keep across rounds (saved inverters) cannot be written or
    used: the run stops, rather than recording every later call as a failed attack and still
    ending as done (audit FE1)."""


class StateNotSaved(OSError, RunStateError):
    """An attack could not write its saved state into the run folder (a full disk, a folder
    turned read-only): the run's environment failed, not the attack, so the run stops as when
    its records cannot be written, instead of recording every later call as a failed attack."""


@dataclass(frozen=True)
class Reconstruction:
    """An attack's guess of the private batch. `inputs` is on the CPU, in the data range.

    `loss_start` / `loss_final`: the matching loss [N] of each reconstructed sample at the
    optimisation's starting point and at its end (the problem it belongs to: all samples of a
    batch update share one); None for attacks without a matching loss. `diagnostics` holds the
    attack's own numbers, and `stopped_by` (iterations, seconds, epochs, ...) when it has one.
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None
    label_method: str = "none"
    iterations: int = 0
    seconds: float = 0.0
    status: AttackStatus = "ok"
    message: str = ""
    diagnostics: dict[str, float | str] = field(default_factory=dict)
    loss_start: torch.Tensor | None = None
    loss_final: torch.Tensor | None = None


@runtime_checkable
class Attack(Protocol):
    """A gradient-inversion attack. Implementations may keep state across rounds.

    A class attribute `reference: bool` (False unless set) marks a reference baseline that
    ignores the update (aux-mean): reports draw it as the floor and never rank it as an attack;
    read it with `is_reference`.
    """

    name: str

    def reconstruct(
        self, observation: Observation, knowledge: AttackerKnowledge, budget: Budget
    ) -> Reconstruction: ...


def is_reference(attack: object) -> bool:
    """Whether an attack is a reference baseline (its class sets `reference = True`)."""
    return bool(getattr(attack, "reference", False))
