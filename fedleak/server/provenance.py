"""Which plug-in code a run computes with: a hash of each used plug-in's source file, recorded
in environment.json beside fedleak's own source hash so that a resume under changed plug-in
code says so, as it does for changed software (audit DM3: a plug-in edited between two
resumes changed the rows without a word)."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

from fedleak.attacks.registry import ATTACKS
from fedleak.config import ConfigError, RunConfig
from fedleak.data import FOLDER_PREFIX, TEXT_DATASETS
from fedleak.data.registry import DATASETS
from fedleak.defenses.registry import DEFENSES
from fedleak.defenses.spec import defense_names
from fedleak.models.registry import MODELS
from fedleak.registry import Registry, load_object


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
