"""Freed means returned: the memory a cache (or what a method evicted) freed, given back to the operating system."""

from __future__ import annotations

import ctypes
import sys
from functools import cache


@cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Give the memory this process has freed back to the operating system now (glibc's `malloc_trim`).

    glibc keeps freed blocks in the process heap for reuse, so after a cache is deleted (or a method evicts
    half of one) the resident memory stays as high as before. kvsqueeze calls this after every compression
    (`compress`, `compress_each`) and the server when it drops a context; call it after deleting a context
    yourself. It costs a few milliseconds (6 ms after a 2,048-token prefill) and changes nothing else: between
    calls glibc allocates at full speed. (An earlier version had glibc map every allocation of 64 KiB or more
    on its own, which returned freed memory at once but made every prefill about 30% slower.) Returns whether
    memory could be returned (False where the C library is not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
