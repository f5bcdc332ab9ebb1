"""The public API: `docs/api.md`'s examples run as written, and `observe`, `reconstruct` and
`score` agree with what a run's server and auditor compute."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedleak
from fedleak.attacks import registry as attack_registry
from fedleak.attacks.types import Reconstruction
from fedleak.server.auditor import Auditor, GroundTruth
from fedleak.settings import ConfigError

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_every_example_of_the_page_is_run_here() -> None:
    """Four examples, each executed by one test (the language model's in test_api_tokens.py):
    a new one must get its test."""
    assert len(_examples()) == 4
    assert "tests/test_api.py" in DOC.read_text(encoding="utf-8")


def test_import_fedleak_is_cheap_and_lists_the_api() -> None:
    code = "import sys, fedleak; print('torch' in sys.modules, sorted(fedleak.__all__)[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("False")
    for name in ("observe", "reconstruct", "score", "build_attack", "register_attack", "audit"):
        assert name in fedleak.__all__ and getattr(fedleak, name).__doc__


@pytest.mark.slow
def test_the_ig_example_reconstructs_the_digit(one_thread: None) -> None:
    namespace: dict[str, object] = {}
    exec(compile(_examples()[0], f"{DOC}:ig", "exec"), namespace)
    summary = namespace["leak"].summary()  # type: ignore[union-attr]
    assert summary["psnr"] > 20.0 and summary["label_accuracy"] == 1.0


@pytest.mark.slow
def test_the_lti_example_trains_on_the_given_aux_data() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_examples()[1], f"{DOC}:lti", "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result, Reconstruction) and result.status == "ok"
    assert "8 epochs" in result.message
    # Well above the aux-mean floor (about 11 dB on MNIST digits).
    assert namespace["leak"].summary()["psnr"] > 13.0  # type: ignore[union-attr]


def test_the_settings_example_registers_a_configurable_attack() -> None:
    namespace: dict[str, object] = {}
    try:
        exec(compile(_examples()[3], f"{DOC}:settings", "exec"), namespace)
        attack = namespace["attack"]
        assert attack.config.passes == 2  # type: ignore[attr-defined]
        with pytest.raises(ConfigError, match=r"^attack\.blurred-mean\.passes=0: expected"):
            fedleak.build_attack("blurred-mean", {"passes": 0})
        observation, _, _ = _client(batch=3)
        aux = torch.rand(6, 1, 28, 28)
        labels = torch.zeros(6, dtype=torch.long)
        result = fedleak.reconstruct(attack, observation, aux, labels)  # type: ignore[arg-type]
        assert result.inputs.shape == (3, 1, 28, 28)
    finally:
        attack_registry.ATTACKS.remove("blurred-mean")


def _client(batch: int) -> tuple[fedleak.Observation, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Sigmoid(), nn.Linear(32, 10))
    data = fedleak.load_dataset("mnist5k")
    x, y = data.train_x[:batch], data.train_y[:batch]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.parameters())
    observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=batch)
    return observation, x, y


def test_observe_packs_what_the_server_sees() -> None:
    observation, x, _ = _client(batch=2)
    assert observation.model.num_classes == 10 and observation.model.input_shape == (1, 28, 28)
    assert list(observation.update) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert (observation.num_examples, observation.batch_size, observation.update_kind) == (
        2,
        2,
        "gradient",
    )
    rebuilt = fedleak.build_model(observation.model)
    rebuilt.load_state_dict(observation.weights)
    with torch.no_grad():
        assert rebuilt(x).shape == (2, 10)
    model = nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="update: 1 tensors for the model's 2 parameters"):
        fedleak.observe(model, [torch.zeros(2, 3)], input_shape=(3,), num_examples=1)
    with pytest.raises(ConfigError, match="'nope' is not a parameter"):
        fedleak.observe(model, {"nope": torch.zeros(1)}, input_shape=(3,), num_examples=1)


def test_score_matches_the_auditor_rows() -> None:
    observation, x, y = _client(batch=3)
    guess = Reconstruction(
        inputs=(x[[2, 0, 1]] + 0.05 * torch.rand_like(x)).clamp(0, 1),
        labels=y[[2, 0, 1]],
    )
    leak = fedleak.score(guess, x, y)
    assert sorted(leak.pairs) == [(0, 2), (1, 0), (2, 1)]
    rows = Auditor().score(observation, "test", guess, GroundTruth(0, x, y), {})
    by_sample = {int(r["sample"]): r for r in rows}
    for index, (sample, _) in enumerate(leak.pairs):
        assert float(leak.psnr[index]) == pytest.approx(by_sample[sample]["psnr"])
        assert float(leak.ssim[index]) == pytest.approx(by_sample[sample]["ssim"])
        assert float(leak.lpips[index]) == pytest.approx(by_sample[sample]["lpips_alex"])
    assert leak.label_accuracy == 1.0
    # No guesses at all: every private sample unmatched and unrecovered, not a crash (DI1).
    none = fedleak.score(Reconstruction(inputs=x[:0], labels=y[:0]), x, y)
    assert none.pairs == [] and none.unmatched == [0, 1, 2] and none.label_accuracy == 0.0
    assert none.ssim.shape == none.psnr.shape == (0,)


def test_score_measures_at_one_thread_as_the_auditor_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LPIPS at two threads differed from the run's rows (scored at one) in the 8th digit."""
    _, x, y = _client(batch=2)
    seen: list[int] = []
    measure = fedleak.api.score_images

    def probe(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return measure(*args, **kwargs)

    monkeypatch.setattr(fedleak.api, "score_images", probe)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fedleak.score(Reconstruction(inputs=x.clone(), labels=y), x, y, lpips=False)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_reconstruct_sets_and_restores_the_thread_count() -> None:
    observation, _, _ = _client(batch=1)
    seen: list[int] = []

    class Probe:
        name = "probe"

        def reconstruct(self, observation, knowledge, budget):
            seen.append(torch.get_num_threads())
            return Reconstruction(inputs=torch.zeros(1, 1, 28, 28), labels=None)

    before = torch.get_num_threads()
    fedleak.reconstruct(Probe(), observation)  # type: ignore[arg-type]
    fedleak.reconstruct(Probe(), observation, threads=before + 1)  # type: ignore[arg-type]
    assert seen == [1, before + 1] and torch.get_num_threads() == before


@pytest.mark.parametrize("chosen", ["0", "-2", "two"])
def test_fedleak_threads_outside_its_range_is_refused(
    chosen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FEDLEAK_THREADS=0 ran on one thread, against its own message's "an integer >= 1" (audit
    DV8)."""
    observation, _, _ = _client(batch=1)
    monkeypatch.setenv("FEDLEAK_THREADS", chosen)
    with pytest.raises(
        ConfigError, match=rf"^FEDLEAK_THREADS='{chosen}': expected an integer >= 1$"
    ):
        fedleak.reconstruct(fedleak.build_attack("ig"), observation, max_iterations=1)


def _net_and_grads() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2, stride=2), nn.Sigmoid(), nn.Flatten())
    model.append(nn.Linear(4 * 14 * 14, 10))
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    return model, torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.parameters())


class Both(nn.Module):
    """A research model's habit: the logits and the features."""

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits, logits


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"update": "cut"},
            r"^update: '0\.weight' has shape \(4, 1, 5, 1\), expected \(4, 1, 5, 5\)$",
        ),
        ({"input_shape": (3, 32, 32)}, r"^input_shape=\(3, 32, 32\): the model cannot take one"),
        ({"kind": "weights"}, r"^kind='weights': expected one of gradient, delta$"),
        ({"num_examples": -1}, r"^num_examples=-1: expected an integer >= 1$"),
        ({"num_examples": 0}, r"^num_examples=0: expected an integer >= 1$"),
        ({"num_examples": 2.5}, r"^num_examples=2\.5: expected an integer >= 1$"),
        ({"batch_size": 0}, r"^batch_size=0: expected an integer >= 1$"),
        ({"local_steps": 0}, r"^local_steps=0: expected an integer >= 1$"),
        ({"learning_rate": 0.0}, r"^learning_rate=0\.0: expected a finite number > 0$"),
        ({"kind": "delta", "batch_size": 1}, r"^num_examples=2: a delta from 1 local steps of 1"),
        ({"batch_size": 3}, r"^batch_size=3: larger than the num_examples=2 a batch is drawn"),
        ({"update": "nan"}, r"^update: '0\.bias' holds NaN or infinite values"),
        ({"defense": "gauss"}, r"^defense='gauss': "),
        ({"num_classes": 1}, r"^num_classes=1: expected an integer >= 2$"),
        ({"weights": {}}, r"^weights: no entry for the model's '0\.weight'$"),
        ({"per_sample_updates": "one"}, r"^per_sample_updates: '0\.weight' has shape \(1, 4, 1"),
        # Once accepted, then torch's errors (or an ImageShapeError) deep inside an attack.
        (
            {"weights": "narrow"},
            r"^weights: '3\.weight' has shape \(10, 1\), expected \(10, 784\)$",
        ),
        ({"weights": "nan"}, r"^weights: '0\.bias' holds NaN or infinite values"),
        ({"update": "half"}, r"^update: no tensor for the model's parameter '3\.weight'; a client"),
        ({"input_shape": 784}, r"^input_shape=784: expected one image's shape \(C, H, W\)"),
        # (L,) declares token ids, which the image model cannot take.
        ({"input_shape": (784,)}, r"^input_shape=\(784,\): the model cannot take one sequence"),
        ({"input_shape": (1, 28)}, r"^input_shape=\(1, 28\): expected one image's shape \(C, H"),
        ({"model": None}, r"^model: expected a torch\.nn\.Module, got NoneType$"),
        ({"model": "frozen"}, r"^model: parameter '0\.weight' is frozen \(requires_grad=False\)"),
        ({"model": "double"}, r"^model: parameter '0\.weight' is torch\.float64; fedleak's"),
        # Audit AT: each was accepted and then inverted wrongly or failed deep in an attack.
        ({"model": "dropout"}, r"^model: Dropout '4' \(p=0\.5\) draws random masks"),
        ({"model": "eval-bn"}, r"^model: in eval\(\) mode with BatchNorm2d, which normalises"),
        ({"num_classes": 100}, r"^num_classes=100: the model scores 10 classes for one input"),
        ({"per_sample_updates": "part"}, r"^per_sample_updates: no tensor for the model's param"),
        # Audit BU: the first was accepted and inverted as the wrong model, the others raised
        # torch's or Python's own errors.
        ({"model": "eval-in"}, r"^model: in eval\(\) mode with InstanceNorm2d, which normalises"),
        ({"model": "tuple-out"}, r"^model: its forward returns a tuple; the attacks replay a"),
        ({"per_sample_updates": "tensor"}, r"^per_sample_updates: a Tensor; pass a name -> tensor"),
        ({"round": 0}, r"^round=0: expected an integer >= 1$"),
        ({"client_id": "a"}, r"^client_id='a': expected an integer >= 0$"),
        # Audit DV8: cast silently to floats and attacked as if a gradient.
        ({"update": "int"}, r"^update: '0\.weight' is torch\.int64; expected floating-point"),
        ({"per_sample_updates": "bool"}, r"^per_sample_updates: '0\.weight' is torch\.bool;"),
        # Audit FG1: a plain gradient declared as defended had the adaptive attacks match a
        # defense it never went through.
        (
            {"defense": "sign"},
            r"^defense='sign': the update: '0\.weight' holds -?[0-9.e-]+, yet sign compression",
        ),
        (
            {"defense": "gauss:0.1+prune:0.5"},
            r"^defense='gauss:0\.1\+prune:0\.5': the update: '0\.weight' has 0 zeros among 100 "
            r"coordinates, yet prune:0\.5 leaves at least 50; pass",
        ),
        (
            {"defense": "prune:0.9:global", "update": "signs"},
            r"^defense='prune:0\.9:global': the update: it has 0 zeros among \d+ coordinates",
        ),
        (
            {"defense": "sign", "update": "signs", "per_sample_updates": "one-each"},
            r"^defense='sign': per_sample_updates: '0\.weight' holds",
        ),
    ],
)
def test_observe_refuses_what_no_client_could_send(change: dict, message: str) -> None:
    """Each in one line naming the argument, before any attack runs (a cut update used to fail
    deep in torch; `kind="weights"` and `num_examples=0` were accepted)."""
    model, grads = _net_and_grads()
    arguments: dict = {"input_shape": (1, 28, 28), "num_examples": 2, **change}
    if arguments.get("update") == "cut":
        arguments["update"] = [g[..., :1] if g.dim() > 1 else g for g in grads]
    if arguments.get("update") == "nan":
        arguments["update"] = [g if g.dim() > 1 else torch.full_like(g, math.nan) for g in grads]
    if arguments.get("per_sample_updates") == "one":
        arguments["per_sample_updates"] = dict(
            zip([n for n, _ in model.named_parameters()], [g[None] for g in grads], strict=True)
        )
    names = [n for n, _ in model.named_parameters()]
    if arguments.get("update") == "half":
        arguments["update"] = dict(zip(names[:2], grads[:2], strict=True))
    if arguments.get("weights") in ("narrow", "nan"):
        state = dict(model.state_dict())
        if arguments["weights"] == "narrow":
            state["3.weight"] = torch.zeros(10, 1)
        else:
            state["0.bias"] = torch.full_like(state["0.bias"], math.nan)
        arguments["weights"] = state
    if arguments.get("model") == "frozen":
        model[0].weight.requires_grad_(False)
    if arguments.get("model") == "double":
        model.double()
    if arguments.get("model") == "dropout":
        model.insert(4, nn.Dropout(0.5))
    if arguments.get("model") == "eval-bn":
        model.insert(1, nn.BatchNorm2d(4))
        model.eval()
        grads = (*grads[:2], torch.zeros(4), torch.zeros(4), *grads[2:])
    if arguments.get("model") == "eval-in":
        model.insert(1, nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
        model.eval()
        grads = (*grads[:2], torch.zeros(4), torch.zeros(4), *grads[2:])
    if arguments.get("model") == "tuple-out":
        model.append(Both())
    if arguments.get("per_sample_updates") == "tensor":
        arguments["per_sample_updates"] = torch.stack([grads[0]] * 2)
    if arguments.get("update") == "int":
        arguments["update"] = [(g * 1e3).long() for g in grads]
    if arguments.get("per_sample_updates") == "bool":
        pairs = zip(names, grads, strict=True)
        arguments["per_sample_updates"] = {n: torch.stack([g, g]) > 0 for n, g in pairs}
    if arguments.get("update") == "signs":
        arguments["update"] = tuple(torch.where(g >= 0, 1.0, -1.0) for g in grads)
    if arguments.get("per_sample_updates") == "one-each":
        arguments["per_sample_updates"] = {
            n: torch.stack([torch.sign(g), g]) for n, g in zip(names, grads, strict=True)
        }
    if arguments.get("per_sample_updates") == "part":
        arguments["per_sample_updates"] = {"0.weight": torch.stack([grads[0]] * 2)}
    if "model" in arguments:
        model = arguments.pop("model") if arguments["model"] is None else model
        arguments.pop("model", None)
    update = arguments.pop("update", grads)
    with pytest.raises(ConfigError, match=message) as refused:
        fedleak.observe(model, update, **arguments)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "defense", ["sign", "prune:0.9", "prune:0.9:global", "gauss:0.1+prune:0.5+sign", "dpsgd:1:0.5"]
)
def test_observe_takes_what_the_defense_released(defense: str) -> None:
    """The check of an update against its declared defense refuses none that the defense
    released, per-sample updates included."""
    from fedleak.defenses import parse_defense_spec

    model, grads = _net_and_grads()
    names = [n for n, _ in model.named_parameters()]
    spec = parse_defense_spec(defense)
    generator = torch.Generator().manual_seed(0)
    released = spec.share(dict(zip(names, grads, strict=True)), 2, generator)
    pairs = zip(names, grads, strict=True)
    each = spec.share_each({n: torch.stack([g, -g]) for n, g in pairs}, generator)
    observation = fedleak.observe(
        model,
        released,
        input_shape=(1, 28, 28),
        num_examples=2,
        defense=defense,
        per_sample_updates=each,
    )
    assert observation.defense == defense


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device": "gpu"}, r"^device='gpu': expected cpu, cuda or cuda:N$"),
        ({"device": "meta"}, r"^device='meta': expected cpu, cuda or cuda:N$"),
        ({"device": "cuda:7"}, r"^device='cuda:7': this machine has \d+ CUDA device\(s\); use cpu"),
        ({"max_iterations": -1}, r"^max_iterations=-1: expected an integer >= 1$"),
        ({"max_iterations": "a"}, r"^max_iterations='a': expected an integer >= 1$"),
        ({"max_seconds": 0}, r"^max_seconds=0: expected a finite number > 0$"),
        ({"threads": "many"}, r"^threads='many': expected an integer >= 1$"),
    ],
)
def test_reconstruct_refuses_a_bad_budget_or_device(change: dict, message: str) -> None:
    model, grads = _net_and_grads()
    observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=2)
    with pytest.raises(ConfigError, match=message):
        fedleak.reconstruct(fedleak.build_attack("ig"), observation, **change)


