"""Random composefs dumpfiles (composefs-dump(5)) for differential tests against C mkcomposefs.

``generate(rng, **knobs)`` returns the bytes of one dumpfile. Most are valid; some carry a
deliberate error (``invalid=True``, or by chance) so that exit statuses can be compared too.
``generate_case(rng)`` also picks the mkcomposefs arguments (format versions) and whether the
strict parser (``CFS_PARSE_STRICT``) is on.

The generator aims at the corners of the C 1.0.8 writer and parser (spec sections 2-8 and 13):
every inode kind, inline/external/huge chunked files, multi-block directories, long symlinks,
odd names and escapes, shared xattrs (more than 128 in one inode), overlay xattr escaping and
collisions, whiteouts (also in the root's 00..ff name range), hardlink chains, extreme
mtimes/ids, and the integer-syntax liberties of strtoull.

Run ``python tests/gen_dumpfile.py SEED [OUT]`` to write the dump of one seed (the case's
mkcomposefs arguments go to stderr).
"""

from __future__ import annotations

import random
import stat
import sys
from dataclasses import dataclass, field

__all__ = [
    "Case",
    "Generated",
    "case_for_seed",
    "generate",
    "generate_case",
    "generate_full",
    "knobs_for_seed",
]

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
XATTR_ESTIMATE_MAX = 32767
XATTR_TEXT_MAX = 65535
MAX_CHUNKED_SIZE = 1024 << 43  # 1024 chunks of 2^43 bytes: the largest external file C accepts

S_IFWHT = -1  # our marker for "whiteout": a char device 0/0


@dataclass(slots=True, eq=False)
class Entry:
    """One line of the dump to be (a node, or a hardlink entry when ``target`` is set)."""

    name: bytes
    parent: Entry | None
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    mtime_sec: int = 0
    mtime_nsec: int = 0
    payload: bytes | None = None
    content: bytes | None = None
    digest: str | None = None
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    children: dict[bytes, Entry] = field(default_factory=dict)
    target: Entry | None = None
    # Raw field text overrides (already escaped), used by quirks and mutations.
    raw: dict[int, bytes] = field(default_factory=dict)
    # Bytes written after a NUL in this entry's own PATH (or symlink target): C drops them.
    nul_junk: bytes = b""
    payload_junk: bytes = b""
    # Bits above the 16 that reach disk, written into MODE.
    high_mode: int = 0

    @property
    def is_dir(self) -> bool:
        return self.target is None and stat.S_ISDIR(self.mode)

    def path(self) -> bytes:
        parts: list[bytes] = []
        node: Entry | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(parts))


@dataclass(slots=True)
class Generated:
    data: bytes
    #: What the generator meant: a short label of the deliberate error, or None.
    mutation: str | None
    #: Features that only the non-strict parser accepts.
    non_strict_only: bool


@dataclass(slots=True)
class Case:
    seed: str
    dump: bytes
    #: mkcomposefs arguments besides --from-file/--print-digest/SOURCE/IMAGE.
    args: list[str]
    strict: bool
    mutation: str | None
    non_strict_only: bool

    @property
    def expect_failure(self) -> bool:
        """Whether the generator meant C to reject this case."""
        bad_version = any(
            a in self.args for a in ("--min-version=2", "--max-version=2", "--min-version=-1")
        )
        return self.mutation is not None or bad_version or (self.strict and self.non_strict_only)


# ---------------------------------------------------------------------------------------------
# escaping


class _Escaper:
    """Escapes fields, with random (but always valid) choices among equivalent spellings."""

    def __init__(self, rng: random.Random, gratuitous: float, raw_odd: float) -> None:
        self.rng = rng
        self.gratuitous = gratuitous  # chance to \x-escape a byte that needs no escape
        self.raw_odd = raw_odd  # chance to leave a control/high byte raw (the parser allows it)
        # Fast path: one fixed spelling per byte, picked once per dump.
        self.table = [self._one(b, key=False) for b in range(256)]
        self.key_table = [self._one(b, key=True) for b in range(256)]

    def _hex(self, b: int) -> bytes:
        fmt = "\\x%02X" if self.rng.random() < 0.2 else "\\x%02x"
        return (fmt % b).encode()

    def _one(self, b: int, *, key: bool) -> bytes:
        rng = self.rng
        if b == 0x5C:
            return b"\\\\" if rng.random() < 0.8 else self._hex(b)
        if b == 0x0A:
            return b"\\n" if rng.random() < 0.7 else self._hex(b)
        if b == 0x0D:
            return b"\\r" if rng.random() < 0.5 else (b"\r" if rng.random() < 0.3 else self._hex(b))
        if b == 0x09:
            return b"\\t" if rng.random() < 0.5 else (b"\t" if rng.random() < 0.3 else self._hex(b))
        if b in (0x00, 0x20) or (key and b == 0x3D):
            return self._hex(b)
        if b < 0x21 or b > 0x7E:
            return bytes([b]) if rng.random() < self.raw_odd else self._hex(b)
        if rng.random() < self.gratuitous:
            return self._hex(b)
        return bytes([b])

    def esc(self, data: bytes, *, key: bool = False, optional: bool = False) -> bytes:
        if len(data) < 64 and self.rng.random() < 0.3:
            res = b"".join(self._one(b, key=key) for b in data)
        else:
            res = b"".join(map((self.key_table if key else self.table).__getitem__, data))
        if optional and res == b"-":
            res = b"\\x2d"
        return res


# ---------------------------------------------------------------------------------------------
# random values

_SIMPLE = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+,~#!@%^&()[]{}"
_HEXDIGITS = "0123456789abcdef"


