"""One typed run configuration, parsed from Flower's flat run config or from TOML presets.

Keys are dotted and kebab-cased (`data.dataset`, `attack.max-iterations`), exactly as Flower
flattens `[tool.flwr.app.config]`, so a preset's nested tables and `--run-config` overrides
name the same settings. Every invalid value raises `ConfigError` with one line naming the key,
the value and what is allowed, before any work starts. Names that belong to other rooms
(data sets, attacks, defense specs) are checked against their registries by
`fedleak.server.validate`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming key, value and rule."""


def _setting(
    default: Any,
    *,
    choices: tuple[Any, ...] = (),
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
    low_open: bool = False,
    doc: str = "",
) -> Any:
    rules = {
        "choices": choices,
        "low": low,
        "high": high,
        "high_open": high_open,
        "low_open": low_open,
        "doc": doc,
    }
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=rules)
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class DataConfig:
    """Which data set, how it is split among clients, and what the attacker holds."""

    dataset: str = _setting("mnist5k", doc="registry name, or folder:<path>")
    data_dir: str = _setting("", doc="where torchvision sets live; '' = $FEDLEAK_DATA_DIR or cache")
    partition: str = _setting("iid", choices=("iid", "dirichlet", "shards"))
    dirichlet_alpha: float = _setting(0.5, low=0.0, low_open=True)
    shards_per_client: int = _setting(2, low=1)
    test_fraction: float = _setting(0.2, low=0.0, high=1.0, high_open=True)
    aux_size: int = _setting(
        1000, low=0, doc="attacker's auxiliary images (text: sequences), disjoint from clients"
    )
    aux_beta: float = _setting(1.0, low=0.0, high=1.0, doc="fraction of in-distribution aux")
    public_size: int = _setting(0, low=0, doc="public pool for InstaHide-inter, disjoint too")
    seq_len: int = _setting(16, low=2, doc="text: tokens per sequence (L)")
    vocab_size: int = _setting(8192, low=257, doc="text: tokens of the BPE trained on aux text")
    tokenizer: str = _setting("bpe", doc="text: bpe (trained on aux text), gpt2, file:<json>")


@dataclass(frozen=True)
class ModelConfig:
    """The target model, by registry name."""

    name: str = _setting("lenet")
    init: str = _setting("default", choices=("default", "uniform"))


@dataclass(frozen=True)
class TrainConfig:
    """How clients compute their update and how the server applies it."""

    mode: str = _setting("fedsgd", choices=("fedsgd", "fedavg"))
    batch_size: int = _setting(1, low=1)
    examples: int = _setting(0, low=0, doc="samples per client per round in fedavg; 0 = batch")
    local_steps: int = _setting(1, low=1)
    lr: float = _setting(0.1, low=0.0, low_open=True)
    server_lr: float = _setting(1.0, low=0.0, low_open=True)
    fraction_train: float = _setting(1.0, low=0.0, high=1.0, low_open=True)
    min_clients: int = _setting(1, low=1)

    @property
    def examples_per_round(self) -> int:
        """FedSGD shares one batch gradient, so a client uses exactly one batch."""
        if self.mode == "fedsgd" or self.examples == 0:
            return self.batch_size
        return self.examples


@dataclass(frozen=True)
class ThreatConfig:
    """What the honest-but-curious server gets to see."""

    share: str = _setting("batch", choices=("batch", "per-sample"))
    bn_stats: str = _setting("hidden", choices=("hidden", "shared"))
    view: str = _setting("client", choices=("client", "aggregate"))


@dataclass(frozen=True)
class DefenseConfig:
    """Client-side defenses as one spec string, e.g. `prune:0.9+gauss:0.01`, and central DP
    (the server clips each client's update and noises the aggregate, after it has seen them)."""

    spec: str = _setting("none")
    dp_delta: float = _setting(1e-5, low=0.0, high=1.0, low_open=True, high_open=True)
    central_clip: float = _setting(
        0.0, low=0.0, doc="server-side clip C of each client's update; 0 = no central DP"
    )
    central_noise: float = _setting(
        0.0, low=0.0, doc="central DP noise multiplier z: std z*C/m on the mean of m clients"
    )


