"""The task loss every client, adaptive attacker and evaluation uses, for both tasks.

Classification: logits [B, C] against class indices [B] or soft labels [B, C].
Causal language modelling: logits [B, L, V] against the sequence itself, token ids [B, L] or
soft targets [B, L, V] (what joint-label attacks optimise); position l predicts token l + 1,
so the loss is the mean cross-entropy over the B x (L - 1) predicted positions, which makes a
batch's loss the mean of its sequences' losses, as for images.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def is_sequence(logits: Tensor) -> bool:
    """Whether the logits are a language model's [B, L, V] (else a classifier's [B, C])."""
    return logits.dim() == 3


def task_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of a classifier or of a causal language model (shifted targets)."""
    if is_sequence(logits):
        logits, targets = logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(0, 1)
    return F.cross_entropy(logits, targets)


def per_sample_task_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Each sample's own `task_loss` [B] (a language model's: the mean over its shifted
    positions), so that their mean is the batch's `task_loss`."""
    if is_sequence(logits):
        batch = logits.shape[0]
        logits, targets = logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(0, 1)
        return F.cross_entropy(logits, targets, reduction="none").reshape(batch, -1).mean(dim=1)
    return F.cross_entropy(logits, targets, reduction="none")


def task_scores(logits: Tensor, targets: Tensor) -> tuple[float, int, int]:
    """(summed loss, correct predictions, predictions) of hard targets, for evaluation: classes,
    or next tokens of a language model."""
    if is_sequence(logits):
        logits, targets = logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(0, 1)
    loss = float(F.cross_entropy(logits, targets, reduction="sum"))
    correct = int((logits.argmax(1) == targets).sum())
    return loss, correct, int(targets.shape[0])


def check_targets(x: Tensor, y: Tensor) -> None:
    """Raise ValueError unless `y` fits inputs `x`: class indices [B] or soft labels [B, C] (any
    inputs, token ids included), or, for token inputs [B, L], the sequence's own ids [B, L] or
    soft targets [B, L, V] (a language model)."""
    hard = not y.is_floating_point() and y.dim() == 1
    soft = y.is_floating_point() and y.dim() == 2
    if (hard or soft) and y.shape[0] == x.shape[0]:
        return
    tokens = not x.is_floating_point() and x.dim() == 2
    sequence = y.dim() == (3 if y.is_floating_point() else 2)
    if tokens and sequence and y.shape[:2] == x.shape:
        return
    expected = "int64 [B] class indices or float [B, C] soft labels"
    if tokens:
        expected += ", or int64 [B, L] token ids / float [B, L, V] soft targets"
    raise ValueError(
        f"labels of shape {tuple(y.shape)} and dtype {y.dtype} do not fit inputs of shape "
        f"{tuple(x.shape)}; expected {expected}"
    )
