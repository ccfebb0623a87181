"""fs-verity digests in userspace.

The digest is the kernel's: a Merkle tree over 4096-byte blocks with no salt, its
root hash put in a 256-byte ``fsverity_descriptor``, and the descriptor hashed. It
matches ``fsverity digest`` and ``FS_IOC_MEASURE_VERITY`` for every input, including
the empty one (all-zero root hash). C libcomposefs differs only for empty input,
where it hashes one all-zero block; :func:`c_compat_digest_bytes` and
``c_compat=True`` reproduce that for ``composefs-info measure-file``.

Speed: hashing is done one 4096-byte block per ``hashlib`` call, so the Python cost
per block is kept to a comprehension step. Upper tree levels are 1/128 (SHA-256) or
1/64 (SHA-512) of level 0 and cost next to nothing. Files under 8 MiB (most files)
are read whole in one ``preadv`` into zeroed blocks and hashed level by level, which
skips the streaming tree's bookkeeping that dominated them. :func:`digest_fd` overlaps reading
and hashing in worker threads; hashlib drops the GIL for each 4096-byte block, but
retaking it 256k times per GiB means two threads gain far less than 2x on CPython 3.11.

The ioctls that enable and measure fs-verity, the algorithms' kernel ids and the
errors live in :mod:`composefsd.kernel.verity`; :func:`measure_or_compute` asks the
kernel through it first.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import queue
import stat
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, TypeAlias

from composefsd.kernel.verity import (
    BLOCK_SIZE,
    LOG_BLOCK_SIZE,
    Algorithm,
    AlgorithmLike,
    VerityNotEnabledError,
    VerityUnsupportedError,
    measure_verity,
)

if TYPE_CHECKING:
    # collections.abc.Buffer is 3.12+; typeshed ships this one to every type checker.
    from typing_extensions import Buffer

__all__ = [
    "FileDigester",
    "FsVerityHasher",
    "c_compat_digest_bytes",
    "default_threads",
    "digest_bytes",
    "digest_fd",
    "measure_or_compute",
]

log = logging.getLogger(__name__)

_ZERO_BLOCK = bytes(BLOCK_SIZE)
_ZERO_VIEW = memoryview(_ZERO_BLOCK)

# version, hash_algorithm, log_blocksize, salt_size, sig_size, data_size, root_hash,
# salt, reserved
_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144x")

# Read unit of digest_fd. A multiple of 128 * 4096 so that every full span yields
# whole level-1 blocks for both algorithms, and big enough that per-span costs
# (syscall, thread hand-off, join) vanish next to ~3 ms of hashing.
_SPAN = 4 << 20
# Below this size digest_fd does not start threads: the hand-off would cost more than
# the overlap gains.
_PARALLEL_MIN_SIZE = 2 * _SPAN


class _Hash(Protocol):
    def update(self, data: Buffer, /) -> None: ...

    def digest(self) -> bytes: ...


_HashNew: TypeAlias = "Callable[[Buffer], _Hash]"


def _hash_new(alg: Algorithm) -> _HashNew:
    new: _HashNew = hashlib.sha256 if alg is Algorithm.SHA256 else hashlib.sha512
    return new


def default_threads() -> int:
    """What ``threads=None`` means: two if this process may run on two CPUs or more."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


# --------------------------------------------------------------------------------------
# Merkle tree


def _hash_blocks(new: _HashNew, mv: memoryview) -> bytes:
    """Concatenated hashes of the whole 4096-byte blocks of ``mv`` (length a multiple
    of 4096). This is the hot loop: a list comprehension over slices is the cheapest
    per-block form CPython offers, and hashlib drops the GIL for each block."""
    bs = BLOCK_SIZE
    return b"".join([new(mv[i : i + bs]).digest() for i in range(0, len(mv), bs)])


def _hash_padded(new: _HashNew, data: Buffer) -> bytes:
    """Hash of one block of at most 4096 bytes, zero-padded to 4096."""
    h = new(data)
    h.update(_ZERO_BLOCK[: BLOCK_SIZE - memoryview(data).nbytes])
    return h.digest()


