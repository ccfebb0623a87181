"""Garbage collection: remove what no root can reach, as ``cfsctl gc`` does.

Roots (composefs-rs's, ``Repository::gc_impl``, plus composefsd's pins):

* the images named by ``images/refs/**`` (a ref names the image its target's last
  component names, as in composefs-rs);
* the streams named by ``streams/refs/**`` (composefs-rs's splitstreams: OCI tags
  ``streams/refs/oci/<tag>`` name manifest streams, ``oci import-layer`` names a
  layer stream), with everything they reach
  (:func:`composefsd.repository.streams.reachable`: each stream's object, its object
  references, the objects of its named refs, and the streams those named refs
  are, recursively: manifest -> config -> layers);
* extra ``roots`` of the caller, taken as ``cfsctl gc --root`` takes them: a name
  of an entry of ``images/`` (a hex digest) or of ``streams/`` (a content id such
  as ``oci-config-sha256:...``); a name that is neither is ignored (with a
  warning), as cfsctl does;
* ``pins`` (a digest, bare or ``sha256:``-prefixed, or a ref name; the service pins
  every mounted image). A pinned digest keeps its image object and everything it
  uses even when ``images/<hex>`` was removed meanwhile: it may still be mounted.

An image whose object a live stream names (a config stream's
``composefs.image.v1`` named ref is the EROFS image of an OCI image) is live too.
cfsctl keeps only its object (the objects the image uses are the layers' objects,
which the layer streams keep); composefsd also parses it and keeps every object it
uses, so that a mountable image never loses an object, whatever wrote it. On a
consistent repository the two sets are the same.

1. **Mark.** Every live image is parsed the repository way
   (:func:`composefsd.image.reader.read_image` without ``c_quirks``, as verify and
   fsck read it: V2 whiteouts, SHA-512 digests, an image whose size is not its
   superblock's refused) and every object it refers to
   (:func:`~composefsd.image.reader.iter_objects`) is live, and so is the image
   object itself. Every live stream is read. An image
   that cannot be parsed stops the collection before anything is removed: what it
   uses is unknown. So does everything that stops ``cfsctl gc`` in ``streams/``
   (:func:`~composefsd.repository.streams.reachable`): a stream ref to no stream
   or to a stream whose object is missing or does not parse, an entry that is not
   a link to an object. A dangling OCI tag is not pruned: the tag was there to
   keep something alive (a bootc deployment's image), and only a person can tell
   whether to re-pull or untag.
2. **Links.** ``images/<hex>`` and ``streams/<name>`` entries whose object is not
   live are removed (cfsctl removes the object, then prunes the link it left
   broken: the same end state), and so are dangling ones, refs under
   ``images/refs`` whose image is gone (composefsd's own refs; cfsctl refuses
   those), and leftover temporary symlinks. Empty directories under
   ``images/refs`` go too (cfsctl leaves them; ours only hold refs).
   ``streams/refs`` directories are composefs-rs's and stay.
3. **Sweep.** Every file under ``objects/XX/`` that is not live is removed, and so
   are leftover ``objects/.tmp*`` files of killed writers. cfsctl leaves those
   (its own ``.tmp-object-*`` fallback files, the name ours have too); removing
   them is safe for it as well: composefs-rs holds the repository's shared lock
   while it has it open, and the collection runs under the exclusive one, so no
   writer of either is filling one. Digest caches of trees not imported for 30
   days go too.

Links go before objects, so that a collection that is itself interrupted never
leaves an image or stream whose objects are gone.

The real collection runs under :func:`~composefsd.repository.locking.gc_lock`:
no writer is running (composefsd's or composefs-rs's), and objects a running
writer has published but not yet referenced are therefore never seen. A dry run
takes only the shared lock (it removes nothing) and reports what a collection
would remove now; objects of writers running beside it count as garbage in that
report.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from composefsd.image.reader import ImageFormatError, iter_objects, read_image
from composefsd.image.tree import gc_paused
from composefsd.objectlayout import (
    digest_of_link_target,
    is_hex_digest,
    is_temp_name,
    object_relpath,
)
from composefsd.repository.errors import (
    CorruptObjectError,
    CorruptRepositoryError,
    ImageNotFoundError,
    RepositoryError,
    os_error_text,
)
from composefsd.repository.images import (
    SYMLINK_TMP_PREFIX,
    iter_refs,
    prune_all_empty_ref_dirs,
    resolve_image,
    split_digest_prefix,
)
from composefsd.repository.locking import gc_lock, reader_lock
from composefsd.repository.progress import ProgressCallback, Throttle
from composefsd.repository.streams import (
    Reach,
    StreamError,
    iter_stream_refs,
    iter_streams,
    reachable,
)

if TYPE_CHECKING:
    from composefsd.kernel.verity import Algorithm
    from composefsd.repository.repo import Repository

__all__ = ["GcResult", "collect_garbage", "discard_added", "stream_needs"]

log = logging.getLogger(__name__)

#: Digest caches (:class:`~composefsd.repository.digestcache.DigestCache`) of trees not
#: imported for this long are dropped.
CACHE_MAX_AGE = 30 * 24 * 3600


@dataclass(slots=True, frozen=True)
class GcResult:
    """What a collection removed (or, with ``dry_run``, would remove).

    ``objects_removed`` and ``bytes_removed`` count object files (and leftover
    temporary files) under ``objects/``: cfsctl's "Objects: N removed (B bytes)".
    ``images_removed`` counts ``images/<hex>`` links of images no longer live;
    ``links_removed`` counts dangling image links, dangling image refs and leftover
    temporary links (the two together are cfsctl's ``images_pruned``, which counts
    the links its sweep left broken). ``streams_pruned`` counts ``streams/``
    entries of streams no longer live, dangling ones included (cfsctl's
    ``streams_pruned``).
    """

    objects_removed: int
    bytes_removed: int
    images_removed: int
    links_removed: int
    dry_run: bool
    objects_kept: int = 0
    images_kept: int = 0
    streams_pruned: int = 0
    streams_kept: int = 0


def _pin_digest(repo: Repository, pin: str) -> str | None:
    """The digest a pin keeps alive, or None for a digest of which nothing is left."""
    alg = repo.hash_algorithm
    text, sep = split_digest_prefix(pin, alg, f"pin {pin!r}")
    if is_hex_digest(text, alg):
        if os.path.lexists(repo.images_dir / text) or os.path.lexists(repo.object_path(text)):
            return text
        if sep:
            log.warning("pinned image %s does not exist; nothing to keep", text)
            return None
    try:
        return resolve_image(repo, pin)
    except ImageNotFoundError:
        if is_hex_digest(text, alg):
            log.warning("pinned image %s does not exist; nothing to keep", text)
            return None
        raise


@dataclass(slots=True, frozen=True)
class _Link:
    """One entry of ``images/``: a symlink to an object."""

    name: str
    path: str
    #: The object it names, or None if its target is not an object path.
    digest: str | None
    #: Whether it resolves (its object exists).
    resolves: bool


def _image_links(directory: Path, algorithm: Algorithm) -> tuple[list[_Link], list[str]]:
    """The symlinks directly in ``images/`` (``refs`` aside), and the names of
    leftover temporary links among them. Anything else is left alone: fsck reports
    it."""
    links: list[_Link] = []
    temps: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return links, temps
    for entry in entries:
        name = entry.name
        if name == "refs" or not entry.is_symlink():
            continue
        if name.startswith(SYMLINK_TMP_PREFIX):
            temps.append(name)
            continue
        try:
            target = os.readlink(entry.path)
        except FileNotFoundError:
            continue
        links.append(
            _Link(
                name,
                entry.path,
                digest_of_link_target(target, algorithm),
                os.path.exists(entry.path),
            )
        )
    return links, temps


def _image_objects(repo: Repository, digest: str) -> set[str]:
    """Object paths (``XX/rest``) the image object of ``digest`` refers to."""
    try:
        # By its digest below objects/ (store.open_object): no symlink is followed.
        with repo.object_store() as store:
            fd = store.open(digest)
    except OSError as exc:
        raise RepositoryError(
            f"cannot open image {digest}: {os_error_text(exc)}; refusing to collect garbage",
            errno=exc.errno,
        ) from exc
    try:
        if os.fstat(fd).st_size == 0:
            raise CorruptObjectError(f"image {digest} is empty; refusing to collect garbage")
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as buf, gc_paused():
            try:
                root = read_image(buf, c_quirks=False).root
            except ImageFormatError as exc:
                raise CorruptObjectError(
                    f"image {digest} does not parse ({exc}); refusing to collect garbage, "
                    f"since the objects it uses are unknown: remove or repair it first"
                ) from exc
            payloads = iter_objects(root)
    finally:
        os.close(fd)
    return {os.fsdecode(p.lstrip(b"/")) for p in payloads}


def _stream_reach(
    repo: Repository,
    roots: Iterable[str],
    *,
    refs: bool = True,
    refusing: str = "refusing to collect garbage (as cfsctl gc does)",
) -> Reach:
    """:func:`~composefsd.repository.streams.reachable`; where it cannot follow a
    stream or ref (as cfsctl gc cannot), nothing may be removed: what that stream
    keeps alive is unknown (a dangling OCI tag of a bootc deployment must not cost
    the deployment its image). ``refusing`` says what is not done, for the error."""
    try:
        return reachable(repo, roots, with_refs=refs)
    except StreamError as exc:
        raise CorruptRepositoryError(
            f"{exc}; {refusing}, since what the streams keep alive is unknown: "
            f"repair or remove it first",
            errno=exc.errno,
        ) from exc


def _remove(path: Path | str, dir_fd: int | None = None) -> bool:
    try:
        os.unlink(path, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


@dataclass(slots=True)
class _Plan:
    """What the mark phase found: what lives and which links go."""

    live: set[str]
    images_kept: int
    streams_kept: int
    unreferenced_images: list[str]
    stale_image_links: list[str]
    stale_image_refs: list[Path]
    stream_links_gone: list[str]


def _mark(repo: Repository, pins: list[str], roots: list[str], throttle: Throttle) -> _Plan:
    alg = repo.hash_algorithm
    throttle("roots", 0, None, force=True)
    image_links, image_temps = _image_links(repo.images_dir, alg)
    images_by_name = {link.name: link for link in image_links}

    # Image roots: refs (a ref whose image is gone is stale), extra roots, pins.
    root_images: set[str] = set()
    stale_image_refs: list[Path] = []
    for _name, path, digest in iter_refs(repo):
        if digest is not None and os.path.exists(repo.images_dir / digest):
            root_images.add(digest)
        else:
            stale_image_refs.append(path)
    for name in roots:
        image = images_by_name.get(name)
        if image is not None and image.resolves and image.digest is not None:
            root_images.add(image.digest)
    pinned = {d for d in (_pin_digest(repo, p) for p in pins) if d is not None}

    # Streams: streams/refs and the extra roots that name streams, and all they reach.
    throttle("streams", 0, None, force=True)
    reach = _stream_reach(repo, roots)
    stream_links = list(iter_streams(repo))
    unknown = set(roots) - images_by_name.keys() - {link.content_id for link in stream_links}
    for name in sorted(unknown):
        log.warning("gc root %r names no entry of images/ or streams/; ignored", name)
    throttle("streams", len(reach.streams), len(reach.streams), force=True)

    # Images a live stream names (an OCI image's EROFS image) live with their objects.
    named = {
        link.digest
        for link in image_links
        if link.digest is not None and link.resolves and link.digest in reach.objects
    }
    kept = {d for d in root_images | pinned | named if os.path.lexists(repo.object_path(d))}
    live: set[str] = {object_relpath(d) for d in reach.objects}
    for done, digest in enumerate(sorted(kept)):
        throttle("mark", done, len(kept), digest)
        live.add(object_relpath(digest))
        live |= _image_objects(repo, digest)
    throttle("mark", len(kept), len(kept), force=True)

    def is_live(digest: str | None) -> bool:
        return digest is not None and object_relpath(digest) in live

    unreferenced = [
        link.name
        for link in image_links
        if link.resolves and is_hex_digest(link.name, alg) and not is_live(link.digest)
    ]
    stale_links = image_temps + [
        link.name for link in image_links if not link.resolves and is_hex_digest(link.name, alg)
    ]
    # reachable() refused anything in streams/ but links naming objects, so each link
    # goes exactly when its object does (a dangling one included), as with cfsctl.
    stream_gone = [link.content_id for link in stream_links if not is_live(link.digest)]
    return _Plan(
        live=live,
        images_kept=len(kept),
        streams_kept=len(stream_links) - len(stream_gone),
        unreferenced_images=unreferenced,
        stale_image_links=stale_links,
        stale_image_refs=stale_image_refs,
        stream_links_gone=stream_gone,
    )


def collect_garbage(
    repo: Repository,
    *,
    pins: Iterable[str] = (),
    roots: Iterable[str] = (),
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> GcResult:
    """Run GC (module notes). ``roots``: extra roots as ``cfsctl gc --root`` takes
    them; ``timeout``: seconds to wait for running operations."""
    if not dry_run:
        repo.ensure_writable()
    pins = list(pins)
    roots = list(roots)
    throttle = Throttle(progress)
    lock = reader_lock(repo.path) if dry_run else gc_lock(repo.path, timeout=timeout)
    with lock:
        plan = _mark(repo, pins, roots, throttle)

        # Links first, then objects (module notes).
        if not dry_run:
            for name in plan.unreferenced_images + plan.stale_image_links:
                _remove(repo.images_dir / name)
            for path in plan.stale_image_refs:
                _remove(path)
            # Every empty ref directory, also those a killed or failed writer left.
            pruned = prune_all_empty_ref_dirs(repo)
            if pruned:
                log.info("gc: removed %d empty ref directories", pruned)
            for name in plan.stream_links_gone:
                _remove(repo.path / "streams" / name)

        objects_removed, bytes_removed, objects_kept = _sweep(repo, plan.live, dry_run, throttle)
        if not dry_run:
            _prune_caches(repo)
    result = GcResult(
        objects_removed=objects_removed,
        bytes_removed=bytes_removed,
        images_removed=len(plan.unreferenced_images),
        links_removed=len(plan.stale_image_links) + len(plan.stale_image_refs),
        dry_run=dry_run,
        objects_kept=objects_kept,
        images_kept=plan.images_kept,
        streams_pruned=len(plan.stream_links_gone),
        streams_kept=plan.streams_kept,
    )
    log.info("gc%s: %s", " (dry run)" if dry_run else "", result)
    return result


def _sweep(
    repo: Repository, live: set[str], dry_run: bool, throttle: Throttle
) -> tuple[int, int, int]:
    """Remove (or count) what is not live under ``objects/``: (removed, bytes, kept)."""
    objects_removed = bytes_removed = objects_kept = 0
    try:
        top = sorted(os.scandir(repo.objects_dir), key=lambda e: e.name)
    except FileNotFoundError:
        top = []
    for done, entry in enumerate(top):
        throttle("sweep", done, len(top))
        if not entry.is_dir(follow_symlinks=False):
            if is_temp_name(entry.name) and not entry.is_symlink():
                size = _size(entry)
                if dry_run or _remove(entry.path):
                    objects_removed += 1
                    bytes_removed += size
            continue
        try:
            dir_fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise RepositoryError(
                f"cannot open {entry.path}: {os_error_text(exc)}", errno=exc.errno
            ) from exc
        try:
            for obj in os.scandir(dir_fd):
                rel = f"{entry.name}/{obj.name}"
                if rel in live:
                    objects_kept += 1
                    continue
                size = _size(obj)
                if dry_run or _remove(obj.name, dir_fd):
                    objects_removed += 1
                    bytes_removed += size
        finally:
            os.close(dir_fd)
    throttle("sweep", len(top), len(top), force=True)
    return objects_removed, bytes_removed, objects_kept


def stream_needs(repo: Repository, digest: str) -> list[str]:
    """The refs under ``streams/refs`` (names relative to it) whose streams need the
    object ``digest``: an OCI tag needs its image's EROFS image, which its config
    stream names. :class:`CorruptRepositoryError` where a stream cannot be followed.
    The caller holds a repository lock."""
    refusing = f"not removing image {digest}"
    if digest not in _stream_reach(repo, (), refusing=refusing).objects:
        return []
    return [
        ref.name
        for ref in iter_stream_refs(repo)
        if ref.content_id is not None
        and digest in _stream_reach(repo, [ref.content_id], refs=False, refusing=refusing).objects
    ]


#: Slack for the timestamps of image links against the clock (coarse filesystems).
_CLOCK_SLACK = 2.0


def discard_added(
    repo: Repository, objects: Iterable[str], since: float, image_link: str | None = None
) -> int:
    """Undo what an operation that began at ``since`` (``time.time()``) and failed
    added: the ``images/<hex>`` link ``image_link`` it created, unless a ref names
    that image, and the ``objects`` (hex digests) it wrote, unless someone came to
    depend on them. Returns the number of objects removed.

    Only done when no other operation holds the repository: this takes the GC lock
    without waiting (else :class:`RepositoryBusyError`, and nothing is removed). An
    object another writer found and reused meanwhile is part of an image that
    writer published since ``since``, or of a composefs-rs stream: every such image,
    and what it uses, is kept, and so is every object any stream reaches (a stream
    that cannot be followed stops the removal: :class:`CorruptRepositoryError`).
    """
    digests = sorted(set(objects))
    with gc_lock(repo.path, timeout=0):
        alg = repo.hash_algorithm
        # Every stream, not only the roots: a cfsctl import may have reused one of
        # our objects before its tag was set.
        every = [link.content_id for link in iter_streams(repo)]
        keep = {object_relpath(d) for d in _stream_reach(repo, every).objects}
        if image_link is not None:
            named = {d for _name, _path, d in iter_refs(repo)}
            if image_link not in named and object_relpath(image_link) not in keep:
                _remove(repo.images_dir / image_link)
        try:
            entries = list(os.scandir(repo.images_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if not (is_hex_digest(entry.name, alg) and entry.is_symlink()):
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if mtime >= since - _CLOCK_SLACK and os.path.lexists(repo.object_path(entry.name)):
                keep.add(object_relpath(entry.name))
                keep |= _image_objects(repo, entry.name)
        removed = 0
        for digest in digests:
            rel = object_relpath(digest)
            if rel not in keep and _remove(repo.objects_dir / rel):
                removed += 1
    return removed


def _prune_caches(repo: Repository) -> None:
    """Drop digest caches of trees not imported for ``CACHE_MAX_AGE`` seconds, and
    temporary files of killed writers (none is running: we hold the lock)."""
    cutoff = time.time() - CACHE_MAX_AGE
    try:
        entries = list(os.scandir(repo.cache_dir))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and (entry.name.startswith(".tmp") or st.st_mtime < cutoff):
            log.debug("removing digest cache %s", entry.path)
            _remove(entry.path)


def _size(entry: os.DirEntry[str]) -> int:
    try:
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0
