"""One seed from several integers, so that every random choice derives from the run's seed.

numpy's `SeedSequence` mixes any number of integers of any size by hashing (so (1, 2) and
(2, 1) give unrelated seeds, and nearby inputs give independent streams); one 32-bit word of
its state seeds a `torch.Generator` or a numpy generator alike.
"""

from __future__ import annotations

import numpy as np


def mix_seed(*parts: int) -> int:
    """A deterministic 32-bit seed from the integers `parts` (their signs are dropped)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


# The attacker's stream of the run's seed; any fixed word works, this one spells "attacker".
ATTACKER_STREAM = 0xA77AC4E2


def attacker_seed(run_seed: int) -> int:
    """The seed every attack receives in place of the run's own.

    Clients draw their batches, noise and masks from `mix_seed(run_seed, ...)`; an attack that
    held the run's seed could replay those draws (subtract a client's Gaussian noise, undo its
    InstaHide mask) and report leakage no real server could reach. Its own stream keeps the
    attacker's randomness seeded by the run without handing it the clients'.
    """
    return mix_seed(run_seed, ATTACKER_STREAM)
