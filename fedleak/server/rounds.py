"""What the curious server tells whoever keeps the study: each scored attack job as it is
scored, and one `RoundLog` per round once the round's global model is evaluated. A round's jobs
may be scored after its log (a worker pool attacks round t while round t + 1 trains), never
after the next round's log.

`CuriousStrategy` keeps no public bookkeeping: it hands these records to the `RoundSink` it was
built with. The server room defines the records and the protocol; the run directory that
keeps them is written by `fedleak.simulations.recording`, and `RoundHistory` keeps them in
memory for library use and tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from flwr.app import ArrayRecord

from fedleak.server.auditor import GroundTruth
from fedleak.server.runner import AttackResult

Row = Mapping[str, object]


@dataclass(frozen=True)
class ScoredJob:
    """One attack job, scored: the runner's result, the ground truth it was scored against
    (None: a foreign client that declared no batch) and its leakage rows. The job's
    observation names its round, which may be earlier than the current one (a worker pool
    finishes jobs late)."""

    result: AttackResult
    truth: GroundTruth | None
    rows: tuple[Row, ...]

    @property
    def round(self) -> int:
        """The round whose update was attacked."""
        return self.result.job.observation.round


@dataclass(frozen=True)
class RoundLog:
    """One round of the curious server, as the run records it.

    `replies`/`failures`: valid and failed client replies; `payload_bytes`: what the round
    moved (w_t to every addressed client, and the valid replies); `participants`: the client
    ids that replied; `first_error`: the first failed reply's reason (one line), if any;
    `central_epsilon`: client-level ε of central DP so far (NaN without it), from
    `central_releases` (aggregates released so far, by clients sampled); `evaluation`: the
    global model's metrics from the run's evaluation function (`test-loss`, `test-accuracy`);
    `attack_jobs`: the attack jobs submitted on the round's updates, whose scored jobs may
    follow the log (a worker pool): the round is complete once that many arrived.
    Round 0 is the initial model: no replies.
    """

    round: int
    replies: int = 0
    failures: int = 0
    payload_bytes: int = 0
    participants: tuple[int, ...] = ()
    first_error: str | None = None
    central_epsilon: float = math.nan
    central_releases: Mapping[int, int] = field(default_factory=dict)
    evaluation: Mapping[str, float] = field(default_factory=dict)
    attack_jobs: int = 0


class RoundSink(Protocol):
    """Where a curious strategy reports what happened."""

    def scored(self, job: ScoredJob) -> None:
        """An attack job was scored."""

    def round_finished(self, log: RoundLog, arrays: ArrayRecord) -> None:
        """A round ended, aggregated and evaluated; `arrays` is the new global state.
        Every job of earlier rounds has been scored by then; this round's may follow."""


class RoundHistory:
    """A sink that keeps every scored job and round log in memory (not the global states)."""

    def __init__(self) -> None:
        self.jobs: list[ScoredJob] = []
        self.rounds: list[RoundLog] = []

    def scored(self, job: ScoredJob) -> None:
        """Kept in `jobs`."""
        self.jobs.append(job)

    def round_finished(self, log: RoundLog, arrays: ArrayRecord) -> None:
        """The log is kept in `rounds`; the state is not."""
        self.rounds.append(log)

    def rows(self) -> list[Row]:
        """Every leakage row scored so far, in the order the jobs were scored."""
        return [row for job in self.jobs for row in job.rows]
