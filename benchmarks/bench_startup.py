#!/usr/bin/env python3
"""Start-up of our command-line tools against ``python3 -c pass`` and the C tools, same run.

    python benchmarks/bench_startup.py [--rounds 15] [--loop 1000]

Each command runs ``--rounds`` times, all commands in turn each round (so that the
machine's load falls on all of them alike); printed per command: the median and
best wall time and the median cpu time (user + system, from wait4), each also as
the excess over the same interpreter's ``python -c pass`` (the start-up goal: <= 30
ms for composefsctl, <= 25 ms for mkcomposefs and composefs-info; on a busy machine
the cpu excess is the steadier figure), and the ratio to the C tool where there is
one. The client-mode composefsctl commands talk to a composefsd started here on a
fresh repository (in ``--work``, removed after).

Then the upstream test suite's pattern: ``--loop`` times (1,000 by default) a small
``mkcomposefs --from-file`` and ``composefs-info dump`` of its image, ours and C's
alternately; printed: both totals, the medians of a pair and the ratio (goal: <=
3x). In turn with them, the floor of ours: two interpreter starts (``python -I -S -c
pass``, the venv's and /usr/bin/python3, and the venv's ``python -c pass`` with
the site hooks, as our console scripts start), printed against the goal as
reachable or below the interpreter's own start.

The package is byte-compiled first, as pip does when it installs.
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
from pathlib import Path

import composefsd
from _common import floor_verdict, interpreter_starts, reference_bin
from _common import start_daemon as start_composefsd

BIN = Path(sys.executable).parent

# A small image's dumpfile, the kind the upstream tests make by the thousand.
_DUMP = (
    b"/ 0 40755 3 0 0 0 1700000000.0 - - - user.a=b\n"
    b"/dir 0 40750 2 1000 1000 0 1700000000.0 - - -\n"
    b"/dir/small 5 100644 1 0 0 0 1700000000.0 - hello -\n"
    b"/file 6000 100600 1 0 0 0 1700000000.0 ab/" + b"cd" * 31 + b" - -\n"
    b"/link 6 120777 1 0 0 0 1700000000.0 target - -\n"
    b"/fifo 0 10644 1 0 0 0 1700000000.0 - - -\n"
)


def run_once(argv: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one run of ``argv``, output discarded; it must succeed."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv}: exit status {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def start_daemon(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = work / "sock"
    return start_composefsd(work / "repo", sock, work / "run"), str(sock)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--loop", type=int, default=1000, help="runs of the mkcomposefs + dump loop")
    ap.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: a temp dir)"
    )
    opts = ap.parse_args()
    cbin = reference_bin()
    # The bytecode a pip install writes (an editable install, or one run with
    # $PYTHONDONTWRITEBYTECODE set, may have none: then every start compiles).
    compileall.compile_dir(Path(composefsd.__file__).parent, quiet=1)
    work = Path(tempfile.mkdtemp(prefix="bench-startup-", dir=opts.work))
    dump = work / "small.dump"
    dump.write_bytes(_DUMP)
    image = work / "small.img"
    subprocess.run([str(cbin / "mkcomposefs"), "--from-file", str(dump), str(image)], check=True)
    tree = work / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"hello\n")
    daemon, sock = start_daemon(work)
    try:
        ctl = [str(BIN / "composefsctl"), "--connect", sock]
        run_once([*ctl, "create-image", str(tree), "--ref", "bench"])
        py = [sys.executable, "-c", "pass"]
        ours_mk = [str(BIN / "mkcomposefs"), "--from-file", str(dump), str(work / "o.img")]
        c_mk = [str(cbin / "mkcomposefs"), "--from-file", str(dump), str(work / "c.img")]
        # (name, argv, C's argv or None, goal in ms above python -c pass or None)
        commands: list[tuple[str, list[str], list[str] | None, float | None]] = [
            ("python -c pass", py, None, None),
            *(
                (f"{label} -c pass", argv, None, None)
                for label, argv in interpreter_starts()
                if "-S" in argv
            ),
            ("mkcomposefs --help", [str(BIN / "mkcomposefs"), "--help"], None, 25),
            ("mkcomposefs --from-file small", ours_mk, c_mk, 25),
            (
                "composefs-info dump small",
                [str(BIN / "composefs-info"), "dump", str(image)],
                [str(cbin / "composefs-info"), "dump", str(image)],
                25,
            ),
            (
                "composefs-info ls small",
                [str(BIN / "composefs-info"), "ls", str(image)],
                [str(cbin / "composefs-info"), "ls", str(image)],
                25,
            ),
            ("composefsctl --help", [str(BIN / "composefsctl"), "--help"], None, 30),
            ("composefsctl status", [*ctl, "status"], None, 30),
            ("composefsctl images", [*ctl, "images"], None, 30),
            ("composefsctl mounts", [*ctl, "mounts"], None, 30),
            ("composefsctl verify bench", [*ctl, "verify", "bench"], None, 30),
            ("composefsctl gc --dry-run", [*ctl, "gc", "--dry-run"], None, 30),
            ("composefsctl oci images", [*ctl, "oci", "images"], None, 30),
        ]
        walls: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}
        for _ in range(opts.rounds):
            for name, argv, cargv, _goal in commands:
                for key, cmd in ((name, argv), ("C " + name, cargv)):
                    if cmd is None:
                        continue
                    wall, cpu = run_once(cmd)
                    walls.setdefault(key, []).append(wall)
                    cpus.setdefault(key, []).append(cpu)
        base = statistics.median(walls["python -c pass"])
        cpu_base = statistics.median(cpus["python -c pass"])
        print(f"load average: {os.getloadavg()[0]:.2f}; {opts.rounds} rounds; ms")
        print(
            f"{'command':32s} {'wall med':>8s} {'best':>6s} {'+py':>6s} {'cpu med':>7s} "
            f"{'+py':>6s} {'goal':>5s} {'C med':>6s} {'ratio':>6s}"
        )
        for name, _argv, cargv, goal in commands:
            med = statistics.median(walls[name])
            cpu = statistics.median(cpus[name])
            row = (
                f"{name:32s} {med * 1e3:8.1f} {min(walls[name]) * 1e3:6.1f} "
                f"{(med - base) * 1e3:6.1f} {cpu * 1e3:7.1f} {(cpu - cpu_base) * 1e3:6.1f} "
                f"{'' if goal is None else f'{goal:.0f}':>5s}"
            )
            if cargv is not None:
                cmed = statistics.median(walls["C " + name])
                row += f" {cmed * 1e3:6.1f} {med / cmed:5.1f}x"
            print(row)
        if opts.loop:
            out = str(work / "loop.img")
            pairs: dict[str, tuple[list[str], list[str]]] = {
                "ours": ([*ours_mk[:-1], out], [str(BIN / "composefs-info"), "dump", out]),
                "C": ([*c_mk[:-1], out], [str(cbin / "composefs-info"), "dump", out]),
            }
            for label, argv in interpreter_starts():
                pairs[f"floor: two {label} starts"] = (argv, argv)
            times: dict[str, list[float]] = {k: [] for k in pairs}
            for _ in range(opts.loop):
                for which, pair in pairs.items():
                    times[which].append(sum(run_once(cmd)[0] for cmd in pair))
            ours, c = sum(times["ours"]), sum(times["C"])
            print(
                f"loop of {opts.loop} mkcomposefs --from-file + composefs-info dump: "
                f"ours {ours:.2f} s, C {c:.2f} s, ratio {ours / c:.2f}x (goal <= 3x: "
                f"{'met' if ours <= 3 * c else 'NOT met'}; load {os.getloadavg()[0]:.2f})"
            )
            meds = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            goal = 3 * meds["C"]
            print(
                f"  median pair: ours {meds['ours']:.1f} ms, C {meds['C']:.1f} ms, "
                f"ratio {meds['ours'] / meds['C']:.2f}x"
            )
            for which in list(pairs)[2:]:
                print(f"  {which}: " + floor_verdict(meds[which], goal, "the interpreter"))
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
