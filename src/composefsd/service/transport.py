"""The asyncio Varlink server under ``varlink.Service``: sockets, fds, order, limits.

One event loop owns every socket. Each connection has a reader callback that
takes what ``recvmsg`` returns (bytes plus SCM_RIGHTS fds, close-on-exec) and
feeds :class:`~composefsd.service.protocol.Decoder`, which splits messages on NUL
and ties fds to the message whose first byte came with them. Calls on one
connection run strictly one after another (a client may pipeline; replies come
in call order); calls on different connections run concurrently in a bounded
thread pool, so the loop itself never does a method's work.

A call runs entirely in a worker thread: envelope parsing (a malformed message
closes the connection), method lookup (``InterfaceNotFound``, ``MethodNotFound``),
the authorization hook (``PermissionDenied``), strict validation against the IDL
(``InvalidParameter``), then the method with a
:class:`~composefsd.service.context.CallContext` as ``_request``. ``varlink.Service``
stays the dispatcher of record: its interfaces, handlers and introspection are
used as they are. A plain method whose only extra keyword is ``_request`` is
called directly (input fields positionally in IDL order, missing ones as None,
exactly as ``Service.handle`` would, minus its per-call ``inspect.signature``,
JSON re-parsing and value coercion); any other (generators, ``_more``, ``_raw``,
...) goes through ``service.handle(raw, _request=ctx)``. ``continues`` replies a method
sends through ``ctx.send_continues`` go out as they are produced, always before
the final reply. Fds a method pushes go with the final reply's first byte and are
closed once sent; fds it received and did not take are closed after the call.
:class:`~composefsd.service.context.VarlinkReplyError` and ``varlink.VarlinkError``
become their error replies, anything else ``io.composefs.Repository.SystemError``
(logged with its traceback); the connection stays open.

A client that disconnects has its running call's ``ctx.cancelled`` set (oneway
calls excepted) and its queued calls dropped. A client that only shuts down its
sending side still gets the replies to what it sent.
"""

from __future__ import annotations

import array
import asyncio
import errno
import inspect
import logging
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from varlink.error import VarlinkError
from varlink.server import Service as VarlinkService

from composefsd.service.activation import is_listening
from composefsd.service.context import CallCancelled, CallContext, Peer, VarlinkReplyError
from composefsd.service.fds import close_all
from composefsd.service.protocol import (
    MAX_DEPTH,
    Decoder,
    Message,
    ProtocolError,
    encode_error,
    encode_reply,
    parse_call,
)
from composefsd.service.validate import INVALID_PARAMETER, InterfaceValidator, InvalidParameter

__all__ = [
    "INTERFACE_NOT_FOUND",
    "METHOD_NOT_FOUND",
    "PERMISSION_DENIED",
    "SYSTEM_ERROR",
    "Authorizer",
    "Server",
    "peer_credentials",
]

log = logging.getLogger(__name__)

Authorizer = Callable[[Peer, str], bool]

SYSTEM_ERROR: Final = "io.composefs.Repository.SystemError"
INTERFACE_NOT_FOUND: Final = "org.varlink.service.InterfaceNotFound"
METHOD_NOT_FOUND: Final = "org.varlink.service.MethodNotFound"
PERMISSION_DENIED: Final = "org.varlink.service.PermissionDenied"

_RECV_SIZE: Final = 1 << 16
#: Stop reading from a connection with this many calls queued; resume at half.
_MAX_QUEUED: Final = 64
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
_SEND_FLAGS: Final = socket.MSG_NOSIGNAL
_Outcome = tuple[bytes, list[int]] | None
#: The outcome that closes the connection (compared by identity).
_CLOSE: Final[_Outcome] = (b"", [])


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    return fds


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
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except OSError as e:
        log.warning("no peer credentials on fd %d: %s", sock.fileno(), e)
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


