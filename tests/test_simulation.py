"""End to end through the README's entry point: real Flower simulations on the embedded data."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedleak.config import parse_flat
from fedleak.report.rundir import RunDirectory
from fedleak.simulations.cli import main
from fedleak.simulations.presets import load_preset

TINY = [
    "--num-clients",
    "3",
    "--set",
    "num-server-rounds=2",
    "--set",
    "attack.max-iterations=20",
    "--set",
    "attack.clients-per-round=2",
    "--set",
    "train.batch-size=2",
    "--set",
    "threat.share=batch",
    "--set",
    "data.aux-size=200",
    # A seeded draw of 2 of the 3 clients per round: attacks on and off must agree on it.
    "--set",
    "train.fraction-train=0.67",
]


def _run(out: Path, *overrides: str) -> Path:
    args = ["run", "quickstart", "--out", str(out), *TINY]
    for item in overrides:
        args += ["--set", item]
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert main(args) == 0
    (out / "console.txt").write_text(console.getvalue())
    return out


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("sim") / "attacked", "attack.names=aux-mean,ig")


def test_run_directory_holds_every_record(attacked: Path) -> None:
    for name in (
        "config.toml",
        "environment.json",
        "leakage.parquet",
        "leakage.csv",
        "utility.csv",
        "summary.md",
        "report.html",
        "checkpoints/global.pt",
        "DONE",
    ):
        assert (attacked / name).exists(), name
    # The federation's size, which a resumed run must match (the partitions depend on it).
    environment = json.loads((attacked / "environment.json").read_text())
    assert environment["num_clients"] == 3
    # Run by fedleak's own clients: recorded as such, so no audit of an app can take it over
    # (audit ER3).
    assert "audited_strategy" in environment and environment["audited_strategy"] is None
    leakage = pd.read_parquet(attacked / "leakage.parquet")
    original = leakage[leakage.scored_against == "original"]
    # 2 rounds x 2 attacked clients x 2 attacks x batch of 2
    assert len(original) == 16
    assert set(original.attack) == {"aux-mean", "ig"}
    assert (original.status == "ok").all()
    assert original.psnr.notna().all()
    utility = pd.read_csv(attacked / "utility.csv")
    assert list(utility["round"]) == [0, 1, 2]
    assert utility.test_accuracy.between(0, 1).all()
    assert len(list((attacked / "images").glob("*.png"))) == 8
    assert original.groupby("attack")["reference"].all().to_dict() == {
        "aux-mean": True,
        "ig": False,
    }


def test_console_shows_progress_and_the_numbers_that_matter(attacked: Path) -> None:
    console = (attacked / "console.txt").read_text()
    # Any of `clock()`'s forms (42s, 3m05s, 1h02m): on a loaded machine the run takes minutes.
    elapsed = r"(?:\d+h\d\dm|(?:\d+m)?\d+s)"
    line = rf"^round 1/2 \({elapsed}, ETA {elapsed}\) \| acc "
    assert re.search(line, console, flags=re.M), console
    assert re.search(rf"^round 2/2 \({elapsed}\) \| acc ", console, flags=re.M), console
    assert f"fedleak: run directory {attacked}" in console
    assert f"report: {attacked / 'report.html'}" in console
    headline = console.split("what leaked", 1)[1]
    assert re.search(r"none: accuracy 0\.\d{3} -> 0\.\d{3} \| reconstructed: ig \d+/8 ", headline)
    assert "floor aux-mean median PSNR" in headline


def test_report_numbers_are_recomputed_from_the_parquet(attacked: Path) -> None:
    from scipy import stats

    leakage = pd.read_parquet(attacked / "leakage.parquet")
    ok = leakage[(leakage.status == "ok") & (leakage.scored_against == "original")]
    markdown = (attacked / "report.md").read_text()
    section = markdown.split("### Summary\n\n", 1)[1]
    lines = section.split("\n\n", 1)[0].splitlines()[2:]  # the first table, header dropped
    rows = {
        cells[1]: cells
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)
    }
    assert set(rows) == {"ig", "aux-mean (floor)"}
    for attack, label in (("ig", "ig"), ("aux-mean", "aux-mean (floor)")):
        values = np.sort(ok.loc[ok.attack == attack, "psnr"].to_numpy())
        n = len(values)
        ks = [k for k in range(1, n // 2 + 1) if 1 - 2 * stats.binom.cdf(k - 1, n, 0.5) >= 0.95]
        k = max(ks, default=1)
        median = f"{np.median(values):.2f} [{values[k - 1]:.2f}, {values[n - k]:.2f}]"
        assert rows[label][2] == str(n) and rows[label][4] == median, attack
    utility = pd.read_csv(attacked / "utility.csv")
    assert f"test accuracy is {utility.test_accuracy.iloc[-1]:.3f} after round 2" in markdown


def test_attacks_do_not_change_the_global_model(attacked: Path, tmp_path: Path) -> None:
    honest = _run(tmp_path / "honest", "attack.names=none")
    curious = torch.load(attacked / "checkpoints" / "global.pt", weights_only=True)
    plain = torch.load(honest / "checkpoints" / "global.pt", weights_only=True)
    assert curious.keys() == plain.keys()
    for name in curious:
        if isinstance(curious[name], torch.Tensor):
            assert torch.equal(curious[name], plain[name]), name
    assert len(pd.read_parquet(honest / "leakage.parquet")) == 0


def test_failing_clients_are_recorded_and_the_run_completes(tmp_path: Path) -> None:
    # (A run in which every client or every attack fails is a failed run: test_run_control.)
    out = _run(tmp_path / "faulty", "sim.fail-rate=0.4", "attack.names=aux-mean")
    utility = pd.read_csv(out / "utility.csv")
    assert list(utility["round"]) == [0, 1, 2]
    assert utility.num_failures.sum() > 0
    # train.fraction-train=0.67 asks 2 of the 3 clients each round.
    assert (utility.num_replies + utility.num_failures)[1:].eq(2).all()
    leakage = pd.read_parquet(out / "leakage.parquet")
    assert len(leakage) > 0 and (leakage.status == "ok").all()
    assert (out / "DONE").exists()


LTI = [
    "attack.names=lti",
    "attack.lti.preset=cpu-small",
    "attack.lti.epochs=2",
    "attack.lti.refresh=frozen",
    "attack.clients-per-round=1",
]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One run of 1 round resumed in a fresh run for 2 (each run its own Ray), shared by the
    resume test and the LTI cache test: a resume is a resume whichever attack it runs, and
    each run costs most of a minute. What the tests check of the run before its resume is
    kept here; test_lti_... damages the cache last (it comes after test_resume_... in this
    module, which pytest and `--dist loadscope` run in order)."""
    out = _run(tmp_path_factory.mktemp("resumed") / "lti", *LTI, "num-server-rounds=1")
    cache = out / "state" / "lti" / "lti-inverter-r000001.pt"
    cached = cache.exists()
    cached_round = torch.load(cache, weights_only=True)["meta"]["round"] if cached else None
    began = json.loads((out / "environment.json").read_text())
    # As if begun under another torch: the resume says so and environment.json keeps it, as
    # the added rounds may differ from an uninterrupted run's (audit BM3).
    (out / "environment.json").write_text(json.dumps({**began, "torch": "0.0"}))
    error = io.StringIO()
    with contextlib.redirect_stderr(error):
        _run(out, *LTI, "num-server-rounds=2", "sim.resume=true")
    return {
        "out": out,
        "began": began,
        "cached": cached,
        "cached_round": cached_round,
        "err": error.getvalue(),
    }


