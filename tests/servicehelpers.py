"""Running composefsd for tests: a daemon on a temporary socket and repository,
ready once it has sent READY=1 (sd_notify) and stopped with SIGTERM.

The one home of the daemon helpers: ``start_daemon`` (and ``running_daemon`` around
it), used by the fixtures in tests/conftest.py (``daemon``, ``tree``, ``mnt``) and by
tests that need a daemon of their own; ``unmount_below`` for fixtures' clean-up."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from composefsd.kernel.mountinfo import list_composefs_mounts
from composefsd.kernel.syscalls import MNT_DETACH, umount2

DAEMON = [sys.executable, "-m", "composefsd.service.daemon"]
CTL = [sys.executable, "-m", "composefsd.cli.composefsctl"]
#: The algorithm of a repository a test's daemon creates: the tests compare digests
#: with C mkcomposefs's, which are sha256 (composefsd's own default is sha512).
TEST_ALGORITHM = "sha256"


def creation_args(repo: Path, args: tuple[str, ...], algorithm: str | None) -> list[str]:
    """``--algorithm ALGORITHM`` if composefsd is to create ``repo`` and ``args`` name
    no algorithm (an existing repository keeps its own); None: composefsd's default."""
    if algorithm is None or "--algorithm" in args or (repo / "meta.json").exists():
        return []
    return ["--algorithm", algorithm]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    #: Short directory holding the socket, the notify socket and the runtime dir
    #: (AF_UNIX paths are limited to 108 bytes, pytest's tmp_path can be longer).
    rundir: Path
    socket: Path
    repo: Path
    log: Path
    _cleanup: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return str(self.socket)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"composefsd did not stop within {timeout} s; log:\n{self.log_text()}"
                ) from None
        for path in self._cleanup:
            shutil.rmtree(path, ignore_errors=True)
        assert self.proc.returncode is not None
        return self.proc.returncode


def short_dir(prefix: str = "cfsd-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_ready(
    notify: socket.socket, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"composefsd sent no READY=1 within {timeout} s; log:\n{log.read_text()}"
            )
        notify.settimeout(min(0.2, remaining))
        try:
            data = notify.recv(4096)
        except TimeoutError:
            if proc.poll() is not None:
                raise AssertionError(
                    f"composefsd exited with {proc.returncode} before READY=1; log:\n{log.read_text()}"
                ) from None
            continue
        if b"READY=1" in data.split(b"\n"):
            return


def start_daemon(
    repo: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    public: bool = False,
    log_level: str = "debug",
    algorithm: str | None = TEST_ALGORITHM,
) -> Daemon:
    """composefsd --repo REPO --listen <short dir>/sock ARGS, ready to serve.

    ``public``: every user may connect (socket mode 0666 in a 0755 directory).
    ``algorithm``: of the repository if the daemon creates it (:func:`creation_args`).
    """
    rundir = short_dir()
    sock = rundir / "sock"
    log = rundir / "log"
    notify_path = rundir / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    full_env = dict(os.environ if env is None else env)
    full_env["NOTIFY_SOCKET"] = str(notify_path)
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "SYSTEMD_VARLINK_LISTEN"):
        full_env.pop(name, None)
    argv = [
        *DAEMON,
        "--repo",
        str(repo),
        "--listen",
        str(sock),
        "--runtime-dir",
        str(rundir / "runtime"),
        "--log-level",
        log_level,
        *(["--socket-mode", "0666"] if public else []),
        *creation_args(repo, args, algorithm),
        *args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=full_env
        )
    try:
        wait_ready(notify, proc, log, timeout)
    finally:
        notify.close()
    if public:
        rundir.chmod(0o755)
    return Daemon(proc=proc, rundir=rundir, socket=sock, repo=repo, log=log, _cleanup=[rundir])


@contextmanager
def running_daemon(
    repo: Path,
    *args: str,
    check_exit: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    public: bool = False,
    log_level: str = "debug",
    algorithm: str | None = TEST_ALGORITHM,
) -> Iterator[Daemon]:
    """``start_daemon``, stopped on leaving; with ``check_exit`` it must then exit 0."""
    d = start_daemon(
        repo,
        *args,
        env=env,
        timeout=timeout,
        public=public,
        log_level=log_level,
        algorithm=algorithm,
    )
    try:
        yield d
    finally:
        status = d.stop()
    if check_exit:
        assert status == 0, f"composefsd exited with {status}; log:\n{d.log_text()}"


def unmount_below(root: Path) -> None:
    """Detach every composefs mount whose mount point starts with ``root``, innermost first."""
    for m in reversed(list_composefs_mounts()):
        if m.mountpoint.startswith(str(root)):
            umount2(m.mountpoint, MNT_DETACH)


def exec_wrapper(path: Path, repo: Path, runtime_dir: Path, *args: str) -> Path:
    """A program for exec: addresses: runs composefsd on the fd 3 it is given."""
    argv = " ".join(
        f"'{a}'"
        for a in [
            *DAEMON,
            "--repo",
            str(repo),
            "--runtime-dir",
            str(runtime_dir),
            *creation_args(repo, args, TEST_ALGORITHM),
            *args,
        ]
    )
    path.write_text(f"#!/bin/sh\nexec {argv}\n")
    path.chmod(0o755)
    return path
