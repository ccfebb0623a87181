"""Reading a scanned tree's files again: beneath its root fd, never through a symlink,
and only the inode the scan saw.

Between the scan of a source tree and the reading of its files, whoever may write
to the tree can swap things in it: a directory for a symlink to ``/etc``, a file
for another. Reopening a file by its full path (what C mkcomposefs does) would
follow such a swap out of the tree and read, as root, whatever it leads to. So
after a scan no path is resolved again:

* a file is reached from the tree's root directory fd, opened by the scan, one
  component at a time with ``O_NOFOLLOW`` (``O_PATH | O_DIRECTORY`` for the
  directories on the way, which needs only the search permission a path walk
  needs): a symlink anywhere on the way fails (``ENOTDIR``, ``ELOOP``), as do
  ``..``, ``.`` and empty components, so nothing outside the root is reachable;
* the file itself is opened ``O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`` (a FIFO or
  device swapped in can neither block nor act as a terminal) and must be the
  inode the scan saw: the same ``st_dev``, ``st_ino``, size and mtime (its
  :data:`FileKey`), else :class:`ChangedError`.

This is portable ``openat``; ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``
would save the per-directory opens, but consecutive files mostly share their
directory (scans hand them out directory by directory), and :class:`BeneathOpener`
keeps the fds of the current directory's path open, so a file costs one
``openat`` and one ``fstat`` either way.

An opener is not thread-safe: each thread or worker process uses its own.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = [
    "FILE_FLAGS",
    "SETTLE_NS",
    "BeneathOpener",
    "ChangedError",
    "FileKey",
    "check_relpath",
    "file_key",
    "same_file",
    "settled",
    "settled_until",
]

#: ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` of a scanned file. The
#: first four identify the content a scan saw; the ctime only serves the digest
#: cache (it moves with metadata changes too, which are not worth failing for).
FileKey = tuple[int, int, int, int, int]

FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_S_IFMT = 0o170000
_S_IFREG = stat.S_IFREG


class ChangedError(OSError):
    """The file at a scanned path is no longer the one scanned (or no longer a
    regular file). ``path`` is its full path (bytes), ``str()`` says what changed."""

    def __init__(self, path: bytes, reason: str) -> None:
        super().__init__(errno.EAGAIN, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{os.fsdecode(self.path)}: {self.reason}"


#: How long before it was read a file's last change must lie for what was read to
#: be remembered under its key (:func:`settled`).
SETTLE_NS = 2_000_000_000


def file_key(st: os.stat_result) -> FileKey:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def settled(ctime_ns: int, started_ns: int, window_ns: int = SETTLE_NS) -> bool:
    """Whether a file whose change time is ``ctime_ns`` may be remembered by its key
    (device, inode, size, mtime and ctime) after being read from ``started_ns`` on
    (wall clock), when it was the same before and after the reading.

    The kernel sets the change time to the current time at every write, truncate,
    ``fallocate``, xattr or mode change, and no system call sets a chosen one; but it
    comes from a coarse clock (a tick of some milliseconds, a second on filesystems
    with second timestamps), so a change in the same tick as the one before would
    leave the key as it was. A change time at least ``SETTLE_NS`` before the reading
    began rules that out: any later change gets a later change time. A change time
    in the future (the clock was set back) is never settled. (git's "racy clean"
    rule.) ``window_ns`` other than ``SETTLE_NS`` is for tests."""
    return ctime_ns <= settled_until(started_ns, window_ns)


def settled_until(started_ns: int, window_ns: int = SETTLE_NS) -> int:
    """The latest change time :func:`settled` accepts for a reading begun at
    ``started_ns``: for checking many change times with one comparison each."""
    return started_ns - window_ns


def same_file(st: os.stat_result, key: FileKey) -> str | None:
    """None if ``st`` is the regular file ``key`` describes, else what differs."""
    if st.st_mode & _S_IFMT != _S_IFREG:
        return "it is no longer a regular file"
    if st.st_ino != key[1] or st.st_dev != key[0]:
        return "it was replaced by another file"
    if st.st_size != key[2]:
        return f"its size changed from {key[2]} to {st.st_size} bytes"
    if st.st_mtime_ns != key[3]:
        return "it was modified"
    return None


def check_relpath(rel: bytes) -> None:
    """ValueError unless ``rel`` is a plain relative path (no ``.``, ``..``, empty
    component, leading or trailing slash, NUL)."""
    if not rel or b"\0" in rel:
        raise ValueError(f"not a relative path: {rel!r}")
    for part in rel.split(b"/"):
        if part in (b"", b".", b".."):
            raise ValueError(f"not a plain relative path: {rel!r}")


class BeneathOpener:
    """Opens regular files by relative path beneath ``root_fd`` (module notes).

    ``display`` is the tree's path as the user named it; error messages join it
    with the relative path. The opener does not own ``root_fd``; :meth:`close`
    releases the directory fds it keeps.
    """

    __slots__ = ("_fds", "_head", "_parts", "display", "root_fd")

    def __init__(self, root_fd: int, display: bytes = b".") -> None:
        self.root_fd = root_fd
        self.display = display
        self._head: bytes | None = b""
        self._parts: list[bytes] = []
        self._fds: list[int] = []

    def __enter__(self) -> BeneathOpener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        fds, self._fds = self._fds, []
        self._parts = []
        self._head = b""
        for fd in fds:
            os.close(fd)

    def full_path(self, rel: bytes) -> bytes:
        """``display`` joined with ``rel``, for messages."""
        display = self.display
        if not display:
            return rel
        return display + rel if display.endswith(b"/") else display + b"/" + rel

    def _enter(self, head: bytes) -> int:
        """The fd of directory ``head`` (relative; b"" is the root), walked to from
        the directories already open."""
        parts = head.split(b"/") if head else []
        have = self._parts
        fds = self._fds
        common = 0
        limit = min(len(parts), len(have))
        while common < limit and parts[common] == have[common]:
            common += 1
        while len(fds) > common:
            os.close(fds.pop())
        del have[common:]
        # A failure half way leaves the cache describing what is open.
        self._head = None
        fd = fds[-1] if fds else self.root_fd
        for part in parts[common:]:
            if part in (b"", b".", b".."):
                raise OSError(errno.EINVAL, f"not a plain relative path: {head!r}")
            fd = os.open(part, _WALK_FLAGS, dir_fd=fd)
            fds.append(fd)
            have.append(part)
        self._head = head
        return fd

    def open(self, rel: bytes, key: FileKey | None = None) -> int:
        """An fd (O_RDONLY, close-on-exec) on the regular file at ``rel`` (empty: the
        root fd is an ``O_PATH`` fd on the source's one file, which is reopened).

        With ``key``, the file must be that one (:func:`same_file`). A symlink where
        the scan saw a directory or the file, or something that is not a regular
        file, is a :class:`ChangedError`; other failures (``ENOENT`` for a vanished
        entry, ``EACCES``) are the ``OSError`` of the failing call.
        """
        if not rel:
            # The source is this file itself, open O_PATH: reopen that very inode.
            fd = os.open(f"/proc/self/fd/{self.root_fd}", FILE_FLAGS & ~os.O_NOFOLLOW)
        else:
            head, _, name = rel.rpartition(b"/")
            if name in (b"", b".", b".."):
                raise OSError(errno.EINVAL, f"not a plain relative path: {rel!r}")
            dir_fd = self._fds[-1] if self._fds else self.root_fd
            try:
                if head != self._head:
                    dir_fd = self._enter(head)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    # Scanned as a directory: somebody swapped it since.
                    verb = "was replaced by" if key is not None else "is"
                    raise ChangedError(
                        self.full_path(rel),
                        f"a directory on its path {verb} a symbolic link or a file",
                    ) from exc
                raise
            try:
                fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    verb = "it was replaced by" if key is not None else "it is"
                    raise ChangedError(self.full_path(rel), f"{verb} a symbolic link") from exc
                raise
        try:
            st = os.fstat(fd)
            if key is not None:
                why = same_file(st, key)
            elif st.st_mode & _S_IFMT != _S_IFREG:
                why = "it is not a regular file"
            else:
                why = None
        except BaseException:
            os.close(fd)
            raise
        if why is not None:
            os.close(fd)
            raise ChangedError(self.full_path(rel), why)
        return fd
