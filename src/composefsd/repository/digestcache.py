"""The digest cache: digests of a source tree's files from its previous import."""

from __future__ import annotations

import hashlib
import logging
import marshal
import os
import stat
import time
from collections.abc import Sequence

from composefsd.dirs import make_dirs
from composefsd.image.tree import gc_paused
from composefsd.kernel.verity import Algorithm
from composefsd.objectlayout import object_relpath
from composefsd.repository.errors import os_error_text
from composefsd.repository.importer import ImportResult, ImportTask
from composefsd.repository.store import ObjectResult, ObjectStore, random_name

__all__ = ["DigestCache"]

log = logging.getLogger(__name__)

#: A digest cache entry: the key, then the digest.
_Cached = tuple[int, int, int, int, int, bytes]


def _copy_task(task: ImportTask) -> ImportTask:
    """``task``, hashed as it is copied (an unchanged file whose object is gone)."""
    return ImportTask(task.rel, task.size, task.expected, False, True, task.key)


class DigestCache:
    """Digests of one source tree's files from the previous import of that tree.

    Entries are keyed by path relative to the tree and hold the file's
    ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` as it was when hashed.
    An entry is used only if the scan found exactly those (the file is then not
    even opened), and only to find an object that exists; a
    file whose object is missing is hashed again as it is copied. The ctime
    cannot be set from userspace and moves with every change of the file, so an
    unchanged key means unchanged content, unless a change landed within the
    timestamp granularity of the hashing: entries whose ctime is less than
    ``RACY_NS`` before the import began are not kept (git's "racy clean" rule).

    The cache lives in the repository (``cache/digests-<alg>-<hash of the
    source path>``): whoever can write it can write the objects anyway. It is
    rewritten (atomically, without fsync: losing it only costs time) after an
    import of the tree that changed it; a missing or unreadable one is empty.
    """

    VERSION = 2
    RACY_NS = 2_000_000_000

    def __init__(
        self, path: str | None, key: tuple[int, str, bytes], entries: dict[bytes, _Cached]
    ) -> None:
        self.path = path
        self.key = key
        self.entries = entries
        self.stamp_ns = time.time_ns()

    @classmethod
    def open(
        cls, cache_dir: str | os.PathLike[str], source: bytes, algorithm: Algorithm
    ) -> DigestCache:
        real = os.path.realpath(source)
        name = f"digests-{algorithm.value}-{hashlib.sha256(real).hexdigest()[:32]}"
        path = os.path.join(os.fspath(cache_dir), name)
        key = (cls.VERSION, algorithm.value, source)
        entries: dict[bytes, _Cached] = {}
        try:
            with open(path, "rb") as f:
                data = f.read()
            with gc_paused():
                doc = marshal.loads(data)
            if isinstance(doc, tuple) and len(doc) == 2 and doc[0] == key:
                loaded = doc[1]
                if isinstance(loaded, dict):
                    entries = loaded
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError, TypeError) as exc:
            log.info("ignoring unreadable digest cache %s: %s", path, exc)
        return cls(path, key, entries)

    def resolve(
        self, store: ObjectStore, tasks: Sequence[ImportTask]
    ) -> tuple[dict[int, ImportResult], list[ImportTask]]:
        """Split ``tasks``: results for the cache hits (by index), and the tasks left
        to import. A file that is unchanged but whose object is gone is marked to be
        hashed as it is copied."""
        hits: dict[int, ImportResult] = {}
        rest: list[ImportTask] = []
        entries = self.entries
        # Without verity to look at, a hit costs one stat call; this loop is most of
        # what re-importing an unchanged tree costs, so it avoids per-call overhead.
        plain = not store._wants_verity()
        dir_fd = store.dir_fd
        relpath = object_relpath
        for i, task in enumerate(tasks):
            key = task.key
            cached = entries.get(task.rel) if not task.inline and key is not None else None
            if cached is None or key is None:
                rest.append(task)
                continue
            if key != cached[:5] or key[2] != task.size:
                rest.append(task)
                continue
            digest = cached[5]
            if plain:
                try:
                    ost = os.stat(relpath(digest.hex()), dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    rest.append(_copy_task(task))
                    continue
                if stat.S_ISREG(ost.st_mode) and ost.st_size == task.size:
                    hits[i] = ImportResult(digest, None, False, False, key)
                else:
                    rest.append(task)  # damaged: the import replaces it
                continue
            found = store.existing(digest, task.size)
            if isinstance(found, ObjectResult):
                hits[i] = ImportResult(digest, None, False, found.verity, key)
            else:
                rest.append(_copy_task(task))
        return hits, rest

    def save(self, tasks: Sequence[ImportTask], results: Sequence[ImportResult]) -> None:
        """Keep the digests of this import (unless racy); written only if changed."""
        if self.path is None:
            return
        limit = self.stamp_ns - self.RACY_NS
        fresh: dict[bytes, _Cached] = {}
        for task, result in zip(tasks, results, strict=True):
            st = result.stat
            if st is not None and result.digest is not None and st[4] < limit:
                fresh[task.rel] = (*st, result.digest)
        if fresh == self.entries:
            return
        directory = os.path.dirname(self.path)
        tmp = os.path.join(directory, random_name(".tmp-cache-"))
        try:
            make_dirs(directory, 0o700)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            with open(os.open(tmp, flags, 0o600), "wb") as f:
                f.write(marshal.dumps((self.key, fresh)))
            os.rename(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write digest cache %s: %s", self.path, os_error_text(exc))
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self.entries = fresh
