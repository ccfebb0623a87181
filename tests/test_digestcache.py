"""The repository's digest cache (composefsd.repository.digestcache): a re-import of an
unchanged tree reads none of its files, and every way of changing a file, the cache
or the objects is noticed: files rewritten in place with their size and mtime
restored, replaced, deleted and made anew, changed too recently or with the clock
behind; cache files damaged, truncated, foreign, hostile or not files at all;
objects deleted or damaged after they were cached."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
from array import array
from pathlib import Path
from typing import Any

import pytest

from composefsd import workerproc
from composefsd.fsverity import digest_bytes
from composefsd.repository import CreateOptions, Repository
from composefsd.repository import digestcache as digestcache_mod
from composefsd.repository import images as images_mod
from composefsd.repository import store as store_mod
from composefsd.repository.digestcache import MAGIC, DigestCache
from composefsd.sources import presence as presence_mod
from composefsd.sources.beneath import SETTLE_NS, settled
from subtreescans import record_subtree_scans
from trees import write_tree

OLD = 1_600_000_000


def _files() -> dict[str, bytes]:
    return {
        "a": b"a" * 5000,
        "d/b": b"b" * 70_000,
        "d/same": b"a" * 5000,
        "tiny": b"hello\n",
        "big": bytes(range(256)) * 4100,
    }


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every file the store hashes: its fd, or -1 for one hashed as it is copied."""
    out: list[int] = []
    real = store_mod.digest_fd  # type: ignore[attr-defined]
    real_hasher = store_mod.FsVerityHasher  # type: ignore[attr-defined]

    def counting(fd: int, *args: Any, **kwargs: Any) -> bytes:
        out.append(fd)
        return real(fd, *args, **kwargs)

    def counting_hasher(*args: Any, **kwargs: Any) -> Any:
        out.append(-1)
        return real_hasher(*args, **kwargs)

    monkeypatch.setattr(store_mod, "digest_fd", counting)
    monkeypatch.setattr(store_mod, "FsVerityHasher", counting_hasher)
    return out


