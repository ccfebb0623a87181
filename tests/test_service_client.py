"""composefsd.service.client against a tiny scripted server on a socketpair.

Replies are mostly queued on the server end before the call is made (the socket
buffer holds them), so no thread is needed; the server end then reads what the
client sent."""

from __future__ import annotations

import array
import errno
import gc
import json
import os
import socket
import stat
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from composefsd.service import client, codec
from composefsd.service.client import (
    Connection,
    Reply,
    VarlinkCallError,
    VarlinkClientError,
    VarlinkConnectError,
    VarlinkDisconnected,
    VarlinkProtocolError,
    VarlinkTimeout,
)


class FakeServer:
    """The server end of a socketpair: reads calls, writes raw replies."""

    def __init__(self) -> None:
        self.conn_sock, self.sock = socket.socketpair()
        self.buffer = b""

    def connection(self, timeout: float | None = 5.0) -> Connection:
        return Connection(self.conn_sock, address="fake", timeout=timeout)

    def send(self, *docs: dict[str, Any] | bytes, fds: list[int] | None = None) -> None:
        data = b"".join(d if isinstance(d, bytes) else json.dumps(d).encode() + b"\0" for d in docs)
        if fds:
            self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            )
        else:
            self.sock.sendall(data)

    def recv_call(self) -> tuple[dict[str, Any], list[int]]:
        fds: list[int] = []
        while b"\0" not in self.buffer:
            data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload)
                    fds.extend(arr)
            if not data:
                raise EOFError
            self.buffer += data
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message), fds

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer()
    yield srv
    srv.close()


def _fd_count() -> int:
    # Files that earlier tests dropped are closed when the garbage collector gets to
    # them, which may be in the middle of a count; collect them first.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_call_sends_method_and_parameters(server: FakeServer) -> None:
    conn = server.connection()
    server.send({"parameters": {"path": "/r", "images": 3}})
    reply = conn.call("io.composefs.Repository.Describe")
    assert reply == {"path": "/r", "images": 3}
    assert isinstance(reply, Reply) and reply.fds == [] and not reply.continues
    # No "parameters" key for an empty call (senders should omit it).
    assert server.recv_call() == ({"method": "io.composefs.Repository.Describe"}, [])

    server.send({})
    assert conn.call("x.y.Z", {"a": [1, {"b": None}]}) == {}
    assert server.recv_call()[0] == {"method": "x.y.Z", "parameters": {"a": [1, {"b": None}]}}
    conn.close()
    assert conn.closed


def test_refusal_before_the_call_is_the_reply(server: FakeServer) -> None:
    """A server that refuses the connection answers and closes before reading the
    call: sending fails, and the error it sent is what the call raises."""
    conn = server.connection()
    refusal = {"limit": 128, "message": "uid 1000 has 128 connections open"}
    server.send({"error": "io.composefs.Repository.TooManyConnections", "parameters": refusal})
    server.close()
    with pytest.raises(VarlinkCallError) as info:
        conn.call("io.composefs.Repository.Describe", {"pad": "x" * (1 << 20)})
    assert info.value.name == "io.composefs.Repository.TooManyConnections"
    assert info.value.parameters == refusal
    assert conn.closed


def test_more_yields_every_reply_and_the_last(server: FakeServer) -> None:
    conn = server.connection()
    server.send(
        {"parameters": {"progress": {"phase": "scan", "done": 1}}, "continues": True},
        {"parameters": {"progress": {"phase": "scan", "done": 2}}, "continues": True},
        {"parameters": {"digest": "ab"}},
    )
    replies = list(conn.call("i.f.CreateImage", {"sourcePath": "/t"}, more=True))
    assert [r.continues for r in replies] == [True, True, False]
    assert replies[-1] == {"digest": "ab"}
    assert server.recv_call()[0] == {
        "method": "i.f.CreateImage",
        "parameters": {"sourcePath": "/t"},
        "more": True,
    }
    # The connection is free again.
    server.send({"parameters": {"ok": True}})
    assert conn.call("i.f.Describe") == {"ok": True}


