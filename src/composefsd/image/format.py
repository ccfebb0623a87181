"""The composefs image on disk: the composefs header and the EROFS structures in
it, as C libcomposefs 1.0.8 writes them (reference notes, composefs-image-format.md).

The one home of the magic numbers, sizes and struct layouts that the writer, the
reader and ``mount.composefs`` share. Where the writer packs every field of a
structure and the reader unpacks only the fields it uses, both views of the layout
are here, side by side.
"""

from __future__ import annotations

import struct
from enum import IntEnum

__all__ = [
    "BLOCK_SIZE",
    "BLOCK_SIZE_BITS",
    "COMPACT_INODE",
    "COMPACT_INODE_READ",
    "COMPOSEFS_MAGIC",
    "COMPOSEFS_VERSION",
    "DIRENT_FIELDS",
    "DIRENT_FILE_TYPES",
    "DIRENT_READ",
    "DIRENT_SIZE",
    "EROFS_MAGIC",
    "EXTENDED_INODE",
    "EXTENDED_INODE_READ",
    "FEATURE_COMPAT_MTIME",
    "FEATURE_COMPAT_XATTR_FILTER",
    "HEADER",
    "HEADER_FLAG_HAS_ACL",
    "HEADER_SIZE",
    "INODES_START",
    "INODE_SLOT_BITS",
    "INODE_SLOT_SIZE",
    "LAYOUT_CHUNK_BASED",
    "LAYOUT_FLAT_INLINE",
    "LAYOUT_FLAT_PLAIN",
    "METACOPY_ALGORITHMS",
    "SUPERBLOCK",
    "SUPERBLOCK_OFFSET",
    "SUPERBLOCK_SIZE",
    "V2_CHUNK_FORMAT",
    "XATTR_AREA_MAX",
    "XATTR_ENTRY",
    "XATTR_FILTER_SEED",
    "XATTR_IBODY_HEADER",
    "XATTR_PREFIXES",
    "XATTR_SHARED_REF",
    "ErofsVersion",
    "metacopy_value",
]

# -- composefs header, at offset 0 -------------------------------------------------

COMPOSEFS_MAGIC = 0xD078629A
#: The header's own version (``LCFS_EROFS_VERSION``), not the image format version.
COMPOSEFS_VERSION = 1
HEADER_FLAG_HAS_ACL = 1
HEADER_SIZE = 32
#: magic, version, flags, composefs_version; the rest of the 32 bytes is reserved (0).
HEADER = struct.Struct("<IIII")


class ErofsVersion(IntEnum):
    """An image format, by the header's ``composefs_version``: C writes 0 or 1,
    composefs-rs also 2 (its older layout); :mod:`composefsd.image.formats` says
    what each one is."""

    V0 = 0
    V1 = 1
    V2 = 2


# -- EROFS superblock -----------------------------------------------------------------

EROFS_MAGIC = 0xE0F5E1E2
BLOCK_SIZE = 4096
BLOCK_SIZE_BITS = 12
SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 128
#: Both writers put the inodes right after the superblock (``meta_blkaddr`` 0).
INODES_START = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4
#: magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos,
#: build_time, build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr; the rest of
#: the 128 bytes is 0.
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII")

# -- inodes: nid = offset from the metadata start / 32 ----------------------------

INODE_SLOT_BITS = 5
INODE_SLOT_SIZE = 1 << INODE_SLOT_BITS
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4
#: V2 writes every external file as one chunk: chunk bits 12 + 31, whatever the size.
V2_CHUNK_FORMAT = 31
#: i_format, i_xattr_icount, i_mode, i_nlink, i_size, i_reserved, i_u, i_ino, i_uid,
#: i_gid, i_reserved2 (32 bytes).
COMPACT_INODE = struct.Struct("<HHHHIIIIHHI")
#: The same without the reserved fields and i_ino: i_format, i_xattr_icount, i_mode,
#: i_nlink, i_size, i_u, i_uid, i_gid.
COMPACT_INODE_READ = struct.Struct("<HHHHI4xI4xHH4x")
#: i_format, i_xattr_icount, i_mode, i_reserved, i_size, i_u, i_ino, i_uid, i_gid,
#: i_mtime, i_mtime_nsec, i_nlink, i_reserved2[16] (64 bytes).
EXTENDED_INODE = struct.Struct("<HHHHQIIIIQII16x")
#: The same without the reserved fields and i_ino, i_mtime signed: i_format,
#: i_xattr_icount, i_mode, i_size, i_u, i_uid, i_gid, i_mtime, i_mtime_nsec, i_nlink.
EXTENDED_INODE_READ = struct.Struct("<HHH2xQI4xIIqII16x")

# -- xattrs ---------------------------------------------------------------------------

#: Seed of the xattr name filter's hash (xxh32 of the suffix, seed + name index).
XATTR_FILTER_SEED = 0x25BBE08F
#: The inode's xattr area header: h_name_filter, h_shared_count, reserved (12 bytes).
XATTR_IBODY_HEADER = struct.Struct("<IB7x")
#: One entry of the shared xattr index array after that header: the entry's offset
#: in the shared xattr area, in 4-byte units.
XATTR_SHARED_REF = struct.Struct("<I")
#: e_name_len, e_name_index, e_value_size; the name suffix and value follow.
XATTR_ENTRY = struct.Struct("<BBH")
#: The largest xattr area of an inode: its 16-bit ``i_xattr_icount`` bounds it.
XATTR_AREA_MAX = 12 + 4 * (0xFFFF - 1)
#: Name prefixes by ``e_name_index`` (0: the name is stored whole).
XATTR_PREFIXES = (
    b"",
    b"user.",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
    b"trusted.",
    b"lustre.",
    b"security.",
)

# -- directory entries ------------------------------------------------------------------

DIRENT_SIZE = 12
#: An entry's ``file_type`` by the file's ``S_IF*`` type >> 12.
DIRENT_FILE_TYPES = {0o10: 1, 0o04: 2, 0o02: 3, 0o06: 4, 0o01: 5, 0o14: 6, 0o12: 7}
#: One entry's fields for a struct format: nid, nameoff, file_type, reserved.
DIRENT_FIELDS = "QHBx"
#: One entry as the reader needs it: nid, nameoff.
DIRENT_READ = struct.Struct("<QH2x")

# -- overlayfs metacopy xattr (struct ovl_metacopy) ----------------------------------

#: The kernel's fs-verity algorithm number by digest size: sha256 (the only one C
#: libcomposefs writes) and sha512 (composefs-rs repositories).
METACOPY_ALGORITHMS = {32: 1, 64: 2}
#: version (0), total length, flags (0), digest algorithm; the digest follows.
_METACOPY_HEAD = struct.Struct("<BBBB")


def metacopy_value(digest: bytes) -> bytes:
    """``trusted.overlay.metacopy`` for a file whose fs-verity digest is ``digest``."""
    algorithm = METACOPY_ALGORITHMS.get(len(digest))
    if algorithm is None:
        raise ValueError(f"no fs-verity algorithm has {len(digest)}-byte digests")
    return _METACOPY_HEAD.pack(0, 4 + len(digest), 0, algorithm) + digest
