"""composefsctl and polkit, as a non-root user (tests/users.py): on a terminal
(a pty as stdin) and without ``--no-ask-password`` it sets
allowInteractiveAuthentication on the calls composefsd may put to polkit and runs
polkit's text agent for the call; otherwise not; polkit's errors are one line and
exit status 1.

What composefsctl sends and which agent it starts is seen by a stand-in Varlink
server (the test's, as root, which composefsctl trusts) and a stand-in
``pkttyagent`` put first on PATH: it logs its arguments and parent, closes the
notify fd as the real one does once registered, and logs the SIGTERM that ends
it (a real password exchange needs a password for a test user and PAM: not
done). polkit's own answers come from a real polkitd (tests/polkitenv.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import users
from composefsd.cli.composefsctl.polkitagent import FLAG, METHODS
from composefsd.cli.composefsctl.remote import ASKS_POLKIT
from composefsd.service.polkit import METHOD_ACTIONS
from conftest import TestUsers
from polkitenv import ACTION_PREFIX, Bus, start_bus
from servicehelpers import Daemon, start_daemon

REPO = "io.composefs.Repository"
CHALLENGE_TEXT = (
    "composefsctl: error: io.composefs.Repository.InteractiveAuthenticationRequired: "
    "polkit wants you to authenticate: run this on a terminal without --no-ask-password "
    "(with an authentication agent), or ask for a polkit rule\n"
)

_AGENT = """#!/bin/sh
# A stand-in for pkttyagent: what composefsctl started and how it ended it.
log={log}
echo "started $PPID $$ $*" >> "$log"
trap 'echo stopped >> "$log"; exit 0' TERM
[ "$1" = --notify-fd ] && eval "exec $2>&-"
while :; do sleep 0.05; done
"""


@dataclass
class Call:
    method: str
    parameters: dict[str, Any]
    #: The client's pid (SO_PEERCRED).
    pid: int
    #: The agent log when the call came.
    agent_log: str


@dataclass
class FakeServer:
    """Answers every call with ``error`` (None: an empty ListImages-like reply)."""

    path: Path
    agent_log: Path
    error: str | None = None
    calls: list[Call] = field(default_factory=list)
    #: When given, each reply waits until it is set.
    hold: threading.Event | None = None

    def serve(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                pid = struct.unpack("3i", creds)[0]
                buf = b""
                while not buf.endswith(b"\0"):
                    data = conn.recv(1 << 16)
                    if not data:
                        break
                    buf += data
                if not buf:
                    continue
                msg = json.loads(buf[:-1])
                log = self.agent_log.read_text() if self.agent_log.exists() else ""
                self.calls.append(Call(msg["method"], msg.get("parameters", {}), pid, log))
                if self.hold is not None:
                    self.hold.wait(60)
                if self.error is not None:
                    reply: dict[str, Any] = {"error": self.error, "parameters": {}}
                else:
                    reply = {"parameters": {"images": [], "removedRefs": []}}
                with contextlib.suppress(OSError):  # a client killed meanwhile
                    conn.sendall(json.dumps(reply).encode() + b"\0")


@dataclass
class World:
    server: FakeServer
    user: users.TestUser
    py: users.UserPython
    bindir: Path

    def ctl(
        self, *argv: str, tty: bool, user: users.TestUser | None = None
    ) -> subprocess.CompletedProcess[str]:
        self.server.calls.clear()
        self.server.agent_log.unlink(missing_ok=True)
        env = {**self.py.env, "PATH": f"{self.bindir}:{os.environ['PATH']}"}
        cmd = self.py.command(
            "-m", "composefsd.cli.composefsctl", "--connect", str(self.server.path), *argv
        )
        master, slave = os.openpty() if tty else (-1, -1)
        try:
            kwargs: dict[str, Any] = dict(
                env=env,
                stdin=slave if tty else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if user is None or user.uid != 0:
                return users.run_as(user or self.user, cmd, **kwargs)
            return subprocess.run(cmd, **kwargs)
        finally:
            if tty:
                os.close(master)
                os.close(slave)

    def agent_log(self) -> str:
        path = self.server.agent_log
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def world(test_users: TestUsers, user_python: users.UserPython) -> Iterator[World]:
    home = users.public_dir("cfsd-ctl-polkit-")
    bindir = home / "bin"
    bindir.mkdir(mode=0o755)
    log = home / "agent.log"
    home.chmod(0o777)  # the agent (the test user) writes its log here
    agent = bindir / "pkttyagent"
    agent.write_text(_AGENT.format(log=log))
    agent.chmod(0o755)
    server = FakeServer(home / "sock", log)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(server.path))
    server.path.chmod(0o666)
    sock.listen(8)
    thread = threading.Thread(target=server.serve, args=(sock,), daemon=True)
    thread.start()
    try:
        yield World(server, test_users.alice, user_python, bindir)
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        thread.join(10)
        users.remove_tree(home)


def test_the_methods_are_the_daemons() -> None:
    assert set(METHOD_ACTIONS) == METHODS
    assert {f"oci {c}" for c in ("pull", "tag", "untag", "mount")} < ASKS_POLKIT


def test_no_terminal_no_flag_and_the_challenge_is_one_line(world: World) -> None:
    world.server.error = f"{REPO}.InteractiveAuthenticationRequired"
    out = world.ctl("remove-image", "x", tty=False)
    assert (out.returncode, out.stdout, out.stderr) == (1, "", CHALLENGE_TEXT)
    [call] = world.server.calls
    assert call.method == f"{REPO}.RemoveImage"
    assert FLAG not in call.parameters
    assert world.agent_log() == ""


def test_terminal_sets_the_flag_and_runs_the_agent(world: World) -> None:
    world.server.error = f"{REPO}.InteractiveAuthenticationRequired"
    out = world.ctl("remove-image", "x", tty=True)
    assert (out.returncode, out.stderr) == (1, CHALLENGE_TEXT)
    [call] = world.server.calls
    assert call.parameters == {"image": "x", FLAG: True}
    # The agent ran while the call was made: started (and registered: composefsctl
    # waited for the notify fd to close) by composefsctl itself, not yet stopped.
    started = call.agent_log.splitlines()
    assert len(started) == 1, call.agent_log
    word, ppid, _, *argv = started[0].split()
    assert (word, int(ppid)) == ("started", call.pid)
    assert argv[0] == "--notify-fd" and int(argv[1]) > 2 and argv[2:] == ["--fallback"]
    # ... and was stopped (SIGTERM) before composefsctl exited.
    assert world.agent_log().splitlines()[1:] == ["stopped"]


def test_success_with_the_agent(world: World) -> None:
    world.server.error = None
    out = world.ctl("remove-image", "x", "--json", tty=True)
    assert out.returncode == 0, out.stderr
    assert world.server.calls[0].parameters[FLAG] is True
    assert world.agent_log().splitlines()[-1] == "stopped"


def test_agent_dies_with_composefsctl(world: World) -> None:
    world.server.error = None
    world.server.calls.clear()
    world.server.agent_log.unlink(missing_ok=True)
    world.server.hold = release = threading.Event()
    env = {**world.py.env, "PATH": f"{world.bindir}:{os.environ['PATH']}"}
    master, slave = os.openpty()
    try:
        proc = users.popen_as(
            world.user,
            world.py.command(
                "-m", "composefsd.cli.composefsctl", "--connect", str(world.server.path),
                "remove-image", "x",
            ),
            env=env, stdin=slave, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait(lambda: bool(world.server.calls), "the call")
        assert "started" in world.agent_log()
        # SIGKILL: no chance to stop the agent itself; its parent-death signal does.
        proc.kill()
        proc.wait()
        _wait(lambda: "stopped" in world.agent_log(), "the agent's SIGTERM")
    finally:
        # A stand-in agent that outlived its parent (the test failing) goes too.
        for line in world.agent_log().splitlines():
            if line.startswith("started "):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[2]), signal.SIGKILL)
        release.set()
        world.server.hold = None
        os.close(master)
        os.close(slave)


def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.01)


def test_no_ask_password(world: World) -> None:
    world.server.error = f"{REPO}.InteractiveAuthenticationRequired"
    out = world.ctl("--no-ask-password", "remove-image", "x", tty=True)
    assert (out.returncode, out.stderr) == (1, CHALLENGE_TEXT)
    assert FLAG not in world.server.calls[0].parameters
    assert world.agent_log() == ""
    # After the command too, as every common option.
    out = world.ctl("remove-image", "--no-ask-password", "x", tty=True)
    assert FLAG not in world.server.calls[0].parameters
    assert world.agent_log() == ""


def test_read_only_commands_and_root_ask_nothing(world: World, test_users: TestUsers) -> None:
    world.server.error = None
    out = world.ctl("images", "--json", tty=True)
    assert out.returncode == 0, out.stderr
    assert world.server.calls[0].method == f"{REPO}.ListImages"
    assert FLAG not in world.server.calls[0].parameters
    assert world.agent_log() == ""
    root = users.TestUser("root", 0, 0)
    out = world.ctl("remove-image", "x", tty=True, user=root)
    assert out.returncode == 0, out.stderr
    assert FLAG not in world.server.calls[0].parameters
    assert world.agent_log() == ""


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (
            "org.varlink.service.PermissionDenied",
            "permission denied (composefsd refuses this call to this user)",
        ),
        (f"{REPO}.AuthorizationUnavailable", "polkit could not decide: "),
    ],
)
def test_refusals_are_one_line(world: World, error: str, text: str) -> None:
    world.server.error = error
    out = world.ctl("remove-image", "x", tty=False)
    assert out.returncode == 1
    assert out.stderr.startswith(f"composefsctl: error: {error}: "), out.stderr
    assert len(out.stderr.splitlines()) == 1


# -- a real polkitd ---------------------------------------------------------------------------

#: alice may not remove, must authenticate for gc.
_RULES = """polkit.addRule(function(action, subject) {{
    if (action.id.indexOf({prefix!r}) != 0) return polkit.Result.NOT_HANDLED;
    if (subject.user != {user!r}) return polkit.Result.NO;
    if (action.id == {prefix!r} + "gc") return polkit.Result.AUTH_ADMIN;
    return polkit.Result.NO;
}});
"""


@pytest.fixture(scope="module")
def polkit_daemon(test_users: TestUsers) -> Iterator[tuple[Bus, Daemon]]:
    where = users.public_dir("cfsd-ctl-pk-")
    bus = start_bus(where / "bus")
    try:
        bus.start_polkitd(_RULES.format(prefix=ACTION_PREFIX, user=test_users.alice.name))
        d = start_daemon(where / "repo", env=bus.env(), public=True, log_level="debug")
        try:
            yield bus, d
        finally:
            assert d.stop() == 0, d.log_text()
    finally:
        bus.stop()
        users.remove_tree(where)


def _real(
    py: users.UserPython, user: users.TestUser, d: Daemon, *argv: str
) -> subprocess.CompletedProcess[str]:
    return users.run_as(
        user,
        py.command("-m", "composefsd.cli.composefsctl", "--connect", str(d.socket), *argv),
        env=py.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_real_polkit_denies_and_challenges(
    polkit_daemon: tuple[Bus, Daemon], test_users: TestUsers, user_python: users.UserPython
) -> None:
    _, d = polkit_daemon
    alice = test_users.alice
    out = _real(user_python, alice, d, "remove-image", "x")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (
        "composefsctl: error: org.varlink.service.PermissionDenied: "
        "permission denied (composefsd refuses this call to this user)\n"
    )
    out = _real(user_python, alice, d, "gc", "--dry-run")
    assert (out.returncode, out.stderr) == (1, CHALLENGE_TEXT)
    assert "polkit" in d.log_text()
