"""A scan shared with a worker process (composefsd.sources.directory.ScanSplit): the
tree, the files to import with their keys, the entry counts and the bare inodes are
those of the scan alone, whatever part the worker walks; its fingerprint is the same
from one split scan of the tree to the next and moves with any change in the
worker's part; a worker that cannot start leaves the scan to walk it all; a worker's
scan error is the scan's."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from composefsd import workerproc
from composefsd.image.dump_print import format_dump
from composefsd.sources import directory as directory_mod
from composefsd.sources.base import ReadStyle
from composefsd.sources.directory import (
    BareKey,
    ScanError,
    ScanOptions,
    ScanSplit,
    SourceScan,
    scan_source,
)
from subtreescans import record_subtree_scans
from trees import private_tmpfs, scanner_tree, set_xattr, write_file

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_STYLES = {
    "c": ScanOptions(),
    "c-hardlinks": ScanOptions(preserve_hardlinks=True),
    "composefs-rs": ScanOptions(style=ReadStyle.COMPOSEFS_RS),
    "user-xattrs": ScanOptions(style=ReadStyle.COMPOSEFS_RS, user_xattrs=True),
    "no-devices": ScanOptions(style=ReadStyle.COMPOSEFS_RS, skip_devices=True),
}


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    yield from private_tmpfs("cfs-split-")


@pytest.fixture
def tree(scratch: Path, request: pytest.FixtureRequest) -> bytes:
    root = os.fsencode(scratch / request.node.name.replace("/", "_"))
    scanner_tree(root, big_xattrs=False)
    # Paths of one inode in both parts, and inside the worker's.
    os.link(root + b"/f4096", root + b"/many/hardlink-to-f4096")
    os.link(root + b"/links/short", root + b"/dev/hardlinked-symlink")
    os.link(root + b"/dev/fifo", root + b"/deep/hardlinked-fifo")
    return root


@pytest.fixture
def subtree_scans(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The answer of every worker a split scan started (None: none)."""
    return record_subtree_scans(monkeypatch)


def _scan(root: bytes, options: ScanOptions, **kwargs: Any) -> SourceScan:
    fd = os.open(root, _DIR_FLAGS)
    try:
        return scan_source(fd, root, options, fingerprint=True, **kwargs)
    finally:
        os.close(fd)


def _known_bare(scan: SourceScan) -> tuple[set[BareKey], bytes]:
    from array import array

    keys = sorted(set(scan.bare))
    columns = [array(code, [k[i] for k in keys]) for i, code in enumerate("QQq")]
    return set(keys), b"".join(c.tobytes() for c in columns)


def _facts(scan: SourceScan) -> tuple[object, ...]:
    return (
        format_dump(scan.root),
        sorted((rel, key) for rel, _node, key in scan.files),
        scan.entries,
        scan.regular_files,
        sorted(scan.bare),
    )


def _weights(root: bytes, share: float) -> ScanSplit:
    weights = {}
    with os.scandir(root) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                weights[os.fsencode(entry.name)] = sum(1 for _ in os.walk(entry.path)) + 1
    return ScanSplit(weights, share=share)


@pytest.mark.parametrize("style", sorted(_STYLES))
@pytest.mark.parametrize("share", [1.0, 0.5])
def test_split_scan_is_the_scan(
    tree: bytes, style: str, share: float, subtree_scans: list[object]
) -> None:
    options = _STYLES[style]
    alone = _scan(tree, options, known_bare=set())
    known, wire = _known_bare(alone)
    split = _weights(tree, share)
    # Without the known bare inodes, then with them (the worker gets them as arrays).
    for bare, bare_wire in ((set[BareKey](), b""), (known, wire)):
        plan = ScanSplit(split.weights, bare_wire, split.share)
        first = _scan(tree, options, known_bare=bare, split=plan)
        assert subtree_scans and subtree_scans[-1] is not None
        assert subtree_scans[-1][0] == "ok"  # type: ignore[index]
        assert _facts(first) == _facts(alone)
        again = _scan(tree, options, known_bare=bare, split=plan)
        assert again.fingerprint == first.fingerprint
    # Each file node is the tree's, with its own key.
    nodes = {id(node) for _path, node in first.root.walk()}
    assert all(id(node) in nodes for _rel, node, _key in first.files)


