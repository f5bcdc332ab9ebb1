"""Checks of a configuration against the registries of the other rooms, before any work starts.

`fedleak.config` checks types and ranges on its own; names that only a registry knows (data
sets, models, attacks, defense specs) and combinations that only a built model reveals
(BatchNorm with per-sample operations) are checked by `validate_components`, each with one
clear line. `validate_run` adds what only the number of clients and the data reveal: runs in
which every client or every attack would fail in every round (`check_data_split`,
`check_attacks`), a δ that leaves the reported ε meaningless (`check_delta`) and resource
requests Ray cannot meet (`check_resources`); a sweep calls it for each cell before the first
one starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from pathlib import Path

import torch

from fedleak.attacks.labels import LabelRecoveryError, find_last_layer
from fedleak.attacks.learned.config import idle_settings
from fedleak.attacks.learned.hashing import resolve_num_bins
from fedleak.attacks.registry import ATTACKS, attack_entry, attack_modalities, build_attack
from fedleak.config import (
    AttackConfig,
    ConfigError,
    RunConfig,
    canonical_key,
    key_help,
    keys_without_effect,
    text_keys,
)
from fedleak.data import (
    FILE_PREFIX,
    FOLDER_PREFIX,
    TOKENIZER_KINDS,
    DatasetUnavailable,
    DataSplitError,
    FederatedData,
    data_shape,
    dataset_entry,
    dataset_modality,
    load_corpus,
    load_dataset,
)
from fedleak.data.registry import DATASETS
from fedleak.defenses import (
    DPSGD,
    DefensePipeline,
    DefenseSpecError,
    InstaHide,
    parse_defense_spec,
)
from fedleak.defenses.registry import DEFENSES
from fedleak.defenses.spec import defense_names
from fedleak.lines import listed, one_line
from fedleak.models import (
    ModelSpec,
    build_model,
    count_parameters,
    groupnorm_advice,
    has_batchnorm,
    model_entry,
    model_modality,
    model_names,
)
from fedleak.models.fitness import unfit_reason
from fedleak.models.registry import MODELS
from fedleak.registry import PluginError
from fedleak.runtime import federated_data, model_spec
from fedleak.server.build import cache_dirs
from fedleak.server.payload import check_payload, clients_per_round
from fedleak.server.pool import (
    _cluster_address,
    check_cluster_address,
    local_cpus,
    ray_init_args,
)
from fedleak.settings import KeyHelp, Settings, flat_values, key_of, means_none

# What each modality's inputs are called in a refusal ("reconstructs images, not the tokens").
_PLURAL = {"image": "images", "tokens": "tokens"}
# Data-room argument names in DataSplitError messages -> the settings a user writes.
_SPLIT_SETTINGS = {
    "aux_size": "data.aux-size",
    "beta": "data.aux-beta",
    "public_size": "data.public-size",
    "test_fraction": "data.test-fraction",
    "alpha": "data.dirichlet-alpha",
    "shards_per_partition": "data.shards-per-client",
    "num_partitions": "num-clients",
}
_SPLIT_ARGUMENT = re.compile(r"(?<![\w.-])(" + "|".join(_SPLIT_SETTINGS) + r")\b")


def validate_run(
    config: RunConfig, num_clients: int, client_cpus: float = 1.0, client_gpus: float = 0.0
) -> FederatedData:
    """Every check a run needs before Ray starts; returns the clients' data split.

    Raises `ConfigError` (one line) for the first problem; a data set that is not on disk
    raises `DatasetUnavailable`, whose line names where it looked and how to obtain it.
    """
    validate_components(config)
    check_resources(config, num_clients, client_cpus, client_gpus)
    ray_init_args(config, client_cpus, client_gpus)  # GPU shares, room for attack workers
    return validate_federation(config, num_clients)


def validate_federation(config: RunConfig, num_clients: int) -> FederatedData:
    """The checks that need the federation's size (`validate_run`'s, and a server's behind a
    SuperLink once its nodes have said it): the data split, the defense and the attacks on the
    model, δ and the payload; returns the clients' data split."""
    fd = check_data_split(config, num_clients)
    check_defense(config.defense.spec, model_spec(config, fd), config.train.mode)
    check_attacks(config, fd, num_clients)
    check_delta(config, fd, num_clients)
    check_payload(config, model_spec(config, fd), num_clients)
    return fd


def canonical_spec(spec: str) -> str:
    """A defense spec in canonical form (`mixup:4+prune:0.9` however it was written, `none`
    for ` NONE `); one that does not parse is left for the checks to refuse."""
    try:
        return parse_defense_spec(spec).spec
    except ValueError:
        return spec


def canonical(config: RunConfig) -> RunConfig:
    """The configuration with its defense spec in canonical form, so one pipeline is one
    setting in a run's records and reports, and each attack's `cache-dir` an absolute path: a
    relative one, resumed from another directory, named another folder without a word."""
    spec = canonical_spec(config.defense.spec)
    if spec != config.defense.spec:
        config = dataclasses.replace(config, defense=dataclasses.replace(config.defense, spec=spec))
    params = {
        name: {
            key: os.path.abspath(os.path.expanduser(value))
            if key.replace("_", "-") == "cache-dir"
            and isinstance(value, str)
            and not means_none(value)
            else value
            for key, value in given.items()
        }
        for name, given in config.attack.params.items()
    }
    if params == config.attack.params:
        return config
    return dataclasses.replace(config, attack=dataclasses.replace(config.attack, params=params))


