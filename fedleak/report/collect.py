"""Load a run directory or a sweep directory into one tidy study, from its files alone.

A sweep directory is recognised by its `sweep.json` manifest (cells in the manifest's order);
a folder without one whose sub-folders are run directories is read the same way. Settings
that differ between runs become the study's *groups* (e.g. `batch-size=4`), except the
defense (the tables' columns: the clients' spec, DP-SGD's sampling and central DP), the seed
(pooled into the confidence intervals) and the attack list (the tables' rows).

Runs marked FAILED stay in the runs table but not in the figures: a run whose every client
failed recorded an untrained model, which would pull its setting's accuracy down. Only when
every run failed do the figures show them, as what there is to see.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedleak.config import NAME_PATTERN, RunConfig, keys_without_effect
from fedleak.lines import one_line
from fedleak.report.rundir import (
    ENVIRONMENT_FILE,
    FAILED_FILE,
    RESUME_BOOKKEEPING,
    RunDirectory,
    RunDirectoryError,
    is_run_directory,
)

MANIFEST = "sweep.json"
SWEEP_SOURCE = "sweep.toml"
# Keys that never define a group: they are per-run bookkeeping or the tables' own axes.
_NOT_GROUPS = (
    "name",
    "out-dir",
    "seed",
    "defense.spec",
    "defense.dp-sampling",
    "defense.central-clip",
    "defense.central-noise",
    "attack.names",
    "sim.resume",
    # What a resumed run or rerun sweep may change (a longer timeout split a sweep's cells
    # into groups by it, audit EJ2); more rounds stay a group's.
    *sorted(RESUME_BOOKKEEPING),
)


@dataclass(frozen=True)
class RunRecord:
    """One run's files, read once."""

    name: str
    path: Path
    config: RunConfig
    environment: dict[str, Any]
    leakage: pd.DataFrame
    utility: pd.DataFrame
    images: tuple[Path, ...]
    failure: str = ""  # why the run failed; '' when it did not

    @property
    def last_round(self) -> int:
        """The last round utility.csv records (0: none)."""
        return int(self.utility["round"].max()) if len(self.utility) else 0

    @property
    def batchnorm(self) -> bool:
        """Whether the run's model has BatchNorm, as its environment records it; for a run
        recorded before it said, whether its model is one of fedleak's with BatchNorm (a
        plug-in's is not known then, audit EH5)."""
        model = self.environment.get("model")
        if isinstance(model, dict) and isinstance(model.get("batchnorm"), bool):
            return model["batchnorm"]
        return self.config.model.name in BATCHNORM_BUILTINS

    @property
    def modality(self) -> str:
        """What the run's private data are, `image` or `tokens`: as its environment records
        it, else from its rows (a run recorded before the environment said), else `image`."""
        data = self.environment.get("data")
        if isinstance(data, dict) and data.get("modality") in ("image", "tokens"):
            return str(data["modality"])
        if "modality" in self.leakage.columns and len(self.leakage):
            return str(self.leakage["modality"].iloc[0])
        return "image"


@dataclass(frozen=True)
class Study:
    """A run or a sweep: its runs, which settings vary, and the manifest of a sweep."""

    path: Path
    kind: str  # "run" or "sweep"
    runs: tuple[RunRecord, ...]
    manifest: dict[str, Any] | None
    group_keys: tuple[str, ...]

    @property
    def name(self) -> str:
        """The run's configured name, or the sweep's."""
        if self.kind == "run":
            return self.runs[0].config.name
        return str((self.manifest or {}).get("name", self.path.name))

    def group_of(self, run: RunRecord) -> str:
        """The label of a run's group: its values of the varying keys ('' when none vary),
        without the settings its kind of data never reads (a mixed sweep's image cells were
        labelled `vocab-size=8192`, audit EI6)."""
        flat = run.config.to_flat()
        short = _short_names(self.group_keys)
        unread = keys_without_effect(run.modality)
        keys = [k for k in self.group_keys if k not in unread]
        return ", ".join(f"{short[k]}={flat.get(k)}" for k in keys)

    def cells_without_runs(self) -> tuple[dict[str, Any], ...]:
        """A sweep's cells (as `sweep.json` records them) that have no run here: not run yet,
        skipped, or finished and later deleted or left out of a copy (status "done")."""
        started = {r.name for r in self.runs}
        cells = (self.manifest or {}).get("cells", [])
        return tuple(cell for cell in cells if cell["id"] not in started)

    @property
    def scored_runs(self) -> tuple[RunRecord, ...]:
        """The runs the figures show: those that did not fail, or all when every one did."""
        return tuple(r for r in self.runs if not r.failure) or self.runs

    @property
    def modalities(self) -> frozenset[str]:
        """The scored runs' modalities (`RunRecord.modality`)."""
        return frozenset(r.modality for r in self.scored_runs)

    def _training(self, run: RunRecord) -> tuple[str, str, int]:
        """What a run trained: runs of one setting and seed differ at most in `attack.names`
        (every other key is a group key), and attacks do not touch training."""
        return self.group_of(run), run.config.defense.label, run.config.seed

    def leakage(self) -> pd.DataFrame:
        """The scored runs' leakage rows, with `run` and `group` columns added and `defense`
        as the tables name it (central DP included). An attack that an earlier run of the same
        training already scored (cells differing only in `attack.names` share the floor) is
        taken once: the same samples twice would halve the intervals. `training` names the
        first run of each training, so that a later run's attacks meet the floors an earlier
        one scored on the same samples."""
        frames, scored, first = [], {}, {}
        for r in self.scored_runs:
            training = self._training(r)
            seen = scored.setdefault(training, set())
            rows = r.leakage
            if "attack" in rows.columns:
                rows = rows[~rows["attack"].isin(seen)]
                seen.update(r.leakage["attack"].dropna())
            frames.append(
                rows.assign(
                    run=r.name,
                    training=first.setdefault(training, r.name),
                    group=self.group_of(r),
                    defense=r.config.defense.label,
                )
            )
        return pd.concat(frames, ignore_index=True)

    def utility(self) -> pd.DataFrame:
        """The scored runs' utility rows, with `run`, `group`, `defense` and `seed` added, one
        run per training (the same model measured twice is one seed, not two)."""
        trainings = {self._training(r): r for r in reversed(self.scored_runs)}
        frames = [
            r.utility.assign(
                run=r.name,
                group=self.group_of(r),
                defense=r.config.defense.label,
                seed=r.config.seed,
            )
            for r in self.scored_runs
            if trainings[self._training(r)] is r
        ]
        return pd.concat(frames, ignore_index=True)

    def defenses(self) -> list[str]:
        """Defense specs in first-seen order, with 'none' first (the papers' first column)."""
        seen = list(dict.fromkeys(r.config.defense.label for r in self.scored_runs))
        return sorted(seen, key=lambda d: (d != "none", seen.index(d)))

    def groups(self) -> list[str]:
        """Group labels of the scored runs in first-seen order."""
        return list(dict.fromkeys(self.group_of(r) for r in self.scored_runs))


