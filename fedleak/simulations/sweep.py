"""Sweeps: many run configurations, each a normal run directory under one sweep directory.

A sweep file is TOML::

    # description: what the sweep measures
    [sweep]
    name = "defense-grid"        # the sweep directory's name (default: the file's stem)
    preset = "quickstart"        # optional base run preset (a name or a path)
    num-clients = 10             # simulated clients per cell
    parallel = 1                 # cells at once: 1 = one after another
    client-cpus = 1.0            # Ray resources per simulated client
    client-gpus = 0.0
    skip-unavailable-data = false  # true: a cell whose data set's files are absent is skipped

    [sweep.grid]                 # cartesian product of these flat keys' values
    "train.batch-size" = [1, 4]
    seed = [0, 1]

    [[sweep.cells]]              # explicit settings, each crossed with the grid
    "defense.spec" = "none"
    [[sweep.cells]]
    "defense.spec" = "prune:0.9"

    [base]                       # run-config keys on top of the preset (nested tables too)
    num-server-rounds = 2
    [base.attack]
    names = "ig"

Cells are the explicit cells (outer) crossed with the grid points (inner, last key fastest);
with only one of the two, its own list. A key may be set by the grid or by the cells, not
both. Overrides given to `run_sweep` (`fedleak sweep FILE --set key=value`) apply to every cell
last, e.g. to run a shipped sweep cheaply (fewer iterations, smaller auxiliary set), and
`cells` patterns (`--cells 'cell-00[0-3]-*'`, fnmatch on the cell ids, or on the ids with the
defense spelled as the runs record it) run a subset. Every cell is parsed and checked before
any run starts, its data split included (the auxiliary set, public pool and client partitions
for `num-clients` clients); bad files raise `SweepError` with one line.

Cells live in `<out>/<name>/cell-XXX-<short description>/`, listed with their status in
`sweep.json` (pending, queued, running, done, failed, skipped, or interrupted after Ctrl-C or
SIGTERM, which stop the running cells at their safe point).
A cell is finished when its run wrote DONE (every configured round recorded and checked); a
rerun skips finished cells, resumes interrupted ones from their finished rounds (as
`sim.resume`) and starts failed ones, or ones this machine cannot resume, again. With
`skip-unavailable-data`, cells whose data set is not on disk (e.g. CIFAR-10 offline) are
recorded as skipped instead of failing, and a later rerun tries them again.

With `parallel > 1`, that many cells run at once, each in its own process as its own Ray
driver. Point every cell at one Ray cluster by setting `RAY_ADDRESS` (e.g.
`ray start --head` on one machine, `ray start --address=HEAD:6379` on the others, then
`RAY_ADDRESS=HEAD:6379 fedleak sweep FILE`): the cells' clients then share the cluster's CPUs
and GPUs. Without it each cell starts a private Ray instance on this machine, so keep
`parallel x num-clients x client-cpus` within its cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from fedleak.config import ConfigError, RunConfig, canonical_key, flatten_toml, parse_flat
from fedleak.interrupt import last_words, stop_requests
from fedleak.lines import MAX_LINE, error_line
from fedleak.report import collect
from fedleak.report.collect import MANIFEST
from fedleak.report.lock import RunLock
from fedleak.report.progress import Progress, parallel_eta
from fedleak.report.rundir import (
    CHECKPOINT_FILE,
    LOCK_FILE,
    RESUME_BOOKKEEPING,
    RunDirectory,
    RunDirectoryError,
    atomic_write,
    is_run_directory,
    mark_failed_if_silent,
)
from fedleak.simulations.presets import load_preset, preset_path, read_preset_text
from fedleak.simulations.terminal import guard_worker_streams

SOURCE_COPY = "sweep.toml"
# Each cell's configuration is parsed and checked before any runs (about 0.05-0.25 s a cell
# here), so a grid of 10,000 cells sat silent for most of an hour before starting 10,000 runs.
MAX_CELLS = 2000
SWEEP_KEYS = (
    "name",
    "preset",
    "num-clients",
    "parallel",
    "client-cpus",
    "client-gpus",
    "skip-unavailable-data",
    "grid",
    "cells",
)
# Set by the sweep for every cell, so a sweep file may not set them.
_RESERVED = ("name", "out-dir", "sim.resume")
# Sweep settings that are no run's: given in a grid, cell or base, they name the wrong table.
_WHOLE_SWEEP = ("num-clients", "parallel", "client-cpus", "client-gpus", "skip-unavailable-data")
_SHORT = {
    "train.batch-size": "B",
    "seed": "seed",
    "num-server-rounds": "R",
    "attack.clients-per-round": "c",
}
_VALUE_ONLY = (
    "defense.spec",
    "attack.names",
    "model.name",
    "data.dataset",
    "train.mode",
    "threat.share",
)

Runner = Callable[[RunConfig, Path], Path]


class SweepError(ConfigError):
    """A sweep file is invalid, or its directory holds cells of a different sweep."""


class SweepFailed(RuntimeError):
    """Some cells failed; the finished ones are kept and a rerun retries the rest."""

    def __init__(self, message: str, sweep_dir: Path) -> None:
        super().__init__(message)
        self.sweep_dir = sweep_dir


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: its directory name, the keys it sets, its configuration."""

    index: int
    id: str
    overrides: Mapping[str, Any]
    config: RunConfig
    defense_label: str  # as the cell's run records it (its spec in canonical form)