_SIMPLE_TABLE = bytes(_SIMPLE[i % len(_SIMPLE)] for i in range(256))
_SIMPLE_SLASH_TABLE = bytes((_SIMPLE + b"/")[i % (len(_SIMPLE) + 1)] for i in range(256))


def _simple(rng: random.Random, n: int, *, slash: bool = False) -> bytes:
    return rng.randbytes(n).translate(_SIMPLE_SLASH_TABLE if slash else _SIMPLE_TABLE)


def _bytes_any(rng: random.Random, n: int, *, exclude: bytes = b"") -> bytes:
    data = rng.randbytes(n)
    if exclude:
        # Excluded bytes become a neighbour: a cheap, nearly uniform draw without them.
        table = bytearray(range(256))
        for b in exclude:
            table[b] = (b + 1) & 0xFF if (b + 1) & 0xFF not in exclude else 0x41
        data = data.translate(bytes(table))
    return data


def _content(rng: random.Random, n: int) -> bytes:
    style = rng.random()
    if style < 0.35:
        return rng.randbytes(n)
    if style < 0.55:
        return bytes(i & 0xFF for i in range(n))
    if style < 0.65:
        return bytes(n)
    if style < 0.75:
        return b"-" * n
    words = [b"hello", b"world", b"=", b" ", b"\n", b"\\", b"-", b"\t", b"\x00", b"foo", b"\xff"]
    return b"".join(rng.choices(words, k=n))[:n]


def _name(
    rng: random.Random, taken: dict[bytes, Entry], *, root: bool, long_ok: bool = True
) -> bytes:
    for _ in range(1000):
        r = rng.random()
        if root and r < 0.08:
            # Collide with (or sit next to) the root's 00..ff whiteout names.
            name = rng.choice([f"{rng.randrange(256):02x}", f"{rng.randrange(16):x}", "0", "g0"])
            name_b = name.encode()
        elif r < 0.55:
            name_b = _simple(rng, rng.randint(1, 12))
        elif r < 0.75:
            name_b = _bytes_any(rng, rng.randint(1, 24), exclude=b"/\x00")
        elif r < 0.82 and long_ok:
            name_b = _simple(rng, rng.choice([254, 255, 200]))
        elif r < 0.86 and long_ok:
            name_b = _bytes_any(rng, 255, exclude=b"/\x00")
        elif r < 0.93:
            name_b = rng.choice([b"!", b"#", b"+", b",", b"-", b".a", b"..a", b"...", b"=", b" "])
            name_b += _simple(rng, rng.randint(0, 3))
        else:
            name_b = "ñamé-日本-".encode() + str(rng.randrange(1000)).encode()
        if name_b in (b".", b"..") or name_b in taken:
            continue
        return name_b
    raise RuntimeError("could not find a free name")


def _mtime(rng: random.Random, base: tuple[int, int]) -> tuple[int, int]:
    r = rng.random()
    if r < 0.6:
        return base
    sec = rng.choice(
        [
            0,
            1,
            -1,
            rng.randint(-(1 << 40), -1),
            -(1 << 63),
            (1 << 63) - 1,
            rng.randint(1 << 32, 1 << 40),
            (1 << 32) - 1,
            rng.randint(0, 1 << 31),
            base[0],
        ]
    )
    nsec = rng.choice(
        [0, 0, rng.randrange(1_000_000_000), 999_999_999, U32, rng.randrange(1 << 32)]
    )
    if rng.random() < 0.03:
        nsec += rng.randrange(1, 1 << 32) << 32  # C truncates NSEC to 32 bits
    return sec, nsec


def _id(rng: random.Random) -> int:
    if rng.random() < 0.03:
        return rng.randrange(1 << 32, 1 << 64)  # C truncates to 32 bits
    return rng.choice(
        [0, 0, 0, 0, 1000, 65534, 65535, 65536, rng.randrange(1 << 16), rng.randrange(1 << 32), U32]
    )


def _digest(rng: random.Random) -> str:
    d = "".join(rng.choice(_HEXDIGITS) for _ in range(64))
    return d.upper() if rng.random() < 0.1 else d


