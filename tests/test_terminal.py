"""What the command line prints never ends what it does: a reader that leaves early, or a
terminal that cannot encode a character, costs output, not the study (audit BK1, BK2)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from fedleak.simulations.cli import main
from fedleak.simulations.terminal import (
    OutlivedStream,
    escape_unencodable,
    guard_worker_streams,
)


class _ClosedAfter(io.StringIO):
    """A pipe whose reader takes `lines` writes and then goes away."""

    def __init__(self, lines: int) -> None:
        super().__init__()
        self.left = lines

    def write(self, text: str) -> int:
        if self.left <= 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.left -= 1
        return super().write(text)


def test_a_reader_that_leaves_early_costs_only_the_output(monkeypatch, capsys) -> None:
    stream = _ClosedAfter(1)
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(["config-keys"]) == 0
    assert stream.getvalue().startswith("KEY ") and stream.getvalue().count("\n") <= 1
    assert sys.stdout is stream  # the command's own stream is handed back
    assert capsys.readouterr().err == ""


def test_a_worker_process_keeps_its_guard_for_good(monkeypatch) -> None:
    """A parallel sweep's cells print from processes of their own (audit BN D1)."""
    stream = _ClosedAfter(1)
    monkeypatch.setattr(sys, "stdout", stream)
    guard_worker_streams()
    guard_worker_streams()  # twice: one wrapper
    assert isinstance(sys.stdout, OutlivedStream) and sys.stdout._stream is stream
    print("round 1/2")
    print("round 2/2")  # the reader has gone: dropped, not raised
    assert stream.getvalue() == "round 1/2"


def test_characters_the_terminal_cannot_encode_are_escaped(monkeypatch) -> None:
    raw = io.BytesIO()
    ascii_terminal = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_terminal)
    assert main(["presets"]) == 0
    ascii_terminal.flush()
    assert b"accuracy and \\u03b5" in raw.getvalue()  # dp-frontier's line, whole


def test_a_paths_undecodable_bytes_are_printed_as_themselves(monkeypatch) -> None:
    """In a C locale a path with 'ü' is held as surrogates; backslash escapes printed it as
    "\\udcc3\\udcbc", a path no one could copy and use (audit CE4)."""
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    escape_unencodable()
    print("report: /runs/\udcc3\udcbc/report.html (\u03b5)")
    sys.stdout.flush()
    assert raw.getvalue() == b"report: /runs/\xc3\xbc/report.html (\\u03b5)\n"


def test_a_study_piped_into_a_reader_that_stops_runs_to_its_end(tmp_path: Path) -> None:
    """`fedleak run ... | head -1` ended the run silently after round 0: no DONE, no FAILED,
    no line."""
    out = tmp_path / "piped"
    argv = ["run", "quickstart", "--num-clients", "2", "--out", str(out)]
    for setting in ("num-server-rounds=2", "attack.names=aux-mean", "train.batch-size=2"):
        argv += ["--set", setting]
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}  # ... and its ε lines on an ASCII stdout
    argv += ["--set", "defense.spec=dpsgd:1:1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "fedleak.simulations.console", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()
    error = process.stderr.read().decode()
    assert process.wait(timeout=600) == 0, error
    assert first.startswith(b"fedleak: run directory")
    assert (out / "DONE").exists() and not (out / "FAILED").exists()
    assert "Traceback" not in error and "error" not in error


def test_the_guarded_stream_is_closed_when_its_stream_is() -> None:
    """Ray's colorama hook asks `closed` before `isatty` at exit; the guard answered False for
    a closed stream, and isatty then raised "I/O operation on closed file"."""
    stream = io.StringIO()
    guarded = OutlivedStream(stream)
    assert not guarded.closed
    stream.close()
    assert guarded.closed
