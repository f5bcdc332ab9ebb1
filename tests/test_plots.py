"""What the per-round figure draws for a series: a line with its band over several rounds, and
something visible (a level segment for floors, a bar for the interval) for a single round."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.figure import Figure

from fedleak.report import plots
from fedleak.report.plots import FLOOR_STYLE, _line, accuracy_top
from fedleak.report.tables import Metric

TOKEN_ACC = Metric("token_acc", "token accuracy", True, 3)


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


def test_the_accuracy_axis_fits_small_accuracies() -> None:
    assert accuracy_top([0.006, 0.009]) == 0.01  # a language model's next-token accuracy
    assert accuracy_top([0.09, 0.3]) == 0.5
    assert accuracy_top([0.2, 0.6]) == 1.0 and accuracy_top([0.95]) == 1.0
    assert accuracy_top([]) == 1.0 and accuracy_top([0.0, float("nan")]) == 1.0


def _accuracy_axis(accuracies: list[float], monkeypatch: pytest.MonkeyPatch) -> plt.Axes:
    """The accuracy panel of a per-round figure of one setting (the figure kept, not drawn)."""
    drawn: list[Figure] = []
    monkeypatch.setattr(plots, "_png", lambda figure: drawn.append(figure) or b"")
    rounds = list(range(len(accuracies)))
    leakage = _rows(rounds[1:]).assign(group="", defense="none", attack="tag", reference=False)
    utility = pd.DataFrame(
        {"round": rounds, "test_accuracy": accuracies, "group": "", "defense": "none"}
    )
    plots.rounds_figure(leakage, utility, [TOKEN_ACC], success=False)
    return drawn[0].axes[-1]


def test_the_accuracy_panel_zooms_in_on_small_accuracies_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = _accuracy_axis([0.0064, 0.0071, 0.0089], monkeypatch)
    assert small.get_ylim() == (0.0, 0.01)
    assert "fraction, axis to 0.01" in small.get_ylabel()
    large = _accuracy_axis([0.1, 0.6, 0.8], monkeypatch)
    assert large.get_ylim() == (0.0, 1.0) and "axis to" not in large.get_ylabel()
    plt.close("all")


def test_many_settings_draw_each_settings_own_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond a column per setting, the panels are attacks and the lines settings: the floor
    was then one line pooled over every setting, no setting's floor."""
    drawn: list[Figure] = []
    monkeypatch.setattr(plots, "_png", lambda figure: drawn.append(figure) or b"")
    settings = [f"s{i}" for i in range(plots.MAX_SETTING_COLUMNS + 1)]
    frames = []
    for i, defense in enumerate(settings):
        for attack, reference, level in (("tag", False, 0.5), ("floor", True, 0.1 * i)):
            frames.append(
                _rows([1, 2]).assign(
                    group="", defense=defense, attack=attack, reference=reference, token_acc=level
                )
            )
    leakage = pd.concat(frames, ignore_index=True)
    utility = pd.DataFrame({"round": 1, "test_accuracy": 0.5, "group": "", "defense": settings})
    plots.rounds_figure(leakage, utility, [TOKEN_ACC], success=False)
    panel = drawn[0].axes[0]
    dashed = [line for line in panel.lines if line.get_linestyle() == "--"]
    levels = sorted(float(line.get_ydata()[0]) for line in dashed)
    assert np.allclose(levels, [0.1 * i for i in range(len(settings))])
    assert len({line.get_color() for line in dashed}) == len(settings)
    plt.close("all")


def _visible_pixels(attack_values: dict[str, list[float]], colour: tuple[int, int, int]) -> int:
    """Pixels of `colour` in a one-setting per-round figure of the given attacks' values."""
    import io

    from PIL import Image

    frames = [
        _rows([1, 2, 3]).assign(attack=attack, token_acc=values * 3)
        for attack, values in attack_values.items()
    ]
    leakage = pd.concat(frames).assign(group="", defense="none", reference=False)
    utility = pd.DataFrame(
        {"round": [0, 1, 2, 3], "test_accuracy": 0.5, "group": "", "defense": "none"}
    )
    png = plots.rounds_figure(leakage, utility, [TOKEN_ACC], success=False)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(colour)).sum(axis=-1) < 40).sum())


def test_attacks_with_equal_values_stay_visible_as_nested_lines() -> None:
    # Two attacks on the same values (both at the floor): the second was drawn over the first
    # in the same width, leaving the first only in the legend.
    first = tuple(int(255 * c) for c in plt.get_cmap("tab10")(0)[:3])
    same = [0.25] * 6
    alone = _visible_pixels({"dlg": same}, first)
    covered = _visible_pixels({"dlg": same, "ig": same}, first)
    assert covered > 0.4 * alone, (covered, alone)


def test_the_frontiers_attack_keys_are_not_drawn_hollow() -> None:
    """Hollow points mean attack runs that did not converge; the legend drew every attack's
    key hollow (white), which read as "not converged" (audit BH5)."""
    from matplotlib.colors import to_rgba

    key = plots.attack_key("ig", "s")
    assert key.get_label() == "attack: ig" and key.get_marker() == "s"
    assert to_rgba(key.get_markerfacecolor()) != to_rgba("white")


