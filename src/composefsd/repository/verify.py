"""Verify one image of a repository: its own digest, its format, every object it uses;
or one composefs-rs splitstream (:func:`verify_stream`).

:func:`verify_image` checks, for the image named by ``digest``:

* the image file (``images/<hex>``, a link to ``objects/XX/rest``) exists, is the
  object of that digest, and its fs-verity digest equals the name;
* it parses as a composefs image;
* every object a regular file of the image refers to (payload ``XX/rest``) exists,
  is a regular file of the size the image records for it, and its fs-verity digest
  equals its name.

:func:`verify_stream` checks a stream (``streams/<name>``, or the stream a
``refs/<name>`` under ``streams/refs`` names) the same way, as composefs-rs's fsck
checks streams and more: the link leads to an object whose fs-verity digest is its
name, the splitstream's header and reference sections parse
(:func:`composefsd.splitstream.read_refs`), and every object it references and
every object its named refs name exists with the right digest (any size: the
references do not record sizes).

Digests come from the kernel (``FS_IOC_MEASURE_VERITY``) where the file has
fs-verity, and are computed in userspace otherwise. Userspace hashing is
GIL-bound in threads (one ``hashlib`` call per 4 KiB block), so large amounts are
spread over worker processes, as the scanner does; see :func:`check_files`.

What "lacks verity" means depends on the repository's policy:

* ``required``: every object and the image must have kernel fs-verity. Each one
  the kernel cannot measure (not enabled, filesystem unsupported, or another
  hash algorithm) is listed in ``no_verity`` and makes the report not ``ok``.
* ``try``: objects get verity where the filesystem can do it. An object that has
  none on a filesystem that supports it (the kernel answers "not enabled") is
  listed in ``no_verity`` for information; it does not make the report fail,
  since its content was still checked. On a filesystem without fs-verity
  nothing is listed: that is what ``try`` allows.
* ``disabled``: ``no_verity`` stays empty.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import operator
import os
import queue
import re
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from composefsd import objectcheck, workerproc
from composefsd.fsverity import digest_bytes
from composefsd.image.reader import ImageFormatError, scan_objects
from composefsd.image.tree import S_IFMT, Node
from composefsd.kernel.verity import Algorithm, measure_verity
from composefsd.objectcheck import NOT_REGULAR, OPEN_FLAGS, Summary, Wire
from composefsd.objectlayout import is_hex, is_hex_digest, object_link_digest, object_relpath
from composefsd.repository import objectlist
from composefsd.repository.meta import VerityPolicy
from composefsd.repository.progress import ProgressCallback, Throttle
from composefsd.repository.store import NotRegularObjectError, open_object, open_objects_dir

if TYPE_CHECKING:
    from composefsd.repository.repo import Repository

__all__ = [
    "NOT_REGULAR",
    "OPEN_FLAGS",
    "FileCheck",
    "RepositoryView",
    "VerifyReport",
    "check_file",
    "check_files",
    "stream_entry_path",
    "stream_names",
    "verify_image",
    "verify_stream",
    "verity_text",
]

# Work is measured in bytes to hash, each file counting this much more for opening
# it (measured: ~30 us per file, about what hashing 32 KiB costs).
_FILE_COST_BYTES = 32 << 10
# Below this much work (~0.25 s of hashing), worker processes cost more to start than
# they save (each one imports composefsd.objectcheck: ~0.05 s with Python's start).
_PROCESS_MIN_COST = 256 << 20
# A work unit handed to a worker (a file larger than this goes alone).
_BATCH_COST = 32 << 20
# Objects Verify takes from the image scan at a time; a first full chunk means
# the image is worth worker processes (each object counts _FILE_COST_BYTES at least).
_SCAN_CHUNK = _PROCESS_MIN_COST // _FILE_COST_BYTES
# An image file this large (~256 bytes per object) is worth worker processes from
# the start (a hint only: the scan finds how many objects it names) ...
_EARLY_IMAGE_BYTES = _SCAN_CHUNK * 256
# ... which then get its objects in chunks of this many.
_EARLY_CHUNK = 1024
# Files checked in-process between two deliveries of their results.
_LOCAL_RUN = 256
# Room in each worker pipe for two requests in flight (a request of 1,024 paths is
# ~100 KiB).
_PIPE_SIZE = 1 << 20


class RepositoryView(Protocol):
    """What verification and fsck need of a repository (``Repository`` provides it)."""

    @property
    def path(self) -> Path: ...

    @property
    def algorithm(self) -> str: ...

    @property
    def hash_name(self) -> str: ...

    @property
    def verity(self) -> VerityPolicy: ...

    def object_path(self, hexdigest: str) -> Path: ...

    def image_path(self, hexdigest: str) -> Path: ...


@dataclass(slots=True)
class VerifyReport:
    """What :func:`verify_image` found. Digests are lowercase hex."""

    digest: str
    #: Problems of the image file itself: missing, wrong digest, does not parse, ...
    image_problems: list[str] = field(default_factory=list)
    #: Objects the image refers to that do not exist.
    missing: list[str] = field(default_factory=list)
    #: (digest, reason) for objects that exist but are wrong.
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    #: Files without kernel fs-verity, as the repository's policy asks (module notes).
    no_verity: list[str] = field(default_factory=list)
    #: Why the kernel could not measure each of ``no_verity`` (``FileCheck.why``;
    #: :func:`verity_text` says it in words).
    no_verity_why: dict[str, str] = field(default_factory=dict)
    #: Distinct objects the image refers to (all of them were looked at).
    objects_checked: int = 0
    #: How many object digests the kernel measured; the rest were computed.
    verity_measured: int = 0
    #: Bytes of object data checked (sizes recorded in the image).
    bytes_checked: int = 0
    #: Whether a missing verity counts as a failure (the ``required`` policy).
    verity_required: bool = False
    #: For :func:`verify_stream`: the stream's name (``digest`` is its object's).
    stream: str | None = None

    @property
    def ok(self) -> bool:
        if self.image_problems or self.missing or self.corrupt:
            return False
        return not (self.verity_required and self.no_verity)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (the CLI's ``--json`` and the service use it)."""
        return {
            "digest": self.digest,
            "ok": self.ok,
            "image_problems": list(self.image_problems),
            "missing": list(self.missing),
            "corrupt": [{"digest": d, "reason": r} for d, r in self.corrupt],
            "no_verity": list(self.no_verity),
            "objects_checked": self.objects_checked,
            "verity_measured": self.verity_measured,
            "bytes_checked": self.bytes_checked,
            "verity_required": self.verity_required,
            **({"stream": self.stream} if self.stream is not None else {}),
        }


