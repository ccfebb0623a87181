"""EROFS writer behaviour beyond the C assets: API contract, versions, errors, xxh32."""

from __future__ import annotations

import copy
import errno
import stat
import subprocess
from pathlib import Path

import pytest

from composefsd.image.dump_parse import parse_dumpfile
from composefsd.image.tree import Node, new_directory
from composefsd.image.writer import WriteError, write_image
from composefsd.image.xxhash import xxh32

DUMP = (
    b"/ 4096 40755 2 0 0 0 1000.0 - - - user.shared=1\n"
    b"/d 4096 40755 2 0 0 0 1000.0 - - - user.shared=1\n"
    b"/d/ext 10000 100644 1 0 0 0 1000.0 ab/cdef0123 - " + b"01" * 32 + b"\n"
    b"/d/inl 5 100644 1 1000 1000 0 2000.5 - hello -\n"
    b"/d/sym 3 120777 1 0 0 0 1000.0 foo - -\n"
    b"/d/w 0 20000 1 0 0 0 1000.0 - - -\n"
)


def c_image(reference_bin: Path, tmp_path: Path, dump: bytes, *args: str) -> bytes:
    out = tmp_path / "c.cfs"
    subprocess.run(
        [str(reference_bin / "mkcomposefs"), *args, "--from-file", "-", str(out)],
        input=dump,
        check=True,
    )
    return out.read_bytes()


def test_xxh32_vectors() -> None:
    # Reference values of the standard xxHash32.
    assert xxh32(b"", 0) == 0x02CC5D05
    assert xxh32(b"a", 0) == 0x550D7456
    assert xxh32(b"abc", 0) == 0x32D153FF
    assert xxh32(b"Nobody inspects the spammish repetition", 0) == 0xE2293B2F
    assert xxh32(b"abc", 0x25BBE08F) != xxh32(b"abc", 0)


def test_worked_example_from_the_spec(reference_bin: Path, tmp_path: Path) -> None:
    image = write_image(parse_dumpfile(DUMP))
    assert len(image) == 16384
    assert image[12] == 1  # composefs_version: upgraded for the whiteout
    assert image == c_image(reference_bin, tmp_path, DUMP)


@pytest.mark.parametrize(
    ("vmin", "vmax", "args"),
    [
        (0, 0, ["--min-version=0", "--max-version=0"]),
        (1, 1, ["--min-version=1", "--max-version=1"]),
        (1, 0, ["--min-version=1"]),
        (0, 1, []),
    ],
)
def test_versions(
    reference_bin: Path, tmp_path: Path, vmin: int, vmax: int, args: list[str]
) -> None:
    image = write_image(parse_dumpfile(DUMP), min_version=vmin, max_version=vmax)
    assert image == c_image(reference_bin, tmp_path, DUMP, *args)


@pytest.mark.parametrize(("vmin", "vmax"), [(2, 2), (0, 2), (-1, 0)])
def test_bad_versions(vmin: int, vmax: int) -> None:
    with pytest.raises(WriteError) as info:
        write_image(parse_dumpfile(DUMP), min_version=vmin, max_version=vmax)
    assert info.value.errno == errno.EINVAL
    assert str(info.value) == "Invalid argument"


def test_input_tree_is_not_modified() -> None:
    root = parse_dumpfile(DUMP)
    before = copy.deepcopy(root)
    write_image(root)
    assert repr(root) == repr(before)


def test_built_tree_without_a_dumpfile() -> None:
    root = new_directory()
    assert root.children is not None
    root.add_child(b"f", Node(stat.S_IFREG | 0o644, size=3, content=b"abc"))
    image = write_image(root)
    assert image == write_image(
        parse_dumpfile(b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 3 100644 1 0 0 0 0.0 - abc -\n")
    )


def test_root_must_be_a_directory() -> None:
    with pytest.raises(WriteError) as info:
        write_image(Node(stat.S_IFREG | 0o644))
    assert info.value.errno == errno.ENOTDIR


def test_file_too_large() -> None:
    root = new_directory()
    assert root.children is not None
    root.add_child(b"big", Node(stat.S_IFREG | 0o644, size=(1 << 53) + 1))
    with pytest.raises(WriteError) as info:
        write_image(root)
    assert str(info.value) == "File too large"


def test_hardlink_cycle_is_eloop() -> None:
    root = parse_dumpfile(
        b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /a - -\n"
    )
    with pytest.raises(WriteError) as info:
        write_image(root)
    assert info.value.errno == errno.ELOOP


def test_same_node_twice_is_refused() -> None:
    root = new_directory()
    assert root.children is not None
    f = Node(stat.S_IFREG | 0o644)
    root.add_child(b"a", f)
    root.add_child(b"b", f)
    with pytest.raises(WriteError) as info:
        write_image(root)
    assert info.value.errno == errno.EINVAL


SHARED_EXTERNAL_DUMP = (
    b"/ 4096 40755 2 0 0 0 1000.0 - - -\n"
    # Same digest and payload twice: both derived xattrs go to the shared table.
    b"/a 10 100644 1 0 0 0 1000.0 aa/same - " + b"01" * 32 + b"\n"
    b"/b 10 100644 1 0 0 0 1000.0 aa/same - " + b"01" * 32 + b"\n"
    # Used once by a plain external file and once by one with its own xattrs,
    # whose overlay xattrs are built the other way: still shared.
    b"/c 10 100644 1 0 0 0 1000.0 cc/once - " + b"02" * 32 + b"\n"
    b"/d 10 100644 1 0 0 0 1000.0 cc/once - " + b"02" * 32 + b" user.x=1\n"
    # Same digest, no payload, once each: only the metacopy is shared.
    b"/e 10 100644 1 0 0 0 1000.0 - - " + b"03" * 32 + b"\n"
    b"/f 10 100644 1 0 0 0 1000.0 ee/other - " + b"03" * 32 + b"\n"
    b"/g 10 100644 1 0 0 0 1000.0 gg/unique - " + b"04" * 32 + b"\n"
    # No digest after files with one: an empty metacopy value has its own head.
    b"/h 10 100644 1 0 0 0 1000.0 hh/nodigest - -\n"
)


def test_external_xattrs_shared_like_c(reference_bin: Path, tmp_path: Path) -> None:
    image = write_image(parse_dumpfile(SHARED_EXTERNAL_DUMP))
    assert image == c_image(reference_bin, tmp_path, SHARED_EXTERNAL_DUMP)
