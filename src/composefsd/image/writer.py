"""EROFS image writer, byte-identical to C libcomposefs 1.0.8 (``lcfs_write_to``).

The reference notes (composefs-image-format.md, sections 3 to 6 and 13) are the
spec. The input tree is never modified: where C deep-clones the tree and
rewrites the clone, this module computes each inode's final mode, size and
xattrs on the side.

Shape, chosen for speed (a 137,000-inode tree must take well under a second):

1. breadth-first pass: the inode list, sorted directory entries, directory
   nlink, overlay xattrs (a plain external file's are derived later, not
   stored), min mtime;
2. shared xattr table;
3. layout pass: sizes, compact/extended, padding, nids; inodes that need
   nothing computed later are written at once into one growing buffer (a
   seek leaves zeros), the others get a zero placeholder;
4. emit pass: ``pack_into`` the placeholders, directory blocks and the
   superblock; the buffer becomes the image without a copy.

Errors are raised in the order C reports them (see :func:`_c_order_error`).
"""

from __future__ import annotations

import array
import errno
import io
import os
import struct
from collections import Counter
from itertools import compress, repeat
from operator import attrgetter, is_

from .format import (
    BLOCK_SIZE,
    BLOCK_SIZE_BITS,
    COMPACT_INODE,
    COMPOSEFS_MAGIC,
    COMPOSEFS_VERSION,
    DIRENT_FIELDS,
    DIRENT_FILE_TYPES,
    EROFS_MAGIC,
    EXTENDED_INODE,
    FEATURE_COMPAT_MTIME,
    FEATURE_COMPAT_XATTR_FILTER,
    HEADER,
    HEADER_FLAG_HAS_ACL,
    INODE_SLOT_SIZE,
    INODES_START,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    METACOPY_ALGORITHMS,
    SUPERBLOCK,
    SUPERBLOCK_OFFSET,
    XATTR_AREA_MAX,
    XATTR_ENTRY,
    XATTR_FILTER_SEED,
    XATTR_IBODY_HEADER,
    XATTR_PREFIXES,
    XATTR_SHARED_REF,
    metacopy_value,
)
from .tree import VALID_FILE_TYPES, Node, TreeError, gc_paused
from .xxhash import xxh32

__all__ = ["VERSION_MAX", "WriteError", "write_image"]

VERSION_MAX = 1

_S_IFMT = 0o170000
_S_IFLNK = 0o120000
_S_IFREG = 0o100000
_S_IFBLK = 0o060000
_S_IFDIR = 0o040000
_S_IFCHR = 0o020000
_FILE_TYPE = DIRENT_FILE_TYPES

_HALF_BLOCK = BLOCK_SIZE // 2
_ONE_CHUNK_MAX = 1 << 43  # the largest chunk (chunkbits 43) covers files up to this
_MAX_CHUNKS = 1024
_MAX_SHARED_REFS = 128
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

_FEATURE_COMPAT = FEATURE_COMPAT_MTIME | FEATURE_COMPAT_XATTR_FILTER
_FILTER_SEED = XATTR_FILTER_SEED

_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")  # zeros to the next multiple of 4

_OVERLAY_PREFIX = b"trusted.overlay."
_OVERLAY_ESCAPED_PREFIX = b"trusted.overlay.overlay."
_METACOPY = b"trusted.overlay.metacopy"
_REDIRECT = b"trusted.overlay.redirect"
_OPAQUE = b"trusted.overlay.opaque"
_ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
_ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
_ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
_USER_WHITEOUT = b"user.overlay.whiteout"
_USER_WHITEOUTS = b"user.overlay.whiteouts"
_USER_OPAQUE = b"user.overlay.opaque"
_SELINUX = b"security.selinux"
_ACL_KEYS = (b"system.posix_acl_access", b"system.posix_acl_default")

# (prefix, index) in the order C tries them: all but the whole name and lustre's.
_XATTR_PREFIXES = tuple(
    (prefix, index)
    for index, prefix in enumerate(XATTR_PREFIXES)
    if prefix not in (b"", b"lustre.")
)
#: metacopy_value()'s fixed head for a sha256 digest (the common case, inlined).
_METACOPY_SHA256 = metacopy_value(bytes(32))[:4]
_ROOT_WHITEOUT_NAMES = tuple(b"%02x" % i for i in range(256))

Xattrs = list[tuple[bytes, bytes]]

_DIGEST = attrgetter("digest")
_PAYLOAD = attrgetter("payload")


class WriteError(OSError):
    """The tree cannot be written; ``errno`` and ``str()`` are what C's write reports."""

    def __init__(self, err: int, detail: str = "") -> None:
        super().__init__(err, os.strerror(err))
        self.detail = detail

    def __str__(self) -> str:
        return self.strerror or ""


# -- per-node rules shared by the fast passes and the C-order error search ------


def _chunking(size: int) -> tuple[int, int]:
    """(chunkbits, chunk count) for an external file, as ``erofs_compute_chunking``."""
    bits = (size - 1).bit_length()
    if bits < 12:
        bits = 12
    elif bits > 43:
        bits = 43
    # C's DIV_ROUND_UP wraps at 2**64: sizes within 2**43 of the top need 0 chunks.
    return bits, ((size + (1 << bits) - 1) & _U64) >> bits


