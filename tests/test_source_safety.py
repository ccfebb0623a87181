"""Reading source trees safely (issue 11, points 1 and 2).

A tree whose owner changes it while composefsd (root) builds an image from it
cannot lead the build outside the tree, and a caller other than root gets exactly
the files it could open itself:

* swaps between scan and read -- a directory for a symlink to a root-only place,
  the file for a symlink, the file for another inode -- in ``mkcomposefs
  --digest-store``'s scanner (in-process lanes and worker processes, hashing and
  store copying), ``Repository.create_image`` (by path and by fd, in-process and
  in import worker processes) and ``composefsctl create-image``: each fails with
  a message naming the file, and no byte of the secret reaches a store;
* xattrs come from the inode that was stat'ed, even when the name is swapped;
* a real attacker, a test user, swapping in a loop while root's CreateImage runs
  through the daemon: never a secret in the repository;
* the caller's rights through the daemon: a test user cannot read a root-only
  file or directory of its tree, a path it cannot reach, or trusted.* xattrs, and
  can read what its supplementary group may; root can read all of it;
* the processes that act for a caller are out of its reach (no ptrace, no
  /proc access, no signals while they act as root).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import users
from composefsd.image.reader import read_image
from composefsd.image.tree import Node
from composefsd.image.writer import write_image
from composefsd.repository import CreateOptions, Repository, SourceError
from composefsd.repository import importer as importer_mod
from composefsd.service import client
from composefsd.service.context import CallCancelled, CallContext, Peer, VarlinkReplyError
from composefsd.service.methods import RepositoryInterface
from composefsd.service.mounts import MountTracker
from composefsd.sources import directory as scanner
from composefsd.sources.directory import ScanError, ScanOptions, scan_directory
from conftest import TestUsers
from ctlrun import run_ctl
from servicehelpers import Daemon, running_daemon, start_daemon

SECRET = b"TOP-SECRET:" * 400
INNOCENT = b"innocent..." * 400
IFACE = "io.composefs.Repository"


@dataclass
class Stage:
    """A public directory holding bob's tree and a root-only secret of the same size."""

    pub: Path
    tree: Path
    secret_dir: Path


@pytest.fixture
def stage(test_users: TestUsers) -> Iterator[Stage]:
    pub = users.public_dir()
    secret_dir = pub / "secret"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "shadow").write_bytes(SECRET)
    (secret_dir / "shadow").chmod(0o600)
    tree = pub / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "shadow").write_bytes(INNOCENT)
    (tree / "d" / "other").write_bytes(b"o" * 300)
    (tree / "top").write_bytes(b"t" * 500)
    bob = test_users.bob
    for path in [tree, *tree.rglob("*")]:
        os.lchown(path, bob.uid, bob.gid)
    try:
        yield Stage(pub, tree, secret_dir)
    finally:
        users.remove_tree(pub)


def assert_no_secret(directory: Path) -> None:
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                assert SECRET[:11] not in path.read_bytes(), f"{path} holds the secret"


def _swap_parent(stage: Stage) -> None:
    os.rename(stage.tree / "d", stage.tree / "d.away")
    os.symlink(stage.secret_dir, stage.tree / "d")


def _swap_file_for_symlink(stage: Stage) -> None:
    os.unlink(stage.tree / "d" / "shadow")
    os.symlink(stage.secret_dir / "shadow", stage.tree / "d" / "shadow")


def _swap_file_for_other_inode(stage: Stage) -> None:
    # What an owner can do where hardlinks to others' files are allowed
    # (fs.protected_hardlinks=0): the same name, the same size, another inode.
    os.unlink(stage.tree / "d" / "shadow")
    os.link(stage.secret_dir / "shadow", stage.tree / "d" / "shadow")


SWAPS: dict[str, tuple[Callable[[Stage], None], str]] = {
    "parent-dir-to-symlink": (
        _swap_parent,
        "a directory on its path was replaced by a symbolic link or a file",
    ),
    "file-to-symlink": (_swap_file_for_symlink, "it was replaced by a symbolic link"),
    "file-to-other-inode": (_swap_file_for_other_inode, "it was replaced by another file"),
}


