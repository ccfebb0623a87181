"""Where composefsd puts its socket and runtime files, and that nobody else controls
them (composefsd.service.runtime).

Who controls the input: the directories are named by defaults
(``/tmp/composefs-<uid>`` without XDG_RUNTIME_DIR), by the environment, or by the
admin (``--listen``, ``--runtime-dir``); what is *in* the file system on the way
may have been put there by any other local user. Hostile values: a directory of
another user, one others may write (sticky or not), a symbolic link of another
user, a link loop, a file instead of a directory, ``..`` through links.

The daemon runs as a throw-away user (alice) while another (bob) has planted
``/tmp/composefs-<alice's uid>`` or ``/tmp/composefsd-<alice's uid>``: it refuses
with one line and exit status 1. Unplanted, it makes the directory itself (0700,
alice's) and alice's composefsctl reaches it there.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import users
from composefsd.service.activation import listen_unix
from composefsd.service.mounts import MountTracker
from composefsd.service.runtime import (
    UnsafeDirectoryError,
    check_directory,
    default_runtime_dir,
    default_socket_path,
    secure_directory,
)
from conftest import TestUsers
from servicehelpers import wait_ready
from users import TestUser, UserPython

OTHER = 4242  # some uid that is neither root nor ours


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _open_fds() -> set[str]:
    gc.collect()  # files earlier tests dropped are closed now, not in the middle of a count
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def umask077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# -- the defaults ---------------------------------------------------------------------------


def test_default_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule for the daemon and the client: before, a relative XDG_RUNTIME_DIR
    sent the client there and the daemon to /tmp."""
    sock = "io.composefs.Repository"
    assert default_socket_path(0) == Path(f"/run/composefs/{sock}")
    assert default_runtime_dir(0) == Path("/run/composefsd")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket_path(1000) == Path(f"/run/user/1000/composefs/{sock}")
    assert default_runtime_dir(1000) == Path("/run/user/1000/composefsd")
    for relative in ("run/user/1000", "", "."):
        monkeypatch.setenv("XDG_RUNTIME_DIR", relative)
        assert default_socket_path(1000) == Path(f"/tmp/composefs-1000/{sock}")
        assert default_runtime_dir(1000) == Path("/tmp/composefsd-1000")
    from composefsd.service import client

    assert client.default_address(1000) == f"/tmp/composefs-1000/{sock}"


# -- secure_directory and check_directory, as root --------------------------------------------


