"""A learned attack's inverter on disk, so that a resumed run goes on from the inverter it had.

Saved after every training (atomically: a crash mid-write leaves the previous file), adopted
again only for the setting it was trained for (`key`: model, defense, unit, featuriser, the
attack's settings, the auxiliary data and seed) and only from a round before the one attacked; the
weights it saw (`fingerprint`) decide whether it still needs a refresh.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fedleak.attacks.types import RunStateError, StateNotSaved
from fedleak.tensorfile import load_tensors


class InverterStoreError(ValueError, RunStateError):
    """A saved inverter that cannot be read, or does not fit the inverter it was saved for."""


@dataclass(frozen=True)
class SavedInverter:
    """An inverter's weights and what they were trained for."""

    state_dict: dict[str, Tensor]
    fingerprint: str | None
    meta: dict[str, object]
    path: Path | None = None  # the file it was read from

    def score(self, name: str) -> float:
        """A validation score saved with the weights (NaN when absent)."""
        return float(self.meta.get(name, float("nan")))  # type: ignore[arg-type]


# What marks a run folder (`RunDirectory`, `RunLock`), named here because the attacks do not
# read run folders.
RUN_CONFIG_FILE = "config.toml"
RUN_ENVIRONMENT_FILE = "environment.json"
RUN_LOCK_FILE = ".fedleak.lock"


def run_folder_above(directory: Path) -> Path | None:
    """The nearest folder above `directory` that a fedleak run (or sweep) holds: one with the
    lock file a run takes from its start, before it writes anything else (audit EH2), or a
    run's config.toml beside its environment.json (a run folder copied without its lock). A
    project's own config.toml alone makes none (audit EH1)."""
    return next((folder for folder in Path(directory).parents if _holds_a_run(folder)), None)


def run_folder_at(directory: Path) -> Path | None:
    """`directory` itself when a fedleak run (or sweep) holds it, else `run_folder_above`:
    a sweep's folder, locked but holding no run's records yet, was taken for a cache (audit
    EN1)."""
    return directory if _holds_a_run(Path(directory)) else run_folder_above(directory)


def _holds_a_run(folder: Path) -> bool:
    return is_run_folder(folder) or (
        (folder / RUN_LOCK_FILE).is_file()
        # A cache folder locked by a fedleak from before its lock was named apart.
        and not any(folder.glob("*-inverter-r*.pt"))
    )


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a run's records (config.toml and environment.json)."""
    return (folder / RUN_CONFIG_FILE).is_file() and (folder / RUN_ENVIRONMENT_FILE).is_file()


# Files kept from before the round just saved. A worker pool attacks round t + 1 while the
# server still waits for round t's other attacks (`CuriousStrategy.settle`), so a learned attack
# can have saved rounds t and t + 1 while round t - 1 is the last one recorded: a resume then
# attacks round t again and needs round t - 1's file, two before the newest.
KEPT_EARLIER = 2


