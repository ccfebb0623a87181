"""The io.composefs.Repository interface: one method per IDL method.

:class:`RepositoryInterface` is registered with ``varlink.Service``; the transport
calls its methods in worker threads with the IDL input fields positionally (absent
ones as None, already validated against the IDL) and the call's
:class:`~composefsd.service.context.CallContext` as ``_request``. A method returns
the final reply's parameters, sends intermediate replies (progress, and the
per-image results of Verify-all) through the context, and raises
:class:`~composefsd.service.context.VarlinkReplyError` for every failure the IDL
declares. Every error of the repository and kernel layers is mapped to one of the
interface's errors (:func:`reply_error`); nothing of theirs reaches the transport
as an unexpected exception. Optional reply fields with nothing to say are left out.

Behaviour beyond the IDL text:

* **Progress** (CreateImage, Verify, GarbageCollect): the repository's progress
  snapshots become ``{"progress": {phase, done, total}}`` replies, at most four a
  second (a phase change always goes out at once), and the last one is repeated
  every :attr:`RepositoryInterface.heartbeat` seconds while a step reports nothing
  (writing a large image, syncing), so clients with reply timeouts (sd-varlink's
  45 s) stay patient. Each report first checks whether the client is gone: then
  :class:`~composefsd.service.context.CallCancelled` is raised from inside the
  repository operation, which stops it where it stands; the repository leaves at
  most unreferenced objects behind (GC removes them), never a half-visible image.
* **CreateImage** reads the caller's tree with the caller's rights: a caller
  with composefsd's own uid (root, usually) in-process; any other in a scan
  worker that has become the caller and import workers that open files as the
  caller (:mod:`composefsd.service.sourcescan`), so it gets exactly the files it
  could open itself. Either way files are read beneath the source directory's fd
  and must be the inodes the scan saw (:mod:`composefsd.sources.beneath`). A tree read
  with a caller's rights may have at most
  :attr:`RepositoryInterface.max_source_entries` entries. A
  ``sourceDirectoryFileDescriptor`` is reopened, never resolved by a path, and
  its tree gets no digest cache (a path to key it by means nothing the next time).
* **Mount** with ``where`` attaches in composefsd's mount namespace; without it,
  the detached mount fd goes with the reply and the image is pinned
  (:mod:`composefsd.service.mounts`) before it leaves. ``where``, ``upperDirectory``
  and ``workDirectory`` must be absolute.
* **Verify** without ``image`` or ``stream`` checks the images listed when it
  starts, oldest first, then the composefs-rs streams (every ``streams/`` entry by
  name, then every ``streams/refs`` link that names no stream, as ``refs/<name>``),
  and sends one result reply per image or stream (images and streams removed
  meanwhile are skipped); with none at all the one final reply is empty. A stream
  that cannot be read or does not parse is a problem of its result, never an
  error of the call. Names that are not UTF-8 are shown with ``\\udcXX`` escapes.
  Each call hashes in at most :attr:`RepositoryInterface.verify_workers` processes.
* **RemoveImage** refuses with ``ImageInUse`` while the image is mounted from
  this repository in any mount namespace or pinned by a detached mount handed out
  for it (:meth:`MountTracker.in_use`; the same image mounted from another
  repository does not count); ``where`` lists mount points
  (namespace-qualified when not composefsd's) and ``detached mount N`` entries.
  It refuses with ``ImageReferenced`` while a composefs-rs stream ref needs the
  image (an OCI tag whose config stream names it); ``streamRefs`` lists those refs.
* **GarbageCollect** keeps every image in use as for RemoveImage, and the extra
  ``roots`` (at most :data:`MAX_GC_ROOTS`, each a name of one directory entry:
  :func:`entry_name_ok`); it waits at most
  :attr:`RepositoryInterface.gc_timeout` seconds for operations of other processes
  before replying ``RepositoryBusy``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from composefsd.credentials import Credentials
from composefsd.image.formats import ErofsVersion
from composefsd.image.transforms import Transform, XattrFilter
from composefsd.image.writer import VERSION_MAX
from composefsd.kernel.imagecache import ImageDigestCache
from composefsd.kernel.mount import (
    ImageVerityError,
    MountError,
    NotComposefsMountError,
    unmount,
)
from composefsd.kernel.mountinfo import ComposefsMount, composefs_mount_at, mount_of
from composefsd.kernel.repomount import (
    ObjectsDirectory,
    has_image,
    mount_repository_image,
    repository_mounts,
)
from composefsd.kernel.userns import IdMapping
from composefsd.objectlayout import is_hex_digest
from composefsd.repository import (
    CorruptRepositoryError,
    CreateOptions,
    CreateResult,
    ImageNotFoundError,
    ImageReferencedError,
    InvalidNameError,
    NotARepositoryError,
    Progress,
    ReadOnlyRepositoryError,
    Repository,
    RepositoryBusyError,
    RepositoryError,
    SourceError,
    UnsupportedRepositoryError,
    VerityPolicy,
    VerityRequiredError,
)
from composefsd.repository.images import image_link_names, normalize_ref
from composefsd.repository.verify import (
    VerifyReport,
    default_workers,
    stream_entry_path,
    stream_names,
    verity_text,
)
from composefsd.service.codec import encode_reply
from composefsd.service.context import CallCancelled, CallContext, Peer, VarlinkReplyError
from composefsd.service.mounts import MountTracker
from composefsd.service.replies import (
    RepositoryCounts,
    describe_counts,
    mount_reply,
    read_only_reason,
)
from composefsd.service.sourcescan import scan_as

if TYPE_CHECKING:
    from composefsd.service.ownmount import OwnMounts

__all__ = [
    "INTERFACE",
    "MAX_GC_ROOTS",
    "RepositoryInterface",
    "caller_rights",
    "entry_name_ok",
    "mapped_errors",
    "reply_error",
    "stream_name_ok",
]

log = logging.getLogger(__name__)

INTERFACE = "io.composefs.Repository"
_INVALID_PARAMETER = "org.varlink.service.InvalidParameter"
_EXPECTED_MORE = "org.varlink.service.ExpectedMore"

#: Most extra roots one GarbageCollect takes (cfsctl callers pass a handful).
MAX_GC_ROOTS = 1024


def _error(error: str, /, **parameters: Any) -> VarlinkReplyError:
    return VarlinkReplyError(f"{INTERFACE}.{error}", parameters)


def _invalid(parameter: str) -> VarlinkReplyError:
    return VarlinkReplyError(_INVALID_PARAMETER, {"parameter": parameter})


def entry_name_ok(name: str) -> bool:
    """Whether ``name`` can name an entry directly in ``images/`` or ``streams/``:
    one component by the IDL's name rules (non-empty, at most 255 bytes, not
    starting with ".", no control characters), so never ``..`` or a path."""
    if "/" in name:
        return False
    try:
        normalize_ref(name)
    except InvalidNameError:
        return False
    return True


def stream_name_ok(name: str) -> bool:
    """Whether ``name`` can name a stream: a ``streams/`` entry (:func:`entry_name_ok`)
    other than the ``refs`` directory, or ``refs/<ref>`` with a ref name by the
    IDL's rules (no ``..`` component)."""
    if not name.startswith("refs/"):
        return name != "refs" and entry_name_ok(name)
    try:
        normalize_ref(name)
    except InvalidNameError:
        return False
    return True


