"""Console progress for long work: items done of total, time spent, and an ETA.

The ETA extrapolates the mean time of the items finished in this process to the ones left, so
a resumed run or sweep does not count the work an earlier process did; the process's first item
counts only until another of its kind has finished, since it carries the start-up (a run's
first round waits for Ray and its client actors: 22 s against 0.5 s for the next). Items of
different
kinds (a run's attacked rounds and the others) are timed apart: one attacked round of a minute
among rounds of a fifth of a second made the demo's first ETA 1h26m for five minutes' work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence


def clock(seconds: float) -> str:
    """`42s`, `3m05s` or `1h02m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts finished items of `total`, `already` of them done before this process started;
    `kind` maps an item's number (from 1) to its kind, each kind timed on its own."""

    def __init__(
        self,
        what: str,
        total: int,
        already: int = 0,
        now: Callable[[], float] = time.monotonic,
        kind: Callable[[int], Hashable] = lambda item: None,
        estimate: Callable[[], float | None] | None = None,
    ) -> None:
        self.what = what
        self._estimate = estimate  # the ETA of work that runs side by side (`parallel_eta`)
        self.total = total
        self.already = already
        self.done = already
        self._now = now
        self._start = self._last = now()
        self._kind = kind
        self._seconds: dict[Hashable, list[tuple[int, float]]] = {}  # (item, seconds)

    def advance(self, done: int | None = None) -> None:
        """Mark one more item (or `done` items in all) as finished."""
        finished = range(self.done + 1, (self.done + 1 if done is None else done) + 1)
        now = self._now()
        for item in finished:
            self._seconds.setdefault(self._kind(item), []).append(
                (item, (now - self._last) / len(finished))
            )
        self._last = now
        self.done = self.done + 1 if done is None else done

    @property
    def elapsed(self) -> float:
        """Seconds since this process started counting."""
        return self._now() - self._start

    def eta(self) -> float | None:
        """Seconds left at the pace so far, each item at its kind's mean time; None until an
        item of every kind left has finished in this process (or what `estimate` says)."""
        if self._estimate is not None:
            return self._estimate() if self.done > self.already else None
        left = 0.0
        for item in range(self.done + 1, self.total + 1):
            timed = self._seconds.get(self._kind(item))
            if not timed:
                return None
            # The start-up item (this process's first) counts while it is its kind's only one.
            seconds = [s for done, s in timed if done != self.already + 1] or [timed[0][1]]
            left += sum(seconds) / len(seconds)
        return left if self.done > self.already else None

    def text(self) -> str:
        """`round 3/15 (1m12s, ETA 4m48s)`; the ETA is left out until it can be estimated."""
        eta = self.eta()
        timing = clock(self.elapsed)
        if eta is not None and self.done < self.total:
            timing += f", ETA {clock(eta)}"
        return f"{self.what} {self.done}/{self.total} ({timing})"


def parallel_eta(mean: float, running: Sequence[float], queued: int, workers: int) -> float:
    """Seconds until `workers` side by side finish: items of `mean` seconds each, `running`
    the seconds each running item has run, `queued` waiting for a free worker. Timing items
    one after another would say a whole item's time after the first of two finishing at once
    (the demo: "ETA 3m17s" ten seconds before its end)."""
    free = sorted(max(mean - ran, 0.0) for ran in running)
    free += [0.0] * max(workers - len(free), 0)
    for _ in range(queued):
        soonest = free.index(min(free))
        free[soonest] += mean
    return max(free, default=0.0)
