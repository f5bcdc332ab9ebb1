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
says how). Built-in components register the same way, on first use; registering a name loads
them first, so taking a built-in name is refused at the registering line (or, with
`replace=True`, really replaces the built-in).

An entry point whose name is already taken (by a built-in, by code or by another plugin) never
runs in its place: looking that name up refuses in one line naming the distribution and the
entry point, listing the names logs the same refusal once.

Errors are one line: an unknown name names the setting, the value and the registered names; a
plugin that fails to load names its entry point and distribution. This module imports nothing
from fedleak but `settings` and `lines`, so every room may use it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from fedleak.lines import error_line
from fedleak.settings import ConfigError, close_names, shown, shown_value

log = logging.getLogger(__name__)

E = TypeVar("E")

# Who registered an entry: the built-in catalog, the entry point whose import registered it, or
# None for code (a decorator or call in the user's process).
BUILT_IN = "built-in"
Origin = str | importlib.metadata.EntryPoint | None


class UnknownNameError(ConfigError):
    """A name that no registry entry (built-in or plugin) carries."""


class PluginError(ConfigError):
    """An entry point that cannot be loaded or does not give a usable entry."""


class PluginFailed(ConfigError):
    """A plug-in's own code (a model factory, a data-set loader, an attack's factory) raised:
    one line naming the setting, the plug-in and the error, which chains the plug-in's
    traceback (shown with `--verbose`)."""


class RegistrationError(ConfigError, TypeError):
    """A registration (decorator or call) given an argument of the wrong type or value, refused
    at the registering line. A TypeError too, as Python's own refusal would be."""


@dataclasses.dataclass(frozen=True)
class PluginCall:
    """A plug-in's callable, guarded: what it raises (but fedleak's own one-line errors, which
    pass unchanged) becomes `PluginFailed`, `<where>: <role> raised <error's first line>`."""

    function: Callable[..., Any]
    where: str
    role: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.function(*args, **kwargs)
        except (Exception, SystemExit) as error:  # a script's sys.exit() ends no run
            if is_own_error(error):
                raise
            raise PluginFailed(f"{self.where}: {self.role} raised {error_line(error)}") from error