def test_error_reply_raises_with_name_and_parameters(server: FakeServer) -> None:
    conn = server.connection()
    server.send(
        {"error": "io.composefs.Repository.NoSuchImage", "parameters": {"image": "os/v9"}},
        {"error": "org.varlink.service.PermissionDenied"},
    )
    with pytest.raises(VarlinkCallError) as info:
        conn.call("io.composefs.Repository.Mount", {"image": "os/v9"})
    assert info.value.name == "io.composefs.Repository.NoSuchImage"
    assert info.value.parameters == {"image": "os/v9"}
    assert str(info.value) == 'io.composefs.Repository.NoSuchImage {"image": "os/v9"}'
    with pytest.raises(VarlinkCallError) as info:
        conn.call("io.composefs.Repository.Mount", {"image": "x"})
    assert info.value.parameters == {} and str(info.value) == "org.varlink.service.PermissionDenied"
    # An error is not a broken connection.
    server.send({})
    assert conn.call("a.b.C") == {}


def test_error_in_the_middle_of_more(server: FakeServer) -> None:
    conn = server.connection()
    server.send(
        {"parameters": {"digest": "a", "ok": True}, "continues": True},
        {"error": "io.composefs.Repository.RepositoryBusy", "parameters": {"message": "gc"}},
    )
    seen = []
    with pytest.raises(VarlinkCallError, match="RepositoryBusy"):
        for reply in conn.call("i.f.Verify", more=True):
            seen.append(reply)
    assert seen == [{"digest": "a", "ok": True}]
    server.send({})
    assert conn.call("a.b.C") == {}


def test_oneway_reads_nothing(server: FakeServer) -> None:
    conn = server.connection()
    assert conn.call("a.b.Ping", {"x": 1}, oneway=True) is None
    server.send({"parameters": {"n": 2}})
    assert conn.call("a.b.Count") == {"n": 2}
    assert server.recv_call()[0] == {"method": "a.b.Ping", "parameters": {"x": 1}, "oneway": True}
    assert server.recv_call()[0] == {"method": "a.b.Count"}
    with pytest.raises(ValueError):
        conn.call("a.b.C", more=True, oneway=True)  # type: ignore[call-overload]


def test_fds_go_with_the_call(server: FakeServer, tmp_path: Path) -> None:
    conn = server.connection()
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        server.send({"parameters": {"digest": "ab"}})
        conn.call("i.f.CreateImage", {"sourceDirectoryFileDescriptor": 0}, fds=[dfd])
        call, fds = server.recv_call()
        assert call["parameters"] == {"sourceDirectoryFileDescriptor": 0}
        assert len(fds) == 1
        assert os.path.samestat(os.fstat(fds[0]), os.fstat(dfd))  # the same directory
        os.close(fds[0])
    finally:
        os.close(dfd)  # the caller keeps its copy


def test_fds_come_with_the_reply(server: FakeServer, tmp_path: Path) -> None:
    conn = server.connection()
    (tmp_path / "f").write_text("x")
    a = os.open(tmp_path / "f", os.O_RDONLY)
    b = os.open(tmp_path, os.O_RDONLY)
    before = _fd_count()
    server.send({"parameters": {"mountFileDescriptor": 1, "other": 0}}, fds=[a, b])
    reply = conn.call("i.f.Mount", {"image": "x"})
    assert len(reply.fds) == 2
    fd = reply.take_fd("mountFileDescriptor")
    assert os.path.samestat(os.fstat(fd), os.stat(tmp_path))
    assert os.get_inheritable(fd) is False  # MSG_CMSG_CLOEXEC
    with pytest.raises(VarlinkProtocolError):
        reply.take_fd("mountFileDescriptor")  # taken already
    with pytest.raises(VarlinkProtocolError):
        reply.take_fd("missing")
    reply.close_fds()
    os.close(fd)
    assert _fd_count() == before
    os.close(a)
    os.close(b)


