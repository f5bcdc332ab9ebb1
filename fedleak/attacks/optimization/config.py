"""Hyper-parameters of the optimisation attacks, with the papers' defaults, in one place.

Sources (texts in `shared/seeds/`):

- DLG (Zhu et al. 2019): L2 gradient matching, L-BFGS with step 1 and history 100, dummy
  inputs and soft labels drawn from N(0, 1) and optimised jointly. iDLG (Zhao et al. 2020)
  is DLG with the label read analytically from the last layer.
- Inverting Gradients (Geiping et al. 2020): cosine matching over all parameters, total
  variation, Adam with learning rate 0.1 on the *signs* of the input gradients, projection onto
  the data range after each step, learning rate x0.1 at 3/8, 5/8 and 7/8 of the iterations,
  restarts keeping the lowest matching loss. TV weight by default 1e-4 on one-channel images
  (the paper's value; best here on MNIST-5k digits, ~43 dB on the sigmoid LeNet) and 1e-2 on
  colour ones: on the embedded CIFAR-10 images 1e-2, GradAttack's best in its CIFAR-10 search,
  gives ~17.6 dB against ~12 dB at 1e-4 (`attack.ig.tv-weight` sets it).
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

Every field is a setting (`fedleak.settings`): `attack.<name>.<key>` in a run, or
`build_attack(name, params)` in Python (dashes or underscores); `fedleak config-keys` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedleak.settings import ConfigError, Settings, setting

LabelMethod = Literal["auto", "idlg", "rows", "counts", "joint"]
Init = Literal["randn", "rand", "half", "aux-mean"]
Matching = Literal["cosine", "l2"]
BatchNormMode = Literal["auto", "exact", "infer", "proxy"]


@dataclass(frozen=True)
class InversionConfig(Settings):
    """What every optimisation attack shares.

    `labels`: how labels are obtained (`auto`: iDLG for one sample; for a batch, label counts
    estimated after HFGradInv (fedleak's own equations and search, `attacks/labels.py`, not
    the paper's cosine objective and genetic search), which handle repeated labels, where there
    is auxiliary data and the update keeps magnitudes or only one release's signs (sign
    compression without noise or pruning: counts from the share of negative signs,
    `sign_counts`; with magnitudes and no noise or pruning, whichever of the two rules reads
    simulated batches better), else the most negative last-layer rows; joint soft labels
    under MixUp/InstaHide). `adaptive`:
    choose the matching loss from the public defense spec.
    `restarts`: independent initialisations per target, optimised in the same batch; the one
    with the lowest matching loss is kept. `check_every`: iterations between the (synchronising)
    checks of the time budget, NaN and progress.
    """

    matching: Matching = setting("cosine", doc="gradient matching: cosine (IG) or l2 (DLG)")
    labels: LabelMethod = setting(
        "auto", doc="label recovery; auto: idlg (B=1), rows, counts, or joint under encodings"
    )
    adaptive: bool = setting(True, doc="choose the matching loss from the public defense spec")
    restarts: int = setting(1, low=1, doc="initialisations per target, best matching loss kept")
    init: Init = setting("randn", doc="initial dummy inputs")
    check_every: int = setting(50, low=1, doc="iterations between budget/NaN/progress checks")
    # Measured on 8 CIFAR-10 / MNIST-5k images, IG 1,000 iterations: -0.02 dB (IG's step decay
    # ends at its best), so off by default; stepwise refuses it over several stages.
    keep_best: bool = setting(
        False, doc="return each target's iterate of lowest matching loss, not the last one"
    )
    normalised_hinge: bool = setting(
        True, doc="sign compression of one release: divide the squared hinge by ||g||^2"
    )
    tanh_scale: float = setting(
        1.0, low=0.0, low_open=True, doc="mean of sign releases: tanh(scale * g / rms(g))"
    )
    placements: int = setting(
        16, low=1, doc="FedAvg: label placements across local steps scored at the start"
    )
    count_population: int = setting(64, low=1, doc="HFGradInv label-count search: population")
    count_generations: int = setting(60, low=1, doc="HFGradInv label-count search: generations")


@dataclass(frozen=True)
class DLGConfig(InversionConfig):
    """DLG: L2 matching, L-BFGS (no line search, as in DLG's code), joint soft labels."""

    matching: Matching = "l2"
    labels: LabelMethod = "joint"
    learning_rate: float = setting(1.0, low=0.0, low_open=True, doc="L-BFGS step size")
    history: int = setting(100, low=1, doc="L-BFGS history size")
    check_every: int = 25


@dataclass(frozen=True)
class IGConfig(InversionConfig):
    """Inverting Gradients: cosine + TV, Adam on signed gradients, boxed, step decay."""

    learning_rate: float = setting(0.1, low=0.0, low_open=True, doc="Adam learning rate")
    milestones: tuple[float, ...] = setting(
        (3 / 8, 5 / 8, 7 / 8),
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
        doc="fractions of the iterations where the learning rate decays",
    )
    decay: float = setting(
        0.1, low=0.0, high=1.0, low_open=True, doc="learning-rate factor at each milestone"
    )
    signed: bool = setting(True, doc="step on the signs of the input gradients")
    boxed: bool = setting(True, doc="project onto the data range after each step")
    tv_weight: float | None = setting(
        None,
        low=0.0,
        doc="total variation weight; none: 1e-4 grey, 1e-2 colour (GradInversion: per defense)",
    )
    bn_weight: float = setting(0.0, low=0.0, doc="BatchNorm statistics prior weight")
    bn_mode: BatchNormMode = setting("auto", doc="whose BatchNorm statistics the prior targets")

    def __post_init__(self) -> None:
        super().__post_init__()
        # The schedule counts the milestones passed, so their order means nothing: one order,
        # so that two spellings of one schedule are one setting (a resume, a sweep's cells).
        object.__setattr__(self, "milestones", tuple(sorted(self.milestones)))


@dataclass(frozen=True)
class GradInversionConfig(IGConfig):
    """IG + the BatchNorm statistics prior (GradAttack's alpha_BN = 1e-3)."""

    bn_weight: float = 1e-3


@dataclass(frozen=True)
class StepwiseConfig(IGConfig):
    """HFGradInv's stepwise inversion: `stages` stages from deep to shallow layers, each with
    IG's schedule restarted over its share of the iterations; gradient dropout `dropout`; TV
    from stage `tv_stage` on and the BatchNorm prior (models with BatchNorm) from `bn_stage` on
    (stages are numbered from 1).

    Where this differs from the paper's setup (Ye et al. 2024, Eq. 11-12), which a `stepwise`
    row must not be read past: the paper's TV is the sum of squared neighbour differences at
    0.01, this is IG's mean absolute difference at IG's weight; its BatchNorm weight is 1e-4,
    this 1e-3; it switches TV on at 20% and the prior at 33% of the iterations, these defaults
    at 25% and 50% (stage boundaries); it decays one learning rate over the whole run, IG's
    schedule restarts here in each stage; and it never matches ResNet's first block, the last
    stage here matches every layer."""

    stages: int = setting(4, low=1, doc="stages from the deepest layers to all layers")
    dropout: float = setting(0.3, low=0.0, high=1.0, high_open=True, doc="gradient dropout")
    tv_stage: int = setting(2, low=1, doc="first stage with total variation")
    bn_stage: int = setting(3, low=1, doc="first stage with the BatchNorm prior")
    bn_weight: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_best and self.stages > 1:
            raise ConfigError(
                "keep-best=true: the stages match different layers, with gradient dropout, "
                "so their matching losses do not rank iterates; expected false, or stages=1"
            )
        late = {"tv-stage": self.tv_stage, "bn-stage": self.bn_stage}
        for key, stage in late.items():
            if stage > self.stages:
                raise ConfigError(
                    f"{key}={stage}: expected a stage from 1 to stages={self.stages}; a later "
                    "stage never comes, so that term would silently stay off"
                )


# GradAttack's TV weights per defense (their section 5 / appendix A); 1e-2 without one.
GRADATTACK_TV = {"prune": 0.05, "mixup": 0.1, "instahide": 0.01, "none": 1e-2}
# IG's TV weight when none is set, by the images' channel count (measured: README, "Attack
# recipes"): the paper's 1e-4 for one channel, GradAttack's CIFAR-10 value 1e-2 for colour.
IG_TV_GREY = 1e-4
IG_TV_COLOUR = 1e-2


def ig_tv_weight(channels: int) -> float:
    """IG's default TV weight for images with `channels` channels."""
    return IG_TV_GREY if channels == 1 else IG_TV_COLOUR
