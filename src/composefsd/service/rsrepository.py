"""composefs-rs's org.composefs.Repository interface (``cfsctl varlink``, composefs-rs
0.9), served beside io.composefs.Repository with cfsctl's names, types, errors and
meaning, so that a client written for cfsctl works unchanged.

:class:`RsRepositoryInterface` is registered like the other handlers (IDL fields
positionally, the :class:`~composefsd.service.context.CallContext` as ``_request``).
Repositories are named by handles from :class:`~composefsd.service.rshandles.HandleTable`,
the one table org.composefs.Oci's handlers share.

Behaviour beyond the IDL text (README, "composefs-rs's Varlink interfaces"):

* **Which repositories.** The daemon's own repository (the same directory inode,
  whatever path names it) is open to everyone the method authorization admits.
  Any other path (``path``, ``user``: the daemon user's ``~/.var/lib/composefs``,
  ``system``: ``/sysroot/composefs`` when that is not the daemon's) is read and
  written with composefsd's rights, so only callers that have them (root, the
  daemon's uid: :func:`~composefsd.service.methods.caller_rights` is None) may
  name one; others get ``org.varlink.service.PermissionDenied``, before the path
  is looked at. A path must be absolute, at most :data:`MAX_PATH` bytes, without
  NUL (``org.varlink.service.InvalidParameter`` otherwise): the daemon's working
  directory means nothing to a client. A path that names the daemon's own
  repository is looked at once: the call then works on the daemon's own
  repository object and path, whatever the caller's path (a link it controls)
  becomes meanwhile.
* **Old-format repositories** (``objects/`` without ``meta.json``) are upgraded in
  place by EnsureRepository (``Upgraded``) and OpenRepository, as cfsctl does
  (:meth:`~composefsd.repository.Repository.upgrade`).
* **InitRepository** creates only in a missing or empty directory: an existing
  directory that is not a repository is refused (InternalError) and left as it is.
* **Fsck** is the repository's fsck (:mod:`composefsd.repository.fsck`) with its
  findings counted in cfsctl's fields (:func:`fsck_reply`). **Gc** on the daemon's
  own repository is io.composefs.Repository's GarbageCollect (mounted and
  pinned images are kept); on another repository the plain collection. Extra
  ``roots`` name ``images/`` or ``streams/`` entries, as cfsctl's do: a root that
  is not one entry name (empty, ``/``, ``..``, a leading ``.``) is an
  InvalidParameter ``roots[i]``, and at most
  :data:`~composefsd.service.methods.MAX_GC_ROOTS` are taken. Neither
  streams progress (the IDL has no field for it), but both stop at their next
  progress point when the client goes away.
* **Mount** (:meth:`RsRepositoryInterface.mount_handle`, which org.composefs.Oci's
  OciMount uses too): on the daemon's own repository exactly io.composefs.Repository's
  Mount without ``where`` (verity policy, detached fd, pinned until closed); on
  another repository a detached mount of it, not pinned. With
  ``options.overlay`` the call carries two fds, upper and work directory.
"""

from __future__ import annotations

import logging
import mmap
import os
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from composefsd.image.formats import ErofsVersion
from composefsd.image.reader import read_image
from composefsd.kernel.repomount import mount_repository_image
from composefsd.kernel.verity import Algorithm
from composefsd.repository import (
    ImageNotFoundError,
    InvalidNameError,
    Progress,
    Repository,
    RepositoryError,
    reader_lock,
)
from composefsd.repository.fsck import FsckReport
from composefsd.repository.images import iter_refs
from composefsd.repository.meta import META_JSON, FormatConfig, parse_algorithm
from composefsd.repository.repo import SYSTEM_PATH, USER_SUBDIR
from composefsd.repository.verify import referenced_objects
from composefsd.service.context import CallContext, VarlinkReplyError
from composefsd.service.methods import (
    MAX_GC_ROOTS,
    RepositoryInterface,
    caller_rights,
    entry_name_ok,
)
from composefsd.service.rshandles import (
    HandleTable,
    MountFdsError,
    RepositoryHandle,
    rs_errors,
)
from composefsd.verity_policy import VerityPolicy

