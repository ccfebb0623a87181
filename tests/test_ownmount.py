"""io.composefs.Repository.MountDumpfile end to end, as a non-root user.

The user (tests/users.py) opens its dumpfile and object directory, calls the
daemon over its socket (tests/ownmount_client.py), gets the detached mount fd
and, in ``unshare -Urm`` (its own user and mount namespace), attaches it and
looks at the files. Hostile input: malformed and oversized dumpfiles, object
paths that leave the directory, symlinks, devices and fifos as objects, fds of
the wrong kind, too many fds, floods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import users
from composefsd.repository import Repository
from composefsd.service import ownmount
from composefsd.service.context import VarlinkReplyError
from composefsd.service.daemon import build_service
from composefsd.service.mounts import MountTracker
from composefsd.service.ownmount import (
    OwnMountLimits,
    OwnMounts,
    build_image,
    payload_ok,
    read_dumpfile,
)
from conftest import TESTDATA, TestUsers
from servicehelpers import Daemon, running_daemon

_CLIENT = Path(__file__).with_name("ownmount_client.py")
_SHOULD_FAIL = sorted((TESTDATA / "assets").glob("should-fail-*.dump"))
_OVERFLOW = 65534
#: The tests call MountDumpfile far more often than a user would; the rate itself
#: is tested on a clock of the test's (test_calls_per_minute_per_uid).
_RATE = ("--mount-dumpfile-rate", "1000000")


@dataclass
class World:
    daemon: Daemon
    user: users.TestUser
    other: users.TestUser
    py: users.UserPython
    #: A public directory the user owns: its dumpfiles, objects and mount points.
    home: Path
    client: str

    def call(
        self,
        spec: dict[str, Any],
        user: users.TestUser | None = None,
        *,
        wrap: Sequence[str] = (),
        root: bool = False,
    ) -> dict[str, Any]:
        """The client's answer, run as ``user`` (root with ``root``), its command
        line behind ``wrap`` (``unshare -Urm``: the client in namespaces of its own)."""
        argv = [*wrap, *self.py.command(self.client, "call", self.daemon.address, json.dumps(spec))]
        kwargs: dict[str, Any] = dict(
            env=self.py.env, capture_output=True, text=True, timeout=120, check=False
        )
        if root:
            out = subprocess.run(argv, **kwargs)
        else:
            out = users.run_as(user or self.user, argv, **kwargs)
        assert out.returncode == 0, out.stderr
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def dump(self, name: str, text: str | bytes) -> str:
        path = self.home / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        os.chown(path, self.user.uid, self.user.gid)
        return str(path)

    def where(self, name: str) -> str:
        path = self.home / f"mnt-{name}"
        path.mkdir(exist_ok=True)
        os.chown(path, self.user.uid, self.user.gid)
        return str(path)


def _object(objects: Path, data: bytes, owner: int, mode: int = 0o644) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (objects / digest[:2]).mkdir(exist_ok=True)
    os.chown(objects / digest[:2], owner, owner)
    path = objects / digest[:2] / digest[2:]
    path.write_bytes(data)
    os.chown(path, owner, owner)
    path.chmod(mode)
    return f"{digest[:2]}/{digest[2:]}"


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, test_users: TestUsers, user_python: users.UserPython
) -> Iterator[World]:
    home = users.public_dir("cfsd-own-")
    os.chown(home, test_users.alice.uid, test_users.alice.gid)
    client = home / "client.py"
    shutil.copy(_CLIENT, client)
    client.chmod(0o755)
    limits = OwnMountLimits()
    assert limits.calls_per_uid == 1
    try:
        with running_daemon(tmp_path_factory.mktemp("own") / "repo", *_RATE, public=True) as d:
            yield World(d, test_users.alice, test_users.bob, user_python, home, str(client))
    finally:
        # Mount fds die with the client processes; nothing is attached here.
        users.remove_tree(home)


@pytest.fixture(scope="module")
def objects(world: World) -> dict[str, Any]:
    """The user's object directory: its own objects, root's 0600 one, symlinks out,
    a fifo and a device node where objects would be."""
    objs = world.home / "objects"
    objs.mkdir()
    os.chown(objs, world.user.uid, world.user.gid)
    uid = world.user.uid
    out: dict[str, Any] = {"dir": str(objs)}
    out["mine"] = _object(objs, b"my own file\n", uid)
    out["secret"] = _object(objs, b"root's secret\n", 0, 0o600)
    (objs / "ln").mkdir()
    os.symlink("/etc", objs / "ln" / "etc")
    os.symlink("..", objs / "ln" / "up")
    os.symlink("/etc/shadow", objs / "ln" / "shadow")
    os.mkfifo(objs / "ln" / "fifo")
    os.mknod(objs / "ln" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (world.home / "outside").write_text("outside the object directory\n")
    for path in (objs / "ln", *(objs / "ln").iterdir()):
        os.lchown(path, uid, world.user.gid)
    return out


def _root_line() -> str:
    return "/ 0 40755 2 0 0 0 0.0 - - -\n"


def _spec(world: World, objects: dict[str, Any], dump: str, **more: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"dumpfile": dump, "objects": [objects["dir"]]}
    spec.update(more)
    return spec


# -- the mount as the caller sees it -------------------------------------------------------


def test_mount_own_image(world: World, objects: dict[str, Any]) -> None:
    dump = world.dump(
        "good.dump",
        _root_line()
        + f"/mine 12 100644 1 0 0 0 0.0 {objects['mine']} - -\n"
        + f"/other 12 100644 1 1234 1234 0 0.0 {objects['mine']} - -\n"
        + f"/secret 14 100644 1 0 0 0 0.0 {objects['secret']} - -\n"
        + "/sgid-dir 0 42755 2 0 0 0 0.0 - - -\n"
        + "/inline 3 100644 1 0 0 0 0.0 - abc -\n",
    )
    where = world.where("good")
    files = ["mine", "other", "secret", "sgid-dir", "inline"]
    out = world.call(_spec(world, objects, dump, files=files, where=where, clear_flags=True))
    assert "reply" in out, out
    assert out["reply"]["idmapped"] == "default"
    assert out["fds"] == 1
    seen = out["seen"]["files"]
    # The caller's own object, through the image; in its userns the caller is 0.
    assert seen["mine"]["content"] == "my own file\n"
    assert (seen["mine"]["uid"], seen["mine"]["gid"]) == (0, 0)
    # Ids other than 0 map to nothing: the overflow id.
    assert (seen["other"]["uid"], seen["other"]["gid"]) == (_OVERFLOW, _OVERFLOW)
    # The image says 0644, but the object is root's 0600: read with the caller's
    # rights, it cannot be read.
    assert seen["secret"]["mode"] & 0o777 == 0o644
    assert seen["secret"]["error"] == "EACCES"
    # A setgid directory is fine: nothing is created on the mount.
    assert seen["sgid-dir"]["mode"] & 0o7777 == 0o2755
    assert seen["inline"]["content"] == "abc"
    # The mount came read-only, nosuid and nodev, but the caller, owning the mount
    # namespace it attaches it in, can clear those flags (on this kernel: the
    # mount is no copy into a less privileged namespace, so they are not locked).
    # So they are no defence: the dumpfile may hold no device node and no setuid
    # or setgid file (test_devices_and_setid_refused), and overlayfs has no upper
    # layer, so the mount cannot be written whatever its flags.
    assert out["seen"]["cleared"] == {"detached": "ok", "attached": "ok"}
    options, super_options = out["seen"]["mountinfo"].split(" ", 1)
    assert "rw" in options.split(",")
    assert super_options.split()[2].startswith("ro,")
    # The idmapping is the EROFS layer's (the uids above show it), not the overlay's.
    assert super_options.startswith("overlay composefs ")


def test_callers_own_userns(world: World, objects: dict[str, Any]) -> None:
    dump = world.dump(
        "ns.dump", _root_line() + f"/mine 12 100644 1 0 0 0 0.0 {objects['mine']} - -\n"
    )
    out = world.call(
        _spec(world, objects, dump, userns="own", files=["mine"], where=world.where("ns"))
    )
    assert out["reply"]["idmapped"] == "caller", out
    assert out["seen"]["files"]["mine"]["content"] == "my own file\n"
    assert out["seen"]["files"]["mine"]["uid"] == 0


# -- callers in mount namespaces other than composefsd's ----------------------------------


def _ns_dump(world: World, objects: dict[str, Any], name: str) -> str:
    return world.dump(
        name,
        _root_line()
        + f"/mine 12 100644 1 0 0 0 0.0 {objects['mine']} - -\n"
        + f"/secret 14 100644 1 0 0 0 0.0 {objects['secret']} - -\n",
    )


def test_caller_in_own_user_and_mount_namespace(world: World, objects: dict[str, Any]) -> None:
    """A container's view: the user opens its files inside ``unshare -Urm``, so their
    mounts are of its own mount namespace, which overlayfs takes only when created
    there."""
    dump = _ns_dump(world, objects, "ns-own.dump")
    spec = _spec(world, objects, dump, files=["mine", "secret"], where=world.where("ns-own"))
    out = world.call(spec, wrap=["unshare", "-Urm"])
    assert "reply" in out, out
    seen = out["seen"]["files"]
    assert seen["mine"]["content"] == "my own file\n"
    # Still the caller's rights: root's 0600 object stays unreadable.
    assert seen["secret"]["error"] == "EACCES"


def test_caller_left_after_opening(world: World, objects: dict[str, Any]) -> None:
    """Files opened in composefsd's namespace, the call made from another (what
    composefsctl mount-dumpfile does): the overlay is made in composefsd's."""
    dump = _ns_dump(world, objects, "ns-left.dump")
    spec = _spec(
        world,
        objects,
        dump,
        files=["mine", "secret"],
        where=world.where("ns-left"),
        unshare_after_open=True,
    )
    out = world.call(spec)
    assert "reply" in out, out
    assert out["seen"]["files"]["mine"]["content"] == "my own file\n"
    assert out["seen"]["files"]["secret"]["error"] == "EACCES"


