"""Cache files in the repository's ``cache/`` directory, read as untrusted bytes.

One home for what every cache of the repository (the digest cache,
:mod:`composefsd.repository.digestcache`; Verify's object lists,
:mod:`composefsd.repository.objectlist`) does with its file:

* :func:`read`: open without following a symlink or blocking, refuse anything but
  a regular file no larger than the caller's limit, and check the SHA-256 at its
  end; the caller then checks every count and length of the body. A damaged file
  raises :class:`CacheFileError`, which callers treat as no cache, never an error.
* :func:`write`: the body and its SHA-256, written to a temporary file (0600, in a
  0700 directory: only the repository's owner, the daemon, writes there) and
  renamed over the old one; without fsync (losing it only costs time).
* :func:`prune`: keep at most so many files of one kind, the least recently
  written going first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable

from composefsd.dirs import make_dirs
from composefsd.repository.errors import os_error_text
from composefsd.repository.store import random_name

__all__ = ["SUM_SIZE", "CacheFileError", "prune", "read", "write"]

log = logging.getLogger(__name__)

#: The SHA-256 that ends every cache file.
SUM_SIZE = hashlib.sha256().digest_size


class CacheFileError(ValueError):
    """A cache file is damaged, truncated, foreign or implausible: no cache."""


def read(path: str, limit: int) -> bytes | None:
    """The body of the cache file ``path`` (its checksum checked and cut off), or None
    if there is none. :class:`CacheFileError` if it is not a regular file of at most
    ``limit`` bytes or its checksum is wrong; OSError if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise CacheFileError("not a regular file of a plausible size")
        with open(fd, "rb", closefd=False) as f:
            # As much as fstat said, and one byte to see it grew: a read of ``limit``
            # would allocate all of it first (GBs for a list's bound).
            data = f.read(st.st_size + 1)
    finally:
        os.close(fd)
    if len(data) < SUM_SIZE or len(data) > limit:
        raise CacheFileError("truncated")
    body, check = data[:-SUM_SIZE], data[-SUM_SIZE:]
    if hashlib.sha256(body).digest() != check:
        raise CacheFileError("checksum mismatch")
    return body


def write(path: str, body: bytes) -> bool:
    """Write ``body`` and its checksum to ``path`` atomically (module notes); False
    (logged) if it could not be written."""
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, random_name(".tmp-cache-"))
    try:
        make_dirs(directory, 0o700)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        with open(os.open(tmp, flags, 0o600), "wb") as f:
            f.write(body)
            f.write(hashlib.sha256(body).digest())
        os.rename(tmp, path)
    except OSError as exc:
        log.warning("cannot write cache file %s: %s", path, os_error_text(exc))
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    return True


def prune(
    directory: str,
    prefix: str,
    keep: int,
    spare: str | None = None,
    stale: Callable[[str], bool] | None = None,
) -> None:
    """Keep at most ``keep`` files named ``prefix...`` in ``directory``: those
    ``stale(name)`` says are no longer needed go first, then the least recently
    written; ``spare`` (a path, the file just written) stays."""
    try:
        with os.scandir(directory) as it:
            caches = [e for e in it if e.name.startswith(prefix)]
        if len(caches) <= keep:
            return
        dated = sorted(
            caches,
            key=lambda e: (
                not (stale is not None and stale(e.name)),
                e.stat(follow_symlinks=False).st_mtime_ns,
            ),
        )
    except OSError as exc:
        log.warning("cannot list cache files in %s: %s", directory, os_error_text(exc))
        return
    for entry in dated[: len(dated) - keep]:
        if entry.path == spare:
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            pass
