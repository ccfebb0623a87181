"""``composefsctl mount-dumpfile`` end to end, as a non-root user (tests/users.py):
the user's composefsctl opens its dumpfile and object directory, calls
MountDumpfile, attaches the mount in a user and mount namespace of its own and
runs a command there; wrong inputs give one-line messages and the documented
exit statuses."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import users
from composefsd.cli.composefsctl.parser import parse_args
from composefsd.cli.composefsctl.remote import call_error_text
from composefsd.kernel.syscalls import MNT_DETACH, umount2
from composefsd.service.client import VarlinkCallError
from conftest import TestUsers
from ctlrun import run_ctl
from servicehelpers import Daemon, running_daemon

_OVERFLOW = 65534


@dataclass
class World:
    daemon: Daemon
    user: users.TestUser
    py: users.UserPython
    home: Path
    objects: Path
    #: The object path (relative to ``objects``) of b"my own file\n".
    mine: str

    def ctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """``composefsctl --connect SOCKET argv`` as the user, stdin not a terminal."""
        return users.run_as(
            self.user,
            self.py.command(
                "-m", "composefsd.cli.composefsctl", "--connect", str(self.daemon.socket), *argv
            ),
            env=self.py.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def file(self, name: str, text: str) -> str:
        path = self.home / name
        path.write_text(text)
        os.chown(path, self.user.uid, self.user.gid)
        return str(path)

    def mnt(self, name: str) -> str:
        path = self.home / f"mnt-{name}"
        path.mkdir(exist_ok=True)
        os.chown(path, self.user.uid, self.user.gid)
        return str(path)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, test_users: TestUsers, user_python: users.UserPython
) -> Iterator[World]:
    home = users.public_dir("cfsd-ctl-own-")
    user = test_users.alice
    os.chown(home, user.uid, user.gid)
    objects = home / "objects"
    data = b"my own file\n"
    digest = hashlib.sha256(data).hexdigest()
    (objects / digest[:2]).mkdir(parents=True)
    (objects / digest[:2] / digest[2:]).write_bytes(data)
    for path in (objects, objects / digest[:2], objects / digest[:2] / digest[2:]):
        os.chown(path, user.uid, user.gid)
    try:
        with running_daemon(
            tmp_path_factory.mktemp("ctl-own") / "repo",
            "--mount-dumpfile-rate",
            "1000000",
            public=True,
        ) as d:
            yield World(d, user, user_python, home, objects, f"{digest[:2]}/{digest[2:]}")
    finally:
        users.remove_tree(home)


_ROOT = "/ 0 40755 2 0 0 0 0.0 - - -\n"


def _good_dump(world: World) -> str:
    return world.file(
        "good.dump",
        _ROOT
        + f"/mine 12 100644 1 0 0 0 0.0 {world.mine} - -\n"
        + f"/other 12 100644 1 1234 1234 0 0.0 {world.mine} - -\n",
    )


def test_command_sees_the_files(world: World) -> None:
    dump, where = _good_dump(world), world.mnt("good")
    script = f'cat {where}/mine; stat -c "%u:%g" {where}/mine {where}/other; id -u; exit 7'
    out = world.ctl(
        "mount-dumpfile", dump, str(world.objects), "--at", where, "--", "sh", "-c", script
    )
    # The command's own exit status.
    assert out.returncode == 7, out.stderr
    assert out.stdout.splitlines() == [
        "my own file",
        "0:0",  # the dumpfile's 0 is the caller, who is 0 in its namespace
        f"{_OVERFLOW}:{_OVERFLOW}",  # other ids map to nothing
        "0",  # the command runs as 0 in the caller's namespace, as under unshare -Ur
    ]
    assert out.stderr == ""
    # The mount was in the command's namespace only.
    assert not os.path.ismount(where)
    assert os.listdir(where) == []


def test_keep_ids(world: World) -> None:
    dump, where = _good_dump(world), world.mnt("keep")
    script = f'stat -c "%u:%g" {where}/mine {where}/other; id -u; id -g'
    out = world.ctl(
        "mount-dumpfile", dump, str(world.objects), "--at", where, "--keep-ids",
        "--", "sh", "-c", script,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    uid, gid = world.user.uid, world.user.gid
    assert out.stdout.splitlines() == [
        f"{uid}:{gid}",  # the dumpfile's 0, the caller's own ids inside as outside
        f"{_OVERFLOW}:{_OVERFLOW}",
        str(uid),
        str(gid),
    ]


@pytest.fixture
def users_ns(world: World, test_users: TestUsers) -> Iterator[dict[str, int]]:
    """A user namespace of alice's and one of bob's (unshare -Ur), by user name, and
    ("plain") a process of alice's in the initial one."""
    procs = {
        u.name: users.popen_as(u, ["unshare", "-Ur", "sleep", "600"], stdin=subprocess.DEVNULL)
        for u in (world.user, test_users.bob)
    }
    procs["plain"] = users.popen_as(world.user, ["sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        mine = os.readlink("/proc/self/ns/user")
        for name, proc in procs.items():
            if name == "plain":
                continue
            deadline = time.monotonic() + 30
            while os.readlink(f"/proc/{proc.pid}/ns/user") == mine:
                assert time.monotonic() < deadline, "unshare -Ur never got its namespace"
                time.sleep(0.01)
        yield {name: proc.pid for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_userns_of(world: World, users_ns: dict[str, int], test_users: TestUsers) -> None:
    dump, where = _good_dump(world), world.mnt("userns-of")
    pid = users_ns[world.user.name]
    script = f'stat -c "%u:%g" {where}/mine {where}/other; id -u; readlink /proc/self/ns/user'
    out = world.ctl(
        "mount-dumpfile", dump, str(world.objects), "--at", where, "--userns-of", str(pid),
        "--", "sh", "-c", script,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "0:0",
        f"{_OVERFLOW}:{_OVERFLOW}",
        "0",
        os.readlink(f"/proc/{pid}/ns/user"),  # the command runs in PID's namespace
    ]
    # Someone else's namespace: not even opened (and the daemon would refuse it).
    bobs = users_ns[test_users.bob.name]
    out = world.ctl(
        "mount-dumpfile", dump, str(world.objects), "--at", where, "--userns-of", str(bobs),
        "--", "true",
    )  # fmt: skip
    assert (out.returncode, out.stderr) == (
        1,
        f"composefsctl: error: --userns-of {bobs}: Permission denied\n",
    )
    # Her own process in the initial namespace, root's: the daemon's BadFileDescriptor.
    out = world.ctl(
        "mount-dumpfile", dump, str(world.objects), "--at", where,
        "--userns-of", str(users_ns["plain"]),
        "--", "true",
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr == (
        "composefsctl: error: io.composefs.Repository.BadFileDescriptor: "
        "userNamespaceFileDescriptor: owned by uid 0, not by the caller "
        f"(uid {world.user.uid})\n"
    )
    assert not os.path.ismount(where)


def test_root_attaches_in_its_namespace(world: World) -> None:
    # (Not under unshare -m: overlayfs takes no layer fd from another mount namespace
    # than the daemon's, so files opened there cannot be mounted.)
    dump, where = _good_dump(world), world.mnt("root")
    ctl = [
        sys.executable, "-m", "composefsd.cli.composefsctl", "--connect",
        str(world.daemon.socket), "mount-dumpfile", dump, str(world.objects), "--at", where,
        "--json",
    ]  # fmt: skip
    try:
        out = subprocess.run(
            ctl, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {
            "mountpoint": where,
            "source": "composefs",
            "idmapped": "default",
        }
        # It stays after composefsctl: in the current namespace, with root's 0 as 0.
        assert os.path.ismount(where)
        assert Path(where, "mine").read_text() == "my own file\n"
        st = os.stat(Path(where, "mine"))
        assert (st.st_uid, st.st_gid) == (0, 0)
    finally:
        if os.path.ismount(where):
            umount2(where, MNT_DETACH)


def test_default_command_is_the_shell(world: World) -> None:
    dump, where = _good_dump(world), world.mnt("shell")
    shell = world.file("shell.sh", f"#!/bin/sh\ncat {where}/mine\n")
    os.chmod(shell, 0o755)
    out = users.run_as(
        world.user,
        world.py.command(
            "-m",
            "composefsd.cli.composefsctl",
            "--connect",
            str(world.daemon.socket),
            "mount-dumpfile",
            dump,
            str(world.objects),
            "--at",
            where,
        ),
        env={**world.py.env, "SHELL": shell},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (out.returncode, out.stdout) == (0, "my own file\n"), out.stderr


def test_command_not_found(world: World) -> None:
    out = world.ctl(
        "mount-dumpfile",
        _good_dump(world),
        str(world.objects),
        "--at",
        world.mnt("nf"),
        "--",
        "/nonexistent/cmd",
    )
    assert out.returncode == 127
    assert out.stderr == "composefsctl: error: /nonexistent/cmd: No such file or directory\n"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing dumpfile", "DUMPFILE {home}/nope.dump: No such file or directory"),
        ("dumpfile is a directory", "DUMPFILE {objects}: not a regular file"),
        ("objdir is a file", "OBJDIR {dump}: Not a directory"),
        ("at is no directory", "--at {dump}: not a directory"),
        (
            "malformed",
            "io.composefs.Repository.DumpfileRejected: the dumpfile is refused: line 2: ",
        ),
        ("object path leaves", "io.composefs.Repository.DumpfileRejected: the dumpfile is refused"),
        (
            "too large",
            "io.composefs.Repository.LimitExceeded: the dumpfile is larger than 16777216 bytes "
            "(limit dumpfileBytes: 16777216)",
        ),
    ],
)
def test_wrong_inputs(world: World, case: str, message: str) -> None:
    dump = _good_dump(world)
    objects, where = str(world.objects), world.mnt("bad")
    if case == "missing dumpfile":
        dump = str(world.home / "nope.dump")
    elif case == "dumpfile is a directory":
        dump = objects
    elif case == "objdir is a file":
        objects = dump
    elif case == "at is no directory":
        where = dump
    elif case == "malformed":
        dump = world.file("bad.dump", _ROOT + "/x this is no dumpfile line\n")
    elif case == "too large":
        dump = world.file("big.dump", _ROOT)
        os.truncate(dump, (16 << 20) + 1)
    elif case == "object path leaves":
        dump = world.file("up.dump", _ROOT + "/x 12 100644 1 0 0 0 0.0 ../../etc/passwd - -\n")
    out = world.ctl("mount-dumpfile", dump, objects, "--at", where, "--", "true")
    assert out.returncode == 1, out
    expected = "composefsctl: error: " + message.format(
        home=world.home, objects=world.objects, dump=_good_dump(world)
    )
    assert out.stderr.startswith(expected), out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stdout == ""


def test_usage_errors(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    out = world.ctl("mount-dumpfile", _good_dump(world), str(world.objects))
    assert out.returncode == 2
    assert "the following arguments are required: --at" in out.stderr
    status, _, err = run_ctl(capsys, "--direct", "mount-dumpfile", "d", "o", "--at", "/")
    assert status == 2
    assert "'mount-dumpfile' works through composefsd only (no --direct)" in err


def test_command_after_the_first_double_dash() -> None:
    args = parse_args(
        ["mount-dumpfile", "d", "o1", "o2", "--at", "/m", "--", "sh", "-c", "x", "--", "--at"]
    )
    assert (args.dumpfile, args.objdirs, args.at) == ("d", ["o1", "o2"], "/m")
    assert args.exec_command == ["sh", "-c", "x", "--", "--at"]
    assert parse_args(["mount-dumpfile", "d", "o", "--at", "/m"]).exec_command == []
    # Another command's "--" is its own.
    assert parse_args(["remove-ref", "--", "mount-dumpfile"]).name == "mount-dumpfile"


@pytest.mark.parametrize(
    ("name", "parameters", "text"),
    [
        ("DumpfileRejected", {"message": "bad mode"}, "the dumpfile is refused: bad mode"),
        (
            "BadFileDescriptor",
            {"parameter": "dumpfileFileDescriptor", "message": "not a regular file"},
            "dumpfileFileDescriptor: not a regular file",
        ),
        (
            "BadFileDescriptor",
            {"parameter": "dumpfileFileDescriptor", "message": "dumpfileFileDescriptor: x"},
            "dumpfileFileDescriptor: x",
        ),
        (
            "LimitExceeded",
            {"limit": "callsPerUid", "value": 1, "message": "one call at a time"},
            "one call at a time (limit callsPerUid: 1)",
        ),
    ],
)
def test_error_texts(name: str, parameters: dict[str, object], text: str) -> None:
    exc = VarlinkCallError(f"io.composefs.Repository.{name}", parameters)
    assert call_error_text(exc) == f"io.composefs.Repository.{name}: {text}"
