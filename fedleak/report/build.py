"""`build_report(DIR)`: report.html (self-contained) and report.md (+ report_files/) for a run or
a sweep, built only from the files in DIR, so it can be rebuilt at any time without re-running.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedleak.report.collect import MANIFEST, SWEEP_SOURCE, RunRecord, Study, load_study
from fedleak.report.document import (
    Block,
    Code,
    Figure,
    Heading,
    Table,
    Text,
    render_html,
    render_markdown,
)
from fedleak.report.document import Cell as TableCell
from fedleak.report.gallery import gallery_figure, ranked, run_samples
from fedleak.report.lock import RunLock
from fedleak.report.plots import frontier_figure, rounds_figure, setting_label
from fedleak.report.rundir import (
    ATTACK_SETTINGS_KEY,
    ForeignFileError,
    RunDirectoryError,
    atomic_write,
    is_run_directory,
    lpips_column,
    recorded,
    replace_owned_files,
    undeclared_rows,
)
from fedleak.report.stats import median_interval
from fedleak.report.tables import (
    METRICS,
    TEXT_FIGURE_METRICS,
    cost_table,
    failure_table,
    final_utility,
    incomplete_rounds_table,
    leakage_tables,
    metrics_present,
    not_converged,
    originals,
    runs_table,
    scored,
    success_rule,
    success_table,
    summary_tables,
    training_table,
    utility_table,
)
from fedleak.report.text_section import texts_section
from fedleak.report.verdict import verdict
from fedleak.settings import render

HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
FILES_DIR = "report_files"
# Every report's title starts so: how a rebuild knows report.html and report.md are its own.
TITLE_PREFIX = "fedleak report: "
# Reconstructions are shown for at most this many settings of a sweep.
MAX_GRID_SETTINGS = 24
# Distinct values of one environment key listed with their runs; more read as a count.
MAX_ENVIRONMENT_VALUES = 4


def _verdict(study: Study) -> list[Block]:
    tables = [table for table in summary_tables(study) if table.rows]
    return [
        Heading("Verdict"),
        Text(verdict(study)),
        Heading("Summary", 3),
        *(tables or [Text("No attack has produced a scored reconstruction.")]),
    ]


def _attacked_rounds(rounds: list[int]) -> str:
    """' in rounds 1, 26 and 50' (a few), ' in 12 rounds from 1 to 50' (many): the rounds
    attacked, not the span they lie in ('rounds 1-50' read as every round attacked)."""
    if not rounds:
        return ""
    if len(rounds) == 1:
        return f" in round {rounds[0]}"
    if len(rounds) <= 6:
        return f" in rounds {', '.join(map(str, rounds[:-1]))} and {rounds[-1]}"
    return f" in {len(rounds)} rounds from {rounds[0]} to {rounds[-1]}"


def _method(study: Study) -> list[Block]:
    leakage = study.leakage()
    rounds = sorted(set(leakage["round"]))
    lpips = lpips_column(leakage)
    # The folder's name, not its path: a copy elsewhere rebuilds to the same report.
    what = (
        f"one run (folder {study.runs[0].path.name})"
        if study.kind == "run"
        else f"a sweep of {len(study.runs)} runs (folder {study.path.name})"
    )
    grouped = (
        f" Runs are grouped by the settings that vary besides the defense and the seed: "
        f"{', '.join(study.group_keys)}."
        if study.group_keys
        else ""
    )
    return [
        Heading("How to read this report"),
        Text(
            f"This report covers {what}: {len(leakage)} leakage rows from "
            f"{leakage.drop_duplicates(['run', 'round', 'client_id', 'attack']).shape[0]} "
            f"attack runs{_attacked_rounds(rounds)}. It was "
            "built from the directory's files alone." + grouped
        ),
        Text(" ".join(_scoring(study.modalities, lpips, leakage))),
        *_lpips_note(study),
        *_tokenizer_note(study),
    ]


def _scoring(modalities: frozenset[str], lpips: str, leakage: pd.DataFrame) -> list[str]:
    """How reconstructions were scored, for the modalities the study holds."""
    parts = []
    if "image" in modalities:
        measured = lpips in leakage and leakage[lpips].notna().any()
        how = (
            f"LPIPS is reported from the `{lpips}` column; images under 64 px are upsampled "
            "bilinearly to 64 px first (the LPIPS networks take no 28x28 input), so it is not "
            "comparable with LPIPS taken at 32x32."
            if measured
            else "LPIPS was not measured."
        )
        parts.append(
            "Each image reconstruction is scored against its own private sample when each "
            "sample's update was shared alone, else matched to one (Hungarian assignment on "
            f"MSE); images are in [0, 1] and PSNR uses a data range of 1. {how} "
            f"{success_rule(leakage)}."
        )
    if "tokens" in modalities:
        parts.append(
            "Each reconstructed token sequence is scored against its own private sequence "
            "when each was shared alone, else matched to one (Hungarian assignment on the "
            "fraction of mismatched positions), by token accuracy "
            "(position by position) and by the ROUGE-1, ROUGE-2 and ROUGE-L F-measures of the "
            "decoded texts (`rouge-score`, no stemming); a sequence whose truth holds no word "
            "pair has no ROUGE-2 (nor, with no word, any ROUGE), so ROUGE's n can be smaller."
        )
    floors = []
    if "image" in modalities:
        floors.append(
            "aux-mean from its auxiliary data alone, class-mean from it and the labels "
            "recovered from the update"
        )
    if "tokens" in modalities:
        floors.append(
            "aux-frequency, the most frequent auxiliary token at every position, from its "
            "auxiliary text alone"
        )
    private = " and ".join(
        word for kind, word in (("image", "images"), ("tokens", "texts")) if kind in modalities
    )
    parts.append(
        "Medians come with 95% order-statistic intervals and n, pooled over clients, rounds "
        "and seeds and treated as independent draws: where rounds or seeds differ widely (the "
        "per-round figure shows it), an interval is narrower than that spread. A floor is "
        f"what an attacker gets without inverting the update: {'; '.join(floors)}. An attack "
        f"at the floor has learned nothing about the private {private} themselves."
    )
    return parts


def _lpips_note(study: Study) -> list[Block]:
    """Say so when a run asked for LPIPS and had no real weights (its column is empty)."""
    missing = sorted(
        {
            f"{net} ({source.removeprefix('unavailable: ')})"
            for run in study.runs
            for net, source in dict(run.environment.get("lpips") or {}).items()
            if str(source).startswith("unavailable")
        }
    )
    if not missing:
        return []
    return [
        Text(
            "LPIPS was not measured: no pretrained weights were found for "
            f"{'; '.join(missing)}. Its columns are empty; `fedleak weights --fetch` installs "
            "the weights, and the run must then be repeated to measure it."
        )
    ]


def _tokenizer_note(study: Study) -> list[Block]:
    """Repeat the run's warning where its tokenizer turned much of the text into its unknown
    token: the token scores below count every guessed unknown token as recovered."""
    notes = {}
    for run in study.runs:
        data = run.environment.get("data")
        tokenizer = data.get("tokenizer") if isinstance(data, dict) else None
        if isinstance(tokenizer, dict) and tokenizer.get("warning"):
            notes.setdefault(str(tokenizer["warning"]), []).append(run.name)
    return [
        Text(f"{'Runs' if len(names) > 1 else 'Run'} {', '.join(names)}: {warning}.")
        for warning, names in notes.items()
    ]


def _leakage_section(study: Study) -> list[Block]:
    blocks: list[Block] = [Heading("Leakage tables")]
    success = success_table(study)
    if success is not None:
        blocks += [Heading("Success rate", 3), success]
    tables = leakage_tables(study)
    if not tables:
        blocks.append(Text("No attack produced a scored reconstruction."))
    if any(against == "encoded" for _, against, _ in tables):
        blocks.append(
            Text(
                "Runs with an input encoding (MixUp, InstaHide) are scored twice: against the "
                "private originals (the privacy question) and, in a second table per image "
                "metric, against the encoded images the gradient was computed on; a recovered "
                "label is scored once, against the encoded sample's own label."
            )
        )
    current = None
    for metric, against, table in tables:
        if metric != current:
            blocks.append(Heading(metric.label, 3))
            current = metric
        if against == "encoded":
            blocks.append(
                Text(
                    f"{metric.label} scored against the encoded images, not the private originals:"
                )
            )
        blocks.append(table)
    failures = failure_table(study)
    if failures is not None:
        blocks += [Heading("Failed attack runs", 3), failures]
    incomplete = incomplete_rounds_table(study)
    if incomplete is not None:
        blocks += [Heading("Incomplete rounds", 3), incomplete]
    return blocks


def _rounds_section(study: Study) -> list[Block]:
    leakage = originals(study.leakage())
    lpips = lpips_column(leakage)
    shown = ("psnr", lpips, *TEXT_FIGURE_METRICS)
    metrics = [m for m in metrics_present(leakage) if m.column in shown]
    utility = study.utility()
    if leakage.empty and utility.empty:
        return []
    # Success is decided on LPIPS: text rows (and runs without LPIPS weights) have none.
    decided = "success" in leakage and bool(np.isfinite(leakage["success"]).any())
    order = _setting_order(study)
    text = any(run.modality == "tokens" for run in study.runs)
    png = rounds_figure(leakage, utility, metrics, success=decided, setting_order=order, text=text)
    training = training_table(study)
    return [
        Heading("Leakage per round"),
        Figure.of(
            "leakage-per-round.png",
            png,
            "Per round, against the private originals: "
            + "the success rate (band: its exact (Clopper–Pearson) 95% interval) and " * decided
            + "the median of "
            "each metric over the attacked clients' samples (band, or bar for a single "
            "round, where few lines share a panel: the median's 95% interval, or the "
            "samples' range where a round has fewer than 6 of them, coverage 1 - 2^(1-n)), "
            "every attack a line on shared axes, the floor (reference baselines) dashed, dotted "
            "or dash-dotted, one style per baseline: "
            "grey in a panel of one setting, in each setting's colour in a panel of one "
            "attack across many settings; the global model's test accuracy in the bottom row.",
        ),
        *([Heading("Learned attacks' training per round", 3), training] if training else []),
    ]


def _frontier_points(study: Study) -> pd.DataFrame:
    """One row per setting and attack: final accuracy (mean over runs, and its range), each
    metric's median with its 95% interval (a share: its mean), the best floor's median, n and
    whether any attack run did not converge."""
    final = final_utility(study)
    leakage = originals(study.leakage())
    floors = leakage[leakage["reference"]]
    leakage = leakage[~leakage["reference"]]
    metrics = [m for m in METRICS if m.column in leakage]
    rows = []
    for group in study.groups():
        for defense in study.defenses():
            runs = final[(final["group"] == group) & (final["defense"] == defense)]
            if runs.empty:
                continue
            here = (leakage["group"] == group) & (leakage["defense"] == defense)
            floor_here = floors[(floors["group"] == group) & (floors["defense"] == defense)]
            # The setting's best floor per metric, the same for each of its attacks.
            medians = floor_here.groupby("attack")[[m.column for m in metrics]].median()
            best_floor = {
                m.column: float(
                    medians[m.column].max() if m.higher_is_better else medians[m.column].min()
                )
                for m in metrics
            }
            eps = runs["epsilon"].dropna()
            central = runs["central_epsilon"].dropna()
            accuracy = runs["test_accuracy"]
            for attack, sub in leakage[here].groupby("attack"):
                row = {
                    "group": group,
                    "defense": defense,
                    "attack": attack,
                    # Clipped: the float mean of equal accuracies can land above their
                    # maximum (3 x 0.1 -> 0.10000000000000002), a negative error bar.
                    "accuracy": float(np.clip(accuracy.mean(), accuracy.min(), accuracy.max())),
                    "accuracy_low": float(accuracy.min()),
                    "accuracy_high": float(accuracy.max()),
                    # The largest of the runs': the guarantee every one of them meets.
                    "epsilon": float(eps.max()) if len(eps) else float("nan"),
                    "central_epsilon": float(central.max()) if len(central) else float("nan"),
                    "n": len(sub),
                    "not_converged": not_converged(sub) > 0,
                }
                for m in metrics:
                    summary = median_interval(sub[m.column])
                    value = float(sub[m.column].mean()) if m.share else summary.value
                    low, high = (value, value) if m.share else (summary.low, summary.high)
                    row |= {
                        m.column: value,
                        f"{m.column}_low": low,
                        f"{m.column}_high": high,
                        f"{m.column}_floor": best_floor[m.column],
                    }
                rows.append(row)
    return pd.DataFrame(rows)


def _setting_order(study: Study) -> list[tuple[str, str]]:
    """The study's (group, defense) settings in the tables' order: one colour per setting in
    every figure."""
    present = {(study.group_of(r), r.config.defense.label) for r in study.scored_runs}
    return [
        (group, defense)
        for group in study.groups()
        for defense in study.defenses()
        if (group, defense) in present
    ]


def _frontier_section(study: Study) -> list[Block]:
    points = _frontier_points(study)
    blocks: list[Block] = [Heading("Privacy–utility frontier")]
    settings = points[["group", "defense"]].drop_duplicates() if not points.empty else points
    if len(settings) == 1:
        blocks.append(Text("One defense setting only: a sweep over defenses draws the frontier."))
    elif len(settings) > 1:
        lpips = lpips_column(scored(study.leakage()))
        metrics = [
            m
            for m in METRICS
            if m.column in ("psnr", lpips, *TEXT_FIGURE_METRICS)
            and np.isfinite(points[m.column]).any()
        ]
        if metrics:
            blocks.append(
                Figure.of(
                    "privacy-utility.png",
                    frontier_figure(points, metrics, _setting_order(study)),
                    "Final test accuracy against median leakage, one point per defense setting "
                    "and attack (ε where DP-SGD is on, central ε where central DP is). Bars: the "
                    "median's 95% order-statistic interval (the n of the leakage tables) and the "
                    "accuracy's range over the setting's runs; dashed: each setting's best floor, "
                    "grey where settings share it (a point beyond it leaks nothing an attack "
                    "learned); hollow: attack runs "
                    "that did not converge.",
                )
            )
    blocks.append(utility_table(study))
    return blocks


def _images_section(study: Study) -> list[Block]:
    leakage = originals(study.leakage())
    leakage = leakage[~leakage["reference"]]
    lpips = lpips_column(leakage)
    measured = bool(leakage[lpips].notna().any())  # else the gallery ranks by PSNR
    runs = {run.name: run for run in study.runs}
    blocks: list[Block] = []
    settings = list(dict.fromkeys(zip(leakage["group"], leakage["defense"], strict=True)))
    for index, (group, defense) in enumerate(settings[:MAX_GRID_SETTINGS]):
        here = leakage[(leakage["group"] == group) & (leakage["defense"] == defense)]
        by_attack = {}
        for attack, rows in sorted(here.groupby("attack"), key=lambda item: item[0]):
            samples = [
                sample
                for run_name, run_rows in rows.groupby("run", sort=False)
                for sample in run_samples(runs[run_name], run_rows, lpips)
            ]
            by_attack[attack] = ranked(samples)
        if not any(by_attack.values()):
            continue
        label = setting_label(group, defense)
        if len(settings) > 1:
            blocks.append(Heading(f"Reconstructions: {label}", 3))
        blocks.append(
            Figure.of(
                f"reconstructions-{index:02d}.png",
                gallery_figure(by_attack, "LPIPS"),
                f"{label}: for each attack, its private samples (top row) and its "
                f"reconstructions (below), chosen by {'LPIPS' if measured else 'PSNR'} among "
                "the samples with saved images: best, quartiles, median and worst.",
            )
        )
    if not blocks:
        return []
    ranking = "LPIPS (lower = closer)" if measured else "PSNR (higher = closer; no LPIPS measured)"
    intro = Text(
        "Reconstructions as a person sees them, enlarged without smoothing. Columns are chosen "
        f"by rank of {ranking} among the samples whose images were saved (the first "
        "attack.images-per-client of each attacked client), so the worst column shows how an "
        "attack fails, not only its best case; the tables rank every scored sample."
        + (
            f" Shown for the first {MAX_GRID_SETTINGS} settings."
            if len(settings) > MAX_GRID_SETTINGS
            else ""
        )
    )
    return [Heading("Reconstructions"), intro, *blocks]


def _environment_table(runs: list[RunRecord]) -> Table:
    """Each environment key with its value; over a sweep's runs, a key whose value differs
    between them lists each value with its runs (the first run's read as every cell's: cells
    resumed under other software, audit EM3)."""
    leaves = [
        dict(_leaves({k: v for k, v in run.environment.items() if k != ATTACK_SETTINGS_KEY}))
        for run in runs
    ]
    rows = []
    for key in dict.fromkeys(key for leaf in leaves for key in leaf):
        by_value: dict[str, list[str]] = {}
        for run, leaf in zip(runs, leaves, strict=True):  # a run without the key: –
            by_value.setdefault(leaf.get(key, "–"), []).append(run.name)
        if len(by_value) == 1:
            rows.append((TableCell(key), TableCell(next(iter(by_value)))))
        elif len(by_value) > MAX_ENVIRONMENT_VALUES:
            rows.append((TableCell(key), TableCell(f"differs by run ({len(by_value)} values)")))
        else:
            text = "; ".join(f"{value} ({_names(names)})" for value, names in by_value.items())
            rows.append((TableCell(key), TableCell(text)))
    caption = (
        f"Over the {len(runs)} runs: a key that differs between them lists each value with "
        "its runs."
        if len(runs) > 1
        else ""
    )
    return Table(columns=("key", "value"), rows=tuple(rows), caption=caption)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown if len(names) <= 3 else f"{shown} and {len(names) - 3} more"


def _attack_settings(environments: list[dict[str, object]]) -> list[Block]:
    """One row per attack with every parameter it ran with, as `--set` would write them:
    config.toml above holds only those set (nothing for a run from before they were kept).
    Over a sweep's runs, a parameter whose value differs between them says so: the first
    run's value would read as every cell's (audit DU2)."""
    attacks: dict[str, list[dict[str, object]]] = {}
    for environment in environments:
        recorded = environment.get(ATTACK_SETTINGS_KEY)
        for name, params in (recorded if isinstance(recorded, dict) else {}).items():
            if isinstance(params, dict) and params:
                attacks.setdefault(name, []).append(params)
    rows = tuple(
        (TableCell(name), TableCell(", ".join(_settings_across(runs))))
        for name, runs in attacks.items()
    )
    if not rows:
        return []
    note = Text(
        "Every parameter each attack ran with, its defaults and its preset's values included "
        "(the configuration above holds those set):"
    )
    return [note, Table(columns=("attack", "parameters"), rows=rows)]


def _settings_across(runs: list[dict[str, object]]) -> list[str]:
    """`key=value` for each parameter of one attack in the runs that ran it, or `key=(differs
    by run)` where they differ."""
    keys = dict.fromkeys(key for params in runs for key in params)
    shown = []
    for key in keys:
        values = {json.dumps(params.get(key), sort_keys=True, default=str) for params in runs}
        if len(values) > 1:
            shown.append(f"{key}=(differs by run)")
            continue
        value = runs[0].get(key)
        shown.append(f"{key}={render(tuple(value) if isinstance(value, list) else value)}")
    return shown


def _leaves(record: dict[str, object], prefix: str = "") -> list[tuple[str, str]]:
    """A nested record as dotted keys and readable values (– where nothing was recorded),
    so that the table shows no JSON."""
    leaves = []
    for key, value in record.items():
        if isinstance(value, dict) and value:
            leaves += _leaves(value, f"{prefix}{key}.")
        elif value is None or value == {} or value == []:
            leaves.append((f"{prefix}{key}", "–"))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            leaves.append((f"{prefix}{key}", text))
    return leaves


def _command_line_settings(study: Study) -> str:
    """The sweep's `--set` overrides as sweep.json records them ('' when none)."""
    recorded = (study.manifest or {}).get("set")
    if not isinstance(recorded, dict):
        return ""
    return ", ".join(f"{key}={value}" for key, value in recorded.items())


