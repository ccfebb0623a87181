#!/usr/bin/env python3
"""The daemon under load: Describe throughput and latency, and mounts through Varlink.

    python benchmarks/bench_service.py [--clients 16] [--seconds 10] [--cycles 100]
        [--workdir /var/tmp]

1. **Describe**: ``--clients`` client processes, each with one connection,
   call ``io.composefs.Repository.Describe`` back to back for ``--seconds``.
   Prints calls/s over all clients and the latency percentiles (goal: at least
   2,000 calls/s with p99 under 20 ms). The clients are separate processes so
   that their own Python overhead does not share the daemon's GIL.
2. **Mount + Unmount** through the daemon, each driven by a ``varlinkctl call``
   process (``Mount`` with ``where``, then ``Unmount``), ``--cycles`` times,
   against C ``mount.composefs`` + ``umount`` processes on the same image in the
   same run; prints ms per cycle and the ratio ours/C. The same with
   ``composefsctl mount``/``unmount``; beside them the floor of the varlinkctl
   side (two ``varlinkctl call`` processes of ``GetInfo``) and the daemon's own
   part (both calls from this process). For a small image and, with
   ``--usr-image`` (``mkcomposefs /usr usr.cfs``), a /usr-sized one, put into the
   repository as it is; ``--skip-describe`` runs only this part.

The daemon runs as ``python -m composefsd.service.daemon`` on a fresh repository
in ``--workdir``; everything is removed at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from _common import reference_bin
from composefsd.service.client import connect

IFACE = "io.composefs.Repository"


def _tree(root: Path, files: int) -> None:
    rng = random.Random(1)
    for i in range(files):
        f = root / f"d{i % 10}" / f"f{i}"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(rng.randbytes(rng.choice([10, 500, 5000])))


def _describe_worker(sock: str, start: float, stop: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    latencies = []
    with connect(sock) as conn:
        while time.time() < start:
            time.sleep(0.001)
        while (t0 := time.time()) < stop:
            conn.call(f"{IFACE}.Describe")
            latencies.append(time.time() - t0)
    out.put(latencies)


def bench_describe(sock: str, clients: int, seconds: float) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    start = time.time() + 1.0
    stop = start + seconds
    procs = [
        ctx.Process(target=_describe_worker, args=(sock, start, stop, queue))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    latencies: list[float] = []
    for _ in procs:
        latencies.extend(queue.get())
    for p in procs:
        p.join()
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(n - 1, int(q * n))] * 1000

    rate = n / seconds
    print(f"Describe, {clients} clients, {seconds:.0f} s: {n} calls, {rate:.0f} calls/s")
    print(
        f"  latency ms: p50 {pct(0.50):.2f}  p90 {pct(0.90):.2f}  p99 {pct(0.99):.2f}  "
        f"max {latencies[-1] * 1000:.2f}"
    )
    verdict = "met" if rate >= 2000 and pct(0.99) < 20 else "NOT met"
    print(f"  goal >= 2000 calls/s and p99 < 20 ms: {verdict}")


def _time_cycles(cycles: int, mount: list[str], umount: list[str]) -> tuple[float, float]:
    t_mount = t_umount = 0.0
    for _ in range(cycles):
        t0 = time.perf_counter()
        subprocess.run(mount, check=True, stdout=subprocess.DEVNULL)
        t1 = time.perf_counter()
        subprocess.run(umount, check=True, stdout=subprocess.DEVNULL)
        t2 = time.perf_counter()
        t_mount += t1 - t0
        t_umount += t2 - t1
    return t_mount / cycles * 1000, t_umount / cycles * 1000


def _client_cycles(cycles: int, sock: str, image: str, mnt: Path) -> tuple[float, float]:
    """Mount + Unmount from this process, a connection each: the daemon's part, with
    no client process to start."""
    t_mount = t_umount = 0.0
    for _ in range(cycles):
        t0 = time.perf_counter()
        with connect(sock) as conn:
            conn.call(f"{IFACE}.Mount", {"image": image, "where": str(mnt)})
        t1 = time.perf_counter()
        with connect(sock) as conn:
            conn.call(f"{IFACE}.Unmount", {"where": str(mnt)})
        t2 = time.perf_counter()
        t_mount += t1 - t0
        t_umount += t2 - t1
    return t_mount / cycles * 1000, t_umount / cycles * 1000


def _add_image_file(repo_path: Path, image: Path, ref: str) -> str:
    """Put a ready image file into the repository as ``ref`` (its objects need not be
    there: a mount looks them up only when a file's data is read)."""
    from composefsd.repository import Repository
    from composefsd.repository.images import link_image, set_ref_link

    repo = Repository.open(repo_path)
    digest = repo.object_store().store_bytes(image.read_bytes()).digest
    link_image(repo, digest)
    set_ref_link(repo.refs_dir, ref, digest, tmp_dir=repo.images_dir, top=repo.refs_dir)
    return digest


def bench_mount(
    work: Path, sock: str, cycles: int, rounds: int, usr_image: Path | None, usr_cycles: int
) -> None:
    """Mount + Unmount of a small image and of a /usr-sized one: C ``mount.composefs``
    + ``umount`` processes, the daemon driven by ``varlinkctl call`` processes, and
    ``composefsctl mount`` + ``unmount`` through the daemon; alternated per round."""
    ref = reference_bin()
    varlinkctl = str(ref / "varlinkctl")
    composefsctl = shutil.which("composefsctl", path=str(Path(sys.executable).parent))
    src = work / "src"
    _tree(src, 300)
    objs, mnt = work / "objs", work / "mnt"
    objs.mkdir()
    mnt.mkdir()
    images: list[tuple[str, Path, str, int]] = []
    small = work / "c.cfs"
    subprocess.run(
        [str(ref / "mkcomposefs"), f"--digest-store={objs}", str(src), str(small)], check=True
    )
    with connect(sock) as conn:
        conn.call(f"{IFACE}.CreateImage", {"sourcePath": str(src), "ref": "bench"})
    images.append(("small (300 files)", small, "bench", cycles))
    if usr_image is not None:
        _add_image_file(work / "repo", usr_image, "usr")
        images.append(
            (f"/usr ({usr_image.stat().st_size / 1e6:.1f} MB)", usr_image, "usr", usr_cycles)
        )
    for label, image, name, n in images:
        sides: dict[str, tuple[list[str], list[str]]] = {
            "C mount.composefs": (
                [str(ref / "mount.composefs"), "-o", f"basedir={objs}", str(image), str(mnt)],
                ["umount", str(mnt)],
            ),
            "varlinkctl": (
                [
                    varlinkctl,
                    "call",
                    sock,
                    f"{IFACE}.Mount",
                    f'{{"image": "{name}", "where": "{mnt}"}}',
                ],
                [varlinkctl, "call", sock, f"{IFACE}.Unmount", f'{{"where": "{mnt}"}}'],
            ),
        }
        # The floor of the varlinkctl side: the same two processes making a call
        # that does nothing.
        sides["varlinkctl GetInfo x2"] = (
            [varlinkctl, "call", sock, "org.varlink.service.GetInfo", "{}"],
            [varlinkctl, "call", sock, "org.varlink.service.GetInfo", "{}"],
        )
        if composefsctl is not None:
            sides["composefsctl"] = (
                [composefsctl, "--connect", sock, "mount", name, str(mnt)],
                [composefsctl, "--connect", sock, "unmount", str(mnt)],
            )
        print(
            f"\nMount + Unmount, {label}, {n} cycles x {rounds} rounds "
            f"(load {os.getloadavg()[0]:.2f}):"
        )
        for mount_cmd, umount_cmd in sides.values():  # warm up: page cache, first hash
            _time_cycles(1, mount_cmd, umount_cmd)
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
        results["daemon, in-process client"] = []
        for r in range(rounds):
            for side, (mount_cmd, umount_cmd) in sides.items():
                results[side].append(_time_cycles(n, mount_cmd, umount_cmd))
            results["daemon, in-process client"].append(_client_cycles(n, sock, name, mnt))
            c = sum(results["C mount.composefs"][-1])
            print(
                f"  round {r + 1}: "
                + "; ".join(
                    f"{side} {sum(rows[-1]):.2f} ms (mount {rows[-1][0]:.2f}, "
                    f"unmount {rows[-1][1]:.2f}) {sum(rows[-1]) / c:.2f}x"
                    for side, rows in results.items()
                )
            )
        c_med = statistics.median(sum(row) for row in results["C mount.composefs"])
        for side, rows in results.items():
            med = statistics.median(sum(row) for row in rows)
            print(f"  median {side:26} {med:7.2f} ms/cycle  ours/C {med / c_med:5.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument(
        "--usr-image",
        type=Path,
        default=None,
        help="a /usr-sized image file (C mkcomposefs /usr IMAGE) to mount too",
    )
    ap.add_argument("--usr-cycles", type=int, default=30)
    ap.add_argument("--skip-describe", action="store_true", help="only the Mount part")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cfs-service-bench-", dir=args.workdir))
    sock = str(work / "composefsd.sock")
    print(f"work dir {work}; CPUs {os.cpu_count()}; load average {os.getloadavg()}")
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "composefsd.service.daemon",
            "--repo",
            str(work / "repo"),
            "--listen",
            sock,
            "--runtime-dir",
            str(work / "run"),
            "--log-level",
            "warning",
            # C mkcomposefs's digests, for a like-for-like Mount against C's.
            "--algorithm",
            "sha256",
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start")
            time.sleep(0.05)
        if not args.skip_describe:
            bench_describe(sock, args.clients, args.seconds)
        bench_mount(work, sock, args.cycles, args.rounds, args.usr_image, args.usr_cycles)
    finally:
        subprocess.run(["umount", "-q", str(work / "mnt")], stderr=subprocess.DEVNULL)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
