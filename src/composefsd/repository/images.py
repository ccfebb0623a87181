"""Images: CreateImage, the ``images/`` and ``images/refs/`` links, listing, removal.

Layout (composefs-rs's, reference notes section 1.1)::

    images/<hex>          -> ../objects/XX/<rest>        the image file is an object
    images/refs/<name>    -> ../<hex>                     (../../<hex> for a/b, ...)

All links are relative symlinks. An image is visible once ``images/<hex>``
exists; CreateImage makes the objects and the image durable first (fsync of
everything it wrote, see :func:`composefsd.repository.store.sync_objects`),
then creates ``images/<hex>`` and fsyncs ``images/``, then points the ref at it
(a temporary symlink renamed over the ref, then an fsync of its directory). A
killed CreateImage therefore leaves at most unreferenced objects, which GC
removes, and never a half-visible image or a ref to a missing one.

GC keeps only images reachable from a ref or a pin (as composefs-rs does): an
image created without a ref is removed by the next GC unless it is pinned.

Ref names are ``/``-separated paths under ``images/refs/``; no component may be
empty or start with ``.`` (so ``.`` and ``..`` and our temporary names are out).
A leading ``refs/`` is accepted and dropped. A name is at most
:data:`REF_MAX_BYTES` bytes of UTF-8 in at most :data:`REF_MAX_COMPONENTS`
components of at most 255 bytes each, and holds no control character (C0, DEL,
C1) and no lone surrogate: names end up in listings, logs and terminals, where
a newline would forge a row and an escape sequence would drive the terminal.

CreateImage from a directory (:func:`create_from_directory`) gives the image
composefs-rs gives for the same tree, algorithm and format (``cfsctl
create-image --no-propagate-usr-to-root``, or with ``CreateOptions.transform``
cfsctl's transforms), and the same objects: the tree is walked by
:func:`composefsd.sources.directory.scan_source` in the composefs-rs style
(:class:`~composefsd.sources.base.ReadStyle`; no file is read), then every
regular file is hashed with the repository's algorithm and published if new by
an :class:`~composefsd.repository.importer.Importer` (worker processes for large
trees), files of 64 bytes or less are inlined, the transforms are applied
(:func:`composefsd.image.transforms.apply_transform`) and
:func:`composefsd.image.formats.write_format` writes the images (next section).
A version range (``CreateOptions.min_version``/``max_version``) asks for the
image and objects C ``mkcomposefs --digest-store`` gives instead: C's reading of
the tree and :func:`composefsd.image.writer.write_image`. Files are read
beneath the source directory's fd, never through a symlink, and only if they are
the inode the scan saw (:mod:`composefsd.sources.beneath`), so a tree that its owner
changes meanwhile cannot lead the import outside it.

A tree scanned elsewhere, with somebody else's rights (the service scans a
caller's tree as the caller), is imported by :func:`create_from_scan`: its
files are opened with those rights (``SourceTree.credentials``).

Every source becomes a :class:`~composefsd.sources.base.SourceTree` (a directory
through :func:`composefsd.sources.directory.source_tree`, a dumpfile through
:func:`composefsd.sources.dumpfile.dumpfile_tree`), which one code path imports,
writes and publishes (:func:`_create`).

Formats
-------

A repository's images are written in its formats (``meta.json``'s
``erofs_formats``, :class:`~composefsd.repository.meta.FormatConfig`), as
composefs-rs's ``commit_images`` writes them: one image per format, each an
object with its ``images/<hex>`` link, and only the default format's image named
by the ref and returned as the result's digest; the others are listed in
``CreateResult.extra_images`` and, like composefs-rs's, are anonymous (the next
GC removes them unless they are pinned). ``CreateOptions.erofs_version`` writes
one image in that format instead (cfsctl's ``--erofs-version``), and
``min_version``/``max_version`` one in the C-compatible format C mkcomposefs picks
in that range (V0 or V1).

In a SHA-512 repository objects are named by their SHA-512 digests; the image
writer only knows SHA-256 ``trusted.overlay.metacopy`` digests (C composefs
format), so those images carry the redirect to the object but no per-file digest.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import stat
import time
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from composefsd.dirs import make_dirs
from composefsd.fsverity import digest_fd
from composefsd.image.formats import ErofsVersion, image_version, write_format
from composefsd.image.reader import ImageFormatError, read_image
from composefsd.image.transforms import Transform, TransformError, apply_transform
from composefsd.image.tree import Node, gc_paused
from composefsd.image.writer import VERSION_MAX, write_image
from composefsd.kernel.verity import Algorithm, VerityError, measure_verity
from composefsd.objectlayout import (
    is_hex_digest,
    link_file_name,
    object_link_digest,
    object_link_target,
    object_payload,
    object_relpath,
)
from composefsd.repository.digestcache import DigestCache
from composefsd.repository.errors import (
    CorruptObjectError,
    ImageNotFoundError,
    ImageReferencedError,
    InvalidNameError,
    RepositoryBusyError,
    RepositoryError,
    SourceError,
    os_error_text,
)
from composefsd.repository.importer import ImportConfig, Importer, ImportResult
from composefsd.repository.locking import RepoLock, reader_lock, writer_lock
from composefsd.repository.progress import ProgressCallback, Throttle
from composefsd.repository.store import (
    NotRegularObjectError,
    ObjectResult,
    ObjectStore,
    open_object,
    open_objects_dir,
    random_name,
    sync_objects,
)
from composefsd.sources.base import ImportTask, ReadStyle, SourceTree, SourceTreeError
from composefsd.sources.directory import (
    BareKey,
    ScanError,
    ScanOptions,
    ScanProgress,
    ScanSplit,
    SourceScan,
    default_threads,
    scan_source,
    source_tree,
)
from composefsd.sources.dumpfile import dumpfile_tree

if TYPE_CHECKING:
    from composefsd.repository.repo import Repository

__all__ = [
    "REF_MAX_BYTES",
    "REF_MAX_COMPONENTS",
    "SYMLINK_TMP_PREFIX",
    "CreateOptions",
    "CreateResult",
    "ImageDetails",
    "ImageEntry",
    "create_from_directory",
    "create_from_dumpfile",
    "create_from_scan",
    "describe_image",
    "fsync_dir",
    "image_link_names",
    "iter_refs",
    "list_images",
    "normalize_ref",
    "open_image_object",
    "prune_all_empty_ref_dirs",
    "prune_empty_ref_dirs",
    "ref_target",
    "remove_image",
    "remove_ref",
    "replace_symlink",
    "resolve_image",
    "set_ref_link",
]

log = logging.getLogger(__name__)

SYMLINK_TMP_PREFIX = ".symlink-"
_S_IFMT = 0o170000
_S_IFREG = stat.S_IFREG
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NAME_MAX = 255
#: Longest ref name, in bytes of UTF-8 (``refs/`` excluded).
REF_MAX_BYTES = 1024
#: Most ``/``-separated components in a ref name (each one is a directory level).
REF_MAX_COMPONENTS = 64
# C0 controls, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(slots=True, frozen=True)
class CreateOptions:
    """CreateImage options; the first six mirror C mkcomposefs's.

    Which images are written (module notes, "Formats"): with ``min_version`` or
    ``max_version``, C mkcomposefs's image (its reading of the tree, and the
    format it picks in that range, default 0..1: :attr:`c_compatible`); with
    ``erofs_version``, one image in that format; with neither, one per format of
    the repository. Without a version range the tree is read as composefs-rs
    reads it, and ``transform`` (composefs-rs's transforms, cfsctl's flags) is
    applied to it before the images are written.
    """

    use_epoch: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    skip_devices: bool = False
    min_version: int | None = None
    max_version: int | None = None
    #: Paths of one inode become hardlinks in the image (C does not do this).
    preserve_hardlinks: bool = False
    #: Hashing and copying lanes; None: one per CPU this process may run on.
    threads: int | None = None
    #: Reuse what the previous import of the same tree learnt: digests of unchanged
    #: files, inodes without xattrs, the images of unchanged inputs
    #: (:class:`~composefsd.repository.digestcache.DigestCache`).
    digest_cache: bool = True
    #: Write one image in this format instead of the repository's formats.
    erofs_version: ErofsVersion | None = None
    #: composefs-rs's transforms (none by default: cfsctl --no-propagate-usr-to-root).
    transform: Transform = field(default_factory=Transform)

    @property
    def c_compatible(self) -> bool:
        """Whether C mkcomposefs's image is asked for (a version range is given)."""
        return self.min_version is not None or self.max_version is not None

    def __post_init__(self) -> None:
        if self.skip_xattrs and self.user_xattrs:
            raise ValueError("skip_xattrs and user_xattrs exclude each other")
        if self.erofs_version is not None:
            object.__setattr__(self, "erofs_version", ErofsVersion(self.erofs_version))
            if self.min_version is not None or self.max_version is not None:
                raise ValueError("erofs_version excludes min_version and max_version")
        for name in ("min_version", "max_version"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= VERSION_MAX:
                raise ValueError(f"{name} must be 0..{VERSION_MAX}, not {value}")
        if self.c_compatible and not self.transform.is_identity:
            raise ValueError("composefs-rs's transforms do not apply to C mkcomposefs's image")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads}")


