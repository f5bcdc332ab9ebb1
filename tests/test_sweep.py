"""Sweeps: one-line errors before any run, cells as run directories, skip-finished reruns.

Most tests use a fake runner that writes a plausible run directory; the end-to-end test runs
a tiny 2-cell sweep through the real Flower simulation (`run_study`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import children, ended

from fedleak.config import ConfigError, RunConfig
from fedleak.interrupt import stop_requested
from fedleak.report.rundir import RunDirectory, RunDirectoryError
from fedleak.simulations.launch import StudyInterrupted, _stop_on_first_signal
from fedleak.simulations.presets import (
    PRESETS_DIR,
    is_sweep,
    list_presets,
    load_preset,
    preset_path,
)
from fedleak.simulations.sweep import (
    SweepError,
    SweepFailed,
    _LabelledLines,
    _skipped_lines,
    check_sweep,
    load_sweep,
    read_manifest,
    run_sweep,
)

GRID = """
[sweep]
name = "tiny"
num-clients = 2

[sweep.grid]
"train.batch-size" = [1, 2]
defense.spec = ["none", "prune:0.5"]

[base]
num-server-rounds = 2
[base.attack]
names = "aux-mean"
"""


def fake_runner(config: RunConfig, path: Path) -> Path:
    """Writes every configured round as a real run would (module level: picklable)."""
    run = RunDirectory.create(path, config, {"runner": "fake"})
    for r in range(1, config.num_server_rounds + 1):
        rows = [
            {
                "client_id": c,
                "attack": a,
                "sample": 0,
                "target_index": 0,
                "psnr": 10.0 + r,
                "mse": 0.1,
                "ssim": 0.2,
                "lpips_alex": 0.5,
            }
            for c in (0, 1)
            for a in config.attack.names
        ]
        run.append_round(r, rows, {"test_loss": 1.0, "test_accuracy": 0.1 * r, "num_replies": 2})
        print(f"round {r}/{config.num_server_rounds}", flush=True)
    run.mark_done()
    return path


class Recorder:
    """A runner that records its calls and can be told to stop or fail at some call."""

    def __init__(self, interrupt_at: int | None = None, fail_cell: str | None = None) -> None:
        self.calls: list[str] = []
        self.interrupt_at = interrupt_at
        self.fail_cell = fail_cell

    def __call__(self, config: RunConfig, path: Path) -> Path:
        self.calls.append(path.name)
        if self.fail_cell and path.name.startswith(self.fail_cell):
            raise RuntimeError("simulated crash\nwith a second line")
        if self.interrupt_at == len(self.calls):
            # Killed mid-cell: one round recorded of two.
            run = RunDirectory.create(path, config, {})
            run.append_round(1, [], {"test_loss": 1.0, "test_accuracy": 0.1})
            raise KeyboardInterrupt
        return fake_runner(config, path)


def _write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_cell_names_its_defenses_in_the_order_they_apply(tmp_path: Path) -> None:
    # `sign+prune:0.9` prunes first and signs after (as its rows and config.toml record it):
    # a cell called `sign+prune-0.9` would read as the other order.
    text = """
[sweep]
name = "order"
[sweep.grid]
"defense.spec" = ["sign+prune:0.9", "gauss:0.01+dpsgd:1.0:1", "mixup:2+sign", "dpsgd:1.0:0.5"]
"""
    plan = load_sweep(_write(tmp_path, text))
    assert [c.id for c in plan.cells] == [
        "cell-000-prune-0.9+sign",
        "cell-001-dpsgd-1.0-1+gauss-0.01",
        "cell-002-mixup-2+sign",
        "cell-003-dpsgd-1.0-0.5",
    ]


def test_cell_patterns_also_match_the_defense_as_runs_record_it(tmp_path: Path) -> None:
    """Folders keep the spec as written (`DPSGD:2:1e0`), rows and reports the canonical one
    (`dpsgd:2:1`): a pattern written after the report matched nothing (audit CY2)."""
    text = """
[sweep]
name = "spelled"
[sweep.grid]
"defense.spec" = ["Sign + Prune:0.5", "DPSGD:2:1e0", "instahide:2:INTER"]
"""
    path = _write(tmp_path, text)
    plan = load_sweep(path)
    assert [c.id for c in plan.cells] == [
        "cell-000-Prune-0.5+Sign",
        "cell-001-DPSGD-2-1e0",
        "cell-002-instahide-2-INTER",
    ]
    for pattern, picked in (
        ("*dpsgd-2-1", [1]),
        ("*DPSGD-2-1e0", [1]),
        ("*inter*", [2]),
        ("*prune*", [0]),
        ("cell-00[02]-*", [0, 2]),
    ):
        assert [c.index for c in load_sweep(path, cells=[pattern]).cells] == picked


def test_grid_and_cells_cross_in_a_fixed_order(tmp_path: Path) -> None:
    text = """
