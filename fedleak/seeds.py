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
