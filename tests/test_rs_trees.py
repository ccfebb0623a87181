"""Directory trees read and transformed as composefs-rs 0.9 does, against cfsctl's golden data.

The six golden trees (testdata/composefs-rs/inputs/trees) are unpacked once per
session, exactly, as root (the ``rs_trees`` fixture). Each is read in the composefs-rs style
(:class:`~composefsd.sources.base.ReadStyle`), its files given the digests of the
hash algorithm in question, transformed (:mod:`composefsd.image.transforms`) and
then compared with what cfsctl printed and wrote: ``create-dumpfile`` outputs,
``compute-id`` for sha256/sha512 x EROFS 0/1/2/default x every variant (errors
included), and the bytes of the images ``create-image`` stored.
"""

from __future__ import annotations

import copy
import marshal
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from composefsd.fsverity import digest_bytes, digest_fd
from composefsd.image.dump_print import format_dump, format_rs_dump
from composefsd.image.formats import ErofsVersion, write_format
from composefsd.image.transforms import (
    TransformError,
    apply_transform,
)
from composefsd.image.tree import RECOMMENDED_INLINE_CONTENT_MAX, Node
from composefsd.objectlayout import object_payload
from composefsd.sources.base import ReadStyle
from composefsd.sources.directory import ScanOptions, SourceScan, scan_directory, scan_source
from rsgolden import ALGORITHMS, EXPECTED, RS, TREES, VARIANTS, VERSIONS, golden_image, trees_json