[sweep]
name = "crossed"
[sweep.grid]
seed = [0, 1]
[[sweep.cells]]
"defense.spec" = "none"
[[sweep.cells]]
"defense.spec" = "prune:0.9"
"attack.names" = "ig"
"attack.ig.tv" = 0.05
"""
    plan = load_sweep(_write(tmp_path, text))
    assert [c.id for c in plan.cells] == [
        "cell-000-none_seed0",
        "cell-001-none_seed1",
        "cell-002-prune-0.9_ig_tv-0.05_seed0",
        "cell-003-prune-0.9_ig_tv-0.05_seed1",
    ]
    assert plan.cells[3].config.seed == 1 and plan.cells[3].config.defense.spec == "prune:0.9"
    assert plan.cells[3].config.attack.params == {"ig": {"tv": 0.05}}
    assert plan.varying == ("defense.spec", "seed", "attack.names", "attack.ig.tv")
    assert (plan.num_clients, plan.parallel) == (10, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[sweep]\n[sweep.grid]\n"train.batchsize" = [1, 2]\n',
            r"train\.batchsize: unknown setting; did you mean train\.batch-size",
        ),
        (
            '[sweep]\n[sweep.grid]\n"train.batch-size" = []\n',
            r"sweep\.grid\.train\.batch-size: empty list",
        ),
        ("[sweep]\n[sweep.grid]\n", r"no cells"),
        ("[sweep]\n", r"no cells"),
        (
            '[sweep]\n[sweep.grid]\n"train.batch-size" = 4\n',
            r"sweep\.grid\.train\.batch-size=4: expected a list of values",
        ),
        ("[sweep]\n[sweep.grid]\nseed = [1, 1]\n", r"sweep\.grid\.seed: lists 1 more than once"),
        # One pipeline spelt two ways ran twice and was pooled as one setting of n=4 from 2.
        (
            '[sweep]\n[sweep.grid]\n"defense.spec" = ["mixup:4+prune:0.9", "prune:0.9+mixup:4"]\n',
            r"sweep\.grid\.defense\.spec: lists 'prune:0\.9\+mixup:4' more than once",
        ),
        (
            '[sweep]\n[[sweep.cells]]\n"defense.spec" = "sign+prune:0.9"\n'
            '[[sweep.cells]]\n"defense.spec" = "prune:0.9+sign"\n',
            r"cell 1 \(defense\.spec='prune:0\.9\+sign'\): same configuration as cell 0",
        ),
        (
            "[sweep]\n[sweep.grid]\nseed = [1, 2]\n[[sweep.cells]]\nseed = 3\n",
            r"sweep\.cells #1: seed=3 clashes with sweep\.grid\.seed",
        ),
        (
            "[sweep]\n[[sweep.cells]]\nseed = 3\n[[sweep.cells]]\nseed = 3\n",
            r"cell 1 \(seed=3\): same configuration as cell 0",
        ),
        ("[sweep]\n[[sweep.cells]]\nseed = [3]\n", r"a cell sets one value"),
        (
            "[sweep]\n"
            + "[[sweep.cells]]\nseed = 1\n" * 1001
            + "[sweep.grid]\ntrain.lr = [1, 2]\n",
            r"^sweep: 2,002 cells \(2 x 1,001 cells\); at most 2,000",
        ),
        (
            '[sweep]\npreset = "demo"\n[sweep.grid]\nseed = [1]\n',
            r"^sweep\.preset='demo': preset 'demo' is a sweep",
        ),
        # Checked for minutes in silence before starting 10,000 runs (audit BV3).
        (
            f'[sweep]\n[sweep.grid]\nseed = {list(range(700))}\n"train.lr" = [0.1, 0.2, 0.3]\n',
            r"^sweep: 2,100 cells \(700 x 3\); at most 2,000 in one sweep file",
        ),
        # An attack parameter at its default, or of an attack the cells do not run, made cells
        # that ran the same study twice (audit BV1).
        (
            '[sweep]\n[[sweep.cells]]\n"attack.ig.restarts" = 1\n'
            '[[sweep.cells]]\n"attack.ig.check-every" = 50\n',
            r"cell 1 \(attack\.ig\.check-every=50\): same configuration as cell 0",
        ),
        (
            '[sweep]\n[sweep.grid]\n"attack.dlg.restarts" = [1, 2]\n',
            r"cell 1 \(attack\.dlg\.restarts=2\): same configuration as cell 0",
        ),
        # The sweep resumes its cells itself; a --set made every new cell warn (audit CU3).
        (
            "[sweep]\n[sweep.grid]\nseed = [1]\n[base.sim]\nresume = true\n",
            r"^base\.sim\.resume: set by the sweep for each cell \(rerunning the sweep resumes "
            r"its interrupted cells\); remove it$",
        ),
        # The same attacks in another order ran the same study twice (audit CR2).
        (
            '[sweep]\n[sweep.grid]\n"attack.names" = ["ig,aux-mean", "aux-mean,ig"]\n',
            r"cell 1 \(attack\.names='aux-mean,ig'\): same configuration as cell 0",
        ),
        (
            "[sweep]\nparalel = 2\n[sweep.grid]\nseed = [1]\n",
            r"sweep\.paralel: unknown sweep setting",
        ),
        (
            "[sweep]\nparallel = 0\n[sweep.grid]\nseed = [1]\n",
            r"sweep\.parallel=0: expected an integer >= 1",
        ),
        ("[sweep]\n[sweep.grid]\nseed = [1]\n[runs]\nx = 1\n", r"runs: unknown top-level key"),
        ('[sweep]\n[sweep.grid]\n"out-dir" = ["/a", "/b"]\n', r"sweep\.grid\.out-dir: set by"),
        (
            "[sweep]\n[sweep.grid]\nseed = [1]\n[base]\nrounds = 3\n",
            r"base: rounds: unknown setting",
        ),
        ("[sweep]\n[sweep.grid]\nseed = [1, -1]\n", r"cell 1 \(seed=-1\): seed=-1: expected"),
        ('[sweep]\npreset = "nope"\n[sweep.grid]\nseed = [1]\n', r"preset 'nope': unknown"),
        ("[sweep\n", r"not valid TOML"),
        # "did you mean train.min-clients?" pointed at another setting (audit EI6).
        (
            "[sweep]\n[sweep.grid]\nnum-clients = [2, 4]\n",
            r"^sweep\.grid\.num-clients: a setting of the whole sweep, one value per sweep file",
        ),
        # TOML allows a dotted key beside a table of the same path: the later one won, and a
        # grid of none and sign ran prune alone (audit EI1).
        (
            '[sweep]\n[sweep.grid]\n"defense.spec" = ["none", "sign"]\n'
            '[sweep.grid.defense]\nspec = ["prune:0.9"]\n',
            r"^sweep\.grid\.defense\.spec=\['prune:0\.9'\] and sweep\.grid\.defense\.spec="
            r"\['none', 'sign'\]: one key written twice",
        ),
        (
            '[sweep]\n[[sweep.cells]]\n"train.lr" = 0.5\n[sweep.cells.train]\nlr = 0.2\n',
            r"^sweep\.cells #1\.train\.lr=0\.2 and sweep\.cells #1\.train\.lr=0\.5: one key",
        ),
        (
            '[sweep]\n[sweep.grid]\nseed = [1]\n[base]\n"train.lr" = 0.5\n[base.train]\nlr = 0.2\n',
            r"^base\.train\.lr=0\.2 and base\.train\.lr=0\.5: one key written twice",
        ),
    ],
)
def test_bad_sweep_files_fail_with_one_line_before_any_run(
    tmp_path: Path, text: str, message: str
) -> None:
    runner = Recorder()
    with pytest.raises(ConfigError, match=message) as error:
        run_sweep(_write(tmp_path, text), out_dir=tmp_path / "out", runner=runner)
    assert "\n" not in str(error.value)
    assert runner.calls == [] and not (tmp_path / "out").exists()


def test_tiny_sweep_runs_every_cell_and_a_rerun_skips_them(tmp_path: Path) -> None:
    source = _write(tmp_path, GRID)
    lines: list[str] = []
    sweep_dir = run_sweep(source, out_dir=tmp_path / "out", runner=fake_runner, say=lines.append)
    assert sweep_dir == (tmp_path / "out" / "tiny").resolve()
    manifest = read_manifest(sweep_dir)
    assert [c["status"] for c in manifest["cells"]] == ["done"] * 4
    assert manifest["cells"][3]["overrides"] == {"train.batch-size": 2, "defense.spec": "prune:0.5"}
    for cell in manifest["cells"]:
        run = RunDirectory.open(sweep_dir / cell["id"])
        assert run.is_finished() and run.config.out_dir == str(sweep_dir / cell["id"])
    assert (sweep_dir / "sweep.toml").read_text() == GRID
    assert "4 cells, 4 to run" in lines[0]

    again = Recorder()
    run_sweep(source, out_dir=tmp_path / "out", runner=again, say=lines.append)
    assert again.calls == [] and "0 to run" in lines[-1]


def test_a_sweep_folder_with_links_where_fedleak_writes_leaves_their_targets_alone(
    tmp_path: Path,
) -> None:
    """A sweep folder from elsewhere may hold `sweep.toml` and `sweep.json` as links to the
    user's files: the copy and the manifest were written through them."""
    source = _write(tmp_path, GRID)
    sweep_dir = run_sweep(source, out_dir=tmp_path / "out", runner=fake_runner)
    targets = {}
    for name in ("sweep.toml", "sweep.json"):
        target = tmp_path / f"precious-{name}"
        target.write_text("keep")
        path = sweep_dir / name
        if name == "sweep.json":
            target.write_text(path.read_text())  # a manifest fedleak can still read
        targets[name] = target.read_text()
        path.unlink()
        path.symlink_to(target)
    run_sweep(source, out_dir=tmp_path / "out", runner=Recorder())
    for name, text in targets.items():
        assert (tmp_path / f"precious-{name}").read_text() == text
        assert not (sweep_dir / name).is_symlink()
    assert (sweep_dir / "sweep.toml").read_text() == GRID


def recording_runner(config: RunConfig, path: Path) -> Path:
    """`fake_runner` recording the configuration as a run does (module level: picklable)."""
    from fedleak.server.validate import canonical

    return fake_runner(canonical(config), path)


def test_a_sweep_with_relative_cache_folders_reruns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run records its cache-dir as an absolute path; the rerun compared that with the
    cell's relative one and refused the sweep it had just run (audit BI R1)."""
    monkeypatch.chdir(tmp_path)
    text = GRID.replace(
        '[sweep.grid]\n"train.batch-size" = [1, 2]\ndefense.spec = ["none", "prune:0.5"]',
        '[sweep.grid]\n"attack.lti.cache-dir" = ["cacheA", "cacheB"]',
    )
    text = text.replace('names = "aux-mean"', 'names = "aux-mean,lti"')
    assert "cacheA" in text and "prune" not in text
    source = _write(tmp_path, text)
    sweep_dir = run_sweep(source, out_dir=tmp_path / "out", runner=recording_runner)
    recorded = RunDirectory.open(sweep_dir / read_manifest(sweep_dir)["cells"][0]["id"]).config
    assert recorded.attack.params["lti"]["cache-dir"] == str(tmp_path / "cacheA")
    again = Recorder()
    run_sweep(source, out_dir=tmp_path / "out", runner=again)
    assert again.calls == []


