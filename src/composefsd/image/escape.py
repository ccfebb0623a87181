"""Byte escaping for the composefs dumpfile and ``composefs-info ls`` formats.

The rules are C composefs ``print_escaped`` (composefs-info.c) and ``unescape_string``
(mkcomposefs.c) byte for byte:

* ``\\``, LF, CR and TAB always become ``\\\\``, ``\\n``, ``\\r``, ``\\t``;
* any other byte that is not graphic in the C locale (outside 0x21..0x7e) becomes
  ``\\xhh`` (lowercase); with :data:`Escape.NOESCAPE_SPACE` the space stays literal;
* :data:`Escape.EQUAL` also hex-escapes ``=`` (xattr keys and values);
* :data:`Escape.LONE_DASH` prints a value that is exactly ``-`` as ``\\x2d`` so it is
  not read back as "unset".

Almost every real value needs no escaping at all, so each escaper first does one
regex search and returns its input unchanged when nothing matches.

:func:`printable` (:mod:`composefsd.image.printable`, imported here) is the same
idea for text shown to people.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

from composefsd.image.printable import printable

__all__ = [
    "Escape",
    "UnescapeError",
    "escape",
    "escape_equal",
    "escape_lone_dash",
    "escape_no_space",
    "escape_standard",
    "printable",
    "unescape",
    "unescape_optional",
]


class Escape(enum.IntFlag):
    """C's escape flags (the values match composefs-info.c)."""

    STANDARD = 0
    NOESCAPE_SPACE = 1
    EQUAL = 2
    LONE_DASH = 4


class UnescapeError(ValueError):
    """An invalid escape sequence; ``str()`` is C mkcomposefs's message."""


def _table(*, space: bool, equal: bool) -> list[bytes]:
    table = []
    for c in range(256):
        if c == 0x5C:
            table.append(b"\\\\")
        elif c == 0x0A:
            table.append(b"\\n")
        elif c == 0x0D:
            table.append(b"\\r")
        elif c == 0x09:
            table.append(b"\\t")
        elif (c == 0x3D and equal) or not (0x21 <= c <= 0x7E or (space and c == 0x20)):
            table.append(b"\\x%02x" % c)
        else:
            table.append(bytes((c,)))
    return table


def _pattern(table: list[bytes]) -> re.Pattern[bytes]:
    # The class as ranges of consecutive bytes: re compiles a few ranges much
    # faster than 160 single bytes, and every tool compiles four of these at start.
    ranges: list[bytes] = []
    c = 0
    while c < 256:
        if len(table[c]) == 1:
            c += 1
            continue
        first = c
        while c + 1 < 256 and len(table[c + 1]) > 1:
            c += 1
        low, high = re.escape(bytes((first,))), re.escape(bytes((c,)))
        ranges.append(low if first == c else low + b"-" + high)
        c += 1
    return re.compile(b"[" + b"".join(ranges) + b"]+")


def _make(*, space: bool, equal: bool) -> Callable[[bytes], bytes]:
    table = _table(space=space, equal=equal)
    pattern = _pattern(table)
    search = pattern.search
    sub = pattern.sub

    def repl(m: re.Match[bytes]) -> bytes:
        return b"".join([table[c] for c in m.group()])

    def esc(data: bytes) -> bytes:
        if search(data) is None:
            return data
        return sub(repl, data)

    return esc


#: Standard level: PATH in dumps, symlink targets and payloads in ``ls``.
escape_standard = _make(space=False, equal=False)
#: ``ls`` paths: like standard, but a space stays a space.
escape_no_space = _make(space=True, equal=False)
#: xattr keys and values in dumps.
escape_equal = _make(space=False, equal=True)
_escape_equal_no_space = _make(space=True, equal=True)


def escape_lone_dash(data: bytes) -> bytes:
    """PAYLOAD and CONTENT in dumps: standard, but a lone ``-`` becomes ``\\x2d``."""
    if data == b"-":
        return b"\\x2d"
    return escape_standard(data)


def escape(data: bytes, *, level: Escape | int = Escape.STANDARD) -> bytes:
    """Escape ``data`` with any combination of C's escape flags."""
    if level & Escape.LONE_DASH and data == b"-":
        return b"\\x2d"
    space = bool(level & Escape.NOESCAPE_SPACE)
    if level & Escape.EQUAL:
        return _escape_equal_no_space(data) if space else escape_equal(data)
    return escape_no_space(data) if space else escape_standard(data)


_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_SIMPLE = {0x5C: b"\\", 0x6E: b"\n", 0x72: b"\r", 0x74: b"\t"}


def unescape(data: bytes) -> bytes:
    """C ``unescape_string``: undo the escapes, or raise :class:`UnescapeError`.

    Errors carry C's exact text ("No character after escape", "No hex characters
    after hex escape", "Invalid hex characters after hex escape", "Unsupported
    escape type X").
    """
    pos = data.find(b"\\")
    if pos < 0:
        return data
    out: list[bytes] = []
    start = 0
    end = len(data)
    while pos >= 0:
        out.append(data[start:pos])
        pos += 1
        if pos >= end:
            raise UnescapeError("No character after escape")
        c = data[pos]
        pos += 1
        simple = _SIMPLE.get(c)
        if simple is not None:
            out.append(simple)
        elif c == 0x78:  # 'x'
            # C checks for a second digit before validating the first one.
            if pos + 1 >= end:
                raise UnescapeError("No hex characters after hex escape")
            hi = _HEX.get(data[pos])
            lo = _HEX.get(data[pos + 1])
            if hi is None or lo is None:
                raise UnescapeError("Invalid hex characters after hex escape")
            out.append(bytes((hi << 4 | lo,)))
            pos += 2
        else:
            raise UnescapeError(f"Unsupported escape type {chr(c)}")
        start = pos
        pos = data.find(b"\\", pos)
    out.append(data[start:])
    return b"".join(out)


def unescape_optional(data: bytes) -> bytes | None:
    """An optional dumpfile field: exactly ``-`` means unset (``None``)."""
    if data == b"-":
        return None
    return unescape(data)
