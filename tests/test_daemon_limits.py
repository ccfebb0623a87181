"""composefsd against a hostile local user (issue 11, points 4 to 7), as a real daemon
with callers that are real other users (the session's throw-away ``test_users``).

* Bad input gets the error it should: deeply nested JSON is a protocol error, lone
  surrogates are InvalidParameter, over-long, over-deep and control-character ref
  names are InvalidName, and names end up escaped in the daemon's log.
* Memory: connections holding partial messages cannot take the daemon's memory,
  and what they held is given back once they are gone.
* Connections: one uid cannot open so many that others are locked out; root is
  always served.
* Work: one uid flooding heavy calls (Verify) does not slow down others' cheap
  calls (Describe).

Users' clients are ``tests/peer.py`` run as those users; they report on stdout
and wait for a line on stdin, so every step waits for an event, not for a time.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import users
from composefsd.kernel.mountinfo import composefs_mount_at
from composefsd.kernel.syscalls import MNT_DETACH, umount2
from composefsd.service.client import VarlinkCallError, connect
from composefsd.service.daemon import _Formatter, _JournalFormatter
from conftest import TestUsers
from servicehelpers import Daemon, running_daemon, start_daemon
from trees import random_tree, small_tree

IFACE = "io.composefs.Repository"


# -- helpers ----------------------------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


class Peer:
    """tests/peer.py run as a test user; its reports are JSON lines."""

    def __init__(
        self, py: users.UserPython, user: users.TestUser, address: str, *args: str
    ) -> None:
        self.argv = py.command(py.script("peer.py"), address, *args)
        self.proc = users.popen_as(
            user,
            self.argv,
            env=py.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def report(self, timeout: float = 300.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"peer {self.argv[2:]} reported nothing: {err}")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def tell(self, line: str = "") -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.report()

    def finish(self) -> dict[str, Any]:
        doc = self.tell()
        assert self.proc.wait(60) == 0
        return doc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Peers started by a test, killed if it fails half-way."""
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.kill()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon every user may connect to, for one test."""
    with running_daemon(tmp_path / "repo", public=True) as d:
        yield d


def raw_call(address: str, message: bytes, timeout: float = 60) -> dict[str, Any] | None:
    """Send one raw message, return the reply (None if the daemon closed instead)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(message)
        buf = b""
        while b"\0" not in buf:
            data = sock.recv(1 << 16)
            if not data:
                return None
            buf += data
        reply: dict[str, Any] = json.loads(buf[: buf.index(b"\0")])
        return reply


# -- 7: bad input -----------------------------------------------------------------------------


