"""Source trees for tests: the one home of the builders test modules share.

* ``random_tree``: files ``d<i % dirs>/f<i>`` of seeded random bytes and a symlink, the small
  trees the service, CLI and repository tests import; each caller's knobs keep its tree as it
  was (the same random draws in the same order).
* ``write_tree``: given contents (and symlinks) at given paths.
* ``small_tree``: the daemon tests' tree (``random_tree`` plus a file with a fixed mtime).
* ``scanner_tree``: everything the scanner reads (xattrs of every namespace, devices,
  whiteouts, odd names, extreme mtimes and ids); ``private_tmpfs`` gives it room.
* ``app_tree``: a small tree with one of everything, for the mount tests.

Random trees with every feature, for differential tests, are ``gen_tree.generate_tree``.
"""

from __future__ import annotations

import os
import random
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

DEFAULT_SIZES = (0, 10, 100, 5000, 70000)


def random_files(
    root: Path,
    *,
    seed: int | random.Random = 1,
    files: int = 12,
    dirs: int = 3,
    sizes: int | Sequence[int] = DEFAULT_SIZES,
    link: str | None = "d0/f0",
) -> list[Path]:
    """Write ``files`` files ``root/d<i % dirs>/f<i>`` and return them in order; ``link``
    (unless None) is a symlink ``root/link`` to it.

    ``sizes`` is every file's size, or the sizes each file's is drawn from with
    ``rng.choice`` (a ``range`` draws exactly as ``rng.randrange`` over it would). ``seed``
    may be a ``Random`` the caller goes on using.
    """
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    written = []
    for i in range(files):
        path = root / f"d{i % dirs}" / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        # A fixed size must not draw: that would shift every later draw.
        size = sizes if isinstance(sizes, int) else rng.choice(sizes)
        path.write_bytes(rng.randbytes(size))
        written.append(path)
    if link is not None:
        (root / "link").symlink_to(link)
    return written


def random_tree(
    root: Path,
    *,
    seed: int | random.Random = 1,
    files: int = 12,
    dirs: int = 3,
    sizes: int | Sequence[int] = DEFAULT_SIZES,
    link: str | None = "d0/f0",
) -> Path:
    """``random_files``, returning ``root``."""
    random_files(root, seed=seed, files=files, dirs=dirs, sizes=sizes, link=link)
    return root


def small_tree(root: Path, files: int = 12, seed: int = 1) -> Path:
    """A small tree with a few distinct contents, a symlink and a fixed mtime."""
    random_tree(root, seed=seed, files=files)
    (root / "hello").write_text("hello from composefs\n")
    os.utime(root / "hello", (1_000_000, 1_000_000))
    return root


