"""What a model must be for a study to measure it: every parameter trained, each under one
name, no train-mode randomness, and, where clients share per-sample gradients, samples that
do not meet in the forward.

Each failed rule ran before: a frozen parameter trained anyway, an aliased one was reset to its
first value by the stale copy under its second name, Dropout drew from an unseeded generator
(two runs of one seed differed), and a forward that mixed samples, or changed buffers that a
per-sample update does not carry, gave per-sample gradients and statistics that no client had.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedleak.lines import error_line
from fedleak.models.spec import ModelSpec

# Batched and one-sample forwards of independent samples differ by rounding only.
_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def unfit_reason(
    model: nn.Module,
    spec: ModelSpec,
    per_sample: bool,
    remedy: str = "threat.share='batch'",
    batch_size: int | None = 2,
) -> str | None:
    """Why a study cannot measure `model` as built from `spec`, or None. `per_sample`: the
    clients share (or their defense works on) per-sample gradients; `remedy`: the settings
    change that would spare them, named in the refusal beside another model; `batch_size`:
    the clients' (train.batch-size), which a training-mode forward is tried on (None: not
    known, as an audited app's clients choose their own)."""
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        return (
            f"parameter {frozen[0]!r} is frozen (requires_grad=False), but clients train and "
            "share every parameter; hold fixed tensors as buffers (register_buffer)"
        )
    unique = {id(p) for p in model.parameters()}
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    if len(names) != len(unique):
        first = dict(model.named_parameters())
        alias = next(name for name in names if name not in first)
        return (
            f"parameter {alias!r} is another name of a parameter (tied weights): the global "
            "model carries both names and the stale one overwrites the trained one; use the "
            "shared module's weight in forward instead of assigning it to a second attribute"
        )
    random = random_in_training(model)
    if random is not None:
        return random
    trained = None if batch_size is None else _training_forward(model, spec, batch_size)
    if trained is not None:
        return trained
    if per_sample:
        return _coupling(model, spec, remedy)
    return None


def random_in_training(model: nn.Module) -> str | None:
    """Why the model's training forward is random (a Dropout layer), or None."""
    for name, module in model.named_modules():
        rate = None
        if isinstance(module, nn.modules.dropout._DropoutNd):
            rate = module.p
        elif isinstance(module, nn.MultiheadAttention):
            rate = module.dropout
        if rate:
            return (
                f"{type(module).__name__} {name or '(the model)'!r} (p={rate:g}) draws random "
                "masks in training from an unseeded generator, so two runs of one seed would "
                "differ and no replay meets the client's masks; set its dropout to 0"
            )
    return None


def _random_inputs(spec: ModelSpec, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if len(spec.input_shape) == 1:  # token ids
        return torch.randint(0, spec.num_classes, (count, *spec.input_shape), generator=generator)
    return torch.rand((count, *spec.input_shape), generator=generator)


def _training_forward(model: nn.Module, spec: ModelSpec, batch_size: int) -> str | None:
    """Why a training-mode forward on a client's batch fails or scores NaN or infinity (a
    statistic of a batch of one, say), or None: every client's update would be NaN, and the
    run blamed the learning rate. Batches above 16 are tried at 16, which costs less."""
    count = min(batch_size, 16)
    probe = copy.deepcopy(model).train()
    # The user's forward: its failure, an exit included, is the model's reason, not fedleak's.
    try:
        with torch.no_grad():
            scores = probe(_random_inputs(spec, count))
    except (Exception, SystemExit) as error:
        return f"fails in a training-mode forward on random inputs ({error_line(error)})"
    if isinstance(scores, torch.Tensor) and not bool(torch.isfinite(scores).all()):
        return (
            "outputs NaN or infinite scores in a training-mode forward on a batch of "
            f"{count} random inputs (train.batch-size={batch_size}); expected finite scores"
        )
    return None


def _coupling(model: nn.Module, spec: ModelSpec, remedy: str) -> str | None:
    """Samples that meet in a training-mode forward (a batch mean, a branch on a batch
    statistic), or buffers that the forward changes: a per-sample update carries neither."""
    probe = copy.deepcopy(model).train()
    x = _random_inputs(spec, 2)
    before = {name: b.clone() for name, b in probe.named_buffers()}
    # The user's forward: its failure, an exit included, is the model's reason, not fedleak's.
    try:
        with torch.no_grad():
            together = probe(x)
    except (Exception, SystemExit) as error:
        return f"fails in a training-mode forward on random inputs ({error_line(error)})"
    if isinstance(together, torch.Tensor) and not bool(torch.isfinite(together).all()):
        return "outputs NaN or infinite scores in a training-mode forward on random inputs"
    changed = [n for n, b in probe.named_buffers() if not torch.equal(b, before[n])]
    if changed:
        return (
            f"buffer {changed[0]!r} changes in the forward (running statistics), but a "
            f"per-sample update carries no buffers, so it would never train; use {remedy} "
            "or a model without such buffers"
        )
    try:
        with torch.no_grad():
            alone = torch.cat([probe(x[i : i + 1]) for i in range(len(x))])
    except (Exception, SystemExit) as error:
        return (
            f"fails in a training-mode forward on one sample ({error_line(error)}), which "
            f"per-sample gradients need; use {remedy} or a model that treats samples apart"
        )
    if together.shape != alone.shape or not torch.allclose(together, alone, **_TOLERANCE):
        return (
            "a sample's output depends on the other samples of its batch (a batch statistic "
            f"or a branch on one), so per-sample gradients are undefined; use {remedy} or a "
            "model that treats samples apart"
        )
    return None