def test_reconstruct_names_what_it_was_given_instead() -> None:
    """An attack's name or a dict in place of the objects raised AttributeError."""
    model, grads = _net_and_grads()
    observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=2)
    with pytest.raises(ConfigError, match=r"^attack: expected an attack \(fedleak\.build_attack"):
        fedleak.reconstruct("ig", observation)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^observation: expected an Observation .* got dict$"):
        fedleak.reconstruct(fedleak.build_attack("ig"), {})  # type: ignore[arg-type]


def test_reconstruct_and_score_treat_a_guess_as_the_auditor_does() -> None:
    """Out-of-range images are clamped (PSNR 1.2 dB unclamped against 13.2 the auditor gave),
    NaN is status "nan", a wrong shape "failed"; `score` refuses what is not "ok"."""
    model, grads = _net_and_grads()
    observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=2)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))

    class Fixed:
        name = "fixed"

        def __init__(self, inputs: torch.Tensor) -> None:
            self.inputs = inputs

        def reconstruct(self, observation, knowledge, budget):
            return Reconstruction(inputs=self.inputs, labels=None)

    wide = fedleak.reconstruct(Fixed(x * 4 - 1.5), observation)  # type: ignore[arg-type]
    assert wide.status == "ok" and "clamped to [0, 1]" in wide.message
    assert float(wide.inputs.min()) == 0.0 and float(wide.inputs.max()) == 1.0
    clamped = fedleak.score((x * 4 - 1.5).clamp(0, 1), x, lpips=False).summary()["psnr"]
    assert fedleak.score(wide, x, lpips=False).summary()["psnr"] == pytest.approx(clamped)
    assert fedleak.score(x * 4 - 1.5, x, lpips=False).summary()["psnr"] == pytest.approx(clamped)
    assert clamped > 5.0
    nan = fedleak.reconstruct(Fixed(torch.full_like(x, math.nan)), observation)  # type: ignore[arg-type]
    assert nan.status == "nan"
    with pytest.raises(ConfigError, match=r"^reconstruction status 'nan'"):
        fedleak.score(nan, x)
    flat = fedleak.reconstruct(Fixed(x[:, 0]), observation)  # type: ignore[arg-type]
    assert flat.status == "failed" and "expected (2, 1, 28, 28)" in flat.message
    with pytest.raises(ConfigError, match=r"^reconstruction status 'failed'"):
        fedleak.score(x[:, 0], x)
    # A model of one's own may read 4-channel images, which LPIPS cannot (audit ET1).
    four = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"^inputs: 4-channel images; LPIPS scores 1- or 3-"):
        fedleak.score(four, four)
    assert fedleak.score(four, four, lpips=False).summary()["psnr"] > 60


