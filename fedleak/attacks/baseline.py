"""Reference baselines: what an attacker gets without inverting the images at all.

`aux-mean` ignores the update entirely; `class-mean` reads only the labels from it. An attack
that actually inverts gradients must beat both: the gap to `class-mean` is what it learns
beyond the labels. Both exercise the whole loop end to end at almost no cost and are drawn as
floors in reports, never ranked as attacks (`reference = True`).
"""

from __future__ import annotations

import time

import torch

from fedleak.attacks.optimization.attacks import attack_seed, prepare
from fedleak.attacks.optimization.config import InversionConfig
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation, Reconstruction
from fedleak.defenses import parse_defense_spec


def _require_aux(name: str, knowledge: AttackerKnowledge) -> None:
    if knowledge.aux_inputs.shape[0] == 0:
        raise ValueError(f"{name} needs auxiliary data; set data.aux-size > 0")


def _refuse_without_aux(name: str, aux: int) -> None:
    """Refuse, before a run, a floor without auxiliary data, where every call would fail."""
    if aux == 0:
        raise ValueError(f"{name} needs auxiliary data, but data.aux-size=0; set it > 0")


class AuxMeanBaseline:
    """Every sample is the mean auxiliary image; every label the majority auxiliary class."""

    name = "aux-mean"
    reference = True  # a floor for the report, never ranked as an attack
    stateful = False

    def check_feasible(self, targets: int, aux: int) -> None:
        """Refuse a run without auxiliary data, where every call would fail."""
        _refuse_without_aux(self.name, aux)

    def reconstruct(
        self, observation: Observation, knowledge: AttackerKnowledge, budget: Budget
    ) -> Reconstruction:
        """Return the same guess for each of the observation's targets."""
        _require_aux(self.name, knowledge)
        count = observation.num_targets
        mean = knowledge.aux_inputs.float().mean(dim=0, keepdim=True)
        majority = torch.bincount(knowledge.aux_labels.long(), minlength=knowledge.num_classes)
        labels = torch.full((count,), int(majority.argmax()), dtype=torch.long)
        return Reconstruction(
            inputs=mean.expand(count, *mean.shape[1:]).cpu().clone(),
            labels=labels,
            label_method="aux-majority",
        )


def class_means(knowledge: AttackerKnowledge) -> torch.Tensor:
    """Mean auxiliary image of each class [K, C, H, W]; the overall mean for absent classes."""
    x = knowledge.aux_inputs.float().cpu()
    y = knowledge.aux_labels.long().cpu()
    onehot = torch.nn.functional.one_hot(y, knowledge.num_classes).to(x.dtype)
    counts = onehot.sum(dim=0)
    sums = torch.einsum("nk,nd->kd", onehot, x.flatten(1))
    overall = x.flatten(1).mean(dim=0, keepdim=True).expand_as(sums)
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], overall)
    return means.reshape(knowledge.num_classes, *x.shape[1:])


class ClassMeanBaseline:
    """Each sample is the mean auxiliary image of the class recovered for it from the update.

    Labels come from the last layer exactly as the optimisation attacks recover them (`auto`:
    iDLG for one sample, HFGradInv-style counts for a batch, counts calibrated on simulated
    sign-compressed rows under sign compression, the most negative rows under noise or pruning
    with signs). Under MixUp/InstaHide, whose labels are mixtures, the rows rule names the
    classes present. The images say nothing the labels do not: this is the floor of an attack
    that reads labels and guesses the typical image of each.
    """

    name = "class-mean"
    reference = True
    stateful = False  # labels from the update, images from the aux data: any worker will do

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def check_feasible(self, targets: int, aux: int) -> None:
        """Refuse a run without auxiliary data, where every call would fail."""
        _refuse_without_aux(self.name, aux)

    def label_layer_remedy(self, encoded: bool) -> str:
        """It always reads labels off the classifier's last layer: without one, leave it out."""
        return f"attack.names without {self.name!r}"

    def reconstruct(
        self, observation: Observation, knowledge: AttackerKnowledge, budget: Budget
    ) -> Reconstruction:
        """Recover the labels, then paste each label's auxiliary class mean."""
        began = time.perf_counter()
        _require_aux(self.name, knowledge)
        encoded = parse_defense_spec(observation.defense).encoder is not None
        config = InversionConfig(labels="rows" if encoded else "auto")
        seed = attack_seed(self.seed, knowledge, observation)
        problem = prepare(observation, knowledge, config, "auto", seed)
        assert problem.labels is not None  # "auto" and "rows" always give hard labels
        labels = problem.labels.reshape(-1).long().cpu()
        images = class_means(knowledge)[labels]
        return Reconstruction(
            inputs=images,
            labels=labels,
            label_method=problem.label_method,
            seconds=time.perf_counter() - began,
            diagnostics=dict(problem.diagnostics),
        )
