"""The client's computation replayed on dummy data, for many independent problems at once.

A problem is one guess of a private batch (b images + labels) whose update is matched to one
observed update. T problems (targets x restarts, of one or several observations) are stacked
along a leading dimension and their dummy updates come out in one call, differentiable with
respect to the dummy inputs (the attack then differentiates them once more). Four paths give
the same function: FedSGD problems (hard or soft labels, per-sample gradients too) on a model
that is one chain of convolutions, linear layers, pooling and activations (sigmoid LeNet,
MLPs, ConvNet) through the gradient and its derivative written out
(`fedleak.training.chain`); one problem otherwise through plain autograd on the module
itself (no vmap, no re-binding of parameters); stacked FedSGD problems of a model without
BatchNorm through one batched backward and layer-wise per-problem gradients
(`fedleak.training.per_sample`); every other case (FedAvg's unrolled steps, BatchNorm)
through `torch.func.vmap` over `grad`.

BatchNorm layers are replaced by `InversionBatchNorm`, which normalises each problem with the
dummy batch's own statistics, as the client computed them (GradAttack's `exact` and `infer`
threat models; they differ in the prior's target, see the attacks), or with the model's
running statistics (`proxy`). Normalising a far-off dummy with fixed shared statistics instead
overflows through a deep network (measured: inf dummy gradients on ResNet-20 from N(0, 1)
inputs), which is why shared statistics enter through the prior.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from fedleak.attacks.types import Observation, UpdateKind
from fedleak.defenses.noise import clip_per_sample
from fedleak.training.chain import (
    ChainUnsupported,
    batchnorm_link,
    chain_replay,
    layer_chain,
    split_rows,
)
from fedleak.training.loss import per_sample_task_loss, task_loss
from fedleak.training.per_sample import layerwise_exact, layerwise_gradients, supported

Statistics = list[tuple[Tensor, Tensor]]

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
BN_MODES: tuple[str, ...] = ("infer", "proxy")


class ReplayError(ValueError):
    """The client's computation cannot be replayed as asked (e.g. per-sample with BatchNorm)."""