def _validate(node: Node) -> None:
    """C ``lcfs_node_validate`` for a non-hardlink node."""
    ftype = node.mode & _S_IFMT
    if ftype not in VALID_FILE_TYPES:
        raise WriteError(errno.EINVAL, f"invalid file type in mode {node.mode:o}")
    if (
        ftype == _S_IFREG
        and node.content is None
        and node.size > 0
        and _chunking(node.size)[1] > _MAX_CHUNKS
    ):
        raise WriteError(errno.EFBIG, f"file of {node.size} bytes needs too many chunks")


def _rewrite_xattrs(
    node: Node, external: bool, whiteout: bool, whiteout_children: int, is_root: bool, version: int
) -> Xattrs:
    """The node's xattrs after C's overlay rewrite, unsorted.

    Uses a scratch node so that the 32767-byte estimate (which C's clone resets
    to 0) fails with ERANGE on exactly the inputs where C fails.
    """
    src = node.xattrs
    if not (src or external or whiteout or whiteout_children or is_root):
        return []
    scratch = Node(0)
    scratch.xattrs = [
        (_OVERLAY_ESCAPED_PREFIX + k[16:], v) if k.startswith(_OVERLAY_PREFIX) else (k, v)
        for k, v in src
    ]
    sets: list[tuple[bytes, bytes]] = []
    if external:
        digest = node.digest
        sets.append((_METACOPY, metacopy_value(digest) if digest is not None else b""))
        if node.payload:
            sets.append((_REDIRECT, b"/" + node.payload))
    if whiteout:
        sets += ((_ESCAPED_WHITEOUT, b""), (_USER_WHITEOUT, b""))
    for _ in range(whiteout_children):
        sets += ((_ESCAPED_WHITEOUTS, b""), (_USER_WHITEOUTS, b""))
        if version >= 1:
            sets += ((_ESCAPED_OPAQUE, b"x"), (_USER_OPAQUE, b"x"))
    if is_root:
        sets.append((_OPAQUE, b"y"))
    try:
        for k, v in sets:
            scratch.set_xattr(k, v)
    except TreeError as e:
        raise WriteError(e.errno or errno.ERANGE, f"xattr {k!r}: {e.strerror}") from None
    scratch.xattrs.sort()
    return scratch.xattrs


def _is_external(node: Node) -> bool:
    return node.mode & _S_IFMT == _S_IFREG and node.size > 0 and node.content is None


def _is_whiteout(node: Node) -> bool:
    return node.mode & _S_IFMT == _S_IFCHR and node.rdev == 0


def _follow(node: Node) -> Node:
    """C ``follow_links``; ELOOP for a chain that loops."""
    seen: set[int] | None = None
    while node.link_to is not None:
        node = node.link_to
        if seen is None:
            seen = set()
        if id(node) in seen:
            raise WriteError(errno.ELOOP, "hardlink cycle")
        seen.add(id(node))
    return node


def _c_order_error(root: Node, version: int, fallback: WriteError) -> WriteError:
    """Find the error C reports first: its rewrite walks depth-first, pre-order.

    Only called once some error is known, so it may be slow.
    """
    marks: dict[int, int] = {}  # whiteout children processed so far, per parent
    stack: list[tuple[Node, Node]] = [(root, root)]
    try:
        while stack:
            node, parent = stack.pop()
            _validate(node)
            whiteout = _is_whiteout(node)
            _rewrite_xattrs(node, _is_external(node), whiteout, 0, False, version)
            if whiteout:
                count = marks[id(parent)] = marks.get(id(parent), 0) + 1
                _rewrite_xattrs(parent, False, False, count, False, version)
            if node.mode & _S_IFMT == _S_IFDIR and node.children:
                children = node.children
                for name in sorted(children, reverse=True):
                    if children[name].link_to is None:
                        stack.append((children[name], node))
        _rewrite_xattrs(root, False, False, marks.get(id(root), 0), True, version)
    except WriteError as e:
        return e
    return fallback


# -- the writer -----------------------------------------------------------------


class _Plan:
    """Everything the layout and emit passes need, as parallel per-inode lists."""

    __slots__ = (
        "dir_names",
        "dir_targets",
        "min_mtime",
        "modes",
        "nlinks",
        "nodes",
        "sizes",
        "version",
        "xattrs",
    )

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.modes: list[int] = []
        self.sizes: list[int] = []
        self.nlinks: list[int] = []
        # None: an external file without xattrs of its own, whose metacopy and
        # redirect are derived from the node (laid out in _emit).
        self.xattrs: list[Xattrs | None] = []
        # Per directory inode (None otherwise): entry names and target inode indexes.
        self.dir_names: list[list[bytes] | None] = []
        self.dir_targets: list[list[int] | None] = []
        self.min_mtime = (0, 0)
        #: The format version to write: the one asked for, or 1 if upgraded.
        self.version = 0


