"""Keep freed tensor memory in the process instead of handing it back to the kernel.

torch allocates CPU tensors with the C library's malloc. glibc serves every block above 32 MB
(its largest mmap threshold) with a fresh `mmap` and returns it with `munmap` on free, so an
attack loop whose per-iteration buffers pass 32 MB (IG on 64 MLP targets at once: 69 MB of
stacked gradients) page-faults every page of them on every iteration. Threads meet the same
one level up: a thread's own arena (the server app runs in a thread) lives in mmap'd heaps
that glibc unmaps as soon as they empty, whatever the trim threshold. Measured here
(docs/performance.md): 72% of such an attack's CPU time in the kernel, 3.7x the time of the
same run with one arena for all threads, no mmap and trimming raised. Every fedleak process
calls `reuse_freed_memory` at its start (the CLI, the server and client apps, attack
workers); the price is that a process keeps its peak heap until it exits.
`FEDLEAK_HEAP=system` keeps the C library's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Free memory at the top of the heap is returned to the kernel only above this size.
_TRIM_THRESHOLD = 1 << 30


@functools.cache
def reuse_freed_memory() -> bool:
    """Serve large blocks from the main heap, for every thread, and keep what is freed (glibc
    only; once per process, before it starts threads: a thread that already has its own
    arena keeps it). True when the setting took effect."""
    if os.environ.get("FEDLEAK_HEAP", "") == "system" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; all three must hold, or large blocks still round-trip.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
