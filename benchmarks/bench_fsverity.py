#!/usr/bin/env python3
"""Time composefsd.fsverity.digest_fd against C ``fsverity digest`` on one big file.

    python benchmarks/bench_fsverity.py [--size-mib 1024] [--rounds 3] [--dir /var/tmp]

Creates a random file (deleted afterwards), reads it once so both sides hash from
the page cache, then runs C and Python alternately, best of ``--rounds`` each. The C
time is the wall time of the whole ``fsverity digest`` process, as a caller would see
it; the Python time is open + digest_fd + close in this process. CPU time is
printed beside it (C's process; our process, all its threads). Every digest is
checked against C's. Other load on the machine skews both sides; the load average is
printed so a noisy run can be recognised.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

from composefsd import fsverity

CHUNK = 16 << 20


def make_file(directory: str, size: int) -> str:
    fd, path = tempfile.mkstemp(prefix="bench-fsverity-", suffix=".bin", dir=directory)
    try:
        left = size
        while left:
            n = min(CHUNK, left)
            os.write(fd, os.urandom(n))
            left -= n
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        while f.readinto(buf):
            pass


def c_digest(path: str, alg: str) -> bytes:
    out = subprocess.run(
        ["fsverity", "digest", f"--hash-alg={alg}", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # "sha256:<hex> <path>"
    return bytes.fromhex(out.split()[0].partition(":")[2])


def py_digest(path: str, alg: str, threads: int | None) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return fsverity.digest_fd(fd, alg, threads=threads)
    finally:
        os.close(fd)


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], bytes]) -> tuple[float, float, bytes]:
    """(wall, cpu, result): cpu counts C's process or our threads, whichever ran."""
    c0 = _cpu()
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, _cpu() - c0, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--algorithms", default="sha256,sha512")
    ap.add_argument("--threads", type=int, default=None, help="digest_fd threads (default: auto)")
    args = ap.parse_args()
    if shutil.which("fsverity") is None:
        print("fsverity (fsverity-utils) not found; apt-get install fsverity", file=sys.stderr)
        return 2

    threads = args.threads if args.threads is not None else fsverity.default_threads()
    size = args.size_mib << 20
    print(f"file: {args.size_mib} MiB of random data in {args.dir}")
    print(f"cpus: {os.cpu_count()}, digest_fd threads: {threads} (and 1 for comparison)")
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    path = make_file(args.dir, size)
    try:
        warm(path)
        for alg in args.algorithms.split(","):
            variants: dict[str, Callable[[], bytes]] = {
                "fsverity digest (C)": partial(c_digest, path, alg),
                f"digest_fd threads={threads}": partial(py_digest, path, alg, threads),
            }
            if threads != 1:
                variants["digest_fd threads=1"] = partial(py_digest, path, alg, 1)
            best = dict.fromkeys(variants, float("inf"))
            best_cpu = dict.fromkeys(variants, float("inf"))
            expected: bytes | None = None
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    dt, cpu, digest = timed(fn)
                    best_cpu[name] = min(best_cpu[name], cpu)
                    if expected is None:
                        expected = digest
                    elif digest != expected:
                        print(f"{alg}: {name} gave {digest.hex()}, C gave {expected.hex()}")
                        return 1
                    best[name] = min(best[name], dt)
            c_time = best["fsverity digest (C)"]
            c_cpu = best_cpu["fsverity digest (C)"]
            print(f"{alg}: digest {expected.hex() if expected else '?'}")
            for name, dt in best.items():
                rate = size / dt / (1 << 20)
                cpu = best_cpu[name]
                print(
                    f"  {name:<24} {dt:7.3f} s wall {rate:7.0f} MiB/s  ours/C {dt / c_time:5.2f}"
                    f"  | {cpu:7.3f} s cpu  ours/C {cpu / c_cpu:5.2f}"
                )
        print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    finally:
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
