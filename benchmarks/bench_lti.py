"""LTI throughput: pair generation, inverter training, feature hashing (all in one process).

Prints, for the sigmoid LeNet (CIFAR shape, 15.8k parameters) and ResNet-20 (BatchNorm,
270k parameters, hashed):
- pair generation in pairs/s (aux gradients at w_t, the defense, block norm, hashing), and for
  FedAvg deltas vectorised vs the client's computation one group at a time;
- inverter training in pairs/s, and its ratio to the plain matrix-multiply bound of the MLP's
  first layer (forward + weight gradient of that layer alone, the cost no implementation avoids);
- hashing in GB/s of float32 gradient, and its ratio to a plain read of the same tensor (sum).

Every figure is the best (and the median) of several rounds; compared variants alternate
round by round and their ratio is the median of the paired rounds, or is refused with the
reason (`timing`).

    .venv/bin/python benchmarks/bench_lti.py [--device cuda] [--pairs 512] [--threads 1]
        [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (
    Ratio,
    Series,
    chosen_device,
    interleave,
    load,
    machine,
    positive,
    run_main,
    timing_rounds,
    whole,
)
from timing import timed as timer

from fedleak.attacks.learned.hashing import FeatureHasher
from fedleak.attacks.learned.inverter import Inverter, inversion_loss
from fedleak.attacks.learned.pairs import Featuriser, PairSource, Unit, make_groups
from fedleak.attacks.learned.trainer import inverter_adam
from fedleak.defenses import parse_defense_spec
from fedleak.models import ModelSpec, build_model, count_parameters
from fedleak.training.update import compute_update

ROUNDS = 5


def alone(fn: Callable[[], object]) -> Series:
    """One variant's rounds."""
    return interleave({"it": timer(fn)}, ROUNDS)["it"]


def pair(first: Callable[[], object], second: Callable[[], object]) -> Ratio:
    """Two variants alternating: the ratio first / second of their seconds."""
    series = interleave({"first": timer(first), "second": timer(second)}, ROUNDS)
    return Ratio(series["first"], series["second"])


def pair_generation(
    name: str, bins: int | None, pairs: int, defense: str, device: torch.device
) -> tuple[Series, int]:
    """pairs/s of featurised defended aux gradients, and the gradient size m."""
    spec = ModelSpec(name, (3, 32, 32), 10, init="uniform" if name == "lenet" else "default")
    model = build_model(spec).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(pairs, 3, 32, 32, generator=gen).to(device)
    y = (torch.arange(pairs) % 10).to(device)
    featuriser = Featuriser(
        {n: p.numel() for n, p in model.named_parameters()}, bins, 0, False, True
    )
    groups = make_groups(pairs, 1, gen, device)
    unit = Unit("gradient", 1, 1, 1, 0.1)
    # A random defense, so every call recomputes (max_cache_bytes=1: nothing is kept).
    source = PairSource(
        model, parse_defense_spec(defense), unit, x, y, 10, groups, featuriser, 64, 1
    )
    noise = torch.Generator(device=device).manual_seed(0)
    return alone(lambda: source.features(noise)), count_parameters(model)


def fedavg_pairs(pairs: int, device: torch.device) -> tuple[Ratio, int]:
    """pairs/s of FedAvg weight deltas (K = 3 steps of 2 over 4 examples, LeNet, prune:0.9):
    the vectorised unroll of `PairSource`, and the client's `compute_update` group by group."""
    spec = ModelSpec("lenet", (3, 32, 32), 10, init="uniform")
    model = build_model(spec).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(pairs, 3, 32, 32, generator=gen).to(device)
    y = (torch.arange(pairs) % 10).to(device)
    pipeline = parse_defense_spec("prune:0.9")
    unit = Unit("delta", 4, 2, 3, 0.1)
    featuriser = Featuriser(
        {n: p.numel() for n, p in model.named_parameters()}, None, 0, False, True
    )
    groups = make_groups(pairs, unit.size, gen, device)
    noise = torch.Generator(device=device).manual_seed(0)

    def vectorised() -> None:
        PairSource(model, pipeline, unit, x, y, 10, groups, featuriser, 256, 1).features(noise)

    def one_by_one() -> None:
        for group in groups:
            compute_update(model, x[group], y[group], 10, pipeline, unit.training(), noise)

    return pair(one_by_one, vectorised), groups.shape[0]


