"""Digests of image files hashed in userspace, remembered while the file is unchanged.

Where the kernel cannot measure an image (no fs-verity), a mount hashes the whole
image to compare it with its expected digest: about 0.1 s for a 30 MB image. The
daemon, which mounts the same few images again and again, remembers each digest it
computed, keyed by what the kernel changes whenever the file's content can change:

* the device and inode: another file (a rename over it, a new file in its place)
  is another key, and an inode number handed to a new file after a delete comes
  with that file's own, later, change time;
* the size, the modification time and the change time (nanoseconds): every write,
  truncate or ``fallocate`` through the kernel sets the change time to the current
  time, and no system call sets it to a chosen value (``utimensat`` sets the
  modification time and, in doing so, the change time to now);
* the hash algorithm.

Any of them differing is a miss, and the file is hashed again. A digest is only
remembered when the file was the same before and after hashing it, and when its
change time lies at least :data:`SETTLE_NS` before the hashing started (the rule of
:func:`composefsd.sources.beneath.settled`, which the repository's digest cache
shares): change times come from a coarse clock (one tick is several milliseconds),
so a write right after an earlier change could otherwise get the same change time
and go unnoticed; a write that comes after the settle time always moves it. The
cache holds at most ``max_entries`` digests (least recently used go first), in
memory only.

What it trusts: that the file's content only changes through the kernel's write
paths of the running system. Outside that: root setting the system clock back and
writing within the same clock tick as the remembered change time, to the
nanosecond; a writable shared mapping of the file made before it was hashed (a
store to a page already dirty is not noticed until writeback); the block device
written underneath the filesystem. The repository never opens an object file for
writing once it is published, and all of these need root.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from composefsd.fsverity import digest_fd
from composefsd.kernel.verity import Algorithm
from composefsd.sources.beneath import SETTLE_NS, settled

__all__ = ["SETTLE_NS", "FileIdentity", "ImageDigestCache"]

_log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class FileIdentity:
    """What the kernel changes whenever a file's content may have changed."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ImageDigestCache:
    """fs-verity digests of files, computed once per unchanged file (module notes).
    Thread-safe."""

    def __init__(
        self,
        max_entries: int = 256,
        *,
        settle_ns: int = SETTLE_NS,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.max_entries = max_entries
        self._settle_ns = settle_ns
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[FileIdentity, str], str] = OrderedDict()
        #: Digests computed (misses) and answered from memory (hits).
        self.computed = 0
        self.remembered = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def digest(self, fd: int, algorithm: Algorithm) -> tuple[str, bool]:
        """The fs-verity digest (hex) of the regular file ``fd``, and whether it was
        remembered rather than computed now."""
        before = os.fstat(fd)
        key = (FileIdentity.of(before), algorithm.name)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.remembered += 1
                return found, True
        started = self._clock()
        digest = digest_fd(fd, algorithm).hex()
        after = os.fstat(fd)
        with self._lock:
            self.computed += 1
            if FileIdentity.of(after) != key[0]:
                _log.debug("image inode %d changed while it was hashed", before.st_ino)
            elif not settled(before.st_ctime_ns, started, self._settle_ns):
                _log.debug("image inode %d changed too recently to remember", before.st_ino)
            elif after.st_nlink > 0:
                self._entries[key] = digest
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return digest, False
