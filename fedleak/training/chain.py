"""The client's gradient of a graph of plain layers, and its derivative, written out layer by layer.

A model made of Conv2d, Linear, GroupNorm, flatten, max and average pooling, elementwise
activations (sigmoid, tanh, ReLU), strided subsampling, zero padding and residual sums (the
CIFAR ResNets with GroupNorm, sigmoid LeNet, ConvNet), and BatchNorm where a module names its
own link (the attacks' replay of the client's training step, whose input statistics are
outputs too, for the BatchNorm prior), fitted by mean cross-entropy on class indices or soft
labels (FedSGD), has a parameter gradient and a derivative of any loss of that gradient with
respect to the input (and to soft labels) in closed form, layer by layer.
An inversion iteration needs exactly these two, and computing them directly skips autograd's
double-backward graph (hundreds of small recorded nodes per iteration on the sigmoid LeNet,
about a thousand multiplies in GroupNorm's double backward on ResNet-20) and merges the two
convolutions that each layer's derivative runs on the same input shape into one call of
twice the channels (docs/performance.md, "The layer chain").

Notation for layer l, mapping h_in to h_out: the first backward sends g_out (the loss's
gradient at h_out) to g_in and to the parameter gradient P_l. Given v_l, the outer loss's
gradient with respect to P_l, the derivative flows up the graph (`up`: the adjoint of g_out,
from v_l and the adjoint of g_in) and then down it (`down`: the adjoint of h_in, from the
adjoint of h_out and the terms in which the first backward read h_in). A layer's input is the
sum of the outputs it reads, so a residual sum costs no layer of its own.

T independent problems of b samples each are stacked problem-major ([T * b, ...]); their
parameter gradients [T, ...] come out side by side, per problem, as grouped convolutions and
batched products (`fedleak.training.per_sample` does the same for the first derivative).
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

_ACTIVATIONS = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.ReLU: "relu",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    torch.relu: "relu",
    F.relu: "relu",
    F.sigmoid: "sigmoid",
    F.tanh: "tanh",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "relu": "relu",
}


Statistics = list[tuple[Tensor, Tensor]]


class ChainUnsupported(Exception):
    """The model or the inputs are outside what the written-out chain covers."""


@dataclass
class _State:
    """One layer's tensors from the forward pass and the first backward."""

    h_in: Tensor
    h_out: Tensor
    params: list[Tensor]  # the layer's own parameters for this pass (weight, bias)
    g_out: Tensor | None = None
    gbar_in: Tensor | None = None  # the adjoint of g_in, set on the way up
    # Tensors derived once per iteration and read by later passes (max pooling's indices,
    # stacked problems laid out for grouped convolutions).
    derived: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _Pass:
    """Everything the derivative needs: per-layer states, the softmax, the stack's shape."""

    states: list[_State]
    logits: Tensor
    probabilities: Tensor
    problems: int
    samples: int
    mass: Tensor | None  # each soft label's total [N, 1] (None for class indices)
    statistics: Statistics  # each BatchNorm input's (mean, var) [T, C]


def _grouped(t: Tensor, problems: int, layout: torch.memory_format) -> Tensor:
    """[T * b, C, ...] problem-major as [b, T * C, ...]: each problem's channels as one group."""
    samples = t.shape[0] // problems
    out = t.reshape(problems, samples, *t.shape[1:]).transpose(0, 1).flatten(1, 2)
    return out.contiguous(memory_format=layout)


def _ungrouped(t: Tensor, problems: int) -> Tensor:
    """The inverse of `_grouped`."""
    samples = t.shape[0]
    return t.reshape(samples, problems, -1, *t.shape[2:]).transpose(0, 1).flatten(0, 1)


class _Layer:
    """One link of the chain; `parameters` names its parameters as the model does."""

    parameters: tuple[str, ...] = ()

    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        """h_out; what later passes need beyond h_in and h_out goes into `derived`."""
        raise NotImplementedError

    def backward(
        self, state: _State, problems: int, need_input: bool
    ) -> tuple[Tensor | None, list[Tensor]]:
        """(g_in or None, the parameter gradients [T, ...]) from `state.g_out`."""
        raise NotImplementedError

    def up(self, state: _State, v: list[Tensor], problems: int) -> Tensor | None:
        """The adjoint of g_out (None where it is zero)."""
        raise NotImplementedError

    def down(self, state: _State, hbar_out: Tensor, v: list[Tensor], problems: int) -> Tensor:
        """The adjoint of h_in."""
        raise NotImplementedError


