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

import contextlib
import errno
import os
import queue
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from composefsd import workerproc
from composefsd.fsverity import digest_bytes, digest_fd
from composefsd.image.reader import ImageFormatError, read_image
from composefsd.image.tree import S_IFMT, Node
from composefsd.kernel.verity import (
    Algorithm,
    VerityError,
    VerityNotEnabledError,
    VerityUnsupportedError,
    measure_verity,
)
from composefsd.objectlayout import is_hex, is_hex_digest, object_link_digest, object_relpath
from composefsd.repository.meta import VerityPolicy
from composefsd.repository.progress import ProgressCallback, Throttle
from composefsd.repository.store import NotRegularObjectError, open_object, open_objects_dir
from composefsd.repository.streams import (
    StreamNotFoundError,
    iter_stream_refs,
    iter_streams,
    stream_entry,
)
from composefsd.splitstream import SplitStreamError, read_refs

if TYPE_CHECKING:
    from composefsd.repository.repo import Repository

__all__ = [
    "NOT_REGULAR",
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

#: Objects are opened without following a final symlink (an object must be a regular
#: file) and without blocking (a FIFO planted under objects/ must not hang us).
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_DIR_NOFOLLOW = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Work is measured in bytes to hash, each file counting this much more for opening
# it (measured: ~30 us per file, about what hashing 32 KiB costs).
_FILE_COST_BYTES = 32 << 10
# Below this much work (~0.25 s of hashing), worker processes cost more to start than
# they save: each one imports the package, ~0.15 s.
_PROCESS_MIN_COST = 256 << 20
# A work unit handed to a worker (a file larger than this goes alone).
_BATCH_COST = 32 << 20


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

#: ``FileCheck.error`` for something that is not a regular file.
NOT_REGULAR = -1


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


_Wire = tuple[int | None, int, str | None, bool, str | None]


def _measure(fd: int, algorithm: Algorithm) -> tuple[bytes | None, str | None]:
    """The kernel's digest, or None and why not (see ``FileCheck.why``)."""
    try:
        return measure_verity(fd, algorithm), None
    except VerityNotEnabledError:
        return None, "not-enabled"
    except VerityUnsupportedError:
        return None, "unsupported"
    except VerityError as exc:
        return None, str(exc)


def _open_no_symlinks(path: bytes) -> int:
    """``path`` (``objects/XX/rest``) opened with neither its last component nor its
    directory (``XX``) a symlink: a planted ``objects/XX`` link cannot lead out."""
    head, tail = os.path.split(path)
    dir_fd = os.open(head or b".", _DIR_NOFOLLOW)
    try:
        return os.open(tail, OPEN_FLAGS, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


class _Checker:
    """Checks many files in a row, sparing the per-file work that repeats: the
    directory (``XX``) is opened once (with the same no-symlink rule as
    :func:`_open_no_symlinks`) and kept open, and once the kernel says a filesystem
    cannot do fs-verity at all, its other files are not asked again (that answer is
    per filesystem; their content is hashed in userspace as before, so nothing
    goes unchecked). Use as a context manager: it closes the directories."""

    __slots__ = ("_algorithm", "_dirs", "_unsupported")

    #: Directories kept open at most (an image's objects use at most 256).
    MAX_DIRS = 1024

    def __init__(self, algorithm: Algorithm) -> None:
        self._algorithm = algorithm
        self._dirs: dict[bytes, int] = {}
        self._unsupported: set[int] = set()

    def __enter__(self) -> _Checker:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_dirs()

    def _close_dirs(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _open(self, path: bytes) -> int:
        head, tail = os.path.split(path)
        head = head or b"."
        dir_fd = self._dirs.get(head)
        if dir_fd is None:
            if len(self._dirs) >= self.MAX_DIRS:
                self._close_dirs()
            dir_fd = os.open(head, _DIR_NOFOLLOW)
            self._dirs[head] = dir_fd
        return os.open(tail, OPEN_FLAGS, dir_fd=dir_fd)

    def check(self, path: bytes, expected_size: int) -> _Wire:
        algorithm = self._algorithm
        try:
            fd = self._open(path)
        except OSError as exc:
            return exc.errno or errno.EIO, 0, None, False, None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return NOT_REGULAR, 0, None, False, None
            if 0 <= expected_size != st.st_size:
                return None, st.st_size, None, False, None
            if st.st_dev in self._unsupported:
                why: str | None = "unsupported"
            else:
                measured, why = _measure(fd, algorithm)
                if measured is not None:
                    return None, st.st_size, measured.hex(), True, None
                if why == "unsupported":
                    self._unsupported.add(st.st_dev)
            digest = digest_fd(fd, algorithm, threads=1, regular_size=st.st_size)
            return None, st.st_size, digest.hex(), False, why
        except OSError as exc:
            return exc.errno or errno.EIO, 0, None, False, None
        finally:
            os.close(fd)


def _check(path: bytes, algorithm: Algorithm, expected_size: int) -> _Wire:
    with _Checker(algorithm) as checker:
        return checker.check(path, expected_size)


def check_file(path: bytes, algorithm: Algorithm, expected_size: int = -1) -> FileCheck:
    """Open ``path`` (no symlink as it or its directory, no blocking), check it is a regular file of
    ``expected_size`` bytes (any size if negative), and work out its digest: measured
    by the kernel if the file has fs-verity, computed otherwise. Never raises OSError."""
    return FileCheck(*_check(path, algorithm, expected_size))


def _check_batch(request: tuple[str, list[tuple[bytes, int]]]) -> list[_Wire]:
    """Check a batch: (algorithm name, [(path, expected size)...]), in a lane or a worker."""
    algorithm, items = request
    with _Checker(Algorithm.parse(algorithm)) as checker:
        return [checker.check(path, size) for path, size in items]


def _worker_main() -> None:
    """A checking worker process: batches on stdin, answers on stdout, until EOF."""
    workerproc.serve(_check_batch)


def _start_worker() -> subprocess.Popen[bytes]:
    return workerproc.start("composefsd.repository.verify", "_worker_main")


_Batch = list[tuple[int, bytes, int]]
_LaneItem = tuple[list[int], list[_Wire]] | BaseException | None


def default_workers() -> int:
    """Checking processes by default: one per CPU this process may run on."""
    return workerproc.cpus()


def check_files(
    files: Sequence[tuple[bytes, int]],
    algorithm: Algorithm,
    on_result: Callable[[int, FileCheck], None],
    *,
    workers: int | None = None,
) -> None:
    """:func:`check_file` for every (path, expected size) of ``files``, in parallel.

    ``on_result(index, check)`` is called in the calling thread once per file, in no
    particular order. Worker processes are used when ``workers`` > 1 and the work
    is large enough for them to pay off (userspace hashing holds the GIL for most
    of its time, so threads would not add up). Files are handed out largest first,
    so that one big file does not finish alone at the end.
    """
    n = default_workers() if workers is None else max(1, workers)
    total = sum(max(size, 0) for _, size in files)
    cost = total + len(files) * _FILE_COST_BYTES
    if n == 1 or len(files) < 2 or cost < _PROCESS_MIN_COST:
        with _Checker(algorithm) as checker:
            for i, (path, size) in enumerate(files):
                on_result(i, FileCheck(*checker.check(path, size)))
        return
    out: queue.SimpleQueue[_LaneItem] = queue.SimpleQueue()
    alg = algorithm.value

    def done(batch: _Batch, results: list[_Wire]) -> None:
        # A batch's results go over as one item: one hand-off between threads per
        # batch rather than per file.
        if len(batch) != len(results):
            raise ValueError(f"{len(results)} results for a batch of {len(batch)} files")
        out.put(([index for index, _, _ in batch], results))

    # If a worker cannot be started or dies, its lane checks in-process from then on.
    lanes: workerproc.Pool[_Batch, tuple[str, list[tuple[bytes, int]]], _Wire]
    lanes = workerproc.Pool(
        "cfs-check",
        min(n, len(files)),
        request=lambda batch: (alg, [(path, size) for _, path, size in batch]),
        local=lambda: contextlib.nullcontext(_check_batch),
        done=done,
        fail=out.put,
        finished=lambda: out.put(None),
        start=_start_worker,
        exact=True,
        note="checking",
    )
    lanes.processes = True
    order = sorted(range(len(files)), key=lambda i: files[i][1], reverse=True)
    batch: _Batch = []
    batch_cost = 0
    for i in order:
        path, size = files[i]
        batch.append((i, path, size))
        batch_cost += max(size, 0) + _FILE_COST_BYTES
        if batch_cost >= _BATCH_COST:
            lanes.put(batch)
            batch, batch_cost = [], 0
    if batch:
        lanes.put(batch)
    lanes.close()
    lanes.start()
    error: BaseException | None = None
    running = len(lanes.lanes)
    try:
        while running:
            item = out.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                error = error or item
            elif error is None:
                for index, wire in zip(*item, strict=True):
                    on_result(index, FileCheck(*wire))
    finally:
        if running:
            # Leaving early (the callback raised, or ^C): stop the workers now.
            lanes.abort()
    if error is not None:
        raise error


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


def _payload_digest(payload: bytes, algorithm: Algorithm) -> str | None:
    """The object digest named by a payload ``XX/rest``, or None if it names none."""
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        return None
    if len(text) != 2 * algorithm.digest_size + 1 or text[2] != "/":
        return None
    digest = text[:2] + text[3:]
    return digest if is_hex_digest(digest, algorithm) else None


def referenced_objects(
    root: Node, algorithm: Algorithm, problems: list[str] | None = None
) -> dict[str, int]:
    """Object digest -> size for every regular file of the tree backed by an object.

    Payloads that are not object paths for ``algorithm``, and objects recorded with
    two different sizes, are reported into ``problems`` (once each).
    """
    sizes: dict[str, int] = {}
    bad: set[bytes] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node.children:
            stack.extend(node.children.values())
        # Hardlink entries read from an image have mode 0 and are skipped, like C's
        # `composefs-info objects`: their target is visited as an inode of its own.
        if node.mode & S_IFMT != stat.S_IFREG or node.payload is None or node.content:
            continue
        digest = _payload_digest(node.payload, algorithm)
        if digest is None:
            if node.payload not in bad and problems is not None:
                bad.add(node.payload)
                problems.append(
                    f"file payload {node.payload!r} is not an object path "
                    f"(XX/rest, {algorithm.value})"
                )
            continue
        old = sizes.setdefault(digest, node.size)
        if old != node.size and problems is not None:
            problems.append(f"object {digest} is recorded with sizes {old} and {node.size}")
    return sizes


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
) -> VerifyReport:
    """Check the image ``digest`` (lowercase hex) of ``repo`` and all its objects.

    Never raises for what it finds: everything wrong goes into the report.
    Progress: phase ``"image"`` (0 of 1, then 1 of 1), then ``"objects"`` with the
    number of objects checked so far out of the image's distinct objects.
    ``workers`` caps the hashing processes (default: one per CPU).
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
    step("image", 0, 1, force=True)
    data = _check_image_file(repo, digest, algorithm, report)
    step("image", 1, 1, force=True)
    if data is None:
        return report
    try:
        image = read_image(data, c_quirks=False)
    except (ImageFormatError, OSError, ValueError) as exc:
        # ImageFormatError is the reader's verdict; anything else it raises on a
        # damaged image is a verdict too, not a reason to stop verifying.
        report.image_problems.append(f"not a valid composefs image: {exc}")
        return report
    del data
    sizes = referenced_objects(image.root, algorithm, report.image_problems)
    del image
    _check_objects(repo, algorithm, sizes, report, progress, workers)
    return report


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
    try:
        refs = read_refs(data, algorithm.digest_size)
    except SplitStreamError as exc:
        report.image_problems.append(f"not a valid splitstream: {exc}")
        return report
    sizes = dict.fromkeys(refs.object_refs, -1)
    sizes.update((digest, -1) for _name, digest in refs.named_refs)
    _check_objects(repo, algorithm, sizes, report, progress, workers)
    return report


def stream_names(repo: Repository) -> list[str]:
    """The names under which a check of everything verifies streams: every entry of
    ``streams/`` (sorted), then ``refs/<name>`` for every link under
    ``streams/refs`` that names no stream (:func:`verify_stream` reports it)."""
    names = [link.content_id for link in iter_streams(repo)]
    names += [f"refs/{ref.name}" for ref in iter_stream_refs(repo) if ref.content_id is None]
    return names


def stream_entry_path(repo: RepositoryView, name: str) -> Path:
    """Where the stream ``name`` of :func:`stream_names` lives (its link)."""
    streams = repo.path / "streams"
    return streams / "refs" / name[5:] if name.startswith("refs/") else streams / name


def _stream_entry(streams: Path, name: str) -> str | None:
    """The existing ``streams/`` entry ``name`` names (:func:`stream_entry`), or None."""
    try:
        entry = stream_entry(streams, name)
    except StreamNotFoundError:
        return None
    return entry if os.path.lexists(streams / entry) else None


def _check_objects(
    repo: RepositoryView,
    algorithm: Algorithm,
    sizes: dict[str, int],
    report: VerifyReport,
    progress: ProgressCallback | None,
    workers: int | None,
) -> None:
    digests = sorted(sizes)
    report.objects_checked = len(digests)
    # A negative size is unknown (stream references): any size is right, and the
    # bytes checked are what the files hold.
    report.bytes_checked = sum(max(size, 0) for size in sizes.values())
    total = len(digests)
    step = Throttle(progress)
    step("objects", 0, total, force=True)
    done = 0
    policy = repo.verity

    def on_result(index: int, check: FileCheck) -> None:
        nonlocal done
        digest = digests[index]
        expected = sizes[digest]
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

    # Paths built by hand: pathlib cost ~5 us per object. object_path still checks
    # each name (its error, as before) and gives the objects directory.
    for d in digests:
        if not is_hex(d):
            repo.object_path(d)
    objects = os.fsencode(repo.object_path(digests[0]).parent.parent) if digests else b""
    files = [(b"%s/%s/%s" % (objects, d[:2].encode(), d[2:].encode()), sizes[d]) for d in digests]
    check_files(files, algorithm, on_result, workers=workers)
    step("objects", done, total, force=True)
    report.missing.sort()
    report.corrupt.sort()
    report.no_verity.sort()
