"""Which inversion problems are optimised together, and how many fit on the device at once.

A round's jobs of one attack usually share the model and its weights w_t: every attacked
client's targets and restarts can then be stacked along the leading problem dimension and
optimised as one batched problem (`engine`), which on a CPU gives several times the
throughput of one job after another and on a GPU fills the device. `plan` groups compatible
members in submission order and cuts each group into chunks of at most `cap` problems, never
splitting one observation. `automatic_cap` sizes chunks from the free device memory on CUDA
and from the size of a problem's update on a CPU.
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
# ...and at most this many bytes of stacked updates: an iteration streams them several times
# (the dummy updates, the matching loss and its gradient), and once a stack outgrows the
# caches a batch costs more than its problems one after another. Measured on a round of 16
# B = 1 clients, 1 thread, ms per round-iteration for chunks of 1 / 2-4 / 16 problems: the
# MLP (3.4 MB a problem) 56-60 / 52-58 / 73, ResNet-20-GN (1.1 MB) 537 / 302-444 / 269 (11
# problems: 261); sigmoid LeNet (63 kB) stacks all 16 (docs/performance.md).
CPU_STACK_BYTES = 12 * 2**20
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
    device: torch.device,
    probe: Callable[[], int],
    free_bytes: Callable[[], int] | None = None,
    update_bytes: int = 0,
) -> int:
    """The chunk size when the configured cap is 0. On a CPU, as many problems as keep their
    stacked updates (`update_bytes` each) within `CPU_STACK_BYTES`, at most `CPU_CAP`; on CUDA,
    what fits in the free memory given the peak memory of one probe step, `probe()` running
    one objective and backward on a known number of problems and returning that number."""
    if device.type != "cuda":
        return min(CPU_CAP, problems_that_fit(CPU_STACK_BYTES, update_bytes, share=1.0))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    count = probe()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    free = free_bytes() if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
    return problems_that_fit(free, peak / max(1, count))
