"""EROFS image writer for composefs-rs's format V2 (its original layout).

Byte-identical to composefs-rs 0.9's ``mkfs_erofs_versioned(.., FormatVersion::V2)``.
What sets V2 apart from the C layout (:mod:`composefsd.image.writer`):

* inodes in depth-first pre-order (a directory, then each entry's subtree in
  name order), every one an extended 64-byte inode whose ``i_ino`` is its nid
  and whose ``mtime_nsec`` is 0;
* no 00..ff whiteout stubs, no whiteout escaping, no root ``opaque`` mark: a
  whiteout is stored as the character device 0/0 it is;
* xattr prefixes include ``lustre.``; an inode's xattrs are its ``metacopy`` and
  ``redirect`` then its own in name order; the shared table is ascending by
  (prefix index, suffix, value) and referenced by absolute offset / 4
  (``xattr_blkaddr`` is 0);
* an external file is one chunk (chunk format 31) with one inline index, and
  only when it has a digest; inline content is never split into blocks;
* an inline tail that would cross a block boundary moves its inode to start
  just past the boundary (the 32-byte slot after it), not to the boundary;
* ``build_time`` 0, header flags 0, ``composefs_version`` 2;
* a leaf's ``nlink`` is the number of entries naming it in the tree.

Like the C-layout writer, the input tree is never modified, and the image is
laid out first (positions only) and then packed into one pre-zeroed buffer.
"""

from __future__ import annotations

import errno
import stat
import struct

from .format import (
    BLOCK_SIZE,
    BLOCK_SIZE_BITS,
    COMPOSEFS_MAGIC,
    COMPOSEFS_VERSION,
    DIRENT_FIELDS,
    DIRENT_FILE_TYPES,
    DIRENT_SIZE,
    EROFS_MAGIC,
    EXTENDED_INODE,
    FEATURE_COMPAT_MTIME,
    FEATURE_COMPAT_XATTR_FILTER,
    HEADER,
    INODE_SLOT_SIZE,
    INODES_START,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    SUPERBLOCK,
    SUPERBLOCK_OFFSET,
    V2_CHUNK_FORMAT,
    XATTR_AREA_MAX,
    XATTR_ENTRY,
    XATTR_FILTER_SEED,
    XATTR_IBODY_HEADER,
    XATTR_PREFIXES,
    XATTR_SHARED_REF,
    ErofsVersion,
    metacopy_value,
)
from .tree import S_IFMT, VALID_FILE_TYPES, Node, TreeError, gc_paused
from .writer import WriteError
from .xxhash import xxh32

__all__ = ["write_image_v2"]

_S_IFLNK = stat.S_IFLNK
_S_IFREG = stat.S_IFREG
_S_IFBLK = stat.S_IFBLK
_S_IFDIR = stat.S_IFDIR
_S_IFCHR = stat.S_IFCHR

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_INODE_SIZE = EXTENDED_INODE.size
_HALF_BLOCK = BLOCK_SIZE // 2
_FEATURE_COMPAT = FEATURE_COMPAT_MTIME | FEATURE_COMPAT_XATTR_FILTER
# The inode's 8-bit shared xattr count bounds its references.
_MAX_SHARED_REFS = 0xFF
_XATTR_NAME_MAX = 0xFF
_XATTR_VALUE_MAX = 0xFFFF
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")  # zeros to the next multiple of 4
_EXTERNAL_TAIL = b"\xff\xff\xff\xff"  # the one chunk index: "no block" (a hole)

_OVERLAY_PREFIX = b"trusted.overlay."
_OVERLAY_ESCAPED_PREFIX = b"trusted.overlay.overlay."
_METACOPY = b"trusted.overlay.metacopy"
_REDIRECT = b"trusted.overlay.redirect"

# (prefix, index) from the last to the first, as composefs-rs tries them; the
# whole-name index 0 is the fallback.
_PREFIXES = tuple((p, i) for i, p in reversed(list(enumerate(XATTR_PREFIXES))) if p)

