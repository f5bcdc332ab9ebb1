"""Per-sample gradients from one batched forward and backward, layer by layer.

Without BatchNorm the samples of a batch are independent, so the gradient of the summed
loss with respect to a layer's output holds each sample's own output gradient. One backward
pass to the layer outputs (which skips the batch weight gradients) then gives every
sample's parameter gradient from that layer's input and output gradient alone:

- Linear: g_W[b] = sum over positions of dy[b] outer x[b]; g_bias[b] = sum of dy[b];
- Conv2d: g_W[b] = the weight gradient of sample b alone, all B at once as one grouped
  convolution (the batch as B groups);
- GroupNorm / LayerNorm: g_weight[b] = sum of dy[b] * x_hat[b] over the normalised
  positions, g_bias[b] = sum of dy[b] (x_hat recomputed from the saved input);
- Embedding: rows of g_W[b] accumulate dy[b] at the looked-up indices.

This costs little more than one batch gradient (the per-sample products have the FLOPs of
the batch weight gradient), where vmap over `grad` pays its batching rules on every op
(`benchmarks/bench_per_sample.py` prints both ratios). Models with parameters outside these
layers are not `supported`; the caller then uses vmap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]

_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


def supported(model: nn.Module) -> bool:
    """Whether every parameter belongs to exactly one layer handled here (convolutions
    ungrouped with zero padding, embeddings dense and unscaled)."""
    shared = len(list(model.named_parameters(remove_duplicate=False)))
    if shared != len(list(model.named_parameters())):
        return False  # tied weights
    for module in model.modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if not isinstance(module, _LAYERS):
            return False
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            return False
        if isinstance(module, nn.Embedding) and (
            module.sparse or module.scale_grad_by_freq or module.max_norm is not None
        ):
            return False
    return True


@dataclass
class _Record:
    """What one layer saw in the forward pass: its inputs and outputs, call by call."""

    module: nn.Module
    name: str
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


def _linear(m: nn.Linear, x: Tensor, dy: Tensor, w: Tensor, b: Tensor | None) -> list[Tensor]:
    dy2 = dy.reshape(dy.shape[0], -1, dy.shape[-1])
    x2 = x.reshape(x.shape[0], -1, x.shape[-1])
    grads = [torch.bmm(dy2.transpose(1, 2), x2)]
    if b is not None:
        grads.append(dy2.sum(dim=1))
    return grads


def _conv2d(m: nn.Conv2d, x: Tensor, dy: Tensor, w: Tensor, b: Tensor | None) -> list[Tensor]:
    # The batch as B groups of one sample: a grouped weight-gradient convolution returns the B
    # weight gradients side by side (much faster than im2col and a batched product on CPUs).
    batch, out_channels = dy.shape[0], dy.shape[1]
    grouped = torch.ops.aten.convolution_backward(
        dy.reshape(1, batch * out_channels, *dy.shape[2:]),
        x.reshape(1, batch * x.shape[1], *x.shape[2:]),
        w.new_empty(batch * out_channels, *w.shape[1:]),
        None,
        list(m.stride),
        list(m.padding),
        list(m.dilation),
        False,
        [0, 0],
        batch,
        [False, True, False],
    )[1]
    grads = [grouped.reshape(batch, *w.shape)]
    if b is not None:
        grads.append(dy.sum(dim=(2, 3)))
    return grads


def _group_norm(
    m: nn.GroupNorm, x: Tensor, dy: Tensor, w: Tensor, b: Tensor | None
) -> list[Tensor]:
    normalised = F.group_norm(x, m.num_groups, None, None, m.eps)
    dims = [d for d in range(2, x.dim())]
    grads = []
    if w is not None:
        grads.append((dy * normalised).sum(dim=dims) if dims else dy * normalised)
    if b is not None:
        grads.append(dy.sum(dim=dims) if dims else dy)
    return grads


def _layer_norm(
    m: nn.LayerNorm, x: Tensor, dy: Tensor, w: Tensor, b: Tensor | None
) -> list[Tensor]:
    normalised = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    dims = list(range(1, x.dim() - len(m.normalized_shape)))
    grads = []
    if w is not None:
        grads.append((dy * normalised).sum(dim=dims) if dims else dy * normalised)
    if b is not None:
        grads.append(dy.sum(dim=dims) if dims else dy)
    return grads


def _embedding(m: nn.Embedding, x: Tensor, dy: Tensor, w: Tensor, b: Tensor | None) -> list[Tensor]:
    batch = x.shape[0]
    grad = dy.new_zeros(batch, *w.shape)
    index = x.reshape(batch, -1, 1).expand(-1, -1, w.shape[1])
    grad.scatter_add_(1, index, dy.reshape(batch, -1, w.shape[1]))
    if m.padding_idx is not None:
        grad[:, m.padding_idx] = 0
    return [grad]


_RULES: dict[type, Callable[..., list[Tensor]]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
}


def _rule(module: nn.Module) -> Callable[..., list[Tensor]]:
    for kind, rule in _RULES.items():
        if isinstance(module, kind):
            return rule
    raise TypeError(f"no per-sample rule for {type(module).__name__}")


def layerwise_per_sample_gradients(
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: Tensor,
    y: Tensor,
    loss_of: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Params, Tensor]:
    """Each sample's gradient of its own loss (keyed as `params`, leading dim B) and the
    per-sample losses [B], for a `supported` model in the mode it is in; `loss_of(logits, y)`
    returns one loss per sample."""
    records: dict[nn.Module, _Record] = {}
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            records[module] = _Record(module, name)

    def save(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        record = records[module]
        record.inputs.append(inputs[0].detach())
        record.outputs.append(output)

    # Leaves that require grad, so that layer outputs carry a graph; the backward asks only
    # for the outputs' gradients, so no batch weight gradient is ever computed.
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    handles = [module.register_forward_hook(save) for module in records]
    try:
        with torch.enable_grad():
            logits = functional_call(model, (leaves, buffers), (x,))
            losses = loss_of(logits, y)
            outputs = [out for record in records.values() for out in record.outputs]
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    gradients: Params = {}
    it = iter(grads)
    for module, record in records.items():
        prefix = f"{record.name}." if record.name else ""
        names = [n for n, _ in module.named_parameters(recurse=False)]
        own = {n: params[prefix + n] for n in names}
        summed: list[Tensor] | None = None
        for inputs, output in zip(record.inputs, record.outputs, strict=True):
            dy = next(it)
            if dy is None:
                dy = torch.zeros_like(output)
            parts = _rule(module)(module, inputs, dy.detach(), own.get("weight"), own.get("bias"))
            summed = (
                parts if summed is None else [a + b for a, b in zip(summed, parts, strict=True)]
            )
        batch = x.shape[0]
        for key, grad in zip(_ordered(names), summed or [], strict=True):
            gradients[prefix + key] = grad.reshape(batch, *own[key].shape)
    ordered = {name: gradients[name] for name in params}
    return ordered, losses.detach()


def _ordered(names: list[str]) -> list[str]:
    """The rules return (weight, bias) for whichever of the two exist."""
    return [n for n in ("weight", "bias") if n in names]