@pytest.mark.parametrize(
    ("truth", "labels", "message"),
    [
        (
            "uint8",
            None,
            r"^inputs: expected float images \[N, C, H, W\] in \[0, 1\], N >= 1, got torch\.uint8",
        ),
        (
            "255",
            None,
            r"^inputs: pixel values from 0\.3432 to 254\.8; expected images in \[0, 1\]$",
        ),
        ("numpy", None, r"^inputs: expected a torch\.Tensor, got ndarray$"),
        (
            "ok",
            [1],
            r"^labels: expected 2 integer labels, one per input, got torch\.int64 of shape \(1,\)$",
        ),
    ],
)
def test_score_refuses_what_it_cannot_measure(
    truth: str, labels: list | None, message: str
) -> None:
    """A uint8 batch scored -43 dB without a word; wrong labels failed with an IndexError."""
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    inputs = {"uint8": (x * 255).to(torch.uint8), "255": x * 255, "numpy": x.numpy(), "ok": x}
    label_tensor = None if labels is None else torch.tensor(labels)
    with pytest.raises(ConfigError, match=message):
        fedleak.score(x, inputs[truth], label_tensor)  # type: ignore[arg-type]


class _Activated(nn.Module):
    """A model whose activation is a plain function: not a submodule, not in its repr."""

    def __init__(self, activation) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(784, 16), nn.Linear(16, 10)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.activation(self.first(x.flatten(1))))


