"""Scale: attacks inline vs on the Ray worker pool, and round time vs number of clients.

1. A study of N clients x R rounds attacked by IG on every client, run inline and with
   `attack.workers` = 1, 2 (`--worker-cpus` each), `--repeats` times in a rotating order:
   wall time of each whole study (Ray start-up included; min / median), the paired ratio
   pool / inline (refused when the repeats disagree, `timing`), and the attack throughput.
2. Round time against the number of clients (10, 50, 100) with a tiny MLP and no attacks:
   the median of `round_seconds` over rounds 2..R (round 1 also holds start-up work).
3. On CUDA only: per-sample gradient and IG iteration times on the GPU, and the GPU's
   utilisation sampled by nvidia-smi during a pool study whose clients and worker hold GPU
   shares (written for a CUDA machine; not yet run on one).

Every study runs through `run_study`, as `fedleak run` does. Numbers depend on the machine and
its load; the script prints both, so read ratios from one run only.

    python benchmarks/bench_scale.py [--clients 6] [--rounds 3] [--iterations 200]
        [--workers 1 2] [--worker-cpus 1.0] [--repeats 3] [--scaling 10 50 100]
        [--skip pool scaling gpu]
"""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (
    MIN_ROUNDS,
    InvalidMeasurement,
    Ratio,
    Reading,
    clock,
    interleave,
    machine,
    per_unit,
    positive,
    positive_number,
    run_main,
    timed,
    timing_rounds,
)

from fedleak.config import RunConfig, parse_flat
from fedleak.server.pool import ResourceRequestError, ray_init_args
from fedleak.simulations.launch import run_study


def study(out: Path, num_clients: int, client_gpus: float = 0.0, **flat: object) -> dict:
    """Run one study; its wall time, attack jobs, summed attack seconds and round times."""
    settings = {
        "name": "bench",
        "out-dir": str(out),
        "data.aux-size": 200,
        "train.batch-size": 2,
        "attack.images-per-client": 0,
        "attack.max-seconds": 600.0,
        **flat,
    }
    config: RunConfig = parse_flat(settings)
    start = time.perf_counter()
    run_study(config, num_clients=num_clients, client_gpus=client_gpus)
    wall = time.perf_counter() - start
    leakage = pd.read_parquet(out / "leakage.parquet")
    jobs = leakage.drop_duplicates(["round", "client_id", "attack"])
    utility = pd.read_csv(out / "utility.csv")
    rounds = utility[utility["round"] >= 2].round_seconds
    return {
        "wall": wall,
        "jobs": len(jobs),
        "failed": int((jobs.status != "ok").sum()),
        "attack_seconds": float(jobs.seconds.sum()),
        "round": float(statistics.median(rounds)) if len(rounds) else float("nan"),
    }


def attacks_inline_vs_pool(root: Path, args: argparse.Namespace) -> None:
    print(
        f"\n1. {args.clients} clients x {args.rounds} rounds, IG ({args.iterations} iterations, "
        f"batch 2, LeNet) on every client; {args.repeats} repeats, wall s min / median"
    )
    flat = {
        "num-server-rounds": args.rounds,
        "attack.names": "ig",
        "attack.max-iterations": args.iterations,
    }
    counter = itertools.count()
    jobs: dict[int, int] = {}

    def variant(workers: int):
        def run() -> float:
            pool = {"attack.workers": workers, "attack.worker-cpus": args.worker_cpus}
            r = study(root / f"w{workers}-{next(counter)}", args.clients, **flat, **pool)
            if r["failed"]:
                # A study that attacked fewer samples is not the same work: its time is no
                # measurement, but the other variants' still are.
                print(f"  {r['failed']} attack jobs failed with {workers} workers")
                raise InvalidMeasurement(f"{r['failed']} attack jobs failed")
            jobs[workers] = r["jobs"]
            return r["wall"]

        return run

    names = {0: "inline", **{w: f"pool x{w}" for w in _pools_that_fit(args)}}
    series = interleave({names[w]: variant(w) for w in names}, args.repeats, warmup=0)
    print(f"{'runner':<10} {'wall s':>18} {'jobs':>5} {'jobs/s':>7}")
    for workers, name in names.items():
        wall = series[name]
        # A throughput is a ratio too: none from a series `timing` calls invalid.
        done = jobs.get(workers)
        rate = "invalid" if wall.problem() or done is None else f"{done / wall.median:7.3f}"
        count = "-" if done is None else str(done)
        print(f"{name:<10} {wall.text(1.0, 's'):>18} {count:>5} {rate:>7}")
    for workers in list(names)[1:]:
        ratio = Ratio(series[names[workers]], series["inline"])
        print(f"wall-time ratio pool x{workers} / inline: {ratio.text()}")


def _pools_that_fit(args: argparse.Namespace) -> list[int]:
    """The worker counts this machine can give their CPUs beside one client (1 CPU), as a
    study checks it before Ray starts; each other one is named and skipped, so that it does
    not end the benchmark after the variants before it have run."""
    fit = []
    for workers in args.workers:
        pool = {"attack.workers": workers, "attack.worker-cpus": args.worker_cpus}
        try:
            ray_init_args(parse_flat(pool), client_cpus=1.0, client_gpus=0.0)
        except ResourceRequestError as error:
            print(f"  pool x{workers}: skipped, {error}")
            continue
        fit.append(workers)
    return fit


