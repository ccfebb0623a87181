"""User namespaces for idmapped mounts, made from a uid/gid mapping.

``mount_setattr(MOUNT_ATTR_IDMAP)`` takes a user-namespace fd, not a mapping. To
turn a mapping into such an fd we fork a helper child that unshares a new user
namespace and waits; we write its ``uid_map``/``gid_map`` from the parent (which,
as root in the parent namespace, may map any ids), open ``/proc/PID/ns/user`` and
let the child exit. The namespace lives on as long as the fd does.

The child runs only ``unshare`` and two pipe operations before ``_exit``, which
keeps fork safe in a threaded process.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from composefsd.kernel.syscalls import (
    CLONE_NEWNS,
    CLONE_NEWUSER,
    KernelError,
    set_dumpable,
    setns,
    unshare,
)

__all__ = [
    "IdMapping",
    "create_userns",
    "enter_own_namespaces",
    "enter_userns_with_own_mounts",
    "format_mapping",
    "parse_mapping",
]

# The kernel accepts at most 340 lines per map.
_MAX_LINES: Final = 340
_ID_LIMIT: Final = 1 << 32


@dataclass(slots=True, frozen=True)
class IdMapping:
    """One line of a uid_map or gid_map: ``count`` ids from ``inside`` map to ``outside``."""

    inside: int
    outside: int
    count: int

    def __post_init__(self) -> None:
        for name in ("inside", "outside", "count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _ID_LIMIT:
                raise ValueError(
                    f"id mapping {name} must be an integer in 0..4294967295, got {value!r}"
                )
        if self.count == 0:
            raise ValueError("id mapping count must be at least 1")
        if self.inside + self.count > _ID_LIMIT or self.outside + self.count > _ID_LIMIT:
            raise ValueError(f"id mapping {self.inside} {self.outside} {self.count} runs past 2^32")


def parse_mapping(text: str) -> list[IdMapping]:
    """Parse "INSIDE:OUTSIDE:COUNT[,…]" (also accepting spaces as in /proc maps)."""
    result = []
    for part in text.replace("\n", ",").split(","):
        fields = part.replace(":", " ").split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"id mapping {part.strip()!r} is not INSIDE:OUTSIDE:COUNT")
        try:
            inside, outside, count = (int(f, 10) for f in fields)
        except ValueError:
            raise ValueError(f"id mapping {part.strip()!r} is not INSIDE:OUTSIDE:COUNT") from None
        result.append(IdMapping(inside, outside, count))
    if not result:
        raise ValueError("id mapping is empty")
    return result


def format_mapping(mapping: Sequence[IdMapping]) -> str:
    return "".join(f"{m.inside} {m.outside} {m.count}\n" for m in mapping)


def _check_mapping(mapping: Sequence[IdMapping], what: str) -> None:
    if not mapping:
        raise ValueError(f"{what} mapping is empty")
    if len(mapping) > _MAX_LINES:
        raise ValueError(
            f"{what} mapping has {len(mapping)} ranges, the kernel allows {_MAX_LINES}"
        )
    for side in ("inside", "outside"):
        ranges = sorted((getattr(m, side), getattr(m, side) + m.count) for m in mapping)
        for (_, end), (start, _) in itertools.pairwise(ranges):
            if start < end:
                raise ValueError(f"{what} mapping has overlapping {side} ranges")


def create_userns(uid_map: Sequence[IdMapping], gid_map: Sequence[IdMapping] | None = None) -> int:
    """A new user namespace with these maps; returns an O_RDONLY fd on it.

    ``gid_map`` defaults to ``uid_map``. Raises ``ValueError`` for a malformed
    mapping and :class:`KernelError` where the kernel refuses one.
    """
    gids = uid_map if gid_map is None else gid_map
    _check_mapping(uid_map, "uid")
    _check_mapping(gids, "gid")
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into Python code paths
        status = 0
        try:
            os.close(ready_r)
            os.close(hold_w)
            try:
                # The parent opens /proc/PID/ns/user, which needs ptrace access
                # unless this process is dumpable. A fork inherits the daemon's
                # flag, which the kernel clears whenever a thread changes its
                # fsuid (MountDumpfile's creator thread does): without
                # CAP_SYS_PTRACE (the shipped unit) every later open failed.
                set_dumpable(True)
                unshare(CLONE_NEWUSER)
                os.write(ready_w, b"\0")
            except OSError as e:
                os.write(ready_w, bytes([1, e.errno or errno.EPERM]))
                status = 1
            else:
                os.read(hold_r, 1)
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(hold_r)
    try:
        answer = os.read(ready_r, 2)
        if answer[:1] != b"\0":
            err = answer[1] if len(answer) > 1 else errno.EPERM
            raise KernelError(err, "unshare(CLONE_NEWUSER) in the idmap helper")
        _write_map(pid, "uid_map", uid_map)
        _write_map(pid, "gid_map", gids)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(hold_w)
        os.waitpid(pid, 0)


def _write_map(pid: int, name: str, mapping: Sequence[IdMapping]) -> None:
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, format_mapping(mapping).encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise KernelError(e.errno or errno.EINVAL, f"write /proc/PID/{name}") from None


def enter_own_namespaces(*, map_current_user: bool = False) -> int:
    """Move this (single-threaded) process into a new user namespace and a new mount
    namespace it owns, its uid and gid mapped to 0 inside as ``unshare -Urm`` does
    (with ``map_current_user``, to themselves, as ``unshare -cm``); returns an
    O_RDONLY fd on the new user namespace.

    Mounts copied into the new mount namespace become slaves of the old ones (the
    kernel's rule for a less privileged namespace), so nothing attached here shows
    outside. Raises :class:`KernelError` where the kernel refuses (user namespaces
    disabled, a threaded process).
    """
    uid, gid = os.geteuid(), os.getegid()
    inside_uid, inside_gid = (uid, gid) if map_current_user else (0, 0)
    unshare(CLONE_NEWUSER | CLONE_NEWNS)
    # setgroups must be denied before an unprivileged gid_map write (user_namespaces(7)).
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{inside_uid} {uid} 1"),
        ("gid_map", f"{inside_gid} {gid} 1"),
    ):
        try:
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as e:
            raise KernelError(e.errno or errno.EINVAL, f"write /proc/self/{name}") from None
    return os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC)


def enter_userns_with_own_mounts(userns_fd: int) -> None:
    """Move this (single-threaded) process into the user namespace ``userns_fd``
    (one its euid owns: entering gives it every capability there) and then into a
    new mount namespace owned by it, as ``nsenter -U`` and ``unshare -m`` would.
    Raises :class:`KernelError` where the kernel refuses."""
    setns(userns_fd, CLONE_NEWUSER)
    unshare(CLONE_NEWNS)