__all__ = ["INTERFACE", "MAX_PATH", "RsRepositoryInterface", "fsck_reply"]

log = logging.getLogger(__name__)

INTERFACE: Final = "org.composefs.Repository"
#: Longest path a call may name (PATH_MAX).
MAX_PATH: Final = 4096
#: cfsctl's service creates and expects this algorithm when a call names none.
DEFAULT_ALGORITHM: Final = Algorithm.SHA512
#: What cfsctl's InitRepository writes images in (``RepositoryConfig``'s default).
_FORMATS: Final = FormatConfig(ErofsVersion.V1)
_PERMISSION_DENIED: Final = "org.varlink.service.PermissionDenied"
_INVALID_PARAMETER: Final = "org.varlink.service.InvalidParameter"
_NO_SUCH_IMAGE: Final = "io.composefs.Repository.NoSuchImage"
_SELECTOR_MESSAGE: Final = "exactly one of `path`, `user`, `system` must be set"

# fsck's kinds (repository.fsck) as cfsctl's counters see them.
_STREAM_DAMAGE: Final = frozenset(
    {"entry-not-symlink", "broken-symlink", "stream-open-failed", "stream-read-failed"}
)
_IMAGE_DAMAGE: Final = frozenset(
    {
        "entry-not-symlink",
        "broken-symlink",
        "image-open-failed",
        "image-read-failed",
        "image-invalid",
    }
)
_MISSING: Final = frozenset({"missing-object-ref", "missing-named-ref", "image-missing-object"})


def _error(name: str, /, **parameters: Any) -> VarlinkReplyError:
    return VarlinkReplyError(f"{INTERFACE}.{name}", parameters)


def _invalid(parameter: str) -> VarlinkReplyError:
    return VarlinkReplyError(_INVALID_PARAMETER, {"parameter": parameter})


def _os_text(err: int | None, fallback: str) -> str:
    """An errno as Rust's io::Error shows it, which cfsctl's messages carry."""
    if not err:
        return fallback
    return f"{os.strerror(err)} (os error {err})"


def fsck_reply(report: FsckReport) -> dict[str, Any]:
    """cfsctl's Fsck reply for our fsck's report: each counter counts the
    problems composefs-rs counts there (distinct entries for the ``*_corrupted``
    ones); ``errors`` has one line per problem that makes the repository unclean."""
    corrupt: dict[str, set[str]] = {"objects": set(), "streams": set(), "images": set()}
    broken = missing = 0
    for p in report.problems:
        if not p.fatal:
            continue
        top, _, rest = p.path.partition("/")
        if p.kind == "broken-symlink":
            broken += 1
        if p.kind in _MISSING:
            missing += 1
        elif top == "objects":
            corrupt["objects"].add(p.path)
        elif top == "streams" and not rest.startswith("refs/") and p.kind in _STREAM_DAMAGE:
            corrupt["streams"].add(p.path)
        elif top == "images" and not rest.startswith("refs/") and p.kind in _IMAGE_DAMAGE:
            corrupt["images"].add(p.path)
    return {
        "ok": report.ok,
        "has_metadata": not any(p.kind == "metadata-parse-failed" for p in report.problems),
        "objects_checked": report.objects_checked,
        "objects_corrupted": len(corrupt["objects"]),
        "streams_checked": report.streams_checked,
        "streams_corrupted": len(corrupt["streams"]),
        "images_checked": report.images_checked,
        "images_corrupted": len(corrupt["images"]),
        "broken_links": broken,
        "missing_objects": missing,
        "errors": [f"fsck: {p}" for p in report.problems if p.fatal],
    }


def image_object_ids(repo: Repository, digest: str) -> list[str]:
    """The objects image ``digest`` refers to, as composefs-rs names them
    (``sha256:<hex>``), sorted. The image is read by its digest below
    ``objects/`` (no link followed) and parsed the repository way."""
    with reader_lock(repo.path), repo.object_store() as store:
        fd = store.open(digest)
        try:
            if os.fstat(fd).st_size == 0:
                raise ImageNotFoundError(f"image {digest} is empty")
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as buf:
                root = read_image(buf, c_quirks=False).root
                objects = referenced_objects(root, repo.hash_algorithm)
        finally:
            os.close(fd)
    return sorted(f"{repo.hash_name}:{d}" for d in objects)


