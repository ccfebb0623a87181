"""composefsd's configuration file, ``/etc/composefs/composefsd.conf``
(composefsd.conf(5); for a composefsd run by another user,
``~/.config/composefs/composefsd.conf``: :func:`default_config_path`).

One setting per line, ``key = value``, where the key is the long option of
the same name without its ``--`` (``group = wheel``, ``max-connections = 64``,
``restrict-read = yes``); blank lines and lines starting with ``#`` or ``;``
are ignored; a later line for the same key wins. Booleans take systemd's
spellings (``yes``/``no``, ``true``/``false``, ``on``/``off``, ``1``/``0``).
Options given on the command line win over the file.

``/dev/null`` (or a link to it) is an empty file, as for systemd's own files.
Only root controls the file: it is refused (:class:`UntrustedConfigError`)
unless it is a regular file owned by root or by composefsd's own uid, that
nobody else may write, in a directory that nobody else may write either (else
another user could replace it; a sticky one like /tmp too: a link could be
theirs). A file larger than :data:`MAX_CONFIG_SIZE`, not
UTF-8, or with a line that is not an assignment of a known key is refused with
:class:`ConfigError` naming the line (and the key).

:func:`read_config` reads and checks the syntax; :func:`settings_from` turns the
values into what the argument parser would have given for the same options (its
types, choices and checks: one home for each option's rules).
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DEFAULT_CONFIG",
    "MAX_CONFIG_SIZE",
    "ConfigError",
    "ConfigValue",
    "UntrustedConfigError",
    "default_config_path",
    "parse_boolean",
    "parse_config",
    "read_config",
    "settings_from",
]

log = logging.getLogger(__name__)

DEFAULT_CONFIG: Final = Path("/etc/composefs/composefsd.conf")
_USER_CONFIG: Final = Path("composefs") / "composefsd.conf"


def default_config_path(uid: int | None = None) -> Path:
    """The file composefsd reads without ``--config``: :data:`DEFAULT_CONFIG` for
    root; another user's composefsd (its own repository, its own socket) reads
    ``$XDG_CONFIG_HOME/composefs/composefsd.conf`` (``~/.config`` by default), not
    the system daemon's settings."""
    if (os.geteuid() if uid is None else uid) == 0:
        return DEFAULT_CONFIG
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / _USER_CONFIG


#: Far more than every key with a long value; a larger file is a mistake or an attack.
MAX_CONFIG_SIZE: Final = 64 << 10

_TRUE: Final = frozenset({"1", "yes", "y", "true", "t", "on"})
_FALSE: Final = frozenset({"0", "no", "n", "false", "f", "off"})


class ConfigError(ValueError):
    """The file, one of its lines or one of its values is wrong."""

    def __init__(
        self, path: Path, reason: str, *, line: int | None = None, key: str | None = None
    ) -> None:
        super().__init__(path, reason, line, key)
        self.path = path
        self.reason = reason
        self.line = line
        self.key = key

    def __str__(self) -> str:
        where = str(self.path) if self.line is None else f"{self.path}:{self.line}"
        what = f"{self.key}: " if self.key is not None else ""
        return f"{where}: {what}{self.reason}"


class UntrustedConfigError(ConfigError):
    """Someone other than root and composefsd's uid could change the file."""


@dataclass(slots=True, frozen=True)
class ConfigValue:
    """One ``key = value`` line."""

    value: str
    line: int