def resume_form(config: RunConfig, recorded: bool = False) -> RunConfig:
    """The configuration as a resume compares it: each attack of the run with every parameter
    at the value it takes (a key set to its default changes nothing), the parameters of
    attacks the run does not use dropped (they change nothing either), and the attacks named
    in one order (each draws from its own seeded streams: their order changes no row).

    `recorded`: a run's own configuration, whose attack parameters an earlier fedleak may
    have accepted where this one refuses them: `ConfigError` naming the parameter (compared
    raw, every resolved parameter read as a difference, audit EM1)."""
    params: dict[str, dict[str, object]] = {}
    for name in config.attack.names:
        given = config.attack.params.get(name, {})
        try:
            settings = attack_entry(name).configure(given)
        except PluginError:  # a plug-in missing here: said where it is used
            params[name] = dict(given)
            continue
        except ConfigError as error:
            if recorded:
                raise ConfigError(
                    f"the run was made with settings this fedleak refuses ({error})"
                ) from None
            params[name] = dict(given)  # refused in its own words where it is used
            continue
        if settings is not None:
            params[name] = flat_values(settings)
    attack = dataclasses.replace(config.attack, names=tuple(sorted(config.attack.names)))
    return dataclasses.replace(config, attack=dataclasses.replace(attack, params=params))


def check_seen_by_ray(config: RunConfig, own_clients: bool = True) -> None:
    """Refuse a component registered by code in this process where another process needs it:
    Ray's client actors build the model, load the data and apply the defense, and attack
    workers (`attack.workers` > 0) build the model and run the attacks; none of them runs the
    caller's code, so the run would fail in its first round (or, for a replaced built-in, use
    the built-in). An audited app's clients are its own (`own_clients` False)."""
    needed = []
    if own_clients:
        needed += [
            (MODELS, "model.name", config.model.name, "fedleak.models"),
            (DATASETS, "data.dataset", config.data.dataset, "fedleak.datasets"),
        ]
        needed += [
            (DEFENSES, "defense.spec", name, "fedleak.defenses")
            for name in defense_names(config.defense.spec)
        ]
    if config.attack.workers > 0:
        if not own_clients:
            needed.append((MODELS, "model.name", config.model.name, "fedleak.models"))
        needed += [(ATTACKS, "attack.names", n, "fedleak.attacks") for n in config.attack.names]
    for registry, setting, name, group in needed:
        if name.partition(":")[0] == "__main__":  # the caller's script, which Ray never runs
            raise ConfigError(
                f"{setting}={name!r}: names the calling script's own module, which the run's "
                "Ray processes do not import; move it to a module on their PYTHONPATH, or ship "
                f"it with an entry point in group {group!r} (docs/api.md)"
            )
        if registry.only_in_this_process(name):
            workers_only = registry is ATTACKS or not own_clients
            inline = " (or set attack.workers = 0)" if workers_only else ""
            raise ConfigError(
                f"{setting}: {name!r} is registered by code in this process only, which the "
                f"run's Ray processes do not run; ship it with an entry point in group "
                f"{group!r}{inline} (docs/api.md)"
            )


def check_absolute_paths(config: RunConfig) -> None:
    """Refuse a relative path in the settings of a ServerApp that Flower starts (`flwr run`,
    an audited app): it would be read from the SuperLink's working directory, not the user's,
    and a folder of the same name there silently taken for the user's (audit EQ1), as
    `out-dir` is refused. `fedleak run` reads its paths where the user is."""
    named = [("data.dataset", config.data.dataset, FOLDER_PREFIX)]
    named += [("data.tokenizer", config.data.tokenizer, FILE_PREFIX)]
    named += [("data.data-dir", config.data.data_dir, "")]
    named += [
        (f"attack.{name}.{key}", str(value), "")
        for name, given in config.attack.params.items()
        for key, value in given.items()
        if key.replace("_", "-") == "cache-dir" and not means_none(value)
    ]
    for setting, value, prefix in named:
        if not value or not value.startswith(prefix):
            continue
        if not Path(value.removeprefix(prefix)).expanduser().is_absolute():
            raise ConfigError(
                f"{setting}={value!r}: expected an absolute path (the ServerApp runs in the "
                "SuperLink's working directory, not yours)"
            )


