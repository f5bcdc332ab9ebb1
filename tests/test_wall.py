"""The wall: attacks see only what an honest-but-curious server sees, never the ground truth."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import fedleak
from fedleak.attacks.types import AttackerKnowledge, Observation
from fedleak.client.app import defense_seed
from fedleak.config import parse_flat
from fedleak.defenses import parse_defense_spec
from fedleak.runtime import federated_data, model_spec
from fedleak.seeds import attacker_seed
from fedleak.server.build import build_strategy

PACKAGE = Path(fedleak.__file__).parent

# Leaf modules every room may import: the settings parser, the registry mechanism, the stop
# request, the seed mixer, the heap setting, the restricted tensor reader and failures as one
# line (they import nothing from fedleak but each other).
SHARED = {"settings", "registry", "interrupt", "seeds", "heap", "tensorfile", "lines"}

# Rooms and what each may import (DESIGN.md); `fedleak.config` is open to the rooms that read
# run settings, `fedleak.interrupt` (a stop request, no imports) to long-running attack loops.
ALLOWED = {
    "attacks": {"attacks", "models", "defenses", "training", "interrupt"},
    "client": {"client", "data", "models", "defenses", "training", "config", "runtime", "messages"},
    "training": {"training", "models", "defenses"},
    "data": {"data", "config"},
    "models": {"models"},
    "defenses": {"defenses", "models"},
    "metrics": {"metrics"},
    "report": {"report", "metrics", "config"},
    # Evaluation reads the task's loss from `training`.
    "server": {
        "server",
        "attacks",
        "metrics",
        "data",
        "models",
        "defenses",
        "training",
        "config",
        "runtime",
        "messages",
    },
    # The command line also manages LPIPS's weights (`fedleak weights`); a sweep checks which
    # cells' data sets are on disk before it starts.
    "simulations": {
        "simulations",
        "server",
        "client",
        "report",
        "config",
        "runtime",
        "messages",
        "metrics",
        "data",
    },
    # Shared modules at the package root.
    "config.py": set(),
    "runtime.py": {"config", "data", "models", "training"},
    "messages.py": {"config", "training", "defenses"},
    "api.py": {"attacks", "metrics", "models", "defenses", "data", "training"},
}


def _fedleak_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] == "fedleak")
    return found


def test_attacks_never_import_the_server_or_the_auditor() -> None:
    for path in (PACKAGE / "attacks").rglob("*.py"):
        for module in _fedleak_imports(path):
            assert not module.startswith("fedleak.server"), f"{path.name} imports {module}"


def test_attacks_never_read_the_audit_record() -> None:
    for path in (PACKAGE / "attacks").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        strings = {
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        assert "audit" not in strings, f"{path.name} names the audit record"
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert "GroundTruth" not in names, f"{path.name} uses GroundTruth"


def test_rooms_import_only_what_the_design_allows() -> None:
    for room, allowed in ALLOWED.items():
        paths = [PACKAGE / room] if room.endswith(".py") else (PACKAGE / room).rglob("*.py")
        for path in paths:
            for module in _fedleak_imports(path):
                target = module.split(".")[1] if "." in module else module
                assert target in allowed | SHARED, f"fedleak/{room}/{path.name} imports {module}"
    for leaf in SHARED:
        for module in _fedleak_imports(PACKAGE / f"{leaf}.py"):
            assert module.split(".")[1] in SHARED, f"fedleak/{leaf}.py imports {module}"
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name != "simulations":
            for module in _fedleak_imports(path):
                assert not module.startswith("fedleak.simulations"), f"{path} imports {module}"


def test_observation_and_knowledge_hold_no_ground_truth() -> None:
    observed = {f.name for f in dataclasses.fields(Observation)}
    owned = {f.name for f in dataclasses.fields(AttackerKnowledge)}
    private = {"inputs", "labels", "targets", "truth", "ground_truth", "audit", "private"}
    assert not observed & private
    assert not owned & private


def test_every_room_is_checked() -> None:
    """No folder or root module of the package escapes the table above."""
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py"}
    checked = set(ALLOWED) | {f"{leaf}.py" for leaf in SHARED}
    assert rooms | modules <= checked, sorted((rooms | modules) - checked)


def _client_noise(seed: int, partition: int, server_round: int) -> dict[str, torch.Tensor]:
    """Gaussian noise on a zero update, drawn from the client's own defense seed."""
    generator = torch.Generator().manual_seed(defense_seed(seed, partition, server_round))
    zero = {"w": torch.zeros(256)}
    return parse_defense_spec("gauss:0.1").share(zero, 1, generator)


@pytest.mark.parametrize("workers", [0, 1])
def test_attacks_cannot_replay_the_clients_random_draws(workers: int) -> None:
    """Attacks are seeded from their own stream: with the run's seed an attack could redraw a
    client's noise and subtract it; with the seed it is given, the replay misses."""
    config = parse_flat(
        {
            "seed": 7,
            "defense.spec": "gauss:0.1",
            "attack.names": "ig,dlg",
            "attack.workers": workers,
        }
    )
    fd = federated_data(config, 2)
    strategy = build_strategy(config, model_spec(config, fd), fd, torch.device("cpu"), 0)
    runner = strategy.runner
    knowledge = runner.knowledge
    given = {knowledge.seed} | {attack.seed for attack in getattr(runner, "attacks", {}).values()}
    given.add(strategy.public.model.seed)  # every observation's model spec
    if workers:
        given.add(runner.seed)
    assert given == {attacker_seed(7)} and 7 not in given
    noise = _client_noise(7, partition=1, server_round=3)["w"]
    replayed = _client_noise(knowledge.seed, 1, 3)["w"]
    left = noise - replayed
    assert left.norm() > noise.norm()  # subtracting an independent draw adds noise
