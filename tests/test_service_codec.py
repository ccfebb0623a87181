"""The sans-IO Varlink roles (composefsd.service.codec): what the server and the
client make of the bytes and fds one read returned, without sockets."""

from __future__ import annotations

import pytest

from composefsd.service.codec import (
    ClientConnection,
    MessageTooLarge,
    ProtocolError,
    ServerConnection,
    encode_call,
    encode_error,
    encode_reply,
)


def test_server_frames_and_parses_calls() -> None:
    wire = ServerConnection(max_depth=8)
    two = encode_call("a.b.C", {"x": 1}, more=True) + encode_call("a.b.D", oneway=True)
    messages = wire.receive_data(two + b'{"meth', [7])
    assert [m.fds for m in messages] == [[7], []]
    calls = [wire.call(m) for m in messages]
    assert [(c.method, c.parameters, c.more, c.oneway) for c in calls] == [
        ("a.b.C", {"x": 1}, True, False),
        ("a.b.D", {}, False, True),
    ]
    assert wire.pending == len(b'{"meth')
    assert wire.discard() == []
    with pytest.raises(ProtocolError, match="nested"):
        wire.call(wire.receive_data(b'{"method":"a.b.C","parameters":{"x":' + b"[" * 9 + b"\0")[0])


def test_the_fds_of_a_read_go_to_its_first_message() -> None:
    """sd-varlink's rule (varlink_read), on both sides."""
    server = ServerConnection()
    messages = server.receive_data(encode_call("a.b.C") + encode_call("a.b.D"), [3, 4])
    assert [m.fds for m in messages] == [[3, 4], []]
    client = ClientConnection()
    client.send_call("a.b.C", more=True)
    client.receive_data(encode_reply({"n": 1}, continues=True) + encode_reply({"fd": 0}), [5])
    first, second = client.next_reply(), client.next_reply()
    assert first is not None and second is not None
    assert (first.fds, first.continues, second.fds, second.continues) == ([5], True, [], False)
    assert client.next_reply() is None
    # A read that continues a message may bring none.
    client.send_call("a.b.C")
    client.receive_data(b'{"param')
    with pytest.raises(ProtocolError, match="middle of a message") as info:
        client.receive_data(b'eters":{}}\0', [6])
    assert info.value.fds == [6]


def test_client_checks_replies_against_its_calls() -> None:
    client = ClientConnection()
    assert client.send_call("a.b.C", {"x": 1}) == b'{"method":"a.b.C","parameters":{"x":1}}\0'
    client.receive_data(encode_error("a.b.Failed", {"why": "x"}))
    reply = client.next_reply()
    assert reply is not None and not reply.ok
    assert (reply.error, reply.parameters) == ("a.b.Failed", {"why": "x"})
    # An error ended the call: nothing more is due.
    client.receive_data(encode_reply(), [9])
    with pytest.raises(ProtocolError, match="a reply to no call") as info:
        client.next_reply()
    assert info.value.fds == [9]
    client = ClientConnection()
    assert client.send_call("a.b.C", oneway=True) == b'{"method":"a.b.C","oneway":true}\0'
    client.send_call("a.b.C")
    client.receive_data(encode_reply(continues=True), [8])
    with pytest.raises(ProtocolError, match="'continues' in the reply to a call without 'more'"):
        client.next_reply()
    client = ClientConnection()
    client.send_call("a.b.C")
    client.receive_data(b'{"parameters":{},"extra":1}\0', [4])
    with pytest.raises(ProtocolError, match="unknown keys") as info:
        client.next_reply()
    assert info.value.fds == [4]


def test_client_size_limit_and_discard() -> None:
    client = ClientConnection(max_message_size=8)
    client.send_call("a.b.C")
    client.receive_data(b"{}\0{", [3])
    with pytest.raises(MessageTooLarge) as info:
        client.receive_data(b"x" * 8)
    assert (info.value.limit, info.value.size) == (8, 9)
    # The complete message's fds stay queued until handed out or discarded.
    assert info.value.fds == []
    assert client.discard() == [3]


def test_calls_escape_what_is_not_ascii() -> None:
    """A file name that is not UTF-8 (lone surrogates after surrogateescape) still
    goes out, for the server to judge, as the client's json.dumps sent it before."""
    assert encode_call("a.b.C", {"p": "/tmp/\udcff", "q": "é"}) == (
        b'{"method":"a.b.C","parameters":{"p":"/tmp/\\udcff","q":"\\u00e9"}}\0'
    )
