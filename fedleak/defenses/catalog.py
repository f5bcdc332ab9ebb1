"""The built-in defenses, registered by name with their spec forms (`fedleak.defenses.registry`).

Imported on the first lookup of a defense name; plugins register the same way.
"""

from __future__ import annotations

import re

from fedleak.defenses.compress import SignCompression
from fedleak.defenses.encode import InstaHide, MixUp
from fedleak.defenses.noise import DPSGD, GaussianNoise
from fedleak.defenses.prune import Prune
from fedleak.defenses.registry import register_defense

_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[0-9]{1,9}")


def _number(text: str, what: str) -> float:
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{what}={text!r} is not a finite number")
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


@register_defense("prune", form="prune:P[:layer|:global]")
def _prune(args: list[str]) -> object:
    _arity(args, 1, 2, "prune:P[:layer|:global]")
    scope = args[1] if len(args) == 2 else "layer"
    return Prune(_number(args[0], "P"), scope)  # type: ignore[arg-type]


@register_defense("sign", form="sign")
def _sign(args: list[str]) -> object:
    _arity(args, 0, 0, "sign")
    return SignCompression()


@register_defense("gauss", form="gauss:SIGMA")
def _gauss(args: list[str]) -> object:
    _arity(args, 1, 1, "gauss:SIGMA")
    return GaussianNoise(_number(args[0], "SIGMA"))


@register_defense("dpsgd", form="dpsgd:C:Z")
def _dpsgd(args: list[str]) -> object:
    _arity(args, 2, 2, "dpsgd:C:Z")
    return DPSGD(_number(args[0], "C"), _number(args[1], "Z"))


@register_defense("mixup", form="mixup:K")
def _mixup(args: list[str]) -> object:
    _arity(args, 1, 1, "mixup:K")
    return MixUp(_integer(args[0], "K"))


@register_defense("instahide", form="instahide:K[:intra|:inter]")
def _instahide(args: list[str]) -> object:
    _arity(args, 1, 2, "instahide:K[:intra|:inter]")
    mode = args[1] if len(args) == 2 else "intra"
    if mode not in ("intra", "inter"):
        raise ValueError(f"mode {mode!r} must be intra or inter")
    return InstaHide(_integer(args[0], "K"), inter=mode == "inter")
