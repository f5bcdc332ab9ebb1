"""Build a target model from its public `ModelSpec`, with weights fixed by the spec's seed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedleak.models.convnet import ConvNet
from fedleak.models.lenet import LeNet
from fedleak.models.mlp import MLP
from fedleak.models.resnet import resnet18, resnet20
from fedleak.models.spec import ModelSpec
from fedleak.models.transformer import MAX_POSITIONS, CausalTransformer

Builder = Callable[[tuple[int, ...], int], nn.Module]

_BUILDERS: dict[str, Builder] = {
    "lenet": lambda shape, k: LeNet(shape, k),
    "convnet": lambda shape, k: ConvNet(shape, k),
    "convnet-bn": lambda shape, k: ConvNet(shape, k, batchnorm=True),
    "resnet20": lambda shape, k: resnet20(shape, k, norm="bn"),
    "resnet20-gn": lambda shape, k: resnet20(shape, k, norm="gn"),
    "resnet18": lambda shape, k: resnet18(shape, k, norm="bn"),
    "resnet18-gn": lambda shape, k: resnet18(shape, k, norm="gn"),
    "mlp": lambda shape, k: MLP(shape, k),
    # The language task: input_shape (L,) of token ids, num_classes = vocabulary size.
    "transformer3": lambda shape, k: CausalTransformer(k),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
# What each model reads; the rest read images.
_TOKEN_MODELS = frozenset({"transformer3"})
INIT_NAMES: tuple[str, ...] = ("default", "uniform")

# Smallest height/width each convolutional model handles (two 2x2 poolings in the ConvNet).
_MIN_SIZE = {"convnet": 4, "convnet-bn": 4}

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ModelSpecError(ValueError):
    """A `ModelSpec` names an unknown model or init, or a shape the model cannot take."""


def _validate(spec: ModelSpec) -> None:
    if spec.name not in _BUILDERS:
        raise ModelSpecError(
            f"model.name={spec.name!r} is unknown; choose one of {', '.join(MODEL_NAMES)}"
        )
    if spec.init not in INIT_NAMES:
        raise ModelSpecError(
            f"model.init={spec.init!r} is unknown; choose one of {', '.join(INIT_NAMES)}"
        )
    if spec.num_classes < 1:
        raise ModelSpecError(f"model.num_classes={spec.num_classes} must be at least 1")
    if spec.seed < 0:
        raise ModelSpecError(f"model.seed={spec.seed} must be a non-negative integer")
    shape = tuple(spec.input_shape)
    if any(d < 1 for d in shape):
        raise ModelSpecError(f"model.input_shape={shape} must have positive sizes")
    if spec.name in _TOKEN_MODELS:
        if len(shape) != 1 or not 2 <= shape[0] <= MAX_POSITIONS or spec.num_classes < 2:
            raise ModelSpecError(
                f"model {spec.name!r} reads token sequences: expected input_shape (L,) with "
                f"2 <= L <= {MAX_POSITIONS} and a vocabulary (num_classes) of at least 2, got "
                f"{shape} and {spec.num_classes}"
            )
    elif spec.name != "mlp":
        min_size = _MIN_SIZE.get(spec.name, 1)
        if len(shape) != 3 or min(shape[1:]) < min_size:
            raise ModelSpecError(
                f"model.input_shape={shape} for {spec.name!r} must be (C, H, W) "
                f"with H, W >= {min_size}"
            )


def _uniform_init(module: nn.Module, generator: torch.Generator) -> None:
    """DLG's initialisation: every weight and bias drawn from U(-0.5, 0.5)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.uniform_(-0.5, 0.5, generator=generator)


def build_model(spec: ModelSpec) -> nn.Module:
    """The model named by `spec`, on the CPU, in training mode.

    The same spec always gives the same weights, and the caller's global RNG state is left
    untouched: construction runs inside a forked RNG seeded with `spec.seed`.
    """
    _validate(spec)
    shape = tuple(spec.input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = _BUILDERS[spec.name](shape, spec.num_classes)
    if spec.init == "uniform":
        _uniform_init(model, torch.Generator().manual_seed(spec.seed))
    return model


def model_modality(name: str) -> str:
    """What a registered model reads: `tokens` (language models) or `image`."""
    return "tokens" if name in _TOKEN_MODELS else "image"


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any submodule is a BatchNorm layer (whose batch statistics mix samples)."""
    return any(isinstance(m, _BATCHNORM) for m in module.modules())


def count_parameters(module: nn.Module) -> int:
    """The number of scalar parameters (buffers such as BatchNorm running means excluded)."""
    return sum(p.numel() for p in module.parameters())
