"""A TCP forwarder to a registry that holds blob responses mid-way until the test
releases them: the handshake the registry pull tests synchronise on (no sleeps).

Unlike :class:`registry.CuttingProxy` (which cuts or stalls for good), a held
response goes on once :meth:`HoldingProxy.release` is called, so a test can
prove that transfers overlap (several held at once), make a second pull wait
for a layer another one is inside, or kill a process while its transfer is
surely under way.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from registry import BlobForwarder

# Generous bounds against a hang, never a timing assertion.
BOUND = 120.0


class HoldingProxy(BlobForwarder):
    """Forwards 127.0.0.1:PORT to ``upstream``; a response to a request naming
    ``/blobs/<digest>`` for one of ``digests`` is held after ``hold_after`` bytes
    (headers included) until :meth:`release`. ``held`` lists the digests of the
    responses held so far (one entry per held response)."""

    def __init__(self, upstream: str, digests: Iterable[str], hold_after: int) -> None:
        self.held: list[str] = []
        self._released = False
        super().__init__(upstream, digests, hold_after)

    def _reached(self, client: socket.socket, upstream: socket.socket, digest: str) -> bool:
        with self._cond:
            self.held.append(digest)
            self._cond.notify_all()
            while not (self._released or self._stopping):
                self._cond.wait()
            return not self._stopping

    def wait_held(self, count: int) -> list[str]:
        """Wait until ``count`` responses are held; returns their digests."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.held) >= count, BOUND)
            assert ok, f"only {len(self.held)} of {count} blob responses were ever held"
            return list(self.held)

    def release(self) -> None:
        """Let every held response (and any later one) go on."""
        with self._cond:
            self._released = True
            self._cond.notify_all()