def _text(text: str) -> str:
    """``text`` for a reply: a name that is not UTF-8 (decoded with surrogateescape)
    shown with ``\\udcXX`` escapes, since no reply can carry a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _errno_name(err: int | None) -> str | None:
    return errno.errorcode.get(err) if err else None


def _system_error(message: str, err: int | None) -> VarlinkReplyError:
    params: dict[str, Any] = {"message": message}
    name = _errno_name(err)
    if name is not None:
        params["errnoName"] = name
    return _error("SystemError", **params)


def reply_error(
    exc: BaseException, *, image: str | None = None, source_path: str | None = None
) -> VarlinkReplyError | None:
    """The interface error for an exception of the repository or kernel layers (or
    any OSError); None for anything else. ``image`` names the image the call was
    about (for NoSuchImage and InvalidName), ``source_path`` a CreateImage path."""
    if isinstance(exc, VarlinkReplyError):
        return exc
    if isinstance(exc, ImageVerityError):
        return _error("ImageVerityFailed", reason=exc.reason, message=str(exc))
    if isinstance(exc, MountError):
        params: dict[str, Any] = {"message": str(exc)}
        name = _errno_name(exc.errno)
        if name is not None:
            params["errnoName"] = name
        return _error("MountFailed", **params)
    if isinstance(exc, ImageReferencedError):
        return _error(
            "ImageReferenced",
            image=image if image is not None else exc.image,
            streamRefs=list(exc.refs),
            message=str(exc),
        )
    if isinstance(exc, ImageNotFoundError):
        return _error("NoSuchImage", image=image if image is not None else "")
    if isinstance(exc, InvalidNameError):
        return _error("InvalidName", name=image if image is not None else "", message=str(exc))
    if isinstance(exc, VerityRequiredError):
        return _error("VerityUnsupported", message=str(exc))
    if isinstance(exc, SourceError):
        params = {"message": str(exc)}
        if source_path is not None:
            params["path"] = source_path
        return _error("SourceError", **params)
    if isinstance(exc, ReadOnlyRepositoryError):
        return _error("ReadOnlyRepository", message=str(exc))
    if isinstance(exc, RepositoryBusyError):
        return _error("RepositoryBusy", message=str(exc))
    if isinstance(exc, CorruptRepositoryError | NotARepositoryError):
        return _error("RepositoryCorrupt", message=str(exc))
    if isinstance(exc, UnsupportedRepositoryError):
        return _system_error(str(exc), exc.errno)
    if isinstance(exc, RepositoryError):
        return _system_error(str(exc), exc.errno)
    if isinstance(exc, OSError):
        text = exc.strerror or str(exc)
        if exc.filename is not None:
            text = f"{os.fsdecode(exc.filename)}: {text}"
        return _system_error(text, exc.errno)
    return None


#: Filesystem types where a ``stat`` may wait for a server or a process.
_REMOTE_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "lustre",
     "gfs2", "ocfs2", "fuse", "fuseblk", "davfs", "virtiofs", "ncpfs", "coda", "orangefs"}
)  # fmt: skip


def on_local_filesystem(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is on a local filesystem (not network, cluster or FUSE); False
    when that cannot be told."""
    try:
        mount = mount_of(os.path.realpath(path))
    except (OSError, ValueError):
        return False
    if mount is None:
        return False
    fstype = mount.fstype
    return fstype not in _REMOTE_FILESYSTEMS and not fstype.startswith("fuse.")


