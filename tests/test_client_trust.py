"""The client talks only to a server it can trust (composefsd.service.client).

Who controls the input: the server at the other end of a socket path, and the
directory the socket sits in, may be any local user's. The scenario of the issue:
without XDG_RUNTIME_DIR alice's default socket is /tmp/composefs-<uid>/...; bob
made that directory first and runs a fake server in it. Before, alice's
``composefsctl create-image ~/proj`` sent it an fd on ~/proj, through which bob
read a file of her 0700 home, and printed bob's made-up digest with exit status
0. Now nothing is sent: the default socket's directory is not trusted (exit 3),
and a server of another uid (an explicit address, an abstract socket) is refused
after connecting, before the first byte.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import users
from composefsd.service import client
from composefsd.service.client import VarlinkUntrustedError
from conftest import TestUsers
from users import UserPython

OTHER = 4242

#: bob's fake composefsd: answers one call with a made-up digest, after reading
#: "secret" through every directory fd that came with it; logs what happened.
FAKE_SERVER = r"""
import array, json, os, socket, sys
address, log = sys.argv[1], sys.argv[2]
def note(**kw):
    with open(log, "a") as f:
        f.write(json.dumps(kw) + "\n")
srv = socket.socket(socket.AF_UNIX)
if address.startswith("@"):
    srv.bind("\0" + address[1:])
else:
    srv.bind(address)
    os.chmod(address, 0o666)
srv.listen()
print("ready", flush=True)
conn, _ = srv.accept()
note(event="accepted")
data, fds = b"", []
while b"\0" not in data:
    chunk, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    if not chunk:
        break
    data += chunk
stolen = []
for fd in fds:
    try:
        with open(os.open("secret", os.O_RDONLY, dir_fd=fd)) as f:
            stolen.append(f.read())
    except OSError as e:
        stolen.append(str(e))
note(event="call", bytes=len(data), fds=len(fds), stolen=stolen)
if data:
    conn.sendall(json.dumps({"parameters": {"digest": "f" * 64}}).encode() + b"\0")
