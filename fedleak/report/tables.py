"""The report's tables: leakage in the papers' layout (attacks x defenses), the success rate per
attack, a summary per setting, utility, failures and attack cost, from a study's tidy frames.

Leakage cells show the median with its order-statistic 95% interval and n (`stats`); the mean
appears only where it is meaningful (LPIPS and token accuracy, bounded; not dB or MSE, where
exact reconstructions dominate any mean). Reference baselines (aux-mean) are the
floor: listed last, labelled, never marked strongest. Within a column the strongest attack is
bold only when its 95% interval (6 samples or more) overlaps no other attack's and its median
beats every floor's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from fedleak.lines import one_line
from fedleak.metrics import multiset_chance
from fedleak.report.collect import Study
from fedleak.report.document import Cell, Table
from fedleak.report.rundir import NO_EPSILON_KEY, lpips_column
from fedleak.report.stats import (
    SUCCESS_FRACTION,
    SUCCESS_LPIPS,
    Median,
    Rate,
    finite,
    floor_values,
    format_ci,
    mean_ci,
    median_interval,
    passes_range,
    success_rate,
    successes,
    unmatched,
)

__all__ = ["METRICS", "Metric", "format_ci", "mean_ci"]


@dataclass(frozen=True)
class Metric:
    """How a leakage column is labelled, which direction leaks more, and its decimals. A
    `share` holds 0 or 1 per sample (a label right or wrong): its median can only be 0, 0.5 or
    1, so tables give the share k/n with its exact interval instead."""

    column: str
    label: str
    higher_is_better: bool
    digits: int
    share: bool = False
    # A measure in [0, 1] (token accuracy, ROUGE, a share): its panels span that range, so a
    # run of zeros is not drawn on an axis that runs below 0.
    unit_range: bool = False


METRICS: tuple[Metric, ...] = (
    Metric("psnr", "PSNR (dB)", True, 2),
    Metric("ssim", "SSIM", True, 3),
    Metric("lpips_alex", "LPIPS (AlexNet)", False, 3),
    Metric("lpips_vgg", "LPIPS (VGG)", False, 3),
    Metric("mse", "MSE", False, 4),
    Metric("label_acc", "label accuracy", True, 3, share=True, unit_range=True),
    # The language task (the LTI paper's Table 2 reports these in %); all bounded in [0, 1].
    Metric("token_acc", "token accuracy", True, 3, unit_range=True),
    Metric("rouge1", "ROUGE-1", True, 3, unit_range=True),
    Metric("rouge2", "ROUGE-2", True, 3, unit_range=True),
    Metric("rougeL", "ROUGE-L", True, 3, unit_range=True),
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

ENCODED_LABELS = (
    "scored against the private originals' labels; under MixUp or InstaHide against each "
    "encoded sample's own label (the class carrying most of its mixed label), whatever private "
    "image the reconstruction resembles"
)

FLOOR = "floor"
NOT_CONVERGED = "†"
INTERVAL_NOTE = (
    "Median [95% order-statistic interval] and n over scored samples, pooled over "
    "clients, rounds and seeds (for n < 6 the bracket is the sample range, coverage 1 - 2^(1-n))"
)

SHARE_NOTE = (
    "Share of scored samples (k/n, pooled over clients, rounds and seeds) with its exact "
    "(Clopper–Pearson) 95% interval in brackets, in percent"
)


def scored(leakage: pd.DataFrame) -> pd.DataFrame:
    """Rows with a scored reconstruction (failed attack runs carry no metrics)."""
    return leakage[leakage["status"] == "ok"]


def _diverged(rows: pd.DataFrame) -> pd.Series:
    """Rows of runs that diverged with a row per private sample. Runs recorded before they had
    one (a single row, sample -1) say nothing of their samples and count as failed ones do."""
    return (rows["status"] == "nan") & (rows["sample"] >= 0)


def originals(leakage: pd.DataFrame) -> pd.DataFrame:
    """Rows against the private originals, with a `success` column (`stats.successes`): the
    scored ones, and one per private sample of each run that diverged (no metrics, success 0:
    an attack that diverged reconstructed nothing, and leaving it out would flatter it)."""
    rows = leakage[(leakage["status"] == "ok") | _diverged(leakage)]
    rows = rows[rows["scored_against"] == "original"].copy()
    rows["success"] = successes(rows, lpips_column(rows)) if len(rows) else np.nan
    return rows


def metrics_present(leakage: pd.DataFrame) -> list[Metric]:
    """The metrics with at least one finite value."""
    ok = scored(leakage)
    return [m for m in METRICS if m.column in ok and np.isfinite(ok[m.column]).any()]


def attack_label(attack: str, reference: bool) -> str:
    """`aux-mean (floor)` for reference baselines, the attack's name otherwise."""
    return f"{attack} ({FLOOR})" if reference else attack


def attack_order(rows: pd.DataFrame) -> list[tuple[str, bool]]:
    """(attack, is reference) pairs: attacks by name, then the reference baselines."""
    pairs = rows[["attack", "reference"]].drop_duplicates()
    pairs = sorted(
        zip(pairs["attack"], pairs["reference"], strict=True), key=lambda p: (p[1], p[0])
    )
    return [(str(a), bool(r)) for a, r in pairs]


_RUN = ["run", "round", "client_id", "attack"]


def not_converged(rows: pd.DataFrame) -> int:
    """Attack runs among `rows` with an inversion that did not converge (0 without a
    `converged` column). Convergence is recorded per sample: a run over per-sample updates
    inverts each sample's update on its own, and any of them may fail where the first did not."""
    if "converged" not in rows or rows.empty:
        return 0
    failed = rows["converged"].eq(0).groupby([rows[c] for c in _RUN], sort=False).any()
    return int(failed.sum())