def test_the_widest_per_round_figure_stays_readable_in_the_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At six setting columns the figure was 2,416 px wide and its labels unreadable in the
    report (audit BO5)."""
    drawn: list[Figure] = []
    monkeypatch.setattr(plots, "_png", lambda figure: drawn.append(figure) or b"")
    settings = [f"s{i}" for i in range(plots.MAX_SETTING_COLUMNS)]
    leakage = pd.concat(
        [
            _rows([1, 2]).assign(group="", defense=d, attack="tag", reference=False, token_acc=0.5)
            for d in settings
        ],
        ignore_index=True,
    )
    utility = pd.DataFrame({"round": 1, "test_accuracy": 0.5, "group": "", "defense": settings})
    plots.rounds_figure(leakage, utility, [TOKEN_ACC], success=False)
    assert len(drawn[0].axes[0].figure.axes) >= len(settings)  # a column per setting
    assert drawn[0].get_size_inches()[0] * 110 <= 1600
    # Small accuracies get labels 5-6 characters wide ("0.0200"): on every panel they ran
    # into the panel on their left (audit ES1). No label lies on another panel.
    drawn.clear()
    utility = utility.assign(test_accuracy=0.02)
    plots.rounds_figure(leakage, utility, [TOKEN_ACC], success=False)
    figure = drawn[0]
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    panels = [ax for ax in figure.axes if ax.get_visible()]
    labelled = 0
    for ax in panels:
        for label in ax.get_yticklabels():
            if not (label.get_visible() and label.get_text()):
                continue
            labelled += 1
            box = label.get_window_extent(renderer)
            for other in panels:
                if other is not ax:
                    assert not box.overlaps(other.get_window_extent(renderer)), label.get_text()
    assert labelled > 0


def test_settings_sharing_a_floor_draw_it_once_in_grey(monkeypatch: pytest.MonkeyPatch) -> None:
    """prune:0.9 and sign of one group share the aux-mean floor: their dashed lines lay on top
    of each other and only the last setting's colour showed (audit BO6)."""
    drawn: list[Figure] = []
    monkeypatch.setattr(plots, "_png", lambda figure: drawn.append(figure) or b"")
    metric = Metric("psnr", "PSNR (dB)", True, 2)
    points = pd.DataFrame(
        {
            "group": "",
            "defense": ["none", "sign", "prune:0.9"],
            "attack": "ig",
            "accuracy": 0.5,
            "accuracy_low": 0.5,
            "accuracy_high": 0.5,
            "epsilon": np.nan,
            "central_epsilon": np.nan,
            "not_converged": False,
            "psnr": [30.0, 10.0, 12.0],
            "psnr_low": [29.0, 9.0, 11.0],
            "psnr_high": [31.0, 11.0, 13.0],
            "psnr_floor": [12.1, 12.1, 13.5],  # prune's own floor differs
        }
    )
    plots.frontier_figure(points, [metric])
    dashed = [line for line in drawn[0].axes[0].lines if line.get_linestyle() == "--"]
    assert sorted(float(line.get_xdata()[0]) for line in dashed) == [12.1, 13.5]
    colour = {float(line.get_xdata()[0]): line.get_color() for line in dashed}
    assert colour[12.1] == plots.SHARED_FLOOR_GREY and colour[13.5] != plots.SHARED_FLOOR_GREY


def test_a_bounded_measure_of_zeros_is_drawn_on_its_own_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ROUGE-L at 0 in every round was drawn on an axis from -0.04 to 0.04, below the range
    a ROUGE score can take (audit CT4)."""
    from fedleak.report.tables import METRICS

    rouge = next(m for m in METRICS if m.column == "rougeL")
    drawn: list[Figure] = []
    monkeypatch.setattr(plots, "_png", lambda figure: drawn.append(figure) or b"")
    leakage = pd.DataFrame(
        {"round": [1, 1, 2, 2], "rougeL": 0.0, "group": "", "defense": "none"}
    ).assign(attack="tag", reference=False)
    utility = pd.DataFrame(
        {"round": [0, 1, 2], "test_accuracy": 0.1, "group": "", "defense": "none"}
    )
    plots.rounds_figure(leakage, utility, [rouge], success=False)
    assert drawn[0].axes[0].get_ylim() == (-0.03, 1.03)
    plt.close("all")


def test_the_frontier_draws_a_bounded_measure_on_its_own_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A text sweep's frontier drew token accuracy at 0 on an axis from -0.055 (audit CW5)."""
    from fedleak.report.tables import METRICS

    drawn: list[Figure] = []
    monkeypatch.setattr(plots, "_png", lambda figure: drawn.append(figure) or b"")
    metric = next(m for m in METRICS if m.column == "token_acc")
    points = pd.DataFrame(
        {
            "group": "",
            "defense": ["none", "sign"],
            "attack": "tag",
            "accuracy": 0.1,
            "epsilon": np.nan,
            "central_epsilon": np.nan,
            "not_converged": False,
            "token_acc": 0.0,
        }
    )
    plots.frontier_figure(points, [metric])
    assert drawn[0].axes[0].get_xlim() == (-0.03, 1.03)
    plt.close("all")
