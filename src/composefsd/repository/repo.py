"""The :class:`Repository`: init, open, and every operation on a repository.

A ``Repository`` is a light handle: a path plus what ``meta.json`` says. It keeps
no file descriptors open between calls, so it can be shared by threads and
survives ``fork``; every operation takes the lock it needs for its duration
(:mod:`composefsd.repository.locking`). Operations that write raise
:class:`~composefsd.repository.errors.ReadOnlyRepositoryError` on a repository
that is read-only (filesystem mounted read-only, no write permission, or an
unknown read-only-compatible feature flag).

Default location (as composefs-rs): ``$COMPOSEFSD_REPOSITORY`` if set, else
``/sysroot/composefs`` for root and ``~/.var/lib/composefs`` for other users.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from composefsd.dirs import make_dir, make_dirs
from composefsd.image.formats import ErofsVersion
from composefsd.kernel.verity import (
    Algorithm,
    VerityAlgorithmMismatchError,
    VerityError,
    VerityUnsupportedError,
    enable_verity,
    measure_verity,
)
from composefsd.objectlayout import is_hex, object_relpath
from composefsd.repository.errors import (
    CorruptRepositoryError,
    InvalidNameError,
    NotARepositoryError,
    ReadOnlyRepositoryError,
    RepositoryError,
    VerityRequiredError,
    os_error_text,
)
from composefsd.repository.images import (
    CreateOptions,
    CreateResult,
    ImageDetails,
    ImageEntry,
    create_from_directory,
    create_from_dumpfile,
    create_from_scan,
    describe_image,
    list_images,
    remove_image,
    remove_ref,
    resolve_image,
)
from composefsd.repository.locking import reader_lock
from composefsd.repository.meta import (
    META_JSON,
    FormatConfig,
    RepoMetadata,
    VerityPolicy,
    parse_algorithm,
    parse_erofs_version,
)
from composefsd.repository.progress import ProgressCallback
from composefsd.repository.store import ObjectStore, PublishState, TmpFile
from composefsd.sources.base import SourceTree

if TYPE_CHECKING:
    from composefsd.repository.fsck import FsckReport
    from composefsd.repository.gc import GcResult
    from composefsd.repository.verify import VerifyReport

__all__ = ["ENV_REPOSITORY", "Repository", "default_path"]

log = logging.getLogger(__name__)

ENV_REPOSITORY = "COMPOSEFSD_REPOSITORY"
SYSTEM_PATH = Path("/sysroot/composefs")
USER_SUBDIR = Path(".var/lib/composefs")
_SKELETON = ("objects", "images", "images/refs")


def default_path() -> Path:
    """``$COMPOSEFSD_REPOSITORY``, else composefs-rs's default for this user."""
    env = os.environ.get(ENV_REPOSITORY)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_PATH
    home = os.environ.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir
    return Path(home) / USER_SUBDIR


