"""What crosses the wall between the clients' updates and the attacker.

An `Observation` holds only what an honest-but-curious server legitimately sees; the
attacker's own resources are in `AttackerKnowledge`. Ground truth lives in
`fedleak.server.auditor` and never reaches this package.
"""

from __future__ import annotations

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
    view), which adaptive losses need: the mean of several signs is not a sign.
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


AttackStatus = Literal["ok", "failed", "nan", "timeout"]


@dataclass(frozen=True)
class Reconstruction:
    """An attack's guess of the private batch. `inputs` is on the CPU, in the data range."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    label_method: str = "none"
    iterations: int = 0
    seconds: float = 0.0
    status: AttackStatus = "ok"
    message: str = ""
    diagnostics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Attack(Protocol):
    """A gradient-inversion attack. Implementations may keep state across rounds."""

    name: str

    def reconstruct(
        self, observation: Observation, knowledge: AttackerKnowledge, budget: Budget
    ) -> Reconstruction: ...
