"""Target models by name or import path, and how to add your own.

`model.name` is a registered name (`lenet`, `resnet20-gn`, a plugin's) or an import path
`package.module:factory`, Flower's convention for apps. Either way the factory is called with
the data set's input shape and number of classes and returns an `nn.Module` (an import path
may also name a factory that takes no arguments, such as a Flower app's own `Net` class):

    @register_model("tiny-cnn")
    def tiny_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module: ...

A package makes a model available to every process with an entry point in group
`fedleak.models` (see `fedleak.registry`). BatchNorm checks and GroupNorm advice apply to every
model: `groupnorm` names the registered variant to suggest when BatchNorm is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fedleak.registry import Registry, load_object
from fedleak.settings import shown_value

Builder = Callable[[tuple[int, ...], int], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A model factory and what it needs of the data shape.

    `image`: the model takes (C, H, W) inputs of at least `min_size` pixels a side.
    `groupnorm`: the name of a variant without BatchNorm, for the advice when per-sample
    operations meet BatchNorm. `modality`: what the model reads, `image` or `tokens` (a language
    model: input shape (L,) of token ids, num_classes the vocabulary size).
    """

    name: str
    build: Builder
    image: bool = False
    min_size: int = 1
    groupnorm: str | None = None
    modality: str = "image"

    def __post_init__(self) -> None:
        _check_options(self.name, self.image, self.min_size, self.groupnorm, self.modality)


MODALITIES = ("image", "tokens")
_FACTORY = "a model factory (input_shape, num_classes) -> nn.Module"


def _check_options(
    name: str, image: object, min_size: object, groupnorm: object, modality: object
) -> None:
    """Refuse, in one line naming the argument, what a model could never be checked with."""
    if not isinstance(image, bool):
        raise MODELS.refusal(name, f"image={shown_value(image)}: expected True or False")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise MODELS.refusal(
            name, f"min_size={shown_value(min_size)}: expected an integer >= 1 (pixels a side)"
        )
    if groupnorm is not None and (not isinstance(groupnorm, str) or not groupnorm):
        raise MODELS.refusal(
            name, f"groupnorm={shown_value(groupnorm)}: expected None or a model name"
        )
    if modality not in MODALITIES:
        raise MODELS.refusal(
            name,
            f"modality={shown_value(modality)}: expected one of "
            f"{', '.join(repr(m) for m in MODALITIES)}",
        )


def _adopt(name: str, obj: object) -> ModelEntry:
    if isinstance(obj, ModelEntry):
        return dataclasses.replace(obj, name=name)
    if not callable(obj):
        raise TypeError(f"expected {_FACTORY}, got {obj!r}")
    return ModelEntry(name, obj)


def _builtins() -> None:
    import fedleak.models.catalog  # noqa: F401  (registers the built-in models)


MODELS: Registry[ModelEntry] = Registry(
    "model",
    "fedleak.models",
    "model.name",
    adopt=_adopt,
    builtins=_builtins,
    owner=lambda entry: entry.build,
    forbidden=",:",
)


def register_model(
    name: str,
    build: Builder | None = None,
    *,
    image: bool = False,
    min_size: int = 1,
    groupnorm: str | None = None,
    modality: str = "image",
    replace: bool = False,
) -> object:
    """Register a factory `(input_shape, num_classes) -> nn.Module`; usable as a decorator.
    Arguments of the wrong type are refused here, in one line naming the argument."""
    MODELS.check_name(name)
    _check_options(name, image, min_size, groupnorm, modality)

    def add(factory: Builder) -> Builder:
        if not callable(factory):
            raise MODELS.refusal(name, f"expected {_FACTORY}, got {shown_value(factory)}")
        entry = ModelEntry(name, factory, image, min_size, groupnorm, modality)
        MODELS.add(name, entry, replace=replace)
        return factory

    return add if build is None else add(build)


def is_import_path(name: str) -> bool:
    """Whether `model.name` is an import path `package.module:factory` rather than a name."""
    return ":" in name


def model_entry(name: str) -> ModelEntry:
    """The entry of a registered name, or one made from an import path; one-line errors.

    A plug-in's factory comes guarded: what it raises is one line naming the model
    (`fedleak.registry.PluginFailed`); `build_model` words an import path's failure itself.
    """
    if is_import_path(name):
        factory = load_object(name, "model.name")
        if not callable(factory):
            from fedleak.settings import ConfigError

            raise ConfigError(f"model.name={name!r}: {factory!r} is not callable")
        return ModelEntry(name, _shaped(factory))
    entry = MODELS.get(name)
    build = MODELS.guarded(name, entry.build, "factory")
    return entry if build is entry.build else dataclasses.replace(entry, build=build)


def _shaped(factory: Callable[..., nn.Module]) -> Builder:
    """`factory` as a `Builder`: called with (input_shape, num_classes), or with nothing when
    it takes no arguments (a Flower app's `Net()`, built for its own data)."""
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): call it as a Builder
        return factory
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    takes_arguments = any(
        p.kind is inspect.Parameter.VAR_POSITIONAL
        or (p.kind in positional and p.default is inspect.Parameter.empty)
        for p in parameters
    )
    if takes_arguments:
        return factory
    return lambda input_shape, num_classes: factory()


def model_modality(name: str) -> str:
    """What a model reads: `tokens` (language models) or `image`."""
    return model_entry(name).modality


def model_names() -> tuple[str, ...]:
    """Every registered model name, plugins included."""
    return MODELS.names()


def groupnorm_advice(name: str) -> str:
    """What to use instead of a BatchNorm model for per-sample operations."""
    if not is_import_path(name):
        variant = model_entry(name).groupnorm
        if variant is not None:
            return f"use {variant!r}, its variant without BatchNorm"
    return "replace its BatchNorm layers by torch.nn.GroupNorm (per-sample statistics)"
