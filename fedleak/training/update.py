"""One client's update for one round: encode, gradients, local training, defenses.

FedSGD shares the (defended) gradient of one batch at w_t; FedAvg shares the (defended) weight
delta w_K - w_t after K local SGD steps. The defense pipeline fixes the order: encode once,
then per-sample clipping (DP-SGD), mean, noise, compression. The passed model is never
modified: local training runs on detached copies of its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedleak.defenses import DPSGD, DefensePipeline, EncodedBatch, PartnerPool
from fedleak.models import batchnorm_buffer_names, has_batchnorm
from fedleak.training.gradients import (
    Params,
    batch_gradient_with_loss,
    batchnorm_statistics,
    buffer_copies,
    per_sample_gradients_with_loss,
)

_MODES = ("fedsgd", "fedavg")
_SHARES = ("batch", "per-sample")
_SAMPLINGS = ("fixed", "poisson")


class LocalTrainingError(ValueError):
    """A local-training setting is out of range or does not fit the client's data."""


@dataclass(frozen=True)
class LocalTraining:
    """What a client declares about its local computation (the server sees all of it).

    `local_steps` only matters in FedAvg; FedSGD always computes one batch gradient.
    `share="per-sample"` (the per-sample threat model) exists only in FedSGD.
    `sampling="poisson"`: each DP-SGD batch (FedSGD's one, each of FedAvg's steps) holds
    each example with probability batch_size / n, so it has batch_size examples on average
    and any number in fact; the client divides its clipped sum by batch_size and declares
    batch_size per step, never the count.
    """

    mode: Literal["fedsgd", "fedavg"]
    batch_size: int
    local_steps: int = 1
    learning_rate: float = 0.1
    share: Literal["batch", "per-sample"] = "batch"
    sampling: Literal["fixed", "poisson"] = "fixed"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise LocalTrainingError(f"mode={self.mode!r}: expected one of {', '.join(_MODES)}")
        if self.share not in _SHARES:
            raise LocalTrainingError(f"share={self.share!r}: expected one of {', '.join(_SHARES)}")
        if self.batch_size < 1 or self.local_steps < 1:
            raise LocalTrainingError(
                f"batch_size={self.batch_size}, local_steps={self.local_steps}: both must be >= 1"
            )
        if not self.learning_rate > 0:
            raise LocalTrainingError(f"learning_rate={self.learning_rate!r}: must be > 0")
        if self.mode == "fedavg" and self.share == "per-sample":
            raise LocalTrainingError(
                "share='per-sample' with mode='fedavg': per-sample updates exist only in "
                "fedsgd; use mode='fedsgd' or share='batch'"
            )
        if self.sampling not in _SAMPLINGS:
            raise LocalTrainingError(
                f"sampling={self.sampling!r}: expected one of {', '.join(_SAMPLINGS)}"
            )
        if self.sampling == "poisson" and self.share != "batch":
            raise LocalTrainingError(
                f"sampling='poisson' with share={self.share!r}: one update per sample would "
                "show the batch's size; expected share='batch'"
            )

    @property
    def declared_examples(self) -> int:
        """What a client on Poisson batches declares: batch_size for each of its steps."""
        return self.batch_size * (self.local_steps if self.mode == "fedavg" else 1)


@dataclass(frozen=True)
class ClientUpdate:
    """A client's reply for one round.

    `update`: the shared tensor per parameter (FedSGD: defended mean gradient; FedAvg: defended
    delta w_K - w_t). `per_sample`: defended per-sample gradients (leading dim B) under the
    per-sample threat model, else None. `bn_statistics`: mean/var of each BatchNorm input at
    w_t over the (encoded) examples, i.e. the FedSGD batch or FedAvg's N examples, when shared
    and the model has BatchNorm, else None. `encoded`: the input
    encoding (None without an encoder); it is ground truth, for the auditor only. `loss`: mean
    training loss (FedAvg: averaged over the local steps). `buffers`: the model's buffers after
    the local computation (BatchNorm running statistics updated by every train-mode forward:
    once in FedSGD, once per local step in FedAvg; {} for a model without BatchNorm; constant
    buffers stay the server's), which the server averages into the global state as FedAvg
    does for a full state.
    """

    update: dict[str, Tensor]
    per_sample: dict[str, Tensor] | None
    bn_statistics: dict[str, Tensor] | None
    encoded: EncodedBatch | None
    loss: float
    num_examples: int
    buffers: dict[str, Tensor] = field(default_factory=dict)


