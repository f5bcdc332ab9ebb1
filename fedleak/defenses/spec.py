"""Defense spec strings and the pipeline they describe.

A spec is `none` or parts joined with `+` (grammar in `allowed_forms()`; defenses are
registered by name in `fedleak.defenses.registry`, plugins included). Whatever order the
parts are written in, the pipeline applies the declared order of a client's computation:

    encode (mixup | instahide) -> per-sample clip (dpsgd) -> mean
        -> noise (dpsgd noise, then gauss) -> compress (prune, then sign)

so `prune:0.9+instahide:4` and `instahide:4+prune:0.9` are the same pipeline, whose canonical
spec (`instahide:4+prune:0.9`) parses back to it. The same objects serve clients and adaptive
attackers, who replay a pipeline on their own guesses.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import Tensor

from fedleak.defenses.compress import SignCompression
from fedleak.defenses.encode import EncodedBatch, InstaHide, MixUp, PartnerPool
from fedleak.defenses.grammar import DefenseSpecError
from fedleak.defenses.prune import Prune
from fedleak.defenses.registry import DEFENSES, allowed_forms
from fedleak.registry import UnknownNameError

Encoder = MixUp | InstaHide
S = TypeVar("S")

# The applied order of the stages; within a stage, steps go by `rank`.
STAGES: tuple[str, ...] = ("encode", "clip", "release")

# `+` joins parts, except as the sign of a number: an exponent's (1e+3), or a value's right
# after its colon (mixup:+4, which no join can mean: it would leave the part 'mixup:').
_JOIN = re.compile(r"(?<![0-9.][eE])(?<!:)\+")


class Step(Protocol):
    """One defense of a pipeline (the contract is in `fedleak.defenses.registry`)."""

    kind: ClassVar[str]
    stage: ClassVar[str]
    rank: ClassVar[float]

    @property
    def spec(self) -> str:
        """This step's canonical spec part."""
        ...


