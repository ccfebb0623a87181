"""polkit's password prompt for ``composefsctl``, as systemd's tools give it
(systemctl, machinectl, systemd-dissect: src/shared/polkit-agent.c).

A caller that is not root, whose stdin is a terminal and that did not say
``--no-ask-password``, sets ``allowInteractiveAuthentication`` on the calls polkit
may be asked about (:data:`METHODS`), and runs polkit's text agent for the
call's duration: ``pkttyagent --notify-fd N --fallback``, started only if it is
installed (Debian's polkitd package), as a direct child with this process's
terminal (pkttyagent picks what it registers for from its parent and prompts on
the controlling terminal), and waited for until it closes N (it has registered
with polkitd then, or given up), as systemd waits. ``--fallback`` leaves an
agent the session already has (a desktop's) in charge. The agent is stopped
afterwards by its own PID (SIGTERM, then reaped), and gets SIGTERM from the
kernel should composefsctl die first (PR_SET_PDEATHSIG, as systemd's fork_agent
sets).

Imported only by a command that may ask polkit (remote.ASKS_POLKIT), and only
when it may ask for a password (client start-up stays small:
tests/test_composefsctl_imports.py).
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from composefsd.kernel.syscalls import set_parent_death_signal
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
        proc = subprocess.Popen(
            [program, "--notify-fd", str(ready_w), "--fallback"],
            pass_fds=(ready_w,),
            # Gone with composefsctl, however it ends (systemd's fork_agent does so too).
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )
    except OSError:
        # No agent, no prompt: polkit then answers InteractiveAuthenticationRequired.
        os.close(ready_r)
        os.close(ready_w)
        yield
        return
    try:
        os.close(ready_w)
        # The agent closes the fd once registered (or exits): POLLHUP either way.
        poller = select.poll()
        poller.register(ready_r, select.POLLHUP)
        poller.poll()
        os.close(ready_r)
        ready_r = -1
        yield
    finally:
        if ready_r >= 0:
            os.close(ready_r)
        if proc.poll() is None:
            proc.terminate()
        proc.wait()


def _die_with_parent(parent: int) -> None:
    # Runs in the forked child before exec (composefsctl is single-threaded here).
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent ended before the signal was set up
        os._exit(1)
