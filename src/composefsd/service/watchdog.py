"""systemd's service watchdog (``WatchdogSec=``), and ``STATUS=`` lines.

* :func:`watchdog_interval` reads ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as
  ``sd_watchdog_enabled(unset_environment=true)`` does: the watchdog is on when
  ``WATCHDOG_USEC`` is a positive number of microseconds and ``WATCHDOG_PID``
  is unset or this process; both are then removed from the environment, so that
  helper processes (skopeo, workers) do not take the watchdog for theirs.
* :func:`keep_alive` sends ``WATCHDOG=1`` from the event loop every half
  interval (what sd_event does). It runs as a task on the loop that serves every
  socket, so it stops exactly when the loop is stuck: the watchdog then fires
  and systemd restarts the service (``Restart=on-failure``). Work done in worker
  threads does not hold it up; a call that never ends does not stop the loop.
* :class:`StatusReporter` sends ``STATUS=`` with what the daemon is doing
  ("serving 3 connections, 1 call running"), only when the text changes and at
  most once per ``interval`` seconds: it reads two counters of the server, so
  it costs nothing while nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, MutableMapping
from typing import Final, Protocol

from composefsd.service.activation import notify

__all__ = ["StatusReporter", "keep_alive", "status_text", "watchdog_interval"]

log = logging.getLogger(__name__)

#: Seconds between two STATUS= updates at most.
STATUS_INTERVAL: Final = 1.0


def watchdog_interval(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """The watchdog interval in seconds, or None when there is no watchdog for this
    process (module notes); unsets the two variables either way."""
    env = os.environ if environ is None else environ
    usec_text = env.pop("WATCHDOG_USEC", None)
    pid_text = env.pop("WATCHDOG_PID", None)
    if usec_text is None:
        return None
    try:
        usec = int(usec_text, 10)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number: no watchdog", usec_text)
        return None
    if usec <= 0:
        log.warning("WATCHDOG_USEC=%r is not positive: no watchdog", usec_text)
        return None
    if pid_text is not None:
        try:
            watched = int(pid_text, 10)
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not a pid: no watchdog", pid_text)
            return None
        if watched != (os.getpid() if pid is None else pid):
            log.debug("WATCHDOG_PID=%d is another process: no watchdog", watched)
            return None
    return usec / 1_000_000


async def keep_alive(interval: float, send: Callable[[str], bool] = notify) -> None:
    """Send WATCHDOG=1 now and every ``interval / 2`` seconds, until cancelled."""
    while True:
        send("WATCHDOG=1")
        await asyncio.sleep(interval / 2)


class _Activity(Protocol):
    @property
    def connections(self) -> int: ...

    @property
    def calls_in_flight(self) -> int: ...


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def status_text(activity: _Activity) -> str:
    return (
        f"serving {_count(activity.connections, 'connection', 'connections')}, "
        f"{_count(activity.calls_in_flight, 'call', 'calls')} running"
    )


class StatusReporter:
    """Sends STATUS= lines for ``activity`` when they change (module notes)."""

    def __init__(
        self,
        activity: _Activity,
        *,
        interval: float = STATUS_INTERVAL,
        send: Callable[[str], bool] = notify,
    ) -> None:
        self.activity = activity
        self.interval = interval
        self._send = send
        self._last: str | None = None

    def update(self, text: str | None = None) -> None:
        """Send ``text`` (default: what the server is doing) unless it was the last."""
        text = status_text(self.activity) if text is None else text
        if text != self._last:
            self._last = text
            self._send(f"STATUS={text}")

    async def run(self) -> None:
        while True:
            self.update()
            await asyncio.sleep(self.interval)
