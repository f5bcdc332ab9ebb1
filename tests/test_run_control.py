"""Real runs as a user drives them: a run in which every client fails is not DONE; a second run
on the same folder is refused while the first holds it; Ctrl-C in the middle of a round keeps
every finished round, and the command it prints resumes the run to the end."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from processes import children, ended, lock_held_elsewhere

from fedleak.simulations.cli import main

# Rounds that take at least 6 s of attack time each (inline, wall-clock: the same under load),
# so that a second run is refused while the first one is busy and a signal sent once round 1 is
# recorded (polled every 0.2 s) lands inside round 2. The tests wait for round 1 and signal at
# once; a longer round (it was 12 s) only made each run and its resume slower.
SLOW_ROUNDS = [
    "--num-clients",
    "2",
    "--set",
    "num-server-rounds=2",
    "--set",
    "threat.share=batch",
    "--set",
    "attack.names=ig",
    "--set",
    "attack.max-iterations=1000000000",
    "--set",
    "attack.max-seconds=6",
    "--set",
    "attack.clients-per-round=1",
]


def _fedleak(*args: str, **popen: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "fedleak.simulations.cli", *args]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen
    )


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


@contextlib.contextmanager
def _python(code: str, **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """`code` running in a Python of its own, its output piped as text; killed (with its group
    when it has one) if the test leaves it running."""
    run = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    try:
        yield run
    finally:
        if run.poll() is None:
            if popen.get("start_new_session"):
                os.killpg(run.pid, signal.SIGKILL)
            else:
                run.kill()


def _rounds(out: Path) -> list[int]:
    try:
        return list(pd.read_csv(out / "utility.csv")["round"])
    except (OSError, pd.errors.EmptyDataError, KeyError):
        return []


def test_a_run_in_which_every_client_fails_exits_non_zero_and_is_not_done(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "failing"
    args = ["run", "--num-clients", "2", "--out", str(out), "--set", "num-server-rounds=1"]
    # 1.0 is refused before any work (a run that could only fail): 0.9999 fails both clients.
    status = main([*args, "--set", "sim.fail-rate=0.9999", "--set", "attack.names=aux-mean"])
    err = capfd.readouterr().err  # the process's own stderr: Flower's log handler writes there
    last = err.splitlines()[-1]
    assert status == 1
    assert "Traceback" not in err  # each failed client is one line of fedleak's, not Flower's log
    assert last.startswith("fedleak: run failed: ")
    assert "every client failed in every one of the 1 recorded rounds" in last
    assert "failed on purpose" in last  # the clients' own reason, not Ray's traceback
    assert not (out / "DONE").exists()
    assert "every client failed" in json.loads((out / "FAILED").read_text())["reason"]
    assert (out / "report.html").exists()  # the failed run can still be looked at
    # ... and its verdict says nothing was aggregated or attacked, not "the others" (ES2).
    report = (out / "report.md").read_text()
    assert "failed to reply all 2 times they were asked: no update was aggregated" in report
    assert "(round 0: 0.100; no client's update reached the model)" in report


def test_a_second_run_is_refused_and_ctrl_c_keeps_finished_rounds_then_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    first = _fedleak("run", "quickstart", *SLOW_ROUNDS, "--out", str(out), start_new_session=True)
    try:
        lock = out / ".fedleak.lock"
        _wait_for(lambda: lock.is_file() and lock.stat().st_size > 0, 180, "the first run's lock")
        # The second run is this test's own process (already warm, so it asks at once).
        assert main(["run", "quickstart", *SLOW_ROUNDS, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        assert f"in use by another fedleak run (process {first.pid} " in err
        # A report of the live run read "The run stopped after round 0": refused in one line.
        assert main(["report", str(out)]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        assert f"a fedleak run is still writing it (process {first.pid} " in err
        assert not (out / "report.md").exists()
        assert first.poll() is None, "the first run must still be running"

        _wait_for(lambda: 1 in _rounds(out), 300, "round 1 to be recorded")
        sent = time.monotonic()
        os.killpg(first.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        _, err = first.communicate(timeout=120)
        stopped = time.monotonic() - sent
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fedleak: interrupted: stopped after 1 of 2 rounds"), line
    assert stopped < 60, f"the first Ctrl-C took {stopped:.0f} s to stop the run"
    assert _rounds(out) == [0, 1]
    assert not (out / "DONE").exists() and not (out / "FAILED").exists()
    assert lock.read_text() == "", "the lock must be released"

    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[:2] == ["fedleak", "run"] and resume[-2:] == ["--set", "sim.resume=true"]
    assert main(resume[1:]) == 0
    assert _rounds(out) == [0, 1, 2]
    assert (out / "DONE").exists()
    leakage = pd.read_parquet(out / "leakage.parquet")
    assert sorted(leakage["round"].unique()) == [1, 2]


def test_a_sigterm_stops_a_run_as_ctrl_c_does(tmp_path: Path) -> None:
    """A scheduler ending the job: the finished rounds are kept, one line says how to resume,
    and no crash handler dumps a stack or aborts the process."""
    out = tmp_path / "run"
    run = _fedleak("run", "quickstart", *SLOW_ROUNDS, "--out", str(out), start_new_session=True)
    try:
        _wait_for(lambda: 1 in _rounds(out), 300, "round 1 to be recorded")
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, err
    assert "SIGTERM received" not in err
    assert err.strip().splitlines()[-1].startswith("fedleak: interrupted: stopped after 1 of 2")
    assert 1 in _rounds(out) and not (out / "DONE").exists()
    assert (out / ".fedleak.lock").read_text() == "", "the lock must be released"


SIGTERM_AFTER_RAY_STARTS = """
import time
import ray
from fedleak.interrupt import stop_requested
from fedleak.simulations.launch import _stop_on_first_signal
with _stop_on_first_signal():
    # As inside Flower's engine: Ray's driver starts, and with it its own SIGTERM handling.
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    print("started", flush=True)
    for _ in range(600):
        if stop_requested():
            print("stop requested", flush=True)
            break
        time.sleep(0.05)