@dataclass(frozen=True)
class SweepPlan:
    """A parsed, fully checked sweep file."""

    name: str
    source: Path
    num_clients: int
    parallel: int
    client_cpus: float
    client_gpus: float
    skip_unavailable_data: bool
    base: RunConfig
    command_line: Mapping[str, Any]  # the --set overrides, applied to the base and every cell
    cells: tuple[Cell, ...]
    # The sweep's other cells, which `--cells` left out: sweep.json keeps listing them.
    unselected: tuple[Cell, ...] = ()

    @property
    def varying(self) -> tuple[str, ...]:
        """The keys the cells set, in first-seen order, but those the command line fixes."""
        keys: dict[str, None] = {}
        for cell in self.cells:
            keys.update(dict.fromkeys(k for k in cell.overrides if k not in self.command_line))
        return tuple(keys)


def _slug(overrides: Mapping[str, Any]) -> str:
    """A short description of a cell that is a valid run name, e.g. `prune-0.9_B4_seed1`."""
    parts = []
    for key, value in overrides.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        label = "" if key in _VALUE_ONLY else _SHORT.get(key, key.rsplit(".", 1)[-1] + "-")
        part = f"{label}{text}".replace(",", "-").replace(":", "-")
        parts.append(re.sub(r"[^A-Za-z0-9.+-]+", "", part))
    slug = "_".join(part for part in parts if part)
    # The id ("cell-NNN-" + slug) must fit the run-name limit of 100 characters.
    return slug[:88].rstrip("_-.") or "base"


def _int(section: Mapping[str, Any], key: str, default: int, low: int) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 2**31:
        big = isinstance(value, int) and value.bit_length() > 200
        shown = f"an integer of {value.bit_length()} bits" if big else repr(value)
        bound = " and <= 2**31" if isinstance(value, int) and value > 2**31 else ""
        raise SweepError(f"sweep.{key}={shown}: expected an integer >= {low}{bound}")
    return value


def _float(section: Mapping[str, Any], key: str, default: float, *, positive: bool) -> float:
    value = section.get(key, default)
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        sign = ">" if positive else ">="
        raise SweepError(f"sweep.{key}={value!r}: expected a finite number {sign} 0")
    return float(value)


def _bool(section: Mapping[str, Any], key: str) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise SweepError(f"sweep.{key}={value!r}: expected true or false")
    return value


def _check_key(where: str, key: str) -> None:
    if key.replace("_", "-") in _RESERVED:  # settings take `out_dir` for `out-dir`
        why = " (rerunning the sweep resumes its interrupted cells)" if key == "sim.resume" else ""
        raise SweepError(f"{where}.{key}: set by the sweep for each cell{why}; remove it")
    if key.replace("_", "-") in _WHOLE_SWEEP:
        # Not a run setting: "did you mean train.min-clients?" pointed elsewhere (audit EI6).
        raise SweepError(
            f"{where}.{key}: a setting of the whole sweep, one value per sweep file ([sweep] "
            f"{key.replace('_', '-')} = ...); write a sweep file per value"
        )


def _defense_form(value: Any) -> Any:
    """A defense spec as a run records it: two spellings of one pipeline are one cell."""
    from fedleak.server.validate import canonical_spec

    return canonical_spec(value) if isinstance(value, str) else value


def _applied_order(value: Any) -> Any:
    """A defense spec's steps as written, in the order they apply (`sign+prune:0.9` names
    `prune:0.9+sign`); the recorded form where a step's name is not written as recorded."""
    if not isinstance(value, str):
        return value
    recorded = _defense_form(value)
    applied = [step.split(":")[0] for step in recorded.split("+")]
    written = [step.strip() for step in value.split("+")]
    names = [step.split(":")[0].lower() for step in written]
    if sorted(names) != sorted(applied):
        return recorded
    return "+".join(sorted(written, key=lambda step: applied.index(step.split(":")[0].lower())))


