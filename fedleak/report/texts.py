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

from fedleak.lines import one_line
from fedleak.report.rundir import RunDirectoryError, atomic_write

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
    """One saved file (see `save_token_pairs`); `RunDirectoryError`, one line naming the file,
    when it is unreadable or not such a file (a damaged one failed the report with "internal
    error", audit EK4)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(document, dict) or not isinstance(document.get("pairs"), list):
            raise ValueError("not an object with a list of pairs")
        pairs = tuple(_pair(row) for row in document["pairs"])
        header = (document["round"], document["client"], document["attack"])
        if not (_is_int(header[0]) and _is_int(header[1]) and isinstance(header[2], str)):
            raise ValueError("round, client or attack of the wrong type")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        detail = one_line(f"{type(error).__name__}: {error}", 200)
        raise RunDirectoryError(
            f"{path}: unreadable token pairs ({detail}); restore it, or delete it to leave its "
            "sequences out of the report"
        ) from None
    return TokenPairs(header[0], header[1], header[2], pairs)


def _pair(row: object) -> TokenPair:
    if not isinstance(row, dict):
        raise ValueError("a pair is not an object")
    ids = [row["truth"], row["reconstruction"]]
    pieces = [row["truth_pieces"], row["reconstruction_pieces"]]
    if not _is_int(row["target_index"]) or not all(
        isinstance(seq, list) and all(_is_int(t) for t in seq) for seq in ids
    ):
        raise ValueError("a pair's target_index or token ids are not integers")
    if not all(isinstance(seq, list) and all(isinstance(p, str) for p in seq) for seq in pieces):
        raise ValueError("a pair's pieces are not strings")
    if len({len(seq) for seq in (*ids, *pieces)}) != 1:
        raise ValueError("a pair's token ids and pieces differ in length")
    return TokenPair(
        target_index=row["target_index"],
        truth=tuple(ids[0]),
        reconstruction=tuple(ids[1]),
        truth_pieces=tuple(pieces[0]),
        reconstruction_pieces=tuple(pieces[1]),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def text_files(run: Path) -> list[Path]:
    """A run's saved pair files, sorted by name (round, client, attack)."""
    folder = Path(run) / TEXTS_DIR
    return (
        sorted(p for p in folder.glob("r*_c*_*.json") if _NAME.fullmatch(p.name))
        if folder.is_dir()
        else []
    )
