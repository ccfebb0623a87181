"""The sources' one interface: a directory and a dumpfile of the same tree give
:class:`~composefsd.sources.base.SourceTree`\\ s of the same shape."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from composefsd.image.dump_print import format_dump
from composefsd.image.tree import Node
from composefsd.kernel.verity import Algorithm
from composefsd.sources.base import ImportTask, SourceTree, SourceTreeError
from composefsd.sources.directory import ScanOptions, scan_directory, scan_source, source_tree
from composefsd.sources.dumpfile import dumpfile_tree

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "big").write_bytes(b"b" * 100_000)
    (root / "small").write_bytes(b"tiny")
    (root / "empty").write_bytes(b"")
    (root / "sub" / "mid").write_bytes(b"m" * 5000)
    (root / "sub" / "deeper" / "same").write_bytes(b"b" * 100_000)
    (root / "link").symlink_to("big")


def _nodes(root: Node) -> set[int]:
    return {id(node) for _path, node in root.walk()}


def _check_shape(tree: SourceTree, fd: int, display: bytes) -> None:
    assert isinstance(tree, SourceTree)
    assert (tree.source_fd, tree.display, tree.credentials) == (fd, display, None)
    assert len(tree.imports) == len(tree.nodes)
    reachable = _nodes(tree.root)
    for task, node in zip(tree.imports, tree.nodes, strict=True):
        assert isinstance(task, ImportTask)
        assert id(node) in reachable
        assert stat.S_ISREG(node.mode) and task.size == node.size > 0
        assert task.rel and not task.rel.startswith(b"/")
    assert tree.entries == len(tree.root.walk())


def test_directory_and_dumpfile_sources_give_the_same_shape(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _make_tree(src)
    store = tmp_path / "store"
    scanned = scan_directory(src, ScanOptions(threads=1), digest_store=store)
    dump = format_dump(scanned)

    src_fd = os.open(src, _DIR_FLAGS)
    store_fd = os.open(store, _DIR_FLAGS)
    try:
        display = os.fsencode(src)
        directory = source_tree(scan_source(src_fd, display), src_fd, display)
        dumpfile = dumpfile_tree(dump, store_fd, os.fsencode(store), Algorithm.SHA256)
        _check_shape(directory, src_fd, display)
        _check_shape(dumpfile, store_fd, os.fsencode(store))
    finally:
        os.close(src_fd)
        os.close(store_fd)

    assert (directory.files, directory.entries) == (dumpfile.files, dumpfile.entries) == (5, 9)
    # The directory's digests come from its import; the dumpfile's from the dumpfile.
    assert directory.set_digests and not dumpfile.set_digests
    # A directory's small files are imported to be inlined; a dumpfile inlines them
    # itself, and names the objects of the others (with their digests to check).
    files = {task.rel: task for task in directory.imports}
    assert sorted(files) == [b"big", b"small", b"sub/deeper/same", b"sub/mid"]
    assert files[b"small"].inline and not files[b"big"].inline
    assert all(task.key is not None and task.expected is None for task in files.values())
    outside = sorted(task.size for task in directory.imports if not task.inline)
    assert sorted(task.size for task in dumpfile.imports) == outside
    for task, node in zip(dumpfile.imports, dumpfile.nodes, strict=True):
        assert task.rel == node.payload and task.expected == node.digest is not None
        assert not task.inline and task.key is None


def test_dumpfile_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceTreeError, match="invalid dumpfile") as info:
        dumpfile_tree(b"/ 0 40755 2 0 0 0 0.0 - - -\nnot a line\n", -1, b"x", Algorithm.SHA256)
    assert info.value.errno is not None
    escape = b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 10 100644 1 0 0 0 0.0 ../etc/passwd - -\n"
    with pytest.raises(SourceTreeError, match="not a plain relative path"):
        dumpfile_tree(escape, -1, b"x", Algorithm.SHA256)
