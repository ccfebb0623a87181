"""Random directory trees for differential tests of mkcomposefs directory input.

``generate_tree(rng, root, **knobs)`` fills ``root`` (created if missing) with a random tree:
nested directories, regular files of sizes around the 64-byte inline threshold, the 4096-byte
block and a few MiB (some with identical content, for digest-store deduplication), real
hardlinks (C does not detect them: every path is its own inode), symlinks up to 4095 bytes,
character and block devices, overlay whiteouts (c 0 0), fifos, sockets, names of any byte but
``/`` and NUL, xattrs in the user/trusted/security namespaces (also ``trusted.overlay.*``,
which the writer escapes) and POSIX ACLs, nanosecond/negative/post-2038 mtimes, and uids/gids
beyond 16 bits. Needs root (devices, trusted.* xattrs, chown) and a filesystem with xattrs.
"""

from __future__ import annotations

import os
import random
import stat
import struct
from pathlib import Path

__all__ = ["generate_tree"]

_SIMPLE = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+,~#!@%^&()[]{}"
_SIMPLE_TABLE = bytes(_SIMPLE[i % len(_SIMPLE)] for i in range(256))
_NAME_TABLE = bytes(b if b not in (0, 0x2F) else 0x5F for b in range(256))

_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def _acl(rng: random.Random) -> bytes:
    """A valid POSIX ACL xattr value (version 2), so the kernel accepts it."""
    entries = [(_ACL_USER_OBJ, rng.randrange(8), 0xFFFFFFFF)]
    if rng.random() < 0.7:
        entries.append((_ACL_USER, rng.randrange(8), rng.randrange(1, 70000)))
    entries.append((_ACL_GROUP_OBJ, rng.randrange(8), 0xFFFFFFFF))
    if len(entries) > 2:
        entries.append((_ACL_MASK, rng.randrange(8), 0xFFFFFFFF))
    entries.append((_ACL_OTHER, rng.randrange(8), 0xFFFFFFFF))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


def _name(rng: random.Random, taken: set[bytes]) -> bytes:
    while True:
        r = rng.random()
        if r < 0.6:
            name = rng.randbytes(rng.randint(1, 12)).translate(_SIMPLE_TABLE)
        elif r < 0.85:
            name = rng.randbytes(rng.randint(1, 40)).translate(_NAME_TABLE)
        elif r < 0.92:
            name = rng.randbytes(rng.choice([254, 255])).translate(_NAME_TABLE)
        else:
            name = rng.choice(
                [b"-", b"!x", b"#", b"a b", b"\n", b"\\", b"=", "é".encode(), b"00", b"ff"]
            )
        if name not in (b".", b"..") and name not in taken:
            taken.add(name)
            return name


def _content(rng: random.Random, size: int, shared: list[bytes]) -> bytes:
    r = rng.random()
    if shared and r < 0.15:
        return rng.choice(shared)  # identical content: same digest, one store object
    if r < 0.3:
        return bytes(size)
    data = rng.randbytes(size)
    if size <= 8192 and rng.random() < 0.3:
        shared.append(data)
    return data


def _file_size(rng: random.Random, big: bool) -> int:
    if big and rng.random() < 0.5:
        return rng.choice([1 << 20, 3 * (1 << 20) + 17, rng.randint(1 << 20, 4 << 20)])
    return rng.choice(
        [
            0,
            0,
            1,
            2,
            4,
            63,
            64,
            65,
            100,
            2048,
            4095,
            4096,
            4097,
            8192,
            12289,
            rng.randint(1, 200),
            rng.randint(1, 20000),
        ]
    )


def _mtime_ns(rng: random.Random, base: int) -> int:
    r = rng.random()
    if r < 0.5:
        return base
    return rng.choice(
        [
            0,
            rng.randint(0, 2**31) * 10**9 + rng.randrange(10**9),
            -rng.randint(1, 2**31) * 10**9 + rng.randrange(10**9),
            rng.randint(2**32, 2**34) * 10**9 + rng.randrange(10**9),
            base + rng.randrange(10**9),
            1,
        ]
    )


def _id(rng: random.Random) -> int:
    return rng.choice(
        [0, 0, 0, 1000, 65534, 65535, 65536, rng.randrange(1 << 16), rng.randrange((1 << 32) - 1)]
    )


def _xattrs(rng: random.Random, path: bytes, *, symlink: bool, is_dir: bool) -> None:
    n = 0 if rng.random() < 0.5 else rng.randint(1, 4) if rng.random() < 0.9 else rng.randint(5, 12)
    for _ in range(n):
        prefixes = [b"trusted.", b"security.", b"trusted.overlay.", b"trusted.overlay.overlay."]
        if not symlink:  # the kernel refuses user.* xattrs on symlinks
            prefixes += [b"user.", b"user.", b"user.", b"user.overlay."]
        prefix = rng.choice(prefixes)
        r = rng.random()
        if r < 0.6:
            suffix = rng.randbytes(rng.randint(1, 16)).translate(_SIMPLE_TABLE)
        elif r < 0.9:
            suffix = rng.randbytes(rng.randint(1, 30)).translate(_NAME_TABLE)
        else:
            suffix = rng.choice([b"redirect", b"metacopy", b"opaque", b"whiteout", b"origin"])
        r = rng.random()
        value = (
            b""
            if r < 0.15
            else rng.choice([b"x", b"shared-value", b"y"])
            if r < 0.4
            else rng.randbytes(rng.randint(1, 64))
            if r < 0.9
            else rng.randbytes(rng.randint(200, 1500))
        )
        try:
            os.setxattr(path, prefix + suffix, value, follow_symlinks=False)
        except OSError:
            pass  # e.g. out of xattr space in the inode/block: just fewer xattrs
    if not symlink and rng.random() < 0.05:
        os.setxattr(path, b"system.posix_acl_access", _acl(rng), follow_symlinks=False)
    if is_dir and rng.random() < 0.05:
        os.setxattr(path, b"system.posix_acl_default", _acl(rng), follow_symlinks=False)
    if rng.random() < 0.03:
        os.setxattr(
            path, b"security.selinux", b"system_u:object_r:etc_t:s0\x00", follow_symlinks=False
        )