def check_model(spec: ModelSpec) -> None:
    """Refuse a model that fails on one input of the data's shape or on a batch of two (a
    forward that flattens to one row, audit DM4), or does not score every class (a user's
    `module:factory` model): every client would fail in its first step."""
    tokens = model_modality(spec.name) == "tokens"
    try:
        model = build_model(spec).eval()
    except ConfigError:  # already one line naming the model (a plug-in factory that raised)
        raise
    except (Exception, SystemExit) as error:  # the user's code: any failure is theirs
        detail = one_line(f"{type(error).__name__}: {error}", 200)
        raise ConfigError(f"model.name={spec.name!r}: cannot be built ({detail})") from None
    # Said before a forward fails on float32 inputs with torch's own words (audit DT4).
    wide = [(name, p.dtype) for name, p in model.named_parameters() if p.dtype != torch.float32]
    if wide:
        raise ConfigError(
            f"model.name={spec.name!r}: parameter {wide[0][0]!r} is {wide[0][1]}; fedleak's "
            "clients, attacks and metrics work in float32 (return model.float() from the factory)"
        )
    for count in (1, 2):
        shape = (count, *spec.input_shape)
        inputs = "one input" if count == 1 else f"a batch of {count} inputs"
        expected = (*shape, spec.num_classes) if tokens else (count, spec.num_classes)
        try:
            with torch.no_grad():
                out = model(torch.zeros(shape, dtype=torch.long if tokens else torch.float32))
        except ConfigError:
            raise
        except (Exception, SystemExit) as error:  # the user's forward; its exit ends nothing
            detail = one_line(f"{type(error).__name__}: {error}", 200)
            raise ConfigError(
                f"model.name={spec.name!r}: fails on {inputs} of shape {shape} ({detail})"
            ) from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"model.name={spec.name!r}: outputs {got} for {inputs} of shape {shape}; "
                f"expected {expected} (a score for each of the data's {spec.num_classes} "
                f"{'tokens' if tokens else 'classes'})"
            )
        if not bool(torch.isfinite(out).all()):
            # Every loss, accuracy and gradient would be NaN, and the run went on to DONE.
            raise ConfigError(
                f"model.name={spec.name!r}: outputs NaN or infinite scores for {inputs} of "
                f"shape {shape}; expected finite scores"
            )


