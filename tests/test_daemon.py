"""composefsd as a process: `python -m composefsd.service.daemon`, spoken to in raw Varlink.

Start-up (READY=1 on a NOTIFY_SOCKET, one-line failures), calls over the socket
(Describe, CreateImage with progress, Mount handing back a mount fd over
SCM_RIGHTS that is attached here with move_mount), authorization of other uids,
SIGTERM (STOPPING=1, exit 0, socket removed, work finished or cancelled
cleanly), idle exit, a connected fd 3 as ``varlinkctl call exec:`` gives, and a
restart that still knows which images are mounted or handed out.
"""

from __future__ import annotations

import array
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import users
from composefsd.kernel.mountinfo import composefs_mount_at
from composefsd.kernel.syscalls import move_mount
from composefsd.repository import Repository
from composefsd.repository.digestcache import DigestCache
from composefsd.service.context import Peer
from composefsd.service.daemon import Authorization
from conftest import TestUsers
from servicehelpers import unmount_below
from trees import random_tree

REPO_ROOT = Path(__file__).resolve().parent.parent
IFACE = "io.composefs.Repository"


# -- a raw Varlink client -------------------------------------------------------------------


class Client:
    """Blocking raw Varlink over a Unix socket; replies come with the fds they carried."""

    def __init__(self, path: Path | None = None, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.connect(str(path))
        self.sock = sock
        self.sock.settimeout(60)
        self.buf = b""
        self.pending_fds: list[int] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, params: dict[str, Any] | None = None, **flags: Any) -> None:
        msg: dict[str, Any] = {"method": method, **flags}
        if params:
            msg["parameters"] = params
        self.sock.sendall(json.dumps(msg).encode() + b"\0")

    def reply(self) -> tuple[dict[str, Any], list[int]]:
        while b"\0" not in self.buf:
            fds = array.array("i")
            data, anc, _flags, _addr = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(16 * fds.itemsize), socket.MSG_CMSG_CLOEXEC
            )
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % fds.itemsize
                    fds.frombytes(payload[:usable])
            self.pending_fds.extend(fds)
            if not data:
                raise EOFError("the daemon closed the connection")
            self.buf += data
        raw, _, self.buf = self.buf.partition(b"\0")
        fds_out, self.pending_fds = self.pending_fds, []
        return json.loads(raw), fds_out

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, more: bool = False
    ) -> list[dict[str, Any]]:
        """Every reply of the call (one unless ``more``); fds are closed."""
        self.send(
            f"{IFACE}.{method}" if "." not in method else method,
            params,
            **({"more": True} if more else {}),
        )
        out = []
        while True:
            reply, fds = self.reply()
            for fd in fds:
                os.close(fd)
            out.append(reply)
            if not reply.get("continues"):
                return out

    def one(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        (reply,) = self.call(method, params)
        assert "error" not in reply, reply
        return dict(reply.get("parameters", {}))


# -- the daemon as a process ----------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    notify: socket.socket | None
    notes: list[str] = field(default_factory=list)

    def client(self) -> Client:
        return Client(self.socket_path)

    def wait_notify(self, what: str, timeout: float = 30) -> str:
        assert self.notify is not None
        self.notify.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.notify.recv(4096).decode()
            self.notes.append(msg)
            if what in msg.split("\n"):
                return msg
        raise AssertionError(f"no {what} from the daemon: {self.notes}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
            raise
        return self.proc.returncode, err.decode()


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo_path = tmp / "repo"
        self.runtime = tmp / "run"
        self.socket_path = tmp / "sock" / "io.composefs.Repository"
        self.daemons: list[Daemon] = []

    def start(
        self,
        *extra: str,
        env: dict[str, str] | None = None,
        notify: bool = True,
        wait: bool = True,
        socket_path: Path | None = None,
        umask: int = -1,
    ) -> Daemon:
        path = socket_path or self.socket_path
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))}
        environ.pop("JOURNAL_STREAM", None)
        environ["PYTHONPATH"] = str(REPO_ROOT / "src")
        notify_sock = None
        if notify:
            notify_path = tempfile.mktemp(prefix="notify-", dir=self.tmp)
            notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            notify_sock.bind(notify_path)
            environ["NOTIFY_SOCKET"] = notify_path
        environ.update(env or {})
        argv = [
            sys.executable,
            "-m",
            "composefsd.service.daemon",
            "--repo",
            str(self.repo_path),
            "--listen",
            str(path),
            "--runtime-dir",
            str(self.runtime),
            *extra,
        ]
        proc = subprocess.Popen(
            argv,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.tmp,
            umask=umask,
        )
        daemon = Daemon(proc, path, notify_sock)
        self.daemons.append(daemon)
        if wait:
            daemon.wait_notify("READY=1")
            assert path.exists()
        return daemon

    def cleanup(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
            if d.notify is not None:
                d.notify.close()
        unmount_below(self.tmp)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.cleanup()


def _tree(root: Path, seed: int = 1, files: int = 30, size: int = 20_000) -> Path:
    return random_tree(root, seed=seed, files=files, sizes=range(size), link=None)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# -- tests ----------------------------------------------------------------------------------


def test_ready_describe_info_and_sigterm(env: Env) -> None:
    d = env.start()
    assert oct(env.socket_path.stat().st_mode & 0o777) == "0o600"
    c = d.client()
    out = c.one("Describe")
    assert out["path"] == str(env.repo_path) and out["images"] == 0
    info = c.one("org.varlink.service.GetInfo")
    assert info["vendor"] == "composefsd" and IFACE in info["interfaces"]
    desc = c.one("org.varlink.service.GetInterfaceDescription", {"interface": IFACE})
    idl = REPO_ROOT / "src" / "composefsd" / "service" / "io.composefs.Repository.varlink"
    assert desc["description"] == idl.read_text()
    c.close()
    status, err = d.stop()
    assert status == 0, err
    d.wait_notify("STOPPING=1")
    assert not env.socket_path.exists()
    # Timestamps on a terminal.
    assert err.splitlines()[0][:4].isdigit()


def test_journal_log_format_and_socket_mode(env: Env) -> None:
    group = Path("/etc/group").read_text().splitlines()[0].split(":")[2]
    d = env.start(
        "--socket-mode",
        "0660",
        "--group",
        group,
        "--log-level",
        "debug",
        env={"JOURNAL_STREAM": "8:12345"},
    )
    st = env.socket_path.stat()
    assert (st.st_mode & 0o777, st.st_gid) == (0o660, int(group))
    status, err = d.stop()
    assert status == 0
    lines = err.splitlines()
    assert lines and all(line[:3] in ("<6>", "<7>", "<4>") for line in lines), lines
    assert any(line.startswith("<6>") and "ready" in line for line in lines)


def test_create_image_progress_and_mount_fd(env: Env) -> None:
    src = _tree(env.tmp / "src")
    mnt = env.tmp / "mnt"
    mnt.mkdir()
    d = env.start()
    c = d.client()
    replies = c.call("CreateImage", {"sourcePath": str(src), "ref": "app"}, more=True)
    *progress, final = replies
    assert progress and all(r["continues"] is True for r in progress)
    assert all(set(r["parameters"]) == {"progress"} for r in progress)
    assert "continues" not in final and final["parameters"]["ref"] == "app"
    digest = final["parameters"]["digest"]

    c.send(f"{IFACE}.Mount", {"image": "app"})
    reply, fds = c.reply()
    assert reply["parameters"]["mountFileDescriptor"] == 0 and len(fds) == 1
    try:
        assert reply["parameters"]["digest"] == digest
        move_mount(fds[0], mnt)
    finally:
        os.close(fds[0])
    assert _files(mnt) == _files(src)
    listed = c.one("ListMounts")["mounts"]
    assert [(m["where"], m["digest"]) for m in listed] == [(str(mnt), digest)]
    assert c.one("Unmount", {"where": str(mnt)}) == {"digest": digest}
    # Errors arrive by name; the connection stays usable.
    (err,) = c.call("Mount", {"image": "nope"})
    assert err["error"] == f"{IFACE}.NoSuchImage" and err["parameters"] == {"image": "nope"}
    (err,) = c.call("Verify")
    assert err["error"] == "org.varlink.service.ExpectedMore"
    *_, last = c.call("Verify", more=True)
    assert last["parameters"]["ok"] is True
    assert c.one("Describe")["images"] == 1
    c.close()
    assert d.stop()[0] == 0


def test_sigterm_during_create_image(env: Env) -> None:
    """SIGTERM while a CreateImage runs: it finishes within the grace period (or is
    cancelled), the daemon exits 0, and the repository is consistent."""
    src = _tree(env.tmp / "src", files=400, size=400_000)
    d = env.start()
    c = d.client()
    c.send(f"{IFACE}.CreateImage", {"sourcePath": str(src), "ref": "big"}, more=True)
    first, _ = c.reply()
    assert first.get("continues") is True
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    d.proc.send_signal(signal.SIGTERM)  # a second one changes nothing
    replies = [first]
    try:
        while replies[-1].get("continues"):
            replies.append(c.reply()[0])
    except (EOFError, ConnectionResetError):
        pass
    status, err = d.stop()
    assert status == 0, err
    repo = Repository.open(env.repo_path)
    assert repo.fsck().ok
    if "parameters" in replies[-1] and "digest" in replies[-1]["parameters"]:
        assert repo.resolve_image("big") == replies[-1]["parameters"]["digest"]


def test_idle_exit(env: Env) -> None:
    d = env.start("--idle-timeout", "1")
    c = d.client()
    c.one("Describe")
    time.sleep(1.5)
    assert d.proc.poll() is None  # a connection is open: not idle
    c.close()
    assert d.proc.wait(15) == 0
    assert not env.socket_path.exists()


def test_connected_fd3(env: Env) -> None:
    """A connected socket on fd 3 (varlinkctl call exec:): served until it closes."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))}
    environ.update(PYTHONPATH=str(REPO_ROOT / "src"), LISTEN_FDS="1", LISTEN_FDNAMES="varlink")
    # A small launcher moves the socket to fd 3 and execs the daemon with LISTEN_PID
    # set to its own pid, as systemd and varlinkctl do.
    launcher = (
        "import os, sys\n"
        f"fd = {fd}\n"
        "if fd != 3:\n"
        "    os.dup2(fd, 3)\n"
        "    os.close(fd)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    argv = [
        sys.executable,
        "-c",
        launcher,
        "-m",
        "composefsd.service.daemon",
        "--repo",
        str(env.repo_path),
        "--runtime-dir",
        str(env.runtime),
    ]
    proc = subprocess.Popen(argv, env=environ, pass_fds=(fd,), stderr=subprocess.PIPE)
    theirs.close()
    c = Client(sock=ours)
    try:
        assert c.one("Describe")["path"] == str(env.repo_path)
    finally:
        c.close()
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


def test_restart_keeps_mounts(env: Env) -> None:
    src = _tree(env.tmp / "src")
    src2 = _tree(env.tmp / "src2", seed=2)
    mnt = env.tmp / "mnt"
    mnt.mkdir()
    d = env.start()
    c = d.client()
    attached = c.one("CreateImage", {"sourcePath": str(src), "ref": "a"})["digest"]
    detached = c.one("CreateImage", {"sourcePath": str(src2), "ref": "b"})["digest"]
    assert c.one("Mount", {"image": "a", "where": str(mnt)})["where"] == str(mnt)
    c.send(f"{IFACE}.Mount", {"image": "b"})
    _reply, (fd,) = c.reply()
    c.close()
    d.proc.kill()
    d.proc.wait()

    try:
        repo = Repository.open(env.repo_path)
        repo.remove_ref("a")
        repo.remove_ref("b")
        d = env.start()
        c = d.client()
        listed = c.one("ListMounts")["mounts"]
        assert [(m["where"], m["digest"]) for m in listed] == [(str(mnt), attached)]
        out = c.one("GarbageCollect")
        assert out["imagesRemoved"] == 0 and out["objectsRemoved"] == 0
        (err,) = c.call("RemoveImage", {"image": detached})
        assert err["error"] == f"{IFACE}.ImageInUse"
        assert _files(mnt) == _files(src)
        with open(os.open("d1/f1", os.O_RDONLY, dir_fd=fd), "rb") as f:
            assert f.read() == (src2 / "d1" / "f1").read_bytes()
    finally:
        os.close(fd)
    assert c.one("Unmount", {"where": str(mnt)}) == {"digest": attached}
    assert composefs_mount_at(str(mnt)) is None
    c.close()
    assert d.stop()[0] == 0


def _modes(root: Path) -> dict[str, str]:
    """Type and mode of everything under ``root`` but symlinks, by relative path."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if not stat.S_ISLNK(st.st_mode):
            kind = "d" if stat.S_ISDIR(st.st_mode) else "s" if stat.S_ISSOCK(st.st_mode) else "f"
            # Pins are named by mount id and time: one name for them all.
            name = re.sub(
                r"^(run/pins/[0-9a-f]+/)[0-9]+-[0-9]+$", r"\1PIN", str(path.relative_to(root))
            )
            out[name] = f"{kind}{stat.S_IMODE(st.st_mode):04o}"
    return out


def test_modes_do_not_depend_on_the_umask(env: Env) -> None:
    """composefsd.service runs with UMask=0077: what the daemon makes in the
    repository (and the repository's missing parents), the socket's directory and
    the runtime directory gets its intended mode all the same, the one it gets
    under the usual 0022: a repository stays readable (directories 0755, objects
    and images 0644; the repository itself 0700 and a digest cache private as
    before), runtime files stay private."""
    src = _tree(env.tmp / "src")
    # Both runs write a digest cache only once the tree is older than the cache's
    # racy window (test_repository checks that a newer one writes none): wait for
    # that, so that what each run makes does not depend on how long the first took.
    newest = max(p.lstat().st_ctime_ns for p in [src, *src.rglob("*")])
    while time.time_ns() < newest + DigestCache.RACY_NS + 100_000_000:
        time.sleep(0.1)
    found = {}
    for umask in (0o022, 0o077):
        top = env.tmp / f"umask{umask:03o}"
        sock = top / "sock" / "io.composefs.Repository"
        d = env.start(
            "--repo",
            str(top / "new" / "parent" / "repo"),
            "--runtime-dir",
            str(top / "run"),
            socket_path=sock,
            umask=umask,
        )
        c = d.client()
        c.one("CreateImage", {"sourcePath": str(src), "ref": "app/v1/stable"})
        c.send(f"{IFACE}.Mount", {"image": "app/v1/stable"})
        _reply, fds = c.reply()
        for fd in fds:
            os.close(fd)  # the pin stays for its grace period
        found[umask] = _modes(top)
        c.close()
        assert d.stop()[0] == 0
    assert found[0o077] == found[0o022]
    modes = found[0o077]
    repo = "new/parent/repo"
    expected = {
        repo: "d0700",
        "new": "d0755",
        "new/parent": "d0755",
        "sock": "d0700",
        "sock/io.composefs.Repository": "s0600",
    }
    for path, mode in modes.items():
        if path in expected:
            assert mode == expected[path], path
        elif path.startswith(f"{repo}/cache"):
            assert mode == ("d0700" if path == f"{repo}/cache" else "f0600"), path
        elif path.startswith(repo + "/"):
            assert mode in ("d0755", "f0644"), path
        elif path.startswith("run"):
            assert mode in ("d0700", "f0600"), path
        else:
            raise AssertionError(f"unexpected {path} ({mode})")
    assert f"{repo}/images/refs/app/v1" in modes
    assert sum(p.startswith(f"{repo}/cache/") for p in modes) == 1
    assert sum(p.startswith(f"{repo}/objects/") for p in modes) > 10
    assert sum(p.startswith("run/pins/") for p in modes) == 2


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("file", ["--repo", "{tmp}/afile"], "is not a directory"),
        ("", ["--repo", "{tmp}/missing", "--no-create"], "does not exist"),
        ("full", ["--repo", "{tmp}/full"], "not empty and not a composefs repository"),
        ("file", ["--listen", "{tmp}/afile/sock"], "cannot listen on {tmp}/afile/sock"),
        ("", ["--group", "no-such-group-here"], "unknown group"),
    ],
)
def test_startup_failures(env: Env, setup: str, args: list[str], message: str) -> None:
    tmp = str(env.tmp)
    if setup == "file":
        (env.tmp / "afile").write_text("x")
    elif setup == "full":
        (env.tmp / "full").mkdir()
        (env.tmp / "full" / "data").write_text("x")
    argv = [a.format(tmp=tmp) for a in args]
    d = env.start(*argv, wait=False, notify=False)
    status, err = d.stop(sig=0)
    assert status == 1
    errors = [line for line in err.splitlines() if " ERROR: " in line]
    assert len(errors) == 1 and message.format(tmp=tmp) in errors[0], err
    assert err.strip().splitlines()[-1] == errors[0]
    assert not env.socket_path.exists()