def runaway_runs(rows: pd.DataFrame) -> int:
    """Attack runs among `rows` in which a matching loss ran to infinity: the attack kept its
    last finite iterate (often its starting guess), scored and not converged, for a step too
    large for the update's scale rather than a budget too small."""
    if "loss_final" not in rows or rows.empty:
        return 0
    runaway = np.isinf(rows["loss_final"].to_numpy(dtype=float))
    if "loss_start" in rows:  # a loss never finite is the update's, not the step's
        runaway &= np.isfinite(rows["loss_start"].to_numpy(dtype=float))
    return int(pd.Series(runaway, index=rows.index).groupby([rows[c] for c in _RUN]).any().sum())


def unconverged_samples(rows: pd.DataFrame) -> tuple[int, int]:
    """(samples whose inversion did not converge, samples whose convergence is known)."""
    if "converged" not in rows or rows.empty:
        return 0, 0
    return int(rows["converged"].eq(0).sum()), int(rows["converged"].notna().sum())


# The rule is fedleak.attacks.types.converged (CONVERGED_RATIO = 1/10); the report room reads
# run files only and does not import the attacks.
CONVERGENCE_NOTE = (
    " Not converged: attack runs in which a matching loss (one per inverted update) fell less "
    "than tenfold (their budget ran out or they could not match the update) or ran to infinity "
    "(their last finite iterate is scored); –: none of the attack's runs is judged: it matches "
    "no loss (a learned attack or a floor), or its loss's fall does not mark a fit (a sign "
    "hinge; the rows' message says so)."
)


def judged_runs(rows: pd.DataFrame) -> int:
    """Attack runs among `rows` whose convergence is known: those of attacks that match a
    loss (a learned attack or a floor has none, so it is neither converged nor not)."""
    if "converged" not in rows or rows.empty:
        return 0
    judged = rows["converged"].notna().groupby([rows[c] for c in _RUN], sort=False).any()
    return int(judged.sum())


def _convergence_cell(summary: SettingSummary) -> Cell:
    if not summary.attack_runs:
        return Cell("–")
    return Cell(f"{summary.not_converged} of {summary.attack_runs}")


def strongest(
    cells: Mapping[str, Median | Rate],
    metric: Metric,
    floors: Callable[[str], Mapping[str, Median | Rate]] | None = None,
) -> str | None:
    """The attack whose median leaks most, if it is told apart from every other attack's
    (`Median.told_apart`: disjoint 95% intervals) and its
    median leaks more than every floor's (an attack behind a floor leaks nothing to mark).
    `floors(attack)`: each floor's summary on the samples that attack scored, so that an
    attack whose failed runs left it the easier samples is not ranked above a floor that
    scored them all."""
    present = {a: m for a, m in cells.items() if m.n > 0}
    if len(present) < 2:
        return None
    pick = max if metric.higher_is_better else min
    best = pick(present, key=lambda a: present[a].value)
    if not all(present[best].told_apart(m) for a, m in present.items() if a != best):  # type: ignore[arg-type]
        return None
    for floor in (floors(best) if floors else {}).values():
        if floor.n > 0 and pick(present[best].value, floor.value) == floor.value:
            return None
    return best


def _paired_floors(
    cells: Mapping[tuple[str, str], pd.DataFrame],
    floors: list[str],
    defense: str,
    metric: Metric,
    attack: str,
) -> dict[str, Median | Rate]:
    """Each floor's summary over the private samples `attack` scored under `defense`
    (`floor_values`; `cells`: rows by attack and defense)."""
    attack_rows = cells[attack, defense]
    out: dict[str, Median | Rate] = {}
    for floor in floors:
        both = pd.concat([attack_rows, cells[floor, defense]])
        paired = floor_values(both, metric.column, metric.higher_is_better, attacks=(floor,))
        out[floor] = _summarise(paired.iloc[: len(attack_rows)], metric)
    return out


def _cell_text(summary: Median | Rate, digits: int, flagged: int) -> str:
    if summary.n == 0:
        return "–"
    text = summary.text() if isinstance(summary, Rate) else f"{summary.text(digits)} n={summary.n}"
    return text + (f" {NOT_CONVERGED}" if flagged else "")


def _summarise(values: pd.Series, metric: Metric) -> Median | Rate:
    """A share's k/n with its exact interval, any other metric's median with its interval."""
    return success_rate(values) if metric.share else median_interval(values)


def leakage_table(
    rows: pd.DataFrame, metric: Metric, defenses: list[str], groups: list[str], caption: str
) -> Table:
    """Rows: attacks (in blocks per group, the floor last); columns: defenses; cells: median
    [interval] n= (a share: k/n [interval]). Bold: the strongest attack of a column, when it is
    clearly so (`strongest`)."""
    columns = [d for d in defenses if d in set(rows["defense"])]
    grouped = groups != [""]
    body = []
    for group in groups:
        sub = rows[rows["group"] == group]
        order = attack_order(sub)
        cells = {
            (a, d): sub[(sub["attack"] == a) & (sub["defense"] == d)]
            for a, _ in order
            for d in columns
        }
        medians = {key: _summarise(cell[metric.column], metric) for key, cell in cells.items()}
        best = {
            d: strongest(
                {a: medians[a, d] for a, ref in order if not ref},
                metric,
                partial(_paired_floors, cells, [a for a, ref in order if ref], d, metric),
            )
            for d in columns
        }
        for attack, reference in order:
            if all(medians[attack, d].n == 0 for d in columns):
                continue
            row = [Cell(group)] if grouped else []
            row.append(Cell(attack_label(attack, reference)))
            for d in columns:
                median = medians[attack, d]
                flagged = not_converged(cells[attack, d])
                title = f"n={median.n}"
                if isinstance(median, Median) and median.n > 1:
                    title += f", interval coverage {100 * median.coverage:.1f}%"
                row.append(
                    Cell(
                        _cell_text(median, metric.digits, flagged),
                        bold=best[d] == attack,
                        title=title,
                    )
                )
            body.append(tuple(row))
    header = ("group", "attack") if grouped else ("attack",)
    return Table(columns=(*header, *columns), rows=tuple(body), caption=caption)


