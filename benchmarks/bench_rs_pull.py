#!/usr/bin/env python3
"""org.composefs.Oci.Pull (cfsctl's interface) against io.composefs.Oci.Pull (ours) of
the same ``oci:`` layout image, through a running composefsd: both go through the
same pull (service/ocimethods' ``open_source``/``run_pull``, repository/ocipull), so
the ratio should be about 1.0; what differs is the reply (cfsctl's frames and
``stats`` against our progress) and the handle lookup.

    python benchmarks/bench_rs_pull.py [--mib 100] [--rounds 3] [--dir DIR]

Builds bench_oci_pull's image A (five gzip layers, ``--mib`` MB compressed, seeded)
as an OCI layout under ``--dir``. Each round starts two daemons on fresh
repositories (not timed) and times one pull of A into each, with ``more`` (every
progress reply read), in alternating order. Reported: the best time of each
interface over ``--rounds`` and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import REPO
from bench_oci_pull import make_layout
from composefsd.service import client

sys.path.insert(0, str(REPO / "tests"))
from servicehelpers import running_daemon  # the tests' daemon helper


def _ours(address: str, reference: str) -> int:
    with client.connect(address) as conn:
        replies = list(conn.call("io.composefs.Oci.Pull", {"reference": reference}, more=True))
    return len(replies)


def _cfsctls(address: str, repo: Path, reference: str) -> int:
    with client.connect(address) as conn:
        handle = conn.call("org.composefs.Repository.OpenRepository", {"path": str(repo)})
        params = {
            "handle": handle["handle"],
            "image": reference,
            "local_fetch": "disabled",
            "bootable": False,
        }
        replies = list(conn.call("org.composefs.Oci.Pull", params, more=True))
    return len(replies)


def _timed(work: Path, name: str, pull: Callable[[str, Path], int]) -> tuple[float, int]:
    """One pull into a fresh repository served by its own daemon (started untimed)."""
    repo = work / name
    with running_daemon(repo, log_level="info") as d:
        start = time.perf_counter()
        replies = pull(d.address, repo)
        elapsed = time.perf_counter() - start
    return elapsed, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="the image's compressed MB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        layout = work / "layout"
        layers, _b = make_layout(layout, args.mib)
        compressed = sum(layer.size for layer in layers)
        print(f"image: {len(layers)} gzip layers, {compressed / 1e6:.0f} MB compressed")
        reference = f"oci:{layout}:a"
        pulls: dict[str, Callable[[str, Path], int]] = {
            "io.composefs.Oci.Pull": lambda address, _repo: _ours(address, reference),
            "org.composefs.Oci.Pull": lambda address, repo: _cfsctls(address, repo, reference),
        }
        best = dict.fromkeys(pulls, float("inf"))
        for round_ in range(args.rounds):
            order = list(pulls) if round_ % 2 == 0 else list(reversed(pulls))
            for name in order:
                elapsed, replies = _timed(work, f"r{round_}-{name}", pulls[name])
                best[name] = min(best[name], elapsed)
                print(f"  round {round_ + 1}: {name:24} {elapsed:7.2f} s  {replies} replies")
        for name, seconds in best.items():
            print(f"{name:24} {seconds:7.2f} s  {compressed / 1e6 / seconds:6.0f} MB/s")
        ratio = best["org.composefs.Oci.Pull"] / best["io.composefs.Oci.Pull"]
        print(f"org.composefs / io.composefs: {ratio:.2f} (goal: about 1.0)")


if __name__ == "__main__":
    main()
