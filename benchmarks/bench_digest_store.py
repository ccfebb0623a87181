#!/usr/bin/env python3
"""Time ``mkcomposefs --digest-store`` on a large tree: C 1.0.8 against ours.

    python benchmarks/bench_digest_store.py [--tree /usr] [--copy-to /var/tmp/cfs-bench]
        [--c-bin DIR] [--rounds 2] [--threads N] [--keep]

Every round builds the image of TREE twice per implementation, each into its own
store: first into a fresh empty store (every object copied and fsync'ed), then again
onto that full store (everything hashed, nothing copied). The page cache is warmed
first by a read pass over the tree, ``sync`` runs before every timed build so that
one build's writeback does not slow the next, and the order of the two
implementations alternates between rounds. Images and store listings are checked
to be identical. Stores are deleted afterwards unless ``--keep`` is given.

Prints wall times per run and the ratios ours/C (lower is better; <= 1.0 means at
least as fast as C).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def reference_bin() -> Path:
    env = os.environ.get("COMPOSEFS_REFERENCE_BIN")
    if env:
        return Path(env)
    script = REPO.parent / "shared" / "tools" / "reference-tools"
    out = subprocess.run([str(script)], check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def warm_cache(tree: Path) -> tuple[int, int]:
    """Read every regular file once; returns (files, bytes)."""
    paths: list[str] = []
    for dirpath, _dirs, files in os.walk(tree):
        paths.extend(os.path.join(dirpath, f) for f in files)

    def read(path: str) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return 0
        total = 0
        try:
            if not os.path.isfile(f"/proc/self/fd/{fd}"):
                return 0
            while chunk := os.read(fd, 1 << 20):
                total += len(chunk)
        except OSError:
            pass
        finally:
            os.close(fd)
        return total

    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(read, paths, chunksize=256))
    return sum(1 for s in sizes if s), sum(sizes)


def timed(cmd: list[str]) -> float:
    subprocess.run(["sync"], check=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return elapsed


def listing(store: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(store):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, store)] = os.lstat(full).st_size
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path("/usr"))
    parser.add_argument("--copy-to", type=Path, default=None, help="where the stores go")
    parser.add_argument("--c-bin", type=Path, default=None, help="folder with C mkcomposefs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="--threads for both")
    parser.add_argument("--keep", action="store_true", help="keep stores and images")
    args = parser.parse_args()

    c_bin = (args.c_bin or reference_bin()) / "mkcomposefs"
    ours_cmd = [sys.executable, "-m", "composefsd.cli.mkcomposefs"]
    work = Path(tempfile.mkdtemp(prefix="cfs-bench-", dir=args.copy_to or "/var/tmp"))
    extra = [f"--threads={args.threads}"] if args.threads else []
    print(f"tree {args.tree}; stores under {work}")

    start = time.monotonic()
    files, size = warm_cache(args.tree)
    print(f"warm-up read: {files} files, {size / 1e9:.2f} GB in {time.monotonic() - start:.1f} s")

    results: dict[tuple[str, str], list[float]] = {}
    try:
        for rnd in range(args.rounds):
            order = [("C", [str(c_bin)]), ("ours", ours_cmd)]
            if rnd % 2:
                order.reverse()
            for name, cmd in order:
                store = work / f"store-{name}"
                shutil.rmtree(store, ignore_errors=True)
                image = work / f"{name}.img"
                for kind in ("fresh store", "full store"):
                    t = timed([*cmd, *extra, f"--digest-store={store}", str(args.tree), str(image)])
                    results.setdefault((name, kind), []).append(t)
                    print(f"round {rnd + 1}: {name:4} {kind}: {t:7.2f} s", flush=True)
            if (work / "C.img").read_bytes() != (work / "ours.img").read_bytes():
                sys.exit("images differ")
            c_list, our_list = listing(work / "store-C"), listing(work / "store-ours")
            if c_list != our_list:
                sys.exit(f"stores differ: {len(c_list)} vs {len(our_list)} objects")
            print(f"round {rnd + 1}: images identical; stores identical ({len(c_list)} objects)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    for kind in ("fresh store", "full store"):
        c = statistics.median(results[("C", kind)])
        ours = statistics.median(results[("ours", kind)])
        print(f"{kind:12}: C {c:7.2f} s   ours {ours:7.2f} s   ours/C {ours / c:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