@contextlib.contextmanager
def _mapped(*, image: str | None = None, source_path: str | None = None) -> Iterator[None]:
    """Turn library errors raised inside into interface errors."""
    with mapped_errors(lambda exc: reply_error(exc, image=image, source_path=source_path)):
        yield


@contextlib.contextmanager
def mapped_errors(
    mapper: Callable[[Exception], VarlinkReplyError | None],
    *,
    shown: Callable[[Exception], str] = str,
    chain: bool = True,
) -> Iterator[None]:
    """Raise what ``mapper`` makes of a library error raised inside (an interface
    error); what it does not map goes on as it is. A mapped ``SystemError`` is
    logged (``shown`` of the cause). ``chain=False`` leaves the cause out of the
    raised error's traceback (it may hold a secret)."""
    try:
        yield
    except CallCancelled:
        raise
    except Exception as exc:
        mapped = mapper(exc)
        if mapped is None or mapped is exc:
            raise
        if mapped.name.endswith(".SystemError"):
            log.warning("%s", shown(exc))
        if chain:
            raise mapped from exc
        raise mapped from None


def _progress_params(p: Progress) -> dict[str, Any]:
    inner: dict[str, Any] = {"phase": p.phase, "done": p.done}
    if p.total is not None:
        inner["total"] = p.total
    return {"progress": inner}


class _Reporter:
    """The progress callback of one call (module notes): throttles, repeats the last
    report as a heartbeat, and stops the work once the client has gone."""

    def __init__(
        self,
        ctx: CallContext,
        *,
        interval: float,
        heartbeat: float,
        to_params: Callable[[Progress], dict[str, Any]] = _progress_params,
        key: Callable[[Progress], Hashable] = operator.attrgetter("phase"),
    ) -> None:
        self.ctx = ctx
        self.interval = interval
        self.heartbeat = heartbeat
        # The reply a report becomes, and what must change for it to go out at once
        # (else one reply per interval): the phase, unless an interface says more.
        self._to_params = to_params
        self._key = key
        self._lock = threading.Lock()
        self._last: dict[str, Any] | None = None
        self._phase: Hashable | None = None
        self._sent = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Reporter:
        if self.ctx.more and self.ctx.send_continues is not None and self.heartbeat > 0:
            self._thread = threading.Thread(
                target=self._beat, name=f"heartbeat {self.ctx.method}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __call__(self, p: Progress) -> None:
        self.ctx.check_cancelled()
        now = time.monotonic()
        key = self._key(p)
        if key == self._phase and now - self._sent < self.interval:
            return
        self._phase = key
        self.send(self._to_params(p))

    def send(self, params: dict[str, Any]) -> None:
        """A progress (or result) reply now; raises CallCancelled if the client left."""
        with self._lock:
            self._last = params if "progress" in params else self._last
            self._sent = time.monotonic()
            self.ctx.progress(params)

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.heartbeat)):
            with self._lock:
                if self._stop.is_set() or self.ctx.cancelled.is_set():
                    return
                if self._last is None or time.monotonic() - self._sent < self.heartbeat:
                    continue
                self._sent = time.monotonic()
                try:
                    self.ctx.progress(self._last)
                except CallCancelled:
                    return
                except Exception:  # the connection's problem; the call notices it itself
                    log.debug("heartbeat reply failed", exc_info=True)
                    return


