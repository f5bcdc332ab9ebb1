"""Splitting the clients' pool of training images among the partitions (simulated clients).

Schemes:
- `iid`: a random permutation cut into near-equal parts.
- `dirichlet`: per class, proportions over partitions drawn from Dirichlet(alpha) (the
  per-class form of Yurochkin et al., 2019, and FedMA): small alpha gives each partition few
  dominant classes, and partition sizes vary with it (10 partitions of MNIST-5k after 1,000
  auxiliary images, seeds 0-4: 104-698 images at alpha 0.5, 1-922 at 0.05).
- `dirichlet-clients`: Hsu et al. (2019)'s form: each partition draws its class mix q from
  Dirichlet(alpha * p), p the pool's class shares, and takes an equal share of the pool by
  that mix, a class that has run out passing its weight to those left. Partition sizes are
  equal; alphas are not comparable with the per-class form's.
- `shards`: images sorted by label, cut into `num_partitions * shards_per_partition` equal
  shards, each partition gets `shards_per_partition` random shards (McMahan et al., 2017).
"""

from __future__ import annotations

import numpy as np

from fedleak.data.stratify import DataSplitError

SCHEMES = ("iid", "dirichlet", "dirichlet-clients", "shards")
# Stream tag keeping partitioning independent of the other draws made from the same seed.
_STREAM = 0x50415254


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    seed: int,
    *,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    pool: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Disjoint, non-empty, sorted index arrays that together cover `pool` (default: all of
    `labels`); the same arguments always give the same partitions."""
    labels = np.asarray(labels)
    pool = _check_pool(labels, pool)
    if scheme not in SCHEMES:
        raise DataSplitError(f"scheme={scheme!r}: expected one of {', '.join(SCHEMES)}")
    if num_partitions < 1:
        raise DataSplitError(f"num_partitions={num_partitions}: expected at least 1")
    if len(pool) < num_partitions:
        raise DataSplitError(
            f"num_partitions={num_partitions} exceeds the {len(pool)} images in "
            "the clients' pool; every partition needs at least one image"
        )
    rng = np.random.default_rng([seed, _STREAM])
    if scheme == "iid":
        parts = np.array_split(rng.permutation(pool), num_partitions)
    elif scheme in ("dirichlet", "dirichlet-clients"):
        if not alpha > 0:
            raise DataSplitError(f"alpha={alpha}: expected a positive Dirichlet concentration")
        split = _dirichlet if scheme == "dirichlet" else _dirichlet_clients
        parts = split(labels[pool], pool, num_partitions, alpha, rng)
    else:
        if shards_per_partition < 1:
            raise DataSplitError(f"shards_per_partition={shards_per_partition}: expected >= 1")
        parts = _shards(labels[pool], pool, num_partitions, shards_per_partition, rng)
    return [np.sort(part).astype(np.int64) for part in parts]


def _check_pool(labels: np.ndarray, pool: np.ndarray | None) -> np.ndarray:
    if labels.ndim != 1:
        raise DataSplitError(f"labels must be one-dimensional, got shape {labels.shape}")
    if pool is None:
        return np.arange(len(labels), dtype=np.int64)
    pool = np.asarray(pool, dtype=np.int64)
    if pool.ndim != 1 or len(np.unique(pool)) != len(pool):
        raise DataSplitError("pool must be a one-dimensional array of distinct indices")
    if len(pool) and (pool.min() < 0 or pool.max() >= len(labels)):
        raise DataSplitError(f"pool holds indices outside 0..{len(labels) - 1}")
    return pool


def _dirichlet(
    pool_labels: np.ndarray, pool: np.ndarray, n: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    _, inverse = np.unique(pool_labels, return_inverse=True)
    owner = np.empty(len(pool), dtype=np.int64)
    for k in range(inverse.max() + 1):  # one draw per class, not per sample
        members = rng.permutation(np.flatnonzero(inverse == k))
        shares = rng.dirichlet(np.full(n, alpha))
        cuts = np.round(np.cumsum(shares) * len(members)).astype(np.int64)
        counts = np.diff(np.concatenate([[0], cuts]))
        counts[-1] += len(members) - counts.sum()  # absorb rounding of the last cumulative sum
        owner[members] = np.repeat(np.arange(n), counts)
    # A small alpha can leave partitions empty; give each one image from the largest partition
    # (which then holds at least two, since there are at least n images).
    sizes = np.bincount(owner, minlength=n)
    for empty in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        moved = rng.choice(np.flatnonzero(owner == donor))
        owner[moved] = empty
        sizes[donor] -= 1
        sizes[empty] += 1
    order = np.argsort(owner, kind="stable")
    return np.split(pool[order], np.cumsum(sizes)[:-1])


def _dirichlet_clients(
    pool_labels: np.ndarray, pool: np.ndarray, n: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    _, inverse = np.unique(pool_labels, return_inverse=True)
    members = [rng.permutation(np.flatnonzero(inverse == k)) for k in range(inverse.max() + 1)]
    prior = np.array([len(m) for m in members], dtype=np.float64) / len(pool)
    left = np.array([len(m) for m in members], dtype=np.int64)
    parts = []
    for size in (len(part) for part in np.array_split(np.arange(len(pool)), n)):
        mix = rng.dirichlet(alpha * prior)
        counts = np.zeros(len(members), dtype=np.int64)
        while counts.sum() < size:
            weights = mix * (left > counts)
            if not weights.sum() > 0:  # its classes ran out: the rest in proportion to stock
                weights = (left - counts).astype(np.float64)
            need = size - int(counts.sum())
            draw = rng.multinomial(need, weights / weights.sum())
            counts += np.minimum(draw, left - counts)  # each round takes at least one image
        starts = [len(m) - lk for m, lk in zip(members, left, strict=True)]
        taken = [m[a : a + c] for m, a, c in zip(members, starts, counts, strict=True)]
        left -= counts
        parts.append(pool[np.concatenate(taken)])
    return parts


def _shards(
    pool_labels: np.ndarray, pool: np.ndarray, n: int, per_partition: int, rng: np.random.Generator
) -> list[np.ndarray]:
    num_shards = n * per_partition
    if len(pool) < num_shards:
        raise DataSplitError(
            f"num_partitions={n} x shards_per_partition={per_partition} = {num_shards} shards "
            f"exceed the {len(pool)} images in the clients' pool; lower either"
        )
    # Shuffle first so that images of one class land in shards in random order.
    shuffled = rng.permutation(len(pool))
    by_label = shuffled[np.argsort(pool_labels[shuffled], kind="stable")]
    shards = np.array_split(pool[by_label], num_shards)
    dealt = rng.permutation(num_shards).reshape(n, per_partition)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]
