"""Client-side defenses: gradient transforms and input encodings in one ordered pipeline.

Build one from a spec string with `parse_defense_spec("instahide:4+prune:0.9")`; add your own
with `register_defense` (see `fedleak.defenses.registry`). The same
objects serve clients (to defend) and adaptive attackers (to replay the defense).
"""

from fedleak.defenses.compress import SignCompression
from fedleak.defenses.encode import (
    MAX_COEFFICIENT,
    EncodedBatch,
    EncodingError,
    InstaHide,
    MixUp,
    PartnerPool,
    fold_toward,
    mix_images,
    mix_labels,
    unsigned,
)
from fedleak.defenses.grammar import ALLOWED_FORMS, DefenseSpecError
from fedleak.defenses.noise import DPSGD, GaussianNoise
from fedleak.defenses.prune import Prune, pruned_count
from fedleak.defenses.registry import DEFENSES, DefenseEntry, allowed_forms, register_defense
from fedleak.defenses.spec import (
    STAGES,
    DefenseOutputError,
    DefensePipeline,
    Encoder,
    Step,
    parse_defense_spec,
)

__all__ = [
    "ALLOWED_FORMS",
    "DEFENSES",
    "DPSGD",
    "MAX_COEFFICIENT",
    "STAGES",
    "DefenseEntry",
    "DefenseOutputError",
    "DefensePipeline",
    "DefenseSpecError",
    "EncodedBatch",
    "Encoder",
    "EncodingError",
    "GaussianNoise",
    "InstaHide",
    "MixUp",
    "PartnerPool",
    "Prune",
    "SignCompression",
    "Step",
    "allowed_forms",
    "fold_toward",
    "mix_images",
    "mix_labels",
    "parse_defense_spec",
    "pruned_count",
    "register_defense",
    "unsigned",
]
