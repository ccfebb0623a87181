"""The in-memory tree that dumpfiles, directory scans and EROFS images all map to.

All names, paths, payloads and xattr keys are ``bytes``: composefs allows any byte
except ``/`` and NUL in a name, so ``str`` would force a lossy or costly round trip.

A :class:`Node` is one inode *or* one hardlink entry. A hardlink is a separate
node whose ``link_to`` names its target (as in C libcomposefs); it is never
written as an inode, and its own ``mode`` is only what the dumpfile said (or 0
when it came from an image). The writer follows ``link_to`` chains.

Xattr bookkeeping follows C ``lcfs_node_set_xattr`` exactly, including the
running size estimate that decides when a set fails with ERANGE, because that
decides which inputs C rejects.
"""

from __future__ import annotations

import errno
import gc
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = [
    "INLINE_CONTENT_MAX",
    "PATH_MAX",
    "RECOMMENDED_INLINE_CONTENT_MAX",
    "S_IFMT",
    "VALID_FILE_TYPES",
    "XATTR_ESTIMATE_MAX",
    "XATTR_ESTIMATE_MAX_READER",
    "Node",
    "TreeError",
    "gc_paused",
    "is_whiteout",
    "new_directory",
]

INLINE_CONTENT_MAX = 5000
RECOMMENDED_INLINE_CONTENT_MAX = 64
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65535
NAME_MAX = 255
#: C ``LCFS_INODE_EXTERNAL_XATTR_MAX``: the estimate limit for every public setter.
XATTR_ESTIMATE_MAX = 32767
#: The image reader alone uses the full 16-bit limit.
XATTR_ESTIMATE_MAX_READER = 65535

_U64 = (1 << 64) - 1
#: The file-type mask (``stat.S_IFMT`` is a function in Python, not this constant).
S_IFMT = 0o170000
#: The file types composefs accepts (C ``lcfs_validate_mode``).
VALID_FILE_TYPES = frozenset(
    (
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFBLK,
        stat.S_IFCHR,
        stat.S_IFSOCK,
        stat.S_IFIFO,
    )
)


class TreeError(OSError):
    """A tree operation failed; ``errno`` says how, exactly as C libcomposefs would."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


@dataclass(slots=True, eq=False)
class Node:
    """One inode (or hardlink entry) of a composefs tree.

    ``children`` is a name -> node dict for directories (``None`` otherwise); the
    writer sorts it bytewise, so insertion order does not matter.
    ``xattrs`` keeps C's list order (removal swaps the last entry into the hole).
    """

    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    mtime_sec: int = 0
    mtime_nsec: int = 0
    payload: bytes | None = None
    content: bytes | None = None
    digest: bytes | None = None
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    children: dict[bytes, Node] | None = None
    link_to: Node | None = None
    xattr_estimate: int = 0

    # -- type helpers -------------------------------------------------------------
    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == stat.S_IFDIR

    def target(self) -> Node:
        """The inode this entry stands for: itself, or the end of its hardlink chain."""
        node = self
        seen = 0
        while node.link_to is not None:
            node = node.link_to
            seen += 1
            if seen > 1_000_000:
                raise TreeError(errno.ELOOP, "hardlink cycle")
        return node

    # -- content ------------------------------------------------------------------
    def set_content(self, content: bytes | None) -> None:
        """Set inline data; like C, this also sets ``size`` and stores empty as none."""
        if content is not None and len(content) > INLINE_CONTENT_MAX:
            raise TreeError(
                errno.EINVAL,
                f"Inline content size {len(content)} exceeds maximum {INLINE_CONTENT_MAX}",
            )
        self.content = content if content else None
        self.size = len(content) if content is not None else self.size

    # -- xattrs -------------------------------------------------------------------
    def get_xattr(self, key: bytes) -> bytes | None:
        for k, v in self.xattrs:
            if k == key:
                return v
        return None

    def unset_xattr(self, key: bytes) -> bool:
        xattrs = self.xattrs
        for i, (k, v) in enumerate(xattrs):
            if k == key:
                last = xattrs.pop()
                if i < len(xattrs):
                    xattrs[i] = last
                if xattrs:
                    self.xattr_estimate = (self.xattr_estimate - (7 + len(k) + len(v))) & _U64
                else:
                    self.xattr_estimate = 0
                return True
        return False

    def set_xattr(self, key: bytes, value: bytes, limit: int = XATTR_ESTIMATE_MAX) -> None:
        """C ``lcfs_node_set_xattr_internal``: ERANGE/EINVAL on the same inputs as C."""
        if not 0 < len(key) <= XATTR_NAME_MAX:
            raise TreeError(errno.ERANGE, f"invalid xattr name length {len(key)}")
        if len(value) > XATTR_VALUE_MAX:
            raise TreeError(errno.EINVAL, f"xattr value too long ({len(value)} bytes)")
        self.unset_xattr(key)
        cost = 7 + len(key) + len(value)
        if not self.xattrs:
            cost += 12
        if ((self.xattr_estimate + cost) & _U64) > limit:
            raise TreeError(errno.ERANGE, "too many xattrs")
        self.xattr_estimate = (self.xattr_estimate + cost) & _U64
        self.xattrs.append((key, value))

    # -- directories --------------------------------------------------------------
    def add_child(self, name: bytes, child: Node) -> None:
        """C ``lcfs_node_add_child``: the same checks, the same errnos."""
        children = self.children
        if children is None or not self.is_dir:
            raise TreeError(errno.ENOTDIR, "parent is not a directory")
        if not name:
            raise TreeError(errno.EINVAL, "empty name")
        if len(name) > NAME_MAX:
            raise TreeError(errno.ENAMETOOLONG, f"name too long ({len(name)} bytes)")
        if name in children:
            raise TreeError(errno.EEXIST, f"{name!r} already exists")
        children[name] = child

    def walk(self, prefix: bytes = b"") -> list[tuple[bytes, Node]]:
        """Depth-first pre-order (path, node) pairs, children in bytewise name order.

        The root is reported as ``b"/"``; hardlink entries are reported but not
        descended into. Iterative, so deep trees do not hit the recursion limit.
        """
        out: list[tuple[bytes, Node]] = [(prefix or b"/", self)]
        stack: list[tuple[bytes, Node]] = []
        if self.children:
            stack.extend(
                (prefix + b"/" + n, c) for n, c in sorted(self.children.items(), reverse=True)
            )
        while stack:
            path, node = stack.pop()
            out.append((path, node))
            if node.link_to is None and node.children:
                stack.extend(
                    (path + b"/" + n, c) for n, c in sorted(node.children.items(), reverse=True)
                )
        return out


def new_directory(mode: int = stat.S_IFDIR | 0o755) -> Node:
    return Node(mode=mode, children={})


def is_whiteout(node: Node) -> bool:
    """An overlay whiteout: a character device with device number 0/0."""
    return node.mode & S_IFMT == stat.S_IFCHR and node.rdev == 0


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building or walking a large tree.

    Trees are acyclic (hardlinks point sideways, never up), yet allocating a
    hundred thousand nodes triggers dozens of full collections that each walk
    every node: pausing makes parsing and writing about twice as fast.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
