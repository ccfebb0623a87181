"""Verify's object lists (composefsd.repository.objectlist): a second Verify of an
image whose digest it confirms checks the objects of the list its first Verify
wrote, without scanning the image (counted through a hook on the scan, not timed),
and finds the same damage; a damaged image is scanned and reported as without a
list; a damaged, truncated, foreign or hostile list file is no list (scanned, and
written again); a list is never used for another image; the repository's own
fsck and GC are untouched by it."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from composefsd.fsverity import digest_bytes
from composefsd.image.reader import scan_objects
from composefsd.kernel.verity import Algorithm
from composefsd.repository import Repository, cachefile, objectlist
from composefsd.repository import verify as verify_mod
from composefsd.repository.verify import VerifyReport, verify_image
from trees import write_tree

SEED = 20261208


class Setup:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        rng = random.Random(SEED)
        self.files = {f"d{i % 3}/f{i}": rng.randbytes(100 + 997 * i) for i in range(12)}
        self.files["same"] = self.files["d0/f0"]
        write_tree(tmp_path / "t1", self.files)
        other = {"x": rng.randbytes(3000), "y": rng.randbytes(40000)}
        write_tree(tmp_path / "t2", other)
        self.repo = Repository.init(tmp_path / "repo")
        self.one = self.repo.create_image(tmp_path / "t1", ref="one").digest
        self.two = self.repo.create_image(tmp_path / "t2", ref="two").digest
        self.scans = 0

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.scans += 1
            return scan_objects(*args, **kwargs)

        monkeypatch.setattr(verify_mod, "scan_objects", counting)

    def verify(self, name: str, **kwargs: Any) -> VerifyReport:
        self.scans = 0
        return self.repo.verify_image(name, **kwargs)

    def list_path(self, digest: str) -> Path:
        return self.repo.cache_dir / objectlist.file_name(Algorithm.SHA256, digest)

    def object_of(self, data: bytes) -> Path:
        return self.repo.object_path(digest_bytes(data, "sha256").hex())

    def lists(self) -> list[str]:
        return sorted(p.name for p in self.repo.cache_dir.glob("objects-*"))


@pytest.fixture
def s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    return Setup(tmp_path, monkeypatch)


def _findings(report: VerifyReport) -> tuple[object, ...]:
    return (
        report.ok,
        report.image_problems,
        report.missing,
        report.corrupt,
        report.objects_checked,
        report.bytes_checked,
    )


def _flip(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_second_verify_uses_the_list(s: Setup) -> None:
    first = s.verify("one")
    assert first.ok and s.scans == 1
    path = s.list_path(s.one)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(s.repo.cache_dir.stat().st_mode) == 0o700
    written = path.read_bytes()
    again = s.verify("one")
    assert s.scans == 0 and _findings(again) == _findings(first)
    assert path.read_bytes() == written  # used, not rewritten
    # What the list holds is what the scan finds.
    listed = objectlist.load(str(s.repo.cache_dir), Algorithm.SHA256, s.one)
    assert listed is not None
    sizes = listed.sizes
    assert len(sizes) == first.objects_checked
    assert sum(sizes.values()) == first.bytes_checked


@pytest.mark.parametrize("workers", [1, 2])
def test_the_list_finds_the_same_damage(
    s: Setup, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    if workers > 1:
        # Worker processes for this small image, started before the image is checked.
        monkeypatch.setattr(verify_mod, "_PROCESS_MIN_COST", 0)
        monkeypatch.setattr(verify_mod, "_EARLY_IMAGE_BYTES", 0)
        monkeypatch.setattr(verify_mod, "_BATCH_COST", 1)
    assert s.verify("one", workers=workers).ok and s.scans == 1
    _flip(s.object_of(s.files["d1/f1"]), 50)
    s.object_of(s.files["d2/f2"]).unlink()
    big = s.object_of(s.files["d2/f11"])
    big.write_bytes(big.read_bytes()[:-1])
    listed = s.verify("one", workers=workers)
    assert s.scans == 0
    scanned = verify_image(s.repo, s.one, workers=workers)  # no list: scans
    assert s.scans == 1
    assert not listed.ok and _findings(listed) == _findings(scanned)
    hexes = {rel: digest_bytes(s.files[rel], "sha256").hex() for rel in s.files}
    assert listed.missing == [hexes["d2/f2"]]
    assert sorted(d for d, _ in listed.corrupt) == sorted([hexes["d1/f1"], hexes["d2/f11"]])


@pytest.mark.parametrize("damage", ["flipped", "truncated", "swapped"])
def test_image_damaged_after_listing_is_scanned(s: Setup, damage: str) -> None:
    assert s.verify("one").ok
    listed = s.list_path(s.one).read_bytes()
    image = s.repo.object_path(s.one)
    data = image.read_bytes()
    if damage == "flipped":
        _flip(image, len(data) // 2)
    elif damage == "truncated":
        image.write_bytes(data[:1000])
    else:
        image.write_bytes(s.repo.object_path(s.two).read_bytes())
    report = s.verify("one")
    assert s.scans == 1 and not report.ok
    assert any("digest mismatch" in p for p in report.image_problems)
    # The same report as without a list, and the list is not rewritten from it.
    assert _findings(report) == _findings(verify_image(s.repo, s.one))
    assert s.list_path(s.one).read_bytes() == listed


def _body(objects: list[tuple[bytes, int]], digest: str, count: int | None = None) -> bytes:
    """A list file's bytes, with a valid checksum whatever ``count`` says."""
    header = struct.pack("<8sIQ", objectlist.MAGIC, 32, len(objects) if count is None else count)
    meta = b"sha256\0" + bytes.fromhex(digest)
    body = header + meta + b"".join(b"\0" + p for p, _ in objects)
    body += b"".join(size.to_bytes(8, "little") for _, size in objects)
    return body + hashlib.sha256(body).digest()


