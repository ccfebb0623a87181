"""The kernel claims MountDumpfile rests on (composefsd.kernel.ownmount), checked on
this kernel as root: a thread with a caller's fsuid keeps CAP_SYS_ADMIN and
loses the DAC overrides; overlayfs reads the objects with the credentials of the
thread that created it, so even root cannot read through the mount what the
caller cannot; the data layer is looked up beneath its directory without
following symlinks, whatever path the image names; the image's memfd is sealed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefsd.credentials import Credentials
from composefsd.image.dump_parse import parse_dumpfile
from composefsd.image.format import BLOCK_SIZE
from composefsd.image.reader import read_superblock
from composefsd.image.writer import write_image
from composefsd.kernel.mount import MountError, _mount_erofs, attach
from composefsd.kernel.ownmount import (
    FdKindError,
    _as_caller,
    _create_overlay,
    caller_mount_namespace,
    default_idmap,
    image_alive,
    mount_caller_image,
    sealed_image,
    userns_owner,
)
from composefsd.kernel.syscalls import MNT_DETACH, mount_setattr_idmap, umount2
from conftest import TestUsers

CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 0, 1, 2, 3
CAP_MKNOD, CAP_SYS_ADMIN = 27, 21


def _thread_state() -> tuple[int, int]:
    """(CapEff, fsuid) of the calling thread."""
    with open("/proc/thread-self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["CapEff"].strip(), 16), int(fields["Uid"].split()[3])


def test_caller_thread_keeps_sys_admin_only(test_users: TestUsers) -> None:
    user = test_users.alice
    seen: list[tuple[int, int]] = []

    def run() -> None:
        with _as_caller(Credentials(user.uid, user.gid, (user.gid,))):
            seen.append(_thread_state())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    caps, fsuid = seen[0]
    assert fsuid == user.uid
    # Nothing but CAP_SYS_ADMIN: no DAC overrides, no CAP_SYS_PTRACE, ...
    assert caps == 1 << CAP_SYS_ADMIN
    for cap in (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_MKNOD):
        assert not caps & (1 << cap), cap
    # Only that thread changed.
    assert _thread_state()[1] == 0
    assert _thread_state()[0] & (1 << CAP_DAC_OVERRIDE)


def test_sealed_image_cannot_change() -> None:
    fd = sealed_image(b"x" * 4096)
    try:
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"y", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        assert os.pread(fd, 4, 0) == b"xxxx"
    finally:
        os.close(fd)


def test_userns_owner(tmp_path: Path) -> None:
    fd = os.open("/proc/self/ns/user", os.O_RDONLY)
    try:
        assert userns_owner(fd) == 0
    finally:
        os.close(fd)
    for path in ("/proc/self/ns/mnt", str(tmp_path)):
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(FdKindError) as err:
                userns_owner(fd, "ns")
            assert err.value.parameter == "ns"
        finally:
            os.close(fd)


def _put(objects: Path, data: bytes, owner: int, mode: int) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (objects / digest[:2]).mkdir(exist_ok=True)
    path = objects / digest[:2] / digest[2:]
    path.write_bytes(data)
    os.chown(path, owner, owner)
    path.chmod(mode)
    return f"{digest[:2]}/{digest[2:]}"


@pytest.fixture
def mounted(tmp_path: Path, test_users: TestUsers) -> Iterator[tuple[Path, dict[str, int]]]:
    """An image over alice's object directory, created with her rights, attached
    at a directory of root's; its payloads are not checked (the kernel's own
    defence is what is tested)."""
    user = test_users.alice
    base = tmp_path / "base"
    objects = base / "objects"
    objects.mkdir(parents=True)
    (base / "outside").write_text("outside\n")
    mine = _put(objects, b"mine\n", user.uid, 0o644)
    secret = _put(objects, b"secret\n", 0, 0o600)
    os.symlink("/etc", objects / "etc")
    (objects / "sub").mkdir()
    (base / "sub-under").mkdir()
    os.symlink("..", objects / "up")
    for path in (objects, *objects.iterdir()):
        os.lchown(path, user.uid, user.gid)
    dump = (
        "/ 0 40755 2 0 0 0 0.0 - - -\n"
        f"/mine 5 100644 1 0 0 0 0.0 {mine} - -\n"
        f"/secret 7 100644 1 0 0 0 0.0 {secret} - -\n"
        "/dotdot 8 100644 1 0 0 0 0.0 ../outside - -\n"
        "/etc 5 100644 1 0 0 0 0.0 etc/hostname - -\n"
        "/up 8 100644 1 0 0 0 0.0 up/outside - -\n"
        "/abs 5 100644 1 0 0 0 0.0 /etc/hostname - -\n"
        "/submount 6 100644 1 0 0 0 0.0 sub/file - -\n"
        # The writer escapes the dumpfile's own overlay xattrs: no redirect.
        f"/xattr 3 100644 1 0 0 0 0.0 - abc - trusted.overlay.redirect=/{mine}"
        " trusted.overlay.metacopy=\n"
    )
    # A file on a mount below the object directory: not part of the layer.
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(objects / "sub")], check=True)
    (objects / "sub" / "file").write_text("below\n")
    os.chmod(objects / "sub" / "file", 0o644)
    image = sealed_image(write_image(parse_dumpfile(dump.encode())), "test-ownmount-1")
    objects_fd = os.open(objects, os.O_RDONLY | os.O_DIRECTORY)
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        mount = mount_caller_image(image, [objects_fd], Credentials(user.uid, user.gid))
        info = {"dev": mount.image_dev}
        assert mount.backing in ("file", "loop")
        attach(mount.fd, where)
        os.close(mount.fd)
        yield where, info
    finally:
        os.close(objects_fd)
        os.close(image)
        while os.path.ismount(where):
            umount2(where, MNT_DETACH)
        umount2(objects / "sub", MNT_DETACH)


def test_objects_read_with_the_creators_rights(mounted: tuple[Path, dict[str, int]]) -> None:
    where, _ = mounted
    assert (where / "mine").read_text() == "mine\n"
    assert (where / "xattr").read_text() == "abc"
    # Root itself cannot read root's 0600 object through the mount: overlayfs opens
    # it with the creator's (the caller's) credentials.
    with pytest.raises(PermissionError):
        (where / "secret").read_text()


@pytest.mark.parametrize(
    ("name", "err"),
    [
        ("dotdot", errno.EXDEV),
        ("etc", errno.ELOOP),
        ("up", errno.ELOOP),
        ("abs", errno.EINVAL),
        ("submount", errno.ENOENT),
    ],
)
def test_data_layer_lookups_stay_beneath(
    mounted: tuple[Path, dict[str, int]], name: str, err: int
) -> None:
    where, _ = mounted
    with pytest.raises(OSError) as exc:
        (where / name).read_bytes()
    assert exc.value.errno == err


def test_mount_flags_and_liveness(mounted: tuple[Path, dict[str, int]]) -> None:
    where, info = mounted
    st = os.statvfs(where)
    assert st.f_flag & os.ST_RDONLY and st.f_flag & os.ST_NOSUID and st.f_flag & os.ST_NODEV
    assert image_alive(info["dev"], "test-ownmount-1") is not False
    assert stat.S_ISDIR(os.stat(where).st_mode)


# -- layers of another mount namespace -------------------------------------------------------


@pytest.fixture
def other_mntns(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A process in a mount namespace of its own (``unshare -m``): its pidfd, and
    ``tmp_path`` as seen through its root (opening that gives an fd whose mount is
    of that namespace, as a container's would be)."""
    child = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "cat"], stdin=subprocess.PIPE
    )
    try:
        pidfd = os.pidfd_open(child.pid)
        mine = os.readlink("/proc/self/ns/mnt")
        # unshare(1) moves its root with it into the new namespace.
        while os.readlink(f"/proc/{child.pid}/ns/mnt") == mine:
            time.sleep(0.01)
        yield pidfd, Path(f"/proc/{child.pid}/root{tmp_path}")
    finally:
        child.kill()
        child.wait()
        os.close(pidfd)


