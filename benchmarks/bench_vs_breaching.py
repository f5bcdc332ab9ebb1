"""fedleak against breaching, side by side: Inverting Gradients on one target (B = 1).

Both tools attack the same model (fedleak's architecture and weights; breaching gets it
through `breaching_side.py`, which runs in breaching's own virtual environment) and the same
image (the first embedded CIFAR-10 image), with each tool's own IG defaults (cosine
matching, total variation, Adam on signed gradients, boxed). Seconds per iteration come from
the difference of a long and a short run, so set-up and label recovery cancel; the two tools
alternate round by round (`timing.interleave`) and the ratio fedleak / breaching is the
median of the paired rounds, on the wall clock and on each process's CPU clock (robust to
other jobs on a shared machine). Target: <= 0.5 (fedleak at least twice as fast).

breaching lives in its own environment (its pins clash with fedleak's):
    python3 -m venv /work/breaching-venv
    /work/breaching-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 breaching==0.1.2
Without it the benchmark says so and exits 0 (CI).

    python benchmarks/bench_vs_breaching.py [--threads 1 2] [--models lenet resnet20-gn]
        [--rounds 5] [--breaching-python PATH] [--quality 2000] [--profile 100]

`--profile N` prints where fedleak's time goes instead (torch's profiler over N iterations,
one per model and thread count; breaching not needed): the operators by their own CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (
    Ratio,
    Reading,
    clock,
    interleave,
    load,
    machine,
    per_unit,
    positive,
    run_main,
    table,
    timing_rounds,
    whole,
)

from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.defenses import parse_defense_spec
from fedleak.metrics.image import psnr
from fedleak.models import ModelSpec, build_model
from fedleak.training.update import LocalTraining, compute_update

HERE = Path(__file__).resolve().parent
# Iterations of the short and long runs per model (the long one ~1-2 s on these CPUs).
LENGTHS = {"lenet": (40, 240), "resnet20-gn": (5, 35)}
INIT = {"lenet": "uniform", "resnet20-gn": "default"}


def find_breaching(given: str | None) -> Path | None:
    """The Python of breaching's environment: --breaching-python, $BREACHING_PYTHON, or a
    `breaching-venv` beside this checkout or one of its parents."""
    if given or os.environ.get("BREACHING_PYTHON"):
        # Absolute: a bare name would be looked up on PATH, not in this folder.
        return Path(given or os.environ["BREACHING_PYTHON"]).absolute()
    for folder in HERE.parents:
        candidate = folder / "breaching-venv" / "bin" / "python"
        if candidate.exists():
            return candidate
    return None


def breaching_missing(python: Path | None) -> str | None:
    """Why breaching cannot run, or None."""
    if python is None:
        return "no breaching environment found (--breaching-python or $BREACHING_PYTHON)"
    if not python.exists():
        return f"no breaching environment at {python} (--breaching-python or $BREACHING_PYTHON)"
    if not (python.is_file() and os.access(python, os.X_OK)):
        return f"{python} is not an executable file; expected the Python of breaching's venv"
    check = subprocess.run(
        [str(python), "-c", "import breaching"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        lines = check.stderr.strip().splitlines() or ["import failed"]
        return f"{python} cannot import breaching: {lines[-1]}"
    return None


class BreachingFailed(RuntimeError):
    """breaching's side of the comparison failed; the message says why, in one line."""


