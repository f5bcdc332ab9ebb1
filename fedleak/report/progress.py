"""Console progress for long work: items done of total, time spent, and an ETA.

The ETA extrapolates the mean time of the items finished in this process to the ones left, so
a resumed run or sweep does not count the work an earlier process did.
"""

from __future__ import annotations

import time
from collections.abc import Callable


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
    """Counts finished items of `total`, `already` of them done before this process started."""

    def __init__(
        self, what: str, total: int, already: int = 0, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.what = what
        self.total = total
        self.already = already
        self.done = already
        self._now = now
        self._start = now()

    def advance(self, done: int | None = None) -> None:
        """Mark one more item (or `done` items in all) as finished."""
        self.done = self.done + 1 if done is None else done

    @property
    def elapsed(self) -> float:
        """Seconds since this process started counting."""
        return self._now() - self._start

    def eta(self) -> float | None:
        """Seconds left at the pace so far; None before the first item of this process."""
        finished = self.done - self.already
        if finished <= 0:
            return None
        return self.elapsed / finished * max(self.total - self.done, 0)

    def text(self) -> str:
        """`round 3/15 (1m12s, ETA 4m48s)`; the ETA is left out until it can be estimated."""
        eta = self.eta()
        timing = clock(self.elapsed)
        if eta is not None and self.done < self.total:
            timing += f", ETA {clock(eta)}"
        return f"{self.what} {self.done}/{self.total} ({timing})"