def _declared_protocol(study: Study) -> list[Block]:
    """A note where the attacked clients recorded another protocol than `train.*`: an audited
    app's clients declare their own, and `train.*` then describes no client of the run."""
    leakage, config = study.leakage(), study.runs[0].config
    if config.threat.view == "aggregate":  # its rows record the round's pooled batch
        return []
    unknown = undeclared_rows(leakage)
    blocks: list[Block] = []
    if unknown.any():
        examples = recorded(leakage[unknown], "batch_size", "?")
        blocks.append(
            Text(
                "Attacked clients that declared no batch (`declare` not called) were attacked "
                f"as one local step over the examples each reported ({examples}): their rows "
                "hold no ground truth, and `train.*` below describes none of them."
            )
        )
    leakage = leakage[~unknown]
    if leakage.empty:
        return blocks
    train = config.train
    differing = [
        f"{label} {shown}"
        for column, label, configured in (
            ("mode", "mode", train.mode),
            ("batch_size", "batch size", train.batch_size),
        )
        if (shown := recorded(leakage, column, configured)) != str(configured)
    ]
    if not differing:
        return blocks
    return [
        Text(
            "The attacked clients declared another protocol than `train.*` below "
            f"({'; '.join(differing)}): "
            "an audited app's clients train as the app does, and the rows and the summary "
            "record what they declared."
        ),
        *blocks,
    ]