def generate_tree(rng: random.Random, root: Path, **knobs: object) -> None:
    """Fill ``root`` with a random tree. Knobs: n_entries (int), big_files (bool: a few MiB-sized
    files), wide_dir (bool: one directory of hundreds of entries), devices (bool, default True),
    xattrs (bool, default True)."""
    n_entries = knobs.get("n_entries")
    if n_entries is None:
        n_entries = rng.randint(10, 120)
    assert isinstance(n_entries, int)
    big = bool(knobs.get("big_files", rng.random() < 0.3))
    devices = bool(knobs.get("devices", True))
    with_xattrs = bool(knobs.get("xattrs", True))

    rootb = os.fsencode(root)
    os.makedirs(rootb, exist_ok=True)
    dirs: list[tuple[bytes, set[bytes]]] = [(rootb, set())]
    files: list[bytes] = []
    shared: list[bytes] = []
    base = rng.choice(
        [0, 1_600_000_000 * 10**9, rng.randint(0, 2**32) * 10**9 + rng.randrange(10**9)]
    )
    meta: list[tuple[bytes, int, int, int, int | None]] = []  # path, uid, gid, mtime_ns, mode
    big_left = rng.randint(1, 2) if big else 0

    for _ in range(n_entries):
        parent, taken = dirs[0] if rng.random() < 0.3 else rng.choice(dirs)
        path = parent + b"/" + _name(rng, taken)
        kind = rng.choices(
            ["dir", "reg", "lnk", "hardlink", "chr", "blk", "wht", "fifo", "sock"],
            [15, 45, 12, 6, 3, 3, 4, 2, 2] if devices else [15, 45, 12, 6, 0, 0, 0, 2, 2],
        )[0]
        if kind == "hardlink" and not files:
            kind = "reg"
        mode: int | None = rng.choice(
            [0o644, 0o755, 0o600, 0o444, 0o4755, 0o2755, 0o1777, 0o777, 0]
        )
        if kind == "dir":
            os.mkdir(path)
            dirs.append((path, set()))
            mode = rng.choice([0o755, 0o700, 0o1777, 0o555, 0o2775])
        elif kind == "reg":
            size = _file_size(rng, big_left > 0)
            if size >= 1 << 20:
                big_left -= 1
            with open(path, "wb") as fh:
                fh.write(_content(rng, size, shared))
            files.append(path)
        elif kind == "hardlink":
            os.link(rng.choice(files), path)
            continue  # shares the inode: metadata is the target's
        elif kind == "lnk":
            r = rng.random()
            n = (
                rng.randint(1, 30)
                if r < 0.7
                else rng.randint(31, 500)
                if r < 0.9
                else rng.choice([4095, 4000, 2049])
            )
            target = rng.randbytes(n).translate(
                _NAME_TABLE if rng.random() < 0.3 else _SIMPLE_TABLE
            )
            os.symlink(target, path)
            mode = None
        elif kind in ("chr", "blk"):
            dev = os.makedev(rng.randint(1, 4095), rng.choice([0, 1, rng.randrange(1 << 20)]))
            os.mknod(path, (stat.S_IFCHR if kind == "chr" else stat.S_IFBLK) | 0o644, dev)
        elif kind == "wht":
            os.mknod(path, stat.S_IFCHR | rng.choice([0o000, 0o644, 0o600]), os.makedev(0, 0))
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            os.mknod(path, stat.S_IFSOCK | 0o755)
        if with_xattrs:
            _xattrs(rng, path, symlink=kind == "lnk", is_dir=kind == "dir")
        meta.append((path, _id(rng), _id(rng), _mtime_ns(rng, base), mode))

    if knobs.get("wide_dir", rng.random() < 0.3):
        # Hundreds of entries in one directory: dirents over several 4096-byte blocks.
        parent, taken = rng.choice(dirs)
        wide = parent + b"/" + _name(rng, taken)
        os.mkdir(wide)
        wide_taken: set[bytes] = set()
        for _ in range(rng.randint(150, 400)):
            path = wide + b"/" + _name(rng, wide_taken)
            r = rng.random()
            if r < 0.6:
                with open(path, "wb") as fh:
                    fh.write(rng.randbytes(rng.choice([0, 0, 1, 64, 65])))
            elif r < 0.8:
                os.symlink(rng.randbytes(rng.randint(1, 20)).translate(_SIMPLE_TABLE), path)
            elif r < 0.9 and devices:
                os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(0, 0))
            else:
                os.mkdir(path)
            os.utime(path, ns=(base, base), follow_symlinks=False)
        meta.append((wide, _id(rng), _id(rng), _mtime_ns(rng, base), 0o755))

    meta.append(
        (rootb, _id(rng), _id(rng), _mtime_ns(rng, base), rng.choice([0o755, 0o700, 0o1755]))
    )
    if with_xattrs and rng.random() < 0.3:
        _xattrs(rng, rootb, symlink=False, is_dir=True)
    # Deepest first, so that setting a child's times does not touch an already-set parent.
    for path, uid, gid, mtime_ns, mode in sorted(meta, key=lambda m: -m[0].count(b"/")):
        os.lchown(path, uid, gid)
        if mode is not None:
            os.chmod(path, mode)  # after chown, which clears set-id bits
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
