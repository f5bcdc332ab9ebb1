"""TAG (Deng et al. 2021), the LTI paper's language baseline: gradient matching in the space of
token embeddings, then the nearest token of the embedding table at every position.

As the LTI paper runs it (through the breaching library): the dummy inputs are continuous rows
of the (frozen, public) embedding table [b, L, d] and the next-token targets are optimised
jointly as soft distributions [b, L, V]; the objective is the squared L2 distance between the
dummy and the observed update plus `tag_scale` times an L1 distance weighted per parameter
block, the weights falling linearly from 1 (first block in forward order) to 1/n (last), since
TAG finds early layers the most informative; Adam with a linear warm-up and linear decay;
each position is mapped to the table row of highest cosine similarity (after centring),
except the last, whose embedding gets no gradient under the causal loss: it is read from the
optimised next-token distribution at position L-2 (`read_tokens`).

Defense-adaptive variants (LTI supplementary, "Language baselines"): under sign compression of
one release, ||.||^2 and ||.||_1 act on the hinge h = max(-g * sign(s), 0) instead of the
difference, exactly as printed (`tag`); for a mean of several sign releases (the aggregate-only
view) the distances compare the mean of tanh'ed dummy updates, one per contributor; under
pruning only the received non-zero coordinates count; under DP-SGD the dummy sequences'
gradients are clipped to its public C before their mean. Noise needs no change.

The printed hinge has a trivial minimum: with the next-token targets optimised jointly, the
dummy gradient can shrink towards zero (targets equal to the model's own predictions), which
drives both hinge terms to zero whatever the signs. `tag-normalised` divides them by ||g||^2
and ||g||_1 (scale invariance, as fedleak's vision hinge), which is a much stronger attack under
sign compression; see the README's language-task section for both measured.

Targets (one batch update, or each sample's under per-sample sharing) and restarts are
optimised as one batched problem by the shared engine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedleak.attacks.optimization.engine import Lost, Settings, optimise
from fedleak.attacks.optimization.kernels import differentiable_attention
from fedleak.attacks.optimization.losses import fedavg_step_clip, tanh_mean, with_dp_clip
from fedleak.attacks.optimization.replay import Replay, observed_updates
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation, Reconstruction
from fedleak.defenses import (
    DefensePipeline,
    Prune,
    SignCompression,
    parse_defense_spec,
)
from fedleak.models import build_model, has_batchnorm
from fedleak.seeds import mix_seed
from fedleak.settings import ConfigError, setting
from fedleak.settings import Settings as SettingsBase

_EPS = 1e-12


class TokenObservationError(ConfigError):
    """An observation a token attack cannot invert (images, or a model without embeddings)."""


@dataclass(frozen=True)
class TAGConfig(SettingsBase):
    """TAG's settings; defaults follow breaching's TAG configuration used by the LTI paper
    (Adam, step 0.05, 1,000 iterations via `attack.max-iterations`, L1 weight 0.1).

    `warmup`: fraction of the iterations over which the learning rate ramps up linearly before
    it decays linearly to zero. `init_scale`: the dummy embeddings start from N(0, s^2) with s
    this times the embedding table's standard deviation. `label_scale`: standard deviation of
    the initial next-token logits. `adaptive`: choose the distance from the public defense.
    `normalised_hinge`: scale-invariant sign hinge (`tag-normalised`; see the module docstring).
    """

    learning_rate: float = setting(0.05, low=0.0, low_open=True, doc="Adam step size")
    warmup: float = setting(
        0.05, low=0.0, high=1.0, high_open=True, doc="fraction of iterations of linear warm-up"
    )
    tag_scale: float = setting(0.1, low=0.0, doc="weight of the L1 term beside the L2 distance")
    adaptive: bool = setting(True, doc="choose the distance from the public defense spec")
    restarts: int = setting(1, low=1, doc="initialisations per target, best matching loss kept")
    init_scale: float = setting(
        1.0, low=0.0, low_open=True, doc="initial embeddings' std over the table's"
    )
    label_scale: float = setting(0.1, low=0.0, doc="std of the initial next-token logits")
    normalised_hinge: bool = setting(False, doc="scale-invariant sign hinge (tag-normalised)")
    tanh_scale: float = setting(
        1.0, low=0.0, low_open=True, doc="mean of sign releases: tanh(scale * g / rms(g))"
    )
    check_every: int = setting(50, low=1, doc="iterations between budget/NaN/progress checks")


@dataclass(frozen=True)
class WarmupLinear:
    """Linear warm-up over `warmup` of the iterations, then linear decay to zero (the schedule
    of BERT's Adam, which TAG used)."""

    learning_rate: float
    warmup: float

    def rate(self, iteration: int, total: int) -> float:
        """The learning rate at `iteration` of `total`."""
        ramp = max(1, round(self.warmup * total))
        if iteration < ramp and self.warmup > 0:
            return self.learning_rate * (iteration + 1) / ramp
        return self.learning_rate * max(0.0, (total - iteration) / max(1, total - ramp))


def layer_weights(blocks: int) -> list[float]:
    """TAG's L1 weights per parameter block in forward order: 1 down to 1/blocks."""
    return [1.0 - i / blocks for i in range(blocks)]


def _rowsum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(dim=1)


@dataclass(frozen=True)
class TAGLoss:
    """The matching distance for one observation, one value per problem ([T]).

    `kind`: `tag` (L2^2 + scale * weighted L1 of the difference), `tag-sign` (the same on the
    sign hinge) or `tag-tanh` (`tag` on the mean of tanh'ed per-contributor dummy updates);
    `masked`: only the received non-zero coordinates (pruning).
    """

    kind: str
    weights: tuple[float, ...]
    scale: float
    masked: bool = False
    normalised_hinge: bool = True
    tanh_scale: float = 1.0
    groups: int = 0
    needs_per_sample: bool = False
    clip: float = 0.0  # DP-SGD's C, replayed on the dummy (`ReplayOutput.clipped`)

    @property
    def judges_fit(self) -> bool:
        """Whether a fall of this loss says the dummy fits the update. Not the sign hinges':
        the printed one reaches zero at any point whose gradient vanishes (the module
        docstring), and the normalised one fell tenfold at a token accuracy of 0.11 when its
        budget was cut (outside audit), so `converged` is left undecided under sign."""
        return self.kind != "tag-sign"

    @property
    def name(self) -> str:
        """A label for reports, e.g. `tag+mask`, `tag+clip`."""
        return self.kind + ("+mask" if self.masked else "") + ("+clip" if self.clip > 0 else "")

    def __call__(
        self, dummy: Sequence[Tensor], target: Sequence[Tensor], per_sample: Sequence[Tensor] | None
    ) -> Tensor:
        if self.kind == "tag-sign":
            hinge = [torch.relu(-d * torch.sign(t)) for d, t in zip(dummy, target, strict=True)]
            squared = sum(_rowsum(h.square()) for h in hinge)
            absolute = sum(w * _rowsum(h) for w, h in zip(self.weights, hinge, strict=True))
            if self.normalised_hinge:
                squared = squared / (sum(_rowsum(d.square()) for d in dummy) + _EPS)
                absolute = absolute / (sum(_rowsum(d.abs()) for d in dummy) + _EPS)
            return squared + self.scale * absolute
        if self.kind == "tag-tanh":
            if per_sample is None:
                per_sample = [d.unsqueeze(1) for d in dummy]
            groups = self.groups if per_sample[0].shape[1] > 1 else 0
            dummy = tanh_mean(per_sample, self.tanh_scale, groups)
        diff = [d - t for d, t in zip(dummy, target, strict=True)]
        if self.masked:
            diff = [x * (t != 0) for x, t in zip(diff, target, strict=True)]
        squared = sum(_rowsum(x.square()) for x in diff)
        absolute = sum(w * _rowsum(x.abs()) for w, x in zip(self.weights, diff, strict=True))
        return squared + self.scale * absolute


def choose_tag_loss(
    config: TAGConfig,
    pipeline: DefensePipeline,
    blocks: int,
    samples: int,
    contributors: int,
    per_sample_available: bool,
) -> TAGLoss:
    """TAG's distance, adapted to the public defense when `config.adaptive` (module docstring;
    under DP-SGD the dummy sequences' gradients are clipped to C before their mean, as
    `choose_matching` does for images)."""
    weights = tuple(layer_weights(blocks))
    if not config.adaptive:
        return TAGLoss("tag", weights, config.tag_scale)
    loss = _released_form(config, pipeline, weights, samples, contributors, per_sample_available)
    return with_dp_clip(loss, pipeline, samples, per_sample_available)


def _released_form(
    config: TAGConfig,
    pipeline: DefensePipeline,
    weights: tuple[float, ...],
    samples: int,
    contributors: int,
    per_sample_available: bool,
) -> TAGLoss:
    """TAG's distance for what compression leaves of the update (`choose_tag_loss`)."""
    masked = pipeline.find(Prune) is not None
    if pipeline.find(SignCompression) is not None:
        if contributors == 1:
            return TAGLoss(
                "tag-sign", weights, config.tag_scale, normalised_hinge=config.normalised_hinge
            )
        groups = contributors if samples % contributors == 0 else 0
        return TAGLoss(
            "tag-tanh",
            weights,
            config.tag_scale,
            masked,
            tanh_scale=config.tanh_scale,
            groups=groups,
            needs_per_sample=per_sample_available,
        )
    return TAGLoss("tag", weights, config.tag_scale, masked)


def nearest_tokens(embeddings: Tensor, table: Tensor) -> Tensor:
    """Token ids [...] of the table rows [V, d] most cosine-similar (after centring each
    vector) to `embeddings` [..., d]."""
    rows = table - table.mean(dim=-1, keepdim=True)
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    flat = embeddings.reshape(-1, embeddings.shape[-1])
    flat = flat - flat.mean(dim=-1, keepdim=True)
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return (flat @ rows.T).argmax(dim=-1).reshape(embeddings.shape[:-1])


def read_tokens(embeddings: Tensor, labels: Tensor, table: Tensor) -> Tensor:
    """The reconstructed token ids [..., L] from TAG's two optimised variables: the dummy
    embeddings [..., L, d] and the next-token logits [..., L, V] (index l: the soft target
    of token l, predicted from position l - 1; index 0 is never a target).

    Positions 0..L-2 are the embeddings' nearest tokens. The last position comes from the
    next-token distribution at position L-2 (its argmax): the causal loss never predicts from
    position L-1, so its embedding gets exactly zero gradient and stays at its random start,
    while the last token does enter the update as the target of position L-2. Measured on the
    untrained transformer3 (lee-news, 300-token BPE, B = 1, no defense): last position 0/8 from
    the embedding, 8/8 from the distribution (L = 8); 4/4 at L = 16. Under sign compression the
    distributions carry nothing (0/8, both hinges: they drift to the model's own predictions)
    but the embedding there is noise too, so nothing is lost.

    Positions 1..L-2 keep the embeddings alone, although the distributions estimate them too.
    Adding 0.1 x the log-softmax of the distribution to the cosine similarity helped without a
    defense (middle tokens recovered 45 -> 47 of 48 at L = 8, 43 -> 51 of 56 at L = 16) but
    under sign it hurt `tag` (14 -> 6 of 48) and barely moved `tag-normalised` (25 -> 28),
    the distributions being degenerate there: a defense-dependent mix, tuned on so few
    sequences, was not worth its complexity.
    """
    tokens = nearest_tokens(embeddings, table)
    if tokens.shape[-1] > 1:
        tokens[..., -1] = labels[..., -1, :].argmax(dim=-1)
    return tokens


_NEEDS = (
    "TAG optimises embeddings, so the model needs its frozen input embedding as a "
    "`token_embedding` buffer [V, d] and a forward that takes embeddings [B, L, d] in place of "
    "token ids (as fedleak's transformer3 does)"
)


def _embedding_table(model: torch.nn.Module, observation: Observation) -> Tensor:
    """The model's frozen token embedding [V, d], once its forward is seen to take rows of it."""
    name, vocab = observation.model.name, observation.model.num_classes
    table = getattr(model, "token_embedding", None)
    if not isinstance(table, Tensor):
        raise TokenObservationError(f"model {name!r} has no token embedding table: {_NEEDS}")
    if isinstance(table, torch.nn.Parameter) or table.requires_grad:
        # Replayed as inputs, a trained table's own gradient through them goes missing: the
        # matching loss stays above zero at the true tokens.
        raise TokenObservationError(
            f"model {name!r}: its token_embedding is trained (a parameter); {_NEEDS}"
        )
    if table.dim() != 2 or table.shape[0] != vocab:
        raise TokenObservationError(
            f"model {name!r}: token_embedding of shape {tuple(table.shape)} for a vocabulary "
            f"of {vocab} tokens; expected [{vocab}, d], one row per token the model scores"
        )
    length = observation.model.input_shape[0]
    try:
        with torch.no_grad():
            model(table[torch.zeros(1, length, dtype=torch.long, device=table.device)])
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise TokenObservationError(
            f"model {name!r} cannot take embeddings [1, {length}, {table.shape[1]}] ({reason}); "
            f"{_NEEDS}"
        ) from None
    return table


class TAG:
    """The `tag` attack on token observations (see the module docstring)."""

    modalities = ("tokens",)
    stateful = False  # every random choice comes from (seed, round, client): any worker will do

    def __init__(self, config: TAGConfig | None = None, seed: int = 0, name: str = "tag") -> None:
        self.config = config or TAGConfig()
        self.seed = seed
        self.name = name

    def reconstruct(
        self, observation: Observation, knowledge: AttackerKnowledge, budget: Budget
    ) -> Reconstruction:
        """Invert the observation within the budget: token ids [targets * b, L]."""
        cfg = self.config
        if observation.modality != "tokens":
            raise TokenObservationError(
                f"observation modality={observation.modality!r}: tag inverts token sequences"
            )
        device = torch.device(knowledge.device)
        model = build_model(observation.model)
        model.load_state_dict(observation.weights)
        model = model.to(device)
        table = _embedding_table(model, observation)
        pipeline = parse_defense_spec(observation.defense)
        observed = observed_updates(observation)
        shared, protocol = observed.rows, observed.protocol
        targets, samples, contributors = observed.count, observed.samples, observed.contributors
        names = [name for name, _ in model.named_parameters()]
        missing = [name for name in names if name not in shared]
        if missing:
            raise TokenObservationError(f"the update lacks parameters {missing[:3]}")
        step_clip = fedavg_step_clip(pipeline, protocol.kind, cfg.adaptive)
        replay = Replay(model, protocol, "infer", device, step_clip)
        per_sample_ok = not has_batchnorm(model) and protocol.kind == "gradient"
        loss = choose_tag_loss(cfg, pipeline, len(names), samples, contributors, per_sample_ok)
        adaptation: dict[str, float] = {}
        if not cfg.adaptive:
            # Reports warn about an attack blind to the defense only where adapting would change it.
            adapted = dataclasses.replace(cfg, adaptive=True)
            adaptive_loss = choose_tag_loss(
                adapted, pipeline, len(names), samples, contributors, per_sample_ok
            )
            blind = adaptive_loss != loss or fedavg_step_clip(pipeline, protocol.kind, True)
            adaptation["unadapted"] = float(bool(blind))
        restarts = cfg.restarts
        target = [
            shared[name].to(device).float().repeat((restarts,) + (1,) * (shared[name].dim() - 1))
            for name in names
        ]
        problems = restarts * targets
        length, vocab = observation.model.input_shape[0], observation.model.num_classes
        seed = mix_seed(self.seed, knowledge.seed, observation.round, observation.client_id)
        generator = torch.Generator(device=device).manual_seed(seed)
        scale = cfg.init_scale * float(table.std())
        embeddings = scale * torch.randn(
            (problems, samples, length, table.shape[1]), generator=generator, device=device
        )
        logits = cfg.label_scale * torch.randn(
            (problems, samples, length, vocab), generator=generator, device=device
        )

        def objective(v: Sequence[Tensor], _iteration: int | None) -> tuple[Tensor, Tensor]:
            out = replay(v[0], torch.softmax(v[1], dim=-1), loss.needs_per_sample)
            out = out.clipped(loss.clip)
            matching = loss(out.update, target, out.per_sample)
            return matching, matching

        settings = Settings(
            optimizer="adam",
            schedule=WarmupLinear(cfg.learning_rate, cfg.warmup),  # type: ignore[arg-type]
            signed=False,
            check_every=cfg.check_every,
            description=self.name,
        )
        with differentiable_attention():
            outcome = optimise(objective, [embeddings, logits], settings, budget)
        matching = outcome.matching.reshape(restarts, targets)
        best = matching.argmin(dim=0)
        pick = torch.arange(targets, device=best.device)

        def kept_tokens(variables: Sequence[Tensor]) -> Tensor:
            """The tokens [targets, samples, L] of each target's kept restart."""
            chosen, labels = (
                v.reshape(restarts, targets, samples, length, -1)[best, pick] for v in variables
            )
            return read_tokens(chosen, labels, table)

        tokens = kept_tokens(outcome.variables)
        kept = matching[best, pick]
        judged = loss.judges_fit
        if judged:
            # Convergence is judged on what is scored: the tokens read at the end against those
            # read at the start. The continuous iterate's loss stayed at 0.23 of its start on
            # sequences recovered exactly, which the tenfold rule called a budget run out.
            def hard_loss(sequences: Tensor) -> Tensor:
                with differentiable_attention():  # the same replay as the optimisation's
                    out = replay(table[sequences], sequences, loss.needs_per_sample)
                    truth = [t[:targets] for t in target]  # restart 0's rows: every target
                    return loss(out.clipped(loss.clip).update, truth, out.per_sample).detach()

            loss_final = torch.where(torch.isfinite(kept), hard_loss(tokens), kept)
            loss_start = hard_loss(kept_tokens([embeddings, logits]))
        tokens = tokens.reshape(targets * samples, length)
        # As for images: a target with no finite loss even at the start (a NaN update) has its
        # tokens read from its random start; when all are, the run has no result.
        lost = Lost.of(kept, outcome.initial.reshape(restarts, targets)[best, pick])
        finite = kept[torch.isfinite(kept)]
        message = f"matching={loss.name}; stopped by {outcome.stopped_by}"
        if not judged:
            message += "; convergence not judged (a sign hinge's fall does not mark a fit)"
        message += lost.note()
        return Reconstruction(
            inputs=tokens.cpu(),
            labels=None,
            iterations=outcome.iterations,
            seconds=outcome.seconds,
            status="nan" if lost.nothing else "ok",
            message=message,
            diagnostics={
                "matching_loss": float(finite.mean()) if finite.numel() else math.nan,
                "restarts": float(restarts),
                "diverged_targets": float(lost.diverged),
                "tag_scale": cfg.tag_scale,
                **adaptation,
            },
            # Each of a target's samples carries its problem's matching losses, from which the
            # auditor records `loss_start`, `loss_final` and `converged` as for image attacks.
            loss_start=loss_start.repeat_interleave(samples).detach().cpu() if judged else None,
            loss_final=loss_final.repeat_interleave(samples).detach().cpu() if judged else None,
        )