class Breaching:
    """breaching's IG in its own process, driven one JSON line at a time."""

    def __init__(self, python: Path, setup: dict) -> None:
        # A file, not a pipe nobody reads while the side runs: its last line says why it died.
        self.errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as the side does)
        self.process = subprocess.Popen(
            [str(python), str(HERE / "breaching_side.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
        )
        self.ask({"op": "setup", **setup})

    def ask(self, command: dict) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        reply = json.loads(line) if line else {"error": f"it died ({self.last_error()})"}
        if "error" in reply:
            raise BreachingFailed(f"breaching side: {reply['error']}")
        return reply

    def last_error(self) -> str:
        """The last line the side wrote to stderr (its exception, when it died of one)."""
        self.errors.seek(0)
        lines = [line.strip() for line in self.errors.read().splitlines() if line.strip()]
        return lines[-1] if lines else "no message"

    def run(self, iterations: int) -> dict:
        return self.ask({"op": "run", "iterations": iterations})

    def close(self) -> None:
        """Ask the side to quit (it answers nothing) and wait for it."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        self.process.wait(timeout=60)
        self.errors.close()


def victim(model: str, image: torch.Tensor, label: int) -> tuple[Observation, AttackerKnowledge]:
    """fedleak's observation of one client holding `image`, and an attacker without aux data."""
    spec = ModelSpec(model, tuple(image.shape), 10, init=INIT[model], seed=0)
    net = build_model(spec)
    x, y = image.unsqueeze(0), torch.tensor([label])
    update = compute_update(
        net,
        x,
        y,
        10,
        parse_defense_spec("none"),
        LocalTraining("fedsgd", 1),
        torch.Generator().manual_seed(0),
    )
    observation = Observation(
        round=1,
        client_id=0,
        model=spec,
        weights=net.state_dict(),
        update=update.update,
        update_kind="gradient",
        num_examples=1,
        batch_size=1,
        local_steps=1,
        learning_rate=0.1,
        defense="none",
    )
    empty = torch.empty(0, *image.shape)
    knowledge = AttackerKnowledge(empty, torch.empty(0, dtype=torch.long), tuple(image.shape), 10)
    return observation, knowledge


def first_image() -> tuple[torch.Tensor, int]:
    """The first embedded CIFAR-10 test image (foolbox wheel), else a seeded random image."""
    try:
        from fedleak.data import load_dataset

        data = load_dataset("cifar10-foolbox")
        return data.train_x[0].float(), int(data.train_y[0])
    except Exception as error:  # the data carrier is optional here
        print(f"(embedded CIFAR-10 unavailable: {error}; using a random image)")
        return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), 3


def compare(
    model: str, threads: int, python: Path, rounds: int, image: torch.Tensor, label: int
) -> Ratio:
    torch.set_num_threads(threads)
    observation, knowledge = victim(model, image, label)
    attack = build_attack("ig", {}, seed=0)

    def fedleak_run(iterations: int) -> Reading:
        return clock(lambda: attack.reconstruct(observation, knowledge, Budget(iterations, 1e9)))

    def breaching_run(iterations: int) -> Reading:
        reply = other.run(iterations)
        return Reading(reply["seconds"], reply["cpu_seconds"])

    setup = {
        "model": model,
        "init": INIT[model],
        "seed": 0,
        "image": image.tolist(),
        "label": label,
        "threads": threads,
    }
    other = Breaching(python, setup)
    try:
        short, long = LENGTHS[model]
        series = interleave(
            {
                "fedleak": per_unit(fedleak_run, short, long),
                "breaching": per_unit(breaching_run, short, long),
            },
            rounds,
        )
    finally:
        other.close()
    return Ratio(series["fedleak"], series["breaching"])


def quality(model: str, python: Path, iterations: int, image: torch.Tensor, label: int) -> None:
    """PSNR of each tool's reconstruction after `iterations` (one image, one seed each)."""
    observation, knowledge = victim(model, image, label)
    ours = build_attack("ig", {"tv-weight": 1e-2}).reconstruct(
        observation, knowledge, Budget(iterations, 1e9)
    )
    setup = {"model": model, "init": INIT[model], "seed": 0, "threads": torch.get_num_threads()}
    other = Breaching(python, {**setup, "image": image.tolist(), "label": label})
    try:
        theirs = torch.tensor(other.run(iterations)["image"]).unsqueeze(0)
    finally:
        other.close()
    truth = image.unsqueeze(0)
    print(
        f"quality {model}, {iterations} iterations: fedleak {float(psnr(ours.inputs, truth)):.1f} "
        f"dB, breaching {float(psnr(theirs, truth)):.1f} dB"
    )


def profile(model: str, threads: int, iterations: int, image: torch.Tensor, label: int) -> None:
    """fedleak's IG on one target under torch's profiler: operators by their own CPU time, and
    the share of the convolutions (forward, and both gradients of double backpropagation)."""
    torch.set_num_threads(threads)
    observation, knowledge = victim(model, image, label)
    attack = build_attack("ig", {}, seed=0)
    attack.reconstruct(observation, knowledge, Budget(5, 1e9))  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profiler:
        reading = clock(lambda: attack.reconstruct(observation, knowledge, Budget(iterations, 1e9)))
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    convolution = sum(e.self_cpu_time_total for e in events if "conv" in e.key.lower())
    print(
        f"\nprofile {model}, {threads} thread(s), {iterations} iterations: "
        f"{reading.cpu / iterations * 1e3:.2f} ms CPU per iteration (profiled); convolution "
        f"kernels {convolution / total:.0%} of the operators' own CPU time; {load()}"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive, nargs="+", default=[1, 2])
    parser.add_argument(
        "--models", nargs="+", default=["lenet", "resnet20-gn"], choices=sorted(LENGTHS)
    )
    parser.add_argument("--rounds", type=timing_rounds, default=5)
    parser.add_argument("--breaching-python")
    parser.add_argument("--quality", type=whole, default=0, help="also compare PSNR after N its")
    parser.add_argument("--profile", type=whole, default=0, help="profile fedleak over N its")
    args = parser.parse_args()
    if args.profile:
        print(machine())
        image, label = first_image()
        for model in args.models:
            for threads in args.threads:
                profile(model, threads, args.profile, image, label)
        return 0
    python = find_breaching(args.breaching_python)
    print("IG single target (B=1), fedleak vs breaching, ms per iteration (min / median)")
    missing = breaching_missing(python)
    if missing is not None and (args.breaching_python or os.environ.get("BREACHING_PYTHON")):
        # Asked for by name: a silent skip would read as a run that measured nothing wrong.
        print(f"bench_vs_breaching: {missing}", file=sys.stderr)
        return 2
    if missing is not None:
        print(f"skipped: {missing}")
        return 0
    assert python is not None
    print(machine())
    image, label = first_image()
    rows = [
        [
            "model",
            "threads",
            "fedleak",
            "breaching",
            "fedleak / breaching",
            "CPU: fedleak",
            "CPU: breaching",
            "CPU: fedleak / breaching",
            "load after",
        ]
    ]
    worst = {"wall": 0.0, "cpu": 0.0}
    refused = {"wall": 0, "cpu": 0}
    for model in args.models:
        for threads in args.threads:
            ratio = compare(model, threads, python, args.rounds, image, label)
            cpu = Ratio(ratio.numerator.on("cpu"), ratio.denominator.on("cpu"))
            rows.append(
                [
                    model,
                    str(threads),
                    ratio.numerator.text(),
                    ratio.denominator.text(),
                    ratio.text(),
                    cpu.numerator.text(),
                    cpu.denominator.text(),
                    cpu.text(),
                    load(),
                ]
            )
            print(table(rows[-1:]), flush=True)
            for name, r in (("wall", ratio), ("cpu", cpu)):
                if r.problem() is None:
                    worst[name] = max(worst[name], r.median)
                else:
                    refused[name] += 1
    print(table(rows))
    cases = len(args.models) * len(args.threads)
    # Not `label`: that is the image's class, which `quality` below needs (audit EE1).
    for name, measure in (("wall", "wall time"), ("cpu", "CPU time")):
        if refused[name]:  # a verdict over the valid cases only would hide the refused ones
            print(
                f"IG single-target {measure} relative to breaching: no verdict, {refused[name]} "
                f"of {cases} ratios refused (above)"
            )
            continue
        verdict = "met" if worst[name] <= 0.5 else "NOT met"
        print(
            f"IG single-target {measure} relative to breaching: worst {worst[name]:.2f} "
            f"(target <= 0.5: {verdict})"
        )
    if args.quality:
        for model in args.models:
            quality(model, python, args.quality, image, label)
    return 0


def _main() -> int:
    try:
        return main()
    except BreachingFailed as error:
        sys.exit(f"bench_vs_breaching: {error}")


if __name__ == "__main__":
    run_main(_main)
