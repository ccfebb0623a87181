"""Real fs-verity end to end (issue 6): the Required, Try and Disabled paths on a kernel
that has fs-verity, with every file on a filesystem that supports it.

This machine's kernel usually has no fs-verity: the module is then skipped, and
``./run-tests`` runs it in a throw-away VM with Debian's 6.12 kernel through
``tests/vm/verity.sh`` (``../shared/tools/verity-vm``; the README's "Testing").
Where fs-verity works, everything lives below ``$VERITY_SCRATCH`` (the VM's ext4
made with ``-O verity``), else below the temporary directory if that filesystem
can do it. ``COMPOSEFSD_REQUIRE_VERITY=1`` turns the skip into a failure (the VM
script sets it, so that CI cannot pass by skipping).

Covered:

* objects: CreateImage under Required enables fs-verity on every object, the
  image and meta.json; the kernel's digest of each equals ours (userspace) and C
  ``composefs-info measure-file``'s;
* mounts under Required: ``verity=require``, the image measured by the kernel and
  compared; an image without fs-verity, a wrong expected digest and a swapped
  image file are refused with C's texts; an object replaced by other content with
  fs-verity of its own, or by the same content without fs-verity, reads as EIO
  through the mount and Verify names it; a clean image reads back file by file;
* Try acts as Required here and says so; Disabled uses no fs-verity at all;
* the service: CreateImage, Mount (Required, expectedDigest, where) and Verify of a
  tampered object through ``varlinkctl`` 257;
* the C tools: C ``mount.composefs -o digest=,verity`` mounts our repository's
  images, and C ``mkcomposefs --digest-store`` stores mount with ours (``mount_image``
  and our ``mount.composefs``);
* an idmapped mount under Required;
* bootc's repository (test_bootc_repository) made secure as composefs-rs makes it:
  Describe says required, Verify measures every digest in the kernel, each
  deployment mounts with ``verity=require`` and reads as cfsctl dumped it,
  RemoveImage and GC leave what composefs-rs needs, with its fs-verity.

The VM runs code many times slower than the host (verity-vm says 40-50x; a Python
start costs seconds), so trees are small and nearly everything runs in-process;
only the daemon, C tools and varlinkctl are processes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import treecompare
from composefsd.cli import mountcomposefs
from composefsd.fsverity import c_compat_digest_bytes, digest_bytes, digest_fd
from composefsd.kernel.mount import (
    NO_VERITY,
    WRONG_VERITY,
    DetachedMount,
    ImageVerityError,
    MountOptions,
    list_mounts,
    mount_image,
    unmount,
)
from composefsd.kernel.repomount import mount_repository_image
from composefsd.kernel.verity import (
    VerityError,
    VerityNotEnabledError,
    enable_verity,
    measure_verity,
)
from composefsd.repository import CreateOptions, Repository, VerityPolicy, oci
from composefsd.service.client import Connection, VarlinkCallError, connect
from rsgolden import (
    BOOTC_AFTER_GC,
    bootc_deployments,
    bootc_listing,
    bootc_repository,
    check_tree,
    expected_listing,
    listing,
    settled_listing,
)
from servicehelpers import Daemon, start_daemon
from test_mount import (
    SHIFT,
    _all_xattrs,
    _assert_same_tree,
    _entry_at,
    _idmapped_view,
    _mkcomposefs,
    _unmount_below,
    _whiteout_view,
)
from trees import app_tree

SCRATCH_ENV = "VERITY_SCRATCH"
REQUIRE_ENV = "COMPOSEFSD_REQUIRE_VERITY"
IFACE = "io.composefs.Repository"
# The daemon's start in the VM imports asyncio and the package at many times the
# host's cost.
DAEMON_START_TIMEOUT = 300.0


def _probe(directory: str) -> str | None:
    """None if fs-verity can be enabled on a file in ``directory``, else why not."""
    try:
        fd, path = tempfile.mkstemp(prefix=".verity-probe-", dir=directory)
    except OSError as e:
        return f"{directory}: {e.strerror}"
    try:
        os.write(fd, b"probe")
        os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            enable_verity(fd, path=path)
            measure_verity(fd, path=path)
        finally:
            os.close(fd)
    except VerityError as e:
        return f"{e.strerror} on {directory}"
    finally:
        os.unlink(path)
    return None


def _find_scratch() -> tuple[Path | None, str]:
    """The directory to work in, or None and why fs-verity is not available."""
    env = os.environ.get(SCRATCH_ENV)
    candidates = [env] if env else [tempfile.gettempdir(), "/var/tmp"]
    reasons = []
    for directory in candidates:
        why = _probe(directory)
        if why is None:
            return Path(directory), ""
        reasons.append(why)
    return None, "; ".join(reasons)


SCRATCH, SCRATCH_WHY = _find_scratch()


@pytest.fixture(scope="module", autouse=True)
def _verity_available() -> None:
    if SCRATCH is not None and os.geteuid() == 0:
        return
    why = SCRATCH_WHY if SCRATCH is None else "these tests mount, which needs root"
    message = (
        f"fs-verity is not available here ({why}); ./run-tests runs this module in a "
        "VM with an fs-verity kernel (tests/vm/verity.sh)"
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _scratch_dir(prefix: str) -> Path:
    assert SCRATCH is not None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH))


def _remove(path: Path) -> None:
    _unmount_below(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def work() -> Iterator[Path]:
    """A fresh directory on the verity filesystem; whatever is mounted below it is
    unmounted afterwards."""
    path = _scratch_dir("t-")
    try:
        yield path
    finally:
        _remove(path)


def _attach(dm: DetachedMount, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    with dm:
        dm.attach(where)
    return where


def _super_options(mnt: Path) -> tuple[str, ...]:
    return _entry_at(mnt).super_options


def _verity_option(mnt: Path) -> str | None:
    found = [o for o in _super_options(mnt) if o.startswith("verity=")]
    return found[0].split("=", 1)[1] if found else None


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_errno(path: Path) -> int | None:
    """The errno reading ``path`` fails with (open or read), None if it reads."""
    try:
        _read(path)
    except OSError as e:
        return e.errno
    return None


def _kernel_digest(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return measure_verity(fd).hex()
    finally:
        os.close(fd)


def _has_verity(path: Path, algorithm: str = "sha256") -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        measure_verity(fd, algorithm)
    except VerityNotEnabledError:
        return False
    finally:
        os.close(fd)
    return True


def _enable(path: Path, algorithm: str = "sha256") -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        enable_verity(fd, algorithm, path=path)
    finally:
        os.close(fd)


def _object_files(store: Path) -> list[Path]:
    """Every object file of a store (``XX/rest``)."""
    return sorted(p for p in store.glob("??/*") if p.is_file() and not p.is_symlink())


def _replace_object(path: Path, data: bytes, *, verity: bool) -> None:
    """Swap the object file at ``path`` for a new file holding ``data``, with or without
    fs-verity of its own (rename over it, as an attacker with write access would)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    if verity:
        _enable(tmp)
    os.rename(tmp, path)


