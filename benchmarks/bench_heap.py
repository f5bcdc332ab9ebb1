"""Freed heap memory reused (fedleak's setting) against glibc's defaults, on IG's batched step.

The case that showed it: IG on the MLP (MNIST shape), one batch of `--targets` B=1 targets
through the inline runner, as GradAttack's B=1 cells attack a round. Its stacked per-target
gradients pass glibc's 32 MB mmap ceiling, so with glibc's defaults every iteration maps,
page-faults and unmaps them (`fedleak/heap.py`). The heap setting is process-wide, so each
variant runs in its own process (`FEDLEAK_HEAP` set or not), alternating round by round,
and attacks from a thread, as the server app does; a process's seconds per target-iteration
come from the difference of a long and a short run.
Besides the ratio it prints the kernel's share of the CPU time and the minor page faults.

    python benchmarks/bench_heap.py [--targets 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attacks import round_of
from timing import (
    HEAP_REUSED,
    Ratio,
    Reading,
    clock,
    difference,
    interleave,
    machine,
    positive,
    run_main,
    table,
    timing_rounds,
)

from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import Budget
from fedleak.server.runner import InlineRunner

SHAPE = (1, 28, 28)
SHORT, LONG = 5, 25


def one_process(targets: int) -> dict[str, float]:
    """This process's seconds per target-iteration (both clocks), kernel seconds and faults."""
    torch.set_num_threads(1)
    jobs, knowledge = round_of("mlp", targets, SHAPE)
    attacks = {"ig": build_attack("ig", {}, seed=0)}

    def run(iterations: int) -> Reading:
        # All targets in one batch (the automatic cap on a CPU would cut the stack to 12 MiB,
        # where glibc's mmap ceiling is not reached): the case the heap setting is about.
        runner = InlineRunner(attacks, knowledge, Budget(iterations, 1e9, False, targets))
        reading = clock(lambda: runner.submit(jobs))
        assert all(r.reconstruction.status == "ok" for r in runner.ready())
        return reading

    run(SHORT)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF)
    short, long = run(SHORT), run(LONG)
    after = resource.getrusage(resource.RUSAGE_SELF)
    per_unit = difference(short, long, (LONG - SHORT) * targets)
    return {
        "wall": per_unit.wall,
        "cpu": per_unit.cpu,
        "kernel": after.ru_stime - before.ru_stime,
        "process": (after.ru_stime + after.ru_utime) - (before.ru_stime + before.ru_utime),
        "faults": (after.ru_minflt - before.ru_minflt) / ((LONG + SHORT) * targets),
        "reused": HEAP_REUSED,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=positive, default=64)
    parser.add_argument("--rounds", type=timing_rounds, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        results: list[dict[str, float]] = []
        thread = threading.Thread(target=lambda: results.append(one_process(args.targets)))
        thread.start()
        thread.join()
        print(json.dumps(results[0]))
        return
    print(
        f"IG on the MLP, {args.targets} B=1 targets in one batch, 1 thread: ms per "
        "target-iteration (min / median), each variant in its own process"
    )
    print(machine())
    details: dict[str, list[dict[str, float]]] = {"reused": [], "glibc defaults": []}

    def variant(name: str, heap: str):
        def measure() -> Reading:
            env = {**os.environ, "FEDLEAK_HEAP": heap}
            child = subprocess.run(
                [sys.executable, __file__, "--child", "--targets", str(args.targets)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode != 0:
                why = (child.stderr.strip().splitlines() or ["no message"])[-1]
                sys.exit(f"bench_heap: the {name} child failed: {why}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
            details[name].append(result)
            return Reading(result["wall"], result["cpu"])

        return measure

    series = interleave(
        {"reused": variant("reused", ""), "glibc defaults": variant("glibc defaults", "system")},
        args.rounds,
        warmup=0,
    )
    ratio = Ratio(series["reused"], series["glibc defaults"])
    cpu = Ratio(ratio.numerator.on("cpu"), ratio.denominator.on("cpu"))
    rows = [["heap", "ms per target-iteration", "kernel share of CPU", "page faults per it"]]
    for name, runs in details.items():
        if any(r["reused"] != (name == "reused") for r in runs):
            sys.exit(f"{name}: the heap setting did not take effect (not glibc?); no ratio")
        kernel = sum(r["kernel"] for r in runs) / sum(r["process"] for r in runs)
        faults = sum(r["faults"] for r in runs) / len(runs)
        rows.append([name, series[name].text(), f"{kernel:.0%}", f"{faults:.0f}"])
    print(table(rows))
    print(f"reused / glibc defaults: wall {ratio.text()}; CPU {cpu.text()}")


if __name__ == "__main__":
    run_main(main)
