"""The repository's lock discipline: writers and readers share, GC excludes.

Two ``flock(2)`` locks, both on directories of the repository, so that nothing
extra has to be created (a read-only repository can still be locked):

* the **lock** is the repository directory itself. Writers and readers hold it
  ``LOCK_SH`` for the whole operation; GC holds it ``LOCK_EX``. This is exactly
  what composefs-rs does (its ``Repository`` holds ``LOCK_SH`` on the directory
  while open and ``gc`` takes ``LOCK_EX``), so ``cfsctl`` and composefsd exclude
  each other's garbage collection correctly.
* the **turnstile** is the ``objects/`` directory. Every acquirer passes through
  it: writers and readers take it ``LOCK_EX``, take the lock ``LOCK_SH``, and let
  go of the turnstile at once; GC takes the turnstile ``LOCK_EX`` and *keeps* it
  while it waits for the lock ``LOCK_EX``, and until it is done.

Why this cannot starve or deadlock:

* A waiting GC holds the turnstile, so no new writer or reader can join the
  shared holders; GC waits only for the operations already running, which end.
  (With the directory lock alone, a steady stream of overlapping writers would
  keep a GC waiting forever.)
* Writers hold the turnstile only for the moment it takes to join the shared
  holders, and GC only for its own run, so writers wait at most for one GC.
* The order is always turnstile, then lock; nobody waits for the turnstile while
  holding the lock (see the reentrancy rule below), so there is no cycle.

Rules for callers:

* Each acquisition opens its own file descriptors: flock belongs to the open
  file description, so threads of one process exclude each other like processes.
  A repository object never keeps a lock fd open between operations.
* Shared locks are reentrant per thread: a thread that already holds a shared or
  exclusive lock on a repository and asks for a shared one gets the one it holds
  (waiting at the turnstile behind a GC that waits for us would deadlock).
  :func:`gc_lock` from a thread that holds any lock on the same repository raises
  :class:`~composefsd.repository.errors.RepositoryError` instead of deadlocking.
* Child processes that work for an operation (CreateImage's import workers) get
  the lock fd (:attr:`RepoLock.fd`) through ``pass_fds``, so the shared lock lasts
  until the last of them exits, even if the parent is killed first.
* Worker threads of one operation join the lock its calling thread holds
  (:func:`join_lock`) instead of taking their own: a thread taking its own would
  pass through the turnstile, behind a GC that waits for the caller's lock.
* A composefs-rs process that keeps a repository open holds ``LOCK_SH`` until it
  closes it, which keeps GC (ours and theirs) waiting; :func:`gc_lock` therefore
  takes an optional ``timeout``, after which it gives up the turnstile again and
  raises :class:`~composefsd.repository.errors.RepositoryBusyError`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from composefsd.repository.errors import (
    NotARepositoryError,
    RepositoryBusyError,
    RepositoryError,
)

__all__ = ["TURNSTILE", "RepoLock", "gc_lock", "join_lock", "reader_lock", "writer_lock"]

log = logging.getLogger(__name__)

#: The turnstile, relative to the repository directory.
TURNSTILE = "objects"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_POLL = 0.05


@dataclass(slots=True)
class RepoLock:
    """A held lock. ``fd`` is the repository directory fd carrying the flock."""

    fd: int
    exclusive: bool
    depth: int = 1


_held = threading.local()


def _held_map() -> dict[tuple[int, int], RepoLock]:
    held: dict[tuple[int, int], RepoLock] | None = getattr(_held, "locks", None)
    if held is None:
        held = {}
        _held.locks = held
    return held


def _open_repo(path: str | os.PathLike[str]) -> tuple[int, tuple[int, int]]:
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise NotARepositoryError(
            f"cannot open repository {os.fspath(path)}: {exc.strerror}", errno=exc.errno
        ) from exc
    st = os.fstat(fd)
    return fd, (st.st_dev, st.st_ino)


def _open_turnstile(repo_fd: int) -> int | None:
    try:
        return os.open(TURNSTILE, _DIR_FLAGS, dir_fd=repo_fd)
    except FileNotFoundError:
        # Only a read-only repository without objects/ gets here (open creates it
        # otherwise): nobody can write to it, so readers need no turnstile.
        return None


def _flock(fd: int, op: int, deadline: float | None, what: str) -> None:
    if deadline is None:
        fcntl.flock(fd, op)
        return
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RepositoryBusyError(f"timed out waiting for {what}")
        time.sleep(min(_POLL, remaining))


@contextmanager
def _shared(path: str | os.PathLike[str]) -> Iterator[RepoLock]:
    fd, key = _open_repo(path)
    held = _held_map()
    current = held.get(key)
    if current is not None:
        os.close(fd)
        current.depth += 1
        try:
            yield current
        finally:
            current.depth -= 1
        return
    try:
        turnstile = _open_turnstile(fd)
        try:
            if turnstile is not None:
                fcntl.flock(turnstile, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            if turnstile is not None:
                os.close(turnstile)  # also releases it
        lock = RepoLock(fd, exclusive=False)
        held[key] = lock
        try:
            yield lock
        finally:
            del held[key]
    finally:
        os.close(fd)


@contextmanager
def writer_lock(path: str | os.PathLike[str]) -> Iterator[RepoLock]:
    """Shared lock for an operation that adds objects, images or refs."""
    with _shared(path) as lock:
        yield lock


@contextmanager
def reader_lock(path: str | os.PathLike[str]) -> Iterator[RepoLock]:
    """Shared lock for verify, fsck and listing: it only keeps GC away."""
    with _shared(path) as lock:
        yield lock


@contextmanager
def join_lock(lock: RepoLock) -> Iterator[None]:
    """Let this thread count as holding ``lock``, which another thread of this
    process holds and keeps until this context ends: its shared acquisitions of the
    same repository are then reentrant (see the module's rules)."""
    st = os.fstat(lock.fd)
    key = (st.st_dev, st.st_ino)
    held = _held_map()
    if key in held:
        yield
        return
    held[key] = RepoLock(lock.fd, exclusive=lock.exclusive)
    try:
        yield
    finally:
        del held[key]


@contextmanager
def gc_lock(path: str | os.PathLike[str], *, timeout: float | None = None) -> Iterator[RepoLock]:
    """Exclusive lock for garbage collection; ``timeout`` seconds at most (None: wait).

    Raises :class:`RepositoryBusyError` on timeout, and :class:`RepositoryError`
    when this thread already holds a lock on the repository (waiting would
    deadlock).
    """
    fd, key = _open_repo(path)
    held = _held_map()
    if key in held:
        os.close(fd)
        raise RepositoryError(
            f"cannot collect garbage in {os.fspath(path)} while this thread holds a lock on it"
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    turnstile = None
    try:
        turnstile = _open_turnstile(fd)
        if turnstile is not None:
            _flock(turnstile, fcntl.LOCK_EX, deadline, "the repository's turnstile")
        _flock(fd, fcntl.LOCK_EX, deadline, "running repository operations to finish")
        lock = RepoLock(fd, exclusive=True)
        held[key] = lock
        try:
            yield lock
        finally:
            del held[key]
    finally:
        os.close(fd)
        if turnstile is not None:
            os.close(turnstile)
