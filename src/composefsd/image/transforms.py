"""composefs-rs's transforms of a tree, with the same effect as ``cfsctl``'s flags.

``cfsctl create-image`` / ``compute-id`` / ``create-dumpfile`` read a directory and
then, by default, transform it for OCI consistency (composefs-rs 0.9
``transform_for_oci``): the root directory takes ``/usr``'s mode, owner, mtime and
xattrs, ``/run`` is emptied (and takes ``/usr``'s mtime), and xattrs are filtered to
``security.capability`` (``--xattrs keep-user-xattrs``: also ``user.*``).
``--no-propagate-usr-to-root`` skips all of that. ``--bootable`` then empties
``/boot`` and ``/sysroot`` (their mtime seconds become ``/usr``'s) and labels the tree
from its own SELinux policy (:mod:`composefsd.image.selabel`), or strips
``security.selinux`` when it has none.

:class:`Transform` names such a combination; ``Transform()`` changes nothing (the
``--no-propagate-usr-to-root`` tree), :data:`CFSCTL_DEFAULT` is cfsctl's default.
:func:`apply_transform` applies one in place to a :class:`~composefsd.image.tree.Node`
tree read in the composefs-rs style. The tree's hardlinks are kept consistent:
after entries are removed or split, the first remaining path of an inode in image
order is the inode, the others link to it, and its ``nlink`` counts them.

Errors are :class:`TransformError` with composefs-rs's message, e.g.
``Directory entry "boot" does not exist`` for ``--bootable`` without ``/boot``.
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from composefsd.image.tree import S_IFMT, Node, TreeError

__all__ = [
    "CFSCTL_DEFAULT",
    "ContentReader",
    "Transform",
    "TransformError",
    "TransformErrorKind",
    "XattrFilter",
    "apply_transform",
    "directory",
    "directory_opt",
    "entries",
    "inodes",
    "relink",
    "set_xattrs",
]

#: The one xattr composefs-rs keeps from a container tree by default.
ALLOWED_XATTRS = frozenset((b"security.capability",))

#: Gives a regular file's content (inline content, or its object read back).
ContentReader = Callable[[Node], bytes]


class XattrFilter(enum.Enum):
    """Which xattrs a transform keeps (composefs-rs ``XattrFiltering``, plus ALL)."""

    #: Keep every xattr (``--no-propagate-usr-to-root`` keeps them all).
    ALL = "all"
    #: ``allowlist-only``: ``security.capability`` only (cfsctl's default).
    ALLOWLIST_ONLY = "allowlist-only"
    #: ``keep-user-xattrs``: ``security.capability`` and ``user.*``.
    KEEP_USER_XATTRS = "keep-user-xattrs"

    def keeps(self, key: bytes) -> bool:
        if self is XattrFilter.ALL:
            return True
        if key in ALLOWED_XATTRS:
            return True
        return self is XattrFilter.KEEP_USER_XATTRS and key.startswith(b"user.")


@dataclass(slots=True, frozen=True)
class Transform:
    """A combination of composefs-rs transforms; the default changes nothing."""

    #: Root takes /usr's metadata and /run is emptied (cfsctl without
    #: ``--no-propagate-usr-to-root``).
    propagate_usr_to_root: bool = False
    #: Which xattrs to keep (cfsctl ``--xattrs``; it applies them only when
    #: propagating, where its default is ALLOWLIST_ONLY).
    xattrs: XattrFilter = XattrFilter.ALL
    #: cfsctl ``--bootable``: empty /boot and /sysroot, SELinux-label the tree.
    bootable: bool = False

    @property
    def is_identity(self) -> bool:
        return (
            not self.propagate_usr_to_root and self.xattrs is XattrFilter.ALL and not self.bootable
        )


#: What cfsctl does to a directory without flags.
CFSCTL_DEFAULT = Transform(propagate_usr_to_root=True, xattrs=XattrFilter.ALLOWLIST_ONLY)


class TransformErrorKind(enum.Enum):
    """What went wrong (composefs-rs ``ImageError`` and policy errors)."""

    NOT_FOUND = "not-found"
    NOT_A_DIRECTORY = "not-a-directory"
    IS_A_DIRECTORY = "is-a-directory"
    NOT_REGULAR = "not-regular"
    INVALID_FILENAME = "invalid-filename"
    #: The tree's SELinux policy is malformed, too large or unreadable.
    POLICY = "policy"


_FORMATS = {
    TransformErrorKind.NOT_FOUND: "Directory entry {} does not exist",
    TransformErrorKind.NOT_A_DIRECTORY: "Directory entry {} is not a subdirectory",
    TransformErrorKind.IS_A_DIRECTORY: "Directory entry {} is a directory",
    TransformErrorKind.NOT_REGULAR: "Directory entry {} is not a regular file",
    TransformErrorKind.INVALID_FILENAME: "Invalid filename {}",
}


def _debug_quote(name: bytes) -> str:
    """Rust's ``{:?}`` of an ``OsStr``, for the names a tree holds."""
    text = name.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        if 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02X}")
        elif ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class TransformError(Exception):
    """A transform that cannot be applied to this tree; ``str()`` is composefs-rs's
    message, ``kind`` says what is wrong and ``name`` (or None) the entry concerned."""

    def __init__(self, kind: TransformErrorKind, name: bytes | None, message: str = "") -> None:
        if not message:
            message = _FORMATS[kind].format(_debug_quote(name or b""))
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.message = message

    def __str__(self) -> str:
        return self.message


