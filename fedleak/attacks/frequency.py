"""The frequency reference for text: what an attacker gets from token frequencies alone.

Every reconstructed sequence is, at each position, the token most frequent at that position in
the attacker's auxiliary sequences (positions of sequences cut at arbitrary offsets share one
distribution, so this is about the most frequent token everywhere: the best guess without the
update in token accuracy). It ignores the update, so any attack that inverts must beat it.
"""

from __future__ import annotations

import torch

from fedleak.attacks.types import AttackerKnowledge, Budget, Observation, Reconstruction


class TokenFrequencyBaseline:
    """`aux-frequency`: the per-position most frequent auxiliary token, for every target."""

    name = "aux-frequency"
    reference = True
    modalities = ("tokens",)

    def reconstruct(
        self, observation: Observation, knowledge: AttackerKnowledge, budget: Budget
    ) -> Reconstruction:
        """The same sequence for each of the observation's targets."""
        if observation.modality != "tokens":
            raise ValueError(
                f"observation modality={observation.modality!r}: aux-frequency is text"
            )
        aux = knowledge.aux_inputs.long().cpu()
        if aux.shape[0] == 0:
            raise ValueError("aux-frequency needs auxiliary text; set data.aux-size > 0")
        vocab = observation.model.num_classes
        counts = torch.zeros(aux.shape[1], vocab, dtype=torch.int64)
        counts.scatter_add_(1, aux.T, torch.ones_like(aux.T))
        guess = counts.argmax(dim=1)
        return Reconstruction(
            inputs=guess.expand(observation.num_targets, -1).clone(),
            labels=None,
            label_method="aux-frequency",
        )