def _victims(stage: Stage, swap: str) -> set[str]:
    """The files a swap can make fail first: every file below d for a swapped d."""
    names = ["shadow", "other"] if swap == "parent-dir-to-symlink" else ["shadow"]
    return {str(stage.tree / "d" / name) for name in names}


def _after_scanning(
    monkeypatch: pytest.MonkeyPatch, name: bytes, action: Callable[[], None]
) -> None:
    """Run ``action`` right after the scanner has looked at entry ``name``."""
    original = scanner._Walker._entry

    def entry(self: Any, dir_fd: int, ent: os.DirEntry[str], nm: bytes, rel: bytes) -> Any:
        made = original(self, dir_fd, ent, nm, rel)
        if nm == name:
            action()
        return made

    monkeypatch.setattr(scanner._Walker, "_entry", entry)


def _before_import(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run ``action`` when the scan is done and the import of the files begins."""
    original = importer_mod.Importer.run

    def run(self: Any, tasks: Any) -> Any:
        action()
        return original(self, tasks)

    monkeypatch.setattr(importer_mod.Importer, "run", run)


# -- mkcomposefs --digest-store: the scanner ----------------------------------------------


@pytest.mark.parametrize("swap", list(SWAPS))
@pytest.mark.parametrize("workers", [False, True], ids=["threads", "processes"])
def test_scanner_never_follows_a_swap(
    stage: Stage, swap: str, workers: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    action, reason = SWAPS[swap]
    if workers:
        monkeypatch.setattr(scanner, "_PROCESS_MIN_BYTES", 0)
    _after_scanning(monkeypatch, b"shadow", lambda: action(stage))
    with pytest.raises(ScanError) as info:
        scan_directory(stage.tree, ScanOptions(threads=2), digest_store=tmp_path / "store")
    path = os.fsdecode(info.value.path or b"")
    assert path in _victims(stage, swap)
    assert str(info.value) == f"error computing digest: {path}: {reason}"
    assert_no_secret(tmp_path)


@pytest.mark.parametrize("swap", list(SWAPS))
def test_scanner_store_copy_never_follows_a_swap(
    stage: Stage, swap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hashing saw the right file; the swap comes before the copy into the store.
    action, reason = SWAPS[swap]
    original = scanner._Pipeline._start_copying

    def start_copying(self: Any) -> None:
        action(stage)
        original(self)

    monkeypatch.setattr(scanner._Pipeline, "_start_copying", start_copying)
    with pytest.raises(ScanError) as info:
        scan_directory(stage.tree, ScanOptions(threads=2), digest_store=tmp_path / "store")
    assert {f"cannot fill store: {p}: {reason}" for p in _victims(stage, swap)} >= {str(info.value)}
    assert_no_secret(tmp_path)


def test_scanner_refuses_a_directory_swapped_after_its_stat(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # d is stat'ed, then replaced by another directory before it is entered: its
    # node's metadata would describe one directory and its children another's.
    def swap() -> None:
        os.rename(stage.tree / "d", stage.tree / "d.old")
        (stage.tree / "d").mkdir()

    _after_scanning(monkeypatch, b"d", swap)
    with pytest.raises(ScanError) as info:
        scan_directory(stage.tree, ScanOptions(compute_digests=False, inline_small=False))
    assert str(info.value) == (
        f"error accessing {stage.tree / 'd'}: it was replaced while the tree was being scanned"
    )


@pytest.mark.parametrize("when", ["listing", "reading"])
def test_scanner_reads_xattrs_of_the_inode_it_stated(
    stage: Stage, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name d/shadow is swapped for another file with other xattrs (trusted.*
    # included) between the stat of the entry and the reading of its xattrs: when
    # they are first listed (by name in the directory's fd), or once the entry is
    # open. The node never gets the other file's xattrs: the scan stops, or reads
    # them from the inode it stat'ed.
    shadow = stage.tree / "d" / "shadow"
    os.setxattr(shadow, b"user.orig", b"1")
    other = stage.pub / "other"
    other.write_bytes(INNOCENT)
    os.setxattr(other, b"user.evil", b"1")
    os.setxattr(other, b"trusted.evil", b"1")
    real_listxattr = os.listxattr
    swapped: list[bool] = []

    def listxattr(target: Any = None, *, follow_symlinks: bool = True) -> list[str]:
        text = os.fsdecode(target)
        by_fd = text.startswith("/proc/self/fd/") and text.count("/") == 4
        if os.path.realpath(text) == str(shadow) and by_fd == (when == "reading") and not swapped:
            swapped.append(True)
            os.rename(other, shadow)
        return real_listxattr(target, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(os, "listxattr", listxattr)
    options = ScanOptions(compute_digests=False, inline_small=False)
    if when == "listing":
        with pytest.raises(ScanError) as info:
            scan_directory(stage.tree, options)
        assert swapped
        assert str(info.value) == (
            f"error accessing {shadow}: it was replaced while the tree was being scanned"
        )
        return
    root = scan_directory(stage.tree, options)
    assert swapped
    node = root.children[b"d"].children[b"shadow"]  # type: ignore[index]
    assert node.xattrs == [(b"user.orig", b"1")]


# -- the repository: Repository.create_image and composefsctl create-image ---------------


@pytest.mark.parametrize("swap", list(SWAPS))
@pytest.mark.parametrize("workers", [False, True], ids=["threads", "processes"])
@pytest.mark.parametrize("by_fd", [False, True], ids=["path", "fd"])
def test_create_image_never_follows_a_swap(
    stage: Stage,
    swap: str,
    workers: bool,
    by_fd: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    action, reason = SWAPS[swap]
    repo = Repository.init(tmp_path / "repo")
    if workers:
        monkeypatch.setattr(importer_mod, "_PROCESS_MIN_BYTES", 0)
    _before_import(monkeypatch, lambda: action(stage))
    fd = os.open(stage.tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if by_fd else None
    try:
        source: str | int = fd if fd is not None else str(stage.tree)
        with pytest.raises(SourceError) as info:
            repo.create_image(source, ref="x", options=CreateOptions(threads=2))
    finally:
        if fd is not None:
            os.close(fd)
    where = "<source directory fd>" if by_fd else str(stage.tree)
    victims = {v.replace(str(stage.tree), where, 1) for v in _victims(stage, swap)}
    assert {f"{v}: {reason}" for v in victims} >= {str(info.value)}
    assert repo.list_images() == [] and not (repo.refs_dir / "x").exists()
    assert_no_secret(repo.path)
    assert repo.fsck().ok


def test_composefsctl_create_image_never_follows_a_swap(
    stage: Stage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = Repository.init(tmp_path / "repo")
    _before_import(monkeypatch, lambda: _swap_parent(stage))
    status, out, err = run_ctl(
        capsys, "--direct", "--repo", str(repo.path), "create-image", str(stage.tree), "--ref", "x"
    )
    assert (status, out) == (1, "")
    reason = "a directory on its path was replaced by a symbolic link or a file"
    assert err in {
        f"composefsctl: error: {v}: {reason}\n" for v in _victims(stage, "parent-dir-to-symlink")
    }
    assert_no_secret(repo.path)


def test_create_image_unchanged_tree_still_imports(stage: Stage, tmp_path: Path) -> None:
    # The checks cost nothing in behaviour: the same tree gives the same image as
    # mkcomposefs --digest-store --min-version=1 (the repository's format, V1), by
    # path and by fd, and again from the digest cache.
    repo = Repository.init(tmp_path / "repo")
    first = repo.create_image(stage.tree, ref="a")
    fd = os.open(stage.tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        assert repo.create_image(fd).digest == first.digest
    finally:
        os.close(fd)
    again = repo.create_image(stage.tree, ref="b")
    assert again.digest == first.digest and again.objects_written == 0
    expected = scan_directory(stage.tree, digest_store=tmp_path / "store")
    image = (repo.objects_dir / first.digest[:2] / first.digest[2:]).read_bytes()
    assert image == write_image(expected, min_version=1)


# -- a real attacker racing root's CreateImage through the daemon ------------------------

# bob's loop: d is his directory half of the time and a symlink to the secret
# directory the other half.
RACER = r"""
import os, sys, time
tree, secret, stop = sys.argv[1:4]
d, away = os.path.join(tree, "d"), os.path.join(tree, "d.away")
n = 0
while not os.path.exists(stop):
    os.rename(d, away)
    os.symlink(secret, d)
    time.sleep(0.001)
    os.unlink(d)
    os.rename(away, d)
    time.sleep(0.001)
    n += 1
print(n)
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path / "repo", check_exit=False) as d:
        yield d


