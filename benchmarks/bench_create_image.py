#!/usr/bin/env python3
"""Time CreateImage on a large tree against C ``mkcomposefs --digest-store``:
the first import, and the re-import of the unchanged tree (issue 16, goal 5).

    python benchmarks/bench_create_image.py [--tree /usr] [--workdir /var/tmp]
        [--c-bin DIR] [--threads N] [--strategy hash-first|hashing-copy]
        [--durability batch|each] [--rounds 3] [--reuse DIR] [--skip-c] [--keep]

In one run, on the same tree:

1. C ``mkcomposefs --digest-store=STORE TREE IMAGE`` into a fresh store (every
   object copied and fsync'ed);
2. our CreateImage into a fresh repository (every object copied, made durable
   before the image is published);
3. ``--rounds`` times, alternating which goes first: C again onto its now full
   store (C's full import: every file read and hashed, nothing copied), and our
   CreateImage again on the unchanged tree into the same repository (the
   re-import: files whose digest cache entry holds are not read).

Ours runs in a child process through the library, interpreter start included, as
C's does. The page cache is warmed first by reading the tree, and ``sync`` runs
before each timed build so that one build's writeback does not slow the next.
The image bytes and the object sets of C and ours are checked to be identical
(the repository also holds the image itself as an object). Everything under
WORKDIR is deleted at the end unless ``--keep``; ``--reuse DIR`` works in DIR and
skips the first imports whose store is already there (for repeated runs).

Prints wall, user and system seconds of each build (children included), the best
and median of the repeated ones, the ratios ours/C of the first imports (target
<= 1.0) and of our re-import to C's full import (target <= 0.25), and the load
average, since other jobs on the machine skew single runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import reference_bin, warm_cache
from composefsd.kernel.files import clone_file

CHILD = r"""
import json, sys, time
from composefsd.repository import CreateOptions, Repository
path, tree, strategy, durability, threads, init = sys.argv[1:7]
Repository.hashing_copy = strategy == "hashing-copy"
Repository.fsync_each = durability == "each"
t0 = time.perf_counter()
repo = Repository.init(path) if init == "1" else Repository.open(path)
# A version range asks for C mkcomposefs's image, which the run compares with C's.
options = CreateOptions(threads=int(threads) if threads != "0" else None, min_version=0)
result = repo.create_image(tree, ref="bench", options=options)
out = {
    "seconds": time.perf_counter() - t0,
    "digest": result.digest,
    "files": result.files,
    "objects_written": result.objects_written,
    "objects_reused": result.objects_reused,
    "bytes_written": result.bytes_written,
    "bytes_total": result.bytes_total,
    "entries": result.entries,
}
print(json.dumps(out))
"""


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fs_facts(workdir: Path) -> str:
    fstype = "?"
    best = ""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            mnt = parts[1]
            if str(workdir).startswith(mnt) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    with (
        tempfile.NamedTemporaryFile(dir=workdir) as a,
        tempfile.NamedTemporaryFile(dir=workdir) as b,
    ):
        a.write(b"x" * 8192)
        a.flush()
        try:
            clone_file(a.fileno(), b.fileno())
            reflink = "yes"
        except OSError as exc:
            reflink = f"no ({exc.strerror})"
        try:
            os.copy_file_range(a.fileno(), b.fileno(), 8192, 0, 0)
            cfr = "yes"
        except OSError as exc:
            cfr = f"no ({exc.strerror})"
    return f"{fstype} on {best}; reflink: {reflink}; copy_file_range: {cfr}"


def timed(cmd: list[str]) -> tuple[float, float, float, str]:
    """(wall, user, system, stdout) of one run, child processes included."""
    subprocess.run(["sync"], check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, proc.stdout


def object_set(store: Path) -> set[str]:
    out: set[str] = set()
    for sub in os.scandir(store):
        if sub.is_dir(follow_symlinks=False) and len(sub.name) == 2:
            out.update(f"{sub.name}/{e.name}" for e in os.scandir(sub.path))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tree", type=Path, default=Path("/usr"))
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--c-bin", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=0, help="0: one per CPU (both sides)")
    ap.add_argument("--strategy", choices=("hash-first", "hashing-copy"), default="hash-first")
    ap.add_argument("--durability", choices=("batch", "each"), default="batch")
    ap.add_argument("--rounds", type=int, default=3, help="re-imports (and C full imports)")
    ap.add_argument("--reuse", type=Path, default=None, help="work in this directory, kept")
    ap.add_argument("--skip-c", action="store_true", help="time ours only")
    ap.add_argument("--keep", action="store_true", help="keep the stores and images")
    args = ap.parse_args()

    if args.reuse is not None:
        work = args.reuse
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="cfs-create-bench-", dir=args.workdir))
    print(f"tree {args.tree}; work dir {work}: {fs_facts(work)}")
    print(f"CPUs {len(os.sched_getaffinity(0))}; load average {load()}")
    t0 = time.perf_counter()
    files, nbytes = warm_cache(args.tree)
    took = time.perf_counter() - t0
    print(f"page cache warmed: {files} files, {nbytes / 1e9:.2f} GB in {took:.1f} s")
    results: dict[str, list[tuple[float, float, float]]] = {}

    def run(kind: str, cmd: list[str]) -> str:
        print(f"{kind}: ... (load {load()})", flush=True)
        wall, user, system, out = timed(cmd)
        results.setdefault(kind, []).append((wall, user, system))
        print(f"  {wall:8.2f} s wall {user:8.2f} s user {system:8.2f} s sys", flush=True)
        return out

    c_image = work / "c.img"
    c_store = work / "c-store"
    repo_path = work / "repo"
    mkcomposefs = str((args.c_bin or reference_bin()) / "mkcomposefs")
    c_cmd = [mkcomposefs, f"--digest-store={c_store}", str(args.tree), str(c_image)]
    if args.threads:
        c_cmd.insert(1, f"--threads={args.threads}")
    child = [
        sys.executable,
        "-c",
        CHILD,
        str(repo_path),
        str(args.tree),
        args.strategy,
        args.durability,
        str(args.threads),
    ]
    info: dict[str, Any] = {}

    def ours(kind: str, init: str) -> None:
        nonlocal info
        info = json.loads(run(kind, [*child, init]).strip().splitlines()[-1])
        print(
            f"  {info['entries']} entries, {info['files']} files, "
            f"{info['objects_written']} objects written, {info['objects_reused']} reused, "
            f"{int(info['bytes_written']) / 1e9:.2f} GB written",
            flush=True,
        )

    try:
        if not args.skip_c and not c_store.exists():
            run("C first", c_cmd)
        if not repo_path.exists():
            ours("ours first", "1")
        for rnd in range(args.rounds):
            order = ("C", "ours") if rnd % 2 == 0 else ("ours", "C")
            for side in order:
                if side == "ours":
                    ours("ours rerun", "0")
                elif not args.skip_c:
                    run("C full store", c_cmd)
        if not args.skip_c:
            digest = str(info["digest"])
            ours_image = (repo_path / "images" / digest).read_bytes()
            same_image = ours_image == c_image.read_bytes()
            ours_objects = object_set(repo_path / "objects") - {f"{digest[:2]}/{digest[2:]}"}
            same_objects = ours_objects == object_set(c_store)
            print(f"image identical to C's: {same_image}; object set identical: {same_objects}")
            if not (same_image and same_objects):
                return 1
    finally:
        if args.keep or args.reuse is not None:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'run':13} {'runs':>4} {'best wall':>10} {'median wall':>12} {'median cpu':>11}")
    best: dict[str, float] = {}
    for kind, runs in results.items():
        walls = [r[0] for r in runs]
        best[kind] = min(walls)
        cpu = statistics.median(r[1] + r[2] for r in runs)
        print(
            f"{kind:13} {len(runs):4} {min(walls):10.2f} {statistics.median(walls):12.2f}"
            f" {cpu:11.2f}"
        )
    if "C first" in best and "ours first" in best:
        print(f"ours first / C first:          {best['ours first'] / best['C first']:.2f}")
    if "C full store" in best and "ours rerun" in best:
        c_runs = [r[0] for r in results["C full store"]]
        o_runs = [r[0] for r in results["ours rerun"]]
        print(
            f"ours re-import / C full import: best {best['ours rerun'] / best['C full store']:.2f},"
            f" median {statistics.median(o_runs) / statistics.median(c_runs):.2f}"
            f"  (target <= 0.25)"
        )
    print(f"load average at the end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
