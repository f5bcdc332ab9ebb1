"""The aux-mean reference: what an attacker gets from its auxiliary data alone.

It ignores the update entirely, so any attack that actually inverts gradients must beat it;
it also exercises the whole loop end to end at no cost.
"""

from __future__ import annotations

import torch

from fedleak.attacks.types import AttackerKnowledge, Budget, Observation, Reconstruction


class AuxMeanBaseline:
    """Every sample is the mean auxiliary image; every label the majority auxiliary class."""

    name = "aux-mean"
    stateful = False

    def reconstruct(
        self, observation: Observation, knowledge: AttackerKnowledge, budget: Budget
    ) -> Reconstruction:
        """Return the same guess for each of the observation's targets."""
        if knowledge.aux_inputs.shape[0] == 0:
            raise ValueError("aux-mean needs auxiliary data; set data.aux-size > 0")
        count = observation.num_targets
        mean = knowledge.aux_inputs.float().mean(dim=0, keepdim=True)
        majority = torch.bincount(knowledge.aux_labels.long(), minlength=knowledge.num_classes)
        labels = torch.full((count,), int(majority.argmax()), dtype=torch.long)
        return Reconstruction(
            inputs=mean.expand(count, *mean.shape[1:]).cpu().clone(),
            labels=labels,
            label_method="aux-majority",
        )
