"""fedleak as a library: attack an update you computed yourself, and score what leaked.

    import fedleak
    grads = torch.autograd.grad(loss, model.parameters())      # your model, your batch
    observation = fedleak.observe(model, grads, input_shape=x.shape[1:], num_examples=len(x))
    attack = fedleak.build_attack("ig")
    result = fedleak.reconstruct(attack, observation, max_iterations=500)
    print(fedleak.score(result, x, y).summary())

`observe` packs what an honest-but-curious server sees (the architecture, the weights it sent,
the update, the declared protocol and the public defense) into an `Observation`; any
`nn.Module` works: its architecture is registered in this process under a name derived from
it, so that attacks can rebuild it. `reconstruct` runs an attack with the attacker's own
auxiliary data under a budget; `score` pairs the guesses with the private batch (in order
for per-sample updates, else Hungarian on MSE) and measures them as a run's auditor does.
`docs/api.md` has runnable examples.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import numbers
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedleak.attacks.isolation import ReadOnly, isolated
from fedleak.attacks.outcome import checked, image_shape, num_classes
from fedleak.attacks.registry import attack_modalities, attack_seed
from fedleak.attacks.threads import default_threads, torch_threads
from fedleak.attacks.types import (
    Attack,
    AttackerKnowledge,
    Budget,
    Observation,
    Reconstruction,
    UpdateKind,
)
from fedleak.defenses.spec import DefensePipeline, parse_defense_spec
from fedleak.lines import one_line
from fedleak.metrics import (
    ROUGE_TYPES,
    assign,
    label_accuracy,
    label_multiset_accuracy,
    rouge,
    score_images,
    token_accuracy,
)
from fedleak.models import MODELS, ModelSpec, has_batchnorm, register_model
from fedleak.models.fitness import random_in_training
from fedleak.settings import ConfigError
from fedleak.training import gradients as training_gradients

UPDATE_KINDS: tuple[UpdateKind, ...] = ("gradient", "delta")


# Each registered snapshot's skeleton, and the objects its name describes (classes, functions,
# other attribute objects), kept alive: a model shares a snapshot only with the very objects
# it was registered with, and a freed object's id would otherwise go to a later one.
_SNAPSHOTS: dict[str, tuple[nn.Module, list[object]]] = {}


def _values_digest(tensor: Tensor) -> str:
    """A digest of a tensor's shape, dtype and values (any dtype, any device)."""
    raw = tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
    values = hashlib.blake2b(raw, digest_size=8).hexdigest()
    return f"tensor{tuple(tensor.shape)}:{tensor.dtype}:{values}"


def _code_text(code: types.CodeType) -> str:
    """What a function computes: its bytecode, constants and names, not where it lies (a
    notebook cell's file name changes with the process)."""
    consts = ",".join(
        _code_text(c)
        if isinstance(c, types.CodeType)
        else repr(sorted(c, key=repr) if isinstance(c, frozenset) else c)
        for c in code.co_consts
    )
    return f"{code.co_code.hex()}|{consts}|{code.co_names}|{code.co_varnames}"


def _code_of(value: object) -> str:
    """The code of a Python function, or of a class's own methods outside torch (its MRO);
    '' for what has none (a builtin such as torch.sigmoid, named by module and name)."""
    function = getattr(value, "__func__", value)
    code = getattr(function, "__code__", None)
    if isinstance(code, types.CodeType):
        return _code_text(code)
    if not isinstance(value, type):
        return ""
    methods = [
        f"{klass.__qualname__}.{key}:{_code_of(member)}"
        for klass in value.__mro__
        if klass is not object and not klass.__module__.startswith("torch")
        for key, member in sorted(vars(klass).items())
        if callable(getattr(member, "__func__", member)) and _code_of(member)
    ]
    return ";".join(methods)


def _described(value: object, identified: list[object]) -> str:
    """A module attribute as it decides the computation: plain values and tensors (a
    normalising mean) by value, containers element by element, and functions, classes and
    other objects by module, name and code (the same in every process), each appended to
    `identified`: `model_spec_for` tells apart objects of one description."""
    if value is None or isinstance(value, bool | int | float | str | torch.dtype):
        return repr(value)
    if isinstance(value, Tensor):
        return _values_digest(value)
    if isinstance(value, tuple | list | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        inner = ",".join(_described(v, identified) for v in items)
        return f"{type(value).__name__}[{inner}]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k!r}:{_described(v, identified)}" for k, v in value.items()) + "}"
    if isinstance(value, functools.partial):  # by value: a new one per model is common
        arguments = _described((value.args, dict(value.keywords)), identified)
        return f"partial({_described(value.func, identified)},{arguments})"
    identified.append(value)
    name = getattr(value, "__qualname__", type(value).__qualname__)
    code = hashlib.blake2b(_code_of(value).encode(), digest_size=8).hexdigest()
    return f"{getattr(value, '__module__', '')}.{name}#{code}"


