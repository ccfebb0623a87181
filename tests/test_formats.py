"""EROFS formats V0, V1 and V2 through ``composefsd.image.formats``, against the
composefs-rs 0.9 golden images (``testdata/composefs-rs``, README there).

Every golden image read back and written again in its own format gives the same
bytes; a tree read from one format written in each other format gives cfsctl's
image of that format; the image id is the fs-verity digest of those bytes; the
objects an image references are cfsctl's ``image-objects``. Then the V2 reader on
hostile input, the V2 writer's refusals, and the C tools' behaviour on V2 images
(C composefs-info reads them; composefs-dump cannot write them back).
"""

from __future__ import annotations

import errno
import gzip
import random
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from composefsd.fsverity import digest_bytes
from composefsd.image.format import (
    BLOCK_SIZE,
    EXTENDED_INODE_READ,
    HEADER,
    INODE_SLOT_SIZE,
    SUPERBLOCK,
    SUPERBLOCK_OFFSET,
    metacopy_value,
)
from composefsd.image.formats import ErofsVersion, image_version, write_format
from composefsd.image.reader import ImageFormatError, read_image
from composefsd.image.tree import Node, new_directory
from composefsd.image.writer import WriteError
from rsgolden import ALGORITHMS, EXPECTED, TREES, golden_image, image_objects, trees_json


def _golden_images() -> list[Any]:
    """Every image cfsctl create-image wrote for the trees, with what it printed."""
    out = []
    for tree, facts in trees_json().items():
        for entry in facts["images"]:
            out.append(
                pytest.param(
                    entry,
                    id=f"{tree}-{entry['hash']}-v{entry['erofs_version']}-{entry['variant']}",
                )
            )
    return out


def _oci_images() -> list[Path]:
    return sorted((EXPECTED / "oci").glob("*/images/*/composefs-erofs.gz"))


def _tree_image(tree: str, hash_name: str, version: int) -> bytes:
    return golden_image(f"expected/trees/{tree}/image.{hash_name}.v{version}.erofs.gz")


def test_golden_set_is_complete() -> None:
    """The parametrisations below cover all three formats in both algorithms."""
    seen = {(e["hash"], e["erofs_version"]) for e in (p.values[0] for p in _golden_images())}
    assert seen == {(h, v) for h in ALGORITHMS for v in ("0", "1", "2")}
    assert len(_golden_images()) == len(TREES) * 8
    assert len(_oci_images()) == 10


# -- golden images: version, id, round trip, objects ---------------------------------------


@pytest.mark.parametrize("entry", _golden_images())
def test_golden_image_round_trip(entry: dict[str, Any]) -> None:
    data = golden_image(entry["image_file"])
    version = ErofsVersion(int(entry["erofs_version"]))
    assert image_version(data) is version
    hash_name, hexid = entry["stdout"].split(":")
    assert digest_bytes(data, hash_name).hex() == hexid  # the id is the image's digest

    info = read_image(data, c_quirks=False)
    assert info.composefs_version == version
    assert write_format(info.root, version) == data

    assert image_objects(info.root, hash_name) == entry["image_objects_sorted"]


@pytest.mark.parametrize("path", _oci_images(), ids=lambda p: f"{p.parts[-4]}-{p.parts[-2]}")
def test_oci_image_round_trip(path: Path) -> None:
    data = gzip.decompress(path.read_bytes())
    version = image_version(data)
    assert write_format(read_image(data, c_quirks=False).root, version) == data


@pytest.mark.parametrize("source", [ErofsVersion.V0, ErofsVersion.V1], ids=["from-v0", "from-v1"])
@pytest.mark.parametrize("hash_name", ALGORITHMS)
@pytest.mark.parametrize("tree", TREES)
def test_one_tree_in_every_format(tree: str, hash_name: str, source: ErofsVersion) -> None:
    """The tree read from the V0 or V1 image, written as V0, V1 and V2, is cfsctl's three
    images.

    Those formats keep every fact of the tree (V2 drops sub-second mtimes; the
    marks V1 adds to whiteout directories are dropped when read), so this checks
    the V2 writer against trees that never went through the V2 reader.
    """
    root = read_image(_tree_image(tree, hash_name, source), c_quirks=False).root
    for version in ErofsVersion:
        assert write_format(root, version) == _tree_image(tree, hash_name, version), version