def test_root_caller_in_another_mount_namespace(world: World, objects: dict[str, Any]) -> None:
    """Root in ``unshare -m``: mounted, and still without DAC overrides (another
    user's 0600 object stays unreadable)."""
    objs = world.home / "objects-root"
    objs.mkdir(exist_ok=True)
    mine = _object(objs, b"my own file\n", 0)
    theirs = _object(objs, b"bob's secret\n", world.other.uid, 0o600)
    dump = world.dump(
        "ns-root.dump",
        _root_line()
        + f"/mine 12 100644 1 0 0 0 0.0 {mine} - -\n"
        + f"/theirs 13 100644 1 0 0 0 0.0 {theirs} - -\n",
    )
    spec = {
        "dumpfile": dump,
        "objects": [str(objs)],
        "files": ["mine", "theirs"],
        "where": world.where("ns-root"),
    }
    out = world.call(spec, wrap=["unshare", "-m"], root=True)
    assert "reply" in out, out
    assert out["seen"]["files"]["mine"]["content"] == "my own file\n"
    assert out["seen"]["files"]["theirs"]["error"] == "EACCES"


def test_caller_gone(world: World, objects: dict[str, Any]) -> None:
    """The process that connected has exited when the call comes: its mount
    namespace cannot be named exactly, and no other is guessed."""
    dump = _ns_dump(world, objects, "ns-gone.dump")
    out = world.call(_spec(world, objects, dump, orphan=True))
    assert out["error"] == "io.composefs.Repository.MountFailed", out
    assert out["parameters"]["errnoName"] == "ESRCH"


