"""The daemon's memory of image digests computed in userspace (composefsd.kernel.imagecache).

Every attack on a remembered file (rewritten in place, replaced by a rename,
truncated, its times touched, deleted and made again, perhaps on the same inode)
must lead to the file being hashed again, and a damaged or swapped image to a
refused mount under every verity policy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from composefsd.fsverity import digest_bytes
from composefsd.kernel.imagecache import FileIdentity, ImageDigestCache
from composefsd.kernel.mount import NO_VERITY, WRONG_VERITY, ImageVerityError
from composefsd.kernel.repomount import mount_repository_image
from composefsd.kernel.verity import Algorithm
from composefsd.repository import Repository, VerityPolicy

SHA256 = Algorithm.SHA256
#: Short enough to wait for in a test; the guard it stands for is the same.
SETTLE_NS = 30_000_000


def _settle() -> None:
    """Let the settle time pass since the last change of any file made so far."""
    time.sleep(SETTLE_NS * 2 / 1e9)


@pytest.fixture
def cache() -> ImageDigestCache:
    return ImageDigestCache(settle_ns=SETTLE_NS)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image"
    path.write_bytes(b"A" * 20000)
    return path


def _digest(cache: ImageDigestCache, path: Path) -> tuple[str, bool]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return cache.digest(fd, SHA256)
    finally:
        os.close(fd)


def _remembered(cache: ImageDigestCache, path: Path) -> None:
    _settle()
    first = _digest(cache, path)
    assert first == (digest_bytes(path.read_bytes(), SHA256).hex(), False)
    assert _digest(cache, path) == (first[0], True)


def test_second_digest_is_remembered(cache: ImageDigestCache, image: Path) -> None:
    _remembered(cache, image)
    assert (cache.computed, cache.remembered, len(cache)) == (1, 1, 1)


def test_recently_changed_file_is_not_remembered(image: Path) -> None:
    # The default settle time (2 s) is far longer than the file's age: a write in
    # the same tick of the change-time clock could not be told apart.
    cache = ImageDigestCache()
    assert not _digest(cache, image)[1]
    assert not _digest(cache, image)[1]
    assert (cache.computed, len(cache)) == (2, 0)


def test_file_changed_while_hashed_is_not_remembered(image: Path) -> None:
    _settle()

    # The clock is read once the hashing starts: change the file right then.
    def clock() -> int:
        with open(image, "r+b") as f:
            f.write(b"B")
        return time.time_ns() + 10**12

    cache = ImageDigestCache(settle_ns=SETTLE_NS, clock=clock)
    _digest(cache, image)
    assert len(cache) == 0


def _rewrite_in_place(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"B")  # same size, same inode


def _replace_by_rename(path: Path) -> None:
    tmp = path.with_name("new")
    tmp.write_bytes(b"B" * 20000)
    os.rename(tmp, path)


def _truncate(path: Path) -> None:
    os.truncate(path, 4096)


def _extend(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0")


def _rewrite_and_restore_mtime(path: Path) -> None:
    st = path.stat()
    _rewrite_in_place(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _delete_and_recreate(path: Path) -> None:
    # Often the freed inode number is handed straight to the new file.
    os.unlink(path)
    path.write_bytes(b"B" * 20000)


ATTACKS: dict[str, Callable[[Path], None]] = {
    "rewritten in place": _rewrite_in_place,
    "replaced by rename": _replace_by_rename,
    "truncated": _truncate,
    "extended": _extend,
    "rewritten, mtime restored": _rewrite_and_restore_mtime,
    "deleted and recreated": _delete_and_recreate,
}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_changed_file_is_hashed_again(
    attack: Callable[[Path], None], cache: ImageDigestCache, image: Path
) -> None:
    _remembered(cache, image)
    before = FileIdentity.of(image.stat())
    attack(image)
    assert FileIdentity.of(image.stat()) != before
    digest, remembered = _digest(cache, image)
    assert not remembered
    assert digest == digest_bytes(image.read_bytes(), SHA256).hex()


def test_touched_file_is_hashed_again(cache: ImageDigestCache, image: Path) -> None:
    _remembered(cache, image)
    os.chmod(image, 0o600)  # the change time moves, the content stays
    assert _digest(cache, image)[1] is False
    _settle()
    assert _digest(cache, image)[1] is False  # remembered anew now that it settled
    assert _digest(cache, image)[1] is True


def test_algorithm_is_part_of_the_key(cache: ImageDigestCache, image: Path) -> None:
    _remembered(cache, image)
    fd = os.open(image, os.O_RDONLY)
    try:
        digest, remembered = cache.digest(fd, Algorithm.SHA512)
    finally:
        os.close(fd)
    assert not remembered and digest == digest_bytes(image.read_bytes(), Algorithm.SHA512).hex()


def test_size_is_bounded(tmp_path: Path) -> None:
    cache = ImageDigestCache(2, settle_ns=SETTLE_NS)
    files = [tmp_path / f"f{i}" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100)
    _settle()
    for f in files:
        _digest(cache, f)
    assert len(cache) == 2
    assert _digest(cache, files[0])[1] is False  # the oldest went first
    assert _digest(cache, files[2])[1] is True
    with pytest.raises(ValueError):
        ImageDigestCache(0)


# -- through a repository mount -------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[tuple[Repository, str, str]]:
    repo = Repository.init(tmp_path / "repo")
    for name in "ab":
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(name.encode() * 100)
    a = repo.create_image(tmp_path / "a", ref="a").digest
    b = repo.create_image(tmp_path / "b", ref="b").digest
    yield repo, a, b


@pytest.mark.parametrize("policy", list(VerityPolicy))
def test_swapped_image_is_refused_after_a_remembered_mount(
    policy: VerityPolicy, repo: tuple[Repository, str, str]
) -> None:
    repository, a, b = repo
    cache = ImageDigestCache(settle_ns=SETTLE_NS)
    _settle()
    if policy is not VerityPolicy.REQUIRED:
        for _ in range(2):
            with mount_repository_image(repository, "a", verity=policy, digest_cache=cache) as m:
                assert (m.image_check, m.image_digest) == ("userspace", a)
        assert (cache.computed, cache.remembered) == (1, 1)
        assert any("unchanged since" in note for note in m.notes)
    image_a = Path(os.path.realpath(repository.image_path(a)))
    image_a.chmod(0o644)
    image_a.write_bytes(Path(repository.image_path(b)).read_bytes())
    _settle()
    for _ in range(2):  # the refusal is not remembered as a success either
        with pytest.raises(ImageVerityError) as info:
            mount_repository_image(repository, "a", verity=policy, digest_cache=cache)
        assert info.value.reason == (NO_VERITY if policy is VerityPolicy.REQUIRED else WRONG_VERITY)


# -- through the daemon's Mount --------------------------------------------------------------


def test_daemon_mount_hashes_an_unchanged_image_once(
    repo: tuple[Repository, str, str], tmp_path: Path
) -> None:
    from composefsd.service.context import CallContext, Peer, VarlinkReplyError
    from composefsd.service.methods import INTERFACE, RepositoryInterface
    from composefsd.service.mounts import MountTracker

    repository, a, b = repo
    iface = RepositoryInterface(repository, MountTracker(tmp_path / "run"))
    iface.image_digests = ImageDigestCache(settle_ns=SETTLE_NS)
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def ctx(method: str) -> CallContext:
        return CallContext(
            peer=Peer(os.getpid(), 0, 0),
            method=f"{INTERFACE}.{method}",
            more=False,
            fds=[],
            send_continues=lambda _reply: None,
        )

    def mount(verity: str) -> object:
        unset = dict.fromkeys(
            ("expected_digest", "read_only", "upper_path", "upper_fd_index", "work_path"), None
        )
        unset |= dict.fromkeys(("work_fd_index", "userns_fd_index", "uid_map", "gid_map"), None)
        reply = iface.Mount("a", verity=verity, where=str(mnt), _request=ctx("Mount"), **unset)
        iface.Unmount(str(mnt), None, _request=ctx("Unmount"))
        return reply["imageCheck"]

    _settle()
    assert [mount(v) for v in ("disabled", "try", "disabled")] == ["userspace"] * 3
    assert (iface.image_digests.computed, iface.image_digests.remembered) == (1, 2)
    image_a = Path(os.path.realpath(repository.image_path(a)))
    image_a.chmod(0o644)
    image_a.write_bytes(Path(repository.image_path(b)).read_bytes())
    _settle()
    for verity in ("disabled", "try", "disabled", "required"):
        with pytest.raises(VarlinkReplyError) as info:
            mount(verity)
        assert info.value.name == f"{INTERFACE}.ImageVerityFailed"
        reason = NO_VERITY if verity == "required" else WRONG_VERITY
        assert info.value.parameters["reason"] == reason
    assert not os.path.ismount(mnt)