def _caption_tail(grouped: bool, share: bool) -> str:
    # An exact binomial interval keeps 95% at any n; a median's needs 6 samples (`told_apart`).
    enough = "" if share else " (6 samples or more each)"
    value = "share" if share else "median"
    return (
        "; bold: the attack that leaks most against that defense"
        f"{' within its group' if grouped else ''}, only where its 95% interval overlaps no "
        f"other attack's{enough} and its {value} leaks more than the floor's; "
        f"the floor (reference baseline) is never ranked; {NOT_CONVERGED}: the cell holds "
        "attack runs that did not converge."
    )


def leakage_tables(study: Study) -> list[tuple[Metric, str, Table]]:
    """(metric, scored_against, table) for every metric and scoring target with data."""
    leakage = scored(study.leakage())
    defenses, groups = study.defenses(), study.groups()
    out = []
    direction = {True: "higher = more leakage", False: "lower = more leakage"}
    encodings = bool((leakage["scored_against"] == "encoded").any())
    for metric in metrics_present(leakage):
        labels = metric.column == "label_acc"
        # Under an encoding a label is scored against the encoded sample's own label in both
        # views (`Auditor`), so a second label table would repeat the first.
        for against in ("original",) if labels else ("original", "encoded"):
            rows = leakage[leakage["scored_against"] == against]
            rows = rows[np.isfinite(rows[metric.column])]
            if rows.empty:
                continue
            note = SHARE_NOTE if metric.share else INTERVAL_NOTE
            target = SCORED_AGAINST[against]
            if labels and encodings:
                target = ENCODED_LABELS
            caption = (
                f"{metric.label} ({direction[metric.higher_is_better]}), "
                f"{target}. {note}{_caption_tail(groups != [''], metric.share)}"
            )
            if labels and not encodings:
                caption += label_chance_note(study, rows)
            elif labels:  # chance of a mixed label is another question: the plain cells'
                plain = _without_encoded_batches(rows, leakage)
                caption += label_chance_note(study, plain, " where no encoding mixed the labels")
            out.append((metric, against, leakage_table(rows, metric, defenses, groups, caption)))
    return out


# Labels per class seen below which their frequencies are too rough a prior for chance (four
# labels of four classes would put chance at 0.25 on a ten-class data set).
MIN_LABELS_PER_CLASS = 5


def label_chance(study: Study, rows: pd.DataFrame) -> tuple[dict[int, float], bool]:
    """Per batch size (the labels a batch held), the label accuracy a guess drawn from the
    private labels' class frequencies scores on average by the rule the rows were scored by:
    position by position where each sample was shared alone, as a multiset
    (`multiset_chance`) where a batch was; and whether any batch of several samples was scored
    as a multiset."""
    rows = rows[rows["true_label"] >= 0]
    if rows.empty:
        return {}, False
    classes = np.sort(rows["true_label"].unique())
    share = {run.name: run.config.threat.share for run in study.runs}
    batches = []
    for (run, _, client), batch in rows.groupby(["run", "round", "client_id"], sort=False):
        one = batch[batch["attack"] == batch["attack"].iloc[0]]  # every attack saw this batch
        # The aggregate view (client -1) inverts one update of the round's samples, per-sample
        # sharing or not: its labels are scored as one batch.
        kind = share.get(run) if client >= 0 else "batch"
        batches.append((kind, one["batch_size"].iloc[0], one["true_label"].to_numpy()))
    pooled = np.concatenate([labels for _, _, labels in batches])
    if len(pooled) < MIN_LABELS_PER_CLASS * len(classes):
        return {}, False  # too few labels to estimate the frequencies: chance would be its own
    prior = np.array([(pooled == c).mean() for c in classes])
    index = {c: i for i, c in enumerate(classes)}
    chances: dict[int, list[float]] = {}
    multiset = False
    for kind, size, labels in batches:
        if kind == "per-sample" or len(labels) == 1:
            value = float(prior[[index[c] for c in labels]].mean())
            # Each sample's update alone: B = 1 by the rule, whatever batch the client drew.
            size = 1
        else:
            counts = np.bincount([index[c] for c in labels], minlength=len(classes))
            value, multiset = multiset_chance(counts.tolist(), prior.tolist()), True
            # The batch it was: a Poisson-sampled batch holds more or fewer than the declared
            # size, and chance at "B = 8" read as 8 labels (audit DN4).
            size = len(labels)
        chances.setdefault(int(size), []).append(value)
    return {size: float(np.mean(v)) for size, v in sorted(chances.items())}, multiset


def _without_encoded_batches(rows: pd.DataFrame, leakage: pd.DataFrame) -> pd.DataFrame:
    """`rows` less the batches (run, round, client) that MixUp or InstaHide encoded."""
    key = ["run", "round", "client_id"]
    encoded = leakage.loc[leakage["scored_against"] == "encoded", key].drop_duplicates()
    marked = rows.merge(encoded.assign(_encoded=True), on=key, how="left")
    return rows[marked["_encoded"].isna().to_numpy()]


