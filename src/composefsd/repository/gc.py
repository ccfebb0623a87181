"""Garbage collection: remove what no ref or pin can reach.

Roots are the images named by ``images/refs/**`` plus the images the caller pins
(a digest, bare or ``sha256:``-prefixed, or a ref name; the service pins every
mounted image). A pinned digest keeps its image object and everything it uses
even when ``images/<hex>`` was removed meanwhile: it may still be mounted.

1. **Mark.** Every root image is parsed (:func:`composefsd.image.reader.read_image`)
   and every object it refers to (:func:`~composefsd.image.reader.iter_objects`)
   is live, and so is the image object itself. An image that cannot be parsed
   stops the collection before anything is removed: its objects are unknown.
2. **Links.** ``images/<hex>`` entries that no root names, or whose object is
   missing, are removed; so are refs leading to missing images, and leftover
   temporary symlinks.
3. **Sweep.** Every file under ``objects/XX/`` that is not live is removed, and so
   are leftover ``objects/.tmp*`` files of killed writers. Digest caches of trees
   not imported for 30 days go too.

Links go before objects, so that a collection that is itself interrupted never
leaves an image whose objects are gone.

The real collection runs under :func:`~composefsd.repository.locking.gc_lock`:
no writer is running, and objects a running writer has published but not yet
referenced are therefore never seen. A dry run takes only the shared lock (it
removes nothing) and reports what a collection would remove now; objects of
writers running beside it count as garbage in that report.

A repository that has composefs-rs splitstreams (``streams/``) is refused: their
object references are not something composefsd can trace, and removing objects
they use would corrupt them. ``cfsctl gc`` collects such repositories.
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
from composefsd.objectlayout import is_hex_digest, is_temp_name, object_relpath
from composefsd.repository.errors import (
    CorruptObjectError,
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

if TYPE_CHECKING:
    from composefsd.repository.repo import Repository

__all__ = ["GcResult", "collect_garbage", "discard_added"]

log = logging.getLogger(__name__)

#: Digest caches (:class:`~composefsd.repository.digestcache.DigestCache`) of trees not
#: imported for this long are dropped.
CACHE_MAX_AGE = 30 * 24 * 3600


@dataclass(slots=True, frozen=True)
class GcResult:
    """What a collection removed (or, with ``dry_run``, would remove).

    ``objects_removed`` and ``bytes_removed`` count object files (and leftover
    temporary files) under ``objects/``; ``images_removed`` counts ``images/<hex>``
    links of unreferenced images; ``links_removed`` counts dangling image links,
    dangling refs and leftover temporary links.
    """

    objects_removed: int
    bytes_removed: int
    images_removed: int
    links_removed: int
    dry_run: bool
    objects_kept: int = 0
    images_kept: int = 0


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


def _check_no_streams(repo: Repository) -> None:
    streams = repo.path / "streams"
    try:
        entries = list(os.scandir(streams))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.name == "refs" and entry.is_dir(follow_symlinks=False):
            if any(True for _ in os.scandir(entry.path)):
                break
            continue
        break
    else:
        return
    raise RepositoryError(
        f"{repo.path} holds composefs-rs splitstreams (streams/), whose objects composefsd "
        f"cannot trace; refusing to collect garbage (use cfsctl gc)"
    )


def _image_objects(repo: Repository, digest: str) -> set[str]:
    """Object paths (``XX/rest``) the image object of ``digest`` refers to."""
    path = repo.object_path(digest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
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
                root = read_image(buf).root
            except ImageFormatError as exc:
                raise CorruptObjectError(
                    f"image {digest} does not parse ({exc}); refusing to collect garbage, "
                    f"since the objects it uses are unknown: remove or repair it first"
                ) from exc
            payloads = iter_objects(root)
    finally:
        os.close(fd)
    return {os.fsdecode(p.lstrip(b"/")) for p in payloads}


def _remove(path: Path | str, dir_fd: int | None = None) -> bool:
    try:
        os.unlink(path, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def collect_garbage(
    repo: Repository,
    *,
    pins: Iterable[str] = (),
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> GcResult:
    """Run GC (module notes). ``timeout``: seconds to wait for running operations."""
    if not dry_run:
        repo.ensure_writable()
    pins = list(pins)
    throttle = Throttle(progress)
    lock = reader_lock(repo.path) if dry_run else gc_lock(repo.path, timeout=timeout)
    with lock:
        _check_no_streams(repo)
        alg = repo.hash_algorithm
        throttle("roots", 0, None, force=True)

        # Roots: refs and pins.
        roots: set[str] = set()
        stale_refs: list[Path] = []
        for _name, path, digest in iter_refs(repo):
            if digest is not None and os.path.exists(repo.images_dir / digest):
                roots.add(digest)
            else:
                stale_refs.append(path)
        pinned = {d for d in (_pin_digest(repo, p) for p in pins) if d is not None}

        # Image links: kept if a root, removed otherwise.
        unreferenced: list[str] = []
        stale_links: list[str] = []
        try:
            image_entries = list(os.scandir(repo.images_dir))
        except FileNotFoundError:
            image_entries = []
        for entry in image_entries:
            name = entry.name
            if name == "refs":
                continue
            if name.startswith(SYMLINK_TMP_PREFIX) and entry.is_symlink():
                stale_links.append(name)
            elif is_hex_digest(name, alg) and entry.is_symlink():
                if not os.path.exists(entry.path):
                    stale_links.append(name)
                elif name not in roots and name not in pinned:
                    unreferenced.append(name)
        kept = (roots | pinned) - set(unreferenced)
        kept = {d for d in kept if os.path.lexists(repo.object_path(d))}

        # Mark.
        live: set[str] = set()
        for done, digest in enumerate(sorted(kept)):
            throttle("mark", done, len(kept), digest)
            live.add(object_relpath(digest))
            live |= _image_objects(repo, digest)
        throttle("mark", len(kept), len(kept), force=True)

        # Links first, then objects (module notes).
        if not dry_run:
            for name in unreferenced + stale_links:
                _remove(repo.images_dir / name)
            for path in stale_refs:
                _remove(path)
            # Every empty ref directory, also those a killed or failed writer left.
            pruned = prune_all_empty_ref_dirs(repo)
            if pruned:
                log.info("gc: removed %d empty ref directories", pruned)

        objects_removed = bytes_removed = objects_kept = 0
        objects_dir = repo.objects_dir
        try:
            top = sorted(os.scandir(objects_dir), key=lambda e: e.name)
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
        if not dry_run:
            _prune_caches(repo)
    result = GcResult(
        objects_removed=objects_removed,
        bytes_removed=bytes_removed,
        images_removed=len(unreferenced),
        links_removed=len(stale_links) + len(stale_refs),
        dry_run=dry_run,
        objects_kept=objects_kept,
        images_kept=len(kept),
    )
    log.info("gc%s: %s", " (dry run)" if dry_run else "", result)
    return result


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
    writer published since ``since``: every such image, and what it uses, is kept.
    A repository with composefs-rs splitstreams is left alone (their objects cannot
    be traced: :class:`RepositoryError`).
    """
    digests = sorted(set(objects))
    with gc_lock(repo.path, timeout=0):
        _check_no_streams(repo)
        if image_link is not None:
            named = {d for _name, _path, d in iter_refs(repo)}
            if image_link not in named:
                _remove(repo.images_dir / image_link)
        keep: set[str] = set()
        try:
            entries = list(os.scandir(repo.images_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if not (is_hex_digest(entry.name, repo.hash_algorithm) and entry.is_symlink()):
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
