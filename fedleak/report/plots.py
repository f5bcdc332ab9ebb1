"""The report's figures, drawn with matplotlib's headless Agg backend into PNG bytes.

Leakage per round shares its axes: every attack is a line in the same panel (one colour per
attack, the same in every figure), reference baselines are grey floor lines (one dash style
each), and each metric's panels share one y-axis, so an attack below the floor cannot hide on
its own scale.
"""

from __future__ import annotations

import io
import itertools
import textwrap
from collections.abc import Hashable, Sequence

import matplotlib

matplotlib.use("Agg")  # reports are built on servers and in CI: never open a window

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fedleak.report.stats import median_interval, success_rate
from fedleak.report.tables import Metric, attack_label, attack_order

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Settings side by side in the per-round figure; more are drawn as lines per attack panel.
# Six columns made a figure 2,400 px wide, shown at half size in the page: its labels were
# 4-5 px tall (audit BO5). Four keep it within 1,600 px.
MAX_SETTING_COLUMNS = 4
# Interval bands are drawn only while they stay readable.
MAX_BANDS = 4
# Characters of a bold 9.5-point panel title that fit the panel's 3.6 inches.
TITLE_CHARACTERS = 36
FLOOR_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.4}
# Two floors (aux-mean, class-mean) in one panel must be told apart, and may cross.
FLOOR_LINES = ("--", ":", "-.")
# An attack's marker in the frontier's legend: neither a setting's colour nor hollow.
ATTACK_KEY_GREY = "0.6"
# A floor several settings share, in the privacy-utility figure.
SHARED_FLOOR_GREY = "0.35"
# A measure in [0, 1] on its axis, with a margin so that points at 0 and 1 show whole.
UNIT_LIMITS = (-0.03, 1.03)
SUCCESS = Metric("success", "success rate (%)", True, 0)

Setting = tuple[str, str]  # (group, defense)


def floor_style(references: Sequence[str], reference: str) -> dict[str, object]:
    """The floor's line: grey, dashed, dotted or dash-dotted by its place among `references`."""
    line = FLOOR_LINES[list(references).index(reference) % len(FLOOR_LINES)]
    return {**FLOOR_STYLE, "linestyle": line, "label": attack_label(reference, True)}


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


def _settings(*frames: pd.DataFrame, order: Sequence[Setting] = ()) -> list[Setting]:
    """The settings the frames hold, in `order` (the study's: groups, then defenses)."""
    seen: dict[Setting, None] = {}
    for frame in frames:
        seen.update(dict.fromkeys(zip(frame["group"], frame["defense"], strict=True)))
    rank = {setting: index for index, setting in enumerate(order)}
    return sorted(seen, key=lambda setting: rank.get(setting, len(rank)))


def _per_round(rows: pd.DataFrame, metric: Metric) -> tuple[np.ndarray, ...]:
    """Rounds, medians and interval bounds (success: the rate and its exact interval, in %)."""
    stats = []
    for server_round, group in rows.groupby("round"):
        if metric is SUCCESS:
            rate = success_rate(group["success"])
            if rate.n:
                stats.append((server_round, 100 * rate.value, 100 * rate.low, 100 * rate.high))
        else:
            median = median_interval(group[metric.column])
            if median.n:
                stats.append((server_round, median.value, median.low, median.high))
    if not stats:
        return (np.array([]),) * 4
    return tuple(np.array(v, dtype=float) for v in zip(*stats, strict=True))


def _line(ax, rows: pd.DataFrame, metric: Metric, style: dict, band: bool) -> None:
    x, mid, low, high = _per_round(rows, metric)
    if not len(x):
        return
    if len(x) == 1 and "marker" not in style:
        # One attacked round (e.g. a one-round FedSGD table): a line of one point without a
        # marker draws nothing, so a floor becomes a short level segment across its round.
        ax.hlines(mid, x - 0.3, x + 0.3, **style)
        return
    ax.plot(x, mid, **{"markersize": 3.5, **style})
    if band and len(x) > 1:
        ax.fill_between(x, low, high, color=style.get("color"), alpha=0.12, linewidth=0)
    elif band:
        yerr = [mid - low, high - mid]
        ax.errorbar(x, mid, yerr=yerr, fmt="none", color=style.get("color"), capsize=3, alpha=0.6)