def test_bad_arguments(env: Env) -> None:
    for args in (["--socket-mode", "999"], ["--idle-timeout", "0"], ["--bogus"]):
        d = env.start(*args, wait=False, notify=False)
        assert d.stop(sig=0)[0] == 2


# -- authorization --------------------------------------------------------------------------


def test_authorization_policy() -> None:
    auth = Authorization(daemon_uid=1000, group=50)
    root = Peer(1, 0, 0)
    owner = Peer(1, 1000, 1000)
    member = Peer(1, 2000, 2000, frozenset({50}))
    primary = Peer(1, 2001, 50)
    other = Peer(1, 3000, 3000, frozenset({7}))
    for peer in (root, owner, member, primary):
        assert auth(peer, f"{IFACE}.GarbageCollect") and auth(peer, f"{IFACE}.Describe")
    assert not auth(other, f"{IFACE}.Mount")
    for method in ("Describe", "ListImages", "ListMounts", "Verify"):
        assert auth(other, f"{IFACE}.{method}")
    assert auth(other, "org.varlink.service.GetInfo")
    # Its own image over its own files: open to anyone (service/ownmount.py).
    assert auth(other, f"{IFACE}.MountDumpfile")
    for method in ("CreateImage", "Mount", "Unmount", "RemoveImage", "GarbageCollect"):
        assert not auth(other, f"{IFACE}.{method}")
    strict = Authorization(daemon_uid=1000, group=None, restrict_read=True)
    assert not strict(other, f"{IFACE}.Describe") and not strict(
        other, "org.varlink.service.GetInfo"
    )
    # --restrict-read keeps every method to the privileged, MountDumpfile too.
    assert not strict(other, f"{IFACE}.MountDumpfile")
    assert strict(owner, f"{IFACE}.MountDumpfile")
    assert strict(owner, f"{IFACE}.Describe") and not strict(member, f"{IFACE}.Describe")


