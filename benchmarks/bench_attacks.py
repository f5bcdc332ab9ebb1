"""A round's attacks: 16 clients at B=1 inverted as one batched problem vs one after another.

One FedSGD round of `--clients` clients, each holding one image (B = 1), all attacked by
Inverting Gradients (or `--attack dlg`: DLG, labels optimised jointly as soft labels, L-BFGS)
through the inline runner, as a study runs them: batched (the default:
the round's jobs are stacked into one problem, `attack.max-batch=0`) against one job after
another (`attack.max-batch=1`, each job its own batch, which is what the runner did before
jobs were batched). Seconds per round-iteration come from the difference of a long and a
short run of every job, the variants alternate round by round (`timing.interleave`), and the
printed ratio batched / one-after-another is the median of the paired rounds.
Target: <= 0.2 (the round attacked in at most a fifth of the time), for 16 clients. On CUDA
too when present. The runner computes with one thread, as every server path does (README), so
there is no thread setting.

    python benchmarks/bench_attacks.py [--clients 16] [--models lenet mlp convnet resnet20-gn]
        [--attack ig|dlg] [--devices cpu,cuda] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (
    Ratio,
    Reading,
    chosen_devices,
    clock,
    interleave,
    load,
    machine,
    per_unit,
    positive,
    run_main,
    table,
    timing_rounds,
)

from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.defenses import parse_defense_spec
from fedleak.models import ModelSpec, build_model
from fedleak.server.runner import AttackJob, InlineRunner
from fedleak.training.update import LocalTraining, compute_update

SHAPE = (3, 32, 32)
CLASSES = 10
# Iterations of the short and long runs per model.
LENGTHS = {"lenet": (10, 60), "mlp": (10, 60), "convnet": (3, 13), "resnet20-gn": (3, 13)}
# DLG's L-BFGS step grows with its curvature history (100 pairs): both of its runs go past it,
# so the difference is the steady state a real run (hundreds of iterations) spends its time in.
DLG_LENGTHS = (110, 160)
INIT = {"lenet": "uniform", "resnet20-gn": "default"}


def round_of(
    model: str, clients: int, shape: tuple[int, ...] = SHAPE, attack: str = "ig"
) -> tuple[list[AttackJob], AttackerKnowledge]:
    """One round: every client's B=1 FedSGD update at the same w_t, one job each."""
    spec = ModelSpec(model, shape, CLASSES, init=INIT.get(model, "default"), seed=0)
    net = build_model(spec)
    weights = net.state_dict()
    g = torch.Generator().manual_seed(0)
    jobs = []
    for client in range(clients):
        x = torch.rand(1, *shape, generator=g)
        y = torch.randint(0, CLASSES, (1,), generator=g)
        update = compute_update(
            net, x, y, CLASSES, parse_defense_spec("none"), LocalTraining("fedsgd", 1), g
        )
        observation = Observation(
            round=1,
            client_id=client,
            model=spec,
            weights=weights,
            update=update.update,
            update_kind="gradient",
            num_examples=1,
            batch_size=1,
            local_steps=1,
            learning_rate=0.1,
            defense="none",
        )
        jobs.append(AttackJob(client, attack, observation))
    empty = torch.empty(0, *shape)
    knowledge = AttackerKnowledge(empty, torch.empty(0, dtype=torch.long), shape, CLASSES)
    return jobs, knowledge


def compare(model: str, clients: int, device: str, rounds: int, attack: str = "ig") -> Ratio:
    jobs, knowledge = round_of(model, clients, attack=attack)
    knowledge = AttackerKnowledge(
        knowledge.aux_inputs, knowledge.aux_labels, SHAPE, CLASSES, device=torch.device(device)
    )
    attacks = {attack: build_attack(attack, {}, seed=0)}

    def runner_run(cap: int):
        def run(iterations: int) -> Reading:
            runner = InlineRunner(attacks, knowledge, Budget(iterations, 1e9, False, cap))
            reading = clock(lambda: runner.submit(jobs))
            results = runner.ready()
            assert all(r.reconstruction.status == "ok" for r in results), results[0]
            return reading

        return run

    short, long = DLG_LENGTHS if attack == "dlg" else LENGTHS[model]
    series = interleave(
        {
            "batched": per_unit(runner_run(0), short, long),
            "one after another": per_unit(runner_run(1), short, long),
        },
        rounds,
    )
    return Ratio(series["batched"], series["one after another"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=positive, default=16)
    parser.add_argument("--models", nargs="+", default=["lenet"], choices=sorted(LENGTHS))
    parser.add_argument("--attack", default="ig", choices=["ig", "dlg"])
    parser.add_argument("--devices", help="cpu, cuda or cpu,cuda (default: those present)")
    parser.add_argument("--rounds", type=timing_rounds, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the runner computes: the header says so
    devices = chosen_devices(args.devices)
    print(
        f"A round of {args.clients} clients at B=1 attacked by {args.attack.upper()}: "
        "ms per round-iteration "
        "(min / median), batched vs one after another"
    )
    print(machine())
    rows = [
        [
            "model",
            "device",
            "batched",
            "one after another",
            "batched / one by one",
            "CPU: batched / one by one",
            "load",
        ]
    ]
    for device in devices:
        for model in args.models:
            ratio = compare(model, args.clients, device, args.rounds, args.attack)
            cpu = Ratio(ratio.numerator.on("cpu"), ratio.denominator.on("cpu"))
            rows.append(
                [
                    model,
                    device,
                    ratio.numerator.text(),
                    ratio.denominator.text(),
                    ratio.text(),
                    cpu.text(),
                    load(),
                ]
            )
            print(table(rows[-1:]), flush=True)
            for label, r in (("wall time", ratio), ("CPU time", cpu)):
                if r.problem() is None and args.clients == 16:  # the target's setting
                    verdict = "met" if r.median <= 0.2 else "NOT met"
                    print(
                        f"round of {args.clients} clients at B=1 ({model}, {device}): "
                        f"{r.median:.2f} of the one-after-another {label} "
                        f"(target <= 0.2: {verdict})"
                    )
    print(table(rows))


if __name__ == "__main__":
    run_main(main)
