"""Freed means returned: glibc's allocator, told to give freed cache memory back to the operating system."""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def release_freed_memory(threshold: int = 64 * 1024) -> bool:
    """Have glibc serve every allocation of at least `threshold` bytes by a mapping of its own, so that freeing a
    cache (or the tokens a method evicted) returns that memory to the operating system at once; by default glibc
    keeps such memory in the process heap for reuse, raising its threshold as large blocks are freed, and the
    process's resident memory stays high. Process-wide, so importing kvsqueeze never does it: the `kvsqueeze`
    command and the benchmarks call it at start; call it yourself in a long-running process. Returns whether it
    took effect (False where the C library is not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
