"""Mounting composefs images: EROFS from the image file, overlayfs over it and the objects.

The sequence (see docs in README and ``composefs-rs`` ``mount.rs``):

1. check the image's header and superblock, and its digest as the verity policy asks;
2. mount EROFS from the file (``source=/proc/self/fd/N``), or from a read-only
   loop device where the kernel answers ENOTBLK;
3. idmap the EROFS mount if asked (``mount_setattr(MOUNT_ATTR_IDMAP)``); the
   metadata layer is where ownership comes from, so this is enough;
4. build the overlay: ``metacopy=on``, ``redirect_dir=on``, optionally
   ``verity=require``, the EROFS as the lower layer and each basedir as a
   data-only layer, plus upperdir/workdir for a writable mount;
5. ``fsmount`` it, detached; the caller attaches it with :func:`attach` or
   passes the fd on.

Layers go to overlayfs either as fds (``lowerdir+``/``datadir+`` with
``FSCONFIG_SET_FD``, which needs 6.13 for fds and 6.15 for a detached EROFS), or
as one string ``lowerdir=/proc/self/fd/A::/proc/self/fd/B`` with the EROFS
attached at a temporary directory for the moment the overlay is created.
:func:`probe_layer_mode` decides once per process by trying the fd form on a
scratch tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from composefsd.image.format import BLOCK_SIZE
from composefsd.image.reader import ImageFormatError, ImageSuperblock, read_superblock
from composefsd.kernel.syscalls import (
    MNT_DETACH,
    MOUNT_ATTR_RDONLY,
    UMOUNT_NOFOLLOW,
    FsContext,
    KernelError,
    mount_root_id,
    mount_setattr_idmap,
    move_mount,
    umount2,
)
from composefsd.objectlayout import iter_objects, object_relpath
from composefsd.verity_policy import VerityPolicy

if TYPE_CHECKING:
    from composefsd.kernel.imagecache import ImageDigestCache
    from composefsd.kernel.mountinfo import ComposefsMount
    from composefsd.kernel.userns import IdMapping
    from composefsd.kernel.verity import Algorithm

# mount.composefs runs this once per mount, as a fresh process: fs-verity hashing,
# loop devices, tempfile, the idmapping code and the mount table's parser are
# imported only by the calls that need them (the last two cost a mount 4 ms).

__all__ = [
    "DetachedMount",
    "ImageVerityError",
    "LayerMode",
    "MountError",
    "MountOptions",
    "NotComposefsMountError",
    "VerityPolicy",
    "attach",
    "idmap_image_mount",
    "list_mounts",
    "mount_image",
    "normalize_digest",
    "probe_layer_mode",
    "unmount",
]


def _log(level: Literal["debug", "info"], message: str, *args: object) -> None:
    """Log ``message`` at ``level`` through this module's logger if the process has
    loaded logging. One that has not (``mount.composefs``: loading it costs each
    mount 24 million instructions, 7 ms) has configured no handler, so a debug or
    info record would go nowhere."""
    logging = sys.modules.get("logging")
    if logging is not None:
        getattr(logging.getLogger(__name__), level)(message, *args)


LayerMode = Literal["fd", "string"]
Backing = Literal["file", "loop"]
ImageCheck = Literal["kernel", "userspace", "none"]

#: Set to "fd" or "string" to skip the probe (for tests and for debugging a kernel).
LAYER_MODE_ENV: Final = "COMPOSEFSD_MOUNT_LAYERS"

NO_VERITY: Final = "Image has no fs-verity"
WRONG_VERITY: Final = "Image has wrong fs-verity"


class MountError(OSError):
    """A mount failed. ``str()`` is a full sentence; ``errno`` is the cause's errno,
    and ``log`` holds the kernel's fs-context messages, if any."""

    def __init__(self, err: int, message: str, *, log: Sequence[str] = ()) -> None:
        super().__init__(err, os.strerror(err))
        self.message = message
        self.log = list(log)

    def __str__(self) -> str:
        return self.message


class NotComposefsMountError(MountError):
    """:func:`unmount` found no composefs mount at the path it was given (EINVAL)."""


