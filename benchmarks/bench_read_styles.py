#!/usr/bin/env python3
"""Reading a directory tree composefs-rs-style against C-style, same run.

    python benchmarks/bench_read_styles.py [--tree /usr] [--rounds 3]

Walks ``--tree`` (default /usr) the way CreateImage does before importing
(:func:`composefsd.sources.directory.scan_source`: metadata, xattrs and link
targets, no file data) once as C mkcomposefs reads it and once as composefs-rs
does (:class:`~composefsd.sources.base.ReadStyle`), alternately, best of
``--rounds``, and prints the ratio. The rs-style reading also links paths of one
inode and sorts xattrs, so its cost over C's is what that bookkeeping adds. Then
cfsctl's default transform (/usr metadata to the root, /run emptied, xattrs
filtered) is timed on the rs-style tree (put under a root as its /usr if it has
none, as /usr itself has not).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import time
from pathlib import Path

from composefsd.image.transforms import CFSCTL_DEFAULT, TransformError, apply_transform
from composefsd.image.tree import Node, gc_paused, new_directory
from composefsd.sources.base import ReadStyle
from composefsd.sources.directory import ScanOptions, SourceScan, scan_source


def scan(tree: Path, style: ReadStyle) -> tuple[float, SourceScan]:
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        gc.collect()
        start = time.perf_counter()
        with gc_paused():
            result = scan_source(fd, os.fsencode(tree), ScanOptions(style=style))
        return time.perf_counter() - start, result
    finally:
        os.close(fd)


def links(root: Node) -> int:
    return sum(1 for _path, node in root.walk() if node.link_to is not None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tree", type=Path, default=Path("/usr"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    scan(args.tree, ReadStyle.C)  # warm the dentry and inode caches
    best = {ReadStyle.C: float("inf"), ReadStyle.COMPOSEFS_RS: float("inf")}
    results: dict[ReadStyle, SourceScan] = {}
    for _ in range(args.rounds):
        for style in best:
            seconds, results[style] = scan(args.tree, style)
            best[style] = min(best[style], seconds)
    c, rs = results[ReadStyle.C], results[ReadStyle.COMPOSEFS_RS]
    print(f"tree: {args.tree} ({c.entries} entries, {c.regular_files} regular files)")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(f"C-style scan:            {best[ReadStyle.C]:.3f} s (best of {args.rounds})")
    print(f"composefs-rs-style scan: {best[ReadStyle.COMPOSEFS_RS]:.3f} s (best of {args.rounds})")
    print(f"ratio rs/C: {best[ReadStyle.COMPOSEFS_RS] / best[ReadStyle.C]:.2f}x")
    print(f"hardlink entries: C-style {links(c.root)}, rs-style {links(rs.root)}")
    root = copy.deepcopy(rs.root)
    if root.children is not None and b"usr" not in root.children:
        # A tree like /usr itself: time the transform as if it were a root's /usr.
        usr, root = root, new_directory()
        root.add_child(b"usr", usr)
    start = time.perf_counter()
    try:
        with gc_paused():
            apply_transform(root, CFSCTL_DEFAULT, lambda node: node.content or b"")
    except TransformError as exc:
        print(f"default transform: {exc}")
        return 0
    print(f"default transform (rs-style tree): {time.perf_counter() - start:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
