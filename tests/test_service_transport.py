"""composefsd.service's Varlink transport, over raw sockets: framing, pipelining, oneway,
more/continues, malformed input, strict parameter validation, fd passing both ways and
fd hygiene, limits, errors, authorization, concurrency, cancellation, shutdown, the
connected-socket mode, and interop with varlink 31's client and systemd's varlinkctl.

The server runs in the test's event loop, with the org.example.test interface of
tests/data; clients are non-blocking sockets driven by the same loop.
"""

from __future__ import annotations

import array
import asyncio
import importlib.util
import itertools
import json
import logging
import os
import socket
import sys
import threading
import time
import types
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import varlink

from composefsd.kernel.syscalls import MNT_DETACH, move_mount, umount2
from composefsd.service import transport
from composefsd.service.activation import listen_unix
from composefsd.service.codec import (
    MAX_DEPTH,
    Decoder,
    ProtocolError,
    encode_call,
    encode_error,
    encode_reply,
    json_depth,
    parse_call,
    parse_reply,
)
from composefsd.service.context import CallContext, Peer, VarlinkReplyError
from composefsd.service.transport import Server
from composefsd.service.validate import InterfaceValidator, InvalidParameter

DATA = Path(__file__).resolve().parent / "data"
IDL = DATA / "org.example.test.varlink"
T = "org.example.test."
SYSTEM_ERROR = "io.composefs.Repository.SystemError"
INVALID = "org.varlink.service.InvalidParameter"
TOO_MANY = "io.composefs.Repository.TooManyConnections"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_service", DATA / "example_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["example_service"] = module
    spec.loader.exec_module(module)
    return module


example = _load_example()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Closed(Exception):
    """The server closed the connection."""


