"""Hostile input to every method a caller without root may reach, made as such a
caller (issue 17's last paragraph).

The daemon's socket is open to everyone (0666) and a real polkitd (tests/polkitenv.py)
allows the test user alice every composefsd action: so alice reaches the
read-only methods, MountDumpfile and every method of polkit's table. The methods
are enumerated from the daemon's own tables (READ_ONLY_METHODS, OPEN_METHODS,
METHOD_ACTIONS): a method added to one of them without hostile tests (here, or
named in :data:`COVERED_ELSEWHERE`) fails :func:`test_every_reachable_method_is_covered`.

CreateImage takes no dumpfile (only a tree, by path or fd): malformed and oversized
dumpfiles reach the daemon through MountDumpfile only, which tests/test_ownmount.py
covers with the shared should-fail assets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import varlink

import users
from composefsd.image.reader import read_image
from composefsd.image.tree import Node
from composefsd.service.daemon import IDL_DIR, OPEN_METHODS, READ_ONLY_METHODS
from composefsd.service.polkit import METHOD_ACTIONS
from conftest import SHARED, TestUsers
from polkitenv import Bus, allow_all_rules, start_bus
from servicehelpers import Daemon, start_daemon, unmount_below
from test_daemon_limits import Peer

TESTS = Path(__file__).resolve().parent
REPO_IFACE = "io.composefs.Repository"
OCI_IFACE = "io.composefs.Oci"
INVALID = "org.varlink.service.InvalidParameter"
SECRET = b"ROOT-ONLY-SECRET:" * 300

#: Every method alice reaches, enumerated from the daemon's tables.
REACHABLE = sorted(READ_ONLY_METHODS | OPEN_METHODS | set(METHOD_ACTIONS))

#: Hostile-input tests of reachable methods that live in other files
#: ("file.py::test"); every method is also fuzzed here by
#: test_hostile_parameters_are_typed_errors.
COVERED_ELSEWHERE: dict[str, list[str]] = {
    f"{REPO_IFACE}.MountDumpfile": [
        "test_ownmount.py::test_should_fail_dumpfiles",
        "test_ownmount.py::test_oversized_dumpfiles",
        "test_ownmount.py::test_garbage_dumpfile",
        "test_ownmount.py::test_symlinks_and_specials_as_objects",
        "test_ownmount.py::test_payload_outside_refused",
        "test_ownmount.py::test_dumpfile_fd_kind",
        "test_ownmount.py::test_object_fd_kind",
        "test_ownmount.py::test_object_truncated_under_the_mount",
        "test_ownmount.py::test_flood_from_one_uid",
        "test_ownmount.py::test_live_images_per_uid",
    ],
    f"{REPO_IFACE}.Describe": [
        "test_daemon_limits.py::test_one_uid_cannot_lock_others_out",
        "test_daemon_limits.py::test_partial_messages_cannot_take_the_daemons_memory",
    ],
    f"{REPO_IFACE}.Verify": [
        "test_daemon_limits.py::test_heavy_calls_of_one_uid_do_not_starve_others",
        "test_daemon_limits.py::test_bad_ref_names_are_invalid_names",
        "test_daemon_limits.py::test_lone_surrogates_are_invalid_parameters",
    ],
    "org.composefs.Repository.OpenRepository": [
        "test_rs_repository.py::test_bad_paths_are_invalid_parameters",
        "test_rs_repository.py::test_root_paths_through_links_and_dots",
        "test_rs_repository.py::test_concurrent_open_and_close",
    ],
    "org.composefs.Repository.Fsck": [
        "test_rs_repository.py::test_fsck_counts_damage",
        "test_rs_repository.py::test_fsck_and_gc_stop_when_the_client_has_gone",
    ],
    "org.composefs.Oci.Inspect": ["test_rs_oci.py::test_inspect_hostile_names"],
    "org.composefs.Oci.ComputeId": ["test_rs_oci.py::test_compute_id_bad_values"],
    "org.composefs.Oci.HasLayer": ["test_rs_oci.py::test_other_uids_handle"],
    "org.composefs.Oci.Check": ["test_rs_oci.py::test_other_uids_handle"],
    "org.composefs.Oci.GetInfo": ["test_rs_oci.py::test_other_uids_handle"],
    f"{REPO_IFACE}.CreateImage": [
        "test_source_safety.py::test_daemon_create_image_race_never_leaks",
        "test_source_safety.py::test_caller_cannot_read_a_root_only_file_of_its_tree",
        "test_source_safety.py::test_caller_path_is_resolved_with_its_rights",
        "test_source_safety.py::test_caller_tree_entry_limit",
        "test_source_safety.py::test_caller_fds_of_the_wrong_kind",
    ],
}

#: What each reachable method gets in this file, besides the fuzzing.
COVERED_HERE: dict[str, list[str]] = {
    f"{REPO_IFACE}.CreateImage": [
        "test_create_image_root_only_sources",
        "test_create_image_transforms_on_a_hostile_tree",
        "test_create_image_links_devices_fifos",
        "test_create_image_source_changing_under_the_scan",
        "test_create_image_source_fds_of_the_wrong_kind",
        "test_hostile_names",
        "test_floods_are_bounded",
    ],
    f"{REPO_IFACE}.Mount": [
        "test_hostile_names",
        "test_mount_where_of_the_wrong_kind",
        "test_mount_fds_and_mappings_of_the_wrong_kind",
    ],
    f"{REPO_IFACE}.Unmount": ["test_unmount_takes_down_only_composefs_mounts"],
    f"{REPO_IFACE}.RemoveImage": ["test_hostile_names"],
    f"{REPO_IFACE}.GarbageCollect": ["test_gc_while_the_user_floods"],
    f"{REPO_IFACE}.ListImages": ["test_hostile_names"],
    f"{REPO_IFACE}.ListMounts": ["test_hostile_parameters_are_typed_errors"],
    f"{REPO_IFACE}.Verify": ["test_hostile_names"],
    f"{REPO_IFACE}.Describe": ["test_floods_are_bounded"],
    f"{OCI_IFACE}.Pull": ["test_pull_hostile_references", "test_pull_reads_files_as_the_caller"],
    f"{OCI_IFACE}.Tag": ["test_hostile_names", "test_pull_as_the_user_and_hostile_tags"],
    f"{OCI_IFACE}.Untag": ["test_hostile_names", "test_pull_as_the_user_and_hostile_tags"],
    f"{OCI_IFACE}.Mount": ["test_hostile_names", "test_pull_as_the_user_and_hostile_tags"],
    f"{OCI_IFACE}.Inspect": ["test_hostile_names", "test_pull_as_the_user_and_hostile_tags"],
    f"{OCI_IFACE}.ListImages": ["test_hostile_parameters_are_typed_errors"],
    "org.composefs.Repository.OpenRepository": ["test_rs_open_repository_only_the_daemons_own"],
    # Their only hostile input is their parameters (names, handles, paths): fuzzed.
    "io.systemd.service.Ping": ["test_hostile_parameters_are_typed_errors"],
    "org.composefs.Oci.ListImages": ["test_hostile_parameters_are_typed_errors"],
    "org.composefs.Repository.CloseRepository": ["test_hostile_parameters_are_typed_errors"],
    "org.composefs.Repository.ImageObjects": ["test_hostile_parameters_are_typed_errors"],
    "org.composefs.Repository.ListImageRefs": ["test_hostile_parameters_are_typed_errors"],
}


# -- a client that passes fds, run as the test user ------------------------------------------

#: argv[1]: the socket; argv[2]: JSON [{"method", "parameters", "fds": [[kind, path]]}].
#: Kinds: socket, pipe, file, opath, dir. "use_handle": the call's "handle" is the last
#: one a reply gave (org.composefs.Repository's OpenRepository). Prints JSON, one entry per call:
#: {"error": name, "parameters": {...}} or {"ok": {...}}, with "sent": the inode numbers
#: of the fds sent. fds received are closed.
_CLIENT = r"""
import array, json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(120)
s.connect(sys.argv[1])
out = []
keep = []
handle = None
def fd_of(kind, path):
    if kind == "socket":
        a, b = socket.socketpair(); keep.extend([a, b]); return a.fileno()
    if kind == "pipe":
        r, w = os.pipe(); keep.extend([r, w]); return r
    flags = {"file": os.O_RDONLY, "opath": os.O_PATH, "dir": os.O_RDONLY | os.O_DIRECTORY}[kind]
    fd = os.open(path, flags); keep.append(fd); return fd