@pytest.mark.parametrize(
    ("userns", "message"), [("init", "owned by uid 0"), ("mnt", "not a user namespace")]
)
def test_userns_not_the_callers(
    world: World, objects: dict[str, Any], userns: str, message: str
) -> None:
    dump = world.dump("ns2.dump", _root_line())
    out = world.call(_spec(world, objects, dump, userns=userns))
    assert out["error"] == "io.composefs.Repository.BadFileDescriptor", out
    assert out["parameters"]["parameter"] == "userNamespaceFileDescriptor"
    assert message in out["parameters"]["message"]


# -- object paths that try to leave the object directory ----------------------------------


@pytest.mark.parametrize(
    "payload", ["../outside", "/etc/hostname", "ab/../../outside", "./x", "a//b"]
)
def test_payload_outside_refused(world: World, objects: dict[str, Any], payload: str) -> None:
    dump = world.dump("esc.dump", _root_line() + f"/f 5 100644 1 0 0 0 0.0 {payload} - -\n")
    out = world.call(_spec(world, objects, dump))
    assert out["error"] == "io.composefs.Repository.DumpfileRejected", out
    assert "object path" in out["parameters"]["message"]


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("etc", "ln/etc/hostname"),
        ("up", "ln/up/outside"),
        ("shadow", "ln/shadow"),
        ("fifo", "ln/fifo"),
        ("null", "ln/null"),
    ],
)
def test_symlinks_and_specials_as_objects(
    world: World, objects: dict[str, Any], name: str, payload: str
) -> None:
    """Overlayfs looks objects up beneath the directory without following symlinks,
    and takes only regular files: these mount, but the files cannot be read."""
    dump = world.dump(f"sl-{name}.dump", _root_line() + f"/f 5 100644 1 0 0 0 0.0 {payload} - -\n")
    out = world.call(_spec(world, objects, dump, files=["f"], where=world.where(f"sl-{name}")))
    assert "reply" in out, out
    entry = out["seen"]["files"]["f"]
    assert "content" not in entry, entry
    assert entry["error"] in ("ELOOP", "EXDEV", "EIO", "EINVAL", "EACCES", "ENOENT"), entry


