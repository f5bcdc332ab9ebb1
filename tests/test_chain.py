"""The written-out layer chain: the client's gradient and its derivative against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedleak.attacks.optimization.replay import ClientProtocol, Replay, ReplayError
from fedleak.models import ModelSpec, build_model
from fedleak.training.chain import chain_update, layer_chain


class _Mixed(nn.Module):
    """Every supported link once: a bias-free strided convolution, tanh and ReLU as modules
    and as functions, flatten as a module, a sigmoid between two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 4, 3, padding=1)
        self.second = nn.Conv2d(4, 4, 3, stride=2, bias=False, dilation=1)
        self.flat = nn.Flatten()
        self.hidden = nn.Linear(4 * 6 * 6, 16)
        self.out = nn.Linear(16, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.first(x))
        x = F.relu(self.second(x))
        return self.out(torch.sigmoid(self.hidden(self.flat(x))))


def _pooled() -> nn.Module:
    """Every pooling link: max pooling (padded, ceil mode), average pooling without the
    padding in its count, global average pooling."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sigmoid(),
        nn.AvgPool2d(2, padding=1, count_include_pad=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


class _Blocks(nn.Module):
    """Every link of a residual network: GroupNorm with and without affine parameters (also
    on the model's input), residual sums (of layers' outputs and of the input's padding),
    one output read by three layers, `nn.Identity`, strided subsampling, channel padding,
    a strided 1x1 projection."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.GroupNorm(1, 2)
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.plain = nn.GroupNorm(4, 4, affine=False)
        self.keep = nn.Identity()
        self.project = nn.Conv2d(4, 6, 1, stride=2, bias=False)
        self.flat = nn.Flatten()
        self.head = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.first(x)) + F.pad(x, (0, 0, 0, 0, 0, 2))
        h = torch.tanh(self.norm(h))
        r = F.relu(self.plain(self.conv(h)) + self.keep(h))
        s = h + r
        out = self.project(s) + F.pad(s[:, :, ::2, ::2], (0, 0, 0, 0, 0, 2))
        return self.head(self.flat(torch.sigmoid(out)))


def _scattered_norms(model: nn.Module) -> nn.Module:
    """The model with its GroupNorm scales and shifts drawn away from 1 and 0 (a misplaced
    scale would otherwise go unseen)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm) and module.affine:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return model


def _models() -> list[tuple[str, nn.Module, tuple[int, ...], int]]:
    torch.manual_seed(0)
    resnet = build_model(ModelSpec("resnet20-gn", (3, 8, 8), 10, seed=0))
    return [
        ("lenet", build_model(ModelSpec("lenet", (3, 16, 16), 10, seed=0)), (3, 16, 16), 10),
        ("mlp", build_model(ModelSpec("mlp", (1, 6, 6), 10, seed=0)), (1, 6, 6), 10),
        ("convnet", build_model(ModelSpec("convnet", (3, 8, 8), 10, seed=0)), (3, 8, 8), 10),
        ("mixed", _Mixed(), (1, 14, 14), 5),
        ("pooled", _pooled(), (2, 11, 11), 3),
        ("blocks", _scattered_norms(_Blocks()), (2, 6, 6), 3),
        ("resnet20-gn", _scattered_norms(resnet), (3, 8, 8), 10),
    ]


def _labels(kind: str, count: int, classes: int, generator: torch.Generator) -> torch.Tensor:
    """Class indices, or soft labels (a softmax of free logits, as DLG optimises them, or
    unnormalised weights, which torch's cross-entropy also takes)."""
    if kind == "hard":
        return torch.randint(0, classes, (count,), generator=generator)
    free = torch.randn(count, classes, dtype=torch.float64, generator=generator)
    soft = torch.softmax(free, dim=1) if kind == "soft" else 2 * free.sigmoid()
    return soft.requires_grad_()


@pytest.mark.parametrize("labels", ["hard", "soft", "unnormalised"])
@pytest.mark.parametrize("problems, samples", [(1, 1), (1, 3), (3, 1), (3, 2)])
def test_the_chain_gives_autograds_gradient_and_derivative(problems, samples, labels):
    """In float64, for every model and stack: each problem's mean cross-entropy gradient,
    and the derivative of a random linear function of it with respect to the inputs (and to
    soft labels), agree with autograd's double backward to rounding."""
    for name, model, shape, classes in _models():
        model = model.double()
        chain = layer_chain(model)
        assert chain is not None, name
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(problems * samples, *shape, dtype=torch.float64, generator=generator)
        x.requires_grad_()
        y = _labels(labels, problems * samples, classes, generator)
        params = list(model.parameters())
        per_problem = []
        for t in range(problems):
            rows = slice(t * samples, (t + 1) * samples)
            loss = F.cross_entropy(model(x[rows]), y[rows])
            per_problem.append(torch.autograd.grad(loss, params, create_graph=True))
        expected = [torch.stack([g[i] for g in per_problem]) for i in range(len(params))]
        got = chain_update(chain, x, y, problems)
        for e, g in zip(expected, got, strict=True):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        weights = [torch.randn(e.shape, dtype=torch.float64, generator=generator) for e in expected]
        inputs = (x, y) if y.requires_grad else (x,)
        wanted = torch.autograd.grad(
            sum((e * w).sum() for e, w in zip(expected, weights, strict=True)), inputs
        )
        had = torch.autograd.grad(
            sum((g * w).sum() for g, w in zip(got, weights, strict=True)), inputs
        )
        for have, want in zip(had, wanted, strict=True):
            scale = want.abs().max().item()
            torch.testing.assert_close(have, want, rtol=1e-9, atol=1e-12 * scale)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(torch.sigmoid(self.a(x)))


class _Shifted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 1.0


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.add(x, self.a(x), alpha=2.0))


