"""Reports built from a fixed small run (and sweep) directory generated here.

Table values are recomputed independently from leakage.parquet with scipy's t-interval;
every image the report references must exist (Markdown) or decode (HTML data URIs); where
Debian's Chromium is installed the page is rendered headless and its DOM checked.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

from fedleak.config import parse_flat
from fedleak.report.build import build_report
from fedleak.report.rundir import RunDirectory
from fedleak.report.tables import mean_ci

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _make_run(
    path: Path,
    *,
    defense: str = "none",
    seed: int = 0,
    batch_size: int = 2,
    rounds: int = 3,
    encoded: bool = False,
    epsilon: bool = False,
) -> None:
    """A plausible run: two attacks, two clients, one failed attack run, images each round."""
    config = parse_flat(
        {
            "name": "fixture",
            "seed": seed,
            "num-server-rounds": rounds,
            "defense.spec": defense,
            "train.batch-size": batch_size,
            "attack.names": "aux-mean,ig",
        }
    )
    run = RunDirectory.create(path, config, {"torch": torch.__version__, "device": "cpu"})
    rng = np.random.default_rng(seed + 100 * batch_size)
    gen = torch.Generator().manual_seed(seed)
    for r in range(1, rounds + 1):
        rows: list[dict[str, object]] = []
        for client in (0, 3):
            for attack, level in (("aux-mean", 11.0), ("ig", 17.0 + r)):
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
                for sample in range(batch_size):
                    for against in ("original", "encoded") if encoded else ("original",):
                        psnr = float(level + rng.normal())
                        rows.append(
                            {
                                "client_id": client,
                                "attack": attack,
                                "sample": sample,
                                "target_index": sample,
                                "scored_against": against,
                                "psnr": psnr,
                                "mse": 10 ** (-psnr / 10),
                                "ssim": psnr / 40,
                                "lpips_alex": 1 - psnr / 30,
                                "label_acc": 1.0,
                                "true_label": 2,
                                "pred_label": 2,
                                "seconds": 1.0 + rng.random(),
                                "iterations": 50,
                            }
                        )
                truth = torch.rand(batch_size, 1, 12, 12, generator=gen)
                run.save_images(r, client, attack, truth, (truth * 0.8).clamp(0, 1))
        run.append_round(
            r,
            rows,
            {
                "test_loss": 2.3 - 0.2 * r,
                "test_accuracy": 0.1 * r + 0.01 * seed,
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


def _table(markdown: str, heading: str, nth: int = 0) -> list[list[str]]:
    """The nth Markdown table after the heading line, as rows of stripped cell texts."""
    if not heading.startswith("#"):
        heading = f"### {heading}"
    section = markdown.split(f"\n{heading}\n", 1)[1]
    tables = re.findall(r"((?:^\|.*\|\n)+)", section, flags=re.M)
    lines = tables[nth].strip().splitlines()
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[:1] + lines[2:]]


def _expected(values: pd.Series, digits: int) -> str:
    """Mean ± half-width of scipy's 95% t-interval, formatted as the report does."""
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return f"{values.mean():.{digits}f} ± {(high - low) / 2:.{digits}f}"


def test_mean_ci_is_the_student_t_interval() -> None:
    values = np.array([1.0, 2.0, 4.0, 7.0])
    mean, half, n = mean_ci(values)
    low, high = stats.t.interval(0.95, 3, loc=values.mean(), scale=stats.sem(values))
    assert (n, mean) == (4, 3.5) and half == pytest.approx((high - low) / 2)
    assert mean_ci(np.array([5.0, np.nan]))[1:] == (pytest.approx(np.nan, nan_ok=True), 1)


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
        rows = {row[0]: row[1] for row in table[1:]}
        for attack in ("aux-mean", "ig"):
            expected = _expected(ok.loc[ok["attack"] == attack, column], digits)
            assert rows[attack].strip("*") == expected, (heading, attack)
        # ig leaks more on every metric here: bold in PSNR (higher) and LPIPS/MSE (lower).
        assert rows["ig"].startswith("**") and not rows["aux-mean"].startswith("**")
    html = (run_report / "report.html").read_text()
    expected_ig = _expected(ok.loc[ok["attack"] == "ig", "psnr"], 2)
    assert re.search(rf'class="best"[^>]*>{re.escape(expected_ig)}</td>', html)
    failures = _table(markdown, "Failed attack runs")
    assert failures[1][1:5] == ["ig", "none", "failed", "1 of 6"]


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
    cells = {(row[0], row[1]): row[2:] for row in original[1:]}
    for batch in (1, 4):
        for attack in ("aux-mean", "ig"):
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
    assert utility[0][:5] == ["group", "defense", "final accuracy", "final loss", "ε"]
    rows = {(row[0], row[1]): row for row in utility[1:]}
    # Final round 2: accuracy 0.2 + 0.01 * seed over seeds 0 and 1; ε = 0.4 * round.
    accuracy = pd.Series([0.20, 0.21])
    assert rows["batch-size=1", "instahide:2"][2] == _expected(accuracy, 3)
    assert rows["batch-size=1", "instahide:2"][4] == "0.80"
    assert rows["batch-size=4", "none"][4] == "–"
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
    assert len(refs) >= 4 and all(ref.startswith("report_files/") for ref in refs)
    for ref in refs:
        with Image.open(path / ref) as img:
            img.load()
    sources = _img_sources((path / "report.html").read_text())
    assert len(sources) == len(refs)
    for src in sources:
        _check_data_uri(src)
    assert "http://" not in (path / "report.html").read_text().replace("http://www.w3", "")


def test_report_rebuilds_from_files_alone(run_report: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copied"
    shutil.copytree(run_report, copy)
    (copy / "report.html").unlink()
    shutil.rmtree(copy / "report_files")
    html, markdown = build_report(copy)
    assert markdown.read_text() == (run_report / "report.md").read_text().replace(
        str(run_report), str(copy)
    )
    assert html.exists()


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
    assert len(sources) >= 4
    for src in sources:
        width, height = _check_data_uri(src)
        assert width > 0 and height > 0
    shot = tmp_path / "page.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True
    )
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2000, 1280) and pixels.std() > 10  # a rendered page, not blank
