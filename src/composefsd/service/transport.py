"""The asyncio Varlink server under ``varlink.Service``: sockets, fds, order, limits.

One event loop owns every socket. Each connection has a reader callback that
takes what ``recvmsg`` returns (bytes plus SCM_RIGHTS fds, close-on-exec) and
feeds its :class:`~composefsd.service.codec.ServerConnection`, which splits
messages on NUL and ties fds to the message whose first byte came with them (the
codec's module notes: sd-varlink's rule). Calls on one
connection run strictly one after another (a client may pipeline; replies come
in call order); calls on different connections run concurrently in a bounded
thread pool, so the loop itself does no method's work, but for inline methods
(below).

A call is prepared first: envelope parsing (a malformed message closes the
connection), method lookup (``InterfaceNotFound``, ``MethodNotFound``), the
authorization hook (``PermissionDenied``), strict validation against the IDL
(``InvalidParameter``). A message of up to 4 KiB (every call but a Mount with id
maps) is prepared on the loop, in tens of microseconds, and goes straight to its
lane; a longer one in a worker of the light lane. Then the method runs, with a
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

**Inline methods** (``inline_methods``: method name to a function of the
parameters and the context) are answered on the loop when their function can
answer at once: it must return in microseconds, without blocking or waiting for a
lock (the watchdog's keep-alive runs on the loop too), or return None, and the
method runs in a worker as any other. composefsd's Describe is one: it answers
from counts it keeps (:meth:`RepositoryInterface.describe_now
<composefsd.service.methods.RepositoryInterface.describe_now>`). This skips two
thread hand-offs per call, and the GIL changing hands at every system call
between threads doing the same work: under load that, not the work, was most of
a Describe's cost. Calls with ``more`` and long messages are not answered inline.
After an inline answer the connection's next call starts in a later turn of the
loop, so connections take turns; a uid's share of the loop is its connections'
share (at most ``max_connections_per_uid``), as a worker lane would give it.

A client that disconnects has its running call's ``ctx.cancelled`` set (oneway
calls excepted) and its queued calls dropped. A client that only shuts down its
sending side still gets the replies to what it sent.

Limits, so that one local user cannot take the service from the others (the
defaults are the ``DEFAULT_*`` constants; uids in ``privileged_uids``, root by
default, are exempt where noted):

* **Input.** A message longer than ``max_message_size`` closes the connection. A
  connection stops being read while it holds ``max_message_size`` bytes or 64
  calls not yet started. The input held across all connections (partial
  messages, queued calls, calls running) is kept under ``max_buffered_input``:
  past it, the connection holding the most is closed, privileged ones last. A
  connection whose message stays incomplete for ``message_timeout`` seconds is
  closed. Input is kept in one ``bytearray`` per connection, and after
  connections holding input have gone the heap is trimmed
  (:func:`~composefsd.kernel.memory.trim_heap`), so the memory is given back.
* **Connections.** At most ``max_connections_per_uid`` per uid and
  ``max_connections`` in all for unprivileged peers; privileged ones are always
  accepted. A refused peer gets one ``io.composefs.Repository.TooManyConnections``
  error (read as the reply to its first call) and is disconnected; refusals are
  logged at most once per ten seconds and uid.
* **Work.** Calls run in two lanes of worker threads: ``heavy_methods`` in
  ``heavy_workers`` threads, at most ``heavy_calls_per_uid`` of them for one
  uid; everything else in ``workers`` threads, at most ``workers_per_uid`` for
  one uid. Each lane takes the uids with waiting calls in turn, so a uid that
  floods a lane waits behind its own calls only, and cheap calls never wait for
  heavy ones. (A long heavy call is parsed, authorized and validated in the
  other lane; only the method itself waits for a heavy worker.)
"""

from __future__ import annotations

import array
import asyncio
import errno
import inspect
import logging
import select
import socket
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any, Final, cast

from varlink.error import VarlinkError
from varlink.server import Service as VarlinkService

from composefsd.kernel.memory import trim_heap
from composefsd.service.activation import is_listening
from composefsd.service.codec import (
    MAX_DEPTH,
    Call,
    Message,
    ProtocolError,
    ServerConnection,
    encode_error,
    encode_reply,
    parse_reply,
)
from composefsd.service.context import (
    CallCancelled,
    CallContext,
    Peer,
    VarlinkReplyError,
    peer_credentials,
    peer_pidfd,
)
from composefsd.service.fds import close_all, fds_from_ancillary
from composefsd.service.validate import INVALID_PARAMETER, InterfaceValidator, InvalidParameter