# -- the repository, the tree and C's store ---------------------------------------------------


@dataclass
class App:
    src: Path
    repo: Repository
    digest: str
    other_digest: str
    #: The regular files stored as objects: tree path -> object digest.
    objects: dict[str, str]


def _make_tree(src: Path) -> None:
    """test_mount's tree with one of everything, plus files on the fs-verity block and
    Merkle-level boundaries (4096 bytes; past 128 blocks, where a second tree level starts)."""
    app_tree(src)
    rng = random.Random(6)
    (src / "block").write_bytes(rng.randbytes(4096))
    (src / "sub" / "two-levels").write_bytes(rng.randbytes(128 * 4096 + 1))


def _external(src: Path) -> dict[str, str]:
    """Tree path -> fs-verity digest of each regular file larger than an inline file."""
    out = {}
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.stat().st_size > 64:
            out[str(path.relative_to(src))] = digest_bytes(path.read_bytes()).hex()
    return out


def _build_app(base: Path) -> App:
    src = base / "src"
    _make_tree(src)
    repo = Repository.init(base / "repo", verity=VerityPolicy.REQUIRED)
    assert repo.verity is VerityPolicy.REQUIRED
    result = repo.create_image(src, ref="app", options=CreateOptions(preserve_hardlinks=True))
    assert result.verity_enabled
    other_src = base / "other"
    other_src.mkdir()
    (other_src / "other-file").write_bytes(b"another image" * 100)
    other = repo.create_image(other_src, ref="other")
    return App(
        src=src, repo=repo, digest=result.digest, other_digest=other.digest, objects=_external(src)
    )


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    """A Required repository with the tree as "app" and a second image "other";
    shared, so no test may damage it (those that do build their own)."""
    base = _scratch_dir("app-")
    try:
        yield _build_app(base)
    finally:
        _remove(base)