def check_defense(defense_spec: str, spec: ModelSpec, mode: str = "fedsgd") -> None:
    """Release one random update of the model's shape through a plugin's defense, which may
    drop or reshape tensors: every client would fail on it in its first round. Built-in steps
    are tested and skip this (a ResNet-18's update costs seconds to prune)."""
    pipeline = parse_defense_spec(defense_spec)
    if all(type(step).__module__.startswith("fedleak.") for step in pipeline.steps):
        return
    generator = torch.Generator().manual_seed(0)
    trained = [(n, p) for n, p in build_model(spec).named_parameters() if p.requires_grad]
    update = {name: torch.randn(p.shape, generator=generator) for name, p in trained}
    pair = {name: torch.stack([g, -g]) for name, g in update.items()}
    # Every way a client or a learned attack of a `mode` run releases an update: the batched
    # one (each of a client's per-sample gradients, LTI's training pairs) failed only in the
    # run's first round (audit DM6); a FedAvg delta only FedAvg's clients release (DP2).
    releases = {
        "an update": lambda: pipeline.share(update, 2, generator),
        "per-sample updates": lambda: pipeline.share_each(pair, generator),
    }
    if mode == "fedavg":
        releases["a FedAvg delta"] = lambda: pipeline.share_delta(update, generator)
    if pipeline.needs_per_sample:
        releases = {"per-sample gradients": lambda: pipeline.clip(pair), **releases}
    for what, release in releases.items():
        try:
            release()
        # A plugin defense is the user's code: any failure is theirs, an exit included.
        except (Exception, SystemExit) as error:
            detail = one_line(f"{type(error).__name__}: {error}")
            raise ConfigError(
                f"defense.spec={defense_spec!r}: fails on {what} of model {spec.name} ({detail})"
            ) from None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_resources(
    config: RunConfig, num_clients: int, client_cpus: float, client_gpus: float
) -> None:
    """Client counts and Ray resource shares that can run (zero or NaN CPUs make Flower divide
    by zero or wait forever)."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num-clients={num_clients!r}: expected an integer >= 1")
    if num_clients < config.train.min_clients:
        raise ConfigError(
            f"num-clients={num_clients}: expected at least train.min-clients "
            f"({config.train.min_clients})"
        )
    if not _is_number(client_cpus) or not (math.isfinite(client_cpus) and client_cpus > 0):
        raise ConfigError(f"client-cpus={client_cpus!r}: expected a finite number > 0")
    if not _is_number(client_gpus) or not (math.isfinite(client_gpus) and client_gpus >= 0):
        raise ConfigError(f"client-gpus={client_gpus!r}: expected a finite number >= 0")
    cpus = local_cpus()
    if _cluster_address() is not None:
        check_cluster_address()
        return
    if client_cpus > cpus:
        raise ConfigError(
            f"client-cpus={client_cpus:g}: this machine has {cpus} CPUs, so Ray could never "
            f"start a client; expected at most {cpus}"
        )
    # Flower starts floor(CPUs / client-cpus) client processes whatever the clients' number
    # (about 1 GB each): client-cpus=1e-9 crashed its engine, 0.1 would start 20 on 2 cores.
    processes, useful = int(cpus / client_cpus), max(num_clients, cpus)
    if client_gpus == 0 and processes > useful:
        raise ConfigError(
            f"client-cpus={client_cpus:g}: Flower would start {processes} client processes "
            f"({cpus} CPUs / client-cpus) for {num_clients} clients; expected more than "
            f"{cpus / (useful + 1):.3g}"
        )


def check_data_split(config: RunConfig, num_clients: int) -> FederatedData:
    """The clients' data split for `num_clients`, or `ConfigError` when some client could not
    train in any round: more clients than images, partitions smaller than a round's batch,
    encodings that mix more images than a client or the public pool holds.

    Reusable on its own (a sweep's preflight calls it per cell); loads the data set.
    """
    data, train = config.data, config.train
    # The clients' pool, whatever the split: one iid partition (a 1-client shards split would
    # be refused in the name of num-clients=1).
    whole = dataclasses.replace(config, data=dataclasses.replace(data, partition="iid"))
    try:
        whole_data = federated_data(whole, 1)
    except DataSplitError as error:
        raise ConfigError(_setting_names(str(error))) from None
    pool = whole_data.partitions[0]
    noun = "sequence" if whole_data.dataset.modality == "tokens" else "image"

    def count(n: int) -> str:
        return f"{n} {noun}{'s' if n != 1 else ''}"

    if num_clients > len(pool):
        raise ConfigError(
            f"num-clients={num_clients}: the clients share {count(len(pool))} for training "
            f"(after data.aux-size={data.aux_size} and data.public-size={data.public_size} are "
            f"held out), and every client needs at least one; use at most {len(pool)} clients "
            f"or hold out fewer {noun}s"
        )
    try:
        fd = federated_data(config, num_clients)
    except DataSplitError as error:
        raise ConfigError(_setting_names(str(error))) from None
    sizes = [len(part) for part in fd.partitions]
    smallest = min(sizes)
    needed = train.examples_per_round
    if needed > smallest:
        key = "train.batch-size" if needed == train.batch_size else "train.examples"
        client = sizes.index(smallest)
        # A corpus is dealt to clients as whole documents, whatever data.partition says.
        split = "document" if noun == "sequence" else data.partition
        raise ConfigError(
            f"{key}={needed}: client {client} holds only {count(smallest)} "
            f"({split} split of {count(len(pool))} among {num_clients} clients), so "
            f"it could never train; expected at most {smallest}, or fewer clients"
        )
    encoder = parse_defense_spec(config.defense.spec).encoder
    if isinstance(encoder, InstaHide) and encoder.inter:
        if len(fd.public) < encoder.k - 1:
            raise ConfigError(
                f"defense.spec={config.defense.spec!r}: {encoder.spec} mixes each image with "
                f"{encoder.k - 1} images of a public pool, but data.public-size="
                f"{data.public_size}; set data.public-size >= {encoder.k - 1}"
            )
    elif encoder is not None and smallest < encoder.k:
        # Partners come from the client's whole partition (not only its batch), so B = 1 runs.
        raise ConfigError(
            f"defense.spec={config.defense.spec!r}: {encoder.spec} mixes each image with "
            f"{encoder.k - 1} others of its client's data, but client {sizes.index(smallest)} "
            f"holds only {smallest} image{'s' if smallest != 1 else ''} ({data.partition} split "
            f"of {len(pool)} images among {num_clients} clients); expected "
            + (f"K <= {smallest} or fewer clients" if smallest > 1 else "fewer clients")
        )
    return fd


def check_delta(config: RunConfig, fd: FederatedData, num_clients: int) -> None:
    """Refuse a δ of 1/n or more for the ε a run reports: at δ = 1/n, releasing one of n
    records whole is (0, δ)-DP, so such an ε bounds nothing. n is the smallest client's
    examples for DP-SGD (example-level) and the number of clients for central DP."""
    delta, defense = config.defense.dp_delta, config.defense
    sizes = [len(part) for part in fd.partitions]
    levels = []
    if parse_defense_spec(defense.spec).find(DPSGD) is not None:
        client = sizes.index(min(sizes))
        levels.append((min(sizes), f"client {client} holds {min(sizes)} examples"))
    if defense.central_clip > 0 and defense.central_noise > 0:
        levels.append((num_clients, f"central DP over {num_clients} clients"))
    for n, why in levels:
        if delta >= 1 / n:
            raise ConfigError(
                f"defense.dp-delta={delta:g}: at least 1/n = {1 / n:.3g} ({why}), where "
                f"releasing one record whole meets the guarantee; expected below {1 / n:.3g}, "
                "usually far below (e.g. 1e-5)"
            )


def check_attacks(config: RunConfig, fd: FederatedData, num_clients: int) -> None:
    """Refuse attacks that would fail on every update of this run (no auxiliary data for an
    attack that needs it, iDLG labels on batches, ...), as each attack declares, and more
    attacked clients than a round trains."""
    trained = clients_per_round(config, num_clients)
    wanted = config.attack.clients_per_round
    if config.threat.view == "client" and wanted > trained:
        # Attacking every client instead would change the study's sample size unannounced.
        raise ConfigError(
            f"attack.clients-per-round={wanted}: a round trains {trained} of the "
            f"{num_clients} clients (num-clients x train.fraction-train, at least "
            "train.min-clients; under flwr run num-clients is num-supernodes); expected 0 "
            f"(every client) to {trained}"
        )
    targets = config.examples_per_round
    if config.threat.view == "aggregate":  # the round's sum, of per-sample updates too
        targets *= clients_per_round(config, num_clients)
    elif config.threat.share == "per-sample":
        targets = 1
    _check_batchnorm_prior(config, fd)
    for name in config.attack.names:
        attack = build_attack(name, config.attack.params.get(name, {}))
        _check_inverter_size(config, fd, name, getattr(attack, "config", None), targets)
        check = getattr(attack, "check_feasible", None)
        if check is None:
            continue
        try:
            check(targets, len(fd.aux))
        except ValueError as error:
            raise ConfigError(str(error)) from None


# The most weights a learned attack's inverter may have: 4 GB in float32, about 16 GB to train
# with Adam (gradients and two moments beside the weights).
MAX_INVERTER_WEIGHTS = 1_000_000_000


def _check_inverter_size(
    config: RunConfig, fd: FederatedData, name: str, settings: object, targets: int
) -> None:
    """Refuse an inverter MLP (`hidden` widths of a learned attack) too large to allocate:
    its first layer reads the update (or its hashed bins) and its last writes every target's
    image and label (or a sequence's token distributions); bounds on the hidden widths alone
    passed 100,000 wide layers of 5 to 97 GB (audit EH4)."""
    hidden = getattr(settings, "hidden", None)
    if not hidden:
        return
    spec = model_spec(config, fd)
    update = count_parameters(build_model(spec))
    bins = getattr(settings, "hash_bins", None)
    features = update if bins is None else resolve_num_bins(bins, update)
    if model_modality(spec.name) == "tokens":  # L distributions over the vocabulary
        outputs = targets * spec.input_shape[0] * spec.num_classes
    else:
        outputs = targets * (math.prod(spec.input_shape) + spec.num_classes)
    widths = [features, *hidden, outputs]
    weights = sum(a * b + b for a, b in itertools.pairwise(widths))
    if weights > MAX_INVERTER_WEIGHTS:
        raise ConfigError(
            f"attack.{name}.hidden={','.join(map(str, hidden))}: the inverter would hold "
            f"{weights:,} weights ({features:,} inputs, {outputs:,} outputs; "
            f"{weights * 4 / 1e9:.1f} GB in float32, about 4 times that to train); expected at "
            f"most {MAX_INVERTER_WEIGHTS:,}: narrower hidden layers, or fewer inputs "
            f"(attack.{name}.hash-bins)"
        )


def _check_cache_dir(name: str, folder: Path) -> None:
    """A folder given for an attack's saved state must be one it can create: the attack
    writes it after its first training, rounds into the run. (That a new run's folder holds
    no other run's inverters is `build.check_fresh_caches`, where a run knows it is new.)"""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(
            f"attack.{name}.cache-dir={str(folder)!r}: {existing} is not a folder; expected "
            "a folder the attack can create or write"
        )
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"attack.{name}.cache-dir={str(folder)!r}: {existing} is not writable; expected "
            "a folder the attack can create or write"
        )


def _check_batchnorm_prior(config: RunConfig, fd: FederatedData) -> None:
    """Refuse a BatchNorm prior set by hand that cannot work here: `bn-mode = "exact"` while
    the clients' batch statistics stay hidden (every inversion would fail), or a prior on a
    model without BatchNorm (it would match nothing, and the row would still record it)."""
    has_bn = uses_batchnorm(config, fd)
    for name in config.attack.names:
        # However the key was written: `bn_mode`, or `ig-bn-mode` for lti+ig's refinement
        # (audit DO1: those spellings passed, and the run failed in its first round).
        given = {key_of(key): value for key, value in config.attack.params.get(name, {}).items()}
        for prefix in ("", "ig-"):
            mode, weight = given.get(f"{prefix}bn-mode"), given.get(f"{prefix}bn-weight")
            if mode == "exact" and has_bn and config.threat.bn_stats != "shared":
                raise ConfigError(
                    f"attack.{name}.{prefix}bn-mode='exact' matches the clients' BatchNorm "
                    "batch statistics, but threat.bn-stats='hidden'; set "
                    "threat.bn-stats='shared' or bn-mode to auto, infer or proxy"
                )
            if not has_bn and ((mode is not None and mode != "auto") or (weight or 0) > 0):
                setting = (
                    f"bn-mode={mode!r}" if mode not in (None, "auto") else f"bn-weight={weight}"
                )
                raise ConfigError(
                    f"attack.{name}.{prefix}{setting}: model.name={config.model.name!r} has no "
                    "BatchNorm layer, so the BatchNorm prior has nothing to match; leave it "
                    "unset or choose a model with BatchNorm (resnet20, resnet18, convnet-bn)"
                )


def ineffective_settings(config: RunConfig, fd: FederatedData) -> str | None:
    """A warning naming settings changed from their defaults that this run never reads: batch
    statistics of a model without BatchNorm, a δ without a DP mechanism, a partition's shape
    under another partition (audit EA2), the text settings on image data (audit DO6: accepted
    without a word) and LPIPS backbones on text (audit EK2)."""
    default = RunConfig()
    unused = []
    if config.threat.bn_stats != default.threat.bn_stats and not uses_batchnorm(config, fd):
        unused.append(
            f"threat.bn-stats={config.threat.bn_stats!r} (model.name={config.model.name!r} has "
            "no BatchNorm layer)"
        )
    private = "dpsgd" in defense_names(config.defense.spec) or config.defense.central_noise > 0
    if config.defense.dp_delta != default.defense.dp_delta and not private:
        unused.append(
            f"defense.dp-delta={config.defense.dp_delta:g} (neither DP-SGD nor central noise "
            "runs, so no ε is reported)"
        )
    partition = config.data.partition
    if config.data.dirichlet_alpha != default.data.dirichlet_alpha and "dirichlet" not in partition:
        unused.append(
            f"data.dirichlet-alpha={config.data.dirichlet_alpha:g} (data.partition={partition!r}; "
            "it shapes the dirichlet partitions)"
        )
    if config.data.shards_per_client != default.data.shards_per_client and partition != "shards":
        unused.append(
            f"data.shards-per-client={config.data.shards_per_client} (data.partition="
            f"{partition!r}; it shapes the shards partition)"
        )
    modality = "image" if getattr(fd.dataset, "tokenizer", None) is None else "tokens"
    tokenizer = config.data.tokenizer
    vocabulary = config.data.vocab_size != default.data.vocab_size
    if modality == "tokens" and vocabulary and tokenizer != "bpe":
        unused.append(
            f"data.vocab-size={config.data.vocab_size} (data.tokenizer={tokenizer!r} brings its "
            "own vocabulary; it sizes the BPE trained on the auxiliary text)"
        )
    unused += idle_attack_settings(config)
    given, defaults = config.to_flat(), default.to_flat()
    other = [
        f"{key}={given[key]!r}"
        for key in keys_without_effect(modality)
        if given[key] != defaults[key]
    ]
    if other:
        kind = "text settings" if modality == "image" else "image metrics"
        holds = "images" if modality == "image" else "text"
        unused.append(f"{', '.join(other)} ({kind}; {config.data.dataset} holds {holds})")
    return f"{'; '.join(unused)}: no effect in this run" if unused else None


def idle_attack_settings(config: RunConfig) -> list[str]:
    """The attack settings a run leaves unread: the attack workers' without workers (audit
    FF1), and those given to a learned attack that its other settings leave unread, e.g.
    `finetune-epochs` under `refresh=retrain` (audit FE3: the rows came out the same)."""
    attack, default = config.attack, AttackConfig()
    unused = [
        f"attack.{key.replace('_', '-')}={getattr(attack, key):g} (attack.workers=0: the "
        "attacks run inline)"
        for key in ("worker_cpus", "worker_gpus")
        if attack.names and attack.workers == 0 and getattr(attack, key) != getattr(default, key)
    ]
    for name in attack.names:
        given = attack.params.get(name) or {}
        built = build_attack(name, given)
        # lti+ig: its learned stage's settings, under their own keys.
        settings = getattr(built, "config", None) or getattr(
            getattr(built, "lti", None), "config", None
        )
        if not isinstance(settings, Settings):
            continue
        idle = idle_settings(settings)
        for key in given:
            dashed = key.replace("_", "-")
            if dashed in idle:
                unused.append(f"attack.{name}.{dashed}={given[key]!r} ({idle[dashed]})")
    return unused


def uses_batchnorm(config: RunConfig, fd: FederatedData) -> bool:
    """Whether the run's model has a BatchNorm layer."""
    return has_batchnorm(build_model(model_spec(config, fd)))


def hidden_batchnorm_statistics(config: RunConfig, fd: FederatedData) -> str | None:
    """A warning for `threat.bn-stats = hidden` on a BatchNorm model: each client's running
    statistics still reach the server, from which its batch statistics follow (exactly after
    one local step: new = (1 - m) sent + m batch), so the run measures an attacker that leaves
    them unused, not one that cannot have them (audit EF1)."""
    if config.threat.bn_stats != "hidden" or config.threat.view != "client":
        return None
    if not uses_batchnorm(config, fd):
        return None
    return (
        f"threat.bn-stats='hidden': the attacks are not given the clients' BatchNorm batch "
        f"statistics, yet each client's running statistics reach the server (model.name="
        f"{config.model.name!r}; they are averaged into the global model), and after one local "
        "step its batch's mean and variance follow from them exactly: this run measures an "
        "attacker that leaves them unused (threat.bn-stats='shared': one that uses them)"
    )


def unused_public_pool(config: RunConfig) -> str | None:
    """A warning for a public pool no encoding mixes from: it is held out of the clients' data
    all the same, so their partitions shrink without a word (audit EF3)."""
    encoder = parse_defense_spec(config.defense.spec).encoder
    if config.data.public_size == 0 or (isinstance(encoder, InstaHide) and encoder.inter):
        return None
    return (
        f"data.public-size={config.data.public_size}: only instahide:K:inter mixes public "
        "images, yet the pool is held out of the clients' data, so each client holds fewer "
        "examples; set data.public-size=0"
    )


def unused_batchnorm_prior(config: RunConfig, fd: FederatedData) -> str | None:
    """A warning for attacks whose BatchNorm prior is on by default (gradinversion,
    stepwise) on a model without BatchNorm: they run without it, which their name hides
    (`_check_batchnorm_prior` refuses the prior where it is set by hand)."""
    if uses_batchnorm(config, fd):
        return None
    unused = []
    for name in config.attack.names:
        settings = getattr(build_attack(name, config.attack.params.get(name, {})), "config", None)
        if getattr(settings, "bn_weight", 0.0) > 0:  # plug-ins' settings may have none
            unused.append(name)
    if not unused:
        return None
    return (
        f"{listed(unused)} run without a BatchNorm prior: model.name={config.model.name!r} has no "
        "BatchNorm layer, so the prior is left out (the rows record bn_weight 0)"
    )


def _setting_names(message: str) -> str:
    """A data-room message with its argument names replaced by the settings' keys, wherever
    they occur ("lower aux_size or raise beta" names settings too)."""
    named = _SPLIT_ARGUMENT.sub(lambda match: _SPLIT_SETTINGS[match.group(1)], message)
    return named if _SPLIT_ARGUMENT.match(message) else f"data split: {named}"


def validate_components(config: RunConfig, own_clients: bool = True) -> None:
    """Raise `ConfigError` for the first setting no registry accepts. `own_clients`: fedleak's
    clients train, on `train.batch-size`; an audited app's train on batches of their own,
    which the model's training-mode probe cannot know."""
    if config.sim.resume and not config.out_dir:
        raise ConfigError(
            "sim.resume=true without out-dir: a run without one gets a new folder "
            "(runs/<time>-<name>), which holds nothing to resume; give the folder of the run "
            "to resume (fedleak run --out DIR, or out-dir)"
        )
    dataset = config.data.dataset
    if dataset.startswith(FOLDER_PREFIX) and not dataset[len(FOLDER_PREFIX) :].strip():
        raise ConfigError(
            f"data.dataset={dataset!r}: expected folder:<path to an image folder with one "
            "sub-folder per class>"
        )
    modality = dataset_modality(dataset)
    if modality == "image":
        dataset_entry(dataset)
    model_entry(config.model.name)
    try:
        pipeline = parse_defense_spec(config.defense.spec)
    except DefenseSpecError as error:
        raise ConfigError(f"defense.spec={config.defense.spec!r}: {error}") from None
    if model_modality(config.model.name) != modality:
        fitting = [m for m in model_names() if model_modality(m) == modality]
        raise ConfigError(
            f"model.name={config.model.name!r} reads {_PLURAL[model_modality(config.model.name)]} "
            f"but data.dataset={dataset!r} holds {_PLURAL[modality]}; expected one of "
            f"{', '.join(fitting)}"
        )
    if modality == "tokens":
        _validate_text(config, pipeline.encoder is not None)
    for name in config.attack.names:
        attack = attack_entry(name).create(config.attack.params.get(name, {}), config.seed)
        if not callable(getattr(attack, "reconstruct", None)):
            raise ConfigError(
                f"attack.names: {name!r} builds a {type(attack).__name__} without a reconstruct"
                "(observation, knowledge, budget) method; every attack needs one"
            )
        if modality not in attack_modalities(attack):
            fitting = [n for n in ATTACKS.names() if modality in attack_modalities(build_attack(n))]
            raise ConfigError(
                f"attack.names: {name!r} reconstructs "
                f"{', '.join(_PLURAL[m] for m in attack_modalities(attack))}, not the "
                f"{_PLURAL[modality]} of data.dataset={dataset!r}; attacks for them: "
                f"{', '.join(fitting)}"
            )
    # Parameters of a known attack left out of attack.names (a preset's, after the names were
    # overridden) are checked but unused; those of an unknown attack are a typo.
    known = ATTACKS.names()
    for name in config.attack.params:
        if name not in known:
            raise ConfigError(
                f"attack.{name}.*: parameters for an unknown attack {name!r}; expected names "
                f"from {', '.join(known)}"
            )
    for name in dict.fromkeys([*config.attack.names, *config.attack.params]):
        try:
            entry = attack_entry(name)
        except PluginError:
            if name in config.attack.names:
                raise
            # A preset's table for an attack this run leaves out, whose name a plug-in also
            # carries: the clash is warned (`ATTACKS.names`), and only using the name refuses.
            continue
        entry.configure(config.attack.params.get(name, {}))
        init = [v for k, v in config.attack.params.get(name, {}).items() if k.endswith("init")]
        # An attack that does not run needs no aux data: its table is only checked (audit DO6:
        # warned of as having no effect, then refused).
        if "aux-mean" in init and config.data.aux_size == 0 and name in config.attack.names:
            raise ConfigError(
                f"attack.{name}.init='aux-mean': starts from the mean auxiliary image, so "
                "expected data.aux-size > 0 (or another init: randn, rand, half)"
            )
    # Before any run folder exists (`flwr run` makes it before its federation is known).
    for name, folder in cache_dirs(config).items():
        _check_cache_dir(name, folder)
    _check_dp_sampling(config, pipeline)
    per_sample = config.threat.share == "per-sample" or pipeline.needs_per_sample
    aggregate = config.threat.view == "aggregate"
    try:
        spec = model_spec_of(config)
    except DatasetUnavailable:
        # A set whose files are absent has no shape to build the model at: its absence is
        # said where the data is loaded (`validate_run`), or a sweep skips the cell.
        return
    # First: the probes below and every path's first step assume one score per class.
    check_model(spec)
    model = build_model(spec)
    if (per_sample or aggregate) and has_batchnorm(model):
        if per_sample:
            # Name what asks for per-sample gradients, not a setting that does not.
            asks = []
            if config.threat.share == "per-sample":
                asks.append(f"threat.share={config.threat.share!r}")
            if pipeline.needs_per_sample:
                asks.append(f"defense.spec={config.defense.spec!r}")
            raise ConfigError(
                f"model.name={config.model.name!r}: BatchNorm couples the samples of a batch, "
                f"so per-sample gradients (asked for by {listed(asks)}) are undefined; "
                f"{groupnorm_advice(config.model.name)}"
            )
        raise ConfigError(
            f"threat.view='aggregate' with model.name={config.model.name!r}: each client "
            "normalises with its own batch's BatchNorm statistics, so the aggregate is not the "
            "gradient of one batch of the union that the attacks replay; use a model without "
            f"BatchNorm ({groupnorm_advice(config.model.name)}) or threat.view='client'"
        )
    _check_label_layer(config, model, spec, pipeline)
    # What asks for per-sample gradients: the threat model, the defense's clipping, or both.
    causes = ["threat.share='batch'"] if config.threat.share == "per-sample" else []
    if pipeline.needs_per_sample:
        causes.append(f"a defense.spec without per-sample clipping (not {config.defense.spec!r})")
    remedy = " and ".join(causes) or "threat.share='batch'"
    batch = config.train.batch_size if own_clients else None
    reason = unfit_reason(model, spec, per_sample, remedy, batch)
    if reason is not None:
        raise ConfigError(f"model.name={config.model.name!r}: {reason}")


def _check_label_layer(
    config: RunConfig, model: torch.nn.Module, spec: ModelSpec, pipeline: DefensePipeline
) -> None:
    """Refuse an attack that reads labels off a classifier's last layer the model lacks: it
    would fail on every update, after the first round's training."""
    encoded = pipeline.encoder is not None
    for name in config.attack.names:
        remedy = getattr(
            build_attack(name, config.attack.params.get(name, {})), "label_layer_remedy", None
        )
        advice = None if remedy is None else remedy(encoded)
        if advice is None:
            continue
        try:
            find_last_layer(model, spec.num_classes, spec.input_shape)
        except LabelRecoveryError as error:
            raise ConfigError(
                f"model.name={config.model.name!r}: attack {name!r} reads labels off the "
                f"classifier's last layer, but there is {error}; set {advice}"
            ) from None
        return


def _check_dp_sampling(config: RunConfig, pipeline: DefensePipeline) -> None:
    """Poisson sampling is DP-SGD's draw of batches whose size is nobody's business: refuse it
    where there is no DP-SGD step or where a batch's size would show or be fixed."""
    if config.defense.dp_sampling != "poisson":
        return
    train = config.train
    # Every condition the run misses, each with its remedy: naming one at a time made a chain
    # of refusals, each remedy met by the next.
    problems: list[tuple[str, str]] = []
    if pipeline.find(DPSGD) is None:
        problems.append(
            (
                f"samples DP-SGD's batch, but defense.spec={config.defense.spec!r} has no dpsgd",
                "a dpsgd step in defense.spec",
            )
        )
    if config.threat.share == "per-sample":
        problems.append(
            (
                "hides the batch size, which threat.share='per-sample' shows (one row each)",
                "threat.share='batch'",
            )
        )
    if pipeline.encoder is not None:
        problems.append(
            (
                f"{pipeline.encoder.spec} encodes a fixed batch of images",
                "a defense.spec without an input encoding",
            )
        )
    if train.mode == "fedavg" and train.examples != 0:
        problems.append(
            (
                f"each local step draws its own batch from the whole partition, so "
                f"train.examples={train.examples} has no use",
                "train.examples=0",
            )
        )
    if not problems:
        return
    reasons = "; it ".join(reason for reason, _ in problems)
    remedies = ", ".join(remedy for _, remedy in problems)
    raise ConfigError(
        f"defense.dp-sampling='poisson': {reasons}; expected {remedies}, or "
        "defense.dp-sampling='fixed'"
    )


_TEXT_DEFENSES = "prune, sign, gauss, dpsgd"


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


def model_spec_of(config: RunConfig) -> ModelSpec:
    """The run's model spec, shaped by the data set (declared by its registry entry, else read
    from the loaded set; a language model's from the sequence length and vocabulary)."""
    if dataset_modality(config.data.dataset) == "tokens":
        data = config.data
        return ModelSpec(
            config.model.name, (data.seq_len,), data.vocab_size, config.model.init, config.seed
        )
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
        if dataset_modality(config.data.dataset) == "tokens":
            load_corpus(config.data.dataset, config.data.data_dir or None, download=False)
            return ""
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


def takes_text(key: str) -> bool:
    """Whether the setting `key` (a run setting or an attack's parameter) holds text, so that
    what was typed for it is kept as written: read as TOML, `1e3` was "1000.0" (audit DP7)."""
    key = canonical_key(key)
    if key in text_keys():
        return True
    head, _, rest = key.partition(".")
    name, _, param = rest.partition(".")
    if head != "attack" or not param:
        return False
    try:
        return param in attack_entry(name).text_params()
    except ConfigError:  # an unknown or broken attack: validating the run names it
        return False


def setting_help(attack: str | None = None) -> list[KeyHelp]:
    """Every run setting, then every registered attack's parameters (or one attack's), each
    with its type, default and a line of help (`fedleak config-keys`)."""
    lines = key_help()
    names = ATTACKS.names() if attack is None else (attack_entry(attack).name,)
    for name in names:
        lines += attack_entry(name).help()
    return lines