def _plan(root: Node, version: int, upgrade: bool = False) -> _Plan:
    """Breadth-first linearisation plus C's overlay rewrite (C ``rewrite_tree_for_erofs``).

    With ``upgrade``, version 1 is used if the tree holds a whiteout (C bumps
    the version when it sees one); until the loop below ends the version
    only matters for whiteout directories' marks, which are added after it,
    so the walk that finds whiteouts is this one.
    """
    if root.mode & _S_IFMT != _S_IFDIR or root.children is None:
        # C fails adding the root whiteouts to a non-directory.
        raise WriteError(errno.ENOTDIR, "root is not a directory")
    plan = _Plan()
    nodes = plan.nodes
    modes = plan.modes
    sizes = plan.sizes
    nlinks = plan.nlinks
    all_xattrs = plan.xattrs
    dir_names = plan.dir_names
    dir_targets = plan.dir_targets
    index_of: dict[Node, int] = {root: 0}  # Node hashes by identity
    parent_of: list[int] = [0]
    # (dir index, entry position, link node): resolved once every inode has an index.
    pending_links: list[tuple[int, int, Node]] = []
    whiteout_parents: dict[int, int] = {}
    min_sec, min_nsec = root.mtime_sec, root.mtime_nsec
    first_error: WriteError | None = None

    # The root's 00..ff overlay whiteouts are added after C's rewrite pass, so
    # they are neither escaped nor counted as whiteouts of the root.
    root_children = dict(root.children)
    synthetic: set[int] = set()
    selinux = root.get_xattr(_SELINUX)
    for name in _ROOT_WHITEOUT_NAMES:
        if name not in root_children:
            wo = _root_whiteout(root, selinux)
            root_children[name] = wo
            synthetic.add(id(wo))

    nodes.append(root)
    i = 0
    while i < len(nodes):
        node = nodes[i]
        mode = node.mode
        ftype = mode & _S_IFMT
        size = node.size
        if first_error is None and (
            ftype not in VALID_FILE_TYPES
            or (ftype == _S_IFREG and node.content is None and size > (1 << 53))
        ):
            try:
                _validate(node)
            except WriteError as e:
                first_error = e
        sec = node.mtime_sec
        if sec < min_sec or (sec == min_sec and node.mtime_nsec < min_nsec):
            min_sec, min_nsec = sec, node.mtime_nsec

        nlink = node.nlink
        names: list[bytes] | None = None
        targets: list[int] | None = None
        if ftype == _S_IFDIR:
            children = root_children if i == 0 else (node.children or {})
            if b"." in children or b".." in children:
                raise WriteError(errno.EINVAL, "a directory entry may not be named . or ..")
            names = [*children, b".", b".."]
            names.sort()
            targets = []
            nlink = 2
            whiteouts = 0
            for pos, name in enumerate(names):
                child = children.get(name)
                if child is None:  # the implicit "." and ".." links (C: mode-0 hardlinks)
                    targets.append(i if name == b"." else parent_of[i])
                    continue
                cmode = child.mode & _S_IFMT
                if cmode == _S_IFDIR:
                    nlink += 1
                if child.link_to is not None:
                    pending_links.append((i, pos, child))
                    targets.append(-1)
                    continue
                if cmode == _S_IFCHR and child.rdev == 0 and id(child) not in synthetic:
                    whiteouts += 1
                n = len(nodes)
                if index_of.setdefault(child, n) != n:
                    raise WriteError(errno.EINVAL, "the same node is in the tree twice")
                targets.append(n)
                nodes.append(child)
                parent_of.append(i)
            if whiteouts:
                whiteout_parents[i] = whiteouts
        elif node.children and first_error is None:
            first_error = WriteError(errno.EINVAL, "a non-directory has children")

        # Final mode, size and xattrs (C add_overlayfs_xattrs).
        xattrs: Xattrs | None = []
        if ftype == _S_IFCHR and node.rdev == 0 and id(node) not in synthetic:
            mode = _S_IFREG | (mode & ~_S_IFMT & _U32)
            size = 0
            try:
                xattrs = _rewrite_xattrs(node, False, True, 0, False, version)
            except WriteError as e:
                first_error = first_error or e
        elif ftype == _S_IFREG and size > 0 and node.content is None:
            if node.xattrs:
                try:
                    xattrs = _rewrite_xattrs(node, True, False, 0, False, version)
                except WriteError as e:
                    first_error = first_error or e
            else:
                # The usual external file: its two xattrs are derived from the
                # node when the inode is laid out, not stored per inode here.
                digest = node.digest
                if digest is not None and len(digest) not in METACOPY_ALGORITHMS:
                    metacopy_value(digest)  # refuses the digest now, where it always has
                xattrs = None
        else:
            if ftype == _S_IFLNK:
                if not node.payload:
                    raise WriteError(errno.EINVAL, "symlink without a target")
                size = len(node.payload)
            if node.xattrs and id(node) not in synthetic:
                try:
                    xattrs = _rewrite_xattrs(node, False, False, 0, False, version)
                except WriteError as e:
                    first_error = first_error or e
            elif node.xattrs:
                xattrs = sorted(node.xattrs)
        modes.append(mode)
        sizes.append(size)
        nlinks.append(nlink)
        all_xattrs.append(xattrs)
        dir_names.append(names)
        dir_targets.append(targets)
        i += 1

    if upgrade and (whiteout_parents or (first_error is not None and _has_whiteout(root))):
        # (The loop does not descend into a non-directory's children, which
        # is an error; C's whiteout search does, so it decides then.)
        version = 1
    plan.version = version

    # Directories holding whiteouts, and the root, get their marks now that
    # every child is known.
    for idx, count in whiteout_parents.items():
        if idx != 0:
            try:
                all_xattrs[idx] = _rewrite_xattrs(nodes[idx], False, False, count, False, version)
            except WriteError as e:
                first_error = first_error or e
    try:
        all_xattrs[0] = _rewrite_xattrs(
            root, False, False, whiteout_parents.get(0, 0), True, version
        )
    except WriteError as e:
        first_error = first_error or e

    if first_error is not None:
        raise _c_order_error(root, version, first_error)

    for idx, pos, link in pending_links:
        t = index_of.get(_follow(link))
        if t is None:
            raise WriteError(errno.EINVAL, "hardlink to a node outside the tree")
        link_targets = dir_targets[idx]
        assert link_targets is not None
        link_targets[pos] = t

    plan.min_mtime = (min_sec, min_nsec)
    return plan


