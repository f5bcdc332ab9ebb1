"""Reading the tensor files a run directory holds (checkpoints, learned attacks' state)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def load_tensors(path: Path, device: torch.device | str = "cpu") -> object:
    """`torch.load` of tensors and plain containers only: a pickle that asks for anything
    else is refused, never executed. torch's warnings on old file formats are silenced, as
    the caller turns any failure into its own one-line error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=device, weights_only=True)
