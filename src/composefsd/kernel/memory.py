"""Giving freed heap memory back to the kernel (glibc's ``malloc_trim``).

glibc keeps memory that ``free`` returned inside its heaps, and it can hand back
only the top of a heap by itself: a few live objects allocated after a burst of
large buffers (the input of many connections, say) pin everything below them,
so the process's RSS stays at its peak after the buffers are gone.
``malloc_trim(0)`` also returns the free pages in the middle of every heap
(``madvise(MADV_DONTNEED)``), in all arenas. On a C library without it (musl)
:func:`trim_heap` does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["trim_heap"]


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        func = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    func.argtypes = [ctypes.c_size_t]
    func.restype = ctypes.c_int
    trim: Callable[[int], int] = func
    return trim


_TRIM = _malloc_trim()


def trim_heap() -> bool:
    """Return the heap's free pages to the kernel; False if nothing could be returned
    (or the C library cannot do it)."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
