"""Who is at the other end of a Unix socket: SO_PEERCRED, the one place that reads it.

A module of its own, free of records and of the ``socket`` module, because the
client asks it before every call it sends (:mod:`composefsd.service.client`) and
loads nothing it does not need; the server's :class:`~composefsd.service.context.Peer`
is built from it.
"""

from __future__ import annotations

import _socket
import struct

__all__ = ["peer_ids"]

_UCRED = struct.Struct("3i")


def peer_ids(sock: _socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the peer of the connected AF_UNIX socket ``sock``, as
    they were when the peer connected (or began to listen). Raises ``OSError``."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid
