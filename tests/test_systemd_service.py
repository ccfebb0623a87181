"""io.systemd.service on composefsd's socket, as systemd's own daemons serve it:
the IDL is systemd 257's, varlinkctl calls all four methods, and each method has
systemd's authorization (Ping for everyone, the rest for root and the daemon's
uid only, not --group) and validation (syslog levels 0-7, null meaning info)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import composefsd
import users
from composefsd.service.context import Peer
from composefsd.service.daemon import Authorization
from conftest import TestUsers
from sdnotify import NotifiedDaemon, notified_daemon, write_config

REPO_ROOT = Path(__file__).resolve().parent.parent
IFACE = "io.systemd.service"
IDL = Path(composefsd.__file__).parent / "service" / f"{IFACE}.varlink"
DENIED = "org.varlink.service.PermissionDenied"
INVALID = "org.varlink.service.InvalidParameter"

#: systemd 257's io.systemd.service (src/shared/varlink-io.systemd.service.c) as
#: varlinkctl introspect renders it: the names, types and comments are the contract.
SYSTEMD_257_IDL = """\
# An interface to control basic properties of systemd services.
interface io.systemd.service

# Checks if the service is running.
method Ping() -> ()

# Reloads configuration files.
method Reload() -> ()

# Sets the maximum log level.
method SetLogLevel(
\t# The maximum log level, using BSD syslog log level integers.
\tlevel: ?int
) -> ()

# Get current environment block.
method GetEnvironment() -> (
\t# Returns the current environment block, i.e. the contents of environ[].
\tenvironment: ?[]string
)