for call in json.loads(sys.argv[2]):
    msg = {"method": call["method"]}
    if call.get("parameters") is not None:
        msg["parameters"] = call["parameters"]
    if call.get("use_handle"):
        msg["parameters"]["handle"] = handle
    data = json.dumps(msg).encode() + b"\0"
    fds = [fd_of(k, p) for k, p in call.get("fds", [])]
    sent = [os.fstat(fd).st_ino for fd in fds]
    if fds:
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        s.sendall(data)
    buf = b""
    while not buf.endswith(b"\0"):
        chunk, anc, _flags, _addr = s.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
        if not chunk:
            raise SystemExit("the daemon closed the connection")
        buf += chunk
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i"); got.frombytes(blob[: len(blob) - len(blob) % 4])
                for fd in got:
                    os.close(fd)
    reply = json.loads(buf[:-1])
    if "error" in reply:
        out.append({"error": reply["error"], "parameters": reply.get("parameters", {})})
    else:
        out.append({"ok": reply.get("parameters", {})})
    if sent:
        out[-1]["sent"] = sent
        handle = reply.get("parameters", {}).get("handle", handle)
print(json.dumps(out))
"""


@dataclass
class Env:
    dir: Path
    bus: Bus
    daemon: Daemon
    py: users.UserPython
    alice: users.TestUser
    bob: users.TestUser

    def calls(
        self, calls: list[dict[str, Any]], user: users.TestUser | None = None
    ) -> list[dict[str, Any]]:
        who = self.alice if user is None else user
        proc = users.run_as(
            who,
            self.py.command("-c", _CLIENT, str(self.daemon.socket), json.dumps(calls)),
            env=self.py.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        out: list[dict[str, Any]] = json.loads(proc.stdout)
        return out

    def call(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self.calls([{"method": method, "parameters": params, **kw}])[0]

    def root_call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.calls([{"method": method, "parameters": params}], users.TestUser("root", 0, 0))[
            0
        ]

    def tree(self, name: str) -> Path:
        """A new directory of alice's, in the public work directory."""
        path = self.dir / name
        path.mkdir(mode=0o755)
        os.chown(path, self.alice.uid, self.alice.gid)
        return path

    def give(self, *paths: Path) -> None:
        for path in paths:
            os.lchown(path, self.alice.uid, self.alice.gid)

    def image(self, digest: str) -> Node:
        repo = self.daemon.repo
        return read_image((repo / "objects" / digest[:2] / digest[2:]).read_bytes()).root

    def object_bytes(self, node: Node) -> bytes:
        if node.content is not None:
            return bytes(node.content)
        assert node.payload is not None
        return (self.daemon.repo / "objects" / os.fsdecode(node.payload)).read_bytes()


def _error(reply: dict[str, Any]) -> str:
    return str(reply.get("error", "ok"))


def assert_no_secret(repo: Path) -> None:
    for dirpath, _dirs, names in os.walk(repo):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                assert SECRET[:17] not in path.read_bytes(), f"{path} holds the secret"