def _root_whiteout(root: Node, selinux: bytes | None) -> Node:
    node = Node(
        _S_IFCHR | 0o644,
        1,
        root.uid,
        root.gid,
        0,
        0,
        root.mtime_sec,
        root.mtime_nsec,
    )
    if selinux is not None:
        node.xattrs = [(_SELINUX, selinux)]
    return node


def _has_whiteout(root: Node) -> bool:
    stack = [root]
    while stack:
        node = stack.pop()
        if node.mode & _S_IFMT == _S_IFCHR and node.rdev == 0:
            return True
        if node.children:
            stack.extend(c for c in node.children.values() if c.link_to is None)
    return False


def write_image(root: Node, *, min_version: int = 0, max_version: int = VERSION_MAX) -> bytes:
    """Serialise ``root`` as a composefs EROFS image; raises :class:`WriteError`."""
    if not 0 <= min_version <= VERSION_MAX or not 0 <= max_version <= VERSION_MAX:
        raise WriteError(errno.EINVAL, f"format version must be 0..{VERSION_MAX}")
    max_version = max(max_version, min_version)
    version = min_version
    with gc_paused():
        plan = _plan(root, version, upgrade=version < 1 <= max_version)
        return _emit(plan, plan.version)


def _ext_shape(
    ext_head: bytes, ext_mid: bytes, redirect_info: tuple[int, bytes, int], payload_len: int
) -> tuple[int, struct.Struct, struct.Struct, bytes, bytes, bytes, bytes]:
    """The fast path's packers and constant parts for an external file whose
    payload has ``payload_len`` bytes (see ``ext_shapes`` in :func:`_emit`)."""
    rhead = _entry_head(redirect_info, payload_len + 1)
    mid = ext_mid + rhead + b"/"
    after = _PADS[(len(rhead) + payload_len + 1) & 3] + b"\xff" * 4
    xsz = len(ext_head) + 32 + len(mid) + payload_len + len(after) - 4
    if xsz > XATTR_AREA_MAX:
        raise WriteError(errno.EINVAL, "xattrs too large for one inode")
    parts = f"{len(ext_head)}s32s{len(mid)}s{payload_len}s{len(after)}s"
    icount = (xsz - 12) // 4 + 1
    # COMPACT_INODE and EXTENDED_INODE with the reserved fields as pad bytes and
    # i_format and i_xattr_icount as one string.
    compact = struct.Struct("<4sHHI4xIIHH4x" + parts)
    extended = struct.Struct("<4sH2xQIIIIQII16x" + parts)
    assert compact.size == COMPACT_INODE.size + xsz + 4
    assert extended.size == EXTENDED_INODE.size + xsz + 4
    return (
        xsz,
        compact,
        extended,
        struct.pack("<HH", LAYOUT_CHUNK_BASED << 1, icount),
        struct.pack("<HH", LAYOUT_CHUNK_BASED << 1 | 1, icount),
        mid,
        after,
    )


def _entry_head(info: tuple[int, bytes, int], value_size: int) -> bytes:
    index, suffix, _ = info
    return XATTR_ENTRY.pack(len(suffix), index, value_size) + suffix


def _key_info(key: bytes) -> tuple[int, bytes, int]:
    """(EROFS name index, stored suffix, name-filter bit) of an xattr key."""
    index, suffix = 0, key
    for prefix, prefix_index in _XATTR_PREFIXES:
        if key.startswith(prefix):
            index, suffix = prefix_index, key[len(prefix) :]
            break
    return index, suffix, xxh32(suffix, _FILTER_SEED + index) & 31


def _entry(info: tuple[int, bytes, int], value: bytes) -> bytes:
    index, suffix, _ = info
    raw = XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + b"\0" * (-len(raw) & 3)


