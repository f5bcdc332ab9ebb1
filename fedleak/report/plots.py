"""The report's figures, drawn with matplotlib's headless Agg backend into PNG bytes.

Colours stand for settings (group and defense), marker shapes for attacks, the same in
every figure of a report.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Hashable, Sequence

import matplotlib

matplotlib.use("Agg")  # reports are built on servers and in CI: never open a window

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fedleak.report.tables import Metric, mean_ci

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Confidence bands are drawn only while they stay readable.
MAX_BANDS = 4

Setting = tuple[str, str]  # (group, defense)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def setting_label(group: str, defense: str) -> str:
    """`batch-size=4 · prune:0.9`, or the defense alone when there are no groups."""
    return f"{group} · {defense}" if group else defense


def _palette(keys: Sequence[Hashable]) -> dict[Hashable, object]:
    cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    return {k: cmap(i % cmap.N) for i, k in enumerate(keys)}


def _settings(*frames: pd.DataFrame) -> list[Setting]:
    seen: dict[Setting, None] = {}
    for frame in frames:
        seen.update(dict.fromkeys(zip(frame["group"], frame["defense"], strict=True)))
    return list(seen)


def rounds_figure(leakage: pd.DataFrame, utility: pd.DataFrame, metrics: list[Metric]) -> bytes:
    """Leakage per round: one panel per metric (rows) and attack (columns), one line per
    setting, with the global model's test accuracy per round underneath.

    `leakage` holds successfully scored rows with a `group` column; `utility` the utility
    rows with `group` and `defense`.
    """
    settings = _settings(utility, leakage)
    colors = _palette(settings)
    attacks = sorted(leakage["attack"].unique()) or ["–"]
    bands = len(settings) <= MAX_BANDS
    rows, cols = len(metrics) + 1, len(attacks)
    figure = plt.figure(figsize=(max(4.2 * cols, 8), 2.7 * rows))
    grid = figure.add_gridspec(rows, cols)
    accuracy = figure.add_subplot(grid[rows - 1, :])
    panels = [accuracy]
    for (i, metric), (j, attack) in itertools.product(enumerate(metrics), enumerate(attacks)):
        ax = figure.add_subplot(grid[i, j], sharex=accuracy)
        panels.append(ax)
        for setting in settings:
            sub = leakage[
                (leakage["group"] == setting[0])
                & (leakage["defense"] == setting[1])
                & (leakage["attack"] == attack)
            ]
            if sub.empty:
                continue
            stats = [(r, *mean_ci(g[metric.column])[:2]) for r, g in sub.groupby("round")]
            x, mean, half = (np.array(v, dtype=float) for v in zip(*stats, strict=True))
            ax.plot(x, mean, "-", marker="o", markersize=3, color=colors[setting])
            if bands:
                band = np.nan_to_num(half)
                ax.fill_between(
                    x, mean - band, mean + band, color=colors[setting], alpha=0.15, linewidth=0
                )
        better = "higher" if metric.higher_is_better else "lower"
        ax.set_title(f"{attack}: {metric.label} ({better} = more leakage)", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    ax = accuracy
    for setting in settings:
        sub = utility[(utility["group"] == setting[0]) & (utility["defense"] == setting[1])]
        if not sub.empty:
            acc = sub.groupby("round")["test_accuracy"].mean()
            ax.plot(acc.index, acc.values, "-", marker="o", markersize=3, color=colors[setting])
    ax.set_title("global model test accuracy (mean over seeds)", fontsize=9, loc="left")
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    rounds = sorted(set(utility["round"]) | set(leakage["round"]))
    if 0 < len(rounds) <= 16:
        accuracy.set_xticks(rounds)
    else:
        accuracy.xaxis.get_major_locator().set_params(integer=True)
    if len(rounds) == 1:
        accuracy.set_xlim(rounds[0] - 1, rounds[0] + 1)
    for ax in panels:
        ax.tick_params(labelbottom=True)
    handles = [
        Line2D([], [], color=colors[s], marker="o", markersize=4, label=setting_label(*s))
        for s in settings
    ]
    figure.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 0.98),
        fontsize=8,
        frameon=False,
        title="setting",
        title_fontsize=8,
    )
    figure.tight_layout()
    return _png(figure)


def frontier_figure(points: pd.DataFrame, metrics: list[Metric]) -> bytes:
    """Final accuracy against mean leakage: one point per setting (colour) and attack (shape).

    `points` has columns group, defense, attack, accuracy, epsilon, central_epsilon and one per
    metric column.
    """
    settings = _settings(points)
    colors = _palette(settings)
    attacks = sorted(points["attack"].unique())
    markers = dict(zip(attacks, itertools.cycle(_MARKERS), strict=False))
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for _, row in points.iterrows():
            if np.isnan(row[metric.column]):
                continue
            ax.scatter(
                row[metric.column],
                row["accuracy"],
                marker=markers[row["attack"]],
                s=46,
                color=colors[row["group"], row["defense"]],
                edgecolor="black",
                linewidth=0.4,
                zorder=3,
            )
        private = "left" if metric.higher_is_better else "right"
        ax.set_xlabel(f"{metric.label} (mean over samples)")
        ax.set_ylabel("final test accuracy")
        ax.set_title(f"more private to the {private}, more useful up", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    epsilons = points.groupby(["group", "defense"], sort=False)[
        ["epsilon", "central_epsilon"]
    ].mean()
    handles = []
    for setting in settings:
        label = setting_label(*setting)
        shown = [
            f"{name}={epsilons.loc[setting, column]:.3g}"
            for column, name in (("epsilon", "ε"), ("central_epsilon", "central ε"))
            if setting in epsilons.index and not np.isnan(epsilons.loc[setting, column])
        ]
        if shown:
            label += f" ({', '.join(shown)})"
        handles.append(
            Line2D(
                [], [], linestyle="", marker="o", markersize=7, color=colors[setting], label=label
            )
        )
    handles += [
        Line2D(
            [],
            [],
            linestyle="",
            marker=markers[a],
            markersize=7,
            color="white",
            markeredgecolor="black",
            label=f"attack: {a}",
        )
        for a in attacks
    ]
    figure.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8, frameon=False
    )
    figure.tight_layout()
    return _png(figure)