@pytest.fixture(scope="module")
def env(test_users: TestUsers, user_python: users.UserPython) -> Iterator[Env]:
    workdir = users.public_dir("cfsd-hostile-")
    bus = start_bus(workdir / "bus")
    daemon: Daemon | None = None
    try:
        bus.start_polkitd(allow_all_rules(test_users.alice.name))
        daemon = start_daemon(
            workdir / "repo",
            "--max-source-entries",
            "5000",
            "--mount-dumpfile-rate",
            "1000000",
            env=bus.env(),
            public=True,
            log_level="debug",
        )
        yield Env(workdir, bus, daemon, user_python, test_users.alice, test_users.bob)
        log = daemon.log_text()
        assert "Traceback" not in log, log[-5000:]
    finally:
        unmount_below(workdir)
        if daemon is not None:
            assert daemon.stop() == 0, daemon.log_text()[-5000:]
        bus.stop()
        users.remove_tree(workdir)


@pytest.fixture(scope="module")
def secret(env: Env) -> Path:
    """A root-only file (0600) and a root-only directory (0700) holding another."""
    path = env.dir / "secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    locked = env.dir / "locked"
    locked.mkdir(mode=0o700)
    (locked / "inner").write_bytes(SECRET)
    return path


@pytest.fixture(scope="module")
def image(env: Env) -> str:
    """An image alice made (ref "alice-img"); its digest."""
    tree = env.tree("img-tree")
    (tree / "hello").write_bytes(b"hello\n")
    env.give(tree / "hello")
    reply = env.call(f"{REPO_IFACE}.CreateImage", {"sourcePath": str(tree), "ref": "alice-img"})
    assert "ok" in reply, reply
    return str(reply["ok"]["digest"])


# -- every reachable method ----------------------------------------------------------------


def _test_names(path: Path) -> set[str]:
    return set(re.findall(r"^def (test_\w+)\(", path.read_text(), re.MULTILINE))


def test_every_reachable_method_is_covered() -> None:
    here = _test_names(Path(__file__))
    for method in REACHABLE:
        # Every method is fuzzed here; each must also have tests of its own.
        assert method in COVERED_HERE or method in COVERED_ELSEWHERE, (
            f"{method} is reachable without root but has no hostile-input tests"
        )
    for method, names in COVERED_HERE.items():
        assert method in REACHABLE, method
        assert set(names) <= here, (method, set(names) - here)
    for method, refs in COVERED_ELSEWHERE.items():
        assert method in REACHABLE, method
        for ref in refs:
            file, _, name = ref.partition("::")
            assert name in _test_names(TESTS / file), ref


def _interface(method: str) -> varlink.Interface:
    iface_name = method.rpartition(".")[0]
    return varlink.Interface((IDL_DIR / f"{iface_name}.varlink").read_text())


_STRINGS: list[Any] = [
    "..",
    "../../etc/shadow",
    "/",
    "/etc/shadow",
    "a/../../b",
    "a\x00b",
    "x" * 5000,
    "\n",
    "",
    "refs/../../x",
    "-",
]
_INTS: list[Any] = [-1, 2**62, 2**31, 7]
_INT_ARRAYS: list[Any] = [[-1], [5] * 9, [], [2**40]]
_STRING_ARRAYS: list[Any] = [[".."], ["/"], ["x" * 5000], ["a\x00"], ["x"] * 2000]
#: Fields not fuzzed with arbitrary strings: a reference that parses could reach the
#: network (Pull's references get test_pull_hostile_references).
_NOT_FUZZED = {(f"{OCI_IFACE}.Pull", "reference")}
_RS_OPEN = "org.composefs.Repository.OpenRepository"
#: Fields whose hostile values are refused as not hers to name: a repository
#: other than the daemon's own is root's only.
_DENIED_FIELDS = {("org.composefs.Repository.OpenRepository", "path")}
#: Base values of required fields (the rest is left out).
_BASE: dict[str, dict[str, Any]] = {
    f"{OCI_IFACE}.Pull": {"reference": "oci:/nonexistent/cfsd-hostile"},
}


def _hostile_values(vtype: Any) -> list[Any]:
    # The varlink package stands for a type by a value of it ("" for string, 0 for
    # int, False for bool) or a _Maybe/_Array/... object.
    kind = type(vtype).__name__
    if kind == "_Maybe":
        return _hostile_values(vtype.element_type)
    if isinstance(vtype, bool):
        return []
    if isinstance(vtype, str):
        return _STRINGS
    if isinstance(vtype, int):
        return _INTS
    if kind == "_Array":
        element = vtype.element_type
        if isinstance(element, int) and not isinstance(element, bool):
            return _INT_ARRAYS
        if isinstance(element, str):
            return _STRING_ARRAYS
    return []


def _required(vtype: Any) -> Any:
    """A plain value for a required field (None: optional, left out)."""
    kind = type(vtype).__name__
    if kind == "_Maybe":
        return None
    if isinstance(vtype, bool):
        return False
    if isinstance(vtype, str):
        return "x"
    if isinstance(vtype, int):
        return 0
    if kind == "_Array":
        return []
    return {}


def test_hostile_parameters_are_typed_errors(env: Env) -> None:
    """Each string, int and array field of every reachable method, given hostile
    values one at a time: each reply is the method's own answer or an error its
    interface declares (never SystemError, never a closed connection: the client
    fails then), and the daemon logs no traceback (checked when the module ends)."""
    seen: dict[str, set[str]] = {}
    for method in REACHABLE:
        iface = _interface(method)
        member = iface.members[method.rpartition(".")[2]]
        declared = {
            f"{iface.name}.{n}" for n, m in iface.members.items() if type(m).__name__ == "_Error"
        }
        fields = member.in_type.fields
        base = {k: _required(t) for k, t in fields.items()}
        base = {k: v for k, v in base.items() if v is not None} | _BASE.get(method, {})
        calls: list[dict[str, Any]] = [{"method": method, "parameters": base}]
        fuzzed: list[str | None] = [None]
        for name, vtype in fields.items():
            if (method, name) in _NOT_FUZZED:
                continue
            for value in _hostile_values(vtype):
                calls.append({"method": method, "parameters": {**base, name: value}})
                fuzzed.append(name)
        # composefs-rs's methods: on a handle of the daemon's own repository, which
        # alice may open, so that their other fields are looked at too.
        opened = "handle" in fields
        if opened:
            for call, field in zip(calls, fuzzed, strict=True):
                call["use_handle"] = field != "handle"
            calls.insert(0, {"method": _RS_OPEN, "parameters": {"path": str(env.daemon.repo)}})
        replies = env.calls(calls)
        assert len(replies) == len(calls)
        if opened:
            assert "ok" in replies[0], replies[0]
            calls, replies = calls[1:], replies[1:]
        for call, field, reply in zip(calls, fuzzed, replies, strict=True):
            name = _error(reply)
            seen.setdefault(method, set()).add(name)
            assert name != f"{REPO_IFACE}.SystemError", (call, reply)
            assert name == "ok" or name in declared or name.startswith("org.varlink.service."), (
                call,
                reply,
            )
            if name == "org.varlink.service.PermissionDenied":
                assert (method, field) in _DENIED_FIELDS, (call, reply)
    print(json.dumps({m: sorted(s) for m, s in seen.items()}, indent=1))
    # Root's Describe still answered.
    assert "ok" in env.root_call(f"{REPO_IFACE}.Describe")


