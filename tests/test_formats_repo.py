"""A composefs-rs V2 image in our repository: Verify, fsck and Mount handle it.

The image is what cfsctl with ``--erofs-version 2`` would leave in a shared
repository: the V2 bytes of the same tree as one of our images, stored as an
object under its own fs-verity digest, linked from ``images/`` and named by a ref.
The mount is real (erofs + overlayfs) and is read back through the overlay.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import treecompare
from composefsd.image.formats import ErofsVersion, image_version, write_format
from composefsd.image.reader import iter_objects, read_image
from composefsd.kernel.mount import unmount
from composefsd.kernel.repomount import mount_repository_image
from composefsd.objectlayout import object_relpath
from composefsd.repository import CreateOptions, Repository
from composefsd.repository.fsck import fsck
from composefsd.repository.verify import verify_image
from servicehelpers import unmount_below
from trees import write_tree

FILES = {
    "small": b"tiny\n",
    "a": b"a" * 100,
    "b": bytes(range(256)) * 40,
    "sub/deeper/c": b"c" * 70000,
    "sub/same-as-a": b"a" * 100,
    "big": b"\x5a" * ((1 << 20) + 17),
    "empty": b"",
}


@dataclasses.dataclass
class V2Repo:
    src: Path
    repo: Repository
    v1: str
    v2: str


def _publish(repo: Repository, data: bytes, ref: str) -> str:
    """Store an image the way cfsctl does: object, ``images/<id>`` link, ref link."""
    with repo.object_store() as store:
        digest = store.store_bytes(data).digest
    os.symlink("../objects/" + object_relpath(digest), repo.images_dir / digest)
    os.symlink("../" + digest, repo.refs_dir / ref)
    return digest


def _build(tmp_path: Path, whiteout: bool = False) -> V2Repo:
    src = tmp_path / "src"
    write_tree(src, FILES, {"link": "sub/deeper/c", "dangling": "nowhere"})
    os.link(src / "small", src / "small-again")
    os.mkfifo(src / "fifo")
    if whiteout:
        os.mknod(src / "sub" / "wh", stat.S_IFCHR | 0o600, 0)
    repo = Repository.init(tmp_path / "repo")
    v1 = repo.create_image(src, ref="v1", options=CreateOptions(preserve_hardlinks=True)).digest
    tree = read_image(repo.image_path(v1).read_bytes(), c_quirks=False).root
    v2 = _publish(repo, write_format(tree, ErofsVersion.V2), "v2")
    return V2Repo(src, repo, v1, v2)


@pytest.fixture
def v2repo(tmp_path: Path) -> Iterator[V2Repo]:
    yield _build(tmp_path, whiteout=True)
    unmount_below(tmp_path)


def _attach(repo: Repository, digest: str, where: Path) -> None:
    dm = mount_repository_image(repo, "v2")
    assert (dm.image_check, dm.image_digest) == ("userspace", digest)
    where.mkdir()
    with dm:
        dm.attach(where)


def test_v2_image_is_v2(v2repo: V2Repo) -> None:
    data = v2repo.repo.image_path(v2repo.v2).read_bytes()
    assert image_version(data) is ErofsVersion.V2
    v1_objects = iter_objects(read_image(v2repo.repo.image_path(v2repo.v1).read_bytes()).root)
    assert iter_objects(read_image(data, c_quirks=False).root) == v1_objects
    assert v2repo.repo.resolve_image("v2") == v2repo.v2


def test_verify_and_fsck_v2(v2repo: V2Repo) -> None:
    repo = v2repo.repo
    external = {d for d in FILES.values() if len(d) > 64}
    report = verify_image(repo, v2repo.v2)
    assert report.ok, report
    assert report.objects_checked == len(external)
    assert fsck(repo).ok

    v2_tree = read_image(repo.image_path(v2repo.v2).read_bytes(), c_quirks=False).root
    payloads = sorted(iter_objects(v2_tree))
    gone = payloads[0].replace(b"/", b"").decode()
    damaged = payloads[1].replace(b"/", b"").decode()
    repo.object_path(gone).unlink()
    path = repo.object_path(damaged)
    os.chmod(path, 0o644)
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0xFF
    path.write_bytes(bytes(body))

    report = verify_image(repo, v2repo.v2)
    assert not report.ok
    assert report.missing == [gone]
    assert [d for d, _ in report.corrupt] == [damaged]
    problems = {(p.kind, p.path) for p in fsck(repo).problems}
    assert ("image-missing-object", f"images/{v2repo.v2}") in problems


def test_verify_finds_a_damaged_v2_image(v2repo: V2Repo) -> None:
    repo = v2repo.repo
    path = repo.object_path(v2repo.v2)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[1152] ^= 0x01  # the root inode
    path.write_bytes(bytes(data))
    report = verify_image(repo, v2repo.v2)
    assert not report.ok and report.image_problems


def _seconds(snap: dict[bytes, treecompare.Entry]) -> dict[bytes, treecompare.Entry]:
    """V2 stores whole seconds of mtime."""
    return {
        p: dataclasses.replace(e, mtime_ns=e.mtime_ns // 10**9 * 10**9) for p, e in snap.items()
    }


def test_mount_v2_image(tmp_path: Path) -> None:
    built = _build(tmp_path)
    expected = _seconds(treecompare.snapshot(built.src))
    where = tmp_path / "mnt"
    try:
        _attach(built.repo, built.v2, where)
        problems = treecompare.diff(expected, _seconds(treecompare.snapshot(where)))
        assert not problems, "\n".join(problems)
        for rel, content in FILES.items():
            assert (where / rel).read_bytes() == content
        assert os.stat(where / "small").st_ino == os.stat(where / "small-again").st_ino
        unmount(where)
    finally:
        unmount_below(tmp_path)


def test_mount_v2_image_with_a_whiteout(v2repo: V2Repo, tmp_path: Path) -> None:
    """V2 does not escape whiteouts: overlayfs takes the 0/0 device for one, so the
    name is listed but cannot be looked up (V1 shows it as an ordinary file)."""
    where = tmp_path / "mnt"
    _attach(v2repo.repo, v2repo.v2, where)
    assert "wh" in os.listdir(where / "sub")
    assert not os.path.lexists(where / "sub" / "wh")
    assert (where / "sub" / "deeper" / "c").read_bytes() == FILES["sub/deeper/c"]
    unmount(where)
