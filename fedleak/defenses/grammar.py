"""The grammar of defense spec strings: the accepted forms and the one error that every
malformed or conflicting spec raises (numbers are written by `fedleak.settings.format_number`)."""

from __future__ import annotations

ALLOWED_FORMS = (
    "none | prune:P[:layer|:global] (0<=P<1) | sign | gauss:SIGMA (SIGMA>=0) | "
    "dpsgd:C:Z (C>0, Z>=0) | mixup:K | instahide:K[:intra|:inter] (integer K>=2), "
    "joined with '+' (each at most once, at most one of mixup/instahide)"
)


class DefenseSpecError(ValueError):
    """A defense spec (or a defense's parameter) is malformed or conflicts with another part."""
