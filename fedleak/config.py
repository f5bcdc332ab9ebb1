"""One typed run configuration, parsed from Flower's flat run config or from TOML presets.

Keys are dotted and kebab-cased (`data.dataset`, `attack.max-iterations`), exactly as Flower
flattens `[tool.flwr.app.config]`, so a preset's nested tables and `--run-config` overrides
name the same settings. The sections are settings dataclasses (`fedleak.settings`), filled and
checked by its generic parser, the same that parses every attack's hyper-parameters: every
invalid value raises `ConfigError` with one line naming the key, the value and what is
allowed, before any work starts. Names that belong to other rooms (data sets, models,
attacks, defense specs) are checked against their registries by `fedleak.server.validate`.

A new setting is one field: `name: int = _setting(3, low=1, doc="one line of help")`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedleak.settings import (
    INT64_MAX,
    SEED_MAX,
    ConfigError,
    KeyHelp,
    Settings,
    flat_keys,
    format_number,
    help_lines,
    internal,
    key_of,
    nested,
    parse_settings,
    setting,
    shown,
    shown_value,
    takes_text,
    unknown,
)

__all__ = [
    "AttackConfig",
    "ConfigError",
    "DataConfig",
    "DefenseConfig",
    "MetricsConfig",
    "ModelConfig",
    "RunConfig",
    "SimulationConfig",
    "ThreatConfig",
    "TrainConfig",
    "attacked_rounds",
    "flatten_toml",
    "key_help",
    "known_keys",
    "load_toml",
    "parse_flat",
    "parse_toml",
]

# The declaration form every section uses (kept under this name for contributors' fields).
_setting = setting

# A run's name becomes a folder name (runs/<time>-<name>): one safe path component. '+' is
# allowed because sweep cells are named after combined defenses (`mixup-4+prune-0.9`).
MAX_ROUNDS = 1_000_000
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}"
NAME_RULE = "letters, digits, '.', '_', '+' or '-', starting with a letter or digit, at most 100"


# The settings only a text run reads, and only an image run: a run of the other kind warns of
# them, and its report leaves them out of its group's label.
TEXT_ONLY_KEYS = ("data.tokenizer", "data.vocab-size", "data.seq-len")
IMAGE_ONLY_KEYS = ("metrics.lpips-nets",)


def keys_without_effect(modality: str) -> tuple[str, ...]:
    """The settings a run on data of `modality` (`image` or `tokens`) never reads."""
    return TEXT_ONLY_KEYS if modality == "image" else IMAGE_ONLY_KEYS


# float32's smallest normal number and its largest over 16, the bounds the clients' defenses
# hold their clip norms and noise scales to (`fedleak.defenses.noise`): updates are float32.
FLOAT32_TINY = 2.0**-126
FLOAT32_NOISE_MAX = (2 - 2.0**-23) * 2.0**127 / 16


@dataclass(frozen=True)
class DataConfig(Settings):
    """Which data set, how it is split among clients, and what the attacker holds."""

    dataset: str = _setting("mnist5k", doc="registry name, or folder:<path>")
    data_dir: str = _setting("", doc="where torchvision sets live; '' = $FEDLEAK_DATA_DIR or cache")
    partition: str = _setting(
        "iid",
        choices=("iid", "dirichlet", "dirichlet-clients", "shards"),
        doc="how client partitions are drawn",
    )
    dirichlet_alpha: float = _setting(
        0.5, low=0.0, low_open=True, doc="Dirichlet concentration (smaller: more skewed labels)"
    )
    shards_per_client: int = _setting(2, low=1, doc="label-sorted shards per client")
    test_fraction: float = _setting(
        0.2, low=0.0, high=1.0, high_open=True, doc="held-out test share of sets without a split"
    )
    aux_size: int = _setting(
        1000, low=0, doc="attacker's auxiliary images (text: sequences), disjoint from clients"
    )
    aux_beta: float = _setting(1.0, low=0.0, high=1.0, doc="fraction of in-distribution aux")
    public_size: int = _setting(0, low=0, doc="public pool for InstaHide-inter, disjoint too")
    seq_len: int = _setting(
        16, low=2, high=1024, doc="text: tokens per sequence (L), up to the models' 1024 positions"
    )
    vocab_size: int = _setting(
        8192, low=257, high=262_144, doc="text: tokens of the BPE trained on aux text"
    )
    tokenizer: str = _setting("bpe", doc="text: bpe (trained on aux text), gpt2, file:<json>")


@dataclass(frozen=True)
class ModelConfig(Settings):
    """The target model, by registry name."""

    name: str = _setting("lenet", doc="registry name, or an import path package.module:factory")
    init: str = _setting(
        "default", choices=("default", "uniform"), doc="uniform: DLG's U(-0.5, 0.5) weights"
    )


@dataclass(frozen=True)
class TrainConfig(Settings):
    """How clients compute their update and how the server applies it."""

    mode: str = _setting(
        "fedsgd", choices=("fedsgd", "fedavg"), doc="share one gradient, or a delta of local steps"
    )
    batch_size: int = _setting(1, low=1, doc="samples per client batch")
    examples: int = _setting(0, low=0, doc="samples per client per round in fedavg; 0 = batch")
    local_steps: int = _setting(1, low=1, doc="local SGD steps per round (fedavg)")
    lr: float = _setting(0.1, low=0.0, low_open=True, doc="client learning rate")
    server_lr: float = _setting(
        1.0, low=0.0, low_open=True, doc="server step on the aggregated update"
    )
    fraction_train: float = _setting(
        1.0, low=0.0, high=1.0, low_open=True, doc="share of clients sampled each round"
    )
    min_clients: int = _setting(1, low=1, doc="fewest clients a round needs")

    @property
    def examples_per_round(self) -> int:
        """FedSGD shares one batch gradient, so a client uses exactly one batch."""
        if self.mode == "fedsgd" or self.examples == 0:
            return self.batch_size
        return self.examples


@dataclass(frozen=True)
class ThreatConfig(Settings):
    """What the honest-but-curious server gets to see."""

    share: str = _setting(
        "batch", choices=("batch", "per-sample"), doc="what a client's update reveals"
    )
    bn_stats: str = _setting(
        "hidden",
        choices=("hidden", "shared"),
        doc="whether the attacks are given BatchNorm batch statistics",
    )
    view: str = _setting(
        "client",
        choices=("client", "aggregate"),
        doc="each client's update, or only the round's sum (secure aggregation)",
    )


@dataclass(frozen=True)
class DefenseConfig(Settings):
    """Client-side defenses as one spec string, e.g. `prune:0.9+gauss:0.01`, and central DP
    (the server clips each client's update and noises the aggregate, after it has seen them)."""

    spec: str = _setting("none", doc="client defenses, e.g. prune:0.9+gauss:0.01")
    dp_delta: float = _setting(
        1e-5, low=0.0, high=1.0, low_open=True, high_open=True, doc="delta of reported epsilons"
    )
    dp_sampling: str = _setting(
        "fixed",
        choices=("fixed", "poisson"),
        doc="how a DP-SGD client draws a batch: exactly B examples, or each of its n with "
        "probability B/n (Poisson: no halved noise in the accounting; in FedAvg per step)",
    )
    central_clip: float = _setting(
        0.0, low=0.0, doc="server-side clip C of each client's update; 0 = no central DP"
    )
    central_noise: float = _setting(
        0.0, low=0.0, doc="central DP noise multiplier z: std z*C/m on the mean of m clients"
    )

    @property
    def label(self) -> str:
        """The defense as reports name it: the clients' spec (marked when DP-SGD draws Poisson
        batches, whose ε differs from the same spec's), then central DP when it is on
        (`central-dp:C:z`), so that a run protected on the server never reads as undefended."""
        spec = f"{self.spec} (poisson)" if self.dp_sampling == "poisson" else self.spec
        if self.central_clip <= 0:
            return spec
        # Every digit: at 6 (`:g`) two cells of a sweep read as one setting (audit EI3).
        clip, noise = format_number(self.central_clip), format_number(self.central_noise)
        central = f"central-dp:{clip}:{noise}"
        return central if spec == "none" else f"{spec}+{central}"


@dataclass(frozen=True)
class AttackConfig(Settings):
    """Which attacks the curious server runs, on whom, and with what budget."""

    names: tuple[str, ...] = _setting(("aux-mean",), doc="comma-separated names, or 'none'")
    clients_per_round: int = _setting(
        0, low=0, doc="0 = attack every client; at most the clients a round trains"
    )
    rounds: str = _setting(
        "all",
        doc="rounds attacked: 'all'; 'every:K' (rounds 1, 1+K, 1+2K, ... and the last); or "
        "comma-separated round numbers and/or 'last'",
    )
    max_iterations: int = _setting(
        2000,
        low=1,
        doc="iteration budget of every optimisation attack, one update of the dummy data each "
        "(learned ones train for their epochs)",
    )
    max_seconds: float = _setting(
        120.0, low=0.0, low_open=True, doc="time budget of one attack on one client"
    )
    show_progress: bool = _setting(False, doc="progress bars for long attacks")
    images_per_client: int = _setting(
        8, low=0, doc="samples saved to image grids (texts/ pairs on text)"
    )
    workers: int = _setting(0, low=0, doc="Ray attack workers; 0 = run attacks inline")
    worker_cpus: float = _setting(1.0, low=0.0, low_open=True, doc="CPUs per attack worker")
    worker_gpus: float = _setting(0.0, low=0.0, doc="GPU share per attack worker")
    max_batch: int = _setting(
        0,
        low=0,
        doc="problems (targets x restarts) optimised as one batch; 0 = automatic (CUDA: free "
        "memory; CPU: stacked updates within 12 MiB)",
    )
    # attack.<name>.<param> values, checked by each attack's own settings (fedleak.attacks).
    params: Mapping[str, Mapping[str, Any]] = internal(dict)


@dataclass(frozen=True)
class MetricsConfig(Settings):
    """How reconstructions are scored beyond MSE, PSNR and SSIM."""

    lpips_nets: tuple[str, ...] = _setting(
        ("alex",),
        choices=("alex", "vgg"),
        doc="LPIPS backbones, comma-separated (alex, vgg), or 'none'; see `fedleak weights`",
    )


@dataclass(frozen=True)
class SimulationConfig(Settings):
    """Fault injection and continuation."""

    # Below 1: a run in which every client fails could only end FAILED.
    fail_rate: float = _setting(
        0.0,
        low=0.0,
        high=1.0,
        high_open=True,
        doc="probability a client fails on purpose (fault tests)",
    )
    resume: bool = _setting(False, doc="continue the run in out-dir after its last round")
    timeout: float = _setting(
        3600.0, low=0.0, low_open=True, doc="seconds the server waits for a round's replies"
    )
    payload_budget_mb: float = _setting(0.0, low=0.0, doc="refuse larger rounds; 0 = no limit")


@dataclass(frozen=True)
class RunConfig(Settings):
    """Everything one run needs; the single source of truth for clients and server alike."""

    name: str = _setting(
        "run",
        check=lambda name: re.fullmatch(NAME_PATTERN, name) is not None,
        allowed=NAME_RULE,
        doc="run name, part of the default run directory",
    )
    # 32 bits: torch's generators keep only a seed's low 32 bits, so seeds 0 and 2**32 drew
    # the same initial model.
    seed: int = _setting(
        0, low=0, high=SEED_MAX, doc="every random choice of the run derives from it"
    )
    # Bounded: the attacked rounds are a set of round numbers, which 1e12 rounds made
    # validation itself run out of memory (audit DO3); studies run thousands.
    num_server_rounds: int = _setting(3, low=1, high=MAX_ROUNDS, doc="federated rounds")
    out_dir: str = _setting("", doc="absolute run directory; '' = runs/<time>-<name>")
    device: str = _setting(
        "auto", choices=("auto", "cpu", "cuda"), doc="auto: CUDA where a process sees a GPU"
    )
    deterministic: bool = _setting(
        True,
        doc="on CUDA, deterministic kernels only (slower): a repeat on the same GPU model "
        "gives the same bits",
    )
    data: DataConfig = nested(DataConfig, "data.")
    model: ModelConfig = nested(ModelConfig, "model.")
    train: TrainConfig = nested(TrainConfig, "train.")
    threat: ThreatConfig = nested(ThreatConfig, "threat.")
    defense: DefenseConfig = nested(DefenseConfig, "defense.")
    attack: AttackConfig = nested(AttackConfig, "attack.")
    metrics: MetricsConfig = nested(MetricsConfig, "metrics.")
    sim: SimulationConfig = nested(SimulationConfig, "sim.")

    @property
    def examples_per_round(self) -> int:
        """The examples a client declares, and the attacks reconstruct, per round: the train
        section's, or K x B when DP-SGD draws each of FedAvg's K steps a Poisson batch of B on
        average (the count drawn stays private)."""
        if self.defense.dp_sampling == "poisson" and self.train.mode == "fedavg":
            return self.train.local_steps * self.train.batch_size
        return self.train.examples_per_round

    def to_flat(self) -> dict[str, Any]:
        """The Flower-style flat mapping that parses back to this configuration."""
        flat: dict[str, Any] = {}
        for key, spec in flat_keys(RunConfig):
            section = key.partition(".")[0] if "." in key else None
            owner = getattr(self, section) if section else self
            _flatten_value(flat, key, getattr(owner, spec.name))
        for attack, params in self.attack.params.items():
            for param, value in params.items():
                flat[f"attack.{attack}.{param}"] = value
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
                lines.append(f"\n[{'.'.join(_toml_key(part) for part in head.split('.'))}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in items.items())
        return "\n".join(lines).strip() + "\n"


def _flatten_value(flat: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, tuple):
        flat[key] = ",".join(value) or "none"
    else:
        flat[key] = value


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n"}
_TOML_ESCAPES |= {"\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(part: str) -> str:
    """One part of a dotted TOML key: bare where TOML allows it, quoted otherwise (an attack
    named `lti+ig`: a bare `[attack.lti+ig]` is not TOML)."""
    return part if _BARE_KEY.fullmatch(part) else _toml_string(part)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def known_keys() -> list[str]:
    """Every flat key a run config may set (attack parameters aside)."""
    return [key for key, _ in flat_keys(RunConfig)]


def key_help() -> list[KeyHelp]:
    """Type, default and one line of help of every run-config key (attack parameters aside)."""
    return help_lines(RunConfig)


def parse_flat(
    flat: Mapping[str, Any], base: RunConfig | None = None, recorded: bool = False
) -> RunConfig:
    """Parse Flower's flat run config (dotted keys) on top of `base` (defaults if None).

    Keys `attack.<attack-name>.<param>` carry per-attack hyper-parameters; the attack
    validates them when it is built. `recorded`: a run's own config.toml, in which an
    earlier fedleak may have kept two spellings of a key; the last one, which ran, is read.
    """
    base = base or RunConfig()
    known = set(known_keys())
    values: dict[str, Any] = {}
    params = {name: dict(p) for name, p in base.attack.params.items()}
    spelled: dict[str, str] = {}
    for key, raw in flat.items():
        if not isinstance(key, str):
            raise ConfigError(f"{key!r}: setting names must be strings")
        if not recorded:
            _check_one_spelling(key, raw, flat, spelled)
        head, _, rest = key.partition(".")
        if key.replace("_", "-") in known:
            values[key] = raw
        elif head == "attack" and "." in rest:
            attack, _, param = rest.partition(".")
            if not attack or not param or "." in param:
                raise ConfigError(
                    f"{shown(key)}: attack parameters are written attack.<name>.<param>"
                )
            _check_param(key, raw)
            given = params.setdefault(attack, {})
            # The base's other spelling of this parameter is overridden, not kept beside it.
            for other in [p for p in given if p != param and key_of(p) == key_of(param)]:
                del given[other]
            given[param] = raw
        else:
            raise unknown(key, sorted(known))
    config = parse_settings(base, values)
    config = dataclasses.replace(config, attack=dataclasses.replace(config.attack, params=params))
    _check_consistency(config, recorded)
    return config


@functools.cache
def text_keys() -> frozenset[str]:
    """The run-config keys whose value is text (a name, a list of names, a folder, a spec)."""
    return frozenset(key for key, spec in flat_keys(RunConfig) if takes_text(spec.kind))


def canonical_key(key: str) -> str:
    """A flat key as the run records it: a setting's with hyphens for underscores, an attack
    parameter's with its parameter's (`attack.ig.bn_mode` is `attack.ig.bn-mode`; the
    attack's own name stays as written). Keys neither names are returned unchanged."""
    hyphens = key.replace("_", "-")
    if hyphens in set(known_keys()):
        return hyphens
    head, _, rest = key.partition(".")
    attack, _, param = rest.partition(".")
    if head == "attack" and attack and param:
        return f"attack.{attack}.{key_of(param)}"
    return key


def _check_one_spelling(
    key: str, raw: Any, flat: Mapping[str, Any], spelled: dict[str, str]
) -> None:
    """One setting is given once by one source: `tv_weight` and `tv-weight` with other values
    both ran, the last written winning, and config.toml recorded both (audit EA1)."""
    canonical = canonical_key(key)
    other = spelled.setdefault(canonical, key)
    if other != key and flat[other] != raw:
        raise ConfigError(
            f"{shown(key)}={raw!r} and {shown(other)}={flat[other]!r}: two spellings of "
            f"{canonical} with different values; give one"
        )


def _check_param(key: str, raw: Any) -> None:
    """What any attack parameter must be before its attack reads it: a value a run config
    (TOML, Flower's int64 run config) can carry, and no NUL inside strings."""
    values = raw if isinstance(raw, list) else [raw]
    for value in values:
        if isinstance(value, dict | list) or not isinstance(value, int | float | str | bool):
            raise ConfigError(
                f"{shown(key)}={shown_value(raw)}: expected a number, string or boolean "
                "(or a list of numbers)"
            )
        if isinstance(value, int) and abs(value) > INT64_MAX:
            raise ConfigError(
                f"{shown(key)}={shown_value(raw)}: expected an integer in "
                f"[-{INT64_MAX}, {INT64_MAX}]"
            )
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(f"{shown(key)}={shown_value(raw)}: expected no NUL characters")


def _check_consistency(config: RunConfig, recorded: bool = False) -> None:
    """Rules that involve more than one key, and bounds added after runs recorded values
    beyond them (skipped for a run's own config.toml, `recorded`)."""
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
    poisson = config.defense.dp_sampling == "poisson"  # draws from the whole partition
    if train.mode == "fedavg" and 0 < train.examples < train.batch_size and not poisson:
        raise ConfigError(
            f"train.examples={train.examples}: fedavg's batches of train.batch-size="
            f"{train.batch_size} are drawn from the round's examples, so expected 0 or at least "
            f"{train.batch_size}"
        )
    used = train.local_steps * train.batch_size
    # (Poisson steps draw from the whole partition: there train.examples is refused apart.)
    if train.mode == "fedavg" and train.examples > used and not poisson:
        # The client would declare (and be scored on) examples that never enter its update.
        raise ConfigError(
            f"train.examples={train.examples}: fedavg's {train.local_steps} local step(s) of "
            f"train.batch-size={train.batch_size} use {used} examples, so the others would "
            f"never enter the update; expected 0 or at most {used} (or more local steps)"
        )
    if config.threat.share == "per-sample" and train.mode != "fedsgd":
        raise ConfigError(
            "threat.share='per-sample': per-sample updates exist only in fedsgd; "
            "expected train.mode='fedsgd' or threat.share='batch'"
        )
    defense = config.defense
    if not recorded and 0 < defense.central_clip < FLOAT32_TINY:
        # Every clipped update was zero: the model never moved and the run reported a central
        # ε (audit EH3). A run that recorded one reads as it ran (audit EJ3).
        raise ConfigError(
            f"defense.central-clip={defense.central_clip:g}: expected 0 (no central DP) or a "
            f"finite number >= {FLOAT32_TINY:.4g} (float32's smallest normal: a smaller clip "
            "zeroes every update)"
        )
    if not recorded and defense.central_noise * defense.central_clip > FLOAT32_NOISE_MAX:
        raise ConfigError(
            f"defense.central-noise={defense.central_noise:g} with defense.central-clip="
            f"{defense.central_clip:g}: z x C = {defense.central_noise * defense.central_clip:g} "
            f"must be at most {FLOAT32_NOISE_MAX:.4g} (float32's largest number over 16: the "
            "noised aggregate overflows)"
        )
    if defense.central_noise > 0 and defense.central_clip == 0:
        raise ConfigError(
            f"defense.central-noise={defense.central_noise:g}: central DP noise is calibrated to "
            "the clipping norm, so expected defense.central-clip > 0 (or central-noise = 0)"
        )
    if config.threat.view == "aggregate" and train.mode == "fedavg":
        raise ConfigError(
            "threat.view='aggregate' with train.mode='fedavg': the aggregate of FedAvg deltas "
            "mixes each client's own K local steps, which the attacks cannot replay as one "
            "client's; expected train.mode='fedsgd' or threat.view='client'"
        )
    attacked_rounds(config.attack.rounds, config.num_server_rounds)
    if config.out_dir and not Path(config.out_dir).is_absolute():
        raise ConfigError(
            f"out-dir={config.out_dir!r}: expected an absolute path (the SuperLink's working "
            "directory is not yours) or '' for the default"
        )


def attacked_rounds(spec: str, num_rounds: int) -> frozenset[int] | None:
    """The rounds `attack.rounds` names (None: every round); `ConfigError` when it names a
    round the run does not have. 'last' is round `num_rounds`; 'every:K' follows leakage
    through a long study (1, 1+K, ... and the last) without paying for attacks every round."""
    tokens = [token.strip().lower() for token in spec.split(",")]
    if tokens == ["all"]:
        return None
    allowed = (
        f"'all', 'every:K' with K >= 1, or comma-separated round numbers in 1..{num_rounds} "
        "and/or 'last'"
    )
    if len(tokens) == 1 and tokens[0].startswith("every:"):
        step = tokens[0].removeprefix("every:").strip()
        if not (step.isdigit() and int(step) >= 1):
            raise ConfigError(f"attack.rounds={spec!r}: expected {allowed}")
        return frozenset(range(1, num_rounds + 1, int(step))) | {num_rounds}
    rounds = set()
    for token in tokens:
        if token == "last":
            rounds.add(num_rounds)
        elif token.isdigit() and 1 <= int(token) <= num_rounds:
            rounds.add(int(token))
        else:
            raise ConfigError(f"attack.rounds={spec!r}: expected {allowed}")
    return frozenset(rounds)


def flatten_toml(document: Mapping[str, Any], parent: str = "", where: str = "") -> dict[str, Any]:
    """Nested TOML tables to dotted keys, as Flower flattens `[tool.flwr.app.config]`. One key
    written twice with different values (`"a.b" = 1` beside a table `[a]` holding `b = 2`,
    which TOML allows) is refused: the later one won without a word (audit EI1). `where`
    names the table in that error."""
    flat: dict[str, Any] = {}
    # A stack rather than recursion (a file may nest tables thousands deep), keys in the
    # order they were written.
    stack = [(parent, iter(document.items()))]
    while stack:
        prefix, items = stack[-1]
        for key, value in items:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                stack.append((dotted, iter(value.items())))
                break
            if dotted in flat and flat[dotted] != value:
                named = f"{where}.{dotted}" if where else dotted
                raise ConfigError(
                    f"{named}={value!r} and {named}={flat[dotted]!r}: one key written twice "
                    "(as a dotted key and inside a table); give it once"
                )
            flat[dotted] = value
        else:
            stack.pop()
    return flat


def parse_toml(
    text: str, base: RunConfig | None = None, source: str = "preset", recorded: bool = False
) -> RunConfig:
    """Parse a TOML preset (nested tables or dotted keys); `source` names it in errors;
    `recorded` as for `parse_flat`."""
    try:
        document = tomllib.loads(text)
    except (ValueError, RecursionError) as error:  # TOMLDecodeError, a number too long, nesting
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{source} is not valid TOML: {first_line}") from None
    return parse_flat(flatten_toml(document), base, recorded)


# A configuration is a few kilobytes; a file far larger is no preset (and parsing one of
# millions of keys took 47 s and 1.7 GB before it was refused).
MAX_TOML_BYTES = 1_000_000


def load_toml(path: str | Path, base: RunConfig | None = None, recorded: bool = False) -> RunConfig:
    """Read and parse a TOML preset file (a run's config.toml included; `recorded` as for
    `parse_flat`)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_TOML_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read preset ({error.strerror})") from None
    if len(data) > MAX_TOML_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_TOML_BYTES // 1_000_000} MB; expected a TOML preset"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    return parse_toml(text, base, source=str(path), recorded=recorded)
