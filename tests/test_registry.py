"""One registry mechanism for attacks, defenses, models and data sets: decorators in-process,
entry points for installed plugins (found in every process, Ray workers included), import
paths for models, and validation that reads the same registries."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pandas as pd
import pytest
import torch
from torch import nn

from fedleak.attacks import registry as attack_registry
from fedleak.attacks.registry import attack_entry, attack_names, build_attack, register_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.config import parse_flat
from fedleak.data import DATASETS, dataset_names, load_dataset, register_dataset
from fedleak.data.dataset import ImageDataset
from fedleak.data.embedded import load_mnist5k
from fedleak.defenses import DEFENSES, parse_defense_spec, register_defense
from fedleak.defenses.grammar import DefenseSpecError
from fedleak.models import MODELS, ModelSpec, build_model, model_names, register_model
from fedleak.registry import PluginCall, PluginError, PluginFailed, Registry
from fedleak.server.validate import check_seen_by_ray, validate_components
from fedleak.settings import ConfigError, Settings, setting

ROOT = Path(__file__).resolve().parents[1]

# A plugin distribution: one module and its metadata, as `pip install` would leave them.
PLUGIN = '''
"""A tiny fedleak plugin: an attack, a defense, a model and a data set."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedleak.attacks.types import Reconstruction
from fedleak.defenses import register_defense
from fedleak.settings import Settings, setting


@dataclass(frozen=True)
class ShiftConfig(Settings):
    shift: float = setting(0.0, low=-1.0, high=1.0, doc="added to the aux mean")


class ShiftedMean:
    """The aux mean plus a constant; records the process it ran in."""

    default_config = ShiftConfig()
    stateful = False

    def __init__(self, config: ShiftConfig, seed: int) -> None:
        self.config, self.name = config, "shifted-mean"

    def reconstruct(self, observation, knowledge, budget):
        count = observation.num_targets
        mean = knowledge.aux_inputs.float().mean(0, keepdim=True) + self.config.shift
        return Reconstruction(
            inputs=mean.clamp(0, 1).expand(count, *mean.shape[1:]).clone(),
            labels=torch.zeros(count, dtype=torch.long),
            diagnostics={"pid": float(os.getpid()), "shift": self.config.shift},
        )


@register_defense("halve", form="halve")
@dataclass(frozen=True)
class Halve:
    kind: ClassVar[str] = "halve"
    stage: ClassVar[str] = "release"
    rank: ClassVar[float] = 2.5

    @classmethod
    def from_args(cls, args):
        if args:
            raise ValueError("halve takes no arguments")
        return cls()

    @property
    def spec(self) -> str:
        return "halve"

    def release(self, grads, generator, *, batched, dp_batch_size):
        return {name: 0.5 * g for name, g in grads.items()}


def tiny_model(input_shape, num_classes):
    features = int(torch.tensor(input_shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))


def batchnorm_model(input_shape, num_classes):
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(),
        nn.Linear(4 * input_shape[1] * input_shape[2], num_classes),
    )


def toy_digits(root, download):
    from fedleak.data.embedded import load_mnist5k

    return load_mnist5k()


def broken():
    raise RuntimeError("never adopted")
