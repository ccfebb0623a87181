"""Mounting an image composefsd wrote over a caller's own object directories, for a
caller without any privilege (io.composefs.Repository.MountDumpfile).

The caller controls the image's contents (through the dumpfile composefsd parsed
and wrote) and the object directories; the kernel must parse only an EROFS image
of composefsd's writer and reach the objects only with the caller's own rights.
So, in :func:`mount_caller_image`:

1. the image lives in daemon-owned memory, a sealed memfd (:func:`sealed_image`):
   nobody can change it after it is checked, and nothing is written anywhere.
   EROFS mounts it from the file where the kernel can, else (6.18 refuses shmem
   files with ENOTBLK) from a read-only, auto-clearing loop device over it;
2. the EROFS mount is idmapped through the caller's user namespace (its owner
   must be the caller: :func:`userns_owner`) or, without one, through a namespace
   that maps id 0 to the caller's uid and gid and nothing else
   (:func:`default_idmap`): what the image says root owns, the caller owns; every
   other id shows as the overflow id;
3. overlayfs is created (``FSCONFIG_CMD_CREATE``) in a thread of its own whose
   filesystem uid and gid and groups are the caller's and whose only effective
   capability is CAP_SYS_ADMIN (:func:`_as_caller`). Overlayfs keeps the
   credentials of the task that creates its superblock and opens and looks up
   every layer's files with them. Changing the fsuid from 0 to another id
   clears the effective CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH,
   CAP_FOWNER, CAP_FSETID, CAP_LINUX_IMMUTABLE, CAP_MAC_OVERRIDE and CAP_MKNOD
   (the kernel's CAP_FS_SET); ``capset`` then drops the rest (CAP_SYS_PTRACE
   would open other processes' ``/proc`` files, ...), all but CAP_SYS_ADMIN,
   which reading the image's ``trusted.overlay.*`` xattrs needs. The thread's
   credentials are changed with raw syscalls, which act on the calling thread
   only (glibc's setgroups would change every thread of the daemon), and the
   thread ends with the call, so nothing it leaves behind outlives it. Dumpfiles
   and object directories on kernel filesystems (proc, sysfs, ...: their files
   answer by the reader's capabilities) are refused (:data:`PSEUDO_FILESYSTEMS`);
4. the layers go to overlayfs as fds (``lowerdir+``, ``datadir+`` with
   ``FSCONFIG_SET_FD``): no path is ever resolved again. A kernel without that
   (before 6.15) is refused: the string form would reopen paths;
5. the overlay is mounted read-only, nosuid and nodev, detached. Those flags
   are not locked (the mount is no copy into a less privileged namespace), so a
   caller owning the mount namespace it attaches the mount in can clear them
   (tested): the service layer refuses device nodes and setuid or setgid files
   in the dumpfile, and the overlay has no upper layer, so nothing depends on
   them;
6. the overlay is created in the caller's mount namespace when it is not the
   daemon's (:func:`caller_mount_namespace`, from the connection's pidfd):
   overlayfs takes a layer only from the creating task's mount namespace (else
   EINVAL at ``FSCONFIG_CMD_CREATE``; a detached tree such as the EROFS mount
   is taken from any), and a container's directories are of its own. The
   creator thread first takes the caller's fs ids and drops to CAP_SYS_ADMIN
   and CAP_SYS_CHROOT, then ``unshare(CLONE_FS)`` (setns needs an fs_struct of
   its own; the daemon's other threads keep theirs) and ``setns`` with the
   namespace fd, then drops CAP_SYS_CHROOT. What could the caller's namespace do
   to it? Its root and cwd are now the caller's, so any path lookup would be
   resolved in the caller's tree: the thread makes none (fsopen takes a
   filesystem type name, fsconfig fds), runs only code already imported (no
   import could read the caller's files), and strerror reads no message
   catalog (composefsd never calls setlocale: LC_MESSAGES stays "C"). It
   acts with the caller's rights and ends with the call; ``fsmount`` is made
   by the calling thread, in the daemon's namespace. When creating there fails
   with EINVAL, the daemon's namespace is tried (directories opened before the
   caller left it, as ``composefsctl mount-dumpfile`` does).

A redirect (an object path) can only name a file below the object directory: the
writer makes it absolute from the dumpfile's payload, and overlayfs looks data
layers up beneath the layer's root without following symlinks (tests show ``..``
fails with EXDEV, a symlinked component with ELOOP); the caller's service layer
refuses such payloads before that anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from composefsd.credentials import Credentials
from composefsd.image.format import BLOCK_SIZE
from composefsd.image.reader import ImageFormatError, read_superblock
from composefsd.kernel.mount import (
    MountError,
    _kernel_failure,
    _mount_erofs,
    idmap_image_mount,
    probe_layer_mode,
)
from composefsd.kernel.syscalls import (
    CLONE_FS,
    CLONE_NEWNS,
    CLONE_NEWUSER,
    MOUNT_ATTR_RDONLY,
    FsContext,
    KernelError,
    _syscall,
    setns,
    unshare,
)
from composefsd.kernel.userns import IdMapping, create_userns

log = logging.getLogger(__name__)

__all__ = [
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NOSUID",
    "PSEUDO_FILESYSTEMS",
    "CallerMount",
    "FdKindError",
    "caller_mount_namespace",
    "check_directory_fd",
    "check_regular_fd",
    "default_idmap",
    "filesystem_type",
    "image_alive",
    "mount_caller_image",
    "sealed_image",
    "userns_owner",
]

MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
_ATTRS: Final = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV

# ioctls on namespace fds (linux/nsfs.h): _IO(0xb7, 3) and _IO(0xb7, 4).
NS_GET_NSTYPE: Final = 0xB703
NS_GET_OWNER_UID: Final = 0xB704
# ioctl on pidfds (linux/pidfd.h, Linux 6.11): _IO(0xff, 3), an fd of the process's
# mount namespace.
PIDFD_GET_MNT_NAMESPACE: Final = 0xFF03

# setgroups, setfsuid, setfsgid: x86_64's numbers and the generic table's.
_CRED_CALLS: Final = {
    "x86_64": (116, 122, 123),
    "aarch64": (159, 151, 152),
    "riscv64": (159, 151, 152),
}
_CAP_VERSION_3: Final = 0x20080522
_CAP_SYS_ADMIN: Final = 21
_CAP_SYS_CHROOT: Final = 18
# capget, capset and fstatfs are plain system calls in glibc (capset gets no
# setxid broadcast to the other threads, unlike setgroups): the C library's.
_libc = ctypes.CDLL(None, use_errno=True)
_libc_capget = _libc.capget
_libc_capset = _libc.capset
_libc_fstatfs = _libc.fstatfs


class FdKindError(MountError):
    """A passed fd is of the wrong kind; ``parameter`` names the call's field."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(errno.EBADF, f"{parameter}: {message}")
        self.parameter = parameter


