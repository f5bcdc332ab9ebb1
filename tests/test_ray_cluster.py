"""A study on an existing Ray cluster: `ray start --head` on this machine, joined via RAY_ADDRESS.

The cluster lives in a private temporary directory (so no other process on the machine finds
it through /tmp/ray), on ports chosen free, and is stopped by its process group and PIDs in
every case; `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pandas as pd
import pytest
import ray

from fedleak.config import parse_flat
from fedleak.server.pool import ATTACK_RESOURCE
from fedleak.simulations.launch import run_study

RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT = 120.0


def _free_port() -> int:
    """A free port outside the kernel's ephemeral range (32768-60999) and Ray's worker ports
    (10002-19999), where another test's Ray, which takes both, cannot grab it between this
    check and `ray start`."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line names `text` (the cluster's private directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the cluster's process group (`ray start --block` then stops what it started),
    then SIGKILL the group and any process still naming the cluster's directory."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    if _wait_gone(head, temp_dir, 30.0):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    for pid in _pids_mentioning(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(head, temp_dir, 10.0)


def _wait_gone(head: subprocess.Popen, temp_dir: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while head.poll() is None or _pids_mentioning(temp_dir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """A one-node cluster with 2 CPUs and one unit of the attack-worker resource."""
    if ray.is_initialized():
        pytest.skip("a Ray runtime is already up in this process")
    # Short: Ray's unix socket paths live under it and must stay below ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="fedleak-ray-", dir="/tmp")
    head, log = _start_head(temp_dir)
    if head is None:  # a port was taken after all: once more on other ports
        log.close()
        head, log = _start_head(temp_dir)
    try:
        if head is None:
            tail = (Path(temp_dir) / "head.log").read_text(errors="replace")[-2000:]
            pytest.fail(f"ray start --head did not come up:\n{tail}")
        yield (Path(temp_dir) / "ray_current_cluster").read_text().strip(), Path(temp_dir)
    finally:
        if head is not None:
            _stop(head, temp_dir)
        log.close()
        left = _pids_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"cluster processes still running: {left}"


def _start_head(temp_dir: str) -> tuple[subprocess.Popen | None, IO[bytes]]:
    """`ray start --head` on fresh ports, once its address is written; None if it exited
    first (its log is in `temp_dir`/head.log)."""
    command = [
        str(RAY),
        "start",
        "--head",
        "--block",
        f"--port={_free_port()}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=0",
        f'--resources={{"{ATTACK_RESOURCE}": 1}}',
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        f"--dashboard-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115 - the fixture closes it
    head = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_TMPDIR": temp_dir},
        start_new_session=True,
    )
    address_file = Path(temp_dir) / "ray_current_cluster"
    deadline = time.monotonic() + START_TIMEOUT
    while not address_file.exists() or not address_file.read_text().strip():
        if head.poll() is not None or time.monotonic() > deadline:
            _stop(head, temp_dir)
            return None, log
        time.sleep(0.2)
    return head, log


def test_a_two_round_study_runs_on_an_existing_cluster(
    ray_cluster: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, temp_dir = ray_cluster
    monkeypatch.setenv("RAY_ADDRESS", address)
    out = tmp_path / "run"
    config = parse_flat(
        {
            "name": "cluster",
            "num-server-rounds": 2,
            "out-dir": str(out),
            "train.batch-size": 2,
            "data.aux-size": 100,
            "attack.names": "aux-mean",
            "attack.workers": 1,
        }
    )
    run_study(config, num_clients=3)
    assert not ray.is_initialized()  # Flower disconnected; the cluster itself lives on
    utility = pd.read_csv(out / "utility.csv")
    assert list(utility["round"]) == [0, 1, 2]
    leakage = pd.read_parquet(out / "leakage.parquet")
    assert sorted(leakage["round"].unique()) == [1, 2]
    assert (leakage.status == "ok").all()
    assert len(leakage) == 2 * 3 * 2  # rounds x clients x batch
    # The clients and the attack worker ran in the cluster's worker processes: Ray tags each
    # actor's log file with its class name.
    tags = "".join(
        path.read_text(errors="replace")[:4000]
        for path in temp_dir.glob("session_*/logs/worker-*.out")
    )
    assert ":actor_name:ClientAppActor" in tags
    assert ":actor_name:AttackWorker" in tags