def label_chance_note(study: Study, rows: pd.DataFrame, where: str = "") -> str:
    """The caption's sentence on what label accuracy chance gives (empty without labels);
    `where` narrows it to the rows it was computed from."""
    chance, multiset = label_chance(study, rows)
    if not chance:
        return ""
    # In percent, as the table's shares.
    said = ", ".join(f"{100 * value:.1f}% at B = {size}" for size, value in chance.items())
    why = (
        " (a shared batch's labels count as a multiset, so chance grows with B)" if multiset else ""
    )
    return (
        f" Chance{where}: labels drawn from the private labels' class frequencies would score "
        f"{said} by the same rule{why}."
    )


SUCCESS_RULE = (
    "A private sample counts as reconstructed when the attack beats every floor on it (lower "
    f"LPIPS, higher PSNR) and its LPIPS (AlexNet) is at most {SUCCESS_FRACTION:g} x the mean "
    "auxiliary image's on the same sample (the best floor's where aux-mean did not run) and at "
    f"most {SUCCESS_LPIPS['lpips_alex']:g}. "
    "Where no floor scored that sample (under MixUp or InstaHide each attack is matched to "
    "the private images it resembles most, so the floors may be matched to others), the "
    "floors' median over the run stands in"
)
NO_SUCCESS_RULE = (
    "No sample's success is decided: a sample counts as reconstructed by a rule on its "
    "AlexNet LPIPS against the floors', and these runs measured none (metrics.lpips-nets, or "
    "no pretrained weights)"
)


NOTHING_SCORED_RULE = (
    "No sample's success is decided: no attack run returned a reconstruction to score against "
    "a private sample (their runs failed or diverged, see Failed attack runs, or no client "
    "declared its batch)"
)


def success_decidable(leakage: pd.DataFrame) -> bool:
    """Whether AlexNet's LPIPS, which the success rule reads, was measured on any row (or
    there are no rows, which leave nothing undecided)."""
    if leakage.empty:
        return True
    return "lpips_alex" in leakage and bool(leakage["lpips_alex"].notna().any())


def nothing_scored(leakage: pd.DataFrame) -> bool:
    """Whether attack rows were recorded but none was scored against a private sample (every
    run failed or diverged, or no client declared its batch): then no LPIPS could be measured,
    whatever the settings."""
    if leakage.empty:
        return False
    ok = leakage["status"] == "ok"
    if "scored_against" in leakage:
        ok &= leakage["scored_against"] != "unavailable"
    return not ok.any()


def success_rule(leakage: pd.DataFrame) -> str:
    """`SUCCESS_RULE` where it could be applied, else why no success was decided."""
    if success_decidable(leakage):
        return SUCCESS_RULE
    return NOTHING_SCORED_RULE if nothing_scored(leakage) else NO_SUCCESS_RULE


def success_table(study: Study) -> Table | None:
    """Per attack and defense: the share of private samples reconstructed (`SUCCESS_RULE`),
    with its exact 95% interval; None when no sample could be decided (no floor, or no AlexNet
    LPIPS)."""
    rows = originals(study.leakage())
    rows = rows[~rows["reference"]]
    if rows.empty or not np.isfinite(rows["success"]).any():
        return None
    defenses = [d for d in study.defenses() if d in set(rows["defense"])]
    groups = study.groups()
    grouped = groups != [""]
    body = []
    for group in groups:
        sub = rows[rows["group"] == group]
        for attack, _ in attack_order(sub):
            cells = [
                success_rate(sub.loc[(sub["attack"] == attack) & (sub["defense"] == d), "success"])
                for d in defenses
            ]
            if all(c.n == 0 for c in cells):
                continue
            head = [Cell(group)] if grouped else []
            body.append((*head, Cell(attack), *(Cell(c.text()) for c in cells)))
    header = ("group", "attack") if grouped else ("attack",)
    return Table(
        columns=(*header, *defenses),
        rows=tuple(body),
        caption=f"Success rate: {SUCCESS_RULE}. Share of samples (k/n) with its exact "
        "(Clopper–Pearson) 95% interval in brackets, in percent.",
    )


NO_MEDIAN = Median(math.nan, math.nan, math.nan, 0, math.nan)


@dataclass(frozen=True)
class SettingSummary:
    """One attack in one setting (group, defense): the figures the summary and verdict use."""

    group: str
    defense: str
    attack: str
    reference: bool
    success: Rate
    psnr: Median
    lpips: Median
    lpips_mean: tuple[float, float, int]
    not_converged: int
    attack_runs: int  # those whose convergence is known (`judged_runs`)
    # The same per private sample (`unconverged_samples`): a run of per-sample inversions
    # counts as not converged when one of them did not.
    samples_not_converged: int = 0
    samples_judged: int = 0
    # Not converged because a matching loss ran to infinity (`runaway_runs`).
    runaway: int = 0
    # The language task's scores; empty (n = 0) for image settings.
    token_acc: Median = NO_MEDIAN
    token_acc_mean: tuple[float, float, int] = (math.nan, math.nan, 0)
    rougeL: Median = NO_MEDIAN
    # Attack runs that failed: their samples are in no figure above.
    left_out: int = 0
    # Attack runs that diverged (NaN): their samples count as not reconstructed in `success`
    # and are in no median or mean.
    diverged: int = 0
    # Private samples no reconstruction was matched to (a Poisson batch larger than declared):
    # not reconstructed in `success`, in no median or mean.
    unmatched: int = 0
    # Why no sample's success was decided (`success.n == 0`); '' otherwise.
    undecided: str = ""
    # The backbone of `lpips`: AlexNet's unless only VGG's was measured.
    lpips_net: str = "AlexNet"

    @property
    def tokens(self) -> bool:
        """A language-task setting: scored by token accuracy and ROUGE, not PSNR and LPIPS."""
        return self.token_acc.n > 0 and self.psnr.n == 0