@dataclass(slots=True, frozen=True)
class CreateResult:
    """What CreateImage did.

    ``files``: regular files in the image; ``objects_written`` / ``objects_reused``:
    distinct content objects this call added / found already present (the image
    file itself is not counted: see ``image_written``); ``bytes_written``: their
    bytes; ``bytes_total``: bytes of all files stored as objects;
    ``verity_enabled``: the image and every object it uses have fs-verity.
    """

    digest: str
    ref: str | None
    files: int
    objects_written: int
    objects_reused: int
    bytes_written: int
    bytes_total: int
    verity_enabled: bool
    image_written: bool = False
    image_size: int = 0
    entries: int = 0
    #: The format of the image ``digest`` names.
    erofs_version: ErofsVersion = ErofsVersion.V1
    #: The images written beside it in the repository's extra formats (unnamed:
    #: no ref names them, so the next GC removes them unless pinned).
    extra_images: dict[ErofsVersion, str] = field(default_factory=dict)


@dataclass(slots=True)
class Added:
    """What one CreateImage added to the repository so far (undone if it fails)."""

    #: Digests (hex) of the objects it wrote, the image object included.
    objects: list[str] = field(default_factory=list)
    #: The ``images/<hex>`` links it created (not ones that were there).
    image_links: list[str] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class ImageEntry:
    digest: str
    size: int
    refs: list[str]
    #: When ``images/<hex>`` was created (seconds since the epoch).
    created: float


@dataclass(slots=True, frozen=True)
class ImageDetails:
    digest: str
    size: int
    object_count: int
    created: float
    refs: list[str]
    composefs_version: int
    #: Bytes of the distinct objects the image uses (as the image records them).
    objects_size: int = 0
    #: Whether the image file has fs-verity.
    verity: bool = False
    entries: int = 0


# -- names --------------------------------------------------------------------------------


def split_digest_prefix(name: str, algorithm: Algorithm, what: str) -> tuple[str, bool]:
    """Drop a ``sha256:``/``sha512:`` prefix: (the rest, lowercased, and True), or
    (``name`` and False) without one. A prefix for another algorithm than the
    repository's is an :class:`InvalidNameError` that names ``what``."""
    prefix, sep, rest = name.partition(":")
    if not (sep and prefix in ("sha256", "sha512")):
        return name, False
    if prefix != algorithm.value:
        raise InvalidNameError(
            f"{what} is a {prefix} digest; the repository uses {algorithm.value}"
        )
    return rest.lower(), True


