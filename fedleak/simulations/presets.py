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

from fedleak.config import ConfigError, RunConfig, parse_toml

PRESETS_DIR = Path(__file__).parent / "presets"
_DESCRIPTION = "# description:"


def _names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.toml"))


def preset_path(name_or_path: str | Path) -> Path:
    """The file of a preset name (`lti-table`) or an existing TOML path; ConfigError otherwise."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"{candidate}: no such preset file")
        return candidate
    path = PRESETS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(
            f"preset {str(name_or_path)!r}: unknown; expected one of {', '.join(_names())} "
            "or a path to a .toml file"
        )
    return path


def describe(path: Path) -> str:
    """The text of the file's leading `# description:` comment ('' if it has none)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith(_DESCRIPTION):
            return stripped[len(_DESCRIPTION) :].strip()
        if stripped and not stripped.startswith("#"):
            break
    return ""


def _document(path: Path) -> dict[str, object]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


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
            f"preset {str(name_or_path)!r} is a sweep; run it with `fedleak sweep {name_or_path}`"
        )
    try:
        return parse_toml(path.read_text(encoding="utf-8"))
    except ConfigError as error:
        raise ConfigError(f"{path.name}: {error}") from None
