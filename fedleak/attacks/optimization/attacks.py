"""Optimisation attacks: DLG / iDLG, Inverting Gradients, GradInversion-style BatchNorm prior,
stepwise high-fidelity inversion. Each implements the `Attack` protocol.

One observation becomes T = targets x restarts independent problems: one target for a batch
update (its b = num_examples images are optimised together), or one per sample when the run
shares per-sample updates (b = 1 each). All problems are optimised as one batched problem
(`engine`), the dummy updates come from replaying the client's declared computation (`replay`:
FedSGD gradient, or FedAvg's K local steps unrolled), and the matching loss follows the public
defense spec (`losses`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedleak.attacks import labels as label_recovery
from fedleak.attacks.optimization.batching import automatic_cap, plan
from fedleak.attacks.optimization.config import (
    GRADATTACK_TV,
    DLGConfig,
    GradInversionConfig,
    IGConfig,
    InversionConfig,
    StepwiseConfig,
    ig_tv_weight,
)
from fedleak.attacks.optimization.engine import Lost, Outcome, Settings, StepDecay, optimise
from fedleak.attacks.optimization.kernels import (
    cpu_convolutions,
    differentiable_attention,
    native_pays,
)
from fedleak.attacks.optimization.losses import (
    MatchingLoss,
    batchnorm_prior,
    choose_matching,
    fedavg_step_clip,
    flatten,
    total_variation,
)
from fedleak.attacks.optimization.replay import (
    Replay,
    Statistics,
    observed_updates,
    shared_statistics,
)
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation, Reconstruction
from fedleak.defenses import (
    DPSGD,
    DefensePipeline,
    InstaHide,
    Prune,
    SignCompression,
    fold_toward,
    parse_defense_spec,
)
from fedleak.models import ModelSpec, build_model, has_batchnorm
from fedleak.seeds import mix_seed
from fedleak.settings import ConfigError

# FedAvg's label placements draw their orders from their own stream of the attack's seed,
# apart from the label counts' and the initial images'.
PLACEMENT_STREAM = 7
# The simulated batches on which a batch's count rules are tried, likewise apart.
RULE_TRIAL_STREAM = 11


class ObservationError(ConfigError):
    """An observation this attack cannot invert (wrong modality, missing statistics)."""


def attack_seed(seed: int, knowledge: AttackerKnowledge, observation: Observation) -> int:
    """One seed per (attacker, round, client): deterministic, distinct per observation. The
    attack's name is left out on purpose: attacks on one update start from the same draw
    (common random numbers), so their rows differ by method, not by luck (audit DR1)."""
    return mix_seed(seed, knowledge.seed, observation.round, observation.client_id)


@dataclass(frozen=True)
class Problem:
    """An observation laid out as T = restarts x targets problems of `samples` images each.

    Problem t = r * targets + i is restart r of target i. `labels` is int64 [T, samples], or
    None when labels are optimised jointly (soft labels).
    """

    replay: Replay
    target: list[Tensor]
    labels: Tensor | None
    label_method: str
    targets: int
    samples: int
    restarts: int
    matching: MatchingLoss
    pipeline: DefensePipeline
    bn_exact: bool
    bn_reference: Statistics | None
    input_shape: tuple[int, ...]
    device: torch.device
    diagnostics: dict[str, float]
    spec: ModelSpec | None = None
    defense: str = "none"
    weights: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def problems(self) -> int:
        """T, the leading dimension of every batched tensor."""
        return self.targets * self.restarts

    @property
    def update_bytes(self) -> int:
        """Bytes of one problem's target update (a dummy update has the same size)."""
        return sum(t[0].numel() * t.element_size() for t in self.target)

    @property
    def sign_flipped(self) -> bool:
        """InstaHide flips pixels at random about the range's middle: the prior and the result
        work on what the flip leaves (`fedleak.defenses.unsigned`)."""
        return self.pipeline.find(InstaHide) is not None

    def batch_key(self) -> tuple[object, ...]:
        """Problems with equal keys and equal weights replay the same function of their dummy
        inputs and differ only in their targets: they can be optimised as one batch."""
        replay = self.replay
        return (
            self.spec,
            replay.protocol,
            replay.bn_mode,
            self.samples,
            self.input_shape,
            self.labels is None,
            self.matching,
            self.defense,
            self.bn_exact,
            self.bn_reference is None,
            str(self.device),
        )

    def same_weights(self, other: Problem) -> bool:
        """Whether both observations carry the same w_t (in a round they are one object)."""
        if self.weights is other.weights:
            return True
        if self.weights.keys() != other.weights.keys():
            return False
        return all(torch.equal(v, other.weights[k]) for k, v in self.weights.items())


def stack(problems: Sequence[Problem]) -> Problem:
    """Several compatible problems (equal `batch_key` and weights) as one: targets, labels and
    BatchNorm references concatenated along T; the first problem's replay serves them all."""
    first = problems[0]
    if len(problems) == 1:
        return first
    target = [torch.cat(parts) for parts in zip(*(p.target for p in problems), strict=True)]
    labels = None
    if first.labels is not None:
        labels = torch.cat([p.labels for p in problems])  # type: ignore[misc]
    reference = None
    if first.bn_reference is not None:
        layers = zip(*(_per_problem(p.bn_reference, p.problems) for p in problems), strict=True)
        reference = [
            (torch.cat([mean for mean, _ in layer]), torch.cat([var for _, var in layer]))
            for layer in layers
        ]
    return dataclasses.replace(
        first,
        target=target,
        labels=labels,
        targets=sum(p.problems for p in problems),
        restarts=1,
        bn_reference=reference,
        diagnostics={},
    )


