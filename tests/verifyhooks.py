"""Scheduling of Verify's checks made explicit, for tests that count who checked what.

With N processes, ``check_files`` (and Verify's overlap with the image scan) has
N - 1 lanes, each starting its worker process when it takes its first batch, and
the calling thread taking batches from the same queue. Who gets which batch is up
to the scheduler: the calling thread may take every batch before a lane wakes up.
:func:`hold_until_all_take_a_batch` removes that freedom: each worker start and
the calling thread's first check wait, each holding the batch it took, until the
calling thread and every lane have one; so whatever the load, every lane starts
its worker and the calling thread checks a share. The test must hand out more
batches than processes (``_BATCH_COST`` = 1: one file per batch), or it waits
forever (the waits time out with an assertion instead). Workers started early
(Verify of a large image file: ``eager``) start before their lane holds a batch;
the waits then still make every worker start and the calling thread check a
share, but a lane may get no batch.
"""

from __future__ import annotations

import subprocess
import threading

import pytest

from composefsd import objectcheck
from composefsd.repository import verify as verify_mod

#: Longer than any wait a loaded machine can cause; reaching it means a deadlock.
TIMEOUT = 120


class Held:
    """What :func:`hold_until_all_take_a_batch` saw."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        self._arrived = 0
        #: Worker processes started, in order.
        self.started: list[subprocess.Popen[bytes]] = []
        #: Files checked by the calling thread (the main thread).
        self.caller_checked: list[bytes] = []
        self._lock = threading.Lock()
        self._lanes_took = threading.Event()
        self._caller_took = threading.Event()

    def reset(self) -> None:
        with self._lock:
            self.started.clear()
            self.caller_checked.clear()
            self._arrived = 0
            self._lanes_took.clear()
            self._caller_took.clear()

    def on_start(self) -> None:
        """In a lane, before its worker is started (the lane holds a batch)."""
        with self._lock:
            self._arrived += 1
            if self._arrived >= self.lanes:
                self._lanes_took.set()
        assert self._caller_took.wait(TIMEOUT), "the calling thread took no batch"

    def on_caller_check(self, path: bytes) -> None:
        """In the calling thread, before it checks ``path``."""
        if not self.caller_checked:
            self._caller_took.set()
            assert self._lanes_took.wait(TIMEOUT), "not every lane took a batch"
        self.caller_checked.append(path)


def hold_until_all_take_a_batch(monkeypatch: pytest.MonkeyPatch, lanes: int) -> Held:
    """Make the calling thread and each of ``lanes`` lanes (``workers - 1``) take a
    batch before any of them goes on (module notes). Patches ``verify._start_worker`` and
    ``verify._Checker.check``; set it up after any check meant to run unheld."""
    held = Held(lanes)
    real_start = verify_mod._start_worker
    real_check = verify_mod._Checker.check
    main = threading.main_thread()

    def start() -> subprocess.Popen[bytes]:
        held.on_start()
        proc = real_start()
        with held._lock:
            held.started.append(proc)
        return proc

    def check(self: verify_mod._Checker, path: bytes, size: int) -> objectcheck.Wire:
        if threading.current_thread() is main:
            held.on_caller_check(path)
        return real_check(self, path, size)

    monkeypatch.setattr(verify_mod, "_start_worker", start)
    monkeypatch.setattr(verify_mod._Checker, "check", check)
    return held