@pytest.fixture(autouse=True)
def split_scans(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every re-import here looks its objects up and shares its scan with workers (as
    a big tree's does), and this lists the scanning workers' answers."""
    monkeypatch.setattr(DigestCache, "WORKER_MIN_FILES", 1)
    monkeypatch.setattr(DigestCache, "SPLIT_SHARE", 1.0)
    return record_subtree_scans(monkeypatch)


@pytest.fixture
def settle_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written by the test count as settled at once."""
    monkeypatch.setattr(DigestCache, "RACY_NS", -(10**18))


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.src = tmp_path / "src"
        self.files = _files()
        write_tree(self.src, self.files, {"d/link": "../a"})
        self.repo = Repository.init(tmp_path / "repo")

    def create(self) -> Any:
        result = self.repo.create_image(self.src, ref="x")
        assert self.repo.verify_image("x").ok
        return result

    def cache_files(self) -> list[Path]:
        if not self.repo.cache_dir.exists():
            return []
        # Verify's object lists (objectlist) live there too.
        return sorted(self.repo.cache_dir.glob("digests-*"))

    def cache(self) -> DigestCache:
        return DigestCache.open(
            self.repo.cache_dir, os.fsencode(self.src), self.repo.hash_algorithm
        )

    def cache_file(self) -> Path:
        [path] = self.cache_files()
        return path


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def _rewrite_keeping_size_and_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )


def _object_of(s: Setup, rel: str) -> Path:
    return s.repo.object_path(digest_bytes((s.src / rel).read_bytes()).hex())


def test_unchanged_tree_reads_no_file(
    s: Setup, settle_now: None, hashed: list[int], split_scans: list[object]
) -> None:
    first = s.create()
    assert len(hashed) == 4  # a, d/b, d/same, big (tiny is inline)
    assert len(s.cache_files()) == 1
    assert split_scans == []  # a tree met for the first time: one process
    hashed.clear()
    again = s.create()
    assert hashed == []
    [answer] = split_scans  # d/ walked by the worker
    assert isinstance(answer, tuple) and answer[0] == "ok"
    assert again.digest == first.digest and again.objects_written == 0
    assert again.objects_reused == first.objects_written == 3


def test_recent_files_are_not_cached(
    s: Setup, hashed: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files changed within the settle window (here: a window wider than any test
    run) are hashed at every import."""
    monkeypatch.setattr(DigestCache, "RACY_NS", 10**18)
    s.create()
    assert s.cache_files() == []  # nothing to keep: no file
    hashed.clear()
    s.create()
    assert len(hashed) == 4


def test_clock_behind_the_files_caches_nothing(
    s: Setup, hashed: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files whose change time is in the future (the clock was set back) never settle."""
    monkeypatch.setattr(digestcache_mod.time, "time_ns", lambda: OLD * 10**9)  # type: ignore[attr-defined]
    s.create()
    assert len(s.cache()) == 0
    assert not settled(10 * SETTLE_NS, 0)
    assert not settled(OLD * 10**9 + 1, OLD * 10**9 + SETTLE_NS)
    assert settled(OLD * 10**9, OLD * 10**9 + SETTLE_NS)


@pytest.mark.parametrize("how", ["in place", "renamed over", "deleted and made anew"])
def test_changed_file_is_hashed_again(
    s: Setup, settle_now: None, hashed: list[int], how: str
) -> None:
    """Same size and mtime, even the same inode number: the change time gives it away."""
    s.create()
    path = s.src / "d" / "b"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    if how == "in place":
        _rewrite_keeping_size_and_mtime(path)
    elif how == "renamed over":
        tmp = s.src / "d" / ".new"
        tmp.write_bytes(bytes(data))
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.rename(tmp, path)
    else:
        path.unlink()
        path.write_bytes(bytes(data))  # may well get the freed inode number back
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    hashed.clear()
    result = s.create()
    assert len(hashed) == 1 and result.objects_written == 1
    assert _object_of(s, "d/b").read_bytes() == path.read_bytes()
    # The next import trusts the new entry.
    hashed.clear()
    s.create()
    assert hashed == []


def test_object_deleted_after_caching_is_copied_again(
    s: Setup, settle_now: None, hashed: list[int]
) -> None:
    s.create()
    obj = _object_of(s, "big")
    obj.unlink()
    hashed.clear()
    result = s.create()
    assert hashed == [-1]  # hashed as it was copied, in one pass
    assert result.objects_written == 1 and obj.read_bytes() == s.files["big"]


def test_damaged_object_is_replaced(s: Setup, settle_now: None, hashed: list[int]) -> None:
    s.create()
    obj = _object_of(s, "d/b")
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.truncate(10)
    hashed.clear()
    result = s.create()
    assert len(hashed) == 1 and result.objects_written == 1
    assert obj.read_bytes() == s.files["d/b"]


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flipped byte":
        pos = len(data) // 2
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :])
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(5000))
    elif how == "old format":
        import marshal

        path.write_bytes(marshal.dumps(((2, "sha256", b"/x"), {b"a": (1, 2, 3, 4, 5, b"x")})))
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "symlink":
        target = path.with_name("elsewhere")
        path.rename(target)
        path.symlink_to(target.name)
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        raise AssertionError(how)


def _hostile(body: bytes) -> bytes:
    """A cache file with a valid checksum around ``body``."""
    return body + hashlib.sha256(body).digest()


_HEADER = struct.Struct("<8sIIQQIQ")


def _header(count: int, meta: bytes, paths: bytes, size: int = 32, images: int = 0) -> bytes:
    return _HEADER.pack(MAGIC, size, len(meta), count, len(paths), images, 0) + meta + paths


@pytest.mark.parametrize(
    "how",
    ["flipped byte", "truncated", "empty", "garbage", "old format", "directory", "symlink", "fifo"],
)
def test_damaged_cache_is_ignored(
    s: Setup, settle_now: None, hashed: list[int], how: str, caplog: pytest.LogCaptureFixture
) -> None:
    s.create()
    path = s.cache_file()
    _damage(path, how)
    hashed.clear()
    with caplog.at_level(logging.INFO, logger="composefsd.repository.digestcache"):
        result = s.create()
    assert len(hashed) == 4 and result.objects_written == 0
    if how in ("flipped byte", "truncated", "garbage", "old format", "empty"):
        assert "ignoring" in caplog.text
        # ... and written anew, whole.
        hashed.clear()
        s.create()
        assert hashed == []


def _meta(s: Setup) -> bytes:
    return s.repo.hash_algorithm.value.encode() + b"\0" + os.fsencode(s.src)


