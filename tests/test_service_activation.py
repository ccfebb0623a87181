"""composefsd.service.activation: LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, SYSTEMD_VARLINK_LISTEN,
listen_unix, sd_notify and SO_ACCEPTCONN; and the transport started every way systemd and
varlinkctl start a Varlink service: systemd-socket-activate with a listening socket and with
--accept, a connected fd 3 (varlinkctl exec:), SYSTEMD_VARLINK_LISTEN=<path> and =- (stdin)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from composefsd.service.activation import (
    is_listening,
    listen_unix,
    notify,
    sockets_from_environment,
)

DATA = Path(__file__).resolve().parent / "data"
EXAMPLE = DATA / "example_service.py"
T = "org.example.test."
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*LISTEN_VARS, "SYSTEMD_VARLINK_LISTEN", "NOTIFY_SOCKET"):
        monkeypatch.delenv(name, raising=False)


def free_fds(count: int) -> int:
    """The first of ``count`` consecutive unused fd numbers (from 100 up)."""
    base = 100
    while True:
        for fd in range(base, base + count):
            try:
                os.fstat(fd)
            except OSError:
                continue
            base = fd + 1
            break
        else:
            return base


def pass_fds(monkeypatch: pytest.MonkeyPatch, socks: list[socket.socket], **env: str) -> int:
    """Put copies of ``socks`` at consecutive fds, as systemd would at 3; returns the first."""
    base = free_fds(len(socks))
    for i, sock in enumerate(socks):
        os.dup2(sock.fileno(), base + i, inheritable=True)
    monkeypatch.setenv("LISTEN_FDS", str(len(socks)))
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return base


def listening(tmp_path: Path, name: str) -> socket.socket:
    return listen_unix(str(tmp_path / name))


def test_listen_fds_with_a_listening_socket(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    original = listening(tmp_path, "a")
    base = pass_fds(monkeypatch, [original], LISTEN_FDNAMES="varlink")
    sockets = sockets_from_environment(fd_start=base)
    assert sockets is not None and len(sockets) == 1
    sock = sockets[0]
    assert sock.fileno() == base
    assert (sock.family, sock.type) == (socket.AF_UNIX, socket.SOCK_STREAM)
    assert is_listening(sock)
    assert not os.get_inheritable(base)
    assert sock.getsockname() == str(tmp_path / "a")
    for name in LISTEN_VARS:
        assert name not in os.environ
    sock.close()
    original.close()


def test_listen_fds_prefers_the_ones_named_varlink(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    originals = [listening(tmp_path, n) for n in ("a", "b", "c")]
    base = pass_fds(monkeypatch, originals, LISTEN_FDNAMES="other:varlink:more")
    sockets = sockets_from_environment(fd_start=base)
    assert sockets is not None
    assert [s.fileno() for s in sockets] == [base + 1]
    assert sockets[0].getsockname() == str(tmp_path / "b")
    # The others are left alone, but not inherited by children.
    assert not os.get_inheritable(base) and not os.get_inheritable(base + 2)
    os.close(base)
    os.close(base + 2)
    sockets[0].close()
    for s in originals:
        s.close()


@pytest.mark.parametrize("names", [None, "", "one:two", "varlink"])
def test_listen_fds_uses_all_without_varlink_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, names: str | None
) -> None:
    originals = [listening(tmp_path, n) for n in ("a", "b")]
    env = {} if names is None else {"LISTEN_FDNAMES": names}
    base = pass_fds(monkeypatch, originals, **env)
    sockets = sockets_from_environment(fd_start=base)
    assert sockets is not None
    assert [s.fileno() for s in sockets] == [base, base + 1]
    for s in [*sockets, *originals]:
        s.close()


def test_listen_fds_connected_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = socket.socketpair()
    base = pass_fds(monkeypatch, [ours], LISTEN_FDNAMES="varlink")
    sockets = sockets_from_environment(fd_start=base)
    assert sockets is not None
    assert not is_listening(sockets[0])
    for s in (*sockets, ours, theirs):
        s.close()


def test_listen_fds_for_another_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    original = listening(tmp_path, "a")
    base = pass_fds(monkeypatch, [original])
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert sockets_from_environment(fd_start=base) is None
    # Cleared all the same, and the fd is untouched.
    assert "LISTEN_FDS" not in os.environ
    assert os.get_inheritable(base)
    os.close(base)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    base = pass_fds(monkeypatch, [original])
    monkeypatch.delenv("LISTEN_PID")
    assert sockets_from_environment(fd_start=base) is None
    os.close(base)
    original.close()


def test_nothing_in_the_environment() -> None:
    assert sockets_from_environment() is None


def test_bad_activation_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LISTEN_FDS", "x")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    with pytest.raises(ValueError, match="LISTEN_FDS='x'"):
        sockets_from_environment()
    fd = os.open(tmp_path, os.O_RDONLY)
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    with pytest.raises(OSError, match=f"activation fd {fd} is not a socket"):
        sockets_from_environment(fd_start=fd)
    os.close(fd)


def test_systemd_varlink_listen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "dir" / "io.example"
    monkeypatch.setenv("SYSTEMD_VARLINK_LISTEN", str(path))
    sockets = sockets_from_environment()
    assert sockets is not None and len(sockets) == 1
    assert is_listening(sockets[0])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Together with activated sockets: both.
    activated = listening(tmp_path, "a")
    base = pass_fds(monkeypatch, [activated])
    sockets[0].close()
    both = sockets_from_environment(fd_start=base)
    assert both is not None
    assert [s.getsockname() for s in both] == [str(tmp_path / "a"), str(path)]
    for s in [*both, activated]:
        s.close()


def test_listen_unix(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "sock"
    sock = listen_unix(str(path), mode=0o666)
    assert is_listening(sock)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666
    # Someone listens: refused.
    with pytest.raises(OSError, match="another server is listening") as info:
        listen_unix(str(path))
    assert info.value.errno == 98  # EADDRINUSE
    sock.close()
    # Stale: replaced.
    sock = listen_unix(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    client.close()
    sock.close()
    # Not a socket: refused.
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a socket"):
        listen_unix(str(tmp_path / "file"))
    assert (tmp_path / "file").exists()


def test_listen_unix_abstract() -> None:
    name = f"@composefsd-test-{os.getpid()}"
    sock = listen_unix(name)
    assert sock.getsockname() == b"\0" + name[1:].encode()
    client = socket.socket(socket.AF_UNIX)
    client.connect("\0" + name[1:])
    client.close()
    sock.close()


def test_notify(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert notify("READY=1") is False
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify"))
    receiver.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    assert notify("READY=1") is True
    assert receiver.recv(4096) == b"READY=1"
    assert notify("STOPPING=1\nSTATUS=bye") is True
    assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=bye"
    receiver.close()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind(f"\0composefsd-notify-{os.getpid()}")
    abstract.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", f"@composefsd-notify-{os.getpid()}")
    assert notify("READY=1") is True
    assert abstract.recv(4096) == b"READY=1"
    abstract.close()
    # Nobody there, or an address we cannot use: False, no exception.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing"))
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify("READY=1") is False


def test_is_listening(tmp_path: Path) -> None:
    sock = listening(tmp_path, "s")
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "s"))
    conn, _ = sock.accept()
    assert is_listening(sock)
    assert not is_listening(client) and not is_listening(conn)
    for s in (sock, client, conn):
        s.close()


# The example server as a process, started the ways systemd and varlinkctl start services


def call(sock: socket.socket, method: str, parameters: dict[str, Any] | None = None) -> Any:
    message: dict[str, Any] = {"method": method}
    if parameters:
        message["parameters"] = parameters
    sock.sendall(json.dumps(message).encode() + b"\0")
    data = b""
    while not data.endswith(b"\0"):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    return json.loads(data[:-1])


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def example_command() -> list[str]:
    return [sys.executable, str(EXAMPLE)]


def test_systemd_socket_activate_listening(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    path = tmp_path / "io.example"
    notify_path = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(10)
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(path),
            "--fdname=varlink",
            f"--setenv=NOTIFY_SOCKET={notify_path}",
            *example_command(),
        ],
        stderr=subprocess.PIPE,
    )
    processes.append(proc)
    # The service starts at the first connection and takes over the listening socket.
    a = connect(path)
    assert call(a, "org.varlink.service.GetInfo")["parameters"]["product"] == "example"
    assert receiver.recv(100) == b"READY=1"
    b = connect(path)
    reply = call(b, T + "WhoAmI")["parameters"]
    assert reply["pid"] == os.getpid()
    a.close()
    b.close()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()
    receiver.close()


def test_systemd_socket_activate_accept(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    path = tmp_path / "io.example"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "--accept", "-l", str(path), *example_command()],
        stderr=subprocess.DEVNULL,
    )
    processes.append(proc)
    # One service process per connection, each on a connected fd 3.
    for text in ("first", "second"):
        sock = connect(path)
        assert call(sock, T + "Echo", {"text": text}) == {"parameters": {"text": text}}
        sock.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def test_connected_fd_3_exits_when_the_client_leaves(
    processes: list[subprocess.Popen[bytes]],
) -> None:
    ours, theirs = socket.socketpair()
    # Above 3 (socketpair() may have returned 3 itself).
    fd = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
    theirs.close()
    # What varlinkctl does for exec: addresses: the socket on fd 3, LISTEN_PID its own pid.
    launcher = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        f"os.close({fd})\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='varlink')\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, *example_command()],
        pass_fds=[fd],
        stderr=subprocess.PIPE,
    )
    processes.append(proc)
    os.close(fd)
    ours.settimeout(10)
    assert call(ours, T + "Echo", {"text": "fd 3"}) == {"parameters": {"text": "fd 3"}}
    assert call(ours, T + "Nope")["error"] == "org.varlink.service.MethodNotFound"
    ours.close()
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()


def test_systemd_varlink_listen_stdin(processes: list[subprocess.Popen[bytes]]) -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        example_command(),
        stdin=theirs.fileno(),
        stderr=subprocess.PIPE,
        env={**os.environ, "SYSTEMD_VARLINK_LISTEN": "-"},
    )
    processes.append(proc)
    theirs.close()
    ours.settimeout(10)
    assert call(ours, T + "Echo", {"text": "stdin"}) == {"parameters": {"text": "stdin"}}
    ours.close()
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()


def test_systemd_varlink_listen_path(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    path = tmp_path / "run" / "io.example"
    proc = subprocess.Popen(
        example_command(),
        stderr=subprocess.PIPE,
        env={**os.environ, "SYSTEMD_VARLINK_LISTEN": str(path)},
    )
    processes.append(proc)
    sock = connect(path)
    assert call(sock, T + "Echo", {"text": "path"}) == {"parameters": {"text": "path"}}
    sock.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()


def test_varlinkctl_exec(tmp_path: Path, reference_bin: Path) -> None:
    wrapper = tmp_path / "example-service"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {EXAMPLE}\n")
    wrapper.chmod(0o755)
    varlinkctl = str(reference_bin / "varlinkctl")
    out = subprocess.run(
        [varlinkctl, "call", "--json=short", f"exec:{wrapper}", T + "Echo", '{"text":"exec"}'],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert json.loads(out.stdout) == {"text": "exec"}
    out = subprocess.run(
        [
            varlinkctl,
            "call",
            "--more",
            "--json=short",
            f"exec:{wrapper}",
            T + "Count",
            '{"count":1}',
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert [json.loads(x.strip("\x1e")) for x in out.stdout.decode().split("\n") if x.strip()] == [
        {"i": 0},
        {"i": 1},
    ]
