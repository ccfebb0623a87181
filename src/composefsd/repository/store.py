"""Publishing objects under ``objects/XX/<rest of hex>``: :class:`ObjectStore`.

An object is a regular file named by its fs-verity digest (the repository's
algorithm). Publishing one:

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

Hash first, copy only what is new (:meth:`ObjectStore.import_fd`), was measured
against hashing while copying (:meth:`ObjectStore.import_fd_hashing_copy`, one
read of the source): on /usr into an empty repository both take about as long
(the disk is the limit), and on a repository that already has the objects the
latter writes and throws away a copy of everything (20 s against 13 s). So
hashing while copying is used only for files known to need copying: unchanged
files (per the :class:`~composefsd.repository.digestcache.DigestCache`) whose
object is gone. Bulk imports are :mod:`composefsd.repository.importer`'s.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from composefsd.dirs import make_dir
from composefsd.fsverity import FsVerityHasher, digest_bytes, digest_fd
from composefsd.kernel.files import clone_file
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
from composefsd.objectlayout import (
    TMP_PREFIX,
    contains,
    is_hex_digest,
    iter_objects,
    object_relpath,
)
from composefsd.repository.errors import (
    CorruptObjectError,
    InvalidNameError,
    RepositoryError,
    SourceError,
    VerityRequiredError,
    os_error_text,
)
from composefsd.repository.meta import VerityPolicy
from composefsd.sources.objcopy import NO_REFLINK, CopyState, copy_fd_data, write_all

__all__ = [
    "COPY_BUFSIZE",
    "OBJECT_MODE",
    "NotRegularObjectError",
    "ObjectResult",
    "ObjectStore",
    "PublishState",
    "StoreMethod",
    "TmpFile",
    "check_unchanged",
    "open_object",
    "open_objects_dir",
    "random_name",
    "sync_objects",
]

log = logging.getLogger(__name__)

OBJECT_MODE = 0o644
#: The read buffer of a copy that hashes what it copies.
COPY_BUFSIZE = 1 << 20
_DIR_MODE = 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OBJECT_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_NAME_TABLE = bytes(_NAME_CHARS[i % len(_NAME_CHARS)] for i in range(256))
# O_TMPFILE errors that mean "not here" (EISDIR: kernels that predate it).
_NO_TMPFILE = frozenset((errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS))
_BUSY_RETRIES = 3
_BUSY_SLEEP = 0.001
_SYNC_THREADS = 16
_SYNC_ALL_MIN = 2000
# Errors of a copy that are the repository's side failing, not the source's.
_WRITE_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS))


class NotRegularObjectError(OSError):
    """What is at an object's path is not a regular file (a FIFO, a device, ...)."""


def open_objects_dir(objects_dir: str | os.PathLike[str]) -> int:
    """An ``O_PATH`` fd on a repository's ``objects/`` (not a symlink), for
    :func:`open_object`."""
    return os.open(objects_dir, _WALK_FLAGS)


def open_object(objects_fd: int, hexdigest: str) -> int:
    """A read-only fd on the object ``hexdigest`` (checked by the caller) below the
    directory fd ``objects_fd``: neither ``XX`` nor ``rest`` may be a symlink
    (``ENOTDIR``, ``ELOOP``), so nothing outside ``objects/`` is ever opened; it is
    opened without blocking and must be a regular file
    (:class:`NotRegularObjectError`, the fd closed)."""
    sub = os.open(hexdigest[:2], _WALK_FLAGS, dir_fd=objects_fd)
    try:
        fd = os.open(hexdigest[2:], _OBJECT_FLAGS, dir_fd=sub)
    finally:
        os.close(sub)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularObjectError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def random_name(prefix: str) -> str:
    """``prefix`` plus 12 random letters and digits."""
    return prefix + os.urandom(12).translate(_NAME_TABLE).decode()


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


