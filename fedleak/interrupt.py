"""A process-wide request to stop a run at its next safe point (the first Ctrl-C).

`fedleak run` sets it from its SIGINT handler. The server checks it where a round can be
abandoned without recording half of it (`raise_if_stopped`), and long attack loops check it
beside their time budget (`stop_requested`), so the run ends promptly with every finished round
on disk. Imports nothing from fedleak: every room may ask.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

_STOP = threading.Event()
_LAST_WORDS: list[Callable[[], None]] = []
_REQUESTS = [0]  # every request ever made in this process, which `clear_stop` leaves


class RunInterrupted(Exception):
    """The run was stopped on request at a safe point; finished rounds are on disk."""


def request_stop() -> None:
    """Ask the run in this process to stop at its next safe point."""
    _REQUESTS[0] += 1
    _STOP.set()


def stop_requests() -> int:
    """How many stops were requested in this process so far: a sweep compares the count
    around a cell, since a request that came after the cell's last safe point is cleared
    with the cell's run and must still stop the sweep."""
    return _REQUESTS[0]


def stop_requested() -> bool:
    """Whether a stop was requested (cheap: long loops call it with their budget checks)."""
    return _STOP.is_set()


def clear_stop() -> None:
    """Forget a request (a new run in the same process starts clean)."""
    _STOP.clear()


def raise_if_stopped(where: str) -> None:
    """`RunInterrupted` if a stop was requested; `where` names the safe point for the message."""
    if _STOP.is_set():
        raise RunInterrupted(f"stopped on request {where}")


@contextlib.contextmanager
def last_words(callback: Callable[[], None]) -> Iterator[None]:
    """While inside, a stop at once (the second Ctrl-C, which skips every `finally`) first
    calls `callback`: a sweep marks its running cell interrupted instead of leaving it
    "running" in its manifest."""
    _LAST_WORDS.append(callback)
    try:
        yield
    finally:
        _LAST_WORDS.remove(callback)


def say_last_words() -> None:
    """Call the registered callbacks, innermost first; one that fails must not keep the
    process from stopping."""
    for callback in reversed(_LAST_WORDS):
        with contextlib.suppress(Exception):
            callback()