__all__ = [
    "DEFAULT_HEAVY_CALLS_PER_UID",
    "DEFAULT_HEAVY_WORKERS",
    "DEFAULT_MAX_BUFFERED_INPUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_UID",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MESSAGE_TIMEOUT",
    "DEFAULT_WORKERS",
    "DEFAULT_WORKERS_PER_UID",
    "INTERFACE_NOT_FOUND",
    "METHOD_NOT_FOUND",
    "PERMISSION_DENIED",
    "SYSTEM_ERROR",
    "TOO_MANY_CONNECTIONS",
    "Authorizer",
    "CallCheck",
    "InlineMethod",
    "Server",
]

log = logging.getLogger(__name__)

Authorizer = Callable[[Peer, str], bool]
#: Runs in the worker thread right before a method (after ``authorize`` let the call
#: through): raises :class:`VarlinkReplyError` to refuse it. For checks that need the
#: call's parameters or a round trip (polkit: :mod:`composefsd.service.polkit`).
CallCheck = Callable[[CallContext, dict[str, Any]], None]
#: A method's answer from the event loop: the reply's parameters, or the reply
#: already encoded (:func:`~composefsd.service.codec.encode_reply`), or None to run
#: the method in a worker as usual (module notes).
InlineMethod = Callable[[dict[str, Any], CallContext], dict[str, Any] | bytes | None]

SYSTEM_ERROR: Final = "io.composefs.Repository.SystemError"
TOO_MANY_CONNECTIONS: Final = "io.composefs.Repository.TooManyConnections"
INTERFACE_NOT_FOUND: Final = "org.varlink.service.InterfaceNotFound"
METHOD_NOT_FOUND: Final = "org.varlink.service.MethodNotFound"
PERMISSION_DENIED: Final = "org.varlink.service.PermissionDenied"

#: The largest call io.composefs.Repository needs is a Mount with full uid and gid
#: maps (340 extents each) and three paths: about 60 KiB.
DEFAULT_MAX_MESSAGE_SIZE: Final = 256 << 10
DEFAULT_MAX_BUFFERED_INPUT: Final = 32 << 20
#: Seconds a message may stay incomplete.
DEFAULT_MESSAGE_TIMEOUT: Final = 20.0
#: sd-varlink's limit on connections per server.
DEFAULT_MAX_CONNECTIONS: Final = 4096
DEFAULT_MAX_CONNECTIONS_PER_UID: Final = 128
DEFAULT_WORKERS: Final = 8
DEFAULT_WORKERS_PER_UID: Final = 4
DEFAULT_HEAVY_WORKERS: Final = 2
DEFAULT_HEAVY_CALLS_PER_UID: Final = 1

_RECV_SIZE: Final = 1 << 16
#: Stop reading from a connection with this many calls queued; resume at half.
_MAX_QUEUED: Final = 64
#: Trim the heap once this much input was dropped with connections since the last trim.
_TRIM_AFTER: Final = 1 << 20
#: Seconds between two heap trims at most, so that a stream of drops costs little.
_TRIM_INTERVAL: Final = 1.0
#: Input drained from a refused connection before closing it, so that closing with
#: unread data does not turn the peer's read of the refusal into ECONNRESET.
_REFUSAL_DRAIN: Final = 1 << 16
_SEND_FLAGS: Final = socket.MSG_NOSIGNAL
_Outcome = tuple[bytes, list[int]] | None
#: The outcome that closes the connection (compared by identity).
_CLOSE: Final[_Outcome] = (b"", [])
#: An inline method's "not now": the call goes to a worker (compared by identity).
_DEFERRED: Final[_Outcome] = (b"", [])
#: Messages up to this size are parsed, authorized and validated on the loop (tens of
#: microseconds at most); longer ones in a worker.
_LOOP_PARSE_MAX: Final = 4096


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


def _stopping_reply() -> tuple[bytes, list[int]]:
    """The outcome of a call dropped because the service stops before it could run."""
    return _error_reply(
        SYSTEM_ERROR, {"message": "the service is stopping", "errnoName": "ECANCELED"}
    ), []