class _Conv(_Layer):
    def __init__(self, module: nn.Conv2d, prefix: str) -> None:
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ChainUnsupported("grouped, padded-mode or string-padded convolution")
        self.has_bias = module.bias is not None
        # Stacked problems' grouped convolutions: oneDNN's kernels for few channels per group
        # run 2-3x faster channels-last, for more slower (a round of 16 targets, ms per
        # iteration, channels-last / not: sigmoid LeNet's 12 channels 7.5-7.6 / 7.8-8.0,
        # ConvNet's 32-128 channels 188-194 / 129-135; ResNet-20-GN's per-sample gradients
        # of 64 samples, 16-64 channels: 398-400 / 279-284 ms; docs/performance.md).
        few = max(module.in_channels, module.out_channels) <= 12
        self.layout = torch.channels_last if few else torch.contiguous_format
        self.stride, self.padding = list(module.stride), list(module.padding)
        self.dilation = list(module.dilation)
        self.parameters = (f"{prefix}weight",) + ((f"{prefix}bias",) if self.has_bias else ())

    def _conv(self, h: Tensor, weight: Tensor, bias: Tensor | None, groups: int = 1) -> Tensor:
        return F.conv2d(h, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _backward(
        self, g: Tensor, h: Tensor, weight: Tensor, groups: int, mask: list[bool]
    ) -> tuple[Tensor, Tensor, Tensor]:
        # The bias gradient is asked for only with the layer's own weight (its sizes).
        bias_sizes = [weight.shape[0]] if mask[2] else None
        return torch.ops.aten.convolution_backward(
            g,
            h,
            weight,
            bias_sizes,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0, 0],
            groups,
            mask,
        )

    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        if h.dim() != 4:
            raise ChainUnsupported("a convolution of a non-image input")
        return self._conv(h, params[0], params[1] if self.has_bias else None)

    def _laid_out(
        self, state: _State, problems: int, v: list[Tensor] | None = None
    ) -> dict[str, Tensor]:
        """h_in and g_out (and v_W) of stacked problems as grouped convolutions take them."""
        cache = state.derived
        if "h" not in cache:
            assert state.g_out is not None
            cache["h"] = _grouped(state.h_in, problems, self.layout)
            cache["g"] = _grouped(state.g_out, problems, self.layout)
        if v is not None and "v" not in cache:
            cache["v"] = v[0].flatten(0, 1).contiguous(memory_format=self.layout)
        return cache

    def backward(
        self, state: _State, problems: int, need_input: bool
    ) -> tuple[Tensor | None, list[Tensor]]:
        g, h, weight = state.g_out, state.h_in, state.params[0]
        assert g is not None
        bias = self.has_bias
        if problems == 1:
            g_in, g_w, g_b = self._backward(g, h, weight, 1, [need_input, True, bias])
            grads = [g_w.unsqueeze(0)] + ([g_b.unsqueeze(0)] if bias else [])
            return g_in, grads
        # Each problem's weight gradient as one group of a grouped convolution.
        stacked = weight.new_empty(problems * weight.shape[0], *weight.shape[1:])
        laid = self._laid_out(state, problems)
        g_w = self._backward(laid["g"], laid["h"], stacked, problems, [False, True, False])[1]
        grads = [g_w.reshape(problems, *weight.shape)]
        if bias:
            grads.append(g.sum(dim=(2, 3)).reshape(problems, -1, g.shape[1]).sum(dim=1))
        g_in = self._backward(g, h, weight, 1, [True, False, False])[0] if need_input else None
        return g_in, grads

    def _vb(self, v: list[Tensor], problems: int, like: Tensor) -> Tensor | None:
        if not self.has_bias:
            return None
        samples = like.shape[0] // problems
        return v[1].repeat_interleave(samples, dim=0).reshape(like.shape[0], -1, 1, 1)

    def up(self, state: _State, v: list[Tensor], problems: int) -> Tensor | None:
        # g_out enters P (the weight gradient, bilinear in h_in and g_out) and g_in (the
        # transposed convolution of g_out): the adjoint is conv(h_in, v_W) + v_b + conv(gbar_in, W).
        h, gbar_in, weight = state.h_in, state.gbar_in, state.params[0]
        if problems == 1:
            vb = v[1][0] if self.has_bias else None
            if gbar_in is None:
                return self._conv(h, v[0][0], vb)
            both = torch.cat([h, gbar_in], dim=1)
            return self._conv(both, torch.cat([v[0][0], weight], dim=1), vb)
        laid = self._laid_out(state, problems, v)
        out = _ungrouped(self._conv(laid["h"], laid["v"], None, problems), problems)
        if gbar_in is not None:
            out = out + self._conv(gbar_in, weight, None)
        vb = self._vb(v, problems, out)
        return out if vb is None else out + vb

    def down(self, state: _State, hbar_out: Tensor, v: list[Tensor], problems: int) -> Tensor:
        # h_in enters the forward pass (transposed convolution of hbar_out with W) and P
        # (transposed convolution of g_out with v_W).
        g, h, weight = state.g_out, state.h_in, state.params[0]
        assert g is not None
        if problems == 1:
            both = torch.cat([hbar_out, g], dim=1)
            weights = torch.cat([weight, v[0][0]], dim=0)
            return self._backward(both, h, weights, 1, [True, False, False])[0]
        shared = self._backward(hbar_out, h, weight, 1, [True, False, False])[0]
        laid = self._laid_out(state, problems, v)
        own = self._backward(laid["g"], laid["h"], laid["v"], problems, [True, False, False])[0]
        return shared + _ungrouped(own, problems)


class _Linear(_Layer):
    def __init__(self, module: nn.Linear, prefix: str) -> None:
        self.has_bias = module.bias is not None
        self.parameters = (f"{prefix}weight",) + ((f"{prefix}bias",) if self.has_bias else ())

    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        if h.dim() != 2:
            raise ChainUnsupported("a linear layer on more than one dimension")
        return F.linear(h, params[0], params[1] if self.has_bias else None)

    def backward(
        self, state: _State, problems: int, need_input: bool
    ) -> tuple[Tensor | None, list[Tensor]]:
        g, h = state.g_out, state.h_in
        assert g is not None
        g3, h3 = g.reshape(problems, -1, g.shape[1]), h.reshape(problems, -1, h.shape[1])
        grads = [torch.bmm(g3.transpose(1, 2), h3)]
        if self.has_bias:
            grads.append(g3.sum(dim=1))
        return (g @ state.params[0] if need_input else None), grads

    def up(self, state: _State, v: list[Tensor], problems: int) -> Tensor | None:
        h, gbar_in = state.h_in, state.gbar_in
        h3 = h.reshape(problems, -1, h.shape[1])
        out = torch.bmm(h3, v[0].transpose(1, 2))
        if self.has_bias:
            out = out + v[1].unsqueeze(1)
        out = out.flatten(0, 1)
        return out if gbar_in is None else torch.addmm(out, gbar_in, state.params[0].t())

    def down(self, state: _State, hbar_out: Tensor, v: list[Tensor], problems: int) -> Tensor:
        g = state.g_out
        assert g is not None
        own = torch.bmm(g.reshape(problems, -1, g.shape[1]), v[0]).flatten(0, 1)
        return torch.addmm(own, hbar_out, state.params[0])