def test_models_the_chain_does_not_cover_are_refused():
    """BatchNorm, grouped convolutions, an activation without a rule, dropout, a layer used
    twice, a constant added, a scaled sum, a dead branch and a computation torch.fx cannot
    trace all fall back to autograd (None)."""

    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if x.sum() > 0 else -self.a(x)

    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.b(x)
            return self.a(x)

    refused = [
        _Tied(),
        _Shifted(),
        _Scaled(),
        Branching(),
        Dead(),
        nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)),
        nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(), nn.Linear(4, 2)),
        nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)),
        build_model(ModelSpec("convnet-bn", (3, 8, 8), 10, seed=0)),
        build_model(ModelSpec("resnet20", (3, 8, 8), 10, seed=0)),
    ]
    for model in refused:
        assert layer_chain(model) is None, model


def test_torchvisions_resnet_with_groupnorm_goes_through_the_chain():
    """A user's model as written elsewhere: torchvision's ResNet-18 with GroupNorm (max
    pooling, in-place ReLU modules, `out += identity`, projection shortcuts in a Sequential)
    is a chain, and its gradient and derivative for two stacked problems equal autograd's in
    float64."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(
        num_classes=4, norm_layer=lambda channels: nn.GroupNorm(4, channels)
    )
    model = _scattered_norms(model).double()
    chain = layer_chain(model)
    assert chain is not None
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=generator).requires_grad_()
    y = torch.tensor([1, 3])
    params = list(model.parameters())
    losses = [F.cross_entropy(model(x[t : t + 1]), y[t : t + 1]) for t in range(2)]
    per_problem = [torch.autograd.grad(loss, params, create_graph=True) for loss in losses]
    expected = [torch.stack([g[i] for g in per_problem]) for i in range(len(params))]
    got = chain_update(chain, x, y, 2)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    weights = [torch.randn(e.shape, dtype=torch.float64, generator=generator) for e in expected]
    (want,) = torch.autograd.grad(
        sum((e * w).sum() for e, w in zip(expected, weights, strict=True)), x
    )
    (have,) = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights, strict=True)), x)
    torch.testing.assert_close(have, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


def test_the_chains_forward_pass_computes_the_modules_bits():
    """In float32 the chain's forward pass of ResNet-20-GN and the mixed-link model gives
    the module's logits bit for bit (GroupNorm's output from torch's own kernel), so that a
    ReLU input a rounding away from zero falls on the same side as for the client."""
    for name in ("blocks", "resnet20-gn"):
        _, model, shape, classes = next(m for m in _models() if m[0] == name)
        chain = layer_chain(model)
        assert chain is not None
        generator = torch.Generator().manual_seed(4)
        x = torch.randn(8, *shape, generator=generator)
        y = torch.randint(0, classes, (8,), generator=generator)
        with torch.no_grad():
            _, run = chain.gradient(x, y, 8)
            assert torch.equal(run.logits, model(x)), name


@pytest.mark.parametrize("labels", ["hard", "soft"])
@pytest.mark.parametrize("problems", [1, 4])
def test_the_replay_takes_the_chain_and_matches_its_autograd_path(problems, labels):
    """Replay of sigmoid LeNet (FedSGD) runs through the chain, single and stacked, with class
    indices and with soft labels optimised jointly (DLG's softmax of free label logits), with
    the same update and derivatives (inputs, label logits) as its autograd paths (float32)."""
    model = build_model(ModelSpec("lenet", (3, 16, 16), 10, seed=0))
    fast = Replay(model, ClientProtocol("gradient"))
    slow = Replay(model, ClientProtocol("gradient"))
    assert fast._chain is not None
    slow._chain = None
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(problems, 2, 3, 16, 16, generator=generator).requires_grad_()
    free = torch.randn(problems, 2, 10, generator=generator).requires_grad_()
    inputs = (x, free) if labels == "soft" else (x,)
    outputs = []
    for replay in (fast, slow):
        y = torch.softmax(free, dim=-1) if labels == "soft" else free.argmax(-1)
        out = replay(x, y)
        derivatives = torch.autograd.grad(sum(u.square().sum() for u in out.update), inputs)
        outputs.append((out, derivatives))
    (fast, fast_derivatives), (slow, slow_derivatives) = outputs
    # The chain hands its rows over as they are; the autograd path its parameters.
    assert fast.flat is not None and "Chain" in type(fast.flat.grad_fn).__name__
    assert slow.flat is None and slow.parts is not None
    assert not _reaches_chain(slow.update[0])
    for a, b in zip([*fast.update, fast.rows], [*slow.update, slow.rows], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(fast_derivatives, slow_derivatives, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9 * max(1.0, b.abs().max().item()))


def _reaches_chain(t: torch.Tensor) -> bool:
    """Whether `t` was computed from the chain's autograd function (a few views away)."""
    nodes, seen = [t.grad_fn], 0
    while nodes and seen < 50:
        node = nodes.pop()
        seen += 1
        if node is None:
            continue
        if "Chain" in type(node).__name__:
            return True
        nodes.extend(n for n, _ in node.next_functions)
    return False


def test_the_replay_takes_the_chain_for_per_sample_dummy_gradients():
    """Per-sample dummy gradients (tanh-cosine's input) of stacked LeNet problems come from
    the chain, every sample a problem: the same per-sample gradients, update and derivative
    of a loss of the per-sample gradients as the layer-wise autograd path (float32)."""
    model = build_model(ModelSpec("lenet", (3, 16, 16), 10, seed=0))
    fast = Replay(model, ClientProtocol("gradient"))
    slow = Replay(model, ClientProtocol("gradient"))
    slow._chain = None
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(3, 4, 3, 16, 16, generator=generator).requires_grad_()
    y = torch.randint(0, 10, (3, 4), generator=generator)
    outputs = []
    for replay in (fast, slow):
        out = replay(x, y, per_sample=True)
        assert out.per_sample is not None and out.per_sample[0].shape[:2] == (3, 4)
        loss = sum(torch.tanh(10 * g).sum() for g in out.per_sample)
        (derivative,) = torch.autograd.grad(loss, x)
        outputs.append((out, derivative))
    (fast_out, fast_derivative), (slow_out, slow_derivative) = outputs
    assert _reaches_chain(fast_out.per_sample[0]) and not _reaches_chain(slow_out.per_sample[0])
    fast_all, slow_all = (
        fast_out.per_sample + fast_out.update,
        slow_out.per_sample + slow_out.update,
    )
    for a, b in zip(fast_all, slow_all, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    scale = slow_derivative.abs().max().item()
    torch.testing.assert_close(fast_derivative, slow_derivative, rtol=1e-4, atol=1e-5 * scale)


def _with_batchnorm(name: str) -> nn.Module:
    """A BatchNorm model in float64 with scales, shifts and running statistics drawn away
    from their initial values."""
    if name == "mlp-bn":
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 8 * 8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10)
        )
    else:
        model = build_model(ModelSpec(name, (3, 8, 8), 10, seed=0))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(1 + 0.3 * torch.randn(shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(shape, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_var.copy_(1 + 0.5 * torch.rand(shape, generator=generator))
    return model.double()


@pytest.mark.parametrize("mode", ["infer", "proxy"])
@pytest.mark.parametrize("name", ["convnet-bn", "resnet20", "mlp-bn"])
def test_batchnorm_replays_through_the_chain_as_through_autograd(name, mode):
    """BatchNorm replayed as the client's training step (each problem's own statistics, or
    the running ones) goes through the chain: for 1 and 3 problems of 1 and 2 samples, the
    updates, each layer's input statistics (the BatchNorm prior's input) and the derivative
    of a random linear function of both with respect to the inputs equal the autograd path's
    in float64; per-sample dummy gradients stay refused."""
    model = _with_batchnorm(name)
    fast = Replay(model, ClientProtocol("gradient"), mode)
    slow = Replay(model, ClientProtocol("gradient"), mode)
    assert fast._chain is not None
    slow._chain = None
    for problems, samples in [(1, 1), (1, 2), (3, 1), (3, 2)]:
        generator = torch.Generator().manual_seed(10 * problems + samples)
        x = torch.randn(problems, samples, 3, 8, 8, dtype=torch.float64, generator=generator)
        x.requires_grad_()
        y = torch.randint(0, 10, (problems, samples), generator=generator)
        results = []
        for replay in (fast, slow):
            out = replay(x, y)
            outputs = out.update + [t for pair in out.statistics for t in pair]
            weights = torch.Generator().manual_seed(7)
            loss = sum(
                (t * torch.randn(t.shape, dtype=torch.float64, generator=weights)).sum()
                for t in outputs
            )
            results.append((outputs, torch.autograd.grad(loss, x)[0]))
        (got, got_x), (want, want_x) = results
        norms = sum(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())
        assert len(got) == len(want) == len(list(model.parameters())) + 2 * norms
        for have, expected in zip(got, want, strict=True):
            torch.testing.assert_close(have, expected, rtol=1e-9, atol=1e-12)
        scale = want_x.abs().max().item()
        torch.testing.assert_close(got_x, want_x, rtol=1e-9, atol=1e-11 * scale)
    with pytest.raises(ReplayError, match="per-sample"):
        fast(x, y, per_sample=True)