#: One xattr as stored: (name index, suffix, value).
_XAttr = tuple[int, bytes, bytes]


def _encode_key(key: bytes) -> tuple[int, bytes]:
    for prefix, index in _PREFIXES:
        if key.startswith(prefix):
            return index, key[len(prefix) :]
    return 0, key


def _entry_size(x: _XAttr) -> int:
    return (4 + len(x[1]) + len(x[2]) + 3) & ~3


def _pack_entry(x: _XAttr) -> bytes:
    raw = XATTR_ENTRY.pack(len(x[1]), x[0], len(x[2])) + x[1] + x[2]
    return raw + b"\0" * (-len(raw) & 3)


class _Inodes:
    """Per-inode facts in depth-first order, as parallel lists."""

    __slots__ = ("dirs", "links", "nodes")

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        #: Each inode's nlink: entries naming it for a leaf, 2 + subdirectories for a
        #: directory.
        self.links: list[int] = []
        #: Per inode: (sorted names, the inode index each names), or None for a leaf.
        self.dirs: list[tuple[list[bytes], list[int]] | None] = []


def _resolve(entry: Node) -> Node:
    try:
        return entry.target()
    except TreeError as e:
        raise WriteError(errno.ELOOP, str(e)) from None


def _check_names(names: list[bytes]) -> None:
    joined = b"".join(names)
    if b"/" in joined or b"\0" in joined or not all(names) or max(map(len, names)) > 255:
        bad = next(n for n in names if not n or b"/" in n or b"\0" in n or len(n) > 255)
        raise WriteError(errno.EINVAL, f"invalid directory entry name {bad!r}")


def _collect(root: Node) -> _Inodes:
    """The inodes in composefs-rs's depth-first order, with every check it makes."""
    if root.mode & S_IFMT != _S_IFDIR or root.children is None:
        raise WriteError(errno.ENOTDIR, "root is not a directory")
    out = _Inodes()
    nodes, links, dirs = out.nodes, out.links, out.dirs
    index_of: dict[int, int] = {}
    parents: list[int] = []
    # Per directory: its index, sorted names, and the inode each names (None for . and ..).
    pending: list[tuple[int, list[bytes], list[Node | None]]] = []
    # (inode, parent index), popped in depth-first pre-order: a directory, then
    # each entry's subtree in name order.
    stack: list[tuple[Node, int]] = [(root, 0)]
    while stack:
        node, parent = stack.pop()
        mode = node.mode & S_IFMT
        seen = index_of.get(id(node))
        if seen is not None:
            if mode == _S_IFDIR:
                raise WriteError(errno.EINVAL, "a directory is in the tree twice")
            links[seen] += 1
            continue
        if mode not in VALID_FILE_TYPES:
            raise WriteError(errno.EINVAL, f"invalid file type in mode {node.mode:o}")
        i = len(nodes)
        index_of[id(node)] = i
        nodes.append(node)
        links.append(1)
        dirs.append(None)
        parents.append(parent)
        if mode == _S_IFDIR:
            children = node.children or {}
            if b"." in children or b".." in children:
                raise WriteError(errno.EINVAL, "a directory entry may not be named . or ..")
            names = [*children, b".", b".."]
            names.sort()
            _check_names(names)
            resolved: list[Node | None] = []
            for name in names:
                child = children.get(name)
                if child is not None and child.link_to is not None:
                    child = _resolve(child)
                resolved.append(child)
            pending.append((i, names, resolved))
            stack.extend((c, i) for c in reversed(resolved) if c is not None)
        elif node.children:
            raise WriteError(errno.EINVAL, "a non-directory has children")
    for i, names, resolved in pending:
        targets: list[int] = []
        subdirs = 0
        for name, child in zip(names, resolved, strict=True):
            if child is None:
                targets.append(i if name == b"." else parents[i])
            else:
                targets.append(index_of[id(child)])
                if child.mode & S_IFMT == _S_IFDIR:
                    subdirs += 1
        dirs[i] = (names, targets)
        links[i] = 2 + subdirs
    return out


