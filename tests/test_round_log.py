"""The curious strategy's records: one `RoundLog` per round after its evaluation, and every
scored job handed to the sink it was built with, late ones (a worker pool) included."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app import Error as MessageError
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedleak.attacks.types import Reconstruction
from fedleak.models.spec import ModelSpec
from fedleak.server.auditor import Auditor
from fedleak.server.rounds import RoundHistory, RoundLog, ScoredJob
from fedleak.server.runner import AttackJob, AttackResult
from fedleak.server.strategy import CuriousStrategy, PublicSetting


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class ThreeNodes:
    """Nodes 1 and 2 reply (partitions 0 and 1); node 3 fails with a traceback."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == 3:
                reason = "Traceback (most recent call last):\n  ...\nValueError: boom"
                replies.append(Message(MessageError(code=0, reason=reason), reply_to=msg))
                continue
            content = RecordDict(
                {
                    "arrays": ArrayRecord({"w": torch.full((3,), float(node))}),
                    "metrics": MetricRecord({"num-examples": 1, "partition-id": node - 1}),
                    "audit": ArrayRecord(
                        {"inputs": torch.rand(1, 1, 2, 2), "labels": torch.zeros(1)}
                    ),
                }
            )
            replies.append(Message(content=content, reply_to=msg))
        return replies


class LateRunner:
    """Finishes a round's jobs only once a later round is submitted, or when waited for."""

    def __init__(self) -> None:
        self.pending: list[AttackJob] = []
        self.closed = False

    def submit(self, jobs: list[AttackJob]) -> None:
        self.pending.extend(jobs)

    def ready(self, wait: bool = False) -> list[AttackResult]:
        latest = max((job.observation.round for job in self.pending), default=0)
        done = [job for job in self.pending if wait or job.observation.round < latest]
        ids = {job.job_id for job in done}
        self.pending = [job for job in self.pending if job.job_id not in ids]
        failed = Reconstruction(torch.zeros(0), None, seconds=0.5, status="failed", message="x")
        return [AttackResult(job, failed) for job in done]

    def close(self) -> None:
        self.closed = True


class Events(RoundHistory):
    """A `RoundHistory` that also keeps the order in which things were reported."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[tuple[str, int]] = []

    def scored(self, job: ScoredJob) -> None:
        super().scored(job)
        self.order.append(("scored", job.round))

    def round_finished(self, log: RoundLog, arrays: ArrayRecord) -> None:
        super().round_finished(log, arrays)
        self.order.append(("round", log.round))


def _run(offset: int) -> tuple[Events, LateRunner]:
    sink, runner = Events(), LateRunner()
    strategy = CuriousStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3),
        PublicSetting(ModelSpec("mlp", (1, 2, 2), 3), "delta", 0.1, 1.0, "none", False),
        runner,
        Auditor(lpips_nets=()),
        attacks=("aux-mean",),
        clients_per_round=0,
        seed=0,
        round_offset=offset,
        sink=sink,
    )
    strategy.start(
        ThreeNodes(),
        ArrayRecord({"w": torch.zeros(3)}),
        num_rounds=2,
        evaluate_fn=lambda r, arrays: MetricRecord({"test-loss": float(r)}),
    )
    return sink, runner


def test_each_round_is_logged_after_its_evaluation_and_late_jobs_follow() -> None:
    sink, runner = _run(offset=0)
    assert sink.order == [
        ("round", 0),
        ("round", 1),
        ("scored", 1),  # round 1's jobs finish while round 2 is attacked
        ("scored", 1),
        ("round", 2),
        ("scored", 2),  # awaited once the rounds are done
        ("scored", 2),
    ]
    assert runner.closed and not runner.pending
    initial, first, second = sink.rounds
    assert initial == RoundLog(round=0, evaluation={"test-loss": 0.0})
    for log, r in ((first, 1), (second, 2)):
        assert (log.round, log.replies, log.failures, log.participants) == (r, 2, 1, (0, 1))
        assert log.first_error == "ValueError: boom" and log.payload_bytes > 0
        assert log.evaluation == {"test-loss": float(r)} and math.isnan(log.central_epsilon)
    rows = sink.rows()
    assert [(row["round"], row["client_id"], row["status"]) for row in rows] == [
        (1, 0, "failed"),
        (1, 1, "failed"),
        (2, 0, "failed"),
        (2, 1, "failed"),
    ]


def test_a_resumed_run_counts_on_and_does_not_log_its_initial_model_again() -> None:
    sink, _ = _run(offset=3)
    assert [log.round for log in sink.rounds] == [4, 5]
    assert [log.evaluation for log in sink.rounds] == [{"test-loss": 1.0}, {"test-loss": 2.0}]
    assert {job.round for job in sink.jobs} == {4, 5}
