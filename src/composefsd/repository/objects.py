"""Publishing objects under ``objects/XX/<rest of hex>``, and bulk imports of files.

An object is a regular file named by its fs-verity digest (the repository's
algorithm). Publishing one (:class:`ObjectStore`):

1. If ``objects/XX/rest`` exists as a regular file of the right size, it is reused
   (deduplication). A damaged one (wrong size or type, or a kernel-measured
   digest that differs from its name) is replaced.
2. Otherwise the data goes into an unnamed ``O_TMPFILE`` in ``objects/``, copied
   from the source with reflink (``FICLONE``), else ``copy_file_range``, else
   read/write (:func:`composefsd.sources.objcopy.copy_fd_data`). Where ``O_TMPFILE`` is
   not supported (or ``/proc`` is missing) a named ``objects/.tmp-object-*`` file
   takes its place.
3. The file is made mode 0644 and reopened read-only through
   ``/proc/self/fd/N`` (the writable fd is closed: the kernel refuses fs-verity
   while one exists). fs-verity is enabled as the policy says (module
   :mod:`composefsd.repository.meta`): ``ETXTBSY`` (a writable fd leaked into a
   process forked meanwhile) is retried three times 1 ms apart, then the data is
   copied into a fresh file which gets verity instead. The kernel's measurement
   must equal the digest computed in userspace.
4. ``linkat(AT_SYMLINK_FOLLOW)`` of ``/proc/self/fd/N`` to ``objects/XX/rest``
   (``XX`` created on demand). ``EEXIST`` means another writer won: dedup. The
   named fallback links the name (``link(2)`` never replaces, which is
   ``RENAME_NOREPLACE`` without ``renameat2``) and unlinks the temporary. A
   damaged object is replaced by a rename instead.

So nothing incomplete is ever visible under ``objects/XX/``: an unnamed temporary
vanishes with its process, a named one lives in ``objects/`` itself where GC
removes it and fsck reports it as a stray temporary.

Durability is the caller's business: objects are linked without ``fsync``;
CreateImage calls :func:`sync_objects` on everything it wrote before it makes an
image visible (fsync of every object written plus their directories, many at
once so that the filesystem batches the journal commits; one ``sync()`` for
thousands of objects). ``fsync_each`` fsyncs every object before it is linked
instead, as C mkcomposefs does; on /usr that was slower.

Bulk imports (:class:`Importer`) hash each file with the repository's algorithm
and publish it if it is new, in ``threads`` lanes: in-process threads for small
amounts of data, one worker process per lane for large ones (per-block fs-verity
hashing holds the GIL, as explained in :mod:`composefsd.sources.directory`). Worker
processes publish objects themselves, under the caller's repository lock,
whose fd they inherit so that it outlives a killed parent until they exit.

Hash first, copy only what is new (:meth:`ObjectStore.import_fd`), was measured
against hashing while copying (:meth:`ObjectStore.import_fd_hashing_copy`, one
read of the source): on /usr into an empty repository both take about as long
(the disk is the limit), and on a repository that already has the objects the
latter writes and throws away a copy of everything (20 s against 13 s). So
hashing while copying is used only for files known to need copying: unchanged
files (per the :class:`DigestCache`) whose object is gone.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import marshal
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from composefsd import workerproc
from composefsd.credentials import Credentials, CredentialsError, acting_as
from composefsd.dirs import make_dir, make_dirs
from composefsd.fsverity import FsVerityHasher, digest_bytes, digest_fd
from composefsd.image.tree import gc_paused
from composefsd.kernel.verity import (
    Algorithm,
    VerityAlreadyEnabledError,
    VerityError,
    VerityFileBusyError,
    VerityNotEnabledError,
    VerityUnsupportedError,
    enable_verity,
    measure_verity,
)
from composefsd.repository.errors import (
    RepositoryError,
    SourceError,
    VerityRequiredError,
    os_error_text,
)
from composefsd.repository.meta import VerityPolicy
from composefsd.sources.beneath import BeneathOpener, ChangedError, FileKey, file_key
from composefsd.sources.objcopy import CopyState, copy_fd_data

__all__ = [
    "OBJECT_MODE",
    "TMP_PREFIX",
    "DigestCache",
    "ImportConfig",
    "ImportResult",
    "ImportTask",
    "Importer",
    "ObjectResult",
    "ObjectStore",
    "PublishState",
    "TmpFile",
    "object_relpath",
    "random_name",
    "sync_objects",
]

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-object-"
OBJECT_MODE = 0o644
_DIR_MODE = 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_SOURCE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_NAME_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_NAME_TABLE = bytes(_NAME_CHARS[i % len(_NAME_CHARS)] for i in range(256))
# O_TMPFILE errors that mean "not here" (EISDIR: kernels that predate it).
_NO_TMPFILE = frozenset((errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS))
_BUSY_RETRIES = 3
_BUSY_SLEEP = 0.001
_COPY_BUFSIZE = 1 << 20
# Work units of the importer: this many files or bytes, whichever comes first.
_BATCH_FILES = 64
_BATCH_BYTES = 32 << 20
# From this much data on the importer uses worker processes.
_PROCESS_MIN_BYTES = 128 << 20
_PROGRESS_INTERVAL = 0.2
_SYNC_THREADS = 16
_SYNC_ALL_MIN = 2000
# Errors of a copy that are the repository's side failing, not the source's.
_WRITE_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS))


def object_relpath(hexdigest: str) -> str:
    """``XX/rest``: the object's path relative to ``objects/``."""
    return f"{hexdigest[:2]}/{hexdigest[2:]}"


