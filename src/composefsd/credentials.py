"""Acting with a caller's rights: whose files a worker process may read.

composefsd runs as root, but a caller other than root must get through it exactly
the files it could open itself. So every access to such a caller's source tree
happens in a worker process that carries the caller's credentials while it does:

* :func:`drop_to` for a process that only reads (the delegated scan): its real,
  effective and saved ids and its groups become the caller's for good, which also
  clears every capability. The kernel marks a process whose ids changed
  non-dumpable, so the caller cannot ptrace it, nor read or write its memory or
  fds through ``/proc``; and it never ``exec``\\ s afterwards, which would undo that.
* :func:`acting_as` for a process that reads as the caller and writes the
  repository as root (an import worker): only the *effective* ids and the groups
  are switched around each batch of opens, the real and saved ids stay 0. With
  an effective uid other than 0 the kernel clears the effective capabilities, so
  permission checks (DAC, ACLs, the ``trusted.*`` xattrs that need
  CAP_SYS_ADMIN) are the caller's; and with real and saved uid 0 the caller can
  neither signal nor ptrace the process meanwhile.

Both change the whole process (glibc applies them to every thread), so they are
only for single-threaded worker processes: :func:`acting_as` refuses to run in a
process with other threads.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Credentials", "CredentialsError", "acting_as", "drop_to"]


@dataclass(slots=True, frozen=True)
class Credentials:
    """Whose rights to read with: uid, primary gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def to_wire(self) -> tuple[int, int, tuple[int, ...]]:
        return self.uid, self.gid, self.groups

    @classmethod
    def from_wire(cls, wire: tuple[int, int, tuple[int, ...]]) -> Credentials:
        uid, gid, groups = wire
        return cls(int(uid), int(gid), tuple(int(g) for g in groups))


class CredentialsError(OSError):
    """The process cannot take on (or give up) the credentials asked for."""


def _fail(what: str, exc: OSError) -> CredentialsError:
    return CredentialsError(exc.errno or errno.EPERM, f"cannot {what}: {exc.strerror or exc}")


def drop_to(creds: Credentials) -> None:
    """Become ``creds`` for good (module notes); raises :class:`CredentialsError`."""
    try:
        os.setgroups(list(creds.groups))
        os.setresgid(creds.gid, creds.gid, creds.gid)
        os.setresuid(creds.uid, creds.uid, creds.uid)
    except OSError as exc:
        raise _fail(f"switch to uid {creds.uid} and gid {creds.gid}", exc) from exc
    if creds.uid != 0:
        # Prove it cannot be undone: regaining root must fail.
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise CredentialsError(errno.EPERM, "dropped credentials could be regained")


@contextmanager
def acting_as(creds: Credentials | None) -> Iterator[None]:
    """Run the body with ``creds``'s effective ids and groups (module notes);
    None runs it unchanged. Restores root's (the process's real ids) afterwards."""
    if creds is None:
        yield
        return
    if threading.active_count() != 1:
        raise CredentialsError(
            errno.EDEADLK, "switching credentials in a process with several threads"
        )
    saved_groups = os.getgroups()
    euid = os.geteuid()
    egid = os.getegid()
    try:
        os.setgroups(list(creds.groups))
        os.setresgid(-1, creds.gid, -1)
        os.setresuid(-1, creds.uid, -1)
    except OSError as exc:
        _restore(euid, egid, saved_groups)
        raise _fail(f"act as uid {creds.uid} and gid {creds.gid}", exc) from exc
    try:
        yield
    finally:
        _restore(euid, egid, saved_groups)


def _restore(euid: int, egid: int, groups: list[int]) -> None:
    # The uid first: the group calls need the capabilities it brings back.
    os.setresuid(-1, euid, -1)
    os.setresgid(-1, egid, -1)
    os.setgroups(groups)
