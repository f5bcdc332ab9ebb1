"""The grammar of defense spec strings: the accepted forms, number rendering, and the one error
that every malformed or conflicting spec raises."""

from __future__ import annotations

ALLOWED_FORMS = (
    "none | prune:P[:layer|:global] (0<=P<1) | sign | gauss:SIGMA (SIGMA>=0) | "
    "dpsgd:C:Z (C>0, Z>=0) | mixup:K | instahide:K[:intra|:inter] (integer K>=2), "
    "joined with '+' (each at most once, at most one of mixup/instahide)"
)


class DefenseSpecError(ValueError):
    """A defense spec (or a defense's parameter) is malformed or conflicts with another part."""


def format_number(value: float) -> str:
    """The shortest text that parses back to `value`, without a trailing `.0` and without the
    `+` of a positive exponent (`1e16`, not `1e+16`: `+` joins defenses)."""
    text = repr(float(value) + 0.0).replace("e+", "e")
    return text[:-2] if text.endswith(".0") else text