def _open_inodes(pid: int) -> set[int]:
    """Inode numbers of the pipes and sockets process ``pid`` holds open."""
    out: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        m = re.fullmatch(r"(?:pipe|socket):\[(\d+)\]", link)
        if m:
            out.add(int(m.group(1)))
    return out


def test_fds_sent_to_every_method_are_closed(env: Env) -> None:
    """Every reachable method called with a pipe and a socket it did not ask for
    (and MountDumpfile with them as its fds): once answered, the daemon holds
    none of them (no leak of a caller's fds, whatever the method)."""
    calls: list[dict[str, Any]] = []
    for method in REACHABLE:
        fields = _interface(method).members[method.rpartition(".")[2]].in_type.fields
        base = {k: _required(t) for k, t in fields.items()}
        base = {k: v for k, v in base.items() if v is not None} | _BASE.get(method, {})
        calls.append({"method": method, "parameters": base, "fds": [["pipe", ""], ["socket", ""]]})
    replies = env.calls(calls)
    sent = {ino for reply in replies for ino in reply["sent"]}
    assert len(sent) == 2 * len(calls)  # a pipe's read end and a socket per call
    # The replies came after each call ended; its fds are closed by then.
    assert not sent & _open_inodes(env.daemon.proc.pid)


def test_rs_open_repository_only_the_daemons_own(env: Env, secret: Path) -> None:
    """composefs-rs's OpenRepository as alice: the daemon's own repository by any
    path that leads there; every other one (the service user's, the system's,
    others by path or through /proc) refused."""
    rs_open = "org.composefs.Repository.OpenRepository"
    repo = env.daemon.repo
    own = [str(repo), f"{repo}/.", f"/proc/{env.daemon.proc.pid}/root{repo}"]
    others: list[dict[str, Any]] = [
        {"user": True},
        {"system": True},
        {"path": "/proc/self/cwd"},
        {"path": str(env.dir)},
        {"path": str(env.dir / "locked")},
        {"path": str(secret)},
        {"path": "/"},
    ]
    replies = env.calls(
        [{"method": rs_open, "parameters": {"path": p}} for p in own]
        + [{"method": rs_open, "parameters": p} for p in others]
    )
    for reply in replies[: len(own)]:
        assert "ok" in reply, reply
    for reply in replies[len(own) :]:
        assert _error(reply) == "org.varlink.service.PermissionDenied", reply


# -- CreateImage ---------------------------------------------------------------------------


def test_create_image_root_only_sources(env: Env, secret: Path) -> None:
    create = f"{REPO_IFACE}.CreateImage"
    shadow_like = env.call(create, {"sourcePath": str(secret), "ref": "no-1"})
    locked = env.call(create, {"sourcePath": str(env.dir / "locked"), "ref": "no-2"})
    assert _error(shadow_like) == _error(locked) == f"{REPO_IFACE}.SourceError"
    assert "Permission denied" in locked["parameters"]["message"], locked
    # A root-only file inside her own tree, hard-linked there by root (she could not
    # link it herself): scanned, but never read with root's rights.
    tree = env.tree("hardlinked")
    os.link(secret, tree / "linked")
    reply = env.call(create, {"sourcePath": str(tree), "ref": "no-3"})
    assert _error(reply) == f"{REPO_IFACE}.SourceError", reply
    assert "Permission denied" in reply["parameters"]["message"], reply
    assert not (env.daemon.repo / "images" / "refs" / "no-3").exists()
    assert_no_secret(env.daemon.repo)


