"""Read a composefs EROFS image back into a :class:`~composefsd.image.tree.Node` tree.

This reproduces C ``lcfs_load_node_from_image_ext`` (libcomposefs 1.0.8) on every
image C can read, quirks included, because ``composefs-info`` output and
``composefs-dump`` byte identity depend on them:

* the redirect read-back reads one byte too many (and skips the leading ``/``), so a
  payload whose length is 3 mod 4 picks up the two bytes after the value;
* the inline xattr loop stops when fewer than 5 bytes remain, so a final 4-byte
  entry (empty suffix and value) is dropped;
* real whiteouts (character devices 0/0, i.e. the root's ``00``..``ff``) are skipped;
* xattrs come inline first, then shared, in on-disk order, set through the reader's
  65535-byte estimate limit;
* a second directory entry for an already seen inode becomes a hardlink node
  (mode 0, nlink 1, ``link_to`` the first node), which also turns directory loops
  into harmless hardlinks.

Unlike C, it never trusts the image: every offset and size is checked against the
buffer before use and a problem raises :class:`ImageFormatError` naming it. Total
work is bounded by the image size (every region a valid image holds is read once,
so the reader refuses to read more than twice the image's bytes), the walk is
iterative, and nothing is allocated from a size field that has not been checked.
Where C would read outside the structure it is parsing, we raise instead.
"""

from __future__ import annotations

import errno
import gc
import mmap
import stat
import sys
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from composefsd.image.format import (
    BLOCK_SIZE,
    BLOCK_SIZE_BITS,
    COMPACT_INODE_READ,
    COMPOSEFS_MAGIC,
    COMPOSEFS_VERSION,
    DIRENT_READ,
    EROFS_MAGIC,
    EXTENDED_INODE_READ,
    HEADER,
    HEADER_FLAG_HAS_ACL,
    INODE_SLOT_BITS,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    METACOPY_ALGORITHMS,
    SUPERBLOCK,
    SUPERBLOCK_OFFSET,
    XATTR_ENTRY,
    XATTR_PREFIXES,
    XATTR_SHARED_REF,
    ErofsVersion,
)
from composefsd.image.tree import INLINE_CONTENT_MAX, PATH_MAX, XATTR_ESTIMATE_MAX_READER, Node

__all__ = [
    "ImageFormatError",
    "ImageHeader",
    "ImageInfo",
    "ImageSuperblock",
    "iter_objects",
    "read_header",
    "read_image",
    "read_superblock",
    "scan_objects",
]

_NAME_MAX = 255
_XATTR_NAME_MAX = 255


def _check_name(name: bytes, nid: int, exact: bool, seen: Container[bytes]) -> None:
    """A directory entry's name, as both the tree reader and the object scan check it."""
    if not name:
        raise ImageFormatError(errno.EINVAL, f"empty name for inode {nid} in a directory")
    if exact and b"/" in name:
        # C takes it as it is; a repository's tree never has such a name.
        raise ImageFormatError(errno.EINVAL, f"directory entry {name!r} (inode {nid}) contains '/'")
    if len(name) > _NAME_MAX:
        raise ImageFormatError(
            errno.ENAMETOOLONG,
            f"name of {len(name)} bytes for inode {nid} is longer than {_NAME_MAX}",
        )
    if name in seen:
        raise ImageFormatError(errno.EEXIST, f"duplicate directory entry {name!r} (inode {nid})")


_S_IFMT = stat.S_IFMT(0o177777)
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_S_IFCHR = stat.S_IFCHR
_S_IFBLK = stat.S_IFBLK


# What to do with an xattr, decided once per distinct full name.
_ACT_STORE = 0
_ACT_DROP = 1
_ACT_REDIRECT = 2
_ACT_METACOPY = 3
_ACT_ESC_WHITEOUT = 4

_OVERLAY_PREFIX = b"trusted.overlay."
_OVERLAY_ESCAPE_PREFIX = b"trusted.overlay.overlay."
_REDIRECT = b"trusted.overlay.redirect"
_METACOPY = b"trusted.overlay.metacopy"
_ESC_WHITEOUT = b"trusted.overlay.overlay.whiteout"
_DROPPED = frozenset(
    (b"trusted.overlay.overlay.whiteouts", b"user.overlay.whiteout", b"user.overlay.whiteouts")
)
#: The marks V1 puts on a directory holding whiteouts, as read back (unescaped).
_OPAQUE_MARKS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
_DIGEST_XATTR_SIZE = 4 + 32
_NAME_CACHE_MAX = 65536


