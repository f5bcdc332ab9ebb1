"""Which clients train in a round: a draw seeded by the run's seed and the round, made over
partition ids, so that two runs with the same seed select the same clients.

Flower's FedAvg samples node ids with Python's unseeded `random`, and node ids are random
64-bit numbers drawn anew in every run, so neither the draw nor what it is drawn over is
stable. The server does not know a node's partition id before that node has answered, so
`ClientSelection` asks every node it has not met yet once, with a query message the ClientApp
answers with its partition id (`fedleak.messages.partition_query`), and caches the answers.
It then draws `max(int(n * fraction), min_clients)` of the n nodes (Flower's count), sorted by
partition id, and hands the wrapped strategy a `SelectedNodes` view of the grid that holds
only those nodes; the wrapped strategy is built with `fraction_train=1` and takes them all.

A node that does not answer the query (a foreign ClientApp without a query handler) is still
selectable: it is ordered after every known partition, by node id, which is stable within a
run but not across runs. With `fraction == 1` nothing is drawn and no query is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedleak.messages import num_partitions_of, partition_id_of, partition_query, threads_of
from fedleak.server.grid import DelegatingGrid

log = logging.getLogger(__name__)

# Stream tag keeping the selection independent of the other draws made from the same seed.
_STREAM = 0x53454C45


class FederationError(ValueError):
    """The nodes do not make one federation: two of them hold the same partition, or they
    disagree on how many partitions there are."""


@dataclass(frozen=True)
class DeclaredFederation:
    """What the connected nodes declare: how many partitions the data is split into, and the
    torch threads their clients compute with (None: they do not all say the same)."""

    num_partitions: int
    client_threads: int | None


def declared_federation(grid: Grid, timeout: float | None) -> DeclaredFederation | None:
    """What the connected nodes declare (their node config's `num-partitions`, their thread
    count), or None when none says (a foreign ClientApp). A server behind a SuperLink cannot
    count the federation while nodes still join, and ε needs every partition's size; nodes
    that disagree, or share a partition id, are refused."""
    declared: dict[int, tuple[int | None, int]] = {}
    threads: set[int | None] = set()
    for reply in _ask_partitions(grid, grid.get_node_ids(), timeout):
        size = None if reply.has_error() else num_partitions_of(reply.content)
        if size is not None:
            declared[reply.metadata.src_node_id] = (partition_id_of(reply.content), size)
            threads.add(threads_of(reply.content))
    sizes = sorted({size for _, size in declared.values()})
    if len(sizes) > 1:
        raise FederationError(
            f"the nodes declare num-partitions {', '.join(map(str, sizes))}; give every "
            "SuperNode the same num-partitions in its --node-config"
        )
    check_distinct_partitions([partition for partition, _ in declared.values()], "at the start")
    if not sizes:
        return None
    return DeclaredFederation(sizes[0], threads.pop() if len(threads) == 1 else None)


def check_distinct_partitions(partitions: Sequence[int | None], when: str) -> None:
    """Refuse two nodes that hold the same partition: each would train on it and be attacked,
    and another partition would never be."""
    seen = [p for p in partitions if p is not None]
    repeated = sorted({p for p in seen if seen.count(p) > 1})
    if repeated:
        raise FederationError(
            f"{seen.count(repeated[0])} nodes declare partition-id={repeated[0]} {when}; give "
            "each SuperNode its own partition-id, 0 to num-partitions - 1"
        )


def _ask_partitions(grid: Grid, nodes: Iterable[int], timeout: float | None) -> Iterable[Message]:
    """Each node's answer to `partition_query` (an error reply where it has no handler)."""
    queries = [
        Message(content=partition_query(), dst_node_id=node, message_type=MessageType.QUERY)
        for node in nodes
    ]
    return grid.send_and_receive(queries, timeout=timeout)


class SelectedNodes(DelegatingGrid):
    """A grid that shows only `chosen` of its nodes; everything else goes to `inner`.

    `population` is the size of the whole federation (central DP's sampling rate needs it).
    """

    def __init__(self, inner: Grid, chosen: Sequence[int], population: int) -> None:
        super().__init__(inner)
        self.chosen = list(chosen)
        self.population = population

    def get_node_ids(self) -> Iterable[int]:
        """Only the selected nodes, in partition order."""
        return list(self.chosen)


def federation_size(grid: Grid) -> int:
    """How many nodes the federation holds, also when `grid` shows only a selection."""
    if isinstance(grid, SelectedNodes):
        return grid.population
    return len(list(grid.get_node_ids()))


@dataclass
class ClientSelection:
    """The seeded draw of each round's clients (see the module docstring).

    `partitions` caches node id -> partition id, learnt from the query and from replies.
    """

    fraction: float
    min_clients: int
    seed: int
    timeout: float | None = None
    partitions: dict[int, int] = field(default_factory=dict)

    def grid_for(self, server_round: int, grid: Grid) -> Grid:
        """`grid` itself when every node trains, else a view holding the round's draw."""
        if self.fraction >= 1.0:
            return grid
        # Flower's own wait for enough connected nodes (it draws nothing for a size of 0).
        _, nodes = sample_nodes(grid, self.min_clients, 0)
        self.learn(grid, nodes)
        ordered = sorted(nodes, key=self.order_key)
        count = min(len(ordered), max(int(len(ordered) * self.fraction), self.min_clients))
        rng = np.random.default_rng([self.seed, server_round, _STREAM])
        picked = sorted(int(i) for i in rng.choice(len(ordered), size=count, replace=False))
        return SelectedNodes(grid, [ordered[i] for i in picked], len(ordered))

    def learn(self, grid: Grid, nodes: Iterable[int]) -> None:
        """Ask the nodes whose partition id is unknown for it, once."""
        unknown = [node for node in nodes if node not in self.partitions]
        if not unknown:
            return
        for reply in _ask_partitions(grid, unknown, self.timeout):
            partition = None if reply.has_error() else partition_id_of(reply.content)
            if partition is not None:
                self.partitions[reply.metadata.src_node_id] = partition
        silent = len([node for node in unknown if node not in self.partitions])
        if silent:
            log.warning(
                "%d node(s) did not say their partition id; their selection is not reproducible",
                silent,
            )

    def order_key(self, node: int) -> tuple[int, int]:
        """Known partitions first, by partition id; unknown nodes after them, by node id."""
        partition = self.partitions.get(node)
        return (0, partition) if partition is not None else (1, node)


def canonical_order(
    replies: Iterable[Message], known: Mapping[int, int] | None = None
) -> list[Message]:
    """Replies sorted by the partition id they declare (or that `known` maps their node to),
    replies without one after them by node id, error replies last: the order in which every
    later step reads them, whatever order they arrived in."""

    def key(msg: Message) -> tuple[int, int, int]:
        node = msg.metadata.src_node_id
        if msg.has_error():
            return (2, node, 0)
        partition = partition_id_of(msg.content)
        if partition is None and known is not None:
            partition = known.get(node)
        return (0, partition, node) if partition is not None else (1, node, 0)

    return sorted(replies, key=key)