class StoreMethod:
    """How :meth:`ObjectStore.import_verified` stored an object (cfsctl's counters)."""

    PRESENT = "present"
    REFLINKED = "reflinked"
    HARDLINKED = "hardlinked"
    COPIED = "copied"


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
    """Publishes objects into one repository's ``objects/`` directory, and reads them
    (:meth:`contains`, :meth:`open`, :meth:`iter_objects`; the layout is
    :mod:`composefsd.objectlayout`'s).

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
                write_all(tmp.fd, b"composefsd verity probe\n")
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
            fd = os.open(rel, _OBJECT_FLAGS, dir_fd=self.dir_fd)
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

    def _checked_rel(self, hexdigest: str) -> str:
        if not is_hex_digest(hexdigest, self.algorithm):
            raise InvalidNameError(f"not a {self.algorithm.value} digest: {hexdigest!r}")
        return object_relpath(hexdigest)

    def contains(self, hexdigest: str) -> bool:
        """Whether something is at the object's path (a damaged object counts too)."""
        self._checked_rel(hexdigest)
        return contains(self.dir_fd, hexdigest)

    def open(self, hexdigest: str) -> int:
        """A read-only fd on the object (:func:`open_object`); ``OSError`` if it
        cannot be opened, :class:`InvalidNameError` for a name that is no digest."""
        self._checked_rel(hexdigest)
        return open_object(self.dir_fd, hexdigest)

    def iter_objects(self) -> Iterator[str]:
        """The hex digests of the well-named objects (regular files) present."""
        return iter_objects(self.dir_fd, self.algorithm)

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
    def _seal(self, tmp: TmpFile) -> None:
        """Give a written object its mode, its data to the disk if asked, and seal it."""
        try:
            os.fchmod(tmp.fd, OBJECT_MODE)
            if self.fsync_each:
                os.fsync(tmp.fd)
            tmp.seal()
        except OSError as exc:
            raise self._repo_error(exc, "write an object") from exc

    def _publish(self, tmp: TmpFile, digest: bytes, size: int, replace: bool) -> ObjectResult:
        """Seal, verity, link. ``tmp`` is consumed (closed) whatever happens."""
        rel = self.rel(digest)
        holder = [tmp]
        try:
            self._seal(tmp)
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
        raise CorruptObjectError(f"object {rel} appeared damaged while being published")

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
                except OSError as exc:
                    raise self._repo_error(exc, "write an object") from exc
                self._seal(fresh)
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
            write_all(tmp.fd, data)
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
            check_unchanged(src_fd, st)
            return found
        tmp = self._new_tmp()
        try:
            os.lseek(src_fd, 0, os.SEEK_SET)
            self._copy(src_fd, tmp)
            check_unchanged(src_fd, st)
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
        view = memoryview(buf if buf is not None else bytearray(COPY_BUFSIZE))

        def chunks() -> Iterator[memoryview]:
            offset = 0
            while got := os.preadv(src_fd, [view], offset):
                yield view[:got]
                offset += got

        tmp = self._new_tmp()
        try:
            digest, size = self._write_hashing(tmp, chunks())
            check_unchanged(src_fd, st)
            if expected is not None and digest != expected:
                raise SourceError(f"its digest is {digest.hex()}, not {expected.hex()}")
        except BaseException:
            tmp.close()
            raise
        return self._publish_new(tmp, digest, size)

    def import_verified(
        self, src_fd: int, digest: bytes, size: int, *, link: bool = False
    ) -> tuple[ObjectResult, str]:
        """Publish the regular file open at ``src_fd`` (exactly ``size`` bytes), which
        the caller has hashed to ``digest``, and say how (a :class:`StoreMethod`):
        reused, else reflinked, else (with ``link``) hard-linked, else copied, as
        composefs-rs's ``ensure_object_from_file`` tries them.

        The file may change after the caller hashed it, so what enters the store is
        checked again: a reflink is hashed (it cannot change any more), a copy is
        hashed as it is written; a mismatch is a :class:`SourceError`. A hard link
        shares the inode, which cannot be checked once and for all: ``link`` says
        the caller vouches that nobody it does not trust can write the file, and
        even then it is linked only on the objects' filesystem and where the store
        would not enable fs-verity (or the file has it, with this digest).
        """
        found = self.existing(digest, size)
        if isinstance(found, ObjectResult):
            return found, StoreMethod.PRESENT
        replace = found is _REPLACE
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise SourceError(f"not a regular file of {size} bytes", errno=errno.EINVAL)
        if st.st_dev not in self.state.copy.no_reflink_from:
            tmp = self._new_tmp()
            try:
                clone_file(src_fd, tmp.fd)
            except OSError as exc:
                tmp.close()
                if exc.errno not in NO_REFLINK and exc.errno != errno.EINVAL:
                    raise self._repo_error(exc, "reflink an object") from exc
                self.state.copy.no_reflink_from.add(st.st_dev)
            else:
                try:
                    if os.fstat(tmp.fd).st_size != size or (
                        digest_fd(tmp.fd, self.algorithm, threads=1) != digest
                    ):
                        raise SourceError("the file changed after it was hashed")
                except BaseException:
                    tmp.close()
                    raise
                return self._publish(tmp, digest, size, replace), StoreMethod.REFLINKED
        if link and not replace:
            linked = self._link_source(src_fd, st, digest)
            if linked is not None:
                return linked
        result = self.import_fd_hashing_copy(src_fd, expected=digest)
        if result.size != size:
            raise SourceError("the file changed after it was hashed")
        return result, StoreMethod.COPIED if result.written else StoreMethod.PRESENT

    def must_copy(self, st: os.stat_result, link: bool) -> bool:
        """Whether :meth:`import_verified` would copy a file with this stat (and
        ``link``): reflinking from its filesystem failed before, and it may not or
        cannot be hard-linked. A caller can then copy it while hashing it, in one
        read (:meth:`store_chunks`)."""
        if st.st_dev not in self.state.copy.no_reflink_from:
            return False
        return not (link and st.st_dev == os.fstat(self.dir_fd).st_dev and not self._wants_verity())

    def _link_source(
        self, src_fd: int, st: os.stat_result, digest: bytes
    ) -> tuple[ObjectResult, str] | None:
        """Hard-link the caller's file as object ``digest`` (:meth:`import_verified`);
        None where it cannot be (the caller copies instead)."""
        if st.st_dev != os.fstat(self.dir_fd).st_dev:
            return None
        verity = False
        if self._wants_verity():
            try:
                verity = measure_verity(src_fd, self.algorithm) == digest
            except VerityError:
                verity = False
            if not verity:
                return None
        rel = self.rel(digest)
        for attempt in range(2):
            try:
                # dst_dir_fd makes CPython call linkat(AT_SYMLINK_FOLLOW) on the magic link.
                os.link(f"/proc/self/fd/{src_fd}", rel, dst_dir_fd=self.dir_fd)
            except FileNotFoundError:
                if attempt:
                    return None
                make_dir(rel[:2], _DIR_MODE, dir_fd=self.dir_fd, exist_ok=True)
                continue
            except FileExistsError:
                found = self.existing(digest, st.st_size)
                if isinstance(found, ObjectResult):
                    return found, StoreMethod.PRESENT
                return None
            except OSError as exc:
                log.debug("cannot hard-link object %s: %s", rel, exc.strerror)
                return None
            return ObjectResult(digest.hex(), True, verity, st.st_size), StoreMethod.HARDLINKED
        return None

    def store_chunks(self, chunks: Iterable[bytes | bytearray | memoryview]) -> ObjectResult:
        """Publish the concatenation of ``chunks`` as an object, reading them once:
        each is hashed and written to a temporary file, dropped if the object
        exists. For data that arrives as a stream (a tar member) and must never be
        held whole; an exception from ``chunks`` leaves nothing behind."""
        tmp = self._new_tmp()
        try:
            digest, size = self._write_hashing(tmp, chunks)
        except BaseException:
            tmp.close()
            raise
        return self._publish_new(tmp, digest, size)

    def _write_hashing(
        self, tmp: TmpFile, chunks: Iterable[bytes | bytearray | memoryview]
    ) -> tuple[bytes, int]:
        """Write ``chunks`` to ``tmp`` and hash them on the way: (digest, size)."""
        hasher = FsVerityHasher(self.algorithm)
        size = 0
        for chunk in chunks:
            hasher.update(chunk)
            try:
                write_all(tmp.fd, chunk)
            except OSError as exc:
                raise self._repo_error(exc, "write an object") from exc
            size += memoryview(chunk).nbytes
        return hasher.digest(), size

    def _publish_new(self, tmp: TmpFile, digest: bytes, size: int) -> ObjectResult:
        """Publish ``tmp``, written and hashed, unless the object already exists
        (then ``tmp`` is dropped)."""
        try:
            found = self.existing(digest, size)
        except BaseException:
            tmp.close()
            raise
        if isinstance(found, ObjectResult):
            tmp.close()
            return found
        return self._publish(tmp, digest, size, found is _REPLACE)


def check_unchanged(fd: int, before: os.stat_result) -> None:
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