def _user_path() -> Path:
    """composefs-rs's ``user_path()`` for the daemon's user."""
    home = os.environ.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir
    return Path(home) / USER_SUBDIR


def _has_meta(path: str) -> bool:
    return os.path.lexists(os.path.join(path, META_JSON))


def _old_format(path: str) -> bool:
    objects = os.path.join(path, "objects")
    return not _has_meta(path) and os.path.isdir(objects) and not os.path.islink(objects)


class RsRepositoryInterface:
    """Implements org.composefs.Repository (module notes) for the daemon whose own
    repository ``repository`` (io.composefs.Repository's handlers) serves."""

    def __init__(self, repository: RepositoryInterface, handles: HandleTable) -> None:
        self.repository = repository
        self.handles = handles

    # -- helpers ----------------------------------------------------------------------------
    def _path(self, path: object, ctx: CallContext) -> str:
        """The path to work on for a ``path`` the caller may name (module notes): the
        daemon's own repository's path when ``path`` names it, so that the caller's
        path is looked at once and never again (it may be a link it swaps later)."""
        if (
            not isinstance(path, str)
            or "\0" in path
            or not os.path.isabs(path)
            or len(os.fsencode(path)) > MAX_PATH
        ):
            raise _invalid("path")
        if self.handles.is_own(path):
            return str(self.handles.own.path)
        if caller_rights(ctx.peer) is not None:
            log.info(
                "refused %s of %r to pid %d (uid %d): not the daemon's repository",
                ctx.method,
                path,
                ctx.peer.pid,
                ctx.peer.uid,
            )
            raise VarlinkReplyError(_PERMISSION_DENIED)
        return path

    def entry(self, handle: int, ctx: CallContext) -> RepositoryHandle:
        """The caller's open handle (UnknownHandleError, which rs_errors maps to
        the interface's InvalidHandle, for any other)."""
        return self.handles.get(handle, ctx.peer.uid)

    @staticmethod
    def _algorithm(name: str | None) -> Algorithm:
        if name is None:
            return DEFAULT_ALGORITHM
        try:
            return parse_algorithm(name)
        except (ValueError, RepositoryError) as exc:
            raise _error("InvalidSpec", message=f"invalid algorithm: {exc}") from None

    def _existing(self, path: str) -> Repository:
        return self.handles.own if self.handles.is_own(path) else Repository.open(path)

    @staticmethod
    def _cancel_check(ctx: CallContext) -> Callable[[Progress], None]:
        def check(_: Progress) -> None:
            ctx.check_cancelled()

        return check

    # -- InitRepository ---------------------------------------------------------------------
    def InitRepository(
        self, path: str, algorithm: str | None, insecure: bool | None, *, _request: CallContext
    ) -> dict[str, Any]:
        p = self._path(path, _request)
        alg = self._algorithm(algorithm)
        policy = VerityPolicy.TRY if insecure else VerityPolicy.REQUIRED
        with rs_errors(INTERFACE):
            if _has_meta(p):
                existing = self._existing(p)
                if existing.hash_algorithm is not alg or existing.formats != _FORMATS:
                    raise _error(
                        "InternalError",
                        message=f"Initializing repository at {path}: repository already "
                        "initialized with different configuration (algorithm: "
                        f"{existing.algorithm}, erofs_version: V{int(existing.erofs_version)}); "
                        f"cannot re-initialize with (algorithm: {alg.composefs_rs_name}, "
                        f"erofs_version: V{int(_FORMATS.default)})",
                    )
                return {"created": False}
            Repository.init(p, algorithm=alg, verity=policy, formats=_FORMATS)
        log.info("created repository %s for pid %d", p, _request.peer.pid)
        return {"created": True}

    # -- EnsureRepository -------------------------------------------------------------------
    def EnsureRepository(
        self, path: str, algorithm: str | None, insecure: bool | None, *, _request: CallContext
    ) -> dict[str, Any]:
        p = self._path(path, _request)
        alg = self._algorithm(algorithm)
        policy = VerityPolicy.TRY if insecure else VerityPolicy.REQUIRED
        with rs_errors(INTERFACE):
            try:
                if _has_meta(p):
                    repo = self._existing(p)
                    status = "Opened"
                    if repo.hash_algorithm is not alg:
                        raise RepositoryError(
                            f"repository algorithm {repo.algorithm} does not match expected "
                            f"{alg.composefs_rs_name}"
                        )
                elif _old_format(p):
                    Repository.upgrade(p, algorithm=alg)
                    status = "Upgraded"
                else:
                    Repository.init(p, algorithm=alg, verity=policy, formats=_FORMATS)
                    status = "Created"
            except RepositoryError as exc:
                raise _error(
                    "InternalError", message=f"Ensuring repository at {path}: {exc}"
                ) from exc
        log.info("%s repository %s for pid %d", status.lower(), p, _request.peer.pid)
        return {"status": status}

    # -- OpenRepository / CloseRepository ---------------------------------------------------
    def OpenRepository(
        self,
        path: str | None,
        user: bool | None,
        system: bool | None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        ctx = _request
        if (path is not None) + bool(user) + bool(system) != 1:
            raise _error("InvalidSpec", message=_SELECTOR_MESSAGE)
        if path is None:
            path = str(_user_path() if user else SYSTEM_PATH)
        p = self._path(path, ctx)
        with rs_errors(INTERFACE):
            if self.handles.is_own(p):
                repo = self.handles.own
            else:
                try:
                    repo = Repository.upgrade(p) if _old_format(p) else Repository.open(p)
                except (RepositoryError, OSError) as exc:
                    text = _os_text(exc.errno, str(exc))
                    raise _error(
                        "RepoNotFound", message=f"opening repository {path}: {text}"
                    ) from exc
            entry = self.handles.open(repo, ctx.peer.uid)
            device = os.stat(entry.repo.objects_dir).st_dev
        log.debug("handle %d: %s for uid %d", entry.handle, entry.repo.path, ctx.peer.uid)
        return {
            "handle": entry.handle,
            "hash_algorithm": entry.repo.hash_name,
            "objects_device_id": device,
        }

    def CloseRepository(self, handle: int, *, _request: CallContext) -> dict[str, Any]:
        with rs_errors(INTERFACE):
            self.handles.close(handle, _request.peer.uid)
        return {}

    # -- Fsck / Gc --------------------------------------------------------------------------
    def Fsck(
        self, handle: int, metadata_only: bool | None, *, _request: CallContext
    ) -> dict[str, Any]:
        with rs_errors(INTERFACE):
            repo = self.entry(handle, _request).repo
            report = repo.fsck(
                progress=self._cancel_check(_request), metadata_only=bool(metadata_only)
            )
        return fsck_reply(report)

    def Gc(
        self, handle: int, dry_run: bool, roots: list[str], *, _request: CallContext
    ) -> dict[str, Any]:
        ctx = _request
        if len(roots) > MAX_GC_ROOTS:
            raise _invalid("roots")
        for i, root in enumerate(roots):
            if not entry_name_ok(root):
                raise _invalid(f"roots[{i}]")
        with rs_errors(INTERFACE):
            entry = self.entry(handle, ctx)
            if entry.own:
                out = self.repository.GarbageCollect(dry_run, roots, _request=ctx)
                result = {
                    "objects_removed": out["objectsRemoved"],
                    "objects_bytes": out["bytesRemoved"],
                    "images_pruned": out["imagesRemoved"] + out["linksRemoved"],
                    "streams_pruned": out["streamsPruned"],
                }
            else:
                gc = entry.repo.gc(
                    roots=roots,
                    dry_run=dry_run,
                    progress=self._cancel_check(ctx),
                    timeout=self.repository.gc_timeout,
                )
                result = {
                    "objects_removed": gc.objects_removed,
                    "objects_bytes": gc.bytes_removed,
                    "images_pruned": gc.images_removed + gc.links_removed,
                    "streams_pruned": gc.streams_pruned,
                }
        if not dry_run:
            log.info("gc of %s for pid %d: %s", entry.repo.path, ctx.peer.pid, result)
        return {"result": result, "dry_run": dry_run}

    # -- ImageObjects / ListImageRefs -------------------------------------------------------
    def ImageObjects(self, handle: int, name: str, *, _request: CallContext) -> dict[str, Any]:
        with rs_errors(INTERFACE):
            repo = self.entry(handle, _request).repo
            try:
                digest = repo.resolve_image(name)
                return {"object_ids": image_object_ids(repo, digest)}
            except (ImageNotFoundError, InvalidNameError):
                raise _error("NoSuchRef", reference=name) from None
            except FileNotFoundError:
                # The image went away between resolving and reading it.
                raise _error("NoSuchRef", reference=name) from None

    def ListImageRefs(self, handle: int, *, _request: CallContext) -> dict[str, Any]:
        with rs_errors(INTERFACE):
            repo = self.entry(handle, _request).repo
            images = []
            for name, link, digest in iter_refs(repo):
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError:
                    continue  # cfsctl skips names that are not UTF-8 too
                if digest is None:
                    # As cfsctl: the last component of whatever the link says.
                    try:
                        target = os.readlink(link)
                    except OSError:
                        continue
                    digest = target.rsplit("/", 1)[-1]
                    try:
                        digest.encode("utf-8")
                    except UnicodeEncodeError:
                        continue
                images.append({"name": name, "digest": digest})
        return {"images": images}

    # -- Mount ------------------------------------------------------------------------------
    def Mount(
        self, handle: int, name: str, options: dict[str, Any], *, _request: CallContext
    ) -> dict[str, Any]:
        ctx = _request
        with rs_errors(INTERFACE):
            entry = self.entry(handle, ctx)
            try:
                index = self.mount_handle(entry, name, options, ctx)
            except MountFdsError as exc:
                raise _error("InvalidSpec", message=str(exc)) from None
            except ImageNotFoundError:
                raise _error(
                    "InternalError",
                    message=f"Mounting image {name!r}: Opening image {name!r}: "
                    f"image not found: {name}",
                ) from None
        return {"fd_index": index}

    def mount_handle(
        self, entry: RepositoryHandle, image: str, options: dict[str, Any], ctx: CallContext
    ) -> int:
        """Mount ``image`` (a digest or ref name of ``entry``'s repository) detached,
        with cfsctl's mount ``options`` (``overlay``: the call's fds 0 and 1 are the
        upper and work directory; ``read_write``), and send the mount fd with the
        reply: returns its index. The daemon's own repository mounts through
        io.composefs.Repository's Mount (module notes); another one plainly.

        Raises :class:`MountFdsError` when the call carries other fds than the
        options want, :class:`ImageNotFoundError` when there is no such image, and
        the library's (or io.composefs.Repository's) errors otherwise: wrap the call
        in :func:`~composefsd.service.rshandles.rs_errors`."""
        overlay = bool(options.get("overlay"))
        expected = 2 if overlay else 0
        if len(ctx.fds) != expected:
            raise MountFdsError(expected, len(ctx.fds))
        read_only = None if not overlay else not options.get("read_write")
        if entry.own:
            try:
                out = self.repository.Mount(
                    image,
                    None,
                    None,
                    read_only,
                    None,
                    0 if overlay else None,
                    None,
                    1 if overlay else None,
                    None,
                    None,
                    None,
                    None,
                    _request=ctx,
                )
            except VarlinkReplyError as exc:
                if exc.name == _NO_SUCH_IMAGE:
                    raise ImageNotFoundError(f"image not found: {image}") from None
                raise
            index: int = out["mountFileDescriptor"]
            return index
        taken: list[int] = []
        try:
            upper = work = None
            if overlay:
                upper = ctx.take_fd(0, "fds")
                taken.append(upper)
                work = ctx.take_fd(1, "fds")
                taken.append(work)
            with mount_repository_image(
                entry.repo, image, read_only=read_only, upperdir=upper, workdir=work
            ) as mount:
                log.info(
                    "mounted image %s of %s (detached) for pid %d",
                    image,
                    entry.repo.path,
                    ctx.peer.pid,
                )
                return ctx.push_fd(mount.detach_fd())
        finally:
            for fd in taken:
                os.close(fd)
