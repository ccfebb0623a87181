"""polkit for callers today's rule does not trust: which action each mutating method
needs, and the question to polkitd (org.freedesktop.PolicyKit1.Authority.CheckAuthorization
on the system bus), as systemd-mountfsd, machined and importd ask it.

* **Which methods** (:data:`METHOD_ACTIONS`): a method listed there may be called
  by a peer that is neither root, the daemon's uid nor in ``--group`` when polkit
  allows the peer its action; a method not listed is never put to polkit. The
  table is the one home of that decision: the daemon's transport hook lets such a
  call through and :meth:`PolkitCheck.authorize` then runs in the call's worker
  thread before the method (the transport's ``check_call``), so no method can skip
  it. The actions are declared in ``polkit/io.composefs.composefsd.policy``.
* **Who asks**: the subject is a ``unix-process`` named by the pidfd of the very
  process that connected (SO_PEERPIDFD, Linux 6.5), never by a pid looked up
  later. polkit 122 (Debian 12) still needs ``pid`` and ``start-time`` (it reads
  the uid itself and ignores ``pidfd``); newer ones use the ``pidfd``. We send
  all four: the pid and start time are read while the pidfd shows the process
  alive (a pid is not reused before its process is reaped), and polkit refuses a
  start time that is no longer the pid's ("has been replaced"). A caller that is
  gone is refused.
* **Answers**: authorized runs the method; a challenge (``auth_admin`` and no
  agent answered) is ``<interface>.InteractiveAuthenticationRequired``; anything
  else ``org.varlink.service.PermissionDenied``. ``AllowUserInteraction`` is set
  only when the call set ``allowInteractiveAuthentication``.
* **No polkit** (no system bus socket, polkitd neither on the bus nor
  activatable, the bus or polkitd gone mid-call): today's rule stands, i.e.
  ``PermissionDenied`` (``--polkit yes`` makes it
  ``<interface>.AuthorizationUnavailable`` instead, naming why).
* **Bounded cost**: one shared bus connection (made on first use, made again
  when it drops), a timeout on every check (:data:`DEFAULT_TIMEOUT`; then
  ``AuthorizationUnavailable``), at most :data:`DEFAULT_CHECKS_PER_UID` checks
  in flight per uid (more: ``AuthorizationUnavailable`` at once), and no cache
  of answers (polkit keeps ``auth_admin_keep`` itself).

jeepney (pure Python, no dependencies, Debian's python3-jeepney) speaks D-Bus: its
thread-safe router lets the worker threads share the one connection.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import select
import stat
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from jeepney import DBusAddress, MessageType, new_method_call
from jeepney.io.threading import (
    DBusRouter,
    RouterClosed,
    open_dbus_connection,
)

from composefsd.service.context import CallContext, VarlinkReplyError

__all__ = [
    "ACTIONS",
    "DEFAULT_CHECKS_PER_UID",
    "DEFAULT_TIMEOUT",
    "METHOD_ACTIONS",
    "PERMISSION_DENIED",
    "Decision",
    "PolkitCheck",
    "PolkitClient",
    "PolkitMode",
    "PolkitUnreachable",
]

log = logging.getLogger(__name__)

PERMISSION_DENIED: Final = "org.varlink.service.PermissionDenied"

_PREFIX: Final = "io.composefs.composefsd."
CREATE_IMAGE: Final = _PREFIX + "create-image"
MOUNT: Final = _PREFIX + "mount"
REMOVE: Final = _PREFIX + "remove"
GC: Final = _PREFIX + "gc"
PULL: Final = _PREFIX + "pull"
TAG: Final = _PREFIX + "tag"
#: Every action composefsd asks polkit about (the .policy file declares exactly these).
ACTIONS: Final = frozenset({CREATE_IMAGE, MOUNT, REMOVE, GC, PULL, TAG})

#: The polkit action a caller that today's rule does not trust needs for each method
#: (module notes). Unmount shares Mount's action: who may mount may take it down.
METHOD_ACTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "io.composefs.Repository.CreateImage": CREATE_IMAGE,
        "io.composefs.Repository.Mount": MOUNT,
        "io.composefs.Repository.Unmount": MOUNT,
        "io.composefs.Repository.RemoveImage": REMOVE,
        "io.composefs.Repository.GarbageCollect": GC,
        "io.composefs.Oci.Pull": PULL,
        "io.composefs.Oci.Tag": TAG,
        "io.composefs.Oci.Untag": TAG,
        "io.composefs.Oci.Mount": MOUNT,
    }
)

#: Seconds a check may take (systemd's sd-bus default for a method call is 25 s).
DEFAULT_TIMEOUT: Final = 25.0
#: Checks one uid may have in flight at once.
DEFAULT_CHECKS_PER_UID: Final = 4

_AUTHORITY: Final = DBusAddress(
    "/org/freedesktop/PolicyKit1/Authority",
    bus_name="org.freedesktop.PolicyKit1",
    interface="org.freedesktop.PolicyKit1.Authority",
)
_ALLOW_USER_INTERACTION: Final = 1
#: D-Bus errors that mean "polkit is not there" rather than "polkit said something".
_ABSENT: Final = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Disconnected",
        "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
        "org.freedesktop.DBus.Error.Spawn.ChildExited",
    }
)
_SYSTEM_BUS: Final = "unix:path=/var/run/dbus/system_bus_socket"


class PolkitMode(enum.Enum):
    """``--polkit``: ask polkit when it is there (auto), insist on it (yes), never (no)."""

    AUTO = "auto"
    YES = "yes"
    NO = "no"


class PolkitUnreachable(Exception):
    """No answer from polkit: no bus, no polkitd, the connection lost, or a timeout."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class CallerGone(Exception):
    """The process that connected has exited: there is nobody to authorize."""


