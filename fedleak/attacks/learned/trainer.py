"""How an inverter trains on pairs computed from the attacker's auxiliary data.

`EpochTrainer` is the loop every learned attack shares: epochs of shuffled minibatches, a time
budget (and Ctrl-C) that ends training as if it had finished, the weights of the best
validation epoch kept, early stopping. `InverterTrainer` is LTI's image case: the image and
label loss, the learning-rate schedule of `LTIConfig`, validation PSNR on held-out aux pairs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedleak.attacks.learned.config import LTIConfig
from fedleak.attacks.learned.inverter import Inverter, best_assignment, inversion_loss
from fedleak.attacks.learned.pairs import PairSource
from fedleak.attacks.progress import progress_bar
from fedleak.interrupt import stop_requested


def inverter_adam(inverter: nn.Module, learning_rate: float) -> torch.optim.Adam:
    """Adam for an inverter, fused: one pass over each parameter per step where the default
    makes several. Inverters are large (the text inverter's output layer alone holds 1,000 x
    L x V weights), so the default's step costs a third of a training step on a CPU."""
    return torch.optim.Adam(inverter.parameters(), lr=learning_rate, fused=True)


@dataclass(frozen=True)
class TrainingOutcome:
    """What one (re)training did; `score` is the kept weights' validation score (PSNR for
    images, token accuracy for text; NaN without validation)."""

    epochs: int
    steps: int
    pairs: int
    seconds: float
    score: float
    timed_out: bool
    early_stopped: bool

    @property
    def stopped_by(self) -> str:
        """What ended the training: the time budget, early stopping, or its epochs (or
        nothing to train: the inverter was reused)."""
        if self.timed_out:
            return "seconds"
        if self.early_stopped:
            return "early-stop"
        return "epochs" if self.epochs else "reused"

    @classmethod
    def reused(cls, score: float) -> TrainingOutcome:
        """No training in this call: the inverter was current (or frozen)."""
        return cls(0, 0, 0, 0.0, score, False, False)