class ImageVerityError(MountError):
    """The image's digest is missing or wrong. ``reason`` is C's text, "Image has no
    fs-verity" or "Image has wrong fs-verity"; the errno is C's too (ENOTTY, EILSEQ)."""

    def __init__(self, reason: str, detail: str) -> None:
        err = errno.ENOTTY if reason == NO_VERITY else errno.EILSEQ
        super().__init__(err, f"{reason}: {detail}")
        self.reason = reason


PathOrFd = str | os.PathLike[str] | int


@dataclass(slots=True)
class MountOptions:
    """What to mount the image with. Paths may be given as open fds instead."""

    #: Object directories, searched in order (at least one).
    basedirs: Sequence[PathOrFd] = ()
    verity: VerityPolicy = VerityPolicy.DISABLED
    #: The image's expected fs-verity digest (hex); a mismatch refuses the mount
    #: under every policy.
    expected_digest: str | None = None
    #: The hash of the digests: an :class:`~composefsd.kernel.verity.Algorithm` or its name.
    algorithm: Algorithm | str = "sha256"
    #: None: read-only unless an upperdir is given.
    read_only: bool | None = None
    upperdir: PathOrFd | None = None
    workdir: PathOrFd | None = None
    #: Idmap through this user namespace...
    userns_fd: int | None = None
    #: ...or through one made from these maps (gid_map defaults to uid_map).
    uid_map: Sequence[IdMapping] | None = None
    gid_map: Sequence[IdMapping] | None = None
    #: The mount source becomes "composefs:<name>" (default: the expected digest,
    #: else plain "composefs" as C writes it).
    name: str | None = None
    #: Force a layer-passing form instead of probing.
    layer_mode: LayerMode | None = None
    #: Force EROFS from the file or from a loop device (default: the file, loop on ENOTBLK).
    backing: Backing | None = None
    #: Where an image digest computed in userspace is remembered, so that the same
    #: unchanged file is not hashed again (a long-running caller's; see
    #: :mod:`composefsd.kernel.imagecache` for what it trusts).
    digest_cache: ImageDigestCache | None = None


@dataclass(slots=True)
class DetachedMount:
    """A composefs overlay mount that is not attached anywhere yet.

    ``fd`` belongs to this object: :meth:`attach` or :meth:`close` it, or take it
    with :meth:`detach_fd` to pass it on (over SCM_RIGHTS, say).
    """

    fd: int
    source: str
    #: How the image's digest was checked: by the kernel's fs-verity, by hashing
    #: the image in userspace, or not at all.
    image_check: ImageCheck
    #: The digest that was checked (hex), when one was.
    image_digest: str | None
    #: overlayfs checks every object's fs-verity digest (``verity=require``).
    object_verity: bool
    layer_mode: LayerMode
    backing: Backing
    idmapped: bool
    read_only: bool
    notes: list[str] = field(default_factory=list)

    def __enter__(self) -> DetachedMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def detach_fd(self) -> int:
        fd, self.fd = self.fd, -1
        return fd

    def attach(self, where: str | os.PathLike[str]) -> None:
        """Attach at ``where`` and close the fd."""
        if self.fd < 0:
            raise MountError(errno.EBADF, "this mount was already attached or closed")
        attach(self.fd, where)
        self.close()