def _nested(keys: Sequence[Hashable]) -> dict[Hashable, dict[str, float]]:
    """Line width and marker size per line, widest first: lines drawn later sit on top, so
    lines with equal values (two attacks at the floor, settings alike) show as nested strokes
    instead of the last one hiding the others."""
    last = max(len(keys) - 1, 1)
    return {
        key: {
            "linewidth": 1.3 + 2.2 * (len(keys) - 1 - k) / last,
            "markersize": 3.5 + 4.0 * (len(keys) - 1 - k) / last,
        }
        for k, key in enumerate(keys)
    }


def accuracy_top(accuracies: Sequence[float]) -> float:
    """The top of the accuracy axis: 1, or for small accuracies (a language model's next-token
    accuracy of 0.006) the next of 1, 2, 2.5, 5 x 10^k at least 10% above the largest, so the
    curve does not lie flat on the axis."""
    finite = [a for a in accuracies if np.isfinite(a)]
    highest = max(finite, default=0.0)
    if highest <= 0:
        return 1.0
    wanted = 1.1 * highest
    decade = 10.0 ** np.floor(np.log10(wanted))
    nice = next(decade * m for m in (1, 2, 2.5, 5, 10) if decade * m >= wanted)
    return float(min(1.0, nice))


def rounds_figure(
    leakage: pd.DataFrame,
    utility: pd.DataFrame,
    metrics: list[Metric],
    success: bool = True,
    setting_order: Sequence[Setting] = (),
    text: bool = False,
) -> bytes:
    """Leakage per round: one row of panels per metric (success rate first when `success`),
    sharing its y-axis, with test accuracy in the last row (from 0 to 1, or to
    `accuracy_top` when every accuracy is small).

    Up to MAX_SETTING_COLUMNS settings (group, defense) are columns and attacks are lines;
    beyond that, attacks are columns and settings are lines. `leakage` holds scored rows
    against the originals with `group`, `reference` and (for the success row) `success`;
    `utility` the utility rows with `group` and `defense`; `setting_order` the study's
    settings, which give each its colour (the same in every figure of a report); `text`
    whether the study's data are token sequences (its test split is of sequences).
    """
    settings = _settings(utility, leakage, order=setting_order)
    order = attack_order(leakage)
    attacks = [a for a, ref in order if not ref]
    references = [a for a, ref in order if ref]
    rows_metrics = ([SUCCESS] if success and "success" in leakage else []) + list(metrics)
    by_setting = len(settings) <= MAX_SETTING_COLUMNS
    columns = settings if by_setting else attacks or ["–"]
    colors = _palette(attacks) if by_setting else _palette(list(setting_order) or settings)
    markers = dict(zip(attacks, itertools.cycle(_MARKERS), strict=False))
    widths = _nested(attacks if by_setting else settings)
    n_rows, n_cols = len(rows_metrics) + 1, max(len(columns), 1)
    figure, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(max(3.6 * n_cols, 7.5), 2.5 * n_rows),
        sharex=True,
        sharey="row",
        squeeze=False,
    )
    for i, metric in enumerate(rows_metrics):
        for j, column in enumerate(columns):
            ax = axes[i, j]
            if by_setting:
                group, defense = column
                here = leakage[(leakage["group"] == group) & (leakage["defense"] == defense)]
                for attack in attacks:
                    style = {
                        "color": colors[attack],
                        "marker": markers[attack],
                        "label": attack,
                        **widths[attack],
                    }
                    _line(ax, here[here["attack"] == attack], metric, style, len(attacks) <= 3)
                if metric is not SUCCESS:
                    for reference in references:
                        rows = here[here["attack"] == reference]
                        _line(ax, rows, metric, floor_style(references, reference), False)
                # Wrapped to the panel's width: long group labels would run into the next one.
                title = textwrap.fill(
                    setting_label(group, defense), TITLE_CHARACTERS, break_on_hyphens=False
                )
            else:
                for setting in settings:
                    here = leakage[
                        (leakage["group"] == setting[0])
                        & (leakage["defense"] == setting[1])
                        & (leakage["attack"] == column)
                    ]
                    style = {"color": colors[setting], "marker": "o", **widths[setting]}
                    _line(ax, here, metric, style, len(settings) <= MAX_BANDS)
                    if metric is SUCCESS:
                        continue
                    # Each setting's own floor, in its colour: floors differ between data
                    # sets and defenses, so one pooled line would be no setting's floor.
                    for reference in references:
                        rows = leakage[
                            (leakage["group"] == setting[0])
                            & (leakage["defense"] == setting[1])
                            & (leakage["attack"] == reference)
                        ]
                        floor = {**floor_style(references, reference), "color": colors[setting]}
                        _line(ax, rows, metric, {**floor, "alpha": 0.7}, False)
                title = column
            if metric is SUCCESS:
                ax.set_ylim(-3, 103)
            elif metric.unit_range:
                ax.set_ylim(*UNIT_LIMITS)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(title, fontsize=9.5, loc="left", fontweight="bold")
            if j == 0:
                better = "higher" if metric.higher_is_better else "lower"
                ax.set_ylabel(f"{metric.label}\n({better} = more leakage)", fontsize=8.5)
    top = accuracy_top(utility["test_accuracy"].tolist())
    measured = bool(np.isfinite(utility["test_accuracy"].to_numpy(dtype=float)).any())
    # A text run without a row still says what it lacks (audit ER1).
    tokens = "modality" in leakage.columns and bool(leakage["modality"].eq("tokens").any())
    text = text or tokens
    for j, column in enumerate(columns):
        ax = axes[-1, j]
        if not measured:  # a data set without a test split: say so rather than draw nothing
            ax.text(
                0.5,
                0.5,
                f"not measured\n(no test {'sequences' if text else 'images'})",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="grey",
                fontsize=8.5,
            )
        wanted = [column] if by_setting else settings
        for setting in wanted:
            sub = utility[(utility["group"] == setting[0]) & (utility["defense"] == setting[1])]
            if not sub.empty:
                acc = sub.groupby("round")["test_accuracy"].mean()
                color = "black" if by_setting else colors[setting]
                ax.plot(acc.index, acc.values, "-", marker="o", markersize=3, color=color)
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
        ax.set_xlabel("round")
        if j == 0:
            zoomed = f"\n(fraction, axis to {top:g})" if top < 1 else ""
            ax.set_ylabel(f"global model\ntest accuracy{zoomed}", fontsize=8.5)
    rounds = sorted(set(utility["round"]) | set(leakage["round"]))
    if 0 < len(rounds) <= 16:
        axes[-1, 0].set_xticks(rounds)
    else:
        axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)
    if len(rounds) == 1:
        axes[-1, 0].set_xlim(rounds[0] - 1, rounds[0] + 1)
    # A row shares its y axis: the first column's labels read for all, where labels 5 or 6
    # characters wide on every panel ran into the panel on their left (audit ES1).
    for ax in axes.flat:
        ax.tick_params(labelbottom=True, labelleft=False, labelsize=8)
    for ax in axes[:, 0]:
        ax.tick_params(labelleft=True)
    if by_setting:
        handles = [
            Line2D([], [], color=colors[a], marker=markers[a], label=a, **widths[a])
            for a in attacks
        ]
    else:
        handles = [
            Line2D([], [], color=colors[s], marker="o", label=setting_label(*s), **widths[s])
            for s in settings
        ]
    handles += [Line2D([], [], **floor_style(references, r)) for r in references]
    figure.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 0.98),
        fontsize=8.5,
        frameon=False,
        title="attack" if by_setting else "setting",
        title_fontsize=8.5,
    )
    # Fixed spacing instead of tight_layout, which costs as much as drawing the figure twice.
    figure.subplots_adjust(left=0.1, right=0.98, bottom=0.06, top=0.95, wspace=0.12, hspace=0.35)
    return _png(figure)


