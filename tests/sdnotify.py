"""A fake ``$NOTIFY_SOCKET`` for tests of what composefsd tells systemd (READY=1,
RELOADING=1, WATCHDOG=1, STATUS=...), and a daemon that keeps it: the one home of
both for tests/test_systemd_service.py, test_config.py and test_watchdog.py.

Waits are bounded (they fail the test after ``timeout``); nothing asserts on how
long anything took."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from servicehelpers import DAEMON, TEST_ALGORITHM, creation_args, short_dir


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket. A thread reads it
    all the time (as systemd does), so the sender never finds it full."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        #: Every message received so far, in order.
        self.messages: list[str] = []
        #: Shown with a failed wait (the daemon's log).
        self.context: Callable[[], str] = lambda: ""
        self._next = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data and self._closed:
                return
            with self._cond:
                self.messages.append(data.decode())
                self._cond.notify_all()

    def close(self) -> None:
        self._closed = True
        self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self.sock.close()

    def receive(self, timeout: float) -> str | None:
        """The next message not yet taken, or None if none comes within ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: self._next < len(self.messages), timeout)
            if self._next >= len(self.messages):
                return None
            self._next += 1
            return self.messages[self._next - 1]

    def drain(self) -> list[str]:
        """The messages not yet taken, without waiting."""
        with self._cond:
            out = self.messages[self._next :]
            self._next = len(self.messages)
            return out

    def wait_for(
        self,
        predicate: Callable[[str], bool],
        timeout: float = 30.0,
        alive: Callable[[], bool] = lambda: True,
    ) -> str:
        """The first message not yet taken for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.receive(min(0.2, max(0.001, deadline - time.monotonic())))
            if text is not None and predicate(text):
                return text
            if text is None and not alive():
                raise AssertionError(f"the process died; messages: {self.messages}{self.context()}")
        raise AssertionError(
            f"no matching message within {timeout} s: {self.messages}{self.context()}"
        )


def fields(message: str) -> dict[str, str]:
    """``KEY=value`` lines of one notify message."""
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


@dataclass
class NotifiedDaemon:
    proc: subprocess.Popen[bytes]
    rundir: Path
    socket: Path
    log: Path
    notify: NotifyListener
    #: The log once the daemon's directory is gone (after :func:`notified_daemon`).
    saved_log: str | None = None

    @property
    def address(self) -> str:
        return str(self.socket)

    def log_text(self) -> str:
        if self.saved_log is not None:
            return self.saved_log
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
        return self.notify.wait_for(predicate, timeout, self.alive)

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline or not self.alive():
                raise AssertionError(f"{text!r} not logged; log:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, wait, keep the log and remove the daemon's directory; the exit
        status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.saved_log is None:
            self.notify.close()
            self.saved_log = self.log_text()
            shutil.rmtree(self.rundir, ignore_errors=True)
        return self.proc.returncode


def start(
    repo: Path,
    *args: str,
    env: dict[str, str] | None = None,
    socket_mode: str | None = None,
    timeout: float = 30.0,
) -> NotifiedDaemon:
    """composefsd --repo REPO --listen <short dir>/sock ARGS with a fake notify
    socket, once it has sent READY=1."""
    rundir = short_dir("cfsd-sd-")
    sock = rundir / "sock"
    log = rundir / "log"
    listener = NotifyListener(rundir / "notify")
    full_env = dict(os.environ if env is None else env)
    full_env["NOTIFY_SOCKET"] = str(listener.path)
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "SYSTEMD_VARLINK_LISTEN"):
        full_env.pop(name, None)
    if env is None:
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            full_env.pop(name, None)
    argv = [
        *DAEMON,
        "--repo",
        str(repo),
        "--listen",
        str(sock),
        "--runtime-dir",
        str(rundir / "runtime"),
        *(["--socket-mode", socket_mode] if socket_mode else []),
        *creation_args(repo, args, TEST_ALGORITHM),
        *args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=full_env
        )
    d = NotifiedDaemon(proc, rundir, sock, log, listener)
    listener.context = lambda: "\nlog:\n" + d.log_text()
    try:
        d.wait_for(lambda m: "READY=1" in m.splitlines(), timeout)
    except BaseException:
        d.stop()
        raise
    if socket_mode:
        rundir.chmod(0o755)
    return d


@contextmanager
def notified_daemon(
    repo: Path,
    *args: str,
    env: dict[str, str] | None = None,
    socket_mode: str | None = None,
) -> Iterator[NotifiedDaemon]:
    """:func:`start`, stopped on leaving; it must then exit 0."""
    d = start(repo, *args, env=env, socket_mode=socket_mode)
    try:
        yield d
    finally:
        status = d.stop()
    assert status == 0, f"composefsd exited with {status}; log:\n{d.saved_log}"


def write_config(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path
