"""What one attack call leaves as it found: the observations it reads and the process's global
random generators it may draw from.

The inline runner hands an attack the strategy's own tensors (the global weights among them)
and every attack of a round the same observation of a client, so an attack that wrote into
one changed the global model, or the next attack's input, without a word (audit EX1). And a
plug-in that draws from torch's global generator (`torch.rand`, an `nn.Module`'s
initialisation) gave other rows on every run of one seed (audit EX2).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from fedleak.attacks.types import AttackerKnowledge, Observation
from fedleak.seeds import mix_seed

# The observation's fields that hold tensors, each a name -> tensor mapping (or None).
_TENSOR_FIELDS = ("weights", "update", "per_sample_updates", "bn_statistics")


class ObservationChanged(RuntimeError):
    """An attack wrote into what it was given to read (an observation, or the attacker's
    auxiliary data): the run stops, since the global model or a later attack's input may be
    what it changed."""


def call_seed(attacker_seed: int, attack: str, observations: Sequence[Observation]) -> int:
    """The seed of the global generators for one call of `attack`: the attacker's stream, the
    attack's name, and the round and client of each observation, so a call's draws depend on
    what it attacks, never on what ran before it in the process."""
    parts = [attacker_seed, zlib.crc32(attack.encode())]
    for observation in observations:
        parts += [observation.round, observation.client_id]
    return mix_seed(*parts)


@contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """torch's, numpy's and Python's global generators seeded with `seed` inside, and put back
    as they were after."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class ReadOnly:
    """What attack calls read and must not write: observations (the inline runner's hold the
    strategy's global weights, and a round's attacks share one per client) and the attacker's
    knowledge (every call's auxiliary data). Each tensor is remembered by the object it is
    and a checksum of its dtype, shape and bytes."""

    def __init__(self, observations: Sequence[Observation], knowledge: AttackerKnowledge) -> None:
        self.observations = list(observations)
        self.knowledge = knowledge
        self.before = self._fingerprint()

    def check(self, attack: str) -> None:
        """Raise `ObservationChanged` naming the first tensor written, added or removed."""
        after = self._fingerprint()
        changed = next(
            (k for k in [*self.before, *after] if self.before.get(k) != after.get(k)), None
        )
        if changed is not None:
            raise ObservationChanged(
                f"attack {attack!r} wrote into {changed}, which it may only read (the global "
                "model's weights, the updates and the auxiliary data every attack is given): "
                "copy a tensor before changing it"
            )

    def _fingerprint(self) -> dict[str, tuple[int, int]]:
        sums: dict[int, int] = {}  # tensors shared by several observations are read once

        def entry(tensor: object) -> tuple[int, int]:
            if id(tensor) not in sums:
                sums[id(tensor)] = _checksum(tensor)
            return id(tensor), sums[id(tensor)]

        found = {
            f"knowledge.{name}": entry(getattr(self.knowledge, name))
            for name in ("aux_inputs", "aux_labels")
        }
        many = len(self.observations) > 1
        for observation in self.observations:
            whose = f" (round {observation.round}, client {observation.client_id})" if many else ""
            for field in _TENSOR_FIELDS:
                for name, tensor in (getattr(observation, field) or {}).items():
                    found[f"observation.{field}[{str(name)!r}]{whose}"] = entry(tensor)
        return found


def _checksum(tensor: object) -> int:
    """CRC-32 of a tensor's dtype, shape and bytes (about 4 GB/s on the CPU machine of
    docs/performance.md, against 1-2 GB/s for a cryptographic hash: this guards against
    mistakes, not adversaries); 0 for a non-tensor, which is compared by identity alone."""
    if not isinstance(tensor, torch.Tensor):
        return 0
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    checksum = zlib.crc32(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    return zlib.crc32(flat.view(torch.uint8).numpy().data, checksum) if flat.numel() else checksum


def attack_label(attack: object) -> str:
    """The name an attack's draws are seeded by, the same in a study and through the API."""
    return str(getattr(attack, "name", None) or type(attack).__name__)


@contextmanager
def isolated(
    attack: object,
    observations: Sequence[Observation],
    attacker_seed: int,
    read_only: ReadOnly | None,
    name: str = "",
) -> Iterator[None]:
    """One call of `attack` (named `name` in its settings) on `observations`: the global
    generators seeded for them inside (`call_seed`), and `ObservationChanged` after a call
    that wrote into what `read_only` holds (None: the caller checks), whether it returned or
    raised."""
    label = attack_label(attack)
    try:
        with seeded_generators(call_seed(attacker_seed, label, observations)):
            yield
    except (Exception, SystemExit):
        if read_only is not None:  # a failed call that wrote into its input taints later rows
            read_only.check(name or label)
        raise
    if read_only is not None:
        read_only.check(name or label)
