"""The EROFS image reader and the dump/ls printer against C composefs-info 1.0.8.

Every checksum asset of the C test suite and the fuzzing corpus is built with C
mkcomposefs; our reader + printer must then reproduce C ``composefs-info ls``,
``dump`` and ``objects`` byte for byte, and rewriting what we read must give back
the very same image. Hand-made dumpfiles pin the reader quirks. Hostile images
(truncated, bit-flipped, crafted) must parse or raise ImageFormatError, promptly
and within bounded memory.
"""

from __future__ import annotations

import gzip
import os
import random
import stat
import struct
import subprocess
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from composefsd.image.dump_print import format_dump, format_ls, print_dump
from composefsd.image.escape import (
    Escape,
    UnescapeError,
    escape,
    escape_equal,
    escape_lone_dash,
    escape_no_space,
    escape_standard,
    unescape,
    unescape_optional,
)
from composefsd.image.reader import (
    ImageFormatError,
    iter_objects,
    read_header,
    read_image,
)
from composefsd.image.tree import Node
from composefsd.image.writer import write_image

NON_STRICT = {"no-newline.dump", "longlink.dump", "honggfuzz-longlink-unterminated.dump"}
CORPUS = ("alpine", "busybox", "fedora", "dump-example")


@dataclass(slots=True, frozen=True)
class Built:
    name: str
    image: Path
    checksum_asset: bool  # the C suite requires composefs-dump to reproduce it exactly


def _asset_source(path: Path) -> bytes:
    data = path.read_bytes()
    # special_v1.dump is a git symlink; a checkout without symlinks holds its target name.
    if len(data) < 64 and b"\n" not in data and (path.parent / data.decode()).is_file():
        data = (path.parent / data.decode()).read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data


