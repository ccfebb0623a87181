"""composefsctl mount / unmount / mounts, and gc keeping mounted images (real mounts, root)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefsd.kernel.mountinfo import list_composefs_mounts
from ctlrun import run_ctl
from servicehelpers import unmount_below
from trees import random_tree


@pytest.fixture
def setup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[Path, Path, Path]]:
    """(repo, source tree, mountpoint) with the tree imported as ref "app"."""
    repo, src, mnt = tmp_path / "repo", tmp_path / "src", tmp_path / "mnt"
    random_tree(src, seed=7, files=20, dirs=4, sizes=(0, 30, 5000, 200_000))
    mnt.mkdir()
    assert run_ctl(capsys, "--repo", str(repo), "init")[0] == 0
    assert run_ctl(capsys, "--repo", str(repo), "create-image", str(src), "--ref", "app")[0] == 0
    yield repo, src, mnt
    unmount_below(tmp_path)


def _tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_mount_list_unmount(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    repo, src, mnt = setup
    status, out, err = run_ctl(capsys, "--repo", str(repo), "mount", "app", str(mnt), "--json")
    assert status == 0, err
    info = json.loads(out)
    digest = info["imageDigest"]
    assert info["source"] == f"composefs:{digest}"
    # No fs-verity on this kernel: the digest was checked by hashing, objects unchecked.
    assert info["imageCheck"] == "userspace" and info["objectVerity"] is False
    assert info["readOnly"] is True
    assert _tree_hashes(mnt) == _tree_hashes(src)
    assert os.readlink(mnt / "link") == "d0/f0"

    status, out, _ = run_ctl(capsys, "--repo", str(repo), "mounts", "--json")
    assert status == 0
    listed = json.loads(out)
    assert [(m["mountpoint"], m["digest"], m["readOnly"]) for m in listed] == [
        (str(mnt), digest, True)
    ]
    status, out, _ = run_ctl(capsys, "--repo", str(repo), "mounts")
    assert out == f"{mnt}  {digest}  ro  verity=off\n"

    status, out, err = run_ctl(capsys, "--repo", str(repo), "unmount", str(mnt), "-v")
    assert status == 0, err
    assert out == f"unmounted composefs:{digest} from {mnt}\n"
    assert not any(m.mountpoint == str(mnt) for m in list_composefs_mounts())
    assert run_ctl(capsys, "--repo", str(repo), "mounts")[1] == ""


def test_gc_keeps_mounted_image(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    repo, src, mnt = setup
    assert run_ctl(capsys, "--repo", str(repo), "mount", "app", str(mnt))[0] == 0
    assert run_ctl(capsys, "--repo", str(repo), "remove-ref", "app")[0] == 0
    status, out, _ = run_ctl(capsys, "--repo", str(repo), "gc", "--json")
    assert status == 0
    result = json.loads(out)
    assert result["objects_removed"] == 0 and result["images_removed"] == 0
    # Everything still reads through the mount.
    assert _tree_hashes(mnt) == _tree_hashes(src)
    assert run_ctl(capsys, "--repo", str(repo), "unmount", str(mnt))[0] == 0
    result = json.loads(run_ctl(capsys, "--repo", str(repo), "gc", "--json")[1])
    assert result["images_removed"] == 1 and result["objects_removed"] > 0


def test_mount_rw_and_idmap(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    repo, _src, mnt = setup
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    status, out, err = run_ctl(
        capsys,
        "--repo",
        str(repo),
        "mount",
        "app",
        str(mnt),
        "--rw",
        "--upperdir",
        str(upper),
        "--workdir",
        str(work),
        "--uid-map",
        "0:200000:65536",
        "--json",
    )
    assert status == 0, err
    info = json.loads(out)
    assert info["readOnly"] is False and info["idmapped"] is True
    # Ownership comes from the idmapped EROFS layer.
    assert (mnt / "d1" / "f1").stat().st_uid == 200000
    (mnt / "new").write_text("written")
    assert (upper / "new").read_text() == "written"
    assert run_ctl(capsys, "--repo", str(repo), "unmount", str(mnt))[0] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["mount", "nope", "{mnt}"], "no image or ref named 'nope'"),
        (["mount", "app", "{mnt}/missing"], "mountpoint {mnt}/missing: No such file or directory"),
        (["mount", "app", "{mnt}", "--expected-digest", "00" * 32], "Image has wrong fs-verity"),
        (["mount", "app", "{mnt}", "--verity", "required"], "Image has no fs-verity"),
        (["mount", "app", "{mnt}", "--upperdir", "/tmp"], "--upperdir and --workdir go together"),
        (["mount", "app", "{mnt}", "--uid-map", "0:1"], "is not INSIDE:OUTSIDE:COUNT"),
        (["mount", "app", "{mnt}", "--idmap-userns", "/nonexistent"], "cannot open user namespace"),
        (["unmount", "{mnt}"], "is not a composefs mount point"),
    ],
)
def test_mount_errors(
    setup: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    repo, _src, mnt = setup
    # Only our own mounts: other tests or benchmarks may mount meanwhile.
    before = _mounts_under(mnt.parent)
    args = [a.format(mnt=mnt) for a in argv]
    status, out, err = run_ctl(capsys, "--repo", str(repo), *args)
    assert status in (1, 2)
    assert message.format(mnt=mnt) in err
    assert err.startswith("composefsctl") or err.startswith("usage:")
    assert out == ""
    assert _mounts_under(mnt.parent) == before


def _mounts_under(root: Path) -> list[str]:
    return [m.mountpoint for m in list_composefs_mounts() if m.mountpoint.startswith(str(root))]
