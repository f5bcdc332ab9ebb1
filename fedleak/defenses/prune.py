"""Gradient pruning (DLG's defense, GradAttack's GradPrune): zero all but the largest magnitudes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Literal

import torch
from torch import Tensor

from fedleak.defenses.grammar import DefenseSpecError
from fedleak.settings import format_number

PruneScope = Literal["layer", "global"]
PRUNE_SCOPES: tuple[str, ...] = ("layer", "global")


def pruned_count(rate: float, numel: int) -> int:
    """How many of `numel` coordinates a rate prunes: floor(rate * numel), so exactly
    numel - pruned_count of them are kept. The rate is read as the decimal it was written as
    (0.29 * 100 is 28.999999999999996 in binary), and a rate just under 1 keeps a coordinate
    of a small layer (a fixed slack rounded 0.99999999 * 12 up to all 12)."""
    return min(numel, math.floor(Fraction(repr(float(rate))) * numel))


def _keep_largest(rows: Tensor, rate: float) -> Tensor:
    """`rows` [R, n] with all but the n - floor(rate*n) largest magnitudes of each row zeroed."""
    keep = rows.shape[1] - pruned_count(rate, rows.shape[1])
    if keep == rows.shape[1]:
        return rows
    # topk keeps exactly `keep` coordinates even when magnitudes tie.
    index = rows.abs().topk(keep, dim=1, sorted=False).indices
    mask = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, index, True)
    return rows * mask


def _as_rows(grads: dict[str, Tensor], batched: bool) -> dict[str, Tensor]:
    """Each tensor as [rows, n]: one row, or one per sample along dim 0 when `batched`."""
    rows = next(iter(grads.values())).shape[0] if batched else 1
    return {name: t.reshape(rows, -1) for name, t in grads.items()}


@dataclass(frozen=True)
class Prune:
    """Keep the top (1 - rate) fraction of coordinates by magnitude, per parameter tensor
    (`layer`) or over all parameters together (`global`)."""

    rate: float
    scope: PruneScope = "layer"
    kind: ClassVar[str] = "prune"
    stage: ClassVar[str] = "release"
    rank: ClassVar[float] = 3.0

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, int | float) and 0.0 <= self.rate < 1.0):
            raise DefenseSpecError(f"prune: rate P={self.rate!r} must be a number in [0, 1)")
        if self.scope not in PRUNE_SCOPES:
            raise DefenseSpecError(
                f"prune: scope {self.scope!r} must be one of {', '.join(PRUNE_SCOPES)}"
            )

    @property
    def spec(self) -> str:
        """This step's canonical spec part (the default `layer` scope is left out)."""
        rate = format_number(self.rate)
        return f"prune:{rate}" if self.scope == "layer" else f"prune:{rate}:global"

    def __call__(self, grads: dict[str, Tensor], *, batched: bool = False) -> dict[str, Tensor]:
        """Pruned copies; with `batched`, dim 0 indexes samples pruned independently."""
        if not grads:
            return {}
        flat = _as_rows(grads, batched)
        if self.scope == "layer":
            kept = {name: _keep_largest(f, self.rate) for name, f in flat.items()}
        else:
            joined = _keep_largest(torch.cat(list(flat.values()), dim=1), self.rate)
            sizes = [f.shape[1] for f in flat.values()]
            kept = dict(zip(flat, joined.split(sizes, dim=1), strict=True))
        return {name: kept[name].reshape(t.shape) for name, t in grads.items()}

    def release(
        self,
        grads: dict[str, Tensor],
        generator: torch.Generator,
        *,
        batched: bool,
        dp_batch_size: int | None,
    ) -> dict[str, Tensor]:
        """The pipeline's hook: prune (each sample on its own when `batched`)."""
        return self(grads, batched=batched)

    def contradiction(self, grads: dict[str, Tensor], *, batched: bool) -> str | None:
        """Why `grads` cannot be this step's output: fewer zeros than the rate prunes (in a
        tensor, or over all of them with the `global` scope; per sample when `batched`)."""
        if not grads:
            return None
        flat = _as_rows(grads, batched)
        if self.scope == "global":
            flat = {"": torch.cat(list(flat.values()), dim=1)}
        for name, f in flat.items():
            zeros = int((f == 0).sum(dim=1).min())
            needed = pruned_count(self.rate, f.shape[1])
            if zeros < needed:
                where = f"{name!r} has" if name else "it has"
                sample = " in a sample" if batched else ""
                return (
                    f"{where} {zeros} zeros among {f.shape[1]} coordinates{sample}, yet "
                    f"{self.spec} leaves at least {needed}"
                )
        return None
