"""Feature hashing of updates: m gradient coordinates summed into k bins without storing P.

LTI's inverter takes the update as input; for large models its first layer would need
m x hidden weights. Feature hashing (Weinberger et al., 2009) sends coordinate i to bin r(i)
(optionally with a sign s(i)) and sums, i.e. computes P @ g for a sparse P in {0, +-1}^{k x m}
with one non-zero per column. Here r and s come from a seeded integer hash of the coordinate
index, computed chunk by chunk from `arange`, so neither P nor a table of m bin ids is ever
held: the memory used is O(k + chunk) whatever m is.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_MASK32 = 0xFFFFFFFF
# Multiplier of a well-mixed 32-bit integer finaliser; products stay below 2**59 in int64.
_MIX = 0x45D9F3B
_GOLDEN = 0x9E3779B9
MAX_FEATURES = 1 << 32
DEFAULT_CHUNK = 1 << 16


class HashingError(ValueError):
    """A hashing setting is out of range."""


def _hash32(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded 32-bit hash of int64 indices below 2**32 (values in [0, 2**32))."""
    salt = (seed * _GOLDEN + 0x7F4A7C15) & _MASK32
    x = index ^ salt
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def resolve_num_bins(hash_bins: int | float, in_features: int) -> int:
    """k from a count (int >= 1) or a ratio of the gradient size (float in (0, 1])."""
    if isinstance(hash_bins, bool):
        raise HashingError(f"hash_bins={hash_bins!r} must be an int >= 1 or a float in (0, 1]")
    if isinstance(hash_bins, int):
        if hash_bins < 1:
            raise HashingError(f"hash_bins={hash_bins} must be an int >= 1 or a float in (0, 1]")
        return hash_bins
    if isinstance(hash_bins, float) and 0.0 < hash_bins <= 1.0:
        return max(1, round(hash_bins * in_features))
    raise HashingError(f"hash_bins={hash_bins!r} must be an int >= 1 or a float in (0, 1]")


class FeatureHasher:
    """Hashes flat updates of `in_features` coordinates to `num_bins` bins.

    Bin ids use the high bits of the hash (multiply-shift, no modulo bias); the optional
    sign uses its lowest bit. The object holds four integers, whatever `in_features` is.
    """

    def __init__(
        self,
        in_features: int,
        num_bins: int,
        seed: int = 0,
        signed: bool = False,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        if not 1 <= in_features < MAX_FEATURES:
            raise HashingError(f"in_features={in_features} must be in [1, 2**32)")
        if num_bins < 1 or num_bins >= MAX_FEATURES:
            raise HashingError(f"num_bins={num_bins} must be in [1, 2**32)")
        if chunk_size < 1:
            raise HashingError(f"chunk_size={chunk_size} must be >= 1")
        self.in_features = in_features
        self.num_bins = num_bins
        self.seed = seed
        self.signed = signed
        self.chunk_size = chunk_size

    def bin_ids(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bins r(i) for coordinates start <= i < stop (int64)."""
        hashed = _hash32(torch.arange(start, stop, dtype=torch.int64, device=device), self.seed)
        return (hashed * self.num_bins) >> 32

    def signs(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Signs s(i) in {-1, +1} (float32) for start <= i < stop; all +1 when unsigned."""
        if not self.signed:
            return torch.ones(stop - start, device=device)
        hashed = _hash32(torch.arange(start, stop, dtype=torch.int64, device=device), self.seed)
        return 1.0 - 2.0 * (hashed & 1).to(torch.float32)

    def _accumulate(
        self,
        out: torch.Tensor,
        flat: torch.Tensor,
        offset: int,
        divisor: torch.Tensor | None = None,
    ) -> None:
        """Adds the hashed contribution of coordinates [offset, offset + width) to `out`,
        each row divided by `divisor` [N, 1] first when given.

        Signed hashing scatters into 2k slots (bin, sign) of `out` [N, k, 2] and leaves the
        difference to the caller, which saves multiplying every value by its sign. The
        division goes chunk by chunk into one scratch chunk: the same quotients as dividing
        the whole rows first, without a divided copy of them (a pass over fresh memory that
        cost LTI-P about a quarter of its pair generation).
        """
        rows, width = flat.shape
        slots = out.view(rows, -1)
        scratch = None
        if divisor is not None:
            scratch = torch.empty(
                rows, min(width, self.chunk_size), dtype=out.dtype, device=out.device
            )
        for begin in range(0, width, self.chunk_size):
            end = min(width, begin + self.chunk_size)
            index = torch.arange(offset + begin, offset + end, dtype=torch.int64, device=out.device)
            hashed = _hash32(index, self.seed)
            bins = (hashed * self.num_bins) >> 32
            if self.signed:
                bins = bins * 2 + (hashed & 1)  # slot 0: sign +1, slot 1: sign -1
            values = flat[:, begin:end].to(out.dtype)
            if scratch is not None:
                values = torch.div(values, divisor, out=scratch[:, : end - begin])
            slots.scatter_add_(1, bins.expand(rows, -1), values)

    def _empty(self, rows: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(rows, self.num_bins, 2 if self.signed else 1, device=device)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        return out[..., 0] - out[..., 1] if self.signed else out[..., 0]

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """[N, in_features] -> [N, num_bins] (float32, on the input's device)."""
        if flat.dim() != 2 or flat.shape[1] != self.in_features:
            raise HashingError(f"input shape {tuple(flat.shape)} must be [N, {self.in_features}]")
        out = self._empty(flat.shape[0], flat.device)
        self._accumulate(out, flat, 0)
        return self._finish(out)

    def hash_dict(
        self,
        tensors: Mapping[str, torch.Tensor],
        divisors: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hashes a per-parameter dict with a leading dim N, in dict order, without concatenating.

        Coordinates are numbered as in the concatenation of the flattened tensors, so the
        result equals `self(torch.cat([t.flatten(1) for t in tensors.values()], 1))`; with
        `divisors` (by name, [N, 1]) each tensor's rows are divided by its divisor first.
        """
        values = list(tensors.values())
        if not values:
            raise HashingError("hash_dict needs at least one tensor")
        rows = values[0].shape[0]
        total = sum(t[0].numel() for t in values)
        if total != self.in_features:
            raise HashingError(
                f"dict holds {total} coordinates per row, expected {self.in_features}"
            )
        out = self._empty(rows, values[0].device)
        offset = 0
        for name, tensor in tensors.items():
            flat = tensor.reshape(rows, -1)
            self._accumulate(out, flat, offset, None if divisors is None else divisors[name])
            offset += flat.shape[1]
        return self._finish(out)
