"""A TCP forwarder to a registry that holds blob responses mid-way until the test
releases them: the handshake the registry pull tests synchronise on (no sleeps).

Unlike :class:`registry.CuttingProxy` (which cuts or stalls for good), a held
response goes on once :meth:`HoldingProxy.release` is called, so a test can
prove that transfers overlap (several held at once), make a second pull wait
for a layer another one is inside, or kill a process while its transfer is
surely under way.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable

# Generous bounds against a hang, never a timing assertion.
BOUND = 120.0


class HoldingProxy:
    """Forwards 127.0.0.1:PORT to ``upstream``; a response to a request naming
    ``/blobs/<digest>`` for one of ``digests`` is held after ``hold_after`` bytes
    (headers included) until :meth:`release`. ``held`` lists the digests of the
    responses held so far (one entry per held response)."""

    def __init__(self, upstream: str, digests: Iterable[str], hold_after: int) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._needles = {f"/blobs/{d}".encode(): d for d in digests}
        self._hold_after = hold_after
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.held: list[str] = []
        self._cond = threading.Condition()
        self._released = False
        self._stopping = False
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._cond:
                if self._stopping:
                    client.close()
                    upstream.close()
                    return
                self._open += [client, upstream]
            # The digest the current request on this connection asks for.
            armed: list[str | None] = [None]
            self._start(self._requests, client, upstream, armed)
            self._start(self._responses, client, upstream, armed)

    def _requests(
        self, client: socket.socket, upstream: socket.socket, armed: list[str | None]
    ) -> None:
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)
                return
            for needle, digest in self._needles.items():
                if needle in data:
                    armed[0] = digest
            try:
                upstream.sendall(data)
            except OSError:
                return

    def _responses(
        self, client: socket.socket, upstream: socket.socket, armed: list[str | None]
    ) -> None:
        sent = 0
        holding: str | None = None
        while True:
            try:
                data = upstream.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                return
            if holding is None and armed[0] is not None:
                holding, sent = armed[0], 0
            if holding is not None and sent >= 0:
                room = self._hold_after - sent
                if len(data) >= room:
                    try:
                        client.sendall(data[:room])
                    except OSError:
                        return
                    data = data[room:]
                    with self._cond:
                        self.held.append(holding)
                        self._cond.notify_all()
                        while not (self._released or self._stopping):
                            self._cond.wait()
                        if self._stopping:
                            return
                    sent = -1  # once per connection
                else:
                    sent += len(data)
            try:
                client.sendall(data)
            except OSError:
                return

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

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            sockets = list(self._open)
            self._cond.notify_all()
        for s in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join()
        for s in [self._listener, *sockets]:
            s.close()

    def __enter__(self) -> HoldingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