def _per_problem(reference: Statistics | None, count: int) -> Statistics:
    """A BatchNorm reference as one row per problem: [C] (shared) expands to [count, C]."""
    assert reference is not None
    return [
        (mean.expand(count, -1), var.expand(count, -1)) if mean.dim() == 1 else (mean, var)
        for mean, var in reference
    ]


def _load_model(observation: Observation, device: torch.device) -> nn.Module:
    model = build_model(observation.model)
    model.load_state_dict(observation.weights)
    return model.to(device)


def _resolve_bn_mode(mode: str, observation: Observation, model_has_bn: bool) -> str:
    if mode == "auto":
        return "exact" if observation.bn_statistics else "infer"
    if mode == "exact" and model_has_bn and not observation.bn_statistics:
        raise ObservationError(
            "attack parameter bn-mode='exact' needs BatchNorm statistics in the observation; "
            "share them (threat.bn-stats='shared' in a run, observe(..., bn_statistics=) in "
            "the library) or use bn-mode=auto, infer or proxy"
        )
    return mode


def _noiseless(pipeline: DefensePipeline) -> bool:
    """Whether every step keeps the sign of each last-layer coordinate an absent class can give
    (pruning keeps a subset of its non-negative terms, clipping scales them, sign keeps it);
    noise does not, and a plug-in step is not known to."""
    return all(
        isinstance(step, Prune | SignCompression)
        or (isinstance(step, DPSGD) and step.noise_multiplier == 0)
        for step in pipeline.steps
    )


def _signs_as_simulated(pipeline: DefensePipeline, contributors: int) -> bool:
    """Whether the update's last-layer coordinates are negative where simulated FedSGD
    batches' are. Sign compression keeps them, but a sum of several clients' signs is another
    statistic (the aggregate view: counts got 0.49 of the labels on four such sums, the rows
    0.73, in an outside audit); noise flips signs, and pruning keeps only the largest
    coordinates (under prune:0.9+sign on a trained LeNet, counts from unpruned simulations
    got 0.49-0.69 of the labels against 0.58-0.81 for the negative rows)."""
    one_release = contributors == 1 or not pipeline.releases_signs
    return one_release and _noiseless(pipeline) and pipeline.find(Prune) is None


def _feature_sign(
    weight: Tensor,
    bias: Tensor | None,
    forward: label_recovery.AuxiliaryForward | None,
    model: nn.Module,
    layer: label_recovery.LastLayer,
    knowledge: AttackerKnowledge,
    pipeline: DefensePipeline,
) -> Tensor:
    """The sign of the last layer's features (`labels.feature_sign`): from a noiseless
    update's bias (free), else from the auxiliary data's forward pass (`forward` when the
    caller has it), else non-negative features are assumed."""
    if (
        forward is None
        and knowledge.aux_inputs.shape[0] > 0
        and not (bias is not None and _noiseless(pipeline))
    ):
        forward = label_recovery.auxiliary_forward(
            model, layer, knowledge.aux_inputs, knowledge.aux_labels
        )
    if forward is not None:
        return label_recovery.feature_sign(weight, None, float(forward.features.sum(1).mean()))
    return label_recovery.feature_sign(weight, bias if _noiseless(pipeline) else None)