def _setup_section(study: Study) -> list[Block]:
    blocks: list[Block] = [
        Heading("Runs and times"),
        runs_table(study),
        cost_table(study),
        Heading("Configuration"),
    ]
    if study.kind == "run":
        blocks += _declared_protocol(study)
        blocks.append(Code((study.runs[0].path / "config.toml").read_text(encoding="utf-8")))
        blocks += _attack_settings([study.runs[0].environment])
    else:
        source = study.path / SWEEP_SOURCE
        if source.is_file():
            blocks += [Text("The sweep file:"), Code(source.read_text(encoding="utf-8"))]
        command_line = _command_line_settings(study)
        if command_line:
            blocks.append(Text(f"Set on the command line, over the file's values: {command_line}."))
        first = study.runs[0]
        blocks += [
            Text(
                f"The resolved configuration of {first.name}; the other runs differ "
                "in the keys their names and groups show:"
            ),
            Code((first.path / "config.toml").read_text(encoding="utf-8")),
            *_attack_settings([run.environment for run in study.runs]),
        ]
    blocks += [Heading("Environment"), _environment_table(list(study.runs))]
    return blocks


def report_blocks(study: Study) -> list[Block]:
    """The whole report as blocks, in reading order."""
    return [
        *_verdict(study),
        *_rounds_section(study),
        *_images_section(study),
        *texts_section(study),
        *_leakage_section(study),
        *_frontier_section(study),
        *_method(study),
        *_setup_section(study),
    ]


