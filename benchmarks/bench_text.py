"""The language task's hot paths, on the paper's 3-layer transformer (1.1M trainable parameters).

Prints, measured in this process (`timing`: the compared variants alternate round by round,
min and median per variant, ratios are medians of the paired rounds or are refused):
1. per-sample gradients of B sequences: fedleak's (`per_sample_gradients`) against a Python loop
   of autograd passes and one batch gradient (sequences per second and ratios);
2. TAG, time per target-iteration: T targets optimised as one batched problem against one
   target at a time (the ratio is the batching gain; seconds per iteration from the difference
   of a long and a short run, so set-up cancels);
3. LTI-P, training pairs per second (fresh pseudo-sequences -> per-sample gradients -> defense
   -> feature hashing) and inverter steps per second (the paper's MLP, batch 64, the trainers'
   fused Adam, against torch's default Adam).
Runs on CUDA as well when a GPU is visible (`--device cuda`).

    python benchmarks/bench_text.py [--vocab 2048] [--length 16] [--batch 16] [--targets 8]
        [--iterations 20] [--pairs 128] [--bins 4096] [--threads 1] [--device cpu] [--rounds 5]
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
    chosen_device,
    clock,
    interleave,
    machine,
    per_unit,
    positive,
    run_main,
    timed,
    timing_rounds,
    whole,
)

from fedleak.attacks.learned.pairs import Featuriser, PairSource, Unit
from fedleak.attacks.learned.text import TokenInverter, sequence_loss
from fedleak.attacks.learned.trainer import inverter_adam
from fedleak.attacks.optimization.tag import TAG, TAGConfig
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.defenses import parse_defense_spec
from fedleak.models import ModelSpec, build_model
from fedleak.training.gradients import batch_gradient, per_sample_gradients
from fedleak.training.loss import task_loss

ROUNDS = 5


def _loop(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The naive baseline: one ordinary autograd pass per sequence."""
    params = [p for _, p in model.named_parameters()]
    return [
        torch.autograd.grad(task_loss(model(x[i : i + 1]), x[i : i + 1]), params)
        for i in range(x.shape[0])
    ]


def per_sample(spec: ModelSpec, batch: int, device: torch.device) -> None:
    model = build_model(spec).to(device)
    x = torch.randint(0, spec.num_classes, (batch, spec.input_shape[0]), device=device)
    series = interleave(
        {
            "per-sample": timed(lambda: per_sample_gradients(model, x, x)),
            "loop": timed(lambda: _loop(model, x)),
            "batch": timed(lambda: batch_gradient(model, x, x)),
        },
        ROUNDS,
    )
    ours, loop, whole = series["per-sample"], series["loop"], series["batch"]
    print(
        f"per-sample gradients, B={batch}, sequences/s (best / median): per-sample "
        f"{ours.rate(batch)}, loop {loop.rate(batch)}, one batch gradient {whole.rate(batch)}"
    )
    print(f"  loop / per-sample {Ratio(loop, ours).text()}")
    print(f"  per-sample / batch {Ratio(ours, whole).text()}")
    print(f"  CPU: per-sample / batch {Ratio(ours.on('cpu'), whole.on('cpu')).text()}")


def _observation(spec: ModelSpec, weights: dict, x: torch.Tensor) -> Observation:
    model = build_model(spec)
    model.load_state_dict(weights)
    update = per_sample_gradients(model, x, x)
    return Observation(
        round=1,
        client_id=0,
        model=spec,
        weights=weights,
        update={k: v.mean(0) for k, v in update.items()},
        update_kind="gradient",
        num_examples=x.shape[0],
        batch_size=x.shape[0],
        local_steps=1,
        learning_rate=0.1,
        defense="none",
        per_sample_updates=update,
        modality="tokens",
    )