# -- checking files -------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class FileCheck:
    """What checking one file found (see :func:`check_file`)."""

    #: The errno of a failure to open or read, or :data:`NOT_REGULAR`; None if none.
    error: int | None = None
    size: int = 0
    #: Hex digest: the kernel's if ``measured``, else computed. None when not worked
    #: out (an error, or the size was already wrong).
    digest: str | None = None
    measured: bool = False
    #: Why the kernel did not measure it: ``"not-enabled"``, ``"unsupported"``, or
    #: another reason (such as another hash algorithm). None if it did.
    why: str | None = None

    def describe_error(self) -> str:
        if self.error == NOT_REGULAR:
            return "not a regular file"
        if self.error == errno.ELOOP:
            return "not a regular file (a symlink)"
        return os.strerror(self.error or errno.EIO)


def _measure(fd: int, algorithm: Algorithm) -> tuple[bytes | None, str | None]:
    """The kernel's digest, or None and why not (see ``FileCheck.why``)."""
    return objectcheck.measure(fd, algorithm, measure_verity)


class _Checker(objectcheck.Checker):
    """:class:`composefsd.objectcheck.Checker` asking the kernel through this
    module's :func:`_measure` (the in-process checks; workers use their own)."""

    __slots__ = ()

    def _measure(self, fd: int) -> tuple[bytes | None, str | None]:
        return _measure(fd, self._algorithm)


def _check(path: bytes, algorithm: Algorithm, expected_size: int) -> Wire:
    with _Checker(algorithm) as checker:
        return checker.check(path, expected_size)


def check_file(path: bytes, algorithm: Algorithm, expected_size: int = -1) -> FileCheck:
    """Open ``path`` (no symlink as it or its directory, no blocking), check it is a regular file of
    ``expected_size`` bytes (any size if negative), and work out its digest: measured
    by the kernel if the file has fs-verity, computed otherwise. Never raises OSError."""
    return FileCheck(*_check(path, algorithm, expected_size))


def _check_batch(request: tuple[str, Sequence[tuple[bytes, int]]]) -> list[Wire]:
    """Check a batch: (algorithm name, [(path, expected size)...]), in-process."""
    algorithm, items = request
    with _Checker(Algorithm.parse(algorithm)) as checker:
        return [checker.check(path, size) for path, size in items]


