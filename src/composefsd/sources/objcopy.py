"""Copy file data into a content-addressed object store the way C ``mkcomposefs`` does.

C ``mkcomposefs --digest-store`` (reference notes, section 7.4) stores each object
as ``STORE/XX/rest-of-hex``: parents are created with mode 0755, an existing object
is never rewritten, the data goes to a ``.tmpXXXXXX`` file in the store root (reflink
first, then ``copy_file_range``, then plain read/write), which is made 0644,
fsync'ed, offered fs-verity, and renamed into place. This module does exactly
that, so that the repository layer and the scanner share one implementation.

Everything here is safe to call from several threads at once with one shared
:class:`CopyState`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import string
import threading

from composefsd.kernel.files import clone_file
from composefsd.kernel.verity import VerityUnsupportedError, enable_verity
from composefsd.objectlayout import C_TMP_PREFIX, join_store_path

__all__ = [
    "NO_REFLINK",
    "CopyState",
    "copy_fd_data",
    "mkdir_parents",
    "store_object",
    "write_all",
]

log = logging.getLogger(__name__)

# C copies with an 8 KiB buffer; the size is invisible in the result, so use more.
_CLASSIC_BUFSIZE = 1 << 20
_TEMPLATE_CHARS = (string.ascii_letters + string.digits).encode()
# Random bytes -> mkstemp's alphabet, in one translate() instead of a call per character.
_TEMPLATE_TABLE = bytes(_TEMPLATE_CHARS[i % len(_TEMPLATE_CHARS)] for i in range(256))
# copy_file_range errors after which C copies this one file by hand (it never copied a byte).
_RANGE_RETRY_CLASSIC = frozenset((errno.EOPNOTSUPP, errno.EPERM, errno.EINVAL, errno.EBADF))
# copy_file_range errors after which C stops trying it for the rest of the run.
_RANGE_DISABLE = frozenset((errno.ENOSYS, errno.EXDEV))
#: FICLONE errors that say "not between these two filesystems", whatever the file.
NO_REFLINK = frozenset((errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV))


class CopyState:
    """What one store-filling run has learned, shared by its threads (one per store).

    ``copy_file_range`` is dropped for the whole run after ENOSYS/EXDEV, as in C.
    Where C retries what cannot work with the same result every time, this
    remembers instead: reflinking is not tried again from a source filesystem
    (``st_dev``) that said it cannot reflink into the store, and fs-verity is not
    offered again once the store's filesystem said it cannot do it. Directories
    already checked or created are remembered so that each is stat'ed once per run
    instead of once per object.
    """

    __slots__ = ("_dirs", "_lock", "no_reflink_from", "try_copy_file_range", "try_verity")

    def __init__(self) -> None:
        self.try_copy_file_range = True
        self.try_verity = True
        self.no_reflink_from: set[int] = set()
        self._dirs: set[bytes] = set()
        self._lock = threading.Lock()

    def known_dir(self, path: bytes) -> bool:
        return path in self._dirs

    def add_dir(self, path: bytes) -> None:
        with self._lock:
            self._dirs.add(path)


def _ensure_dir(path: bytes, mode: int) -> None:
    try:
        st = os.stat(path)
    except OSError:
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        return
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)


def mkdir_parents(path: bytes, mode: int = 0o755, state: CopyState | None = None) -> None:
    """Create every directory leading to ``path`` (not ``path`` itself), like C ``mkdir_parents``.

    An existing non-directory on the way is ENOTDIR; other mkdir errors propagate.
    """
    n = len(path)
    i = 0
    while i < n and path[i] == 0x2F:
        i += 1
    while True:
        j = path.find(b"/", i)
        if j < 0:
            return
        prefix = path[:j]
        if state is None or not state.known_dir(prefix):
            _ensure_dir(prefix, mode)
            if state is not None:
                state.add_dir(prefix)
        i = j + 1
        while i < n and path[i] == 0x2F:
            i += 1


def _mkostemp(template_prefix: bytes) -> tuple[bytes, int]:
    """C ``mkostemp(prefix + "XXXXXX", O_CLOEXEC)``: a new file of mode 0600."""
    for _ in range(1000):
        name = template_prefix + os.urandom(6).translate(_TEMPLATE_TABLE)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        return name, fd
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), template_prefix)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd``, however many writes it takes."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            # A regular file never legitimately accepts zero bytes.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _copy_classic(src_fd: int, dst_fd: int) -> None:
    while chunk := os.read(src_fd, _CLASSIC_BUFSIZE):
        write_all(dst_fd, chunk)


def _copy_range(src_fd: int, dst_fd: int, size: int) -> None:
    remaining = size
    while remaining > 0:
        copied = os.copy_file_range(src_fd, dst_fd, remaining)
        if copied == 0:
            # Some filesystems (procfs, some overlay setups) report success but copy
            # nothing; C turns that into EINVAL so that the plain copy takes over.
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        remaining -= copied


def copy_fd_data(src_fd: int, dst_fd: int, state: CopyState) -> None:
    """Copy all of ``src_fd`` into ``dst_fd``: reflink, else copy_file_range, else read/write.

    Both offsets advance, so a fallback continues where a partial attempt stopped.
    """
    st = os.fstat(src_fd)
    if st.st_dev not in state.no_reflink_from:
        try:
            clone_file(src_fd, dst_fd)
            return
        except OSError as exc:
            if exc.errno in NO_REFLINK:
                state.no_reflink_from.add(st.st_dev)
    if state.try_copy_file_range:
        try:
            _copy_range(src_fd, dst_fd, st.st_size)
            return
        except OSError as exc:
            if exc.errno in _RANGE_DISABLE:
                state.try_copy_file_range = False
            elif exc.errno not in _RANGE_RETRY_CLASSIC:
                raise
    _copy_classic(src_fd, dst_fd)


def _offer_verity(path: bytes, state: CopyState) -> None:
    # The write fd is closed by now: the kernel refuses verity while one is open.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        enable_verity(fd)
    except VerityUnsupportedError:
        state.try_verity = False
    except OSError as exc:
        log.debug("fs-verity not enabled on %r: %s", path, exc)
    finally:
        os.close(fd)


def store_object(
    source: bytes | int,
    store: bytes,
    object_path: bytes,
    state: CopyState,
    *,
    try_verity: bool = True,
) -> bool:
    """Put a copy of ``source`` (a path, or an fd open for reading) at ``store/object_path``.

    Returns False when the object already existed (nothing is copied then), True
    when it was added. Raises ``OSError`` with the errno of the failing call; the
    temporary file is removed on any failure. An fd ``source`` is read from its
    current offset and is not closed.
    """
    dst = join_store_path(store, object_path)
    mkdir_parents(dst, 0o755, state)
    try:
        os.lstat(dst)
        return False
    except OSError:
        pass
    tmp, dst_fd = _mkostemp(join_store_path(store, C_TMP_PREFIX.encode()))
    try:
        try:
            if isinstance(source, int):
                copy_fd_data(source, dst_fd, state)
            else:
                src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    copy_fd_data(src_fd, dst_fd, state)
                finally:
                    os.close(src_fd)
            os.fchmod(dst_fd, 0o644)
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
        if try_verity and state.try_verity:
            _offer_verity(tmp, state)
        os.rename(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return True
