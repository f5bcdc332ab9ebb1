"""Runs the configured attacks on the server's device, each isolated from the others' failures.

The runner takes jobs and returns results; it does not know about rounds, strategies or
ground truth, so a pool of remote workers can replace `run` without touching the strategy.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedleak.attacks.types import (
    Attack,
    AttackerKnowledge,
    Budget,
    Observation,
    Reconstruction,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackJob:
    """One attack on one observation."""

    attack: str
    observation: Observation


@dataclass(frozen=True)
class AttackResult:
    """What came back from one job: a reconstruction, or a failure recorded as one."""

    attack: str
    observation: Observation
    reconstruction: Reconstruction


def _failed(error: BaseException, seconds: float) -> Reconstruction:
    detail = "".join(traceback.format_exception_only(type(error), error)).strip()
    return Reconstruction(
        inputs=torch.empty(0),
        labels=None,
        seconds=seconds,
        status="failed",
        message=detail.splitlines()[-1][:500] if detail else type(error).__name__,
    )


def _checked(reconstruction: Reconstruction, seconds: float, expected: int) -> Reconstruction:
    """Move to the CPU, time it, and turn NaN or a wrong shape into a recorded status."""
    inputs = reconstruction.inputs.detach().float().cpu()
    labels = None if reconstruction.labels is None else reconstruction.labels.detach().cpu()
    status, message = reconstruction.status, reconstruction.message
    if status == "ok" and not torch.isfinite(inputs).all():
        status, message = "nan", "reconstruction contains NaN or inf"
    elif status == "ok" and inputs.shape[0] != expected:
        status = "failed"
        message = f"reconstruction has {inputs.shape[0]} samples, expected {expected}"
    return dataclasses.replace(
        reconstruction,
        inputs=inputs,
        labels=labels,
        seconds=seconds,
        status=status,
        message=message,
    )


class AttackRunner:
    """Runs attack jobs one after another in this process, on `knowledge.device`."""

    def __init__(
        self, attacks: dict[str, Attack], knowledge: AttackerKnowledge, budget: Budget
    ) -> None:
        self.attacks = attacks
        self.knowledge = knowledge
        self.budget = budget

    def run(self, jobs: Sequence[AttackJob]) -> list[AttackResult]:
        """Run every job; an attack that raises or returns NaN is recorded, never propagated."""
        return [self._run_one(job) for job in jobs]

    def _run_one(self, job: AttackJob) -> AttackResult:
        observation = job.observation
        start = time.perf_counter()
        try:
            reconstruction = self.attacks[job.attack].reconstruct(
                observation, self.knowledge, self.budget
            )
        except Exception as error:  # an attack's failure must not end the round
            log.warning(
                "attack %s failed on client %s: %s", job.attack, observation.client_id, error
            )
            reconstruction = _failed(error, time.perf_counter() - start)
            return AttackResult(job.attack, observation, reconstruction)
        seconds = time.perf_counter() - start
        expected = observation.num_targets
        return AttackResult(job.attack, observation, _checked(reconstruction, seconds, expected))

    def close(self) -> None:
        """Wait for outstanding work; nothing is outstanding when running inline."""
