"""Attacks by name: `build_attack("ig", {"restarts": 2}, seed=0)`.

`ATTACKS` maps each name to a factory `(params, seed) -> Attack`; hyper-parameters and their
defaults are documented in `fedleak.attacks.optimization.config`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fedleak.attacks.baseline import AuxMeanBaseline
from fedleak.attacks.frequency import TokenFrequencyBaseline
from fedleak.attacks.learned.attack import build_lti, build_lti_ig
from fedleak.attacks.learned.text import build_text_lti, build_text_lti_p
from fedleak.attacks.optimization.attacks import DLG, InvertingGradients, StepwiseInversion
from fedleak.attacks.optimization.config import (
    DLGConfig,
    GradInversionConfig,
    IGConfig,
    StepwiseConfig,
    configure,
)
from fedleak.attacks.optimization.tag import build_tag, build_tag_normalised
from fedleak.attacks.types import Attack

Factory = Callable[[Mapping[str, object], int], Attack]


class UnknownAttackError(ValueError):
    """An attack name that is not registered, or parameters for one that takes none."""


def _aux_mean(params: Mapping[str, object], _seed: int) -> Attack:
    if params:
        raise UnknownAttackError(f"attack 'aux-mean' takes no parameters, got {sorted(params)}")
    return AuxMeanBaseline()


def _aux_frequency(params: Mapping[str, object], _seed: int) -> Attack:
    if params:
        raise UnknownAttackError(
            f"attack 'aux-frequency' takes no parameters, got {sorted(params)}"
        )
    return TokenFrequencyBaseline()


ATTACKS: dict[str, Factory] = {
    "aux-mean": _aux_mean,
    "dlg": lambda p, s: DLG(configure(DLGConfig(), p), s, "dlg"),
    "idlg": lambda p, s: DLG(configure(DLGConfig(labels="auto"), p), s, "idlg"),
    "ig": lambda p, s: InvertingGradients(configure(IGConfig(), p), s, "ig"),
    "gradinversion": lambda p, s: InvertingGradients(
        configure(GradInversionConfig(), p), s, "gradinversion"
    ),
    "stepwise": lambda p, s: StepwiseInversion(configure(StepwiseConfig(), p), s, "stepwise"),
    "lti": build_lti,
    "lti+ig": build_lti_ig,
    # The language task (token sequences).
    "aux-frequency": _aux_frequency,
    "tag": lambda p, s: build_tag(dict(p), s),
    "tag-normalised": lambda p, s: build_tag_normalised(dict(p), s),
    "lti-text": build_text_lti,
    "lti-p": build_text_lti_p,
}

ATTACK_NAMES: tuple[str, ...] = tuple(ATTACKS)


def attack_modalities(attack: Attack) -> tuple[str, ...]:
    """What an attack reconstructs: its `modalities` attribute, images when it declares none."""
    return tuple(getattr(attack, "modalities", ("image",)))


def build_attack(name: str, params: Mapping[str, object] | None = None, *, seed: int = 0) -> Attack:
    """The attack registered under `name`, configured by `params` (keys as in the config
    dataclasses, dashes or underscores); `ValueError` subclasses on bad names or values."""
    if name not in ATTACKS:
        raise UnknownAttackError(f"attack {name!r} is unknown; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name](dict(params or {}), seed)
