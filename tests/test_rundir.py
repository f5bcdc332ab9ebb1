"""The run directory: per-round records flushed at once, redo replaces, fixed dtypes, images."""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fedleak.config import RunConfig, parse_flat
from fedleak.report.rundir import (
    LEAKAGE_COLUMNS,
    UTILITY_COLUMNS,
    Accounting,
    RunDirectory,
    RunDirectoryError,
    console_line,
    read_leakage_parquet,
)
from fedleak.simulations.launch import check_out_dir


def _config() -> RunConfig:
    return parse_flat(
        {
            "name": "unit",
            "seed": 7,
            "num-server-rounds": 3,
            "defense.spec": "prune:0.9",
            "train.batch-size": 2,
            "attack.names": "aux-mean,ig",
            "attack.ig.restarts": 2,
        }
    )


def _rows(server_round: int, psnr: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for client in (0, 1):
        for sample in (0, 1):
            rows.append(
                {
                    "round": server_round,
                    "client_id": client,
                    "attack": "ig",
                    "sample": sample,
                    "target_index": 1 - sample,
                    "mse": 10 ** (-psnr / 10),
                    "psnr": psnr + sample,
                    "ssim": 0.5,
                    "lpips_alex": 0.2,
                    "label_acc": 1.0,
                    "true_label": 3,
                    "pred_label": 3,
                    "seconds": 1.5,
                    "iterations": 100,
                }
            )
    rows.append(
        {
            "round": server_round,
            "client_id": 0,
            "attack": "aux-mean",
            "status": "failed",
            "message": "ValueError: boom",
        }
    )
    return rows


def _utility(acc: float) -> dict[str, object]:
    return {
        "test_loss": 2.0 - acc,
        "test_accuracy": acc,
        "num_replies": 2,
        "num_failures": 0,
        "round_seconds": 3.0,
        "attack_seconds": 2.5,
    }


@pytest.fixture
def run(tmp_path: Path) -> RunDirectory:
    return RunDirectory.create(tmp_path / "run", _config(), {"torch": torch.__version__})


def test_create_writes_config_and_environment(run: RunDirectory) -> None:
    reopened = RunDirectory.open(run.path)
    assert reopened.config == _config()
    assert reopened.environment()["torch"] == torch.__version__
    assert "created" in reopened.environment()


def test_the_federation_size_is_recorded_once_and_then_enforced(run: RunDirectory) -> None:
    run.check_clients(4)  # nothing recorded yet: any size
    run.record_clients(3)
    assert RunDirectory.open(run.path).environment()["num_clients"] == 3
    run.record_clients(3)
    with pytest.raises(RunDirectoryError, match="was run with 3 clients, not 4"):
        run.check_clients(4)


def test_a_resume_must_give_its_clients_the_threads_they_had(run: RunDirectory) -> None:
    run.record_clients(3)  # `flwr run`: the threads are not pinned, so not recorded
    run.check_clients(3, 2)
    run.record_clients(3, 1)
    assert RunDirectory.open(run.path).environment()["client_threads"] == 1
    run.check_clients(3, None)  # a caller that does not pin them is not refused
    with pytest.raises(RunDirectoryError, match=r"on 1 thread\(s\) each.*--client-cpus 1"):
        run.check_clients(3, 2)
    resumed = parse_flat({**run.config.to_flat(), "out-dir": str(run.path), "sim.resume": True})
    check_out_dir(resumed, 3, client_cpus=1.5)  # one whole CPU: one thread, as before
    with pytest.raises(RunDirectoryError, match="--client-cpus 1 "):
        check_out_dir(resumed, 3, client_cpus=2.0)  # refused before Ray would start


def test_empty_frames_have_fixed_dtypes(run: RunDirectory) -> None:
    leakage, utility = run.leakage(), run.utility()
    assert list(leakage.columns) == list(LEAKAGE_COLUMNS) and leakage.empty
    assert list(utility.columns) == list(UTILITY_COLUMNS) and utility.empty
    assert leakage["psnr"].dtype == np.float64 and leakage["round"].dtype == np.int64
    assert pd.api.types.is_string_dtype(leakage["attack"])
    assert run.finished_rounds() == 0


def test_append_flushes_each_round_and_fills_defaults(run: RunDirectory) -> None:
    run.append_round(1, _rows(1, 20.0), _utility(0.3))
    # A fresh reader (as after a crash) sees the round without any close/flush call.
    fresh = RunDirectory.open(run.path)
    leakage = fresh.leakage()
    assert len(leakage) == 5 and fresh.finished_rounds() == 1
    assert set(leakage["defense"]) == {"prune:0.9"} and set(leakage["batch_size"]) == {2}
    assert set(leakage["seed"]) == {7} and set(leakage["mode"]) == {"fedsgd"}
    failed = leakage[leakage["attack"] == "aux-mean"].iloc[0]
    assert failed["status"] == "failed" and math.isnan(failed["psnr"]) and failed["sample"] == -1
    for column, dtype in LEAKAGE_COLUMNS.items():
        assert str(leakage[column].dtype) == dtype or (
            dtype == "str" and pd.api.types.is_string_dtype(leakage[column])
        ), column
    csv = pd.read_csv(run.path / "leakage.csv")
    assert len(csv) == 5 and np.allclose(csv["psnr"].dropna(), leakage["psnr"].dropna())
    assert not list(run.path.glob(".*.tmp")), "temporary files left behind"


def test_redoing_a_round_replaces_its_rows(run: RunDirectory) -> None:
    run.append_round(1, _rows(1, 20.0), _utility(0.3))
    run.append_round(2, _rows(2, 22.0), _utility(0.4))
    run.append_round(2, _rows(2, 30.0)[:2], _utility(0.5))
    fresh = RunDirectory.open(run.path)
    leakage, utility = fresh.leakage(), fresh.utility()
    assert len(leakage[leakage["round"] == 1]) == 5
    redone = leakage[leakage["round"] == 2]
    assert len(redone) == 2 and set(redone["psnr"]) == {30.0, 31.0}
    assert list(utility["round"]) == [1, 2] and utility["test_accuracy"].tolist() == [0.3, 0.5]
    assert fresh.finished_rounds() == 2 and not fresh.is_finished()


def test_bad_rows_are_refused_before_writing(run: RunDirectory) -> None:
    with pytest.raises(RunDirectoryError, match="unknown column"):
        run.append_round(1, [{"client_id": 0, "attack": "ig", "psnnr": 3.0}], _utility(0.1))
    with pytest.raises(RunDirectoryError, match="status='weird'"):
        run.append_round(1, [{"client_id": 0, "attack": "ig", "status": "weird"}], _utility(0.1))
    with pytest.raises(RunDirectoryError, match="expected round 1"):
        run.append_round(1, _rows(2, 20.0), _utility(0.1))
    assert not (run.path / "utility.csv").exists() and not (run.path / "leakage.parquet").exists()


def test_create_refuses_a_folder_with_records(run: RunDirectory) -> None:
    run.append_round(1, _rows(1, 20.0), _utility(0.3))
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        RunDirectory.create(run.path, _config(), {})
    with pytest.raises(RunDirectoryError, match="not a run directory"):
        RunDirectory.open(run.path / "nowhere")


def test_checkpoint_round_trip_loads_tensors_only(run: RunDirectory) -> None:
    assert run.load_global_model() is None
    weights = {"conv.weight": torch.randn(4, 3, 5, 5), "fc.bias": torch.randn(10)}
    for server_round in (1, 2):
        run.append_round(server_round, _rows(server_round, 20.0), _utility(0.3))
    run.save_global_model(2, weights)
    server_round, loaded = RunDirectory.open(run.path).load_global_model()
    assert server_round == 2 and list(loaded) == list(weights)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    torch.load(run.path / "checkpoints" / "global.pt", weights_only=True)
    assert run.load_accounting() is None  # a checkpoint without one: the resume bounds ε


def test_the_checkpoint_carries_the_privacy_accounting(run: RunDirectory) -> None:
    run.append_round(1, _rows(1, 20.0), _utility(0.3))
    accounting = Accounting({0: 1, 2: 1, 3: 0}, {2: 1})
    run.save_global_model(1, {"w": torch.zeros(2)}, accounting)
    assert RunDirectory.open(run.path).load_accounting() == accounting
    checkpoint = run.path / "checkpoints" / "global.pt"
    torch.save(
        {"round": 1, "state_dict": {}, "participation": {0: -1}, "central_releases": {}}, checkpoint
    )
    with pytest.raises(RunDirectoryError, match="privacy accounting is not counts per client"):
        run.load_accounting()


def test_a_legacy_pickle_checkpoint_is_refused_without_torchs_warnings(
    run: RunDirectory,
) -> None:
    """torch warns on a pre-zip pickle before refusing it: two lines on stderr beside the
    one-line error (seen from the command line)."""
    checkpoint = run.path / "checkpoints" / "global.pt"
    checkpoint.parent.mkdir(exist_ok=True)
    checkpoint.write_bytes(pickle.dumps({"round": 1, "state_dict": {}}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RunDirectoryError, match=r"global\.pt: unreadable"):
            run.load_global_model()
    assert [str(w.message) for w in caught] == []


def test_summary_lists_each_round_with_means(run: RunDirectory) -> None:
    run.append_round(1, _rows(1, 20.0), _utility(0.3))
    run.append_round(2, _rows(2, 24.0), _utility(0.45))
    text = RunDirectory.open(run.path).write_summary().read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert "ig PSNR" in lines[0] and "attack failures" in lines[0]
    # ig's median PSNR per round: samples score psnr and psnr+1 -> median psnr + 0.5.
    assert lines[1].startswith("| 1 | 0.300 | 1.700 | ") and "20.500" in lines[1]
    assert "24.500" in lines[2] and lines[2].rstrip().endswith("| 0 | 1 |")
    assert "2 of 3 rounds finished" in text
    assert "fedsgd, batch size 2, defense `prune:0.9`" in text  # the settings, as rows say


def test_summary_says_what_an_audited_apps_clients_declared(run: RunDirectory) -> None:
    """An audited app's clients declare their own mode and batch size, whatever fedleak's
    settings say (here fedsgd, batch size 2): the summary reports what the rows record."""
    declared = [{**row, "mode": "fedavg", "batch_size": 4} for row in _rows(1, 20.0)]
    run.append_round(1, declared, _utility(0.3))
    text = RunDirectory.open(run.path).write_summary().read_text()
    assert "fedavg, batch size 4, defense" in text


def test_images_put_truth_above_reconstruction(run: RunDirectory) -> None:
    truth = torch.zeros(3, 1, 6, 6)
    recon = torch.full((3, 1, 6, 6), 2.0)  # clamped to 1
    path = run.save_images(4, 1, "ig", truth, recon)
    assert path.name == "r004_c001_ig.png"
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (2 + 2 * 8, 2 + 3 * 8, 3)
    assert (pixels[2:8, 2:8] == 0).all() and (pixels[10:16, 2:8] == 255).all()
    with pytest.raises(RunDirectoryError, match="shapes"):
        run.save_images(4, 1, "ig", truth, recon[:2])
    assert run.images() == [path]


def test_state_dir_and_console_line(run: RunDirectory) -> None:
    folder = run.state_dir("lti")
    assert folder.is_dir() and folder.parent.name == "state"
    line = console_line(3, _utility(0.42), _rows(3, 20.0))
    assert line.startswith("round 3 | acc 0.420")
    assert "ig PSNR 20.5 LPIPS 0.200" in line and "aux-mean - (1 failed)" in line
    # A run that diverged is told apart from one that failed, once per client.
    diverged = [
        {"round": 3, "client_id": 2, "attack": "ig", "sample": i, "status": "nan"} for i in (0, 1)
    ]
    line = console_line(3, _utility(0.42), _rows(3, 20.0) + diverged)
    assert "ig PSNR 20.5 LPIPS 0.200 (1 diverged)" in line


def test_text_rows_leave_the_label_columns_empty(run: RunDirectory) -> None:
    text = {"round": 1, "client_id": 0, "attack": "tag", "sample": 0, "modality": "tokens"}
    run.append_round(1, [*_rows(1, 20.0), {**text, "token_acc": 0.5}], _utility(0.3))
    for leakage in (run.leakage(), read_leakage_parquet(run.path / "leakage.parquet")):
        tokens = leakage[leakage["modality"] == "tokens"]
        assert tokens[["true_label", "pred_label"]].isna().all().all() and len(tokens) == 1
        # Image rows keep their labels, and -1 where none is known (a failed attack).
        images = leakage[leakage["modality"] == "image"]
        assert images.groupby("status")["true_label"].agg(set).to_dict() == {
            "ok": {3},
            "failed": {-1},
        }
    assert pq.read_schema(run.path / "leakage.parquet").field("true_label").type == pa.int64()
    csv = pd.read_csv(run.path / "leakage.csv")
    assert csv.loc[csv["modality"] == "tokens", "pred_label"].isna().all()


def test_text_rows_of_older_runs_read_with_empty_labels(tmp_path: Path) -> None:
    # Runs written before the labels were nullable hold -1 on text rows.
    old = tmp_path / "leakage.parquet"
    rows = [{"attack": "tag", "modality": "tokens"}, {"attack": "ig", "modality": "image"}]
    pd.DataFrame([{**r, "true_label": -1, "pred_label": -1} for r in rows]).to_parquet(old)
    leakage = read_leakage_parquet(old)
    assert leakage["true_label"].isna().tolist() == [True, False]
    assert leakage["pred_label"].tolist()[1] == -1


def test_leakage_written_before_the_diagnostics_column_still_reads(tmp_path: Path) -> None:
    old = tmp_path / "leakage.parquet"
    added = ("diagnostics", "loss_start", "loss_final", "converged")
    columns = [c for c in LEAKAGE_COLUMNS if c not in added]
    row = {
        c: (
            1
            if LEAKAGE_COLUMNS[c].lower() == "int64"
            else "x"
            if LEAKAGE_COLUMNS[c] == "str"
            else 0.5
        )
        for c in columns
    }
    pd.DataFrame([row]).to_parquet(old)
    leakage = read_leakage_parquet(old)
    assert list(leakage.columns) == list(LEAKAGE_COLUMNS)
    assert leakage["diagnostics"].tolist() == [""] and leakage["psnr"].tolist() == [0.5]
    assert leakage[["loss_start", "loss_final", "converged"]].isna().all().all()


def test_leakage_csv_appended_round_by_round_equals_one_written_whole(tmp_path: Path) -> None:
    """Each round rewrote all of leakage.csv, seconds a round at 10^5 rows and growing with
    every round (audit AM2). It is now appended; the bytes must be those a whole write gives,
    across a reopened run, a torn last line left by a crash, and a redone round."""

    def whole(run: RunDirectory) -> bytes:
        return pd.read_parquet(run.path / "leakage.parquet").to_csv(index=False).encode()

    text = {"client_id": 1, "attack": "tag", "sample": 0, "modality": "tokens"}
    run = RunDirectory.create(tmp_path / "run", _config(), {"torch": torch.__version__})
    for server_round in (1, 2):
        rows = [*_rows(server_round, 20.0 + 1 / 3), {**text, "token_acc": 1 / 7}]
        run.append_round(server_round, rows, _utility(0.3))
        assert (run.path / "leakage.csv").read_bytes() == whole(run)
    with (run.path / "leakage.csv").open("ab") as torn:
        torn.write(b"3,0,ig,0.12")  # a crash in the middle of round 3's append
    run = RunDirectory.open(run.path)
    files = []
    for server_round in (3, 4, 4, 5):
        run.append_round(server_round, _rows(server_round, 21.0 + server_round / 9), _utility(0.4))
        assert (run.path / "leakage.csv").read_bytes() == whole(run)
        files.append((run.path / "leakage.csv").stat().st_ino)
    # Written whole once in this process (round 3) and again for the redone round 4 only.
    assert files[0] == files[1] != files[2] == files[3]
    assert sorted(set(pd.read_csv(run.path / "leakage.csv")["round"])) == [1, 2, 3, 4, 5]


def test_a_run_folder_under_a_file_is_refused_for_the_file(tmp_path: Path) -> None:
    """The nearest existing parent a file: the refusal said it was 'not writable' (AL2)."""
    (tmp_path / "file").write_text("x")
    refused = r"file/run: cannot be created \(.*/file is a file\)"
    with pytest.raises(RunDirectoryError, match=refused):
        RunDirectory.check_target(tmp_path / "file" / "run")


def test_docs_describe_every_column_a_run_folder_records() -> None:
    """Columns were described only in code comments (audit BS3): a new one must reach the
    page users read."""
    import re

    from fedleak.report.rundir import LEAKAGE_COLUMNS, UTILITY_COLUMNS

    page = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
    described = set()
    for row in re.findall(r"^\| (`[^|]+) \|", page, flags=re.MULTILINE):
        described |= set(re.findall(r"`([^`]+)`", row))
    assert set(LEAKAGE_COLUMNS) - described == set()
    assert set(UTILITY_COLUMNS) - described == set()


@pytest.mark.parametrize("folder", ["images", "checkpoints", "state/lti", "texts"])
def test_a_linked_folder_is_refused_before_anything_is_deleted_or_written(
    tmp_path: Path, folder: str
) -> None:
    """Starting a failed sweep cell again deleted the user's r*_c*_*.png files through a
    linked images/, and a resume overwrote a linked checkpoints/global.pt (audit CN1, CN2)."""
    from fedleak.report.rundir import ForeignFileError

    run = RunDirectory.create(tmp_path / "run", parse_flat({"num-server-rounds": 1}), {})
    run.append_round(1, [], {"test_loss": 1.0, "test_accuracy": 0.5})
    victim = tmp_path / "victim"
    victim.mkdir()
    kept = {
        "r001_c000_ig.png": b"precious",
        "global.pt": b"another run's state",
        "lti-inverter-r000001.pt": b"an inverter",
    }
    for name, data in kept.items():
        (victim / name).write_bytes(data)
    link = run.path / folder
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim, target_is_directory=True)
    with pytest.raises(ForeignFileError, match=r": a symbolic link; expected fedleak's own folder"):
        RunDirectory(run.path).clear()
    with pytest.raises(ForeignFileError, match=r": a symbolic link; expected fedleak's own folder"):
        RunDirectory.open(run.path)
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == kept


def test_crafted_files_in_a_run_directory_give_one_line_not_a_hang_or_internal_error(
    tmp_path: Path,
) -> None:
    """A named pipe as FAILED blocked `fedleak report`, a deeply nested environment.json was an
    internal RecursionError, and a 54 MB config.toml took 47 s and 1.7 GB (audit CN4-CN6)."""
    import os

    from fedleak.report.rundir import RunDirectoryError

    run = RunDirectory.create(tmp_path / "run", parse_flat({"num-server-rounds": 1}), {})
    os.mkfifo(run.path / "FAILED")
    assert RunDirectory(run.path).failed_reason() == ""  # returns, does not wait on the pipe
    (run.path / "environment.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RunDirectoryError, match=r"environment\.json"):
        RunDirectory(run.path).environment()
    (run.path / "config.toml").write_text("# padding\n" * 200_000)
    with pytest.raises(RunDirectoryError, match=r"config\.toml: larger than 1 MB"):
        _ = RunDirectory.open(run.path).config


def test_a_failed_language_run_starts_again_without_its_earlier_texts(tmp_path: Path) -> None:
    """clear() left texts/ behind, so the folder read as someone else's and a failed text cell
    could never start again; a new run in a failed run's folder showed the earlier attempt's
    reconstructions (audit CP1, CP2)."""
    config = parse_flat({"num-server-rounds": 1})
    run = RunDirectory.create(tmp_path / "run", config, {"data": {"modality": "tokens"}})
    (run.path / "texts").mkdir()
    (run.path / "texts" / "r001_c000_tag.json").write_text("{}")
    run.mark_failed("killed in round 1")
    again = RunDirectory.create(run.path, config, {"data": {"modality": "tokens"}})
    assert not (again.path / "texts").exists()
    (again.path / "texts").mkdir()
    (again.path / "texts" / "r001_c000_tag.json").write_text("{}")
    (again.path / "texts" / "notes.txt").write_text("mine")
    RunDirectory(again.path).clear()
    assert [p.name for p in (again.path / "texts").iterdir()] == ["notes.txt"]


def test_named_pipes_and_deep_json_elsewhere_in_a_run_directory_give_one_line(
    tmp_path: Path,
) -> None:
    """Only FAILED was guarded: a pipe as environment.json, DONE or utility.csv still hung the
    report, and deep JSON in DONE was an internal RecursionError (audit CP4)."""
    import os

    from fedleak.report.rundir import RunDirectoryError, is_run_directory, read_utility_csv

    run = RunDirectory.create(tmp_path / "run", parse_flat({"num-server-rounds": 1}), {})
    run.append_round(1, [], {"test_loss": 1.0, "test_accuracy": 0.5})
    (run.path / "DONE").write_text("[" * 100_000 + "]" * 100_000)
    RunDirectory(run.path).check_records()  # an unreadable DONE says nothing of the rounds
    pipes = tmp_path / "pipes"
    pipes.mkdir()
    for name in ("environment.json", "utility.csv"):
        os.mkfifo(pipes / name)
    assert not is_run_directory(pipes)
    with pytest.raises(RunDirectoryError, match=r"utility\.csv"):
        read_utility_csv(pipes / "utility.csv")


def test_environment_records_every_parameter_each_attack_ran_with() -> None:
    """config.toml keeps an attack's parameters as given (a preset's name, two overrides); a
    reader of the run finds every value it ran with in environment.json (audit DO7)."""
    import json

    from fedleak.simulations.recording import environment

    config = parse_flat(
        {
            "attack.names": "ig,lti,aux-mean",
            "attack.lti.preset": "cpu-small",
            "attack.lti.epochs": 3,
            "attack.ig.tv-weight": 0.02,
            "attack.dlg.restarts": 4,  # an attack the run does not use
        }
    )
    recorded = json.loads(json.dumps(environment(torch.device("cpu"), config)))["attacks"]
    assert set(recorded) == {"ig", "lti"}  # aux-mean takes no parameters
    assert recorded["lti"]["hidden"] == [500]  # the preset's, not the default's 1000
    assert recorded["lti"]["epochs"] == 3 and recorded["lti"]["cache-dir"] is None
    assert recorded["ig"]["tv-weight"] == 0.02 and recorded["ig"]["milestones"] == [
        0.375,
        0.625,
        0.875,
    ]
    assert recorded["ig"]["matching"] == "cosine"


def test_a_folder_removed_mid_run_is_not_made_again(tmp_path: Path) -> None:
    """The writers make the folders they write into: a run whose folder was removed after
    round 1 wrote the later rounds and DONE into a new one without config.toml, which nothing
    could resume or report (audit DW1). The run stops at its next write instead."""
    import shutil

    run = RunDirectory.create(tmp_path / "run", _config(), {})
    run.append_round(1, _rows(1, 20.0), {"test_loss": 1.0})
    shutil.rmtree(tmp_path / "run")
    for write in (
        lambda: run.append_round(2, _rows(2, 21.0), {"test_loss": 0.9}),
        lambda: run.save_global_model(2, {"w": torch.zeros(2)}),
        run.mark_done,
    ):
        with pytest.raises(RunDirectoryError, match=r"run: removed during the run \(config\.toml"):
            write()
    run.mark_failed("the folder is gone")
    assert not (tmp_path / "run").exists()


def test_a_recorded_config_with_two_spellings_of_a_key_still_reads(tmp_path: Path) -> None:
    """An earlier fedleak recorded both spellings of a key given twice; refusing them since
    (audit EA1) left such a run unreportable (audit EB2) and unresumable (EC4). The last one,
    which ran, is read."""
    run = RunDirectory.create(tmp_path / "run", _config(), {})
    text = (run.path / "config.toml").read_text()
    (run.path / "config.toml").write_text(
        text.replace("[attack.ig]\n", "[attack.ig]\ntv_weight = 0.2\ntv-weight = 0.25\n", 1)
    )
    assert RunDirectory.open(run.path).config.attack.params["ig"]["tv-weight"] == 0.25
    # So does the resume command's `fedleak run DIR/config.toml` (audit EC4); a preset of
    # one's own with two spellings is still refused.
    from fedleak.config import ConfigError
    from fedleak.simulations.presets import load_preset

    assert load_preset(run.path / "config.toml").attack.params["ig"]["tv-weight"] == 0.25
    own = tmp_path / "mine.toml"
    own.write_text("[attack.ig]\ntv_weight = 0.2\ntv-weight = 0.25\n")
    with pytest.raises(ConfigError, match=r"^mine\.toml: .*two spellings"):
        load_preset(own)


def test_the_attacks_name_the_run_folders_files_as_the_run_directory_does() -> None:
    """`fedleak.attacks.learned.store` recognises run folders by name without importing the
    report room: its names must be the run directory's."""
    from fedleak.attacks.learned import store
    from fedleak.report import rundir

    assert store.RUN_LOCK_FILE == rundir.LOCK_FILE
    assert store.RUN_CONFIG_FILE == rundir.CONFIG_FILE
    assert store.RUN_ENVIRONMENT_FILE == rundir.ENVIRONMENT_FILE


def test_the_summary_says_what_the_attacks_assumed_for_clients_that_declared_no_batch() -> None:
    """Clients that declared no batch read as if they had declared one (audit EQ5): alone,
    and beside clients that did (EV5)."""
    from fedleak.config import parse_flat
    from fedleak.report.rundir import attacked_protocol

    config = parse_flat({"train.batch-size": 2})
    declared = pd.DataFrame({"mode": ["fedavg"], "batch_size": [8], "scored_against": "original"})
    undeclared = pd.DataFrame(
        {"mode": ["fedavg"], "batch_size": [4], "scored_against": "unavailable"}
    )
    assert attacked_protocol(declared, config) == ("fedavg", "batch size 8")
    assert attacked_protocol(undeclared, config) == (
        "protocol not declared",
        "attacked as one step over the 4 examples each reported",
    )
    both = pd.concat([declared, undeclared], ignore_index=True)
    assert attacked_protocol(both, config) == (
        "fedavg",
        "batch size 8; clients that declared none attacked as one step over the 4 examples "
        "each reported",
    )
