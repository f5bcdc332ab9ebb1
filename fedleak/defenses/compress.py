"""Sign compression (signSGD): share only the sign of each coordinate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class SignCompression:
    """Replace each coordinate by its sign; exact zeros (e.g. pruned ones) stay zero."""

    kind: ClassVar[str] = "sign"
    stage: ClassVar[str] = "release"
    rank: ClassVar[float] = 4.0  # last: the sign of whatever the other steps left

    @property
    def spec(self) -> str:
        """This step's canonical spec part."""
        return "sign"

    def __call__(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Signs in {-1, 0, 1}, any shape (a leading batch dimension included)."""
        return {name: torch.sign(t) for name, t in grads.items()}

    def release(
        self,
        grads: dict[str, Tensor],
        generator: torch.Generator,
        *,
        batched: bool,
        dp_batch_size: int | None,
    ) -> dict[str, Tensor]:
        """The pipeline's hook: signs."""
        return self(grads)

    def contradiction(self, grads: dict[str, Tensor], *, batched: bool) -> str | None:
        """Why `grads` cannot be this step's output: a value other than -1, 0 or 1."""
        for name, t in grads.items():
            odd = t[(t != 0) & (t.abs() != 1)]
            if odd.numel():
                value = odd[0].item()
                return f"{name!r} holds {value:.6g}, yet sign compression shares only -1, 0 and 1"
        return None