def _as_user(py: users.UserPython, user: users.TestUser, sock: Path, *methods: str) -> list[str]:
    return users.call_errors(py, user, sock, [(m, None) for m in methods], timeout=30)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="composefsd-auth-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_other_uid_refused_mutating_calls(
    env: Env, public_dir: Path, test_users: TestUsers, user_python: users.UserPython
) -> None:
    alice, bob = test_users.alice, test_users.bob
    sock = public_dir / "sock"
    d = env.start("--socket-mode", "0666", socket_path=sock)
    describe, gc = f"{IFACE}.Describe", f"{IFACE}.GarbageCollect"
    denied = "org.varlink.service.PermissionDenied"
    assert _as_user(user_python, bob, sock, describe, gc, "org.varlink.service.GetInfo") == [
        "ok",
        denied,
        "ok",
    ]
    # Every mutating method is refused before its parameters are even looked at.
    mutating = [
        f"{IFACE}.{m}" for m in ("CreateImage", "Mount", "Unmount", "RemoveImage", "GarbageCollect")
    ]
    assert _as_user(user_python, bob, sock, *mutating) == [denied] * len(mutating)
    readonly = [f"{IFACE}.{m}" for m in ("Describe", "ListImages", "ListMounts")]
    assert _as_user(user_python, bob, sock, *readonly) == ["ok"] * len(readonly)
    assert d.stop()[0] == 0

    group = str(test_users.group)  # alice's supplementary group, not bob's
    d = env.start("--socket-mode", "0666", "--restrict-read", "--group", group, socket_path=sock)
    assert _as_user(user_python, bob, sock, describe, gc) == [denied, denied]
    assert _as_user(user_python, alice, sock, describe, gc) == ["ok", "ok"]
    assert d.stop()[0] == 0

    d = env.start(socket_path=sock)  # 0600: other users cannot even connect
    with pytest.raises(subprocess.CalledProcessError) as info:
        _as_user(user_python, bob, sock, describe)
    assert "PermissionError" in info.value.stderr
    assert d.stop()[0] == 0
