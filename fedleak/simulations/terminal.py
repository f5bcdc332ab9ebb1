"""The command line's standard streams: what it prints must never be what ends a study.

A study prints a line per round. Piped into a reader that stops early (`fedleak run ... |
head -1`) the next line raised BrokenPipeError between rounds, and the run ended without a
word or a FAILED; on a terminal that cannot encode 'ε' (`PYTHONIOENCODING=ascii`) the first
DP round's line ended it too. `printing_safely` makes both harmless for one command.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import TextIO


class OutlivedStream(io.TextIOBase):
    """A text stream that outlives its reader: once the pipe behind it has closed, what is
    left to print is dropped (its descriptor then points at /dev/null, so that Python's last
    flush is quiet too) and the caller goes on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_left()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_left()

    def _reader_left(self) -> None:
        self.reader_gone = True
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def closed(self) -> bool:  # type: ignore[override]
        # The stream's own: colorama's exit hook (Ray's) asks before it calls isatty.
        return self._stream.closed

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")


def _paths_as_bytes_others_escaped(error: UnicodeError) -> tuple[str | bytes, int]:
    """Undecodable bytes of a file name (which Python holds as surrogates U+DC80..U+DCFF) go
    back out as those bytes, so a printed path can be copied and used; any other character
    the terminal cannot encode is written as an escape."""
    if isinstance(error, UnicodeEncodeError):
        chunk = error.object[error.start : error.end]
        if all(0xDC80 <= ord(char) <= 0xDCFF for char in chunk):
            return bytes(ord(char) - 0xDC00 for char in chunk), error.end
    return codecs.backslashreplace_errors(error)


ESCAPE_ERRORS = "fedleak-escape"
codecs.register_error(ESCAPE_ERRORS, _paths_as_bytes_others_escaped)


def escape_unencodable() -> None:
    """Characters the terminal cannot encode are written as escapes (`\\u03b5`), a path's
    undecodable bytes as themselves."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors=ESCAPE_ERRORS)


def guard_worker_streams() -> None:
    """`printing_safely` for the rest of a worker process's life (a parallel sweep's cells
    print to the sweep's stdout from processes of their own)."""
    escape_unencodable()
    if sys.stdout is not None and not isinstance(sys.stdout, OutlivedStream):
        sys.stdout = OutlivedStream(sys.stdout)


@contextlib.contextmanager
def printing_safely() -> Iterator[None]:
    """For one command: characters the terminal cannot encode are written as escapes, and
    stdout outlives its reader (`OutlivedStream`)."""
    escape_unencodable()
    stdout = sys.stdout
    if stdout is None:  # no console at all (pythonw): nothing to guard
        yield
        return
    sys.stdout = OutlivedStream(stdout)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = stdout
