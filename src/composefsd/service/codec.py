"""The Varlink wire format without any I/O (h11's model): framing, message records,
and one object per role that takes the bytes and fds a read returned and hands back
complete messages.

Varlink messages are JSON objects, each ended by one NUL byte, on a stream
socket. File descriptors travel as SCM_RIGHTS ancillary data with the *first
byte* of the message they belong to (UAPI.20 / sd-varlink); the JSON refers to
them by their index in that message's list.

Which message fds belong to is sd-varlink's rule (src/libsystemd/sd-varlink/sd-varlink.c):
``varlink_read()`` reads as much as its buffer holds, fd passing or not, and
keeps the fds of that read for the connection; ``varlink_parse_message()`` then
makes the first complete message the current one, and ``varlink_clear_current()``
closes the fds once that message is handled. So the fds of a read go to the
*first* message that starts in it, and later messages of the same read get none.
fds that come while part of a message is buffered (a read that does not start a
message) fail the connection with EPROTO. Both roles here follow that rule, so a
peer that sends several messages in one write with fds attached gets them
attached to the first. (The kernel may also join an fd-less write to the write
after it that carries fds into one read, which then attaches those fds to the
fd-less message: systemd#43823, open. sd-varlink does the same; a sender avoids
it by not sending an fd-less message right before one with fds without waiting
for its answer.)

:class:`Decoder` is that framing: fed what each ``recvmsg`` returned, it hands
back complete messages with their fds, enforcing a size limit
(:data:`MAX_MESSAGE_SIZE` by default) and an fd limit. :class:`ServerConnection`
and :class:`ClientConnection` are the two roles on top of it: the server's turns
messages into :class:`Call` records (:func:`parse_call`), the client's encodes
calls (:func:`encode_call`) and turns messages into :class:`Reply` records
(:func:`parse_reply`), checking them against the calls it sent. :func:`parse_call`
refuses anything the specification says must close the connection (invalid JSON,
a missing ``method``, wrongly typed or conflicting flags, unknown header keys),
and JSON nested deeper than :data:`MAX_DEPTH` (checked before decoding: Python's
decoder recurses once per level and would hit the interpreter's recursion limit).
The ``encode_*`` functions build replies and calls, NUL included.

Every violation raises :class:`ProtocolError`; the answer to it is to close the
connection.
"""

from __future__ import annotations

import array
import itertools
import json
import re
from collections import deque
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar, Final

__all__ = [
    "MAX_DEPTH",
    "MAX_FDS",
    "MAX_MESSAGE_SIZE",
    "Call",
    "ClientConnection",
    "Decoder",
    "Message",
    "MessageTooLarge",
    "ProtocolError",
    "Reply",
    "ServerConnection",
    "encode_call",
    "encode_error",
    "encode_reply",
    "json_depth",
    "parse_call",
    "parse_reply",
]

