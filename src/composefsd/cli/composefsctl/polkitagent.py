"""polkit's password prompt for ``composefsctl``, as systemd's tools give it
(systemctl, machinectl, systemd-dissect: src/shared/polkit-agent.c).

A caller that is not root, whose stdin is a terminal and that did not say
``--no-ask-password``, sets ``allowInteractiveAuthentication`` on the calls polkit
may be asked about (:data:`METHODS`), and runs polkit's text agent
for the call's duration: ``pkttyagent --notify-fd N --fallback``, started only if
it is installed (Debian's polkitd package), as a direct child so that it registers
for this process (pkttyagent's default subject is its parent's), and waited for
until it closes N (it has registered with polkitd then, or given up), as systemd
waits. ``--fallback`` leaves an agent the session already has (a desktop's) in
charge. The agent is stopped afterwards by its own PID (SIGTERM, then reaped).

Imported only by a command that may ask polkit (remote.ASKS_POLKIT), and only
when it may ask for a password (client start-up stays small:
tests/test_composefsctl_imports.py).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from composefsd.service.client import Connection

__all__ = ["AGENT", "FLAG", "METHODS", "AskingConnection", "agent"]

#: polkit's text agent.
AGENT = "pkttyagent"

#: The parameter that lets polkit ask for a password.
FLAG = "allowInteractiveAuthentication"

#: The methods composefsd may put to polkit, which take :data:`FLAG` (the daemon's
#: service.polkit.METHOD_ACTIONS; a test keeps the two equal, without this module
#: loading the daemon's D-Bus code).
METHODS = frozenset(
    {
        "io.composefs.Repository.CreateImage",
        "io.composefs.Repository.Mount",
        "io.composefs.Repository.Unmount",
        "io.composefs.Repository.RemoveImage",
        "io.composefs.Repository.GarbageCollect",
        "io.composefs.Oci.Pull",
        "io.composefs.Oci.Tag",
        "io.composefs.Oci.Untag",
        "io.composefs.Oci.Mount",
    }
)


class AskingConnection:
    """A :class:`~composefsd.service.client.Connection` whose calls of
    :data:`METHODS` set :data:`FLAG` (everything else is the connection's)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def call(self, method: str, parameters: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        if method in METHODS:
            parameters = {**(parameters or {}), FLAG: True}
        return self._conn.call(method, parameters, **kwargs)


@contextmanager
def agent() -> Iterator[None]:
    """Run pkttyagent while the body runs, if it is installed (module notes)."""
    program = shutil.which(AGENT)
    if program is None:
        yield
        return
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            agent = subprocess.Popen(
                [program, "--notify-fd", str(ready_w), "--fallback"], pass_fds=(ready_w,)
            )
        except OSError:
            # No agent, no prompt: polkit then answers InteractiveAuthenticationRequired.
            yield
            return
        os.close(ready_w)
        ready_w = -1
        # The agent closes the fd once registered (or exits): POLLHUP either way.
        poller = select.poll()
        poller.register(ready_r, select.POLLHUP)
        poller.poll()
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    try:
        yield
    finally:
        if agent.poll() is None:
            agent.terminate()
        agent.wait()
