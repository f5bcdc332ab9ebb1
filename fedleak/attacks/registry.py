"""Attacks by name: `build_attack("ig", {"restarts": 2}, seed=0)`, and how to add your own.

An attack is registered with a factory `(config, seed) -> Attack` and, when it takes
hyper-parameters, a default settings dataclass (`fedleak.settings`): its fields are the keys
`attack.<name>.<key>`, parsed and checked by the generic parser without building the attack.

    @dataclass(frozen=True)
    class BlurConfig(Settings):
        sigma: float = setting(1.0, low=0.0, doc="blur of the aux mean")

    @register_attack("blur", config=BlurConfig())
    class Blur:
        stateful = False  # keeps nothing across calls: any worker may run any job
        def __init__(self, config: BlurConfig, seed: int) -> None: ...
        def reconstruct(self, observation, knowledge, budget) -> Reconstruction: ...

A package makes the same attack available to every process with an entry point in group
`fedleak.attacks` (see `fedleak.registry`); an entry point that names a class or function
without registering it is adopted with the class attributes `default_config` and `stateful`.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedleak.attacks.types import Attack
from fedleak.registry import Registry
from fedleak.settings import (
    SEED_MAX,
    ConfigError,
    KeyHelp,
    flat_keys,
    help_lines,
    parse_settings,
    render,
    shown_value,
    takes_text,
)

Factory = Callable[[Any, int], Attack]


@dataclass(frozen=True)
class AttackEntry:
    """A registered attack: how to build it, its default settings and named alternatives.

    `presets` are alternative defaults chosen by the parameter `preset` (`default_preset` when
    it is not given). `stateful`: whether the attack keeps state across calls, so that all its
    jobs must run on one worker, in order (the safe default).
    """

    name: str
    build: Factory
    config: Any = None
    presets: Mapping[str, Any] = field(default_factory=dict)
    default_preset: str | None = None
    stateful: bool = True
    doc: str = ""

    def __post_init__(self) -> None:
        # An entry point's class attributes (`default_config`) are checked here too: a dict
        # would otherwise fail as a bare TypeError when the attack is first configured.
        _check_options(self.name, self.config, self.presets, self.default_preset, self.stateful)

    @property
    def prefix(self) -> str:
        """The run-config prefix of this attack's parameters."""
        return f"attack.{self.name}."

    def defaults(self, preset: str | None = None) -> Any:
        """The default settings, or those of a named preset."""
        if not self.presets:
            return self.config
        chosen = preset if preset is not None else self.default_preset
        if chosen not in self.presets:
            raise ConfigError(
                f"{self.prefix}preset={chosen!r}: expected one of "
                f"{', '.join(repr(p) for p in self.presets)}"
            )
        return self.presets[chosen]

    def configure(self, params: Mapping[str, object] | None = None) -> Any:
        """The attack's settings with `params` applied and checked (one-line `ConfigError`)."""
        if params is not None and not isinstance(params, Mapping):
            raise ConfigError(
                f"params: a {type(params).__name__}; expected a mapping of {self.name}'s "
                'settings to values, e.g. {"max-iterations": 100}'
            )
        values = dict(params or {})
        preset = values.pop("preset", None) if self.presets else None
        if preset is not None and not isinstance(preset, str):
            raise ConfigError(f"{self.prefix}preset={preset!r}: expected a preset name")
        base = self.defaults(preset)
        if base is None:
            if values:
                raise ConfigError(
                    f"{self.prefix}{sorted(values)[0]}: unknown setting; attack {self.name!r} "
                    "takes no parameters"
                )
            return None
        return parse_settings(base, values, self.prefix)

    def create(self, params: Mapping[str, object] | None = None, seed: int = 0) -> Attack:
        """The attack, configured by `params`; a plug-in's factory that raises gives one line
        naming the attack (`fedleak.registry.PluginFailed`)."""
        config = self.configure(params)
        return ATTACKS.guarded(self.name, self.build, "factory")(config, attack_seed(seed))

    def accepts(self, key: str) -> bool:
        """Whether `key` (kebab-case) is one of this attack's parameters."""
        config = self.defaults()
        return config is not None and key in dict(flat_keys(type(config)))

    def text_params(self) -> frozenset[str]:
        """The parameters whose value is text (a preset, a mode, a folder)."""
        config = self.defaults()
        keys = [] if config is None else flat_keys(type(config))
        texts = {key for key, spec in keys if takes_text(spec.kind)}
        return frozenset(texts | ({"preset"} if self.presets else set()))

    def help(self) -> list[KeyHelp]:
        """Type, default and help of each parameter (`fedleak config-keys`)."""
        lines = []
        if self.presets:
            lines.append(
                KeyHelp(
                    f"{self.prefix}preset",
                    "|".join(self.presets),
                    render(self.default_preset),
                    "named base settings; the other keys change them",
                )
            )
        config = self.defaults()
        if config is not None:
            lines += help_lines(config, self.prefix)
        return lines


