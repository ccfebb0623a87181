"""Images: CreateImage, the ``images/`` and ``images/refs/`` links, listing, removal.

Layout (composefs-rs's, reference notes section 1.1)::

    images/<hex>          -> ../objects/XX/<rest>        the image file is an object
    images/refs/<name>    -> ../<hex>                     (../../<hex> for a/b, ...)

All links are relative symlinks. An image is visible once ``images/<hex>``
exists; CreateImage makes the objects and the image durable first (fsync of
everything it wrote, see :func:`composefsd.repository.objects.sync_objects`),
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

CreateImage from a directory (:func:`create_from_directory`) gives the image C
``mkcomposefs --digest-store`` gives for the same tree and options, and the same
objects: the tree is scanned by :func:`composefsd.scanner.scan_directory`
without digests, then every regular file is hashed with the repository's
algorithm and published if new by an :class:`~composefsd.repository.objects.Importer`
(worker processes for large trees), files of 64 bytes or less are inlined, and
:func:`composefsd.image.writer.write_image` writes the image.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from composefsd.fsverity import Algorithm, VerityError, measure_verity
from composefsd.image.dump_parse import DumpfileError, parse_dumpfile
from composefsd.image.reader import ImageFormatError, read_image
from composefsd.image.tree import RECOMMENDED_INLINE_CONTENT_MAX, Node, gc_paused
from composefsd.image.writer import write_image
from composefsd.repository.errors import (
    ImageNotFoundError,
    InvalidNameError,
    RepositoryError,
    SourceError,
    os_error_text,
)
from composefsd.repository.locking import RepoLock, reader_lock, writer_lock
from composefsd.repository.objects import (
    DigestCache,
    ImportConfig,
    Importer,
    ImportResult,
    ImportTask,
    ObjectResult,
    ObjectStore,
    object_relpath,
    random_name,
    sync_objects,
)
from composefsd.repository.progress import ProgressCallback, Throttle
from composefsd.scanner import ScanError, ScanOptions, ScanProgress, default_threads, scan_directory

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
    "describe_image",
    "is_hex_digest",
    "iter_refs",
    "list_images",
    "normalize_ref",
    "prune_empty_ref_dirs",
    "ref_target",
    "remove_image",
    "remove_ref",
    "resolve_image",
]

log = logging.getLogger(__name__)

SYMLINK_TMP_PREFIX = ".symlink-"
_HEX = frozenset("0123456789abcdef")
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
    """CreateImage options; the first six mirror C mkcomposefs's."""

    use_epoch: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    skip_devices: bool = False
    min_version: int = 0
    max_version: int = 1
    #: Paths of one inode become hardlinks in the image (C does not do this).
    preserve_hardlinks: bool = False
    #: Hashing and copying lanes; None: one per CPU this process may run on.
    threads: int | None = None
    #: Reuse digests of unchanged files from the previous import of the same tree
    #: (:class:`~composefsd.repository.objects.DigestCache`).
    digest_cache: bool = True

    def __post_init__(self) -> None:
        if self.skip_xattrs and self.user_xattrs:
            raise ValueError("skip_xattrs and user_xattrs exclude each other")
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


def is_hex_digest(name: str, algorithm: Algorithm) -> bool:
    return len(name) == 2 * algorithm.digest_size and _HEX.issuperset(name)


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
    return "../objects/" + object_relpath(hexdigest)


def _target_digest(target: str, algorithm: Algorithm) -> str | None:
    """The image a ref link names: its last component, if that is a digest (as in
    composefs-rs, which takes the target's basename)."""
    base = target.rstrip("/").rsplit("/", 1)[-1]
    return base if is_hex_digest(base, algorithm) else None


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_symlink(target: str, link: Path, tmp_dir: Path) -> None:
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