class _Leaky:
    """An activation object (a snapshot holds a deep copy of it, not the object itself)."""

    def __init__(self, slope: float) -> None:
        self.slope = slope

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.leaky_relu(t, self.slope)


def test_observe_snapshots_what_decides_the_computation() -> None:
    """Two models of one class and repr, one with sigmoid and one with ReLU, shared the first
    one's snapshot: the second was attacked as a sigmoid network (IG 7.5 against 81.7 dB)."""
    x, y = torch.rand(1, 1, 28, 28), torch.tensor([3])
    names = []
    for activation in (torch.sigmoid, torch.relu, torch.sigmoid):
        torch.manual_seed(0)
        model = _Activated(activation)
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.parameters())
        observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=1)
        rebuilt = fedleak.build_model(observation.model)
        rebuilt.load_state_dict(observation.weights)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model(x))
        names.append(observation.model.name)
    assert names[0] != names[1] and names[0] == names[2]
    # A new activation object per model, freed with it: CPython hands a freed object's id to
    # the next one, and 40-80% of 200 such models were rebuilt with the other's activation.
    for step in range(40):
        slope = (0.01, -1.0)[step % 2]
        model = _Activated(_Leaky(slope))
        grads = [torch.zeros_like(p) for p in model.parameters()]
        observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=1)
        rebuilt = fedleak.build_model(observation.model)
        rebuilt.load_state_dict(observation.weights)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model(x)), step
        del model, observation, rebuilt