def random_name(prefix: str) -> str:
    """``prefix`` plus 12 random letters and digits."""
    return prefix + os.urandom(12).translate(_NAME_TABLE).decode()


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _read_all(fd: int) -> bytes:
    parts: list[bytes] = []
    while chunk := os.read(fd, 65536):
        parts.append(chunk)
    return b"".join(parts)


@dataclass(slots=True, frozen=True)
class ObjectResult:
    """One published (``written``) or reused object; ``verity``: it has fs-verity."""

    digest: str
    written: bool
    verity: bool
    size: int


class PublishState:
    """What the threads of one operation learn about the filesystem, shared.

    ``verity`` is None until known, then whether the filesystem can enable fs-verity.
    """

    __slots__ = ("copy", "proc_ok", "tmpfile", "verity")

    def __init__(self, verity: bool | None = None) -> None:
        self.copy = CopyState()
        self.tmpfile = True
        self.proc_ok = os.path.isdir("/proc/self/fd")
        self.verity = verity


class TmpFile:
    """A temporary file in a directory, published by a link: ``O_TMPFILE`` where it
    works, else a named ``.tmp-object-*`` file that is unlinked unless published."""

    __slots__ = ("dir_fd", "fd", "name")

    def __init__(self, dir_fd: int, fd: int, name: str | None) -> None:
        self.dir_fd = dir_fd
        self.fd = fd
        self.name = name

    @classmethod
    def create(cls, dir_fd: int, state: PublishState) -> TmpFile:
        if state.tmpfile and state.proc_ok:
            try:
                fd = os.open(
                    ".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, OBJECT_MODE, dir_fd=dir_fd
                )
                return cls(dir_fd, fd, None)
            except OSError as exc:
                if exc.errno not in _NO_TMPFILE:
                    raise
                log.info("O_TMPFILE unsupported (%s); using named temporary files", exc.strerror)
                state.tmpfile = False
        for _ in range(100):
            name = random_name(TMP_PREFIX)
            try:
                fd = os.open(
                    name,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                    OBJECT_MODE,
                    dir_fd=dir_fd,
                )
            except FileExistsError:
                continue
            return cls(dir_fd, fd, name)
        raise FileExistsError(errno.EEXIST, "no free temporary file name", TMP_PREFIX)

    def seal(self) -> None:
        """Reopen read-only and close the writable fd (fs-verity needs that)."""
        if self.name is None:
            ro = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        else:
            ro = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.dir_fd)
        os.close(self.fd)
        self.fd = ro

    def link(self, dst_dir_fd: int, rel: str) -> bool:
        """Publish at ``rel``; False if something already exists there."""
        try:
            if self.name is None:
                # dst_dir_fd makes CPython call linkat(..., AT_SYMLINK_FOLLOW), which
                # follows the /proc magic link; plain link(2) would fail with EXDEV.
                os.link(f"/proc/self/fd/{self.fd}", rel, dst_dir_fd=dst_dir_fd)
            else:
                os.link(
                    self.name,
                    rel,
                    src_dir_fd=self.dir_fd,
                    dst_dir_fd=dst_dir_fd,
                    follow_symlinks=False,
                )
                self._unlink_name()
        except FileExistsError:
            return False
        return True

    def replace(self, dst_dir_fd: int, rel: str) -> None:
        """Publish at ``rel`` atomically over whatever is there."""
        if self.name is None:
            while True:
                name = random_name(TMP_PREFIX)
                try:
                    os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=self.dir_fd)
                    break
                except FileExistsError:
                    continue
            self.name = name
        os.rename(self.name, rel, src_dir_fd=self.dir_fd, dst_dir_fd=dst_dir_fd)
        self.name = None

    def _unlink_name(self) -> None:
        name, self.name = self.name, None
        if name is not None:
            try:
                os.unlink(name, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Discard: close the fd, and remove a named temporary not published."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.name is not None:
            try:
                self._unlink_name()
            except OSError as exc:
                log.warning("cannot remove temporary file %s: %s", self.name, exc.strerror)


class _Busy(Exception):
    """fs-verity stayed ETXTBSY through the retries."""


_REPLACE = object()


class ObjectStore:
    """Publishes objects into one repository's ``objects/`` directory.

    Thread-safe; every method opens and closes its own temporary fds. ``close()``
    (or the context manager) releases the directory fd.
    """

    def __init__(
        self,
        objects_dir: str | os.PathLike[str],
        algorithm: Algorithm,
        policy: VerityPolicy,
        *,
        state: PublishState | None = None,
        fsync_each: bool = False,
    ) -> None:
        self.path = os.fspath(objects_dir)
        self.algorithm = algorithm
        self.policy = policy
        self.state = state or PublishState()
        self.fsync_each = fsync_each
        self.dir_fd = os.open(self.path, _DIR_FLAGS)
        self._warned_unsupported = False
        self._verity_policy = policy is not VerityPolicy.DISABLED

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _repo_error(self, exc: OSError, what: str) -> RepositoryError:
        return RepositoryError(
            f"cannot {what} in {self.path}: {os_error_text(exc)}", errno=exc.errno
        )

    def _new_tmp(self) -> TmpFile:
        try:
            return TmpFile.create(self.dir_fd, self.state)
        except OSError as exc:
            raise self._repo_error(exc, "create a temporary file") from exc

    def _copy(self, src_fd: int, tmp: TmpFile) -> None:
        try:
            copy_fd_data(src_fd, tmp.fd, self.state.copy)
        except OSError as exc:
            if exc.errno in _WRITE_ERRNOS:
                raise self._repo_error(exc, "write an object") from exc
            raise

    # -- fs-verity ----------------------------------------------------------------------
    def probe_verity(self) -> bool:
        """Find out once whether this filesystem can enable fs-verity, on a scratch file.

        Under the required policy an unsupported filesystem raises
        :class:`VerityRequiredError` here, before anything was written.
        Under the disabled policy nothing is tried and False is returned.
        """
        if self.policy is VerityPolicy.DISABLED:
            return False
        if self.state.verity is not None:
            if not self.state.verity:
                self._unsupported(None)
            return self.state.verity
        tmp = self._new_tmp()
        try:
            try:
                _write_all(tmp.fd, b"composefsd verity probe\n")
                tmp.seal()
            except OSError as exc:
                raise self._repo_error(exc, "write a test file") from exc
            try:
                ok = self._enable(tmp.fd, f"a test file in {self.path}")
            except _Busy:
                ok = False
        finally:
            tmp.close()
        return ok

    def _unsupported(self, exc: VerityError | None) -> bool:
        self.state.verity = False
        reason = exc.message if exc is not None else "the filesystem cannot enable it"
        if self.policy is VerityPolicy.REQUIRED:
            why = f" ({exc.strerror})" if exc is not None and exc.strerror else ""
            raise VerityRequiredError(
                f"fs-verity unsupported: the kernel or filesystem of {self.path} cannot "
                f"enable fs-verity{why}, and the repository requires it on every object",
                errno=exc.errno if exc is not None else errno.EOPNOTSUPP,
            )
        if not self._warned_unsupported:
            self._warned_unsupported = True
            log.debug(
                "fs-verity unsupported in %s; storing objects without it: %s", self.path, reason
            )
        return False

    def _enable(self, fd: int, what: str) -> bool:
        """Enable fs-verity on a read-only fd; False where the policy allows doing without."""
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                enable_verity(fd, self.algorithm, path=what)
                break
            except VerityAlreadyEnabledError:
                break
            except VerityFileBusyError:
                if attempt == _BUSY_RETRIES:
                    raise _Busy() from None
                time.sleep(_BUSY_SLEEP)
            except VerityUnsupportedError as exc:
                return self._unsupported(exc)
            except VerityError as exc:
                if self.policy is VerityPolicy.REQUIRED:
                    raise VerityRequiredError(
                        f"cannot enable fs-verity on {what} in {self.path}: {exc}", errno=exc.errno
                    ) from exc
                log.warning("fs-verity not enabled on %s: %s", what, exc)
                return False
        self.state.verity = True
        return True

    def _wants_verity(self) -> bool:
        return self._verity_policy and self.state.verity is not False

    def _verity_existing(self, rel: str, digest: bytes) -> bool | object:
        """Verity of an existing object, enabling it if missing; ``_REPLACE`` if the
        kernel's digest shows the object is not what its name says."""
        if not self._wants_verity():
            return False
        try:
            fd = os.open(
                rel, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self.dir_fd
            )
        except OSError as exc:
            raise self._repo_error(exc, f"open object {rel}") from exc
        try:
            try:
                measured = measure_verity(fd, self.algorithm)
            except VerityNotEnabledError:
                try:
                    if not self._enable(fd, f"object {rel}"):
                        return False
                except _Busy:
                    if self.policy is VerityPolicy.REQUIRED:
                        raise VerityRequiredError(
                            f"cannot enable fs-verity on object {rel}: it is open for writing"
                        ) from None
                    return False
                measured = measure_verity(fd, self.algorithm)
            except VerityUnsupportedError as exc:
                return self._unsupported(exc)
            except VerityError as exc:
                if self.policy is VerityPolicy.REQUIRED:
                    raise VerityRequiredError(f"object {rel}: {exc}", errno=exc.errno) from exc
                log.warning("object %s: %s", rel, exc)
                return False
        finally:
            os.close(fd)
        if measured != digest:
            log.warning("object %s has fs-verity digest %s; replacing it", rel, measured.hex())
            return _REPLACE
        return True

    # -- lookups ------------------------------------------------------------------------
    def rel(self, digest: bytes) -> str:
        return object_relpath(digest.hex())

    def existing(self, digest: bytes, size: int) -> ObjectResult | object | None:
        """The reusable object of that digest and size, None if absent, or ``_REPLACE``."""
        rel = self.rel(digest)
        try:
            st = os.stat(rel, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._repo_error(exc, f"look up object {rel}") from exc
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            log.warning(
                "object %s is damaged (%s, %d bytes instead of %d); replacing it",
                rel,
                "regular file" if stat.S_ISREG(st.st_mode) else "not a regular file",
                st.st_size,
                size,
            )
            return _REPLACE
        verity = self._verity_existing(rel, digest)
        if verity is _REPLACE:
            return _REPLACE
        return ObjectResult(digest.hex(), False, bool(verity), size)

    # -- publishing -----------------------------------------------------------------------
    def _publish(self, tmp: TmpFile, digest: bytes, size: int, replace: bool) -> ObjectResult:
        """Seal, verity, link. ``tmp`` is consumed (closed) whatever happens."""
        rel = self.rel(digest)
        holder = [tmp]
        try:
            try:
                os.fchmod(tmp.fd, OBJECT_MODE)
                if self.fsync_each:
                    os.fsync(tmp.fd)
                tmp.seal()
            except OSError as exc:
                raise self._repo_error(exc, "write an object") from exc
            verity = self._wants_verity() and self._verity_new(holder, digest)
            tmp = holder[-1]
            try:
                if replace:
                    tmp.replace(self.dir_fd, rel)
                    return ObjectResult(digest.hex(), True, verity, size)
                try:
                    linked = tmp.link(self.dir_fd, rel)
                except FileNotFoundError:
                    make_dir(rel[:2], _DIR_MODE, dir_fd=self.dir_fd, exist_ok=True)
                    linked = tmp.link(self.dir_fd, rel)
            except OSError as exc:
                raise self._repo_error(exc, f"publish object {rel}") from exc
        finally:
            for t in holder:
                t.close()
        if linked:
            return ObjectResult(digest.hex(), True, verity, size)
        # Another writer published it meanwhile.
        found = self.existing(digest, size)
        if isinstance(found, ObjectResult):
            return found
        raise RepositoryError(f"object {rel} appeared damaged while being published")

    def _verity_new(self, holder: list[TmpFile], digest: bytes) -> bool:
        """Enable and check verity on ``holder[-1]``; a copy made because of ETXTBSY is
        appended to ``holder`` (the caller closes them all)."""
        for attempt in range(2):
            tmp = holder[-1]
            try:
                if not self._enable(tmp.fd, "a new object"):
                    return False
            except _Busy:
                if attempt:
                    if self.policy is VerityPolicy.REQUIRED:
                        raise VerityRequiredError(
                            "cannot enable fs-verity on a new object: it stays open for "
                            "writing in another process"
                        ) from None
                    log.warning("fs-verity not enabled on a new object: file busy")
                    return False
                # A writable fd leaked into a forked child: enable verity on a copy.
                fresh = self._new_tmp()
                holder.append(fresh)
                try:
                    self._copy(tmp.fd, fresh)
                    os.fchmod(fresh.fd, OBJECT_MODE)
                    if self.fsync_each:
                        os.fsync(fresh.fd)
                    fresh.seal()
                except OSError as exc:
                    raise self._repo_error(exc, "write an object") from exc
                continue
            measured = measure_verity(tmp.fd, self.algorithm)
            if measured != digest:
                raise SourceError(
                    f"the copy's fs-verity digest {measured.hex()} differs from {digest.hex()}: "
                    f"the source changed while it was copied"
                )
            return True
        raise AssertionError("unreachable")

    def store_bytes(self, data: bytes | bytearray | memoryview) -> ObjectResult:
        """Publish ``data`` as an object (an image, for instance)."""
        digest = digest_bytes(data, self.algorithm)
        size = memoryview(data).nbytes
        found = self.existing(digest, size)
        if isinstance(found, ObjectResult):
            return found
        tmp = self._new_tmp()
        try:
            _write_all(tmp.fd, data)
        except OSError as exc:
            tmp.close()
            raise self._repo_error(exc, "write an object") from exc
        except BaseException:
            tmp.close()
            raise
        return self._publish(tmp, digest, size, found is _REPLACE)

    def import_fd(self, src_fd: int, *, expected: bytes | None = None) -> ObjectResult:
        """Publish the regular file open at ``src_fd``: hash it, copy it only if new.

        ``expected``: the digest the caller was told (a dumpfile's); a different
        one is a :class:`SourceError`. The file must not change meanwhile (its size,
        mtime and ctime are compared before and after), else :class:`SourceError`.
        """
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError("not a regular file", errno=errno.EINVAL)
        digest = digest_fd(src_fd, self.algorithm, threads=1)
        if expected is not None and digest != expected:
            raise SourceError(f"its digest is {digest.hex()}, not {expected.hex()}")
        found = self.existing(digest, st.st_size)
        if isinstance(found, ObjectResult):
            _check_unchanged(src_fd, st)
            return found
        tmp = self._new_tmp()
        try:
            os.lseek(src_fd, 0, os.SEEK_SET)
            self._copy(src_fd, tmp)
            _check_unchanged(src_fd, st)
        except BaseException:
            tmp.close()
            raise
        return self._publish(tmp, digest, st.st_size, found is _REPLACE)

    def import_fd_hashing_copy(
        self, src_fd: int, *, expected: bytes | None = None, buf: bytearray | None = None
    ) -> ObjectResult:
        """As :meth:`import_fd`, but reads the source once: each chunk is hashed and
        written to the temporary file, which is dropped if the object exists."""
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError("not a regular file", errno=errno.EINVAL)
        view = memoryview(buf if buf is not None else bytearray(_COPY_BUFSIZE))
        hasher = FsVerityHasher(self.algorithm)
        tmp = self._new_tmp()
        try:
            offset = 0
            while True:
                got = os.preadv(src_fd, [view], offset)
                if not got:
                    break
                chunk = view[:got]
                hasher.update(chunk)
                try:
                    _write_all(tmp.fd, chunk)
                except OSError as exc:
                    raise self._repo_error(exc, "write an object") from exc
                offset += got
            _check_unchanged(src_fd, st)
            digest = hasher.digest()
            if expected is not None and digest != expected:
                raise SourceError(f"its digest is {digest.hex()}, not {expected.hex()}")
            found = self.existing(digest, offset)
        except BaseException:
            tmp.close()
            raise
        if isinstance(found, ObjectResult):
            tmp.close()
            return found
        return self._publish(tmp, digest, offset, found is _REPLACE)


def _check_unchanged(fd: int, before: os.stat_result) -> None:
    after = os.fstat(fd)
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
        before.st_size,
        before.st_mtime_ns,
        before.st_ctime_ns,
    ):
        raise SourceError("it changed while it was being imported", errno=errno.EAGAIN)


def sync_objects(objects_dir: str | os.PathLike[str], rels: Iterable[str]) -> None:
    """Make objects durable: fsync each one and every ``XX`` directory holding one,
    then ``objects/`` itself, many at once so that the filesystem commits them
    together. From ``_SYNC_ALL_MIN`` objects on, one ``sync()`` instead: every
    fsync costs a journal commit, and for a whole tree (/usr: 106,000 objects, 11 s
    of fsyncs against 1 s of sync on ext4) one flush of everything is far cheaper.
    (``syncfs`` of just this filesystem would need ctypes, which this layer does
    not use.)"""
    rels = list(rels)
    if not rels:
        return
    if len(rels) >= _SYNC_ALL_MIN:
        os.sync()
        return
    dir_fd = os.open(objects_dir, _DIR_FLAGS)
    try:

        def one(rel: str) -> None:
            fd = os.open(rel, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        dirs = sorted({rel.split("/", 1)[0] for rel in rels})
        with ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="cfs-sync") as pool:
            list(pool.map(one, rels, chunksize=64))
            list(pool.map(one, dirs))
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- bulk imports -----------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ImportTask:
    """One file to import, at ``rel`` beneath the import's source directory.

    ``inline``: only read its content (a file of at most 64 bytes that the image
    stores inline). ``expected``: the digest it must have; when given and the
    object exists, the source is not even read. ``key``: the file as the scan saw
    it; the file opened must still be that one (:mod:`composefsd.sources.beneath`)."""

    rel: bytes
    size: int
    expected: bytes | None = None
    inline: bool = False
    #: Hash it while copying it (it is known to need copying).
    hashing_copy: bool = False
    key: FileKey | None = None


@dataclass(slots=True, frozen=True)
class ImportResult:
    digest: bytes | None
    content: bytes | None
    written: bool
    verity: bool
    #: The source's key (dev, ino, size, mtime_ns, ctime_ns) when it was hashed.
    stat: FileKey | None = None


@dataclass(slots=True, frozen=True)
class ImportConfig:
    """Everything a worker process needs to read the source and publish into a
    repository. ``source_fd`` is the directory files are read beneath (worker
    processes inherit it), ``display`` its name for messages, and ``credentials``
    whose rights to read with (None: the importing process's own)."""

    objects_dir: str
    algorithm: str
    policy: str
    verity: bool | None
    source_fd: int
    display: bytes = b"."
    fsync_each: bool = False
    hashing_copy: bool = False
    credentials: Credentials | None = None

    def store(self, state: PublishState | None = None) -> ObjectStore:
        return ObjectStore(
            self.objects_dir,
            Algorithm.parse(self.algorithm),
            VerityPolicy(self.policy),
            state=state or PublishState(self.verity),
            fsync_each=self.fsync_each,
        )

    def opener(self) -> BeneathOpener:
        return BeneathOpener(self.source_fd, self.display)

    def to_wire(self) -> tuple[object, ...]:
        creds = self.credentials.to_wire() if self.credentials is not None else None
        return (
            self.objects_dir,
            self.algorithm,
            self.policy,
            self.verity,
            self.source_fd,
            self.display,
            self.fsync_each,
            self.hashing_copy,
            creds,
        )

    @classmethod
    def from_wire(cls, wire: tuple[object, ...]) -> ImportConfig:
        (objects_dir, algorithm, policy, verity, source_fd, display, fsync_each, copy, creds) = wire
        assert isinstance(objects_dir, str) and isinstance(algorithm, str)
        assert isinstance(policy, str) and isinstance(source_fd, int)
        assert isinstance(display, bytes)
        assert verity is None or isinstance(verity, bool)
        return cls(
            objects_dir,
            algorithm,
            policy,
            verity,
            source_fd,
            display,
            bool(fsync_each),
            bool(copy),
            Credentials.from_wire(creds) if creds is not None else None,  # type: ignore[arg-type]
        )


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
                hexed = digest.hex()
                try:
                    ost = os.stat(hexed[:2] + "/" + hexed[2:], dir_fd=dir_fd, follow_symlinks=False)
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


# Marshal-friendly forms of tasks, results and failures.
#: A digest cache entry: the key, then the digest.
_Cached = tuple[int, int, int, int, int, bytes]
#: (rel, size, expected, inline, hashing copy, key)
_Task = tuple[bytes, int, "bytes | None", bool, bool, "FileKey | None"]
_Result = tuple["bytes | None", "bytes | None", bool, bool, "FileKey | None"]
_Failure = tuple[str, "int | None", str]


def _copy_task(task: ImportTask) -> ImportTask:
    """``task``, hashed as it is copied (an unchanged file whose object is gone)."""
    return ImportTask(task.rel, task.size, task.expected, False, True, task.key)


def _source_error(opener: BeneathOpener, rel: bytes, exc: OSError) -> SourceError:
    if isinstance(exc, ChangedError):
        return SourceError(str(exc), errno=exc.errno)
    path = os.fsdecode(opener.full_path(rel))
    return SourceError(f"cannot read {path}: {os_error_text(exc)}", errno=exc.errno)


def _open_sources(
    opener: BeneathOpener, tasks: Sequence[_Task], skip: Sequence[bool], creds: Credentials | None
) -> tuple[list[int | None], SourceError | None]:
    """Open the sources of ``tasks`` (not those ``skip`` marks), with ``creds``'s rights;
    stops at the first failure, which is returned with the fds opened before it."""
    fds: list[int | None] = []
    try:
        with acting_as(creds):
            for task, skipped in zip(tasks, skip, strict=True):
                if skipped:
                    fds.append(None)
                    continue
                try:
                    fds.append(opener.open(task[0], task[5]))
                except OSError as exc:
                    return fds, _source_error(opener, task[0], exc)
    except CredentialsError as exc:
        who = f"uid {creds.uid}" if creds is not None else "this process"
        return fds, SourceError(
            f"cannot read {os.fsdecode(opener.display)} with the rights of {who}: {exc.strerror}",
            errno=exc.errno,
        )
    return fds, None


def _import_fd(
    store: ObjectStore, fd: int, task: _Task, hashing_copy: bool, buf: bytearray, path: str
) -> _Result:
    _rel, size, expected, inline, copy, _key = task
    try:
        if inline:
            # C lcfs_node_set_from_content: read it all; shorter than stat said is ENODATA.
            data = _read_all(fd)
            if len(data) < size:
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
            return None, data[:size], False, False, None
        st = os.fstat(fd)
        # An unchanged file whose object is gone: it will be copied, hash it on the way.
        if hashing_copy or copy:
            result = store.import_fd_hashing_copy(fd, expected=expected, buf=buf)
        else:
            result = store.import_fd(fd, expected=expected)
        _check_unchanged(fd, st)
    except SourceError as exc:
        raise SourceError(f"{path}: {exc.message}", errno=exc.errno) from exc
    except OSError as exc:
        # Repository-side failures arrive as RepositoryError; this one is the source's.
        raise SourceError(f"cannot read {path}: {os_error_text(exc)}", errno=exc.errno) from exc
    if result.size != size:
        raise SourceError(
            f"{path}: {result.size} bytes, not {size} as when it was scanned", errno=errno.EAGAIN
        )
    return bytes.fromhex(result.digest), None, result.written, result.verity, file_key(st)


def _failure(exc: BaseException) -> _Failure:
    if isinstance(exc, VerityRequiredError):
        return "verity", exc.errno, exc.message
    if isinstance(exc, SourceError):
        return "source", exc.errno, exc.message
    if isinstance(exc, RepositoryError):
        return "repo", exc.errno, exc.message
    if isinstance(exc, OSError):
        return "repo", exc.errno, f"cannot write an object: {os_error_text(exc)}"
    return "internal", None, f"{type(exc).__name__}: {exc}"


def _raise_failure(failure: _Failure) -> None:
    kind, err, message = failure
    if kind == "verity":
        raise VerityRequiredError(message, errno=err)
    if kind == "source":
        raise SourceError(message, errno=err)
    raise RepositoryError(message, errno=err)


def _run_batch(
    store: ObjectStore,
    opener: BeneathOpener,
    tasks: Sequence[_Task],
    hashing_copy: bool,
    buf: bytearray,
    creds: Credentials | None = None,
) -> list[_Result | _Failure]:
    """Import a batch; a failure ends it (and is its last entry).

    Three steps, so that ``creds`` are only in effect while the sources are
    opened: the repository is looked up and written with this process's rights.
    """
    out: list[_Result | _Failure] = []
    found: list[ObjectResult | None] = []
    try:
        for _rel, size, expected, inline, _copy, _key in tasks:
            hit = store.existing(expected, size) if expected is not None and not inline else None
            found.append(hit if isinstance(hit, ObjectResult) else None)
    except Exception as exc:  # reported to the parent, which raises it
        return [_failure(exc)]
    fds, failure = _open_sources(opener, tasks, [f is not None for f in found], creds)
    try:
        for i, fd in enumerate(fds):
            hit = found[i]
            if hit is not None:
                out.append((bytes.fromhex(hit.digest), None, False, hit.verity, None))
                continue
            assert fd is not None
            path = os.fsdecode(opener.full_path(tasks[i][0]))
            try:
                out.append(_import_fd(store, fd, tasks[i], hashing_copy, buf, path))
            except Exception as exc:  # reported to the parent, which raises it
                out.append(_failure(exc))
                return out
            finally:
                os.close(fd)
                fds[i] = None
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)
    if failure is not None:
        out.append(_failure(failure))
    return out