#: Largest message accepted, NUL excluded (sd-varlink's per-connection buffer limit,
#: VARLINK_BUFFER_MAX). A server may set a lower one.
MAX_MESSAGE_SIZE: Final = 16 << 20
#: Most fds accepted with one message.
MAX_FDS: Final = 16
#: Deepest nesting of JSON arrays and objects accepted in a message. Varlink's own
#: envelope takes two levels; the deepest io.composefs.Repository value four more.
MAX_DEPTH: Final = 64


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be closed.

    ``fds`` are descriptors the failing operation had received and not handed out:
    the caller owns them and must close them.
    """

    def __init__(self, message: str, fds: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.fds: list[int] = list(fds)


class MessageTooLarge(ProtocolError):
    """A message grew past ``limit`` bytes (``size`` of them seen so far)."""

    def __init__(self, size: int, limit: int, fds: Sequence[int] = ()) -> None:
        super().__init__(f"message of {size}+ bytes exceeds the limit of {limit}", fds)
        self.size = size
        self.limit = limit


class _Record:
    """What ``@dataclass`` would add to this module's records: a repr and equality.

    The records are written out by hand because the client loads this module, and
    ``dataclasses`` loads ``inspect`` (with ``ast``, ``dis``, ``tokenize``): about 28
    million instructions, 8 ms of every ``composefsctl`` start. They are not
    changed after they are made (``Final``, checked by mypy)."""

    __slots__ = ()
    #: The fields in the order of ``__init__``'s parameters.
    _FIELDS: ClassVar[tuple[str, ...]] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._FIELDS)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Record)
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # records of dicts and lists


class Message(_Record):
    """One complete message (NUL stripped) and the fds that came with its first byte."""

    __slots__ = _FIELDS = ("data", "fds")

    def __init__(self, data: bytes, fds: list[int] | None = None) -> None:
        self.data: Final = data
        self.fds: Final[list[int]] = [] if fds is None else fds


class Decoder:
    """Splits a byte stream into NUL-terminated messages and attaches received fds.

    ``feed(data, fds)`` takes one read: the fds must arrive with the first byte of
    a message (the read must not continue a partial message) and belong to the
    first message that starts in ``data``, as in sd-varlink's ``varlink_read()``
    (module notes). The decoder owns the fds of a partial
    message until it is complete; :meth:`discard` gives them back. A partial
    message is kept in one ``bytearray`` that grows in place, not as a list of
    chunks, so that a server holding many of them does not fragment its heap.
    """

    __slots__ = ("_broken", "_buf", "_fds", "max_fds", "max_message_size")

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE, max_fds: int = MAX_FDS) -> None:
        self.max_message_size = max_message_size
        self.max_fds = max_fds
        self._buf = bytearray()
        self._fds: list[int] = []
        self._broken = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buf)

    def discard(self) -> list[int]:
        """Drop any partial message; returns its fds (the caller closes them)."""
        fds, self._fds = self._fds, []
        self._buf = bytearray()
        return fds

    def _fail(self, message: str | int, fds: Sequence[int], out: list[Message]) -> ProtocolError:
        """The error to raise (``message`` an int: the size of a message too long);
        it owns every fd not handed out."""
        self._broken = True
        owned = set(fds)
        owned.update(self._fds)
        for msg in out:
            owned.update(msg.fds)
        self._fds = []
        self._buf = bytearray()
        if isinstance(message, int):
            return MessageTooLarge(message, self.max_message_size, sorted(owned))
        return ProtocolError(message, sorted(owned))

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Message]:
        """The messages completed by ``data``; raises :class:`ProtocolError` (whose
        ``fds`` then hold every fd not handed out) on a violation."""
        out: list[Message] = []
        if self._broken:
            raise ProtocolError("the stream already failed", fds)
        buf = self._buf
        if fds:
            if buf:
                raise self._fail("file descriptors arrived in the middle of a message", fds, out)
            if len(fds) > self.max_fds:
                raise self._fail(
                    f"{len(fds)} file descriptors with one message (at most {self.max_fds})",
                    fds,
                    out,
                )
            if not data:
                raise self._fail("file descriptors without data", fds, out)
        limit = self.max_message_size
        end = data.find(b"\0")
        if end < 0:
            if data:
                if len(buf) + len(data) > limit:
                    raise self._fail(len(buf) + len(data), fds, out)
                if not buf:
                    self._fds = list(fds)
                buf += data
            return out
        if buf:
            if len(buf) + end > limit:
                raise self._fail(len(buf) + end, fds, out)
            buf += memoryview(data)[:end]
            out.append(Message(bytes(buf), self._fds))
            self._buf = bytearray()
            self._fds = []
        else:
            out.append(Message(data[:end], list(fds)))
            if end > limit:
                raise self._fail(end, fds, out)
        start = end + 1
        while (end := data.find(b"\0", start)) >= 0:
            if end - start > limit:
                raise self._fail(end - start, fds, out)
            out.append(Message(data[start:end]))
            start = end + 1
        if start < len(data):
            if len(data) - start > limit:
                raise self._fail(len(data) - start, fds, out)
            self._buf = bytearray(memoryview(data)[start:])
        return out


class Call(_Record):
    """A method call's envelope."""

    _FIELDS = ("method", "parameters", "oneway", "more")
    __slots__ = ("method", "more", "oneway", "parameters")

    def __init__(
        self, method: str, parameters: dict[str, Any], oneway: bool = False, more: bool = False
    ) -> None:
        self.method: Final = method
        self.parameters: Final = parameters
        self.oneway: Final = oneway
        self.more: Final = more


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)
_CALL_KEYS: Final = frozenset({"method", "parameters", "oneway", "more", "upgrade"})
_REPLY_KEYS: Final = frozenset({"parameters", "continues", "error"})