def test_payload_check() -> None:
    assert payload_ok(b"ab/cdef")
    assert payload_ok(b"x")
    for bad in (b"", b"/x", b"../x", b"a/../b", b"a/./b", b"a//b", b"a/", b"."):
        assert not payload_ok(bad), bad


@pytest.mark.parametrize(
    "line",
    [
        "/null 0 20666 1 0 0 259 0.0 - - -",  # char 1:3
        "/sda 0 60666 1 0 0 2048 0.0 - - -",  # block 8:0
        "/blk0 0 60600 1 0 0 0 0.0 - - -",  # a block device 0:0 is no whiteout
        "/suid 12 104755 1 0 0 0 0.0 MINE - -",
        "/sgid 12 102755 1 0 0 0 0.0 MINE - -",
        "/inl 3 106755 1 0 0 0 0.0 - abc -",
        "/wh-suid 0 24000 1 0 0 0 0.0 - - -",
    ],
)
def test_devices_and_setid_refused(world: World, objects: dict[str, Any], line: str) -> None:
    """The caller can clear the mount's nodev and nosuid (test_mount_own_image):
    so no device node a reader could open, no file an exec would change ids for."""
    dump = world.dump("dev.dump", _root_line() + line.replace("MINE", objects["mine"]) + "\n")
    out = world.call(_spec(world, objects, dump))
    assert out["error"] == "io.composefs.Repository.DumpfileRejected", out
    assert repr(line.split()[0]) in out["parameters"]["message"]