def _check_ours(file: Path) -> None:
    """Refuse to replace a report.html or report.md that fedleak did not write (its title
    names fedleak near the top): a folder of runs may hold a user's own notes."""
    if not file.exists():
        return
    with file.open("rb") as handle:
        head = handle.read(2048).decode("utf-8", errors="replace")
    if TITLE_PREFIX not in head:
        raise ForeignFileError(
            f"{file}: exists and was not written by fedleak; move it away to build the report "
            "in this folder"
        )


def discard_report(path: Path) -> None:
    """Remove the run's report.html, report.md and the figures fedleak wrote for them into
    report_files/: after a build failed they show an earlier state of the run."""
    for file in (path / HTML_FILE, path / MARKDOWN_FILE):
        with contextlib.suppress(RunDirectoryError):
            _check_ours(file)
            file.unlink(missing_ok=True)
    with contextlib.suppress(RunDirectoryError):  # a link: nothing of fedleak's to remove
        replace_owned_files(path / FILES_DIR, {})
    with contextlib.suppress(OSError):  # absent, or holds files that are not fedleak's
        (path / FILES_DIR).rmdir()


def rebuild_reports(path: Path) -> list[Path]:
    """Rebuild a run's report, or a sweep's and each of its cells' (a report written by an
    earlier fedleak is then brought up to date everywhere); the HTML reports, cells first.
    A folder whose records cannot be read loses the report fedleak wrote there: it would
    show an earlier state."""
    try:
        study = load_study(Path(path))
    except Exception:
        if is_run_directory(Path(path)) or (Path(path) / MANIFEST).is_file():
            discard_report(Path(path))
        raise
    paths = [*(run.path for run in study.runs if study.kind == "sweep"), Path(path)]
    for folder in paths[:-1]:
        # A cell a resumed run is writing read "stopped after round 111 of 200" (audit ED3).
        holder = RunLock(folder).holder()
        if holder is not None:
            raise RunDirectoryError(
                f"{folder}: a fedleak run is still writing this cell ({holder}); rebuild the "
                "sweep's report when it ends"
            )
    for existing in (folder / name for folder in paths for name in (HTML_FILE, MARKDOWN_FILE)):
        _check_ours(existing)  # refused before anything is written
    built = []
    for folder in paths:
        try:
            built.append(build_report(folder)[0])
        except ForeignFileError:
            raise  # refused before writing: the reports there are as they were
        except Exception:
            # Left in place, the folder's report (and the sweep's, built from its cells)
            # would show an earlier state as if it were the current one.
            for stale in dict.fromkeys((folder, Path(path))):
                discard_report(stale)
            raise
    return built


def build_report(path: Path) -> tuple[Path, Path]:
    """Write report.html and report.md (+ report_files/) into a run or sweep directory."""
    path = Path(path)
    study = load_study(path)
    blocks = report_blocks(study)
    title = f"{TITLE_PREFIX}{study.name}"
    html_path, md_path = path / HTML_FILE, path / MARKDOWN_FILE
    for existing in (html_path, md_path):
        _check_ours(existing)
    markdown, files = render_markdown(title, blocks, FILES_DIR)
    # Figures of an earlier build that this one no longer has go; a user's own files stay
    # (and refuse the build where one has a figure's name), before anything is written.
    replace_owned_files(path / FILES_DIR, files)
    # A folder name the locale could not decode (surrogates) is written as its own bytes.
    atomic_write(html_path, render_html(title, blocks).encode("utf-8", "surrogateescape"))
    atomic_write(md_path, markdown.encode("utf-8", "surrogateescape"))
    return html_path, md_path
