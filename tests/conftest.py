"""Shared fixtures."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
FLWR_LOCAL_PORTS = (9091, 9093, 39091, 39093)

# Under pytest-xdist (`make test` runs two workers on two cores) each worker keeps torch to one
# intra-op thread: two workers of two threads each on two cores wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow quality tests first: under `--dist loadscope --no-loadscope-reorder`
    (`make test`) each module is one worker's unit, and a long one started last would keep a
    worker busy after the other is done."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)


@pytest.fixture
def pair_chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A clock that reads every learned attack's budget as spent while its training pairs
    are built (and only there), and the chunks of pairs built, one entry each."""
    import fedleak.attacks.learned.pairs as pairs_module
    from fedleak.attacks.learned.pairs import PairSource

    spent = types.SimpleNamespace(perf_counter=lambda: 1e18)  # past any finite deadline
    monkeypatch.setattr(pairs_module, "time", spent)
    chunks: list[int] = []
    built = PairSource._pre_release
    monkeypatch.setattr(
        PairSource, "_pre_release", lambda self, *args: chunks.append(1) or built(self, *args)
    )
    return chunks


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small inversion problems are dominated by per-op overhead: one intra-op thread is faster,
    and on a shared 2-core machine two threads wait on each other (measured ~10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_until_closed(ports: tuple[int, ...], seconds: float = 20.0) -> None:
    """A stopped SuperLink lets go of its ports a moment later; the next test needs them."""
    deadline = time.monotonic() + seconds
    while any(_port_open(port) for port in ports) and time.monotonic() < deadline:
        time.sleep(0.2)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def flwr_home(tmp_path: Path) -> Iterator[Path]:
    """A FLWR_HOME of the test's own for `flwr run` with a local SuperLink. The SuperLink
    listens on Flower's fixed local ports, so the test skips when one already answers (it would
    run the app in someone else's environment); the SuperLink it started (found by that
    FLWR_HOME in its command line) is stopped afterwards."""
    if not (BIN / "flwr").exists() or not (BIN / "flower-superlink").exists():
        pytest.skip("the environment has no flwr / flower-superlink commands")
    # Tests of this suite running at once (pytest-xdist workers) take the ports in turn.
    with (Path(tempfile.gettempdir()) / "fedleak-tests-flwr-ports.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = [port for port in FLWR_LOCAL_PORTS if _port_open(port)]
        if busy:
            pytest.skip(f"a SuperLink (or something else) already listens on 127.0.0.1:{busy[0]}")
        home = tmp_path / "flwr-home"
        home.mkdir()
        yield home
        for pid in _processes_mentioning(str(home)):  # the SuperLink this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        _wait_until_closed(FLWR_LOCAL_PORTS)