def test_v2_layout_facts() -> None:
    """What sets V2 apart, read from a golden image's bytes."""
    data = _tree_image("t2-special", "sha256", 2)
    _, version, flags, cfs_version = HEADER.unpack_from(data, 0)
    assert (version, flags, cfs_version) == (1, 0, ErofsVersion.V2)
    sb = SUPERBLOCK.unpack_from(data, SUPERBLOCK_OFFSET)
    root_nid, inos, build_time, build_nsec, _, _, xattr_blkaddr = sb[5:12]
    assert (build_time, build_nsec, xattr_blkaddr) == (0, 0, 0)
    # The root is the first inode, extended, with i_ino = its nid and no nsec.
    off = root_nid * INODE_SLOT_SIZE
    assert off == 1152
    fields = EXTENDED_INODE_READ.unpack_from(data, off)
    assert fields[0] & 1 == 1 and fields[8] == 0
    assert struct.unpack_from("<I", data, off + 20)[0] == root_nid
    # Whiteouts are character devices 0/0, kept by the repository reader only.
    rs_tree = read_image(data, c_quirks=False).root
    c_tree = read_image(data).root
    rs_paths = {p for p, n in rs_tree.walk() if n.mode & 0o170000 == stat.S_IFCHR and not n.rdev}
    c_paths = {p for p, _ in c_tree.walk()}
    assert rs_paths and not rs_paths & c_paths
    assert inos == len({id(n.target()) for _, n in rs_tree.walk()})


# -- image_version and write_format errors ------------------------------------------------