class Registry(Generic[E]):
    """Entries of one kind by name, filled by built-ins, decorators and entry points.

    `adopt(name, obj)` turns what an entry point loaded into an entry when the import did not
    register one itself; `builtins` imports the modules that register the built-in entries.
    `owner(entry)` is the user's object inside an entry (its factory), whose module tells
    whether an entry point of the same name is the plugin that registered it.
    `forbidden` lists characters a name may not hold (those that join names in settings);
    `lower_case` refuses capitals, for kinds whose settings are read in lower case.
    """

    def __init__(
        self,
        kind: str,
        group: str,
        setting: str,
        *,
        adopt: Callable[[str, Any], E],
        builtins: Callable[[], object] | None = None,
        owner: Callable[[E], object] | None = None,
        forbidden: str = ",",
        lower_case: bool = False,
    ) -> None:
        self.kind = kind
        self.group = group
        self.setting = setting
        self._adopt = adopt
        self._builtins = builtins
        self._owner: Callable[[E], object] = owner or (lambda entry: entry)
        self._forbidden = forbidden
        self._lower_case = lower_case
        self._entries: dict[str, E] = {}
        self._origins: dict[str, Origin] = {}
        self._tried: set[str] = set()
        self._broken: dict[str, PluginError] = {}
        self._lock = threading.RLock()
        # pending -> loading -> loaded; `loading` lets the catalog's own registrations through.
        self._builtins_state = "loaded" if builtins is None else "pending"
        self._loading: Origin = None  # what registrations made now are attributed to
        # Clash refusals by name (None: no clash), cached because reading the installed
        # metadata costs tens of milliseconds; read again when sys.path changes.
        self._clashes: dict[str, PluginError | None] = {}
        self._warned: set[str] = set()
        self._scanned_path: tuple[str, ...] = ()

    # -- registering ----------------------------------------------------------------------------
    def add(self, name: str, entry: E, *, replace: bool = False) -> E:
        """Register `entry` under `name`; a different entry under a taken name needs `replace`."""
        self.check_name(name)
        if not isinstance(replace, bool):
            raise self.refusal(name, f"replace={shown_value(replace)}: expected True or False")
        # Built-ins load lazily: load them now, so that taking a built-in name is refused here,
        # at the caller's line, and so that replace=True is not undone by the catalog later.
        self._load_builtins()
        with self._lock:
            current = self._entries.get(name)
            if current is not None and current != entry and not replace:
                raise ConfigError(
                    f"{self.kind} {shown(name)!r} is already registered ({self._taken_by(name)}); "
                    "choose another name, or pass replace=True to override it"
                )
            if current is None or current != entry:
                self._origins[name] = self._loading
                self._clashes.pop(name, None)  # another owner: check entry points again
            self._entries[name] = entry
        return entry

    def only_in_this_process(self, name: str) -> bool:
        """Whether `name` was registered by code in this process (a decorator or call) and no
        entry point carries it: other processes (Ray's clients and workers) would never know
        it. A plugin module imported here before its entry point was looked up (a model's
        import path naming it) counts as the entry point's."""
        with self._lock:
            if name not in self._entries or self._origins.get(name, BUILT_IN) is not None:
                return False
            return not any(point.name == name for point in self._entry_points())

    def source_file(self, name: str) -> str | None:
        """The file of the module that defines plug-in `name` (None for a built-in, or code
        without a file): a resume compares its contents with the run's first (audit DM3)."""
        entry = self.get(name)
        if self._origins.get(name, BUILT_IN) is BUILT_IN:
            return None
        module = inspect.getmodule(self._owner(entry))
        return getattr(module, "__file__", None)

    def remove(self, name: str) -> None:
        """Forget `name` (tests and interactive sessions)."""
        with self._lock:
            self._entries.pop(name, None)
            self._origins.pop(name, None)
            self._tried.discard(name)
            self._broken.pop(name, None)
            self._clashes.pop(name, None)
            self._warned.discard(name)

    def check_name(self, name: object) -> None:
        """Refuse (one line) a name that would break the settings that name entries."""
        bad = (
            not isinstance(name, str)
            or not name
            or not name.isprintable()
            or any(c.isspace() or c in self._forbidden for c in name)
        )
        if bad:
            raise RegistrationError(
                f"{self.kind} name {shown_value(name)}: expected a non-empty name without spaces "
                f"or any of {' '.join(self._forbidden)!r}"
            )
        if self._lower_case and name != name.lower():  # no setting could name it
            raise self.refusal(
                name, f"expected a lower-case name: {self.setting} is read in lower case"
            )

    def refusal(self, name: object, problem: str) -> RegistrationError:
        """The one-line refusal of a registration of `name`: `<kind> '<name>': <problem>`."""
        return RegistrationError(f"{self.kind} {shown(name)!r}: {problem}")

    def guarded(self, name: str, function: Callable[..., Any], role: str) -> Callable[..., Any]:
        """`function` (an entry's factory or loader) as the registry calls it: a plug-in's is
        wrapped in `PluginCall`, so that what it raises names the setting and the plug-in;
        fedleak's own functions stay bare, and their bugs stay internal errors."""
        module = _module_of(function)
        if module is not None and _package(module) == "fedleak":
            return function
        where = f"{self.setting}={shown(name)!r}"
        return PluginCall(function, where, f"the plug-in {self.kind}'s {role}")

    # -- looking up -------------------------------------------------------------------------------
    def get(self, name: str) -> E:
        """The entry of `name`, loading a plugin of that name if needed; `UnknownNameError`, or
        `PluginError` when an installed entry point carries the name but did not register it."""
        if not isinstance(name, str):  # a Python caller's slip: said as a setting's would be
            raise ConfigError(f"{self.setting}={name!r}: expected a name (a string)")
        self._load_builtins()
        with self._lock:
            if name not in self._entries and name not in self._tried:
                self._load_plugin(name)
            if name in self._entries:
                clash = self._clash(name)
                if clash is not None:
                    self._warned.add(name)  # refused: the error's own message (e.g.
                    raise clash  # naming the allowed forms) need not repeat it as a warning
                return self._entries[name]
            if name in self._broken:
                raise self._broken[name]
        # An entry point under this name in other capitals that fails to load (a capital in
        # a lower-case kind) says why, once, rather than suggesting the name typed; loaded
        # here, before listing the names would log its failure as well (audit DU3).
        with self._lock:
            for point in self._entry_points():
                if point.name == name or point.name.lower() != name.lower():
                    continue
                if point.name not in self._tried:
                    self._load_plugin(point.name)
                if point.name in self._broken:
                    raise self._broken[point.name]
        close = self.closest(name)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UnknownNameError(
            f"{self.setting}={shown(name)!r}: unknown {self.kind}; {hint}expected one of "
            f"{', '.join(self.names())}"
        )

    def closest(self, name: str) -> list[str]:
        """The registered names an unknown `name` was likely meant as (at most two): the same
        name in other capitals first, then the closest spellings."""
        names = self.names()
        exact = [known for known in names if known.lower() == name.lower()]
        return exact or close_names(name, names, 2)

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
        """Every registered name, plugins included (a plugin that fails to load, or whose name
        is taken, is logged once; looking its name up raises its error)."""
        self._load_builtins()
        with self._lock:
            points = self._entry_points()
            for point in points:
                if point.name not in self._entries and point.name not in self._tried:
                    try:
                        self._load_plugin(point.name, points)
                    except PluginError as error:
                        log.warning("%s", error)
            # A clash is logged, not raised: the listing feeds error messages, `config-keys`
            # and validation of other names, which must keep working for a user who does not
            # use the clashing name; looking that name up refuses.
            for name in dict.fromkeys(p.name for p in points if p.name in self._entries):
                clash = self._clash(name, points)
                if clash is not None and name not in self._warned:
                    self._warned.add(name)
                    log.warning("%s (looking %r up is refused until then)", clash, name)
            return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, E]]:
        """(name, entry) pairs, plugins included."""
        for name in self.names():
            yield name, self._entries[name]

    # -- loading ----------------------------------------------------------------------------------
    def _load_builtins(self) -> None:
        if self._builtins_state == "loaded":
            return
        with self._lock:  # other threads wait here until the catalog is complete
            if self._builtins_state != "pending":  # loaded, or this thread's catalog registering
                return
            self._builtins_state = "loading"
            previous, self._loading = self._loading, BUILT_IN
            try:
                assert self._builtins is not None
                self._builtins()
            finally:
                self._loading = previous
                self._builtins_state = "loaded"

    def _entry_points(self) -> list[importlib.metadata.EntryPoint]:
        return list(importlib.metadata.entry_points(group=self.group))

    def _load_plugin(
        self, name: str, points: list[importlib.metadata.EntryPoint] | None = None
    ) -> None:
        self._tried.add(name)
        matching = [
            p for p in (self._entry_points() if points is None else points) if p.name == name
        ]
        if not matching:
            return
        point = matching[0]
        previous, self._loading = self._loading, point  # what its import registers is its own
        try:
            before = set(self._entries)
            loaded = point.load()
            if name not in self._entries:  # else importing the module registered it
                # Registered under another name by its own decorator, it would be adopted
                # here without the settings it registered with.
                other = [
                    n
                    for n in self._entries
                    if n not in before and self._owner(self._entries[n]) is loaded
                ]
                if other:
                    raise ValueError(
                        f"it registers itself as {other[0]!r}, not {name!r}: give the entry "
                        f"point that name, or register it as {name!r}"
                    )
                self.add(name, self._adopt(name, loaded))
        # A module written as a script exits at import (a missing `if __name__ == "__main__"`,
        # argparse at module level): that ended every fedleak command silently, even with 0.
        except (Exception, SystemExit) as error:
            where = f"entry point {point.name!r} = {point.value!r} in group {self.group!r}"
            if point.dist is not None:
                where += f" of {point.dist.name} {point.dist.version}"
            broken = PluginError(f"{self.kind} plugin: {where} failed to load: {error_line(error)}")
            self._broken[name] = broken
            raise broken from None
        finally:
            self._loading = previous

    # -- clashes ----------------------------------------------------------------------------------
    def _clash(
        self, name: str, points: list[importlib.metadata.EntryPoint] | None = None
    ) -> PluginError | None:
        """The refusal of an installed entry point that carries the registered `name` but did
        not register it (it would otherwise be silently ignored), or None."""
        path = tuple(sys.path)
        if path != self._scanned_path:  # a new path may hold other distributions
            self._scanned_path = path
            self._clashes.clear()
            self._warned.clear()
        if name not in self._clashes:
            points = self._entry_points() if points is None else points
            strangers = [p for p in points if p.name == name and not self._registered_by(name, p)]
            self._clashes[name] = self._refusal(name, strangers[0]) if strangers else None
        return self._clashes[name]

    def _registered_by(self, name: str, point: importlib.metadata.EntryPoint) -> bool:
        origin = self._origins.get(name)
        if isinstance(origin, importlib.metadata.EntryPoint) and origin == point:
            return True  # its import registered the name
        if origin is BUILT_IN:
            return False
        # Registered by code or while another entry point loaded: still this plugin when the
        # registering module is in the entry point's package (a plugin module that registers
        # itself with the decorator, imported before its name was looked up).
        module = _module_of(self._owner(self._entries[name]))
        return module is not None and _package(module) == _package(point.module)

    def _taken_by(self, name: str) -> str:
        origin = self._origins.get(name)
        if origin is BUILT_IN:
            return f"a built-in {self.kind}"
        if isinstance(origin, importlib.metadata.EntryPoint):
            return f"by the plug-in {_plugin(origin)}"
        module = _module_of(self._owner(self._entries[name]))
        return f"by module {module!r}" if module else "in code"

    def _refusal(self, name: str, point: importlib.metadata.EntryPoint) -> PluginError:
        if self._origins.get(name) is BUILT_IN:
            uses = "a built-in name"
        else:
            uses = f"a name already registered {self._taken_by(name)}"
        return PluginError(
            f"{self.kind} {shown(name)!r}: the plug-in {_plugin(point)} uses {uses}; rename its "
            f"entry point (names taken: {', '.join(self._entries)})"
        )


def _plugin(point: importlib.metadata.EntryPoint) -> str:
    """An entry point as users find it: its distribution and its line in the metadata."""
    line = f"(entry point '{point.name} = {point.value}' in group {point.group!r})"
    return line if point.dist is None else f"from distribution {point.dist.name!r} {line}"


def _module_of(obj: object) -> str | None:
    while isinstance(obj, functools.partial):
        obj = obj.func
    module = getattr(obj, "__module__", None)
    return module if isinstance(module, str) else None


def _package(module: str) -> str:
    return module.partition(".")[0]


def is_own_error(error: BaseException) -> bool:
    """An error fedleak raised on purpose (a setting, the data, a plug-in), told to the user
    in one line, as opposed to an internal error whose traceback matters."""
    return type(error).__module__.partition(".")[0] == "fedleak"


def load_object(path: str, setting: str) -> Any:
    """The object an import path `package.module:attribute` (Flower's convention) names."""
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"{setting}={path!r}: expected an import path package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # a module written as a script exits at import
        raise ConfigError(
            f"{setting}={path!r}: cannot import {module_name!r} ({error_line(error)})"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{setting}={path!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target
