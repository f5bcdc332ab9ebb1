"""Target models by name or import path, built from a public `ModelSpec`."""

from fedleak.models.build import (
    INIT_NAMES,
    ModelSpecError,
    batchnorm_buffer_names,
    build_model,
    count_parameters,
    has_batchnorm,
)
from fedleak.models.registry import (
    MODELS,
    ModelEntry,
    groupnorm_advice,
    model_entry,
    model_modality,
    model_names,
    register_model,
)
from fedleak.models.spec import ModelSpec

__all__ = [
    "INIT_NAMES",
    "MODELS",
    "ModelEntry",
    "ModelSpec",
    "ModelSpecError",
    "batchnorm_buffer_names",
    "build_model",
    "count_parameters",
    "groupnorm_advice",
    "has_batchnorm",
    "model_entry",
    "model_modality",
    "model_names",
    "register_model",
]