def compute_update(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    pipeline: DefensePipeline,
    training: LocalTraining,
    generator: torch.Generator,
    *,
    public: Tensor | None = None,
    private: PartnerPool | None = None,
    share_bn_statistics: bool = False,
    batches: Sequence[Tensor] | None = None,
) -> ClientUpdate:
    """The defended update of a client holding images `x` [N, ...] and int64 labels `y` [N], or
    token sequences `x` [N, L] with `y` the same ids (a causal language model's targets).

    FedSGD needs N == batch_size. FedAvg runs `local_steps` SGD steps; step k uses the N-cyclic
    mini-batch starting at (k * batch_size) mod N. Under Poisson sampling (which needs a DP-SGD
    step) any N will do, zero included: FedSGD's batch is all of `x`, and FedAvg's step k
    uses the positions `batches[k]` of `x`. Randomness (encoding, noise) comes from
    `generator`, on the tensors' device. `public` is the pool of inter-InstaHide; `private`
    the client's own data that MixUp and intra-InstaHide draw partners from (the batch when
    None).
    BatchNorm models with per-sample operations raise `PerSampleRefused`.
    """
    _check_data(x, y, num_classes, training)
    if training.sampling == "poisson" and pipeline.find(DPSGD) is None:
        raise LocalTrainingError(
            "sampling='poisson' samples DP-SGD's batch; the defense has no dpsgd step"
        )
    steps = training.local_steps
    poisson_fedavg = training.sampling == "poisson" and training.mode == "fedavg"
    if poisson_fedavg and (batches is None or len(batches) != steps):
        raise LocalTrainingError(
            f"sampling='poisson' in fedavg: expected the {steps} steps' batches, got "
            f"{'none' if batches is None else len(batches)}"
        )
    encoded = None
    if pipeline.encoder is not None:
        if not x.is_floating_point():
            raise LocalTrainingError(
                f"defense {pipeline.encoder.spec!r}: input encodings mix images, and token "
                "sequences cannot be mixed; use gradient defenses (prune, sign, gauss, dpsgd)"
            )
        onehot = F.one_hot(y, num_classes).to(x.dtype)
        encoded = pipeline.encode(x, onehot, generator, public, private)
    inputs, targets = (encoded.inputs, encoded.soft_labels) if encoded else (x, y)
    statistics = None
    if share_bn_statistics and has_batchnorm(model):
        statistics = batchnorm_statistics(model, inputs)
    buffers = buffer_copies(model)
    if training.mode == "fedsgd":
        update, per_sample, loss = _fedsgd(
            model, inputs, targets, pipeline, training, generator, buffers
        )
    else:
        update, loss = _fedavg(
            model, inputs, targets, pipeline, training, generator, buffers, batches
        )
        per_sample = None
    return ClientUpdate(
        update=update,
        per_sample=per_sample,
        bn_statistics=statistics,
        encoded=encoded,
        loss=float(loss),
        # A Poisson batch's size is private (one example more or less shows in it): the client
        # declares the size it samples for, as it weights the aggregate.
        num_examples=training.declared_examples if training.sampling == "poisson" else len(x),
        buffers=_changed_buffers(model, buffers),
    )


def _changed_buffers(model: nn.Module, after: Params) -> Params:
    """The buffers that travel: BatchNorm's always (every client's forward passes move them),
    and any other that this computation changed (an InstanceNorm's running statistics, a
    plug-in's counter). Constant ones (a frozen token table) stay home: they would only add
    payload, and an average of equal floats need not be bit-equal. The server counts a buffer
    a reply lacks at the value it sent (`average_buffers`), as FedAvg of whole states would."""
    batchnorm = batchnorm_buffer_names(model)
    before = dict(model.named_buffers())
    return {
        name: value
        for name, value in after.items()
        if name in batchnorm or not torch.equal(value, before[name])
    }


def _check_data(x: Tensor, y: Tensor, num_classes: int, training: LocalTraining) -> None:
    tokens = x.dtype == torch.int64 and x.dim() == 2
    expected_dim = 2 if tokens else 1
    if y.dim() != expected_dim or y.dtype != torch.int64 or y.shape[0] != x.shape[0]:
        what = "int64 [N, L] token ids" if tokens else "int64 [N]"
        raise LocalTrainingError(
            f"labels of shape {tuple(y.shape)} and dtype {y.dtype}: expected {what} for "
            f"inputs of shape {tuple(x.shape)}"
        )
    if y.numel() and not (int(y.min()) >= 0 and int(y.max()) < num_classes):
        raise LocalTrainingError(
            f"labels range {int(y.min())}..{int(y.max())}: expected 0..{num_classes - 1}"
        )
    n = x.shape[0]
    if training.sampling == "poisson":
        return
    if training.mode == "fedsgd" and n != training.batch_size:
        raise LocalTrainingError(
            f"fedsgd with batch_size={training.batch_size} got {n} examples; expected exactly "
            f"one batch"
        )
    if training.mode == "fedavg" and not 1 <= training.batch_size <= n:
        raise LocalTrainingError(
            f"fedavg with batch_size={training.batch_size} got {n} examples; expected "
            f"batch_size <= examples"
        )