class _Stateful(nn.Module):
    """Counts its calls and keeps its last hidden activation, as feature-extraction code does."""

    def __init__(self, detach: bool = True) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Flatten(), nn.Linear(784, 64)), nn.Linear(64, 10)
        self.calls, self.detach, self.hidden = 0, detach, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.body(x)
        self.hidden = h.detach() if self.detach else h
        return self.head(h)


class _Centred(nn.Module):
    """Normalises inside, with its mean held as a plain tensor attribute."""

    def __init__(self, mean: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mean, self.head = torch.tensor(mean), nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x - self.mean)


def test_a_model_observed_in_a_loop_adds_no_weights_per_snapshot() -> None:
    """A model whose attributes change between calls (a counter) is a new snapshot each time:
    200 of them held 200 copies of the weights (RSS 768 -> 932 MB in an outside check). A
    snapshot holds the architecture alone; a cached activation is state, not architecture."""
    from fedleak import api
    from fedleak.api import model_spec_for

    model, x, y = _Stateful(), torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    names = set()
    for _ in range(5):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.parameters())
        observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=2)
        names.add(observation.model.name)
        rebuilt = fedleak.build_model(observation.model)
        rebuilt.load_state_dict(observation.weights)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model(x))
    assert len(names) == 5  # the counter moved
    for name in names:
        skeleton, _ = api._SNAPSHOTS[name]
        assert all(p.is_meta for p in skeleton.parameters())
    # A tensor held as an attribute is a constant of the computation (a normalising mean):
    # two models differing only in it shared a snapshot (IG 15.8 against 78.3 dB).
    specs = {}
    for mean in (0.1307, 0.5, 0.1307):
        centred = _Centred(mean)
        specs.setdefault(mean, set()).add(model_spec_for(centred, (1, 28, 28), 10).name)
        rebuilt = fedleak.build_model(model_spec_for(centred, (1, 28, 28), 10))
        rebuilt.load_state_dict(centred.state_dict())
        with torch.no_grad():
            assert torch.equal(rebuilt(x), centred(x))
    assert len(specs[0.1307]) == 1 and specs[0.1307] != specs[0.5]
    attached = _Stateful(detach=False)
    attached(x)
    grads = [torch.zeros_like(p) for p in attached.parameters()]
    with pytest.raises(ConfigError, match=r"^model: cannot be copied to rebuild it \(Only Tensors"):
        fedleak.observe(attached, grads, input_shape=(1, 28, 28), num_examples=2)


def test_integer_images_are_refused_not_scored_as_pixels() -> None:
    """A uint8 guess of the exact images scored -43 dB with status "ok"."""
    model, grads = _net_and_grads()
    observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=2)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    pixels = (x * 255).round().to(torch.uint8)

    class Fixed:
        name = "fixed"

        def reconstruct(self, observation, knowledge, budget):
            return Reconstruction(inputs=pixels, labels=None)

    result = fedleak.reconstruct(Fixed(), observation)  # type: ignore[arg-type]
    assert result.status == "failed"
    assert result.message == "images of dtype torch.uint8; expected float pixels in [0, 1]"
    with pytest.raises(ConfigError, match=r"^reconstruction status 'failed': images of dtype"):
        fedleak.score(pixels, x)


def test_score_pairs_per_sample_updates_in_order_as_the_auditor_does() -> None:
    """Given the observation of per-sample updates, a guess that swapped two samples is scored
    sample by sample (9.6 dB and wrong labels), not rematched to 100 dB."""
    model, _ = _net_and_grads()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 2, 3])
    rows = [
        torch.autograd.grad(
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), model.parameters()
        )
        for i in range(3)
    ]
    names = [name for name, _ in model.named_parameters()]
    per_sample = {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}
    mean = {n: t.mean(0) for n, t in per_sample.items()}
    observation = fedleak.observe(
        model, mean, input_shape=(1, 28, 28), num_examples=3, per_sample_updates=per_sample
    )
    # In parameters() order, as vmap(grad(...)) over a tuple of parameters returns them: the
    # same observation (it raised "Boolean value of Tensor ... is ambiguous", audit BU3).
    ordered = fedleak.observe(
        model,
        list(mean.values()),
        input_shape=(1, 28, 28),
        num_examples=3,
        per_sample_updates=tuple(per_sample.values()),
    )
    assert all(torch.equal(ordered.per_sample_updates[n], per_sample[n]) for n in names)
    swapped = Reconstruction(inputs=x[[1, 0, 2]], labels=y[[1, 0, 2]])
    leak = fedleak.score(swapped, x, y, observation=observation, lpips=False)
    assert leak.pairs == [(0, 0), (1, 1), (2, 2)]
    assert float(leak.psnr[2]) == 100.0 and float(leak.psnr[0]) < 20.0
    assert leak.label_accuracy == pytest.approx(1 / 3)
    truth = GroundTruth(0, x, y)
    audited = Auditor(lpips_nets=()).score(observation, "test", swapped, truth, {})
    by_sample = {int(r["sample"]): r for r in audited}
    for index, (sample, _) in enumerate(leak.pairs):
        assert float(leak.psnr[index]) == pytest.approx(by_sample[sample]["psnr"])
    label_share = sum(float(r["label_acc"]) for r in audited) / 3
    assert leak.label_accuracy == pytest.approx(label_share)
    rematched = fedleak.score(swapped, x, y, lpips=False)  # a batch update: no order
    assert rematched.summary()["psnr"] == 100.0 and rematched.label_accuracy == 1.0


