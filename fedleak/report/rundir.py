"""One run's directory: the resolved config, per-round leakage and utility records, images, state.

Layout (DESIGN.md, Results)::

    config.toml         the resolved RunConfig
    environment.json    versions, device, seed, creation time
    leakage.parquet     one row per round x client x attack x reconstructed sample (+ .csv copy)
    utility.csv         one row per finished round
    images/             r{round}_c{client}_{attack}.png: ground truth above reconstruction
    checkpoints/        global.pt: the global model after the last finished round
    state/<name>/       caches that outlive a round (e.g. a learned attack's trained inverter)
    summary.md          per-round table, rebuilt from the files alone
    DONE / FAILED       written when the run ends: every round recorded / why the run failed
    .fedleak.lock       held (flock) by the process running in the directory

Every write replaces a whole file atomically (temporary file, fsync, `os.replace`), so a run
killed at any moment leaves each file either before or after a round, never half-written.
`utility.csv` is written last in a round and is the record of which rounds finished.

fedleak writes only into a new folder, an empty one or one of its own run directories, and
deletes only files it wrote itself (`clear`, `replace_owned_files`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch

from fedleak.config import ConfigError, RunConfig, load_toml
from fedleak.lines import one_line
from fedleak.tensorfile import load_tensors

# Column -> dtype. Strings use pandas' "str" dtype; ints are int64 with -1 for "not applicable";
# bools default to False. The labels are nullable (Int64): empty on text rows (`TEXT_EMPTY`).
LEAKAGE_COLUMNS: Mapping[str, str] = {
    "round": "int64",
    "client_id": "int64",
    "attack": "str",
    "sample": "int64",
    "target_index": "int64",
    "defense": "str",
    "batch_size": "int64",
    "mode": "str",
    "dataset": "str",
    "model": "str",
    "seed": "int64",
    "mse": "float64",
    "psnr": "float64",
    "ssim": "float64",
    "lpips_alex": "float64",
    "lpips_vgg": "float64",
    "label_acc": "float64",
    "true_label": "Int64",
    "pred_label": "Int64",
    "scored_against": "str",
    "seconds": "float64",
    "iterations": "int64",
    "status": "str",
    "message": "str",
    "label_method": "str",
    # The attack's own numbers as JSON (e.g. a learned attack's training epochs and time).
    "diagnostics": "str",
    # Matching loss at the start and the end of an optimisation attack (NaN without one) and
    # whether it converged (1.0 / 0.0 / NaN; rule: fedleak.attacks.types.converged).
    "loss_start": "float64",
    "loss_final": "float64",
    "converged": "float64",
    # The row comes from a reference baseline (aux-mean): the report's floor, never ranked.
    "reference": "bool",
    # The language task: what was reconstructed ("image" / "tokens"), and the text metrics
    # (NaN on image rows, as the image metrics are on text rows).
    "modality": "str",
    "token_acc": "float64",
    "rouge1": "float64",
    "rouge2": "float64",
    "rougeL": "float64",
}
# Image-only integer columns, empty (NA) on token rows as the image metrics are NaN there; image
# rows keep -1 where no label is known.
TEXT_EMPTY = ("true_label", "pred_label")
# Values of columns a run written before they existed reads as (default: -1 / NaN / '').
MISSING_COLUMN_VALUES: Mapping[str, object] = {"modality": "image"}

# Reference baselines of run directories written before the `reference` column existed.
LEGACY_REFERENCES = ("aux-mean",)

UTILITY_COLUMNS: Mapping[str, str] = {
    "round": "int64",
    "test_loss": "float64",
    "test_accuracy": "float64",
    "epsilon": "float64",
    "central_epsilon": "float64",
    "num_replies": "int64",
    "num_failures": "int64",
    "round_seconds": "float64",
    "attack_seconds": "float64",
    "payload_mb": "float64",
}

# Runs written before the one status rule may also hold "timeout" rows; new rows may not.
STATUSES = ("ok", "failed", "nan")
# "unavailable": a reconstruction without ground truth (a foreign client that declared no batch).
SCORED_AGAINST = ("original", "encoded", "unavailable")

CONFIG_FILE = "config.toml"
ENVIRONMENT_FILE = "environment.json"
# The entries of environment.json that fedleak writes as objects and reads by key.
ENVIRONMENT_OBJECTS = ("data", "lpips")
# environment.json's name of an audited app's strategy (`module.Class`); null for a run of
# fedleak's own clients (absent: a run from before it was recorded).
AUDITED_STRATEGY_KEY = "audited_strategy"
# environment.json's note of why a DP-SGD run reports no ε.
NO_EPSILON_KEY = "no_epsilon"
# environment.json's record of every parameter each attack ran with (config.toml: as given).
ATTACK_SETTINGS_KEY = "attacks"
# What a run directory records, as a number in environment.json: raise it when a new fedleak
# records what an older one did not and a resume relies on it (the federation's size and
# threads, the data's fingerprint, the attack seed stream: format 1). Older runs still report.
RUN_FORMAT = 1
RUN_FORMAT_KEY = "run_format"
# environment.json's list of resumes under other software than the run began with.
RESUMED_WITH_KEY = "resumed_with"
LEAKAGE_FILE = "leakage.parquet"
LEAKAGE_CSV = "leakage.csv"
UTILITY_FILE = "utility.csv"
SUMMARY_FILE = "summary.md"
CHECKPOINT_FILE = "checkpoints/global.pt"
DONE_FILE = "DONE"
TEMP_SUFFIX = ".tmp"  # `atomic_write`'s files before their rename
FAILED_FILE = "FAILED"
LOCK_FILE = ".fedleak.lock"
# The lock a run holds on a cache folder of the user's: named apart, so that a cache folder a
# run has used is not taken for a run's folder (audit EJ1).
CACHE_LOCK_FILE = ".fedleak-cache.lock"
# Lists, inside a folder fedleak fills (report_files/), the files it wrote there.
OWNED_MANIFEST = ".fedleak-files"
# Settings a resumed run may change: how long it runs and bookkeeping, not what it measures.
RESUME_MAY_CHANGE = frozenset(
    {"sim.resume", "out-dir", "num-server-rounds", "sim.timeout", "attack.show-progress"}
    | {"sim.payload-budget-mb"}
)
# Of those, the ones that do not change what a run does (a sweep's rerun of a finished cell,
# which would not run more rounds, and the report's groups may ignore them).
RESUME_BOOKKEEPING = RESUME_MAY_CHANGE - {"num-server-rounds"}
# Optional columns: written only when the run asked for them (LPIPS backbones).
LPIPS_COLUMNS = {"alex": "lpips_alex", "vgg": "lpips_vgg"}


class RunDirectoryError(ValueError):
    """A run directory is missing, already used, or given rows it cannot record."""


class ForeignFileError(RunDirectoryError):
    """A file or link that fedleak did not write stands where it would write: refused before
    anything is written, and nothing of fedleak's is removed because of it."""


