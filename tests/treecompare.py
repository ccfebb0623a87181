"""Snapshots of a directory tree, to compare a mounted composefs image with its source.

``snapshot(root)`` walks ``root`` without following symlinks and records, per
relative path (bytes): file type, permission bits, uid, gid, size (regular files
and symlinks), mtime in ns, rdev (devices), symlink target, a sha256 of the
content (regular files) and the xattrs. ``xattr_filter`` picks which xattr names
to keep (default: ``user.*``). ``diff(a, b)`` lists the differences as readable
lines, empty when the trees match.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Entry", "diff", "snapshot"]


@dataclass(slots=True, frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    mtime_ns: int
    rdev: int | None
    target: bytes | None
    sha256: str | None
    xattrs: tuple[tuple[bytes, bytes], ...] = field(default=())
    ino: int = field(default=0, compare=False)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "dir"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "chardev"),
        (stat.S_ISBLK, "blockdev"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown"


def _user_only(name: bytes) -> bool:
    return name.startswith(b"user.")


def _entry(path: bytes, st: os.stat_result, xattr_filter: Callable[[bytes], bool]) -> Entry:
    kind = _kind(st.st_mode)
    target = os.readlink(path) if kind == "symlink" else None
    digest = None
    if kind == "file":
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
    names = [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
    xattrs = tuple(
        sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names if xattr_filter(n))
    )
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind in ("file", "symlink") else None,
        mtime_ns=st.st_mtime_ns,
        rdev=st.st_rdev if kind in ("chardev", "blockdev") else None,
        target=target,
        sha256=digest,
        xattrs=xattrs,
        ino=st.st_ino,
    )


def snapshot(
    root: str | os.PathLike[str], xattr_filter: Callable[[bytes], bool] = _user_only
) -> dict[bytes, Entry]:
    base = os.fsencode(Path(root))
    result: dict[bytes, Entry] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        path = base + rel if rel else base
        st = os.lstat(path)
        result[rel or b"/"] = _entry(path, st, xattr_filter)
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                stack.append(rel + b"/" + name)
    return result


def diff(a: dict[bytes, Entry], b: dict[bytes, Entry], *, limit: int = 20) -> list[str]:
    lines: list[str] = []
    for path in sorted(a.keys() | b.keys()):
        ea, eb = a.get(path), b.get(path)
        if ea == eb:
            continue
        if ea is None or eb is None:
            lines.append(f"{path!r}: only in {'second' if ea is None else 'first'}")
        else:
            fields = [
                f"{name}: {getattr(ea, name)!r} != {getattr(eb, name)!r}"
                for name in Entry.__dataclass_fields__
                if name != "ino" and getattr(ea, name) != getattr(eb, name)
            ]
            lines.append(f"{path!r}: " + "; ".join(fields))
        if len(lines) >= limit:
            lines.append("…")
            break
    return lines
