"""LTI's training pairs: (featurised defended update of aux samples, those samples).

The attacker simulates a client on its own auxiliary data at the current global weights and
passes the result through the clients' own `DefensePipeline`, so the inverter learns to undo
the defense (the attack is adaptive by construction). A pair's *group* is the set of aux
samples one update is computed from: one sample for B = 1 (or the per-sample threat model),
B samples for a FedSGD batch, the N examples of a FedAvg client. In the aggregate-only view a
group holds every contributor's samples, and its update is the mean of one release per
contributor (each client defends its own share), as the server observes it.

How a group's update is computed, fastest first:
- FedSGD, no input encoding, no BatchNorm: per-sample gradients by torch.func (the client's
  own `per_sample_gradients`), DP-SGD clipping, mean over the group.
- FedSGD, no input encoding, BatchNorm: per-sample gradients are undefined, so each group is
  one forward in train mode with the group's own batch statistics, exactly as the client
  computes its batch gradient; groups are vectorised with vmap over a copy of the model whose
  BatchNorm layers keep no running statistics. For B = 1 the statistics are those of the single
  image over its spatial positions, which is what a client with batch size 1 shares.
- FedAvg, no input encoding, no DP-SGD: the K local steps of every group unrolled at once by
  the attacks' `Replay` (vmap over groups), which replays the client's steps exactly.
- Anything else (DP-SGD inside FedAvg steps, MixUp/InstaHide encodings): the client's own
  `compute_update`, one group at a time (a Python loop: exact but slow), because their
  randomness sits inside the client's computation.

What stays fixed within a round is computed once: when the release (noise, pruning, sign) is
deterministic the features themselves are cached; otherwise the pre-release updates are kept
(when they fit in `max_cache_bytes`) and only the release is re-drawn each epoch. When the
release only adds Gaussian noise and the features are hashed, what is kept is the clean
updates in hash space, and each epoch draws the noise there (`binned_noise`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from fedleak.attacks.learned.binned_noise import BinnedNoise, CleanBins, gaussian_release_std
from fedleak.attacks.learned.hashing import FeatureHasher, resolve_num_bins
from fedleak.attacks.optimization.replay import ClientProtocol, Replay
from fedleak.attacks.types import Observation
from fedleak.defenses import DPSGD, DefensePipeline, GaussianNoise, PartnerPool
from fedleak.interrupt import stop_requested
from fedleak.models import has_batchnorm
from fedleak.training.gradients import per_sample_gradients, refuse_batchnorm
from fedleak.training.loss import task_loss
from fedleak.training.update import LocalTraining, compute_update

Params = dict[str, Tensor]
UnitKind = Literal["gradient", "delta"]


class _OutOfTime(Exception):
    """The deadline of `PairSource.features` came, or a stop was requested, between chunks."""


@dataclass(frozen=True)
class Unit:
    """What one observed update is computed from: `size` samples, by FedSGD or FedAvg, split
    evenly among `contributors` clients whose released updates were averaged."""

    kind: UnitKind
    size: int
    batch_size: int
    local_steps: int
    learning_rate: float
    contributors: int = 1

    def member(self) -> Unit:
        """One contributor's share: what each averaged release was computed from."""
        if self.size % self.contributors:
            raise ValueError(
                f"an update of {self.size} samples averaged over {self.contributors} clients: "
                "the clients' shares differ, and learned attacks need equal ones"
            )
        return dataclasses.replace(self, size=self.size // self.contributors, contributors=1)

    def training(self) -> LocalTraining:
        """The client's declared local computation for one group."""
        if self.kind == "gradient":
            return LocalTraining(mode="fedsgd", batch_size=self.size)
        return LocalTraining(
            mode="fedavg",
            batch_size=self.batch_size,
            local_steps=self.local_steps,
            learning_rate=self.learning_rate,
        )


def unit_and_updates(observation: Observation) -> tuple[Unit, Params]:
    """The unit one inverted update stands for, and the observed updates as rows [T, ...]
    (each sample's under the per-sample threat model, else the client's one update)."""
    if observation.per_sample_updates is not None:
        unit = Unit("gradient", 1, 1, 1, observation.learning_rate)
        return unit, dict(observation.per_sample_updates)
    unit = Unit(
        observation.update_kind,
        observation.num_examples,
        observation.batch_size,
        observation.local_steps,
        observation.learning_rate,
        observation.contributors,
    )
    return unit, {name: u.unsqueeze(0) for name, u in observation.update.items()}


class Featuriser:
    """Update dict (leading dim N) -> inverter input [N, F].

    Each parameter block is first scaled to unit L2 norm (optional): an update's scale follows
    the sample's loss, its direction carries the image, and sign/pruned/noisy updates stay
    comparable. Then the blocks are concatenated, or feature-hashed to `hash_bins` bins.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        hash_bins: int | float | None,
        hash_seed: int,
        hash_signed: bool,
        block_normalise: bool,
    ) -> None:
        self.sizes = dict(sizes)
        self.in_features = sum(self.sizes.values())
        self.block_normalise = block_normalise
        self.hasher = None
        if hash_bins is not None:
            bins = resolve_num_bins(hash_bins, self.in_features)
            self.hasher = FeatureHasher(self.in_features, bins, hash_seed, hash_signed)

    @property
    def out_features(self) -> int:
        return self.in_features if self.hasher is None else self.hasher.num_bins

    def __call__(self, update: Mapping[str, Tensor]) -> Tensor:
        missing = [name for name in self.sizes if name not in update]
        if missing:
            raise ValueError(f"the update lacks parameters {missing[:3]}; expected all of them")
        rows = next(iter(update.values())).shape[0]
        blocks = {name: update[name].reshape(rows, -1).float() for name in self.sizes}
        norms = None
        if self.block_normalise:
            norms = {
                name: b.norm(dim=1, keepdim=True).clamp_min(1e-12) for name, b in blocks.items()
            }
        if self.hasher is not None:
            return self.hasher.hash_dict(blocks, norms)
        # Each block divided straight into its place: one pass, no divided copies to join.
        first = next(iter(blocks.values()))
        out = torch.empty(rows, self.in_features, dtype=first.dtype, device=first.device)
        offset = 0
        for name, block in blocks.items():
            place = out[:, offset : offset + block.shape[1]]
            if norms is None:
                place.copy_(block)
            else:
                torch.div(block, norms[name], out=place)
            offset += block.shape[1]
        return out


def release_is_random(pipeline: DefensePipeline) -> bool:
    """Whether the defense draws at random after the gradients: noise, or any step of a
    plug-in, whose use of its generator fedleak cannot see (redrawing a deterministic one
    every epoch costs time, keeping a random one's single draw would train on one sample)."""
    dp = pipeline.find(DPSGD)
    gauss = pipeline.find(GaussianNoise)
    plugin = any(
        step.stage != "encode" and type(step).__module__.partition(".")[0] != "fedleak"
        for step in pipeline.steps
    )
    noisy = (dp is not None and dp.noise_multiplier > 0) or (gauss is not None and gauss.sigma > 0)
    return noisy or plugin


def _index(params: Params, rows: slice) -> Params:
    return {name: t[rows] for name, t in params.items()}


class PairSource:
    """Featurised defended updates of groups of aux samples, re-drawn per call if random.

    `groups` [P, size] indexes `aux_x`/`aux_y` (already on the device). With `regroup` (FedSGD
    batches of size > 1, no input encoding, no BatchNorm), `regroup()` draws fresh groups
    every epoch, so the inverter sees many more distinct batches than aux samples (see
    `regroups` for whether it is active); where `max_cache_bytes` holds every aux sample's
    gradient, a group's update is then the mean of kept gradients, else it is computed again.

    With `unit.contributors` = M > 1 each group [size] is M members of `size / M` samples
    (consecutive in the group), computed and released one by one and averaged: the pre-release
    cache and the loops work on members, the pairs (and `groups`) stay whole groups.
    """

    def __init__(
        self,
        model: nn.Module,
        pipeline: DefensePipeline,
        unit: Unit,
        aux_x: Tensor,
        aux_y: Tensor,
        num_classes: int,
        groups: Tensor,
        featuriser: Featuriser,
        chunk: int,
        max_cache_bytes: int,
        regroup: bool = False,
    ) -> None:
        self.model = model
        self.pipeline = pipeline
        self.unit = unit
        self.member = unit.member()
        self.parts = unit.contributors
        self.aux_x, self.aux_y = aux_x, aux_y
        self.num_classes = num_classes
        self.groups = groups
        self.featuriser = featuriser
        self.chunk = max(1, chunk)
        self.has_bn = has_batchnorm(model)
        simple = unit.kind == "gradient" and pipeline.encoder is None
        # Randomness inside the client's computation (encodings, DP noise at every FedAvg step)
        # cannot be split from the release: such groups run through `compute_update` each time.
        self.exact_loop = not simple and (
            pipeline.encoder is not None or pipeline.find(DPSGD) is not None
        )
        self.mode = "vector" if simple else "loop"
        if unit.kind == "delta" and not self.exact_loop:
            self.mode = "replay"
            protocol = ClientProtocol(
                "delta", self.member.local_steps, self.member.batch_size, unit.learning_rate
            )
            self._replay = Replay(model, protocol, bn_mode="infer", device=aux_x.device)
        if simple and self.has_bn:
            if pipeline.needs_per_sample:
                refuse_batchnorm(model)
            self.mode = "vector-bn"
            self._bn_model = copy.deepcopy(model).train()
            replace_all_batch_norm_modules_(self._bn_model)
        self.fixed = not self.exact_loop and not release_is_random(pipeline)
        self._features: Tensor | None = None
        self._raw: Params | None = None
        self._per_sample: Params | None = None
        self.regroups = regroup and self.mode == "vector" and unit.size > 1
        # Every aux sample's gradient kept, when it fits: each epoch's groups are then means of
        # kept rows; otherwise they are computed again for each epoch's groups. Regrouping
        # stayed off without the room, so `max-cache-bytes` changed what was learned (audit FE2).
        per_sample_bytes = aux_x.shape[0] * featuriser.in_features * 4
        self._keep_per_sample = self.regroups and per_sample_bytes <= max_cache_bytes
        # Gaussian release noise drawn in hash space (`binned_noise`): exact in distribution,
        # and an epoch redraws a few numbers per bin instead of every coordinate.
        self._binned: BinnedNoise | None = None
        self._deadline = math.inf  # of the `features` call in progress
        self._clean: CleanBins | None = None
        std = gaussian_release_std(pipeline, self.member.size)
        hasher = featuriser.hasher
        if not self.fixed and not self.exact_loop and hasher is not None and std is not None:
            self._binned = BinnedNoise(
                hasher,
                featuriser.sizes,
                featuriser.block_normalise,
                std / math.sqrt(self.parts),  # the mean of `parts` members' independent noise
                aux_x.device,
            )
        size = groups.shape[0] * self.parts * featuriser.in_features * 4
        self._keep_raw = (
            not self.fixed
            and not self.exact_loop
            and not self.regroups
            and self._binned is None
            and size <= max_cache_bytes
        )
        self._keep_clean = (
            self._binned is not None
            and not self.regroups
            and groups.shape[0] * self._binned.bytes_per_row() <= max_cache_bytes
        )

    @property
    def num_pairs(self) -> int:
        return self.groups.shape[0]

    def regroup(self, generator: torch.Generator) -> None:
        """Draw fresh groups of the same aux samples (only when `regroups`)."""
        if not self.regroups:
            return
        count = self.aux_x.shape[0]
        self.groups = make_groups(count, self.unit.size, generator, self.aux_x.device)
        self._features = None
        self._clean = None

    def features(self, generator: torch.Generator, deadline: float = math.inf) -> Tensor | None:
        """[P, F] features; the same tensor every call when nothing random is involved. None
        when `deadline` (a `time.perf_counter()` value) or a requested stop comes first: an
        epoch's pairs cost as many client computations as it has pairs."""
        if self._features is not None:
            return self._features
        self._deadline = deadline
        try:
            parts = []
            for start in range(0, self.num_pairs, self.chunk):
                self._check_time(start)
                rows = slice(start, min(self.num_pairs, start + self.chunk))
                if self._binned is not None:
                    clean = self._clean_bins(rows, generator)
                    parts.append(self._binned.features(clean, generator))
                else:
                    parts.append(self.featuriser(self._released(rows, generator)))
        except _OutOfTime:
            return None  # the caches filled so far are whole; a later call goes on from them
        finally:
            self._deadline = math.inf
        features = torch.cat(parts)
        if self.fixed:
            self._features = features
        return features

    def _members(self) -> Tensor:
        """The groups cut into their contributors' shares: [P * M, size / M]."""
        return self.groups.reshape(-1, self.member.size)

    def _check_time(self, start: int) -> None:
        """Between chunks (`start` > 0) of one `features` call: stop at its deadline."""
        if start and (time.perf_counter() >= self._deadline or stop_requested()):
            raise _OutOfTime

    def _clean_bins(self, rows: slice, generator: torch.Generator) -> CleanBins:
        """The groups `rows` before the release noise, in hash space; all groups' kept from the
        first call when they fit in memory."""
        assert self._binned is not None
        if not self._keep_clean:
            return self._binned.clean(self._clean_mean(rows, generator))
        if self._clean is None:
            kept = self._binned.empty(self.num_pairs)
            for start in range(0, self.num_pairs, self.chunk):
                self._check_time(start)
                chunk = slice(start, min(self.num_pairs, start + self.chunk))
                self._binned.clean(self._clean_mean(chunk, generator), out=kept[chunk])
            self._clean = kept
        return self._clean[rows]

    def _clean_mean(self, rows: slice, generator: torch.Generator) -> Params:
        """The groups' updates before the release: the mean of their members'."""
        members = slice(rows.start * self.parts, rows.stop * self.parts)
        return self._group_mean(self._pre_release(members, generator))

    def _group_mean(self, members: Params) -> Params:
        """Each group's update from its members' consecutive rows: their mean."""
        if self.parts == 1:
            return members
        return {
            name: u.reshape(-1, self.parts, *u.shape[1:]).mean(dim=1) for name, u in members.items()
        }

    def _released(self, rows: slice, generator: torch.Generator) -> Params:
        """The released updates of the groups `rows`: each member's release, then their mean."""
        members = slice(rows.start * self.parts, rows.stop * self.parts)
        if self.exact_loop:
            released = self._loop(members, self.pipeline, generator)
        else:
            if self._keep_raw:
                if self._raw is None:
                    self._raw = self._all_raw(generator)
                raw = _index(self._raw, members)
            else:
                raw = self._pre_release(members, generator)
            released = self._release(raw, generator)
        return self._group_mean(released)

    def _all_raw(self, generator: torch.Generator) -> Params:
        count = self.num_pairs * self.parts
        parts = []
        for start in range(0, count, self.chunk):
            self._check_time(start)
            parts.append(self._pre_release(slice(start, min(count, start + self.chunk)), generator))
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def _pre_release(self, rows: slice, generator: torch.Generator) -> Params:
        """Each member's update before the release (clipped mean gradient, or FedAvg delta)."""
        group = self._members()[rows]
        if self._keep_per_sample:
            return {name: g[group].mean(dim=1) for name, g in self._kept_gradients().items()}
        count, size = group.shape
        x, y = self.aux_x[group.flatten()], self.aux_y[group.flatten()]
        if self.mode == "vector":
            per_sample = self.pipeline.clip(per_sample_gradients(self.model, x, y))
            if size == 1:  # each member is one sample: its gradient is the mean
                return per_sample
            return {
                name: g.reshape(count, size, *g.shape[1:]).mean(dim=1)
                for name, g in per_sample.items()
            }
        if self.mode == "vector-bn":
            return _group_gradients(
                self._bn_model, x.reshape(count, size, *x.shape[1:]), y.reshape(count, size)
            )
        if self.mode == "replay":
            shape = (count, size, *x.shape[1:])
            with torch.no_grad():  # labels: one per image, or a token sequence per text
                labels = y.reshape(count, size, *y.shape[1:])
                update = self._replay(x.reshape(shape), labels).update
            return dict(zip(self._replay.names, update, strict=True))
        return self._loop(rows, DefensePipeline(), generator)

    def _kept_gradients(self) -> Params:
        """Every aux sample's (clipped) gradient, computed once: [count, ...] per parameter."""
        if self._per_sample is None:
            count = self.aux_x.shape[0]
            parts = []
            for start in range(0, count, self.chunk):
                self._check_time(start)
                rows = slice(start, min(count, start + self.chunk))
                gradients = per_sample_gradients(self.model, self.aux_x[rows], self.aux_y[rows])
                parts.append(self.pipeline.clip(gradients))
            self._per_sample = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        return self._per_sample

    def _release(self, raw: Params, generator: torch.Generator) -> Params:
        """The defense's release applied to each member independently."""
        size = self.member.size
        if self.unit.kind == "gradient" and size > 1 and self.pipeline.find(DPSGD) is not None:
            # DP noise on a mean of `size` clipped gradients has std Z*C/size: share() per group.
            count = next(iter(raw.values())).shape[0]
            shared = [
                self.pipeline.share(_index(raw, slice(i, i + 1)), size, generator)
                for i in range(count)
            ]
            return {name: torch.cat([s[name] for s in shared]) for name in raw}
        # Without DP, FedAvg's share_delta and FedSGD's share are the same per-row release.
        return self.pipeline.share_each(raw, generator)

    def _loop(self, rows: slice, pipeline: DefensePipeline, generator: torch.Generator) -> Params:
        """`compute_update` of each member: the client's computation, one at a time."""
        training = self.member.training()
        members = torch.arange(self.aux_x.shape[0])
        updates = []
        for group in self._members()[rows]:
            update = compute_update(
                self.model,
                self.aux_x[group],
                self.aux_y[group],
                self.num_classes,
                pipeline,
                training,
                generator,
                # The attacker's own images stand in for a public pool and a client's data.
                public=self.aux_x,
                private=PartnerPool(self.aux_x, members, self.aux_y, group.cpu()),
            )
            updates.append(update.update)
        return {name: torch.stack([u[name] for u in updates]) for name in updates[0]}


def _group_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Params:
    """Gradient of each group's mean loss, x [G, b, ...], for a model without running stats."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}

    def group_loss(p: Params, xg: Tensor, yg: Tensor) -> Tensor:
        return task_loss(functional_call(model, (p, buffers), (xg,)), yg)

    grads: Callable[..., Params] = vmap(grad(group_loss), in_dims=(None, 0, 0))
    return {name: g.detach() for name, g in grads(params, x, y).items()}


def make_groups(count: int, size: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Groups [P, size] of indices into `count` samples: each sample once for size 1; for
    size > 1, `size` independent shuffles cut into groups, so every sample appears in `size`
    groups (about `count` pairs, as many as for B = 1)."""
    if size == 1:
        return torch.arange(count, device=device).unsqueeze(1)
    if count < size:
        raise ValueError(
            f"LTI needs at least {size} auxiliary samples to build groups of {size}, got {count}"
        )
    per = count // size
    shuffles = [torch.randperm(count, generator=generator)[: per * size] for _ in range(size)]
    return torch.cat(shuffles).reshape(-1, size).to(device)