def _open_dir(what: str, value: PathOrFd, flags: int, stack: contextlib.ExitStack) -> int:
    if isinstance(value, int):
        st = _fstat(value, what)
        if not stat.S_ISDIR(st.st_mode):
            raise MountError(errno.ENOTDIR, f"{what} (fd {value}) is not a directory")
        return value
    try:
        fd = os.open(value, flags | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(
            e.errno or errno.EINVAL, f"{what} {os.fspath(value)}: {e.strerror}"
        ) from None
    stack.callback(os.close, fd)
    return fd


def _check_upper_pair(upper_fd: int, work_fd: int) -> None:
    """What overlayfs would refuse with a bare EINVAL (its reason goes to dmesg only)."""
    if os.fstat(upper_fd).st_dev != os.fstat(work_fd).st_dev:
        raise MountError(errno.EINVAL, "upperdir and workdir must be on the same filesystem")
    upper = os.path.realpath(f"/proc/self/fd/{upper_fd}")
    work = os.path.realpath(f"/proc/self/fd/{work_fd}")
    if upper == work:
        raise MountError(errno.EINVAL, f"upperdir and workdir are the same directory, {upper}")
    for inner, outer, a, b in (
        (work, upper, "workdir", "upperdir"),
        (upper, work, "upperdir", "workdir"),
    ):
        if inner.startswith(outer.rstrip("/") + "/"):
            raise MountError(errno.EINVAL, f"{a} {inner} is inside {b} {outer}")


def _fstat(fd: int, what: str) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as e:
        raise MountError(e.errno or errno.EBADF, f"{what} (fd {fd}): {e.strerror}") from None


def _algorithm(value: Algorithm | str) -> Algorithm:
    from composefsd.kernel.verity import Algorithm

    try:
        return Algorithm.parse(value)
    except ValueError as e:
        raise MountError(errno.EINVAL, str(e)) from None


def normalize_digest(hexdigest: str, algorithm: Algorithm) -> str:
    """``hexdigest`` in lower case, or MountError(EINVAL) if it is no digest of ``algorithm``."""
    text = hexdigest.strip().lower()
    want = algorithm.digest_size * 2
    if len(text) != want or any(c not in "0123456789abcdef" for c in text):
        raise MountError(
            errno.EINVAL,
            f"expected digest {hexdigest!r} is not a {algorithm.value} digest ({want} hex digits)",
        )
    return text


@functools.cache
def probe_layer_mode() -> LayerMode:
    """Whether this kernel takes detached mounts as overlay layers by fd (6.15+)."""
    forced = os.environ.get(LAYER_MODE_ENV, "")
    if forced in ("fd", "string"):
        return "fd" if forced == "fd" else "string"
    try:
        with FsContext("tmpfs") as tmpfs:
            tmpfs.create()
            lower = tmpfs.mount(MOUNT_ATTR_RDONLY)
        data = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with FsContext("overlay") as overlay:
                overlay.set_fd("lowerdir+", lower)
                overlay.set_fd("datadir+", data)
                overlay.create()
        finally:
            os.close(data)
            os.close(lower)
    except KernelError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            raise MountError(
                e.errno, f"mounting needs CAP_SYS_ADMIN in the initial user namespace ({e})"
            ) from None
        _log("info", "overlay layers go by string: the kernel refused them by fd (%s)", e)
        return "string"
    _log("debug", "overlay layers go by fd")
    return "fd"


@dataclass(slots=True)
class _Checks:
    image_check: ImageCheck = "none"
    image_digest: str | None = None
    object_verity: bool = False
    notes: list[str] = field(default_factory=list)


def _measure(fd: int, algorithm: Algorithm) -> str | None:
    """The kernel's digest of the image, or None where it has none or cannot say."""
    from composefsd.kernel.verity import (
        VerityNotEnabledError,
        VerityUnsupportedError,
        measure_verity,
    )

    try:
        return measure_verity(fd, algorithm).hex()
    except (VerityNotEnabledError, VerityUnsupportedError):
        return None


def _check_image(
    fd: int, label: str, opts: MountOptions, alg: Algorithm, expected: str | None
) -> _Checks:
    from composefsd.fsverity import digest_fd
    from composefsd.kernel.verity import (
        VerityAlgorithmMismatchError,
        VerityError,
        VerityNotEnabledError,
        VerityUnsupportedError,
        measure_verity,
    )

    checks = _Checks()
    if opts.verity is VerityPolicy.REQUIRED:
        if expected is None:
            # As C: "verity" without "digest=" leaves the image unchecked and only
            # makes overlayfs demand verity on the objects.
            checks.notes.append("no expected digest: the image itself was not checked")
            return checks
        try:
            measured = measure_verity(fd, alg).hex()
        except (VerityNotEnabledError, VerityUnsupportedError) as e:
            raise ImageVerityError(NO_VERITY, f"{label}: {e}") from None
        except VerityAlgorithmMismatchError as e:
            raise ImageVerityError(WRONG_VERITY, f"{label}: {e}") from None
        except VerityError as e:
            raise MountError(e.errno or errno.EIO, f"cannot measure {label}: {e}") from None
        if measured != expected:
            raise ImageVerityError(
                WRONG_VERITY, f"{label} measures {measured}, expected {expected}"
            )
        checks.image_check, checks.image_digest = "kernel", measured
        return checks
    if expected is None:
        return checks
    kernel_digest = None
    if opts.verity is VerityPolicy.TRY:
        try:
            kernel_digest = _measure(fd, alg)
        except VerityError as e:
            raise ImageVerityError(WRONG_VERITY, f"{label}: {e}") from None
    if kernel_digest is not None:
        checks.image_check = "kernel"
        measured = kernel_digest
    else:
        # Disabled never asks fs-verity, even where the image has it (README, IDL).
        if opts.digest_cache is None:
            measured = digest_fd(fd, alg).hex()
        else:
            measured, remembered = opts.digest_cache.digest(fd, alg)
            if remembered:
                checks.notes.append(
                    "the image's digest was computed in userspace at an earlier mount; "
                    "the file is unchanged since"
                )
        checks.image_check = "userspace"
        if opts.verity is VerityPolicy.TRY:
            checks.notes.append("the image has no fs-verity: its digest was computed in userspace")
    if measured != expected:
        raise ImageVerityError(WRONG_VERITY, f"{label} has digest {measured}, expected {expected}")
    checks.image_digest = measured
    return checks


def _sample_object(basedir_fd: int, algorithm: Algorithm) -> int | None:
    """An fd on some object below ``basedir_fd``; temporaries are no sample."""
    try:
        for hexdigest in iter_objects(basedir_fd, algorithm):
            return os.open(
                object_relpath(hexdigest),
                os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                dir_fd=basedir_fd,
            )
    except OSError:
        return None
    return None


def _objects_have_verity(basedir_fds: Sequence[int], algorithm: Algorithm) -> bool:
    """Try policy: do the objects carry fs-verity the kernel can check?

    One object per basedir is measured: repositories enable verity on all of their
    objects or on none, and overlayfs would fail reads with EIO on a kernel or
    filesystem without fs-verity, which is exactly what Try must avoid.
    """
    from composefsd.kernel.verity import VerityError, measure_verity

    seen = False
    for fd in basedir_fds:
        obj = _sample_object(fd, algorithm)
        if obj is None:
            continue
        try:
            measure_verity(obj, algorithm)
        except VerityError:
            return False
        finally:
            os.close(obj)
        seen = True
    return seen


def _mount_erofs(
    image_fd: int,
    label: str,
    sb: ImageSuperblock,
    backing: Backing | None,
) -> tuple[int, Backing]:
    def attempt(source_fd: int) -> int:
        with FsContext("erofs") as ctx:
            ctx.set_string("source", f"/proc/self/fd/{source_fd}")
            ctx.set_flag("ro")
            if not sb.has_acl:
                # As C: an image without ACLs needs no ACL checks.
                ctx.set_flag("noacl")
            ctx.create()
            return ctx.mount(MOUNT_ATTR_RDONLY)

    if backing != "loop":
        try:
            return attempt(image_fd), "file"
        except KernelError as e:
            if e.errno != errno.ENOTBLK or backing == "file":
                raise _kernel_failure(label, "EROFS", e) from None
            _log("info", "the kernel cannot mount %s from a file; using a loop device", label)
    from composefsd.kernel.loop import attach_loop

    try:
        loop_fd = attach_loop(image_fd, label)
    except OSError as e:
        raise MountError(
            e.errno or errno.EIO, f"cannot set up a loop device for {label}: {e}"
        ) from None
    try:
        return attempt(loop_fd), "loop"
    except KernelError as e:
        raise _kernel_failure(label, "EROFS", e) from None
    finally:
        # The device clears itself when the mount goes (LO_FLAGS_AUTOCLEAR).
        os.close(loop_fd)


def _kernel_failure(label: str, stage: str, e: KernelError) -> MountError:
    message = f"cannot mount composefs image {label} ({stage}): {e.call}: {e.strerror}"
    if e.log:
        message += "; the kernel says: " + "; ".join(e.log)
    return MountError(e.errno or errno.EIO, message, log=e.log)


@contextlib.contextmanager
def _erofs_at_tmpdir(erofs_fd: int) -> Iterator[int]:
    """String form: attach the EROFS at a private temporary directory for the
    moment the overlay is created, and hand out an O_PATH fd on it.

    Unless a temporary directory is chosen ($TMPDIR, $TEMP, $TMP or
    tempfile.tempdir), root's goes in /run, not /tmp: boot mounts run before
    local-fs.target, when /tmp may still be a directory of a read-only root, or
    about to be covered by tmp.mount; /run is a tmpfs from systemd's start on."""
    import tempfile

    parent = None
    chosen = tempfile.tempdir or any(os.environ.get(v) for v in ("TMPDIR", "TEMP", "TMP"))
    if not chosen and os.geteuid() == 0 and os.access("/run", os.W_OK):
        parent = "/run"
    try:
        tmpdir = tempfile.mkdtemp(prefix=".composefs.", dir=parent)
    except OSError as e:
        raise MountError(
            e.errno or errno.EIO,
            f"cannot make a temporary directory for the EROFS layer in "
            f"{parent or tempfile.gettempdir()}: {e.strerror}",
        ) from None
    attached = False
    try:
        move_mount(erofs_fd, tmpdir)
        attached = True
        fd = os.open(tmpdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        if attached:
            umount2(tmpdir, MNT_DETACH)
        os.rmdir(tmpdir)


def _build_overlay(
    source: str,
    erofs_fd: int,
    basedir_fds: Sequence[int],
    upper: tuple[int, int] | None,
    *,
    verity: VerityPolicy,
    object_verity: bool,
    layer_mode: LayerMode,
    read_only: bool,
    label: str,
) -> tuple[int, bool]:
    with FsContext("overlay") as ov, contextlib.ExitStack() as stack:
        try:
            ov.set_string("source", source)
            ov.set_string("metacopy", "on")
            ov.set_string("redirect_dir", "on")
            if object_verity:
                try:
                    ov.set_string("verity", "require")
                except KernelError as e:
                    # Try tolerates a kernel that does not know the option (< 6.6).
                    if verity is VerityPolicy.REQUIRED or e.errno not in (
                        errno.EINVAL,
                        errno.ENOSYS,
                    ):
                        raise
                    object_verity = False
            if layer_mode == "fd":
                ov.set_fd("lowerdir+", erofs_fd)
                for fd in basedir_fds:
                    ov.set_fd("datadir+", fd)
                if upper is not None:
                    ov.set_fd("upperdir", upper[0])
                    ov.set_fd("workdir", upper[1])
            else:
                lower_fd = stack.enter_context(_erofs_at_tmpdir(erofs_fd))
                ov.set_string(
                    "lowerdir", "::".join(f"/proc/self/fd/{fd}" for fd in (lower_fd, *basedir_fds))
                )
                if upper is not None:
                    ov.set_string("upperdir", f"/proc/self/fd/{upper[0]}")
                    ov.set_string("workdir", f"/proc/self/fd/{upper[1]}")
            ov.create()
            return ov.mount(MOUNT_ATTR_RDONLY if read_only else 0), object_verity
        except KernelError as e:
            raise _kernel_failure(label, "overlay", e) from None


def mount_image(image: PathOrFd, options: MountOptions) -> DetachedMount:
    """Mount a composefs image, detached; see the module docstring for the steps.

    ``image`` is a path or an open fd (not closed). Raises :class:`MountError`
    (:class:`ImageVerityError` for a missing or wrong digest) with a message naming
    what is wrong; nothing stays mounted or open after a failure.
    """
    opts = options
    label = f"fd {image}" if isinstance(image, int) else os.fspath(image)
    if not opts.basedirs:
        raise MountError(errno.EINVAL, "no basedir given: at least one object directory is needed")
    if (opts.upperdir is None) != (opts.workdir is None):
        raise MountError(errno.EINVAL, "upperdir and workdir must be given together")
    if opts.gid_map is not None and opts.uid_map is None:
        raise MountError(
            errno.EINVAL, "a gid_map needs a uid_map (the gid_map defaults to the uid_map)"
        )
    if opts.userns_fd is not None and opts.uid_map is not None:
        raise MountError(errno.EINVAL, "give either a user namespace fd or an id mapping, not both")
    read_only = opts.upperdir is None if opts.read_only is None else opts.read_only
    expected = (
        None
        if opts.expected_digest is None
        else normalize_digest(opts.expected_digest, _algorithm(opts.algorithm))
    )
    name = opts.name if opts.name is not None else expected
    source = "composefs" if not name else f"composefs:{name}"
    if any(c in source for c in " \t\n,\\"):
        raise MountError(
            errno.EINVAL, f"mount name {name!r} has whitespace, a comma or a backslash"
        )
    layer_mode = opts.layer_mode or probe_layer_mode()

    with contextlib.ExitStack() as stack:
        if isinstance(image, int):
            image_fd = image
        else:
            try:
                image_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise MountError(
                    e.errno or errno.EINVAL, f"cannot open image {label}: {e.strerror}"
                ) from None
            stack.callback(os.close, image_fd)
        st = _fstat(image_fd, "image")
        if not stat.S_ISREG(st.st_mode):
            raise MountError(errno.EINVAL, f"image {label} is not a regular file")
        try:
            head = os.pread(image_fd, BLOCK_SIZE, 0)
        except OSError as e:
            raise MountError(
                e.errno or errno.EIO, f"cannot read image {label}: {e.strerror}"
            ) from None
        try:
            sb = read_superblock(head, st.st_size)
        except ImageFormatError as e:
            raise MountError(
                errno.EINVAL, f"{label} is not a usable composefs image: {e}"
            ) from None

        basedir_fds = [_open_dir("basedir", b, os.O_PATH, stack) for b in opts.basedirs]
        upper = None
        if opts.upperdir is not None and opts.workdir is not None:
            upper = (
                _open_dir("upperdir", opts.upperdir, os.O_PATH, stack),
                _open_dir("workdir", opts.workdir, os.O_PATH, stack),
            )
            _check_upper_pair(*upper)

        checks = _Checks()
        if expected is not None or opts.verity is not VerityPolicy.DISABLED:
            alg = _algorithm(opts.algorithm)
            checks = _check_image(image_fd, label, opts, alg, expected)
        if opts.verity is VerityPolicy.REQUIRED:
            checks.object_verity = True
        elif opts.verity is VerityPolicy.TRY:
            checks.object_verity = _objects_have_verity(basedir_fds, alg)
            if not checks.object_verity:
                checks.notes.append(
                    "the objects have no fs-verity the kernel can check: verity=require not set"
                )

        userns_fd = opts.userns_fd
        if opts.uid_map is not None:
            try:
                from composefsd.kernel.userns import create_userns

                userns_fd = create_userns(opts.uid_map, opts.gid_map)
            except ValueError as e:
                raise MountError(errno.EINVAL, f"bad id mapping: {e}") from None
            except OSError as e:
                raise MountError(
                    e.errno or errno.EINVAL, f"cannot create the idmap user namespace: {e}"
                ) from None
            stack.callback(os.close, userns_fd)

        erofs_fd, backing = _mount_erofs(image_fd, label, sb, opts.backing)
        stack.callback(os.close, erofs_fd)
        if userns_fd is not None:
            idmap_image_mount(erofs_fd, userns_fd, label)

        fd, object_verity = _build_overlay(
            source,
            erofs_fd,
            basedir_fds,
            upper,
            verity=opts.verity,
            object_verity=checks.object_verity,
            layer_mode=layer_mode,
            read_only=read_only,
            label=label,
        )
        return DetachedMount(
            fd=fd,
            source=source,
            image_check=checks.image_check,
            image_digest=checks.image_digest,
            object_verity=object_verity,
            layer_mode=layer_mode,
            backing=backing,
            idmapped=userns_fd is not None,
            read_only=read_only,
            notes=checks.notes,
        )
    raise AssertionError("unreachable")  # pragma: no cover


def attach(fd: int, where: str | os.PathLike[str]) -> None:
    """Attach the detached mount ``fd`` at the directory ``where``."""
    path = os.fspath(where)
    try:
        st = os.stat(path)
    except OSError as e:
        raise MountError(e.errno or errno.ENOENT, f"mountpoint {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(errno.ENOTDIR, f"mountpoint {path} is not a directory")
    try:
        move_mount(fd, path)
    except KernelError as e:
        raise MountError(
            e.errno or errno.EINVAL, f"cannot attach the mount at {path}: {e.strerror}"
        ) from None


def list_mounts() -> list[ComposefsMount]:
    """The composefs mounts of this mount namespace (:mod:`composefsd.kernel.mountinfo`)."""
    from composefsd.kernel.mountinfo import list_composefs_mounts

    return list_composefs_mounts()


def _composefs_mount_beneath(parent_fd: int, name: str) -> ComposefsMount | None:
    """The composefs mount whose root ``name`` in the directory ``parent_fd`` is (the
    topmost stacked there); None if that is no mount's root or not composefs."""
    from composefsd.kernel.mountinfo import composefs_mount_with_id

    try:
        mount_id = mount_root_id(parent_fd, name)
    except KernelError as e:
        if e.errno == errno.ENOSYS:
            raise MountError(
                errno.ENOSYS, f"cannot tell which mount {name} is: {e.strerror}"
            ) from None
        return None
    return None if mount_id is None else composefs_mount_with_id(mount_id)


def idmap_image_mount(mount_fd: int, userns_fd: int, label: str) -> None:
    """Idmap the detached EROFS mount of ``label`` through ``userns_fd``'s mapping."""
    try:
        mount_setattr_idmap(mount_fd, userns_fd)
    except KernelError as e:
        raise MountError(
            e.errno or errno.EINVAL, f"cannot idmap the mount of {label}: {e.strerror}"
        ) from None


def unmount(where: str | os.PathLike[str], *, lazy: bool = False) -> ComposefsMount:
    """Unmount the composefs mount at ``where``; refuses anything that is not one
    (:class:`NotComposefsMountError`).

    ``lazy`` detaches it even while files in it are open (MNT_DETACH).
    """
    # ``where`` may come from a caller who controls a directory along it. Resolving
    # it once to check and again to unmount would let them swap a component for a
    # symbolic link in between and have another mount taken down (UMOUNT_NOFOLLOW
    # guards only the last component). So the path is walked once: its parent is
    # pinned by an O_PATH fd, the mount is told by its id (not by a path string)
    # beneath that fd, and umount2 walks /proc/self/fd/<parent>/<name>, through the
    # very same directory. Between check and unmount the mount at parent/name cannot
    # turn into another: a mount point cannot be renamed or removed in this mount
    # namespace (EBUSY); removing it from another namespace only detaches it, leaving
    # an empty directory or nothing there (umount2 fails: EINVAL, ENOENT); and
    # mounting there again, or on top of it, takes CAP_SYS_ADMIN over this mount
    # namespace (the host's, owned by the initial user namespace), i.e. root, who may
    # unmount anything anyway. Mounts made in an unprivileged user's namespaces do
    # not propagate back into it. The fd pins only the parent, not the mount, so it
    # does not make a non-lazy unmount EBUSY.
    path = os.fspath(where)
    not_mounted = NotComposefsMountError(errno.EINVAL, f"{path} is not a composefs mount point")
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        raise not_mounted from None
    parent, name = os.path.split(real)
    if not name:  # "/": no parent to pin, and never composefs here
        raise not_mounted
    try:
        parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise not_mounted from None
    try:
        found = _composefs_mount_beneath(parent_fd, name)
        # The id names the mount; the path string only confirms it is the one the
        # caller's path led to when it was resolved (a component swapped before the
        # parent was opened leads elsewhere: refused, not another mount unmounted).
        if found is None or found.mountpoint != real:
            raise not_mounted
        try:
            umount2(
                f"/proc/self/fd/{parent_fd}/{name}",
                UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0),
            )
        except KernelError as e:
            if e.errno == errno.EBUSY:
                raise MountError(
                    errno.EBUSY,
                    f"{path} is busy (open files or mounts below it); "
                    "a lazy unmount detaches it anyway",
                ) from None
            raise MountError(
                e.errno or errno.EINVAL, f"cannot unmount {path}: {e.strerror}"
            ) from None
    finally:
        os.close(parent_fd)
    return found