@dataclass(frozen=True)
class DefensePipeline:
    """An ordered, conflict-free chain of defenses. `steps` are sorted into the applied order
    on construction (stage, then rank); `spec` is the canonical string."""

    steps: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        seen: dict[str, Any] = {}
        for step in self.steps:
            stage = getattr(step, "stage", None)
            if stage not in STAGES or not hasattr(step, "kind") or not hasattr(step, "spec"):
                raise DefenseSpecError(
                    f"{step!r} is not a defense step; allowed: {allowed_forms()}"
                )
            if stage != "encode" and not callable(getattr(step, "release", None)):
                raise DefenseSpecError(f"{step.kind}: a {stage} step needs a release() method")
            slot = "encode" if stage == "encode" else step.kind
            if slot in seen:
                what = "two input encodings" if stage == "encode" else f"{step.kind} twice"
                raise DefenseSpecError(
                    f"conflicting defense parts {seen[slot].spec!r} and {step.spec!r} "
                    f"({what}); allowed: {allowed_forms()}"
                )
            seen[slot] = step
        ordered = sorted(seen.values(), key=lambda s: (STAGES.index(s.stage), float(s.rank)))
        object.__setattr__(self, "steps", tuple(ordered))

    @property
    def spec(self) -> str:
        """The canonical spec string; `parse_defense_spec(p.spec) == p`."""
        return "+".join(step.spec for step in self.steps) or "none"

    def __str__(self) -> str:
        return self.spec

    def find(self, cls: type[S]) -> S | None:
        """The step of class `cls`, or None when the pipeline has none."""
        return next((step for step in self.steps if isinstance(step, cls)), None)

    @property
    def encoder(self) -> Encoder | None:
        """The input encoding (MixUp or InstaHide), if any."""
        return next((step for step in self.steps if step.stage == "encode"), None)

    @property
    def releases_signs(self) -> bool:
        """Whether the last step is sign compression: the update says directions, not sizes."""
        return bool(self.steps) and isinstance(self.steps[-1], SignCompression)

    def contradiction(self, grads: Mapping[str, Tensor], *, batched: bool = False) -> str | None:
        """Why `grads` cannot be what this pipeline released, or None: a value sign
        compression never shares, fewer zeros than pruning leaves. Read from the last step
        back while the steps are these two (a sign keeps pruned zeros); a plug-in's step may
        change anything."""
        for step in reversed(self.steps):
            if not isinstance(step, SignCompression | Prune):
                break
            reason = step.contradiction(dict(grads), batched=batched)
            if reason is not None:
                return reason
        return None

    @property
    def needs_per_sample(self) -> bool:
        """Whether the client must compute per-sample gradients (DP-SGD clips each sample)."""
        return any(step.stage == "clip" for step in self.steps)

    def encode(
        self,
        x: Tensor,
        y_onehot: Tensor,
        generator: torch.Generator,
        public: Tensor | None = None,
        private: PartnerPool | None = None,
    ) -> EncodedBatch:
        """The encoded batch; the identity (K = 1, no signs) when there is no encoder.
        `private` is the client's own data partners are drawn from (the batch when None)."""
        if not y_onehot.is_floating_point() or y_onehot.dim() != 2 or len(y_onehot) != len(x):
            raise ValueError(
                f"y_onehot: {y_onehot.dtype} of shape {tuple(y_onehot.shape)}; expected float "
                f"one-hot labels [{len(x)}, classes] (torch.nn.functional.one_hot(y).float())"
            )
        encoder = self.encoder
        if encoder is None:
            return EncodedBatch.identity(x, y_onehot)
        return encoder(x, y_onehot, generator, public, private)

    def clip(self, per_sample: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-sample clipping (leading dim = samples); the identity without a clip step."""
        rows = {t.shape[0] if t.dim() else -1 for t in per_sample.values()}
        if self.needs_per_sample and (len(rows) > 1 or -1 in rows):
            shapes = ", ".join(str(tuple(t.shape)) for t in list(per_sample.values())[:3])
            raise ValueError(
                f"per_sample: tensors of shapes {shapes}...; expected per-sample gradients, one "
                "row per sample in front of each parameter's shape (a batch gradient has none)"
            )
        out = dict(per_sample)
        for step in self.steps:
            if step.stage == "clip":
                out = _same_form(step, out, step.clip(out))
        return out

    def share(
        self, grad: dict[str, Tensor], batch_size: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """What leaves the client for a mean gradient of `batch_size` samples: DP noise
        (std Z*C/batch_size), Gaussian noise, pruning, sign. DP-SGD's clip is not here: it
        acts on each sample's gradient before the mean (`clip`)."""
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, numbers.Integral)
            or batch_size < 1
        ):
            raise ValueError(
                f"batch_size={batch_size!r}: expected an integer >= 1, the samples the mean "
                "gradient is over"
            )
        return self._release(grad, generator, dp_batch_size=batch_size, batched=False)

    def share_each(
        self, per_sample: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """`share` applied independently to each sample along dim 0 (DP noise as for a batch of
        one): the per-sample threat model, and training pairs for learned attacks."""
        return self._release(per_sample, generator, dp_batch_size=1, batched=True)

    def share_delta(
        self, delta: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """What leaves the client after FedAvg's local steps: Gaussian noise, pruning, sign
        (DP-SGD noise was already added at every local step)."""
        return self._release(delta, generator, dp_batch_size=None, batched=False)

    def _release(
        self,
        grads: dict[str, Tensor],
        generator: torch.Generator,
        dp_batch_size: int | None,
        batched: bool,
    ) -> dict[str, Tensor]:
        if not isinstance(grads, Mapping):
            raise TypeError(
                f"the update to defend: expected a parameter name -> tensor mapping, got "
                f"{type(grads).__name__} (e.g. dict(zip(names, torch.autograd.grad(...))))"
            )
        for name, value in grads.items():
            if not (isinstance(value, Tensor) and value.is_floating_point()):
                kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(f"the update to defend: {name!r} is {kind}, not a float tensor")
        if not isinstance(generator, torch.Generator):
            # None drew from the global RNG: the same seed no longer gave the same release.
            raise TypeError(
                f"generator: expected a torch.Generator, got {type(generator).__name__}"
            )
        out = dict(grads)
        for step in self.steps:
            if step.stage != "encode":
                released = step.release(
                    out, generator, batched=batched, dp_batch_size=dp_batch_size
                )
                out = _same_form(step, out, released)
        return out


class DefenseOutputError(ValueError):
    """A defense step changed the form of the update (a plugin's bug): the server would
    aggregate, and the attackers invert, something else than the model's update."""


def _all_finite(tensor: Tensor) -> bool:
    """Whether every value is finite. A finite sum proves it in one reduction (a NaN or an
    infinity makes the sum NaN or infinite), several times faster than `isfinite` on every
    value, which is left for finite values whose sum overflows."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _same_form(step: Any, before: dict[str, Tensor], after: object) -> dict[str, Tensor]:
    """`after`, if it holds a tensor of the same shape under each key of `before`, finite
    where `before` was."""
    problem, overflow = "", False
    if not isinstance(after, dict):
        problem = f"returned {type(after).__name__}, expected a dict of tensors"
    elif after.keys() != before.keys():
        missing, extra = sorted(before.keys() - after.keys()), sorted(after.keys() - before.keys())
        problem = f"changed the update's keys (missing {missing[:3]}, added {extra[:3]})"
    else:
        for key, value in after.items():
            if not isinstance(value, Tensor):
                problem = f"returned {type(value).__name__} for {key!r}, expected a tensor"
            elif value.shape != before[key].shape:
                problem = (
                    f"changed the shape of {key!r} from {tuple(before[key].shape)} to "
                    f"{tuple(value.shape)}"
                )
            elif not _all_finite(value) and _all_finite(before[key]):
                # No client's training sends NaN, and the global model would take it.
                problem = f"turned the finite {key!r} into NaN or infinite values"
                overflow = True
            if problem:
                break
    if problem:
        name = getattr(step, "spec", None) or type(step).__name__
        rule = (
            "its output must be finite where the update was (updates are float32: noise "
            "within a few orders of its largest number, 3.4e38, overflows once added or summed)"
            if overflow
            else "a defense returns every tensor of the update it is given, under the same key, "
            "in the same shape and finite where it was"
        )
        raise DefenseOutputError(f"defense {name!r} {problem}; {rule}")
    return after  # type: ignore[return-value]


def _parse_part(part: str) -> Any:
    name, *args = [field.strip() for field in part.split(":")]
    name = name.lower()
    try:
        entry = DEFENSES.get(name)
    except UnknownNameError:
        close = DEFENSES.closest(name)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ValueError(f"unknown defense {name!r}{hint}") from None
    return entry.parse([a.lower() for a in args])


def defense_names(spec: str) -> list[str]:
    """The registry names a well-formed spec uses, in its written order ("none": none)."""
    parts = [part.strip().split(":")[0].strip().lower() for part in _JOIN.split(spec)]
    return [name for name in parts if name and name != "none"]


def parse_defense_spec(spec: str) -> DefensePipeline:
    """The pipeline a spec string describes; `DefenseSpecError` (one line) when malformed.

    Names and keywords are case-insensitive and whitespace around parts is ignored.
    """
    if not isinstance(spec, str):
        raise DefenseSpecError(
            f"defense spec must be a string, got {spec!r}; allowed: {allowed_forms()}"
        )
    parts = [part.strip() for part in _JOIN.split(spec)]
    if len(parts) == 1 and parts[0].lower() == "none":
        return DefensePipeline()
    steps = []
    for part in parts:
        if part.lower() == "none":
            problem = "'none' cannot be combined with other defenses"
        elif not part:
            problem = "empty part"
        else:
            try:
                steps.append(_parse_part(part))
                continue
            except ValueError as error:  # DefenseSpecError too: add the part and the forms
                problem = str(error)
        raise DefenseSpecError(
            f"defense spec {spec!r}: bad part {part!r}: {problem}; allowed: {allowed_forms()}"
        )
    try:
        return DefensePipeline(tuple(steps))
    except DefenseSpecError as error:
        raise DefenseSpecError(f"defense spec {spec!r}: {error}") from None