'''

ENTRY_POINTS = """
[fedleak.attacks]
shifted-mean = fedleak_toy:ShiftedMean
missing-module = fedleak_toy_missing:Nothing

[fedleak.defenses]
halve = fedleak_toy:Halve

[fedleak.models]
toy-linear = fedleak_toy:tiny_model

[fedleak.datasets]
toy-digits = fedleak_toy:toy_digits
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The plugin on a temporary path: on sys.path here, and on PYTHONPATH for subprocesses."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "fedleak_toy.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "fedleak_toy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedleak-toy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        ENTRY_POINTS.replace("[fedleak.attacks]\nmissing", "missing")
    )
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for registry, name in [
        (attack_registry.ATTACKS, "shifted-mean"),
        (DEFENSES, "halve"),
        (MODELS, "toy-linear"),
        (DATASETS, "toy-digits"),
        (attack_registry.ATTACKS, "missing-module"),
    ]:
        registry.remove(name)
    sys.modules.pop("fedleak_toy", None)


# -- in-process registration -----------------------------------------------------------------
@dataclass(frozen=True)
class BlurConfig(Settings):
    sigma: float = setting(1.0, low=0.0, doc="blur of the guess")
    passes: int = setting(1, low=1, doc="how many times")
    gain: float = setting(1.0, doc="no bound at all")
    cap: float = setting(1.0, high=10.0, doc="an upper bound only")


def test_the_decorator_registers_an_attack_with_checked_settings() -> None:
    @register_attack("test-blur", config=BlurConfig())
    class Blur:
        """Blur the aux mean (a test attack)."""

        stateful = False

        def __init__(self, config: BlurConfig, seed: int) -> None:
            self.config, self.seed, self.name = config, seed, "test-blur"

        def reconstruct(self, observation, knowledge, budget):
            raise NotImplementedError  # only built and validated here

    try:
        attack = build_attack("test-blur", {"sigma": 2, "passes": 3}, seed=4)
        assert (attack.config, attack.seed) == (BlurConfig(sigma=2.0, passes=3), 4)
        assert isinstance(attack.config.sigma, float)
        assert "test-blur" in attack_names() and not attack_entry("test-blur").stateful
        refused = r"^attack\.test-blur\.sigma=-1: expected a finite number >= 0$"
        with pytest.raises(ConfigError, match=refused):
            build_attack("test-blur", {"sigma": -1})
        # inf is a number: without a lower bound the line still says why it is refused (ER10).
        for key, value, expected in (
            ("gain", "inf", "a finite number"),
            ("cap", "-inf", "a finite number <= 10"),
        ):
            with pytest.raises(ConfigError, match=rf"\.{key}=-?inf: expected {expected}$"):
                build_attack("test-blur", {key: float(value)})
        # A list of names raised dict()'s ValueError (audit BU7).
        with pytest.raises(ConfigError, match=r"^params: a list; expected a mapping of test-blur"):
            build_attack("test-blur", ["sigma"])  # type: ignore[arg-type]
        # Streams come from mix_seed, which drops signs: -1 would repeat seed 1's guesses.
        for seed in (-1, 1.5, True, 2**32):
            with pytest.raises(
                ConfigError, match=r"^seed=.*: expected an integer in \[0, 4294967295\]$"
            ):
                build_attack("test-blur", seed=seed)
        # Validation reads the same registry and parses without building the attack.
        validate_components(parse_flat({"attack.names": "test-blur", "attack.test-blur.passes": 2}))
        with pytest.raises(ConfigError, match=r"attack\.test-blur\.passes=0: expected an integer"):
            validate_components(
                parse_flat({"attack.names": "test-blur", "attack.test-blur.passes": 0})
            )
        keys = {line.key: line for line in attack_entry("test-blur").help()}
        assert keys["attack.test-blur.sigma"].default == "1"
        assert keys["attack.test-blur.sigma"].doc == "blur of the guess"
        with pytest.raises(ConfigError, match="already registered"):
            register_attack("test-blur", lambda config, seed: None)
    finally:
        attack_registry.ATTACKS.remove("test-blur")
    with pytest.raises(ConfigError, match=r"attack\.names='test-blur': unknown attack"):
        validate_components(parse_flat({"attack.names": "test-blur"}))


def test_names_that_would_break_settings_are_refused() -> None:
    for bad in ("a,b", "a.b", "", "two words"):
        with pytest.raises(ConfigError, match="attack name"):
            register_attack(bad, lambda config, seed: None)
    with pytest.raises(ConfigError, match="defense name"):
        register_defense("a+b", lambda args: None)
    # Specs are read in lower case: "MyClamp" could never be named (audit CY1).
    with pytest.raises(ConfigError, match=r"^defense 'MyClamp': expected a lower-case name"):
        register_defense("MyClamp", lambda args: None)
    with pytest.raises(ConfigError, match="model name"):
        register_model("pkg:thing", lambda shape, k: nn.Linear(1, 1))


def test_a_registered_defense_joins_the_declared_order() -> None:
    @register_defense("test-double", form="test-double")
    @dataclass(frozen=True)
    class Double:
        kind: ClassVar[str] = "test-double"
        stage: ClassVar[str] = "release"
        rank: ClassVar[float] = 3.5  # after pruning, before the sign

        @classmethod
        def from_args(cls, args: list[str]) -> Double:
            return cls()

        @property
        def spec(self) -> str:
            return "test-double"

        def release(self, grads, generator, *, batched, dp_batch_size):
            return {name: 2 * g for name, g in grads.items()}

    try:
        pipeline = parse_defense_spec("test-double+gauss:0+prune:0.5")
        assert pipeline.spec == "gauss:0+prune:0.5+test-double"
        grads = {"w": torch.tensor([1.0, -3.0, 0.5, 4.0])}
        shared = pipeline.share(grads, 1, torch.Generator().manual_seed(0))
        torch.testing.assert_close(shared["w"], torch.tensor([0.0, -6.0, 0.0, 8.0]))
        with pytest.raises(ValueError, match="test-double twice"):
            parse_defense_spec("test-double+test-double")
        with pytest.raises(ValueError, match="registered: test-double"):
            parse_defense_spec("nope")
    finally:
        DEFENSES.remove("test-double")


def test_models_by_registered_name_or_import_path() -> None:
    register_model("test-linear", lambda shape, k: nn.Linear(shape[-1], k))
    try:
        model = build_model(ModelSpec("test-linear", (5,), 3))
        assert isinstance(model, nn.Linear) and model.out_features == 3
        assert "test-linear" in model_names()
    finally:
        MODELS.remove("test-linear")
    # torchvision's factories take keyword arguments; a lambda-free import path works when the
    # factory takes (input_shape, num_classes).
    path = f"{__name__}:_two_layer"
    spec = ModelSpec(path, (1, 28, 28), 10, seed=3)
    first, second = build_model(spec), build_model(spec)
    assert all(
        torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True)
    )
    # A Flower app's own model class, built for its own data, takes no arguments.
    app_model = build_model(ModelSpec(f"{__name__}:_AppNet", (1, 28, 28), 10, seed=3))
    assert isinstance(app_model, _AppNet) and app_model.fc.out_features == 10


class _AppNet(nn.Module):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden))
        self.fc = nn.Linear(hidden, 10)


def _two_layer(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)
    )


def _bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.Flatten(),
        nn.Linear(2 * input_shape[1] * input_shape[2], num_classes),
    )


def test_batchnorm_checks_and_groupnorm_advice_apply_to_every_model() -> None:
    with pytest.raises(ConfigError) as registered:
        validate_components(parse_flat({"model.name": "resnet20", "defense.spec": "dpsgd:1:0"}))
    assert "use 'resnet20-gn', its variant without BatchNorm" in str(registered.value)
    # The setting that asks for per-sample gradients is named, not one that does not (DD4).
    assert "asked for by defense.spec='dpsgd:1:0')" in str(registered.value)
    with pytest.raises(ConfigError) as plain:  # convnet has no normalisation (audit CX6)
        validate_components(parse_flat({"model.name": "convnet-bn", "defense.spec": "dpsgd:1:0"}))
    assert "use 'convnet', its variant without BatchNorm" in str(plain.value)
    path = f"{__name__}:_bn"
    with pytest.raises(ConfigError) as imported:
        validate_components(parse_flat({"model.name": path, "threat.share": "per-sample"}))
    message = str(imported.value)
    assert message.startswith(f"model.name={path!r}: BatchNorm couples the samples")
    assert "(asked for by threat.share='per-sample')" in message and "'none'" not in message
    assert "torch.nn.GroupNorm" in message and "\n" not in message
    validate_components(parse_flat({"model.name": f"{__name__}:_two_layer"}))
    with pytest.raises(ConfigError, match="cannot import 'nowhere'"):
        validate_components(parse_flat({"model.name": "nowhere:model"}))


def _conv_head(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Logits from a convolution: no linear layer with a row per class to read labels off."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 2, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(2, num_classes, (input_shape[1], input_shape[2])),
        nn.Flatten(),
    )


@pytest.mark.parametrize(
    ("names", "params", "advice"),
    [
        ("ig", {}, "set attack.ig.labels='joint'"),
        ("aux-mean,class-mean", {}, "set attack.names without 'class-mean'"),
        ("lti+ig", {}, "set attack.lti+ig.ig-labels='joint'"),
        ("ig", {"attack.ig.labels": "joint"}, None),
        ("dlg", {}, None),
    ],
)
def test_attacks_that_read_labels_off_a_missing_last_layer_are_refused_before_a_round(
    names: str, params: dict[str, str], advice: str | None
) -> None:
    settings = {"model.name": f"{__name__}:_conv_head", "attack.names": names, **params}
    if advice is None:
        validate_components(parse_flat(settings))
        return
    with pytest.raises(ConfigError) as refused:
        validate_components(parse_flat(settings))
    message = str(refused.value)
    assert "reads labels off the classifier's last layer, but there is no 2-D parameter" in message
    assert f"; {advice}" in message
    assert "\n" not in message


def test_a_registered_data_set_loads_with_a_seeded_holdout() -> None:
    register_dataset("test-digits", lambda root, download: load_mnist5k(), holdout=True)
    try:
        assert "test-digits" in dataset_names()
        first = load_dataset("test-digits", seed=1, test_fraction=0.1)
        assert len(first.test_x) == 500 and len(first.train_x) == 4500
        assert torch.equal(
            first.test_y, load_dataset("test-digits", seed=1, test_fraction=0.1).test_y
        )
        validate_components(parse_flat({"data.dataset": "test-digits"}))
    finally:
        DATASETS.remove("test-digits")
    with pytest.raises(ConfigError, match=r"data\.dataset='test-digits': expected one of mnist5k"):
        validate_components(parse_flat({"data.dataset": "test-digits"}))


def test_a_loader_with_its_own_test_split_keeps_it_under_holdout() -> None:
    from fedleak.data.dataset import with_holdout

    split = with_holdout(load_mnist5k(), 0.2, seed=3)
    register_dataset("test-split", lambda root, download: split, holdout=True)
    try:
        loaded = load_dataset("test-split", seed=1, test_fraction=0.1)
        assert torch.equal(loaded.test_y, split.test_y) and len(loaded.test_x) == 1000
    finally:
        DATASETS.remove("test-split")


# -- entry points ----------------------------------------------------------------------------
def test_entry_points_are_found_by_name_and_listed(plugin: Path) -> None:
    assert "shifted-mean" in attack_names()
    entry = attack_entry("shifted-mean")
    assert not entry.stateful  # adopted from the class attribute
    attack = build_attack("shifted-mean", {"shift": 0.25})
    observation = _observation()
    knowledge = AttackerKnowledge(torch.full((4, 1, 2, 2), 0.5), torch.zeros(4), (1, 2, 2), 2)
    result = attack.reconstruct(observation, knowledge, Budget(1, 1.0))
    torch.testing.assert_close(result.inputs, torch.full((2, 1, 2, 2), 0.75))
    assert parse_defense_spec("halve+sign").spec == "halve+sign"
    assert isinstance(build_model(ModelSpec("toy-linear", (1, 28, 28), 10)), nn.Sequential)
    assert "toy-digits" in dataset_names()
    assert load_dataset("toy-digits").num_classes == 10
    with pytest.raises(ConfigError, match=r"attack\.shifted-mean\.shift=2: expected a number in"):
        validate_components(
            parse_flat({"attack.names": "shifted-mean", "attack.shifted-mean.shift": 2})
        )


def test_a_broken_plugin_fails_in_one_line_naming_its_distribution(plugin: Path) -> None:
    with pytest.raises(PluginError) as error:
        attack_entry("missing-module")
    message = str(error.value)
    assert "entry point 'missing-module'" in message and "fedleak-toy 0.1" in message
    assert "ModuleNotFoundError" in message and "\n" not in message
    assert "missing-module" not in attack_names()  # listed names leave it out, with a warning


def test_an_entry_point_that_gives_nothing_usable_is_refused(tmp_path: Path) -> None:
    registry: Registry[str] = Registry(
        "widget", "fedleak.test-widgets", "widget.name", adopt=lambda name, obj: str(obj())
    )
    registry.add("plain", "value")
    assert registry.get("plain") == "value"
    with pytest.raises(ConfigError, match=r"widget\.name='other': unknown widget; expected one of"):
        registry.get("other")


def test_an_unknown_name_suggests_the_registered_one_it_resembles() -> None:
    from fedleak.attacks.registry import attack_entry

    with pytest.raises(ConfigError) as upper:
        attack_entry("IG")  # names are lower case: the same name in capitals is meant
    assert "unknown attack; did you mean ig? expected one of aux-mean," in str(upper.value)
    with pytest.raises(ConfigError) as typo:
        attack_entry("tag-normalized")
    assert "did you mean tag-normalised?" in str(typo.value)
    with pytest.raises(ConfigError) as far:
        attack_entry("zzz")
    assert "did you mean" not in str(far.value)


# -- names taken twice -------------------------------------------------------------------------
def test_registering_a_built_in_name_is_refused_at_once_or_replaces_it() -> None:
    registry: Registry[str] = Registry(
        "widget",
        "fedleak.test-widgets",
        "widget.name",
        adopt=lambda name, obj: str(obj),
        builtins=lambda: [registry.add(n, f"built-in {n}") for n in ("a", "b")],
    )
    # No lookup yet: the built-ins are still unloaded, and the clash is refused all the same.
    with pytest.raises(ConfigError) as error:
        registry.add("a", "mine")
    assert str(error.value) == (
        "widget 'a' is already registered (a built-in widget); choose another name, or pass "
        "replace=True to override it"
    )
    registry.add("a", "mine", replace=True)
    assert registry.get("a") == "mine" and registry.names() == ("a", "b")


# Run in a fresh process: built-ins load lazily, so only there is nothing loaded yet.
_REGISTER_BUILT_IN_NAMES = """
import json
import fedleak
from fedleak.attacks.registry import attack_entry
from fedleak.settings import ConfigError

results = {}
for register, name, obj in [
    (fedleak.register_attack, "ig", lambda config, seed: None),
    (fedleak.register_defense, "sign", lambda args: None),
    (fedleak.register_model, "lenet", lambda shape, classes: None),
    (fedleak.register_dataset, "mnist5k", lambda root, download: None),
]:
    try:
        register(name)(obj)
        results[name] = "accepted"
    except ConfigError as error:
        results[name] = str(error)


def mine(config, seed):
    return None


fedleak.register_attack("ig", replace=True)(mine)
results["replaced"] = attack_entry("ig").build is mine
results["names"] = list(fedleak.attack_names())
print(json.dumps(results))
"""


def test_the_decorator_refuses_a_built_in_name_in_a_fresh_process() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _REGISTER_BUILT_IN_NAMES],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for kind, name in [("attack", "ig"), ("defense", "sign"), ("model", "lenet")]:
        assert results[name] == (
            f"{kind} {name!r} is already registered (a built-in {kind}); choose another name, "
            "or pass replace=True to override it"
        )
    assert results["mnist5k"].startswith("data set 'mnist5k' is already registered (a built-in")
    # replace=True replaced the built-in and left the rest of the catalog whole.
    assert results["replaced"] is True
    assert {"ig", "lti", "dlg", "aux-mean"} <= set(results["names"])


# A distribution whose entry points carry names already taken; importing it would fail loudly.
CLASH_ENTRY_POINTS = """
[fedleak.attacks]
ig = fedleak_clash:Anything
test-taken = fedleak_clash:Anything

[fedleak.defenses]
sign = fedleak_clash:Anything

[fedleak.models]
lenet = fedleak_clash:Anything

[fedleak.datasets]
mnist5k = fedleak_clash:Anything
"""


def _install_clashing_plugin(root: Path) -> None:
    (root / "fedleak_clash.py").write_text('raise RuntimeError("must not be imported")\n')
    info = root / "fedleak_clash-0.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedleak-clash\nVersion: 0.2\n")
    (info / "entry_points.txt").write_text(CLASH_ENTRY_POINTS)


def test_an_entry_point_with_a_taken_name_is_refused_when_that_name_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _install_clashing_plugin(tmp_path)
    register_attack("test-taken", lambda config, seed: None)
    sys.path.insert(0, str(tmp_path))
    try:
        # Listing keeps the name (the built-in) and warns once about the plugin left aside.
        with caplog.at_level("WARNING", logger="fedleak.registry"):
            assert "ig" in attack_names() and "ig" in attack_names()
        warned = [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("attack 'ig'")
        ]
        assert len(warned) == 1 and "looking 'ig' up is refused" in warned[0]
        source = "the plug-in from distribution 'fedleak-clash' (entry point '{} = fedleak_clash:"
        with pytest.raises(PluginError) as error:
            attack_entry("ig")
        message = str(error.value)
        assert message.startswith(
            f"attack 'ig': {source.format('ig')}Anything' in group 'fedleak.attacks') uses a "
            "built-in name; rename its entry point (names taken: "
        )
        assert "lti" in message and "\n" not in message
        with pytest.raises(ConfigError, match="attack 'ig': the plug-in from distribution"):
            # Other components away from the clashing names: validation reaches the attack.
            settings = {"attack.names": "ig", "data.dataset": "cifar10", "model.name": "mlp"}
            validate_components(parse_flat(settings))
        # A preset's table for the attack, left out of this run's names, refuses nothing.
        unused = {**settings, "attack.names": "aux-mean", "attack.ig.tv-weight": 0.01}
        validate_components(parse_flat(unused))
        with pytest.raises(ValueError) as defense:
            parse_defense_spec("sign")
        assert str(defense.value).startswith(
            f"defense spec 'sign': bad part 'sign': defense 'sign': {source.format('sign')}"
        )
        with pytest.raises(
            ConfigError, match=re.escape(f"model 'lenet': {source.format('lenet')}")
        ):
            build_model(ModelSpec("lenet", (1, 28, 28), 10))
        with pytest.raises(
            PluginError, match=re.escape(f"data set 'mnist5k': {source.format('mnist5k')}")
        ):
            load_dataset("mnist5k")
        # A name registered in code is not the plugin's either.
        with pytest.raises(PluginError) as taken:
            attack_entry("test-taken")
        assert f"uses a name already registered by module {__name__!r}" in str(taken.value)
        # Unused, the clash breaks nothing else.
        assert attack_entry("dlg").name == "dlg" and parse_defense_spec("gauss:0.1")
        assert isinstance(build_model(ModelSpec("mlp", (1, 2, 2), 2)), nn.Module)
        assert "fedleak_clash" not in sys.modules  # refused without running its code
    finally:
        sys.path.remove(str(tmp_path))
        attack_registry.ATTACKS.remove("test-taken")
    # Uninstalled, the built-ins answer again.
    assert attack_entry("ig").name == "ig" and parse_defense_spec("sign").spec == "sign"


def test_an_entry_point_named_otherwise_than_its_registration_is_refused(tmp_path: Path) -> None:
    """The class registers itself (with its settings) as 'blur-registered', the entry point
    calls it 'blur-listed': adopted under that name without settings, it failed in the run."""
    (tmp_path / "fedleak_misnamed.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            from fedleak import register_attack
            from fedleak.settings import Settings, setting

            @dataclass(frozen=True)
            class BlurConfig(Settings):
                passes: int = setting(1, low=1, doc="how many times")

            @register_attack("blur-registered", config=BlurConfig())
            class Blur:
                def __init__(self, config, seed):
                    self.config = config

                def reconstruct(self, observation, knowledge, budget):
                    raise NotImplementedError
            """
        )
    )
    info = tmp_path / "fedleak_misnamed-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedleak-misnamed\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[fedleak.attacks]\nblur-listed = fedleak_misnamed:Blur\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(PluginError) as error:
            attack_entry("blur-listed")
        assert str(error.value).endswith(
            "failed to load: ValueError: it registers itself as 'blur-registered', not "
            "'blur-listed': give the entry point that name, or register it as 'blur-listed'"
        )
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("blur-registered", "blur-listed"):
            attack_registry.ATTACKS.remove(name)
        sys.modules.pop("fedleak_misnamed", None)


def test_a_defense_entry_point_in_capitals_says_why_no_spec_names_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Specs are read in lower case, so 'UpRound' could never be named: typing it suggested
    the very name typed (audit DM5)."""
    (tmp_path / "fedleak_capitals.py").write_text(
        textwrap.dedent(
            """
            def parse(args):
                raise NotImplementedError
            """
        )
    )
    info = tmp_path / "fedleak_capitals-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedleak-capitals\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedleak.defenses]\nUpRound = fedleak_capitals:parse\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(DefenseSpecError) as error:
            parse_defense_spec("UpRound:2")
        message = str(error.value)
        assert "entry point 'UpRound'" in message and "fedleak-capitals 0.1" in message
        assert "expected a lower-case name: defense.spec is read in lower case" in message
        assert "did you mean" not in message and "\n" not in message
        # Said once: not also logged as a warning while the names were listed (audit DU3).
        assert not [r for r in caplog.records if "UpRound" in r.getMessage()]
        assert "UpRound" not in DEFENSES.names()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fedleak_capitals", None)


# -- what plugins give back ------------------------------------------------------------------
def test_a_defense_parser_that_raises_anything_gives_the_one_line_spec_error() -> None:
    @register_defense("test-needarg", form="test-needarg:N")
    @dataclass(frozen=True)
    class NeedArg:  # written like the documented example
        n: int
        kind: ClassVar[str] = "test-needarg"
        stage: ClassVar[str] = "release"
        rank: ClassVar[float] = 3.5

        @classmethod
        def from_args(cls, args: list[str]) -> NeedArg:
            return cls(int(args[0]))

    def lookup(args: list[str]) -> object:
        return {"a": 1}[args[0]]

    def wordy(args: list[str]) -> object:
        raise ValueError("first line\nsecond line")

    register_defense("test-lookup", lookup)
    register_defense("test-wordy", wordy)
    try:
        with pytest.raises(ValueError) as error:
            parse_defense_spec("test-needarg")
        message = str(error.value)
        assert message.startswith(
            "defense spec 'test-needarg': bad part 'test-needarg': the parser of defense "
            "'test-needarg' failed (IndexError: list index out of range); expected the form "
            "test-needarg:N; allowed: "
        )
        assert "\n" not in message
        with pytest.raises(ConfigError, match=r"^defense\.spec='test-needarg': defense spec"):
            validate_components(parse_flat({"defense.spec": "test-needarg"}))
        # The parser's own one-line ValueError keeps its words.
        with pytest.raises(ValueError, match="bad part 'test-needarg:x': invalid literal for int"):
            parse_defense_spec("test-needarg:x")
        # Without a declared form, the message does not invent one.
        with pytest.raises(ValueError) as unknown:
            parse_defense_spec("test-lookup:b")
        problem = str(unknown.value).split("; allowed: ")[0]
        assert problem.endswith("the parser of defense 'test-lookup' failed (KeyError: 'b')")
        with pytest.raises(ValueError) as multi:
            parse_defense_spec("test-wordy")
        assert "bad part 'test-wordy': first line; allowed" in str(multi.value)
        assert "second line" not in str(multi.value)
        assert DEFENSES.get("test-needarg").parse(["3"]) == NeedArg(3)
    finally:
        for name in ("test-needarg", "test-lookup", "test-wordy"):
            DEFENSES.remove(name)


def test_a_loader_of_the_wrong_type_names_a_builder_that_imports() -> None:
    register_dataset("test-wrong-type", lambda root, download: object())
    try:
        with pytest.raises(ConfigError) as error:
            load_dataset("test-wrong-type")
    finally:
        DATASETS.remove("test-wrong-type")
    found = re.search(r"\((\S+) builds one\)$", str(error.value))
    assert found is not None, str(error.value)
    module, _, attribute = found.group(1).rpartition(".")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_a_loader_returning_look_alike_fields_is_refused_before_its_pixels_are_used() -> None:
    """An object with an ImageDataset's fields but none of its checks: 0..255 pixels would
    have run to the end with a floor of -38 dB."""
    digits = load_mnist5k()
    look_alike = SimpleNamespace(
        name="look-alike",
        train_x=digits.train_x * 255,
        train_y=digits.train_y,
        test_x=digits.test_x * 255,
        test_y=digits.test_y,
        num_classes=digits.num_classes,
    )
    register_dataset("test-look-alike", lambda root, download: look_alike)
    try:
        with pytest.raises(
            ConfigError, match=r"returned SimpleNamespace, expected an ImageDataset"
        ):
            load_dataset("test-look-alike")
    finally:
        DATASETS.remove("test-look-alike")


def test_a_loaders_set_must_be_what_its_registration_declares() -> None:
    """Declared (3, 32, 32) in 100 classes, loaded as MNIST: accepted, while the checks made
    without loading the set (payload, BatchNorm) trusted the declaration."""
    digits = load_mnist5k()
    register_dataset("test-misdeclared", input_shape=(3, 32, 32), num_classes=100)(
        lambda root, download: digits
    )
    try:
        with pytest.raises(ConfigError) as error:
            load_dataset("test-misdeclared")
        assert str(error.value) == (
            "data.dataset='test-misdeclared': registered with input_shape=(3, 32, 32) and "
            "num_classes=100, but its loader returned images of shape (1, 28, 28) in 10 "
            "classes; declare what it returns (or neither)"
        )
    finally:
        DATASETS.remove("test-misdeclared")


def test_a_loaders_pixels_out_of_range_name_the_setting() -> None:
    """The form ImageDataset checks is refused as the setting's error (exit 2), as a loader
    of the wrong type is, not as `data set 'x': ...` (exit 1)."""
    digits = load_mnist5k()

    def scaled(root: Path, download: bool) -> ImageDataset:
        return dataclasses.replace(digits, name="test-255", train_x=digits.train_x * 255)

    register_dataset("test-255", scaled)
    try:
        with pytest.raises(ConfigError, match=r"^data\.dataset='test-255': train_x must hold"):
            load_dataset("test-255")
    finally:
        DATASETS.remove("test-255")


def _observation() -> Observation:
    spec = ModelSpec("mlp", (1, 2, 2), 2)
    return Observation(
        round=1,
        client_id=0,
        model=spec,
        weights={},
        update={},
        update_kind="gradient",
        num_examples=2,
        batch_size=2,
        local_steps=1,
        learning_rate=0.1,
        defense="none",
    )


@pytest.mark.slow
def test_a_plugin_runs_on_a_ray_worker_in_a_simulation(plugin: Path, tmp_path: Path) -> None:
    """The plugin's attack on an attack worker, its defense and model on the clients (Ray
    actors): all found through entry points and an import path, none imported by the test."""
    out = tmp_path / "run"
    settings = {
        "num-server-rounds": 1,
        # The quickstart's study shares 32 per-sample updates; one batch of two is enough here.
        "train.batch-size": 2,
        "threat.share": "batch",
        "attack.names": "aux-mean,shifted-mean",
        "attack.shifted-mean.shift": 0.1,
        "attack.clients-per-round": 1,
        "attack.workers": 1,
        "attack.images-per-client": 0,
        "data.aux-size": 200,
        "defense.spec": "halve",
        "model.name": "fedleak_toy:tiny_model",
    }
    command = [sys.executable, "-m", "fedleak.simulations.cli", "run", "quickstart"]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    command += ["--num-clients", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(ROOT)])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output.decode()[-3000:]
    rows = pd.read_csv(out / "leakage.csv")
    shifted = rows[rows.attack == "shifted-mean"]
    assert len(shifted) == 2 and set(shifted.status) == {"ok"}
    diagnostics = [json.loads(text) for text in shifted.diagnostics]
    assert {d["shift"] for d in diagnostics} == {0.1}
    # It ran in the worker's process, not in the simulation (server) process.
    assert {int(d["pid"]) for d in diagnostics} != {process.pid}
    config = (out / "config.toml").read_text()
    assert 'spec = "halve"' in config and 'name = "fedleak_toy:tiny_model"' in config


class _NoReconstruct:
    """An attack class whose author forgot the method every attack needs."""

    def __init__(self, config: object, seed: int) -> None:
        self.name = "test-no-reconstruct"


def test_an_attack_without_reconstruct_is_refused_before_the_run() -> None:
    register_attack("test-no-reconstruct", _NoReconstruct)
    try:
        with pytest.raises(ConfigError, match=r"'test-no-reconstruct' builds a _NoReconstruct"):
            validate_components(parse_flat({"attack.names": "test-no-reconstruct"}))
    finally:
        attack_registry.ATTACKS.remove("test-no-reconstruct")


def test_a_component_registered_by_code_is_refused_where_ray_processes_need_it(
    tmp_path: Path,
) -> None:
    """A data set registered by a decorator in the caller's process passed every check and the
    run failed after ~50 s ("every client failed"): Ray's clients never run that code. The
    attack is fine inline (the api.md example), not on an attack worker."""
    from fedleak.simulations.launch import run_study

    register_dataset("test-by-code", lambda root, download: load_mnist5k(), holdout=True)
    register_model(
        "test-by-code-net", lambda shape, k: nn.Sequential(nn.Flatten(), nn.Linear(784, k))
    )
    register_defense("test-by-code-halve", lambda args: parse_defense_spec("gauss:0").steps[0])
    register_attack("test-by-code-attack", _NoReconstruct)
    cases = [
        ({"data.dataset": "test-by-code"}, r"^data\.dataset: 'test-by-code' is registered by code"),
        ({"model.name": "test-by-code-net"}, r"^model\.name: 'test-by-code-net' is registered"),
        ({"defense.spec": "test-by-code-halve"}, r"^defense\.spec: 'test-by-code-halve' is regis"),
        (
            {"attack.names": "aux-mean,test-by-code-attack", "attack.workers": 1},
            r"^attack\.names: 'test-by-code-attack' .* group 'fedleak\.attacks' \(or set attack",
        ),
    ]
    try:
        for change, message in cases:
            config = parse_flat({"out-dir": str(tmp_path / "run"), **change})
            with pytest.raises(ConfigError, match=message):
                check_seen_by_ray(config)
        check_seen_by_ray(parse_flat({"attack.names": "aux-mean,test-by-code-attack"}))
        check_seen_by_ray(parse_flat({"model.name": "lenet", "defense.spec": "gauss:0.1"}))
        # An audited app's clients are its own: only attack workers need the model (BC9).
        audited = {"model.name": "test-by-code-net", "data.dataset": "test-by-code"}
        check_seen_by_ray(parse_flat(audited), own_clients=False)
        with pytest.raises(ConfigError, match=r"^model\.name: 'test-by-code-net' .* \(or set at"):
            check_seen_by_ray(parse_flat({**audited, "attack.workers": 1}), own_clients=False)
        # The study refuses it before Ray starts or a run directory is made.
        config = parse_flat({"out-dir": str(tmp_path / "run"), "data.dataset": "test-by-code"})
        with pytest.raises(ConfigError, match=r"registered by code in this process only"):
            run_study(config, num_clients=2)
        assert not (tmp_path / "run").exists()
        # An import path into the calling script: every client failed in round 1 (audit EL2).
        with pytest.raises(ConfigError, match=r"^model\.name='__main__:make_net': names the call"):
            check_seen_by_ray(parse_flat({"model.name": "__main__:make_net"}))
    finally:
        DATASETS.remove("test-by-code")
        MODELS.remove("test-by-code-net")
        DEFENSES.remove("test-by-code-halve")
        attack_registry.ATTACKS.remove("test-by-code-attack")


# -- plug-ins that raise, registrations of the wrong type ------------------------------------
def _exploding_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    raise RuntimeError("factory exploded on purpose\nsecond line")


def _exploding_loader(root: Path, download: bool) -> object:
    raise RuntimeError("loader exploded on purpose")


class _ExplodingAttack:
    stateful = False

    def __init__(self, config: object, seed: int) -> None:
        raise RuntimeError("attack exploded on purpose")


def test_a_plug_in_that_raises_is_named_in_one_line() -> None:
    """A plug-in's factory or loader that raised was an 'internal error' (exit 1) naming
    nothing; like a defense that raises, it is now a configuration error naming the setting."""
    from fedleak.registry import PluginFailed
    from fedleak.simulations.cli import _describe

    register_model("test-boom-net", _exploding_net)
    register_dataset("test-boom-set", _exploding_loader)
    register_attack("test-boom-attack", _ExplodingAttack)
    try:
        with pytest.raises(PluginFailed) as model:
            build_model(ModelSpec("test-boom-net", (1, 28, 28), 10))
        assert str(model.value) == (
            "model.name='test-boom-net': the plug-in model's factory raised RuntimeError: "
            "factory exploded on purpose"
        )
        assert isinstance(model.value.__cause__, RuntimeError)  # --verbose shows the plug-in
        with pytest.raises(PluginFailed) as data:
            load_dataset("test-boom-set")
        assert str(data.value) == (
            "data.dataset='test-boom-set': the plug-in data set's loader raised RuntimeError: "
            "loader exploded on purpose"
        )
        with pytest.raises(PluginFailed) as attack:
            validate_components(parse_flat({"attack.names": "test-boom-attack"}))
        assert str(attack.value) == (
            "attack.names='test-boom-attack': the plug-in attack's factory raised RuntimeError: "
            "attack exploded on purpose"
        )
        for error in (model.value, data.value, attack.value):
            line, status = _describe(error)
            assert status == 2 and line.startswith("fedleak: configuration error: ")
    finally:
        MODELS.remove("test-boom-net")
        DATASETS.remove("test-boom-set")
        attack_registry.ATTACKS.remove("test-boom-attack")


@pytest.mark.parametrize("share", ["per-sample", "batch"])
def test_the_command_names_a_plug_in_that_raises(
    share: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedleak.simulations.cli import main

    register_model("test-boom-net", _exploding_net)
    try:  # under batch sharing the model check builds it first, and named it twice
        argv = ["check", "quickstart", "--set", "model.name=test-boom-net"]
        status = main([*argv, "--set", f"threat.share={share}"])
    finally:
        MODELS.remove("test-boom-net")
    err = capsys.readouterr().err
    assert status == 2, err
    assert err == (
        "fedleak: configuration error: model.name='test-boom-net': the plug-in model's factory "
        "raised RuntimeError: factory exploded on purpose\n"
    )


def test_fedleak_errors_and_bugs_are_not_blamed_on_a_plug_in() -> None:
    from fedleak.data.dataset import DatasetUnavailable

    def absent(root: Path, download: bool) -> object:
        raise DatasetUnavailable("data.dataset='test-absent': not in /nowhere")

    register_dataset("test-absent", absent)
    try:  # a plug-in's own one-line fedleak error keeps its words
        with pytest.raises(DatasetUnavailable, match=r"^data\.dataset='test-absent': not in"):
            load_dataset("test-absent")
    finally:
        DATASETS.remove("test-absent")
    # fedleak's own factories are called bare: a bug there stays an internal error.
    lenet = MODELS.get("lenet").build
    assert MODELS.guarded("lenet", lenet, "factory") is lenet
    dlg = attack_entry("dlg").build
    assert attack_registry.ATTACKS.guarded("dlg", dlg, "factory") is dlg


@dataclass(frozen=True)
class _PassesConfig(Settings):
    passes: int = setting(1, low=1, doc="how many times")


def test_a_registration_of_the_wrong_type_is_refused_at_its_line() -> None:
    """Each was accepted, then failed as a bare TypeError (an internal error) when used."""
    cases = [
        (lambda: register_attack("test-a1", config=object()), r"attack 'test-a1': config=<obj"),
        (
            lambda: register_attack("test-a2", config={"passes": 1}),
            r"attack 'test-a2': config=\{'passes': 1\}: expected None or a settings dataclass",
        ),
        (
            lambda: register_attack("test-a3", config=_PassesConfig),  # the class, not an instance
            r"attack 'test-a3': config=<class .*: expected None or a settings dataclass instance",
        ),
        (
            lambda: register_attack("test-a4")(42),
            r"attack 'test-a4': expected an attack class or factory \(config, seed\) -> Attack, "
            r"got 42$",
        ),
        (
            lambda: register_attack("test-a5", presets={"cpu": _PassesConfig()}),
            r"attack 'test-a5': default_preset=None: expected one of 'cpu'$",
        ),
        (
            lambda: register_attack("test-a6", stateful="yes"),
            r"attack 'test-a6': stateful='yes': expected True, False or None$",
        ),
        (
            lambda: register_model("test-m1")(42),
            r"model 'test-m1': expected a model factory \(input_shape, num_classes\) -> "
            r"nn\.Module, got 42$",
        ),
        (
            lambda: register_model("test-m2", min_size="big"),
            r"model 'test-m2': min_size='big': expected an integer >= 1",
        ),
        (
            lambda: register_model("test-m3", modality="audio"),
            r"model 'test-m3': modality='audio': expected one of 'image', 'tokens'$",
        ),
        (
            lambda: register_dataset("test-d1")(7),
            r"data set 'test-d1': expected a data-set loader \(root, download\) -> "
            r"ImageDataset, got 7$",
        ),
        (
            lambda: register_dataset("test-d2", input_shape="abc"),
            r"data set 'test-d2': input_shape='abc': expected None or a tuple of positive int",
        ),
        (
            lambda: register_dataset("test-d3", num_classes=-3),
            r"data set 'test-d3': num_classes=-3: expected None or an integer >= 1$",
        ),
        (
            lambda: register_defense("test-f1")(7),
            r"defense 'test-f1': expected a defense class with from_args or a parser",
        ),
        (
            lambda: register_defense("test-f2", form=3),
            r"defense 'test-f2': form=3: expected one line",
        ),
        (
            lambda: register_model("test-m4", lambda shape, k: nn.Linear(1, 1), replace="yes"),
            r"model 'test-m4': replace='yes': expected True or False$",
        ),
    ]
    for register, message in cases:
        with pytest.raises(ConfigError, match=f"^{message}") as error:
            register()
        assert "\n" not in str(error.value)
    names = {*attack_names(), *model_names(), *dataset_names(), *DEFENSES.names()}
    assert not {name for name in names if name.startswith("test-")}
    # The right types still register.
    register_attack("test-ok", config=_PassesConfig())(lambda config, seed: None)
    register_dataset("test-ok", input_shape=[1, 28, 28], num_classes=10)(
        lambda root, download: load_mnist5k()
    )
    try:
        assert attack_entry("test-ok").configure({"passes": 2}) == _PassesConfig(passes=2)
        assert DATASETS.get("test-ok").input_shape == (1, 28, 28)
    finally:
        attack_registry.ATTACKS.remove("test-ok")
        DATASETS.remove("test-ok")


def test_an_entry_point_class_with_a_dict_default_config_is_refused_on_adoption() -> None:
    class DictConfig:
        default_config: ClassVar[dict[str, int]] = {"passes": 1}

    with pytest.raises(ConfigError, match=r"^attack 'x': config=\{'passes': 1\}: expected None"):
        attack_registry._adopt("x", DictConfig)


def test_a_plugin_that_exits_at_import_or_when_called_is_one_line_not_the_end(
    tmp_path: Path,
) -> None:
    """A plug-in module written as a script (`sys.exit(0)` at import, argparse at module
    level) ended every fedleak command silently with its exit code, 0 included (audit DM1)."""
    (tmp_path / "fedleak_script.py").write_text(
        "import sys\n\n\nclass Attack:\n    pass\n\n\nsys.exit(0)\n"
    )
    info = tmp_path / "fedleak_script-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedleak-script\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[fedleak.attacks]\ntest-script = fedleak_script:Attack\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(PluginError) as error:
            attack_entry("test-script")
        assert str(error.value).endswith("of fedleak-script 0.1 failed to load: SystemExit: 0")
        with pytest.raises(ConfigError, match=r"cannot import 'fedleak_script' \(SystemExit: 0\)"):
            build_model(ModelSpec("fedleak_script:Attack", (1, 2, 2), 2))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fedleak_script", None)

    def usage(*args: object) -> None:
        raise SystemExit("usage: attack.py [-h] --epochs EPOCHS")

    with pytest.raises(PluginFailed, match=r"^plug-in x: reconstruct raised SystemExit: usage"):
        PluginCall(usage, "plug-in x", "reconstruct")()


def test_a_resume_warns_that_a_stateful_plugin_attack_without_a_cache_starts_afresh() -> None:
    """Its rows after a resume differed from an uninterrupted run's without a word (audit
    DM2); LTI's inverter, saved in its cache-dir, is not warned about."""
    from fedleak.server.build import restarted_attacks

    @register_attack("test-counter")
    class Counter:
        def __init__(self, config: object, seed: int) -> None:
            self.calls = 0

        def reconstruct(self, observation, knowledge, budget):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    try:
        warning = restarted_attacks(parse_flat({"attack.names": "aux-mean,lti,test-counter"}))
        assert warning is not None
        assert warning.startswith("test-counter keeps state across rounds (stateful) and saves")
        assert restarted_attacks(parse_flat({"attack.names": "aux-mean,lti,ig"})) is None
    finally:
        attack_registry.ATTACKS.remove("test-counter")


def test_a_resume_names_a_plugin_whose_source_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plug-in edited between two resumes changed the rows without a word; fedleak's own
    source was compared, the plug-in's not (audit DM3)."""
    from fedleak.simulations.recording import changed_software, environment

    module = tmp_path / "fedleak_edited.py"
    module.write_text(
        "from torch import nn\n\n\ndef net(shape, classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    @register_attack("test-edited")
    class Edited:
        stateful = False

        def __init__(self, config: object, seed: int) -> None:
            pass

    try:
        config = parse_flat(
            {"model.name": "fedleak_edited:net", "attack.names": "aux-mean,test-edited"}
        )
        began = environment(torch.device("cpu"), config)
        assert set(began["plugins"]) == {"model fedleak_edited:net", "attack test-edited"}
        assert changed_software(began, config) == []
        module.write_text(module.read_text() + "# a changed line\n")
        was = began["plugins"]["model fedleak_edited:net"]
        [change] = changed_software(began, config)
        assert change.startswith(f"model fedleak_edited:net source {was} -> ")
        assert not change.endswith(was)
        # Built-in components are fedleak's own source, compared as such; the text corpora
        # are read outside the data set registry.
        assert environment(torch.device("cpu"), parse_flat({}))["plugins"] == {}
        text = parse_flat({"data.dataset": "wikipedia", "model.name": "transformer3"})
        assert environment(torch.device("cpu"), text)["plugins"] == {}
        # A folder from before plug-ins were recorded: nothing to compare, no false change
        # (audit DP6).
        older = {key: value for key, value in began.items() if key != "plugins"}
        assert changed_software(older, config) == []
        # A factory re-exported by the module the path names: its defining module's source
        # is the one hashed (audit DP5).
        (tmp_path / "fedleak_reexport.py").write_text("from fedleak_edited import net\n")
        again = parse_flat({"model.name": "fedleak_reexport:net", "attack.names": "aux-mean"})
        recorded = environment(torch.device("cpu"), again)
        module.write_text(module.read_text() + "# another changed line\n")
        assert [c.split(" source ")[0] for c in changed_software(recorded, again)] == [
            "model fedleak_reexport:net"
        ]
    finally:
        attack_registry.ATTACKS.remove("test-edited")


def test_a_plugin_that_exits_in_its_factory_forward_or_anywhere_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model factory's sys.exit(0) ended `fedleak run` silently with status 0, as did an
    exit in a model's forward or a defense's release (audit DP1)."""
    from fedleak.config import ConfigError
    from fedleak.server.validate import check_model
    from fedleak.simulations import cli

    (tmp_path / "fedleak_exits.py").write_text(
        textwrap.dedent(
            """
            import sys
            from torch import nn

            def net(shape, classes):
                sys.exit(0)

            class _Usage(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.linear = nn.Linear(4, 3)

                def forward(self, x):
                    if x.shape[0] > 1:
                        sys.exit("usage: bad")
                    return self.linear(x.flatten(1))

            def usage(shape, classes):
                return _Usage()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"the factory failed .* \(SystemExit: 0\)$"):
        build_model(ModelSpec("fedleak_exits:net", (1, 2, 2), 3))
    with pytest.raises(ConfigError, match=r"fails on a batch of 2 .* \(SystemExit: usage: bad\)$"):
        check_model(ModelSpec("fedleak_exits:usage", (1, 2, 2), 3))

    # Anywhere else in a command: one line and status 1, not a silent 0.
    def exits(args: object) -> None:
        sys.exit(0)

    monkeypatch.setattr(cli, "_config", exits)
    assert cli.main(["check"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fedleak: error: plug-in code ended the command with sys.exit(0)")


@dataclass(frozen=True)
class KeptConfig(Settings):
    cache_dir: Path | None = setting(None, doc="where the state is kept")


def test_a_resume_checks_inverter_files_only_of_attacks_that_say_where_theirs_are(
    tmp_path: Path,
) -> None:
    """A plug-in keeping state of its own in its cache-dir and reporting `train_seconds` was
    refused every resume, for a missing file of LTI's naming it never writes (audit DZ2)."""
    from fedleak.attacks.learned.store import InverterStoreError
    from fedleak.server.build import check_attack_state, with_attack_caches

    @register_attack("test-kept-state", config=KeptConfig())
    class Kept:
        stateful = True

        def __init__(self, config: KeptConfig, seed: int) -> None:
            self.config, self.seed, self.name = config, seed, "test-kept-state"

        def reconstruct(self, observation, knowledge, budget):
            raise NotImplementedError  # only built here

    try:
        flat = {"attack.names": "aux-mean,test-kept-state,lti", "data.aux-size": 500}
        config = with_attack_caches(parse_flat(flat), lambda name: tmp_path / name)
        check_attack_state(config, {"test-kept-state": 1})
        with pytest.raises(InverterStoreError, match=r"lti-inverter-r000001\.pt: missing, though"):
            check_attack_state(config, {"test-kept-state": 1, "lti": 1})
    finally:
        attack_registry.ATTACKS.remove("test-kept-state")
