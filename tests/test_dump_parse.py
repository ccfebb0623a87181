"""The dumpfile parser against C mkcomposefs 1.0.8, message for message.

Each case is a small dumpfile. C runs it through ``mkcomposefs --from-file``; we
parse (and, if that works, write) it in-process. Both must agree on success, and
on failure our message must be exactly C's (ours adds the line number).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from composefsd.image.dump_parse import DumpfileError, parse_dumpfile, parse_dumpfile_lines
from composefsd.image.escape import unescape
from composefsd.image.writer import WriteError, write_image

ROOT = b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
DIGEST = "0123456789abcdef" * 4

# (id, dumpfile, strict)
CASES: list[tuple[str, bytes, bool]] = [
    ("empty", b"", False),
    ("blank-line", ROOT + b"\n/a 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("no-root", b"/a 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("root-not-dir", b"/ 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("two-roots", ROOT + ROOT, False),
    ("bad-mode-text", ROOT + b"/a 0 10x644 1 0 0 0 0.0 - - -\n", False),
    ("mode-junk-leaks-into-size", ROOT + b"/a 0 100644x 1 0 0 0 0.0 - - -\n", False),
    ("mode-junk-ignored", ROOT + b"/a 5 100644x 1 0 0 0 0.0 - - -\n", False),
    ("invalid-type", ROOT + b"/a 0 170644 1 0 0 0 0.0 - - -\n", False),
    ("empty-mode", ROOT + b"/a 0  1 0 0 0 0.0 - - -\n", False),
    ("size-junk", ROOT + b"/a 0x 100644 1 0 0 0 0.0 - - -\n", False),
    ("size-junk-nonzero", ROOT + b"/a 12x 100644 1 0 0 0 0.0 - - -\n", False),
    ("negative-size", ROOT + b"/a -1 100644 1 0 0 0 0.0 - - -\n", False),
    ("huge-size", ROOT + b"/a 99999999999999999999999 100644 1 0 0 0 0.0 - - -\n", False),
    ("plus-and-space", ROOT + b"/a +5 100644 1 0 0 0 0.0 - - -\n", False),
    ("nlink-junk", ROOT + b"/a 0 100644 x 0 0 0 0.0 - - -\n", False),
    ("uid-junk", ROOT + b"/a 0 100644 1 u 0 0 0.0 - - -\n", False),
    ("gid-junk-uid0", ROOT + b"/a 0 100644 1 0 g 0 0.0 - - -\n", False),
    ("gid-junk-uid1-ignored", ROOT + b"/a 0 100644 1 1 g 0 0.0 - - -\n", False),
    ("rdev-junk-uid1-ignored", ROOT + b"/a 0 20644 1 7 0 r 0.0 - - -\n", False),
    ("mtime-no-dot", ROOT + b"/a 0 100644 1 0 0 0 5 - - -\n", False),
    ("mtime-bad-nsec", ROOT + b"/a 0 100644 1 0 0 0 5.x - - -\n", False),
    ("mtime-junk-sec-leak", ROOT + b"/a 0 100644 1 0 0 0 5x.0 - - -\n", False),
    ("mtime-junk-sec-ignored", ROOT + b"/a 0 100644 1 0 0 0 5x.3 - - -\n", False),
    ("missing-parent", ROOT + b"/a/b 0 100644 1 0 0 0 0.0 - - -\n", False),
    (
        "parent-not-dir",
        ROOT + b"/a 0 100644 1 0 0 0 0.0 - - -\n/a/b 0 100644 1 0 0 0 0.0 - - -\n",
        False,
    ),
    ("dot", ROOT + b"/. 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("dotdot-inner", ROOT + b"/../x 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("double-slash", ROOT + b"// 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("duplicate", ROOT + b"/a 0 100644 1 0 0 0 0.0 - - -\n" * 2, False),
    ("long-name", ROOT + b"/" + b"n" * 256 + b" 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("name-255", ROOT + b"/" + b"n" * 255 + b" 0 100644 1 0 0 0 0.0 - - -\n", False),
    (
        "repeated-slashes-ok",
        ROOT + b"/d 0 40755 1 0 0 0 0.0 - - -\n//d//x 0 100644 1 0 0 0 0.0 - - -\n",
        False,
    ),
    ("content-size", ROOT + b"/a 4 100644 1 0 0 0 0.0 - abc -\n", False),
    ("content-too-big", ROOT + b"/a 5001 100644 1 0 0 0 0.0 - " + b"x" * 5001 + b" -\n", False),
    ("bad-escape", ROOT + b"/a\\q 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("trailing-backslash", ROOT + b"/a\\ 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("short-hex", ROOT + b"/a\\x4 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("bad-hex", ROOT + b"/a\\xzz 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("nul-escape-empties-path", ROOT + b"\\x00abc 0 100644 1 0 0 0 0.0 - - -\n", False),
    ("raw-nul", ROOT + b"/a 0 100644 1 0 0 0 0.0 - - -\x00\n", False),
    ("symlink-empty", ROOT + b"/l 0 120777 1 0 0 0 0.0 - - -\n", False),
    ("symlink-4096", ROOT + b"/l 4096 120777 1 0 0 0 0.0 " + b"t" * 4096 + b" - -\n", False),
    ("symlink-size-lax", ROOT + b"/l 99 120777 1 0 0 0 0.0 target - -\n", False),
    ("symlink-size-strict", ROOT + b"/l 99 120777 1 0 0 0 0.0 target - -\n", True),
    ("symlink-content-strict", ROOT + b"/l 1 120777 1 0 0 0 0.0 t x -\n", True),
    ("payload-4096", ROOT + b"/f 1 100644 1 0 0 0 0.0 " + b"p" * 4096 + b" - -\n", False),
    ("rdev-on-file-strict", ROOT + b"/f 0 100644 1 0 0 5 0.0 - - -\n", True),
    ("rdev-on-file-lax", ROOT + b"/f 0 100644 1 0 0 5 0.0 - - -\n", False),
    ("no-newline-strict", ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -", True),
    ("no-newline-lax", ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -", False),
    ("xattr-no-eq", ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - user.a\n", False),
    ("xattr-double-space", ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -  user.a=b\n", False),
    ("xattr-trailing-space", ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - user.a=b \n", False),
    ("xattr-empty-key", ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - =v\n", False),
    ("xattr-key-256", ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - user." + b"k" * 251 + b"=v\n", False),
    (
        "xattr-estimate",
        ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - user.a=" + b"v" * 32737 + b"\n",
        False,
    ),
    (
        "xattr-estimate-ok",
        ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - user.a=" + b"v" * 32736 + b"\n",
        False,
    ),
    (
        "xattr-line-too-long",
        ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - " + b"user.a=b " * 7282 + b"\n",
        False,
    ),
    ("hardlink-no-target", ROOT + b"/h 0 @100644 1 0 0 0 0.0 - - -\n", False),
    ("hardlink-missing", ROOT + b"/h 0 @100644 1 0 0 0 0.0 /nope - -\n", False),
    ("hardlink-self", ROOT + b"/h 0 @100644 1 0 0 0 0.0 /h - -\n", False),
    ("hardlink-dir-mode", ROOT + b"/h 0 @40755 1 0 0 0 0.0 / - -\n", False),
    (
        "hardlink-to-dir",
        ROOT + b"/d 0 40755 1 0 0 0 0.0 - - -\n/h 0 @100644 1 0 0 0 0.0 /d - -\n",
        False,
    ),
    ("hardlink-to-root", ROOT + b"/h 0 @100644 1 0 0 0 0.0 / - -\n", False),
    ("hardlink-empty-target-is-root", ROOT + b"/h 0 @100644 1 0 0 0 0.0  - -\n", False),
    (
        "hardlink-cycle",
        ROOT + b"/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /a - -\n",
        False,
    ),
    (
        "hardlink-chain",
        ROOT
        + b"/f 3 100644 7 0 0 0 0.0 - abc -\n/a 0 @100644 1 0 0 0 0.0 /b - -\n"
        + b"/b 0 @100644 1 0 0 0 0.0 /f - -\n",
        False,
    ),
    ("too-big", ROOT + b"/f 9500000000000000 100644 1 0 0 0 0.0 - - -\n", False),
    ("digest-on-external", ROOT + b"/f 9 100644 1 0 0 0 0.0 x - " + DIGEST.encode() + b"\n", False),
    ("digest-long", ROOT + b"/f 9 100644 1 0 0 0 0.0 x - " + DIGEST.encode() + b"ff\n", False),
    ("digest-junk-on-dir", b"/ 4096 40755 2 0 0 0 0.0 - - zz\n", False),
    (
        "whiteout-xattr-erange",
        ROOT + b"/w 0 20644 1 0 0 0 0.0 - - - user.overlay.whiteout=x user.b=c\n",
        False,
    ),
    ("whiteout-with-content", ROOT + b"/a 5 20644 1 0 0 0 0.0 - hello -\n", False),
    ("fifo-with-payload", ROOT + b"/p 0 10644 1 0 0 0 0.0 payload - -\n", False),
]


def _c_result(reference_bin: Path, data: bytes, strict: bool, tmp: Path) -> tuple[int, str]:
    env = dict(os.environ)
    env.pop("CFS_PARSE_STRICT", None)
    if strict:
        env["CFS_PARSE_STRICT"] = "1"
    proc = subprocess.run(
        [str(reference_bin / "mkcomposefs"), "--from-file", "-", str(tmp / "c.cfs")],
        input=data,
        capture_output=True,
        env=env,
    )
    return proc.returncode, proc.stderr.decode("utf-8", "replace").rstrip("\n")


def _our_result(data: bytes, strict: bool) -> tuple[int, str, bytes | None]:
    try:
        root = parse_dumpfile(data, strict=strict)
    except DumpfileError as e:
        return 1, f"mkcomposefs: {e.message}", None
    try:
        return 0, "", write_image(root)
    except WriteError as e:
        return 1, f"mkcomposefs: cannot write file: {e}", None


@pytest.mark.parametrize(("case", "data", "strict"), CASES, ids=[c[0] for c in CASES])
def test_matches_c(
    case: str, data: bytes, strict: bool, reference_bin: Path, tmp_path: Path
) -> None:
    c_status, c_message = _c_result(reference_bin, data, strict, tmp_path)
    status, message, image = _our_result(data, strict)
    assert (status != 0) == (c_status != 0), f"C said {c_status} {c_message!r}, we {message!r}"
    if c_status:
        assert message == c_message
    else:
        assert image == (tmp_path / "c.cfs").read_bytes()


def test_error_carries_line_number() -> None:
    with pytest.raises(DumpfileError) as info:
        parse_dumpfile(ROOT + b"/a 0 100644 1 0 0 0 0.0 - - -\n/a/b 0 100644 1 0 0 0 0.0 - - -\n")
    assert info.value.message == "Parent must be a directory for /a/b"
    assert info.value.lineno == 3
    assert str(info.value) == "Parent must be a directory for /a/b (line 3)"


def test_tree_fields() -> None:
    root = parse_dumpfile(
        ROOT
        + b"/d 4096 40700 2 1 2 0 -5.7 - - - user.k\\x3d=v\\x20w\n"
        + b"/d/f 3 100600 9 4294967296 5 0 4294967296.1 - a\\nb -\n"
        + b"/d/e 10000 100644 1 0 0 0 0.0 ab/cd - "
        + DIGEST.encode()
        + b"\n/dev 0 20600 1 0 0 65281 0.0 - - -\n"
        + b"/h 0 @100644 1 0 0 0 0.0 /d/f - -\n"
    )
    assert root.children is not None
    d = root.children[b"d"]
    assert (d.mode, d.uid, d.gid, d.mtime_sec, d.mtime_nsec) == (0o40700, 1, 2, -5, 7)
    assert d.xattrs == [(b"user.k=", b"v w")]
    assert d.children is not None
    f = d.children[b"f"]
    assert (f.content, f.size, f.nlink, f.uid, f.mtime_sec) == (b"a\nb", 3, 9, 0, 4294967296)
    e = d.children[b"e"]
    assert (e.payload, e.digest, e.content) == (b"ab/cd", bytes.fromhex(DIGEST), None)
    assert root.children[b"dev"].rdev == 65281
    assert root.children[b"h"].link_to is f


def test_unescape() -> None:
    assert unescape(b"a\\\\b\\n\\r\\t\\x41\\x7e") == b"a\\b\n\r\tA~"
    with pytest.raises(ValueError, match="Unsupported escape type q"):
        unescape(b"\\q")


_LINES_DUMP = (
    b"/ 4096 40755 2 0 0 0 1000.0 - - -\n"
    b"/d 4096 40755 2 0 0 0 1000.0 - - - user.a=b\n"
    b"/d/f 5 100644 1 0 0 0 1000.0 - hello -\n"
    b"/d/e\\x20sc 10 100644 1 0 0 0 1000.0 aa/bb - " + b"01" * 32 + b"\n"
    b"/d/l 5 @100644 1 0 0 0 1000.0 /d/f - -"
)


@pytest.mark.parametrize("tail", [b"", b"\n"])
@pytest.mark.parametrize("strict", [False, True])
def test_lines_parse_like_the_whole_buffer(tail: bytes, strict: bool) -> None:
    """parse_dumpfile_lines (mkcomposefs reads by lines) accepts, refuses and
    numbers lines exactly as parse_dumpfile, with and without a final newline."""
    data = _LINES_DUMP + tail
    lines = data.splitlines(keepends=True)
    try:
        expected: bytes | str = write_image(parse_dumpfile(data, strict=strict))
    except DumpfileError as e:
        expected = str(e)
    try:
        got: bytes | str = write_image(parse_dumpfile_lines(lines, strict=strict))
    except DumpfileError as e:
        got = str(e)
    assert got == expected
    if strict and not tail:
        assert expected == "Missing trailing newline (line 5)"


def test_lines_errors_carry_the_line_number() -> None:
    lines = [b"/ 4096 40755 2 0 0 0 1000.0 - - -\n", b"/x 0 100644 1 0 0 0 1000.0 - - - bad\n"]
    with pytest.raises(DumpfileError) as info:
        parse_dumpfile_lines(lines)
    assert (info.value.message, info.value.lineno) == ("Missing = in xattr", 2)
    with pytest.raises(DumpfileError, match="No files in dump file"):
        parse_dumpfile_lines([])