# -- looking things up, as composefs-rs's Directory does ---------------------------------------


def directory_opt(root: Node, components: list[bytes]) -> Node | None:
    """The directory at ``components`` below ``root``, None if a component is missing;
    a component that is not a directory is an error (``get_directory_opt``)."""
    node = root
    for name in components:
        assert node.children is not None
        child = node.children.get(name)
        if child is None:
            return None
        if child.link_to is not None or not child.is_dir:
            raise TransformError(TransformErrorKind.NOT_A_DIRECTORY, name)
        node = child
    return node


def directory(root: Node, components: list[bytes]) -> Node:
    """As :func:`directory_opt`, a missing component being an error too (the missing
    name is the last component asked for, as composefs-rs reports it)."""
    node = root
    for name in components:
        assert node.children is not None
        child = node.children.get(name)
        if child is None:
            raise TransformError(TransformErrorKind.NOT_FOUND, name)
        if child.link_to is not None or not child.is_dir:
            raise TransformError(TransformErrorKind.NOT_A_DIRECTORY, name)
        node = child
    return node


# -- hardlink bookkeeping -------------------------------------------------------------------


def entries(root: Node) -> Iterator[tuple[Node, bytes, bytes, Node]]:
    """(parent, name, path, entry) for every entry below ``root`` in image order
    (depth first, names bytewise); hardlink entries are reported, not followed."""
    stack: list[tuple[Node, bytes, bytes, Node]] = []
    if root.children:
        stack.extend((root, n, b"/" + n, c) for n, c in sorted(root.children.items(), reverse=True))
    while stack:
        parent, name, path, node = stack.pop()
        yield parent, name, path, node
        if node.link_to is None and node.children:
            stack.extend(
                (node, n, path + b"/" + n, c)
                for n, c in sorted(node.children.items(), reverse=True)
            )