ray.shutdown()
"""


# As `fedleak` sets it (without --verbose) before Ray is imported; set here, not inherited from
# an earlier test that ran the command line in this process.
RAY_ENVIRONMENT = {**os.environ, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}


def test_a_sigterm_after_ray_started_is_a_stop_request() -> None:
    """Ray's driver registers a SIGTERM handler that raises SystemExit wherever the main thread
    is (and in Flower's engine that races Ray's shutdown against its worker threads, seen as
    exit 1 with "The core worker has already been shutdown"): during a run, a SIGTERM after
    Ray started is still fedleak's stop at the next safe point."""
    with _python(SIGTERM_AFTER_RAY_STARTS, env=RAY_ENVIRONMENT) as run:
        assert run.stdout is not None
        assert run.stdout.readline().strip() == "started"
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert out.strip() == "stop requested"
    assert "stopping at the next safe point" in err


def _gcs_started(pid: int) -> bool:
    """Whether `pid` has started Ray's GCS server (the first of Ray's node processes)."""
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"gcs_server" in Path(f"/proc/{child}/cmdline").read_bytes():
                return True
    return False


def test_a_sigterm_to_the_process_group_while_ray_starts_is_a_stop_request() -> None:
    """`kill -- -PGID` (a shell's job control, a CI runner) while Ray was starting killed its
    GCS with the driver's group: the driver then waited 60 s and exited 1 with Ray's message
    (audit BJ1). Ray's node processes now run in a session of their own."""
    with _python(SIGTERM_AFTER_RAY_STARTS, env=RAY_ENVIRONMENT, start_new_session=True) as run:
        _wait_for(lambda: _gcs_started(run.pid), 60, "Ray's GCS server to start")
        ray_processes = children(run.pid)
        os.killpg(run.pid, signal.SIGTERM)
        out, err = run.communicate(timeout=45)
    assert run.returncode == 0, err
    assert out.splitlines() == ["started", "stop requested"]
    assert "GCS" not in err, err
    _wait_for(lambda: all(ended(pid) for pid in ray_processes), 30, "Ray's processes to end")


DOUBLE_CTRL_C = """
import subprocess, sys, time
from fedleak.simulations.launch import _stop_on_first_signal
# A child with a child of its own, as Ray's raylet starts its workers.
child = subprocess.Popen(["sh", "-c", "sleep 120 & wait"])
with _stop_on_first_signal("fedleak run quickstart --out /x --set sim.resume=true"):
    time.sleep(1)
    print(child.pid, flush=True)
    time.sleep(120)
"""


