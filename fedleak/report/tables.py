"""The report's tables: leakage in the papers' layout (attacks x defenses, mean ± 95% CI), utility,
failures and attack cost, computed with pandas from the tidy frames of a study.

Confidence intervals are Student-t intervals, mean ± t(0.975, n-1) · s / sqrt(n), over the
successfully scored reconstructed samples of a cell, pooled over clients, rounds and seeds
(samples treated as independent draws); a cell with one sample shows its mean alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from fedleak.report.collect import Study
from fedleak.report.document import Cell, Table


@dataclass(frozen=True)
class Metric:
    """How a leakage column is labelled, which direction is better, and its decimals."""

    column: str
    label: str
    higher_is_better: bool
    digits: int


METRICS: tuple[Metric, ...] = (
    Metric("psnr", "PSNR (dB)", True, 2),
    Metric("ssim", "SSIM", True, 3),
    Metric("lpips_alex", "LPIPS (AlexNet)", False, 3),
    Metric("lpips_vgg", "LPIPS (VGG)", False, 3),
    Metric("mse", "MSE", False, 4),
    Metric("label_acc", "label accuracy", True, 3),
    # The language task (the LTI paper's Table 2 reports these in %).
    Metric("token_acc", "token accuracy", True, 3),
    Metric("rouge1", "ROUGE-1", True, 3),
    Metric("rouge2", "ROUGE-2", True, 3),
    Metric("rougeL", "ROUGE-L", True, 3),
)
# The two metrics per modality that figures show: PSNR and LPIPS for images, token accuracy
# and ROUGE-L for text.
TEXT_FIGURE_METRICS = ("token_acc", "rougeL")

SCORED_AGAINST = {
    "original": "scored against the private originals",
    "encoded": "scored against the encoded images the gradient was computed on (MixUp/InstaHide "
    "encodings, shown as |x|): how well the attack inverts the encoding's input, not the "
    "private data",
}


def mean_ci(values: np.ndarray | pd.Series) -> tuple[float, float, int]:
    """(mean, half-width of the 95% Student-t interval, n) of the finite values."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    n = int(array.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(array.mean())
    if n == 1:
        return mean, math.nan, 1
    half = float(stats.t.ppf(0.975, n - 1) * array.std(ddof=1) / math.sqrt(n))
    return mean, half, n


def format_ci(mean: float, half: float, digits: int) -> str:
    """`12.34 ± 0.56`; the mean alone when there is no interval; `–` without data."""
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def scored(leakage: pd.DataFrame) -> pd.DataFrame:
    """Rows with a successful reconstruction (failed attack runs carry no metrics)."""
    return leakage[leakage["status"] == "ok"]


def metrics_present(leakage: pd.DataFrame) -> list[Metric]:
    """The metrics with at least one finite value."""
    ok = scored(leakage)
    return [m for m in METRICS if m.column in ok and np.isfinite(ok[m.column]).any()]


def _best(means: dict[str, float], metric: Metric) -> set[str]:
    finite = {k: v for k, v in means.items() if not math.isnan(v)}
    if len(finite) < 2:
        return set()
    target = max(finite.values()) if metric.higher_is_better else min(finite.values())
    return {k for k, v in finite.items() if v == target}


def leakage_table(
    rows: pd.DataFrame, metric: Metric, defenses: list[str], groups: list[str], caption: str
) -> Table:
    """Rows: attacks (in blocks per group); columns: defenses; cells: mean ± 95% CI.

    Within each group and column the attack that leaks most (highest PSNR/SSIM/label
    accuracy, lowest MSE/LPIPS), i.e. the strongest attack against that defense, is bold.
    """
    attacks = sorted(rows["attack"].unique())
    columns = [d for d in defenses if d in set(rows["defense"])]
    grouped = groups != [""]
    body = []
    for group in groups:
        sub = rows[rows["group"] == group]
        cells = {
            (a, d): mean_ci(sub.loc[(sub["attack"] == a) & (sub["defense"] == d), metric.column])
            for a in attacks
            for d in columns
        }
        best = {d: _best({a: cells[a, d][0] for a in attacks}, metric) for d in columns}
        for attack in attacks:
            if all(cells[attack, d][2] == 0 for d in columns):
                continue
            row = [Cell(group)] if grouped else []
            row.append(Cell(attack))
            for d in columns:
                mean, half, n = cells[attack, d]
                text = format_ci(mean, half, metric.digits)
                row.append(Cell(text, bold=attack in best[d], title=f"n={n}"))
            body.append(tuple(row))
    header = ("group", "attack") if grouped else ("attack",)
    return Table(columns=(*header, *columns), rows=tuple(body), caption=caption)


