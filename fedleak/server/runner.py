"""Runs the configured attacks on the server's device, each isolated from the others' failures.

A runner takes jobs (`submit`) and hands back whatever has finished (`ready`); it knows
nothing of strategies or ground truth. The inline runner finishes every job inside `submit`;
a pool of remote workers (`fedleak.server.pool`) returns results rounds later through the
same two calls, so the strategy never waits for attacks unless it asks to.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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
    """One attack on one observation; `job_id` is unique within a run."""

    job_id: int
    attack: str
    observation: Observation


@dataclass(frozen=True)
class AttackResult:
    """What came back from one job: a reconstruction, or a failure recorded as one."""

    job: AttackJob
    reconstruction: Reconstruction


class AttackRunner(Protocol):
    """Where attack jobs run: inline here, or on a pool of workers."""

    def submit(self, jobs: Sequence[AttackJob]) -> None:
        """Start the jobs; never raises for a failing attack."""

    def ready(self, wait: bool = False) -> list[AttackResult]:
        """Results finished since the last call; with `wait`, all outstanding ones."""

    def close(self) -> None:
        """Release workers; outstanding jobs are abandoned (call `ready(wait=True)` first)."""


def failed_reconstruction(error: BaseException | str, seconds: float) -> Reconstruction:
    """A failure recorded as a reconstruction, so it lands in the leakage rows."""
    if isinstance(error, BaseException):
        first = str(error).strip().splitlines()
        error = f"{type(error).__name__}: {first[0]}" if first else type(error).__name__
    return Reconstruction(
        inputs=torch.empty(0), labels=None, seconds=seconds, status="failed", message=error[:500]
    )


def checked(reconstruction: Reconstruction, seconds: float, expected: int) -> Reconstruction:
    """Move to the CPU, time it, and turn NaN or a wrong shape into a recorded status.
    Images become float32; token ids stay integers."""
    inputs = reconstruction.inputs.detach().cpu()
    if inputs.is_floating_point():
        inputs = inputs.float()
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


def run_job(
    job: AttackJob, attack: Attack, knowledge: AttackerKnowledge, budget: Budget
) -> AttackResult:
    """Run one job where this process is; an exception or NaN becomes a recorded status."""
    observation = job.observation
    start = time.perf_counter()
    try:
        reconstruction = attack.reconstruct(observation, knowledge, budget)
    except Exception as error:  # an attack's failure must not end the round
        log.warning("attack %s failed on client %s: %s", job.attack, observation.client_id, error)
        return AttackResult(job, failed_reconstruction(error, time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return AttackResult(job, checked(reconstruction, seconds, observation.num_targets))


class InlineRunner:
    """Runs each job to completion inside `submit`, in this process, on `knowledge.device`."""

    def __init__(
        self, attacks: dict[str, Attack], knowledge: AttackerKnowledge, budget: Budget
    ) -> None:
        self.attacks = attacks
        self.knowledge = knowledge
        self.budget = budget
        self._done: list[AttackResult] = []

    def submit(self, jobs: Sequence[AttackJob]) -> None:
        """Run every job now."""
        self._done += [
            run_job(job, self.attacks[job.attack], self.knowledge, self.budget) for job in jobs
        ]

    def ready(self, wait: bool = False) -> list[AttackResult]:
        """Everything submitted so far: nothing is ever outstanding."""
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Nothing to release."""
