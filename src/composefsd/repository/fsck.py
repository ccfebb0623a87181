"""Check a whole repository: meta.json, every object, every stream, every image link
and every ref.

:func:`fsck` runs in six phases, each reported through the progress callback (the
two stream phases only where composefs-rs made ``streams/``):

1. ``metadata``: ``meta.json`` parses and its algorithm is the repository's.
2. ``objects``: every directory under ``objects/`` is named ``XX`` (two hex
   digits); every file in it is a regular file named by the rest of a digest of
   the repository's algorithm, opens, and has that fs-verity digest (measured by
   the kernel where the file has verity, computed otherwise, in worker processes
   for large amounts, see :func:`~composefsd.repository.verify.check_files`).
3. ``streams`` (composefs-rs's splitstreams, as its fsck checks them): every
   ``streams/<name>`` is a symlink that resolves to an object of the repository,
   the splitstream's header and reference sections parse
   (:func:`composefsd.splitstream.read_refs`), and every object it references and
   every object a named ref names exists.
4. ``stream-refs``: every link under ``streams/refs/`` resolves.
5. ``images``: every ``images/<hex>`` is a symlink to ``objects/XX/rest`` for the
   same digest, and the image parses, and every object it refers to exists.
6. ``refs``: every link under ``images/refs/`` leads to an ``images/<hex>``.

Problems carry composefs-rs's kebab-case kinds (``object-invalid-name``,
``object-open-failed``, ``object-digest-mismatch``, ``object-verity-failed``,
``object-verity-missing``, ``entry-not-symlink``, ``broken-symlink``,
``stat-failed``, ``unexpected-file-type``, ``image-open-failed``,
``image-read-failed``, ``image-invalid``, ``image-missing-object``,
``stream-open-failed`` (the stream cannot be opened or its splitstream does not
parse: a truncated or garbled one), ``stream-read-failed`` (reading it failed),
``missing-object-ref``, ``missing-named-ref``, ``metadata-parse-failed``,
``metadata-algorithm-mismatch``), plus one of ours:

* ``stray-temp-file``: a named temporary file (``.tmp*`` under ``objects/``, as
  C mkcomposefs and the named-file fallback of object publishing leave behind when
  killed, or ``.tmp*``/``.symlink-*`` under ``images/``). It is garbage, not
  corruption: nothing refers to it and no reader can mistake it for an object.
  It is reported but does not make the repository unclean (``fatal`` is False).
  fsck does not remove it: fsck runs beside writers (it only excludes GC), and a
  writer may be filling that very file; removing such files is GC's business,
  which runs alone.

Objects lacking fs-verity follow the policy rules of
:mod:`composefsd.repository.verify`: under ``required`` each one is a fatal
``object-verity-missing``; under ``try`` one on a filesystem that supports
fs-verity is a non-fatal ``object-verity-missing``; under ``disabled`` nothing.

An ``images/<hex>`` or ``streams/<name>`` link whose target is not exactly
``../objects/XX/rest`` (:func:`~composefsd.objectlayout.object_link_digest`) is
reported (``image-invalid``, ``stream-open-failed``) and not followed; the objects
of the others are opened below ``objects/`` by their digest, never through the
link: fsck never reads files outside the repository through a planted link.
Other unknown top-level entries (lock files) are not looked at. Paths in problems
are relative to the repository.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composefsd.image.reader import ImageFormatError, read_image
from composefsd.kernel.verity import Algorithm
from composefsd.objectlayout import (
    C_TMP_PREFIX,
    is_hex_digest,
    is_object_dir_name,
    is_object_rest,
    is_temp_name,
    object_link_digest,
)
from composefsd.repository.errors import RepositoryError, os_error_text
from composefsd.repository.images import SYMLINK_TMP_PREFIX
from composefsd.repository.meta import RepoMetadata, VerityPolicy
from composefsd.repository.progress import ProgressCallback, Throttle
from composefsd.repository.store import NotRegularObjectError, open_object, open_objects_dir
from composefsd.repository.verify import (
    FileCheck,
    RepositoryView,
    check_files,
    lacks_verity,
    referenced_objects,
    verity_text,
)
from composefsd.splitstream import SplitStreamError, read_refs

__all__ = ["NON_FATAL_KINDS", "FsckProblem", "FsckReport", "fsck"]

log = logging.getLogger(__name__)

#: Kinds that never make a report fail on their own.
NON_FATAL_KINDS = frozenset({"stray-temp-file"})
# Named temporaries next to the links: ours (SYMLINK_TMP_PREFIX) and C's.
_LINK_TEMP_PREFIXES = (SYMLINK_TMP_PREFIX, C_TMP_PREFIX)


@dataclass(slots=True, frozen=True)
class FsckProblem:
    """One finding: ``kind`` (kebab-case), ``path`` relative to the repository."""

    kind: str
    path: str
    message: str
    #: False for findings that are worth knowing but are not damage.
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.message}"


@dataclass(slots=True)
class FsckReport:
    problems: list[FsckProblem] = field(default_factory=list)
    objects_checked: int = 0
    #: How many object digests the kernel measured; the rest were computed.
    verity_measured: int = 0
    images_checked: int = 0
    refs_checked: int = 0
    #: Entries of ``streams/`` and links under ``streams/refs`` looked at.
    streams_checked: int = 0
    stream_refs_checked: int = 0

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    def add(self, kind: str, path: str, message: str, *, fatal: bool = True) -> None:
        self.problems.append(FsckProblem(kind, path, message, fatal))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": [
                {"kind": p.kind, "path": p.path, "message": p.message, "fatal": p.fatal}
                for p in self.problems
            ],
            "objects_checked": self.objects_checked,
            "verity_measured": self.verity_measured,
            "images_checked": self.images_checked,
            "refs_checked": self.refs_checked,
            "streams_checked": self.streams_checked,
            "stream_refs_checked": self.stream_refs_checked,
        }


def fsck(
    repo: RepositoryView,
    *,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    metadata_only: bool = False,
) -> FsckReport:
    """Check ``repo``; never raises for what it finds, everything goes into the report.

    ``workers`` caps the hashing processes (default: one per CPU).
    ``metadata_only`` skips the objects phase (composefs-rs's
    ``fsck_metadata_only``): no object is listed or hashed, ``objects_checked`` is 0,
    and the other phases look each object they need up on its own.
    """
    checker = _Checker(repo, progress)
    checker.check_meta()
    present = set() if metadata_only else checker.check_objects(workers)
    checker.check_streams(present)
    checker.check_stream_refs()
    checker.check_images(present)
    checker.check_refs()
    return checker.report


class _Checker:
    def __init__(self, repo: RepositoryView, progress: ProgressCallback | None) -> None:
        self.repo = repo
        self.root = Path(os.path.abspath(repo.path))
        self.algorithm = Algorithm.parse(repo.hash_name)
        self.step = Throttle(progress)
        self.report = FsckReport()

    def rel(self, path: Path | str) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    # -- meta.json --------------------------------------------------------------------
    def check_meta(self) -> None:
        self.step("metadata", 0, 1, force=True)
        problem = _meta_problem(self.root / "meta.json", self.repo.algorithm)
        if problem is not None:
            self.report.add(problem[0], "meta.json", problem[1])
        self.step("metadata", 1, 1, force=True)

    # -- objects ----------------------------------------------------------------------
    def _list_objects(self) -> list[tuple[str, bytes, int]]:
        """(digest, path, size) of every well-named regular file; reports the rest."""
        objects_dir = self.root / "objects"
        found: list[tuple[str, bytes, int]] = []
        try:
            top = sorted(os.scandir(objects_dir), key=lambda e: e.name)
        except OSError as exc:
            self.report.add("stat-failed", "objects", f"cannot list: {exc.strerror}")
            return found
        rest_len = 2 * self.algorithm.digest_size - 2
        for entry in top:
            rel = f"objects/{entry.name}"
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as exc:
                self.report.add("stat-failed", rel, exc.strerror or str(exc))
                continue
            if not is_dir:
                if is_temp_name(entry.name):
                    self.report.add("stray-temp-file", rel, "leftover temporary file", fatal=False)
                else:
                    self.report.add(
                        "unexpected-file-type", rel, "only XX directories belong in objects/"
                    )
                continue
            if not is_object_dir_name(entry.name):
                self.report.add("object-invalid-name", rel, "not a two-hex-digit directory")
                continue
            try:
                inner = sorted(os.scandir(entry.path), key=lambda e: e.name)
            except OSError as exc:
                self.report.add("stat-failed", rel, f"cannot list: {exc.strerror}")
                continue
            for obj in inner:
                orel = f"{rel}/{obj.name}"
                if not is_object_rest(obj.name, self.algorithm):
                    self.report.add(
                        "object-invalid-name",
                        orel,
                        f"not the rest of a {self.algorithm.value} digest "
                        f"({rest_len} lowercase hex digits)",
                    )
                    continue
                try:
                    st = obj.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self.report.add("stat-failed", orel, exc.strerror or str(exc))
                    continue
                if not stat.S_ISREG(st.st_mode):
                    self.report.add(
                        "unexpected-file-type", orel, "an object must be a regular file"
                    )
                    continue
                found.append((entry.name + obj.name, os.fsencode(obj.path), st.st_size))
        return found

    def check_objects(self, workers: int | None) -> set[str]:
        """Check every object; return the digests of those present (good or not)."""
        listed = self._list_objects()
        report = self.report
        policy = self.repo.verity
        step = self.step
        total = len(listed)
        step("objects", 0, total, force=True)
        present: set[str] = set()
        done = 0

        def on_result(index: int, check: FileCheck) -> None:
            nonlocal done
            digest, path, _ = listed[index]
            rel = self.rel(os.fsdecode(path))
            done += 1
            step("objects", done, total)
            if check.error == errno.ENOENT:
                # Gone since the listing. Only GC removes objects and it excludes fsck,
                # so someone else did; there is nothing left to check.
                return
            present.add(digest)
            if check.error is not None:
                report.add("object-open-failed", rel, check.describe_error())
                return
            if check.measured:
                report.verity_measured += 1
                if check.digest != digest:
                    report.add(
                        "object-digest-mismatch", rel, f"measured {check.digest} (fs-verity)"
                    )
                return
            why = check.why
            assert why is not None
            if lacks_verity(policy, why):
                report.add(
                    "object-verity-missing",
                    rel,
                    verity_text(why),
                    fatal=policy is VerityPolicy.REQUIRED,
                )
            elif why not in ("not-enabled", "unsupported"):
                report.add("object-verity-failed", rel, why)
            if check.digest != digest:
                report.add("object-digest-mismatch", rel, f"computed {check.digest}")

        check_files(
            [(path, -1) for _, path, _ in listed], self.algorithm, on_result, workers=workers
        )
        report.objects_checked = len(listed)
        step("objects", done, total, force=True)
        return present

    # -- streams ----------------------------------------------------------------------
    def _object_missing(self, digest: str, present: set[str], rel: str) -> bool:
        """Whether the object ``digest`` does not exist (an lstat problem is reported)."""
        if digest in present:
            return False
        # Objects written after the objects phase listed the store are fine too.
        try:
            os.lstat(self.repo.object_path(digest))
        except FileNotFoundError:
            return True
        except OSError as exc:
            self.report.add("stat-failed", rel, f"object {digest}: {exc.strerror}")
        return False

    def _each_entry(
        self,
        top: str,
        check: Callable[[os.DirEntry[str]], None],
        absent: tuple[type[OSError], ...],
    ) -> int:
        """``check`` every entry of ``top`` (``streams``, ``images``) but ``refs``, by
        name, as the progress phase ``top``; how many. Listing errors in ``absent``
        mean there is nothing to check; others are reported."""
        try:
            entries = sorted(os.scandir(self.root / top), key=lambda e: e.name)
        except absent:
            return 0
        except OSError as exc:
            self.report.add("stat-failed", top, f"cannot list: {exc.strerror}")
            return 0
        entries = [e for e in entries if e.name != "refs"]
        total = len(entries)
        self.step(top, 0, total, force=True)
        for done, entry in enumerate(entries, 1):
            check(entry)
            self.step(top, done, total)
        self.step(top, total, total, force=True)
        return total

    def check_streams(self, present: set[str]) -> None:
        """Check every streams/<name> entry; ``present``: the objects listed before."""
        self.report.streams_checked = self._each_entry(
            "streams",
            lambda entry: self._check_stream(entry, present),
            (FileNotFoundError, NotADirectoryError),
        )

    def _check_stream(self, entry: os.DirEntry[str], present: set[str]) -> None:
        report = self.report
        rel = f"streams/{entry.name}"
        if not entry.is_symlink():
            report.add("entry-not-symlink", rel, "streams/ holds only symlinks to objects")
            return
        try:
            target = os.readlink(entry.path)
        except OSError as exc:
            report.add("stat-failed", rel, exc.strerror or str(exc))
            return
        digest = object_link_digest(target, self.algorithm)
        if digest is None:
            report.add(
                "stream-open-failed",
                rel,
                f"links to {target}: a stream link leading outside objects/ "
                "(not ../objects/XX/rest); not followed",
            )
            return
        data = self._read_linked(rel, target, digest, "stream")
        if data is None:
            return
        try:
            refs = read_refs(data, self.algorithm.digest_size)
        except SplitStreamError as exc:
            report.add("stream-open-failed", rel, f"not a valid splitstream: {exc}")
            return
        for digest in refs.object_refs:
            if self._object_missing(digest, present, rel):
                report.add("missing-object-ref", rel, f"object {digest} does not exist")
        for name, digest in refs.named_refs:
            if self._object_missing(digest, present, rel):
                report.add("missing-named-ref", rel, f"ref {name}: object {digest} does not exist")

    def check_stream_refs(self) -> None:
        """Every link under streams/refs must resolve (composefs-rs: to an object,
        through a streams/<name> entry)."""
        refs_dir = self.root / "streams" / "refs"
        report = self.report
        if not refs_dir.is_dir():
            return
        count = 0
        self.step("stream-refs", 0, force=True)
        for entry, rel in self._ref_entries(refs_dir):
            if entry.is_symlink():
                count += 1
                self.step("stream-refs", count)
                try:
                    os.stat(entry.path)
                except FileNotFoundError:
                    report.add("broken-symlink", rel, f"dangling link to {os.readlink(entry.path)}")
                except OSError as exc:
                    report.add("stat-failed", rel, exc.strerror or str(exc))
            else:
                report.add("unexpected-file-type", rel, "refs are symlinks to streams")
        report.stream_refs_checked = count
        self.step("stream-refs", count, count, force=True)

    def _read_linked(self, rel: str, target: str, digest: str, what: str) -> bytes | None:
        """The content of the object ``digest`` that the ``images/``/``streams/`` link
        ``rel`` (to ``target``) names, opened below ``objects/`` and never through
        the link; None when a problem was reported."""
        report = self.report
        try:
            objects_fd = open_objects_dir(self.root / "objects")
        except OSError as exc:
            report.add("stat-failed", "objects", os_error_text(exc))
            return None
        try:
            fd = open_object(objects_fd, digest)
        except FileNotFoundError:
            report.add("broken-symlink", rel, f"dangling link to {target}")
            return None
        except NotRegularObjectError:
            report.add(f"{what}-open-failed", rel, f"{target} is not a regular file")
            return None
        except OSError as exc:
            report.add(f"{what}-open-failed", rel, os_error_text(exc))
            return None
        finally:
            os.close(objects_fd)
        try:
            return _read_all(fd)
        except OSError as exc:
            report.add(f"{what}-read-failed", rel, os_error_text(exc))
            return None
        finally:
            os.close(fd)

    # -- images -----------------------------------------------------------------------
    def check_images(self, present: set[str]) -> None:
        """Check every images/<hex> entry; ``present``: the objects listed before."""
        self.report.images_checked = self._each_entry(
            "images", lambda entry: self._check_image(entry, present), (FileNotFoundError,)
        )

    def _check_image(self, entry: os.DirEntry[str], present: set[str]) -> None:
        report = self.report
        rel = f"images/{entry.name}"
        name = entry.name
        if name.startswith(_LINK_TEMP_PREFIXES):
            report.add("stray-temp-file", rel, "leftover temporary file", fatal=False)
            return
        if not entry.is_symlink():
            report.add("entry-not-symlink", rel, "images/ holds only symlinks to objects")
            return
        if not is_hex_digest(name, self.algorithm):
            report.add("image-invalid", rel, f"name is not a {self.algorithm.value} digest")
            return
        target = os.readlink(entry.path)
        if object_link_digest(target, self.algorithm) != name:
            report.add("image-invalid", rel, f"links to {target}, not to its object; not followed")
            return
        data = self._read_linked(rel, target, name, "image")
        if data is None:
            return
        try:
            image = read_image(data, c_quirks=False)
        except (ImageFormatError, OSError, ValueError) as exc:
            report.add("image-invalid", rel, f"not a valid composefs image: {exc}")
            return
        problems: list[str] = []
        sizes = referenced_objects(image.root, self.algorithm, problems)
        for text in problems:
            report.add("image-invalid", rel, text)
        for digest in sorted(sizes):
            if digest in present:
                continue
            # Objects written after the objects phase listed the store are fine too.
            try:
                os.lstat(self.repo.object_path(digest))
            except FileNotFoundError:
                report.add("image-missing-object", rel, f"object {digest} does not exist")
            except OSError as exc:
                report.add("stat-failed", rel, f"object {digest}: {exc.strerror}")

    # -- refs -------------------------------------------------------------------------
    def _ref_entries(self, refs_dir: Path) -> Iterator[tuple[os.DirEntry[str], str]]:
        """Every entry below ``refs_dir`` but its directories, with its name in the
        repository, a directory at a time in name order; a directory that cannot be
        listed is reported (one that is gone, or is no directory, is skipped)."""
        stack = [refs_dir]
        while stack:
            directory = stack.pop()
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                self.report.add("stat-failed", self.rel(directory), f"cannot list: {exc.strerror}")
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    yield entry, self.rel(entry.path)

    def check_refs(self) -> None:
        refs_dir = self.root / "images" / "refs"
        report = self.report
        self.step("refs", 0, force=True)
        count = 0
        for entry, rel in self._ref_entries(refs_dir):
            if entry.name.startswith(_LINK_TEMP_PREFIXES):
                report.add("stray-temp-file", rel, "leftover temporary link", fatal=False)
            elif entry.is_symlink():
                count += 1
                self.step("refs", count)
                self._check_ref(Path(entry.path), rel)
            else:
                report.add("entry-not-symlink", rel, "refs are symlinks to images")
        report.refs_checked = count
        self.step("refs", count, count, force=True)

    def _check_ref(self, path: Path, rel: str) -> None:
        target = os.readlink(path)
        # The link must name an images/<hex> entry (which then leads to the object).
        first = Path(os.path.normpath(path.parent / target))
        if first.parent != self.root / "images" or not is_hex_digest(first.name, self.algorithm):
            self.report.add(
                "broken-symlink", rel, f"links to {target}, which is not an images/<digest> entry"
            )
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self.report.add("broken-symlink", rel, f"dangling link to {target}")
            return
        except OSError as exc:
            self.report.add("broken-symlink", rel, f"cannot resolve {target}: {exc.strerror}")
            return
        if not stat.S_ISREG(st.st_mode):
            self.report.add("broken-symlink", rel, f"{target} is not an image file")


def _read_all(fd: int) -> bytes:
    parts: list[bytes] = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def _meta_problem(path: Path, algorithm: str) -> tuple[str, str] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "metadata-parse-failed", "meta.json is missing"
    except OSError as exc:
        return "metadata-parse-failed", f"cannot read: {os_error_text(exc)}"
    try:
        meta = RepoMetadata.from_json(data)
    except RepositoryError as exc:
        return "metadata-parse-failed", str(exc)
    if meta.algorithm_name != algorithm:
        return (
            "metadata-algorithm-mismatch",
            f"algorithm {meta.algorithm_name}, but the repository was opened as {algorithm}",
        )
    return None