def test_whiteout_allowed(world: World, objects: dict[str, Any]) -> None:
    """A whiteout (character device 0:0) becomes an empty file with escaped
    whiteout xattrs in the image: no device at all, so allowed."""
    dump = world.dump("wh.dump", _root_line() + "/wh 0 20000 1 0 0 0 0.0 - - -\n")
    out = world.call(_spec(world, objects, dump, files=["wh"], where=world.where("wh")))
    assert "reply" in out, out
    assert not stat.S_ISCHR(out["seen"]["files"]["wh"].get("mode", 0))


@pytest.mark.parametrize(
    "xattr",
    [
        "trusted.overlay.redirect=/ln/etc/hostname",
        "trusted.overlay.metacopy=",
        "trusted.other=x",
        "security.capability=\\x01\\x00\\x00\\x02",
        "security.selinux=system_u:object_r:shadow_t:s0",
    ],
)
def test_system_xattrs_refused(world: World, objects: dict[str, Any], xattr: str) -> None:
    """trusted.* and security.* xattrs are not the caller's (the writer's escaping
    of trusted.overlay.* is tested beneath, in test_ownmount_kernel.py)."""
    dump = world.dump("xattr.dump", _root_line() + f"/f 3 100644 1 0 0 0 0.0 - abc - {xattr}\n")
    out = world.call(_spec(world, objects, dump))
    assert out["error"] == "io.composefs.Repository.DumpfileRejected", out
    assert "not the caller's" in out["parameters"]["message"]


def test_user_xattrs_kept(world: World, objects: dict[str, Any]) -> None:
    dump = world.dump("uxattr.dump", _root_line() + "/f 3 100644 1 0 0 0 0.0 - abc - user.a=b\n")
    out = world.call(_spec(world, objects, dump, files=["f"], where=world.where("uxattr")))
    assert out["seen"]["files"]["f"]["content"] == "abc", out


# -- malformed and oversized dumpfiles -----------------------------------------------------


@pytest.mark.parametrize("asset", _SHOULD_FAIL, ids=lambda p: p.name)
def test_should_fail_dumpfiles(world: World, objects: dict[str, Any], asset: Path) -> None:
    dump = world.dump(asset.name, asset.read_bytes())
    out = world.call(_spec(world, objects, dump))
    assert out["error"] == "io.composefs.Repository.DumpfileRejected", out


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        (b"x" * ((16 << 20) + 1), "dumpfileBytes"),
        (b"/ 0 40755 2 0 0 0 0.0 - - -\n" + b"\n" * 100_001, "entries"),
        (b"/ 0 40755 2 0 0 0 0.0 - - - user.a=" + b"x" * (256 << 10) + b"\n", "lineBytes"),
    ],
    ids=["bytes", "entries", "line"],
)
def test_oversized_dumpfiles(
    world: World, objects: dict[str, Any], text: bytes, limit: str
) -> None:
    dump = world.dump(f"big-{limit}.dump", text)
    out = world.call(_spec(world, objects, dump))
    assert out["error"] == "io.composefs.Repository.LimitExceeded", out
    assert out["parameters"]["limit"] == limit


def test_garbage_dumpfile(world: World, objects: dict[str, Any]) -> None:
    dump = world.dump("garbage.dump", bytes(range(256)) * 64)
    out = world.call(_spec(world, objects, dump))
    assert out["error"] == "io.composefs.Repository.DumpfileRejected", out


# -- fds of the wrong kind -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pipe", "socket", "dir", "opath", "wronly"])
def test_dumpfile_fd_kind(world: World, objects: dict[str, Any], kind: str) -> None:
    dump = world.dump("kind.dump", _root_line())
    path = str(world.home) if kind == "dir" else dump
    out = world.call(_spec(world, objects, path, dumpfile_kind=kind))
    assert out["error"] == "io.composefs.Repository.BadFileDescriptor", out
    assert out["parameters"]["parameter"] == "dumpfileFileDescriptor"