def _shown(name: str) -> str:
    """``name`` quoted and escaped for a message, cut short if it is long."""
    return repr(name) if len(name) <= 80 else f"{name[:80]!r}... ({len(name)} characters)"


def normalize_ref(name: str) -> str:
    """Check a ref name (module notes) and drop a leading ``refs/``;
    :class:`InvalidNameError` if bad."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError("a ref name must be a non-empty string")
    ref = name[5:] if name.startswith("refs/") else name
    if not ref:
        raise InvalidNameError(f"invalid ref name {name!r}")
    try:
        size = len(ref.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidNameError(f"invalid ref name {_shown(name)}: not valid Unicode") from None
    if _CONTROL.search(ref):
        raise InvalidNameError(f"invalid ref name {_shown(name)}: control characters")
    parts = ref.split("/")
    if len(parts) > REF_MAX_COMPONENTS:
        raise InvalidNameError(
            f"invalid ref name {_shown(name)}: {len(parts)} components, "
            f"at most {REF_MAX_COMPONENTS}"
        )
    if size > REF_MAX_BYTES:
        raise InvalidNameError(
            f"invalid ref name {_shown(name)}: {size} bytes, at most {REF_MAX_BYTES}"
        )
    for part in parts:
        if not part or part.startswith(".") or len(part.encode()) > _NAME_MAX:
            raise InvalidNameError(
                f"invalid ref name {_shown(name)}: components must be non-empty, at most "
                f"{_NAME_MAX} bytes, and must not start with '.'"
            )
    return ref


def ref_target(ref: str, hexdigest: str) -> str:
    """The relative symlink target of ``images/refs/<ref>``."""
    return "../" * (ref.count("/") + 1) + hexdigest


def _image_target(hexdigest: str) -> str:
    return object_link_target(hexdigest)


def _target_digest(target: str, algorithm: Algorithm) -> str | None:
    """The image a ref link names: its file name, if that is a digest."""
    base = link_file_name(target)
    return base if base is not None and is_hex_digest(base, algorithm) else None


def iter_refs(repo: Repository) -> Iterator[tuple[str, Path, str | None]]:
    """``(name, link path, image digest or None)`` for every link under ``images/refs``."""
    stack: list[tuple[Path, str]] = [(repo.refs_dir, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise RepositoryError(
                f"cannot list {directory}: {os_error_text(exc)}", errno=exc.errno
            ) from exc
        for entry in sorted(entries, key=lambda e: e.name):
            name = prefix + entry.name
            if entry.is_symlink():
                try:
                    target = os.readlink(entry.path)
                except OSError:
                    continue
                yield name, Path(entry.path), _target_digest(target, repo.hash_algorithm)
            elif entry.is_dir(follow_symlinks=False):
                stack.append((Path(entry.path), name + "/"))


def refs_by_image(repo: Repository) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, _path, digest in iter_refs(repo):
        if digest is not None:
            out.setdefault(digest, []).append(name)
    return out


def resolve_image(repo: Repository, name: str) -> str:
    """The hex digest for a digest (bare or ``sha256:``-prefixed), a ref name, or
    ``refs/<name>``; :class:`ImageNotFoundError` if there is no such image."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError("an image name must be a non-empty string")
    alg = repo.hash_algorithm
    text, sep = split_digest_prefix(name, alg, repr(name))
    if is_hex_digest(text, alg):
        try:
            os.lstat(repo.images_dir / text)
            return text
        except FileNotFoundError:
            if sep:
                raise ImageNotFoundError(f"no image {text} in {repo.path}") from None
    ref = normalize_ref(text)
    link = repo.refs_dir / ref
    try:
        target = os.readlink(link)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageNotFoundError(f"no image or ref named {name!r} in {repo.path}") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ImageNotFoundError(f"{name!r} is a directory of refs, not a ref") from None
        raise RepositoryError(f"cannot read ref {ref}: {os_error_text(exc)}") from exc
    digest = _target_digest(target, alg)
    if digest is None:
        raise ImageNotFoundError(f"ref {ref!r} points to {target!r}, which is not an image")
    try:
        os.lstat(repo.images_dir / digest)
    except FileNotFoundError:
        raise ImageNotFoundError(f"ref {ref!r} points to image {digest}, which is gone") from None
    return digest