def parse_boolean(text: str) -> bool:
    """systemd's booleans; ValueError for anything else."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"not a boolean (yes or no): {text!r}")


def parse_config(text: str, path: Path, keys: Iterable[str]) -> dict[str, ConfigValue]:
    """The assignments of ``text`` (the contents of ``path``), by key; every key must
    be one of ``keys``."""
    known = frozenset(keys)
    out: dict[str, ConfigValue] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(path, "not a 'key = value' line", line=number)
        if key not in known:
            shown = repr(key[:64]) + ("..." if len(key) > 64 else "")
            raise ConfigError(path, f"unknown key {shown}", line=number)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if not value.isprintable():
            raise ConfigError(path, "control characters in the value", line=number, key=key)
        out[key] = ConfigValue(value, number)
    return out


def _check_owner(st: os.stat_result, what: str, path: Path, owners: frozenset[int]) -> None:
    if st.st_uid not in owners:
        raise UntrustedConfigError(
            path, f"{what} is owned by uid {st.st_uid}, not root or composefsd's"
        )
    if st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode):
        raise UntrustedConfigError(
            path, f"{what} may be written by others (mode {stat.S_IMODE(st.st_mode):04o})"
        )


def _check_place(path: Path, owners: frozenset[int]) -> None:
    """The directories that hold ``path``'s name and, through a symbolic link, its
    target: someone who could write there could replace the file (a sticky
    directory like /tmp included: they could have put a link there)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        _check_owner(st, "the symbolic link", path, owners)
    _check_owner(os.stat(path.absolute().parent), "its directory", path, owners)
    _check_owner(os.stat(Path(os.path.realpath(path)).parent), "its directory", path, owners)


def read_config(
    path: Path, keys: Iterable[str], *, required: bool, owners: frozenset[int] | None = None
) -> dict[str, ConfigValue]:
    """Read and parse ``path`` (module notes). A missing file is no settings unless
    ``required``. ``owners``: the uids that may own it (default root and this
    process's effective uid)."""
    owners = frozenset({0, os.geteuid()}) if owners is None else owners
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        if required:
            raise ConfigError(path, "no such file") from None
        return {}
    except PermissionError as exc:
        if required:
            raise ConfigError(path, exc.strerror or str(exc)) from None
        # A default path this uid cannot even look at (a $HOME of someone
        # else's) holds nothing meant for it.
        log.warning("cannot read %s (%s): no settings from it", path, exc.strerror)
        return {}
    except OSError as exc:
        raise ConfigError(path, exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):
            return {}  # /dev/null: no settings, as systemd takes a file masked by it
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(path, "not a regular file")
        _check_owner(st, "the file", path, owners)
        _check_place(path, owners)
        if st.st_size > MAX_CONFIG_SIZE:
            raise ConfigError(path, f"larger than {MAX_CONFIG_SIZE} bytes")
        data = os.read(fd, MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise ConfigError(path, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_SIZE:
        raise ConfigError(path, f"larger than {MAX_CONFIG_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(path, "not UTF-8", line=line) from None
    return parse_config(text, path, keys)


def option_actions(parser: argparse.ArgumentParser, keys: Iterable[str]) -> dict[str, Any]:
    """The parser's action for each of ``keys`` (a long option without ``--``)."""
    wanted = frozenset(keys)
    out: dict[str, Any] = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option[2:] in wanted:
                out[option[2:]] = action
    missing = wanted - out.keys()
    if missing:
        raise KeyError(f"no such options: {sorted(missing)}")
    return out


def settings_from(
    values: Mapping[str, ConfigValue], parser: argparse.ArgumentParser, path: Path
) -> dict[str, Any]:
    """The file's values by the parser's ``dest``, converted and checked as the
    parser converts and checks the options; ConfigError names the line and key of
    a bad one."""
    actions = option_actions(parser, values.keys())
    out: dict[str, Any] = {}
    for key, item in values.items():
        action = actions[key]
        try:
            if isinstance(action, argparse._StoreTrueAction):
                value: Any = parse_boolean(item.value)
            elif action.type is not None:
                value = action.type(item.value)
            else:
                value = item.value
            if action.choices is not None and value not in action.choices:
                raise ValueError(
                    f"{item.value!r} is not one of {', '.join(map(str, action.choices))}"
                )
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(path, str(exc), line=item.line, key=key) from None
        out[action.dest] = value
    return out
