"""Runs the configured attacks on the server's device, each isolated from the others' failures.

A runner takes jobs (`submit`) and hands back whatever has finished (`ready`); it knows
nothing of strategies or ground truth. The inline runner finishes every job inside `submit`;
a pool of remote workers (`fedleak.server.pool`) returns results rounds later through the
same two calls, so the strategy never waits for attacks unless it asks to.

Jobs travel in batches: all jobs of one attack submitted together (a round's attacked
clients). An attack that can invert several observations at once (`BatchAttack`, e.g. the
optimisation attacks) gets the whole batch in one call and optimises it as one batched
problem; any other attack runs the batch's jobs one after another.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from fedleak.attacks.threads import default_threads, torch_threads
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


@runtime_checkable
class BatchAttack(Protocol):
    """An attack that inverts several observations at once, each result as if run alone."""

    name: str

    def reconstruct_batch(
        self,
        observations: Sequence[Observation],
        knowledge: AttackerKnowledge,
        budget: Budget,
    ) -> list[Reconstruction | Exception]: ...


def batches(jobs: Sequence[AttackJob]) -> list[list[AttackJob]]:
    """The jobs of each attack, in order of first appearance and submission within each."""
    grouped: dict[str, list[AttackJob]] = {}
    for job in jobs:
        grouped.setdefault(job.attack, []).append(job)
    return list(grouped.values())


class AttackRunner(Protocol):
    """Where attack jobs run: inline here, or on a pool of workers."""

    def submit(self, jobs: Sequence[AttackJob]) -> None:
        """Start the jobs; never raises for a failing attack."""

    def ready(self, wait: bool = False) -> list[AttackResult]:
        """Results finished since the last call; with `wait`, all outstanding ones."""

    def close(self) -> None:
        """Release workers; outstanding jobs are abandoned (call `ready(wait=True)` first)."""


# Float32 round-off of an attack that keeps to [0, 1] is not worth a note in its row.
RANGE_SLACK = 1e-5


def failed_reconstruction(error: BaseException | str, seconds: float) -> Reconstruction:
    """A failure recorded as a reconstruction, so it lands in the leakage rows."""
    if isinstance(error, BaseException):
        first = str(error).strip().splitlines()
        error = f"{type(error).__name__}: {first[0]}" if first else type(error).__name__
    return Reconstruction(
        inputs=torch.empty(0), labels=None, seconds=seconds, status="failed", message=error[:500]
    )


def checked(
    reconstruction: object,
    seconds: float,
    expected: int,
    shape: tuple[int, ...] | None = None,
) -> Reconstruction:
    """Move to the CPU, time it, and give it its status by the one rule of every attack: a
    finite reconstruction of `expected` samples (of `shape` when given) is "ok" and scored,
    whatever budget the attack ran out of; NaN or inf is "nan"; a wrong shape, or anything
    but a `Reconstruction`, is "failed". Images become float32 in the data's range [0, 1]
    (clamped, and the message says so when an attack went beyond it: PSNR and LPIPS are only
    meaningful there); token ids stay integers."""
    if not isinstance(reconstruction, Reconstruction):
        return failed_reconstruction(
            f"the attack returned {type(reconstruction).__name__}, not a Reconstruction", seconds
        )
    inputs = reconstruction.inputs.detach().cpu()
    status, message = "ok", reconstruction.message
    if inputs.is_floating_point():
        inputs = inputs.float()
        if inputs.numel() and torch.isfinite(inputs).all():
            low, high = float(inputs.min()), float(inputs.max())
            if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
                clamped = f"values from {low:.4g} to {high:.4g} clamped to [0, 1] for scoring"
                message = f"{message}; {clamped}" if message else clamped
            inputs = inputs.clamp(0.0, 1.0)
    labels = None if reconstruction.labels is None else reconstruction.labels.detach().cpu()
    wanted = (expected, *shape) if shape is not None else None
    if inputs.dim() == 0 or inputs.shape[0] != expected:
        status = "failed"
        count = inputs.shape[0] if inputs.dim() else 0
        message = f"reconstruction has {count} samples, expected {expected}"
    elif wanted is not None and tuple(inputs.shape) != wanted:
        status = "failed"
        message = f"reconstruction of shape {tuple(inputs.shape)}, expected {wanted}"
    elif labels is not None and tuple(labels.shape) != (expected,):
        status = "failed"
        message = f"labels of shape {tuple(labels.shape)}, expected ({expected},)"
    elif not torch.isfinite(inputs).all():
        status, message = "nan", "reconstruction contains NaN or inf"
    if reconstruction.status == "failed" and status != "ok":
        message = reconstruction.message or message
    return dataclasses.replace(
        reconstruction,
        inputs=inputs,
        labels=labels,
        seconds=seconds,
        status=status,
        message=message,
        loss_start=_cpu(reconstruction.loss_start),
        loss_final=_cpu(reconstruction.loss_final),
    )


def _cpu(values: torch.Tensor | None) -> torch.Tensor | None:
    return None if values is None else values.detach().double().cpu()


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
    shape = tuple(observation.model.input_shape) if observation.modality == "image" else None
    return AttackResult(job, checked(reconstruction, seconds, observation.num_targets, shape))


def run_batch(
    jobs: Sequence[AttackJob], attack: Attack, knowledge: AttackerKnowledge, budget: Budget
) -> list[AttackResult]:
    """Run one attack's jobs where this process is: as one batched call when the attack can,
    else one job after another. Each job is charged an equal share of the batch's time."""
    if len(jobs) < 2 or not isinstance(attack, BatchAttack):
        return [run_job(job, attack, knowledge, budget) for job in jobs]
    observations = [job.observation for job in jobs]
    start = time.perf_counter()
    try:
        outcomes = attack.reconstruct_batch(observations, knowledge, budget)
    except Exception as error:  # a failure outside any one job's work: the whole batch
        log.warning("attack %s failed on a batch of %d jobs: %s", jobs[0].attack, len(jobs), error)
        outcomes = [error] * len(jobs)
    seconds = (time.perf_counter() - start) / len(jobs)
    results = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        if isinstance(outcome, Exception):
            client = job.observation.client_id
            log.warning("attack %s failed on client %s: %s", job.attack, client, outcome)
            results.append(AttackResult(job, failed_reconstruction(outcome, seconds)))
        else:
            expected = job.observation.num_targets
            results.append(AttackResult(job, checked(outcome, seconds, expected)))
    return results


class InlineRunner:
    """Runs each job to completion inside `submit`, in this process, on `knowledge.device`,
    with `fedleak.attacks.threads`'s thread count."""

    def __init__(
        self, attacks: dict[str, Attack], knowledge: AttackerKnowledge, budget: Budget
    ) -> None:
        self.attacks = attacks
        self.knowledge = knowledge
        self.budget = budget
        self._done: list[AttackResult] = []

    def submit(self, jobs: Sequence[AttackJob]) -> None:
        """Run every job now, each attack's jobs as one batch; results in submission order."""
        done = []
        for batch in batches(jobs):
            attack = self.attacks[batch[0].attack]
            # One thread for small models, as `fedleak.reconstruct` (the clients hold cores).
            with torch_threads(default_threads(batch[0].observation, self.knowledge.device)):
                done += run_batch(batch, attack, self.knowledge, self.budget)
        self._done += sorted(done, key=lambda result: result.job.job_id)

    def ready(self, wait: bool = False) -> list[AttackResult]:
        """Everything submitted so far: nothing is ever outstanding."""
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Nothing to release."""
