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

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fedleak.attacks.isolation import ObservationChanged, ReadOnly, isolated
from fedleak.attacks.outcome import checked, failed_reconstruction, image_shape, num_classes
from fedleak.attacks.threads import torch_threads
from fedleak.attacks.types import (
    Attack,
    AttackerKnowledge,
    Budget,
    Observation,
    Reconstruction,
    RunStateError,
)
from fedleak.lines import error_line

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


def run_job(
    job: AttackJob, attack: Attack, knowledge: AttackerKnowledge, budget: Budget
) -> AttackResult:
    """Run one job where this process is; an exception or NaN becomes a recorded status. The
    call must leave its observation and `knowledge` as it found them."""
    return _run_one(job, attack, knowledge, budget, ReadOnly([job.observation], knowledge))


def _run_one(
    job: AttackJob,
    attack: Attack,
    knowledge: AttackerKnowledge,
    budget: Budget,
    read_only: ReadOnly | None,
) -> AttackResult:
    """`run_job`, checking `read_only` after the call (None: the caller checks)."""
    observation = job.observation
    start = time.perf_counter()
    try:
        with isolated(attack, [observation], knowledge.seed, read_only, job.attack):
            reconstruction = attack.reconstruct(observation, knowledge, budget)
    except (RunStateError, ObservationChanged):
        raise  # the run's kept state failed, or a broken attack's that any later row may carry
    except (Exception, SystemExit) as error:  # an attack's failure must not end the round
        log.warning(
            "attack %s failed on client %s: %s",
            job.attack,
            observation.client_id,
            error_line(error),
        )
        return AttackResult(job, failed_reconstruction(error, time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return AttackResult(
        job,
        checked(
            reconstruction,
            seconds,
            observation.num_targets,
            image_shape(observation),
            num_classes(observation),
        ),
    )


def run_batch(
    jobs: Sequence[AttackJob],
    attack: Attack,
    knowledge: AttackerKnowledge,
    budget: Budget,
    read_only: ReadOnly | None = None,
) -> list[AttackResult]:
    """Run one attack's jobs where this process is: as one batched call when the attack can,
    else one job after another. Each job is charged the seconds the attack reports for it,
    or an equal share of the batch's time where it reports none. `read_only`: what each call
    must leave unchanged (by default the jobs' observations and `knowledge`)."""
    observations = [job.observation for job in jobs]
    read_only = read_only or ReadOnly(observations, knowledge)
    if len(jobs) < 2 or not isinstance(attack, BatchAttack):
        # One check after all of them: each call's would read every observation again.
        results = [_run_one(job, attack, knowledge, budget, None) for job in jobs]
        if jobs:
            read_only.check(jobs[0].attack)
        return results
    start = time.perf_counter()
    try:
        with isolated(attack, observations, knowledge.seed, read_only, jobs[0].attack):
            outcomes = attack.reconstruct_batch(observations, knowledge, budget)
    except (RunStateError, ObservationChanged):
        raise
    except (Exception, SystemExit) as error:  # outside any one job's work: the whole batch
        log.warning(
            "attack %s failed on a batch of %d jobs: %s",
            jobs[0].attack,
            len(jobs),
            error_line(error),
        )
        outcomes = [error] * len(jobs)
    seconds = (time.perf_counter() - start) / len(jobs)
    results = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        if isinstance(outcome, Exception | SystemExit):
            client = job.observation.client_id
            log.warning(
                "attack %s failed on client %s: %s", job.attack, client, error_line(outcome)
            )
            results.append(AttackResult(job, failed_reconstruction(outcome, seconds)))
        else:
            observation = job.observation
            own = getattr(outcome, "seconds", 0.0)
            outcome = checked(
                outcome,
                own if isinstance(own, int | float) and own > 0 else seconds,
                observation.num_targets,
                image_shape(observation),
                num_classes(observation),
            )
            results.append(AttackResult(job, outcome))
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
        # Each attack's calls are checked against all of the round's observations: an attack
        # that kept an earlier call's update could write into it, and every later attack reads it.
        read_only = ReadOnly([job.observation for job in jobs], self.knowledge)
        for batch in batches(jobs):
            attack = self.attacks[batch[0].attack]
            # One thread whatever the model or FEDLEAK_THREADS say: a run's rows must not
            # depend on its environment, and every server path computes with one (README).
            with torch_threads(1):
                done += run_batch(batch, attack, self.knowledge, self.budget, read_only)
        self._done += sorted(done, key=lambda result: result.job.job_id)

    def ready(self, wait: bool = False) -> list[AttackResult]:
        """Everything submitted so far: nothing is ever outstanding."""
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Nothing to release."""
