"""Checks of a configuration against the registries of the other rooms, before any work starts.

`fedleak.config` checks types and ranges on its own; names that only a registry knows (data
sets, models, attacks, defense specs) and combinations that only a built model reveals
(BatchNorm with per-sample operations) are checked here, each with one clear line.
"""

from __future__ import annotations

from fedleak.attacks.registry import ATTACK_NAMES, build_attack
from fedleak.config import ConfigError, RunConfig
from fedleak.data import DATASETS, DataSplitError, build_federated_data
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


def validate_data_split(config: RunConfig, num_clients: int, *, download: bool = True) -> None:
    """Raise `ConfigError` when the data cannot be split as configured for `num_clients`
    clients: the auxiliary set and public pool leave the clients too few images, or a client's
    partition holds fewer images than it trains on in a round.

    Loads the data set (downloading it when allowed, as the run would; `DatasetUnavailable`
    passes through for the caller to report) and builds the run's split exactly as clients and
    server will, so it is cached for them.
    """
    data = config.data
    try:
        fd = build_federated_data(
            data.dataset,
            data.data_dir or None,
            num_clients,
            data.partition,
            config.seed,
            alpha=data.dirichlet_alpha,
            shards_per_partition=data.shards_per_client,
            aux_size=data.aux_size,
            aux_beta=data.aux_beta,
            test_fraction=data.test_fraction,
            public_size=data.public_size,
            download=download,
        )
    except DataSplitError as error:
        raise ConfigError(
            f"data split of {data.dataset!r} for {num_clients} clients (data.aux-size="
            f"{data.aux_size}, data.test-fraction={data.test_fraction:g}, data.public-size="
            f"{data.public_size}, data.partition={data.partition!r}): {error}"
        ) from None
    needed = config.train.examples_per_round
    sizes = [len(p) for p in fd.partitions]
    smallest = min(sizes)
    if smallest < needed:
        key = "train.batch-size" if needed == config.train.batch_size else "train.examples"
        raise ConfigError(
            f"{key}={needed}: the smallest of the {num_clients} client partitions of "
            f"{data.dataset!r} holds {smallest} images ({sum(sizes)} images left to the clients "
            f"after data.aux-size={data.aux_size} and data.public-size={data.public_size}); "
            f"expected at most {smallest}, or fewer clients or a smaller auxiliary set"
        )
