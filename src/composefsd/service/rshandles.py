"""Repository handles of composefs-rs's Varlink interfaces (org.composefs.Repository
and org.composefs.Oci): ``OpenRepository`` returns an integer, later calls name the
repository by it.

cfsctl keeps one service-wide table numbered from 1, where a handle opened on one
connection works on every other. composefsd does the same with one restriction:
a handle belongs to the uid that opened it, and for any other uid it does not
exist (``InvalidHandle``), so one local user can neither use nor probe another's
repositories. Handles live until ``CloseRepository``; a uid may hold at most
:data:`MAX_HANDLES_PER_UID` of them, so that a client that never closes cannot
grow the table without bound.

Every handle on one repository directory shares one
:class:`~composefsd.repository.Repository` (found by the directory's device and
inode), and a handle on the daemon's own repository uses the daemon's object, so
its mounts are tracked and its GC keeps what is in use like
io.composefs.Repository's (``RepositoryHandle.own``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from composefsd.repository import Repository
from composefsd.service.context import VarlinkReplyError
from composefsd.service.methods import mapped_errors, reply_error

__all__ = [
    "MAX_HANDLES_PER_UID",
    "HandleTable",
    "MountFdsError",
    "RepositoryHandle",
    "TooManyHandlesError",
    "UnknownHandleError",
    "rs_errors",
]

#: Handles one uid may hold at once (cfsctl's clients open a few).
MAX_HANDLES_PER_UID: Final = 64


class UnknownHandleError(Exception):
    """The handle was never issued, is closed, or belongs to another uid."""

    def __init__(self, handle: int) -> None:
        super().__init__(f"no open repository has handle {handle}")
        self.handle = handle


class TooManyHandlesError(Exception):
    """The uid holds :data:`MAX_HANDLES_PER_UID` handles already."""

    def __init__(self, uid: int, limit: int) -> None:
        super().__init__(
            f"uid {uid} holds {limit} open repository handles already; "
            "close some with CloseRepository"
        )
        self.uid = uid
        self.limit = limit


class MountFdsError(Exception):
    """A Mount call carries another number of fds than its options want (cfsctl's
    Mount: InvalidSpec; its OciMount: InternalError)."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"Mount expects {expected} fds for the requested options, got {got}")
        self.expected = expected
        self.got = got


@dataclass(slots=True, frozen=True)
class RepositoryHandle:
    """One open handle."""

    handle: int
    repo: Repository
    #: The uid that opened it; the only one that may use it.
    uid: int
    #: Whether ``repo`` is the daemon's own repository.
    own: bool


def _identity(path: str | os.PathLike[str]) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class HandleTable:
    """The service-wide table (module notes). Thread-safe: methods run in workers."""

    def __init__(self, own: Repository, *, max_per_uid: int = MAX_HANDLES_PER_UID) -> None:
        self.own = own
        self.max_per_uid = max_per_uid
        self._lock = threading.Lock()
        self._next = 1
        self._handles: dict[int, RepositoryHandle] = {}

    def is_own(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is the daemon's repository directory (same inode)."""
        try:
            return _identity(path) == _identity(self.own.path)
        except OSError:
            return False

    def shared(self, repo: Repository) -> Repository:
        """The Repository object handles already use for ``repo``'s directory (the
        daemon's own one included), else ``repo`` itself."""
        try:
            ident = _identity(repo.path)
        except OSError:
            return repo
        candidates = [self.own]
        with self._lock:
            candidates += [h.repo for h in self._handles.values()]
        for other in candidates:
            try:
                if _identity(other.path) == ident:
                    return other
            except OSError:
                continue
        return repo

    def open(self, repo: Repository, uid: int) -> RepositoryHandle:
        """A new handle on ``repo`` (or the object already shared for its directory)
        for ``uid``. TooManyHandlesError past the per-uid limit."""
        repo = self.shared(repo)
        own = repo is self.own
        with self._lock:
            held = sum(1 for h in self._handles.values() if h.uid == uid)
            if held >= self.max_per_uid:
                raise TooManyHandlesError(uid, self.max_per_uid)
            entry = RepositoryHandle(self._next, repo, uid, own)
            self._handles[entry.handle] = entry
            self._next += 1
        return entry

    def get(self, handle: int, uid: int) -> RepositoryHandle:
        """The handle ``uid`` opened; UnknownHandleError otherwise."""
        with self._lock:
            entry = self._handles.get(handle)
        if entry is None or entry.uid != uid:
            raise UnknownHandleError(handle)
        return entry

    def close(self, handle: int, uid: int) -> None:
        """Forget a handle ``uid`` opened; UnknownHandleError otherwise."""
        with self._lock:
            entry = self._handles.get(handle)
            if entry is None or entry.uid != uid:
                raise UnknownHandleError(handle)
            del self._handles[handle]

    def count(self, uid: int | None = None) -> int:
        """Open handles (of ``uid``, or all)."""
        with self._lock:
            return sum(1 for h in self._handles.values() if uid is None or h.uid == uid)


def _rs_error(interface: str, exc: Exception) -> VarlinkReplyError | None:
    if isinstance(exc, VarlinkReplyError):
        if exc.name.startswith(("org.varlink.service.", interface + ".")):
            return exc
        # An io.composefs error from work delegated to our own interfaces: the
        # composefs-rs interfaces have no name for it but InternalError.
        message = exc.parameters.get("message")
        text = f"{exc.name.rsplit('.', 1)[-1]}: {message}" if message else exc.name
        return VarlinkReplyError(f"{interface}.InternalError", {"message": text})
    if isinstance(exc, UnknownHandleError):
        return VarlinkReplyError(f"{interface}.InvalidHandle", {"handle": exc.handle})
    if isinstance(exc, TooManyHandlesError | MountFdsError):
        return VarlinkReplyError(f"{interface}.InternalError", {"message": str(exc)})
    ours = reply_error(exc)
    if ours is None:
        return None
    return _rs_error(interface, ours)


@contextlib.contextmanager
def rs_errors(interface: str) -> Iterator[None]:
    """Inside, every error of the repository and kernel layers (and of io.composefs's
    interfaces, worked through) becomes ``interface``'s: InvalidHandle for an unknown
    handle, InternalError with the message for the rest, as cfsctl answers what it
    has no error for. Its own errors and org.varlink.service's pass as they are."""
    with mapped_errors(lambda exc: _rs_error(interface, exc)):
        yield
