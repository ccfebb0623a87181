"""Directory scanning into a composefs tree, and filling a digest store, like C mkcomposefs.

:func:`scan_directory` reproduces C ``mkcomposefs`` 1.0.8 on a directory SOURCE
(reference notes, sections 7.3, 7.4 and 9.2): the same nodes, so the writer
produces the same image bytes, the same error messages, and, with a digest
store, the same objects.

How it differs from C, none of which changes the image or the store:

* Files are hashed while the tree is still being scanned, in ``threads`` lanes:
  in-process for small trees, in worker processes once a scan has queued
  ``_PROCESS_MIN_BYTES`` (per-block fs-verity hashing is GIL-bound in threads;
  see :class:`_HashLane`). C scans first, then hashes. Copying into the store
  starts once every digest is known, by ``threads`` threads, as in C; a failed
  scan or digest leaves the store untouched, also as in C.
* ``--skip-devices`` decides by the ``lstat`` mode where C looks at readdir's
  ``d_type``. They differ only on filesystems that report ``DT_UNKNOWN``, where C
  keeps device nodes it was asked to skip.
* Paths longer than ``PATH_MAX`` are scanned relative to directory fds, as C
  does; like C, hashing then fails on such a file with ENAMETOOLONG.

Opt-in beyond C, ``ScanOptions.preserve_hardlinks``: paths sharing one
``(st_dev, st_ino)`` become one inode. The first path in image order (depth
first, names sorted bytewise, as ``composefs-info dump`` lists them) is the
inode; the others become hardlink entries to it (``Node.link_to``), and the
inode's ``nlink`` is the number of its paths inside the scanned tree, which is
what a mounted image then reports (links outside the tree cannot be reached
through it). Files with a single path keep ``nlink`` 1, as in C. Without this
option every path is its own inode with ``nlink`` 1, exactly as C does it.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from composefsd import workerproc
from composefsd.fsverity import c_compat_digest_bytes, digest_fd
from composefsd.image.tree import PATH_MAX, RECOMMENDED_INLINE_CONTENT_MAX, Node
from composefsd.objcopy import CopyState, join_store_path, store_object

__all__ = [
    "ScanError",
    "ScanOptions",
    "ScanProgress",
    "default_threads",
    "fill_digest_store",
    "payload_for_digest",
    "scan_directory",
]

log = logging.getLogger(__name__)

_U32 = 0xFFFFFFFF
_NS = 1_000_000_000
_S_IFMT = stat.S_IFMT
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_DEVICE_TYPES = frozenset((stat.S_IFBLK, stat.S_IFCHR))
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_PROGRESS_INTERVAL = 0.25
# Hashing work is handed out in batches of this many files, bytes of data or bytes of
# paths, whichever is hit first. The path limit keeps a worker request (and 256 replies
# of at most ~110 bytes) well inside one _PIPE_SIZE pipe buffer.
_BATCH_FILES = 256
_BATCH_BYTES = 32 << 20
_BATCH_PATH_BYTES = 128 << 10
_PIPE_SIZE = 1 << 20
# From this much queued data on, hashing moves to worker processes (see _HashLane).
_PROCESS_MIN_BYTES = 128 << 20

Progress = Callable[["ScanProgress"], None]


class ScanError(OSError):
    """A scan, digest or store failure; ``str()`` is C mkcomposefs's message without its prefix.

    ``errno`` is the failing call's errno and ``path`` (bytes, or None) the entry
    concerned, e.g. ``error accessing /src/dir/file: Permission denied``.
    """

    def __init__(self, err: int, message: str, path: bytes | None = None) -> None:
        super().__init__(err, message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


@dataclass(slots=True, frozen=True)
class ScanOptions:
    """What to read and compute; the defaults are C mkcomposefs's."""

    #: Every mtime becomes 0.0 (``--use-epoch``).
    use_epoch: bool = False
    #: Leave out block and character devices, whiteouts included (``--skip-devices``).
    skip_devices: bool = False
    #: Read no xattrs (``--skip-xattrs``).
    skip_xattrs: bool = False
    #: Read only ``user.*`` xattrs (``--user-xattrs``); with ``skip_xattrs`` it is EINVAL.
    user_xattrs: bool = False
    #: Parallel hashers (threads, or worker processes for big trees) and store-copying
    #: threads (``--threads``); 0 means one per CPU this process may run on.
    threads: int = 0
    #: Give every non-empty regular file its fs-verity digest and ``XX/rest`` payload.
    compute_digests: bool = True
    #: Inline regular files of 1..64 bytes as content.
    inline_small: bool = True
    #: Turn paths of one inode into hardlinks (not done by C; see the module notes).
    preserve_hardlinks: bool = False


