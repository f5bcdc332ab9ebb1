"""Per-sample gradients against one batched gradient (the floor), vmap and a Python loop.

For the sigmoid LeNet and ResNet-20-GN on 3x32x32 inputs at batch 64, each round times
fedleak's per-sample gradients (`per_sample_gradients`: both models through the written-out
layer chain, each sample a problem), vmap over `grad`, a Python loop of single-sample
gradients and one batch gradient, in a rotating order (`timing.interleave`); ratios are
medians of the paired rounds. Targets:
per-sample / batch <= 1.5 on LeNet and <= 1.3 on ResNet-20-GN; loop / per-sample >= 3 on LeNet.
Accuracy: the largest difference of each method from a float64 loop, and relative to that
sample's gradient norm (vmap rounds some ReLU inputs to the other side of zero on
ResNet-20-GN; fedleak's gradients follow the forward pass the client computes).

    python benchmarks/bench_per_sample.py [--batch 64] [--rounds 7] [--threads 1]
        [--models lenet resnet20-gn] [--devices cpu,cuda]

On CUDA (when visible) the same methods run on the GPU; the float64 reference stays on the
CPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (
    Ratio,
    chosen_devices,
    interleave,
    load,
    machine,
    positive,
    run_main,
    table,
    timed,
    timing_rounds,
)

from fedleak.models import ModelSpec, build_model
from fedleak.training.gradients import (
    batch_gradient,
    per_sample_gradients,
    vmap_per_sample_gradients_with_loss,
)

TARGETS = {"lenet": 1.5, "resnet20-gn": 1.3}
# Built-in models on 3x32x32 images without BatchNorm (which has no per-sample gradient).
MODELS = ["lenet", "convnet", "mlp", "resnet20-gn", "resnet18-gn"]


def loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The naive baseline: one ordinary autograd pass per sample."""
    names, params = zip(*model.named_parameters(), strict=True)
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, params))
    return {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(names)}


def worst(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str:
    """Largest absolute difference, and relative to that sample's float64 gradient norm."""
    norms = torch.sqrt(sum(r.flatten(1).square().sum(dim=1) for r in reference.values()))
    largest, relative = 0.0, 0.0
    for key, value in grads.items():
        diff = (value.cpu().double() - reference[key]).flatten(1).abs().max(dim=1).values
        largest = max(largest, float(diff.max()))
        relative = max(relative, float((diff / norms).max()))
    return f"{largest:.1e} ({relative:.1e} of the norm)"


def bench(name: str, batch: int, rounds: int, device: str) -> list[str]:
    cpu_model = build_model(ModelSpec(name, (3, 32, 32), 10, seed=0)).train()
    generator = torch.Generator().manual_seed(0)
    cpu_x = torch.rand(batch, 3, 32, 32, generator=generator)
    cpu_y = torch.randint(0, 10, (batch,), generator=generator)
    model = copy.deepcopy(cpu_model).to(device)
    x, y = cpu_x.to(device), cpu_y.to(device)
    repeat = 5 if name == "lenet" or device != "cpu" else 1
    series = interleave(
        {
            "per-sample": timed(lambda: per_sample_gradients(model, x, y), repeat),
            "vmap": timed(lambda: vmap_per_sample_gradients_with_loss(model, x, y), repeat),
            "loop": timed(lambda: loop(model, x, y), 1),
            "batch": timed(lambda: batch_gradient(model, x, y), repeat),
        },
        rounds,
    )
    reference = loop(cpu_model.double(), cpu_x.double(), cpu_y)
    ours = Ratio(series["per-sample"], series["batch"])
    verdict = ""
    if ours.problem() is None and name in TARGETS and batch == 64:  # the targets' setting
        verdict = " (met)" if ours.median <= TARGETS[name] else " (NOT met)"
    return [
        name,
        device,
        series["per-sample"].text(),
        series["vmap"].text(),
        series["loop"].text(),
        series["batch"].text(),
        ours.text() + verdict,
        Ratio(series["per-sample"].on("cpu"), series["batch"].on("cpu")).text(),
        Ratio(series["vmap"], series["batch"]).text(),
        Ratio(series["loop"], series["per-sample"]).text(),
        worst(per_sample_gradients(model, x, y), reference),
        worst(vmap_per_sample_gradients_with_loss(model, x, y)[0], reference),
        load(),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive, default=64)
    parser.add_argument("--rounds", type=timing_rounds, default=7)
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet20-gn"], choices=MODELS)
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--devices", help="cpu, cuda or cpu,cuda (default: those present)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = chosen_devices(args.devices)
    print(f"Per-sample gradients, batch {args.batch}: ms per call (min / median)")
    print(machine())
    header = [
        "model",
        "device",
        "per-sample",
        "vmap",
        "loop",
        "batch",
        "per-sample / batch",
        "CPU: per-sample / batch",
        "vmap / batch",
        "loop / per-sample",
        "per-sample vs float64",
        "vmap vs float64",
        "load",
    ]
    rows = [header]
    for device in devices:
        for name in args.models:
            rows.append(bench(name, args.batch, args.rounds, device))
            print(table([header, rows[-1]]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    run_main(main)
