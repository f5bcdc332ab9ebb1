"""Target models: sizes, shapes, seeded weights, initialisation, BatchNorm detection, errors."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from fedleak.models import (
    ModelSpec,
    ModelSpecError,
    build_model,
    count_parameters,
    has_batchnorm,
    model_modality,
    model_names,
)

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("lenet", CIFAR, 15_826),
        ("lenet", MNIST, 13_426),
        ("resnet20", CIFAR, 269_722),
        ("resnet20-gn", CIFAR, 269_722),
        ("resnet18", CIFAR, 11_173_962),
        ("convnet", CIFAR, 242_122),
        ("mlp", MNIST, 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10),
    ],
)
def test_parameter_counts(name: str, shape: tuple[int, ...], expected: int) -> None:
    assert count_parameters(build_model(ModelSpec(name, shape, 10))) == expected


@pytest.mark.parametrize("name", [m for m in model_names() if model_modality(m) == "image"])
@pytest.mark.parametrize("shape", [MNIST, CIFAR, (3, 16, 24)])
def test_forward_shapes(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelSpec(name, shape, 7)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("init", ["default", "uniform"])
def test_same_seed_same_weights_and_global_rng_untouched(init: str) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(ModelSpec("resnet20", CIFAR, 10, init=init, seed=5))
    after = torch.rand(3)
    b = build_model(ModelSpec("resnet20", CIFAR, 10, init=init, seed=5))
    c = build_model(ModelSpec("resnet20", CIFAR, 10, init=init, seed=6))
    assert torch.equal(before, after)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    pairs = zip(a.parameters(), c.parameters(), strict=True)
    assert not all(torch.equal(pa, pc) for pa, pc in pairs)


def test_uniform_init_covers_every_parameter_in_bounds() -> None:
    model = build_model(ModelSpec("lenet", CIFAR, 10, init="uniform", seed=1))
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert values.min() >= -0.5 and values.max() < 0.5
    # U(-0.5, 0.5) has standard deviation 1/sqrt(12) ~ 0.289; PyTorch's default is far smaller.
    assert abs(values.std().item() - 12**-0.5) < 0.01
    for name, p in model.named_parameters():
        assert p.detach().abs().max() > 0.4, name
    default = build_model(ModelSpec("lenet", CIFAR, 10, seed=1))
    assert torch.cat([p.detach().flatten() for p in default.parameters()]).std() < 0.1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lenet", False),
        ("convnet", False),
        ("convnet-bn", True),
        ("resnet20", True),
        ("resnet20-gn", False),
        ("resnet18", True),
        ("resnet18-gn", False),
        ("mlp", False),
    ],
)
def test_has_batchnorm(name: str, expected: bool) -> None:
    assert has_batchnorm(build_model(ModelSpec(name, CIFAR, 10))) is expected


@pytest.mark.parametrize("name", ["lenet", "convnet", "resnet20-gn", "mlp"])
def test_per_sample_gradients_with_vmap_match_single_gradients(name: str) -> None:
    model = build_model(ModelSpec(name, CIFAR, 10))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.rand(4, *CIFAR), torch.arange(4)

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(logits, yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    single = torch.autograd.grad(
        torch.nn.functional.cross_entropy(model(x[2:3]), y[2:3]), list(model.parameters())
    )
    for (k, g), s in zip(per_sample.items(), single, strict=True):
        torch.testing.assert_close(g[2], s, atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (ModelSpec("vgg11", CIFAR, 10), "model.name='vgg11': unknown model; expected one of lenet"),
        (ModelSpec("torch.nn:Nope", CIFAR, 10), "model.name='torch.nn:Nope': 'torch.nn' has no"),
        (ModelSpec("no_such_pkg.m:f", CIFAR, 10), "model.name='no_such_pkg.m:f': cannot import"),
        (ModelSpec("torch.nn:Linear", CIFAR, 10), "model.name='torch.nn:Linear': the factory"),
        (ModelSpec("lenet", CIFAR, 10, init="xavier"), "model.init='xavier'.*default, uniform"),
        (ModelSpec("lenet", (32, 32), 10), r"model.input_shape=\(32, 32\)"),
        (ModelSpec("convnet", (3, 2, 2), 10), "H, W >= 4"),
        (ModelSpec("lenet", CIFAR, 0), "model.num_classes=0"),
        (ModelSpec("lenet", CIFAR, 10, seed=-1), "model.seed=-1"),
    ],
)
def test_bad_specs_raise_one_line_value_errors(spec: ModelSpec, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        build_model(spec)
    assert isinstance(info.value, ModelSpecError)
    assert "\n" not in str(info.value)