def training(
    in_features: int, hidden: tuple[int, ...], pairs: int, batch: int, device: torch.device
) -> Ratio:
    """Seconds of one epoch of inverter training over those of the first layer's matmuls."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(pairs, in_features, generator=gen).to(device)
    images = torch.rand(pairs, 1, 3, 32, 32, generator=gen).to(device)
    labels = (torch.arange(pairs) % 10).reshape(pairs, 1).to(device)
    inverter = Inverter(in_features, hidden, (3, 32, 32), 1, 10).to(device)
    optimiser = inverter_adam(inverter, 1e-4)

    def epoch() -> None:
        for start in range(0, pairs, batch):
            rows = slice(start, start + batch)
            out, logits = inverter(features[rows])
            loss = inversion_loss(out, logits, images[rows], labels[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

    weight = torch.randn(hidden[0], in_features, generator=gen).to(device)
    upstream = torch.randn(batch, hidden[0], generator=gen).to(device)

    def first_layer() -> None:
        for start in range(0, pairs, batch):
            chunk = features[start : start + batch]
            chunk @ weight.T  # forward
            upstream[: chunk.shape[0]].T @ chunk  # weight gradient (its input needs none)

    return pair(epoch, first_layer)


def hashing(
    m: int, rows: int, bins: int, signed: bool, device: torch.device
) -> tuple[Ratio, float]:
    """Seconds of hashing [rows, m] float32 over those of summing it (a plain read), and the
    gigabytes read."""
    x = torch.randn(rows, m, generator=torch.Generator().manual_seed(0)).to(device)
    hasher = FeatureHasher(m, bins, seed=0, signed=signed)
    return pair(lambda: hasher(x), lambda: x.sum(1)), x.numel() * 4 / 1e9


def pair_count(text: str) -> int:
    """`--pairs`: FedAvg's training pairs are groups of 4 examples, so at least 4 (2 failed
    after the first table, with a traceback)."""
    if positive(text) < 4:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 4")
    return int(text)


def main() -> None:
    global ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cpu or cuda (default: cuda where present)")
    parser.add_argument("--pairs", type=pair_count, default=512)
    parser.add_argument("--threads", type=whole, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--rounds", type=timing_rounds, default=ROUNDS)
    args = parser.parse_args()
    ROUNDS = args.rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    device = chosen_device(args.device)
    print(f"LTI throughput on {device}, pairs {args.pairs}; rates best / median of {ROUNDS} rounds")
    print(machine())

    print("\npair generation (aux gradients -> defense gauss:0.1 -> block norm -> features)")
    for name, bins in (("lenet", None), ("lenet", 4096), ("resnet20", 4096), ("resnet20", 27_000)):
        series, m = pair_generation(name, bins, args.pairs, "gauss:0.1", device)
        print(f"  {name:9s} m={m:7d} features={bins or m:6d}: {series.rate(args.pairs)} pairs/s")

    ratio, count = fedavg_pairs(args.pairs, device)
    print(
        f"  lenet     FedAvg deltas (K=3, 4 examples): {ratio.denominator.rate(count)} pairs/s "
        f"vectorised, {ratio.numerator.rate(count)} one group at a time; "
        f"speed-up {ratio.text()}"
    )

    print("\ninverter training (one epoch, Adam; bound = first layer's two matmuls alone)")
    settings = [
        ("LeNet raw, cpu preset", 15_826, (1000,), 32),
        ("hashed 4096, cpu preset", 4096, (1000,), 32),
        ("hashed 4096, cpu-small", 4096, (500,), 32),
        ("ResNet-20 hashed 10%, paper MLP", 27_000, (3000, 3000), 256),
        ("LeNet raw, paper MLP", 15_826, (3000, 3000), 256),
    ]
    for label, features, hidden, batch in settings:
        ratio = training(features, hidden, args.pairs, batch, device)
        print(
            f"  {label:32s}: {ratio.numerator.rate(args.pairs)} pairs/s; bound "
            f"{ratio.denominator.rate(args.pairs)} pairs/s; epoch / bound {ratio.text()}"
        )

    print("\nfeature hashing of 256 rows (GB/s of float32 gradient; ratio to a plain read)")
    for label, m in (("LeNet", 15_826), ("ResNet-20", 269_722)):
        for bins, signed in ((1024, False), (1024, True), (27_000, False), (27_000, True)):
            ratio, gigabytes = hashing(m, 256, bins, signed, device)
            kind = "signed" if signed else "plain"
            print(
                f"  {label:9s} m={m:7d} -> {bins:6d} bins {kind:6s}: "
                f"{ratio.numerator.rate(gigabytes)} GB/s (read "
                f"{ratio.denominator.rate(gigabytes)} GB/s); hashing / read {ratio.text()}"
            )
    print(load())


if __name__ == "__main__":
    run_main(main)
