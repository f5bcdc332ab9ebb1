"""Which inversion problems are optimised together, and how many fit on the device at once.

A round's jobs of one attack usually share the model and its weights w_t: every attacked
client's targets and restarts can then be stacked along the leading problem dimension and
optimised as one batched problem (`engine`), which on a CPU gives several times the
throughput of one job after another and on a GPU fills the device. `plan` groups compatible
members in submission order and cuts each group into chunks of at most `cap` problems, never
splitting one observation. `automatic_cap` sizes chunks from the free device memory on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

# Problems per chunk on a CPU when the cap is automatic: past this the throughput per
# target-iteration no longer improves (benchmarks/bench_attacks.py), and memory stays small.
CPU_CAP = 128
# Share of the free CUDA memory a chunk may plan to use (the rest absorbs allocator slack).
MEMORY_SHARE = 0.6

M = TypeVar("M")


@dataclass(frozen=True)
class Chunk(Generic[M]):
    """Members optimised as one batch, with their indices in the submitted order."""

    indices: tuple[int, ...]
    members: tuple[M, ...]

    @property
    def size(self) -> int:
        """How many members (observations) the chunk holds."""
        return len(self.members)


def plan(
    members: Sequence[M],
    key: Callable[[M], Hashable],
    same: Callable[[M, M], bool],
    problems: Callable[[M], int],
    cap: int,
) -> list[Chunk[M]]:
    """Group members whose `key` is equal and that are `same` as the group's first (e.g. equal
    weights), in order of first appearance; then cut each group into chunks of at most `cap`
    problems (a member larger than `cap` forms a chunk of its own)."""
    groups: list[list[int]] = []
    heads: dict[Hashable, list[int]] = {}
    for index, member in enumerate(members):
        for group in heads.setdefault(key(member), []):
            if same(members[groups[group][0]], member):
                groups[group].append(index)
                break
        else:
            heads[key(member)].append(len(groups))
            groups.append([index])
    chunks: list[Chunk[M]] = []
    for group in groups:
        current: list[int] = []
        load = 0
        for index in group:
            size = problems(members[index])
            if current and load + size > cap:
                chunks.append(Chunk(tuple(current), tuple(members[i] for i in current)))
                current, load = [], 0
            current.append(index)
            load += size
        chunks.append(Chunk(tuple(current), tuple(members[i] for i in current)))
    return chunks


def problems_that_fit(
    free_bytes: int, bytes_per_problem: float, share: float = MEMORY_SHARE
) -> int:
    """How many problems of `bytes_per_problem` fit in `share` of `free_bytes` (at least 1)."""
    if bytes_per_problem <= 0:
        return CPU_CAP
    return max(1, math.floor(share * free_bytes / bytes_per_problem))


def automatic_cap(
    device: torch.device, probe: Callable[[], int], free_bytes: Callable[[], int] | None = None
) -> int:
    """The chunk size when the configured cap is 0: `CPU_CAP` on a CPU; on CUDA, what fits in
    the free memory given the peak memory of one probe step, `probe()` running one objective
    and backward on a known number of problems and returning that number."""
    if device.type != "cuda":
        return CPU_CAP
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    count = probe()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    free = free_bytes() if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
    return problems_that_fit(free, peak / max(1, count))
