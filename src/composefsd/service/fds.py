"""File descriptors in bulk: closing batches of them, and taking them out of the
ancillary data of ``recvmsg`` (SCM_RIGHTS)."""

from __future__ import annotations

# _socket, the C module, rather than socket: the client uses these, and the socket
# module's import costs a client's start 3.5 ms (composefsd.service.client).
import _socket
import array
import errno
import os
from collections.abc import Sequence

__all__ = ["close_all", "fds_from_ancillary", "receive_fds"]


def close_all(fds: Sequence[int | None]) -> None:
    """Close every fd (skipping None), ignoring errors: used on paths that are
    already failing or tearing down, where one bad fd must not keep the others open."""
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def fds_from_ancillary(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """Every fd in the SCM_RIGHTS messages of ``recvmsg``'s ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    return fds


def receive_fds(sock: _socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` of up to ``size`` bytes and ``max_fds`` fds, which arrive
    close-on-exec (``socket.recv_fds`` cannot ask for that). More fds than that are
    closed and raise ``OSError(EMSGSIZE)``."""
    data, anc, flags, _ = sock.recvmsg(
        size, _socket.CMSG_SPACE(max_fds * array.array("i").itemsize), _socket.MSG_CMSG_CLOEXEC
    )
    fds = fds_from_ancillary(anc)
    if flags & _socket.MSG_CTRUNC:
        close_all(fds)
        raise OSError(errno.EMSGSIZE, f"more than {max_fds} file descriptors")
    return data, fds