def _short_names(keys: tuple[str, ...]) -> dict[str, str]:
    """Last dotted part of each key (`batch-size`), unless two keys would then look alike, or
    it would read as a top-level setting (`model.name` as `name`, the run's name, audit
    EO6)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    top_level = {k for k in RunConfig().to_flat() if "." not in k}
    return {
        k: (s if last.count(s) == 1 and (s == k or s not in top_level) else k)
        for k, s in zip(keys, last, strict=True)
    }


def _read_run(path: Path, name: str | None = None) -> RunRecord:
    run = RunDirectory.open(path)
    run.check_records()
    config = run.config
    return RunRecord(
        name=name or config.name,
        path=path,
        config=config,
        environment=run.environment(),
        leakage=run.leakage(),
        utility=run.utility(),
        images=tuple(run.images()),
        failure=(
            (run.failed_reason() or "no reason recorded") if (path / FAILED_FILE).exists() else ""
        ),
    )


# fedleak's own models with BatchNorm layers (the report room builds no model to ask).
BATCHNORM_BUILTINS = frozenset({"convnet-bn", "resnet20", "resnet18"})


def _varying(runs: list[RunRecord]) -> tuple[str, ...]:
    # An image run's text settings do nothing (a text run's LPIPS backbones neither): runs
    # apart in them alone are one group (and the report said it grouped by a key its labels
    # left out, audit EJ5).
    flats = [
        {k: v for k, v in r.config.to_flat().items() if k not in keys_without_effect(r.modality)}
        for r in runs
    ]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    return tuple(
        k for k in keys if k not in _NOT_GROUPS and len({repr(flat.get(k)) for flat in flats}) > 1
    )


def read_manifest(sweep_dir: Path) -> dict[str, Any]:
    """`sweep.json` of a sweep directory; RunDirectoryError, in one line, if it is unreadable
    or not a manifest."""
    file = Path(sweep_dir) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        detail = one_line(f"{type(error).__name__}: {error}", 200)
        raise RunDirectoryError(f"{file}: unreadable ({detail}); restore or delete it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cells", []), list):
        raise RunDirectoryError(f"{file}: not a sweep manifest (a JSON object listing cells)")
    for cell in manifest.get("cells", []):
        # A cell's id is the name of its folder inside the sweep's: a path ('../x', '/x')
        # would read and write runs elsewhere.
        name = cell.get("id") if isinstance(cell, dict) else None
        if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name) is None:
            raise RunDirectoryError(
                f"{file}: cell id {name!r} is not a run name (letters, digits, '.', '_', '+', "
                "'-'; a folder inside the sweep's); restore or delete the manifest"
            )
    return manifest


def _made_by_fedleak(path: Path) -> bool:
    """A run directory, or a folder whose environment.json is damaged: reading the run then
    says which file to restore, rather than that the folder is someone else's."""
    if is_run_directory(path):
        return True
    if not (path / ENVIRONMENT_FILE).is_file():
        return False
    try:
        json.loads((path / ENVIRONMENT_FILE).read_text(encoding="utf-8"))
    except OSError:
        return False
    except (ValueError, RecursionError):
        return True
    return False


def load_study(path: Path) -> Study:
    """Read a run directory or a sweep directory; RunDirectoryError if it is neither."""
    path = Path(path)
    if (path / "config.toml").is_file():
        if not _made_by_fedleak(path):
            raise RunDirectoryError(
                f"{path}: holds a config.toml but is not a fedleak run directory (its "
                f"{ENVIRONMENT_FILE} does not name fedleak); no report is written into it"
            )
        run = _read_run(path)
        return Study(path=path, kind="run", runs=(run,), manifest=None, group_keys=())
    manifest = None
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        folders = [path / cell["id"] for cell in manifest.get("cells", [])]
    else:
        folders = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    runs = [_read_run(folder, folder.name) for folder in folders if _made_by_fedleak(folder)]
    if not runs:
        raise RunDirectoryError(
            f"{path}: neither a fedleak run directory nor a sweep directory with finished or "
            "started cells"
        )
    # Settings are told apart by what varies among the runs the figures show: a key only the
    # failed cells change would otherwise label every setting.
    scored = [r for r in runs if not r.failure] or runs
    return Study(
        path=path, kind="sweep", runs=tuple(runs), manifest=manifest, group_keys=_varying(scored)
    )
