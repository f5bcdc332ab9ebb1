"""How one unit of a client's reply moves the global weights."""

from __future__ import annotations

from fedleak.attacks.types import UpdateKind
from fedleak.defenses import parse_defense_spec


def unit_step(update_kind: UpdateKind, learning_rate: float, defense: str) -> float:
    """The weight change per unit of a reply, before `train.server-lr`: an SGD step (−lr) for
    a gradient, the delta itself for FedAvg, and lr for a FedAvg delta released as signs, which
    carries no magnitude: taken as a weight change it would move every coordinate by 1 a round,
    so the server steps lr per coordinate, as it does for FedSGD's signs."""
    if update_kind == "gradient":
        return -learning_rate
    return learning_rate if parse_defense_spec(defense).releases_signs else 1.0