def sealed_image(data: bytes, name: str = "composefsd-image") -> int:
    """A memfd holding ``data``, sealed against every change; an O_RDWR fd on it
    (a sealed memfd cannot be written through any fd)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def userns_owner(fd: int, what: str = "user namespace fd") -> int:
    """The uid owning the user namespace ``fd``; :class:`FdKindError` naming ``what``
    if ``fd`` is no user namespace."""
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        raise FdKindError(what, f"not a namespace ({e.strerror})") from None
    if kind != CLONE_NEWUSER:
        raise FdKindError(what, "a namespace, but not a user namespace")
    try:
        raw = fcntl.ioctl(fd, NS_GET_OWNER_UID, bytes(4))
    except OSError as e:
        raise FdKindError(what, f"its owner cannot be told ({e.strerror})") from None
    owner: int = struct.unpack("=I", raw)[0]
    return owner


def default_idmap(creds: Credentials) -> int:
    """A user namespace mapping id 0 to the caller's uid and gid, nothing else."""
    return create_userns([IdMapping(0, creds.uid, 1)], [IdMapping(0, creds.gid, 1)])


@dataclass(slots=True)
class CallerMount:
    """The detached overlay mount: ``fd`` is the caller's to take."""

    fd: int
    backing: str
    idmapped_by: str
    #: The EROFS superblock's device (the loop device's, when it is loop-backed):
    #: with the memfd's name, what :func:`image_alive` needs.
    image_dev: int