def test_fds_go_to_the_first_reply_of_their_read(server: FakeServer, tmp_path: Path) -> None:
    """The fds of a read belong to the first reply that starts in it, as in sd-varlink
    (varlink_read: the codec's module notes), also when the kernel joined an fd-less
    piece in front of the one that carried them (systemd#43823, which sd-varlink
    treats the same way). This replaced the rule that gave them to the last reply
    starting in the read, which no other Varlink implementation follows."""
    conn = server.connection()
    fd = os.open(tmp_path, os.O_RDONLY)
    # A partial message, then the rest of it plus a message, the fd attached: read
    # as one piece, which starts with the first message.
    first = json.dumps({"parameters": {"n": 1}, "continues": True}).encode() + b"\0"
    server.send(first[:5])
    it = conn.call("i.f.M", more=True)
    time.sleep(0.05)
    server.send(first[5:] + json.dumps({"parameters": {"fd": 0}}).encode() + b"\0", fds=[fd])
    replies = list(it)
    assert len(replies[0].fds) == 1
    assert replies[1].fds == []
    replies[0].close_fds()
    # Two replies in one write, the fd with it: the first gets it.
    server.send({"parameters": {"n": 1}, "continues": True}, {"parameters": {"fd": 0}}, fds=[fd])
    replies = list(conn.call("i.f.M", more=True))
    assert [len(r.fds) for r in replies] == [1, 0]
    got = replies[0].fds[0]
    assert got is not None and os.path.samestat(os.fstat(got), os.fstat(fd))
    replies[0].close_fds()
    os.close(fd)


def test_fds_that_start_no_message_are_refused(server: FakeServer, tmp_path: Path) -> None:
    conn = server.connection()
    fd = os.open(tmp_path, os.O_RDONLY)
    server.send(b'{"parame')
    it = conn.call("i.f.M", more=True)
    # The client has read the first piece when the one with the fd arrives.
    later = threading.Timer(0.1, lambda: server.send(b'ters": {}}\0', fds=[fd]))
    later.start()
    with pytest.raises(VarlinkProtocolError, match="middle of a message"):
        next(it)
    later.join()
    assert conn.closed
    os.close(fd)


def test_replies_split_into_single_bytes(server: FakeServer) -> None:
    conn = server.connection()
    data = json.dumps({"parameters": {"text": "é" * 10}}).encode() + b"\0"

    def trickle() -> None:
        for i in range(len(data)):
            server.sock.send(data[i : i + 1])
            time.sleep(0.001)

    t = threading.Thread(target=trickle)
    t.start()
    assert conn.call("a.b.C") == {"text": "é" * 10}
    t.join()


def test_timeout_closes_the_connection(server: FakeServer) -> None:
    conn = server.connection(timeout=0.2)
    start = time.monotonic()
    with pytest.raises(VarlinkTimeout, match=r"no reply to a\.b\.Slow within 0\.2 s"):
        conn.call("a.b.Slow")
    assert 0.15 < time.monotonic() - start < 2
    assert conn.closed
    with pytest.raises(VarlinkDisconnected):
        conn.call("a.b.C")
    # A per-call timeout overrides the connection's.
    srv = FakeServer()
    conn = srv.connection(timeout=None)
    with pytest.raises(TimeoutError):
        conn.call("a.b.Slow", timeout=0.05)
    srv.close()


def test_server_going_away(server: FakeServer) -> None:
    conn = server.connection()
    server.send(b'{"parameters":')
    server.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(VarlinkDisconnected, match="closed the connection before replying"):
        conn.call("a.b.C")
    assert conn.closed


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"not json\0", "not JSON"),
        (b"[1]\0", "not a JSON object"),
        (b'{"parameters": 3}\0', "malformed reply"),
        (b'{"continues": "yes"}\0', "malformed reply"),
        (b'{"error": 7}\0', "malformed error"),
        (b'{"parameters": {}, "continues": true}\0', "'continues' in the reply"),
        (b'{"parameters": {"a": "\xff"}}\0', "not JSON"),
    ],
)
def test_bad_replies(server: FakeServer, raw: bytes, match: str) -> None:
    conn = server.connection()
    server.send(raw)
    with pytest.raises(VarlinkProtocolError, match=match):
        conn.call("a.b.C")
    assert conn.closed


def test_oversized_reply(server: FakeServer) -> None:
    conn = server.connection()

    def flood() -> None:
        try:
            server.sock.sendall(b"x" * (codec.MAX_MESSAGE_SIZE + 300_000))
        except OSError:
            pass

    t = threading.Thread(target=flood)
    t.start()
    with pytest.raises(VarlinkProtocolError, match="larger than"):
        conn.call("a.b.C")
    server.sock.close()
    t.join()


