"""Client gradients (per-sample, batch, BatchNorm statistics) and the update computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedleak.training.gradients
from fedleak.defenses import DPSGD, MixUp, parse_defense_spec
from fedleak.models import ModelSpec, build_model
from fedleak.training.gradients import (
    PerSampleRefused,
    batch_gradient,
    batchnorm_statistics,
    per_sample_gradients,
    per_sample_gradients_with_loss,
    vmap_per_sample_gradients_with_loss,
)
from fedleak.training.update import (
    ClientUpdate,
    LocalTraining,
    LocalTrainingError,
    compute_update,
)

NO_DEFENSE = parse_defense_spec("none")


def _model(name: str, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    return build_model(ModelSpec(name, shape, 10, seed=seed))


def _data(n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The textbook gradient: forward, mean cross-entropy, backward."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


def _assert_close(a: dict, b: dict, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=name)


# --- per-sample gradients ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "batch"),
    [
        ("lenet", (3, 16, 16), 6),
        ("convnet", (3, 8, 8), 5),
        ("resnet20-gn", (3, 8, 8), 3),
        ("mlp", (1, 6, 6), 7),
        pytest.param("resnet18-gn", (3, 4, 4), 2, marks=pytest.mark.slow),
    ],
)
def test_per_sample_gradients_equal_a_loop_of_single_sample_gradients(
    name: str, shape: tuple[int, ...], batch: int
) -> None:
    model = _model(name, shape)
    x, y = _data(batch, shape)
    per_sample = per_sample_gradients(model, x, y)
    assert list(per_sample) == [n for n, _ in model.named_parameters()]
    for i in range(batch):
        single = _autograd(model, x[i : i + 1], y[i : i + 1])
        for param, g in single.items():
            assert per_sample[param].shape == (batch, *g.shape)
            torch.testing.assert_close(per_sample[param][i], g, atol=1e-5, rtol=0)


def test_a_chain_models_per_sample_gradients_are_written_out_at_the_given_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sigmoid LeNet's per-sample gradients and losses come from `fedleak.training.chain`
    (the layer-wise path is not reached), at the weights passed in `params` (local training's
    current weights), not the module's."""
    model = _model("lenet", (3, 8, 8))
    x, y = _data(5, (3, 8, 8))
    moved = {
        n: p.detach() + 0.05 * torch.randn(p.shape, generator=_gen(3))
        for n, p in model.named_parameters()
    }

    def unreachable(*args: object, **kwargs: object) -> None:
        raise AssertionError("the layer-wise path ran")

    monkeypatch.setattr(fedleak.training.gradients, "layerwise_gradients", unreachable)
    grads, losses = per_sample_gradients_with_loss(model, x, y, params=moved)
    other = _model("lenet", (3, 8, 8))
    other.load_state_dict(moved)
    torch.testing.assert_close(losses, F.cross_entropy(other(x), y, reduction="none"))
    for i in range(5):
        single = _autograd(other, x[i : i + 1], y[i : i + 1])
        _assert_close({k: v[i] for k, v in grads.items()}, single, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "name, shape, atol", [("lenet", (3, 8, 8), 1e-6), ("resnet20-gn", (3, 8, 8), 1e-4)]
)
def test_per_sample_gradients_take_soft_labels(
    name: str, shape: tuple[int, ...], atol: float
) -> None:
    """Soft labels (an encoding's mixed labels), normalised or not, through the chain
    (LeNet) and the layer-wise path (ResNet-20-GN, float32 rounding through its depth):
    each sample's gradient and loss equal autograd's on that sample alone."""
    model = _model(name, shape)
    x, y = _data(4, shape)
    onehot = F.one_hot(y, 10).float()
    _assert_close(per_sample_gradients(model, x, onehot), per_sample_gradients(model, x, y))
    soft = torch.softmax(torch.randn(4, 10, generator=_gen(1)), dim=1)
    unnormalised = 2 * torch.rand(4, 10, generator=_gen(2))  # the loss takes any weights
    for labels in (soft, unnormalised):
        per_sample, losses = per_sample_gradients_with_loss(model, x, labels)
        expected = F.cross_entropy(model(x), labels, reduction="none")
        torch.testing.assert_close(losses, expected, atol=1e-6, rtol=1e-5)
        for i in range(4):
            single = _autograd(model, x[i : i + 1], labels[i : i + 1])
            _assert_close({k: v[i] for k, v in per_sample.items()}, single, atol=atol)


