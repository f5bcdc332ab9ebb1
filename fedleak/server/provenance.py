"""What a run computes with, beyond its config.toml: a hash of each used plug-in's source file,
recorded in environment.json beside fedleak's own source hash so that a resume under changed
plug-in code says so, as it does for changed software (audit DM3: a plug-in edited between two
resumes changed the rows without a word); and every parameter each attack ran with."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

from fedleak.attacks.registry import ATTACKS, attack_entry
from fedleak.config import ConfigError, RunConfig
from fedleak.data import FOLDER_PREFIX, TEXT_DATASETS
from fedleak.data.registry import DATASETS
from fedleak.defenses.registry import DEFENSES
from fedleak.defenses.spec import defense_names
from fedleak.models.registry import MODELS
from fedleak.registry import Registry, load_object
from fedleak.settings import flat_values


def plugin_sources(config: RunConfig) -> dict[str, str]:
    """'<kind> <name>' -> a hash of the file defining it, for every plug-in the run uses
    (attacks, defense steps, the model, the data set; registered or by import path)."""
    files: dict[str, str | None] = {}
    for name in config.attack.names:
        files[f"attack {name}"] = _registered_file(ATTACKS, name)
    for name in defense_names(config.defense.spec):
        files[f"defense {name}"] = _registered_file(DEFENSES, name)
    model = config.model.name
    files[f"model {model}"] = (
        _module_file(model) if ":" in model else _registered_file(MODELS, model)
    )
    dataset = config.data.dataset
    # Folders and the text corpora are fedleak's own readers, outside the data set registry.
    if not dataset.startswith(FOLDER_PREFIX) and dataset not in TEXT_DATASETS:
        files[f"data set {dataset}"] = _registered_file(DATASETS, dataset)
    return {what: _digest(Path(file)) for what, file in files.items() if file}


def attack_settings(config: RunConfig) -> dict[str, dict[str, object]]:
    """Each attack's parameters as it runs them, defaults and its preset's values included:
    config.toml keeps the parameters as given, because a value given differs from the same
    value by default (a cache folder of one's own, a BatchNorm prior asked for by hand)."""
    settings = {}
    for name in config.attack.names:
        resolved = attack_entry(name).configure(config.attack.params.get(name, {}))
        if resolved is not None:
            settings[name] = {key: _json(value) for key, value in flat_values(resolved).items()}
    return settings


def _json(value: object) -> object:
    if isinstance(value, tuple):
        return [_json(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def _registered_file(registry: Registry, name: str) -> str | None:
    """`registry.source_file(name)`, None for a name it does not hold (validation says so)."""
    try:
        return registry.source_file(name)
    except ConfigError:
        return None


def _module_file(path: str) -> str | None:
    """The file of the module that defines the factory an import path `package.module:factory`
    names (audit DP5: a module that only re-exports it hid edits to its source)."""
    try:
        factory = load_object(path, "model.name")
    except ConfigError:  # validation names the path's problem
        return None
    module = inspect.getmodule(factory)
    return getattr(module, "__file__", None)


def _digest(file: Path) -> str:
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"