class InversionBatchNorm(nn.Module):
    """BatchNorm in training mode normalising with the batch's own statistics (`infer`) or the
    running ones (`proxy`). Every forward appends the batch statistics to `record` when it is a
    list (for the BatchNorm prior)."""

    def __init__(self, source: nn.Module, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.eps = float(source.eps)
        self.weight = source.weight
        self.bias = source.bias
        running_mean = source.running_mean
        running_var = source.running_var
        channels = source.num_features
        if running_mean is None:  # track_running_stats=False: the prior falls back to N(0, 1)
            running_mean, running_var = torch.zeros(channels), torch.ones(channels)
        self.register_buffer("running_mean", running_mean.detach().clone())
        self.register_buffer("running_var", running_var.detach().clone())
        self.record: list[tuple[Tensor, Tensor]] | None = None

    def forward(self, x: Tensor) -> Tensor:
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        if self.record is not None:
            self.record.append((mean, var))
        if self.mode == "proxy":
            mean, var = self.running_mean, self.running_var
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out

    def chain_link(self, prefix: str) -> object:
        """This layer's link in the written-out chain (`fedleak.training.chain`)."""
        running = (self.running_mean, self.running_var)
        return batchnorm_link(self.mode, self.eps, running, self.weight is not None, prefix)


def _swap_batchnorm(module: nn.Module, mode: str) -> list[tuple[str, InversionBatchNorm]]:
    swapped = []
    for name, child in list(module.named_modules()):
        if isinstance(child, _BATCHNORM):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            replacement = InversionBatchNorm(child, mode)
            setattr(parent, attr, replacement)
            swapped.append((name, replacement))
    return swapped


class _SplitAffine:
    """A normalisation layer that, while `split` is on, applies its affine step outside the
    fused kernel. Under vmap, torch 2.14's rules for the fused LayerNorm and InstanceNorm
    backward give wrong derivatives of the per-problem gradients with respect to the inputs
    once the layer is affine (measured against plain autograd: transformer3's stacked TAG
    problems off by 3e-4 of their scale, a two-layer LayerNorm net's by 4e-2, an affine
    InstanceNorm2d's by 2e-2; split, within 4e-7 of it). The replay turns it on around its
    vmap calls only: elsewhere the fused forward is the client's own, bit for bit."""

    split = False


class _SplitAffineLayerNorm(_SplitAffine, nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        if not self.split:
            return super().forward(x)
        out = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return _affine(out, self.weight, self.bias, [])


class _SplitAffineInstanceNorm(_SplitAffine, nn.modules.instancenorm._InstanceNorm):
    def forward(self, x: Tensor) -> Tensor:
        if not self.split:
            return super().forward(x)
        stats = self.training or not self.track_running_stats
        # With the instance's own statistics the running ones are neither read nor updated:
        # vmap refuses in-place updates of unbatched buffers (audit DK4).
        running = (None, None) if stats else (self.running_mean, self.running_var)
        out = F.instance_norm(x, *running, None, None, stats, 0.0, self.eps)
        if not self.affine:
            return out
        return _affine(out, self.weight, self.bias, [1] * (x.dim() - 2))


class _SplitAffineInstanceNorm1d(_SplitAffineInstanceNorm, nn.InstanceNorm1d):
    pass


class _SplitAffineInstanceNorm2d(_SplitAffineInstanceNorm, nn.InstanceNorm2d):
    pass


class _SplitAffineInstanceNorm3d(_SplitAffineInstanceNorm, nn.InstanceNorm3d):
    pass


_SPLIT_AFFINE: dict[type[nn.Module], type[nn.Module]] = {
    nn.LayerNorm: _SplitAffineLayerNorm,
    nn.InstanceNorm1d: _SplitAffineInstanceNorm1d,
    nn.InstanceNorm2d: _SplitAffineInstanceNorm2d,
    nn.InstanceNorm3d: _SplitAffineInstanceNorm3d,
}


@functools.cache
def _split_class(kind: type[nn.Module]) -> type[nn.Module] | None:
    """The `_SplitAffine` class for a LayerNorm or InstanceNorm class. A subclass keeps its
    own forward and reaches the split one through `super()` (an fp32 LayerNorm casting around
    it, audit DL2); one that calls the functional kernel itself is split by
    `_SplitFunctionalNorms`."""
    for base, split in _SPLIT_AFFINE.items():
        if issubclass(kind, base):
            return split if kind is base else type(kind.__name__, (kind, split), {})
    return None


def _with_split_affines(model: nn.Module) -> list[_SplitAffine]:
    """Make the replay's copy of every LayerNorm and InstanceNorm a `_SplitAffine` (same
    parameters, names and types for the layer-wise rules) and return them."""
    swapped = []
    for module in model.modules():
        split = _split_class(type(module))
        if split is not None:
            module.__class__ = split
            swapped.append(module)
    return swapped


def _torch_layer_norm(  # type: ignore[no-untyped-def]
    input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True
):
    """`torch.layer_norm`'s arguments (a builtin without a signature)."""


def _torch_instance_norm(  # type: ignore[no-untyped-def]
    input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled
):
    """`torch.instance_norm`'s arguments (a builtin without a signature)."""


# Both spellings of each kernel: `torch.layer_norm` is the same call as `F.layer_norm`.
_LAYER_NORMS = {
    F.layer_norm: inspect.signature(F.layer_norm),
    torch.layer_norm: inspect.signature(_torch_layer_norm),
}
_INSTANCE_NORMS = {
    F.instance_norm: inspect.signature(F.instance_norm),
    torch.instance_norm: inspect.signature(_torch_instance_norm),
}


class _SplitFunctionalNorms(TorchFunctionMode):
    """`F.layer_norm` and `F.instance_norm` called with a weight or bias, as a plug-in's own
    layer may call them, run as the kernel without them followed by the affine step: the
    split of `_SplitAffine` for the functional form. Counts the calls it split."""

    def __init__(self) -> None:
        super().__init__()
        self.splits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _LAYER_NORMS:
            given = _LAYER_NORMS[func].bind(*args, **kwargs)
            given.apply_defaults()
            a = given.arguments
            if a["weight"] is not None or a["bias"] is not None:
                self.splits += 1
                out = F.layer_norm(a["input"], a["normalized_shape"], None, None, a["eps"])
                return _affine(out, a["weight"], a["bias"], [])
        elif func in _INSTANCE_NORMS:
            given = _INSTANCE_NORMS[func].bind(*args, **kwargs)
            given.apply_defaults()
            a = given.arguments
            if a["weight"] is not None or a["bias"] is not None:
                self.splits += 1
                stats = a["use_input_stats"]
                # As `_SplitAffineInstanceNorm`: vmap refuses in-place updates of unbatched
                # running buffers, which the instance's own statistics never read.
                running = (None, None) if stats else (a["running_mean"], a["running_var"])
                out = F.instance_norm(
                    a["input"], *running, None, None, stats, a["momentum"], a["eps"]
                )
                trailing = [1] * (a["input"].dim() - 2)
                return _affine(out, a["weight"], a["bias"], trailing)
        return func(*args, **kwargs)


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, trailing: list[int]) -> Tensor:
    """`out * weight + bias`, each broadcast over the `trailing` dimensions when given."""
    if weight is not None:
        out = out * (weight.reshape([-1, *trailing]) if trailing else weight)
    if bias is not None:
        out = out + (bias.reshape([-1, *trailing]) if trailing else bias)
    return out


def _names_functional_norms(model: nn.Module) -> bool:
    """Whether the forward of one of the model's own (not torch's) modules names a functional
    layer or instance norm: it may call one on a later forward only (audit DP4)."""
    for kind in {type(module) for module in model.modules()}:
        if kind.__module__.startswith("torch.") or issubclass(kind, _SplitAffine):
            continue
        try:
            source = inspect.getsource(kind.forward)
        except (OSError, TypeError):  # no source to read (a compiled or generated forward)
            continue
        if "layer_norm" in source or "instance_norm" in source:
            return True
    return False


class _AffineSplit:
    """The split affine forward, turned on for the duration of each vmap call: the replay's
    norm modules (`_SplitAffine`), and functional norm calls through `_SplitFunctionalNorms`,
    unless no module's forward names one and a first call split nothing. The mode costs ~10%
    of a stacked transformer's TAG iteration (measured)."""

    def __init__(self, model: nn.Module) -> None:
        self.norms = _with_split_affines(model)
        self.named = _names_functional_norms(model)
        self.functional = True

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        mode = _SplitFunctionalNorms() if self.functional else None
        for norm in self.norms:
            norm.split = True
        try:
            with mode if mode is not None else contextlib.nullcontext():
                yield
        finally:
            for norm in self.norms:
                norm.split = False
        if mode is not None and not mode.splits and not self.named:
            self.functional = False


@dataclass(frozen=True)
class ClientProtocol:
    """What the client declared: FedSGD (`gradient`, one batch gradient) or FedAvg (`delta`,
    `local_steps` SGD steps of `batch_size` on N-cyclic mini-batches, step k starting at sample
    k * batch_size mod N, as `fedleak.training.update` computes it)."""

    kind: UpdateKind
    local_steps: int = 1
    batch_size: int = 1
    learning_rate: float = 0.1


@dataclass(frozen=True)
class ObservedUpdates:
    """An observation's updates as `count` targets, one row of every parameter's tensor each
    (each sample's gradient under the per-sample threat model, else the client's one update),
    with the samples one target stands for, the clients it sums and the client's protocol."""

    rows: dict[str, Tensor]
    count: int
    samples: int
    contributors: int
    protocol: ClientProtocol


def observed_updates(observation: Observation) -> ObservedUpdates:
    """The targets an optimisation attack inverts in one observation."""
    if observation.per_sample_updates is not None:
        rows = observation.per_sample_updates
        count = next(iter(rows.values())).shape[0]
        return ObservedUpdates(rows, count, 1, 1, ClientProtocol("gradient"))
    protocol = ClientProtocol(
        observation.update_kind,
        observation.local_steps,
        observation.batch_size,
        observation.learning_rate,
    )
    rows = {name: u.unsqueeze(0) for name, u in observation.update.items()}
    return ObservedUpdates(rows, 1, observation.num_examples, observation.contributors, protocol)


@dataclass(frozen=True)
class ReplayOutput:
    """T problems' dummy updates, per-sample gradients [T, b, ...] when asked, and each
    BatchNorm layer's dummy batch statistics (mean, var) [T, C] at w_t.

    The updates come per parameter (`parts`, [T, ...] each) or, from the written-out chain,
    as one row of all coordinates per problem (`flat` [T, P], parameters in order, with their
    `shapes`); `update` and `rows` give either form, so that a loss over every coordinate
    reads the chain's rows without concatenating them again."""

    parts: list[Tensor] | None
    per_sample: list[Tensor] | None
    statistics: Statistics
    flat: Tensor | None = None
    shapes: tuple[torch.Size, ...] = ()

    @property
    def update(self) -> list[Tensor]:
        """Each parameter's dummy updates [T, ...]."""
        if self.parts is not None:
            return self.parts
        assert self.flat is not None
        return split_rows(self.flat, self.shapes)

    @property
    def rows(self) -> Tensor:
        """The dummy updates as rows [T, P]."""
        if self.flat is not None:
            return self.flat
        assert self.parts is not None
        return torch.cat([u.flatten(1) for u in self.parts], dim=1)

    def clipped(self, clip: float) -> ReplayOutput:
        """DP-SGD's clipping replayed on the dummy (`clip` = C > 0; 0: unchanged): each
        sample's gradient scaled to norm <= C over all parameters, then the mean. Without
        per-sample gradients each problem holds one sample, whose update is clipped as it is."""
        if clip <= 0:
            return self
        shapes = self.shapes or tuple(p.shape[1:] for p in self.parts or ())
        if self.per_sample is None:
            rows = self.rows
            return ReplayOutput(None, None, self.statistics, _clip_rows(rows, clip), shapes)
        problems, samples = self.per_sample[0].shape[:2]
        per = torch.cat([g.reshape(problems, samples, -1) for g in self.per_sample], dim=2)
        per = _clip_rows(per, clip)
        sizes = [g[0, 0].numel() for g in self.per_sample]
        per_sample = [
            chunk.reshape(problems, samples, *shape)
            for chunk, shape in zip(per.split(sizes, dim=2), shapes, strict=True)
        ]
        return ReplayOutput(None, per_sample, self.statistics, per.mean(dim=1), shapes)


def _clip_rows(rows: Tensor, clip: float) -> Tensor:
    """Each row (last dimension) scaled to L2 norm <= `clip`."""
    norms = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows * (clip / norms).clamp(max=1.0)


class Replay:
    """The client's update as a differentiable function of T stacked dummy batches."""

    def __init__(
        self,
        model: nn.Module,
        protocol: ClientProtocol,
        bn_mode: str = "infer",
        device: torch.device | str = "cpu",
        step_clip: float = 0.0,
    ) -> None:
        if bn_mode not in BN_MODES:
            raise ReplayError(f"bn_mode={bn_mode!r}: allowed {', '.join(BN_MODES)}")
        # DP-SGD inside FedAvg: every local step's gradient is the mean of its samples'
        # gradients clipped to C, as the client computes it (0: the plain batch gradient).
        self.step_clip = step_clip if protocol.kind == "delta" else 0.0
        self.model = copy.deepcopy(model).train()
        self._batchnorms = _swap_batchnorm(self.model, bn_mode)
        self._split = _AffineSplit(self.model)
        self.model.to(device)
        self.protocol = protocol
        self.bn_mode = bn_mode
        self.params = {name: p.detach() for name, p in self.model.named_parameters()}
        self.names = list(self.params)
        # Buffers a train-mode forward updates in place (a step counter, a running average;
        # BatchNorm's are replaced above), found by the first call: every problem starts from
        # the shared values and carries its own copy through the local steps, as the client
        # does. The copies enter the transformed function as inputs, since torch.func refuses
        # in-place updates of captured tensors (audit EO1); the module keeps the shared values.
        self._state: dict[str, Tensor] | None = None
        # The single-problem path differentiates with plain autograd w.r.t. the module's own
        # parameters and calls the module directly (no re-binding of parameters per call).
        self._leaves = dict(self.model.named_parameters())
        for leaf in self._leaves.values():
            leaf.requires_grad_(True)
        sent = {name: b.clone() for name, b in self.model.named_buffers()}
        # Stacked FedSGD problems without BatchNorm: per-problem gradients from one batched
        # backward (`fedleak.training.per_sample`), cheaper to differentiate than vmap.
        # (A BatchNorm without parameters passes `supported`, but one forward of every
        # problem's samples would mix their batch statistics: audit DL3.)
        self.layerwise = (
            protocol.kind == "gradient" and supported(self.model) and not self._batchnorms
        )
        # FedSGD through a graph of plain layers: the gradient and its derivative written
        # out (`chain`), cheaper still; None where the model is not such a graph.
        self._chain = layer_chain(self.model) if protocol.kind == "gradient" else None
        # Both probe the model with forwards, which may have moved its buffers from the sent
        # values every replay starts from.
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(sent[name])

    @property
    def has_batchnorm(self) -> bool:
        """Whether the model normalises with batch statistics (samples are coupled)."""
        return bool(self._batchnorms)

    @property
    def batchnorm_names(self) -> list[str]:
        """Module names of the BatchNorm layers, in forward order of definition."""
        return [name for name, _ in self._batchnorms]

    def running_statistics(self) -> Statistics:
        """The model's running (mean, var) of each BatchNorm layer: the prior of `infer`."""
        return [(bn.running_mean, bn.running_var) for _, bn in self._batchnorms]

    def _changing_buffers(self, x: Tensor) -> dict[str, Tensor]:
        """The buffers, BatchNorm's aside, that a train-mode forward of batch `x` changes.
        The others stay the module's own: a fixed mask or table need not be copied per
        problem (nor batched under vmap)."""
        inverted = {
            f"{name}.{b}" for name, _ in self._batchnorms for b in ("running_mean", "running_var")
        }
        shared = {n: b for n, b in self.model.named_buffers() if n not in inverted}
        probe = {n: b.clone() for n, b in shared.items()}
        if probe:
            with torch.no_grad():
                functional_call(self.model, probe, (x,))
        return {n: b.detach() for n, b in shared.items() if not torch.equal(probe[n], b)}

    def _fresh_state(self, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Copies of the changing buffers (`state`, else the shared values) for a forward."""
        held = self._state if state is None else state
        return {name: b.clone() for name, b in (held or {}).items()}

    def _loss(
        self,
        params: dict[str, Tensor],
        state: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        record: bool,
    ) -> tuple[Tensor, tuple[tuple[Tensor, Tensor], ...]]:
        recorded: list[tuple[Tensor, Tensor]] = []
        for _, bn in self._batchnorms:
            bn.record = recorded if record else None
        try:
            if params is self._leaves:
                logits = functional_call(self.model, state, (x,)) if state else self.model(x)
            else:
                logits = functional_call(self.model, (params, state), (x,))
        finally:
            for _, bn in self._batchnorms:
                bn.record = None
        return task_loss(logits, y), tuple(recorded)

    def _autograd(
        self,
        params: dict[str, Tensor],
        state: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        record: bool,
    ) -> tuple[dict[str, Tensor], tuple[tuple[Tensor, Tensor], ...]]:
        """`grad(self._loss, has_aux=True)` with plain autograd (graph kept for the outer
        derivative): one problem needs no vmap, and functorch's wrappers cost ~1.5x here."""
        loss, statistics = self._loss(params, state, x, y, record)
        inputs = [params[n] for n in self.names]
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
        gradient = {
            n: torch.zeros_like(p) if g is None else g
            for n, p, g in zip(self.names, inputs, grads, strict=True)
        }
        return gradient, statistics

    def _problem(
        self,
        params: dict[str, Tensor],
        state: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        single: bool = False,
    ) -> tuple[list[Tensor], tuple[tuple[Tensor, Tensor], ...]]:
        """One problem's update; `state`: its own copy of the shared buffers."""
        gradient_of = self._autograd if single else grad(self._loss, has_aux=True)
        if self.protocol.kind == "gradient":
            gradient, statistics = gradient_of(params, state, x, y, True)
            return [gradient[n] for n in self.names], statistics
        # Statistics (for the prior) of the whole dummy batch at w_t, as the client shares them.
        statistics = self._loss(params, self._fresh_state(state), x, y, True)[1]
        count, size, lr = x.shape[0], self.protocol.batch_size, self.protocol.learning_rate
        current = params
        for step in range(self.protocol.local_steps):
            index = [(step * size + j) % count for j in range(size)]
            # Each step updates a copy: an earlier step's graph may hold the values it read.
            state = self._fresh_state(state)
            if self.step_clip > 0:
                gradient = self._clipped_step(current, x[index], y[index])
            else:
                gradient, _ = gradient_of(current, state, x[index], y[index], False)
            current = {n: current[n] - lr * gradient[n] for n in self.names}
        return [current[n] - params[n] for n in self.names], statistics

    def _clipped_step(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """One DP-SGD step's gradient: each sample's gradient clipped to C as the client
        clips it (`clip_per_sample`), then their mean."""

        def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            return self._loss(p, {}, xi.unsqueeze(0), yi.unsqueeze(0), False)[0]

        with self._split():
            per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
        clipped = clip_per_sample({n: per[n] for n in self.names}, self.step_clip)
        return {n: clipped[n].mean(dim=0) for n in self.names}

    def __call__(self, x: Tensor, y: Tensor, per_sample: bool = False) -> ReplayOutput:
        """Dummy updates of T problems: `x` [T, b, ...], `y` int64 [T, b] or soft [T, b, K]
        (token sequences: embeddings [T, b, L, d] and targets [T, b, L] or soft [T, b, L, V]);
        with `per_sample` also each sample's gradient (FedSGD, no BatchNorm)."""
        if self._state is None:
            self._state = self._changing_buffers(x[0])
        # Per-sample gradients are undefined under BatchNorm (`_per_sample` says so).
        if self._chain is not None and not (per_sample and self._batchnorms):
            problems, samples = x.shape[0], x.shape[1]
            try:
                # Per-sample gradients: every sample a problem of its own.
                stacked = problems * samples if per_sample else problems
                flat_x, flat_y = x.flatten(0, 1), y.flatten(0, 1)
                rows, statistics = chain_replay(self._chain, flat_x, flat_y, stacked)
            except ChainUnsupported:
                self._chain = None  # e.g. inputs of another rank than the chain expects
            else:
                shapes = self._chain.shapes
                if not per_sample:
                    return ReplayOutput(None, None, statistics, rows, shapes)
                update = split_rows(rows, shapes)
                per = [u.reshape(problems, samples, *u.shape[1:]) for u in update]
                mean = rows.reshape(problems, samples, -1).mean(dim=1)
                return ReplayOutput(None, per, [], mean, shapes)
        # One forward of every problem's samples would mix them in a changing buffer.
        if (
            self.layerwise
            and not self._state
            and (per_sample or x.shape[0] > 1)
            and layerwise_exact(self.model, x.flatten(0, 1))
        ):
            return self._layerwise(x, y, per_sample)
        if per_sample:
            return self._per_sample(x, y)
        if x.shape[0] == 1:
            with torch.enable_grad():  # also under no_grad: the update is a gradient
                state = self._fresh_state()
                update, statistics = self._problem(self._leaves, state, x[0], y[0], single=True)
            return ReplayOutput(
                [u.unsqueeze(0) for u in update],
                None,
                [(m.unsqueeze(0), v.unsqueeze(0)) for m, v in statistics],
            )
        problems = x.shape[0]
        state = {n: b.expand(problems, *b.shape).clone() for n, b in (self._state or {}).items()}
        with self._split():
            update, statistics = vmap(self._problem, in_dims=(None, 0, 0, 0))(
                self.params, state, x, y
            )
        return ReplayOutput(list(update), None, list(statistics))

    def _layerwise(self, x: Tensor, y: Tensor, per_sample: bool) -> ReplayOutput:
        problems, samples = x.shape[0], x.shape[1]
        scale = 1.0 if per_sample else 1.0 / samples  # the client's loss is the batch mean

        def loss_of(logits: Tensor, target: Tensor) -> Tensor:
            # The client's task loss, per sample: a language model's is over shifted positions.
            return per_sample_task_loss(logits, target) * scale

        groups = problems * samples if per_sample else problems
        grads, _ = layerwise_gradients(
            self.model,
            self.params,
            self._fresh_state(),
            x.reshape(problems * samples, *x.shape[2:]),
            y.reshape(problems * samples, *y.shape[2:]),
            loss_of,
            groups,
            create_graph=True,
        )
        if not per_sample:
            return ReplayOutput([grads[n] for n in self.names], None, [])
        per = [grads[n].reshape(problems, samples, *grads[n].shape[1:]) for n in self.names]
        return ReplayOutput([g.mean(dim=1) for g in per], per, [])

    def _per_sample(self, x: Tensor, y: Tensor) -> ReplayOutput:
        if self.has_batchnorm or self._state or self.protocol.kind != "gradient":
            raise ReplayError(
                "per-sample dummy gradients need a FedSGD gradient and a model without BatchNorm "
                "or other buffers that its forward changes"
            )

        def sample_loss(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            return self._loss(params, {}, xi.unsqueeze(0), yi.unsqueeze(0), False)[0]

        each = vmap(vmap(grad(sample_loss), in_dims=(None, 0, 0)), in_dims=(None, 0, 0))
        with self._split():
            grads = each(self.params, x, y)
        per = [grads[n] for n in self.names]
        return ReplayOutput([g.mean(dim=1) for g in per], per, [])


def shared_statistics(statistics: dict[str, Tensor], names: Sequence[str]) -> Statistics:
    """The client's shared BatchNorm statistics (`<module>.mean` / `<module>.var`) per layer."""
    missing = [n for n in names if f"{n}.mean" not in statistics or f"{n}.var" not in statistics]
    if missing:
        raise ReplayError(f"shared BatchNorm statistics lack layers {missing[:3]}")
    return [(statistics[f"{n}.mean"].float(), statistics[f"{n}.var"].float()) for n in names]
