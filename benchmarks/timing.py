"""Measurements that cannot print nonsense: repeated, interleaved, checked before any ratio.

Every benchmark compares variants measured in this run, round by round: each round calls
every variant once, in a rotating order (so none always runs first, right after a pause, or
last), and a variant's value is its seconds per unit (an iteration, a target-iteration, a
gradient). Ratios are taken per round between variants measured moments apart, so a load
change on a shared machine hits both sides of a ratio; the printed ratio is the median of
those paired ratios, beside the ratio of the minima. A ratio is refused, with the reason,
when any round's measurement is non-positive or not finite (e.g. a difference of two runs
whose short run met more load than the long one, `per_unit`), when a series has fewer than
MIN_ROUNDS rounds or its median round took over MAX_SPREAD times its fastest, or when the
paired ratios scatter so much that their median means little (MAX_SCATTER).

Two clocks are read: wall time (what a user waits) and the process's CPU time (what the work
costs, far less sensitive to other jobs on a shared machine; with several threads it adds
theirs up, spinning included). Benchmarks print wall-time ratios, and CPU-time ratios where
the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

from fedleak.heap import reuse_freed_memory
from fedleak.lines import error_line
from fedleak.registry import is_own_error

# Benchmarks measure fedleak as its processes run it (fedleak/heap.py); FEDLEAK_HEAP=system
# measures glibc's defaults instead.
HEAP_REUSED = reuse_freed_memory()

MIN_ROUNDS = 3
# Paired ratios whose interquartile range (their range, below 5 rounds, where quartiles of
# three values are half their range) exceeds this share of their median are refused.
MAX_SCATTER = 0.5
# A series whose median round took this many times its fastest is refused: a load burst, or a
# difference of two runs that fell to noise (0.024 against 29 ms was printed as min / median).
MAX_SPREAD = 4.0
# A difference of two runs whose CPU time exceeds this share of its wall time per thread is a
# measurement the load distorted (`per_unit`); 1.1 leaves room for the clocks' granularity.
MAX_CPU_PER_WALL = 1.1


class InvalidMeasurement(ValueError):
    """A measurement that must not be turned into a ratio (the message says why)."""


@dataclass(frozen=True)
class Reading:
    """Seconds of one measurement on both clocks (NaN where a clock was not read)."""

    wall: float
    cpu: float = math.nan


@dataclass(frozen=True)
class Series:
    """One variant's values (seconds per unit), one per round, on the wall clock, and the
    CPU seconds beside them."""

    name: str
    values: tuple[float, ...]
    cpu: tuple[float, ...] = ()

    def on(self, clock: str) -> Series:
        """The series on `clock` ("wall" or "cpu")."""
        if clock == "wall":
            return self
        return Series(f"{self.name} (cpu)", self.cpu or tuple(math.nan for _ in self.values))

    def problem(self) -> str | None:
        """Why this series is unusable, or None."""
        bad = [v for v in self.values if not (math.isfinite(v) and v > 0)]
        if bad:
            return f"{self.name}: {len(bad)} of {len(self.values)} measurements <= 0 or not finite"
        if len(self.values) < MIN_ROUNDS:
            return f"{self.name}: {len(self.values)} rounds, fewer than {MIN_ROUNDS}"
        if self.median > MAX_SPREAD * self.min:
            return (
                f"{self.name}: its median round took {self.median / self.min:.1f}x its fastest "
                "(a load change, or a measurement of noise)"
            )
        return None

    @property
    def min(self) -> float:
        """The fastest round: closest to the machine's unloaded speed."""
        return min(self.values)

    @property
    def median(self) -> float:
        """The typical round."""
        return statistics.median(self.values)

    def text(self, unit: float = 1e3, label: str = "ms") -> str:
        """`min / median` in the given unit."""
        if self.problem():
            return f"{self.name}: invalid"
        return f"{self.min * unit:.3f} / {self.median * unit:.3f} {label}"

    def rate(self, count: float) -> str:
        """`count` per second at the fastest / the median round, or why there is none."""
        if self.problem():
            return f"invalid ({self.problem()})"
        return f"{count / self.min:8.1f} / {count / self.median:8.1f}"


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator, paired by round."""

    numerator: Series
    denominator: Series

    def paired(self) -> list[float]:
        """The per-round ratios."""
        return [a / b for a, b in zip(self.numerator.values, self.denominator.values, strict=True)]

    def problem(self) -> str | None:
        """Why no ratio may be printed, or None."""
        for series in (self.numerator, self.denominator):
            if (reason := series.problem()) is not None:
                return reason
        paired = sorted(self.paired())
        middle = statistics.median(paired)
        if len(paired) < 5:
            spread, measure = paired[-1] - paired[0], "range"
        else:
            q1, _, q3 = statistics.quantiles(paired, n=4, method="inclusive")
            spread, measure = q3 - q1, "interquartile range"
        if spread > MAX_SCATTER * middle:
            return (
                f"paired ratios scatter too much ({measure} {spread:.2f} around a median of "
                f"{middle:.2f}): the load changed during the run"
            )
        return None

    @property
    def median(self) -> float:
        """The median of the paired per-round ratios."""
        return statistics.median(self.paired())

    @property
    def of_minima(self) -> float:
        """The ratio of the two fastest rounds."""
        return self.numerator.min / self.denominator.min

    def text(self) -> str:
        """The ratio (paired median, and ratio of minima), or why there is none."""
        reason = self.problem()
        if reason is not None:
            return f"no ratio: {reason}"
        return (
            f"{self.median:.2f} (ratio of minima {self.of_minima:.2f}, {len(self.paired())} rounds)"
        )


def _whole_at_least(text: str, low: int, why: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {low}{why}")
    return value


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (a size of 0 measures nothing)."""
    return _whole_at_least(text, 1)


