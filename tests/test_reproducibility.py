"""Same seed, same bits: replies are read in a canonical order and clients are drawn by a
seeded selection over partition ids, so neither arrival order nor node ids reach the results.

The cross-process check (two separate processes, different PYTHONHASHSEED) is at the end.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app import Error as MessageError
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedleak.messages import partition_answer, partition_id_of
from fedleak.models.spec import ModelSpec
from fedleak.server.auditor import Auditor
from fedleak.server.central_dp import CentralDP
from fedleak.server.selection import ClientSelection, SelectedNodes, canonical_order
from fedleak.server.strategy import CuriousStrategy, PublicSetting


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class FakeGrid:
    """Nodes with random ids that answer the partition query like fedleak's ClientApp."""

    def __init__(self, partitions: int, seed: int, silent: tuple[int, ...] = ()) -> None:
        rng = random.Random(seed)
        self.partition_of = {rng.getrandbits(63): p for p in range(partitions)}
        self.silent = silent
        self.queries = 0

    def get_node_ids(self) -> list[int]:
        nodes = list(self.partition_of)
        random.Random(len(nodes)).shuffle(nodes)
        return nodes

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list:
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == MessageType.QUERY
            self.queries += 1
            partition = self.partition_of[msg.metadata.dst_node_id]
            if partition in self.silent:
                reply = Message(MessageError(code=0, reason="no query handler"), reply_to=msg)
            else:
                reply = Message(content=partition_answer(partition), reply_to=msg)
            replies.append(reply)
        return replies


def _selected(selection: ClientSelection, grid: FakeGrid, server_round: int) -> list[int]:
    view = selection.grid_for(server_round, grid)
    assert isinstance(view, SelectedNodes) and view.population == len(grid.partition_of)
    return [grid.partition_of[node] for node in view.get_node_ids()]


def test_selection_is_a_function_of_seed_round_and_partition_ids() -> None:
    # Two runs: the same ten partitions behind different random node ids.
    first, second = FakeGrid(10, seed=1), FakeGrid(10, seed=2)
    assert set(first.partition_of).isdisjoint(second.partition_of)
    a = ClientSelection(0.3, 1, seed=7)
    b = ClientSelection(0.3, 1, seed=7)
    draws = [_selected(a, first, r) for r in range(1, 6)]
    assert draws == [_selected(b, second, r) for r in range(1, 6)]
    assert all(len(d) == 3 and d == sorted(d) for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # the round changes the draw
    other = ClientSelection(0.3, 1, seed=8)
    assert [_selected(other, FakeGrid(10, seed=1), r) for r in range(1, 6)] != draws
    # Each node is asked once, in the first round only.
    assert first.queries == 10 and a.partitions == first.partition_of


def test_selection_honours_min_clients_and_keeps_silent_nodes_selectable() -> None:
    grid = FakeGrid(4, seed=3, silent=(2,))
    selection = ClientSelection(0.25, 3, seed=0)
    chosen = _selected(selection, grid, 1)
    assert len(chosen) == 3  # max(int(4 * 0.25), min_clients)
    assert len(selection.partitions) == 3  # partition 2 never said who it is
    # Every node trains when the fraction is 1: the grid goes through untouched, no query.
    everyone = FakeGrid(4, seed=4)
    assert ClientSelection(1.0, 1, seed=0).grid_for(1, everyone) is everyone
    assert everyone.queries == 0


def test_central_dp_counts_the_whole_federation_behind_a_selection() -> None:
    grid = FakeGrid(10, seed=5)
    view = ClientSelection(0.3, 1, seed=0).grid_for(1, grid)
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    dp = CentralDP(
        inner, clip=1.0, noise=1.0, update_kind="gradient", learning_rate=0.1, seed=0, delta=1e-5
    )
    weights = ArrayRecord({"w": torch.zeros(3)})
    messages = list(dp.configure_train(1, weights, ConfigRecord({}), view))
    assert len(messages) == 3 and dp.population == 10


def _reply(partition: int, update: torch.Tensor, examples: int, audit: bool = True) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": update.contiguous()}),
            "metrics": MetricRecord({"num-examples": examples, "partition-id": partition}),
        }
    )
    if audit:
        inputs, labels = torch.rand(examples, 1, 2, 2), torch.zeros(examples)
        content["audit"] = ArrayRecord({"inputs": inputs, "labels": labels})
    query = Message(content=RecordDict(), dst_node_id=1000 + partition, message_type="train")
    return Message(content=content, reply_to=query)


def _failed(node: int) -> Message:
    query = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(MessageError(code=0, reason="client failed"), reply_to=query)


def _strategy() -> CuriousStrategy:
    public = PublicSetting(ModelSpec("mlp", (1, 2, 2), 2), "gradient", 0.1, 1.0, "none", False)
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    strategy = CuriousStrategy(
        inner, public, None, Auditor(lpips_nets=()), attacks=(), clients_per_round=0, seed=0
    )
    strategy.global_weights = {"w": torch.zeros(257)}
    return strategy


def test_permuting_a_rounds_replies_does_not_change_the_aggregate() -> None:
    # Float32 sums depend on their order: magnitudes spread over many decades make sure that
    # at least one order of these replies rounds differently from the arrival order.
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(257, generator=g) * 10.0 ** (3 * i - 6) for i in range(5)]
    examples = [3, 1, 4, 1, 5]
    aggregates = set()
    plain = set()
    for order in itertools.islice(itertools.permutations(range(5)), 0, None, 7):
        replies = [_reply(i, updates[i], examples[i]) for i in order]
        replies.insert(2, _failed(99))
        arrays, _ = _strategy().aggregate_train(1, replies)
        aggregates.add(arrays["w"].numpy().tobytes())
        # What FedAvg alone makes of the same replies in arrival order.
        valid = [_reply(i, updates[i], examples[i], audit=False) for i in order]
        plain.add(FedAvg().aggregate_train(1, valid)[0]["w"].numpy().tobytes())
    assert len(plain) > 1, "the test needs replies whose sum depends on their order"
    assert len(aggregates) == 1


def test_canonical_order_sorts_by_partition_and_puts_errors_last() -> None:
    replies = [_reply(p, torch.zeros(2), 1) for p in (3, 0, 2)]
    replies.insert(1, _failed(5))
    ordered = canonical_order(replies)
    assert [partition_id_of(m.content) for m in ordered[:3]] == [0, 2, 3]
    assert ordered[3].has_error()
