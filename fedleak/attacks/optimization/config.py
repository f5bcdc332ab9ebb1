"""Hyper-parameters of the optimisation attacks, with the papers' defaults, in one place.

Sources (texts in `shared/seeds/`):

- DLG (Zhu et al. 2019): L2 gradient matching, L-BFGS with step 1 and history 100, dummy
  inputs and soft labels drawn from N(0, 1) and optimised jointly. iDLG (Zhao et al. 2020)
  is DLG with the label read analytically from the last layer.
- Inverting Gradients (Geiping et al. 2020): cosine matching over all parameters, total
  variation, Adam with learning rate 0.1 on the *signs* of the input gradients, projection onto
  the data range after each step, learning rate x0.1 at 3/8, 5/8 and 7/8 of the iterations,
  restarts keeping the lowest matching loss. TV weight 1e-4 by default (the paper's value; best
  here on MNIST-5k digits, ~43 dB on the sigmoid LeNet). Natural images want more: on the
  embedded CIFAR-10 images 1e-2, GradAttack's best in its CIFAR-10 search, gives ~17.6 dB
  against ~12 dB at 1e-4 (set `attack.ig.tv-weight`).
- GradInversion-style BatchNorm prior as evaluated by GradAttack (Huang et al. 2021): the IG
  objective + alpha_BN * sum_l (||mean_l - mu_l||_2 + ||var_l - sigma_l^2||_2), alpha_BN = 1e-3;
  TV weight by defense as tuned there (0.05 pruning, 0.1 MixUp, 0.01 InstaHide; 1e-2 otherwise).
  Three threat models for the statistics: `exact` (the client shared its batch statistics:
  they are the prior's target), `infer` (the running statistics are the prior's target) and
  `proxy` (normalise with the running statistics). In `exact` and `infer` the dummy batch is
  normalised with its own statistics, as the client's was (see `replay`).
- Stepwise high-fidelity inversion (HFGradInv, Ye et al. 2024): match the gradients of the
  deepest layers first and add shallower layers stage by stage, with gradient dropout 0.3,
  switching on TV and then the BatchNorm prior at later stages.
- Defense-adaptive losses (LTI supplementary, Wu et al. 2023): under sign compression the squared
  hinge on sign agreement with one client's release (the sign of its batch-mean update, any B),
  and the cosine to the mean of tanh'ed dummy updates, one per client, for the aggregate-only
  view's mean of signs; under pruning the cosine over the kept coordinates only (see
  `fedleak.attacks.optimization.losses` for why the hinge also serves B > 1).

Every field can be set through `build_attack(name, params)` (dashes or underscores).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

LabelMethod = Literal["auto", "idlg", "rows", "counts", "joint"]
Init = Literal["randn", "rand", "half", "aux-mean"]
Matching = Literal["cosine", "l2"]
BatchNormMode = Literal["auto", "exact", "infer", "proxy"]

LABEL_METHODS: tuple[str, ...] = ("auto", "idlg", "rows", "counts", "joint")
INITS: tuple[str, ...] = ("randn", "rand", "half", "aux-mean")
MATCHINGS: tuple[str, ...] = ("cosine", "l2")
BATCHNORM_MODES: tuple[str, ...] = ("auto", "exact", "infer", "proxy")


class AttackConfigError(ValueError):
    """An attack hyper-parameter is unknown or out of range."""


@dataclass(frozen=True)
class InversionConfig:
    """What every optimisation attack shares.

    `labels`: how labels are obtained (`auto`: iDLG for one sample, the negative last-layer
    rows for distinct labels, HFGradInv counts for repeated labels, joint soft labels under
    MixUp/InstaHide). `adaptive`: choose the matching loss from the public defense spec.
    `restarts`: independent initialisations per target, optimised in the same batch; the one
    with the lowest matching loss is kept. `check_every`: iterations between the (synchronising)
    checks of the time budget, NaN and progress.
    """

    matching: Matching = "cosine"
    labels: LabelMethod = "auto"
    adaptive: bool = True
    restarts: int = 1
    init: Init = "randn"
    check_every: int = 50
    # Sign compression of one release: divide the squared hinge by ||g||^2 (losses.sign_hinge).
    normalised_hinge: bool = True
    # A mean of sign releases: tanh(scale * g_c / rms(g_c)) of each contributor's dummy update.
    tanh_scale: float = 1.0
    # Evolutionary search of HFGradInv label counts.
    count_population: int = 64
    count_generations: int = 60


@dataclass(frozen=True)
class DLGConfig(InversionConfig):
    """DLG: L2 matching, L-BFGS (no line search, as in DLG's code), joint soft labels."""

    matching: Matching = "l2"
    labels: LabelMethod = "joint"
    learning_rate: float = 1.0
    history: int = 100
    check_every: int = 25


@dataclass(frozen=True)
class IGConfig(InversionConfig):
    """Inverting Gradients: cosine + TV, Adam on signed gradients, boxed, step decay."""

    learning_rate: float = 0.1
    milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)
    decay: float = 0.1
    signed: bool = True
    boxed: bool = True
    # None: IG's 1e-4 (GradInversion: GradAttack's per-defense value, see `tv_weight_for`).
    tv_weight: float | None = None
    bn_weight: float = 0.0
    bn_mode: BatchNormMode = "auto"


