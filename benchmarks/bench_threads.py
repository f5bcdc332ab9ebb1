"""Torch intra-op threads and attack speed, on an idle and on a loaded machine.

Runs Inverting Gradients through the public API (`fedleak.reconstruct`) on MNIST with the
sigmoid LeNet (B = 1 and B = 8) and with ResNet-20-GN on 32x32 colour images (B = 1), each with
torch's default thread count and with one thread, first as the machine is, then while
`--load` other processes each keep one core busy (what Ray's client actors do to the server
process of a simulation). Prints seconds per run (min / median) and the ratio default / one
thread on the wall and CPU clocks; the two settings alternate round by round (`timing`), so a
change of machine load hits both alike, and a ratio from an invalid measurement is refused.

    python benchmarks/bench_threads.py [--iterations 100] [--rounds 3] [--load 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Ratio, Reading, clock, interleave, machine, positive, run_main, timing_rounds

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


def _run(observation: object, iterations: int, threads: int) -> Reading:
    """Seconds of one attack run (the whole call, set-up included) with `threads`."""
    attack = fedleak.build_attack("ig", {"check-every": iterations})
    return clock(
        lambda: fedleak.reconstruct(attack, observation, max_iterations=iterations, threads=threads)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=positive, default=100)
    parser.add_argument("--rounds", type=timing_rounds, default=3)
    parser.add_argument(
        "--load", type=positive, default=2, help="busy processes in the loaded runs"
    )
    args = parser.parse_args()
    default = torch.get_num_threads()
    if default == 1:  # the two variants would be one setting: their ratio would be noise
        parser.error(
            "torch's default is one thread here (OMP_NUM_THREADS=1, or one core), so there is "
            "nothing to compare; unset OMP_NUM_THREADS on a machine with several cores"
        )
    print(machine())
    print(f"torch default threads: {default}; seconds per run (min / median)")
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
                series = interleave(
                    {
                        "many": lambda o=observation: _run(o, args.iterations, default),
                        "one": lambda o=observation: _run(o, args.iterations, 1),
                    },
                    args.rounds,
                )
                many, one = series["many"], series["one"]
                print(
                    f"busy={load} {label:16s} ({size:>7,} params): {default} threads "
                    f"{many.text(1, 's')}, 1 thread {one.text(1, 's')} -> default / one "
                    f"{Ratio(many, one).text()}; CPU {Ratio(many.on('cpu'), one.on('cpu')).text()}"
                )
        finally:
            stop.set()
            for worker in workers:
                worker.join()


if __name__ == "__main__":
    run_main(main)