def _fedsgd(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    pipeline: DefensePipeline,
    training: LocalTraining,
    generator: torch.Generator,
    buffers: Params,
) -> tuple[Params, Params | None, Tensor]:
    batch_size = inputs.shape[0]
    if training.sampling == "poisson":
        return _poisson_fedsgd(model, inputs, targets, pipeline, training, generator)
    if not (pipeline.needs_per_sample or training.share == "per-sample"):
        gradient, loss = batch_gradient_with_loss(model, inputs, targets, buffers=buffers)
        return pipeline.share(gradient, batch_size, generator), None, loss
    per_sample, losses = per_sample_gradients_with_loss(model, inputs, targets)
    clipped = pipeline.clip(per_sample)
    mean = {name: g.mean(dim=0) for name, g in clipped.items()}
    update = pipeline.share(mean, batch_size, generator)
    shared_each = None
    if training.share == "per-sample":
        shared_each = pipeline.share_each(clipped, generator)
    return update, shared_each, losses.mean()


def _poisson_fedsgd(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    pipeline: DefensePipeline,
    training: LocalTraining,
    generator: torch.Generator,
) -> tuple[Params, None, Tensor]:
    """DP-SGD on a Poisson batch: the clipped gradients' sum over the expected batch size,
    then the usual noise on that mean (`pipeline.share`)."""
    dp = pipeline.find(DPSGD)
    assert dp is not None  # compute_update refuses Poisson sampling without DP-SGD
    mean, loss = _poisson_mean(model, inputs, targets, dp, training.batch_size)
    return pipeline.share(mean, training.batch_size, generator), None, loss


def _poisson_mean(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    dp: DPSGD,
    expected: int,
    params: Params | None = None,
) -> tuple[Params, Tensor]:
    """The clipped per-sample gradients of a Poisson batch summed and divided by its expected
    size (the mean when it holds exactly that many), and its mean loss. An empty batch gives
    zeros, whose noise is still released (a client that sent nothing would show its count),
    and no loss (NaN)."""
    if not len(inputs):
        source = params if params is not None else dict(model.named_parameters())
        return {name: torch.zeros_like(p) for name, p in source.items()}, torch.tensor(math.nan)
    per_sample, losses = per_sample_gradients_with_loss(model, inputs, targets, params=params)
    clipped = dp.clip(per_sample)
    return {name: g.sum(dim=0) / expected for name, g in clipped.items()}, losses.mean()


def _fedavg(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    pipeline: DefensePipeline,
    training: LocalTraining,
    generator: torch.Generator,
    buffers: Params,
    batches: Sequence[Tensor] | None = None,
) -> tuple[Params, Tensor]:
    n, batch_size = inputs.shape[0], training.batch_size
    start = {name: p.detach() for name, p in model.named_parameters()}
    params = dict(start)
    offsets = torch.arange(batch_size, device=inputs.device)
    dp = pipeline.find(DPSGD)
    losses = []
    for step in range(training.local_steps):
        index = (step * batch_size + offsets) % n if batches is None else batches[step]
        xb, yb = inputs[index], targets[index]
        if dp is not None and training.sampling == "poisson":
            # DP-SGD on this step's own Poisson batch (of any size, none included).
            mean, loss = _poisson_mean(model, xb, yb, dp, batch_size, params)
            gradient = dp.noise(mean, batch_size, generator)
        elif dp is None:
            gradient, loss = batch_gradient_with_loss(model, xb, yb, params=params, buffers=buffers)
        else:
            # DP-SGD: every local step clips per sample and adds noise to its own mean.
            per_sample, sample_losses = per_sample_gradients_with_loss(model, xb, yb, params=params)
            clipped = dp.clip(per_sample)
            mean = {name: g.mean(dim=0) for name, g in clipped.items()}
            gradient, loss = dp.noise(mean, batch_size, generator), sample_losses.mean()
        params = {name: p - training.learning_rate * gradient[name] for name, p in params.items()}
        losses.append(loss)
    delta = {name: params[name] - start[name] for name in start}
    # A step on an empty Poisson batch has no loss; a round of them all, none (NaN).
    loss = torch.stack(losses)
    return pipeline.share_delta(delta, generator), loss.nanmean() if batches else loss.mean()
