"""What a data set holds: a digest of all of it, and images that share their pixels.

A resumed run must train and score on the very data it began with, whatever its name or path
says (a `folder:` edited in place, a relative path read from another directory): the digest
tells. Splits are drawn by index, so two files with equal pixels (a copied or re-saved image,
common in scraped folders) can land one with a client and one with the attacker. Such images
are kept out of the auxiliary set, so no copy of a client's image reaches the attacker's data.
"""

from __future__ import annotations

import hashlib

import numpy as np
from torch import Tensor


def data_fingerprint(dataset: object) -> str:
    """A digest of a loaded data set's splits (inputs and labels, with shapes and types)."""
    digest = hashlib.blake2b(digest_size=16)
    for split in ("train_x", "train_y", "test_x", "test_y"):
        tensor = getattr(dataset, split, None)
        if tensor is None:
            continue
        digest.update(f"{split} {tuple(tensor.shape)} {tensor.dtype};".encode())
        digest.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
    return digest.hexdigest()


def copies_of(x: Tensor, reference: Tensor) -> np.ndarray:
    """A boolean mask over `x`'s images: True where an image of `reference` has exactly the
    same pixels."""
    rows = np.ascontiguousarray(x.detach().cpu().flatten(1).numpy())
    known = np.ascontiguousarray(reference.detach().cpu().flatten(1).numpy())
    index = {_digest(row): i for i, row in enumerate(known)}
    return np.array(
        [
            (i := index.get(_digest(row))) is not None and np.array_equal(known[i], row)
            for row in rows
        ],
        dtype=bool,
    )


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


def repeated_images(x: Tensor) -> np.ndarray:
    """A boolean mask over `x`'s images: True where another image has exactly the same pixels."""
    rows = np.ascontiguousarray(x.detach().cpu().flatten(1).numpy())
    digests = [_digest(row) for row in rows]
    first: dict[bytes, int] = {}
    repeated = np.zeros(len(rows), dtype=bool)
    for index, digest in enumerate(digests):
        earlier = first.setdefault(digest, index)
        # A 128-bit digest collides by chance with probability ~2^-100 here; compare the pixels
        # anyway, so a mask entry is never a guess.
        if earlier != index and np.array_equal(rows[earlier], rows[index]):
            repeated[earlier] = repeated[index] = True
    return repeated
