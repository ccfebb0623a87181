"""Progress reports of long repository operations (CreateImage, Verify, fsck, GC).

A callback receives :class:`Progress` snapshots, a few times a second at most,
always from the thread that called the operation. ``phase`` names the step
(for CreateImage: ``"scan"``, ``"import"``, ``"image"``, ``"sync"``, ``"publish"``);
``done`` and ``total`` count that phase's units (files, bytes or entries, as the
phase's documentation says), ``total`` is None while unknown.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Progress", "ProgressCallback", "Throttle"]


@dataclass(slots=True, frozen=True)
class Progress:
    phase: str
    done: int
    total: int | None = None
    detail: str | None = None


ProgressCallback = Callable[[Progress], None]


class Throttle:
    """Calls a progress callback at most every ``interval`` seconds, except when forced."""

    __slots__ = ("_callback", "_interval", "_next")

    def __init__(self, callback: ProgressCallback | None, interval: float = 0.2) -> None:
        self._callback = callback
        self._interval = interval
        self._next = 0.0

    @property
    def active(self) -> bool:
        return self._callback is not None

    def __call__(
        self,
        phase: str,
        done: int,
        total: int | None = None,
        detail: str | None = None,
        *,
        force: bool = False,
    ) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._interval
        self._callback(Progress(phase, done, total, detail))