@pytest.mark.parametrize(
    "body",
    [
        "huge count",
        "count beyond the data",
        "duplicate paths",
        "empty path",
        "other source",
        "other digest size",
        "bare count beyond the data",
    ],
)
def test_hostile_cache_with_valid_checksum_is_ignored(
    s: Setup, settle_now: None, hashed: list[int], body: str
) -> None:
    s.create()
    path = s.cache_file()
    meta = _meta(s)
    assert path.read_bytes().startswith(_header(4, meta, b"")[:20])  # the layout is this one
    keys = struct.pack("<5Q", 1, 2, 3, 4, 5)
    if body == "huge count":
        data = _header(2**62, meta, b"a")
    elif body == "count beyond the data":
        data = _header(3, meta, b"a\0b\0c") + keys * 5 + b"\0" * 64
    elif body == "duplicate paths":
        data = _header(2, meta, b"a\0a") + (struct.pack("<2Q", 1, 2) * 5) + b"\0" * 64
    elif body == "empty path":
        data = _header(2, meta, b"a\0") + (struct.pack("<2Q", 1, 2) * 5) + b"\0" * 64
    elif body == "other source":
        data = _header(1, _meta(s)[:-1], b"a") + keys + b"\0" * 32
    elif body == "other digest size":
        data = _header(1, meta, b"a", size=64) + keys + b"\0" * 64
    else:
        data = _HEADER.pack(MAGIC, 32, len(meta), 1, 1, 0, 5) + meta + b"a" + keys + b"\0" * 48
    path.write_bytes(_hostile(data))
    hashed.clear()
    result = s.create()
    assert len(hashed) == 4 and result.objects_written == 0


def test_cache_naming_a_missing_object_is_not_believed(
    s: Setup, settle_now: None, hashed: list[int]
) -> None:
    """A well-formed entry whose digest names no object: the file is hashed while copied,
    and the image holds its real digest."""
    s.create()
    path = s.cache_file()
    data = bytearray(path.read_bytes()[: -hashlib.sha256().digest_size])
    _magic, _size, meta_len, count, paths_len, _images, _bare = _HEADER.unpack_from(data)
    assert count == 4
    # Give every file an unknown digest.
    at = _HEADER.size + meta_len + paths_len + 40 * count
    data[at : at + 4 * 32] = b"".join(bytes([0x11 + i]) * 32 for i in range(4))
    path.write_bytes(_hostile(bytes(data)))
    hashed.clear()
    result = s.create()
    assert hashed == [-1] * 4 and result.objects_written == 0
    assert s.repo.verify_image("x").ok


def test_cache_is_bounded(
    tmp_path: Path, settle_now: None, monkeypatch: pytest.MonkeyPatch, hashed: list[int]
) -> None:
    monkeypatch.setattr(DigestCache, "MAX_ENTRIES", 2)
    monkeypatch.setattr(DigestCache, "MAX_FILES", 2)
    repo = Repository.init(tmp_path / "repo")
    for i in range(3):
        src = tmp_path / f"src{i}"
        write_tree(src, {f"f{j}": bytes([i, j]) * 100 for j in range(5)}, {})
        repo.create_image(src)
    caches = sorted(repo.cache_dir.iterdir())
    assert len(caches) == 2
    name = DigestCache.file_name(repo.hash_algorithm, os.fsencode(tmp_path / "src2"))
    assert name in [p.name for p in caches]  # the last written stays
    cache = DigestCache.open(repo.cache_dir, os.fsencode(tmp_path / "src2"), repo.hash_algorithm)
    assert len(cache) == 2
    hashed.clear()
    repo.create_image(tmp_path / "src2")
    assert len(hashed) == 3  # two remembered, three hashed


# -- the images of an unchanged tree ---------------------------------------------------------


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every image CreateImage writes (its erofs version)."""
    out: list[int] = []
    real = images_mod._write_images

    def counting(repo: Any, root: Any, options: Any) -> Any:
        made = real(repo, root, options)
        out.extend(int(version) for version, _data in made)
        return made

    monkeypatch.setattr(images_mod, "_write_images", counting)
    return out


def _truth(s: Setup, **options: Any) -> str:
    """The image digest of the tree as it is, written without any cache."""
    result = s.repo.create_image(s.src, options=CreateOptions(digest_cache=False, **options))
    return str(result.digest)


def test_unchanged_tree_reuses_its_image(s: Setup, settle_now: None, written: list[int]) -> None:
    first = s.create()
    assert written == [1]
    written.clear()
    again = s.create()
    assert written == [] and again.digest == first.digest and not again.image_written
    assert again.image_size == first.image_size and again.entries == first.entries


def _chmod(s: Setup) -> None:
    os.chmod(s.src / "a", 0o600)


def _touch_dir(s: Setup) -> None:
    os.utime(s.src / "d", ns=(0, 12345))


def _xattr(s: Setup) -> None:
    os.setxattr(s.src / "a", "user.test", b"1")


def _new_empty(s: Setup) -> None:
    (s.src / "d" / "new").write_bytes(b"")


def _relink(s: Setup) -> None:
    (s.src / "d" / "link").unlink()
    (s.src / "d" / "link").symlink_to("../tiny")


def _rename(s: Setup) -> None:
    os.rename(s.src / "tiny", s.src / "tinx")


def _hardlink(s: Setup) -> None:
    os.link(s.src / "big", s.src / "d" / "big2")


def _inline(s: Setup) -> None:
    """A small file's content changes, same size and mtime: it is inline, read each time."""
    _rewrite_keeping_size_and_mtime(s.src / "tiny")


