"""Label recovery from the last layer's update.

With softmax cross-entropy, row c of the last layer's weight gradient is
(1/B) sum_i (p_ic - y_ic) h_i, where h_i are the features entering the layer and p_i the
softmax. After a sigmoid or ReLU h_i >= 0; after a tanh or a normalisation their mass may be
negative, and every row's sign flips: `feature_sign` reads it off a noiseless update or the
auxiliary data (the rules below are written for h_i >= 0 and take the sign). Hence:

- iDLG (Zhao et al. 2020), B = 1: the true class is the only row with a negative sum; without
  noise `odd_row_out` needs no sign: the true class's row is the one pointing against all others.
- Batch rows (Yin et al. 2021 / GradAttack), distinct labels: the B most negative rows, or,
  with auxiliary data, the B classes of largest estimated count (see `batch_rows`).
- Counts for repeated labels (after HFGradInv, Ye et al. 2024): last-layer features have a small
  coefficient of variation of their mass ||h||_1 across samples (measured on the attacker's
  auxiliary data and reported), so every sample's mass may be replaced by the auxiliary mean m.
  Then B * rowsum_c / m ~= P_c(n) - n_c, with P_c(n) = sum_k n_k pbar_kc the expected softmax
  mass given the counts n (pbar_k: mean softmax of auxiliary class k), and likewise for the
  bias gradient. An evolutionary search over integer count vectors (sum B) minimises the
  squared residual of these equations.
- Counts under sign compression: a row's signs say little about magnitudes, but the share of
  its negative coordinates grows with its class's count. `sign_calibration` simulates
  sign-compressed rows of auxiliary batches at w_t (class mixes from iid to one-class, as
  client partitions give) and `sign_counts` estimates each class's count as the mean count of
  the simulated rows whose negative share is nearest the observed one. An update that keeps
  magnitudes has signs too: `simulated_accuracy` scores both rules on further simulated
  batches, and the attacks take the better for the model at hand (the equations were exact on
  untrained models, the signs better once the model had trained). A class the auxiliary data
  lacks is never simulated: it gets at most the one sample its negative signs show.
- Joint soft labels (DLG) are optimised with the inputs by the attacks themselves.

All functions take gradients: for a FedAvg delta pass -delta / (lr * local steps), which is
about the mean gradient when the local steps cover the data evenly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LabelRecoveryError(ValueError):
    """The model or update has no last layer that label recovery can read."""


@dataclass(frozen=True)
class LastLayer:
    """Names of the classifier's weight [K, d] and bias [K] (None without bias) parameters."""

    weight: str
    bias: str | None

    @property
    def module(self) -> str:
        """The module name owning the weight."""
        return self.weight.rpartition(".")[0]


def find_last_layer(
    model: nn.Module, num_classes: int, input_shape: tuple[int, ...] | None = None
) -> LastLayer:
    """The linear layer producing the `num_classes` logits: of the 2-D parameters with that
    many rows, the one whose module finishes last in a forward pass of `input_shape`, since a
    hidden layer as wide as the classes may be registered after the head; without a shape,
    the last registered. A parameter whose module never runs its forward (a cosine classifier
    reads its weight directly) has no inputs to read: refused (audit DT3)."""
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and p.shape[0] == num_classes]
    if not names:
        raise LabelRecoveryError(
            f"no 2-D parameter with {num_classes} rows (a linear classifier) to read labels from"
        )
    if input_shape is not None:
        ran = _in_forward_order(model, names, input_shape)
        if not ran:
            raise LabelRecoveryError(
                f"no linear classifier whose forward runs ({', '.join(map(repr, names))} "
                "read directly, as a cosine classifier reads its weight) to read labels from"
            )
        names = ran
    weight = names[-1]
    bias = weight.rpartition(".")[0] + ".bias"
    params = dict(model.named_parameters())
    return LastLayer(weight, bias if bias in params and params[bias].dim() == 1 else None)


@torch.no_grad()
def _in_forward_order(
    model: nn.Module, names: list[str], input_shape: tuple[int, ...]
) -> list[str]:
    """`names` ordered by when their modules' forward passes end on a batch of zeros (those
    never run left out, so none when none runs); as given when the model cannot run one."""
    probe = copy.deepcopy(model).eval()
    owners = {name.rpartition(".")[0] for name in names}
    finished: list[str] = []
    hooks = [
        probe.get_submodule(owner).register_forward_hook(
            lambda _m, _a, _o, owner=owner: finished.append(owner)
        )
        for owner in owners
    ]
    parameter = next(probe.parameters())
    try:
        probe(torch.zeros(2, *input_shape, dtype=parameter.dtype, device=parameter.device))
    except Exception:  # a model that cannot run zeros keeps the registration order
        return names
    finally:
        for hook in hooks:
            hook.remove()
    last = {owner: step for step, owner in enumerate(finished)}
    ran = [name for name in names if name.rpartition(".")[0] in last]
    return sorted(ran, key=lambda name: last[name.rpartition(".")[0]])


