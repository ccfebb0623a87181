"""A small synchronous Varlink client over AF_UNIX, with file-descriptor passing.

Used by ``composefsctl`` (and handy in tests and scripts)::

    with connect("/run/composefs/io.composefs.Repository") as conn:
        info = conn.call("io.composefs.Repository.Describe")
        for reply in conn.call("io.composefs.Repository.Verify", {}, more=True):
            ...

Addresses: a socket path, ``unix:PATH`` (``unix:@NAME`` for an abstract socket),
or ``exec:PATH``, which starts PATH with a connected socket on fd 3 and
``LISTEN_FDS=1``, ``LISTEN_FDNAMES=varlink`` and ``LISTEN_PID`` set to the
child's pid, as ``varlinkctl call exec:PATH`` does. A plain path that is an
executable file rather than a socket is treated like ``exec:``.

Whom it talks to: a Unix socket whose server (SO_PEERCRED, as it was when it
began to listen) is neither root nor our own uid is refused with
:class:`VarlinkUntrustedError` before anything is sent, since anyone who could
put a socket at that path could be listening there: a call, and above all an
fd sent with it, would go to them. ``check_directory=True`` (for addresses
nobody chose, like :func:`default_address`) also refuses a socket whose
directory another user could change (:func:`~composefsd.service.runtime.check_directory`).
An ``exec:`` server is our own child on a socketpair.

The wire format is :class:`composefsd.service.codec.ClientConnection`; this
module does the socket I/O, timeouts and trust checks. File descriptors
travel as SCM_RIGHTS with the first byte of the message they belong to, and
those of one read go to the first reply that starts in it, as in sd-varlink
(the codec's module notes); fds that come with a reply are attached to it
(:attr:`Reply.fds`) and belong to the caller from then on. Error replies raise
:class:`VarlinkCallError`.

A :class:`Connection` is not thread-safe: use one per thread. While the
replies of a ``more`` call are being iterated the connection is busy;
abandoning that iteration closes the connection (the server then cancels the
call, which is what a client that goes away means in Varlink).
"""

from __future__ import annotations

# The socket is _socket's, the C type the socket module wraps: the client needs
# none of what that module adds, and importing it (selectors, and enums of every
# address family, socket type and flag) cost 12.6 million instructions, 3.5 ms of
# each composefsctl start. socket.socket objects are _socket.socket objects too.
import _socket
import array
import enum
import errno
import json
import os
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, Literal, overload

from composefsd.service.codec import (
    MAX_MESSAGE_SIZE,
    ClientConnection,
    MessageTooLarge,
    ProtocolError,
    parse_reply,
)
from composefsd.service.fds import close_all, receive_fds
from composefsd.service.peercred import peer_ids

__all__ = [
    "INTERFACE",
    "Connection",
    "Reply",
    "VarlinkCallError",
    "VarlinkClientError",
    "VarlinkConnectError",
    "VarlinkDisconnected",
    "VarlinkProtocolError",
    "VarlinkTimeout",
    "VarlinkUntrustedError",
    "connect",
    "default_address",
    "spawn",
]


#: The composefsd interface.
INTERFACE: Final = "io.composefs.Repository"
#: sd-varlink's default call timeout, in seconds.
DEFAULT_TIMEOUT: Final = 45.0
#: Most fds taken from one read (the kernel's SCM_MAX_FD). The largest reply
#: accepted is the codec's MAX_MESSAGE_SIZE (imported here under that name).
MAX_FDS: Final = 253

_RECV_SIZE = 256 * 1024


class _Inherit(enum.Enum):
    """The default of ``timeout`` arguments: the connection's timeout."""

    CONNECTION = 0


class VarlinkClientError(Exception):
    """Any failure of the client: connecting, the connection, or an error reply."""


class VarlinkConnectError(VarlinkClientError):
    """The address cannot be reached (no socket, refused, not permitted, ...)."""

    def __init__(self, address: str, message: str, err: int | None = None) -> None:
        super().__init__(f"cannot connect to {address}: {message}")
        self.address = address
        self.errno = err