def _meta_has_verity(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        measure_verity(fd)
        return True
    except VerityAlgorithmMismatchError:
        return True  # verity with another algorithm is still verity
    except VerityError:
        return False
    finally:
        os.close(fd)


def _is_empty_skeleton(path: Path) -> bool:
    """Only empty ``objects/``, ``images/``, ``images/refs/`` (what a killed init leaves)."""
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        if filenames:
            return False
        for d in dirnames:
            if os.path.normpath(os.path.join(rel, d)) not in _SKELETON:
                return False
    return True


class Repository:
    """A composefs repository (composefs-rs layout). Use :meth:`init` or :meth:`open`."""

    #: fsync every object before linking it (as C mkcomposefs) instead of all of
    #: them together before the image becomes visible.
    fsync_each: bool = False
    #: Import files by hashing while copying (one read) instead of hashing first
    #: and copying only new objects.
    hashing_copy: bool = False

    def __init__(
        self,
        path: Path,
        meta: RepoMetadata,
        *,
        meta_verity: bool,
        read_only_reason: str | None = None,
    ) -> None:
        self.path = path
        self.meta = meta
        self.hash_algorithm: Algorithm = meta.algorithm
        self.algorithm: str = meta.algorithm_name
        self.hash_name: str = meta.algorithm.value
        self.meta_verity = meta_verity
        self.verity: VerityPolicy = meta.policy(meta_verity)
        #: The formats CreateImage writes (``meta.json``'s ``erofs_formats``).
        self.formats: FormatConfig = meta.format_config()
        self.read_only_reason = read_only_reason

    def __repr__(self) -> str:
        return (
            f"Repository({str(self.path)!r}, {self.algorithm}, verity={self.verity.value}, "
            f"erofs=V{int(self.erofs_version)})"
        )

    @property
    def erofs_version(self) -> ErofsVersion:
        """The default format of the repository's images."""
        return self.formats.default

    # -- paths ------------------------------------------------------------------------------
    @property
    def objects_dir(self) -> Path:
        return self.path / "objects"

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    @property
    def refs_dir(self) -> Path:
        return self.path / "images" / "refs"

    @property
    def cache_dir(self) -> Path:
        """Our digest caches (composefs-rs ignores this directory)."""
        return self.path / "cache"

    def object_path(self, hexdigest: str) -> Path:
        if len(hexdigest) < 3 or not is_hex(hexdigest):
            raise InvalidNameError(f"not a hex digest: {hexdigest!r}")
        return self.objects_dir / object_relpath(hexdigest)

    def image_path(self, hexdigest: str) -> Path:
        if not is_hex(hexdigest):
            raise InvalidNameError(f"not a hex digest: {hexdigest!r}")
        return self.images_dir / hexdigest

    # -- init / open ------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        algorithm: str | Algorithm = "fsverity-sha256-12",
        verity: VerityPolicy | str = VerityPolicy.TRY,
        erofs_version: ErofsVersion | int | str | None = None,
        formats: FormatConfig | None = None,
    ) -> Repository:
        """Create a repository at ``path`` (parents included), or open it if it
        already is one with the same algorithm, policy and image formats.

        Images are written in ``erofs_version`` (default V1, as ``cfsctl init``),
        or in ``formats`` (a default and extra formats, as composefs-rs's
        ``RepositoryConfig`` allows); give one or neither. The formats are fixed for
        the repository's life: asking for others later is refused.

        An existing directory is only used if it is empty; anything else that is
        not a repository is refused. Under the required policy, fs-verity must work
        on the filesystem (it is enabled on ``meta.json``), else
        :class:`VerityRequiredError` and nothing is left behind.
        """
        alg = parse_algorithm(algorithm)
        try:
            policy = VerityPolicy(verity)
        except ValueError:
            raise InvalidNameError(
                f"unknown verity policy {verity!r} (expected required, try or disabled)"
            ) from None
        if formats is None:
            version = ErofsVersion.V1 if erofs_version is None else erofs_version
            formats = FormatConfig(parse_erofs_version(version))
        elif erofs_version is not None:
            raise InvalidNameError("give erofs_version or formats, not both")
        p = Path(os.path.abspath(path))
        created = False
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise NotARepositoryError(f"{p} exists and is not a directory")
            if os.path.lexists(p / META_JSON):
                repo = cls.open(p)
                if (
                    repo.hash_algorithm is not alg
                    or repo.verity is not policy
                    or repo.formats != formats
                ):
                    raise RepositoryError(
                        f"{p} is already a repository with {repo.algorithm}, verity "
                        f"{repo.verity.value} and images {_formats_text(repo.formats)}, not "
                        f"{alg.composefs_rs_name}, {policy.value} and {_formats_text(formats)}"
                    )
                return repo
            if not _is_empty_skeleton(p):
                raise NotARepositoryError(
                    f"{p} is not empty and not a composefs repository (no {META_JSON}); "
                    f"refusing to turn it into one"
                )
        else:
            try:
                make_dirs(p.parent, 0o755)
                make_dir(p, 0o700)
            except FileExistsError:
                return cls.init(p, algorithm=alg, verity=policy, formats=formats)
            except OSError as exc:
                raise RepositoryError(
                    f"cannot create repository {p}: {os_error_text(exc)}", errno=exc.errno
                ) from exc
            created = True
        try:
            _check_writable_fs(p)
            for sub in _SKELETON:
                make_dir(p / sub, 0o755, exist_ok=True)
            with ObjectStore(p / "objects", alg, policy) as store:
                store.probe_verity()
            meta = RepoMetadata.new(alg, policy, formats)
            _write_meta(p, meta, policy is VerityPolicy.REQUIRED)
        except FileExistsError:
            # Another process initialised it meanwhile: theirs stands, compare with it.
            return cls.init(p, algorithm=alg, verity=policy, formats=formats)
        except BaseException as exc:
            _undo_init(p, created)
            if isinstance(exc, OSError):
                raise RepositoryError(
                    f"cannot create repository {p}: {os_error_text(exc)}", errno=exc.errno
                ) from exc
            raise
        log.info(
            "created repository %s (%s, verity %s, images %s)",
            p,
            alg.composefs_rs_name,
            policy.value,
            _formats_text(formats),
        )
        return cls.open(p)

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> Repository:
        """Open the repository at ``path`` (None: :func:`default_path`).

        Raises :class:`NotARepositoryError` (missing, not a directory, no
        ``meta.json``), :class:`CorruptRepositoryError` (unreadable ``meta.json``),
        :class:`UnsupportedRepositoryError` (newer version, unknown algorithm or
        incompatible feature flag).
        """
        p = Path(os.path.abspath(path if path is not None else default_path()))
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise NotARepositoryError(
                f"repository {p} does not exist (create one with `composefsctl init`)",
                errno=errno.ENOENT,
            ) from None
        except OSError as exc:
            raise NotARepositoryError(
                f"cannot access repository {p}: {os_error_text(exc)}", errno=exc.errno
            ) from exc
        if not os.path.isdir(p):
            raise NotARepositoryError(f"{p} is not a directory", errno=errno.ENOTDIR)
        del st
        meta_path = p / META_JSON
        try:
            data = meta_path.read_bytes()
        except FileNotFoundError:
            if (p / "objects").is_dir():
                raise NotARepositoryError(
                    f"{p} has objects/ but no {META_JSON}: an old-format composefs-rs "
                    f"repository (open it once with cfsctl to upgrade it)"
                ) from None
            raise NotARepositoryError(
                f"{p} is not a composefs repository: it has no {META_JSON}"
            ) from None
        except OSError as exc:
            raise CorruptRepositoryError(
                f"cannot read {meta_path}: {os_error_text(exc)}", errno=exc.errno
            ) from exc
        meta = RepoMetadata.from_json(data, where=str(meta_path))
        reason = None
        unknown = meta.unknown_read_only_compatible()
        if unknown:
            reason = f"unknown read-only-compatible feature flag(s): {', '.join(unknown)}"
        else:
            reason = _write_problem(p)
        if reason is None:
            for sub in _SKELETON:
                try:
                    make_dir(p / sub, 0o755, exist_ok=True)
                except OSError:
                    pass
        return cls(p, meta, meta_verity=_meta_has_verity(meta_path), read_only_reason=reason)

    @classmethod
    def upgrade(
        cls, path: str | os.PathLike[str], *, algorithm: Algorithm | None = None
    ) -> Repository:
        """Give an old-format composefs-rs repository (``objects/`` but no
        ``meta.json``, written before composefs-rs had it) its ``meta.json`` in
        place, as composefs-rs's ``open_upgrade`` does, and open it: the algorithm
        is the one the length of its objects' names says, and ``meta.json`` gets
        fs-verity (the repository becomes "secure") if the first such object has
        it. Nothing else is touched. A repository that has ``meta.json`` already is
        just opened. :class:`NotARepositoryError` without ``objects/`` or without
        an object to infer the algorithm from; :class:`RepositoryError`, before
        anything is written, if ``algorithm`` is given and is not the inferred one."""
        p = Path(os.path.abspath(path))
        if not os.path.lexists(p / META_JSON):
            if not (p / "objects").is_dir() or (p / "objects").is_symlink():
                raise NotARepositoryError(f"{p} is not an old-format repository: no objects/")
            found = _infer_algorithm(p / "objects")
            if found is None:
                raise NotARepositoryError(
                    f"{p} has no objects: cannot infer the algorithm of an old-format repository"
                )
            alg, has_verity = found
            if algorithm is not None and alg is not algorithm:
                raise RepositoryError(
                    f"{p}: inferred algorithm {alg.composefs_rs_name} is not "
                    f"{algorithm.composefs_rs_name}"
                )
            _check_writable_fs(p)
            try:
                _write_meta(p, RepoMetadata.new(alg, VerityPolicy.TRY), has_verity)
            except FileExistsError:
                pass  # another process upgraded it meanwhile: open theirs
            else:
                log.info("upgraded old-format repository %s (%s)", p, alg.composefs_rs_name)
        return cls.open(p)

    # -- state ------------------------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return self.read_only_reason is not None or _write_problem(self.path) is not None

    def ensure_writable(self) -> None:
        reason = self.read_only_reason or _write_problem(self.path)
        if reason is not None:
            raise ReadOnlyRepositoryError(
                f"repository {self.path} is read-only: {reason}", errno=errno.EROFS
            )

    def object_store(self) -> ObjectStore:
        """An :class:`ObjectStore` on ``objects/`` (close it, or use ``with``)."""
        try:
            return ObjectStore(
                self.objects_dir,
                self.hash_algorithm,
                self.verity,
                state=PublishState(),
                fsync_each=self.fsync_each,
            )
        except OSError as exc:
            raise RepositoryError(
                f"cannot open {self.objects_dir}: {os_error_text(exc)}", errno=exc.errno
            ) from exc

    # -- images -----------------------------------------------------------------------------
    def create_image(
        self,
        source: str | os.PathLike[str] | int,
        *,
        options: CreateOptions | None = None,
        ref: str | None = None,
        progress: ProgressCallback | None = None,
        display: bytes | None = None,
    ) -> CreateResult:
        """Import the directory ``source`` (a path, or an open directory fd) and build
        its image (module :mod:`composefsd.repository.images`); ``ref`` names it
        under ``images/refs/``. Without a ref (or a pin) the next GC removes the image.
        ``display`` names the source in messages (default: the path).

        Raises :class:`SourceError`, :class:`VerityRequiredError`,
        :class:`ReadOnlyRepositoryError`, :class:`InvalidNameError` (bad ref) or
        :class:`RepositoryError`; the repository is consistent afterwards either way.
        """
        return create_from_directory(
            self, source, options or CreateOptions(), ref, progress, display
        )

    def create_image_from_scan(
        self,
        tree: SourceTree,
        *,
        options: CreateOptions | None = None,
        ref: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> CreateResult:
        """As :meth:`create_image`, for a tree scanned already, whose files are opened
        with ``tree.credentials``'s rights (:func:`create_from_scan`)."""
        return create_from_scan(self, tree, options or CreateOptions(), ref, progress)

    def create_image_from_dumpfile(
        self,
        dumpfile: str | os.PathLike[str] | bytes,
        objects_dir: str | os.PathLike[str],
        *,
        options: CreateOptions | None = None,
        ref: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> CreateResult:
        """Build an image from a dumpfile (bytes or a path) whose files' data live in
        ``objects_dir`` under their payload paths; see
        :func:`composefsd.repository.images.create_from_dumpfile`."""
        return create_from_dumpfile(
            self, dumpfile, objects_dir, options or CreateOptions(), ref, progress
        )

    def resolve_image(self, name_or_digest: str) -> str:
        """Hex digest of an image named by digest, ref name or ``refs/<name>``."""
        return resolve_image(self, name_or_digest)

    def list_images(self) -> list[ImageEntry]:
        return list_images(self)

    def describe_image(self, name: str) -> ImageDetails:
        return describe_image(self, name)

    def remove_ref(self, name: str) -> None:
        remove_ref(self, name)

    def remove_image(self, name_or_digest: str) -> list[str]:
        """Remove the image's link and its refs (returned); GC removes its objects."""
        return remove_image(self, name_or_digest)

    # -- checks -----------------------------------------------------------------------------
    def verify_image(
        self,
        name: str,
        *,
        progress: ProgressCallback | None = None,
        workers: int | None = None,
    ) -> VerifyReport:
        """Check one image and every object it uses (:mod:`composefsd.repository.verify`);
        ``workers`` caps the hashing processes (default: one per CPU)."""
        from composefsd.repository.verify import verify_image

        with reader_lock(self.path):
            digest = self.resolve_image(name)
            lists = None if self.read_only else self.cache_dir
            return verify_image(self, digest, progress=progress, workers=workers, cache_dir=lists)

    def verify_stream(
        self,
        name: str,
        *,
        progress: ProgressCallback | None = None,
        workers: int | None = None,
    ) -> VerifyReport:
        """Check one composefs-rs stream (a ``streams/`` entry name or ``refs/<ref>``)
        and every object it references (:func:`composefsd.repository.verify.verify_stream`)."""
        from composefsd.repository.verify import verify_stream

        with reader_lock(self.path):
            return verify_stream(self, name, progress=progress, workers=workers)

    def fsck(
        self, *, progress: ProgressCallback | None = None, metadata_only: bool = False
    ) -> FsckReport:
        """Check the whole repository (:mod:`composefsd.repository.fsck`); with
        ``metadata_only`` everything but the objects' contents."""
        from composefsd.repository.fsck import fsck

        with reader_lock(self.path):
            return fsck(self, progress=progress, metadata_only=metadata_only)

    def gc(
        self,
        *,
        pins: Iterable[str] = (),
        roots: Iterable[str] = (),
        dry_run: bool = False,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> GcResult:
        """Remove what no ref, stream ref, root or pin reaches
        (:mod:`composefsd.repository.gc`)."""
        from composefsd.repository.gc import collect_garbage

        return collect_garbage(
            self, pins=pins, roots=roots, dry_run=dry_run, progress=progress, timeout=timeout
        )


def _infer_algorithm(objects: Path) -> tuple[Algorithm, bool] | None:
    """(algorithm, whether it has fs-verity) of the first object under ``objects``
    whose name is the rest of a SHA-256 or SHA-512 digest; None if there is none."""
    by_length = {2 * alg.digest_size - 2: alg for alg in Algorithm}
    try:
        top = sorted(e.name for e in os.scandir(objects) if len(e.name) == 2)
    except OSError:
        return None
    for sub in top:
        try:
            names = sorted(os.listdir(objects / sub))
        except OSError:
            continue
        for name in names:
            alg = by_length.get(len(name))
            if alg is None or not is_hex(name):
                continue
            try:
                fd = os.open(objects / sub / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                measure_verity(fd, alg)
                return alg, True
            except VerityError:
                return alg, False
            finally:
                os.close(fd)
    return None


def _formats_text(formats: FormatConfig) -> str:
    """``V1`` or ``V1 (+V2)``, for messages."""
    extra = [f"+V{int(v)}" for v in formats.versions()][1:]
    return f"V{int(formats.default)}" + (f" ({', '.join(extra)})" if extra else "")


def _write_problem(path: Path) -> str | None:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "it is on a read-only filesystem"
    except OSError as exc:
        return f"cannot check it: {os_error_text(exc)}"
    if not os.access(path, os.W_OK):
        return "this user may not write to it"
    return None


def _check_writable_fs(path: Path) -> None:
    reason = _write_problem(path)
    if reason is not None:
        raise ReadOnlyRepositoryError(
            f"cannot create repository {path}: {reason}", errno=errno.EROFS
        )


def _write_meta(repo_path: Path, meta: RepoMetadata, with_verity: bool) -> None:
    """Write ``meta.json`` as composefs-rs does: a temporary file, fsync, read-only
    reopen, fs-verity if asked, then a link that fails if the file exists."""
    dir_fd = os.open(repo_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = TmpFile.create(dir_fd, PublishState())
        try:
            view = memoryview(meta.to_json())
            while view:
                view = view[os.write(tmp.fd, view) :]
            os.fchmod(tmp.fd, 0o644)
            os.fsync(tmp.fd)
            tmp.seal()
            if with_verity:
                try:
                    enable_verity(tmp.fd, meta.algorithm)
                except VerityUnsupportedError as exc:
                    raise VerityRequiredError(
                        f"fs-verity unsupported: cannot create a repository that requires it "
                        f"in {repo_path}: {exc.message}",
                        errno=exc.errno,
                    ) from exc
                except VerityError as exc:
                    raise VerityRequiredError(
                        f"cannot enable fs-verity on {repo_path / META_JSON}: {exc}",
                        errno=exc.errno,
                    ) from exc
            if not tmp.link(dir_fd, META_JSON):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), META_JSON)
        finally:
            tmp.close()
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _undo_init(path: Path, created: bool) -> None:
    """Leave no trace of a failed init: remove what it made."""
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return
    for sub in reversed(_SKELETON):
        try:
            (path / sub).rmdir()
        except OSError:
            pass
