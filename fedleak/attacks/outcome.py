"""An attack's result as it is scored: one rule for every attack, whoever runs it (the
server's runners and workers, the library's `fedleak.reconstruct`)."""

from __future__ import annotations

import dataclasses

import torch

from fedleak.attacks.types import Observation, Reconstruction
from fedleak.lines import error_line, one_line

# Float32 round-off of an attack that keeps to [0, 1] is not worth a note in its row.
RANGE_SLACK = 1e-5


def failed_reconstruction(error: BaseException | str, seconds: float) -> Reconstruction:
    """A failure recorded as a reconstruction, so it lands in the leakage rows."""
    message = error_line(error, 500) if isinstance(error, BaseException) else one_line(error, 500)
    return Reconstruction(
        inputs=torch.empty(0), labels=None, seconds=seconds, status="failed", message=message
    )


NOT_FINITE = "reconstruction contains NaN or inf"


def num_classes(observation: Observation) -> int:
    """The class count `checked` holds an observation's recovered labels to."""
    return observation.model.num_classes


def image_shape(observation: Observation) -> tuple[int, ...] | None:
    """The shape `checked` holds an observation's reconstructed samples to: its images', or
    None for token sequences."""
    return tuple(observation.model.input_shape) if observation.modality == "image" else None


def checked(
    reconstruction: object,
    seconds: float,
    expected: int,
    shape: tuple[int, ...] | None = None,
    classes: int | None = None,
) -> Reconstruction:
    """Move to the CPU, time it, and give it its status by the one rule of every attack: a
    finite reconstruction of `expected` samples (of `shape` when given) is "ok" and scored,
    whatever budget the attack ran out of; NaN or inf is "nan" (token ids, which cannot hold
    it, are "nan" when the attack says so); a wrong shape, or anything
    but a `Reconstruction`, is "failed". Images (`shape` given) must be floats and become
    float32 in the data's range [0, 1] (clamped, and the message says so when an attack went
    beyond it: PSNR and LPIPS are only meaningful there); token ids stay integers. Recovered
    labels must be `expected` class indices, below `classes` when given."""
    if not isinstance(reconstruction, Reconstruction):
        return failed_reconstruction(
            f"the attack returned {type(reconstruction).__name__}, not a Reconstruction", seconds
        )
    for name in ("inputs", "labels", "loss_start", "loss_final"):
        value = getattr(reconstruction, name)
        if not isinstance(value, torch.Tensor) and (name == "inputs" or value is not None):
            kind = type(value).__name__
            return failed_reconstruction(f"the attack's {name} is a {kind}, not a tensor", seconds)
    inputs = reconstruction.inputs.detach().cpu()
    status, message = "ok", reconstruction.message
    if inputs.is_floating_point():
        inputs = inputs.float()
        if inputs.numel() and torch.isfinite(inputs).all():
            low, high = float(inputs.min()), float(inputs.max())
            if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
                clamped = f"values from {low:.4g} to {high:.4g} clamped to [0, 1] for scoring"
                message = f"{message}; {clamped}" if message else clamped
            inputs = inputs.clamp(0.0, 1.0)
    labels = None if reconstruction.labels is None else reconstruction.labels.detach().cpu()
    wanted = (expected, *shape) if shape is not None else None
    if shape is not None and not inputs.is_floating_point():
        # 0..255 pixels scored as [0, 1] ones read as -40 dB: refuse rather than guess a scale.
        status = "failed"
        message = f"images of dtype {inputs.dtype}; expected float pixels in [0, 1]"
    elif inputs.dim() == 0 or inputs.shape[0] != expected:
        status = "failed"
        count = inputs.shape[0] if inputs.dim() else 0
        message = f"reconstruction has {count} samples, expected {expected}"
    elif wanted is not None and tuple(inputs.shape) != wanted:
        status = "failed"
        message = f"reconstruction of shape {tuple(inputs.shape)}, expected {wanted}"
    elif labels is not None and tuple(labels.shape) != (expected,):
        status = "failed"
        message = f"labels of shape {tuple(labels.shape)}, expected ({expected},)"
    elif labels is not None and (labels.is_floating_point() or labels.dtype == torch.bool):
        status = "failed"
        message = f"labels of dtype {labels.dtype}; expected integer class indices"
    elif labels is not None and labels.numel() and _outside(labels, classes):
        status = "failed"
        bound = f"0 to {classes - 1}" if classes is not None else "0 or more"
        found = f"{int(labels.min())} to {int(labels.max())}"
        message = f"labels from {found}; expected class indices {bound}"
    elif not torch.isfinite(inputs).all():
        # The attack's own words first: they may say why (a matching loss never finite).
        status, message = "nan", "; ".join(filter(None, [message, NOT_FINITE]))
    elif not inputs.is_floating_point() and reconstruction.status == "nan":
        status = "nan"  # token ids cannot hold NaN: the attack's own word stands
    if reconstruction.status == "failed" and status != "ok":
        message = reconstruction.message or message
    return dataclasses.replace(
        reconstruction,
        inputs=inputs,
        labels=labels,
        seconds=seconds,
        status=status,
        message=message,
        loss_start=_cpu(reconstruction.loss_start),
        loss_final=_cpu(reconstruction.loss_final),
    )


def _outside(labels: torch.Tensor, classes: int | None) -> bool:
    return int(labels.min()) < 0 or (classes is not None and int(labels.max()) >= classes)


def _cpu(values: torch.Tensor | None) -> torch.Tensor | None:
    return None if values is None else values.detach().double().cpu()