@dataclass(slots=True, frozen=True)
class ScanProgress:
    """A snapshot of a running scan, given to the progress callback a few times a second.

    ``phase`` is ``"scan"`` (walking the tree, while hashing has already started),
    then ``"digest"`` (hashing the rest), then ``"store"`` (copying into the digest
    store, if one was given).
    """

    phase: str
    entries: int
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    objects_stored: int = 0


def default_threads() -> int:
    """C's default ``--threads``: the CPUs in this process's affinity mask."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except OSError:
        return os.cpu_count() or 1


def payload_for_digest(digest: bytes) -> bytes:
    """The object path C uses for a digest: ``hex[0:2]/hex[2:]``."""
    hexed = digest.hex().encode()
    return hexed[:2] + b"/" + hexed[2:]


def _error(kind: str, path: bytes | None, err: int | None) -> ScanError:
    code = err or errno.EIO
    subject = f"{kind} {os.fsdecode(path)}" if path is not None else kind
    return ScanError(code, f"{subject}: {os.strerror(code)}", path)


def _access_error(path: bytes, exc: OSError) -> ScanError:
    return _error("error accessing", path, exc.errno)


# -- phase 1: the tree ----------------------------------------------------------------------


class _DirFd:
    """A directory fd kept open until all of its subdirectories have been opened from it."""

    __slots__ = ("fd", "pending")

    def __init__(self, fd: int, pending: int) -> None:
        self.fd = fd
        self.pending = pending


class _Walker:
    """Builds the tree and hands each regular file of non-zero size to the pipeline."""

    def __init__(self, options: ScanOptions, pipeline: _Pipeline) -> None:
        self.options = options
        self.pipeline = pipeline
        self.progress = pipeline.progress
        self.entries = 0
        self.inodes: dict[tuple[int, int], list[tuple[Node, bytes, Node, bytes]]] = {}
        self._next_report = time.monotonic() + _PROGRESS_INTERVAL
        self._open_fds: set[int] = set()

    # Node construction mirrors C lcfs_load_node_from_file: stat, readlink, mtime, xattrs.
    def make_node(self, dir_fd: int | None, name: bytes, path: bytes, st: os.stat_result) -> Node:
        opts = self.options
        mode = st.st_mode
        if opts.use_epoch:
            sec = nsec = 0
        else:
            sec, nsec = divmod(st.st_mtime_ns, _NS)
        # Positional: this runs once per entry, and keywords cost noticeably more.
        node = Node(mode, 1, st.st_uid, st.st_gid, st.st_rdev & _U32, st.st_size, sec, nsec)
        ftype = mode & 0o170000
        if ftype == _S_IFDIR:
            node.children = {}
        elif ftype == _S_IFLNK:
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except OSError as exc:
                raise _access_error(path, exc) from exc
            if not target:
                raise _error("error accessing", path, errno.EINVAL)
            if len(target) >= PATH_MAX:
                raise _error("error accessing", path, errno.ENAMETOOLONG)
            node.payload = target
            node.size = len(target)
        if not opts.skip_xattrs:
            try:
                names = os.listxattr(path, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG or dir_fd is None:
                    raise _access_error(path, exc) from exc
                self._read_xattrs_by_fd(node, dir_fd, name, path)
            else:
                if names:
                    self._add_xattrs(node, names, path, path, False)
        return node

    def _read_xattrs_by_fd(self, node: Node, dir_fd: int, name: bytes, path: bytes) -> None:
        # The full path is too long for the kernel: go through an O_PATH fd, as C always does.
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            raise _access_error(path, exc) from exc
        try:
            proc = f"/proc/self/fd/{fd}".encode()
            try:
                names = os.listxattr(proc)
            except OSError as exc:
                raise _access_error(path, exc) from exc
            self._add_xattrs(node, names, proc, path, True)
        finally:
            os.close(fd)

    def _add_xattrs(
        self, node: Node, names: list[str], target: bytes, path: bytes, follow: bool
    ) -> None:
        user_only = self.options.user_xattrs
        for key_str in names:
            key = os.fsencode(key_str)
            if user_only and not key.startswith(b"user."):
                continue
            try:
                value = os.getxattr(target, key, follow_symlinks=follow)
                node.set_xattr(key, value)
            except OSError as exc:  # TreeError is an OSError too
                raise _access_error(path, exc) from exc

    def scan(self, src: bytes) -> Node:
        try:
            st = os.lstat(src)
        except OSError as exc:
            raise _access_error(src, exc) from exc
        root = self.make_node(None, src, src, st)
        self.entries = 1
        ftype = st.st_mode & 0o170000
        if ftype == _S_IFREG and st.st_size > 0:
            self.pipeline.add(src, root)
        if ftype != _S_IFDIR:
            return root
        try:
            fd = os.open(src, _DIR_FLAGS)
        except OSError as exc:
            raise _access_error(src, exc) from exc
        self._open_fds.add(fd)
        try:
            self._walk(fd, root, src)
        finally:
            for leftover in self._open_fds:
                os.close(leftover)
            self._open_fds.clear()
        return root

    def _close(self, fd: int) -> None:
        self._open_fds.discard(fd)
        os.close(fd)

    def _walk(self, root_fd: int, root: Node, src: bytes) -> None:
        stack: list[tuple[_DirFd, bytes, Node, bytes]] = []
        subdirs = self._read_dir(root_fd, root, src)
        self._push(stack, root_fd, subdirs)
        while stack:
            parent, name, node, path = stack.pop()
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
            except OSError as exc:
                raise _access_error(path, exc) from exc
            self._open_fds.add(fd)
            parent.pending -= 1
            if parent.pending == 0:
                self._close(parent.fd)
            subdirs = self._read_dir(fd, node, path)
            self._push(stack, fd, subdirs)

    def _push(
        self,
        stack: list[tuple[_DirFd, bytes, Node, bytes]],
        fd: int,
        subdirs: list[tuple[bytes, Node, bytes]],
    ) -> None:
        if not subdirs:
            self._close(fd)
            return
        holder = _DirFd(fd, len(subdirs))
        stack.extend((holder, name, node, path) for name, node, path in reversed(subdirs))

    def _read_dir(self, fd: int, node: Node, path: bytes) -> list[tuple[bytes, Node, bytes]]:
        opts = self.options
        children = node.children
        assert children is not None
        subdirs: list[tuple[bytes, Node, bytes]] = []
        add_file = self.pipeline.add
        skip_devices = opts.skip_devices
        track_links = opts.preserve_hardlinks
        # C maybe_join_path: no separator is added after a trailing slash.
        sep = b"" if path.endswith(b"/") else b"/"
        try:
            it = os.scandir(fd)
        except OSError as exc:
            raise _access_error(path, exc) from exc
        with it:
            while True:
                try:
                    entry = next(it)
                except StopIteration:
                    break
                except OSError as exc:
                    raise _access_error(path, exc) from exc
                name = os.fsencode(entry.name)
                child_path = path + sep + name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    raise _access_error(child_path, exc) from exc
                ftype = st.st_mode & 0o170000
                if skip_devices and ftype in _DEVICE_TYPES:
                    continue
                child = self.make_node(fd, name, child_path, st)
                children[name] = child
                if ftype == _S_IFDIR:
                    subdirs.append((name, child, child_path))
                elif track_links and st.st_nlink > 1:
                    # Hashed once its paths are known to be one inode (link_hardlinks).
                    key = (st.st_dev, st.st_ino)
                    self.inodes.setdefault(key, []).append((node, name, child, child_path))
                elif ftype == _S_IFREG and st.st_size > 0:
                    add_file(child_path, child)
                self.entries += 1
                if self.progress is not None and not self.entries & 1023:
                    self._report()
        return subdirs

    def _report(self) -> None:
        now = time.monotonic()
        if now >= self._next_report and self.progress is not None:
            self._next_report = now + _PROGRESS_INTERVAL
            self.pipeline.entries = self.entries
            self.progress(self.pipeline.snapshot("scan"))

    def link_hardlinks(self) -> None:
        for group in self.inodes.values():
            # Image order: depth first, names bytewise; all paths share the source prefix.
            group.sort(key=lambda item: item[3].split(b"/"))
            _parent, _name, target, target_path = group[0]
            if len(group) > 1:
                target.nlink = len(group)
                for parent, name, _node, _path in group[1:]:
                    assert parent.children is not None
                    parent.children[name] = Node(mode=target.mode, link_to=target)
            if target.mode & 0o170000 == _S_IFREG and target.size > 0:
                self.pipeline.add(target_path, target)
        self.inodes.clear()


# -- phase 2: digests and the store ---------------------------------------------------------


def _read_all(fd: int) -> bytes:
    parts: list[bytes] = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


#: One hashing result: (digest, inline content, already in the store), or the errno of
#: the failure.
_HashResult = tuple[bytes | None, bytes | None, bool] | int


def _hash_one(
    path: bytes, size: int, compute: bool, inline: bool
) -> tuple[bytes | None, bytes | None]:
    """C lcfs_node_set_from_content for one regular file whose lstat size is ``size`` > 0."""
    small = inline and size <= RECOMMENDED_INLINE_CONTENT_MAX
    if not (compute or small):
        return None, None
    fd = os.open(path, _READ_FLAGS)
    try:
        if small:
            data = _read_all(fd)
            digest = c_compat_digest_bytes(data) if compute else None
            if len(data) < size:
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
            return digest, data[:size]
        return digest_fd(fd, threads=1, c_compat=True), None
    finally:
        os.close(fd)


def _hash_batch(
    items: list[tuple[bytes, int]], compute: bool, inline: bool, store: bytes | None
) -> list[_HashResult]:
    """Hash a batch of files; stops at the first failure, whose errno ends the list.

    With a ``store``, also say whether each object to store is already there (the
    lstat C's copy phase would do; doing it here spares the copying threads a round
    of GIL-bound no-ops when the store is already full). Module-level and free of
    tree objects, so that worker processes can run it.
    """
    out: list[_HashResult] = []
    for path, size in items:
        try:
            digest, content = _hash_one(path, size, compute, inline)
        except OSError as exc:
            out.append(exc.errno or errno.EIO)
            break
        present = False
        if store is not None and content is None and digest is not None:
            try:
                os.lstat(join_store_path(store, payload_for_digest(digest)))
                present = True
            except OSError:
                pass
        out.append((digest, content, present))
    return out


class _HashLane(threading.Thread):
    """One of the pipeline's hashing threads, optionally driving one worker process.

    fs-verity hashes every 4 KiB block with its own hashlib call, so hashing threads
    spend most of their time holding the GIL and several of them do not add up to
    more than one CPU. Once the scan has queued ``_PROCESS_MIN_BYTES`` of data, each
    lane starts a worker process (:mod:`composefsd.workerproc`, batches over a pipe
    in ``marshal`` format) and only relays batches to it, keeping
    two in flight so that the worker never waits for this thread to get the GIL. If a
    worker cannot be started or dies, the lane hashes in-process from then on.
    """

    def __init__(self, pipeline: _Pipeline, index: int) -> None:
        super().__init__(name=f"cfs-hash-{index}", daemon=True)
        self.pipeline = pipeline
        self.proc: subprocess.Popen[bytes] | None = None
        self.use_proc = True
        self.depth = 1

    def run(self) -> None:
        pipe = self.pipeline
        get = pipe.work.get
        inflight: collections.deque[list[tuple[bytes, Node]]] = collections.deque()
        eof = False
        try:
            while True:
                while not eof and len(inflight) < self.depth:
                    try:
                        batch = get(block=not inflight)
                    except queue.Empty:
                        break
                    if batch is None:
                        eof = True
                    elif pipe.cancelled or pipe.digest_error is not None:
                        continue
                    elif self.use_proc and pipe.processes_wanted and self._send(batch):
                        inflight.append(batch)
                    else:
                        self._local([*inflight, batch])
                        inflight.clear()
                if inflight:
                    results = self._receive()
                    if results is None:
                        self._local(list(inflight))
                        inflight.clear()
                    else:
                        pipe.done(inflight.popleft(), results)
                elif eof:
                    return
        except BaseException as exc:  # never die silently: it would hang finish()
            pipe.fail(exc)
        finally:
            self.stop()

    def _local(self, batches: list[list[tuple[bytes, Node]]]) -> None:
        pipe = self.pipeline
        for batch in batches:
            if pipe.cancelled or pipe.digest_error is not None:
                return
            items = [(path, node.size) for path, node in batch]
            pipe.done(batch, _hash_batch(items, pipe.compute, pipe.inline, pipe.store))

    def _send(self, batch: list[tuple[bytes, Node]]) -> bool:
        pipe = self.pipeline
        try:
            if self.proc is None:
                self.proc = _start_worker()
                self.depth = 2 if _widen_pipes(self.proc) else 1
            items = [(path, node.size) for path, node in batch]
            workerproc.send(self.proc, (items, pipe.compute, pipe.inline, pipe.store))
            return True
        except (OSError, ValueError) as exc:
            self._give_up(exc)
            return False

    def _receive(self) -> list[_HashResult] | None:
        try:
            assert self.proc is not None and self.proc.stdout is not None
            results: list[_HashResult] = workerproc.receive(self.proc.stdout)
            return results
        except (OSError, EOFError, ValueError, AssertionError) as exc:
            self._give_up(exc)
            return None

    def _give_up(self, exc: BaseException) -> None:
        if not self.pipeline.cancelled:
            log.info("hashing in-process from now on: %s", exc)
        self.use_proc = False
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            workerproc.stop(proc, kill=self.pipeline.cancelled, timeout=10)


def _widen_pipes(proc: subprocess.Popen[bytes]) -> bool:
    """Give both pipes room for two requests and two replies, or say it is not possible.

    With two batches in flight, this lane writes the next request while the worker
    writes a reply; if neither pipe could hold a whole message, both would block.
    """
    try:
        for f in (proc.stdin, proc.stdout):
            assert f is not None
            fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            if fcntl.fcntl(f.fileno(), fcntl.F_GETPIPE_SZ) < _PIPE_SIZE:
                return False
    except OSError:
        return False
    return True


def _start_worker() -> subprocess.Popen[bytes]:
    return workerproc.start("composefsd.scanner", "_worker_main")


def _worker_main() -> None:
    """The worker process: hash batches from stdin, answer on stdout, until EOF."""
    # The parent handles ^C and stops us; a traceback from here would only be noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            request = workerproc.receive(inp)
        except EOFError:
            return
        workerproc.write_message(out, _hash_batch(*request))


class _Pipeline:
    """Hash files in batches while the tree is still being scanned, then copy the ones to
    store with ``threads`` copying threads.

    Hashing runs in ``threads`` lanes (:class:`_HashLane`), in-process for small
    trees and in worker processes for large ones.

    Errors are reported the way C's phase order would report them: a scan error wins
    over a digest error, which wins over a store error; so a digest failure stops
    hashing but not the scan, and a store failure stops copying but not hashing.
    """

    def __init__(
        self,
        *,
        threads: int,
        compute: bool,
        inline: bool,
        store: bytes | None,
        progress: Progress | None,
        hash_files: bool = True,
    ) -> None:
        self.threads = max(1, threads)
        self.compute = compute
        self.inline = inline
        self.store = store
        self.progress = progress
        self.hash_files = hash_files
        self.entries = 0
        self.files_total = 0
        self.bytes_total = 0
        self.files_done = 0
        self.bytes_done = 0
        self.digest_error: ScanError | None = None
        self.store_error: ScanError | None = None
        self.internal_error: BaseException | None = None
        self.cancelled = False
        self.processes_wanted = False
        self.copy_state = CopyState()
        self.claimed: dict[bytes, object] = {}
        self.work: queue.SimpleQueue[list[tuple[bytes, Node]] | None] = queue.SimpleQueue()
        self.copy_queue: queue.SimpleQueue[tuple[bytes, bytes] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._batch: list[tuple[bytes, Node]] = []
        self._batch_bytes = 0
        self._batch_path_bytes = 0
        self._queued_bytes = 0
        self._lanes: list[_HashLane] = []
        self._copiers: list[threading.Thread] = []
        self.stored = [0] * self.threads

    # -- hashing ------------------------------------------------------------------------
    def add(self, path: bytes, node: Node) -> None:
        size = node.size
        self.files_total += 1
        self.bytes_total += size
        if not self.hash_files:
            self.files_done += 1
            self.bytes_done += size
            if self.store is not None and node.content is None and node.payload is not None:
                self.copy_queue.put((path, node.payload))
            return
        self._batch.append((path, node))
        self._batch_bytes += size
        self._batch_path_bytes += len(path)
        if (
            len(self._batch) >= _BATCH_FILES
            or self._batch_bytes >= _BATCH_BYTES
            or self._batch_path_bytes >= _BATCH_PATH_BYTES
        ):
            self._submit()

    def _submit(self) -> None:
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes, self._batch_path_bytes = [], 0, 0
        if not batch or self.cancelled or self.digest_error is not None:
            return
        if not self._lanes:
            for i in range(self.threads):
                lane = _HashLane(self, i)
                lane.start()
                self._lanes.append(lane)
        self._queued_bytes += size
        if self.threads > 1 and self._queued_bytes >= _PROCESS_MIN_BYTES:
            self.processes_wanted = True
        self.work.put(batch)

    def done(self, batch: list[tuple[bytes, Node]], results: list[_HashResult]) -> None:
        """Apply a batch's results to its nodes (called from the lanes)."""
        store = self.store
        put = self.copy_queue.put
        files = size = 0
        for (path, node), result in zip(batch, results, strict=False):
            if isinstance(result, int):
                with self._lock:
                    if self.digest_error is None:
                        self.digest_error = _error("error computing digest", None, result)
                break
            digest, content, present = result
            if digest is not None:
                node.digest = digest
                node.payload = payload_for_digest(digest)
            if content is not None:
                node.set_content(content)
            files += 1
            size += node.size
            if (
                store is not None
                and not present
                and node.content is None
                and node.payload is not None
            ):
                put((path, node.payload))
        with self._lock:
            self.files_done += files
            self.bytes_done += size

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.internal_error is None:
                self.internal_error = exc

    # -- copying ------------------------------------------------------------------------
    def _start_copying(self) -> None:
        if self.store is None:
            return
        for i in range(self.threads):
            t = threading.Thread(target=self._copy_worker, args=(i,), name=f"cfs-store-{i}")
            t.start()
            self._copiers.append(t)

    def _copy_worker(self, slot: int) -> None:
        store = self.store
        assert store is not None
        get = self.copy_queue.get
        claimed = self.claimed
        while True:
            item = get()
            if item is None:
                return
            if self.cancelled or self.digest_error is not None or self.store_error is not None:
                continue
            path, payload = item
            if claimed.setdefault(payload, item) is not item:
                continue
            try:
                if store_object(path, store, payload, self.copy_state):
                    self.stored[slot] += 1
            except OSError as exc:
                with self._lock:
                    if self.store_error is None:
                        self.store_error = _error("cannot fill store", None, exc.errno)

    # -- control ------------------------------------------------------------------------
    def snapshot(self, phase: str) -> ScanProgress:
        return ScanProgress(
            phase,
            self.entries,
            files_total=self.files_total,
            files_done=self.files_done,
            bytes_total=self.bytes_total,
            bytes_done=self.bytes_done,
            objects_stored=sum(self.stored),
        )

    def finish(self) -> None:
        """The scan is complete: hash the rest, copy, and raise the first error, if any."""
        try:
            self._submit()
            for _ in self._lanes:
                self.work.put(None)
            self._join(self._lanes, "digest")
            # Copy only now, as C does: copying while hashing was measured to slow both
            # down (file creation and fsync contend with the hashers for the CPUs).
            if self.internal_error is None and self.digest_error is None:
                self._start_copying()
                for _ in self._copiers:
                    self.copy_queue.put(None)
                self._join(self._copiers, "store")
        except BaseException:
            self.abort()
            raise
        if self.internal_error is not None:
            raise self.internal_error
        if self.digest_error is not None:
            raise self.digest_error
        if self.store_error is not None:
            raise self.store_error
        if self.progress is not None:
            self.progress(self.snapshot("store" if self._copiers else "digest"))

    def _join(self, threads: Sequence[threading.Thread], phase: str) -> None:
        for t in threads:
            while t.is_alive():
                t.join(_PROGRESS_INTERVAL)
                if self.progress is not None and t.is_alive():
                    self.progress(self.snapshot(phase))

    def abort(self) -> None:
        """Stop every worker without doing more work; used when the scan failed."""
        self.cancelled = True
        for lane in self._lanes:
            proc = lane.proc
            if proc is not None:
                proc.kill()
        for _ in self._lanes:
            self.work.put(None)
        for _ in self._copiers:
            self.copy_queue.put(None)
        for t in (*self._lanes, *self._copiers):
            t.join()


