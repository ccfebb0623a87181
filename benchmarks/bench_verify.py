#!/usr/bin/env python3
"""Time Verify of one image against ``fsverity digest`` of all its objects.

    python benchmarks/bench_verify.py [--tree /usr] [--workdir /var/tmp]
        [--repo PATH --image NAME] [--processes N] [--rounds 3] [--keep]

Builds a repository holding one image of TREE (CreateImage, not timed), or uses
``--repo``/``--image``. Then, alternately, best of ``--rounds`` each, with the
same number of processes on both sides (``--processes``, default one per CPU):

* C: ``fsverity digest`` (fsverity-utils) over every object of the image plus the
  image itself, ``xargs -P N`` spreading the paths over N processes (in batches
  as xargs makes them);
* ours: ``Repository.verify_image`` in a fresh interpreter (its start included, as
  C's are), ``workers=N``: the calling process and N - 1 worker processes; the
  image's digest, every object's size and fs-verity digest. Twice: first without
  the image's object list (removed before: the image is scanned, its format
  checked, and the list written to the repository's ``cache/``), then again with
  it (the image's digest confirmed, then the listed objects checked without a
  scan: :mod:`composefsd.repository.objectlist`).

The page cache is warm for both (the objects are read once before). Prints wall
and CPU seconds (children included) of each side, the CPU of our calling process
alone (start, imports, the image's object list, handing out work: what C's side
does not do), the processes on each side, the ratio ours/C of the best times and
whether its wall time meets the target (<= 1.0), for the first Verify and the
repeated one each, the median of each round's ratio
(both sides back to back, under about the same load), and the load average, since
the machine may be shared.
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

from _common import warm_cache

BUILD = r"""
import sys
from composefsd.repository import CreateOptions, Repository
repo = Repository.init(sys.argv[1])
print(repo.create_image(sys.argv[2], ref="bench", options=CreateOptions()).digest)
"""

VERIFY = r"""
import json, resource, sys
from composefsd.repository import Repository
report = Repository.open(sys.argv[1]).verify_image(sys.argv[2], workers=int(sys.argv[3]))
own = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"ok": report.ok, "objects": report.objects_checked,
                  "caller_cpu": own.ru_utime + own.ru_stime}))
"""

OBJECTS = r"""
import os, sys
from composefsd.repository import Repository
from composefsd.repository.verify import referenced_objects
from composefsd.image.reader import read_image
from composefsd.kernel.verity import Algorithm
repo = Repository.open(sys.argv[1])
digest = repo.resolve_image(sys.argv[2])
path = repo.image_path(digest)
image = read_image(path.read_bytes(), c_quirks=False)
alg = Algorithm.parse(repo.hash_name)
paths = [str(path)] + [str(repo.object_path(d)) for d in referenced_objects(image.root, alg)]
from composefsd.repository.objectlist import file_name
sys.stdout.write(str(repo.cache_dir / file_name(alg, digest)) + "\n")
sys.stdout.write("\0".join(paths))
"""


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(cmd: list[str], stdin: bytes | None = None) -> tuple[float, float, bytes]:
    """(wall, cpu, stdout) of one run, its child processes included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, input=stdin, stdout=subprocess.PIPE)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tree", type=Path, default=Path("/usr"))
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--repo", type=Path, default=None, help="use this repository")
    ap.add_argument("--image", default="bench", help="with --repo: the image to verify")
    ap.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the repository built")
    args = ap.parse_args()
    if shutil.which("fsverity") is None:
        print("fsverity (fsverity-utils) not found; apt-get install fsverity", file=sys.stderr)
        return 2

    work: Path | None = None
    try:
        if args.repo is None:
            work = Path(tempfile.mkdtemp(prefix="cfs-verify-bench-", dir=args.workdir))
            repo = work / "repo"
            print(f"building an image of {args.tree} in {repo} ... (load {load()})", flush=True)
            warm_cache(args.tree)
            out = subprocess.run(
                [sys.executable, "-c", BUILD, str(repo), str(args.tree)],
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            ).stdout
            image = out.split()[-1]
        else:
            repo, image = args.repo, args.image
        listing, _, paths = subprocess.run(
            [sys.executable, "-c", OBJECTS, str(repo), image], check=True, stdout=subprocess.PIPE
        ).stdout.partition(b"\n")
        object_list = Path(os.fsdecode(listing))
        files, nbytes = warm_cache(repo / "objects")
        n = args.processes
        count = paths.count(b"\0")
        print(f"image {image}: {count} objects + the image file")
        print(f"objects/ warmed: {files} files, {nbytes / 1e9:.2f} GB; processes {n}")
        print(f"load average at start {load()}")
        c_cmd = ["xargs", "-0", "-P", str(n), "fsverity", "digest", "--compact"]
        ours_cmd = [sys.executable, "-c", VERIFY, str(repo), image, str(n)]
        sides = ("C", "first", "again")
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
        callers: dict[str, list[float]] = {"first": [], "again": []}
        for _ in range(args.rounds):
            wall, cpu, _ = timed(c_cmd, paths)
            runs["C"].append((wall, cpu))
            for side in ("first", "again"):
                if side == "first":
                    object_list.unlink(missing_ok=True)  # scanned, and the list written
                wall, cpu, out_b = timed(ours_cmd)
                result = json.loads(out_b.decode().strip().splitlines()[-1])
                if not result["ok"]:
                    print(f"Verify failed: {result}")
                    return 1
                runs[side].append((wall, cpu))
                callers[side].append(result["caller_cpu"])
            if not object_list.is_file():
                print(f"Verify wrote no object list {object_list}")
                return 1
        best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in runs.items()}
        print()
        print(f"{'best of ' + str(args.rounds):40} {'wall s':>8} {'cpu s':>8}")
        print(f"{'fsverity digest (C), xargs -P':40} {best['C'][0]:8.2f} {best['C'][1]:8.2f}")
        labels = {
            "first": "Verify (ours), first: scans, lists",
            "again": "Verify (ours), again: the list",
        }
        for side in ("first", "again"):
            print(f"{labels[side]:40} {best[side][0]:8.2f} {best[side][1]:8.2f}")
            print(f"{'  of which the calling process':40} {'':8} {min(callers[side]):8.2f}")
        print(
            f"processes: C {n} (xargs -P {n} fsverity digest), "
            f"ours {n} (the calling process and {n - 1} workers)"
        )
        for side in ("first", "again"):
            wall_ratio = best[side][0] / best["C"][0]
            cpu_ratio = best[side][1] / best["C"][1]
            verdict = "met" if wall_ratio <= 1.0 else "not met"
            # Each round's ratio (ours and C run back to back, under about the same load).
            ratios = [
                (ow / cw, oc / cc) for (cw, cc), (ow, oc) in zip(runs["C"], runs[side], strict=True)
            ]
            print(
                f"ours/C, {side:5}: best wall {wall_ratio:.2f}, cpu {cpu_ratio:.2f} "
                f"(target <= 1.0: {verdict}); median of the rounds' ratios: "
                f"wall {statistics.median(r[0] for r in ratios):.2f}, "
                f"cpu {statistics.median(r[1] for r in ratios):.2f}"
            )
        print(f"load average at the end {load()}")
    finally:
        if work is not None:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
