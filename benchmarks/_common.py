"""Helpers the benchmarks share: where the C reference tools are, page-cache warming,
and the best time of a few rounds."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def best_of(rounds: int, fn: Callable[[], object]) -> float:
    """The shortest of ``rounds`` timed calls of ``fn``, in seconds; garbage is
    collected before each, so that no round pays for the one before."""
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def interpreter_starts() -> list[tuple[str, list[str]]]:
    """The interpreter starts that bound a command of ours from below, (label, argv)
    each: bare ones (``-I -S -c pass``: no site hooks, nothing of ours imported) of
    this interpreter (the venv's) and of Debian's ``/usr/bin/python3`` where there is
    one; and this one's ``-c pass`` with the site hooks, as our console scripts
    start (on a machine whose site-packages has ``.pth`` hooks, they cost more than
    any tool of ours)."""
    venv = "venv python" if sys.prefix != sys.base_prefix else sys.executable
    starts = [(f"{venv} -I -S", [sys.executable, "-I", "-S", "-c", "pass"])]
    if os.path.exists("/usr/bin/python3"):
        starts.append(("/usr/bin/python3 -I -S", ["/usr/bin/python3", "-I", "-S", "-c", "pass"]))
    starts.append((f"{venv} with site", [sys.executable, "-c", "pass"]))
    return starts


def floor_verdict(floor_ms: float, goal_ms: float, what: str) -> str:
    """``floor X ms vs goal Y ms: reachable`` when a goal lies above the least a
    command can cost (``floor_ms``: the processes it cannot do without), else says
    that the goal is below ``what``'s own start."""
    verdict = "reachable" if floor_ms < goal_ms else f"below {what}'s own start"
    return f"floor {floor_ms:.1f} ms vs goal {goal_ms:.1f} ms: {verdict}"


def reference_bin() -> Path:
    env = os.environ.get("COMPOSEFS_REFERENCE_BIN")
    if env:
        return Path(env)
    shared = Path(os.environ.get("COMPOSEFSD_SHARED") or REPO.parent / "shared")
    script = shared / "tools" / "reference-tools"
    out = subprocess.run([str(script)], check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def warm_cache(tree: Path) -> tuple[int, int]:
    """Read every regular file once; returns (files, bytes)."""
    paths: list[str] = []
    for dirpath, _dirs, files in os.walk(tree):
        paths.extend(os.path.join(dirpath, f) for f in files)

    def read(path: str) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return 0
        total = 0
        try:
            if not os.path.isfile(f"/proc/self/fd/{fd}"):
                return 0
            while chunk := os.read(fd, 1 << 20):
                total += len(chunk)
        except OSError:
            pass
        finally:
            os.close(fd)
        return total

    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(read, paths, chunksize=256))
    return sum(1 for s in sizes if s), sum(sizes)


def start_daemon(repo: Path, sock: Path, runtime: Path, *extra: str) -> subprocess.Popen[bytes]:
    """composefsd on ``repo`` listening on ``sock`` (SHA-256, so that digests compare
    with C mkcomposefs's; warnings only; no registry), once it accepts connections."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "composefsd.service.daemon", "--repo", str(repo),
         "--listen", str(sock), "--runtime-dir", str(runtime), "--algorithm", "sha256",
         "--no-registry", "--log-level", "warning", *extra],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                return daemon
            except OSError:
                pass
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            raise SystemExit("composefsd did not start")
        time.sleep(0.05)
