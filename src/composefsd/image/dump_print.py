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

__all__ = ["format_dump", "format_ls", "print_dump", "print_ls"]

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


def format_ls(root: Node) -> bytes:
    """The ``composefs-info ls`` text: every node but the root, with a type suffix."""
    return b"".join(_iter_ls(root))


def print_ls(root: Node, out: BinaryIO) -> None:
    """Write ``format_ls(root)`` to ``out``, streaming."""
    _write(_iter_ls(root), out)
