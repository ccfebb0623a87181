"""Bad input to CreateImage gets a clear error and leaves no damage.

Each case runs ``composefsctl create-image`` on a repository that already holds an
image (ref ``good``), checks the exit status and the one-line error naming the
problem, then checks that fsck calls the repository clean and ``good`` still
verifies. Cases: the source does not exist, is a file, holds a file the caller may
not read; the repository is on a read-only filesystem, or on a full one.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import composefsd.cli.composefsctl as composefsctl
import composefsd.repository.fsck
import composefsd.repository.verify  # noqa: F401 -- loaded before privileges are dropped
from composefsd.repository import Repository

NOBODY = 65534
CTL = [sys.executable, "-m", "composefsd.cli.composefsctl"]


def _ctl(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, "--repo", str(repo), *args], capture_output=True, text=True, timeout=120
    )


def _tree(root: Path, seed: int, files: int, size: int) -> Path:
    rng = random.Random(seed)
    for i in range(files):
        path = root / f"d{i % 3}" / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
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


def _run_as(uid: int, argv: list[str]) -> tuple[int, str]:
    """Run ``composefsctl argv`` as ``uid`` in a forked child; (exit status, output).

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
            os.setgid(uid)
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


def test_unreadable_file(world_dir: Path) -> None:
    repo = world_dir / "repo"
    src = _tree(world_dir / "src", 3, 6, 20000)
    good = _good_repo(repo, src)
    secret = src / "d1" / "secret"
    secret.write_bytes(b"x" * 5000)
    secret.chmod(0)
    for path in (repo, src):
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(path)], check=True)

    status, output = _run_as(NOBODY, ["--repo", str(repo), "create-image", str(src), "--ref", "x"])
    assert status == 1
    assert output == f"composefsctl: error: cannot read {secret}: Permission denied\n"
    assert not (repo / "images" / "refs" / "x").exists()
    _assert_intact(repo, good)
    # The owner sees a clean repository too (fsck needs no privileges).
    status, output = _run_as(NOBODY, ["--repo", str(repo), "fsck"])
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

    result = _ctl(repo, "create-image", str(big), "--ref", "big")
    _assert_error(result, f"cannot write an object in {repo / 'objects'}: No space left on device")
    assert not (repo / "images" / "refs" / "big").exists()
    _assert_intact(repo, good)

    # What the failed run wrote is garbage: GC frees it and the repository works on.
    assert _ctl(repo, "gc").returncode == 0
    small = _tree(tmp_path / "small", 8, 3, 100_000)
    result = _ctl(repo, "create-image", str(small), "--ref", "small")
    assert result.returncode == 0, result.stderr
    assert _ctl(repo, "verify", "good", "small").returncode == 0
    _assert_intact(repo, good)