def _problems(report: VerifyReport) -> list[dict[str, Any]]:
    # A stream report's own problems (its link, object, splitstream) are in
    # image_problems too; the kind says which it is.
    own = "stream" if report.stream is not None else "image"
    out: list[dict[str, Any]] = [{"kind": own, "message": _text(p)} for p in report.image_problems]
    out += [
        {"kind": "missing-object", "object": d, "message": f"object {d} is missing"}
        for d in report.missing
    ]
    out += [
        {"kind": "corrupt-object", "object": d, "message": f"object {d}: {reason}"}
        for d, reason in report.corrupt
    ]
    why = (
        "the repository requires it"
        if report.verity_required
        else "allowed by the repository's policy"
    )
    # Say the kernel's reason: "not enabled" would be wrong for an object that has
    # fs-verity in another hash algorithm (sha256 verity in a sha512 repository).
    out += [
        {
            "kind": "no-verity",
            "object": d,
            "message": f"object {d}: {verity_text(report.no_verity_why.get(d, 'not-enabled'))}"
            f" ({why})",
        }
        for d in report.no_verity
    ]
    return out


def _verify_result(report: VerifyReport) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ok": report.ok,
        "objectsChecked": report.objects_checked,
        "verityMeasured": report.verity_measured,
        "problems": _problems(report),
    }
    # A stream whose link names no object has no digest.
    if report.digest:
        out["digest"] = report.digest
    if report.stream is not None:
        out["stream"] = _text(report.stream)
    return out


def _bool(value: bool | None, default: bool = False) -> bool:
    return default if value is None else bool(value)


def _absolute(value: str, field_name: str) -> str:
    if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
        raise _invalid(field_name)
    # normpath drops "x/.." without looking at x, where the kernel would resolve x
    # (ENOTDIR for a file, a symbolic link's target's parent): "/srv/file/.." would
    # be /srv here and an error to the kernel. A path with ".." is refused rather
    # than given a meaning the kernel would not give it (composefsctl sends paths
    # made absolute and normalized).
    if ".." in value.split("/"):
        raise _invalid(field_name)
    return os.path.normpath(value)


def _mapping(value: list[dict[str, Any]] | None, field_name: str) -> list[IdMapping] | None:
    if value is None:
        return None
    try:
        out = [IdMapping(int(m["inside"]), int(m["outside"]), int(m["count"])) for m in value]
    except (ValueError, KeyError, TypeError):
        raise _invalid(field_name) from None
    if not out:
        raise _invalid(field_name)
    return out


_XATTR_FILTERS = {
    "allowlistOnly": XattrFilter.ALLOWLIST_ONLY,
    "keepUserXattrs": XattrFilter.KEEP_USER_XATTRS,
}


def _transform(propagate: bool | None, xattrs: str | None, bootable: bool | None) -> Transform:
    """CreateImage's transforms as cfsctl's flags give them: the xattr filter only
    with propagateUsrToRoot (cfsctl ignores it otherwise; we refuse it)."""
    if xattrs is not None and not propagate:
        raise _invalid("xattrs")
    if propagate:
        try:
            kept = _XATTR_FILTERS[xattrs or "allowlistOnly"]
        except KeyError:
            raise _invalid("xattrs") from None
    else:
        kept = XattrFilter.ALL
    return Transform(_bool(propagate), kept, _bool(bootable))


def caller_rights(peer: Peer) -> Credentials | None:
    """The rights to read a caller's files with: None if they are this process's
    own (the same uid), else the peer's uid, gid and groups."""
    if peer.uid == os.geteuid():
        return None
    return Credentials(peer.uid, peer.gid, tuple(sorted(peer.groups)))


def _fd_name(fd: int | None) -> bytes:
    """What a passed directory fd is, for messages only (never opened by this name)."""
    try:
        return os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return b"<sourceDirectoryFileDescriptor>"