def setting_summaries(study: Study) -> list[SettingSummary]:
    """Every (group, defense, attack) with scored samples against the originals."""
    leakage = study.leakage()
    rows = originals(leakage)
    unfinished = _unfinished_runs(leakage)
    lpips = lpips_column(rows)
    out = []
    for group in study.groups():
        for defense in study.defenses():
            sub = rows[(rows["group"] == group) & (rows["defense"] == defense)]
            for attack, reference in attack_order(sub):
                cell = sub[sub["attack"] == attack]
                unfinished_here = unfinished[
                    (unfinished["group"] == group)
                    & (unfinished["defense"] == defense)
                    & (unfinished["attack"] == attack)
                ]
                diverged = int(_diverged(unfinished_here).sum())
                failed_samples, judged_samples = unconverged_samples(cell)
                success = success_rate(cell["success"])
                out.append(
                    SettingSummary(
                        group=group,
                        defense=defense,
                        attack=attack,
                        reference=reference,
                        success=success,
                        psnr=median_interval(cell["psnr"]),
                        lpips=median_interval(cell[lpips]),
                        lpips_mean=mean_ci(cell[lpips]),
                        not_converged=not_converged(cell),
                        attack_runs=judged_runs(cell),
                        samples_not_converged=failed_samples,
                        samples_judged=judged_samples,
                        runaway=runaway_runs(cell),
                        token_acc=median_interval(cell["token_acc"]),
                        token_acc_mean=mean_ci(cell["token_acc"]),
                        rougeL=median_interval(cell["rougeL"]),
                        left_out=len(unfinished_here) - diverged,
                        diverged=diverged,
                        unmatched=int(unmatched(cell).sum()),
                        undecided="" if success.n else _undecided(cell, lpips),
                        lpips_net="VGG" if lpips == "lpips_vgg" else "AlexNet",
                    )
                )
    return out


def _undecided(cell: pd.DataFrame, lpips: str) -> str:
    """Why the success rule decided none of a cell's samples (it needs LPIPS and a floor)."""
    if nothing_scored(cell):
        return "nothing scored"
    if not np.isfinite(cell[lpips].to_numpy(dtype=float)).any():
        return "no LPIPS measured"
    if lpips not in SUCCESS_LPIPS:
        return "its rule is calibrated on AlexNet's LPIPS, add alex to metrics.lpips-nets"
    return "no floor measured"


def _unfinished_runs(leakage: pd.DataFrame) -> pd.DataFrame:
    """One row per attack run that did not finish cleanly (failed, or diverged to NaN)."""
    runs = leakage.drop_duplicates(_RUN)
    return runs[runs["status"] != "ok"]


# The ranges the means' t-intervals are cut to (`format_ci`).
LPIPS_RANGE = (0.0, math.inf)
ACCURACY_RANGE = (0.0, 1.0)
LOSS_RANGE = (0.0, math.inf)
PERPLEXITY_RANGE = (1.0, math.inf)
CUT_NOTE = (
    " A mean's t-interval that passes the measure's range (few runs make it wide) is cut to "
    "that range and shown in brackets."
)


LEFT_OUT = "‡"
TEXT_LEFT_OUT_NOTE = (
    f" {LEFT_OUT}: some of the attack's runs failed or diverged (see Failed attack runs); "
    "their sequences are in no figure of the row, so its medians and the floor's may stand "
    "on different sequences."
)
LEFT_OUT_NOTE = (
    f" {LEFT_OUT}: some of the attack's runs failed or diverged (see Failed attack runs). A "
    "failed run's samples are in no figure of the row; a diverged run's count as not "
    "reconstructed in the success rate and are in no median or mean. The floor's medians "
    "cover every sample it scored, so they and such a row's stand on different samples; the "
    "success rate compares each sample with the floor on that sample."
)


UNMATCHED = "§"


def _unmatched_note(summaries: list[SettingSummary]) -> str:
    if not any(s.unmatched for s in summaries if not s.reference):
        return ""
    return (
        f" {UNMATCHED}: the success rate also counts, as not reconstructed, private samples "
        "that no reconstruction was matched to (Poisson batches held more than the size the "
        "clients declared and the attacks reconstructed); they are in no median or mean."
    )


def _count_cell(n: int, summary: SettingSummary) -> Cell:
    marks = LEFT_OUT if summary.left_out or summary.diverged else ""
    if summary.unmatched and not summary.reference:
        marks += UNMATCHED
    return Cell(f"{n} {marks}" if marks else str(n))


def summary_tables(study: Study) -> list[Table]:
    """One row per setting and attack: success rate, median PSNR and LPIPS, LPIPS mean; for
    the language task's settings, token accuracy median and mean, ROUGE-L median. A sweep of
    both tasks gets one table each."""
    summaries = setting_summaries(study)
    grouped = study.groups() != [""]
    # By what the runs' data are, not by what was scored: a setting whose every run diverged
    # scored nothing either way.
    language = {
        (study.group_of(run), run.config.defense.label)
        for run in study.scored_runs
        if run.modality == "tokens"
    }
    images = [s for s in summaries if (s.group, s.defense) not in language]
    texts = [s for s in summaries if (s.group, s.defense) in language]
    if not texts:
        return [_image_summary_table(study, images, grouped)]
    if not images:
        return [_text_summary_table(texts, grouped)]
    return [_image_summary_table(study, images, grouped), _text_summary_table(texts, grouped)]


