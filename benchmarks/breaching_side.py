"""The breaching half of `bench_vs_breaching.py`: runs in breaching's own virtual environment.

Started by the benchmark with that environment's Python, it reads one JSON command per line
on stdin and answers one JSON line on its original stdout (everything breaching prints goes
to stderr). It builds the target model with fedleak's own model code (`fedleak.models` needs
only torch, so both tools attack the same architecture with the same weights), computes the
victim's gradient through breaching's user (`compute_local_updates(custom_data=...)`, so
breaching's downloading data loaders are never touched) and times breaching's Inverting
Gradients attack on it.

Commands: {"op": "setup", "model", "init", "seed", "image": [C][H][W] list, "label", "threads"}
          {"op": "run", "iterations"} -> {"seconds", "cpu_seconds", "image"} (the
          reconstruction, in [0, 1]; wall and CPU seconds of breaching's `reconstruct`)
          {"op": "quit"}
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedleak.models import ModelSpec, build_model


class Inputs(torch.nn.Module):
    """breaching's user calls `model(inputs=..., labels=...)`; fedleak's models take `x`."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor, **_: object) -> torch.Tensor:
        return self.net(inputs)


class Side:
    """One attacked image: breaching's server payload, the shared gradient and the attacker."""

    def __init__(self, command: dict) -> None:
        import breaching

        torch.set_num_threads(int(command["threads"]))
        setup = {"dtype": torch.float, "device": torch.device("cpu")}
        image = torch.tensor(command["image"], dtype=torch.float).unsqueeze(0)
        cfg = breaching.get_config(
            overrides=["case=1_single_image_small", "attack=invertinggradients"]
        )
        # fedleak's images live in [0, 1] without normalisation; keep the given weights.
        cfg.case.data.mean = [0.0] * image.shape[1]
        cfg.case.data.std = [1.0] * image.shape[1]
        cfg.case.data.shape = list(image.shape[1:])
        cfg.case.server.model_state = "trained"
        spec = ModelSpec(
            command["model"], tuple(image.shape[1:]), 10, init=command["init"], seed=command["seed"]
        )
        self.model = Inputs(build_model(spec))
        loss = torch.nn.CrossEntropyLoss()
        server = breaching.cases.construct_server(self.model, loss, cfg.case, setup)
        self.payload = server.distribute_payload()
        user = breaching.cases.users.UserSingleStep(
            self.model, loss, None, setup, idx=0, cfg_user=cfg.case.user
        )
        user.data_key = "inputs"
        data = {"inputs": image, "labels": torch.tensor([int(command["label"])])}
        self.shared, _ = user.compute_local_updates(self.payload, custom_data=data)
        self.cfg = cfg
        self.loss = loss
        self.setup = setup

    def run(self, iterations: int) -> dict:
        """breaching's IG for `iterations` on the shared gradient: wall seconds and image."""
        import breaching

        self.cfg.attack.optim.max_iterations = iterations
        self.cfg.attack.optim.callback = 10**9  # no per-iteration logging beyond its own
        attacker = breaching.attacks.prepare_attack(
            self.model, self.loss, self.cfg.attack, self.setup
        )
        start, cpu = time.perf_counter(), time.process_time()
        output, _ = attacker.reconstruct([self.payload], [self.shared], {}, dryrun=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        image = output["data"][0].clamp(0, 1)
        return {"seconds": seconds, "cpu_seconds": cpu, "image": image.tolist()}


def main() -> None:
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever breaching prints lands on stderr
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING)
    side: Side | None = None
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        if command["op"] == "setup":
            side = Side(command)
            reply: dict = {"ok": True, "torch": torch.__version__}
        elif command["op"] == "run" and side is not None:
            reply = side.run(int(command["iterations"]))
        else:
            reply = {"error": f"unknown or early command {command['op']!r}"}
        answer.write(json.dumps(reply) + "\n")
        answer.flush()


if __name__ == "__main__":
    main()
