"""The attacker's auxiliary images, held out before any client gets data, so they are disjoint
from every client by construction.

Two regimes:
- Plain (beta = 1 and no `in_classes`): a stratified draw over all classes; the clients get
  every other training image.
- Distribution shift (beta < 1, or `in_classes` given), the LTI paper's ablation (Wu et al.,
  section 4.1.2): the classes are split into an in-distribution half and the rest; a `beta`
  fraction of the auxiliary images comes from the in-distribution classes and the remainder
  from the others, and the clients (hence the target model) only hold in-distribution images.
  beta = 1 with `in_classes` given is the ablation's in-distribution end point.

Images whose pixels another training image repeats (`repeated`) are never drawn: the copies'
indices differ, so without this a client could hold one copy while the attacker held the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedleak.data.stratify import DataSplitError, stratified_sample

# Stream tag keeping the auxiliary draw independent of the other draws made from the same seed.
_STREAM = 0x41555820


@dataclass(frozen=True, eq=False)
class AuxiliarySplit:
    """Sorted indices of the attacker's auxiliary images and of the images left to the clients."""

    aux: np.ndarray
    clients: np.ndarray


def split_auxiliary(
    labels: np.ndarray,
    aux_size: int,
    seed: int,
    *,
    beta: float = 1.0,
    in_classes: Sequence[int] | None = None,
    repeated: np.ndarray | None = None,
) -> AuxiliarySplit:
    """Draw `aux_size` auxiliary images from `labels`' indices and leave the rest to clients;
    `repeated` (a mask over the indices) marks images never to draw, copies of another image."""
    labels = np.asarray(labels)
    drawable = np.ones(len(labels), dtype=bool) if repeated is None else ~np.asarray(repeated)
    if aux_size < 0:
        raise DataSplitError(f"aux_size={aux_size}: expected a count >= 0")
    if not 0.0 <= beta <= 1.0:
        raise DataSplitError(f"beta={beta}: expected the in-distribution fraction in [0, 1]")
    rng = np.random.default_rng([seed, _STREAM])
    everyone = np.arange(len(labels), dtype=np.int64)
    if beta == 1.0 and in_classes is None:
        if aux_size >= len(labels) and len(labels) < 2:
            # "use at most 0" would be no fix: the attacks need auxiliary images.
            raise DataSplitError(
                f"aux_size={aux_size}: the training split holds {len(labels)} image(s), too few "
                "for an auxiliary set and the clients; lower test_fraction where the set is "
                "held out for testing, or use a larger data set"
            )
        if aux_size >= len(labels):
            raise DataSplitError(
                f"aux_size={aux_size} leaves none of the {len(labels)} training "
                f"images for the clients; use at most {len(labels) - 1}"
            )
        _check_drawable(aux_size, aux_size, int(drawable.sum()), len(labels))
        aux = stratified_sample(labels, everyone[drawable], aux_size, rng)
        return AuxiliarySplit(aux, np.setdiff1d(everyone, aux, assume_unique=True))

    inside_classes = _in_classes(labels, in_classes, beta)
    is_in = np.isin(labels, inside_classes)
    inside, outside = everyone[is_in], everyone[~is_in]
    n_in = int(np.floor(beta * aux_size + 0.5))
    n_out = aux_size - n_in
    if n_in >= len(inside):
        raise DataSplitError(
            f"aux_size={aux_size} with beta={beta} takes {n_in} of the {len(inside)} "
            "in-distribution images and leaves the clients none; lower aux_size or beta"
        )
    if n_out > len(outside):
        raise DataSplitError(
            f"aux_size={aux_size} with beta={beta} needs {n_out} out-of-distribution images but "
            f"only {len(outside)} exist; lower aux_size or raise beta"
        )
    _check_drawable(aux_size, n_in, int(drawable[inside].sum()), len(inside))
    _check_drawable(aux_size, n_out, int(drawable[outside].sum()), len(outside))
    aux = np.sort(
        np.concatenate(
            [
                stratified_sample(labels, inside[drawable[inside]], n_in, rng),
                stratified_sample(labels, outside[drawable[outside]], n_out, rng),
            ]
        )
    )
    return AuxiliarySplit(aux, np.setdiff1d(inside, aux, assume_unique=True))


def _check_drawable(aux_size: int, wanted: int, drawable: int, total: int) -> None:
    """Refuse a draw that needs images whose pixels another image repeats."""
    if wanted > drawable:
        raise DataSplitError(
            f"aux_size={aux_size} needs {wanted} images from a pool of {total}, but only "
            f"{drawable} of them have pixels no other training image repeats (a copy of a "
            "client's image must not reach the attacker); lower data.aux-size or remove the copies"
        )


def _in_classes(labels: np.ndarray, in_classes: Sequence[int] | None, beta: float) -> np.ndarray:
    """The in-distribution classes: as given, or the first half of the classes present."""
    present = np.unique(labels)
    if in_classes is None:
        if len(present) < 2:
            raise DataSplitError(
                f"beta={beta} needs at least two classes to split, found {len(present)}"
            )
        return present[: len(present) // 2]
    chosen = np.unique(np.asarray(list(in_classes), dtype=np.int64))
    unknown = np.setdiff1d(chosen, present)
    if len(chosen) == 0 or len(unknown):
        raise DataSplitError(
            f"in_classes={list(in_classes)}: expected a non-empty subset of the "
            f"classes {present.tolist()}"
        )
    if beta < 1.0 and len(chosen) == len(present):
        raise DataSplitError(
            f"in_classes={list(in_classes)} leaves no out-of-distribution class for beta={beta} < 1"
        )
    return chosen
