"""Per-sample gradients from one batched backward (`fedleak.training.per_sample`) against
vmap over `grad`, a loop of single-sample gradients, and a float64 loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedleak.attacks.optimization.replay import ClientProtocol, Replay
from fedleak.models import ModelSpec, build_model
from fedleak.training.gradients import (
    per_sample_gradients,
    per_sample_gradients_with_loss,
    vmap_per_sample_gradients_with_loss,
)
from fedleak.training.per_sample import supported


def _data(n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters(), strict=True)
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, params))
    return {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(names)}


class Shared(nn.Module):
    """One linear layer applied twice (its per-sample gradients add up), plus a LayerNorm and an
    embedding of integer features: the other layers the layer-wise rules cover."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.linear = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x))
        return self.head(torch.tanh(self.linear(torch.tanh(self.linear(h)))).mean(dim=1))


class RawParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.linear = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.scale)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("lenet", (3, 16, 16)),
        ("convnet", (3, 8, 8)),
        ("resnet20-gn", (3, 8, 8)),
        ("mlp", (1, 6, 6)),
    ],
)
def test_layerwise_equals_vmap_with_hard_and_soft_labels(name, shape):
    model = build_model(ModelSpec(name, shape, 10, seed=1))
    assert supported(model)
    x, y = _data(5, shape)
    soft = torch.softmax(torch.randn(5, 10, generator=torch.Generator().manual_seed(2)), dim=1)
    for labels in (y, soft):
        ours, our_losses = per_sample_gradients_with_loss(model, x, labels)
        theirs, their_losses = vmap_per_sample_gradients_with_loss(model, x, labels)
        assert list(ours) == list(theirs)
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=2e-6, rtol=1e-4, msg=key)
        torch.testing.assert_close(our_losses, their_losses)


def test_replaced_parameters_are_the_ones_differentiated():
    model = build_model(ModelSpec("lenet", (3, 8, 8), 10, seed=0))
    other = build_model(ModelSpec("lenet", (3, 8, 8), 10, seed=5))
    x, y = _data(3, (3, 8, 8))
    params = {k: v.detach() for k, v in other.named_parameters()}
    ours = per_sample_gradients(model, x, y, params=params)
    expected = _loop(other, x, y)
    for key in ours:
        torch.testing.assert_close(ours[key], expected[key], atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_shared_layers_layer_norm_and_embeddings_and_the_vmap_fallback():
    model = Shared()
    assert supported(model)
    x = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3, 4])
    ours = per_sample_gradients(model, x, y)
    expected = _loop(model, x, y)
    for key in ours:
        torch.testing.assert_close(ours[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
    raw = RawParameter()
    assert not supported(raw)  # falls back to vmap, still correct
    xr = torch.rand(4, 3, generator=torch.Generator().manual_seed(1))
    for key, value in per_sample_gradients(raw, xr, y).items():
        torch.testing.assert_close(value, _loop(raw, xr, y)[key], atol=1e-6, rtol=1e-5)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert not supported(tied)


def test_layerwise_agrees_with_a_float64_loop_on_resnet20_gn():
    """ResNet-20-GN at ReLU kinks: the layer-wise gradients follow the forward pass the client
    computes, so they agree with a float64 loop to float32 round-off."""
    model = build_model(ModelSpec("resnet20-gn", (3, 16, 16), 10, seed=0)).train()
    x, y = _data(8, (3, 16, 16))
    ours = per_sample_gradients(model, x, y)
    wide = copy.deepcopy(model).double()
    reference = _loop(wide, x.double(), y)
    for key in ours:
        torch.testing.assert_close(ours[key].double(), reference[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "shape"), [("lenet", (3, 16, 16)), ("resnet20-gn", (3, 8, 8))])
@pytest.mark.parametrize("per_sample", [False, True])
def test_the_inversion_replay_differentiates_layerwise_as_through_vmap(name, shape, per_sample):
    """Stacked dummy problems (3 problems of 2 images, soft labels): the layer-wise replay's
    updates and their derivative with respect to the dummy inputs equal vmap's."""
    model = build_model(ModelSpec(name, shape, 10, seed=0))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, *shape, generator=g, requires_grad=True)
    y = torch.softmax(torch.randn(3, 2, 10, generator=g), dim=-1)
    layerwise = Replay(model, ClientProtocol("gradient"))
    vmapped = Replay(model, ClientProtocol("gradient"))
    assert layerwise.layerwise
    vmapped.layerwise = False
    ours, theirs = layerwise(x, y, per_sample), vmapped(x, y, per_sample)
    pairs = list(zip(ours.update, theirs.update, strict=True))
    if per_sample:
        pairs += list(zip(ours.per_sample, theirs.per_sample, strict=True))
    for a, b in pairs:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    directions = [torch.randn(u.shape, generator=g) for u in ours.update]

    def outer(updates: list[torch.Tensor]) -> torch.Tensor:
        pairs = zip(updates, directions, strict=True)
        return torch.autograd.grad(sum((u * d).sum() for u, d in pairs), x)[0]

    reference = outer(theirs.update)
    # vmap rounds a few ReLU inputs differently (see the float64 test): a relative tolerance.
    scale = float(reference.abs().max())
    torch.testing.assert_close(outer(ours.update), reference, atol=1e-4 * scale, rtol=0)
