"""composefsd.sources.directory and composefsd.sources.objcopy against C mkcomposefs 1.0.8 on real trees.

The trees are built on a private tmpfs (large xattrs of every namespace, devices,
whiteouts, odd names, extreme mtimes and ids), scanned by both implementations,
and the image bytes, dumps and digest stores compared. The tree is ``trees.scanner_tree``.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from composefsd.fsverity import digest_bytes
from composefsd.image.dump_print import format_dump
from composefsd.image.reader import read_image
from composefsd.image.tree import Node
from composefsd.image.writer import write_image
from composefsd.objectlayout import join_store_path, object_payload
from composefsd.sources import directory as scanner
from composefsd.sources.directory import (
    ScanError,
    ScanOptions,
    ScanProgress,
    fill_digest_store,
    scan_directory,
)
from composefsd.sources.objcopy import CopyState, copy_fd_data, store_object
from trees import ODD_NAMES, private_tmpfs, scanner_tree, set_xattr, write_file


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    yield from private_tmpfs("cfs-scan-")


def _on_tmpfs(path: Path) -> bool:
    return (
        os.statvfs(path).f_bsize > 0
        and b"tmpfs"
        in subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True).stdout
    )


@pytest.fixture(scope="session")
def tree(scratch: Path) -> bytes:
    root = os.fsencode(scratch / "tree")
    scanner_tree(root, big_xattrs=_on_tmpfs(scratch))
    return root


_counter = itertools.count()


@pytest.fixture
def workdir(scratch: Path) -> Path:
    path = scratch / f"work{next(_counter)}"
    path.mkdir()
    return path


# -- helpers ------------------------------------------------------------------------------


def c_mkcomposefs(
    ref: Path, *args: str | bytes | os.PathLike[str], ok: bool = True
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [os.fsencode(ref / "mkcomposefs"), *map(os.fsencode, args)], capture_output=True
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def flag_args(opts: ScanOptions) -> list[str]:
    out = []
    for flag in ("use_epoch", "skip_devices", "skip_xattrs", "user_xattrs"):
        if getattr(opts, flag):
            out.append("--" + flag.replace("_", "-"))
    return out


def store_listing(store: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under a store: (mode, content for files)."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(store):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, store)
            out[rel] = (st.st_mode, Path(full).read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return out


def assert_same_image(ours: bytes, theirs: bytes) -> None:
    if ours != theirs:
        a = format_dump(read_image(ours).root).splitlines()
        b = format_dump(read_image(theirs).root).splitlines()
        diff = [f"- {x!r}" for x in b if x not in set(a)][:10] + [
            f"+ {x!r}" for x in a if x not in set(b)
        ][:10]
        raise AssertionError("images differ (C -, ours +):\n" + "\n".join(diff))


OPTION_SETS = [
    ScanOptions(use_epoch=e, skip_devices=d, skip_xattrs=x, user_xattrs=u)
    for e, d, x, u in itertools.product([False, True], repeat=4)
    if not (x and u)
]


# -- scanner vs C ---------------------------------------------------------------------------


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "+".join(flag_args(o)) or "plain")
def test_image_identical_to_c(
    reference_bin: Path, tree: bytes, workdir: Path, opts: ScanOptions
) -> None:
    root = scan_directory(tree, opts)
    ours = write_image(root)
    c_mkcomposefs(reference_bin, *flag_args(opts), tree, workdir / "c.img")
    assert_same_image(ours, (workdir / "c.img").read_bytes())


def test_tree_details(tree: bytes) -> None:
    root = scan_directory(tree, ScanOptions(threads=3))
    assert root.children is not None
    f0, f1, f64, f65 = (root.children[n] for n in (b"f0", b"f1", b"f64", b"f65"))
    # Empty files: no digest, no payload, no content.
    assert (f0.digest, f0.payload, f0.content, f0.size) == (None, None, None, 0)
    # 1..64 bytes: inlined and still given a digest and payload.
    assert f1.content is not None and len(f1.content) == 1 and f1.digest is not None
    assert f64.content == Path(os.fsdecode(tree + b"/f64")).read_bytes()
    # Over 64 bytes: external, payload derived from the fs-verity digest.
    data = Path(os.fsdecode(tree + b"/f65")).read_bytes()
    assert f65.content is None and f65.digest == digest_bytes(data)
    assert f65.payload == object_payload(f65.digest)
    assert len(f65.payload) == 65 and f65.payload[2:3] == b"/"
    # Hardlinks are not detected by default: separate inodes, nlink 1, same payload.
    twin = root.children[b"hardlink-to-f65"]
    assert (
        twin is not f65 and twin.link_to is None and twin.nlink == 1 and twin.payload == f65.payload
    )
    # Metadata straight from lstat.
    st = os.lstat(tree + b"/f65")
    assert (f65.uid, f65.gid, f65.mode) == (st.st_uid, st.st_gid, st.st_mode)
    assert f65.mtime_sec * 10**9 + f65.mtime_nsec == st.st_mtime_ns
    link = root.children[b"links"].children[b"longest"]  # type: ignore[index]
    assert link.payload == b"t" * 4095 and link.size == 4095
    dev = root.children[b"dev"].children[b"bigdev"]  # type: ignore[index]
    assert dev.rdev == os.lstat(tree + b"/dev/bigdev").st_rdev & 0xFFFFFFFF
    assert set(root.children[b"names"].children or ()) >= set(ODD_NAMES)
    # The root's own xattrs are read too.
    assert root.get_xattr(b"user.root-xattr") == b"r"


def test_options_affect_nodes(tree: bytes) -> None:
    plain = scan_directory(tree, ScanOptions(compute_digests=False, inline_small=False))
    assert plain.children is not None
    f65, f1 = plain.children[b"f65"], plain.children[b"f1"]
    assert (f65.digest, f65.payload, f1.content) == (None, None, None)
    assert f1.get_xattr(b"trusted.t") == b"trusted-value"
    user = scan_directory(tree, ScanOptions(user_xattrs=True, use_epoch=True, skip_devices=True))
    assert user.children is not None
    assert [k for k, _ in user.children[b"f1"].xattrs] == [b"user.small"]
    assert all(n.mtime_sec == 0 and n.mtime_nsec == 0 for _, n in user.walk())
    assert b"whiteout" not in user.children and b"fifo" in user.children[b"dev"].children  # type: ignore[operator]
    assert b"null" not in user.children[b"dev"].children  # type: ignore[operator]
    none = scan_directory(tree, ScanOptions(skip_xattrs=True))
    assert all(not n.xattrs for _, n in none.walk())


def test_source_is_a_file(tree: bytes) -> None:
    node = scan_directory(tree + b"/f65")
    assert node.children is None and node.payload is not None and node.content is None
    link = scan_directory(tree + b"/links/to-dir")  # lstat: a symlink root stays a symlink
    assert stat.S_ISLNK(link.mode) and link.payload == b"../many"


def test_trailing_slash_and_relative_source(
    reference_bin: Path, tree: bytes, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c_mkcomposefs(reference_bin, tree + b"/many/", workdir / "c.img")
    assert write_image(scan_directory(tree + b"/many/")) == (workdir / "c.img").read_bytes()
    monkeypatch.chdir(os.fsdecode(tree))
    assert write_image(scan_directory("many")) == (workdir / "c.img").read_bytes()


def test_paths_beyond_path_max(reference_bin: Path, workdir: Path) -> None:
    # C scans relative to directory fds, so depth is not limited by PATH_MAX; so do we.
    # (Only empty regular files down there: C hashes by full path, which would fail.)
    src = os.fsencode(workdir / "src")
    os.mkdir(src)
    fd = os.open(src, os.O_RDONLY)
    try:
        for level in range(24):
            name = b"%03d" % level + b"d" * 200
            os.mkdir(name, dir_fd=fd)
            new = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new
            os.setxattr(f"/proc/self/fd/{fd}", b"user.level", b"%d" % level)
        os.symlink(b"target", b"link", dir_fd=fd)
        os.close(os.open(b"empty", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    root = scan_directory(src)
    node = root
    while node.children and b"empty" not in node.children:
        node = next(iter(node.children.values()))
        assert node.get_xattr(b"user.level") is not None
    c_mkcomposefs(reference_bin, "--use-epoch", src, workdir / "c.img")
    assert (
        write_image(scan_directory(src, ScanOptions(use_epoch=True)))
        == (workdir / "c.img").read_bytes()
    )


# -- hardlinks (opt-in) ---------------------------------------------------------------------


def test_preserve_hardlinks(tree: bytes) -> None:
    root = scan_directory(tree, ScanOptions(preserve_hardlinks=True))
    assert root.children is not None
    first, link = root.children[b"dup-a"], root.children[b"hardlink-to-dup-a"]
    # The first path in image order is the inode, later ones link to it.
    assert first.link_to is None and link.link_to is first
    assert first.nlink == 2 and link.mode == first.mode
    f65, twin = root.children[b"f65"], root.children[b"hardlink-to-f65"]
    assert twin.link_to is f65 and f65.nlink == 2
    # Unlinked files keep nlink 1; hardlink entries carry no payload of their own.
    assert root.children[b"dup-b"].nlink == 1 and link.payload is None
    image = read_image(write_image(root))
    assert image.root.children is not None
    back = image.root.children[b"hardlink-to-dup-a"]
    assert back.target() is image.root.children[b"dup-a"].target()
    assert image.root.children[b"dup-a"].target().nlink == 2


def test_preserve_hardlinks_order_and_nlink(workdir: Path) -> None:
    src = workdir / "src"
    (src / "b" / "c").mkdir(parents=True)
    (src / "z").write_bytes(b"x" * 100)
    for link in (src / "b/c/a", src / "b/a", workdir / "outside"):
        os.link(src / "z", link)
    root = scan_directory(src, ScanOptions(preserve_hardlinks=True))
    assert os.stat(src / "z").st_nlink == 4
    assert root.children is not None
    b = root.children[b"b"].children
    assert b is not None and b[b"c"].children is not None
    target = b[b"a"]  # /b/a comes before /b/c/a and /z in depth-first, bytewise order
    # nlink counts the paths inside the image, not the link outside it.
    assert target.link_to is None and target.nlink == 3 and target.payload is not None
    assert b[b"c"].children[b"a"].link_to is target and root.children[b"z"].link_to is target


# -- digest store ---------------------------------------------------------------------------


def test_digest_store_identical_to_c(reference_bin: Path, tree: bytes, workdir: Path) -> None:
    c_store, our_store = workdir / "c-store", workdir / "our-store/"
    c_mkcomposefs(reference_bin, f"--digest-store={c_store}", tree, workdir / "c.img")
    root = scan_directory(tree, ScanOptions(threads=3), digest_store=str(our_store) + "//")
    assert write_image(root) == (workdir / "c.img").read_bytes()
    ours, theirs = store_listing(our_store), store_listing(c_store)
    assert ours == theirs
    objects = [k for k, (mode, data) in ours.items() if data is not None]
    assert objects and all(ours[k][0] == stat.S_IFREG | 0o644 for k in objects)
    assert all(
        digest_bytes(ours[k][1] or b"") == bytes.fromhex(k.replace("/", "")) for k in objects
    )
    # Inlined (<= 64 bytes) and empty files are not stored; duplicates are stored once.
    assert len(objects) == len(
        {n.payload for _, n in root.walk() if n.payload and n.content is None and n.digest}
    )
    # A second run onto the full store adds nothing and leaves no temp files.
    before = {k: os.stat(our_store / k).st_ino for k in objects}
    scan_directory(tree, digest_store=our_store)
    assert store_listing(our_store) == theirs
    assert {k: os.stat(our_store / k).st_ino for k in objects} == before


def test_fill_digest_store_separately(reference_bin: Path, tree: bytes, workdir: Path) -> None:
    c_store = workdir / "c-store"
    c_mkcomposefs(
        reference_bin, "--skip-devices", f"--digest-store={c_store}", tree, workdir / "c.img"
    )
    root = scan_directory(tree, ScanOptions(skip_devices=True))
    added = fill_digest_store(tree, root, workdir / "deep/new/store", threads=2)
    assert store_listing(workdir / "deep/new/store") == store_listing(c_store)
    assert added == sum(1 for _, (_, d) in store_listing(c_store).items() if d is not None)
    assert fill_digest_store(tree, root, workdir / "deep/new/store") == 0


def test_store_refills_partial_store(tree: bytes, workdir: Path) -> None:
    store = workdir / "store"
    root = scan_directory(tree, digest_store=store)
    full = store_listing(store)
    victims = sorted(k for k, (_, d) in full.items() if d is not None)[:3]
    for v in victims:
        os.unlink(store / v)
    scan_directory(tree, digest_store=store)
    assert store_listing(store) == full
    assert root.children is not None


def test_store_error_matches_c(reference_bin: Path, tree: bytes, workdir: Path) -> None:
    (workdir / "file").write_bytes(b"not a dir")
    c = c_mkcomposefs(
        reference_bin, f"--digest-store={workdir}/file/store", tree, workdir / "c.img", ok=False
    )
    with pytest.raises(ScanError) as info:
        scan_directory(tree, digest_store=workdir / "file" / "store")
    assert c.stderr == b"mkcomposefs: " + str(info.value).encode() + b"\n"
    assert (
        str(info.value) == "cannot fill store: Not a directory"
        and info.value.errno == errno.ENOTDIR
    )
    # An object path taken by a directory is skipped (lstat succeeds), as in C.
    store = workdir / "store"
    root = scan_directory(tree, ScanOptions(compute_digests=True))
    assert root.children is not None
    payload = root.children[b"f65"].payload
    assert payload is not None
    os.makedirs(store / os.fsdecode(payload))
    scan_directory(tree, digest_store=store)
    assert (store / os.fsdecode(payload)).is_dir()


# -- errors ---------------------------------------------------------------------------------


def _c_error(reference_bin: Path, *args: str | bytes | os.PathLike[str]) -> bytes:
    with tempfile.TemporaryDirectory() as out:
        proc = c_mkcomposefs(reference_bin, *args, os.path.join(out, "img"), ok=False)
    assert proc.returncode == 1
    prefix = b"mkcomposefs: "
    assert proc.stderr.startswith(prefix)
    return proc.stderr[len(prefix) :].rstrip(b"\n")


def test_missing_source(reference_bin: Path, workdir: Path) -> None:
    missing = workdir / "missing"
    with pytest.raises(ScanError) as info:
        scan_directory(missing)
    assert info.value.errno == errno.ENOENT and info.value.path == os.fsencode(missing)
    assert str(info.value).encode() == _c_error(reference_bin, missing)


def test_conflicting_xattr_options(reference_bin: Path, tree: bytes) -> None:
    with pytest.raises(ScanError) as info:
        scan_directory(tree, ScanOptions(skip_xattrs=True, user_xattrs=True))
    assert info.value.errno == errno.EINVAL
    assert str(info.value).encode() == _c_error(
        reference_bin, "--skip-xattrs", "--user-xattrs", tree
    )


def test_xattr_estimate_overflow(reference_bin: Path, scratch: Path, workdir: Path) -> None:
    if not _on_tmpfs(scratch):
        pytest.fail("needs tmpfs for 64 KiB xattrs")
    src = os.fsencode(workdir / "src")
    os.makedirs(src + b"/sub")
    write_file(src + b"/sub/file", b"x")
    set_xattr(src + b"/sub/file", b"user.a", bytes(20_000))
    set_xattr(src + b"/sub/file", b"user.b", bytes(20_000))
    with pytest.raises(ScanError) as info:
        scan_directory(src)
    assert info.value.errno == errno.ERANGE and info.value.path == src + b"/sub/file"
    assert str(info.value).encode() == _c_error(reference_bin, src)
    # --skip-xattrs and --user-xattrs avoid reading them (the latter only if not user.*).
    scan_directory(src, ScanOptions(skip_xattrs=True))


def test_unreadable_file(reference_bin: Path, workdir: Path) -> None:
    # Root can open anything on a normal filesystem, but not a write-only sysfs attribute:
    # bind one over a regular file so that hashing fails like a real read error would.
    src = workdir / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"y" * 100)
    (src / "victim").write_bytes(b"")
    candidates = [
        p
        for p in ("/sys/bus/pci/rescan", "/sys/kernel/mm/ksm/run", "/sys/power/state")
        if os.path.exists(p)
    ]
    wo = [p for p in candidates if os.stat(p).st_mode & 0o444 == 0]
    assert wo, "no write-only sysfs attribute to bind-mount"
    subprocess.run(["mount", "--bind", wo[0], str(src / "victim")], check=True)
    try:
        with pytest.raises(ScanError) as info:
            scan_directory(src, digest_store=workdir / "store")
        assert info.value.errno == errno.EACCES
        assert str(info.value).encode() == _c_error(reference_bin, src)
        assert str(info.value) == "error computing digest: Permission denied"
    finally:
        subprocess.run(["umount", str(src / "victim")], check=True)


def _after_lstat(
    monkeypatch: pytest.MonkeyPatch, name: bytes, action: Callable[[bytes], None]
) -> None:
    """Run ``action(path)`` right after the scanner has stat'ed ``name``: a racing writer."""
    original = scanner._Walker._entry

    def entry(self: Any, dir_fd: int, ent: os.DirEntry[str], nm: bytes, rel: bytes) -> Any:
        made = original(self, dir_fd, ent, nm, rel)
        if nm == name:
            action(self.full_path(rel))
        return made

    monkeypatch.setattr(scanner._Walker, "_entry", entry)