def test_score_counts_the_private_samples_no_guess_was_paired_with() -> None:
    """Two exact guesses of a batch of four read label accuracy 1.0 and nothing else."""
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([5, 6, 7, 8])
    leak = fedleak.score(Reconstruction(inputs=x[:2], labels=y[:2]), x, y, lpips=False)
    assert leak.pairs == [(0, 0), (1, 1)] and leak.unmatched == [2, 3]
    assert leak.label_accuracy == 0.5
    assert leak.summary()["unmatched"] == 2.0


@pytest.mark.parametrize(
    ("aux", "labels", "message"),
    [
        ("normalised", None, r"^aux_inputs: pixel values from -0\.42\d* to 2\.8\d*; expected"),
        ("uint8", None, r"^aux_inputs: torch\.uint8 images; expected float pixels in \[0, 1\]"),
        ("ok", [0, 10], r"^aux_labels: classes from 0 to 10; expected 0\.\.9$"),
        ("ok", [[0], [1]], r"^aux_labels: expected integer class indices \[N\], got torch\.int64"),
    ],
)
def test_the_attackers_images_are_checked_as_a_runs_data_set(
    aux: str, labels: list | None, message: str
) -> None:
    """Normalised auxiliary images trained LTI on the wrong pixels without a word."""
    observation, _, _ = _client(batch=1)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0
    inputs = {"normalised": (x - 0.1307) / 0.3081, "uint8": (x * 255).to(torch.uint8), "ok": x}
    aux_labels = torch.tensor([0, 1] if labels is None else labels)
    with pytest.raises(ConfigError, match=message):
        fedleak.knowledge(observation, inputs[aux], aux_labels)


def test_a_class_defined_again_gets_its_own_snapshot() -> None:
    """A notebook cell run again with a new forward defined a class of the same name and
    module: the attack rebuilt the old class and inverted the wrong function (audit AT1)."""

    def defined(activation) -> type[nn.Module]:
        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layer = nn.Linear(4, 3)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.layer(activation(x.flatten(1)))

        return Net

    x = torch.rand(1, 1, 2, 2)
    outputs = []
    for activation in (torch.sigmoid, torch.relu):
        torch.manual_seed(0)
        model = defined(activation)()
        grads = torch.autograd.grad(model(x).sum(), model.parameters())
        observation = fedleak.observe(model, grads, input_shape=(1, 2, 2), num_examples=1)
        rebuilt = fedleak.build_model(observation.model)
        rebuilt.load_state_dict(observation.weights)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), model(x))
            outputs.append(rebuilt(x))
    assert not torch.allclose(*outputs)


def test_the_observation_keeps_its_own_copy_of_the_update() -> None:
    """An optimiser's zero_grad() after observe() emptied the observed gradient (audit AT5)."""
    model, _ = _net_and_grads()
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    per_sample = {n: torch.stack([p.grad] * 2) for n, p in model.named_parameters()}
    observation = fedleak.observe(
        model, grads, input_shape=(1, 28, 28), num_examples=2, per_sample_updates=per_sample
    )
    seen = {n: u.clone() for n, u in observation.update.items()}
    model.zero_grad(set_to_none=False)
    for tensor in per_sample.values():
        tensor.zero_()
    assert all(torch.equal(observation.update[n], seen[n]) for n in seen)
    assert all(u.abs().sum() > 0 for u in observation.per_sample_updates.values())


def test_the_knowledge_keeps_its_own_copy_of_the_checked_aux_data() -> None:
    """A normalisation of the caller's aux images, done in place after knowledge(), reached
    the attacks past its range check (audit EL1)."""
    model, grads = _net_and_grads()
    observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=1)
    aux_x, aux_y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    attacker = fedleak.knowledge(observation, aux_x, aux_y)
    aux_x.sub_(0.1307).div_(0.3081)
    aux_y[0] = 12
    assert attacker.aux_inputs.min() >= 0 and attacker.aux_inputs.max() <= 1
    assert attacker.aux_labels.tolist() == [0, 1, 2, 3]


def test_arguments_of_the_wrong_type_are_one_line_errors() -> None:
    """Python's AttributeError or torch's errors from deep inside, or a "no" read as yes
    (audit EL3, EL4)."""
    from fedleak.defenses.spec import parse_defense_spec

    with pytest.raises(ConfigError, match=r"^attack\.names=3: expected a name \(a string\)$"):
        fedleak.build_attack(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^data\.dataset=3: expected a name \(a string\)$"):
        fedleak.load_dataset(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^spec: expected a ModelSpec, got str$"):
        fedleak.build_model("lenet")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^model\.name=5: expected a name \(a string\)$"):
        fedleak.build_model(fedleak.ModelSpec(5, (1, 28, 28), 10))  # type: ignore[arg-type]
    fedleak.build_model(fedleak.ModelSpec("lenet", (1, 28, 28), np.int64(10)))  # numpy's, EP5
    with pytest.raises(ConfigError, match=r"^model\.num_classes=10\.0: expected an integer$"):
        fedleak.build_model(fedleak.ModelSpec("lenet", (1, 28, 28), 10.0))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^model\.num_classes=True: expected an integer$"):
        fedleak.build_model(fedleak.ModelSpec("lenet", (1, 28, 28), True))  # ER9
    noise, generator = parse_defense_spec("gauss:0.01"), torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match=r"^the update to defend: 'w' is torch\.int64, not a"):
        noise.share({"w": torch.zeros(3, dtype=torch.long)}, 1, generator)
    with pytest.raises(TypeError, match=r"^generator: expected a torch\.Generator, got NoneType"):
        noise.share({"w": torch.zeros(3)}, 1, None)  # type: ignore[arg-type]
    model, grads = _net_and_grads()
    observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=2)
    x = torch.rand(2, 1, 28, 28)
    fedleak.score(x, x, lpips=np.False_)  # numpy's bool is a bool (EP5)
    with pytest.raises(ConfigError, match=r"^lpips='no': expected True or False$"):
        fedleak.score(x, x, lpips="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^labels: expected 2 integer labels, one per input"):
        fedleak.score(x, x, torch.tensor([True, False]), lpips=False)
    with pytest.raises(ConfigError, match=r"^show_progress='no': expected True or False$"):
        fedleak.reconstruct(fedleak.build_attack("aux-mean"), observation, show_progress="no")  # type: ignore[arg-type]


