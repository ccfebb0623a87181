"""``io.systemd.service``, the interface every systemd daemon serves beside its own:
Ping, Reload, SetLogLevel and GetEnvironment, with systemd's IDL (257) and
systemd's rules for each (``src/shared/varlink-io.systemd.service.c``):

* **Ping** answers every peer that may call anything (it is treated like
  ``org.varlink.service``'s methods by the daemon's authorization).
* **SetLogLevel** and **GetEnvironment** are refused, with
  ``org.varlink.service.PermissionDenied``, to every peer but root and the
  daemon's own uid: systemd checks exactly that (not a group), the environment
  because people do pass secrets in it. **Reload** is as narrow: systemd's
  daemons serve it on root-only servers. The daemon's
  :class:`~composefsd.service.daemon.Authorization` applies this
  (:data:`OWNER_ONLY_METHODS`).
* **SetLogLevel** takes a BSD syslog level, 0 (emerg) to 7 (debug); null means
  info (sd-varlink's ``json_dispatch_log_level`` without its strict flag); any
  other value is ``org.varlink.service.InvalidParameter``. (systemd also refuses
  a call without ``level`` at all; here, where the validator gives a missing
  nullable field as None, that means info too.) Python has no notice level: 5
  lets through what 4 does.
* **GetEnvironment** returns the process's environment as ``NAME=value`` strings;
  one that is not a valid assignment or not UTF-8 makes it
  ``io.systemd.service.InconsistentEnvironment``, as in systemd.
* **Reload** re-reads the configuration through the daemon's hook (the daemon's
  module notes say what it changes); a configuration that cannot be applied
  answers the error the hook raises, the old settings staying in force.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Final

from composefsd.service.context import CallContext, VarlinkReplyError

__all__ = [
    "INTERFACE",
    "OWNER_ONLY_METHODS",
    "SystemdServiceInterface",
    "python_level",
    "set_log_level",
]

log = logging.getLogger(__name__)

INTERFACE: Final = "io.systemd.service"
#: What only root and the daemon's own uid may call (module notes).
OWNER_ONLY_METHODS: Final = frozenset(
    f"{INTERFACE}.{m}" for m in ("Reload", "SetLogLevel", "GetEnvironment")
)
_INVALID_PARAMETER: Final = "org.varlink.service.InvalidParameter"

#: BSD syslog levels by Python's: what a syslog level lets through. Python has no
#: notice level; nothing composefsd logs sits between info and warning.
_SYSLOG_TO_PYTHON: Final = {
    0: logging.CRITICAL,
    1: logging.CRITICAL,
    2: logging.CRITICAL,
    3: logging.ERROR,
    4: logging.WARNING,
    5: logging.INFO + 1,
    6: logging.INFO,
    7: logging.DEBUG,
}
_LOG_INFO: Final = 6


def python_level(level: int) -> int:
    """The ``logging`` level for BSD syslog ``level`` (0-7); ValueError otherwise."""
    try:
        return _SYSLOG_TO_PYTHON[level]
    except KeyError:
        raise ValueError(f"not a syslog level (0-7): {level}") from None


def set_log_level(level: int) -> None:
    """Let through messages of Python logging ``level`` and above, from now on."""
    logging.getLogger().setLevel(level)


def _valid_assignment(entry: str) -> bool:
    name, eq, value = entry.partition("=")
    if not eq or not name or any(c.isspace() for c in name):
        return False
    try:
        entry.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 (surrogateescape)
        return False
    return "\0" not in value


class SystemdServiceInterface:
    """The handlers; ``reload`` is the daemon's (None: nothing to re-read)."""

    def __init__(self, reload: Callable[[], None] | None = None) -> None:
        self.reload = reload

    def Ping(self, *, _request: CallContext) -> dict[str, Any]:
        log.debug("io.systemd.service.Ping from pid %d", _request.peer.pid)
        return {}

    def Reload(self, *, _request: CallContext) -> dict[str, Any]:
        log.info("reload asked by pid %d (uid %d)", _request.peer.pid, _request.peer.uid)
        if self.reload is not None:
            self.reload()
        return {}

    def SetLogLevel(self, level: int | None, *, _request: CallContext) -> dict[str, Any]:
        syslog_level = _LOG_INFO if level is None else level
        try:
            python = python_level(syslog_level)
        except ValueError:
            raise VarlinkReplyError(_INVALID_PARAMETER, {"parameter": "level"}) from None
        log.info(
            "log level %d (%s) set by pid %d",
            syslog_level,
            logging.getLevelName(python),
            _request.peer.pid,
        )
        set_log_level(python)
        return {}

    def GetEnvironment(self, *, _request: CallContext) -> dict[str, Any]:
        entries: dict[str, str] = {}
        for name, value in os.environ.items():
            entry = f"{name}={value}"
            if not _valid_assignment(entry):
                raise VarlinkReplyError(f"{INTERFACE}.InconsistentEnvironment")
            entries[name] = entry
        return {"environment": list(entries.values())}
