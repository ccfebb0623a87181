#!/usr/bin/env python3
"""Time mount + unmount cycles of one small image against C ``mount.composefs``.

    python benchmarks/bench_mount.py [--cycles 100] [--rounds 3] [--files 300]
        [--image IMAGE] [--workdir /var/tmp] [--c-bin DIR] [--no-compile]

Builds a tree of ``--files`` small files in a few directories and its image with C
``mkcomposefs --digest-store``, then per round runs ``--cycles`` cycles of each:

* C: ``mount.composefs -o basedir=OBJS IMAGE MNT`` and ``umount MNT``, as processes;
* ours (a), the same shape: our ``mount.composefs`` process (the console script
  next to this interpreter, else ``python -m composefsd.cli.mountcomposefs``) and
  the same ``umount`` process;
* ours (b), what the daemon does, in this process: ``mount_image`` + ``attach``
  + ``unmount``.

With ``--image`` (a /usr-sized image, say ``mkcomposefs /usr usr.cfs``), that image
is mounted instead, over an empty object directory (no file's data is read), and
each mount is checked by its root listing.

The floors of ours (a) (goal: <= 2.0x C's cycle) run in turn with them: an
interpreter start (``python -I -S -c pass``, the venv's and /usr/bin/python3; and
the venv's ``python -c pass`` with the site hooks, as our console script starts)
and the same ``umount`` (of a mount C's ``mount.composefs`` made, not timed). The sides take
turns cycle by cycle. Prints per round the median time per cycle of each (and
its mount and unmount parts) and the ratios ours/C; then the medians over every
cycle, and each floor against the goal: reachable, or the goal is below the
interpreter's own start. Then, to show where a process's time goes, the cost of a
bare interpreter start, of one with the site hooks, and of importing
``composefsd.kernel.mount`` and the command module.

Unless ``--no-compile``, the package is byte-compiled first (an installed package
has its ``.pyc`` files; an editable one under ``PYTHONDONTWRITEBYTECODE=1`` would
compile every module at each start). Every mount is checked once for a file's
content, and everything is unmounted and deleted at the end. The load average is
printed, since other jobs on the machine skew single runs.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import composefsd
from _common import floor_verdict, interpreter_starts, reference_bin
from composefsd.kernel.mount import MountOptions, attach, mount_image, unmount
from composefsd.kernel.syscalls import MNT_DETACH, KernelError, umount2


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_tree(root: Path, files: int) -> None:
    for i in range(files):
        d = root / f"d{i % 16:02d}"
        d.mkdir(parents=True, exist_ok=True)
        # Sizes on both sides of the 64-byte inline limit: most become objects.
        size = 40 if i % 5 == 0 else 100 + (i * 37) % 9000
        (d / f"f{i:04d}").write_bytes(os.urandom(size))
    (root / "hello").write_bytes(b"hello world\n" * 20)


def is_mounted(mnt: Path) -> bool:
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == os.fsencode(mnt) for line in f)


def cleanup(mnt: Path) -> None:
    while is_mounted(mnt):
        try:
            umount2(mnt, MNT_DETACH)
        except KernelError:
            return


#: A cycle: the seconds of its mount and of its unmount, and the cpu seconds of both.
Cycle = Callable[[], tuple[float, float, float]]


def run(argv: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one process (cpu: user + system, from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv}: exit status {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_utime + usage.ru_stime


def process_cycle(mount_cmd: list[str], mnt: Path) -> Cycle:
    umount_cmd = ["umount", str(mnt)]

    def cycle() -> tuple[float, float, float]:
        mount_wall, mount_cpu = run(mount_cmd)
        umount_wall, umount_cpu = run(umount_cmd)
        return mount_wall, umount_wall, mount_cpu + umount_cpu

    return cycle


def floor_cycle(python: list[str], c_mount: list[str], mnt: Path) -> Cycle:
    """An interpreter start and an ``umount`` of a mount C made (not timed)."""
    umount_cmd = ["umount", str(mnt)]

    def cycle() -> tuple[float, float, float]:
        subprocess.run(c_mount, check=True)
        start_wall, start_cpu = run(python)
        umount_wall, umount_cpu = run(umount_cmd)
        return start_wall, umount_wall, start_cpu + umount_cpu

    return cycle


def api_cycle(image: Path, objs: Path, mnt: Path) -> Cycle:
    opts = MountOptions(basedirs=[objs])

    def cycle() -> tuple[float, float, float]:
        c0 = time.process_time()
        t0 = time.perf_counter()
        with mount_image(image, opts) as m:
            attach(m.fd, mnt)
        t1 = time.perf_counter()
        unmount(mnt)
        return t1 - t0, time.perf_counter() - t1, time.process_time() - c0

    return cycle


def check(mount_only: Callable[[], object], mnt: Path, expect: bytes | list[str]) -> None:
    """Mount once, read a file (or list the root), unmount: the cycle under test
    really mounts."""
    mount_only()
    try:
        if isinstance(expect, list):
            assert sorted(os.listdir(mnt)) == expect, "wrong root listing in the mount"
        else:
            assert (mnt / "hello").read_bytes() == expect, "wrong content in the mount"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert not is_mounted(mnt)


def timed_runs(cmd: list[str], n: int) -> float:
    """Mean seconds per run of a short command."""
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - t0) / n


def our_command() -> tuple[list[str], str]:
    script = Path(sys.executable).parent / "mount.composefs"
    if script.exists():
        return [str(script)], f"console script {script}"
    return [sys.executable, "-m", "composefsd.cli.mountcomposefs"], "python -m"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--image", type=Path, default=None, help="mount this image instead")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--c-bin", type=Path, default=None)
    ap.add_argument("--no-compile", action="store_true", help="do not byte-compile the package")
    args = ap.parse_args()

    cbin = args.c_bin or reference_bin()
    pkg = Path(composefsd.__file__).parent
    if not args.no_compile:
        compileall.compile_dir(pkg, quiet=1)
    ours_cmd, ours_what = our_command()
    work = Path(tempfile.mkdtemp(prefix="cfs-mount-bench-", dir=args.workdir)).resolve()
    mnt = work / "mnt"
    mnt.mkdir()
    print(f"work dir {work}; CPUs {len(os.sched_getaffinity(0))}; load average {load()}")
    no_pyc = os.environ.get("PYTHONDONTWRITEBYTECODE", "")
    print(f"ours (a): {ours_what}; PYTHONDONTWRITEBYTECODE={no_pyc!r}")
    try:
        src, image, objs = work / "src", work / "image.cfs", work / "objs"
        expect: bytes | list[str]
        if args.image is not None:
            image = args.image.resolve()
            objs.mkdir()
            expect = []  # C's listing, read at the first check
            print(f"image {image} ({image.stat().st_size} bytes), empty object directory")
        else:
            make_tree(src, args.files)
            subprocess.run(
                [str(cbin / "mkcomposefs"), f"--digest-store={objs}", str(src), str(image)],
                check=True,
            )
            n_objs = sum(len(files) for _, _, files in os.walk(objs))
            print(f"image {image.stat().st_size} bytes, {args.files + 1} files, {n_objs} objects")
            expect = (src / "hello").read_bytes()

        c_mount = [str(cbin / "mount.composefs"), "-o", f"basedir={objs}", str(image), str(mnt)]
        a_mount = [*ours_cmd, "-o", f"basedir={objs}", str(image), str(mnt)]
        sides: dict[str, Cycle] = {
            "C": process_cycle(c_mount, mnt),
            "ours (a) process": process_cycle(a_mount, mnt),
            "ours (b) in-process": api_cycle(image, objs, mnt),
        }
        floors = {f"floor: {label} + umount": argv for label, argv in interpreter_starts()}
        for name, argv in floors.items():
            sides[name] = floor_cycle(argv, c_mount, mnt)

        def api_mount() -> None:
            with mount_image(image, MountOptions(basedirs=[objs])) as m:
                attach(m.fd, mnt)

        if isinstance(expect, list):
            subprocess.run(c_mount, check=True)
            expect = sorted(os.listdir(mnt))
            subprocess.run(["umount", str(mnt)], check=True)
            assert expect, "C's mount of the image is empty"
        check(lambda: subprocess.run(c_mount, check=True), mnt, expect)
        check(lambda: subprocess.run(a_mount, check=True), mnt, expect)
        check(api_mount, mnt, expect)
        for cycle in sides.values():  # warm up: page cache, the layer-mode probe
            cycle()

        samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in sides}
        for r in range(args.rounds):
            for _ in range(args.cycles):
                for name, cycle in sides.items():
                    samples[name].append(cycle())
            print(f"\nround {r + 1} (load {load()}), medians of {args.cycles} cycles")
            c_total = statistics.median(m + u for m, u, _ in samples["C"][-args.cycles :])
            for name, runs in samples.items():
                last = runs[-args.cycles :]
                total = statistics.median(m + u for m, u, _ in last)
                print(
                    f"  {name:40} {total * 1e3:8.2f} ms/cycle "
                    f"(mount {statistics.median(m for m, _, _ in last) * 1e3:7.2f} ms, "
                    f"unmount {statistics.median(u for _, u, _ in last) * 1e3:6.2f} ms) "
                    f"{total / c_total:6.2f}x C",
                    flush=True,
                )

        print(
            f"\nmedian of {args.rounds} rounds x {args.cycles} cycles (wall ms; cpu ms: the "
            "processes' user + system, or this process's for ours (b)):"
        )
        med = {
            k: (
                statistics.median(m + u for m, u, _ in runs),
                statistics.median(m for m, _, _ in runs),
                statistics.median(u for _, u, _ in runs),
                statistics.median(c for _, _, c in runs),
            )
            for k, runs in samples.items()
        }
        print(
            f"  {'side':40} {'ms/cycle':>9} {'mount ms':>9} {'unmount':>8} {'ours/C':>7} "
            f"{'cpu ms':>7} {'ours/C':>7}"
        )
        for name, (total, m, u, cpu) in med.items():
            ratio = "" if name == "C" else f"{total / med['C'][0]:7.2f}"
            cpu_ratio = "" if name == "C" else f"{cpu / med['C'][3]:7.2f}"
            print(
                f"  {name:40} {total * 1e3:9.2f} {m * 1e3:9.2f} {u * 1e3:8.2f} {ratio:>7} "
                f"{cpu * 1e3:7.2f} {cpu_ratio:>7}"
            )
        for i, what in ((0, "wall"), (3, "cpu")):
            goal = 2.0 * med["C"][i]
            ours = med["ours (a) process"][i]
            print(
                f"goal, {what}: our mount.composefs <= 2.0x C: {ours * 1e3:.1f} ms vs "
                f"{goal * 1e3:.1f} ms ({'met' if ours <= goal else 'NOT met'})"
            )
            for name in floors:
                verdict = floor_verdict(med[name][i] * 1e3, goal * 1e3, "the interpreter")
                print(f"  {name}: {verdict}")

        py = sys.executable
        n = 20
        print(f"\nwhere a process's time goes (mean of {n} runs):")
        rows = [
            ("C mount.composefs -h", [str(cbin / "mount.composefs"), "-h"]),
            ("python -S -I -c pass", [py, "-S", "-I", "-c", "pass"]),
            ("python -c pass (site hooks)", [py, "-c", "pass"]),
            (
                "import composefsd.cli.mountcomposefs",
                [py, "-c", "import composefsd.cli.mountcomposefs"],
            ),
            ("import composefsd.kernel.mount", [py, "-c", "import composefsd.kernel.mount"]),
            ("our mount.composefs -h", [*ours_cmd, "-h"]),
        ]
        for label, cmd in rows:
            print(f"  {label:40} {timed_runs(cmd, n) * 1e3:8.2f} ms")
        print(f"load average at the end: {load()}")
    finally:
        cleanup(mnt)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