# A JSON string, escapes included: what to skip when counting brackets.
_JSON_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS: Final = bytes(range(256)).translate(None, b"[]{}")
# Opening brackets become 1, closing ones -1 as signed bytes.
_BRACKET_SIGN: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_depth(data: bytes, limit: int) -> int:
    """How deeply the JSON text ``data`` nests arrays and objects, or any number up
    to ``limit`` when it cannot nest deeper than that. Exact for valid JSON; what it
    says of invalid JSON does not matter (the decoder refuses it anyway)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return 0
    signs = _JSON_STRING.sub(b"", data).translate(_BRACKET_SIGN, _NOT_BRACKETS)
    return max(itertools.accumulate(array.array("b", signs)), default=0)


def _loads(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    depth = json_depth(data, max_depth)
    if depth > max_depth:
        raise ProtocolError(f"JSON nested {depth} levels deep (at most {max_depth})")
    try:
        return _DECODER.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"malformed message (not JSON): {e}") from None


def _flag(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        raise ProtocolError(f"{key!r} must be a boolean, not {type(value).__name__}")
    return value


def parse_call(data: bytes, max_depth: int = MAX_DEPTH) -> Call:
    """The call in one message (NUL stripped); :class:`ProtocolError` if it is not one."""
    obj = _loads(data, max_depth)
    if type(obj) is not dict:
        raise ProtocolError("a call must be a JSON object")
    method = obj.get("method")
    if type(method) is not str or not method:
        raise ProtocolError("a call needs a 'method' string")
    if not method.isascii():
        try:
            method.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("the method name holds a lone surrogate") from None
    params = obj.get("parameters")
    if params is None:
        params = {}
    elif type(params) is not dict:
        raise ProtocolError("'parameters' must be an object")
    if len(obj) > 1 and not _CALL_KEYS.issuperset(obj):
        for key in obj:
            # Vendor extensions are reverse-domain names; anything else is unknown.
            if key not in _CALL_KEYS and "." not in key:
                raise ProtocolError(f"unknown key {key!r} in a call")
    oneway = _flag(obj, "oneway")
    more = _flag(obj, "more")
    if _flag(obj, "upgrade"):
        raise ProtocolError("protocol upgrades are not supported")
    if oneway and more:
        raise ProtocolError("'oneway' and 'more' are mutually exclusive")
    return Call(method, params, oneway, more)


def _default(obj: object) -> Any:
    if isinstance(obj, (set, frozenset)):
        # A [string]() set.
        return {key: {} for key in obj}
    if isinstance(obj, SimpleNamespace):
        return vars(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_default
)
# Calls escape what is not ASCII: a str holding lone surrogates (a file name that is
# not UTF-8, decoded with surrogateescape) then still goes out, and the server
# answers InvalidParameter instead of the client failing to encode it.
_CALL_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=_default
)


def encode_reply(parameters: dict[str, Any] | None = None, *, continues: bool = False) -> bytes:
    """A reply message, NUL included; ``continues`` marks one of several."""
    if continues:
        obj: dict[str, Any] = {"parameters": parameters or {}, "continues": True}
    else:
        obj = {"parameters": parameters or {}}
    return _ENCODER.encode(obj).encode() + b"\0"


def encode_error(name: str, parameters: dict[str, Any] | None = None) -> bytes:
    """An error reply message, NUL included."""
    return _ENCODER.encode({"error": name, "parameters": parameters or {}}).encode() + b"\0"


def encode_call(
    method: str,
    parameters: dict[str, Any] | None = None,
    *,
    oneway: bool = False,
    more: bool = False,
) -> bytes:
    """A call message, NUL included (for clients)."""
    obj: dict[str, Any] = {"method": method}
    if parameters:
        obj["parameters"] = parameters
    if oneway:
        obj["oneway"] = True
    if more:
        obj["more"] = True
    return _CALL_ENCODER.encode(obj).encode() + b"\0"


class Reply(_Record):
    """A reply's envelope, and the fds that came with it. ``error`` (the error's
    fully qualified name) is None for a success."""

    _FIELDS = ("parameters", "continues", "error", "fds")
    __slots__ = ("continues", "error", "fds", "parameters")

    def __init__(
        self,
        parameters: dict[str, Any],
        continues: bool = False,
        error: str | None = None,
        fds: list[int] | None = None,
    ) -> None:
        self.parameters: Final = parameters
        self.continues: Final = continues
        self.error: Final = error
        self.fds: Final[list[int]] = [] if fds is None else fds

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_reply(data: bytes, fds: list[int] | None = None) -> Reply:
    """The reply in one message (NUL stripped), checked as strictly as sd-varlink's
    ``varlink_dispatch_reply()`` does: only ``parameters``, ``continues`` and
    ``error``, and no ``continues`` on an error. ``fds`` are attached to it."""
    obj = _loads(data)
    if type(obj) is not dict:
        raise ProtocolError("the reply is not a JSON object")
    if not _REPLY_KEYS.issuperset(obj):
        raise ProtocolError(f"unknown keys in a reply: {sorted(set(obj) - _REPLY_KEYS)}")
    params = obj.get("parameters")
    if params is None:
        params = {}
    elif type(params) is not dict:
        raise ProtocolError("malformed reply: 'parameters' must be an object")
    try:
        continues = _flag(obj, "continues")
    except ProtocolError as e:
        raise ProtocolError(f"malformed reply: {e}") from None
    error = obj.get("error")
    if error is not None:
        if type(error) is not str or not error:
            raise ProtocolError("malformed error: 'error' must be a non-empty string")
        if continues:
            raise ProtocolError("an error reply cannot continue")
    return Reply(params, continues, error, [] if fds is None else fds)


class ServerConnection:
    """The server's side of one connection, without I/O: :meth:`receive_data` takes
    what a read returned and gives back the complete call messages, their fds
    attached; :meth:`call` parses one. They are separate so that a server can frame
    on its event loop and parse in a worker. Replies are :func:`encode_reply` and
    :func:`encode_error`, which hold no state."""

    __slots__ = ("_decoder", "max_depth", "receive_data")

    def __init__(
        self,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_fds: int = MAX_FDS,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self._decoder = Decoder(max_message_size, max_fds)
        self.max_depth = max_depth
        #: ``receive_data(data, fds) -> list[Message]``: the messages ``data``
        #: completed (:meth:`Decoder.feed`, bound here: it runs on every read).
        self.receive_data = self._decoder.feed

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held."""
        return self._decoder.pending

    def discard(self) -> list[int]:
        """Drop any partial message; returns its fds (the caller closes them)."""
        return self._decoder.discard()

    def call(self, message: Message) -> Call:
        """The call in ``message`` (its fds stay the caller's);
        :class:`ProtocolError` if it is not one."""
        return parse_call(message.data, self.max_depth)