def test_a_second_ctrl_c_exits_at_once_and_ends_the_processes_the_run_started() -> None:
    with _python(DOUBLE_CTRL_C) as run:
        child = int(run.stdout.readline())  # type: ignore[union-attr]
        grandchildren = children(child)
        assert grandchildren, "the child's sleep must have started"
        run.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert run.poll() is None, "the first Ctrl-C only asks for a stop"
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=30)
    assert run.returncode == 130
    # The line names the resume, as the first Ctrl-C's end would have (audit AL4).
    assert err.strip().splitlines()[-1] == (
        "fedleak: stopped at once; finished rounds are kept; resume with: "
        "fedleak run quickstart --out /x --set sim.resume=true"
    )
    _wait_for(
        lambda: all(ended(pid) for pid in [child, *grandchildren]),
        10,
        "the run's child processes to end",
    )


def test_a_sigterm_passed_on_as_sigint_is_one_stop_request() -> None:
    """A parallel sweep's cells got the group's SIGTERM and, a moment later, the sweep's own
    passed on as SIGINT: each cell stopped at once, as after two Ctrl-C (audit BY1)."""
    with _python(DOUBLE_CTRL_C) as run:
        run.stdout.readline()  # type: ignore[union-attr]
        run.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert run.poll() is None, "the SIGINT repeated the SIGTERM's request"
        # One echo only: a person's Ctrl-C after it is their second request (audit BZ D1).
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=30)
    assert run.returncode == 130
    assert err.count("stopping at the next safe point") == 1
    assert "stopped at once" in err


@pytest.mark.parametrize("delay", [0.6, 0.9, 1.2])
def test_a_ctrl_c_while_torch_loads_is_one_line_and_130(tmp_path: Path, delay: float) -> None:
    """In the first second torch is being imported: a Ctrl-C raised inside its C++
    initialisers aborted the process, and the handler's own import of it again crashed
    (measured: exit -11, -6, or 1 with a 45-92 line traceback)."""
    command = [sys.executable, "-m", "fedleak.simulations.console", "run", "quickstart"]
    command += ["--out", str(tmp_path)]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(delay)
    os.killpg(run.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert err.strip().splitlines() == ["fedleak: interrupted"], err


def test_a_ctrl_c_while_the_command_line_loads_is_one_line_and_130() -> None:
    # Earlier still, while the console script imports the command line's own modules.
    interrupt_on_load = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fedleak.simulations.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from fedleak.simulations.console import main\n"
        "sys.exit(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", interrupt_on_load], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (130, "fedleak: interrupted\n")


def test_a_sigterm_while_the_command_line_loads_is_one_line_and_130() -> None:
    """A scheduler's SIGTERM in the first seconds ended fedleak with exit -15 and no word, where
    a Ctrl-C gave one line and 130 (audit BY2)."""
    slow_load = (
        "import sys, time\n"
        "class Slow:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fedleak.simulations.cli':\n"
        "            print('loading', flush=True)\n"
        "            time.sleep(60)\n"
        "sys.meta_path.insert(0, Slow())\n"
        "from fedleak.simulations.console import main\n"
        "sys.exit(main())\n"
    )
    with _python(slow_load) as run:
        assert run.stdout is not None and run.stdout.readline() == "loading\n"
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=30)
    assert (run.returncode, err) == (130, "fedleak: interrupted\n")


def _descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *_descendants(child)]
    return found


def _client_actor(pid: int) -> int | None:
    for child in _descendants(pid):
        try:
            if "ClientAppActor" in Path(f"/proc/{child}/cmdline").read_text():
                return child
        except OSError:
            continue
    return None


def test_a_simulated_client_that_dies_fails_the_run_instead_of_shrinking_it(
    tmp_path: Path,
) -> None:
    """Flower does not replace a client actor that died: the rounds after it would go on
    with fewer clients than the study was configured with, and end DONE. Only sim.fail-rate's
    injected failures belong to a study; a real one stops the run with one line."""
    out = tmp_path / "run"
    slow = [*SLOW_ROUNDS, "--set", "num-server-rounds=3", "--set", "attack.max-seconds=4"]
    run = _fedleak("run", "quickstart", *slow, "--out", str(out), start_new_session=True)
    try:
        _wait_for(lambda: 1 in _rounds(out), 300, "round 1 to be recorded")
        actor = _client_actor(run.pid)
        assert actor is not None, "no Ray client actor found"
        os.kill(actor, signal.SIGKILL)
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedleak: run failed: "), last
    assert "a client failed" in last and "sim.resume=true" in last
    assert not (out / "DONE").exists()
    assert "a client failed" in json.loads((out / "FAILED").read_text())["reason"]
    assert _rounds(out)[-1] < 3  # the round that lost the client is not recorded