def _xattrs(node: Node) -> list[_XAttr]:
    """The inode's xattrs in composefs-rs's order, before sharing."""
    out: list[_XAttr] = []
    if node.mode & S_IFMT == _S_IFREG and node.size > 0 and node.content is None:
        digest = node.digest
        if digest is not None:
            try:
                out.append((4, _METACOPY[8:], metacopy_value(digest)))
            except ValueError as e:
                raise WriteError(errno.EINVAL, str(e)) from None
        else:
            out.append((4, _METACOPY[8:], b""))
        if node.payload:
            out.append((4, _REDIRECT[8:], b"/" + node.payload))
    for key, value in sorted(node.xattrs):
        if key.startswith(_OVERLAY_PREFIX):
            key = _OVERLAY_ESCAPED_PREFIX + key[len(_OVERLAY_PREFIX) :]
        index, suffix = _encode_key(key)
        if not suffix and not index:
            raise WriteError(errno.EINVAL, "empty xattr name")
        if len(suffix) > _XATTR_NAME_MAX:
            raise WriteError(errno.ERANGE, f"xattr name {key!r} is too long")
        if len(value) > _XATTR_VALUE_MAX:
            raise WriteError(errno.E2BIG, f"xattr {key!r} value of {len(value)} bytes")
        out.append((index, suffix, value))
    return out


def write_image_v2(root: Node) -> bytes:
    """Serialise ``root`` in format V2; raises :class:`WriteError`."""
    with gc_paused():
        return _write(root)


