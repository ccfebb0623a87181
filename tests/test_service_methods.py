"""io.composefs.Repository methods, called directly with a CallContext (no sockets).

Every method, every error it declares, progress replies and cancellation, real
mounts (attached at ``where`` and detached fds attached here with move_mount), and
GC keeping what is mounted in any mount namespace or handed out as a detached fd.
Replies are checked against the IDL's reply types (:func:`check_reply`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import varlink
from varlink import scanner

from composefsd.kernel import mount as mount_module
from composefsd.kernel.mountinfo import (
    ComposefsMount,
    composefs_mount_at,
    list_composefs_mounts,
)
from composefsd.kernel.repomount import (
    ObjectsDirectory,
    is_repository_mount,
    mount_repository_image,
)
from composefsd.kernel.syscalls import (
    MNT_DETACH,
    MOUNT_ATTR_RDONLY,
    FsContext,
    move_mount,
    umount2,
    unshare,
)
from composefsd.kernel.userns import IdMapping, create_userns
from composefsd.kernel.verity import VerityAlgorithmMismatchError, VerityNotEnabledError
from composefsd.repository import (
    CorruptObjectError,
    CorruptRepositoryError,
    ImageNotFoundError,
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
from composefsd.repository import verify as verify_module
from composefsd.repository.meta import RepoMetadata
from composefsd.service import methods as methods_module
from composefsd.service.context import CallCancelled, CallContext, Peer, VarlinkReplyError
from composefsd.service.methods import INTERFACE, RepositoryInterface, reply_error
from composefsd.service.mounts import MountTracker
from servicehelpers import unmount_below
from trees import random_tree

CLONE_NEWNS = 0x00020000

IDL_PATH = Path(methods_module.__file__).parent / "io.composefs.Repository.varlink"
IDL = varlink.Interface(IDL_PATH.read_text())


# -- checking replies against the IDL -------------------------------------------------------


def _check_value(t: Any, value: Any, where: str) -> None:
    if isinstance(t, scanner._Maybe):
        if value is None:
            return
        _check_value(t.element_type, value, where)
    elif isinstance(t, scanner._CustomType):
        _check_value(IDL.members[t.name].type, value, where)
    elif isinstance(t, bool):
        assert isinstance(value, bool), where
    elif isinstance(t, int):
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif isinstance(t, str):
        assert isinstance(value, str), where
    elif isinstance(t, float):
        assert isinstance(value, int | float) and not isinstance(value, bool), where
    elif isinstance(t, scanner._Array):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            _check_value(t.element_type, item, f"{where}[{i}]")
    elif isinstance(t, scanner._Enum):
        assert value in t.fields, f"{where}: {value!r} not in {t.fields}"
    elif isinstance(t, scanner._Struct):
        _check_struct(t, value, where)
    else:  # pragma: no cover
        raise AssertionError(f"{where}: unexpected IDL type {t!r}")


def _check_struct(t: Any, value: Any, where: str) -> None:
    assert isinstance(value, dict), where
    unknown = set(value) - set(t.fields)
    assert not unknown, f"{where}: fields not in the IDL: {unknown}"
    for name, ftype in t.fields.items():
        if name not in value:
            assert isinstance(ftype, scanner._Maybe), f"{where}: required {name} missing"
        else:
            _check_value(ftype, value[name], f"{where}.{name}")


def check_reply(method: str, params: dict[str, Any]) -> dict[str, Any]:
    _check_struct(IDL.members[method].out_type, params, method)
    return params


def check_error(err: VarlinkReplyError) -> VarlinkReplyError:
    if err.name.startswith(INTERFACE + "."):
        name = err.name[len(INTERFACE) + 1 :]
        _check_struct(IDL.members[name].type, err.parameters, name)
    return err


# -- fixtures -------------------------------------------------------------------------------


def _tree(root: Path, seed: int = 1, files: int = 20) -> Path:
    return random_tree(root, seed=seed, files=files, dirs=4, sizes=(0, 30, 5000, 70_000))


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            if not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Env:
    """A repository, its interface, and calls made the way the transport makes them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo = Repository.init(tmp / "repo")
        self.tracker = MountTracker(tmp / "run")
        self.iface = RepositoryInterface(self.repo, self.tracker)
        self.src = _tree(tmp / "src")
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.replies: list[dict[str, Any]] = []

    def ctx(
        self,
        method: str,
        *,
        more: bool = False,
        fds: list[int] | None = None,
        send: Callable[[dict[str, Any]], None] | None = None,
    ) -> CallContext:
        self.replies = []
        return CallContext(
            peer=Peer(os.getpid(), 0, 0),
            method=f"{INTERFACE}.{method}",
            more=more,
            fds=list(fds or []),
            send_continues=send or self.replies.append,
        )

    def call(self, method: str, *args: Any, more: bool = False, **kw: Any) -> dict[str, Any]:
        ctx = kw.pop("ctx", None) or self.ctx(method, more=more)
        result = getattr(self.iface, method)(*args, _request=ctx, **kw)
        for reply in self.replies:
            check_reply(method, reply)
        return check_reply(method, result)

    def error(self, method: str, *args: Any, **kw: Any) -> VarlinkReplyError:
        with pytest.raises(VarlinkReplyError) as info:
            self.call(method, *args, **kw)
        return check_error(info.value)

    def create(self, src: Path | None = None, ref: str | None = "app") -> str:
        out = self.call("CreateImage", str(src or self.src), None, ref, *[None] * 6)
        return str(out["digest"])

    def mount(self, image: str, where: Path | None, **fields: Any) -> dict[str, Any]:
        return self.call("Mount", *_mount_args(image, where, **fields))


_MOUNT_FIELDS = (
    "expectedDigest",
    "verity",
    "readOnly",
    "upperDirectory",
    "upperDirectoryFileDescriptor",
    "workDirectory",
    "workDirectoryFileDescriptor",
    "userNamespaceFileDescriptor",
    "uidMap",
    "gidMap",
)


def _mount_args(image: str, where: Path | None, **fields: Any) -> list[Any]:
    unknown = set(fields) - set(_MOUNT_FIELDS)
    assert not unknown, unknown
    return [image, *(fields.get(f) for f in _MOUNT_FIELDS), str(where) if where else None]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    unmount_below(tmp_path)


def _name(err: VarlinkReplyError) -> str:
    return err.name.rpartition(".")[2]


# -- Describe -------------------------------------------------------------------------------


def test_describe(env: Env) -> None:
    out = env.call("Describe")
    assert out == {
        "path": str(env.repo.path),
        "algorithm": "sha256",
        "verity": "try",
        "images": 0,
        "refs": 0,
        "mounts": 0,
        "erofsVersion": 1,
        "extraErofsVersions": [],
        "version": out["version"],
    }
    env.create()
    env.create(_tree(env.tmp / "src2", seed=2), ref="os/v1")
    env.call("CreateImage", str(env.src), None, "alias", *[None] * 6)
    env.mount("app", env.mnt)
    out = env.call("Describe")
    assert (out["images"], out["refs"], out["mounts"]) == (2, 3, 1)


def test_read_only_repository(env: Env) -> None:
    digest = env.create()
    view = env.tmp / "ro"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(env.repo.path), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        ro = RepositoryInterface(Repository.open(view), env.tracker)
        ctx = env.ctx("Describe")
        out = check_reply("Describe", ro.Describe(_request=ctx))
        assert "read-only" in out["readOnlyReason"]
        calls: list[tuple[str, list[Any]]] = [
            ("CreateImage", [str(env.src), None, "x", *[None] * 6]),
            ("RemoveImage", ["app"]),
            ("GarbageCollect", [None]),
        ]
        for method, args in calls:
            with pytest.raises(VarlinkReplyError) as info:
                getattr(ro, method)(*args, _request=env.ctx(method))
            assert _name(check_error(info.value)) == "ReadOnlyRepository", method
        # Reading and mounting still work.
        out = check_reply("Verify", ro.Verify("app", _request=env.ctx("Verify")))
        assert out["ok"] is True and out["digest"] == digest
        mounted = ro.Mount(*_mount_args("app", env.mnt), _request=env.ctx("Mount"))
        assert mounted["where"] == str(env.mnt)
    finally:
        umount2(str(env.mnt), MNT_DETACH) if composefs_mount_at(str(env.mnt)) else None
        umount2(str(view), MNT_DETACH)


