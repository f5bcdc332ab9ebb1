"""A learned attack's inverter on disk, so that a resumed run goes on from the inverter it had.

Saved after every training (atomically: a crash mid-write leaves the previous file), adopted
again only for the setting it was trained for (`key`: model, defense, unit, featuriser,
architecture); the weights it saw (`fingerprint`) decide whether it still needs a refresh.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


class InverterStoreError(ValueError):
    """A saved inverter that cannot be read."""


@dataclass(frozen=True)
class SavedInverter:
    """An inverter's weights and what they were trained for."""

    state_dict: dict[str, Tensor]
    fingerprint: str | None
    meta: dict[str, object]

    def score(self, name: str) -> float:
        """A validation score saved with the weights (NaN when absent)."""
        return float(self.meta.get(name, float("nan")))  # type: ignore[arg-type]


class InverterStore:
    """`<directory>/<attack>-inverter.pt`, or nothing when no directory is configured."""

    def __init__(self, directory: Path | None, attack: str) -> None:
        self.path = None if directory is None else Path(directory) / f"{attack}-inverter.pt"

    def save(
        self,
        inverter: nn.Module,
        key: str,
        fingerprint: str | None,
        round_: int,
        scores: dict[str, float],
    ) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in inverter.state_dict().items()}
        meta = {"key": key, "fingerprint": fingerprint, "round": int(round_), **scores}
        temporary = self.path.with_suffix(".tmp")
        torch.save({"state_dict": state, "meta": meta}, temporary)
        temporary.replace(self.path)

    def load(self, key: str, device: torch.device) -> SavedInverter | None:
        """The saved inverter if there is one for this setting (tensors only: weights_only)."""
        if self.path is None or not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location=device, weights_only=True)
            meta = dict(saved["meta"])
            state_dict = dict(saved["state_dict"])
        except Exception as error:  # a damaged or foreign file: never unpickled beyond tensors
            detail = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            raise InverterStoreError(
                f"{self.path}: unreadable ({detail}); delete it to train the inverter anew"
            ) from None
        if meta.get("key") != key:
            return None
        return SavedInverter(state_dict, meta.get("fingerprint"), meta)


def weights_fingerprint(weights: dict[str, Tensor]) -> str:
    """A digest of the global weights: an inverter is current only for the weights it saw."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in weights.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