def test_reconstruct_speaks_of_its_own_arguments() -> None:
    """An attack needing auxiliary data said "set data.aux-size > 0", a run's setting; a text
    attack on images failed inside the attack; aux data beside attacker= was dropped."""
    observation, x, y = _client(batch=2)
    for name in ("aux-mean", "lti"):
        with pytest.raises(ConfigError, match=rf"^aux_inputs: {re.escape(name)} needs more aux"):
            fedleak.reconstruct(fedleak.build_attack(name), observation)
    with pytest.raises(ConfigError, match=r"^attack: aux-frequency reconstructs tokens, but"):
        fedleak.reconstruct(fedleak.build_attack("aux-frequency"), observation)
    attacker = fedleak.knowledge(observation, x, y)
    with pytest.raises(ConfigError, match=r"^aux_inputs, aux_labels: given beside attacker="):
        fedleak.reconstruct(fedleak.build_attack("ig"), observation, x, y, attacker=attacker)
    with pytest.raises(ConfigError, match=r"^seed=4294967296: expected an integer in"):
        fedleak.knowledge(observation, seed=2**32)
    # Knowledge of another model: LTI raised torch's error, the floors failed (audit BU6).
    other = dataclasses.replace(attacker, input_shape=(3, 4, 4), num_classes=3)
    with pytest.raises(ConfigError, match=r"^attacker: knowledge of inputs \(3, 4, 4\) and 3 "):
        fedleak.reconstruct(fedleak.build_attack("lti"), observation, attacker=other)
    with pytest.raises(ConfigError, match=r"^attacker: expected fedleak\.knowledge"):
        fedleak.reconstruct(fedleak.build_attack("ig"), observation, attacker=(x, y))  # type: ignore[arg-type]
    # A device beside attacker= was ignored: the attack ran on the knowledge's (audit DV6).
    elsewhere = dataclasses.replace(attacker, device=torch.device("cuda", 0))
    with pytest.raises(ConfigError, match=r"^device='cpu': the attacker's knowledge is on cuda:0"):
        fedleak.reconstruct(
            fedleak.build_attack("ig"), observation, attacker=elsewhere, device="cpu"
        )
    with pytest.raises(ConfigError, match=r"^device='cuda:7': this machine has"):
        fedleak.reconstruct(
            fedleak.build_attack("ig"), observation, attacker=attacker, device="cuda:7"
        )
    kept = fedleak.reconstruct(
        fedleak.build_attack("ig"), observation, attacker=attacker, device="cpu", max_iterations=1
    )
    assert kept.status == "ok"


def test_score_refuses_labels_and_shapes_that_do_not_fit() -> None:
    """Labels out of range scored an accuracy of 0; a HWC batch was blamed on the guess."""
    observation, x, y = _client(batch=2)
    with pytest.raises(
        ConfigError, match=r"^labels: classes from -\d+ to -\d+; expected class indices >= 0$"
    ):
        fedleak.score(x, x, y - 10)
    with pytest.raises(
        ConfigError, match=r"^labels: classes from 1\d to 1\d; expected class indices 0\.\.9$"
    ):
        fedleak.score(x, x, y + 10, observation=observation)
    with pytest.raises(
        ConfigError, match=r"^inputs, reconstruction: private images of shape \(28, 28, 1\)"
    ):
        fedleak.score(x, x.permute(0, 2, 3, 1).contiguous())


def test_batchnorm_without_running_statistics_may_be_observed_in_eval_mode() -> None:
    """It normalises with the batch's own statistics in both modes (audit AY D2)."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten()
    )
    model.append(nn.Linear(2 * 4 * 4, 3)).eval()
    grads = [torch.zeros_like(p) for p in model.parameters()]
    observation = fedleak.observe(model, grads, input_shape=(1, 6, 6), num_examples=2)
    assert observation.num_examples == 2


def test_a_models_snapshot_has_one_name_in_every_process() -> None:
    """Naming a snapshot by its class's id gave each process another name, so LTI never found
    the inverter an earlier process had saved for the same model (audit AY R1)."""
    code = textwrap.dedent(
        """
        import torch
        from torch import nn
        import fedleak

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer, self.activation = nn.Linear(4, 3), torch.sigmoid
                self.scale = lambda t: 2 * t

            def forward(self, x):
                return self.layer(self.scale(self.activation(x.flatten(1))))

        model = Net()
        grads = [torch.zeros_like(p) for p in model.parameters()]
        print(fedleak.observe(model, grads, input_shape=(1, 2, 2), num_examples=1).model.name)
        """
    )
    names = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(names) == 1 and next(iter(names)).startswith("custom-net-")


def test_a_text_corpus_asked_of_load_dataset_names_the_loader_that_exists() -> None:
    import fedleak.data

    with pytest.raises(ConfigError, match=r"load it with fedleak\.data\.load_corpus") as caught:
        fedleak.load_dataset("lee-news")
    assert "\n" not in str(caught.value)
    assert fedleak.data.load_corpus("lee-news").documents


def test_an_attacks_progress_in_a_log_is_a_few_lines_not_one_per_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off a terminal the bar is to redraw at most every 30 s, but each check's matching loss
    redrew it at once: 42 redraws in a second of one attack (audit CF3)."""
    import io

    observation, _, _ = _client(batch=1)
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr("sys.stderr", log)
    attack = fedleak.build_attack("ig")
    fedleak.reconstruct(attack, observation, max_iterations=500, show_progress=True)
    drawn = log.getvalue()
    assert "ig" in drawn and drawn.endswith("\n")
    assert drawn.count("\r") <= 3, drawn


