"""How many torch intra-op threads an attack runs with: one for small models on the CPU.

An attack on a small model is a long chain of small tensor operations; several intra-op threads
add synchronisation to each, and on a busy machine (a simulation's client actors, other jobs)
they wait on each other (docs/api.md has the measurements). `fedleak.reconstruct` chooses by
`default_threads`; a run's inline attack runner always uses one thread, as every server path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedleak.attacks.types import Observation
from fedleak.settings import ConfigError

# Below this many parameters an attack's tensor ops are too small to gain from several intra-op
# threads, and on a busy machine the threads wait on each other (docs/api.md has the numbers).
SMALL_MODEL_PARAMETERS = 1_000_000


@contextmanager
def torch_threads(count: int | None) -> Iterator[int]:
    """Run the block with `count` torch intra-op threads (None: keep the current setting),
    restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    wanted = previous if count is None else int(count)
    if wanted < 1:
        raise ConfigError(f"threads={count!r}: expected an integer >= 1 or None")
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(previous)


def default_threads(observation: Observation, device: torch.device) -> int | None:
    """fedleak's choice of torch threads for one attack: one for small models on the CPU
    (`FEDLEAK_THREADS` overrides), else torch's own setting (None)."""
    chosen = os.environ.get("FEDLEAK_THREADS", "")
    if chosen:
        try:
            count = int(chosen)
        except ValueError:
            count = 0
        if count < 1:
            raise ConfigError(f"FEDLEAK_THREADS={chosen!r}: expected an integer >= 1")
        return count
    if device.type != "cpu":
        return None
    size = sum(t.numel() for t in observation.update.values())
    return 1 if size < SMALL_MODEL_PARAMETERS else None
