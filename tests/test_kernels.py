"""The CPU convolution kernels an inversion problem runs on (`attacks/optimization/kernels.py`).

Small single-sample problems run on torch's native kernels, everything else keeps oneDNN;
the choice follows the model's shapes and the stack only, the process-wide switch is restored
after every problem, and both kernels reconstruct the same images to float32 round-off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedleak.api import observe
from fedleak.attacks.optimization import attacks as optimisation_attacks
from fedleak.attacks.optimization import kernels
from fedleak.attacks.optimization.kernels import (
    cpu_convolutions,
    largest_convolution,
    native_pays,
)
from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.defenses import parse_defense_spec
from fedleak.models import ModelSpec, build_model
from fedleak.training.update import LocalTraining, compute_update

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _model(name: str, shape: tuple[int, ...]) -> nn.Module:
    return build_model(ModelSpec(name, shape, 10, seed=0))


def test_largest_convolution_counts_multiply_adds_from_the_layer_shapes():
    # LeNet's layers on 3x32x32: 12 maps of 16x16 from 3x5x5, then 12 of 8x8 from 12x5x5 (twice).
    assert largest_convolution(_model("lenet", (3, 32, 32)), (3, 32, 32)) == max(
        12 * 16 * 16 * 3 * 25, 12 * 8 * 8 * 12 * 25
    )
    # ResNet-20's widest full-resolution layer: 16 maps of 32x32 from 16x3x3.
    assert largest_convolution(_model("resnet20-gn", (3, 32, 32)), (3, 32, 32)) == 16 * 1024 * 144
    assert largest_convolution(_model("mlp", (1, 28, 28)), (1, 28, 28)) == 0
    # Transposed, two groups: each of the 4x5x5 input values reaches its group's one output
    # channel through 3x3 taps.
    up = nn.Sequential(nn.ConvTranspose2d(4, 2, 3, stride=2, groups=2))
    assert largest_convolution(up, (4, 5, 5)) == 4 * 25 * 1 * 9


def test_largest_convolution_leaves_the_model_untouched_and_refuses_non_image_inputs():
    model = _model("lenet", (1, 28, 28))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    largest_convolution(model, (1, 28, 28))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
    # Token ids are not float images: no count, so torch keeps its own choice.
    tokens = nn.Sequential(nn.Embedding(50, 8), nn.Conv1d(4, 4, 3))
    assert largest_convolution(tokens, (4,)) == 0


@pytest.mark.parametrize(
    ("name", "shape", "samples", "native"),
    [
        ("lenet", (3, 32, 32), 1, True),  # measured 1.4x faster on native kernels
        ("lenet", (1, 28, 28), 2, True),
        ("lenet", (3, 32, 32), 4, False),  # break-even
        ("lenet", (3, 32, 32), 16, False),  # a round's stack: oneDNN 1.3x faster
        ("resnet20-gn", (3, 32, 32), 1, False),  # oneDNN 1.4x faster
        ("mlp", (3, 32, 32), 1, False),  # no convolution: nothing to switch
    ],
)
def test_native_kernels_only_for_small_stacks_of_small_convolutions(name, shape, samples, native):
    assert native_pays(_model(name, shape), shape, samples, CPU) is native


def test_other_devices_keep_their_kernels():
    # The device is checked before any forward pass, so no CUDA is needed for this.
    assert not native_pays(_model("lenet", (1, 28, 28)), (1, 28, 28), 1, torch.device("cuda"))


def test_the_switch_is_restored_after_the_block_even_on_error():
    assert torch.backends.mkldnn.enabled
    with cpu_convolutions(False):
        assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError), cpu_convolutions(True):
        assert not torch.backends.mkldnn.enabled
        raise RuntimeError("boom")
    assert torch.backends.mkldnn.enabled


def _observation(spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, client: int) -> Observation:
    """Client `client`'s FedSGD update on (x, y) at the spec's weights, as the server sees it."""
    model = build_model(spec)
    update = compute_update(
        model,
        x,
        y,
        10,
        parse_defense_spec("none"),
        LocalTraining("fedsgd", x.shape[0]),
        torch.Generator().manual_seed(client),
    )
    return observe(
        model,
        update.update,
        input_shape=spec.input_shape,
        num_examples=x.shape[0],
        num_classes=10,
        client_id=client,
    )


@pytest.fixture
def lenet_case():
    spec = ModelSpec("lenet", (3, 32, 32), 10, init="uniform", seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 3, 32, 32, generator=g), torch.tensor([3])
    knowledge = AttackerKnowledge(torch.empty(0, 3, 32, 32), torch.empty(0).long(), (3, 32, 32), 10)
    return spec, _observation(spec, x, y, 0), knowledge


def test_a_single_lenet_target_is_optimised_on_native_kernels_and_a_round_on_onednn(
    lenet_case, monkeypatch
):
    spec, observation, knowledge = lenet_case
    seen: list[bool] = []
    original = optimisation_attacks.optimise

    def watching(*args, **kwargs):
        seen.append(torch.backends.mkldnn.enabled)
        return original(*args, **kwargs)

    monkeypatch.setattr(optimisation_attacks, "optimise", watching)
    attack = build_attack("ig", {}, seed=0)
    assert attack.reconstruct(observation, knowledge, Budget(2, 600.0)).status == "ok"
    g = torch.Generator().manual_seed(1)
    round_ = [
        _observation(spec, torch.rand(1, 3, 32, 32, generator=g), torch.tensor([c]), c)
        for c in range(8)
    ]
    done = attack.reconstruct_batch(round_, knowledge, Budget(2, 600.0))
    assert all(r.status == "ok" for r in done)
    assert seen == [False, True]
    assert torch.backends.mkldnn.enabled


def test_native_and_onednn_kernels_reconstruct_alike(lenet_case, monkeypatch):
    _, observation, knowledge = lenet_case
    runs = []
    for bound in (0, kernels.NATIVE_BELOW):  # oneDNN, then the native kernels
        monkeypatch.setattr(kernels, "NATIVE_BELOW", bound)
        attack = build_attack("ig", {}, seed=0)
        runs.append(attack.reconstruct(observation, knowledge, Budget(8, 600.0)))
    onednn, native = runs
    torch.testing.assert_close(native.inputs, onednn.inputs, atol=1e-4, rtol=0)
    assert native.diagnostics["matching_loss"] == pytest.approx(
        onednn.diagnostics["matching_loss"], rel=1e-3
    )


class _Attention(nn.Module):
    """Rows of a 1x8x8 image attend to each other through torch's fused attention kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attend = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.embed(x.flatten(1, 2))
        mixed, _ = self.attend(rows, rows, rows, need_weights=False)
        return self.head(mixed.mean(1))


@pytest.mark.parametrize("name", ["dlg", "ig"])
def test_gradient_matching_differentiates_through_attention(name):
    """torch's fused attention has no second derivative: every optimisation attack on a model
    with nn.MultiheadAttention failed ("derivative for ..._flash_attention_for_cpu_backward is
    not implemented", audit AQ6). The attacks match its gradient, and the switch is undone."""
    torch.manual_seed(0)
    model = _Attention()
    x, y = torch.rand(1, 1, 8, 8), torch.tensor([2])
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.parameters())
    observation = observe(model, grads, input_shape=(1, 8, 8), num_examples=1)
    knowledge = AttackerKnowledge(torch.empty(0, 1, 8, 8), torch.empty(0).long(), (1, 8, 8), 4)
    attack = build_attack(name, {"restarts": 1})
    first, last = (
        attack.reconstruct(observation, knowledge, Budget(iterations, 600.0))
        for iterations in (1, 200)
    )
    assert first.status == last.status == "ok"
    assert last.diagnostics["matching_loss"] < 0.01 * first.diagnostics["matching_loss"]
    assert (
        torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    )