def tag(spec: ModelSpec, targets: int, iterations: int, device: torch.device) -> None:
    weights = build_model(spec).state_dict()
    x = torch.randint(0, spec.num_classes, (targets, spec.input_shape[0]))
    knowledge = AttackerKnowledge(x[:0], x[:0], spec.input_shape, spec.num_classes, device=device)
    attack = TAG(TAGConfig(check_every=iterations))
    every, first = _observation(spec, weights, x), _observation(spec, weights, x[:1])

    def run(observation: Observation, share: int):
        def seconds(n: int) -> Reading:
            took = clock(lambda: attack.reconstruct(observation, knowledge, Budget(n, 1e9)))
            return Reading(took.wall / share, took.cpu / share)

        return per_unit(seconds, max(1, iterations // 4), iterations)

    series = interleave({"batched": run(every, targets), "alone": run(first, 1)}, ROUNDS)
    batched, alone = series["batched"], series["alone"]
    print(
        f"TAG, {targets} targets, ms per target-iteration (best / median): batched "
        f"{batched.text()}, one at a time {alone.text()}"
    )
    print(f"  gain (one at a time / batched) {Ratio(alone, batched).text()}")
    print(f"  CPU: gain {Ratio(alone.on('cpu'), batched.on('cpu')).text()}")


def lti_p(spec: ModelSpec, pairs: int, bins: int, device: torch.device, defense: str) -> None:
    model = build_model(spec).to(device)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    featuriser = Featuriser(sizes, bins, 0, False, True)
    unit = Unit("gradient", 1, 1, 1, 0.1)
    pipeline = parse_defense_spec(defense)
    generator = torch.Generator(device=device).manual_seed(0)
    length, vocab = spec.input_shape[0], spec.num_classes

    def fresh() -> torch.Tensor:
        x = torch.randint(0, vocab, (pairs, length), device=device, generator=generator)
        groups = torch.arange(pairs, device=device).unsqueeze(1)
        source = PairSource(model, pipeline, unit, x, x, vocab, groups, featuriser, 32, 1 << 30)
        return source.features(generator)

    pairs_series = interleave({"pairs": timed(fresh)}, ROUNDS)["pairs"]
    inverter = TokenInverter(featuriser.out_features, (600, 1000), length, vocab, 1).to(device)
    features = torch.randn(64, featuriser.out_features, device=device)
    targets = torch.randint(0, vocab, (64, 1, length), device=device)

    def stepper(optimiser: torch.optim.Optimizer):
        def step() -> None:
            loss = sequence_loss(inverter(features), targets)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

        return timed(step, 3)

    # The trainers' optimiser against torch's default Adam on the same inverter.
    series = interleave(
        {
            "shipped": stepper(inverter_adam(inverter, 1e-3)),
            "default": stepper(torch.optim.Adam(inverter.parameters(), lr=1e-3)),
        },
        ROUNDS,
    )
    steps = series["shipped"]
    print(
        f"LTI-P ({defense}, {bins} hash bins), best / median: {pairs_series.rate(pairs)} "
        f"training pairs/s; inverter {steps.rate(1)} steps/s of 64 ({steps.rate(64)} pairs/s)"
    )
    print(f"  inverter step, torch's default Adam / fused {Ratio(series['default'], steps).text()}")


def main() -> None:
    global ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=positive, default=2048)
    parser.add_argument("--length", type=positive, default=16)
    parser.add_argument("--batch", type=positive, default=16)
    parser.add_argument("--rounds", type=timing_rounds, default=ROUNDS)
    parser.add_argument("--targets", type=positive, default=8)
    parser.add_argument("--iterations", type=positive, default=20)
    parser.add_argument("--pairs", type=positive, default=128)
    parser.add_argument("--bins", type=positive, default=4096)
    parser.add_argument("--device", help="cpu or cuda (default: cuda where present)")
    parser.add_argument(
        "--threads", type=whole, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.iterations < 2:  # a short run and a longer one, whose difference is timed
        raise SystemExit(f"--iterations={args.iterations}: expected at least 2")
    ROUNDS = args.rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    device = chosen_device(args.device)
    spec = ModelSpec("transformer3", (args.length,), args.vocab)
    trainable = sum(p.numel() for p in build_model(spec).parameters())
    print(machine())
    print(
        f"{device}; transformer3, V={args.vocab}, L={args.length}, {trainable:,} trainable "
        f"parameters; {ROUNDS} rounds"
    )
    per_sample(spec, args.batch, device)
    tag(spec, args.targets, args.iterations, device)
    lti_p(spec, args.pairs, args.bins, device, "sign")


if __name__ == "__main__":
    run_main(main)
