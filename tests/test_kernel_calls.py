"""composefsd.kernel's raw calls: errors carry the errno and the kernel's fs-context log,
syscall tables, mountinfo parsing, id mappings, open_tree and loop devices (root)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from composefsd.kernel.loop import attach_loop
from composefsd.kernel.mountinfo import (
    composefs_mount_with_id,
    list_composefs_mounts,
    parse_mountinfo,
)
from composefsd.kernel.syscalls import (
    MNT_DETACH,
    FsContext,
    KernelError,
    mount_root_id,
    move_mount,
    open_tree,
    syscall_table,
    umount2,
)
from composefsd.kernel.userns import IdMapping, create_userns, parse_mapping


def test_fsconfig_error_carries_errno_and_kernel_log() -> None:
    with FsContext("overlay") as ctx, pytest.raises(KernelError) as info:
        ctx.set_string("bogus", "1")
    err = info.value
    assert isinstance(err, OSError)
    assert err.errno == errno.EINVAL
    assert err.log == ["overlay: Unknown parameter 'bogus'"]
    assert str(err) == (
        "fsconfig(overlay, bogus=1): Invalid argument (kernel: overlay: Unknown parameter 'bogus')"
    )


def test_fsopen_unknown_filesystem() -> None:
    with pytest.raises(KernelError) as info:
        FsContext("nosuchfs")
    assert info.value.errno == errno.ENODEV
    assert info.value.call == "fsopen(nosuchfs)"


def test_syscall_tables() -> None:
    x86, arm = syscall_table("x86_64"), syscall_table("aarch64")
    assert (x86.fsopen, x86.fsconfig, x86.fsmount, x86.move_mount, x86.open_tree) == (
        430,
        431,
        432,
        429,
        428,
    )
    assert x86.mount_setattr == arm.mount_setattr == 442
    assert (x86.umount2, x86.unshare) == (166, 272)
    assert (arm.umount2, arm.unshare) == (39, 97)
    assert syscall_table("arm64") == arm
    with pytest.raises(OSError, match="does not know the syscall numbers of architecture 'mips'"):
        syscall_table("mips")


def test_tmpfs_through_the_new_api_and_open_tree(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with FsContext("tmpfs") as ctx:
        ctx.set_string("mode", "0700")
        ctx.create()
        fd = ctx.mount()
    try:
        move_mount(fd, a)
    finally:
        os.close(fd)
    try:
        (a / "x").write_text("in tmpfs")
        assert stat.S_IMODE(a.stat().st_mode) == 0o700
        clone = open_tree(a)
        try:
            move_mount(clone, b)
        finally:
            os.close(clone)
        assert (b / "x").read_text() == "in tmpfs"
        umount2(b)
    finally:
        umount2(a, MNT_DETACH)
    assert not (a / "x").exists()
    with pytest.raises(KernelError) as info:
        umount2(a)
    assert info.value.errno == errno.EINVAL


def test_mount_root_id_tells_mount_roots_by_mountinfo_id(tmp_path: Path) -> None:
    """The id of the topmost mount whose root a name is, as mountinfo lists it;
    None for a plain directory, a file in a mount, or a symlink to a mount root."""
    (tmp_path / "m").mkdir()
    (tmp_path / "plain").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    ids = []
    for _ in range(2):  # a second tmpfs stacked on the first: the top one is told
        with FsContext("tmpfs") as ctx:
            ctx.create()
            fd = ctx.mount()
        try:
            move_mount(fd, tmp_path / "m")
        finally:
            os.close(fd)
        (tmp_path / "m" / "f").write_text("")
        ids.append(
            [
                e.mount_id
                for e in parse_mountinfo(Path("/proc/self/mountinfo").read_text())
                if e.mountpoint == str(tmp_path / "m")
            ][-1]
        )
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    inside_fd = os.open(tmp_path / "m", os.O_PATH | os.O_DIRECTORY)
    try:
        assert ids[0] != ids[1]
        assert mount_root_id(dir_fd, "m") == ids[1]
        assert mount_root_id(dir_fd, "plain") is None
        assert mount_root_id(dir_fd, "link") is None
        assert mount_root_id(inside_fd, "f") is None
        for name in ("missing", "", "m/f", "m\0x"):
            with pytest.raises(KernelError) as info:
                mount_root_id(dir_fd, name)
            assert info.value.errno in (errno.ENOENT, errno.EINVAL), name
        # Not composefs: tmpfs.
        assert composefs_mount_with_id(ids[1]) is None
    finally:
        os.close(dir_fd)
        os.close(inside_fd)
        umount2(tmp_path / "m", MNT_DETACH)
        umount2(tmp_path / "m", MNT_DETACH)


def test_mountinfo_parsing_unescapes() -> None:
    text = (
        "36 35 98:0 / /mnt/with\\040space rw,relatime shared:1 - overlay composefs:"
        + "ab" * 32
        + " ro,lowerdir+=/,datadir+=/srv/o\\054bj\\040x\\134,redirect_dir=on,metacopy=on,verity=require\n"
        "37 35 0:5 / /proc rw - proc proc rw\n"
        "38 35 0:6 / /m2 ro - overlay composefs ro,lowerdir=/proc/self/fd/7::/proc/self/fd/4\n"
        "garbage line\n"
    )
    entries = list(parse_mountinfo(text))
    assert [e.mountpoint for e in entries] == ["/mnt/with space", "/proc", "/m2"]
    assert entries[0].mount_options == ("rw", "relatime")
    assert entries[0].super_options[2] == "datadir+=/srv/o,bj x\\"


def test_list_composefs_mounts_from_file(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 35 98:0 / /a rw - overlay composefs:" + "ab" * 32 + " ro,lowerdir+=/,"
        "datadir+=/srv/objs,verity=require\n"
        "38 35 0:6 / /b ro - overlay composefs ro,lowerdir=/proc/self/fd/7::/proc/self/fd/4"
        ",upperdir=/u\n"
        "39 35 0:6 / /c ro - overlay overlay ro,lowerdir=/x\n"
        "40 35 0:6 / /d ro - overlay composefs:myname ro,lowerdir=/x\n"
    )
    mounts = list_composefs_mounts(str(info))
    assert [(m.mountpoint, m.digest, m.name, m.verity, m.read_only) for m in mounts] == [
        ("/a", "ab" * 32, "ab" * 32, "require", False),
        ("/b", None, "", "off", True),
        ("/d", None, "myname", "off", True),
    ]
    assert mounts[0].datadirs == ("/srv/objs",)
    assert mounts[1].datadirs == ("/proc/self/fd/4",) and mounts[1].upperdir == "/u"


def test_composefs_mount_with_id_from_file(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 35 98:0 / /a rw - overlay composefs:" + "ab" * 32 + " ro,lowerdir+=/\n"
        "39 35 0:6 / /c ro - overlay overlay ro,lowerdir=/x\n"
        "40 35 0:6 / /a ro - tmpfs composefs rw\n"
    )
    found = composefs_mount_with_id(36, str(info))
    assert found is not None and (found.mountpoint, found.digest) == ("/a", "ab" * 32)
    # A plain overlay, a tmpfs named "composefs", an id that is not there.
    assert [composefs_mount_with_id(i, str(info)) for i in (39, 40, 41, 3)] == [None] * 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "id mapping is empty"),
        ("0:1", "is not INSIDE:OUTSIDE:COUNT"),
        ("a:b:c", "is not INSIDE:OUTSIDE:COUNT"),
        ("0:1:0", "count must be at least 1"),
        ("0:4294967295:2", "runs past 2^32"),
        ("-1:0:1", "must be an integer in 0..4294967295"),
    ],
)
def test_parse_mapping_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("^", r"\^").replace(".", r"\.")):
        parse_mapping(text)


def test_parse_mapping() -> None:
    assert parse_mapping("0:100000:65536, 65536 1000 1") == [
        IdMapping(0, 100000, 65536),
        IdMapping(65536, 1000, 1),
    ]


def test_create_userns_writes_the_maps() -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    fd = create_userns([IdMapping(0, 100000, 1000)], [IdMapping(0, 200000, 10)])
    try:
        # setns is not needed to read the maps: a process in the namespace is gone,
        # but the fd keeps the namespace, and NS_GET_OWNER_UID-style checks aside, the
        # kernel still reports it as a user namespace distinct from ours.
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("user:[")
        assert os.readlink(f"/proc/self/fd/{fd}") != os.readlink("/proc/self/ns/user")
    finally:
        os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    with pytest.raises(ValueError, match="overlapping outside ranges"):
        create_userns([IdMapping(0, 100, 10), IdMapping(10, 105, 10)])


_USERNS_NOT_DUMPABLE = """
from composefsd.kernel.syscalls import set_dumpable
from composefsd.kernel.userns import IdMapping, create_userns
set_dumpable(False)
fd = create_userns([IdMapping(0, 0, 1)])
print("ok")
"""


def test_create_userns_from_a_process_not_dumpable() -> None:
    """Without CAP_SYS_PTRACE (the shipped unit) and with the daemon not dumpable
    (the kernel clears the flag when a thread changes its fsuid, as MountDumpfile's
    creator thread does), the helper's namespace can still be opened: the helper
    makes itself dumpable. Mapping uid 0 needs CAP_SETFCAP, which the unit keeps."""
    out = subprocess.run(
        ["setpriv", "--bounding-set=-sys_ptrace", "--", sys.executable, "-c", _USERNS_NOT_DUMPABLE],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr


def _loop_backing_files() -> dict[str, str]:
    out = {}
    for dev in Path("/sys/block").glob("loop*"):
        backing = dev / "loop" / "backing_file"
        if backing.exists():
            out[dev.name] = backing.read_text().strip()
    return out


def test_loop_device_is_read_only_and_clears_itself(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"\x01" * 8192)
    fd = os.open(image, os.O_RDONLY)
    try:
        loop_fd = attach_loop(fd, str(image))
    finally:
        os.close(fd)
    try:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{loop_fd}"))
        assert _loop_backing_files()[name] == str(image)
        assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
        assert os.pread(loop_fd, 16, 4096) == b"\x01" * 16
    finally:
        os.close(loop_fd)
    # Autoclear: with the last opener gone, the device lets go of the file (and may
    # at once serve somebody else).
    assert _loop_backing_files().get(name) != str(image)


def test_mountinfo_round_trips_awkward_paths(tmp_path: Path) -> None:
    from composefsd.image.tree import new_directory
    from composefsd.image.writer import write_image
    from composefsd.kernel.mount import MountOptions, mount_image

    odd = tmp_path / "a dir, with\\odd:chars\tand=more"
    objects, mnt = odd / "objects", odd / "mnt"
    objects.mkdir(parents=True)
    mnt.mkdir()
    image = odd / "img"
    image.write_bytes(write_image(new_directory()))
    with mount_image(image, MountOptions(basedirs=[objects], name="x" * 64)) as m:
        m.attach(mnt)
    try:
        [found] = [m for m in list_composefs_mounts() if m.mountpoint == str(mnt)]
        assert found.datadirs == (str(objects),)
        assert found.name == "x" * 64 and found.digest is None
    finally:
        umount2(mnt, MNT_DETACH)