_FACTORY = "an attack class or factory (config, seed) -> Attack"
_CONFIG = (
    "None or a settings dataclass instance (e.g. MyConfig() of a frozen dataclass subclassing "
    "fedleak.settings.Settings)"
)


def _is_config(value: object) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _check_options(
    name: str,
    config: Any,
    presets: Any,
    default_preset: Any,
    stateful: Any,
) -> None:
    """Refuse, in one line naming the argument, settings an attack could never be built with."""
    if config is not None and not _is_config(config):
        raise ATTACKS.refusal(name, f"config={shown_value(config)}: expected {_CONFIG}")
    if not isinstance(presets, Mapping):
        raise ATTACKS.refusal(
            name, f"presets={shown_value(presets)}: expected a mapping of preset names to {_CONFIG}"
        )
    for preset, value in presets.items():
        if not isinstance(preset, str) or not preset:
            raise ATTACKS.refusal(
                name, f"presets: key {shown_value(preset)}: expected a non-empty preset name"
            )
        if not _is_config(value):
            raise ATTACKS.refusal(
                name,
                f"presets[{preset!r}]={shown_value(value)}: expected a settings dataclass instance",
            )
    if presets and default_preset not in presets:
        raise ATTACKS.refusal(
            name,
            f"default_preset={shown_value(default_preset)}: expected one of "
            f"{', '.join(repr(p) for p in presets)}",
        )
    if not presets and default_preset is not None:
        raise ATTACKS.refusal(
            name, f"default_preset={shown_value(default_preset)}: expected None (no presets)"
        )
    if stateful is not None and not isinstance(stateful, bool):
        raise ATTACKS.refusal(
            name, f"stateful={shown_value(stateful)}: expected True, False or None"
        )


def _adopt(name: str, obj: Any) -> AttackEntry:
    if isinstance(obj, AttackEntry):
        return dataclasses.replace(obj, name=name)
    if not callable(obj):
        raise TypeError(f"expected {_FACTORY}, got {obj!r}")
    return AttackEntry(
        name,
        obj,
        config=getattr(obj, "default_config", None),
        stateful=bool(getattr(obj, "stateful", True)),
    )


def _builtins() -> None:
    import fedleak.attacks.catalog  # noqa: F401  (registers the built-in attacks)


ATTACKS: Registry[AttackEntry] = Registry(
    "attack",
    "fedleak.attacks",
    "attack.names",
    adopt=_adopt,
    builtins=_builtins,
    owner=lambda entry: entry.build,
    forbidden=",.",
)


def register_attack(
    name: str,
    build: Factory | None = None,
    *,
    config: Any = None,
    presets: Mapping[str, Any] | None = None,
    default_preset: str | None = None,
    stateful: bool | None = None,
    replace: bool = False,
) -> Any:
    """Register an attack factory `(config, seed) -> Attack` under `name`; usable as a decorator.

    `config`: the default settings dataclass instance (None: the attack takes no parameters).
    `stateful` defaults to the factory's `stateful` attribute, else True. Arguments of the
    wrong type are refused here, in one line naming the argument (a `ConfigError`).
    """
    ATTACKS.check_name(name)
    _check_options(name, config, {} if presets is None else presets, default_preset, stateful)

    def add(factory: Factory) -> Factory:
        if not callable(factory):
            raise ATTACKS.refusal(name, f"expected {_FACTORY}, got {shown_value(factory)}")
        declared = getattr(factory, "stateful", True) if stateful is None else stateful
        entry = AttackEntry(
            name,
            factory,
            config=config,
            presets=dict(presets or {}),
            default_preset=default_preset,
            stateful=bool(declared),
            doc=_first_doc_line(factory),
        )
        ATTACKS.add(name, entry, replace=replace)
        return factory

    return add if build is None else add(build)


def _first_doc_line(obj: object) -> str:
    lines = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return lines[0] if lines else ""


def attack_entry(name: str) -> AttackEntry:
    """The registered attack `name` (built-in or plugin); one-line error when unknown."""
    return ATTACKS.get(name)


def attack_names() -> tuple[str, ...]:
    """Every registered attack name, plugins included."""
    return ATTACKS.names()


def attack_modalities(attack: Attack) -> tuple[str, ...]:
    """What an attack reconstructs: its `modalities` attribute, images when it declares none."""
    return tuple(getattr(attack, "modalities", ("image",)))


def attack_seed(seed: object) -> int:
    """`seed` as an attack's seed: a whole number in [0, 2**32) (the attacks' streams come
    from `mix_seed`, which drops signs, and torch's generators, which keep 32 bits)."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, numbers.Integral)
        or not 0 <= seed <= SEED_MAX
    ):
        raise ConfigError(f"seed={seed!r}: expected an integer in [0, {SEED_MAX}]")
    return int(seed)


def build_attack(name: str, params: Mapping[str, object] | None = None, *, seed: int = 0) -> Attack:
    """The attack registered under `name`, configured by `params` (keys as in its settings
    dataclass, dashes or underscores); `ConfigError` (a ValueError) on bad names or values."""
    return attack_entry(name).create(params, seed)
