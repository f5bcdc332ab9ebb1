"""Failures as one line: whitespace folded, cut at a word, marked when cut."""

from __future__ import annotations

import pytest

from fedleak.lines import error_line, first_line, one_line


def test_a_short_message_is_kept_whole_on_one_line() -> None:
    assert one_line("  a\n  b\tc  ") == "a b c"
    assert one_line(ValueError("x  y")) == "x y"


@pytest.mark.parametrize("limit", [20, 21, 25, 40, 299])
def test_a_long_message_is_cut_at_a_word_and_marked(limit: int) -> None:
    words = [f"word{i}" for i in range(100)]
    line = one_line(" ".join(words), limit)
    assert len(line) <= limit and line.endswith("...")
    assert line[:-3].split() == words[: len(line[:-3].split())]  # whole words only


def test_one_long_word_keeps_its_start() -> None:
    path = "/tmp/" + "x" * 400
    line = one_line(f"cannot read {path}", 100)
    assert len(line) == 100 and line.startswith("cannot read /tmp/xxx") and line.endswith("...")


def test_an_error_is_its_type_and_first_line() -> None:
    error = RuntimeError("\n  first   part\nsecond line\n")
    assert error_line(error) == "RuntimeError: first part"
    assert error_line(KeyError()) == "KeyError"
    assert first_line(error) == "first part" and first_line(OSError()) == "OSError"
    long = ValueError("because " + "the tensor was far too large " * 30)
    line = error_line(long, 80)
    assert len(line) <= 80 and line.endswith("...")
    assert line[:-3].rsplit(" ", 1)[1] in {"the", "tensor", "was", "far", "too", "large"}
