"""The daemon's start-up line names the repository and every socket it serves, so
that whoever started it knows where to connect: the ``--listen`` path, the path
``SYSTEMD_VARLINK_LISTEN`` or a socket unit gave, or the connection it was handed.
(The default socket, for users with and without $XDG_RUNTIME_DIR, is checked where
the daemon runs as another user: test_runtime_dirs.py.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefsd.service.activation import describe_socket
from servicehelpers import DAEMON, creation_args, running_daemon, short_dir, wait_ready

_SERVING = re.compile(r" INFO: serving (?P<repo>'[^']*') \([^)]*\) on (?P<sockets>.*)$", re.M)

# Moves the socket given as argv[1] to fd 3 and execs the rest with LISTEN_PID set
# to its own pid, as systemd and varlinkctl do.
_LAUNCHER = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def _serving_line(log: str) -> tuple[str, str]:
    found = _SERVING.findall(log)
    assert len(found) == 1, log
    repo, sockets = found[0]
    return repo, sockets


@pytest.fixture
def rundir() -> Iterator[Path]:
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run(rundir: Path, env: dict[str, str], *, fd: socket.socket | None = None) -> tuple[str, str]:
    """composefsd on ``rundir``/repo with ``env`` added (and ``fd`` as fd 3 with
    LISTEN_PID), until READY=1; stopped with SIGTERM; the serving line's parts."""
    repo = rundir / "repo"
    notify_path = rundir / "notify"
    log = rundir / "log"
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "NOTIFY_", "SYSTEMD_VARLINK"))
    }
    full_env |= env | {"NOTIFY_SOCKET": str(notify_path)}
    argv = [
        *DAEMON[1:],
        "--repo",
        str(repo),
        "--runtime-dir",
        str(rundir / "runtime"),
        *creation_args(repo, (), "sha256"),
    ]
    if fd is None:
        argv = [sys.executable, *argv]
        pass_fds: tuple[int, ...] = ()
    else:
        argv = [sys.executable, "-c", _LAUNCHER, str(fd.fileno()), *argv]
        pass_fds = (fd.fileno(),)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=pass_fds,
            )
        try:
            if fd is not None:
                fd.close()
            wait_ready(notify, proc, log, 60)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            status = proc.wait(60)
    text = log.read_text()
    assert status == 0, text
    assert _serving_line(text)[0] == repr(str(repo))
    return _serving_line(text)


def test_listen_path_is_logged(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "repo", log_level="info") as d:
        repo, sockets = _serving_line(d.log_text())
    assert repo == repr(str(tmp_path / "repo"))
    assert sockets == repr(str(d.socket))


def test_systemd_varlink_listen_path_is_logged(rundir: Path) -> None:
    path = rundir / "sock"
    assert _run(rundir, {"SYSTEMD_VARLINK_LISTEN": str(path)})[1] == repr(str(path))


def test_activated_listening_socket_is_logged(rundir: Path) -> None:
    path = rundir / "activated sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    assert _run(rundir, {"LISTEN_FDS": "1"}, fd=sock)[1] == repr(str(path))


def test_activated_connection_is_logged(rundir: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        # The daemon serves the connection until it closes; SIGTERM ends it first.
        assert _run(rundir, {"LISTEN_FDS": "1"}, fd=theirs)[1] == "the connection on fd 3"


def test_describe_socket(tmp_path: Path) -> None:
    odd = tmp_path / "a'b\nc"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(odd))
        s.listen()
        assert describe_socket(s) == repr(str(odd))
        assert "\n" not in describe_socket(s)
    name = f"composefsd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind("\0" + name)
        s.listen()
        assert describe_socket(s) == f"@{name}"
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert describe_socket(a) == f"the connection on fd {a.fileno()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        path = tmp_path / "l"
        listening.bind(str(path))
        listening.listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            conn, _ = listening.accept()
            with conn:
                # Accept=yes: the connection systemd accepted on the unit's socket.
                assert describe_socket(conn) == (
                    f"the connection on fd {conn.fileno()} (to {str(path)!r})"
                )