# Returned if the environment block is currently not in a valid state.
error InconsistentEnvironment()
"""


def _vctl(varlinkctl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([varlinkctl, *args], capture_output=True, text=True, timeout=60)


def _call(varlinkctl: str, address: str, method: str, params: Any = None) -> Any:
    proc = _vctl(varlinkctl, "call", address, f"{IFACE}.{method}", json.dumps(params or {}))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _error(varlinkctl: str, address: str, method: str, params: Any = None) -> tuple[str, Any]:
    proc = _vctl(varlinkctl, "call", address, f"{IFACE}.{method}", json.dumps(params or {}))
    assert proc.returncode != 0, proc.stdout
    name = proc.stderr.strip().rsplit(": ", 1)[-1]
    return name, json.loads(proc.stdout) if proc.stdout.strip() else None


@pytest.fixture(scope="module")
def sd_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("sd")
    return write_config(base / "composefsd.conf", "log-level = warning\n")


@pytest.fixture(scope="module")
def sd(sd_conf: Path) -> Iterator[NotifiedDaemon]:
    env = dict(os.environ, COMPOSEFSD_TEST_MARK="a value with spaces = and more")
    with notified_daemon(sd_conf.parent / "repo", "--config", str(sd_conf), env=env) as d:
        yield d


def test_idl_is_systemds(varlinkctl: str, sd: NotifiedDaemon) -> None:
    assert IDL.read_text() == SYSTEMD_257_IDL
    assert (REPO_ROOT / "varlink" / IDL.name).read_text() == IDL.read_text()
    proc = _vctl(varlinkctl, "introspect", sd.address, IFACE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == SYSTEMD_257_IDL
    assert _vctl(varlinkctl, "validate-idl", str(IDL)).returncode == 0
    info = _vctl(varlinkctl, "list-interfaces", sd.address).stdout.split()
    assert IFACE in info


def test_ping(varlinkctl: str, sd: NotifiedDaemon) -> None:
    assert _call(varlinkctl, sd.address, "Ping") == {}
    # Like every method, it takes no parameters it does not declare.
    assert _error(varlinkctl, sd.address, "Ping", {"x": 1}) == (INVALID, {"parameter": "x"})


def test_get_environment(varlinkctl: str, sd: NotifiedDaemon) -> None:
    env = _call(varlinkctl, sd.address, "GetEnvironment")["environment"]
    assert "COMPOSEFSD_TEST_MARK=a value with spaces = and more" in env
    assert f"NOTIFY_SOCKET={sd.notify.path}" in env
    # What systemd handed only to this process is not passed on (nor shown).
    assert not [e for e in env if e.startswith(("LISTEN_", "WATCHDOG_"))]
    assert len({e.split("=", 1)[0] for e in env}) == len(env)


def test_set_log_level(varlinkctl: str, sd: NotifiedDaemon) -> None:
    # The file said warning: a Ping is not logged at debug level yet.
    assert _call(varlinkctl, sd.address, "Ping") == {}
    assert "io.systemd.service.Ping from pid" not in sd.log_text()
    assert _call(varlinkctl, sd.address, "SetLogLevel", {"level": 7}) == {}
    assert _call(varlinkctl, sd.address, "Ping") == {}
    sd.wait_log("io.systemd.service.Ping from pid")
    for bad in (8, -1, 1 << 40, "7", True, 1.5, [7], {"l": 7}):
        assert _error(varlinkctl, sd.address, "SetLogLevel", {"level": bad}) == (
            INVALID,
            {"parameter": "level"},
        ), bad
    # null: info (sd-varlink's json_dispatch_log_level); debug lines stop again.
    assert _call(varlinkctl, sd.address, "SetLogLevel", {"level": None}) == {}
    size = len(sd.log_text())
    assert _call(varlinkctl, sd.address, "Ping") == {}
    assert _call(varlinkctl, sd.address, "SetLogLevel", {"level": 4}) == {}
    assert "io.systemd.service.Ping from pid" not in sd.log_text()[size:]


def test_reload(varlinkctl: str, sd: NotifiedDaemon, sd_conf: Path) -> None:
    path = sd_conf
    write_config(path, "log-level = debug\n")
    assert _call(varlinkctl, sd.address, "Reload") == {}
    assert _call(varlinkctl, sd.address, "Ping") == {}
    sd.wait_log("io.systemd.service.Ping from pid")
    write_config(path, "log-level = warning\n")
    assert _call(varlinkctl, sd.address, "Reload") == {}


def test_inconsistent_environment(varlinkctl: str, tmp_path: Path) -> None:
    env = dict(os.environ, COMPOSEFSD_TEST_BAD="\udcff\udcfe")  # bytes 0xff 0xfe: not UTF-8
    with notified_daemon(tmp_path / "repo", "--config", "/dev/null", env=env) as d:
        name, _ = _error(varlinkctl, d.address, "GetEnvironment")
        assert name == f"{IFACE}.InconsistentEnvironment"
        assert _call(varlinkctl, d.address, "Ping") == {}


def test_authorization_rules() -> None:
    auth = Authorization(daemon_uid=1000, group=50)
    root, owner = Peer(1, 0, 0), Peer(1, 1000, 1000)
    member = Peer(1, 2000, 2000, frozenset({50}))
    other = Peer(1, 3000, 3000)
    for method in ("Reload", "SetLogLevel", "GetEnvironment"):
        assert auth(root, f"{IFACE}.{method}") and auth(owner, f"{IFACE}.{method}")
        # Not the group: systemd checks root and the service's uid only.
        assert not auth(member, f"{IFACE}.{method}")
        assert not auth(other, f"{IFACE}.{method}")
    assert auth(other, f"{IFACE}.Ping") and auth(member, f"{IFACE}.Ping")
    strict = Authorization(daemon_uid=1000, group=50, restrict_read=True)
    assert not strict(other, f"{IFACE}.Ping") and strict(member, f"{IFACE}.Ping")
    assert not strict(member, f"{IFACE}.Reload")


def _as_user(py: users.UserPython, user: users.TestUser, sock: Path, *calls: Any) -> list[str]:
    return users.call_errors(py, user, sock, [(f"{IFACE}.{m}", p) for m, p in calls], timeout=30)


def test_other_users(tmp_path: Path, test_users: TestUsers, user_python: users.UserPython) -> None:
    """Over a socket everyone may use: Ping for all; Reload, SetLogLevel and
    GetEnvironment refused to another uid, even a member of --group, before their
    parameters are looked at."""
    alice, bob = test_users.alice, test_users.bob
    group = str(test_users.group)  # alice's
    conf = write_config(tmp_path / "c.conf", f"group = {group}\n")
    with notified_daemon(tmp_path / "repo", "--config", str(conf), socket_mode="0666") as d:
        calls = [
            ("Ping", {}),
            ("Reload", {}),
            ("SetLogLevel", {"level": 7}),
            ("SetLogLevel", {"level": "junk"}),
            ("GetEnvironment", {}),
        ]
        expected = ["ok", DENIED, DENIED, DENIED, DENIED]
        assert _as_user(user_python, bob, d.socket, *calls) == expected
        assert _as_user(user_python, alice, d.socket, *calls) == expected
        assert "log level 7" not in d.log_text()
