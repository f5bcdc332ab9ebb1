"""The ServerApp: FedAvg over the clients' new weights.

Audited by fedleak with the lines marked `fedleak`: the imports, `fedleak.audit(...)` in place
of `strategy.start(...)` (it wraps the strategy in fedleak's `CuriousStrategy` and writes the
run directory: leakage per round, reconstructions, report), the settings it runs with, and
the data its server may use (digits no client holds).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import fedleak  # fedleak
from audited_app.task import Net, held_out
from fedleak.data import ImageDataset  # fedleak

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


@fedleak.register_dataset(  # fedleak
    "audited-app-digits",
    holdout=False,
    uses_data_dir=False,
    input_shape=(1, 28, 28),
    num_classes=10,
    replace=True,  # the module may be imported again in one process
)
def held_out_digits(_root: object, _download: bool) -> ImageDataset:
    """What fedleak's server may use of the app's data: the test digits for the global model's
    accuracy, and the public digits for the attacker's auxiliary data. Neither holds a client's
    digit, so the accuracy is held out and no attack is handed a private image."""
    test_x, test_y, public_x, public_y = held_out()
    return ImageDataset(
        name="audited-app-digits",
        train_x=public_x,  # fedleak draws the attacker's auxiliary digits from these
        train_y=public_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=10,
        class_names=tuple("0123456789"),
        source="audited_app.task.held_out",
    )


def audit_settings(cfg: dict) -> dict[str, object]:  # fedleak
    """fedleak's settings for this app (`fedleak config-keys` lists every key)."""
    return {
        "seed": int(cfg["seed"]),
        "num-server-rounds": int(cfg["num-server-rounds"]),
        "model.name": "audited_app.task:Net",  # the app's model, by import path
        "data.dataset": "audited-app-digits",  # the test set and the attacker's aux digits
        "data.aux-size": 500,  # of its 1,000 public digits
        "train.mode": "fedavg",
        "train.lr": float(cfg["lr"]),
        "attack.names": str(cfg["attacks"]),
        "attack.clients-per-round": 0,  # every client
        "attack.rounds": "all",
        "attack.max-iterations": int(cfg["attack-iterations"]),
        "out-dir": str(cfg["out-dir"]),
    }
