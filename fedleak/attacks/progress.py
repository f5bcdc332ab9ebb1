"""The progress bar an attack shows while it optimises or trains, when asked to."""

from __future__ import annotations

from typing import Any


class SilentBar:
    """Counts like a tqdm bar and shows nothing: a hidden bar needs no tqdm, so the
    benchmarks run on a machine's bare torch, numpy and scipy."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, count: int = 1) -> None:
        self.n += count

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, description: str, show: bool) -> Any:
    """A tqdm bar over `total` steps when `show`, else a `SilentBar`. Off a terminal (a log
    file, a pipe) the bar redraws at most every 30 s and ends on a line of its own: a bar
    erased with carriage returns glued itself to the round's line. A notebook's widget bar
    (whose stderr is no terminal either) stays live."""
    if not show:
        return SilentBar()
    import sys

    from tqdm import autonotebook, std
    from tqdm.auto import tqdm

    if sys.stderr.isatty() or autonotebook.tqdm is not std.tqdm:
        return tqdm(total=total, desc=description, leave=False)
    return tqdm(total=total, desc=description, leave=True, mininterval=30.0)
