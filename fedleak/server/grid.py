"""A Grid that gives up waiting for replies when the run is asked to stop (the first Ctrl-C).

Flower's grids wait for a round's replies until `sim.timeout`; clients killed by the same
Ctrl-C never answer, so the server would sit there for an hour. This wrapper polls the wrapped
grid itself and raises `RunInterrupted` as soon as a stop is requested. It also waits for the
federation to connect before the first round (`wait_for_nodes`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedleak.interrupt import raise_if_stopped

POLL_SECONDS = 0.1


class ClientsMissing(RuntimeError):
    """Fewer clients connected than the run needs, within `sim.timeout`."""


class DelegatingGrid(Grid):
    """A Grid that hands every call to `inner`; subclasses override only what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        """Delegated."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """Delegated."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegated."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Delegated."""
        return self.inner.send_and_receive(messages, timeout=timeout)


class StoppableGrid(DelegatingGrid):
    """Delegates everything to `inner`; `send_and_receive` checks for a stop request."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull replies until all arrived, `timeout` passed or a stop is requested."""
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            raise_if_stopped("while waiting for the clients' replies")
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in arrived)
            if pending:
                time.sleep(POLL_SECONDS)
        return replies

    def wait_for_nodes(self, count: int, timeout: float) -> int:
        """Wait until at least `count` nodes are connected; return how many are.

        Flower's simulation starts the ServerApp's thread before it registers the supernodes,
        so on a busy machine the server's first look can find none of them (seen at a load of 7:
        a run that failed with "num_partitions=0")."""
        end = time.monotonic() + timeout
        while (connected := len(list(self.get_node_ids()))) < count:
            raise_if_stopped("while waiting for the clients to connect")
            if time.monotonic() >= end:
                raise ClientsMissing(
                    f"{connected} of {count} clients connected within sim.timeout={timeout:g} s"
                )
            time.sleep(POLL_SECONDS)
        return connected