def _serve_local(request: objectcheck.Request) -> list[Wire] | Summary:
    """A lane's in-process answer to a batch: what a worker would answer."""
    algorithm, items, summary = request
    wires = _check_batch((algorithm, items))
    return objectcheck.summarize(items, wires) if summary else wires


def _start_worker() -> subprocess.Popen[bytes]:
    return workerproc.start("composefsd.objectcheck", "worker_main", site=False)


#: A work unit: the files' indices in ``files``, and their (path, expected size).
_Batch = tuple[list[int], list[tuple[bytes, int]]]
_LaneItem = tuple[list[int], "list[Wire] | Summary"] | BaseException | None
#: ``on_matched(indices, why, unknown_size_bytes)`` (see :func:`check_files`).
OnMatched = Callable[[list[int], str | None, int], None]


def _batches(files: Sequence[tuple[bytes, int]]) -> list[list[int]]:
    """The indices of ``files`` in work units of about :data:`_BATCH_COST`, largest
    files first, so that one big file does not finish alone at the end. A unit ends
    with the first file that brings it to :data:`_BATCH_COST` (sizes below 0 count
    as 0, each file :data:`_FILE_COST_BYTES` more); the cuts are found by bisection
    on the running total, not by a Python step per file."""
    sizes = [size for _, size in files]
    order = sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True)
    costs = [sizes[i] for i in order]
    # Unknown sizes (negative) sort last and count as 0 bytes.
    known = bisect.bisect_right(costs, 0, key=operator.neg)
    costs[known:] = itertools.repeat(0, len(costs) - known)
    total = list(itertools.accumulate(costs))

    def cost_through(j: int) -> int:
        return total[j] + (j + 1) * _FILE_COST_BYTES

    batches: list[list[int]] = []
    start, base = 0, 0
    while start < len(order):
        first = bisect.bisect_left(range(len(order)), base + _BATCH_COST, start, key=cost_through)
        end = min(first + 1, len(order))
        batches.append(order[start:end])
        base = cost_through(end - 1)
        start = end
    return batches


def _deliverer(
    on_result: Callable[[int, FileCheck], None], on_matched: OnMatched | None
) -> Callable[[Sequence[int], list[Wire] | Summary], None]:
    """How :func:`check_files` hands a batch's answer to its callbacks."""
    summary = on_matched is not None

    def deliver(indices: Sequence[int], answer: list[Wire] | Summary) -> None:
        if _count(answer, summary) != len(indices):
            raise ValueError(
                f"{_count(answer, summary)} results for a batch of {len(indices)} files"
            )
        if on_matched is None:
            for index, wire in zip(indices, answer, strict=True):
                on_result(index, FileCheck(*cast("Wire", wire)))
            return
        groups, others = cast("Summary", answer)
        for why, (positions, unknown) in groups.items():
            on_matched([indices[p] for p in positions], why, unknown)
        for position, wire in others:
            on_result(indices[position], FileCheck(*wire))

    return deliver


def default_workers() -> int:
    """Checking processes by default: one per CPU this process may run on."""
    return workerproc.cpus()


def check_files(
    files: Sequence[tuple[bytes, int]],
    algorithm: Algorithm,
    on_result: Callable[[int, FileCheck], None],
    on_matched: OnMatched | None = None,
    *,
    workers: int | None = None,
) -> None:
    """:func:`check_file` for every (path, expected size) of ``files``, in parallel.

    ``on_result(index, check)`` is called in the calling thread once per file, in no
    particular order. With ``on_matched``, the paths are object paths
    (``objects/XX/rest``), and the files found to be what their name says (read,
    of the expected size if one was given, digest equal to the name) come in
    groups instead: ``on_matched(indices, why, unknown_size_bytes)``, ``why`` as
    ``FileCheck.why`` (None: measured by the kernel), with the total size of those
    of them whose expected size was negative; every other file still goes to
    ``on_result``. Worker processes are used when ``workers`` > 1 and the work
    is large enough for them to pay off (userspace hashing holds the GIL for most
    of its time, so threads would not add up): ``workers - 1`` of them, the
    calling thread checking its share of the batches (:class:`_Checking`). Files
    are handed out largest first, so that one big file does not finish alone at
    the end.
    """
    n = default_workers() if workers is None else max(1, workers)
    total = sum(max(size, 0) for _, size in files)
    cost = total + len(files) * _FILE_COST_BYTES
    summary = on_matched is not None

    deliver = _deliverer(on_result, on_matched)

    if n == 1 or len(files) < 2 or cost < _PROCESS_MIN_COST:
        # In runs of files, so that results (and progress) come as the work goes.
        with _Checker(algorithm) as checker:
            for start in range(0, len(files), _LOCAL_RUN):
                items = list(files[start : start + _LOCAL_RUN])
                wires = [checker.check(path, size) for path, size in items]
                answer = objectcheck.summarize(items, wires) if summary else wires
                deliver(range(start, start + len(items)), answer)
        return
    checking = _Checking(algorithm, n, summary)
    checking.deliver = deliver
    try:
        checking.add(files)
        checking.finish()
    finally:
        checking.abort()


