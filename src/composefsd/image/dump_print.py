"""Print a tree as ``composefs-info dump`` and ``composefs-info ls`` do (C 1.0.8).

The dump is depth-first pre-order with children in bytewise name order. A hardlink
entry (``link_to`` set) prints ``@`` before the mode, takes every other field from
its target, and has the target's absolute path as PAYLOAD. Paths are computed in a
first pass over the whole tree, so the target may appear anywhere, before or after
the link. xattrs are printed in list order, never re-sorted: for a tree read from an
image that is inline entries first, then shared ones, as C prints them.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from typing import BinaryIO

from composefsd.image.escape import (
    escape_equal,
    escape_lone_dash,
    escape_no_space,
    escape_standard,
)
from composefsd.image.tree import Node

__all__ = [
    "format_dump",
    "format_ls",
    "format_rs_dump",
    "print_dump",
    "print_ls",
    "print_rs_dump",
]

_S_IFMT = stat.S_IFMT(0o177777)
_FLUSH_BYTES = 1 << 20


def _walk(root: Node) -> Iterator[tuple[bytes, Node]]:
    """(path, node) in dump order; the root's path is ``b""`` as in C.

    A generator, so a deep tree costs memory for the current path and the pending
    siblings only, not for every path at once.
    """
    yield b"", root
    stack: list[tuple[bytes, Node]] = []
    if root.children:
        stack.extend((b"/" + n, c) for n, c in sorted(root.children.items(), reverse=True))
    while stack:
        path, node = stack.pop()
        yield path, node
        if node.children:
            stack.extend(
                (path + b"/" + n, c) for n, c in sorted(node.children.items(), reverse=True)
            )


def _link_target_paths(root: Node) -> dict[int, bytes]:
    """id(node) -> path for every node some hardlink entry points at.

    C builds these paths from parent pointers; in a tree each node sits at exactly
    one place, which is that path. Only link targets are kept.
    """
    targets: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node.link_to is not None:
            targets.add(id(node.link_to))
        if node.children:
            stack.extend(node.children.values())
    if not targets:
        return {}
    return {id(node): path for path, node in _walk(root) if id(node) in targets}


def _iter_dump(root: Node) -> Iterator[bytes]:
    paths = _link_target_paths(root)
    for path, node in _walk(root):
        target = node.link_to
        if target is None:
            target = node
            link_path = None
        else:
            link_path = paths.get(id(target), b"")
        payload = link_path if link_path is not None else target.payload
        content = target.content
        if content is not None and len(content) > target.size:
            content = content[: target.size]
        digest = target.digest
        line = b"%s %d %s%o %d %d %d %d %d.%d %s %s %s" % (
            escape_standard(path) if path else b"/",
            target.size,
            b"@" if link_path is not None else b"",
            target.mode,
            target.nlink,
            target.uid,
            target.gid,
            target.rdev,
            target.mtime_sec,
            target.mtime_nsec,
            b"-" if payload is None else escape_lone_dash(payload),
            b"-" if content is None else escape_lone_dash(content),
            b"-" if digest is None else digest.hex().encode(),
        )
        if target.xattrs:
            line += b"".join(
                [b" " + escape_equal(k) + b"=" + escape_equal(v) for k, v in target.xattrs]
            )
        yield line + b"\n"


def _rs_nlinks(root: Node) -> dict[int, int]:
    """id(inode) -> how many entries stand for it, for inodes with more than one."""
    counts: dict[int, int] = {}
    for _path, node in _walk(root):
        if node.link_to is not None:
            target = node.target()
            counts[id(target)] = counts.get(id(target), 1) + 1
    return counts


def _iter_rs_dump(root: Node) -> Iterator[bytes]:
    """composefs-rs 0.9 ``write_dumpfile``: what differs from C is in :func:`format_rs_dump`."""
    nlinks = _rs_nlinks(root)
    first_path: dict[int, bytes] = {}
    for path, node in _walk(root):
        shown = escape_lone_dash(path) if path else b"/"
        target = node.target()
        ftype = target.mode & _S_IFMT
        if ftype == stat.S_IFDIR:
            children = target.children or {}
            nlink = 2 + sum(1 for c in children.values() if c.link_to is None and c.is_dir)
            size = rdev = 0
            payload = content = digest = None
        else:
            nlink = nlinks.get(id(target), 1)
            if nlink > 1:
                seen = first_path.get(id(target))
                if seen is not None:
                    yield shown + b" 0 @120000 - - - - 0.0 " + escape_lone_dash(seen) + b" - -\n"
                    continue
                first_path[id(target)] = path
            rdev = target.rdev if ftype in (stat.S_IFBLK, stat.S_IFCHR) else 0
            payload = content = digest = None
            if ftype == stat.S_IFREG:
                if target.payload:
                    payload = target.payload
                    digest = target.payload.replace(b"/", b"")
                    size = target.size
                else:
                    content = target.content
                    size = len(content) if content is not None else 0
            elif ftype == stat.S_IFLNK:
                payload = target.payload
                size = len(payload) if payload is not None else 0
            else:
                size = 0
        line = b"%s %d %o %d %d %d %d %d.%d %s %s %s" % (
            shown,
            size,
            target.mode,
            nlink,
            target.uid,
            target.gid,
            rdev,
            target.mtime_sec,
            target.mtime_nsec,
            escape_lone_dash(payload) if payload else b"-",
            escape_lone_dash(content) if content else b"-",
            digest if digest else b"-",
        )
        if target.xattrs:
            line += b"".join(
                [b" " + escape_equal(k) + b"=" + escape_equal(v) for k, v in sorted(target.xattrs)]
            )
        yield line + b"\n"


def _iter_ls(root: Node) -> Iterator[bytes]:
    walk = _walk(root)
    next(walk)  # not the root
    for path, node in walk:
        ftype = node.mode & _S_IFMT
        if ftype == stat.S_IFDIR:
            yield escape_no_space(path) + b"/\t\n"
        elif ftype == stat.S_IFLNK:
            yield escape_no_space(path) + b"\t-> " + escape_standard(node.payload or b"") + b"\n"
        elif ftype == stat.S_IFREG and node.payload is not None:
            yield escape_no_space(path) + b"\t@ " + escape_standard(node.payload) + b"\n"
        else:
            yield escape_no_space(path) + b"\n"


def _write(lines: Iterator[bytes], out: BinaryIO) -> None:
    buf: list[bytes] = []
    n = 0
    for line in lines:
        buf.append(line)
        n += len(line)
        if n >= _FLUSH_BYTES:
            out.write(b"".join(buf))
            buf.clear()
            n = 0
    if buf:
        out.write(b"".join(buf))


def format_dump(root: Node) -> bytes:
    """The ``composefs-info dump`` text for ``root``."""
    return b"".join(_iter_dump(root))


def print_dump(root: Node, out: BinaryIO) -> None:
    """Write ``format_dump(root)`` to ``out``, streaming (memory stays small)."""
    _write(_iter_dump(root), out)


def format_rs_dump(root: Node) -> bytes:
    """The dumpfile composefs-rs 0.9 (``cfsctl create-dumpfile``) prints for ``root``.

    It differs from C's in: xattrs sorted by name; a directory's size is 0 and its
    nlink 2 plus its subdirectories; every later path of an inode with several
    (of any type) is ``PATH 0 @120000 - - - - 0.0 FIRST-PATH - -``, where FIRST-PATH
    is its first path in dump order; a leaf's nlink is the number of its paths;
    a regular file shows a payload and digest only when it is external (the digest
    is its object id, the payload without its slash), an inline one its content only;
    rdev is shown for devices only.
    """
    return b"".join(_iter_rs_dump(root))


def print_rs_dump(root: Node, out: BinaryIO) -> None:
    """Write ``format_rs_dump(root)`` to ``out``, streaming."""
    _write(_iter_rs_dump(root), out)


def format_ls(root: Node) -> bytes:
    """The ``composefs-info ls`` text: every node but the root, with a type suffix."""
    return b"".join(_iter_ls(root))


def print_ls(root: Node, out: BinaryIO) -> None:
    """Write ``format_ls(root)`` to ``out``, streaming."""
    _write(_iter_ls(root), out)