def test_per_sample_gradients_refuse_bad_labels() -> None:
    model = _model("mlp", (1, 4, 4))
    x, _ = _data(3, (1, 4, 4))
    with pytest.raises(ValueError, match="expected int64"):
        per_sample_gradients(model, x, torch.zeros(3, 10, 2))


@pytest.mark.parametrize(
    ("name", "variant"), [("resnet20", "resnet20-gn"), ("convnet-bn", "convnet")]
)
def test_batchnorm_models_refuse_per_sample_and_keep_exact_batch_gradients(
    name: str, variant: str
) -> None:
    model = _model(name, (3, 8, 8))
    x, y = _data(4, (3, 8, 8))
    with pytest.raises(PerSampleRefused, match=f"{name} -> {variant}") as caught:
        per_sample_gradients(model, x, y)
    assert "\n" not in str(caught.value) and "BatchNorm" in str(caught.value)
    model.eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    gradient = batch_gradient(model, x, y)
    assert not model.training  # the caller's mode comes back
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())
    reference = copy.deepcopy(model).train()
    _assert_close(gradient, _autograd(reference, x, y))


def test_batchnorm_statistics_are_the_batch_moments_of_each_bn_input() -> None:
    model = _model("convnet-bn", (3, 8, 8))
    x, _ = _data(5, (3, 8, 8))
    stats = batchnorm_statistics(model, x)
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert list(stats) == [f"{n}.{s}" for n in bn_names for s in ("mean", "var")]
    first_input = model.features[0](x).detach()
    torch.testing.assert_close(stats[f"{bn_names[0]}.mean"], first_input.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(
        stats[f"{bn_names[0]}.var"], first_input.var(dim=(0, 2, 3), unbiased=False)
    )
    assert batchnorm_statistics(_model("lenet", (3, 8, 8)), x) == {}


# --- the update --------------------------------------------------------------------------------


def test_fedsgd_update_without_defense_is_the_mean_gradient() -> None:
    model = _model("lenet", (3, 16, 16))
    x, y = _data(4, (3, 16, 16))
    result = compute_update(model, x, y, 10, NO_DEFENSE, LocalTraining("fedsgd", 4), _gen())
    assert isinstance(result, ClientUpdate)
    _assert_close(result.update, _autograd(model, x, y))
    assert result.per_sample is None and result.encoded is None and result.bn_statistics is None
    assert result.num_examples == 4
    assert result.loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


def test_per_sample_share_keeps_the_batch_update_as_their_mean() -> None:
    model = _model("lenet", (3, 16, 16))
    x, y = _data(6, (3, 16, 16))
    training = LocalTraining("fedsgd", 6, share="per-sample")
    result = compute_update(model, x, y, 10, NO_DEFENSE, training, _gen())
    assert result.per_sample is not None
    _assert_close({k: v.mean(0) for k, v in result.per_sample.items()}, result.update)
    batch_only = compute_update(model, x, y, 10, NO_DEFENSE, LocalTraining("fedsgd", 6), _gen())
    _assert_close(result.update, batch_only.update)
    # With pruning, every shared per-sample gradient is pruned on its own.
    pruned = compute_update(model, x, y, 10, parse_defense_spec("prune:0.9"), training, _gen())
    weight = pruned.per_sample["classifier.weight"]
    assert (
        (weight != 0).flatten(1).sum(1) == weight[0].numel() - int(0.9 * weight[0].numel())
    ).all()


def test_fedsgd_with_dpsgd_clips_per_sample_then_adds_noise() -> None:
    model = _model("mlp", (1, 6, 6))
    x, y = _data(8, (1, 6, 6))
    training = LocalTraining("fedsgd", 8)
    exact = compute_update(model, x, y, 10, parse_defense_spec("dpsgd:0.01:0"), training, _gen())
    clipped = DPSGD(0.01, 0).clip(per_sample_gradients(model, x, y))
    _assert_close(exact.update, {k: v.mean(0) for k, v in clipped.items()})
    noisy = compute_update(model, x, y, 10, parse_defense_spec("dpsgd:0.01:4"), training, _gen(3))
    again = compute_update(model, x, y, 10, parse_defense_spec("dpsgd:0.01:4"), training, _gen(3))
    noise = torch.cat([(noisy.update[k] - exact.update[k]).flatten() for k in exact.update])
    assert noise.std().item() == pytest.approx(4 * 0.01 / 8, rel=0.05)
    _assert_close(noisy.update, again.update, atol=0, rtol=0)


def test_a_poisson_batch_shares_its_clipped_sum_over_the_declared_size() -> None:
    model = _model("mlp", (1, 6, 6))
    x, y = _data(5, (1, 6, 6))
    poisson = LocalTraining("fedsgd", 4, sampling="poisson")
    exact = parse_defense_spec("dpsgd:0.01:0")
    clipped = DPSGD(0.01, 0).clip(per_sample_gradients(model, x, y))
    # Five examples drawn where four were expected: the sum over 4, not the mean over 5.
    five = compute_update(model, x, y, 10, exact, poisson, _gen())
    _assert_close(five.update, {k: v.sum(0) / 4 for k, v in clipped.items()})
    assert five.num_examples == 4  # the declared size, never the count drawn
    # With exactly the declared size it is the fixed-size update, bit for bit.
    fixed = compute_update(model, x[:4], y[:4], 10, exact, LocalTraining("fedsgd", 4), _gen())
    same = compute_update(model, x[:4], y[:4], 10, exact, poisson, _gen())
    _assert_close(same.update, fixed.update, atol=0, rtol=0)
    # An empty batch still releases the noise of a mean of 4, and has no loss.
    empty = compute_update(
        model, x[:0], y[:0], 10, parse_defense_spec("dpsgd:0.01:4"), poisson, _gen(3)
    )
    noise = torch.cat([u.flatten() for u in empty.update.values()])
    assert noise.std().item() == pytest.approx(4 * 0.01 / 4, rel=0.05)
    assert abs(noise.mean().item()) < 0.002
    assert empty.num_examples == 4 and empty.loss != empty.loss  # NaN
    with pytest.raises(LocalTrainingError, match="no dpsgd step"):
        compute_update(model, x, y, 10, NO_DEFENSE, poisson, _gen())
    with pytest.raises(LocalTrainingError, match="would show the batch's size"):
        LocalTraining("fedsgd", 4, share="per-sample", sampling="poisson")


def test_fedavg_on_poisson_batches_steps_on_each_steps_own_clipped_sum() -> None:
    model = _model("mlp", (1, 6, 6))
    x, y = _data(5, (1, 6, 6))
    training = LocalTraining("fedavg", 2, local_steps=3, learning_rate=0.5, sampling="poisson")
    dp = DPSGD(0.05, 0)
    # Three steps' draws, as positions into the rows drawn: three examples, then none, then one.
    batches = [torch.tensor([4, 0, 2]), torch.tensor([], dtype=torch.long), torch.tensor([1])]
    result = compute_update(
        model, x, y, 10, parse_defense_spec("dpsgd:0.05:0"), training, _gen(), batches=batches
    )
    params = {name: p.detach() for name, p in model.named_parameters()}
    for index in batches:
        if len(index):  # an empty step's gradient is its noise alone (none here)
            per_sample = per_sample_gradients(model, x[index], y[index], params=params)
            step = {k: v.sum(0) / 2 for k, v in dp.clip(per_sample).items()}
            params = {k: p - 0.5 * step[k] for k, p in params.items()}
    start = dict(model.named_parameters())
    _assert_close(result.update, {k: p - start[k].detach() for k, p in params.items()})
    assert result.num_examples == 6  # 3 steps of 2, declared
    with pytest.raises(LocalTrainingError, match="expected the 3 steps' batches, got none"):
        compute_update(model, x, y, 10, parse_defense_spec("dpsgd:0.05:0"), training, _gen())


def test_encoded_update_is_the_gradient_of_the_encoded_batch() -> None:
    model = _model("lenet", (3, 8, 8))
    x, y = _data(6, (3, 8, 8))
    result = compute_update(
        model, x, y, 10, parse_defense_spec("mixup:3"), LocalTraining("fedsgd", 6), _gen(4)
    )
    expected = MixUp(3)(x, F.one_hot(y, 10).float(), _gen(4))
    assert result.encoded is not None
    assert torch.equal(result.encoded.inputs, expected.inputs)
    _assert_close(result.update, _autograd(model, expected.inputs, expected.soft_labels))


def test_fedavg_one_step_delta_is_minus_lr_times_the_gradient() -> None:
    model = _model("convnet", (3, 8, 8))
    before = copy.deepcopy(model.state_dict())
    x, y = _data(4, (3, 8, 8))
    training = LocalTraining("fedavg", 4, local_steps=1, learning_rate=0.05)
    result = compute_update(model, x, y, 10, NO_DEFENSE, training, _gen())
    gradient = _autograd(model, x, y)
    _assert_close(result.update, {k: -0.05 * g for k, g in gradient.items()}, atol=1e-7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fedavg_steps_walk_the_data_cyclically() -> None:
    model = _model("lenet", (3, 8, 8))
    x, y = _data(5, (3, 8, 8))
    training = LocalTraining("fedavg", 2, local_steps=3, learning_rate=0.1)
    result = compute_update(model, x, y, 10, NO_DEFENSE, training, _gen())
    reference = copy.deepcopy(model)
    optimiser = torch.optim.SGD(reference.parameters(), lr=0.1)
    for index in ([0, 1], [2, 3], [4, 0]):  # starts at (k * B) mod N, wrapping around
        optimiser.zero_grad()
        F.cross_entropy(reference(x[index]), y[index]).backward()
        optimiser.step()
    expected = {
        name: p.detach() - q.detach()
        for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True)
    }
    _assert_close(result.update, expected, atol=1e-6)
    assert result.num_examples == 5 and result.per_sample is None


def test_fedavg_with_batchnorm_trains_and_shares_statistics() -> None:
    model = _model("convnet-bn", (3, 8, 8))
    x, y = _data(6, (3, 8, 8))
    training = LocalTraining("fedavg", 3, local_steps=2, learning_rate=0.1)
    result = compute_update(model, x, y, 10, NO_DEFENSE, training, _gen(), share_bn_statistics=True)
    assert result.bn_statistics is not None
    _assert_close(result.bn_statistics, batchnorm_statistics(model, x))
    assert any(v.abs().sum() > 0 for v in result.update.values())
    with pytest.raises(PerSampleRefused, match="convnet-bn -> convnet"):
        compute_update(model, x, y, 10, parse_defense_spec("dpsgd:1:1"), training, _gen())


def test_fedavg_dpsgd_adds_noise_at_every_step_and_defenses_once_at_the_end() -> None:
    model = _model("mlp", (1, 4, 4))
    x, y = _data(8, (1, 4, 4))
    training = LocalTraining("fedavg", 4, local_steps=2, learning_rate=0.1)
    spec = parse_defense_spec("dpsgd:1:1+prune:0.5+sign")
    result = compute_update(model, x, y, 10, spec, training, _gen(5))
    again = compute_update(model, x, y, 10, spec, training, _gen(5))
    _assert_close(result.update, again.update, atol=0, rtol=0)
    for name, value in result.update.items():
        assert set(value.unique().tolist()) <= {-1.0, 0.0, 1.0}, name
        assert int((value != 0).sum()) <= value.numel() - int(0.5 * value.numel())


def test_local_training_and_inputs_are_validated() -> None:
    with pytest.raises(LocalTrainingError, match="per-sample updates exist only in fedsgd"):
        LocalTraining("fedavg", 4, share="per-sample")
    with pytest.raises(LocalTrainingError, match="mode='sgd'"):
        LocalTraining("sgd", 4)  # type: ignore[arg-type]
    with pytest.raises(LocalTrainingError, match="learning_rate"):
        LocalTraining("fedsgd", 4, learning_rate=0.0)
    model = _model("mlp", (1, 4, 4))
    x, y = _data(3, (1, 4, 4))
    with pytest.raises(LocalTrainingError, match="expected exactly one batch"):
        compute_update(model, x, y, 10, NO_DEFENSE, LocalTraining("fedsgd", 4), _gen())
    with pytest.raises(LocalTrainingError, match="batch_size <= examples"):
        compute_update(model, x, y, 10, NO_DEFENSE, LocalTraining("fedavg", 4), _gen())
    with pytest.raises(LocalTrainingError, match=r"expected 0\.\.9"):
        compute_update(model, x, y + 10, 10, NO_DEFENSE, LocalTraining("fedsgd", 3), _gen())


class _SharedLayer(nn.Module):
    """One Linear reached under two attribute names, applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.again = self.first
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.again(torch.tanh(self.first(x.flatten(1))))))


def test_a_layer_under_two_names_keeps_its_parameters_and_gets_exact_gradients() -> None:
    """torch's functional_call left plain tensors in such a model: after per-sample gradients
    the caller's model had no parameters to train (audit AQ7)."""
    torch.manual_seed(0)
    model = _SharedLayer()
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])
    before = {name: id(p) for name, p in model.named_parameters()}
    grads = vmap_per_sample_gradients_with_loss(model, x, y)[0]
    batch = batch_gradient(model, x, y)
    assert {name: id(p) for name, p in model.named_parameters()} == before
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    for i in range(3):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        assert torch.allclose(grads["first.weight"][i], model.first.weight.grad, atol=1e-6)
    torch.testing.assert_close(batch["first.weight"], grads["first.weight"].mean(0))
