"""The Varlink wire format without any I/O: framing, call envelopes and replies.

Varlink messages are JSON objects, each ended by one NUL byte, on a stream
socket. File descriptors travel as SCM_RIGHTS ancillary data with the *first
byte* of the message they belong to (UAPI.20 / sd-varlink); the JSON refers to
them by their index in that message's list.

:class:`Decoder` is fed what each ``recvmsg`` returned (bytes plus the fds that
came with them) and hands back complete messages with their fds. It enforces a
size limit and an fd limit, and refuses fds that arrive in the middle of a
message. :func:`parse_call` turns one message into a :class:`Call`, refusing
anything the specification says must close the connection (invalid JSON, a
missing ``method``, wrongly typed or conflicting flags, unknown header keys),
and JSON nested deeper than :data:`MAX_DEPTH` (checked before decoding: Python's
decoder recurses once per level and would hit the interpreter's recursion limit).
The ``encode_*`` functions build replies and calls, NUL included.

Every violation raises :class:`ProtocolError`; the transport's answer to it is to
close the connection.
"""

from __future__ import annotations

import array
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Final

__all__ = [
    "MAX_DEPTH",
    "MAX_FDS",
    "MAX_MESSAGE_SIZE",
    "Call",
    "Decoder",
    "Message",
    "ProtocolError",
    "Reply",
    "encode_call",
    "encode_error",
    "encode_reply",
    "json_depth",
    "parse_call",
    "parse_reply",
]

#: Largest message accepted, NUL excluded (sd-varlink's per-connection buffer limit).
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


@dataclass(slots=True)
class Message:
    """One complete message (NUL stripped) and the fds that came with its first byte."""

    data: bytes
    fds: list[int] = field(default_factory=list)


class Decoder:
    """Splits a byte stream into NUL-terminated messages and attaches received fds.

    ``feed(data, fds)`` takes one read: the fds must arrive with the first byte of
    a message (the read must not continue a partial message) and belong to the
    first message that starts in ``data``. The decoder owns the fds of a partial
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

    def _fail(self, message: str, fds: Sequence[int], out: list[Message]) -> ProtocolError:
        self._broken = True
        owned = set(fds)
        owned.update(self._fds)
        for msg in out:
            owned.update(msg.fds)
        self._fds = []
        self._buf = bytearray()
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
                    raise self._fail(self._too_long(len(buf) + len(data)), fds, out)
                if not buf:
                    self._fds = list(fds)
                buf += data
            return out
        if buf:
            if len(buf) + end > limit:
                raise self._fail(self._too_long(len(buf) + end), fds, out)
            buf += memoryview(data)[:end]
            out.append(Message(bytes(buf), self._fds))
            self._buf = bytearray()
            self._fds = []
        else:
            out.append(Message(data[:end], list(fds)))
            if end > limit:
                raise self._fail(self._too_long(end), fds, out)
        start = end + 1
        while (end := data.find(b"\0", start)) >= 0:
            if end - start > limit:
                raise self._fail(self._too_long(end - start), fds, out)
            out.append(Message(data[start:end]))
            start = end + 1
        if start < len(data):
            if len(data) - start > limit:
                raise self._fail(self._too_long(len(data) - start), fds, out)
            self._buf = bytearray(memoryview(data)[start:])
        return out

    def _too_long(self, size: int) -> str:
        return f"message of {size}+ bytes exceeds the limit of {self.max_message_size}"


@dataclass(slots=True, frozen=True)
class Call:
    """A method call's envelope."""

    method: str
    parameters: dict[str, Any]
    oneway: bool = False
    more: bool = False


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
        raise ProtocolError(f"malformed message: {e}") from None


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
    return _ENCODER.encode(obj).encode() + b"\0"


@dataclass(slots=True, frozen=True)
class Reply:
    """A reply's envelope (for clients)."""

    parameters: dict[str, Any]
    continues: bool = False
    error: str | None = None


def parse_reply(data: bytes) -> Reply:
    """The reply in one message (NUL stripped), checked as strictly as sd-varlink does:
    only ``parameters``, ``continues`` and ``error``, and no ``continues`` on an error."""
    obj = _loads(data)
    if type(obj) is not dict:
        raise ProtocolError("a reply must be a JSON object")
    if not _REPLY_KEYS.issuperset(obj):
        raise ProtocolError(f"unknown keys in a reply: {sorted(set(obj) - _REPLY_KEYS)}")
    params = obj.get("parameters")
    if params is None:
        params = {}
    elif type(params) is not dict:
        raise ProtocolError("'parameters' must be an object")
    continues = _flag(obj, "continues")
    error = obj.get("error")
    if error is not None:
        if type(error) is not str or not error:
            raise ProtocolError("'error' must be a non-empty string")
        if continues:
            raise ProtocolError("an error reply cannot continue")
    return Reply(params, continues, error)
