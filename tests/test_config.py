"""composefsd.conf: its syntax, who may own it, how its values are checked, and
what the daemon does with it at start, on Reload (the Varlink method) and on
SIGHUP: the command line wins, what can change at run time does, what cannot is
logged as needing a restart, and a bad file changes nothing and says where it is
wrong (with sd_notify's RELOADING=1/MONOTONIC_USEC=/READY=1 around every reload)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import users
from composefsd.service import client
from composefsd.service.config import (
    MAX_CONFIG_SIZE,
    ConfigError,
    UntrustedConfigError,
    default_config_path,
    parse_boolean,
    parse_config,
    read_config,
    settings_from,
)
from composefsd.service.daemon import CONFIG_KEYS, _parser
from conftest import TestUsers
from sdnotify import NotifiedDaemon, fields, notified_daemon, start, write_config
from servicehelpers import DAEMON, TEST_ALGORITHM

KEYS = frozenset({"group", "log-level", "restrict-read", "max-connections"})
P = Path("/etc/composefs/composefsd.conf")
RELOAD = "io.systemd.service.Reload"
SYSTEM_ERROR = "io.composefs.Repository.SystemError"


# -- syntax ---------------------------------------------------------------------------------


def test_parse_config() -> None:
    text = (
        "# a comment\n"
        "; another\n"
        "\n"
        "  group   =  wheel  \n"
        "log-level=debug\n"
        "restrict-read = 'yes'\n"
        'group = "adm"\n'  # a later line wins
        "max-connections =\n"
    )
    got = {k: (v.value, v.line) for k, v in parse_config(text, P, KEYS).items()}
    assert got == {
        "group": ("adm", 7),
        "log-level": ("debug", 5),
        "restrict-read": ("yes", 6),
        "max-connections": ("", 8),
    }


@pytest.mark.parametrize(
    ("text", "line", "key", "reason"),
    [
        ("group = a\nno equals sign\n", 2, None, "not a 'key = value' line"),
        ("\n\nbogus = 1\n", 3, None, "unknown key 'bogus'"),
        ("--group = wheel\n", 1, None, "unknown key '--group'"),
        ("../group = x\n", 1, None, "unknown key '../group'"),
        ("[Service]\n", 1, None, "not a 'key = value' line"),
        ("group = a\x1bb\n", 1, "group", "control characters in the value"),
        ("group = a\x00b\n", 1, "group", "control characters in the value"),
        ("x" * 10000 + " = 1\n", 1, None, "unknown key 'xxxx"),
    ],
    ids=["no-equals", "unknown", "dashes", "dotdot", "section", "escape", "nul", "long"],
)
def test_parse_config_errors(text: str, line: int, key: str | None, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, P, KEYS)
    assert (info.value.line, info.value.key) == (line, key)
    assert info.value.reason.startswith(reason)
    assert str(info.value).startswith(f"{P}:{line}: ")
    assert len(str(info.value)) < 200  # a long key is not repeated whole


def test_parse_boolean() -> None:
    for word in ("1", "yes", "Y", "true", "on", " On "):
        assert parse_boolean(word) is True
    for word in ("0", "no", "N", "false", "off"):
        assert parse_boolean(word) is False
    for word in ("", "2", "maybe", "yess"):
        with pytest.raises(ValueError):
            parse_boolean(word)


def test_every_key_is_an_option() -> None:
    options = {o[2:] for a in _parser()._actions for o in a.option_strings if o.startswith("--")}
    assert options >= CONFIG_KEYS
    # What only makes sense on a command line is not a key.
    assert not {"config", "reload", "help", "version"} & CONFIG_KEYS


def _settings(text: str) -> dict[str, Any]:
    return settings_from(parse_config(text, P, CONFIG_KEYS), _parser(), P)


def test_settings_are_the_options() -> None:
    got = _settings(
        "restrict-read = yes\nmax-message-size = 64K\nidle-timeout = 2.5\n"
        "log-level = warning\nsocket-mode = 0660\nerofs-version = 2\n"
    )
    assert got["restrict_read"] is True
    assert got["max_message_size"] == 64 << 10
    assert got["idle_timeout"] == 2.5
    assert got["log_level"] == "warning"
    assert got["socket_mode"] == 0o660
    assert int(got["erofs_version"]) == 2


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max-connections = 0\n", "max-connections"),
        ("max-connections = -5\n", "max-connections"),
        ("max-connections = 99999999999999999999999x\n", "max-connections"),
        ("max-message-size = 12Q\n", "max-message-size"),
        ("idle-timeout = nan\n", "idle-timeout"),
        ("idle-timeout = -1\n", "idle-timeout"),
        ("log-level = loud\n", "log-level"),
        ("restrict-read = maybe\n", "restrict-read"),
        ("socket-mode = 7777\n", "socket-mode"),
        ("algorithm = md5\n", "algorithm"),
        ("\n# x\nworkers = many\n", "workers"),
    ],
)
def test_bad_values_name_line_and_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(text)
    assert info.value.key == key
    assert info.value.line == text.count("\n")
    assert f":{info.value.line}: {key}: " in str(info.value)


# -- who controls the file ------------------------------------------------------------------


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def test_read_config(conf_dir: Path) -> None:
    path = write_config(conf_dir / "c.conf", "group = wheel\n")
    assert read_config(path, KEYS, required=True)["group"].value == "wheel"
    assert read_config(conf_dir / "missing", KEYS, required=False) == {}
    with pytest.raises(ConfigError, match="no such file"):
        read_config(conf_dir / "missing", KEYS, required=True)
    # /dev/null (how systemd masks a file) is an empty one.
    assert read_config(Path("/dev/null"), KEYS, required=True) == {}
    link = conf_dir / "link.conf"
    link.symlink_to(path)
    assert read_config(link, KEYS, required=True)["group"].value == "wheel"


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda p: p.chmod(0o666), "the file may be written by others"),
        (lambda p: p.chmod(0o664), "the file may be written by others"),
        (lambda p: os.chown(p, 65534, 0), "the file is owned by uid 65534"),
        (lambda p: p.parent.chmod(0o777), "its directory may be written by others"),
        (lambda p: p.parent.chmod(0o1777), "its directory may be written by others"),
        (lambda p: os.chown(p.parent, 65534, -1), "its directory is owned by uid 65534"),
    ],
)
def test_untrusted_config(conf_dir: Path, setup: Any, reason: str) -> None:
    path = write_config(conf_dir / "c.conf", "group = wheel\n")
    setup(path)
    with pytest.raises(UntrustedConfigError) as info:
        read_config(path, KEYS, required=True)
    assert info.value.reason.startswith(reason)


def test_untrusted_link(conf_dir: Path, tmp_path: Path) -> None:
    """A link someone else made, or one into a directory others may write, is
    refused even when what it points at is root's own file."""
    good = write_config(conf_dir / "c.conf", "group = wheel\n")
    link = conf_dir / "theirs.conf"
    link.symlink_to(good)
    os.chown(link, 65534, 65534, follow_symlinks=False)
    with pytest.raises(UntrustedConfigError, match="symbolic link is owned by uid 65534"):
        read_config(link, KEYS, required=True)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    target = write_config(open_dir / "c.conf", "group = wheel\n")
    inward = conf_dir / "in.conf"
    inward.symlink_to(target)
    with pytest.raises(UntrustedConfigError, match="its directory may be written by others"):
        read_config(inward, KEYS, required=True)


