"""Raw Linux calls through ctypes: the new mount API, umount2, unshare, loop ioctls.

This module and its siblings in :mod:`composefsd.kernel` are the only places in
composefsd that call ctypes. Every wrapper raises :class:`KernelError` (an
``OSError``) carrying the errno and, for calls on an fs-context fd, the lines the
kernel logged there ("overlay: Unknown parameter 'x'"), because the errno alone
(usually EINVAL) says nothing about which option the kernel disliked.

Syscall numbers come from a per-architecture table rather than from glibc
wrappers: Debian 12's glibc has ``fsopen`` and friends, but older distributions
and musl do not, and the numbers are stable ABI.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AT_EMPTY_PATH",
    "AT_FDCWD",
    "AT_RECURSIVE",
    "FSCONFIG_CMD_CREATE",
    "FSCONFIG_SET_FD",
    "FSCONFIG_SET_FLAG",
    "FSCONFIG_SET_STRING",
    "MNT_DETACH",
    "MOUNT_ATTR_IDMAP",
    "MOUNT_ATTR_RDONLY",
    "OPEN_TREE_CLONE",
    "UMOUNT_NOFOLLOW",
    "FsContext",
    "KernelError",
    "SyscallTable",
    "fsmount",
    "ioctl_int",
    "ioctl_ptr",
    "mount_root_id",
    "mount_setattr_idmap",
    "move_mount",
    "open_tree",
    "syscall_table",
    "umount2",
    "unique_mount_id",
    "unshare",
]

AT_FDCWD: Final = -100
AT_SYMLINK_NOFOLLOW: Final = 0x100
AT_NO_AUTOMOUNT: Final = 0x800
AT_EMPTY_PATH: Final = 0x1000
AT_RECURSIVE: Final = 0x8000

FSOPEN_CLOEXEC: Final = 0x1
FSMOUNT_CLOEXEC: Final = 0x1

FSCONFIG_SET_FLAG: Final = 0
FSCONFIG_SET_STRING: Final = 1
FSCONFIG_SET_FD: Final = 5
FSCONFIG_CMD_CREATE: Final = 6

MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_IDMAP: Final = 0x100000

MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4

OPEN_TREE_CLONE: Final = 0x1
OPEN_TREE_CLOEXEC: Final = os.O_CLOEXEC

MNT_FORCE: Final = 0x1
MNT_DETACH: Final = 0x2
UMOUNT_NOFOLLOW: Final = 0x8

CLONE_FS: Final = 0x00000200
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUSER: Final = 0x10000000

STATX_MNT_ID: Final = 0x1000
STATX_MNT_ID_UNIQUE: Final = 0x4000
STATX_ATTR_MOUNT_ROOT: Final = 0x2000


@dataclass(slots=True, frozen=True)
class SyscallTable:
    """Syscall numbers of one architecture."""

    arch: str
    open_tree: int
    move_mount: int
    fsopen: int
    fsconfig: int
    fsmount: int
    mount_setattr: int
    umount2: int
    unshare: int


# The mount API numbers (424+) are shared by every architecture but alpha, ia64
# and mips; umount2 and unshare differ between x86_64 and the generic table
# (asm-generic/unistd.h) that aarch64 and riscv64 use.
_TABLES: Final = {
    "x86_64": SyscallTable("x86_64", 428, 429, 430, 431, 432, 442, 166, 272),
    "aarch64": SyscallTable("aarch64", 428, 429, 430, 431, 432, 442, 39, 97),
    "riscv64": SyscallTable("riscv64", 428, 429, 430, 431, 432, 442, 39, 97),
}
_ALIASES: Final = {"amd64": "x86_64", "arm64": "aarch64"}


def syscall_table(machine: str | None = None) -> SyscallTable:
    """The table for ``machine`` (default: this one, from ``uname -m``)."""
    name = (machine or os.uname().machine).lower()
    name = _ALIASES.get(name, name)
    try:
        return _TABLES[name]
    except KeyError:
        raise OSError(
            errno.ENOSYS, f"composefsd does not know the syscall numbers of architecture {name!r}"
        ) from None


class KernelError(OSError):
    """A raw call failed: ``errno``/``strerror`` as usual, ``call`` names it, and
    ``log`` holds what the kernel wrote to the fs context (may be empty)."""

    def __init__(self, err: int, call: str, *, log: list[str] | None = None) -> None:
        super().__init__(err, os.strerror(err))
        self.call = call
        self.log: list[str] = list(log or ())

    def __str__(self) -> str:
        text = f"{self.call}: {self.strerror}"
        if self.log:
            text += " (kernel: " + "; ".join(self.log) + ")"
        return text


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_SYS = syscall_table()


def _check(result: int, call: str, log: list[str] | None = None) -> int:
    if result < 0:
        raise KernelError(ctypes.get_errno(), call, log=log)
    return result


def _path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> bytes:
    return os.fsencode(path)


class FsContext:
    """An fs-context fd from ``fsopen``: configure it, create the superblock, mount it.

    Failing calls attach the kernel's log lines to the raised :class:`KernelError`.
    Use as a context manager, or call :meth:`close`.
    """

    __slots__ = ("fd", "fstype", "log")

    def __init__(self, fstype: str) -> None:
        self.fstype = fstype
        #: Every message the kernel logged on this context, in order.
        self.log: list[str] = []
        self.fd = -1
        fd = _syscall(
            ctypes.c_long(_SYS.fsopen),
            ctypes.c_char_p(fstype.encode()),
            ctypes.c_uint(FSOPEN_CLOEXEC),
        )
        self.fd = _check(fd, f"fsopen({fstype})")

    def __enter__(self) -> FsContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def drain_log(self) -> list[str]:
        """Read the messages queued on the context since the last drain."""
        new: list[str] = []
        while self.fd >= 0:
            try:
                raw = os.read(self.fd, 4096)
            except OSError:
                # ENODATA: the queue is empty.
                break
            if not raw:
                break
            text = raw.decode("utf-8", "replace").rstrip("\n")
            # Each message starts with its level: "e ", "w " or "i ".
            if len(text) > 2 and text[1] == " " and text[0] in "ewi":
                text = text[2:]
            new.append(text)
        self.log.extend(new)
        return new

    def _config(
        self, cmd: int, key: bytes | None, value: bytes | None, aux: int, what: str
    ) -> None:
        res = _syscall(
            ctypes.c_long(_SYS.fsconfig),
            ctypes.c_int(self.fd),
            ctypes.c_uint(cmd),
            ctypes.c_char_p(key),
            ctypes.c_char_p(value),
            ctypes.c_int(aux),
        )
        if res < 0:
            err = ctypes.get_errno()
            raise KernelError(err, f"fsconfig({self.fstype}, {what})", log=self.drain_log())

    def set_flag(self, key: str) -> None:
        self._config(FSCONFIG_SET_FLAG, key.encode(), None, 0, key)

    def set_string(self, key: str, value: str | bytes) -> None:
        raw = value if isinstance(value, bytes) else os.fsencode(value)
        self._config(FSCONFIG_SET_STRING, key.encode(), raw, 0, f"{key}={os.fsdecode(raw)}")

    def set_fd(self, key: str, fd: int) -> None:
        self._config(FSCONFIG_SET_FD, key.encode(), None, fd, f"{key}=fd {fd}")

    def create(self) -> None:
        self._config(FSCONFIG_CMD_CREATE, None, None, 0, "create")

    def mount(self, attr_flags: int = 0) -> int:
        """``fsmount``: a detached mount fd (close-on-exec) of the created superblock."""
        res = _syscall(
            ctypes.c_long(_SYS.fsmount),
            ctypes.c_int(self.fd),
            ctypes.c_uint(FSMOUNT_CLOEXEC),
            ctypes.c_uint(attr_flags),
        )
        if res < 0:
            err = ctypes.get_errno()
            raise KernelError(err, f"fsmount({self.fstype})", log=self.drain_log())
        return int(res)


def fsmount(ctx: FsContext, attr_flags: int = 0) -> int:
    return ctx.mount(attr_flags)


def move_mount(
    from_fd: int,
    to_path: str | os.PathLike[str],
    *,
    to_dirfd: int = AT_FDCWD,
) -> None:
    """Attach the detached mount ``from_fd`` at ``to_path`` (relative to ``to_dirfd``)."""
    res = _syscall(
        ctypes.c_long(_SYS.move_mount),
        ctypes.c_int(from_fd),
        ctypes.c_char_p(b""),
        ctypes.c_int(to_dirfd),
        ctypes.c_char_p(_path(to_path)),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
    _check(res, f"move_mount(to {os.fspath(to_path)})")


def open_tree(
    path: str | os.PathLike[str], flags: int = OPEN_TREE_CLONE, *, dirfd: int = AT_FDCWD
) -> int:
    """``open_tree``: with OPEN_TREE_CLONE, a detached copy of the mount at ``path``."""
    res = _syscall(
        ctypes.c_long(_SYS.open_tree),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(_path(path)),
        ctypes.c_uint(flags | OPEN_TREE_CLOEXEC),
    )
    return _check(res, f"open_tree({os.fspath(path)})")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr_idmap(mount_fd: int, userns_fd: int) -> None:
    """Make the detached mount ``mount_fd`` idmapped through the user namespace ``userns_fd``."""
    attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    res = _syscall(
        ctypes.c_long(_SYS.mount_setattr),
        ctypes.c_int(mount_fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(res, "mount_setattr(MOUNT_ATTR_IDMAP)")


def umount2(path: str | os.PathLike[str], flags: int = 0) -> None:
    res = _syscall(ctypes.c_long(_SYS.umount2), ctypes.c_char_p(_path(path)), ctypes.c_int(flags))
    _check(res, f"umount2({os.fspath(path)})")


def unshare(flags: int) -> None:
    res = _syscall(ctypes.c_long(_SYS.unshare), ctypes.c_int(flags))
    _check(res, f"unshare(0x{flags:x})")


def setns(fd: int, nstype: int) -> None:
    """``setns(2)`` (glibc's; Python's os.setns is 3.12's)."""
    res = _libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype))
    _check(res, f"setns(0x{nstype:x})")