class _Activation(_Layer):
    """An elementwise activation, its slope applied by torch's fused backward kernels (one
    pass over the gradient and the output, no slope tensor)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        return getattr(torch, self.kind)(h)

    def _slope_times(self, t: Tensor, out: Tensor) -> Tensor:
        """t times the activation's derivative, read from its output."""
        if self.kind == "sigmoid":
            return torch.ops.aten.sigmoid_backward(t, out)
        if self.kind == "tanh":
            return torch.ops.aten.tanh_backward(t, out)
        return torch.ops.aten.threshold_backward(t, out, 0)

    def backward(
        self, state: _State, problems: int, need_input: bool
    ) -> tuple[Tensor | None, list[Tensor]]:
        assert state.g_out is not None
        return self._slope_times(state.g_out, state.h_out), []

    def up(self, state: _State, v: list[Tensor], problems: int) -> Tensor | None:
        if state.gbar_in is None:
            return None
        return self._slope_times(state.gbar_in, state.h_out)

    def down(self, state: _State, hbar_out: Tensor, v: list[Tensor], problems: int) -> Tensor:
        out, gbar_in = state.h_out, state.gbar_in
        if self.kind == "relu" or gbar_in is None:  # ReLU's second derivative vanishes a.e.
            return self._slope_times(hbar_out, out)
        assert state.g_out is not None
        # The second derivative over the first, from the output: 1 - 2a (sigmoid), -2a (tanh).
        ratio = 1 - 2 * out if self.kind == "sigmoid" else -2 * out
        return self._slope_times(torch.addcmul(hbar_out, gbar_in * state.g_out, ratio), out)


class _Reshaping(_Layer):
    """A map linear in its input once the forward pass has fixed its pattern (flatten, average
    and max pooling): the first backward and the way down apply its transpose, the way up
    applies the map itself to the adjoint of g_in; it has no second derivative."""

    def transpose(self, g: Tensor, state: _State) -> Tensor:
        raise NotImplementedError

    def again(self, t: Tensor, state: _State) -> Tensor:
        """The map, with the pattern of the forward pass, applied to another input."""
        raise NotImplementedError

    def backward(
        self, state: _State, problems: int, need_input: bool
    ) -> tuple[Tensor | None, list[Tensor]]:
        assert state.g_out is not None
        return self.transpose(state.g_out, state), []

    def up(self, state: _State, v: list[Tensor], problems: int) -> Tensor | None:
        return None if state.gbar_in is None else self.again(state.gbar_in, state)

    def down(self, state: _State, hbar_out: Tensor, v: list[Tensor], problems: int) -> Tensor:
        return self.transpose(hbar_out, state)


class _Flatten(_Reshaping):
    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        return h.flatten(1)

    def transpose(self, g: Tensor, state: _State) -> Tensor:
        return g.reshape(state.h_in.shape)

    def again(self, t: Tensor, state: _State) -> Tensor:
        return t.flatten(1)


class _MaxPool(_Reshaping):
    def __init__(self, module: nn.MaxPool2d) -> None:
        self.module = module

    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        m = self.module
        if h.dim() != 4:
            raise ChainUnsupported("max pooling of a non-image input")
        out, derived["indices"] = F.max_pool2d(
            h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
        )
        return out

    def transpose(self, g: Tensor, state: _State) -> Tensor:
        m = self.module
        return torch.ops.aten.max_pool2d_with_indices_backward(
            g,
            state.h_in,
            _pair(m.kernel_size),
            _pair(m.stride or m.kernel_size),
            _pair(m.padding),
            _pair(m.dilation),
            m.ceil_mode,
            state.derived["indices"],
        )

    def again(self, t: Tensor, state: _State) -> Tensor:
        indices = state.derived["indices"]
        return t.flatten(2).gather(2, indices.flatten(2)).view_as(indices)


class _AvgPool(_Reshaping):
    def __init__(self, module: nn.AvgPool2d | nn.AdaptiveAvgPool2d) -> None:
        self.module = module

    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        if h.dim() != 4:
            raise ChainUnsupported("average pooling of a non-image input")
        return self.module(h)

    def again(self, t: Tensor, state: _State) -> Tensor:
        return self.module(t)

    def transpose(self, g: Tensor, state: _State) -> Tensor:
        m = self.module
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return torch.ops.aten._adaptive_avg_pool2d_backward(g, state.h_in)
        return torch.ops.aten.avg_pool2d_backward(
            g,
            state.h_in,
            _pair(m.kernel_size),
            _pair(m.stride or m.kernel_size),
            _pair(m.padding),
            m.ceil_mode,
            m.count_include_pad,
            m.divisor_override,
        )


