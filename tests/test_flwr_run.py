"""`flwr run .`, the README's Flower-native path, end to end: a local SuperLink, the ServerApp and
the simulated clients as Flower starts them, writing the same run directory as `fedleak run`.

The SuperLink listens on Flower's fixed local ports, so the test skips when one already answers
(it would run our app in someone else's environment). It gets its own FLWR_HOME, and the
SuperLink it started (found by that FLWR_HOME in its command line) is stopped afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_flwr_run_writes_the_same_run_directory_with_its_report(
    flwr_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    env = {
        **os.environ,
        # What `make flwr-run` and the README's activated shell provide.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    study = {  # values as Flower's run config reads them (TOML)
        "num-server-rounds": "2",
        "attack.names": "'aux-mean,ig'",
        "attack.rounds": "'all'",
        "attack.max-iterations": "20",
        "train.batch-size": "2",
        "data.aux-size": "100",
        "attack.images-per-client": "2",
    }
    settings = " ".join([f"out-dir='{out}'", *(f"{key}={value}" for key, value in study.items())])
    result = _flwr_run(settings, env, tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    # Once each: Flower's ServerApp process relays stdout, so a logged copy showed twice.
    assert log.count(f"fedleak: run directory {out}") == 1, log[-3000:]
    assert log.count(f"fedleak: report {out / 'report.html'}") == 1, log[-3000:]
    # The per-client declarations are no longer averaged into Flower's log.
    assert "'partition-id'" not in log and "train-loss" in log
    for name in ("config.toml", "leakage.parquet", "utility.csv", "summary.md", "DONE"):
        assert (out / name).exists(), name
    assert (out / "report.html").stat().st_size > 10_000
    leakage = pd.read_parquet(out / "leakage.parquet")
    assert set(leakage["attack"]) == {"aux-mean", "ig"}
    assert leakage.loc[leakage["attack"] == "aux-mean", "reference"].all()
    assert list(pd.read_csv(out / "utility.csv")["round"]) == [0, 1, 2]

    # The same study through `fedleak run` writes the same rows, bit for bit (the server's
    # thread count once made LPIPS differ in the 8th digit between the two paths).
    twin = tmp_path / "twin"
    plain = {key: value.strip("'") for key, value in study.items()}
    sets = [arg for key, value in plain.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "fedleak.simulations.cli", "run", "quickstart", *sets]
    command += ["--num-clients", "2", "--client-cpus", "1", "--out", str(twin)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    timings = ["seconds", "round_seconds", "attack_seconds"]
    for name in ("utility.csv", "leakage.parquet"):
        read = pd.read_csv if name.endswith(".csv") else pd.read_parquet
        ours, theirs = (read(folder / name) for folder in (twin, out))
        ours, theirs = (f.drop(columns=[c for c in timings if c in f]) for f in (ours, theirs))
        pd.testing.assert_frame_equal(ours, theirs, check_exact=True, obj=name)
    # Both record the threads their clients computed with, which a resume must match.
    threads = [json.loads((f / "environment.json").read_text()) for f in (out, twin)]
    assert threads[0]["client_threads"] == threads[1]["client_threads"] == 1

    # A bad setting reaches the user as one line in the stream (the SuperLink is already up).
    failed = _flwr_run(f"out-dir='{tmp_path / 'bad'}' attack.names='nope'", env, tmp_path)
    log = failed.stdout + failed.stderr
    assert "raised an exception: UnknownNameError: attack.names=" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (tmp_path / "bad" / "DONE").exists()


def _flwr_run(settings: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            str(REPO),
            "--stream",
            "--run-config",
            settings,
            "--federation-config",
            "num-supernodes=2 client-resources-num-cpus=1",
        ],
        cwd=cwd,  # not the app folder: Flower then imports one copy of the code
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