def test_deeply_nested_json_is_a_protocol_error(
    daemon: Daemon, test_users: TestUsers, user_python: users.UserPython
) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1])\n"
        's.sendall(b\'{"method":"io.composefs.Repository.Describe","parameters":{"x":\''
        "+b'['*100000+b']'*100000+b'}}\\0')\n"
        "print(repr(s.recv(100)))\n"
    )
    out = users.run_as(
        test_users.alice,
        user_python.command("-c", script, daemon.address),
        env=user_python.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "b''"  # closed without a reply
    # From root too (the protocol has no privileged peers).
    head = b'{"method":"io.composefs.Repository.Describe","parameters":{"x":'
    assert raw_call(daemon.address, head + nested + b"}}\0") is None
    log = daemon.log_text()
    assert "JSON nested 100002 levels deep (at most 64)" in log, log
    assert "call processing failed" not in log and "Traceback" not in log
    with connect(daemon.address) as conn:
        assert conn.call(f"{IFACE}.Describe")["images"] == 0


@pytest.mark.parametrize(
    ("method", "parameters", "path"),
    [
        ("ListImages", b'{"image":"\\udcff"}', "image"),
        ("Verify", b'{"image":"os/\\ud800v1"}', "image"),
        ("ListMounts", b'{"all":true,"\\udcff":1}', "\\udcff"),
        ("CreateImage", b'{"sourcePath":"/tmp/\\udcff"}', "sourcePath"),
        ("Mount", b'{"image":"x","where":"/mnt/\\udfff"}', "where"),
    ],
)
def test_lone_surrogates_are_invalid_parameters(
    daemon: Daemon, method: str, parameters: bytes, path: str
) -> None:
    message = b'{"method":"' + f"{IFACE}.{method}".encode() + b'","parameters":' + parameters
    reply = raw_call(daemon.address, message + b"}\0")
    assert reply == {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": path},
    }
    assert "Traceback" not in daemon.log_text()


def test_bad_ref_names_are_invalid_names(
    daemon: Daemon, test_users: TestUsers, tmp_path: Path, user_python: users.UserPython
) -> None:
    tree = small_tree(tmp_path / "tree")
    deep = "/".join(["d"] * 1999)
    lines_before = len(daemon.log_text().splitlines())
    with connect(daemon.address) as conn:
        for ref, why in (
            (deep, "1999 components, at most 64"),
            ("x" * 1025, "1025 bytes, at most 1024"),
            ("os/v1\nforged", "control characters"),
            ("tab\there", "control characters"),
        ):
            with pytest.raises(VarlinkCallError) as info:
                conn.call(f"{IFACE}.CreateImage", {"sourcePath": str(tree), "ref": ref})
            err = info.value
            assert err.name == f"{IFACE}.InvalidName", err
            assert err.parameters["name"] == ref and why in err.parameters["message"]
        assert conn.call(f"{IFACE}.Describe")["refs"] == 0
    # Names from another user are checked the same way.
    script = (
        "import socket,sys,json\n"
        "s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1])\n"
        "s.sendall(json.dumps({'method':'io.composefs.Repository.Verify',"
        "'parameters':{'image':sys.argv[2]}}).encode()+b'\\0')\n"
        "print(s.recv(65536).rstrip(b'\\0').decode())\n"
    )
    for name in (deep, "a\x1b[2Jb"):
        out = users.run_as(
            test_users.alice,
            user_python.command("-c", script, daemon.address, name),
            env=user_python.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["error"] == f"{IFACE}.InvalidName"
    log = daemon.log_text()
    assert "recursion" not in log and "Traceback" not in log
    # A few lines per call, not thousands.
    assert len(log.splitlines()) - lines_before < 40


def test_log_formatters_escape_the_message_not_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "composefsd", logging.ERROR, __file__, 1, "removed %s", ("a\n<3>forged",), exc_info
    )
    text = _JournalFormatter("%(message)s").format(record)
    lines = text.splitlines()
    assert lines[0] == "<3>removed a\\n<3>forged"
    assert lines[1] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ValueError: boom"
    record.exc_info = None
    record.exc_text = None
    plain = _Formatter("%(levelname)s: %(message)s").format(record)
    assert plain == "ERROR: removed a\\n<3>forged"


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """conftest's mnt, at a name that would forge a journal entry if logged as is."""
    where = tmp_path / "mnt\n<3>forged entry"
    where.mkdir()
    yield where
    while composefs_mount_at(str(where)) is not None:
        umount2(str(where), MNT_DETACH)


def test_names_in_the_daemons_log_are_escaped(tmp_path: Path, mnt: Path) -> None:
    d = start_daemon(tmp_path / "repo", env={**os.environ, "JOURNAL_STREAM": "8:1234"})
    try:
        with connect(d.address) as conn:
            tree = small_tree(tmp_path / "tree")
            conn.call(f"{IFACE}.CreateImage", {"sourcePath": str(tree), "ref": "base"})
            conn.call(f"{IFACE}.Mount", {"image": "base", "where": str(mnt)})
            conn.call(f"{IFACE}.Unmount", {"where": str(mnt)})
        # Logged before the replies went out.
        lines = d.log_text().splitlines()
    finally:
        assert d.stop() == 0
    assert not [line for line in lines if line.startswith("<3>forged")], lines
    mounted = [line for line in lines if line.startswith("<6>mounted image ")]
    assert len(mounted) == 1 and "mnt\\n<3>forged entry" in mounted[0], lines


# -- 4: memory --------------------------------------------------------------------------------

#: What the memory attack may add to the daemon's RSS at its peak (README, "Limits"):
#: the 32 MiB input budget, one 64 KiB read per connection, the heap's slack.
RSS_BOUND_MIB = 128
#: What may stay of it once the attackers are gone.
RSS_AFTER_MIB = 8
#: The start of a call that never ends.
PARTIAL_HEAD = b'{"method":"io.composefs.Repository.Describe","parameters":{"x":"'


def wait_for_log(d: Daemon, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := d.log_text()):
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{log[-3000:]}"
        time.sleep(0.05)
    return log


def test_partial_messages_cannot_take_the_daemons_memory(
    tmp_path: Path, test_users: TestUsers, peers: list[Peer], user_python: users.UserPython
) -> None:
    """With the default limits: 250 connections (125 each from two users, under the
    per-uid limit) each send 16 MiB of a message that never ends; then 250 hold
    200 KiB each, under the message limit but 50 MiB in all, over the input budget.
    Root holds a partial message of its own throughout and is served all along; the
    daemon's RSS stays under the bound and comes back down once they are gone."""
    d = start_daemon(tmp_path / "repo", public=True)
    pid = d.proc.pid
    try:
        with connect(d.address) as conn:
            conn.call(f"{IFACE}.Describe")
        base = status_kib(pid, "VmRSS")
        mine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mine.settimeout(60)
        mine.connect(d.address)
        mine.sendall(PARTIAL_HEAD + b"r" * (200 << 10))

        samples: list[tuple[str, int]] = []
        for phase, size in (("16 MiB each", 16 << 20), ("200 KiB each", 200 << 10)):
            attackers = [
                Peer(user_python, user, d.address, "partial", "125", str(size))
                for user in (test_users.alice, test_users.bob)
            ]
            peers.extend(attackers)
            reports = [a.report() for a in attackers]
            if size > (256 << 10):
                # Over the message limit: every connection was closed.
                assert [r["closed"] for r in reports] == [125, 125], reports
            else:
                # Under it, but over the budget in all: the largest holders go.
                wait_for_log(d, "bytes of input and all connections together more than")
            samples.append((phase, status_kib(pid, "VmRSS")))
            with connect(d.address) as conn:
                assert conn.call(f"{IFACE}.Describe")["images"] == 0
            for a in attackers:
                a.finish()
        peak = status_kib(pid, "VmHWM")
        # Root's partial message was never dropped: it ends, and gets its reply.
        mine.sendall(b'"}}\0')
        reply = json.loads(mine.recv(1 << 16).rstrip(b"\0"))
        assert reply["parameters"] == {"parameter": "x"}, reply
        mine.close()
        deadline = time.monotonic() + 30
        while (after := status_kib(pid, "VmRSS")) > base + (RSS_AFTER_MIB << 10):
            assert time.monotonic() < deadline, f"RSS stays at {after} KiB (base {base})"
            time.sleep(0.2)
        print(
            f"\nRSS base {base >> 10} MiB, peak {peak >> 10} MiB "
            f"(bound: base + {RSS_BOUND_MIB} MiB), after {after >> 10} MiB; "
            + ", ".join(f"{name}: {kib >> 10} MiB" for name, kib in samples)
        )
        assert peak - base < RSS_BOUND_MIB << 10
        assert peak < 300 << 10
        assert "Traceback" not in d.log_text()
    finally:
        assert d.stop() == 0


def test_incomplete_messages_time_out(
    tmp_path: Path, test_users: TestUsers, peers: list[Peer], user_python: users.UserPython
) -> None:
    d = start_daemon(tmp_path / "repo", "--message-timeout", "1", public=True)
    try:
        slow = Peer(user_python, test_users.alice, d.address, "partial", "20", "1000")
        peers.append(slow)
        assert slow.report()["connections"] == 20
        # The daemon closes each once its message has been incomplete for 1 s.
        assert slow.tell("wait") == {"closed": 20}
        slow.finish()
        log = d.log_text()
        assert "closing: a message stayed incomplete for 1 s" in log
        # Logged once (per 10 s and uid), not 20 times.
        assert log.count("stayed incomplete") == 1, log
        with connect(d.address) as conn:
            assert conn.call(f"{IFACE}.Describe")["images"] == 0
    finally:
        assert d.stop() == 0


# -- 5: connections ---------------------------------------------------------------------------


def test_one_uid_cannot_lock_others_out(
    tmp_path: Path, test_users: TestUsers, peers: list[Peer], user_python: users.UserPython
) -> None:
    """alice opens 4,096 connections: the first 128 (the default per-uid limit) are
    served, the rest refused with TooManyConnections; meanwhile bob and root are
    served, root beyond any limit. (test_service_transport shows varlinkctl reading
    the refusal.)"""
    d = start_daemon(tmp_path / "repo", public=True)
    held: list[socket.socket] = []
    try:
        alice = Peer(user_python, test_users.alice, d.address, "connections", "4096")
        peers.append(alice)
        got = alice.report()
        assert (got["answered"], got["refused"], got["other"]) == (128, 3968, []), got
        assert got["refusals"][0] == {
            "error": f"{IFACE}.TooManyConnections",
            "parameters": {
                "limit": 128,
                "message": f"uid {test_users.alice.uid} has 128 connections open, "
                "at most 128 are allowed",
            },
        }
        # bob is another uid: unaffected.
        bob = Peer(user_python, test_users.bob, d.address, "connections", "20")
        peers.append(bob)
        assert bob.report()["answered"] == 20
        # Root is always served, however many connections it holds.
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(60)
            sock.connect(d.address)
            held.append(sock)
        for sock in held[::50]:
            sock.sendall(b'{"method":"io.composefs.Repository.Describe"}\0')
            assert b'"images":0' in sock.recv(1 << 16)
        with connect(d.address) as conn:
            assert conn.call(f"{IFACE}.Describe")["images"] == 0
        # Once alice lets go, she is served again.
        alice.finish()
        bob.finish()
        again = Peer(user_python, test_users.alice, d.address, "connections", "1")
        peers.append(again)
        assert again.report()["answered"] == 1
        again.finish()
        # Thousands of refusals, a line or two in the log.
        refusals = d.log_text().count("refusing a connection")
        assert 1 <= refusals <= 3, refusals
    finally:
        for sock in held:
            sock.close()
        assert d.stop() == 0


# -- 6: work ----------------------------------------------------------------------------------

#: The bound the issue sets on cheap calls' latency while another uid floods heavy ones.
DESCRIBE_P99 = 0.100


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _describe_latencies(address: str, count: int) -> list[float]:
    times: list[float] = []
    with connect(address) as conn:
        for _ in range(count):
            started = time.perf_counter()
            conn.call(f"{IFACE}.Describe")
            times.append(time.perf_counter() - started)
    return times


def _big_tree(root: Path, seed: int) -> Path:
    """About 12 MiB in 48 files: a Verify of it takes a while (it hashes in userspace)."""
    return random_tree(
        root, seed=seed, files=48, dirs=4, sizes=range(128 << 10, 384 << 10), link=None
    )


def test_heavy_calls_of_one_uid_do_not_starve_others(
    tmp_path: Path, test_users: TestUsers, peers: list[Peer], user_python: users.UserPython
) -> None:
    """alice runs 64 loops of Verify; root's Describe keeps answering with a p99 under
    100 ms, and bob's Verify runs in its turn, not after alice's."""
    repo = tmp_path / "repo"
    d = start_daemon(repo, public=True)
    try:
        with connect(d.address) as conn:
            for i in range(3):
                tree = _big_tree(tmp_path / f"tree{i}", seed=i)
                conn.call(f"{IFACE}.CreateImage", {"sourcePath": str(tree), "ref": f"img{i}"})
        quiet = _describe_latencies(d.address, 50)
        flood = Peer(
            user_python,
            test_users.alice,
            d.address,
            "flood",
            "64",
            f"{IFACE}.Verify",
            '{"image":"img0"}',
        )
        peers.append(flood)
        assert flood.report() == {"flooding": 64}
        busy = _describe_latencies(d.address, 200)
        bob = Peer(
            user_python,
            test_users.bob,
            d.address,
            "flood",
            "1",
            f"{IFACE}.Verify",
            '{"image":"img1"}',
        )
        peers.append(bob)
        assert bob.report() == {"flooding": 1}
        bob_done = bob.finish()
        done = flood.finish()
        assert done["errors"] == [] and bob_done["errors"] == [], (done, bob_done)
        print(
            f"\nDescribe latency, quiet: p50 {_percentile(quiet, 0.5) * 1000:.1f} ms, "
            f"p99 {_percentile(quiet, 0.99) * 1000:.1f} ms; while alice floods Verify "
            f"(64 loops, {done['calls']} calls): p50 {_percentile(busy, 0.5) * 1000:.1f} ms, "
            f"p99 {_percentile(busy, 0.99) * 1000:.1f} ms, max {max(busy) * 1000:.1f} ms; "
            f"bob's Verify calls meanwhile: {bob_done['calls']}"
        )
        assert _percentile(busy, 0.99) < DESCRIBE_P99
    finally:
        assert d.stop() == 0


# -- options ----------------------------------------------------------------------------------


def test_open_file_limit_is_raised_and_respected(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        d = start_daemon(tmp_path / "repo", "--max-connections", str(hard), public=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert row.split()[3:5] == [str(hard), str(hard)], row
        # Room is left for root's connections and everything else.
        assert f"at most {hard - 256} connections (not {hard})" in d.log_text()
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-message-size", "0", "must be at least 1"),
        ("--max-message-size", "12Q", "not a size"),
        ("--max-buffered-input", "0M", "must be at least 1"),
        ("--max-connections-per-uid", "many", "not a number"),
        ("--message-timeout", "0", "must be more than 0"),
        ("--heavy-workers", "0", "must be at least 1"),
        ("--max-source-entries", "-5", "must be at least 1"),
    ],
)
def test_bad_limit_options(tmp_path: Path, option: str, value: str, message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "composefsd.service.daemon", "--repo", str(tmp_path), option, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