class Client:
    """A raw Varlink client on a non-blocking socket, run by the test's loop.

    Every reply is checked against the protocol (top-level keys, ``continues`` only
    with ``more``) and, if the interface is known, against the method's out type.
    """

    def __init__(self, sock: socket.socket, validators: dict[str, InterfaceValidator]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.validators = validators
        self.loop = asyncio.get_running_loop()
        self.decoder = Decoder(max_message_size=1 << 30, max_fds=253)
        self.messages: deque[tuple[bytes, list[int]]] = deque()
        self.eof = False

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            n = self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
            if n < len(data):
                await self.loop.sock_sendall(self.sock, data[n:])
        else:
            await self.loop.sock_sendall(self.sock, data)

    async def _readable(self, timeout: float) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_reader(fd, ready)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self.loop.remove_reader(fd)

    async def _fill(self, timeout: float) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(
                    1 << 20, socket.CMSG_SPACE(253 * 4), socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await self._readable(timeout)
                continue
            except ConnectionResetError:
                data, anc = b"", []
            break
        fds: list[int] = []
        for level, kind, raw in anc:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            got = array.array("i")
            got.frombytes(raw)
            fds.extend(got)
        if not data:
            assert not fds
            self.eof = True
            raise Closed()
        for msg in self.decoder.feed(data, fds):
            self.messages.append((msg.data, msg.fds))

    async def recv_raw(self, timeout: float = 10.0) -> tuple[bytes, list[int]]:
        while not self.messages:
            await self._fill(timeout)
        return self.messages.popleft()

    async def recv(
        self, method: str | None = None, *, more: bool = False, timeout: float = 10.0
    ) -> tuple[dict[str, Any], list[int]]:
        """One reply, as a dict, with its fds."""
        data, fds = await self.recv_raw(timeout)
        reply = json.loads(data)
        assert set(reply) <= {"parameters", "continues", "error"}, reply
        assert isinstance(reply.get("parameters", {}), dict), reply
        if reply.get("continues"):
            assert more, f"continues without more: {reply}"
            assert "error" not in reply, reply
        parse_reply(data)
        if method is not None:
            interface, _, name = method.rpartition(".")
            validator = self.validators.get(interface)
            error = reply.get("error")
            if validator is not None and error is None:
                validator.check_reply(name, reply.get("parameters", {}))
            elif error is not None:
                iface, _, ename = error.rpartition(".")
                v = self.validators.get(iface)
                if v is not None and iface != "org.varlink.service":
                    v.check_error(ename, reply.get("parameters", {}))
        return reply, fds

    async def call(
        self,
        method: str,
        parameters: dict[str, Any] | None = None,
        *,
        fds: list[int] | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """One call without fds in the reply (it asserts there are none)."""
        reply, got = await self.call_fds(method, parameters, fds=fds, timeout=timeout)
        assert not got
        return reply

    async def call_fds(
        self,
        method: str,
        parameters: dict[str, Any] | None = None,
        *,
        fds: list[int] | None = None,
        timeout: float = 10.0,
    ) -> tuple[dict[str, Any], list[int]]:
        await self.send(encode_call(method, parameters), fds)
        return await self.recv(method, timeout=timeout)

    async def more(
        self, method: str, parameters: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        await self.send(encode_call(method, parameters, more=True))
        replies = []
        while True:
            reply, fds = await self.recv(method, more=True)
            assert not fds
            replies.append(reply)
            if not reply.get("continues"):
                return replies

    async def assert_closed(self, timeout: float = 10.0) -> None:
        """The server closes the connection (without sending anything first)."""
        with pytest.raises(Closed):
            data, fds = await self.recv_raw(timeout)
            close_all(fds)
            raise AssertionError(f"got {data!r} instead of the connection closing")

    def close(self) -> None:
        for _, fds in self.messages:
            close_all(fds)
        self.messages.clear()
        self.sock.close()


class Harness:
    def __init__(self, server: Server, path: Path, listener: socket.socket, impl: Any) -> None:
        self.server = server
        self.path = path
        self.listener = listener
        self.impl = impl
        self.task: asyncio.Task[None] = asyncio.create_task(server.serve([listener]))
        self.clients: list[Client] = []
        self.validators = {
            name: InterfaceValidator(interface)
            for name, interface in server._service.interfaces.items()
        }

    async def connect(self) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(self.path))
        client = Client(sock, self.validators)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        await self.server.shutdown(grace=2.0)
        await asyncio.wait_for(self.task, 10)
        for client in self.clients:
            client.close()
        self.listener.close()


Start = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    harnesses: list[Harness] = []

    async def _start(**kwargs: Any) -> Harness:
        service, impl = example.make_service()
        server = Server(service, **kwargs)
        path = tmp_path / f"s{len(harnesses)}"
        harness = Harness(server, path, listen_unix(str(path)), impl)
        harnesses.append(harness)
        return harness

    yield _start
    for harness in harnesses:
        await harness.stop()


@pytest.fixture
async def served(start: Start) -> Harness:
    return await start()


@pytest.fixture
async def client(served: Harness) -> Client:
    return await served.connect()


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def get(q: Any, timeout: float = 5.0) -> Any:
    return await asyncio.to_thread(q.get, timeout=timeout)


# Sans-IO: framing and envelopes


def test_decoder_splits_merged_and_joins_split_messages() -> None:
    d = Decoder()
    assert [m.data for m in d.feed(b'{"a":1}\0{"b":2}\0{"c"')] == [b'{"a":1}', b'{"b":2}']
    assert d.pending == 4
    assert d.feed(b":3") == []
    assert [m.data for m in d.feed(b"}\0")] == [b'{"c":3}']
    assert [m.data for m in d.feed(b"\0")] == [b""]
    assert d.feed(b"") == []
    assert d.pending == 0


def test_decoder_attaches_fds_to_the_message_they_start() -> None:
    d = Decoder()
    # fds with a chunk that starts a message belong to that message only.
    msgs = d.feed(b"one\0two\0", [10, 11])
    assert [(m.data, m.fds) for m in msgs] == [(b"one", [10, 11]), (b"two", [])]
    # ...even when the message completes in a later chunk.
    assert d.feed(b"thr", [12]) == []
    msgs = d.feed(b"ee\0four\0")
    assert [(m.data, m.fds) for m in msgs] == [(b"three", [12]), (b"four", [])]
    assert d.discard() == []
    d.feed(b"partial", [13])
    assert d.discard() == [13]


def test_decoder_refuses_fds_in_the_middle_of_a_message() -> None:
    d = Decoder()
    d.feed(b"par", [5])
    with pytest.raises(ProtocolError, match="middle of a message") as info:
        d.feed(b"tial\0", [6, 7])
    assert sorted(info.value.fds) == [5, 6, 7]
    with pytest.raises(ProtocolError, match="already failed"):
        d.feed(b"x\0")


def test_decoder_limits() -> None:
    d = Decoder(max_message_size=8, max_fds=2)
    assert [m.data for m in d.feed(b"12345678\0")] == [b"12345678"]
    with pytest.raises(ProtocolError, match="3 file descriptors") as info:
        d.feed(b"x\0", [1, 2, 3])
    assert info.value.fds == [1, 2, 3]
    d = Decoder(max_message_size=8)
    with pytest.raises(ProtocolError, match="exceeds the limit of 8"):
        d.feed(b"123456789\0")
    d = Decoder(max_message_size=8)
    d.feed(b"12345", [4])
    with pytest.raises(ProtocolError, match="exceeds") as info:
        d.feed(b"6789")
    assert info.value.fds == [4]
    d = Decoder(max_message_size=8)
    with pytest.raises(ProtocolError) as info:
        d.feed(b"ok\0toolongmessage\0", [9])
    assert info.value.fds == [9]
    with pytest.raises(ProtocolError, match="without data"):
        Decoder().feed(b"", [3])


def test_parse_call() -> None:
    call = parse_call(b'{"method":"a.b.C","parameters":{"x":1},"more":true}')
    assert (call.method, call.parameters, call.more, call.oneway) == (
        "a.b.C",
        {"x": 1},
        True,
        False,
    )
    call = parse_call(b' {"method":"a.b.C","parameters":null,"oneway":true,"more":false} ')
    assert (call.parameters, call.oneway, call.more) == ({}, True, False)
    # Vendor extensions are objects under reverse-domain keys.
    assert parse_call(b'{"method":"a.b.C","org.example.x":{}}').method == "a.b.C"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "malformed"),
        (b"{", "malformed"),
        (b'{"method":"a.b.C"} x', "malformed"),
        (b"\xff", "malformed"),
        (b'{"method":"a.b.C","parameters":{"x":NaN}}', "malformed"),
        (b"[]", "JSON object"),
        (b"null", "JSON object"),
        (b'{"parameters":{}}', "'method'"),
        (b'{"method":1}', "'method'"),
        (b'{"method":""}', "'method'"),
        (b'{"method":"a.b.C","parameters":[]}', "'parameters'"),
        (b'{"method":"a.b.C","parameters":"x"}', "'parameters'"),
        (b'{"method":"a.b.C","oneway":"yes"}', "'oneway' must be a boolean"),
        (b'{"method":"a.b.C","more":1}', "'more' must be a boolean"),
        (b'{"method":"a.b.C","oneway":true,"more":true}', "mutually exclusive"),
        (b'{"method":"a.b.C","upgrade":true}', "upgrade"),
        (b'{"method":"a.b.C","bogus":1}', "unknown key 'bogus'"),
    ],
)
def test_parse_call_refuses(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_call(raw)


def test_json_nesting_limit() -> None:
    def call_at(depth: int) -> bytes:
        # The envelope and "parameters" are two levels; the rest is one array deep each.
        inner = b"[" * (depth - 2) + b"]" * (depth - 2)
        return b'{"method":"a.b.C","parameters":{"x":' + inner + b"}}"

    assert json_depth(call_at(10), 5) == 10
    assert json_depth(call_at(MAX_DEPTH + 1), MAX_DEPTH) == MAX_DEPTH + 1
    parse_call(call_at(MAX_DEPTH))
    with pytest.raises(ProtocolError, match=f"nested {MAX_DEPTH + 1} levels deep"):
        parse_call(call_at(MAX_DEPTH + 1))
    with pytest.raises(ProtocolError, match="nested 100000 levels"):
        parse_call(b"[" * 100_000 + b"]" * 100_000)
    # Unclosed: refused before the decoder sees it, too.
    with pytest.raises(ProtocolError, match="nested 100000 levels"):
        parse_call(b'{"method":"a.b.C","parameters":{"x":' + b"[" * 99_998)
    # Brackets in strings, escaped quotes included, are not nesting.
    text = '[{\\"' * 1000
    call = parse_call(b'{"method":"a.b.C","parameters":{"x":"' + text.encode() + b'"}}')
    assert call.parameters["x"] == '[{"' * 1000
    with pytest.raises(ProtocolError, match="nested"):
        parse_reply(b'{"parameters":{"x":' + b"[" * 500 + b"]" * 500 + b"}}")
    assert parse_call(call_at(8), max_depth=8).method == "a.b.C"
    with pytest.raises(ProtocolError, match="at most 7"):
        parse_call(call_at(8), max_depth=7)


def test_replies_encode_and_parse() -> None:
    assert encode_reply({"a": 1}) == b'{"parameters":{"a":1}}\0'
    assert encode_reply({"a": 1}, continues=True) == b'{"parameters":{"a":1},"continues":true}\0'
    assert encode_reply() == b'{"parameters":{}}\0'
    assert encode_reply({"s": {"x"}}) == b'{"parameters":{"s":{"x":{}}}}\0'
    assert (
        encode_error("a.b.E", {"x": "é"}) == '{"error":"a.b.E","parameters":{"x":"é"}}\0'.encode()
    )
    with pytest.raises(ValueError):
        encode_reply({"x": float("nan")})
    assert encode_call("a.b.C", {}, oneway=True) == b'{"method":"a.b.C","oneway":true}\0'
    reply = parse_reply(b'{"parameters":{"a":1},"continues":true}')
    assert (reply.parameters, reply.continues, reply.error) == ({"a": 1}, True, None)
    assert parse_reply(b'{"error":"a.b.E"}').error == "a.b.E"
    with pytest.raises(ProtocolError, match="cannot continue"):
        parse_reply(b'{"error":"a.b.E","continues":true}')
    with pytest.raises(ProtocolError, match="unknown keys"):
        parse_reply(b'{"parameters":{},"extra":1}')


# Introspection and plain calls


async def test_get_info(client: Client) -> None:
    reply = await client.call("org.varlink.service.GetInfo")
    assert reply["parameters"] == {
        "vendor": "composefsd tests",
        "product": "example",
        "version": "1",
        "url": "https://example.org",
        "interfaces": ["org.varlink.service", "org.example.test"],
    }


async def test_get_interface_description_is_the_file(client: Client) -> None:
    reply = await client.call(
        "org.varlink.service.GetInterfaceDescription", {"interface": "org.example.test"}
    )
    assert reply["parameters"]["description"] == IDL.read_text()
    reply = await client.call(
        "org.varlink.service.GetInterfaceDescription", {"interface": "org.example.nope"}
    )
    assert reply == {
        "error": "org.varlink.service.InterfaceNotFound",
        "parameters": {"interface": "org.example.nope"},
    }


ECHO_FULL: dict[str, Any] = {
    "text": "hé\u2603",
    "number": -(2**63),
    "ratio": 0.25,
    "flag": False,
    "color": "green",
    "ranges": [{"inside": 0, "outside": 1000, "count": 65536}],
    "labels": {"a": "b", "": ""},
    "names": {"x": {}, "y": {}},
    "item": {"name": "a", "tags": [], "child": {"name": "b", "ratio": 1}},
    "blob": {"anything": [1, "two", None, {"x": True}]},
    "nested": {"a": 1, "b": {"c": [True, False], "d": [1, None, 2**64 - 1]}},
}


async def test_echo_every_type(client: Client) -> None:
    reply = await client.call(T + "Echo", ECHO_FULL)
    assert reply == {"parameters": ECHO_FULL}
    # null is absent for nullable fields; an int is a valid float.
    reply = await client.call(T + "Echo", {"text": "x", "number": None, "ratio": 3})
    assert reply == {"parameters": {"text": "x", "ratio": 3}}


async def test_unknown_interface_and_method(client: Client) -> None:
    for method, error in [
        ("org.example.nope.Echo", {"interface": "org.example.nope"}),
        ("NoDots", {"interface": "NoDots"}),
    ]:
        reply = await client.call(method)
        assert reply == {"error": "org.varlink.service.InterfaceNotFound", "parameters": error}
    reply = await client.call(T + "Nope")
    assert reply == {
        "error": "org.varlink.service.MethodNotFound",
        "parameters": {"method": T + "Nope"},
    }
    # A type or an error is not a method.
    reply = await client.call(T + "Color")
    assert reply["error"] == "org.varlink.service.MethodNotFound"
    # The connection stays usable.
    assert (await client.call(T + "Echo", {"text": "still"}))["parameters"] == {"text": "still"}


async def test_unimplemented_method(client: Client) -> None:
    reply = await client.call(T + "Unimplemented")
    assert reply == {
        "error": "org.varlink.service.MethodNotImplemented",
        "parameters": {"method": "Unimplemented"},
    }


async def test_methods_with_other_keywords_go_through_service_handle(client: Client) -> None:
    assert await client.call(T + "Legacy", {"text": "x"}) == {
        "parameters": {"text": "x", "more": False}
    }
    assert await client.more(T + "Legacy", {"text": "y"}) == [
        {"parameters": {"text": "y", "more": True}}
    ]
    assert await client.call(T + "Legacy", {"text": "fail"}) == {
        "error": T + "Refused",
        "parameters": {"reason": "legacy"},
    }
    # Validated strictly all the same.
    reply = await client.call(T + "Legacy", {"text": "x", "more": True})
    assert reply == {"error": INVALID, "parameters": {"parameter": "more"}}


# Framing, pipelining, oneway, more


async def test_split_and_merged_messages(client: Client) -> None:
    call = encode_call(T + "Echo", {"text": "split"})
    for piece in (call[:1], call[1:10], call[10:-1], call[-1:]):
        await client.send(piece)
        await asyncio.sleep(0.02)
    assert (await client.recv())[0] == {"parameters": {"text": "split"}}
    # Two calls and the start of a third in one write, the rest in the next.
    third = encode_call(T + "Echo", {"text": "3"})
    await client.send(
        encode_call(T + "Echo", {"text": "1"}) + encode_call(T + "Echo", {"text": "2"}) + third[:5]
    )
    await asyncio.sleep(0.02)
    await client.send(third[5:])
    for text in ("1", "2", "3"):
        assert (await client.recv(T + "Echo"))[0] == {"parameters": {"text": text}}


async def test_pipelined_calls_answer_in_order(served: Harness, client: Client) -> None:
    await client.send(
        encode_call(T + "Sleep", {"seconds": 0.2})
        + encode_call(T + "Echo", {"text": "a"})
        + encode_call(T + "Nope")
        + encode_call(T + "Echo", {"text": "b"})
    )
    first, _ = await client.recv(T + "Sleep")
    assert first["parameters"]["slept"] >= 0.2
    assert (await client.recv())[0] == {"parameters": {"text": "a"}}
    assert (await client.recv())[0]["error"] == "org.varlink.service.MethodNotFound"
    assert (await client.recv())[0] == {"parameters": {"text": "b"}}


async def test_many_pipelined_calls(client: Client) -> None:
    # More than the server queues before it stops reading, unread until all are sent.
    count = 500
    await client.send(
        b"".join(encode_call(T + "Echo", {"number": i, "text": ""}) for i in range(count))
    )
    for i in range(count):
        assert (await client.recv())[0] == {"parameters": {"number": i, "text": ""}}


async def test_large_reply_to_a_slow_reader(start: Start) -> None:
    # The call is as large as the reply: above the default limit, hence a larger one.
    client = await (await start(max_message_size=16 << 20)).connect()
    big = "x" * (8 << 20)
    await client.send(
        encode_call(T + "Echo", {"text": big}) + encode_call(T + "Echo", {"text": "after"})
    )
    await asyncio.sleep(0.2)
    assert (await client.recv())[0] == {"parameters": {"text": big}}
    assert (await client.recv())[0] == {"parameters": {"text": "after"}}


async def test_oneway_calls_get_no_reply(served: Harness, client: Client) -> None:
    await client.send(
        encode_call(T + "Sleep", {"seconds": 0.05, "tag": "oneway"}, oneway=True)
        + encode_call(T + "Nope", oneway=True)
        + encode_call(T + "Echo", {"bogus": 1}, oneway=True)
        + encode_call(T + "Fail", {"kind": "runtime", "message": "quiet"}, oneway=True)
        + encode_call(T + "MakePipes", {"count": 2, "text": "x"}, oneway=True)
        + encode_call(T + "Echo", {"text": "answered"})
    )
    assert (await client.recv(T + "Echo"))[0] == {"parameters": {"text": "answered"}}
    assert await get(served.impl.ended) == ("oneway", "done")
    with pytest.raises(TimeoutError):
        await client.recv_raw(timeout=0.3)


async def test_more_streams_continues_as_produced(client: Client) -> None:
    await client.send(encode_call(T + "Count", {"count": 3, "delay": 0.3}, more=True))
    times, replies = [], []
    while True:
        reply, fds = await client.recv(T + "Count", more=True)
        assert not fds
        times.append(time.monotonic())
        replies.append(reply)
        if not reply.get("continues"):
            break
    assert replies == [
        {"parameters": {"i": 0}, "continues": True},
        {"parameters": {"i": 1}, "continues": True},
        {"parameters": {"i": 2}, "continues": True},
        {"parameters": {"i": 3}},
    ]
    # The first reply came long before the last: nothing was held back.
    assert times[-1] - times[0] >= 0.6


async def test_many_continues_precede_the_final_reply(client: Client) -> None:
    replies = await client.more(T + "Count", {"count": 2000})
    assert [r["parameters"]["i"] for r in replies] == list(range(2001))
    assert all(r.get("continues") for r in replies[:-1])


async def test_no_continues_without_more(client: Client) -> None:
    assert await client.call(T + "Count", {"count": 3}) == {"parameters": {"i": 3}}
    with pytest.raises(TimeoutError):
        await client.recv_raw(timeout=0.2)


# Malformed input closes the connection, and only that


@pytest.mark.parametrize(
    "raw",
    [
        b"{\0",
        b"\0",
        b"[]\0",
        b'"str"\0',
        b"\xff\xfe\0",
        b'{"parameters":{}}\0',
        b'{"method":7}\0',
        b'{"method":"org.example.test.Echo","parameters":[]}\0',
        b'{"method":"org.example.test.Echo","parameters":{"text":"x"},"oneway":true,"more":true}\0',
        b'{"method":"org.example.test.Echo","parameters":{"text":"x"},"upgrade":true}\0',
        b'{"method":"org.example.test.Echo","parameters":{"text":"x"},"more":"yes"}\0',
        b'{"method":"org.example.test.Echo","parameters":{"text":"x"},"bogus":true}\0',
        b'{"method":"org.example.test.Echo","parameters":{"text":"x","ratio":Infinity}}\0',
    ],
)
async def test_malformed_message_closes_the_connection(served: Harness, raw: bytes) -> None:
    client = await served.connect()
    # A good call first: its reply still comes; the bad one ends the connection.
    await client.send(encode_call(T + "Echo", {"text": "before"}) + raw)
    assert (await client.recv())[0] == {"parameters": {"text": "before"}}
    await client.assert_closed()
    # The server goes on serving.
    other = await served.connect()
    assert (await other.call(T + "Echo", {"text": "alive"}))["parameters"] == {"text": "alive"}


async def test_calls_queued_behind_a_malformed_one_are_dropped(served: Harness) -> None:
    client = await served.connect()
    await client.send(b"{\0" + encode_call(T + "Echo", {"text": "never"}))
    await client.assert_closed()


async def test_deeply_nested_json_is_a_protocol_error(
    served: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="composefsd.service.transport")
    client = await served.connect()
    nested = b"[" * 100_000 + b"]" * 100_000
    await client.send(
        b'{"method":"org.example.test.Echo","parameters":{"text":"x","blob":{"a":'
        + nested
        + b"}}}\0"
    )
    await client.assert_closed()
    # Logged as what it is, in one line, without a traceback.
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert any(
        "protocol error" in r.getMessage() and "100003 levels deep" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    other = await served.connect()
    assert (await other.call(T + "Echo", {"text": "alive"}))["parameters"] == {"text": "alive"}


# Lone surrogates, as JSON escapes (the encoder would refuse to write them).
SURROGATE_CASES: list[tuple[str, bytes, str]] = [
    ("Echo", b'{"text":"a\\udcffb"}', "text"),
    ("Echo", b'{"text":"x","labels":{"k":"\\ud800"}}', "labels[k]"),
    ("Echo", b'{"text":"x","labels":{"\\udcff":"v"}}', "labels[\\udcff]"),
    ("Echo", b'{"text":"x","names":{"\\udcff":{}}}', "names[\\udcff]"),
    ("Echo", b'{"text":"x","item":{"name":"n","tags":["ok","\\udfff"]}}', "item.tags[1]"),
    ("Echo", b'{"text":"x","blob":{"a":[1,{"b":"\\udcff"}]}}', "blob[a][1][b]"),
    ("Echo", b'{"text":"x","blob":{"\\udcff":1}}', "blob[\\udcff]"),
    ("Echo", b'{"text":"x","\\udcff":1}', "\\udcff"),
    ("org.varlink.service.GetInterfaceDescription", b'{"interface":"\\udcff"}', "interface"),
]


@pytest.mark.parametrize(("method", "parameters", "path"), SURROGATE_CASES)
async def test_lone_surrogates_are_invalid_parameters(
    client: Client, caplog: pytest.LogCaptureFixture, method: str, parameters: bytes, path: str
) -> None:
    caplog.set_level(logging.WARNING, logger="composefsd.service.transport")
    full = (method if "." in method else T + method).encode()
    await client.send(b'{"method":"' + full + b'","parameters":' + parameters + b"}\0")
    reply, _ = await client.recv()
    assert reply == {"error": INVALID, "parameters": {"parameter": path}}
    assert not caplog.records
    # A valid surrogate pair is one character, and fine.
    await client.send(
        b'{"method":"org.example.test.Echo","parameters":{"text":"\\ud83d\\ude00"}}\0'
    )
    assert (await client.recv())[0] == {"parameters": {"text": "\U0001f600"}}


async def test_lone_surrogate_in_the_method_name_closes_the_connection(served: Harness) -> None:
    client = await served.connect()
    await client.send(b'{"method":"org.example.test.\\udcff"}\0')
    await client.assert_closed()


async def test_vendor_extension_keys_are_ignored(client: Client) -> None:
    await client.send(
        b'{"method":"org.example.test.Echo","parameters":{"text":"x"},"org.example.ext":{"a":1}}\0'
    )
    assert (await client.recv())[0] == {"parameters": {"text": "x"}}


# Strict validation


INVALID_CASES: list[tuple[str, dict[str, Any], str]] = [
    # missing, null, unknown
    ("Echo", {}, "text"),
    ("Echo", {"text": None}, "text"),
    ("Echo", {"text": "x", "bogus": 1}, "bogus"),
    # string
    ("Echo", {"text": 1}, "text"),
    ("Echo", {"text": ["x"]}, "text"),
    # int
    ("Echo", {"text": "x", "number": True}, "number"),
    ("Echo", {"text": "x", "number": 1.5}, "number"),
    ("Echo", {"text": "x", "number": 1.0}, "number"),
    ("Echo", {"text": "x", "number": "1"}, "number"),
    ("Echo", {"text": "x", "number": 2**64}, "number"),
    ("Echo", {"text": "x", "number": -(2**63) - 1}, "number"),
    ("Count", {"count": 2.0}, "count"),
    # float
    ("Echo", {"text": "x", "ratio": "0.5"}, "ratio"),
    ("Echo", {"text": "x", "ratio": True}, "ratio"),
    # bool
    ("Echo", {"text": "x", "flag": 1}, "flag"),
    ("Echo", {"text": "x", "flag": "true"}, "flag"),
    # enum
    ("Echo", {"text": "x", "color": "purple"}, "color"),
    ("Echo", {"text": "x", "color": 0}, "color"),
    ("Fail", {"kind": "other", "message": ""}, "kind"),
    # array of structs
    ("Echo", {"text": "x", "ranges": "abc"}, "ranges"),
    ("Echo", {"text": "x", "ranges": {"inside": 1}}, "ranges"),
    ("Echo", {"text": "x", "ranges": [None]}, "ranges[0]"),
    ("Echo", {"text": "x", "ranges": [{"inside": 1, "outside": 2}]}, "ranges[0].count"),
    (
        "Echo",
        {
            "text": "x",
            "ranges": [
                {"inside": 1, "outside": 2, "count": 3},
                {"inside": 1, "outside": 2, "count": 3, "extra": 0},
            ],
        },
        "ranges[1].extra",
    ),
    (
        "Echo",
        {"text": "x", "ranges": [{"inside": 1, "outside": 2, "count": True}]},
        "ranges[0].count",
    ),
    (
        "Echo",
        {"text": "x", "ranges": [{"inside": 1, "outside": 2, "count": None}]},
        "ranges[0].count",
    ),
    # maps and sets
    ("Echo", {"text": "x", "labels": {"a": 1}}, "labels[a]"),
    ("Echo", {"text": "x", "labels": ["a"]}, "labels"),
    ("Echo", {"text": "x", "names": {"a": 1}}, "names[a]"),
    ("Echo", {"text": "x", "names": {"a": {"b": 1}}}, "names[a]"),
    ("Echo", {"text": "x", "names": ["a"]}, "names"),
    # structs
    ("Echo", {"text": "x", "item": "name"}, "item"),
    ("Echo", {"text": "x", "item": []}, "item"),
    ("Echo", {"text": "x", "item": {}}, "item.name"),
    ("Echo", {"text": "x", "item": {"name": "a", "tags": ["t", None]}}, "item.tags[1]"),
    (
        "Echo",
        {"text": "x", "item": {"name": "a", "child": {"name": "b", "tags": "xy"}}},
        "item.child.tags",
    ),
    (
        "Echo",
        {"text": "x", "item": {"name": "a", "child": {"name": "b", "nick": "c"}}},
        "item.child.nick",
    ),
    # object
    ("Echo", {"text": "x", "blob": []}, "blob"),
    ("Echo", {"text": "x", "blob": "{}"}, "blob"),
    # anonymous nested structs
    ("Echo", {"text": "x", "nested": {"b": None}}, "nested.a"),
    ("Echo", {"text": "x", "nested": {"a": 1, "b": {}}}, "nested.b.c"),
    ("Echo", {"text": "x", "nested": {"a": 1, "b": {"c": [True, 1]}}}, "nested.b.c[1]"),
    (
        "Echo",
        {"text": "x", "nested": {"a": 1, "b": {"c": [], "d": [1, None, "2"]}}},
        "nested.b.d[2]",
    ),
    # org.varlink.service is checked too
    ("org.varlink.service.GetInterfaceDescription", {}, "interface"),
    ("org.varlink.service.GetInfo", {"verbose": True}, "verbose"),
]


@pytest.mark.parametrize(("method", "parameters", "path"), INVALID_CASES)
async def test_invalid_parameter(
    client: Client, method: str, parameters: dict[str, Any], path: str
) -> None:
    full = method if "." in method else T + method
    reply = await client.call(full, parameters)
    assert reply == {"error": INVALID, "parameters": {"parameter": path}}


async def test_overflowing_float_is_invalid(client: Client) -> None:
    await client.send(
        b'{"method":"org.example.test.Echo","parameters":{"text":"x","ratio":1e999}}\0'
    )
    reply, _ = await client.recv()
    assert reply == {"error": INVALID, "parameters": {"parameter": "ratio"}}


async def test_invalid_parameters_reach_no_method(served: Harness, client: Client) -> None:
    await client.call(T + "Sleep", {"seconds": "1", "tag": "never"})
    assert served.impl.started.empty()


def test_validator_checks_replies_and_errors() -> None:
    service, _ = example.make_service()
    v = InterfaceValidator(service.interfaces["org.example.test"])
    v.check_reply("Count", {"i": 1})
    with pytest.raises(InvalidParameter) as info:
        v.check_reply("Count", {"i": 1, "extra": 2})
    assert info.value.parameter == "extra"
    with pytest.raises(InvalidParameter) as info:
        v.check_reply("WhoAmI", {"pid": 1, "uid": 0, "gid": 0, "groups": [0, "1"]})
    assert info.value.parameter == "groups[1]"
    v.check_error("Refused", {"reason": "x"})
    with pytest.raises(InvalidParameter):
        v.check_error("Refused", {})
    with pytest.raises(KeyError):
        v.check_error("Nope", {})


# File descriptors


async def test_mount_fd_is_received_and_attached(client: Client, tmp_path: Path) -> None:
    before = open_fds()
    reply, fds = await client.call_fds(T + "MakeMount", {"marker": "hello mount"})
    assert reply == {"parameters": {"mountFileDescriptor": 0}}
    assert len(fds) == 1
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        move_mount(fds[0], target)
        try:
            assert (target / "marker").read_text() == "hello mount"
            assert os.stat(target).st_dev != os.stat(tmp_path).st_dev
        finally:
            umount2(target, MNT_DETACH)
    finally:
        os.close(fds[0])
    # The server closed its copy.
    assert open_fds() == before


async def test_several_fds_in_one_reply(client: Client) -> None:
    before = open_fds()
    reply, fds = await client.call_fds(T + "MakePipes", {"count": 3, "text": "pipe"})
    assert reply == {"parameters": {"fileDescriptors": [0, 1, 2]}}
    assert len(fds) == 3
    for fd in fds:
        assert os.read(fd, 100) == b"pipe"
        os.close(fd)
    assert open_fds() == before


async def test_fds_with_continues_replies(client: Client) -> None:
    """sd-varlink allows fds on any reply: a method hands out one batch per
    ``continues`` reply, each reply's fds arriving with it, in order."""
    before = open_fds()
    await client.send(encode_call(T + "PipeStream", {"count": 3, "text": "frame"}, more=True))
    got: list[tuple[dict[str, Any], list[int]]] = []
    while not got or got[-1][0].get("continues"):
        got.append(await client.recv(T + "PipeStream", more=True))
    assert [reply for reply, _ in got] == [
        {"parameters": {"fileDescriptors": [0]}, "continues": True},
        {"parameters": {"fileDescriptors": [0]}, "continues": True},
        {"parameters": {"fileDescriptors": [0]}},
    ]
    assert [len(fds) for _, fds in got] == [1, 1, 1]
    for _, fds in got:
        assert os.read(fds[0], 100) == b"frame"
        close_all(fds)
    # Without "more" every fd comes with the one reply.
    reply, fds = await client.call_fds(T + "PipeStream", {"count": 3, "text": "x"})
    assert reply == {"parameters": {"fileDescriptors": [0, 1, 2]}}
    assert len(fds) == 3
    close_all(fds)
    assert open_fds() == before


def test_continues_fds_without_more_are_closed() -> None:
    sent: list[tuple[dict[str, Any], list[int]]] = []
    for more in (False, True):
        ctx = CallContext(Peer(1, 0, 0), T + "PipeStream", more=more)
        ctx.send_continues_fds = lambda params, fds: sent.append((params, fds))
        r, w = os.pipe()
        ctx.continues_with_fds({"n": 1}, [r])
        if more:
            assert sent == [({"n": 1}, [r])]
            os.close(r)
        else:
            with pytest.raises(OSError):
                os.fstat(r)
        os.close(w)


async def test_continues_fds_of_a_client_gone_are_closed(served: Harness) -> None:
    """Frames the transport can no longer send (the client went away) close their fds."""
    client = await served.connect()
    await wait_for(lambda: served.server.connections == 1)
    before = open_fds()
    await client.send(encode_call(T + "PipeStream", {"count": 50, "text": "gone"}, more=True))
    client.close()
    await wait_for(lambda: served.server.calls_in_flight == 0 and served.server.connections == 0)
    # Both ends of the connection are gone, and every pipe with them.
    await wait_for(lambda: open_fds() == before - 2)


async def test_fds_from_the_client(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("from the client")
    before = open_fds()
    fd = os.open(path, os.O_RDONLY)
    reply = await client.call(T + "ReadFd", {"fileDescriptor": 0}, fds=[fd])
    os.close(fd)
    assert reply == {"parameters": {"data": "from the client"}}
    # Taken by the method and closed by it; the rest closed by the transport.
    fds = [os.open(path, os.O_RDONLY) for _ in range(3)]
    reply = await client.call(T + "ReadFd", {"fileDescriptor": 2}, fds=fds)
    close_all(fds)
    assert reply == {"parameters": {"data": "from the client"}}
    assert open_fds() == before


async def test_fds_not_taken_are_closed(client: Client) -> None:
    before = open_fds()
    r, w = os.pipe()
    fds = [r, w, os.dup(r)]
    calls: list[tuple[str, dict[str, Any]]] = [
        (T + "IgnoreFds", {}),
        (T + "Nope", {}),
        (T + "Echo", {"bogus": 1}),
        (T + "Fail", {"kind": "runtime", "message": "x"}),
        (T + "ReadFd", {"fileDescriptor": 5}),
    ]
    for method, params in calls:
        await client.call(method, params, fds=fds)
        assert open_fds() == before + 3
    close_all(fds)
    assert open_fds() == before


async def test_bad_fd_index_is_invalid_parameter(client: Client, tmp_path: Path) -> None:
    reply = await client.call(T + "ReadFd", {"fileDescriptor": 0})
    assert reply == {"error": INVALID, "parameters": {"parameter": "fileDescriptor"}}
    fd = os.open(tmp_path, os.O_RDONLY)
    reply = await client.call(T + "ReadFd", {"fileDescriptor": 1}, fds=[fd])
    assert reply == {"error": INVALID, "parameters": {"parameter": "fileDescriptor"}}
    os.close(fd)


async def test_reply_fds_are_closed_when_the_call_fails(client: Client) -> None:
    before = open_fds()
    reply = await client.call(T + "Fail", {"kind": "pushfail", "message": "after push"})
    assert reply == {"error": SYSTEM_ERROR, "parameters": {"message": "after push"}}
    assert open_fds() == before


async def test_too_many_fds_close_the_connection(start: Start, tmp_path: Path) -> None:
    harness = await start(max_fds=4)
    client = await harness.connect()
    await wait_for(lambda: harness.server.connections == 1)
    before = open_fds()
    fds = [os.open(tmp_path, os.O_RDONLY) for _ in range(5)]
    reply = await client.call(T + "IgnoreFds", fds=fds[:4])
    assert reply == {"parameters": {}}
    await client.send(encode_call(T + "IgnoreFds"), fds)
    await client.assert_closed()
    close_all(fds)
    await wait_for(lambda: harness.server.connections == 0)
    assert open_fds() == before - 1  # the server's end of the connection


async def test_fds_in_the_middle_of_a_message_close_the_connection(
    served: Harness, client: Client, tmp_path: Path
) -> None:
    call = encode_call(T + "IgnoreFds")
    await client.send(call[:5])
    await asyncio.sleep(0.05)
    fd = os.open(tmp_path, os.O_RDONLY)
    await client.send(call[5:], [fd])
    os.close(fd)
    await client.assert_closed()


async def test_fds_of_one_write_go_to_its_first_call(client: Client, tmp_path: Path) -> None:
    """A call without fds and one with fds in one write (one sendmsg, the fds
    attached): the fds came with the first call's first byte, so they are the first
    call's, as sd-varlink has it (varlink_read: the codec's module notes); the second
    call has none."""
    path = tmp_path / "f"
    path.write_text("in one write")
    before = open_fds()
    fd = os.open(path, os.O_RDONLY)
    two = encode_call(T + "IgnoreFds") + encode_call(T + "ReadFd", {"fileDescriptor": 0})
    await client.send(two, [fd])
    assert (await client.recv(T + "IgnoreFds")) == ({"parameters": {}}, [])
    reply, _ = await client.recv(T + "ReadFd")
    assert reply == {"error": INVALID, "parameters": {"parameter": "fileDescriptor"}}
    # The first call does get them: it can use them.
    two = encode_call(T + "ReadFd", {"fileDescriptor": 0}) + encode_call(T + "IgnoreFds")
    await client.send(two, [fd])
    assert (await client.recv(T + "ReadFd")) == ({"parameters": {"data": "in one write"}}, [])
    assert (await client.recv(T + "IgnoreFds")) == ({"parameters": {}}, [])
    os.close(fd)
    # Closed after the call that got them, taken or not.
    assert open_fds() == before


async def test_message_size_limit(start: Start) -> None:
    harness = await start(max_message_size=1000)
    client = await harness.connect()
    ok = encode_call(T + "Echo", {"text": "x" * 900})
    assert len(ok) <= 1001
    await client.send(ok)
    assert (await client.recv())[0] == {"parameters": {"text": "x" * 900}}
    # Too long even before its NUL arrives.
    await client.send(b'{"method":"org.example.test.Echo","parameters":{"text":"' + b"x" * 1000)
    await client.assert_closed()
    client = await harness.connect()
    await client.send(encode_call(T + "Echo", {"text": "x" * 1000}))
    await client.assert_closed()


def _partial(text_size: int) -> bytes:
    """The first bytes of an Echo call whose text goes on and on."""
    return b'{"method":"org.example.test.Echo","parameters":{"text":"' + b"x" * text_size


async def test_input_budget_closes_the_largest_holders(start: Start) -> None:
    # Nobody privileged here: every connection may be closed.
    harness = await start(
        max_message_size=200 << 10, max_buffered_input=500 << 10, privileged_uids=frozenset()
    )
    server = harness.server
    sizes = {"a": 150 << 10, "b": 180 << 10, "c": 100 << 10}
    clients = {name: await harness.connect() for name in sizes}
    held = 0
    for name, size in sizes.items():
        await clients[name].send(_partial(size))
        held += len(_partial(size))
        await wait_for(lambda: server.buffered_input == held)  # noqa: B023
    # 120 KiB more is over the budget: the largest holder (b) goes.
    d = await harness.connect()
    await d.send(_partial(120 << 10))
    await clients["b"].assert_closed()
    await wait_for(lambda: server.connections == 3)
    assert server.buffered_input == held - len(_partial(180 << 10)) + len(_partial(120 << 10))
    for name in ("a", "c"):
        await clients[name].send(b'"}}\0')
        reply, _ = await clients[name].recv()
        assert len(reply["parameters"]["text"]) == sizes[name]
    await wait_for(lambda: server.buffered_input == len(_partial(120 << 10)))
    d.close()
    await wait_for(lambda: server.buffered_input == 0 and server.connections == 2)


async def test_privileged_connections_are_closed_last(start: Start) -> None:
    # Everyone is root here, so the largest holder still goes: privileged peers are
    # spared only while someone unprivileged holds input (test_daemon_limits).
    harness = await start(max_message_size=200 << 10, max_buffered_input=250 << 10)
    a = await harness.connect()
    await a.send(_partial(150 << 10))
    await wait_for(lambda: harness.server.buffered_input > 0)
    b = await harness.connect()
    await b.send(_partial(110 << 10))
    await a.assert_closed()
    await b.send(b'"}}\0')
    assert len((await b.recv())[0]["parameters"]["text"]) == 110 << 10


async def test_queued_and_running_calls_count_as_held_input(start: Start) -> None:
    harness = await start(max_message_size=100 << 10)
    server = harness.server
    client = await harness.connect()
    sleep = encode_call(T + "Sleep", {"seconds": 30, "tag": "held"})
    echo = encode_call(T + "Echo", {"text": "y" * (50 << 10)})
    await client.send(sleep + echo)
    assert await get(harness.impl.started) == "held"
    await wait_for(lambda: server.buffered_input == len(sleep) + len(echo) - 2)
    client.close()
    await wait_for(lambda: server.buffered_input == 0 and server.calls_in_flight == 0)


async def test_incomplete_message_times_out(start: Start) -> None:
    harness = await start(message_timeout=0.2)
    slow = await harness.connect()
    await slow.send(_partial(10))
    await slow.assert_closed()
    await wait_for(lambda: harness.server.connections == 0)
    # Messages that end are not held against the connection, however long it lives.
    steady = await harness.connect()
    for _ in range(3):
        call = encode_call(T + "Echo", {"text": "steady"})
        await steady.send(call[:10])
        await steady.send(call[10:])
        assert (await steady.recv())[0] == {"parameters": {"text": "steady"}}
        await asyncio.sleep(0.15)
    assert harness.server.connections == 1


async def test_heap_is_trimmed_after_connections_holding_input_close(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[float] = []

    def trim_heap() -> bool:
        trims.append(time.monotonic())
        return True

    monkeypatch.setattr(transport, "trim_heap", trim_heap)
    harness = await start()
    clients = [await harness.connect() for _ in range(8)]
    for c in clients:
        await c.send(_partial(200 << 10))
    await wait_for(lambda: harness.server.buffered_input >= 8 * (200 << 10), timeout=3)
    assert not trims
    for c in clients:
        c.close()
    await wait_for(lambda: len(trims) == 1)


# Errors


@pytest.mark.parametrize(
    ("kind", "error", "parameters"),
    [
        ("runtime", SYSTEM_ERROR, {"message": "boom"}),
        ("oserror", SYSTEM_ERROR, {"message": "[Errno 2] boom", "errnoName": "ENOENT"}),
        ("reply", T + "Refused", {"reason": "boom"}),
        ("varlink", T + "Refused", {"reason": "boom"}),
        ("cancelled", SYSTEM_ERROR, {"message": "boom", "errnoName": "ECANCELED"}),
        ("badreply", SYSTEM_ERROR, None),
    ],
)
async def test_failures_become_error_replies(
    client: Client,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    error: str,
    parameters: dict[str, Any] | None,
) -> None:
    caplog.set_level(logging.ERROR, logger="composefsd.service.transport")
    reply = await client.call(T + "Fail", {"kind": kind, "message": "boom"})
    assert reply["error"] == error
    if parameters is not None:
        assert reply["parameters"] == parameters
    else:
        assert "not JSON serializable" in reply["parameters"]["message"]
    if error == SYSTEM_ERROR and kind != "cancelled":
        # Unexpected: logged with the traceback.
        assert any(r.exc_info for r in caplog.records), caplog.records
    else:
        assert not caplog.records
    # The connection stays open.
    assert (await client.call(T + "Echo", {"text": "next"}))["parameters"] == {"text": "next"}


async def test_authorization_hook(start: Start) -> None:
    seen: list[tuple[Peer, str]] = []

    def authorize(peer: Peer, method: str) -> bool:
        seen.append((peer, method))
        if method == T + "Fail":
            raise RuntimeError("hook broke")
        return method != T + "Echo"

    harness = await start(authorize=authorize)
    client = await harness.connect()
    reply = await client.call(T + "Echo", {"text": "x"})
    assert reply == {"error": "org.varlink.service.PermissionDenied", "parameters": {}}
    # Refused before validation: a bad call is refused the same way.
    reply = await client.call(T + "Echo", {"bogus": 1})
    assert reply["error"] == "org.varlink.service.PermissionDenied"
    # Unknown methods are not authorized, just not found.
    assert (await client.call(T + "Nope"))["error"] == "org.varlink.service.MethodNotFound"
    assert (await client.call("org.varlink.service.GetInfo"))["parameters"]["product"] == "example"
    reply = await client.call(T + "Fail", {"kind": "runtime", "message": "x"})
    assert reply == {"error": SYSTEM_ERROR, "parameters": {"message": "hook broke"}}
    assert [m for _, m in seen] == [
        T + "Echo",
        T + "Echo",
        "org.varlink.service.GetInfo",
        T + "Fail",
    ]
    peer = seen[0][0]
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())


async def test_peer_credentials(client: Client) -> None:
    reply = await client.call(T + "WhoAmI")
    assert reply["parameters"] == {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": sorted(set(os.getgroups())),
    }


# Concurrency, cancellation, shutdown


async def test_connections_run_concurrently(served: Harness) -> None:
    a = await served.connect()
    b = await served.connect()
    await a.send(encode_call(T + "Sleep", {"seconds": 1.0, "tag": "a"}))
    assert await get(served.impl.started) == "a"
    assert served.server.calls_in_flight == 1
    started = time.monotonic()
    assert (await b.call(T + "Echo", {"text": "b"}))["parameters"] == {"text": "b"}
    assert time.monotonic() - started < 0.5
    assert served.impl.ended.empty()
    reply, _ = await a.recv(T + "Sleep")
    assert reply["parameters"]["slept"] >= 1.0


async def test_slow_calls_on_many_connections_overlap(start: Start) -> None:
    harness = await start(workers=8)
    clients = [await harness.connect() for _ in range(8)]
    started = time.monotonic()
    for c in clients:
        await c.send(encode_call(T + "Sleep", {"seconds": 0.5}))
    for c in clients:
        await c.recv(T + "Sleep")
    assert time.monotonic() - started < 2.0


async def test_disconnect_cancels_the_running_call(served: Harness) -> None:
    client = await served.connect()
    await client.send(
        encode_call(T + "Sleep", {"seconds": 30, "tag": "left"})
        + encode_call(T + "Sleep", {"seconds": 30, "tag": "queued"})
    )
    assert await get(served.impl.started) == "left"
    client.close()
    assert await get(served.impl.ended) == ("left", "cancelled")
    await wait_for(lambda: served.server.calls_in_flight == 0 and served.server.connections == 0)
    # The queued call never ran.
    await asyncio.sleep(0.1)
    assert served.impl.started.empty()


async def test_half_closed_client_still_gets_its_replies(client: Client) -> None:
    await client.send(
        encode_call(T + "Sleep", {"seconds": 0.1}) + encode_call(T + "Echo", {"text": "half"})
    )
    client.sock.shutdown(socket.SHUT_WR)
    assert "slept" in (await client.recv(T + "Sleep"))[0]["parameters"]
    assert (await client.recv())[0] == {"parameters": {"text": "half"}}
    await client.assert_closed()


async def test_shutdown_waits_for_running_calls(start: Start) -> None:
    harness = await start()
    client = await harness.connect()
    idle = await harness.connect()
    await client.send(encode_call(T + "Sleep", {"seconds": 0.3, "tag": "finish"}))
    assert await get(harness.impl.started) == "finish"
    await harness.server.shutdown(grace=5.0)
    await asyncio.wait_for(harness.task, 5)
    assert "slept" in (await client.recv(T + "Sleep"))[0]["parameters"]
    await client.assert_closed()
    await idle.assert_closed()
    assert harness.server.connections == 0


async def test_shutdown_cancels_calls_after_the_grace_period(start: Start) -> None:
    harness = await start()
    client = await harness.connect()
    await client.send(encode_call(T + "Sleep", {"seconds": 30, "tag": "long"}))
    assert await get(harness.impl.started) == "long"
    started = time.monotonic()
    await harness.server.shutdown(grace=0.2)
    assert time.monotonic() - started < 3
    assert await get(harness.impl.ended) == ("long", "cancelled")
    reply, _ = await client.recv(T + "Sleep")
    assert reply["error"] == SYSTEM_ERROR
    assert reply["parameters"]["errnoName"] == "ECANCELED"
    await client.assert_closed()
    assert harness.server.calls_in_flight == 0
    await asyncio.wait_for(harness.task, 5)


async def test_connected_socket_is_served_until_it_closes() -> None:
    service, _ = example.make_service()
    server = Server(service)
    ours, theirs = socket.socketpair()
    task = asyncio.create_task(server.serve([ours]))
    client = Client(theirs, {})
    assert (await client.call(T + "Echo", {"text": "pair"}))["parameters"] == {"text": "pair"}
    assert server.connections == 1
    assert not task.done()
    client.close()
    await asyncio.wait_for(task, 5)
    assert server.connections == 0


async def test_connected_socket_mode_waits_for_a_oneway_call() -> None:
    service, impl = example.make_service()
    server = Server(service)
    ours, theirs = socket.socketpair()
    task = asyncio.create_task(server.serve([ours]))
    client = Client(theirs, {})
    await client.send(encode_call(T + "Sleep", {"seconds": 0.3, "tag": "ow"}, oneway=True))
    assert await get(impl.started) == "ow"
    client.close()
    await asyncio.wait_for(task, 5)
    # Not cancelled: a oneway caller does not wait for anything.
    assert impl.ended.get_nowait() == ("ow", "done")


async def test_connection_limit(start: Start) -> None:
    # Privileged peers are never refused: here nobody is.
    harness = await start(max_connections=2, privileged_uids=frozenset())
    a = await harness.connect()
    b = await harness.connect()
    await wait_for(lambda: harness.server.connections == 2)
    c = await harness.connect()
    await c.send(encode_call(T + "Echo", {"text": "c"}))
    reply, _ = await c.recv()
    assert reply == {
        "error": TOO_MANY,
        "parameters": {"limit": 2, "message": "2 connections are open, at most 2 are allowed"},
    }
    await c.assert_closed()
    assert (await a.call(T + "Echo", {"text": "a"}))["parameters"] == {"text": "a"}
    b.close()
    await wait_for(lambda: harness.server.connections == 1)
    d = await harness.connect()
    assert (await d.call(T + "Echo", {"text": "d"}))["parameters"] == {"text": "d"}


async def test_connection_limit_per_uid(start: Start) -> None:
    harness = await start(max_connections_per_uid=2, privileged_uids=frozenset())
    kept = [await harness.connect() for _ in range(2)]
    await wait_for(lambda: harness.server.connections == 2)
    refused = await harness.connect()
    # A call sent before the refusal arrives gets it as its reply.
    await refused.send(encode_call(T + "Echo", {"text": "late"}))
    reply, _ = await refused.recv()
    assert reply["error"] == TOO_MANY
    assert reply["parameters"] == {
        "limit": 2,
        "message": f"uid {os.getuid()} has 2 connections open, at most 2 are allowed",
    }
    await refused.assert_closed()
    for c in kept:
        assert (await c.call(T + "Echo", {"text": "kept"}))["parameters"] == {"text": "kept"}


async def test_varlinkctl_reads_the_refusal(start: Start, reference_bin: Path) -> None:
    harness = await start(max_connections_per_uid=1, privileged_uids=frozenset())
    kept = await harness.connect()
    await wait_for(lambda: harness.server.connections == 1)
    proc = await asyncio.create_subprocess_exec(
        str(reference_bin / "varlinkctl"),
        "call",
        f"unix:{harness.path}",
        T + "Echo",
        '{"text":"x"}',
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert TOO_MANY in err.decode(), err
    assert json.loads(out)["limit"] == 1
    assert (await kept.call(T + "Echo", {"text": "kept"}))["parameters"] == {"text": "kept"}


async def test_privileged_peers_are_never_refused(start: Start) -> None:
    # uid 0 (this test) is privileged by default: the limits are not for it.
    harness = await start(max_connections_per_uid=1, max_connections=1)
    clients = [await harness.connect() for _ in range(5)]
    for i, c in enumerate(clients):
        assert (await c.call(T + "Echo", {"text": str(i)}))["parameters"] == {"text": str(i)}
    assert harness.server.connections == 5


async def test_cheap_calls_do_not_wait_for_heavy_ones(start: Start) -> None:
    harness = await start(heavy_methods=frozenset({T + "Sleep"}), heavy_workers=1)
    first = await harness.connect()
    await first.send(encode_call(T + "Sleep", {"seconds": 30, "tag": "first"}))
    assert await get(harness.impl.started) == "first"
    # The one heavy worker is busy: another heavy call waits for it...
    second = await harness.connect()
    await second.send(encode_call(T + "Sleep", {"seconds": 30, "tag": "second"}))
    await wait_for(lambda: len(harness.server._heavy.waiting()) == 1)
    # ...and cheap calls do not.
    cheap = await harness.connect()
    for i in range(20):
        assert (await cheap.call(T + "Echo", {"text": str(i)}))["parameters"] == {"text": str(i)}
    # A waiting call whose client leaves never runs.
    second.close()
    await wait_for(lambda: harness.server.calls_in_flight == 1)
    first.close()
    assert await get(harness.impl.ended) == ("first", "cancelled")
    await wait_for(lambda: harness.server.calls_in_flight == 0)
    assert harness.impl.started.empty()


async def test_heavy_calls_per_uid(start: Start) -> None:
    harness = await start(
        heavy_methods=frozenset({T + "Sleep"}),
        heavy_workers=2,
        heavy_calls_per_uid=1,
        privileged_uids=frozenset(),
    )
    one, two = await harness.connect(), await harness.connect()
    await one.send(encode_call(T + "Sleep", {"seconds": 0.3, "tag": "one"}))
    await two.send(encode_call(T + "Sleep", {"seconds": 0.3, "tag": "two"}))
    # A heavy worker is free, but this uid has its one heavy call running.
    assert await get(harness.impl.started) == "one"
    await wait_for(lambda: len(harness.server._heavy.waiting()) == 1)
    assert harness.impl.started.empty()
    assert await get(harness.impl.ended) == ("one", "done")
    assert await get(harness.impl.started) == "two"
    for c in (one, two):
        assert "slept" in (await c.recv())[0]["parameters"]


async def test_shutdown_cancels_heavy_calls_still_waiting(start: Start) -> None:
    harness = await start(heavy_methods=frozenset({T + "Sleep"}), heavy_workers=1)
    running, waiting = await harness.connect(), await harness.connect()
    await running.send(encode_call(T + "Sleep", {"seconds": 0.3, "tag": "running"}))
    assert await get(harness.impl.started) == "running"
    await waiting.send(encode_call(T + "Sleep", {"seconds": 0.3, "tag": "waiting"}))
    await wait_for(lambda: len(harness.server._heavy.waiting()) == 1)
    await harness.server.shutdown(grace=5.0)
    reply, _ = await waiting.recv()
    assert reply["error"] == SYSTEM_ERROR and reply["parameters"]["errnoName"] == "ECANCELED"
    assert "slept" in (await running.recv())[0]["parameters"]
    assert harness.impl.started.empty()


async def test_lanes_take_uids_in_turn() -> None:
    """A uid with many waiting calls delays another uid's call by one turn at most."""
    lane = transport._Lane("test", workers=1, per_uid=1, privileged=frozenset())
    order: list[tuple[int, int]] = []
    done = asyncio.Event()
    jobs = [(1000, i) for i in range(5)] + [(2000, 0), (2000, 1), (3000, 0)]

    def job(uid: int, i: int) -> Callable[[], None]:
        def run() -> None:
            order.append((uid, i))
            if len(order) == len(jobs):
                loop.call_soon_threadsafe(done.set)

        return run

    loop = asyncio.get_running_loop()
    for uid, i in jobs:
        call: Any = types.SimpleNamespace(conn=types.SimpleNamespace(peer=Peer(1, uid, uid)))
        lane.submit(uid, call, job(uid, i), lambda: None)
    await asyncio.wait_for(done.wait(), 10)
    lane.shutdown()
    assert order == [
        (1000, 0),
        (1000, 1),
        (2000, 0),
        (3000, 0),
        (1000, 2),
        (2000, 1),
        (1000, 3),
        (1000, 4),
    ]


async def test_inbox_batches_wakeups_and_keeps_order(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Callbacks posted before the loop gets to them wake it once and run in the
    order given; one that fails is logged and the rest still run."""
    loop = asyncio.get_running_loop()
    inbox = transport._Inbox()
    inbox.loop = loop
    wakeups = 0
    real = loop.call_soon_threadsafe

    def counting(*args: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return real(*args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    ran: list[int] = []

    def fail() -> None:
        raise ValueError("boom")

    for i in range(3):
        inbox.put(ran.append, i)
    inbox.put(fail)
    inbox.put(ran.append, 3)
    assert wakeups == 1
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert ran == [0, 1, 2, 3]
    assert "boom" in caplog.text
    inbox.put(ran.append, 4)
    assert wakeups == 2
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert ran == [0, 1, 2, 3, 4]


def test_inbox_refuses_a_closed_loop() -> None:
    inbox = transport._Inbox()
    with pytest.raises(RuntimeError):
        inbox.put(print)
    loop = asyncio.new_event_loop()
    loop.close()
    inbox.loop = loop
    with pytest.raises(RuntimeError):
        inbox.put(print)


async def test_lane_threads_end_after_shutdown() -> None:
    """Threads start as calls need them, at most ``workers``, and end at shutdown."""
    lane = transport._Lane("test", workers=2, per_uid=2, privileged=frozenset())
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    count = 0

    def run() -> None:
        nonlocal count
        count += 1
        if count == 5:
            loop.call_soon_threadsafe(done.set)

    for _ in range(5):
        call: Any = types.SimpleNamespace(conn=types.SimpleNamespace(peer=Peer(1, 1000, 1000)))
        lane.submit(1000, call, run, lambda: None)
    await asyncio.wait_for(done.wait(), 10)
    threads = list(lane._threads)
    assert 1 <= len(threads) <= 2
    lane.shutdown()
    for thread in threads:
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()


async def test_idle_tracking(served: Harness) -> None:
    server = served.server
    assert (server.connections, server.calls_in_flight) == (0, 0)
    before = server.last_activity
    await asyncio.sleep(0.01)
    client = await served.connect()
    await wait_for(lambda: server.connections == 1)
    assert server.last_activity > before
    await client.send(encode_call(T + "Sleep", {"seconds": 0.2}))
    await wait_for(lambda: server.calls_in_flight == 1)
    await client.recv()
    await wait_for(lambda: server.calls_in_flight == 0)
    after_call = server.last_activity
    assert time.monotonic() - after_call < 2.0
    client.close()
    await wait_for(lambda: server.connections == 0)
    assert server.last_activity >= after_call


# Interoperability


async def test_varlink31_client(served: Harness) -> None:
    def talk() -> tuple[Any, ...]:
        with varlink.Client(address=f"unix:{served.path}") as c:
            info = c.get_interfaces()
            with c.open("org.example.test") as iface:
                echo = iface.Echo(text="py", color="blue")
                counted = [r["i"] for r in iface.Count(2, None, _more=True)]
                try:
                    iface.Fail(kind="reply", message="no")
                except varlink.VarlinkError as e:
                    error = (e.error(), e.parameters())
        return info, echo, counted, error

    info, echo, counted, error = await asyncio.to_thread(talk)
    assert info == ["org.varlink.service", "org.example.test"]
    assert echo == {"text": "py", "color": "blue"}
    assert counted == [0, 1, 2]
    assert error == (T + "Refused", {"reason": "no"})


async def test_varlinkctl(served: Harness, reference_bin: Path) -> None:
    varlinkctl = str(reference_bin / "varlinkctl")
    address = f"unix:{served.path}"

    async def run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            varlinkctl,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    rc, out, err = await run("info", "--json=short", address)
    assert rc == 0, err
    assert json.loads(out)["interfaces"] == ["org.varlink.service", "org.example.test"]
    rc, out, err = await run("introspect", address, "org.example.test")
    assert rc == 0, err
    assert "method Echo(" in out
    rc, out, err = await run("call", "--json=short", address, T + "Echo", json.dumps(ECHO_FULL))
    assert rc == 0, err
    assert json.loads(out) == ECHO_FULL
    rc, out, err = await run("call", "--more", "--json=short", address, T + "Count", '{"count":2}')
    assert rc == 0, err
    assert [json.loads(line.strip("\x1e")) for line in out.split("\n") if line.strip()] == [
        {"i": 0},
        {"i": 1},
        {"i": 2},
    ]
    rc, out, err = await run("call", address, T + "Echo", '{"text":1}')
    assert rc != 0
    assert "org.varlink.service.InvalidParameter" in err
    rc, out, err = await run("call", address, T + "Fail", '{"kind":"reply","message":"m"}')
    assert rc != 0
    assert T + "Refused" in err


# Inline methods: answered on the event loop


class _InlineEcho:
    """An inline Echo: "defer" goes to the worker's Echo, "fail"/"refuse" raise;
    records (tag, thread) of every inline answer."""

    def __init__(self) -> None:
        self.answered: list[tuple[str, int]] = []

    def __call__(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any] | None:
        text = params["text"]
        if text == "defer":
            return None
        if text == "fail":
            raise RuntimeError("inline failure")
        if text == "refuse":
            raise VarlinkReplyError(T + "Refused", {"reason": "inline"})
        self.answered.append((text, threading.get_ident()))
        return {"text": f"inline {text}"}


async def test_inline_method_answers_on_the_loop(start: Start) -> None:
    inline = _InlineEcho()
    harness = await start(inline_methods={T + "Echo": inline})
    client = await harness.connect()
    assert await client.call(T + "Echo", {"text": "a"}) == {"parameters": {"text": "inline a"}}
    assert inline.answered == [("a", threading.get_ident())]
    # None: the method itself runs, in a worker.
    assert await client.call(T + "Echo", {"text": "defer"}) == {"parameters": {"text": "defer"}}
    assert len(inline.answered) == 1
    # Its errors are the call's; the connection stays.
    reply = await client.call(T + "Echo", {"text": "fail"})
    assert reply["error"] == SYSTEM_ERROR
    reply = await client.call(T + "Echo", {"text": "refuse"})
    assert reply == {"error": T + "Refused", "parameters": {"reason": "inline"}}
    # Parameters are validated first; other methods are not affected.
    assert (await client.call(T + "Echo", {"text": 1}))["error"] == INVALID
    assert await client.call(T + "WhoAmI") != {}
    # A long message is parsed in a worker, and runs the method there.
    long = "x" * 5000
    assert await client.call(T + "Echo", {"text": long}) == {"parameters": {"text": long}}
    assert len(inline.answered) == 1


async def test_inline_method_is_authorized(start: Start) -> None:
    inline = _InlineEcho()
    harness = await start(inline_methods={T + "Echo": inline}, authorize=lambda peer, method: False)
    client = await harness.connect()
    reply = await client.call(T + "Echo", {"text": "a"})
    assert reply["error"] == "org.varlink.service.PermissionDenied"
    assert inline.answered == []


async def test_inline_replies_keep_call_order(start: Start) -> None:
    inline = _InlineEcho()
    harness = await start(inline_methods={T + "Echo": inline})
    client = await harness.connect()
    calls = [
        encode_call(T + "Sleep", {"seconds": 0.05, "tag": "s"}),
        encode_call(T + "Echo", {"text": "1"}),
        encode_call(T + "Echo", {"text": "defer"}),
        encode_call(T + "Echo", {"text": "2"}),
        encode_call(T + "Echo", {"text": "3"}, oneway=True),
        encode_call(T + "Echo", {"text": "4"}),
    ]
    await client.send(b"".join(calls))
    replies = [(await client.recv())[0]["parameters"] for _ in range(5)]
    assert [r.get("text", "sleep") for r in replies] == [
        "sleep",
        "inline 1",
        "defer",
        "inline 2",
        "inline 4",
    ]
    assert [tag for tag, _ in inline.answered] == ["1", "2", "3", "4"]


async def test_inline_calls_take_turns_between_connections(start: Start) -> None:
    """One connection's queue of inline calls does not run ahead of another's: the
    next one starts in a later turn of the loop."""
    inline = _InlineEcho()
    harness = await start(inline_methods={T + "Echo": inline})
    a, b = await harness.connect(), await harness.connect()
    await a.send(b"".join(encode_call(T + "Echo", {"text": "a"}) for _ in range(20)))
    await b.send(b"".join(encode_call(T + "Echo", {"text": "b"}) for _ in range(20)))
    for _ in range(20):
        await a.recv()
        await b.recv()
    order = [tag for tag, _ in inline.answered]
    # Each connection's calls in turn (two in a row at most: a turn may start with
    # one connection and end with it).
    assert max(len(list(run)) for _, run in itertools.groupby(order)) <= 2, order
