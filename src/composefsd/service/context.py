"""What a method sees of the call it serves: the peer, its fds, ``more``, cancellation;
and who the peer of a Unix socket is (:func:`peer_credentials`, from
:func:`~composefsd.service.peercred.peer_ids`, which the client asks too).

The transport (:mod:`composefsd.service.transport`) makes one :class:`CallContext`
per call and hands it to the method as ``_request`` (the keyword the ``varlink``
package passes through ``Service.handle``). Methods run in worker threads; the
context is their only link to the connection.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from composefsd.service.peercred import peer_ids

__all__ = [
    "CallCancelled",
    "CallContext",
    "Peer",
    "VarlinkReplyError",
    "peer_credentials",
    "peer_pidfd",
]

_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
#: Linux 6.5: a pidfd of the process that connected (the very process, not its pid).
_SO_PEERPIDFD: Final = getattr(socket, "SO_PEERPIDFD", 77)


@dataclass(slots=True, frozen=True)
class Peer:
    """The connecting process, from SO_PEERCRED (as it was at connect time)."""

    pid: int
    uid: int
    gid: int
    #: Supplementary groups, read from /proc/PID/status at connect time (may be empty).
    groups: frozenset[int] = frozenset()


def _groups_from_proc(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def peer_credentials(sock: socket.socket) -> Peer:
    """The peer of a connected AF_UNIX socket, as it was at connect time.

    Supplementary groups come from SO_PEERGROUPS (or /proc/PID/status). A socket
    without credentials gives uid and gid -1, which no authorization accepts.
    """
    try:
        pid, uid, gid = peer_ids(sock)
    except OSError as e:
        import logging  # here: loading logging costs a client's start several ms

        logging.getLogger(__name__).warning("no peer credentials on fd %d: %s", sock.fileno(), e)
        return Peer(0, -1, -1)
    for count in (64, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, count * 4)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            break
        return Peer(pid, uid, gid, frozenset(struct.unpack(f"{len(raw) // 4}I", raw)))
    return Peer(pid, uid, gid, _groups_from_proc(pid))


def peer_pidfd(sock: socket.socket) -> int:
    """A new pidfd (close-on-exec; the caller closes it) of the process that
    connected ``sock``: it names that process for as long as it is open, whatever
    pids are reused meanwhile. Raises ``OSError`` (``ENOPROTOOPT`` before Linux 6.5)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD, 4)
    return int(struct.unpack("i", raw)[0])


class VarlinkReplyError(Exception):
    """Raise in a method to reply with error ``name`` (a full varlink error name) and
    ``parameters``; the transport turns it into the error reply."""

    def __init__(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(name, parameters)
        self.name = name
        self.parameters = parameters or {}

    def __str__(self) -> str:
        return f"{self.name} {self.parameters}"


class CallCancelled(Exception):
    """The client went away; raised from :meth:`CallContext.check_cancelled` and from
    progress reports so that long work stops at the next safe point."""


@dataclass(slots=True)
class CallContext:
    """One call: who asked, which fds came with it, and how to answer in pieces."""

    peer: Peer
    method: str
    more: bool = False
    oneway: bool = False
    #: fds received with the call, by index; None once taken.
    fds: list[int | None] = field(default_factory=list)
    #: fds to send with the final reply, in index order (the transport closes them).
    out_fds: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: Set by the transport: sends one ``continues`` reply (thread-safe).
    send_continues: Callable[[dict[str, Any]], None] | None = None
    #: Set by the transport: the same with fds, whose ownership it takes.
    send_continues_fds: Callable[[dict[str, Any], list[int]], None] | None = None
    #: Set by the transport: a new pidfd of the connecting process (:func:`peer_pidfd`;
    #: OSError once the connection is closed). The caller closes it.
    peer_pidfd: Callable[[], int] | None = None

    def take_fd(self, index: object, field_name: str) -> int:
        """The fd at ``index``; the caller owns it from now on (and must close it).

        A bad index is the caller's fault: ``org.varlink.service.InvalidParameter``.
        """
        if (
            not isinstance(index, int)
            or isinstance(index, bool)
            or not 0 <= index < len(self.fds)
            or self.fds[index] is None
        ):
            raise VarlinkReplyError(
                "org.varlink.service.InvalidParameter", {"parameter": field_name}
            )
        fd = self.fds[index]
        assert fd is not None
        self.fds[index] = None
        return fd

    def push_fd(self, fd: int) -> int:
        """Send ``fd`` with the final reply; returns its index. Ownership passes to the
        transport, which closes it after sending (or when the call fails)."""
        self.out_fds.append(fd)
        return len(self.out_fds) - 1

    def continues_with_fds(self, parameters: dict[str, Any], fds: list[int]) -> None:
        """Send a ``continues`` reply carrying ``fds`` (sd-varlink allows fds on any
        reply, a stream of them is how a method hands out more than one message can
        carry). Ownership of the fds passes at once: the transport closes them once
        sent, or right away when the reply cannot go (no ``more``, the client
        gone). Replies, with fds or without, leave in the order they are sent."""
        send = self.send_continues_fds
        if not self.more or send is None:
            for fd in fds:
                os.close(fd)
            return
        send(parameters, fds)

    def close_fds(self) -> None:
        """Close every received fd the method did not take, and unsent outgoing ones."""
        for i, fd in enumerate(self.fds):
            if fd is not None:
                self.fds[i] = None
                os.close(fd)
        while self.out_fds:
            os.close(self.out_fds.pop())

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise CallCancelled(f"{self.method}: the client disconnected")

    def progress(self, parameters: dict[str, Any]) -> None:
        """Send a ``continues`` reply if the caller asked for ``more``; always checks
        for cancellation first."""
        self.check_cancelled()
        if self.more and self.send_continues is not None:
            self.send_continues(parameters)