@pytest.mark.parametrize("kind", ["file", "socket", "opath"])
def test_object_fd_kind(world: World, objects: dict[str, Any], kind: str) -> None:
    dump = world.dump("okind.dump", _root_line())
    spec = _spec(world, objects, dump, object_kind=kind)
    if kind == "file":
        spec["objects"] = [dump]
    out = world.call(spec)
    assert out["error"] == "io.composefs.Repository.BadFileDescriptor", out
    assert out["parameters"]["parameter"] == "objectDirectoryFileDescriptors"


def test_too_many_object_dirs(world: World, objects: dict[str, Any]) -> None:
    dump = world.dump("many.dump", _root_line())
    spec = _spec(world, objects, dump)
    spec["objects"] = [objects["dir"]] * 9
    out = world.call(spec)
    assert out["error"] == "io.composefs.Repository.LimitExceeded", out
    assert out["parameters"]["limit"] == "objectDirectories"


def test_too_many_fds(world: World, objects: dict[str, Any]) -> None:
    """More fds than one message may carry: the transport drops the connection."""
    dump = world.dump("fds.dump", _root_line())
    out = world.call(_spec(world, objects, dump, extra_fds=20))
    assert out["error"] == "disconnected", out


def test_bad_indexes(world: World, objects: dict[str, Any]) -> None:
    dump = world.dump("idx.dump", _root_line())
    for override, field in (
        ({"dumpfileFileDescriptor": 7}, "dumpfileFileDescriptor"),
        ({"objectDirectoryFileDescriptors": [0]}, "objectDirectoryFileDescriptors"),
        ({"objectDirectoryFileDescriptors": []}, "objectDirectoryFileDescriptors"),
    ):
        out = world.call(_spec(world, objects, dump, index_override=override))
        assert out["error"] == "org.varlink.service.InvalidParameter", out
        assert out["parameters"]["parameter"] == field


# -- files that change under the mount -----------------------------------------------------


def test_object_truncated_under_the_mount(world: World, objects: dict[str, Any]) -> None:
    objs = Path(objects["dir"])
    rel = _object(objs, b"changes soon\n" * 100, world.user.uid)
    dump = world.dump("chg.dump", _root_line() + f"/f 1300 100644 1 0 0 0 0.0 {rel} - -\n")
    (objs / rel).write_bytes(b"short\n")  # truncated after the dumpfile was written
    out = world.call(_spec(world, objects, dump, files=["f"], where=world.where("chg")))
    # The caller's own business: what the file holds now, or an error; no crash.
    entry = out["seen"]["files"]["f"]
    assert entry.get("content", "short\n") == "short\n" or "error" in entry, entry
    assert world.daemon.proc.poll() is None


def test_dumpfile_read_once(tmp_path: Path) -> None:
    """The dumpfile is read once, to the limit and never past it, whatever its size
    says; what changes in the file afterwards changes nothing."""
    limits = OwnMountLimits(max_dumpfile_bytes=64)
    path = tmp_path / "d.dump"
    path.write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 1 100644 1 0 0 0 0.0 - a -\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        lines = read_dumpfile(fd, limits)
        with open(path, "r+b") as f:
            f.truncate(3)  # the caller truncates it meanwhile
        image = build_image(lines, limits)
        assert image == build_image(
            [b"/ 0 40755 2 0 0 0 0.0 - - -\n", b"/a 1 100644 1 0 0 0 0.0 - a -\n"], limits
        )
        path.write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - -\n" + b"#" * 64)
        with pytest.raises(VarlinkReplyError) as err:
            read_dumpfile(fd, limits)
        assert err.value.parameters["limit"] == "dumpfileBytes"
    finally:
        os.close(fd)


# -- floods --------------------------------------------------------------------------------