def _per_row(values: Tensor, problems: int, like: Tensor) -> Tensor:
    """Per-problem values [T, C] broadcastable against stacked rows `like` [T * b, C, ...]."""
    trailing = [1] * (like.dim() - 2)
    if problems == 1:
        return values.reshape(1, values.shape[1], *trailing)
    rows = values.repeat_interleave(like.shape[0] // problems, dim=0)
    return rows.reshape(like.shape[0], values.shape[1], *trailing)


class _GroupNorm(_Layer):
    """GroupNorm, y = gamma * xhat + beta with xhat the input normalised per sample and group.

    Its first backward is g_in = L(gamma * g_out), where L(u) = r * (u - mean(u) - xhat *
    mean(u * xhat)) per sample and group (r the reciprocal standard deviation) is torch's own
    group-norm backward without a weight, and L is its own adjoint: the way up applies it to
    the adjoint of g_in, the way down to the adjoint of xhat."""

    def __init__(self, groups: int, eps: float, affine: bool, prefix: str) -> None:
        self.groups, self.eps, self.affine = groups, eps, affine
        self.parameters = (f"{prefix}weight", f"{prefix}bias") if affine else ()

    def _native_backward(
        self,
        u: Tensor,
        state: _State,
        weight: Tensor | None,
        mask: list[bool],
        samples_apart: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """torch's group-norm backward of `u` at this layer's input: (L(weight * u), the
        weight's and the bias's gradients), as `mask` asks. Its weight and bias gradients are
        summed over the batch, or with `samples_apart` each sample's [N, C]: the N samples' C
        channels then enter as N * C channels of one sample (the same groups), so each
        sample's sums come out of the pass that computes L, with no products and sums of the
        stacked tensors beside the kernel (ResNet-20-GN's per-sample gradients of 64 samples:
        31 -> 18 ms in GroupNorm's backward)."""
        derived, (n, c) = state.derived, u.shape[:2]
        h, mean, rstd, groups = state.h_in, derived["mean"], derived["rstd"], self.groups
        shape = u.shape
        if samples_apart:
            flat = (1, n * c, -1)
            u, h, mean, rstd = u.reshape(flat), h.reshape(flat), mean.view(1, -1), rstd.view(1, -1)
            weight = None if weight is None else weight.repeat(n)
            n, c, groups = 1, n * c, n * groups
        size = (n, c, math.prod(u.shape[2:]), groups, mask)
        out, g_w, g_b = torch.ops.aten.native_group_norm_backward(u, h, mean, rstd, weight, *size)
        if samples_apart:
            rows = (shape[0], shape[1])
            out = None if out is None else out.view(shape)
            g_w = None if g_w is None else g_w.view(rows)
            g_b = None if g_b is None else g_b.view(rows)
        return out, g_w, g_b

    def _project(self, u: Tensor, state: _State, weight: Tensor | None = None) -> Tensor:
        """L(weight * u) (L(u) without a weight)."""
        return self._native_backward(u, state, weight, [True, False, False])[0]

    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        if h.dim() < 3 or h.shape[0] == 0:
            raise ChainUnsupported("group normalisation of an input without positions")
        n, c = h.shape[:2]
        weight, bias = params if self.affine else (None, None)
        # torch's own kernel for the output, so that the pass computes the module's bits (a
        # ReLU input a rounding away from zero then falls on the same side as for the client).
        out, derived["mean"], derived["rstd"] = torch.native_group_norm(
            h, weight, bias, n, c, math.prod(h.shape[2:]), self.groups, self.eps
        )
        if not self.affine:
            derived["xhat"] = out
            return out
        derived["gamma"] = params[0].view(1, c, *([1] * (h.dim() - 2)))
        return out

    def _xhat(self, state: _State) -> Tensor:
        """The normalised input, which only the derivative reads: computed on its first
        use, so that a gradient alone (a client's per-sample gradients) runs one kernel."""
        derived = state.derived
        if "xhat" not in derived:
            h = state.h_in
            n, c = h.shape[:2]
            size = (n, c, math.prod(h.shape[2:]), self.groups, self.eps)
            derived["xhat"] = torch.native_group_norm(h, None, None, *size)[0]
        return derived["xhat"]

    def backward(
        self, state: _State, problems: int, need_input: bool
    ) -> tuple[Tensor | None, list[Tensor]]:
        g, derived = state.g_out, state.derived
        assert g is not None
        weight = state.params[0] if self.affine else None
        grads: list[Tensor] = []
        if self.affine and problems == 1:
            mask = [need_input, True, True]
            g_in, g_w, g_b = self._native_backward(g, state, weight, mask)
            grads = [g_w.unsqueeze(0), g_b.unsqueeze(0)]
        elif self.affine:
            mask = [need_input, True, True]
            g_in, g_w, g_b = self._native_backward(g, state, weight, mask, samples_apart=True)
            # Each problem's sums over its samples.
            grads = [t.view(problems, -1, t.shape[1]).sum(dim=1) for t in (g_w, g_b)]
        else:
            g_in = self._project(g, state, weight) if need_input else None
        if g_in is not None:
            derived["g_in"] = g_in
        return g_in, grads

    def up(self, state: _State, v: list[Tensor], problems: int) -> Tensor | None:
        # g_out enters the parameter gradients (sums of g_out * xhat and of g_out) and g_in.
        derived, gbar_in = state.derived, state.gbar_in
        xhat = self._xhat(state)
        out = None
        if self.affine:
            beta_bar, gamma_bar = _per_row(v[1], problems, xhat), _per_row(v[0], problems, xhat)
            out = torch.addcmul(beta_bar, xhat, gamma_bar)
        if gbar_in is None:
            return out
        derived["L_gbar_in"] = back = self._project(gbar_in, state)  # the way down reads it
        return back if out is None else torch.addcmul(out, back, derived["gamma"])

    def down(self, state: _State, hbar_out: Tensor, v: list[Tensor], problems: int) -> Tensor:
        # h_in enters through xhat (in y, in the weight's gradient and in g_in) and through r
        # (in g_in). With u = gamma * g_out and a the adjoint of g_in, g_in = r * (u - mean(u)
        # - xhat * mean(u * xhat)) contributes -r * (a * mean(u * xhat) + u * mean(a * xhat))
        # to the adjoint of xhat at fixed r, which L maps to -r * (mean(u * xhat) * L(a) +
        # mean(a * xhat) * g_in) (L is linear per group, L(u) = g_in), and through r (d r / d h
        # = -r^2 xhat / M) -r * mean(a * g_in) * xhat.
        g, gbar_in, derived = state.g_out, state.gbar_in, state.derived
        assert g is not None
        xhat = self._xhat(state)
        xhat_bar = hbar_out
        if self.affine:
            xhat_bar = torch.addcmul(hbar_out * derived["gamma"], g, _per_row(v[0], problems, g))
        out = self._project(xhat_bar, state)
        if gbar_in is None:
            return out
        shape = (g.shape[0], self.groups, -1)  # one row per sample and group
        a, x3, g_in = gbar_in.reshape(shape), xhat.reshape(shape), derived["g_in"].reshape(shape)
        u = g * derived["gamma"] if self.affine else g
        # The group sums of u * xhat, a * xhat and a * g_in (the means times M).
        u_x = torch.linalg.vecdot(u.reshape(shape), x3).unsqueeze(2)
        a_x = torch.linalg.vecdot(a, x3).unsqueeze(2)
        a_g = torch.linalg.vecdot(a, g_in).unsqueeze(2)
        terms = derived["L_gbar_in"].reshape(shape) * u_x
        terms = torch.addcmul(terms, g_in, a_x)
        terms = torch.addcmul(terms, x3, a_g)
        r = derived["rstd"].unsqueeze(2)
        out = torch.addcmul(out.reshape(shape), terms, r, value=-1.0 / x3.shape[2])
        return out.reshape(g.shape)


def _per_problem(t: Tensor, problems: int) -> Tensor:
    """Stacked rows [T * b, C, ...] as [T, C, b * positions]: each problem one sample."""
    samples, channels = t.shape[0] // problems, t.shape[1]
    if samples == 1:
        return t.reshape(problems, channels, -1)
    return (
        t.reshape(problems, samples, channels, -1).transpose(1, 2).reshape(problems, channels, -1)
    )


def _stacked(t: Tensor, like: Tensor) -> Tensor:
    """The inverse of `_per_problem`, in the shape of `like`."""
    problems, channels = t.shape[:2]
    samples = like.shape[0] // problems
    if samples == 1:
        return t.reshape(like.shape)
    return t.reshape(problems, channels, samples, -1).transpose(1, 2).reshape(like.shape)


class _BatchNorm(_Layer):
    """BatchNorm in a client's training step, each stacked problem's samples one batch:
    normalised with their own statistics per channel (`infer`: a GroupNorm of one group per
    channel over the problem's samples and positions, each problem laid out as one sample),
    or with fixed running statistics (`proxy`: an affine map per channel). Either way each
    problem's input mean and biased variance [T, C] leave the pass (the BatchNorm prior's
    input), and their adjoints join the way down."""

    def __init__(
        self, mode: str, eps: float, running: tuple[Tensor, Tensor], affine: bool, prefix: str
    ) -> None:
        self.mode = mode
        self.eps = eps
        self.affine = affine
        # Proxy mode's fixed statistics: the running mean and 1 / sqrt(running var + eps).
        self.shift, self.inverse = running[0], torch.rsqrt(running[1] + eps)
        self.parameters = (f"{prefix}weight", f"{prefix}bias") if affine else ()
        # Infer mode: one group per channel, each problem one sample; proxy mode's map has the
        # per-channel factor gamma / sqrt(running var + eps) (`derived["scale"]`).
        self.norm = _GroupNorm(running[0].numel(), eps, affine, prefix)

    def _inner(self, state: _State, problems: int) -> _State:
        """The state as the infer mode's GroupNorm sees it (one sample per problem)."""
        derived = state.derived
        if "g_p" not in derived and state.g_out is not None:
            derived["g_p"] = _per_problem(state.g_out, problems)
        if "gbar_p" not in derived and state.gbar_in is not None:
            derived["gbar_p"] = _per_problem(state.gbar_in, problems)  # set on the way up
        g_p, gbar_p = derived.get("g_p"), derived.get("gbar_p")
        return _State(derived["h_p"], state.h_out, state.params, g_p, gbar_p, derived)

    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        if h.dim() < 2 or h.shape[0] % problems:
            raise ChainUnsupported("batch normalisation of an input without channels")
        h_p = derived["h_p"] = _per_problem(h, problems)
        if self.mode == "infer":
            out = self.norm.forward(h_p, params, derived, problems)
            # The statistics the normalisation just computed: var = 1 / rstd^2 - eps.
            derived["batch_mean"] = derived["mean"]
            derived["batch_var"] = derived["rstd"].pow(-2) - self.eps
            return _stacked(out, h)
        derived["batch_var"], derived["batch_mean"] = torch.var_mean(h_p, dim=2, correction=0)
        trailing = [1] * (h.dim() - 2)
        inverse = self.inverse.view(1, -1, *trailing)
        xhat = derived["xhat"] = (h - self.shift.view(1, -1, *trailing)) * inverse
        derived["inverse"] = inverse
        if not self.affine:
            derived["scale"] = inverse
            return xhat
        gamma = params[0].view(1, -1, *trailing)
        derived["scale"] = inverse * gamma
        return torch.addcmul(params[1].view(1, -1, *trailing), xhat, gamma)

    def backward(
        self, state: _State, problems: int, need_input: bool
    ) -> tuple[Tensor | None, list[Tensor]]:
        g = state.g_out
        assert g is not None
        if self.mode == "infer":
            g_in, grads = self.norm.backward(self._inner(state, problems), problems, need_input)
            return (None if g_in is None else _stacked(g_in, g)), grads
        grads = []
        if self.affine:
            xhat_p = _per_problem(state.derived["xhat"], problems)
            g_p = _per_problem(g, problems)
            grads = [(g_p * xhat_p).sum(dim=2), g_p.sum(dim=2)]
        return (g * state.derived["scale"] if need_input else None), grads

    def up(self, state: _State, v: list[Tensor], problems: int) -> Tensor | None:
        if self.mode == "infer":
            out = self.norm.up(self._inner(state, problems), v, problems)
            return None if out is None else _stacked(out, state.h_in)
        xhat, out = state.derived["xhat"], None
        if self.affine:
            out = torch.addcmul(
                _per_row(v[1], problems, xhat), xhat, _per_row(v[0], problems, xhat)
            )
        if state.gbar_in is None:
            return out
        back = state.gbar_in * state.derived["scale"]
        return back if out is None else out + back

    def down(self, state: _State, hbar_out: Tensor, v: list[Tensor], problems: int) -> Tensor:
        derived = state.derived
        if self.mode == "infer":
            inner = self._inner(state, problems)
            out = _stacked(
                self.norm.down(inner, _per_problem(hbar_out, problems), v, problems), hbar_out
            )
        else:
            # h_in enters the map (its factor) and, through xhat, the weight's gradient.
            out = hbar_out * derived["scale"]
            if self.affine:
                assert state.g_out is not None
                out = torch.addcmul(
                    out, state.g_out, _per_row(v[0], problems, out) * derived["inverse"]
                )
        mean_bar, var_bar = derived.pop("mean_bar", None), derived.pop("var_bar", None)
        if mean_bar is None and var_bar is None:
            return out
        # The statistics' own adjoints: d mean / d h = 1 / L, d var / d h = 2 (h - mean) / L.
        h_p = derived["h_p"]
        size = h_p.shape[2]
        term = None if mean_bar is None else (mean_bar / size).unsqueeze(2).expand_as(h_p)
        if var_bar is not None:
            centred = h_p - derived["batch_mean"].unsqueeze(2)
            spread = centred * (2 * var_bar / size).unsqueeze(2)
            term = spread if term is None else spread + term
        assert term is not None
        return out + _stacked(term, out)


def batchnorm_link(
    mode: str, eps: float, running: tuple[Tensor, Tensor], affine: bool, prefix: str
) -> _Layer:
    """The chain's link for a BatchNorm layer replayed as a client's training step (`infer`:
    each problem's own statistics; `proxy`: the running ones), for modules that name their
    own link (`chain_link(prefix)`)."""
    if mode not in ("infer", "proxy"):
        raise ChainUnsupported(f"BatchNorm mode {mode!r}")
    return _BatchNorm(mode, eps, running, affine, prefix)


class _Subsample(_Reshaping):
    """Strided slicing that keeps the batch (`x[:, :, ::2, ::2]`, a shortcut's subsampling)."""

    def __init__(self, index: tuple[slice, ...]) -> None:
        self.index = index

    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        if h.dim() < len(self.index):
            raise ChainUnsupported("slicing more dimensions than the input has")
        return h[self.index]

    def transpose(self, g: Tensor, state: _State) -> Tensor:
        out = g.new_zeros(state.h_in.shape)
        out[self.index] = g
        return out

    def again(self, t: Tensor, state: _State) -> Tensor:
        return t[self.index]


class _Pad(_Reshaping):
    """Zero padding (`F.pad` in constant mode; a shortcut's extra channels)."""

    def __init__(self, pad: tuple[int, ...]) -> None:
        self.pad = pad
        # The slice of the padded tensor that holds the input, from the last dimension back.
        kept = [slice(pad[2 * k], -pad[2 * k + 1] or None) for k in range(len(pad) // 2)]
        self.index = (Ellipsis, *reversed(kept))

    def forward(
        self, h: Tensor, params: list[Tensor], derived: dict[str, Tensor], problems: int
    ) -> Tensor:
        if len(self.pad) // 2 >= h.dim():
            raise ChainUnsupported("padding that adds samples")
        return F.pad(h, self.pad)

    def transpose(self, g: Tensor, state: _State) -> Tensor:
        return g[self.index]

    def again(self, t: Tensor, state: _State) -> Tensor:
        return F.pad(t, self.pad)


def _pair(value: int | Sequence[int]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def _is_flatten(node: torch.fx.Node, module: nn.Module | None) -> bool:
    """Whether the node flattens all but the batch dimension (`nn.Flatten()`, `torch.flatten(x,
    1)`, `x.flatten(1)`)."""
    if module is not None:
        return type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1)
    if (node.op, node.target) not in (("call_function", torch.flatten), ("call_method", "flatten")):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return start == 1 and len(node.args) <= 2 and set(node.kwargs) <= {"start_dim"}


def _slices(index: object) -> tuple[slice, ...] | None:
    """`index` when it is a tuple of slices that keep the batch and subsample with a step
    (`[:, :, ::2, ::2]`), else None."""
    if not isinstance(index, tuple) or not index or index[0] != slice(None):
        return None
    for item in index:
        if not isinstance(item, slice) or item.start not in (None, 0) or item.stop is not None:
            return None
        if not (item.step is None or (isinstance(item.step, int) and item.step >= 1)):
            return None
    return index


def _link(node: torch.fx.Node, model: nn.Module) -> tuple[_Layer | None, list[torch.fx.Node]]:
    """The chain's link for one traced node (None for the identity and for a sum of two
    outputs, which cost no layer: their readers read the sum) and the nodes it reads. Layer
    types are matched exactly: a subclass (a weight-standardised convolution, say) may
    compute something else."""
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        sources = list(node.args)
        if node.kwargs or len(sources) != 2:
            raise ChainUnsupported("a sum other than of two layers' outputs")
        if not all(isinstance(s, torch.fx.Node) for s in sources):
            raise ChainUnsupported("a constant added to a layer's output")
        return None, sources  # type: ignore[return-value]
    inputs = node.all_input_nodes
    if len(inputs) != 1 or not node.args or node.args[0] is not inputs[0]:
        raise ChainUnsupported(f"{node.op} {node.target} on other than one layer's output")
    if node.op == "call_module" and type(model.get_submodule(str(node.target))) is nn.Identity:
        return None, inputs
    return _single(node, model), inputs


def _single(node: torch.fx.Node, model: nn.Module) -> _Layer:
    module = model.get_submodule(str(node.target)) if node.op == "call_module" else None
    if type(module) is nn.Conv2d:
        return _Conv(module, f"{node.target}.")
    if type(module) is nn.Linear:
        return _Linear(module, f"{node.target}.")
    if type(module) is nn.GroupNorm:
        return _GroupNorm(module.num_groups, module.eps, module.affine, f"{node.target}.")
    if module is not None and callable(getattr(module, "chain_link", None)):
        return module.chain_link(f"{node.target}.")  # type: ignore[operator]
    if _is_flatten(node, module):
        return _Flatten()
    if type(module) is nn.MaxPool2d and not module.return_indices:
        return _MaxPool(module)
    if type(module) in (nn.AvgPool2d, nn.AdaptiveAvgPool2d):
        return _AvgPool(module)  # type: ignore[arg-type]
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        index = _slices(node.args[1])
        if index is not None:
            return _Subsample(index)
    if node.op == "call_function" and node.target is F.pad:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        if (
            isinstance(pad, (tuple, list))
            and all(isinstance(p, int) and p >= 0 for p in pad)
            and len(pad) % 2 == 0
            and mode == "constant"
            and not value
        ):
            return _Pad(tuple(pad))
    kind = None
    if module is not None:
        kind = _ACTIVATIONS.get(type(module))
    elif node.op == "call_function" and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}:
        # In place or not, the value is the same (the chain never writes into its inputs).
        kind = _ACTIVATIONS.get(node.target)  # type: ignore[arg-type]
    elif node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        kind = _ACTIVATIONS.get(str(node.target))
    if kind is None:
        raise ChainUnsupported(f"{node.op} {node.target}")
    return _Activation(kind)


class LayerChain:
    """A model seen as its graph of layers, for FedSGD's gradient and its derivative.

    Layers run in the traced order; `sources[i]` lists the layers whose outputs layer i
    reads (-1: the model's input), and its input is their sum, so a residual sum is no layer
    of its own. An output read by several layers collects their gradients (and, on the way
    down, their adjoints), and hands its gradient's adjoint up to each of them."""

    def __init__(
        self,
        layers: Sequence[_Layer],
        sources: Sequence[Sequence[int]],
        names: Sequence[str],
        weights: dict[str, Tensor],
    ) -> None:
        self.layers = list(layers)
        self.sources = [list(s) for s in sources]
        self.inner = [[s for s in group if s >= 0] for group in self.sources]  # no input
        self.names = list(names)
        self.weights = weights  # the parameters a pass uses unless it is given others
        order = {name: i for i, name in enumerate(names)}
        # Where each layer's parameter gradients go in the update (the model's order).
        self.slots = [[order[p] for p in layer.parameters] for layer in self.layers]
        self.count = len(names)
        self.shapes = tuple(weights[name].shape for name in names)

    def gradient(
        self, x: Tensor, y: Tensor, problems: int, weights: dict[str, Tensor] | None = None
    ) -> tuple[list[Tensor], _Pass]:
        """Each problem's mean cross-entropy gradient [T, ...] per parameter (model order)
        for stacked inputs `x` [T * b, ...] and class indices [T * b] or soft labels
        [T * b, K] `y`, at `weights` (parameter name -> tensor; default the model's as the
        chain was built)."""
        weights = self.weights if weights is None else weights
        states: list[_State] = []
        outputs: list[Tensor] = []
        for layer, sources in zip(self.layers, self.sources, strict=True):
            h = x if sources[0] < 0 else outputs[sources[0]]
            for s in sources[1:]:
                h = h + (x if s < 0 else outputs[s])
            params = [weights[name] for name in layer.parameters]
            derived: dict[str, Tensor] = {}
            out = layer.forward(h, params, derived, problems)
            states.append(_State(h, out, params, derived=derived))
            outputs.append(out)
        h = outputs[-1]
        soft = y.is_floating_point()
        if h.dim() != 2 or y.shape != (h.shape if soft else h.shape[:1]):
            raise ChainUnsupported("the chain does not end in one row of logits per label")
        samples = x.shape[0] // problems
        probabilities = torch.softmax(h, dim=1)
        mass = None
        if soft:
            # Cross-entropy against soft labels y (not necessarily normalised, as torch's
            # loss takes them): its logits' gradient is softmax * sum(y) - y.
            mass = y.sum(dim=1, keepdim=True)
            g = torch.addcmul(-y, probabilities, mass)
        else:
            g = probabilities.scatter_add(
                1, y.unsqueeze(1), probabilities.new_full((y.shape[0], 1), -1.0)
            )
        # Each layer's output gradient, summed over the layers that read it.
        g_outs: list[Tensor | None] = [None] * len(self.layers)
        g_outs[-1] = g / samples
        update: dict[int, Tensor] = {}
        for index in range(len(self.layers) - 1, -1, -1):
            state, sources = states[index], self.inner[index]
            state.g_out, g_outs[index] = g_outs[index], None
            g_in, grads = self.layers[index].backward(state, problems, bool(sources))
            update.update(zip(self.slots[index], grads, strict=True))
            for s in sources:
                _accumulate(g_outs, s, g_in)  # type: ignore[arg-type]
        # Every parameter has a slot (`layer_chain` checks it): a missing one fails here.
        statistics = [
            (state.derived["batch_mean"], state.derived["batch_var"])
            for layer, state in zip(self.layers, states, strict=True)
            if isinstance(layer, _BatchNorm)
        ]
        run = _Pass(states, h, probabilities, problems, samples, mass, statistics)
        return [update[slot] for slot in range(self.count)], run

    def input_gradient(
        self,
        run: _Pass,
        v: Sequence[Tensor],
        statistics: Sequence[tuple[Tensor | None, Tensor | None]] = (),
    ) -> tuple[Tensor, Tensor | None]:
        """The derivative of a loss of the update (and of the BatchNorm inputs' statistics)
        with respect to `x`, and to soft labels (None for class indices), given the loss's
        gradient `v` [T, ...] with respect to each parameter's gradient (and `statistics`,
        its gradient with respect to each (mean, var), None where the loss does not read it)."""
        problems = run.problems
        if statistics:
            layers_states = zip(self.layers, run.states, strict=True)
            norms = [state for layer, state in layers_states if isinstance(layer, _BatchNorm)]
            for state, (mean_bar, var_bar) in zip(norms, statistics, strict=True):
                if mean_bar is not None:
                    state.derived["mean_bar"] = mean_bar
                if var_bar is not None:
                    state.derived["var_bar"] = var_bar
        gbars: list[Tensor | None] = []
        for layer, state, slots, sources in zip(
            self.layers, run.states, self.slots, self.inner, strict=True
        ):
            # A layer's g_in feeds each source's g_out: its adjoint is theirs, summed.
            gbar_in = None
            for s in sources:
                if gbars[s] is not None:
                    gbar_in = gbars[s] if gbar_in is None else gbar_in + gbars[s]
            state.gbar_in = gbar_in
            gbars.append(layer.up(state, [v[s] for s in slots], problems))
        gbar = gbars[-1]
        del gbars
        # The logits' gradient is (softmax * mass - y) / b: its adjoint through the softmax
        # (mass 1 for class indices), and for soft labels through y and its mass.
        p = run.probabilities
        ybar = None
        if gbar is None:
            hbar = torch.zeros_like(p)
            if run.mass is not None:
                ybar = torch.zeros_like(p)
        else:
            expected = (p * gbar).sum(dim=1, keepdim=True)
            hbar = p * (gbar - expected) / run.samples
            if run.mass is not None:
                hbar = hbar * run.mass
                ybar = (expected - gbar) / run.samples
        # Each layer's output adjoint (the input's last), summed over the layers that read it.
        hbars: list[Tensor | None] = [None] * (len(self.layers) + 1)
        hbars[-2] = hbar
        for index in range(len(self.layers) - 1, -1, -1):
            layer, state = self.layers[index], run.states[index]
            hbar_out, hbars[index] = hbars[index], None
            assert hbar_out is not None  # every layer's output reaches the logits
            hbar_in = layer.down(state, hbar_out, [v[s] for s in self.slots[index]], problems)
            for s in self.sources[index]:
                _accumulate(hbars, s, hbar_in)  # -1: the input's slot
        return hbars[-1], ybar  # type: ignore[return-value]


def split_rows(rows: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Updates held as one row per problem [T, P] (each parameter flattened, in order) as
    each parameter's [T, ...], views where the rows' layout allows."""
    parts = rows.split([math.prod(shape) for shape in shapes], dim=1)
    return [part.reshape(rows.shape[0], *shape) for part, shape in zip(parts, shapes, strict=True)]


def _accumulate(sums: list[Tensor | None], index: int, term: Tensor) -> None:
    """sums[index] += term, where the sum starts as None."""
    before = sums[index]
    sums[index] = term if before is None else before + term


_FOUND: weakref.WeakKeyDictionary[nn.Module, LayerChain | None] = weakref.WeakKeyDictionary()


def model_chain(model: nn.Module) -> LayerChain | None:
    """`layer_chain(model)`, traced once per model object: for callers that pass the
    weights of every pass themselves (a model's layers do not change, its weights do)."""
    if model not in _FOUND:
        _FOUND[model] = layer_chain(model)
    return _FOUND[model]


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with modules that name their own link (`chain_link`) kept whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return callable(getattr(m, "chain_link", None)) or super().is_leaf_module(
            m, module_qualified_name
        )


def layer_chain(model: nn.Module) -> LayerChain | None:
    """The model's graph of layers, or None when its forward pass is not made of supported
    layers and residual sums covering every parameter once (then autograd replays it)."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # any model torch.fx cannot trace is simply not a chain
        return None
    nodes = list(graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    # The layers whose outputs sum to each node's value (-1: the model's input).
    sums: dict[torch.fx.Node, list[int]] = {nodes[0]: [-1]}
    layers: list[_Layer] = []
    sources: list[list[int]] = []
    try:
        for node in nodes[1:-1]:
            if not node.users:  # a dead computation: its parameters would get no gradient
                return None
            layer, reads = _link(node, model)
            summed = [index for n in reads for index in sums[n]]
            if layer is None:
                sums[node] = summed
                continue
            sums[node] = [len(layers)]
            sources.append(summed)
            layers.append(layer)
    except ChainUnsupported:
        return None
    if not layers or [sums.get(n) for n in nodes[-1].all_input_nodes] != [[len(layers) - 1]]:
        return None
    names = [name for name, _ in model.named_parameters()]
    covered = [p for layer in layers for p in layer.parameters]
    if sorted(covered) != sorted(names):
        return None
    weights = {n: p.detach() for n, p in model.named_parameters()}
    return LayerChain(layers, sources, names, weights)


class _ChainUpdate(torch.autograd.Function):
    """The stacked problems' updates as rows [T, P], then each BatchNorm input's (mean, var),
    as a function of `x` (and of soft labels), differentiable once. One output for the whole
    update, not one per parameter: autograd's bookkeeping of each output, the matching loss's
    concatenation and its backward's slicing cost ~5% of an iteration on ResNet-20."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, y: Tensor, chain: LayerChain, problems: int
    ) -> tuple[Tensor, ...]:
        update, run = chain.gradient(x, y, problems)
        ctx.chain, ctx.run = chain, run  # type: ignore[attr-defined]
        ctx.set_materialize_grads(False)  # outputs no loss reads stay None: no work
        rows = torch.cat([u.flatten(1) for u in update], dim=1)
        return (rows, *(t for pair in run.statistics for t in pair))

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, *bars: Tensor | None
    ) -> tuple[Tensor, Tensor | None, None, None]:
        run = ctx.run  # type: ignore[attr-defined]
        ctx.run = None  # type: ignore[attr-defined]
        chain: LayerChain = ctx.chain  # type: ignore[attr-defined]
        rows = bars[0]
        if rows is None:  # the loss reads only the statistics
            rows = run.logits.new_zeros(run.problems, sum(math.prod(s) for s in chain.shapes))
        statistics = list(zip(bars[1::2], bars[2::2], strict=True))
        xbar, ybar = chain.input_gradient(run, split_rows(rows, chain.shapes), statistics)
        return xbar, ybar, None, None


def chain_replay(
    chain: LayerChain, x: Tensor, y: Tensor, problems: int
) -> tuple[Tensor, Statistics]:
    """The update of each of `problems` stacked dummy batches `x` [T * b, ...] with class
    indices [T * b] or soft labels [T * b, K] `y`, as one row per problem [T, P] (each
    parameter flattened, in the model's order; `split_rows` with `chain.shapes` gives them
    per parameter), and each BatchNorm layer's input statistics (mean, var) [T, C] in forward
    order, all differentiable once with respect to `x` and to soft labels."""
    outputs = _ChainUpdate.apply(x, y, chain, problems)
    rest = outputs[1:]
    return outputs[0], list(zip(rest[::2], rest[1::2], strict=True))


def chain_update(chain: LayerChain, x: Tensor, y: Tensor, problems: int) -> list[Tensor]:
    """`chain_replay`'s updates alone, per parameter [T, ...]."""
    return split_rows(chain_replay(chain, x, y, problems)[0], chain.shapes)
