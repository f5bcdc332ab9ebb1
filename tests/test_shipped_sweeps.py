"""The shipped sweeps in their cheap mode: every cell parsed and preflighted (registries and
data split), one or two representative cells run end to end through Flower with tiny budgets
(each cell costs a Flower simulation's start, ~30 s here, so not every cell runs in CI).

Each sweep is run exactly as a user would (`run_sweep` on the shipped file, `--set` overrides
that shrink budgets but keep the sample layout, `--cells` to pick cells), so a preset that
stops working offline fails here. Every cell of the image tables must score at least 64
reconstructions per attack, the text table its 16 sequences (4 clients x 4): the layout
(clients attacked x samples each) is what the overrides leave alone.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pandas as pd
import pytest

from fedleak.config import attacked_rounds
from fedleak.report.rundir import RunDirectory
from fedleak.simulations.cli import main
from fedleak.simulations.sweep import _validate, load_sweep, read_manifest, run_sweep

MIN_SCORED = 64
MIN_SCORED_TEXT = 16

TINY_ATTACKS = {"attack.max-iterations": 4, "attack.images-per-client": 1}
TINY_LTI = {
    "attack.lti.epochs": 1,
    "attack.lti.hidden": "16",
    "attack.lti.hash-bins": 256,
    "data.aux-size": 400,
}

CHEAP = {
    "demo": (
        {
            **TINY_LTI,
            "attack.max-iterations": 4,
            "num-server-rounds": 2,
            "attack.rounds": "every:1",
        },
        # Under sign compression; cell 000 is the quickstart preset itself, which other
        # tests run.
        ["cell-001-*"],
    ),
    "lti-table": (
        {**TINY_ATTACKS, **TINY_LTI},
        # B=1 (per-sample) without defense; B=4 under sign compression.
        ["cell-000-*", "cell-005-*"],
    ),
    "defense-tradeoff": (
        {**TINY_ATTACKS, "num-server-rounds": 2},
        # B=1 (per-sample) under the combined defense the paper recommends.
        ["*-per-sample_*_instahide-4+prune-0.9"],
    ),
    "dp-frontier": (
        # Two clients x batches of 8 per round: 4 rounds score 64. DP-SGD at z = 1.1 on
        # fixed-size and on Poisson batches.
        {**TINY_ATTACKS, "num-server-rounds": 4},
        ["cell-003-*", "cell-007-*"],
    ),
    "text-table": (
        {
            "attack.max-iterations": 4,
            "data.aux-size": 300,
            "data.vocab-size": 300,
            **{
                f"attack.{name}.{key}": value
                for name in ("lti-text", "lti-p")
                for key, value in (("epochs", 1), ("hidden", "32"), ("hash-bins", 256))
            },
            "attack.lti-p.pseudo-size": 20,
        },
        # Sign compression: the cell with the normalised TAG beside every other attack.
        ["cell-001-*"],
    ),
}


def min_scored(name: str) -> int:
    return MIN_SCORED_TEXT if name == "text-table" else MIN_SCORED


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_every_cell_of_the_shipped_sweeps_passes_the_preflight(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides, _ = CHEAP[name]
    _validate(load_sweep(name, overrides), {})
    plan = load_sweep(name)
    # Components and data split for the sweep's clients, as `fedleak sweep NAME --check` runs.
    assert main(["sweep", name, "--check", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"sweep {plan.name}: {len(plan.cells)} cells")
    assert not any(tmp_path.iterdir())
    for cell in plan.cells:
        # Each attacked client's batch is scored whole: B single-sample updates under the
        # per-sample threat model, or one update of B samples.
        config = cell.config
        clients = min(config.attack.clients_per_round or plan.num_clients, plan.num_clients)
        rounds = attacked_rounds(config.attack.rounds, config.num_server_rounds)
        count = len(rounds) if rounds is not None else config.num_server_rounds
        assert clients * config.train.batch_size * count >= min_scored(name), cell.id


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHEAP))
def test_shipped_sweep_runs_its_cheap_cells_end_to_end(name: str, tmp_path: Path) -> None:
    from fedleak.report.build import build_report

    overrides, cells = CHEAP[name]
    sweep_dir = run_sweep(name, out_dir=tmp_path, overrides=overrides, cells=cells, say=print)
    listed = read_manifest(sweep_dir)["cells"]
    # The cells the patterns leave out stay listed, not run.
    manifest = [c for c in listed if any(fnmatch.fnmatchcase(c["id"], p) for p in cells)]
    assert len(manifest) == len(cells)
    assert all(c["status"] == "pending" for c in listed if c not in manifest)
    for cell in manifest:
        assert cell["status"] == "done", cell
        run = RunDirectory.open(sweep_dir / cell["id"])
        rows = run.leakage()
        ok = rows[(rows["status"] == "ok") & (rows["scored_against"] == "original")]
        counts = ok.groupby("attack").size()
        attacks = run.config.attack.names
        assert set(counts.index) == set(attacks), (cell["id"], counts.to_dict())
        assert (counts >= min_scored(name)).all(), (cell["id"], counts.to_dict())
        assert pd.notna(run.utility()["test_accuracy"]).all()
    html, _ = build_report(sweep_dir)
    assert html.is_file()


@pytest.mark.slow
def test_leakage_over_rounds_runs_in_its_cheap_mode(tmp_path: Path) -> None:
    """The long single-run preset, 10 rounds instead of 100: every fifth round attacked by
    each of its attacks, the model evaluated every round."""
    from fedleak.simulations.cli import main

    out = tmp_path / "run"
    tiny = {**TINY_ATTACKS, **TINY_LTI, "num-server-rounds": 10}
    args = ["run", "leakage-over-rounds", "--out", str(out)]
    for key, value in tiny.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    run = RunDirectory.open(out)
    rows = run.leakage()
    ok = rows[(rows["status"] == "ok") & (rows["scored_against"] == "original")]
    attacked = attacked_rounds(run.config.attack.rounds, 10)
    assert attacked is not None and len(attacked) >= 2
    assert set(ok["round"]) == set(attacked)
    assert set(ok["attack"]) == {"aux-mean", "ig", "lti"}
    # One attacked client's 32 per-sample updates per attacked round, every one scored.
    assert (ok.groupby(["attack", "round"]).size() == 32).all()
    assert len(run.utility()) >= 10 and pd.notna(run.utility()["test_accuracy"]).all()