def _hash_tail(new: _HashNew, mv: memoryview) -> bytes:
    """Hashes of all blocks of ``mv``, the last one zero-padded if partial."""
    full = len(mv) - len(mv) % BLOCK_SIZE
    out = _hash_blocks(new, mv[:full]) if full else b""
    if full < len(mv):
        out += _hash_padded(new, mv[full:])
    return out


def _root_whole(alg: Algorithm, new: _HashNew, mv: memoryview) -> bytes:
    """The Merkle root of data held whole in memory: each level hashed in one pass,
    without the streaming tree's bookkeeping (the cost that dominates small files)."""
    if not mv:
        return bytes(alg.digest_size)
    level = _hash_tail(new, mv)
    # A level of one hash is the root; a longer one is hashed block by block, the
    # last block zero-padded, as the kernel does.
    while len(level) > alg.digest_size:
        level = _hash_tail(new, memoryview(level))
    return level


class _MerkleTree:
    """Streaming Merkle tree above level 0: holds at most one partial block per level,
    so memory stays a few KiB whatever the file size."""

    __slots__ = ("_counts", "_digest_size", "_new", "_pending")

    def __init__(self, new: _HashNew, digest_size: int) -> None:
        self._new = new
        self._digest_size = digest_size
        self._pending: list[bytearray] = [bytearray()]
        self._counts: list[int] = [0]

    def copy(self) -> _MerkleTree:
        other = _MerkleTree(self._new, self._digest_size)
        other._pending = [bytearray(p) for p in self._pending]
        other._counts = list(self._counts)
        return other

    def add(self, level: int, hashes: Buffer) -> None:
        """Append concatenated hashes to ``level`` (0 = the data-block hashes)."""
        mv = memoryview(hashes).cast("B")
        new = self._new
        while mv:
            if level == len(self._pending):
                self._pending.append(bytearray())
                self._counts.append(0)
            self._counts[level] += len(mv) // self._digest_size
            pend = self._pending[level]
            up: list[bytes] = []
            if pend:
                need = BLOCK_SIZE - len(pend)
                pend += mv[:need]
                mv = mv[need:]
                if len(pend) < BLOCK_SIZE:
                    return
                up.append(new(pend).digest())
                pend.clear()
            full = len(mv) - len(mv) % BLOCK_SIZE
            if full:
                up.append(_hash_blocks(new, mv[:full]))
            pend += mv[full:]
            mv = memoryview(b"".join(up))
            level += 1

    def root(self) -> bytes | None:
        """The root hash, or None when no data block was added. Leaves self unchanged."""
        tree = self.copy()
        level = 0
        while True:
            count = tree._counts[level] if level < len(tree._counts) else 0
            if count == 0:
                return None
            if count == 1:
                # A lone hash never fills a block, so it is still pending here.
                return bytes(tree._pending[level])
            pend = tree._pending[level]
            if pend:
                top = _hash_padded(self._new, pend)
                pend.clear()
                tree.add(level + 1, top)
            level += 1


def _descriptor_digest(alg: Algorithm, new: _HashNew, root: bytes, size: int) -> bytes:
    desc = _DESCRIPTOR.pack(1, alg.kernel_id, LOG_BLOCK_SIZE, 0, 0, size, root, b"")
    return new(desc).digest()


def _finish(
    alg: Algorithm, new: _HashNew, tree: _MerkleTree, size: int, *, c_compat: bool
) -> bytes:
    root = tree.root()
    if root is None:
        # The kernel gives an empty file an all-zero root hash; C libcomposefs hashes
        # one zero block instead (its empty-input quirk).
        root = new(_ZERO_BLOCK).digest() if c_compat else bytes(alg.digest_size)
    return _descriptor_digest(alg, new, root, size)


