"""Garbage collection and the lock discipline.

GC removes exactly what no ref or pin reaches (objects, unreferenced images, dangling
links, leftover temporary files), keeps everything reachable, reports the same counts
in a dry run without changing anything, and refuses to run when it cannot know what
is reachable. The locks let writers run together, make GC wait only for the writers
already running (new ones queue behind it), and time out or refuse instead of
deadlocking.
"""

from __future__ import annotations

import fcntl
import os
import random
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from composefsd.fsverity import digest_bytes
from composefsd.repository import (
    CorruptRepositoryError,
    ImageNotFoundError,
    Progress,
    Repository,
    RepositoryBusyError,
    RepositoryError,
    gc_lock,
    reader_lock,
    writer_lock,
)
from trees import write_tree


def _hex(data: bytes) -> str:
    return digest_bytes(data).hex()


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out: dict[str, tuple[int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            data = os.readlink(p).encode() if stat.S_ISLNK(st.st_mode) else b""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, data)
    return out


@dataclass
class Setup:
    repo: Repository
    a: str
    b: str
    c: str
    d: str
    data: dict[str, bytes]
    garbage_objects: dict[str, int]  # repo-relative path -> size
    dangling: list[str]


def _setup(tmp_path: Path) -> Setup:
    rng = random.Random(7)
    data = {
        name: rng.randbytes(size)
        for name, size in [
            ("a1", 5000),
            ("s", 70_000),
            ("b1", 3000),
            ("c1", 9000),
            ("d1", 12_000),
            ("tiny", 10),
        ]
    }
    repo = Repository.init(tmp_path / "repo")
    trees = {
        "A": {"a1": data["a1"], "dir/s": data["s"], "tiny": data["tiny"]},
        "B": {"s": data["s"], "b1": data["b1"]},
        "C": {"s": data["s"], "c1": data["c1"]},
        "D": {"d1": data["d1"]},
    }
    for name, files in trees.items():
        write_tree(tmp_path / name, files)
    a = repo.create_image(tmp_path / "A", ref="a").digest
    b = repo.create_image(tmp_path / "B", ref="group/b").digest
    c = repo.create_image(tmp_path / "C").digest  # no ref: garbage
    d = repo.create_image(tmp_path / "D", ref="d").digest
    repo.remove_ref("d")  # kept only by a pin
    garbage: dict[str, int] = {}
    c_obj = repo.object_path(c)
    garbage[str(c_obj.relative_to(repo.path))] = c_obj.stat().st_size
    garbage[f"objects/{_hex(data['c1'])[:2]}/{_hex(data['c1'])[2:]}"] = len(data["c1"])
    with repo.object_store() as store:
        orphan = store.store_bytes(b"orphan" * 1000)
    garbage[f"objects/{orphan.digest[:2]}/{orphan.digest[2:]}"] = 6000
    (repo.objects_dir / ".tmp-object-killed").write_bytes(b"x" * 123)
    garbage["objects/.tmp-object-killed"] = 123
    # Dangling links: a ref to a missing image, an image link to a missing object, and
    # a temporary link a killed writer left.
    missing = "ab" * 32
    (repo.refs_dir / "stale").symlink_to(f"../{missing}")
    (repo.images_dir / missing).symlink_to(f"../objects/ab/{'ab' * 31}")
    (repo.images_dir / ".symlink-killed0000").symlink_to(f"../{a}")
    dangling = ["images/refs/stale", f"images/{missing}", "images/.symlink-killed0000"]
    return Setup(repo, a, b, c, d, data, garbage, dangling)


def test_gc_removes_exactly_the_unreachable(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    repo = s.repo
    before = _snapshot(repo.path)
    seen: list[Progress] = []
    dry = repo.gc(pins=[s.d], dry_run=True, progress=seen.append)
    assert _snapshot(repo.path) == before  # a dry run changes nothing
    assert {p.phase for p in seen} >= {"roots", "mark", "sweep"}
    assert dry.dry_run
    assert (dry.objects_removed, dry.bytes_removed) == (
        len(s.garbage_objects),
        sum(s.garbage_objects.values()),
    )
    assert (dry.images_removed, dry.links_removed) == (1, len(s.dangling))

    real = repo.gc(pins=[s.d])
    assert not real.dry_run
    assert (real.objects_removed, real.bytes_removed, real.images_removed, real.links_removed) == (
        dry.objects_removed,
        dry.bytes_removed,
        dry.images_removed,
        dry.links_removed,
    )
    after = _snapshot(repo.path)
    removed = set(before) - set(after)
    assert removed == set(s.garbage_objects) | set(s.dangling) | {f"images/{s.c}"}
    assert real.images_kept == 3  # a, b, and the pinned d
    for name in ("a", "group/b"):
        assert repo.verify_image(name).ok
    assert repo.verify_image(s.d).ok
    assert repo.fsck().ok
    assert sorted(e.digest for e in repo.list_images()) == sorted([s.a, s.b, s.d])

    # Nothing left to collect; without the pin, d goes.
    again = repo.gc(pins=[s.d])
    assert (again.objects_removed, again.images_removed, again.links_removed) == (0, 0, 0)
    d_size = repo.object_path(s.d).stat().st_size
    last = repo.gc()
    assert (last.images_removed, last.objects_removed) == (1, 2)  # d's link; d1 and d's image
    assert last.bytes_removed == len(s.data["d1"]) + d_size
    assert repo.fsck().ok
    assert sorted(e.digest for e in repo.list_images()) == sorted([s.a, s.b])


def test_gc_prunes_old_digest_caches(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    cache = s.repo.cache_dir
    cache.mkdir(exist_ok=True)
    for name in ("digests-sha256-fresh", "digests-sha256-old", ".tmp-cache-killed"):
        (cache / name).write_bytes(b"x")
    old = time.time() - 31 * 24 * 3600
    os.utime(cache / "digests-sha256-old", (old, old))
    s.repo.gc(dry_run=True)
    assert len(list(cache.iterdir())) == 3
    s.repo.gc(pins=[s.d])
    assert [p.name for p in cache.iterdir()] == ["digests-sha256-fresh"]


def test_gc_pins(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    repo = s.repo
    before = _snapshot(repo.path)
    with pytest.raises(ImageNotFoundError):
        repo.gc(pins=["no-such-ref"])
    assert _snapshot(repo.path) == before
    # A pin by ref or prefixed digest; a pin of a removed image keeps its objects
    # (it may still be mounted).
    repo.remove_image(s.a)
    repo.gc(pins=["group/b", f"sha256:{s.a}", s.d])
    for digest in (s.a, s.d):
        assert repo.object_path(digest).exists()
    for name in ("a1", "s", "tiny", "d1"):
        if len(s.data[name]) > 64:
            assert repo.object_path(_hex(s.data[name])).exists()
    assert not repo.object_path(_hex(s.data["c1"])).exists()
    assert not (repo.images_dir / s.a).exists()  # its link stays removed
    repo.gc(pins=["0" * 64])  # a pin of which nothing exists keeps nothing
    assert not repo.object_path(s.a).exists()
    assert repo.fsck().ok


def test_gc_refuses_when_reachability_is_unknown(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    repo = s.repo
    image = repo.object_path(s.b)
    original = image.read_bytes()
    image.chmod(0o644)
    image.write_bytes(b"\0" * len(original))  # no longer parses
    before = _snapshot(repo.path)
    with pytest.raises(RepositoryError, match=r"does not parse.*refusing"):
        repo.gc()
    assert _snapshot(repo.path) == before
    image.write_bytes(original)
    # composefs-rs splitstreams: a stream a ref names that cannot be read stops GC
    # too (tests/test_fsck_streams.py has the damage cases on cfsctl's repositories).
    (repo.path / "streams" / "refs").mkdir(parents=True)
    repo.gc(dry_run=True)  # an empty streams/ is fine
    bogus = repo.objects_dir / "00" / ("0" * 62)
    bogus.parent.mkdir(exist_ok=True)
    bogus.write_bytes(b"not a splitstream")
    (repo.path / "streams" / "oci-config-sha256:00").symlink_to("../objects/00/" + "0" * 62)
    (repo.path / "streams" / "refs" / "tag").symlink_to("../oci-config-sha256:00")
    before = _snapshot(repo.path)
    with pytest.raises(CorruptRepositoryError, match="refusing to collect garbage"):
        repo.gc()
    assert _snapshot(repo.path) == before


# -- locks ------------------------------------------------------------------------------------


def test_gc_waits_for_running_writers_and_new_writers_queue_behind_it(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    events: list[str] = []
    release_w1 = threading.Event()
    w1_in = threading.Event()

    def writer1() -> None:
        with writer_lock(repo.path):
            events.append("w1 in")
            w1_in.set()
            release_w1.wait(10)
            events.append("w1 out")

    def gc() -> None:
        with gc_lock(repo.path):
            events.append("gc in")
            time.sleep(0.2)
            events.append("gc out")

    def writer2() -> None:
        with writer_lock(repo.path):
            events.append("w2 in")

    t1 = threading.Thread(target=writer1)
    t1.start()
    assert w1_in.wait(10)
    tg = threading.Thread(target=gc)
    tg.start()
    time.sleep(0.3)  # gc now waits for w1, holding the turnstile
    t2 = threading.Thread(target=writer2)
    t2.start()
    time.sleep(0.3)
    assert events == ["w1 in"]  # neither gc nor the new writer got in
    # Readers also queue behind the waiting gc, and shared holders overlap freely.
    release_w1.set()
    for t in (t1, tg, t2):
        t.join(10)
    assert events == ["w1 in", "w1 out", "gc in", "gc out", "w2 in"]


def test_writers_share_and_locks_are_reentrant(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    inside = threading.Barrier(4, timeout=10)

    def writer() -> None:
        with writer_lock(repo.path):
            inside.wait()  # all four hold the shared lock at once

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    with reader_lock(repo.path), writer_lock(repo.path), reader_lock(repo.path):
        inside.wait()
        # gc from a thread that holds a lock would wait for itself.
        with pytest.raises(RepositoryError, match="holds a lock"), gc_lock(repo.path):
            pass
    for t in threads:
        t.join(10)
    with gc_lock(repo.path), reader_lock(repo.path):  # gc may list its own repository
        pass


def test_gc_timeout_releases_the_turnstile(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    held = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with writer_lock(repo.path):
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    assert held.wait(10)
    start = time.monotonic()
    with pytest.raises(RepositoryBusyError, match="timed out"):
        repo.gc(timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 5
    # The turnstile is free again: a new writer gets in at once.
    got = threading.Event()

    def writer2() -> None:
        with writer_lock(repo.path):
            got.set()

    t2 = threading.Thread(target=writer2)
    t2.start()
    assert got.wait(2)
    release.set()
    t.join(10)
    t2.join(10)
    assert repo.gc(timeout=5).objects_removed == 0


def test_gc_excludes_other_processes_and_cfsctl(tmp_path: Path) -> None:
    """A writer in another process, and a composefs-rs process (which holds LOCK_SH on
    the repository directory while it has the repository open), keep GC out."""
    repo = Repository.init(tmp_path / "repo")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from composefsd.repository import writer_lock\n"
            "with writer_lock(sys.argv[1]):\n"
            "    print('held', flush=True); time.sleep(30)\n",
            str(repo.path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(RepositoryBusyError):
            repo.gc(timeout=0.2)
    finally:
        holder.kill()
        holder.wait()
    fd = os.open(repo.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what cfsctl's Repository::open_path does
        with pytest.raises(RepositoryBusyError):
            repo.gc(timeout=0.2)
    finally:
        os.close(fd)
    assert repo.gc(timeout=5).dry_run is False
