"""Acceptance tests of the composefs mount logic with real mounts (root, kernel 6.18).

``composefsd.kernel.mount`` and ``composefsd.kernel.repomount``: images built by our
repository and by C ``mkcomposefs --digest-store`` mount and show exactly their source
trees; objects split over several basedirs; hardlinks, devices and whiteouts (the
xattr-whiteout form, hiding names when the mount is a lower layer); idmapped mounts
through a user namespace fd and through uid/gid maps; writable mounts that leave the
image and the objects alone; both ways of passing layers and both EROFS backings; the
verity policies on a kernel without fs-verity; hostile input refused with a clear
message; a thousand failed attempts that leak no mount, fd, temporary directory or
loop device; unmount and the mount listings.

Every mount is attached below the test's ``tmp_path`` and the ``mounts`` fixture
unmounts whatever is left there (lazily if need be), so a failing test leaves nothing
mounted. The string layer form attaches the EROFS at a temporary directory for a
moment: ``tempfile.tempdir`` points into ``tmp_path`` so that leftovers show.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import gen_tree
import treecompare
from composefsd.fsverity import digest_bytes
from composefsd.kernel import mount as mount_mod
from composefsd.kernel.mount import (
    LAYER_MODE_ENV,
    NO_VERITY,
    WRONG_VERITY,
    DetachedMount,
    ImageVerityError,
    MountError,
    MountOptions,
    NotComposefsMountError,
    attach,
    list_mounts,
    mount_image,
    probe_layer_mode,
    unmount,
)
from composefsd.kernel.mountinfo import MountEntry, parse_mountinfo
from composefsd.kernel.repomount import (
    mount_repository_image,
    mounted_images,
    repository_mounts,
)
from composefsd.kernel.syscalls import (
    MNT_DETACH,
    FsContext,
    KernelError,
    move_mount,
    umount2,
)
from composefsd.kernel.userns import IdMapping, create_userns, parse_mapping
from composefsd.repository import CreateOptions, Repository, VerityPolicy
from privatens import in_private_mount_namespace
from trees import app_tree

CLONE_NEWNS = 0x00020000
OVERFLOW_ID = 65534  # what an idmapped mount shows for an id its mapping lacks
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


# -- helpers -------------------------------------------------------------------------------


def _mountinfo_entries() -> list[MountEntry]:
    return list(parse_mountinfo(Path("/proc/self/mountinfo").read_text()))


_BASETEMP: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _remember_basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    _BASETEMP[:] = [tmp_path_factory.getbasetemp()]


def _our_mounts() -> list[MountEntry]:
    """Mounts below this pytest run's temporary root: everything these tests attach,
    including the string form's moment at a temporary directory (``tempfile.tempdir``
    points there). Other mounts on the machine may come and go meanwhile."""
    root = str(_BASETEMP[0]) + "/"
    return [e for e in _mountinfo_entries() if e.mountpoint.startswith(root)]


def _entry_at(path: Path) -> MountEntry:
    """The topmost mount at ``path``."""
    found = [e for e in _mountinfo_entries() if e.mountpoint == str(path)]
    assert found, f"nothing is mounted at {path}"
    return found[-1]


def _is_mounted(path: Path) -> bool:
    return any(e.mountpoint == str(path) for e in _mountinfo_entries())


def _unmount_below(root: Path) -> list[str]:
    """Unmount everything at or below ``root``, innermost first; lazily if busy."""
    prefix = str(root)
    left = [
        e.mountpoint
        for e in _mountinfo_entries()
        if e.mountpoint == prefix or e.mountpoint.startswith(prefix + "/")
    ]
    for path in reversed(left):
        try:
            umount2(path)
        except KernelError:
            try:
                umount2(path, MNT_DETACH)
            except KernelError:
                pass
    return left


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _loop_backing_files() -> dict[str, str]:
    out = {}
    for dev in Path("/sys/block").glob("loop*"):
        try:
            out[dev.name] = (dev / "loop" / "backing_file").read_text().strip()
        except FileNotFoundError:
            continue
    return out


def _loops_under(root: Path, *, settle: float = 5.0) -> dict[str, str]:
    """Loop devices whose backing file lies below ``root``, after waiting up to
    ``settle`` seconds for auto-clearing devices to let go."""
    deadline = time.monotonic() + settle
    while True:
        found = {
            dev: f for dev, f in _loop_backing_files().items() if f.startswith(str(root) + "/")
        }
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _hash_tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every regular file below ``root`` (symlinks not followed): size and sha256."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if p.is_symlink():
                continue
            data = p.read_bytes()
            out[str(p.relative_to(root))] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def _all_xattrs(name: bytes) -> bool:
    return True


def _with_xattrs(e: treecompare.Entry, extra: dict[bytes, bytes]) -> treecompare.Entry:
    return dataclasses.replace(e, xattrs=tuple(sorted({**dict(e.xattrs), **extra}.items())))


def _whiteout_view(snap: dict[bytes, treecompare.Entry]) -> dict[bytes, treecompare.Entry]:
    """What a composefs mount of the tree ``snap`` shows (C 1.0.8 format, kernel 6.7+).

    A whiteout (char device 0:0) becomes an "xattr whiteout": an empty regular file,
    same mode, owner and mtime, carrying ``user.overlay.whiteout`` and (we are root)
    ``trusted.overlay.whiteout``; its directory gets ``*.overlay.opaque="x"`` (holds
    xattr whiteouts) and ``*.overlay.whiteouts``. Everything else is unchanged.
    """
    out = dict(snap)
    parents = set()
    for path, e in snap.items():
        if e.kind == "chardev" and e.rdev == 0:
            out[path] = _with_xattrs(
                dataclasses.replace(e, kind="file", size=0, rdev=None, sha256=EMPTY_SHA256),
                {b"user.overlay.whiteout": b"", b"trusted.overlay.whiteout": b""},
            )
            parents.add(path.rpartition(b"/")[0] or b"/")
    for path in parents:
        out[path] = _with_xattrs(
            out[path],
            {
                b"user.overlay.opaque": b"x",
                b"user.overlay.whiteouts": b"",
                b"trusted.overlay.opaque": b"x",
                b"trusted.overlay.whiteouts": b"",
            },
        )
    return out


def _map_id(value: int, mapping: list[IdMapping]) -> int:
    for m in mapping:
        if m.inside <= value < m.inside + m.count:
            return m.outside + value - m.inside
    return OVERFLOW_ID


_ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
_ACL_USER, _ACL_GROUP = 0x02, 0x08


def _idmapped_acl(value: bytes, uid_map: list[IdMapping], gid_map: list[IdMapping]) -> bytes:
    """A POSIX ACL xattr as an idmapped mount shows it: named users and groups mapped."""
    out = bytearray(value)
    for off in range(4, len(value), 8):
        tag, _perm, ident = struct.unpack_from("<HHI", value, off)
        if tag in (_ACL_USER, _ACL_GROUP):
            mapped = _map_id(ident, uid_map if tag == _ACL_USER else gid_map)
            struct.pack_into("<I", out, off + 4, mapped)
    return bytes(out)


def _idmapped_view(
    snap: dict[bytes, treecompare.Entry], uid_map: list[IdMapping], gid_map: list[IdMapping]
) -> dict[bytes, treecompare.Entry]:
    """What an idmapped mount shows: owners mapped, and the ids in POSIX ACLs."""
    out = {}
    for path, e in snap.items():
        xattrs = tuple(
            (k, _idmapped_acl(v, uid_map, gid_map) if k in _ACL_XATTRS else v) for k, v in e.xattrs
        )
        out[path] = dataclasses.replace(
            e, uid=_map_id(e.uid, uid_map), gid=_map_id(e.gid, gid_map), xattrs=xattrs
        )
    return out


def _assert_same_tree(
    expected: dict[bytes, treecompare.Entry], mounted: dict[bytes, treecompare.Entry]
) -> None:
    problems = treecompare.diff(expected, mounted)
    assert not problems, "the mount differs from its source:\n" + "\n".join(problems)


def _mkcomposefs(reference_bin: Path, src: Path, store: Path, image: Path) -> str:
    """C mkcomposefs --digest-store; returns the image's digest."""
    out = subprocess.run(
        [
            str(reference_bin / "mkcomposefs"),
            f"--digest-store={store}",
            "--print-digest",
            str(src),
            str(image),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    digest = out.strip().split()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", digest), out
    return digest


class Mounts:
    """Mountpoints below one test's ``tmp_path``; see the ``mounts`` fixture."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def attach(self, dm: DetachedMount, name: str = "mnt") -> Path:
        where = self.dir(name)
        with dm:
            dm.attach(where)
        return where

    def mount(self, image: Path | int, name: str = "mnt", **options: object) -> DetachedMount:
        """mount_image + attach at ``name``; returns the (now fd-less) DetachedMount."""
        dm = mount_image(image, MountOptions(**options))  # type: ignore[arg-type]
        self.attach(dm, name)
        return dm


@pytest.fixture
def mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mounts]:
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    try:
        yield Mounts(tmp_path)
    finally:
        _unmount_below(tmp_path)
        _unmount_below(private_tmp)


@dataclasses.dataclass
class App:
    """A small tree with one of everything, imported into a repository and built by C."""

    src: Path
    repo: Repository
    digest: str
    image: Path
    c_image: Path
    c_store: Path
    c_digest: str
    other_digest: str  # a second image of the same repository


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, reference_bin: Path) -> App:
    base = tmp_path_factory.mktemp("app")
    src = base / "src"
    app_tree(src)
    repo = Repository.init(base / "repo")
    assert repo.verity is VerityPolicy.TRY
    result = repo.create_image(src, ref="app", options=CreateOptions(preserve_hardlinks=True))
    other_src = base / "other"
    other_src.mkdir()
    (other_src / "other-file").write_bytes(b"another image" * 100)
    other = repo.create_image(other_src, ref="other")
    c_image, c_store = base / "c.img", base / "c-store"
    c_digest = _mkcomposefs(reference_bin, src, c_store, c_image)
    return App(
        src=src,
        repo=repo,
        digest=result.digest,
        image=repo.image_path(result.digest),
        c_image=c_image,
        c_store=c_store,
        c_digest=c_digest,
        other_digest=other.digest,
    )


def _app_snapshot(app: App) -> dict[bytes, treecompare.Entry]:
    return _whiteout_view(treecompare.snapshot(app.src, _all_xattrs))


# -- 1. generated trees, our images and C's ----------------------------------------------

# Seeds whose trees both writers can store (a few generate more xattr data than an
# inode can hold, which both refuse with ERANGE).
TREES = [
    pytest.param(0, {}, id="seed0"),
    pytest.param(8, {}, id="seed8"),
    pytest.param(10, {"wide_dir": True}, id="seed10-wide"),
    pytest.param(19, {}, id="seed19"),
    pytest.param(5, {"big_files": True, "n_entries": 40}, id="seed5-big"),
]


@pytest.mark.parametrize(("seed", "knobs"), TREES)
def test_generated_tree_mounts_as_its_source(
    seed: int, knobs: dict[str, object], tmp_path: Path, mounts: Mounts, reference_bin: Path
) -> None:
    src = tmp_path / "src"
    gen_tree.generate_tree(random.Random(seed), src, **knobs)
    expected = _whiteout_view(treecompare.snapshot(src, _all_xattrs))
    if knobs.get("big_files"):
        assert any(e.size and e.size >= 1 << 20 for e in expected.values())

    # Our repository image, mounted by digest through the repository.
    repo = Repository.init(tmp_path / "repo")
    result = repo.create_image(src, ref="tree")
    dm = mount_repository_image(repo, "tree")
    assert dm.source == f"composefs:{result.digest}"
    assert (dm.image_check, dm.image_digest) == ("userspace", result.digest)
    ours = mounts.attach(dm, "ours")
    _assert_same_tree(expected, treecompare.snapshot(ours, _all_xattrs))

    # C mkcomposefs --digest-store, mounted from the file with its digest expected.
    c_digest = _mkcomposefs(reference_bin, src, tmp_path / "store", tmp_path / "c.img")
    dm = mounts.mount(
        tmp_path / "c.img",
        "theirs",
        basedirs=[tmp_path / "store"],
        expected_digest=c_digest,
        verity=VerityPolicy.TRY,
    )
    assert dm.source == f"composefs:{c_digest}" and dm.image_check == "userspace"
    theirs = tmp_path / "theirs"
    _assert_same_tree(expected, treecompare.snapshot(theirs, _all_xattrs))

    unmount(ours)
    unmount(theirs)
    assert not _is_mounted(ours) and not _is_mounted(theirs)


def test_app_tree_mounts_from_both_writers(app: App, mounts: Mounts) -> None:
    expected = _app_snapshot(app)
    ours = mounts.attach(mount_repository_image(app.repo, "app"), "ours")
    # Our writer keeps the hardlink (preserve_hardlinks); the tree compare ignores inodes.
    _assert_same_tree(expected, treecompare.snapshot(ours, _all_xattrs))
    mounts.mount(app.c_image, "theirs", basedirs=[app.c_store])
    _assert_same_tree(expected, treecompare.snapshot(mounts.root / "theirs", _all_xattrs))
    # The mount root's metadata comes from the image.
    st = os.stat(ours)
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o755, 1_700_000_000_000_000_001)


# -- 2. basedirs, hardlinks, devices, whiteouts ---------------------------------------------


def _split_store(store: Path, first: Path, second: Path) -> list[str]:
    """Copy ``store`` to ``first`` and move every other object to ``second`` (same XX/
    layout); returns the moved objects' relative paths."""
    shutil.copytree(store, first)
    moved = []
    for i, obj in enumerate(sorted(p for p in first.rglob("*") if p.is_file())):
        if i % 2:
            rel = obj.relative_to(first)
            (second / rel.parent).mkdir(parents=True, exist_ok=True)
            obj.rename(second / rel)
            moved.append(str(rel))
    return moved


def test_objects_split_over_two_basedirs(
    tmp_path: Path, mounts: Mounts, reference_bin: Path
) -> None:
    src = tmp_path / "src"
    gen_tree.generate_tree(random.Random(8), src, devices=False)
    store = tmp_path / "store"
    digest = _mkcomposefs(reference_bin, src, store, tmp_path / "img")
    a, b = tmp_path / "a", tmp_path / "b"
    moved = _split_store(store, a, b)
    assert len(moved) >= 3, "the tree should have a few external files"
    expected = _whiteout_view(treecompare.snapshot(src, _all_xattrs))

    for order, name in (([a, b], "ab"), ([b, a], "ba")):
        mnt = mounts.root / name
        dm = mounts.mount(tmp_path / "img", name, basedirs=order, expected_digest=digest)
        assert dm.image_check == "userspace"
        _assert_same_tree(expected, treecompare.snapshot(mnt, _all_xattrs))
        datadirs = [o.split("=", 1)[1] for o in _entry_at(mnt).super_options if "datadir+" in o]
        assert datadirs == [str(p) for p in order]

    # Without the second basedir, the files whose objects moved cannot be read: the
    # split is real, and both directories were searched above.
    only_a = mounts.root / "only-a"
    mounts.mount(tmp_path / "img", "only-a", basedirs=[a])
    payloads = _payloads(reference_bin, tmp_path / "img")
    unreadable = readable = 0
    for path, payload in payloads.items():
        target = only_a / path.lstrip("/")
        if payload in moved:
            with pytest.raises(OSError):
                target.read_bytes()
            unreadable += 1
        else:
            assert hashlib.sha256(target.read_bytes()).hexdigest() == (
                hashlib.sha256((a / payload).read_bytes()).hexdigest()
            )
            readable += 1
    assert unreadable and readable


def _payloads(reference_bin: Path, image: Path) -> dict[str, str]:
    """path -> object path of every external file, from C composefs-info dump (the
    paths here are plain: devices=False trees still have odd names, so only simple
    lines without escapes are used)."""
    out = subprocess.run(
        [str(reference_bin / "composefs-info"), "dump", str(image)],
        check=True,
        capture_output=True,
    ).stdout
    result = {}
    for line in out.splitlines():
        fields = line.split(b" ")
        if b"\\" in fields[0] or not fields[2].startswith(b"10"):
            continue
        if re.fullmatch(rb"[0-9a-f]{2}/[0-9a-f]{62}", fields[8]):
            result[fields[0].decode()] = fields[8].decode()
    return result


def test_hardlinks_share_an_inode(app: App, mounts: Mounts) -> None:
    mnt = mounts.attach(mount_repository_image(app.repo, "app"))
    a, b = os.lstat(mnt / "hello"), os.lstat(mnt / "hello-hard")
    assert a.st_ino == b.st_ino
    assert a.st_nlink == b.st_nlink == 2
    assert os.lstat(mnt / "big").st_ino != a.st_ino
    assert os.lstat(mnt / "big").st_nlink == 1


def test_hardlinks_of_a_c_image_from_a_dumpfile(
    tmp_path: Path, mounts: Mounts, reference_bin: Path
) -> None:
    store = tmp_path / "store"
    data = random.Random(1).randbytes(9000)
    digest = digest_bytes(data).hex()
    obj = store / digest[:2] / digest[2:]
    obj.parent.mkdir(parents=True)
    obj.write_bytes(data)
    dump = (
        "/ 4096 40755 2 0 0 0 0.0 - - -\n"
        f"/a 9000 100644 3 7 8 0 100.0 {digest[:2]}/{digest[2:]} - {digest}\n"
        "/d 4096 40755 2 0 0 0 0.0 - - -\n"
        "/d/b 0 @100644 - - - - - /a - -\n"
        "/c 0 @100644 - - - - - /a - -\n"
        "/solo 3 100600 1 0 0 0 0.0 - abc -\n"
    )
    (tmp_path / "dump").write_text(dump)
    subprocess.run(
        [str(reference_bin / "mkcomposefs"), "--from-file", "dump", "img"],
        check=True,
        cwd=tmp_path,
    )
    mnt = mounts.root / "mnt"
    mounts.mount(tmp_path / "img", basedirs=[store])
    stats = [os.lstat(mnt / p) for p in ("a", "d/b", "c")]
    assert len({s.st_ino for s in stats}) == 1
    assert [s.st_nlink for s in stats] == [3, 3, 3]
    assert [(s.st_uid, s.st_gid) for s in stats] == [(7, 8)] * 3
    assert all((mnt / p).read_bytes() == data for p in ("a", "d/b", "c"))
    assert os.lstat(mnt / "solo").st_nlink == 1 and (mnt / "solo").read_bytes() == b"abc"


def test_devices_keep_type_and_rdev(app: App, mounts: Mounts) -> None:
    mnt = mounts.attach(mount_repository_image(app.repo, "app"))
    null, blk = os.lstat(mnt / "null"), os.lstat(mnt / "loopdev")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666 and (null.st_uid, null.st_gid) == (0, 5)
    assert stat.S_ISBLK(blk.st_mode) and blk.st_rdev == os.makedev(7, 200)
    assert stat.S_IMODE(blk.st_mode) == 0o660 and (blk.st_uid, blk.st_gid) == (0, 6)
    # The character device is usable through the mount (nodev is not set).
    with open(mnt / "null", "rb") as f:
        assert f.read() == b""


def test_whiteouts_are_xattr_whiteouts_and_hide_lower_names(app: App, mounts: Mounts) -> None:
    cfs = mounts.attach(mount_repository_image(app.repo, "app"), "cfs")
    # In the composefs mount itself: empty regular files marked as whiteouts...
    for name in ("gone", "sub/gone2"):
        st = os.lstat(cfs / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
        assert os.getxattr(cfs / name, "user.overlay.whiteout") == b""
        assert os.getxattr(cfs / name, "trusted.overlay.whiteout") == b""
    # ...in directories that say they hold xattr whiteouts.
    for d in (cfs, cfs / "sub"):
        assert os.getxattr(d, "user.overlay.opaque") == b"x"
        assert os.getxattr(d, "trusted.overlay.opaque") == b"x"
    assert "trusted.overlay.opaque" not in os.listxattr(cfs / "hello")

    # Stacked above a lower directory, the whiteouts hide that directory's names.
    lower = mounts.dir("lower")
    (lower / "sub").mkdir()
    for name in ("gone", "sub/gone2", "kept-below", "sub/kept-below2", "hello"):
        (lower / name).write_text(f"lower {name}")
    stack = mounts.dir("stack")
    with FsContext("overlay") as ov:
        ov.set_string("source", "stacktest")
        ov.set_string("lowerdir", f"{cfs}:{lower}")
        ov.create()
        fd = ov.mount()
    try:
        move_mount(fd, stack)
    finally:
        os.close(fd)
    assert sorted(os.listdir(stack)) == sorted({*os.listdir(cfs), "kept-below"} - {"gone"})
    assert sorted(os.listdir(stack / "sub")) == ["deep", "empty", "kept-below2"]
    assert not os.path.lexists(stack / "gone") and not os.path.lexists(stack / "sub/gone2")
    # The composefs layer is above: its file wins over the lower one of the same name.
    assert (stack / "hello").read_bytes() == (app.src / "hello").read_bytes()
    assert (stack / "kept-below").read_text() == "lower kept-below"


# -- 3. idmapped mounts ----------------------------------------------------------------------


def _foreign_userns(uid_map: str, gid_map: str) -> int:
    """A user namespace made by util-linux unshare (not by composefsd), with these maps
    written from here; returns an fd on it."""
    proc = subprocess.Popen(
        ["unshare", "--user", "sh", "-c", "echo ready; read x"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        Path(f"/proc/{proc.pid}/uid_map").write_text(uid_map)
        Path(f"/proc/{proc.pid}/gid_map").write_text(gid_map)
        fd = os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    assert os.readlink(f"/proc/self/fd/{fd}") != os.readlink("/proc/self/ns/user")
    return fd


SHIFT = parse_mapping("0:100000:65536")


@pytest.mark.parametrize(
    ("how", "layer_mode"),
    [("create_userns", "fd"), ("create_userns", "string"), ("unshare", "fd")],
)
def test_idmap_through_a_userns_fd(how: str, layer_mode: str, app: App, mounts: Mounts) -> None:
    if how == "create_userns":
        userns = create_userns(SHIFT)
    else:
        userns = _foreign_userns("0 100000 65536\n", "0 100000 65536\n")
    try:
        dm = mount_repository_image(
            app.repo,
            "app",
            userns_fd=userns,
            layer_mode=layer_mode,  # type: ignore[arg-type]
        )
    finally:
        os.close(userns)
    assert dm.idmapped and dm.layer_mode == layer_mode
    mnt = mounts.attach(dm)
    expected = _idmapped_view(_app_snapshot(app), SHIFT, SHIFT)
    _assert_same_tree(expected, treecompare.snapshot(mnt, _all_xattrs))
    # Spot checks of the mapping: 0 -> 100000, 1000:2000 -> 101000:102000, and ids
    # beyond the 65536 mapped ones show as the overflow id.
    assert (os.stat(mnt).st_uid, os.stat(mnt).st_gid) == (100000, 100000)
    st = os.stat(mnt / "hello")
    assert (st.st_uid, st.st_gid) == (101000, 102000)
    st = os.stat(mnt / "sub" / "deep")
    assert (st.st_uid, st.st_gid) == (OVERFLOW_ID, OVERFLOW_ID)


def test_idmap_through_uid_and_gid_maps(tmp_path: Path, mounts: Mounts) -> None:
    src = tmp_path / "src"
    gen_tree.generate_tree(random.Random(19), src)
    snap = treecompare.snapshot(src, _all_xattrs)
    uids = sorted({e.uid for e in snap.values()})
    gids = sorted({e.gid for e in snap.values()})
    assert max(uids) >= 1 << 16 and max(gids) >= 1 << 16
    # Every id of the tree is mapped (root has no DAC override on files of unmapped
    # owners, which would make a 0600 file unreadable here): the low ones by one range,
    # each 32-bit one by a line of its own; gids differently from uids.
    uid_map = [IdMapping(0, 100000, 65536)] + [
        IdMapping(v, 200000 + n, 1) for n, v in enumerate(u for u in uids if u >= 65536)
    ]
    gid_map = [IdMapping(0, 3_000_000_000, 65536)] + [
        IdMapping(v, 3_100_000_000 + n, 1) for n, v in enumerate(g for g in gids if g >= 65536)
    ]
    repo = Repository.init(tmp_path / "repo")
    digest = repo.create_image(src, ref="t").digest
    dm = mount_repository_image(repo, "t", uid_map=uid_map, gid_map=gid_map)
    assert dm.idmapped
    mnt = mounts.attach(dm)
    expected = _idmapped_view(_whiteout_view(snap), uid_map, gid_map)
    _assert_same_tree(expected, treecompare.snapshot(mnt, _all_xattrs))
    assert {e.uid for e in expected.values()} & {100000, 200000} == {100000, 200000}
    assert OVERFLOW_ID not in {e.uid for e in expected.values()} | {
        e.gid for e in expected.values()
    }
    assert any(k in _ACL_XATTRS for e in snap.values() for k, _ in e.xattrs), "no ACL to map"

    # gid_map defaults to uid_map.
    mounts.mount(repo.image_path(digest), "same", basedirs=[repo.objects_dir], uid_map=SHIFT)
    root = os.stat(mounts.root / "same")
    assert root.st_uid == _map_id(snap[b"/"].uid, SHIFT)
    assert root.st_gid == _map_id(snap[b"/"].gid, SHIFT)


# -- 4. read-write mounts --------------------------------------------------------------------


@pytest.mark.parametrize("layer_mode", ["fd", "string"])
@pytest.mark.parametrize("as_fds", [False, True], ids=["paths", "fds"])
def test_writable_mount_writes_to_upperdir_only(
    as_fds: bool, layer_mode: str, app: App, tmp_path: Path, mounts: Mounts
) -> None:
    before = _hash_tree(app.repo.objects_dir)
    upper, work = mounts.dir("upper"), mounts.dir("work")
    fds: list[int] = []
    if as_fds:
        fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in (upper, work)]
    try:
        dm = mount_repository_image(
            app.repo,
            "app",
            read_only=False,
            upperdir=fds[0] if fds else upper,
            workdir=fds[1] if fds else work,
            layer_mode=layer_mode,  # type: ignore[arg-type]
        )
    finally:
        for fd in fds:
            os.close(fd)
    assert not dm.read_only and dm.layer_mode == layer_mode
    mnt = mounts.attach(dm)
    assert "rw" in _entry_at(mnt).mount_options
    [listed] = [m for m in list_mounts() if m.mountpoint == str(mnt)]
    assert not listed.read_only and listed.upperdir is not None
    if layer_mode == "fd":
        assert listed.upperdir == str(upper)
    else:
        assert re.fullmatch(r"/proc/self/fd/\d+", listed.upperdir)

    (mnt / "new-file").write_bytes(b"fresh")
    (mnt / "new-dir").mkdir()
    with open(mnt / "hello", "ab") as f:  # copy-up of an external file's data
        f.write(b"+appended")
    os.chmod(mnt / "inline", 0o600)  # metadata-only copy-up
    os.unlink(mnt / "big")
    os.setxattr(mnt / "sub" / "deep", b"user.added", b"1")

    hello = (app.src / "hello").read_bytes() + b"+appended"
    assert (mnt / "hello").read_bytes() == hello
    assert not (mnt / "big").exists()
    assert (upper / "new-file").read_bytes() == b"fresh" and (upper / "new-dir").is_dir()
    assert (upper / "hello").read_bytes() == hello
    assert stat.S_IMODE(os.lstat(upper / "inline").st_mode) == 0o600
    wh = os.lstat(upper / "big")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0  # a whiteout in the upper layer
    unmount(mnt)

    # The image and every object are exactly as before.
    assert _hash_tree(app.repo.objects_dir) == before
    # The upper layer survives, and mounting it again shows the changes.
    mounts.attach(mount_repository_image(app.repo, "app", upperdir=upper, workdir=work), "again")
    again = mounts.root / "again"
    assert (again / "hello").read_bytes() == hello and not (again / "big").exists()


def test_read_only_by_default_and_when_asked(app: App, mounts: Mounts) -> None:
    dm = mount_repository_image(app.repo, "app")
    assert dm.read_only
    mnt = mounts.attach(dm)
    assert "ro" in _entry_at(mnt).mount_options
    attempts: list[Callable[[], object]] = [
        lambda: (mnt / "new").write_bytes(b"x"),
        lambda: os.open(mnt / "hello", os.O_WRONLY | os.O_APPEND),
        lambda: os.chmod(mnt / "inline", 0o600),
        lambda: os.unlink(mnt / "big"),
        lambda: os.mkdir(mnt / "d"),
        lambda: os.setxattr(mnt / "hello", b"user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    # An upperdir with read_only=True: still read-only, and the upper stays empty.
    upper, work = mounts.dir("upper"), mounts.dir("work")
    dm = mount_repository_image(app.repo, "app", upperdir=upper, workdir=work, read_only=True)
    assert dm.read_only
    ro = mounts.attach(dm, "ro-upper")
    with pytest.raises(OSError) as info:
        (ro / "new").write_bytes(b"x")
    assert info.value.errno == errno.EROFS
    assert os.listdir(upper) == []


# -- 5. layer forms and backings ---------------------------------------------------------------


@pytest.mark.parametrize("backing", ["file", "loop"])
@pytest.mark.parametrize("layer_mode", ["fd", "string"])
def test_layer_forms_and_backings(
    layer_mode: str, backing: str, app: App, mounts: Mounts, tmp_path: Path
) -> None:
    loops_before = set(_loop_backing_files())
    dm = mount_image(
        app.image,
        MountOptions(
            basedirs=[app.repo.objects_dir],
            layer_mode=layer_mode,  # type: ignore[arg-type]
            backing=backing,  # type: ignore[arg-type]
            name=app.digest,
        ),
    )
    assert (dm.layer_mode, dm.backing) == (layer_mode, backing)
    mnt = mounts.attach(dm)
    entry = _entry_at(mnt)
    assert entry.fstype == "overlay" and entry.source == f"composefs:{app.digest}"
    opts = entry.super_options
    if layer_mode == "fd":
        assert "lowerdir+=/" in opts
        assert f"datadir+={app.repo.objects_dir}" in opts
        assert not any(o.startswith("lowerdir=") for o in opts)
    else:
        [lower] = [o for o in opts if o.startswith("lowerdir=")]
        assert re.fullmatch(r"lowerdir=/proc/self/fd/\d+::/proc/self/fd/\d+", lower), lower
        assert not any(o.startswith(("lowerdir+", "datadir+")) for o in opts)
    assert {"metacopy=on", "redirect_dir=on"} <= set(opts)
    _assert_same_tree(_app_snapshot(app), treecompare.snapshot(mnt, _all_xattrs))

    # No EROFS attached (string form: its moment at a temporary directory is over),
    # and no temporary directory left.
    assert not [e for e in _our_mounts() if e.fstype == "erofs"]
    assert os.listdir(tempfile.gettempdir()) == []
    image_file = os.path.realpath(app.image)
    in_use = {dev for dev, f in _loop_backing_files().items() if f == image_file}
    if backing == "loop":
        assert len(in_use) == 1 and in_use.isdisjoint(loops_before)
    else:
        assert not in_use
    unmount(mnt)
    assert not _loops_under(_BASETEMP[0]), "the loop device did not clear itself"


@pytest.mark.parametrize("forced", ["fd", "string"])
def test_layer_form_forced_through_the_environment(
    forced: str, app: App, mounts: Mounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LAYER_MODE_ENV, forced)
    probe_layer_mode.cache_clear()
    try:
        assert probe_layer_mode() == forced
        dm = mount_repository_image(app.repo, "app")
        assert dm.layer_mode == forced
        mnt = mounts.attach(dm)
        opts = _entry_at(mnt).super_options
        if forced == "fd":
            assert f"datadir+={app.repo.objects_dir}" in opts
        else:
            assert any(o.startswith("lowerdir=/proc/self/fd/") for o in opts)
        assert (mnt / "hello").read_bytes() == (app.src / "hello").read_bytes()
        assert os.listdir(tempfile.gettempdir()) == []
    finally:
        monkeypatch.delenv(LAYER_MODE_ENV)
        probe_layer_mode.cache_clear()


def test_probe_picks_the_fd_form_on_this_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAYER_MODE_ENV, raising=False)
    probe_layer_mode.cache_clear()
    fds = _fds()
    try:
        assert probe_layer_mode() == "fd", f"kernel {os.uname().release} is 6.15+"
    finally:
        probe_layer_mode.cache_clear()
    assert _fds() == fds


# -- 6. verity policies on a kernel without fs-verity -----------------------------------------


def test_required_with_digest_refuses_an_image_without_verity(app: App, mounts: Mounts) -> None:
    fds, before = _fds(), _our_mounts()
    with pytest.raises(ImageVerityError) as info:
        mount_image(
            app.image,
            MountOptions(
                basedirs=[app.repo.objects_dir],
                verity=VerityPolicy.REQUIRED,
                expected_digest=app.digest,
            ),
        )
    err = info.value
    assert err.reason == NO_VERITY and err.errno == errno.ENOTTY
    assert str(err).startswith(f"Image has no fs-verity: {app.image}")
    # The repository mount (which always expects the image's digest) says the same.
    with pytest.raises(ImageVerityError) as info:
        mount_repository_image(app.repo, "app", verity=VerityPolicy.REQUIRED)
    assert info.value.reason == NO_VERITY
    assert _fds() == fds and _our_mounts() == before
    assert os.listdir(tempfile.gettempdir()) == []


def test_required_without_digest_demands_verity_of_the_objects(app: App, mounts: Mounts) -> None:
    dm = mounts.mount(app.image, basedirs=[app.repo.objects_dir], verity=VerityPolicy.REQUIRED)
    assert (dm.image_check, dm.image_digest, dm.object_verity) == ("none", None, True)
    assert dm.source == "composefs"
    mnt = mounts.root / "mnt"
    assert "verity=require" in _entry_at(mnt).super_options
    [listed] = [m for m in list_mounts() if m.mountpoint == str(mnt)]
    assert listed.verity == "require"
    # The kernel's documented behaviour without fs-verity: external files give EIO...
    for name in ("hello", "big", "sub/deep"):
        with pytest.raises(OSError) as info:
            (mnt / name).read_bytes()
        assert info.value.errno == errno.EIO, name
    # ...while metadata and inline data come from the image alone.
    assert (mnt / "inline").read_bytes() == b"tiny\n"
    assert os.stat(mnt / "hello").st_size == 5000
    assert os.readlink(mnt / "link") == "hello"


def test_try_checks_the_image_in_userspace(app: App, mounts: Mounts) -> None:
    dm = mounts.mount(
        app.image,
        basedirs=[app.repo.objects_dir],
        verity=VerityPolicy.TRY,
        expected_digest=app.digest.upper(),
    )
    assert (dm.image_check, dm.image_digest, dm.object_verity) == (
        "userspace",
        app.digest,
        False,
    )
    assert dm.source == f"composefs:{app.digest}"
    assert any("userspace" in n for n in dm.notes)
    mnt = mounts.root / "mnt"
    assert not any(o.startswith("verity=") for o in _entry_at(mnt).super_options)
    _assert_same_tree(_app_snapshot(app), treecompare.snapshot(mnt, _all_xattrs))
    # Without an expected digest the image is not checked at all.
    dm = mounts.mount(
        app.image, "nodigest", basedirs=[app.repo.objects_dir], verity=VerityPolicy.TRY
    )
    assert (dm.image_check, dm.image_digest, dm.object_verity) == ("none", None, False)
    assert (mounts.root / "nodigest" / "big").read_bytes() == (app.src / "big").read_bytes()


def test_repository_mount_under_try_and_disabled(app: App, mounts: Mounts) -> None:
    for policy in (VerityPolicy.TRY, VerityPolicy.DISABLED):
        dm = mount_repository_image(app.repo, "app", verity=policy)
        assert (dm.image_check, dm.image_digest, dm.object_verity) == (
            "userspace",
            app.digest,
            False,
        )
        mnt = mounts.attach(dm, f"mnt-{policy.value}")
        assert (mnt / "big").read_bytes() == (app.src / "big").read_bytes()


def test_disabled_mounts_with_and_without_digest(app: App, mounts: Mounts) -> None:
    dm = mounts.mount(app.c_image, "a", basedirs=[app.c_store])
    assert (dm.image_check, dm.object_verity, dm.notes) == ("none", False, [])
    dm = mounts.mount(app.c_image, "b", basedirs=[app.c_store], expected_digest=app.c_digest)
    assert (dm.image_check, dm.image_digest) == ("userspace", app.c_digest)
    for name in ("a", "b"):
        mnt = mounts.root / name
        assert not any(o.startswith("verity=") for o in _entry_at(mnt).super_options)
        _assert_same_tree(_app_snapshot(app), treecompare.snapshot(mnt, _all_xattrs))


def test_disabled_never_asks_fs_verity_for_the_image_digest(
    app: App, mounts: Mounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (found by tests/test_verity.py on a kernel with fs-verity): Disabled
    took the kernel's measurement where the image had fs-verity. It hashes in
    userspace, as the README and the IDL say; Try takes the kernel's word.
    A stand-in for FS_IOC_MEASURE_VERITY plays the kernel that has it."""
    import composefsd.kernel.verity as fsverity_mod

    asked: list[int] = []

    def measured(fd: int, *args: object, **kwargs: object) -> bytes:
        asked.append(fd)
        return bytes.fromhex(app.digest)

    monkeypatch.setattr(fsverity_mod, "measure_verity", measured)
    common = {"basedirs": [app.repo.objects_dir], "expected_digest": app.digest}
    dm = mounts.mount(app.image, "disabled", verity=VerityPolicy.DISABLED, **common)
    assert (dm.image_check, dm.image_digest, dm.object_verity) == ("userspace", app.digest, False)
    assert asked == [] and dm.notes == []
    dm = mounts.mount(app.image, "try", verity=VerityPolicy.TRY, **common)
    assert (dm.image_check, dm.image_digest) == ("kernel", app.digest)
    assert asked


@pytest.mark.parametrize("policy", list(VerityPolicy))
def test_wrong_expected_digest_refuses_every_policy(
    policy: VerityPolicy, app: App, mounts: Mounts
) -> None:
    fds, before = _fds(), _our_mounts()
    wrong = app.other_digest  # a real image's digest, just not this one's
    with pytest.raises(ImageVerityError) as info:
        mount_image(
            app.image,
            MountOptions(basedirs=[app.repo.objects_dir], verity=policy, expected_digest=wrong),
        )
    if policy is VerityPolicy.REQUIRED:
        # Required wants the kernel's measurement, which this kernel cannot give: the
        # refusal comes before any comparison (as C mount.composefs).
        assert info.value.reason == NO_VERITY
    else:
        assert info.value.reason == WRONG_VERITY and info.value.errno == errno.EILSEQ
        assert app.digest in str(info.value) and wrong in str(info.value)

    # Repository mounts: an expected digest naming another image is refused before
    # the image is touched, under every policy.
    for name in ("app", "refs/app", app.digest, f"sha256:{app.digest}"):
        with pytest.raises(ImageVerityError) as info:
            mount_repository_image(app.repo, name, verity=policy, expected_digest=wrong)
        assert info.value.reason == WRONG_VERITY
        assert app.digest in str(info.value) and wrong in str(info.value)
    assert _fds() == fds and _our_mounts() == before


@pytest.mark.parametrize("policy", list(VerityPolicy))
def test_swapped_repository_image_is_refused(
    policy: VerityPolicy, tmp_path: Path, mounts: Mounts
) -> None:
    repo = Repository.init(tmp_path / "repo")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"a" * 100)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_bytes(b"b" * 100)
    a = repo.create_image(tmp_path / "a", ref="a").digest
    b = repo.create_image(tmp_path / "b", ref="b").digest
    image_a = Path(os.path.realpath(repo.image_path(a)))
    image_a.chmod(0o644)
    image_a.write_bytes(Path(repo.image_path(b)).read_bytes())
    with pytest.raises(ImageVerityError) as info:
        mount_repository_image(repo, "a", verity=policy)
    expected_reason = NO_VERITY if policy is VerityPolicy.REQUIRED else WRONG_VERITY
    assert info.value.reason == expected_reason
    assert not [m for m in list_mounts() if m.digest in (a, b)]


@pytest.mark.parametrize(
    "digest",
    ["zz", "0" * 63, "0" * 65, "g" * 64, "0" * 128, "", "0x" + "0" * 62],
)
def test_malformed_expected_digest(digest: str, app: App) -> None:
    with pytest.raises(MountError) as info:
        mount_image(
            app.image, MountOptions(basedirs=[app.repo.objects_dir], expected_digest=digest)
        )
    assert not isinstance(info.value, ImageVerityError)
    assert info.value.errno == errno.EINVAL
    assert f"expected digest {digest!r} is not a sha256 digest" in str(info.value)


# -- 7. hostile input --------------------------------------------------------------------------


def _flip(data: bytes, start: int, length: int) -> bytes:
    out = bytearray(data)
    for i in range(start, start + length):
        out[i] ^= 0x5A
    return bytes(out)


@pytest.fixture(scope="module")
def bad(app: App, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Damaged copies of the app image, a directory, a file, a missing path."""
    base = tmp_path_factory.mktemp("bad")
    data = app.image.read_bytes()
    assert len(data) % 4096 == 0 and len(data) >= 8192
    root_nid = struct.unpack_from("<H", data, 1024 + 14)[0]
    meta_blkaddr = struct.unpack_from("<I", data, 1024 + 40)[0]
    root_inode = meta_blkaddr * 4096 + root_nid * 32
    assert root_inode >= 1024 + 128, "the inode area starts after the superblock"
    variants = {
        "truncated-half": data[: len(data) // 2],
        "truncated-1": data[:-1],
        "header-magic": _flip(data, 0, 4),
        "superblock-magic": _flip(data, 1024, 4),
        "garbage": random.Random(3).randbytes(len(data)),
        "empty": b"",
        "short": data[:100],
        "longer": data + bytes(4096),
        "inodes": _flip(data, root_inode, 64),
    }
    out = {}
    for name, content in variants.items():
        out[name] = base / name
        out[name].write_bytes(content)
    out["dir"] = base / "a-dir"
    out["dir"].mkdir()
    out["file"] = base / "a-file"
    out["file"].write_text("")
    out["missing"] = base / "missing"
    return out


def _expect_mount_error(
    image: Path | int, options: MountOptions, err: int, *fragments: str
) -> MountError:
    fds, before = _fds(), _our_mounts()
    with pytest.raises(MountError) as info:
        mount_image(image, options)
    e = info.value
    assert e.errno == err, f"{errno.errorcode.get(e.errno or 0)}: {e}"
    for fragment in fragments:
        assert fragment in str(e), f"{fragment!r} not in {str(e)!r}"
    assert _fds() == fds, "an fd leaked"
    assert _our_mounts() == before, "a mount leaked"
    assert os.listdir(tempfile.gettempdir()) == []
    return e


@pytest.mark.parametrize(
    ("variant", "fragments"),
    [
        ("truncated-half", ["is not a usable composefs image", "image is truncated"]),
        ("truncated-1", ["image is truncated", "the file has"]),
        ("header-magic", ["bad composefs magic"]),
        ("superblock-magic", ["bad EROFS superblock magic"]),
        ("garbage", ["is not a usable composefs image", "magic"]),
        ("empty", ["image is 0 bytes, smaller than one 4096-byte block"]),
        ("short", ["image is 100 bytes"]),
        ("longer", ["longer than its superblock says"]),
    ],
)
def test_damaged_images_are_refused(
    variant: str, fragments: list[str], bad: dict[str, Path], app: App, mounts: Mounts
) -> None:
    e = _expect_mount_error(
        bad[variant], MountOptions(basedirs=[app.repo.objects_dir]), errno.EINVAL, *fragments
    )
    assert str(bad[variant]) in str(e)


def test_not_an_image_file(bad: dict[str, Path], app: App, mounts: Mounts) -> None:
    opts = MountOptions(basedirs=[app.repo.objects_dir])
    _expect_mount_error(bad["dir"], opts, errno.EINVAL, f"image {bad['dir']} is not a regular file")
    _expect_mount_error(bad["missing"], opts, errno.ENOENT, f"cannot open image {bad['missing']}")
    fd = os.open(bad["dir"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        _expect_mount_error(fd, opts, errno.EINVAL, f"image fd {fd} is not a regular file")
    finally:
        os.close(fd)


@pytest.mark.parametrize("policy", list(VerityPolicy))
def test_corrupted_inodes_fail_the_digest_check(
    policy: VerityPolicy, bad: dict[str, Path], app: App, mounts: Mounts
) -> None:
    opts = MountOptions(basedirs=[app.repo.objects_dir], verity=policy, expected_digest=app.digest)
    if policy is VerityPolicy.REQUIRED:
        _expect_mount_error(bad["inodes"], opts, errno.ENOTTY, NO_VERITY)
    else:
        e = _expect_mount_error(bad["inodes"], opts, errno.EILSEQ, WRONG_VERITY, app.digest)
        assert isinstance(e, ImageVerityError) and e.reason == WRONG_VERITY


def test_bad_basedirs(bad: dict[str, Path], app: App, mounts: Mounts) -> None:
    img = app.image
    objs = app.repo.objects_dir
    _expect_mount_error(img, MountOptions(basedirs=[]), errno.EINVAL, "no basedir given")
    _expect_mount_error(
        img,
        MountOptions(basedirs=[objs, bad["missing"]]),
        errno.ENOENT,
        f"basedir {bad['missing']}: No such file or directory",
    )
    _expect_mount_error(
        img,
        MountOptions(basedirs=[bad["file"]]),
        errno.ENOTDIR,
        f"basedir {bad['file']}: Not a directory",
    )
    fd = os.open(bad["file"], os.O_RDONLY)
    try:
        _expect_mount_error(
            img, MountOptions(basedirs=[fd]), errno.ENOTDIR, f"basedir (fd {fd}) is not a directory"
        )
    finally:
        os.close(fd)


def test_bad_mountpoints(app: App, bad: dict[str, Path], mounts: Mounts) -> None:
    before = _our_mounts()
    for where, err, text in [
        (bad["file"], errno.ENOTDIR, f"mountpoint {bad['file']} is not a directory"),
        (bad["missing"], errno.ENOENT, f"mountpoint {bad['missing']}: No such file or directory"),
    ]:
        fds = _fds()
        dm = mount_repository_image(app.repo, "app")
        with dm, pytest.raises(MountError) as info:
            dm.attach(where)
        assert info.value.errno == err and str(info.value) == text
        assert dm.fd == -1
        assert _fds() == fds
    assert _our_mounts() == before


def test_upper_and_work_must_come_together(app: App, tmp_path: Path, mounts: Mounts) -> None:
    objs = [app.repo.objects_dir]
    for opts in (
        MountOptions(basedirs=objs, upperdir=tmp_path),
        MountOptions(basedirs=objs, workdir=tmp_path),
    ):
        _expect_mount_error(
            app.image, opts, errno.EINVAL, "upperdir and workdir must be given together"
        )
    _expect_mount_error(
        app.image,
        MountOptions(basedirs=objs, upperdir=tmp_path / "nope", workdir=tmp_path),
        errno.ENOENT,
        f"upperdir {tmp_path / 'nope'}",
    )
    # Both given, but overlayfs would refuse the pair with a bare EINVAL (its
    # reason goes to dmesg only): checked first, with a message saying why.
    (tmp_path / "up" / "work").mkdir(parents=True)
    (tmp_path / "w2").mkdir()
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        for upper, work, message in (
            (tmp_path / "up", tmp_path / "up" / "work", "is inside upperdir"),
            (tmp_path / "up" / "work", tmp_path / "up", "upperdir"),
            (tmp_path / "w2", tmp_path / "w2", "upperdir and workdir are the same directory"),
            (tmp_path / "w2", shm, "upperdir and workdir must be on the same filesystem"),
        ):
            for layer_mode in ("fd", "string"):
                _expect_mount_error(
                    app.image,
                    MountOptions(
                        basedirs=objs, upperdir=upper, workdir=work, layer_mode=layer_mode
                    ),
                    errno.EINVAL,
                    message,
                )
    finally:
        shm.rmdir()


def test_bad_id_mappings(app: App, bad: dict[str, Path], mounts: Mounts) -> None:
    objs = [app.repo.objects_dir]
    for uid_map, text in [
        (
            [IdMapping(0, 100000, 10), IdMapping(5, 200000, 10)],
            "bad id mapping: uid mapping has overlapping inside ranges",
        ),
        ([], "bad id mapping: uid mapping is empty"),
        (
            [IdMapping(0, 100, 10), IdMapping(10, 105, 10)],
            "bad id mapping: uid mapping has overlapping outside ranges",
        ),
        # Valid to our checks, refused by the kernel (the range wraps its u32 ids).
        ([IdMapping(1, 1, 2**32 - 1)], "cannot create the idmap user namespace"),
    ]:
        _expect_mount_error(
            app.image, MountOptions(basedirs=objs, uid_map=uid_map), errno.EINVAL, text
        )
    _expect_mount_error(
        app.image,
        MountOptions(
            basedirs=objs, uid_map=SHIFT, gid_map=[IdMapping(0, 1, 2), IdMapping(1, 9, 1)]
        ),
        errno.EINVAL,
        "bad id mapping: gid mapping has overlapping inside ranges",
    )
    _expect_mount_error(
        app.image,
        MountOptions(basedirs=objs, uid_map=SHIFT, userns_fd=0),
        errno.EINVAL,
        "give either a user namespace fd or an id mapping, not both",
    )
    fd = os.open(bad["file"], os.O_RDONLY)
    try:
        _expect_mount_error(
            app.image,
            MountOptions(basedirs=objs, userns_fd=fd),
            errno.EINVAL,
            f"cannot idmap the mount of {app.image}",
        )
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["a b", "a,b", "a\\b", "a\tb", "a\nb"])
def test_bad_mount_names(name: str, app: App, mounts: Mounts) -> None:
    _expect_mount_error(
        app.image,
        MountOptions(basedirs=[app.repo.objects_dir], name=name),
        errno.EINVAL,
        "has whitespace, a comma or a backslash",
    )


# -- 8. a thousand failed attempts leak nothing ---------------------------------------------


def test_a_thousand_failed_mounts_leak_nothing(
    app: App, bad: dict[str, Path], tmp_path: Path, mounts: Mounts
) -> None:
    objs = app.repo.objects_dir
    upper = tmp_path / "up"
    (upper / "work").mkdir(parents=True)
    notdir = bad["file"]

    def attempt(image: Path, **kw: object) -> Callable[[], None]:
        def run() -> None:
            mount_image(image, MountOptions(**{"basedirs": [objs], **kw}))  # type: ignore[arg-type]

        return run

    def attach_to_file(**kw: object) -> Callable[[], None]:
        def run() -> None:
            with mount_image(app.image, MountOptions(basedirs=[objs], **kw)) as dm:  # type: ignore[arg-type]
                dm.attach(notdir)

        return run

    def bad_userns() -> None:
        fd = os.open(notdir, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mount_image(app.image, MountOptions(basedirs=[objs], userns_fd=fd))
        finally:
            os.close(fd)

    img = app.image
    refused_pair = {"upperdir": upper, "workdir": upper / "work"}  # workdir inside upperdir
    # (kind, weight, attempt, errno): cheap refusals mostly, and a fair share of the
    # failures that come after something was mounted, attached, forked or looped.
    kinds: list[tuple[str, int, Callable[[], None], int]] = [
        ("truncated", 12, attempt(bad["truncated-half"]), errno.EINVAL),
        ("header-magic", 10, attempt(bad["header-magic"]), errno.EINVAL),
        ("sb-magic", 10, attempt(bad["superblock-magic"]), errno.EINVAL),
        ("garbage", 6, attempt(bad["garbage"]), errno.EINVAL),
        ("empty", 6, attempt(bad["empty"]), errno.EINVAL),
        ("dir-image", 4, attempt(bad["dir"]), errno.EINVAL),
        ("missing-image", 4, attempt(bad["missing"]), errno.ENOENT),
        ("missing-basedir", 8, attempt(img, basedirs=[objs, bad["missing"]]), errno.ENOENT),
        ("file-basedir", 6, attempt(img, basedirs=[notdir]), errno.ENOTDIR),
        ("upper-alone", 4, attempt(img, upperdir=upper), errno.EINVAL),
        ("malformed-digest", 4, attempt(img, expected_digest="xyz"), errno.EINVAL),
        ("wrong-digest", 6, attempt(img, expected_digest=app.other_digest), errno.EILSEQ),
        (
            "corrupt-inodes",
            4,
            attempt(bad["inodes"], expected_digest=app.digest, verity=VerityPolicy.TRY),
            errno.EILSEQ,
        ),
        (
            "no-verity",
            4,
            attempt(img, expected_digest=app.digest, verity=VerityPolicy.REQUIRED),
            errno.ENOTTY,
        ),
        (
            "overlapping-map",
            3,
            attempt(img, uid_map=[IdMapping(0, 9, 5), IdMapping(1, 99, 5)]),
            errno.EINVAL,
        ),
        ("kernel-refused-map", 3, attempt(img, uid_map=[IdMapping(1, 1, 2**32 - 1)]), errno.EINVAL),
        ("bad-userns", 4, bad_userns, errno.EINVAL),
        ("overlay-fd", 4, attempt(img, layer_mode="fd", **refused_pair), errno.EINVAL),
        ("overlay-string", 4, attempt(img, layer_mode="string", **refused_pair), errno.EINVAL),
        (
            "overlay-loop",
            3,
            attempt(img, layer_mode="string", backing="loop", **refused_pair),
            errno.EINVAL,
        ),
        ("attach-fd", 4, attach_to_file(layer_mode="fd"), errno.ENOTDIR),
        ("attach-loop", 3, attach_to_file(layer_mode="string", backing="loop"), errno.ENOTDIR),
    ]
    rng = random.Random(1000)
    plan = rng.choices(range(len(kinds)), [k[1] for k in kinds], k=1000)
    for i in range(len(kinds)):  # every kind at least once
        plan[i] = i

    def child() -> dict[str, object]:
        mountinfo, fds = Path("/proc/self/mountinfo").read_text(), sorted(_fds())
        start = time.monotonic()
        counts: dict[str, int] = {}
        wrong: list[str] = []
        for index in plan:
            kind, _weight, run, err = kinds[index]
            try:
                run()
            except MountError as e:
                counts[kind] = counts.get(kind, 0) + 1
                if e.errno != err:
                    wrong.append(f"{kind}: {e.errno} {e}")
            else:
                wrong.append(f"{kind}: mounted")
        children = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()
        return {
            "seconds": time.monotonic() - start,
            "counts": counts,
            "wrong": wrong[:10],
            "mountinfo_same": Path("/proc/self/mountinfo").read_text() == mountinfo,
            "fds_before": fds,
            "fds_after": sorted(_fds()),
            "children": children,
            "tmpdir": os.listdir(tempfile.gettempdir()),
        }

    assert not _loops_under(_BASETEMP[0])
    result = in_private_mount_namespace(child)
    assert result["wrong"] == []
    counts = result["counts"]
    assert isinstance(counts, dict) and sum(counts.values()) == 1000
    assert set(counts) == {k[0] for k in kinds}
    assert result["mountinfo_same"], "a failed attempt left a mount behind"
    assert result["fds_after"] == result["fds_before"], "a failed attempt leaked an fd"
    assert result["children"] == [], "an idmap helper process was not reaped"
    assert result["tmpdir"] == [], "a temporary .composefs.* directory was left"
    assert not _loops_under(_BASETEMP[0]), "a loop device was left"
    seconds = result["seconds"]
    assert isinstance(seconds, float) and seconds < 20, f"{seconds:.1f} s for 1000 attempts"


def test_successful_mounts_hold_one_fd_each(app: App, mounts: Mounts) -> None:
    fds, before = _fds(), _our_mounts()
    for layer_mode in ("fd", "string"):
        for _ in range(25):
            dm = mount_repository_image(app.repo, "app", layer_mode=layer_mode)
            assert _fds() == fds | {str(dm.fd)}
            dm.close()
            assert dm.fd == -1
    assert _fds() == fds and _our_mounts() == before
    assert os.listdir(tempfile.gettempdir()) == []


# -- 9. unmount and the mount listings --------------------------------------------------------


def test_unmount_refuses_what_is_not_composefs(app: App, mounts: Mounts) -> None:
    tmpfs = mounts.dir("tmpfs")
    with FsContext("tmpfs") as ctx:
        ctx.create()
        fd = ctx.mount()
    try:
        move_mount(fd, tmpfs)
    finally:
        os.close(fd)
    plain_overlay = mounts.dir("overlay")
    lower = mounts.dir("lower")
    with FsContext("overlay") as ov:
        ov.set_string("source", "overlay")
        ov.set_string("lowerdir", f"{lower}:{app.src}")
        ov.create()
        fd = ov.mount()
    try:
        move_mount(fd, plain_overlay)
    finally:
        os.close(fd)
    for path in (tmpfs, plain_overlay, mounts.dir("plain"), mounts.root / "missing"):
        with pytest.raises(MountError) as info:
            unmount(path)
        assert info.value.errno == errno.EINVAL
        assert str(info.value) == f"{path} is not a composefs mount point"
    assert _is_mounted(tmpfs) and _is_mounted(plain_overlay)


def test_busy_mount_and_lazy_unmount(app: App, mounts: Mounts) -> None:
    mnt = mounts.attach(mount_repository_image(app.repo, "app"))
    with open(mnt / "big", "rb") as f:
        with pytest.raises(MountError) as info:
            unmount(mnt)
        assert info.value.errno == errno.EBUSY
        assert "busy" in str(info.value) and str(mnt) in str(info.value)
        assert "lazy" in str(info.value)
        assert _is_mounted(mnt)
        gone = unmount(mnt, lazy=True)
        assert gone.mountpoint == str(mnt) and gone.digest == app.digest
        assert not _is_mounted(mnt)
        assert not [m for m in list_mounts() if m.mountpoint == str(mnt)]
        # The open file still reads from the detached mount.
        assert f.read() == (app.src / "big").read_bytes()
    # A cwd inside the mount makes it busy too.
    mounts.attach(mount_repository_image(app.repo, "app"))
    old = os.getcwd()
    os.chdir(mnt / "sub")
    try:
        with pytest.raises(MountError) as info:
            unmount(mnt)
        assert info.value.errno == errno.EBUSY
    finally:
        os.chdir(old)
    unmount(mnt)
    assert not _is_mounted(mnt)


def test_unmount_stacked_mounts_one_at_a_time(app: App, mounts: Mounts) -> None:
    mnt = mounts.attach(mount_repository_image(app.repo, "app"))
    mounts.attach(mount_repository_image(app.repo, "other"))  # on top, same place
    assert sorted(os.listdir(mnt)) == ["other-file"]
    link = mounts.root / "link"
    link.symlink_to(mnt)
    first = unmount(link)  # through a symlink: the real path is unmounted
    assert first.digest == app.other_digest
    assert "hello" in os.listdir(mnt)
    second = unmount(mnt)
    assert second.digest == app.digest and second.mount_id != first.mount_id
    assert not _is_mounted(mnt)


def test_mount_listings(app: App, tmp_path: Path, mounts: Mounts) -> None:
    fd_mnt = mounts.attach(mount_repository_image(app.repo, "app", layer_mode="fd"), "by-fd")
    str_mnt = mounts.attach(
        mount_repository_image(app.repo, f"sha256:{app.digest}", layer_mode="string"), "by-string"
    )
    other = mounts.attach(mount_repository_image(app.repo, "other"), "other")
    c_mnt = mounts.root / "c"
    mounts.mount(app.c_image, "c", basedirs=[app.c_store])
    # A second repository with its own image.
    repo2 = Repository.init(tmp_path / "repo2")
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "x").write_bytes(b"repo two" * 50)
    d2 = repo2.create_image(tmp_path / "t2", ref="x").digest
    r2_mnt = mounts.attach(mount_repository_image(repo2, "x"), "repo2")

    listed = {m.mountpoint: m for m in list_mounts() if m.mountpoint.startswith(str(tmp_path))}
    assert set(listed) == {str(p) for p in (fd_mnt, str_mnt, other, c_mnt, r2_mnt)}
    for path, digest in (
        (fd_mnt, app.digest),
        (str_mnt, app.digest),
        (other, app.other_digest),
        (r2_mnt, d2),
    ):
        m = listed[str(path)]
        assert (m.source, m.name, m.digest) == (f"composefs:{digest}", digest, digest)
        assert m.read_only and m.verity == "off" and m.upperdir is None
    assert listed[str(fd_mnt)].datadirs == (str(app.repo.objects_dir),)
    assert re.fullmatch(r"/proc/self/fd/\d+", listed[str(str_mnt)].datadirs[0])
    c = listed[str(c_mnt)]
    assert (c.source, c.name, c.digest) == ("composefs", "", None)

    mine = {m.mountpoint for m in repository_mounts(app.repo)}
    assert {str(fd_mnt), str(str_mnt), str(other)} <= mine
    assert not mine & {str(c_mnt), str(r2_mnt)}
    assert mounted_images(app.repo) >= {app.digest, app.other_digest}
    assert d2 not in mounted_images(app.repo)
    assert {m.mountpoint for m in repository_mounts(repo2)} == {str(r2_mnt)}
    assert mounted_images(repo2) == {d2}

    unmount(fd_mnt)
    assert app.digest in mounted_images(app.repo)  # still mounted by string form
    unmount(str_mnt)
    assert app.digest not in mounted_images(app.repo)
    assert app.other_digest in mounted_images(app.repo)


# -- the DetachedMount object --------------------------------------------------------------------


def test_detached_mount_object(app: App, mounts: Mounts) -> None:
    before = _our_mounts()
    # Closed without attaching: nothing was ever visible.
    with mount_repository_image(app.repo, "app") as dm:
        assert dm.fd >= 0
    assert dm.fd == -1 and _our_mounts() == before
    with pytest.raises(MountError) as info:
        dm.attach(mounts.dir("never"))
    assert info.value.errno == errno.EBADF
    # The fd can be taken and attached elsewhere (as a daemon passing it on would).
    dm = mount_repository_image(app.repo, "app")
    fd = dm.detach_fd()
    assert dm.fd == -1
    dm.close()  # no-op: the fd is the caller's now
    try:
        os.fstat(fd)
        attach(fd, mounts.dir("taken"))
    finally:
        os.close(fd)
    assert (mounts.root / "taken" / "inline").read_bytes() == b"tiny\n"


def test_image_and_directories_as_fds(app: App, mounts: Mounts) -> None:
    upper, work = mounts.dir("upper"), mounts.dir("work")
    fds = [
        os.open(app.image, os.O_RDONLY),
        os.open(app.repo.objects_dir, os.O_RDONLY | os.O_DIRECTORY),
        os.open(upper, os.O_PATH | os.O_DIRECTORY),
        os.open(work, os.O_PATH | os.O_DIRECTORY),
    ]
    try:
        dm = mount_image(
            fds[0],
            MountOptions(
                basedirs=[fds[1]], upperdir=fds[2], workdir=fds[3], expected_digest=app.digest
            ),
        )
        # mount_image leaves the caller's fds open.
        for fd in fds:
            os.fstat(fd)
    finally:
        for fd in fds:
            os.close(fd)
    assert dm.image_check == "userspace" and not dm.read_only
    mnt = mounts.attach(dm)
    (mnt / "written").write_text("via fds")
    assert (upper / "written").read_text() == "via fds"
    assert (mnt / "hello").read_bytes() == (app.src / "hello").read_bytes()


# -- regressions: bugs found while writing these tests ----------------------------------------


def test_unmount_refuses_a_foreign_mount_on_top_of_composefs(app: App, mounts: Mounts) -> None:
    mnt = mounts.attach(mount_repository_image(app.repo, "app"))
    with FsContext("tmpfs") as ctx:
        ctx.create()
        fd = ctx.mount()
    try:
        move_mount(fd, mnt)
    finally:
        os.close(fd)
    (mnt / "on-tmpfs").write_text("x")
    with pytest.raises(MountError) as info:
        unmount(mnt)
    assert info.value.errno == errno.EINVAL
    assert (mnt / "on-tmpfs").exists(), "the tmpfs on top was unmounted"


def _tmpfs_at(where: Path, marker: str) -> None:
    with FsContext("tmpfs") as ctx:
        ctx.create()
        fd = ctx.mount()
    try:
        move_mount(fd, where)
    finally:
        os.close(fd)
    (where / marker).write_text("x")


@pytest.mark.parametrize(
    ("component", "target", "moved"),
    [("a", "elsewhere", "a.old/b/mnt"), ("a/b", "elsewhere/b", "a/b.old/mnt")],
)
def test_unmount_walks_the_path_once_swap_between_check_and_unmount(
    component: str,
    target: str,
    moved: str,
    app: App,
    mounts: Mounts,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 17: a caller who owns a directory along ``where`` swaps it for a link to
    another mount's place after the check and before umount2. umount2 once walked
    the path again and took that other mount down; now it goes through the pinned
    parent and takes down the composefs mount that was checked, never the other."""
    mnt = mounts.attach(mount_repository_image(app.repo, "app"), "a/b/mnt")
    elsewhere = mounts.dir("elsewhere/b/mnt")
    _tmpfs_at(elsewhere, "on-tmpfs")
    swapped = mounts.root / component
    real_umount2 = umount2
    calls: list[str] = []

    def swap_then_umount2(path: str, flags: int = 0) -> None:
        # The window between the check and the unmount, made deterministic.
        swapped.rename(swapped.with_name(swapped.name + ".old"))
        swapped.symlink_to(mounts.root / target)
        assert os.path.realpath(mnt) == str(elsewhere)
        calls.append(path)
        real_umount2(path, flags)

    monkeypatch.setattr(mount_mod, "umount2", swap_then_umount2)
    gone = unmount(mnt)
    assert len(calls) == 1
    assert gone.mountpoint == str(mnt) and gone.digest == app.digest
    assert _is_mounted(elsewhere) and (elsewhere / "on-tmpfs").exists(), "the other mount was taken"
    assert not _is_mounted(mounts.root / moved), "the checked composefs mount is still there"


def test_unmount_swap_before_the_parent_is_opened_is_refused(
    app: App, mounts: Mounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A component swapped after the path was resolved but before its parent was
    opened leads to another composefs mount: refused (it is not the one the path
    named), both left mounted."""
    mnt = mounts.attach(mount_repository_image(app.repo, "app"), "a/b/mnt")
    elsewhere = mounts.attach(mount_repository_image(app.repo, "other"), "elsewhere/b/mnt")
    real_realpath = os.path.realpath

    def realpath_then_swap(path: Any, *args: Any, **kw: Any) -> Any:
        resolved = real_realpath(path, *args, **kw)
        (mounts.root / "a").rename(mounts.root / "a.old")
        (mounts.root / "a").symlink_to(mounts.root / "elsewhere")
        return resolved

    monkeypatch.setattr(os.path, "realpath", realpath_then_swap)
    with pytest.raises(NotComposefsMountError) as info:
        unmount(mnt)
    monkeypatch.undo()
    assert info.value.errno == errno.EINVAL
    assert str(info.value) == f"{mnt} is not a composefs mount point"
    assert _is_mounted(mounts.root / "a.old" / "b" / "mnt") and _is_mounted(elsewhere)


def test_unmount_refuses_a_directory_inside_a_composefs_mount(app: App, mounts: Mounts) -> None:
    """Its mount id is the composefs mount's, but it is not the mount's root."""
    mnt = mounts.attach(mount_repository_image(app.repo, "app"))
    (mounts.root / "link").symlink_to(mnt)
    for path in (mnt / "sub", mounts.root / "link" / "sub", mnt / "hello"):
        with pytest.raises(NotComposefsMountError):
            unmount(path)
    assert _is_mounted(mnt)


@pytest.mark.parametrize("with_userns", [False, True])
def test_gid_map_without_uid_map_is_refused(with_userns: bool, app: App, mounts: Mounts) -> None:
    userns = create_userns(SHIFT) if with_userns else None
    try:
        _expect_mount_error(
            app.image,
            MountOptions(basedirs=[app.repo.objects_dir], userns_fd=userns, gid_map=SHIFT),
            errno.EINVAL,
            "gid",
        )
    finally:
        if userns is not None:
            os.close(userns)


@pytest.mark.parametrize("digest", ["zz", "", "0" * 63])
def test_malformed_expected_digest_of_a_repository_mount(digest: str, app: App) -> None:
    with pytest.raises(MountError) as info:
        mount_repository_image(app.repo, "app", expected_digest=digest)
    assert not isinstance(info.value, ImageVerityError)
    assert info.value.errno == errno.EINVAL
    assert "is not a sha256 digest" in str(info.value)


def test_string_form_without_a_usable_temporary_directory(
    app: App, tmp_path: Path, mounts: Mounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    fds, before = _fds(), _our_mounts()
    with pytest.raises(MountError) as info:
        mount_image(app.image, MountOptions(basedirs=[app.repo.objects_dir], layer_mode="string"))
    assert str(tmp_path / "no-such-dir") in str(info.value)
    assert _fds() == fds and _our_mounts() == before


def test_string_form_as_root_uses_run_not_tmp(
    app: App, mounts: Mounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no temporary directory chosen, root's string form attaches the EROFS in
    /run: at boot (before local-fs.target) /tmp may be on a read-only root."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    monkeypatch.setattr(tempfile, "tempdir", None)
    for var in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.delenv(var, raising=False)
    parents: list[str | None] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        parents.append(kwargs.get("dir"))
        path: str = real_mkdtemp(*args, **kwargs)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    before = set(Path("/run").glob(".composefs.*"))
    dm = mount_image(app.image, MountOptions(basedirs=[app.repo.objects_dir], layer_mode="string"))
    mnt = mounts.attach(dm)
    assert parents == ["/run"]
    assert set(Path("/run").glob(".composefs.*")) == before
    _assert_same_tree(_app_snapshot(app), treecompare.snapshot(mnt, _all_xattrs))
    unmount(mnt)


def test_module_exports() -> None:
    # The names the daemon and composefsctl use are importable from the package.
    from composefsd import kernel

    for name in ("MountError", "ImageVerityError", "MountOptions", "mount_image", "unmount"):
        assert getattr(kernel, name) is getattr(mount_mod, name)
