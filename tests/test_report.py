"""Reports built from a fixed small run (and sweep) directory generated here.

Table values are recomputed independently from leakage.parquet with scipy's t-interval;
every image the report references must exist (Markdown) or decode (HTML data URIs); where
Debian's Chromium is installed the page is rendered headless and its DOM checked.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

from fedleak.config import parse_flat
from fedleak.metrics.image import psnr as psnr_of
from fedleak.report.build import _attacked_rounds, _frontier_points, build_report
from fedleak.report.collect import load_study
from fedleak.report.rundir import RunDirectory, RunDirectoryError, lpips_column
from fedleak.report.stats import (
    SUCCESS_FRACTION,
    format_ci,
    mean_ci,
    median_interval,
    order_rank,
)
from fedleak.report.tables import Metric, originals, scored, strongest, summary_tables
from fedleak.report.verdict import headline
from fedleak.simulations.cli import _headline, main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# Reconstruction noise per attack (None: the floor's constant guess); ig sharpens each round.
_NOISE = {"aux-mean": None, "dlg": lambda r: 0.4, "ig": lambda r: 0.2 / r}


def _make_run(
    path: Path,
    *,
    defense: str = "none",
    seed: int = 0,
    batch_size: int = 2,
    rounds: int = 3,
    encoded: bool = False,
    epsilon: bool = False,
    central: tuple[float, float] = (0.0, 0.0),
    dp_sampling: str = "fixed",
    clients: tuple[int, ...] = (0, 3),
) -> None:
    """A plausible run: the floor and two attacks on two clients, one failed and one diverged
    attack run, and image grids whose pixels agree with the rows' PSNR (LPIPS is a function of
    the PSNR)."""
    config = parse_flat(
        {
            "name": "fixture",
            "seed": seed,
            "num-server-rounds": rounds,
            "defense.spec": defense,
            "train.batch-size": batch_size,
            "attack.names": "aux-mean,ig,dlg",
            "defense.central-clip": central[0],
            "defense.central-noise": central[1],
            "defense.dp-sampling": dp_sampling,
        }
    )
    run = RunDirectory.create(path, config, {"torch": torch.__version__, "device": "cpu"})
    gen = torch.Generator().manual_seed(seed + 100 * batch_size)
    for r in range(0, rounds + 1):
        rows: list[dict[str, object]] = []
        for client in clients if r else ():
            truth = torch.rand(batch_size, 1, 12, 12, generator=gen)
            for attack, noise in _NOISE.items():
                if attack == "ig" and r == 2 and client == 3:
                    rows.append(
                        {
                            "client_id": client,
                            "attack": attack,
                            "status": "failed",
                            "message": "RuntimeError: diverged",
                        }
                    )
                    continue
                if attack == "dlg" and r == 3 and client == 0:
                    # Diverged: one row per private sample, no metrics (as the auditor writes).
                    rows += [
                        {
                            "client_id": client,
                            "attack": attack,
                            "sample": sample,
                            "target_index": sample,
                            "status": "nan",
                            "message": "reconstruction contains NaN or inf",
                        }
                        for sample in range(batch_size)
                    ]
                    continue
                if noise is None:
                    recon = torch.full_like(truth, 0.45)
                else:
                    recon = truth + noise(r) * torch.randn(truth.shape, generator=gen)
                recon = recon.clamp(0, 1)
                psnr = psnr_of(recon, truth)
                for sample in range(batch_size):
                    for against in ("original", "encoded") if encoded else ("original",):
                        value = float(psnr[sample])
                        rows.append(
                            {
                                "client_id": client,
                                "attack": attack,
                                "reference": attack == "aux-mean",
                                "sample": sample,
                                "target_index": sample,
                                "scored_against": against,
                                "psnr": value,
                                "mse": 10 ** (-value / 10),
                                "ssim": value / 40,
                                "lpips_alex": float(np.exp(-value / 10)),
                                "label_acc": 1.0,
                                "true_label": 2,
                                "pred_label": 2,
                                "seconds": 1.0 + 0.1 * sample,
                                "iterations": 50,
                            }
                        )
                run.save_images(r, client, attack, truth, recon)
        run.append_round(
            r,
            rows,
            {
                "test_loss": 2.3 - 0.2 * r,
                "test_accuracy": 0.1 + 0.1 * r + 0.01 * seed,
                "epsilon": 0.4 * r if epsilon else float("nan"),
                "num_replies": 2,
                "round_seconds": 2.0,
                "attack_seconds": 1.5,
            },
        )


@pytest.fixture(scope="module")
def run_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "run"
    _make_run(path)
    build_report(path)
    return path


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep = tmp_path_factory.mktemp("report") / "sweep"
    cells = []
    for index, (batch, defense, seed) in enumerate(
        (b, d, s) for b in (1, 4) for d in ("none", "instahide:2") for s in (0, 1)
    ):
        cell = f"cell-{index:03d}-{defense.replace(':', '-')}_B{batch}_seed{seed}"
        _make_run(
            sweep / cell,
            defense=defense,
            seed=seed,
            batch_size=batch,
            rounds=2,
            encoded=defense != "none",
            epsilon=defense != "none",
        )
        cells.append(
            {
                "id": cell,
                "index": index,
                "overrides": {},
                "status": "done",
                "message": "",
                "seconds": 4.0,
            }
        )
    (sweep / "sweep.json").write_text(json.dumps({"name": "tiny", "cells": cells}))
    (sweep / "sweep.toml").write_text('[sweep]\nname = "tiny"\n')
    build_report(sweep)
    return sweep


def _with_leakage(run: Path, copy: Path, edit) -> Path:
    """A copy of `run` whose leakage rows are `edit(rows)` (its CSV twin removed, so the copy
    is read from the edited parquet)."""
    shutil.copytree(run, copy)
    edit(pd.read_parquet(copy / "leakage.parquet")).to_parquet(copy / "leakage.parquet")
    (copy / "leakage.csv").unlink()
    return copy


def _table(markdown: str, heading: str, nth: int = 0) -> list[list[str]]:
    """The nth Markdown table after the heading line, as rows of stripped cell texts."""
    if not heading.startswith("#"):
        heading = f"### {heading}"
    section = markdown.split(f"\n{heading}\n", 1)[1]
    tables = re.findall(r"((?:^\|.*\|\n)+)", section, flags=re.M)
    lines = tables[nth].strip().splitlines()
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[:1] + lines[2:]]


def _expected(values: pd.Series, digits: int) -> str:
    """Median [order-statistic 95% interval] n=, recomputed from scipy's binomial directly."""
    v = np.sort(values.to_numpy(dtype=float))
    n = len(v)
    ks = [k for k in range(1, n // 2 + 1) if 1 - 2 * stats.binom.cdf(k - 1, n, 0.5) >= 0.95]
    k = max(ks, default=1)
    return f"{np.median(v):.{digits}f} [{v[k - 1]:.{digits}f}, {v[n - k]:.{digits}f}] n={n}"


def _expected_mean(values: pd.Series, digits: int) -> str:
    """Mean ± half-width of scipy's 95% t-interval."""
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return f"{values.mean():.{digits}f} ± {(high - low) / 2:.{digits}f}"


def _successes(leakage: pd.DataFrame, attack: str) -> tuple[int, int]:
    """(k, n) by the documented rule with the aux-mean floor alone: LPIPS at most
    SUCCESS_FRACTION x the floor's and 0.35, PSNR above the floor's, per sample; every sample
    of a diverged run counts as not reconstructed."""
    ok = leakage[(leakage["status"] == "ok") & (leakage["scored_against"] == "original")]
    keys = ["round", "client_id", "target_index"]
    floor = ok[ok["attack"] == "aux-mean"][[*keys, "lpips_alex", "psnr"]]
    pairs = ok[ok["attack"] == attack].merge(floor, on=keys, suffixes=("", "_floor"))
    bound = (SUCCESS_FRACTION * pairs["lpips_alex_floor"]).clip(upper=0.35)
    hits = (pairs["lpips_alex"] <= bound) & (pairs["psnr"] > pairs["psnr_floor"])
    diverged = leakage[(leakage["status"] == "nan") & (leakage["attack"] == attack)]
    return int(hits.sum()), len(pairs) + len(diverged)


def test_order_statistic_interval_has_the_tabulated_ranks() -> None:
    # Known ranks of the distribution-free 95% interval for the median (e.g. Conover, table A3).
    for n, k, coverage in ((6, 1, 0.96875), (10, 2, 0.9785), (20, 6, 0.9586), (100, 40, 0.9648)):
        got_k, got_coverage = order_rank(n)
        assert got_k == k and got_coverage == pytest.approx(coverage, abs=5e-4), n
    assert order_rank(5) == (1, pytest.approx(0.9375))  # too few: the range, coverage stated
    values = np.array([5.0, 1.0, 3.0, np.nan, 2.0, 4.0, 9.0, 7.0, 8.0, 6.0, 10.0])
    median = median_interval(values)
    assert (median.value, median.low, median.high, median.n) == (5.5, 2.0, 9.0, 10)
    assert median_interval(np.array([np.nan])).n == 0


def test_the_per_round_band_is_the_range_below_six_samples_and_its_caption_says_so(
    run_report: Path,
) -> None:
    from fedleak.report.plots import _per_round
    from fedleak.report.tables import METRICS

    psnr = next(m for m in METRICS if m.column == "psnr")
    rows = pd.DataFrame({"round": [1, 1, 2, 2, 2, 2, 2, 2], "psnr": [10.0, 14.0, *range(6)]})
    rounds, medians, low, high = _per_round(rows, psnr)
    # Two samples: their range (coverage 1/2); six: the order-statistic interval (k = 1).
    assert rounds.tolist() == [1, 2] and medians.tolist() == [12.0, 2.5]
    assert (low.tolist(), high.tolist()) == ([10.0, 0.0], [14.0, 5.0])
    assert order_rank(2)[1] == 0.5
    caption = (run_report / "report.md").read_text().split("## Leakage per round")[1]
    assert "range where a round has fewer than 6 of them, coverage 1 - 2^(1-n)" in caption


def test_mean_ci_is_the_student_t_interval() -> None:
    values = np.array([1.0, 2.0, 4.0, 7.0])
    mean, half, n = mean_ci(values)
    low, high = stats.t.interval(0.95, 3, loc=values.mean(), scale=stats.sem(values))
    assert (n, mean) == (4, 3.5) and half == pytest.approx((high - low) / 2)
    assert mean_ci(np.array([5.0, np.nan]))[1:] == (pytest.approx(np.nan, nan_ok=True), 1)


def test_an_attack_is_not_bolded_above_the_floor_on_samples_the_floor_also_scored() -> None:
    """An attack that returned the floor's own image, whose failed runs left it the 12 easier
    of 24 samples, was bolded as leaking most: its median beat the floor's over all 24 (audit
    BW1). The floor is compared on the samples the attack scored."""
    from fedleak.report.tables import leakage_table

    psnr = Metric("psnr", "PSNR", True, 2)
    floor = np.arange(24, dtype=float)  # the floor's PSNR of the 24 samples, 0 to 23 dB
    frames = []
    for attack, reference, samples, values in (
        ("aux-mean", True, np.arange(24), floor),
        ("copy", False, np.arange(12, 24), floor[12:]),  # the floor's image, easy samples only
        ("weak", False, np.arange(24), floor - 100.0),
    ):
        frames.append(
            pd.DataFrame(
                {
                    "group": "",
                    "attack": attack,
                    "defense": "none",
                    "reference": reference,
                    "training": "t",
                    "run": "r",
                    "round": 1,
                    "client_id": samples // 4,
                    "target_index": samples % 4,
                    "scored_against": "original",
                    "psnr": values,
                }
            )
        )
    table = leakage_table(pd.concat(frames, ignore_index=True), psnr, ["none"], [""], "")
    assert not any(cell.bold for row in table.rows for cell in row)
    # Beating the floor on its own samples still marks it.
    frames[1]["psnr"] += 1.0
    table = leakage_table(pd.concat(frames, ignore_index=True), psnr, ["none"], [""], "")
    assert [row[0].text for row in table.rows if row[1].bold] == ["copy"]


def test_a_mean_interval_past_its_measures_range_is_cut_to_it() -> None:
    """Two seeds' accuracies read "0.081 ± 0.241" and LPIPS "0.054 ± 0.056": intervals that
    claim a mean below 0 is plausible (audit BL2)."""
    mean, half, _ = mean_ci(np.array([0.0, 0.162]))
    assert format_ci(mean, half, 3) == f"0.081 ± {half:.3f}"
    assert format_ci(mean, half, 3, 0.0, 1.0) == "0.081 [0.000, 1.000]"
    assert format_ci(0.9, 0.2, 2, 0.0, 1.0) == "0.90 [0.70, 1.00]"
    assert format_ci(0.5, 0.1, 2, 0.0, 1.0) == "0.50 ± 0.10"  # inside: as before
    assert format_ci(0.5, math.nan, 2, 0.0, 1.0) == "0.50"


def test_strongest_is_marked_only_between_separate_intervals() -> None:
    psnr = Metric("psnr", "PSNR", True, 2)
    apart = {"ig": median_interval(np.arange(30.0, 40.0)), "dlg": median_interval(np.arange(10.0))}
    assert strongest(apart, psnr) == "ig"
    close = {"ig": median_interval(np.arange(10.0, 20.0)), "dlg": median_interval(np.arange(15.0))}
    assert strongest(close, psnr) is None
    assert strongest({"ig": apart["ig"]}, psnr) is None  # nothing to be stronger than
    # Behind the floor: the best attack leaks nothing worth marking (the verdict says so).
    floor = {"aux-mean": median_interval(np.arange(40.0, 50.0))}
    assert strongest(apart, psnr, lambda _: floor) is None
    behind = {"aux-mean": median_interval(np.arange(20.0, 30.0))}
    assert strongest(apart, psnr, lambda _: behind) == "ig"


def test_strongest_is_not_marked_on_medians_of_too_few_samples() -> None:
    """One sample each is a point 'interval': any two differ, and one was bolded (audit EC5).
    Below 6 samples the range covers less than 95%."""
    psnr = Metric("psnr", "PSNR", True, 2)
    single = {"ig": median_interval([30.0]), "dlg": median_interval([10.0])}
    assert strongest(single, psnr) is None
    five = {"ig": median_interval(np.arange(30.0, 35.0)), "dlg": median_interval(np.arange(5.0))}
    assert strongest(five, psnr) is None
    six = {"ig": median_interval(np.arange(30.0, 36.0)), "dlg": median_interval(np.arange(6.0))}
    assert strongest(six, psnr) == "ig"


def test_run_tables_match_the_parquet(run_report: Path) -> None:
    leakage = pd.read_parquet(run_report / "leakage.parquet")
    ok = leakage[leakage["status"] == "ok"]
    markdown = (run_report / "report.md").read_text()
    for heading, column, digits in (
        ("PSNR (dB)", "psnr", 2),
        ("LPIPS (AlexNet)", "lpips_alex", 3),
        ("MSE", "mse", 4),
    ):
        table = _table(markdown, heading)
        assert table[0] == ["attack", "none"]
        # Attacks by name, the floor last and labelled as such.
        assert [row[0] for row in table[1:]] == ["dlg", "ig", "aux-mean (floor)"]
        rows = {row[0]: row[1] for row in table[1:]}
        for attack, label in (("aux-mean", "aux-mean (floor)"), ("ig", "ig"), ("dlg", "dlg")):
            expected = _expected(ok.loc[ok["attack"] == attack, column], digits)
            assert rows[label].strip("*") == expected, (heading, attack)
        # ig clearly leaks more than dlg: bold; the floor is never ranked.
        assert rows["ig"].startswith("**")
        assert not rows["dlg"].startswith("**") and not rows["aux-mean (floor)"].startswith("**")
    html = (run_report / "report.html").read_text()
    expected_ig = _expected(ok.loc[ok["attack"] == "ig", "psnr"], 2)
    assert re.search(rf'class="best"[^>]*>{re.escape(expected_ig)}</td>', html)
    success = {row[0]: row[1] for row in _table(markdown, "Success rate")[1:]}
    assert set(success) == {"dlg", "ig"}
    for attack in ("ig", "dlg"):
        k, n = _successes(leakage, attack)
        assert success[attack].startswith(f"{100 * k / n:.0f}% ({k}/{n}) ["), attack
    assert 0 < _successes(leakage, "ig")[0] < _successes(leakage, "ig")[1]  # a mixed result
    summary = {row[1]: row for row in _table(markdown, "Summary")[1:]}
    ig = ok[(ok["attack"] == "ig") & (ok["scored_against"] == "original")]
    # One ig run failed: its samples are in no figure of the row, which says so. One dlg run
    # diverged: its two samples are in the success rate (as not reconstructed), not in n.
    dlg = ok[(ok["attack"] == "dlg") & (ok["scored_against"] == "original")]
    assert summary["ig"][2] == f"{len(ig)} ‡" and summary["dlg"][2] == f"{len(dlg)} ‡"
    assert _successes(leakage, "dlg")[1] == len(dlg) + 2
    k, n = _successes(leakage, "dlg")
    assert summary["dlg"][3].startswith(f"{100 * k / n:.0f}% ({k}/{n}) [")
    assert "‡: some of the attack's runs failed or diverged" in markdown
    assert summary["ig"][6] == _expected_mean(ig["lpips_alex"], 3)
    assert summary["aux-mean (floor)"][3] == "–"
    failures = _table(markdown, "Failed attack runs")
    assert failures[1][1:5] == ["dlg", "none", "nan", "1 of 6"]
    assert failures[2][1:5] == ["ig", "none", "failed", "1 of 6"]


def test_a_diverged_run_recorded_with_one_row_is_left_out_as_before(
    run_report: Path, tmp_path: Path
) -> None:
    # Runs written before diverged runs had a row per sample hold one row with sample -1:
    # nothing says which samples it had, so it is left out, not counted as reconstructing none.
    from fedleak.report.tables import setting_summaries

    def one_row(leakage: pd.DataFrame) -> pd.DataFrame:
        nan = leakage.index[leakage["status"] == "nan"]
        leakage.loc[nan[0], ["sample", "target_index"]] = -1
        return leakage.drop(index=nan[1:])

    legacy = _with_leakage(run_report, tmp_path / "run", one_row)
    summaries = {s.attack: s for s in setting_summaries(load_study(legacy))}
    now = {s.attack: s for s in setting_summaries(load_study(run_report))}
    assert (now["dlg"].diverged, now["dlg"].left_out) == (1, 0)
    assert (summaries["dlg"].diverged, summaries["dlg"].left_out) == (0, 1)
    assert summaries["dlg"].success.n == now["dlg"].success.n - 2


def test_a_private_sample_no_reconstruction_was_matched_to_counts_as_not_reconstructed(
    run_report: Path, tmp_path: Path
) -> None:
    # A Poisson batch larger than declared: the client drew a sample more than every attack
    # reconstructed, and the auditor gave it a row with no reconstruction (sample -1).
    from fedleak.report.tables import setting_summaries

    larger = tmp_path / "run"
    shutil.copytree(run_report, larger)
    leakage = pd.read_parquet(larger / "leakage.parquet")
    scored = leakage[(leakage["status"] == "ok") & (leakage["scored_against"] == "original")]
    first = scored.sort_values(["round", "client_id"]).iloc[0]
    extra = []
    for attack in ("aux-mean", "ig", "dlg"):
        row = scored[scored["attack"] == attack].iloc[0].copy()
        row[["round", "client_id", "sample", "target_index"]] = [
            first["round"],
            first["client_id"],
            -1,
            int(scored["target_index"].max()) + 1,
        ]
        row[["mse", "psnr", "ssim", "lpips_alex", "label_acc"]] = np.nan
        extra.append(row)
    pd.concat([leakage, pd.DataFrame(extra)], ignore_index=True).to_parquet(
        larger / "leakage.parquet"
    )
    (larger / "leakage.csv").unlink()
    before = {s.attack: s for s in setting_summaries(load_study(run_report))}
    after = {s.attack: s for s in setting_summaries(load_study(larger))}
    for attack in ("ig", "dlg"):
        assert after[attack].success.k == before[attack].success.k
        assert after[attack].success.n == before[attack].success.n + 1
        assert after[attack].psnr.n == before[attack].psnr.n  # no metric: in no median
        assert (after[attack].unmatched, before[attack].unmatched) == (1, 0)
    table = summary_tables(load_study(larger))[0]
    assert "§: the success rate also counts, as not reconstructed" in table.caption
    counts = {row[1].text: row[2].text for row in table.rows}
    assert counts["ig"].endswith(" ‡§") and counts["aux-mean (floor)"] == str(
        after["aux-mean"].psnr.n
    )


def test_rounds_that_lost_an_attacks_rows_are_listed(run_report: Path, tmp_path: Path) -> None:
    assert "Incomplete rounds" not in (run_report / "report.md").read_text()
    # A run recorded by a worker pool before rounds were kept whole: dlg's rows of client 3 in
    # round 1 never reached the file.
    lossy = tmp_path / "run"

    def lose(leakage: pd.DataFrame) -> pd.DataFrame:
        lost = (leakage["attack"] == "dlg") & (leakage["round"] == 1) & (leakage["client_id"] == 3)
        return leakage[~lost]

    _with_leakage(run_report, lossy, lose)
    build_report(lossy)
    table = _table((lossy / "report.md").read_text(), "Incomplete rounds")
    assert table == [
        ["run", "round", "attack", "clients without rows"],
        ["fixture", "1", "dlg", "3"],
    ]


def test_verdict_quotes_numbers_from_the_tables(run_report: Path) -> None:
    leakage = pd.read_parquet(run_report / "leakage.parquet")
    markdown = (run_report / "report.md").read_text()
    verdict = markdown.split("## Verdict\n\n", 1)[1].split("\n", 1)[0]
    k, n = _successes(leakage, "ig")
    ok = leakage[(leakage["status"] == "ok") & (leakage["attack"] == "ig")]
    median = float(np.median(ok["psnr"]))
    assert verdict.startswith(
        f"Without a defense, ig leaks most (closest by median LPIPS): it reconstructed {k}/{n} ("
    )
    assert "(1 ig attack run failed and was not counted)" in verdict
    console = " ".join(headline(load_study(run_report)))
    dlg_k, dlg_n = _successes(leakage, "dlg")
    assert f"dlg {dlg_k}/{dlg_n} " in console
    assert "(1 dlg attack run diverged: counted as reconstructing nothing)" in console
    assert f"median PSNR {median:.2f} dB" in verdict
    assert "against the aux-mean floor's" in verdict
    utility = pd.read_csv(run_report / "utility.csv")
    assert f"test accuracy is {utility['test_accuracy'].iloc[-1]:.3f} after round 3" in verdict
    for number in re.findall(r"\d+\.\d+", verdict):
        assert number in markdown.split("## Verdict", 1)[1].split("\n", 3)[3], number


def test_reconstruction_grids_show_ranked_samples(run_report: Path) -> None:
    from fedleak.report.collect import load_study
    from fedleak.report.gallery import ranked, run_samples
    from fedleak.report.tables import originals

    study = load_study(run_report)
    rows = originals(study.leakage())
    ig = rows[rows["attack"] == "ig"]
    samples = run_samples(study.runs[0], ig, "lpips_alex")
    # Every scored ig sample has its tile, matched to its own row (the PSNR check passed).
    assert len(samples) == len(ig)
    chosen = ranked(samples)
    labels = [label for label, _ in chosen]
    assert labels == ["best", "1st quartile", "median", "3rd quartile", "worst"]
    lpips = [sample.lpips for _, sample in chosen]
    assert lpips == sorted(lpips) and lpips[0] == ig["lpips_alex"].min()
    assert lpips[-1] == ig["lpips_alex"].max()
    markdown = (run_report / "report.md").read_text()
    assert "## Reconstructions" in markdown and "reconstructions-00.png" in markdown
    with Image.open(run_report / "report_files" / "reconstructions-00.png") as image:
        assert image.width >= 5 * 100  # tiles upscaled far beyond 12 pixels


def test_the_aggregate_views_reconstructions_are_shown(tmp_path: Path) -> None:
    """The aggregate view's target is client -1, saved as `r001_c-01_ig.png`: the gallery's
    file pattern left it out, and the report had no Reconstructions section."""
    from fedleak.report.collect import load_study
    from fedleak.report.gallery import run_samples
    from fedleak.report.tables import originals

    path = tmp_path / "aggregate"
    _make_run(path, clients=(-1,))
    assert (path / "images" / "r001_c-01_ig.png").exists()
    study = load_study(path)
    rows = originals(study.leakage())
    ig = rows[rows["attack"] == "ig"]
    assert len(run_samples(study.runs[0], ig, "lpips_alex")) == len(ig) > 0
    build_report(path)
    markdown = (path / "report.md").read_text()
    assert "## Reconstructions" in markdown and "reconstructions-00.png" in markdown


def test_legacy_runs_without_the_reference_column_draw_aux_mean_as_the_floor(
    run_report: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "legacy"
    shutil.copytree(run_report, copy)
    frame = pd.read_parquet(copy / "leakage.parquet").drop(columns=["reference"])
    frame.to_parquet(copy / "leakage.parquet")
    build_report(copy)
    table = _table((copy / "report.md").read_text(), "PSNR (dB)")
    assert [row[0] for row in table[1:]] == ["dlg", "ig", "aux-mean (floor)"]


def test_fedleak_report_on_a_sweep_rebuilds_every_cell_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A sweep written by an earlier fedleak: its cells' reports must not stay stale.
    sweep = tmp_path / "sweep"
    cells = ("cell-000-none", "cell-001-sign")
    for cell in cells:
        _make_run(sweep / cell, rounds=1)
        (sweep / cell / "report.md").write_text("# fedleak report: old\n")
    manifest = [{"id": cell, "index": i, "status": "done"} for i, cell in enumerate(cells)]
    (sweep / "sweep.json").write_text(json.dumps({"name": "old", "cells": manifest}))
    assert main(["report", str(sweep)]) == 0
    assert "cell reports: 2 rebuilt" in capsys.readouterr().out
    for cell in cells:
        assert "## Verdict" in (sweep / cell / "report.md").read_text()
        assert (sweep / cell / "report.html").exists()
    assert "## Verdict" in (sweep / "report.md").read_text()


def test_the_console_summary_of_a_run_without_attacks_is_not_called_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = parse_flat({"num-server-rounds": 1, "attack.names": "none"})
    run = RunDirectory.create(tmp_path / "run", config, {})
    run.append_round(1, [], {"test_loss": 1.0, "test_accuracy": 0.5})
    _headline(run.path)
    out = capsys.readouterr().out
    assert "what leaked (reconstructed = beats every floor" in out and "token" not in out


def test_an_image_run_whose_every_attack_run_diverged_keeps_the_image_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With nothing scored it got the language task's summary (token accuracy, "against the
    private sequences"), and the report and console blamed metrics.lpips-nets (audit CH1,
    CH3)."""
    config = parse_flat({"num-server-rounds": 1, "attack.names": "idlg"})
    run = RunDirectory.create(tmp_path / "run", config, {"data": {"modality": "image"}})
    diverged = [
        {
            "client_id": client,
            "attack": "idlg",
            "sample": 0,
            "target_index": 0,
            "status": "nan",
            "message": "reconstruction contains NaN or inf",
        }
        for client in (0, 1)
    ]
    run.append_round(1, diverged, {"test_loss": 1.0, "test_accuracy": 0.5})
    _headline(run.path)
    out = capsys.readouterr().out
    assert "not decided: nothing was scored against a private sample" in out, out
    assert "lpips-nets" not in out
    build_report(run.path)
    report = (run.path / "report.md").read_text(encoding="utf-8")
    summary = _table(report, "Summary")
    assert "PSNR median (dB)" in summary[0] and not any("token" in c for c in summary[0])
    assert summary[1][summary[0].index("attack")] == "idlg"
    assert "no attack run returned a reconstruction to score" in report
    assert "metrics.lpips-nets" not in report


def test_a_run_without_ground_truth_does_not_blame_the_lpips_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows of clients that declared no batch (scored against nothing) were said to lack
    LPIPS because of metrics.lpips-nets (audit CO3)."""
    config = parse_flat({"num-server-rounds": 1, "attack.names": "idlg"})
    run = RunDirectory.create(tmp_path / "run", config, {"data": {"modality": "image"}})
    rows = [
        {
            "client_id": client,
            "attack": "idlg",
            "sample": sample,
            "target_index": -1,
            "scored_against": "unavailable",
        }
        for client in (0, 1)
        for sample in (0, 1)
    ]
    run.append_round(1, rows, {"test_loss": 1.0, "test_accuracy": 0.5})
    _headline(run.path)
    out = capsys.readouterr().out
    assert "nothing was scored against a private sample" in out and "lpips-nets" not in out
    build_report(run.path)
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "or no client declared its batch" in report and "metrics.lpips-nets" not in report


def test_a_run_that_failed_before_its_first_round_says_why(tmp_path: Path) -> None:
    """Its report and summary said only that no round had finished (audit AV D2)."""
    config = parse_flat({"num-server-rounds": 2, "attack.names": "aux-mean"})
    run = RunDirectory.create(tmp_path / "run", config, {})
    run.mark_failed("ClientsMissing: 2 of 3 clients connected within sim.timeout=30 s")
    build_report(run.path)
    for name in ("report.md", "report.html"):
        text = (run.path / name).read_text()
        assert "The run failed (ClientsMissing: 2 of 3 clients connected" in text, name
        assert "No round has finished yet" in text, name


def test_a_text_run_without_attacks_is_described_as_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # With no rows to read the modality from, a language run's console summary and report
    # spoke of images, LPIPS and aux-mean.
    config = parse_flat({"num-server-rounds": 1, "attack.names": "none"})
    run = RunDirectory.create(tmp_path / "run", config, {"data": {"modality": "tokens"}})
    run.append_round(1, [], {"test_loss": 1.0, "test_accuracy": 0.5})
    _headline(run.path)
    out = capsys.readouterr().out
    assert "what leaked (token accuracy = share of positions recovered)" in out
    build_report(run.path)
    report = (run.path / "report.md").read_text(encoding="utf-8")
    method = report.split("## How to read this report")[1].split("\n## ")[0]
    assert "token sequence" in method and "LPIPS" not in method and "aux-mean" not in method


def test_central_dp_is_a_defense_column_not_an_undefended_group(tmp_path: Path) -> None:
    # The dp-frontier layout: cells differ by the clients' spec or by central DP on the server.
    sweep = tmp_path / "sweep"
    cells = {"cell-000-none": (0.0, 0.0), "cell-001-central": (0.1, 1.0)}
    for cell, central in cells.items():
        _make_run(sweep / cell, rounds=2, central=central)
    manifest = [{"id": cell, "index": i, "status": "done"} for i, cell in enumerate(cells)]
    (sweep / "sweep.json").write_text(json.dumps({"name": "dp", "cells": manifest}))
    build_report(sweep)
    markdown = (sweep / "report.md").read_text()
    assert _table(markdown, "PSNR (dB)")[0] == ["attack", "none", "central-dp:0.1:1"]
    assert "Under central-dp:0.1:1, " in markdown
    assert "against 0.300 without the defense" in markdown
    assert "Without a defense (" not in markdown and "central-clip=" not in markdown


def test_perplexity_is_given_for_the_language_settings_of_a_mixed_sweep_only(
    tmp_path: Path,
) -> None:
    from fedleak.report.tables import utility_table

    sweep = tmp_path / "sweep"
    cells = {"cell-000-image": "none", "cell-001-text": "sign"}
    for cell, defense in cells.items():
        _make_run(sweep / cell, rounds=2, defense=defense)
    environment = json.loads((sweep / "cell-001-text" / "environment.json").read_text())
    environment["data"] = {"modality": "tokens"}
    (sweep / "cell-001-text" / "environment.json").write_text(json.dumps(environment))
    manifest = [{"id": cell, "index": i, "status": "done"} for i, cell in enumerate(cells)]
    (sweep / "sweep.json").write_text(json.dumps({"name": "mixed", "cells": manifest}))
    table = utility_table(load_study(sweep))
    column = table.columns.index("final perplexity")
    perplexity = {row[1].text: row[column].text for row in table.rows}
    # Final loss 2.3 - 0.2 x 2: e^1.9 for the text run, none for the image run's LeNet.
    assert perplexity == {"none": "–", "sign": f"{math.exp(1.9):.1f}"}


def test_a_sweep_of_both_tasks_gets_a_summary_table_for_each(tmp_path: Path) -> None:
    """The language settings of a mixed sweep sat in the image table as "n 0, not decided"
    while their token accuracy appeared only further down (audit CO1)."""
    from fedleak.report.tables import summary_tables

    sweep = tmp_path / "sweep"
    cells = {"cell-000-image": "none", "cell-001-text": "sign"}
    for cell, defense in cells.items():
        _make_run(sweep / cell, rounds=3, defense=defense)
    text = sweep / "cell-001-text"
    environment = json.loads((text / "environment.json").read_text())
    environment["data"] = {"modality": "tokens"}
    (text / "environment.json").write_text(json.dumps(environment))
    rows = pd.read_parquet(text / "leakage.parquet")
    rows["token_acc"] = np.where(rows["status"] == "ok", 0.5, np.nan)
    rows[["psnr", "mse", "ssim", "lpips_alex"]] = np.nan
    rows.to_parquet(text / "leakage.parquet")
    (text / "leakage.csv").unlink()
    manifest = [{"id": cell, "index": i, "status": "done"} for i, cell in enumerate(cells)]
    (sweep / "sweep.json").write_text(json.dumps({"name": "mixed", "cells": manifest}))
    image, language = summary_tables(load_study(sweep))
    assert "PSNR median (dB)" in image.columns and "token accuracy median" in language.columns
    defense = image.columns.index("defense")
    assert {row[defense].text for row in image.rows} == {"none"}
    assert {row[language.columns.index("defense")].text for row in language.rows} == {"sign"}
    # Both hold a failed and a diverged run (‡); the text table has no success rate (CO5).
    assert "the success rate compares each sample with the floor" in image.caption
    assert "‡" in language.caption and "success rate" not in language.caption


def test_a_settings_epsilon_is_the_largest_of_its_runs_at_the_stated_delta(
    tmp_path: Path,
) -> None:
    """Seeds whose runs spent 6.53, 6.14 and 6.14 were shown as their mean, 6.27: less than
    seed 0's run spent, with no δ and no word that it was the worst client's."""
    from fedleak.report.tables import utility_table

    sweep = tmp_path / "sweep"
    cells = [f"cell-00{seed}-dpsgd_seed{seed}" for seed in range(3)]
    for seed, (cell, spent) in enumerate(zip(cells, (6.532, 6.139, 6.139), strict=True)):
        _make_run(sweep / cell, rounds=2, seed=seed, defense="dpsgd:1:1", epsilon=True)
        utility = pd.read_csv(sweep / cell / "utility.csv")
        utility.loc[utility["round"] == 2, "epsilon"] = spent
        utility.to_csv(sweep / cell / "utility.csv", index=False)
    manifest = [{"id": cell, "index": i, "status": "done"} for i, cell in enumerate(cells)]
    (sweep / "sweep.json").write_text(json.dumps({"name": "dp", "cells": manifest}))
    study = load_study(sweep)
    table = utility_table(study)
    assert [row[table.columns.index("ε")].text for row in table.rows] == ["6.53"]
    assert "the worst client's" in table.caption and "δ = 1e-05" in table.caption
    assert _frontier_points(study)["epsilon"].unique().tolist() == [6.532]


def test_a_model_whose_test_loss_stops_being_finite_is_called_diverged(tmp_path: Path) -> None:
    """A global model trained to NaN read as accuracy "–", as if nothing had been measured
    (audit BQ2); one diverged seed among others was silently left out of their mean."""
    from fedleak.report.tables import utility_table
    from fedleak.report.verdict import headline, verdict

    sweep = tmp_path / "sweep"
    cells = [f"cell-00{seed}-none_seed{seed}" for seed in range(3)]
    for seed, cell in enumerate(cells):
        _make_run(sweep / cell, rounds=3, seed=seed)
    manifest = [{"id": cell, "index": i, "status": "done"} for i, cell in enumerate(cells)]
    (sweep / "sweep.json").write_text(json.dumps({"name": "lr", "cells": manifest}))

    def diverge(cell: str) -> None:
        utility = pd.read_csv(sweep / cell / "utility.csv")
        utility.loc[utility["round"] >= 2, ["test_loss", "test_accuracy"]] = math.nan
        utility.to_csv(sweep / cell / "utility.csv", index=False)

    diverge(cells[0])
    text = verdict(load_study(sweep))
    assert (
        "test accuracy is 0.415 after round 3 (the mean of its 2 runs; cell-000-none_seed0 "
        "left out: its test loss is not finite from round 2 on (diverged); round 0: 0.110)." in text
    )
    table = utility_table(load_study(sweep))
    final = [row[table.columns.index("final accuracy")].text for row in table.rows]
    assert final[0].endswith(" (1 diverged)")  # a mean over the other 2 runs, and says so
    for cell in cells[1:]:
        diverge(cell)
    study = load_study(sweep)
    table = utility_table(study)
    assert [row[table.columns.index("final accuracy")].text for row in table.rows] == ["diverged"]
    assert (
        "The global model diverged: its test loss is not finite from round 2 on (round 0: "
        "accuracy 0.110), so the updates attacked since it did" in verdict(study)
    )
    assert "accuracy 0.110 -> diverged" in headline(study)[-1]


def test_the_utility_table_cuts_a_wide_interval_to_the_accuracy_range(tmp_path: Path) -> None:
    from fedleak.report.tables import CUT_NOTE, utility_table

    sweep = tmp_path / "sweep"
    cells = [f"cell-00{seed}-none_seed{seed}" for seed in range(2)]
    for seed, (cell, accuracy) in enumerate(zip(cells, (0.0, 0.162), strict=True)):
        _make_run(sweep / cell, rounds=2, seed=seed)
        utility = pd.read_csv(sweep / cell / "utility.csv")
        utility.loc[utility["round"] == 2, "test_accuracy"] = accuracy
        utility.to_csv(sweep / cell / "utility.csv", index=False)
    manifest = [{"id": cell, "index": i, "status": "done"} for i, cell in enumerate(cells)]
    (sweep / "sweep.json").write_text(json.dumps({"name": "seeds", "cells": manifest}))
    table = utility_table(load_study(sweep))
    assert [row[table.columns.index("final accuracy")].text for row in table.rows] == [
        "0.081 [0.000, 1.000]"
    ]
    assert CUT_NOTE in table.caption


def test_poisson_sampling_is_a_defense_column_not_a_group(tmp_path: Path) -> None:
    # The dp-frontier's last cell: the same DP-SGD spec, batches drawn by Poisson sampling.
    sweep = tmp_path / "sweep"
    cells = {"cell-000-fixed": "fixed", "cell-001-poisson": "poisson"}
    for cell, sampling in cells.items():
        _make_run(sweep / cell, rounds=2, defense="dpsgd:1:1", dp_sampling=sampling)
    manifest = [{"id": cell, "index": i, "status": "done"} for i, cell in enumerate(cells)]
    (sweep / "sweep.json").write_text(json.dumps({"name": "dp", "cells": manifest}))
    build_report(sweep)
    markdown = (sweep / "report.md").read_text()
    assert _table(markdown, "PSNR (dB)")[0] == ["attack", "dpsgd:1:1", "dpsgd:1:1 (poisson)"]
    assert "dp-sampling=" not in markdown


def test_sweep_tables_group_and_separate_encoded_scores(sweep_report: Path) -> None:
    leakage = pd.concat(
        [pd.read_parquet(p) for p in sorted(sweep_report.glob("cell-*/leakage.parquet"))]
    )
    ok = leakage[leakage["status"] == "ok"]
    markdown = (sweep_report / "report.md").read_text()
    original = _table(markdown, "PSNR (dB)", 0)
    encoded = _table(markdown, "PSNR (dB)", 1)
    assert original[0] == ["group", "attack", "none", "instahide:2"]
    assert encoded[0] == ["group", "attack", "instahide:2"]
    assert "scored against the encoded images" in markdown
    # Labels are scored against each encoded sample's own label in both views: one table.
    labels = markdown.split("\n### label accuracy\n", 1)[1].split("\n### ", 1)[0]
    assert len(re.findall(r"^\| group \| attack", labels, flags=re.M)) == 1
    assert "each encoded sample's own label" in labels
    # One encoded cell took the chance sentence from every column (audit DF2): it is the
    # plain cells' now, and says so.
    assert "Chance where no encoding mixed the labels: labels drawn" in labels
    from fedleak.report.tables import _without_encoded_batches

    study_rows = load_study(sweep_report).leakage()
    plain = _without_encoded_batches(study_rows, study_rows)
    assert (
        set(plain["defense"]) == {"none"} and len(plain) == (study_rows["defense"] == "none").sum()
    )
    cells = {(row[0], row[1].removesuffix(" (floor)")): row[2:] for row in original[1:]}
    for batch in (1, 4):
        for attack in ("aux-mean", "ig", "dlg"):
            for i, defense in enumerate(("none", "instahide:2")):
                values = ok.loc[
                    (ok["batch_size"] == batch)
                    & (ok["attack"] == attack)
                    & (ok["defense"] == defense)
                    & (ok["scored_against"] == "original"),
                    "psnr",
                ]
                got = cells[f"batch-size={batch}", attack][i].strip("*")
                assert got == _expected(values, 2), (batch, attack, defense)
    utility = _table(markdown, "## Privacy–utility frontier")
    assert utility[0][:6] == [
        "group",
        "defense",
        "round-0 accuracy",
        "final accuracy",
        "final loss",
        "ε",
    ]
    rows = {(row[0], row[1]): row for row in utility[1:]}
    # Final round 2: accuracy 0.3 + 0.01 * seed over seeds 0 and 1; ε = 0.4 * round.
    accuracy = pd.Series([0.30, 0.31])
    assert rows["batch-size=1", "instahide:2"][3] == _expected_mean(accuracy, 3)
    assert rows["batch-size=1", "instahide:2"][5] == "0.80"
    assert rows["batch-size=4", "none"][5] == "–"
    assert "privacy-utility.png" in markdown


def _img_sources(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)


def _check_data_uri(src: str) -> tuple[int, int]:
    assert src.startswith("data:image/png;base64,"), src[:60]
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as img:
        img.load()
        return img.size


@pytest.mark.parametrize("which", ["run_report", "sweep_report"])
def test_every_referenced_image_exists(which: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(which)
    markdown = (path / "report.md").read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(refs) >= 2 and all(ref.startswith("report_files/") for ref in refs)
    assert "report_files/leakage-per-round.png" in refs
    assert any(ref.startswith("report_files/reconstructions-") for ref in refs)
    # The success panel's band is the rate's own interval, not a median's (audit BL3).
    assert (
        "_Per round, against the private originals: the success rate (band: its exact "
        "(Clopper–Pearson) 95% interval) and the median of each metric" in markdown
    )
    for ref in refs:
        with Image.open(path / ref) as img:
            img.load()
    sources = _img_sources((path / "report.html").read_text())
    assert len(sources) == len(refs)
    for src in sources:
        _check_data_uri(src)
    assert "http://" not in (path / "report.html").read_text().replace("http://www.w3", "")


def test_report_rebuilds_from_files_alone(run_report: Path, tmp_path: Path) -> None:
    # A copy elsewhere rebuilds to the same bytes: reports named the folder's absolute path,
    # which also showed where the author keeps files (audit BS2).
    copy = tmp_path / "elsewhere é" / run_report.name
    shutil.copytree(run_report, copy)
    (copy / "report.html").unlink()
    shutil.rmtree(copy / "report_files")
    html, markdown = build_report(copy)
    assert markdown.read_bytes() == (run_report / "report.md").read_bytes()
    assert html.read_bytes() == (run_report / "report.html").read_bytes()
    assert str(run_report.parent) not in markdown.read_text()


def test_a_report_that_cannot_be_rebuilt_is_removed_not_left_stale(
    run_report: Path, tmp_path: Path
) -> None:
    """Audit BG4: an unreadable image (or a damaged environment.json) failed the rebuild in
    one line (or as an internal error) and left the earlier report showing."""
    from fedleak.report.build import rebuild_reports

    copy = tmp_path / "copied"
    shutil.copytree(run_report, copy)
    grid = copy / "images" / "r001_c000_ig.png"
    grid.write_bytes(b"not a png")
    with pytest.raises(RunDirectoryError, match=rf"{grid.name}: unreadable image \("):
        rebuild_reports(copy)
    assert not (copy / "report.html").exists() and not (copy / "report.md").exists()
    assert not (copy / "report_files").exists()
    grid.unlink()  # as the message says: its samples leave the gallery
    rebuild_reports(copy)
    environment = json.loads((copy / "environment.json").read_text())
    (copy / "environment.json").write_text(json.dumps({**environment, "lpips": "zz"}))
    with pytest.raises(RunDirectoryError, match="'lpips' is a str, not a JSON object"):
        rebuild_reports(copy)
    assert not (copy / "report.html").exists()


def test_figures_are_never_written_into_a_users_files(run_report: Path, tmp_path: Path) -> None:
    """Audit BG5: a run folder from elsewhere with report_files/ linked to a folder of the
    user's got fedleak's figures written into it, over a file of a figure's name."""
    from fedleak.report.build import rebuild_reports

    copy = tmp_path / "copied"
    shutil.copytree(run_report, copy)
    shutil.rmtree(copy / "report_files")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "leakage-per-round.png").write_text("keep")
    (copy / "report_files").symlink_to(mine)
    with pytest.raises(RunDirectoryError, match="report_files: a symbolic link"):
        build_report(copy)
    assert [p.name for p in mine.iterdir()] == ["leakage-per-round.png"]
    assert (mine / "leakage-per-round.png").read_text() == "keep"
    # Not linked, but a user's file of a figure's name that fedleak's list of its own files
    # does not hold: refused too, and the reports there stay as they were.
    (copy / "report_files").unlink()
    build_report(copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    (copy / "report_files" / "reconstructions-00.png").unlink()
    owned = copy / "report_files" / ".fedleak-files"
    owned.write_text(json.dumps(["leakage-per-round.png"]))
    (copy / "report_files" / "reconstructions-00.png").write_text("keep")
    with pytest.raises(RunDirectoryError, match=r"reconstructions-00\.png: exists and was not"):
        rebuild_reports(copy)
    assert (copy / "report_files" / "reconstructions-00.png").read_text() == "keep"
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    # A report_files/ without that list (fedleak kept none before 30 November 2026): its
    # figures are fedleak's, and the report is rebuilt over them (audit BI R3).
    (copy / "report_files" / "reconstructions-00.png").unlink()
    owned.unlink()
    rebuild_reports(copy)
    assert json.loads(owned.read_text()) == ["leakage-per-round.png", "reconstructions-00.png"]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("which", ["run_report", "sweep_report"])
def test_chromium_renders_every_image(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path: Path = request.getfixturevalue(which)
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2000",
    ]
    url = (path / "report.html").as_uri()
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    sources = _img_sources(dom)
    assert len(sources) >= 2
    for src in sources:
        width, height = _check_data_uri(src)
        assert width > 0 and height > 0
    # The plots and the reconstruction grids are in the rendered page, after the verdict.
    alts = re.findall(r'<img[^>]*\salt="([^"]*)"', dom)
    assert any(alt.startswith("Per round, against the private originals") for alt in alts)
    assert any("its private samples (top row) and its reconstructions" in alt for alt in alts)
    assert dom.index('id="verdict"') < dom.index('id="leakage-per-round"')
    shot = tmp_path / "page.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True
    )
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2000, 1280) and pixels.std() > 10  # a rendered page, not blank


def test_attack_runs_that_did_not_converge_are_marked() -> None:
    from fedleak.attacks.types import CONVERGED_RATIO
    from fedleak.report.tables import (
        CONVERGENCE_NOTE,
        METRICS,
        judged_runs,
        leakage_table,
        not_converged,
    )

    rows = pd.DataFrame(
        {
            "run": "r",
            "group": "",
            "defense": "none",
            "round": 1,
            "client_id": [0, 0, 1, 1],
            "attack": "ig",
            "reference": False,
            "psnr": [30.0, 31.0, 5.0, 6.0],
            "converged": [1.0, 1.0, 0.0, 0.0],
        }
    )
    assert not_converged(rows) == 1  # one attack run (client 1) of two
    assert judged_runs(rows) == 2 and judged_runs(rows.assign(converged=math.nan)) == 0
    # Per-sample updates: each sample inverted on its own, so a run whose first sample
    # converged may hold one that did not; it counts, and a run with none judged does not.
    per_sample = rows.assign(client_id=[0, 0, 0, 1], converged=[1.0, 0.0, math.nan, math.nan])
    assert not_converged(per_sample) == 1 and judged_runs(per_sample) == 1
    assert not_converged(per_sample.assign(converged=[1.0, 1.0, math.nan, 1.0])) == 0
    assert CONVERGED_RATIO == 0.1 and "tenfold" in CONVERGENCE_NOTE  # the caption states it
    table = leakage_table(rows, METRICS[0], ["none"], [""], "")
    assert table.rows[0][1].text == "18.00 [5.00, 31.00] n=4 †"
    # Runs written before the convergence columns existed carry no mark.
    assert not_converged(rows.drop(columns="converged")) == 0
    plain = leakage_table(rows.drop(columns="converged"), METRICS[0], ["none"], [""], "")
    assert plain.rows[0][1].text == "18.00 [5.00, 31.00] n=4"


def test_a_text_report_marks_unconverged_tag_runs_and_renders_code(tmp_path: Path) -> None:
    """A text run at the frequency floor: TAG's two attack runs cut their loss less than
    tenfold, so every place that ranks it says so; `code` reads as code in the HTML."""
    config = parse_flat({"name": "text", "num-server-rounds": 1, "attack.names": "tag"})
    environment = {
        "torch": torch.__version__,
        "cuda": None,
        "lpips": {},
        "data": {"modality": "tokens", "tokenizer": {"kind": "bpe", "vocab_size": 512}},
    }
    run = RunDirectory.create(tmp_path / "run", config, environment)
    rows = [
        {
            "client_id": client,
            "attack": attack,
            "reference": attack == "aux-frequency",
            "sample": sample,
            "target_index": sample,
            "modality": "tokens",
            "token_acc": 0.125 if attack == "aux-frequency" else 0.0,
            "rougeL": 0.0,
            **(
                {"loss_start": 240.0, "loss_final": 66.0, "converged": 0.0}
                if attack == "tag"
                else {}
            ),
        }
        for client in (0, 1)
        for attack in ("tag", "aux-frequency")
        for sample in (0, 1)
    ]
    run.append_round(1, rows, {"test_loss": 6.3, "test_accuracy": 0.007})
    html, markdown = build_report(run.path)
    text = markdown.read_text()
    # The floors a text run reads against are its own, not the image ones.
    assert "aux-frequency, the most frequent auxiliary token at every position" in text
    assert "aux-mean" not in text and "private images" not in text
    summary = _table(text, "Summary")
    assert summary[0][-1] == "not converged (attack runs)"
    # tag, then the floor, which matches no loss: neither converged nor not.
    assert [row[-1] for row in summary[1:]] == ["2 of 2", "–"]
    # The dash also marks TAG under sign, whose hinge's fall judges nothing: not "a learned
    # attack or a floor" alone (audit DX2).
    assert "or its loss's fall does not mark a fit (a sign hinge" in text
    assert _table(text, "token accuracy")[1] == ["tag", "0.000 [0.000, 0.000] n=4 †"]
    assert "(tag did not converge in 2 of 2 attack runs: its budget ran out" in text
    assert (
        "tag a median 0.000 of the tokens (not converged in 2 of 2 runs) (below the floor)"
        in "".join(headline(load_study(run.path)))
    )
    # The environment reads as dotted keys and plain values, not JSON.
    environment_rows = _table(text, "## Environment")[1:]
    assert environment_rows[environment_rows.index(["torch", torch.__version__]) :] == [
        ["torch", torch.__version__],
        ["cuda", "–"],
        ["lpips", "–"],
        ["data.modality", "tokens"],
        ["data.tokenizer.kind", "bpe"],
        ["data.tokenizer.vocab_size", "512"],
    ]
    page = html.read_text()
    assert "<code>rouge-score</code>" in page and "`" not in re.sub(r"<pre>.*?</pre>", "", page)


def test_an_aggregate_text_run_shows_its_reconstructed_text(tmp_path: Path) -> None:
    """The aggregate view's one target per round is client -1, saved as `c-01`: the report
    dropped its "Reconstructed text" section without a word."""
    from fedleak.report.texts import save_token_pairs

    config = parse_flat({"name": "text", "num-server-rounds": 1, "attack.names": "tag"})
    environment = {"data": {"modality": "tokens"}}
    run = RunDirectory.create(tmp_path / "run", config, environment)
    truth = torch.tensor([[1, 2, 3], [4, 5, 6]])
    guess = torch.tensor([[1, 2, 0], [4, 0, 0]])
    save_token_pairs(run.path, 1, -1, "tag", truth, guess, lambda ids: [f"t{i}" for i in ids])
    rows = [
        {
            "client_id": -1,
            "attack": "tag",
            "sample": sample,
            "target_index": sample,
            "modality": "tokens",
            "token_acc": accuracy,
        }
        for sample, accuracy in ((0, 2 / 3), (1, 1 / 3))
    ]
    run.append_round(1, rows, {"test_loss": 6.3, "test_accuracy": 0.007})
    _, markdown = build_report(run.path)
    text = markdown.read_text()
    assert "## Reconstructed text" in text
    assert "### round 1, aggregate, sequence 0" in text
    assert "tag (2/3 tokens): “t1t2t0”" in text


def test_the_training_table_reads_the_hybrids_inverter_not_its_optimiser(tmp_path: Path) -> None:
    """`lti+ig` keeps its inverter's warm start and stop as `lti_*`, IG's own `stopped_by`
    beside them: the table called every round of it "from scratch"."""
    from fedleak.report.tables import training_table

    config = parse_flat({"name": "hybrid", "num-server-rounds": 3, "attack.names": "lti+ig"})
    run = RunDirectory.create(tmp_path / "run", config, {})
    trained = {"train_seconds": 1.0, "val_psnr": 14.0, "stopped_by": "iterations"}
    hows = {
        1: {"train_epochs": 4, "lti_warm_start": 0.0, "lti_stopped_by": "epochs"},
        2: {"train_epochs": 2, "lti_warm_start": 1.0, "lti_stopped_by": "epochs"},
        3: {"train_epochs": 0, "lti_warm_start": 0.0, "lti_stopped_by": "reused"},
    }
    for server_round, how in hows.items():
        row = {
            "client_id": 0,
            "attack": "lti+ig",
            "sample": 0,
            "psnr": 14.0,
            "diagnostics": json.dumps({**trained, **how}),
        }
        run.append_round(server_round, [row], {"test_loss": 2.0, "test_accuracy": 0.1})
    table = training_table(load_study(run.path))
    assert table is not None
    assert [row[-1].text for row in table.rows] == ["from scratch", "warm start", "reused"]


def test_a_gallery_pooling_seeds_says_each_tiles_seed(sweep_report: Path) -> None:
    """A sweep's gallery pools a setting's seeds: two tiles could both read "round 2,
    client 1" and show different images; each then says its run's seed too."""
    from fedleak.report.collect import load_study
    from fedleak.report.gallery import _LINE, gallery_figure, run_samples

    study = load_study(sweep_report)
    rows = study.leakage()
    rows = rows[(rows["attack"] == "ig") & (rows["scored_against"] == "original")]
    pooled = [
        sample
        for name, run_rows in rows.groupby("run")
        for sample in run_samples(
            next(r for r in study.runs if r.name == name), run_rows, "lpips_alex"
        )
    ]
    assert {sample.seed for sample in pooled} == {0, 1}
    one_seed = [s for s in pooled if s.seed == 0][:2]
    two_seeds = one_seed[:1] + [s for s in pooled if s.seed == 1][:1]
    heights = []
    for chosen in (one_seed, two_seeds):
        figure = gallery_figure({"ig": list(zip("ab", chosen, strict=True))}, "LPIPS")
        with Image.open(io.BytesIO(figure)) as image:
            heights.append(image.height)
    assert heights[1] == heights[0] + _LINE  # the line that names the seed


def test_a_gallery_of_narrow_images_leaves_each_caption_its_column() -> None:
    """Images narrower than their caption ("round 1, client 0"): the caption ran into the next
    column's (audit AP7)."""
    from PIL import ImageDraw

    from fedleak.report.gallery import _GAP, _LABEL_WIDTH, Sample, _font, gallery_figure

    narrow = np.zeros((20, 12, 3), dtype=np.uint8)
    samples = [Sample(narrow, narrow, 20.0, 0.1, 1, client, False) for client in (0, 1)]
    figure = gallery_figure({"ig": list(zip("ab", samples, strict=True))}, "LPIPS")
    with Image.open(io.BytesIO(figure)) as image:
        column = (image.width - _LABEL_WIDTH) / 2 - _GAP
    caption = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength("round 1, client 0", _font(12))
    assert column >= caption > 12 * 6  # wider than the enlarged tile


def test_a_gallery_of_thin_images_keeps_its_labels_apart() -> None:
    """1 x 40 signals were 3 px rows, and the "private" and attack labels centred on them were
    drawn over each other (audit FB3)."""
    from fedleak.report.gallery import _LINE, Sample, gallery_figure, tile_scale

    assert tile_scale(28, 28) == 4 and tile_scale(32, 32) == 4  # square tiles as before
    assert tile_scale(20, 36) == 4
    # Not enlarged further than their long side asks: five columns of 1 x 40 at 11 x 440 made
    # a 2,420 px figure that the report shrank to unreadable captions (audit FC1).
    assert (tile_scale(1, 40), tile_scale(40, 1), tile_scale(1, 2000)) == (3, 3, 1)
    heights, widths = [], []
    for shape in ((1, 40, 3), (1, 2000, 3)):
        thin = np.zeros(shape, dtype=np.uint8)
        chosen = [(label, Sample(thin, thin, 20.0, 0.1, 1, 0, False)) for label in "abcde"]
        with Image.open(io.BytesIO(gallery_figure({"ig": chosen}, "LPIPS"))) as image:
            heights.append(image.height)
            widths.append(image.width)
    # Two rows (private, reconstruction) each a label high, whatever the tile's height.
    assert heights[0] == heights[1]
    assert widths[0] <= 1200  # within the report's column, shown at full size
    square = np.zeros((28, 28, 3), dtype=np.uint8)
    sample = Sample(square, square, 20.0, 0.1, 1, 0, False)
    with Image.open(io.BytesIO(gallery_figure({"ig": [("a", sample)]}, "LPIPS"))) as image:
        assert image.height - heights[0] == 2 * (28 * 4 - _LINE)


def test_a_verdict_without_lpips_compares_with_the_floor_by_psnr(tmp_path: Path) -> None:
    """With metrics.lpips-nets = "none" the floor was dropped (it needed LPIPS), an attack
    below it was called the leader, and "(success not decidable: ...)" was spliced into
    "it reconstructed ... of the private samples"."""
    from fedleak.report.collect import load_study
    from fedleak.report.verdict import verdict

    path = tmp_path / "no-lpips"
    _make_run(path)
    rows = pd.read_parquet(path / "leakage.parquet")
    rows["lpips_alex"] = math.nan
    rows.to_parquet(path / "leakage.parquet", index=False)
    text = verdict(load_study(path))
    assert text.startswith(
        "Without a defense, ig leaks most (highest median PSNR): it scored median PSNR 21.19 dB "
        "(success not decided: no LPIPS measured) against the aux-mean floor's median PSNR "
        "10.73 dB"
    )
    assert "dlg (success not decided: no LPIPS measured), median PSNR 10.28 dB, no closer " in text
    # Only attacks below the floor: none is named as leaking.
    rows = rows[rows["attack"] != "ig"]
    rows.to_parquet(path / "leakage.parquet", index=False)
    text = verdict(load_study(path))
    assert text.startswith(
        "Without a defense, no attack got closer than the aux-mean floor (median PSNR 10.73 dB): "
        "the closest, dlg, scored median PSNR 10.28 dB (success not decided: no LPIPS measured)"
    )


def test_a_report_without_lpips_does_not_describe_its_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no LPIPS measured, the report still said how LPIPS was taken and stated the
    success rule as applied, and the console the rule's thresholds (audit BH3)."""
    path = tmp_path / "no-lpips"
    _make_run(path)
    rows = pd.read_parquet(path / "leakage.parquet")
    rows["lpips_alex"] = math.nan
    rows.to_parquet(path / "leakage.parquet", index=False)
    build_report(path)
    markdown = (path / "report.md").read_text()
    assert "LPIPS was not measured." in markdown
    assert "LPIPS is reported from" not in markdown and "AlexNet) is at most" not in markdown
    assert markdown.count("No sample's success is decided") == 2  # method and summary table
    _headline(path)
    assert "what leaked (reconstructed = not decided: no AlexNet LPIPS" in capsys.readouterr().out


def test_a_protocol_the_clients_declared_is_said_beside_the_configuration(
    tmp_path: Path,
) -> None:
    """An audited app's report showed only fedleak's own train.* (batch size 1, one local
    step) beside rows of clients that declared batch 2 (audit BC8)."""
    path = tmp_path / "audited"
    _make_run(path)
    build_report(path)
    assert "declared another protocol" not in (path / "report.md").read_text()
    rows = pd.read_parquet(path / "leakage.parquet")
    rows["batch_size"] = 7
    rows.to_parquet(path / "leakage.parquet", index=False)
    build_report(path)
    assert (
        "The attacked clients declared another protocol than `train.*` below (batch size 7)"
        in (path / "report.md").read_text()
    )


def test_two_floors_are_drawn_apart() -> None:
    """aux-mean and class-mean were both grey dashed lines: where they crossed, a reader could
    not tell which floor an attack was above."""
    from fedleak.report.plots import floor_style

    floors = ["aux-mean", "class-mean"]
    styles = [floor_style(floors, f) for f in floors]
    assert styles[0]["linestyle"] != styles[1]["linestyle"]
    assert styles[0]["color"] == styles[1]["color"]  # both grey: floors, not attacks
    assert [s["label"] for s in styles] == ["aux-mean (floor)", "class-mean (floor)"]


def _scored_row(attack: str, sample: int, lpips: float, psnr: float) -> dict[str, object]:
    """A leakage row of one sample of round 1, client 0 (both LPIPS columns alike)."""
    return {
        "run": "r",
        "training": "r",
        "round": 1,
        "client_id": 0,
        "target_index": sample,
        "sample": sample,
        "scored_against": "original",
        "attack": attack,
        "reference": attack in ("aux-mean", "class-mean"),
        "status": "ok",
        "lpips_alex": lpips,
        "lpips_vgg": lpips,
        "psnr": psnr,
    }


def test_success_needs_the_floors_psnr_beaten_too() -> None:
    """A sharp digit of another class beats the floor's blur in LPIPS (57 of 100 MNIST
    samples, `stats.py`) but not in PSNR: the rule asks for both."""
    from fedleak.report.stats import successes

    row = _scored_row
    leakage = pd.DataFrame(
        [
            row("aux-mean", 0, 0.50, 11.0),
            row("aux-mean", 1, 0.50, 11.0),
            row("aux-mean", 2, 0.50, 11.0),
            row("ig", 0, 0.20, 15.0),  # close and above the floor's PSNR
            row("ig", 1, 0.20, 9.0),  # sharp but wrong: LPIPS alone would count it
            row("ig", 2, 0.40, 15.0),  # not close enough in LPIPS
        ]
    )
    assert successes(leakage, "lpips_alex").tolist()[3:] == [1.0, 0.0, 0.0]


def test_success_on_colour_images_is_capped_and_ignores_a_photo_like_class_mean() -> None:
    """The embedded CIFAR-10 images: the mean auxiliary image sits at LPIPS 0.66, so 0.7 of it
    counted 41% of 4x4-pixelated targets; a class mean of one auxiliary photo (LPIPS 0.30) made
    0.7 of the best floor reject a target blurred at sigma 1 (0.24). `stats.py` has the rates."""
    from fedleak.report.stats import successes

    row = _scored_row
    floors = [row("aux-mean", i, 0.66, 12.5) for i in range(4)]
    floors += [row("class-mean", i, 0.30, 11.0) for i in range(4)]
    guesses = [
        row("ig", 0, 0.40, 18.5),  # pixelated 6x6: under 0.7 x 0.66, above the cap
        row("ig", 1, 0.24, 24.4),  # blurred at sigma 1: over 0.7 x the class mean's 0.30
        row("ig", 2, 0.32, 20.0),  # under the cap, but a photo of its class is closer
        row("ig", 3, 0.20, 12.0),  # close in LPIPS, below the floor's PSNR
    ]
    leakage = pd.DataFrame(floors + guesses)
    assert successes(leakage, "lpips_alex").tolist()[-4:] == [0.0, 1.0, 0.0, 0.0]
    # The rule was calibrated on AlexNet's LPIPS only: on VGG's it decides nothing.
    assert successes(leakage, "lpips_vgg").isna().all()
    # Without the label-free floor, the fraction applies to the best floor there is.
    only_class = leakage[leakage["attack"] != "aux-mean"].reset_index(drop=True)
    assert successes(only_class, "lpips_alex").tolist()[-4:] == [0.0, 0.0, 0.0, 1.0]
    only_class.loc[only_class.index[-3], "lpips_alex"] = 0.2
    assert successes(only_class, "lpips_alex").tolist()[-3] == 1.0


def test_an_attack_below_the_floors_psnr_is_not_named_as_leaking(tmp_path: Path) -> None:
    """Sharp but wrong images (a plug-in returning auxiliary digits) beat the floor's LPIPS and
    lose on PSNR: as the success rule, the verdict does not call them a leak."""
    from fedleak.report.collect import load_study
    from fedleak.report.verdict import verdict

    path = tmp_path / "wrong-digits"
    _make_run(path)
    rows = pd.read_parquet(path / "leakage.parquet")
    rows = rows[rows["attack"] != "dlg"]
    rows.loc[rows["attack"] == "ig", "psnr"] = 5.0
    rows.to_parquet(path / "leakage.parquet", index=False)
    text = verdict(load_study(path))
    assert text.startswith("Without a defense, no attack got closer than the aux-mean floor")
    assert "the closest, ig, reconstructed 0/" in text
    assert "), closer by LPIPS alone" in text  # what its medians do show (audit DN1)


def _sweep_of(root: Path, cells: dict[str, dict[str, object]], waiting: tuple[str, ...] = ()):
    """A sweep directory of `_make_run` cells (id -> its keywords) and cells not run yet."""
    manifest = [
        {"id": cell, "index": i, "overrides": {}, "status": "done", "message": "", "seconds": 1.0}
        for i, cell in enumerate(cells)
    ]
    for cell, keywords in cells.items():
        _make_run(root / cell, **keywords)  # type: ignore[arg-type]
    manifest += [
        {"id": cell, "index": len(cells) + i, "overrides": {}, "status": "pending"}
        for i, cell in enumerate(waiting)
    ]
    (root / "sweep.json").write_text(json.dumps({"name": "s", "cells": manifest}))
    return root


def test_a_verdict_over_many_settings_names_the_least_leaking_one(tmp_path: Path) -> None:
    """With four undefended groups the most and least leaking settings were cut off, though
    the verdict's first sentence said they were summarised."""
    from fedleak.report.collect import load_study
    from fedleak.report.verdict import verdict

    cells = {
        f"cell-{b}-{d.replace(':', '-')}": {"defense": d, "batch_size": b, "rounds": 1}
        for b in (1, 2, 3, 4)
        for d in ("none", "prune:0.9")
    }
    sweep = _sweep_of(tmp_path / "sweep", cells)
    rows = pd.read_parquet(sweep / "cell-4-prune-0.9" / "leakage.parquet")
    attacked = ~rows["attack"].eq("aux-mean")
    rows.loc[attacked, "lpips_alex"], rows.loc[attacked, "psnr"] = 0.99, 3.0
    rows.to_parquet(sweep / "cell-4-prune-0.9" / "leakage.parquet", index=False)
    text = verdict(load_study(sweep))
    # Which of the summarised settings is which extreme is said (audit BO3).
    # What the extremes rest on, and that the most is within the others' intervals: the
    # synthetic settings differ by their draws alone (audit EA3).
    assert text.startswith(
        "Of 8 settings, attacks leak most without a defense (batch-size=3) and least under "
        "prune:0.9 (batch-size=4) (by the leading attack's median LPIPS; the most is not told "
        "apart from 6 other settings and the least is not told apart from 4 other settings "
        "(overlapping 95% intervals, or fewer than 6 samples)); those two and 2 of the 4 "
        "undefended ones are summarised here"
    )
    assert "Under prune:0.9 (batch-size=4), no attack got closer than the aux-mean floor" in text
    assert text.count("Without a defense") + text.count("Under ") == 4


@pytest.mark.parametrize("case", ["one-sample", "no-lpips"])
def test_the_extremes_of_many_settings_are_not_told_apart_on_what_cannot_tell_them(
    tmp_path: Path, case: str
) -> None:
    """One sample per setting made each median a point, 0.001 apart in LPIPS, and the most and
    least were named without a caveat (audit EB3); a setting whose LPIPS was not measured was
    ranked least "by median LPIPS" (EB4)."""
    from fedleak.report.collect import load_study
    from fedleak.report.verdict import verdict

    cells = {
        f"cell-{b}-{d.replace(':', '-')}": {"defense": d, "batch_size": b, "rounds": 1}
        | ({"clients": (0,)} if case == "one-sample" else {})
        for b in (1, 2, 3)
        for d in ("none", "prune:0.9")
    }
    sweep = _sweep_of(tmp_path / "sweep", cells)
    for i, cell in enumerate(cells):
        path = sweep / cell / "leakage.parquet"
        rows = pd.read_parquet(path)
        attacked = rows["attack"] != "aux-mean"
        if case == "one-sample":
            rows = rows[rows["sample"] == 0]
            attacked = rows["attack"] != "aux-mean"
            rows.loc[attacked, "lpips_alex"] += 0.001 * i
        elif cell == "cell-2-none":
            rows["lpips_alex"] = math.nan
        rows.to_parquet(path, index=False)
    text = verdict(load_study(sweep))
    first = text.split("; those two")[0]
    assert "(by the leading attack's median LPIPS; the most is not told apart from" in first
    if case == "no-lpips":
        assert "least without a defense (batch-size=2) " in first
        assert first.endswith("; the least has no LPIPS and is ranked last)")


def test_a_failed_run_is_named_and_kept_out_of_the_figures(tmp_path: Path) -> None:
    """A cell whose every client failed recorded its untrained model: its accuracy pulled the
    setting's mean down while the verdict read as a whole study. Runs stopped at different
    rounds were reported "after round 2"."""
    from fedleak.report.collect import load_study
    from fedleak.report.verdict import verdict

    cells = {f"cell-{seed}": {"seed": seed, "rounds": 2} for seed in (0, 1, 2)}
    sweep = _sweep_of(tmp_path / "sweep", cells, waiting=("cell-3",))
    failed = RunDirectory.open(sweep / "cell-1")
    failed.mark_failed("every client failed in every one of the 2 recorded rounds")
    # cell-2 stopped after its first round: its config asks for 2, it recorded 1.
    stopped = sweep / "cell-2"
    utility = pd.read_csv(stopped / "utility.csv")
    utility[utility["round"] <= 1].to_csv(stopped / "utility.csv", index=False)
    rows = pd.read_parquet(stopped / "leakage.parquet")
    rows[rows["round"] <= 1].to_parquet(stopped / "leakage.parquet", index=False)

    study = load_study(sweep)
    assert {r.name for r in study.scored_runs} == {"cell-0", "cell-2"}
    text = verdict(study)
    assert text.startswith(
        "Not every run is complete: 1 of 3 runs failed (cell-1: every client failed in every "
        "one of the 2 recorded rounds), left out of the figures; 1 stopped early (cell-2 after "
        "round 1 of 2); 1 of the 4 cells has not run (cell-3)."
    )
    # cell-0 ends at 0.1 + 0.2 = 0.300 after round 2, cell-2 at 0.1 + 0.1 + 0.02 after round 1.
    assert (
        "test accuracy is 0.260 (a mean over runs that stopped after rounds 1, 2; round 0:" in text
    )
    runs = _table(build_report(sweep)[1].read_text(), "## Runs and times")
    status = {row[0]: (row[4], row[-1]) for row in runs[1:]}
    assert status["cell-2"] == ("1 / 2", "done") and status["cell-1"][0] == "2 / 2"
    # A cell not run yet shows what sweep.json says it sets.
    manifest = json.loads((sweep / "sweep.json").read_text())
    manifest["cells"][-1]["overrides"] = {"defense.spec": "sign", "seed": 3}
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    runs = _table(build_report(sweep)[1].read_text(), "## Runs and times")
    assert [row[2:4] for row in runs[1:] if row[0] == "cell-3"] == [["sign", "3"]]
    # ... as its run would record it: central DP's cell showed no defense at all, DP-SGD's its
    # spec as written, the rounds no total (audit CT2).
    manifest["cells"][-1] |= {"defense": "central-dp:0.1:1", "seed": 3, "rounds": 2}
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    runs = _table(build_report(sweep)[1].read_text(), "## Runs and times")
    assert [row[2:5] for row in runs[1:] if row[0] == "cell-3"] == [
        ["central-dp:0.1:1", "3", "0 / 2"]
    ]
    # A sweep killed while cell-2 ran and cell-3 waited left them "running" and "queued" in
    # sweep.json; the report, built once no sweep writes, called cell-2 running (audit BO2).
    manifest["cells"][2]["status"], manifest["cells"][3]["status"] = "running", "queued"
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    runs = _table(build_report(sweep)[1].read_text(), "## Runs and times")
    status = {row[0]: row[-1] for row in runs[1:]}
    assert status["cell-2"] == status["cell-3"] == "interrupted"


def test_a_finished_cell_whose_folder_is_gone_is_called_missing_not_done_or_not_run(
    tmp_path: Path,
) -> None:
    """A sweep copied without one cell's folder showed that cell "done" in the runs table and
    "has not run" in the verdict (audit BS1)."""
    import shutil

    from fedleak.report.collect import load_study
    from fedleak.report.verdict import verdict

    cells = {f"cell-{seed}": {"seed": seed, "rounds": 2} for seed in (0, 1)}
    sweep = _sweep_of(tmp_path / "sweep", cells)
    shutil.rmtree(sweep / "cell-1")
    text = verdict(load_study(sweep))
    assert text.startswith(
        "Not every run is complete: 1 cell finished but its folder is missing from the sweep "
        "(cell-1; `fedleak sweep` runs it again)."
    )
    runs = _table(build_report(sweep)[1].read_text(), "## Runs and times")
    status = {row[0]: row[-1] for row in runs[1:]}
    assert status == {"cell-0": "done", "cell-1": "missing (its folder is gone)"}
    # Its rounds are unknown, not none (audit CW3).
    manifest = json.loads((sweep / "sweep.json").read_text())
    next(c for c in manifest["cells"] if c["id"] == "cell-1")["rounds"] = 2
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    runs = _table(build_report(sweep)[1].read_text(), "## Runs and times")
    assert [row[4] for row in runs[1:] if row[0] == "cell-1"] == ["– / 2"]


def test_attack_durations_are_a_median_and_range_never_a_negative_interval(
    run_report: Path, tmp_path: Path
) -> None:
    # One slow run among fast ones (an inverter trained once, reused after) gave a mean ± t
    # interval reaching below zero seconds.
    from fedleak.report.tables import cost_table

    def one_slow_run(leakage: pd.DataFrame) -> pd.DataFrame:
        ig = leakage["attack"] == "ig"
        runs = leakage.loc[ig].groupby(["round", "client_id"]).ngroup()
        leakage.loc[ig, "seconds"] = np.where(runs == 0, 30.0, 0.1)
        # Iterations as a learned attack's: one training run, reuses of 0 (audit BH2: the
        # column was their mean, beside a median of seconds).
        leakage.loc[ig, "iterations"] = np.where(runs == 0, 90, 0)
        return leakage

    skewed = _with_leakage(run_report, tmp_path / "run", one_slow_run)
    table = cost_table(load_study(skewed))
    row = next(r for r in table.rows if r[0].text == "ig")
    assert row[2].text == "0.10 (0.10–30.00)"
    assert row[3].text == "0 (0–90)"
    seconds = load_study(skewed).leakage().drop_duplicates(["round", "client_id", "attack"])
    mean, half, _ = mean_ci(seconds.loc[seconds["attack"] == "ig", "seconds"])
    assert mean - half < 0, "the case is one where a mean's interval reaches below zero"


def _labelled_run(path: Path, lpips_nets: tuple[str, ...] = ("lpips_alex",)) -> RunDirectory:
    """One round of 8 private samples: ig right on 6 labels (close to the originals), the
    aux-mean floor right on 1 (far)."""
    nets = ",".join(net.removeprefix("lpips_") for net in lpips_nets)
    config = parse_flat(
        {"num-server-rounds": 1, "attack.names": "aux-mean,ig", "metrics.lpips-nets": nets}
    )
    run = RunDirectory.create(path, config, {"torch": torch.__version__, "device": "cpu"})
    rows: list[dict[str, object]] = []
    for attack, right, lpips, psnr in (("ig", 6, 0.1, 25.0), ("aux-mean", 1, 0.5, 12.0)):
        for sample in range(8):
            rows.append(
                {
                    "client_id": 0,
                    "attack": attack,
                    "reference": attack == "aux-mean",
                    "sample": sample,
                    "target_index": sample,
                    "scored_against": "original",
                    "psnr": psnr,
                    "mse": 10 ** (-psnr / 10),
                    "ssim": psnr / 40,
                    **{net: lpips for net in lpips_nets},
                    "label_acc": float(sample < right),
                    "true_label": 2,
                    "pred_label": 2 if sample < right else 3,
                    "seconds": 1.0,
                    "iterations": 50,
                }
            )
    run.append_round(0, [], {"test_loss": 2.3, "test_accuracy": 0.1})
    run.append_round(1, rows, {"test_loss": 2.0, "test_accuracy": 0.2})
    return run


def test_label_accuracy_is_reported_as_the_share_of_labels_recovered(tmp_path: Path) -> None:
    # Each row's label is right or wrong, so a median could only read 0, 0.5 or 1: ig's 6 of
    # 8 labels would show as 1.000 and the floor's 1 of 8 as 0.000.
    run = _labelled_run(tmp_path / "run")
    build_report(run.path)
    table = _table((run.path / "report.md").read_text(encoding="utf-8"), "label accuracy")
    cells = {row[0]: row[1] for row in table[1:]}

    def share(k: int) -> str:
        interval = stats.binomtest(k, 8).proportion_ci(0.95, method="exact")
        return f"{100 * k / 8:.0f}% ({k}/8) [{100 * interval.low:.0f}, {100 * interval.high:.0f}]"

    assert cells == {"ig": share(6), "aux-mean (floor)": share(1)}


def test_success_is_not_decided_on_vgg_lpips_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The rule (0.7 x the floor's LPIPS, at most 0.35) was calibrated on AlexNet's LPIPS; on
    # VGG's alone it counted samples the printed rule would not (VGG 0.458 against 0.759).
    run = _labelled_run(tmp_path / "run", lpips_nets=("lpips_vgg",))
    build_report(run.path)
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "### Success rate" not in report
    reason = "its rule is calibrated on AlexNet's LPIPS, add alex to metrics.lpips-nets"
    assert f"(success not decided: {reason})" in report
    _headline(run.path)
    assert f"ig (success not decided: {reason})" in capsys.readouterr().out
    # VGG's values are named where they stand, and the success column says why it is empty.
    summary = _table(report, "### Summary")
    assert summary[0][5:7] == ["LPIPS (VGG) median", "LPIPS (VGG) mean ± 95% t"]
    assert {row[3] for row in summary[1:] if "floor" not in row[1]} == {"not decided"}
    assert "LPIPS (VGG) " in report.split("## Summary")[0]  # the verdict
    # With AlexNet's measured the same rows are decided.
    alex = _labelled_run(tmp_path / "alex")
    build_report(alex.path)
    assert "### Success rate" in (alex.path / "report.md").read_text(encoding="utf-8")


def test_report_refuses_folders_that_are_not_fedleaks(tmp_path: Path, capsys) -> None:
    # `run` refuses such folders; `report` wrote report.html and report.md into them.
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "config.toml").write_text('name = "x"\n')
    (foreign / "notes.txt").write_text("keep\n")
    assert main(["report", str(foreign)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a fedleak run directory" in err[0]
    assert sorted(p.name for p in foreign.iterdir()) == ["config.toml", "notes.txt"]
    # A parent of such folders is no sweep either.
    parent = tmp_path / "project"
    for name in ("a", "b"):
        shutil.copytree(foreign, parent / name)
    assert main(["report", str(parent)]) == 1
    assert "neither a fedleak run directory nor a sweep" in capsys.readouterr().err
    assert sorted(p.name for p in parent.rglob("report*")) == []


def test_report_refuses_records_cut_short_and_drops_the_report_it_wrote(
    tmp_path: Path, capsys
) -> None:
    run = _labelled_run(tmp_path / "run")
    run.save_global_model(1, {"w": torch.zeros(2)})
    run.mark_done()
    assert main(["report", str(run.path)]) == 0
    assert (run.path / "report.html").exists() and (run.path / "report_files").is_dir()
    capsys.readouterr()
    utility = run.path / "utility.csv"
    whole = utility.read_text()
    # utility.csv restored from an older moment: the report read it as a run that stopped
    # after round 0, beside leakage rows, a checkpoint and DONE of round 1.
    utility.write_text("".join(whole.splitlines(keepends=True)[:2]))
    assert main(["report", str(run.path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not record round(s) 1" in err[0]
    # The report it had written would show the earlier state: it is gone, figures included.
    assert not (run.path / "report.html").exists() and not (run.path / "report.md").exists()
    assert not (run.path / "report_files").exists()
    # Without a checkpoint, DONE says how far the run got.
    (run.path / "checkpoints" / "global.pt").unlink()
    assert main(["report", str(run.path)]) == 1
    assert "says the run ended after round 1" in capsys.readouterr().err
    utility.write_text(whole)
    assert main(["report", str(run.path)]) == 0


def test_client_failures_reach_the_runs_table_and_the_verdict(
    run_report: Path, tmp_path: Path
) -> None:
    """A round that lost a client aggregates and attacks the others only: the report says so."""
    text = (run_report / "report.md").read_text()
    assert _table(text, "## Runs and times")[1][5] == "0 of 6"
    assert "failed to reply" not in text
    lossy = tmp_path / "run"
    shutil.copytree(run_report, lossy)
    utility = pd.read_csv(lossy / "utility.csv")
    second = utility["round"] == 2
    utility.loc[second, "num_failures"] = 1
    utility.loc[second, "num_replies"] = 1
    utility.to_csv(lossy / "utility.csv", index=False)
    build_report(lossy)
    text = (lossy / "report.md").read_text()
    runs = _table(text, "## Runs and times")
    assert runs[0][5] == "client failures" and runs[1][5] == "1 of 6 (round 2)"
    said = "Clients failed to reply 1 of the 6 times they were asked; those rounds aggregate"
    assert said in " ".join(text.split())


def test_under_central_dp_a_round_with_a_failed_reply_is_said_to_release_no_model(
    tmp_path: Path,
) -> None:
    """Central DP releases no model from a round with a failed reply, yet the report said such
    rounds 'aggregate ... the others only' (audit AO1)."""
    run = tmp_path / "central"
    _make_run(run, rounds=2, central=(0.05, 1.0))
    utility = pd.read_csv(run / "utility.csv")
    second = utility["round"] == 2
    utility.loc[second, "num_failures"] = 1
    utility.loc[second, "num_replies"] = 1
    utility.to_csv(run / "utility.csv", index=False)
    build_report(run)
    text = " ".join((run / "report.md").read_text().split())
    assert "those rounds attack the others only and release no model" in text
    assert "aggregate and attack the others only" not in text


def test_the_failure_sentence_counts_the_runs_the_figures_show(tmp_path: Path) -> None:
    """A FAILED run's lost clients were counted in 'those rounds aggregate and attack the
    others only', a sentence about the pooled figures, which leave that run out."""
    sweep = tmp_path / "sweep"
    cells = []
    for index, seed in enumerate((0, 1)):
        cell = f"cell-{index:03d}-none_seed{seed}"
        _make_run(sweep / cell, seed=seed, rounds=2)
        cells.append({"id": cell, "index": index, "overrides": {}, "status": "done"})
    failed = sweep / cells[1]["id"]
    utility = pd.read_csv(failed / "utility.csv")
    utility["num_failures"], utility["num_replies"] = 2, 0
    utility.to_csv(failed / "utility.csv", index=False)
    RunDirectory.open(failed).mark_failed("every client failed")
    cells[1]["status"] = "failed"
    (sweep / "sweep.json").write_text(json.dumps({"name": "lost", "cells": cells}))
    (sweep / "sweep.toml").write_text('[sweep]\nname = "lost"\n')
    build_report(sweep)
    assert "Clients failed to reply" not in (sweep / "report.md").read_text()


def _sweep_over_attack_names(sweep: Path, cells: list[str], without_dlg: str) -> None:
    """Two cells of one training (seed 0), which differ only in `without_dlg` leaving dlg out
    of attack.names."""
    for cell in cells:
        _make_run(sweep / cell, rounds=2)
    lacking = sweep / without_dlg
    config = (lacking / "config.toml").read_text()
    (lacking / "config.toml").write_text(config.replace('"aux-mean,ig,dlg"', '"aux-mean,ig"'))
    leakage = pd.read_parquet(lacking / "leakage.parquet")
    leakage[leakage["attack"] != "dlg"].to_parquet(lacking / "leakage.parquet")
    (lacking / "leakage.csv").unlink()
    manifest = [{"id": cell, "index": i, "status": "done"} for i, cell in enumerate(cells)]
    (sweep / "sweep.json").write_text(json.dumps({"name": "attacks", "cells": manifest}))


def test_cells_differing_only_in_their_attacks_share_one_floor_and_one_model(
    tmp_path: Path,
) -> None:
    """A grid over attack.names trains one model per seed and scores the floor in each cell:
    pooled as independent, the floor's n doubled and one seed read as two."""
    sweep = tmp_path / "sweep"
    cells = ["cell-000-with-dlg", "cell-001-without-dlg"]
    _sweep_over_attack_names(sweep, cells, without_dlg=cells[1])
    study = load_study(sweep)
    assert study.group_keys == ()
    one = pd.read_parquet(sweep / cells[0] / "leakage.parquet")
    pooled = study.leakage()
    for attack in ("aux-mean", "ig", "dlg"):
        assert (pooled["attack"] == attack).sum() == (one["attack"] == attack).sum()
    assert set(study.utility()["run"]) == {cells[0]}
    build_report(sweep)
    assert _table((sweep / "report.md").read_text(), "## Privacy–utility frontier")[1][-1] == "1"


def test_a_later_cells_attacks_meet_the_floor_an_earlier_cell_of_the_training_scored(
    tmp_path: Path,
) -> None:
    """The floor of cells differing only in `attack.names` is kept from the first cell, and
    floors were matched per run: the second cell's attacks found none ("success not
    decided"), or only another floor than the one the rule names (audit AK1)."""
    from fedleak.report.stats import floor_values, successes

    sweep = tmp_path / "sweep"
    cells = ["cell-000-without-dlg", "cell-001-with-dlg"]
    _sweep_over_attack_names(sweep, cells, without_dlg=cells[0])
    pooled = scored(load_study(sweep).leakage())
    alone = scored(load_study(sweep / cells[1]).leakage())
    lpips = lpips_column(pooled)
    dlg = (pooled["attack"] == "dlg") & np.isfinite(pooled[lpips])
    assert dlg.any() and set(pooled.loc[dlg, "run"]) == {cells[1]}
    assert np.isfinite(floor_values(pooled, lpips)[dlg]).all()
    same = alone[(alone["attack"] == "dlg") & np.isfinite(alone[lpips])]
    assert (
        floor_values(pooled, lpips)[dlg].tolist() == floor_values(alone, lpips)[same.index].tolist()
    )
    assert successes(pooled, lpips)[dlg].tolist() == successes(alone, lpips)[same.index].tolist()


def test_a_setting_has_one_colour_in_every_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-round figure coloured settings in cell order (the grid's last key fastest),
    the frontier groups first: 'batch-size=1 · sign' was green in one and orange in the other."""
    from fedleak.report import plots

    sweep = tmp_path / "sweep"
    cells = []
    defenses = ("none", "sign", "prune:0.5", "gauss:0.1")
    for index, (defense, batch) in enumerate((d, b) for d in defenses for b in (1, 2)):
        cell = f"cell-{index:03d}-{defense.replace(':', '-')}_B{batch}"
        _make_run(sweep / cell, defense=defense, batch_size=batch, rounds=2)
        cells.append({"id": cell, "index": index, "status": "done"})
    (sweep / "sweep.json").write_text(json.dumps({"name": "colours", "cells": cells}))
    palettes: list[dict] = []
    palette = plots._palette

    def recorded(keys):
        colours = palette(keys)
        palettes.append(colours)
        return colours

    monkeypatch.setattr(plots, "_palette", recorded)
    build_report(sweep)
    by_setting = [p for p in palettes if all(isinstance(k, tuple) for k in p)]
    assert len(by_setting) >= 2 and len(by_setting[0]) == 8
    assert all(p == by_setting[0] for p in by_setting)


def test_the_frontier_points_carry_intervals_floors_and_convergence(sweep_report: Path) -> None:
    """The frontier drew bare points: no interval, no floor, no mark of unconverged runs,
    though a point below the floor, or from an attack out of budget, reads as a private one."""
    study = load_study(sweep_report)
    points = _frontier_points(study)
    leakage = originals(study.leakage())  # the rows every table reads
    for _, point in points.iterrows():
        here = leakage[(leakage["defense"] == point["defense"])]
        here = here[here["group"] == point["group"]]
        rows = here[here["attack"] == point["attack"]]
        expected = median_interval(rows["psnr"])
        assert point["n"] == len(rows)
        assert (point["psnr"], point["psnr_low"], point["psnr_high"]) == (
            expected.value,
            expected.low,
            expected.high,
        )
        assert point["psnr_floor"] == here.loc[here["attack"] == "aux-mean", "psnr"].median()
        assert point["accuracy_low"] <= point["accuracy"] <= point["accuracy_high"]
        assert point["not_converged"] == bool(rows["converged"].eq(0).any())


def test_a_frontier_of_runs_at_one_accuracy_draws(tmp_path: Path) -> None:
    """Three runs at chance accuracy: their float mean, 0.10000000000000002, lay above their
    maximum, and matplotlib refused the negative error bar, so the sweep had no report."""
    sweep = tmp_path / "sweep"
    cells = []
    for index, (defense, seed) in enumerate((d, s) for d in ("none", "sign") for s in (0, 1, 2)):
        cell = f"cell-{index:03d}-{defense}_seed{seed}"
        _make_run(sweep / cell, defense=defense, seed=seed, rounds=2)
        utility = pd.read_csv(sweep / cell / "utility.csv")
        utility["test_accuracy"] = 0.1
        utility.to_csv(sweep / cell / "utility.csv", index=False)
        cells.append({"id": cell, "index": index, "overrides": {}, "status": "done"})
    (sweep / "sweep.json").write_text(json.dumps({"name": "chance", "cells": cells}))
    (sweep / "sweep.toml").write_text('[sweep]\nname = "chance"\n')
    build_report(sweep)
    points = _frontier_points(load_study(sweep))
    assert len(points) and (points["accuracy"] == 0.1).all()
    assert (sweep / "report_files" / "privacy-utility.png").exists()


def test_the_method_names_the_rounds_attacked_not_their_span(run_report: Path) -> None:
    """'over rounds 1–50' read as every round attacked where only 1, 26 and 50 were."""
    assert _attacked_rounds([1, 26, 50]) == " in rounds 1, 26 and 50"
    assert _attacked_rounds([2]) == " in round 2"
    assert _attacked_rounds(list(range(1, 11))) == " in 10 rounds from 1 to 10"
    assert "attack runs in rounds 1, 2 and 3." in (run_report / "report.md").read_text()


def test_markdown_shows_a_records_html_as_text() -> None:
    """Audit BG6: report.html escaped every string from a run's records, report.md passed
    them on raw (an attack name, an environment value, a corpus' text), and Markdown viewers
    render raw HTML."""
    from fedleak.report.document import Cell, Table, Text, render_markdown

    blocks = [
        Text("attack <script>alert(1)</script> leads; run `fedleak report <dir>`"),
        Table(("key", "value"), ((Cell("torch"), Cell("<img src=x onerror=alert(2)>")),)),
    ]
    markdown, _ = render_markdown("t", blocks, "report_files")
    assert "<script>" not in markdown and "<img" not in markdown
    assert "attack &lt;script>alert(1)&lt;/script> leads" in markdown
    assert "`fedleak report <dir>`" in markdown  # a code span shows its text as it is
    assert "| torch | &lt;img src=x onerror=alert(2)> |" in markdown
    assert render_markdown("t", [Text("for n < 6 the range")], "f")[0].endswith("n < 6 the range\n")
    # After an unpaired backtick (a corpus' text may hold one) the rest is not code.
    unpaired = render_markdown("t", [Text("it's a `quote; tag: <img src=x>")], "f")[0]
    assert "<img" not in unpaired and "`quote; tag: &lt;img src=x>" in unpaired


def test_a_report_rebuilds_in_a_folder_the_locale_cannot_encode(
    run_report: Path, tmp_path: Path
) -> None:
    """Under an ASCII locale without UTF-8 mode a folder named 'run ε' reaches Python as
    surrogates: pyarrow could not open its leakage.parquet, and the rebuild deleted the report
    and called the records unreadable (audit BK3)."""
    import os
    import sys

    folder = tmp_path / "run ε"
    shutil.copytree(run_report, folder)
    ascii_locale = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    ascii_locale.pop("PYTHONIOENCODING", None)
    done = subprocess.run(
        [sys.executable, "-m", "fedleak.simulations.console", "report", os.fsencode(folder)],
        capture_output=True,
        env=ascii_locale,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert "run ε" in (folder / "report.md").read_text(encoding="utf-8")
    assert (folder / "report.html").exists()


def test_a_key_only_failed_cells_change_labels_no_setting(tmp_path: Path) -> None:
    """Two cells that failed with sim.timeout=0.01 put "timeout=3600.0" into every setting's
    label, in every table and legend (audit BO4)."""
    from fedleak.report.collect import load_study

    cells = {"cell-0": {"seed": 0}, "cell-1": {"seed": 1}, "cell-2": {"batch_size": 4}}
    sweep = _sweep_of(tmp_path / "sweep", cells)
    assert load_study(sweep).group_keys == ("train.batch-size",)
    RunDirectory.open(sweep / "cell-2").mark_failed("every client failed in every round")
    study = load_study(sweep)
    assert study.group_keys == ()
    assert {study.group_of(r) for r in study.runs} == {""}


def test_a_sweep_report_leads_to_each_cells_own_report(sweep_report: Path, tmp_path: Path) -> None:
    """A researcher had to look for each cell's report.html among the folders (audit BO7)."""
    sweep = tmp_path / "sweep"
    shutil.copytree(sweep_report, sweep)
    first, *_ = json.loads((sweep / "sweep.json").read_text())["cells"]
    build_report(sweep / first["id"])  # this cell's report exists, the others' do not
    markdown = build_report(sweep)[1].read_text()
    runs = _table(markdown, "## Runs and times")
    linked = [row[0] for row in runs[1:] if row[0].startswith("[")]
    assert linked == [f"[{first['id']}]({first['id']}/report.html)"]
    page = (sweep / "report.html").read_text()
    assert f'<a href="{first["id"]}/report.html">{first["id"]}</a>' in page
    assert (sweep / first["id"] / "report.html").is_file()


def test_a_linked_name_with_brackets_keeps_them_in_markdown() -> None:
    """`run #1 [a]` became the link text `run #1 [a)` (audit BP5)."""
    from fedleak.report.document import Cell, Table, _md_table

    table = Table(columns=("run",), rows=((Cell("run #1 [a]", link="run #1 [a]/report.html"),),))
    assert _md_table(table).splitlines()[-1] == (
        "| [run #1 \\[a\\]](run%20%231%20%5Ba%5D/report.html) |"
    )


def _labelled_rows(truth: list[int], client_id: int) -> list[dict[str, object]]:
    """ig's rows for one batch of a declared 8 whose labels are `truth`, all guessed 0."""
    return [
        {
            "client_id": client_id,
            "attack": "ig",
            "sample": i,
            "target_index": i,
            "batch_size": 8,
            "true_label": label,
            "pred_label": 0,
            "label_acc": float(label == 0),
            "psnr": 10.0,
        }
        for i, label in enumerate(truth)
    ]


@pytest.mark.parametrize(
    ("share", "multiset", "client"),
    [("batch", True, 0), ("per-sample", False, 0), ("per-sample", True, -1)],
)
def test_the_label_table_says_what_chance_scores_by_its_rule(
    tmp_path: Path, share: str, multiset: bool, client: int
) -> None:
    """At B = 1,500 any guess scored about 0.95 by the multiset rule and the report did not
    say so (audit BQ5): the caption names chance, per batch size, by the rows' own rule;
    per-sample updates hold one sample each, so their chance is said at B = 1, not at the
    client's batch size (audit CT3), except in the aggregate view (client -1), whose one
    update of the round's samples is scored as a batch (CW1)."""
    from fedleak.metrics import multiset_chance
    from fedleak.report.tables import label_chance, leakage_tables

    flat = {"attack.names": "ig", "train.batch-size": 8, "threat.share": share}
    run = RunDirectory.create(tmp_path / share, parse_flat(flat), {})
    labels = torch.Generator().manual_seed(1)
    batches = []
    for index in range(6):
        truth = torch.randint(0, 3, (8,), generator=labels).tolist()
        batches.append(truth)
        client_id = index if client >= 0 else client
        run.append_round(1 + index, _labelled_rows(truth, client_id), {"test_accuracy": 0.5})
    study = load_study(run.path)
    pooled = [label for batch in batches for label in batch]
    prior = [pooled.count(c) / len(pooled) for c in range(3)]
    expected = (
        np.mean([multiset_chance([b.count(c) for c in range(3)], prior) for b in batches])
        if multiset
        else np.mean([prior[label] for label in pooled])
    )
    chance, said_multiset = label_chance(study, study.leakage())
    size = 8 if multiset else 1
    assert chance == {size: pytest.approx(expected)} and said_multiset == multiset
    (caption,) = [t.caption for m, _, t in leakage_tables(study) if m.column == "label_acc"]
    assert f"would score {100 * expected:.1f}% at B = {size} by the same rule" in caption
    assert ("so chance grows with B" in caption) == multiset


def test_chance_is_said_at_the_batch_sizes_poisson_sampling_drew(tmp_path: Path) -> None:
    """Under Poisson sampling the batches held 6 to 12 labels and chance was said "at B = 8",
    the declared size (audit DN4)."""
    from fedleak.report.tables import label_chance

    flat = {"attack.names": "ig", "train.batch-size": 8, "threat.share": "batch"}
    run = RunDirectory.create(tmp_path / "poisson", parse_flat(flat), {})
    labels = torch.Generator().manual_seed(1)
    for index, size in enumerate([6, 10, 10, 6, 10, 6]):
        truth = torch.randint(0, 3, (size,), generator=labels).tolist()
        run.append_round(1 + index, _labelled_rows(truth, index), {"test_accuracy": 0.5})
    study = load_study(run.path)
    chance, multiset = label_chance(study, study.leakage())
    assert sorted(chance) == [6, 10] and multiset


def test_markdown_carries_no_html_past_backtick_runs() -> None:
    """A sweep file's ``` closed the code block it was pasted in, and a cell's ``` read as
    three single backticks, so an <img onerror=...> reached report.md as HTML (audit CN3)."""
    markdown_it = pytest.importorskip("markdown_it")
    from fedleak.report.document import Cell, Code, Table, Text, render_markdown

    attack = "<img src=x onerror=alert(1)>"
    blocks = [
        Code(f"[sweep]\n```\n{attack}\n```\nname = 'x'\n"),
        Text(f"```{attack}` and `{attack}` and ``{attack}`` and n < 6"),
        # An escaped backtick opens no code span (audit CP3).
        Text(f"\\`{attack}\\` and \\\\`code` and \\``x`{attack}`"),
        Table(("key", "value"), ((Cell("env"), Cell(f"```{attack}`")),)),
        Table(("key", "value"), ((Cell("platform"), Cell(f"\\`{attack}\\` Linux")),)),
    ]
    text, _ = render_markdown("t", blocks, "files")
    tokens = markdown_it.MarkdownIt("commonmark").parse(text)
    kinds = {t.type for t in tokens} | {c.type for t in tokens for c in t.children or []}
    assert not kinds & {"html_inline", "html_block"}, text
    assert "n < 6" in text  # a bare comparison stays as written


def test_the_report_lists_every_parameter_each_attack_ran_with(tmp_path: Path) -> None:
    """config.toml holds the parameters set; environment.json every one an attack ran with
    (audit DO7), shown as `--set` writes them, one row per attack, not as dotted keys in the
    environment table."""
    config = parse_flat({"num-server-rounds": 1, "attack.names": "ig,aux-mean"})
    ran = {"matching": "cosine", "milestones": [0.375, 0.625], "tv-weight": None, "boxed": True}
    run = RunDirectory.create(tmp_path / "run", config, {"device": "cpu", "attacks": {"ig": ran}})
    run.append_round(1, [], {"test_loss": 1.0, "test_accuracy": 0.5})
    _, markdown = build_report(run.path)
    text = markdown.read_text()
    assert _table(text, "## Configuration") == [
        ["attack", "parameters"],
        ["ig", "matching=cosine, milestones=0.375,0.625, tv-weight=none, boxed=true"],
    ]
    assert not any(row[0].startswith("attacks") for row in _table(text, "## Environment"))


def test_a_sweeps_attack_settings_say_which_parameters_differ_by_run() -> None:
    """The first cell's values read as every cell's, a grid over tv-weight included (DU2)."""
    from fedleak.report.build import _attack_settings
    from fedleak.report.document import Table

    cells = [
        {"attacks": {"ig": {"tv-weight": 0.01, "boxed": True}, "lti": {"hidden": [16]}}},
        {"attacks": {"ig": {"tv-weight": 0.5, "boxed": True}}},
        {},  # a run from before the parameters were recorded
    ]
    table = _attack_settings(cells)[1]
    assert isinstance(table, Table)
    assert [[cell.text for cell in row] for row in table.rows] == [
        ["ig", "tv-weight=(differs by run), boxed=true"],
        ["lti", "hidden=16"],
    ]


def test_a_group_label_never_reads_as_a_top_level_setting() -> None:
    """A sweep over models labelled its groups `name=lenet`, the run name's key (audit EO6)."""
    from fedleak.report.collect import _short_names

    assert _short_names(("model.name", "train.batch-size", "seed")) == {
        "model.name": "model.name",
        "train.batch-size": "batch-size",
        "seed": "seed",
    }


def test_a_tables_bold_rule_names_the_samples_a_median_needs_and_a_share_does_not() -> None:
    """An exact binomial interval holds at any n; a median's needs 6 samples (audit EN8)."""
    from fedleak.report.tables import _caption_tail

    assert "overlaps no other attack's (6 samples or more each) and its median" in (
        _caption_tail(grouped=False, share=False)
    )
    share = _caption_tail(grouped=True, share=True)
    assert (
        "within its group, only where its 95% interval overlaps no other attack's and its share "
        "leaks more"
    ) in share
    assert "samples" not in share


def test_a_sweeps_environment_lists_each_value_a_key_takes_with_its_runs() -> None:
    """A cell resumed under other software showed the first cell's fedleak as the whole
    sweep's, without a word (audit EM3)."""
    from types import SimpleNamespace

    from fedleak.report.build import _environment_table

    def run(name: str, **environment: object) -> SimpleNamespace:
        return SimpleNamespace(name=name, environment={"python": "3.11.7", **environment})

    runs = [
        run("cell-000", fedleak_source="aa", resumed_with=[{"fedleak_source": "bb"}]),
        run("cell-001", fedleak_source="bb"),
        *(run(f"cell-00{i}", fedleak_source="bb") for i in range(2, 6)),
        *(run(f"cell-01{i}", started=f"2026-12-07T1{i}:00:00") for i in range(5)),
    ]
    table = _environment_table(runs)  # type: ignore[arg-type]
    rows = {key.text: value.text for key, value in table.rows}
    assert rows["python"] == "3.11.7"
    assert rows["fedleak_source"] == (
        "aa (cell-000); bb (cell-001, cell-002, cell-003 and 2 more); – (cell-010, cell-011, "
        "cell-012 and 2 more)"
    )
    assert rows["resumed_with"].startswith('[{"fedleak_source": "bb"}] (cell-000); – (')
    assert rows["started"] == "differs by run (6 values)"
    assert "a key that differs between them lists each value" in table.caption
    alone = _environment_table(runs[:1])  # type: ignore[arg-type]
    assert {k.text: v.text for k, v in alone.rows}["fedleak_source"] == "aa" and not alone.caption


def test_a_sweeps_report_is_not_rebuilt_while_a_run_writes_one_of_its_cells(
    sweep_report: Path, tmp_path: Path
) -> None:
    """`fedleak report CELL` refused a cell a resumed run was writing, `fedleak report SWEEP`
    rebuilt it ("stopped after round 111 of 200" while it ran on) (audit ED3)."""
    from processes import lock_held_elsewhere

    from fedleak.report.build import rebuild_reports

    copy = tmp_path / "sweep"
    shutil.copytree(sweep_report, copy)
    cell = sorted(p for p in copy.iterdir() if p.is_dir() and (p / "config.toml").is_file())[0]
    before = sorted(p.name for p in cell.iterdir() if p.name != ".fedleak.lock")
    with (
        lock_held_elsewhere(cell),
        pytest.raises(RunDirectoryError, match="a fedleak run is still writing this cell"),
    ):
        rebuild_reports(copy)
    assert sorted(p.name for p in cell.iterdir() if p.name != ".fedleak.lock") == before
    built = rebuild_reports(copy)  # once the run ended: every cell's and the sweep's
    assert cell / "report.html" in built and copy / "report.html" in built


def test_batchnorm_statistics_the_attacks_were_not_given_are_said_to_reach_the_server(
    run_report: Path, tmp_path: Path
) -> None:
    """Under threat.bn-stats = hidden each client's running statistics still reached the
    server, its batch statistics exactly recoverable, without a word (audit EF1)."""
    from fedleak.report.verdict import verdict

    copy = tmp_path / "bn"
    shutil.copytree(run_report, copy)
    said = "models have BatchNorm, whose running statistics each client sent for averaging"
    assert said not in verdict(load_study(copy))  # recorded before the model was
    environment = json.loads((copy / "environment.json").read_text())
    (copy / "environment.json").write_text(
        json.dumps({**environment, "model": {"batchnorm": True}})
    )
    assert f"The clients' {said}" in verdict(load_study(copy))
    config = (copy / "config.toml").read_text()
    assert 'bn-stats = "hidden"' in config
    (copy / "config.toml").write_text(config.replace('bn-stats = "hidden"', 'bn-stats = "shared"'))
    assert said not in verdict(load_study(copy))  # given to the attacks: nothing unused


def test_an_image_runs_group_is_not_labelled_with_text_settings() -> None:
    """A sweep of image and text cells labelled its image cells `vocab-size=8192`, a setting
    they never read (audit EI6)."""
    from fedleak.config import parse_flat
    from fedleak.report.collect import RunRecord, Study

    def record(flat: dict[str, object], modality: str) -> RunRecord:
        environment = {"data": {"modality": modality}}
        empty = pd.DataFrame()
        return RunRecord("r", Path("r"), parse_flat(flat), environment, empty, empty, ())

    image = record({"model.name": "lenet"}, "image")
    text = record(
        {"model.name": "transformer3", "data.dataset": "lee-news", "data.vocab-size": 300},
        "tokens",
    )
    study = Study(Path("s"), "sweep", (image, text), None, ("data.vocab-size", "model.name"))
    assert study.group_of(image) == "model.name=lenet"
    assert study.group_of(text) == "vocab-size=300, model.name=transformer3"
    # ... nor a text run with the LPIPS backbones it never reads, nor two text runs apart by
    # them (audit EK2's carry, ER5).
    from fedleak.report.collect import _varying

    flat = {"model.name": "transformer3", "data.dataset": "lee-news"}
    alex = record({**flat, "metrics.lpips-nets": "alex"}, "tokens")
    vgg = record({**flat, "metrics.lpips-nets": "vgg"}, "tokens")
    assert _varying([alex, vgg]) == ()
    pictured = record({"metrics.lpips-nets": "vgg"}, "image")
    study = Study(Path("s"), "sweep", (pictured, alex), None, ("metrics.lpips-nets",))
    assert study.group_of(alex) == "" and study.group_of(pictured) == "lpips-nets=vgg"


def test_a_run_recorded_before_its_model_was_is_judged_by_the_models_name() -> None:
    """Runs recorded before environment.json said whether the model has BatchNorm got no
    sentence about the statistics it sent, rebuilt or resumed (audit EH5)."""
    from fedleak.config import parse_flat
    from fedleak.models import ModelSpec, build_model
    from fedleak.models.build import has_batchnorm
    from fedleak.models.registry import model_entry
    from fedleak.report.collect import BATCHNORM_BUILTINS, RunRecord

    # fedleak's own image models, from a fresh process: other tests in this one may have
    # registered plug-ins and the Python API's custom models.
    names = subprocess.run(
        [sys.executable, "-c", "from fedleak.models import model_names; print(*model_names())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    images = [n for n in names if model_entry(n).modality == "image"]
    assert {"lenet", "convnet-bn", "resnet18-gn"} <= set(images)
    built = {n for n in images if has_batchnorm(build_model(ModelSpec(n, (3, 32, 32), 10)))}
    assert built == set(BATCHNORM_BUILTINS)

    def record(name: str, environment: dict[str, object]) -> RunRecord:
        empty = pd.DataFrame()
        config = parse_flat({"model.name": name})
        return RunRecord("r", Path("r"), config, environment, empty, empty, ())

    assert record("convnet-bn", {}).batchnorm and not record("lenet", {}).batchnorm
    assert not record("convnet-bn", {"model": {"batchnorm": False}}).batchnorm  # as recorded


def test_settings_a_rerun_may_change_define_no_group() -> None:
    """A sweep rerun with a longer sim.timeout split its cells into groups by timeout, each
    defense alone in its tables (audit EJ2)."""
    from fedleak.config import parse_flat
    from fedleak.report.collect import RunRecord, _varying

    def record(flat: dict[str, object]) -> RunRecord:
        empty = pd.DataFrame()
        return RunRecord("r", Path("r"), parse_flat(flat), {}, empty, empty, ())

    before = record({"sim.timeout": 3600, "defense.spec": "none"})
    after = record({"sim.timeout": 7200, "attack.show-progress": True, "defense.spec": "sign"})
    assert _varying([before, after]) == ()
    assert _varying([before, record({"train.lr": 0.5})]) == ("train.lr",)
    # Image runs apart in text settings alone are one group (audit EJ5).
    assert _varying([record({"data.vocab-size": 300}), record({"data.vocab-size": 512})]) == ()