def test_interrupted_sweep_resumes_without_redoing_finished_cells(tmp_path: Path) -> None:
    source = _write(tmp_path, GRID)
    first = Recorder(interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(source, out_dir=tmp_path, runner=first, say=lambda _: None)
    sweep_dir = tmp_path / "tiny"
    statuses = [c["status"] for c in read_manifest(sweep_dir)["cells"]]
    assert statuses == ["done", "interrupted", "pending", "pending"]
    done = sweep_dir / first.calls[0] / "utility.csv"
    stamp = done.stat().st_mtime_ns
    assert RunDirectory.open(sweep_dir / first.calls[1]).finished_rounds() == 1

    second = Recorder()
    run_sweep(source, out_dir=tmp_path, runner=second, say=lambda _: None)
    assert (
        second.calls == first.calls[1:] + [c["id"] for c in read_manifest(sweep_dir)["cells"]][2:]
    )
    assert done.stat().st_mtime_ns == stamp
    redone = RunDirectory.open(sweep_dir / first.calls[1])
    assert list(redone.utility()["round"]) == [1, 2]
    assert all(c["status"] == "done" for c in read_manifest(sweep_dir)["cells"])


def test_a_stop_after_a_cells_last_safe_point_still_stops_the_sweep(tmp_path: Path) -> None:
    # A Ctrl-C (or a scheduler's SIGTERM) that came after the cell's last safe point: the cell
    # ends done, its run clears the request, and the sweep ran every remaining cell, exit 0.
    calls: list[str] = []

    def stopped_late(config: RunConfig, path: Path) -> Path:
        calls.append(path.name)
        with _stop_on_first_signal():
            done = fake_runner(config, path)
            os.kill(os.getpid(), signal.SIGINT)  # the run's handler: a stop at the next safe point
        return done

    source = _write(tmp_path, GRID)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(source, out_dir=tmp_path, runner=stopped_late, say=lambda _: None)
    statuses = [c["status"] for c in read_manifest(tmp_path / "tiny")["cells"]]
    assert len(calls) == 1 and statuses == ["done", "pending", "pending", "pending"]


def test_a_stop_after_the_last_cells_last_safe_point_finishes_the_sweep(tmp_path: Path) -> None:
    """Every cell done, yet the sweep raised KeyboardInterrupt, so `fedleak sweep` wrote no
    report (only a rerun with nothing to run then wrote it) and exited 130 (audit CR3)."""
    calls: list[str] = []
    said: list[str] = []

    def last_stopped_late(config: RunConfig, path: Path) -> Path:
        calls.append(path.name)
        with _stop_on_first_signal():
            done = fake_runner(config, path)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGINT)
        return done

    source = _write(tmp_path, GRID)
    sweep_dir = run_sweep(source, out_dir=tmp_path, runner=last_stopped_late, say=said.append)
    assert (
        len(calls) == 4
        and "  stop requested after the last cell finished: the sweep is done" in said
    )
    assert [c["status"] for c in read_manifest(sweep_dir)["cells"]] == ["done"] * 4


def test_a_moved_sweep_folder_is_rerun_where_it_now_is(tmp_path: Path) -> None:
    source = _write(tmp_path, GRID)
    run_sweep(source, out_dir=tmp_path / "before", runner=fake_runner, say=lambda _: None)
    (tmp_path / "after").mkdir()
    (tmp_path / "before" / "tiny").rename(tmp_path / "after" / "tiny")
    again = Recorder()
    run_sweep(source, out_dir=tmp_path / "after", runner=again, say=lambda _: None)
    assert again.calls == []


def test_a_cell_with_every_round_but_no_done_is_run_again(tmp_path: Path) -> None:
    source = _write(tmp_path, GRID)
    run_sweep(source, out_dir=tmp_path, runner=fake_runner, say=lambda _: None)
    killed = next((tmp_path / "tiny").glob("cell-002-*"))
    (killed / "DONE").unlink()  # killed after its last round, before its end was checked
    again = Recorder()
    run_sweep(source, out_dir=tmp_path, runner=again, say=lambda _: None)
    assert again.calls == [killed.name]


def test_a_failing_cell_is_recorded_and_retried_alone(tmp_path: Path) -> None:
    source = _write(tmp_path, GRID)
    runner = Recorder(fail_cell="cell-002")
    with pytest.raises(
        SweepFailed,
        match=r"1 of 4 cells failed \(cell-002-B2_none: "
        r"RuntimeError: simulated crash",
    ) as error:
        run_sweep(source, out_dir=tmp_path, runner=runner, say=lambda _: None)
    assert "\n" not in str(error.value) and len(runner.calls) == 4
    assert "; finished cells are kept in " in str(error.value)
    cells = read_manifest(tmp_path / "tiny")["cells"]
    assert [c["status"] for c in cells] == ["done", "done", "failed", "done"]
    retry = Recorder()
    run_sweep(source, out_dir=tmp_path, runner=retry, say=lambda _: None)
    assert retry.calls == ["cell-002-B2_none"]


def _dies_after_one_round(config: RunConfig, path: Path) -> Path:
    """What a cell killed in its process leaves: a round recorded, no DONE, no FAILED."""
    RunDirectory.create(path, config, {}).append_round(1, [], {"test_loss": 1.0})
    return path


def test_a_cell_whose_process_died_is_marked_failed_in_its_folder(tmp_path: Path) -> None:
    """The sweep recorded the cell failed, but its folder said nothing: the reports pooled its
    rounds as those of a run that had merely stopped early."""
    with pytest.raises(SweepFailed, match="runner returned after 1 of 2 rounds") as error:
        run_sweep(_write(tmp_path, GRID), out_dir=tmp_path, runner=_dies_after_one_round, say=print)
    # Every failed cell is named, not the first alone (audit BO7).
    assert "; also cell-001-B1_prune-0.5, cell-002-B2_none, cell-003-B2_prune-0.5); " in str(
        error.value
    )
    assert "; no cell finished; rerun the sweep" in str(error.value)  # none to keep (BP3)
    for cell in read_manifest(tmp_path / "tiny")["cells"]:
        run = RunDirectory.open(tmp_path / "tiny" / cell["id"])
        assert cell["status"] == "failed" and run.failed_reason() == cell["message"]


def _last_cell_dies(config: RunConfig, path: Path) -> Path:
    """Cells 0-2 finish, cell 3 dies after its first round (module level: picklable)."""
    if path.name.startswith("cell-003"):
        return _dies_after_one_round(config, path)
    return fake_runner(config, path)


def test_a_failed_retry_with_cells_says_that_finished_cells_are_kept(tmp_path: Path) -> None:
    """Retrying the one failed cell of four with `--cells` said "no cell finished" beside
    three finished ones (audit EI4)."""
    source = _write(tmp_path, GRID)
    quiet = {"out_dir": tmp_path, "runner": _last_cell_dies, "say": lambda _: None}
    with pytest.raises(SweepFailed, match="; finished cells are kept in "):
        run_sweep(source, **quiet)
    with pytest.raises(SweepFailed, match=r"1 of 1 cells failed .*; finished cells are kept in "):
        run_sweep(source, **quiet, cells=["cell-003-*"])


def test_a_changed_sweep_refuses_to_reuse_cells(tmp_path: Path) -> None:
    run_sweep(_write(tmp_path, GRID), out_dir=tmp_path, runner=fake_runner, say=lambda _: None)
    changed = GRID + "[base.train]\nlr = 0.05\n"
    runner = Recorder()
    with pytest.raises(
        RunDirectoryError,
        match=r"cell-000-B1_none: was run with train\.lr=0\.1, this "
        r"sweep wants 0\.05; use another out dir or sweep name",
    ):
        run_sweep(_write(tmp_path, changed, "changed.toml"), out_dir=tmp_path, runner=runner)
    assert runner.calls == []


def test_a_rerun_may_change_what_a_resumed_run_may_but_not_its_rounds(tmp_path: Path) -> None:
    """A longer timeout after a cell timed out was refused ("use another out dir"), though
    `fedleak run` resumes with it (audit EI2); more rounds stay refused: a finished cell
    would not run them."""
    run_sweep(_write(tmp_path, GRID), out_dir=tmp_path, runner=fake_runner, say=lambda _: None)
    # Appended to GRID's [base.attack] table, then a table of its own.
    bookkeeping = (
        GRID + '"show-progress" = true\n[base.sim]\ntimeout = 100\n"payload-budget-mb" = 100\n'
    )
    runner = Recorder()
    run_sweep(_write(tmp_path, bookkeeping, "b.toml"), out_dir=tmp_path, runner=runner)
    assert runner.calls == []  # every cell had finished: none runs again
    more = GRID.replace("num-server-rounds = 2", "num-server-rounds = 3")
    with pytest.raises(RunDirectoryError, match=r"was run with num-server-rounds=2, this sweep"):
        run_sweep(_write(tmp_path, more, "m.toml"), out_dir=tmp_path, runner=runner)