def _default(dtype: str) -> object:
    return {"int64": -1, "Int64": -1, "float64": math.nan, "str": "", "bool": False}[dtype]


def empty_frame(columns: Mapping[str, str]) -> pd.DataFrame:
    """A frame with no rows and the fixed columns and dtypes."""
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


def tidy(
    rows: Iterable[Mapping[str, object]],
    columns: Mapping[str, str],
    defaults: Mapping[str, object] | None = None,
    what: str = "row",
) -> pd.DataFrame:
    """Rows to a frame with exactly `columns`: missing values take `defaults`, then -1/NaN/''.

    An unknown key raises, so a typo in a producer cannot silently drop a measurement.
    """
    rows = list(rows)
    if not rows:
        return empty_frame(columns)
    data: dict[str, list[object]] = {name: [] for name in columns}
    for row in rows:
        unknown = sorted(set(row) - set(columns))
        if unknown:
            raise RunDirectoryError(
                f"{what} has unknown column(s) {', '.join(unknown)}; allowed: {', '.join(columns)}"
            )
        for name, dtype in columns.items():
            value = row.get(name)
            if value is None:
                value = (defaults or {}).get(name, _default(dtype))
            data[name].append(value)
    frame = pd.DataFrame(data)
    for name, dtype in columns.items():
        if dtype == "str":
            frame[name] = frame[name].astype(str)
        elif dtype == "float64":
            frame[name] = pd.to_numeric(frame[name], errors="raise").astype("float64")
        elif dtype == "bool":
            frame[name] = frame[name].astype(bool)
        else:
            frame[name] = frame[name].astype(dtype)
    return frame


def atomic_write(path: Path, data: bytes) -> None:
    """Write all of `data` to `path` or nothing: temp file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(fd, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.filename is None:  # write() and fsync() name no file: a full disk says which
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_synced(path: Path, text: str) -> None:
    """Append `text` to `path` and fsync it; a full disk names the file."""
    try:
        with path.open("ab") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        if error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def _csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode("utf-8")


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _unreadable(path: Path, error: Exception) -> RunDirectoryError:
    detail = one_line(f"{type(error).__name__}: {error}", 200)
    return RunDirectoryError(
        f"{path}: unreadable ({detail}); restore it or start the run again in a new out-dir"
    )


def _rounds_text(rounds: Sequence[int]) -> str:
    """1, 2, 5 as '1-2, 5'."""
    spans: list[list[int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def read_utility_csv(path: Path) -> pd.DataFrame:
    """`utility.csv` with its fixed dtypes (an absent file reads as no rows)."""
    if not path.exists():
        return empty_frame(UTILITY_COLUMNS)
    try:
        if not path.is_file():  # a named pipe would block the read
            raise OSError("not a regular file")
        data = path.read_bytes()
        # Written whole (atomic_write), so it ends with a newline: a cut file's last row
        # would otherwise read as a round with its missing fields empty.
        if data and not data.endswith(b"\n"):
            raise ValueError("its last row is cut short")
        return _typed_utility(pd.read_csv(io.BytesIO(data)))
    except Exception as error:  # pandas' parser errors, bad dtypes, a folder in its place
        raise _unreadable(path, error) from None


def _typed_utility(frame: pd.DataFrame) -> pd.DataFrame:
    # Columns added since a run was written (central_epsilon) read as their missing value.
    for name, dtype in UTILITY_COLUMNS.items():
        if name not in frame:
            frame[name] = _default(dtype)
    return frame.astype(dict(UTILITY_COLUMNS))[list(UTILITY_COLUMNS)]


def read_leakage_parquet(path: Path) -> pd.DataFrame:
    """`leakage.parquet` with its fixed dtypes (an absent file reads as no rows)."""
    if not path.exists():
        return empty_frame(LEAKAGE_COLUMNS)
    try:
        # Read by Python, not pyarrow: a path pyarrow cannot encode (a non-ASCII folder under
        # an ASCII locale) is a readable file all the same.
        return _typed_leakage(pd.read_parquet(io.BytesIO(path.read_bytes())))
    except Exception as error:  # pyarrow's errors, bad dtypes, a folder in its place
        raise _unreadable(path, error) from None


def _typed_leakage(frame: pd.DataFrame) -> pd.DataFrame:
    if "reference" not in frame:
        frame["reference"] = frame["attack"].isin(LEGACY_REFERENCES) if len(frame) else False
    # Columns added since a run was written (diagnostics) read as their missing value.
    for name, dtype in LEAKAGE_COLUMNS.items():
        if name not in frame:
            frame[name] = MISSING_COLUMN_VALUES.get(name, _default(dtype))
    return _empty_on_text(frame.astype(dict(LEAKAGE_COLUMNS))[list(LEAKAGE_COLUMNS)])


def _empty_on_text(frame: pd.DataFrame) -> pd.DataFrame:
    """`TEXT_EMPTY` columns emptied on token rows (runs written before read -1 there)."""
    frame.loc[frame["modality"] == "tokens", list(TEXT_EMPTY)] = pd.NA
    return frame


def lpips_column(frame: pd.DataFrame) -> str:
    """The LPIPS column to report: AlexNet's unless only VGG's was measured."""
    if "lpips_alex" in frame and frame["lpips_alex"].notna().any():
        return "lpips_alex"
    if "lpips_vgg" in frame and frame["lpips_vgg"].notna().any():
        return "lpips_vgg"
    return "lpips_alex"


def _parameter_of(key: str, attacks: set[str]) -> bool:
    """Whether flat `key` is a parameter of one of `attacks` (`attack.<name>.<param>`)."""
    return any(key.startswith(f"attack.{name}.") for name in attacks)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "attack"


@dataclass(frozen=True)
class Accounting:
    """What a resumed run's ε continues from: the rounds each client trained in, and central
    DP's aggregates released, by the number of clients sampled."""

    participation: Mapping[int, int]
    central_releases: Mapping[int, int]


