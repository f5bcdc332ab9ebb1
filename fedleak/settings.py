"""Typed settings: frozen dataclasses whose fields carry their rule and a line of help, filled and
checked by one generic parser.

Every configurable value in fedleak (the run configuration, each attack's hyper-parameters, a
plugin's own) is a field of a frozen dataclass declared with `setting(default, rule..., doc=...)`.
`parse_settings(base, values, prefix)` turns raw values (TOML, Flower's run config, `--set`,
Python) into a new instance; `Settings`, the base class of such dataclasses, runs the same
checks when one is constructed directly. Every refusal is a `ConfigError` with one line naming
the key, the value and what is allowed, e.g. `attack.ig.restarts=0: expected an integer >= 1`.

Field types understood: bool, int, float, str, `Literal[...]` (its values are the choices),
`tuple[str, ...]` (comma-separated names, `none` for none), `tuple[int, ...]` and
`tuple[float, ...]` (lists, or text such as `3000,3000`), `Path`, `int | float`, any of these
`| None` (`none` or an empty string give None), and a nested settings dataclass declared with
`nested(cls, prefix)`, whose keys are the prefix plus its own keys. Keys are kebab-case
(`tv-weight`); underscores are accepted too. This module imports nothing from fedleak, so
every room may use it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import functools
import math
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

# Flower's run config carries integers as signed 64-bit values (the `flwr run` path).
INT64_MAX = 2**63 - 1
# The largest seed: torch's generators keep a seed's low 32 bits only.
SEED_MAX = 2**32 - 1


class ConfigError(ValueError):
    """A setting is invalid; the message is one line naming key, value and what is allowed."""


@dataclass(frozen=True)
class Rule:
    """What a value must satisfy beyond its type: choices, a range, or a predicate."""

    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    check: Callable[[Any], bool] | None = None
    allowed: str = ""  # how `check` reads to a user, e.g. "fractions in (0, 1)"
    doc: str = ""


def setting(
    default: Any,
    *,
    choices: tuple[Any, ...] = (),
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    check: Callable[[Any], bool] | None = None,
    allowed: str = "",
    doc: str = "",
) -> Any:
    """A dataclass field with a default, its rule and one line of help.

    `low`/`high` bound numbers (and every element of a tuple of numbers); `check` is any other
    predicate, described to the user by `allowed`. A subclass that only changes a default may
    declare the field plainly: it keeps the rule of the class it inherits from.
    """
    rule = Rule(choices, low, high, low_open, high_open, check, allowed, doc)
    metadata = {"rule": rule}
    if isinstance(default, (tuple, list, dict)):
        frozen = tuple(default) if isinstance(default, list) else default
        return field(default_factory=lambda: frozen, metadata=metadata)
    return field(default=default, metadata=metadata)


def nested(cls: Callable[[], Any], prefix: str, *, doc: str = "") -> Any:
    """A field holding another settings dataclass, whose keys are written `<prefix><key>`."""
    return field(default_factory=cls, metadata={"prefix": prefix, "rule": Rule(doc=doc)})


class Settings:
    """Base of settings dataclasses: a direct construction is checked (and values normalised,
    e.g. lists to tuples) exactly as `parse_settings` checks parsed ones."""

    def __post_init__(self) -> None:
        for spec in _specs(type(self)).values():
            if spec.prefix is not None:
                continue
            value = getattr(self, spec.name)
            normal = coerce(key_of(spec.name), value, spec.kind, spec.rule)
            if normal is not value:
                object.__setattr__(self, spec.name, normal)


@dataclass(frozen=True)
class Spec:
    """One field of a settings dataclass as the parser sees it."""

    name: str
    kind: Any
    rule: Rule
    default: Any
    prefix: str | None = None  # set for nested settings


@dataclass(frozen=True)
class KeyHelp:
    """One settable key for `fedleak config-keys`: its type, default and help."""

    key: str
    kind: str
    default: str
    doc: str


def key_of(name: str) -> str:
    """The kebab-case key of a field name."""
    return name.replace("_", "-")


def _rule_of(cls: type, name: str) -> Rule:
    """The field's rule, inherited from the nearest class that declared one."""
    for klass in cls.__mro__:
        fields = getattr(klass, "__dataclass_fields__", {})
        if name in fields and "rule" in fields[name].metadata:
            return fields[name].metadata["rule"]
    return Rule()