def _recover_labels(
    method: str,
    model: nn.Module,
    target: list[Tensor],
    names: list[str],
    observation: Observation,
    knowledge: AttackerKnowledge,
    pipeline: DefensePipeline,
    samples: int,
    contributors: int,
    config: InversionConfig,
    seed: int,
) -> tuple[Tensor | None, str, dict[str, float]]:
    """Labels [targets, samples] and the method used; None for joint optimisation.
    `contributors`: the clients whose releases the update sums (the aggregate view)."""
    magnitudes = pipeline.find(SignCompression) is None
    has_aux = knowledge.aux_inputs.shape[0] > 0
    if method == "auto":
        if pipeline.encoder is not None:
            method = "joint"  # encoded labels are mixtures: no hard label fits
        elif samples == 1:
            method = "idlg"
        else:  # counts handle distinct and repeated labels but need aux data to calibrate
            method = (
                "counts"
                if has_aux and (magnitudes or _signs_as_simulated(pipeline, contributors))
                else "rows"
            )
    if method == "joint":
        return None, "joint", {}
    num_classes = observation.model.num_classes
    layer = label_recovery.find_last_layer(model, num_classes, observation.model.input_shape)
    # -delta ~ lr * K * (mean gradient) when FedAvg's local steps cover the data evenly.
    scale = 1.0
    if observation.update_kind == "delta":
        scale = -1.0 / (observation.learning_rate * observation.local_steps)
    weight = target[names.index(layer.weight)] * scale
    has_bias = layer.bias is not None
    bias = target[names.index(layer.bias)] * scale if has_bias else None
    if method == "idlg":
        if samples != 1:
            raise ObservationError(
                f"attack parameter labels='idlg' needs one sample per target, got {samples}; "
                "use labels=auto, rows, counts or joint"
            )
        # Without noise the rows tell each sample's label whatever its features' sign (noise
        # flips the signs of small inner products); else the row sums, read with one sign.
        labels = decided = None
        if _noiseless(pipeline):
            labels, decided = label_recovery.odd_row_out(weight)
        if decided is None or not bool(decided.all()):
            sign = _feature_sign(weight, bias, None, model, layer, knowledge, pipeline)
            summed = label_recovery.idlg(weight, sign)
            labels = summed if labels is None else torch.where(decided, labels, summed)
        return labels.unsqueeze(1), "idlg", {}
    forward = stats = None
    # The rows read the statistics only with magnitudes; counts without aux data: a one-line
    # refusal here.
    if method == "counts" or (magnitudes and has_aux):
        forward = label_recovery.auxiliary_forward(
            model, layer, knowledge.aux_inputs, knowledge.aux_labels
        )
        stats = label_recovery.statistics_of(forward, num_classes) if magnitudes else None
    if method == "rows":
        sign = _feature_sign(weight, bias, forward, model, layer, knowledge, pipeline)
        return label_recovery.batch_rows(weight, samples, stats, sign), "rows", {}
    assert forward is not None
    generator = torch.Generator().manual_seed(seed)
    # The coarse label sets read "an absent class gives no negative value": a row sum needs
    # every sample's feature mass of one sign, a coordinate every feature non-negative. Mixed
    # signs (tanh) made every class look present, each forced to hold a sample (audit DU1).
    noiseless, mass = _noiseless(pipeline), forward.features.sum(dim=1)
    present = noiseless and bool((mass > 0).all() or (mass < 0).all())
    present_coordinates = noiseless and bool((forward.features >= 0).all())
    rules: dict[str, label_recovery.CountRule] = {}
    diagnostics: dict[str, float] = {}
    if stats is not None:
        counted = stats
        rules["equations"] = lambda weight, bias, draws: label_recovery.label_counts(
            weight,
            bias if has_bias else None,
            samples,
            counted,
            draws,
            config.count_population,
            config.count_generations,
            present_if_negative=present,
        )
        diagnostics["aux_feature_mass_cv"] = stats.mass_cv
    if stats is None or _signs_as_simulated(pipeline, contributors):
        calibration = label_recovery.sign_calibration(forward, num_classes, samples, generator)
        rules["signs"] = lambda weight, _bias, _draws: label_recovery.sign_counts(
            weight, samples, calibration, present_coordinates
        )
    rule = next(iter(rules.values()))
    if len(rules) > 1:
        # The equations were exact on untrained models and lost to the signs' calibration
        # once the model had trained: which rule fits this model, simulated batches tell.
        trial = torch.Generator().manual_seed(mix_seed(seed, RULE_TRIAL_STREAM))
        scores = label_recovery.simulated_accuracy(forward, num_classes, samples, trial, rules)
        diagnostics.update({f"label_rule_{name}": score for name, score in scores.items()})
        rule = rules[max(rules, key=lambda name: scores[name])]
    rows = [
        label_recovery.counts_to_labels(
            rule(weight[t], None if bias is None else bias[t], generator)
        )
        for t in range(weight.shape[0])
    ]
    return torch.stack(rows), "counts", diagnostics


def prepare(
    observation: Observation,
    knowledge: AttackerKnowledge,
    config: InversionConfig,
    bn_mode: str,
    seed: int,
) -> Problem:
    """Lay one observation out as a batched inversion problem (labels recovered up front)."""
    if observation.modality != "image":
        raise ObservationError(
            f"observation modality={observation.modality!r}: optimisation attacks invert images"
        )
    device = torch.device(knowledge.device)
    model = _load_model(observation, device)
    pipeline = parse_defense_spec(observation.defense)
    observed = observed_updates(observation)
    shared, protocol = observed.rows, observed.protocol
    targets, samples, contributors = observed.count, observed.samples, observed.contributors
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in shared]
    if missing:
        raise ObservationError(f"the update lacks parameters {missing[:3]}; expected all of them")
    for name, parameter in model.named_parameters():
        if tuple(shared[name].shape) != (targets, *parameter.shape):
            # Else stacking it with other clients' updates fails them all.
            raise ObservationError(
                f"the update's {name!r} has shape {tuple(shared[name].shape[1:])}, expected "
                f"{tuple(parameter.shape)}"
            )
    target = [shared[name].to(device).float() for name in names]
    has_bn = has_batchnorm(model)
    mode = _resolve_bn_mode(bn_mode, observation, has_bn)
    step_clip = fedavg_step_clip(pipeline, protocol.kind, config.adaptive)
    replay = Replay(model, protocol, "proxy" if mode == "proxy" else "infer", device, step_clip)
    labels, method, diagnostics = _recover_labels(
        config.labels,
        model,
        target,
        names,
        observation,
        knowledge,
        pipeline,
        samples,
        contributors,
        config,
        seed,
    )
    restarts = config.restarts
    bn_reference = None
    if has_bn and mode == "exact":
        shared_stats = shared_statistics(observation.bn_statistics or {}, replay.batchnorm_names)
        bn_reference = [(m.to(device), v.to(device)) for m, v in shared_stats]
    elif has_bn:
        bn_reference = replay.running_statistics()
    per_sample_possible = not has_bn and protocol.kind == "gradient"

    def matching_for(adaptive: bool) -> MatchingLoss:
        return choose_matching(
            config.matching,
            pipeline,
            samples,
            adaptive,
            config.tanh_scale,
            per_sample_possible,
            config.normalised_hinge,
            contributors,
        )

    matching = matching_for(config.adaptive)
    if not config.adaptive:
        # Reports warn about an attack blind to the defense only where adapting would change it.
        blind = matching_for(True) != matching or fedavg_step_clip(pipeline, protocol.kind, True)
        diagnostics = {**diagnostics, "unadapted": float(bool(blind))}
    return Problem(
        replay=replay,
        target=[t.repeat((restarts,) + (1,) * (t.dim() - 1)) for t in target],
        labels=None if labels is None else labels.to(device).repeat(restarts, 1),
        label_method=method,
        targets=targets,
        samples=samples,
        restarts=restarts,
        matching=matching,
        pipeline=pipeline,
        bn_exact=has_bn and mode == "exact",
        bn_reference=bn_reference,
        input_shape=tuple(observation.model.input_shape),
        device=device,
        diagnostics=diagnostics,
        spec=observation.model,
        defense=observation.defense,
        weights=observation.weights,
    )