class _LogLimit:
    """Logs one message per key at most every ``interval`` seconds, and says how
    many it held back in between (a flood of refusals must not flood the journal)."""

    __slots__ = ("_due", "interval")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._due: dict[Hashable, tuple[float, int]] = {}

    def __call__(self, key: Hashable, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        due, held = self._due.get(key, (0.0, 0))
        if now < due:
            self._due[key] = (due, held + 1)
            return
        if held:
            message += " (and %d more like it)"
            args = (*args, held)
        log.log(level, message, *args)
        if len(self._due) > 4096:
            self._due = {k: v for k, v in self._due.items() if v[0] > now}
        self._due[key] = (now + self.interval, 0)


class _Call:
    """A call between its start on the loop and its outcome coming back."""

    __slots__ = ("cancelled", "conn", "oneway", "size")

    def __init__(self, conn: _Connection, size: int) -> None:
        self.conn = conn
        self.cancelled = threading.Event()
        #: Set by the worker once the envelope is parsed.
        self.oneway = False
        #: Bytes of the message, counted as input held until the call ends.
        self.size = size


@dataclass(slots=True, frozen=True)
class _Job:
    """A call waiting in a :class:`_Lane`."""

    call: _Call
    run: Callable[[], None]
    #: Releases what the call holds (its fds) if it is dropped without running.
    discard: Callable[[], None]


@dataclass(slots=True)
class _Prepared:
    """A call parsed, authorized and validated, ready for its method."""

    envelope: Call
    target: _Target
    ctx: CallContext
    data: bytes


class _Inbox:
    """Callbacks from worker threads to the event loop, run there in the order given.

    ``loop.call_soon_threadsafe`` wakes the loop (a write to its self-pipe, a read
    and a handle) for every callback; under load a worker posts two per call (the
    outcome, the freed worker) and many workers finish between two turns of the
    loop. Here only the first callback of a batch wakes the loop, and the loop
    runs the whole batch at once."""

    __slots__ = ("_items", "_lock", "_waking", "loop")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._waking = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def put(self, fn: Callable[..., None], *args: Any) -> None:
        """Any thread: run ``fn(*args)`` on the loop; RuntimeError if the loop is
        closed (nothing will run)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((fn, args))
            if self._waking:
                return
            self._waking = True
        try:
            loop.call_soon_threadsafe(self._run)
        except RuntimeError:
            with self._lock:
                self._waking = False
            raise

    def _run(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._waking = False
        for fn, args in items:
            try:
                fn(*args)
            except Exception:
                # As the loop does for a failing handle: the others still run.
                log.exception("callback %r failed", fn)


class _Lane:
    """Worker threads for one kind of call, shared fairly between uids.

    At most ``workers`` calls run at once, and at most ``per_uid`` of one uid (any
    number up to ``workers`` for privileged uids). Waiting calls queue per uid, and
    a free worker takes the next uid in turn that is under its limit. Everything
    but :meth:`_run` happens on the event loop.
    """

    __slots__ = (
        "__weakref__",
        "_inbox",
        "_jobs",
        "_name",
        "_queues",
        "_running",
        "_shut",
        "_threads",
        "_total",
        "_turn",
        "per_uid",
        "privileged",
        "workers",
    )

    def __init__(
        self,
        name: str,
        workers: int,
        per_uid: int,
        privileged: frozenset[int],
        inbox: _Inbox | None = None,
    ) -> None:
        self.workers = max(1, workers)
        self.per_uid = max(1, per_uid)
        self.privileged = privileged
        self._name = name
        self._inbox = _Inbox() if inbox is None else inbox
        # Plain threads on a SimpleQueue, not a ThreadPoolExecutor: its submit (a
        # Future, a lock, a semaphore, a thread-count check) was the largest single
        # cost on the loop per call. Threads start as calls need them, up to workers.
        self._jobs: SimpleQueue[tuple[int, Callable[[], None]] | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._shut = False
        _LANES.add(self)
        self._queues: dict[int, deque[_Job]] = {}
        #: uids with waiting calls, the next to be served first.
        self._turn: deque[int] = deque()
        self._running: Counter[int] = Counter()
        self._total = 0

    def submit(
        self, uid: int, call: _Call, job: Callable[[], None], discard: Callable[[], None]
    ) -> None:
        """Run ``job`` for ``call`` when its turn comes; ``discard`` releases what it
        holds if it is dropped before that."""
        if self._inbox.loop is None:
            self._inbox.loop = asyncio.get_running_loop()
        queue = self._queues.get(uid)
        if queue is None:
            queue = self._queues[uid] = deque()
            self._turn.append(uid)
        queue.append(_Job(call, job, discard))
        self._pump()

    def drop(self, call: _Call) -> bool:
        """Take ``call`` out of its queue and discard it if it has not started; True
        if it was there."""
        uid = call.conn.peer.uid
        queue = self._queues.get(uid)
        if queue is None:
            return False
        for i, queued in enumerate(queue):
            if queued.call is call:
                del queue[i]
                if not queue:
                    del self._queues[uid]
                    self._turn.remove(uid)
                queued.discard()
                return True
        return False

    def waiting(self) -> list[_Call]:
        return [job.call for queue in self._queues.values() for job in queue]

    def _limit(self, uid: int) -> int:
        return self.workers if uid in self.privileged else self.per_uid

    def _pump(self) -> None:
        turn = self._turn
        while self._total < self.workers and turn:
            for _ in range(len(turn)):
                uid = turn[0]
                turn.rotate(-1)
                if self._running[uid] < self._limit(uid):
                    break
            else:
                return  # every uid with waiting calls is at its limit
            queue = self._queues[uid]
            job = queue.popleft()
            if not queue:
                # rotate() put it last.
                del self._queues[uid]
                turn.pop()
            self._running[uid] += 1
            self._total += 1
            self._jobs.put((uid, job.run))
            if len(self._threads) < self._total and not self._shut:
                thread = threading.Thread(
                    target=self._worker, name=f"{self._name}_{len(self._threads)}"
                )
                self._threads.append(thread)
                thread.start()

    def _worker(self) -> None:
        while (item := self._jobs.get()) is not None:
            uid, job = item
            try:
                job()
            except BaseException:
                log.exception("a job of lane %s failed", self._name)
            finally:
                try:
                    self._inbox.put(self._done, uid)
                except RuntimeError:
                    pass  # the loop is closed: nothing more will run

    def _done(self, uid: int) -> None:
        self._total -= 1
        self._running[uid] -= 1
        if not self._running[uid]:
            del self._running[uid]
        self._pump()

    def shutdown(self) -> None:
        """Discard the waiting calls and let the running ones end on their own."""
        for queue in self._queues.values():
            for job in queue:
                job.discard()
        self._queues.clear()
        self._turn.clear()
        self._stop_threads()

    def _stop_threads(self) -> None:
        """Let each thread end once the jobs given to it are done."""
        if not self._shut:
            self._shut = True
            for _ in self._threads:
                self._jobs.put(None)


#: Lanes whose threads end at interpreter exit, as a ThreadPoolExecutor's do: Python
#: waits for non-daemon threads before atexit handlers run, so this hook runs before
#: that wait (it is the one ThreadPoolExecutor uses; it is not in typeshed).
_LANES: weakref.WeakSet[_Lane] = weakref.WeakSet()


def _stop_lanes() -> None:
    for lane in list(_LANES):
        lane._stop_threads()


cast(Callable[[Callable[[], None]], None], threading._register_atexit)(_stop_lanes)  # type: ignore[attr-defined]


class _Connection:
    __slots__ = (
        "_sock_lock",
        "call",
        "closed",
        "eof",
        "fd",
        "given",
        "held",
        "loop",
        "peer",
        "privileged",
        "queue",
        "queued_bytes",
        "reading",
        "server",
        "sock",
        "timer",
        "wbuf",
        "wire",
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
        self.privileged = peer.uid in server.privileged_uids
        self.given = given
        self.wire = ServerConnection(server.max_message_size, server.max_fds, server.max_depth)
        self.queue: deque[Message] = deque()
        self.queued_bytes = 0
        #: Input held: the partial message, queued calls, the running call's message.
        self.held = 0
        self.wbuf: deque[tuple[bytes | memoryview, list[int]]] = deque()
        self.call: _Call | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.eof = False
        self.closed = False
        self.reading = True
        #: Held while a worker asks the socket for the peer's pidfd and while the loop
        #: closes it, so that the fd number is never another connection's by then.
        self._sock_lock = threading.Lock()
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
        fds = fds_from_ancillary(anc) if anc else []
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            self._abort(f"more than {self.server.max_fds} file descriptors with one message")
            return
        if not data:
            close_all(fds)
            self._on_eof()
            return
        try:
            messages = self.wire.receive_data(data, fds)
        except ProtocolError as e:
            close_all(e.fds)
            self._abort(str(e))
            return
        if messages:
            self.queue.extend(messages)
            self.queued_bytes += sum(len(m.data) for m in messages)
            # A message ended: the one now incomplete, if any, gets its own time.
            self._stop_timer()
        self._account()
        if self.closed:
            return  # closed for holding too much input
        if self.wire.pending and self.timer is None:
            self.timer = self.loop.call_later(self.server.message_timeout, self._timed_out)
        if messages and self.call is None:
            self._next()
        if self.reading and (
            len(self.queue) >= _MAX_QUEUED or self.queued_bytes >= self.server.max_message_size
        ):
            self._stop_reading()

    def _account(self) -> None:
        """Tell the server how much input this connection holds now."""
        call = self.call
        held = self.wire.pending + self.queued_bytes + (call.size if call is not None else 0)
        if held != self.held:
            change, self.held = held - self.held, held
            self.server._held_changed(self, change)

    def _timed_out(self) -> None:
        self.timer = None
        self.server._log_limit(
            ("timeout", self.peer.uid),
            logging.INFO,
            "%r: closing: a message stayed incomplete for %g s (%d bytes so far)",
            self,
            self.server.message_timeout,
            self.wire.pending,
        )
        self._lost()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
            # The rest of a partial message waits in the socket because of us.
            self._stop_timer()

    def _resume_reading(self) -> None:
        if not self.reading and not self.eof and not self.closed:
            self.reading = True
            self.loop.add_reader(self.fd, self._on_readable)
            if self.wire.pending and self.timer is None:
                self.timer = self.loop.call_later(self.server.message_timeout, self._timed_out)

    def _on_eof(self) -> None:
        self.eof = True
        self._stop_reading()
        dropped = self.wire.pending
        close_all(self.wire.discard())
        self._account()
        self.server._input_dropped(dropped)
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
        self.queued_bytes -= len(msg.data)
        if (
            len(self.queue) <= _MAX_QUEUED // 2
            and self.queued_bytes < self.server.max_message_size // 2
        ):
            self._resume_reading()
        call = _Call(self, len(msg.data))
        self.call = call
        self._account()
        self.server._start(call, msg)

    def _send_continues(self, call: _Call, data: bytes, fds: list[int]) -> None:
        if call is self.call and not self.closed:
            self._write(data, fds)
        else:
            close_all(fds)

    def _finished(self, call: _Call, outcome: _Outcome, *, inline: bool = False) -> None:
        """The outcome of ``call``, on the loop. After a call answered on the loop
        (``inline``) the next one starts in a later turn of the loop, so that one
        connection's queue does not keep the others waiting."""
        self.call = None
        if not self.closed:
            self._account()
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
            elif not inline:
                self._next()
            elif self.queue or self.eof:
                self.loop.call_soon(self._next)
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
        if call is not None and not call.oneway:
            self.server._drop_waiting(call)

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_reading()
        self._stop_timer()
        if self.wbuf:
            self.loop.remove_writer(self.fd)
            for _, fds in self.wbuf:
                close_all(fds)
            self.wbuf.clear()
        while self.queue:
            close_all(self.queue.popleft().fds)
        self.queued_bytes = 0
        close_all(self.wire.discard())
        with self._sock_lock:
            self.sock.close()
        self.server._closed(self)

    def peer_pidfd(self) -> int:
        """Any thread: a new pidfd of the process that connected; OSError once closed."""
        with self._sock_lock:
            if self.closed:
                raise OSError(errno.EBADF, "the connection is closed")
            return peer_pidfd(self.sock)


class Server:
    """Serves a ``varlink.Service`` on listening or connected AF_UNIX sockets.

    ``authorize(peer, "iface.Method")`` runs (on the loop; in a worker thread for a
    long message) before every call of a known method, ``org.varlink.service`` ones
    included; False refuses it with ``org.varlink.service.PermissionDenied``.
    ``check_call(ctx, parameters)`` then runs in the worker thread right before the
    method (not before inline methods, which must need no such check). The
    limits and inline methods are explained in the module notes.
    """

    def __init__(
        self,
        service: VarlinkService,
        *,
        authorize: Authorizer | None = None,
        check_call: CallCheck | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_fds: int = 16,
        workers: int = DEFAULT_WORKERS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_depth: int = MAX_DEPTH,
        max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID,
        max_buffered_input: int = DEFAULT_MAX_BUFFERED_INPUT,
        message_timeout: float = DEFAULT_MESSAGE_TIMEOUT,
        workers_per_uid: int = DEFAULT_WORKERS_PER_UID,
        heavy_methods: frozenset[str] = frozenset(),
        heavy_workers: int = DEFAULT_HEAVY_WORKERS,
        heavy_calls_per_uid: int = DEFAULT_HEAVY_CALLS_PER_UID,
        privileged_uids: frozenset[int] = frozenset({0}),
        inline_methods: dict[str, InlineMethod] | None = None,
    ) -> None:
        self._service = service
        self._inline: dict[str, InlineMethod] = dict(inline_methods or {})
        self._authorize = authorize
        self._check_call = check_call
        self.max_message_size = max_message_size
        self.max_fds = max_fds
        self.max_connections = max_connections
        self.max_depth = max_depth
        self.max_connections_per_uid = max_connections_per_uid
        self.max_buffered_input = max_buffered_input
        self.message_timeout = message_timeout
        self.heavy_methods = heavy_methods
        self.privileged_uids = privileged_uids
        self._anc_size = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
        #: Everything worker threads hand to the loop, in one order.
        self._inbox = _Inbox()
        self._lane = _Lane("varlink", workers, workers_per_uid, privileged_uids, self._inbox)
        self._heavy = _Lane(
            "varlink-heavy", heavy_workers, heavy_calls_per_uid, privileged_uids, self._inbox
        )
        self._validators: dict[str, InterfaceValidator] = {}
        self._methods: dict[str, _Target] = {}
        self._conns: set[_Connection] = set()
        #: Open connections per uid, and of unprivileged peers in all.
        self._per_uid: Counter[int] = Counter()
        self._unprivileged = 0
        #: Input held by all connections, and the connections holding any.
        self._held = 0
        self._holding: set[_Connection] = set()
        #: Input dropped with connections since the heap was last trimmed.
        self._released = 0
        self._trim: asyncio.TimerHandle | None = None
        self._last_trim = 0.0
        self._log_limit = _LogLimit()
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
        """Calls running in workers or waiting for one (including those of connections
        already gone)."""
        return len(self._running)

    @property
    def buffered_input(self) -> int:
        """Bytes of input held by all connections (module notes)."""
        return self._held

    # Serving

    async def serve(self, sockets: Sequence[socket.socket]) -> None:
        """Accept on the listening sockets and serve the connected ones.

        Returns after :meth:`shutdown`, or, without listening sockets, once every
        connected socket given has closed and its calls have finished.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._inbox.loop = loop
        self._done = asyncio.Event()
        for sock in sockets:
            sock.setblocking(False)
            if is_listening(sock):
                self._listeners.append(sock)
                loop.add_reader(sock.fileno(), self._on_accept, sock)
            else:
                self._given += 1
                self._add_connection(sock, peer_credentials(sock), given=True)
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
        if self._trim is not None:
            self._trim.cancel()
        self._lane.shutdown()
        self._heavy.shutdown()

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
            sock.setblocking(False)
            peer = peer_credentials(sock)
            if peer.uid not in self.privileged_uids:
                if self._per_uid[peer.uid] >= self.max_connections_per_uid:
                    self._refuse(
                        sock,
                        peer,
                        self.max_connections_per_uid,
                        f"uid {peer.uid} has {self._per_uid[peer.uid]} connections open, "
                        f"at most {self.max_connections_per_uid} are allowed",
                    )
                    continue
                if self._unprivileged >= self.max_connections:
                    self._refuse(
                        sock,
                        peer,
                        self.max_connections,
                        f"{self._unprivileged} connections are open, "
                        f"at most {self.max_connections} are allowed",
                    )
                    continue
            self._add_connection(sock, peer, given=False)

    def _refuse(self, sock: socket.socket, peer: Peer, limit: int, message: str) -> None:
        """Answer with one TooManyConnections error and disconnect."""
        self._log_limit(
            ("refused", peer.uid),
            logging.WARNING,
            "refusing a connection of pid %d (uid %d): %s",
            peer.pid,
            peer.uid,
            message,
        )
        try:
            # Whatever the peer sent already: closing with unread input would
            # reset the connection before it reads the refusal. (Fds that came
            # with it are closed by the kernel: no room was given for them.)
            sock.recv(_REFUSAL_DRAIN)
        except OSError:
            pass
        try:
            sock.send(encode_error(TOO_MANY_CONNECTIONS, {"limit": limit, "message": message}))
        except OSError:
            pass
        sock.close()

    def _resume_accepting(self, lsock: socket.socket) -> None:
        if not self._closing and lsock in self._listeners and self._loop is not None:
            self._loop.add_reader(lsock.fileno(), self._on_accept, lsock)

    def _add_connection(self, sock: socket.socket, peer: Peer, *, given: bool) -> None:
        assert self._loop is not None
        conn = _Connection(self, self._loop, sock, peer, given)
        self._conns.add(conn)
        self._per_uid[peer.uid] += 1
        if not conn.privileged:
            self._unprivileged += 1
        self.last_activity = time.monotonic()
        log.debug("%r: connected", conn)

    def _closed(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        uid = conn.peer.uid
        self._per_uid[uid] -= 1
        if not self._per_uid[uid]:
            del self._per_uid[uid]
        if not conn.privileged:
            self._unprivileged -= 1
        if conn.held:
            held, conn.held = conn.held, 0
            self._held_changed(conn, -held)
            self._input_dropped(held)
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

    # Input held

    def _held_changed(self, conn: _Connection, change: int) -> None:
        self._held += change
        if conn.held:
            self._holding.add(conn)
        else:
            self._holding.discard(conn)
        if change > 0 and self._held > self.max_buffered_input:
            self._shed_input()

    def _shed_input(self) -> None:
        """Close the connections holding the most input, privileged ones last,
        until the input held fits the budget again."""
        while self._held > self.max_buffered_input and self._holding:
            victim = max(self._holding, key=lambda c: (not c.privileged, c.held))
            self._log_limit(
                ("shed", victim.peer.uid),
                logging.WARNING,
                "%r: closing: it holds %d bytes of input and all connections together more than %d",
                victim,
                victim.held,
                self.max_buffered_input,
            )
            self._holding.discard(victim)
            victim._lost()

    def _input_dropped(self, size: int) -> None:
        """``size`` bytes of input were let go without being used: once enough has
        gone, the heap is trimmed (module notes)."""
        self._released += size
        if self._released < _TRIM_AFTER or self._trim is not None or self._loop is None:
            return
        delay = max(0.0, self._last_trim + _TRIM_INTERVAL - time.monotonic())
        self._trim = self._loop.call_later(delay, self._trim_heap)

    def _trim_heap(self) -> None:
        self._trim = None
        self._released = 0
        self._last_trim = time.monotonic()
        trim_heap()

    # Calls

    def _start(self, call: _Call, msg: Message) -> None:
        self._running.add(call)
        self.last_activity = time.monotonic()
        uid = call.conn.peer.uid
        if len(msg.data) > _LOOP_PARSE_MAX:
            self._lane.submit(uid, call, lambda: self._work(call, msg), lambda: close_all(msg.fds))
            return
        # A short message is parsed, authorized and validated here (microseconds):
        # the method then goes straight to its lane, or runs here if it is inline.
        try:
            prepared = self._prepare(call, msg)
            if not isinstance(prepared, _Prepared):
                outcome = prepared
            else:
                method = prepared.envelope.method
                inline = self._inline.get(method)
                outcome = _DEFERRED
                if inline is not None and not prepared.envelope.more:
                    outcome = self._execute_inline(call, prepared, inline)
                if outcome is _DEFERRED:
                    lane = self._heavy if method in self.heavy_methods else self._lane
                    lane.submit(
                        uid,
                        call,
                        lambda: self._run_prepared(call, prepared),
                        lambda: close_all(prepared.ctx.fds),
                    )
                    return
        except BaseException:
            log.exception("%r: call processing failed", call.conn)
            outcome = _CLOSE
        call.conn._finished(call, outcome, inline=True)

    def _finished(self, call: _Call) -> None:
        self._running.discard(call)
        self.last_activity = time.monotonic()
        if not self._running:
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            if not self._given:
                self._check_done()

    def _drop_waiting(self, call: _Call) -> None:
        """``call``'s client went away: if it still waits for a worker, it never runs."""
        for lane in (self._lane, self._heavy):
            if lane.drop(call):
                call.conn._finished(call, None)
                return

    def _post(self, call: _Call, outcome: _Outcome) -> None:
        """Worker thread: hand ``outcome`` to the loop."""
        try:
            self._inbox.put(call.conn._finished, call, outcome)
        except RuntimeError:
            # The loop is closed: nobody will send anything.
            if outcome is not None:
                close_all(outcome[1])

    def _work(self, call: _Call, msg: Message) -> None:
        """Worker thread: run one call (or queue it for a heavy worker)."""
        try:
            prepared = self._prepare(call, msg)
            if not isinstance(prepared, _Prepared):
                outcome = prepared
            elif prepared.envelope.method in self.heavy_methods:
                self._hand_over(call, prepared)
                return
            else:
                outcome = self._execute(call, prepared)
        except BaseException:
            log.exception("%r: call processing failed", call.conn)
            outcome = _CLOSE
        self._post(call, outcome)

    def _run_prepared(self, call: _Call, prepared: _Prepared) -> None:
        """Worker thread: run a prepared call's method and hand its outcome to the loop."""
        try:
            outcome = self._execute(call, prepared)
        except BaseException:
            log.exception("%r: call processing failed", call.conn)
            outcome = _CLOSE
        self._post(call, outcome)

    def _hand_over(self, call: _Call, prepared: _Prepared) -> None:
        """Worker thread: queue a prepared heavy call for the heavy lane."""

        def job() -> None:
            self._run_prepared(call, prepared)

        def discard() -> None:
            close_all(prepared.ctx.fds)

        def queue() -> None:
            if call.cancelled.is_set() or self._closing:
                discard()
                call.conn._finished(call, None if call.oneway else _stopping_reply())
            else:
                self._heavy.submit(call.conn.peer.uid, call, job, discard)

        try:
            self._inbox.put(queue)
        except RuntimeError:
            close_all(prepared.ctx.fds)

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

    def _continues_sender(
        self, call: _Call, more: bool
    ) -> Callable[[dict[str, Any], list[int]], None]:
        conn = call.conn

        def send_continues(parameters: dict[str, Any], fds: list[int]) -> None:
            # Without "more" a continues reply would break the protocol: drop it.
            if not more or call.cancelled.is_set():
                close_all(fds)
                return
            data = encode_reply(parameters, continues=True)
            try:
                self._inbox.put(conn._send_continues, call, data, fds)
            except RuntimeError:
                close_all(fds)

        return send_continues

    def _prepare(self, call: _Call, msg: Message) -> _Outcome | _Prepared:
        """Parse, look up, authorize and validate: the outcome if that already
        decides the call, else the call ready to run."""
        conn = call.conn
        try:
            envelope = conn.wire.call(msg)
        except ProtocolError as e:
            close_all(msg.fds)
            log.info("%r: protocol error, closing: %s", conn, e)
            return _CLOSE
        call.oneway = envelope.oneway
        ctx = CallContext(
            peer=conn.peer,
            method=envelope.method,
            more=envelope.more,
            oneway=envelope.oneway,
            fds=list(msg.fds),
            cancelled=call.cancelled,
        )
        sender = self._continues_sender(call, envelope.more)
        ctx.send_continues_fds = sender
        ctx.send_continues = lambda parameters: sender(parameters, [])
        ctx.peer_pidfd = conn.peer_pidfd
        try:
            target = self._lookup(envelope.method)
            if self._authorize is not None and not self._authorize(conn.peer, envelope.method):
                raise VarlinkReplyError(PERMISSION_DENIED)
            try:
                target.validator.check_call(target.name, envelope.parameters)
            except InvalidParameter as e:
                raise VarlinkReplyError(INVALID_PARAMETER, {"parameter": e.parameter}) from None
        except Exception as e:
            close_all(ctx.fds)
            return self._failed(conn, envelope, ctx, e)
        return _Prepared(envelope, target, ctx, msg.data)

    def _execute_inline(self, call: _Call, prepared: _Prepared, inline: InlineMethod) -> _Outcome:
        """On the loop: a prepared call's reply from its inline method, or
        :data:`_DEFERRED` when that cannot answer now (the call keeps its fds)."""
        envelope, ctx = prepared.envelope, prepared.ctx
        try:
            out = inline(envelope.parameters, ctx)
            if out is None:
                return _DEFERRED
            reply = out if isinstance(out, bytes) else encode_reply(out)
        except Exception as e:
            close_all(ctx.fds)
            return self._failed(call.conn, envelope, ctx, e)
        close_all(ctx.fds)
        close_all(ctx.out_fds)
        ctx.out_fds = []
        return None if envelope.oneway else (reply, [])

    def _execute(self, call: _Call, prepared: _Prepared) -> _Outcome:
        """Run the method of a prepared call: its reply, with the fds it pushed."""
        envelope, target, ctx = prepared.envelope, prepared.target, prepared.ctx
        params = envelope.parameters
        ok = False
        try:
            ctx.check_cancelled()
            if self._check_call is not None:
                self._check_call(ctx, params)
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
                replies = list(self._service.handle(prepared.data, _request=ctx))
                if not replies:
                    reply = encode_reply()
                    ok = True
                else:
                    reply = b"\0".join(replies) + b"\0"
                    # Service.handle says how the call ended only in the JSON it made.
                    ok = parse_reply(replies[-1]).ok
        except Exception as e:
            return self._failed(call.conn, envelope, ctx, e)
        finally:
            close_all(ctx.fds)
        out_fds = ctx.out_fds
        ctx.out_fds = []
        if not ok or envelope.oneway:
            close_all(out_fds)
            out_fds = []
        if envelope.oneway:
            return None
        return reply, out_fds

    def _failed(
        self, conn: _Connection, envelope: Call, ctx: CallContext, e: Exception
    ) -> _Outcome:
        """The error reply for what a call raised; the fds the method pushed are closed
        (those it received are the caller's to close)."""
        if isinstance(e, VarlinkReplyError):
            reply = _error_reply(e.name, e.parameters)
        elif isinstance(e, VarlinkError):
            error = e.as_dict()
            reply = _error_reply(str(error.get("error")), error.get("parameters"))
        elif isinstance(e, CallCancelled):
            reply = _error_reply(SYSTEM_ERROR, {"message": str(e), "errnoName": "ECANCELED"})
        else:
            log.error("%r: %s failed", conn, envelope.method, exc_info=e)
            reply = _error_reply(SYSTEM_ERROR, _system_error(e))
        close_all(ctx.out_fds)
        ctx.out_fds = []
        if envelope.oneway:
            return None
        return reply, []

    # Stopping

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting and reading; let running calls finish for up to ``grace``
        seconds, then cancel the rest (``ctx.cancelled``) and wait for them; close
        every connection. Calls still waiting for a heavy worker are cancelled at
        once. :meth:`serve` returns afterwards."""
        if self._closing:
            if self._done is not None:
                await self._done.wait()
            return
        self._closing = True
        self._stop_accepting()
        loop = self._loop
        if loop is not None:
            for call in self._heavy.waiting():
                call.cancelled.set()
                self._heavy.drop(call)
                call.conn._finished(call, None if call.oneway else _stopping_reply())
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
        if self._trim is not None:
            self._trim.cancel()
        self._lane.shutdown()
        self._heavy.shutdown()
        if self._done is not None:
            self._done.set()