def relink(root: Node) -> None:
    """Make every inode's first path in image order the inode itself, its other paths
    hardlinks to it, and its ``nlink`` the number of its paths (an inode whose first
    path was removed moves to its next one)."""
    groups: dict[int, list[tuple[Node, bytes]]] = {}
    targets: dict[int, Node] = {}
    for parent, name, _path, node in entries(root):
        if node.link_to is None and node.is_dir:
            continue
        target = node.target()
        key = id(target)
        group = groups.get(key)
        if group is None:
            groups[key] = [(parent, name)]
            targets[key] = target
        else:
            group.append((parent, name))
    for key, group in groups.items():
        target = targets[key]
        target.nlink = len(group)
        target.link_to = None
        parent, name = group[0]
        assert parent.children is not None
        parent.children[name] = target
        for parent, name in group[1:]:
            assert parent.children is not None
            parent.children[name] = Node(mode=target.mode, link_to=target)


def inodes(root: Node) -> list[Node]:
    """Every inode of the tree once: the root, directories, and each link target."""
    out = [root]
    seen: set[int] = set()
    for _parent, _name, _path, node in entries(root):
        target = node.target()
        if id(target) not in seen:
            seen.add(id(target))
            out.append(target)
    return out


def set_xattrs(node: Node, xattrs: list[tuple[bytes, bytes]]) -> None:
    """Replace ``node``'s xattrs (keeping C's size estimate right)."""
    node.xattrs = []
    node.xattr_estimate = 0
    try:
        for key, value in xattrs:
            node.set_xattr(key, value)
    except TreeError as exc:
        raise TransformError(
            TransformErrorKind.POLICY, None, f"cannot set the xattrs of an inode: {exc.strerror}"
        ) from exc


# -- the transforms -------------------------------------------------------------------------


def _copy_root_metadata_from_usr(root: Node) -> None:
    usr = directory(root, [b"usr"])
    root.mode = stat.S_IFDIR | (usr.mode & ~S_IFMT)
    root.uid = usr.uid
    root.gid = usr.gid
    root.mtime_sec = usr.mtime_sec
    root.mtime_nsec = usr.mtime_nsec
    root.xattrs = list(usr.xattrs)
    root.xattr_estimate = usr.xattr_estimate


def _canonicalize_run(root: Node) -> None:
    run = directory_opt(root, [b"run"])
    if run is None:
        return
    usr = directory(root, [b"usr"])
    run.mtime_sec = usr.mtime_sec
    run.mtime_nsec = usr.mtime_nsec
    assert run.children is not None
    run.children.clear()


def _filter_xattrs(root: Node, keep: XattrFilter) -> None:
    for node in inodes(root):
        if node.xattrs and not all(keep.keeps(k) for k, _ in node.xattrs):
            set_xattrs(node, [(k, v) for k, v in node.xattrs if keep.keeps(k)])


def _empty_toplevel_dirs(root: Node) -> None:
    usr_sec = directory(root, [b"usr"]).mtime_sec
    for name in (b"boot", b"sysroot"):
        node = directory(root, [name])
        # composefs-rs copies the seconds only; the nanoseconds stay.
        node.mtime_sec = usr_sec
        assert node.children is not None
        node.children.clear()


def apply_transform(root: Node, transform: Transform, read_content: ContentReader) -> None:
    """Apply ``transform`` to the tree ``root`` in place, in cfsctl's order.

    ``read_content`` gives a regular file's content; only the bootable transform
    calls it, for the tree's SELinux policy files (sizes are checked first:
    :data:`composefsd.image.selabel.POLICY_FILE_MAX`). Raises :class:`TransformError`.
    """
    if transform.is_identity:
        return
    if root.children is None or not root.is_dir:
        raise TransformError(TransformErrorKind.NOT_A_DIRECTORY, b"/")
    if transform.propagate_usr_to_root:
        _copy_root_metadata_from_usr(root)
        _canonicalize_run(root)
    if transform.xattrs is not XattrFilter.ALL:
        _filter_xattrs(root, transform.xattrs)
    relink(root)
    if transform.bootable:
        # Imported here: selabel builds on this module's lookups.
        from composefsd.image.selabel import selabel

        _empty_toplevel_dirs(root)
        relink(root)
        selabel(root, read_content)
        relink(root)
