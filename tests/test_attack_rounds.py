"""`attack.rounds`: the curious server attacks only the rounds named, and aggregates every round
exactly as before (a study attacks the trained model without paying for every round)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedleak.config import attacked_rounds
from fedleak.models.spec import ModelSpec
from fedleak.server.auditor import Auditor
from fedleak.server.runner import AttackJob
from fedleak.server.strategy import CuriousStrategy, PublicSetting


class Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


class Recorder:
    def __init__(self) -> None:
        self.jobs: list[AttackJob] = []

    def submit(self, jobs: list[AttackJob]) -> None:
        self.jobs.extend(jobs)

    def ready(self, wait: bool = False) -> list:
        return []


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _reply(client: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.full((3,), float(client))}),
            "metrics": MetricRecord({"num-examples": 1, "partition-id": client}),
            "audit": ArrayRecord({"inputs": torch.rand(1, 1, 2, 2), "labels": torch.zeros(1)}),
        }
    )
    return Message(content=content, dst_node_id=client + 1, message_type="train")


def _strategy(
    runner: Recorder, clients_per_round: int, attacked: frozenset[int] | None = None
) -> CuriousStrategy:
    """A curious FedAvg over a 3-parameter MLP that attacks with aux-mean."""
    public = PublicSetting(ModelSpec("mlp", (1, 2, 2), 3), "delta", 0.1, 1.0, "none", False)
    return CuriousStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        public,
        runner,
        Auditor(),
        attacks=("aux-mean",),
        clients_per_round=clients_per_round,
        seed=0,
        attacked_rounds=attacked,
    )


@pytest.mark.parametrize(("spec", "expected"), [("all", [1, 2, 3]), ("1,last", [1, 3])])
def test_only_the_named_rounds_are_attacked(spec: str, expected: list[int]) -> None:
    runner = Recorder()
    strategy = _strategy(runner, clients_per_round=0, attacked=attacked_rounds(spec, 3))
    weights = ArrayRecord({"w": torch.zeros(3)})
    for r in (1, 2, 3):
        list(strategy.configure_train(r, weights, ConfigRecord(), Grid()))
        aggregate, _ = strategy.aggregate_train(r, [_reply(0), _reply(1)])
        torch.testing.assert_close(aggregate.to_torch_state_dict()["w"], torch.full((3,), 0.5))
    assert sorted({job.observation.round for job in runner.jobs}) == expected
    assert len(runner.jobs) == 2 * len(expected)


def test_fewer_replies_than_clients_per_round_attacks_all_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An audited app's pool is only known once it replies: asking for more attacked clients
    than replied attacks every one, and the log says so."""
    runner = Recorder()
    strategy = _strategy(runner, clients_per_round=5)
    list(strategy.configure_train(1, ArrayRecord({"w": torch.zeros(3)}), ConfigRecord(), Grid()))
    with caplog.at_level("WARNING", logger="fedleak.server.strategy"):
        strategy.aggregate_train(1, [_reply(0), _reply(1)])
    assert len(runner.jobs) == 2
    assert "attack.clients-per-round=5, but 2 clients replied; attacking all" in caplog.text


def test_a_round_without_replies_is_not_said_to_attack_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every client of the round failed: "0 clients replied; attacking all" read as if an
    attack ran (audit AK3); the failures are reported on their own lines."""
    strategy = _strategy(Recorder(), clients_per_round=1)
    with caplog.at_level("WARNING", logger="fedleak.server.strategy"):
        assert strategy.chosen(1, []) == []
    assert "attacking all" not in caplog.text