@dataclass(slots=True, frozen=True)
class Decision:
    """polkit's answer: authorized, or a challenge (auth_admin with no agent), or neither."""

    authorized: bool
    challenge: bool


def system_bus_address() -> str:
    """Where the system bus is (``$DBUS_SYSTEM_BUS_ADDRESS``, else the standard socket)."""
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or _SYSTEM_BUS


def bus_socket_exists(address: str) -> bool:
    """Whether a ``unix:path=`` bus address names an existing socket (other
    address kinds: assumed to; connecting will tell)."""
    for part in address.split(";"):
        kind, _, rest = part.partition(":")
        if not kind:
            continue
        if kind != "unix":
            return True
        for item in rest.split(","):
            key, _, value = item.partition("=")
            if key == "path":
                try:
                    return stat.S_ISSOCK(os.stat(value).st_mode)
                except OSError:
                    return False
            if key == "abstract":
                return True
    return False


class _Router(DBusRouter):  # type: ignore[misc]
    """jeepney's router, whose receiving thread ends quietly when the bus goes
    (its waiters then get RouterClosed, and the next check connects anew)."""

    def _receiver(self) -> None:
        try:
            super()._receiver()
        except (OSError, ValueError) as exc:
            log.info("the system bus connection ended: %s", exc)


class PolkitClient:
    """CheckAuthorization over one shared system-bus connection (thread-safe)."""

    def __init__(self, address: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._lock = threading.Lock()
        self._router: Any = None
        self._conn: Any = None

    def _connect(self) -> Any:
        with self._lock:
            if self._router is not None:
                return self._router
            address = self.address or system_bus_address()
            if not bus_socket_exists(address):
                raise PolkitUnreachable(f"no system bus at {address}")
            try:
                conn = open_dbus_connection(
                    address, enable_fds=True, auth_timeout=min(self.timeout, 5.0)
                )
            except (OSError, ValueError, RuntimeError, TimeoutError) as exc:
                raise PolkitUnreachable(f"cannot connect to the system bus: {exc}") from None
            self._conn = conn
            self._router = _Router(conn)
            return self._router

    def _drop(self, router: Any) -> None:
        """Forget a connection that failed, so that the next check makes a new one."""
        with self._lock:
            if self._router is not router:
                return
            self._router = None
            conn, self._conn = self._conn, None
        try:
            router.close()
        finally:
            if conn is not None:
                conn.close()

    def close(self) -> None:
        router = self._router
        if router is not None:
            self._drop(router)

    def check(
        self, subject: dict[str, tuple[str, Any]], action: str, interactive: bool
    ) -> Decision:
        """polkit's answer for ``subject`` (a unix-process's a{sv}) and ``action``.
        Raises :class:`PolkitUnreachable` when polkit cannot answer."""
        msg = new_method_call(
            _AUTHORITY,
            "CheckAuthorization",
            "(sa{sv})sa{ss}us",
            (
                ("unix-process", subject),
                action,
                {},
                _ALLOW_USER_INTERACTION if interactive else 0,
                "",
            ),
        )
        for attempt in (1, 2):
            router = self._connect()
            try:
                reply = router.send_and_get_reply(msg, timeout=self.timeout)
            except TimeoutError:
                raise PolkitUnreachable(
                    f"polkit did not answer within {self.timeout:g} s", timed_out=True
                ) from None
            except (RouterClosed, OSError) as exc:
                # The bus went away (or dropped us): once more on a new connection.
                self._drop(router)
                if attempt == 2:
                    raise PolkitUnreachable(f"lost the system bus: {exc}") from None
                continue
            return _decision(reply)
        raise AssertionError("unreachable")


def _decision(reply: Any) -> Decision:
    if reply.header.message_type == MessageType.error:
        name = str(reply.header.fields.get(4, ""))  # HeaderFields.error_name
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        if name in _ABSENT:
            raise PolkitUnreachable(f"polkit is not running ({name})")
        # polkit's own errors (an unknown action, a replaced process): no.
        log.warning("polkit refused to decide: %s: %s", name, text)
        return Decision(False, False)
    try:
        (authorized, challenge, _details) = reply.body[0]
    except (TypeError, ValueError, IndexError):
        log.warning("polkit sent an unexpected reply: %r", reply.body)
        return Decision(False, False)
    return Decision(authorized is True, challenge is True)


def _exited(pidfd: int) -> bool:
    """Whether the process has exited (a pidfd polls readable from then on, zombie
    or reaped)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd names, or -1 once that process has been reaped."""
    with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise OSError(errno.EINVAL, "not a pidfd")


def _start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks after boot."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return int(data[data.rindex(b")") + 2 :].split()[19])