# -- CreateImage ----------------------------------------------------------------------------


def test_create_image_by_path_with_progress(env: Env) -> None:
    out = env.call("CreateImage", str(env.src), None, "refs/app", *[None] * 6, more=True)
    assert out["ref"] == "app"
    assert out["files"] == 20
    assert out["objectsWritten"] + out["objectsReused"] > 0
    assert out["bytesWritten"] > 0 and out["verityEnabled"] is False
    assert out["erofsVersion"] == 1  # the repository's format
    assert set(out) == {
        "digest",
        "erofsVersion",
        "ref",
        "files",
        "objectsWritten",
        "objectsReused",
        "bytesWritten",
        "verityEnabled",
    }
    phases = [r["progress"]["phase"] for r in env.replies]
    assert all(set(r) == {"progress"} for r in env.replies)
    assert phases[0] == "scan" and "import" in phases and phases[-1] == "publish"
    assert env.repo.resolve_image("app") == out["digest"]
    # The same tree again: nothing new, same digest; without more no replies.
    again = env.call("CreateImage", str(env.src), None, None, *[None] * 6)
    assert again["digest"] == out["digest"] and again["objectsWritten"] == 0
    assert "ref" not in again and env.replies == []


def test_create_image_options(env: Env) -> None:
    (env.src / "d0").chmod(0o755)
    # minVersion/maxVersion 0..0: C mkcomposefs's V0 image.
    plain = env.call("CreateImage", str(env.src), None, None, *[None] * 4, 0, 0)["digest"]
    epoch = env.call("CreateImage", str(env.src), None, None, True, True, None, True, 1, 1)
    assert epoch["digest"] != plain
    user = env.call("CreateImage", str(env.src), None, None, None, None, True, None, 0, 0)
    assert user["digest"] == plain  # no xattrs here to drop


@pytest.mark.parametrize("flags", [os.O_RDONLY | os.O_DIRECTORY, os.O_PATH | os.O_DIRECTORY])
def test_create_image_from_fd(env: Env, flags: int) -> None:
    by_path = env.create(ref=None)
    fd = os.open(env.src, flags | os.O_CLOEXEC)
    ctx = env.ctx("CreateImage", fds=[fd])
    out = env.call("CreateImage", None, 0, "fromfd", *[None] * 6, ctx=ctx)
    assert out["digest"] == by_path
    assert ctx.fds == [None]
    with pytest.raises(OSError) as info:
        os.fstat(fd)  # closed by the method
    assert info.value.errno == errno.EBADF


