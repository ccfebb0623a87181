"""Checking object files one by one: what Verify and fsck ask of each file, in the
calling process or in a checking worker process.

:func:`composefsd.repository.verify.check_files` hands the files out; this module
is the work itself, kept beside :mod:`composefsd.workerproc` and importing only
what checking needs (:mod:`composefsd.fsverity`, the kernel's verity ioctl, the
worker plumbing). A checking worker imports this module alone: the repository
package would cost each worker ~0.2 s of imports, about 2,000 small files' worth
of checking.

A file's check (:class:`Checker`) travels as a :data:`Wire` tuple, the fields of
``verify.FileCheck``. With ``summary`` set, a batch's reply is a :data:`Summary`
instead (:func:`summarize`): the files whose check found nothing to say, grouped by
how the kernel answered, and the rest one by one, so that the caller's work per
batch grows with the problems found rather than with the files.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence

from composefsd import workerproc
from composefsd.fsverity import FileDigester
from composefsd.kernel.verity import (
    Algorithm,
    VerityError,
    VerityNotEnabledError,
    VerityUnsupportedError,
    measure_verity,
)

__all__ = [
    "NOT_REGULAR",
    "OPEN_FLAGS",
    "Checker",
    "Summary",
    "Wire",
    "check_batch",
    "measure",
    "summarize",
    "worker_main",
]

#: Objects are opened without following a final symlink (an object must be a regular
#: file) and without blocking (a FIFO planted under objects/ must not hang us).
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
DIR_NOFOLLOW = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: ``Wire`` error for something that is not a regular file.
NOT_REGULAR = -1

#: One file's check: (errno or NOT_REGULAR or None, size, hex digest or None,
#: measured by the kernel, why the kernel did not measure it or None).
Wire = tuple[int | None, int, str | None, bool, str | None]
#: A batch's checks in short: why -> (positions in the batch, bytes of those files
#: whose expected size was unknown) for the files that are what their name says
#: (why None: measured by the kernel); and (position, Wire) for every other file.
Summary = tuple[dict[str | None, tuple[list[int], int]], list[tuple[int, Wire]]]
#: A batch as the workers get it: (algorithm name, [(path, expected size)...], summary).
Request = tuple[str, list[tuple[bytes, int]], bool]

Measure = Callable[[int, Algorithm], bytes]


def measure(
    fd: int, algorithm: Algorithm, kernel: Measure = measure_verity
) -> tuple[bytes | None, str | None]:
    """The kernel's digest, or None and why not: ``"not-enabled"``,
    ``"unsupported"``, or another reason (such as another hash algorithm)."""
    try:
        return kernel(fd, algorithm), None
    except VerityNotEnabledError:
        return None, "not-enabled"
    except VerityUnsupportedError:
        return None, "unsupported"
    except VerityError as exc:
        return None, str(exc)


class Checker:
    """Checks many files in a row, sparing the per-file work that repeats: the
    directory (``XX`` of ``objects/XX/rest``) is opened once, without following a
    symlink, and kept open; small files are read into one buffer
    (:class:`~composefsd.fsverity.FileDigester`); and once the kernel says a
    filesystem cannot do fs-verity at all, its other files are not asked again
    (that answer is per filesystem; their content is hashed in userspace as before,
    so nothing goes unchecked). Use as a context manager: it closes the directories."""

    __slots__ = ("_algorithm", "_digester", "_dirs", "_unsupported")

    #: Directories kept open at most (an image's objects use at most 256).
    MAX_DIRS = 1024

    def __init__(self, algorithm: Algorithm) -> None:
        self._algorithm = algorithm
        self._digester = FileDigester(algorithm)
        self._dirs: dict[bytes, int] = {}
        self._unsupported: set[int] = set()

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_dirs()

    def _close_dirs(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _measure(self, fd: int) -> tuple[bytes | None, str | None]:
        return measure(fd, self._algorithm)

    def _open(self, path: bytes) -> int:
        # Not os.path.split: a Python function, a quarter of this method's time.
        cut = path.rfind(b"/")
        if cut < 0:
            head, tail = b".", path
        else:
            head, tail = path[:cut] or b"/", path[cut + 1 :]
        dir_fd = self._dirs.get(head)
        if dir_fd is None:
            if len(self._dirs) >= self.MAX_DIRS:
                self._close_dirs()
            dir_fd = os.open(head, DIR_NOFOLLOW)
            self._dirs[head] = dir_fd
        return os.open(tail, OPEN_FLAGS, dir_fd=dir_fd)

    def check(self, path: bytes, expected_size: int) -> Wire:
        """Open ``path`` (no symlink as it or its directory, no blocking), check it
        is a regular file of ``expected_size`` bytes (any size if negative), and
        work out its digest: measured by the kernel if the file has fs-verity,
        computed otherwise. Never raises OSError."""
        try:
            fd = self._open(path)
        except OSError as exc:
            return exc.errno or errno.EIO, 0, None, False, None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return NOT_REGULAR, 0, None, False, None
            size = st.st_size
            if 0 <= expected_size != size:
                return None, size, None, False, None
            if st.st_dev in self._unsupported:
                why: str | None = "unsupported"
            else:
                measured, why = self._measure(fd)
                if measured is not None:
                    return None, size, measured.hex(), True, None
                if why == "unsupported":
                    self._unsupported.add(st.st_dev)
            return None, size, self._digester.digest(fd, size).hex(), False, why
        except OSError as exc:
            return exc.errno or errno.EIO, 0, None, False, None
        finally:
            os.close(fd)


def check_batch(request: tuple[str, Sequence[tuple[bytes, int]]]) -> list[Wire]:
    """Check a batch: (algorithm name, [(path, expected size)...])."""
    algorithm, items = request
    with Checker(Algorithm.parse(algorithm)) as checker:
        return [checker.check(path, size) for path, size in items]


def summarize(items: Sequence[tuple[bytes, int]], wires: Sequence[Wire]) -> Summary:
    """The :data:`Summary` of a batch's checks. A file is "what its name says" when
    it could be read, has the expected size (if one was given) and the digest its
    path ``.../XX/rest`` names; anything else is passed on whole (and a path that is
    not so written is too: it cannot be taken for a match)."""
    if len(items) != len(wires):
        raise ValueError(f"{len(wires)} checks for a batch of {len(items)} files")
    groups: dict[str | None, tuple[list[int], int]] = {}
    others: list[tuple[int, Wire]] = []
    for i, ((path, expected), wire) in enumerate(zip(items, wires, strict=True)):
        error, size, digest, measured, why = wire
        if error is None and digest is not None and (measured or why is not None):
            # The path ends with the payload: "XX/rest", the digest with a "/" after two.
            name = path[-len(digest) - 1 :]
            if name[2:3] == b"/" and digest == (name[:2] + name[3:]).decode("latin-1"):
                key = None if measured else why
                group = groups.get(key)
                unknown = size if expected < 0 else 0
                if group is None:
                    groups[key] = ([i], unknown)
                else:
                    group[0].append(i)
                    if unknown:
                        groups[key] = (group[0], group[1] + unknown)
                continue
        others.append((i, wire))
    return groups, others


def serve_request(request: Request) -> list[Wire] | Summary:
    """A checking worker's answer to one batch (module notes)."""
    algorithm, items, summary = request
    wires = check_batch((algorithm, items))
    return summarize(items, wires) if summary else wires


def worker_main() -> None:
    """A checking worker process: batches on stdin, answers on stdout, until EOF."""
    workerproc.serve(serve_request)
