"""Replies of io.composefs.Repository that composefsctl's direct mode gives too:
built here once, so that the daemon and ``composefsctl --direct`` report the same
repository and the same mount the same way.

**Describe's counts in the daemon** (:class:`RepositoryCounts`). Counting images
and refs lists ``images/`` and every directory under ``images/refs``: work that
grows with the repository, done on every call. The daemon keeps the two counts
with the status (device, inode, size, link count, mtime and ctime, as ``stat``
follows the path) of each directory they were listed from, and lists again when
any of them differs or has gone. It trusts what ``stat`` reports for a directory:
that adding, removing or renaming an entry in it changes its mtime and ctime
(POSIX requires it of every filesystem), whoever makes the change (composefsd,
``composefsctl --direct``, cfsctl, bootc, ``rm``). The counts depend on nothing
else: an image is a digest-named symlink in ``images/``, a ref any symlink under
``images/refs``, so a link retargeted in place (a rename over it) changes its
directory too. A timestamp has a granularity, though (the kernel's coarse clock, one tick of
at most 10 ms; a whole second on some filesystems), so two changes within one
tick can leave the same mtime: a listing is kept only when every directory's
mtime and ctime are older than the moment of the ``stat`` by more than that
granularity (:func:`_settled`: 0.1 s, or 2 s for timestamps in whole seconds), so
that any change after it gets a later timestamp. A directory changed more
recently is listed again at every call until it has settled. (A clock set back
between two changes could repeat a timestamp; the device, inode, size and link
count must then match too.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import composefsd
from composefsd.kernel.mount import DetachedMount
from composefsd.kernel.mountinfo import ComposefsMount
from composefsd.kernel.repomount import repository_mounts
from composefsd.objectlayout import is_hex_digest
from composefsd.repository import ReadOnlyRepositoryError, Repository, RepositoryError
from composefsd.repository.errors import os_error_text
from composefsd.repository.images import iter_refs

__all__ = [
    "SETTLE_NS",
    "SETTLE_WHOLE_SECONDS_NS",
    "RepositoryCounts",
    "count_images",
    "describe_counts",
    "describe_repository",
    "mount_reply",
    "read_only_reason",
]

#: How much older than the ``stat`` a directory's timestamps must be for a listing
#: of it to be kept (module notes): ten times the longest kernel tick (HZ=100)...
SETTLE_NS: Final = 100_000_000
#: ... and for timestamps in whole seconds (ext4 with 128-byte inodes, ext3), twice
#: their granularity.
SETTLE_WHOLE_SECONDS_NS: Final = 2_000_000_000
_SECOND_NS: Final = 1_000_000_000

#: What ``stat`` says of a directory that decides whether a listing of it still
#: holds; None: it did not exist.
_DirKey = tuple[int, int, int, int, int, int] | None


def _dir_key(path: str) -> _DirKey:
    """Raises OSError other than a missing directory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns)


def _settled(key: _DirKey, now_ns: int) -> bool:
    """Whether any later change of the directory gets a later mtime and ctime than
    ``key`` has (module notes); ``now_ns``: time.time_ns() from before the stat."""
    if key is None:
        return True
    mtime, ctime = key[4], key[5]
    whole = mtime % _SECOND_NS == 0 and ctime % _SECOND_NS == 0
    return max(mtime, ctime) < now_ns - (SETTLE_WHOLE_SECONDS_NS if whole else SETTLE_NS)


def count_images(repo: Repository) -> int:
    """Images of ``repo``: digest-named symlinks in ``images/``."""
    images = 0
    try:
        with os.scandir(repo.images_dir) as it:
            for entry in it:
                if is_hex_digest(entry.name, repo.hash_algorithm) and entry.is_symlink():
                    images += 1
    except FileNotFoundError:
        pass
    return images


def read_only_reason(repo: Repository) -> str | None:
    """Why ``repo`` cannot be written to now (Describe's ``readOnlyReason``), or None."""
    try:
        repo.ensure_writable()
    except ReadOnlyRepositoryError as exc:
        return str(exc)
    return None


