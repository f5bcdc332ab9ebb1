"""Which of its images a client trains on in a round: a pure function of (seed, client, round).

Being a pure function lets a resumed run, a run with attacks off and the auditor all agree on
each client's batch without any shared state between simulated clients.
"""

from __future__ import annotations

import numpy as np

from fedleak.data.stratify import DataSplitError

# Stream tag keeping batch sampling independent of the other draws made from the same seed.
_STREAM = 0x42415443


def _generator(
    partition: np.ndarray, batch_size: int, seed: int, partition_id: int, server_round: int
) -> np.random.Generator:
    """The draw's own random stream, after checking its arguments."""
    for setting, value in (
        ("seed", seed),
        ("partition_id", partition_id),
        ("server_round", server_round),
    ):
        if value < 0:
            raise DataSplitError(f"{setting}={value}: expected an integer >= 0")
    if not 1 <= batch_size <= len(partition):
        raise DataSplitError(
            f"batch_size={batch_size}: partition {partition_id} holds "
            f"{len(partition)} images, so expected 1..{len(partition)}"
        )
    return np.random.default_rng(
        np.random.SeedSequence([seed, partition_id, server_round, _STREAM])
    )


def sample_batch(
    partition: np.ndarray, batch_size: int, seed: int, partition_id: int, server_round: int
) -> np.ndarray:
    """`batch_size` distinct dataset indices drawn from `partition`, in random order."""
    rng = _generator(partition, batch_size, seed, partition_id, server_round)
    return rng.choice(np.asarray(partition, dtype=np.int64), size=batch_size, replace=False)


def poisson_batch(
    partition: np.ndarray,
    batch_size: int,
    seed: int,
    partition_id: int,
    server_round: int,
    steps: int = 1,
) -> list[np.ndarray]:
    """`steps` batches, each holding every index of `partition` independently with probability
    batch_size / len(partition), in random order: DP-SGD's Poisson samples, of `batch_size`
    examples on average and possibly none (the sampled Gaussian mechanism the accountant
    analyses), one per local step. The rate is the protocol's constant for the partition the
    client was assigned; the accounted ε holds for neighbours sampled at that same rate
    (docs/privacy.md)."""
    if steps < 1:
        raise DataSplitError(f"steps={steps}: expected an integer >= 1")
    rng = _generator(partition, batch_size, seed, partition_id, server_round)
    partition = np.asarray(partition, dtype=np.int64)
    rate = batch_size / len(partition)
    return [rng.permutation(partition[rng.random(len(partition)) < rate]) for _ in range(steps)]
