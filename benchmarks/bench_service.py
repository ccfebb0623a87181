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
   parsed), so that the clients cost little per call (12 to 32 µs here) and do not
   share the daemon's GIL; a client per process, or ``varlinkctl`` per call,
   would measure the clients. Each run prints the daemon's CPU time and context
   switches per call (``/proc``) and the client processes' CPU per call and share
   of a CPU (they share the machine's CPUs with the daemon). Each setting runs
   ``--rounds`` times, alternating; the medians are compared with the goals. The
   reference is the goal: there is no C Varlink server for this interface.
2. **Mount + Unmount** through the daemon, each driven by a ``varlinkctl call``
   process (``Mount`` with ``where``, then ``Unmount``), ``--cycles`` times,
   against C ``mount.composefs`` + ``umount`` processes on the same image in the
   same run; prints ms per cycle and the ratio ours/C. The same with
   ``composefsctl mount``/``unmount``, two ``composefsctl status`` (what the
   composefsctl side costs without the mount), and the daemon's own part (both
   calls from this process). Beside them the floors, what no implementation of a side can go
   below: for varlinkctl (goal 1.0x C) two ``varlinkctl call`` processes of
   ``org.varlink.service.GetInfo``; for composefsctl (goal 1.5x C) two bare
   interpreter starts (``python -I -S -c pass``, the venv's and /usr/bin/python3,
   and the venv's ``python -c pass`` with site hooks, as our console scripts start);
   each printed against its goal as reachable or not. The sides take turns cycle
   by cycle, ``--cycles`` per round; medians over every cycle of every round. For
   a small image and, with ``--usr-image`` (``mkcomposefs /usr usr.cfs``), a
   /usr-sized one, put into the repository as it is; ``--skip-describe`` runs
   only this part.

The daemon runs as ``python -m composefsd.service.daemon`` on a fresh repository
in ``--workdir``; everything is removed at the end. The package is byte-compiled
first, as pip does when it installs (with $PYTHONDONTWRITEBYTECODE set, an
editable install would otherwise compile what it imports at every start).
"""

from __future__ import annotations

import argparse
import compileall
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

import composefsd
from _common import floor_verdict, interpreter_starts, reference_bin, start_daemon
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
    client's own cost per call stays small (it is printed)."""
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
    t = os.times()
    out.put((latencies, errors, t.user + t.system))


def _usage(pid: int) -> tuple[float, int]:
    """User + system time of process ``pid`` (all its threads) so far, and the
    context switches of its threads (those alive now): each time one of them slept
    and had to be woken, or was preempted."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    switches = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if "ctxt_switches:" in line:
                switches += int(line.split()[1])
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), switches


def describe_load(
    sock: str, daemon_pid: int, clients: int, procs: int, depth: int, seconds: float
) -> tuple[float, float]:
    """``clients`` connections spread over ``procs`` client processes. Beside the
    rate and latencies it prints the CPU time per call of the daemon and of the
    client processes (the clients share the CPUs with the daemon)."""
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
    client_cpu = 0.0
    while time.time() < start:
        time.sleep(0.001)
    daemon_cpu, daemon_switches = _usage(daemon_pid)
    for _ in workers:
        lat, err, cpu = queue.get()
        latencies.extend(lat)
        errors += err
        client_cpu += cpu
    cpu_after, switches_after = _usage(daemon_pid)
    daemon_cpu = cpu_after - daemon_cpu
    daemon_switches = switches_after - daemon_switches
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
        f"p90 {pct(0.90):.2f} p99 {pct(0.99):.2f} max {latencies[-1] * 1000:.2f}; "
        f"per call: daemon CPU {daemon_cpu / n * 1e6:.0f} us and "
        f"{daemon_switches / n:.2f} context switches, clients CPU "
        f"{client_cpu / n * 1e6:.0f} us ({client_cpu / seconds * 100:.0f}% of a CPU); "
        f"load {os.getloadavg()[0]:.1f}" + (f"; {errors} ERROR REPLIES" if errors else "")
    )
    return rate, pct(0.99)


def bench_describe(
    sock: str, daemon_pid: int, clients: list[int], procs: int, seconds: float, rounds: int
) -> None:
    """Goal 6: at 64 clients p99 < 20 ms; at 16 clients >= 5,000 calls/s. Both
    ways a client can drive the daemon, each clients x depth run ``rounds`` times
    (alternating), medians reported."""
    results: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for n in clients:
            for depth in (1, 4):
                results.setdefault((n, depth), []).append(
                    describe_load(sock, daemon_pid, n, procs, depth, seconds)
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


def _run(argv: list[str]) -> tuple[float, float]:
    """(wall, cpu) ms of one run of ``argv`` (cpu: the process's user + system time,
    from wait4; a daemon's work for it is not in it); it must succeed."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv}: exit status {proc.returncode}")
    return wall * 1000, (usage.ru_utime + usage.ru_stime) * 1000


def _process_cycle(mount: list[str], umount: list[str]) -> tuple[float, float, float]:
    """One cycle of two processes: the wall ms of each, and their cpu ms together."""
    wall_mount, cpu_mount = _run(mount)
    wall_umount, cpu_umount = _run(umount)
    return wall_mount, wall_umount, cpu_mount + cpu_umount


def _client_cycle(sock: str, image: str, mnt: Path) -> tuple[float, float, float]:
    """Mount + Unmount from this process, a connection each: the daemon's part, with
    no client process to start."""
    t0 = time.perf_counter()
    with connect(sock) as conn:
        conn.call(f"{IFACE}.Mount", {"image": image, "where": str(mnt)})
    t1 = time.perf_counter()
    with connect(sock) as conn:
        conn.call(f"{IFACE}.Unmount", {"where": str(mnt)})
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000, float("nan")


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
    ``composefsctl mount`` + ``unmount`` through the daemon, and the floors; in turn,
    cycle by cycle."""
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
        sides["floor: varlinkctl GetInfo x2"] = (
            [varlinkctl, "call", sock, "org.varlink.service.GetInfo", "{}"],
            [varlinkctl, "call", sock, "org.varlink.service.GetInfo", "{}"],
        )
        if composefsctl is not None:
            sides["composefsctl"] = (
                [composefsctl, "--connect", sock, "mount", name, str(mnt)],
                [composefsctl, "--connect", sock, "unmount", str(mnt)],
            )
            # What two composefsctl calls cost that do no work in the daemon: the
            # rest of the composefsctl side is what mount and unmount add.
            sides["composefsctl status x2"] = (
                [composefsctl, "--connect", sock, "status"],
                [composefsctl, "--connect", sock, "status"],
            )
        # The floors of the composefsctl side: two interpreter starts.
        for python, argv in interpreter_starts():
            sides[f"floor: {python} x2"] = (argv, argv)
        print(
            f"\nMount + Unmount, {label}, {n} cycles x {rounds} rounds, sides in turn "
            f"(load {os.getloadavg()[0]:.2f}):"
        )
        for mount_cmd, umount_cmd in sides.values():  # warm up: page cache, first hash
            _process_cycle(mount_cmd, umount_cmd)
        in_process = "daemon, in-process client"
        results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in [*sides, in_process]}
        for r in range(rounds):
            for _ in range(n):
                for side, (mount_cmd, umount_cmd) in sides.items():
                    results[side].append(_process_cycle(mount_cmd, umount_cmd))
                results[in_process].append(_client_cycle(sock, name, mnt))
            c = statistics.median(m + u for m, u, _ in results["C mount.composefs"][-n:])
            print(
                f"  round {r + 1} (load {os.getloadavg()[0]:.2f}), wall medians: "
                + "; ".join(
                    f"{side} {statistics.median(m + u for m, u, _ in rows[-n:]):.2f} ms "
                    f"{statistics.median(m + u for m, u, _ in rows[-n:]) / c:.2f}x"
                    for side, rows in results.items()
                )
            )
        meds = {
            side: statistics.median(m + u for m, u, _ in rows) for side, rows in results.items()
        }
        c_med = meds["C mount.composefs"]
        c_cpu = statistics.median(row[2] for row in results["C mount.composefs"])
        print(
            f"  median of all {rounds * n} cycles: wall ms per cycle (mount, unmount parts), "
            "ours/C; the processes' cpu ms per cycle, ours/C"
        )
        for side, rows in results.items():
            parts = [statistics.median(row[i] for row in rows) for i in (0, 1, 2)]
            print(
                f"    {side:44} {meds[side]:7.2f} ({parts[0]:6.2f}, {parts[1]:6.2f}) "
                f"{meds[side] / c_med:5.2f}x; cpu {parts[2]:6.2f} {parts[2] / c_cpu:5.2f}x"
            )
        cpus = {
            side: statistics.median(row[2] for row in rows)
            for side, rows in results.items()
            if side != in_process
        }
        for what, value in (("wall", meds), ("cpu of the processes", cpus)):
            c_value = value["C mount.composefs"]
            print(f"  goals and floors, {what} (C's cycle: its mount.composefs and umount):")
            goal = c_value
            print(
                f"    varlinkctl <= 1.0x C: {value['varlinkctl']:.1f} ms vs {goal:.1f} ms "
                f"({'met' if value['varlinkctl'] <= goal else 'NOT met'}); "
                + floor_verdict(value["floor: varlinkctl GetInfo x2"], goal, "varlinkctl")
            )
            if composefsctl is None:
                continue
            goal = 1.5 * c_value
            print(
                f"    composefsctl <= 1.5x C: {value['composefsctl']:.1f} ms vs {goal:.1f} ms "
                f"({'met' if value['composefsctl'] <= goal else 'NOT met'})"
            )
            for python, _argv in interpreter_starts():
                print(
                    f"      two {python} starts: "
                    + floor_verdict(value[f"floor: {python} x2"], goal, "the interpreter")
                )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="16,64", help="connection counts, comma-separated")
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--describe-only", action="store_true")
    ap.add_argument("--cycles", type=int, default=100, help="Mount + Unmount cycles per round")
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
    compileall.compile_dir(Path(composefsd.__file__).parent, quiet=1)
    work = Path(tempfile.mkdtemp(prefix="cfs-service-bench-", dir=args.workdir))
    sock = str(work / "composefsd.sock")
    print(f"work dir {work}; CPUs {os.cpu_count()}; load average {os.getloadavg()}")
    daemon = start_daemon(work / "repo", Path(sock), work / "run")
    try:
        if not args.skip_describe:
            clients = [int(n) for n in args.clients.split(",")]
            bench_describe(sock, daemon.pid, clients, args.client_procs, args.seconds, args.rounds)
        if not args.describe_only:
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