class EpochTrainer:
    """The training loop; subclasses say what an epoch's pairs are, the loss of a minibatch
    and the validation score (higher is better)."""

    def __init__(
        self,
        inverter: nn.Module,
        optimiser: torch.optim.Optimizer,
        batch_size: int,
        patience: int | None,
        cpu_gen: torch.Generator,
        score_name: str,
    ) -> None:
        self.inverter = inverter
        self.optimiser = optimiser
        self.batch_size = batch_size
        self.patience = patience
        self.cpu_gen = cpu_gen
        self.score_name = score_name

    def epoch_pairs(self, epoch: int, deadline: float) -> tuple[Tensor, Tensor] | None:
        """This epoch's features [P, F] and, per pair, the index its loss needs [P, ...]; None
        when `deadline` came before they were built."""
        raise NotImplementedError

    def loss(self, features: Tensor, index: Tensor) -> Tensor:
        """The training loss of a minibatch of pairs."""
        raise NotImplementedError

    def score(self) -> float | None:
        """The validation score of the current weights (None: nothing held out)."""
        return None

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch (learning-rate schedules)."""

    def run(
        self,
        epochs: int,
        deadline: float,
        began: float,
        show_progress: bool,
        description: str,
        first_epoch: int = 0,
    ) -> TrainingOutcome:
        """Train epochs `first_epoch` to `epochs - 1` (a training the time budget cut short
        goes on from the first epoch it did not finish, with the schedule's learning rate of
        that epoch; the optimiser's moments start afresh). The outcome counts this call's
        whole epochs."""
        inverter = self.inverter
        best_score, best_state, stale = -math.inf, None, 0
        score, steps, done, pairs_seen = math.nan, 0, first_epoch, 0
        timed_out = early = False
        bar = progress_bar(epochs - first_epoch, description, show_progress)
        for epoch in range(first_epoch, epochs):
            # A requested stop (Ctrl-C) ends training as the time budget would.
            if time.perf_counter() >= deadline or stop_requested():
                timed_out = True
                break
            built = self.epoch_pairs(epoch, deadline)
            if built is None:  # the budget ran out while the pairs were computed
                timed_out = True
                break
            features, index = built
            if epoch == 0:
                # Refit even when warm: the features' scale follows the changing global model.
                inverter.fit_standardisation(features)
            self.start_epoch(epoch)
            inverter.train()
            order = torch.randperm(features.shape[0], generator=self.cpu_gen)
            order = order.to(features.device)
            for begin in range(0, features.shape[0], self.batch_size):
                rows = order[begin : begin + self.batch_size]
                loss = self.loss(features[rows], index[rows])
                self.optimiser.zero_grad(set_to_none=True)
                loss.backward()
                self.optimiser.step()
                steps += 1
                pairs_seen += len(rows)
                if time.perf_counter() >= deadline or stop_requested():
                    timed_out = True
                    break
            else:
                done = epoch + 1  # only whole epochs count
            inverter.eval()
            with torch.no_grad():
                measured = self.score()
            if measured is not None:
                score = measured
                if score > best_score:
                    best_score, stale = score, 0
                    best_state = {k: v.detach().clone() for k, v in inverter.state_dict().items()}
                else:
                    stale += 1
            # The postfix first, without a redraw of its own: the update redraws (at most as
            # often as the bar allows, which off a terminal is rarely).
            bar.set_postfix({self.score_name: f"{score:.3f}"}, refresh=False)
            bar.update(1)
            if timed_out:
                break
            if self.patience is not None and stale >= self.patience:
                early = True
                break
        bar.close()
        if best_state is not None:
            inverter.load_state_dict(best_state)
            score = best_score
        inverter.eval()
        seconds = time.perf_counter() - began
        return TrainingOutcome(
            done - first_epoch, steps, pairs_seen, seconds, score, timed_out, early
        )


def psnr_per_image(images: Tensor, targets: Tensor, data_range: float) -> Tensor:
    """PSNR of each image [N, ...] against its target, in dB."""
    mse = (images - targets).flatten(1).pow(2).mean(1).clamp_min(1e-12)
    return 10.0 * torch.log10(data_range**2 / mse)


class InverterTrainer(EpochTrainer):
    """LTI's image inverter on a pair source (fresh or warm-started)."""

    def __init__(
        self,
        inverter: Inverter,
        config: LTIConfig,
        data_range: tuple[float, float],
        warm: bool,
        pairs: PairSource,
        aux: tuple[Tensor, Tensor],
        validation: tuple[Tensor, Tensor, Tensor, Tensor] | None,
        noise_gen: torch.Generator,
        cpu_gen: torch.Generator,
    ) -> None:
        optimiser = inverter_adam(inverter, config.learning_rate_at(0, warm))
        super().__init__(
            inverter, optimiser, config.batch_size, config.patience, cpu_gen, "val_psnr"
        )
        self.config = config
        self.bounds = (float(data_range[0]), float(data_range[1]))
        self.data_range = self.bounds[1] - self.bounds[0]
        self.warm = warm
        self.pairs = pairs
        self.aux_x, self.aux_y = aux
        self.validation = validation
        self.noise_gen = noise_gen
        self.features: Tensor | None = None

    def epoch_pairs(self, epoch: int, deadline: float) -> tuple[Tensor, Tensor] | None:
        pairs = self.pairs
        if epoch > 0 and pairs.regroups:
            pairs.regroup(self.cpu_gen)
        if self.features is None or not pairs.fixed or pairs.regroups:
            self.features = pairs.features(self.noise_gen, deadline)
        if self.features is None:
            return None
        return self.features, pairs.groups

    def start_epoch(self, epoch: int) -> None:
        for group in self.optimiser.param_groups:
            group["lr"] = self.config.learning_rate_at(epoch, self.warm)

    def loss(self, features: Tensor, index: Tensor) -> Tensor:
        images, logits = self.inverter(features)
        return inversion_loss(
            images, logits, self.aux_x[index], self.aux_y[index], self.config.label_weight
        )

    def score(self) -> float | None:
        if self.validation is None:
            return None
        return self.validate(*self.validation)

    @torch.no_grad()
    def validate(self, features: Tensor, groups: Tensor, x: Tensor, y: Tensor) -> float:
        """Mean PSNR on held-out aux pairs (outputs matched to targets for B > 1)."""
        self.inverter.eval()
        images, _ = self.inverter(features)
        images = images.clamp(*self.bounds)  # scored as the attack returns them
        targets = x[groups]
        n, b = images.shape[:2]
        if b > 1:
            cost = (images.reshape(n, b, 1, -1) - targets.reshape(n, 1, b, -1)).pow(2).mean(-1)
            perm = best_assignment(cost)
            index = perm.reshape(n, b, *([1] * (targets.dim() - 2))).expand_as(targets)
            targets = torch.gather(targets, 1, index)
        return float(
            psnr_per_image(images.flatten(0, 1), targets.flatten(0, 1), self.data_range).mean()
        )
