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
from fedleak.training.chain import layer_chain
from fedleak.training.gradients import (
    per_sample_gradients,
    per_sample_gradients_with_loss,
    vmap_per_sample_gradients_with_loss,
)
from fedleak.training.loss import task_loss
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


class Pooled(nn.Module):
    """A plug-in's kind of image model that is no chain of plain layers (two poolings of one
    feature map concatenated): its per-sample gradients come from the layer-wise rules, where
    the built-in models take the chain's (audit DJ2: zeroed rules passed every test)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.positions = nn.Linear(4, 4)  # applied at every position: sums over them
        self.mix = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x))).flatten(2).transpose(1, 2)
        h = torch.tanh(self.positions(h))
        pooled = torch.cat([h.mean(dim=1), h.amax(dim=1)], dim=1)
        return self.head(torch.tanh(self.mix(pooled)))


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


def test_a_model_outside_the_chain_gets_layerwise_gradients_equal_to_a_loop():
    model = Pooled()
    assert supported(model) and layer_chain(model) is None
    x, y = _data(5, (3, 6, 6))
    ours, losses = per_sample_gradients_with_loss(model, x, y)
    expected = _loop(model, x, y)
    assert list(ours) == list(expected)
    for key in ours:
        torch.testing.assert_close(ours[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
    torch.testing.assert_close(losses, F.cross_entropy(model(x), y, reduction="none"))
    model.spare = nn.Linear(3, 3)  # a layer the forward pass never calls: zero gradients
    with_spare, _ = per_sample_gradients_with_loss(model, x, y)
    assert not with_spare["spare.weight"].any() and with_spare["spare.bias"].shape == (5, 3)
    for key in ours:
        torch.testing.assert_close(with_spare[key], ours[key], atol=0, rtol=0, msg=key)


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


@pytest.mark.parametrize(
    ("name", "shape"), [("lenet", (3, 16, 16)), ("resnet20-gn", (3, 8, 8)), ("pooled", (3, 6, 6))]
)
@pytest.mark.parametrize("per_sample", [False, True])
def test_the_inversion_replay_differentiates_layerwise_as_through_vmap(name, shape, per_sample):
    """Stacked dummy problems (3 problems of 2 images, soft labels): the layer-wise replay's
    updates and their derivative with respect to the dummy inputs equal vmap's (the built-in
    models replay through their chain, `Pooled` through the layer-wise rules)."""
    model = Pooled() if name == "pooled" else build_model(ModelSpec(name, shape, 10, seed=0))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, *shape, generator=g, requires_grad=True)
    y = torch.softmax(torch.randn(3, 2, 10, generator=g), dim=-1)
    layerwise = Replay(model, ClientProtocol("gradient"))
    vmapped = Replay(model, ClientProtocol("gradient"))
    assert layerwise.layerwise and (layerwise._chain is None) == (name == "pooled")
    vmapped.layerwise = False
    vmapped._chain = None
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


class Normed(nn.Module):
    """Affine LayerNorm and InstanceNorm, whose fused kernels vmap differentiates wrongly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.instance = nn.InstanceNorm2d(4, affine=True)
        self.layer = nn.LayerNorm([4, 6, 6])
        self.head = nn.Linear(144, 10)
        with torch.no_grad():
            for norm in (self.instance, self.layer):
                norm.weight.normal_(generator=torch.Generator().manual_seed(3))
                norm.bias.normal_(generator=torch.Generator().manual_seed(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.layer(torch.tanh(self.instance(self.conv(x)))))
        return self.head(h.flatten(1))


@pytest.mark.parametrize("case", ["transformer3", "normed-fedsgd", "normed-fedavg"])
def test_stacked_problems_differentiate_as_each_alone(case):
    """Problems stacked through vmap (a model no other path takes: token models, FedAvg)
    have the derivatives of each problem replayed alone through plain autograd; with the
    fused LayerNorm and InstanceNorm kernels they were off by up to 4e-2 of their scale."""
    g = torch.Generator().manual_seed(0)
    protocol = ClientProtocol("gradient")
    if case == "transformer3":
        model = build_model(ModelSpec("transformer3", (6,), 40, seed=0))
        width = model.token_embedding.shape[1]  # TAG replays embeddings of the tokens
        x = torch.randn(2, 2, 6, width, generator=g, requires_grad=True)
        y = torch.softmax(torch.randn(2, 2, 6, 40, generator=g), dim=-1)
    else:
        model = Normed()
        if case == "normed-fedavg":
            protocol = ClientProtocol("delta", local_steps=2, batch_size=1, learning_rate=0.1)
        x = torch.rand(2, 2, 3, 6, 6, generator=g, requires_grad=True)
        y = torch.softmax(torch.randn(2, 2, 10, generator=g), dim=-1)
    replay = Replay(model, protocol)
    assert not replay.layerwise or case == "normed-fedsgd"
    replay.layerwise = False  # the vmap path, which the fused kernels broke
    _assert_stacked_as_each_alone(replay, x, y, g)


class Positions(nn.Module):
    """A learned position table looked up at arange(L) and added to the inputs: that layer
    sees positions, not samples, along its first dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(4, 6)
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(x + self.pos(torch.arange(x.shape[1]))))
        return self.head(h.mean(dim=1))


class TinyLanguageModel(nn.Module):
    """A plug-in language model of plain layers on embeddings of a frozen table."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("token_embedding", torch.randn(32, 8, generator=_seeded(5)))
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if x.is_floating_point() else F.embedding(x, self.token_embedding)
        return self.out(torch.tanh(self.norm(self.hidden(h))))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_stacked_language_model_problems_replay_the_clients_shifted_loss():
    """Stacked dummy sequences (the layer-wise path) replay the causal loss over shifted
    positions, as the client computes it (audit DK2: an unshifted loss was 7.7x off)."""
    model = TinyLanguageModel()
    assert supported(model)
    tokens = torch.randint(0, 32, (2, 6), generator=_seeded(0))
    replay = Replay(model, ClientProtocol("gradient"))
    embedded = model.token_embedding[tokens].unsqueeze(1)  # [T=2, b=1, L, d]
    for targets in (tokens.unsqueeze(1), F.one_hot(tokens, 32).float().unsqueeze(1)):
        stacked = replay(embedded, targets).update
        for t in range(2):
            sequence = tokens[t : t + 1]
            loss = task_loss(model(sequence), sequence)
            client = torch.autograd.grad(loss, list(model.parameters()))
            for ours, theirs in zip(stacked, client, strict=True):
                torch.testing.assert_close(ours[t], theirs, atol=1e-6, rtol=1e-5)


class TrackedInstanceNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.head = nn.Linear(4 * 36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


def test_an_instance_norm_tracking_statistics_replays_stacked_problems():
    """Stacked problems through vmap normalise each sample with its own statistics and
    leave the running ones alone (audit DK4: vmap refused their in-place update)."""
    model = TrackedInstanceNorm()
    before = {name: b.clone() for name, b in model.named_buffers()}
    x, y = _data(2, (3, 6, 6))
    replay = Replay(model, ClientProtocol("gradient"))
    stacked = replay(x.unsqueeze(1), y.unsqueeze(1)).update
    for t in range(2):
        expected = _loop(model, x[t : t + 1], y[t : t + 1])
        for name, update in zip(replay.names, stacked, strict=True):
            torch.testing.assert_close(update[t], expected[name][0], atol=1e-6, rtol=1e-5)
    for name, buffer in replay.model.named_buffers():
        assert torch.equal(buffer, before[name]), name


class DirectWeights(nn.Module):
    """Parameters used outside their layers' calls: a position table read as a tensor and a
    linear layer's weight used again, tied, as a second map."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(8, 6)
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(x + self.pos.weight[: x.shape[1]]))
        h = torch.tanh(F.linear(h, self.hidden.weight))
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize(
    ("case", "batch", "shape"),
    [
        ("positions", 2, (4, 6)),
        ("positions", 4, (4, 6)),  # as many samples as positions
        ("one-position", 3, (1, 6)),
        ("direct-weights", 3, (5, 6)),
    ],
)
def test_parameters_the_layer_rules_cannot_see_take_vmap(case, batch, shape):
    """Per-sample gradients equal a loop's on the client and in the replay where the
    layer-wise rules do not apply: a position table's input split as if it were the batch
    (audit DK1; at one position too, which is why the probe feeds one and two samples), a
    weight read directly or tied (DL1: zeros, or the tied use missing)."""
    model = DirectWeights() if case == "direct-weights" else Positions()
    if case == "one-position":
        model.pos = nn.Embedding(1, 6)
    assert supported(model)
    x, y = _data(batch, shape)
    ours, _ = per_sample_gradients_with_loss(model, x, y)
    expected = _loop(model, x, y)
    for key in ours:
        torch.testing.assert_close(ours[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
    replay = Replay(model, ClientProtocol("gradient"))
    stacked = replay(x.unsqueeze(1), y.unsqueeze(1)).update
    for name, update in zip(replay.names, stacked, strict=True):
        torch.testing.assert_close(update, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_probe_leaves_the_models_modes_as_they_were():
    model = Pooled().train()
    model.mix.eval()  # a frozen part of a training model
    modes = {name: m.training for name, m in model.named_modules()}
    per_sample_gradients_with_loss(model, *_data(2, (3, 6, 6)))
    assert {name: m.training for name, m in model.named_modules()} == modes


class Float32LayerNorm(nn.LayerNorm):
    """A plug-in's LayerNorm subclass with a forward of its own around the parent's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class FunctionalNorms(nn.Module):
    """A plug-in's layers that call the fused kernels with their weights themselves."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(4, generator=g))
        self.shift = nn.Parameter(torch.randn(4, generator=g))
        self.gain = nn.Parameter(torch.randn(4, 6, 6, generator=g))
        self.head = nn.Linear(144, 10)

        self.torch_spelling = False  # torch.layer_norm / torch.instance_norm, the same calls
        self.normed = True  # False: the norms wait for a later forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.normed and self.torch_spelling:
            h = torch.instance_norm(h, self.scale, self.shift, None, None, True, 0.1, 1e-5, False)
            h = torch.layer_norm(torch.tanh(h), (4, 6, 6), self.gain, None, 1e-5, False)
        elif self.normed:
            h = torch.tanh(F.instance_norm(h, weight=self.scale, bias=self.shift))
            h = F.layer_norm(h, (4, 6, 6), self.gain)
        return self.head(torch.tanh(h).flatten(1))


class BatchStatistics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4, affine=False)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.conv(x))).amax(dim=(2, 3)))


@pytest.mark.parametrize(
    "case",
    [
        "layer-norm-subclass",
        "functional-norms",
        "functional-norms-spelt-torch",
        "functional-norms-later",
        "batchnorm-without-parameters",
    ],
)
def test_more_models_stack_problems_as_each_alone(case):
    """A LayerNorm subclass and the functional kernels called with weights are split inside
    vmap too (audit DL2; the functional calls' derivatives were off by 7% of their scale); a
    BatchNorm without parameters keeps each problem's batch statistics apart (DL3: the
    layer-wise path pooled every problem's samples in one forward)."""
    g = torch.Generator().manual_seed(0)
    if case.startswith("functional-norms"):
        model, protocol = FunctionalNorms(), ClientProtocol("gradient")
        model.torch_spelling = case == "functional-norms-spelt-torch"
        x = torch.rand(2, 2, 3, 6, 6, generator=g, requires_grad=True)
    elif case == "layer-norm-subclass":
        model = nn.Sequential(nn.Linear(12, 8), Float32LayerNorm(8), nn.Tanh(), nn.Linear(8, 10))
        with torch.no_grad():
            model[1].weight.normal_(generator=g)
        protocol = ClientProtocol("delta", local_steps=2, batch_size=1, learning_rate=0.1)
        x = torch.rand(2, 2, 12, generator=g, requires_grad=True)
    else:
        model, protocol = BatchStatistics(), ClientProtocol("gradient")
        x = torch.rand(2, 2, 3, 6, 6, generator=g, requires_grad=True)
    y = torch.softmax(torch.randn(2, 2, 10, generator=g), dim=-1)
    replay = Replay(model, protocol)
    if case == "functional-norms-later":  # a first call without them (audit DP4)
        replay.model.normed = False
        _assert_stacked_as_each_alone(replay, x, y, g)
        replay.model.normed = True
    _assert_stacked_as_each_alone(replay, x, y, g)
    if case != "batchnorm-without-parameters":
        # The functional split costs a mode around every call: kept only where it splits.
        assert replay._split.functional == case.startswith("functional-norms")


def _assert_stacked_as_each_alone(
    replay: Replay, x: torch.Tensor, y: torch.Tensor, g: torch.Generator
) -> None:
    """The stacked problems' updates, and their derivative along random directions with
    respect to the dummy inputs `x`, equal those of each problem replayed alone."""
    stacked = replay(x, y).update
    each = [replay(x[i : i + 1], y[i : i + 1]).update for i in range(x.shape[0])]
    alone = [torch.cat(parts) for parts in zip(*each, strict=True)]
    for a, b in zip(stacked, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    directions = [torch.randn(u.shape, generator=g) for u in stacked]

    def outer(updates: list[torch.Tensor]) -> torch.Tensor:
        total = sum((u * d).sum() for u, d in zip(updates, directions, strict=True))
        return torch.autograd.grad(total, x, retain_graph=True)[0]

    reference = outer(alone)
    scale = float(reference.abs().max())
    torch.testing.assert_close(outer(stacked), reference, atol=1e-5 * scale, rtol=0)