@dataclass(frozen=True)
class GradInversionConfig(IGConfig):
    """IG + the BatchNorm statistics prior (GradAttack's alpha_BN = 1e-3)."""

    bn_weight: float = 1e-3


@dataclass(frozen=True)
class StepwiseConfig(IGConfig):
    """HFGradInv's stepwise inversion: `stages` stages from deep to shallow layers, each with
    IG's schedule restarted over its share of the iterations; gradient dropout `dropout`; TV
    from stage `tv_stage` on and the BatchNorm prior (models with BatchNorm) from `bn_stage` on
    (stages are numbered from 1)."""

    stages: int = 4
    dropout: float = 0.3
    tv_stage: int = 2
    bn_stage: int = 3
    bn_weight: float = 1e-3


# GradAttack's TV weights per defense (their section 5 / appendix A); 1e-2 without one.
GRADATTACK_TV = {"prune": 0.05, "mixup": 0.1, "instahide": 0.01, "none": 1e-2}
IG_TV = 1e-4


def _check(config: InversionConfig) -> None:
    def bad(name: str, allowed: str) -> AttackConfigError:
        value = getattr(config, name)
        return AttackConfigError(f"attack parameter {name}={value!r}: allowed {allowed}")

    choices = {
        "labels": LABEL_METHODS,
        "init": INITS,
        "matching": MATCHINGS,
        "bn_mode": BATCHNORM_MODES,
    }
    for name, allowed in choices.items():
        if hasattr(config, name) and getattr(config, name) not in allowed:
            raise bad(name, ", ".join(allowed))
    positive_ints = ["restarts", "check_every", "count_population", "count_generations"]
    positive_ints += [n for n in ("history", "stages") if hasattr(config, n)]
    for name in positive_ints:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(name, "a whole number >= 1")
    for name in ("learning_rate", "tanh_scale"):
        if hasattr(config, name) and not getattr(config, name) > 0:
            raise bad(name, "a number > 0")
    for name in ("bn_weight", "tv_weight"):
        value = getattr(config, name, 0.0)
        if value is not None and not value >= 0:
            raise bad(name, "a number >= 0")
    if hasattr(config, "decay") and not 0 < config.decay <= 1:
        raise bad("decay", "a number in (0, 1]")
    if hasattr(config, "milestones") and not all(0 < m < 1 for m in config.milestones):
        raise bad("milestones", "fractions in (0, 1)")
    if hasattr(config, "dropout") and not 0 <= config.dropout < 1:
        raise bad("dropout", "a number in [0, 1)")


def _coerce(key: str, current: object, value: object) -> object:
    """`value` in the type of the default `current` (ints become floats where floats are due)."""
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(current, tuple) and isinstance(value, list | tuple):
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value)
    elif isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float) or (current is None and key.endswith("weight")):
        if numeric or (current is None and value is None):
            return None if value is None else float(value)  # type: ignore[arg-type]
    elif isinstance(current, str) and isinstance(value, str):
        return value
    kind = "a list of numbers" if isinstance(current, tuple) else type(current).__name__
    raise AttackConfigError(f"attack parameter {key}={value!r}: expected {kind}")


C = TypeVar("C")


def configure(
    base: C, params: Mapping[str, object] | None, check: Callable[[Any], None] | None = None
) -> C:
    """`base` with `params` applied (keys may use dashes), validated by `check` (the inversion
    attacks' rules by default); one-line errors."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    updates: dict[str, Any] = {}
    for key, value in (params or {}).items():
        name = key.replace("-", "_")
        if name not in fields:
            allowed = ", ".join(n.replace("_", "-") for n in fields)
            raise AttackConfigError(f"unknown attack parameter {key!r}; allowed: {allowed}")
        updates[name] = _coerce(key, getattr(base, name), value)
    config = dataclasses.replace(base, **updates)
    (check or _check)(config)
    return config