@dataclass(frozen=True)
class AttackConfig:
    """Which attacks the curious server runs, on whom, and with what budget."""

    names: tuple[str, ...] = _setting(("aux-mean",), doc="comma-separated names, or 'none'")
    clients_per_round: int = _setting(0, low=0, doc="0 = attack every client")
    max_iterations: int = _setting(2000, low=1)
    max_seconds: float = _setting(120.0, low=0.0, low_open=True)
    show_progress: bool = _setting(False)
    images_per_client: int = _setting(8, low=0, doc="samples saved to image grids")
    workers: int = _setting(0, low=0, doc="Ray attack workers; 0 = run attacks inline")
    worker_cpus: float = _setting(1.0, low=0.0, low_open=True)
    worker_gpus: float = _setting(0.0, low=0.0)
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SimulationConfig:
    """Fault injection and continuation."""

    fail_rate: float = _setting(0.0, low=0.0, high=1.0)
    resume: bool = _setting(False)
    timeout: float = _setting(3600.0, low=0.0, low_open=True)
    payload_budget_mb: float = _setting(0.0, low=0.0, doc="refuse larger rounds; 0 = no limit")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; the single source of truth for clients and server alike."""

    name: str = _setting("run")
    seed: int = _setting(0, low=0)
    num_server_rounds: int = _setting(3, low=1)
    out_dir: str = _setting("", doc="absolute run directory; '' = runs/<time>-<name>")
    device: str = _setting("auto", choices=("auto", "cpu", "cuda"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    threat: ThreatConfig = field(default_factory=ThreatConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    sim: SimulationConfig = field(default_factory=SimulationConfig)

    def to_flat(self) -> dict[str, Any]:
        """The Flower-style flat mapping that parses back to this configuration."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    _flatten_value(flat, f"{f.name}.{_key(sub.name)}", getattr(value, sub.name))
            else:
                flat[_key(f.name)] = value
        return flat

    def to_toml(self) -> str:
        """The resolved configuration as a nested TOML document (`config.toml` of a run)."""
        sections: dict[str, dict[str, Any]] = {"": {}}
        for key, value in self.to_flat().items():
            head, _, rest = key.rpartition(".")
            sections.setdefault(head, {})[rest] = value
        lines: list[str] = []
        for head, items in sections.items():
            if head:
                lines.append(f"\n[{head}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in items.items())
        return "\n".join(lines).strip() + "\n"


SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else get_type_hints(RunConfig)[f.name]
    for f in dataclasses.fields(RunConfig)
    if f.name in ("data", "model", "train", "threat", "defense", "attack", "sim")
}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _flatten_value(flat: dict[str, Any], key: str, value: Any) -> None:
    if key == "attack.params":
        for attack, params in value.items():
            for param, v in params.items():
                flat[f"attack.{attack}.{param}"] = v
    elif isinstance(value, tuple):
        flat[key] = ",".join(value) or "none"
    else:
        flat[key] = value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _describe(rules: Mapping[str, Any], kind: type) -> str:
    if rules["choices"]:
        return "one of " + ", ".join(repr(c) for c in rules["choices"])
    low, high = rules["low"], rules["high"]
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind, kind.__name__
    )
    if low is not None and high is not None:
        left = "(" if rules["low_open"] else "["
        right = ")" if rules["high_open"] else "]"
        return f"{name} in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f"{name} {'>' if rules['low_open'] else '>='} {low:g}"
    return name


def _coerce(key: str, raw: Any, kind: Any, rules: Mapping[str, Any]) -> Any:
    """Convert one raw value to the field's type and check its rule, or raise ConfigError."""
    if get_origin(kind) is tuple:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}={raw!r}: expected a comma-separated string of names")
        names = tuple(part.strip() for part in raw.split(",") if part.strip())
        if not names:
            raise ConfigError(f"{key}={raw!r}: expected at least one name, or 'none'")
        return () if names == ("none",) else names
    allowed = _describe(rules, kind)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ConfigError(f"{key}={raw!r}: expected {allowed}")
    if kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{key}={raw!r}: expected {allowed}")
        value: Any = raw
    elif kind is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{key}={raw!r}: expected {allowed}")
        value = float(raw)
        if not math.isfinite(value):
            raise ConfigError(f"{key}={raw!r}: expected {allowed}")
    elif kind is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}={raw!r}: expected {allowed}")
        value = raw
    else:  # pragma: no cover - every field type is handled above
        raise ConfigError(f"{key}: unsupported setting type {kind}")
    if rules["choices"] and value not in rules["choices"]:
        raise ConfigError(f"{key}={raw!r}: expected {allowed}")
    low, high = rules["low"], rules["high"]
    too_low = low is not None and (value <= low if rules["low_open"] else value < low)
    too_high = high is not None and (value >= high if rules["high_open"] else value > high)
    if too_low or too_high:
        raise ConfigError(f"{key}={raw!r}: expected {allowed}")
    return value


def _fields_of(cls: type) -> dict[str, tuple[str, Any, Mapping[str, Any]]]:
    hints = get_type_hints(cls)
    return {
        _key(f.name): (f.name, hints[f.name], f.metadata)
        for f in dataclasses.fields(cls)
        if f.metadata
    }