class RsTree:
    """One rs_trees tree read as composefs-rs does, with a fresh copy per use."""

    def __init__(self, path: Path, algorithm: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            scan = scan_source(fd, os.fsencode(path), ScanOptions(style=ReadStyle.COMPOSEFS_RS))
        finally:
            os.close(fd)
        # What the repository's importer does: inline small files, give the others
        # their object (the fs-verity digest in the repository's algorithm).
        for rel, node, _key in scan.files:
            with open(path / os.fsdecode(rel), "rb") as f:
                if node.size <= RECOMMENDED_INLINE_CONTENT_MAX:
                    node.set_content(f.read())
                else:
                    digest = digest_fd(f.fileno(), algorithm)
                    node.digest = digest
                    node.payload = object_payload(digest)
        self.root = scan.root

    def fresh(self) -> tuple[Node, Callable[[Node], bytes]]:
        """A copy of the tree, and a content reader for its files."""
        root = copy.deepcopy(self.root)
        paths = {id(node.target()): path for path, node in root.walk()}
        base = self.path

        def read_content(node: Node) -> bytes:
            if node.content is not None or not node.payload:
                return node.content or b""
            return (base / os.fsdecode(paths[id(node)].lstrip(b"/"))).read_bytes()

        return root, read_content


_cache: dict[tuple[str, str], RsTree] = {}


def rs_tree(rs_trees: Path, tree: str, algorithm: str) -> RsTree:
    key = (tree, algorithm)
    if key not in _cache:
        _cache[key] = RsTree(rs_trees / tree, algorithm)
    return _cache[key]


def transformed(rs_trees: Path, tree: str, algorithm: str, variant: str) -> Node:
    root, read_content = rs_tree(rs_trees, tree, algorithm).fresh()
    apply_transform(root, VARIANTS[variant], read_content)
    return root


# -- dumpfiles ---------------------------------------------------------------------------------


def _dumpfiles() -> list[tuple[str, str, str]]:
    out = []
    for tree in TREES:
        for path in sorted((EXPECTED / "trees" / tree).glob("dumpfile.*.txt")):
            _, algorithm, variant, _ = path.name.split(".")
            out.append((tree, algorithm, variant))
    return out


@pytest.mark.parametrize(("tree", "algorithm", "variant"), _dumpfiles())
def test_dumpfile_matches_cfsctl(rs_trees: Path, tree: str, algorithm: str, variant: str) -> None:
    expected = (EXPECTED / "trees" / tree / f"dumpfile.{algorithm}.{variant}.txt").read_bytes()
    got = format_rs_dump(transformed(rs_trees, tree, algorithm, variant))
    assert got == expected


def test_every_golden_dumpfile_is_covered() -> None:
    # 6 trees x 2 hashes x 3 variants, and t6's bootable ones.
    assert len(_dumpfiles()) == 6 * 2 * 3 + 2


# -- ids -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("tree", TREES)
def test_compute_id_matches_cfsctl(rs_trees: Path, tree: str, algorithm: str, variant: str) -> None:
    runs = [
        r
        for r in trees_json()[tree]["compute_id"]
        if r["hash"] == algorithm and r["variant"] == variant
    ]
    assert {r["erofs_version"] for r in runs} == set(VERSIONS)
    for run in runs:
        if run["exit"] != 0:
            with pytest.raises(TransformError) as info:
                transformed(rs_trees, tree, algorithm, variant)
            assert f"Error: {info.value}" == run["stderr"].strip()
            continue
        image = write_format(
            transformed(rs_trees, tree, algorithm, variant), VERSIONS[run["erofs_version"]]
        )
        assert digest_bytes(image, algorithm).hex() == run["id"], run["command"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("tree", TREES)
def test_image_bytes_match_cfsctl(rs_trees: Path, tree: str, algorithm: str) -> None:
    folder = EXPECTED / "trees" / tree
    images = sorted(folder.glob(f"image.{algorithm}.v*.erofs.gz"))
    assert len(images) == 4
    for path in images:
        parts = path.name.split(".")
        version = ErofsVersion(int(parts[2][1:]))
        variant = parts[3] if len(parts) == 6 else "default"
        expected = golden_image(str(path.relative_to(RS)))
        assert write_format(transformed(rs_trees, tree, algorithm, variant), version) == expected, (
            path.name
        )


def test_bootable_needs_boot_as_cfsctl_says(rs_trees: Path) -> None:
    with pytest.raises(TransformError) as info:
        transformed(rs_trees, "t1-basic", "sha256", "bootable")
    assert str(info.value) == 'Directory entry "boot" does not exist'


# -- C stays C ----------------------------------------------------------------------------------


def test_c_style_is_unchanged_on_golden_trees(rs_trees: Path) -> None:
    """The C reading of t2-special still breaks every hardlink and gives inline files
    digests, and its hardlink option still links regular files only."""
    root = scan_directory(rs_trees / "t2-special", ScanOptions(threads=1))
    dump = format_dump(root)
    assert b" @" not in dump
    assert b"/hl/small 4 100644 1 7 0 0 1625632067.93341208 82/bc12" in dump
    linked = format_dump(
        scan_directory(rs_trees / "t2-special", ScanOptions(threads=1, preserve_hardlinks=True))
    )
    assert b"/hl/small-link 4 @100644 2" in linked
    assert b"/hl/sym-link 3 120777 1" in linked


# -- the composefs-rs reading on a tree made here ----------------------------------------------


def _made_tree(base: Path) -> Path:
    """Files with a second path each in z/ (after them in image order)."""
    top = base / "src"
    (top / "z").mkdir(parents=True)
    (top / "small").write_bytes(b"tiny")
    (top / "big").write_bytes(b"B" * 5000)
    os.link(top / "big", top / "z" / "big-link")
    os.symlink("small", top / "sym")
    os.link(top / "sym", top / "z" / "sym-link", follow_symlinks=False)
    os.mkfifo(top / "fifo")
    os.link(top / "fifo", top / "z" / "fifo-link")
    for key in (b"trusted.zz", b"trusted.aa", b"trusted.mm"):
        os.setxattr(top / "small", key, b"v")
    return top


def kids(node: Node) -> dict[bytes, Node]:
    assert node.children is not None
    return node.children


def _scan(top: Path, style: ReadStyle) -> SourceScan:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return scan_source(fd, os.fsencode(top), ScanOptions(style=style))
    finally:
        os.close(fd)


def test_rs_style_links_every_file_type(tmp_path: Path) -> None:
    top = _made_tree(tmp_path)
    scan = _scan(top, ReadStyle.COMPOSEFS_RS)
    children = kids(scan.root)
    sub = kids(children[b"z"])
    for name in (b"big", b"sym", b"fifo"):
        inode = children[name]
        assert inode.link_to is None and inode.nlink == 2, name
        assert sub[name + b"-link"].link_to is inode, name
    # Only regular files are imported, a linked one once.
    assert sorted(rel for rel, _node, _key in scan.files) == [b"big", b"small"]
    assert scan.regular_files == 2
    assert children[b"z"].size == 0 and scan.root.size == 0


def test_rs_style_sorts_xattrs_c_style_keeps_their_order(tmp_path: Path) -> None:
    top = _made_tree(tmp_path)
    listed = [os.fsencode(k) for k in os.listxattr(top / "small")]
    c_keys = [k for k, _ in kids(_scan(top, ReadStyle.C).root)[b"small"].xattrs]
    rs_keys = [k for k, _ in kids(_scan(top, ReadStyle.COMPOSEFS_RS).root)[b"small"].xattrs]
    assert c_keys == listed
    assert rs_keys == sorted(listed)


def test_c_style_links_nothing_but_regular_files_and_only_if_asked(tmp_path: Path) -> None:
    top = _made_tree(tmp_path)
    plain = _scan(top, ReadStyle.C)
    assert all(n.link_to is None for _p, n in plain.root.walk())
    assert kids(plain.root)[b"z"].size > 0
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        linked = scan_source(fd, b"src", ScanOptions(preserve_hardlinks=True))
    finally:
        os.close(fd)
    sub = kids(kids(linked.root)[b"z"])
    assert sub[b"big-link"].link_to is kids(linked.root)[b"big"]
    assert sub[b"sym-link"].link_to is None and sub[b"fifo-link"].link_to is None


def test_rs_style_inline_files_carry_no_digest(tmp_path: Path) -> None:
    top = _made_tree(tmp_path)
    rs = scan_directory(top, ScanOptions(threads=1, style=ReadStyle.COMPOSEFS_RS)).children
    c = scan_directory(top, ScanOptions(threads=1)).children
    assert rs is not None and c is not None
    assert rs[b"small"].content == b"tiny" and rs[b"small"].digest is None
    assert rs[b"small"].payload is None
    assert c[b"small"].content == b"tiny" and c[b"small"].digest is not None
    assert rs[b"big"].digest == c[b"big"].digest is not None


def test_scan_options_cross_to_a_worker_process_intact() -> None:

    for options in (
        ScanOptions(),
        ScanOptions(True, True, False, True, 3, False, False, True, ReadStyle.COMPOSEFS_RS),
    ):
        wire = marshal.loads(marshal.dumps(options.to_wire()))
        assert ScanOptions.from_wire(wire) == options
    with pytest.raises(ValueError):
        ScanOptions.from_wire(ScanOptions().to_wire()[:-1])
    with pytest.raises(ValueError):
        ScanOptions.from_wire((*ScanOptions().to_wire()[:-1], "no-such-style"))