class RunDirectory:
    """Reads and writes one run's directory; see the module docstring for the layout."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._config: RunConfig | None = None
        self._leakage: pd.DataFrame | None = None
        self._utility: pd.DataFrame | None = None
        # Whether leakage.csv is known to hold exactly the parquet's rows: written whole by
        # this object, so a later round can be appended to it (see `_store_leakage`).
        self._csv_whole = False

    @staticmethod
    def check_target(path: Path, resume: bool = False) -> None:
        """Refuse, before any work, a folder a new run must not write into: a file, a folder
        with someone else's files, or a finished-or-started run unless `resume` continues it.
        A new folder, an empty one and a run that recorded no round yet are fine."""
        path = Path(path)
        if not path.exists():
            if path.is_symlink():
                raise RunDirectoryError(f"{path}: a broken symbolic link; choose another out-dir")
            parent = next(p for p in path.parents if p.exists())
            if not parent.is_dir():
                raise RunDirectoryError(
                    f"{path}: cannot be created ({parent} is a file); choose another out-dir"
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise RunDirectoryError(
                    f"{path}: cannot be created ({parent} is not writable); choose another out-dir"
                )
            return
        if not path.is_dir():
            raise RunDirectoryError(f"{path}: exists and is not a folder; choose another out-dir")
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunDirectoryError(f"{path}: not writable (read-only); choose another out-dir")
        try:
            entries = sorted(entry.name for entry in path.iterdir() if entry.name != LOCK_FILE)
        except OSError as error:
            raise RunDirectoryError(f"{path}: cannot list the folder ({error.strerror})") from None
        if not entries:
            return
        if not is_run_directory(path):
            raise RunDirectoryError(
                f"{path}: not empty and not a fedleak run directory (it holds {entries[0]!r}"
                f"{f' and {len(entries) - 1} more' if len(entries) > 1 else ''}); fedleak writes "
                "only into a new or empty folder or one of its run directories"
            )
        if resume:
            return
        for name in (UTILITY_FILE, LEAKAGE_FILE):
            if (path / name).exists():
                raise RunDirectoryError(
                    f"{path}: already holds a run ({name}); resume it with sim.resume=true "
                    "(--set with fedleak run, --run-config with flwr run, in the settings "
                    "passed to fedleak.audit) or choose another out-dir"
                )

    @classmethod
    def create(
        cls, path: Path, config: RunConfig, environment: Mapping[str, object]
    ) -> RunDirectory:
        """Start a new run in `path` (created if needed); refuses a folder that holds records
        or files that are not fedleak's (`check_target`)."""
        path = Path(path)
        cls.check_target(path)
        if is_run_directory(path):
            # A run that failed before recording a round: nothing of its attempt may stay to
            # be read as this run's (reconstructions of an attack it does not run).
            cls(path).clear()
        path.mkdir(parents=True, exist_ok=True)
        # environment.json first: it marks the folder as a run directory (`is_run_directory`).
        env = {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "fedleak": _package_version(),
            RUN_FORMAT_KEY: RUN_FORMAT,
            **environment,
        }
        atomic_write(
            path / ENVIRONMENT_FILE, json.dumps(env, indent=2, default=str).encode("utf-8")
        )
        atomic_write(path / CONFIG_FILE, config.to_toml().encode("utf-8"))
        run = cls(path)
        run._config = config
        return run

    @classmethod
    def open(cls, path: Path) -> RunDirectory:
        """An existing run directory (to resume it or report on it)."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise RunDirectoryError(f"{path}: not a run directory (no {CONFIG_FILE})")
        refuse_linked_folders(path)
        return cls(path)

    @property
    def config(self) -> RunConfig:
        """The run's resolved configuration, parsed from config.toml."""
        if self._config is None:
            try:
                # What an earlier fedleak recorded reads as it ran (audit EB2).
                self._config = load_toml(self.path / CONFIG_FILE, recorded=True)
            except ConfigError as error:
                raise RunDirectoryError(
                    f"{error} (the run's own configuration); restore it or start the run again "
                    "in a new out-dir"
                ) from None
        return self._config

    def environment(self) -> dict[str, object]:
        """environment.json as written at creation ({} if absent)."""
        file = self.path / ENVIRONMENT_FILE
        if not file.exists():
            return {}
        try:
            if not file.is_file():  # a named pipe would block the read
                raise OSError(f"{file.name} is not a regular file")
            environment = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            raise _unreadable(file, error) from None
        if not isinstance(environment, dict):
            raise _unreadable(file, TypeError("not a JSON object"))
        for key in ENVIRONMENT_OBJECTS:
            if key in environment and not isinstance(environment[key], dict):
                kind = type(environment[key]).__name__
                raise _unreadable(file, TypeError(f"{key!r} is a {kind}, not a JSON object"))
        return environment

    # Records -----------------------------------------------------------------------------

    def _row_defaults(self) -> dict[str, object]:
        """Run-wide columns a producer may leave out, taken from the config."""
        config = self.config
        return {
            "defense": config.defense.label,
            "batch_size": config.train.batch_size,
            "mode": config.train.mode,
            "dataset": config.data.dataset,
            "model": config.model.name,
            "seed": config.seed,
            "scored_against": "original",
            "status": "ok",
            "modality": "image",
        }

    def append_round(
        self,
        server_round: int,
        leakage_rows: Sequence[Mapping[str, object]],
        utility_row: Mapping[str, object],
    ) -> None:
        """Record one finished round; rows of a round recorded before (a redo) are replaced.

        Leakage rows may leave out run-wide columns (defense, batch size, mode, data set,
        model, seed), which are filled from the config, and metrics, which become NaN.
        `leakage.parquet`/`.csv` are written first and `utility.csv` last, so a round counts
        as finished only when all of its rows are on disk.
        """
        self.check_present()
        for row in leakage_rows:
            if row.get("round", server_round) != server_round:
                raise RunDirectoryError(
                    f"leakage row round={row.get('round')}: expected round {server_round}"
                )
        if utility_row.get("round", server_round) != server_round:
            raise RunDirectoryError(
                f"utility row round={utility_row.get('round')}: expected round {server_round}"
            )
        new_leakage = self._leakage_frame(server_round, leakage_rows)
        new_utility = tidy(
            [{**utility_row, "round": server_round}],
            UTILITY_COLUMNS,
            {"num_failures": 0},
            "utility row",
        )

        leakage = self.leakage()
        later = not len(leakage) or server_round > leakage["round"].max()
        self._store_leakage(
            _concat(leakage[leakage["round"] != server_round], new_leakage),
            appended=new_leakage if later else None,
        )

        utility = self.utility()
        utility = utility[utility["round"] != server_round]
        utility = _concat(utility, new_utility).sort_values("round").reset_index(drop=True)
        atomic_write(self.path / UTILITY_FILE, _csv_bytes(utility))
        self._utility = utility

    def _leakage_frame(
        self, server_round: int, leakage_rows: Sequence[Mapping[str, object]]
    ) -> pd.DataFrame:
        frame = tidy(
            ({**row, "round": server_round} for row in leakage_rows),
            LEAKAGE_COLUMNS,
            self._row_defaults(),
            "leakage row",
        )
        self._check_values(frame)
        return _empty_on_text(frame)

    def _store_leakage(self, leakage: pd.DataFrame, appended: pd.DataFrame | None = None) -> None:
        """Write every row to leakage.parquet; leakage.csv gets only `appended` (a round after
        every recorded one) when it is known whole: rewriting tens of thousands of rows as
        text cost seconds a round, and the cost grew with every round. A crash mid-append
        leaves a torn line, which the next process's first write replaces."""
        order = ["round", "client_id", "attack"]
        leakage = leakage.sort_values(order, kind="stable").reset_index(drop=True)
        # LPIPS backbones the run did not ask for, or any on text, would be columns of NaN
        # only: leave them out of the files (they read back as NaN).
        data = self.environment().get("data")
        text = isinstance(data, dict) and data.get("modality") == "tokens"
        requested = () if text else self.config.metrics.lpips_nets
        unused = [c for net, c in LPIPS_COLUMNS.items() if net not in requested]
        written = leakage.drop(columns=unused)
        atomic_write(self.path / LEAKAGE_FILE, _parquet_bytes(written))
        if self._csv_whole and appended is not None:
            rows = appended.sort_values(order, kind="stable").drop(columns=unused)
            self._csv_whole = False  # until the append is complete (a full disk cuts it)
            append_synced(self.path / LEAKAGE_CSV, rows.to_csv(index=False, header=False))
            self._csv_whole = True
        else:
            atomic_write(self.path / LEAKAGE_CSV, _csv_bytes(written))
            self._csv_whole = True
        self._leakage = leakage

    @staticmethod
    def _check_values(frame: pd.DataFrame) -> None:
        for column, allowed in (("status", STATUSES), ("scored_against", SCORED_AGAINST)):
            bad = sorted(set(frame[column]) - set(allowed))
            if bad:
                raise RunDirectoryError(
                    f"leakage row {column}={bad[0]!r}: expected one of {', '.join(allowed)}"
                )

    def leakage(self) -> pd.DataFrame:
        """All leakage rows recorded so far (a copy)."""
        if self._leakage is None:
            path = self.path / LEAKAGE_FILE
            # Every recorded round writes it before utility.csv: without it the rounds that
            # utility.csv lists lost their rows, and reading none would lose them for good
            # (a resume rewrites leakage.csv) or report no leakage.
            recorded = self.utility()["round"]
            if len(recorded) and not path.exists():
                raise RunDirectoryError(
                    f"{path}: missing, though {UTILITY_FILE} records {len(recorded)} round(s), "
                    f"up to round {recorded.max()}; restore it or start the run again in a new "
                    "out-dir"
                )
            self._leakage = read_leakage_parquet(path)
        return self._leakage.copy()

    def utility(self) -> pd.DataFrame:
        """All utility rows recorded so far, one per finished round (a copy)."""
        if self._utility is None:
            self._utility = read_utility_csv(self.path / UTILITY_FILE)
        return self._utility.copy()

    def finished_rounds(self) -> int:
        """The last round recorded in utility.csv; 0 if none."""
        utility = self.utility()
        return int(utility["round"].max()) if len(utility) else 0

    def is_finished(self) -> bool:
        """Whether the run ended well: DONE is written (the run's end checked every round and
        found no failure) and every configured round is recorded. Rounds alone do not say it:
        a run killed after its last round was never checked."""
        if not (self.path / DONE_FILE).exists() or (self.path / FAILED_FILE).exists():
            return False
        return self.finished_rounds() >= self.config.num_server_rounds

    def failure(self) -> str:
        """Why the recorded rounds make a failed run ('' when they do not): every client
        failed in every round, or an attack failed on every update it was given."""
        utility, leakage = self.utility(), self.leakage()
        rounds = utility[utility["round"] > 0]  # round 0 is the initial model's evaluation
        if len(rounds) and (rounds["num_replies"] == 0).all():
            if (rounds["num_failures"] > 0).all():
                return f"every client failed in every one of the {len(rounds)} recorded rounds"
            return (
                f"no client replied in time in any of the {len(rounds)} recorded rounds (each "
                f"failed or did not answer within sim.timeout={self.config.sim.timeout:g} s)"
            )
        # Every such attack is named: the first alone hid the others (audit DM7).
        failed = []
        for attack in self.config.attack.names:
            rows = leakage[leakage["attack"] == attack]
            if len(rows) and (rows["status"] == "failed").all():
                message = next((m for m in rows["message"] if m), "no message")
                failed.append(
                    f"attack {attack} failed on every one of its {len(rows)} updates "
                    f"(first error: {one_line(message)})"
                )
        return "; ".join(failed)

    def failed_reason(self) -> str:
        """The reason FAILED records ('' when the run was not marked failed)."""
        if not (self.path / FAILED_FILE).is_file():  # a named pipe there would block the read
            return ""
        try:
            record = json.loads((self.path / FAILED_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return ""
        reason = record.get("reason") if isinstance(record, dict) else None
        return reason if isinstance(reason, str) else ""

    def check_present(self) -> None:
        """The run's folder is still there: the writers make the folders they write into, and
        a folder removed mid-run came back holding the later rounds and DONE, but no
        config.toml, so that nothing could resume or report it (audit DW1)."""
        if not (self.path / CONFIG_FILE).is_file():
            raise RunDirectoryError(
                f"{self.path}: removed during the run ({CONFIG_FILE} is gone); the run stops "
                "here, at its round's records"
            )

    def mark_done(self) -> None:
        """Write DONE: every configured round is recorded and the run did not fail."""
        self.check_present()
        (self.path / FAILED_FILE).unlink(missing_ok=True)
        rounds = {"rounds": self.config.num_server_rounds}
        atomic_write(self.path / DONE_FILE, json.dumps(rounds).encode("utf-8"))

    def mark_failed(self, reason: str) -> None:
        """Write FAILED with the reason (and no DONE): a sweep retries such a run. A folder
        removed mid-run is not made again for it."""
        if not self.path.is_dir():
            return
        (self.path / DONE_FILE).unlink(missing_ok=True)
        atomic_write(self.path / FAILED_FILE, json.dumps({"reason": reason}).encode("utf-8"))

    def clear(self) -> None:
        """Delete this run's own files, and nothing else, so that it can start again."""
        refuse_linked_folders(self.path)
        own = [CONFIG_FILE, ENVIRONMENT_FILE, LEAKAGE_FILE, LEAKAGE_CSV, UTILITY_FILE]
        own += [SUMMARY_FILE, CHECKPOINT_FILE, DONE_FILE, FAILED_FILE, "report.html", "report.md"]
        for name in own:
            (self.path / name).unlink(missing_ok=True)
            # A write cut short by a kill leaves its temporary file beside the target.
            target = self.path / name
            for left in target.parent.glob(f".{target.name}.*{TEMP_SUFFIX}"):
                left.unlink(missing_ok=True)
        for image in self.images():
            image.unlink()
        texts = self.path / "texts"
        if texts.is_dir():  # the language task's reconstructions, named as images are
            for text in texts.glob("r*_c*_*.json"):
                text.unlink()
        for pattern in ("*/*-inverter*.pt", f"*/*-inverter*{TEMP_SUFFIX}"):
            for cache in (self.path / "state").glob(pattern):
                cache.unlink()
        replace_owned_files(self.path / "report_files", {})
        for folder in (
            "checkpoints",
            "images",
            "texts",
            "report_files",
            *_subfolders(self.path / "state"),
            "state",
        ):
            _remove_if_empty(self.path / folder)

    # Images, checkpoints, state -----------------------------------------------------------

    def image_path(self, server_round: int, client_id: int, attack: str) -> Path:
        """Where `save_images` puts the grid of one round, client and attack."""
        return self.path / "images" / f"r{server_round:03d}_c{client_id:03d}_{_safe(attack)}.png"

    def save_images(
        self,
        server_round: int,
        client_id: int,
        attack: str,
        truth: torch.Tensor | None,
        reconstruction: torch.Tensor,
    ) -> Path:
        """A PNG grid: ground truth on the top row, the matched reconstructions below (only
        the reconstructions when there is no ground truth: a client that declared no batch).

        Both are [B, C, H, W] in matched order; values are clamped to [0, 1] (pass |x| for
        encodings in [-1, 1]). One channel is shown as gray.
        """
        from PIL import Image
        from torchvision.utils import make_grid

        shown = reconstruction if truth is None else truth
        if shown.ndim != 4 or shown.shape != reconstruction.shape:
            raise RunDirectoryError(
                f"save_images: truth {tuple(shown.shape)} and reconstruction "
                f"{tuple(reconstruction.shape)} must be equal [B, C, H, W] shapes"
            )
        rows = [reconstruction] if truth is None else [truth, reconstruction]
        both = torch.cat(rows).detach().float().cpu().clamp(0, 1)
        grid = make_grid(both, nrow=shown.shape[0], padding=2, pad_value=1.0)
        pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
        path = self.image_path(server_round, client_id, attack)
        atomic_write(path, buffer.getvalue())
        return path

    def images(self) -> list[Path]:
        """The saved image grids, sorted by name (round, client, attack)."""
        folder = self.path / "images"
        return sorted(folder.glob("r*_c*_*.png")) if folder.is_dir() else []

    def save_global_model(
        self,
        server_round: int,
        state_dict: Mapping[str, torch.Tensor],
        accounting: Accounting | None = None,
    ) -> None:
        """Save the global weights after `server_round` (call after `append_round`), with the
        privacy accounting up to it.

        Saving after the round's records means a crash in between resumes from the previous
        checkpoint and redoes the round, whose rows are then replaced.
        """
        self.check_present()
        buffer = io.BytesIO()
        state = {k: v.detach().cpu() for k, v in state_dict.items()}
        saved: dict[str, object] = {"round": int(server_round), "state_dict": state}
        if accounting is not None:
            saved["participation"] = {int(k): int(v) for k, v in accounting.participation.items()}
            saved["central_releases"] = {
                int(k): int(v) for k, v in accounting.central_releases.items()
            }
        torch.save(saved, buffer)
        atomic_write(self.path / CHECKPOINT_FILE, buffer.getvalue())

    def _read_checkpoint(self) -> object:
        """The checkpoint's unpickled content (tensors and plain values only), None without
        one."""
        file = self.path / CHECKPOINT_FILE
        if not file.exists():
            return None
        try:
            return load_tensors(file)
        except Exception as error:  # torch's unpickling errors, truncated zip files, ...
            raise _unreadable(file, error) from None

    def load_accounting(self) -> Accounting | None:
        """The privacy accounting the checkpoint holds; None for a checkpoint written before
        it held one (or none at all)."""
        file = self.path / CHECKPOINT_FILE
        saved = self._read_checkpoint()
        if not isinstance(saved, dict) or "participation" not in saved:
            return None
        counts = [saved.get("participation"), saved.get("central_releases")]
        if not all(
            isinstance(c, dict)
            and all(type(k) is int and type(v) is int and v >= 0 for k, v in c.items())
            for c in counts
        ):
            raise RunDirectoryError(
                f"{file}: its privacy accounting is not counts per client; restore it or "
                "start the run again in a new out-dir"
            )
        return Accounting(dict(counts[0]), dict(counts[1]))  # type: ignore[arg-type]

    def load_global_model(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(round, weights) of the last checkpoint, or None; loads tensors only (a pickle that
        asks for anything else is refused, never executed)."""
        file = self.path / CHECKPOINT_FILE
        if not file.exists():
            return None
        saved = self._read_checkpoint()
        state = saved.get("state_dict") if isinstance(saved, dict) else None
        server_round = saved.get("round") if isinstance(saved, dict) else None
        if (
            not isinstance(state, dict)
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
            or isinstance(server_round, bool)
            or not isinstance(server_round, int)
            or server_round < 0
        ):
            raise RunDirectoryError(
                f"{file}: not a fedleak checkpoint (expected a round and a state dict of "
                "tensors); restore it or start the run again in a new out-dir"
            )
        # The checkpoint is saved after its round's records, so these hold every round up to
        # it; a resume from a later checkpoint would skip the missing rounds for good.
        recorded = set(self.utility()["round"].tolist())
        missing = [r for r in range(1, server_round + 1) if r not in recorded]
        if missing:
            raise RunDirectoryError(
                f"{file}: is from round {server_round}, but {UTILITY_FILE} does not record "
                f"round(s) {_rounds_text(missing)}; restore both from one moment or start the "
                "run again in a new out-dir"
            )
        return server_round, dict(state)

    def check_records(self) -> None:
        """Refuse records that disagree on how far the run got: a checkpoint or DONE beyond
        the rounds utility.csv holds (a copy restored from an older moment, or cut short), which
        a report would read as a run that stopped early; and a folder a newer fedleak made."""
        self.check_not_newer()
        self.load_global_model()  # raises when the checkpoint is ahead of utility.csv
        done = self.path / DONE_FILE
        if not done.exists():
            return
        try:
            if not done.is_file():
                raise OSError("not a regular file")
            rounds = json.loads(done.read_text(encoding="utf-8")).get("rounds")
        except (OSError, ValueError, AttributeError, RecursionError):
            rounds = None
        recorded = self.finished_rounds()
        if isinstance(rounds, int) and recorded < rounds:
            raise RunDirectoryError(
                f"{done}: says the run ended after round {rounds}, but {UTILITY_FILE} records "
                f"rounds up to {recorded}; restore both from one moment or start the run again "
                "in a new out-dir"
            )

    def check_resume(self, config: RunConfig, recorded: RunConfig | None = None) -> None:
        """Refuse to continue this run with settings that would mix two studies in it: only
        more rounds and bookkeeping (`RESUME_MAY_CHANGE`) may differ; every difference is named.
        `recorded`: the run's settings as the caller normalised them (default: as stored)."""
        recorded = recorded or self.config
        stored, wanted = recorded.to_flat(), config.to_flat()
        # An attack added or dropped is named once, by `attack.names`, not once per parameter.
        one_sided = set(recorded.attack.names) ^ set(config.attack.names)
        changed = [
            f"{key}={wanted.get(key)!r} (the run has {stored.get(key)!r})"
            for key in dict.fromkeys([*stored, *wanted])
            if key not in RESUME_MAY_CHANGE
            and stored.get(key) != wanted.get(key)
            and not _parameter_of(key, one_sided)
        ]
        if changed:
            raise RunDirectoryError(
                f"{self.path}: was run with other settings; differing: {'; '.join(changed)}. "
                "Resuming would mix two studies in one directory: resume with the run's own "
                "settings (its config.toml), only more rounds, or choose another out-dir"
            )
        if config.num_server_rounds < self.config.num_server_rounds:
            raise RunDirectoryError(
                f"num-server-rounds={config.num_server_rounds} is fewer than the "
                f"{self.config.num_server_rounds} rounds {self.path} was run for; a resumed run "
                "may only add rounds"
            )
        finished = self.finished_rounds()
        if config.num_server_rounds < finished:
            raise RunDirectoryError(
                f"num-server-rounds={config.num_server_rounds} is fewer than the {finished} "
                f"rounds {self.path} already finished; a resumed run may only add rounds"
            )

    def check_format(self) -> None:
        """Refuse to continue a run whose records are not this fedleak's: one made before runs
        recorded their federation, data and format would pass every check a resume makes by
        having nothing to compare, and its rows would sit beside rows another version drew."""
        self.check_not_newer()
        recorded = self.environment().get(RUN_FORMAT_KEY)
        if recorded == RUN_FORMAT:
            return
        made = (
            "an older fedleak (its environment.json records no run format)"
            if recorded is None
            else f"a fedleak of another run format ({recorded!r})"
        )
        raise RunDirectoryError(
            f"{self.path}: was made by {made}; this one writes format {RUN_FORMAT} and cannot "
            "check that the resumed rounds would continue it: `fedleak report` still reads it; "
            "run the study again in a new out-dir"
        )

    def check_not_newer(self) -> None:
        """Refuse a folder a newer fedleak made: this one cannot tell what its records mean,
        so a report would misread them and a resume or a sweep start it over (audit EM2)."""
        recorded = self.environment().get(RUN_FORMAT_KEY)
        if type(recorded) is int and recorded > RUN_FORMAT:
            raise RunDirectoryError(
                f"{self.path}: was made by a newer fedleak (run format {recorded}; this one "
                f"knows formats up to {RUN_FORMAT}); report or continue it with that fedleak "
                "or a newer one"
            )

    def check_clients(self, num_clients: int, client_threads: int | None = None) -> None:
        """Refuse a federation of another size than the run's: the data's partitions depend
        on it, so resuming with other clients would mix two studies in one directory; and
        clients on another number of threads (when both are known): CPU reductions round
        differently, so the resumed rounds would not be those of an uninterrupted run."""
        environment = self.environment()
        recorded = environment.get("num_clients")
        if recorded is not None and int(recorded) != num_clients:  # type: ignore[call-overload]
            raise RunDirectoryError(
                f"{self.path}: was run with {recorded} clients, not {num_clients}; the data's "
                f"partitions depend on it: run it with {recorded} (--num-clients, num-clients "
                "in a sweep, num-supernodes with flwr run) or choose another out-dir"
            )
        threads = environment.get("client_threads")
        if threads is not None and client_threads is not None and threads != client_threads:
            raise RunDirectoryError(
                f"{self.path}: its clients computed on {threads} thread(s) each, these would on "
                f"{client_threads}; CPU sums round differently with another thread count, so "
                f"the resumed rounds would differ from an uninterrupted run: resume with "
                f"--client-cpus {threads} (client-cpus in a sweep, client-resources-num-cpus="
                f"{threads} in flwr run's --federation-config) or choose another out-dir"
            )

    def record_clients(self, num_clients: int, client_threads: int | None = None) -> None:
        """Note the federation's size and, when pinned, its clients' threads in
        environment.json (`check_clients` first)."""
        self.check_clients(num_clients, client_threads)
        federation = {"num_clients": num_clients}
        if client_threads is not None:
            federation["client_threads"] = client_threads
        self._note(federation)

    def record_resumed_with(self, changed: Sequence[str]) -> None:
        """Note in environment.json a resume under other software than the run began with
        (`changed`, e.g. 'torch 2.14.0 -> 2.14.1'): its rows then come from two versions."""
        earlier = self.environment().get(RESUMED_WITH_KEY)
        resumes = earlier if isinstance(earlier, list) else []
        self._note({RESUMED_WITH_KEY: [*resumes, list(changed)]})

    def record_no_epsilon(self, reason: str) -> None:
        """Note in environment.json why a DP-SGD run reports no ε: the report's utility
        table shows the reason beside its blank ε, not only the console at the run's start."""
        self._note({NO_EPSILON_KEY: reason})

    def _note(self, fields: Mapping[str, object]) -> None:
        """Add `fields` to environment.json, rewriting it only when one changes."""
        environment = self.environment()
        if any(environment.get(key) != value for key, value in fields.items()):
            environment.update(fields)
            atomic_write(
                self.path / ENVIRONMENT_FILE,
                json.dumps(environment, indent=2, default=str).encode("utf-8"),
            )

    def update_config(self, config: RunConfig) -> None:
        """Store the configuration a resumed run continues with (`check_resume` first). The
        run is running again: DONE or FAILED of its earlier end no longer holds."""
        for name in (DONE_FILE, FAILED_FILE):
            (self.path / name).unlink(missing_ok=True)
        atomic_write(self.path / CONFIG_FILE, config.to_toml().encode("utf-8"))
        self._config = config

    def state_dir(self, name: str) -> Path:
        """A folder under `state/` for caches that outlive a round (created if needed)."""
        folder = self.state_path(name)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def state_path(self, name: str) -> Path:
        """Where `state_dir` keeps `name`'s caches, without creating it."""
        return self.path / "state" / _safe(name)

    # Summary ------------------------------------------------------------------------------

    def write_summary(self) -> Path:
        """summary.md: a per-round table built from utility.csv and leakage.parquet alone."""
        config, leakage = self.config, self.leakage()
        table = round_table(self.utility(), leakage)
        mode, batch = attacked_protocol(leakage, config)
        if config.threat.view == "aggregate":
            # The rows record the attacked update's batch: the round's aggregate.
            batch = (
                f"batch size {config.train.batch_size} per client, attacked as the round's "
                "aggregate (threat.view = aggregate)"
            )
        lines = [
            f"# {config.name}",
            "",
            f"{config.data.dataset}, {config.model.name}, {mode}, "
            f"{batch}, defense `{config.defense.label}`, "
            f"attacks {', '.join(config.attack.names)}, seed {config.seed}; "
            f"{self.finished_rounds()} of {config.num_server_rounds} rounds finished.",
            "",
            "Leakage columns are medians over the attacked clients' scored samples, "
            "scored against the private originals; attack failures count attack runs that "
            "failed or never reached a finite matching loss (status `failed` or `nan`; a run "
            "that diverged after a finite step is scored at its last finite iterate).",
            "",
            markdown_table(table),
            "",
        ]
        failed = self.failed_reason()
        if failed:
            lines[4:4] = [f"**The run failed:** {failed}", ""]
        path = self.path / SUMMARY_FILE
        atomic_write(path, "\n".join(lines).encode("utf-8", "surrogateescape"))
        return path


def undeclared_rows(leakage: pd.DataFrame) -> pd.Series:
    """Which rows come from clients that declared no batch (an audited app's, `declare`
    not called): their mode and batch size are the attacks' assumption, not the client's."""
    if "scored_against" not in leakage:
        return pd.Series(False, index=leakage.index)
    return leakage["scored_against"].eq("unavailable")


def attacked_protocol(leakage: pd.DataFrame, config: RunConfig) -> tuple[str, str]:
    """The mode and the batch size the attacked clients' rows record, as summary.md says them;
    for clients that declared none, what the attacks assumed (audit EQ5)."""
    unknown = undeclared_rows(leakage)
    declared = leakage[~unknown]
    mode = recorded(declared, "mode", config.train.mode)
    batch = f"batch size {recorded(declared, 'batch_size', config.train.batch_size)}"
    if not unknown.any():
        return mode, batch
    examples = recorded(leakage[unknown], "batch_size", "?")
    assumed = f"attacked as one step over the {examples} examples each reported"
    if declared.empty:
        return "protocol not declared", assumed
    return mode, f"{batch}; clients that declared none {assumed}"


def recorded(leakage: pd.DataFrame, column: str, configured: object) -> str:
    """What the attacked clients' rows record (an audited app's clients declare their mode and
    batch size, whatever the settings say), else the setting."""
    values = sorted(set(leakage[column].dropna()))  # batch sizes in numeric order: 4, 16
    return ", ".join(str(v) for v in values) if values else str(configured)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedleak")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


def mark_failed_if_silent(path: Path, reason: str) -> None:
    """FAILED with `reason` in the run directory at `path`, unless it holds one already: a run
    whose process died, or whose engine crashed, wrote none and would read as merely stopped."""
    if is_run_directory(path) and not (Path(path) / FAILED_FILE).exists():
        # Not `open`: an engine that failed early left no config.toml to open it by.
        RunDirectory(path).mark_failed(reason)


def is_run_directory(path: Path) -> bool:
    """Whether `path` is a folder fedleak made for a run: its environment.json names fedleak."""
    if not (Path(path) / ENVIRONMENT_FILE).is_file():  # a named pipe would block the read
        return False
    try:
        environment = json.loads((Path(path) / ENVIRONMENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(environment, dict) and "fedleak" in environment


# The folders fedleak writes in a run directory (and deletes from when the run starts again).
OWN_FOLDERS: tuple[str, ...] = ("checkpoints", "images", "texts", "report_files", "state")


def refuse_linked_folders(path: Path) -> None:
    """Refuse a run directory in which one of fedleak's folders (or an attack's folder under
    `state/`) is a symbolic link: a run folder from elsewhere could point it at any folder of
    the user's, whose files starting the run again would delete and resuming it overwrite."""
    folders = [path / name for name in OWN_FOLDERS]
    state = path / "state"
    if state.is_dir() and not state.is_symlink():
        folders += sorted(state.iterdir())
    for folder in folders:
        if folder.is_symlink():
            raise ForeignFileError(
                f"{folder}: a symbolic link; expected fedleak's own folder (replace the link "
                "with a copy of its folder, or start the run in a new out-dir)"
            )


def replace_owned_files(folder: Path, files: Mapping[str, bytes]) -> None:
    """Make `files` (name -> bytes) the fedleak-written content of `folder`: write them, and
    delete what an earlier call wrote there and `files` no longer holds. Files fedleak did not
    write (not listed in the folder's manifest) are never touched."""
    folder = Path(folder)
    if folder.is_symlink():
        # A run folder from elsewhere could point it at any folder of the user's.
        raise ForeignFileError(f"{folder}: a symbolic link; expected fedleak's own folder")
    manifest = folder / OWNED_MANIFEST
    try:
        if manifest.exists() and not manifest.is_file():
            raise OSError("not a regular file")
        earlier = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        earlier = None
    if not isinstance(earlier, list):
        earlier = None
    for name in files:
        if Path(name).name != name or name in ("", ".", "..", OWNED_MANIFEST):
            raise RunDirectoryError(f"{name!r}: not a plain file name for {folder}")
        target = folder / name
        # Without a manifest (fedleak before 30 November 2026 kept none, or it was lost) the
        # figures of fedleak's names are taken as its own, as they were then.
        if target.is_symlink() or (earlier is not None and target.exists() and name not in earlier):
            raise ForeignFileError(
                f"{target}: exists and was not written by fedleak; move it away to write the report"
            )
    for name in earlier or []:
        if isinstance(name, str) and Path(name).name == name and name not in files:
            (folder / name).unlink(missing_ok=True)
    if not files:
        manifest.unlink(missing_ok=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    # The manifest is written before the files, so a crash midway never orphans one.
    atomic_write(manifest, json.dumps(sorted(files)).encode("utf-8"))
    for name, data in files.items():
        atomic_write(folder / name, data)


def _subfolders(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return [f"{folder.name}/{child.name}" for child in folder.iterdir() if child.is_dir()]


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # absent, or holds files that are not fedleak's
        folder.rmdir()


def _concat(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    if old.empty:
        return new.copy()
    if new.empty:
        return old.copy()
    return pd.concat([old, new], ignore_index=True)


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def round_table(utility: pd.DataFrame, leakage: pd.DataFrame) -> pd.DataFrame:
    """One row per round: accuracy, loss, ε and central ε (if any), median PSNR/SSIM/LPIPS per
    attack (token accuracy and ROUGE-1/L for the language task; leakage is often bimodal,
    where a mean misleads), failures."""
    rounds = sorted(set(utility["round"]) | set(leakage["round"]))
    lpips = lpips_column(leakage)
    ok = leakage[(leakage["status"] == "ok") & (leakage["scored_against"] == "original")]
    shown = [("psnr", "PSNR"), ("ssim", "SSIM"), (lpips, "LPIPS")]
    if ok["token_acc"].notna().any() and not ok["psnr"].notna().any():
        shown = [("token_acc", "token acc"), ("rouge1", "ROUGE-1"), ("rougeL", "ROUGE-L")]
    means = ok.groupby(["round", "attack"])[[c for c, _ in shown]].median()
    runs = leakage.drop_duplicates(["round", "client_id", "attack"])
    failed = runs[runs["status"] != "ok"].groupby("round").size()
    by_round = utility.set_index("round")
    has_epsilon = utility["epsilon"].notna().any()
    has_central = utility["central_epsilon"].notna().any()
    attacks = sorted(leakage["attack"].unique())
    records = []
    for r in rounds:
        rec: dict[str, object] = {"round": int(r)}
        u = by_round.loc[r] if r in by_round.index else None
        rec["accuracy"] = float(u["test_accuracy"]) if u is not None else math.nan
        rec["loss"] = float(u["test_loss"]) if u is not None else math.nan
        if has_epsilon:
            rec["ε"] = float(u["epsilon"]) if u is not None else math.nan
        if has_central:
            rec["central ε"] = float(u["central_epsilon"]) if u is not None else math.nan
        for attack in attacks:
            got = (r, attack) in means.index
            for metric, label in shown:
                rec[f"{attack} {label}"] = (
                    float(means.loc[(r, attack), metric]) if got else math.nan
                )
        rec["client failures"] = int(u["num_failures"]) if u is not None else 0
        rec["attack failures"] = int(failed.get(r, 0))
        records.append(rec)
    return pd.DataFrame.from_records(records)


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency such as tabulate)."""
    if frame.empty:
        return "_(no rows yet)_"
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = (
        "|"
        + "|".join(
            "---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in frame.columns
        )
        + "|"
    )
    body = [
        "| " + " | ".join(_fmt(v, digits).replace("|", "\\|") for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def console_line(
    server_round: int,
    utility_row: Mapping[str, object],
    leakage_rows: Sequence[Mapping[str, object]],
    prefix: str | None = None,
) -> str:
    """One compact progress line: `prefix` (default `round N`), accuracy, loss, then median
    PSNR/LPIPS (or token accuracy and ROUGE-L) per attack."""
    parts = [prefix or f"round {server_round}"]
    acc, loss = utility_row.get("test_accuracy"), utility_row.get("test_loss")
    if acc is not None:
        parts.append(
            f"acc {float(acc):.3f} loss {float(loss):.3f}"
            if loss is not None
            else f"acc {float(acc):.3f}"
        )
    for key, label in (("epsilon", "ε"), ("central_epsilon", "central ε")):
        eps = utility_row.get(key)
        if eps is not None and not math.isnan(float(eps)):
            parts.append(f"{label} {float(eps):.2f}")
    frame = tidy(
        leakage_rows, LEAKAGE_COLUMNS, {"status": "ok", "scored_against": "original"}, "leakage row"
    )
    lpips = lpips_column(frame)
    for attack in sorted(frame["attack"].unique()):
        rows = frame[frame["attack"] == attack]
        good = rows[(rows["status"] == "ok") & (rows["scored_against"] == "original")]
        unfinished = rows[rows["status"] != "ok"].drop_duplicates(["client_id"])
        diverged = int((unfinished["status"] == "nan").sum())
        if len(good) and good["token_acc"].notna().any():
            text = (
                f"{attack} token acc {_fmt(float(good['token_acc'].median()), 3)} "
                f"ROUGE-L {_fmt(float(good['rougeL'].median()), 3)}"
            )
        elif len(good):
            text = (
                f"{attack} PSNR {_fmt(float(good['psnr'].median()), 1)} "
                f"LPIPS {_fmt(float(good[lpips].median()), 3)}"
            )
        else:
            text = f"{attack} -"
        counts = (("failed", len(unfinished) - diverged), ("diverged", diverged))
        if notes := ", ".join(f"{n} {what}" for what, n in counts if n):
            text += f" ({notes})"
        parts.append(text)
    failures = utility_row.get("num_failures")
    if failures:
        parts.append(f"{int(failures)} client failures")
    return " | ".join(parts)
