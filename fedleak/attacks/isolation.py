"""What one attack call leaves as it found: the observations it reads and the process's global
random generators it may draw from.

The inline runner hands an attack the strategy's own tensors (the global weights among them)
and every attack of a round the same observation of a client, so an attack that wrote into
one changed the global model, or the next attack's input, without a word (audit EX1). And a
plug-in that draws from torch's global generator (`torch.rand`, an `nn.Module`'s
initialisation) gave other rows on every run of one seed (audit EX2).
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from fedleak.attacks.types import Observation
from fedleak.seeds import mix_seed

# The observation's fields that hold tensors, each a name -> tensor mapping (or None).
_TENSOR_FIELDS = ("weights", "update", "per_sample_updates", "bn_statistics")


class ObservationChanged(RuntimeError):
    """An attack wrote into the observation it was given: the run stops, since the global
    model or a later attack's input may be what it changed."""


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


Fingerprint = dict[tuple[int, str, str], tuple[int, str]]


def fingerprint(observations: Sequence[Observation]) -> Fingerprint:
    """Every tensor of the observations, keyed by (observation, field, name): the object it
    is and a digest of its dtype, shape and bytes. Tensors shared by several observations
    (the global weights) are read once."""
    digests: dict[int, str] = {}
    found: Fingerprint = {}
    for index, observation in enumerate(observations):
        for field in _TENSOR_FIELDS:
            for name, tensor in (getattr(observation, field) or {}).items():
                if id(tensor) not in digests:
                    digests[id(tensor)] = _digest(tensor)
                found[(index, field, str(name))] = (id(tensor), digests[id(tensor)])
    return found


def first_change(before: Fingerprint, observations: Sequence[Observation]) -> str | None:
    """The first tensor written, added or removed since `before`, as
    `observation.<field>[<name>]`, or None."""
    after = fingerprint(observations)
    for key in [*before, *after]:
        if before.get(key) != after.get(key):
            _, field, name = key
            return f"observation.{field}[{name!r}]"
    return None


def _digest(tensor: torch.Tensor) -> str:
    # Anything that is not a tensor is compared by identity alone.
    if not isinstance(tensor, torch.Tensor):
        return ""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    blake = hashlib.blake2b(f"{flat.dtype}{tuple(tensor.shape)}".encode(), digest_size=16)
    blake.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return blake.hexdigest()


@contextmanager
def isolated(
    attack: str, observations: Sequence[Observation], attacker_seed: int
) -> Iterator[None]:
    """One call of `attack` on `observations`: the global generators seeded for them inside,
    and `ObservationChanged` after a call that wrote into one, whether it returned or raised."""
    before = fingerprint(observations)

    def unchanged() -> None:
        changed = first_change(before, observations)
        if changed is not None:
            raise ObservationChanged(
                f"attack {attack!r} wrote into {changed}, which it may only read (the global "
                "model's weights and the update every attack of the round is given): copy a "
                "tensor before changing it"
            )

    try:
        with seeded_generators(call_seed(attacker_seed, attack, observations)):
            yield
    except (Exception, SystemExit):
        unchanged()  # a failed call that wrote into its input taints the rows after it too
        raise
    unchanged()
