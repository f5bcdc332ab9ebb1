"""Build a target model from its public `ModelSpec`, with weights fixed by the spec's seed.

`spec.name` is a registered name or an import path (`fedleak.models.registry`).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fedleak.models.registry import is_import_path, model_entry
from fedleak.models.spec import ModelSpec
from fedleak.settings import SEED_MAX, ConfigError

INIT_NAMES: tuple[str, ...] = ("default", "uniform")

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ModelSpecError(ConfigError):
    """A `ModelSpec` names an unknown model or init, or a shape the model cannot take."""


def _validate(spec: ModelSpec) -> None:
    if not isinstance(spec, ModelSpec):
        raise ModelSpecError(f"spec: expected a ModelSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str):
        raise ModelSpecError(f"model.name={spec.name!r}: expected a name (a string)")
    if isinstance(spec.num_classes, bool) or not isinstance(spec.num_classes, numbers.Integral):
        raise ModelSpecError(f"model.num_classes={spec.num_classes!r}: expected an integer")
    try:
        entry = model_entry(spec.name)
    except ConfigError as error:
        raise ModelSpecError(str(error)) from None
    if spec.init not in INIT_NAMES:
        raise ModelSpecError(
            f"model.init={spec.init!r} is unknown; choose one of {', '.join(INIT_NAMES)}"
        )
    if spec.num_classes < 1:
        raise ModelSpecError(f"model.num_classes={spec.num_classes} must be at least 1")
    if not 0 <= spec.seed <= SEED_MAX:
        raise ModelSpecError(f"model.seed={spec.seed}: expected an integer in [0, {SEED_MAX}]")
    shape = tuple(spec.input_shape)
    if any(d < 1 for d in shape):
        raise ModelSpecError(f"model.input_shape={shape} must have positive sizes")
    if entry.modality == "tokens":
        # No upper bound on L here: a model of one's own may hold more positions than
        # fedleak's transformer (its own forward refuses longer ones; data.seq-len is bounded).
        if len(shape) != 1 or shape[0] < 2 or spec.num_classes < 2:
            raise ModelSpecError(
                f"model {spec.name!r} reads token sequences: expected input_shape (L,) with "
                f"L >= 2 and a vocabulary (num_classes) of at least 2, got {shape} and "
                f"{spec.num_classes}"
            )
    elif entry.image and (len(shape) != 3 or min(shape[1:]) < entry.min_size):
        raise ModelSpecError(
            f"model.input_shape={shape} for {spec.name!r} must be (C, H, W) "
            f"with H, W >= {entry.min_size}"
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
    build = model_entry(spec.name).build
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            model = build(shape, spec.num_classes)
        except (Exception, SystemExit) as error:  # a factory's sys.exit ends no command
            if not is_import_path(spec.name):
                raise
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelSpecError(
                f"model.name={spec.name!r}: the factory failed for input shape {shape} and "
                f"{spec.num_classes} classes ({type(error).__name__}: {first})"
            ) from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model.name={spec.name!r}: the factory returned {type(model).__name__}, "
            "expected a torch.nn.Module"
        )
    if spec.init == "uniform":
        _uniform_init(model, torch.Generator().manual_seed(spec.seed))
    return model


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any submodule is a BatchNorm layer (whose batch statistics mix samples)."""
    return any(isinstance(m, _BATCHNORM) for m in module.modules())


def batchnorm_buffer_names(module: nn.Module) -> frozenset[str]:
    """State-dict names of the BatchNorm layers' buffers (running statistics and batch counts):
    the only buffers local computation changes; others (a frozen token table) are constants."""
    return frozenset(
        f"{prefix}.{name}" if prefix else name
        for prefix, layer in module.named_modules()
        if isinstance(layer, _BATCHNORM)
        for name, _ in layer.named_buffers(recurse=False)
    )


def count_parameters(module: nn.Module) -> int:
    """The number of scalar parameters (buffers such as BatchNorm running means excluded)."""
    return sum(p.numel() for p in module.parameters())
