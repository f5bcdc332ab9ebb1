"""Defense spec strings and the pipeline they describe.

A spec is `none` or parts joined with `+` (grammar in `ALLOWED_FORMS`). Whatever order the
parts are written in, the pipeline applies the declared order of a client's computation:

    encode (mixup | instahide) -> per-sample clip (dpsgd) -> mean
        -> noise (dpsgd noise, then gauss) -> compress (prune, then sign)

so `prune:0.9+instahide:4` and `instahide:4+prune:0.9` are the same pipeline, whose canonical
spec (`instahide:4+prune:0.9`) parses back to it. The same objects serve clients and adaptive
attackers, who replay a pipeline on their own guesses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from fedleak.defenses.compress import SignCompression
from fedleak.defenses.encode import EncodedBatch, InstaHide, MixUp, PartnerPool
from fedleak.defenses.grammar import ALLOWED_FORMS, DefenseSpecError
from fedleak.defenses.noise import DPSGD, GaussianNoise
from fedleak.defenses.prune import Prune

Step = MixUp | InstaHide | DPSGD | GaussianNoise | Prune | SignCompression
Encoder = MixUp | InstaHide
S = TypeVar("S")

# Position of each step in the applied order; the two encoders share a slot.
_RANK: dict[type, int] = {
    MixUp: 0,
    InstaHide: 0,
    DPSGD: 1,
    GaussianNoise: 2,
    Prune: 3,
    SignCompression: 4,
}

_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[0-9]{1,9}")
# `+` joins parts, except as the exponent sign of a number such as 1e+3.
_JOIN = re.compile(r"(?<![0-9.][eE])\+")


@dataclass(frozen=True)
class DefensePipeline:
    """An ordered, conflict-free chain of defenses. `steps` are sorted into the applied order
    on construction; `spec` is the canonical string."""

    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        seen: dict[int, Step] = {}
        for step in self.steps:
            if type(step) not in _RANK:
                raise DefenseSpecError(f"{step!r} is not a defense step; allowed: {ALLOWED_FORMS}")
            rank = _RANK[type(step)]
            if rank in seen:
                what = "two input encodings" if rank == 0 else f"{step.kind} twice"
                raise DefenseSpecError(
                    f"conflicting defense parts {seen[rank].spec!r} and {step.spec!r} "
                    f"({what}); allowed: {ALLOWED_FORMS}"
                )
            seen[rank] = step
        object.__setattr__(self, "steps", tuple(seen[rank] for rank in sorted(seen)))

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
        return self.find(MixUp) or self.find(InstaHide)

    @property
    def needs_per_sample(self) -> bool:
        """Whether the client must compute per-sample gradients (DP-SGD clips each sample)."""
        return self.find(DPSGD) is not None

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
        encoder = self.encoder
        if encoder is None:
            return EncodedBatch.identity(x, y_onehot)
        return encoder(x, y_onehot, generator, public, private)

    def clip(self, per_sample: dict[str, Tensor]) -> dict[str, Tensor]:
        """DP-SGD's per-sample clipping (leading dim = samples); the identity without dpsgd."""
        dp = self.find(DPSGD)
        return dict(per_sample) if dp is None else dp.clip(per_sample)

    def share(
        self, grad: dict[str, Tensor], batch_size: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """What leaves the client for a mean gradient of `batch_size` samples: DP noise
        (std Z*C/batch_size), Gaussian noise, pruning, sign."""
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
        out = dict(grads)
        dp = self.find(DPSGD)
        if dp is not None and dp_batch_size is not None:
            out = dp.noise(out, dp_batch_size, generator)
        gauss = self.find(GaussianNoise)
        if gauss is not None:
            out = gauss(out, generator)
        prune = self.find(Prune)
        if prune is not None:
            out = prune(out, batched=batched)
        sign = self.find(SignCompression)
        if sign is not None:
            out = sign(out)
        return out


def _number(text: str, what: str) -> float:
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{what}={text!r} is not a number")
    return float(text) + 0.0


def _integer(text: str, what: str) -> int:
    if text.isascii() and text.isdigit() and not _INTEGER.fullmatch(text):
        raise ValueError(f"{what}={text[:30]!r} is too large; expected a whole number below 10^9")
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{what}={text[:30]!r} is not a whole number")
    return int(text)


def _arity(args: list[str], low: int, high: int, form: str) -> None:
    if not low <= len(args) <= high:
        raise ValueError(f"expected the form {form}")


def _prune(args: list[str]) -> Step:
    _arity(args, 1, 2, "prune:P[:layer|:global]")
    scope = args[1] if len(args) == 2 else "layer"
    return Prune(_number(args[0], "P"), scope)  # type: ignore[arg-type]


def _sign(args: list[str]) -> Step:
    _arity(args, 0, 0, "sign")
    return SignCompression()


def _gauss(args: list[str]) -> Step:
    _arity(args, 1, 1, "gauss:SIGMA")
    return GaussianNoise(_number(args[0], "SIGMA"))


def _dpsgd(args: list[str]) -> Step:
    _arity(args, 2, 2, "dpsgd:C:Z")
    return DPSGD(_number(args[0], "C"), _number(args[1], "Z"))


def _mixup(args: list[str]) -> Step:
    _arity(args, 1, 1, "mixup:K")
    return MixUp(_integer(args[0], "K"))


def _instahide(args: list[str]) -> Step:
    _arity(args, 1, 2, "instahide:K[:intra|:inter]")
    mode = args[1] if len(args) == 2 else "intra"
    if mode not in ("intra", "inter"):
        raise ValueError(f"mode {mode!r} must be intra or inter")
    return InstaHide(_integer(args[0], "K"), inter=mode == "inter")


_PARSERS: dict[str, Callable[[list[str]], Step]] = {
    "prune": _prune,
    "sign": _sign,
    "gauss": _gauss,
    "dpsgd": _dpsgd,
    "mixup": _mixup,
    "instahide": _instahide,
}


def _parse_part(part: str) -> Step:
    name, *args = [field.strip() for field in part.split(":")]
    name = name.lower()
    if name not in _PARSERS:
        raise ValueError(f"unknown defense {name!r}")
    return _PARSERS[name]([a.lower() for a in args])


def parse_defense_spec(spec: str) -> DefensePipeline:
    """The pipeline a spec string describes; `DefenseSpecError` (one line) when malformed.

    Names and keywords are case-insensitive and whitespace around parts is ignored.
    """
    if not isinstance(spec, str):
        raise DefenseSpecError(
            f"defense spec must be a string, got {spec!r}; allowed: {ALLOWED_FORMS}"
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
            f"defense spec {spec!r}: bad part {part!r}: {problem}; allowed: {ALLOWED_FORMS}"
        )
    try:
        return DefensePipeline(tuple(steps))
    except DefenseSpecError as error:
        raise DefenseSpecError(f"defense spec {spec!r}: {error}") from None
