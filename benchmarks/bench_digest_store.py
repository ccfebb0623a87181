#!/usr/bin/env python3
"""Time ``mkcomposefs --digest-store`` on a large tree: C 1.0.8 against ours.

    python benchmarks/bench_digest_store.py [--tree /usr] [--copy-to /var/tmp]
        [--c-bin DIR] [--rounds 3] [--threads N] [--keep]

Every round builds the image of TREE twice per implementation, each into its own
new store: first into a fresh empty store (every object copied and fsync'ed), then
again onto that full store (everything hashed, nothing copied). The page cache is
warmed first by a read pass over the tree; ``sync`` runs before every timed build so
that one build's writeback does not slow the next; the order of the two
implementations alternates between rounds; and stores are only deleted at the end
(deleting gigabytes with online discard slows whatever runs next). Images and
store listings are checked to be identical.

Prints wall, user and system times per run (children included: our hashing worker
processes) and, per kind of run, the best and the median of each side and their
ratios ours/C (lower is better; <= 1.0 means at least as fast as C). Other load on
the machine skews single runs a lot; the load average is printed with each run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import reference_bin, warm_cache

KINDS = ("fresh store", "full store")


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall, user, system) seconds of one run, its child processes included."""
    subprocess.run(["sync"], check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True)
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return elapsed, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def listing(store: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(store):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, store)] = os.lstat(full).st_size
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path("/usr"))
    parser.add_argument("--copy-to", type=Path, default=Path("/var/tmp"), help="where stores go")
    parser.add_argument("--c-bin", type=Path, default=None, help="folder with C mkcomposefs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="--threads for both")
    parser.add_argument("--keep", action="store_true", help="keep stores and images")
    args = parser.parse_args()

    c_bin = (args.c_bin or reference_bin()) / "mkcomposefs"
    commands = {
        "C": [str(c_bin)],
        "ours": [sys.executable, "-m", "composefsd.cli.mkcomposefs"],
    }
    work = Path(tempfile.mkdtemp(prefix="cfs-bench-", dir=args.copy_to))
    extra = [f"--threads={args.threads}"] if args.threads else []
    print(f"tree {args.tree}; stores under {work}")

    start = time.monotonic()
    files, size = warm_cache(args.tree)
    print(f"warm-up read: {files} files, {size / 1e9:.2f} GB in {time.monotonic() - start:.1f} s")

    results: dict[tuple[str, str], list[float]] = {}
    try:
        for rnd in range(1, args.rounds + 1):
            order = ["C", "ours"] if rnd % 2 else ["ours", "C"]
            for name in order:
                store = work / f"store-{name}-{rnd}"
                image = work / f"{name}-{rnd}.img"
                for kind in KINDS:
                    cmd = [*commands[name], *extra, f"--digest-store={store}", str(args.tree)]
                    wall, user, system = timed([*cmd, str(image)])
                    results.setdefault((name, kind), []).append(wall)
                    print(
                        f"round {rnd}: {name:4} {kind}: {wall:7.2f} s wall"
                        f" ({user:6.2f} user {system:6.2f} sys; load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
            if (work / f"C-{rnd}.img").read_bytes() != (work / f"ours-{rnd}.img").read_bytes():
                sys.exit("images differ")
            c_list = listing(work / f"store-C-{rnd}")
            if c_list != listing(work / f"store-ours-{rnd}"):
                sys.exit("stores differ")
            print(f"round {rnd}: images identical; stores identical ({len(c_list)} objects)")
    finally:
        if not args.keep:
            print(f"removing {work}", flush=True)
            shutil.rmtree(work, ignore_errors=True)

    print()
    for kind in KINDS:
        c, ours = results[("C", kind)], results[("ours", kind)]
        best_c, best_ours = min(c), min(ours)
        med_c, med_ours = statistics.median(c), statistics.median(ours)
        print(
            f"{kind:11}: best C {best_c:6.2f} s, ours {best_ours:6.2f} s, ours/C"
            f" {best_ours / best_c:4.2f} | median C {med_c:6.2f} s, ours {med_ours:6.2f} s,"
            f" ours/C {med_ours / med_c:4.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
