"""Returning the memory a pass over a whole library freed to the operating system.

CPython hands blocks above 512 bytes (the tables of large dicts and lists, long strings), and
SQLite its page caches, to the C library's ``malloc``. glibc keeps what is freed for reuse, in
one arena per thread that allocated it: after the index build (on SQLite's thread) or a full
match (partly in a worker thread) the freed memory stays resident, and the next pass, run on
another thread, grows a heap of its own, so the process's resident size becomes the sum of the
passes' peaks rather than the largest. :func:`release_free_memory` asks glibc to hand the free
pages of every arena back (``malloc_trim(0)``); with another C library (musl, macOS) it does
nothing and says so. Live memory is never touched: only pages no allocation uses are released.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from functools import cache

logger = logging.getLogger(__name__)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None when the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the free pages of every malloc arena to the OS; False when not supported.

    Takes a few milliseconds per hundred MB of heap (each arena is locked in turn while it is
    walked): call it from a worker thread (``asyncio.to_thread``) between large passes.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


__all__ = ["release_free_memory"]
