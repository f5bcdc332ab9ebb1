"""What the per-round figure draws for a series: a line with its band over several rounds, and
something visible (a level segment for floors, a bar for the interval) for a single round."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection, PolyCollection

from fedleak.report.plots import FLOOR_STYLE, _line
from fedleak.report.tables import Metric

TOKEN_ACC = Metric("token_acc", "token accuracy", True, 3, True)


def _rows(rounds: list[int]) -> pd.DataFrame:
    values = [0.0, 0.25, 0.25, 0.5, 0.125, 0.25]
    return pd.DataFrame(
        {"round": [r for r in rounds for _ in values], "token_acc": values * len(rounds)}
    )


def test_a_floor_of_one_round_is_a_visible_level_segment() -> None:
    figure, ax = plt.subplots()
    _line(ax, _rows([1]), TOKEN_ACC, {**FLOOR_STYLE, "label": "floor"}, False)
    segments = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(segments) == 1 and not ax.lines
    ((start, end),) = segments[0].get_segments()
    assert np.allclose(start, [0.7, 0.25]) and np.allclose(end, [1.3, 0.25])
    assert segments[0].get_label() == "floor"
    plt.close(figure)


def test_an_attack_of_one_round_gets_its_interval_as_a_bar() -> None:
    figure, ax = plt.subplots()
    _line(ax, _rows([1]), TOKEN_ACC, {"color": "C0", "marker": "o"}, True)
    assert [list(line.get_xydata()[0]) for line in ax.lines[:1]] == [[1.0, 0.25]]
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(bars) == 1
    (((_, low), (_, high)),) = bars[0].get_segments()
    # Six values: the order-statistic interval is the sample range.
    assert (low, high) == (0.0, 0.5)
    plt.close(figure)


def test_several_rounds_draw_a_line_and_a_band() -> None:
    figure, ax = plt.subplots()
    _line(ax, _rows([1, 2, 3]), TOKEN_ACC, {"color": "C0", "marker": "o"}, True)
    assert len(ax.lines) == 1 and len(ax.lines[0].get_xdata()) == 3
    assert any(isinstance(c, PolyCollection) for c in ax.collections)
    plt.close(figure)