def describe_counts(
    repo: Repository, images: int, refs: int, mounts: int, reason: str | None = None
) -> dict[str, Any]:
    """The Describe reply for ``repo`` with these counts and read-only reason (what
    it depends on besides the repository's fixed settings)."""
    out: dict[str, Any] = {
        "path": str(repo.path),
        "algorithm": repo.hash_name,
        "verity": repo.verity.value,
        "images": images,
        "refs": refs,
        "mounts": mounts,
        "erofsVersion": int(repo.erofs_version),
        "extraErofsVersions": [int(v) for v in repo.formats.versions()][1:],
        "version": composefsd.version(),
    }
    if reason is not None:
        out["readOnlyReason"] = reason
    return out


def describe_repository(repo: Repository, mounts: Sequence[ComposefsMount]) -> dict[str, Any]:
    """The Describe reply for ``repo``, given the composefs mounts to count
    (composefsctl's direct ``status`` prints the same)."""
    return describe_counts(
        repo,
        count_images(repo),
        sum(1 for _ in iter_refs(repo)),
        # Without composefs mounts there is nothing to tell apart: no realpath and
        # stat of objects/ (under load, a quarter of Describe's own time).
        len(repository_mounts(repo, mounts)) if mounts else 0,
        read_only_reason(repo),
    )


@dataclass(slots=True, frozen=True)
class _Listing:
    images: int
    refs: int
    #: Each directory listed, with its key from before the listing.
    dirs: tuple[tuple[str, _DirKey], ...]


class RepositoryCounts:
    """The images and refs of a repository, listed again only when a directory
    they were counted from has changed (module notes). Thread-safe: a listing is
    replaced as a whole, and two threads that both list just do the work twice."""

    __slots__ = ("_listing", "clock", "images_dir", "refs_dir", "repo")

    def __init__(self, repo: Repository, clock: Callable[[], int] = time.time_ns) -> None:
        self.repo = repo
        #: The time now, in ns, as file timestamps count it (a test's clock).
        self.clock = clock
        self.images_dir = str(repo.images_dir)
        self.refs_dir = str(repo.refs_dir)
        self._listing: _Listing | None = None

    def current(self, max_dirs: int | None = None) -> tuple[int, int] | None:
        """(images, refs) if no directory changed since they were counted: one
        ``stat`` per directory, no listing; None if one did, or none was kept, or
        they came from more than ``max_dirs`` directories."""
        listing = self._listing
        if listing is None or (max_dirs is not None and len(listing.dirs) > max_dirs):
            return None
        try:
            for path, key in listing.dirs:
                if _dir_key(path) != key:
                    return None
        except OSError:
            return None
        return listing.images, listing.refs

    def count(self) -> tuple[int, int]:
        """(images, refs), listed again if a directory changed. Raises
        :class:`RepositoryError` when a directory of refs cannot be listed."""
        counts = self.current()
        if counts is not None:
            return counts
        now = self.clock()
        dirs: list[tuple[str, _DirKey]] = [(self.images_dir, _dir_key(self.images_dir))]
        images = count_images(self.repo)
        refs = self._count_refs(dirs)
        settled = all(_settled(key, now) for _, key in dirs)
        self._listing = _Listing(images, refs, tuple(dirs)) if settled else None
        return images, refs

    def _count_refs(self, dirs: list[tuple[str, _DirKey]]) -> int:
        """Symlinks under ``images/refs`` (what :func:`iter_refs` lists), each
        directory's key taken before it is listed."""
        refs = 0
        stack = [self.refs_dir]
        while stack:
            directory = stack.pop()
            try:
                dirs.append((directory, _dir_key(directory)))
                with os.scandir(directory) as it:
                    for entry in it:
                        if entry.is_symlink():
                            refs += 1
                        elif entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise RepositoryError(
                    f"cannot list {Path(directory)}: {os_error_text(exc)}", errno=exc.errno
                ) from exc
        return refs


def mount_reply(mount: DetachedMount) -> dict[str, Any]:
    """The Mount reply for ``mount``, less where it went (``where`` or the mount's fd):
    what was mounted and how it was checked (composefsctl's direct ``mount`` prints
    the same)."""
    return {
        "digest": mount.source.partition(":")[2],
        "imageCheck": mount.image_check,
        "objectVerity": mount.object_verity,
        "readOnly": mount.read_only,
        "idmapped": mount.idmapped,
    }
