"""One training run of an inverter on pairs computed from the attacker's auxiliary data.

Fresh or warm-started, with the learning-rate schedule of `LTIConfig`, validation PSNR on
held-out aux pairs, early stopping with the best epoch's weights kept, and the time budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedleak.attacks.learned.config import LTIConfig
from fedleak.attacks.learned.inverter import Inverter, best_assignment, inversion_loss
from fedleak.attacks.learned.pairs import PairSource
from fedleak.interrupt import stop_requested


@dataclass(frozen=True)
class TrainingOutcome:
    """What one (re)training did."""

    epochs: int
    steps: int
    seconds: float
    val_psnr: float
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


def psnr_per_image(images: Tensor, targets: Tensor, data_range: float) -> Tensor:
    """PSNR of each image [N, ...] against its target, in dB."""
    mse = (images - targets).flatten(1).pow(2).mean(1).clamp_min(1e-12)
    return 10.0 * torch.log10(data_range**2 / mse)


class InverterTrainer:
    """One training run of an inverter on a pair source (fresh or warm-started)."""

    def __init__(
        self,
        inverter: Inverter,
        config: LTIConfig,
        data_range: tuple[float, float],
        warm: bool,
    ) -> None:
        self.inverter = inverter
        self.config = config
        self.bounds = (float(data_range[0]), float(data_range[1]))
        self.data_range = self.bounds[1] - self.bounds[0]
        self.warm = warm

    def run(
        self,
        pairs: PairSource,
        aux_x: Tensor,
        aux_y: Tensor,
        validation: tuple[Tensor, Tensor, Tensor, Tensor] | None,
        epochs: int,
        noise_gen: torch.Generator,
        cpu_gen: torch.Generator,
        deadline: float,
        began: float,
        show_progress: bool,
        description: str,
    ) -> TrainingOutcome:
        cfg, inverter = self.config, self.inverter
        optimiser = torch.optim.Adam(
            inverter.parameters(), lr=cfg.learning_rate_at(0, self.warm), fused=True
        )
        best_psnr, best_state, stale = -math.inf, None, 0
        val_psnr, steps, done, timed_out, early = math.nan, 0, 0, False, False
        features = None
        device = aux_x.device
        bar = tqdm(total=epochs, desc=description, disable=not show_progress, leave=False)
        for epoch in range(epochs):
            # A requested stop (Ctrl-C) ends training as the time budget would.
            if time.perf_counter() >= deadline or stop_requested():
                timed_out = True
                break
            if epoch > 0 and pairs.regroups:
                pairs.regroup(cpu_gen)
            if features is None or not pairs.fixed or pairs.regroups:
                features = pairs.features(noise_gen)
            if epoch == 0:
                # Refit even when warm: the features' scale follows the changing global model.
                inverter.fit_standardisation(features)
            for group in optimiser.param_groups:
                group["lr"] = cfg.learning_rate_at(epoch, self.warm)
            inverter.train()
            order = torch.randperm(pairs.num_pairs, generator=cpu_gen).to(device)
            for begin in range(0, pairs.num_pairs, cfg.batch_size):
                rows = order[begin : begin + cfg.batch_size]
                index = pairs.groups[rows]
                images, logits = inverter(features[rows])
                loss = inversion_loss(images, logits, aux_x[index], aux_y[index], cfg.label_weight)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                steps += 1
                if time.perf_counter() >= deadline or stop_requested():
                    timed_out = True
                    break
            done = epoch + 1
            if validation is not None:
                val_psnr = self.validate(*validation)
                if val_psnr > best_psnr:
                    best_psnr, stale = val_psnr, 0
                    best_state = {k: v.detach().clone() for k, v in inverter.state_dict().items()}
                else:
                    stale += 1
            bar.update(1)
            bar.set_postfix(val_psnr=f"{val_psnr:.2f}")
            if timed_out:
                break
            if cfg.patience is not None and stale >= cfg.patience:
                early = True
                break
        bar.close()
        if best_state is not None:
            inverter.load_state_dict(best_state)
            val_psnr = best_psnr
        inverter.eval()
        return TrainingOutcome(done, steps, time.perf_counter() - began, val_psnr, timed_out, early)

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
