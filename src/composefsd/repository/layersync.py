"""Layers out of and into a repository as splitdirfdstreams
(:mod:`composefsd.image.splitdirfd`): composefs-rs's layer sync, what
``org.composefs.Oci.GetLayer`` and ``PutLayer`` move.

:func:`produce` writes a stored layer stream as a splitdirfdstream: its inline
bytes as Metadata chunks, each object as a FileBackedData chunk naming
``XX/rest`` beneath the objects directory (the directory slot the caller says),
with the object's size. Given the same slot, the bytes are cfsctl's: consecutive
inline pieces become one Metadata chunk as composefs-rs's one inline chunk does,
except that a run longer than :data:`METADATA_RUN` is cut into several (cfsctl
buffers a whole run, up to 256 MiB; nobody is the wiser, the rebuilt bytes are
the same).

:func:`drain` reads a splitdirfdstream from a peer and stores the layer it
rebuilds as ``streams/oci-layer-<diff_id>`` as composefs-rs's verified drain does:
inline bytes and files of at most 64 bytes inline, larger files as objects,
while the sha256 of every rebuilt byte is taken; the stream is linked only if that
is ``diff_id`` (else :class:`DiffIdMismatchError`; objects already stored stay
for GC, as for every failed write). Whatever the peer sends is checked before it
counts:

* a FileBackedData name is opened beneath its directory slot one component at a
  time without following symlinks (:class:`~composefsd.sources.beneath.BeneathOpener`),
  must be a regular file of exactly the declared length, and is hashed by us; the
  object is stored under the digest we computed, never under the name it came by,
  and what enters the store is hashed again (a reflink) or as it is copied
  (:meth:`~composefsd.repository.store.ObjectStore.import_verified`); where it is
  sure to be copied (no reflinks from that filesystem, no link allowed) and its
  name does not point at an object we have, it is copied as it is hashed, in one
  read (the name is a hint, never trusted);
* a hard link shares the peer's inode, so it is made only where ``link_ok`` (the
  caller's rule on owner and mode) accepts the file's ``stat``;
* the inline bytes a stream may add to the layer stream, which is built in
  memory, are bounded (:data:`MAX_INLINE_TOTAL`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from composefsd.fsverity import FsVerityHasher
from composefsd.image.ocitar import INLINE_MAX
from composefsd.image.splitdirfd import (
    FileBacked,
    InlineData,
    Readable,
    SplitdirfdError,
    StreamReader,
    StreamWriter,
    Writable,
)
from composefsd.objectlayout import is_hex, object_relpath
from composefsd.repository.errors import RepositoryError, SourceError, os_error_text
from composefsd.repository.locking import writer_lock
from composefsd.repository.ocilayer import layer_content_id
from composefsd.repository.store import StoreMethod
from composefsd.repository.streams import use_chunks, write_stream
from composefsd.sources.beneath import BeneathOpener
from composefsd.splitstream import CONTENT_TYPE_OCI_LAYER, Chunk, SplitStreamWriter

if TYPE_CHECKING:
    from composefsd.repository.repo import Repository
    from composefsd.repository.store import ObjectStore
    from composefsd.splitstream import SplitStream

__all__ = [
    "MAX_INLINE_TOTAL",
    "METADATA_RUN",
    "DiffIdMismatchError",
    "DrainStats",
    "LayerSourceError",
    "drain",
    "produce",
]

log = logging.getLogger(__name__)

#: The longest Metadata chunk :func:`produce` writes (module notes).
METADATA_RUN = 4 << 20
#: The most inline bytes one drained layer may have (headers, padding, small files).
MAX_INLINE_TOTAL = 1 << 30
_READ = 1 << 20


class DiffIdMismatchError(RepositoryError):
    """The rebuilt layer's sha256 is not the diff_id it came with; nothing was linked."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"the layer's content is {actual}, not its diff_id {expected}")
        self.expected = expected
        self.actual = actual


class LayerSourceError(RepositoryError):
    """The stream, or a file it names, is unusable; the message says which and why."""


@dataclass(slots=True)
class DrainStats:
    """How the objects of a drained layer were stored (cfsctl's counters)."""

    reflinked: int = 0
    hardlinked: int = 0
    copied: int = 0
    already_present: int = 0
    inline_bytes: int = 0

    def count(self, method: str) -> None:
        if method == StoreMethod.REFLINKED:
            self.reflinked += 1
        elif method == StoreMethod.HARDLINKED:
            self.hardlinked += 1
        elif method == StoreMethod.COPIED:
            self.copied += 1
        else:
            self.already_present += 1


# -- producing -------------------------------------------------------------------------------


