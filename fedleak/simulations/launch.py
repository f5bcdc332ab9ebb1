"""Run one study in-process on Flower's simulation engine (Ray), the way `fedleak run` does.

`flwr run .` remains the Flower-native path; this one binds the configuration to the apps
directly, so a study needs no SuperLink and its errors surface in the caller.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path

import torch

from fedleak.client.app import make_client_app
from fedleak.config import RunConfig
from fedleak.report.rundir import RunDirectory
from fedleak.runtime import federated_data, model_spec
from fedleak.server.app import default_run_dir, make_server_app
from fedleak.server.payload import check_payload
from fedleak.server.pool import ray_init_args
from fedleak.server.resume import check_resume
from fedleak.server.validate import validate_components


class StudyFailed(RuntimeError):
    """The simulation ended before every configured round was recorded."""


def run_study(
    config: RunConfig,
    *,
    num_clients: int = 10,
    client_cpus: float = 1.0,
    client_gpus: float = 0.0,
    verbose: bool = False,
) -> Path:
    """Simulate `num_clients` clients for the configured rounds; return the run directory."""
    validate_components(config)
    if num_clients < config.train.min_clients:
        raise ValueError(
            f"num-clients={num_clients}: expected at least train.min-clients "
            f"({config.train.min_clients})"
        )
    # Refused before Ray starts: GPU shares that do not exist, rounds over the payload budget.
    init_args = ray_init_args(config, client_cpus, client_gpus)
    check_payload(config, model_spec(config, federated_data(config, 1)), num_clients)
    out = Path(config.out_dir) if config.out_dir else default_run_dir(config)
    config = dataclasses.replace(config, out_dir=str(out))
    if config.sim.resume and (out / "config.toml").exists():
        check_resume(RunDirectory.open(out).config, config, str(out))
    from flwr.simulation import run_simulation

    if not verbose:
        # run_simulation warns that it is deprecated in favour of `flwr run`; both paths are
        # supported here, so the warning is noise for a fedleak user.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # The clients' Ray actors hold the cores; a multi-threaded server thrashes against them
    # (measured here: one IG job 25 s with two threads, 2 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_simulation(
            server_app=make_server_app(config),
            client_app=make_client_app(config),
            num_supernodes=num_clients,
            backend_config={
                "client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
                "init_args": {"logging_level": "ERROR", "log_to_driver": verbose, **init_args},
            },
            verbose_logging=verbose,
        )
    finally:
        torch.set_num_threads(threads)
    done = RunDirectory.open(out).finished_rounds() if (out / "config.toml").exists() else 0
    if done < config.num_server_rounds:
        raise StudyFailed(
            f"the study stopped after {done} of {config.num_server_rounds} rounds; finished "
            f"rounds are kept in {out} (rerun with --set sim.resume=true to continue)"
        )
    return out