def _hung_up(fd: int) -> bool:
    """After EOF: whether the peer closed entirely (not just its sending side)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))


def _system_error(e: BaseException) -> dict[str, Any]:
    params: dict[str, Any] = {"message": str(e) or type(e).__name__}
    if isinstance(e, OSError) and e.errno:
        name = errno.errorcode.get(e.errno)
        if name:
            params["errnoName"] = name
    return params


def _error_reply(name: str, parameters: dict[str, Any] | None) -> bytes:
    try:
        return encode_error(name, parameters)
    except (TypeError, ValueError, UnicodeError) as e:
        log.error("cannot encode the parameters of error %s: %s", name, e)
        return encode_error(SYSTEM_ERROR, {"message": f"{name}: {e}"})


#: Keywords Service.handle can pass; a method declaring any but _request goes through it.
_HANDLE_KEYWORDS: Final = frozenset(
    {"_more", "_oneway", "_upgrade", "_raw", "_message", "_interface", "_method", "_server"}
)


class _Target:
    """A method as the transport calls it (resolved once per method name)."""

    __slots__ = ("direct", "fields", "func", "name", "validator", "wants_request")

    def __init__(
        self,
        validator: InterfaceValidator,
        name: str,
        func: Callable[..., Any] | None,
        fields: tuple[str, ...],
    ) -> None:
        self.validator = validator
        self.name = name
        self.fields = fields
        self.func = func
        self.wants_request = False
        self.direct = False
        if func is None or not callable(func) or inspect.isgeneratorfunction(func):
            # Service.handle answers MethodNotImplemented, or streams the generator.
            return
        try:
            params = inspect.signature(func).parameters
        except (TypeError, ValueError):
            return
        if _HANDLE_KEYWORDS.intersection(params):
            return
        self.wants_request = "_request" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )
        self.direct = True


class _Call:
    """A call between its start on the loop and its outcome coming back."""

    __slots__ = ("cancelled", "conn", "oneway")

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.cancelled = threading.Event()
        #: Set by the worker once the envelope is parsed.
        self.oneway = False


class _Connection:
    __slots__ = (
        "call",
        "closed",
        "decoder",
        "eof",
        "fd",
        "given",
        "loop",
        "peer",
        "queue",
        "reading",
        "server",
        "sock",
        "wbuf",
    )

    def __init__(
        self,
        server: Server,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        peer: Peer,
        given: bool,
    ) -> None:
        self.server = server
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.given = given
        self.decoder = Decoder(server.max_message_size, server.max_fds)
        self.queue: deque[Message] = deque()
        self.wbuf: deque[tuple[bytes | memoryview, list[int]]] = deque()
        self.call: _Call | None = None
        self.eof = False
        self.closed = False
        self.reading = True
        loop.add_reader(self.fd, self._on_readable)

    def __repr__(self) -> str:
        p = self.peer
        return f"<connection fd {self.fd} pid {p.pid} uid {p.uid}>"

    # Reading

    def _on_readable(self) -> None:
        try:
            data, anc, flags, _ = self.sock.recvmsg(
                _RECV_SIZE, self.server._anc_size, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("%r: receive failed: %s", self, e)
            self._lost()
            return
        fds = _received_fds(anc) if anc else []
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            self._abort(f"more than {self.server.max_fds} file descriptors with one message")
            return
        if not data:
            close_all(fds)
            self._on_eof()
            return
        try:
            messages = self.decoder.feed(data, fds)
        except ProtocolError as e:
            close_all(e.fds)
            self._abort(str(e))
            return
        if messages:
            self.queue.extend(messages)
            if self.call is None:
                self._next()
            if len(self.queue) >= _MAX_QUEUED and self.reading:
                self._stop_reading()

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def _on_eof(self) -> None:
        self.eof = True
        self._stop_reading()
        close_all(self.decoder.discard())
        if _hung_up(self.fd):
            self._lost()
        elif self.call is None and not self.queue and not self.wbuf:
            self._close()

    # Calls

    def _next(self) -> None:
        """Start the next queued call, if the connection is free for one."""
        if self.call is not None or self.closed or self.wbuf:
            return
        if self.server._closing:
            self._close()
            return
        if not self.queue:
            if self.eof:
                self._close()
            return
        msg = self.queue.popleft()
        if not self.reading and not self.eof and len(self.queue) <= _MAX_QUEUED // 2:
            self.reading = True
            self.loop.add_reader(self.fd, self._on_readable)
        call = _Call(self)
        self.call = call
        self.server._start(call, msg)

    def _send_continues(self, call: _Call, data: bytes) -> None:
        if call is self.call and not self.closed:
            self._write(data, [])

    def _finished(self, call: _Call, outcome: _Outcome) -> None:
        """The worker's result for ``call``, on the loop."""
        self.call = None
        if outcome is _CLOSE:
            self._lost()
        elif outcome is not None:
            data, fds = outcome
            if self.closed:
                close_all(fds)
            else:
                self._write(data, fds)
        if not self.closed:
            if self.server._closing:
                self._close()
            else:
                self._next()
        self.server._finished(call)

    # Writing

    def _send(self, data: bytes | memoryview, fds: list[int]) -> int:
        if fds:
            return self.sock.sendmsg(
                [data],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                _SEND_FLAGS,
            )
        return self.sock.send(data, _SEND_FLAGS)

    def _write(self, data: bytes, fds: list[int]) -> None:
        """Send one message; its fds go with its first byte and are closed once sent."""
        if self.wbuf:
            self.wbuf.append((data, fds))
            return
        try:
            n = self._send(data, fds)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            close_all(fds)
            log.debug("%r: send failed: %s", self, e)
            self._lost()
            return
        if n and fds:
            close_all(fds)
            fds = []
        if n < len(data):
            self.wbuf.append((memoryview(data)[n:], fds))
            self.loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        while self.wbuf:
            data, fds = self.wbuf[0]
            try:
                n = self._send(data, fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("%r: send failed: %s", self, e)
                self._lost()
                return
            if fds:
                close_all(fds)
            if n < len(data):
                self.wbuf[0] = (memoryview(data)[n:], [])
                return
            self.wbuf.popleft()
        self.loop.remove_writer(self.fd)
        if self.call is None:
            self._next()

    # Ending

    def _abort(self, reason: str) -> None:
        log.info("%r: protocol error, closing: %s", self, reason)
        self._lost()

    def _lost(self) -> None:
        """The peer is gone (or broke the protocol): cancel its call, close."""
        call = self.call
        if call is not None and not call.oneway:
            call.cancelled.set()
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_reading()
        if self.wbuf:
            self.loop.remove_writer(self.fd)
            for _, fds in self.wbuf:
                close_all(fds)
            self.wbuf.clear()
        while self.queue:
            close_all(self.queue.popleft().fds)
        close_all(self.decoder.discard())
        self.sock.close()
        self.server._closed(self)


class Server:
    """Serves a ``varlink.Service`` on listening or connected AF_UNIX sockets.

    ``authorize(peer, "iface.Method")`` runs (in a worker thread) before every call
    of a known method, ``org.varlink.service`` ones included; False refuses it with
    ``org.varlink.service.PermissionDenied``.
    """

    def __init__(
        self,
        service: VarlinkService,
        *,
        authorize: Authorizer | None = None,
        max_message_size: int = 16 << 20,
        max_fds: int = 16,
        workers: int = 8,
        max_connections: int = 4096,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self._service = service
        self._authorize = authorize
        self.max_message_size = max_message_size
        self.max_fds = max_fds
        self.max_connections = max_connections
        self.max_depth = max_depth
        self._anc_size = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="varlink")
        self._validators: dict[str, InterfaceValidator] = {}
        self._methods: dict[str, _Target] = {}
        self._conns: set[_Connection] = set()
        self._listeners: list[socket.socket] = []
        self._running: set[_Call] = set()
        self._given = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._drained: asyncio.Future[None] | None = None
        self._closing = False
        #: time.monotonic() of the last call start or end, or connection change.
        self.last_activity = time.monotonic()

    @property
    def connections(self) -> int:
        """Open connections."""
        return len(self._conns)

    @property
    def calls_in_flight(self) -> int:
        """Calls running in workers (including those of connections already gone)."""
        return len(self._running)

    # Serving

    async def serve(self, sockets: Sequence[socket.socket]) -> None:
        """Accept on the listening sockets and serve the connected ones.

        Returns after :meth:`shutdown`, or, without listening sockets, once every
        connected socket given has closed and its calls have finished.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = asyncio.Event()
        for sock in sockets:
            sock.setblocking(False)
            if is_listening(sock):
                self._listeners.append(sock)
                loop.add_reader(sock.fileno(), self._on_accept, sock)
            else:
                self._given += 1
                self._add_connection(sock, given=True)
        self._check_done()
        try:
            await self._done.wait()
        except asyncio.CancelledError:
            self._teardown()
            raise

    def _teardown(self) -> None:
        """Stop everything at once (the serving task was cancelled)."""
        self._closing = True
        self._stop_accepting()
        for call in self._running:
            call.cancelled.set()
        for conn in list(self._conns):
            conn._close()
        self._executor.shutdown(wait=False)

    def _stop_accepting(self) -> None:
        if self._loop is not None:
            for sock in self._listeners:
                self._loop.remove_reader(sock.fileno())
        self._listeners.clear()

    def _on_accept(self, lsock: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(32):
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ECONNABORTED:
                    continue
                log.warning("accept: %s; pausing for 1 s", e)
                loop.remove_reader(lsock.fileno())
                loop.call_later(1.0, self._resume_accepting, lsock)
                return
            if len(self._conns) >= self.max_connections:
                log.warning("refusing a connection: %d connections open", len(self._conns))
                sock.close()
                continue
            sock.setblocking(False)
            self._add_connection(sock, given=False)

    def _resume_accepting(self, lsock: socket.socket) -> None:
        if not self._closing and lsock in self._listeners and self._loop is not None:
            self._loop.add_reader(lsock.fileno(), self._on_accept, lsock)

    def _add_connection(self, sock: socket.socket, *, given: bool) -> None:
        assert self._loop is not None
        conn = _Connection(self, self._loop, sock, peer_credentials(sock), given)
        self._conns.add(conn)
        self.last_activity = time.monotonic()
        log.debug("%r: connected", conn)

    def _closed(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        self.last_activity = time.monotonic()
        log.debug("%r: closed", conn)
        if conn.given:
            self._given -= 1
            self._check_done()

    def _check_done(self) -> None:
        if (
            not self._closing
            and self._done is not None
            and not self._listeners
            and not self._given
            and not self._running
        ):
            self._done.set()

    # Calls

    def _start(self, call: _Call, msg: Message) -> None:
        self._running.add(call)
        self.last_activity = time.monotonic()
        self._executor.submit(self._work, call, msg)

    def _finished(self, call: _Call) -> None:
        self._running.discard(call)
        self.last_activity = time.monotonic()
        if not self._running:
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            if not self._given:
                self._check_done()

    def _work(self, call: _Call, msg: Message) -> None:
        """Worker thread: run one call, hand its outcome to the loop."""
        try:
            outcome = self._process(call, msg)
        except BaseException:
            log.exception("%r: call processing failed", call.conn)
            outcome = _CLOSE
        try:
            call.conn.loop.call_soon_threadsafe(call.conn._finished, call, outcome)
        except RuntimeError:
            # The loop is closed: nobody will send anything.
            if outcome is not None:
                close_all(outcome[1])

    def _lookup(self, method: str) -> _Target:
        target = self._methods.get(method)
        if target is not None:
            return target
        interface_name, _, name = method.rpartition(".")
        validator = self._validators.get(interface_name)
        if validator is None:
            interface = self._service.interfaces.get(interface_name)
            if interface is None:
                raise VarlinkReplyError(
                    INTERFACE_NOT_FOUND, {"interface": interface_name or method}
                )
            validator = self._validators[interface_name] = InterfaceValidator(interface)
        if not validator.has_method(name):
            raise VarlinkReplyError(METHOD_NOT_FOUND, {"method": method})
        handler = self._service.interfaces_handlers.get(interface_name)
        target = self._methods[method] = _Target(
            validator, name, getattr(handler, name, None), validator.input_fields(name)
        )
        return target

    def _continues_sender(self, call: _Call, more: bool) -> Callable[[dict[str, Any]], None]:
        conn = call.conn

        def send_continues(parameters: dict[str, Any]) -> None:
            # Without "more" a continues reply would break the protocol: drop it.
            if not more or call.cancelled.is_set():
                return
            data = encode_reply(parameters, continues=True)
            try:
                conn.loop.call_soon_threadsafe(conn._send_continues, call, data)
            except RuntimeError:
                pass

        return send_continues

    def _process(self, call: _Call, msg: Message) -> _Outcome:
        conn = call.conn
        try:
            envelope = parse_call(msg.data, self.max_depth)
        except ProtocolError as e:
            close_all(msg.fds)
            log.info("%r: protocol error, closing: %s", conn, e)
            return _CLOSE
        call.oneway = envelope.oneway
        fds: list[int | None] = list(msg.fds)
        ctx = CallContext(
            peer=conn.peer,
            method=envelope.method,
            more=envelope.more,
            oneway=envelope.oneway,
            fds=fds,
            cancelled=call.cancelled,
        )
        ctx.send_continues = self._continues_sender(call, envelope.more)
        ok = False
        try:
            target = self._lookup(envelope.method)
            if self._authorize is not None and not self._authorize(conn.peer, envelope.method):
                raise VarlinkReplyError(PERMISSION_DENIED)
            params = envelope.parameters
            try:
                target.validator.check_call(target.name, params)
            except InvalidParameter as e:
                raise VarlinkReplyError(INVALID_PARAMETER, {"parameter": e.parameter}) from None
            func = target.func
            if target.direct and func is not None:
                args = [params.get(k) for k in target.fields]
                if target.wants_request:
                    out = func(*args, _request=ctx)
                else:
                    out = func(*args)
                reply = encode_reply(out)
                ok = True
            else:
                replies = list(self._service.handle(msg.data, _request=ctx))
                if not replies:
                    reply = encode_reply()
                    ok = True
                else:
                    reply = b"\0".join(replies) + b"\0"
                    ok = not replies[-1].startswith(b'{"error"')
        except VarlinkReplyError as e:
            reply = _error_reply(e.name, e.parameters)
        except VarlinkError as e:
            error = e.as_dict()
            reply = _error_reply(str(error.get("error")), error.get("parameters"))
        except CallCancelled as e:
            reply = _error_reply(SYSTEM_ERROR, {"message": str(e), "errnoName": "ECANCELED"})
        except Exception as e:
            log.exception("%r: %s failed", conn, envelope.method)
            reply = _error_reply(SYSTEM_ERROR, _system_error(e))
        finally:
            close_all(fds)
        out_fds = ctx.out_fds
        ctx.out_fds = []
        if not ok or envelope.oneway:
            close_all(out_fds)
            out_fds = []
        if envelope.oneway:
            return None
        return reply, out_fds

    # Stopping

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting and reading; let running calls finish for up to ``grace``
        seconds, then cancel the rest (``ctx.cancelled``) and wait for them; close
        every connection. :meth:`serve` returns afterwards."""
        if self._closing:
            if self._done is not None:
                await self._done.wait()
            return
        self._closing = True
        self._stop_accepting()
        loop = self._loop
        if loop is not None:
            for conn in list(self._conns):
                if conn.call is None:
                    conn._close()
                else:
                    conn._stop_reading()
                    while conn.queue:
                        close_all(conn.queue.popleft().fds)
            if self._running:
                self._drained = loop.create_future()
                try:
                    await asyncio.wait_for(asyncio.shield(self._drained), grace)
                except TimeoutError:
                    log.warning(
                        "%d calls still running after %.1f s: cancelling them",
                        len(self._running),
                        grace,
                    )
                    for call in self._running:
                        call.cancelled.set()
                    while True:
                        try:
                            await asyncio.wait_for(asyncio.shield(self._drained), 10.0)
                            break
                        except TimeoutError:
                            log.warning("still waiting for %d calls", len(self._running))
            for conn in list(self._conns):
                conn._close()
        self._executor.shutdown(wait=False)
        if self._done is not None:
            self._done.set()