def _link_image(repo: Repository, hexdigest: str) -> None:
    target = _image_target(hexdigest)
    link = repo.images_dir / hexdigest
    try:
        os.symlink(target, link)
    except FileExistsError:
        try:
            current = os.readlink(link)
        except OSError:
            current = None
        if current != target:
            _replace_symlink(target, link, repo.images_dir)
    _fsync_dir(repo.images_dir)


def _set_ref(repo: Repository, ref: str, hexdigest: str) -> None:
    link = repo.refs_dir / ref
    parent = link.parent
    try:
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise InvalidNameError(
            f"ref {ref!r} cannot be created: a part of its path is a ref itself"
        ) from exc
    try:
        _replace_symlink(ref_target(ref, hexdigest), link, repo.images_dir)
    except IsADirectoryError as exc:
        raise InvalidNameError(f"ref {ref!r} is a directory of refs") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise InvalidNameError(f"ref {ref!r} is a directory of refs") from exc
        raise
    for directory in (parent, *parent.parents):
        _fsync_dir(directory)
        if directory == repo.refs_dir:
            break


# -- creating -------------------------------------------------------------------------------


def _collect_directory(root: Node, src: bytes) -> tuple[list[ImportTask], list[Node], int, int]:
    """Import tasks for every regular file (not hardlink entries) with data."""
    tasks: list[ImportTask] = []
    nodes: list[Node] = []
    files = entries = 0
    stack: list[tuple[bytes, Node]] = [(src, root)]
    while stack:
        path, node = stack.pop()
        entries += 1
        if node.link_to is not None:
            continue
        children = node.children
        if children is not None:
            sep = b"" if path.endswith(b"/") else b"/"
            stack.extend((path + sep + name, child) for name, child in children.items())
        elif node.mode & _S_IFMT == _S_IFREG:
            files += 1
            if node.size > 0:
                inline = node.size <= RECOMMENDED_INLINE_CONTENT_MAX
                tasks.append(ImportTask(path, node.size, None, inline))
                nodes.append(node)
    return tasks, nodes, files, entries


def _check_payload(payload: bytes) -> None:
    parts = payload.split(b"/")
    if payload.startswith(b"/") or any(p in (b"", b".", b"..") for p in parts):
        raise SourceError(
            f"object path {os.fsdecode(payload)!r} in the dumpfile is not a plain relative path"
        )


def _collect_dumpfile(
    root: Node, objects_dir: bytes, algorithm: Algorithm
) -> tuple[list[ImportTask], list[Node], int, int]:
    tasks: list[ImportTask] = []
    nodes: list[Node] = []
    files = 0
    walked = root.walk()
    base = objects_dir.rstrip(b"/") + b"/"
    for _path, node in walked:
        if node.link_to is not None or node.mode & _S_IFMT != _S_IFREG:
            continue
        files += 1
        if node.size == 0 or node.content is not None or node.payload is None:
            continue
        _check_payload(node.payload)
        expected = node.digest if algorithm is Algorithm.SHA256 else None
        tasks.append(ImportTask(base + node.payload, node.size, expected, False))
        nodes.append(node)
    return tasks, nodes, files, len(walked)


def _import(
    repo: Repository,
    store: ObjectStore,
    tasks: list[ImportTask],
    options: CreateOptions,
    lock: RepoLock,
    throttle: Throttle,
    cache: DigestCache | None = None,
) -> list[ImportResult]:
    total = sum(t.size for t in tasks if not t.inline)
    count = len(tasks)
    throttle("import", 0, total, f"0/{count} files", force=True)
    hits: dict[int, ImportResult] = {}
    todo = tasks
    if cache is not None:
        hits, todo = cache.resolve(store, tasks)
    hit_bytes = sum(r.stat[2] for r in hits.values() if r.stat is not None)

    def report(files: int, nbytes: int) -> None:
        throttle("import", hit_bytes + nbytes, total, f"{len(hits) + files}/{count} files")

    config = ImportConfig(
        objects_dir=os.fspath(repo.objects_dir),
        algorithm=repo.hash_algorithm.value,
        policy=repo.verity.value,
        verity=store.state.verity,
        fsync_each=repo.fsync_each,
        hashing_copy=repo.hashing_copy,
    )
    importer = Importer(
        config,
        threads=options.threads or default_threads(),
        pass_fds=(lock.fd,),
        progress=report if throttle.active else None,
    )
    fresh = iter(importer.run(todo))
    return [hits[i] if i in hits else next(fresh) for i in range(len(tasks))]


