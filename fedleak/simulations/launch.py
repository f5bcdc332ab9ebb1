"""Run one study in-process on Flower's simulation engine (Ray), the way `fedleak run` does.

`flwr run .` remains the Flower-native path; this one binds the configuration to the apps
directly, so a study needs no SuperLink and its errors surface in the caller.

Everything that can be checked is checked before Ray starts (`validate_run`, resources, the
payload budget, the run directory), and the run directory is locked for the whole run. The
first Ctrl-C asks the run to stop at its next safe point, keeping every finished round; a
second one leaves at once (the files are still consistent: every write is atomic and a round
counts as finished only once its last file is written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
import torch

from fedleak.client.app import make_client_app
from fedleak.config import RunConfig
from fedleak.data.dataset import DatasetUnavailable
from fedleak.interrupt import (
    RunInterrupted,
    clear_stop,
    request_stop,
    say_last_words,
    stop_requested,
)
from fedleak.lines import MAX_LINE, error_line
from fedleak.report.lock import RunLock
from fedleak.report.rundir import RunDirectory, RunDirectoryError, mark_failed_if_silent
from fedleak.server.pool import ray_init_args
from fedleak.server.validate import check_seen_by_ray, validate_run
from fedleak.settings import ConfigError
from fedleak.simulations.apps import make_server_app
from fedleak.simulations.recording import claim_run_dir, default_run_dir, release_claimed
from fedleak.simulations.study import RunFailed, check_resumable

SERVER_THREAD_GRACE_SECONDS = 60.0  # a safe point comes within a poll or an attack iteration


class StudyFailed(RuntimeError):
    """The simulation ended before every configured round was recorded, or the recorded
    rounds make a failed run (every client, or an attack on every update, failed)."""


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the study at a safe point; `finished` rounds are kept in `path`."""

    def __init__(self, path: Path, finished: int, total: int) -> None:
        super().__init__(f"stopped after {finished} of {total} rounds; they are kept in {path}")
        self.path, self.finished, self.total = path, finished, total

    def __reduce__(self) -> tuple[type[StudyInterrupted], tuple[Path, int, int]]:
        # A parallel sweep's cell raises it in a worker process: it must unpickle in the sweep.
        return type(self), (self.path, self.finished, self.total)


def client_threads(client_cpus: float) -> int:
    """The torch threads a simulated client computes with: its whole CPUs, at least one."""
    return max(1, int(client_cpus))


def check_out_dir(config: RunConfig, num_clients: int, client_cpus: float = 1.0) -> Path:
    """The run directory a study writes, refused where it would be (`fedleak check` asks the
    same): a run in progress there, a folder that is not new, empty or fedleak's, and a resume
    with other settings or clients."""
    out = Path(config.out_dir) if config.out_dir else default_run_dir(config)
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:  # bytes no locale decoded: Python holds them as surrogates
        raise ConfigError(
            f"out-dir={str(out)!r}: the path holds bytes that are not UTF-8 text, which the "
            "run's records (config.toml) cannot name; expected a path of UTF-8 characters"
        ) from None
    RunLock(out).probe()  # a run in progress there is the first thing to say
    RunDirectory.check_target(out, resume=config.sim.resume)
    resolved = dataclasses.replace(config, out_dir=str(out))
    check_resumable(resolved, out, num_clients, client_threads(client_cpus))
    return out


def run_study(
    config: RunConfig,
    *,
    num_clients: int = 10,
    client_cpus: float = 1.0,
    client_gpus: float = 0.0,
    verbose: bool = False,
    resume_command: Callable[[Path], str] | None = None,
) -> Path:
    """Simulate `num_clients` clients for the configured rounds; return the run directory.
    `resume_command(run directory)`: the command a second Ctrl-C, which stops at once, names
    for continuing the run.

    Raises `ConfigError` (and `DatasetUnavailable`, `RunDirectoryError`) before Ray starts,
    `StudyFailed` for a failed run and `StudyInterrupted` after a Ctrl-C.
    """
    # Refused before Ray starts: components, resources (GPU shares that do not exist), the data
    # split, infeasible attacks and rounds over the payload budget.
    validate_run(config, num_clients, client_cpus, client_gpus)
    check_seen_by_ray(config)
    init_args = ray_init_args(config, client_cpus, client_gpus)
    made: list[Path] = []
    if not config.out_dir:  # fedleak's own name: made now, so no other run takes it
        default = default_run_dir(config)
        made = [default.parent] if not default.parent.exists() else []
        made.append(claim_run_dir(default))
        config = dataclasses.replace(config, out_dir=str(made[-1]))
    try:
        out = check_out_dir(config, num_clients, client_cpus)
    except BaseException:
        _release(made)
        raise
    config = dataclasses.replace(config, out_dir=str(out))
    resume = None if resume_command is None else resume_command(out)
    try:
        with RunLock(out), _stop_on_first_signal(resume):
            try:
                simulate(config, num_clients, client_cpus, client_gpus, init_args, verbose)
            except RunFailed as failure:
                raise StudyFailed(f"run failed: {failure}") from None
            except (RunInterrupted, KeyboardInterrupt):
                raise StudyInterrupted(out, _finished(out), config.num_server_rounds) from None
            except (ConfigError, RunDirectoryError, DatasetUnavailable):
                raise  # a refusal (a resume under other settings): the folder stays as it was
            except RuntimeError as error:
                if type(error) is not RuntimeError:  # fedleak's own, which say what happened
                    _marked_failed(out, error_line(error, MAX_LINE))
                    raise
                raise StudyFailed(
                    _marked_failed(out, _engine_stopped(out, error, client_gpus))
                ) from error
            # A plug-in's bug (or its sys.exit), or fedleak's: the run still failed.
            except (Exception, SystemExit) as error:
                _marked_failed(out, error_line(error, MAX_LINE))
                raise
    except (ConfigError, RunDirectoryError, DatasetUnavailable):
        # Refused inside the server (a cache folder another run holds): a folder made for
        # this run is removed once its lock is released.
        _release(made)
        raise
    done = _finished(out)
    if done < config.num_server_rounds:
        raise StudyFailed(
            _marked_failed(
                out,
                f"run failed: it stopped after {done} of {config.num_server_rounds} rounds; "
                f"finished rounds are kept in {out} (rerun with --out {out} --set "
                "sim.resume=true to continue)",
            )
        )
    return out