class FsVerityHasher:
    """Incremental fs-verity digest: ``update()`` with chunks of any size, then
    ``digest()``. Partial blocks are buffered, so the split points never change the
    result (the bug composefs-rs fixed in ``d409ec7``)."""

    __slots__ = ("_alg", "_c_compat", "_new", "_partial", "_size", "_tree")

    def __init__(self, algorithm: AlgorithmLike = "sha256", *, c_compat: bool = False) -> None:
        self._alg = Algorithm.parse(algorithm)
        self._new = _hash_new(self._alg)
        self._c_compat = c_compat
        self._tree = _MerkleTree(self._new, self._alg.digest_size)
        self._partial = bytearray()
        self._size = 0

    @property
    def algorithm(self) -> Algorithm:
        return self._alg

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def update(self, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        if not mv:
            return
        self._size += len(mv)
        partial = self._partial
        if partial:
            need = BLOCK_SIZE - len(partial)
            partial += mv[:need]
            mv = mv[need:]
            if len(partial) < BLOCK_SIZE:
                return
            self._tree.add(0, self._new(partial).digest())
            partial.clear()
        full = len(mv) - len(mv) % BLOCK_SIZE
        if full:
            self._tree.add(0, _hash_blocks(self._new, mv[:full]))
        partial += mv[full:]

    def digest(self) -> bytes:
        """The digest of everything fed so far; the hasher stays usable."""
        tree = self._tree
        if self._partial:
            tree = tree.copy()
            tree.add(0, _hash_padded(self._new, self._partial))
        return _finish(self._alg, self._new, tree, self._size, c_compat=self._c_compat)

    def hexdigest(self) -> str:
        return self.digest().hex()


def digest_bytes(data: Buffer, algorithm: AlgorithmLike = "sha256") -> bytes:
    """fs-verity digest of ``data`` (kernel and ``fsverity digest`` compatible)."""
    alg = Algorithm.parse(algorithm)
    new = _hash_new(alg)
    mv = memoryview(data).cast("B")
    return _descriptor_digest(alg, new, _root_whole(alg, new, mv), len(mv))


def c_compat_digest_bytes(data: Buffer, algorithm: AlgorithmLike = "sha256") -> bytes:
    """The digest C libcomposefs computes: as :func:`digest_bytes`, except that empty
    input hashes one zero block."""
    h = FsVerityHasher(algorithm, c_compat=True)
    h.update(data)
    return h.digest()


# --------------------------------------------------------------------------------------
# Reading from a file descriptor


class _Reader:
    """Fills buffers from an fd: positionally from offset 0 (the fd's offset is left
    alone), or sequentially when the fd cannot seek (a pipe)."""

    __slots__ = ("fd", "offset", "positional")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0
        self.positional = True

    def fill(self, mv: memoryview) -> int:
        """Read until ``mv`` is full or EOF; return the byte count."""
        total = 0
        want = len(mv)
        while total < want:
            if self.positional:
                try:
                    got = os.preadv(self.fd, [mv[total:]], self.offset)
                except OSError as e:
                    if e.errno != errno.ESPIPE or self.offset:
                        raise
                    self.positional = False
                    continue
            else:
                got = os.readv(self.fd, [mv[total:]])
            if not got:
                break
            total += got
            self.offset += got
        return total


def _regular_size(fd: int) -> int | None:
    """The size of a regular file (it may still grow while we read), else None."""
    st = os.fstat(fd)
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def digest_fd(
    fd: int,
    algorithm: AlgorithmLike = "sha256",
    *,
    threads: int | None = None,
    c_compat: bool = False,
    regular_size: int | None = None,
) -> bytes:
    """fs-verity digest of everything readable from ``fd``.

    Regular files and block devices are read with ``preadv`` from offset 0 to EOF,
    without moving the fd's offset; pipes are read from where they are. ``threads``
    is the number of hashing threads: with 1 the caller reads and hashes in turn;
    with N > 1, N workers each read a span and hash it while the others do the same.
    ``None`` means :func:`default_threads`. Regular files under 8 MiB are always
    done in the calling thread. ``c_compat`` selects C libcomposefs' empty-input
    digest. ``regular_size``: the caller has just found with ``fstat`` that ``fd``
    is a regular file of this size (spares a second ``fstat``; only a hint for
    reading, the digest is still of everything up to EOF).
    """
    alg = Algorithm.parse(algorithm)
    if threads is None:
        threads = default_threads()
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    new = _hash_new(alg)
    reader = _Reader(fd)
    size_hint = _regular_size(fd) if regular_size is None else regular_size
    if size_hint is not None and size_hint < _PARALLEL_MIN_SIZE:
        # Most files are small: read the whole file at once and hash it level by
        # level. The buffer is whole zeroed blocks with room for one byte more than
        # the file, so the last block's zero padding is already there, and a file
        # that grew meanwhile shows (it is then read again by the streaming path).
        # One read that returns the fstat size is taken as the file: a regular
        # file's read is short only at EOF.
        buf = memoryview(bytearray((size_hint // BLOCK_SIZE + 1) * BLOCK_SIZE))
        want = buf[: size_hint + 1]
        got = os.preadv(fd, [want], 0)
        if got != size_hint and got:
            reader.offset = got
            got += reader.fill(want[got:])
        if got <= size_hint:
            if got == 0:
                root = new(_ZERO_BLOCK).digest() if c_compat else bytes(alg.digest_size)
            else:
                level = _hash_blocks(new, buf[: -(-got // BLOCK_SIZE) * BLOCK_SIZE])
                root = level
                if len(level) > alg.digest_size:
                    root = _root_whole(alg, new, memoryview(level))
            return _descriptor_digest(alg, new, root, got)
        reader = _Reader(fd)
    tree = _MerkleTree(new, alg.digest_size)
    if threads > 1 and (size_hint is None or size_hint >= _PARALLEL_MIN_SIZE):
        size = _read_parallel(reader, new, tree, threads)
    else:
        # One byte more than the file so that the first fill already sees EOF.
        bufsize = _SPAN
        if size_hint is not None:
            bufsize = min(_SPAN, (size_hint // BLOCK_SIZE + 1) * BLOCK_SIZE)
        size = _read_serial(reader, new, tree, memoryview(bytearray(bufsize)))
    return _finish(alg, new, tree, size, c_compat=c_compat)


class FileDigester:
    """Digests regular files one after another (Verify's and fsck's objects): the
    algorithm is settled once, and files under 8 MiB are read whole with one
    ``preadv`` into one buffer kept from file to file, so a small file costs its
    read and its hashing, not a fresh buffer zeroed for it."""

    __slots__ = ("_alg", "_buf", "_descriptor", "_mv", "_new")

    def __init__(self, algorithm: AlgorithmLike = "sha256") -> None:
        self._alg = Algorithm.parse(algorithm)
        self._new = _hash_new(self._alg)
        self._buf = bytearray()
        self._mv = memoryview(self._buf)
        # The descriptor but for its size, root hash and salt (per file: the same
        # bytes as _descriptor_digest's, without its Python call and lookups).
        self._descriptor = functools.partial(
            _DESCRIPTOR.pack, 1, self._alg.kernel_id, LOG_BLOCK_SIZE, 0, 0
        )

    def digest(self, fd: int, size: int) -> bytes:
        """fs-verity digest of everything readable from ``fd``, a regular file that
        ``fstat`` has just found to be ``size`` bytes long (a hint: a file that is
        shorter or longer by now is digested as it is, as :func:`digest_fd` does)."""
        if size >= _PARALLEL_MIN_SIZE:
            return digest_fd(fd, self._alg, threads=1, regular_size=size)
        # Room for one byte more than the file, so that one read sees EOF; the
        # blocks past it are zero, the padding of the last block.
        room = (size // BLOCK_SIZE + 1) * BLOCK_SIZE
        if len(self._buf) < room:
            self._buf = bytearray(max(room, 2 * len(self._buf)))
            self._mv = memoryview(self._buf)
        mv = self._mv
        got = os.preadv(fd, [mv[: size + 1]], 0)
        if got != size:
            # A file that changed size since fstat (or a short read): the general path.
            return digest_fd(fd, self._alg, threads=1)
        new = self._new
        alg = self._alg
        if got < BLOCK_SIZE:
            # One block or none (most objects): its hash is the root, no tree to build.
            if not got:
                return _descriptor_digest(alg, new, bytes(alg.digest_size), 0)
            mv[got:BLOCK_SIZE] = _ZERO_VIEW[got:]
            return new(self._descriptor(got, new(mv[:BLOCK_SIZE]).digest(), b"")).digest()
        end = -(-got // BLOCK_SIZE) * BLOCK_SIZE
        if end != got:
            mv[got:end] = _ZERO_VIEW[: end - got]
        level = _hash_blocks(new, mv[:end])
        if len(level) > alg.digest_size:
            level = _root_whole(alg, new, memoryview(level))
        return new(self._descriptor(got, level, b"")).digest()


def _read_serial(reader: _Reader, new: _HashNew, tree: _MerkleTree, mv: memoryview) -> int:
    size = 0
    while True:
        got = reader.fill(mv)
        size += got
        if got < len(mv):
            tree.add(0, _hash_tail(new, mv[:got]))
            return size
        tree.add(0, _hash_blocks(new, mv))


class _SharedReader:
    """Hands out consecutive spans of one :class:`_Reader` to several threads.

    Each worker reads its own span under the lock and hashes it outside; reading in
    the workers (rather than in the caller) keeps one thread in a long GIL-free
    syscall while the other hashes, which measured faster than a separate reader.
    """

    __slots__ = ("_lock", "_next", "_reader", "done", "size")

    def __init__(self, reader: _Reader) -> None:
        self._reader = reader
        self._lock = threading.Lock()
        self._next = 0
        self.size = 0
        self.done = False

    def read(self, buf: memoryview) -> tuple[int, int] | None:
        """Fill ``buf`` with the next span: (span index, byte count), or None at EOF."""
        with self._lock:
            if self.done:
                return None
            try:
                got = self._reader.fill(buf)
            except BaseException:
                self.done = True
                raise
            index = self._next
            self._next += 1
            self.size += got
            if got < len(buf):
                self.done = True
            return index, got


_Result: TypeAlias = "tuple[int, bytes] | BaseException | None"


def _hash_worker(shared: _SharedReader, new: _HashNew, out: queue.SimpleQueue[_Result]) -> None:
    buf = memoryview(bytearray(_SPAN))
    try:
        while (span := shared.read(buf)) is not None:
            index, got = span
            # Only the last span can be short, so padding its last block is right.
            out.put((index, _hash_tail(new, buf[:got])))
    except BaseException as e:
        out.put(e)
    finally:
        out.put(None)


def _read_parallel(reader: _Reader, new: _HashNew, tree: _MerkleTree, workers: int) -> int:
    shared = _SharedReader(reader)
    results: queue.SimpleQueue[_Result] = queue.SimpleQueue()
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsverity") as pool:
        try:
            for _ in range(workers):
                pool.submit(_hash_worker, shared, new, results)
            running = workers
            # Spans finish out of order; level 0 must be fed in order.
            early: dict[int, bytes] = {}
            expected = 0
            while running:
                item = results.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    error = error or item
                else:
                    early[item[0]] = item[1]
                    while expected in early:
                        tree.add(0, early.pop(expected))
                        expected += 1
        finally:
            # Stops the workers after their current span if we leave early.
            shared.done = True
    if error is not None:
        raise error
    return shared.size


# --------------------------------------------------------------------------------------
# The kernel's digest where there is one


def measure_or_compute(
    fd: int,
    algorithm: AlgorithmLike = "sha256",
    *,
    c_compat: bool = False,
    threads: int | None = None,
    path: str | os.PathLike[str] | None = None,
) -> bytes:
    """The kernel's digest if the file has fs-verity, else the digest computed in
    userspace (as C ``lcfs_fd_get_fsverity`` and ``composefs-info measure-file`` do).

    Only "not enabled" and "not supported" fall back; other errors, including an
    algorithm mismatch, are raised. ``c_compat`` applies to the computed digest only.
    """
    try:
        return measure_verity(fd, algorithm, path=path)
    except (VerityNotEnabledError, VerityUnsupportedError) as e:
        log.debug("%s; computing the digest in userspace", e)
    return digest_fd(fd, algorithm, threads=threads, c_compat=c_compat)