def _apply(
    nodes: list[Node], results: list[ImportResult], algorithm: Algorithm, keep_digest: bool
) -> None:
    sha256 = algorithm is Algorithm.SHA256
    for node, result in zip(nodes, results, strict=True):
        if result.content is not None:
            node.set_content(result.content)
            continue
        assert result.digest is not None
        hexed = result.digest.hex().encode()
        node.payload = hexed[:2] + b"/" + hexed[2:]
        if not keep_digest:
            node.digest = result.digest if sha256 else None
        elif not sha256:
            node.digest = None


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
) -> CreateResult:
    throttle("image", 0, None, force=True)
    try:
        with gc_paused():
            image = write_image(
                root, min_version=options.min_version, max_version=options.max_version
            )
    except OSError as exc:
        raise SourceError(f"cannot build the image: {os_error_text(exc)}", errno=exc.errno) from exc
    image_result: ObjectResult = store.store_bytes(image)
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
    if image_result.written:
        rels.append(object_relpath(image_result.digest))
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
        _link_image(repo, hexdigest)
        if ref is not None:
            _set_ref(repo, ref, hexdigest)
    except OSError as exc:
        raise RepositoryError(
            f"cannot publish image {hexdigest}: {os_error_text(exc)}", errno=exc.errno
        ) from exc
    return CreateResult(
        digest=hexdigest,
        ref=ref,
        files=files,
        objects_written=len(written),
        objects_reused=len(present) - len(written),
        bytes_written=sum(written.values()),
        bytes_total=bytes_total,
        verity_enabled=verity,
        image_written=image_result.written,
        image_size=len(image),
        entries=entries,
    )


def create_from_directory(
    repo: Repository,
    source: str | os.PathLike[str],
    options: CreateOptions,
    ref: str | None,
    progress: ProgressCallback | None,
) -> CreateResult:
    ref_name = normalize_ref(ref) if ref is not None else None
    src = os.fsencode(source)
    try:
        st = os.stat(src)
    except OSError as exc:
        what = "does not exist" if exc.errno == errno.ENOENT else os_error_text(exc)
        raise SourceError(f"source {os.fsdecode(src)}: {what}", errno=exc.errno) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"source {os.fsdecode(src)} is not a directory", errno=errno.ENOTDIR)
    repo.ensure_writable()
    throttle = Throttle(progress)

    def scan_progress(p: ScanProgress) -> None:
        throttle("scan", p.entries, None)

    with writer_lock(repo.path) as lock, repo.object_store() as store:
        store.probe_verity()
        throttle("scan", 0, None, force=True)
        scan_options = ScanOptions(
            use_epoch=options.use_epoch,
            skip_devices=options.skip_devices,
            skip_xattrs=options.skip_xattrs,
            user_xattrs=options.user_xattrs,
            threads=1,
            compute_digests=False,
            inline_small=False,
            preserve_hardlinks=options.preserve_hardlinks,
        )
        try:
            with gc_paused():
                root = scan_directory(src, scan_options, scan_progress if throttle.active else None)
        except ScanError as exc:
            raise SourceError(str(exc), errno=exc.errno) from exc
        tasks, nodes, files, entries = _collect_directory(root, src)
        throttle("scan", entries, entries, force=True)
        cache = None
        if options.digest_cache:
            cache = DigestCache.open(repo.cache_dir, src, repo.hash_algorithm)
        results = _import(repo, store, tasks, options, lock, throttle, cache)
        if cache is not None:
            cache.save(tasks, results)
        _apply(nodes, results, repo.hash_algorithm, keep_digest=False)
        return _finish(
            repo, store, root, tasks, results, options, ref_name, files, entries, throttle
        )


