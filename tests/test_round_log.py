"""The curious strategy's records: one `RoundLog` per round after its evaluation, and every
scored job handed to the sink it was built with, late ones (a worker pool) included."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app import Error as MessageError
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedleak.attacks.types import Reconstruction
from fedleak.config import parse_flat
from fedleak.models.spec import ModelSpec
from fedleak.report.rundir import RunDirectory
from fedleak.runtime import federated_data
from fedleak.server.auditor import Auditor
from fedleak.server.privacy import PrivacyLedger
from fedleak.server.rounds import RoundHistory, RoundLog, ScoredJob
from fedleak.server.runner import AttackJob, AttackResult
from fedleak.server.strategy import CuriousStrategy, PublicSetting
from fedleak.simulations.recording import RunRecorder


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
        assert log.attack_jobs == 2
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
    # The evaluation is told the round counted from the run's first, as the records are (its
    # failure read "round 0" in a resumed run, audit EY3).
    assert [log.evaluation for log in sink.rounds] == [{"test-loss": 4.0}, {"test-loss": 5.0}]
    assert {job.round for job in sink.jobs} == {4, 5}


def _failed_job(server_round: int, client_id: int) -> ScoredJob:
    observation = SimpleNamespace(round=server_round, client_id=client_id)
    failed = Reconstruction(torch.zeros(0), None, seconds=0.25, status="failed", message="x")
    result = AttackResult(AttackJob(client_id, "aux-mean", observation), failed)
    row = {"round": server_round, "client_id": client_id, "attack": "aux-mean"}
    return ScoredJob(result, None, ({**row, "status": "failed", "message": "x"},))


def test_the_recorder_writes_a_round_once_its_jobs_are_scored_and_in_order(
    tmp_path: Path,
) -> None:
    """Rows, utility and checkpoint of a round go to disk together, after its last job and
    after the rounds before it: the checkpoint never runs ahead of the leakage."""
    config = parse_flat({"name": "t", "out-dir": str(tmp_path / "run")})
    run_dir = RunDirectory.create(tmp_path / "run", config, {"seed": 0})
    fd = federated_data(config, 2)
    recorder = RunRecorder(run_dir, fd, 0, PrivacyLedger.from_config(config, fd))

    def recorded() -> tuple[list[int], int, list[int]]:
        on_disk = RunDirectory.open(run_dir.path)
        checkpoint = on_disk.load_global_model()
        return (
            on_disk.utility()["round"].tolist(),
            checkpoint[0] if checkpoint else -1,
            on_disk.leakage()["round"].tolist(),
        )

    recorder.round_finished(RoundLog(0), ArrayRecord({"w": torch.zeros(3)}))
    recorder.round_finished(
        RoundLog(1, replies=2, attack_jobs=2), ArrayRecord({"w": torch.ones(3)})
    )
    recorder.round_finished(
        RoundLog(2, replies=2, attack_jobs=1), ArrayRecord({"w": torch.ones(3)})
    )
    assert recorded() == ([0], 0, []) and recorder.unrecorded == (1, 2)
    recorder.scored(_failed_job(2, 0))  # round 2 is complete, round 1 is not: both wait
    recorder.scored(_failed_job(1, 1))
    assert recorded() == ([0], 0, []) and recorder.unrecorded == (1, 2)
    recorder.scored(_failed_job(1, 0))
    assert recorded() == ([0, 1, 2], 2, [1, 1, 2]) and recorder.unrecorded == ()
    assert torch.equal(run_dir.load_global_model()[1]["w"], torch.ones(3))
    utility = RunDirectory.open(run_dir.path).utility().set_index("round")
    assert utility.loc[1, "attack_seconds"] == 0.5 and utility.loc[2, "attack_seconds"] == 0.25


def test_a_rounds_images_appear_with_its_rows_not_before(tmp_path: Path) -> None:
    """Images were saved as each job was scored: a run stopped before the round was recorded
    kept pictures of reconstructions the stop had cut short, beside no rows (audit CC2)."""
    config = parse_flat({"name": "t", "out-dir": str(tmp_path / "run")})
    run_dir = RunDirectory.create(tmp_path / "run", config, {"seed": 0})
    fd = federated_data(config, 2)
    recorder = RunRecorder(run_dir, fd, 1, PrivacyLedger.from_config(config, fd))
    recorder.round_finished(RoundLog(0), ArrayRecord({"w": torch.zeros(3)}))
    observation = SimpleNamespace(round=1, client_id=0, modality="image")
    guess = Reconstruction(torch.rand(1, 1, 28, 28), None, seconds=0.1)
    result = AttackResult(AttackJob(0, "aux-mean", observation), guess)
    row = {"round": 1, "client_id": 0, "attack": "aux-mean", "status": "ok"}
    recorder.scored(ScoredJob(result, None, (row,)))
    picture = run_dir.path / "images" / "r001_c000_aux-mean.png"
    assert not picture.exists() and recorder.unrecorded == ()
    recorder.round_finished(
        RoundLog(1, replies=1, attack_jobs=1), ArrayRecord({"w": torch.ones(3)})
    )
    assert picture.exists() and RunDirectory.open(run_dir.path).leakage()["round"].tolist() == [1]
