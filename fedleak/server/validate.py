"""Checks of a configuration against the registries of the other rooms, before any work starts.

`fedleak.config` checks types and ranges on its own; names that only a registry knows (data
sets, models, attacks, defense specs) and combinations that only a built model reveals
(BatchNorm with per-sample operations) are checked here, each with one clear line.
"""

from __future__ import annotations

from fedleak.attacks.registry import ATTACK_NAMES, attack_modalities, build_attack
from fedleak.config import ConfigError, RunConfig
from fedleak.data import DATASETS, TOKENIZER_KINDS, dataset_modality
from fedleak.defenses import DefenseSpecError, parse_defense_spec
from fedleak.models import MODEL_NAMES, ModelSpec, build_model, has_batchnorm, model_modality

_TEXT_DEFENSES = "prune, sign, gauss, dpsgd"


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
    modality = dataset_modality(dataset)
    if model_modality(config.model.name) != modality:
        fitting = [m for m in MODEL_NAMES if model_modality(m) == modality]
        raise ConfigError(
            f"model.name={config.model.name!r} reads {model_modality(config.model.name)}s but "
            f"data.dataset={dataset!r} holds {modality}; expected one of {', '.join(fitting)}"
        )
    if modality == "tokens":
        _validate_text(config, pipeline.encoder is not None)
    for name in config.attack.names:
        if name not in ATTACK_NAMES:
            raise ConfigError(
                f"attack.names: unknown attack {name!r}; expected names from "
                f"{', '.join(ATTACK_NAMES)}"
            )
        try:
            attack = build_attack(name, config.attack.params.get(name, {}), seed=config.seed)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"attack.{name}.*: {error}") from None
        if modality not in attack_modalities(attack):
            fitting = [n for n in ATTACK_NAMES if modality in attack_modalities(build_attack(n))]
            raise ConfigError(
                f"attack.names: {name!r} reconstructs {', '.join(attack_modalities(attack))}s, "
                f"not the {modality} of data.dataset={dataset!r}; attacks for them: "
                f"{', '.join(fitting)}"
            )
    per_sample = config.threat.share == "per-sample" or pipeline.needs_per_sample
    if per_sample and _has_batchnorm(config.model.name):
        raise ConfigError(
            f"model.name={config.model.name!r}: BatchNorm couples the samples of a batch, so "
            f"per-sample operations (threat.share / defense {config.defense.spec!r}) are "
            f"undefined; use a GroupNorm variant such as {_groupnorm_variant(config.model.name)!r}"
        )


def _validate_text(config: RunConfig, encoded: bool) -> None:
    """What the language task cannot honour: encodings, label-based splits, a public pool."""
    data = config.data
    if encoded:
        raise ConfigError(
            f"defense.spec={config.defense.spec!r}: input encodings (mixup, instahide) mix "
            f"images and do not apply to token sequences; allowed for text: {_TEXT_DEFENSES}"
        )
    for key, value, allowed in (
        ("data.partition", data.partition, "iid"),
        ("data.aux-beta", data.aux_beta, 1.0),
        ("data.public-size", data.public_size, 0),
    ):
        if value != allowed:
            raise ConfigError(
                f"{key}={value!r}: text corpora are split by whole documents, without classes "
                f"or a public pool, so expected {allowed!r} for data.dataset={data.dataset!r}"
            )
    tokenizer = data.tokenizer
    if tokenizer not in ("bpe", "gpt2") and not tokenizer.startswith("file:"):
        raise ConfigError(
            f"data.tokenizer={tokenizer!r}: expected one of {', '.join(TOKENIZER_KINDS)}"
        )


def _has_batchnorm(model_name: str) -> bool:
    # Any data shape reveals the normalisation layers; a small one keeps this cheap.
    if model_modality(model_name) == "tokens":
        return has_batchnorm(build_model(ModelSpec(model_name, (4,), 300)))
    return has_batchnorm(build_model(ModelSpec(model_name, (3, 32, 32), 10)))


def _groupnorm_variant(model_name: str) -> str:
    base = model_name.removesuffix("-bn")
    return base if base in MODEL_NAMES and base != model_name else f"{model_name}-gn"