def _with_version(data: bytes, version: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into("<I", buf, 12, version)
    return bytes(buf)


def test_image_version_errors() -> None:
    data = _tree_image("t1-basic", "sha256", 2)
    with pytest.raises(ImageFormatError, match="format version 3") as e:
        image_version(_with_version(data, 3))
    assert e.value.errno == errno.ENOTSUP
    with pytest.raises(ImageFormatError, match="too short"):
        image_version(data[:15])
    with pytest.raises(ImageFormatError, match="magic"):
        image_version(b"\0" * 4096)
    with pytest.raises(ImageFormatError, match="header version"):
        image_version(struct.pack("<II", 0xD078629A, 2) + data[8:])


def test_unknown_format_version_in_a_repository() -> None:
    """composefs-rs refuses a composefs_version it does not know; C never looks at it."""
    data = _with_version(_tree_image("t1-basic", "sha256", 1), 7)
    with pytest.raises(ImageFormatError, match="format version 7"):
        read_image(data, c_quirks=False)
    assert read_image(data).composefs_version == 7


def test_write_format_rejects_unknown_versions() -> None:
    root = new_directory()
    with pytest.raises(WriteError) as e:
        write_format(root, 3)  # type: ignore[arg-type]
    assert e.value.errno == errno.EINVAL


def test_metacopy_value() -> None:
    assert metacopy_value(b"\1" * 32) == b"\0\x24\0\1" + b"\1" * 32
    assert metacopy_value(b"\2" * 64) == b"\0\x44\0\2" + b"\2" * 64
    with pytest.raises(ValueError, match="48-byte"):
        metacopy_value(b"\3" * 48)


# -- the V2 writer on its own trees ---------------------------------------------------------


def _file(content: bytes = b"", **kw: Any) -> Node:
    node = Node(mode=stat.S_IFREG | 0o644, **kw)
    node.set_content(content)
    return node


def _sample_tree() -> Node:
    root = new_directory()
    sub = new_directory()
    root.add_child(b"sub", sub)
    a = _file(b"hello", mtime_sec=5, mtime_nsec=123)
    sub.add_child(b"a", a)
    root.add_child(b"link-to-a", Node(mode=0, link_to=a))
    ext = Node(
        mode=stat.S_IFREG | 0o644,
        size=1 << 20,
        payload=b"ab/" + b"c" * 62,
        digest=b"\xab" + b"\xcc" * 31,
    )
    ext.xattrs = [(b"user.z", b"1"), (b"trusted.overlay.x", b"2"), (b"lustre.q", b"3")]
    root.add_child(b"ext", ext)
    root.add_child(b"wh", Node(mode=stat.S_IFCHR | 0o644))
    root.add_child(b"dev", Node(mode=stat.S_IFBLK | 0o600, rdev=0x0801))
    root.add_child(b"sym", Node(mode=stat.S_IFLNK | 0o777, payload=b"x" * 3000))
    for i in range(300):  # a directory spilling into blocks
        sub.add_child(b"entry-%03d-" % i + b"n" * 40, _file(xattrs=[(b"user.shared", b"v")]))
    return root


def test_v2_writer_reads_back() -> None:
    root = _sample_tree()
    data = write_format(root, ErofsVersion.V2)
    assert len(data) % BLOCK_SIZE == 0
    assert write_format(root, ErofsVersion.V2) == data  # deterministic, tree untouched
    back = read_image(data, c_quirks=False).root
    assert write_format(back, ErofsVersion.V2) == data
    got = {p: n.target() for p, n in back.walk()}
    assert got[b"/sub/a"].content == b"hello"
    assert (got[b"/sub/a"].mtime_sec, got[b"/sub/a"].mtime_nsec) == (5, 0)
    assert got[b"/sub/a"].nlink == 2 and got[b"/link-to-a"] is got[b"/sub/a"]
    ext = got[b"/ext"]
    assert ext.payload == b"ab/" + b"c" * 62 and ext.digest == b"\xab" + b"\xcc" * 31
    assert sorted(ext.xattrs) == [
        (b"lustre.q", b"3"),
        (b"trusted.overlay.x", b"2"),
        (b"user.z", b"1"),
    ]
    assert got[b"/wh"].mode == stat.S_IFCHR | 0o644 and got[b"/wh"].rdev == 0
    assert got[b"/dev"].rdev == 0x0801
    assert got[b"/sym"].payload == b"x" * 3000
    assert got[b"/sub"].nlink == 2 and len(got[b"/sub"].children or {}) == 301


def _refuses(root: Node, err: int, match: str) -> None:
    with pytest.raises(WriteError) as e:
        write_format(root, ErofsVersion.V2)
    assert e.value.errno == err
    assert match in e.value.detail


def test_v2_writer_refusals() -> None:
    _refuses(_file(), errno.ENOTDIR, "root is not a directory")

    root = new_directory()
    wh = Node(mode=stat.S_IFCHR)
    root.add_child(b"w1", wh)
    root.add_child(b"w2", Node(mode=0, link_to=wh))
    _refuses(root, errno.EINVAL, "whiteout is hardlinked")

    root = new_directory()
    sub = new_directory()
    root.add_child(b"d1", sub)
    root.add_child(b"d2", sub)
    _refuses(root, errno.EINVAL, "directory is in the tree twice")

    root = new_directory()
    root.add_child(b"bad", Node(mode=0o170644))
    _refuses(root, errno.EINVAL, "invalid file type")

    root = new_directory()
    root.add_child(b"s", Node(mode=stat.S_IFLNK | 0o777))
    _refuses(root, errno.EINVAL, "symlink without a target")

    root = new_directory()
    root.add_child(b"c", Node(mode=stat.S_IFCHR, rdev=1 << 32))
    _refuses(root, errno.EOVERFLOW, "exceeds 32 bits")

    root = new_directory()
    root.children = {b"a/b": _file()}
    _refuses(root, errno.EINVAL, "invalid directory entry name")

    root = new_directory()
    root.xattrs = [(b"user.big%d" % i, b"v" * 60000) for i in range(5)]
    _refuses(root, errno.E2BIG, "xattrs too large")

    root = new_directory()
    root.add_child(b"f", _file(b"x" * 4090))
    _refuses(root, errno.EFBIG, "cannot fit a block")

    loop_a = Node(mode=0)
    loop_b = Node(mode=0, link_to=loop_a)
    loop_a.link_to = loop_b
    root = new_directory()
    root.add_child(b"l", loop_a)
    _refuses(root, errno.ELOOP, "cycle")


# -- the reader on hostile V2 images --------------------------------------------------------


def _read_or_refuse(data: bytes) -> Node | None:
    """Read in both modes; only ImageFormatError may come out."""
    tree: Node | None = None
    for c_quirks in (True, False):
        try:
            tree = read_image(data, c_quirks=c_quirks).root
        except ImageFormatError:
            tree = None
    return tree


@pytest.mark.parametrize("tree", ["t2-special", "t3-xattrs", "t4-names"])
def test_truncated_v2_images(tree: str) -> None:
    data = _tree_image(tree, "sha256", 2)
    for cut in [*range(0, 2048, 97), *range(2048, len(data), 509), len(data) - 1]:
        with pytest.raises(ImageFormatError):
            read_image(data[:cut], c_quirks=False)
        _read_or_refuse(data[:cut])  # C's way reads what it can, or refuses


def test_v2_bad_offsets() -> None:
    data = _tree_image("t3-xattrs", "sha256", 2)
    sb = list(SUPERBLOCK.unpack_from(data, SUPERBLOCK_OFFSET))

    def patched(offset: int, fmt: str, value: int) -> bytes:
        buf = bytearray(data)
        struct.pack_into(fmt, buf, offset, value)
        return bytes(buf)

    root_off = sb[5] * INODE_SLOT_SIZE
    icount = struct.unpack_from("<H", data, root_off + 2)[0]
    dirents = root_off + 64 + (12 + 4 * (icount - 1) if icount else 0)
    n_dirents = struct.unpack_from("<H", data, dirents + 8)[0] // 12
    far = bytearray(data)
    for k in range(n_dirents):
        struct.pack_into("<Q", far, dirents + 12 * k, 1 << 40)
    slash = bytearray(data)
    offsets = [struct.unpack_from("<H", data, dirents + 12 * k + 8)[0] for k in range(n_dirents)]
    first = next(k for k in range(n_dirents) if offsets[k + 1] - offsets[k] > 2)
    slash[dirents + offsets[first]] = ord("/")  # the first name that is not . or ..
    cases = {
        "entries naming inodes past the end": bytes(far),
        "a name with a slash": bytes(slash),
        "root nid past the end": patched(SUPERBLOCK_OFFSET + 14, "<H", 0xFFFF),
        "root nid into the header": patched(SUPERBLOCK_OFFSET + 14, "<H", 0),
        "xattr block past the end": patched(SUPERBLOCK_OFFSET + 44, "<I", 1 << 30),
        "blocks past the end": patched(SUPERBLOCK_OFFSET + 36, "<I", len(data) // BLOCK_SIZE + 1),
        "xattr count past the end": patched(root_off + 2, "<H", 0xFFFF),
        "directory size huge": patched(root_off + 8, "<Q", 1 << 40),
    }
    for what, bad in cases.items():
        with pytest.raises(ImageFormatError):
            read_image(bad, c_quirks=False)
            pytest.fail(what)


def test_v2_random_damage_is_refused_or_read() -> None:
    """Single flipped bytes anywhere in the metadata: a clean error or a tree, never a crash;
    and a damaged tree that reads is written again or refused with WriteError."""
    rng = random.Random(20261207)
    for tree in ("t2-special", "t3-xattrs"):
        data = _tree_image(tree, "sha256", 2)
        for _ in range(150):
            buf = bytearray(data)
            pos = rng.randrange(SUPERBLOCK_OFFSET, min(len(buf), 3 * BLOCK_SIZE))
            buf[pos] ^= 1 << rng.randrange(8)
            root = _read_or_refuse(bytes(buf))
            if root is not None:
                try:
                    write_format(root, ErofsVersion.V2)
                except WriteError:
                    pass


# -- the C tools on V2 images ----------------------------------------------------------------


def _launcher(module: str, name: str) -> list[str]:
    code = f"import sys; from {module} import main; sys.argv[0] = {name!r}; sys.exit(main())"
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("hash_name", ALGORITHMS)
@pytest.mark.parametrize("tree", ["t2-special", "t3-xattrs", "t6-rootfs"])
def test_composefs_info_reads_v2_like_c(
    tree: str, hash_name: str, reference_bin: Path, tmp_path: Path
) -> None:
    """C 1.0.8 checks only the header version, so it reads V2 (skipping its whiteouts)."""
    image = tmp_path / "v2.img"
    image.write_bytes(_tree_image(tree, hash_name, 2))
    for command in ("dump", "ls", "objects", "missing-objects"):
        args = [command, str(image)] + (
            ["--basedir", str(tmp_path)] if "missing" in command else []
        )
        c = subprocess.run([str(reference_bin / "composefs-info"), *args], capture_output=True)
        ours = subprocess.run(
            [*_launcher("composefsd.cli.info", "composefs-info"), *args], capture_output=True
        )
        assert (ours.returncode, ours.stdout) == (c.returncode, c.stdout), command
        assert c.returncode == 0 and c.stdout


def test_composefs_dump_cannot_write_v2(tmp_path: Path) -> None:
    """composefs-dump writes the image again in its header's version; C's writer knows 0..1."""
    image = tmp_path / "v2.img"
    image.write_bytes(_tree_image("t1-basic", "sha256", 2))
    res = subprocess.run(
        [*_launcher("composefsd.cli.dump", "composefs-dump"), str(image), str(tmp_path / "out")],
        capture_output=True,
    )
    assert res.returncode == 1
    assert res.stderr == b"composefs-dump: cannot write file: Invalid argument\n"