class ClientConnection:
    """The client's side of one connection, without I/O: :meth:`send_call` encodes
    a call and remembers that replies are due; :meth:`receive_data` takes what a
    read returned; :meth:`next_reply` gives the next complete :class:`Reply` (fds
    attached, now the caller's), or None until more data came. A reply that does
    not fit the call it answers (one to no call, ``continues`` to a call without
    ``more``) is a :class:`ProtocolError`, as in sd-varlink."""

    __slots__ = ("_awaiting", "_decoder", "_messages")

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE, max_fds: int = MAX_FDS) -> None:
        self._decoder = Decoder(max_message_size, max_fds)
        self._messages: deque[Message] = deque()
        #: For each call sent and not finally answered, whether it asked for "more".
        self._awaiting: deque[bool] = deque()

    def send_call(
        self,
        method: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        oneway: bool = False,
        more: bool = False,
    ) -> bytes:
        """The call message to send (its fds go with its first byte)."""
        data = encode_call(
            method, dict(parameters) if parameters else None, oneway=oneway, more=more
        )
        if not oneway:
            self._awaiting.append(more)
        return data

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Take one read; :class:`ProtocolError` (owning every fd not handed out)
        if it breaks the framing."""
        self._messages.extend(self._decoder.feed(data, fds))

    def next_reply(self) -> Reply | None:
        """The next reply received, or None. On a :class:`ProtocolError` the
        connection is unusable; the error owns the reply's fds."""
        if not self._messages:
            return None
        msg = self._messages.popleft()
        try:
            reply = parse_reply(msg.data, msg.fds)
        except ProtocolError as e:
            e.fds.extend(msg.fds)
            raise
        if not self._awaiting:
            raise ProtocolError("a reply to no call", reply.fds)
        if reply.continues and not self._awaiting[0]:
            raise ProtocolError("'continues' in the reply to a call without 'more'", reply.fds)
        if not reply.continues:
            self._awaiting.popleft()
        return reply

    def discard(self) -> list[int]:
        """Drop everything received and not handed out; returns its fds (the caller
        closes them)."""
        fds = self._decoder.discard()
        for msg in self._messages:
            fds.extend(msg.fds)
        self._messages.clear()
        self._awaiting.clear()
        return fds
