"""Checks of a configuration against the registries of the other rooms, before any work starts.

`fedleak.config` checks types and ranges on its own; names that only a registry knows (data
sets, models, attacks, defenses; plugins included) are looked up in those same registries, each
attack's parameters are parsed by its own settings dataclass (nothing is built), and
combinations that only a built model reveals (BatchNorm with per-sample operations) are checked
here, each with one clear line.
"""

from __future__ import annotations

from fedleak.attacks.registry import ATTACKS, attack_entry
from fedleak.config import ConfigError, RunConfig, key_help
from fedleak.data import DatasetUnavailable, data_shape, dataset_entry, load_dataset
from fedleak.defenses import DefenseSpecError, parse_defense_spec
from fedleak.models import ModelSpec, build_model, groupnorm_advice, has_batchnorm, model_entry
from fedleak.settings import KeyHelp


def validate_components(config: RunConfig) -> None:
    """Raise `ConfigError` for the first setting no registry accepts."""
    dataset_entry(config.data.dataset)
    model_entry(config.model.name)
    try:
        pipeline = parse_defense_spec(config.defense.spec)
    except DefenseSpecError as error:
        raise ConfigError(f"defense.spec={config.defense.spec!r}: {error}") from None
    for name in config.attack.names:
        attack_entry(name).configure(config.attack.params.get(name, {}))
        init = [v for k, v in config.attack.params.get(name, {}).items() if k.endswith("init")]
        if "aux-mean" in init and config.data.aux_size == 0:
            raise ConfigError(
                f"attack.{name}.init='aux-mean': starts from the mean auxiliary image, so "
                "expected data.aux-size > 0 (or another init: randn, rand, half)"
            )
    per_sample = config.threat.share == "per-sample" or pipeline.needs_per_sample
    aggregate = config.threat.view == "aggregate"
    if (per_sample or aggregate) and has_batchnorm(build_model(model_spec_of(config))):
        if per_sample:
            raise ConfigError(
                f"model.name={config.model.name!r}: BatchNorm couples the samples of a batch, "
                f"so per-sample operations (threat.share / defense {config.defense.spec!r}) are "
                f"undefined; {groupnorm_advice(config.model.name)}"
            )
        raise ConfigError(
            f"threat.view='aggregate' with model.name={config.model.name!r}: each client "
            "normalises with its own batch's BatchNorm statistics, so the aggregate is not the "
            "gradient of one batch of the union that the attacks replay; use a model without "
            f"BatchNorm ({groupnorm_advice(config.model.name)}) or threat.view='client'"
        )


def model_spec_of(config: RunConfig) -> ModelSpec:
    """The run's model spec, shaped by the data set (declared by its registry entry, else read
    from the loaded set)."""
    shape = data_shape(config.data.dataset)
    if shape is None:
        dataset = load_dataset(
            config.data.dataset,
            config.data.data_dir or None,
            seed=config.seed,
            test_fraction=config.data.test_fraction,
        )
        shape = dataset.input_shape, dataset.num_classes
    return ModelSpec(config.model.name, shape[0], shape[1], config.model.init, config.seed)


def data_unavailable(config: RunConfig) -> str:
    """Why the run's data set cannot be loaded without a download ('' when it can)."""
    try:
        load_dataset(
            config.data.dataset,
            config.data.data_dir or None,
            seed=config.seed,
            test_fraction=config.data.test_fraction,
            download=False,
        )
    except DatasetUnavailable as error:
        first = " ".join(str(error).split())
        return f"data set {config.data.dataset!r} unavailable: {first}"
    return ""


def setting_help(attack: str | None = None) -> list[KeyHelp]:
    """Every run setting, then every registered attack's parameters (or one attack's), each
    with its type, default and a line of help (`fedleak config-keys`)."""
    lines = key_help()
    names = ATTACKS.names() if attack is None else (attack_entry(attack).name,)
    for name in names:
        lines += attack_entry(name).help()
    return lines
