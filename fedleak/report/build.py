"""`build_report(DIR)`: report.html (self-contained) and report.md (+ report_files/) for a run or
a sweep, built only from the files in DIR, so it can be rebuilt at any time without re-running.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from fedleak.report.collect import SWEEP_SOURCE, Study, load_study
from fedleak.report.document import (
    Block,
    Code,
    Figure,
    Gallery,
    Heading,
    Table,
    Text,
    render_html,
    render_markdown,
)
from fedleak.report.document import Cell as TableCell
from fedleak.report.plots import MAX_BANDS, frontier_figure, rounds_figure
from fedleak.report.rundir import atomic_write, lpips_column
from fedleak.report.tables import (
    METRICS,
    TEXT_FIGURE_METRICS,
    cost_table,
    failure_table,
    final_utility,
    leakage_tables,
    metrics_present,
    runs_table,
    scored,
    training_table,
    utility_table,
)
from fedleak.report.text_section import texts_section

HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
FILES_DIR = "report_files"
_GRID_NAME = re.compile(r"r(\d+)_c(\d+)_(.+)\.png")
# Grids of a sweep: at most this many runs get their reconstructions shown.
MAX_GRID_RUNS = 24


def _overview(study: Study) -> list[Block]:
    leakage = study.leakage()
    rounds = sorted(set(leakage["round"]))
    lpips = lpips_column(leakage)
    what = (
        f"one run ({study.runs[0].path})"
        if study.kind == "run"
        else f"a sweep of {len(study.runs)} runs ({study.path})"
    )
    grouped = (
        f" Runs are grouped by the settings that vary besides the defense and the seed: "
        f"{', '.join(study.group_keys)}."
        if study.group_keys
        else ""
    )
    return [
        Text(
            f"This report covers {what}: {len(leakage)} leakage rows from "
            f"{leakage.drop_duplicates(['run', 'round', 'client_id', 'attack']).shape[0]} "
            f"attack runs over rounds {rounds[0] if rounds else '–'}–"
            f"{rounds[-1] if rounds else '–'}. It was built from the directory's files alone."
            + grouped
        ),
        Text(" ".join(_scoring(leakage, lpips))),
    ]


def _scoring(leakage: pd.DataFrame, lpips: str) -> list[str]:
    """How reconstructions were scored, for the modalities the study holds."""
    modalities = set(leakage["modality"]) if len(leakage) else {"image"}
    parts = []
    if "image" in modalities:
        parts.append(
            "Each image reconstruction is matched to one private sample (Hungarian assignment "
            "on MSE) before scoring; images are in [0, 1] and PSNR uses a data range of 1. "
            f"LPIPS is reported from the `{lpips}` column."
        )
    if "tokens" in modalities:
        parts.append(
            "Each reconstructed token sequence is matched to one private sequence (Hungarian "
            "assignment on the fraction of mismatched positions) and scored by token accuracy "
            "(position by position) and by the ROUGE-1, ROUGE-2 and ROUGE-L F-measures of the "
            "decoded texts (`rouge-score`, no stemming)."
        )
    parts.append(
        "Confidence intervals are 95% Student-t intervals over the reconstructed samples, "
        "pooled over clients, rounds and seeds."
    )
    return parts


def _leakage_section(study: Study) -> list[Block]:
    blocks: list[Block] = [Heading("Leakage tables")]
    tables = leakage_tables(study)
    if not tables:
        blocks.append(Text("No attack produced a scored reconstruction."))
    if any(against == "encoded" for _, against, _ in tables):
        blocks.append(
            Text(
                "Runs with an input encoding (MixUp, InstaHide) are scored twice: against the "
                "private originals (the privacy question) and, in a second table per metric, "
                "against the encoded images the gradient was computed on."
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
    return blocks


def _rounds_section(study: Study) -> list[Block]:
    leakage = scored(study.leakage())
    leakage = leakage[leakage["scored_against"] == "original"]
    lpips = lpips_column(leakage)
    shown = ("psnr", lpips, *TEXT_FIGURE_METRICS)
    metrics = [m for m in metrics_present(leakage) if m.column in shown]
    utility = study.utility()
    if leakage.empty and utility.empty:
        return []
    png = rounds_figure(leakage, utility, metrics)
    training = training_table(study)
    return [
        Heading("Leakage per round"),
        Figure.of(
            "leakage-per-round.png",
            png,
            "Mean leakage per round against the private originals, one panel per attack and "
            "metric, one line per setting (band: 95% t-interval, drawn for up to "
            f"{MAX_BANDS} settings), above the global model's test accuracy.",
        ),
        *([Heading("Learned attacks' training per round", 3), training] if training else []),
    ]


def _frontier_points(study: Study) -> pd.DataFrame:
    final = final_utility(study)
    leakage = scored(study.leakage())
    leakage = leakage[leakage["scored_against"] == "original"]
    columns = [m.column for m in METRICS if m.column in leakage]
    rows = []
    for group in study.groups():
        for defense in study.defenses():
            runs = final[(final["group"] == group) & (final["defense"] == defense)]
            if runs.empty:
                continue
            cells = leakage[(leakage["group"] == group) & (leakage["defense"] == defense)]
            eps = runs["epsilon"].dropna()
            central = runs["central_epsilon"].dropna()
            for attack, sub in cells.groupby("attack"):
                rows.append(
                    {
                        "group": group,
                        "defense": defense,
                        "attack": attack,
                        "accuracy": float(runs["test_accuracy"].mean()),
                        "epsilon": float(eps.mean()) if len(eps) else float("nan"),
                        "central_epsilon": float(central.mean()) if len(central) else float("nan"),
                        **{c: float(sub[c].mean()) for c in columns},
                    }
                )
    return pd.DataFrame(rows)


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
                    frontier_figure(points, metrics),
                    "Final test accuracy against mean leakage, one point per defense setting and "
                    "attack (ε where DP-SGD is on, central ε where central DP is).",
                )
            )
    blocks.append(utility_table(study))
    return blocks


def _grid_choice(study: Study) -> list[tuple[str, Path, int, int, str]]:
    """(run, file, round, client, attack) of fixed samples: per run, the first and the last
    round with images, the lowest client id in it, every attack."""
    chosen = []
    for run in study.runs[:MAX_GRID_RUNS]:
        parsed = [
            (int(m[1]), int(m[2]), m[3], p)
            for p in run.images
            if (m := _GRID_NAME.fullmatch(p.name))
        ]
        if not parsed:
            continue
        rounds = sorted({r for r, _, _, _ in parsed})
        for server_round in dict.fromkeys((rounds[0], rounds[-1])):
            client = min(c for r, c, _, _ in parsed if r == server_round)
            for r, c, attack, path in sorted(parsed):
                if r == server_round and c == client:
                    chosen.append((run.name, path, r, c, attack))
    return chosen


def _images_section(study: Study) -> list[Block]:
    chosen = _grid_choice(study)
    if not chosen:
        return []
    blocks: list[Block] = [
        Heading("Reconstructions"),
        Text(
            "Each grid: the client's private samples on top, the attack's reconstructions "
            "matched to them below. Every attack is shown on the same round and client. Under "
            "an input encoding the top row shows whatever the run saved as the truth."
        ),
    ]
    by_sample: dict[tuple[str, int, int], list[Figure]] = {}
    for run, path, server_round, client, attack in chosen:
        prefix = f"{run}-" if study.kind == "sweep" else ""
        figure = Figure.of(f"{prefix}{path.name}", path.read_bytes(), attack, scale=3)
        by_sample.setdefault((run, server_round, client), []).append(figure)
    for (run, server_round, client), figures in by_sample.items():
        where = f"{run}: " if study.kind == "sweep" else ""
        blocks.append(Gallery(tuple(figures), f"{where}round {server_round}, client {client}"))
    return blocks


def _environment_table(environment: dict[str, object]) -> Table:
    rows = tuple(
        (TableCell(str(k)), TableCell(v if isinstance(v, str) else json.dumps(v, default=str)))
        for k, v in environment.items()
    )
    return Table(columns=("key", "value"), rows=rows)


def _setup_section(study: Study) -> list[Block]:
    blocks: list[Block] = [
        Heading("Runs and times"),
        runs_table(study),
        cost_table(study),
        Heading("Configuration"),
    ]
    if study.kind == "run":
        blocks.append(Code((study.runs[0].path / "config.toml").read_text(encoding="utf-8")))
    else:
        source = study.path / SWEEP_SOURCE
        if source.is_file():
            blocks += [Text("The sweep file:"), Code(source.read_text(encoding="utf-8"))]
        first = study.runs[0]
        blocks += [
            Text(
                f"The resolved configuration of {first.name}; the other runs differ "
                "in the keys their names and groups show:"
            ),
            Code((first.path / "config.toml").read_text(encoding="utf-8")),
        ]
    blocks += [Heading("Environment"), _environment_table(study.runs[0].environment)]
    return blocks


def report_blocks(study: Study) -> list[Block]:
    """The whole report as blocks, in reading order."""
    return [
        *_overview(study),
        *_leakage_section(study),
        *_rounds_section(study),
        *_frontier_section(study),
        *_images_section(study),
        *texts_section(study),
        *_setup_section(study),
    ]


def build_report(path: Path) -> tuple[Path, Path]:
    """Write report.html and report.md (+ report_files/) into a run or sweep directory."""
    path = Path(path)
    study = load_study(path)
    blocks = report_blocks(study)
    title = f"fedleak report: {study.name}"
    html_path, md_path = path / HTML_FILE, path / MARKDOWN_FILE
    atomic_write(html_path, render_html(title, blocks).encode("utf-8"))
    markdown, files = render_markdown(title, blocks, FILES_DIR)
    folder = path / FILES_DIR
    if folder.exists():
        shutil.rmtree(folder)  # only this report's own figures live here
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    atomic_write(md_path, markdown.encode("utf-8"))
    return html_path, md_path