def _mkcomposefs(
    bindir: Path, dump: bytes, out: Path, args: list[str] | None = None, *, strict: bool = False
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CFS_PARSE_STRICT"}
    if strict:
        env["CFS_PARSE_STRICT"] = "1"
    res = subprocess.run(
        [str(bindir / "mkcomposefs"), *(args or []), "--from-file", "-", str(out)],
        input=dump,
        env=env,
        capture_output=True,
    )
    assert res.returncode == 0, res.stderr


def _c_info(bindir: Path, *args: str | Path) -> bytes:
    return subprocess.run(
        [str(bindir / "composefs-info"), *map(str, args)], check=True, capture_output=True
    ).stdout


@pytest.fixture(scope="session")
def built_images(
    reference_bin: Path, testdata: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[Built]:
    out = tmp_path_factory.mktemp("c-images")
    images: list[Built] = []
    assets = testdata / "assets"
    for checksum in sorted(assets.glob("*.sha256")):
        src = checksum.with_suffix("")
        if not src.exists():
            continue  # the C suite silently skips checksums without an asset too
        args: list[str] = []
        version = src.with_name(src.name + ".version")
        if version.exists():
            v = version.read_text().strip()
            args = [f"--min-version={v}", f"--max-version={v}"]
        image = out / (src.name + ".cfs")
        _mkcomposefs(
            reference_bin, _asset_source(src), image, args, strict=src.name not in NON_STRICT
        )
        images.append(Built(src.name, image, True))
    for name in CORPUS:
        image = out / (name + ".cfs")
        _mkcomposefs(reference_bin, (testdata / "fuzzing" / name).read_bytes(), image)
        images.append(Built(name, image, False))
    assert len(images) >= 17
    return images


def test_assets_and_corpus_match_c_composefs_info(
    built_images: list[Built], reference_bin: Path
) -> None:
    for b in built_images:
        info = read_image(b.image.read_bytes())
        assert format_dump(info.root) == _c_info(reference_bin, "dump", b.image), b.name
        assert format_ls(info.root) == _c_info(reference_bin, "ls", b.image), b.name
        objects = b"".join(p + b"\n" for p in sorted(iter_objects(info.root)))
        assert objects == _c_info(reference_bin, "objects", b.image), b.name


def test_rewriting_what_we_read_reproduces_the_image(
    built_images: list[Built], reference_bin: Path, tmp_path: Path
) -> None:
    for b in built_images:
        data = b.image.read_bytes()
        info = read_image(data)
        again = write_image(info.root, min_version=info.composefs_version, max_version=0)
        if b.checksum_asset:
            assert again == data, b.name
        else:
            # The corpus is not required to round-trip (fedora does not, in C either);
            # C's own read-back path is "composefs-info dump | mkcomposefs".
            c_again = tmp_path / (b.name + ".again")
            v = info.composefs_version
            _mkcomposefs(
                reference_bin,
                _c_info(reference_bin, "dump", b.image),
                c_again,
                [f"--min-version={v}", "--max-version=0"],
            )
            assert again == c_again.read_bytes(), b.name


def test_filter_matches_c_and_the_c_suite(built_images: list[Built], reference_bin: Path) -> None:
    special = next(b for b in built_images if b.name == "special.dump")
    filters = [b"chardev", b"inline", b"whiteout"]
    info = read_image(special.image.read_bytes(), filters=filters)
    ours = format_dump(info.root)
    args = [f"--filter={f.decode()}" for f in filters]
    assert ours == _c_info(reference_bin, *args, "dump", special.image)
    lines = ours.decode("latin-1").splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("/ 4096 40555") and "trusted.foo1" in lines[0]
    assert lines[1].startswith("/chardev 0 20777")
    assert lines[2].startswith("/inline 15 100777") and "FOOBAR" in lines[2]
    assert lines[3].startswith("/whiteout 0 20777")
    assert set(info.root.children or {}) == {b"chardev", b"inline", b"whiteout"}


def test_header_and_info_fields(built_images: list[Built]) -> None:
    for b in built_images:
        data = b.image.read_bytes()
        header = read_header(data)
        info = read_image(data)
        assert header.composefs_version == info.composefs_version
        assert header.flags == info.flags
        assert info.blocks * 4096 == len(data)
        assert info.root_nid >= 36
        # the superblock counts the root's 256 whiteouts, which the reader skips
        assert info.inodes_read <= info.inodes
    acl = next(b for b in built_images if b.name == "honggfuzz-bigfile-with-acl.dump")
    assert read_image(acl.image.read_bytes()).flags & 1


# --------------------------------------------------------------------------------------
# reader quirks, each pinned against C


def _build_and_compare(reference_bin: Path, tmp_path: Path, dump: bytes, *args: str) -> Node:
    image = tmp_path / "img.cfs"
    _mkcomposefs(reference_bin, dump, image, list(args))
    info = read_image(image.read_bytes())
    assert format_dump(info.root) == _c_info(reference_bin, "dump", image)
    assert format_ls(info.root) == _c_info(reference_bin, "ls", image)
    return info.root


DIGEST = "0123456789abcdef" * 4


def test_redirect_read_back_off_by_one(reference_bin: Path, tmp_path: Path) -> None:
    dump = (
        b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
        # payload length 7 (3 mod 4): C appends the chunk index bytes
        b"/a 10000 100644 1 0 0 0 0.0 ab/cdef - " + DIGEST.encode() + b"\n"
        # length 4: zero padding follows, nothing appended
        b"/b 10000 100644 1 0 0 0 0.0 abcd - -\n"
        # the usual 65-character digest path
        b"/c 10000 100644 1 0 0 0 0.0 01/" + DIGEST[2:].encode() + b"0 - -\n"
        # shared redirect (two files): C appends the next shared entry's header bytes
        b"/d 10 100644 1 0 0 0 0.0 sh/are - -\n"
        b"/e 10 100644 1 0 0 0 0.0 sh/are - -\n"
    )
    root = _build_and_compare(reference_bin, tmp_path, dump)
    assert root.children is not None
    assert root.children[b"a"].payload == b"ab/cdef\xff\xff"
    assert root.children[b"a"].digest == bytes.fromhex(DIGEST)
    assert root.children[b"b"].payload == b"abcd"
    assert root.children[b"c"].payload == b"01/" + DIGEST[2:].encode() + b"0"


def test_final_four_byte_inline_xattr_is_dropped(reference_bin: Path, tmp_path: Path) -> None:
    dump = (
        b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
        b"/f 0 100644 1 0 0 0 0.0 - - - user.=\n"
        b"/g 0 100644 1 0 0 0 0.0 - - - security.= user.zz=1\n"
    )
    root = _build_and_compare(reference_bin, tmp_path, dump)
    assert root.children is not None
    # a unique "user.=" is a lone 4-byte inline entry, the last one: C drops it
    assert root.children[b"f"].xattrs == []
    # not last: kept
    assert root.children[b"g"].xattrs == [(b"security.", b""), (b"user.zz", b"1")]


def test_whiteouts_escapes_and_xattr_order(reference_bin: Path, tmp_path: Path) -> None:
    dump = (
        b"/ 4096 40755 2 0 0 0 0.0 - - - user.s=1\n"
        b"/d 4096 40755 2 0 0 0 0.0 - - - user.s=1 user.a=2 trusted.overlay.x=esc\n"
        b"/d/w 0 20000 1 0 0 0 0.0 - - -\n"
        b"/d/c 0 20644 1 0 0 5 0.0 - - -\n"
        b"/00 0 20000 1 0 0 0 0.0 - - -\n"
        b"/f 3 100644 1 0 0 0 0.0 - a=b - security.k=\\x3d= user.\\x3d=\\x2d\n"
        b"/l 3 120777 1 0 0 0 0.0 x\\ty - -\n"
        b"/- 0 100644 1 0 0 0 0.0 \\x2d - -\n"
    )
    root = _build_and_compare(reference_bin, tmp_path, dump)
    assert root.children is not None
    d = root.children[b"d"]
    assert d.children is not None
    # an escaped whiteout reads back as a whiteout; a real one (the root's 00) is skipped
    # unless the dump named it, in which case it was escaped too
    assert stat.S_ISCHR(d.children[b"w"].mode) and d.children[b"w"].rdev == 0
    assert d.children[b"c"].rdev == 5
    keys = [k for k, _ in d.xattrs]
    # inline first (ascending), then shared; the version 1 opaque marker shows unescaped
    assert keys[-1] == b"user.s"
    assert b"trusted.overlay.x" in keys and b"trusted.overlay.opaque" in keys
    names = set(root.children)
    assert b"00" in names and b"01" not in names


def test_hardlinks_print_the_target_wherever_it_is(reference_bin: Path, tmp_path: Path) -> None:
    dump = (
        b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
        b"/z 4096 40755 2 0 0 0 0.0 - - -\n"
        b"/z/target 5 100644 3 7 8 0 5.6 - hello - user.k=v\n"
        b"/a 0 @100644 1 0 0 0 0.0 /z/target - -\n"
        b"/z/b 0 @100644 1 0 0 0 0.0 /a - -\n"
    )
    root = _build_and_compare(reference_bin, tmp_path, dump)
    assert root.children is not None
    # C's depth-first walk meets /a first, so /a is the inode and /z/target the link
    a = root.children[b"a"]
    z = root.children[b"z"]
    assert z.children is not None
    assert a.link_to is None and a.content == b"hello"
    assert z.children[b"target"].link_to is a
    assert z.children[b"target"].mode == 0
    assert format_dump(root).endswith(
        b"/z/b 5 @100644 3 7 8 0 5.6 /a hello - user.k=v\n"
        b"/z/target 5 @100644 3 7 8 0 5.6 /a hello - user.k=v\n"
    )


def test_deep_tree_is_read_iteratively(reference_bin: Path, tmp_path: Path) -> None:
    # deeper than Python's recursion limit (and than C composefs-info's stack: it
    # crashes on this image, so only the structure is checked here)
    depth = 3000
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    path = b""
    for _ in range(depth):
        path += b"/d"
        lines.append(path + b" 4096 40755 2 0 0 0 0.0 - - -")
    lines.append(path + b"/f 3 100644 1 0 0 0 0.0 - abc -")
    image = tmp_path / "deep.cfs"
    _mkcomposefs(reference_bin, b"\n".join(lines) + b"\n", image)
    data = image.read_bytes()
    root = read_image(data).root
    node = root
    for _ in range(depth):
        assert node.children is not None
        node = node.children[b"d"]
    assert node.children is not None and node.children[b"f"].content == b"abc"
    dump = format_dump(root)
    assert dump.count(b"\n") == depth + 2
    assert dump.endswith(path + b"/f 3 100644 1 0 0 0 0.0 - abc -\n")
    assert write_image(root, min_version=0, max_version=0) == data


def test_print_dump_streams_the_same_bytes(built_images: list[Built]) -> None:
    import io

    b = next(b for b in built_images if b.name == "config.dump.gz")
    root = read_image(b.image.read_bytes()).root
    out = io.BytesIO()
    print_dump(root, out)
    assert out.getvalue() == format_dump(root)


def test_reader_accepts_mmap_memoryview_bytearray(built_images: list[Built]) -> None:
    import mmap

    b = next(b for b in built_images if b.name == "special.dump")
    data = b.image.read_bytes()
    expected = format_dump(read_image(data).root)
    assert format_dump(read_image(memoryview(data)).root) == expected
    assert format_dump(read_image(bytearray(data)).root) == expected
    with open(b.image, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert format_dump(read_image(mm).root) == expected


# --------------------------------------------------------------------------------------
# escaping


def test_escape_levels() -> None:
    data = bytes(range(256))
    std = escape_standard(data)
    assert std.startswith(b"\\x00\\x01")
    assert b"\\t\\n\\x0b\\x0c\\r" in std
    assert b"\\x1f\\x20!" in std and b"~\\x7f\\x80" in std and std.endswith(b"\\xff")
    assert b"\\\\" in std and b"<=>" in std
    assert b"\\x1f !" in escape_no_space(data)
    assert b"<\\x3d>" in escape_equal(data)
    assert escape_lone_dash(b"-") == b"\\x2d"
    assert escape_lone_dash(b"--") == b"--"
    assert escape_standard(b"-") == b"-"
    assert escape(b"a=b c", level=Escape.EQUAL | Escape.NOESCAPE_SPACE) == b"a\\x3db c"
    assert escape(b"-", level=Escape.LONE_DASH) == b"\\x2d"
    plain = b"usr/lib/x86_64-linux-gnu/libc.so.6"
    assert escape_standard(plain) is plain
    for level in range(8):
        assert unescape(escape(data, level=level)) == data


def test_unescape() -> None:
    assert unescape(b"a\\\\b\\n\\r\\t\\x41\\xfF") == b"a\\b\n\r\tA\xff"
    assert unescape(b"plain") == b"plain"
    assert unescape_optional(b"-") is None
    assert unescape_optional(b"\\x2d") == b"-"
    cases = {
        b"a\\": "No character after escape",
        b"\\x": "No hex characters after hex escape",
        b"\\x4": "No hex characters after hex escape",
        b"\\xg1": "Invalid hex characters after hex escape",
        b"\\q": "Unsupported escape type q",
    }
    for raw, message in cases.items():
        with pytest.raises(UnescapeError) as exc:
            unescape(raw)
        assert str(exc.value) == message


# --------------------------------------------------------------------------------------
# hostile images

#: A hang guard, not a speed check: a bounded parser answers these images in
#: milliseconds even on a loaded machine, an unbounded one would take hours.
TIME_LIMIT = 60.0


def _read_hostile(data: bytes) -> None:
    """The image must parse or fail with ImageFormatError, quickly."""
    start = time.perf_counter()
    try:
        info = read_image(data)
        format_dump(info.root)
        format_ls(info.root)
    except ImageFormatError as e:
        assert e.errno is not None and str(e)
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT, f"took {elapsed:.2f}s"


@pytest.fixture(scope="module")
def small_image(reference_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A compact image with most inode kinds, xattrs (shared and inline) and hardlinks."""
    lines = [
        b"/ 4096 40755 2 0 0 0 0.0 - - - user.shared=1",
        b"/dir 4096 40755 2 0 0 0 0.0 - - - user.shared=1 security.selinux=x",
        b"/dir/big 4096 40755 2 0 0 0 0.0 - - -",
        *(b"/dir/big/entry-%03d 0 100644 1 0 0 0 0.0 - - -" % i for i in range(250)),
        b"/dir/ext 10000 100644 1 0 0 0 0.0 ab/cdef - " + DIGEST.encode(),
        b"/dir/inl 5 100644 1 1000 1000 0 2000.5 - hello -",
        b"/dir/blk 3000 100644 1 0 0 0 0.0 - " + b"x" * 3000 + b" -",
        b"/dir/sym 3 120777 1 0 0 0 0.0 foo - -",
        b"/dir/longsym 4000 120777 1 0 0 0 0.0 " + b"y" * 4000 + b" - -",
        b"/dir/wh 0 20000 1 0 0 0 0.0 - - -",
        b"/dir/dev 0 60644 1 0 0 259 0.0 - - -",
        b"/dir/link 0 @100644 1 0 0 0 0.0 /dir/inl - -",
        b"/fifo 0 10644 1 0 0 0 0.0 - - - user.a=b",
    ]
    out = tmp_path_factory.mktemp("hostile") / "small.cfs"
    _mkcomposefs(reference_bin, b"\n".join(lines) + b"\n", out)
    data = out.read_bytes()
    read_image(data)  # sanity: the pristine image reads
    return data


def test_truncated_images(small_image: bytes) -> None:
    size = len(small_image)
    offsets = set(range(0, size, 211)) | {0, 31, 32, 1024, 1151, 1152, 4095, 4096, size - 1}
    for cut in sorted(offsets):
        data = small_image[:cut]
        if cut < 4096:
            with pytest.raises(ImageFormatError):
                read_image(data)
        else:
            _read_hostile(data)


def test_random_byte_flips(small_image: bytes) -> None:
    rng = random.Random(0xC0FFEE)
    size = len(small_image)
    # bias towards the metadata, where flips change structure rather than file data
    meta_end = min(size, 16384)
    for _ in range(400):
        data = bytearray(small_image)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(1024, meta_end) if rng.random() < 0.9 else rng.randrange(size)
            data[pos] = (
                rng.randrange(256) if rng.random() < 0.5 else data[pos] ^ (1 << rng.randrange(8))
            )
        _read_hostile(bytes(data))


def _root_entries(data: bytes) -> dict[bytes, tuple[int, int]]:
    """name -> (nid, offset of its dirent) for the root, read independently of the reader."""
    root_nid = struct.unpack_from("<H", data, 1024 + 14)[0]
    off = root_nid * 32
    fmt = struct.unpack_from("<H", data, off)[0]
    assert fmt == 0  # compact, dirents in full blocks
    size, blkaddr = struct.unpack_from("<I4xI", data, off + 8)
    out = {}
    for blk in range(-(-size // 4096)):
        base = (blkaddr + blk) * 4096
        n = struct.unpack_from("<H", data, base + 8)[0] // 12
        dirents = [struct.unpack_from("<QH", data, base + 12 * i) for i in range(n)]
        for i, (nid, nameoff) in enumerate(dirents):
            if i + 1 < n:
                end = base + dirents[i + 1][1]
            else:
                block = data[base : base + 4096]
                end = base + (
                    block.find(b"\0", nameoff) % 4097 if b"\0" in block[nameoff:] else 4096
                )
            out[data[base + nameoff : end]] = (nid, base + 12 * i)
    return out


def test_crafted_dirent_pointing_outside(small_image: bytes) -> None:
    entries = _root_entries(small_image)
    for nid in (len(small_image) // 32, 2**40, 2**64 - 1):
        data = bytearray(small_image)
        struct.pack_into("<Q", data, entries[b"fifo"][1], nid)
        with pytest.raises(ImageFormatError, match="past end of image"):
            read_image(bytes(data))


def test_crafted_directory_loop_becomes_hardlink(small_image: bytes) -> None:
    entries = _root_entries(small_image)
    root_nid = struct.unpack_from("<H", small_image, 1024 + 14)[0]
    data = bytearray(small_image)
    # /fifo now names the root itself: a cycle for a naive walker
    struct.pack_into("<Q", data, entries[b"fifo"][1], root_nid)
    info = read_image(bytes(data))
    assert info.root.children is not None
    loop = info.root.children[b"fifo"]
    assert loop.link_to is info.root and loop.mode == 0
    # C's hardlink path for the root is empty
    assert b"\n/fifo 4096 @40755 3 0 0 0 0.0  - - user.shared=1\n" in format_dump(info.root)


def _inode_offset(data: bytes, name: bytes) -> int:
    return _root_entries(data)[name][0] * 32


def test_crafted_huge_xattr_count_and_lying_sizes(small_image: bytes) -> None:
    off = _inode_offset(small_image, b"dir")
    fifo = _inode_offset(small_image, b"fifo")
    patches: list[tuple[int, str, int]] = [
        (off + 2, "<H", 0xFFFF),  # i_xattr_icount
        (fifo + 2, "<H", 0xFFFF),
        (off + 8, "<I", 0xFFFFFFFF),  # directory i_size
        (off + 16, "<I", 0xFFFFFFFF),  # raw_blkaddr
        (fifo + 4, "<H", stat.S_IFLNK | 0o777),  # a fifo claiming to be a symlink
        (fifo + 4, "<H", stat.S_IFREG | 0o644),
        (fifo + 8, "<I", 4095),
        (off + 4, "<H", stat.S_IFREG | 0o644),  # a directory claiming to be a file
        (off + 0, "<H", 1 | (2 << 1)),  # compact -> extended, inline layout
        (off + 0, "<H", 6 << 1),  # unknown layout
        (fifo + 32 + 4, "<B", 255),  # h_shared_count
        (fifo + 32 + 12, "<I", 0xFFFFFFFF),  # inline xattr header garbage
        (1024 + 44, "<I", 0xFFFF),  # xattr_blkaddr
        (1024 + 40, "<I", 1),  # meta_blkaddr
        (1024 + 14, "<H", 0xFFFF),  # root_nid
    ]
    for pos, fmt, value in patches:
        data = bytearray(small_image)
        struct.pack_into(fmt, data, pos, value)
        _read_hostile(bytes(data))
    data = bytearray(small_image)
    struct.pack_into("<I", data, 1024 + 44, 0xFFFF)
    with pytest.raises(ImageFormatError, match="shared xattr block"):
        read_image(bytes(data))
    data = bytearray(small_image)
    struct.pack_into("<I", data, 0, 0x12345678)
    with pytest.raises(ImageFormatError) as exc:
        read_image(bytes(data))
    assert exc.value.errno == 22
    data = bytearray(small_image)
    struct.pack_into("<I", data, 4, 2)
    with pytest.raises(ImageFormatError) as exc:
        read_image(bytes(data))
    assert exc.value.errno == 95


def test_shared_directory_blocks_hit_the_work_bound(reference_bin: Path, tmp_path: Path) -> None:
    """Many directories made to share one dirent block must not multiply the work."""
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    lines += [b"/d%04d 4096 40755 2 0 0 0 0.0 - - -" % i for i in range(400)]
    lines += [b"/d0000/f%03d 0 100644 1 0 0 0 0.0 - - -" % i for i in range(300)]
    image = tmp_path / "many.cfs"
    _mkcomposefs(reference_bin, b"\n".join(lines) + b"\n", image)
    data = bytearray(image.read_bytes())
    entries = _root_entries(bytes(data))
    root_nid = struct.unpack_from("<H", data, 1024 + 14)[0]
    root_off = root_nid * 32
    root_size, root_blk = struct.unpack_from("<I4xI", data, root_off + 8)
    for name, (nid, _) in entries.items():
        if name.startswith(b"d"):
            off = nid * 32
            # every directory now claims the root's 5 dirent blocks
            struct.pack_into("<H", data, off, 0)
            struct.pack_into("<I", data, off + 8, root_size)
            struct.pack_into("<I", data, off + 16, root_blk)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(ImageFormatError, match="overlap or repeat"):
            read_image(bytes(data))
        assert time.perf_counter() - start < TIME_LIMIT
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(data)


def test_huge_claimed_sizes_allocate_nothing_big(small_image: bytes) -> None:
    entries = _root_entries(small_image)
    fifo = entries[b"fifo"][0] * 32
    dir_off = entries[b"dir"][0] * 32
    cases = []
    data = bytearray(small_image)  # extended dir with a 2^62-byte size
    struct.pack_into("<HHH2xQI", data, dir_off, 1, 0, stat.S_IFDIR | 0o755, 1 << 62, 0)
    cases.append(bytes(data))
    data = bytearray(small_image)  # inline file claiming 4 GiB
    struct.pack_into("<HHHHI", data, fifo, 0, 0, stat.S_IFREG | 0o644, 1, 0xFFFFFFFF)
    cases.append(bytes(data))
    data = bytearray(small_image)  # symlink claiming 4 GiB
    struct.pack_into("<HHHHI", data, fifo, 2 << 1, 0, stat.S_IFLNK | 0o777, 1, 0xFFFFFFFF)
    cases.append(bytes(data))
    for case in cases:
        tracemalloc.start()
        try:
            with pytest.raises(ImageFormatError):
                read_image(case)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 * 1024 * 1024


def test_usr_sized_image_reads(reference_bin: Path, tmp_path: Path) -> None:
    """A 60,000-entry image reads whole and dumps as C does (how fast, beside C:
    benchmarks/bench_dump_to_image.py)."""
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    for d in range(300):
        lines.append(b"/d%03d 4096 40755 2 0 0 0 0.0 - - - security.selinux=usr_t" % d)
        for f in range(200):
            lines.append(
                b"/d%03d/f%03d 10000 100644 1 0 0 0 0.0 %02x/%062d - %s"
                % (d, f, f, d * 1000 + f, DIGEST.encode())
            )
    image = tmp_path / "wide.cfs"
    _mkcomposefs(reference_bin, b"\n".join(lines) + b"\n", image)
    info = read_image(image.read_bytes())
    assert info.inodes_read == 1 + 300 + 300 * 200
    assert format_dump(info.root) == _c_info(reference_bin, "dump", image)


def test_reader_xattr_setter_equals_node_set_xattr() -> None:
    """The reader's indexed setter must behave exactly like Node.set_xattr(limit=65535)."""
    from composefsd.image.reader import _Reader
    from composefsd.image.tree import XATTR_ESTIMATE_MAX_READER, TreeError

    rng = random.Random(7)
    keys = [b"user.a", b"user.bb", b"trusted.c", b"security.selinux", b"user.e" * 40]
    for _ in range(300):
        ours, ref = Node(stat.S_IFREG), Node(stat.S_IFREG)
        index: dict[bytes, int] = {}
        for _ in range(rng.randint(1, 40)):
            key = rng.choice(keys)
            value = b"v" * rng.choice([0, 1, 5, 300, 20000])
            try:
                ref.set_xattr(key, value, limit=XATTR_ESTIMATE_MAX_READER)
                ref_err = None
            except TreeError as e:
                ref_err = e.errno
            try:
                _Reader._set_xattr(ours, index, 1, key, value)
                our_err = None
            except ImageFormatError as e:
                our_err = e.errno
            assert our_err == ref_err
            assert ours.xattrs == ref.xattrs
            assert ours.xattr_estimate == ref.xattr_estimate