def _write(root: Node) -> bytes:
    inodes = _collect(root)
    nodes = inodes.nodes
    links = inodes.links
    dirs = inodes.dirs
    count = len(nodes)

    # -- xattrs and their sharing --------------------------------------------------
    all_xattrs = [_xattrs(n) if n.xattrs or n.mode & S_IFMT == _S_IFREG else [] for n in nodes]
    uses: dict[_XAttr, int] = {}
    for xs in all_xattrs:
        for x in xs:
            uses[x] = uses.get(x, 0) + 1
    shared = sorted(x for x, n in uses.items() if n > 1)
    shared_rel: dict[_XAttr, int] = {}
    offset = 0
    for x in shared:
        shared_rel[x] = offset
        offset += _entry_size(x)
    shared_size = offset

    # -- layout ----------------------------------------------------------------------
    # Per inode: position, layout, size, i_u (without block address), xattr
    # area size, inline bytes, and for directories the per-block entry ranges.
    positions = [0] * count
    layouts = [0] * count
    sizes = [0] * count
    xsizes = [0] * count
    # Per inode with xattrs: (name filter, shared references, the inline entries).
    xareas: dict[int, tuple[int, list[int], bytes]] = {}
    filter_cache: dict[tuple[tuple[int, bytes], ...], int] = {}
    heads: dict[tuple[int, bytes, int], bytes] = {}
    dir_blocks: dict[int, list[tuple[int, int]]] = {}
    dir_inline: dict[int, tuple[int, int]] = {}
    n_blocks = [0] * count
    pos = INODES_START
    for i in range(count):
        node = nodes[i]
        mode = node.mode & S_IFMT
        xs = all_xattrs[i]
        xsz = 0
        if xs:
            refs: list[int] = []
            parts: list[bytes] = []
            for x in xs:
                rel = shared_rel.get(x)
                if rel is not None:
                    refs.append(rel)
                    continue
                index, suffix, value = x
                head = heads.get((index, suffix, len(value)))
                if head is None:
                    head = XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix
                    heads[(index, suffix, len(value))] = head
                parts += (head, value, _PADS[(len(head) + len(value)) & 3])
            if len(refs) > _MAX_SHARED_REFS:
                raise WriteError(errno.E2BIG, f"{len(refs)} shared xattrs on one inode")
            local = b"".join(parts)
            xsz = 12 + 4 * len(refs) + len(local)
            if xsz > XATTR_AREA_MAX:
                raise WriteError(errno.E2BIG, "xattrs too large for one inode")
            keys = tuple([(x[0], x[1]) for x in xs])
            name_filter = filter_cache.get(keys)
            if name_filter is None:
                bits = 0
                for index, suffix in keys:
                    bits |= 1 << (xxh32(suffix, XATTR_FILTER_SEED + index) & 31)
                name_filter = filter_cache[keys] = ~bits & _U32
            xareas[i] = (name_filter, refs, local)
        xsizes[i] = xsz
        inline = 0
        layout = LAYOUT_FLAT_PLAIN
        if mode == _S_IFDIR:
            entry = dirs[i]
            assert entry is not None
            names = entry[0]
            ranges: list[tuple[int, int]] = []
            start = 0
            used = 0
            for k, name in enumerate(names):
                length = DIRENT_SIZE + len(name)
                if used + length > BLOCK_SIZE:
                    ranges.append((start, k))
                    start, used = k, 0
                used += length
            if used > _HALF_BLOCK:
                ranges.append((start, len(names)))
                start, used = len(names), 0
            dir_blocks[i] = ranges
            n_blocks[i] = len(ranges)
            size = BLOCK_SIZE * len(ranges) + used
            if start < len(names):
                dir_inline[i] = (start, len(names))
                inline = used
                layout = LAYOUT_FLAT_INLINE
        elif mode == _S_IFREG:
            size = node.size
            if size and node.content is None:
                layout = LAYOUT_CHUNK_BASED
                if node.digest is not None:
                    inline = 4
            elif size:
                content = node.content or b""
                if len(content) != size:
                    raise WriteError(
                        errno.EINVAL, f"inline content of {len(content)} bytes for size {size}"
                    )
                inline = size
                layout = LAYOUT_FLAT_INLINE
        elif mode == _S_IFLNK:
            if not node.payload:
                raise WriteError(errno.EINVAL, "symlink without a target")
            size = inline = len(node.payload)
            layout = LAYOUT_FLAT_INLINE
        else:
            size = 0
            if mode in (_S_IFCHR, _S_IFBLK):
                if node.rdev > _U32:
                    raise WriteError(errno.EOVERFLOW, f"device number {node.rdev} exceeds 32 bits")
                if node.rdev == 0 and mode == _S_IFCHR and links[i] > 1:
                    raise WriteError(errno.EINVAL, "a whiteout is hardlinked")
        if size > _U64:
            raise WriteError(errno.EFBIG, f"file size {size} exceeds 64 bits")
        sizes[i] = size
        layouts[i] = layout

        pos = (pos + INODE_SLOT_SIZE - 1) & ~(INODE_SLOT_SIZE - 1)
        if layout == LAYOUT_FLAT_INLINE:
            # Measured from the last metadata byte to one past the tail, so a
            # tail ending exactly on a boundary moves the inode too.
            inline_start = pos + _INODE_SIZE + xsz
            last_meta = inline_start - 1
            if last_meta // BLOCK_SIZE != (inline_start + size % BLOCK_SIZE) // BLOCK_SIZE:
                pos += BLOCK_SIZE - last_meta % BLOCK_SIZE
                pos = (pos + INODE_SLOT_SIZE - 1) & ~(INODE_SLOT_SIZE - 1)
            # Only the inline data must stay in one block (the inode may straddle).
            at = pos + _INODE_SIZE + xsz
            if inline and at // BLOCK_SIZE != (at + inline - 1) // BLOCK_SIZE:
                raise WriteError(errno.EFBIG, f"inline data of {inline} bytes cannot fit a block")
        positions[i] = pos
        pos += _INODE_SIZE + xsz + inline
    inodes_end = (pos + INODE_SLOT_SIZE - 1) & ~(INODE_SLOT_SIZE - 1)
    data_start = (inodes_end + shared_size + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)
    first_block = [0] * count
    block = data_start // BLOCK_SIZE
    for i in range(count):
        first_block[i] = block
        block += n_blocks[i]
    image_size = block * BLOCK_SIZE
    if block > _U32:
        raise WriteError(errno.EFBIG, "image exceeds 2^32 blocks")

    # -- emit --------------------------------------------------------------------------
    buf = bytearray(image_size)
    HEADER.pack_into(buf, 0, COMPOSEFS_MAGIC, COMPOSEFS_VERSION, 0, ErofsVersion.V2)
    nid_of = [p // INODE_SLOT_SIZE for p in positions]
    SUPERBLOCK.pack_into(
        buf,
        SUPERBLOCK_OFFSET,
        EROFS_MAGIC,
        0,
        _FEATURE_COMPAT,
        BLOCK_SIZE_BITS,
        0,
        nid_of[0] & 0xFFFF,
        count,
        0,
        0,
        block,
        0,
        0,
    )
    for x in shared:
        off = inodes_end + shared_rel[x]
        entry_bytes = _pack_entry(x)
        buf[off : off + len(entry_bytes)] = entry_bytes

    ftype_of = [DIRENT_FILE_TYPES[(n.mode & S_IFMT) >> 12] for n in nodes]
    packers: dict[int, struct.Struct] = {}

    def put_dirents(where: int, names: list[bytes], targets: list[int]) -> None:
        n = len(names)
        packer = packers.get(n)
        if packer is None:
            packer = packers[n] = struct.Struct("<" + DIRENT_FIELDS * n)
        fields: list[int] = []
        nameoff = DIRENT_SIZE * n
        for name, t in zip(names, targets, strict=True):
            fields += (nid_of[t], nameoff, ftype_of[t])
            nameoff += len(name)
        packer.pack_into(buf, where, *fields)
        joined = b"".join(names)
        where += DIRENT_SIZE * n
        buf[where : where + len(joined)] = joined

    for i in range(count):
        node = nodes[i]
        mode = node.mode & S_IFMT
        off = positions[i]
        layout = layouts[i]
        size = sizes[i]
        i_u = 0
        if mode == _S_IFDIR:
            if n_blocks[i]:
                i_u = first_block[i]
        elif layout == LAYOUT_CHUNK_BASED:
            i_u = V2_CHUNK_FORMAT
        elif mode == _S_IFCHR or mode == _S_IFBLK:
            i_u = node.rdev
        xsz = xsizes[i]
        icount = (xsz - 12) // 4 + 1 if xsz else 0
        EXTENDED_INODE.pack_into(
            buf,
            off,
            layout << 1 | 1,
            icount,
            node.mode & 0xFFFF,
            0,
            size,
            i_u,
            nid_of[i] & _U32,
            node.uid & _U32,
            node.gid & _U32,
            node.mtime_sec & _U64,
            0,
            links[i],
        )
        off += _INODE_SIZE
        if xsz:
            name_filter, refs, local = xareas[i]
            XATTR_IBODY_HEADER.pack_into(buf, off, name_filter, len(refs))
            p = off + 12
            for rel in refs:
                XATTR_SHARED_REF.pack_into(buf, p, (inodes_end + rel) // 4)
                p += 4
            buf[p : p + len(local)] = local
            off += xsz
        if mode == _S_IFDIR:
            entry = dirs[i]
            assert entry is not None
            names, targets = entry
            for b, (a, z) in enumerate(dir_blocks[i]):
                put_dirents((first_block[i] + b) * BLOCK_SIZE, names[a:z], targets[a:z])
            span = dir_inline.get(i)
            if span is not None:
                put_dirents(off, names[span[0] : span[1]], targets[span[0] : span[1]])
        elif mode == _S_IFLNK:
            target = node.payload or b""
            buf[off : off + len(target)] = target
        elif layout == LAYOUT_FLAT_INLINE:
            content = node.content or b""
            buf[off : off + len(content)] = content
        elif layout == LAYOUT_CHUNK_BASED and node.digest is not None:
            buf[off : off + 4] = _EXTERNAL_TAIL
    return bytes(buf)
