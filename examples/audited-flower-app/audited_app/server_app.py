"""The ServerApp: FedAvg over the clients' new weights.

Audited by fedleak with the lines marked `fedleak`: the import, `fedleak.audit(...)` in place
of `strategy.start(...)` (it wraps the strategy in fedleak's `CuriousStrategy` and writes the
run directory: leakage per round, reconstructions, report), and the settings it runs with.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import fedleak  # fedleak
from audited_app.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation for `num-server-rounds` rounds."""
    cfg = context.run_config
    torch.manual_seed(int(cfg["seed"]))
    initial = ArrayRecord(Net().state_dict())
    train_config = ConfigRecord({"lr": float(cfg["lr"])})
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2)
    # fedleak, in place of: strategy.start(grid=grid, initial_arrays=initial,
    #     num_rounds=int(cfg["num-server-rounds"]), train_config=train_config)
    fedleak.audit(
        grid, strategy, audit_settings(cfg), initial_arrays=initial, train_config=train_config
    )


def audit_settings(cfg: dict) -> dict[str, object]:  # fedleak
    """fedleak's settings for this app (`fedleak config-keys` lists every key)."""
    return {
        "seed": int(cfg["seed"]),
        "num-server-rounds": int(cfg["num-server-rounds"]),
        "model.name": "audited_app.task:Net",  # the app's model, by import path
        "data.dataset": "mnist5k",  # the attacker's auxiliary digits and the test set
        "train.mode": "fedavg",
        "train.lr": float(cfg["lr"]),
        "attack.names": str(cfg["attacks"]),
        "attack.clients-per-round": 0,  # every client
        "attack.rounds": "all",
        "attack.max-iterations": int(cfg["attack-iterations"]),
        "out-dir": str(cfg["out-dir"]),
    }