@contextlib.contextmanager
def _as_caller(creds: Credentials, mntns_fd: int | None = None) -> Iterator[None]:
    """The calling thread's fsuid, fsgid and groups become ``creds``', and its only
    effective capability CAP_SYS_ADMIN (module notes); with ``mntns_fd``, it is
    then moved into that mount namespace (:func:`_join_mount_namespace`), with
    CAP_SYS_CHROOT kept for that alone. Nothing is restored, so only for a thread
    that ends when the body has run (:func:`_create_overlay`)."""
    calls = _CRED_CALLS.get(os.uname().machine)
    if calls is None:
        raise MountError(errno.ENOSYS, f"unknown architecture {os.uname().machine}")
    setgroups, setfsuid, setfsgid = calls
    groups = (ctypes.c_uint * max(1, len(creds.groups)))(*creds.groups)
    if _syscall(ctypes.c_long(setgroups), ctypes.c_size_t(len(creds.groups)), groups) < 0:
        err = ctypes.get_errno()
        raise MountError(err, f"setgroups for uid {creds.uid}: {os.strerror(err)}")
    # setfsuid/setfsgid return the previous id and never fail visibly: ask again.
    _syscall(ctypes.c_long(setfsgid), ctypes.c_uint(creds.gid))
    _syscall(ctypes.c_long(setfsuid), ctypes.c_uint(creds.uid))
    if (
        _syscall(ctypes.c_long(setfsuid), ctypes.c_uint(0xFFFFFFFF)) != creds.uid
        or _syscall(ctypes.c_long(setfsgid), ctypes.c_uint(0xFFFFFFFF)) != creds.gid
    ):
        raise MountError(errno.EPERM, f"cannot take the fsuid/fsgid of uid {creds.uid}")
    if mntns_fd is None:
        _only_sys_admin()
    else:
        # setns(CLONE_NEWNS) needs CAP_SYS_CHROOT besides CAP_SYS_ADMIN; the thread
        # enters the caller's namespace only once it acts with the caller's rights.
        _only_sys_admin(1 << _CAP_SYS_CHROOT)
        _join_mount_namespace(mntns_fd)
        _only_sys_admin()
    yield


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _only_sys_admin(extra: int = 0) -> None:
    """Leave the calling thread CAP_SYS_ADMIN as its only effective capability
    (with the capabilities of the mask ``extra``).

    Changing the fsuid clears only the file capabilities; overlayfs would act with
    every other one the daemon has (CAP_SYS_PTRACE opens another process's
    ``/proc/PID/environ`` or ``mem``, for one). ``capset`` with pid 0 changes the
    calling thread alone."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc_capget(ctypes.byref(header), data) < 0:
        err = ctypes.get_errno()
        raise MountError(err, f"capget: {os.strerror(err)}")
    if not data[0].permitted & (1 << _CAP_SYS_ADMIN):
        raise MountError(errno.EPERM, "mounting needs CAP_SYS_ADMIN")
    data[0].effective = (1 << _CAP_SYS_ADMIN | extra) & data[0].permitted
    data[1].effective = 0
    if _libc_capset(ctypes.byref(header), data) < 0:
        err = ctypes.get_errno()
        raise MountError(err, f"capset: {os.strerror(err)}")


def _create_overlay(
    erofs_fd: int,
    object_fds: Sequence[int],
    creds: Credentials,
    label: str,
    mntns_fd: int | None = None,
) -> int:
    """The overlay, created in a fresh thread with the caller's fs credentials (in
    the mount namespace ``mntns_fd``, when given: module notes), mounted (detached)
    from this one."""
    result: list[FsContext] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with _as_caller(creds, mntns_fd):
                ov = FsContext("overlay")
                result.append(ov)
                ov.set_string("source", "composefs")
                ov.set_string("metacopy", "on")
                ov.set_string("redirect_dir", "on")
                ov.set_fd("lowerdir+", erofs_fd)
                for fd in object_fds:
                    ov.set_fd("datadir+", fd)
                ov.create()
        except KernelError as e:
            failure.append(_kernel_failure(label, "overlay", e))
        except BaseException as e:  # handed to the calling thread
            failure.append(e)

    # A thread of its own: the credentials and the mount namespace it takes die
    # with it.
    thread = threading.Thread(target=run, name=f"ownmount-{creds.uid}", daemon=True)
    thread.start()
    thread.join()
    with contextlib.ExitStack() as stack:
        for ov in result:
            stack.callback(ov.close)
        if failure:
            raise failure[0]
        # fsmount here, back in the daemon's mount namespace, as before callers of
        # other namespaces were served: the detached mount's (anonymous) namespace
        # belongs to the daemon's user namespace whatever the caller's.
        try:
            return result[0].mount(_ATTRS)
        except KernelError as e:
            raise _kernel_failure(label, "overlay", e) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _create_in_namespace(
    erofs_fd: int,
    object_fds: Sequence[int],
    creds: Credentials,
    label: str,
    mntns_fd: int | None,
) -> int:
    """:func:`_create_overlay` in the caller's mount namespace ``mntns_fd``, else
    (EINVAL: overlayfs refuses a layer of another namespace) in the daemon's: a
    caller may have opened its directories before it left the daemon's namespace
    (``composefsctl mount-dumpfile`` does), or the daemon may not be let enter
    another namespace (setns refused)."""
    if mntns_fd is None:
        return _create_overlay(erofs_fd, object_fds, creds, label)
    first: MountError
    try:
        return _create_overlay(erofs_fd, object_fds, creds, label, mntns_fd)
    except _CannotJoin as e:
        # setns refused (a seccomp filter, a capability bounding set without
        # CAP_SYS_ADMIN or CAP_SYS_CHROOT): serve what the daemon's namespace can.
        log.info("%s; trying composefsd's own mount namespace", e)
        first = e
    except MountError as e:
        if e.errno != errno.EINVAL:
            raise
        first = e
    try:
        return _create_overlay(erofs_fd, object_fds, creds, label)
    except MountError as e:
        if e.errno != errno.EINVAL:
            raise
        raise MountError(
            errno.EINVAL,
            f"{first}; overlayfs takes only layers of the mount namespace it is created "
            "in, and the object directories are neither all of the caller's mount "
            "namespace nor all of composefsd's",
            log=first.log,
        ) from None


def _join_mount_namespace(mntns_fd: int) -> None:
    """Move the calling thread (alone) into the mount namespace ``mntns_fd``.

    ``setns(CLONE_NEWNS)`` needs a task that shares its filesystem information
    (root, cwd, umask) with no other, and every thread of the daemon shares it:
    ``unshare(CLONE_FS)`` first gives this thread a copy of its own, so the
    other threads keep their root, cwd and namespace. Both are raw system calls
    acting on the calling thread only."""
    try:
        unshare(CLONE_FS)
        setns(mntns_fd, CLONE_NEWNS)
    except OSError as e:
        raise _CannotJoin(
            e.errno or errno.EINVAL, f"cannot enter the caller's mount namespace: {e.strerror}"
        ) from None


class _CannotJoin(MountError):
    """The creator thread could not enter the caller's mount namespace."""