def leakage_tables(study: Study) -> list[tuple[Metric, str, Table]]:
    """(metric, scored_against, table) for every metric and scoring target with data."""
    leakage = scored(study.leakage())
    defenses, groups = study.defenses(), study.groups()
    out = []
    direction = {True: "higher = more leakage", False: "lower = more leakage"}
    for metric in metrics_present(leakage):
        for against in ("original", "encoded"):
            rows = leakage[leakage["scored_against"] == against]
            rows = rows[np.isfinite(rows[metric.column])]
            if rows.empty:
                continue
            caption = (
                f"{metric.label} ({direction[metric.higher_is_better]}), "
                f"{SCORED_AGAINST[against]}. Mean ± 95% t-interval over reconstructed samples, "
                "clients, rounds and seeds; bold: the strongest attack per defense"
                f"{' within each group' if groups != [''] else ''}; hover a cell for n."
            )
            out.append((metric, against, leakage_table(rows, metric, defenses, groups, caption)))
    return out


def final_utility(study: Study) -> pd.DataFrame:
    """Per run: the last recorded round's accuracy, loss and ε, and total times."""
    utility = study.utility()
    if utility.empty:
        return utility
    last = utility.sort_values("round").groupby("run", sort=False).tail(1).set_index("run")
    totals = utility.groupby("run")[["round_seconds", "attack_seconds"]].sum(min_count=1)
    return last.join(totals.add_suffix("_total"))


def utility_table(study: Study) -> Table:
    """Per group and defense: final accuracy and loss (mean ± CI over seeds), ε, central ε where
    any run has it, rounds."""
    final = final_utility(study)
    central = bool(final["central_epsilon"].notna().any())
    body = []
    for group in study.groups():
        for defense in study.defenses():
            runs = final[(final["group"] == group) & (final["defense"] == defense)]
            if runs.empty:
                continue
            epsilons = [runs["epsilon"].dropna()]
            if central:
                epsilons.append(runs["central_epsilon"].dropna())
            body.append(
                (
                    Cell(group or "–"),
                    Cell(defense),
                    Cell(format_ci(*mean_ci(runs["test_accuracy"])[:2], 3)),
                    Cell(format_ci(*mean_ci(runs["test_loss"])[:2], 3)),
                    *(Cell(f"{eps.mean():.2f}" if len(eps) else "–") for eps in epsilons),
                    Cell(", ".join(str(int(r)) for r in sorted(set(runs["round"])))),
                    Cell(str(len(runs))),
                )
            )
    epsilon_columns = ("ε", "central ε") if central else ("ε",)
    return Table(
        columns=(
            "group",
            "defense",
            "final accuracy",
            "final loss",
            *epsilon_columns,
            "rounds",
            "runs",
        ),
        rows=tuple(body),
        caption="The global model after the last recorded round, on the held-out test split; "
        "mean ± 95% t-interval over seeds where a setting ran with several. ε: example-level, "
        "DP-SGD on the clients; central ε: client-level, central DP on the released model, "
        "which does not bound what the server saw.",
    )


def failure_table(study: Study) -> Table | None:
    """Attack runs that did not finish cleanly, by group, attack, defense and status."""
    leakage = study.leakage()
    runs = leakage.drop_duplicates(["run", "round", "client_id", "attack"])
    bad = runs[runs["status"] != "ok"]
    if bad.empty:
        return None
    body = []
    for (group, attack, defense, status), rows in bad.groupby(
        ["group", "attack", "defense", "status"], sort=True
    ):
        total = runs[
            (runs["group"] == group) & (runs["attack"] == attack) & (runs["defense"] == defense)
        ]
        example = next((m for m in rows["message"] if m), "")
        body.append(
            (
                Cell(group or "–"),
                Cell(attack),
                Cell(defense),
                Cell(status),
                Cell(f"{len(rows)} of {len(total)}"),
                Cell(example[:120]),
            )
        )
    return Table(
        columns=("group", "attack", "defense", "status", "attack runs", "first message"),
        rows=tuple(body),
        caption="An attack run is one attack on one client in one round; failed runs are "
        "left out of the leakage tables.",
    )