conn.close()
"""


@dataclass
class Fake:
    proc: subprocess.Popen[str]
    log: Path

    def events(self, *, connected: bool) -> list[dict[str, Any]]:
        """What the server saw: once it is done with the one connection it takes
        (``connected``), or right away, stopping it, if no one ever came."""
        if connected:
            self.proc.wait(60)
        else:
            self.proc.kill()
            self.proc.wait()
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@dataclass
class World:
    users: TestUsers
    public: Path
    py: UserPython
    fakes: list[Fake]

    def bob_dir(self, path: Path, mode: int = 0o755) -> Path:
        path.mkdir()
        os.chown(path, self.users.bob.uid, self.users.bob.gid)
        path.chmod(mode)
        return path

    def fake_server(self, address: str) -> Fake:
        """bob's fake server at ``address`` (a path in a directory of his, or @name)."""
        log_dir = self.bob_dir(Path(f"{self.public}/log-{len(self.fakes)}"))
        log = log_dir / "events"
        proc = users.popen_as(
            self.users.bob,
            self.py.command("-c", FAKE_SERVER, address, str(log)),
            env=self.py.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        fake = Fake(proc, log)
        self.fakes.append(fake)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline() == "ready\n", "the fake server did not start"
        return fake

    def alice_project(self) -> Path:
        """~/proj of alice's: her home is 0700, proj and its secret readable below it."""
        a = self.users.alice
        home = self.public / "alice"
        (home / "proj").mkdir(parents=True)
        (home / "proj" / "secret").write_text("alice's secret\n")
        for path in (home, home / "proj", home / "proj" / "secret"):
            os.chown(path, a.uid, a.gid)
        home.chmod(0o700)
        return home / "proj"

    def composefsctl_as_alice(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return users.run_as(
            self.users.alice,
            self.py.command("-m", "composefsd.cli.composefsctl", *argv),
            env=self.py.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture
def world(test_users: TestUsers, user_python: users.UserPython) -> Iterator[World]:
    public = users.public_dir()
    planted = Path(f"/tmp/composefs-{test_users.alice.uid}")
    w = World(test_users, public, user_python, [])

    def clean() -> None:
        if planted.is_symlink():
            planted.unlink()
        else:
            users.remove_tree(planted)

    clean()  # a uid of a killed earlier run may come again
    try:
        yield w
    finally:
        for fake in w.fakes:
            if fake.proc.poll() is None:
                fake.proc.kill()
                fake.proc.wait()
            if fake.proc.stdout is not None:
                fake.proc.stdout.close()
        clean()
        users.remove_tree(public)


def test_composefsctl_sends_nothing_to_a_planted_default_socket(world: World) -> None:
    """The issue's scenario, end to end."""
    proj = world.alice_project()
    alice, bob = world.users.alice, world.users.bob
    planted = world.bob_dir(Path(f"/tmp/composefs-{alice.uid}"))
    sock = planted / "io.composefs.Repository"
    fake = world.fake_server(str(sock))

    proc = world.composefsctl_as_alice("create-image", str(proj))
    assert (proc.returncode, proc.stdout) == (3, ""), proc.stderr
    assert proc.stderr == (
        f"composefsctl: error: refusing {sock}: another user could have put this socket "
        f"there: {planted} is owned by uid {bob.uid}, not by root or uid {alice.uid}\n"
    )
    # Not even a connection: the directory was judged first.
    assert fake.events(connected=False) == []


def test_composefsctl_refuses_another_users_server(world: World) -> None:
    """An explicit address (no directory check): refused by the server's uid,
    after connecting and before sending anything."""
    proj = world.alice_project()
    alice, bob = world.users.alice, world.users.bob
    sock = world.bob_dir(world.public / "bob") / "sock"
    fake = world.fake_server(str(sock))

    proc = world.composefsctl_as_alice("--connect", str(sock), "create-image", str(proj))
    assert (proc.returncode, proc.stdout) == (3, ""), proc.stderr
    assert proc.stderr == (
        f"composefsctl: error: refusing {sock}: its server runs as uid {bob.uid}, "
        f"not as root or uid {alice.uid} (you)\n"
    )
    assert fake.events(connected=True) == [
        {"event": "accepted"},
        {"event": "call", "bytes": 0, "fds": 0, "stolen": []},
    ]


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_client_refuses_a_server_of_another_uid(world: World, kind: str) -> None:
    """As root: bob's server, at a path or at an abstract name (which anyone may
    take first), is refused with a typed error naming it and its uid."""
    bob = world.users.bob
    if kind == "path":
        address = str(world.bob_dir(world.public / "bob") / "sock")
    else:
        address = f"@composefsd-test-{os.getpid()}-{bob.uid}"
    fake = world.fake_server(address)
    target = address if kind == "path" else f"unix:{address}"
    with pytest.raises(VarlinkUntrustedError) as info:
        client.connect(target)
    assert info.value.peer_uid == bob.uid
    assert info.value.address == target
    assert str(info.value) == f"refusing {target}: its server runs as uid {bob.uid}, not as root"
    assert fake.events(connected=True)[-1] == {"event": "call", "bytes": 0, "fds": 0, "stolen": []}


def test_directory_check_of_the_default_address(tmp_path: Path) -> None:
    """check_directory=True refuses a socket in another user's directory even when
    its server is trusted (root, here), and never runs a program planted there."""
    planted = tmp_path / "planted"
    planted.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(planted / "sock"))
    listener.listen()
    marker = tmp_path / "ran"
    program = planted / "program"
    program.write_text(f"#!/bin/sh\ntouch {marker}\n")
    program.chmod(0o755)
    try:
        with client.connect(str(planted / "sock"), check_directory=True):
            pass  # root's directory, root's server
        os.chown(planted, OTHER, -1)
        for name in ("sock", "program"):
            with pytest.raises(VarlinkUntrustedError) as info:
                client.connect(str(planted / name), check_directory=True)
            assert str(info.value) == (
                f"refusing {planted / name}: another user could have put this socket there: "
                f"{planted} is owned by uid {OTHER}, not by root"
            )
            assert info.value.peer_uid is None
        with pytest.raises(VarlinkUntrustedError):
            client.connect(f"unix:{planted / 'sock'}", check_directory=True)
        assert not marker.exists()
        # Without the directory check, the server's uid alone decides.
        with client.connect(str(planted / "sock")):
            pass
    finally:
        listener.close()


def test_a_server_without_credentials_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket whose peer credentials cannot be read is nobody's: refused like
    another user's server (uid -1), before anything is sent."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    listener.listen()

    def no_credentials(sock: object) -> tuple[int, int, int]:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(client, "peer_ids", no_credentials)
    try:
        with pytest.raises(VarlinkUntrustedError) as info:
            client.connect(str(tmp_path / "sock"))
        assert info.value.peer_uid == -1
    finally:
        listener.close()