def _hostile(s: Setup, kind: str) -> bytes | None:
    """Bytes for the list of image one; None: something other than a file put there."""
    path = s.list_path(s.one)
    good = path.read_bytes()
    listed = objectlist.load(str(s.repo.cache_dir), Algorithm.SHA256, s.one)
    assert listed is not None
    objects = list(listed.sizes.items())
    assert objects
    if kind == "flipped":
        return good[:40] + bytes([good[40] ^ 1]) + good[41:]
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "empty":
        return b""
    if kind == "other-image":
        return s.list_path(s.two).read_bytes()
    if kind == "huge-count":
        return _body(objects, s.one, count=1 << 60)
    if kind == "count-too-small":
        return _body(objects, s.one, count=len(objects) - 1)
    if kind == "duplicate":
        return _body([objects[0], *objects[1:], objects[0]], s.one)
    if kind in ("outside", "upper-case", "no-slash"):
        payload = {
            "outside": b"../../../../etc/passwd".ljust(65, b"/"),
            "upper-case": objects[0][0].upper(),
            "no-slash": objects[0][0].replace(b"/", b"0"),
        }[kind]
        assert len(payload) == len(objects[0][0])
        return _body([(payload, objects[0][1]), *objects[1:]], s.one)
    if kind == "other-magic":
        return good.replace(objectlist.MAGIC, b"cfsd-ol0", 1)
    if kind == "symlink":
        path.unlink()
        path.symlink_to(s.list_path(s.two))
        return None
    if kind == "directory":
        path.unlink()
        path.mkdir()
        return None
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "flipped",
        "truncated",
        "empty",
        "other-image",
        "huge-count",
        "count-too-small",
        "duplicate",
        "outside",
        "upper-case",
        "no-slash",
        "other-magic",
        "symlink",
    ],
)
def test_bad_list_is_ignored_and_rewritten(s: Setup, kind: str) -> None:
    first = s.verify("one")
    assert s.verify("two").ok
    good = s.list_path(s.one).read_bytes()
    data = _hostile(s, kind)
    if data is not None:
        s.list_path(s.one).write_bytes(data)
    report = s.verify("one")
    assert s.scans == 1 and _findings(report) == _findings(first)
    path = s.list_path(s.one)
    assert not path.is_symlink() and path.read_bytes() == good
    assert s.verify("one").ok and s.scans == 0


def test_list_in_the_way_is_not_an_error(s: Setup) -> None:
    assert s.verify("one").ok
    _hostile(s, "directory")
    assert s.verify("one").ok and s.scans == 1
    assert s.list_path(s.one).is_dir()  # not replaced (rename over a directory fails)