class InverterStore:
    """`<directory>/<attack>-inverter-r<round>.pt`, one file per round trained in (the newest
    and `KEPT_EARLIER` before it kept), or nothing when no directory is configured.

    A resumed run goes on from the inverter of the last round before the one it attacks: a
    file saved in that round itself may hold a training that an interrupt cut short, or one
    whose round was never recorded, and adopting it would make the resumed run differ from an
    uninterrupted one.
    """

    def __init__(self, directory: Path | None, attack: str) -> None:
        self.directory = None if directory is None else Path(directory)
        self.attack = attack
        # The run folder the state is kept in (the nearest folder above it holding a run's
        # config.toml; `<run>/state/<attack>` unless cache-dir names another folder inside
        # the run's): one removed mid-run must not be made again by a save (audits DZ1,
        # EC3). A user's cache-dir elsewhere is made whenever it is missing (EB1).
        self._anchor = None
        if self.directory is not None:
            self._anchor = run_folder_above(self.directory)

    def file(self, round_: int) -> Path | None:
        """Where the inverter trained in `round_` is saved."""
        if self.directory is None:
            return None
        return self.directory / f"{self.attack}-inverter-r{int(round_):06d}.pt"

    def prepare(self) -> None:
        """Make the folder before a training whose inverter it must hold: a folder that cannot
        be made (a file in the way, no such parent) stops the call before the training, not
        after it, with the training lost (audit DV5)."""
        if self.directory is None:
            return
        self._check_anchor()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StateNotSaved(error.errno, error.strerror, str(self.directory)) from error

    def _check_anchor(self) -> None:
        if self._anchor is not None and not self._anchor.is_dir():
            raise StateNotSaved(
                errno.ENOENT, "removed during the run, so not made again", str(self._anchor)
            )

    def save(
        self,
        inverter: nn.Module,
        key: str,
        fingerprint: str | None,
        round_: int,
        scores: dict[str, float],
    ) -> None:
        """Save `inverter` as trained in `round_` (nothing without a directory); a file the
        folder cannot take stops the run (`StateNotSaved`)."""
        path = self.file(round_)
        if path is None:
            return
        state = {k: v.detach().cpu() for k, v in inverter.state_dict().items()}
        meta = {"key": key, "fingerprint": fingerprint, "round": int(round_), **scores}
        # Serialised in memory: torch names the archive's records after the file it writes,
        # and the same inverter must give the same bytes in every run.
        buffer = io.BytesIO()
        torch.save({"state_dict": state, "meta": meta}, buffer)
        try:
            self._write(path, buffer.getvalue(), round_)
        except OSError as error:
            raise StateNotSaved(error.errno, error.strerror, str(path)) from error

    def _write(self, path: Path, data: bytes, round_: int) -> None:
        """`data` as `path`, through a temporary file, then the files no resume needs deleted."""
        self._check_anchor()
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name no other process writes (two runs, or a run's workers, saving one round).
        handle, temporary = tempfile.mkstemp(prefix=f"{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o644)  # as the run's other files (mkstemp makes 0600)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        # Keep this round's file and those a resume of an unrecorded round would go on from.
        earlier = [(r, p) for r, p in self.saved() if r < round_]
        for _, saved_path in earlier[: max(len(earlier) - KEPT_EARLIER, 0)]:
            saved_path.unlink(missing_ok=True)

    def saved(self) -> list[tuple[int, Path]]:
        """(round, file) of every saved inverter, oldest first; a file of an earlier version
        (`<attack>-inverter.pt`, one for the whole run) counts as round 0."""
        if self.directory is None or not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob(f"{self.attack}-inverter*.pt"):
            suffix = path.stem.removeprefix(f"{self.attack}-inverter")
            if suffix == "":
                found.append((0, path))
            elif suffix.startswith("-r") and suffix[2:].isdigit():
                found.append((int(suffix[2:]), path))
        return sorted(found)

    def latest(self, before: int) -> Path | None:
        """The file of the inverter saved in the latest round before round `before`."""
        candidates = [path for r, path in self.saved() if r < before]
        return candidates[-1] if candidates else None

    def load(self, key: str, device: torch.device, before: int) -> SavedInverter | None:
        """The inverter saved in the latest round before round `before`, if it was trained for
        this setting (tensors only: weights_only)."""
        path = self.latest(before)
        if path is None:
            return None
        meta, state_dict = _read(path, device)
        if meta.get("key") != key:
            return None
        return SavedInverter(state_dict, meta.get("fingerprint"), meta, path)


def check_saved_inverters(directory: Path) -> None:
    """Every inverter saved in `directory` reads back: a resumed run goes on from them, and
    one that cannot be read would have the resumed rounds train anew, unlike the run they
    continue (`InverterStoreError`, one line, before any round)."""
    for path in sorted(Path(directory).glob("*-inverter*.pt")):
        _read(path, "cpu")


def _read(path: Path, device: torch.device | str) -> tuple[dict, dict[str, Tensor]]:
    try:
        saved = load_tensors(path, device)
        return dict(saved["meta"]), dict(saved["state_dict"])
    except Exception as error:  # a damaged or foreign file: never unpickled beyond tensors
        detail = textwrap.shorten(f"{type(error).__name__}: {error}", 200, placeholder=" ...")
        raise InverterStoreError(
            f"{path}: unreadable ({detail}); the run's later rounds go on from it: restore it, "
            "or start the run again in a new out-dir"
        ) from None


def weights_fingerprint(weights: dict[str, Tensor]) -> str:
    """A digest of the global weights: an inverter is current only for the weights it saw."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in weights.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
