"""Checks of a configuration against the registries of the other rooms, before any work starts.

`fedleak.config` checks types and ranges on its own; names that only a registry knows (data
sets, models, attacks, defense specs) and combinations that only a built model reveals
(BatchNorm with per-sample operations) are checked here, each with one clear line.
"""

from __future__ import annotations

from fedleak.attacks.registry import ATTACK_NAMES, build_attack
from fedleak.config import ConfigError, RunConfig
from fedleak.data import DATASETS
from fedleak.defenses import DefenseSpecError, parse_defense_spec
from fedleak.models import MODEL_NAMES, ModelSpec, build_model, has_batchnorm


def validate_components(config: RunConfig) -> None:
    """Raise `ConfigError` for the first setting no registry accepts."""
    dataset = config.data.dataset
    if dataset not in DATASETS and not dataset.startswith("folder:"):
        raise ConfigError(
            f"data.dataset={dataset!r}: expected one of {', '.join(DATASETS)} or folder:<path>"
        )
    if config.model.name not in MODEL_NAMES:
        raise ConfigError(
            f"model.name={config.model.name!r}: expected one of {', '.join(MODEL_NAMES)}"
        )
    try:
        pipeline = parse_defense_spec(config.defense.spec)
    except DefenseSpecError as error:
        raise ConfigError(f"defense.spec={config.defense.spec!r}: {error}") from None
    for name in config.attack.names:
        if name not in ATTACK_NAMES:
            raise ConfigError(
                f"attack.names: unknown attack {name!r}; expected names from "
                f"{', '.join(ATTACK_NAMES)}"
            )
    # Parameters of a known attack left out of attack.names (a preset's, after the names were
    # overridden) are checked but unused; those of an unknown attack are a typo.
    for name in config.attack.params:
        if name not in ATTACK_NAMES:
            raise ConfigError(
                f"attack.{name}.*: parameters for an unknown attack {name!r}; expected names "
                f"from {', '.join(ATTACK_NAMES)}"
            )
    for name in dict.fromkeys([*config.attack.names, *config.attack.params]):
        try:
            build_attack(name, config.attack.params.get(name, {}), seed=config.seed)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"attack.{name}.*: {error}") from None
    per_sample = config.threat.share == "per-sample" or pipeline.needs_per_sample
    if per_sample and _has_batchnorm(config.model.name):
        raise ConfigError(
            f"model.name={config.model.name!r}: BatchNorm couples the samples of a batch, so "
            f"per-sample operations (threat.share / defense {config.defense.spec!r}) are "
            f"undefined; use a GroupNorm variant such as {_groupnorm_variant(config.model.name)!r}"
        )


def _has_batchnorm(model_name: str) -> bool:
    # Any data shape reveals the normalisation layers; a small colour one keeps this cheap.
    return has_batchnorm(build_model(ModelSpec(model_name, (3, 32, 32), 10)))


def _groupnorm_variant(model_name: str) -> str:
    base = model_name.removesuffix("-bn")
    return base if base in MODEL_NAMES and base != model_name else f"{model_name}-gn"