def test_create_image_links_devices_fifos(env: Env, secret: Path) -> None:
    tree = env.tree("specials")
    (tree / "to-secret").symlink_to(secret)
    (tree / "to-shadow").symlink_to("/etc/shadow")
    (tree / "up").symlink_to("../..")
    (tree / "self").symlink_to("self")
    os.mknod(tree / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(tree / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    os.mkfifo(tree / "fifo", 0o666)
    env.give(*tree.iterdir())
    # Both scanned by fd too: the tree's directory passed O_RDONLY and O_PATH.
    for how in ({"sourcePath": str(tree)}, {"sourceDirectoryFileDescriptor": 0}):
        fds = [] if "sourcePath" in how else [["dir", str(tree)]]
        reply = env.call(f"{REPO_IFACE}.CreateImage", how, fds=fds)
        assert "ok" in reply, reply
        root = env.image(reply["ok"]["digest"])
        assert root.children is not None
        kids = root.children
        # Links are links (their text), nothing read through them.
        for name, target in (
            (b"to-secret", os.fsencode(secret)),
            (b"to-shadow", b"/etc/shadow"),
            (b"up", b"../.."),
            (b"self", b"self"),
        ):
            assert stat.S_ISLNK(kids[name].mode), name
            assert kids[name].payload == target, name
        # Devices and the fifo: the nodes, no content (a fifo opened would block).
        assert stat.S_ISCHR(kids[b"null"].mode) and kids[b"null"].rdev == os.makedev(1, 3)
        assert stat.S_ISCHR(kids[b"zero"].mode) and kids[b"zero"].size == 0
        assert stat.S_ISFIFO(kids[b"fifo"].mode) and kids[b"fifo"].payload is None
    assert_no_secret(env.daemon.repo)


_WRITER = r"""
import os, sys, time
tree = sys.argv[1]
a = b"A" * 70000
b = b"B" * 30000
i = 0
while not os.path.exists(os.path.join(tree, "..", "stop-writer")):
    i += 1
    # Replaced by rename: a whole new inode, A or B, or a link to root's secret.
    tmp = os.path.join(tree, ".new")
    if i % 3 == 2:
        try: os.unlink(tmp)
        except FileNotFoundError: pass
        os.symlink(sys.argv[2], tmp)
    else:
        with open(tmp, "wb") as f:
            f.write(a if i % 2 else b)
    os.rename(tmp, os.path.join(tree, "swapped"))
    # Grown and truncated in place.
    with open(os.path.join(tree, "growing"), "ab") as f:
        f.write(b"%08d\n" % i)
    if i % 50 == 0:
        os.truncate(os.path.join(tree, "growing"), 0)
    # Bursts of changes and quiet spells: imports are refused or whole.
    time.sleep(0.15 if i % 10 == 0 else 0.002)
print(i)
"""


def test_create_image_transforms_on_a_hostile_tree(env: Env, secret: Path) -> None:
    """bootable and propagateUsrToRoot on her tree whose /usr, /boot and SELinux
    configuration are links to root's files and places: the transforms read the
    tree as scanned (with her rights), never the host through its links."""
    trees = []
    for i, links in enumerate([("usr", "boot"), ("boot",), ()]):
        tree = env.tree(f"transforms-{i}")
        for name, target in (("usr", "/root"), ("boot", "/")):
            if name in links:
                (tree / name).symlink_to(target)
            else:
                (tree / name / "lib").mkdir(parents=True)
        (tree / "sysroot").mkdir()
        (tree / "etc" / "selinux").mkdir(parents=True)
        (tree / "etc" / "selinux" / "config").symlink_to(secret)
        (tree / "etc" / "selinux" / "targeted").symlink_to(env.dir / "locked")
        for path in [*tree.rglob("*")]:
            os.lchown(path, env.alice.uid, env.alice.gid)
        trees.append(tree)
    calls: list[dict[str, Any]] = [
        {"method": f"{REPO_IFACE}.CreateImage", "parameters": {"sourcePath": str(tree), **opts}}
        for tree in trees
        for opts in (
            {"bootable": True},
            {"propagateUsrToRoot": True},
            {"bootable": True, "propagateUsrToRoot": True, "xattrs": "keepUserXattrs"},
        )
    ]
    for call, reply in zip(calls, env.calls(calls), strict=True):
        assert _error(reply) in ("ok", f"{REPO_IFACE}.SourceError", INVALID), (call, reply)
        assert "ROOT-ONLY" not in json.dumps(reply), reply
    assert_no_secret(env.daemon.repo)


def test_create_image_source_changing_under_the_scan(env: Env, secret: Path) -> None:
    """alice's writer (a process of hers, stopped by a file) replaces a file by
    rename (A, B, or a link to root's secret) and grows and truncates another while
    she imports the tree: each import is refused (SourceError) or holds one whole
    version of each file, the size it records being its object's, never the secret."""
    tree = env.tree("changing")
    (tree / "swapped").write_bytes(b"A" * 70000)
    (tree / "growing").write_bytes(b"")
    for i in range(40):
        (tree / f"pad{i:03}").write_bytes(b"p" * (i + 1))
    env.give(*tree.iterdir())
    writer = users.popen_as(
        env.alice,
        [env.py.python, "-c", _WRITER, str(tree), str(secret)],
        env=env.py.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    outcomes = {"image": 0, "refused": 0}
    try:
        calls = [
            {"method": f"{REPO_IFACE}.CreateImage", "parameters": {"sourcePath": str(tree)}}
        ] * 8
        for reply in env.calls(calls):
            if "error" in reply:
                assert reply["error"] == f"{REPO_IFACE}.SourceError", reply
                # Naming the file that changed.
                assert reply["parameters"]["message"].startswith(f"{tree}/"), reply
                outcomes["refused"] += 1
                continue
            outcomes["image"] += 1
            kids = env.image(reply["ok"]["digest"]).children
            assert kids is not None
            swapped = kids[b"swapped"]
            if stat.S_ISLNK(swapped.mode):
                assert swapped.payload == os.fsencode(secret)
            else:
                content = env.object_bytes(swapped)
                assert content in (b"A" * 70000, b"B" * 30000)
                assert swapped.size == len(content)
            growing = kids[b"growing"]
            content = env.object_bytes(growing) if growing.size else b""
            assert growing.size == len(content)
            assert re.fullmatch(rb"(\d{8}\n)*", content), content[:100]
    finally:
        (env.dir / "stop-writer").touch()
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0 and int(out) > 0
    print(f"8 imports during {out.strip()} changes: {outcomes}")
    assert_no_secret(env.daemon.repo)


def test_create_image_source_fds_of_the_wrong_kind(env: Env, secret: Path) -> None:
    create = f"{REPO_IFACE}.CreateImage"
    hello = env.tree("fdkinds") / "file"
    hello.write_bytes(b"x")
    env.give(hello)
    by_fd = {"sourceDirectoryFileDescriptor": 0}
    calls: list[dict[str, Any]] = [
        {"method": create, "parameters": by_fd, "fds": [[kind, str(hello)]]}
        for kind in ("socket", "pipe", "file", "opath")
    ]
    # An O_PATH fd on root's 0700 directory (she may hold one: O_PATH needs no
    # read permission) is reopened with her rights.
    calls.append(
        {"method": create, "parameters": by_fd, "fds": [["opath", str(env.dir / "locked")]]}
    )
    # Indexes of no fd; both a path and an fd.
    calls.append(
        {
            "method": create,
            "parameters": {"sourceDirectoryFileDescriptor": 1},
            "fds": [["dir", str(env.dir)]],
        }
    )
    calls.append({"method": create, "parameters": {"sourceDirectoryFileDescriptor": -1}})
    calls.append(
        {
            "method": create,
            "parameters": {**by_fd, "sourcePath": str(env.dir)},
            "fds": [["dir", str(env.dir)]],
        }
    )
    replies = env.calls(calls)
    for reply in replies[:4]:
        assert _error(reply) == f"{REPO_IFACE}.SourceError", reply
        assert "not a directory" in reply["parameters"]["message"], reply
    assert _error(replies[4]) == f"{REPO_IFACE}.SourceError", replies[4]
    assert "Permission denied" in replies[4]["parameters"]["message"], replies[4]
    for reply in replies[5:]:
        assert _error(reply) in (INVALID, f"{REPO_IFACE}.BadFileDescriptor"), reply
    assert_no_secret(env.daemon.repo)


# -- names ---------------------------------------------------------------------------------

_BAD_NAMES = [
    "..",
    ".",
    "/",
    "a/../../b",
    "../images",
    "x" * 1025,
    "/".join(["d"] * 65),
    "a\x1bb",
    "a\x00b",
    "",
]


def test_hostile_names(env: Env, image: str) -> None:
    """Refs, image names and tags that are no names: typed errors, nothing written,
    the image alice has stays as it was."""
    tree = env.tree("names")
    refs_before = sorted(p.name for p in (env.daemon.repo / "images" / "refs").iterdir())
    calls: list[dict[str, Any]] = []
    for name in _BAD_NAMES:
        calls += [
            {
                "method": f"{REPO_IFACE}.CreateImage",
                "parameters": {"sourcePath": str(tree), "ref": name},
            },
            {"method": f"{REPO_IFACE}.Mount", "parameters": {"image": name}},
            {"method": f"{REPO_IFACE}.RemoveImage", "parameters": {"image": name}},
            {"method": f"{REPO_IFACE}.Verify", "parameters": {"image": name}},
            {"method": f"{REPO_IFACE}.ListImages", "parameters": {"image": name}},
            {"method": f"{OCI_IFACE}.Tag", "parameters": {"image": image, "tag": name}},
            {"method": f"{OCI_IFACE}.Tag", "parameters": {"image": name, "tag": "t"}},
            {"method": f"{OCI_IFACE}.Untag", "parameters": {"tag": name}},
            {"method": f"{OCI_IFACE}.Mount", "parameters": {"image": name}},
            {"method": f"{OCI_IFACE}.Inspect", "parameters": {"image": name}},
        ]
    replies = env.calls(calls)
    expected = {
        f"{REPO_IFACE}.InvalidName",
        f"{REPO_IFACE}.NoSuchImage",
        f"{OCI_IFACE}.InvalidTag",
        f"{OCI_IFACE}.ImageNotFound",
        f"{OCI_IFACE}.InvalidReference",
        INVALID,
    }
    for call, reply in zip(calls, replies, strict=True):
        assert _error(reply) in expected, (call, reply)
    refs_after = sorted(p.name for p in (env.daemon.repo / "images" / "refs").iterdir())
    assert refs_after == refs_before
    ok = env.call(f"{REPO_IFACE}.Verify", {"image": "alice-img"})
    assert ok.get("ok", {}).get("ok") is True, ok


# -- Mount and Unmount ---------------------------------------------------------------------


def test_mount_where_of_the_wrong_kind(env: Env, image: str) -> None:
    places = env.tree("places")
    (places / "file").write_bytes(b"")
    os.mkfifo(places / "fifo")
    os.mknod(places / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (places / "dangling").symlink_to("/nonexistent/cfsd-hostile")
    wheres = [
        str(places / "file"),
        str(places / "fifo"),
        str(places / "chr"),
        str(places / "dangling"),
        str(places / "missing"),
        "relative/dir",
        "",
        str(places / "file") + "/..",
    ]
    dotdot = [str(places / "file") + "/..", str(places / "dangling") + "/..", f"{places}/../places"]
    calls = [
        {"method": f"{REPO_IFACE}.Mount", "parameters": {"image": "alice-img", "where": w}}
        for w in wheres + dotdot
    ]
    try:
        replies = env.calls(calls)
    finally:
        unmount_below(env.dir)
    for call, reply in zip(calls, replies, strict=True):
        assert _error(reply) in (INVALID, f"{REPO_IFACE}.MountFailed"), (call, reply)
    # ".." is refused, not read as normpath would: "file/.." was once the directory
    # holding the file, where the kernel says ENOTDIR.
    for reply in replies[len(wheres) :]:
        assert reply == {"error": INVALID, "parameters": {"parameter": "where"}}, reply
    create = env.call(f"{REPO_IFACE}.CreateImage", {"sourcePath": dotdot[0]})
    assert create == {"error": INVALID, "parameters": {"parameter": "sourcePath"}}, create
    # Nothing was attached anywhere.
    mounts = env.call(f"{REPO_IFACE}.ListMounts", {})
    assert mounts["ok"]["mounts"] == [], mounts


def test_mount_fds_and_mappings_of_the_wrong_kind(env: Env, image: str) -> None:
    """Detached mounts of her image with a user namespace, upper and work
    directories passed as fds of the wrong kind, and id mappings that are none:
    typed errors (a mount that is made anyway goes back to her, who closes it)."""
    mount = f"{REPO_IFACE}.Mount"
    here = env.tree("mountfds")
    (here / "file").write_bytes(b"")
    env.give(here / "file")
    calls: list[dict[str, Any]] = []
    for kind, path in (
        ("socket", ""),
        ("pipe", ""),
        ("file", str(here / "file")),
        ("dir", str(here)),
    ):
        calls.append(
            {
                "method": mount,
                "parameters": {"image": "alice-img", "userNamespaceFileDescriptor": 0},
                "fds": [[kind, path]],
            }
        )
        calls.append(
            {
                "method": mount,
                "parameters": {
                    "image": "alice-img",
                    "upperDirectoryFileDescriptor": 0,
                    "workDirectoryFileDescriptor": 1,
                },
                "fds": [[kind, path], [kind, path]],
            }
        )
    bad_maps: list[Any] = [
        [{"inside": -1, "outside": 0, "count": 1}],
        [{"inside": 0, "outside": 0, "count": 0}],
        [{"inside": 0, "outside": 0, "count": 2**32}],
        [{"inside": 2**32 - 1, "outside": 2**32 - 1, "count": 2**32 - 1}],
        [{"inside": 0, "outside": 0, "count": 10}, {"inside": 5, "outside": 100, "count": 10}],
        [{"inside": i, "outside": i, "count": 1} for i in range(400)],
        [],
    ]
    for value in bad_maps:
        calls.append({"method": mount, "parameters": {"image": "alice-img", "uidMap": value}})
    replies = env.calls(calls)
    typed = {INVALID, f"{REPO_IFACE}.BadFileDescriptor", f"{REPO_IFACE}.MountFailed"}
    for call, reply in zip(calls, replies, strict=True):
        assert _error(reply) in typed, (call, reply)


def test_unmount_takes_down_only_composefs_mounts(env: Env) -> None:
    """A mount that is not composefs (a tmpfs of the test's), the root, /proc, paths
    through symbolic links to them: NotMounted, each left as it was."""
    tmpfs = env.tree("tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "cfsd-hostile", str(tmpfs)], check=True)
    try:
        link = env.dir / "to-tmpfs"
        link.symlink_to(tmpfs)
        os.lchown(link, env.alice.uid, env.alice.gid)
        wheres = [str(tmpfs), str(link), "/", "/proc", "/proc/self/root", str(tmpfs) + "/."]
        calls = [
            {"method": f"{REPO_IFACE}.Unmount", "parameters": {"where": w, "lazy": lazy}}
            for w in wheres
            for lazy in (False, True)
        ]
        for call, reply in zip(calls, env.calls(calls), strict=True):
            assert _error(reply) == f"{REPO_IFACE}.NotMounted", (call, reply)
        assert os.path.ismount(tmpfs)
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


# -- Pull ----------------------------------------------------------------------------------


def test_pull_hostile_references(env: Env, secret: Path) -> None:
    pull = f"{OCI_IFACE}.Pull"
    refs = [
        "",
        "..",
        "oci:",
        "oci:../../etc",
        f"oci:{secret}",
        f"oci:{env.dir / 'locked'}",
        "oci-archive:/etc/shadow",
        "docker-archive:/etc/shadow",
        "dir:/etc",
        "containers-storage:[/etc]x",
        "docker://" + "x" * 5000,
        "docker://UPPER/Case",
        "docker://a\x00b",
        "ftp://example.invalid/x",
        "x" * 5000,
    ]
    calls = [{"method": pull, "parameters": {"reference": r}} for r in refs]
    calls += [
        {"method": pull, "parameters": {"reference": "oci:/nonexistent/x", "authFile": v}}
        for v in ("relative", "", "a\x00b", "x" * 5000)
    ]
    wrong_types: list[Any] = ["yes", 1, [], {}]
    calls += [
        {"method": pull, "parameters": {"reference": "oci:/nonexistent/x", "tlsVerify": v}}
        for v in wrong_types
    ]
    calls.append(
        {"method": pull, "parameters": {"reference": "oci:/nonexistent/x", "credentials": "u:p"}}
    )
    allowed = {
        # skopeo's "permission denied" on a layout she may not read.
        f"{OCI_IFACE}.AuthenticationFailed",
        f"{OCI_IFACE}.InvalidReference",
        f"{OCI_IFACE}.ImageNotFound",
        f"{OCI_IFACE}.PullFailed",
        INVALID,
    }
    for call, reply in zip(calls, env.calls(calls), strict=True):
        assert _error(reply) in allowed, (call, reply)
        # Not a byte of root's files in what she is told.
        assert "ROOT-ONLY" not in json.dumps(reply), (call, reply)
    assert_no_secret(env.daemon.repo)


def test_pull_reads_files_as_the_caller(env: Env, secret: Path) -> None:
    """authFile and certDirectory naming root-only files: skopeo, running as alice,
    cannot read them (root, pulling the same, can), and nothing of them reaches her."""
    locked = env.dir / "locked"
    # A client certificate without its key: whoever lists the directory fails on it.
    (locked / "client.cert").write_bytes(SECRET)
    ref = "docker://127.0.0.1:1/cfsd-hostile/none:latest"
    pull = f"{OCI_IFACE}.Pull"
    calls = [
        {
            "method": pull,
            "parameters": {"reference": ref, "authFile": str(secret), "tlsVerify": False},
        },
        {"method": pull, "parameters": {"reference": ref, "certDirectory": str(locked)}},
    ]
    replies = env.calls(calls)
    for call, reply in zip(calls, replies, strict=True):
        text = json.dumps(reply)
        assert "ROOT-ONLY" not in text, reply
        assert _error(reply) != "ok", (call, reply)
    # As alice: the auth file cannot be opened, the certificate directory not
    # listed (skopeo goes on without it, to the registry that is not there).
    assert "permission denied" in replies[0]["parameters"]["message"], replies[0]
    assert "client.cert" not in replies[1]["parameters"]["message"], replies[1]
    # As root, through the same daemon: both are read (and found wanting).
    root = env.calls(calls, users.TestUser("root", 0, 0))
    assert "permission denied" not in root[0]["parameters"]["message"], root[0]
    assert "unmarshaling JSON" in root[0]["parameters"]["message"], root[0]
    assert "client.cert" in root[1]["parameters"]["message"], root[1]


def _files_below(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_pull_as_the_user_and_hostile_tags(env: Env) -> None:
    """alice pulls the golden OCI layout (a copy of hers; skopeo reads it as her),
    then tags, inspects, mounts and untags it under names with "/", ".." and more:
    each is encoded into one file below streams/refs/oci (as composefs-rs does) or
    refused, and nothing appears anywhere else in the repository."""
    layout = env.dir / "layout"
    shutil.copytree(SHARED / "testdata" / "composefs-rs" / "inputs" / "oci" / "layout", layout)
    for path in [layout, *layout.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.lchown(path, env.alice.uid, env.alice.gid)
    pulled = env.call(f"{OCI_IFACE}.Pull", {"reference": f"oci:{layout}:single", "tag": "base"})
    assert "ok" in pulled, pulled
    repo = env.daemon.repo
    before = _files_below(repo)
    names = [
        "../escape",
        "a/../../b",
        "/",
        f"../../../../../../..{env.dir}/escaped",
        "x" * 300,
        "-",
        "a\nb",
        "..",
        "",
    ]
    calls: list[dict[str, Any]] = []
    for name in names:
        calls += [
            {"method": f"{OCI_IFACE}.Tag", "parameters": {"image": "base", "tag": name}},
            {"method": f"{OCI_IFACE}.Inspect", "parameters": {"image": name}},
            {"method": f"{OCI_IFACE}.Mount", "parameters": {"image": name}},
            {"method": f"{OCI_IFACE}.Untag", "parameters": {"tag": name}},
        ]
    replies = env.calls(calls)
    # composefs-rs encodes "/" and "..": the first is a tag like any other.
    assert all("ok" in r for r in replies[:4]), replies[:4]
    typed = {f"{OCI_IFACE}.InvalidTag", f"{OCI_IFACE}.ImageNotFound", INVALID}
    for i, name in enumerate(names):
        tag, inspect, mount, untag = replies[4 * i : 4 * i + 4]
        if "ok" in tag:
            # A tag that was made works, and goes again.
            assert "ok" in inspect and "ok" in mount and "ok" in untag, (name, replies)
        else:
            assert {_error(r) for r in (tag, inspect, mount, untag)} <= typed, (name, replies)
    assert _files_below(repo) == before
    assert not (env.dir / "escape").exists() and not (env.dir / "escaped").exists()


# -- GC and floods -------------------------------------------------------------------------


def test_gc_while_the_user_floods(env: Env) -> None:
    """alice imports trees in a loop (4 connections) while root and alice collect
    garbage: every image she is given afterwards verifies (GC took nothing an image
    being made needed), and GC itself answers."""
    tree = env.tree("flood-tree")
    for i in range(20):
        (tree / f"f{i}").write_bytes(os.urandom(2000 + i))
    env.give(*tree.iterdir())
    flood = Peer(
        env.py,
        env.alice,
        str(env.daemon.socket),
        "flood",
        "4",
        f"{REPO_IFACE}.CreateImage",
        json.dumps({"sourcePath": str(tree), "ref": "flood"}),
    )
    try:
        assert flood.report() == {"flooding": 4}
        gc = f"{REPO_IFACE}.GarbageCollect"
        for _ in range(2):
            assert "ok" in env.root_call(gc, {}), "root's GC"
            assert "ok" in env.call(gc, {}), "alice's GC"
        done = flood.finish()
    finally:
        flood.kill()
    errors = done["errors"]
    # Refusals are the per-uid bounds, never a failed import.
    for err in errors:
        assert isinstance(err, dict) and err.get("error") in (
            f"{REPO_IFACE}.RepositoryBusy",
            f"{REPO_IFACE}.AuthorizationUnavailable",
        ), err
    assert done["calls"] > 0
    verify = env.root_call(f"{REPO_IFACE}.Verify", {"image": "flood"})
    assert verify.get("ok", {}).get("ok") is True, verify


def test_floods_are_bounded(env: Env) -> None:
    """alice floods: 4 connections looping CreateImage (heavy: one of hers at a
    time), 24 looping Unmount (each a polkit check: at most 4 of hers at once) and
    200 more connections: her calls are answered or refused with a typed bound, her
    connections stop at the per-uid limit, and root's Describe is answered meanwhile
    (never timed)."""
    tree = env.tree("flood2")
    (tree / "f").write_bytes(b"f")
    env.give(tree / "f")
    sock = str(env.daemon.socket)
    create = json.dumps({"sourcePath": str(tree)})
    unmount = json.dumps({"where": "/nonexistent/cfsd-hostile"})
    peers: list[Peer] = []
    try:
        heavy = Peer(env.py, env.alice, sock, "flood", "4", f"{REPO_IFACE}.CreateImage", create)
        peers.append(heavy)
        checks = Peer(env.py, env.alice, sock, "flood", "24", f"{REPO_IFACE}.Unmount", unmount)
        peers.append(checks)
        assert heavy.report() == {"flooding": 4}
        assert checks.report() == {"flooding": 24}
        cheap = Peer(env.py, env.alice, sock, "connections", "200")
        peers.append(cheap)
        conns = cheap.report()
        for _ in range(5):
            assert "ok" in env.root_call(f"{REPO_IFACE}.Describe")
        heavy_done = heavy.finish()
        checks_done = checks.finish()
        cheap.finish()
    finally:
        for peer in peers:
            peer.kill()
    print(heavy_done, checks_done, conns)
    for err in heavy_done["errors"]:
        assert isinstance(err, dict), err
        assert err.get("error") == f"{REPO_IFACE}.AuthorizationUnavailable", err
    # The checks' errors: the method's own answer, or the per-uid bound on checks.
    for err in checks_done["errors"]:
        assert isinstance(err, dict), err
        assert err.get("error") in (
            f"{REPO_IFACE}.NotMounted",
            f"{REPO_IFACE}.AuthorizationUnavailable",
        ), err
    assert heavy_done["calls"] > 0 and checks_done["calls"] > 0
    # The per-uid connection bound: 128 (28 flooding + 200 more tried).
    assert conns["answered"] + 28 <= 128 and conns["refused"] >= 200 - 100, conns
    assert conns["other"] == [], conns
    assert "ok" in env.call(f"{REPO_IFACE}.Describe")