def _content(s: Setup) -> None:
    _rewrite_keeping_size_and_mtime(s.src / "big")


@pytest.mark.parametrize(
    "change",
    [_chmod, _touch_dir, _xattr, _new_empty, _relink, _rename, _hardlink, _inline, _content],
)
def test_changed_tree_gets_a_new_image(
    s: Setup, settle_now: None, written: list[int], change: Any
) -> None:
    first = s.create()
    if change is _xattr:
        try:
            change(s)
        except OSError as exc:
            pytest.skip(f"no user xattrs here: {exc}")
    else:
        change(s)
    written.clear()
    result = s.create()
    assert written == [1]
    assert result.digest != first.digest
    assert result.digest == _truth(s)


def test_options_are_part_of_the_image_key(s: Setup, settle_now: None, written: list[int]) -> None:
    first = s.create()
    written.clear()
    other = s.repo.create_image(s.src, ref="x", options=CreateOptions(use_epoch=True))
    assert written == [1] and other.digest != first.digest
    assert other.digest == _truth(s, use_epoch=True)


@pytest.mark.parametrize("how", ["deleted", "damaged in place", "truncated"])
def test_image_object_is_checked_before_reuse(
    s: Setup, settle_now: None, written: list[int], how: str
) -> None:
    first = s.create()
    obj = s.repo.object_path(first.digest)
    if how == "deleted":
        s.repo.remove_image("x")
        obj.unlink()
    else:
        os.chmod(obj, 0o644)
        data = bytearray(obj.read_bytes())
        if how == "truncated":
            del data[-1]
        else:
            data[100] ^= 1
        obj.write_bytes(bytes(data))
    written.clear()
    again = s.repo.create_image(s.src, ref="x")
    # Not reused: written again. (An object of the right size is kept as it is, as
    # always: repairing one damaged in place is fsck's job.)
    assert written == [1] and again.digest == first.digest
    if how != "damaged in place":
        assert s.repo.verify_image("x").ok