def round_time_vs_clients(root: Path, args: argparse.Namespace) -> None:
    print(f"\n2. round time vs clients (MLP, no attacks, {args.rounds} rounds)")
    print(f"{'clients':>7} {'round s':>8} {'per client ms':>14} {'study wall s':>13}")
    flat = {"num-server-rounds": args.rounds, "model.name": "mlp", "attack.names": "none"}
    for clients in args.scaling:
        r = study(root / f"clients{clients}", clients, **flat)
        if not math.isfinite(r["round"]):  # round 1 holds start-up work and is not counted
            print(f"{clients:7d} invalid: no round after the first (--rounds >= 2)")
            continue
        print(
            f"{clients:7d} {r['round']:8.2f} {r['round'] / clients * 1e3:14.1f} {r['wall']:13.1f}"
        )


def gpu_kernels(device: torch.device) -> None:
    """Per-sample gradient and IG iteration times on `device` (CUDA in this script; the CPU
    runs the same steps as a check of the script itself)."""
    from fedleak.attacks.registry import build_attack
    from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
    from fedleak.models import ModelSpec, build_model
    from fedleak.training.gradients import batch_gradient, per_sample_gradients

    where = torch.cuda.get_device_name(0) if device.type == "cuda" else str(device)
    print(f"\n3a. on {where}")
    for name in ("lenet", "resnet20-gn"):
        spec = ModelSpec(name, (3, 32, 32), 10, seed=0)
        model = build_model(spec).to(device)
        x = torch.rand(64, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (64,), device=device)
        vmap = interleave(
            {"per-sample": timed(lambda m=model, x=x, y=y: per_sample_gradients(m, x, y), 10)},
            MIN_ROUNDS,
        )["per-sample"]
        print(f"per-sample gradients, {name}, batch 64: {vmap.text()} (min / median)")
        observation = Observation(
            round=1,
            client_id=0,
            model=spec,
            weights={k: v.detach().cpu() for k, v in model.named_parameters()},
            update={k: v.cpu() for k, v in batch_gradient(model, x[:1], y[:1]).items()},
            update_kind="gradient",
            num_examples=1,
            batch_size=1,
            local_steps=1,
            learning_rate=0.1,
            defense="none",
        )
        aux = torch.rand(100, 3, 32, 32, device=device)
        knowledge = AttackerKnowledge(
            aux, torch.randint(0, 10, (100,), device=device), (3, 32, 32), 10, device=device
        )
        attack = build_attack("ig", {}, seed=0)

        def run(iterations: int, o=observation, k=knowledge, a=attack) -> Reading:
            return clock(lambda: a.reconstruct(o, k, Budget(iterations, 600.0)))

        # The difference of 250 and 50 iterations, warmed up and repeated: a first CUDA call
        # holds start-up work, and one difference alone could come out negative.
        ig = interleave({"IG": per_unit(run, 50, 250)}, MIN_ROUNDS)["IG"]
        print(f"IG iteration, {name}, batch 1: {ig.text()} (min / median)")


def gpu_study(root: Path, args: argparse.Namespace) -> None:
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not done.is_set():
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            samples.extend(float(v) for v in out.split() if v.strip())
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    flat = {
        "num-server-rounds": args.rounds,
        "model.name": "resnet20-gn",
        "attack.names": "ig",
        "attack.max-iterations": args.iterations,
        "attack.workers": 1,
        "attack.worker-gpus": 0.1,
    }
    try:
        # Flower packs floor(1 / 0.3) = 3 clients on a GPU and leaves 0.1 for the worker.
        r = study(root / "gpu", args.clients, client_gpus=0.3, **flat)
    finally:
        done.set()
        sampler.join()
    busy = statistics.mean(samples) if samples else float("nan")
    print(
        f"\n3b. GPU study (clients 0.3 GPU, 1 worker x 0.1 GPU): wall {r['wall']:.1f} s, "
        f"{r['jobs'] / r['wall']:.3f} jobs/s, mean GPU utilisation {busy:.0f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=positive, default=6)
    parser.add_argument("--rounds", type=positive, default=3)
    parser.add_argument("--iterations", type=positive, default=200)
    parser.add_argument("--workers", type=positive, nargs="+", default=[1, 2])
    parser.add_argument("--worker-cpus", type=positive_number, default=1.0)
    parser.add_argument("--repeats", type=timing_rounds, default=3)
    parser.add_argument("--scaling", type=positive, nargs="+", default=[10, 50, 100])
    parser.add_argument("--skip", nargs="*", default=[], choices=["pool", "scaling", "gpu"])
    args = parser.parse_args()
    print(machine())
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        if "pool" not in args.skip:
            attacks_inline_vs_pool(root, args)
        if "scaling" not in args.skip:
            round_time_vs_clients(root, args)
        if "gpu" not in args.skip:
            if torch.cuda.is_available():
                gpu_kernels(torch.device("cuda"))
                gpu_study(root, args)
            else:
                print("\n3. no CUDA device: GPU timings and utilisation not measured")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