def test_file_vanishing_between_scan_and_hash(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = workdir / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(b"z" * (100 + i))
    _after_lstat(monkeypatch, b"f3", os.unlink)
    with pytest.raises(ScanError) as info:
        scan_directory(src, ScanOptions(threads=2), digest_store=workdir / "store")
    assert str(info.value) == "error computing digest: No such file or directory"


def test_file_shrinking_below_inline_size(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "small").write_bytes(b"0123456789")
    _after_lstat(monkeypatch, b"small", lambda p: write_file(p, b"012"))
    # C reads what is there (a short read is its ENODATA); we see that the file is no
    # longer what was scanned, and say which one.
    with pytest.raises(ScanError) as info:
        scan_directory(src)
    path = os.fsdecode(src / "small")
    assert str(info.value) == (
        f"error computing digest: {path}: its size changed from 10 to 3 bytes"
    )
    assert info.value.errno == errno.EAGAIN and info.value.path == os.fsencode(path)
    # A short read after the file was opened is still C's ENODATA.
    monkeypatch.undo()
    (src / "small").write_bytes(b"0123456789")
    monkeypatch.setattr(scanner, "_read_all", lambda fd: os.read(fd, 3))
    with pytest.raises(ScanError) as info:
        scan_directory(src)
    assert str(info.value) == "error computing digest: No data available"


def test_scan_error_wins_and_stops_workers(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A digest error during the scan must not hide a later scan error (C scans first).
    src = workdir / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "gone").write_bytes(b"g" * 100)
    (src / "b").mkdir()
    (src / "b" / "x").write_bytes(b"x")
    _after_lstat(monkeypatch, b"gone", os.unlink)
    _after_lstat_dir = scanner._Walker._read_dir

    def read_dir(self: Any, fd: int, node: Node, rel: bytes) -> Any:
        if rel == b"b":
            path = self.full_path(rel)
            raise ScanError(
                errno.EIO, "error accessing " + os.fsdecode(path) + ": Input/output error"
            )
        return _after_lstat_dir(self, fd, node, rel)

    monkeypatch.setattr(scanner._Walker, "_read_dir", read_dir)
    before = threading.active_count()
    with pytest.raises(ScanError) as info:
        scan_directory(src, digest_store=workdir / "store")
    assert str(info.value).startswith("error accessing") and str(info.value).endswith(
        "/b: Input/output error"
    )
    assert threading.active_count() == before
    assert not (workdir / "store").exists()


def test_progress_reports(tree: bytes, workdir: Path) -> None:
    seen: list[ScanProgress] = []
    root = scan_directory(tree, ScanOptions(threads=2), seen.append, digest_store=workdir / "store")
    phases = [p.phase for p in seen]
    # Phases only move forward: scan, digest (maybe too quick to be seen), store.
    order = {"scan": 0, "digest": 1, "store": 2}
    assert phases[0] == "scan" and phases[-1] == "store"
    assert [order[p] for p in phases] == sorted(order[p] for p in phases)
    assert all(p.objects_stored == 0 for p in seen if p.phase != "store")
    without_store: list[ScanProgress] = []
    scan_directory(tree, ScanOptions(threads=2), without_store.append)
    assert without_store[-1].phase == "digest" and without_store[-1].objects_stored == 0
    last = seen[-1]
    assert last.entries == len(root.walk())
    assert last.files_done == last.files_total > 0 and last.bytes_done == last.bytes_total
    objects = sum(1 for _, (_, d) in store_listing(workdir / "store").items() if d is not None)
    assert last.objects_stored == objects


# -- objcopy --------------------------------------------------------------------------------


def test_join_store_path() -> None:
    assert join_store_path(b"/s//", b"ab/cd") == b"/s/ab/cd"
    assert join_store_path(b"/", b"ab/cd") == b"/ab/cd"
    assert join_store_path(b"", b"ab/cd") == b"ab/cd"
    assert join_store_path(b"rel", b"ab") == b"rel/ab"


def test_copy_fallbacks(workdir: Path, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = workdir / "src"  # on tmpfs
    src.write_bytes(data)
    state = CopyState()
    # Same filesystem: copy_file_range (tmpfs cannot reflink), from the current offset on.
    with open(src, "rb") as s, open(workdir / "copy", "wb") as d:
        s.seek(1000)
        copy_fd_data(s.fileno(), d.fileno(), state)
    assert (workdir / "copy").read_bytes() == data[1000:]
    assert state.try_copy_file_range
    # tmpfs cannot reflink: remembered, so later copies from it skip the attempt.
    assert os.stat(src).st_dev in state.no_reflink_from
    if os.stat(tmp_path).st_dev == os.stat(workdir).st_dev:
        pytest.fail("tmp_path and the scratch tmpfs must be different filesystems")
    # Across filesystems: EXDEV turns copy_file_range off for the run, read/write copies.
    with open(src, "rb") as s, open(tmp_path / "copy", "wb") as d:
        copy_fd_data(s.fileno(), d.fileno(), state)
    assert (tmp_path / "copy").read_bytes() == data
    assert not state.try_copy_file_range
    with open(src, "rb") as s, open(workdir / "copy2", "wb") as d:
        copy_fd_data(s.fileno(), d.fileno(), state)
    assert (workdir / "copy2").read_bytes() == data


def test_store_object(workdir: Path) -> None:
    store = os.fsencode(workdir / "store")
    src = workdir / "src"
    src.write_bytes(b"q" * 5000)
    state = CopyState()
    assert store_object(os.fsencode(src), store, b"ab/cdef", state)
    assert not store_object(os.fsencode(src), store, b"ab/cdef", state)
    st = os.stat(store + b"/ab/cdef")
    assert (
        stat.S_IMODE(st.st_mode) == 0o644
        and Path(os.fsdecode(store + b"/ab/cdef")).read_bytes() == b"q" * 5000
    )
    assert stat.S_IMODE(os.stat(store + b"/ab").st_mode) == 0o755 & ~_umask()
    # Failure: the temp file is removed, the error is the source's.
    with pytest.raises(FileNotFoundError):
        store_object(os.fsencode(workdir / "missing"), store, b"ab/other", state)
    assert sorted(os.listdir(store)) == [b"ab"]
    # From an fd, read from its current offset and left open.
    with open(src, "rb") as f:
        f.seek(4000)
        assert store_object(f.fileno(), store, b"cd/tail", state)
        assert not f.closed
    assert Path(os.fsdecode(store + b"/cd/tail")).read_bytes() == b"q" * 1000


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_worker_processes(
    reference_bin: Path, tree: bytes, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Large scans hash in worker processes; force that path on the small test tree.
    monkeypatch.setattr(scanner, "_PROCESS_MIN_BYTES", 0)
    monkeypatch.setattr(scanner, "_BATCH_FILES", 7)
    seen: list[ScanProgress] = []
    root = scan_directory(tree, ScanOptions(threads=2), seen.append, digest_store=workdir / "s")
    c_mkcomposefs(reference_bin, f"--digest-store={workdir / 'c'}", tree, workdir / "c.img")
    assert_same_image(write_image(root), (workdir / "c.img").read_bytes())
    assert store_listing(workdir / "s") == store_listing(workdir / "c")
    assert seen[-1].files_done == seen[-1].files_total
    # A failure inside a worker process is reported like any other.
    src = workdir / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02}").write_bytes(b"w" * (100 * i + 1))
    _after_lstat(monkeypatch, b"f13", os.unlink)
    with pytest.raises(ScanError) as info:
        scan_directory(src, ScanOptions(threads=2))
    assert str(info.value) == "error computing digest: No such file or directory"


def test_no_worker_processes_available(tree: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(root_fd: int) -> None:
        raise OSError(errno.ENOENT, "no python here")

    expected = write_image(scan_directory(tree))
    monkeypatch.setattr(scanner, "_PROCESS_MIN_BYTES", 0)
    monkeypatch.setattr(scanner, "_start_worker", unavailable)
    assert write_image(scan_directory(tree, ScanOptions(threads=2))) == expected


def test_worker_process_dying(tree: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker that exits at once: its lane redoes the batch itself.
    def short_lived(root_fd: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.buffer.read(1)"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    expected = write_image(scan_directory(tree))
    monkeypatch.setattr(scanner, "_PROCESS_MIN_BYTES", 0)
    monkeypatch.setattr(scanner, "_start_worker", short_lived)
    assert write_image(scan_directory(tree, ScanOptions(threads=2))) == expected
