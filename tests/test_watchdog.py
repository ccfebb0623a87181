"""The watchdog and STATUS= lines: WATCHDOG_USEC/WATCHDOG_PID read as
sd_watchdog_enabled() reads them, WATCHDOG=1 from the event loop (so none while
the loop is blocked), STATUS= sent when what the daemon does changes; and
sd_notify never blocking on a notify socket nobody reads."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefsd.service import client
from composefsd.service.activation import notify
from composefsd.service.watchdog import (
    StatusReporter,
    keep_alive,
    status_text,
    watchdog_interval,
)
from sdnotify import NotifyListener, notified_daemon
from servicehelpers import short_dir


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "3000000"}, 3.0),
        ({"WATCHDOG_USEC": "250000", "WATCHDOG_PID": "4242"}, 0.25),
        ({"WATCHDOG_USEC": "250000", "WATCHDOG_PID": "4243"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "3s"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}, None),
        ({"WATCHDOG_PID": "4242"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    environ = dict(env, OTHER="x")
    assert watchdog_interval(environ, pid=4242) == expected
    # Either way, children (skopeo, workers) do not see them.
    assert environ == {"OTHER": "x"}


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    d = short_dir("cfsd-wd-")
    listener = NotifyListener(d / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    try:
        yield listener
    finally:
        listener.close()
        (d / "notify").unlink()
        d.rmdir()


def test_keep_alive_stops_while_the_loop_is_blocked(notify_socket: NotifyListener) -> None:
    loop = asyncio.new_event_loop()
    task = loop.create_task(keep_alive(0.05))
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    blocked, release = threading.Event(), threading.Event()
    try:
        assert notify_socket.wait_for(lambda m: m == "WATCHDOG=1", 30) == "WATCHDOG=1"

        # The test-only hook: a callback that blocks the loop until released.
        def block() -> None:
            blocked.set()
            release.wait(60)

        loop.call_soon_threadsafe(block)
        assert blocked.wait(30)
        notify_socket.drain()  # sent before the block: every send is synchronous
        # Many intervals, and nothing.
        assert notify_socket.receive(1.0) is None
        release.set()
        assert notify_socket.wait_for(lambda m: m == "WATCHDOG=1", 30) == "WATCHDOG=1"
    finally:
        release.set()
        loop.call_soon_threadsafe(task.cancel)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(30)
        loop.close()


class _Counts:
    def __init__(self) -> None:
        self.connections = 0
        self.calls_in_flight = 0


def test_status_reporter_sends_changes_only() -> None:
    sent: list[str] = []
    counts = _Counts()

    def send(text: str) -> bool:
        sent.append(text)
        return True

    reporter = StatusReporter(counts, send=send)
    reporter.update()
    reporter.update()
    counts.connections = 1
    reporter.update()
    reporter.update("reloading the configuration")
    reporter.update()
    counts.connections, counts.calls_in_flight = 3, 2
    reporter.update()
    assert sent == [
        "STATUS=serving 0 connections, 0 calls running",
        "STATUS=serving 1 connection, 0 calls running",
        "STATUS=reloading the configuration",
        "STATUS=serving 1 connection, 0 calls running",
        "STATUS=serving 3 connections, 2 calls running",
    ]
    counts.calls_in_flight = 1
    assert status_text(counts) == "serving 3 connections, 1 call running"


def test_notify_never_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notify socket nobody reads fills up; sending then fails at once (logged),
    instead of stopping the caller (the event loop) until someone reads."""
    d = short_dir("cfsd-wd-")
    try:
        sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sink.bind(str(d / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(d / "notify"))
        results: list[bool] = []
        sender = threading.Thread(
            target=lambda: results.extend(notify("WATCHDOG=1") for _ in range(5000)),
            daemon=True,
        )
        sender.start()
        sender.join(60)
        assert not sender.is_alive(), "notify() waits for a reader"
        assert results[0] is True
        assert results[-1] is False  # full (the queue holds far fewer than 5000)
        sink.close()
    finally:
        for child in d.iterdir():
            child.unlink()
        d.rmdir()


def test_daemon_watchdog(tmp_path: Path) -> None:
    env = dict(os.environ, WATCHDOG_USEC="100000")
    with notified_daemon(tmp_path / "repo", env=env) as d:
        for _ in range(3):
            d.wait_for(lambda m: m == "WATCHDOG=1")
        with client.connect(d.address) as conn:
            env_now = conn.call("io.systemd.service.GetEnvironment")["environment"]
        assert not [e for e in env_now if e.startswith("WATCHDOG_")]
        d.wait_log("watchdog: keep-alive every 0.05 s")


def test_daemon_without_its_watchdog(tmp_path: Path) -> None:
    """WATCHDOG_PID of another process: no keep-alives (and none without the
    variables at all); the daemon serves all the same."""
    env = dict(os.environ, WATCHDOG_USEC="100000", WATCHDOG_PID="1")
    with notified_daemon(tmp_path / "repo", env=env) as d:
        with client.connect(d.address) as conn:
            conn.call("io.systemd.service.Ping")
        # Ten intervals: nothing (a bounded wait that must run out).
        with pytest.raises(AssertionError, match="no matching message"):
            d.wait_for(lambda m: m == "WATCHDOG=1", 1.0)


def test_daemon_status(tmp_path: Path) -> None:
    with notified_daemon(tmp_path / "repo") as d:
        d.wait_for(lambda m: m == "STATUS=serving 0 connections, 0 calls running")
        conns = [client.connect(d.address) for _ in range(2)]
        try:
            conns[0].call("io.systemd.service.Ping")
            conns[1].call("io.systemd.service.Ping")
            d.wait_for(lambda m: m == "STATUS=serving 2 connections, 0 calls running")
        finally:
            for conn in conns:
                conn.close()
        d.wait_for(lambda m: m == "STATUS=serving 0 connections, 0 calls running")
    assert d.notify.messages[-1] == "STOPPING=1\nSTATUS=stopping"