def test_flood_from_one_uid(world: World, objects: dict[str, Any]) -> None:
    """Many concurrent calls of one uid: each runs or is refused at once
    (callsPerUid); another uid's call meanwhile is served."""
    dump = world.dump("flood.dump", _root_line() + "/a 1 100644 1 0 0 0 0.0 - a -\n")
    spec = json.dumps(_spec(world, objects, dump))
    procs = [
        users.popen_as(
            world.user,
            world.py.command(world.client, "call", world.daemon.address, spec),
            env=world.py.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(12)
    ]
    other_objs = world.home / "other-objects"
    other_objs.mkdir(exist_ok=True)
    os.chown(other_objs, world.other.uid, world.other.gid)
    other = world.call({"dumpfile": dump, "objects": [str(other_objs)]}, user=world.other)
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout))
    assert "reply" in other, other
    assert any("reply" in r for r in results), results
    for r in results:
        assert "reply" in r or (
            r["error"] == "io.composefs.Repository.LimitExceeded"
            and r["parameters"]["limit"] == "callsPerUid"
        ), r


def test_live_images_per_uid(
    world: World, objects: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Mounts a uid holds keep their images in the daemon's memory: at most
    live_images_per_uid of them; closing them gives the room back. (A daemon of
    its own, so that no image of another test counts.)"""
    limit = OwnMountLimits().live_images_per_uid
    dump = world.dump("live.dump", _root_line() + "/a 1 100644 1 0 0 0 0.0 - a -\n")
    with running_daemon(tmp_path_factory.mktemp("live") / "repo", *_RATE, public=True) as daemon:
        _live_images(dataclasses.replace(world, daemon=daemon), objects, dump, limit)


def _live_images(world: World, objects: dict[str, Any], dump: str, limit: int) -> None:
    holders = []
    try:
        for i in range(limit):
            hold = str(world.home / f"hold-{i}")
            holders.append(
                (
                    hold,
                    users.popen_as(
                        world.user,
                        world.py.command(
                            world.client,
                            "call",
                            world.daemon.address,
                            json.dumps(_spec(world, objects, dump, hold=hold)),
                        ),
                        env=world.py.env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
            _wait_for(Path(hold + ".ready"), holders[-1][1])
        out = world.call(_spec(world, objects, dump))
        assert out["error"] == "io.composefs.Repository.LimitExceeded", out
        assert out["parameters"]["limit"] == "liveImagesPerUid"
    finally:
        for hold, proc in holders:
            Path(hold).touch()
            proc.communicate(timeout=60)
    # The mounts went with the processes; their loop devices clear themselves.
    deadline = time.monotonic() + 30
    while True:
        out = world.call(_spec(world, objects, dump))
        if "reply" in out or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "reply" in out, out


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.02)


@pytest.mark.parametrize("path", ["/proc", "/sys", "/proc/self"])
def test_kernel_filesystems_as_objects(world: World, objects: dict[str, Any], path: str) -> None:
    """Files of proc, sysfs and the like answer by the reader's capabilities, not
    its uid: they are never object directories (nor dumpfiles)."""
    dump = world.dump("pseudo.dump", _root_line())
    spec = _spec(world, objects, dump)
    spec["objects"] = [path]
    out = world.call(spec)
    assert out["error"] == "io.composefs.Repository.BadFileDescriptor", out
    assert out["parameters"]["parameter"] == "objectDirectoryFileDescriptors"
    assert "kernel filesystem" in out["parameters"]["message"]


def test_kernel_file_as_dumpfile(world: World, objects: dict[str, Any]) -> None:
    out = world.call(_spec(world, objects, "/proc/self/status"))
    assert out["error"] == "io.composefs.Repository.BadFileDescriptor", out
    assert out["parameters"]["parameter"] == "dumpfileFileDescriptor"


def test_calls_per_uid_counted() -> None:
    """The per-uid count itself: a uid's second concurrent call is refused, another
    uid's is not, and a finished call frees its place."""
    own = OwnMounts(OwnMountLimits(calls_per_uid=1))
    own._enter(5000)
    with pytest.raises(VarlinkReplyError) as err:
        own._enter(5000)
    assert err.value.parameters["limit"] == "callsPerUid"
    own._enter(5001)
    own._leave(5000)
    own._enter(5000)


def test_calls_per_minute_per_uid() -> None:
    """The rate per uid, on a clock the test turns: a burst, then one call per
    refill interval; another uid has a bucket of its own; a refused call (too
    many at once) spends no token."""
    now = [1000.0]
    own = OwnMounts(OwnMountLimits(calls_per_uid=1, calls_per_minute=6, burst=3))
    own.clock = lambda: now[0]

    def call(uid: int) -> None:
        own._enter(uid)
        own._leave(uid)

    for _ in range(3):
        call(5000)
    with pytest.raises(VarlinkReplyError) as err:
        call(5000)
    assert err.value.parameters["limit"] == "callsPerMinute"
    assert "try again in 10.0 s" in err.value.parameters["message"]
    call(5001)  # another uid: its own burst
    now[0] += 9.9
    with pytest.raises(VarlinkReplyError):
        call(5000)
    now[0] += 0.1
    call(5000)  # one token back after 10 s (6 a minute)
    now[0] += 3600
    for _ in range(3):  # never more than the burst, however long the pause
        call(5000)
    with pytest.raises(VarlinkReplyError):
        call(5000)
    # A call refused for running twice at once takes no token.
    now[0] += 3600
    own._enter(5002)
    for _ in range(5):
        with pytest.raises(VarlinkReplyError) as err:
            own._enter(5002)
        assert err.value.parameters["limit"] == "callsPerUid"
    own._leave(5002)
    call(5002)
    call(5002)
    with pytest.raises(VarlinkReplyError) as err:
        call(5002)
    assert err.value.parameters["limit"] == "callsPerMinute"


def test_rate_option_reaches_the_limits(tmp_path: Path) -> None:
    """--mount-dumpfile-rate at start and on reload: the interface's value, and the
    limits of the OwnMounts its first call makes (and changes them after)."""
    repo = Repository.init(tmp_path / "repo")
    iface = build_service(repo, MountTracker(tmp_path / "run"), mount_dumpfile_rate=7)
    handler = iface.interfaces_handlers["io.composefs.Repository"]
    assert handler.mount_dumpfile_rate == 7
    handler.own_mounts = OwnMounts()
    handler.set_mount_dumpfile_rate(9)
    assert handler.own_mounts.limits.calls_per_minute == 9


def test_rate_buckets_stay_bounded() -> None:
    """Many uids calling once each: full buckets are dropped, so the table holds
    only uids that called within a refill."""
    now = [0.0]
    own = OwnMounts(OwnMountLimits(calls_per_minute=60, burst=2))
    own.clock = lambda: now[0]
    for uid in range(10_000):
        now[0] += 0.01
        own._enter(uid)
        own._leave(uid)
    assert len(own._buckets) <= ownmount._MAX_BUCKETS + 1


def test_tree_shapes(world: World, objects: dict[str, Any]) -> None:
    """Directories, symlinks and hard links of the caller's dumpfile come out as
    written; a whiteout (a 0:0 device) is written as C's writer does, an empty
    regular file with escaped whiteout xattrs: no device at all."""
    dump = world.dump(
        "shapes.dump",
        _root_line()
        + "/d 0 40750 2 0 0 0 0.0 - - -\n"
        + f"/d/f 12 100640 2 0 0 0 0.0 {objects['mine']} - - user.note=hi\n"
        + "/d/hard 0 @120000 - - - - 0.0 /d/f - -\n"
        + "/link 4 120777 1 0 0 0 0.0 /d/f - -\n"
        + "/wh 0 20000 1 0 0 0 0.0 - - -\n",
    )
    out = world.call(
        _spec(
            world, objects, dump, files=["d/f", "d/hard", "link", "wh"], where=world.where("shapes")
        )
    )
    seen = out["seen"]["files"]
    assert seen["d/f"]["content"] == "my own file\n"
    assert seen["d/hard"]["content"] == "my own file\n"
    assert stat.S_ISLNK(seen["link"]["mode"])
    assert stat.S_ISREG(seen["wh"]["mode"]), seen["wh"]
