"""Shared fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
FLWR_LOCAL_PORTS = (9091, 9093, 39091, 39093)


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
    busy = [port for port in FLWR_LOCAL_PORTS if _port_open(port)]
    if busy:
        pytest.skip(f"a SuperLink (or something else) already listens on 127.0.0.1:{busy[0]}")
    home = tmp_path / "flwr-home"
    home.mkdir()
    yield home
    for pid in _processes_mentioning(str(home)):  # the SuperLink this test started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
