"""The built-in attacks, registered by name with their default settings
(`fedleak.attacks.registry`).

Imported on the first lookup of an attack name; plugins register the same way.
"""

from __future__ import annotations

from fedleak.attacks.baseline import AuxMeanBaseline, ClassMeanBaseline
from fedleak.attacks.frequency import TokenFrequencyBaseline
from fedleak.attacks.learned.attack import LearningToInvert
from fedleak.attacks.learned.config import LTI_PRESETS
from fedleak.attacks.learned.hybrid import HYBRID_PRESETS, build_hybrid
from fedleak.attacks.learned.text import (
    TEXT_LTI_P_PRESETS,
    TEXT_LTI_PRESETS,
    TextLearningToInvert,
)
from fedleak.attacks.optimization.attacks import DLG, InvertingGradients, StepwiseInversion
from fedleak.attacks.optimization.config import (
    DLGConfig,
    GradInversionConfig,
    IGConfig,
    StepwiseConfig,
)
from fedleak.attacks.optimization.tag import TAG, TAGConfig
from fedleak.attacks.registry import register_attack

register_attack("aux-mean", lambda _config, _seed: AuxMeanBaseline(), stateful=False)
register_attack("class-mean", lambda _config, seed: ClassMeanBaseline(seed), stateful=False)
register_attack("dlg", lambda c, s: DLG(c, s, "dlg"), config=DLGConfig(), stateful=False)
register_attack(
    "idlg", lambda c, s: DLG(c, s, "idlg"), config=DLGConfig(labels="auto"), stateful=False
)
register_attack(
    "ig", lambda c, s: InvertingGradients(c, s, "ig"), config=IGConfig(), stateful=False
)
register_attack(
    "gradinversion",
    lambda c, s: InvertingGradients(c, s, "gradinversion"),
    config=GradInversionConfig(),
    stateful=False,
)
register_attack(
    "stepwise",
    lambda c, s: StepwiseInversion(c, s, "stepwise"),
    config=StepwiseConfig(),
    stateful=False,
)
register_attack(
    "lti",
    lambda c, s: LearningToInvert(c, s, "lti"),
    presets=LTI_PRESETS,
    default_preset="cpu",
    stateful=True,
)
register_attack("lti+ig", build_hybrid, presets=HYBRID_PRESETS, default_preset="cpu", stateful=True)

# The language task (token sequences).
register_attack("aux-frequency", lambda _config, _seed: TokenFrequencyBaseline(), stateful=False)
register_attack("tag", lambda c, s: TAG(c, s, "tag"), config=TAGConfig(), stateful=False)
register_attack(
    "tag-normalised",
    lambda c, s: TAG(c, s, "tag-normalised"),
    config=TAGConfig(normalised_hinge=True),
    stateful=False,
)
register_attack(
    "lti-text",
    lambda c, s: TextLearningToInvert(c, s, "lti-text"),
    presets=TEXT_LTI_PRESETS,
    default_preset="cpu",
    stateful=True,
)
register_attack(
    "lti-p",
    lambda c, s: TextLearningToInvert(c, s, "lti-p"),
    presets=TEXT_LTI_P_PRESETS,
    default_preset="cpu",
    stateful=True,
)