def row_sums(weight: Tensor) -> Tensor:
    """Sum of each class row of the last-layer weight gradient: [..., K, d] -> [..., K]."""
    return weight.sum(dim=-1)


def feature_sign(
    weight: Tensor, bias: Tensor | None = None, mean_mass: float | None = None
) -> Tensor:
    """The sign of the feature mass entering the last layer, per problem: [T, K, d] -> [T, 1].

    The auxiliary data's `mean_mass` at w_t tells it first (a forward pass, free of the
    update's noise). Else the `bias` gradient: entry c is (1/B) sum_i (p_ic - y_ic), so
    sum_c rowsum_c * bias_c is a sum of squares times the features' mass (exactly so at B = 1,
    nearly when the masses are alike); noise of about one unit per coordinate flips it long
    before it hides the labels, so pass a bias only from a noiseless update. Without either,
    non-negative features (ReLU, sigmoid) are assumed. A custom model with tanh features got
    every iDLG label wrong (audit DS1).
    """
    if mean_mass is None and bias is not None:
        dot = (row_sums(weight) * bias).sum(dim=-1, keepdim=True)
        return torch.where(dot < 0, -1.0, 1.0).to(weight.dtype)
    sign = -1.0 if mean_mass is not None and mean_mass < 0 else 1.0
    return torch.full((*weight.shape[:-2], 1), sign, dtype=weight.dtype, device=weight.device)


# Relative: float32 norms of the same row agree far closer, and a true row within it of another
# belongs to a model whose other classes hold almost no probability.
_NORM_TIE = 1e-4


def odd_row_out(weight: Tensor) -> tuple[Tensor, Tensor]:
    """B = 1 without noise: row c is (p_c - y_c) h, so the true class's row points against
    every other row and each other row against it alone, whatever the features' signs: the
    class whose row has a negative inner product with the most rows, per problem
    [T, K, d] -> ([T] int64, [T] bool: whether it was told). Sign compression keeps it. One
    sign for all samples got those of a tanh model whose masses differ in sign wrong (audit
    DT1), and under sign compression a row sum can be 0 for every class.

    Pruning may leave the true row and one other, each against the other alone (audit DY1:
    0.59 right at prune:0.85): such a tie goes to the row of the largest norm, since the true
    row's coefficient sum_{k != y} p_k is at least any other's p_k, and a layer's pruning
    keeps every row's largest products, so a surviving row's coordinates are among the true
    row's. A tie of norms within `_NORM_TIE` stays untold."""
    gram = weight @ weight.transpose(-1, -2)
    against = (gram < 0).sum(dim=-1)
    most = against.max(dim=-1)
    tied = against == most.values.unsqueeze(-1)
    counted = (tied.sum(dim=-1) == 1) & (most.values >= 2)
    norms = weight.norm(dim=-1)
    candidates = torch.where(tied & (norms > 0), norms, torch.zeros_like(norms))
    largest = candidates.topk(2, dim=-1)  # a classifier has at least 2 classes
    by_norm = largest.values[..., 0] > largest.values[..., 1] * (1 + _NORM_TIE)
    labels = torch.where(counted, most.indices, largest.indices[..., 0])
    return labels, counted | by_norm


def idlg(weight: Tensor, sign: Tensor | None = None) -> Tensor:
    """iDLG: the class whose row sum is most negative (features of `sign`, `feature_sign`;
    default non-negative), per problem: [T, K, d] -> [T] int64."""
    sums = row_sums(weight)
    return (sums if sign is None else sums * sign).argmin(dim=-1)