def write_tree(
    root: Path, files: Mapping[str, bytes], symlinks: Mapping[str, str] | None = None
) -> None:
    """Each ``files`` path (relative to ``root``) with its content, then each ``symlinks``
    path pointing to its target."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for rel, target in (symlinks or {}).items():
        (root / rel).symlink_to(target)


_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in (
        (1, 6, 0xFFFFFFFF),
        (2, 4, 1000),
        (4, 4, 0xFFFFFFFF),
        (16, 6, 0xFFFFFFFF),
        (32, 4, 0xFFFFFFFF),
    )
)
ODD_NAMES = [
    b"new\nline",
    b"sp ace",
    b"back\\slash",
    b"\xff\xfe\x80",
    b"tab\there",
    b"-",
    b"=eq=",
    b"\x01ctl\x7f",
    "é✓".encode(),
    b"n" * 255,
    b"x" * 254 + b"\xff",
]


def write_file(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def set_xattr(path: bytes, key: bytes, value: bytes) -> None:
    os.setxattr(path, key, value, follow_symlinks=False)


def scanner_tree(root: bytes, *, big_xattrs: bool = True, seed: int = 1) -> None:
    """A deterministic tree exercising everything the scanner reads (needs root).

    ``big_xattrs`` needs a filesystem with room for 64 KiB of xattrs per inode (tmpfs).
    """
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)

    def j(*parts: bytes) -> bytes:
        return b"/".join((root, *parts))

    # Regular files around every size boundary that matters.
    for size in (0, 1, 2, 63, 64, 65, 4095, 4096, 4097, 8192, 65537, 1048583):
        write_file(j(b"f%d" % size), rng.randbytes(size))
    write_file(j(b"zeros"), bytes(200_000))
    shared = rng.randbytes(3000)
    for name in (b"dup-a", b"dup-b", b"dup-c"):  # one store object for three files
        write_file(j(name), shared)
    write_file(j(b"tiny-a"), b"same\n")
    write_file(j(b"tiny-b"), b"same\n")
    os.link(j(b"dup-a"), j(b"hardlink-to-dup-a"))
    os.link(j(b"f65"), j(b"hardlink-to-f65"))
    # A directory big enough for several 4 KiB dirent blocks.
    os.mkdir(j(b"many"))
    for i in range(400):
        write_file(j(b"many", b"entry-with-a-longish-name-%04d" % i), b"%d" % i if i % 3 else b"")
    # Symlinks: short, the longest possible, dangling, to a directory, odd bytes.
    os.mkdir(j(b"links"))
    os.symlink(b"../f64", j(b"links", b"short"))
    os.symlink(b"t" * 4095, j(b"links", b"longest"))
    os.symlink(b"a/" * 1000 + b"end", j(b"links", b"long-path"))
    os.symlink(b"/nonexistent/target", j(b"links", b"dangling"))
    os.symlink(b"../many", j(b"links", b"to-dir"))
    os.symlink(b"\xff\n odd", j(b"links", b"odd-target"))
    # Special files.
    os.mkdir(j(b"dev"))
    os.mkfifo(j(b"dev", b"fifo"))
    os.mknod(j(b"dev", b"null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(j(b"dev", b"loop"), stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mknod(j(b"dev", b"bigdev"), stat.S_IFCHR | 0o600, os.makedev(4095, 1048575))
    os.mknod(j(b"dev", b"sock"), stat.S_IFSOCK | 0o755)
    os.mknod(j(b"whiteout"), stat.S_IFCHR, os.makedev(0, 0))
    os.mknod(j(b"dev", b"whiteout2"), stat.S_IFCHR | 0o644, os.makedev(0, 0))
    # Odd names.
    os.mkdir(j(b"names"))
    for name in ODD_NAMES:
        write_file(j(b"names", name), name)
    os.mkdir(j(b"names", b"sub dir\n"))
    write_file(j(b"names", b"sub dir\n", b"\xff"), b"z" * 100)
    # Nesting.
    deep = j(b"deep")
    os.mkdir(deep)
    for level in range(12):
        deep += b"/d%d" % level
        os.mkdir(deep)
    write_file(deep + b"/leaf", b"leaf" * 50)
    os.mkdir(j(b"emptydir"))
    # Xattrs: user/trusted/security, overlay ones (escaped by the writer), shared values.
    set_xattr(j(b"f1"), b"user.small", b"v")
    set_xattr(j(b"f1"), b"trusted.t", b"trusted-value")
    set_xattr(j(b"f1"), b"security.s", b"sec")
    set_xattr(j(b"f4096"), b"user.shared", b"shared-value")
    set_xattr(j(b"f4097"), b"user.shared", b"shared-value")
    set_xattr(j(b"dup-b"), b"user.shared", b"shared-value")
    set_xattr(j(b"f65"), b"trusted.overlay.redirect", b"/somewhere")
    set_xattr(j(b"f65"), b"user.overlay.origin", b"o")
    set_xattr(j(b"many"), b"trusted.overlay.opaque", b"y")
    set_xattr(j(b"dev", b"fifo"), b"trusted.on-fifo", b"\x00\x01\x02")
    set_xattr(j(b"dev", b"null"), b"trusted.on-dev", b"d")
    set_xattr(j(b"links", b"short"), b"trusted.on-symlink", b"s")
    set_xattr(j(b"links", b"short"), b"security.on-symlink", b"s2")
    set_xattr(j(b"names", b"\xff\xfe\x80"), b"user.odd\xff=key", b"val\n=ue")
    set_xattr(j(b"emptydir"), b"system.posix_acl_default", _ACL)
    set_xattr(j(b"f2"), b"system.posix_acl_access", _ACL)
    set_xattr(root, b"user.root-xattr", b"r")
    set_xattr(j(b"f63"), b"user.empty-value", b"")
    if big_xattrs:
        set_xattr(j(b"f8192"), b"user.big", rng.randbytes(20_000))
        set_xattr(j(b"f8192"), b"trusted.big", rng.randbytes(12_000))
        big_shared = rng.randbytes(6000)
        set_xattr(j(b"f65537"), b"user.bigshared", big_shared)
        set_xattr(j(b"f1048583"), b"user.bigshared", big_shared)
        for i in range(40):
            set_xattr(j(b"f0"), b"user.many-%02d" % i, b"value-%d" % (i % 7))
    # Ownership, modes and times last (children before parents: creating entries
    # touches the parent's mtime).
    ids = [0, 1, 1000, 65535, 65536, 70000, 100_000, 2**31 + 5, 4_294_967_294]
    mtimes = [
        1_700_000_000_123_456_789,
        -12_345_678_900_000_001,
        (2**32 + 17) * 10**9 + 999_999_999,
        0,
        1,
        -1,
        5_000_000_000_000_000_000,
    ]
    modes = [0o644, 0o600, 0o4755, 0o2711, 0o1777, 0o000, 0o7777, 0o444]
    everything: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(root):
        everything.extend(os.path.join(dirpath, n) for n in dirnames + filenames)
    everything.sort(key=lambda p: -p.count(b"/"))
    for i, path in enumerate([*everything, root]):
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
        os.lchown(path, ids[i % len(ids)], ids[(i * 5 + 3) % len(ids)])
        if not is_link and i % 4 == 0 and not os.path.isdir(path):
            os.chmod(path, modes[i % len(modes)])
        os.utime(path, ns=(0, mtimes[i % len(mtimes)]), follow_symlinks=False)


def private_tmpfs(prefix: str) -> Iterator[Path]:
    """A private tmpfs (room for big xattrs); a plain temp dir if mounting is impossible."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(base)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield base
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(base)], check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def app_tree(src: Path) -> None:
    """A small tree with one of everything: xattrs, a hardlink, devices, whiteouts,
    owners beyond 16 bits, fixed modes and nanosecond mtimes (needs root)."""
    rng = random.Random(4)
    (src / "sub").mkdir(parents=True)
    (src / "hello").write_bytes(rng.randbytes(5000))
    os.setxattr(src / "hello", b"user.test", b"value")
    (src / "inline").write_bytes(b"tiny\n")
    (src / "big").write_bytes(rng.randbytes(300_000))
    (src / "sub" / "deep").write_bytes(rng.randbytes(7000))
    (src / "sub" / "empty").write_bytes(b"")
    (src / "link").symlink_to("hello")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "loopdev", stat.S_IFBLK | 0o660, os.makedev(7, 200))
    os.mknod(src / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(src / "sub" / "gone2", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    os.link(src / "hello", src / "hello-hard")
    for name, uid, gid, mode in [
        ("hello", 1000, 2000, 0o640),
        ("big", 0, 0, 0o644),
        # Unmapped by the idmap tests' 0:100000:65536, so shown as the overflow id
        # (readable by all: root has no DAC override on an unmapped owner's file).
        ("sub/deep", 70000, 80000, 0o644),
        ("sub", 3, 4, 0o750),
        ("null", 0, 5, 0o666),  # mknod applies the umask
        ("loopdev", 0, 6, 0o660),
    ]:
        os.lchown(src / name, uid, gid)
        if mode is not None:
            os.chmod(src / name, mode)
    for path in sorted(src.rglob("*"), key=lambda p: -len(p.parts)):
        os.utime(path, ns=(1_600_000_000_123_456_789,) * 2, follow_symlinks=False)
    os.utime(src, ns=(1_700_000_000_000_000_001,) * 2)