def scan_directory(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    options: ScanOptions | None = None,
    progress: Progress | None = None,
    *,
    digest_store: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None,
) -> Node:
    """Scan ``path`` into a tree, as C mkcomposefs does for a directory SOURCE.

    Regular files get their digests and payloads (and small ones their content) per
    ``options``; with ``digest_store``, files that are not inlined are copied into
    that store as they are hashed. ``progress`` is called from this thread a few
    times a second. Raises :class:`ScanError` with C's message: ``error accessing
    <path>: ...``, ``error computing digest: ...`` or ``cannot fill store: ...``.

    A non-directory ``path`` gives a one-node tree, as in C (the writer then
    rejects it with ENOTDIR).
    """
    opts = options or ScanOptions()
    src = os.fsencode(path)
    if opts.skip_xattrs and opts.user_xattrs:
        raise _error("error accessing", src, errno.EINVAL)
    pipeline = _Pipeline(
        threads=opts.threads or default_threads(),
        compute=opts.compute_digests,
        inline=opts.inline_small,
        store=os.fsencode(digest_store) if digest_store is not None else None,
        progress=progress,
    )
    walker = _Walker(opts, pipeline)
    # Hashing overlaps the scan; copying into the store waits for the scan to succeed,
    # so that a tree C would reject adds nothing to the store.
    try:
        root = walker.scan(src)
        if opts.preserve_hardlinks:
            walker.link_hardlinks()
    except BaseException:
        pipeline.abort()
        raise
    pipeline.entries = walker.entries
    if progress is not None:
        progress(pipeline.snapshot("scan"))
    pipeline.finish()
    return root


def fill_digest_store(
    source: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    root: Node,
    store: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    threads: int = 0,
    progress: Progress | None = None,
) -> int:
    """Copy the files of an already scanned tree into ``store``, as C ``fill_store`` does.

    ``source`` is the directory ``root`` was scanned from. Every regular file with
    a payload and no inline content is copied from ``source/<its path>`` to
    ``store/<payload>`` unless that exists. Returns the number of objects added.
    Raises :class:`ScanError` ``cannot fill store: ...``.
    """
    src = os.fsencode(source)
    pipeline = _Pipeline(
        threads=threads or default_threads(),
        compute=False,
        inline=False,
        store=os.fsencode(store),
        progress=progress,
        hash_files=False,
    )
    stack: list[tuple[bytes, Node]] = [(src, root)]
    while stack:
        path, node = stack.pop()
        if node.link_to is not None:
            continue
        if node.children is not None:
            base = path.rstrip(b"/")
            stack.extend(
                (base + b"/" + name, child) for name, child in sorted(node.children.items())
            )
        elif node.mode & 0o170000 == _S_IFREG and node.content is None and node.payload is not None:
            pipeline.add(path, node)
    pipeline.finish()
    return sum(pipeline.stored)