TOP_LEVEL = _fields_of(RunConfig)
SECTION_FIELDS = {name: _fields_of(cls) for name, cls in SECTIONS.items()}


def known_keys() -> list[str]:
    """Every flat key a run config may set (attack parameters aside)."""
    keys = list(TOP_LEVEL)
    for section, fields in SECTION_FIELDS.items():
        keys.extend(f"{section}.{k}" for k in fields)
    return keys


def _shown(name: str) -> str:
    """A user-supplied name, quoted when it holds characters that would break one line."""
    return name if name.isprintable() else repr(name)


def _unknown(key: str) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, known_keys(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `fedleak config-keys`"
    return ConfigError(f"{_shown(key)}: unknown setting{hint}")


def parse_flat(flat: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Parse Flower's flat run config (dotted keys) on top of `base` (defaults if None).

    Keys `attack.<attack-name>.<param>` carry per-attack hyper-parameters; the attack
    validates them when it is built.
    """
    base = base or RunConfig()
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    params = {name: dict(p) for name, p in base.attack.params.items()}
    for key, raw in flat.items():
        if not isinstance(key, str):
            raise ConfigError(f"{key!r}: setting names must be strings")
        head, dot, rest = key.partition(".")
        if not dot:
            if key not in TOP_LEVEL:
                raise _unknown(key)
            name, kind, rules = TOP_LEVEL[key]
            top[name] = _coerce(key, raw, kind, rules)
        elif head in SECTION_FIELDS and rest in SECTION_FIELDS[head]:
            name, kind, rules = SECTION_FIELDS[head][rest]
            sections[head][name] = _coerce(key, raw, kind, rules)
        elif head == "attack" and "." in rest:
            attack, _, param = rest.partition(".")
            if not attack or not param or "." in param:
                raise ConfigError(
                    f"{_shown(key)}: attack parameters are written attack.<name>.<param>"
                )
            if isinstance(raw, dict):
                raise ConfigError(f"{_shown(key)}: expected a number, string or boolean")
            params.setdefault(attack, {})[param] = raw
        else:
            raise _unknown(key)
    sections["attack"]["params"] = params
    replaced = {
        name: dataclasses.replace(getattr(base, name), **values)
        for name, values in sections.items()
    }
    config = dataclasses.replace(base, **top, **replaced)
    _check_consistency(config)
    return config


def _check_consistency(config: RunConfig) -> None:
    """Rules that involve more than one key."""
    train = config.train
    if train.mode == "fedsgd" and train.local_steps != 1:
        raise ConfigError(
            f"train.local-steps={train.local_steps}: fedsgd shares one gradient, so expected 1 "
            "(use train.mode='fedavg' for local steps)"
        )
    if train.mode == "fedsgd" and train.examples not in (0, train.batch_size):
        raise ConfigError(
            f"train.examples={train.examples}: fedsgd uses one batch, so expected 0 or "
            f"train.batch-size ({train.batch_size})"
        )
    if config.threat.share == "per-sample" and train.mode != "fedsgd":
        raise ConfigError(
            "threat.share='per-sample': per-sample updates exist only in fedsgd; "
            "expected train.mode='fedsgd' or threat.share='batch'"
        )
    defense = config.defense
    if defense.central_noise > 0 and defense.central_clip == 0:
        raise ConfigError(
            f"defense.central-noise={defense.central_noise:g}: central DP noise is calibrated to "
            "the clipping norm, so expected defense.central-clip > 0 (or central-noise = 0)"
        )
    for attack in config.attack.params:
        if attack not in config.attack.names:
            raise ConfigError(
                f"attack.{_shown(attack)}.*: parameters given for an attack that is not in "
                f"attack.names ({','.join(config.attack.names) or 'none'})"
            )
    if config.out_dir and not Path(config.out_dir).is_absolute():
        raise ConfigError(
            f"out-dir={config.out_dir!r}: expected an absolute path (the SuperLink's working "
            "directory is not yours) or '' for the default"
        )


def flatten_toml(document: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    """Nested TOML tables to dotted keys, as Flower flattens `[tool.flwr.app.config]`."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        dotted = f"{parent}.{key}" if parent else str(key)
        if isinstance(value, dict):
            flat.update(flatten_toml(value, dotted))
        else:
            flat[dotted] = value
    return flat


def parse_toml(text: str, base: RunConfig | None = None) -> RunConfig:
    """Parse a TOML preset (nested tables or dotted keys)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"preset is not valid TOML: {first_line}") from None
    return parse_flat(flatten_toml(document), base)


def load_toml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read and parse a TOML preset file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read preset ({error.strerror})") from None
    return parse_toml(text, base)
