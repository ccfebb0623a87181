"""Throw-away local users for tests that need callers other than root.

:func:`create_user` adds a system user (and its own group) with a unique name,
and :func:`delete_user` removes both again; the ``test_users`` fixture in
``conftest.py`` makes two for the session and a group they share. Each user's
GECOS field names the pid of the test process that made it, so that users left
behind by a killed run are removed by the next one (:func:`remove_stale_users`),
and concurrent runs never touch each other's users.

Processes run as such a user with :func:`run_as` (``subprocess`` with ``user=``,
``group=`` and ``extra_groups=``). They cannot enter pytest's ``tmp_path`` (0700,
root's): give them directories made with :func:`public_dir`. Nor, perhaps, run the
test's own interpreter (it may live under /root): :func:`python` finds one they can
run, for scripts that need only the standard library.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_COMMENT = "composefsd test pid="


@dataclass(frozen=True, slots=True)
class TestUser:
    name: str
    uid: int
    gid: int
    #: Supplementary groups (gids) besides ``gid``.
    groups: tuple[int, ...] = ()

    __test__ = False  # not a test class, whatever pytest thinks of the name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_users() -> None:
    """Delete test users and groups whose creating process is gone."""
    with open("/etc/passwd", encoding="utf-8", errors="replace") as f:
        rows = [line.rstrip("\n").split(":") for line in f]
    for row in rows:
        if len(row) >= 5 and row[4].startswith(_COMMENT):
            try:
                pid = int(row[4][len(_COMMENT) :])
            except ValueError:
                continue
            if not _alive(pid):
                subprocess.run(["userdel", row[0]], capture_output=True, check=False)
    with open("/etc/group", encoding="utf-8", errors="replace") as f:
        groups = [line.split(":")[0] for line in f]
    for name in groups:
        if name.startswith("cfsdg") and name[5:].isdigit() and not _alive(int(name[5:])):
            subprocess.run(["groupdel", name], capture_output=True, check=False)


def create_group() -> int:
    """A new group for this test process (``cfsdg<pid>``); its gid."""
    name = f"cfsdg{os.getpid()}"
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
    return grp.getgrnam(name).gr_gid


def delete_group(gid: int) -> None:
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        return
    subprocess.run(["groupdel", name], capture_output=True, check=False)


def create_user(groups: Sequence[int] = ()) -> TestUser:
    """A new system user with its own group, member of ``groups`` too."""
    name = "cfsdt" + secrets.token_hex(4)
    argv = [
        "useradd",
        "--system",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        "--user-group",
        "--comment",
        f"{_COMMENT}{os.getpid()}",
    ]
    if groups:
        argv += ["--groups", ",".join(grp.getgrgid(g).gr_name for g in groups)]
    subprocess.run([*argv, name], check=True, capture_output=True)
    pw = pwd.getpwnam(name)
    return TestUser(name, pw.pw_uid, pw.pw_gid, tuple(groups))


def delete_user(user: TestUser) -> None:
    subprocess.run(["userdel", user.name], capture_output=True, check=False)


def run_as(user: TestUser, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(argv)`` as ``user`` (its uid, gid and supplementary groups)."""
    env = dict(kwargs.pop("env", None) or os.environ)
    env["HOME"] = "/nonexistent"
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.run(
        list(argv),
        user=user.uid,
        group=user.gid,
        extra_groups=list(user.groups),
        env=env,
        **kwargs,
    )


def popen_as(user: TestUser, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv)`` as ``user``."""
    env = dict(kwargs.pop("env", None) or os.environ)
    env["HOME"] = "/nonexistent"
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.Popen(
        list(argv),
        user=user.uid,
        group=user.gid,
        extra_groups=list(user.groups),
        env=env,
        **kwargs,
    )


def public_dir(prefix: str = "cfsd-pub-") -> Path:
    """A new directory under /tmp that every user may enter (0755, root's)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def others_can_run(path: str) -> bool:
    """Whether users other than the owner can execute ``path`` (every directory on
    the way searchable by others, the file executable by them)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & 0o001:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in real.parents)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class UserPython:
    """A Python test users can run, with composefsd importable.

    The interpreter pytest runs in may live where such a user cannot go (a
    virtualenv pointing into /root, mode 0700), and so may the checkout: so this
    is an interpreter other users may run (the system's ``/usr/bin/python3``
    here) with a copy of composefsd, the ``varlink`` and ``jeepney`` packages and the tests'
    stand-alone scripts (``peer.py``) in a public directory on ``PYTHONPATH``.
    """

    python: str
    env: dict[str, str]
    lib: Path

    __test__ = False

    def command(self, *args: str) -> list[str]:
        return [self.python, *args]

    def script(self, name: str) -> str:
        """The copy of the test script ``name`` (from tests/)."""
        return str(self.lib / name)


#: A client other users run: each call of argv[2] (JSON ``[[method, parameters or
#: null], ...]``) on one connection to argv[1]; prints the error name of each
#: reply, or "ok".
_CALLS_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
out = []
for method, params in json.loads(sys.argv[2]):
    call = {"method": method} if params is None else {"method": method, "parameters": params}
    s.sendall(json.dumps(call).encode() + b"\0")
    buf = b""
    while not buf.endswith(b"\0"):
        buf += s.recv(1 << 20)
    out.append(json.loads(buf[:-1]).get("error", "ok"))
print(json.dumps(out))
"""


def call_errors(
    py: UserPython,
    user: TestUser,
    address: str | os.PathLike[str],
    calls: Sequence[tuple[str, Any]],
    *,
    timeout: float = 60,
) -> list[str]:
    """Make ``calls`` (method, parameters; None sends none) as ``user`` on one
    connection to ``address``: each reply's error name, or "ok"."""
    out = run_as(
        user,
        py.command("-c", _CALLS_CLIENT, os.fspath(address), json.dumps(list(calls))),
        env=py.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return [str(e) for e in json.loads(out.stdout)]


#: Test scripts users run (standard library only).
_SCRIPTS = ("peer.py",)


def make_user_python(dest: Path) -> UserPython:
    """Copy composefsd, varlink, jeepney and the scripts below ``dest`` (which users must be
    able to enter); the environment drops what would tie a process to ours
    (LISTEN_*, NOTIFY_SOCKET, XDG_*, COMPOSEFSD_*, PYTHON*, JOURNAL_STREAM)."""
    import jeepney
    import varlink

    import composefsd

    candidates = (sys.executable, shutil.which("python3") or "", "/usr/bin/python3")
    runnable = [c for c in candidates if c and others_can_run(c)]
    assert runnable, "no Python interpreter that other users may run"
    python = runnable[0]
    lib = dest / "pylib"
    lib.mkdir(mode=0o755)
    for module in (composefsd, varlink, jeepney):
        assert module.__file__ is not None
        src = Path(module.__file__).parent
        shutil.copytree(src, lib / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in _SCRIPTS:
        shutil.copy(Path(__file__).parent / name, lib / name)
    for path in [lib, *lib.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "NOTIFY_", "XDG_", "COMPOSEFSD_", "PYTHON"))
    }
    env.pop("JOURNAL_STREAM", None)
    env["PYTHONPATH"] = str(lib)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return UserPython(python, env, lib)
