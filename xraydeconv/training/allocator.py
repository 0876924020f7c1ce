"""Keep freed memory for reuse: glibc's malloc settings for a training process.

By default glibc hands every block of 32 MiB and more to the system when it is freed (a fresh ``mmap`` each time),
adapts that limit to the sizes freed so far, and trims its heap whenever the free space at the top passes twice the
limit. A training step allocates and frees the same feature maps every step, so most of them come back as fresh
pages that fault on first touch (docs/training.md has the measured cost), and how many faults a step takes depends on
the order of earlier allocations, not on the work. With no ``mmap`` for blocks
and a trim threshold of 2 GiB, the step reuses the memory of the step before and takes no faults after the first.
The price is that the process keeps its peak memory until it exits, which a training run does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # bytes: mallopt takes an int
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory for reuse (process-wide); return what was done, in words.

    Nothing changes where the allocator is not glibc's, where another allocator is preloaded, or where the user
    set glibc's own ``MALLOC_*_`` tuning variables.
    """
    if not sys.platform.startswith("linux"):
        return "allocator left as it is: not Linux"
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        return "allocator left as it is: another allocator is preloaded"
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return "allocator left as it is: MALLOC_*_ variables are set"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return "allocator left as it is: not glibc"
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    return "glibc malloc keeps freed memory for reuse" if ok else "allocator left as it is: mallopt refused"