def caller_mount_namespace(pidfd: int) -> int | None:
    """The mount namespace of the process ``pidfd`` names, as a new fd (close-on-exec;
    the caller closes it), or None when it is the calling thread's own.

    The namespace comes from the pidfd (``PIDFD_GET_MNT_NAMESPACE``), never from a
    pid number, so it is that process's whatever pids are reused. A process that
    has exited: :class:`MountError` with ESRCH.

    The ioctl needs ptrace read access to the process: a caller of another uid,
    or with capabilities the daemon lacks, or in another user namespace, is
    refused it (EACCES) unless the daemon has CAP_SYS_PTRACE, which the shipped
    unit does not give. Then the namespace cannot be told and None is returned:
    the overlay is made in composefsd's own namespace, which serves a caller that
    shares it and refuses (EINVAL) layers of any other."""
    try:
        fd = fcntl.ioctl(pidfd, PIDFD_GET_MNT_NAMESPACE)
    except OSError as e:
        err = e.errno or errno.EINVAL
        if err == errno.ESRCH:
            raise MountError(err, "the calling process has exited") from None
        if err in (errno.EACCES, errno.EPERM):
            log.info(
                "cannot tell the caller's mount namespace (%s: no ptrace access to it); "
                "using composefsd's own",
                e.strerror,
            )
            return None
        raise MountError(err, f"cannot tell the caller's mount namespace: {e.strerror}") from None
    try:
        os.set_inheritable(fd, False)
        theirs = os.fstat(fd)
        ours = os.stat("/proc/thread-self/ns/mnt")
    except BaseException:
        os.close(fd)
        raise
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        os.close(fd)
        return None
    return fd