def whole(text: str) -> int:
    """An argparse type: a whole number >= 0 (0: the option is off, or its default)."""
    return _whole_at_least(text, 0)


def timing_rounds(text: str) -> int:
    """An argparse type for a timing's rounds: fewer than MIN_ROUNDS give no ratio at all, and
    such a run measured in full to print only refusals."""
    return _whole_at_least(text, MIN_ROUNDS, " (fewer give no ratio)")


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number > 0")
    return value


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Exit with `main()`'s status; an error fedleak raised on purpose (a setting out of
    range, a model that cannot be built) ends in one line, as the CLI's do, not a traceback."""
    name = os.path.basename(sys.argv[0]).removesuffix(".py")
    try:
        status = main()
    except Exception as error:
        if not is_own_error(error):
            raise
        print(f"{name}: error: {error_line(error)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)


def interleave(
    variants: Mapping[str, Callable[[], Reading | float]], rounds: int, warmup: int = 1
) -> dict[str, Series]:
    """Call every variant once per round in a rotating order; each call returns its seconds per
    unit (a `Reading`, or wall seconds) or raises `InvalidMeasurement` (recorded as NaN,
    which invalidates its series)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            with contextlib.suppress(InvalidMeasurement):
                variants[name]()
    values: dict[str, list[Reading]] = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            try:
                reading = variants[name]()
            except InvalidMeasurement:
                reading = Reading(math.nan, math.nan)
            if not isinstance(reading, Reading):
                reading = Reading(float(reading))
            values[name].append(reading)
    return {
        name: Series(name, tuple(r.wall for r in v), tuple(r.cpu for r in v))
        for name, v in values.items()
    }


def per_unit(run: Callable[[int], Reading], short: int, long: int) -> Callable[[], Reading]:
    """Seconds per unit as the difference of a long and a short run, `run(n)` returning the
    seconds of n units: fixed costs (set-up, label recovery, final evaluation) cancel. A
    non-positive difference on a clock is recorded as NaN (that clock's series is invalid)."""
    if not 0 < short < long:
        raise ValueError(f"short={short}, long={long}: need 0 < short < long")

    def measure() -> Reading:
        return difference(run(short), run(long), long - short)

    return measure


def difference(short: Reading, long: Reading, units: float) -> Reading:
    """Seconds per unit from a short and a long run of `units` more; NaN on a clock where the
    difference is not positive, and on the wall clock where it is below the CPU time per
    thread: CPU time cannot outrun wall time times the threads that spend it, so that is a
    short run slowed by load, not a fast long one (2.2 ms wall beside 3.6 ms of CPU on one
    thread was printed as a minimum, audit EE6; bench_heap took its own difference, EZ1)."""
    wall = (long.wall - short.wall) / units
    cpu = (long.cpu - short.cpu) / units
    if cpu > MAX_CPU_PER_WALL * torch.get_num_threads() * wall:
        wall = math.nan
    return Reading(wall if wall > 0 else math.nan, cpu if cpu > 0 else math.nan)


def clock(work: Callable[[], object]) -> Reading:
    """Run `work` once (CUDA work synchronised) and read both clocks. Python's cyclic garbage
    collector is off meanwhile, as in `timeit`: allocation is deterministic, so a collection
    of 0.1-0.2 s fell in the same round of every run and refused the ratios of 40 ms calls
    (audit EZ2)."""
    sync()
    collecting = gc.isenabled()
    gc.disable()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        sync()
        return Reading(time.perf_counter() - wall, time.process_time() - cpu)
    finally:
        if collecting:
            gc.enable()


def timed(work: Callable[[], object], repeat: int = 1) -> Callable[[], Reading]:
    """Seconds per call of `work` on both clocks, averaged over `repeat` calls."""

    def measure() -> Reading:
        total = clock(lambda: [work() for _ in range(repeat)])
        return Reading(total.wall / repeat, total.cpu / repeat)

    return measure


def chosen_devices(asked: str | None) -> list[str]:
    """`--devices`: as asked, or the CPU and CUDA where this torch sees a GPU. Asking for CUDA
    where there is none exits in one line: a benchmark that measured nothing and exited 0
    would read as a clean run (a GPU session's logs)."""
    if asked is None:
        return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    devices = [d.strip() for d in asked.split(",") if d.strip()]
    if not devices or set(devices) - {"cpu", "cuda"}:
        raise SystemExit(f"--devices={asked!r}: expected cpu, cuda or cpu,cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit(f"--devices={asked!r}: torch {torch.__version__} sees no CUDA device")
    return devices


def chosen_device(asked: str | None) -> torch.device:
    """`--device`: as asked (see `chosen_devices`), or CUDA where there is one."""
    if asked is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if asked not in ("cpu", "cuda"):
        raise SystemExit(f"--device={asked!r}: expected cpu or cuda")
    if asked == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device='cuda': torch {torch.__version__} sees no CUDA device")
    return torch.device(asked)


def sync() -> None:
    """Wait for queued CUDA work, so that wall time covers it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def machine() -> str:
    """The machine in one line: CPU model, cores, torch threads, heap setting, CUDA device,
    load."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, freed memory "
        f"{'reused' if HEAP_REUSED else 'returned (glibc defaults)'}, {cuda}, {load()}"
    )


def load() -> str:
    """The 1/5/15-minute load averages (on a shared machine, read ratios beside them)."""
    if not hasattr(os, "getloadavg"):
        return "load unknown"
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f} {five:.1f} {fifteen:.1f}"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )
