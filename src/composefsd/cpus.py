"""How many CPUs this process may use: the one home of that number, kept apart from
:mod:`composefsd.workerproc` (which re-exports it) so that ``mkcomposefs --help``
can print it without loading the worker plumbing."""

from __future__ import annotations

import os

__all__ = ["cpus"]


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask): how many lanes pay off."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except OSError:
        return os.cpu_count() or 1