def test_oversized_list_is_not_read(s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    assert s.verify("one").ok
    monkeypatch.setattr(objectlist, "MAX_OBJECTS", 2)
    assert s.verify("one").ok and s.scans == 1
    assert s.list_path(s.one).exists()  # an image naming more than MAX_OBJECTS: not listed


def test_list_of_one_image_is_never_used_for_another(s: Setup) -> None:
    assert s.verify("one").ok
    # Image two's list file holds image one's list (its checksum valid).
    s.repo.cache_dir.joinpath(objectlist.file_name(Algorithm.SHA256, s.two)).write_bytes(
        s.list_path(s.one).read_bytes()
    )
    report = s.verify("two")
    assert s.scans == 1 and report.ok
    assert report.objects_checked == 2
    # A list naming image two inside but stored under one's name is not one's either.
    s.list_path(s.one).write_bytes(s.list_path(s.two).read_bytes())
    assert s.verify("one").ok and s.scans == 1


def test_no_list_written_for_a_read_only_caller(s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Repository, "read_only", property(lambda self: True))
    assert s.verify("one").ok and s.scans == 1
    assert s.lists() == []


def test_lists_are_bounded(s: Setup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_tree(tmp_path / "t3", {"z": b"z" * 5000})
    three = s.repo.create_image(tmp_path / "t3", ref="three").digest
    monkeypatch.setattr(objectlist, "MAX_FILES", 2)
    assert s.verify("two").ok
    assert s.verify("one").ok
    assert len(s.lists()) == 2
    s.repo.remove_image("one")
    assert s.verify("three").ok
    # Image one's list goes first (its image is gone), though two's is older.
    names = {objectlist.file_name(Algorithm.SHA256, d) for d in (s.two, three)}
    assert set(s.lists()) == names


def test_fsck_and_gc_pass_with_lists(s: Setup) -> None:
    assert s.verify("one").ok and s.verify("two").ok
    assert len(s.lists()) == 2
    assert s.repo.fsck().ok
    before = sorted(p.name for p in s.repo.cache_dir.iterdir())
    result = s.repo.gc()
    assert result.objects_removed == 0 and result.images_removed == 0
    assert sorted(p.name for p in s.repo.cache_dir.iterdir()) == before
    assert s.repo.fsck().ok
    # GC drops lists not written for 30 days, as every cache file.
    old = s.list_path(s.one)
    past = old.stat().st_mtime - 31 * 24 * 3600
    os.utime(old, (past, past))
    s.repo.gc()
    assert s.lists() == [s.list_path(s.two).name]


def test_load_rejects_what_save_would_not_write(tmp_path: Path) -> None:
    digest = "ab" * 32
    cache = str(tmp_path / "cache")
    objects = {b"%02x/%s" % (i, b"c" * 62): i * 100 for i in range(5)}
    objectlist.save(cache, Algorithm.SHA256, digest, objects)
    listed = objectlist.load(cache, Algorithm.SHA256, digest)
    assert listed is not None and listed.sizes == objects
    assert listed.paths(b"/r/objects") == [(b"/r/objects/" + p, n) for p, n in objects.items()]
    assert objectlist.load(cache, Algorithm.SHA512, digest) is None  # another file name
    assert objectlist.load(cache, Algorithm.SHA256, "cd" * 32) is None


def test_verify_loads_no_gc_or_stream_code(s: Setup) -> None:
    """Repository.open(...).verify_image(...) in a fresh interpreter imports neither GC's
    code nor the stream code (an image's Verify uses neither)."""
    probe = (
        "import sys\n"
        "from composefsd.repository import Repository\n"
        "assert Repository.open(sys.argv[1]).verify_image(sys.argv[2]).ok\n"
        "print(' '.join(m for m in sys.argv[3:] if m in sys.modules))\n"
    )
    heavy = ["composefsd.repository.gc", "composefsd.repository.streams", "composefsd.splitstream"]
    out = subprocess.run(
        [sys.executable, "-c", probe, str(s.repo.path), "one", *heavy],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.split() == []
    # ... which are still there for whoever asks for them.
    from composefsd.repository import GcResult

    assert GcResult.__module__ == "composefsd.repository.gc"


def test_cache_files_are_read_by_their_size_not_their_bound(tmp_path: Path) -> None:
    """A cache file is read as large as it is: the bound only refuses larger ones.
    Reading up to the bound would allocate it first: an object list's is GBs, a
    MemoryError in a VM of 2 GiB (found there)."""
    path = str(tmp_path / "c")
    assert cachefile.write(path, b"body")
    assert cachefile.read(path, 1 << 62) == b"body"
    with open(path, "ab") as f:
        f.write(b"grown")
    with pytest.raises(cachefile.CacheFileError):
        cachefile.read(path, 1 << 62)
    with pytest.raises(cachefile.CacheFileError):
        cachefile.read(path, 8)
