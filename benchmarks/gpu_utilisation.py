"""GPU utilisation per benchmark of `gpu_session.sh`: nvidia-smi's samples (timestamp,
utilisation %, memory MiB, every 200 ms) grouped by the start and end marks of each benchmark.

    python benchmarks/gpu_utilisation.py util.csv marks.txt
"""

from __future__ import annotations

import statistics
import sys
from datetime import datetime
from pathlib import Path


def samples(path: Path) -> list[tuple[float, float, float]]:
    """(seconds since the epoch, utilisation %, memory MiB) per nvidia-smi line."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            when = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")  # local time, as printed
            rows.append((when.timestamp(), float(parts[1]), float(parts[2])))
        except ValueError:  # a header, or a line cut when the sampler stopped
            continue
    return rows


def windows(path: Path) -> dict[str, tuple[float, float]]:
    """Benchmark name -> (start, end) from `NAME start|end SECONDS` lines; a line cut when the
    session stopped, and a benchmark without both marks, are left out."""
    marks: dict[str, dict[str, float]] = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[1] not in ("start", "end"):
            continue
        try:
            marks.setdefault(parts[0], {})[parts[1]] = float(parts[2])
        except ValueError:
            continue
    return {name: (m["start"], m["end"]) for name, m in marks.items() if len(m) == 2}


def main(arguments: list[str]) -> int:
    if len(arguments) != 2:
        print("usage: gpu_utilisation.py UTIL_CSV MARKS_TXT", file=sys.stderr)
        return 2
    util, marks = (Path(argument) for argument in arguments)
    for path in (util, marks):
        if not path.is_file():
            why = "not a file" if path.exists() else "no such file"
            print(f"gpu_utilisation: error: {path}: {why}", file=sys.stderr)
            return 2
    rows = samples(util)
    print("GPU utilisation per benchmark (nvidia-smi, 200 ms samples)")
    for name, (start, end) in windows(marks).items():
        inside = [(u, m) for t, u, m in rows if start <= t <= end]
        if not inside:
            print(f"  {name}: no samples")
            continue
        use = [u for u, _ in inside]
        print(
            f"  {name}: {end - start:.0f} s, {len(inside)} samples, utilisation mean "
            f"{statistics.fmean(use):.0f}% median {statistics.median(use):.0f}% max "
            f"{max(use):.0f}%, memory max {max(m for _, m in inside):.0f} MiB"
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