def initial_inputs(
    problem: Problem,
    init: str,
    knowledge: AttackerKnowledge,
    generator: torch.Generator,
    initial: Tensor | None = None,
) -> Tensor:
    """Starting guesses [T, samples, C, H, W] in the data range's scale.

    `randn`: N(0, 1); `rand`: uniform over the data range; `half`: mid-grey; `aux-mean`: the
    mean auxiliary image (the aux-mean reference's guess), every sample of the first restart
    exactly it and those of further restarts it plus N(0, (range/10)^2) noise, so that restarts
    differ. `initial` (laid out as `Reconstruction.inputs`, e.g. a learned attack's guess)
    replaces the first restart's start; further restarts start from `init` as usual.
    """
    shape = (problem.problems, problem.samples, *problem.input_shape)
    low, high = knowledge.data_range
    if init == "randn":
        start = torch.randn(shape, generator=generator, device=problem.device)
    elif init == "rand":
        start = low + (high - low) * torch.rand(shape, generator=generator, device=problem.device)
    elif init == "aux-mean":
        if knowledge.aux_inputs.shape[0] == 0:
            raise ObservationError(
                "attack parameter init='aux-mean' needs auxiliary data; set data.aux-size > 0 "
                "or use init=randn, rand or half"
            )
        mean = knowledge.aux_inputs.float().mean(dim=0).to(problem.device)
        start = mean.expand(shape).clone()
        noise = torch.randn(shape, generator=generator, device=problem.device)
        start[problem.targets :] += 0.1 * (high - low) * noise[problem.targets :]
    else:
        start = torch.full(shape, (low + high) / 2, device=problem.device)
    if initial is not None:
        expected = (problem.targets * problem.samples, *problem.input_shape)
        if tuple(initial.shape) != expected:
            raise ObservationError(
                f"initial guess of shape {tuple(initial.shape)}: expected {expected}"
            )
        start[: problem.targets] = initial.to(problem.device, start.dtype).reshape(
            problem.targets, *shape[1:]
        )
    return start


def _prior_image(knowledge: AttackerKnowledge, like: Tensor) -> Tensor:
    """The attacker's expectation of a pixel, for reading InstaHide's flips: the mean of its
    auxiliary images, or the middle of the range (no preference) without any."""
    if len(knowledge.aux_inputs) and knowledge.aux_inputs.is_floating_point():
        return knowledge.aux_inputs.to(like.device, like.dtype).mean(dim=0)
    low, high = knowledge.data_range
    middle = (low + high) / 2
    return torch.full(knowledge.input_shape, middle, device=like.device, dtype=like.dtype)


def _finish(
    problem: Problem,
    outcome: Outcome,
    knowledge: AttackerKnowledge,
    extra: dict[str, float],
) -> Reconstruction:
    """Keep each target's best restart; images on the CPU in the data range."""
    r, n, b = problem.restarts, problem.targets, problem.samples
    best = outcome.matching.reshape(r, n).argmin(dim=0)
    pick = torch.arange(n, device=best.device)
    x = outcome.variables[0].reshape(r, n, b, *problem.input_shape)[best, pick]
    if problem.sign_flipped:
        x = fold_toward(x, _prior_image(knowledge, x))
    low, high = knowledge.data_range
    inputs = x.reshape(n * b, *problem.input_shape).clamp(low, high).detach().float().cpu()
    matching = outcome.matching.reshape(r, n)[best, pick]
    initial = outcome.initial.reshape(r, n)[best, pick]
    lost = Lost.of(matching, initial)
    if lost.nothing:  # NaN makes the run "nan"; otherwise the others are scored
        inputs.fill_(math.nan)
    if problem.labels is not None:
        labels = problem.labels.reshape(r, n, b)[best, pick].reshape(-1)
    else:
        logits = outcome.variables[1].reshape(r, n, b, -1)[best, pick]
        labels = logits.argmax(dim=-1).reshape(-1)
    message = f"matching={problem.matching.name}; stopped by {outcome.stopped_by}"
    judged = problem.matching.judges_fit
    if not judged:
        message += "; convergence not judged (a sign hinge's fall does not mark a fit)"
    message += lost.note()
    finite = matching[torch.isfinite(matching)]
    diagnostics: dict[str, float | str] = {
        "matching_loss": float(finite.mean()) if finite.numel() else math.nan,
        "restarts": float(r),
        "diverged_targets": float(lost.diverged),
        "stopped_by": outcome.stopped_by,
        **problem.diagnostics,
        **extra,
    }
    return Reconstruction(
        inputs=inputs,
        labels=labels.detach().cpu().long(),
        label_method=problem.label_method,
        iterations=outcome.iterations,
        seconds=outcome.seconds,
        message=message,
        diagnostics=diagnostics,
        # Each of a target's b samples carries its problem's matching losses.
        loss_start=initial.repeat_interleave(b).detach().cpu() if judged else None,
        loss_final=matching.repeat_interleave(b).detach().cpu() if judged else None,
    )


@dataclass(frozen=True)
class Member:
    """One observation ready to optimise: its problems, the generator seeded for it (random
    starts, gradient dropout) and its starting variables."""

    problem: Problem
    generator: torch.Generator
    variables: list[Tensor]


def interchangeable_slots(samples: int, steps: int, batch: int) -> list[list[int]]:
    """Slots trained in the same steps (step k takes slots k * batch ... mod samples): labels
    swapped within such a group give the same update, so a placement is one of their sets."""
    used: dict[int, list[int]] = {j: [] for j in range(samples)}
    for k in range(steps):
        for i in range(batch):
            used[(k * batch + i) % samples].append(k)
    groups: dict[tuple[int, ...], list[int]] = {}
    for slot, ks in used.items():
        groups.setdefault(tuple(ks), []).append(slot)
    return list(groups.values())


def label_placements(
    labels: Tensor, groups: list[list[int]], most: int, generator: torch.Generator
) -> list[Tensor]:
    """Up to `most` distinct placements of `labels` [samples]: the recovered order first, then
    random orders (every distinct one where there are few: 6 for 4 labels in 2 steps of 2)."""

    def canonical(row: Tensor) -> Tensor:
        out = row.clone()
        for slots in groups:
            out[slots] = row[slots].sort().values
        return out

    found = {tuple(canonical(labels).tolist()): canonical(labels)}
    for _ in range(50 * most):
        if len(found) >= most:
            break
        row = canonical(labels[torch.randperm(labels.numel(), generator=generator)])
        found.setdefault(tuple(row.tolist()), row)
    return list(found.values())


def place_labels(problem: Problem, x: Tensor, candidates: int, seed: int) -> Problem:
    """Each problem's recovered labels placed across FedAvg's local steps. The update gives
    the label multiset, not which step trained on which label, and a wrong placement can leave
    the update unmatchable whatever the images (IG at 500 iterations on 4 MNIST digits, 2 steps
    of 2: 13 dB placed as the client had them, 3 dB otherwise). Up to `candidates` distinct
    placements (the recovered order first) are scored by the matching loss at the starting
    images, and each problem keeps its best: the placement moves that loss by orders of
    magnitude (3e-5 against 1e-2 to 2e-2 there) where the starting images barely do."""
    protocol = problem.replay.protocol
    assert problem.labels is not None
    labels, samples = problem.labels, problem.labels.shape[1]
    if candidates <= 1 or protocol.local_steps == 1 or protocol.batch_size >= samples:
        return problem
    generator = torch.Generator().manual_seed(mix_seed(seed, PLACEMENT_STREAM))
    groups = interchangeable_slots(samples, protocol.local_steps, protocol.batch_size)
    count = problem.problems
    per_problem = [label_placements(row, groups, candidates, generator) for row in labels.cpu()]
    candidates = max(len(p) for p in per_problem)
    if candidates == 1:  # one label class, or nothing to place
        return problem
    # A problem with fewer distinct placements repeats its last one (the same loss).
    placed = torch.stack(
        [torch.stack([p[min(c, len(p) - 1)] for p in per_problem]) for c in range(candidates)]
    ).to(labels.device)  # [C, T, samples]
    target = flatten(problem.target)
    losses = []
    with torch.no_grad():  # the replay still differentiates w.r.t. the weights inside
        for candidate in placed:  # one at a time: no more memory than one of the problem
            out = problem.replay(x.detach(), candidate, problem.matching.needs_per_sample)
            out = out.clipped(problem.matching.clip)
            losses.append(problem.matching([out.rows], target, out.per_sample))
    matching = torch.nan_to_num(torch.stack(losses), nan=math.inf)  # [C, T]
    best = matching.argmin(dim=0)
    chosen = placed[best, torch.arange(count, device=best.device)]
    return dataclasses.replace(problem, labels=chosen)


def start(
    attack_seed_base: int,
    observation: Observation,
    knowledge: AttackerKnowledge,
    config: InversionConfig,
    bn_mode: str,
    initial: Tensor | None,
) -> Member:
    """The problem, its seeded generator and the optimised variables: dummy inputs (from
    `initial` for the first restart when given) and, without recovered labels, label logits."""
    seed = attack_seed(attack_seed_base, knowledge, observation)
    problem = prepare(observation, knowledge, config, bn_mode, seed)
    generator = torch.Generator(device=problem.device).manual_seed(seed)
    variables = [initial_inputs(problem, config.init, knowledge, generator, initial)]
    if problem.labels is not None:
        problem = place_labels(problem, variables[0], config.placements, seed)
    if problem.labels is None:
        shape = (problem.problems, problem.samples, observation.model.num_classes)
        variables.append(torch.randn(shape, generator=generator, device=problem.device))
    return Member(problem, generator, variables)


# Each member's generator and problem count, in stacking order: random draws inside the
# objective (gradient dropout) come from each observation's own stream, as if run alone.
Draws = Sequence[tuple[torch.Generator, int]]
Objective = Callable[[Sequence[Tensor], int | None], tuple[Tensor, Tensor]]


def _soft_labels(problem: Problem, variables: Sequence[Tensor]) -> Tensor:
    if problem.labels is not None:
        return problem.labels
    return F.softmax(variables[1], dim=-1)


def _layer_groups(names: list[str]) -> list[list[int]]:
    """Parameter indices grouped by owning module, in forward (definition) order."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(name.rpartition(".")[0], []).append(index)
    return list(groups.values())


def check_feasible(config: InversionConfig, name: str, targets: int, aux: int) -> None:
    """Refuse, before a run, settings under which this attack fails on every update: labels
    or a start from auxiliary data without any, iDLG's label rule on updates of several samples.
    """
    for setting, value in (("labels", config.labels), ("init", config.init)):
        if value in ("counts", "aux-mean") and aux == 0:
            raise ValueError(
                f"attack.{name}.{setting}={value!r} needs auxiliary data, but data.aux-size=0; "
                f"set data.aux-size > 0 or choose another {setting}"
            )
    if config.labels == "idlg" and targets != 1:
        raise ValueError(
            f"attack.{name}.labels='idlg' reads one label per update, but each update holds "
            f"{targets} samples; use labels=auto, rows, counts or joint"
        )


class BatchedInversion:
    """What the optimisation attacks share: a round's observations, inverted together.

    `reconstruct_batch` lays every observation out as its own problems (own seed, labels and
    starts), stacks those that share model, weights and layout (`batching.plan`, at most
    `Budget.max_batch` problems, 0: automatic), optimises each stack as one problem and splits
    the outcome, so each observation gets the reconstruction and diagnostics it would get
    alone. Iterations are per problem; the seconds of a stack are those its jobs would have
    had one after another (`max_seconds` x jobs), and each job is charged its own set-up and
    an equal share of its stack's time. Subclasses give the objective, the optimiser settings
    and their diagnostics; one with `stacks_observations = False` solves each observation
    (with its restarts) alone.
    """

    reference = False
    stateful = False  # every random choice comes from (seed, round, client): any worker will do
    stacks_observations = True

    config: InversionConfig
    seed: int
    name: str

    def _bn_mode(self) -> str:
        return "auto"

    def _objective(self, problem: Problem, draws: Draws, total: int) -> Objective:
        raise NotImplementedError

    def _settings(self, problem: Problem, knowledge: AttackerKnowledge) -> Settings:
        raise NotImplementedError

    def _extra(self, problem: Problem) -> dict[str, float]:
        return {}

    def check_feasible(self, targets: int, aux: int) -> None:
        """See `check_feasible`: `targets` samples per observed update, `aux` auxiliary images."""
        check_feasible(self.config, self.name, targets, aux)

    def label_layer_remedy(self, encoded: bool) -> str | None:
        """What to set instead when this attack reads labels off the classifier's last layer
        (every label method but `joint`; `auto` is joint under MixUp and InstaHide), else None."""
        if self.config.labels == "joint" or (self.config.labels == "auto" and encoded):
            return None
        return f"attack.{self.name}.labels='joint' (labels optimised with the images)"

    def reconstruct(
        self,
        observation: Observation,
        knowledge: AttackerKnowledge,
        budget: Budget,
        initial: Tensor | None = None,
    ) -> Reconstruction:
        """Invert one observation within the budget; `initial` starts the first restart from
        a given guess (layout of `Reconstruction.inputs`) instead of noise."""
        result = self.reconstruct_batch([observation], knowledge, budget, [initial])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def reconstruct_batch(
        self,
        observations: Sequence[Observation],
        knowledge: AttackerKnowledge,
        budget: Budget,
        initials: Sequence[Tensor | None] | None = None,
    ) -> list[Reconstruction | Exception]:
        """Each observation's reconstruction, or the exception that stopped it (an observation
        that cannot be inverted fails alone; a failing stack fails its own jobs)."""
        starts = list(initials) if initials is not None else [None] * len(observations)
        results: list[Reconstruction | Exception | None] = [None] * len(observations)
        members: list[Member] = []
        where: list[int] = []
        set_up: list[float] = []
        for index, (observation, initial) in enumerate(zip(observations, starts, strict=True)):
            began = time.perf_counter()
            try:
                member = start(
                    self.seed, observation, knowledge, self.config, self._bn_mode(), initial
                )
            except Exception as error:  # this observation only
                results[index] = error
                continue
            members.append(member)
            where.append(index)
            set_up.append(time.perf_counter() - began)
        if members:
            with differentiable_attention():
                first = members[0].problem
                if not self.stacks_observations:
                    cap = 1  # a member larger than the cap is a chunk of its own
                else:
                    cap = budget.max_batch or automatic_cap(
                        first.device,
                        lambda: self._probe(members[0], budget),
                        update_bytes=first.update_bytes,
                    )
                chunks = plan(
                    members,
                    key=lambda m: m.problem.batch_key(),
                    same=lambda a, b: a.problem.same_weights(b.problem),
                    problems=lambda m: m.problem.problems,
                    cap=cap,
                )
                for chunk in chunks:
                    began = time.perf_counter()
                    try:
                        done: Sequence[Reconstruction | Exception] = self._solve(
                            chunk.members, knowledge, budget
                        )
                    except Exception as error:  # e.g. out of memory: this stack's jobs fail
                        done = [error] * chunk.size
                    share = (time.perf_counter() - began) / chunk.size
                    for index, result in zip(chunk.indices, done, strict=True):
                        if isinstance(result, Reconstruction):
                            seconds = set_up[index] + share
                            result = dataclasses.replace(result, seconds=seconds)
                        results[where[index]] = result
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def _probe(self, member: Member, budget: Budget) -> int:
        """One objective and backward on two copies of `member` (the batched path), for the
        memory a problem needs; draws come from a throwaway generator. Returns the count."""
        problem = stack([member.problem, member.problem])
        variables = [torch.cat([v, v]).detach().requires_grad_() for v in member.variables]
        throwaway = torch.Generator(device=problem.device).manual_seed(0)
        objective = self._objective(problem, [(throwaway, problem.problems)], 1)
        loss, _ = objective(variables, 0)
        torch.autograd.backward(loss.sum(), inputs=variables)
        return problem.problems

    def _solve(
        self, members: Sequence[Member], knowledge: AttackerKnowledge, budget: Budget
    ) -> list[Reconstruction]:
        problem = stack([m.problem for m in members])
        columns = zip(*(m.variables for m in members), strict=True)
        variables = [torch.cat(parts) for parts in columns]
        draws = [(m.generator, m.problem.problems) for m in members]
        jobs = len(members)
        shared = dataclasses.replace(budget, max_seconds=budget.max_seconds * jobs)
        objective = self._objective(problem, draws, int(budget.max_iterations))
        native = native_pays(
            problem.replay.model,
            problem.input_shape,
            problem.problems * problem.samples,
            problem.device,
        )
        with cpu_convolutions(native):
            outcome = optimise(objective, variables, self._settings(problem, knowledge), shared)
        batch = {"batch_jobs": float(jobs), "batch_problems": float(problem.problems)}
        results, offset = [], 0
        for member in members:
            count = member.problem.problems
            part = dataclasses.replace(
                outcome.part(offset, offset + count), seconds=outcome.seconds / jobs
            )
            offset += count
            extra = {**self._extra(member.problem), **batch}
            results.append(_finish(member.problem, part, knowledge, extra))
        return results


class DLG(BatchedInversion):
    """Deep Leakage from Gradients (and iDLG with `labels='auto'`): L2 matching, L-BFGS."""

    # L-BFGS without a line search turns the round-off by which a stacked replay differs from
    # a lone one (1e-7) into results up to 33 dB apart (audit AW1): a client's row must not
    # depend on which clients shared its round, on attack.max-batch or on free GPU memory.
    stacks_observations = False

    def __init__(self, config: DLGConfig | None = None, seed: int = 0, name: str = "dlg") -> None:
        self.config = config or DLGConfig()
        self.seed = seed
        self.name = name

    def _objective(self, problem: Problem, draws: Draws, total: int) -> Objective:
        target = flatten(problem.target)  # fixed: flattened once, not every iteration

        def objective(v: Sequence[Tensor], _iteration: int | None) -> tuple[Tensor, Tensor]:
            out = problem.replay(
                v[0], _soft_labels(problem, v), problem.matching.needs_per_sample
            ).clipped(problem.matching.clip)
            matching = problem.matching([out.rows], target, out.per_sample)
            return matching, matching

        return objective

    def _settings(self, problem: Problem, knowledge: AttackerKnowledge) -> Settings:
        assert isinstance(self.config, DLGConfig)
        return Settings(
            optimizer="lbfgs",
            schedule=StepDecay(self.config.learning_rate, ()),
            history=self.config.history,
            check_every=self.config.check_every,
            description=self.name,
            keep_best=self.config.keep_best,
        )


class InvertingGradients(BatchedInversion):
    """Inverting Gradients (IG), and with a BatchNorm weight the GradInversion-style prior.

    The same class serves `ig` (bn_weight 0, IG's TV: 1e-4 on grey images, 1e-2 on colour)
    and `gradinversion` (GradAttack's alpha_BN = 1e-3 and per-defense TV). Under InstaHide TV
    acts on the unsigned image.
    """

    def __init__(self, config: IGConfig | None = None, seed: int = 0, name: str = "ig") -> None:
        self.config = config or IGConfig()
        self.seed = seed
        self.name = name

    @property
    def ig(self) -> IGConfig:
        """The configuration, typed."""
        assert isinstance(self.config, IGConfig)
        return self.config

    def tv_weight(self, pipeline: DefensePipeline, channels: int) -> float:
        """The configured TV weight, or the default for this attack, defense and images'
        channel count (IG: by channels; GradInversion: GradAttack's per-defense value)."""
        if self.ig.tv_weight is not None:
            return self.ig.tv_weight
        if not isinstance(self.config, GradInversionConfig):
            return ig_tv_weight(channels)
        for kind in ("prune", "mixup", "instahide"):
            if any(step.kind == kind for step in pipeline.steps):
                return GRADATTACK_TV[kind]
        return GRADATTACK_TV["none"]

    def _bn_mode(self) -> str:
        return self.ig.bn_mode

    def _weights(self, problem: Problem, iteration: int | None, total: int) -> tuple[float, float]:
        """(TV weight, BN weight) at this iteration."""
        return self.tv_weight(problem.pipeline, problem.input_shape[0]), self.ig.bn_weight

    def _selection(
        self, problem: Problem, iteration: int | None, total: int, draws: Draws
    ) -> tuple[list[int], list[Tensor] | None]:
        """Which parameters are matched, and dropout masks (None: all coordinates)."""
        return list(range(len(problem.target))), None

    def _objective(self, problem: Problem, draws: Draws, total: int) -> Objective:
        absolute = problem.sign_flipped
        use_bn = problem.bn_reference is not None
        # The target of each selection of layers, flattened once (it does not change).
        flat_targets: dict[tuple[int, ...], list[Tensor]] = {}
        everything = list(range(len(problem.target)))

        def objective(v: Sequence[Tensor], iteration: int | None) -> tuple[Tensor, Tensor]:
            out = problem.replay(
                v[0], _soft_labels(problem, v), problem.matching.needs_per_sample
            ).clipped(problem.matching.clip)
            chosen, masks = self._selection(problem, iteration, total, draws)
            if masks is None and chosen == everything:
                dummy = [out.rows]  # the replay's own rows where it computed them so
            else:
                update = out.update
                dummy = [update[i] for i in chosen]
            target = [problem.target[i] for i in chosen]
            if masks is None:
                key = tuple(chosen)
                if key not in flat_targets:
                    flat_targets[key] = flatten(target)
                target = flat_targets[key]
            per_sample = None if out.per_sample is None else [out.per_sample[i] for i in chosen]
            if masks is not None:
                dummy = [d * m for d, m in zip(dummy, masks, strict=True)]
                target = [t * m for t, m in zip(target, masks, strict=True)]
                if per_sample is not None:
                    per_sample = [
                        p * m.unsqueeze(1) for p, m in zip(per_sample, masks, strict=True)
                    ]
            matching = problem.matching(dummy, target, per_sample)
            tv_weight, bn_weight = self._weights(problem, iteration, total)
            loss = matching
            if tv_weight > 0:
                loss = loss + tv_weight * total_variation(v[0], absolute)
            if bn_weight > 0 and use_bn:
                loss = loss + bn_weight * batchnorm_prior(out.statistics, problem.bn_reference)
            return loss, matching

        return objective

    def _settings(self, problem: Problem, knowledge: AttackerKnowledge) -> Settings:
        cfg = self.ig
        return Settings(
            optimizer="adam",
            schedule=StepDecay(cfg.learning_rate, cfg.milestones, cfg.decay, self._stages()),
            signed=cfg.signed,
            box=knowledge.data_range if cfg.boxed else None,
            check_every=cfg.check_every,
            description=self.name,
            keep_best=cfg.keep_best,  # over several stages refused by StepwiseConfig
        )

    def _extra(self, problem: Problem) -> dict[str, float]:
        extra = {
            "tv_weight": self.tv_weight(problem.pipeline, problem.input_shape[0]),
            # As applied: a model without BatchNorm gives the prior nothing (audit CX3).
            "bn_weight": self.ig.bn_weight if problem.bn_reference is not None else 0.0,
        }
        if problem.bn_reference is not None:
            extra["bn_exact"] = float(problem.bn_exact)
        return extra

    def _stages(self) -> int:
        return 1


class StepwiseInversion(InvertingGradients):
    """HFGradInv's stepwise inversion on top of IG: stage s of S matches the deepest
    ceil(s * L / S) of the L layers, with gradient dropout; TV from `tv_stage`, the BatchNorm
    prior from `bn_stage`; IG's learning-rate schedule restarts in each stage."""

    def __init__(
        self, config: StepwiseConfig | None = None, seed: int = 0, name: str = "stepwise"
    ) -> None:
        super().__init__(config or StepwiseConfig(), seed, name)

    @property
    def stepwise(self) -> StepwiseConfig:
        """The configuration, typed."""
        assert isinstance(self.config, StepwiseConfig)
        return self.config

    def _stage(self, iteration: int | None, total: int) -> int:
        stages = self.stepwise.stages
        if iteration is None:
            return stages
        return min(stages, iteration // max(1, math.ceil(total / stages)) + 1)

    def _stages(self) -> int:
        return self.stepwise.stages

    def _weights(self, problem: Problem, iteration: int | None, total: int) -> tuple[float, float]:
        stage = self._stage(iteration, total)
        tv = (
            self.tv_weight(problem.pipeline, problem.input_shape[0])
            if stage >= self.stepwise.tv_stage
            else 0.0
        )
        bn = self.stepwise.bn_weight if stage >= self.stepwise.bn_stage else 0.0
        return tv, bn

    def _selection(
        self, problem: Problem, iteration: int | None, total: int, draws: Draws
    ) -> tuple[list[int], list[Tensor] | None]:
        groups = _layer_groups(problem.replay.names)
        stage = self._stage(iteration, total)
        count = math.ceil(stage * len(groups) / self.stepwise.stages)
        chosen = [i for group in groups[len(groups) - count :] for i in group]
        if iteration is None or self.stepwise.dropout == 0:
            return chosen, None
        keep = 1.0 - self.stepwise.dropout
        masks = []
        for i in chosen:
            shape, dtype = problem.target[i].shape[1:], problem.target[i].dtype
            drawn = [
                torch.rand((problems, *shape), generator=generator, device=problem.device) < keep
                for generator, problems in draws
            ]
            masks.append(torch.cat(drawn).to(dtype))
        return chosen, masks
