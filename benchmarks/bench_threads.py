"""Torch intra-op threads and attack speed, on an idle and on a loaded machine.

Runs Inverting Gradients through the public API (`fedleak.reconstruct`) on MNIST with the
sigmoid LeNet (B = 1 and B = 8) and with ResNet-20-GN on 32x32 colour images (B = 1), each with
torch's default thread count and with one thread, first as the machine is, then while
`--load` other processes each keep one core busy (what Ray's client actors do to the server
process of a simulation). Prints seconds per run and the ratio default / one thread; the
runs alternate so that a change of machine load hits both settings alike.

    python benchmarks/bench_threads.py [--iterations 100] [--repeats 3] [--load 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
from torch import nn

import fedleak


def _busy(stop: mp.Event) -> None:  # type: ignore[valid-type]
    torch.set_num_threads(1)
    a = torch.rand(256, 256)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def _case(model_name: str, shape: tuple[int, ...], batch: int) -> tuple[object, int]:
    spec = fedleak.ModelSpec(model_name, shape, 10, seed=0)
    model = fedleak.build_model(spec)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, model.parameters())
    observation = fedleak.observe(model, grads, input_shape=shape, num_examples=batch)
    return observation, sum(p.numel() for p in model.parameters())


def _time(observation: object, iterations: int, threads: int | None) -> float:
    attack = fedleak.build_attack("ig", {"check-every": iterations})
    start = time.perf_counter()
    fedleak.reconstruct(attack, observation, max_iterations=iterations, threads=threads)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", type=int, default=2, help="busy processes in the loaded runs")
    args = parser.parse_args()
    default = torch.get_num_threads()
    print(f"torch default threads: {default}")
    cases = {
        "lenet B=1": _case("lenet", (1, 28, 28), 1),
        "lenet B=8": _case("lenet", (1, 28, 28), 8),
        "resnet20-gn B=1": _case("resnet20-gn", (3, 32, 32), 1),
    }
    for load in (0, args.load):
        stop = mp.Event()
        workers = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(load)]
        for worker in workers:
            worker.start()
        try:
            for label, (observation, size) in cases.items():
                _time(observation, 5, None)  # warm-up
                many, one = [], []
                for _ in range(args.repeats):
                    many.append(_time(observation, args.iterations, default))
                    one.append(_time(observation, args.iterations, 1))
                ratio = statistics.median(many) / statistics.median(one)
                print(
                    f"busy={load} {label:16s} ({size:>7,} params): {default} threads "
                    f"{statistics.median(many):6.2f} s, 1 thread {statistics.median(one):6.2f} s"
                    f" -> default/one = {ratio:4.2f}x"
                )
        finally:
            stop.set()
            for worker in workers:
                worker.join()


if __name__ == "__main__":
    main()