_NAME_NS = """
import os, sys
from composefsd.kernel.ownmount import caller_mount_namespace
fd = caller_mount_namespace(int(sys.argv[1]))
print("none" if fd is None else "fd")
"""


@pytest.mark.parametrize(("bounding", "want"), [("-sys_ptrace", "none"), ("+sys_ptrace", "fd")])
def test_namespace_untold_without_ptrace_access(
    other_mntns: tuple[int, Path], bounding: str, want: str
) -> None:
    """Under the shipped unit (no CAP_SYS_PTRACE) the namespace of a caller with
    more capabilities cannot be read (PIDFD_GET_MNT_NAMESPACE: EACCES): no error,
    None, so the overlay is made in composefsd's own namespace; with the
    capability the same caller's namespace is told."""
    pidfd, _ = other_mntns
    out = subprocess.run(
        ["setpriv", f"--bounding-set={bounding}", "--", sys.executable, "-c", _NAME_NS, str(pidfd)],
        pass_fds=[pidfd],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want


def _objects_dir(base: Path, user_uid: int, user_gid: int) -> tuple[str, bytes]:
    objects = base / "objects"
    objects.mkdir()
    os.chown(objects, user_uid, user_gid)
    name = _put(objects, b"mine\n", user_uid, 0o644)
    return name, f"/ 0 40755 2 0 0 0 0.0 - - -\n/mine 5 100644 1 0 0 0 0.0 {name} - -\n".encode()


def test_layer_of_another_mount_namespace(
    tmp_path: Path, test_users: TestUsers, other_mntns: tuple[int, Path]
) -> None:
    """Overlayfs takes a layer only from the mount namespace of the task that
    creates it (clone_private_mount: EINVAL at FSCONFIG_CMD_CREATE otherwise;
    detached trees, as the EROFS layer is, excepted): made in the caller's
    namespace, the same fds mount."""
    user = test_users.alice
    pidfd, seen_there = other_mntns
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _, dump = _objects_dir(tmp_path / sub, user.uid, user.gid)
    creds = Credentials(user.uid, user.gid)
    image = sealed_image(write_image(parse_dumpfile(dump)), "test-ownmount-ns")
    theirs = os.open(seen_there / "a" / "objects", os.O_RDONLY | os.O_DIRECTORY)
    ours = os.open(tmp_path / "b" / "objects", os.O_RDONLY | os.O_DIRECTORY)
    mntns = caller_mount_namespace(pidfd)
    assert mntns is not None
    where = tmp_path / "mnt"
    where.mkdir()
    ns_before = os.readlink("/proc/thread-self/ns/mnt")
    try:
        erofs = _erofs_for(image, creds)
        try:
            with pytest.raises(MountError) as err:
                _create_overlay(erofs, [theirs], creds, "test", None)
        finally:
            os.close(erofs)
        assert err.value.errno == errno.EINVAL
        assert "fsconfig(overlay, create)" in str(err.value)
        for fds in ([theirs], [ours]):  # the daemon's own layers: tried there after
            mount = mount_caller_image(image, fds, creds, mntns_fd=mntns)
            attach(mount.fd, where)
            os.close(mount.fd)
            assert (where / "mine").read_text() == "mine\n"
            umount2(where, MNT_DETACH)
        # Mixed: neither namespace takes both.
        with pytest.raises(MountError) as err:
            mount_caller_image(image, [theirs, ours], creds, mntns_fd=mntns)
        assert err.value.errno == errno.EINVAL
        assert "neither all of the caller's" in str(err.value)
        # setns refused (here: the fd is no mount namespace; under a seccomp
        # filter, EPERM): the daemon's namespace is tried, where its layers are.
        mount = mount_caller_image(image, [ours], creds, mntns_fd=ours)
        os.close(mount.fd)
        with pytest.raises(MountError) as err:
            mount_caller_image(image, [theirs], creds, mntns_fd=ours)
        assert err.value.errno == errno.EINVAL
        assert "cannot enter the caller's mount namespace" in str(err.value)
        # Only the creating thread moved.
        assert os.readlink("/proc/thread-self/ns/mnt") == ns_before
    finally:
        os.close(mntns)
        os.close(theirs)
        os.close(ours)
        os.close(image)
        while os.path.ismount(where):
            umount2(where, MNT_DETACH)


def _erofs_for(image: int, creds: Credentials) -> int:
    """The image's EROFS, detached and idmapped (as mount_caller_image makes it)."""
    size = os.fstat(image).st_size
    sb = read_superblock(os.pread(image, BLOCK_SIZE, 0), size)
    erofs_fd, _ = _mount_erofs(image, "test", sb, None)
    ns = default_idmap(creds)
    try:
        mount_setattr_idmap(erofs_fd, ns)
    finally:
        os.close(ns)
    return erofs_fd


def test_caller_thread_in_its_namespace(
    test_users: TestUsers, other_mntns: tuple[int, Path]
) -> None:
    """The thread that joins the caller's namespace does so with the caller's fs
    ids already, and keeps only CAP_SYS_ADMIN there; the other threads stay."""
    user = test_users.alice
    pidfd, _ = other_mntns
    mntns = caller_mount_namespace(pidfd)
    assert mntns is not None
    seen: list[tuple[tuple[int, int], str]] = []

    def run() -> None:
        with _as_caller(Credentials(user.uid, user.gid, (user.gid,)), mntns):
            seen.append((_thread_state(), os.readlink("/proc/thread-self/ns/mnt")))

    try:
        theirs = os.readlink(f"/proc/{_pid_of(pidfd)}/ns/mnt")
        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        os.close(mntns)
    (caps, fsuid), ns = seen[0]
    assert caps == 1 << CAP_SYS_ADMIN
    assert fsuid == user.uid
    assert ns == theirs
    assert os.readlink("/proc/thread-self/ns/mnt") != theirs


def _pid_of(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pid:"))


def test_caller_mount_namespace() -> None:
    own = os.pidfd_open(os.getpid())
    try:
        assert caller_mount_namespace(own) is None
    finally:
        os.close(own)
    child = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(child.pid)
    try:
        child.wait()
        with pytest.raises(MountError) as err:
            caller_mount_namespace(pidfd)
        assert err.value.errno == errno.ESRCH
    finally:
        os.close(pidfd)
