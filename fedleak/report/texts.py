"""Reconstructed token sequences beside the private ones, as the language task's image grids.

One JSON file per round, client and attack under `texts/` of the run directory
(`r{round}_c{client}_{attack}.json`), holding the matched pairs in the auditor's order: token
ids and each token's text (a piece keeps its leading space), so that the report can show the
sequences side by side with the recovered positions marked, without the tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedleak.report.rundir import atomic_write

TEXTS_DIR = "texts"
# The aggregate view's one target per round is client -1 (`c-01`).
_NAME = re.compile(r"r(\d+)_c(-?\d+)_(.+)\.json")

Pieces = Callable[[Sequence[int]], list[str]]


@dataclass(frozen=True)
class TokenPair:
    """One private sequence and the reconstruction matched to it."""

    target_index: int
    truth: tuple[int, ...]
    reconstruction: tuple[int, ...]
    truth_pieces: tuple[str, ...]
    reconstruction_pieces: tuple[str, ...]

    @property
    def recovered(self) -> tuple[bool, ...]:
        """Per position: whether the reconstruction has the true token there."""
        return tuple(a == b for a, b in zip(self.truth, self.reconstruction, strict=True))


@dataclass(frozen=True)
class TokenPairs:
    """The saved pairs of one round, client and attack."""

    round: int
    client: int
    attack: str
    pairs: tuple[TokenPair, ...]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "attack"


def text_path(run: Path, server_round: int, client: int, attack: str) -> Path:
    """Where `save_token_pairs` puts one round's, client's and attack's pairs."""
    return Path(run) / TEXTS_DIR / f"r{server_round:03d}_c{client:03d}_{_safe(attack)}.json"


def save_token_pairs(
    run: Path,
    server_round: int,
    client: int,
    attack: str,
    truth: torch.Tensor,
    reconstruction: torch.Tensor,
    pieces: Pieces,
    targets: Sequence[int] | None = None,
) -> Path:
    """Write matched sequences (both [B, L] token ids, in matched order) with their pieces;
    `targets` are the truths' indices in the client's batch (default 0, 1, ...)."""
    if truth.dim() != 2 or truth.shape != reconstruction.shape:
        raise ValueError(
            f"save_token_pairs: truth {tuple(truth.shape)} and reconstruction "
            f"{tuple(reconstruction.shape)} must be equal [B, L] shapes"
        )
    indices = list(range(truth.shape[0])) if targets is None else [int(i) for i in targets]
    rows = [
        {
            "target_index": i,
            "truth": t,
            "reconstruction": r,
            "truth_pieces": pieces(t),
            "reconstruction_pieces": pieces(r),
        }
        for i, t, r in zip(
            indices, truth.long().tolist(), reconstruction.long().tolist(), strict=True
        )
    ]
    document = {"round": server_round, "client": client, "attack": attack, "pairs": rows}
    path = text_path(run, server_round, client, attack)
    atomic_write(path, json.dumps(document, ensure_ascii=False).encode("utf-8"))
    return path


def load_token_pairs(path: Path) -> TokenPairs:
    """One saved file (see `save_token_pairs`)."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    pairs = tuple(
        TokenPair(
            target_index=int(row["target_index"]),
            truth=tuple(row["truth"]),
            reconstruction=tuple(row["reconstruction"]),
            truth_pieces=tuple(row["truth_pieces"]),
            reconstruction_pieces=tuple(row["reconstruction_pieces"]),
        )
        for row in document["pairs"]
    )
    return TokenPairs(
        int(document["round"]), int(document["client"]), str(document["attack"]), pairs
    )


def text_files(run: Path) -> list[Path]:
    """A run's saved pair files, sorted by name (round, client, attack)."""
    folder = Path(run) / TEXTS_DIR
    return (
        sorted(p for p in folder.glob("r*_c*_*.json") if _NAME.fullmatch(p.name))
        if folder.is_dir()
        else []
    )