def _image_summary_table(study: Study, summaries: list[SettingSummary], grouped: bool) -> Table:
    flags = any(s.not_converged for s in summaries)
    left_out = any(s.left_out or s.diverged for s in summaries)
    cut = any(passes_range(*s.lpips_mean[:2], *LPIPS_RANGE) for s in summaries)
    body = []
    for s in summaries:
        head = [Cell(s.group)] if grouped else []
        row = [
            *head,
            Cell(s.defense),
            Cell(attack_label(s.attack, s.reference)),
            _count_cell(s.psnr.n, s),
            Cell("–" if s.reference else ("not decided" if s.undecided else s.success.text())),
            Cell(s.psnr.text(2)),
            Cell(s.lpips.text(3)),
            Cell(format_ci(*s.lpips_mean[:2], 3, *LPIPS_RANGE)),
        ]
        if flags:
            row.append(_convergence_cell(s))
        body.append(tuple(row))
    header = ("group",) if grouped else ()
    # Only VGG's LPIPS measured: say so where its values stand, beside a rule about AlexNet's.
    net = " (VGG)" if any(s.lpips_net == "VGG" for s in summaries) else ""
    columns = (
        *header,
        "defense",
        "attack",
        "n",
        "success rate",
        "PSNR median (dB)",
        f"LPIPS{net} median",
        f"LPIPS{net} mean ± 95% t",
        *(("not converged (attack runs)",) if flags else ()),
    )
    return Table(
        columns=columns,
        rows=tuple(body),
        caption=f"Against the private originals. n: scored samples. "
        f"{success_rule(study.leakage())}; "
        "exact 95% interval in brackets. Medians with their 95% order-statistic interval "
        "(the sample range for n < 6). The mean is given for LPIPS, which is bounded; PSNR's "
        "mean is not, because exact reconstructions (80+ dB) dominate it."
        + (CUT_NOTE if cut else "")
        + (CONVERGENCE_NOTE if flags else "")
        + (LEFT_OUT_NOTE if left_out else "")
        + _unmatched_note(summaries),
    )


def _text_summary_table(summaries: list[SettingSummary], grouped: bool) -> Table:
    flags = any(s.not_converged for s in summaries)
    left_out = any(s.left_out or s.diverged for s in summaries)
    cut = any(passes_range(*s.token_acc_mean[:2], *ACCURACY_RANGE) for s in summaries)
    body = []
    for s in summaries:
        head = [Cell(s.group)] if grouped else []
        row = [
            *head,
            Cell(s.defense),
            Cell(attack_label(s.attack, s.reference)),
            _count_cell(s.token_acc.n, s),
            Cell(s.token_acc.text(3)),
            Cell(format_ci(*s.token_acc_mean[:2], 3, *ACCURACY_RANGE)),
            Cell(s.rougeL.text(3)),
        ]
        if flags:
            row.append(_convergence_cell(s))
        body.append(tuple(row))
    return Table(
        columns=(
            *(("group",) if grouped else ()),
            "defense",
            "attack",
            "n",
            "token accuracy median",
            "token accuracy mean ± 95% t",
            "ROUGE-L median",
            *(("not converged (attack runs)",) if flags else ()),
        ),
        rows=tuple(body),
        caption="Against the private sequences. n: scored sequences. Token accuracy: the "
        "share of positions recovered; medians with their 95% order-statistic interval (the "
        "sample range for n < 6); the mean, bounded, with its Student-t interval."
        + (CUT_NOTE if cut else "")
        + (CONVERGENCE_NOTE if flags else "")
        + (TEXT_LEFT_OUT_NOTE if left_out else "")
        + _unmatched_note(summaries),
    )


def final_utility(study: Study) -> pd.DataFrame:
    """Per run: the last recorded round's accuracy, loss and ε, and total times."""
    utility = study.utility()
    if utility.empty:
        return utility
    last = utility.sort_values("round").groupby("run", sort=False).tail(1).set_index("run")
    totals = utility.groupby("run")[["round_seconds", "attack_seconds"]].sum(min_count=1)
    return last.join(totals.add_suffix("_total"))


def diverged_runs(final: pd.DataFrame, initial: pd.DataFrame) -> pd.Series:
    """Which of `final`'s runs (indexed by run) diverged: their model was measured at round 0
    (`initial`'s rows) and not at their last round, its test loss having become non-finite."""
    measured = set(initial.loc[initial["test_accuracy"].notna(), "run"])
    return final["test_accuracy"].isna() & final.index.isin(measured)


def _mean_text(
    values: pd.Series, digits: int, value_range: tuple[float, float]
) -> tuple[str, bool]:
    """The values' mean ± t (`format_ci`), and whether its interval was cut to the range."""
    mean, half, _ = mean_ci(values)
    return format_ci(mean, half, digits, *value_range), passes_range(mean, half, *value_range)


def _final_accuracy(runs: pd.DataFrame, start: pd.DataFrame) -> tuple[str, bool]:
    """Mean ± t over the runs measured at their end, and how many diverged (left out); and
    whether the interval was cut to the range."""
    lost = int(diverged_runs(runs, start).sum())
    if lost and lost == len(runs):
        return "diverged", False
    shown, cut = _mean_text(runs["test_accuracy"], 3, ACCURACY_RANGE)
    return (f"{shown} ({lost} diverged)" if lost else shown), cut