def create_from_dumpfile(
    repo: Repository,
    dumpfile: str | os.PathLike[str] | bytes,
    objects_dir: str | os.PathLike[str],
    options: CreateOptions,
    ref: str | None,
    progress: ProgressCallback | None,
) -> CreateResult:
    """CreateImage from a dumpfile (bytes, or the path of one) whose external files
    live in ``objects_dir`` under their payload paths. The image is what C
    ``mkcomposefs --from-file`` makes of the dumpfile, except that payloads name
    the repository's objects (identical for canonical ``XX/rest`` payloads).
    Digests the dumpfile gives are checked against the objects' content.
    The scan options of ``options`` do not apply; the versions and threads do."""
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
        st = os.stat(objdir)
    except OSError as exc:
        raise SourceError(
            f"objects directory {os.fsdecode(objdir)}: {os_error_text(exc)}", errno=exc.errno
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(
            f"objects directory {os.fsdecode(objdir)} is not a directory", errno=errno.ENOTDIR
        )
    try:
        with gc_paused():
            root = parse_dumpfile(data)
    except DumpfileError as exc:
        raise SourceError(f"invalid dumpfile: {exc}", errno=errno.EINVAL) from exc
    tasks, nodes, files, entries = _collect_dumpfile(root, objdir, repo.hash_algorithm)
    repo.ensure_writable()
    throttle = Throttle(progress)
    with writer_lock(repo.path) as lock, repo.object_store() as store:
        store.probe_verity()
        results = _import(repo, store, tasks, options, lock, throttle)
        _apply(nodes, results, repo.hash_algorithm, keep_digest=True)
        return _finish(
            repo, store, root, tasks, results, options, ref_name, files, entries, throttle
        )


# -- listing and removal --------------------------------------------------------------------


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
            try:
                size = os.stat(entry.path).st_size
                created = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            out.append(ImageEntry(entry.name, size, sorted(refs.get(entry.name, [])), created))
    out.sort(key=lambda e: (e.created, e.digest))
    return out


def describe_image(repo: Repository, name: str) -> ImageDetails:
    with reader_lock(repo.path):
        digest = resolve_image(repo, name)
        link = repo.images_dir / digest
        try:
            fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ImageNotFoundError(f"image {digest}: its object is missing") from None
        try:
            st = os.fstat(fd)
            try:
                verity = measure_verity(fd, repo.hash_algorithm) == bytes.fromhex(digest)
            except VerityError:
                verity = False
            if st.st_size == 0:
                raise RepositoryError(f"image {digest} is empty")
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as buf, gc_paused():
                try:
                    info = read_image(buf)
                except ImageFormatError as exc:
                    raise RepositoryError(f"image {digest} does not parse: {exc}") from exc
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


def prune_empty_ref_dirs(repo: Repository, directory: Path) -> None:
    """Remove ``directory`` and its parents up to ``images/refs`` while they are empty."""
    while directory != repo.refs_dir and repo.refs_dir in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def remove_ref(repo: Repository, name: str) -> None:
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
        _fsync_dir(link.parent if link.parent.exists() else repo.refs_dir)


def remove_image(repo: Repository, name: str) -> list[str]:
    """Remove an image's link and every ref to it; returns the refs removed. Its
    objects stay until GC."""
    repo.ensure_writable()
    with writer_lock(repo.path):
        digest = resolve_image(repo, name)
        removed: list[str] = []
        for ref, path, target in list(iter_refs(repo)):
            if target == digest:
                os.unlink(path)
                prune_empty_ref_dirs(repo, path.parent)
                removed.append(ref)
        os.unlink(repo.images_dir / digest)
        _fsync_dir(repo.images_dir)
        if removed:
            _fsync_dir(repo.refs_dir)
    return removed