class _Checking:
    """:func:`check_files` with ``n`` processes: ``n - 1`` worker processes, each
    driven by a lane (a thread), and the calling thread, which checks its share of
    the batches in :meth:`finish` rather than wait. Files can be added
    (:meth:`add`) while the calling thread is busy with something else (Verify
    scanning the image); the workers start on them at once, and their results are
    held until :meth:`finish`, which alone hands results to ``deliver``."""

    __slots__ = (
        "_algorithm",
        "_error",
        "_out",
        "_pool",
        "_running",
        "_size",
        "_summary",
        "deliver",
    )

    def __init__(self, algorithm: Algorithm, n: int, summary: bool, *, eager: bool = False) -> None:
        self._algorithm = algorithm
        self._summary = summary
        #: Where results go (:func:`_deliverer`); set before :meth:`finish`.
        self.deliver: Callable[[Sequence[int], list[Wire] | Summary], None] | None = None
        self._size = 0
        self._error: BaseException | None = None
        self._out: queue.SimpleQueue[_LaneItem] = queue.SimpleQueue()
        alg = algorithm.value
        out = self._out

        def done(batch: _Batch, answer: list[Wire] | Summary) -> None:
            # A batch's results go over as one item: one hand-off between threads per
            # batch rather than per file. (Raising here goes to ``fail``.)
            if _count(answer, summary) != len(batch[0]):
                raise ValueError(
                    f"{_count(answer, summary)} results for a batch of {len(batch[0])} files"
                )
            out.put((batch[0], answer))

        # If a worker cannot be started or dies, its lane checks in-process from then on.
        self._pool: workerproc.Pool[_Batch, objectcheck.Request, Any]
        self._pool = workerproc.Pool(
            "cfs-check",
            max(1, n - 1),
            request=lambda batch: (alg, batch[1], summary),
            # A summary is one reply for a batch, not one result per file: no "exact".
            local=lambda: contextlib.nullcontext(cast("Callable[[Any], list[Any]]", _serve_local)),
            done=done,
            fail=out.put,
            finished=lambda: out.put(None),
            start=_start_worker,
            # Two batches in flight, so that a worker does not wait while the calling
            # thread holds the GIL to hash its own share.
            depth=2,
            pipe_size=_PIPE_SIZE,
            # Each worker started at once (the files come later), or with its first batch.
            eager=eager,
            note="checking",
        )
        self._pool.processes = True
        self._running = len(self._pool.lanes)
        self._pool.start()

    def add(self, files: Sequence[tuple[bytes, int]]) -> None:
        """More files, numbered on from those added before."""
        base = self._size
        self._size += len(files)
        put = self._pool.put
        for indices in _batches(files):
            put(([base + i for i in indices], [files[i] for i in indices]))

    def _take(self, block: bool) -> None:
        """Deliver the lanes' results that are there (waiting for one if ``block``)."""
        out = self._out
        while self._running:
            try:
                item = out.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                self._running -= 1
            elif isinstance(item, BaseException):
                self._error = self._error or item
            elif self._error is None:
                assert self.deliver is not None
                self.deliver(*item)

    def finish(self) -> None:
        """No more files: check batches in this thread alongside the workers until
        none is left, delivering every result; then raise the first lane error."""
        pool = self._pool
        pool.close()
        work = pool.work
        # An end mark of this thread's own: the lanes' are theirs (taking one of
        # them could leave this thread waiting for a mark a lane took).
        work.put(None)
        with _Checker(self._algorithm) as checker:
            while self._error is None:
                batch = work.get()
                if batch is None:
                    break  # every batch has been taken
                self._take(block=False)
                indices, items = batch
                wires = [checker.check(path, size) for path, size in items]
                answer = objectcheck.summarize(items, wires) if self._summary else wires
                assert self.deliver is not None
                self.deliver(indices, answer)
        while self._running:
            self._take(block=True)
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the workers now, if they have not ended (Verify left early, or the
        image turned out not to be valid); nothing more is delivered."""
        if self._running:
            self._pool.abort()


def _count(answer: list[Wire] | Summary, summary: bool) -> int:
    """How many files an answer accounts for."""
    if not summary:
        return len(answer)
    groups, others = cast("Summary", answer)
    return len(others) + sum(len(positions) for positions, _ in groups.values())


# -- verification ---------------------------------------------------------------------------


def lacks_verity(policy: VerityPolicy, why: str) -> bool:
    """Whether a file the kernel could not measure (for reason ``why``, see
    ``FileCheck.why``) belongs in a "no verity" list under ``policy``."""
    if policy is VerityPolicy.REQUIRED:
        return True
    if policy is VerityPolicy.TRY:
        return why != "unsupported"
    return False


def verity_text(why: str) -> str:
    """Why the kernel did not measure a file (``FileCheck.why``), in words."""
    if why == "not-enabled":
        return "fs-verity is not enabled on the object"
    if why == "unsupported":
        return "the filesystem does not support fs-verity"
    return why


# An object payload, ``XX/rest``: the digest in lowercase hex with a "/" after two digits.
_PAYLOAD = {
    alg: re.compile(rb"[0-9a-f]{2}/[0-9a-f]{%d}" % (2 * alg.digest_size - 2)) for alg in Algorithm
}


def _payload_hex(payload: bytes) -> str:
    """The digest an object payload ``XX/rest`` names."""
    return (payload[:2] + payload[3:]).decode("ascii")


def referenced_objects(
    root: Node, algorithm: Algorithm, problems: list[str] | None = None
) -> dict[str, int]:
    """Object digest -> size for every regular file of the tree backed by an object.

    Payloads that are not object paths for ``algorithm``, and objects recorded with
    two different sizes, are reported into ``problems`` (once each).
    """
    files: list[tuple[bytes, int]] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if node.children:
            stack.extend(node.children.values())
        # Hardlink entries read from an image have mode 0 and are skipped, like C's
        # `composefs-info objects`: their target is visited as an inode of its own.
        if node.mode & S_IFMT != stat.S_IFREG or node.payload is None or node.content:
            continue
        files.append((node.payload, node.size))
    sizes = _object_payloads(files, algorithm, problems)
    return {_payload_hex(payload): size for payload, size in sizes.items()}


def _object_payloads(
    files: Sequence[tuple[bytes, int]], algorithm: Algorithm, problems: list[str] | None
) -> dict[bytes, int]:
    """Payload (``XX/rest``) -> size for (payload, size) of files backed by objects;
    the problems as :func:`referenced_objects` says."""
    payloads = _Payloads(algorithm, problems)
    payloads.add(files)
    return payloads.sizes


class _Payloads:
    """The objects of an image's files as they come (:func:`_object_payloads`):
    ``sizes`` maps each payload to its size, in the order first met; :meth:`add`
    also returns the payloads it met for the first time."""

    __slots__ = ("_bad", "_problems", "_valid", "algorithm", "sizes")

    def __init__(self, algorithm: Algorithm, problems: list[str] | None) -> None:
        self.algorithm = algorithm
        self._valid = _PAYLOAD[algorithm].fullmatch
        self._problems = problems
        self._bad: set[bytes] = set()
        self.sizes: dict[bytes, int] = {}

    def add(self, files: Sequence[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
        valid = self._valid
        sizes = self.sizes
        bad = self._bad
        problems = self._problems
        new: list[tuple[bytes, int]] = []
        for payload, size in files:
            if valid(payload) is None:
                if payload not in bad and problems is not None:
                    bad.add(payload)
                    problems.append(
                        f"file payload {payload!r} is not an object path "
                        f"(XX/rest, {self.algorithm.value})"
                    )
                continue
            old = sizes.get(payload)
            if old is None:
                sizes[payload] = size
                new.append((payload, size))
            elif old != size and problems is not None:
                problems.append(
                    f"object {_payload_hex(payload)} is recorded with sizes {old} and {size}"
                )
        return new


def _read_all(fd: int, size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while True:
        chunk = os.read(fd, max(size - got, 0) + 65536)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        got += len(chunk)


def _check_image_file(
    repo: RepositoryView, digest: str, algorithm: Algorithm, report: VerifyReport
) -> bytes | None:
    """Check the image file; return its content if it could be read."""
    link = repo.image_path(digest)
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        report.image_problems.append(f"image {digest} not found ({link} does not exist)")
        return None
    except OSError as exc:
        report.image_problems.append(f"{link} is not a link to an object: {exc.strerror}")
        return None
    if object_link_digest(target, algorithm) != digest:
        report.image_problems.append(
            f"{link} links to {target!r}, not to its object ../objects/"
            f"{object_relpath(digest)}; not followed"
        )
        return None
    return _check_linked_object(repo, link, target, digest, algorithm, report)


def _check_linked_object(
    repo: RepositoryView,
    link: Path,
    target: str,
    digest: str,
    algorithm: Algorithm,
    report: VerifyReport,
) -> bytes | None:
    """Check the object ``digest`` that ``link`` (``images/<hex>``, ``streams/<name>``,
    leading to ``target``) names, opened below ``objects/``, and that its digest is
    right; return its content if it could be read."""
    what = "stream" if report.stream is not None else "image"
    try:
        objects_fd = open_objects_dir(repo.path / "objects")
    except OSError as exc:
        report.image_problems.append(f"cannot open {repo.path / 'objects'}: {exc.strerror}")
        return None
    try:
        fd = open_object(objects_fd, digest)
    except FileNotFoundError:
        report.image_problems.append(
            f"{link} is a dangling link (to {target}): {what} object missing"
        )
        return None
    except NotRegularObjectError:
        report.image_problems.append(f"{link} leads to {target}, which is not a regular file")
        return None
    except OSError as exc:
        report.image_problems.append(f"cannot open {link} (to {target}): {exc.strerror}")
        return None
    finally:
        os.close(objects_fd)
    try:
        size = os.fstat(fd).st_size
        measured, why = _measure(fd, algorithm)
        data = _read_all(fd, size)
    except OSError as exc:
        report.image_problems.append(f"cannot read {link}: {exc.strerror}")
        return None
    finally:
        os.close(fd)
    if measured is None:
        assert why is not None
        if lacks_verity(repo.verity, why):
            report.no_verity.append(digest)
            report.no_verity_why[digest] = why
        measured = digest_bytes(data, algorithm)
    if measured.hex() != digest:
        report.image_problems.append(f"digest mismatch: {measured.hex()}")
    return data


def verify_image(
    repo: RepositoryView,
    digest: str,
    *,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> VerifyReport:
    """Check the image ``digest`` (lowercase hex) of ``repo`` and all its objects.

    Never raises for what it finds: everything wrong goes into the report.
    Progress: phase ``"image"`` (0 of 1, then 1 of 1), then ``"objects"`` with the
    number of objects checked so far out of the image's distinct objects.
    ``workers`` caps the hashing processes (default: one per CPU). With
    ``cache_dir`` (the repository's ``cache/``, for a caller that may write it),
    the objects of an image whose digest is confirmed come from its object list
    there when it has one, and a scan writes one (:mod:`composefsd.repository.objectlist`).
    """
    algorithm = Algorithm.parse(repo.hash_name)
    report = VerifyReport(digest=digest, verity_required=repo.verity is VerityPolicy.REQUIRED)
    if not is_hex_digest(digest, algorithm):
        report.image_problems.append(
            f"{digest!r} is not a {algorithm.value} image digest "
            f"({2 * algorithm.digest_size} lowercase hex digits)"
        )
        return report
    step = Throttle(progress)
    n = default_workers() if workers is None else max(1, workers)
    checking: _Checking | None = None
    if n > 1 and _size_hint(repo.image_path(digest)) >= _EARLY_IMAGE_BYTES:
        # An image this large names enough objects for worker processes: start them
        # now, so that their start overlaps the image's check and scan.
        checking = _Checking(algorithm, n, True, eager=True)
    try:
        lists = None if cache_dir is None else os.fspath(cache_dir)
        _verify_image(repo, digest, algorithm, report, step, n, checking, progress, workers, lists)
    finally:
        if checking is not None:
            # Stop the workers if Verify left early or the image was refused.
            checking.abort()
    return report


def _size_hint(path: Path) -> int:
    """The size of the file ``path`` leads to, 0 if none: only a hint, for whether
    to start worker processes early (whatever the file is, it is checked after)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _verify_image(
    repo: RepositoryView,
    digest: str,
    algorithm: Algorithm,
    report: VerifyReport,
    step: Throttle,
    n: int,
    checking: _Checking | None,
    progress: ProgressCallback | None,
    workers: int | None,
    lists: str | None,
) -> None:
    """:func:`verify_image` once the digest is well-formed, with ``checking`` if
    it started workers early, and ``lists``, the directory of object lists if any."""
    step("image", 0, 1, force=True)
    data = _check_image_file(repo, digest, algorithm, report)
    step("image", 1, 1, force=True)
    if data is None:
        return
    # The image's digest is its name (confirmed just now, before any object of a
    # list reaches a worker: those started early have only started), so its
    # objects are those its list holds, if it has one; else it is scanned (a
    # damaged image too: the scan says what is wrong with it).
    confirmed = not report.image_problems
    if lists is not None and confirmed:
        listed = objectlist.load(lists, algorithm, digest)
        if listed is not None:
            del data
            files = listed.paths(_objects_prefix(repo, algorithm))
            if checking is not None:
                checking.add(files)
            _check_objects(
                repo, algorithm, listed.sizes, report, progress, workers, checking, files
            )
            return
    # The payloads' problems join the report only once the image is known valid.
    payload_problems: list[str] = []
    payloads = _Payloads(algorithm, payload_problems)
    objects = _objects_prefix(repo, algorithm)

    def on_chunk(chunk: list[tuple[bytes, int]]) -> None:
        # An image this large is checked in worker processes anyway (_PROCESS_MIN_COST):
        # they start on its objects while the rest of it is scanned. Only payloads
        # that are object paths reach them; their results wait for the end of the scan.
        nonlocal checking
        new = payloads.add(chunk)
        if checking is None:
            checking = _Checking(algorithm, n, True)
        checking.add([(b"%s/%s" % (objects, payload), size) for payload, size in new])

    if checking is not None:
        chunk = _EARLY_CHUNK
    else:
        chunk = _SCAN_CHUNK if n > 1 else 0
    try:
        # The objects without the tree: the same walk and checks as read_image
        # (c_quirks=False), so the same images are refused.
        rest = scan_objects(data, chunk=chunk, on_chunk=on_chunk)
    except BaseException as exc:
        if checking is not None:
            # Nothing checked so far is reported: the image is not valid as a whole.
            checking.abort()
        if not isinstance(exc, (ImageFormatError, OSError, ValueError)):
            raise
        # ImageFormatError is the reader's verdict; anything else it raises on a
        # damaged image is a verdict too, not a reason to stop verifying.
        report.image_problems.append(f"not a valid composefs image: {exc}")
        return
    del data
    new = payloads.add(rest)
    report.image_problems += payload_problems
    if lists is not None and confirmed and not payload_problems:
        # Scanned from bytes whose digest is the name, without a problem: its list.
        objectlist.save(lists, algorithm, digest, payloads.sizes)
    if checking is not None:
        checking.add([(b"%s/%s" % (objects, payload), size) for payload, size in new])
    del rest, new
    _check_objects(repo, algorithm, payloads.sizes, report, progress, workers, checking)


def _objects_prefix(repo: RepositoryView, algorithm: Algorithm) -> bytes:
    """The repository's objects directory, to which ``XX/rest`` is joined by hand
    (pathlib costs ~5 us per object)."""
    return os.fsencode(repo.object_path("00" * algorithm.digest_size).parent.parent)


def verify_stream(
    repo: RepositoryView,
    name: str,
    *,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
) -> VerifyReport:
    """Check the stream ``name`` (a ``streams/`` entry name or ``refs/<ref>``) of
    ``repo`` and every object it references (module notes). Never raises for what
    it finds: everything wrong goes into the report (``image_problems`` holds the
    stream's own problems)."""
    algorithm = Algorithm.parse(repo.hash_name)
    report = VerifyReport(
        digest="", verity_required=repo.verity is VerityPolicy.REQUIRED, stream=name
    )
    streams = repo.path / "streams"
    entry = _stream_entry(streams, name)
    if entry is None:
        report.image_problems.append(f"{name!r} names no stream of {repo.path}")
        return report
    link = streams / entry
    try:
        target = os.readlink(link)
    except OSError as exc:
        report.image_problems.append(f"{link} is not a stream link: {exc.strerror}")
        return report
    digest = object_link_digest(target, algorithm)
    if digest is None:
        report.image_problems.append(
            f"{link} links to {target!r}: a stream link leading outside objects/ "
            "(not ../objects/XX/rest); not followed"
        )
        return report
    report.digest = digest
    step = Throttle(progress)
    step("stream", 0, 1, force=True)
    data = _check_linked_object(repo, link, target, digest, algorithm, report)
    step("stream", 1, 1, force=True)
    if data is None:
        return report
    # Loaded here: an image's Verify has no use for the stream code.
    from composefsd.splitstream import SplitStreamError, read_refs

    try:
        refs = read_refs(data, algorithm.digest_size)
    except SplitStreamError as exc:
        report.image_problems.append(f"not a valid splitstream: {exc}")
        return report
    digests = dict.fromkeys(refs.object_refs, -1)
    digests.update((digest, -1) for _name, digest in refs.named_refs)
    for d in digests:
        if not is_hex(d):
            repo.object_path(d)  # its error, as for any name that is not a digest
    sizes = {f"{d[:2]}/{d[2:]}".encode(): size for d, size in digests.items()}
    _check_objects(repo, algorithm, sizes, report, progress, workers)
    return report


def stream_names(repo: Repository) -> list[str]:
    """The names under which a check of everything verifies streams: every entry of
    ``streams/`` (sorted), then ``refs/<name>`` for every link under
    ``streams/refs`` that names no stream (:func:`verify_stream` reports it)."""
    from composefsd.repository.streams import iter_stream_refs, iter_streams

    names = [link.content_id for link in iter_streams(repo)]
    names += [f"refs/{ref.name}" for ref in iter_stream_refs(repo) if ref.content_id is None]
    return names


def stream_entry_path(repo: RepositoryView, name: str) -> Path:
    """Where the stream ``name`` of :func:`stream_names` lives (its link)."""
    streams = repo.path / "streams"
    return streams / "refs" / name[5:] if name.startswith("refs/") else streams / name


def _stream_entry(streams: Path, name: str) -> str | None:
    """The existing ``streams/`` entry ``name`` names (:func:`stream_entry`), or None."""
    from composefsd.repository.streams import StreamNotFoundError, stream_entry

    try:
        entry = stream_entry(streams, name)
    except StreamNotFoundError:
        return None
    return entry if os.path.lexists(streams / entry) else None


def _check_objects(
    repo: RepositoryView,
    algorithm: Algorithm,
    sizes: dict[bytes, int],
    report: VerifyReport,
    progress: ProgressCallback | None,
    workers: int | None,
    checking: _Checking | None = None,
    files: list[tuple[bytes, int]] | None = None,
) -> None:
    """Check the objects named by the payloads (``XX/rest``) of ``sizes``, each of
    its size there (any size if negative), into ``report``; with ``checking``,
    finish the checks it already holds (those of ``sizes``, in its order); with
    ``files``, their (path, size) are those, in the order of ``sizes``."""
    payloads = list(sizes)
    report.objects_checked = len(payloads)
    # A negative size is unknown (stream references): any size is right, and the
    # bytes checked are what the files hold.
    report.bytes_checked = sum(max(size, 0) for size in sizes.values())
    total = len(payloads)
    step = Throttle(progress)
    step("objects", 0, total, force=True)
    done = 0
    policy = repo.verity

    def on_result(index: int, check: FileCheck) -> None:
        nonlocal done
        payload = payloads[index]
        digest = _payload_hex(payload)
        expected = sizes[payload]
        if check.error == errno.ENOENT:
            report.missing.append(digest)
        elif check.error is not None:
            report.corrupt.append((digest, check.describe_error()))
        elif 0 <= expected != check.size:
            report.corrupt.append((digest, f"size {check.size} != expected {expected}"))
        else:
            if expected < 0:
                report.bytes_checked += check.size
            if check.measured:
                report.verity_measured += 1
            elif check.why is not None and lacks_verity(policy, check.why):
                report.no_verity.append(digest)
                report.no_verity_why[digest] = check.why
            if check.digest != digest:
                report.corrupt.append((digest, f"digest mismatch: {check.digest}"))
        done += 1
        step("objects", done, total)

    def on_matched(indices: list[int], why: str | None, unknown: int) -> None:
        # Files that are what their name says: what on_result does for them, per group.
        nonlocal done
        report.bytes_checked += unknown
        if why is None:
            report.verity_measured += len(indices)
        elif lacks_verity(policy, why):
            for index in indices:
                digest = _payload_hex(payloads[index])
                report.no_verity.append(digest)
                report.no_verity_why[digest] = why
        done += len(indices)
        step("objects", done, total)

    if checking is not None:
        checking.deliver = _deliverer(on_result, on_matched)
        try:
            checking.finish()
        finally:
            checking.abort()
    else:
        if files is None:
            objects = _objects_prefix(repo, algorithm)
            files = [(b"%s/%s" % (objects, payload), size) for payload, size in sizes.items()]
        check_files(files, algorithm, on_result, on_matched, workers=workers)
    step("objects", done, total, force=True)
    report.missing.sort()
    report.corrupt.sort()
    report.no_verity.sort()
