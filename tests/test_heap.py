"""The heap setting every fedleak process starts with: large freed tensors are reused, not
unmapped and page-faulted again on the next iteration."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Allocate, fill and free a 64 MB tensor (above glibc's 32 MB mmap ceiling) 50 times, as an
# attack iteration does with its stacked gradients, and print the minor page faults it cost.
# In a thread started afterwards, as the server app's thread is: threads get their own arenas.
PROBE = """
import resource, threading, torch
from fedleak.heap import reuse_freed_memory
took = reuse_freed_memory()
def iterate():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        torch.ones(16 * 2**20).sum()
    print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=iterate)
thread.start()
thread.join()
"""


def _transparent_huge_pages() -> bool:
    """Whether the kernel backs large allocations with huge pages: one fault per 2 MB."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def _probe(heap: str) -> tuple[str, int]:
    # torch's own switch to huge pages would hide the faults this test counts.
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env |= {"FEDLEAK_HEAP": heap, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
@pytest.mark.skipif(_transparent_huge_pages(), reason="huge pages fault once per 2 MB")
def test_large_freed_tensors_are_reused_without_page_faults() -> None:
    took, tuned = _probe("")
    kept, system = _probe("system")
    assert (took, kept) == ("True", "False")
    pages = 50 * 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    # glibc's defaults fault in every page of every iteration; reused memory only in the first
    # few (measured: 3 to 9 of 50).
    assert system > 0.8 * pages, (system, pages)
    assert tuned < 0.3 * pages, (tuned, pages)
