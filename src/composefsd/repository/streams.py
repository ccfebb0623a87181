"""The repository's splitstreams: ``streams/<content-id>`` and ``streams/refs/**``.

composefs-rs keeps OCI layers, configs and manifests (and anything imported with
``cfsctl import``) as splitstreams (:mod:`composefsd.splitstream`) stored as
objects, named by links:

* ``streams/<content-id>`` → ``../objects/XX/rest``: the stream of that content id
  (e.g. ``oci-layer-sha256:<diff_id>``) is that object;
* ``streams/refs/<name>`` (any depth) → ``../<content-id>`` (``../../`` when nested):
  a GC root, e.g. an OCI tag ``streams/refs/oci/<tag>``.

:func:`reachable` is the stream half of composefs-rs's ``gc_impl``: what its GC
keeps alive because of streams. Links are read the way composefs-rs reads them
(the digest is the tail of a stream link's target, the content id the last
component of a ref link's target), so that both tools agree on the same
repository; where composefs-rs refuses to collect (a ref to no stream, a stream
that does not parse, something other than a link in ``streams/``), so does
:func:`reachable`, with :class:`StreamError`. Stream objects are opened by
digest below ``objects/``, never by following a link, so no link leads outside
the repository.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from composefsd.objectlayout import (
    digest_of_link_target,
    link_file_name,
    object_link_target,
    object_relpath,
)
from composefsd.repository.errors import (
    CorruptRepositoryError,
    RepositoryError,
    os_error_text,
)
from composefsd.repository.images import fsync_dir, replace_symlink, set_ref_link
from composefsd.repository.store import sync_objects
from composefsd.splitstream import (
    Chunk,
    SplitStream,
    SplitStreamError,
    SplitStreamWriter,
    iter_chunks,
    parse,
)

if TYPE_CHECKING:
    from composefsd.repository.repo import Repository
    from composefsd.repository.store import ObjectStore

__all__ = [
    "Reach",
    "StreamError",
    "StreamLink",
    "StreamNotFoundError",
    "StreamRef",
    "cat",
    "existing_stream",
    "iter_stream_refs",
    "iter_streams",
    "link_stream",
    "name_stream",
    "reachable",
    "read_stream",
    "resolve_stream",
    "stream_entry",
    "stream_links",
    "trace_streams",
    "use_chunks",
    "write_stream",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_COPY_SIZE = 1 << 20


class StreamError(CorruptRepositoryError):
    """A stream or stream ref that cannot be followed: a ref to no stream, a stream
    whose object is missing or does not parse, a non-link where a link belongs."""


class StreamNotFoundError(RepositoryError):
    """No stream of that content id or ref name."""


@dataclass(frozen=True, slots=True)
class StreamLink:
    """One ``streams/<content_id>`` entry."""

    content_id: str
    #: The link's target; None when the entry is not a symlink.
    target: str | None
    #: The object the target names, read as composefs-rs does (its last
    #: ``XX/rest``, lower-cased); None when it names none. Not checked to exist.
    digest: str | None

    @property
    def well_formed(self) -> bool:
        """Exactly ``../objects/XX/rest`` (what both tools write)."""
        return self.digest is not None and self.target == object_link_target(self.digest)


@dataclass(frozen=True, slots=True)
class StreamRef:
    """One link below ``streams/refs``."""

    #: Path below ``streams/refs``, e.g. ``oci/myimage:v1``.
    name: str
    target: str
    #: The content id the target names (its last component, as composefs-rs reads
    #: it); None when the target has none (``..``, ``/``) or no
    #: ``streams/<content_id>`` link exists.
    content_id: str | None


@dataclass(slots=True)
class Reach:
    """What streams keep alive: objects (hex) and the content ids traced."""

    objects: set[str] = field(default_factory=set)
    streams: set[str] = field(default_factory=set)


def _streams_dir(repo: Repository) -> Path:
    return repo.path / "streams"


def _scandir(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StreamError(
            f"cannot list {directory}: {os_error_text(exc)}", errno=exc.errno
        ) from exc


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def iter_streams(repo: Repository) -> Iterator[StreamLink]:
    """Every entry of ``streams/`` but ``refs``, sorted by content id."""
    algorithm = repo.hash_algorithm
    for entry in _scandir(_streams_dir(repo)):
        if entry.name == "refs":
            continue
        target = _readlink(entry.path) if entry.is_symlink() else None
        digest = digest_of_link_target(target, algorithm) if target is not None else None
        yield StreamLink(entry.name, target, digest)


def stream_links(repo: Repository) -> dict[str, StreamLink]:
    """:func:`iter_streams` by content id."""
    return {link.content_id: link for link in iter_streams(repo)}


def iter_stream_refs(repo: Repository) -> Iterator[StreamRef]:
    """Every link below ``streams/refs``, depth first, sorted by name within a
    directory. Entries that are neither links nor directories are skipped here
    (:func:`reachable` refuses them, as composefs-rs's GC does)."""
    streams = _streams_dir(repo)
    stack: list[tuple[Path, str]] = [(streams / "refs", "")]
    while stack:
        directory, prefix = stack.pop()
        subdirs: list[tuple[Path, str]] = []
        for entry in _scandir(directory):
            name = prefix + entry.name
            if entry.is_symlink():
                target = _readlink(entry.path)
                if target is None:
                    continue
                content_id = link_file_name(target)
                if content_id is not None and not os.path.islink(streams / content_id):
                    content_id = None
                yield StreamRef(name, target, content_id)
            elif entry.is_dir(follow_symlinks=False):
                subdirs.append((Path(entry.path), name + "/"))
        stack.extend(reversed(subdirs))


def _open_object(store: ObjectStore, digest: str, what: str) -> int:
    try:
        return store.open(digest)
    except OSError as exc:
        raise StreamError(
            f"cannot open {what} {digest}: {os_error_text(exc)}", errno=exc.errno
        ) from exc


def _with_stream(
    store: ObjectStore, digest: str, use: Callable[[mmap.mmap | bytes, SplitStream], _T]
) -> _T:
    """``use(data, parsed)`` on the splitstream stored as object ``digest``, opened
    by digest below ``objects/`` (never through a link) and mapped, not read: a
    hostile "stream" may be a huge object. A :class:`SplitStreamError` from
    parsing or from ``use`` becomes :class:`StreamError`."""
    fd = _open_object(store, digest, "stream object")
    problem: str
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StreamError(f"stream object {digest} is not a regular file")
        if st.st_size == 0:
            problem = "it is empty"
        else:
            data = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
            try:
                return use(data, parse(data, store.algorithm.digest_size))
            except SplitStreamError as exc:
                # Only the text leaves this block: the traceback holds views of
                # the mapping, which could not be closed while it lives.
                problem = str(exc)
            finally:
                try:
                    data.close()
                except BufferError:
                    # Views of it live on in an exception that is passing through;
                    # the mapping goes when they do.
                    pass
    finally:
        os.close(fd)
    raise StreamError(f"stream object {digest}: {problem}")


def read_stream(store: ObjectStore, digest: str) -> SplitStream:
    """Parse the splitstream stored as object ``digest``. :class:`StreamError` if
    it is missing or does not parse."""
    return _with_stream(store, digest, lambda _data, parsed: parsed)


def use_chunks(
    store: ObjectStore, digest: str, use: Callable[[SplitStream, Iterator[Chunk]], _T]
) -> _T:
    """``use(parsed, chunks)`` on the splitstream stored as object ``digest``: its
    chunks in order (inline bytes, :class:`~composefsd.splitstream.ObjectChunk`),
    read from the mapped object. :class:`StreamError` as :func:`read_stream`, and
    for damage met while ``use`` reads the chunks."""

    def run(data: mmap.mmap | bytes, parsed: SplitStream) -> _T:
        chunks = iter_chunks(data, parsed)
        try:
            return use(parsed, chunks)
        finally:
            chunks.close()

    return _with_stream(store, digest, run)


def cat(store: ObjectStore, digest: str, out: BinaryIO) -> int:
    """Write the file stream ``digest`` stores to ``out`` (``cfsctl cat``): inline
    chunks as they are, object chunks from the objects (opened by digest). Returns
    the size written. :class:`StreamError` if the stream is damaged, an object is
    missing, or the content would exceed the size the stream declares (nothing
    more than that is written)."""

    def write(data: mmap.mmap | bytes, parsed: SplitStream) -> int:
        chunks = iter_chunks(data, parsed)
        try:
            return _copy_chunks(store, digest, parsed.stream_size, chunks, out)
        finally:
            # Ends the generator now, and with it its views of the mapping.
            chunks.close()

    return _with_stream(store, digest, write)


def _copy_chunks(
    store: ObjectStore, digest: str, size: int, chunks: Iterator[Chunk], out: BinaryIO
) -> int:
    left = size
    for chunk in chunks:
        if isinstance(chunk, bytes):
            # iter_chunks keeps inline bytes within the declared size.
            out.write(chunk)
            left -= len(chunk)
            continue
        fd = _open_object(store, chunk.digest, "object")
        try:
            while piece := os.read(fd, _COPY_SIZE):
                if len(piece) > left:
                    raise StreamError(
                        f"stream {digest}: object {chunk.digest} makes the content longer "
                        f"than the {size} bytes it declares"
                    )
                out.write(piece)
                left -= len(piece)
        finally:
            os.close(fd)
    return size - left


def stream_entry(streams: Path, name: str) -> str:
    """The ``streams/`` entry a content id or ``refs/<name>`` names, as ``cfsctl
    cat`` takes them (a ref names its target's last component); whether that entry
    exists is the caller's to find out. :class:`StreamNotFoundError` for a ref that
    does not resolve and for a name that cannot be an entry of ``streams``."""
    content_id = name
    if name.startswith("refs/"):
        ref = name.removeprefix("refs/")
        if not ref or any(part in ("", ".", "..") for part in ref.split("/")):
            raise StreamNotFoundError(f"no stream ref {ref!r} in {streams.parent}")
        target = _readlink(str(streams / "refs" / ref))
        found = link_file_name(target) if target is not None else None
        if found is None:
            raise StreamNotFoundError(f"no stream ref {ref!r} in {streams.parent}")
        content_id = found
    if not content_id or "/" in content_id or content_id in (".", "..", "refs"):
        raise StreamNotFoundError(f"no stream {content_id!r} in {streams.parent}")
    return content_id


def resolve_stream(repo: Repository, name: str) -> tuple[str, str]:
    """``(content id, stream object digest)`` for a content id or ``refs/<name>``
    (:func:`stream_entry`). :class:`StreamNotFoundError` if there is none."""
    content_id = stream_entry(_streams_dir(repo), name)
    target = _readlink(str(_streams_dir(repo) / content_id))
    digest = digest_of_link_target(target, repo.hash_algorithm) if target else None
    if digest is None:
        raise StreamNotFoundError(f"no stream {content_id!r} in {repo.path}")
    return content_id, digest


def _stream_entries(repo: Repository) -> dict[str, str]:
    """composefs-rs's ``gc_category("streams", AllEntries)``: content id → digest,
    refusing what it refuses."""
    out: dict[str, str] = {}
    for link in iter_streams(repo):
        if link.target is None:
            raise StreamError(f"streams/{link.content_id} in {repo.path} is not a symlink")
        if link.digest is None:
            raise StreamError(
                f"streams/{link.content_id} in {repo.path} points to {link.target!r}, "
                "which names no object"
            )
        out[link.content_id] = link.digest
    return out


def _root_streams(repo: Repository, entries: dict[str, str]) -> set[str]:
    """composefs-rs's ``gc_category("streams", RefsOnly)``: the content ids the refs
    name; a ref to no stream, or a non-link, stops the collection."""
    roots: set[str] = set()
    streams = _streams_dir(repo)
    stack = [streams / "refs"]
    while stack:
        directory = stack.pop()
        for entry in _scandir(directory):
            if entry.is_symlink():
                target = _readlink(entry.path)
                content_id = link_file_name(target) if target is not None else None
                if content_id is None:
                    continue
                if content_id not in entries:
                    raise StreamError(
                        f"stream ref {entry.path} points to {target!r}, and there is no "
                        f"stream {content_id!r} in {repo.path}"
                    )
                roots.add(content_id)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            else:
                raise StreamError(f"{entry.path} is neither a symlink nor a directory")
    return roots


def reachable(repo: Repository, roots: Iterable[str] = (), *, with_refs: bool = True) -> Reach:
    """What composefs-rs's GC keeps alive through streams.

    Roots are the streams ``streams/refs/**`` name (unless ``with_refs`` is False:
    then only ``roots``, to ask what one stream keeps alive) plus those of ``roots``
    that are content ids of streams (other names, e.g. images', are ignored here);
    each is traced as :func:`trace_streams` does. Raises :class:`StreamError` where
    composefs-rs's GC would fail.
    """
    entries = _stream_entries(repo)
    extra = set(roots)
    root_ids = {c for c in entries if c in extra}
    if with_refs:
        root_ids |= _root_streams(repo, entries)
    return _trace(repo, entries, root_ids)


def trace_streams(repo: Repository, content_ids: Iterable[str]) -> Reach:
    """What the streams ``content_ids`` keep alive, as composefs-rs's GC walks them:
    a root stream's object is live, and it is traced: every object ref is live, and
    every named ref's stream object is live and, if some ``streams/<id>`` names that
    object, traced too. Unnamed stream refs keep nothing alive (composefs-rs only
    follows named refs). Each stream is traced once, iteratively: cycles and deep
    chains in a hostile repository cost nothing more. :class:`StreamNotFoundError`
    for a content id that is no stream."""
    entries = _stream_entries(repo)
    roots = set(content_ids)
    missing = sorted(roots - entries.keys())
    if missing:
        raise StreamNotFoundError(f"no stream {missing[0]!r} in {repo.path}")
    return _trace(repo, entries, roots)


def _trace(repo: Repository, entries: dict[str, str], root_ids: set[str]) -> Reach:
    # composefs-rs maps a digest to one of the names linking to it; any one will do
    # (same object, same references), the first by name is deterministic.
    by_digest: dict[str, str] = {}
    for content_id in sorted(entries):
        by_digest.setdefault(entries[content_id], content_id)
    reach = Reach()
    stack = sorted(root_ids, reverse=True)
    reach.objects.update(entries[c] for c in root_ids)
    with repo.object_store() as store:
        while stack:
            content_id = stack.pop()
            if content_id in reach.streams:
                continue
            reach.streams.add(content_id)
            try:
                refs = read_stream(store, entries[content_id]).refs
            except StreamError as exc:
                raise StreamError(f"stream {content_id}: {exc}") from exc
            reach.objects.update(refs.object_refs)
            for name, digest in refs.named_refs:
                reach.objects.add(digest)
                target = by_digest.get(digest)
                if target is None:
                    log.debug("stream %s: named ref %s names no stream", content_id, name)
                elif target not in reach.streams:
                    stack.append(target)
    return reach


def existing_stream(repo: Repository, content_id: str) -> str | None:
    """The stream object ``streams/<content_id>`` names, None if there is none
    (composefs-rs's ``has_stream``)."""
    try:
        return resolve_stream(repo, content_id)[1]
    except StreamNotFoundError:
        return None


def link_stream(repo: Repository, content_id: str, digest: str) -> None:
    """Point ``streams/<content_id>`` at object ``digest``, atomically replacing the
    link it had (a config or manifest stream rewritten with new refs), and make
    the link durable. The object must be durable already: a stream becomes
    visible only with everything it names (composefs-rs's ``write_stream``)."""
    streams = _streams_dir(repo)
    streams.mkdir(exist_ok=True, mode=0o755)
    link = streams / content_id
    target = object_link_target(digest)
    try:
        os.symlink(target, link)
    except FileExistsError:
        if _readlink(str(link)) == target:
            return
        if not os.path.islink(link):
            raise RepositoryError(f"streams/{content_id} in {repo.path} is not a link") from None
        replace_symlink(target, link, streams)
    fsync_dir(streams)


def name_stream(repo: Repository, content_id: str, name: str) -> None:
    """Make ``streams/refs/<name>`` → ``streams/<content_id>`` (a GC root; an OCI
    tag when ``name`` is ``oci/<encoded tag>``), replacing what it named. The
    caller has checked ``name`` (no empty, ``.`` or ``..`` components)."""
    streams = _streams_dir(repo)
    # The temporary of a replacement goes where composefs-rs's replace_symlinkat
    # puts it: the repository's top directory, which no GC or fsck walks.
    set_ref_link(
        streams / "refs", name, content_id, tmp_dir=repo.path, top=streams, what="stream ref"
    )


def write_stream(
    repo: Repository,
    store: ObjectStore,
    writer: SplitStreamWriter,
    content_id: str,
    *,
    ref: str | None = None,
    written: Iterable[str] = (),
) -> str:
    """Store the stream ``writer`` built as an object and link it as
    ``streams/<content_id>`` (and ``streams/refs/<ref>``); its digest.
    ``written``: objects the stream names that this operation wrote, made durable
    first together with the stream itself."""
    result = store.store_bytes(writer.finish())
    fresh = list(written)
    if result.written:
        fresh.append(result.digest)
    sync_objects(repo.objects_dir, [object_relpath(d) for d in fresh])
    link_stream(repo, content_id, result.digest)
    if ref is not None:
        name_stream(repo, content_id, ref)
    return result.digest
