"""`lti+ig`: Inverting Gradients started from LTI's reconstruction instead of noise."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedleak.attacks.learned.attack import LearningToInvert
from fedleak.attacks.learned.config import LTI_PRESETS, LTIConfig
from fedleak.attacks.optimization.attacks import InvertingGradients
from fedleak.attacks.optimization.config import IGConfig
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation, Reconstruction
from fedleak.settings import Settings, nested

# A smaller IG learning rate than IG's 0.1 keeps the refinement near the learned guess.
HYBRID_IG_LEARNING_RATE = 0.01


def _hybrid_ig() -> IGConfig:
    return IGConfig(learning_rate=HYBRID_IG_LEARNING_RATE)


@dataclass(frozen=True)
class LTIThenIGConfig(Settings):
    """LTI's settings under their own keys, IG's under keys starting with `ig-`."""

    lti: LTIConfig = nested(LTIConfig, "", doc="the learned inverter")
    ig: IGConfig = nested(_hybrid_ig, "ig-", doc="the refinement")


HYBRID_PRESETS: dict[str, LTIThenIGConfig] = {
    name: LTIThenIGConfig(lti=lti) for name, lti in LTI_PRESETS.items()
}


class LTIThenIG:
    """`lti+ig`: Inverting Gradients started from LTI's reconstruction instead of noise.

    The learned inverter acts as a prior for optimisation: IG refines its guess by matching
    the observed update (defense-adaptive loss as configured). LTI's training counts against
    `Budget.max_seconds`; IG gets the rest of the seconds and all of `max_iterations`.
    Under Gaussian noise IG fits the noise and moves away from the better learned guess
    (measured: 15.6 dB for LTI, 9.3 dB after IG on MNIST/LeNet with gauss:0.1).
    """

    reference = False

    stateful = True

    def __init__(self, lti: LearningToInvert, ig: InvertingGradients, name: str = "lti+ig") -> None:
        self.lti = lti
        self.ig = ig
        self.name = name

    def check_feasible(self, targets: int, aux: int) -> None:
        """Both stages' conditions (see their `check_feasible`)."""
        self.lti.check_feasible(targets, aux)
        self.ig.check_feasible(targets, aux)

    def reconstruct(
        self, observation: Observation, knowledge: AttackerKnowledge, budget: Budget
    ) -> Reconstruction:
        """LTI's guess, then IG from it; diagnostics of both (LTI's prefixed `lti_`)."""
        first = self.lti.reconstruct(observation, knowledge, budget)
        remaining = Budget(
            budget.max_iterations,
            max(0.0, budget.max_seconds - first.seconds),
            budget.show_progress,
        )
        second = self.ig.reconstruct(observation, knowledge, remaining, initial=first.inputs)
        diagnostics = {
            **second.diagnostics,
            **{f"lti_{k}": v for k, v in first.diagnostics.items()},
        }
        # The run's per-round training record keeps LTI's own keys.
        for key in ("train_seconds", "train_epochs", "val_psnr"):
            diagnostics[key] = first.diagnostics[key]
        return dataclasses.replace(
            second,
            seconds=first.seconds + second.seconds,
            message=f"lti: {first.message}; then ig: {second.message}",
            diagnostics=diagnostics,
        )


def build_hybrid(config: LTIThenIGConfig, seed: int) -> LTIThenIG:
    """`lti+ig` from its settings."""
    return LTIThenIG(
        LearningToInvert(config.lti, seed, "lti+ig"), InvertingGradients(config.ig, seed, "ig")
    )