def attack_key(attack: str, marker: str) -> Line2D:
    """The legend's key to an attack's marker: filled grey, since a hollow point means that
    the attack's runs did not converge."""
    return Line2D(
        [],
        [],
        linestyle="",
        marker=marker,
        markersize=7,
        color=ATTACK_KEY_GREY,
        markeredgecolor="black",
        label=f"attack: {attack}",
    )


def frontier_figure(
    points: pd.DataFrame, metrics: list[Metric], setting_order: Sequence[Setting] = ()
) -> bytes:
    """Final accuracy against median leakage: one point per setting (colour) and attack
    (shape), with the median's interval and the accuracy's range over runs as bars, each
    setting's best floor dashed, and hollow points where attack runs did not converge.

    `points` has columns group, defense, attack, accuracy (with accuracy_low / _high),
    epsilon, central_epsilon, not_converged and, per metric column, the value, its `_low`,
    `_high` and `_floor`; `setting_order` as for `rounds_figure`.
    """
    settings = _settings(points, order=setting_order)
    colors = _palette(list(setting_order) or settings)
    attacks = sorted(points["attack"].unique())
    markers = dict(zip(attacks, itertools.cycle(_MARKERS), strict=False))
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        column = metric.column
        floors = points.drop_duplicates(["group", "defense"])
        if f"{column}_floor" in floors:
            # Settings of one group share their floor (it ignores the defense): one grey line,
            # not coloured lines on top of each other of which only the last shows.
            for floor, sharing in floors.groupby(f"{column}_floor"):
                if np.isfinite(floor):
                    only = len(sharing) == 1
                    row = sharing.iloc[0]
                    color = colors[row["group"], row["defense"]] if only else SHARED_FLOOR_GREY
                    ax.axvline(
                        floor, color=color, linestyle="--", linewidth=0.9, alpha=0.7, zorder=1
                    )
        for _, row in points.iterrows():
            x, y = row[column], row["accuracy"]
            if np.isnan(x):
                continue
            color = colors[row["group"], row["defense"]]
            low, high = row.get(f"{column}_low", x), row.get(f"{column}_high", x)
            ax.errorbar(
                x,
                y,
                xerr=[[max(x - low, 0.0)], [max(high - x, 0.0)]],
                yerr=[[y - row.get("accuracy_low", y)], [row.get("accuracy_high", y) - y]],
                fmt="none",
                ecolor=color,
                elinewidth=1.0,
                alpha=0.7,
                zorder=2,
            )
            ax.scatter(
                x,
                y,
                marker=markers[row["attack"]],
                s=46,
                color="white" if row.get("not_converged", False) else color,
                edgecolor=color if row.get("not_converged", False) else "black",
                linewidth=1.2 if row.get("not_converged", False) else 0.4,
                zorder=3,
            )
        private = "left" if metric.higher_is_better else "right"
        ax.set_xlabel(f"{metric.label} (median over samples)")
        ax.set_ylabel("final test accuracy")
        ax.set_title(f"more private to the {private}, more useful up", fontsize=9, loc="left")
        if metric.unit_range:
            ax.set_xlim(*UNIT_LIMITS)
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
    handles += [attack_key(a, markers[a]) for a in attacks]
    figure.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8, frameon=False
    )
    figure.tight_layout()
    return _png(figure)