def test_batchnorm_statistics_reach_gradinversions_exact_prior() -> None:
    """`bn-mode="exact"` could not be reached from the library: `observe` took no batch
    statistics (audit CX5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    model.append(nn.Linear(4 * 28 * 28, 10))
    data = fedleak.load_dataset("mnist5k")
    x, y = data.train_x[:2], data.train_y[:2]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.parameters())
    stats = fedleak.batchnorm_statistics(model, x)
    assert sorted(stats) == ["1.mean", "1.var"]
    torch.testing.assert_close(stats["1.mean"], model[0](x).mean(dim=(0, 2, 3)))
    shape = {"input_shape": (1, 28, 28), "num_examples": 2}
    seen = fedleak.observe(model, grads, bn_statistics=stats, **shape)
    exact = fedleak.build_attack("gradinversion", {"bn-mode": "exact"})
    result = fedleak.reconstruct(exact, seen, max_iterations=5)
    assert result.diagnostics["bn_exact"] == 1.0 and result.diagnostics["bn_weight"] == 1e-3
    blind = fedleak.observe(model, grads, **shape)
    # A ConfigError like every other refusal of the API's input (audit DV7).
    with pytest.raises(ConfigError, match=r"observe\(\.\.\., bn_statistics=\) in the library"):
        fedleak.reconstruct(exact, blind, max_iterations=5)
    for given, message in (
        ({"1.mean": stats["1.mean"]}, r"no entry for '1\.var'"),
        ({**stats, "2.mean": stats["1.mean"]}, r"'2\.mean' names no layer"),
        ({**stats, "1.var": torch.zeros(3)}, r"\['1\.var'\]: expected a tensor of shape \(4,\)"),
        ({**stats, "1.var": -torch.ones(4)}, r"expected finite values, a variance >= 0"),
        ([stats["1.mean"]], "expected a mapping"),
    ):
        with pytest.raises(ConfigError, match=f"^bn_statistics.*{message}"):
            fedleak.observe(model, grads, bn_statistics=given, **shape)  # type: ignore[arg-type]
    # What the model cannot take is one line naming the argument (audit DC3).
    for bad, message in (
        (x[:, 0], r"^inputs: the model cannot take a batch of shape \(2, 28, 28\) \("),
        (x.long(), r"^inputs: expected a float tensor, the client's batch; got torch.int64"),
        ("pixels", r"^inputs: expected a float tensor, the client's batch; got str"),
        # Blamed on the batch's shape before (audit DV8).
        (x.double(), r"^inputs: torch\.float64, the model's parameters are torch\.float32;"),
    ):
        with pytest.raises(ConfigError, match=message):
            fedleak.batchnorm_statistics(model, bad)  # type: ignore[arg-type]
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ConfigError, match=r"^model: no BatchNorm layer"):
        fedleak.batchnorm_statistics(plain, x)
    plain_grads = [torch.zeros_like(p) for p in plain.parameters()]
    with pytest.raises(ConfigError, match=r"^bn_statistics: the model has no BatchNorm layer"):
        fedleak.observe(plain, plain_grads, bn_statistics=stats, **shape)


def test_arguments_of_the_wrong_type_are_refused_in_one_line(tmp_path: Path) -> None:
    """knowledge(None) and audit(object(), ...) failed as AttributeErrors deep inside, audit's
    after it had made the run folder; run_study(client_cpus="1") as a TypeError (audit DV7)."""
    from unittest.mock import MagicMock

    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg

    from fedleak.config import parse_flat
    from fedleak.server.validate import check_resources

    with pytest.raises(
        ConfigError, match=r"^observation: expected an Observation .* got NoneType$"
    ):
        fedleak.knowledge(None)  # type: ignore[arg-type]
    out = tmp_path / "run"
    settings = {"out-dir": str(out), "num-server-rounds": 1}
    with pytest.raises(ConfigError, match=r"^grid: expected the Grid .* got object$"):
        fedleak.audit(object(), FedAvg(), settings)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^strategy: expected .* got int$"):
        fedleak.audit(MagicMock(spec=Grid), 5, settings)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^settings: expected a mapping .* got NoneType$"):
        fedleak.audit(MagicMock(spec=Grid), FedAvg(), None)  # type: ignore[arg-type]
    assert not out.exists()
    # What only fedleak's own clients apply: recorded as applied, ε included (audit EO3).
    for key, value in (
        ("defense.spec", "sign"),
        ("sim.fail-rate", 0.3),
        ("train.fraction-train", 0.5),
    ):
        with pytest.raises(ConfigError, match=rf"^{key}={value!r}: only fedleak's own clients"):
            fedleak.audit(MagicMock(spec=Grid), FedAvg(), {**settings, key: value})
    assert not out.exists()
    from fedleak.simulations.study import ForeignServer, _check_foreign_app

    _check_foreign_app(ForeignServer(FedAvg()), parse_flat({"defense.spec": " NONE "}))  # EP6
    with pytest.raises(ConfigError, match=r"^client-cpus='1': expected a finite number > 0$"):
        check_resources(parse_flat({}), 2, "1", 0.0)  # type: ignore[arg-type]
