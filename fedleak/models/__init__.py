"""Target models by name, built from a public `ModelSpec`."""

from fedleak.models.build import (
    INIT_NAMES,
    MODEL_NAMES,
    ModelSpecError,
    build_model,
    count_parameters,
    has_batchnorm,
    model_modality,
)
from fedleak.models.spec import ModelSpec

__all__ = [
    "INIT_NAMES",
    "MODEL_NAMES",
    "ModelSpec",
    "ModelSpecError",
    "build_model",
    "count_parameters",
    "has_batchnorm",
    "model_modality",
]
