"""Many writers and a GC loop on one repository at the same time.

Ten writer processes import overlapping trees over and over (shared files, so
that several processes publish the same objects at once; files rewritten between
rounds, so that every round writes new objects; some images without a ref and refs
re-pointed, so that every GC finds garbage), while another process collects garbage
in a loop and verifies a ref'd image between collections. Afterwards fsck is clean,
every surviving image verifies, and every writer's ref names its last image. The
same is done with threads of one process.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from composefsd.repository import CreateOptions, Repository

WRITERS = 10
ROUNDS = 20
SEED = 4242

WRITER = r"""
import json, random, sys
from pathlib import Path
from composefsd.repository import CreateOptions, Repository

repo_path, tree, index, rounds, seed = sys.argv[1:6]
index, rounds = int(index), int(rounds)
rng = random.Random(int(seed))
tree = Path(tree)
repo = Repository.open(repo_path)
mine = sorted(p for p in tree.rglob("own-*"))
for r in range(rounds):
    for p in rng.sample(mine, 3):
        p.write_bytes(rng.randbytes(rng.choice([100, 5000, 40000])))
    # Most rounds re-point the writer's ref; some leave an unreferenced image behind.
    ref = f"writer{index}" if r % 2 == 0 or r == rounds - 1 else None
    res = repo.create_image(tree, ref=ref, options=CreateOptions(threads=2))
    print(json.dumps({"round": r, "ref": ref, "digest": res.digest,
                      "written": res.objects_written, "reused": res.objects_reused}), flush=True)
"""

COLLECTOR = r"""
import json, os, random, sys, time
from composefsd.repository import ImageNotFoundError, Repository

repo_path, stop, seed = sys.argv[1:4]
rng = random.Random(int(seed))
repo = Repository.open(repo_path)
runs = removed = images = verified = 0
failures = []
while not os.path.exists(stop):
    res = repo.gc(dry_run=rng.random() < 0.2)
    runs += 1
    if not res.dry_run:
        removed += res.objects_removed
        images += res.images_removed
    refs = [r for e in repo.list_images() for r in e.refs]
    if refs:
        name = rng.choice(refs)
        try:
            report = repo.verify_image(name)
        except ImageNotFoundError:
            report = None  # the ref moved on between listing and verifying
        if report is not None:
            verified += 1
            if not report.ok:
                failures.append([name, report.image_problems, report.missing, report.corrupt])
    time.sleep(rng.random() * 0.05)
print(json.dumps({"runs": runs, "removed": removed, "images": images,
                  "verified": verified, "failures": failures}), flush=True)
"""


def _make_trees(base: Path, count: int) -> list[Path]:
    rng = random.Random(SEED)
    shared = {
        f"shared-{i}": rng.randbytes(rng.choice([70, 3000, 20000, 300_000])) for i in range(20)
    }
    trees = []
    for w in range(count):
        tree = base / f"tree{w}"
        for name, data in shared.items():
            if rng.random() < 0.7:  # overlapping, not identical, trees
                p = tree / f"d{len(name) % 3}" / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
        for i in range(12):
            p = tree / f"d{i % 3}" / f"own-{i}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rng.randbytes(rng.choice([10, 100, 5000, 40000])))
        (tree / "link").symlink_to("d0")
        trees.append(tree)
    return trees


def _check_clean(repo: Repository) -> int:
    report = repo.fsck()
    assert report.ok, [str(p) for p in report.problems]
    images = repo.list_images()
    for entry in images:
        result = repo.verify_image(entry.digest)
        assert result.ok, (entry.digest, result)
    return len(images)


def test_writer_processes_with_gc_loop(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    trees = _make_trees(tmp_path, WRITERS)
    stop = tmp_path / "stop"
    start = time.monotonic()
    collector = subprocess.Popen(
        [sys.executable, "-c", COLLECTOR, str(repo.path), str(stop), str(SEED)],
        stdout=subprocess.PIPE,
        text=True,
    )
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(repo.path), str(tree), str(i), str(ROUNDS), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, tree in enumerate(trees)
    ]
    outputs = []
    try:
        for w in writers:
            out, err = w.communicate(timeout=120)
            assert w.returncode == 0, err
            outputs.append([json.loads(line) for line in out.splitlines()])
    finally:
        stop.touch()
        gc_out, _ = collector.communicate(timeout=60)
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert collector.returncode == 0
    gc_stats = json.loads(gc_out.strip().splitlines()[-1])
    elapsed = time.monotonic() - start
    print(f"{WRITERS} writers x {ROUNDS} rounds in {elapsed:.1f} s; gc: {gc_stats}")

    assert gc_stats["failures"] == []
    assert gc_stats["runs"] >= 3 and gc_stats["verified"] >= 1
    assert gc_stats["images"] >= 1, gc_stats  # it did collect while writers were running
    # Every writer's ref names its last image.
    for i, rounds in enumerate(outputs):
        assert len(rounds) == ROUNDS
        assert repo.resolve_image(f"writer{i}") == rounds[-1]["digest"]
    # Concurrent writers of the same objects: each object was written once.
    assert sum(r["written"] for rounds in outputs for r in rounds) > 0
    assert _check_clean(repo) >= WRITERS
    repo.gc()
    assert _check_clean(repo) == WRITERS


def test_writer_threads_with_gc_thread(tmp_path: Path) -> None:
    """Threads of one process: each operation opens its own lock fds."""
    repo = Repository.init(tmp_path / "repo")
    trees = _make_trees(tmp_path, 4)
    done = threading.Event()
    errors: list[BaseException] = []
    digests: dict[int, str] = {}
    collected = [0]

    def writer(i: int) -> None:
        try:
            for r in range(3):
                own = sorted(trees[i].rglob("own-*"))[r]
                own.write_bytes(random.randbytes(7000))
                digests[i] = repo.create_image(
                    trees[i], ref=f"t{i}", options=CreateOptions(threads=1)
                ).digest
        except BaseException as exc:
            errors.append(exc)

    def collector() -> None:
        try:
            while not done.is_set():
                collected[0] += repo.gc().images_removed + 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    gc_thread = threading.Thread(target=collector)
    gc_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    gc_thread.join(60)
    assert errors == []
    assert collected[0] >= 1
    for i, digest in digests.items():
        assert repo.resolve_image(f"t{i}") == digest
    repo.gc()
    assert _check_clean(repo) == 4
