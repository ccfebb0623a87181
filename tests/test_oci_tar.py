"""OCI layer tars read from splitstream chunks and applied in order
(composefsd.image.ocitar), against hand-made tars: entry parsing, layer semantics
and hostile input."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile

import pytest

from composefsd.image.ocitar import (
    EntryKind,
    LayerTree,
    TarEntry,
    TarError,
    checksum_ok,
    iter_entries,
    makedev,
)
from composefsd.image.tree import Node


def _info(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_700_000_000
    for key, value in kw.items():
        setattr(info, key, value)
    return info


def make_tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8") as tar:
        for info, data in members:
            if info.type == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return out.getvalue()


def chunks(data: bytes) -> list[bytes | str]:
    """The chunks composefs-rs's splitter makes of a tar: file data over 64 bytes
    as an external object (here its sha256 standing in for the digest)."""
    out: list[bytes | str] = []
    pos = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isreg() and info.size > 64:
                out.append(data[pos : info.offset_data])
                content = data[info.offset_data : info.offset_data + info.size]
                out.append(hashlib.sha256(content).hexdigest())
                pos = info.offset_data + info.size
    out.append(data[pos:])
    return out


def entries(members: list[tuple[tarfile.TarInfo, bytes]], **kw: int) -> list[TarEntry]:
    return list(iter_entries(chunks(make_tar(members, **kw))))


def build(*layers: list[tuple[tarfile.TarInfo, bytes]]) -> Node:
    tree = LayerTree()
    for layer in layers:
        tree.apply_layer(chunks(make_tar(layer)))
    return tree.finish()


def lookup(root: Node, path: str) -> Node | None:
    node = root
    for part in path.encode().split(b"/"):
        assert node.children is not None
        found = node.children.get(part)
        if found is None:
            return None
        node = found
    return node


# -- entries -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_entry_fields(fmt: int) -> None:
    big = bytes(range(256)) * 3
    members = [
        (_info("./", tarfile.DIRTYPE), b""),
        (_info("./etc", tarfile.DIRTYPE, uid=12, gid=34), b""),
        (_info("./etc/small", mode=0o4755), b"tiny"),
        (_info("etc/big"), big),
        (_info("etc/sym", tarfile.SYMTYPE, linkname="../small"), b""),
        (_info("etc/hard", tarfile.LNKTYPE, linkname="./etc/small"), b""),
        (_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
        (_info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), b""),
        (_info("fifo", tarfile.FIFOTYPE), b""),
    ]
    got = entries(members, fmt=fmt)
    assert [e.components for e in got] == [
        (),
        (b"etc",),
        (b"etc", b"small"),
        (b"etc", b"big"),
        (b"etc", b"sym"),
        (b"etc", b"hard"),
        (b"dev", b"null"),
        (b"dev", b"sda"),
        (b"fifo",),
    ]
    root, etc, small, bigf, sym, hard, null, sda, fifo = got
    assert root.kind is EntryKind.DIRECTORY and (etc.uid, etc.gid) == (12, 34)
    assert small.content == b"tiny" and small.mode == 0o4755 and small.mtime_sec == 1_700_000_000
    assert bigf.object == hashlib.sha256(big).hexdigest() and bigf.size == len(big)
    assert sym.link == b"../small"
    assert hard.kind is EntryKind.HARDLINK and hard.link_components == (b"etc", b"small")
    assert null.rdev == makedev(1, 3) and sda.rdev == makedev(8, 0)
    assert fifo.kind is EntryKind.FIFO


def test_long_names_pax_gnu_and_ustar_prefix() -> None:
    deep = "/".join(["d" * 60] * 5)  # > 255 bytes
    name = "n" * 150  # > 100 bytes in one component
    target = deep + "/" + name
    members = [(_info("/".join(["d" * 60] * (i + 1)), tarfile.DIRTYPE), b"") for i in range(5)]
    members += [(_info(target), b"data"), (_info("hl", tarfile.LNKTYPE, linkname=target), b"")]
    members += [(_info("sl", tarfile.SYMTYPE, linkname="x" * 300), b"")]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        got = entries(members, fmt=fmt)
        assert got[5].path == target.encode()
        assert got[6].link_components == tuple(target.encode().split(b"/"))
        assert got[7].link == b"x" * 300
    # ustar: the prefix field holds the directories of a name up to 255 bytes
    prefix = "p" * 120 + "/" + "q" * 30
    got = entries(
        [(_info(prefix.split("/")[0], tarfile.DIRTYPE), b""), (_info(prefix), b"x")],
        fmt=tarfile.USTAR_FORMAT,
    )
    assert got[1].components == (b"p" * 120, b"q" * 30)


def test_pax_numbers_xattrs_and_nanoseconds() -> None:
    info = _info("f", uid=3_000_000, gid=4_000_000_000)
    info.pax_headers = {
        "mtime": "1612052716.018102657",
        "SCHILY.xattr.user.b": "two",
        "SCHILY.xattr.security.capability": "\x01\x02",
        "SCHILY.xattr.user.a": "one",
    }
    (entry,) = entries([(info, b"x")])
    assert (entry.uid, entry.gid) == (3_000_000, 4_000_000_000)
    assert (entry.mtime_sec, entry.mtime_nsec) == (1612052716, 18102657)
    assert [k for k, _ in entry.xattrs] == [b"security.capability", b"user.a", b"user.b"]
    info.pax_headers = {"mtime": "5.5"}
    (entry,) = entries([(info, b"x")])
    assert (entry.mtime_sec, entry.mtime_nsec) == (5, 500_000_000)


def test_non_utf8_names() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        info = _info("caf\xe9")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (entry,) = iter_entries([out.getvalue()])
    assert entry.components == (b"caf\xe9",)


def test_global_pax_headers_are_skipped() -> None:
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "ignored"}
    ) as tar:
        info = _info("real")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (entry,) = iter_entries([out.getvalue()])
    assert entry.path == b"real"


# -- layers ----------------------------------------------------------------------------------


def test_layer_semantics() -> None:
    d = tarfile.DIRTYPE
    base = [
        (_info("usr", d), b""),
        (_info("a", d), b""),
        (_info("a/f"), b"f"),
        (_info("a/g"), b"g"),
        (_info("opq", d), b""),
        (_info("opq/old"), b"old"),
        (_info("src"), b"source v1"),
        (_info("thing"), b"a file"),
        (_info("data", d), b""),
        (_info("data/inner"), b"inner"),
        (_info("merge", d, uid=1), b""),
        (_info("merge/kept"), b"kept"),
    ]
    top = [
        (_info("a/.wh.f"), b""),
        (_info(".wh.nonexistent"), b""),
        (_info("opq/before"), b"same layer, before the marker"),
        (_info("opq/.wh..wh..opq"), b""),
        (_info("opq/after"), b"after"),
        (_info("link", tarfile.LNKTYPE, linkname="src"), b""),
        (_info("src"), b"source v2"),
        (_info("thing", d), b""),
        (_info("thing/x"), b"x"),
        (_info("data"), b"now a file"),
        (_info("merge", d, uid=2, mode=0o700), b""),
        (_info("wh", tarfile.CHRTYPE, devmajor=0, devminor=0), b""),
    ]
    root = build(base, top)
    assert lookup(root, "a/f") is None and lookup(root, "a/g") is not None
    opq = lookup(root, "opq")
    assert opq is not None and opq.children is not None
    assert sorted(opq.children) == [b"after"]
    link, src = lookup(root, "link"), lookup(root, "src")
    assert link is not None and src is not None
    assert link.target().content == b"source v1" and src.target().content == b"source v2"
    thing = lookup(root, "thing")
    assert thing is not None and thing.is_dir and lookup(root, "thing/x") is not None
    data = lookup(root, "data")
    assert data is not None and data.content == b"now a file"
    merge = lookup(root, "merge")
    assert merge is not None and merge.uid == 2 and merge.mode == stat.S_IFDIR | 0o700
    assert lookup(root, "merge/kept") is not None
    wh = lookup(root, "wh")
    assert wh is not None and wh.mode & 0o170000 == stat.S_IFCHR and wh.rdev == 0


def test_hardlinks_share_an_inode_and_survive_their_source() -> None:
    root = build(
        [(_info("f"), b"content"), (_info("g", tarfile.LNKTYPE, linkname="f"), b"")],
        [(_info(".wh.f"), b"")],
    )
    g = lookup(root, "g")
    assert g is not None and g.link_to is None and g.content == b"content" and g.nlink == 1
    root = build([(_info("f"), b"c"), (_info("g", tarfile.LNKTYPE, linkname="f"), b"")])
    f, g = lookup(root, "f"), lookup(root, "g")
    assert f is not None and g is not None
    assert g.link_to is f and f.nlink == 2


def test_root_entry_sets_the_root() -> None:
    root = build([(_info("./", tarfile.DIRTYPE, uid=7, mode=0o711), b"")])
    assert root.uid == 7 and root.mode == stat.S_IFDIR | 0o711


# -- hostile input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([(_info("../escape"), b"x")], "'..'"),
        ([(_info("a/../../etc/passwd"), b"x")], "'..'"),
        ([(_info("/../etc/passwd"), b"x")], "'..'"),
        ([(_info("hl", tarfile.LNKTYPE, linkname="../../etc/shadow"), b"")], "'..'"),
        ([(_info("hl", tarfile.LNKTYPE, linkname="missing"), b"")], "does not exist"),
        ([(_info("hl", tarfile.LNKTYPE, linkname="/"), b"")], "root"),
        (
            [(_info("d", tarfile.DIRTYPE), b""), (_info("hl", tarfile.LNKTYPE, linkname="d"), b"")],
            "directory",
        ),
        ([(_info("no/parent"), b"x")], "does not exist"),
        ([(_info("f"), b""), (_info("f/child"), b"x")], "not a directory"),
        # A parent removed or replaced after an entry in it, in the same layer.
        (
            [
                (_info("a", tarfile.DIRTYPE), b""),
                (_info("a/b", tarfile.DIRTYPE), b""),
                (_info("a/b/x"), b"x"),
                (_info("a/.wh.b"), b""),
                (_info("a/b/y"), b"y"),
            ],
            "'b' does not exist",
        ),
        (
            [
                (_info("a", tarfile.DIRTYPE), b""),
                (_info("a/b", tarfile.DIRTYPE), b""),
                (_info("a/b/x"), b"x"),
                (_info("a/.wh..wh..opq"), b""),
                (_info("a/b/y"), b"y"),
            ],
            "'b' does not exist",
        ),
        (
            [
                (_info("a", tarfile.DIRTYPE), b""),
                (_info("a/b", tarfile.DIRTYPE), b""),
                (_info("a/b/x"), b"x"),
                (_info("a/b"), b"now a file"),
                (_info("a/b/y"), b"y"),
            ],
            "'b' is not a directory",
        ),
        ([(_info("./", tarfile.REGTYPE), b"")], "root"),
    ],
)
def test_hostile_entries(members: list[tuple[tarfile.TarInfo, bytes]], words: str) -> None:
    tree = LayerTree()
    with pytest.raises(TarError, match=words) as info:
        tree.apply_layer(chunks(make_tar(members)))
    assert info.value.offset is not None


def _with_sum(header: bytes, value: int) -> bytes:
    return header[:148] + b"%06o\0 " % value + header[156:]


@pytest.mark.parametrize("fill", [0x00, 0x7F, 0x80, 0xFF])
def test_header_checksums(fill: int) -> None:
    """The unsigned sum (the field as spaces), or the signed one old tars wrote;
    anything else is refused."""
    header = bytes([fill]) * 148 + b" " * 8 + bytes(range(256)) + bytes([fill]) * 100
    assert len(header) == 512
    unsigned = sum(header)
    signed = sum(b - 256 if b > 127 else b for b in header)
    assert checksum_ok(_with_sum(header, unsigned))
    assert checksum_ok(_with_sum(header, signed))
    for wrong in (unsigned - 1, unsigned + 1, unsigned + 65521, signed + 1):
        if wrong not in (unsigned, signed):
            assert not checksum_ok(_with_sum(header, wrong))
    assert not checksum_ok(header[:148] + b"notoctal" + header[156:])


def test_number_fields_in_other_forms() -> None:
    """Numbers space-ended, space-led or short read as the zero-padded,
    NUL-ended ones most writers make."""
    info = _info("f", uid=1000, gid=100)
    tar = bytearray(make_tar([(info, b"x" * 10)], fmt=tarfile.USTAR_FORMAT))
    plain = entries([(info, b"x" * 10)], fmt=tarfile.USTAR_FORMAT)[0]
    tar[100:108] = b"  644 \0\0"
    tar[108:116] = b"0001750 "
    tar[116:124] = b"144\0\0\0\0\0"
    tar[124:136] = b"%011o " % 10
    tar[136:148] = b" %o" % 1_700_000_000
    assert len(tar) % 512 == 0
    tar[148:156] = b" " * 8
    tar[148:156] = b"%06o\0 " % sum(tar[:512])
    (other,) = iter_entries([bytes(tar)])
    assert (other.mode, other.uid, other.gid, other.size, other.mtime_sec) == (
        0o644,
        1000,
        100,
        10,
        1_700_000_000,
    )
    assert other == plain


def test_truncated_and_garbage() -> None:
    good = make_tar([(_info("f"), b"x" * 40), (_info("big"), b"y" * 1000)])
    parts = chunks(good)
    with pytest.raises(TarError, match="ends"):
        list(iter_entries([good[:700]]))
    with pytest.raises(TarError, match="ends"):
        list(iter_entries([good[:100]]))
    bad = bytearray(good)
    bad[0] ^= 1
    with pytest.raises(TarError, match="checksum"):
        list(iter_entries([bytes(bad)]))
    with pytest.raises(TarError, match="inline"):
        list(iter_entries([parts[1]]))  # an object where a header belongs
    with pytest.raises(TarError, match="stored inline"):
        list(iter_entries([good]))
    # the 40-byte file as an object
    small: list[bytes | str] = [good[:512], "ab" * 32, good[552:]]
    with pytest.raises(TarError, match="stored as an object"):
        list(iter_entries(small))


def test_oversized_numbers_and_extensions() -> None:
    info = _info("f")
    info.pax_headers = {"uid": "99999999999"}
    with pytest.raises(TarError, match="uid"):
        entries([(info, b"x")])
    info.pax_headers = {"size": "-1"}
    with pytest.raises(TarError, match="size"):
        entries([(info, b"x")])
    info.pax_headers = {"comment": "c" * (2 << 20)}
    with pytest.raises(TarError, match="extension header"):
        entries([(info, b"x")])


def test_nul_in_a_pax_path() -> None:
    info = _info("f")
    info.pax_headers = {"path": "a\x00b"}
    with pytest.raises(TarError, match="NUL"):
        entries([(info, b"x")])
