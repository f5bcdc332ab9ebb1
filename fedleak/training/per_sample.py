"""Per-sample (or per-group) gradients from one batched forward and backward, layer by layer.

Without BatchNorm the samples of a batch are independent, so the gradient of the summed
loss with respect to a layer's output holds each sample's own output gradient. One backward
pass to the layer outputs (which skips the batch weight gradients) then gives every
sample's parameter gradient from that layer's input and output gradient alone, and the
gradient of a group of consecutive samples (an inversion problem's dummy batch) is the sum
over the group:

- Linear: g_W[b] = sum over positions of dy[b] outer x[b]; g_bias[b] = sum of dy[b];
- Conv2d: g_W[b] = the weight gradient of sample b alone, all B at once as one grouped
  convolution (the batch as B groups);
- GroupNorm / LayerNorm: g_weight[b] = sum of dy[b] * x_hat[b] over the normalised
  positions, g_bias[b] = sum of dy[b] (x_hat recomputed from the saved input);
- Embedding: rows of g_W[b] accumulate dy[b] at the looked-up indices.

This costs little more than one batch gradient (the per-sample products have the FLOPs of
the batch weight gradient), where vmap over `grad` pays its batching rules on every op
(`benchmarks/bench_per_sample.py` prints both ratios). With `create_graph` the gradients stay
differentiable with respect to the inputs, which is how gradient inversion replays a batch
of independent dummy problems. Models with parameters outside these layers are not
`supported`; callers then use vmap.
"""

from __future__ import annotations

import weakref
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


# Per model, per (sample shape, dtype, device): whether the layer-wise rules are exact for it.
_EXACT: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], bool]] = (
    weakref.WeakKeyDictionary()
)


def layerwise_exact(model: nn.Module, sample: Tensor) -> bool:
    """Whether the layer-wise rules give this `supported` model's per-sample gradients for
    inputs like `sample`: every layer with parameters takes and returns the samples along the
    first dimension (a position table looked up at arange(L) does not, audit DK1), and every
    parameter is used only through its layer's calls (a weight read directly or also used
    tied elsewhere is not, DL1). A probe of one and two copies of `sample`'s first row tells,
    where shapes alone are fooled when L equals B; cached per model and sample shape."""
    key = (tuple(sample.shape[1:]), sample.dtype, sample.device)
    known = _EXACT.setdefault(model, {})
    if key not in known:
        first = sample[:1].detach()
        modes = {module: module.training for module in model.modules()}
        try:
            model.eval()  # no buffer changes, no dropout draws
            known[key] = _batch_first(model, first) and _gradients_add_up(model, first)
        finally:
            for module, training in modes.items():
                module.training = training
    return known[key]