# -- links --------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path``: the links made in it are durable."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_symlink(target: str, link: Path, tmp_dir: Path) -> None:
    """Point ``link`` at ``target`` atomically: a temporary symlink in ``tmp_dir``
    (same filesystem) renamed over it."""
    while True:
        tmp = tmp_dir / random_name(SYMLINK_TMP_PREFIX)
        try:
            os.symlink(target, tmp)
            break
        except FileExistsError:
            continue
    try:
        os.rename(tmp, link)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _readlink_or_none(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except OSError:
        return None


def link_image(repo: Repository, hexdigest: str) -> bool:
    """Create ``images/<hex>`` (or repair it); True if it was not there."""
    target = _image_target(hexdigest)
    link = repo.images_dir / hexdigest
    created = True
    try:
        os.symlink(target, link)
    except FileExistsError:
        created = False
        if _readlink_or_none(link) != target:
            replace_symlink(target, link, repo.images_dir)
    fsync_dir(repo.images_dir)
    return created


def _set_ref(repo: Repository, ref: str, hexdigest: str) -> None:
    set_ref_link(repo.refs_dir, ref, hexdigest, tmp_dir=repo.images_dir, top=repo.refs_dir)


def set_ref_link(
    refs_dir: Path, name: str, target_name: str, *, tmp_dir: Path, top: Path, what: str = "ref"
) -> None:
    """Make ``refs_dir/<name>`` a link to ``target_name`` beside ``refs_dir``
    (``../`` per level: an image ref to its image, a stream ref to its stream),
    replacing a link to something else, and make it durable up to ``top``. The
    caller has checked ``name``. :class:`InvalidNameError` if a part of its path
    is a ref or it is a directory of refs."""
    link = refs_dir / name
    parent = link.parent
    try:
        make_dirs(parent, 0o755)
    except (FileExistsError, NotADirectoryError) as exc:
        raise InvalidNameError(
            f"{what} {name!r} cannot be created: a part of its path is a ref itself"
        ) from exc
    target = ref_target(name, target_name)
    try:
        # As composefs-rs's replace_symlinkat: a new ref is made in place, and only
        # a ref to something else goes through a temporary (in ``tmp_dir``, where a
        # writer killed between the two steps leaves it: images/ for an image ref,
        # where it is no image and cfsctl gc cannot read its target).
        try:
            os.symlink(target, link)
        except FileExistsError:
            if _readlink_or_none(link) != target:
                replace_symlink(target, link, tmp_dir)
    except OSError as exc:
        # Leave no empty directory behind that mkdir above made for this ref.
        _prune_empty_dirs(parent, refs_dir)
        if isinstance(exc, IsADirectoryError) or exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise InvalidNameError(f"{what} {name!r} is a directory of refs") from exc
        raise
    for directory in (parent, *parent.parents):
        fsync_dir(directory)
        if directory == top:
            break


# -- creating -------------------------------------------------------------------------------


def _import(
    repo: Repository,
    store: ObjectStore,
    tree: SourceTree,
    options: CreateOptions,
    lock: RepoLock,
    throttle: Throttle,
    added: Added,
    cache: DigestCache | None,
) -> list[ImportResult]:
    tasks = tree.imports
    count = len(tasks)
    # Byte counts only for progress reports: summing 100,000 sizes twice is not free.
    total = sum(t.size for t in tasks if not t.inline) if throttle.active else 0
    throttle("import", 0, total, f"0/{count} files", force=True)
    hits: dict[int, ImportResult] = {}
    todo = tasks
    if cache is not None:
        with gc_paused():
            hits, todo = cache.resolve(store, tasks)
    hit_bytes = sum(tasks[i].size for i in hits) if throttle.active else 0

    def report(files: int, nbytes: int) -> None:
        throttle("import", hit_bytes + nbytes, total, f"{len(hits) + files}/{count} files")

    config = ImportConfig(
        objects_dir=os.fspath(repo.objects_dir),
        algorithm=repo.hash_algorithm.value,
        policy=repo.verity.value,
        verity=store.state.verity,
        source_fd=tree.source_fd,
        display=tree.display,
        fsync_each=repo.fsync_each,
        hashing_copy=repo.hashing_copy,
        credentials=tree.credentials,
    )
    importer = Importer(
        config,
        threads=options.threads or default_threads(),
        pass_fds=(lock.fd,),
        progress=report if throttle.active else None,
    )
    try:
        fresh = iter(importer.run(todo))
    finally:
        added.objects.extend(importer.written)
    if not todo:
        return list(hits.values())  # every file a hit: in task order, as resolve made them
    return [hits[i] if i in hits else next(fresh) for i in range(len(tasks))]


def _apply(
    tree: SourceTree, results: list[ImportResult], algorithm: Algorithm, c_compatible: bool
) -> None:
    """Give the tree's files their contents or objects. composefs-rs's images carry
    every object's digest in the repository's algorithm; C's format only knows
    SHA-256 digests, so in C's image a SHA-512 repository's files carry none."""
    sha256 = algorithm is Algorithm.SHA256
    set_digests = tree.set_digests or not c_compatible
    for node, result in zip(tree.nodes, results, strict=True):
        if result.content is not None:
            node.set_content(result.content)
            continue
        assert result.digest is not None
        node.payload = object_payload(result.digest)
        if set_digests:
            node.digest = result.digest if sha256 or not c_compatible else None
        elif not sha256:
            node.digest = None


def _transform(repo: Repository, tree: SourceTree, transform: Transform) -> None:
    """Apply composefs-rs's transforms to the imported tree; the bootable transform
    reads the tree's SELinux policy files, from their objects."""
    if transform.is_identity:
        return

    def read_content(node: Node) -> bytes:
        if node.content is not None or not node.payload:
            return node.content or b""
        path = repo.objects_dir / os.fsdecode(node.payload)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise RepositoryError(
                f"cannot read object {os.fsdecode(node.payload)}: {os_error_text(exc)}",
                errno=exc.errno,
            ) from exc

    try:
        with gc_paused():
            apply_transform(tree.root, transform, read_content)
    except TransformError as exc:
        raise SourceError(f"{os.fsdecode(tree.display)}: {exc}") from exc


def _finish(
    repo: Repository,
    store: ObjectStore,
    root: Node,
    tasks: list[ImportTask],
    results: list[ImportResult],
    options: CreateOptions,
    ref: str | None,
    files: int,
    entries: int,
    throttle: Throttle,
    added: Added,
    reused: list[tuple[ErofsVersion, ObjectResult]] | None = None,
) -> tuple[CreateResult, list[tuple[ErofsVersion, ObjectResult]]]:
    """Write the images (unless ``reused``: those of an earlier import from the same
    inputs, checked), make the new objects durable and publish the images."""
    throttle("image", 0, None, force=True)
    stored: list[tuple[ErofsVersion, ObjectResult]] = []
    if reused is not None:
        stored = reused
    else:
        try:
            with gc_paused():
                images = _write_images(repo, root, options)
        except OSError as exc:
            raise SourceError(
                f"cannot build the image: {os_error_text(exc)}", errno=exc.errno
            ) from exc
        for version, data in images:
            stored_image = store.store_bytes(data)
            if stored_image.written:
                added.objects.append(stored_image.digest)
            stored.append((version, stored_image))
    image_result = stored[0][1]
    written: dict[bytes, int] = {}
    present: set[bytes] = set()
    bytes_total = 0
    verity = image_result.verity
    for task, result in zip(tasks, results, strict=True):
        if task.inline or result.digest is None:
            continue
        bytes_total += task.size
        present.add(result.digest)
        verity = verity and result.verity
        if result.written:
            written[result.digest] = task.size
    rels = [object_relpath(d.hex()) for d in written]
    rels += [object_relpath(r.digest) for _v, r in stored if r.written]
    throttle("sync", 0, len(rels), force=True)
    try:
        sync_objects(repo.objects_dir, rels)
    except OSError as exc:
        raise RepositoryError(
            f"cannot make the new objects durable: {os_error_text(exc)}", errno=exc.errno
        ) from exc
    throttle("publish", 0, None, force=True)
    hexdigest = image_result.digest
    try:
        # The extra formats' images first: a published ref never names an image
        # whose siblings are still missing.
        for _version, stored_image in reversed(stored):
            if link_image(repo, stored_image.digest):
                added.image_links.append(stored_image.digest)
        if ref is not None:
            _set_ref(repo, ref, hexdigest)
    except OSError as exc:
        raise RepositoryError(
            f"cannot publish image {hexdigest}: {os_error_text(exc)}", errno=exc.errno
        ) from exc
    created = CreateResult(
        digest=hexdigest,
        ref=ref,
        files=files,
        objects_written=len(written),
        objects_reused=len(present) - len(written),
        bytes_written=sum(written.values()),
        bytes_total=bytes_total,
        verity_enabled=verity,
        image_written=image_result.written,
        image_size=image_result.size,
        entries=entries,
        erofs_version=stored[0][0],
        extra_images={v: r.digest for v, r in stored[1:]},
    )
    return created, stored


def _write_images(
    repo: Repository, root: Node, options: CreateOptions
) -> list[tuple[ErofsVersion, bytes]]:
    """The images CreateImage writes (:class:`CreateOptions`), the named one first."""
    if options.min_version is not None or options.max_version is not None:
        lo = 0 if options.min_version is None else options.min_version
        hi = 1 if options.max_version is None else options.max_version
        data = write_image(root, min_version=lo, max_version=hi)
        return [(image_version(data), data)]
    if options.erofs_version is not None:
        versions = [options.erofs_version]
    else:
        versions = list(repo.formats.versions())
    return [(version, write_format(root, version)) for version in versions]


_SOURCE_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OBJECT_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def scan_options(options: CreateOptions) -> ScanOptions:
    """What of ``options`` the scan of a source directory needs."""
    return ScanOptions(
        use_epoch=options.use_epoch,
        skip_devices=options.skip_devices,
        skip_xattrs=options.skip_xattrs,
        user_xattrs=options.user_xattrs,
        preserve_hardlinks=options.preserve_hardlinks,
        style=ReadStyle.C if options.c_compatible else ReadStyle.COMPOSEFS_RS,
    )


def open_source_directory(
    source: str | os.PathLike[str] | bytes | int, display: bytes | None = None
) -> tuple[int, bytes]:
    """Open a CreateImage source: a directory path (a symlink to one is followed), or
    an open directory fd (``O_PATH`` will do; reopened, not consumed). Returns the
    new fd (the caller closes it) and the source's name for messages: ``display``,
    else the path."""
    if isinstance(source, int):
        display = display or b"<source directory fd>"
        try:
            return os.open(".", _SOURCE_FLAGS, dir_fd=source), display
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                raise SourceError(
                    "the source file descriptor is not a directory", errno=errno.ENOTDIR
                ) from exc
            raise SourceError(
                f"cannot open the source directory: {os_error_text(exc)}", errno=exc.errno
            ) from exc
    src = os.fsencode(source)
    try:
        return os.open(src, _SOURCE_FLAGS), display or src
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise SourceError(
                f"source {os.fsdecode(src)} is not a directory", errno=errno.ENOTDIR
            ) from exc
        what = "does not exist" if exc.errno == errno.ENOENT else os_error_text(exc)
        raise SourceError(f"source {os.fsdecode(src)}: {what}", errno=exc.errno) from exc


def scan_source_directory(
    fd: int,
    display: bytes,
    options: ScanOptions,
    progress: ProgressCallback | None = None,
    *,
    max_entries: int | None = None,
    fingerprint: bool = False,
    known_bare: Container[BareKey] | None = None,
    split: ScanSplit | None = None,
) -> SourceScan:
    """Walk the source directory open at ``fd`` as CreateImage does (``scan``
    progress, ``options`` from :func:`scan_options`), with this process's rights;
    scan errors become :class:`SourceError`. ``fingerprint`` and ``known_bare``:
    see :func:`~composefsd.sources.directory.scan_source`."""
    throttle = Throttle(progress)

    def scan_progress(p: ScanProgress) -> None:
        throttle("scan", p.entries, None)

    throttle("scan", 0, None, force=True)
    try:
        with gc_paused():
            scan = scan_source(
                fd,
                display,
                options,
                scan_progress if throttle.active else None,
                max_entries=max_entries,
                fingerprint=fingerprint,
                known_bare=known_bare,
                split=split,
            )
    except ScanError as exc:
        raise SourceError(str(exc), errno=exc.errno) from exc
    throttle("scan", scan.entries, scan.entries, force=True)
    return scan


def create_from_directory(
    repo: Repository,
    source: str | os.PathLike[str] | int,
    options: CreateOptions,
    ref: str | None,
    progress: ProgressCallback | None,
    display: bytes | None = None,
) -> CreateResult:
    """CreateImage from a directory path or an open directory fd, read with this
    process's rights (module notes); ``display`` names the source in messages."""
    ref_name = normalize_ref(ref) if ref is not None else None
    fd, display = open_source_directory(source, display)
    added = Added()
    try:
        repo.ensure_writable()
        # The collector paused throughout: a re-import builds a million objects
        # without cycles (the tree, the import list, the cache's rows), and each
        # resumption between its steps walked all of them again (0.5 s of 2.6 on
        # /usr). _directory_image's locals are gone by the time it resumes.
        with _creating(repo, added) as (lock, store), gc_paused():
            return _directory_image(
                repo,
                store,
                lock,
                fd,
                display,
                options,
                ref_name,
                progress,
                added,
                use_cache=options.digest_cache and not isinstance(source, int),
            )
    finally:
        os.close(fd)


def _directory_image(
    repo: Repository,
    store: ObjectStore,
    lock: RepoLock,
    fd: int,
    display: bytes,
    options: CreateOptions,
    ref: str | None,
    progress: ProgressCallback | None,
    added: Added,
    *,
    use_cache: bool,
) -> CreateResult:
    """:func:`create_from_directory` under its lock: scan, import, write, publish."""
    cache = DigestCache.open(repo.cache_dir, display, repo.hash_algorithm) if use_cache else None
    try:
        known_bare = None
        split = None
        if cache is not None:
            # The objects the cache names are looked up while the tree is scanned, and
            # a tree imported before has its walk shared with a worker.
            cache.look_up_objects(store)
            known_bare = cache.known_bare()
            split = cache.scan_split()
        scan = scan_source_directory(
            fd,
            display,
            scan_options(options),
            progress,
            fingerprint=cache is not None,
            known_bare=known_bare,
            split=split,
        )
        tree = source_tree(scan, fd, display)
        return _create(repo, store, lock, tree, options, ref, progress, cache, added, scan.bare)
    finally:
        if cache is not None:
            cache.close()


def create_from_scan(
    repo: Repository,
    tree: SourceTree,
    options: CreateOptions,
    ref: str | None,
    progress: ProgressCallback | None,
) -> CreateResult:
    """CreateImage from a tree scanned already (a directory's
    :class:`~composefsd.sources.base.SourceTree`); its files are opened with
    ``tree.credentials``'s rights. No digest cache is used: it
    would skip opening files, and opening them is what proves the rights."""
    ref_name = normalize_ref(ref) if ref is not None else None
    repo.ensure_writable()
    added = Added()
    with _creating(repo, added) as (lock, store):
        return _create(repo, store, lock, tree, options, ref_name, progress, None, added)


@contextmanager
def _creating(repo: Repository, added: Added) -> Iterator[tuple[RepoLock, ObjectStore]]:
    """The frame of every CreateImage: undone on failure (:func:`_undone_on_failure`),
    under the writer lock, with the object store and its fs-verity probed (under the
    required policy an unsupported filesystem fails here, before any work)."""
    with (
        _undone_on_failure(repo, added),
        writer_lock(repo.path) as lock,
        repo.object_store() as store,
    ):
        store.probe_verity()
        yield lock, store


@contextmanager
def _undone_on_failure(repo: Repository, added: Added) -> Iterator[None]:
    """A CreateImage that fails leaves nothing it alone added: the image link and the
    objects it made (``added``, filled meanwhile) are removed unless someone came to
    depend on them (:func:`composefsd.repository.gc.discard_added`). Entered before
    the repository lock is taken, so that the removal runs after it was let go.
    When other operations hold the repository, what it added stays for the next
    GC, and an error of ours says so."""
    from composefsd.repository.gc import discard_added

    since = time.time()
    try:
        yield
    except BaseException as exc:
        if not added.objects and not added.image_links:
            raise
        try:
            # One link per call: each goes unless a ref names its image.
            for link in added.image_links[1:]:
                discard_added(repo, (), since, link)
            first = added.image_links[0] if added.image_links else None
            removed = discard_added(repo, added.objects, since, first)
        except (RepositoryError, OSError) as cleanup:
            why = (
                "other operations are using the repository"
                if isinstance(cleanup, RepositoryBusyError)
                else str(cleanup)
            )
            note = (
                f"the {len(set(added.objects))} objects it wrote are left for the next "
                f"garbage collection ({why})"
            )
            log.warning("failed CreateImage in %s: %s", repo.path, note)
            if isinstance(exc, RepositoryError):
                raise type(exc)(f"{exc.message}; {note}", errno=exc.errno) from exc
            raise
        log.info("failed CreateImage in %s: removed the %d objects it wrote", repo.path, removed)
        raise


def _create(
    repo: Repository,
    store: ObjectStore,
    lock: RepoLock,
    tree: SourceTree,
    options: CreateOptions,
    ref: str | None,
    progress: ProgressCallback | None,
    cache: DigestCache | None,
    added: Added,
    bare: Sequence[BareKey] = (),
) -> CreateResult:
    """The part of CreateImage every source shares: import the tree's files, write
    the image, publish it (under ``lock``, undone on failure through ``added``).
    ``cache`` (a directory's) also keeps the inodes its scan found ``bare``."""
    throttle = Throttle(progress)
    results = _import(repo, store, tree, options, lock, throttle, added, cache)
    image_key = b""
    reused: list[tuple[ErofsVersion, ObjectResult]] | None = None
    if cache is not None and tree.fingerprint is not None:
        with gc_paused():
            image_key = cache.image_key(tree.fingerprint, _image_settings(repo, options), results)
        reused = _reuse_images(store, repo.hash_algorithm, cache.images_for(image_key))
    if reused is None:
        _apply(tree, results, repo.hash_algorithm, options.c_compatible)
        _transform(repo, tree, options.transform)
    created, stored = _finish(
        repo,
        store,
        tree.root,
        tree.imports,
        results,
        options,
        ref,
        tree.files,
        tree.entries,
        throttle,
        added,
        reused,
    )
    if cache is not None:
        images = [(int(version), r.digest, r.size) for version, r in stored]
        with gc_paused():
            cache.save(tree.imports, results, image_key, images, bare)
    return created


def _image_settings(repo: Repository, options: CreateOptions) -> bytes:
    """What besides the tree shapes CreateImage's images: part of their
    :meth:`~composefsd.repository.digestcache.DigestCache.image_key`."""
    from composefsd import __version__

    return repr((__version__, repo.hash_algorithm, repo.formats, options)).encode()


def _reuse_images(
    store: ObjectStore, algorithm: Algorithm, images: Sequence[tuple[int, str, int]]
) -> list[tuple[ErofsVersion, ObjectResult]] | None:
    """The images an earlier import made from the same inputs, if every one is still
    in the store, whole: its size, and its digest measured by the kernel or hashed
    here (an image is a few MB, hashed in milliseconds). None: write them anew."""
    if not images:
        return None
    out: list[tuple[ErofsVersion, ObjectResult]] = []
    for version, hexdigest, size in images:
        digest = bytes.fromhex(hexdigest)
        found = store.existing(digest, size)
        if not isinstance(found, ObjectResult):
            return None
        if not found.verity:
            try:
                fd = os.open(store.rel(digest), _OBJECT_FLAGS, dir_fd=store.dir_fd)
            except OSError:
                return None
            try:
                if digest_fd(fd, algorithm) != digest:
                    return None
            finally:
                os.close(fd)
        try:
            out.append((ErofsVersion(version), found))
        except ValueError:
            return None
    return out


def create_from_dumpfile(
    repo: Repository,
    dumpfile: str | os.PathLike[str] | bytes,
    objects_dir: str | os.PathLike[str],
    options: CreateOptions,
    ref: str | None,
    progress: ProgressCallback | None,
) -> CreateResult:
    """CreateImage from a dumpfile (bytes, or the path of one) whose external files
    live in ``objects_dir`` under their payload paths. The images are written in
    the repository's formats (a version range: what C ``mkcomposefs --from-file``
    makes of the dumpfile), except that payloads name the repository's objects
    (identical for canonical ``XX/rest`` payloads). Digests the dumpfile gives
    are checked against the objects' content. The scan options of ``options`` do
    not apply; the formats, transforms and threads do."""
    ref_name = normalize_ref(ref) if ref is not None else None
    if isinstance(dumpfile, bytes):
        data = dumpfile
    else:
        try:
            data = Path(dumpfile).read_bytes()
        except OSError as exc:
            raise SourceError(
                f"cannot read dumpfile {os.fspath(dumpfile)}: {os_error_text(exc)}",
                errno=exc.errno,
            ) from exc
    objdir = os.fsencode(objects_dir)
    try:
        objects_fd = os.open(objdir, _SOURCE_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise SourceError(
                f"objects directory {os.fsdecode(objdir)} is not a directory", errno=errno.ENOTDIR
            ) from exc
        raise SourceError(
            f"objects directory {os.fsdecode(objdir)}: {os_error_text(exc)}", errno=exc.errno
        ) from exc
    try:
        try:
            tree = dumpfile_tree(data, objects_fd, objdir, repo.hash_algorithm)
        except SourceTreeError as exc:
            raise SourceError(exc.message, errno=exc.errno) from exc
        repo.ensure_writable()
        added = Added()
        with _creating(repo, added) as (lock, store):
            return _create(repo, store, lock, tree, options, ref_name, progress, None, added)
    finally:
        os.close(objects_fd)


# -- listing and removal --------------------------------------------------------------------


def image_link_names(repo: Repository) -> list[str]:
    """The names of ``images/`` that are symlinks named by a digest, sorted: every
    image link, including those :func:`list_images` leaves out (dangling, or not
    leading to their object), which Verify and fsck report."""
    try:
        with os.scandir(repo.images_dir) as it:
            return sorted(
                e.name for e in it if is_hex_digest(e.name, repo.hash_algorithm) and e.is_symlink()
            )
    except FileNotFoundError:
        return []


def list_images(repo: Repository) -> list[ImageEntry]:
    """Every image (``images/<hex>`` whose object exists), oldest first."""
    with reader_lock(repo.path):
        refs = refs_by_image(repo)
        out: list[ImageEntry] = []
        try:
            entries = list(os.scandir(repo.images_dir))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not is_hex_digest(entry.name, repo.hash_algorithm) or not entry.is_symlink():
                continue
            # Only a link to its own object is an image; its size is the object's,
            # looked up there (a link leading elsewhere is not followed).
            if not _linked_image_object(repo, Path(entry.path), entry.name):
                continue
            try:
                size = os.stat(repo.object_path(entry.name), follow_symlinks=False).st_size
                created = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            out.append(ImageEntry(entry.name, size, sorted(refs.get(entry.name, [])), created))
    out.sort(key=lambda e: (e.created, e.digest))
    return out


def _linked_image_object(repo: Repository, link: Path, digest: str) -> bool:
    """Whether ``link`` (``images/<digest>``) is a link to its object exactly as
    ``object_link_target`` writes it, the only links whose object is opened."""
    try:
        target = os.readlink(link)
    except OSError:
        return False
    return object_link_digest(target, repo.hash_algorithm) == digest


def open_image_object(repo: Repository, digest: str) -> int:
    """A read-only fd on the image ``digest``'s object, for reading or mounting it.

    ``images/<digest>`` must be a link to ``../objects/XX/rest`` of that digest
    (else :class:`CorruptObjectError`): the object is then opened below
    ``objects/`` by its digest, never through the link, so that a link planted to
    lead outside the repository is never followed by the daemon.
    :class:`ImageNotFoundError` when there is no link or no object."""
    link = repo.images_dir / digest
    if not _linked_image_object(repo, link, digest):
        if not os.path.lexists(link):
            raise ImageNotFoundError(f"no image {digest} in {repo.path}")
        raise CorruptObjectError(
            f"{link} is not a link to its object ../objects/{object_relpath(digest)}; not followed"
        )
    try:
        objects_fd = open_objects_dir(repo.objects_dir)
    except OSError as exc:
        raise RepositoryError(
            f"cannot open {repo.objects_dir}: {os_error_text(exc)}", errno=exc.errno
        ) from exc
    try:
        return open_object(objects_fd, digest)
    except FileNotFoundError:
        raise ImageNotFoundError(f"image {digest}: its object is missing") from None
    except NotRegularObjectError:
        raise CorruptObjectError(f"image {digest}: its object is not a regular file") from None
    except OSError as exc:
        raise RepositoryError(
            f"cannot open image {digest}: {os_error_text(exc)}", errno=exc.errno
        ) from exc
    finally:
        os.close(objects_fd)


def describe_image(repo: Repository, name: str) -> ImageDetails:
    with reader_lock(repo.path):
        digest = resolve_image(repo, name)
        link = repo.images_dir / digest
        fd = open_image_object(repo, digest)
        try:
            st = os.fstat(fd)
            try:
                verity = measure_verity(fd, repo.hash_algorithm) == bytes.fromhex(digest)
            except VerityError:
                verity = False
            if st.st_size == 0:
                raise CorruptObjectError(f"image {digest} is empty")
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as buf, gc_paused():
                try:
                    info = read_image(buf, c_quirks=False)
                except ImageFormatError as exc:
                    raise CorruptObjectError(f"image {digest} does not parse: {exc}") from exc
                objects: dict[bytes, int] = {}
                entries = 0
                for _path, node in info.root.walk():
                    entries += 1
                    if node.mode & _S_IFMT == _S_IFREG and node.payload is not None:
                        objects[node.payload] = node.size
                count = len(objects)
        finally:
            os.close(fd)
        created = os.lstat(link).st_mtime
        refs = sorted(refs_by_image(repo).get(digest, []))
    return ImageDetails(
        digest=digest,
        size=st.st_size,
        object_count=count,
        created=created,
        refs=refs,
        composefs_version=info.composefs_version,
        objects_size=sum(objects.values()),
        verity=verity,
        entries=entries,
    )


def prune_all_empty_ref_dirs(repo: Repository) -> int:
    """Remove every empty directory below ``images/refs`` (deepest first, so that a
    directory emptied by its children's removal goes too); returns how many."""
    removed = 0
    for dirpath, _dirnames, _files in os.walk(repo.refs_dir, topdown=False):
        if Path(dirpath) == repo.refs_dir:
            continue
        try:
            os.rmdir(dirpath)
            removed += 1
        except OSError:
            pass
    return removed


def prune_empty_ref_dirs(repo: Repository, directory: Path) -> None:
    """Remove ``directory`` and its parents up to ``images/refs`` while they are empty."""
    _prune_empty_dirs(directory, repo.refs_dir)


def _prune_empty_dirs(directory: Path, top: Path) -> None:
    while directory != top and top in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def remove_ref(repo: Repository, name: str) -> None:
    """Remove the ref ``images/refs/<name>``. Never refused for the sake of streams or
    mounts: the image stays until GC, and GC keeps every image a stream ref needs
    and every mounted one (:mod:`composefsd.repository.gc`)."""
    ref = normalize_ref(name)
    repo.ensure_writable()
    link = repo.refs_dir / ref
    with writer_lock(repo.path):
        try:
            st = os.lstat(link)
        except FileNotFoundError:
            raise ImageNotFoundError(f"no ref {ref!r} in {repo.path}") from None
        if not stat.S_ISLNK(st.st_mode):
            raise ImageNotFoundError(f"{ref!r} is a directory of refs, not a ref")
        os.unlink(link)
        prune_empty_ref_dirs(repo, link.parent)
        fsync_dir(link.parent if link.parent.exists() else repo.refs_dir)


def remove_image(repo: Repository, name: str) -> list[str]:
    """Remove an image's link and every ref to it; returns the refs removed. Its
    objects stay until GC.

    Refused (:class:`ImageReferencedError`, nothing removed) while a composefs-rs
    stream ref needs the image: an OCI tag's config stream names its EROFS image,
    which composefs-rs opens through ``images/<hex>`` to mount it; and when a
    stream cannot be followed (:class:`CorruptRepositoryError`), since whether it
    needs the image is unknown. (Mounts are the caller's to check: the service
    knows them.)"""
    from composefsd.repository.gc import stream_needs

    repo.ensure_writable()
    with writer_lock(repo.path):
        digest = resolve_image(repo, name)
        needed_by = stream_needs(repo, digest)
        if needed_by:
            shown = ", ".join(f"streams/refs/{r}" for r in needed_by)
            raise ImageReferencedError(
                f"image {digest} is needed by composefs-rs stream refs ({shown}); "
                f"remove those first (cfsctl oci untag)",
                image=digest,
                refs=needed_by,
            )
        removed: list[str] = []
        for ref, path, target in list(iter_refs(repo)):
            if target == digest:
                os.unlink(path)
                prune_empty_ref_dirs(repo, path.parent)
                removed.append(ref)
        os.unlink(repo.images_dir / digest)
        fsync_dir(repo.images_dir)
        if removed:
            fsync_dir(repo.refs_dir)
    return removed