def utility_table(study: Study) -> Table:
    """Per group and defense: accuracy at round 0 and at the end, final loss (mean ± CI over
    seeds), ε, central ε where any run has it, rounds."""
    final = final_utility(study)
    utility = study.utility()
    initial = utility[utility["round"] == 0]
    central = bool(final["central_epsilon"].notna().any())
    language = "tokens" in study.modalities
    modality = {run.name: run.modality for run in study.runs}
    body = []
    cut = False
    for group in study.groups():
        for defense in study.defenses():
            runs = final[(final["group"] == group) & (final["defense"] == defense)]
            if runs.empty:
                continue
            start = initial[(initial["group"] == group) & (initial["defense"] == defense)]
            means = [
                _mean_text(start["test_accuracy"], 3, ACCURACY_RANGE),
                _final_accuracy(runs, start),
                _mean_text(runs["test_loss"], 3, LOSS_RANGE),
            ]
            # A language model's usual measure: e to the mean next-token cross-entropy (none
            # for an image setting of a sweep that also holds text).
            if language and all(modality.get(name) == "tokens" for name in runs.index):
                means.append(_mean_text(np.exp(runs["test_loss"]), 1, PERPLEXITY_RANGE))
            elif language:
                means.append(("–", False))
            cut = cut or any(passes for _, passes in means)
            epsilons = [runs["epsilon"].dropna()]
            if central:
                epsilons.append(runs["central_epsilon"].dropna())
            body.append(
                (
                    Cell(group or "–"),
                    Cell(defense),
                    *(Cell(text) for text, _ in means),
                    # The largest: a guarantee holds only where every run meets it.
                    *(Cell(f"{eps.max():.2f}" if len(eps) else "–") for eps in epsilons),
                    Cell(", ".join(str(int(r)) for r in sorted(set(runs["round"])))),
                    Cell(str(len(runs))),
                )
            )
    epsilon_columns = ("ε", "central ε") if central else ("ε",)
    deltas = sorted({run.config.defense.dp_delta for run in study.scored_runs})
    delta = f"δ = {deltas[0]:g}" if len(deltas) == 1 else "each run's defense.dp-delta"
    return Table(
        columns=(
            "group",
            "defense",
            "round-0 accuracy",
            "final accuracy",
            "final loss",
            *(("final perplexity",) if language else ()),
            *epsilon_columns,
            "rounds",
            "runs",
        ),
        rows=tuple(body),
        caption="The global model on the held-out test split before training (round 0) and "
        "after the last recorded round; mean ± 95% t-interval over seeds where a setting ran "
        "with several. ε: example-level, DP-SGD on the clients, the worst client's; central "
        "ε: client-level, central DP on the released model, which does not bound what the "
        f"server saw; both at {delta}, the largest over a setting's runs."
        + (CUT_NOTE if cut else "")
        + _no_epsilon_note(study)
        + (
            " For a language model, accuracy is next-token accuracy, loss the mean "
            "next-token cross-entropy (nats) and perplexity e to that loss, per run."
            if language
            else ""
        ),
    )


def _no_epsilon_note(study: Study) -> str:
    """Why a setting that ran DP-SGD shows no ε, as its runs recorded it."""
    reasons: dict[str, list[str]] = {}
    for run in study.scored_runs:
        reason = run.environment.get(NO_EPSILON_KEY)
        if isinstance(reason, str) and reason:
            defenses = reasons.setdefault(reason, [])
            if run.config.defense.label not in defenses:
                defenses.append(run.config.defense.label)
    return "".join(
        f" No ε for {', '.join(defenses)}: {reason}." for reason, defenses in reasons.items()
    )


def failure_table(study: Study) -> Table | None:
    """Attack runs that did not finish cleanly, by group, attack, defense and status."""
    leakage = study.leakage()
    runs = leakage.drop_duplicates(_RUN)
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
                Cell(one_line(example, 120)),
            )
        )
    return Table(
        columns=("group", "attack", "defense", "status", "attack runs", "first message"),
        rows=tuple(body),
        caption="An attack run is one attack on one client in one round. Failed runs "
        "(status failed) are left out of the leakage tables and the summary; diverged runs "
        "(nan) count as reconstructing none of their samples in success rates and are in no "
        "median (both marked ‡ in the summary).",
    )


def incomplete_rounds_table(study: Study) -> Table | None:
    """Rounds in which an attack has no row for a client that another attack has rows for.

    Every attack of a round attacks the same clients (`CuriousStrategy.attack`), and a round is
    recorded only with all of its rows; runs recorded by a worker pool before that rule could
    miss some. None when every round is whole."""
    leakage = study.leakage()
    body = []
    for (run, server_round), rows in leakage.groupby(["run", "round"], sort=True):
        clients = rows.groupby("attack")["client_id"].agg(set)
        attacked = set().union(*clients)
        for attack, seen in clients.items():
            if missing := sorted(attacked - seen):
                body.append(
                    (
                        Cell(str(run) or "–"),
                        Cell(str(server_round)),
                        Cell(str(attack)),
                        Cell(", ".join(str(c) for c in missing)),
                    )
                )
    if not body:
        return None
    return Table(
        columns=("run", "round", "attack", "clients without rows"),
        rows=tuple(body),
        caption="Every attack of a round attacks the same clients, so these rows were lost "
        "(a run recorded by a worker pool before rounds were kept whole can miss some): the "
        "figures above are computed without them.",
    )


def cost_table(study: Study) -> Table:
    """Per attack: attack runs, seconds and iterations per run, from the leakage rows."""
    leakage = study.leakage()
    runs = leakage.drop_duplicates(_RUN)
    body = []
    for attack, rows in runs.groupby("attack", sort=True):
        iterations = rows.loc[rows["iterations"] >= 0, "iterations"]
        body.append(
            (
                Cell(attack),
                Cell(str(len(rows))),
                Cell(_median_range(rows["seconds"])),
                Cell(_median_range(iterations, places=0)),
                Cell(f"{rows['seconds'].sum():.1f}"),
            )
        )
    return Table(
        columns=("attack", "attack runs", "seconds per run", "iterations per run", "total seconds"),
        rows=tuple(body),
        caption="Wall-clock time and iterations of each attack run on the server: median "
        "(smallest–largest). Both are skewed (a learned attack's run that trains its inverter "
        "takes far longer than one that reuses it), so no mean is given.",
    )