def produce(
    store: ObjectStore,
    layer_verity: str,
    objects_slot: int,
    out: Writable,
    *,
    check: Callable[[], None] | None = None,
) -> None:
    """Write the layer stream stored as object ``layer_verity`` to ``out`` as a
    splitdirfdstream whose objects are named beneath directory slot
    ``objects_slot`` (module notes). ``check`` runs before each chunk (a
    cancellation check); what ``out`` raises (a reader gone) passes through."""
    writer = StreamWriter(out)

    def use(_parsed: SplitStream, chunks: Iterator[Chunk]) -> None:
        run: list[bytes] = []
        size = 0
        for chunk in chunks:
            if check is not None:
                check()
            if isinstance(chunk, bytes):
                if size + len(chunk) > METADATA_RUN and run:
                    writer.metadata(b"".join(run))
                    run.clear()
                    size = 0
                run.append(chunk)
                size += len(chunk)
                continue
            if run:
                writer.metadata(b"".join(run))
                run.clear()
                size = 0
            writer.file_backed(objects_slot, _object_size(store, chunk.digest),
                               object_relpath(chunk.digest).encode())  # fmt: skip
        if run:
            writer.metadata(b"".join(run))

    use_chunks(store, layer_verity, use)


def _object_size(store: ObjectStore, digest: str) -> int:
    try:
        fd = store.open(digest)
    except OSError as exc:
        raise RepositoryError(
            f"cannot open object {digest}: {os_error_text(exc)}", errno=exc.errno
        ) from exc
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


# -- draining --------------------------------------------------------------------------------


class _Drain:
    """One drain's state: the slots, their openers, the hashes, the writer."""

    def __init__(
        self,
        store: ObjectStore,
        dirs: Sequence[int],
        link_ok: Callable[[os.stat_result], bool] | None,
        zerocopy: bool,
        writer: SplitStreamWriter,
    ) -> None:
        self.store = store
        self.dirs = dirs
        self.link_ok = link_ok
        self.zerocopy = zerocopy
        self.writer = writer
        self.openers: dict[int, BeneathOpener] = {}
        self.sha = hashlib.sha256()
        self.stats = DrainStats()
        self.written: list[str] = []

    def close(self) -> None:
        for opener in self.openers.values():
            opener.close()

    def inline(self, data: bytes) -> None:
        self.stats.inline_bytes += len(data)
        if self.stats.inline_bytes > MAX_INLINE_TOTAL:
            raise LayerSourceError(
                f"the stream has more than {MAX_INLINE_TOTAL} bytes to keep inline"
            )
        self.sha.update(data)
        self.writer.write_inline(data)

    def opener(self, index: int) -> BeneathOpener:
        opener = self.openers.get(index)
        if opener is None:
            fd = self.dirs[index]
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise LayerSourceError(f"directory slot {index} is not a directory")
            opener = self.openers[index] = BeneathOpener(fd, f"<dir {index}>".encode())
        return opener

    def file(self, chunk: FileBacked) -> None:
        name = chunk.filename
        try:
            fd = self.opener(chunk.index).open(name)
        except OSError as exc:
            raise LayerSourceError(
                f"cannot open {name[:200]!r} in directory slot {chunk.index}: {exc}",
                errno=exc.errno if exc.errno is not None else errno.EIO,
            ) from exc
        try:
            st = os.fstat(fd)
            if st.st_size != chunk.length:
                raise LayerSourceError(
                    f"{name[:200]!r} in directory slot {chunk.index} is {st.st_size} bytes, "
                    f"the stream says {chunk.length}"
                )
            if chunk.length <= INLINE_MAX:
                data = os.pread(fd, chunk.length, 0)
                if len(data) != chunk.length:
                    raise LayerSourceError(f"{name[:200]!r} became shorter while read")
                self.inline(data)
                return
            link = self.link_ok is not None and self.link_ok(st)
            hint = self._hint(name)
            if self.store.must_copy(st, link) and (hint is None or not self.store.contains(hint)):
                # A new object that will be copied anyway: copy it as it is hashed,
                # one read instead of two (what is stored is what was hashed).
                result = self.store.store_chunks(self._pieces(fd, chunk.length, name))
                method = StoreMethod.COPIED if result.written else StoreMethod.PRESENT
                self._stored(result.digest, result.written, method, chunk.length, name)
                return
            verity = FsVerityHasher(self.store.algorithm)
            for piece in self._pieces(fd, chunk.length, name):
                verity.update(piece)
            try:
                result, method = self.store.import_verified(
                    fd, verity.digest(), chunk.length, link=link
                )
            except SourceError as exc:
                raise LayerSourceError(f"{name[:200]!r}: {exc}") from exc
            self._stored(result.digest, result.written, method, chunk.length, name)
        finally:
            os.close(fd)

    def _pieces(self, fd: int, length: int, name: bytes) -> Iterator[bytes]:
        """The first ``length`` bytes of the file, read in pieces into the layer's hash."""
        offset = 0
        while offset < length:
            piece = os.pread(fd, min(_READ, length - offset), offset)
            if not piece:
                raise LayerSourceError(f"{name[:200]!r} became shorter while read")
            self.sha.update(piece)
            offset += len(piece)
            yield piece

    def _hint(self, name: bytes) -> str | None:
        """The digest a name of the objects' layout (``XX/rest``) claims, if it is one:
        only a hint where to look for an object already stored."""
        head, slash, rest = name.partition(b"/")
        text = (head + rest).decode("ascii", "replace")
        if not slash or len(head) != 2 or len(text) != 2 * self.store.algorithm.digest_size:
            return None
        return text if is_hex(text) else None

    def _stored(self, digest: str, written: bool, method: str, size: int, name: bytes) -> None:
        if self.zerocopy and method == StoreMethod.COPIED:
            raise LayerSourceError(
                f"{name[:200]!r} could be neither reflinked nor hard-linked (zerocopy)"
            )
        if written:
            self.written.append(digest)
        self.stats.count(method)
        self.writer.write_object(digest, size)

    def inline_data(self, reader: StreamReader, chunk: InlineData) -> None:
        if chunk.length <= INLINE_MAX:
            self.inline(reader.read_body())
            return

        def pieces() -> Iterator[bytes]:
            for piece in reader.body():
                self.sha.update(piece)
                yield piece

        result = self.store.store_chunks(pieces())
        # Bytes that came over the pipe are always copied, whatever zerocopy says.
        method = StoreMethod.COPIED if result.written else StoreMethod.PRESENT
        if result.written:
            self.written.append(result.digest)
        self.stats.count(method)
        self.writer.write_object(result.digest, chunk.length)