def test_abandoned_more_closes_the_connection(server: FakeServer) -> None:
    conn = server.connection()
    server.send({"parameters": {"n": 1}, "continues": True})
    it = conn.call("a.b.Stream", more=True)
    assert next(it) == {"n": 1}
    # Busy while the replies are being read.
    with pytest.raises(VarlinkClientError, match="busy"):
        conn.call("a.b.C")
    del it
    assert conn.closed
    server.recv_call()
    with pytest.raises(EOFError):
        server.recv_call()  # the server sees the end of the connection


def test_unread_fds_are_closed_with_the_connection(server: FakeServer, tmp_path: Path) -> None:
    conn = server.connection()
    fd = os.open(tmp_path, os.O_RDONLY)
    before = _fd_count()
    server.send({"parameters": {}, "continues": True}, fds=[fd])
    it = conn.call("a.b.Stream", more=True)
    next(it).close_fds()
    server.send({"parameters": {}, "continues": True}, fds=[fd])
    server.send({"parameters": {}}, fds=[fd])
    time.sleep(0.05)
    conn.close()
    assert _fd_count() == before - 1  # the connection's socket went too
    # An error reply's fds are closed too.
    srv = FakeServer()
    conn = srv.connection()
    srv.send({"error": "a.b.Failed"}, fds=[fd])
    before = _fd_count()
    with pytest.raises(VarlinkCallError):
        conn.call("a.b.C")
    assert _fd_count() == before
    conn.close()
    srv.close()
    os.close(fd)


def test_get_info_and_description(server: FakeServer) -> None:
    conn = server.connection()
    server.send(
        {"parameters": {"vendor": "v", "interfaces": ["org.varlink.service"]}},
        {"parameters": {"description": "interface a.b\n"}},
        {"parameters": {}},
    )
    assert conn.get_info()["vendor"] == "v"
    assert conn.get_interface_description("a.b") == "interface a.b\n"
    with pytest.raises(VarlinkProtocolError):
        conn.get_interface_description("a.b")
    assert server.recv_call()[0] == {"method": "org.varlink.service.GetInfo"}
    assert server.recv_call()[0] == {
        "method": "org.varlink.service.GetInterfaceDescription",
        "parameters": {"interface": "a.b"},
    }


# -- connecting ---------------------------------------------------------------------------------


def _echo_listener(path: str) -> tuple[socket.socket, threading.Thread]:
    """A listening socket answering each call with its own parameters."""
    if path.startswith("@"):
        addr = "\0" + path[1:]
    else:
        addr = path
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(addr)
    lsock.listen()

    def run() -> None:
        conn, _ = lsock.accept()
        with conn:
            buf = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\0" in buf:
                    msg, _, buf = buf.partition(b"\0")
                    call = json.loads(msg)
                    conn.sendall(
                        json.dumps({"parameters": call.get("parameters", {})}).encode() + b"\0"
                    )

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return lsock, t


@pytest.mark.parametrize("form", ["path", "unix:", "unix:;mode", "abstract"])
def test_connect_unix(tmp_path: Path, form: str) -> None:
    path = str(tmp_path / "s")
    if form == "abstract":
        path = f"@composefsd-test-{os.getpid()}-{time.monotonic_ns()}"
    lsock, t = _echo_listener(path)
    address = {
        "path": path,
        "unix:": f"unix:{path}",
        "unix:;mode": f"unix:{path};mode=0600",
        "abstract": f"unix:{path}",
    }[form]
    with client.connect(address) as conn:
        assert conn.call("a.b.Echo", {"v": form}) == {"v": form}
        assert conn.address == address
    t.join(5)
    lsock.close()


def test_connect_errors(tmp_path: Path) -> None:
    with pytest.raises(VarlinkConnectError) as info:
        client.connect(str(tmp_path / "none"))
    assert info.value.errno == errno.ENOENT
    assert str(info.value) == f"cannot connect to {tmp_path}/none: No such file or directory"
    # A socket file nobody listens on.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "dead"))
    s.close()
    with pytest.raises(VarlinkConnectError) as info:
        client.connect(f"unix:{tmp_path}/dead")
    assert info.value.errno == errno.ECONNREFUSED
    for bad in ("", "unix:", "exec:", "relative-name"):
        with pytest.raises(VarlinkConnectError) as info:
            client.connect(bad)
        assert info.value.errno == errno.EINVAL
    (tmp_path / "plain").write_text("")
    with pytest.raises(VarlinkConnectError, match="not an executable file"):
        client.connect(f"exec:{tmp_path}/plain")


