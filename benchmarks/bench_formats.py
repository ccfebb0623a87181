#!/usr/bin/env python3
"""Writing and reading the three EROFS formats of ``composefsd.image.formats``, same run.

    python benchmarks/bench_formats.py [--tree /usr] [--rounds 3]

C mkcomposefs builds an image of ``--tree`` (default /usr, about 137,000 entries
here; kept in ``--work`` for re-runs) and our reader turns it into a tree. That
tree is written as V0, V1 (C's writer, pinned to one version) and V2 (the
composefs-rs layout), in-process, alternately, best of ``--rounds``; then each
image is read back the repository way. Printed: each time and the V2/V1 ratios.
The V2 image read back and written again must give the same bytes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from _common import best_of, reference_bin
from composefsd.image.formats import ErofsVersion, write_format
from composefsd.image.reader import read_image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tree", default="/usr", help="directory to build the input image from")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/composefsd-bench", help="scratch directory")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = work / ("formats-" + args.tree.strip("/").replace("/", "_") + ".cfs")
    if not source.exists():
        print(f"building the input: C mkcomposefs {args.tree}")
        subprocess.run([str(reference_bin() / "mkcomposefs"), args.tree, str(source)], check=True)
    root = read_image(source.read_bytes(), c_quirks=False).root
    entries = sum(1 for _ in root.walk())
    print(f"input: {source} ({entries} entries)")

    images: dict[ErofsVersion, bytes] = {}
    write_times: dict[ErofsVersion, float] = {}
    for version in ErofsVersion:
        images[version] = write_format(root, version)
        write_times[version] = best_of(args.rounds, lambda v=version: write_format(root, v))
    read_times = {
        v: best_of(args.rounds, lambda v=v: read_image(images[v], c_quirks=False))
        for v in ErofsVersion
    }
    back = read_image(images[ErofsVersion.V2], c_quirks=False).root
    round_trip = write_format(back, ErofsVersion.V2) == images[ErofsVersion.V2]

    print(f"load average: {os.getloadavg()[0]:.2f}")
    for v in ErofsVersion:
        print(
            f"{v.name}: write {write_times[v]:.3f} s, read {read_times[v]:.3f} s, "
            f"{len(images[v]) / 1e6:.1f} MB (best of {args.rounds})"
        )
    v1, v2 = ErofsVersion.V1, ErofsVersion.V2
    print(f"ratio V2/V1 writing: {write_times[v2] / write_times[v1]:.2f}x")
    print(f"ratio V2/V1 reading: {read_times[v2] / read_times[v1]:.2f}x")
    print(f"V2 round trip identical: {round_trip}")
    return 0 if round_trip else 1


if __name__ == "__main__":
    sys.exit(main())