# -- inodes known to have no xattrs ---------------------------------------------------------


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every path whose xattrs are listed (by this process: so no scan is shared with
    a worker here; what the worker is given is tested below and in test_scan_split)."""
    monkeypatch.setattr(DigestCache, "WORKER_MIN_FILES", 10**9)
    out: list[object] = []
    real = os.listxattr

    def counting(path: Any, *args: Any, **kwargs: Any) -> list[str]:
        out.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "listxattr", counting)
    return out


def test_bare_inodes_are_not_asked_again(s: Setup, settle_now: None, listed: list[object]) -> None:
    first = s.create()
    assert len(listed) >= 8  # every entry
    listed.clear()
    again = s.create()
    assert len(listed) <= 1  # the root at most
    assert again.digest == first.digest


def test_bare_inodes_are_forgotten_after_a_reboot(
    s: Setup, settle_now: None, listed: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    s.create()
    monkeypatch.setattr(digestcache_mod, "_boot_id", lambda: b"\x01" * 16)
    listed.clear()
    s.create()
    assert len(listed) >= 8


def test_xattr_added_to_a_bare_inode_is_read(
    s: Setup, settle_now: None, listed: list[object]
) -> None:
    s.create()
    try:
        os.setxattr(s.src / "d" / "b", "user.added", b"v")
    except OSError as exc:
        pytest.skip(f"no user xattrs here: {exc}")
    listed.clear()
    result = s.create()
    assert any(isinstance(p, bytes) and p.endswith(b"/b") for p in listed)
    assert result.digest == _truth(s)


# -- the objects' lookups, made in a worker while the tree is scanned -----------------------


@pytest.fixture
def statuses(monkeypatch: pytest.MonkeyPatch) -> list[bytes | None]:
    """What each import's object lookup worker answered, as resolve got it (None: no
    answer)."""
    out: list[bytes | None] = []
    real = DigestCache._object_statuses

    def recording(self: DigestCache) -> bytes | None:
        answer = real(self)
        out.append(answer)
        return answer

    monkeypatch.setattr(DigestCache, "_object_statuses", recording)
    return out


def test_objects_are_looked_up_by_a_worker(
    s: Setup,
    settle_now: None,
    hashed: list[int],
    statuses: list[bytes | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = s.create()
    assert statuses == []  # nothing cached yet
    hashed.clear()
    again = s.create()
    assert statuses == [bytes([presence_mod.PRESENT]) * 4]
    assert hashed == [] and again.digest == first.digest
    # Each way an object can be found wrong, as the worker sees it.
    _object_of(s, "big").unlink()
    damaged = _object_of(s, "d/b")
    os.chmod(damaged, 0o644)
    with open(damaged, "r+b") as f:
        f.truncate(10)
    statuses.clear()
    hashed.clear()
    result = s.create()
    [answer] = statuses
    assert answer is not None
    assert sorted(answer) == sorted(
        [presence_mod.PRESENT] * 2 + [presence_mod.MISSING, presence_mod.DAMAGED]
    )
    # The missing one hashed as it is copied, the damaged one imported afresh.
    assert len(hashed) == 2 and hashed.count(-1) == 1
    assert result.objects_written == 2 and result.digest == first.digest
    assert s.repo.verify_image("x").ok
    # A tree this small is not worth a worker: looked up in process.
    monkeypatch.setattr(DigestCache, "WORKER_MIN_FILES", 5)
    statuses.clear()
    hashed.clear()
    assert s.create().digest == first.digest and hashed == []
    assert statuses == [None]


def test_lookups_without_a_worker_are_made_in_process(
    s: Setup, settle_now: None, hashed: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = s.create()

    def cannot_start(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EAGAIN, "no processes")

    monkeypatch.setattr(workerproc, "start", cannot_start)
    hashed.clear()
    assert s.create().digest == first.digest and hashed == []
    _object_of(s, "big").unlink()
    result = s.create()
    assert hashed == [-1] and result.objects_written == 1
    assert s.repo.verify_image("x").ok


def test_check_objects_statuses(tmp_path: Path) -> None:
    store = tmp_path / "objects"
    names = [bytes([i]) * 32 for i in range(7)]

    def path(digest: bytes) -> Path:
        return store / digest.hex()[:2] / digest.hex()[2:]

    for digest in names:
        path(digest).parent.mkdir(parents=True)
    path(names[0]).write_bytes(b"x" * 10)  # present
    # names[1]: missing
    path(names[2]).write_bytes(b"x" * 9)  # another size
    path(names[3]).mkdir()  # not a regular file
    path(names[4]).symlink_to(path(names[0]))  # a link to a good object: not followed
    path(names[5]).parent.rmdir()
    path(names[5]).parent.write_bytes(b"")  # XX/ is a file: ENOTDIR, made again by the caller
    os.mkfifo(path(names[6]))
    sizes = array("q", [10] * len(names))
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        want = bytes(
            [
                presence_mod.PRESENT,
                presence_mod.MISSING,
                presence_mod.DAMAGED,
                presence_mod.DAMAGED,
                presence_mod.DAMAGED,
                presence_mod.FAILED,
                presence_mod.DAMAGED,
            ]
        )
        assert presence_mod.check_objects(fd, b"".join(names), 32, sizes) == want
        # The same answer from a worker process, through the inherited fd.
        assert presence_mod.PresenceCheck(fd, b"".join(names), 32, sizes).result() == want
        with pytest.raises(ValueError):
            presence_mod.check_objects(fd, b"".join(names)[:-1], 32, sizes)
    finally:
        os.close(fd)


def test_the_worker_is_given_bare_inodes_of_this_boot_only(
    s: Setup, settle_now: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    s.create()
    split = s.cache().scan_split()
    assert split is not None and split.weights == {b"a": 1, b"big": 1, b"d": 2}
    third = len(split.bare) // 3
    assert third and len(split.bare) == 3 * third
    devs = array("Q", split.bare[:third])
    inos = array("Q", split.bare[third : 2 * third])
    assert set(zip(devs, inos, array("q", split.bare[2 * third :]), strict=True)) == (
        s.cache().known_bare()
    )
    monkeypatch.setattr(digestcache_mod, "_boot_id", lambda: b"\x01" * 16)
    split = s.cache().scan_split()
    assert split is not None and split.bare == b""
    monkeypatch.setattr(DigestCache, "WORKER_MIN_FILES", 5)
    assert s.cache().scan_split() is None  # four files: too few