def batch_rows(
    weight: Tensor,
    batch: int,
    stats: AuxiliaryStatistics | None = None,
    sign: Tensor | None = None,
) -> Tensor:
    """Distinct labels: the `batch` classes with the most negative row sums, sorted,
    [T, K, d] -> [T, batch] (classes repeat cyclically when `batch` > K).

    With `stats`, classes are ranked by their estimated count `estimated_counts` instead: the
    plain rule assumes little softmax mass per class, and fails when the model concentrates
    it (the untrained uniform-init LeNet puts ~0.7 on one class: that class's row is positive
    even when it is in the batch). `sign`: the features' (`feature_sign`; default
    non-negative).
    """
    if stats is None:
        sums = row_sums(weight)
        order = (sums if sign is None else sums * sign).argsort(dim=-1)
    else:
        score = torch.stack([estimated_counts(w, None, batch, stats) for w in weight])
        order = score.to(weight.device).argsort(dim=-1, descending=True)
    repeats = -(-batch // order.shape[-1])
    return order.repeat(1, repeats)[:, :batch].sort(dim=-1).values


@dataclass(frozen=True)
class AuxiliaryStatistics:
    """What the counts method needs from the auxiliary data at w_t: the mean feature mass,
    its coefficient of variation (the approximation's error scale), and `class_softmax` [K, K]
    (row k: mean softmax of auxiliary samples of class k; the overall mean for absent classes)."""

    mean_mass: float
    mass_cv: float
    class_softmax: Tensor


@dataclass(frozen=True)
class AuxiliaryForward:
    """The auxiliary data as the last layer sees it at w_t: the `features` [N, d] entering it
    and the softmax `probs` [N, K] (on the model's device), with the `labels` [N]."""

    features: Tensor
    probs: Tensor
    labels: Tensor


def auxiliary_forward(
    model: nn.Module, layer: LastLayer, inputs: Tensor, labels: Tensor, chunk: int = 256
) -> AuxiliaryForward:
    """Forward the auxiliary data through a copy of `model` (train mode, as clients compute)."""
    features, probs = _last_layer_inputs(model, layer, inputs, chunk)
    return AuxiliaryForward(features, probs, labels.long())


@torch.no_grad()
def _last_layer_inputs(
    model: nn.Module, layer: LastLayer, inputs: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """The features entering the last layer [N, d] and the softmax [N, K] of the auxiliary
    data, forwarded through a copy of `model` in train mode, as clients compute."""
    if inputs.shape[0] == 0:
        raise LabelRecoveryError("label counts need auxiliary data; set data.aux-size > 0")
    model = copy.deepcopy(model).train()
    features: list[Tensor] = []
    hook = model.get_submodule(layer.module).register_forward_pre_hook(
        lambda _m, args: features.append(args[0].flatten(1))
    )
    device = next(model.parameters()).device
    probs = []
    try:
        for start in range(0, inputs.shape[0], chunk):
            batch = inputs[start : start + chunk].to(device).float()
            probs.append(F.softmax(model(batch), dim=1))
    finally:
        hook.remove()
    return torch.cat(features), torch.cat(probs)


@torch.no_grad()
def auxiliary_statistics(
    model: nn.Module,
    layer: LastLayer,
    inputs: Tensor,
    labels: Tensor,
    num_classes: int,
    chunk: int = 256,
) -> AuxiliaryStatistics:
    """Forward the auxiliary data through a copy of `model` (train mode, as clients compute)."""
    return statistics_of(auxiliary_forward(model, layer, inputs, labels, chunk), num_classes)


def statistics_of(forward: AuxiliaryForward, num_classes: int) -> AuxiliaryStatistics:
    """The counts method's statistics of auxiliary data already forwarded."""
    features, p = forward.features, forward.probs
    mass = features.sum(dim=1)
    y = forward.labels.to(p.device)
    onehot = F.one_hot(y, num_classes).to(p.dtype)
    per_class = onehot.T @ p
    counts = onehot.sum(dim=0)
    overall = p.mean(dim=0, keepdim=True).expand(num_classes, -1)
    class_softmax = torch.where(
        counts[:, None] > 0, per_class / counts.clamp_min(1)[:, None], overall
    )
    mean = mass.mean()
    cv = mass.std() / mean.abs() if mass.numel() > 1 else torch.zeros(())
    return AuxiliaryStatistics(float(mean), float(cv), class_softmax)


# Beyond this coefficient of variation of the auxiliary feature masses, the mean mass stands
# for no sample's (features summing to about zero, as after a LayerNorm or a BatchNorm and
# tanh): divided by it, the rows' equations swamp the bias's, which is exact without them
# (0.60 -> 1.00 of the labels on such a model, audit DT2). The built-in models measure under
# 0.13 (MNIST-5k, uniform and default init).
MASS_CV_LIMIT = 1.0


def _rows_count(stats: AuxiliaryStatistics, bias: Tensor | None) -> bool:
    """Whether the weight rows' equations take part (always without a bias to fall back on)."""
    return bias is None or stats.mass_cv <= MASS_CV_LIMIT


def _residual(
    counts: Tensor, rows: Tensor, bias: Tensor | None, stats: AuxiliaryStatistics, batch: int
) -> Tensor:
    """Squared residual of the count equations for candidate count vectors [P, K] -> [P]."""
    n = counts.to(stats.class_softmax.dtype)
    excess = n @ stats.class_softmax - n  # expected P_c(n) - n_c
    residual = torch.zeros(n.shape[0], dtype=n.dtype)
    if _rows_count(stats, bias):
        residual = residual + (batch * rows / stats.mean_mass - excess).square().sum(dim=1)
    if bias is not None:
        residual = residual + (batch * bias - excess).square().sum(dim=1)
    return residual


def estimated_counts(
    weight: Tensor, bias: Tensor | None, batch: int, stats: AuxiliaryStatistics
) -> Tensor:
    """The closed-form (real-valued) count of each class, [K, d] -> [K]: B (pbar - rowsum/m),
    averaged with B (pbar - bias gradient) when the layer has a bias (the bias's alone when the
    masses vary too much to stand for by their mean, `MASS_CV_LIMIT`)."""
    mean_softmax = stats.class_softmax.mean(dim=0).to(weight.device, weight.dtype)
    from_rows = batch * (mean_softmax - row_sums(weight) / stats.mean_mass)
    if bias is None:
        return from_rows
    from_bias = batch * (mean_softmax - bias.to(weight.device, weight.dtype))
    return (from_rows + from_bias) / 2 if _rows_count(stats, bias) else from_bias


def _largest_remainder(values: Tensor, total: int) -> Tensor:
    """Non-negative integers summing to `total`, closest to `values` (Hamilton's method)."""
    if total <= 0:
        return torch.zeros(values.shape, dtype=torch.long)
    v = values.clamp_min(0)
    v = v / v.sum() * total if v.sum() > 0 else torch.full_like(v, total / v.numel())
    floor = v.floor()
    missing = total - int(floor.sum())
    order = torch.argsort(v - floor, descending=True)
    floor[order[:missing]] += 1
    return floor.long()


def _distinct_rows(counts: Tensor, batch: int) -> Tensor:
    """`counts.unique(dim=0)` (the distinct count vectors [P, K] in lexicographic order) for
    counts in [0, batch]: read as base-(batch + 1) numbers, the rows sort as integers, twice
    as fast as torch's row-wise unique on the search's pools (128 rows of 10 classes: 0.39-0.47
    ms -> 0.15-0.19 ms)."""
    classes = counts.shape[1]
    if classes * math.log2(batch + 1) >= 62:
        return counts.unique(dim=0)
    place = (batch + 1) ** torch.arange(classes - 1, -1, -1)
    keys, inverse = (counts * place).sum(dim=1).unique(return_inverse=True)
    rows = counts.new_empty((keys.numel(), classes))
    rows[inverse] = counts
    return rows


def label_counts(
    weight: Tensor,
    bias: Tensor | None,
    batch: int,
    stats: AuxiliaryStatistics,
    generator: torch.Generator,
    population: int = 64,
    generations: int = 60,
    present_if_negative: bool = False,
) -> Tensor:
    """How many samples of each class the batch holds (int64 [K], sum `batch`), from one
    problem's last-layer gradient `weight` [K, d] and `bias` [K] (HFGradInv-style search).

    The population starts from the rounded closed-form estimate and evolves by moving one
    sample between classes; the best `population` distinct vectors survive each generation.
    Randomness comes from `generator` (CPU), so the result is deterministic under its seed.

    `present_if_negative`: every class whose row sums below zero holds at least one sample
    (HFGradInv's coarse label set). An absent class's row is a sum of p_ic h_i >= 0, so only a
    present class's can be negative (with features of negative mass, every row's sign flips:
    `feature_sign`); noise breaks this, pruning and clipping do not. The
    estimate alone misses such classes once the model has trained (a sigmoid LeNet after
    1,000 SGD steps, 40 batches of 8 MNIST-5k images: 0.544 -> 0.647 of the labels with
    distinct labels, 0.622 -> 0.644 with repeated ones; `tests/test_labels.py`).
    """
    rows = row_sums(weight).double().cpu()
    bias = None if bias is None else bias.double().cpu()
    stats = AuxiliaryStatistics(stats.mean_mass, stats.mass_cv, stats.class_softmax.double().cpu())
    classes = rows.shape[0]
    estimate = estimated_counts(weight.double().cpu(), bias, batch, stats)
    required = torch.zeros(classes, dtype=torch.long)
    negative = rows * (-1.0 if stats.mean_mass < 0 else 1.0) < 0
    if present_if_negative and int(negative.sum()) <= batch:
        required = negative.long()
    rest = _largest_remainder(estimate - required, batch - int(required.sum()))
    start = required + rest
    pool = start.unsqueeze(0).repeat(population, 1)
    arange = torch.arange(population)
    for _ in range(generations):
        children = pool.clone()
        source = torch.multinomial((children > 0).double(), 1, generator=generator).squeeze(1)
        target = torch.randint(0, classes, (population,), generator=generator)
        children[arange, source] -= 1
        children[arange, target] += 1
        candidates = _distinct_rows(torch.cat([pool, children]), batch)
        candidates = candidates[(candidates >= required).all(dim=1)]
        order = torch.argsort(_residual(candidates, rows, bias, stats, batch), stable=True)
        survivors = candidates[order[:population]]
        fill = torch.randint(0, survivors.shape[0], (population,), generator=generator)
        pool = torch.cat([survivors, survivors[fill]])[:population]
    return pool[0]


@dataclass(frozen=True)
class SignCalibration:
    """Sign-compressed last-layer rows of simulated auxiliary batches of one size at w_t:
    `negative` [R, K], each class row's share of negative coordinates among its non-zero ones,
    and `counts` [R, K], how many samples of each class the batch held."""

    negative: Tensor
    counts: Tensor


# A calibration of 512 batches (1,000 auxiliary images, B = 2-32) took 0.1-0.25 s for the
# sigmoid LeNet on one CPU thread, 3-7 s for ConvNet-BN, mostly the auxiliary forward pass;
# each count is then a mean over 48 of them (under a tenth).
CALIBRATION_BATCHES = 512
CALIBRATION_NEIGHBOURS = 48
# A Dirichlet concentration per simulated batch, log-uniform over [0.1, 100] times the number
# of classes: from one or two classes a batch (label-sorted shards) to iid draws.
CONCENTRATION_DECADES = (-1.0, 2.0)
# Papers' batches (and stratified clients) hold distinct labels, which no Dirichlet mix draws:
# this share of the simulated batches does (without it, distinct batches of 8 on the untrained
# LeNet came back 0.859 right against 0.944 for the negative rows; with it 1.000).
DISTINCT_SHARE = 0.25
# Simulated batches on which `simulated_accuracy` compares the count rules.
VALIDATION_BATCHES = 16

# A count rule: one batch's last-layer weight [K, d] and bias [K] gradients (None without a
# bias) and a generator for its random choices -> how many samples of each class, [K].
CountRule = Callable[[Tensor, Tensor | None, torch.Generator], Tensor]


def _negative_share(rows: Tensor) -> Tensor:
    """Each row's share of negative coordinates among its non-zero ones: [..., K, d] -> [..., K]."""
    nonzero = (rows != 0).sum(dim=-1).clamp_min(1)
    return (rows < 0).sum(dim=-1) / nonzero


def _simulated_batches(
    labels: Tensor, num_classes: int, batch: int, batches: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Indices into the auxiliary data [R, B] of `batches` simulated batches of `batch`, and
    each batch's class counts [R, K]. Each batch's class mix is drawn from a Dirichlet around
    the auxiliary class frequencies whose concentration spans iid to one-class clients (the
    attacker does not know how the federation partitioned its data); a share of the batches
    hold distinct labels instead."""
    y = labels.long().cpu()
    frequency = torch.bincount(y, minlength=num_classes).double()
    present = torch.nonzero(frequency > 0).squeeze(1)
    members = torch.argsort(y, stable=True)
    first = torch.cumsum(frequency, 0).long() - frequency.long()
    low, high = CONCENTRATION_DECADES
    concentration = 10 ** rng.uniform(low, high, batches) * present.numel()
    share = (frequency[present] / frequency.sum()).numpy()
    mixes = np.stack([rng.dirichlet(np.maximum(c * share, 1e-3)) for c in concentration])
    # A draw of tiny concentrations can underflow to all zeros: such a batch is iid instead.
    total = mixes.sum(axis=1, keepdims=True)
    valid = np.isfinite(total) & (total > 0)
    mixes = np.where(valid, mixes / np.where(valid, total, 1.0), share)
    drawn = np.stack([rng.choice(present.numpy(), size=batch, p=mix) for mix in mixes])
    if batch <= present.numel():
        for row in range(int(batches * DISTINCT_SHARE)):
            drawn[row] = rng.choice(present.numpy(), size=batch, replace=False, p=share)
    drawn = torch.from_numpy(drawn)
    offset = torch.from_numpy(rng.random((batches, batch)))
    index = members[first[drawn] + (offset * frequency[drawn]).long()]
    return index, F.one_hot(drawn, num_classes).sum(dim=1)


def _simulated_updates(
    forward: AuxiliaryForward, index: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """The FedSGD last-layer weight [n, K, d] and bias [n, K] gradients of the batches `index`
    [n, B] of auxiliary samples, in float64 on the CPU."""
    where = index.to(forward.features.device)
    features = forward.features[where].double().cpu()
    error = (
        forward.probs[where].double().cpu()
        - F.one_hot(forward.labels.cpu()[index], num_classes).double()
    )
    batch = index.shape[1]
    return error.transpose(1, 2) @ features / batch, error.mean(dim=1)


@torch.no_grad()
def sign_calibration(
    forward: AuxiliaryForward,
    num_classes: int,
    batch: int,
    generator: torch.Generator,
    batches: int = CALIBRATION_BATCHES,
) -> SignCalibration:
    """Simulate `batches` FedSGD batches of `batch` auxiliary samples (`_simulated_batches`)
    and their last-layer rows' signs."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    index, counts = _simulated_batches(forward.labels, num_classes, batch, batches, rng)
    negative = []
    for start in range(0, batches, 32):
        rows, _ = _simulated_updates(forward, index[start : start + 32], num_classes)
        negative.append(_negative_share(rows))
    return SignCalibration(torch.cat(negative), counts)


@torch.no_grad()
def simulated_accuracy(
    forward: AuxiliaryForward,
    num_classes: int,
    batch: int,
    generator: torch.Generator,
    rules: dict[str, CountRule],
    batches: int = VALIDATION_BATCHES,
) -> dict[str, float]:
    """Each rule's share of labels right, counted as multisets, on `batches` simulated
    batches drawn as the calibration's are but apart from them (`generator` draws them and
    feeds the rules)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    index, counts = _simulated_batches(forward.labels, num_classes, batch, batches, rng)
    weights, biases = _simulated_updates(forward, index, num_classes)
    right = dict.fromkeys(rules, 0)
    for weight, bias, truth in zip(weights, biases, counts, strict=True):
        for name, rule in rules.items():
            right[name] += int(torch.minimum(rule(weight, bias, generator).cpu(), truth).sum())
    return {name: hits / (batches * batch) for name, hits in right.items()}


def sign_counts(
    weight: Tensor,
    batch: int,
    calibration: SignCalibration,
    present_if_negative: bool = False,
    neighbours: int = CALIBRATION_NEIGHBOURS,
) -> Tensor:
    """How many samples of each class a sign-compressed update's batch holds (int64 [K], sum
    `batch`), from one problem's last-layer rows `weight` [K, d] (any positive multiple of
    the signs of the mean gradient).

    Each class's count is the mean count of that class over the `neighbours` simulated
    batches closest in its row's negative share and in how many rows hold a negative
    coordinate (how many classes look present bounds how the batch is split). With
    `present_if_negative`, a class whose row has a negative coordinate keeps at least one
    sample: an absent class's row is a sum of p_ic h_i >= 0, and sign keeps that sign (so only
    for features that are never negative, as after a ReLU or sigmoid).
    """
    observed = _negative_share(weight.detach().double().cpu())
    looks_present = (observed > 0).double().sum()
    simulated_present = (calibration.negative > 0).double().sum(dim=1)
    classes = observed.numel()
    # [R, K]: each simulation's distance from the update, class by class.
    distance = (calibration.negative - observed).abs() + (
        0.5 * (simulated_present - looks_present).abs() / classes
    ).unsqueeze(1)
    cut = distance.kthvalue(min(neighbours, distance.shape[0]), dim=0).values
    near = distance <= cut  # ties at the cut all count
    estimate = (calibration.counts * near).sum(dim=0).double() / near.sum(dim=0)
    required = torch.zeros(classes, dtype=torch.long)
    if present_if_negative and int((observed > 0).sum()) <= batch:
        required = (observed > 0).long()
    return required + _largest_remainder(estimate - required, batch - int(required.sum()))


def counts_to_labels(counts: Tensor) -> Tensor:
    """The sorted label multiset of a count vector: [K] -> int64 [sum(counts)]."""
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.cpu().long())