def test_a_rerun_that_changes_nothing_the_cells_run_reuses_them(tmp_path: Path) -> None:
    """A parameter at its default, or of an attack the cells do not run, was refused as "was
    run with attack.ig.restarts=None, this sweep wants 1" (audit BV1); a resume takes both."""
    sweep_dir = run_sweep(
        _write(tmp_path, GRID), out_dir=tmp_path, runner=fake_runner, say=lambda _: None
    )
    runner = Recorder()
    for overrides in ({"attack.ig.restarts": 4}, {"attack.dlg.history": 7}):
        again = run_sweep(
            _write(tmp_path, GRID),
            out_dir=tmp_path,
            runner=runner,
            say=lambda _: None,
            overrides=overrides,
        )
        assert again == sweep_dir
    assert runner.calls == []  # every cell done already: none runs again


def test_the_same_attacks_named_in_another_order_reuse_the_cells(tmp_path: Path) -> None:
    """Reordering attack.names of a finished sweep was refused as a change ("was run with
    attack.names='aux-mean,dlg', this sweep wants 'dlg,aux-mean'"), though no row would
    differ (audit CR2)."""
    grid = GRID.replace('names = "aux-mean"', 'names = "aux-mean,dlg"')
    sweep_dir = run_sweep(
        _write(tmp_path, grid), out_dir=tmp_path, runner=fake_runner, say=lambda _: None
    )
    runner = Recorder()
    again = run_sweep(
        _write(tmp_path, grid),
        out_dir=tmp_path,
        runner=runner,
        say=lambda _: None,
        overrides={"attack.names": "dlg,aux-mean"},
    )
    assert again == sweep_dir and runner.calls == []


def test_a_sweep_with_another_number_of_clients_refuses_to_reuse_cells(tmp_path: Path) -> None:
    sweep_dir = run_sweep(
        _write(tmp_path, GRID), out_dir=tmp_path, runner=fake_runner, say=lambda _: None
    )
    for cell in read_manifest(sweep_dir)["cells"]:
        RunDirectory.open(sweep_dir / cell["id"]).record_clients(2)  # as run_study does
    wider = GRID.replace("num-clients = 2", "num-clients = 3")
    runner = Recorder()
    with pytest.raises(RunDirectoryError, match=r"cell-000-B1_none.*2 clients.*3") as error:
        run_sweep(_write(tmp_path, wider, "wider.toml"), out_dir=tmp_path, runner=runner)
    assert "\n" not in str(error.value) and runner.calls == []


def test_cells_without_their_data_are_skipped_not_failed(tmp_path: Path) -> None:
    text = f"""
[sweep]
name = "optional"
skip-unavailable-data = true
[sweep.grid]
"data.dataset" = ["mnist5k", "cifar10"]
[base]
num-server-rounds = 1
[base.data]
data-dir = "{tmp_path / "empty"}"
"""
    runner = Recorder()
    sweep_dir = run_sweep(
        _write(tmp_path, text), out_dir=tmp_path, runner=runner, say=lambda _: None
    )
    cells = read_manifest(sweep_dir)["cells"]
    assert runner.calls == ["cell-000-mnist5k"]
    assert cells[1]["status"] == "skipped" and "'cifar10' unavailable" in cells[1]["message"]


def test_overrides_apply_to_every_cell_last(tmp_path: Path) -> None:
    text = GRID + '\n[[sweep.cells]]\n"attack.max-iterations" = 7\n'
    plan = load_sweep(_write(tmp_path, text), {"num-server-rounds": 1, "attack.max-iterations": 3})
    # A cell's id and record show the value it runs with, not the one --set replaced.
    assert [c.id for c in plan.cells][:2] == [
        "cell-000-max-iterations-3_B1_none",
        "cell-001-max-iterations-3_B1_prune-0.5",
    ]
    assert plan.cells[0].overrides["attack.max-iterations"] == 3
    assert plan.command_line == {"num-server-rounds": 1, "attack.max-iterations": 3}
    assert "attack.max-iterations" not in plan.varying  # the command line fixed it
    assert {(c.config.num_server_rounds, c.config.attack.max_iterations) for c in plan.cells} == {
        (1, 3)
    }
    assert plan.base.num_server_rounds == 1
    with pytest.raises(SweepError, match=r"--set train.batch-size: the sweep's grid varies"):
        load_sweep(_write(tmp_path, GRID), {"train.batch-size": 2})
    with pytest.raises(SweepError, match=r"--set: train.batchsize: unknown setting"):
        load_sweep(_write(tmp_path, GRID), {"train.batchsize": 2})


def test_a_key_written_with_underscores_is_the_same_setting(tmp_path: Path) -> None:
    """`--set train.batch_size=8` ran batch 8 in cells named and recorded B32, and a cell's
    `train.batch_size` beside the grid's `train.batch-size` was dropped (audit DO2)."""
    text = GRID + '\n[[sweep.cells]]\n"attack.max_iterations" = 7\n'
    plan = load_sweep(_write(tmp_path, text), {"attack.max_iterations": 3})
    assert plan.cells[0].id == "cell-000-max-iterations-3_B1_none"
    assert plan.cells[0].overrides["attack.max-iterations"] == 3
    assert plan.cells[0].config.attack.max_iterations == 3
    with pytest.raises(SweepError, match=r"--set train.batch-size: the sweep's grid varies"):
        load_sweep(_write(tmp_path, GRID), {"train.batch_size": 2})
    clash = GRID + '\n[[sweep.cells]]\n"train.batch_size" = 4\n'
    with pytest.raises(SweepError, match=r"train.batch-size=4 clashes with sweep.grid"):
        load_sweep(_write(tmp_path, clash))
    twice = GRID.replace(
        '"train.batch-size" = [1, 2]', '"train.batch-size" = [1]\ntrain.batch_size = [2]'
    )
    with pytest.raises(
        SweepError, match=r"sweep.grid: train.batch-size and train.batch_size name the same"
    ):
        load_sweep(_write(tmp_path, twice))


def test_cell_patterns_select_a_subset_with_unchanged_ids(tmp_path: Path) -> None:
    source = _write(tmp_path, GRID)
    plan = load_sweep(source, cells=["*-B2_*", "cell-000-*"])
    assert [c.id for c in plan.cells] == [
        "cell-000-B1_none",
        "cell-002-B2_none",
        "cell-003-B2_prune-0.5",
    ]
    runner = Recorder()
    run_sweep(source, out_dir=tmp_path, runner=runner, say=lambda _: None, cells=["cell-003-*"])
    assert runner.calls == ["cell-003-B2_prune-0.5"]
    # The cells left out stay listed, as not run yet.
    manifest = read_manifest(tmp_path / "tiny")["cells"]
    assert [(c["id"][:8], c["status"]) for c in manifest] == [
        ("cell-000", "pending"),
        ("cell-001", "pending"),
        ("cell-002", "pending"),
        ("cell-003", "done"),
    ]
    # What the report lists for them, as their runs would record it (audit CT2), the spec in
    # the canonical form config.toml holds (CW2).
    assert [(c["defense"], c["seed"], c["rounds"]) for c in manifest[:2]] == [
        ("none", 0, 2),
        ("prune:0.5", 0, 2),
    ]
    spelt = _write(tmp_path, GRID.replace('"prune:0.5"', '"sign+gauss:0.10"'), "spelt.toml")
    assert [cell.defense_label for cell in load_sweep(spelt).cells][:2] == [
        "none",
        "gauss:0.1+sign",
    ]
    run_sweep(source, out_dir=tmp_path, runner=runner, say=lambda _: None)
    assert sorted(runner.calls[1:]) == [
        "cell-000-B1_none",
        "cell-001-B1_prune-0.5",
        "cell-002-B2_none",
    ]
    # A later --cells run keeps every other cell's record (it cut sweep.json down to its own).
    seconds = {c["id"]: c["seconds"] for c in read_manifest(tmp_path / "tiny")["cells"]}
    run_sweep(source, out_dir=tmp_path, runner=runner, say=lambda _: None, cells=["cell-001-*"])
    after = read_manifest(tmp_path / "tiny")["cells"]
    assert [c["status"] for c in after] == ["done"] * 4
    assert {c["id"]: c["seconds"] for c in after} == seconds
    with pytest.raises(SweepError, match=r"--cells nope: matches none of the cell ids"):
        load_sweep(source, cells=["nope"])
    # One mistyped pattern beside a good one is named, not dropped with its cells.
    with pytest.raises(SweepError, match=r"--cells cell-01-\*: matches none of the cell ids"):
        load_sweep(source, cells=["cell-000-*", "cell-01-*"])


