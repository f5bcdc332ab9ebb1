"""The public description of a target model: enough for client, server or attacker to build it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """Architecture by registry name, shaped by the data set; `init` and `seed` fix the weights."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    init: str = "default"
    seed: int = 0
