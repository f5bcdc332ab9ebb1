"""Inverting Gradients: 64 targets optimised as one batched problem vs one after another.

For the sigmoid LeNet and ResNet-20 (GroupNorm, so that per-sample targets exist) on 3x32x32
inputs, prints the time per iteration of one B=1 target, the time per target-iteration of 64
targets batched, and their throughput ratio (target >= 5x on CPU); on CUDA too when present.
The sequential time is measured on a few targets and is per target, so the ratio compares
like with like. Iteration times are differences between runs of two lengths, so model set-up
and label recovery cancel out.

    python benchmarks/bench_attacks.py [--threads N] [--devices cpu,cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.defenses import parse_defense_spec
from fedleak.models import ModelSpec, build_model
from fedleak.training.update import LocalTraining, compute_update

SHAPE = (3, 32, 32)
CLASSES = 10
TARGETS = 64


def _observation(spec: ModelSpec, count: int, seed: int) -> tuple[Observation, AttackerKnowledge]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(count, *SHAPE, generator=g)
    y = torch.randint(0, CLASSES, (count,), generator=g)
    model = build_model(spec)
    update = compute_update(
        model,
        x,
        y,
        CLASSES,
        parse_defense_spec("none"),
        LocalTraining("fedsgd", count, share="per-sample"),
        g,
    )
    observation = Observation(
        round=0,
        client_id=seed,
        model=spec,
        weights=model.state_dict(),
        update=update.update,
        update_kind="gradient",
        num_examples=count,
        batch_size=count,
        local_steps=1,
        learning_rate=0.1,
        defense="none",
        per_sample_updates=update.per_sample,
    )
    aux = torch.rand(16, *SHAPE, generator=g)
    knowledge = AttackerKnowledge(aux, torch.arange(16) % CLASSES, SHAPE, CLASSES)
    return observation, knowledge


def _seconds(observation, knowledge, device: str, iterations: int) -> float:
    knowledge = AttackerKnowledge(
        knowledge.aux_inputs, knowledge.aux_labels, SHAPE, CLASSES, device=torch.device(device)
    )
    attack = build_attack("ig", {"check-every": max(1, iterations)})
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    attack.reconstruct(observation, knowledge, Budget(iterations, 1e9))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def per_iteration(observation, knowledge, device: str, short: int, long: int) -> float:
    """Seconds per iteration, from the difference of a long and a short run (after warm-up)."""
    _seconds(observation, knowledge, device, 1)
    return (
        _seconds(observation, knowledge, device, long)
        - _seconds(observation, knowledge, device, short)
    ) / (long - short)


def bench(model: str, init: str, device: str, iterations: tuple[int, int], alone: int) -> None:
    spec = ModelSpec(model, SHAPE, CLASSES, init=init, seed=0)
    batched_obs, knowledge = _observation(spec, TARGETS, 0)
    batched = per_iteration(batched_obs, knowledge, device, *iterations) / TARGETS
    singles = [_observation(spec, 1, 1 + i)[0] for i in range(alone)]
    single = sum(per_iteration(o, knowledge, device, *iterations) for o in singles) / alone
    print(
        f"{model:12s} {device:5s} one target {single * 1e3:8.2f} ms/iteration | "
        f"{TARGETS} batched {batched * 1e3:7.3f} ms/target-iteration | "
        f"throughput x{single / batched:5.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--devices", default="cpu,cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {args.threads} CPU threads, devices {devices}")
    for device in devices:
        bench("lenet", "uniform", device, (5, 25), alone=4)
        bench("resnet20-gn", "default", device, (2, 6), alone=2)


if __name__ == "__main__":
    main()
