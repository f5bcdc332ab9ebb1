"""Keep freed tensor memory in the process instead of handing it back to the kernel.

torch allocates CPU tensors with the C library's malloc. glibc serves every block above 32 MB
(its largest mmap threshold) with a fresh `mmap` and returns it with `munmap` on free, so an
attack loop whose per-iteration buffers pass 32 MB (IG on 64 MLP targets at once: 69 MB of
stacked gradients) page-faults every page of them on every iteration. Measured here (2 cores,
docs/performance.md): 70% of such a run in the kernel, 3.3x the time of the same run with
mmap off and trimming raised. Every fedleak process calls `reuse_freed_memory` at its start
(the CLI, the server and client apps, attack workers); the price is that a process keeps its
peak heap until it exits. `FEDLEAK_HEAP=system` keeps the C library's defaults.
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
# Free memory at the top of the heap is returned to the kernel only above this size.
_TRIM_THRESHOLD = 1 << 30


@functools.cache
def reuse_freed_memory() -> bool:
    """Serve large blocks from the heap and keep what is freed (glibc only; once per
    process). True when the setting took effect."""
    if os.environ.get("FEDLEAK_HEAP", "") == "system" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; both must hold, or large blocks still round-trip.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