@functools.cache
def _specs(cls: type) -> dict[str, Spec]:
    hints = get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        prefix = None
        for klass in cls.__mro__:
            declared = getattr(klass, "__dataclass_fields__", {}).get(f.name)
            if declared is not None and "prefix" in declared.metadata:
                prefix = declared.metadata["prefix"]
                break
        rule = _rule_of(cls, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if prefix is None and not _is_setting(cls, f.name):
            continue  # a plain field (e.g. a mapping filled elsewhere) is not a setting
        specs[key_of(f.name)] = Spec(f.name, hints[f.name], rule, default, prefix)
    return specs


def _is_setting(cls: type, name: str) -> bool:
    """Fields declared by `setting` are settings, and so is every field of a `Settings` class
    except those marked `internal` (values filled by code, such as a mapping of parameters).
    The nearest declaration decides: a subclass may make a base's internal field a setting."""
    nearest = next(
        klass.__dataclass_fields__[name].metadata
        for klass in cls.__mro__
        if name in getattr(klass, "__dataclass_fields__", {})
    )
    if "internal" in nearest:
        return False
    return issubclass(cls, Settings) or "rule" in nearest


def internal(default_factory: Callable[[], Any]) -> Any:
    """A dataclass field that is not a setting: no key, filled by code."""
    return field(default_factory=default_factory, metadata={"internal": True})


def specs(cls: type) -> dict[str, Spec]:
    """The settings of a dataclass by kebab-case key (nested settings not expanded)."""
    return dict(_specs(cls))


def flat_keys(cls: type, prefix: str = "") -> Iterator[tuple[str, Spec]]:
    """Every settable key of `cls`, nested settings expanded, with its spec."""
    for key, spec in _specs(cls).items():
        if spec.prefix is not None:
            yield from flat_keys(spec.kind, prefix + spec.prefix)
        else:
            yield prefix + key, spec


# -- describing -------------------------------------------------------------------------------
def _optional(kind: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        rest = args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
        return rest, len(args) < len(get_args(kind))
    return kind, False


def takes_text(kind: Any) -> bool:
    """Whether a setting of `kind` holds text (a name, a list of names, a word among choices,
    a path): a value typed for it is meant as written, even when it reads as a number."""
    inner, _ = _optional(kind)
    if get_origin(inner) is tuple:
        return get_args(inner)[0] is str
    if get_origin(inner) is Literal:
        return all(isinstance(choice, str) for choice in get_args(inner))
    return inner in (str, Path)


def _is_number_union(kind: Any) -> bool:
    return get_origin(kind) in (Union, types.UnionType) and set(get_args(kind)) == {int, float}


def type_name(kind: Any, rule: Rule | None = None) -> str:
    """A short type with its rule for help texts: `int >= 1`, `cosine|l2`, `float | none`."""
    rule = rule or Rule()
    inner, optional = _optional(kind)
    choices = rule.choices or (get_args(inner) if get_origin(inner) is Literal else ())
    if choices:
        name = "|".join(render(c) for c in choices)
    elif get_origin(inner) is tuple:
        element = get_args(inner)[0]
        name = {str: "names", int: "ints", float: "floats"}.get(element, "list")
        name += _range(rule)
    elif _is_number_union(inner):
        name = "number"
    else:
        name = {bool: "bool", int: "int", float: "float", str: "str", Path: "path"}.get(
            inner, getattr(inner, "__name__", str(inner))
        )
        name += _range(rule)
    return f"{name} | none" if optional else name


def describe(kind: Any, rule: Rule) -> str:
    """What a setting allows, as the tail of an error line ("an integer >= 1")."""
    inner, optional = _optional(kind)
    text = _describe_inner(inner, rule)
    return f"none or {text}" if optional else text


def _describe_inner(kind: Any, rule: Rule) -> str:
    choices = rule.choices or (get_args(kind) if get_origin(kind) is Literal else ())
    if choices and get_origin(kind) is tuple:
        return "names from " + ", ".join(repr(c) for c in choices) + ", comma-separated, or 'none'"
    if choices:
        return "one of " + ", ".join(repr(c) for c in choices)
    if rule.allowed:
        return rule.allowed
    if get_origin(kind) is tuple:
        element = get_args(kind)[0]
        if element is str:
            return "comma-separated names, or 'none'"
        noun = "integers" if element is int else "numbers"
        return f"a list of {noun}{_range(rule)}"
    number = kind is float or _is_number_union(kind)
    if number and (rule.low is None or rule.high is None):
        # inf and nan are refused too, which a bound with no end would not say.
        return "a finite number" + _range(rule)
    name = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        Path: "a path",
    }.get(kind, "a number" if number else getattr(kind, "__name__", str(kind)))
    return name + _range(rule)


def _bound(value: float) -> str:
    if value == INT64_MAX:
        return "2**63-1"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _range(rule: Rule) -> str:
    low, high = rule.low, rule.high
    if low is not None and high is not None:
        left = "(" if rule.low_open else "["
        right = ")" if rule.high_open else "]"
        return f" in {left}{_bound(low)}, {_bound(high)}{right}"
    if low is not None:
        return f" {'>' if rule.low_open else '>='} {_bound(low)}"
    if high is not None:
        return f" {'<' if rule.high_open else '<='} {_bound(high)}"
    return ""


def shown_value(value: object) -> str:
    """repr of a value, shortened: a 5000-digit integer must not flood the one line (nor
    raise: Python refuses to print integers of more than 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def shown(text: object) -> str:
    """A user-supplied name, quoted when it holds characters that would break one line."""
    text = str(text)
    return text if text.isprintable() else repr(text)


# -- coercing ---------------------------------------------------------------------------------
def means_none(raw: object) -> bool:
    """Whether `raw` spells no value for an optional setting: None, '', 'none' or 'null' (a
    `cache-dir = "none"` is no folder, not one named none)."""
    return raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null"))


def coerce(key: str, raw: Any, kind: Any, rule: Rule) -> Any:
    """`raw` converted to the setting's type and checked against its rule, or `ConfigError`."""
    inner, optional = _optional(kind)

    def refuse() -> ConfigError:
        return ConfigError(f"{shown(key)}={shown_value(raw)}: expected {describe(kind, rule)}")

    if raw is None or (optional and means_none(raw)):
        if optional:
            return None
        raise refuse()
    value = _convert(key, raw, inner, rule, refuse)
    if not _within(value, rule):
        raise refuse()
    return value


def _convert(key: str, raw: Any, kind: Any, rule: Rule, refuse: Callable[[], Exception]) -> Any:
    if get_origin(kind) is Literal:
        if raw not in get_args(kind) or isinstance(raw, bool) != any(
            isinstance(c, bool) for c in get_args(kind)
        ):
            raise refuse()
        return raw
    if get_origin(kind) is tuple:
        return _convert_tuple(key, raw, get_args(kind)[0], refuse)
    if _is_number_union(kind):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise refuse()
        if isinstance(raw, float) and not math.isfinite(raw):
            raise refuse()
        return raw
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise refuse()
    if kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise refuse()
        if abs(raw) > INT64_MAX and rule.high != INT64_MAX:
            raise ConfigError(
                f"{shown(key)}={shown_value(raw)}: expected {describe(kind, rule)}, at most "
                "2**63-1 (run configs carry 64-bit integers)"
            )
        return raw
    if kind is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise refuse()
        value = float(raw) if abs(raw) <= 1e308 else math.inf
        if not math.isfinite(value):
            raise refuse()
        return raw if isinstance(raw, float) else value
    if kind is str:
        if isinstance(raw, bool):
            # `--set name=true` reads as a TOML bool: the word is what the user meant.
            raw = "true" if raw else "false"
        elif isinstance(raw, dt.date | dt.time):
            # `--set name=2024-01-01` reads as a TOML date: its ISO text is what was typed.
            raw = raw.isoformat()
        elif isinstance(raw, int | float):
            # `--set attack.rounds=5`, `name = 2024` or `--set name=nan` reads as a TOML number;
            # its text is what the user meant (the setting's own rule still judges it). A
            # float comes back as Python writes it (1e3 as 1000.0): quote to keep the digits.
            raw = str(raw)
        if not isinstance(raw, str):
            raise refuse()
        if "\x00" in raw:
            raise ConfigError(
                f"{shown(key)}={shown_value(raw)}: expected {describe(kind, rule)} without NUL "
                "characters"
            )
        return raw
    if kind is Path:
        if isinstance(raw, Path):
            return raw
        if isinstance(raw, str) and raw:
            return Path(raw)
        raise refuse()
    raise ConfigError(f"{shown(key)}: unsupported setting type {kind}")


def _convert_tuple(key: str, raw: Any, element: Any, refuse: Callable[[], Exception]) -> tuple:
    if element is str:
        if isinstance(raw, (list, tuple)) and all(isinstance(r, str) for r in raw):
            names = tuple(r.strip() for r in raw)
        elif isinstance(raw, str):
            # A blank between commas is refused below, not dropped (audit DO4: `ig,,aux-mean`).
            names = tuple(part.strip() for part in raw.split(",")) if raw.strip() else ()
        else:
            raise ConfigError(
                f"{shown(key)}={shown_value(raw)}: expected a comma-separated string of names"
            )
        # An empty list or string names nothing by accident: 'none' says it on purpose (an
        # empty tuple is a value already converted).
        if not names and not isinstance(raw, tuple):
            raise ConfigError(
                f"{shown(key)}={shown_value(raw)}: expected at least one name, or 'none'"
            )
        if not all(names):
            raise ConfigError(f"{shown(key)}={shown_value(raw)}: a blank name; expected names")
        if "none" in names and len(names) > 1:
            # It read as an unknown name quoted alone, its allowed values leaving 'none' out
            # (audit FF2).
            raise ConfigError(
                f"{shown(key)}={shown_value(raw)}: 'none' stands alone; give names without "
                "it, or 'none' alone"
            )
        names = () if names == ("none",) else names
        if len(set(names)) != len(names):
            raise ConfigError(
                f"{shown(key)}={shown_value(raw)}: names a value twice; give each once"
            )
        return names
    if isinstance(raw, str):
        parts = [p.strip() for p in raw.replace("x", ",").split(",")]
        # A blank item, or a blank value (an unset shell variable), is refused: dropped, `=`
        # alone turned IG's step decay off (audit DO4).
        if not all(parts):
            raise refuse()
        try:
            raw_items: list[Any] = [element(p) if element is int else float(p) for p in parts]
        except ValueError:
            raise refuse() from None
    elif isinstance(raw, (list, tuple)):
        raw_items = list(raw)
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw_items = [raw]  # one element: `--set attack.lti.hidden=1000` reads as a TOML integer
    else:
        raise refuse()
    items = []
    for item in raw_items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise refuse()
        if element is int and not isinstance(item, int):
            raise refuse()
        if not math.isfinite(item):
            raise refuse()
        items.append(element(item))
    return tuple(items)


def _within(value: Any, rule: Rule) -> bool:
    if rule.choices:
        items = value if isinstance(value, tuple) else (value,)
        if any(item not in rule.choices for item in items):
            return False
    if rule.check is not None and not rule.check(value):
        return False
    numbers = value if isinstance(value, tuple) else (value,)
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        low, high = rule.low, rule.high
        if low is not None and (number <= low if rule.low_open else number < low):
            return False
        if high is not None and (number >= high if rule.high_open else number > high):
            return False
    return True


# -- parsing ----------------------------------------------------------------------------------
def close_names(name: str, known: Iterable[str], n: int) -> list[str]:
    """Up to `n` of `known` closest to `name`, compared in lower case: names are lower case,
    so `TRAIN.BATCH-SIZE` is as close to its key as `train.batch-size`."""
    lowered = {known_name.lower(): known_name for known_name in known}
    return [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=n)]