SERVER_SCRIPT = """\
#!{python}
# Reports its activation environment, then echoes calls on fd 3 until EOF.
import json, os, socket, stat
st = os.fstat(3)
env = {{k: os.environ.get(k) for k in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")}}
env["pid"] = os.getpid()
env["fd3_is_socket"] = stat.S_ISSOCK(st.st_mode)
env["fd4_open"] = True
try:
    os.fstat(4)
except OSError:
    env["fd4_open"] = False
sock = socket.socket(fileno=3)
env["acceptconn"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
buf = b""
while True:
    data = sock.recv(4096)
    if not data:
        break
    buf += data
    while b"\\0" in buf:
        msg, _, buf = buf.partition(b"\\0")
        call = json.loads(msg)
        reply = dict(env, args=call.get("parameters", {{}}))
        sock.sendall(json.dumps({{"parameters": reply}}).encode() + b"\\0")
open({marker!r}, "w").write("exited")
"""


@pytest.mark.parametrize("form", ["exec:", "plain path"])
def test_connect_exec_activation_environment(tmp_path: Path, form: str) -> None:
    script = tmp_path / "server"
    marker = tmp_path / "exited"
    script.write_text(
        textwrap.dedent(SERVER_SCRIPT.format(python=sys.executable, marker=str(marker)))
    )
    script.chmod(0o755)
    address = f"exec:{script}" if form == "exec:" else str(script)
    # fd 3 taken in the parent must not confuse the child's fd 3.
    conn = client.connect(address)
    try:
        reply = conn.call("a.b.Env", {"x": 1})
        assert conn.pid is not None
        assert reply == {
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "varlink",
            "LISTEN_PID": str(conn.pid),
            "pid": conn.pid,
            "fd3_is_socket": True,
            "fd4_open": False,
            "acceptconn": 0,
            "args": {"x": 1},
        }
    finally:
        conn.close()
    assert marker.read_text() == "exited"  # EOF ended it and close() reaped it
    with pytest.raises(ChildProcessError):
        os.waitpid(reply["pid"], os.WNOHANG)


def test_spawn_with_low_fds_free(tmp_path: Path) -> None:
    """socketpair() may hand out fd 3 itself; the child still gets its end on fd 3."""
    script = tmp_path / "server"
    script.write_text(SERVER_SCRIPT.format(python=sys.executable, marker=str(tmp_path / "m")))
    script.chmod(0o755)
    saved = os.dup(3) if _is_open(3) else None
    try:
        if saved is not None:
            os.close(3)
        conn = client.spawn([str(script)])
        with conn:
            assert conn.call("a.b.Env")["fd3_is_socket"] is True
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_exec_server_that_ignores_eof_is_terminated(tmp_path: Path) -> None:
    script = tmp_path / "stubborn"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    conn = client.connect(f"exec:{script}", timeout=0.1)
    pid = conn.pid
    assert pid is not None
    with pytest.raises(VarlinkTimeout):
        conn.call("a.b.C")
    start = time.monotonic()
    conn.close(wait=0.2)
    assert time.monotonic() - start < 3
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_exec_server_that_fails_to_start(tmp_path: Path) -> None:
    script = tmp_path / "broken"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    with client.connect(f"exec:{script}") as conn, pytest.raises(VarlinkDisconnected):
        conn.call("a.b.C")


def test_default_address(monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.default_address(0) == "/run/composefs/io.composefs.Repository"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert client.default_address(1000) == "/run/user/1000/composefs/io.composefs.Repository"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert client.default_address(1000) == "/tmp/composefs-1000/io.composefs.Repository"


def test_mode_of_fake_socketpair_is_a_socket(server: FakeServer) -> None:
    assert stat.S_ISSOCK(os.fstat(server.connection().fileno()).st_mode)
