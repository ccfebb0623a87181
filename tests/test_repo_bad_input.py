"""Bad input to CreateImage gets a clear error and leaves no damage.

Each case runs ``composefsctl create-image`` on a repository that already holds an
image (ref ``good``), checks the exit status and the one-line error naming the
problem, then checks that fsck calls the repository clean and ``good`` still
verifies. Cases: the source does not exist, is a file, holds a file the caller may
not read; the repository is on a read-only filesystem, or on a full one.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import composefsd.cli.composefsctl as composefsctl
import composefsd.repository.fsck
import composefsd.repository.verify  # noqa: F401 -- loaded before privileges are dropped
from composefsd.repository import Repository, RepositoryError, reader_lock
from composefsd.repository.gc import discard_added
from conftest import TestUsers
from trees import random_tree

CTL = [sys.executable, "-m", "composefsd.cli.composefsctl"]


def _ctl(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, "--repo", str(repo), *args], capture_output=True, text=True, timeout=120
    )


def _tree(root: Path, seed: int, files: int, size: int) -> Path:
    random_tree(root, seed=seed, files=files, sizes=size, link=None)
    (root / "small").write_bytes(b"inline\n")
    return root


def _objects(repo: Path) -> set[str]:
    return {
        f"{d.name}/{o.name}"
        for d in os.scandir(repo / "objects")
        if d.is_dir()
        for o in os.scandir(d.path)
    }


def _good_repo(repo: Path, source: Path) -> str:
    Repository.init(repo)
    result = _ctl(repo, "create-image", str(source), "--ref", "good")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _assert_intact(repo_path: Path, good: str) -> None:
    repo = Repository.open(repo_path)
    report = repo.fsck()
    assert report.ok, [str(p) for p in report.problems]
    assert repo.resolve_image("good") == good
    verified = repo.verify_image("good")
    assert verified.ok, verified


def _assert_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"composefsctl: error: {message}\n"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs filesystems (``size`` as mount(8) takes it); all are
    unmounted at the end, whatever happened."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
            check=True,
        )
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(mounted):
            if subprocess.run(["umount", str(point)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], check=True)


# -- the source ---------------------------------------------------------------------------------


def test_source_does_not_exist(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    good = _good_repo(repo, _tree(tmp_path / "src", 1, 5, 3000))
    before = _objects(repo)
    missing = tmp_path / "no" / "such" / "dir"
    _assert_error(_ctl(repo, "create-image", str(missing)), f"source {missing}: does not exist")
    assert _objects(repo) == before
    _assert_intact(repo, good)


def test_source_is_a_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    src = _tree(tmp_path / "src", 2, 5, 3000)
    good = _good_repo(repo, src)
    before = _objects(repo)
    file = src / "d0" / "f0"
    _assert_error(
        _ctl(repo, "create-image", str(file), "--ref", "x"), f"source {file} is not a directory"
    )
    assert _objects(repo) == before
    assert not (repo / "images" / "refs" / "x").exists()
    _assert_intact(repo, good)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp_path is under a
    mode-0700 directory of root's)."""
    path = Path(tempfile.mkdtemp(prefix="cfs-unpriv-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run_as(uid: int, gid: int, argv: list[str]) -> tuple[int, str]:
    """Run ``composefsctl argv`` as ``uid``/``gid`` in a forked child; (exit status, output).

    Not a subprocess of a fresh interpreter: this interpreter lives under /root
    (mode 0700), which the unprivileged user cannot reach. The child drops its
    groups and ids before running ``main()``; everything it runs is imported already.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child
        status = 99
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            # pytest's capture replaced the sys streams; write to the real fds.
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.environ["HOME"] = "/nonexistent"
            status = composefsctl.main(argv)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write_end)
    chunks: list[bytes] = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), b"".join(chunks).decode()


def test_unreadable_file(world_dir: Path, test_users: TestUsers) -> None:
    bob = test_users.bob
    repo = world_dir / "repo"
    src = _tree(world_dir / "src", 3, 6, 20000)
    good = _good_repo(repo, src)
    secret = src / "d1" / "secret"
    secret.write_bytes(b"x" * 5000)
    secret.chmod(0)
    for path in (repo, src):
        subprocess.run(["chown", "-R", f"{bob.uid}:{bob.gid}", str(path)], check=True)

    argv = ["--repo", str(repo), "create-image", str(src), "--ref", "x"]
    status, output = _run_as(bob.uid, bob.gid, argv)
    assert status == 1
    assert output == f"composefsctl: error: cannot read {secret}: Permission denied\n"
    assert not (repo / "images" / "refs" / "x").exists()
    _assert_intact(repo, good)
    # The owner sees a clean repository too (fsck needs no privileges).
    status, output = _run_as(bob.uid, bob.gid, ["--repo", str(repo), "fsck"])
    assert status == 0, output
    assert output.endswith(": clean\n")


# -- the repository's filesystem ---------------------------------------------------------------


def test_read_only_filesystem(tmp_path: Path, tmpfs: Callable[[str], Path]) -> None:
    mnt = tmpfs("16m")
    repo = mnt / "repo"
    src = _tree(tmp_path / "src", 4, 5, 30000)
    good = _good_repo(repo, src)
    before = _objects(repo)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)

    other = _tree(tmp_path / "other", 5, 3, 9000)
    readonly = f"repository {repo} is read-only: it is on a read-only filesystem"
    _assert_error(_ctl(repo, "create-image", str(other), "--ref", "x"), readonly)
    _assert_error(_ctl(repo, "remove-ref", "good"), readonly)
    _assert_error(_ctl(repo, "gc"), readonly)
    _assert_error(
        _ctl(mnt / "new", "init"), f"cannot create repository {mnt / 'new'}: Read-only file system"
    )
    assert _objects(repo) == before
    _assert_intact(repo, good)
    # Reading works on a read-only repository.
    assert _ctl(repo, "verify", "--all").returncode == 0
    assert _ctl(repo, "images").stdout.startswith(good)


def test_full_disk(tmp_path: Path, tmpfs: Callable[[str], Path]) -> None:
    mnt = tmpfs("4m")
    repo = mnt / "repo"
    good = _good_repo(repo, _tree(tmp_path / "src", 6, 4, 50000))
    big = _tree(tmp_path / "big", 7, 12, 600_000)  # 7 MiB: does not fit
    _assert_intact(repo, good)  # its Verify writes the image's object list (cache/) now

    before = _objects(repo)
    free = os.statvfs(mnt).f_bfree
    result = _ctl(repo, "create-image", str(big), "--ref", "big")
    _assert_error(result, f"cannot write an object in {repo / 'objects'}: No space left on device")
    assert not (repo / "images" / "refs" / "big").exists()
    _assert_intact(repo, good)
    # It left nothing it had written: the disk is no fuller than before.
    assert _objects(repo) == before
    assert os.statvfs(mnt).f_bfree == free

    assert "objects_removed: 0" in _ctl(repo, "gc", "--json").stdout.replace('"', "")
    small = _tree(tmp_path / "small", 8, 3, 100_000)
    result = _ctl(repo, "create-image", str(small), "--ref", "small")
    assert result.returncode == 0, result.stderr
    assert _ctl(repo, "verify", "good", "small").returncode == 0
    _assert_intact(repo, good)


def test_full_disk_beside_another_operation(tmp_path: Path, tmpfs: Callable[[str], Path]) -> None:
    # While another operation holds the repository, a failed CreateImage cannot know
    # whether it uses what was written: it leaves that to GC, and says so.
    mnt = tmpfs("4m")
    repo_path = mnt / "repo"
    good = _good_repo(repo_path, _tree(tmp_path / "src", 6, 4, 50000))
    big = _tree(tmp_path / "big", 7, 12, 600_000)
    repo = Repository.open(repo_path)
    before = _objects(repo_path)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with reader_lock(repo_path):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        with pytest.raises(RepositoryError) as info:
            repo.create_image(big, ref="big")
    finally:
        release.set()
        holder.join()
    left = _objects(repo_path) - before
    assert left
    assert str(info.value) == (
        f"cannot write an object in {repo_path / 'objects'}: No space left on device; the "
        f"{len(left)} objects it wrote are left for the next garbage collection (other "
        f"operations are using the repository)"
    )
    _assert_intact(repo_path, good)
    assert repo.gc().objects_removed == len(left)
    assert _objects(repo_path) == before


def test_failed_ref_leaves_no_image_objects_or_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository.init(tmp_path / "repo")
    good = repo.create_image(_tree(tmp_path / "src", 6, 4, 5000), ref="good").digest
    before = _objects(repo.path)
    real = os.symlink

    def full(target: str, link: Path, *args: Any, **kwargs: Any) -> None:
        if "refs" in Path(link).parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(target, link, *args, **kwargs)

    monkeypatch.setattr(os, "symlink", full)
    with pytest.raises(RepositoryError) as info:
        repo.create_image(_tree(tmp_path / "new", 9, 4, 5000), ref="new/deep/name")
    assert str(info.value).endswith(": No space left on device")
    assert not (repo.refs_dir / "new").exists()
    assert [e.digest for e in repo.list_images()] == [good]
    assert _objects(repo.path) == before
    assert repo.fsck().ok


def test_discard_keeps_what_another_writer_reused(tmp_path: Path) -> None:
    # The failed import wrote X and Y; meanwhile another CreateImage reused X for an
    # image it published: only Y goes.
    repo = Repository.init(tmp_path / "repo")
    since = time.time()
    with repo.object_store() as store:
        x = store.store_bytes(b"x" * 5000).digest
        y = store.store_bytes(b"y" * 5000).digest
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_bytes(b"x" * 5000)
    published = repo.create_image(other, ref="other")
    assert published.objects_written == 0  # it found X
    assert discard_added(repo, [x, y], since) == 1
    assert repo.object_path(x).exists() and not repo.object_path(y).exists()
    assert repo.verify_image("other").ok


def test_gc_prunes_empty_ref_directories(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    repo.create_image(_tree(tmp_path / "src", 6, 2, 500), ref="keep/me")
    (repo.refs_dir / "left" / "by" / "a" / "crash").mkdir(parents=True)
    (repo.refs_dir / "keep" / "empty").mkdir()
    assert repo.gc(dry_run=True).dry_run
    assert (repo.refs_dir / "left" / "by" / "a" / "crash").is_dir()
    repo.gc()
    assert sorted(p.name for p in repo.refs_dir.iterdir()) == ["keep"]
    assert [p.name for p in (repo.refs_dir / "keep").iterdir()] == ["me"]
    assert repo.resolve_image("keep/me")
