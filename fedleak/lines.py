"""Failures as one line: what fedleak stores in a run's records and prints to the user; and
lists within such lines."""

from __future__ import annotations

ELLIPSIS = "..."
# The longest line an error shows the user (`fedleak` and `flwr run` alike): a message of
# several clauses (what failed, why, how to go on) must not lose its remedy to the cut.
MAX_LINE = 2000


def one_line(text: object, limit: int = 300) -> str:
    """`text` with its whitespace runs as single spaces, at most `limit` characters, cut at a
    word boundary (a word longer than the room left is cut) and marked with "..." when cut."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    room = max(limit - len(ELLIPSIS), 0)
    head = line[: room + 1]
    cut = head.rfind(" ")
    # A path or a tensor's repr can be one long word: keep its start rather than nothing.
    kept = head[:cut] if cut >= room // 2 else line[:room]
    return kept.rstrip(" ,;:") + ELLIPSIS


def error_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` (the type alone when the message is empty)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return one_line(text, limit)


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-blank line of the message (the type's name when there is none)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return one_line(lines[0], limit) if lines else type(error).__name__


def listed(items: list[str], conjunction: str = "and") -> str:
    """'a, b and c': with commas alone, "Under prune:0.9, sign, ig matched" read as one list."""
    return f" {conjunction} ".join(filter(None, [", ".join(items[:-1]), items[-1]]))