def _worker_main() -> None:
    """An import worker process: a config, then batches from stdin, results to stdout.

    It reads the source beneath the inherited ``config.source_fd`` and, with
    ``config.credentials``, opens it with the caller's rights
    (:func:`composefsd.credentials.acting_as`; this process has one thread)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    inp, out = sys.stdin.buffer, sys.stdout.buffer

    def receive() -> object:
        try:
            return workerproc.receive(inp)
        except EOFError:
            return None

    config_tuple = receive()
    if config_tuple is None:
        return
    assert isinstance(config_tuple, tuple)
    config = ImportConfig.from_wire(config_tuple)
    buf = bytearray(_COPY_BUFSIZE)
    with config.store() as store, config.opener() as opener:
        while True:
            tasks = receive()
            if tasks is None or os.getppid() != parent:
                return
            assert isinstance(tasks, list)
            reply = _run_batch(store, opener, tasks, config.hashing_copy, buf, config.credentials)
            try:
                workerproc.write_message(out, reply)
            except BrokenPipeError:
                # The parent is gone (killed): what this batch published is complete
                # objects; leave without a traceback, and without flushing again.
                os._exit(0)


def _start_worker(config: ImportConfig, pass_fds: Sequence[int]) -> subprocess.Popen[bytes]:
    # Its stderr stays ours: an import worker's failure is worth seeing.
    proc = workerproc.start(
        "composefsd.repository.objects",
        "_worker_main",
        pass_fds=(*pass_fds, config.source_fd),
        quiet=False,
    )
    workerproc.send(proc, config.to_wire())
    return proc


class _Lane(threading.Thread):
    def __init__(self, importer: Importer, index: int) -> None:
        super().__init__(name=f"cfs-import-{index}", daemon=True)
        self.importer = importer
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self) -> None:
        imp = self.importer
        buf = bytearray(_COPY_BUFSIZE)
        opener = imp.config.opener()
        try:
            while True:
                item = imp.work.get()
                if item is None:
                    return
                if imp.failure is not None:
                    continue
                start, tasks = item
                if imp.use_processes:
                    results = self._remote(tasks)
                else:
                    assert imp.store is not None
                    results = _run_batch(imp.store, opener, tasks, imp.config.hashing_copy, buf)
                imp.done(start, tasks, results)
        except BaseException as exc:  # never die silently: it would hang run()
            imp.fail(_failure(exc))
        finally:
            opener.close()
            self.stop()

    def _remote(self, tasks: list[_Task]) -> list[_Result | _Failure]:
        imp = self.importer
        if self.proc is None:
            self.proc = _start_worker(imp.config, imp.pass_fds)
        assert self.proc.stdout is not None
        workerproc.send(self.proc, tasks)
        try:
            results: list[_Result | _Failure] = workerproc.receive(self.proc.stdout)
        except EOFError:
            raise RepositoryError(f"import worker exited with status {self.proc.wait()}") from None
        return results

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            workerproc.stop(proc, kill=self.importer.failure is not None, timeout=30)


class Importer:
    """Imports many files into a repository's objects, in ``threads`` lanes.

    ``run(tasks)`` returns one :class:`ImportResult` per task, in order, or raises
    the first failure (:class:`SourceError`, :class:`VerityRequiredError`,
    :class:`RepositoryError`). ``progress(files_done, bytes_done)`` is called from
    the calling thread a few times a second. ``pass_fds`` go to worker processes
    (the repository lock fd), as does ``config.source_fd``. With
    ``config.credentials`` the import always runs in worker processes: a process
    with other threads cannot switch rights for one of them.
    """

    def __init__(
        self,
        config: ImportConfig,
        *,
        threads: int,
        use_processes: bool | None = None,
        pass_fds: Sequence[int] = (),
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.config = config
        self.threads = max(1, threads)
        self.use_processes_opt = use_processes
        self.use_processes = False
        self.pass_fds = tuple(pass_fds)
        self.progress = progress
        self.store: ObjectStore | None = None
        self.work: queue.SimpleQueue[tuple[int, list[_Task]] | None] = queue.SimpleQueue()
        self.failure: _Failure | None = None
        self.files_done = 0
        self.bytes_done = 0
        #: Digests (hex) of the objects this import wrote, failed or not (known once
        #: their batch came back: a worker killed mid-batch takes its own with it).
        self.written: list[str] = []
        self._results: list[_Result | None] = []
        self._lock = threading.Lock()

    def done(self, start: int, tasks: list[_Task], results: list[_Result | _Failure]) -> None:
        files = size = 0
        written: list[str] = []
        for i, result in enumerate(results):
            if isinstance(result[0], str):
                self.fail(result)
                break
            self._results[start + i] = result
            files += 1
            size += tasks[i][1]
            digest = result[0]
            if result[2] and isinstance(digest, bytes):
                written.append(digest.hex())
        with self._lock:
            self.files_done += files
            self.bytes_done += size
            self.written.extend(written)

    def fail(self, failure: _Failure) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = failure

    def run(self, tasks: Sequence[ImportTask]) -> list[ImportResult]:
        self._results = [None] * len(tasks)
        if not tasks:
            return []
        total = sum(t.size for t in tasks if not t.inline)
        if self.config.credentials is not None:
            self.use_processes = True
        elif self.use_processes_opt is None:
            self.use_processes = self.threads > 1 and total >= _PROCESS_MIN_BYTES
        else:
            self.use_processes = self.use_processes_opt
        lanes = [_Lane(self, i) for i in range(min(self.threads, len(tasks)))]
        if not self.use_processes:
            self.store = self.config.store()
        try:
            batch: list[_Task] = []
            batch_bytes = 0
            start = 0
            for i, t in enumerate(tasks):
                if not batch:
                    start = i
                batch.append((t.rel, t.size, t.expected, t.inline, t.hashing_copy, t.key))
                batch_bytes += 0 if t.inline else t.size
                if len(batch) >= _BATCH_FILES or batch_bytes >= _BATCH_BYTES:
                    self.work.put((start, batch))
                    batch, batch_bytes = [], 0
            if batch:
                self.work.put((start, batch))
            for _ in lanes:
                self.work.put(None)
            for lane in lanes:
                lane.start()
            for lane in lanes:
                while lane.is_alive():
                    lane.join(_PROGRESS_INTERVAL)
                    if self.progress is not None:
                        self.progress(self.files_done, self.bytes_done)
        except BaseException:
            self.fail(("internal", None, "interrupted"))
            for lane in lanes:
                if lane.proc is not None:
                    lane.proc.kill()
            for lane in lanes:
                if lane.is_alive():
                    lane.join()
            raise
        finally:
            if self.store is not None:
                self.store.close()
                self.store = None
        if self.failure is not None:
            _raise_failure(self.failure)
        if self.progress is not None:
            self.progress(self.files_done, self.bytes_done)
        out: list[ImportResult] = []
        for r in self._results:
            assert r is not None
            out.append(ImportResult(r[0], r[1], r[2], r[3], r[4]))
        return out
