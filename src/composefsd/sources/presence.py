"""Which objects of a store are there whole, looked up in a worker process.

A re-import of an unchanged tree takes its files' digests from the repository's
digest cache (:mod:`composefsd.repository.digestcache`), and must still find each
of those objects in the store: there, a regular file, of the file's size (one
``lstat`` each). For /usr that is some 110,000 calls, a quarter of the re-import
on one CPU; they depend on the cache alone, not on the scan of the tree, so
:class:`PresenceCheck` makes them in a worker process on another CPU while the
caller scans. The worker looks at exactly what the caller would look at itself,
relative to the same objects directory fd (inherited, not reopened by path), and
answers one status per object: :data:`PRESENT`, :data:`MISSING`, :data:`DAMAGED`
(not a regular file, or another size), or :data:`FAILED` (any other error: the
caller looks again itself, and reports what it finds as it would have).

Nothing is taken on trust from the worker beyond its answer's length: the
statuses only decide which of the caller's own checks were already made. The
caller makes the lookups under its repository lock, before it uses the objects,
as it would otherwise make them a moment later; a worker that cannot be started
or fails leaves :meth:`PresenceCheck.result` None, and the caller checks in
process. The worker imports this module alone, started with ``-S``.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from array import array

from composefsd import workerproc

__all__ = ["DAMAGED", "FAILED", "MISSING", "PRESENT", "PresenceCheck", "check_objects"]

log = logging.getLogger(__name__)

PRESENT = 0
MISSING = 1
DAMAGED = 2
FAILED = 3

_S_IFMT = 0o170000
_S_IFREG = stat.S_IFREG


def check_objects(dir_fd: int, digests: bytes, width: int, sizes: array[int]) -> bytes:
    """The status of each object: ``digests`` end to end (``width`` bytes each), at
    ``XX/rest`` beneath ``dir_fd``, each expected to be a regular file of ``sizes[i]``
    bytes; symlinks are not followed."""
    count = len(sizes)
    if len(digests) != count * width:
        raise ValueError(f"{len(digests)} bytes of digests for {count} sizes of {width}")
    out = bytearray(count)
    lstat = os.stat
    for i in range(count):
        hexed = digests[i * width : (i + 1) * width].hex()
        try:
            st = lstat(f"{hexed[:2]}/{hexed[2:]}", dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            out[i] = MISSING
            continue
        except OSError:
            out[i] = FAILED
            continue
        if st.st_mode & _S_IFMT != _S_IFREG or st.st_size != sizes[i]:
            out[i] = DAMAGED
    return bytes(out)


#: A request: (objects directory fd, digests end to end, digest width, sizes as
#: native 64-bit integers).
_Request = tuple[int, bytes, int, bytes]


def _handle(request: _Request) -> bytes:
    dir_fd, digests, width, sizes = request
    return check_objects(dir_fd, digests, width, array("q", sizes))


def _worker_main() -> None:
    """The worker: one request on stdin, its statuses on stdout, until EOF."""
    workerproc.serve(_handle)


class PresenceCheck:
    """Looks up objects (:func:`check_objects`) in a worker process, from a thread,
    while the caller goes on; :meth:`result` waits for the statuses."""

    def __init__(self, dir_fd: int, digests: bytes, width: int, sizes: array[int]) -> None:
        self._request: _Request = (dir_fd, digests, width, array("q", sizes).tobytes())
        self._count = len(sizes)
        self._result: bytes | None = None
        self._thread = threading.Thread(target=self._run, name="cfs-presence", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        dir_fd = self._request[0]
        try:
            proc = workerproc.start(__name__, "_worker_main", pass_fds=(dir_fd,), site=False)
        except OSError as exc:
            log.info("cannot start an object lookup worker: %s", exc.strerror)
            return
        try:
            workerproc.send(proc, self._request)
            assert proc.stdout is not None
            reply = workerproc.receive(proc.stdout)
            if isinstance(reply, bytes) and len(reply) == self._count:
                self._result = reply
            else:
                log.info("object lookup worker: an answer of the wrong shape")
        except (OSError, EOFError, ValueError, TypeError) as exc:
            log.info("object lookup worker failed: %s", exc)
        finally:
            workerproc.stop(proc, kill=self._result is None, timeout=10)

    def result(self) -> bytes | None:
        """One status per object (:data:`PRESENT` ...), or None if the worker could not
        answer (the caller then looks the objects up itself)."""
        self._thread.join()
        return self._result