@torch.no_grad()
def _batch_first(model: nn.Module, first: Tensor) -> bool:
    """Run `model` on 1 and 2 samples and read each layer's leading dimensions."""
    calls: list[tuple[int, int, int]] = []  # (samples fed, input's and output's first dims)
    samples = 0

    def record(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        leading = [t.shape[0] if t.dim() else 0 for t in (inputs[0], output)]
        calls.append((samples, *leading))

    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        for samples in (1, 2):
            model(torch.cat([first] * samples))
    finally:
        for handle in handles:
            handle.remove()
    return all(fed == seen_in == seen_out for fed, seen_in, seen_out in calls)


def _gradients_add_up(model: nn.Module, first: Tensor) -> bool:
    """Whether two samples' layer-wise gradients of their summed outputs add up to autograd's
    gradient of the whole: a parameter used outside its layer's calls is missing from them."""
    x = torch.cat([first, 0.5 * first if first.is_floating_point() else first])
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def summed(logits: Tensor, _targets: Tensor) -> Tensor:
        return logits.flatten(1).sum(dim=1)

    try:
        per_sample, _ = layerwise_gradients(model, params, buffers, x, x, summed)
    except (RuntimeError, ValueError):  # e.g. a layer's input that does not split by sample
        return False
    leaves = {name: p.requires_grad_() for name, p in params.items()}
    with torch.enable_grad():
        outputs = functional_call(model, (leaves, dict(buffers)), (x,))
        whole = torch.autograd.grad(outputs.sum(), list(leaves.values()), allow_unused=True)
    for ours, theirs in zip(per_sample.values(), whole, strict=True):
        expected = torch.zeros_like(ours[0]) if theirs is None else theirs
        scale = float(expected.abs().max()) + 1e-12
        if not torch.allclose(ours.sum(dim=0), expected, rtol=1e-4, atol=1e-5 * scale):
            return False
    return True


@dataclass
class _Record:
    """What one layer saw in the forward pass: its inputs and outputs, call by call."""

    module: nn.Module
    name: str
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


def _linear(m: nn.Linear, x: Tensor, dy: Tensor, groups: int) -> list[Tensor]:
    dy2 = dy.reshape(groups, -1, dy.shape[-1])
    grads = [torch.bmm(dy2.transpose(1, 2), x.reshape(groups, -1, x.shape[-1]))]
    if m.bias is not None:
        grads.append(dy2.sum(dim=1))
    return grads


def _conv2d(m: nn.Conv2d, x: Tensor, dy: Tensor, groups: int) -> list[Tensor]:
    # Each group as one group of a grouped weight-gradient convolution, its samples as that
    # convolution's batch: the G weight gradients come out side by side, summed within each
    # group (far faster than im2col and a batched product on CPUs).
    per = x.shape[0] // groups
    inputs = x.reshape(groups, per, *x.shape[1:]).transpose(0, 1).flatten(1, 2)
    outputs = dy.reshape(groups, per, *dy.shape[1:]).transpose(0, 1).flatten(1, 2)
    weight = m.weight
    grouped = torch.ops.aten.convolution_backward(
        outputs,
        inputs,
        weight.new_empty(groups * weight.shape[0], *weight.shape[1:]),
        None,
        list(m.stride),
        list(m.padding),
        list(m.dilation),
        False,
        [0, 0],
        groups,
        [False, True, False],
    )[1]
    grads = [grouped.reshape(groups, *weight.shape)]
    if m.bias is not None:
        grads.append(dy.sum(dim=(2, 3)).reshape(groups, per, -1).sum(dim=1))
    return grads


def _affine(
    normalised: Tensor, dy: Tensor, trailing: int, groups: int, m: nn.Module
) -> list[Tensor]:
    """Weight and bias gradients of an elementwise affine map after a normalisation: sums of
    dy * x_hat and of dy over the positions between the batch and the parameter's dims."""

    def per_group(t: Tensor) -> Tensor:
        t = t.reshape(groups, -1, *t.shape[t.dim() - trailing :])
        return t.sum(dim=1)

    grads = []
    if getattr(m, "weight", None) is not None:
        grads.append(per_group(dy * normalised))
    if getattr(m, "bias", None) is not None:
        grads.append(per_group(dy))
    return grads


def _group_norm(m: nn.GroupNorm, x: Tensor, dy: Tensor, groups: int) -> list[Tensor]:
    normalised = F.group_norm(x, m.num_groups, None, None, m.eps)
    # Parameters are per channel: move channels last so that positions can be summed.
    channels_last = [0, *range(2, x.dim()), 1]
    return _affine(normalised.permute(channels_last), dy.permute(channels_last), 1, groups, m)


def _layer_norm(m: nn.LayerNorm, x: Tensor, dy: Tensor, groups: int) -> list[Tensor]:
    normalised = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    return _affine(normalised, dy, len(m.normalized_shape), groups, m)


def _embedding(m: nn.Embedding, x: Tensor, dy: Tensor, groups: int) -> list[Tensor]:
    width = m.weight.shape[1]
    rows = dy.reshape(groups, -1, width)
    index = x.reshape(groups, -1, 1).expand(-1, -1, width)
    grad = torch.zeros(groups, *m.weight.shape, dtype=dy.dtype, device=dy.device)
    grad = grad.scatter_add(1, index, rows)
    if m.padding_idx is not None:
        keep = torch.ones(m.weight.shape[0], 1, dtype=dy.dtype, device=dy.device)
        keep[m.padding_idx] = 0
        grad = grad * keep
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


def layerwise_gradients(
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: Tensor,
    y: Tensor,
    loss_of: Callable[[Tensor, Tensor], Tensor],
    groups: int | None = None,
    create_graph: bool = False,
) -> tuple[Params, Tensor]:
    """The gradient of each group's summed loss (keyed as `params`, leading dim `groups`;
    default one group per sample) and the per-sample losses [B], for a `supported` model in
    the mode it is in. `loss_of(logits, y)` returns one loss per sample; groups are
    consecutive and equal. With `create_graph` the gradients are differentiable (with respect
    to `x` and to `params` where those require grad); without, they are detached."""
    groups = x.shape[0] if groups is None else groups
    if x.shape[0] % groups:
        raise ValueError(f"{x.shape[0]} samples do not split into {groups} equal groups")
    records: dict[nn.Module, _Record] = {}
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            records[module] = _Record(module, name)

    def save(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        record = records[module]
        record.inputs.append(inputs[0] if create_graph else inputs[0].detach())
        record.outputs.append(output)

    # Parameters as leaves that require grad, so that layer outputs carry a graph even for
    # integer inputs; the backward asks only for the outputs' gradients, so no batch weight
    # gradient is ever computed.
    leaves = {
        name: p if p.requires_grad else p.detach().requires_grad_() for name, p in params.items()
    }
    handles = [module.register_forward_hook(save) for module in records]
    try:
        with torch.enable_grad():
            logits = functional_call(model, (leaves, buffers), (x,))
            losses = loss_of(logits, y)
            outputs = [out for record in records.values() for out in record.outputs]
            grads = torch.autograd.grad(
                losses.sum(), outputs, allow_unused=True, create_graph=create_graph
            )
            gradients = _assemble(records, grads, leaves, groups, create_graph)
    finally:
        for handle in handles:
            handle.remove()
    return {name: gradients[name] for name in params}, losses.detach()


def _assemble(
    records: dict[nn.Module, _Record],
    grads: tuple[Tensor | None, ...],
    leaves: Params,
    groups: int,
    create_graph: bool,
) -> Params:
    """Each layer's parameter gradients from its saved inputs and output gradients."""
    gradients: Params = {}
    it = iter(grads)
    for module, record in records.items():
        prefix = f"{record.name}." if record.name else ""
        names = [n for n in ("weight", "bias") if getattr(module, n, None) is not None]
        summed: list[Tensor] | None = None
        for inputs, output in zip(record.inputs, record.outputs, strict=True):
            dy = next(it)
            dy = torch.zeros_like(output) if dy is None else dy
            parts = _rule(module)(module, inputs, dy if create_graph else dy.detach(), groups)
            if summed is not None:  # a layer called more than once: its uses add up
                parts = [a + b for a, b in zip(summed, parts, strict=True)]
            summed = parts
        if summed is None:  # a layer the forward pass never called: its gradients are zero
            summed = [
                leaves[prefix + key].new_zeros(groups, *leaves[prefix + key].shape) for key in names
            ]
        for key, grad in zip(names, summed, strict=True):
            shape = leaves[prefix + key].shape
            value = grad.reshape(groups, *shape)
            gradients[prefix + key] = value if create_graph else value.detach()
    return gradients