def _architecture_name(model: nn.Module, identified: list[object]) -> str:
    """A registry name for a user's module: its class and a digest of everything that decides
    its computation beyond the observed weights: each submodule's type and attributes (an
    activation held as a plain function, a flag, a hook, a tensor constant), parameter and
    buffer shapes, and the values of buffers the state dict leaves out (they travel with the
    snapshot)."""
    digest = hashlib.blake2b(digest_size=8)
    for path, module in model.named_modules():
        # The class with its code: a notebook cell run again defines a new class of one name.
        digest.update(f"{path}:{_described(type(module), identified)}".encode())
        for key, value in sorted(vars(module).items()):
            if key in ("_parameters", "_buffers", "_modules", "training"):
                continue
            digest.update(f"{key}={_described(value, identified)}".encode())
        # A table held as a parameter (trained) or as a buffer (fixed) is another model.
        held = [("parameter", item) for item in module._parameters.items()]
        held += [("buffer", item) for item in module._buffers.items()]
        for kind, (key, tensor) in held:
            if tensor is None:
                digest.update(f"{kind} {key}:None".encode())
                continue
            if kind == "buffer" and key in module._non_persistent_buffers_set:
                digest.update(f"{kind} {key}:{_values_digest(tensor)}".encode())
            else:
                digest.update(f"{kind} {key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    clean = "".join(c if c.isalnum() else "-" for c in type(model).__name__.lower())
    return f"custom-{clean}-{digest.hexdigest()}"


def model_spec_for(
    model: nn.Module, input_shape: Sequence[int], num_classes: int, modality: str = "image"
) -> ModelSpec:
    """A `ModelSpec` attacks can rebuild `model` from in this process: its architecture is
    registered (a snapshot; the weights travel in the observation). Two models share a
    snapshot only when their digests agree (`_architecture_name`) and they hold the same
    objects; the first model of a digest gets the same name in every process (an attack's
    saved state, keyed by it, is found again), others of that digest a numbered one."""
    identified: list[object] = []
    base = _architecture_name(model, identified)
    name, copies = base, 1
    while name in _SNAPSHOTS and not _same_objects(_SNAPSHOTS[name][1], identified):
        copies += 1
        name = f"{base}-{copies}"
    if name not in MODELS:
        template = _skeleton(model)
        register_model(
            name,
            lambda _shape, _classes: _materialised(template),
            modality=modality,
            replace=True,
        )
        _SNAPSHOTS[name] = (template, identified)
    return ModelSpec(name, tuple(int(d) for d in input_shape), int(num_classes))


def _same_objects(kept: list[object], described: list[object]) -> bool:
    if len(kept) != len(described):
        return False
    return all(a is b for a, b in zip(kept, described, strict=True))


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and persistent buffers are on the meta device: a
    snapshot holds the architecture, never the weights (they travel in each observation), so
    a model observed with changing attributes (a call counter) adds little per snapshot."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for tensor in module._parameters.values():
            if tensor is not None and id(tensor) not in memo:
                meta = torch.empty_like(tensor, device="meta")
                memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        for key, tensor in module._buffers.items():
            if tensor is None or id(tensor) in memo:
                continue
            if key in module._non_persistent_buffers_set:  # not in the observed weights
                memo[id(tensor)] = tensor.detach().cpu().clone()
            else:
                memo[id(tensor)] = torch.empty_like(tensor, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except (RuntimeError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = reason.split(". ")[0].rstrip(".")
        raise ConfigError(
            f"model: cannot be copied to rebuild it ({reason}); detach tensors it keeps as "
            "attributes (a cached activation) or register them as buffers"
        ) from None


def _materialised(skeleton: nn.Module) -> nn.Module:
    """The skeleton with zeroed CPU tensors in place of its meta ones (shared ones stay
    shared), ready for `load_state_dict` of an observation's weights."""
    model = copy.deepcopy(skeleton)
    made: dict[int, Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in list(store.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in made:
                    zeros = torch.zeros_like(tensor, device="cpu")
                    if isinstance(tensor, nn.Parameter):
                        zeros = nn.Parameter(zeros, requires_grad=tensor.requires_grad)
                    made[id(tensor)] = zeros
                store[key] = made[id(tensor)]
    return model


def _output_shape(
    model: nn.Module, input_shape: tuple[int, ...], tokens: bool = False
) -> tuple[int, ...]:
    """The model's output shape for one input of `input_shape` (token ids when `tokens`):
    proves the shape fits."""
    probe = _materialised(_skeleton(model))
    probe.load_state_dict(model.state_dict())
    probe.eval()
    try:
        with torch.no_grad():
            out = probe(torch.zeros(1, *input_shape, dtype=torch.long if tokens else None))
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if tokens:
            raise ConfigError(
                f"input_shape={input_shape}: the model cannot take one sequence of "
                f"{input_shape[0]} token ids ({reason}); (L,) declares a language model's "
                "token ids, and a model on flat vectors takes images (C, H, W) and flattens "
                "them itself"
            ) from None
        raise ConfigError(
            f"input_shape={input_shape}: the model cannot take one input of that shape ({reason})"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"model: its forward returns a {type(out).__name__}; the attacks replay a "
            "classifier whose forward returns the logits tensor (wrap the model so that it "
            "does, e.g. returning the first element)"
        )
    return tuple(out.shape)


def _by_name(what: str, tensors: object, names: list[str]) -> dict[str, torch.Tensor]:
    """`tensors` as name -> tensor: a mapping as given, any other collection (a tuple is what
    `torch.func` returns for a tuple of parameters) in model.parameters() order."""
    if isinstance(tensors, Mapping):
        return dict(tensors)
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Iterable):
        raise ConfigError(
            f"{what}: a {type(tensors).__name__}; pass a name -> tensor mapping or one tensor "
            "per parameter in model.parameters() order"
        )
    tensors = list(tensors)
    if len(tensors) != len(names):
        raise ConfigError(
            f"{what}: {len(tensors)} tensors for the model's {len(names)} parameters; pass "
            "one per parameter in model.parameters() order, or a name -> tensor mapping"
        )
    return dict(zip(names, tensors, strict=True))


def _one_per_parameter(
    what: str, tensors: object, names: list[str], holder: str
) -> dict[str, torch.Tensor]:
    """`tensors` by name (`_by_name`), refused unless it holds exactly the model's parameters."""
    tensors = _by_name(what, tensors, names)
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise ConfigError(f"{what}: {unknown[0]!r} is not a parameter of the model")
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ConfigError(
            f"{what}: no tensor for the model's parameter {missing[0]!r}; {holder} holds one "
            "for every parameter"
        )
    return tensors


def _number(value: object) -> bool:
    # numpy's integers and floats are numbers.Real too; bools are not counts.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _whole(name: str, value: object, low: int = 1) -> int:
    """An integer argument of at least `low` (not a bool, not a float with a fraction)."""
    if not (_number(value) and math.isfinite(value) and value == int(value) and value >= low):
        raise ConfigError(f"{name}={value!r}: expected an integer >= {low}")
    return int(value)


def _positive(name: str, value: object) -> float:
    """A finite number argument above 0."""
    if not (_number(value) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={value!r}: expected a finite number > 0")
    return float(value)


def _tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise ConfigError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _check_shapes(
    name: str,
    tensors: Mapping[str, Tensor],
    shapes: Mapping[str, torch.Size],
    lead: int | None,
    gradient: bool = True,
) -> None:
    """Each tensor has its parameter's shape (after a leading dimension of `lead`, if given),
    and a `gradient`'s values are floating-point (weights may hold integer buffers)."""
    for key, tensor in tensors.items():
        _tensor(f"{name}[{key!r}]", tensor)
        wanted = tuple(shapes[key]) if lead is None else (lead, *shapes[key])
        if tuple(tensor.shape) != wanted:
            raise ConfigError(f"{name}: {key!r} has shape {tuple(tensor.shape)}, expected {wanted}")
        if gradient and not tensor.is_floating_point():
            # Cast silently, counts or a mask would be attacked as if they were a gradient.
            raise ConfigError(
                f"{name}: {key!r} is {tensor.dtype}; expected floating-point values, the "
                "gradient or weight delta the client computed"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(
                f"{name}: {key!r} holds NaN or infinite values; no client's training sends "
                "them, and no attack can match them"
            )


def observe(
    model: nn.Module,
    update: Mapping[str, Tensor] | Sequence[Tensor],
    *,
    input_shape: Sequence[int],
    num_examples: int,
    num_classes: int | None = None,
    kind: UpdateKind = "gradient",
    batch_size: int | None = None,
    local_steps: int = 1,
    learning_rate: float = 0.1,
    defense: str = "none",
    weights: Mapping[str, Tensor] | None = None,
    round: int = 1,
    client_id: int = 0,
    per_sample_updates: Mapping[str, Tensor] | None = None,
    bn_statistics: Mapping[str, Tensor] | None = None,
) -> Observation:
    """What a curious server sees of one client's update, from your own model and update.

    `update`: the shared gradient (`kind="gradient"`, FedSGD), or the weight delta after local
    training (`kind="delta"`, FedAvg), as a name -> tensor mapping or in `model.parameters()`
    order (what `torch.autograd.grad` returns). `weights`: the weights the update was computed
    at (default: the model's current state). `num_examples`, `batch_size`, `local_steps`,
    `learning_rate`: the local-training protocol the client declares; a delta is replayed as
    `local_steps` SGD steps where step k trains on the `batch_size` samples starting at
    k * batch_size mod num_examples, wrapping around (a data loader that reshuffles each
    epoch or ends one on a shorter batch made another update). `defense`: the public
    defense spec the update went through (adaptive attacks read it). `bn_statistics`: the
    batch mean and variance each BatchNorm layer normalised the client's batch with
    (`<module>.mean`, `<module>.var`; `batchnorm_statistics(model, inputs)` computes them),
    where the threat model lets the server see them (GradInversion's `bn-mode="exact"`).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    wide = [(name, p.dtype) for name, p in model.named_parameters() if p.dtype != torch.float32]
    if wide:
        raise ConfigError(
            f"model: parameter {wide[0][0]!r} is {wide[0][1]}; fedleak's attacks and metrics "
            "work in float32 (pass model.float())"
        )
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ConfigError(
            f"model: parameter {frozen[0]!r} is frozen (requires_grad=False); fedleak's "
            "attacks match a gradient for every parameter: hold fixed tensors as buffers "
            "(register_buffer), or pass a model whose parameters all train"
        )
    random = random_in_training(model)
    if random is not None:
        raise ConfigError(f"model: {random}")
    # BatchNorm and InstanceNorm that track running statistics use them in eval() only.
    tracking = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]
    if not model.training and tracking:
        kind = type(tracking[0]).__name__
        raise ConfigError(
            f"model: in eval() mode with {kind}, which normalises differently in training; "
            "attacks replay a client's training step (train mode): pass the model in train() "
            "mode, as it computed the update"
        )
    names = [name for name, _ in model.named_parameters()]
    tensors = _one_per_parameter("update", update, names, "a client's update")
    shapes = {name: p.shape for name, p in model.named_parameters()}
    _check_shapes("update", tensors, shapes, None)
    if kind not in UPDATE_KINDS:
        raise ConfigError(f"kind={kind!r}: expected one of {', '.join(UPDATE_KINDS)}")
    examples = _whole("num_examples", num_examples)
    batch = examples if batch_size is None else _whole("batch_size", batch_size)
    steps = _whole("local_steps", local_steps)
    if batch > examples:
        raise ConfigError(
            f"batch_size={batch}: larger than the num_examples={examples} a batch is drawn "
            "from; expected at most num_examples"
        )
    if kind == "gradient" and (steps != 1 or batch != examples):
        # FedSGD's one gradient is the mean over all the examples it was computed from.
        raise ConfigError(
            f"kind='gradient' with batch_size={batch} and local_steps={steps}: a gradient "
            f"is one step over all num_examples={examples}; expected batch_size={examples} "
            "(or leave it out) and local_steps=1, or kind='delta' for local training"
        )
    if kind == "delta" and examples > batch * steps:
        raise ConfigError(
            f"num_examples={examples}: a delta from {steps} local steps of {batch} examples "
            f"trained on at most {batch * steps}"
        )
    rate = _positive("learning_rate", learning_rate)
    try:
        pipeline = parse_defense_spec(defense)
    except ValueError as error:
        raise ConfigError(f"defense={defense!r}: {error}") from None
    # An update the declared defense cannot have released: the adaptive attacks would match
    # a defense it never went through (audit FG1).
    _check_released(defense, pipeline, tensors, "the update", "the update")
    if per_sample_updates is not None and kind != "gradient":
        # Replayed as gradients, each sample's delta came back negated (1.8 dB against 55.7).
        raise ConfigError(
            f"per_sample_updates: given with kind={kind!r}; per-sample updates are each "
            "sample's gradient at the weights sent (FedSGD), as runs share them; expected "
            "kind='gradient' or no per_sample_updates"
        )
    if per_sample_updates is not None:
        per_sample_updates = _one_per_parameter(
            "per_sample_updates", per_sample_updates, names, "each sample's update"
        )
        _check_shapes("per_sample_updates", per_sample_updates, shapes, examples)
        _check_released(
            defense,
            pipeline,
            per_sample_updates,
            "per_sample_updates",
            "each sample's update",
            batched=True,
        )
    if bn_statistics is not None:
        bn_statistics = _batchnorm_statistics(model, bn_statistics)
    if not isinstance(input_shape, Sequence) or len(input_shape) not in (1, 3):
        raise ConfigError(
            f"input_shape={input_shape!r}: expected one image's shape (C, H, W), or (L,) for a "
            "language model's sequences of L token ids; a model on flat vectors flattens its "
            "images itself"
        )
    tokens = len(input_shape) == 1
    shape = tuple(_whole("input_shape", d, low=2 if tokens else 1) for d in input_shape)
    out = _output_shape(model, shape, tokens)
    if tokens:
        classes = _vocabulary(out, shape[0], num_classes)
    elif num_classes is None:
        if len(out) != 2:
            raise ConfigError(
                f"num_classes: the model's output has shape {out} for one input; pass "
                "num_classes= explicitly"
            )
        classes = out[1]
        if classes < 2:
            raise ConfigError(
                f"num_classes: the model's output has {classes} column for one input; a "
                "classifier of at least 2 classes is expected"
            )
    else:
        classes = _whole("num_classes", num_classes, low=2)
        if len(out) == 2 and out[1] != classes:
            raise ConfigError(
                f"num_classes={classes}: the model scores {out[1]} classes for one input; "
                f"expected num_classes={out[1]} (or leave it out)"
            )
    own = model.state_dict()
    state = own if weights is None else weights
    missing = [key for key in own if key not in state]
    if missing:
        raise ConfigError(f"weights: no entry for the model's {missing[0]!r}")
    if weights is not None:
        stray = sorted(set(state) - set(own))
        if stray:
            raise ConfigError(f"weights: {stray[0]!r} is not in the model's state")
        _check_shapes(
            "weights", dict(state), {k: v.shape for k, v in own.items()}, None, gradient=False
        )
    return Observation(
        round=_whole("round", round),
        client_id=_whole("client_id", client_id, low=0),
        model=model_spec_for(model, shape, classes, "tokens" if tokens else "image"),
        weights={k: v.detach().cpu().clone() for k, v in state.items()},
        # Copies: a caller's optimiser step or zero_grad() must not change what was seen.
        update={n: _copy(tensors[n]) for n in names},
        update_kind=kind,
        num_examples=examples,
        batch_size=batch,
        local_steps=steps,
        learning_rate=rate,
        defense=defense,
        per_sample_updates=(
            None
            if per_sample_updates is None
            else {k: _copy(v) for k, v in per_sample_updates.items()}
        ),
        bn_statistics=bn_statistics,
        modality="tokens" if tokens else "image",
    )


def _check_released(
    defense: str,
    pipeline: DefensePipeline,
    tensors: Mapping[str, Tensor],
    argument: str,
    what: str,
    batched: bool = False,
) -> None:
    """`ConfigError` naming `argument` where `tensors` (each sample's along dim 0 when
    `batched`) cannot be what `defense` released."""
    contradiction = pipeline.contradiction(tensors, batched=batched)
    if contradiction is not None:
        raise ConfigError(
            f"defense={defense!r}: {argument}: {contradiction}; pass {what} as the defense "
            "released it, or the defense it went through"
        )


def batchnorm_statistics(model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
    """The batch mean and variance each BatchNorm layer of `model` normalises `inputs` with
    in train mode (`<module>.mean`, `<module>.var`), for `observe(..., bn_statistics=)`; the
    model's running statistics are left as they were."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not has_batchnorm(model):
        raise ConfigError("model: no BatchNorm layer, so there are no batch statistics")
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        given = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ConfigError(f"inputs: expected a float tensor, the client's batch; got {given}")
    wanted = next((p.dtype for p in model.parameters()), inputs.dtype)
    if inputs.dtype != wanted:
        raise ConfigError(
            f"inputs: {inputs.dtype}, the model's parameters are {wanted}; expected inputs of "
            f"the model's dtype (inputs.to({wanted}))"
        )
    try:
        return training_gradients.batchnorm_statistics(model, inputs)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ConfigError(
            f"inputs: the model cannot take a batch of shape {tuple(inputs.shape)} "
            f"({one_line(f'{type(error).__name__}: {error}', 200)})"
        ) from None


def _batchnorm_statistics(model: nn.Module, given: object) -> dict[str, Tensor]:
    """`bn_statistics` checked against the model's BatchNorm layers, copied: a mean and a
    non-negative variance of one value per channel for each, and nothing else."""
    layers = {
        name: module.num_features
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }
    if not layers:
        raise ConfigError(
            "bn_statistics: the model has no BatchNorm layer, so there are no batch statistics "
            "to share; leave bn_statistics out"
        )
    if not isinstance(given, Mapping):
        raise ConfigError(
            f"bn_statistics: expected a mapping of '<module>.mean' and '<module>.var' to "
            f"tensors, got {type(given).__name__}"
        )
    wanted = [f"{name}.{kind}" for name in layers for kind in ("mean", "var")]
    missing = [key for key in wanted if key not in given]
    stray = sorted(str(key) for key in given if key not in wanted)
    if missing or stray:
        which = f"no entry for {missing[0]!r}" if missing else f"{stray[0]!r} names no layer"
        raise ConfigError(
            f"bn_statistics: {which}; expected '<module>.mean' and '<module>.var' for each "
            f"BatchNorm layer ({', '.join(layers)})"
        )
    checked_stats = {}
    for key in wanted:
        value = given[key]
        channels = layers[key.rpartition(".")[0]]
        if not isinstance(value, Tensor) or tuple(value.shape) != (channels,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(
                f"bn_statistics[{key!r}]: expected a tensor of shape ({channels},), one value "
                f"per channel, got {shape}"
            )
        value = value.detach().float().cpu().clone()
        if not bool(torch.isfinite(value).all()) or (key.endswith(".var") and value.min() < 0):
            raise ConfigError(
                f"bn_statistics[{key!r}]: expected finite values"
                + (", a variance >= 0" if key.endswith(".var") else "")
            )
        checked_stats[key] = value
    return checked_stats


def _vocabulary(out: tuple[int, ...], length: int, num_classes: object) -> int:
    """The vocabulary of a language model whose output for one sequence of `length` tokens
    has shape `out`: next-token logits [1, L, V]."""
    if len(out) != 3 or out[:2] != (1, length) or out[2] < 2:
        raise ConfigError(
            f"input_shape=({length},): the model's output for one sequence of {length} token "
            f"ids has shape {out}; a language model returns next-token logits [1, {length}, V] "
            "over a vocabulary of V >= 2 tokens"
        )
    if num_classes is not None and _whole("num_classes", num_classes, low=2) != out[2]:
        raise ConfigError(
            f"num_classes={num_classes}: the model scores a vocabulary of {out[2]} tokens; "
            f"expected num_classes={out[2]} (or leave it out)"
        )
    return out[2]


def _copy(tensor: Tensor) -> Tensor:
    """A float32 CPU copy that shares no memory with the caller's tensor."""
    return tensor.detach().to("cpu", torch.float32, copy=True)


def knowledge(
    observation: Observation,
    aux_inputs: Tensor | None = None,
    aux_labels: Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> AttackerKnowledge:
    """The attacker's resources for an observation: its own auxiliary data (none by default),
    shaped like the observed model's inputs, on `device`; `seed` seeds the attack's own random
    draws (a run's attacks take `fedleak.seeds.attacker_seed` of the run's seed). A language
    model's auxiliary data are token sequences [N, L], which are their own labels (leave
    `aux_labels` out)."""
    if not isinstance(observation, Observation):
        kind = type(observation).__name__
        raise ConfigError(f"observation: expected an Observation (fedleak.observe), got {kind}")
    shape = tuple(observation.model.input_shape)
    tokens = observation.modality == "tokens"
    if aux_inputs is None:
        aux_inputs = torch.zeros(0, *shape, dtype=torch.long if tokens else None)
        aux_labels = None if tokens else torch.zeros(0, dtype=torch.long)
    _tensor("aux_inputs", aux_inputs)
    if tokens:
        _check_auxiliary_tokens(aux_inputs, aux_labels, shape, observation.model.num_classes)
        aux_labels = aux_inputs  # a causal language model's targets are its inputs
    if aux_labels is None or len(aux_labels) != len(aux_inputs):
        raise ConfigError("aux_labels: expected one label per auxiliary input")
    if tuple(aux_inputs.shape[1:]) != shape:
        raise ConfigError(
            f"aux_inputs: samples of shape {tuple(aux_inputs.shape[1:])}, expected {shape}"
        )
    if not tokens:
        _check_auxiliary_images(aux_inputs, aux_labels, observation.model.num_classes)
    target = _device(device)
    # Copies: the caller's tensors changed in place later (a normalisation, a relabelling)
    # would otherwise change the knowledge past the checks above (audit EL1).
    inputs = (aux_inputs.long() if tokens else aux_inputs.float()).detach().to(target, copy=True)
    return AttackerKnowledge(
        aux_inputs=inputs,
        aux_labels=inputs if tokens else aux_labels.detach().long().to(target, copy=True),
        input_shape=shape,
        num_classes=observation.model.num_classes,
        device=target,
        seed=attack_seed(seed),
    )


def _same_device(one: torch.device, other: torch.device) -> bool:
    """`cuda` and `cuda:0` are one device."""
    return (one.type, one.index or 0) == (other.type, other.index or 0)


def _device(device: object) -> torch.device:
    """A device attacks can run on here: the CPU, or a CUDA device this machine has."""
    try:
        target = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r}: expected cpu, cuda or cuda:N") from None
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if target.index is None else target.index
        if index >= count:
            raise ConfigError(
                f"device={device!r}: this machine has {count} CUDA device(s); use cpu"
                + (f" or cuda:0..cuda:{count - 1}" if count else "")
            )
    elif target.type != "cpu":
        raise ConfigError(f"device={device!r}: expected cpu, cuda or cuda:N")
    return target


def _check_auxiliary_tokens(
    inputs: Tensor, labels: object, shape: tuple[int, ...], vocabulary: int
) -> None:
    """The attacker's text as a run's data set holds it: token ids [N, L] of the observed
    model's vocabulary."""
    own = isinstance(labels, Tensor) and labels.shape == inputs.shape and labels.equal(inputs)
    if labels is not None and not own:
        raise ConfigError(
            "aux_labels: token sequences are their own next-token targets; leave aux_labels out"
        )
    if inputs.is_floating_point() or inputs.dtype == torch.bool or inputs.dim() != 2:
        raise ConfigError(
            f"aux_inputs: expected token ids [N, {shape[0]}] (an integer tensor), got "
            f"{inputs.dtype} of shape {tuple(inputs.shape)}"
        )
    if inputs.numel() and not 0 <= int(inputs.min()) <= int(inputs.max()) < vocabulary:
        raise ConfigError(
            f"aux_inputs: token ids from {int(inputs.min())} to {int(inputs.max())}; expected "
            f"0..{vocabulary - 1} (the model's vocabulary)"
        )


def _check_auxiliary_images(inputs: Tensor, labels: Tensor, num_classes: int) -> None:
    """The attacker's images as a run's data set holds them: float pixels in [0, 1] (the model
    normalises inside, if at all), one class index per image."""
    _tensor("aux_inputs", inputs)
    _tensor("aux_labels", labels)
    if not inputs.is_floating_point():
        raise ConfigError(
            f"aux_inputs: {inputs.dtype} images; expected float pixels in [0, 1] (divide 8-bit "
            "pixels by 255)"
        )
    if inputs.numel() and not (
        torch.isfinite(inputs).all() and 0 <= inputs.min() <= inputs.max() <= 1
    ):
        raise ConfigError(
            f"aux_inputs: pixel values from {float(inputs.min()):.4g} to "
            f"{float(inputs.max()):.4g}; expected images in [0, 1] (a normalised data set: "
            "undo the normalisation and let the model do it)"
        )
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ConfigError(
            f"aux_labels: expected integer class indices [N], got {labels.dtype} of shape "
            f"{tuple(labels.shape)}"
        )
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ConfigError(
            f"aux_labels: classes from {int(labels.min())} to {int(labels.max())}; expected "
            f"0..{num_classes - 1}"
        )


def _check_auxiliary_count(
    attack: Attack, observation: Observation, attacker: AttackerKnowledge
) -> None:
    """Refuse, in the API's own words, an attack that needs more auxiliary data than given
    (the attack's own check speaks of a run's data.aux-size)."""
    check = getattr(attack, "check_feasible", None)
    if check is None:
        return
    targets, count = observation.num_targets, len(attacker.aux_inputs)
    try:
        check(targets, count)
    except ValueError as error:
        try:
            check(targets, max(count, 1) * 10**6)
        except ValueError:
            raise ConfigError(str(error)) from None
        name = getattr(attack, "name", type(attack).__name__)
        own = (
            "sequences as aux_inputs"
            if observation.modality == "tokens"
            else "images as aux_inputs, aux_labels"
        )
        raise ConfigError(
            f"aux_inputs: {name} needs more auxiliary data than the {count} samples given; "
            f"pass the attacker's own {own}"
        ) from None


def reconstruct(
    attack: Attack,
    observation: Observation,
    aux_inputs: Tensor | None = None,
    aux_labels: Tensor | None = None,
    *,
    attacker: AttackerKnowledge | None = None,
    max_iterations: int = 2000,
    max_seconds: float = 120.0,
    device: str | torch.device | None = None,
    threads: int | str | None = "auto",
    show_progress: bool = False,
) -> Reconstruction:
    """Run `attack` on `observation` with the attacker's auxiliary data (or a prepared
    `attacker` knowledge) under a budget; the guess comes back on the CPU.

    `device`: where the attack runs, the CPU by default; with `attacker=`, its own device
    (another one is refused: the knowledge was placed there).

    `threads`: torch intra-op threads while the attack runs; "auto" takes one for models under
    a million parameters on the CPU (several threads only wait on each other there), None
    keeps the process's setting.
    """
    if not callable(getattr(attack, "reconstruct", None)):
        raise ConfigError(
            f"attack: expected an attack (fedleak.build_attack(name)), got {type(attack).__name__}"
        )
    _flag("show_progress", show_progress)
    if not isinstance(observation, Observation):
        kind = type(observation).__name__
        raise ConfigError(f"observation: expected an Observation (fedleak.observe), got {kind}")
    if attacker is None:
        where = _device("cpu" if device is None else device)
        attacker = knowledge(observation, aux_inputs, aux_labels, device=where)
    elif aux_inputs is not None or aux_labels is not None:
        raise ConfigError(
            "aux_inputs, aux_labels: given beside attacker=, which holds the auxiliary data "
            "already; pass one or the other"
        )
    elif not isinstance(attacker, AttackerKnowledge):
        kind = type(attacker).__name__
        raise ConfigError(f"attacker: expected fedleak.knowledge(...)'s result, got {kind}")
    elif device is not None and not _same_device(_device(device), torch.device(attacker.device)):
        # It ran on the knowledge's device without a word (audit DV6).
        raise ConfigError(
            f"device={str(device)!r}: the attacker's knowledge is on {attacker.device}; build it "
            "with fedleak.knowledge(..., device=) or leave device out"
        )
    elif (tuple(attacker.input_shape), attacker.num_classes) != (
        tuple(observation.model.input_shape),
        observation.model.num_classes,
    ):
        raise ConfigError(
            f"attacker: knowledge of inputs {tuple(attacker.input_shape)} and "
            f"{attacker.num_classes} classes, but the observation's model takes "
            f"{tuple(observation.model.input_shape)} and scores "
            f"{observation.model.num_classes}; build it with fedleak.knowledge(observation, ...)"
        )
    modalities = attack_modalities(attack)
    if observation.modality not in modalities:
        name = getattr(attack, "name", type(attack).__name__)
        raise ConfigError(
            f"attack: {name} reconstructs {', '.join(modalities)}, but the observation's "
            f"inputs are {observation.modality}"
        )
    _check_auxiliary_count(attack, observation, attacker)
    budget = Budget(
        _whole("max_iterations", max_iterations),
        _positive("max_seconds", max_seconds),
        show_progress,
    )
    if threads == "auto":
        count = default_threads(observation, attacker.device)
    else:
        count = None if threads is None else _whole("threads", threads)
    start = time.perf_counter()
    read_only = ReadOnly([observation], attacker)
    with torch_threads(count), isolated(attack, [observation], attacker.seed, read_only):
        result = attack.reconstruct(observation, attacker, budget)
    # The auditor's one rule: images clamped to [0, 1], NaN is "nan", a wrong shape "failed".
    seconds = time.perf_counter() - start
    return checked(
        result,
        seconds,
        observation.num_targets,
        image_shape(observation),
        num_classes(observation),
    )


@dataclass(frozen=True)
class Leakage:
    """How much of a private batch a reconstruction reveals, per matched pair.

    `pairs`: (reconstruction index, private index) of each matched pair; `mse`, `psnr`, `ssim`,
    `lpips` are per pair (LPIPS NaN when it was not computed); `unmatched`: the private samples
    no reconstruction was paired with (a guess of fewer samples than the batch held), which
    count as not reconstructed; `label_accuracy`: the share of the private labels recovered,
    over every private sample: per pair when each sample's update was shared alone, else as a
    multiset (a batch update says which labels it holds, not which image carries which).
    """

    pairs: list[tuple[int, int]]
    mse: Tensor
    psnr: Tensor
    ssim: Tensor
    lpips: Tensor
    label_accuracy: float
    unmatched: list[int]

    def summary(self) -> dict[str, float]:
        """Means over the matched pairs, the label accuracy, and how many private samples
        were left unmatched."""
        return {
            "mse": float(self.mse.mean()),
            "psnr": float(self.psnr.mean()),
            "ssim": float(self.ssim.mean()),
            "lpips": float(self.lpips.mean()),
            "label_accuracy": self.label_accuracy,
            "unmatched": float(len(self.unmatched)),
        }


@dataclass(frozen=True)
class TextLeakage:
    """How much of a private batch of token sequences a reconstruction reveals, per matched
    pair.

    `token_accuracy`: the share of positions whose token was recovered (the LTI paper's
    accuracy); `rouge1`, `rouge2`, `rougeL`: F-measures of the decoded texts, NaN without a
    `decode` and where the truth holds no word (for ROUGE-2, no word pair); `pairs` and
    `unmatched` as in `Leakage`.
    """

    pairs: list[tuple[int, int]]
    token_accuracy: Tensor
    rouge1: Tensor
    rouge2: Tensor
    rougeL: Tensor
    unmatched: list[int]

    def summary(self) -> dict[str, float]:
        """Means over the matched pairs (ROUGE over the pairs where it is defined, as the
        reports average it), and how many private sequences were left unmatched."""
        means = {"token_accuracy": float(self.token_accuracy.mean())}
        for name in ROUGE_TYPES:
            values = getattr(self, name)
            defined = values[~values.isnan()]
            means[name] = float(defined.mean()) if defined.numel() else math.nan
        return {**means, "unmatched": float(len(self.unmatched))}


def _flag(name: str, value: object) -> None:
    """A yes/no argument is a bool: any other value ("no" included) read as true."""
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f"{name}={value!r}: expected True or False")


def score(
    reconstruction: Reconstruction | Tensor,
    inputs: Tensor,
    labels: Tensor | None = None,
    *,
    observation: Observation | None = None,
    lpips: bool = True,
    decode: Callable[[list[int]], str] | None = None,
) -> Leakage | TextLeakage:
    """Pair each reconstructed sample with a private one and measure the pairs as a run's
    auditor does: MSE, PSNR, SSIM, LPIPS (AlexNet), and label accuracy when labels are given;
    for token sequences (integer `inputs` [N, L]), token accuracy and, with `decode` (token
    ids -> text, the tokenizer's), ROUGE-1/2/L in a `TextLeakage`.

    Pass the `observation` the attack saw: when it holds per-sample updates (each sample's
    update shared alone), reconstruction i is scored against private sample i, as the auditor
    scores it; otherwise (a batch update, which gives its samples in no order) the pairs are
    the Hungarian assignment on MSE (on mismatched positions for tokens). Guesses are clamped
    to [0, 1] as the auditor scores them; private images must lie there. Under MixUp or
    InstaHide a run's auditor also scores against the encoded images and each encoding's
    sources, which this function is not given."""
    _flag("lpips", lpips)
    _tensor("inputs", inputs)
    if observation is not None and not isinstance(observation, Observation):
        kind = type(observation).__name__
        raise ConfigError(f"observation: expected the Observation the attack saw, got {kind}")
    if not inputs.is_floating_point() and inputs.dim() == 2:
        return _score_tokens(reconstruction, inputs, labels, observation, decode)
    if observation is not None and observation.modality == "tokens":
        raise ConfigError(
            f"inputs: {inputs.dtype} of shape {tuple(inputs.shape)}, but the observation's "
            "model reads token ids; expected the private sequences as integers [N, L]"
        )
    if decode is not None:
        raise ConfigError("decode: given for images; it turns token sequences into text")
    truth = inputs.detach().cpu()
    if not truth.is_floating_point() or truth.dim() != 4 or len(truth) == 0:
        raise ConfigError(
            f"inputs: expected float images [N, C, H, W] in [0, 1], N >= 1, got {truth.dtype} "
            f"of shape {tuple(truth.shape)}"
        )
    truth = truth.float()
    if truth.numel() and not (torch.isfinite(truth).all() and 0 <= truth.min() <= truth.max() <= 1):
        raise ConfigError(
            f"inputs: pixel values from {float(truth.min()):.4g} to {float(truth.max()):.4g}; "
            "expected images in [0, 1]"
        )
    if labels is not None:
        labels = _tensor("labels", labels).detach().cpu()
        if (
            tuple(labels.shape) != (len(truth),)
            or labels.is_floating_point()
            or labels.dtype == torch.bool  # True/False read as classes 1/0 (audit EL4)
        ):
            raise ConfigError(
                f"labels: expected {len(truth)} integer labels, one per input, got "
                f"{labels.dtype} of shape {tuple(labels.shape)}"
            )
        classes = None if observation is None else num_classes(observation)
        top = " >= 0" if classes is None else f" 0..{classes - 1}"
        if int(labels.min()) < 0 or (classes is not None and int(labels.max()) >= classes):
            raise ConfigError(
                f"labels: classes from {int(labels.min())} to {int(labels.max())}; expected "
                f"class indices{top}"
            )
    if not isinstance(reconstruction, Reconstruction):
        guess = _tensor("reconstruction", reconstruction)
        reconstruction = Reconstruction(inputs=guess, labels=None)
    inputs_guessed = reconstruction.inputs
    guessed = (
        tuple(inputs_guessed.shape[1:])
        if isinstance(inputs_guessed, Tensor) and inputs_guessed.dim()
        else ()
    )
    if reconstruction.status == "ok" and len(guessed) == 3 and guessed != tuple(truth.shape[1:]):
        raise ConfigError(
            f"inputs, reconstruction: private images of shape {tuple(truth.shape[1:])} and "
            f"guesses of shape {guessed}; expected both [N, C, H, W] of one image shape"
        )
    if reconstruction.status == "ok":
        count = reconstruction.inputs.shape[0] if reconstruction.inputs.dim() else 0
        classes = num_classes(observation) if observation is not None else None
        reconstruction = checked(
            reconstruction, reconstruction.seconds, count, truth.shape[1:], classes
        )
    if reconstruction.status != "ok":
        raise ConfigError(
            f"reconstruction status {reconstruction.status!r}: {reconstruction.message}"
        )
    # After the shape checks: an HWC batch reads as H channels and is refused for its shape.
    if lpips and truth.shape[1] not in (1, 3):
        raise ConfigError(
            f"inputs: {truth.shape[1]}-channel images; LPIPS scores 1- or 3-channel images "
            "only: pass lpips=False for the other metrics"
        )
    guess, predicted = reconstruction.inputs, reconstruction.labels
    alone = observation is not None and observation.per_sample_updates is not None
    in_order = alone and len(guess) == len(truth)
    nets = ("alex",) if lpips else ()
    # One thread, as a run's auditor scores: LPIPS at two threads differed in the 8th digit.
    with torch_threads(1):
        if in_order:
            recon_idx = truth_idx = torch.arange(len(truth))
        else:
            recon_idx, truth_idx = assign(guess, truth, metric="mse")
        scores = score_images(guess[recon_idx], truth[truth_idx], nets)
    nan = torch.full((len(recon_idx),), math.nan)
    accuracy = math.nan
    if labels is not None and predicted is not None:
        if in_order:
            accuracy = label_accuracy(predicted, labels)
        else:
            # Over every private label and every recovered one, wherever the pixels paired
            # them: a private sample no guess reached is not recovered.
            accuracy = label_multiset_accuracy(predicted, labels)
    return Leakage(
        pairs=list(zip(recon_idx.tolist(), truth_idx.tolist(), strict=True)),
        mse=scores["mse"],
        psnr=scores["psnr"],
        ssim=scores["ssim"],
        lpips=scores.get("lpips_alex", nan),
        label_accuracy=accuracy,
        unmatched=sorted(set(range(len(truth))) - set(truth_idx.tolist())),
    )


def _score_tokens(
    reconstruction: Reconstruction | Tensor,
    inputs: Tensor,
    labels: Tensor | None,
    observation: Observation | None,
    decode: Callable[[list[int]], str] | None,
) -> TextLeakage:
    """`score` for token sequences, as a run's auditor scores a language model's rows."""
    truth = inputs.detach().cpu().long()
    if inputs.dtype == torch.bool or len(truth) == 0:
        raise ConfigError(
            f"inputs: expected token ids [N, L], N >= 1, got {inputs.dtype} of shape "
            f"{tuple(inputs.shape)}"
        )
    if labels is not None:
        raise ConfigError(
            f"labels: given beside integer inputs of shape {tuple(truth.shape)}, which score as "
            "token sequences (their own next-token targets: leave labels out); images are "
            "floats [N, C, H, W] in [0, 1]"
        )
    if observation is not None and observation.modality != "tokens":
        raise ConfigError(
            f"inputs: token ids of shape {tuple(truth.shape)}, but the observation's model "
            f"reads images of shape {tuple(observation.model.input_shape)}"
        )
    vocabulary = None if observation is None else observation.model.num_classes
    _check_ids("inputs", truth, vocabulary)
    if decode is not None and not callable(decode):
        raise ConfigError(
            f"decode: expected a function of token ids to text (a tokenizer's decode), got "
            f"{type(decode).__name__}"
        )
    if not isinstance(reconstruction, Reconstruction):
        reconstruction = Reconstruction(
            inputs=_tensor("reconstruction", reconstruction), labels=None
        )
    if reconstruction.status == "ok":
        guessed = reconstruction.inputs
        count = guessed.shape[0] if isinstance(guessed, Tensor) and guessed.dim() else 0
        reconstruction = checked(reconstruction, reconstruction.seconds, count)
    if reconstruction.status != "ok":
        raise ConfigError(
            f"reconstruction status {reconstruction.status!r}: {reconstruction.message}"
        )
    guess = reconstruction.inputs
    if guess.is_floating_point() or guess.dim() != 2 or guess.shape[1] != truth.shape[1]:
        raise ConfigError(
            f"inputs, reconstruction: private sequences of shape {tuple(truth.shape)} and "
            f"guesses of {guess.dtype} of shape {tuple(guess.shape)}; expected both token ids "
            "[N, L] of one length"
        )
    guess = guess.long()
    _check_ids("reconstruction", guess, vocabulary)
    in_order = observation is not None and observation.per_sample_updates is not None
    if in_order and len(guess) == len(truth):
        recon_idx = truth_idx = torch.arange(len(truth))
    else:
        recon_idx, truth_idx = assign(guess, truth, metric="tokens")
    matched, targets = guess[recon_idx], truth[truth_idx]
    nan = torch.full((len(recon_idx),), math.nan)
    measures = dict.fromkeys(ROUGE_TYPES, nan)
    if decode is not None:
        texts = [_decoded(decode, t.tolist()) for t in (*matched, *targets)]
        scores = rouge(texts[: len(matched)], texts[len(matched) :])
        measures = {name: torch.tensor(values) for name, values in scores.items()}
    return TextLeakage(
        pairs=list(zip(recon_idx.tolist(), truth_idx.tolist(), strict=True)),
        token_accuracy=token_accuracy(matched, targets),
        **measures,
        unmatched=sorted(set(range(len(truth))) - set(truth_idx.tolist())),
    )


def _check_ids(name: str, ids: Tensor, vocabulary: int | None) -> None:
    """Token ids are whole numbers of the vocabulary (from 0, below `vocabulary` if known)."""
    if ids.numel() and (int(ids.min()) < 0 or (vocabulary and int(ids.max()) >= vocabulary)):
        bound = f"0..{vocabulary - 1}" if vocabulary else "ids >= 0"
        raise ConfigError(
            f"{name}: token ids from {int(ids.min())} to {int(ids.max())}; expected {bound}"
        )


def _decoded(decode: Callable[[list[int]], str], ids: list[int]) -> str:
    text = decode(ids)
    if not isinstance(text, str):
        raise ConfigError(f"decode: returned a {type(text).__name__} for token ids, not a str")
    return text