def _canonical(flat: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`flat` under the keys its settings are recorded by: `train.batch_size` compared as
    `train.batch-size` with the grid's keys and named so in the cell's id (audit DO2: a cell
    was labelled and recorded with the grid's value while an override ran another)."""
    keyed: dict[str, Any] = {}
    written: dict[str, str] = {}
    for key, value in flat.items():
        _check_key(where, key)  # named as written
        canonical = canonical_key(key) if isinstance(key, str) else key
        if canonical in keyed:
            raise SweepError(
                f"{where}: {written[canonical]} and {key} name the same setting; give it once"
            )
        keyed[canonical], written[canonical] = value, key
    return keyed


def _grid(raw: Any) -> dict[str, list[Any]]:
    if not isinstance(raw, dict):
        raise SweepError(f"sweep.grid={raw!r}: expected a table of key = [values]")
    grid: dict[str, list[Any]] = {}
    for key, values in _canonical(flatten_toml(raw, where="sweep.grid"), "sweep.grid").items():
        if not isinstance(values, list):
            raise SweepError(f"sweep.grid.{key}={values!r}: expected a list of values")
        if not values:
            raise SweepError(f"sweep.grid.{key}: empty list; give at least one value")
        same = _defense_form if key == "defense.spec" else (lambda value: value)
        for i, value in enumerate(values):
            if same(value) in [same(v) for v in values[:i]]:
                raise SweepError(f"sweep.grid.{key}: lists {value!r} more than once")
        grid[key] = values
    return grid


def _cells(raw: Any, grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise SweepError("sweep.cells: expected [[sweep.cells]] tables of key = value")
    cells = []
    for number, table in enumerate(raw, start=1):
        where = f"sweep.cells #{number}"
        cell = _canonical(flatten_toml(table, where=where), where)
        for key, value in cell.items():
            if key in grid:
                raise SweepError(
                    f"sweep.cells #{number}: {key}={value!r} clashes with sweep.grid.{key}; "
                    "set a key in the grid or in the cells, not both"
                )
            if isinstance(value, list):
                raise SweepError(
                    f"sweep.cells #{number}: {key}={value!r}: a cell sets one value; put lists "
                    "in [sweep.grid]"
                )
        cells.append(cell)
    return cells


def _base(document: Mapping[str, Any], section: Mapping[str, Any]) -> RunConfig:
    preset = section.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise SweepError(f"sweep.preset={preset!r}: expected a preset name or path")
    try:
        base = load_preset(preset) if preset else RunConfig()
    except ConfigError as error:  # a sweep named as the base, a typo
        raise SweepError(f"sweep.preset={preset!r}: {error}") from None
    table = document.get("base", {})
    if not isinstance(table, dict):
        raise SweepError("base: expected a table of run-config keys")
    flat = flatten_toml(table, where="base")
    for key in flat:
        _check_key("base", key)
    try:
        return parse_flat(flat, base)
    except ConfigError as error:
        raise SweepError(f"base: {error}") from None


def _overrides(raw: Mapping[str, Any] | None, grid: Mapping[str, list[Any]]) -> dict[str, Any]:
    overrides = _canonical(raw or {}, "--set")
    for key in overrides:
        if key in grid:
            raise SweepError(
                f"--set {key}: the sweep's grid varies {key}; an override would make its cells "
                "identical"
            )
    return overrides


def _names(cell: Cell) -> tuple[str, ...]:
    """What `--cells` patterns match: the cell's id, and the id its defense gives as its
    rows, report and sweep.json name it (`DPSGD:2:1e0`, a folder `...-DPSGD-2-1e0`, is
    `dpsgd:2:1` there)."""
    spec = cell.overrides.get("defense.spec")
    if not isinstance(spec, str):
        return (cell.id,)
    recorded = {**cell.overrides, "defense.spec": _defense_form(spec)}
    return (cell.id, f"cell-{cell.index:03d}-{_slug(recorded)}")


def _matches(cell: Cell, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in _names(cell))


def _select(cells: list[Cell], patterns: Sequence[str] | None) -> tuple[Cell, ...]:
    if not patterns:
        return tuple(cells)
    # Each pattern must match: a mistyped one beside others would drop its cells unsaid.
    for pattern in patterns:
        if not any(_matches(c, pattern) for c in cells):
            raise SweepError(
                f"--cells {pattern}: matches none of the cell ids ({cells[0].id}, ...); "
                "patterns are fnmatch globs such as 'cell-003-*' or '*-B4_*'"
            )
    return tuple(c for c in cells if any(_matches(c, p) for p in patterns))


def load_sweep(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    cells: Sequence[str] | None = None,
) -> SweepPlan:
    """Parse and check a sweep file (a path, or a shipped sweep preset's name); `overrides`
    (flat run-config keys) apply to the base and to every cell, after the cell's own keys;
    `cells` (fnmatch patterns on cell ids) keeps only the matching cells, ids unchanged."""
    from fedleak.server.validate import canonical, resume_form

    source = preset_path(path)
    try:
        document = tomllib.loads(read_preset_text(source))
    except (ValueError, RecursionError) as error:  # TOMLDecodeError, a number too long, nesting
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SweepError(f"{source}: not valid TOML: {first}") from None
    if "sweep" not in document and "base" not in document:
        raise SweepError(
            f"{source}: a run preset, not a sweep file (no [sweep] table); run it with "
            f"`fedleak run {path}`"
        )
    extra = sorted(set(document) - {"sweep", "base"})
    if extra:
        raise SweepError(
            f"{extra[0]}: unknown top-level key in a sweep file; expected [sweep] and [base]"
        )
    section = document.get("sweep")
    if not isinstance(section, dict):
        raise SweepError(f"{source}: not a sweep file (no [sweep] table)")
    unknown = sorted(set(section) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(
            f"sweep.{unknown[0]}: unknown sweep setting; expected one of {', '.join(SWEEP_KEYS)}"
        )
    name = section.get("name", source.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SweepError(f"sweep.name={name!r}: expected letters, digits, '.', '_' or '-'")
    grid = _grid(section.get("grid", {}))
    explicit = _cells(section.get("cells", []), grid)
    if not grid and not explicit:
        raise SweepError("sweep: no cells; give [sweep.grid] values or [[sweep.cells]] tables")
    extra = _overrides(overrides, grid)
    base = _base(document, section)
    if extra:
        try:
            base = parse_flat(extra, base)
        except ConfigError as error:
            raise SweepError(f"--set: {error}") from None

    count = math.prod(len(values) for values in grid.values()) * max(len(explicit), 1)
    if count > MAX_CELLS:
        made = [*(f"{len(values):,}" for values in grid.values())]
        made += [f"{len(explicit):,} cells"] if explicit else []
        raise SweepError(
            f"sweep: {count:,} cells ({' x '.join(made)}); at most {MAX_CELLS:,} in one sweep "
            "file: split it into several"
        )
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    combos = [{**cell, **point} for cell in (explicit or [{}]) for point in points]
    planned: list[Cell] = []
    seen: dict[tuple[tuple[str, Any], ...], int] = {}
    for index, combo in enumerate(combos):
        # A --set on a key the cell sets wins, and the cell's id and record say so: a cell
        # labelled with the value it did not run would mislabel its rows.
        overrides = {key: extra.get(key, value) for key, value in combo.items()}
        label = f"cell {index} ({', '.join(f'{k}={v!r}' for k, v in overrides.items())})"
        try:
            config = parse_flat({**overrides, **extra}, base)
        except ConfigError as error:
            raise SweepError(f"{label}: {error}") from None
        # The sweep decides which cells resume (a base preset may be a resumed run's record).
        config = dataclasses.replace(config, sim=dataclasses.replace(config.sim, resume=False))
        # A defense is named in the order its steps apply, as its rows and config.toml name it.
        named = {
            key: _applied_order(value) if key == "defense.spec" else value
            for key, value in overrides.items()
        }
        cell_id = f"cell-{index:03d}-{_slug(named)}"
        config = dataclasses.replace(config, name=cell_id)
        # As a resume compares runs: an attack parameter at its default, or one of an attack
        # the cell does not run, changes nothing.
        recorded = canonical(config)
        flat = resume_form(recorded).to_flat()
        key = tuple(sorted((k, repr(v)) for k, v in flat.items() if k != "name"))
        if key in seen:
            earlier = combos[seen[key]]
            differed = {k for k in set(combo) | set(earlier) if combo.get(k) != earlier.get(k)}
            overridden = sorted(differed & set(extra))
            if overridden:  # the file's cells differ; the command line made them one
                raise SweepError(
                    f"{label}: same configuration as cell {seen[key]} once --set gives "
                    f"{', '.join(overridden)} to every cell; drop that --set"
                )
            raise SweepError(f"{label}: same configuration as cell {seen[key]}; remove one")
        seen[key] = index
        label = recorded.defense.label
        planned.append(Cell(index, cell_id, overrides, config, label))
    selected = _select(planned, cells)
    chosen = {c.id for c in selected}
    return SweepPlan(
        name=name,
        source=source,
        num_clients=_int(section, "num-clients", 10, 1),
        parallel=_int(section, "parallel", 1, 1),
        client_cpus=_float(section, "client-cpus", 1.0, positive=True),
        client_gpus=_float(section, "client-gpus", 0.0, positive=False),
        skip_unavailable_data=_bool(section, "skip-unavailable-data"),
        base=base,
        command_line=extra,
        cells=selected,
        unselected=tuple(c for c in planned if c.id not in chosen),
    )


def _study_runner(
    config: RunConfig, path: Path, *, num_clients: int, client_cpus: float, client_gpus: float
) -> Path:
    """The default cell runner: one in-process Flower simulation (module level: picklable)."""
    from fedleak.simulations.launch import run_study

    return run_study(
        config, num_clients=num_clients, client_cpus=client_cpus, client_gpus=client_gpus
    )


def _check_folders(sweep_dir: Path, paths: Mapping[str, Path]) -> None:
    """Refuse a sweep folder, or a cell folder, that holds files fedleak did not write
    (`RunDirectoryError`, exit 1, as `fedleak run` refuses its out-dir)."""
    if sweep_dir.exists():
        if not sweep_dir.is_dir():
            raise RunDirectoryError(
                f"{sweep_dir}: exists and is not a folder; choose another --out"
            )
        entries = [p.name for p in sweep_dir.iterdir() if p.name != LOCK_FILE]
        if entries and not (sweep_dir / MANIFEST).is_file():
            raise RunDirectoryError(
                f"{sweep_dir}: not empty and not a fedleak sweep directory (no {MANIFEST}); "
                "choose another --out or sweep name"
            )
    for path in paths.values():
        RunDirectory.check_target(path, resume=True)


def _validate(plan: SweepPlan, missing: dict[tuple[str, str], str]) -> None:
    """Check every cell as `fedleak run` would before Ray starts (registries, resources, the
    data split for the sweep's clients, what each attack needs); cells skipped for absent data
    are checked against the registries only."""
    from fedleak.data import DatasetUnavailable
    from fedleak.server.validate import validate_components, validate_run

    for cell in plan.cells:
        try:
            if plan.skip_unavailable_data and _unavailable(cell.config, missing):
                validate_components(cell.config)
                continue
            validate_run(cell.config, plan.num_clients, plan.client_cpus, plan.client_gpus)
        except ConfigError as error:
            raise SweepError(f"{cell.id}: {error}") from None
        except DatasetUnavailable as error:
            raise SweepError(
                f"{cell.id}: {error_line(error)} (set skip-unavailable-data = true in [sweep] "
                "to run the other cells)"
            ) from None


def _missing_data(config: RunConfig) -> str:
    """Why the cell's data set cannot be loaded without a download ('' when it can)."""
    from fedleak.server.validate import data_unavailable

    return data_unavailable(config)


def _unavailable(config: RunConfig, known: dict[tuple[str, str], str]) -> str:
    """`_missing_data`, asked once per (data set, data dir)."""
    key = (config.data.dataset, config.data.data_dir)
    if key not in known:
        known[key] = _missing_data(config)
    return known[key]


class _LabelledLines(io.TextIOBase):
    """Standard output whose lines start with a label: cells running at once print to one
    terminal, and an unlabelled `round 11/50` could belong to any of them.

    Each line reaches the stream whole, label included, in one write and flush: `print`
    writes a line and its newline separately, and another cell's process writing in between
    would splice the two lines together. A partial line waits for its end (or `close`)."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._label = label
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._pending + text).splitlines(keepends=True)
        self._pending = lines.pop() if lines and not lines[-1].endswith("\n") else ""
        if lines:
            # A blank line (the one a Ctrl-C message starts with) stays blank.
            labelled = (self._label + line if line.strip() else line for line in lines)
            self._stream.write("".join(labelled))
            self._stream.flush()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        """Write a last line that never ended."""
        if self._pending:
            self._stream.write(f"{self._label}{self._pending}\n")
            self._pending = ""
            self._stream.flush()
        super().close()


def _run_cell(
    runner: Runner, config: RunConfig, path: Path, label: str | None = None
) -> tuple[str, str, float]:
    """Run one cell; (status, message, seconds). Executed in a worker process when parallel,
    where `label` starts each line the cell prints, on standard output and error (a Ctrl-C
    reaches every running cell, and each says it stops)."""
    start = time.perf_counter()
    out = _LabelledLines(sys.stdout, label) if label else None
    err = _LabelledLines(sys.stderr, label) if label else None
    _cell_running.set()
    try:
        with contextlib.ExitStack() as redirected:
            if out and err:
                redirected.enter_context(contextlib.redirect_stdout(out))
                redirected.enter_context(contextlib.redirect_stderr(err))
            runner(config, path)
    except Exception as error:  # one cell's failure must not stop the others
        return "failed", error_line(error, MAX_LINE), time.perf_counter() - start
    finally:
        _cell_running.clear()
        for lines in (out, err):
            if lines:
                lines.close()
    seconds = time.perf_counter() - start
    if not _finished(path):
        done = RunDirectory.open(path).finished_rounds() if _is_run(path) else 0
        return (
            "failed",
            f"runner returned after {done} of {config.num_server_rounds} rounds",
            seconds,
        )
    return "done", "", seconds


def _start_worker() -> None:
    """A parallel sweep's worker process: between cells it ignores Ctrl-C, which would kill
    it and break the pool, ending the cells still running elsewhere abruptly (a cell's study
    takes SIGINT over while it runs, `fedleak.simulations.launch`); what its cells print
    must not end them, as in the sweep's own process (`guard_worker_streams`); and it ends
    with the sweep (`_end_with_the_sweep`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    guard_worker_streams()
    threading.Thread(target=_end_with_the_sweep, args=(os.getppid(),), daemon=True).start()


# How often a worker looks for its sweep, and how long a running cell's study then has to stop.
ORPHAN_POLL_SECONDS = 1.0
ORPHAN_GRACE_SECONDS = 10.0
_cell_running = threading.Event()  # set while a worker runs a cell


def _end_with_the_sweep(sweep: int) -> None:
    """A worker's watch over its sweep's process. Once that is gone (kill -9, the OOM
    killer), no one collects the cells' results: workers ran their cells to the end, a rerun
    found every cell "in use by another fedleak run", and they stayed alive after (audit
    ED2). A running cell's study gets a second Ctrl-C, which stops it at once with its
    finished rounds kept; the worker then ends, its own processes with it."""
    while os.getppid() == sweep:
        time.sleep(ORPHAN_POLL_SECONDS)
    if _cell_running.is_set():
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        # Outside its study the worker ignores SIGINT: the cell may need the grace to end.
        deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
        while _cell_running.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
    from fedleak.simulations.launch import terminate_descendants

    terminate_descendants()
    os._exit(1)


def _sigterm_as_ctrl_c(_signum: int, _frame: object) -> None:
    """A sweep's SIGTERM (a scheduler ending the job) is a terminal's Ctrl-C: SIGINT to the
    cells running in the pool's processes (idle ones ignore it) and to this process, where a
    study running in-process stops at its next safe point and otherwise the sweep stops
    between cells. A second SIGTERM is a second Ctrl-C. Without it a parallel sweep's cells
    would run on, orphaned, to their end."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError):
            os.kill(child.pid, signal.SIGINT)
    signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def _sigterm_stops_the_sweep() -> Iterator[None]:
    """`_sigterm_as_ctrl_c` while inside (main thread only: elsewhere Python's default stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_run(path: Path) -> bool:
    return (path / "config.toml").is_file()


def _finished(path: Path) -> bool:
    return _is_run(path) and RunDirectory.open(path).is_finished()


def _resumable_rounds(config: RunConfig, path: Path, plan: SweepPlan) -> tuple[int, str]:
    """The rounds an unfinished cell can go on from (0: start it over) and, where it has
    rounds it cannot go on from, why: none for a run that failed, has no checkpoint, or that
    this fedleak cannot resume bit for bit (its clients computed on another number of
    threads, its server on another device, an older fedleak made it)."""
    from fedleak.simulations.launch import client_threads
    from fedleak.simulations.study import check_resumable

    run = RunDirectory.open(path)
    try:
        if run.failed_reason():
            return 0, ""
        if not (path / CHECKPOINT_FILE).is_file() and not (run.utility()["round"] >= 1).any():
            return 0, ""  # stopped before its first checkpoint; one removed later is said
        # Also reads the checkpoint, and refuses one that is damaged or does not fit.
        check_resumable(config, path, plan.num_clients, client_threads(plan.client_cpus))
        return run.finished_rounds(), ""
    except (ConfigError, RunDirectoryError) as error:
        return 0, str(error).removeprefix(f"{path}: ")


def _check_existing(cell: Cell, path: Path, num_clients: int) -> None:
    """A cell folder from an earlier start must hold this very cell's configuration, run with
    as many clients (`RunDirectoryError`, exit 1, as a resume of `fedleak run` is refused)."""
    from fedleak.server.validate import canonical, resume_form

    RunDirectory.open(path).check_not_newer()  # its rounds must not be cleared as "not resumable"
    try:
        run = RunDirectory.open(path)
        stored = resume_form(canonical(run.config), recorded=True).to_flat()
    except (ConfigError, RunDirectoryError) as error:
        raise RunDirectoryError(f"{path}: unreadable cell configuration ({error})") from None
    # Both as a run records its settings (a defense's steps in order, cache folders absolute).
    # An attack parameter at its default, or of an attack not run, is no change (`resume_form`).
    wanted = resume_form(canonical(dataclasses.replace(cell.config, out_dir=str(path)))).to_flat()
    # A moved sweep folder is still the same sweep: where a cell was run is not its setting;
    # nor is bookkeeping a resumed run may change (a longer timeout after a cell timed out
    # was refused, audit EI2). More rounds are not: a finished cell would not run them.
    for key in dict.fromkeys([*wanted, *stored]):
        if key not in RESUME_BOOKKEEPING and stored.get(key) != wanted.get(key):
            raise RunDirectoryError(
                f"{path}: was run with {key}={stored.get(key)!r}, this sweep wants "
                f"{wanted.get(key)!r}; use another out dir or sweep name"
            )
    run.check_clients(num_clients)


def _write_manifest(sweep_dir: Path, plan: SweepPlan, status: Mapping[str, dict[str, Any]]) -> None:
    manifest = {
        "name": plan.name,
        "source": str(plan.source),
        "num_clients": plan.num_clients,
        "parallel": plan.parallel,
        "varying": list(plan.varying),
        "set": dict(plan.command_line),
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "cells": [
            {
                "id": cell.id,
                "index": cell.index,
                "overrides": dict(cell.overrides),
                # What the report lists for a cell not run yet, as its run would record it.
                "defense": cell.defense_label,
                "seed": cell.config.seed,
                "rounds": cell.config.num_server_rounds,
                **status[cell.id],
            }
            for cell in sorted((*plan.cells, *plan.unselected), key=lambda c: c.index)
        ],
    }
    # A fresh temporary file renamed over the manifest: a sweep folder from elsewhere may hold
    # links where fedleak writes, and writing through one changes the file it points to.
    atomic_write(sweep_dir / MANIFEST, json.dumps(manifest, indent=2, default=str).encode())


def read_manifest(sweep_dir: Path) -> dict[str, Any]:
    """`sweep.json` of a sweep directory (`fedleak.report.collect.read_manifest`), its
    problems as a SweepError."""
    try:
        return collect.read_manifest(sweep_dir)
    except RunDirectoryError as error:
        raise SweepError(str(error)) from None


def _say(line: str) -> None:
    print(line, flush=True)


def run_sweep(
    path: str | Path,
    *,
    out_dir: Path | None = None,
    runner: Runner | None = None,
    say: Callable[[str], None] = _say,
    overrides: Mapping[str, Any] | None = None,
    cells: Sequence[str] | None = None,
) -> Path:
    """Run every unfinished cell of a sweep file; return the sweep directory.

    `out_dir` defaults to `./runs`; the sweep directory is `<out_dir>/<sweep name>`. With the
    default runner (`fedleak.simulations.launch.run_study`) every cell is also checked against
    the component registries and its data split before anything runs. `overrides` apply to
    every cell and `cells` selects some (see `load_sweep`). Raises `SweepFailed` after the last
    cell if any cell failed. `say` receives one progress line per cell.
    """
    plan = load_sweep(path, overrides, cells)
    missing: dict[tuple[str, str], str] = {}
    if runner is None:
        _validate(plan, missing)
        runner = functools.partial(
            _study_runner,
            num_clients=plan.num_clients,
            client_cpus=plan.client_cpus,
            client_gpus=plan.client_gpus,
        )
    sweep_dir, paths = _checked_folders(plan, out_dir)
    with RunLock(sweep_dir):
        return _run_plan(plan, sweep_dir, paths, runner, say, missing)


def check_sweep(
    path: str | Path,
    *,
    out_dir: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    cells: Sequence[str] | None = None,
) -> list[str]:
    """Everything `run_sweep` checks before its first cell, with no cell run and nothing
    written; the lines that say what the sweep would do."""
    plan = load_sweep(path, overrides, cells)
    missing: dict[tuple[str, str], str] = {}
    _validate(plan, missing)
    sweep_dir, paths = _checked_folders(plan, out_dir)
    RunLock(sweep_dir).probe()
    states = _states(plan, paths, missing)
    count = {state: sum(s == state for s, _ in states.values()) for state in ("done", "pending")}
    return [
        f"sweep {plan.name}: {len(plan.cells)} cells checked, {count['pending']} to run "
        f"({count['done']} finished), {plan.num_clients} clients each, in {sweep_dir}",
        *(f"  would skip {line}" for line in _skipped_lines(states)),
    ]


def _states(
    plan: SweepPlan, paths: Mapping[str, Path], missing: dict[tuple[str, str], str]
) -> dict[str, tuple[str, str]]:
    """Each cell's state before the sweep runs, with why: done, skipped (its data set cannot
    be loaded and the sweep skips such cells) or pending."""
    states = {}
    for cell in plan.cells:
        if _finished(paths[cell.id]):
            states[cell.id] = ("done", "")
        elif plan.skip_unavailable_data and (reason := _unavailable(cell.config, missing)):
            states[cell.id] = ("skipped", reason)
        else:
            states[cell.id] = ("pending", "")
    return states


def _skipped_lines(states: Mapping[str, tuple[str, str]]) -> list[str]:
    """Per reason for skipping, the cells it skips: `N cells (first .. last): reason`."""
    skipped: dict[str, list[str]] = {}
    for cell_id, (state, reason) in states.items():
        if state == "skipped":
            skipped.setdefault(reason, []).append(cell_id)
    return [f"{_counted(ids)}: {reason}" for reason, ids in skipped.items()]


def _counted(ids: list[str]) -> str:
    """`1 cell (a)`, `2 cells (a, b)`, `3 cells (a, b, c)`, or `N cells (a, b, ..., z)`: a
    range would read as every cell between the first and the last."""
    if len(ids) == 1:
        return f"1 cell ({ids[0]})"
    shown = ", ".join(ids) if len(ids) <= 3 else f"{ids[0]}, {ids[1]}, ..., {ids[-1]}"
    return f"{len(ids)} cells ({shown})"


def _check_cache_owners(plan: SweepPlan) -> None:
    """Cells name their inverters' files alike (`<attack>-inverter-r<round>.pt`): one cache
    folder for two cells would mix them, and the second cell would start from the first's."""
    from fedleak.server.build import cache_dirs

    owners: dict[tuple[str, Path], str] = {}
    for cell in plan.cells:
        for name, folder in cache_dirs(cell.config).items():
            other = owners.setdefault((name, folder.resolve()), cell.id)
            if other != cell.id:
                raise SweepError(
                    f"{cell.id}: attack.{name}.cache-dir={str(folder)!r} is {other}'s too; "
                    "give each cell its own folder, or leave cache-dir unset (each cell's run "
                    "folder)"
                )


def _checked_folders(plan: SweepPlan, out_dir: Path | None) -> tuple[Path, dict[str, Path]]:
    """The sweep's folder and its cells', refused where a run must not write (see
    `_check_folders`, `_check_existing`)."""
    sweep_dir = (Path(out_dir) if out_dir else Path("runs")).resolve() / plan.name
    paths = {cell.id: sweep_dir / cell.id for cell in plan.cells}
    _check_folders(sweep_dir, paths)
    _check_cache_owners(plan)
    for cell in plan.cells:
        if _is_run(paths[cell.id]):
            _check_existing(cell, paths[cell.id], plan.num_clients)
    return sweep_dir, paths


def _run_plan(
    plan: SweepPlan,
    sweep_dir: Path,
    paths: Mapping[str, Path],
    runner: Runner,
    say: Callable[[str], None],
    missing: dict[tuple[str, str], str],
) -> Path:
    """`run_sweep` once its folders are checked and locked."""
    copy = sweep_dir / SOURCE_COPY
    if copy.is_symlink() or not (copy.exists() and copy.samefile(plan.source)):
        atomic_write(copy, plan.source.read_bytes())

    status: dict[str, dict[str, Any]] = {}
    old = (
        {c["id"]: c for c in read_manifest(sweep_dir)["cells"]}
        if (sweep_dir / MANIFEST).exists()
        else {}
    )
    states = _states(plan, paths, missing)
    for cell_id, (state, reason) in states.items():
        seconds = old.get(cell_id, {}).get("seconds") if state == "done" else None
        status[cell_id] = {"status": state, "message": reason, "seconds": seconds}
    # Cells that `--cells` left out keep what sweep.json said of them (a first run: pending).
    for cell in plan.unselected:
        before = old.get(cell.id, {})
        state = before.get("status", "pending")
        status[cell.id] = {
            "status": "interrupted" if state in ("running", "queued") else state,
            "message": before.get("message", ""),
            "seconds": before.get("seconds"),
        }
    pending = [cell for cell in plan.cells if states[cell.id][0] == "pending"]
    _write_manifest(sweep_dir, plan, status)

    say(f"sweep {plan.name}: {len(plan.cells)} cells, {len(pending)} to run, in {sweep_dir}")
    for line in _skipped_lines(states):
        say(f"  skipped {line}")

    skipped = sum(status[c.id]["status"] == "skipped" for c in plan.cells)
    # A parallel sweep's cells run side by side: its ETA schedules the cells left on the
    # workers at the mean time of the cells done here (`parallel_eta`).
    durations: list[float] = []
    started: dict[str, float] = {}
    queued: list[Cell] = []

    def side_by_side() -> float | None:
        if not durations:
            return None
        now = time.monotonic()
        running = [now - started[cell_id] for cell_id in started]
        mean = sum(durations) / len(durations)
        return parallel_eta(mean, running, len(queued), min(plan.parallel, len(pending)))

    progress = Progress(
        "cells",
        len(plan.cells) - skipped,
        len(plan.cells) - skipped - len(pending),
        estimate=side_by_side if plan.parallel > 1 and len(pending) > 1 else None,
    )

    def record(cell: Cell, result: tuple[str, str, float]) -> None:
        state, message, seconds = result
        started.pop(cell.id, None)
        if state == "done":
            durations.append(seconds)
        path = paths[cell.id]
        if state == "failed":
            # A cell whose process died wrote no FAILED: its report and the sweep's would
            # pool its rounds as a run that merely stopped early.
            mark_failed_if_silent(path, message)
        status[cell.id] = {"status": state, "message": message, "seconds": round(seconds, 3)}
        _write_manifest(sweep_dir, plan, status)
        progress.advance()
        say(
            f"  {cell.id}: {state} in {seconds:.1f} s"
            + (f" ({message})" if message else "")
            + f"; {progress.text()}"
        )

    def fresh(cell: Cell) -> RunConfig:
        # An interrupted cell goes on from its finished rounds, as `sim.resume` does; one that
        # failed, or cannot be resumed here, starts over. Only the run's own files go
        # (`_check_folders` refused folders with others' files).
        path = paths[cell.id]
        config = dataclasses.replace(cell.config, out_dir=str(path))
        if not is_run_directory(path):
            return config
        resumed = dataclasses.replace(config, sim=dataclasses.replace(config.sim, resume=True))
        done, why_not = _resumable_rounds(resumed, path, plan)
        if done:
            say(f"  {cell.id}: resuming after round {done}")
            return resumed
        if why_not:  # its finished rounds go: say so, where `fedleak run` would refuse
            # The reason's first clause: the rest advises a `fedleak run` user what to do.
            reason = why_not.split(";")[0]
            say(f"  {cell.id}: starting over, its rounds cannot be continued ({reason})")
        from fedleak.server.build import clear_cached_inverters

        RunDirectory(path).clear()
        clear_cached_inverters(config)  # the cell's own (no other cell shares its folders)
        return config

    def mark_interrupted() -> None:
        # After Ctrl-C, sweep.json must not go on saying that a cell runs or waits.
        for cell in pending:
            if status[cell.id]["status"] in ("running", "queued"):
                status[cell.id] = {"status": "interrupted", "message": "", "seconds": None}
        _write_manifest(sweep_dir, plan, status)

    try:
        with _sigterm_stops_the_sweep():
            if plan.parallel == 1 or len(pending) <= 1:
                for cell in pending:
                    status[cell.id] = {"status": "running", "message": "", "seconds": None}
                    _write_manifest(sweep_dir, plan, status)
                    say(f"  {cell.id}: running")
                    # Again for each cell: a study's Ray replaces the handler and leaves its own.
                    requests = stop_requests()
                    with _sigterm_stops_the_sweep(), last_words(mark_interrupted):
                        record(cell, _run_cell(runner, fresh(cell), paths[cell.id]))
                    if stop_requests() != requests:  # came after the cell's last safe point
                        if cell is not pending[-1]:
                            raise KeyboardInterrupt
                        # Nothing is left to stop: the sweep is whole and gets its report.
                        say("  stop requested after the last cell finished: the sweep is done")
            else:
                context = multiprocessing.get_context("spawn")
                workers = min(plan.parallel, len(pending))
                pool = ProcessPoolExecutor(
                    max_workers=workers, mp_context=context, initializer=_start_worker
                )
                try:
                    # Cells go to the pool one per free worker: the executor queues one call
                    # more than it has workers, and a queued call cannot be cancelled after a
                    # Ctrl-C.
                    queued[:] = pending
                    for cell in queued:
                        status[cell.id] = {"status": "queued", "message": "", "seconds": None}
                    running: dict[Future[tuple[str, str, float]], Cell] = {}
                    while queued or running:
                        while queued and len(running) < workers:
                            cell = queued.pop(0)
                            future = pool.submit(
                                _run_cell, runner, fresh(cell), paths[cell.id], f"{cell.id}: "
                            )
                            running[future] = cell
                            started[cell.id] = time.monotonic()
                            status[cell.id] = {
                                "status": "running",
                                "message": "",
                                "seconds": None,
                            }
                        _write_manifest(sweep_dir, plan, status)
                        finished, _ = wait(running, return_when=FIRST_COMPLETED)
                        for future in sorted(finished, key=lambda f: pending.index(running[f])):
                            cell = running.pop(future)
                            try:
                                result = future.result()
                            except Exception as error:  # the worker process itself died
                                result = ("failed", error_line(error, MAX_LINE), 0.0)
                            record(cell, result)
                finally:
                    # The running cells stop at their own safe point (a terminal's Ctrl-C
                    # reaches their processes too); nothing else starts.
                    pool.shutdown(wait=True, cancel_futures=True)
                    # A cell may reach its end before its safe point: it is done, not stopped.
                    for future, cell in running.items():
                        if not future.cancelled() and future.exception() is None:
                            record(cell, future.result())
    except BaseException:
        mark_interrupted()
        raise

    failed = [cell.id for cell in plan.cells if status[cell.id]["status"] == "failed"]
    if failed:
        first = status[failed[0]]["message"]
        others = failed[1:4] + (["..."] if len(failed) > 4 else [])
        also = f"; also {', '.join(others)}" if others else ""
        # Cells `--cells` left out count too: a retry of one failed cell said "no cell
        # finished" beside three finished ones (audit EI4).
        finished = any(entry["status"] == "done" for entry in status.values())
        kept = f"finished cells are kept in {sweep_dir}" if finished else "no cell finished"
        raise SweepFailed(
            f"{len(failed)} of {len(plan.cells)} cells failed ({failed[0]}: {first}{also}); "
            f"{kept}; rerun the sweep to retry the rest",
            sweep_dir,
        )
    return sweep_dir