def cost_table(study: Study) -> Table:
    """Per attack: attack runs, mean seconds and iterations per run, from the leakage rows."""
    leakage = study.leakage()
    runs = leakage.drop_duplicates(["run", "round", "client_id", "attack"])
    body = []
    for attack, rows in runs.groupby("attack", sort=True):
        iterations = rows.loc[rows["iterations"] >= 0, "iterations"]
        body.append(
            (
                Cell(attack),
                Cell(str(len(rows))),
                Cell(format_ci(*mean_ci(rows["seconds"])[:2], 2)),
                Cell(f"{iterations.mean():.0f}" if len(iterations) else "–"),
                Cell(f"{rows['seconds'].sum():.1f}"),
            )
        )
    return Table(
        columns=("attack", "attack runs", "seconds per run", "iterations per run", "total seconds"),
        rows=tuple(body),
        caption="Wall-clock time of each attack run on the server (mean ± 95% t-interval).",
    )


def training_table(study: Study) -> Table | None:
    """Per run, round and learned attack: the training its refresh did (epochs, seconds,
    validation PSNR or token accuracy, warm start), from the attacks' diagnostics; None without
    learned attacks."""
    runs = study.leakage().drop_duplicates(["run", "round", "client_id", "attack"])
    body = []
    for (run, server_round, attack), rows in runs.groupby(["run", "round", "attack"], sort=True):
        trained = [d for d in map(_diagnostics, rows["diagnostics"]) if "train_epochs" in d]
        if not trained:
            continue
        epochs = sum(d["train_epochs"] for d in trained)
        seconds = sum(d.get("train_seconds", 0.0) for d in trained)
        val_psnr = trained[-1].get("val_psnr", math.nan)
        val_acc = trained[-1].get("val_token_acc", math.nan)
        validation = (
            f"{val_psnr:.2f} dB"
            if not math.isnan(val_psnr)
            else "–"
            if math.isnan(val_acc)
            else f"token acc {val_acc:.3f}"
        )
        warm = any(d.get("warm_start", 0.0) > 0 for d in trained)
        body.append(
            (
                Cell(str(run)),
                Cell(str(server_round)),
                Cell(attack),
                Cell(f"{epochs:.0f}"),
                Cell(f"{seconds:.1f}"),
                Cell(validation),
                Cell("reused" if epochs == 0 else "warm start" if warm else "from scratch"),
            )
        )
    if not body:
        return None
    return Table(
        columns=("run", "round", "attack", "epochs", "train seconds", "validation", "how"),
        rows=tuple(body),
        caption="Learned attacks refresh their inverter as the global model changes: the "
        "training each round cost (summed over the round's attack runs) and the validation "
        "score on held-out auxiliary data after it (PSNR for images, token accuracy for text; "
        "LTI-P validates on held-out pseudo-sequences).",
    )


def _diagnostics(text: str) -> dict[str, float]:
    return json.loads(text) if text else {}


def runs_table(study: Study) -> Table:
    """Per run: group, defense, seed, rounds finished of configured, time; status in a sweep."""
    final = final_utility(study)
    cells = {c["id"]: c for c in (study.manifest or {}).get("cells", [])}
    body = []
    for run in study.runs:
        done = int(final.loc[run.name, "round"]) if run.name in final.index else 0
        seconds = (
            final.loc[run.name, "round_seconds_total"] if run.name in final.index else math.nan
        )
        status = cells.get(run.name, {}).get(
            "status", "done" if done >= run.config.num_server_rounds else "unfinished"
        )
        body.append(
            (
                Cell(run.name),
                Cell(study.group_of(run) or "–"),
                Cell(run.config.defense.spec),
                Cell(str(run.config.seed)),
                Cell(f"{done} / {run.config.num_server_rounds}"),
                Cell("–" if math.isnan(seconds) else f"{seconds:.1f}"),
                Cell(str(run.environment.get("created", "–"))),
                Cell(status),
            )
        )
    listed = {r.name for r in study.runs}
    for cell_id, cell in cells.items():
        if cell_id not in listed:
            body.append(
                (
                    Cell(cell_id),
                    Cell("–"),
                    Cell("–"),
                    Cell("–"),
                    Cell("0"),
                    Cell("–"),
                    Cell("–"),
                    Cell(f"{cell.get('status')} {cell.get('message') or ''}".strip()),
                )
            )
    return Table(
        columns=("run", "group", "defense", "seed", "rounds", "round seconds", "started", "status"),
        rows=tuple(body),
        caption="Round seconds: the sum of the recorded rounds' wall-clock times (training, "
        "evaluation and attacks).",
    )
