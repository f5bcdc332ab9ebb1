"""Presets shipped with the package: TOML files in `presets/`, runnable by name.

A preset is one of two kinds, told apart by its tables:

* a **run preset** holds run-config keys as nested tables (`[train] batch-size = 4`) and is
  loaded with `load_preset`;
* a **sweep preset** has a `[sweep]` table (see `fedleak.simulations.sweep` for the format) and
  is run with `fedleak sweep NAME` / `run_sweep`.

Each file starts with a `# description: ...` line, which `fedleak presets` lists.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedleak.config import MAX_TOML_BYTES, ConfigError, RunConfig, parse_toml
from fedleak.lines import first_line

PRESETS_DIR = Path(__file__).parent / "presets"
_DESCRIPTION = "# description:"
# A preset is a short text file; anything larger is almost surely the wrong file.
MAX_PRESET_BYTES = MAX_TOML_BYTES


def _names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.toml"))


def preset_path(name_or_path: str | Path) -> Path:
    """The file of a preset name (`lti-table`) or an existing TOML path; ConfigError otherwise.

    A bare shipped name means the shipped preset even where the working directory holds a file
    or folder of that name (a sweep run with `--out .` leaves one); `./name` reads the local one."""
    text = str(name_or_path)
    if not text or "\x00" in text:
        raise ConfigError(f"preset {text!r}: expected a preset name or a path to a .toml file")
    shipped = PRESETS_DIR / f"{text}.toml"
    if "/" not in text and not text.endswith(".toml") and shipped.is_file():
        return shipped
    candidate = Path(name_or_path)
    try:
        exists = candidate.exists()
    except OSError as error:  # a name too long for the file system, a loop of links, ...
        raise ConfigError(f"{text!r}: cannot read the preset file ({error.strerror})") from None
    if candidate.suffix == ".toml" or exists or "/" in text:
        if not exists:
            raise ConfigError(f"{candidate}: no such preset file")
        if not candidate.is_file():
            kind = "a folder" if candidate.is_dir() else "not a regular file"
            raise ConfigError(f"{candidate}: {kind}; expected a preset (.toml) file")
        return candidate
    raise ConfigError(
        f"preset {text!r}: unknown; expected one of {', '.join(_names())} or a path to a .toml file"
    )


def read_preset_text(path: Path) -> str:
    """A preset or sweep file's text; ConfigError (one line) when it cannot be read as UTF-8."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PRESET_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the preset file ({error.strerror})") from None
    if len(data) > MAX_PRESET_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_PRESET_BYTES // 1_000_000} MB; expected a TOML preset"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {error.start}); expected a TOML preset, saved as UTF-8"
        ) from None


def describe(path: Path) -> str:
    """The text of the file's leading `# description:` comment ('' if it has none)."""
    for line in read_preset_text(path).splitlines():
        stripped = line.strip()
        if stripped.startswith(_DESCRIPTION):
            return stripped[len(_DESCRIPTION) :].strip()
        if stripped and not stripped.startswith("#"):
            break
    return ""


def _document(path: Path) -> dict[str, object]:
    text = read_preset_text(path)
    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError) as error:  # TOMLDecodeError, a number too long, nesting
        raise ConfigError(f"{path}: not valid TOML: {first_line(error)}") from None


def is_sweep(name_or_path: str | Path) -> bool:
    """Whether a preset (name or path) is a sweep, i.e. has a `[sweep]` table."""
    return isinstance(_document(preset_path(name_or_path)).get("sweep"), dict)


def list_presets() -> dict[str, str]:
    """Shipped preset name -> its one-line description (sweeps say so)."""
    listed = {}
    for name in _names():
        path = PRESETS_DIR / f"{name}.toml"
        prefix = "[sweep] " if is_sweep(path) else ""
        listed[name] = prefix + describe(path)
    return listed


def load_preset(name_or_path: str | Path) -> RunConfig:
    """The run configuration of a run preset (a shipped name or a TOML path)."""
    path = preset_path(name_or_path)
    if is_sweep(path):
        raise ConfigError(
            f"preset {str(name_or_path)!r} is a sweep; check it with `fedleak sweep "
            f"{name_or_path} --check`, run it with `fedleak sweep {name_or_path}`"
        )
    from fedleak.report.rundir import CONFIG_FILE, is_run_directory  # torch: only when read

    # A run's own config.toml (the resume command's) reads as the run recorded it, in which an
    # earlier fedleak may have kept two spellings of a key (audit EC4).
    recorded = is_run_directory(path.parent) and path.name == CONFIG_FILE
    try:
        return parse_toml(read_preset_text(path), recorded=recorded)
    except ConfigError as error:
        raise ConfigError(f"{path.name}: {error}") from None