def _release(made: list[Path]) -> None:
    """Undo what `run_study` made for a refused run: it leaves no folder of its own behind."""
    for folder in reversed(made):
        release_claimed(folder)


def _marked_failed(out: Path, message: str) -> str:
    """`message`, written as the run's FAILED where the run did not write its own: a run that
    failed never leaves a directory that reads as merely stopped."""
    try:
        mark_failed_if_silent(out, message.removeprefix("run failed: "))
    except OSError as error:
        # The full disk that failed the run may refuse FAILED too: the run's own error stays
        # the one reported, and this line says why the folder holds no FAILED.
        print(
            f"fedleak: warning: could not write FAILED in {out} "
            f"({error.strerror or type(error).__name__})",
            file=sys.stderr,
            flush=True,
        )
    return message


def _engine_stopped(out: Path, error: RuntimeError, client_gpus: float) -> str:
    """Flower's engine ends a failed simulation with a bare "Ending simulation"; the run's own
    FAILED reason (or the engine's cause) says what happened, and on a Ray cluster a client GPU
    share that no node gives is the usual cause of clients that never answer."""
    reason = RunDirectory(out).failed_reason() if out.is_dir() else ""
    if not reason:
        reason = f"Flower's simulation engine stopped ({error_line(_root_cause(error))})"
    if client_gpus > 0 and os.environ.get("RAY_ADDRESS", "local") not in ("", "local"):
        reason += (
            f"; check that a node of the Ray cluster at RAY_ADDRESS offers the "
            f"--client-gpus {client_gpus:g} share each client asks for"
        )
    return f"run failed: {reason}"


def _root_cause(error: BaseException) -> BaseException:
    """The innermost of the errors `error` was raised from: Flower wraps an engine's failure
    (Ray that cannot start: a socket path too long, a locale that cannot encode the out-dir)
    in two errors that only say it crashed."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def simulate(
    config: RunConfig,
    num_clients: int,
    client_cpus: float,
    client_gpus: float,
    init_args: dict[str, object],
    verbose: bool,
) -> None:
    """Flower's simulation engine on the bound apps (the one place Ray starts)."""
    from flwr.simulation import run_simulation

    if not verbose:
        # run_simulation warns that it is deprecated in favour of `flwr run`, and Flower logs
        # every client exception with its traceback; fedleak reports each failed client on one
        # line itself (and a failed run as its last line), so Flower's logs wait for --verbose.
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # The clients' Ray actors hold the cores; a multi-threaded server thrashes against them
    # (measured here: one IG job 25 s with two threads, 2 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    serving: list[threading.Thread] = []
    # Ray starts its processes with fork and runs Python in each child before exec. A garbage
    # collection there that frees an unreachable SSL context waits forever on an OpenSSL lock
    # another thread held at the fork (seen: a test process hung 12 minutes in
    # `start_gcs_server`, the child spinning in `SSL_CTX_free`). Collect the garbage now and
    # keep what is left out of every later collection while Ray starts and runs.
    gc.collect()
    gc.freeze()
    try:
        run_simulation(
            server_app=make_server_app(
                config,
                clients=num_clients,
                client_threads=client_threads(client_cpus),
                serving=serving,
            ),
            client_app=make_client_app(
                config, threads=client_threads(client_cpus), verbose=verbose
            ),
            num_supernodes=num_clients,
            backend_config={
                "client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
                "init_args": {"logging_level": "ERROR", "log_to_driver": verbose, **init_args},
            },
            verbose_logging=verbose,
        )
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
        _end_server_thread(serving)


