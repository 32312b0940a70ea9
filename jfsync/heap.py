"""Returning the memory a pass over a whole library freed to the operating system.

CPython hands blocks above 512 bytes (the tables of large dicts and lists, long strings), and
SQLite its page caches, to the C library's ``malloc``. glibc keeps what is freed for reuse, in
one arena per thread that allocated it: after the index build (on SQLite's thread) or a full
match (partly in a worker thread) the freed memory stays resident, and the next pass, run on
another thread, grows a heap of its own, so the process's resident size becomes the sum of the
passes' peaks rather than the largest. :func:`release_free_memory` asks glibc to hand the free
pages of every arena back (``malloc_trim(0)``). :func:`map_large_blocks` keeps blocks of 128 KiB
and more (a large dict's table, a page of rows) out of the arenas altogether: glibc then maps
each one on its own and unmaps it when it is freed, where by default it raises that threshold
after the first such block is freed and lets the next ones pile up in the heap. With another C
library (musl, macOS) both do nothing and return False. Live memory is never touched: only
pages no allocation uses are released. :func:`drain` empties a whole library's container a
slice at a time, so that freeing it never holds the GIL for long.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache
from typing import Any, cast


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None when the C library has none."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


#: ``mallopt`` parameter number of the mmap threshold (glibc's ``M_MMAP_THRESHOLD``).
_M_MMAP_THRESHOLD = -3
#: Blocks from this size on are mapped on their own (glibc's default start value, kept fixed).
LARGE_BLOCK = 128 * 1024


def map_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Have every later allocation of ``threshold`` bytes or more mapped on its own, and
    returned to the OS when freed, for the rest of the process; False when not supported.

    Costs a system call per such block (a few microseconds; the whole-library passes make
    hundreds, not millions).
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None or not hasattr(libc, "malloc_trim"):
        return False  # not glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


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


#: A whole library's keys as a set the cyclic garbage collector never walks: a dict whose keys
#: and values are strings, ints or None is not tracked by the collector, where a set always is.
#: Each collection walks every element of every tracked set it looks at: three sets of 200,000
#: keys made the young collection and then the middle one that found them about 50 ms each,
#: holding the GIL (and the event loop) all along. Add with ``keys[key] = None``.
KeySet = dict[str, None]

#: Elements freed per C call by :func:`drain` (a fraction of a millisecond each).
DRAIN_STEP = 4096


def drain(container: list[Any] | dict[Any, Any] | set[Any]) -> None:
    """Empty ``container`` a slice at a time.

    Freeing a whole library's tuples, dicts or sets at once (``clear()``, or the last
    reference going) is one C call holding the GIL all along: tens of milliseconds at 2 x 200k
    items, during which the event loop cannot run, from whichever thread does it. Emptied in
    slices from Python, the thread lets the loop run every few milliseconds.
    """
    if isinstance(container, list):
        while container:
            del container[-DRAIN_STEP:]
    elif isinstance(container, dict):
        pop = container.popitem
        while container:
            for _ in range(min(DRAIN_STEP, len(container))):
                pop()
    else:
        take = container.pop
        while container:
            for _ in range(min(DRAIN_STEP, len(container))):
                take()


__all__ = [
    "DRAIN_STEP",
    "LARGE_BLOCK",
    "KeySet",
    "drain",
    "map_large_blocks",
    "release_free_memory",
]
