#!/usr/bin/env python3
"""Dumpfile -> image and back: our ``mkcomposefs --from-file`` and ``composefs-info dump``
against C composefs 1.0.8's, same run.

    python benchmarks/bench_dump_to_image.py [--tree /usr | --dump FILE] [--rounds 3]

Without ``--dump``, the input is made the way the issue describes: C mkcomposefs
builds an image of ``--tree`` (default /usr, about 137,000 entries here) and C
``composefs-info dump`` turns it into a dumpfile (kept in ``--work`` for re-runs).
Both tools then turn that dumpfile into an image, alternately, best of
``--rounds``; both are whole processes, timed by wall clock, so interpreter start-up
counts against us. The images must be byte-identical. Peak memory (max RSS) of our
process is printed beside the limit (1 GiB). Then both ``composefs-info dump``
read the image back (the reader of Verify, fsck and Mount), best of ``--rounds``;
the dumps must be identical.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import reference_bin

MEMORY_LIMIT = 1 << 30


def our_tool(name: str, module: str) -> list[str]:
    script = shutil.which(name, path=str(Path(sys.executable).parent))
    if script:
        return [script]
    return [sys.executable, "-m", module]


def run(cmd: list[str], stdout: int | None = subprocess.DEVNULL) -> tuple[float, int]:
    """Wall time and max RSS (bytes) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed with exit status {proc.returncode}")
    return elapsed, usage.ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tree", default="/usr", help="directory to build the input dump from")
    ap.add_argument("--dump", help="use this dumpfile instead of building one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/composefsd-bench", help="scratch directory")
    args = ap.parse_args()

    ref = reference_bin()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.dump:
        dump = Path(args.dump)
    else:
        dump = work / ("tree-" + args.tree.strip("/").replace("/", "_") + ".dump")
        if not dump.exists():
            print(f"building the input: C mkcomposefs {args.tree}, then C composefs-info dump")
            image = work / "input.cfs"
            subprocess.run([str(ref / "mkcomposefs"), args.tree, str(image)], check=True)
            with open(dump, "wb") as out:
                subprocess.run(
                    [str(ref / "composefs-info"), "dump", str(image)], stdout=out, check=True
                )
            image.unlink()
    with open(dump, "rb") as f:
        entries = sum(1 for _ in f)
    print(f"input: {dump} ({entries} entries, {dump.stat().st_size / 1e6:.1f} MB)")

    c_out, py_out = work / "c.cfs", work / "py.cfs"
    c_cmd = [str(ref / "mkcomposefs"), "--from-file", str(dump), str(c_out)]
    py_cmd = [*our_tool("mkcomposefs", "composefsd.cli.mkcomposefs"), "--from-file"]
    py_cmd += [str(dump), str(py_out)]
    c_times, py_times, py_rss = [], [], 0
    for _ in range(args.rounds):
        t, _rss = run(c_cmd)
        c_times.append(t)
        t, rss = run(py_cmd)
        py_times.append(t)
        py_rss = max(py_rss, rss)
    identical = c_out.read_bytes() == py_out.read_bytes()

    # Reading it back: both tools dump the same image (C's) to a file.
    c_dump, py_dump = work / "c.dump", work / "py.dump"
    read_times: dict[str, list[float]] = {"c": [], "py": []}
    for _ in range(args.rounds):
        for who, tool, out_path in (
            ("c", [str(ref / "composefs-info")], c_dump),
            ("py", our_tool("composefs-info", "composefsd.cli.info"), py_dump),
        ):
            with open(out_path, "wb") as out:
                t, _rss = run([*tool, "dump", str(c_out)], stdout=out.fileno())
            read_times[who].append(t)
    dumps_identical = c_dump.read_bytes() == py_dump.read_bytes()
    for path in (c_out, py_out, c_dump, py_dump):
        path.unlink()

    c_best, py_best = min(c_times), min(py_times)
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(f"C mkcomposefs --from-file:      {c_best:.3f} s (best of {args.rounds})")
    print(f"composefsd mkcomposefs --from-file: {py_best:.3f} s (best of {args.rounds})")
    print(f"ratio ours/C: {py_best / c_best:.2f}x (target <= 2x)")
    print(f"peak memory (ours): {py_rss / 2**20:.0f} MiB (limit {MEMORY_LIMIT >> 20} MiB)")
    print(f"images identical: {identical}")
    c_read, py_read = min(read_times["c"]), min(read_times["py"])
    print(f"C composefs-info dump:          {c_read:.3f} s (best of {args.rounds})")
    print(f"composefsd composefs-info dump: {py_read:.3f} s (best of {args.rounds})")
    print(f"ratio ours/C (reading): {py_read / c_read:.2f}x")
    print(f"dumps identical: {dumps_identical}")
    return 0 if identical and dumps_identical and py_rss < MEMORY_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