def _end_server_thread(serving: list[threading.Thread]) -> None:
    """Flower's simulation engine that crashes stops the engine, not the ServerApp's thread,
    which would go on waiting for replies (holding the run directory's lock, keeping the
    process alive) until sim.timeout: ask it to stop at its next safe point and wait for it."""
    left = [thread for thread in serving if thread.is_alive()]
    if not left:
        return
    asked = not stop_requested()
    request_stop()
    for thread in left:
        thread.join(timeout=SERVER_THREAD_GRACE_SECONDS)
    if asked:
        clear_stop()


def _finished(out: Path) -> int:
    return RunDirectory.open(out).finished_rounds() if (out / "config.toml").exists() else 0


def terminate_descendants() -> None:
    """SIGTERM to every process this one started, Ray's included (its node processes and
    workers would otherwise wait a minute or more to notice that their driver is gone).
    Linux only: elsewhere there is no /proc to read the process tree from."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended while being read
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    pending = list(children.get(os.getpid(), []))
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_on_first_signal(resume: str | None = None) -> Iterator[None]:
    """The first SIGINT or SIGTERM (a terminal's Ctrl-C, a scheduler ending the job) requests
    a stop at the next safe point; the second leaves at once, its line naming the `resume`
    command when there is one.

    Ray's driver registers its own SIGTERM handler when it starts (`ray.init`, inside Flower's
    engine), which raises SystemExit wherever the main thread waits; the engine then shuts
    Ray down under its worker threads, and one of them still waiting on a client can end the
    process from Ray's core ("The core worker has already been shutdown", exit 1) before the
    run reports. While inside, that registration is skipped, so SIGTERM stays a stop at the
    next safe point, after which the engine ends with no thread waiting on Ray.

    A scheduler or `timeout` that ends a job signals its whole process group, which also held
    Ray's node processes: killed while Ray was starting, they left the driver waiting 60 s for
    them and exiting with Ray's own message. While inside, Ray starts them in a session of their
    own where the kernel ends them with their parent (`_ray_in_own_session`), so the group's
    SIGTERM reaches the driver alone and stops the run like any other.

    One signal of the other kind within ECHO_SECONDS of the first repeats its request
    (`_echo`: a parallel sweep passes the group's SIGTERM on to its cells as SIGINT).

    Only the main thread may install signal handlers; elsewhere (a sweep's worker thread, a
    notebook's executor) Python's default handling stays.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    first: list[tuple[int, float]] = []  # the signal that asked for the stop, and when

    def handler(signum: int, _frame: object) -> None:
        if first and _echo(first[0], (signum, time.monotonic())):
            first.clear()  # one echo: a person's Ctrl-C after it is their second request
            return
        if stop_requested():
            then = f"; resume with: {resume}" if resume else ""
            os.write(2, f"\nfedleak: stopped at once; finished rounds are kept{then}\n".encode())
            say_last_words()
            terminate_descendants()
            os._exit(130)
        request_stop()
        first.append((signum, time.monotonic()))
        sys.stderr.write(
            "\nfedleak: stopping at the next safe point, keeping every finished round "
            "(Ctrl-C again to stop at once)\n"
        )
        sys.stderr.flush()

    clear_stop()
    previous = {number: signal.signal(number, handler) for number in _STOP_SIGNALS}
    ray_utils = ray._private.utils
    registration = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = _keep_sigterm_handler
    try:
        with _ray_in_own_session():
            yield
    finally:
        ray_utils.set_sigterm_handler = registration
        for number, before in previous.items():
            signal.signal(number, before)
        clear_stop()


@contextlib.contextmanager
def _ray_in_own_session() -> Iterator[None]:
    """Ray's node processes started in a new session, where Linux's fate-sharing (they are
    killed when their parent dies) keeps them from outliving the driver; Ray does the same with
    process groups on Windows. Without fate-sharing they stay in the caller's group, where
    Ray's reaper finds them. The price: after a SIGKILL of the whole group, the raylet's two
    agent processes (started by it, in its session) outlive it by up to about a minute, until
    they notice, as they already did after a SIGKILL of the driver alone."""
    services = ray._private.services
    if not sys.platform.startswith("linux") or not ray._private.utils.detect_fate_sharing_support():
        yield
        return
    popen = services.ConsolePopen

    class OwnSessionPopen(popen):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["start_new_session"] = True
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


# A parallel sweep's cells share its process group: a SIGTERM to the group reaches each cell,
# and the sweep passes its own on to them as SIGINT a moment later. That one echo is the same
# stop request, not the second one that stops at once; any signal after it is.
ECHO_SECONDS = 2.0


def _echo(first: tuple[int, float], now: tuple[int, float]) -> bool:
    """Whether the signal `now` (number, time) repeats the stop request `first` made: another
    signal within ECHO_SECONDS."""
    return now[0] != first[0] and now[1] - first[1] < ECHO_SECONDS


def _keep_sigterm_handler(_handler: object) -> None:
    """Ray's registration of its driver's SIGTERM handler, skipped during a run."""
