"""Helpers for tests that watch processes end (Linux /proc)."""

from __future__ import annotations

from pathlib import Path


def ended(pid: int) -> bool:
    """Gone, or a zombie that waits for a reaper (a container's init may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def children(pid: int) -> list[int]:
    """The processes `pid` started that are still running."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
