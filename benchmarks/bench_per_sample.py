"""Per-sample gradients: torch.func (vmap over grad) against a Python loop and one batch gradient.

Prints, for LeNet and ResNet-20-GN on 3x32x32 inputs at batch 64 on the CPU, the median time
of each method over several repeats (after a warm-up) and the ratios measured in this run.
Target: vmap at least 3x faster than the loop on LeNet. The loop is the naive baseline (one
autograd pass per sample); max |diff| compares its gradients with vmap's (float32: ReLU kinks
can flip between the two computations, so a ResNet may differ by ~1e-2 on a few coordinates).

    python benchmarks/bench_per_sample.py [--batch 64] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedleak.models import ModelSpec, build_model
from fedleak.training.gradients import batch_gradient, per_sample_gradients


def _median_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up: first-call dispatch and allocation costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """The naive baseline: one ordinary autograd pass per sample."""
    names, params = zip(*model.named_parameters(), strict=True)
    grads = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads.append(dict(zip(names, torch.autograd.grad(loss, params), strict=True)))
    return grads


def bench(name: str, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of vmap, loop and batch gradient for one model."""
    model = build_model(ModelSpec(name, (3, 32, 32), 10, seed=0))
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    vmapped, looped = per_sample_gradients(model, x, y), _loop(model, x, y)
    worst = max(
        (vmapped[k][i] - looped[i][k]).abs().max().item() for k in vmapped for i in range(batch)
    )
    return {
        "vmap": _median_seconds(lambda: per_sample_gradients(model, x, y), repeats),
        "loop": _median_seconds(lambda: _loop(model, x, y), repeats),
        "batch": _median_seconds(lambda: batch_gradient(model, x, y), repeats),
        "max_abs_diff": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet20-gn"])
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        # On a loaded machine, OpenMP threads oversubscribe the cores and timings turn erratic.
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(
        f"{'model':<12} {'vmap ms':>9} {'loop ms':>9} {'batch ms':>9} "
        f"{'loop/vmap':>10} {'vmap/batch':>11} {'max |diff|':>11}"
    )
    for name in args.models:
        r = bench(name, args.batch, args.repeats)
        print(
            f"{name:<12} {r['vmap'] * 1e3:9.1f} {r['loop'] * 1e3:9.1f} {r['batch'] * 1e3:9.1f} "
            f"{r['loop'] / r['vmap']:10.2f} {r['vmap'] / r['batch']:11.2f} "
            f"{r['max_abs_diff']:11.2e}"
        )


if __name__ == "__main__":
    main()