class VarlinkUntrustedError(VarlinkClientError):
    """The socket at ``address`` may belong to someone else: its server runs as
    ``peer_uid`` (neither root nor us), or its directory is not under root's or our
    control. Nothing was sent to it."""

    def __init__(self, address: str, reason: str, peer_uid: int | None = None) -> None:
        super().__init__(f"refusing {address}: {reason}")
        self.address = address
        self.reason = reason
        self.peer_uid = peer_uid


class VarlinkDisconnected(VarlinkClientError):
    """The server closed the connection (or it broke) before the reply came."""


class VarlinkProtocolError(VarlinkClientError):
    """The server sent something that is not a valid Varlink reply."""


class VarlinkTimeout(VarlinkClientError, TimeoutError):
    """No reply within the timeout; the connection is closed."""


class VarlinkCallError(VarlinkClientError):
    """The server answered with error ``name`` (fully qualified) and ``parameters``."""

    def __init__(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self.name = name
        self.parameters: dict[str, Any] = parameters or {}
        super().__init__(name, self.parameters)

    def __str__(self) -> str:
        if not self.parameters:
            return self.name
        return f"{self.name} {json.dumps(self.parameters, sort_keys=True)}"


class Reply(dict[str, Any]):
    """The parameters of one reply, plus :attr:`fds` (received with it, owned by the
    caller: close them or :meth:`take_fd` them) and :attr:`continues`."""

    __slots__ = ("continues", "fds")

    def __init__(
        self, parameters: Mapping[str, Any], fds: Sequence[int] = (), continues: bool = False
    ) -> None:
        super().__init__(parameters)
        self.fds: list[int | None] = list(fds)
        self.continues = continues

    def take_fd(self, field_name: str) -> int:
        """The fd whose index is in field ``field_name``; the caller owns it from now on."""
        index = self.get(field_name)
        if (
            not isinstance(index, int)
            or isinstance(index, bool)
            or not 0 <= index < len(self.fds)
            or self.fds[index] is None
        ):
            raise VarlinkProtocolError(
                f"reply field {field_name!r} = {index!r} names no received fd "
                f"({len(self.fds)} came with the reply)"
            )
        fd = self.fds[index]
        assert fd is not None
        self.fds[index] = None
        return fd

    def close_fds(self) -> None:
        """Close every received fd not taken."""
        for i, fd in enumerate(self.fds):
            if fd is not None:
                self.fds[i] = None
                os.close(fd)


def default_address(uid: int | None = None) -> str:
    """Where composefsd listens by default
    (:func:`~composefsd.service.runtime.default_socket_path`):
    ``/run/composefs/io.composefs.Repository`` for root,
    ``$XDG_RUNTIME_DIR/composefs/io.composefs.Repository`` otherwise
    (``/tmp/composefs-$UID/...`` without an absolute XDG_RUNTIME_DIR)."""
    # Here: the runtime module loads pathlib, which a command given --connect skips.
    from composefsd.service.runtime import default_socket_path

    return str(default_socket_path(uid))


class Connection:
    """One Varlink connection. Make it with :func:`connect`."""

    def __init__(
        self,
        sock: _socket.socket,
        *,
        address: str = "",
        timeout: float | None = DEFAULT_TIMEOUT,
        pid: int | None = None,
    ) -> None:
        self._sock: _socket.socket | None = sock
        self.address = address
        #: Default per-reply timeout in seconds (None: wait forever).
        self.timeout = timeout
        #: The server process started for an ``exec:`` address.
        self.pid = pid
        self._wire = ClientConnection(MAX_MESSAGE_SIZE, MAX_FDS)
        self._eof = False
        self._busy = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._sock is not None:
            self._abort()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        if self._sock is None:
            raise VarlinkDisconnected(f"{self.address}: the connection is closed")
        return self._sock.fileno()

    def close(self, wait: float = 5.0) -> None:
        """Close the connection, unread fds with it; for ``exec:``, wait up to ``wait``
        seconds for the server to exit after it sees the end of the connection, then
        SIGTERM it."""
        self._abort()
        if self.pid is not None:
            pid, self.pid = self.pid, None
            _reap(pid, wait)

    def _abort(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        close_all(self._wire.discard())

    # -- calls -------------------------------------------------------------------------------

    @overload
    def call(
        self,
        method: str,
        parameters: Mapping[str, Any] | None = ...,
        *,
        more: Literal[False] = ...,
        oneway: Literal[False] = ...,
        fds: Sequence[int] = ...,
        timeout: float | _Inherit | None = ...,
    ) -> Reply: ...

    @overload
    def call(
        self,
        method: str,
        parameters: Mapping[str, Any] | None = ...,
        *,
        more: Literal[True],
        oneway: Literal[False] = ...,
        fds: Sequence[int] = ...,
        timeout: float | _Inherit | None = ...,
    ) -> Iterator[Reply]: ...

    @overload
    def call(
        self,
        method: str,
        parameters: Mapping[str, Any] | None = ...,
        *,
        more: Literal[False] = ...,
        oneway: Literal[True],
        fds: Sequence[int] = ...,
        timeout: float | _Inherit | None = ...,
    ) -> None: ...

    def call(
        self,
        method: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        more: bool = False,
        oneway: bool = False,
        fds: Sequence[int] = (),
        timeout: float | _Inherit | None = _Inherit.CONNECTION,
    ) -> Reply | Iterator[Reply] | None:
        """Call ``method`` (fully qualified) with ``parameters``.

        Returns the reply; with ``more``, an iterator over every reply (the last one
        has ``continues`` false; the call is sent before this returns); with
        ``oneway``, None. ``fds`` are sent with the call (the caller keeps its
        copies); fields of ``parameters`` refer to them by index. ``timeout`` bounds
        the wait for each reply (default: the connection's).
        Raises :class:`VarlinkCallError` for an error reply.
        """
        if more and oneway:
            raise ValueError("a call cannot be both 'more' and 'oneway'")
        wait = self.timeout if isinstance(timeout, _Inherit) else timeout
        self._require_open()
        self._send(self._wire.send_call(method, parameters, oneway=oneway, more=more), fds, wait)
        if oneway:
            return None
        if more:
            self._busy = True
            return _MoreReplies(self, method, wait)
        self._busy = True
        try:
            return self._reply(method, wait)
        finally:
            self._busy = False

    def get_info(self) -> Reply:
        """``org.varlink.service.GetInfo``: vendor, product, version, url, interfaces."""
        return self.call("org.varlink.service.GetInfo")

    def get_interface_description(self, interface: str = INTERFACE) -> str:
        """The IDL text of ``interface``."""
        reply = self.call("org.varlink.service.GetInterfaceDescription", {"interface": interface})
        description = reply.get("description")
        if not isinstance(description, str):
            raise VarlinkProtocolError("GetInterfaceDescription: no 'description' string")
        return description

    def _reply(self, method: str, timeout: float | None) -> Reply:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                reply = self._wire.next_reply()
            except ProtocolError as exc:
                close_all(exc.fds)
                self._abort()
                raise VarlinkProtocolError(f"{method}: {exc}") from None
            if reply is not None:
                break
            if self._sock is None:
                raise VarlinkDisconnected(f"{self.address}: the connection is closed")
            if self._eof:
                self._abort()
                raise VarlinkDisconnected(
                    f"{self.address}: the server closed the connection before replying to {method}"
                )
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._fill(remaining, method, timeout)
        if reply.error is not None:
            close_all(reply.fds)
            raise VarlinkCallError(reply.error, reply.parameters)
        return Reply(reply.parameters, reply.fds, reply.continues)

    # -- the wire ----------------------------------------------------------------------------

    def _require_open(self) -> _socket.socket:
        if self._sock is None:
            raise VarlinkDisconnected(f"{self.address}: the connection is closed")
        if self._busy:
            raise VarlinkClientError(
                f"{self.address}: the connection is busy with the replies of a 'more' call"
            )
        return self._sock

    def _send(self, data: bytes, fds: Sequence[int], timeout: float | None) -> None:
        sock = self._require_open()
        sock.settimeout(timeout)
        try:
            if fds:
                ancillary = [
                    (_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds).tobytes())
                ]
                sent = sock.sendmsg([data], ancillary)
                data = data[sent:]
            if data:
                sock.sendall(data)
        except TimeoutError:
            self._abort()
            raise VarlinkTimeout(f"{self.address}: timed out sending the call") from None
        except OSError as exc:
            refusal = self._refusal() if exc.errno in (errno.EPIPE, errno.ECONNRESET) else None
            self._abort()
            if refusal is not None:
                raise refusal from None
            raise VarlinkDisconnected(
                f"{self.address}: cannot send: {exc.strerror or exc}"
            ) from None

    def _refusal(self) -> VarlinkCallError | None:
        """The error a server sent before closing without reading the call, if it did
        (composefsd refusing a connection: TooManyConnections)."""
        sock = self._sock
        assert sock is not None
        try:
            sock.settimeout(0)
            data = sock.recv(_RECV_SIZE)
            reply = parse_reply(data.partition(b"\0")[0])
        except (OSError, ProtocolError):
            return None
        if reply.error is None:
            return None
        return VarlinkCallError(reply.error, reply.parameters)

    def _fill(self, timeout: float | None, method: str, total: float | None) -> None:
        sock = self._sock
        assert sock is not None
        sock.settimeout(timeout)
        try:
            data, fds = receive_fds(sock, _RECV_SIZE, MAX_FDS)
        except TimeoutError:
            self._abort()
            raise VarlinkTimeout(
                f"{self.address}: no reply to {method} within {total:g} s"
            ) from None
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            return
        except OSError as exc:
            self._abort()
            if exc.errno == errno.EMSGSIZE:
                raise VarlinkProtocolError(f"{self.address}: too many fds with one reply") from None
            raise VarlinkDisconnected(
                f"{self.address}: the connection broke: {exc.strerror or exc}"
            ) from None
        if not data:
            close_all(fds)
            self._eof = True
            return
        try:
            self._wire.receive_data(data, fds)
        except MessageTooLarge as exc:
            close_all(exc.fds)
            self._abort()
            raise VarlinkProtocolError(
                f"{self.address}: a reply is larger than {exc.limit} bytes"
            ) from None
        except ProtocolError as exc:
            close_all(exc.fds)
            self._abort()
            raise VarlinkProtocolError(f"{self.address}: {exc}") from None


class _MoreReplies(Iterator[Reply]):
    """The replies of one ``more`` call; the last has ``continues`` false. Dropping
    it before the last reply closes the connection (see the module notes)."""

    __slots__ = ("_conn", "_done", "_method", "_timeout")

    def __init__(self, conn: Connection, method: str, timeout: float | None) -> None:
        self._conn = conn
        self._method = method
        self._timeout = timeout
        self._done = False

    def __next__(self) -> Reply:
        if self._done:
            raise StopIteration
        conn = self._conn
        try:
            reply = conn._reply(self._method, self._timeout)
        except VarlinkCallError:
            self._done = True
            conn._busy = False
            raise
        except BaseException:
            self.close()
            raise
        if not reply.continues:
            self._done = True
            conn._busy = False
        return reply

    def close(self) -> None:
        """Stop reading replies; before the last one this closes the connection."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        conn._busy = False
        if not conn.closed:
            # Replies may still come, so the connection cannot be reused; closing it
            # tells the server to cancel the call.
            import logging  # here: loading logging costs a client's start several ms

            logging.getLogger(__name__).debug(
                "%s: %s abandoned; closing the connection", conn.address, self._method
            )
            conn._abort()

    def __del__(self) -> None:
        self.close()


def _reap(pid: int, wait: float) -> None:
    deadline = time.monotonic() + wait
    signalled = False
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() >= deadline:
            import signal  # here: its enums cost a client's start 1 ms

            if signalled:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            import logging  # here: loading logging costs a client's start several ms

            logging.getLogger(__name__).warning(
                "server process %d did not exit; sending SIGTERM", pid
            )
            os.kill(pid, signal.SIGTERM)
            signalled = True
            deadline = time.monotonic() + wait
        time.sleep(0.01)


def _check_socket_directory(address: str, path: str) -> None:
    if path.startswith("@"):
        return  # abstract: no directory, the peer check alone decides
    from composefsd.service.runtime import UnsafeDirectoryError, check_directory

    directory = os.path.dirname(os.path.abspath(path))
    try:
        check_directory(directory)
    except UnsafeDirectoryError as exc:
        raise VarlinkUntrustedError(
            address, f"another user could have put this socket there: {exc}"
        ) from None
    except OSError as exc:
        raise VarlinkConnectError(address, f"{directory}: {exc.strerror}", exc.errno) from None


def _check_peer(address: str, sock: _socket.socket) -> None:
    try:
        uid = peer_ids(sock)[1]
    except OSError:
        uid = -1  # no credentials: a server nobody trusts, as the daemon's Peer has it
    euid = os.geteuid()
    if uid not in (0, euid):
        who = "root" if euid == 0 else f"root or uid {euid} (you)"
        raise VarlinkUntrustedError(
            address, f"its server runs as uid {uid}, not as {who}", peer_uid=uid
        )


def _connect_unix(address: str, path: str, timeout: float | None) -> _socket.socket:
    target = "\0" + path[1:] if path.startswith("@") else path
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
        _check_peer(address, sock)
    except TimeoutError:
        sock.close()
        raise VarlinkConnectError(address, "timed out", errno.ETIMEDOUT) from None
    except OSError as exc:
        sock.close()
        raise VarlinkConnectError(address, exc.strerror or str(exc), exc.errno) from None
    except BaseException:
        sock.close()
        raise
    return sock


#: Runs the server with LISTEN_PID set to its own pid ($$ of the shell it replaces).
_EXEC_SHIM = 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"'


def _spawn(address: str, argv: Sequence[str]) -> tuple[_socket.socket, int]:
    path = argv[0]
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise VarlinkConnectError(address, f"{path} is not an executable file", errno.ENOEXEC)
    import socket  # here: only for exec: addresses (see the imports)

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        child_fd = child.fileno()
        extra = None
        if child_fd == 3:
            # dup2(3, 3) would keep close-on-exec set: move it out of the way first.
            extra = os.dup(child_fd)
            child_fd = extra
        env = dict(os.environ)
        for name in ("LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
        env["LISTEN_FDS"] = "1"
        env["LISTEN_FDNAMES"] = "varlink"
        try:
            pid = os.posix_spawn(
                "/bin/sh",
                ["sh", "-c", _EXEC_SHIM, *argv],
                env,
                file_actions=[(os.POSIX_SPAWN_DUP2, child_fd, 3)],
            )
        finally:
            if extra is not None:
                os.close(extra)
    except OSError as exc:
        parent.close()
        raise VarlinkConnectError(address, exc.strerror or str(exc), exc.errno) from None
    finally:
        child.close()
    return parent, pid


def connect(
    address: str,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    connect_timeout: float | None = 10.0,
    check_directory: bool = False,
) -> Connection:
    """Connect to ``address`` (see the module notes). ``timeout`` is the default
    per-reply timeout of the connection; ``check_directory`` also checks the
    socket's directory. Raises :class:`VarlinkConnectError`, or
    :class:`VarlinkUntrustedError` for a server that may be someone else's."""
    spec = address
    if spec.startswith("unix:"):
        path = spec[len("unix:") :].split(";", 1)[0]
        if not path:
            raise VarlinkConnectError(address, "no socket path in the address", errno.EINVAL)
        if check_directory:
            _check_socket_directory(address, path)
        sock = _connect_unix(address, path, connect_timeout)
        return Connection(sock, address=address, timeout=timeout)
    if spec.startswith("exec:"):
        path = spec[len("exec:") :]
        if not path:
            raise VarlinkConnectError(address, "no program in the address", errno.EINVAL)
        sock, pid = _spawn(address, [path])
        return Connection(sock, address=address, timeout=timeout, pid=pid)
    if not spec:
        raise VarlinkConnectError(address, "empty address", errno.EINVAL)
    if "/" not in spec and not spec.startswith("@"):
        raise VarlinkConnectError(
            address, "not an address (a socket path, unix:PATH or exec:PATH)", errno.EINVAL
        )
    if check_directory:
        # Before anything else: a program put there would be run, as us.
        _check_socket_directory(address, spec)
    try:
        st = os.stat(spec)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode) and os.access(spec, os.X_OK):
        sock, pid = _spawn(address, [spec])
        return Connection(sock, address=address, timeout=timeout, pid=pid)
    sock = _connect_unix(address, spec, connect_timeout)
    return Connection(sock, address=address, timeout=timeout)


def spawn(argv: Sequence[str], *, timeout: float | None = DEFAULT_TIMEOUT) -> Connection:
    """Start ``argv`` as a server on a connected fd 3 (like ``exec:``, with arguments)."""
    address = "exec:" + " ".join(argv)
    sock, pid = _spawn(address, argv)
    return Connection(sock, address=address, timeout=timeout, pid=pid)