def _shadow_object(repo: Path, digest: str) -> bytes | None:
    """The content of d/shadow in image ``digest`` (None if d is not a directory)."""
    image = (repo / "objects" / digest[:2] / digest[2:]).read_bytes()
    root = read_image(image).root
    assert root.children is not None
    d = root.children.get(b"d")
    if d is None or d.children is None:
        return None
    node = d.children[b"shadow"]
    if node.content is not None:
        return node.content
    assert node.payload is not None
    return (repo / "objects" / os.fsdecode(node.payload)).read_bytes()


def test_daemon_create_image_race_never_leaks(
    stage: Stage, test_users: TestUsers, daemon: Daemon
) -> None:
    # More of bob's files after d: the import of d/shadow comes a while after its scan.
    more = stage.tree / "z"
    more.mkdir()
    for i in range(200):
        (more / f"f{i:03}").write_bytes(b"z" * (100 + i))
    for path in [more, *more.iterdir()]:
        os.lchown(path, test_users.bob.uid, test_users.bob.gid)
    stop = stage.pub / "stop"
    racer = users.popen_as(
        test_users.bob,
        ["/usr/bin/python3", "-c", RACER, str(stage.tree), str(stage.secret_dir), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    outcomes: dict[str, int] = {"image": 0, "refused": 0}
    try:
        with client.connect(daemon.address, timeout=120) as conn:
            for i in range(60):
                try:
                    reply = conn.call(
                        f"{IFACE}.CreateImage", {"sourcePath": str(stage.tree), "ref": f"r/{i}"}
                    )
                except client.VarlinkCallError as exc:
                    assert exc.name == f"{IFACE}.SourceError", exc
                    outcomes["refused"] += 1
                    continue
                outcomes["image"] += 1
                content = _shadow_object(daemon.repo, reply["digest"])
                assert content in (None, INNOCENT)
    finally:
        stop.touch()
        out, _ = racer.communicate(timeout=60)
    swaps = int(out)
    assert swaps > 0 and racer.returncode == 0
    print(f"60 CreateImage calls during {swaps} swaps: {outcomes}")
    assert_no_secret(daemon.repo)


# -- a caller's rights ------------------------------------------------------------------


@dataclass
class Service:
    daemon: Daemon
    user_python: users.UserPython

    def ctl(self, user: users.TestUser | None, *args: str) -> tuple[int, str, str]:
        argv = self.user_python.command(
            "-m", "composefsd.cli.composefsctl", "--connect", self.daemon.address, *args
        )
        if user is None:
            proc = subprocess.run(
                argv, env=self.user_python.env, capture_output=True, text=True, timeout=120
            )
        else:
            proc = users.run_as(
                user, argv, env=self.user_python.env, capture_output=True, text=True, timeout=120
            )
        return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def service(
    tmp_path: Path, test_users: TestUsers, user_python: users.UserPython
) -> Iterator[Service]:
    with running_daemon(
        tmp_path / "repo", "--group", str(test_users.group), public=True, check_exit=False
    ) as d:
        yield Service(d, user_python)


@pytest.fixture
def alice_tree(test_users: TestUsers) -> Iterator[Path]:
    """alice's tree: her files, a file her supplementary group may read, a file
    with a trusted.* xattr (only root can read those)."""
    pub = users.public_dir()
    tree = pub / "tree"
    tree.mkdir()
    (tree / "mine").write_bytes(b"m" * 200)
    (tree / "small").write_bytes(b"tiny")
    (tree / "sub").mkdir()
    (tree / "sub" / "deeper").write_bytes(b"d" * 70_000)
    alice = test_users.alice
    for path in [tree, *tree.rglob("*")]:
        os.lchown(path, alice.uid, alice.gid)
    (tree / "group-readable").write_bytes(b"g" * 300)
    os.chown(tree / "group-readable", 0, test_users.group)
    (tree / "group-readable").chmod(0o640)
    os.setxattr(tree / "mine", b"trusted.root-only", b"r")
    os.setxattr(tree / "mine", b"user.hers", b"h")
    try:
        yield tree
    finally:
        users.remove_tree(pub)


def _by(by_path: bool) -> list[str]:
    return ["--by-path"] if by_path else []


def _image_node(repo: Path, digest: str, *names: bytes) -> Node:
    node = read_image((repo / "objects" / digest[:2] / digest[2:]).read_bytes()).root
    for name in names:
        assert node.children is not None
        node = node.children[name]
    return node


@pytest.mark.parametrize("by_path", [True, False], ids=["path", "fd"])
def test_caller_reads_with_its_own_rights(
    service: Service, test_users: TestUsers, alice_tree: Path, by_path: bool
) -> None:
    alice = test_users.alice
    status, out, err = service.ctl(alice, "create-image", str(alice_tree), "--json", *_by(by_path))
    assert status == 0, err
    digest = json.loads(out)["digest"]
    repo = service.daemon.repo
    # Her group's file made it, with its content; root's trusted.* xattr did not.
    node = _image_node(repo, digest, b"group-readable")
    assert node.payload is not None
    assert (repo / "objects" / os.fsdecode(node.payload)).read_bytes() == b"g" * 300
    assert _image_node(repo, digest, b"mine").xattrs == [(b"user.hers", b"h")]
    # Root, through the same daemon, reads the trusted.* xattr too.
    status, out, err = service.ctl(None, "create-image", str(alice_tree), "--json", *_by(by_path))
    assert status == 0, err
    root_digest = json.loads(out)["digest"]
    assert root_digest != digest
    assert (b"trusted.root-only", b"r") in _image_node(repo, root_digest, b"mine").xattrs


@pytest.mark.parametrize("by_path", [True, False], ids=["path", "fd"])
def test_caller_cannot_read_a_root_only_file_of_its_tree(
    service: Service, test_users: TestUsers, alice_tree: Path, by_path: bool
) -> None:
    secret = alice_tree / "sub" / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)  # root's, in alice's directory: she can stat it, not open it
    status, out, err = service.ctl(
        test_users.alice, "create-image", str(alice_tree), "--ref", "a", *_by(by_path)
    )
    assert (status, out) == (1, "")
    assert err == (
        f"composefsctl: error: {IFACE}.SourceError: cannot read {secret}: Permission denied\n"
    )
    assert_no_secret(service.daemon.repo)
    assert not (service.daemon.repo / "images" / "refs" / "a").exists()
    # Root may read it.
    status, _, err = service.ctl(None, "create-image", str(alice_tree), *_by(by_path))
    assert status == 0, err


@pytest.mark.parametrize("by_path", [True, False], ids=["path", "fd"])
def test_caller_cannot_list_a_root_only_directory_of_its_tree(
    service: Service, test_users: TestUsers, alice_tree: Path, by_path: bool
) -> None:
    hidden = alice_tree / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "file").write_bytes(SECRET)
    status, out, err = service.ctl(test_users.alice, "create-image", str(alice_tree), *_by(by_path))
    assert (status, out) == (1, "")
    assert err == (
        f"composefsctl: error: {IFACE}.SourceError: error accessing {hidden}: Permission denied\n"
    )
    assert_no_secret(service.daemon.repo)