def unknown(key: str, known: list[str], where: str = "") -> ConfigError:
    """The one-line error for a key nobody declared, with the closest known keys."""
    close = close_names(key, known, 3)
    if close:
        hint = f"; did you mean {', '.join(close)}?"
    elif known and len(known) <= 40:
        hint = f"; allowed: {', '.join(known)}"
    else:
        hint = "; see `fedleak config-keys`"
    return ConfigError(f"{shown(key)}: unknown {where or 'setting'}{hint}")


def parse_settings(base: T, values: Mapping[str, Any], prefix: str = "") -> T:
    """`base` (a settings dataclass instance) with `values` applied, every key and value
    checked; keys are relative to `prefix`, which only serves the error messages."""
    cls = type(base)
    keys = dict(flat_keys(cls))
    updates: dict[tuple[str, ...], Any] = {}
    for raw_key, raw in values.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{raw_key!r}: setting names must be strings")
        key = key_of(raw_key)
        if key not in keys:
            raise unknown(prefix + raw_key, [prefix + k for k in keys])
        if isinstance(raw, dict):
            raise ConfigError(f"{shown(prefix + raw_key)}: expected a value, not a table")
        path = _path_of(cls, key)
        spec = keys[key]
        updates[path] = coerce(prefix + key, raw, spec.kind, spec.rule)
    try:
        return _apply(base, updates)
    except ConfigError as error:  # a check across fields names its keys without the prefix
        raise ConfigError(f"{prefix}{error}") from None


