"""Bulk imports of files into a repository's objects: :class:`Importer`.

Each file is hashed with the repository's algorithm and published if it is new,
in ``threads`` lanes: in-process threads for small
amounts of data, one worker process per lane for large ones (per-block fs-verity
hashing holds the GIL, as explained in :mod:`composefsd.sources.directory`). Worker
processes publish objects themselves, under the caller's repository lock,
whose fd they inherit so that it outlives a killed parent until they exit.

A file is hashed first and copied only if its object is new
(:meth:`~composefsd.repository.store.ObjectStore.import_fd`), except for files
known to need copying, which are hashed while they are copied (see
:mod:`composefsd.repository.store`).
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from composefsd import workerproc
from composefsd.credentials import Credentials, CredentialsError, acting_as
from composefsd.kernel.verity import Algorithm
from composefsd.repository.errors import (
    CorruptObjectError,
    RepositoryError,
    SourceError,
    VerityRequiredError,
    os_error_text,
)
from composefsd.repository.meta import VerityPolicy
from composefsd.repository.store import (
    COPY_BUFSIZE,
    ObjectResult,
    ObjectStore,
    PublishState,
    check_unchanged,
)
from composefsd.sources.base import ImportTask
from composefsd.sources.beneath import BeneathOpener, ChangedError, FileKey, file_key

__all__ = ["ImportConfig", "ImportResult", "ImportTask", "Importer"]

# Work units of the importer: this many files or bytes, whichever comes first.
_BATCH_FILES = 64
_BATCH_BYTES = 32 << 20
# From this much data on the importer uses worker processes.
_PROCESS_MIN_BYTES = 128 << 20
_PROGRESS_INTERVAL = 0.2


def _read_all(fd: int) -> bytes:
    parts: list[bytes] = []
    while chunk := os.read(fd, 65536):
        parts.append(chunk)
    return b"".join(parts)


# Not frozen: a re-import makes one per file, and a frozen dataclass's __init__
# costs four times as much.
@dataclass(slots=True)
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


# Marshal-friendly forms of tasks, results and failures.
#: (rel, size, expected, inline, hashing copy, key)
_Task = tuple[bytes, int, "bytes | None", bool, bool, "FileKey | None"]
_Result = tuple["bytes | None", "bytes | None", bool, bool, "FileKey | None"]
_Failure = tuple[str, "int | None", str]


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
        check_unchanged(fd, st)
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
    if isinstance(exc, CorruptObjectError):
        return "corrupt", exc.errno, exc.message
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
    if kind == "corrupt":
        raise CorruptObjectError(message, errno=err)
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


_Batch = tuple[int, list[_Task]]
_BatchRunner = Callable[[list[_Task]], list[_Result | _Failure]]


@contextmanager
def _worker_session(wire: tuple[object, ...]) -> Iterator[_BatchRunner]:
    """An import worker process's state, from its first message (an :class:`ImportConfig`).

    It reads the source beneath the inherited ``config.source_fd`` and, with
    ``config.credentials``, opens it with the caller's rights
    (:func:`composefsd.credentials.acting_as`; this process has one thread)."""
    config = ImportConfig.from_wire(wire)
    buf = bytearray(COPY_BUFSIZE)
    with config.store() as store, config.opener() as opener:
        yield lambda tasks: _run_batch(
            store, opener, tasks, config.hashing_copy, buf, config.credentials
        )


def _worker_main() -> None:
    """An import worker process: a config, then batches from stdin, results to stdout."""
    workerproc.serve(init=_worker_session)


def _start_worker(config: ImportConfig, pass_fds: Sequence[int]) -> subprocess.Popen[bytes]:
    # Its stderr stays ours: an import worker's failure is worth seeing.
    return workerproc.start(
        "composefsd.repository.importer",
        "_worker_main",
        pass_fds=(*pass_fds, config.source_fd),
        quiet=False,
    )


def _worker_lost(status: int) -> RepositoryError:
    return RepositoryError(f"import worker exited with status {status}")


def _batch_tasks(batch: _Batch) -> list[_Task]:
    return batch[1]


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
        self.failure: _Failure | None = None
        self.files_done = 0
        self.bytes_done = 0
        #: Digests (hex) of the objects this import wrote, failed or not (known once
        #: their batch came back: a worker killed mid-batch takes its own with it).
        self.written: list[str] = []
        self._results: list[_Result | None] = []
        self._lock = threading.Lock()

    def done(self, batch: _Batch, results: list[_Result | _Failure]) -> None:
        start, tasks = batch
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

    def _lane_failed(self, exc: BaseException) -> None:
        self.fail(_failure(exc))

    def _failed(self) -> bool:
        return self.failure is not None

    @contextmanager
    def _in_process(self) -> Iterator[_BatchRunner]:
        """A lane's way to import a batch itself: its own opener and copy buffer."""
        buf = bytearray(COPY_BUFSIZE)
        with self.config.opener() as opener:

            def run(tasks: list[_Task]) -> list[_Result | _Failure]:
                assert self.store is not None
                return _run_batch(self.store, opener, tasks, self.config.hashing_copy, buf)

            yield run

    def _lanes(self, count: int) -> workerproc.Pool[_Batch, list[_Task], _Result | _Failure]:
        # Worker processes publish under the caller's lock: one that is lost fails the
        # import (its batch's objects are complete, but which ones is unknown).
        lanes: workerproc.Pool[_Batch, list[_Task], _Result | _Failure] = workerproc.Pool(
            "cfs-import",
            count,
            request=_batch_tasks,
            local=self._in_process,
            done=self.done,
            fail=self._lane_failed,
            start=lambda: _start_worker(self.config, self.pass_fds),
            first=self.config.to_wire(),
            skip=self._failed,
            kill=self._failed,
            lost=_worker_lost,
            stop_timeout=30,
        )
        lanes.processes = self.use_processes
        return lanes

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.files_done, self.bytes_done)

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
        lanes = self._lanes(min(self.threads, len(tasks)))
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
                    lanes.put((start, batch))
                    batch, batch_bytes = [], 0
            if batch:
                lanes.put((start, batch))
            lanes.close()
            lanes.start()
            lanes.join(_PROGRESS_INTERVAL, self._report)
        except BaseException:
            self.fail(("internal", None, "interrupted"))
            lanes.abort()
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