def test_hostile_files(conf_dir: Path) -> None:
    fifo = conf_dir / "fifo"
    os.mkfifo(fifo, 0o644)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_config(fifo, KEYS, required=True)  # and does not wait for a writer
    with pytest.raises(ConfigError, match="not a regular file"):
        read_config(conf_dir, KEYS, required=True)
    big = write_config(conf_dir / "big", "# " + "x" * MAX_CONFIG_SIZE + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        read_config(big, KEYS, required=True)
    binary = conf_dir / "bin"
    binary.write_bytes(b"group = a\n\n# \xff\xfe\n")
    binary.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        read_config(binary, KEYS, required=True)
    assert (info.value.reason, info.value.line) == ("not UTF-8", 3)


# -- the daemon -----------------------------------------------------------------------------


def _start_fails(tmp_path: Path, *args: str) -> str:
    argv = [*DAEMON, "--repo", str(tmp_path / "repo"), "--algorithm", TEST_ALGORITHM]
    argv += ["--listen", str(tmp_path / "sock"), "--runtime-dir", str(tmp_path / "rt")]
    proc = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert not (tmp_path / "sock").exists()
    return proc.stderr


def test_start_up_errors(tmp_path: Path, conf_dir: Path) -> None:
    missing = conf_dir / "missing.conf"
    assert f"{missing}: no such file" in _start_fails(tmp_path, "--config", str(missing))
    bad = write_config(conf_dir / "bad.conf", "group = root\nmax-connections = none\n")
    err = _start_fails(tmp_path, "--config", str(bad))
    assert f"{bad}:2: max-connections: not a number: 'none'" in err
    loose = write_config(conf_dir / "loose.conf", "group = root\n", mode=0o666)
    assert "may be written by others" in _start_fails(tmp_path, "--config", str(loose))
    nogroup = write_config(conf_dir / "g.conf", "group = no-such-group-here\n")
    assert "unknown group 'no-such-group-here'" in _start_fails(tmp_path, "--config", str(nogroup))


def _call(address: str, method: str, params: dict[str, Any] | None = None) -> Any:
    with client.connect(address) as conn:
        return conn.call(method, params or {})


def _reload_error(address: str) -> dict[str, Any]:
    with pytest.raises(client.VarlinkCallError) as info:
        _call(address, RELOAD)
    assert info.value.name == SYSTEM_ERROR
    return info.value.parameters


def _reload_messages(d: NotifiedDaemon, before_usec: int) -> None:
    """RELOADING=1 with a MONOTONIC_USEC= from during the reload, then READY=1."""
    reloading = fields(d.wait_for(lambda m: "RELOADING=1" in m.splitlines()))
    usec = int(reloading["MONOTONIC_USEC"])
    assert before_usec <= usec <= time.monotonic_ns() // 1000
    d.wait_for(lambda m: "READY=1" in m.splitlines())


def test_command_line_wins(conf_dir: Path) -> None:
    conf = write_config(conf_dir / "c.conf", "log-level = debug\nmax-connections = 5\n")
    with notified_daemon(conf_dir / "repo", "--config", str(conf), "--log-level", "warning") as d:
        _call(d.address, "io.systemd.service.Ping")
        assert "io.systemd.service.Ping from pid" not in d.log_text()
    assert " DEBUG: " not in d.log_text()


def _as(py: users.UserPython, user: users.TestUser, sock: Path, method: str, params: Any) -> str:
    (error,) = users.call_errors(py, user, sock, [(method, params)], timeout=30)
    return error


def test_reload_applies(
    conf_dir: Path, test_users: TestUsers, user_python: users.UserPython
) -> None:
    """restrict-read, group, the log level and the limits change at once; keys that
    need a restart are logged; a bad file changes nothing and names line and key."""
    alice, bob = test_users.alice, test_users.bob
    conf = write_config(conf_dir / "c.conf", "log-level = info\n")
    describe = "io.composefs.Repository.Describe"
    remove = "io.composefs.Repository.RemoveImage"
    denied = "org.varlink.service.PermissionDenied"
    with notified_daemon(conf_dir / "repo", "--config", str(conf), socket_mode="0666") as d:
        assert _as(user_python, bob, d.socket, describe, {}) == "ok"
        assert _as(user_python, alice, d.socket, remove, {"image": "nope"}) == denied

        write_config(
            conf,
            f"restrict-read = yes\ngroup = {test_users.group}\nlog-level = debug\n"
            "max-message-size = 1K\nworkers = 3\n",
        )
        before = time.monotonic_ns() // 1000
        assert _call(d.address, RELOAD) == {}
        _reload_messages(d, before)
        assert _as(user_python, bob, d.socket, describe, {}) == denied
        assert _as(user_python, alice, d.socket, describe, {}) == "ok"
        assert _as(user_python, alice, d.socket, remove, {"image": "nope"}) == (
            "io.composefs.Repository.NoSuchImage"
        )
        assert "workers changed: it takes effect when composefsd restarts" in d.log_text()
        # The new message limit: a longer call now closes the connection.
        with client.connect(d.address) as conn, pytest.raises(client.VarlinkClientError):
            conn.call("io.systemd.service.Ping", {"padding": "x" * 2048})
        _call(d.address, "io.systemd.service.Ping")
        d.wait_log("io.systemd.service.Ping from pid")  # debug now

        # A bad file: an error naming it, its line and key; nothing changes.
        write_config(conf, "restrict-read = no\nlog-level = info\nmax-connections = 0\n")
        before = time.monotonic_ns() // 1000
        params = _reload_error(d.address)
        assert params == {
            "errnoName": "EINVAL",
            "message": f"{conf}:3: max-connections: must be at least 1: '0'",
        }
        _reload_messages(d, before)
        assert _as(user_python, bob, d.socket, describe, {}) == denied
        write_config(conf, "group = no-such-group-here\n")
        assert _reload_error(d.address)["message"] == (
            f"{conf}:1: group: unknown group 'no-such-group-here'"
        )
        conf.chmod(0o646)
        assert "may be written by others" in _reload_error(d.address)["message"]
        assert _as(user_python, alice, d.socket, describe, {}) == "ok"

        # Back to the defaults: a file that is gone is no settings.
        conf.unlink()
        assert "no such file" in _reload_error(d.address)["message"]  # --config names it
    assert "reload failed, the settings stay as they were" in d.log_text()


def test_sighup(conf_dir: Path) -> None:
    conf = write_config(conf_dir / "c.conf", "log-level = warning\n")
    with notified_daemon(conf_dir / "repo", "--config", str(conf)) as d:
        write_config(conf, "log-level = debug\n")
        before = time.monotonic_ns() // 1000
        d.proc.send_signal(signal.SIGHUP)
        _reload_messages(d, before)
        d.wait_log("configuration reloaded")
        write_config(conf, "log-level = 3\n")
        d.proc.send_signal(signal.SIGHUP)
        _reload_messages(d, before)
        d.wait_log(f"{conf}:1: log-level: ")
        assert d.alive()
        _call(d.address, "io.systemd.service.Ping")  # still serving, still at debug
        d.wait_log("io.systemd.service.Ping from pid")


def test_reload_option(conf_dir: Path) -> None:
    """composefsd --reload (the unit's ExecReload=): Reload over the socket, waiting
    for the answer; its exit status says whether it worked."""
    conf = write_config(conf_dir / "c.conf", "log-level = info\n")
    d = start(conf_dir / "repo", "--config", str(conf))
    try:
        ok = subprocess.run(
            [*DAEMON, "--reload", "--listen", d.address], capture_output=True, text=True
        )
        assert ok.returncode == 0, ok.stderr
        d.wait_log("configuration reloaded")
        write_config(conf, "idle-timeout = never\n")
        bad = subprocess.run(
            [*DAEMON, "--reload", "--listen", d.address], capture_output=True, text=True
        )
        assert bad.returncode == 1
        assert f"reload failed: {conf}:1: idle-timeout: not a number of seconds" in bad.stderr
        gone = subprocess.run(
            [*DAEMON, "--reload", "--listen", str(conf_dir / "nothing")],
            capture_output=True,
            text=True,
        )
        assert gone.returncode == 1 and "cannot ask" in gone.stderr
    finally:
        assert d.stop() == 0


def test_idle_timeout_from_reload(conf_dir: Path) -> None:
    conf = write_config(conf_dir / "c.conf", "")
    d = start(conf_dir / "repo", "--config", str(conf))
    try:
        write_config(conf, "idle-timeout = 0.5\n")
        assert _call(d.address, RELOAD) == {}
        # No connection, no call: it exits by itself (bounded wait).
        d.proc.wait(30)
        assert d.proc.returncode == 0
        assert "idle for" in d.log_text()
    finally:
        d.stop()


def test_sockets_unaffected(conf_dir: Path) -> None:
    """listen and socket-mode change only at a restart: the socket stays put."""
    conf = write_config(conf_dir / "c.conf", "")
    with notified_daemon(conf_dir / "repo", "--config", str(conf)) as d:
        mode = d.socket.stat().st_mode
        write_config(conf, f"socket-mode = 0666\nlisten = {conf_dir}/other\n")
        assert _call(d.address, RELOAD) == {}
        d.wait_log("socket-mode changed: it takes effect when composefsd restarts")
        assert d.socket.stat().st_mode == mode
        assert not (conf_dir / "other").exists()
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.address)
        s.close()