def _expected(app: App) -> dict[bytes, treecompare.Entry]:
    return _whiteout_view(treecompare.snapshot(app.src, _all_xattrs))


def _same_tree(app: App, mnt: Path) -> None:
    _assert_same_tree(_expected(app), treecompare.snapshot(mnt, _all_xattrs))


# -- objects -------------------------------------------------------------------------------------


def _c_measure(reference_bin: Path, paths: list[Path]) -> list[str]:
    out = subprocess.run(
        [str(reference_bin / "composefs-info"), "measure-file", *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len(out) == len(paths), out
    return out


def test_create_image_enables_verity_on_every_object_and_the_image(
    app: App, reference_bin: Path, work: Path
) -> None:
    repo = app.repo
    files = _object_files(repo.objects_dir)
    names = {p.parent.name + p.name for p in files}
    # Every file of the tree larger than an inline one, both images and the other
    # image's file are the objects.
    other_file = digest_bytes(b"another image" * 100).hex()
    assert names == set(app.objects.values()) | {app.digest, app.other_digest, other_file}
    assert repo.image_path(app.digest).resolve() == repo.object_path(app.digest)

    c_digests = _c_measure(reference_bin, files)
    for path, c_digest in zip(files, c_digests, strict=True):
        name = path.parent.name + path.name
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            kernel = measure_verity(fd).hex()  # raises if the object has no fs-verity
            ours = digest_fd(fd).hex()
        finally:
            os.close(fd)
        assert kernel == ours == c_digest == name, path
    # meta.json too: under Required the repository marks itself with fs-verity.
    _kernel_digest(repo.path / "meta.json")

    # The empty file, where C's userspace digest differs from the kernel's: the
    # kernel's is ours, and C measure-file asks the kernel first.
    empty = work / "empty"
    empty.write_bytes(b"")
    _enable(empty)
    assert _kernel_digest(empty) == digest_bytes(b"").hex() != c_compat_digest_bytes(b"").hex()
    assert _c_measure(reference_bin, [empty]) == [digest_bytes(b"").hex()]


# -- mounts under Required ------------------------------------------------------------------------


def test_required_mount_is_checked_by_the_kernel(app: App, work: Path) -> None:
    dm = mount_repository_image(app.repo, "app", verity=VerityPolicy.REQUIRED)
    assert (dm.image_check, dm.image_digest, dm.object_verity) == ("kernel", app.digest, True)
    assert dm.source == f"composefs:{app.digest}" and dm.notes == []
    mnt = _attach(dm, work / "repo-mount")
    assert _verity_option(mnt) == "require"
    [listed] = [m for m in list_mounts() if m.mountpoint == str(mnt)]
    assert listed.verity == "require" and listed.digest == app.digest
    _same_tree(app, mnt)

    # The image file mounted as such, with its digest expected.
    dm = mount_image(
        app.repo.image_path(app.digest),
        MountOptions(
            basedirs=[app.repo.objects_dir],
            verity=VerityPolicy.REQUIRED,
            expected_digest=app.digest.upper(),
        ),
    )
    assert (dm.image_check, dm.image_digest, dm.object_verity) == ("kernel", app.digest, True)
    mnt = _attach(dm, work / "file-mount")
    assert _verity_option(mnt) == "require"
    assert _read(mnt / "sub" / "two-levels") == _read(app.src / "sub" / "two-levels")
    unmount(mnt)
    unmount(work / "repo-mount")


def test_required_refuses_an_image_without_verity(app: App, work: Path) -> None:
    copy = work / "copy.img"
    shutil.copyfile(app.repo.image_path(app.digest), copy)
    assert not _has_verity(copy)
    with pytest.raises(ImageVerityError) as info:
        mount_image(
            copy,
            MountOptions(
                basedirs=[app.repo.objects_dir],
                verity=VerityPolicy.REQUIRED,
                expected_digest=app.digest,
            ),
        )
    assert info.value.reason == NO_VERITY and info.value.errno == errno.ENOTTY
    assert str(info.value).startswith(f"{NO_VERITY}: {copy}")
    # With fs-verity enabled on the copy, the same file mounts.
    _enable(copy)
    dm = mount_image(
        copy,
        MountOptions(
            basedirs=[app.repo.objects_dir],
            verity=VerityPolicy.REQUIRED,
            expected_digest=app.digest,
        ),
    )
    assert dm.image_check == "kernel"
    mnt = _attach(dm, work / "mnt")
    assert _read(mnt / "big") == _read(app.src / "big")


def test_required_refuses_a_wrong_expected_digest(app: App, work: Path) -> None:
    image = app.repo.image_path(app.digest)
    with pytest.raises(ImageVerityError) as info:
        mount_image(
            image,
            MountOptions(
                basedirs=[app.repo.objects_dir],
                verity=VerityPolicy.REQUIRED,
                expected_digest=app.other_digest,
            ),
        )
    err = info.value
    assert err.reason == WRONG_VERITY and err.errno == errno.EILSEQ
    # The digest in the message is the kernel's measurement of the image.
    assert f"measures {app.digest}, expected {app.other_digest}" in str(err)
    with pytest.raises(ImageVerityError) as info:
        mount_repository_image(
            app.repo, "app", verity=VerityPolicy.REQUIRED, expected_digest=app.other_digest
        )
    assert info.value.reason == WRONG_VERITY


def test_swapped_image_file_is_refused(work: Path) -> None:
    """images/<a> leading to another image's bytes, with fs-verity of their own: the
    kernel measures the other digest, and the mount is refused under Required and Try."""
    src = work / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x" * 1000)
    repo = Repository.init(work / "repo", verity=VerityPolicy.REQUIRED)
    a = repo.create_image(src, ref="a").digest
    (src / "d" / "g").write_bytes(b"y" * 1000)
    b = repo.create_image(src, ref="b").digest
    _replace_object(repo.object_path(a), _read(repo.object_path(b)), verity=True)
    for policy in (VerityPolicy.REQUIRED, VerityPolicy.TRY):
        with pytest.raises(ImageVerityError) as info:
            mount_repository_image(repo, "a", verity=policy)
        assert info.value.reason == WRONG_VERITY, policy
        assert f"{b}, expected {a}" in str(info.value), policy


@dataclass
class Tampered:
    app: App
    #: The object swapped for other content of the same size, with its own fs-verity.
    swapped: str
    swapped_path: str
    swapped_data: bytes


@pytest.fixture(scope="module")
def tampered() -> Iterator[Tampered]:
    """A repository of its own whose object of "hello" (and its hardlink) was swapped
    for other bytes of the same size, given fs-verity of their own."""
    base = _scratch_dir("tampered-")
    try:
        app = _build_app(base)
        path = "hello"
        digest = app.objects[path]
        data = bytes(b ^ 0xFF for b in _read(app.src / path))
        _replace_object(app.repo.object_path(digest), data, verity=True)
        assert _kernel_digest(app.repo.object_path(digest)) == digest_bytes(data).hex()
        yield Tampered(app, digest, path, data)
    finally:
        _remove(base)


def test_swapped_object_reads_as_eio_under_required(tampered: Tampered, work: Path) -> None:
    app = tampered.app
    dm = mount_repository_image(app.repo, "app", verity=VerityPolicy.REQUIRED)
    # The image itself is intact: the mount is made, and overlayfs checks each
    # object's fs-verity digest against the image's as it is opened.
    assert (dm.image_check, dm.object_verity) == ("kernel", True)
    mnt = _attach(dm, work / "mnt")
    assert _read_errno(mnt / tampered.swapped_path) == errno.EIO
    assert _read_errno(mnt / "hello-hard") == errno.EIO  # the same object
    for path in ("big", "block", "sub/deep", "sub/two-levels", "inline"):
        assert _read(mnt / path) == _read(app.src / path), path
    # Metadata comes from the image alone.
    assert os.stat(mnt / tampered.swapped_path).st_size == len(tampered.swapped_data)


def test_verify_names_the_swapped_object(tampered: Tampered) -> None:
    app = tampered.app
    report = app.repo.verify_image("app")
    assert not report.ok
    assert report.image_problems == [] and report.missing == [] and report.no_verity == []
    assert report.corrupt == [
        (tampered.swapped, f"digest mismatch: {digest_bytes(tampered.swapped_data).hex()}")
    ]
    # Every digest, the swapped object's too, was the kernel's measurement.
    assert report.verity_measured == report.objects_checked


def test_try_checks_objects_like_required(tampered: Tampered, work: Path) -> None:
    """Try, on a kernel and filesystem with fs-verity, sets verity=require as Required
    does, and says so: the swapped object reads as EIO."""
    app = tampered.app
    dm = mount_repository_image(app.repo, "app", verity=VerityPolicy.TRY)
    assert (dm.image_check, dm.image_digest, dm.object_verity) == ("kernel", app.digest, True)
    assert dm.notes == []
    mnt = _attach(dm, work / "mnt")
    assert _verity_option(mnt) == "require"
    assert _read_errno(mnt / tampered.swapped_path) == errno.EIO
    assert _read(mnt / "big") == _read(app.src / "big")


def test_disabled_checks_no_object(tampered: Tampered, work: Path) -> None:
    """Disabled: no verity= option, so the swapped content reads back unchecked (the
    image's own digest is still compared, in userspace)."""
    app = tampered.app
    dm = mount_repository_image(app.repo, "app", verity=VerityPolicy.DISABLED)
    assert (dm.image_check, dm.image_digest, dm.object_verity) == (
        "userspace",
        app.digest,
        False,
    )
    mnt = _attach(dm, work / "mnt")
    assert _verity_option(mnt) is None
    assert _read(mnt / tampered.swapped_path) == tampered.swapped_data


def test_object_without_verity_reads_as_eio_under_required(work: Path) -> None:
    """An object swapped for its own content without fs-verity: no digest mismatch, but
    overlayfs finds no fs-verity digest to compare (EIO) and Verify lists it."""
    src = work / "src"
    src.mkdir()
    (src / "plain").write_bytes(b"p" * 5000)
    (src / "kept").write_bytes(b"k" * 5000)
    repo = Repository.init(work / "repo", verity=VerityPolicy.REQUIRED)
    digest = repo.create_image(src, ref="t").digest
    victim = digest_bytes(b"p" * 5000).hex()
    _replace_object(repo.object_path(victim), b"p" * 5000, verity=False)
    assert not _has_verity(repo.object_path(victim))

    mnt = _attach(mount_repository_image(repo, "t", verity=VerityPolicy.REQUIRED), work / "mnt")
    assert _read_errno(mnt / "plain") == errno.EIO
    assert _read(mnt / "kept") == b"k" * 5000
    report = repo.verify_image(digest)
    assert not report.ok
    assert (report.no_verity, report.corrupt, report.missing) == ([victim], [], [])


# -- Try and Disabled on a clean image ----------------------------------------------------------


def test_try_is_required_here(app: App, work: Path) -> None:
    dm = mount_repository_image(app.repo, "app", verity=VerityPolicy.TRY)
    assert (dm.image_check, dm.image_digest, dm.object_verity) == ("kernel", app.digest, True)
    assert dm.notes == []
    mnt = _attach(dm, work / "mnt")
    assert _verity_option(mnt) == "require"
    _same_tree(app, mnt)


def test_disabled_uses_no_verity(app: App, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Disabled must not even ask the kernel: fs-verity measurements fail loudly here.
    import composefsd.kernel.verity as fsverity_mod

    def no_measure(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("Disabled asked the kernel for an fs-verity digest")

    monkeypatch.setattr(fsverity_mod, "measure_verity", no_measure)
    dm = mount_repository_image(app.repo, "app", verity=VerityPolicy.DISABLED)
    assert (dm.image_check, dm.image_digest, dm.object_verity) == (
        "userspace",
        app.digest,
        False,
    )
    mnt = _attach(dm, work / "mnt")
    assert _verity_option(mnt) is None
    _same_tree(app, mnt)
    dm = mount_image(
        app.repo.image_path(app.digest),
        MountOptions(basedirs=[app.repo.objects_dir], verity=VerityPolicy.DISABLED),
    )
    assert (dm.image_check, dm.object_verity) == ("none", False)
    mnt = _attach(dm, work / "nodigest")
    assert _verity_option(mnt) is None
    assert _read(mnt / "sub" / "two-levels") == _read(app.src / "sub" / "two-levels")


# -- idmap ----------------------------------------------------------------------------------------


def test_idmap_with_required_verity(app: App, work: Path) -> None:
    dm = mount_repository_image(app.repo, "app", verity=VerityPolicy.REQUIRED, uid_map=SHIFT)
    assert dm.idmapped
    assert (dm.image_check, dm.object_verity) == ("kernel", True)
    mnt = _attach(dm, work / "mnt")
    assert _verity_option(mnt) == "require"
    expected = _idmapped_view(_expected(app), SHIFT, SHIFT)
    _assert_same_tree(expected, treecompare.snapshot(mnt, _all_xattrs))
    st = os.stat(mnt / "hello")
    assert (st.st_uid, st.st_gid) == (101000, 102000)
    assert _read(mnt / "hello") == _read(app.src / "hello")


# -- the service, through varlinkctl --------------------------------------------------------------


def _varlinkctl(reference_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(reference_bin / "varlinkctl"), *args], capture_output=True, text=True, timeout=600
    )


def _call(reference_bin: Path, daemon: Daemon, method: str, params: dict[str, Any]) -> Any:
    proc = _varlinkctl(
        reference_bin, "call", daemon.address, f"{IFACE}.{method}", json.dumps(params)
    )
    assert proc.returncode == 0, f"{method}: {proc.stderr}{proc.stdout}\n{daemon.log_text()}"
    return json.loads(proc.stdout)


def test_service_mount_and_verify(reference_bin: Path, work: Path) -> None:
    src = work / "src"
    _make_tree(src)
    repo_path = work / "repo"
    Repository.init(repo_path, verity=VerityPolicy.REQUIRED)
    daemon = start_daemon(repo_path, timeout=DAEMON_START_TIMEOUT)
    try:
        created = _call(
            reference_bin, daemon, "CreateImage", {"sourcePath": str(src), "ref": "app"}
        )
        digest = created["digest"]
        assert created["verityEnabled"] is True
        repo = Repository.open(repo_path)
        assert _kernel_digest(repo.image_path(digest)) == digest

        mnt = work / "mnt"
        mnt.mkdir()
        params = {"image": "app", "verity": "required", "expectedDigest": digest, "where": str(mnt)}
        reply = _call(reference_bin, daemon, "Mount", params)
        assert reply["where"] == str(mnt) and reply["digest"] == digest
        assert (reply["imageCheck"], reply["objectVerity"]) == ("kernel", True)
        assert _verity_option(mnt) == "require"
        expected = _whiteout_view(treecompare.snapshot(src, _all_xattrs))
        _assert_same_tree(expected, treecompare.snapshot(mnt, _all_xattrs))
        assert _call(reference_bin, daemon, "Unmount", {"where": str(mnt)}) == {"digest": digest}

        # A wrong expected digest is refused by name, with C's reason.
        wrong = {**params, "expectedDigest": "0" * 64}
        proc = _varlinkctl(
            reference_bin, "call", daemon.address, f"{IFACE}.Mount", json.dumps(wrong)
        )
        assert proc.returncode != 0
        assert f"{IFACE}.ImageVerityFailed" in proc.stderr
        assert json.loads(proc.stdout)["reason"] == WRONG_VERITY

        assert _call(reference_bin, daemon, "Verify", {"image": "app"})["ok"] is True
        victim = digest_bytes(_read(src / "big")).hex()
        data = bytearray(_read(src / "big"))
        data[4096] ^= 1
        _replace_object(repo.object_path(victim), bytes(data), verity=True)
        reply = _call(reference_bin, daemon, "Verify", {"image": "app"})
        assert reply["ok"] is False and reply["digest"] == digest
        assert [(p["kind"], p.get("object")) for p in reply["problems"]] == [
            ("corrupt-object", victim)
        ]
        assert victim in reply["problems"][0]["message"]
        assert reply["verityMeasured"] == reply["objectsChecked"]
        # And the mount made through the service reads the damaged file as EIO.
        reply = _call(reference_bin, daemon, "Mount", params)
        assert reply["objectVerity"] is True
        assert _read_errno(mnt / "big") == errno.EIO
        assert _read(mnt / "block") == _read(src / "block")
        _call(reference_bin, daemon, "Unmount", {"where": str(mnt)})
    finally:
        status = daemon.stop()
    assert status == 0, daemon.log_text()


# -- the C tools ----------------------------------------------------------------------------------


def _c_mount(reference_bin: Path, options: str, image: Path, mnt: Path) -> tuple[int, str]:
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(reference_bin / "mount.composefs"), "-o", options, str(image), str(mnt)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    # (getopt's complaints carry argv[0], the path the reference loader runs)
    return proc.returncode, re.sub(
        r"^\S*/mount\.composefs: ", "mount.composefs: ", proc.stderr, flags=re.M
    )


def _our_mount(
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: str,
    image: Path,
    mnt: Path,
) -> tuple[int, str]:
    """Our mount.composefs, in-process (a process costs seconds in the VM)."""
    mnt.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(sys, "argv", ["mount.composefs"])
    capfd.readouterr()
    status = mountcomposefs.main(["-o", options, str(image), str(mnt)])
    return status, capfd.readouterr().err


def test_c_mount_composefs_mounts_our_repository(app: App, reference_bin: Path, work: Path) -> None:
    objects, image = app.repo.objects_dir, app.repo.image_path(app.digest)
    mnt = work / "mnt"
    status, err = _c_mount(
        reference_bin, f"basedir={objects},digest={app.digest},verity", image, mnt
    )
    assert status == 0, err
    assert _verity_option(mnt) == "require"
    _same_tree(app, mnt)
    unmount(mnt)

    status, err = _c_mount(
        reference_bin, f"basedir={objects},digest={app.other_digest}", image, mnt
    )
    assert status == 1 and f"{WRONG_VERITY}\n" in err, err
    copy = work / "copy.img"
    shutil.copyfile(image, copy)
    status, err = _c_mount(reference_bin, f"basedir={objects},digest={app.digest}", copy, mnt)
    assert status == 1 and f"{NO_VERITY}\n" in err, err


def test_c_made_store_mounts_with_ours(
    app: App,
    reference_bin: Path,
    work: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image, store = work / "c.img", work / "store"
    digest = _mkcomposefs(reference_bin, app.src, store, image)
    objects = _object_files(store)
    assert {p.parent.name + p.name for p in objects} == set(app.objects.values())
    # C 1.0.8 mkcomposefs --digest-store enables fs-verity on every object it writes
    # (on a filesystem that can), but not on the image: that is the caller's job.
    for path in objects:
        assert _kernel_digest(path) == path.parent.name + path.name
    assert not _has_verity(image)
    _enable(image)
    assert _kernel_digest(image) == digest

    dm = mount_image(
        image, MountOptions(basedirs=[store], verity=VerityPolicy.REQUIRED, expected_digest=digest)
    )
    assert (dm.image_check, dm.image_digest, dm.object_verity) == ("kernel", digest, True)
    mnt = _attach(dm, work / "lib")
    assert _verity_option(mnt) == "require"
    _same_tree(app, mnt)

    mnt2 = work / "cli"
    status, err = _our_mount(
        capfd, monkeypatch, f"basedir={store},digest={digest},verity", image, mnt2
    )
    assert (status, err) == (0, "")
    assert _verity_option(mnt2) == "require"
    _same_tree(app, mnt2)

    # Where the image's verity is wrong or missing, our mount.composefs answers as C's
    # does, byte for byte.
    copy = work / "copy.img"
    shutil.copyfile(image, copy)
    for options, img, reason in (
        (f"basedir={store},digest={app.digest}", image, WRONG_VERITY),
        (f"basedir={store},digest={digest}", copy, NO_VERITY),
    ):
        ours = _our_mount(capfd, monkeypatch, options, img, work / "bad")
        assert ours == (1, f"mount.composefs: Failed to mount composefs {img}: {reason}\n\n")
        assert _c_mount(reference_bin, options, img, work / "bad") == ours


# -- bootc's repository, verity-enabled ------------------------------------------------------------


def _bootc_error(conn: Connection, method: str, **params: Any) -> VarlinkCallError:
    with pytest.raises(VarlinkCallError) as info:
        conn.call(f"{IFACE}.{method}", params)
    return info.value


def test_bootc_repository_with_verity(work: Path) -> None:
    """The golden SHA-512 repository as bootc lays it (test_bootc_repository), made
    secure as composefs-rs makes it: fs-verity on every object and on meta.json."""
    repo = bootc_repository(work / "sysroot")
    for path in [*_object_files(repo / "objects"), repo / "meta.json"]:
        _enable(path, "sha512")
    before = listing(repo)
    needed = bootc_listing(expected_listing(BOOTC_AFTER_GC))
    deployed = bootc_deployments(repo)
    oci_before = [
        (t, i.manifest_digest, i.images) for t, i in oci.list_images(Repository.open(repo))
    ]
    daemon = start_daemon(repo, timeout=DAEMON_START_TIMEOUT)
    try:
        with connect(daemon.address, timeout=DAEMON_START_TIMEOUT) as conn:

            def call(method: str, **params: Any) -> dict[str, Any]:
                return dict(conn.call(f"{IFACE}.{method}", params))

            desc = call("Describe")
            assert (desc["algorithm"], desc["verity"], desc["erofsVersion"]) == (
                "sha512",
                "required",
                1,
            )
            for checked in conn.call(f"{IFACE}.Verify", {}, more=True):
                if checked.get("digest"):
                    assert checked["ok"], checked
                    assert checked["verityMeasured"] == checked["objectsChecked"], checked
            mounts = []
            for i, d in enumerate(deployed):
                (one,) = [
                    r
                    for r in conn.call(f"{IFACE}.Verify", {"image": d.digest}, more=True)
                    if r.get("digest")
                ]
                assert (one["ok"], one["verityMeasured"]) == (True, one["objectsChecked"])
                mnt = work / f"mnt{i}"
                mnt.mkdir()
                reply = call("Mount", image=d.digest, verity="required", where=str(mnt))
                assert (reply["imageCheck"], reply["objectVerity"]) == ("kernel", True)
                assert _verity_option(mnt) == "require"
                assert check_tree(mnt, d.dump) > 0
                mounts.append(mnt)

            err = _bootc_error(conn, "RemoveImage", image=deployed[0].digest)
            assert err.name == f"{IFACE}.ImageInUse"
            garbage = [
                line for line in before if line not in needed and line.startswith("f objects/")
            ]
            gc = call("GarbageCollect")
            assert (gc["objectsRemoved"], gc["streamsPruned"]) == (len(garbage), 2)
            assert settled_listing(repo, before) == needed
            for mnt in mounts:
                call("Unmount", where=str(mnt))
            for d in deployed:
                err = _bootc_error(conn, "RemoveImage", image=d.digest)
                assert err.name == f"{IFACE}.ImageReferenced"
            assert call("GarbageCollect")["objectsRemoved"] == 0
    finally:
        status = daemon.stop()
    assert status == 0, daemon.log_text()
    assert settled_listing(repo, before) == needed
    kept = [*_object_files(repo / "objects"), repo / "meta.json"]
    assert all(_has_verity(p, "sha512") for p in kept)
    assert Repository.open(repo).fsck().ok
    assert [
        (t, i.manifest_digest, i.images) for t, i in oci.list_images(Repository.open(repo))
    ] == oci_before


def test_oci_pull_with_verity(work: Path) -> None:
    """io.composefs.Oci.Pull into a repository that requires fs-verity: every object
    it stores (layer files, streams, JSON, the composefs image) has fs-verity, and
    Mount by tag with ``required`` is checked by the kernel; the tree is cfsctl's."""
    from rsgolden import EXPECTED, RS

    repo_path = work / "oci-repo"
    Repository.init(repo_path, algorithm="fsverity-sha512-12", verity=VerityPolicy.REQUIRED)
    layout = RS / "inputs" / "oci" / "layout"
    daemon = start_daemon(repo_path, timeout=DAEMON_START_TIMEOUT)
    try:
        with connect(daemon.address, timeout=DAEMON_START_TIMEOUT) as conn:
            replies = list(
                conn.call(
                    "io.composefs.Oci.Pull",
                    {"reference": f"oci:{layout}:multi", "tag": "multi"},
                    more=True,
                )
            )
            final = dict(replies[-1])
            assert final["imageId"]
            objects = _object_files(repo_path / "objects")
            assert objects
            for path in objects:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    measured = measure_verity(fd, "sha512").hex()
                finally:
                    os.close(fd)
                assert measured == path.parent.name + path.name, path
            mnt = work / "oci-mnt"
            mnt.mkdir()
            reply = dict(
                conn.call(
                    "io.composefs.Oci.Mount",
                    {"image": "multi", "verity": "required", "where": str(mnt)},
                )
            )
            assert (reply["imageCheck"], reply["objectVerity"]) == ("kernel", True)
            assert _verity_option(mnt) == "require"
            dump = EXPECTED / "oci" / "sha512" / "images" / "multi" / "dump.txt"
            assert check_tree(mnt, dump) > 0
            conn.call(f"{IFACE}.Unmount", {"where": str(mnt)})
    finally:
        status = daemon.stop()
    assert status == 0, daemon.log_text()