def test_create_image_from_fd_large_tree_uses_workers(env: Env) -> None:
    # Enough data for import worker processes, which read beneath the fd they inherit.
    big = env.tmp / "big"
    big.mkdir()
    for i in range(3):
        (big / f"f{i}").write_bytes(os.urandom(1 << 20) * 45)
    expected = Repository.init(env.tmp / "other").create_image(big).digest
    fd = os.open(big, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    out = env.call("CreateImage", None, 0, None, *[None] * 6, ctx=env.ctx("CreateImage", fds=[fd]))
    assert out["digest"] == expected and out["files"] == 3
    assert env.repo.fsck().ok


def test_create_image_errors(env: Env, tmp_path: Path) -> None:
    none = [None] * 6
    e = env.error("CreateImage", None, None, None, *none)
    assert (e.name, e.parameters) == (
        "org.varlink.service.InvalidParameter",
        {"parameter": "sourcePath"},
    )
    fd = os.open(env.src, os.O_PATH | os.O_CLOEXEC)
    ctx = env.ctx("CreateImage", fds=[fd])
    e = env.error("CreateImage", str(env.src), 0, None, *none, ctx=ctx)
    assert e.parameters == {"parameter": "sourcePath"}
    ctx.close_fds()
    assert env.error("CreateImage", "rel/path", None, None, *none).parameters == {
        "parameter": "sourcePath"
    }
    e = env.error("CreateImage", None, 3, None, *none)
    assert e.parameters == {"parameter": "sourceDirectoryFileDescriptor"}
    e = env.error("CreateImage", str(env.src), None, None, None, True, True, None, None, None)
    assert e.parameters == {"parameter": "userXattrs"}
    e = env.error("CreateImage", str(env.src), None, None, None, None, None, None, 2, None)
    assert e.parameters == {"parameter": "minVersion"}
    e = env.error("CreateImage", str(env.src), None, None, None, None, None, None, None, -1)
    assert e.parameters == {"parameter": "maxVersion"}

    e = env.error("CreateImage", str(tmp_path / "missing"), None, None, *none)
    assert _name(e) == "SourceError"
    assert e.parameters["path"] == str(tmp_path / "missing")
    assert "does not exist" in e.parameters["message"]
    e = env.error("CreateImage", str(env.src / "d0" / "f0"), None, None, *none)
    assert _name(e) == "SourceError" and "not a directory" in e.parameters["message"]
    file_fd = os.open(env.src / "d0" / "f0", os.O_RDONLY | os.O_CLOEXEC)
    e = env.error("CreateImage", None, 0, None, *none, ctx=env.ctx("CreateImage", fds=[file_fd]))
    assert _name(e) == "SourceError" and "path" not in e.parameters
    for bad in (".hidden", "a//b", "refs/"):
        e = env.error("CreateImage", str(env.src), None, bad, *none)
        assert _name(e) == "InvalidName" and e.parameters["name"] == bad
    # A ref below an existing ref.
    env.create(ref="base")
    e = env.error("CreateImage", str(env.src), None, "base/sub", *none)
    assert _name(e) == "InvalidName"
    assert env.repo.fsck().ok


def test_create_image_verity_unsupported(env: Env) -> None:
    meta = RepoMetadata.new(env.repo.hash_algorithm, VerityPolicy.REQUIRED)
    meta_path = env.repo.path / "meta.json"
    meta_path.unlink()
    meta_path.write_bytes(meta.to_json())
    iface = RepositoryInterface(Repository.open(env.repo.path), env.tracker)
    with pytest.raises(VarlinkReplyError) as info:
        iface.CreateImage(str(env.src), *[None] * 8, _request=env.ctx("CreateImage"))
    assert _name(check_error(info.value)) == "VerityUnsupported"


@pytest.mark.parametrize("size_mb", [1, 140])
def test_create_image_cancelled(env: Env, size_mb: int) -> None:
    """The client goes away once the import runs: the work stops, nothing half-made."""
    src = env.tmp / "cancel"
    src.mkdir()
    rng = random.Random(size_mb)
    for i in range(200):
        (src / f"f{i}").write_bytes(rng.randbytes(size_mb * (1 << 20) // 200))
    ctx: CallContext

    def send(params: dict[str, Any]) -> None:
        if params["progress"]["phase"] == "import":
            ctx.cancelled.set()

    ctx = env.ctx("CreateImage", more=True, send=send)
    started = time.monotonic()
    with pytest.raises(CallCancelled):
        env.iface.CreateImage(str(src), None, "cancelled", *[None] * 6, _request=ctx)
    assert time.monotonic() - started < 30
    assert env.repo.list_images() == []
    with pytest.raises(ImageNotFoundError):
        env.repo.resolve_image("cancelled")
    report = env.repo.fsck()
    assert report.ok, report
    env.call("GarbageCollect", None)
    assert not any(p.is_file() for p in (env.repo.path / "objects").rglob("*"))
    # Cancelled before anything was sent: no progress at all without "more".
    quiet = env.ctx("CreateImage")
    quiet.cancelled.set()
    with pytest.raises(CallCancelled):
        env.iface.CreateImage(str(src), None, None, *[None] * 6, _request=quiet)


def test_progress_heartbeat(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that reports nothing for a while still gets its last progress repeated."""
    env.iface.heartbeat = 0.2
    real = env.repo.gc

    def slow_gc(**kw: Any) -> Any:
        kw["progress"](Progress("mark", 1, 2))
        time.sleep(1.0)
        return real(**kw)

    monkeypatch.setattr(env.repo, "gc", slow_gc)
    env.call("GarbageCollect", None, more=True)
    marks = [r for r in env.replies if r["progress"] == {"phase": "mark", "done": 1, "total": 2}]
    assert len(marks) >= 3


# -- Verify ---------------------------------------------------------------------------------


def test_verify_one(env: Env) -> None:
    digest = env.create()
    out = env.call("Verify", "app", more=True)
    assert out["digest"] == digest and out["ok"] is True and out["problems"] == []
    assert out["objectsChecked"] > 0 and out["verityMeasured"] == 0
    assert {r["progress"]["phase"] for r in env.replies} == {"image", "objects"}
    # Damage: one object missing, one changed.
    objects = sorted(
        p for p in (env.repo.path / "objects").rglob("*") if p.is_file() and p.name != digest[2:]
    )
    objects[0].unlink()
    objects[1].chmod(0o644)
    with open(objects[1], "r+b") as f:
        f.write(b"X")
    out = env.call("Verify", digest)
    assert out["ok"] is False
    kinds = sorted(p["kind"] for p in out["problems"])
    assert kinds == ["corrupt-object", "missing-object"]
    assert all(p["object"] for p in out["problems"])


def test_verify_no_verity_says_why(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file with fs-verity in another hash algorithm is not reported as having none."""
    digest = env.create()

    def other_algorithm(fd: int, algorithm: Any) -> bytes:
        raise VerityAlgorithmMismatchError(
            errno.EOVERFLOW,
            f"fd {fd}: its fs-verity uses sha512 with a 64-byte digest, expected sha256 (32 bytes)",
            expected=1,
            actual=2,
        )

    monkeypatch.setattr(verify_module, "measure_verity", other_algorithm)
    out = env.call("Verify", digest)
    assert out["ok"] is True and out["problems"]  # under "try": worth knowing only
    assert {p["kind"] for p in out["problems"]} == {"no-verity"}
    for problem in out["problems"]:
        assert "its fs-verity uses sha512 with a 64-byte digest" in problem["message"]
        assert "not enabled" not in problem["message"]
        assert problem["message"].startswith(f"object {problem['object']}: ")

    def not_enabled(fd: int, algorithm: Any) -> bytes:
        raise VerityNotEnabledError(errno.ENODATA, f"fd {fd}: no fs-verity")

    monkeypatch.setattr(verify_module, "measure_verity", not_enabled)
    out = env.call("Verify", digest)
    assert {p["message"].partition(": ")[2] for p in out["problems"]} == {
        "fs-verity is not enabled on the object (allowed by the repository's policy)"
    }


def test_verify_uses_half_the_cpus_at_most(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """One caller's Verify cannot take every CPU (the transport runs few at once)."""
    seen: list[int | None] = []
    real = verify_module.check_files

    def check_files(*args: Any, workers: int | None = None) -> None:
        seen.append(workers)
        real(*args, workers=workers)

    monkeypatch.setattr(verify_module, "check_files", check_files)
    env.create()
    env.create(_tree(env.tmp / "other", seed=2), ref="other")
    env.call("Verify", "app")
    env.call("Verify", None, more=True)
    half = max(1, verify_module.default_workers() // 2)
    assert RepositoryInterface.verify_workers == half
    assert seen == [half, half, half]


def test_verify_all(env: Env) -> None:
    assert env.error("Verify", None).name == "org.varlink.service.ExpectedMore"
    assert env.call("Verify", None, more=True) == {}
    first = env.create()
    second = env.create(_tree(env.tmp / "src2", seed=2), ref="b")
    out = env.call("Verify", None, more=True)
    results = [r for r in env.replies if "progress" not in r]
    assert [r["digest"] for r in results] == [first]
    assert out["digest"] == second and out["ok"] is True
    # Progress of the second image comes after the first result.
    index = env.replies.index(results[0])
    assert any("progress" in r for r in env.replies[index + 1 :])


def test_verify_errors(env: Env) -> None:
    env.create()
    e = env.error("Verify", "nope")
    assert (_name(e), e.parameters) == ("NoSuchImage", {"image": "nope"})
    e = env.error("Verify", "../x")
    assert _name(e) == "InvalidName" and e.parameters["name"] == "../x"
    e = env.error("Verify", "sha512:" + "0" * 128)
    assert _name(e) == "InvalidName"
    e = env.error("Verify", "sha256:" + "0" * 64)
    assert _name(e) == "NoSuchImage"


# -- Mount / Unmount / ListMounts -----------------------------------------------------------


def test_mount_where_list_unmount(env: Env) -> None:
    digest = env.create()
    out = env.mount("app", env.mnt)
    assert out == {
        "where": str(env.mnt),
        "digest": digest,
        "imageCheck": "userspace",
        "objectVerity": False,
        "readOnly": True,
        "idmapped": False,
    }
    assert _hashes(env.mnt) == _hashes(env.src)
    listed = env.call("ListMounts", None)["mounts"]
    assert listed == [
        {
            "where": str(env.mnt),
            "digest": digest,
            "source": f"composefs:{digest}",
            "readOnly": True,
            "verity": "off",
            "inRepository": True,
        }
    ]
    assert env.call("Describe")["mounts"] == 1
    # A composefs mount of another repository shows only with "all".
    other = Repository.init(env.tmp / "other")
    other.create_image(_tree(env.tmp / "src3", seed=3), ref="x")
    mnt2 = env.tmp / "mnt2"
    mnt2.mkdir()
    mount_repository_image(other, "x").attach(mnt2)
    assert [m["where"] for m in env.call("ListMounts", None)["mounts"]] == [str(env.mnt)]
    everything = {m["where"]: m for m in env.call("ListMounts", True)["mounts"]}
    assert everything[str(mnt2)]["inRepository"] is False
    assert everything[str(env.mnt)]["inRepository"] is True

    assert env.call("Unmount", str(env.mnt), None) == {"digest": digest}
    assert composefs_mount_at(str(env.mnt)) is None
    e = env.error("Unmount", str(env.mnt), None)
    assert (_name(e), e.parameters) == ("NotMounted", {"where": str(env.mnt)})
    assert env.call("ListMounts", None) == {"mounts": []}
    assert env.call("Unmount", str(mnt2) + "/", True) == {"digest": other.resolve_image("x")}


def test_mount_detached_fd(env: Env) -> None:
    digest = env.create()
    ctx = env.ctx("Mount")
    out = env.call("Mount", *_mount_args(digest, None), ctx=ctx)
    assert out["mountFileDescriptor"] == 0 and "where" not in out and out["digest"] == digest
    assert len(ctx.out_fds) == 1
    fd = ctx.out_fds.pop()
    try:
        # Usable as it is, and pinned until it is gone.
        assert sorted(os.listdir(f"/proc/self/fd/{fd}")) == sorted(os.listdir(env.src))
        pins = list((env.tmp / "run" / "pins" / digest).iterdir())
        assert len(pins) == 1
        doc = json.loads(pins[0].read_text())
        assert doc["digest"] == digest and doc["peerPid"] == os.getpid()
        move_mount(fd, env.mnt)
    finally:
        os.close(fd)
    assert _hashes(env.mnt) == _hashes(env.src)
    assert env.call("ListMounts", None)["mounts"][0]["where"] == str(env.mnt)
    env.call("Unmount", str(env.mnt), None)


def test_mount_writable_fds_and_idmap(env: Env) -> None:
    env.create()
    upper, work = env.tmp / "upper", env.tmp / "work"
    upper.mkdir()
    work.mkdir()
    up_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    work_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    ctx = env.ctx("Mount", fds=[work_fd, up_fd])
    args = _mount_args(
        "app",
        env.mnt,
        upperDirectoryFileDescriptor=1,
        workDirectoryFileDescriptor=0,
        uidMap=[{"inside": 0, "outside": 100000, "count": 65536}],
    )
    out = env.call("Mount", *args, ctx=ctx)
    assert out["readOnly"] is False and out["idmapped"] is True
    assert ctx.fds == [None, None]
    assert (env.mnt / "d1" / "f1").stat().st_uid == 100000
    (env.mnt / "new").write_text("hello")
    assert (upper / "new").read_text() == "hello"
    env.call("Unmount", str(env.mnt), None)

    # By paths, read-only forced, idmapped through a user namespace fd.
    userns = create_userns([IdMapping(0, 300000, 65536)])
    ctx = env.ctx("Mount", fds=[userns])
    args = _mount_args(
        "app",
        env.mnt,
        upperDirectory=str(upper),
        workDirectory=str(work),
        readOnly=True,
        userNamespaceFileDescriptor=0,
        verity="disabled",
    )
    out = env.call("Mount", *args, ctx=ctx)
    assert out["readOnly"] is True and out["idmapped"] is True and out["imageCheck"] == "userspace"
    assert (env.mnt / "new").read_text() == "hello"
    assert (env.mnt / "d1").stat().st_uid == 300000
    with pytest.raises(OSError):
        (env.mnt / "other").write_text("x")
    env.call("Unmount", str(env.mnt), True)


def _mounts_below(root: Path) -> list[str]:
    return [m.mountpoint for m in list_composefs_mounts() if m.mountpoint.startswith(f"{root}/")]


def test_mount_errors(env: Env) -> None:
    digest = env.create()
    before = _mounts_below(env.tmp)

    def err(image: str = "app", where: Path | None = env.mnt, **fields: Any) -> VarlinkReplyError:
        ctx = env.ctx("Mount", fds=fields.pop("fds", None))
        e = env.error("Mount", *_mount_args(image, where, **fields), ctx=ctx)
        ctx.close_fds()
        return e

    def invalid(**fields: Any) -> str:
        e = err(**fields)
        assert e.name == "org.varlink.service.InvalidParameter", e
        return str(e.parameters["parameter"])

    assert (_name(e := err("nope")), e.parameters) == ("NoSuchImage", {"image": "nope"})
    assert _name(e := err(".bad")) == "InvalidName" and e.parameters["name"] == ".bad"
    e = err(expectedDigest="00" * 32)
    assert _name(e) == "ImageVerityFailed"
    assert e.parameters["reason"] == "Image has wrong fs-verity"
    e = err(verity="required")
    assert _name(e) == "ImageVerityFailed" and e.parameters["reason"] == "Image has no fs-verity"
    assert env.mount("app", env.mnt, expectedDigest="sha256:" + digest.upper())["digest"] == digest
    env.call("Unmount", str(env.mnt), None)
    e = err(where=env.tmp / "missing")
    assert _name(e) == "MountFailed" and e.parameters["errnoName"] == "ENOENT"
    assert "missing" in e.parameters["message"]
    # Not a user namespace: the kernel refuses to idmap with it.
    e = err(fds=[os.open("/", os.O_RDONLY | os.O_CLOEXEC)], userNamespaceFileDescriptor=0)
    assert _name(e) == "MountFailed" and e.parameters["errnoName"]

    assert invalid(expectedDigest="abc") == "expectedDigest"
    assert invalid(where=Path("relative")) == "where"
    assert invalid(upperDirectory="/tmp") == "workDirectory"
    assert invalid(workDirectoryFileDescriptor=0, fds=[os.open("/", os.O_PATH)]) == (
        "upperDirectory"
    )
    assert invalid(upperDirectory="up", workDirectory="/tmp") == "upperDirectory"
    assert (
        invalid(upperDirectory="/tmp", upperDirectoryFileDescriptor=0, workDirectory="/tmp")
        == "upperDirectoryFileDescriptor"
    )
    assert invalid(upperDirectoryFileDescriptor=5, workDirectoryFileDescriptor=6) == (
        "upperDirectoryFileDescriptor"
    )
    assert invalid(userNamespaceFileDescriptor=0) == "userNamespaceFileDescriptor"
    mapping = [{"inside": 0, "outside": 1000, "count": 1}]
    assert invalid(gidMap=mapping) == "gidMap"
    assert invalid(userNamespaceFileDescriptor=0, uidMap=mapping) == "uidMap"
    assert invalid(uidMap=[{"inside": 0, "outside": 1000, "count": 0}]) == "uidMap"
    assert invalid(uidMap=[]) == "uidMap"
    assert invalid(uidMap=mapping, gidMap=[{"inside": -1, "outside": 0, "count": 1}]) == "gidMap"
    assert invalid(verity="sometimes") == "verity"
    assert _mounts_below(env.tmp) == before
    assert not (env.tmp / "run" / "pins").exists()


def test_unmount_errors(env: Env) -> None:
    env.create()
    e = env.error("Unmount", "relative", None)
    assert e.parameters == {"parameter": "where"}
    e = env.error("Unmount", str(env.tmp / "nothing"), None)
    assert _name(e) == "NotMounted"
    e = env.error("Unmount", "/proc", None)  # mounted, but not composefs
    assert (_name(e), e.parameters) == ("NotMounted", {"where": "/proc"})
    env.mount("app", env.mnt)
    with open(env.mnt / "d1" / "f1", "rb"):
        e = env.error("Unmount", str(env.mnt), False)
        assert (_name(e), e.parameters["errnoName"]) == ("MountFailed", "EBUSY")
        assert env.call("Unmount", str(env.mnt), True)["digest"]
    assert composefs_mount_at(str(env.mnt)) is None


def test_unmount_swap_between_check_and_unmount(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: a caller who owns a directory along ``where`` swaps it for a link to
    a tmpfs's place while Unmount runs, after the check: the composefs mount that was
    checked goes (it is answered for), the tmpfs stays. Before, umount2 walked the
    path again and took the tmpfs down."""
    digest = env.create()
    where = env.tmp / "a" / "b" / "mnt"
    where.mkdir(parents=True)
    env.mount("app", where)
    tmpfs = env.tmp / "elsewhere" / "b" / "mnt"
    tmpfs.mkdir(parents=True)
    with FsContext("tmpfs") as ctx:
        ctx.create()
        fd = ctx.mount()
    try:
        move_mount(fd, tmpfs)
    finally:
        os.close(fd)
    (tmpfs / "on-tmpfs").write_text("x")

    def swap_then_umount2(path: str, flags: int = 0) -> None:
        # One Unmount at a time: another caller's for the same mount would
        # otherwise pass its check now and take down what lies below it.
        assert not env.iface._unmount_lock.acquire(blocking=False)
        (env.tmp / "a").rename(env.tmp / "a.old")
        (env.tmp / "a").symlink_to(env.tmp / "elsewhere")
        umount2(path, flags)

    monkeypatch.setattr(mount_module, "umount2", swap_then_umount2)
    try:
        assert env.call("Unmount", str(where), None) == {"digest": digest}
        assert (tmpfs / "on-tmpfs").exists(), "the tmpfs was unmounted"
        assert composefs_mount_at(str(env.tmp / "a.old" / "b" / "mnt")) is None
        # The path now leads to the tmpfs: not composefs.
        e = env.error("Unmount", str(where), True)
        assert (_name(e), e.parameters) == ("NotMounted", {"where": str(where)})
        assert (tmpfs / "on-tmpfs").exists()
    finally:
        if (tmpfs / "on-tmpfs").exists():  # not composefs: the fixture leaves it
            umount2(tmpfs, MNT_DETACH)


# -- ListImages / RemoveImage ---------------------------------------------------------------


def test_list_images(env: Env) -> None:
    assert env.call("ListImages", None) == {"images": []}
    before = time.time()
    digest = env.create()
    env.call("CreateImage", str(env.src), None, "os/v1", *[None] * 6)
    second = env.create(_tree(env.tmp / "s2", seed=2), ref=None)
    out = env.call("ListImages", None)["images"]
    assert [i["digest"] for i in out] == [digest, second]
    assert out[0]["refs"] == ["app", "os/v1"] and out[1]["refs"] == []
    assert out[0]["size"] == os.stat(env.repo.path / "images" / digest).st_size
    assert abs(out[0]["createdUSec"] / 1e6 - before) < 60
    assert env.call("ListImages", "os/v1")["images"] == [out[0]]
    assert env.call("ListImages", "sha256:" + second)["images"] == [out[1]]
    assert _name(env.error("ListImages", "nope")) == "NoSuchImage"
    assert _name(env.error("ListImages", "a/../b")) == "InvalidName"


def test_remove_image(env: Env) -> None:
    digest = env.create()
    env.call("CreateImage", str(env.src), None, "b", *[None] * 6)
    assert sorted(env.call("RemoveImage", "app")["removedRefs"]) == ["app", "b"]
    assert (_name(e := env.error("RemoveImage", "app")), e.parameters) == (
        "NoSuchImage",
        {"image": "app"},
    )
    assert _name(env.error("RemoveImage", digest)) == "NoSuchImage"
    assert _name(env.error("RemoveImage", "/abs")) == "InvalidName"
    other = env.create(_tree(env.tmp / "s2", seed=2), ref=None)
    assert env.call("RemoveImage", other) == {"removedRefs": []}


def test_remove_image_in_use(env: Env) -> None:
    digest = env.create()
    env.mount("app", env.mnt)
    e = env.error("RemoveImage", "app")
    assert (_name(e), e.parameters) == ("ImageInUse", {"image": "app", "where": [str(env.mnt)]})
    env.call("Unmount", str(env.mnt), None)
    ctx = env.ctx("Mount")
    env.call("Mount", *_mount_args("app", None), ctx=ctx)
    fd = ctx.out_fds.pop()
    try:
        e = env.error("RemoveImage", digest)
        assert _name(e) == "ImageInUse"
        assert e.parameters["where"][0].startswith("detached mount ")
    finally:
        os.close(fd)
    env.tracker.grace = 0
    assert env.call("RemoveImage", "app") == {"removedRefs": ["app"]}
    assert not (env.tmp / "run" / "pins" / digest).exists()


# -- GarbageCollect -------------------------------------------------------------------------


def _object_files(repo: Repository) -> set[str]:
    return {str(p) for p in (repo.path / "objects").rglob("*") if p.is_file()}


def test_gc(env: Env) -> None:
    env.create()
    other = env.create(_tree(env.tmp / "s2", seed=2), ref="b")
    env.repo.remove_ref("b")
    objects = _object_files(env.repo)
    out = env.call("GarbageCollect", True, more=True)
    assert out["dryRun"] is True and out["imagesRemoved"] == 1 and out["objectsRemoved"] > 0
    assert _object_files(env.repo) == objects
    phases = {r["progress"]["phase"] for r in env.replies}
    assert {"roots", "mark", "sweep"} <= phases
    again = env.call("GarbageCollect", None)
    assert again == {**out, "dryRun": False}
    assert _name(env.error("Verify", other)) == "NoSuchImage"
    assert env.call("Verify", "app")["ok"] is True
    assert env.call("GarbageCollect", False)["objectsRemoved"] == 0


def test_gc_keeps_mounted_and_pinned_images(env: Env) -> None:
    attached = env.create(ref="attached")
    detached = env.create(_tree(env.tmp / "s2", seed=2), ref="detached")
    env.mount("attached", env.mnt)
    ctx = env.ctx("Mount")
    env.call("Mount", *_mount_args("detached", None), ctx=ctx)
    fd = ctx.out_fds.pop()
    env.repo.remove_ref("attached")
    env.repo.remove_ref("detached")
    env.tracker.grace = 0  # the pin lives on because the fd is open
    try:
        out = env.call("GarbageCollect", None)
        assert out["objectsRemoved"] == 0 and out["imagesRemoved"] == 0
        assert _hashes(env.mnt) == _hashes(env.src)
        with open(os.open("d1/f1", os.O_RDONLY, dir_fd=fd), "rb") as f:
            assert f.read() == (env.tmp / "s2" / "d1" / "f1").read_bytes()
        # A daemon started afresh knows the same.
        fresh = RepositoryInterface(env.repo, MountTracker(env.tmp / "run", grace=0))
        assert fresh.gc_pins() == {attached, detached}
    finally:
        os.close(fd)
    assert env.iface.gc_pins() == {attached}
    out = env.call("GarbageCollect", None)
    assert out["imagesRemoved"] == 1 and out["objectsRemoved"] > 0
    env.call("Unmount", str(env.mnt), None)
    assert env.call("GarbageCollect", None)["imagesRemoved"] == 1
    assert _object_files(env.repo) == set()


class _OtherNamespace:
    """A forked child in a mount namespace of its own; it exits when ``stdin`` is
    closed (``wait`` then reaps it)."""

    def __init__(self, pid: int, stdin: BinaryIO) -> None:
        self.pid = pid
        self.stdin = stdin

    def wait(self, timeout: float) -> int:
        del timeout  # the child exits as soon as stdin is closed
        return os.waitpid(self.pid, 0)[1]


def _mount_in_other_namespace(env: Env, repo: Path | None = None) -> _OtherNamespace:
    """A process in a mount namespace of its own with "app" of ``repo`` (default:
    env's) mounted at env.mnt there; it exits when its stdin is closed.

    A new namespace starts with copies of every mount of ours, those of tests
    running meanwhile too, which would hold their images in use while it lives:
    the child drops them at once (once private, so that nothing propagates back),
    forked rather than started, so that moment is short.
    """
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            # Only the two pipe ends: inherited ones (another child's stdin) would
            # keep what they lead to open.
            for fd in map(int, os.listdir("/proc/self/fd")):
                if fd > 2 and fd not in (ready_w, stop_r):
                    with contextlib.suppress(OSError):
                        os.close(fd)
            unshare(CLONE_NEWNS)
            subprocess.run(["mount", "--make-rprivate", "/"], check=True)
            for m in reversed(list_composefs_mounts()):
                with contextlib.suppress(OSError):
                    umount2(m.mountpoint, MNT_DETACH)
            mount = mount_repository_image(Repository.open(repo or env.repo.path), "app")
            mount.attach(env.mnt)
            os.write(ready_w, b"mounted")
            os.read(stop_r, 1)
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(stop_r)
    child = _OtherNamespace(pid, os.fdopen(stop_w, "wb"))
    try:
        assert os.read(ready_r, 16) == b"mounted"
    except BaseException:
        child.stdin.close()
        child.wait(10)
        raise
    finally:
        os.close(ready_r)
    return child


def test_gc_keeps_images_mounted_in_other_namespaces(env: Env) -> None:
    env.create()
    proc = _mount_in_other_namespace(env)
    try:
        assert composefs_mount_at(str(env.mnt)) is None  # not in our namespace
        # Every composefs mount of our namespace, the machine's others too: none of
        # them is this repository's or at env.mnt.
        listed = env.call("ListMounts", True)["mounts"]
        assert [m for m in listed if m["inRepository"] or m["where"] == str(env.mnt)] == []
        env.repo.remove_ref("app")
        out = env.call("GarbageCollect", None)
        assert out["imagesRemoved"] == 0 and out["objectsRemoved"] == 0
        e = env.error("RemoveImage", env.repo.list_images()[0].digest)
        assert _name(e) == "ImageInUse"
        (where,) = e.parameters["where"]
        assert where.startswith(f"{env.mnt} (mount namespace mnt:[")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    assert env.call("GarbageCollect", None)["imagesRemoved"] == 1


def test_another_repositorys_mount_in_another_namespace_does_not_count(env: Env) -> None:
    digest = env.create()
    other = Repository.init(env.tmp / "other")
    assert other.create_image(env.src, ref="app").digest == digest
    proc = _mount_in_other_namespace(env, other.path)
    try:
        theirs = [m for m in env.tracker.all_mounts() if m.mount.mountpoint == str(env.mnt)]
        assert [(m.mount.digest, m.own) for m in theirs] == [(digest, False)]
        assert env.tracker.in_use(env.repo) == {}
        assert list(env.tracker.in_use(other)) == [digest]
        assert env.call("RemoveImage", "app") == {"removedRefs": ["app"]}
        assert env.call("GarbageCollect", None)["objectsRemoved"] > 0
        assert _object_files(env.repo) == set()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


# -- "in use" means in use from this repository ---------------------------------------------


def _same_image_elsewhere(env: Env, name: str) -> tuple[Repository, RepositoryInterface]:
    """Another repository holding the same image as env's "app", with its own
    interface and the same runtime directory (as two daemons on one machine)."""
    other = Repository.init(env.tmp / name)
    iface = RepositoryInterface(other, MountTracker(env.tmp / "run"))
    return other, iface


def test_a_mount_from_another_repository_does_not_hold_the_image(env: Env) -> None:
    digest = env.create()
    other, other_iface = _same_image_elsewhere(env, "other")
    assert other.create_image(env.src, ref="app").digest == digest
    where = env.tmp / "other-mnt"
    where.mkdir()
    mount_repository_image(other, "app").attach(where)
    ctx = env.ctx("Mount")
    other_iface.Mount(*_mount_args("app", None), _request=ctx)
    (detached,) = ctx.out_fds
    try:
        assert env.iface.gc_pins() == set()
        assert env.call("ListMounts", None) == {"mounts": []}
        listed = {m["where"]: m for m in env.call("ListMounts", True)["mounts"]}
        assert listed[str(where)]["inRepository"] is False
        assert env.call("Describe")["mounts"] == 0
        # Ours mounted too: only ours is named, and held.
        env.mount("app", env.mnt)
        e = env.error("RemoveImage", "app")
        assert (_name(e), e.parameters["where"]) == ("ImageInUse", [str(env.mnt)])
        env.repo.remove_ref("app")
        assert env.call("GarbageCollect", None)["imagesRemoved"] == 0
        assert env.iface.gc_pins() == {digest}
        env.call("Unmount", str(env.mnt), None)
        # Unmounted here: removable and collected although the other's are out.
        assert env.iface.gc_pins() == set()
        assert env.call("RemoveImage", digest) == {"removedRefs": []}
        assert env.call("GarbageCollect", None)["objectsRemoved"] > 0
        assert _object_files(env.repo) == set()
        # The other repository's attached and detached mounts still hold its copy.
        assert other_iface.gc_pins() == {digest}
        e = check_error(_raises(other_iface.RemoveImage, "app", ctx=env.ctx("RemoveImage")))
        assert _name(e) == "ImageInUse"
        assert sorted(w.split(" ")[0] for w in e.parameters["where"]) == sorted(
            [str(where), "detached"]
        )
        assert _hashes(where) == _hashes(env.src)
    finally:
        os.close(detached)


def _raises(method: Callable[..., Any], *args: Any, ctx: CallContext) -> VarlinkReplyError:
    with pytest.raises(VarlinkReplyError) as info:
        method(*args, _request=ctx)
    return info.value


def test_mounts_through_other_paths_to_the_objects_count(env: Env) -> None:
    digest = env.create()
    # The repository reached through a symlink and through a bind mount of it.
    link = env.tmp / "link"
    link.symlink_to(env.repo.path)
    bind = env.tmp / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(env.repo.path), str(bind)], check=True)
    erofs = env.tmp / "erofs"
    erofs.mkdir()
    by_path = env.tmp / "by-path"
    by_path.mkdir()
    try:
        by_link, by_bind = env.tmp / "by-link", env.tmp / "by-bind"
        for repo_path, where in ((link, by_link), (bind, by_bind)):
            where.mkdir()
            mount_repository_image(Repository.open(repo_path), "app").attach(where)
        # As mount.composefs or a hand-made mount names its layers: by the paths
        # given, here the symlinked one (which mountinfo shows as it is).
        with FsContext("erofs") as fs:
            fs.set_string("source", str(env.repo.image_path(digest)))
            fs.create()
            fd = fs.mount(MOUNT_ATTR_RDONLY)
        try:
            move_mount(fd, erofs)
        finally:
            os.close(fd)
        with FsContext("overlay") as ov:
            ov.set_string("source", f"composefs:{digest}")
            ov.set_string("metacopy", "on")
            ov.set_string("redirect_dir", "on")
            ov.set_string("lowerdir", f"{erofs}::{link}/objects")
            ov.create()
            fd = ov.mount(MOUNT_ATTR_RDONLY)
        try:
            move_mount(fd, by_path)
        finally:
            os.close(fd)
        shown = {m.mountpoint: m.datadirs for m in list_composefs_mounts()}
        assert shown[str(by_bind)] == (f"{bind}/objects",)
        assert shown[str(by_path)] == (f"{link}/objects",)
        assert _hashes(by_path) == _hashes(env.src)

        listed = env.call("ListMounts", None)["mounts"]
        assert sorted(m["where"] for m in listed) == sorted(map(str, (by_link, by_bind, by_path)))
        e = env.error("RemoveImage", "app")
        assert sorted(e.parameters["where"]) == sorted(map(str, (by_link, by_bind, by_path)))
        for where in (by_link, by_bind):
            env.call("Unmount", str(where), None)
        assert env.error("RemoveImage", "app").parameters["where"] == [str(by_path)]
        env.repo.remove_ref("app")
        assert env.call("GarbageCollect", None)["imagesRemoved"] == 0
        umount2(str(by_path), MNT_DETACH)
        assert env.iface.gc_pins() == set()
    finally:
        for path in (by_path, erofs, bind):
            with contextlib.suppress(OSError):
                umount2(str(path), MNT_DETACH)


def test_which_mounts_are_a_repositorys(env: Env) -> None:
    digest = env.create()
    objects = ObjectsDirectory.of(env.repo)
    other = Repository.init(env.tmp / "other")
    absent = "e" * 64

    def mount(*datadirs: str, digest: str | None = digest) -> ComposefsMount:
        return ComposefsMount(1, "/x", "composefs", "", digest, True, "off", datadirs)

    def ours(m: ComposefsMount, *, root: str = "", repo: Repository = env.repo) -> bool:
        return is_repository_mount(repo, m, root=root)

    real = str(env.repo.objects_dir)
    assert ours(mount(real)) and not ours(mount(real), repo=other)
    assert ours(mount(str(other.objects_dir), real))
    assert not ours(mount(str(other.objects_dir)))
    assert not ours(mount(real, digest=None)) and not ours(mount(real, digest=digest[:40]))
    # Looked up where the mount's namespace has its root; by the text where that fails.
    assert ours(mount(real), root="/proc/self/root")
    assert ours(mount(real + "/"), root=str(env.tmp / "nowhere"))
    assert not ours(mount(str(env.tmp / "gone" / "objects")))
    assert not ours(mount(real + " (deleted)"))
    # Layers mountinfo cannot place: counted when the repository has the image.
    for unplaced in ("/proc/self/fd/7", "/proc/1234/fd/3", "/proc", "objects", ""):
        assert ours(mount(unplaced)), unplaced
        assert not ours(mount(unplaced, digest=absent)), unplaced
        assert not ours(mount(unplaced), repo=other), unplaced
        # Beside another repository's objects it may still be ours.
        assert ours(mount(unplaced, str(other.objects_dir))), unplaced
    assert ours(mount()) and not ours(mount(), repo=other)
    # An objects directory is the same by inode, else by path.
    assert objects.same(ObjectsDirectory("/elsewhere", objects.dev, objects.ino))
    assert not objects.same(ObjectsDirectory(objects.path, objects.dev, -1))
    assert objects.same(ObjectsDirectory(objects.path))
    assert not objects.same(ObjectsDirectory("/elsewhere"))
    # One that could not be looked up (gone meanwhile) is known by its path only.
    unlooked = ObjectsDirectory(objects.path)
    assert unlooked.is_layer(real) and unlooked.is_layer(real + "/.")
    assert unlooked.is_layer(str(other.objects_dir)) is False
    assert unlooked.is_layer("/proc/self/fd/3") is None


def test_pins_name_their_repository(env: Env) -> None:
    digest = env.create()
    other, other_iface = _same_image_elsewhere(env, "other")
    other.create_image(env.src, ref="app")
    ctx = env.ctx("Mount")
    other_iface.Mount(*_mount_args("app", None), _request=ctx)
    os.close(ctx.out_fds.pop())  # within the grace period: live all the same
    (pin,) = env.tracker.live_pins()
    assert pin.objects == ObjectsDirectory.of(other)
    assert env.tracker.in_use(env.repo) == {}
    assert list(env.tracker.in_use(other)) == [digest]
    # A pin that does not name its repository (an older daemon's, or damaged) is
    # honoured for every repository.
    doc = json.loads(pin.path.read_text())
    bads: list[object] = [None, "x", {"path": 5}, {"path": "relative", "dev": 1, "ino": 2}, []]
    for bad in bads:
        pin.path.write_text(json.dumps({**doc, "objects": bad}))
        assert list(env.tracker.in_use(env.repo)) == [digest], bad
    del doc["objects"]
    pin.path.write_text(json.dumps(doc))
    assert list(env.tracker.in_use(env.repo)) == [digest]
    # One that names its path only is told apart by the path.
    pin.path.write_text(json.dumps({**doc, "objects": {"path": str(other.objects_dir)}}))
    assert env.tracker.in_use(env.repo) == {}
    assert list(env.tracker.in_use(other)) == [digest]


def test_gc_busy_and_corrupt(env: Env) -> None:
    digest = env.create()
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(env.repo.path)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        "fcntl.flock(fd, fcntl.LOCK_SH)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        env.iface.gc_timeout = 0.3
        e = env.error("GarbageCollect", None)
        assert _name(e) == "RepositoryBusy" and e.parameters["message"]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    image = env.repo.object_path(digest)
    image.chmod(0o644)
    image.write_bytes(b"garbage" * 100)
    e = env.error("GarbageCollect", None)
    assert _name(e) == "RepositoryCorrupt" and "does not parse" in e.parameters["message"]
    assert _name(env.error("Mount", *_mount_args("app", env.mnt))) in (
        "ImageVerityFailed",
        "MountFailed",
    )


def test_gc_waits_for_mounts_in_flight(env: Env) -> None:
    """GC and a mount in progress exclude each other: the mount is pinned or attached
    before GC decides what is in use."""
    env.create()
    inside = threading.Event()
    release = threading.Event()
    real = env.tracker.pin_detached

    def slow_pin(*args: Any, **kw: Any) -> Any:
        inside.set()
        release.wait(10)
        return real(*args, **kw)

    env.tracker.pin_detached = slow_pin  # type: ignore[method-assign]
    ctx = env.ctx("Mount")
    mounter = threading.Thread(
        target=lambda: env.iface.Mount(*_mount_args("app", None), _request=ctx)
    )
    mounter.start()
    assert inside.wait(10)
    env.repo.remove_ref("app")
    result: list[dict[str, Any]] = []
    gc = threading.Thread(target=lambda: result.append(env.call("GarbageCollect", None)))
    gc.start()
    time.sleep(0.3)
    assert result == []  # waiting for the mount
    release.set()
    mounter.join(10)
    gc.join(10)
    assert result[0]["imagesRemoved"] == 0
    os.close(ctx.out_fds.pop())


# -- pins -----------------------------------------------------------------------------------


def test_pins_survive_restart_and_expire(env: Env) -> None:
    digest = env.create()
    ctx = env.ctx("Mount")
    env.call("Mount", *_mount_args("app", None), ctx=ctx)
    fd = ctx.out_fds.pop()
    fresh = MountTracker(env.tmp / "run", grace=0)
    (pin,) = fresh.live_pins()
    assert pin.digest == digest and pin.peer_pid == os.getpid()
    # Attached and the fd closed: alive through mountinfo.
    move_mount(fd, env.mnt)
    os.close(fd)
    assert [p.digest for p in fresh.live_pins()] == [digest]
    umount2(str(env.mnt))
    assert fresh.live_pins() == []
    assert not (env.tmp / "run" / "pins" / digest).exists()
    # Within the grace period a pin lives whatever the scan says; another boot's never.
    env.call("Mount", *_mount_args("app", None), ctx=(ctx := env.ctx("Mount")))
    os.close(ctx.out_fds.pop())
    assert len(MountTracker(env.tmp / "run").live_pins()) == 1
    (path,) = (env.tmp / "run" / "pins" / digest).iterdir()
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "bootId": "another"}))
    assert MountTracker(env.tmp / "run").live_pins() == []
    # Unreadable pin files are honoured by their names until the mount id is gone.
    (env.tmp / "run" / "pins" / digest).mkdir()
    junk = env.tmp / "run" / "pins" / digest / f"999999-{time.time_ns()}"
    junk.write_text("not json")
    assert len(MountTracker(env.tmp / "run").live_pins()) == 1
    assert MountTracker(env.tmp / "run", grace=0).live_pins() == []


def test_a_reused_mount_id_does_not_keep_a_pin(env: Env) -> None:
    """The kernel gives a freed mnt_id to the next mount made, anywhere on the
    system: an fd on that later mount, whose fdinfo shows the pin's id, must not keep
    the dead pin alive (it did, and GC then kept the image). A /proc of the test's
    making stands for the process holding that fd: fdinfo with the pin's id, and the
    fd a link to the pinned mount, then to a file on another mount."""
    env.create()
    env.call("Mount", *_mount_args("app", None), ctx=(ctx := env.ctx("Mount")))
    fd = ctx.out_fds.pop()
    (pin,) = MountTracker(env.tmp / "run", grace=0).live_pins()
    assert pin.mount_id_unique is not None
    proc = env.tmp / "proc"
    (proc / "4242" / "fdinfo").mkdir(parents=True)
    (proc / "4242" / "fd").mkdir()
    (proc / "4242" / "fdinfo" / "7").write_text(
        f"pos:\t0\nflags:\t010000000\nmnt_id:\t{pin.mount_id}\n"
    )
    link = proc / "4242" / "fd" / "7"

    def live() -> list[Path]:
        return [p.path for p in MountTracker(env.tmp / "run", grace=0, proc=str(proc)).live_pins()]

    try:
        link.symlink_to(f"/proc/{os.getpid()}/fd/{fd}")
        assert live() == [pin.path]  # the pinned mount itself
    finally:
        os.close(fd)
    link.unlink()
    link.symlink_to("/")
    assert live() == [] and not pin.path.exists()  # a later mount with the same mnt_id


# -- error mapping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "name", "params"),
    [
        (ImageNotFoundError("x"), "NoSuchImage", {"image": "img"}),
        (InvalidNameError("bad"), "InvalidName", {"name": "img", "message": "bad"}),
        (VerityRequiredError("no verity"), "VerityUnsupported", {"message": "no verity"}),
        (SourceError("gone"), "SourceError", {"message": "gone", "path": "/src"}),
        (ReadOnlyRepositoryError("ro"), "ReadOnlyRepository", {"message": "ro"}),
        (RepositoryBusyError("busy"), "RepositoryBusy", {"message": "busy"}),
        (CorruptRepositoryError("meta"), "RepositoryCorrupt", {"message": "meta"}),
        (NotARepositoryError("gone"), "RepositoryCorrupt", {"message": "gone"}),
        (
            CorruptObjectError("image x is empty"),
            "RepositoryCorrupt",
            {"message": "image x is empty"},
        ),
        (
            RepositoryError("cannot list", errno=errno.EIO),
            "SystemError",
            {"message": "cannot list", "errnoName": "EIO"},
        ),
        (UnsupportedRepositoryError("newer"), "SystemError", {"message": "newer"}),
        (
            PermissionError(errno.EACCES, "Permission denied", "/x"),
            "SystemError",
            {"message": "/x: Permission denied", "errnoName": "EACCES"},
        ),
    ],
)
def test_reply_error(exc: Exception, name: str, params: dict[str, Any]) -> None:
    mapped = reply_error(exc, image="img", source_path="/src")
    assert mapped is not None
    assert (mapped.name, mapped.parameters) == (f"{INTERFACE}.{name}", params)
    check_error(mapped)
    assert reply_error(ValueError("x")) is None


# -- through varlink.Service: fields arrive in IDL order ------------------------------------


def test_dispatch_through_service(env: Env) -> None:
    service = varlink.Service(interface_dir=str(IDL_PATH.parent))
    service._set_interface(INTERFACE, env.iface)

    def call(method: str, params: dict[str, Any], **flags: Any) -> list[dict[str, Any]]:
        ctx = env.ctx(method, more=bool(flags.get("more")))
        message = json.dumps({"method": f"{INTERFACE}.{method}", "parameters": params, **flags})
        replies = [json.loads(r) for r in service.handle(message.encode(), _request=ctx)]
        ctx.close_fds()
        return [*({"parameters": r} for r in env.replies), *replies]

    # Another composefs mount, of another repository, mounted first: "all" lists it
    # too (as it lists whatever else the machine has mounted), and ours is found by
    # where it is.
    other = Repository.init(env.tmp / "other-repo")
    other.create_image(_tree(env.tmp / "other-src", seed=7), ref="x")
    (env.tmp / "other-mnt").mkdir()
    with mount_repository_image(other, "x") as m:
        m.attach(env.tmp / "other-mnt")
    (r,) = call("CreateImage", {"sourcePath": str(env.src), "ref": "app", "useEpoch": True})
    digest = r["parameters"]["digest"]
    assert call("ListImages", {"image": "app"})[0]["parameters"]["images"][0]["refs"] == ["app"]
    out = call("Mount", {"image": "app", "where": str(env.mnt), "verity": "disabled"})
    assert out[0]["parameters"]["imageCheck"] == "userspace"  # expected digest still checked
    every = call("ListMounts", {"all": True})[0]["parameters"]["mounts"]
    ours = [m for m in every if m["where"] == str(env.mnt)]
    assert [(m["digest"], m["inRepository"]) for m in ours] == [(digest, True)]
    foreign = [m for m in every if m["where"] == str(env.tmp / "other-mnt")]
    assert [m["inRepository"] for m in foreign] == [False]
    assert call("Unmount", {"where": str(env.mnt), "lazy": False})[0]["parameters"] == {
        "digest": digest
    }
    replies = call("Verify", {}, more=True)
    assert replies[-1]["parameters"]["digest"] == digest
    assert call("GarbageCollect", {"dryRun": True})[0]["parameters"]["dryRun"] is True
    assert call("Describe", {})[0]["parameters"]["images"] == 1
    assert call("RemoveImage", {"image": "app"})[0]["parameters"] == {"removedRefs": ["app"]}


_LIVE_PINS = """
import json, sys
from composefsd.service.mounts import MountTracker
tracker = MountTracker(sys.argv[1], grace=0)
print(json.dumps(sorted(p.mount_id for p in tracker.live_pins())))
print(json.dumps([[m.namespace, m.mount.mountpoint] for m in tracker.all_mounts()]))
"""


def test_pins_without_cap_sys_ptrace(env: Env) -> None:
    """Without CAP_SYS_PTRACE the fds of fully privileged processes are hidden: a pin
    stays while the process it was handed to is hidden and alive, and mounts in
    other namespaces are still found (mountinfo needs no ptrace access)."""
    digest = env.create()
    with mount_repository_image(env.repo, "app") as mount:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            pass_fds=(mount.fd,),
        )
        held = env.tracker.pin_detached(digest, mount.fd, peer_pid=holder.pid, peer_uid=0)
        lost = env.tracker.pin_detached(digest, mount.fd, peer_pid=2**22 + 1, peer_uid=0)
        assert held.mount_id == lost.mount_id
    other_ns = _mount_in_other_namespace(env)
    no_ptrace = ["setpriv", "--bounding-set", "-sys_ptrace"]
    try:
        out = subprocess.run(
            [*no_ptrace, sys.executable, "-c", _LIVE_PINS, str(env.tmp / "run")],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")},
        ).stdout.splitlines()
        assert json.loads(out[0]) == [held.mount_id]
        namespaces = {mountpoint: ns for ns, mountpoint in json.loads(out[1])}
        assert namespaces[str(env.mnt)].startswith("of pid ")
        assert not lost.path.exists() and held.path.exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
        assert other_ns.stdin is not None
        other_ns.stdin.close()
        other_ns.wait(10)
    # With the holder gone, a fully privileged tracker drops the pin too.
    assert MountTracker(env.tmp / "run", grace=0).live_pins() == []


def test_namespaces_whose_link_cannot_be_read_are_told_apart_by_mount_ids(env: Env) -> None:
    """Where /proc/PID/ns/mnt cannot be read (a process we may not ptrace), its
    mountinfo, read a moment after ours and with mounts come and gone meanwhile, is
    still our namespace: it was counted twice, and named our mount twice."""
    digest = "a" * 64

    def line(mount_id: int, where: str, source: str = "tmpfs") -> str:
        if source == "tmpfs":
            return f"{mount_id} 1 0:{mount_id} / {where} rw - tmpfs tmpfs rw"
        return (
            f"{mount_id} 1 0:{mount_id} / {where} ro - overlay {source} "
            f"ro,lowerdir+=/l,datadir+={env.repo.objects_dir}"
        )

    common = [line(i, f"/m{i}") for i in range(20, 30)]
    ours = [*common, line(40, "/x", f"composefs:{digest}")]
    proc = env.tmp / "proc"
    for pid, lines in (
        ("self", ours),
        # Our namespace again, read later: one mount gone, two new.
        ("1", [*common[1:], line(40, "/x", f"composefs:{digest}"), line(41, "/y"), line(42, "/z")]),
        # Another namespace: a copy of ours, every mount with an id of its own.
        (
            "7",
            [line(100 + i, f"/m{i}") for i in range(10)] + [line(140, "/x", f"composefs:{digest}")],
        ),
    ):
        (proc / pid / "ns").mkdir(parents=True)
        (proc / pid / "ns" / "mnt").write_text("")  # not a link: cannot be read as one
        (proc / pid / "mountinfo").write_text("\n".join(lines) + "\n")
    found = MountTracker(env.tmp / "run", proc=str(proc)).all_mounts()
    assert [(m.mount.mount_id, m.namespace, m.own, m.root) for m in found] == [
        (40, "of pid self", True, ""),
        (140, "of pid 7", False, f"{proc}/7/root"),
    ]
    # A third namespace seen through a process whose link can be read and one whose
    # link cannot, in whichever order /proc lists them: once.
    third = [line(200 + i, f"/m{i}") for i in range(10)]
    for pid, lines in (
        ("3", [*third, line(240, "/x", f"composefs:{digest}")]),
        ("8", [*third[2:], line(240, "/x", f"composefs:{digest}"), line(241, "/w")]),
    ):
        (proc / pid).mkdir()
        (proc / pid / "mountinfo").write_text("\n".join(lines) + "\n")
    (proc / "3" / "ns").mkdir()
    (proc / "3" / "ns" / "mnt").write_text("")
    (proc / "8" / "ns").mkdir()
    (proc / "8" / "ns" / "mnt").symlink_to("mnt:[4026532999]")
    found = MountTracker(env.tmp / "run", proc=str(proc)).all_mounts()
    assert sorted(m.mount.mount_id for m in found) == [40, 140, 240]