def test_man_page_names_every_key() -> None:
    """man/composefsd.conf.5 documents every key, and says which need a restart."""
    from composefsd.service.daemon import _RESTART_KEYS

    text = (Path(__file__).resolve().parent.parent / "man" / "composefsd.conf.5").read_text()
    keys_part, _, restart_part = text.partition("These take effect only when composefsd starts")
    restart_part = restart_part.partition(".SH RELOADING")[0]
    documented_restart = {
        line.split()[1] for line in restart_part.splitlines() if line.startswith(".BR ")
    }
    assert documented_restart == set(_RESTART_KEYS)
    for key in CONFIG_KEYS - _RESTART_KEYS:
        assert f'"{key} = ' in keys_part or f", {key} = " in keys_part, key


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Root's composefsd reads /etc's file; another user's its own, never root's."""
    assert default_config_path(0) == Path("/etc/composefs/composefsd.conf")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/u/cfg")
    assert default_config_path(1000) == Path("/home/u/cfg/composefs/composefsd.conf")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/cfg")  # ignored, as the spec says
    monkeypatch.setenv("HOME", "/home/u")
    assert default_config_path(1000) == Path("/home/u/.config/composefs/composefsd.conf")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert default_config_path(1000) == Path("/home/u/.config/composefs/composefsd.conf")


def test_unreadable_default(
    test_users: TestUsers, user_python: users.UserPython, tmp_path: Path
) -> None:
    """A default file this uid may not look at is no settings (with a warning); one
    named with --config is an error."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = write_config(private / "c.conf", "group = root\n")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from composefsd.service.config import ConfigError, read_config\n"
        "p = Path(sys.argv[1])\n"
        "print(read_config(p, ['group'], required=False))\n"
        "try:\n"
        "    read_config(p, ['group'], required=True)\n"
        "except ConfigError as e:\n"
        "    print('error:', e.reason)\n"
    )
    out = users.run_as(
        test_users.bob,
        user_python.command("-c", script, str(path)),
        env=user_python.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.splitlines() == ["{}", "error: Permission denied"]
    assert "no settings from it" in out.stderr
