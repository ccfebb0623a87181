"""Load: 64 concurrent clients mixing every kind of call against one daemon.

For ``COMPOSEFSD_LOAD_SECONDS`` (default 60) seconds, 64 threads, each with its
own connection, call Describe, ListImages, ListMounts, Verify, CreateImage, and
Mount + Unmount (each thread on its own mount point) at random. Afterwards:

* every call succeeded (there is no expected error in this mix), and no client thread
  ended with an exception (a broken connection, an OSError: see ``Workers``);
* the daemon's fd count is back to what it was before the load, and its RSS grew
  by less than 32 MiB between the end of the warm-up and the end (sampled every
  2 s; the samples are printed);
* nothing stayed mounted, and ``fsck`` finds the repository clean.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from composefsd.kernel.mountinfo import list_composefs_mounts
from composefsd.repository import Repository
from composefsd.service.client import VarlinkCallError, connect
from servicehelpers import Daemon, running_daemon, unmount_below
from trees import random_tree

IFACE = "io.composefs.Repository"
CLIENTS = 64
SECONDS = float(os.environ.get("COMPOSEFSD_LOAD_SECONDS", "60"))
WARMUP = min(10.0, SECONDS / 4)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _tree(root: Path, seed: int) -> Path:
    random_tree(root, seed=seed, files=24, dirs=4, sizes=(0, 50, 3000, 40_000), link=None)
    (root / "seed").write_text(str(seed))
    return root


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """composefsd on a new repository, at its default log level (debug lines for 64
    clients' calls would be load of their own); its exit status is not checked."""
    repo = tmp_path / "repo"
    Repository.init(repo)
    with running_daemon(repo, log_level="info", check_exit=False) as d:
        # One Describe first, as the test always made: it opens the mountinfo watch
        # the daemon keeps, which the fd count must not take for a leak of the load.
        with connect(d.address) as conn:
            conn.call(f"{IFACE}.Describe")
        try:
            yield d
        finally:
            unmount_below(tmp_path)


@dataclass(slots=True)
class Workers:
    """Threads whose exceptions are kept, so that a worker that dies (its connection
    broken, an OSError) fails the test instead of silently ending its share of the load."""

    threads: list[threading.Thread] = field(default_factory=list)
    #: (thread name, exception) of every worker that raised.
    failures: list[tuple[str, BaseException]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, name: str, target: Callable[..., object], *args: object) -> None:
        def run() -> None:
            try:
                target(*args)
            except BaseException as e:
                with self.lock:
                    self.failures.append((name, e))

        thread = threading.Thread(target=run, name=name)
        thread.start()
        self.threads.append(thread)

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def check(self) -> None:
        """Fail naming every worker that raised and its exception."""
        with self.lock:
            failures = list(self.failures)
        assert not failures, f"{len(failures)} of {len(self.threads)} workers failed: " + "; ".join(
            f"{name}: {type(e).__name__}: {e}" for name, e in failures
        )


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def _client(n: int, d: Daemon, sources: list[Path], mnt: Path, stop: float, tally: Tally) -> None:
    rng = random.Random(n)
    calls: Counter[str] = Counter()
    errors: list[str] = []
    with connect(d.address) as conn:
        while time.monotonic() < stop:
            op = rng.choices(
                ["Describe", "ListImages", "ListMounts", "Verify", "CreateImage", "Mount"],
                [30, 15, 10, 10, 10, 25],
            )[0]
            try:
                if op == "Describe":
                    conn.call(f"{IFACE}.Describe")
                elif op == "ListImages":
                    conn.call(f"{IFACE}.ListImages")
                elif op == "ListMounts":
                    conn.call(f"{IFACE}.ListMounts")
                elif op == "Verify":
                    reply = conn.call(f"{IFACE}.Verify", {"image": "base"})
                    if not reply.get("ok"):
                        errors.append(f"Verify: not ok: {dict(reply)}")
                elif op == "CreateImage":
                    src = rng.choice(sources)
                    conn.call(
                        f"{IFACE}.CreateImage",
                        {"sourcePath": str(src), "ref": f"load/{n}"},
                    )
                else:
                    conn.call(f"{IFACE}.Mount", {"image": "base", "where": str(mnt)})
                    if (mnt / "seed").read_text() != "0":
                        errors.append("Mount: wrong content")
                    conn.call(f"{IFACE}.Unmount", {"where": str(mnt)})
                    calls["Unmount"] += 1
                calls[op] += 1
            except VarlinkCallError as e:
                errors.append(f"{op}: {e}")
    with tally.lock:
        tally.calls.update(calls)
        tally.errors.extend(errors)


def test_64_clients_mixing_every_call(daemon: Daemon, tmp_path: Path) -> None:
    sources = [_tree(tmp_path / f"src{i}", i) for i in range(4)]
    with connect(daemon.address) as conn:
        conn.call(f"{IFACE}.CreateImage", {"sourcePath": str(sources[0]), "ref": "base"})
    pid = daemon.proc.pid
    time.sleep(0.5)  # let the daemon notice that the set-up connection closed
    fds_before = _fds(pid)
    tally = Tally()
    start = time.monotonic()
    stop = start + SECONDS
    workers = Workers()
    for n in range(CLIENTS):
        mnt = tmp_path / "mnt" / str(n)
        mnt.mkdir(parents=True)
        workers.start(f"client-{n}", _client, n, daemon, sources, mnt, stop, tally)
    samples: list[tuple[float, int, int]] = []
    while workers.alive():
        samples.append((time.monotonic() - start, _fds(pid), _rss_kib(pid)))
        time.sleep(2)
    workers.join()
    elapsed = time.monotonic() - start
    time.sleep(0.5)  # let the daemon close the last connections
    fds_after = _fds(pid)
    rss_after = _rss_kib(pid)
    total = sum(tally.calls.values())
    print(f"\n{total} calls in {elapsed:.1f} s ({total / elapsed:.0f}/s): {dict(tally.calls)}")
    print("samples (s, fds, RSS KiB):", samples)
    print(f"fds before {fds_before}, after {fds_after}; RSS at end {rss_after} KiB")

    workers.check()
    assert tally.errors == [], tally.errors[:10]
    assert daemon.proc.poll() is None, "the daemon died"
    for op in ("Describe", "ListImages", "ListMounts", "Verify", "CreateImage", "Mount"):
        assert tally.calls[op] > 0, f"no {op} ran"
    assert fds_after == fds_before, f"fds {fds_before} -> {fds_after}"
    warm = [rss for t, _fds_n, rss in samples if t >= WARMUP]
    assert warm, samples
    assert rss_after - warm[0] < 32 * 1024, f"RSS grew {warm[0]} -> {rss_after} KiB"
    assert not [m for m in list_composefs_mounts() if m.mountpoint.startswith(str(tmp_path))]
    report = Repository.open(daemon.repo).fsck()
    assert report.ok, report.to_dict()


def _hang_up_server(path: str) -> tuple[socket.socket, threading.Thread]:
    """A Unix socket that accepts connections, reads the first message and hangs up."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                peer, _ = server.accept()
            except OSError:
                return  # the test closed the server
            with peer:
                peer.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_a_worker_whose_connection_breaks_fails_the_load(tmp_path: Path) -> None:
    """A worker that raises is counted and named, not lost with its thread: one whose
    daemon hangs up mid-call, one that gets an OSError; a worker that returns is fine."""
    address = str(tmp_path / "sock")
    server, serving = _hang_up_server(address)

    def call_once() -> None:
        with connect(address) as conn:
            conn.call(f"{IFACE}.Describe")

    def os_error() -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    workers = Workers()
    try:
        workers.start("hung-up", call_once)
        workers.start("reset", os_error)
        workers.start("fine", lambda: None)
        workers.join()
    finally:
        server.close()
        serving.join(5)
    assert sorted(name for name, _ in workers.failures) == ["hung-up", "reset"]
    with pytest.raises(AssertionError) as failed:
        workers.check()
    message = str(failed.value)
    assert message.startswith("2 of 3 workers failed: "), message
    assert "hung-up: " in message and "reset: ConnectionResetError: " in message, message
    assert "fine" not in message, message