@pytest.mark.parametrize(
    ("aux", "start"),
    [
        (4000, "cell-000-B1_none: data.aux-size=4000 leaves none of the 4000 training images"),
        (3990, "cell-002-B2_none: train.batch-size=2: client 2 holds only 1 image (iid split"),
    ],
)
def test_data_splits_are_checked_before_any_cell_runs(tmp_path: Path, aux: int, start: str) -> None:
    """The default runner's preflight builds every cell's split for the sweep's clients
    (MNIST-5k keeps 4,000 training images; 3,990 aux images leave 8 clients 1 or 2 each)."""
    text = GRID.replace("[base.attack]", f"[base.data]\naux-size = {aux}\n[base.attack]")
    text = text.replace("num-clients = 2", "num-clients = 8")
    with pytest.raises(SweepError) as error:
        run_sweep(_write(tmp_path, text), out_dir=tmp_path, say=lambda _: None)
    message = str(error.value)
    assert message.startswith(start) and "\n" not in message, message
    assert not (tmp_path / "tiny").exists(), "nothing may start before every cell is checked"


def test_check_runs_the_preflight_and_writes_nothing(tmp_path: Path) -> None:
    # The same refusals as a sweep that starts, and nothing written.
    bad = GRID.replace("[base.attack]", "[base.data]\naux-size = 4000\n[base.attack]")
    with pytest.raises(SweepError, match=r"cell-000-B1_none: data\.aux-size=4000 leaves none"):
        check_sweep(_write(tmp_path, bad), out_dir=tmp_path / "out")
    source = _write(tmp_path, GRID)
    lines = check_sweep(source, out_dir=tmp_path / "out")
    sweep_dir = (tmp_path / "out" / "tiny").resolve()
    assert lines == [
        f"sweep tiny: 4 cells checked, 4 to run (0 finished), 2 clients each, in {sweep_dir}"
    ]
    assert not (tmp_path / "out").exists()
    run_sweep(source, out_dir=tmp_path / "out", runner=fake_runner, say=lambda _: None)
    lines = check_sweep(source, out_dir=tmp_path / "out", cells=["cell-00[01]-*"])
    assert lines[0].startswith("sweep tiny: 2 cells checked, 0 to run (2 finished)")
    with pytest.raises(
        SweepError, match=r"a run preset, not a sweep file.*`fedleak run quickstart`"
    ):
        check_sweep("quickstart")


class _Writes:
    """A stream that records each write and flush."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        self.calls.append("<flush>")


def test_a_cells_lines_reach_the_terminal_whole_in_one_write() -> None:
    # print() writes a line and its newline apart; a parallel cell's process writing between
    # the two spliced lines together ("a: b: round 1/2round 1/2"; a CI run of 4181ef8).
    stream = _Writes()
    lines = _LabelledLines(stream, "cell-1: ")  # type: ignore[arg-type]
    print("round 1/2", file=lines)
    print("two\nlines", file=lines)
    print("a part", end="", file=lines, flush=True)
    print(" and its end", file=lines)
    print("never ended", end="", file=lines)
    lines.close()
    writes = [call for call in stream.calls if call != "<flush>"]
    assert writes == [
        "cell-1: round 1/2\n",
        "cell-1: two\n",
        "cell-1: lines\n",
        "cell-1: a part and its end\n",
        "cell-1: never ended\n",
    ]
    # Each write is flushed at once, before another process can write.
    assert all(stream.calls[stream.calls.index(w) + 1] == "<flush>" for w in writes)


def epsilon_runner(config: RunConfig, path: Path) -> Path:
    """A cell whose progress line holds a character an ASCII terminal cannot encode."""
    print("ε 1.5", flush=True)
    return fake_runner(config, path)


def test_parallel_cells_print_as_safely_as_the_sweep_itself(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an ASCII stdout a DP cell's ε failed it in a worker process, while the same cell ran
    in the sweep's own process (audit BN D2)."""
    monkeypatch.setenv("PYTHONIOENCODING", "ascii")  # the pool's processes start with it
    source = _write(tmp_path, GRID.replace("num-clients = 2", "num-clients = 2\nparallel = 2"))
    sweep_dir = run_sweep(source, out_dir=tmp_path, runner=epsilon_runner, say=lambda _: None)
    cells = read_manifest(sweep_dir)["cells"]
    assert [c["status"] for c in cells] == ["done"] * 4, cells
    printed = [line for line in capfd.readouterr().out.splitlines() if "1.5" in line]
    assert sorted(printed) == sorted(f"{c['id']}: \\u03b5 1.5" for c in cells)


def stopping_runner(config: RunConfig, path: Path) -> Path:
    """A cell that says on standard error what a study says at a Ctrl-C (picklable)."""
    sys.stderr.write("\nfedleak: stopping at the next safe point\n")
    return fake_runner(config, path)


