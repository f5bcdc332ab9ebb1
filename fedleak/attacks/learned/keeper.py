"""A learned attack's inverter from round to round, shared by the image and text attacks.

An inverter is current for one setting (`key`: model, defense, unit, featuriser, the
inverter's architecture) and the global weights it was trained at (`fingerprint`). When the
weights move, `refresh` decides: `retrain` from scratch, `finetune` the previous inverter, or
keep it `frozen`. Every training is saved to the attack's store, and a resumed run adopts, on
its first call, the inverter saved for the same setting in the last round before it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from fedleak.attacks.learned.config import Refresh
from fedleak.attacks.learned.pairs import (
    Featuriser,
    Params,
    Unit,
    release_is_random,
    unit_and_updates,
)
from fedleak.attacks.learned.store import InverterStore, InverterStoreError, weights_fingerprint
from fedleak.attacks.learned.trainer import TrainingOutcome
from fedleak.attacks.types import AttackerKnowledge, Observation
from fedleak.defenses import DefensePipeline, parse_defense_spec
from fedleak.lines import one_line
from fedleak.models import ModelSpec, build_model
from fedleak.seeds import mix_seed


class HashingSettings(Protocol):
    """The featuriser's settings, common to every learned attack's configuration."""

    @property
    def hash_bins(self) -> int | float | None: ...
    @property
    def hash_signed(self) -> bool: ...
    @property
    def block_normalise(self) -> bool: ...


# Settings of a learned attack that decide how fast its inverter trains or where it is kept,
# not what it learns: a change keeps the saved inverter. Under a random release the chunk of
# pairs computed at once also decides how the noise is drawn, so it is learned there (audit
# FE2: rows under Gaussian noise differed by up to 0.18 dB between two chunk sizes).
NOT_LEARNED = frozenset({"pair_chunk", "max_cache_bytes", "cache_dir"})
NOT_LEARNED_UNDER_NOISE = NOT_LEARNED - {"pair_chunk"}


@dataclass(frozen=True)
class LearnedSetup:
    """What one call of a learned attack works on: the global model at the observed weights,
    the clients' public defense, the unit one update stands for, the observed updates as rows
    and the featuriser that turns updates into the inverter's input. `trained_on` identifies
    what the inverter learns from (the auxiliary data and the attack's seed), so that an
    inverter saved by another run is never taken for this one's."""

    spec: ModelSpec
    trained_on: str
    fingerprint: str
    device: torch.device
    model: nn.Module
    pipeline: DefensePipeline
    unit: Unit
    updates: Params
    featuriser: Featuriser

    def key(self, settings: object, *extra: object) -> str:
        """What an inverter is specific to (a change means training from scratch): this
        setting, every one of the attack's `settings` that shapes what it learns (an
        inverter trained for 2 epochs is no answer to a call asking for 15), and `extra`."""
        speed = NOT_LEARNED_UNDER_NOISE if release_is_random(self.pipeline) else NOT_LEARNED
        learned = tuple(
            (field.name, getattr(settings, field.name))
            for field in dataclasses.fields(settings)  # type: ignore[arg-type]
            if field.name not in speed
        )
        return repr(
            (
                self.spec.name,
                tuple(self.spec.input_shape),
                self.spec.num_classes,
                self.pipeline.spec,
                dataclasses.astuple(self.unit),
                self.featuriser.out_features,
                self.trained_on,
                learned,
                *extra,
            )
        )

    def features(self) -> Tensor:
        """The observed updates as the inverter's input [T, F], on the device."""
        return self.featuriser({name: u.to(self.device) for name, u in self.updates.items()})


def learned_setup(
    observation: Observation, knowledge: AttackerKnowledge, hashing: HashingSettings, seed: int
) -> LearnedSetup:
    """The setup of one call; the hashing seed comes from the attack's seed alone, so that
    every round's updates land in the same bins."""
    device = torch.device(knowledge.device)
    model = build_model(observation.model)
    model.load_state_dict(observation.weights)
    unit, updates = unit_and_updates(observation)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    featuriser = Featuriser(
        sizes,
        hashing.hash_bins,
        mix_seed(seed, 0x4853),
        hashing.hash_signed,
        hashing.block_normalise,
    )
    aux = {"inputs": knowledge.aux_inputs, "labels": knowledge.aux_labels}
    return LearnedSetup(
        observation.model,
        # The attacker's seed too: it draws the inverter's start and its training batches, and
        # an attack object reused with another seed reused the first seed's inverter (DV4).
        f"seed {seed}, attacker seed {knowledge.seed}, aux {weights_fingerprint(aux)}",
        weights_fingerprint(observation.weights),
        device,
        model.to(device),
        parse_defense_spec(observation.defense),
        unit,
        updates,
        featuriser,
    )


@dataclass(frozen=True)
class Refreshed:
    """The inverter to invert with in this call, and the training it took (None: reused);
    `continued`: the epoch a training cut short in an earlier call went on from (None: a
    training of its own); `passed_over`: the file of a saved inverter not adopted, since it
    was trained for other settings."""

    inverter: nn.Module
    outcome: TrainingOutcome | None
    warm: bool
    continued: int | None = None
    passed_over: Path | None = None  # a saved inverter trained for other settings


@dataclass(frozen=True)
class _CutShort:
    """A training the time budget ended: the weights it was for, whether it was a warm start,
    and the whole epochs it completed."""

    fingerprint: str
    warm: bool
    epochs: int


class InverterKeeper:
    """One attack's inverter across rounds: trained, refreshed or reused on each call, saved
    after every training, adopted from the store on a resumed run's first call."""

    def __init__(
        self, store: InverterStore, refresh: Refresh, score_name: str, holds_out: bool = True
    ) -> None:
        """`holds_out`: whether the attack holds part of its auxiliary data out to validate on
        (`aux-val-fraction` above 0), which words a training validated on nothing."""
        self.inverter: nn.Module | None = None
        self.score = math.nan  # the current inverter's validation score
        self._store = store
        self._refresh = refresh
        self._score_name = score_name
        self._holds_out = holds_out
        self._key: str | None = None
        self._fingerprint: str | None = None
        self._cut_short: _CutShort | None = None
        self._store_checked = False
        self._passed_over: Path | None = None

    def current(
        self,
        key: str,
        fingerprint: str,
        round_: int,
        device: torch.device,
        fresh: Callable[[], nn.Module],
        train: Callable[[nn.Module, bool, int], TrainingOutcome],
    ) -> Refreshed:
        """The inverter for this setting and these weights: `fresh()` builds an untrained
        one, `train(inverter, warm, first_epoch)` trains it in place from `first_epoch`.

        A training the time budget cut short goes on, in the next call at the same weights
        (the round's next client), from the first epoch it did not finish, whatever the
        refresh: `retrain` would otherwise start it again and cut it again in every call, and
        `frozen` keep the cut inverter for the whole run."""
        self._adopt_saved(key, round_, device, fresh)
        warm = self.inverter is not None and self._key == key
        stale = not (warm and self._fingerprint == fingerprint)
        cut = self._cut_short if warm else None
        outcome, first, continued = None, 0, None
        if cut is not None and cut.fingerprint == fingerprint:
            warm, first = cut.warm, cut.epochs
            continued = first
        elif stale and not (warm and self._refresh == "frozen"):
            if self._refresh == "retrain" or not warm:
                self.inverter, warm = fresh(), False
        else:
            first = -1  # current, or frozen: no training
        if first >= 0:
            assert self.inverter is not None
            self._store.prepare()
            try:
                outcome = train(self.inverter.to(device), warm, first)
            except BaseException:
                # A training stopped by Ctrl-C or an error left the inverter half-trained (or
                # fresh) under the old key: the next call must not reuse it as trained (DV1).
                self.inverter, self._key, self._fingerprint = None, None, None
                self._cut_short = None
                raise
            self._key, self.score = key, outcome.score
            done = first + outcome.epochs
            self._cut_short = _CutShort(fingerprint, warm, done) if outcome.timed_out else None
            self._fingerprint = None if outcome.timed_out else fingerprint
            self._store.save(
                self.inverter, key, self._fingerprint, round_, {self._score_name: outcome.score}
            )
        assert self.inverter is not None
        passed_over, self._passed_over = self._passed_over, None  # said once
        return Refreshed(self.inverter.to(device).eval(), outcome, warm, continued, passed_over)

    def saved_file(self, round_: int) -> Path | None:
        """Where the inverter trained in `round_` is saved (None without a folder)."""
        return self._store.file(round_)

    def account(
        self, refreshed: Refreshed, validation: Callable[[float], str], trained_on: str = ""
    ) -> tuple[TrainingOutcome, str, dict[str, float | str]]:
        """This call's training (a reuse is none) in words, for the result's message, and as
        the diagnostics every learned attack records, which the report's training table reads
        (`stopped_by` tells a training cut short in its first epoch from a reuse).
        `validation` words the validation score."""
        outcome, warm = refreshed.outcome, refreshed.warm
        if outcome is None:
            how = (
                f"reused the inverter (refresh={self._refresh}, trained at these weights or frozen)"
            )
            outcome = TrainingOutcome.reused(self.score)
        else:
            start = "warm start" if warm else "trained from scratch"
            if refreshed.continued is not None:
                start = (
                    f"{start} cut short by the time budget in an earlier call, continued from "
                    f"epoch {refreshed.continued + 1}"
                )
            on = f" on {trained_on}" if trained_on else ""
            if math.isfinite(outcome.score):
                scored = validation(outcome.score)
            elif outcome.epochs == 0:  # the time budget ended before the first epoch did
                scored = "none (no epoch finished)"
            elif not self._holds_out:  # by choice, not for want of samples (audit FE4)
                scored = "none (aux-val-fraction=0: nothing held out; the last epoch kept)"
            else:  # the held-out share of the aux data held less than one update's samples
                scored = "none (too few auxiliary samples held out; the last epoch kept)"
            how = (
                f"refresh={self._refresh}: {start}{on}, {outcome.epochs} epochs, validation "
                f"{scored}"
            )
            if outcome.early_stopped:
                how += " (early stop)"
            if outcome.timed_out:
                how += "; training stopped early: the time budget ran out"
        if refreshed.passed_over is not None:
            how += (
                f"; {refreshed.passed_over.name} was trained for other settings (or saved by "
                "another fedleak version), not adopted"
            )
        diagnostics: dict[str, float | str] = {
            "train_seconds": outcome.seconds,
            "train_epochs": float(outcome.epochs),
            "train_pairs": float(outcome.pairs),
            self._score_name: outcome.score,
            "warm_start": float(warm and outcome.steps > 0),
            "stopped_by": outcome.stopped_by,
        }
        return outcome, how, diagnostics

    def _adopt_saved(
        self, key: str, round_: int, device: torch.device, fresh: Callable[[], nn.Module]
    ) -> None:
        """On the first call only: the inverter saved for this setting in an earlier round,
        if any (what an uninterrupted run would hold at this point)."""
        if self._store_checked or self.inverter is not None:
            return
        # Checked once it reads: a file that cannot fails every call, rather than the first
        # only and a silent training from scratch after it.
        saved = self._store.load(key, device, before=round_)
        if saved is None:
            self._store_checked = True
            # Said in the result: a resumed run would otherwise train anew without a word.
            self._passed_over = self._store.latest(before=round_)
            return
        inverter = fresh()
        try:
            inverter.load_state_dict(saved.state_dict)
        except RuntimeError as error:  # another architecture's weights under this key
            detail = one_line(error, 200)
            raise InverterStoreError(
                f"{saved.path}: does not fit this attack's inverter ({detail}); restore it, "
                "or start the run again in a new out-dir"
            ) from None
        self._store_checked = True
        self.inverter = inverter.to(device)
        self._key, self._fingerprint = key, saved.fingerprint
        self.score = saved.score(self._score_name)