def mount_caller_image(
    image_fd: int,
    object_fds: Sequence[int],
    creds: Credentials,
    userns_fd: int | None = None,
    *,
    label: str = "caller's image",
    userns_what: str = "user namespace fd",
    mntns_fd: int | None = None,
) -> CallerMount:
    """Mount the image in ``image_fd`` (a sealed memfd of :func:`sealed_image`)
    over the caller's object directories (module notes). ``userns_fd``, when given,
    must be a user namespace owned by ``creds.uid``; ``mntns_fd``, when given, is
    the caller's mount namespace (:func:`caller_mount_namespace`), where the
    overlay is created. Raises :class:`MountError`."""
    if not object_fds:
        raise MountError(errno.EINVAL, "no object directory given")
    if probe_layer_mode() != "fd":
        raise MountError(
            errno.ENOSYS,
            "this kernel cannot take overlay layers as fds (6.15 or later needed); "
            "mounting a caller's image needs that",
        )
    if userns_fd is not None:
        owner = userns_owner(userns_fd, userns_what)
        if owner != creds.uid:
            raise FdKindError(
                userns_what, f"owned by uid {owner}, not by the caller (uid {creds.uid})"
            )
    size = os.fstat(image_fd).st_size
    try:
        sb = read_superblock(os.pread(image_fd, BLOCK_SIZE, 0), size)
    except ImageFormatError as e:  # our own writer's image: a bug, not the caller's
        raise MountError(errno.EIO, f"{label} is not a usable composefs image: {e}") from None
    with contextlib.ExitStack() as stack:
        erofs_fd, backing = _mount_erofs(image_fd, label, sb, None)
        stack.callback(os.close, erofs_fd)
        image_dev = os.fstat(erofs_fd).st_dev
        if userns_fd is None:
            try:
                ns = default_idmap(creds)
            except (OSError, ValueError) as e:
                raise MountError(
                    getattr(e, "errno", None) or errno.EINVAL,
                    f"cannot create the idmap user namespace: {e}",
                ) from None
            stack.callback(os.close, ns)
            idmapped_by = "default"
        else:
            ns = userns_fd
            idmapped_by = "caller"
        idmap_image_mount(erofs_fd, ns, label)
        fd = _create_in_namespace(erofs_fd, object_fds, creds, label, mntns_fd)
        return CallerMount(fd, backing, idmapped_by, image_dev)
    raise AssertionError("unreachable")  # pragma: no cover


def image_alive(image_dev: int, memfd_name: str) -> bool | None:
    """Whether the loop device ``image_dev`` still reads the memfd named
    ``memfd_name`` (unique per image): the device clears itself once the last mount
    of its EROFS is gone. None where ``image_dev`` is no loop device (a file-backed
    EROFS), which cannot be told from outside."""
    path = f"/sys/dev/block/{os.major(image_dev)}:{os.minor(image_dev)}/loop/backing_file"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            backing = f.read()
    except FileNotFoundError:
        # No such block device (file-backed EROFS: an anonymous device), or a loop
        # device with nothing attached any more.
        return None if not os.path.exists(os.path.dirname(os.path.dirname(path))) else False
    except OSError:
        return False
    return backing.startswith(f"/memfd:{memfd_name} ")


def check_directory_fd(fd: int, what: str) -> None:
    """``fd`` is an open (not O_PATH) directory; :class:`FdKindError` otherwise."""
    _check_fd(fd, what, stat.S_ISDIR, "a directory")


def check_regular_fd(fd: int, what: str) -> os.stat_result:
    """``fd`` is a regular file open for reading (not O_PATH); :class:`FdKindError`
    otherwise."""
    st = _check_fd(fd, what, stat.S_ISREG, "a regular file")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
        raise FdKindError(what, "open for writing only")
    return st


#: Filesystems whose files answer by the reader's capabilities or are the
#: kernel's own state, never a caller's dumpfile or objects (linux/magic.h).
PSEUDO_FILESYSTEMS: Final = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x0027E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x6165676C: "pstore",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x00001CD1: "devpts",
    0x42494E4D: "binfmt_misc",
    0x65735543: "fusectl",
    0x19800202: "mqueue",
    0x6E736673: "nsfs",
    0x50494446: "pidfs",
    0x00000187: "autofs",
}


class _Statfs(ctypes.Structure):
    # struct statfs of the 64-bit ABIs: f_type first, as a long.
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def filesystem_type(fd: int) -> int:
    """``fstatfs(fd).f_type``: the filesystem's magic number."""
    buf = _Statfs()
    if _libc_fstatfs(fd, ctypes.byref(buf)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF


def _check_fd(fd: int, what: str, kind: Callable[[int], bool], name: str) -> os.stat_result:
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise FdKindError(what, e.strerror or "unusable fd") from None
    if flags & os.O_PATH:
        raise FdKindError(what, "an O_PATH fd; open it for reading")
    if not kind(st.st_mode):
        raise FdKindError(what, f"not {name}")
    try:
        pseudo = PSEUDO_FILESYSTEMS.get(filesystem_type(fd))
    except OSError as e:
        raise FdKindError(what, e.strerror or "unusable fd") from None
    if pseudo is not None:
        raise FdKindError(what, f"on {pseudo}, a kernel filesystem, not one of files")
    return st
