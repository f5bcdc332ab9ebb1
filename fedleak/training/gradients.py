"""A client's gradients: per-sample (torch.func, vmap over grad), batch, and BatchNorm statistics.

Every function runs the model in training mode (restoring the caller's mode afterwards) and
leaves the model untouched: parameters are read, never written, and BatchNorm running
statistics are updated on copies of the buffers, which are dropped unless the caller passes
its own (`buffers=`, see `buffer_copies`) to carry them through local training. Gradients come
back detached, keyed by `named_parameters()` names in that order.

Labels are int64 class indices [B] or soft targets [B, C] (mixed labels of an input encoding);
the loss is the cross-entropy, against the soft target distribution in the second case. Token
sequences [B, L] are their own targets; `fedleak.training.loss` holds both tasks' loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedleak.models import has_batchnorm
from fedleak.training.chain import ChainUnsupported, model_chain
from fedleak.training.loss import check_targets, per_sample_task_loss, task_loss
from fedleak.training.per_sample import layerwise_exact, layerwise_gradients, supported

Params = dict[str, Tensor]

_BATCHNORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_GROUPNORM_VARIANTS = "resnet20 -> resnet20-gn, resnet18 -> resnet18-gn, convnet-bn -> convnet"


class PerSampleRefused(ValueError):
    """Per-sample gradients were asked of a model whose BatchNorm couples the samples."""


@contextmanager
def _training(model: nn.Module) -> Iterator[None]:
    """Train mode for the block; afterwards the caller's mode, parameters and buffers.

    torch's `functional_call` leaves plain tensors in place of the parameters of a module
    reachable under two attribute names (`self.b = self.a`): the caller's model would stop
    training. The registered tensors are put back as they were."""
    held = [(m, m.training, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, training, parameters, buffers in held:
            module.training = training  # each its own: a frozen part stays in eval
            module._parameters.update(parameters)
            module._buffers.update(buffers)


def _parameters(model: nn.Module, params: Params | None) -> Params:
    if params is not None:
        return params
    return {name: p.detach() for name, p in model.named_parameters()}


def buffer_copies(model: nn.Module) -> Params:
    """Copies of the model's buffers (BatchNorm running statistics and batch counts), which
    train-mode forwards update in place instead of the model's own."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def refuse_batchnorm(model: nn.Module) -> None:
    """Raise `PerSampleRefused` when the model has BatchNorm (samples are not independent)."""
    if has_batchnorm(model):
        raise PerSampleRefused(
            f"per-sample gradients are undefined for {type(model).__name__} with BatchNorm "
            f"(batch statistics mix the samples); use its GroupNorm or BatchNorm-free variant "
            f"({_GROUPNORM_VARIANTS})"
        )


def per_sample_gradients_with_loss(
    model: nn.Module, x: Tensor, y: Tensor, *, params: Params | None = None
) -> tuple[Params, Tensor]:
    """Each sample's gradient of its own loss (leading dim B) and the losses [B], in one
    vectorised call; `params` replaces the model's parameters (e.g. during local training).

    A graph of plain layers (`fedleak.training.chain`: sigmoid LeNet, the MLP, ConvNet, the
    ResNets with GroupNorm) on images gets them written out, each sample a problem of its
    own; other models of the layers `fedleak.training.per_sample` knows from one batched
    backward; any other model through vmap over `grad`."""
    refuse_batchnorm(model)
    check_targets(x, y)
    chain = model_chain(model) if x.is_floating_point() else None
    if chain is not None:
        try:
            with torch.no_grad():
                weights = {name: p.detach() for name, p in _parameters(model, params).items()}
                grads, run = chain.gradient(x, y, x.shape[0], weights)
                losses = F.cross_entropy(run.logits, y, reduction="none")
            return dict(zip(chain.names, grads, strict=True)), losses
        except ChainUnsupported:
            pass  # e.g. inputs of another shape than the chain's layers take
    buffers = buffer_copies(model)
    # Token ids: vmap over the task loss; a layer fed other than the batch: vmap too.
    if supported(model) and x.is_floating_point() and layerwise_exact(model, x):
        with _training(model):
            grads, losses = layerwise_gradients(
                model, _parameters(model, params), buffers, x, y, per_sample_task_loss
            )
        return grads, losses
    return _vmapped(model, x, y, params, buffers)


def _vmapped(
    model: nn.Module, x: Tensor, y: Tensor, params: Params | None, buffers: Params
) -> tuple[Params, Tensor]:
    def sample_loss(p: Params, xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        loss = task_loss(logits, yi.unsqueeze(0))
        return loss, loss.detach()

    per_sample = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0))
    with _training(model):
        grads, losses = per_sample(_parameters(model, params), x, y)
    return {name: g.detach() for name, g in grads.items()}, losses


def vmap_per_sample_gradients_with_loss(
    model: nn.Module, x: Tensor, y: Tensor, *, params: Params | None = None
) -> tuple[Params, Tensor]:
    """Per-sample gradients through vmap over `grad`, for any model without BatchNorm (the
    general path, and the reference the layer-wise path is checked against)."""
    refuse_batchnorm(model)
    check_targets(x, y)
    return _vmapped(model, x, y, params, buffer_copies(model))


def per_sample_gradients(
    model: nn.Module, x: Tensor, y: Tensor, *, params: Params | None = None
) -> Params:
    """Per-sample gradients (leading dim B) via torch.func; `PerSampleRefused` with BatchNorm."""
    return per_sample_gradients_with_loss(model, x, y, params=params)[0]


def batch_gradient_with_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    params: Params | None = None,
    buffers: Params | None = None,
) -> tuple[Params, Tensor]:
    """The gradient of the mean loss over the batch and that loss; BatchNorm uses the batch's
    own statistics (train mode), so this is the true batch gradient of BatchNorm models.
    `buffers` (from `buffer_copies`) receive the running-statistics update of this forward."""
    check_targets(x, y)
    leaves = {name: p.detach().requires_grad_() for name, p in _parameters(model, params).items()}
    state = buffer_copies(model) if buffers is None else buffers
    with _training(model), torch.enable_grad():
        logits = functional_call(model, (leaves, state), (x,))
        loss = task_loss(logits, y)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(leaves.items(), grads, strict=True)
    }, loss.detach()


def batch_gradient(
    model: nn.Module, x: Tensor, y: Tensor, *, params: Params | None = None
) -> Params:
    """The gradient of the mean cross-entropy over the batch, by ordinary autograd."""
    return batch_gradient_with_loss(model, x, y, params=params)[0]


def batchnorm_statistics(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """The batch mean and (biased, as BatchNorm normalises with) variance of every BatchNorm
    layer's input in train mode, keyed `<module>.mean` and `<module>.var`; {} without BatchNorm."""
    stats: dict[str, Tensor] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def record(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            features = inputs[0]
            dims = [d for d in range(features.dim()) if d != 1]
            stats[f"{name}.mean"] = features.mean(dim=dims).detach()
            stats[f"{name}.var"] = features.var(dim=dims, unbiased=False).detach()

        return record

    handles = [
        module.register_forward_pre_hook(recorder(name))
        for name, module in model.named_modules()
        if isinstance(module, _BATCHNORM_LAYERS)
    ]
    try:
        with _training(model), torch.no_grad():
            functional_call(model, (_parameters(model, None), buffer_copies(model)), (x,))
    finally:
        for handle in handles:
            handle.remove()
    return stats