def test_fedleak_run_gives_the_stop_at_once_its_resume_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedleak run` hands the command that resumes this very run to the second Ctrl-C's line
    (the simulation itself replaced: the run then ends with no round, as a failed run)."""
    import contextlib

    from fedleak.simulations import launch

    said = []

    @contextlib.contextmanager
    def recorded(resume: str | None = None):
        said.append(resume)
        yield

    monkeypatch.setattr(launch, "_stop_on_first_signal", recorded)
    monkeypatch.setattr(launch, "simulate", lambda *args, **kwargs: None)
    out = tmp_path / "run"
    status = main(["run", "quickstart", "--set", "seed=3", "--num-clients", "4", "--out", str(out)])
    assert status == 1
    assert said == [
        f"fedleak run quickstart --set seed=3 --num-clients 4 --out {out} --set sim.resume=true"
    ]


def test_a_ctrl_c_during_a_sweep_check_does_not_speak_of_kept_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedleak sweep --check` runs no cell; its Ctrl-C said "finished cells are kept; rerun
    the same sweep command to continue", as if a sweep had been stopped."""
    from fedleak.simulations import sweep

    def stopped(*args: object, **kwargs: object) -> list[str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "check_sweep", stopped)
    assert main(["sweep", "demo", "--check", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "fedleak: interrupted"


def test_a_deleted_working_directory_is_one_line(tmp_path: Path) -> None:
    """A command that loads torch, run from a folder removed since, ended with torch's
    libraries failing to load ("Intel oneMKL FATAL ERROR") and exit 2, the status of bad
    arguments (audit CE6)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    # The interpreter must start there: torch loads from a folder removed afterwards.
    command = (
        'cd "$1" && rmdir "$1" && exec "$2" -c "import sys; sys.argv = [\'fedleak\', '
        "'config-keys']; from fedleak.simulations.console import main; sys.exit(main())\""
    )
    # Without PYTHONPATH: Flower's Ray backend sets it to an earlier simulation's sys.path in
    # this test process, whose relative entry makes the interpreter itself complain at start.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        ["bash", "-c", command, "-", str(gone), sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 1 and "oneMKL" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "fedleak: error: the working directory no longer exists; cd to one"
    )


def test_two_runs_started_in_one_second_without_out_get_folders_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both named runs/<second>-quickstart: the one that locked it second was refused as
    "in use by another fedleak run", though its user chose no folder (audit ED4)."""
    from fedleak.report.lock import RunLock
    from fedleak.simulations import launch

    taken = tmp_path / "runs" / "20261207-103507-quickstart"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "default_run_dir", lambda config: taken)
    used = []
    monkeypatch.setattr(launch, "simulate", lambda config, *_, **__: used.append(config.out_dir))
    with lock_held_elsewhere(taken):  # the other run: it made the folder and holds its lock
        assert RunLock(taken).holder() is not None
        status = main(["run", "quickstart", "--num-clients", "3"])
    assert used == [str(taken.with_name(taken.name + "-2"))]
    assert status == 1  # the replaced simulation finished no round


def test_a_run_refused_inside_the_server_leaves_no_default_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cache-dir another run holds is refused by the server, after `fedleak run` made
    runs/<time>-<name>/: the folder stayed, holding only its lock (audit EJ4's carry)."""
    from fedleak.report.rundir import RunDirectoryError
    from fedleak.simulations import launch

    def refused(config: object, *_: object, **__: object) -> None:
        raise RunDirectoryError("/cache: in use by another fedleak run")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "simulate", refused)
    assert main(["run", "quickstart", "--num-clients", "3"]) == 1
    assert capsys.readouterr().err.strip().endswith("in use by another fedleak run")
    assert not (tmp_path / "runs").exists()
    # A folder the user named stays, as it was given.
    (tmp_path / "mine").mkdir()
    assert main(["run", "quickstart", "--num-clients", "3", "--out", str(tmp_path / "mine")]) == 1
    assert (tmp_path / "mine").is_dir()
    # Refused before Ray, by the same checks: neither runs/ nor its folder stays (audit EN6).
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.toml").write_text('name = "other"\n')
    (other / "environment.json").write_text("{}")
    cache = ("--set", "attack.names=lti", "--set", f"attack.lti.cache-dir={other}/state/lti")
    assert main(["run", "quickstart", "--num-clients", "3", *cache]) == 2
    assert "another fedleak run's" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