def _emit(plan: _Plan, version: int) -> bytes:
    nodes = plan.nodes
    modes = plan.modes
    sizes = plan.sizes
    nlinks = plan.nlinks
    all_xattrs = plan.xattrs
    dir_names = plan.dir_names
    dir_targets = plan.dir_targets
    count = len(nodes)
    min_sec, min_nsec = plan.min_mtime

    # -- shared xattrs (C compute_erofs_shared_xattrs) ---------------------------
    keyinfo: dict[bytes, tuple[int, bytes, int]] = {}
    uses: dict[tuple[bytes, bytes], int] = {}
    # Derived external-file xattrs are counted by digest and payload, without
    # building a pair for each; only the ones that may be shared become pairs.
    # Counted by C loops (Counter over attribute getters): a Python loop over
    # every inode cost 0.13 s on the /usr tree.
    ext_nodes = list(compress(nodes, map(is_, all_xattrs, repeat(None))))
    meta_uses: Counter[bytes | None] = Counter(map(_DIGEST, ext_nodes))
    redirect_uses: Counter[bytes] = Counter(filter(None, map(_PAYLOAD, ext_nodes)))
    del ext_nodes
    for pairs in filter(None, all_xattrs):
        for kv in pairs:
            uses[kv] = uses.get(kv, 0) + 1
            if kv[0] not in keyinfo:
                keyinfo[kv[0]] = _key_info(kv[0])
    if meta_uses:
        keyinfo.setdefault(_METACOPY, _key_info(_METACOPY))
        known = {v for k, v in uses if k == _METACOPY}
        # A metacopy value is a 4-byte head (fixed by the digest's length) and
        # the digest: only a digest found here can give a known value.
        known_digests = {v[4:] for v in known}
        meta_items = meta_uses.items() if known else [x for x in meta_uses.items() if x[1] > 1]
        for some_digest, n in meta_items:
            if n > 1 or (some_digest if some_digest is not None else b"") in known_digests:
                value = metacopy_value(some_digest) if some_digest is not None else b""
                if n > 1 or value in known:
                    kv = (_METACOPY, value)
                    uses[kv] = uses.get(kv, 0) + n
    if redirect_uses:
        keyinfo.setdefault(_REDIRECT, _key_info(_REDIRECT))
        known = {v for k, v in uses if k == _REDIRECT}
        redirect_items = (
            redirect_uses.items() if known else [x for x in redirect_uses.items() if x[1] > 1]
        )
        for some_payload, n in redirect_items:
            if n > 1 or known:
                value = b"/" + some_payload
                if n > 1 or value in known:
                    kv = (_REDIRECT, value)
                    uses[kv] = uses.get(kv, 0) + n
    del meta_uses, redirect_uses
    has_acl = any(k in keyinfo for k in _ACL_KEYS)
    shared = [kv for kv, n in uses.items() if n > 1]
    # C's canonical order is descending: key, then value length, then value.
    shared.sort(key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)
    shared_offset: dict[tuple[bytes, bytes], int] = {}
    shared_entries: list[bytes] = []
    offset = 0
    for kv in shared:
        shared_offset[kv] = offset
        entry = _entry(keyinfo[kv[0]], kv[1])
        shared_entries.append(entry)
        offset += len(entry)
    shared_size = offset

    # -- layout (C compute_erofs_inodes) ------------------------------------------
    # Most inodes (no data blocks, no shared-xattr references, not directories)
    # depend on nothing computed later, so their bytes are produced and written
    # at once. The rest get a zero placeholder and are packed into
    # the final buffer once the nids and block addresses are known.
    # The image is written straight into one growing buffer: a gap left by a
    # seek reads as zeros, and getvalue() hands the buffer over without a copy,
    # so the image exists once in memory, never as pieces plus a join plus a copy.
    out = io.BytesIO()
    write = out.write
    seek = out.seek
    seek(INODES_START)  # header and superblock: packed last, into the zeros
    # i, pos, inode size, xattr size, tail, data blocks, first block (relative)
    deferred: list[tuple[int, int, int, int, int, int, int]] = []
    # Each inode's nid (its position in 32-byte slots), unboxed: a list would
    # hold an int object per inode for the whole emit.
    nid_of = array.array("Q", bytes(8 * count))
    # Per deferred inode with xattrs: (name filter, pairs referenced in the
    # shared table, the encoded inline entries).
    xsplit: dict[int, tuple[int, Xattrs, bytes]] = {}
    filter_cache: dict[tuple[bytes, ...], int] = {}
    entry_heads: dict[tuple[bytes, int], bytes] = {}
    ff_tails: dict[int, bytes] = {}
    # Per directory: start index of each dirent chunk (the last one may be the tail).
    chunk_starts: dict[int, list[int]] = {}
    chunkbits_of: dict[int, int] = {}
    n_data_blocks = 0
    shared_meta = {v for k, v in shared if k == _METACOPY}
    shared_redirect = {v for k, v in shared if k == _REDIRECT}
    meta_heads: dict[int, tuple[bytes, bytes]] = {}
    redirect_heads: dict[int, bytes] = {}
    ext_filters = (0, 0)
    if _METACOPY in keyinfo:
        meta_bit = 1 << keyinfo[_METACOPY][2]
        redirect_bit = 1 << _key_info(_REDIRECT)[2]
        ext_filters = (~meta_bit & _U32, ~(meta_bit | redirect_bit) & _U32)
    # The plain external file with a sha256 digest and a payload, neither of
    # them shared (nearly every inode of a real tree), takes a path of its own:
    # its whole inode (header, xattr area, one chunk index) is one struct pack.
    # Its parts after the header depend only on the payload's length.
    shared_digests = {v[4:] for v in shared_meta if len(v) == 36 and v[:4] == _METACOPY_SHA256}
    shared_payloads = {v[1:] for v in shared_redirect if v[:1] == b"/"}
    # payload length -> (xattr area size, compact packer, extended packer, the
    # header's first two fields for each, the bytes between the digest and the
    # payload, the bytes after the payload). The reserved header fields are
    # pad bytes of the packers, and the first two fields one prepacked string:
    # fewer arguments per pack.
    ext_shapes: dict[int, tuple[int, struct.Struct, struct.Struct, bytes, bytes, bytes, bytes]] = {}
    ext_head = b""
    if _METACOPY in keyinfo:
        meta_head = _entry_head(keyinfo[_METACOPY], len(_METACOPY_SHA256) + 32)
        ext_head = XATTR_IBODY_HEADER.pack(ext_filters[1], 0) + meta_head + _METACOPY_SHA256
        ext_mid = _PADS[(len(meta_head) + len(_METACOPY_SHA256) + 32) & 3]
        redirect_info = _key_info(_REDIRECT)
    u32 = _U32
    u64 = _U64
    end = pos = INODES_START
    for i in range(count):
        node = nodes[i]
        if all_xattrs[i] is None:
            digest = node.digest
            payload = node.payload
            size = sizes[i]
            if (
                digest is not None
                and len(digest) == 32
                and payload
                and size <= u32
                and digest not in shared_digests
                and payload not in shared_payloads
            ):
                shape = ext_shapes.get(len(payload))
                if shape is None:
                    shape = ext_shapes[len(payload)] = _ext_shape(
                        ext_head, ext_mid, redirect_info, len(payload)
                    )
                xsz, compact_packer, extended_packer, compact_lead, extended_lead, mid, after = (
                    shape
                )
                chunkbits = (size - 1).bit_length() - 12
                if chunkbits < 0:
                    chunkbits = 0
                nlink = nlinks[i]
                uid = node.uid
                gid = node.gid
                sec = node.mtime_sec
                # The inline tail (4 bytes) always fits the block: every
                # position and size here is a multiple of 4.
                pos = (pos + 31) & ~31
                nid_of[i] = pos >> 5
                if pos > end:
                    seek(pos)
                if (
                    sec == min_sec
                    and node.mtime_nsec == min_nsec
                    and nlink <= 0xFFFF
                    and uid <= 0xFFFF
                    and gid <= 0xFFFF
                ):
                    write(
                        compact_packer.pack(
                            compact_lead,
                            modes[i] & 0xFFFF,
                            nlink,
                            size,
                            chunkbits,
                            i,
                            uid,
                            gid,
                            ext_head,
                            digest,
                            mid,
                            payload,
                            after,
                        )
                    )
                    pos += 36 + xsz
                else:
                    write(
                        extended_packer.pack(
                            extended_lead,
                            modes[i] & 0xFFFF,
                            size,
                            chunkbits,
                            i,
                            uid & u32,
                            gid & u32,
                            sec & u64,
                            node.mtime_nsec & u32,
                            nlink & u32,
                            ext_head,
                            digest,
                            mid,
                            payload,
                            after,
                        )
                    )
                    pos += 68 + xsz
                end = pos
                continue
        mode = modes[i]
        ftype = mode & _S_IFMT
        size = sizes[i]
        n_blocks = 0
        tail = 0
        chunkbits = 0
        if ftype == _S_IFDIR:
            names = dir_names[i]
            assert names is not None
            starts = [0]
            block = 12 * len(names) + sum(map(len, names))
            if block > BLOCK_SIZE:  # most directories fit one block
                block = 0
                for idx, name in enumerate(names):
                    length = 12 + len(name)
                    if block + length > BLOCK_SIZE:
                        starts.append(idx)
                        block = 0
                    block += length
            n_blocks = len(starts) - 1
            if block > _HALF_BLOCK:
                n_blocks += 1
            else:
                tail = block
            chunk_starts[i] = starts
            dsize = n_blocks * BLOCK_SIZE + tail
        else:
            dsize = size
            if ftype == _S_IFLNK:
                tail = size
            elif ftype == _S_IFREG and size > 0:
                if node.content is not None:
                    n_blocks, tail = divmod(size, BLOCK_SIZE)
                    if tail > _HALF_BLOCK:
                        n_blocks += 1
                        tail = 0
                elif size <= _ONE_CHUNK_MAX:
                    # _chunking inlined: up to 2**43 bytes one chunk, of the size
                    # rounded up to a power of two (at least a block), covers it.
                    chunkbits = (size - 1).bit_length()
                    if chunkbits < 12:
                        chunkbits = 12
                    tail = 4
                else:
                    chunkbits, chunks = _chunking(size)
                    tail = 4 * chunks
        compact = (
            node.mtime_sec == min_sec
            and node.mtime_nsec == min_nsec
            and nlinks[i] <= 0xFFFF
            and node.uid <= 0xFFFF
            and node.gid <= 0xFFFF
            and dsize <= _U32
        )
        isz = 32 if compact else 64
        xs = all_xattrs[i]
        xsz = 0
        refs: Xattrs = []
        xarea = b""
        name_filter = 0
        if xs is None:
            # A plain external file (most inodes): its metacopy and redirect
            # encoded directly, unless the shared table holds either of them.
            digest = node.digest
            if digest is None:
                meta_value = b""
            elif len(digest) == 32:
                meta_value = _METACOPY_SHA256 + digest
            else:
                meta_value = metacopy_value(digest)
            payload = node.payload
            redirect = b"/" + payload if payload else None
            if meta_value in shared_meta or (redirect is not None and redirect in shared_redirect):
                xs = [(_METACOPY, meta_value)]
                if redirect is not None:
                    xs.append((_REDIRECT, redirect))
            else:
                # Entry heads depend on the value's length (36 for sha256, 0
                # for a file without a digest, ...), so they are kept per length.
                meta = meta_heads.get(len(meta_value))
                if meta is None:
                    meta_head = _entry_head(keyinfo[_METACOPY], len(meta_value))
                    meta = meta_heads[len(meta_value)] = (
                        meta_head,
                        _PADS[(len(meta_head) + len(meta_value)) & 3],
                    )
                meta_head, meta_pad = meta
                if redirect is None:
                    xarea = meta_head + meta_value + meta_pad
                    name_filter = ext_filters[0]
                else:
                    rhead = redirect_heads.get(len(redirect))
                    if rhead is None:
                        rhead = redirect_heads[len(redirect)] = _entry_head(
                            keyinfo[_REDIRECT], len(redirect)
                        )
                    xarea = b"".join(
                        (
                            meta_head,
                            meta_value,
                            meta_pad,
                            rhead,
                            redirect,
                            _PADS[(len(rhead) + len(redirect)) & 3],
                        )
                    )
                    name_filter = ext_filters[1]
                xsz = 12 + len(xarea)
                if xsz > XATTR_AREA_MAX:
                    raise WriteError(errno.EINVAL, "xattrs too large for one inode")
        if xs:
            parts: list[bytes] = []
            keys = []
            for kv in xs:
                k, v = kv
                keys.append(k)
                if len(refs) < _MAX_SHARED_REFS and kv in shared_offset:
                    refs.append(kv)
                    continue
                head = entry_heads.get((k, len(v)))
                if head is None:
                    index, suffix, _ = keyinfo[k]
                    head = XATTR_ENTRY.pack(len(suffix), index, len(v)) + suffix
                    entry_heads[(k, len(v))] = head
                parts.append(head)
                parts.append(v)
                parts.append(_PADS[(len(head) + len(v)) & 3])
            filter_key = tuple(keys)
            cached_filter = filter_cache.get(filter_key)
            if cached_filter is None:
                bits = 0
                for k in keys:
                    bits |= 1 << keyinfo[k][2]
                cached_filter = filter_cache[filter_key] = ~bits & _U32
            name_filter = cached_filter
            xarea = b"".join(parts)
            xsz = 12 + 4 * len(refs) + len(xarea)
            if xsz > XATTR_AREA_MAX:
                raise WriteError(errno.EINVAL, "xattrs too large for one inode")
        pos = (pos + 31) & ~31
        if ftype == _S_IFLNK:
            total = isz + xsz + tail
            if total >= BLOCK_SIZE:
                n_blocks += 1
                tail = 0
            if pos // BLOCK_SIZE != (pos + total - 1) // BLOCK_SIZE:
                pos = (pos + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)
        elif tail:
            rem = BLOCK_SIZE - ((pos + isz + xsz) % BLOCK_SIZE)
            if rem < tail:
                pad = (rem + 31) & ~31
                if tail <= BLOCK_SIZE - ((pos + isz + xsz + pad) % BLOCK_SIZE):
                    pos += pad
                else:
                    n_blocks += 1
                    tail = 0
                    pos = (pos + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)
        nid_of[i] = pos // INODE_SLOT_SIZE
        if pos > end:
            seek(pos)
        end = pos + isz + xsz + tail
        if n_blocks or refs or ftype == _S_IFDIR:
            seek(end)
            deferred.append((i, pos, isz, xsz, tail, n_blocks, n_data_blocks))
            if chunkbits:
                chunkbits_of[i] = chunkbits
            if xsz:
                xsplit[i] = (name_filter, refs, xarea)
            n_data_blocks += n_blocks
            pos = end
            continue
        pos = end

        # A self-contained inode: header, xattrs and inline tail, now.
        layout = LAYOUT_FLAT_INLINE if tail else LAYOUT_FLAT_PLAIN
        i_u = 0
        tail_bytes = b""
        if ftype == _S_IFREG:
            content = node.content
            if not size:
                pass  # empty, or a whiteout whose input content C drops with its size
            elif content is not None:
                tail_bytes = content
            else:
                layout = LAYOUT_CHUNK_BASED
                i_u = chunkbits - 12
                tail_bytes = ff_tails.get(tail) or ff_tails.setdefault(tail, b"\xff" * tail)
        elif ftype == _S_IFLNK:
            tail_bytes = node.payload or b""
        elif ftype == _S_IFCHR or ftype == _S_IFBLK:
            i_u = node.rdev & _U32
            size = 0
        else:
            size = 0
        if compact:  # _inode_header, inlined
            head = COMPACT_INODE.pack(
                layout << 1,
                (xsz - 12) // 4 + 1 if xsz else 0,
                mode & 0xFFFF,
                nlinks[i],
                size,
                0,
                i_u,
                i,
                node.uid,
                node.gid,
                0,
            )
        else:
            head = EXTENDED_INODE.pack(
                layout << 1 | 1,
                (xsz - 12) // 4 + 1 if xsz else 0,
                mode & 0xFFFF,
                0,
                size,
                i_u,
                i,
                node.uid & _U32,
                node.gid & _U32,
                node.mtime_sec & _U64,
                node.mtime_nsec & _U32,
                nlinks[i] & _U32,
            )
        if xsz:
            write(head)
            write(XATTR_IBODY_HEADER.pack(name_filter, 0))
            write(xarea)
            if tail_bytes:
                write(tail_bytes)
        else:
            write(head)
            if tail_bytes:
                write(tail_bytes)
    inodes_end = (pos + 31) & ~31
    data_start = (inodes_end + shared_size + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)
    image_size = data_start + n_data_blocks * BLOCK_SIZE
    if nid_of[0] >= 0xFFFF:
        raise WriteError(errno.EFBIG, "root inode beyond the 16-bit nid range")

    # -- emit -----------------------------------------------------------------------
    shared_table = b"".join(shared_entries)
    seek(inodes_end)
    write(shared_table)
    if out.tell() < image_size:
        seek(image_size - 1)
        write(b"\0")
    buf = out.getbuffer()
    HEADER.pack_into(
        buf,
        0,
        COMPOSEFS_MAGIC,
        COMPOSEFS_VERSION,
        HEADER_FLAG_HAS_ACL if has_acl else 0,
        version,
    )
    SUPERBLOCK.pack_into(
        buf,
        SUPERBLOCK_OFFSET,
        EROFS_MAGIC,
        0,
        _FEATURE_COMPAT,
        BLOCK_SIZE_BITS,
        0,
        nid_of[0],
        count,
        min_sec & _U64,
        min_nsec,
        image_size // BLOCK_SIZE,
        0,
        inodes_end // BLOCK_SIZE,
    )

    shared_base = inodes_end % BLOCK_SIZE
    ftype_of = [_FILE_TYPE[(m & _S_IFMT) >> 12] for m in modes]
    dirent_packers: dict[int, struct.Struct] = {}
    first_block = data_start // BLOCK_SIZE
    for i, off, isz, xsz, tail, n_blocks, rel_block in deferred:
        node = nodes[i]
        mode = modes[i]
        ftype = mode & _S_IFMT
        layout = LAYOUT_FLAT_INLINE if tail else LAYOUT_FLAT_PLAIN
        size = n_blocks * BLOCK_SIZE + tail if ftype == _S_IFDIR else sizes[i]
        blkaddr = first_block + rel_block if n_blocks else 0
        i_u = blkaddr
        if ftype == _S_IFREG and size > 0 and node.content is None:
            layout = LAYOUT_CHUNK_BASED
            # The chunk format shares i_u with raw_blkaddr (C union quirk).
            i_u = (blkaddr & 0xFFFF0000) | (chunkbits_of[i] - 12)
        elif ftype == _S_IFCHR or ftype == _S_IFBLK:
            i_u = node.rdev & _U32
            size = 0
        elif ftype != _S_IFREG and ftype != _S_IFLNK and ftype != _S_IFDIR:
            size = 0
        icount = (xsz - 12) // 4 + 1 if xsz else 0
        if isz == 32:
            COMPACT_INODE.pack_into(
                buf,
                off,
                layout << 1,
                icount,
                mode & 0xFFFF,
                nlinks[i],
                size,
                0,
                i_u,
                i,
                node.uid,
                node.gid,
                0,
            )
        else:
            EXTENDED_INODE.pack_into(
                buf,
                off,
                layout << 1 | 1,
                icount,
                mode & 0xFFFF,
                0,
                size,
                i_u,
                i,
                node.uid & _U32,
                node.gid & _U32,
                node.mtime_sec & _U64,
                node.mtime_nsec & _U32,
                nlinks[i] & _U32,
            )
        off += isz
        split = xsplit.get(i)
        if split is not None:
            name_filter, refs, inline = split
            XATTR_IBODY_HEADER.pack_into(buf, off, name_filter, len(refs))
            ref_off = off + 12
            for kv in refs:
                XATTR_SHARED_REF.pack_into(buf, ref_off, (shared_base + shared_offset[kv]) // 4)
                ref_off += 4
            buf[ref_off : ref_off + len(inline)] = inline
            off += xsz
        if ftype == _S_IFDIR:
            names = dir_names[i]
            dtargets = dir_targets[i]
            dstarts = chunk_starts[i]
            assert names is not None and dtargets is not None
            bounds = [*dstarts, len(names)]
            for c in range(len(dstarts)):
                a, b = bounds[c], bounds[c + 1]
                if c < n_blocks:
                    where = (blkaddr + c) * BLOCK_SIZE
                elif tail:
                    where = off
                else:
                    break
                chunk_names = names[a:b]
                n = b - a
                # A plain loop: building the fields from map/zip/accumulate
                # iterators cost three times as much for the usual small chunk.
                fields: list[int] = []
                nameoff = 12 * n
                for name, t in zip(chunk_names, dtargets[a:b], strict=True):
                    fields += (nid_of[t], nameoff, ftype_of[t])
                    nameoff += len(name)
                packer = dirent_packers.get(n)
                if packer is None:
                    packer = dirent_packers[n] = struct.Struct("<" + DIRENT_FIELDS * n)
                packer.pack_into(buf, where, *fields)
                where += 12 * n
                joined = b"".join(chunk_names)
                buf[where : where + len(joined)] = joined
        elif ftype == _S_IFLNK:
            target = node.payload
            assert target is not None
            where = blkaddr * BLOCK_SIZE if n_blocks else off
            buf[where : where + len(target)] = target
        elif ftype == _S_IFREG and size > 0:
            content = node.content
            if content is None:
                if n_blocks:
                    where = blkaddr * BLOCK_SIZE
                    buf[where : where + BLOCK_SIZE] = b"\xff" * BLOCK_SIZE
                else:
                    buf[off : off + tail] = b"\xff" * tail
            else:
                if tail:
                    buf[off : off + tail] = content[size - tail :]
                if n_blocks:
                    where = blkaddr * BLOCK_SIZE
                    first = content[:BLOCK_SIZE]
                    buf[where : where + len(first)] = first
    buf.release()
    return out.getvalue()
