"""Learning To Invert (LTI; Wu, Chen, Guo, Weinberger): a learned, defense-adaptive inversion.

The server knows w_t and owns auxiliary data, so it computes the updates its own samples
would produce, passes them through the clients' public defense (`pairs`), and trains an
MLP g_theta (`inverter`) that maps an update back to images and labels. The global model
changes every round, so the inverter is refreshed: `retrain` (from scratch each round),
`finetune` (warm start from the previous round for `finetune_epochs`; the default) or `frozen`
(train once). Every client of one round shares the inverter trained for that round.

One inverted update stands for one sample (B = 1, or each row of per-sample updates), a
FedSGD batch of B (B images out, loss matched by assignment) or a FedAvg client's N examples
after K local steps; how its training pairs are computed, BatchNorm models included, is in
`fedleak.attacks.learned.pairs`.

Budget: the training length comes from `LTIConfig` (epochs, early stopping), not from
`Budget.max_iterations`; `Budget.max_seconds` bounds training + inference of one call, and
training stops early when it runs out (said in the message, `stopped_by = "seconds"` in the
diagnostics); the inverter trained so far still inverts, and its reconstruction is scored.
`Reconstruction.iterations` counts the optimiser steps taken in the call.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor, nn

from fedleak.attacks.learned.config import LTI_PRESETS, LTIConfig, check_aux_size, lti_config
from fedleak.attacks.learned.inverter import Inverter
from fedleak.attacks.learned.keeper import InverterKeeper, LearnedSetup, Refreshed, learned_setup
from fedleak.attacks.learned.pairs import Featuriser, PairSource, make_groups
from fedleak.attacks.learned.store import InverterStore
from fedleak.attacks.learned.trainer import InverterTrainer, TrainingOutcome
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation, Reconstruction
from fedleak.seeds import mix_seed
from fedleak.settings import ConfigError

__all__ = ["LTI_PRESETS", "LTIConfig", "LTIObservationError", "LearningToInvert", "lti_config"]


class LTIObservationError(ConfigError):
    """An observation or attacker knowledge LTI cannot work with."""


class LearningToInvert:
    """The `lti` attack; keeps its inverter across rounds (see the module docstring)."""

    reference = False

    stateful = True  # the inverter carries over: route every call to the same instance

    def __init__(self, config: LTIConfig | None = None, seed: int = 0, name: str = "lti") -> None:
        self.config = config or LTIConfig()
        self.seed = seed
        self.name = name
        self.keeper = InverterKeeper(
            InverterStore(self.config.cache_dir, name),
            self.config.refresh,
            "val_psnr",
            holds_out=self.config.aux_val_fraction > 0,
        )

    def saved_state(self, round_: int) -> Path | None:
        """The file a resumed run goes on from after this attack trained in `round_`."""
        return self.keeper.saved_file(round_)

    def check_feasible(self, targets: int, aux: int) -> None:
        """Refuse, before a run, auxiliary data too small to train on updates of `targets`."""
        check_aux_size(self.name, targets, aux, self.config.aux_val_fraction, "images")

    def reconstruct(
        self, observation: Observation, knowledge: AttackerKnowledge, budget: Budget
    ) -> Reconstruction:
        """Refresh the inverter for this round if needed, then invert the observed update."""
        start = time.perf_counter()
        deadline = start + budget.max_seconds
        cfg = self.config
        if observation.modality != "image":
            raise LTIObservationError(
                f"observation modality={observation.modality!r}: this LTI inverts images"
            )
        if knowledge.aux_inputs.shape[0] == 0:
            raise LTIObservationError("lti needs auxiliary data; set data.aux-size > 0")
        setup = learned_setup(observation, knowledge, cfg, self.seed)
        refreshed = self.keeper.current(
            setup.key(cfg, tuple(knowledge.data_range)),
            setup.fingerprint,
            observation.round,
            setup.device,
            lambda: self._fresh_inverter(observation, knowledge, setup),
            lambda inverter, warm, first_epoch: self._train(
                inverter, setup, observation, knowledge, budget, deadline, warm, first_epoch
            ),
        )
        with torch.no_grad():
            images, logits = refreshed.inverter(setup.features())
        count = images.shape[0] * images.shape[1]
        low, high = knowledge.data_range
        inputs = images.reshape(count, *images.shape[2:]).float().clamp(low, high).cpu()
        labels = logits.argmax(dim=-1).reshape(count).cpu()
        return self._result(inputs, labels, refreshed, setup.featuriser, start)

    def _result(
        self,
        inputs: Tensor,
        labels: Tensor,
        refreshed: Refreshed,
        featuriser: Featuriser,
        start: float,
    ) -> Reconstruction:
        outcome, how, diagnostics = self.keeper.account(
            refreshed, lambda psnr: f"PSNR {psnr:.2f} dB"
        )
        return Reconstruction(
            inputs=inputs,
            labels=labels,
            label_method="lti",
            iterations=outcome.steps,
            seconds=time.perf_counter() - start,
            message=f"{how}; {featuriser.out_features} input features",
            diagnostics={**diagnostics, "input_features": float(featuriser.out_features)},
        )

    def _fresh_inverter(
        self, observation: Observation, knowledge: AttackerKnowledge, setup: LearnedSetup
    ) -> Inverter:
        cfg = self.config
        unit = setup.unit
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, knowledge.seed, 0x494E56))
            inverter = Inverter(
                setup.featuriser.out_features,
                cfg.hidden,
                tuple(observation.model.input_shape),
                unit.size,
                observation.model.num_classes,
                cfg.activation,
                tuple(knowledge.data_range),
                cfg.head,
            )
        # Start from the aux-mean guess.
        logit = inverter.initial_pixels(knowledge.aux_inputs.float().mean(0).cpu())
        with torch.no_grad():
            last = inverter.body[-1]
            assert isinstance(last, nn.Linear)
            pixels = inverter.image_size
            for target in range(unit.size):
                last.bias[target * pixels : (target + 1) * pixels] = logit
        return inverter

    def _split_aux(
        self, knowledge: AttackerKnowledge, device: torch.device
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """(train x, y) and (validation x, y) on the device; the split is fixed for the run."""
        x = knowledge.aux_inputs.to(device).float()
        y = knowledge.aux_labels.to(device).long()
        count = x.shape[0]
        n_val = round(self.config.aux_val_fraction * count)
        if n_val == 0:
            return (x, y), None
        order = torch.randperm(
            count, generator=torch.Generator().manual_seed(mix_seed(self.seed, knowledge.seed))
        ).to(device)
        val, train = order[:n_val], order[n_val:]
        return (x[train], y[train]), (x[val], y[val])

    def _train(
        self,
        inverter: Inverter,
        setup: LearnedSetup,
        observation: Observation,
        knowledge: AttackerKnowledge,
        budget: Budget,
        deadline: float,
        warm: bool,
        first_epoch: int,
    ) -> TrainingOutcome:
        cfg = self.config
        device, unit = setup.device, setup.unit
        seed = mix_seed(self.seed, knowledge.seed, observation.round)
        cpu_gen = torch.Generator().manual_seed(seed)
        noise_gen = torch.Generator(device=device).manual_seed(seed)
        (train_x, train_y), val = self._split_aux(knowledge, device)
        if train_x.shape[0] < unit.size:
            raise LTIObservationError(
                f"lti needs at least {unit.size} auxiliary training samples for groups of "
                f"{unit.size}, got {train_x.shape[0]}; raise data.aux-size or lower "
                "aux_val_fraction"
            )

        def source(x: Tensor, y: Tensor, regroup: bool) -> PairSource:
            groups = make_groups(x.shape[0], unit.size, cpu_gen, device)
            return PairSource(
                setup.model,
                setup.pipeline,
                unit,
                x,
                y,
                observation.model.num_classes,
                groups,
                setup.featuriser,
                cfg.pair_chunk,
                cfg.max_cache_bytes,
                regroup,
            )

        began = time.perf_counter()
        pairs = source(train_x, train_y, cfg.regroup)
        validation = None
        if val is not None and val[0].shape[0] >= unit.size:
            val_pairs = source(*val, False)
            features = val_pairs.features(noise_gen, deadline)
            # Out of time already: the trainer stops before its first epoch.
            validation = None if features is None else (features, val_pairs.groups, *val)
        epochs = cfg.finetune_epochs if warm else cfg.epochs
        trainer = InverterTrainer(
            inverter,
            cfg,
            knowledge.data_range,
            warm,
            pairs,
            (train_x, train_y),
            validation,
            noise_gen,
            cpu_gen,
        )
        return trainer.run(
            epochs,
            deadline,
            began,
            budget.show_progress,
            f"{self.name} round {observation.round}",
            first_epoch,
        )