class RepositoryInterface:
    """Implements io.composefs.Repository on ``repo`` (module notes)."""

    #: Seconds GarbageCollect waits for other processes' operations on the repository.
    gc_timeout: float = 5.0
    #: Minimum seconds between two progress replies of the same phase.
    progress_interval: float = 0.25
    #: Seconds after which the last progress reply is repeated while nothing new comes.
    heartbeat: float = 5.0
    #: Most entries a tree scanned with a caller's rights (not ours) may have.
    max_source_entries: int = 1_000_000
    #: MountDumpfile calls one uid may start a minute (``--mount-dumpfile-rate``).
    mount_dumpfile_rate: int = 60
    #: Hashing processes one Verify may use: half the CPUs, so that the Verify calls
    #: the transport lets one uid run cannot take all of them.
    verify_workers: int = max(1, default_workers() // 2)
    #: Composefs mounts :meth:`describe_now` tells apart on the event loop at most
    #: (a stat or two each); with more, Describe runs in a worker.
    inline_mounts: int = 16
    #: Directories of images and refs :meth:`describe_now` checks at most (a stat
    #: each); a repository with more ref directories is described in a worker.
    inline_dirs: int = 64

    def __init__(self, repo: Repository, tracker: MountTracker) -> None:
        self.repo = repo
        self.tracker = tracker
        # Mount hashes an image without fs-verity once, not at every mount.
        self.image_digests = ImageDigestCache()
        # Describe lists the repository's directories only when they have changed.
        self.counts = RepositoryCounts(repo)
        self.inline_describe = on_local_filesystem(repo.path)
        #: describe_now's last reply, encoded, and the values it was made from.
        self._described: tuple[tuple[int, int, int, str | None], bytes] | None = None
        #: MountDumpfile's limits and state, made at its first call.
        self.own_mounts: OwnMounts | None = None
        self._own_mounts_lock = threading.Lock()
        #: One Unmount at a time: two callers taking down the same composefs mount
        #: at once would both check it, and the second's umount2 would take down
        #: what lies below it, composefs or not.
        self._unmount_lock = threading.Lock()

    def _reporter(
        self,
        ctx: CallContext,
        to_params: Callable[[Progress], dict[str, Any]] = _progress_params,
        key: Callable[[Progress], Hashable] = operator.attrgetter("phase"),
    ) -> _Reporter:
        """The progress callback of one call (``to_params`` and ``key``: :class:`_Reporter`)."""
        return _Reporter(
            ctx,
            interval=self.progress_interval,
            heartbeat=self.heartbeat,
            to_params=to_params,
            key=key,
        )

    # -- Describe ---------------------------------------------------------------------------
    def Describe(self, *, _request: CallContext) -> dict[str, Any]:
        with _mapped():
            images, refs = self.counts.count()
            mounts = self.tracker.own_mounts_parsed()[1]
            return describe_counts(
                self.repo,
                images,
                refs,
                self._repository_mounts(mounts),
                read_only_reason(self.repo),
            )

    def describe_now(self, parameters: dict[str, Any], ctx: CallContext) -> bytes | None:
        """Describe's reply from the event loop (the transport's inline method), when
        it takes a few ``stat`` calls on a local filesystem and no listing, no parse
        of the mount table and no waiting: the counts kept
        (:class:`~composefsd.service.replies.RepositoryCounts`, from at most
        :attr:`inline_dirs` directories) still hold, the mount table is unchanged
        and has at most :attr:`inline_mounts` composefs mounts to tell apart. Else
        None, and a worker runs :meth:`Describe`. A repository on a network or FUSE
        filesystem, where a ``stat`` may wait for a server, is always described in
        a worker. The reply comes encoded: the same as the last one's when what it
        depends on is (counts and read-only reason)."""
        if not self.inline_describe:
            return None
        counts = self.counts.current(self.inline_dirs)
        if counts is None:
            return None
        now = self.tracker.own_mounts_now()
        if now is None or len(now[1]) > self.inline_mounts:
            return None
        try:
            key = (*counts, self._repository_mounts(now[1]), read_only_reason(self.repo))
        except (OSError, RepositoryError):
            return None  # the worker's Describe says what is wrong
        last = self._described
        if last is not None and last[0] == key:
            return last[1]
        reply = encode_reply(describe_counts(self.repo, *key))
        self._described = (key, reply)
        return reply

    def _repository_mounts(self, mounts: Sequence[ComposefsMount]) -> int:
        # Without composefs mounts there is nothing to tell apart: no realpath and
        # stat of objects/.
        return len(repository_mounts(self.repo, mounts)) if mounts else 0

    # -- CreateImage ------------------------------------------------------------------------
    def CreateImage(
        self,
        source_path: str | None,
        source_fd_index: int | None,
        ref: str | None,
        use_epoch: bool | None,
        skip_xattrs: bool | None,
        user_xattrs: bool | None,
        skip_devices: bool | None,
        min_version: int | None,
        max_version: int | None,
        # Defaults for the fields added later, so that callers written before
        # them (tests calling the method directly) keep working.
        erofs_version: int | None = None,
        propagate_usr_to_root: bool | None = None,
        xattrs: str | None = None,
        bootable: bool | None = None,
        # allowInteractiveAuthentication: read by the polkit check before the call
        # (composefsd.service.polkit), not here.
        allow_interactive_authentication: bool | None = None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        ctx = _request
        if (source_path is None) == (source_fd_index is None):
            raise _invalid("sourcePath")
        if source_path is not None:
            source_path = _absolute(source_path, "sourcePath")
        if min_version is not None and not 0 <= min_version <= VERSION_MAX:
            raise _invalid("minVersion")
        if max_version is not None and not 0 <= max_version <= VERSION_MAX:
            raise _invalid("maxVersion")
        version: ErofsVersion | None = None
        if erofs_version is not None:
            if min_version is not None or max_version is not None:
                raise _invalid("erofsVersion")
            try:
                version = ErofsVersion(erofs_version)
            except ValueError:
                raise _invalid("erofsVersion") from None
        transform = _transform(propagate_usr_to_root, xattrs, bootable)
        if (min_version is not None or max_version is not None) and not transform.is_identity:
            raise _invalid("propagateUsrToRoot" if propagate_usr_to_root else "bootable")
        if _bool(skip_xattrs) and _bool(user_xattrs):
            raise _invalid("userXattrs")
        if ref is not None:
            try:
                ref = normalize_ref(ref)
            except InvalidNameError as exc:
                raise _error("InvalidName", name=ref, message=str(exc)) from None
        fd: int | None = None
        if source_fd_index is not None:
            fd = ctx.take_fd(source_fd_index, "sourceDirectoryFileDescriptor")
        options = CreateOptions(
            use_epoch=_bool(use_epoch),
            skip_xattrs=_bool(skip_xattrs),
            user_xattrs=_bool(user_xattrs),
            skip_devices=_bool(skip_devices),
            min_version=min_version,
            max_version=max_version,
            erofs_version=version,
            transform=transform,
        )
        try:
            with self._reporter(ctx) as report, _mapped(image=ref, source_path=source_path):
                result = self._create(ctx.peer, source_path, fd, options, ref, report)
        finally:
            if fd is not None:
                os.close(fd)
        log.info(
            "created image %s%s for pid %d: %d files, %d objects written, %d reused",
            result.digest,
            f" ({result.ref})" if result.ref else "",
            ctx.peer.pid,
            result.files,
            result.objects_written,
            result.objects_reused,
        )
        out: dict[str, Any] = {
            "digest": result.digest,
            "erofsVersion": int(result.erofs_version),
            "files": result.files,
            "objectsWritten": result.objects_written,
            "objectsReused": result.objects_reused,
            "bytesWritten": result.bytes_written,
            "verityEnabled": result.verity_enabled,
        }
        if result.ref is not None:
            out["ref"] = result.ref
        if result.extra_images:
            out["extraImages"] = [
                {"erofsVersion": int(v), "digest": d} for v, d in result.extra_images.items()
            ]
        return out

    def _create(
        self,
        peer: Peer,
        source_path: str | None,
        fd: int | None,
        options: CreateOptions,
        ref: str | None,
        report: _Reporter,
    ) -> CreateResult:
        """Import the caller's tree with the caller's rights (module notes)."""
        display = os.fsencode(source_path) if source_path is not None else _fd_name(fd)
        creds = caller_rights(peer)
        if creds is None:
            # The caller has our rights: read its tree in-process.
            source: str | int = fd if fd is not None else str(source_path)
            return self.repo.create_image(
                source, options=options, ref=ref, progress=report, display=display
            )
        scanned = scan_as(
            creds,
            path=source_path,
            fd=fd,
            display=display,
            options=options,
            progress=report,
            max_entries=self.max_source_entries,
        )
        try:
            return self.repo.create_image_from_scan(
                scanned, options=options, ref=ref, progress=report
            )
        finally:
            os.close(scanned.source_fd)

    # -- Verify -----------------------------------------------------------------------------
    def Verify(
        self, image: str | None, stream: str | None = None, *, _request: CallContext
    ) -> dict[str, Any]:
        ctx = _request
        repo = self.repo
        if stream is not None:
            if image is not None or not stream_name_ok(stream):
                raise _invalid("stream")
            with self._reporter(ctx) as report, _mapped():
                return _verify_result(
                    repo.verify_stream(stream, progress=report, workers=self.verify_workers)
                )
        if image is not None:
            with self._reporter(ctx) as report, _mapped(image=image):
                return _verify_result(
                    repo.verify_image(image, progress=report, workers=self.verify_workers)
                )
        if not ctx.more:
            raise VarlinkReplyError(_EXPECTED_MORE)
        with _mapped():
            digests = [e.digest for e in repo.list_images()]
            # Links that list_images leaves out (dangling, or leading elsewhere than
            # their object) are verified too, to be reported.
            digests += sorted(set(image_link_names(repo)) - set(digests))
            streams = stream_names(repo)
        pending: dict[str, Any] | None = None
        with self._reporter(ctx) as report:
            for digest in digests:
                if not os.path.lexists(repo.images_dir / digest):
                    continue
                if pending is not None:
                    report.send(pending)
                    pending = None
                try:
                    with _mapped(image=digest):
                        pending = _verify_result(
                            repo.verify_image(digest, progress=report, workers=self.verify_workers)
                        )
                except VarlinkReplyError as exc:
                    if exc.name != f"{INTERFACE}.NoSuchImage":
                        raise
                    log.debug("image %s went away while verifying all images", digest)
            for name in streams:
                if not os.path.lexists(stream_entry_path(repo, name)):
                    log.debug("stream %r went away while verifying all streams", name)
                    continue
                if pending is not None:
                    report.send(pending)
                with _mapped():
                    pending = _verify_result(
                        repo.verify_stream(name, progress=report, workers=self.verify_workers)
                    )
        return pending if pending is not None else {}

    # -- Mount ------------------------------------------------------------------------------
    def Mount(
        self,
        image: str,
        expected_digest: str | None,
        verity: str | None,
        read_only: bool | None,
        upper_path: str | None,
        upper_fd_index: int | None,
        work_path: str | None,
        work_fd_index: int | None,
        userns_fd_index: int | None,
        uid_map: list[dict[str, Any]] | None,
        gid_map: list[dict[str, Any]] | None,
        where: str | None,
        # allowInteractiveAuthentication: read by the polkit check before the call
        # (composefsd.service.polkit), not here.
        allow_interactive_authentication: bool | None = None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        ctx = _request
        if upper_path is not None and upper_fd_index is not None:
            raise _invalid("upperDirectoryFileDescriptor")
        if work_path is not None and work_fd_index is not None:
            raise _invalid("workDirectoryFileDescriptor")
        has_upper = upper_path is not None or upper_fd_index is not None
        has_work = work_path is not None or work_fd_index is not None
        if has_upper != has_work:
            raise _invalid("workDirectory" if has_upper else "upperDirectory")
        if upper_path is not None:
            upper_path = _absolute(upper_path, "upperDirectory")
        if work_path is not None:
            work_path = _absolute(work_path, "workDirectory")
        if where is not None:
            where = _absolute(where, "where")
        if userns_fd_index is not None and (uid_map is not None or gid_map is not None):
            raise _invalid("uidMap" if uid_map is not None else "gidMap")
        if gid_map is not None and uid_map is None:
            raise _invalid("gidMap")
        uids = _mapping(uid_map, "uidMap")
        gids = _mapping(gid_map, "gidMap")
        try:
            policy = None if verity is None else VerityPolicy(verity)
        except ValueError:
            raise _invalid("verity") from None
        if expected_digest is not None:
            text = expected_digest.partition(":")[2] if ":" in expected_digest else expected_digest
            if not is_hex_digest(text.strip().lower(), self.repo.hash_algorithm):
                raise _invalid("expectedDigest")
            expected_digest = text.strip().lower()

        taken: list[int] = []
        try:
            upper: str | int | None = upper_path
            work: str | int | None = work_path
            userns: int | None = None
            if upper_fd_index is not None:
                upper = ctx.take_fd(upper_fd_index, "upperDirectoryFileDescriptor")
                taken.append(upper)
            if work_fd_index is not None:
                work = ctx.take_fd(work_fd_index, "workDirectoryFileDescriptor")
                taken.append(work)
            if userns_fd_index is not None:
                userns = ctx.take_fd(userns_fd_index, "userNamespaceFileDescriptor")
                taken.append(userns)
            with self.tracker.mounting(), _mapped(image=image):
                mount = mount_repository_image(
                    self.repo,
                    image,
                    verity=policy,
                    read_only=read_only,
                    upperdir=upper,
                    workdir=work,
                    userns_fd=userns,
                    uid_map=uids,
                    gid_map=gids,
                    expected_digest=expected_digest,
                    digest_cache=self.image_digests,
                )
                with mount:
                    out = mount_reply(mount)
                    digest = out["digest"]
                    if where is not None:
                        mount.attach(where)
                        out["where"] = where
                        log.info("mounted image %s at %s for pid %d", digest, where, ctx.peer.pid)
                    else:
                        self.tracker.pin_detached(
                            digest,
                            mount.fd,
                            peer_pid=ctx.peer.pid,
                            peer_uid=ctx.peer.uid,
                            objects=ObjectsDirectory.of(self.repo),
                        )
                        out["mountFileDescriptor"] = ctx.push_fd(mount.detach_fd())
        finally:
            for fd in taken:
                os.close(fd)
        return out

    # -- MountDumpfile ---------------------------------------------------------------------
    def set_mount_dumpfile_rate(self, per_minute: int) -> None:
        """``--mount-dumpfile-rate``, at start and on reload (the buckets stay)."""
        with self._own_mounts_lock:
            self.mount_dumpfile_rate = per_minute
            if self.own_mounts is not None:
                self.own_mounts.limits.calls_per_minute = per_minute

    def MountDumpfile(
        self,
        dumpfile_fd_index: int,
        object_fd_indexes: list[int],
        userns_fd_index: int | None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        """Any peer's own image: :mod:`composefsd.service.ownmount`."""
        with self._own_mounts_lock:  # one OwnMounts, whichever call comes first
            if self.own_mounts is None:
                from composefsd.service.ownmount import OwnMounts

                self.own_mounts = OwnMounts()
                self.own_mounts.limits.calls_per_minute = self.mount_dumpfile_rate
        return self.own_mounts.call(_request, dumpfile_fd_index, object_fd_indexes, userns_fd_index)

    # -- Unmount ----------------------------------------------------------------------------
    def Unmount(
        self,
        where: str,
        lazy: bool | None,
        # allowInteractiveAuthentication: read by the polkit check before the call
        # (composefsd.service.polkit), not here.
        allow_interactive_authentication: bool | None = None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        path = _absolute(where, "where")

        def not_mounted() -> NoReturn:
            raise _error("NotMounted", where=where)

        # The path is resolved once, by unmount (which tells the mount by its id
        # beneath the pinned parent): a path check here, then another walk there,
        # would be a window to swap a component for a symbolic link.
        try:
            with self._unmount_lock:
                gone = unmount(path, lazy=_bool(lazy))
        except NotComposefsMountError:
            not_mounted()
        except MountError as exc:
            # Gone meanwhile (another caller unmounted it first): as if never there.
            with _mapped():
                if composefs_mount_at(os.path.realpath(path)) is None:
                    not_mounted()
            mapped = reply_error(exc)
            assert mapped is not None
            raise mapped from exc
        except OSError as exc:  # mountinfo unreadable
            mapped = reply_error(exc)
            assert mapped is not None
            raise mapped from exc
        log.info("unmounted %s from %s for pid %d", gone.source, gone.mountpoint, _request.peer.pid)
        return {"digest": gone.digest} if gone.digest is not None else {}

    # -- ListMounts -------------------------------------------------------------------------
    def ListMounts(self, all_mounts: bool | None, *, _request: CallContext) -> dict[str, Any]:
        with _mapped():
            mounts = self.tracker.own_mounts()
            ours = {m.mount_id for m in repository_mounts(self.repo, mounts)}
        return {
            "mounts": [
                _mount_entry(m, m.mount_id in ours)
                for m in mounts
                if _bool(all_mounts) or m.mount_id in ours
            ]
        }

    # -- ListImages -------------------------------------------------------------------------
    def ListImages(self, image: str | None, *, _request: CallContext) -> dict[str, Any]:
        with _mapped(image=image):
            entries = self.repo.list_images()
            if image is not None:
                digest = self.repo.resolve_image(image)
                entries = [e for e in entries if e.digest == digest]
                if not entries:
                    raise ImageNotFoundError(f"no image {image!r}")
        return {
            "images": [
                {
                    "digest": e.digest,
                    "refs": list(e.refs),
                    "size": e.size,
                    "createdUSec": int(e.created * 1_000_000),
                }
                for e in entries
            ]
        }

    # -- RemoveImage ------------------------------------------------------------------------
    def RemoveImage(
        self,
        image: str,
        # allowInteractiveAuthentication: read by the polkit check before the call
        # (composefsd.service.polkit), not here.
        allow_interactive_authentication: bool | None = None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        with self.tracker.exclusive(), _mapped(image=image):
            digest = self.repo.resolve_image(image)
            users = self.tracker.in_use(self.repo).get(digest)
            if users:
                raise _error("ImageInUse", image=image, where=users)
            removed = self.repo.remove_image(digest)
        log.info("removed image %s (refs: %s) for pid %d", digest, removed, _request.peer.pid)
        return {"removedRefs": removed}

    # -- GarbageCollect ---------------------------------------------------------------------
    def GarbageCollect(
        self,
        dry_run: bool | None,
        roots: list[str] | None = None,
        # allowInteractiveAuthentication: read by the polkit check before the call
        # (composefsd.service.polkit), not here.
        allow_interactive_authentication: bool | None = None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        repo = self.repo
        roots = roots or []
        if len(roots) > MAX_GC_ROOTS:
            raise _invalid("roots")
        for i, root in enumerate(roots):
            if not entry_name_ok(root):
                raise _invalid(f"roots[{i}]")
        with (
            self.tracker.exclusive(),
            self._reporter(_request) as report,
            _mapped(),
        ):
            pins = sorted(self.gc_pins())
            result = repo.gc(
                pins=pins,
                roots=roots,
                dry_run=_bool(dry_run),
                progress=report,
                timeout=self.gc_timeout,
            )
        return {
            "objectsRemoved": result.objects_removed,
            "bytesRemoved": result.bytes_removed,
            "imagesRemoved": result.images_removed,
            "linksRemoved": result.links_removed,
            "streamsPruned": result.streams_pruned,
            "dryRun": result.dry_run,
        }

    def gc_pins(self) -> set[str]:
        """Digests of this repository's images in use (:meth:`MountTracker.in_use`)
        that it still has (a mount may show our objects under an image file of
        its own)."""
        repo = self.repo
        return {
            digest
            for digest in self.tracker.in_use(repo)
            if is_hex_digest(digest, repo.hash_algorithm) and has_image(repo, digest)
        }


def _mount_entry(m: ComposefsMount, in_repository: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "where": m.mountpoint,
        "source": m.source,
        "readOnly": m.read_only,
        "verity": m.verity,
        "inRepository": in_repository,
    }
    if m.digest is not None:
        out["digest"] = m.digest
    return out