def test_creates_missing_directories_with_exact_modes(tmp_path: Path, umask077: None) -> None:
    """Under umask 0077 (composefsd.service has UMask=0077) what is made still
    gets its mode: the directory asked for the given one, those on the way 0755."""
    before = _open_fds()
    target = tmp_path / "a" / "b" / "c"
    secure_directory(target, 0o755)
    assert [_mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", target)] == [0o755] * 3
    secure_directory(tmp_path / "a" / "private", 0o700)
    assert _mode(tmp_path / "a" / "private") == 0o700
    # An existing, trusted directory is kept as it is.
    (tmp_path / "a" / "b").chmod(0o750)
    secure_directory(target, 0o700)
    assert (_mode(tmp_path / "a" / "b"), _mode(target)) == (0o750, 0o755)
    check_directory(target)
    assert _open_fds() == before


def test_check_directory_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        check_directory(tmp_path / "missing" / "deeper")
    assert info.value.filename == str(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    ("owner", "mode", "reason"),
    [
        (OTHER, 0o700, f"is owned by uid {OTHER}, not by root"),
        (OTHER, 0o755, f"is owned by uid {OTHER}, not by root"),
        (0, 0o777, "is writable by other users (mode 0777)"),
        (0, 0o775, "is writable by other users (mode 0775)"),
        (0, 0o757, "is writable by other users (mode 0757)"),
        # Sticky is fine on the way (like /tmp), not for the directory itself.
        (0, 0o1777, "is writable by other users (mode 1777)"),
    ],
)
def test_untrusted_directory(tmp_path: Path, owner: int, mode: int, reason: str) -> None:
    before = _open_fds()
    target = tmp_path / "planted"
    target.mkdir()
    os.chown(target, owner, -1)
    target.chmod(mode)
    for call in (check_directory, secure_directory):
        with pytest.raises(UnsafeDirectoryError) as info:
            call(target)
        assert str(info.value) == f"{target} {reason}"
        assert info.value.path == str(target)
        assert isinstance(info.value, PermissionError)
    if mode & stat.S_ISVTX:
        # Others may add entries but not take ours away: fine on the way somewhere.
        secure_directory(target / "sub" / "dir")
        assert _mode(target / "sub") == 0o755 and _mode(target / "sub" / "dir") == 0o700
    else:
        # Nor anything below it; and nothing is made inside.
        with pytest.raises(UnsafeDirectoryError) as info:
            secure_directory(target / "sub" / "dir")
        assert info.value.path == str(target)
        assert list(target.iterdir()) == []
    assert _open_fds() == before


def test_untrusted_ancestor(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    (parent / "child").mkdir(parents=True)
    parent.chmod(0o777)  # another user could rename child away and put theirs there
    with pytest.raises(UnsafeDirectoryError, match="parent is writable by other users"):
        check_directory(parent / "child")
    parent.chmod(0o1777)  # sticky: they may add entries, not replace ours
    check_directory(parent / "child")
    os.chown(parent, OTHER, -1)  # but its owner may do anything there
    with pytest.raises(UnsafeDirectoryError, match=f"parent is owned by uid {OTHER}"):
        check_directory(parent / "child")


def test_symbolic_links(tmp_path: Path) -> None:
    before = _open_fds()
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (tmp_path / "rel").symlink_to("real/sub/..")
    (tmp_path / "abs").symlink_to(real / "sub")
    check_directory(tmp_path / "rel" / "sub")
    check_directory(tmp_path / "abs")
    secure_directory(tmp_path / "abs" / "made", 0o700)
    assert _mode(real / "sub" / "made") == 0o700
    # A link of another user: where it points is theirs to choose.
    os.lchown(tmp_path / "abs", OTHER, -1)
    with pytest.raises(UnsafeDirectoryError) as info:
        check_directory(tmp_path / "abs")
    assert str(info.value) == f"{tmp_path / 'abs'} is a symbolic link owned by uid {OTHER}"
    # A link to an untrusted directory is judged by that directory.
    (tmp_path / "wide").mkdir(mode=0o777)
    (tmp_path / "wide").chmod(0o777)
    (tmp_path / "to-wide").symlink_to("wide")
    with pytest.raises(UnsafeDirectoryError, match="wide is writable by other users"):
        check_directory(tmp_path / "to-wide")
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(OSError) as oserr:
        secure_directory(tmp_path / "loop" / "x")
    assert oserr.value.errno == 40  # ELOOP
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        secure_directory(tmp_path / "file" / "x")
    assert _open_fds() == before


def test_listen_unix_refuses_an_untrusted_directory(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, OTHER, -1)
    with pytest.raises(UnsafeDirectoryError):
        listen_unix(str(planted / "sock"))
    assert list(planted.iterdir()) == []
    # Made by listen_unix: 0700 for a 0600 socket, 0755 when others may connect.
    sock = listen_unix(str(tmp_path / "own" / "sock"))
    sock.close()
    assert _mode(tmp_path / "own") == 0o700
    sock = listen_unix(str(tmp_path / "open" / "sock"), 0o666)
    sock.close()
    assert _mode(tmp_path / "open") == 0o755


def test_pins_only_in_a_trusted_runtime_dir(tmp_path: Path, umask077: None) -> None:
    digest = "ab" * 32
    runtime = tmp_path / "run"
    fd = os.open("/", os.O_RDONLY | os.O_CLOEXEC)  # any fd sits on some mount
    try:
        pin = MountTracker(runtime, grace=0).pin_detached(digest, fd)
        assert pin.path.is_file()
        assert _mode(runtime) == _mode(runtime / "pins") == _mode(pin.path.parent) == 0o700
        assert _mode(pin.path) == 0o600
        # Gone (a tmp cleaner), then made again by someone else: not used.
        shutil.rmtree(runtime)
        runtime.mkdir()
        os.chown(runtime, OTHER, -1)
        with pytest.raises(UnsafeDirectoryError):
            MountTracker(runtime, grace=0).pin_detached(digest, fd)
        assert list(runtime.iterdir()) == []
    finally:
        os.close(fd)


# -- the daemon as a user whose /tmp/composefs-<uid> another user planted ------------------


@dataclass
class Alice:
    users: TestUsers
    home: Path  # 0700, alice's: her repository, log and notify socket live here
    py: UserPython
    socket_dir: Path  # /tmp/composefs-<uid>: where her daemon listens by default
    runtime_dir: Path  # /tmp/composefsd-<uid>

    def daemon_argv(self, *extra: str, idle_exit: bool = True) -> list[str]:
        argv = self.py.command("-m", "composefsd.service.daemon", "--repo", str(self.home / "repo"))
        if idle_exit:
            # Should a daemon that ought to refuse serve after all, it stops by itself.
            argv += ["--idle-timeout", "3"]
        return [*argv, *extra]

    def run_daemon(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return users.run_as(
            self.users.alice,
            self.daemon_argv(*extra),
            env=self.py.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    @contextlib.contextmanager
    def serving(self, argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
        """Runs ``argv`` (her daemon, maybe behind a wrapper) as alice: ready when
        the block starts, stopped with SIGTERM after it, and must exit with 0."""
        a = self.users.alice
        notify_path = self.home / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(str(notify_path))
        os.chown(notify_path, a.uid, a.gid)
        log = self.home / "daemon.log"
        env = dict(self.py.env, NOTIFY_SOCKET=str(notify_path))
        with open(log, "wb") as out:
            proc = users.popen_as(a, argv, env=env, stdout=out, stderr=out)
        try:
            wait_ready(notify, proc, log, 120)
            yield proc
        finally:
            notify.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()

    def status(self, *wrapper: str) -> subprocess.CompletedProcess[str]:
        """``composefsctl status`` as alice (behind ``wrapper``, if any)."""
        return users.run_as(
            self.users.alice,
            [*wrapper, *self.py.command("-m", "composefsd.cli.composefsctl", "status")],
            env=self.py.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def plant(self, path: Path, owner: TestUser, mode: int) -> None:
        """What ``owner`` does before alice's daemon first starts."""
        path.mkdir()
        os.chown(path, owner.uid, owner.gid)
        path.chmod(mode)


@pytest.fixture
def alice(test_users: TestUsers, user_python: users.UserPython) -> Iterator[Alice]:
    public = users.public_dir()
    home = public / "alice"
    home.mkdir(mode=0o700)
    uid = test_users.alice.uid
    os.chown(home, uid, test_users.alice.gid)
    paths = [Path(f"/tmp/composefs-{uid}"), Path(f"/tmp/composefsd-{uid}")]

    def clean() -> None:
        for path in paths:
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)

    clean()  # a uid of a killed earlier run may come again
    try:
        yield Alice(test_users, home, user_python, paths[0], paths[1])
    finally:
        clean()
        users.remove_tree(public)


def _one_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if " ERROR: " in line]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0].split(" ERROR: ", 1)[1]


@pytest.mark.parametrize(
    ("planter", "mode", "reason"),
    [
        ("bob", 0o777, "is owned by uid {bob}, not by root or uid {alice}"),
        ("bob", 0o755, "is owned by uid {bob}, not by root or uid {alice}"),
        ("alice", 0o777, "is writable by other users (mode 0777)"),
        ("alice", 0o1777, "is writable by other users (mode 1777)"),
    ],
)
def test_daemon_refuses_a_planted_socket_directory(
    alice: Alice, planter: str, mode: int, reason: str
) -> None:
    owner = getattr(alice.users, planter)
    alice.plant(alice.socket_dir, owner, mode)
    proc = alice.run_daemon()
    sock = alice.socket_dir / "io.composefs.Repository"
    expected = reason.format(bob=alice.users.bob.uid, alice=alice.users.alice.uid)
    assert _one_error(proc) == (
        f"refusing to listen on {sock}: {alice.socket_dir} {expected}: another user could "
        "replace what composefsd puts there (remove it, or choose another path)"
    )
    assert list(alice.socket_dir.iterdir()) == []


def test_daemon_refuses_a_planted_symlink(alice: Alice) -> None:
    """bob's link to a directory of alice's own: he could point it elsewhere later."""
    target = alice.home / "sockets"
    target.mkdir(mode=0o700)
    os.chown(target, alice.users.alice.uid, alice.users.alice.gid)
    alice.socket_dir.symlink_to(target)
    os.lchown(alice.socket_dir, alice.users.bob.uid, alice.users.bob.gid)
    proc = alice.run_daemon()
    assert f"{alice.socket_dir} is a symbolic link owned by uid {alice.users.bob.uid}" in (
        _one_error(proc)
    )
    assert list(target.iterdir()) == []


def test_daemon_refuses_a_planted_runtime_directory(alice: Alice) -> None:
    alice.plant(alice.runtime_dir, alice.users.bob, 0o777)
    proc = alice.run_daemon("--listen", str(alice.home / "sock"))
    assert _one_error(proc) == (
        f"refusing the runtime directory {alice.runtime_dir}: {alice.runtime_dir} is owned by "
        f"uid {alice.users.bob.uid}, not by root or uid {alice.users.alice.uid}: another user "
        "could replace what composefsd puts there (remove it, or choose another path)"
    )
    assert list(alice.runtime_dir.iterdir()) == []
    assert not (alice.home / "sock").exists()


@pytest.mark.parametrize(("socket_mode", "dir_mode"), [("0600", 0o700), ("0666", 0o755)])
def test_daemon_makes_its_socket_directory(alice: Alice, socket_mode: str, dir_mode: int) -> None:
    """Nothing planted: alice's daemon makes /tmp/composefs-<uid> itself, hers and
    0700 (0755 when others may connect), even under umask 0077; her composefsctl,
    looking at the default address, talks to it there."""
    a = alice.users.alice
    daemon = alice.daemon_argv("--socket-mode", socket_mode, idle_exit=False)
    with alice.serving(["/bin/sh", "-c", 'umask 077; exec "$@"', "sh", *daemon]):
        st = alice.socket_dir.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == a.uid
        assert stat.S_IMODE(st.st_mode) == dir_mode
        sock = alice.socket_dir / "io.composefs.Repository"
        assert stat.S_IMODE(sock.stat().st_mode) == int(socket_mode, 8)
        status = alice.status()
        assert status.returncode == 0, status.stderr
        assert f"at {sock}\n" in status.stdout
    assert not (alice.socket_dir / "io.composefs.Repository").exists()


@pytest.mark.parametrize("xdg", ["run/user/relative", "", "absolute"])
def test_daemon_and_client_agree_on_the_default_socket(
    alice: Alice, xdg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice's daemon and her composefsctl, under the same XDG_RUNTIME_DIR, meet at
    one socket: $XDG_RUNTIME_DIR/composefs/... for an absolute value, and
    /tmp/composefs-<uid>/... for a relative or empty one, which systemd ignores too
    (sd-path's from_environment); her daemon's log names it."""
    a = alice.users.alice
    if xdg == "absolute":
        xdg_dir = alice.home / "xdg"
        xdg_dir.mkdir(mode=0o700)
        os.chown(xdg_dir, a.uid, a.gid)
        xdg = str(xdg_dir)
        expected = xdg_dir / "composefs" / "io.composefs.Repository"
    else:
        expected = alice.socket_dir / "io.composefs.Repository"
    monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    assert default_socket_path(a.uid) == expected
    # run_as and popen_as drop XDG_RUNTIME_DIR: set it again under them.
    with_xdg = ["/usr/bin/env", f"XDG_RUNTIME_DIR={xdg}"]
    with alice.serving([*with_xdg, *alice.daemon_argv(idle_exit=False)]):
        assert stat.S_ISSOCK(expected.stat().st_mode)
        status = alice.status(*with_xdg)
        assert status.returncode == 0, status.stderr
        assert f"at {expected}\n" in status.stdout
    assert not expected.exists()
    # Her daemon's start-up line says where it listens: the README's quick start uses it.
    assert f") on {str(expected)!r}\n" in (alice.home / "daemon.log").read_text()