def test_resume_continues_after_the_last_finished_round(resumed: dict[str, object]) -> None:
    out = resumed["out"]
    assert isinstance(out, Path)
    began = resumed["began"]
    assert isinstance(began, dict)
    assert began["run_format"] == 1 and len(began["fedleak_source"]) == 16
    change = f"torch 0.0 -> {torch.__version__}"
    assert f"began with other software ({change}): the rounds it adds may" in resumed["err"]
    resumed_env = json.loads((out / "environment.json").read_text())
    assert resumed_env["torch"] == "0.0" and resumed_env["resumed_with"] == [[change]]
    utility = pd.read_csv(out / "utility.csv")
    assert list(utility["round"]) == [0, 1, 2]
    assert sorted(pd.read_parquet(out / "leakage.parquet")["round"].unique()) == [1, 2]
    # The directory now describes one study of 2 rounds, all finished.
    assert RunDirectory.open(out).config.num_server_rounds == 2
    assert "2 of 2 rounds finished" in (out / "summary.md").read_text(encoding="utf-8")


def test_resume_refuses_any_change_but_more_rounds(tmp_path: Path, capsys) -> None:
    out = tmp_path / "kept"
    stored = parse_flat({"out-dir": str(out)}, load_preset("quickstart"))
    RunDirectory.create(out, stored, {})
    changed = ["seed=1", "defense.spec=sign", "train.lr=0.1", "num-server-rounds=5"]
    args = ["run", "quickstart", "--out", str(out), "--set", "sim.resume=true"]
    assert main([*args, *[a for c in changed for a in ("--set", c)]]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "differing: " in error
    differing = error.split("differing: ")[1].split(". ")[0]
    for named in ("seed=1 (the run has 0)", "defense.spec='sign' (the run has 'none')"):
        assert named in differing
    assert "train.lr=0.1 (the run has 0.15)" in differing and "num-server-rounds" not in differing
    assert main([*args, "--set", "num-server-rounds=2"]) == 1
    assert "num-server-rounds=2 is fewer than the 50 rounds" in capsys.readouterr().err
    # Nothing was started or written: the stored study is untouched.
    assert RunDirectory.open(out).config == stored
    assert not (out / "utility.csv").exists()


def test_lti_inverter_is_cached_in_the_run_directory_and_resumed(
    resumed: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    out = resumed["out"]
    assert isinstance(out, Path)
    # After the first run (1 round), before its resume.
    assert resumed["cached"]
    assert resumed["cached_round"] == 1
    # The folder the run gave its cache is no setting of the study: a resume with the
    # study's own settings must not read as another one.
    assert "cache-dir" not in (out / "config.toml").read_text()
    # environment.json names the folder it ran with, and the preset's values (audit DO7).
    ran = resumed["began"]["attacks"]["lti"]
    assert ran["cache-dir"] == str(out / "state" / "lti") and ran["refresh"] == "frozen"
    assert ran["hidden"] == [500] and ran["epochs"] == 2
    leakage = pd.read_parquet(out / "leakage.parquet")
    second = leakage[(leakage["round"] == 2) & (leakage.scored_against == "original")]
    assert len(second) > 0
    # Frozen after a resume: the fresh server process reuses the cached inverter, no training.
    assert second.message.str.contains("reused the inverter").all()
    first = leakage[leakage["round"] == 1].diagnostics.map(json.loads)
    assert all(d["train_epochs"] == 2 and d["val_psnr"] > 0 for d in first)
    assert all(d["train_epochs"] == 0 for d in second.diagnostics.map(json.loads))
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Learned attacks' training per round" in report
    assert "from scratch" in report and "reused" in report
    # A damaged inverter is refused before the resumed rounds: round 3 would have trained
    # anew (and failed round 2's successor), unlike the run it continues.
    saved = out / "state" / "lti" / "lti-inverter-r000001.pt"
    trained = torch.load(saved, weights_only=True)
    saved.write_bytes(b"garbage\n")
    args = ["run", "quickstart", "--out", str(out), *TINY]
    for item in (*LTI, "num-server-rounds=3", "sim.resume=true"):
        args += ["--set", item]
    assert main(args) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"fedleak: error: {saved}")
    assert error.endswith("restore it, or start the run again in a new out-dir")
    assert pd.read_parquet(out / "leakage.parquet")["round"].max() == 2
    assert (out / "DONE").exists()
    # One that reads but does not fit the inverter is found only in the round that loads it:
    # it failed that round's rows and every later round's, and the run still ended DONE
    # with exit 0 (audit FE1).
    first = next(name for name in trained["state_dict"] if name.endswith("weight"))
    trained["state_dict"][first] = trained["state_dict"][first][:-1]
    torch.save(trained, saved)
    assert main(args) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fedleak: error: ") and f"{saved}: does not fit" in error
    assert not (out / "DONE").exists() and (out / "FAILED").exists()
    assert pd.read_parquet(out / "leakage.parquet")["round"].max() == 2


def test_fedavg_signs_step_the_learning_rate_per_coordinate(tmp_path: Path) -> None:
    # One local step: each client's delta is -lr * g, so its signs hardly depend on lr (only
    # where lr * g vanishes beside the weight in float32), and two runs at lr 0.05 and 0.1
    # differ by 0.05 x the clients' mean sign. Taken as weight changes, the signs moved every
    # weight by up to 1 a round at any lr (the runs differed only where those signs did).
    weights = {}
    for lr in (0.05, 0.1):
        out = _run(
            tmp_path / f"lr{lr}",
            "attack.names=none",
            "num-server-rounds=1",
            "train.mode=fedavg",
            "defense.spec=sign",
            f"train.lr={lr}",
        )
        checkpoint = torch.load(out / "checkpoints" / "global.pt", weights_only=True)
        weights[lr] = checkpoint["state_dict"]
    steps = torch.cat(
        [
            ((weights[0.1][name] - weights[0.05][name]) / 0.05).flatten()
            for name in weights[0.1]
            if isinstance(weights[0.1][name], torch.Tensor)
            and weights[0.1][name].is_floating_point()
        ]
    )
    # Two clients a round: their mean sign is -1, -1/2, 0, 1/2 or 1 (measured: 99.5% of the
    # 13,426 coordinates there, 58% at -1 or 1).
    on_grid = ((steps * 2 - (steps * 2).round()).abs() < 1e-4) & (steps.abs() <= 1 + 1e-4)
    assert on_grid.float().mean() > 0.99
    assert ((steps.abs() - 1).abs() < 1e-4).float().mean() > 0.3