def test_caller_path_is_resolved_with_its_rights(
    service: Service, test_users: TestUsers, alice_tree: Path
) -> None:
    # Her tree, readable itself, below a directory she may not enter.
    locked = alice_tree.parent / "locked"
    locked.mkdir(mode=0o700)
    inner = locked / "inner"
    shutil.move(str(alice_tree), inner)
    status, out, err = service.ctl(test_users.alice, "create-image", str(inner), "--by-path")
    assert (status, out) == (1, "")
    assert err == (f"composefsctl: error: {IFACE}.SourceError: source {inner}: Permission denied\n")
    status, _, err = service.ctl(None, "create-image", str(inner), "--by-path")
    assert status == 0, err


def test_caller_tree_entry_limit_option(
    tmp_path: Path, test_users: TestUsers, user_python: users.UserPython, alice_tree: Path
) -> None:
    d = start_daemon(
        tmp_path / "repo",
        "--group",
        str(test_users.group),
        "--max-source-entries",
        "5",
        public=True,
    )
    try:
        ctl = Service(d, user_python).ctl
        status, out, err = ctl(test_users.alice, "create-image", str(alice_tree))
        assert (status, out) == (1, "")
        assert err == (
            f"composefsctl: error: {IFACE}.SourceError: {alice_tree} has more than 5 "
            f"entries, the most a tree may have here\n"
        )
        status, _, err = ctl(None, "create-image", str(alice_tree))  # root: not bounded
        assert status == 0, err
    finally:
        d.stop()


def test_caller_large_tree_in_worker_processes(
    service: Service, test_users: TestUsers, alice_tree: Path
) -> None:
    # Enough files for several import batches: every one opened with her rights.
    for i in range(300):
        (alice_tree / "sub" / f"f{i:03}").write_bytes(os.urandom(100 + i))
        os.lchown(alice_tree / "sub" / f"f{i:03}", test_users.alice.uid, test_users.alice.gid)
    status, out, err = service.ctl(test_users.alice, "create-image", str(alice_tree), "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["files"] == 304
    status, out, err = service.ctl(None, "create-image", str(alice_tree), "--json")
    assert status == 0, err
    # Root also sees the trusted.* xattr; otherwise the same objects.
    assert json.loads(out)["objects_written"] == 0


# -- the processes that act for a caller are out of its reach ---------------------------

HOLD = r"""
import os, sys, time
from composefsd.credentials import Credentials, acting_as, drop_to
uid, gid, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
creds = Credentials(uid, gid, ())
if mode == "drop":
    drop_to(creds)
    print("ready", flush=True)
    time.sleep(120)
else:
    with acting_as(creds):
        assert os.geteuid() == uid and os.getuid() == 0
        print("ready", flush=True)
        time.sleep(120)
"""

PROBE = r"""
import os, sys
pid = int(sys.argv[1])
out = []
for what, call in (
    ("fds", lambda: os.listdir(f"/proc/{pid}/fd")),
    ("mem", lambda: open(f"/proc/{pid}/mem", "rb").close()),
    ("signal", lambda: os.kill(pid, 0)),
):
    try:
        call()
        out.append(f"{what}:yes")
    except PermissionError:
        out.append(f"{what}:no")
print(" ".join(out))
"""


def _probe(user: users.TestUser, pid: int) -> str:
    return str(
        users.run_as(
            user,
            ["/usr/bin/python3", "-c", PROBE, str(pid)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )


@pytest.mark.parametrize("mode", ["drop", "acting"])
def test_workers_for_a_caller_are_out_of_its_reach(test_users: TestUsers, mode: str) -> None:
    alice = test_users.alice
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(alice.uid), str(alice.gid), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        seen = _probe(alice, holder.pid)
    finally:
        holder.kill()
        holder.wait()
    # Dropped for good: the same uid may signal it, but not look inside (non-dumpable).
    # Acting as her with root's real ids: not even a signal.
    expected = "fds:no mem:no signal:yes" if mode == "drop" else "fds:no mem:no signal:no"
    assert seen == expected
    # The control: a process she started herself is hers to look into.
    own = users.popen_as(alice, ["/usr/bin/python3", "-c", "import time; time.sleep(120)"])
    try:
        assert _probe(alice, own.pid) == "fds:yes mem:yes signal:yes"
    finally:
        own.kill()
        own.wait()


# -- hostile input from a caller read with its rights (methods, no sockets) --------------


def _children() -> set[str]:
    return set(Path(f"/proc/self/task/{os.getpid()}/children").read_text().split())


class _Caller:
    """RepositoryInterface.CreateImage called the way the transport calls it, by a peer."""

    def __init__(self, tmp: Path, user: users.TestUser | None) -> None:
        self.repo = Repository.init(tmp / "repo")
        self.iface = RepositoryInterface(self.repo, MountTracker(tmp / "run"))
        uid, gid, groups = (0, 0, ()) if user is None else (user.uid, user.gid, user.groups)
        self.peer = Peer(os.getpid(), uid, gid, frozenset(groups))

    def create(self, path: Path | None = None, fd: int | None = None, **kw: Any) -> dict[str, Any]:
        ctx = CallContext(
            peer=self.peer,
            method=f"{IFACE}.CreateImage",
            more=True,
            fds=[fd] if fd is not None else [],
            send_continues=kw.pop("send", None) or (lambda _params: None),
        )
        args: list[Any] = [
            str(path) if path else None,
            0 if fd is not None else None,
            None,
            *[None] * 6,
        ]
        try:
            return dict(self.iface.CreateImage(*args, _request=ctx))
        finally:
            ctx.close_fds()

    def error(self, path: Path | None = None, fd: int | None = None, **kw: Any) -> Any:
        with pytest.raises(VarlinkReplyError) as info:
            self.create(path, fd, **kw)
        return info.value


def test_caller_tree_entry_limit(tmp_path: Path, test_users: TestUsers, alice_tree: Path) -> None:
    for i in range(60):
        (alice_tree / "sub" / f"n{i}").write_bytes(b"")
    caller = _Caller(tmp_path, test_users.alice)
    caller.iface.max_source_entries = 50
    e = caller.error(alice_tree)
    assert e.name == f"{IFACE}.SourceError"
    assert e.parameters["message"] == (
        f"{alice_tree} has more than 50 entries, the most a tree may have here"
    )
    # Root's own trees are not bounded by it.
    root = _Caller(tmp_path / "root", None)
    root.iface.max_source_entries = 50
    assert root.create(alice_tree)["files"] == 64


def test_caller_fds_of_the_wrong_kind(
    tmp_path: Path, test_users: TestUsers, alice_tree: Path
) -> None:
    caller = _Caller(tmp_path, test_users.alice)
    children = _children()
    file_fd = os.open(alice_tree / "mine", os.O_RDONLY | os.O_CLOEXEC)
    e = caller.error(fd=file_fd)
    assert e.name == f"{IFACE}.SourceError"
    assert e.parameters["message"] == "the source file descriptor is not a directory"
    a, b = socket.socketpair()
    try:
        e = caller.error(fd=os.dup(a.fileno()))
        assert e.parameters["message"] == "the source file descriptor is not a directory"
    finally:
        a.close()
        b.close()
    # An fd on a directory she may not read (however she got it): reopening it needs
    # her read permission, which she does not have.
    closed = alice_tree.parent / "closed"
    closed.mkdir(mode=0o700)
    e = caller.error(fd=os.open(closed, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    assert e.parameters["message"] == ("cannot open the source directory: Permission denied")
    assert caller.repo.list_images() == []
    assert _children() == children  # every scan worker is gone


def test_caller_scan_cancelled(tmp_path: Path, test_users: TestUsers, alice_tree: Path) -> None:
    # The caller goes away while its tree is being scanned: the scan worker is killed.
    for i in range(3000):
        (alice_tree / "sub" / f"e{i}").write_bytes(b"")
    caller = _Caller(tmp_path, test_users.alice)
    children = _children()

    def gone(params: dict[str, Any]) -> None:
        raise CallCancelled("CreateImage: the client disconnected")

    with pytest.raises(CallCancelled):
        caller.create(alice_tree, send=gone)
    assert _children() == children
    assert caller.repo.list_images() == [] and caller.repo.fsck().ok


def test_caller_scan_cancelled_without_cap_kill(
    tmp_path: Path, test_users: TestUsers, alice_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under the unit without CAP_KILL the worker that became alice could not be
    # signalled: it must end anyway (its output is closed: it dies at its next
    # progress report).
    for i in range(20_000):
        (alice_tree / "sub" / f"e{i}").write_bytes(b"")
    caller = _Caller(tmp_path, test_users.alice)
    children = _children()

    def no_cap_kill(self: subprocess.Popen[bytes]) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(subprocess.Popen, "kill", no_cap_kill)

    def gone(params: dict[str, Any]) -> None:
        raise CallCancelled("CreateImage: the client disconnected")

    with pytest.raises(CallCancelled):
        caller.create(alice_tree, send=gone)
    assert _children() == children