@pytest.mark.parametrize(
    "change",
    ["mtime", "xattr", "new file", "mode", "symlink"],
)
def test_split_fingerprint_moves_with_the_workers_part(
    tree: bytes, change: str, subtree_scans: list[object]
) -> None:
    options = _STYLES["composefs-rs"]
    plan = _weights(tree, 1.0)
    before = _scan(tree, options, known_bare=set(), split=plan).fingerprint
    inside = tree + b"/names/sub dir\n/\xff"
    if change == "mtime":
        os.utime(inside, ns=(0, 12345))
    elif change == "xattr":
        set_xattr(inside, b"user.new", b"x")
    elif change == "new file":
        write_file(tree + b"/deep/d0/new", b"")
    elif change == "mode":
        os.chmod(inside, 0o640)
    else:
        os.unlink(tree + b"/links/dangling")
        os.symlink(b"/nonexistent/targeT", tree + b"/links/dangling")
    after = _scan(tree, options, known_bare=set(), split=plan).fingerprint
    assert all(answer is not None for answer in subtree_scans) and len(subtree_scans) == 2
    assert after != before


def test_split_without_a_worker_walks_it_all(
    tree: bytes, monkeypatch: pytest.MonkeyPatch, subtree_scans: list[object]
) -> None:
    options = _STYLES["composefs-rs"]
    alone = _scan(tree, options, known_bare=set())

    def cannot_start(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EAGAIN, "no processes")

    monkeypatch.setattr(workerproc, "start", cannot_start)
    split = _scan(tree, options, known_bare=set(), split=_weights(tree, 1.0))
    assert subtree_scans == [None]
    assert _facts(split) == _facts(alone)


def test_split_workers_error_is_the_scans(
    tree: bytes, monkeypatch: pytest.MonkeyPatch, subtree_scans: list[object]
) -> None:
    def failing(self: Any) -> Any:
        return ("error", errno.EACCES, "error accessing /x/many: Permission denied", b"/x/many")

    monkeypatch.setattr(directory_mod._SubtreeScan, "result", failing)
    with pytest.raises(ScanError) as info:
        _scan(tree, _STYLES["c"], split=_weights(tree, 1.0))
    assert info.value.errno == errno.EACCES
    assert str(info.value) == "error accessing /x/many: Permission denied"


def test_subtree_worker_reports_a_scan_error(tree: bytes) -> None:
    """The worker's side: a subtree that cannot be read is its first error."""
    fd = os.open(tree + b"/f64", os.O_RDONLY)
    try:
        request = (ScanOptions().to_wire(), tree, [(fd, b"f64")], b"", False)
        answer = directory_mod._scan_subtrees(request)
    finally:
        os.close(fd)
    assert answer[0] == "error" and answer[1] == errno.ENOTDIR
    assert answer[2] == f"error accessing {os.fsdecode(tree)}/f64: Not a directory"


def test_subtree_worker_answers_as_in_process_then_ends(tree: bytes) -> None:
    """A worker's answer is read before the worker is reaped, is the walk's own, and
    the worker then ends cleanly at EOF (without its interpreter's teardown)."""
    fd = os.open(tree + b"/many", _DIR_FLAGS)
    try:
        request = (ScanOptions().to_wire(), tree, [(fd, b"many")], b"", True)
        job = directory_mod._SubtreeScan(request)
        answer = job.result()
        here = directory_mod._scan_subtrees(request)
    finally:
        os.close(fd)
    assert answer is not None and answer[0] == "ok"
    assert answer == here
    job._thread.join(60)
    assert not job._thread.is_alive()
    assert job._proc is not None and job._proc.returncode == 0


def test_split_names_fill_the_share() -> None:
    subdirs: list[Any] = [(name, None, name, (0, 0)) for name in (b"a", b"b", b"c", b"d")]
    plan = ScanSplit({b"a": 50, b"b": 30, b"c": 15, b"d": 5, b"gone": 100}, share=0.3)
    # 200 in all: room for 60, the biggest first that still fit.
    assert directory_mod._split_names(subdirs, plan) == {b"a", b"d"}
    assert directory_mod._split_names(subdirs, ScanSplit({}, share=1.0)) == set()