def test_parallel_cells_run_in_worker_processes_and_label_both_their_streams(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Cells of a parallel sweep run in the pool's processes and every line they print says
    whose it is, on standard output and on standard error: a Ctrl-C reaches every running cell
    and each said it stops, unlabelled (audit AL5). One sweep (its pool's start-up is most of
    the time) checks both streams; `stopping_runner` prints the rounds as `fake_runner` does."""
    source = _write(tmp_path, GRID.replace("num-clients = 2", "num-clients = 2\nparallel = 2"))
    sweep_dir = run_sweep(source, out_dir=tmp_path, runner=stopping_runner, say=lambda _: None)
    cells = read_manifest(sweep_dir)["cells"]
    assert [c["status"] for c in cells] == ["done"] * 4
    captured = capfd.readouterr()
    # Cells printing at once: every line of theirs says whose it is.
    printed = captured.out.splitlines()
    assert sorted(printed) == sorted(f"{c['id']}: round {r}/2" for c in cells for r in (1, 2)), (
        printed
    )
    environments = {
        json.loads((sweep_dir / c["id"] / "environment.json").read_text())["runner"] for c in cells
    }
    assert environments == {"fake"}
    said = [line for line in captured.err.splitlines() if line.strip()]
    assert sorted(said) == sorted(
        f"{c['id']}: fedleak: stopping at the next safe point" for c in cells
    )


def waiting_runner(config: RunConfig, path: Path) -> Path:
    """A cell that runs until Ctrl-C, then stops as a study does (module level: picklable)."""
    path.mkdir(parents=True, exist_ok=True)
    with _stop_on_first_signal():
        (path / "started").touch()  # once the handler is in place: the test signals on it
        for _ in range(1200):
            if stop_requested():
                raise StudyInterrupted(path, 0, config.num_server_rounds)
            time.sleep(0.05)
    return fake_runner(config, path)


# A sweep in a process of its own: argv = sweep file, out dir, the runner's name in this file.
INTERRUPTIBLE_SWEEP = """
import sys
from pathlib import Path
from fedleak.simulations.sweep import run_sweep
import test_sweep
runner = getattr(test_sweep, sys.argv[3])
try:
    run_sweep(Path(sys.argv[1]), out_dir=Path(sys.argv[2]), runner=runner)
except KeyboardInterrupt as error:
    print(f"interrupted: {error}", flush=True)
    sys.exit(130)
"""


def second_cell_finishes_runner(config: RunConfig, path: Path) -> Path:
    """The first cell stops at Ctrl-C; the second is in its last round and ends all the same."""
    if not path.name.startswith("cell-001"):
        return waiting_runner(config, path)
    path.mkdir(parents=True, exist_ok=True)
    with _stop_on_first_signal():
        (path / "started").touch()
        while not stop_requested():
            time.sleep(0.05)
    (path / "started").unlink()  # the marker is no file of a run directory
    return fake_runner(config, path)


def test_ctrl_c_stops_a_parallel_sweep_starts_no_queued_cell_and_records_one_that_ends(
    tmp_path: Path,
) -> None:
    """Ctrl-C while two cells run: the one that stops is interrupted, the one in its last round
    that ends all the same is recorded done, and no queued cell starts, not even in the slot
    the finished cell leaves. (One sweep for both cases: its pool's start-up is most of the
    time.)"""
    child, sweep_dir = _start_sweep(
        tmp_path,
        GRID.replace("num-clients = 2", "num-clients = 2\nparallel = 2"),
        "second_cell_finishes_runner",
    )
    try:
        _started(sweep_dir, 2)
        os.killpg(child.pid, signal.SIGINT)  # a terminal's Ctrl-C: every process of the sweep
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, out
    cells = read_manifest(sweep_dir)["cells"]
    # cell-001 removed its own marker when it finished; cell-000's is the only one left.
    started = [path.parent.name for path in sweep_dir.glob("*/started")]
    assert started == [cells[0]["id"]], "a queued cell started after Ctrl-C"
    assert [c["status"] for c in cells] == ["interrupted", "done", "interrupted", "interrupted"]
    assert cells[1]["seconds"] > 0 and (sweep_dir / cells[1]["id"] / "DONE").exists()


def _start_sweep(tmp_path: Path, grid: str, runner: str) -> tuple[subprocess.Popen[str], Path]:
    """`INTERRUPTIBLE_SWEEP` of `grid` with `runner`, in a session of its own."""
    source = str(_write(tmp_path, grid))
    child = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTIBLE_SWEEP, source, str(tmp_path), runner],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return child, tmp_path / "tiny"


def _started(sweep_dir: Path, cells: int) -> None:
    deadline = time.monotonic() + 180
    while len(list(sweep_dir.glob("*/started"))) < cells and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(list(sweep_dir.glob("*/started"))) == cells, "the first cells never ran"


@pytest.mark.parametrize("parallel", [1, 2])
def test_sigterm_to_a_sweep_stops_its_cells_as_ctrl_c_does(tmp_path: Path, parallel: int) -> None:
    """A scheduler signals the sweep's own process only; its cells must stop with it, not
    run on orphaned (in the pool's processes) or be cut anywhere (in-process)."""
    child, sweep_dir = _start_sweep(
        tmp_path,
        GRID.replace("num-clients = 2", f"num-clients = 2\nparallel = {parallel}"),
        "waiting_runner",
    )
    try:
        _started(sweep_dir, parallel)
        workers = children(child.pid)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, out
    assert out.count("stopping at the next safe point") == parallel, out  # as Ctrl-C
    assert len(list(sweep_dir.glob("*/started"))) == parallel, "a cell started after SIGTERM"
    statuses = [c["status"] for c in read_manifest(sweep_dir)["cells"]]
    assert statuses == ["interrupted"] * (4 if parallel > 1 else 1) + ["pending"] * (
        0 if parallel > 1 else 3
    )
    assert not list(sweep_dir.glob("*/DONE"))
    # The pool's processes end with the sweep (multiprocessing's resource tracker, also a
    # child, may take a moment after it).
    deadline = time.monotonic() + 20
    while not all(ended(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(ended(pid) for pid in workers), [p for p in workers if not ended(p)]


def test_a_parallel_sweeps_workers_end_when_it_is_killed(tmp_path: Path) -> None:
    """After kill -9 of the sweep, its pool's processes ran their cells to the end and stayed
    alive after; a rerun found every cell in use (audit ED2). They stop their cells as a
    second Ctrl-C does and end."""
    child, sweep_dir = _start_sweep(
        tmp_path,
        GRID.replace("num-clients = 2", "num-clients = 2\nparallel = 2"),
        "waiting_runner",
    )
    workers: list[int] = []
    try:
        _started(sweep_dir, 2)
        workers = [pid for pid in children(child.pid) if "spawn_main" in _command(pid)]
        assert len(workers) == 2, workers
        child.kill()
        child.wait(timeout=10)
        deadline = time.monotonic() + 20
        while not all(ended(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(ended(pid) for pid in workers), [p for p in workers if not ended(p)]
    finally:
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def deaf_runner(config: RunConfig, path: Path) -> Path:
    """A cell whose next safe point never comes: only a second Ctrl-C ends it."""
    path.mkdir(parents=True, exist_ok=True)
    with _stop_on_first_signal():
        (path / "started").touch()
        time.sleep(120)
    return fake_runner(config, path)


def test_a_second_ctrl_c_leaves_the_running_cell_marked_interrupted(tmp_path: Path) -> None:
    """The second Ctrl-C leaves at once, skipping every `finally`; sweep.json must still not
    say that the cell runs."""
    child, sweep_dir = _start_sweep(tmp_path, GRID, "deaf_runner")  # one cell at a time
    try:
        _started(sweep_dir, 1)
        os.killpg(child.pid, signal.SIGINT)
        time.sleep(0.5)
        assert child.poll() is None, "the first Ctrl-C only asks for a stop"
        os.killpg(child.pid, signal.SIGINT)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, out
    assert [c["status"] for c in read_manifest(sweep_dir)["cells"]] == [
        "interrupted",
        "pending",
        "pending",
        "pending",
    ]


def test_a_shipped_name_is_the_shipped_preset_whatever_the_working_directory_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sweep run with `--out .` leaves a folder of the sweep's name: rerunning the same command
    # must continue the sweep, and a stray file of a preset's name must not replace the preset.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dp-frontier").mkdir()
    (tmp_path / "quickstart").write_text('name = "not-the-preset"\n')
    assert preset_path("dp-frontier") == PRESETS_DIR / "dp-frontier.toml"
    assert is_sweep("dp-frontier")
    assert load_preset("quickstart").name == "quickstart"
    assert load_preset("./quickstart").name == "not-the-preset"
    (tmp_path / "mine").write_text('name = "mine"\n')
    assert load_preset("mine").name == "mine"


def test_presets_are_listed_loaded_and_valid() -> None:
    listed = list_presets()
    assert {"lti-table", "defense-tradeoff", "leakage-over-rounds", "dp-frontier"} <= set(listed)
    assert all(listed.values()), "every preset needs a '# description:' line"
    assert is_sweep("lti-table") and is_sweep("defense-tradeoff")
    assert not is_sweep("leakage-over-rounds")
    assert load_preset("leakage-over-rounds").num_server_rounds > 10
    assert load_preset(PRESETS_DIR / "leakage-over-rounds.toml").name == "leakage-over-rounds"
    lti = load_sweep("lti-table")
    # B=1 is the per-sample threat model over batches of 16; B=4 shares batch gradients.
    columns = {(c.config.threat.share, c.config.train.batch_size) for c in lti.cells}
    assert columns == {("per-sample", 16), ("batch", 4)}
    assert {c.config.defense.spec for c in lti.cells} == {
        "none",
        "sign",
        "prune:0.99:global",
        "gauss:0.1",
    }
    assert all(c.config.model.name == "lenet" for c in lti.cells)
    assert {c.config.data.dataset for c in lti.cells} == {"mnist5k", "fashion-mnist", "cifar10"}
    tradeoff = load_sweep("defense-tradeoff")
    columns = {(c.config.threat.share, c.config.train.batch_size) for c in tradeoff.cells}
    assert columns == {("per-sample", 32), ("batch", 16), ("batch", 32)}
    assert "instahide:4+prune:0.9" in {c.config.defense.spec for c in tradeoff.cells}
    # Cell ids are run names; the long ones keep their defense.
    ids = {c.id for c in (*lti.cells, *tradeoff.cells)}
    assert "cell-032-batch_B32_c2_instahide-4+prune-0.9" in ids
    assert "cell-015-fashion-mnist_batch_B4_c16_preset-cpu-batch_gauss-0.1" in ids
    dp = load_sweep("dp-frontier")
    assert sum(c.config.defense.spec.startswith("dpsgd") for c in dp.cells) == 4
    assert [c.id for c in dp.cells if c.config.defense.dp_sampling == "poisson"] == [
        "cell-007-dpsgd-1.0-1.1_dp-sampling-poisson"
    ]
    assert {c.config.defense.central_noise for c in dp.cells} == {0.0, 0.3, 1.0}
    sweep_hint = r"is a sweep; check it with `fedleak sweep lti-table --check`, run it"
    with pytest.raises(ConfigError, match=sweep_hint):
        load_preset("lti-table")
    with pytest.raises(ConfigError, match=r"preset 'nope': unknown; expected one of "):
        load_preset("nope")


REAL = """
[sweep]
name = "real"
num-clients = 1

# Two cells, each a real simulation (Ray starts for each): one finished before the
# interruption and kept, one run by the resumed sweep. A seed axis (2 x 2) only ran the same
# path twice more.
[sweep.grid]
"defense.spec" = ["none", "gauss:0.01"]

[base]
num-server-rounds = 1
[base.data]
aux-size = 40
[base.attack]
names = "aux-mean"
clients-per-round = 1
images-per-client = 1
"""


@pytest.mark.slow
def test_real_sweep_end_to_end_with_an_interruption(tmp_path: Path) -> None:
    """2 cells through the real Flower simulation; stopped after one cell, then resumed (the
    resumed sweep runs the other cell in the same process, after the first cell's engine)."""
    from fedleak.report.build import build_report
    from fedleak.simulations.sweep import _study_runner

    source = _write(tmp_path, REAL)
    calls: list[str] = []

    def first_cell_only(config: RunConfig, path: Path) -> Path:
        calls.append(path.name)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return _study_runner(config, path, num_clients=1, client_cpus=1.0, client_gpus=0.0)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(source, out_dir=tmp_path, runner=first_cell_only, say=lambda _: None)
    sweep_dir = tmp_path / "real"
    first = sweep_dir / calls[0]
    assert RunDirectory.open(first).is_finished()
    stamp = (first / "utility.csv").stat().st_mtime_ns

    run_sweep(source, out_dir=tmp_path, say=lambda _: None)  # the default runner: run_study
    cells = read_manifest(sweep_dir)["cells"]
    assert [c["status"] for c in cells] == ["done"] * 2
    assert calls[1] != calls[0] and (sweep_dir / calls[1]).is_dir()  # run by the resumed sweep
    assert (first / "utility.csv").stat().st_mtime_ns == stamp, "the finished cell was redone"
    for cell in cells:
        run = RunDirectory.open(sweep_dir / cell["id"])
        leakage = run.leakage()
        assert run.finished_rounds() == 1 and set(leakage["attack"]) == {"aux-mean"}
        assert set(leakage["defense"]) == {run.config.defense.label}
    html, _ = build_report(sweep_dir)
    assert "gauss:0.01" in html.read_text()


RESUMABLE = """
[sweep]
name = "resumable"
num-clients = 2

[sweep.grid]
"defense.spec" = ["gauss:0.01"]

[base]
num-server-rounds = 2
[base.data]
aux-size = 40
[base.attack]
names = "ig"
max-iterations = 5
images-per-client = 1
[base.metrics]
lpips-nets = "none"
"""


@pytest.mark.slow
def test_an_interrupted_cell_goes_on_from_its_finished_rounds_bit_for_bit(tmp_path: Path) -> None:
    """Stopped after round 1 of 2, the cell's rerun records round 2 only, and every row and the
    final model equal an uninterrupted sweep's."""
    import threading

    import pandas as pd
    import torch

    from fedleak.interrupt import clear_stop, request_stop
    from fedleak.simulations.sweep import _study_runner

    source = _write(tmp_path, RESUMABLE)
    said: list[str] = []

    def stopped_after_round_1(config: RunConfig, path: Path) -> Path:
        def watch() -> None:
            while not (path / "utility.csv").exists() or 1 not in _rounds_of(path):
                time.sleep(0.05)
            request_stop()

        threading.Thread(target=watch, daemon=True).start()
        return _study_runner(config, path, num_clients=2, client_cpus=1.0, client_gpus=0.0)

    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(source, out_dir=tmp_path / "a", runner=stopped_after_round_1, say=said.append)
    finally:
        clear_stop()
    (cell,) = (tmp_path / "a" / "resumable").glob("cell-*")
    assert _rounds_of(cell) == [0, 1]
    kept = pd.read_parquet(cell / "leakage.parquet")

    run_sweep(source, out_dir=tmp_path / "a", say=said.append)
    assert f"  {cell.name}: resuming after round 1" in said
    run_sweep(source, out_dir=tmp_path / "b", say=lambda _: None)
    (whole,) = (tmp_path / "b" / "resumable").glob("cell-*")

    timing = ["seconds"]
    on_disk = pd.read_parquet(cell / "leakage.parquet")
    # Round 1 was not done again: its rows keep even the timings they were recorded with.
    assert on_disk[on_disk["round"] == 1]["seconds"].tolist() == kept["seconds"].tolist()
    resumed = on_disk.drop(columns=timing)
    straight = pd.read_parquet(whole / "leakage.parquet").drop(columns=timing)
    assert sorted(resumed["round"].unique()) == [1, 2]
    pd.testing.assert_frame_equal(resumed, straight)
    pd.testing.assert_frame_equal(
        resumed[resumed["round"] == 1].reset_index(drop=True),
        kept.drop(columns=timing).reset_index(drop=True),
    )
    ours = torch.load(cell / "checkpoints" / "global.pt", weights_only=True)
    theirs = torch.load(whole / "checkpoints" / "global.pt", weights_only=True)
    assert ours["round"] == theirs["round"] == 2
    for name, tensor in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], tensor), name


def _rounds_of(path: Path) -> list[int]:
    import pandas as pd

    try:
        return sorted(pd.read_csv(path / "utility.csv")["round"].tolist())
    except (FileNotFoundError, pd.errors.EmptyDataError, KeyError):
        return []


def _lti_grid(folders: list[Path]) -> str:
    """One cell per defense, each keeping LTI's inverters in its folder of `folders`."""
    cells = "".join(
        f'[[sweep.cells]]\n"defense.spec" = "{d}"\n"attack.lti.cache-dir" = "{f}"\n'
        for d, f in zip(("none", "sign"), folders, strict=True)
    )
    return f"""
[sweep]
name = "cached"
num-clients = 2
{cells}
[base]
num-server-rounds = 2
[base.attack]
names = "aux-mean,lti"
"""


def saving_runner(config: RunConfig, path: Path) -> Path:
    """`fake_runner`, and an inverter saved in the cell's LTI cache as a run saves it."""
    folder = Path(config.attack.params["lti"]["cache-dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lti-inverter-r000002.pt").write_bytes(b"saved")
    return fake_runner(config, path)


def failing_saver(config: RunConfig, path: Path) -> Path:
    """Saves its inverter after its first round, then fails."""
    folder = Path(config.attack.params["lti"]["cache-dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lti-inverter-r000001.pt").write_bytes(b"saved")
    run = RunDirectory.create(path, config, {})
    run.append_round(1, [], {"test_loss": 1.0, "test_accuracy": 0.1, "num_replies": 2})
    raise RuntimeError("client crashed")


def test_a_sweep_with_cache_dirs_runs_again_and_starts_a_failed_cell_over_clean(
    tmp_path: Path,
) -> None:
    """A cell's cache held its own inverters: a rerun of the finished sweep was refused ("holds
    inverters another run saved"), and a failed cell could never start over (audit AS1)."""
    source = _write(tmp_path, _lti_grid([tmp_path / "cache" / d for d in ("none", "sign")]))
    quiet = {"out_dir": tmp_path, "say": lambda _: None}
    with pytest.raises(SweepFailed):
        run_sweep(source, runner=failing_saver, **quiet)
    saved = [tmp_path / "cache" / cell / "lti-inverter-r000001.pt" for cell in ("none", "sign")]
    assert all(path.exists() for path in saved)
    recorder = Recorder()
    run_sweep(source, runner=recorder, **quiet)  # both cells failed: both start over
    assert len(recorder.calls) == 2 and not any(path.exists() for path in saved)
    run_sweep(source, runner=saving_runner, **quiet)
    run_sweep(source, runner=recorder, **quiet)  # finished: nothing to run, nothing refused
    assert len(recorder.calls) == 2
    check_sweep(source, out_dir=tmp_path)  # each cell checked as `fedleak run` would


def test_cells_sharing_a_cache_dir_are_refused_before_any_runs(tmp_path: Path) -> None:
    """One folder for two cells' inverters: the second cell started from the first's files,
    or failed after the first had run (audit AS2)."""
    source = _write(tmp_path, _lti_grid([tmp_path / "shared"] * 2))
    recorder = Recorder()
    shared = r"^cell-001-sign\S*: attack\.lti\.cache-dir=.* is cell-000"
    with pytest.raises(SweepError, match=shared):
        run_sweep(source, out_dir=tmp_path, runner=recorder, say=lambda _: None)
    assert recorder.calls == []


def test_a_cell_whose_folder_is_absent_is_skipped_not_refused_by_the_model_checks(
    tmp_path: Path,
) -> None:
    """With skip-unavailable-data, the model checks (which need the data's shape) loaded an
    absent `folder:` set and refused the whole sweep instead of skipping the cell."""
    text = f"""
[sweep]
name = "skipfold"
num-clients = 2
skip-unavailable-data = true
[sweep.grid]
"data.dataset" = ["mnist5k", "folder:{tmp_path / "absent"}"]
[base]
num-server-rounds = 1
"""
    lines = check_sweep(_write(tmp_path, text), out_dir=tmp_path)
    assert any("would skip 1 cell (" in line for line in lines)


def test_cells_a_set_makes_equal_are_refused_naming_the_set(tmp_path: Path) -> None:
    """Cell 1 is `sign` in the file; the message named the --set value as if the file had
    listed it twice (audit BK4)."""
    cell = '[[sweep.cells]]\n"defense.spec" = "{}"\n'
    text = "[sweep]\n" + cell.format("none") + cell.format("sign")
    runner = Recorder()
    with pytest.raises(ConfigError) as error:
        run_sweep(
            _write(tmp_path, text),
            out_dir=tmp_path / "out",
            runner=runner,
            overrides={"defense.spec": "prune:0.5"},
        )
    assert str(error.value).endswith(
        "cell 1 (defense.spec='prune:0.5'): same configuration as cell 0 once --set gives "
        "defense.spec to every cell; drop that --set"
    )
    assert runner.calls == []
    # A file that lists one cell twice is the file's doing, --set or not (audit BP1).
    with pytest.raises(ConfigError, match=r"same configuration as cell 0; remove one$"):
        run_sweep(
            _write(tmp_path, "[sweep]\n" + cell.format("sign") + cell.format("sign")),
            out_dir=tmp_path / "out",
            runner=runner,
            overrides={"defense.spec": "prune:0.5"},
        )


def test_a_cell_an_older_fedleak_left_unfinished_is_started_over_with_a_line(
    tmp_path: Path,
) -> None:
    """Its rounds went without a word, where `fedleak run` refuses such a folder in one line
    (audit BN D3)."""
    source = _write(tmp_path, GRID)
    sweep_dir = run_sweep(source, out_dir=tmp_path, runner=fake_runner, say=lambda _: None)
    cell = sweep_dir / read_manifest(sweep_dir)["cells"][0]["id"]
    (cell / "DONE").unlink()
    (cell / "checkpoints").mkdir(exist_ok=True)
    (cell / "checkpoints" / "global.pt").write_bytes(b"an older fedleak's")
    environment = json.loads((cell / "environment.json").read_text())
    del environment["run_format"]
    (cell / "environment.json").write_text(json.dumps(environment))
    said: list[str] = []
    run_sweep(source, out_dir=tmp_path, runner=fake_runner, say=said.append)
    assert (
        f"  {cell.name}: starting over, its rounds cannot be continued (was made by an older "
        "fedleak (its environment.json records no run format))" in said
    )
    assert (cell / "DONE").exists()


def test_a_cell_a_newer_fedleak_made_is_refused_and_kept(tmp_path: Path) -> None:
    """A folder of a newer run format was taken for an older one's: the sweep cleared the
    cell's rounds and started it over, and its report read it without a word (audit EM2)."""
    from fedleak.report.build import rebuild_reports

    source = _write(tmp_path, GRID)
    sweep_dir = run_sweep(source, out_dir=tmp_path, runner=fake_runner, say=lambda _: None)
    cell = sweep_dir / read_manifest(sweep_dir)["cells"][0]["id"]
    (cell / "DONE").unlink()
    environment = json.loads((cell / "environment.json").read_text())
    environment["run_format"] += 1
    (cell / "environment.json").write_text(json.dumps(environment))
    rounds = (cell / "utility.csv").read_text()
    newer = rf"{cell}: was made by a newer fedleak \(run format 2; this one knows formats up to 1\)"
    runner = Recorder()
    with pytest.raises(RunDirectoryError, match=rf"^{newer}; report or continue it with that"):
        run_sweep(source, out_dir=tmp_path, runner=runner, say=lambda _: None)
    assert runner.calls == [] and (cell / "utility.csv").read_text() == rounds
    with pytest.raises(RunDirectoryError, match=newer):
        rebuild_reports(sweep_dir)
    with pytest.raises(RunDirectoryError, match=newer):
        RunDirectory.open(cell).check_format()  # a resume of the run


def test_a_run_recorded_with_a_parameter_now_refused_is_one_line(tmp_path: Path) -> None:
    """An earlier fedleak accepted `finetune-epochs = 0`: the resume compared that raw with
    every resolved LTI parameter and listed 19 differences that do not exist (audit EM1)."""
    from fedleak.simulations.study import check_resumable

    source = _write(tmp_path, GRID.replace('names = "aux-mean"', 'names = "aux-mean,lti"'))
    sweep_dir = run_sweep(source, out_dir=tmp_path, runner=fake_runner, say=lambda _: None)
    cell = sweep_dir / read_manifest(sweep_dir)["cells"][0]["id"]
    resumed = RunDirectory.open(cell).config  # as the user resumes it: LTI at its defaults
    resumed = dataclasses.replace(resumed, sim=dataclasses.replace(resumed.sim, resume=True))
    with (cell / "config.toml").open("a") as config:
        config.write("\n[attack.lti]\nfinetune-epochs = 0\n")
    refused = (
        r"the run was made with settings this fedleak refuses \(attack\.lti\.finetune-epochs=0: "
        r"expected an integer >= 1"
    )
    with pytest.raises(RunDirectoryError, match=rf"^{cell}: {refused}.*\); it cannot be continued"):
        check_resumable(resumed, cell)
    with pytest.raises(RunDirectoryError, match=refused):
        run_sweep(source, out_dir=tmp_path, runner=fake_runner, say=lambda _: None)


def test_a_cell_whose_checkpoint_was_removed_says_why_it_starts_over(tmp_path: Path) -> None:
    """Its recorded rounds went without a word, where `fedleak run` refuses such a folder in
    one line (audit DZ3)."""
    source = _write(tmp_path, GRID)
    sweep_dir = run_sweep(source, out_dir=tmp_path, runner=fake_runner, say=lambda _: None)
    cell = sweep_dir / read_manifest(sweep_dir)["cells"][0]["id"]
    (cell / "DONE").unlink()
    (cell / "checkpoints" / "global.pt").unlink(missing_ok=True)
    said: list[str] = []
    run_sweep(source, out_dir=tmp_path, runner=fake_runner, say=said.append)
    lines = [line for line in said if line.startswith(f"  {cell.name}: starting over")]
    assert len(lines) == 1 and "global.pt: missing, though utility.csv records rounds" in lines[0]
    assert (cell / "DONE").exists()


def test_a_failed_cells_line_keeps_its_remedy(tmp_path: Path) -> None:
    """A cell's failure was cut at 300 characters, losing "resume with sim.resume=true" from a
    client crash's message, in the cell's line and in sweep.json (audit CF4)."""
    from fedleak.config import parse_flat
    from fedleak.simulations.launch import StudyFailed
    from fedleak.simulations.sweep import _run_cell

    def crashed(config: RunConfig, path: Path) -> None:
        raise StudyFailed(f"run failed: round 2: a client failed ({'why ' * 80}); resume with it")

    status, message, _ = _run_cell(crashed, parse_flat({}), tmp_path / "cell")
    assert status == "failed" and message.endswith("; resume with it")


def test_skipped_cells_are_counted_in_words_that_fit_their_number() -> None:
    """One skipped cell read "skipped 1 cells (cell-016 .. cell-016)" (audit CI4)."""
    states = {
        "cell-001": ("skipped", "no CIFAR-10 files"),
        "cell-002": ("pending", ""),
        "cell-003": ("skipped", "no GPU"),
        "cell-004": ("skipped", "no GPU"),
    }
    assert _skipped_lines(states) == [
        "1 cell (cell-001): no CIFAR-10 files",
        "2 cells (cell-003, cell-004): no GPU",
    ]
    # Cells skipped apart are not a range: "cell-000 .. cell-003" read as all four (CO6).
    apart = {f"cell-00{i}": ("skipped" if i % 2 else "done", "no GPU") for i in range(8)}
    assert _skipped_lines(apart) == ["4 cells (cell-001, cell-003, ..., cell-007): no GPU"]