def _path_of(cls: type, key: str) -> tuple[str, ...]:
    for k, spec in _specs(cls).items():
        if spec.prefix is not None and key.startswith(spec.prefix):
            rest = key[len(spec.prefix) :]
            if rest in dict(flat_keys(spec.kind)):
                return (spec.name, *_path_of(spec.kind, rest))
        elif k == key:
            return (spec.name,)
    raise KeyError(key)  # pragma: no cover - keys come from flat_keys


def _apply(base: T, updates: Mapping[tuple[str, ...], Any]) -> T:
    direct = {path[0]: value for path, value in updates.items() if len(path) == 1}
    deeper: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in updates.items():
        if len(path) > 1:
            deeper.setdefault(path[0], {})[path[1:]] = value
    for name, inner in deeper.items():
        direct[name] = _apply(getattr(base, name), inner)
    return dataclasses.replace(base, **direct) if direct else base  # type: ignore[type-var]


def help_lines(cls_or_base: Any, prefix: str = "") -> list[KeyHelp]:
    """Type, default and help of every key of a settings dataclass (or of an instance, whose
    values are then the defaults shown)."""
    base = cls_or_base if not isinstance(cls_or_base, type) else None
    cls = type(base) if base is not None else cls_or_base
    lines = []
    for key, spec in flat_keys(cls):
        default = spec.default
        if base is not None:
            default = _value_at(base, _path_of(cls, key))
        lines.append(
            KeyHelp(prefix + key, type_name(spec.kind, spec.rule), render(default), spec.rule.doc)
        )
    return lines


def flat_values(settings: Any) -> dict[str, Any]:
    """Every key of a settings instance with the value it holds (parsed, not rendered: a
    rendered float keeps 6 digits, so 0.1 and 0.1000001 would read alike)."""
    cls = type(settings)
    return {key: _value_at(settings, _path_of(cls, key)) for key, _ in flat_keys(cls)}


def _value_at(base: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        base = getattr(base, name)
    return base


def format_number(value: float) -> str:
    """The shortest text that parses back to `value`, without a trailing `.0` and without the
    `+` of a positive exponent (`1e16`, not `1e+16`: `+` joins defenses)."""
    text = repr(float(value) + 0.0).replace("e+", "e")
    return text[:-2] if text.endswith(".0") else text


def render(value: Any) -> str:
    """A default as a user would write it."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(render(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
