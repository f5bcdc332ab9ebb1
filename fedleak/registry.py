"""Named components (attacks, defenses, models, data sets), registered in code or by plugins.

One mechanism for all four kinds. In the same process, register with the kind's decorator,
e.g. `@register_attack("my-attack", config=MyConfig())`. A plugin installed as a package
declares a Python entry point in the kind's group, e.g. in its `pyproject.toml`:

    [project.entry-points."fedleak.attacks"]
    my-attack = "my_package.attack:MyAttack"

Every process that looks a name up (the `fedleak` command, Ray's attack workers and client
actors, the SuperLink's ServerApp) finds the plugin through its installed metadata, with no code
to run first: an unknown name loads the entry point of that name; listing the names loads them
all. Loading imports the object's module; if that import registered the name (the decorator
ran), that entry stands, otherwise the loaded object itself is adopted as the entry (each kind
says how). Built-in components register the same way, on first use.

Errors are one line: an unknown name names the setting, the value and the registered names; a
plugin that fails to load names its entry point and distribution. This module imports nothing
from fedleak but `settings`, so every room may use it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from fedleak.settings import ConfigError, shown

log = logging.getLogger(__name__)

E = TypeVar("E")


class UnknownNameError(ConfigError):
    """A name that no registry entry (built-in or plugin) carries."""


class PluginError(ConfigError):
    """An entry point that cannot be loaded or does not give a usable entry."""


class Registry(Generic[E]):
    """Entries of one kind by name, filled by built-ins, decorators and entry points.

    `adopt(name, obj)` turns what an entry point loaded into an entry when the import did not
    register one itself; `builtins` imports the modules that register the built-in entries.
    `forbidden` lists characters a name may not hold (those that join names in settings).
    """

    def __init__(
        self,
        kind: str,
        group: str,
        setting: str,
        *,
        adopt: Callable[[str, Any], E],
        builtins: Callable[[], object] | None = None,
        forbidden: str = ",",
    ) -> None:
        self.kind = kind
        self.group = group
        self.setting = setting
        self._adopt = adopt
        self._builtins = builtins
        self._forbidden = forbidden
        self._entries: dict[str, E] = {}
        self._tried: set[str] = set()
        self._broken: dict[str, PluginError] = {}
        self._lock = threading.RLock()
        self._builtins_loaded = builtins is None

    # -- registering ----------------------------------------------------------------------------
    def add(self, name: str, entry: E, *, replace: bool = False) -> E:
        """Register `entry` under `name`; a different entry under a taken name needs `replace`."""
        self._check_name(name)
        with self._lock:
            current = self._entries.get(name)
            if current is not None and current != entry and not replace:
                raise ConfigError(
                    f"{self.kind} {shown(name)!r} is already registered; pass replace=True to "
                    "override it"
                )
            self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget `name` (tests and interactive sessions)."""
        with self._lock:
            self._entries.pop(name, None)
            self._tried.discard(name)
            self._broken.pop(name, None)

    def _check_name(self, name: object) -> None:
        bad = (
            not isinstance(name, str)
            or not name
            or not name.isprintable()
            or any(c.isspace() or c in self._forbidden for c in name)
        )
        if bad:
            raise ConfigError(
                f"{self.kind} name {name!r}: expected a non-empty name without spaces or any of "
                f"{' '.join(self._forbidden)!r}"
            )

    # -- looking up -------------------------------------------------------------------------------
    def get(self, name: str) -> E:
        """The entry of `name`, loading a plugin of that name if needed; `UnknownNameError`."""
        self._load_builtins()
        with self._lock:
            if name not in self._entries and name not in self._tried:
                self._load_plugin(name)
            if name in self._entries:
                return self._entries[name]
            if name in self._broken:
                raise self._broken[name]
        raise UnknownNameError(
            f"{self.setting}={shown(name)!r}: unknown {self.kind}; expected one of "
            f"{', '.join(self.names())}"
        )

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.get(name)
        except UnknownNameError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> tuple[str, ...]:
        """Every registered name, plugins included (a plugin that fails to load is logged and
        left out; looking it up by name raises its error)."""
        self._load_builtins()
        with self._lock:
            for point in self._entry_points():
                if point.name not in self._entries and point.name not in self._tried:
                    try:
                        self._load_plugin(point.name)
                    except PluginError as error:
                        log.warning("%s", error)
            return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, E]]:
        """(name, entry) pairs, plugins included."""
        for name in self.names():
            yield name, self._entries[name]

    # -- loading ----------------------------------------------------------------------------------
    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        with self._lock:
            if not self._builtins_loaded:
                self._builtins_loaded = True
                assert self._builtins is not None
                self._builtins()

    def _entry_points(self) -> list[importlib.metadata.EntryPoint]:
        return list(importlib.metadata.entry_points(group=self.group))

    def _load_plugin(self, name: str) -> None:
        self._tried.add(name)
        points = [p for p in self._entry_points() if p.name == name]
        if not points:
            return
        point = points[0]
        where = f"entry point {point.name!r} = {point.value!r} in group {self.group!r}"
        if point.dist is not None:
            where += f" of {point.dist.name} {point.dist.version}"
        try:
            loaded = point.load()
            if name not in self._entries:  # else importing the module registered it
                self.add(name, self._adopt(name, loaded))
        except Exception as error:
            broken = PluginError(f"{self.kind} plugin: {where} failed to load: {_first(error)}")
            self._broken[name] = broken
            raise broken from None


def _first(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_object(path: str, setting: str) -> Any:
    """The object an import path `package.module:attribute` (Flower's convention) names."""
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"{setting}={path!r}: expected an import path package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ConfigError(
            f"{setting}={path!r}: cannot import {module_name!r} ({_first(error)})"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{setting}={path!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target