def process_subject(pidfd: int, uid: int) -> dict[str, tuple[str, Any]]:
    """The ``unix-process`` subject for the process ``pidfd`` names (module notes).
    Raises :class:`CallerGone` if it has exited, even if not reaped yet: a zombie's
    connection may be in a child's hands, which is not the process that connected."""
    try:
        pid = _pidfd_pid(pidfd)
        if pid <= 0 or _exited(pidfd):
            raise CallerGone
        start = _start_time(pid)
        # Still running: the pid (and so the start time read) was its own.
        if _exited(pidfd):
            raise CallerGone
    except (OSError, ValueError, IndexError):
        raise CallerGone from None
    return {
        "pid": ("u", pid),
        "start-time": ("t", start),
        "uid": ("i", uid),
        "pidfd": ("h", pidfd),
    }


class PolkitCheck:
    """Asks polkit for the calls :data:`METHOD_ACTIONS` lists (module notes)."""

    def __init__(
        self,
        client: PolkitClient,
        *,
        required: bool = False,
        checks_per_uid: int = DEFAULT_CHECKS_PER_UID,
    ) -> None:
        self.client = client
        self.required = required
        self.checks_per_uid = checks_per_uid
        self._lock = threading.Lock()
        self._in_flight: Counter[int] = Counter()

    def may_answer(self) -> bool:
        """Cheap, on the event loop: whether a call is worth a check. With no system
        bus socket at all, ``auto`` keeps today's rule at once (before the call's
        parameters are looked at); ``yes`` lets the check say why."""
        return self.required or bus_socket_exists(self.client.address or system_bus_address())

    def authorize(self, ctx: CallContext, action: str, parameters: Mapping[str, Any]) -> None:
        """Return if polkit authorizes the caller of ``ctx`` for ``action``; raise the
        error reply otherwise."""
        interface = ctx.method.rpartition(".")[0]
        uid = ctx.peer.uid
        with self._lock:
            if self._in_flight[uid] >= self.checks_per_uid:
                raise VarlinkReplyError(
                    f"{interface}.AuthorizationUnavailable",
                    {"message": f"more than {self.checks_per_uid} authorization checks at once"},
                )
            self._in_flight[uid] += 1
        try:
            decision = self._ask(ctx, action, parameters.get("allowInteractiveAuthentication"))
        except PolkitUnreachable as exc:
            if self.required or exc.timed_out:
                log.warning("%s for uid %d: %s", action, uid, exc)
                raise VarlinkReplyError(
                    f"{interface}.AuthorizationUnavailable", {"message": str(exc)}
                ) from None
            log.info("refused %s to uid %d: %s", ctx.method, uid, exc)
            raise VarlinkReplyError(PERMISSION_DENIED) from None
        finally:
            with self._lock:
                self._in_flight[uid] -= 1
                if self._in_flight[uid] <= 0:
                    del self._in_flight[uid]
        if decision.authorized:
            log.info(
                "polkit allowed %s (%s) to pid %d (uid %d)", ctx.method, action, ctx.peer.pid, uid
            )
            return
        log.info("polkit refused %s (%s) to pid %d (uid %d)", ctx.method, action, ctx.peer.pid, uid)
        if decision.challenge:
            raise VarlinkReplyError(f"{interface}.InteractiveAuthenticationRequired")
        raise VarlinkReplyError(PERMISSION_DENIED)

    def _ask(self, ctx: CallContext, action: str, interactive: object) -> Decision:
        if ctx.peer_pidfd is None:
            raise VarlinkReplyError(PERMISSION_DENIED)
        try:
            pidfd = ctx.peer_pidfd()
        except OSError as exc:
            # Before Linux 6.5, or the connection closed: no exact name for the caller.
            log.info("refused %s: no pidfd of the caller: %s", ctx.method, exc)
            raise VarlinkReplyError(PERMISSION_DENIED) from None
        try:
            try:
                subject = process_subject(pidfd, ctx.peer.uid)
            except CallerGone:
                log.info("refused %s: the connecting process has exited", ctx.method)
                raise VarlinkReplyError(PERMISSION_DENIED) from None
            return self.client.check(subject, action, interactive is True)
        finally:
            os.close(pidfd)