_PR_SET_PDEATHSIG: Final = 1


def set_parent_death_signal(signum: int) -> None:
    """``prctl(PR_SET_PDEATHSIG)``: this process gets ``signum`` when its parent
    (the thread that forked it) ends."""
    res = _libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signum))
    _check(res, "prctl(PR_SET_PDEATHSIG)")


_PR_SET_DUMPABLE: Final = 4


def set_dumpable(dumpable: bool) -> None:
    """``prctl(PR_SET_DUMPABLE)`` for this process."""
    res = _libc.prctl(ctypes.c_int(_PR_SET_DUMPABLE), ctypes.c_ulong(int(dumpable)))
    _check(res, "prctl(PR_SET_DUMPABLE)")


def ioctl_int(fd: int, request: int, arg: int, what: str) -> int:
    """An ioctl whose argument is an integer; returns the ioctl's result."""
    res = _ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_long(arg))
    return _check(res, what)


def ioctl_ptr(fd: int, request: int, arg: ctypes.Structure, what: str) -> int:
    """An ioctl whose argument is a pointer to ``arg``."""
    res = _ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.byref(arg))
    return _check(res, what)


class _Statx(ctypes.Structure):
    # struct statx is 256 bytes; only stx_mask (offset 0), stx_attributes (0x08),
    # stx_attributes_mask (0x38) and stx_mnt_id (0x90) are read.
    _fields_ = [
        ("stx_mask", ctypes.c_uint32),
        ("_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("_nlink_to_blocks", ctypes.c_uint8 * 0x28),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("_times_devs", ctypes.c_uint8 * 0x50),
        ("stx_mnt_id", ctypes.c_uint64),
        ("_tail", ctypes.c_uint8 * 0x68),
    ]


_statx = getattr(_libc, "statx", None)


def unique_mount_id(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> int | None:
    """The 64-bit id of the mount ``path`` (followed) is on, which the kernel never
    hands out again (``STATX_MNT_ID_UNIQUE``, Linux 6.8); None where the kernel or
    the C library cannot tell it. The ``mnt_id`` of fdinfo and mountinfo is reused
    as soon as its mount is freed, so only this one identifies a mount over time.
    Raises :class:`KernelError` if ``path`` cannot be looked at."""
    if _statx is None:
        return None
    buf = _Statx()
    res = _statx(
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(_path(path)),
        ctypes.c_int(0),
        ctypes.c_uint(STATX_MNT_ID_UNIQUE),
        ctypes.byref(buf),
    )
    _check(res, f"statx({os.fsdecode(_path(path))})")
    return int(buf.stx_mnt_id) if buf.stx_mask & STATX_MNT_ID_UNIQUE else None


def mount_root_id(dir_fd: int, name: str) -> int | None:
    """The mount id (mountinfo's first field, ``STATX_MNT_ID``) of the mount whose
    root ``name`` in the directory ``dir_fd`` is: the topmost one stacked there;
    None if ``name`` is no mount's root (a symlink there is not followed). Raises
    :class:`KernelError` if ``name`` cannot be looked at, or with ENOSYS where the
    kernel (before 5.8) or the C library cannot tell mount roots and ids."""
    if _statx is None:
        raise KernelError(errno.ENOSYS, "statx")
    if not name or "/" in name or "\0" in name:  # one name, which C would cut at a NUL
        raise KernelError(errno.EINVAL, f"statx({name!r})")
    buf = _Statx()
    res = _statx(
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(_path(name)),
        ctypes.c_int(AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT),
        ctypes.c_uint(STATX_MNT_ID),
        ctypes.byref(buf),
    )
    _check(res, f"statx({name})")
    if not (buf.stx_mask & STATX_MNT_ID and buf.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT):
        raise KernelError(errno.ENOSYS, f"statx({name}): no mount id or mount root attribute")
    return int(buf.stx_mnt_id) if buf.stx_attributes & STATX_ATTR_MOUNT_ROOT else None