def _median_range(values: pd.Series, places: int = 2) -> str:
    """`1.23 (0.98–4.56)` over the finite values; `–` without any."""
    values = finite(values)
    if values.size == 0:
        return "–"
    median = float(np.median(values))
    if values.size == 1:
        return f"{median:.{places}f}"
    return f"{median:.{places}f} ({values.min():.{places}f}–{values.max():.{places}f})"


def _trained(diagnostics: Mapping[str, Any], key: str, default: Any) -> Any:
    """A training diagnostic: a hybrid (`lti+ig`) keeps its inverter's as `lti_<key>`, beside
    its optimiser's own `stopped_by`."""
    return diagnostics.get(f"lti_{key}", diagnostics.get(key, default))


def training_table(study: Study) -> Table | None:
    """Per run, round and learned attack: the training its refresh did (epochs, seconds,
    validation PSNR or token accuracy, warm start), from the attacks' diagnostics; None without
    learned attacks."""
    runs = study.leakage().drop_duplicates(_RUN)
    body = []
    for (run, server_round, attack), rows in runs.groupby(["run", "round", "attack"], sort=True):
        trained = [d for d in map(row_diagnostics, rows["diagnostics"]) if "train_epochs" in d]
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
        warm = any(_trained(d, "warm_start", 0.0) > 0 for d in trained)
        # A training cut short inside its first epoch counts 0 epochs but was not a reuse.
        reused = all(
            _trained(d, "stopped_by", "reused" if not d["train_epochs"] else "") == "reused"
            for d in trained
        )
        body.append(
            (
                Cell(str(run)),
                Cell(str(server_round)),
                Cell(attack),
                Cell(f"{epochs:.0f}"),
                Cell(f"{seconds:.1f}"),
                Cell(validation),
                Cell("reused" if reused else "warm start" if warm else "from scratch"),
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


def row_diagnostics(text: object) -> dict[str, float]:
    """A leakage row's `diagnostics` (JSON; {} when empty or missing)."""
    return json.loads(text) if isinstance(text, str) and text else {}


def client_failures(utility: pd.DataFrame) -> tuple[int, int, list[int]] | None:
    """(failed replies, clients asked, rounds with a failure) over a run's recorded rounds;
    None where utility.csv does not count replies."""
    if not {"round", "num_replies", "num_failures"} <= set(utility.columns):
        return None
    rounds = utility[utility["round"] > 0]
    failed = int(rounds["num_failures"].sum())
    hit = rounds.loc[rounds["num_failures"] > 0, "round"].astype(int).tolist()
    return failed, failed + int(rounds["num_replies"].sum()), hit


def _client_failures_cell(utility: pd.DataFrame) -> str:
    counted = client_failures(utility)
    if counted is None:
        return "–"
    failed, asked, hit = counted
    if not failed:
        return f"0 of {asked}"
    shown = ", ".join(map(str, hit[:5])) + (", ..." if len(hit) > 5 else "")
    return f"{failed} of {asked} (round{'s' if len(hit) > 1 else ''} {shown})"


def _settled(status: object) -> str:
    """A cell's status as a report shows it: reports are built once no sweep writes the folder
    (`fedleak report` checks its lock), so a cell sweep.json still calls running or queued
    was cut off by a sweep that died without recording it (a kill -9, a lost machine)."""
    return "interrupted" if status in ("running", "queued") else str(status)


def runs_table(study: Study) -> Table:
    """Per run (a failed one too): group, defense, seed, rounds finished of configured, client
    failures, time, status."""
    cells = {c["id"]: c for c in (study.manifest or {}).get("cells", [])}
    body = []
    for run in study.runs:
        done = run.last_round
        seconds = float(run.utility["round_seconds"].sum(min_count=1)) if done else math.nan
        own = (
            "failed"
            if run.failure
            else ("done" if done >= run.config.num_server_rounds else "unfinished")
        )
        status = _settled(cells.get(run.name, {}).get("status", own))
        # A sweep's cell leads to its own report, where that was written.
        report = run.path / "report.html"
        link = f"{run.name}/report.html" if study.kind == "sweep" and report.is_file() else ""
        body.append(
            (
                Cell(run.name, link=link),
                Cell(study.group_of(run) or "–"),
                Cell(run.config.defense.label),
                Cell(str(run.config.seed)),
                Cell(f"{done} / {run.config.num_server_rounds}"),
                Cell(_client_failures_cell(run.utility)),
                Cell("–" if math.isnan(seconds) else f"{seconds:.1f}"),
                Cell(str(run.environment.get("created", "–"))),
                Cell(status),
            )
        )
    for cell in study.cells_without_runs():
        # A cell not run yet has no run directory; sweep.json says what it sets.
        overrides = cell.get("overrides") or {}
        status = _settled(cell.get("status"))
        finished = "0"
        if status == "done":  # finished, then its folder was deleted or left out of a copy
            status, finished = "missing (its folder is gone)", "–"
        # Manifests written before they held the cell's settings give its overrides only.
        rounds = cell.get("rounds")
        body.append(
            (
                Cell(cell["id"]),
                Cell("–"),
                Cell(str(cell.get("defense", overrides.get("defense.spec", "–")))),
                Cell(str(cell.get("seed", overrides.get("seed", "–")))),
                Cell(finished if rounds is None else f"{finished} / {rounds}"),
                Cell("–"),
                Cell("–"),
                Cell("–"),
                Cell(f"{status} {cell.get('message') or ''}".strip()),
            )
        )
    return Table(
        columns=(
            "run",
            "group",
            "defense",
            "seed",
            "rounds",
            "client failures",
            "round seconds",
            "started",
            "status",
        ),
        rows=tuple(body),
        caption="Client failures: failed replies of all the clients asked over the recorded "
        "rounds (the global model of those rounds aggregates the others only). Round seconds: "
        "the sum of the recorded rounds' wall-clock times (training, evaluation and attacks).",
    )
