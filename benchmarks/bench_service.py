#!/usr/bin/env python3
"""The daemon under load: Describe throughput and latency, and mounts through Varlink.

    python benchmarks/bench_service.py [--clients 16,64] [--client-procs 4] [--seconds 5]
        [--describe-only] [--cycles 100] [--rounds 3] [--workdir /var/tmp]

1. **Describe** (issue 16, goal 6: p99 under 20 ms with 64 concurrent clients, at
   least 5,000 calls/s with 16): each of ``--clients`` connections calls
   ``io.composefs.Repository.Describe`` for ``--seconds``, two ways: one call at
   a time (call, wait for the reply, call again: what real clients do), and 4
   calls pipelined per connection (the daemon still runs a connection's calls one
   after another, so latency there is mostly queueing). The connections are
   spread over ``--client-procs`` separate processes that speak the protocol on
   raw sockets (a pre-encoded call, replies split on NUL and checked, not
   parsed), so that the clients cost a few microseconds per call and do not
   share the daemon's GIL; a client per process, or ``varlinkctl`` per call,
   would measure the clients. Each setting runs ``--rounds`` times, alternating;
   the medians are compared with the goals. The reference is the goal: there is
   no C Varlink server for this interface.
2. **Mount + Unmount** through the daemon, each driven by a ``varlinkctl call``
   process (``Mount`` with ``where``, then ``Unmount``), ``--cycles`` times,
   against C ``mount.composefs`` + ``umount`` processes on the same image in the
   same run; prints ms per cycle and the ratio ours/C.

The daemon runs as ``python -m composefsd.service.daemon`` on a fresh repository
in ``--workdir``; everything is removed at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
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


_DESCRIBE_CALL = b'{"method":"' + IFACE.encode() + b'.Describe"}\0'


def _describe_worker(
    sock: str,
    conns: int,
    depth: int,
    start: float,
    stop: float,
    out: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    """``conns`` connections on raw sockets, each with ``depth`` calls in flight
    (1: call, wait for the reply, call again, as real clients do). Replies are
    split on NUL and checked to be replies, not errors, but not parsed: the
    client's own cost per call stays a few microseconds."""
    socks = []
    for _ in range(conns):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock)
        s.setblocking(False)
        socks.append(s)
    poller = select.epoll()
    sent: dict[int, deque[float]] = {s.fileno(): deque() for s in socks}
    rest: dict[int, bytes] = {s.fileno(): b"" for s in socks}
    by_fd = {s.fileno(): s for s in socks}
    for s in socks:
        poller.register(s.fileno(), select.EPOLLIN)
    latencies: list[float] = []
    errors = 0
    while time.time() < start:
        time.sleep(0.001)
    clock = time.perf_counter
    end = clock() + (stop - time.time())
    for s in socks:
        now = clock()
        s.send(_DESCRIBE_CALL * depth)
        sent[s.fileno()].extend([now] * depth)
    in_flight = conns * depth
    stopping = False
    while in_flight:
        for fd, _ in poller.poll(1.0):
            data = by_fd[fd].recv(1 << 16)
            if not data:
                raise SystemExit("the daemon closed a connection")
            *replies, rest[fd] = (rest[fd] + data).split(b"\0")
            now = clock()
            queue = sent[fd]
            for reply in replies:
                latencies.append(now - queue.popleft())
                if not reply.startswith(b'{"parameters"'):
                    errors += 1
            in_flight -= len(replies)
            if not stopping and now >= end:
                stopping = True
            if not stopping:
                by_fd[fd].send(_DESCRIBE_CALL * len(replies))
                queue.extend([now] * len(replies))
                in_flight += len(replies)
    for s in socks:
        s.close()
    out.put((latencies, errors))


def describe_load(
    sock: str, clients: int, procs: int, depth: int, seconds: float
) -> tuple[float, float]:
    """``clients`` connections spread over ``procs`` client processes."""
    procs = max(1, min(procs, clients))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    start = time.time() + 0.5 + clients * 0.01
    stop = start + seconds
    share = [clients // procs + (i < clients % procs) for i in range(procs)]
    workers = [
        ctx.Process(target=_describe_worker, args=(sock, n, depth, start, stop, queue))
        for n in share
    ]
    for p in workers:
        p.start()
    latencies: list[float] = []
    errors = 0
    for _ in workers:
        lat, err = queue.get()
        latencies.extend(lat)
        errors += err
    for p in workers:
        p.join()
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(n - 1, int(q * n))] * 1000

    rate = n / seconds
    how = "call, wait, call" if depth == 1 else f"{depth} calls pipelined per connection"
    print(
        f"Describe, {clients} connections in {procs} client processes ({how}), "
        f"{seconds:g} s: {n} calls, {rate:.0f} calls/s; latency ms p50 {pct(0.50):.2f} "
        f"p90 {pct(0.90):.2f} p99 {pct(0.99):.2f} max {latencies[-1] * 1000:.2f}"
        + (f"; {errors} ERROR REPLIES" if errors else "")
    )
    return rate, pct(0.99)


def bench_describe(sock: str, clients: list[int], procs: int, seconds: float, rounds: int) -> None:
    """Goal 6: at 64 clients p99 < 20 ms; at 16 clients >= 5,000 calls/s. Both
    ways a client can drive the daemon, each clients x depth run ``rounds`` times
    (alternating), medians reported."""
    results: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for n in clients:
            for depth in (1, 4):
                results.setdefault((n, depth), []).append(
                    describe_load(sock, n, procs, depth, seconds)
                )
    for (n, depth), rows in results.items():
        rate = statistics.median(r for r, _ in rows)
        p99 = statistics.median(p for _, p in rows)
        goals = []
        if n >= 64:
            goals.append(f"p99 < 20 ms: {'met' if p99 < 20 else 'NOT met'}")
        if n == 16:
            goals.append(f">= 5000 calls/s: {'met' if rate >= 5000 else 'NOT met'}")
        print(
            f"median of {len(rows)}: {n} clients, depth {depth}: {rate:.0f} calls/s, "
            f"p99 {p99:.2f} ms" + (f"  ({'; '.join(goals)})" if goals else "")
        )


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


def bench_mount(work: Path, sock: str, cycles: int, rounds: int) -> None:
    ref = reference_bin()
    varlinkctl = str(ref / "varlinkctl")
    src = work / "src"
    _tree(src, 300)
    objs, image, mnt = work / "objs", work / "c.cfs", work / "mnt"
    objs.mkdir()
    mnt.mkdir()
    subprocess.run(
        [str(ref / "mkcomposefs"), f"--digest-store={objs}", str(src), str(image)], check=True
    )
    with connect(sock) as conn:
        conn.call(f"{IFACE}.CreateImage", {"sourcePath": str(src), "ref": "bench"})
    c_mount = [str(ref / "mount.composefs"), "-o", f"basedir={objs}", str(image), str(mnt)]
    ours_mount = [
        varlinkctl,
        "call",
        sock,
        f"{IFACE}.Mount",
        f'{{"image": "bench", "where": "{mnt}"}}',
    ]
    ours_umount = [varlinkctl, "call", sock, f"{IFACE}.Unmount", f'{{"where": "{mnt}"}}']
    rows = []
    for r in range(rounds):
        c = _time_cycles(cycles, c_mount, ["umount", str(mnt)])
        o = _time_cycles(cycles, ours_mount, ours_umount)
        rows.append((c, o))
        print(
            f"round {r + 1}: C {sum(c):.2f} ms/cycle (mount {c[0]:.2f}, umount {c[1]:.2f}); "
            f"daemon via varlinkctl {sum(o):.2f} ms/cycle (Mount {o[0]:.2f}, Unmount {o[1]:.2f}); "
            f"ours/C {sum(o) / sum(c):.2f}"
        )
    c_med = statistics.median(sum(c) for c, _ in rows)
    o_med = statistics.median(sum(o) for _, o in rows)
    print(
        f"Mount + Unmount, {cycles} cycles x {rounds} rounds, median: C {c_med:.2f} ms/cycle, "
        f"daemon via varlinkctl {o_med:.2f} ms/cycle, ours/C {o_med / c_med:.2f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="16,64", help="connection counts, comma-separated")
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--describe-only", action="store_true")
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp")
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
        clients = [int(n) for n in args.clients.split(",")]
        bench_describe(sock, clients, args.client_procs, args.seconds, args.rounds)
        if not args.describe_only:
            bench_mount(work, sock, args.cycles, args.rounds)
    finally:
        subprocess.run(["umount", "-q", str(work / "mnt")], stderr=subprocess.DEVNULL)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