def drain(
    repo: Repository,
    source: Readable,
    dirs: Sequence[int],
    diff_id: str,
    *,
    zerocopy: bool = False,
    link_ok: Callable[[os.stat_result], bool] | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[str, DrainStats]:
    """Store the layer the splitdirfdstream read from ``source`` rebuilds, its
    FileBackedData chunks resolved beneath ``dirs`` (directory fds by slot, not
    owned), as ``oci-layer-<diff_id>`` (module notes). Returns the stream's hex
    digest and how its objects were stored. ``zerocopy``: a file that must be
    copied is an error (cfsctl's). ``link_ok``: whether a file with this stat may be
    hard-linked. ``check`` runs before each chunk.

    :class:`DiffIdMismatchError` if the content is not ``diff_id``'s (only sha256
    diff_ids: cfsctl's rule), :class:`LayerSourceError` for a malformed stream or
    an unusable file; nothing is linked then."""
    content_id = layer_content_id(diff_id)
    algorithm, _, expected = diff_id.partition(":")
    if algorithm != "sha256":
        raise LayerSourceError(f"unsupported diff_id algorithm {algorithm!r}: only sha256")
    repo.ensure_writable()
    reader = StreamReader(source, len(dirs))
    try:
        with writer_lock(repo.path), repo.object_store() as store:
            store.probe_verity()
            writer = SplitStreamWriter(repo.hash_algorithm.digest_size, CONTENT_TYPE_OCI_LAYER)
            state = _Drain(store, dirs, link_ok, zerocopy, writer)
            try:
                while True:
                    if check is not None:
                        check()
                    chunk = reader.next()
                    if chunk is None:
                        break
                    if isinstance(chunk, FileBacked):
                        state.file(chunk)
                    elif isinstance(chunk, InlineData):
                        state.inline_data(reader, chunk)
                    else:
                        for piece in reader.body():
                            state.inline(piece)
            finally:
                state.close()
            actual = state.sha.hexdigest()
            if actual != expected:
                raise DiffIdMismatchError(diff_id, f"sha256:{actual}")
            digest = write_stream(repo, store, writer, content_id, written=state.written)
    except SplitdirfdError as exc:
        raise LayerSourceError(f"bad splitdirfdstream: {exc}", errno=errno.EINVAL) from exc
    except OSError as exc:
        raise RepositoryError(
            f"cannot store layer {diff_id}: {os_error_text(exc)}",
            errno=exc.errno if exc.errno is not None else errno.EIO,
        ) from exc
    log.info("stored layer %s from a splitdirfdstream as stream %s", diff_id, digest)
    return digest, state.stats
