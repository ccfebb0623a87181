"""polkit for callers that are not root, composefsd's uid or in --group
(composefsd.service.polkit), against a real dbus-daemon and polkitd the tests start.

Nothing of the machine's is used or changed: the private bus and the polkitd in a
mount namespace of its own come from tests/polkitenv.py. Callers other than root are the
session's test users (alice and bob), connecting from processes of theirs.
What polkitd does not show (the flags and the subject we send, a polkit that
hangs) is checked against a stand-in for polkit on another private bus.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import varlink
from jeepney import MessageType, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

import users
from composefsd.service.context import CallContext, Peer, VarlinkReplyError
from composefsd.service.daemon import IDL_DIR, OPEN_METHODS, READ_ONLY_METHODS
from composefsd.service.polkit import (
    ACTIONS,
    METHOD_ACTIONS,
    CallerGone,
    Decision,
    PolkitCheck,
    PolkitClient,
    PolkitUnreachable,
    bus_socket_exists,
    process_subject,
)
from composefsd.service.validate import InterfaceValidator
from conftest import TestUsers
from polkitenv import POLICY, POLKIT_NAME, ROOT, Bus, start_bus, wait_for
from servicehelpers import Daemon, start_daemon

REPO_IFACE = "io.composefs.Repository"
OCI_IFACE = "io.composefs.Oci"
DENIED = "org.varlink.service.PermissionDenied"
INVALID = "org.varlink.service.InvalidParameter"
CHALLENGE = f"{REPO_IFACE}.InteractiveAuthenticationRequired"
UNAVAILABLE = f"{REPO_IFACE}.AuthorizationUnavailable"

#: alice may create images and mount, must authenticate for gc, may not remove;
#: bob may do nothing.
_RULES = """polkit.addRule(function(action, subject) {
    if (action.id.indexOf("io.composefs.composefsd.") != 0) return polkit.Result.NOT_HANDLED;
    if (subject.user == "ALICE") {
        if (action.id == "io.composefs.composefsd.create-image") return polkit.Result.YES;
        if (action.id == "io.composefs.composefsd.mount") return polkit.Result.YES;
        if (action.id == "io.composefs.composefsd.gc") return polkit.Result.AUTH_ADMIN;
    }
    return polkit.Result.NO;
});
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """Short and public (polkitd runs as its own user, the test users connect)."""
    path = Path(tempfile.mkdtemp(prefix="cfsd-polkit-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def polkit_bus(workdir: Path, test_users: TestUsers) -> Iterator[Bus]:
    """The module's bus and polkitd with the rules above (tests must not stop them)."""
    bus = start_bus(workdir / "main")
    try:
        bus.start_polkitd(_RULES.replace("ALICE", test_users.alice.name))
        yield bus
    finally:
        bus.stop()


def _start(repo: Path, bus_env: dict[str, str], *args: str) -> Daemon:
    return start_daemon(repo, *args, env=bus_env, public=True, log_level="debug")


@pytest.fixture(scope="module")
def daemon(polkit_bus: Bus, workdir: Path) -> Iterator[Daemon]:
    d = _start(workdir / "repo", polkit_bus.env())
    yield d
    assert d.stop() == 0, d.log_text()


@pytest.fixture(scope="module")
def source_tree(workdir: Path) -> Path:
    tree = workdir / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "hello").write_text("hello from polkit\n")
    (tree / "dir" / "file").write_text("inside\n")
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return tree


def _calls(
    py: users.UserPython, user: users.TestUser, d: Daemon, *calls: tuple[str, Any]
) -> list[str]:
    return users.call_errors(py, user, d.socket, list(calls), timeout=60)


# -- the .policy file and the tables ------------------------------------------------------


def test_policy_file_declares_exactly_the_actions_used() -> None:
    tree = ET.parse(POLICY)
    actions = {a.get("id"): a for a in tree.getroot().iter("action")}
    assert set(actions) == ACTIONS == set(METHOD_ACTIONS.values())
    for action_id, action in actions.items():
        assert action.findtext("description"), action_id
        assert action.findtext("message"), action_id
        defaults = action.find("defaults")
        assert defaults is not None, action_id
        assert defaults.findtext("allow_any") == "no", action_id
        assert defaults.findtext("allow_inactive") == "no", action_id
        assert defaults.findtext("allow_active") == "auth_admin_keep", action_id


def test_polkit_methods_are_mutating_and_take_the_parameter() -> None:
    # Read-only and open methods are never put to polkit, nor inline ones (which
    # run on the event loop, where no check can wait for D-Bus: Describe).
    assert not set(METHOD_ACTIONS) & (READ_ONLY_METHODS | OPEN_METHODS)
    assert f"{REPO_IFACE}.Describe" not in METHOD_ACTIONS
    for iface_name in (REPO_IFACE, OCI_IFACE):
        text = (IDL_DIR / f"{iface_name}.varlink").read_text()
        iface = varlink.Interface(text)
        assert "InteractiveAuthenticationRequired" in iface.members
        assert "AuthorizationUnavailable" in iface.members
        validator = InterfaceValidator(iface)
        methods = [m for m in METHOD_ACTIONS if m.startswith(iface_name + ".")]
        assert methods
        for method in methods:
            name = method.rpartition(".")[2]
            assert "allowInteractiveAuthentication" in validator.input_fields(name), method


def test_install_units_installs_the_policy(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("composefsd", "composefsctl"):
        (fake / name).write_text("#!/bin/sh\n")
        (fake / name).chmod(0o755)
    subprocess.run(
        [
            str(ROOT / "systemd" / "install-units"),
            "--root",
            str(tmp_path / "root"),
            "--composefsd",
            str(fake / "composefsd"),
        ],
        check=True,
        capture_output=True,
    )
    installed = tmp_path / "root/usr/share/polkit-1/actions/io.composefs.composefsd.policy"
    assert installed.read_bytes() == POLICY.read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o644


# -- a real polkitd -------------------------------------------------------------------------


def test_polkit_allows_what_the_rules_allow(
    daemon: Daemon, source_tree: Path, test_users: TestUsers, user_python: users.UserPython
) -> None:
    alice, bob = test_users.alice, test_users.bob
    create = (f"{REPO_IFACE}.CreateImage", {"sourcePath": str(source_tree), "ref": "alice-img"})
    mount = (f"{REPO_IFACE}.Mount", {"image": "alice-img"})
    # bob: polkit says no to everything.
    assert _calls(user_python, bob, daemon, create, mount) == [DENIED, DENIED]
    # alice: the image is made from her tree, and mounted (a detached mount).
    assert _calls(user_python, alice, daemon, create, mount) == ["ok", "ok"]
    assert "polkit allowed io.composefs.Repository.CreateImage" in daemon.log_text()
    # Unmount shares Mount's action: allowed, so the method itself answers.
    unmount = (f"{REPO_IFACE}.Unmount", {"where": "/nonexistent/composefsd-test"})
    assert _calls(user_python, alice, daemon, unmount) == [f"{REPO_IFACE}.NotMounted"]
    # Read-only methods stay open, as without polkit.
    assert _calls(user_python, bob, daemon, (f"{REPO_IFACE}.ListImages", {})) == ["ok"]


def test_polkit_denies_what_the_rules_deny(
    daemon: Daemon, test_users: TestUsers, user_python: users.UserPython
) -> None:
    alice = test_users.alice
    calls = [
        (f"{REPO_IFACE}.RemoveImage", {"image": "alice-img"}),
        (f"{OCI_IFACE}.Tag", {"image": "x", "tag": "y"}),
        (f"{OCI_IFACE}.Pull", {"reference": "oci:/nonexistent"}),
    ]
    assert _calls(user_python, alice, daemon, *calls) == [DENIED] * len(calls)
    # Never put to polkit: composefs-rs's mutating methods stay root's and --group's.
    rs_gc: tuple[str, Any] = ("org.composefs.Repository.Gc", {})
    assert _calls(user_python, alice, daemon, rs_gc) == [DENIED]


def test_challenge_is_a_typed_error(
    daemon: Daemon, test_users: TestUsers, user_python: users.UserPython
) -> None:
    alice = test_users.alice
    gc = f"{REPO_IFACE}.GarbageCollect"
    # auth_admin, no agent: polkit challenges, whether or not interaction is allowed.
    assert (
        _calls(
            user_python,
            alice,
            daemon,
            (gc, {"dryRun": True}),
            (gc, {"dryRun": True, "allowInteractiveAuthentication": False}),
            (gc, {"dryRun": True, "allowInteractiveAuthentication": True}),
        )
        == [CHALLENGE] * 3
    )
    # The Oci interface's own error name for its methods.
    oci_mount = (f"{OCI_IFACE}.Mount", {"image": "nonexistent"})
    assert _calls(user_python, test_users.bob, daemon, oci_mount) == [DENIED]


def test_interactive_flag_of_the_wrong_type(
    daemon: Daemon, test_users: TestUsers, user_python: users.UserPython
) -> None:
    gc = f"{REPO_IFACE}.GarbageCollect"
    values: list[Any] = ["yes", 1, [], {}, None]
    bad = [(gc, {"dryRun": True, "allowInteractiveAuthentication": value}) for value in values]
    # null is "not given" (an optional field); everything else is refused.
    got = _calls(user_python, test_users.alice, daemon, *bad)
    assert got == [INVALID] * 4 + [CHALLENGE]
    # The same for root, whom polkit is never asked about.
    out = users.call_errors(
        user_python,
        users.TestUser("root", 0, 0),
        daemon.socket,
        [bad[0], (gc, {"dryRun": True, "allowInteractiveAuthentication": True})],
    )
    assert out == [INVALID, "ok"]


def test_caller_that_exited_is_not_authorized(
    daemon: Daemon, test_users: TestUsers, user_python: users.UserPython
) -> None:
    """The process that connected exits and hands the connection to a child (same
    user, whom polkit would allow): the check names the connecting process by its
    pidfd, finds it gone, and refuses; it never asks about another process."""
    script = r"""
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
r, w = os.pipe()
if os.fork() == 0:
    os.close(w)
    os.read(r, 1)  # until the connecting process is gone
    call = {"method": "io.composefs.Repository.Unmount", "parameters": {"where": "/nonexistent/x"}}
    s.sendall(json.dumps(call).encode() + b"\0")
    buf = b""
    while not buf.endswith(b"\0"):
        buf += s.recv(1 << 20)
    print(json.dumps(json.loads(buf[:-1]).get("error", "ok")), flush=True)
    os._exit(0)
os._exit(0)  # w closes with us: the child reads EOF once we are gone
"""
    alice = test_users.alice
    proc = users.run_as(
        alice,
        user_python.command("-c", script, str(daemon.socket)),
        env=user_python.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # run() returns once the child, which holds stdout too, has answered and exited.
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f'"{DENIED}"'], proc.stderr
    assert "the connecting process has exited" in daemon.log_text()
    # And a connection alice's process makes itself is allowed the same call.
    unmount = (f"{REPO_IFACE}.Unmount", {"where": "/nonexistent/x"})
    assert _calls(user_python, alice, daemon, unmount) == [f"{REPO_IFACE}.NotMounted"]


# -- no polkit -------------------------------------------------------------------------------


def test_no_system_bus_keeps_todays_rule(
    workdir: Path, test_users: TestUsers, user_python: users.UserPython
) -> None:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={workdir}/no-such-bus"}
    mount = (f"{REPO_IFACE}.Mount", {"image": "x"})
    d = _start(workdir / "repo-nobus", env)
    try:
        assert _calls(user_python, test_users.alice, d, mount) == [DENIED]
        # Refused by the hook, before its parameters are looked at (as before polkit).
        assert _calls(user_python, test_users.alice, d, (f"{REPO_IFACE}.Mount", None)) == [DENIED]
    finally:
        assert d.stop() == 0
    # --polkit from the configuration file, changed by a reload (SIGHUP).
    conf = workdir / "nobus.conf"
    conf.write_text("polkit = yes\n")
    d = _start(workdir / "repo-nobus", env, "--config", str(conf))
    try:
        assert _calls(user_python, test_users.alice, d, mount) == [UNAVAILABLE]
        conf.write_text("polkit = no\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "polkit is now no" in d.log_text(), "the reload")
        assert _calls(user_python, test_users.alice, d, mount) == [DENIED]
    finally:
        assert d.stop() == 0


def test_bus_without_polkitd_keeps_todays_rule(
    workdir: Path, test_users: TestUsers, user_python: users.UserPython
) -> None:
    bus = start_bus(workdir / "bare")
    try:
        d = _start(workdir / "repo-bare", bus.env())
        try:
            mount = (f"{REPO_IFACE}.Mount", {"image": "x"})
            assert _calls(user_python, test_users.alice, d, mount) == [DENIED]
            assert "polkit is not running" in d.log_text()
        finally:
            assert d.stop() == 0
    finally:
        bus.stop()


def test_polkitd_killed_and_back(
    workdir: Path, test_users: TestUsers, user_python: users.UserPython
) -> None:
    """polkitd goes away mid-run (the PID this test started): today's rule, at once;
    back again: asked again. The bus itself restarting: a new connection."""
    rules = _RULES.replace("ALICE", test_users.alice.name)
    bus = start_bus(workdir / "restart")
    try:
        bus.start_polkitd(rules)
        d = _start(workdir / "repo-restart", bus.env())
        unmount = (f"{REPO_IFACE}.Unmount", {"where": "/nonexistent/x"})
        allowed = [f"{REPO_IFACE}.NotMounted"]
        try:
            alice = test_users.alice
            assert _calls(user_python, alice, d, unmount) == allowed
            bus.stop_polkitd()
            assert _calls(user_python, alice, d, unmount) == [DENIED]
            bus.start_polkitd(rules)
            assert _calls(user_python, alice, d, unmount) == allowed
            # The bus goes: the shared connection is dropped and made anew.
            bus.stop()
            bus = start_bus(workdir / "restart")
            assert _calls(user_python, alice, d, unmount) == [DENIED]
            bus.start_polkitd(rules)
            assert _calls(user_python, alice, d, unmount) == allowed
            # Losing the bus is logged, not a thread's traceback.
            assert "Traceback" not in d.log_text()
        finally:
            assert d.stop() == 0
    finally:
        bus.stop()


# -- what polkitd does not show: a stand-in for polkit ---------------------------------------


@dataclass
class FakePolkit:
    """Answers CheckAuthorization on a private bus as told, recording each call."""

    address: str
    answer: str = "challenge"  # "yes", "no", "challenge" or "hang"
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        conn = open_dbus_connection(self.address, enable_fds=True)
        reply = conn.send_and_get_reply(message_bus.RequestName(POLKIT_NAME), timeout=5)
        assert reply.body[0] == 1, reply.body

        def serve() -> None:
            try:
                while not self.stop.is_set():
                    try:
                        msg = conn.receive(timeout=0.1)
                    except TimeoutError:
                        continue
                    if msg.header.message_type != MessageType.method_call:
                        continue
                    subject, action, _details, flags, _cancel = msg.body
                    values = {k: v[1] for k, v in subject[1].items()}
                    pidfd = values.get("pidfd")
                    if pidfd is not None:
                        values["pidfd_pid"] = _fdinfo_pid(pidfd.fileno())
                        pidfd.close()
                    self.calls.append((subject[0], values, action, flags))
                    if self.answer == "hang":
                        continue
                    result = {"yes": (True, False), "no": (False, False)}.get(
                        self.answer, (False, True)
                    )
                    conn.send(new_method_return(msg, "(bba{ss})", ((*result, {}),)))
            finally:
                conn.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)


def _fdinfo_pid(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return 0


@pytest.fixture
def fake_polkit(workdir: Path) -> Iterator[tuple[Bus, FakePolkit]]:
    bus = start_bus(workdir / f"fake-{os.getpid()}-{time.monotonic_ns()}")
    fake = FakePolkit(bus.address)
    fake.start()
    try:
        yield bus, fake
    finally:
        fake.close()
        bus.stop()
        shutil.rmtree(bus.dir, ignore_errors=True)


def test_what_polkit_is_asked(
    fake_polkit: tuple[Bus, FakePolkit],
    workdir: Path,
    test_users: TestUsers,
    user_python: users.UserPython,
) -> None:
    bus, fake = fake_polkit
    alice = test_users.alice
    d = _start(workdir / "repo-fake", bus.env())
    try:
        gc = f"{REPO_IFACE}.GarbageCollect"
        got = _calls(
            user_python,
            alice,
            d,
            (gc, {"dryRun": True}),
            (gc, {"dryRun": True, "allowInteractiveAuthentication": True}),
            (f"{OCI_IFACE}.Untag", {"tag": "t", "allowInteractiveAuthentication": False}),
        )
        assert got == [CHALLENGE, CHALLENGE, f"{OCI_IFACE}.InteractiveAuthenticationRequired"]
        assert [(c[2], c[3]) for c in fake.calls] == [
            ("io.composefs.composefsd.gc", 0),
            ("io.composefs.composefsd.gc", 1),  # AllowUserInteraction only when asked
            ("io.composefs.composefsd.tag", 0),
        ]
        kind, subject, _, _ = fake.calls[0]
        assert kind == "unix-process"
        assert subject["uid"] == alice.uid
        assert subject["pidfd_pid"] == subject["pid"] > 0
        assert isinstance(subject["start-time"], int) and subject["start-time"] > 0
        # Root and the privileged are never put to polkit.
        fake.calls.clear()
        root = users.TestUser("root", 0, 0)
        assert users.call_errors(user_python, root, d.socket, [(gc, {"dryRun": True})]) == ["ok"]
        assert fake.calls == []
    finally:
        assert d.stop() == 0


def test_polkit_gone_during_a_check(
    fake_polkit: tuple[Bus, FakePolkit],
    workdir: Path,
    test_users: TestUsers,
    user_python: users.UserPython,
) -> None:
    """polkit leaves the bus while a check waits for it: the bus answers NoReply and
    the caller gets today's rule at once, not after the timeout."""
    bus, fake = fake_polkit
    fake.answer = "hang"
    d = _start(workdir / "repo-gone", bus.env(), "--polkit-timeout", "60")
    try:
        result: list[list[str]] = []
        mount = (f"{REPO_IFACE}.Mount", {"image": "x"})
        caller = threading.Thread(
            target=lambda: result.append(_calls(user_python, test_users.alice, d, mount))
        )
        caller.start()
        wait_for(lambda: len(fake.calls) == 1, "the check")
        fake.close()  # its connection closes: the bus fails the pending call
        caller.join(30)
        assert result == [[DENIED]]
    finally:
        assert d.stop() == 0


def test_polkit_that_hangs_times_out(
    fake_polkit: tuple[Bus, FakePolkit],
    workdir: Path,
    test_users: TestUsers,
    user_python: users.UserPython,
) -> None:
    bus, fake = fake_polkit
    fake.answer = "hang"
    d = _start(workdir / "repo-hang", bus.env(), "--polkit-timeout", "1")
    try:
        mount = (f"{REPO_IFACE}.Mount", {"image": "x"})
        assert _calls(user_python, test_users.alice, d, mount, mount) == [UNAVAILABLE] * 2
        fake.answer = "yes"
        assert _calls(user_python, test_users.alice, d, mount) == [f"{REPO_IFACE}.NoSuchImage"]
    finally:
        assert d.stop() == 0


# -- the check's own bounds, in-process -----------------------------------------------------


class _BlockingClient(PolkitClient):
    def __init__(self) -> None:
        super().__init__(address="unix:path=/nonexistent")
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def check(self, subject: dict[str, Any], action: str, interactive: bool) -> Decision:
        self.entered.release()
        assert self.release.wait(30)
        return Decision(True, False)


def _context(method: str) -> CallContext:
    ctx = CallContext(peer=Peer(os.getpid(), 4242, 4242), method=method)
    ctx.peer_pidfd = lambda: os.pidfd_open(os.getpid())
    return ctx


def test_checks_per_uid_are_bounded() -> None:
    client = _BlockingClient()
    check = PolkitCheck(client, checks_per_uid=2)
    method = f"{REPO_IFACE}.Mount"
    results: list[str] = []

    def one() -> None:
        try:
            check.authorize(_context(method), "io.composefs.composefsd.mount", {})
            results.append("ok")
        except VarlinkReplyError as exc:
            results.append(exc.name)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in threads:
        assert client.entered.acquire(timeout=30)
    one()  # a third while two wait: refused at once, no D-Bus call
    assert results == [UNAVAILABLE]
    client.release.set()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted([UNAVAILABLE, "ok", "ok"])
    one()  # the count went down again
    assert results[-1] == "ok"


def test_subject_of_a_gone_process() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        subject = process_subject(pidfd, 0)
        assert subject["pid"] == ("u", proc.pid)
        proc.kill()
        proc.wait()
        with pytest.raises(CallerGone):
            process_subject(pidfd, 0)
    finally:
        os.close(pidfd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unreachable_bus_is_typed() -> None:
    client = PolkitClient(address="unix:path=/nonexistent/composefsd-test-bus", timeout=1)
    with pytest.raises(PolkitUnreachable):
        client.check({}, "io.composefs.composefsd.mount", False)
    assert not bus_socket_exists("unix:path=/nonexistent/bus")
    assert bus_socket_exists("unix:abstract=/x")
    assert not bus_socket_exists("")