class ImageFormatError(OSError):
    """The image is not one we can read; ``errno`` is what C libcomposefs would set
    (EINVAL, or ENOTSUP for a wrong header version) and the message says why."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(slots=True, frozen=True)
class ImageHeader:
    """The 32-byte composefs header."""

    version: int
    flags: int
    composefs_version: int


@dataclass(slots=True)
class ImageInfo:
    """A loaded image: its tree plus the header and superblock facts worth keeping."""

    root: Node
    composefs_version: int
    flags: int
    build_time: int
    build_time_nsec: int
    #: The superblock's inode count (what the writer emitted, whiteouts included).
    inodes: int
    #: Distinct inodes this reader visited (whiteouts and filtered entries excluded).
    inodes_read: int
    blocks: int
    root_nid: int


def _buffer(buf: bytes | bytearray | memoryview | mmap.mmap) -> bytes | mmap.mmap:
    # Slices must be hashable bytes (names and xattr keys are dict keys), and
    # memoryview lacks the .find() that the strnlen of directory names needs.
    if isinstance(buf, (bytes, mmap.mmap)):
        return buf
    return bytes(buf)


def read_header(buf: bytes | bytearray | memoryview | mmap.mmap) -> ImageHeader:
    """Parse and check the composefs header alone (C ``lcfs_version_from_fd``)."""
    data = _buffer(buf)
    if len(data) < HEADER.size:
        raise ImageFormatError(
            errno.EINVAL, f"image is {len(data)} bytes, too short for the composefs header"
        )
    magic, version, flags, cfs_version = HEADER.unpack_from(data, 0)
    if magic != COMPOSEFS_MAGIC:
        raise ImageFormatError(errno.EINVAL, f"bad composefs magic 0x{magic:08x}")
    if version != COMPOSEFS_VERSION:
        raise ImageFormatError(errno.ENOTSUP, f"unsupported composefs header version {version}")
    return ImageHeader(version=version, flags=flags, composefs_version=cfs_version)


def format_version(header: ImageHeader) -> ErofsVersion:
    """The image format ``header`` names; :class:`ImageFormatError` (``ENOTSUP``)
    for a ``composefs_version`` no writer knows (C's reader does not check it)."""
    try:
        return ErofsVersion(header.composefs_version)
    except ValueError:
        raise ImageFormatError(
            errno.ENOTSUP,
            f"unknown composefs image format version {header.composefs_version}",
        ) from None


class _SuperFields(NamedTuple):
    magic: int
    checksum: int
    feature_compat: int
    blkszbits: int
    sb_extslots: int
    root_nid: int
    inos: int
    build_time: int
    build_time_nsec: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int


def _unpack_super(data: bytes | mmap.mmap) -> _SuperFields:
    """The EROFS superblock's fields; raises if its magic is wrong."""
    sb = _SuperFields._make(SUPERBLOCK.unpack_from(data, SUPERBLOCK_OFFSET))
    if sb.magic != EROFS_MAGIC:
        raise ImageFormatError(errno.EINVAL, f"bad EROFS superblock magic 0x{sb.magic:08x}")
    return sb


@dataclass(slots=True, frozen=True)
class ImageSuperblock:
    """The header and EROFS superblock: what a mounter checks before the kernel sees the file."""

    header: ImageHeader
    root_nid: int
    inodes: int
    blocks: int

    @property
    def has_acl(self) -> bool:
        return bool(self.header.flags & HEADER_FLAG_HAS_ACL)


def read_superblock(head: bytes | bytearray | memoryview, file_size: int) -> ImageSuperblock:
    """Check the first block of an image of ``file_size`` bytes without reading the rest.

    Catches what the kernel would otherwise report only as EINVAL or, worse, as
    EIO on some later read: a file that is not a composefs image, a truncated
    image (the superblock's block count is the whole image size) and a superblock
    pointing outside the file.
    """
    data = _buffer(head)
    if file_size < BLOCK_SIZE or len(data) < BLOCK_SIZE:
        raise ImageFormatError(
            errno.EINVAL, f"image is {file_size} bytes, smaller than one {BLOCK_SIZE}-byte block"
        )
    header = read_header(data)
    sb = _unpack_super(data)
    blkszbits, root_nid, inos, blocks = sb.blkszbits, sb.root_nid, sb.inos, sb.blocks
    meta_blkaddr, xattr_blkaddr = sb.meta_blkaddr, sb.xattr_blkaddr
    if blkszbits != BLOCK_SIZE_BITS:
        raise ImageFormatError(errno.EINVAL, f"EROFS block size 2^{blkszbits} is not 4096")
    if blocks * BLOCK_SIZE != file_size:
        what = "truncated" if blocks * BLOCK_SIZE > file_size else "longer than its superblock says"
        raise ImageFormatError(
            errno.EINVAL,
            f"image is {what}: the superblock says {blocks} blocks "
            f"({blocks * BLOCK_SIZE} bytes), the file has {file_size} bytes",
        )
    for what, addr in (("metadata", meta_blkaddr), ("shared xattr", xattr_blkaddr)):
        if addr >= blocks:
            raise ImageFormatError(
                errno.EINVAL, f"{what} block {addr} is past the end of the image"
            )
    return ImageSuperblock(header=header, root_nid=root_nid, inodes=inos, blocks=blocks)


def _check_start(data: bytes | mmap.mmap, *, c_quirks: bool) -> tuple[ImageHeader, _SuperFields]:
    """The header and superblock, checked as far as the reader needs them."""
    size = len(data)
    if size < BLOCK_SIZE:
        raise ImageFormatError(
            errno.EINVAL, f"image is {size} bytes, smaller than one {BLOCK_SIZE}-byte block"
        )
    header = read_header(data)
    if not c_quirks:
        # C checks neither; a repository's image is whole (no block short or past
        # what the superblock says) and in a format composefs-rs knows.
        read_superblock(data[:BLOCK_SIZE], size)
        format_version(header)
    return header, _unpack_super(data)


def _reader_args(data: bytes | mmap.mmap, sb: _SuperFields) -> tuple[int, int, int, int]:
    """(metadata start, shared xattr start, build time, its nanoseconds), checked."""
    size = len(data)
    meta_start = sb.meta_blkaddr * BLOCK_SIZE
    xattr_start = sb.xattr_blkaddr * BLOCK_SIZE
    if meta_start >= size:
        raise ImageFormatError(
            errno.EINVAL, f"metadata block {sb.meta_blkaddr} is past the end of the image"
        )
    if xattr_start >= size:
        raise ImageFormatError(
            errno.EINVAL, f"shared xattr block {sb.xattr_blkaddr} is past the end of the image"
        )
    build_time = sb.build_time
    if build_time >= 1 << 63:
        build_time -= 1 << 64
    return meta_start, xattr_start, build_time, sb.build_time_nsec


def _exact(reader: _Reader, header: ImageHeader) -> None:
    """Set ``reader`` to read the tree that was written (``c_quirks=False``)."""
    # Only V2 stores whiteouts as themselves; in V0/V1 the 0/0 devices are
    # the writer's 00..ff overlay stubs, never part of the tree.
    reader.keep_whiteouts = header.composefs_version == ErofsVersion.V2
    reader.exact = True


def read_image(
    buf: bytes | bytearray | memoryview | mmap.mmap,
    *,
    filters: Sequence[bytes] | None = None,
    c_quirks: bool = True,
) -> ImageInfo:
    """Load an image into a tree; ``filters`` keeps only these top-level names.

    With ``c_quirks`` (the C tools ``composefs-info`` and ``composefs-dump``) the
    tree is what C libcomposefs 1.0.8 reads. Without, it is the tree that was
    written, as composefs-rs reads it, for a repository and for writing the image
    again in any format (:mod:`composefsd.image.formats`): V2's whiteouts
    (character devices 0/0, not escaped in V2) are kept, a sha512 ``metacopy``
    digest is read (C knows only sha256), the redirect is read exactly, the
    ``opaque`` marks V1 adds to directories holding whiteouts are dropped; and an
    image whose size is not its superblock's, whose ``composefs_version`` is above
    2 or that has a name holding ``/`` is refused.

    Raises :class:`ImageFormatError` for anything C would reject and for anything
    that is out of bounds or inconsistent.
    """
    data = _buffer(buf)
    header, sb = _check_start(data, c_quirks=c_quirks)
    root_nid, inos, blocks = sb.root_nid, sb.inos, sb.blocks
    reader = _Reader(data, *_reader_args(data, sb))
    build_time, build_time_nsec = reader.build_time, reader.build_time_nsec
    if not c_quirks:
        _exact(reader, header)
    # The tree is hundreds of thousands of acyclic objects; letting the cyclic
    # collector rescan them on every allocation burst costs a third of the time.
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        root = reader.load(root_nid, None if filters is None else frozenset(filters))
    finally:
        if gc_enabled:
            gc.enable()
    if not c_quirks and header.composefs_version == ErofsVersion.V1:
        _drop_opaque_marks(root)
    return ImageInfo(
        root=root,
        composefs_version=header.composefs_version,
        flags=header.flags,
        build_time=build_time,
        build_time_nsec=build_time_nsec,
        inodes=inos,
        inodes_read=reader.inodes_read,
        blocks=blocks,
        root_nid=root_nid,
    )


def scan_objects(
    buf: bytes | bytearray | memoryview | mmap.mmap,
    *,
    chunk: int = 0,
    on_chunk: Callable[[list[tuple[bytes, int]]], None] | None = None,
) -> list[tuple[bytes, int]]:
    """(payload, size) of every regular file of the image backed by an object (a
    payload and no inline data), once per inode, in the order the walk meets them:
    what a walk of ``read_image(buf, c_quirks=False)``'s tree finds, without
    building the tree (Verify's list of objects, in a third of the time).

    With ``on_chunk`` and ``chunk`` > 0, the objects are handed over while the walk
    goes on, ``on_chunk(objects)`` with every ``chunk`` of them (Verify starts
    checking them meanwhile), and only those not yet handed over are returned. An
    image refused later still raises: whatever was handed over is then from an
    image that is not valid, and the caller must drop it.

    It walks the image as :func:`read_image` does and makes every check it makes,
    in the same order, so it raises the same :class:`ImageFormatError` for every
    image :func:`read_image` refuses; only what it keeps differs. Inodes whose
    xattrs :func:`read_image` would store are read through the same code.
    """
    data = _buffer(buf)
    header, sb = _check_start(data, c_quirks=False)
    scan = _ObjectScan(data, *_reader_args(data, sb))
    _exact(scan, header)
    if on_chunk is not None and chunk > 0:
        scan.chunk, scan.on_chunk = chunk, on_chunk
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        scan.scan(sb.root_nid)
    finally:
        if gc_enabled:
            gc.enable()
    return scan.objects


def _drop_opaque_marks(root: Node) -> None:
    """Undo what V1 adds to a directory holding whiteouts (whatever it held before is
    lost: the writer sets the marks over it), so the tree is the one written."""
    stack = [root]
    while stack:
        node = stack.pop()
        children = node.children
        if not children:
            continue
        if any(c.mode & _S_IFMT == _S_IFCHR and c.rdev == 0 for c in children.values()):
            for key in _OPAQUE_MARKS:
                node.unset_xattr(key)
        stack.extend(c for c in children.values() if c.children)


def iter_objects(root: Node) -> set[bytes]:
    """Payloads of regular files (backing-object paths), as ``composefs-info objects``.

    Hardlink entries from the reader have mode 0 and so never count, like in C.
    """
    out: set[bytes] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node.mode & _S_IFMT == _S_IFREG and node.payload is not None:
            out.add(node.payload)
        if node.children:
            stack.extend(node.children.values())
    return out


def _cstr(b: bytes) -> bytes:
    """What C sees of ``b`` as a string: everything before the first NUL."""
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _metacopy_ok(value: bytes) -> bool:
    """A well-formed ``ovl_metacopy`` carrying a digest of a known algorithm."""
    size = len(value) - 4
    return (
        size in METACOPY_ALGORITHMS
        and value[:3] == bytes((0, len(value), 0))
        and value[3] == METACOPY_ALGORITHMS[size]
    )


#: :meth:`_Reader._inode`'s answer: offset, mode, size, i_u (block address, device or
#: chunk format), nlink, uid, gid, mtime, mtime_nsec, xattr area start and end, layout.
_InodeHead = tuple[int, int, int, int, int, int, int, int, int, int, int, int]


class _Whiteout:
    """Marker in the nid map for an inode that is a real whiteout."""


_WHITEOUT = _Whiteout()


class _Reader:
    __slots__ = (
        "_budget",
        "_data",
        "_meta",
        "_mtime",
        "_mtime_nsec",
        "_names",
        "_seen",
        "_shared",
        "_size",
        "_stack",
        "_xattr_start",
        "build_time",
        "build_time_nsec",
        "exact",
        "inodes_read",
        "keep_whiteouts",
    )

    def __init__(
        self,
        data: bytes | mmap.mmap,
        meta_start: int,
        xattr_start: int,
        build_time: int,
        build_time_nsec: int,
    ) -> None:
        self._data = data
        self._size = len(data)
        self._meta = meta_start
        self._xattr_start = xattr_start
        self._mtime = build_time
        self._mtime_nsec = build_time_nsec
        self.build_time = build_time
        self.build_time_nsec = build_time_nsec
        self._seen: dict[int, Node | _Whiteout] = {}
        # shared xattr index -> (name_index, suffix, value, value offset, entry end)
        self._shared: dict[int, tuple[int, bytes, bytes, int]] = {}
        # (name_index, suffix) -> (action, final key)
        self._names: dict[tuple[int, bytes], tuple[int, bytes]] = {}
        # Every region a valid image holds (inode, xattr area, directory data,
        # content, symlink target) is read exactly once; sharing or overlapping
        # regions is how a hostile image would multiply work, so cap the total.
        self._budget = 2 * self._size + 65536
        self._stack: list[tuple[dict[bytes, Node], Iterable[tuple[bytes, int]]]] = []
        self.inodes_read = 0
        self.keep_whiteouts = False
        self.exact = False

    def _spend(self, n: int, what: str) -> None:
        self._budget -= n
        if self._budget < 0:
            raise ImageFormatError(
                errno.EINVAL,
                f"{what}: image structures overlap or repeat (read more than twice the image size)",
            )

    # -- the walk -------------------------------------------------------------------
    def load(self, root_nid: int, filters: frozenset[bytes] | None) -> Node:
        root = self._visit(root_nid, filters)
        if root is None:
            raise ImageFormatError(errno.ENOTSUP, f"root inode {root_nid} is a whiteout")
        stack = self._stack
        visit = self._visit
        while stack:
            children, entries = stack[-1]
            depth = len(stack)
            for name, nid in entries:
                child = visit(nid, None)
                if child is None:
                    continue  # real whiteout, as C does
                _check_name(name, nid, self.exact, children)
                children[name] = child
                if len(stack) != depth:
                    break  # descend first: C builds each child's subtree before the next
            else:
                stack.pop()
        return root

    def _inode_error(self, nid: int, off: int, what: str) -> ImageFormatError:
        return ImageFormatError(
            errno.EINVAL, f"inode {nid} at offset 0x{off:x}: {what} extends past end of image"
        )

    def _inode(self, nid: int) -> _InodeHead | None:
        """What every visit of inode ``nid`` starts with, :meth:`_visit`'s and
        :func:`scan_objects`'s alike: the inode read and checked against the image,
        its xattr area bounded and paid for (:meth:`_spend`); None for a real
        whiteout (recorded in ``_seen``). For an inode not seen before."""
        data = self._data
        size = self._size
        off = self._meta + (nid << INODE_SLOT_BITS)
        if off >= size:
            raise ImageFormatError(
                errno.EINVAL, f"inode {nid} at offset 0x{off:x} is past end of image"
            )
        if off + 32 > size:
            raise self._inode_error(nid, off, "inode")
        i_format = data[off] | data[off + 1] << 8
        if i_format & 1:
            if off + 64 > size:
                raise self._inode_error(nid, off, "extended inode")
            (
                i_format,
                icount,
                mode,
                file_size,
                i_u,
                uid,
                gid,
                mtime,
                mtime_nsec,
                nlink,
            ) = EXTENDED_INODE_READ.unpack_from(data, off)
            isize = 64
        else:
            i_format, icount, mode, nlink, file_size, i_u, uid, gid = (
                COMPACT_INODE_READ.unpack_from(data, off)
            )
            mtime = self._mtime
            mtime_nsec = self._mtime_nsec
            isize = 32
        if mode & _S_IFMT == _S_IFCHR and i_u == 0 and not self.keep_whiteouts:
            self._seen[nid] = _WHITEOUT
            return None
        xattr_size = 12 + (icount - 1) * 4 if icount else 0
        area = off + isize
        tail = area + xattr_size
        if tail > size:
            raise self._inode_error(nid, off, f"xattr area of {xattr_size} bytes")
        self._spend(isize + xattr_size, f"inode {nid}")
        return (
            off,
            mode,
            file_size,
            i_u,
            nlink,
            uid,
            gid,
            mtime,
            mtime_nsec,
            area,
            tail,
            (i_format >> 1) & 7,
        )

    def _visit(self, nid: int, filters: frozenset[bytes] | None) -> Node | None:
        """Build the node for ``nid``; directories get a frame pushed on the stack."""
        seen = self._seen.get(nid)
        if seen is not None:
            if isinstance(seen, _Whiteout):
                return None
            return Node(mode=0, link_to=seen)
        head = self._inode(nid)
        if head is None:
            return None
        off, mode, file_size, i_u, nlink, uid, gid, mtime, mtime_nsec, area, tail, layout = head
        ftype = mode & _S_IFMT
        node = Node(
            mode=mode,
            nlink=nlink,
            uid=uid,
            gid=gid,
            rdev=i_u if ftype in (_S_IFCHR, _S_IFBLK) else 0,
            size=file_size,
            mtime_sec=mtime,
            mtime_nsec=mtime_nsec,
        )
        self._seen[nid] = node
        self.inodes_read += 1

        if ftype == _S_IFDIR:
            node.children = {}
            entries = self._read_dir(
                nid, off, file_size, layout == LAYOUT_FLAT_INLINE, tail, i_u, filters
            )
            self._stack.append((node.children, iter(entries)))
        elif ftype == _S_IFLNK:
            node.payload = self._symlink_target(nid, off, file_size, layout, tail, i_u)
            node.size = len(node.payload)
        elif ftype == _S_IFREG and file_size != 0:
            content = self._inline_content(nid, off, file_size, layout, tail, i_u)
            if content is not None:
                node.content = content

        if tail != area:
            self._read_xattrs(node, nid, area, tail)
        return node

    def _symlink_target(
        self, nid: int, off: int, file_size: int, layout: int, tail: int, raw_blkaddr: int
    ) -> bytes:
        """A symlink inode's target, checked (bounds, length, not empty) and paid for."""
        if file_size >= PATH_MAX:
            raise ImageFormatError(
                errno.EINVAL,
                f"inode {nid}: symlink target of {file_size} bytes is too long",
            )
        start = tail if layout == LAYOUT_FLAT_INLINE else raw_blkaddr * BLOCK_SIZE
        if start + file_size > self._size:
            raise self._inode_error(nid, off, f"symlink target of {file_size} bytes")
        self._spend(file_size, f"inode {nid}")
        target = _cstr(self._data[start : start + file_size])
        if not target:
            raise ImageFormatError(errno.EINVAL, f"inode {nid}: empty symlink target")
        return target

    def _inline_content(
        self, nid: int, off: int, file_size: int, layout: int, tail: int, raw_blkaddr: int
    ) -> bytes | None:
        """A non-empty regular file's content held in the image (checked and paid
        for), or None for a chunk-based one (backed by an object, or sparse)."""
        tailpacked = layout == LAYOUT_FLAT_INLINE
        if layout != LAYOUT_FLAT_PLAIN and not tailpacked:
            if layout != LAYOUT_CHUNK_BASED:
                raise ImageFormatError(
                    errno.EINVAL, f"inode {nid}: regular file with unsupported layout {layout}"
                )
            return None
        if file_size > min(INLINE_CONTENT_MAX, self._size):
            raise ImageFormatError(
                errno.EINVAL,
                f"inode {nid}: inline file of {file_size} bytes exceeds {INLINE_CONTENT_MAX}",
            )
        data = self._data
        if tailpacked:
            tail_size = file_size % BLOCK_SIZE
            if tail_size == 0:
                # C would return uninitialised memory here.
                raise ImageFormatError(
                    errno.EINVAL, f"inode {nid}: inline-layout file with an empty tail"
                )
            oob_size = file_size - tail_size
        else:
            tail_size = 0
            oob_size = file_size
        oob = raw_blkaddr * BLOCK_SIZE
        if oob_size and oob + oob_size > self._size:
            raise self._inode_error(nid, off, f"file data block {raw_blkaddr}")
        if tail + tail_size > self._size:
            raise self._inode_error(nid, off, f"inline data of {tail_size} bytes")
        self._spend(file_size, f"inode {nid}")
        if tail_size:
            return data[oob : oob + oob_size] + data[tail : tail + tail_size]
        return data[oob : oob + oob_size]

    # -- directories ----------------------------------------------------------------
    def _read_dir(
        self,
        nid: int,
        off: int,
        file_size: int,
        tailpacked: bool,
        tail: int,
        raw_blkaddr: int,
        filters: frozenset[bytes] | None,
    ) -> list[tuple[bytes, int]]:
        size = self._size
        n_blocks = -(-file_size // BLOCK_SIZE)
        # C computes n_blocks - 1 in u64: a zero-size inline directory would make it
        # loop "forever"; refuse instead.
        if tailpacked and n_blocks == 0:
            raise ImageFormatError(errno.EINVAL, f"inode {nid}: inline directory of size 0")
        last_oob = n_blocks - 1 if tailpacked else n_blocks
        entries: list[tuple[bytes, int]] = []
        if last_oob:
            start = raw_blkaddr * BLOCK_SIZE
            if not tailpacked and file_size % BLOCK_SIZE:
                end = start + (last_oob - 1) * BLOCK_SIZE + file_size % BLOCK_SIZE
            else:
                end = start + last_oob * BLOCK_SIZE
            if end > size:
                raise self._inode_error(
                    nid, off, f"directory data of {last_oob} blocks at block {raw_blkaddr}"
                )
            self._spend(end - start, f"directory inode {nid}")
            for block in range(last_oob):
                bstart = start + block * BLOCK_SIZE
                self._read_chunk(nid, bstart, min(BLOCK_SIZE, end - bstart), filters, entries)
        if tailpacked:
            tail_size = file_size % BLOCK_SIZE
            if tail + tail_size > size:
                raise self._inode_error(nid, off, f"inline directory data of {tail_size} bytes")
            self._spend(tail_size, f"directory inode {nid}")
            self._read_chunk(nid, tail, tail_size, filters, entries)
        return entries

    def _read_chunk(
        self,
        nid: int,
        start: int,
        chunk_size: int,
        filters: frozenset[bytes] | None,
        entries: list[tuple[bytes, int]],
    ) -> None:
        data = self._data
        if chunk_size < 12:
            raise ImageFormatError(
                errno.EINVAL,
                f"directory inode {nid}: {chunk_size}-byte dirent block at 0x{start:x} "
                f"is too small for a dirent",
            )
        first_nameoff = data[start + 8] | data[start + 9] << 8
        if first_nameoff % 12:
            raise ImageFormatError(
                errno.EINVAL,
                f"directory inode {nid}: first name offset {first_nameoff} at 0x{start:x} "
                f"is not a multiple of the dirent size",
            )
        if first_nameoff > chunk_size:
            raise ImageFormatError(
                errno.EINVAL,
                f"directory inode {nid}: {first_nameoff // 12} dirents at 0x{start:x} do not "
                f"fit in a {chunk_size}-byte block",
            )
        n = first_nameoff // 12
        if n == 0:
            return
        dirents = list(DIRENT_READ.iter_unpack(data[start : start + first_nameoff]))
        end = start + chunk_size
        last = n - 1
        for i, (child_nid, nameoff) in enumerate(dirents):
            name_start = start + nameoff
            if i < last:
                next_off = dirents[i + 1][1]
                if not first_nameoff <= nameoff <= next_off <= chunk_size:
                    raise ImageFormatError(
                        errno.EINVAL,
                        f"directory inode {nid}: name offsets {nameoff}, {next_off} at "
                        f"0x{start:x} are out of order or outside the {chunk_size}-byte block",
                    )
                name_end = start + next_off
            else:
                if not first_nameoff <= nameoff <= chunk_size:
                    raise ImageFormatError(
                        errno.EINVAL,
                        f"directory inode {nid}: name offset {nameoff} at 0x{start:x} is "
                        f"outside the {chunk_size}-byte block",
                    )
                name_end = data.find(b"\0", name_start, end)
                if name_end < 0:
                    name_end = end
            if name_end - name_start >= PATH_MAX:
                name_end = name_start + PATH_MAX - 1
            name = data[name_start:name_end]
            if name == b"." or name == b"..":
                continue
            if b"\0" in name:
                name = _cstr(name)
            if filters is not None and name not in filters:
                continue
            entries.append((name, child_nid))

    # -- xattrs ---------------------------------------------------------------------
    def _name_action(self, index: int, suffix: bytes, nid: int) -> tuple[int, bytes]:
        key = (index, suffix)
        if index >= len(XATTR_PREFIXES):
            raise ImageFormatError(errno.EINVAL, f"inode {nid}: unknown xattr name index {index}")
        name = _cstr(XATTR_PREFIXES[index] + suffix)
        if name == _REDIRECT:
            res = (_ACT_REDIRECT, name)
        elif name == _METACOPY:
            res = (_ACT_METACOPY, name)
        elif name == _ESC_WHITEOUT:
            # On a non-regular file it is kept, unescaped, like any escaped name.
            res = (_ACT_ESC_WHITEOUT, b"trusted.overlay.whiteout")
        elif name in _DROPPED:
            res = (_ACT_DROP, name)
        elif name.startswith(_OVERLAY_PREFIX):
            if name.startswith(_OVERLAY_ESCAPE_PREFIX):
                res = (_ACT_STORE, _OVERLAY_PREFIX + name[len(_OVERLAY_ESCAPE_PREFIX) :])
            else:
                res = (_ACT_DROP, name)
        else:
            res = (_ACT_STORE, name)
        if len(self._names) < _NAME_CACHE_MAX:
            self._names[key] = res
        return res

    def _read_xattrs(self, node: Node, nid: int, area: int, area_end: int) -> None:
        self._apply_xattrs(node, nid, self._xattr_items(nid, area, area_end))

    def _xattr_items(
        self, nid: int, area: int, area_end: int
    ) -> list[tuple[int, bytes, bytes, int]]:
        """The xattrs of the area (checked against it and the image), as
        (name_index, suffix, value, value offset) in C's processing order."""
        data = self._data
        size = self._size
        shared_count = data[area + 4]
        pos = area + 12 + shared_count * 4
        entry = XATTR_ENTRY.unpack_from
        # (name_index, suffix, value, value offset) in C's processing order.
        items: list[tuple[int, bytes, bytes, int]] = []
        # C quirk: "while (entry + 4 < end)" drops a final entry of exactly 4 bytes.
        while pos + 4 < area_end:
            name_len, name_index, value_size = entry(data, pos)
            name_start = pos + 4
            value_start = name_start + name_len
            value_end = value_start + value_size
            if value_end > area_end:
                raise ImageFormatError(
                    errno.EINVAL,
                    f"inode {nid}: xattr entry at 0x{pos:x} extends past its xattr area",
                )
            items.append(
                (name_index, data[name_start:value_start], data[value_start:value_end], value_start)
            )
            pos += (4 + name_len + value_size + 3) & ~3
        if shared_count:
            if area + 12 + shared_count * 4 > area_end:
                raise ImageFormatError(
                    errno.EINVAL,
                    f"inode {nid}: {shared_count} shared xattr refs do not fit in its "
                    f"{area_end - area}-byte xattr area",
                )
            shared = self._shared
            for (idx,) in XATTR_SHARED_REF.iter_unpack(
                data[area + 12 : area + 12 + 4 * shared_count]
            ):
                hit = shared.get(idx)
                if hit is None:
                    epos = self._xattr_start + idx * 4
                    if epos + 4 > size:
                        raise ImageFormatError(
                            errno.EINVAL,
                            f"inode {nid}: shared xattr {idx} at 0x{epos:x} is past end of image",
                        )
                    name_len, name_index, value_size = entry(data, epos)
                    value_start = epos + 4 + name_len
                    if value_start + value_size > size:
                        raise ImageFormatError(
                            errno.EINVAL,
                            f"inode {nid}: shared xattr {idx} at 0x{epos:x} extends past end "
                            f"of image",
                        )
                    hit = (
                        name_index,
                        data[epos + 4 : value_start],
                        data[value_start : value_start + value_size],
                        value_start,
                    )
                    shared[idx] = hit
                items.append(hit)
        return items

    def _apply_xattrs(
        self, node: Node, nid: int, items: list[tuple[int, bytes, bytes, int]]
    ) -> None:
        data = self._data
        names = self._names
        index: dict[bytes, int] = {}
        for name_index, suffix, value, value_start in items:
            action_key = names.get((name_index, suffix))
            if action_key is None:
                action_key = self._name_action(name_index, suffix, nid)
            action, key = action_key
            if action == _ACT_STORE:
                self._set_xattr(node, index, nid, key, value)
            elif action == _ACT_DROP:
                pass
            elif node.mode & _S_IFMT != _S_IFREG:
                # redirect and metacopy apply to regular files only; an escaped
                # whiteout on anything else is kept, unescaped, like other names.
                if action == _ACT_ESC_WHITEOUT:
                    self._set_xattr(node, index, nid, key, value)
            elif action == _ACT_REDIRECT:
                value_size = len(value)
                if self.exact:
                    node.payload = _cstr(
                        value[1:] if value_size > 1 and value[0] == 0x2F else value
                    )
                elif value_size > 1 and value[0] == 0x2F:
                    # C bug: skips the '/' but grows the length, so strndup reads
                    # up to two bytes past the value.
                    start = value_start + 1
                    node.payload = _cstr(data[start : start + value_size + 1])
                else:
                    node.payload = _cstr(value)
            elif action == _ACT_METACOPY:
                if len(value) == _DIGEST_XATTR_SIZE or (self.exact and _metacopy_ok(value)):
                    node.digest = value[4:]
            else:  # escaped whiteout on a regular file: it was a whiteout
                node.mode = (node.mode & ~_S_IFMT) | _S_IFCHR
                node.rdev = 0
                node.size = 0

    @staticmethod
    def _set_xattr(node: Node, index: dict[bytes, int], nid: int, key: bytes, value: bytes) -> None:
        """``Node.set_xattr(limit=65535)`` with an index instead of a linear search.

        Same results: the replaced entry is swapped with the last one, and the
        running estimate follows C ``lcfs_node_set_xattr_internal``.
        """
        if not 0 < len(key) <= _XATTR_NAME_MAX:
            raise ImageFormatError(
                errno.ERANGE, f"inode {nid}: xattr name of {len(key)} bytes is invalid"
            )
        xattrs = node.xattrs
        old = index.pop(key, None)
        if old is not None:
            old_value = xattrs[old][1]
            last = xattrs.pop()
            if old < len(xattrs):
                xattrs[old] = last
                index[last[0]] = old
            if xattrs:
                node.xattr_estimate -= 7 + len(key) + len(old_value)
            else:
                node.xattr_estimate = 0
        cost = 7 + len(key) + len(value)
        if not xattrs:
            cost += 12
        if node.xattr_estimate + cost > XATTR_ESTIMATE_MAX_READER:
            raise ImageFormatError(
                errno.ERANGE, f"inode {nid}: xattrs exceed {XATTR_ESTIMATE_MAX_READER} bytes"
            )
        node.xattr_estimate += cost
        index[key] = len(xattrs)
        xattrs.append((key, value))


# The scan's mark for an inode already visited (a second entry is a hardlink).
_SCANNED = Node(mode=0)


class _ObjectScan(_Reader):
    """:func:`scan_objects`: :meth:`_Reader.load`'s walk and :meth:`_Reader._visit`'s
    checks, step for step, keeping the objects instead of building nodes."""

    __slots__ = ("_frames", "chunk", "objects", "on_chunk")

    def __init__(
        self,
        data: bytes | mmap.mmap,
        meta_start: int,
        xattr_start: int,
        build_time: int,
        build_time_nsec: int,
    ) -> None:
        super().__init__(data, meta_start, xattr_start, build_time, build_time_nsec)
        self.objects: list[tuple[bytes, int]] = []
        #: Hand ``objects`` over to ``on_chunk`` whenever they are this many (0: never).
        self.chunk = 0
        self.on_chunk: Callable[[list[tuple[bytes, int]]], None] | None = None
        # Per directory being walked: the names seen so far (duplicates are refused)
        # and its remaining entries.
        self._frames: list[tuple[set[bytes], Iterator[tuple[bytes, int]]]] = []

    def scan(self, root_nid: int) -> None:
        if not self._scan_inode(root_nid):
            raise ImageFormatError(errno.ENOTSUP, f"root inode {root_nid} is a whiteout")
        stack = self._frames
        visit = self._scan_inode
        exact = self.exact
        chunk = self.chunk or sys.maxsize
        while stack:
            names, entries = stack[-1]
            depth = len(stack)
            for name, nid in entries:
                if not visit(nid):
                    continue  # real whiteout, as C does
                if len(self.objects) >= chunk:
                    assert self.on_chunk is not None
                    self.on_chunk(self.objects)
                    self.objects = []
                _check_name(name, nid, exact, names)
                names.add(name)
                if len(stack) != depth:
                    break  # descend first, as load() does
            else:
                stack.pop()

    def _scan_inode(self, nid: int) -> bool:
        """:meth:`_Reader._visit` without the node: False for a real whiteout."""
        seen = self._seen.get(nid)
        if seen is not None:
            return not isinstance(seen, _Whiteout)
        head = self._inode(nid)
        if head is None:
            return False
        off, mode, file_size, i_u, _, _, _, _, _, area, tail, layout = head
        self._seen[nid] = _SCANNED
        self.inodes_read += 1

        ftype = mode & _S_IFMT
        inline = False
        if ftype == _S_IFDIR:
            entries = self._read_dir(
                nid, off, file_size, layout == LAYOUT_FLAT_INLINE, tail, i_u, None
            )
            self._frames.append((set(), iter(entries)))
        elif ftype == _S_IFLNK:
            self._symlink_target(nid, off, file_size, layout, tail, i_u)
        elif ftype == _S_IFREG and file_size != 0:
            # The same checks; the content itself is not kept.
            inline = self._inline_content(nid, off, file_size, layout, tail, i_u) is not None

        if tail != area:
            payload, mode = self._scan_xattrs(nid, mode, file_size, area, tail)
            if payload is not None and not inline and mode & _S_IFMT == _S_IFREG:
                self.objects.append((payload, file_size))
        return True

    def _scan_xattrs(
        self, nid: int, mode: int, file_size: int, area: int, area_end: int
    ) -> tuple[bytes | None, int]:
        """The payload and the mode :meth:`_Reader._apply_xattrs` would leave.

        The common case is read in one pass: inline entries only (no shared
        ones), each within the area, with names already met whose action is a
        redirect, a metacopy or a drop (none of them can fail). Anything else (a
        shared xattr, a name to store or not seen before, an entry out of bounds)
        goes through :meth:`_Reader._xattr_items` and ``_apply_xattrs`` themselves,
        which raise what :func:`read_image` raises.
        """
        data = self._data
        regular = mode & _S_IFMT == _S_IFREG
        if data[area + 4] == 0:
            names = self._names
            entry = XATTR_ENTRY.unpack_from
            payload = None
            pos = area + 12
            while pos + 4 < area_end:
                name_len, name_index, value_size = entry(data, pos)
                value_start = pos + 4 + name_len
                value_end = value_start + value_size
                if value_end > area_end:
                    break
                action_key = names.get((name_index, data[pos + 4 : value_start]))
                if action_key is None:
                    break
                action = action_key[0]
                if action == _ACT_STORE or action == _ACT_ESC_WHITEOUT:
                    break
                if regular and action == _ACT_REDIRECT:
                    if value_size > 1 and data[value_start] == 0x2F:
                        value_start += 1
                    payload = data[value_start:value_end]
                    if b"\0" in payload:
                        payload = _cstr(payload)
                pos += (4 + name_len + value_size + 3) & ~3
            else:
                return payload, mode
        items = self._xattr_items(nid, area, area_end)
        node = Node(mode=mode, size=file_size)
        self._apply_xattrs(node, nid, items)
        return node.payload, node.mode