def _payload(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.4:
        h = "".join(rng.choice(_HEXDIGITS) for _ in range(64))
        return f"{h[:2]}/{h[2:]}".encode()
    if r < 0.6:
        # Lengths = 3 mod 4 hit the reader's redirect off-by-one (spec 10.2).
        n = rng.choice([3, 7, 11, 15, 63, 67, 4095 if rng.random() < 0.1 else 4091])
        return _bytes_any(rng, n, exclude=b"\x00")
    if r < 0.77:
        return b"/" + _simple(rng, rng.randint(0, 40))
    if r < 0.79:
        return _bytes_any(rng, rng.randint(3000, 4095), exclude=b"\x00")
    return _simple(rng, rng.randint(1, 100), slash=True)


def _symlink_target(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.6:
        n = rng.randint(1, 30)
    elif r < 0.87:
        n = rng.randint(31, 300)
    else:
        n = rng.choice(
            [4095, 4094, 4064, 4032, 4031, 4000, 3990, 2048, 2049, rng.randint(1000, 4095)]
        )
    if rng.random() < 0.5:
        return _simple(rng, n, slash=True)
    return _bytes_any(rng, n, exclude=b"\x00")


_XATTR_PREFIXES = [
    (b"user.", 30),
    (b"trusted.", 12),
    (b"security.", 10),
    (b"system.posix_acl_access", 4),
    (b"system.posix_acl_default", 4),
    (b"system.nfs4_acl", 2),
    (b"lustre.", 2),
    (b"other.", 2),
    (b"", 2),
    (b"trusted.overlay.", 6),
    (b"trusted.overlay.overlay.", 3),
    (b"user.overlay.", 5),
]


def _xattr_key(rng: random.Random) -> bytes:
    prefix = rng.choices([p for p, _ in _XATTR_PREFIXES], [w for _, w in _XATTR_PREFIXES])[0]
    r = rng.random()
    if (prefix.startswith(b"system.posix_acl") and r < 0.8) or (r < 0.05 and prefix):
        suffix = b""
    elif r < 0.6:
        suffix = _simple(rng, rng.randint(1, 16))
    elif r < 0.63 and prefix in (b"trusted.overlay.", b"user.overlay."):
        suffix = rng.choice(
            [b"redirect", b"metacopy", b"opaque", b"whiteout", b"whiteouts", b"origin"]
        )
    elif r < 0.9:
        suffix = _bytes_any(rng, rng.randint(1, 30), exclude=b"\x00")
    else:
        suffix = _simple(rng, max(1, 255 - len(prefix) - rng.randint(0, 3)))
    key = prefix + suffix
    return key[:255] if key else b"k"


def _xattr_value(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.15:
        return b""
    if r < 0.5:
        return _simple(rng, rng.randint(1, 20)) + rng.choice([b"", b"=", b" ", b"= x"])
    if r < 0.85:
        return rng.randbytes(rng.randint(1, 64))
    if r < 0.97:
        return rng.randbytes(rng.randint(65, 1000))
    return _content(rng, rng.randint(1000, 6000))


def _estimate_cost(xattrs: list[tuple[bytes, bytes]], key: bytes, value: bytes) -> int:
    """The C per-node estimate after setting key=value, ignoring the duplicate-key case."""
    est = 0
    for k, v in xattrs:
        est += 7 + len(k) + len(v)
    if xattrs:
        est += 12
    return est + 7 + len(key) + len(value) + (0 if xattrs else 12)


# ---------------------------------------------------------------------------------------------
# the generator


class _Gen:
    def __init__(self, rng: random.Random, knobs: dict[str, object]) -> None:
        self.rng = rng
        self.knobs = knobs
        self.esc = _Escaper(
            rng, gratuitous=rng.choice([0.0, 0.0, 0.01, 0.1]), raw_odd=rng.choice([0.0, 0.3, 1.0])
        )
        self.base_mtime = rng.choice(
            [(0, 0), (1633950376, 0), (rng.randint(0, 1 << 33), rng.randrange(1 << 30))]
        )
        self.entries: list[Entry] = []
        self.dirs: list[Entry] = []
        self.weird_numbers = rng.random() < 0.1
        self.non_strict_only = False
        npool = rng.choice([0, 0, 3, 10, 30])
        self.pool = [
            (_xattr_key(rng), _xattr_value(rng) if rng.random() < 0.5 else b"v")
            for _ in range(npool)
        ]

    # -- building ---------------------------------------------------------------------------
    def build(self) -> Entry:
        rng = self.rng
        root = Entry(
            name=b"",
            parent=None,
            mode=stat.S_IFDIR | rng.choice([0o755, 0o555, 0o700, 0o1777, 0o7777, 0]),
        )
        self._fill_common(root)
        root.size = rng.choice([4096, 0, 12345])
        if rng.random() < 0.2:
            root.xattrs.append(
                (
                    b"security.selinux",
                    b"system_u:object_r:root_t:s0" + (b"\x00" if rng.random() < 0.5 else b""),
                )
            )
        self.entries.append(root)
        self.dirs.append(root)

        n = self.knobs.get("n_entries")
        if n is None:
            n = rng.choice([0, 1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 120, 200])
        assert isinstance(n, int)
        for _ in range(n):
            self._add_random(self._pick_dir())
        if self.knobs.get("wide_dir", rng.random() < 0.12):
            self._wide_dir()
        if self.knobs.get("many_shared", rng.random() < 0.08):
            self._many_shared()
        if self.knobs.get("hardlinks", rng.random() < 0.35):
            for _ in range(rng.randint(1, 8)):
                self._add_hardlink()
        if self.knobs.get("big_xattrs", rng.random() < 0.05):
            self._big_xattrs()
        if rng.random() < 0.05:
            self._overlay_collisions()
        return root

    def _pick_dir(self) -> Entry:
        rng = self.rng
        if rng.random() < 0.3:
            return self.dirs[0]
        return rng.choice(self.dirs)

    def _fill_common(self, e: Entry) -> None:
        rng = self.rng
        e.uid = _id(rng)
        e.gid = _id(rng)
        e.mtime_sec, e.mtime_nsec = _mtime(rng, self.base_mtime)
        r = rng.random()
        e.nlink = (
            1
            if r < 0.7
            else rng.choice([0, 2, 3, 65535, 65536, rng.randrange(1 << 32), rng.randrange(1 << 64)])
        )
        self._add_xattrs(e)
        if rng.random() < 0.01:
            e.high_mode = rng.randrange(1, 1 << 48) << 16  # only mode & S_IFMT is checked

    def _add_xattrs(self, e: Entry) -> None:
        rng = self.rng
        r = rng.random()
        count = (
            0
            if r < 0.55
            else rng.randint(1, 4)
            if r < 0.93
            else rng.randint(5, 12)
            if r < 0.99
            else rng.randint(13, 40)
        )
        for _ in range(count):
            if self.pool and rng.random() < 0.5:
                k, v = rng.choice(self.pool)
            else:
                k, v = _xattr_key(rng), _xattr_value(rng)
            self._set_xattr(e, k, v)

    def _set_xattr(self, e: Entry, k: bytes, v: bytes) -> bool:
        if any(k == ok for ok, _ in e.xattrs):
            if self.rng.random() < 0.8:
                return False
            # A duplicate key: C keeps the last, after a swap-remove (spec 2).
            remaining = [(a, b) for a, b in e.xattrs if a != k]
            if _estimate_cost(remaining, k, v) > XATTR_ESTIMATE_MAX:
                return False
            e.xattrs.append((k, v))
            return True
        if _estimate_cost(e.xattrs, k, v) > XATTR_ESTIMATE_MAX - 64:
            return False
        text = sum(self._text_len(a) + self._text_len(b) + 2 for a, b in [*e.xattrs, (k, v)])
        if text > XATTR_TEXT_MAX:
            return False
        e.xattrs.append((k, v))
        return True

    def _text_len(self, data: bytes) -> int:
        """An upper bound of the escaped length (exact for the escaper's fixed-table path)."""
        if len(data) < 64:
            return 4 * len(data)
        table = self.esc.table
        return sum(len(table[b]) for b in data)

    def _new(self, parent: Entry, mode: int, **kw: object) -> Entry:
        long_ok = bool(self.knobs.get("long_names", True)) or self.rng.random() < 0.01
        name = _name(self.rng, parent.children, root=parent.parent is None, long_ok=long_ok)
        e = Entry(name=name, parent=parent, mode=mode)
        for k, v in kw.items():
            setattr(e, k, v)
        parent.children[e.name] = e
        self.entries.append(e)
        return e

    def _perm(self) -> int:
        return self.rng.choice(
            [0o644, 0o755, 0o600, 0o777, 0o4755, 0o2755, 0o1777, 0, self.rng.randrange(0o10000)]
        )

    def _add_random(self, parent: Entry) -> Entry:
        rng = self.rng
        kind = rng.choices(
            [
                "dir",
                "reg_inline",
                "reg_empty",
                "reg_ext",
                "reg_huge",
                "lnk",
                "chr",
                "blk",
                "fifo",
                "sock",
                "wht",
            ],
            [14, 22, 8, 14, 3, 12, 3, 3, 2, 2, 4],
        )[0]
        perm = self._perm()
        if kind == "dir":
            e = self._new(parent, stat.S_IFDIR | perm, size=rng.choice([4096, 0, 60, 8192]))
            self.dirs.append(e)
        elif kind == "reg_inline":
            size = rng.choice(
                [
                    1,
                    2,
                    3,
                    4,
                    5,
                    7,
                    8,
                    63,
                    64,
                    65,
                    100,
                    2047,
                    2048,
                    2049,
                    4095,
                    4096,
                    4097,
                    4999,
                    5000,
                    rng.randint(1, 5000),
                ]
                + [rng.randint(1, 300)] * 6
            )
            e = self._new(parent, stat.S_IFREG | perm, size=size, content=_content(rng, size))
            if rng.random() < 0.1:
                e.payload = _payload(rng)  # ignored by the writer for inline files
            if rng.random() < 0.1:
                e.digest = _digest(rng)
        elif kind == "reg_empty":
            e = self._new(parent, stat.S_IFREG | perm, size=0)
            if rng.random() < 0.2:
                e.payload = _payload(rng)
            if rng.random() < 0.1:
                e.digest = _digest(rng)
            if rng.random() < 0.1:
                e.content = b""  # an empty CONTENT field: set but empty
        elif kind == "reg_ext":
            size = rng.choice(
                [
                    1,
                    4095,
                    4096,
                    4097,
                    10000,
                    1 << 20,
                    rng.randint(1, 1 << 40),
                    (1 << 32) - 1,
                    1 << 32,
                    rng.randint(1 << 32, 1 << 43),
                ]
            )
            e = self._new(parent, stat.S_IFREG | perm, size=size)
            if rng.random() < 0.8:
                e.payload = _payload(rng)
            if rng.random() < 0.6:
                e.digest = _digest(rng)
        elif kind == "reg_huge":
            chunks = rng.choice(
                [2, 3, 100, 1000, 1017, 1018, 1019, 1020, 1023, 1024, rng.randint(2, 1024)]
            )
            size = rng.choice(
                [
                    chunks << 43,
                    (chunks - 1 << 43) + 1,
                    (chunks << 43) - rng.randint(0, (1 << 43) - 1),
                ]
            )
            if rng.random() < 0.1:
                size = 9_000_000_000_000_000
            elif rng.random() < 0.05:
                # C's chunk count overflows for sizes this close to 2^64, so they are accepted.
                size = rng.choice([U64, U64 - rng.randrange(1 << 43)])
            e = self._new(parent, stat.S_IFREG | perm, size=size)
            if rng.random() < 0.5:
                e.payload = _payload(rng)
            if rng.random() < 0.5:
                e.digest = _digest(rng)
        elif kind == "lnk":
            target = _symlink_target(rng)
            e = self._new(
                parent,
                stat.S_IFLNK | rng.choice([0o777, 0o777, perm]),
                payload=target,
                size=len(target),
            )
        elif kind in ("chr", "blk"):
            rdev = rng.choice(
                [1, 0x0501, rng.randrange(1, 1 << 20), rng.randrange(1, 1 << 32), U32]
                + [(1 << 32) + 5, rng.randrange(1 << 64)] * (rng.random() < 0.1)
            )
            e = self._new(
                parent, (stat.S_IFCHR if kind == "chr" else stat.S_IFBLK) | perm, rdev=rdev
            )
        elif kind == "fifo":
            e = self._new(parent, stat.S_IFIFO | perm)
        elif kind == "sock":
            e = self._new(parent, stat.S_IFSOCK | perm)
        else:
            e = self._new(
                parent, stat.S_IFCHR | perm, rdev=0, size=rng.choice([0, 0, 0, 1, 4096, 12345678])
            )
        self._fill_common(e)
        self._odd_fields(e)
        return e

    def _odd_fields(self, e: Entry) -> None:
        """Valid but unusual field values the C parser accepts (spec 8.2)."""
        rng = self.rng
        regular, symlink = stat.S_ISREG(e.mode), stat.S_ISLNK(e.mode)
        if not regular and not symlink and rng.random() < 0.04:
            e.payload = _payload(rng)  # payloads are kept on any type; the writer ignores them
        if not regular and not symlink and rng.random() < 0.02:
            e.content = _content(rng, rng.choice([1, 5, 100]))  # ditto content (sets SIZE)
            e.size = len(e.content)
        if not regular and rng.random() < 0.02:
            e.digest = _digest(rng)
        if not e.is_dir and rng.random() < 0.02:
            # A path is a C string: "\x00" ends it. Names below stay unique (the junk has a
            # "/" too, so it cannot be any sibling's real name).
            e.nul_junk = b"\x00" + _simple(rng, rng.randint(0, 5), slash=True) + b"/x"
        if symlink and rng.random() < 0.02 and e.payload:
            e.payload_junk = b"\x00" + _simple(rng, rng.randint(1, 5))
        if e.uid & U32 and rng.random() < 0.02:
            # C ignores a bad GID or RDEV when UID != 0 (spec 8.2 step 9).
            e.raw[rng.choice([5, 6])] = rng.choice([b"x", b"12junk", b"", b"-"])

    def _wide_dir(self) -> None:
        """A directory of hundreds of entries: several 4096-byte dirent blocks."""
        rng = self.rng
        d = self._new(self._pick_dir(), stat.S_IFDIR | 0o755)
        self._fill_common(d)
        self.dirs.append(d)
        for _ in range(rng.randint(120, 450)):
            name_len = rng.choice([1, 8, 20, 40, 100])
            name = _simple(rng, rng.randint(1, name_len))
            if name in d.children or name in (b".", b".."):
                continue
            kind = rng.random()
            if kind < 0.6:
                e = Entry(name=name, parent=d, mode=stat.S_IFREG | 0o644)
            elif kind < 0.8:
                t = _simple(rng, rng.randint(1, 10))
                e = Entry(name=name, parent=d, mode=stat.S_IFLNK | 0o777, payload=t, size=len(t))
            elif kind < 0.9:
                e = Entry(name=name, parent=d, mode=stat.S_IFCHR | 0o644)  # whiteout
            else:
                e = Entry(name=name, parent=d, mode=stat.S_IFDIR | 0o755)
                self.dirs.append(e)
            e.mtime_sec, e.mtime_nsec = self.base_mtime
            d.children[name] = e
            self.entries.append(e)

    def _many_shared(self) -> None:
        """More than 128 shared xattrs in single inodes (spec 5.6: the 129th+ go inline)."""
        rng = self.rng
        n = rng.randint(129, 200)
        pool = [
            (b"user.s%03d" % i + _simple(rng, rng.randint(0, 6)), b"%d" % rng.randrange(100))
            for i in range(n)
        ]
        for _ in range(rng.randint(2, 3)):
            e = self._add_random(self._pick_dir())
            for k, v in pool:
                if rng.random() < 0.97:
                    self._set_xattr(e, k, v)

    def _big_xattrs(self) -> None:
        """Xattr areas of many KB (inodes spanning blocks) and a shared table of several blocks."""
        rng = self.rng
        nodes = [e for e in self.entries if e.target is None]
        for i in range(rng.randint(1, 3)):
            e = rng.choice(nodes)
            size = rng.choice([3000, 4000, 4090, 8000, 20000, 32000 - len(e.xattrs) * 300])
            self._set_xattr(e, b"user.big%d" % i, _simple(rng, max(1, size)))
        for i in range(rng.randint(0, 3)):
            kv = (b"trusted.shared-big%d" % i, _simple(rng, rng.choice([2000, 5000, 12000])))
            for e in rng.sample(nodes, min(len(nodes), rng.randint(2, 3))):
                self._set_xattr(e, *kv)

    def _add_hardlink(self) -> None:
        rng = self.rng
        candidates = [
            e
            for e in self.entries
            if (e.parent is not None or rng.random() < 0.02)
            and (not e.is_dir or rng.random() < 0.03)
        ]
        if not candidates:
            return
        target = rng.choice(candidates)
        parent = self._pick_dir()
        link = Entry(
            name=_name(rng, parent.children, root=parent.parent is None),
            parent=parent,
            mode=0,
            target=target,
        )
        t = target
        while t.target is not None:
            t = t.target
        link.mode = t.mode if not t.is_dir else stat.S_IFREG | 0o644
        if rng.random() < 0.2:
            link.mode = (
                rng.choice([stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFIFO]) | self._perm()
            )
        link.size, link.uid, link.mtime_sec = t.size, t.uid, t.mtime_sec
        parent.children[link.name] = link
        self.entries.append(link)
        if rng.random() < 0.5 and t.nlink < U32:
            t.nlink += 1

    def _overlay_collisions(self) -> None:
        """User xattrs with the names the writer adds itself (spec 3.2 step 4 and 13.11)."""
        rng = self.rng
        for e in list(self.entries):
            if e.target is not None:
                continue
            if stat.S_ISCHR(e.mode) and e.rdev == 0 and rng.random() < 0.5:
                k = rng.choice([b"user.overlay.whiteout", b"trusted.overlay.whiteout"])
                self._set_xattr(e, k, rng.choice([b"", b"x", b"abc"]))
            if e.is_dir and rng.random() < 0.5:
                k = rng.choice(
                    [
                        b"user.overlay.whiteouts",
                        b"trusted.overlay.whiteouts",
                        b"user.overlay.opaque",
                        b"trusted.overlay.opaque",
                    ]
                )
                self._set_xattr(e, k, rng.choice([b"", b"x", b"y", b"abc"]))
                if rng.random() < 0.5:
                    w = self._new(e, stat.S_IFCHR | 0o600)
                    w.mtime_sec, w.mtime_nsec = self.base_mtime

    # -- serialising ------------------------------------------------------------------------
    def _num(self, n: int, *, octal: bool = False) -> bytes:
        s = ("%o" if octal else "%d") % n
        if self.weird_numbers:
            r = self.rng.random()
            if r < 0.15:
                s = "0" * self.rng.randint(1, 3) + s
            elif r < 0.25:
                s = "+" + s
            elif r < 0.3:
                s = "\t" + s
            elif r < 0.35 and not octal and n > 0:
                s = f"-{(1 << 64) - n}"  # strtoull negates: the same u64
        return s.encode()

    def line(self, e: Entry) -> bytes:
        rng = self.rng
        esc = self.esc.esc
        f: list[bytes] = [b""] * 11
        f[0] = esc(e.path() + e.nul_junk)
        if e.parent is not None and rng.random() < 0.02:
            f[0] = f[0].replace(b"/", b"//", rng.randint(1, 3))  # empty components are skipped
        if e.target is not None:
            f[2] = b"@" + self._num(e.mode, octal=True)
            if rng.random() < 0.1:
                # Nothing but PATH, MODE and PAYLOAD of a hardlink line is parsed.
                f[1], f[3], f[4], f[5], f[6], f[7] = b"x", b"?", b"-", b"", b"junk", b"1"
            else:
                f[1] = self._num(e.size)
                f[3] = b"1"
                f[4] = self._num(e.uid & U32)
                f[5] = b"0"
                f[6] = b"0"
                f[7] = b"%d.0" % e.mtime_sec
            tpath = e.target.path()
            if rng.random() < 0.5:
                tpath += e.target.nul_junk
            r = rng.random()
            if r < 0.05:
                tpath = tpath.lstrip(b"/")
            elif r < 0.1:
                tpath = b"//" + tpath.replace(b"/", b"//")
            f[8] = esc(tpath, optional=True)
            f[9] = b"-"
            f[10] = b"-"
            xattrs: list[tuple[bytes, bytes]] = []
        else:
            f[1] = self._num(e.size)
            f[2] = self._num(e.mode | e.high_mode, octal=True)
            f[3] = self._num(e.nlink)
            f[4] = self._num(e.uid)
            f[5] = self._num(e.gid)
            f[6] = self._num(e.rdev)
            if e.mtime_sec < 0 and rng.random() < 0.3:
                sec = b"%d" % (e.mtime_sec & U64)
            else:
                sec = b"%d" % e.mtime_sec
            f[7] = sec + b"." + self._num(e.mtime_nsec)
            f[8] = b"-" if e.payload is None else esc(e.payload + e.payload_junk, optional=True)
            f[9] = b"-" if e.content is None else esc(e.content, optional=True)
            f[10] = b"-" if e.digest is None else e.digest.encode()
            xattrs = e.xattrs
        for i, v in e.raw.items():
            f[i] = v
        out = b" ".join(f)
        for k, v in xattrs:
            out += b" " + esc(k, key=True) + b"=" + esc(v)
        if not xattrs and rng.random() < 0.03:
            out += b" "  # an empty xattr tail is accepted
        return out

    def order(self, root: Entry) -> list[Entry]:
        """Lines in an order where every parent precedes its children (the root first)."""
        rng = self.rng
        r = rng.random()
        if r < 0.5:
            out: list[Entry] = []
            stack = [root]
            while stack:
                e = stack.pop()
                out.append(e)
                if e.is_dir:
                    stack.extend(sorted(e.children.values(), key=lambda c: c.name, reverse=True))
            return out
        out = [root]
        avail = [c for c in root.children.values()]
        while avail:
            i = rng.randrange(len(avail)) if r >= 0.75 else 0
            e = avail.pop(i)
            out.append(e)
            if e.is_dir:
                avail.extend(e.children.values())
        return out


# ---------------------------------------------------------------------------------------------
# deliberate errors


def _mutate(g: _Gen, root: Entry, lines: list[bytes], order: list[Entry]) -> str:
    """Break the dump in one of the ways C rejects; returns a label of what was done."""
    rng = g.rng
    esc = g.esc.esc
    kinds = [
        "no-root",
        "root-not-dir",
        "two-roots",
        "missing-parent",
        "duplicate",
        "dot-name",
        "empty-name",
        "long-name",
        "bad-mode",
        "bad-int",
        "content-size",
        "big-inline",
        "bad-symlink",
        "big-payload",
        "xattr-no-eq",
        "xattr-key",
        "xattr-estimate",
        "xattr-text",
        "hardlink-missing",
        "hardlink-self",
        "hardlink-dir",
        "hardlink-none",
        "hardlink-cycle",
        "bad-escape",
        "raw-nul",
        "empty-line",
        "too-big",
        "empty-input",
        "parent-not-dir",
    ]
    kind = rng.choice(kinds)
    leaf = b"/zz" + str(rng.randrange(1000)).encode()
    ok_line = leaf + b" 0 100644 1 0 0 0 0.0 - - -"
    pos = rng.randint(1, len(lines))
    if kind == "no-root":
        lines[0] = ok_line if rng.random() < 0.5 else b"." + lines[0]
        if rng.random() < 0.5:
            del lines[0]
            if not lines:
                lines.append(ok_line)
    elif kind == "root-not-dir":
        lines[0] = b"/ 0 100644 1 0 0 0 0.0 - - -"
    elif kind == "two-roots":
        lines.insert(pos, b"/ 4096 40755 2 0 0 0 0.0 - - -")
    elif kind == "missing-parent":
        lines.insert(pos, b"/no-such-dir" + leaf + b" 0 100644 1 0 0 0 0.0 - - -")
    elif kind == "duplicate":
        if len(lines) > 1:
            i = rng.randrange(1, len(lines))
            lines.insert(rng.randint(i + 1, len(lines)), lines[i])
        else:
            lines += [ok_line, ok_line]
    elif kind == "dot-name":
        lines.insert(
            pos, rng.choice([b"/.", b"/..", b"/./", b"/a/.."]) + b" 0 100644 1 0 0 0 0.0 - - -"
        )
    elif kind == "empty-name":
        lines.insert(pos, rng.choice([b"//", b"", b"///"]) + b" 0 100644 1 0 0 0 0.0 - - -")
    elif kind == "long-name":
        lines.insert(pos, b"/" + b"n" * rng.choice([256, 300]) + b" 0 100644 1 0 0 0 0.0 - - -")
    elif kind == "bad-mode":
        mode = rng.choice([b"0", b"70644", b"170644", b"644", b"9", b"", b"10000000"])
        lines.insert(pos, leaf + b" 0 " + mode + b" 1 0 0 0 0.0 - - -")
    elif kind == "bad-int":
        fields = [b"0", b"100644", b"1", b"0", b"0", b"0", b"0.0"]
        i = rng.randrange(len(fields))
        fields[i] = rng.choice([b"x", b"1x", b"", b"1.5" if i != 6 else b"5", b".5", b"5."])
        if i in (4, 5, 6) and rng.random() < 0.5:
            fields[3] = b"0"  # C ignores bad GID/RDEV when UID != 0; keep UID 0 to hit the error
        lines.insert(pos, leaf + b" " + b" ".join(fields) + b" - - -")
    elif kind == "content-size":
        lines.insert(pos, leaf + b" 5 100644 1 0 0 0 0.0 - abcd -")
    elif kind == "big-inline":
        n = rng.choice([5001, 5004, 6000])
        lines.insert(pos, leaf + b" %d 100644 1 0 0 0 0.0 - " % n + esc(rng.randbytes(n)) + b" -")
    elif kind == "bad-symlink":
        target = rng.choice([b"-", b"", b"x" * 4096, b"x" * 5000])
        t = b"-" if target == b"-" else target
        lines.insert(pos, leaf + b" %d 120777 1 0 0 0 0.0 " % len(target) + t + b" - -")
    elif kind == "big-payload":
        lines.insert(
            pos, leaf + b" 10 100644 1 0 0 0 0.0 " + b"p" * rng.choice([4096, 4100]) + b" - -"
        )
    elif kind == "xattr-no-eq":
        lines.insert(pos, ok_line + rng.choice([b" user.a", b" user.a=1  user.b=2", b"  "]))
    elif kind == "xattr-key":
        key = rng.choice([b"", b"\\x00abc", b"u" * 256, b"user." + b"k" * 251])
        lines.insert(pos, ok_line + b" " + key + b"=v")
    elif kind == "xattr-estimate":
        xs = b"".join(b" user.k%d=" % i + b"v" * 4000 for i in range(9))
        lines.insert(pos, ok_line + xs)
    elif kind == "xattr-text":
        lines.insert(pos, ok_line + b" user.big=" + b"\\xff" * 17000)
    elif kind == "hardlink-missing":
        lines.insert(pos, leaf + b" 0 @100644 1 0 0 0 0.0 /does/not/exist - -")
    elif kind == "hardlink-self":
        lines.insert(pos, leaf + b" 0 @100644 1 0 0 0 0.0 " + leaf + b" - -")
    elif kind == "hardlink-dir":
        lines.insert(pos, leaf + b" 0 @40755 1 0 0 0 0.0 / - -")
    elif kind == "hardlink-none":
        lines.insert(pos, leaf + b" 0 @100644 1 0 0 0 0.0 - - -")
    elif kind == "hardlink-cycle":
        lines.insert(pos, leaf + b"a 0 @100644 1 0 0 0 0.0 " + leaf + b"b - -")
        lines.insert(pos, leaf + b"b 0 @100644 1 0 0 0 0.0 " + leaf + b"a - -")
    elif kind == "bad-escape":
        lines.insert(
            pos,
            leaf + rng.choice([b"\\q", b"\\x4", b"\\xzz", b"\\"]) + b" 0 100644 1 0 0 0 0.0 - - -",
        )
    elif kind == "raw-nul":
        i = rng.randrange(len(lines))
        j = rng.randint(0, len(lines[i]))
        lines[i] = lines[i][:j] + b"\x00" + lines[i][j:]
    elif kind == "empty-line":
        lines.insert(pos, b"")
    elif kind == "too-big":
        size = rng.choice([MAX_CHUNKED_SIZE + 1, 9_500_000_000_000_000, 1 << 60, U64 - (1 << 43)])
        lines.insert(pos, leaf + b" %d 100644 1 0 0 0 0.0 - - -" % size)
    elif kind == "empty-input":
        lines.clear()
    elif kind == "parent-not-dir":
        lines.insert(pos, ok_line)
        lines.insert(pos + 1, leaf + b"/child 0 100644 1 0 0 0 0.0 - - -")
    return kind


def _non_strict_quirk(g: _Gen, root: Entry) -> str:
    """Something only the non-strict parser accepts (spec 8.2)."""
    rng = g.rng
    options = ["no-newline"]
    links = [e for e in g.entries if e.target is None and stat.S_ISLNK(e.mode)]
    others = [
        e
        for e in g.entries
        if e.target is None
        and not stat.S_ISLNK(e.mode)
        and not stat.S_ISCHR(e.mode)
        and not stat.S_ISBLK(e.mode)
    ]
    if links:
        options += ["symlink-size", "symlink-content"]
    options += ["rdev-non-device"]
    kind = rng.choice(options)
    if kind == "symlink-size":
        e = rng.choice(links)
        e.size = rng.choice([0, 5, e.size + 1, 1 << 40])
    elif kind == "symlink-content":
        e = rng.choice(links)
        e.content = rng.randbytes(e.size)  # CONTENT length must still match SIZE
    elif kind == "rdev-non-device":
        e = rng.choice(others)
        e.rdev = rng.choice([1, 10, 1 << 33])
    return kind


# ---------------------------------------------------------------------------------------------
# public API


def generate_full(rng: random.Random, **knobs: object) -> Generated:
    """Knobs (all optional): n_entries: int, invalid: bool, non_strict: bool (allow features
    only the non-strict parser takes), wide_dir, many_shared, big_xattrs, hardlinks,
    long_names: bool."""
    g = _Gen(rng, knobs)
    root = g.build()
    invalid = knobs.get("invalid")
    if invalid is None:
        invalid = rng.random() < 0.1
    non_strict = knobs.get("non_strict")
    if non_strict is None:
        non_strict = rng.random() < 0.1
    quirk = _non_strict_quirk(g, root) if non_strict else None
    order = g.order(root)
    lines = [g.line(e) for e in order]
    mutation = _mutate(g, root, lines, order) if invalid else None
    data = b"".join(line + b"\n" for line in lines)
    if quirk == "no-newline" and data.endswith(b"\n"):
        data = data[:-1]
    return Generated(data=data, mutation=mutation, non_strict_only=quirk is not None)


def generate(rng: random.Random, **knobs: object) -> bytes:
    """One random dumpfile; see :func:`generate_full` for the knobs."""
    return generate_full(rng, **knobs).data


_VERSION_ARGS: list[tuple[list[str], int]] = [
    ([], 30),
    (["--min-version=0"], 6),
    (["--min-version=1"], 6),
    (["--max-version=0"], 6),
    (["--max-version=1"], 4),
    (["--min-version=0", "--max-version=0"], 4),
    (["--min-version=1", "--max-version=1"], 6),
    (["--min-version=0", "--max-version=1"], 4),
    (["--min-version=1", "--max-version=0"], 2),
    (["--min-version=2"], 1),
    (["--max-version=2"], 1),
    (["--min-version=-1"], 1),
    (["--min-version=1x"], 1),
    (["--max-version="], 1),
    (["--threads=1"], 1),
    (["--threads=0"], 1),
    (["--threads=zz"], 1),
    (["--use-epoch"], 1),
    (["--skip-xattrs", "--skip-devices"], 1),
    (["--user-xattrs"], 1),
    (["--digest-store=/nonexistent/store"], 1),
]


def generate_case(rng: random.Random, seed: str = "", **knobs: object) -> Case:
    gen = generate_full(rng, **knobs)
    args = list(rng.choices([a for a, _ in _VERSION_ARGS], [w for _, w in _VERSION_ARGS])[0])
    strict = rng.random() < (0.2 if gen.non_strict_only else 0.6)
    return Case(
        seed=seed,
        dump=gen.data,
        args=args,
        strict=strict,
        mutation=gen.mutation,
        non_strict_only=gen.non_strict_only,
    )


def knobs_for_seed(seed: str) -> dict[str, object]:
    """Seeds with ``-big-`` in them make big dumps (thousands of entries, wide directories)."""
    if "-big-" not in seed:
        return {}
    rng = random.Random(seed + "-knobs")
    return {
        "n_entries": rng.choice([1000, 2000]),
        "long_names": False,
        "wide_dir": True,
        "many_shared": rng.random() < 0.5,
        "big_xattrs": rng.random() < 0.5,
        "hardlinks": True,
        "invalid": False,
    }


def case_for_seed(seed: str) -> Case:
    """The case of a seed string (e.g. ``"1732700000-17"``): deterministic across runs."""
    return generate_case(random.Random(seed), seed, **knobs_for_seed(seed))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.stderr.write("usage: gen_dumpfile.py SEED [OUT]\n")
        sys.exit(2)
    case = case_for_seed(sys.argv[1])
    env = "CFS_PARSE_STRICT=1 " if case.strict else ""
    sys.stderr.write(
        f"{env}mkcomposefs {' '.join(case.args)} --from-file DUMP IMAGE  # mutation: {case.mutation}\n"
    )
    if len(sys.argv) == 3:
        with open(sys.argv[2], "wb") as fh:
            fh.write(case.dump)
    else:
        sys.stdout.buffer.write(case.dump)
