"""composefsd: serves a composefs repository over Varlink (io.composefs.Repository,
and io.composefs.Oci for OCI images, on the same sockets).

::

    composefsd [--repo PATH] [--listen PATH] [--socket-mode 0600] [--group GROUP]
               [--restrict-read] [--polkit auto|yes|no] [--polkit-timeout SEC]
               [--idle-timeout SEC] [--no-create] [--log-level LEVEL]
               [--algorithm ALG] [--erofs-version N] [--runtime-dir DIR] [limits]
               [--config PATH] [--registry-dir DIR | --no-registry]
    composefsd --reload [--listen PATH]

* **Repository**: ``--repo``, else ``$COMPOSEFSD_REPOSITORY``, else
  ``/sysroot/composefs`` for root and ``~/.var/lib/composefs`` otherwise; created
  if it does not exist, unless ``--no-create``: in ``--algorithm`` (default
  ``sha512``) and ``--erofs-version`` (default 1), verity ``try``. The defaults are
  ``cfsctl init``'s and bootc's, which keeps its repository in
  ``/sysroot/composefs`` and works only on SHA-512 ones: whichever of composefsd
  and bootc comes first, the other can use the repository. For an existing
  repository the two options are checks: one that disagrees with ``meta.json`` is
  a start-up failure (as ``cfsctl --hash`` refuses such a repository).
* **Sockets**: socket activation first (``LISTEN_FDS``/``LISTEN_FDNAMES``, a
  listening or a connected socket such as ``varlinkctl call exec:`` gives, or
  ``SYSTEMD_VARLINK_LISTEN``), else ``--listen PATH``, else
  ``/run/composefs/io.composefs.Repository`` for root and
  ``$XDG_RUNTIME_DIR/composefs/io.composefs.Repository`` (or
  ``/tmp/composefs-<uid>/...``) otherwise. A socket composefsd creates itself gets
  ``--socket-mode`` (default 0600) and, with ``--group``, that group; it is removed
  on exit. Its directory, and the runtime directory, must be under the control of
  root and composefsd's uid alone (:mod:`composefsd.service.runtime`): one that
  another user owns or may write (a ``/tmp/composefs-<uid>`` made by someone
  else) is refused at start-up; a missing one is created (0700; the socket's 0755
  when ``--socket-mode`` lets others connect).
* **Authorization** (peer credentials from SO_PEERCRED): the read-only methods
  (Describe, ListImages, ListMounts, Verify, io.composefs.Oci's ListImages and
  Inspect, and org.varlink.service's) are open to every peer that may connect,
  unless ``--restrict-read``; everything else (CreateImage, Mount, Unmount,
  RemoveImage, GarbageCollect; Oci's Pull, Tag, Untag, Mount) needs uid 0, the
  daemon's own uid, or membership (primary or supplementary) of ``--group``.
  Refused calls get ``org.varlink.service.PermissionDenied``. Other peers may
  still call the methods :data:`~composefsd.service.polkit.METHOD_ACTIONS` lists
  if polkit allows them its action (``--polkit``, default ``auto``: when polkit
  runs; :mod:`composefsd.service.polkit`): the hook lets such a call through and
  :meth:`Authorization.check_call` asks polkit in the call's worker thread
  before the method runs. :data:`OPEN_METHODS` (MountDumpfile: :mod:`composefsd.service.ownmount`)
  are open to every peer too, unless ``--restrict-read``.
  composefs-rs's interfaces (org.composefs.Repository:
  :mod:`composefsd.service.rsrepository`) follow the same split (their read-only
  methods: OpenRepository, CloseRepository, ListImageRefs, ImageObjects, Fsck;
  their others are never put to polkit), and on top of it name a repository
  other than the daemon's own only for root and the daemon's uid.
* **Limits** (:mod:`composefsd.service.transport` explains them): ``--max-connections``,
  ``--max-connections-per-uid``, ``--max-message-size``, ``--max-buffered-input``,
  ``--message-timeout``, ``--workers``, ``--workers-per-uid``, ``--heavy-workers``
  and ``--heavy-calls-per-uid``; ``--max-source-entries`` bounds a tree that
  CreateImage reads with a caller's rights. The heavy methods are Verify,
  CreateImage, GarbageCollect, Oci's Pull, and org.composefs.Repository's Fsck
  and Gc. Root and the daemon's own uid are
  the privileged uids (never refused a connection, closed last for holding input,
  not limited per uid). The
  soft limit on open files is raised to the hard one at start (the unit sets
  ``LimitNOFILE``), and ``--max-connections`` is lowered to leave 256 of them
  for everything else, so that the file limit is never what locks root out.
* **Configuration** (:mod:`composefsd.service.config`, composefsd.conf(5)):
  ``/etc/composefs/composefsd.conf`` (another user's: ``~/.config/composefs/``) or
  ``--config PATH`` holds ``key = value``
  lines named after the long options; the command line wins over it. Reload
  (``io.systemd.service.Reload``, :mod:`composefsd.service.systemdservice`),
  SIGHUP and ``composefsd --reload`` (the unit's ExecReload=, which calls Reload
  and waits) re-read it on the event loop and apply what can change while
  running (the log level, ``group``, ``restrict-read``, ``idle-timeout``, the
  connection and message limits, ``max-source-entries``); the other keys
  (:data:`_RESTART_KEYS`: the repository, the sockets, the worker counts, ...)
  are logged as needing a restart. A bad file leaves everything as it was and
  fails the reload with ``io.composefs.Repository.SystemError`` (``EINVAL``,
  naming the file, line and key). Around it: ``RELOADING=1`` with
  ``MONOTONIC_USEC=``, then ``READY=1`` (systemd's notify-reload protocol).
* **systemd**: ``io.systemd.service`` on every socket (Ping; Reload,
  SetLogLevel, GetEnvironment for root and the daemon's uid only, as systemd
  has it); the watchdog and ``STATUS=`` lines (:mod:`composefsd.service.watchdog`);
  a socket composefsd binds itself is registered in a Varlink registry
  (:mod:`composefsd.service.registry`): ``--registry-dir``, else
  ``/run/varlink/registry`` for root on the default socket; ``--no-registry``.
* **Life cycle**: sd_notify ``READY=1`` once serving, ``STOPPING=1`` when SIGTERM
  or SIGINT arrives; running calls then get up to 10 s to finish and are
  cancelled after that (long operations stop at their next progress point and
  leave the repository consistent); exit status 0. With ``--idle-timeout SEC``
  the daemon exits after SEC seconds without connections or calls (socket
  activation starts it again). A connected socket (``exec:``) is served until
  the peer closes it. Start-up failures (unusable repository, socket path, group)
  print one line and exit with status 1.
* **Logging** goes to stderr: with ``$JOURNAL_STREAM`` set (started by systemd)
  as ``<priority>message`` lines without timestamps, otherwise with them.

Mount state survives restarts: see :mod:`composefsd.service.mounts` (mounts are
rediscovered from mountinfo; pins of handed-out detached mounts live in
``--runtime-dir``, default ``/run/composefsd`` for root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from varlink.server import Service as VarlinkService

import composefsd
from composefsd.image.escape import printable
from composefsd.image.format import ErofsVersion
from composefsd.kernel.verity import Algorithm
from composefsd.repository import NotARepositoryError, Repository, RepositoryError, default_path
from composefsd.repository.meta import parse_algorithm
from composefsd.service import client
from composefsd.service.activation import (
    describe_socket,
    listen_unix,
    notify,
    sockets_from_environment,
)
from composefsd.service.config import (
    DEFAULT_CONFIG,
    ConfigError,
    default_config_path,
    option_actions,
    read_config,
    settings_from,
)
from composefsd.service.context import CallContext, Peer, VarlinkReplyError
from composefsd.service.methods import INTERFACE, RepositoryInterface
from composefsd.service.mounts import MountTracker
from composefsd.service.ocimethods import INTERFACE as OCI_INTERFACE
from composefsd.service.ocimethods import OciInterface
from composefsd.service.options import ALGORITHM_NAMES, VersionAction, erofs_version_argument
from composefsd.service.polkit import (
    DEFAULT_TIMEOUT as POLKIT_TIMEOUT,
)
from composefsd.service.polkit import (
    METHOD_ACTIONS,
    PERMISSION_DENIED,
    PolkitCheck,
    PolkitClient,
    PolkitMode,
)
from composefsd.service.registry import SYSTEM_REGISTRY, Registration, register
from composefsd.service.rshandles import HandleTable
from composefsd.service.rsoci import INTERFACE as RS_OCI_INTERFACE
from composefsd.service.rsoci import RsOciInterface
from composefsd.service.rsrepository import INTERFACE as RS_REPOSITORY
from composefsd.service.rsrepository import RsRepositoryInterface
from composefsd.service.runtime import (
    UnsafeDirectoryError,
    check_directory,
    default_runtime_dir,
    default_socket_path,
)
from composefsd.service.systemdservice import INTERFACE as SYSTEMD_INTERFACE
from composefsd.service.systemdservice import (
    OWNER_ONLY_METHODS,
    SystemdServiceInterface,
    set_log_level,
)
from composefsd.service.transport import (
    DEFAULT_HEAVY_CALLS_PER_UID,
    DEFAULT_HEAVY_WORKERS,
    DEFAULT_MAX_BUFFERED_INPUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_UID,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MESSAGE_TIMEOUT,
    DEFAULT_WORKERS,
    DEFAULT_WORKERS_PER_UID,
    SYSTEM_ERROR,
    InlineMethod,
    Server,
)
from composefsd.service.watchdog import StatusReporter, keep_alive, watchdog_interval

__all__ = ["HEAVY_METHODS", "OPEN_METHODS", "READ_ONLY_METHODS", "Authorization", "main"]

log = logging.getLogger("composefsd")

IDL_DIR = Path(__file__).resolve().parent
#: Methods everyone who can connect may call (unless --restrict-read).
READ_ONLY_METHODS = frozenset(
    [f"{INTERFACE}.{m}" for m in ("Describe", "ListImages", "ListMounts", "Verify")]
    + [f"{OCI_INTERFACE}.{m}" for m in ("ListImages", "Inspect")]
    + [
        f"{RS_REPOSITORY}.{m}"
        for m in ("OpenRepository", "CloseRepository", "ListImageRefs", "ImageObjects", "Fsck")
    ]
    + [
        f"{RS_OCI_INTERFACE}.{m}"
        for m in ("ListImages", "Inspect", "HasLayer", "GetInfo", "ComputeId", "Check")
    ]
    + [f"{SYSTEMD_INTERFACE}.Ping"]
)
#: Methods every peer that can connect may call without polkit (unless
#: --restrict-read, which keeps every method to the privileged): each bounds what
#: it does for an untrusted caller by itself.
OPEN_METHODS: frozenset[str] = frozenset([f"{INTERFACE}.MountDumpfile"])
#: Methods that run in the transport's heavy lane (few at a time, fairly per uid).
HEAVY_METHODS = frozenset(
    [f"{INTERFACE}.{m}" for m in ("Verify", "CreateImage", "GarbageCollect")]
    + [f"{OCI_INTERFACE}.Pull"]
    + [f"{RS_REPOSITORY}.{m}" for m in ("Fsck", "Gc")]
    + [
        f"{RS_OCI_INTERFACE}.{m}"
        for m in ("Check", "ComputeId", "Pull", "PutLayer", "FinalizeImage")
    ]
)
#: Seconds running calls get to finish on SIGTERM before they are cancelled.
SHUTDOWN_GRACE = 10.0
#: Open files kept out of --max-connections' reach: listening sockets, privileged
#: connections, worker pipes, the repository's files.
_FD_RESERVE = 256
#: What a repository composefsd creates is in unless told otherwise: bootc's and
#: ``cfsctl init``'s (module notes).
CREATE_ALGORITHM = Algorithm.SHA512
CREATE_EROFS_VERSION = ErofsVersion.V1


class _StartupError(Exception):
    """A one-line reason to exit with status 1 before serving."""


def is_read_only(method: str) -> bool:
    return method in READ_ONLY_METHODS or method.startswith("org.varlink.service.")


@dataclass(slots=True, frozen=True)
class Authorization:
    """The authorizer handed to the transport (module notes): ``__call__`` is its
    hook before a call, :meth:`check_call` its check in the call's worker thread."""

    daemon_uid: int
    group: int | None = None
    restrict_read: bool = False
    #: Asks polkit for the methods in METHOD_ACTIONS (None: --polkit no).
    polkit: PolkitCheck | None = None

    def privileged(self, peer: Peer) -> bool:
        if peer.uid in (0, self.daemon_uid):
            return True
        return self.group is not None and (peer.gid == self.group or self.group in peer.groups)

    def __call__(self, peer: Peer, method: str) -> bool:
        if method in OWNER_ONLY_METHODS:
            # systemd's rule for these: root and the service's own uid, no group.
            if peer.uid in (0, self.daemon_uid):
                return True
            log.info("refused %s to pid %d (uid %d)", method, peer.pid, peer.uid)
            return False
        if not self.restrict_read and (is_read_only(method) or method in OPEN_METHODS):
            return True
        if self.privileged(peer):
            return True
        if self.polkit is not None and method in METHOD_ACTIONS and self.polkit.may_answer():
            return True  # polkit decides, in check_call
        log.info("refused %s to pid %d (uid %d)", method, peer.pid, peer.uid)
        return False

    def check_call(self, ctx: CallContext, parameters: dict[str, Any]) -> None:
        """In the worker, before the method: a call the hook let through for polkit
        runs only if polkit authorizes it (:mod:`composefsd.service.polkit`)."""
        action = METHOD_ACTIONS.get(ctx.method)
        if action is None or self.privileged(ctx.peer):
            return
        if self.polkit is None:
            # Not through the hook's polkit door (a reload may have closed it since).
            raise VarlinkReplyError(PERMISSION_DENIED)
        self.polkit.authorize(ctx, action, parameters)


# -- logging --------------------------------------------------------------------------------

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _Formatter(logging.Formatter):
    """Escapes the message with :func:`~composefsd.image.escape.printable`: names in
    it come from callers and the repository, and a newline in one must not forge a
    log entry. Tracebacks, added after the message, keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


class _JournalFormatter(_Formatter):
    """``<priority>message``: journald reads the priority off the prefix and stamps
    the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record)
        # One journal entry per line: continuation lines carry the priority too.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            _Formatter("%(asctime)s composefsd[%(process)d] %(levelname)s: %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# -- arguments ------------------------------------------------------------------------------


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _bytes(text: str) -> int:
    """A size in bytes, with an optional K, M or G (binary) suffix."""
    number, unit = text[:-1], text[-1:].upper()
    if unit.isdigit():
        number, unit = text, ""
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return _count(number) * _UNITS[unit]


def _add_limits(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "limits",
        "what one local user may take of the service (root and the daemon's uid "
        "are exempt from the per-uid ones)",
    )
    g.add_argument(
        "--max-connections",
        metavar="N",
        type=_count,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"connections of unprivileged peers in all (default {DEFAULT_MAX_CONNECTIONS})",
    )
    g.add_argument(
        "--max-connections-per-uid",
        metavar="N",
        type=_count,
        default=DEFAULT_MAX_CONNECTIONS_PER_UID,
        help=f"connections of one uid (default {DEFAULT_MAX_CONNECTIONS_PER_UID})",
    )
    g.add_argument(
        "--max-message-size",
        metavar="BYTES",
        type=_bytes,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        help=f"longest call; K, M, G suffixes (default {DEFAULT_MAX_MESSAGE_SIZE >> 10}K)",
    )
    g.add_argument(
        "--max-buffered-input",
        metavar="BYTES",
        type=_bytes,
        default=DEFAULT_MAX_BUFFERED_INPUT,
        help="input held across all connections before the largest holders are "
        f"disconnected (default {DEFAULT_MAX_BUFFERED_INPUT >> 20}M)",
    )
    g.add_argument(
        "--message-timeout",
        metavar="SEC",
        type=_seconds,
        default=DEFAULT_MESSAGE_TIMEOUT,
        help="disconnect a peer whose message stays incomplete this long "
        f"(default {DEFAULT_MESSAGE_TIMEOUT:g})",
    )
    g.add_argument(
        "--workers",
        metavar="N",
        type=_count,
        default=DEFAULT_WORKERS,
        help=f"threads for calls other than the heavy ones (default {DEFAULT_WORKERS})",
    )
    g.add_argument(
        "--workers-per-uid",
        metavar="N",
        type=_count,
        default=DEFAULT_WORKERS_PER_UID,
        help=f"of those, at most this many for one uid (default {DEFAULT_WORKERS_PER_UID})",
    )
    g.add_argument(
        "--heavy-workers",
        metavar="N",
        type=_count,
        default=DEFAULT_HEAVY_WORKERS,
        help="threads for Verify, CreateImage, GarbageCollect and OCI pulls "
        f"(default {DEFAULT_HEAVY_WORKERS})",
    )
    g.add_argument(
        "--heavy-calls-per-uid",
        metavar="N",
        type=_count,
        default=DEFAULT_HEAVY_CALLS_PER_UID,
        help=f"of those, at most this many for one uid (default {DEFAULT_HEAVY_CALLS_PER_UID})",
    )
    default_entries = RepositoryInterface.max_source_entries
    g.add_argument(
        "--max-source-entries",
        metavar="N",
        type=_count,
        default=default_entries,
        help="entries a CreateImage tree read with the caller's rights (callers other "
        f"than the privileged uids) may have (default {default_entries})",
    )
    default_rate = RepositoryInterface.mount_dumpfile_rate
    g.add_argument(
        "--mount-dumpfile-rate",
        metavar="N",
        type=_count,
        default=default_rate,
        help=f"MountDumpfile calls one uid may start a minute (default {default_rate})",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="composefsd",
        description="Serve a composefs repository over Varlink (io.composefs.Repository).",
    )
    p.add_argument(
        "--repo",
        metavar="PATH",
        help="the repository (default: $COMPOSEFSD_REPOSITORY, else /sysroot/composefs for root "
        "and ~/.var/lib/composefs for others)",
    )
    p.add_argument("--listen", metavar="PATH", help="Unix socket to listen on without activation")
    p.add_argument(
        "--socket-mode",
        metavar="MODE",
        type=_mode,
        default=0o600,
        help="octal mode of a socket composefsd creates (default 0600)",
    )
    p.add_argument(
        "--group", metavar="GROUP", help="members of GROUP may also change and mount (name or gid)"
    )
    p.add_argument(
        "--restrict-read",
        action="store_true",
        help="read-only methods and MountDumpfile too need root, the daemon's uid or --group",
    )
    p.add_argument(
        "--polkit",
        metavar="MODE",
        choices=[m.value for m in PolkitMode],
        default=PolkitMode.AUTO.value,
        help="ask polkit whether other callers may change and mount: auto (default: when "
        "it runs), yes (always; no polkit is an error to the caller) or no",
    )
    p.add_argument(
        "--polkit-timeout",
        metavar="SEC",
        type=_seconds,
        default=POLKIT_TIMEOUT,
        help=f"how long a polkit check may take (default {POLKIT_TIMEOUT:g})",
    )
    p.add_argument(
        "--idle-timeout",
        metavar="SEC",
        type=_seconds,
        help="exit after SEC seconds without connections or calls",
    )
    p.add_argument("--no-create", action="store_true", help="fail if the repository does not exist")
    p.add_argument(
        "--algorithm",
        metavar="ALG",
        choices=ALGORITHM_NAMES,
        help="digest of a repository composefsd creates: sha512 (default, as bootc's and "
        "cfsctl init's) or sha256; an existing repository must have it",
    )
    p.add_argument(
        "--erofs-version",
        metavar="N",
        type=erofs_version_argument,
        help="image format of a repository composefsd creates: 1 (default, as cfsctl init's), "
        "0 or 2; an existing repository must have it",
    )
    p.add_argument(
        "--log-level",
        metavar="LEVEL",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="debug, info (default), warning or error",
    )
    p.add_argument(
        "--runtime-dir",
        metavar="DIR",
        help="where pins of handed-out mounts are kept (default /run/composefsd for root)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default {DEFAULT_CONFIG} for root, "
        "~/.config/composefs/composefsd.conf for others, if it exists); "
        "options given here win over it",
    )
    p.add_argument(
        "--registry-dir",
        metavar="DIR",
        help=f"register the interfaces of a socket composefsd listens on in DIR "
        f"(default {SYSTEM_REGISTRY} for root on the default socket)",
    )
    p.add_argument("--no-registry", action="store_true", help="register in no Varlink registry")
    p.add_argument(
        "--reload",
        action="store_true",
        help="do not serve: ask the composefsd on --listen (default: the default socket) "
        "to re-read its configuration, and wait for it (the unit's ExecReload=)",
    )
    _add_limits(p)
    p.add_argument("--version", action=VersionAction)
    return p


#: Options composefsd.conf may set (composefsd.conf(5)); those in _RESTART_KEYS take
#: effect at start only, the others on Reload and SIGHUP too.
CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "repo",
        "listen",
        "socket-mode",
        "group",
        "restrict-read",
        "polkit",
        "polkit-timeout",
        "idle-timeout",
        "no-create",
        "algorithm",
        "erofs-version",
        "log-level",
        "runtime-dir",
        "registry-dir",
        "no-registry",
        "max-connections",
        "max-connections-per-uid",
        "max-message-size",
        "max-buffered-input",
        "message-timeout",
        "workers",
        "workers-per-uid",
        "heavy-workers",
        "heavy-calls-per-uid",
        "max-source-entries",
        "mount-dumpfile-rate",
    }
)
_RESTART_KEYS: frozenset[str] = frozenset(
    {
        "repo",
        "listen",
        "socket-mode",
        "no-create",
        "algorithm",
        "erofs-version",
        "runtime-dir",
        "registry-dir",
        "no-registry",
        "workers",
        "workers-per-uid",
        "heavy-workers",
        "heavy-calls-per-uid",
    }
)


def _explicit(argv: Sequence[str] | None) -> dict[str, Any]:
    """The options given on the command line (by dest), without the defaults."""
    p = _parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


@dataclass(slots=True)
class _Settings:
    """Where settings come from: the parser's defaults, the configuration file and
    the command line, each winning over the one before."""

    parser: argparse.ArgumentParser
    defaults: dict[str, Any]
    explicit: dict[str, Any]
    config: Path
    config_required: bool

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None) -> tuple[_Settings, argparse.Namespace]:
        parser = _parser()
        args = parser.parse_args(argv)
        explicit = _explicit(argv)
        settings = cls(
            parser,
            defaults=vars(parser.parse_args([])),
            explicit=explicit,
            config=Path(args.config) if args.config is not None else default_config_path(),
            config_required=args.config is not None,
        )
        return settings, args

    def load(self) -> tuple[argparse.Namespace, dict[str, int]]:
        """The settings in force with the file as it is now, and the line of each
        key the file sets; ConfigError if it is bad."""
        values = read_config(self.config, CONFIG_KEYS, required=self.config_required)
        from_file = settings_from(values, self.parser, self.config)
        merged = {**self.defaults, **from_file, **self.explicit}
        actions = option_actions(self.parser, values.keys())
        lines = {actions[key].dest: item.line for key, item in values.items()}
        return argparse.Namespace(**merged), lines

    def key(self, dest: str) -> str:
        """The option (and file key) of ``dest``."""
        for action in self.parser._actions:
            if action.dest == dest:
                for option in action.option_strings:
                    if option.startswith("--"):
                        return option[2:]
        return dest


def _raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
    return soft


def _connection_limit(wanted: int, files: int) -> int:
    """``wanted`` connections, lowered to leave _FD_RESERVE of ``files`` open files."""
    if files != resource.RLIM_INFINITY and wanted > files - _FD_RESERVE:
        limit = max(1, files - _FD_RESERVE)
        log.warning(
            "at most %d connections (not %d): the open file limit is %d", limit, wanted, files
        )
        return limit
    return wanted


def _server(service: Any, authorize: _AuthorizationSwitch, args: argparse.Namespace) -> Server:
    max_connections = _connection_limit(args.max_connections, _raise_fd_limit())
    return Server(
        service,
        authorize=authorize,
        check_call=authorize.check_call,
        max_message_size=args.max_message_size,
        max_connections=max_connections,
        max_connections_per_uid=args.max_connections_per_uid,
        max_buffered_input=args.max_buffered_input,
        message_timeout=args.message_timeout,
        workers=args.workers,
        workers_per_uid=args.workers_per_uid,
        heavy_methods=HEAVY_METHODS,
        heavy_workers=args.heavy_workers,
        heavy_calls_per_uid=args.heavy_calls_per_uid,
        privileged_uids=frozenset({0, os.geteuid()}),
        inline_methods=_inline_methods(service),
    )


def _inline_methods(service: Any) -> dict[str, InlineMethod]:
    """Methods the transport may answer on its event loop: Describe, from what it
    keeps, when nothing it counts has changed (RepositoryInterface.describe_now)."""
    handler = service.interfaces_handlers.get(INTERFACE)
    if not isinstance(handler, RepositoryInterface):
        return {}
    return {f"{INTERFACE}.Describe": handler.describe_now}


def _group(text: str | None) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise _StartupError(f"unknown group {text!r}") from None


def _repository(
    path: str | None,
    create: bool,
    algorithm: str | None = None,
    erofs_version: ErofsVersion | None = None,
) -> Repository:
    """Open the repository, or create it; ``algorithm`` and ``erofs_version``, when
    given, must be what an existing one has."""
    target = Path(path) if path is not None else default_path()
    alg = None if algorithm is None else parse_algorithm(algorithm)
    try:
        try:
            repo = Repository.open(target)
        except NotARepositoryError:
            if not create:
                raise
            # Refuses a directory that has anything but an empty repository skeleton,
            # and one that another process made meanwhile with other settings.
            return Repository.init(
                target,
                algorithm=CREATE_ALGORITHM if alg is None else alg,
                erofs_version=CREATE_EROFS_VERSION if erofs_version is None else erofs_version,
            )
    except RepositoryError as exc:
        raise _StartupError(str(exc)) from None
    except OSError as exc:
        raise _StartupError(f"repository {target}: {exc.strerror or exc}") from None
    if alg is not None and repo.hash_algorithm is not alg:
        raise _StartupError(
            f"repository {target} is {repo.algorithm}, not {alg.composefs_rs_name} "
            f"(--algorithm {algorithm})"
        )
    if erofs_version is not None and repo.erofs_version is not erofs_version:
        raise _StartupError(
            f"repository {target} writes images in V{int(repo.erofs_version)}, not "
            f"V{int(erofs_version)} (--erofs-version {int(erofs_version)})"
        )
    return repo


def _untrusted(exc: UnsafeDirectoryError) -> str:
    return (
        f"{exc}: another user could replace what composefsd puts there "
        f"(remove it, or choose another path)"
    )


def _runtime_dir(path: str | None) -> Path:
    runtime_dir = Path(path) if path else default_runtime_dir()
    try:
        # Made when the first pin is written; one that exists must be ours already.
        check_directory(runtime_dir)
    except FileNotFoundError:
        pass
    except UnsafeDirectoryError as exc:
        raise _StartupError(
            f"refusing the runtime directory {runtime_dir}: {_untrusted(exc)}"
        ) from None
    except OSError as exc:
        raise _StartupError(f"runtime directory {runtime_dir}: {exc.strerror or exc}") from None
    return runtime_dir


@dataclass(slots=True)
class _Listener:
    """A socket composefsd bound itself, removed on exit if it is still ours."""

    path: Path
    inode: int

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)


def _sockets(
    listen: str | None, mode: int, group: int | None
) -> tuple[list[socket.socket], _Listener | None]:
    try:
        inherited = sockets_from_environment()
    except UnsafeDirectoryError as exc:
        raise _StartupError(f"socket activation: {_untrusted(exc)}") from None
    except (OSError, ValueError) as exc:
        raise _StartupError(f"socket activation: {exc}") from None
    if inherited:
        return inherited, None
    path = Path(listen) if listen is not None else default_socket_path()
    try:
        sock = listen_unix(str(path), mode)
    except UnsafeDirectoryError as exc:
        raise _StartupError(f"refusing to listen on {path}: {_untrusted(exc)}") from None
    except OSError as exc:
        raise _StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    try:
        if group is not None:
            os.chown(path, -1, group)
        listener = _Listener(path, os.lstat(path).st_ino)
    except OSError as exc:
        sock.close()
        raise _StartupError(f"cannot set up {path}: {exc.strerror or exc}") from None
    return [sock], listener


def build_service(
    repo: Repository,
    tracker: MountTracker,
    *,
    max_source_entries: int | None = None,
    mount_dumpfile_rate: int | None = None,
    reload: Callable[[], None] | None = None,
) -> Any:
    """The varlink.Service with composefsd's interfaces registered, each from its IDL
    file (``<interface>.varlink`` beside this module): io.composefs.Repository and
    io.composefs.Oci, which works through the former (its Mount, its repository).
    Another interface is one more IDL file, handler class and line here, and its
    methods in READ_ONLY_METHODS or HEAVY_METHODS where they belong."""
    service = VarlinkService(
        vendor="composefsd",
        product="composefsd",
        version=composefsd.version(),
        url="https://github.com/containers/composefs",
        interface_dir=str(IDL_DIR),
    )
    iface = RepositoryInterface(repo, tracker)
    if max_source_entries is not None:
        iface.max_source_entries = max_source_entries
    if mount_dumpfile_rate is not None:
        iface.set_mount_dumpfile_rate(mount_dumpfile_rate)
    service._set_interface(INTERFACE, iface)
    service._set_interface(OCI_INTERFACE, OciInterface(iface))
    # composefs-rs's interfaces share one table of repository handles.
    handles = HandleTable(repo)
    rs_repository = RsRepositoryInterface(iface, handles)
    service._set_interface(RS_REPOSITORY, rs_repository)
    service._set_interface(RS_OCI_INTERFACE, RsOciInterface(rs_repository))
    service._set_interface(SYSTEMD_INTERFACE, SystemdServiceInterface(reload))
    return service


class _AuthorizationSwitch:
    """The authorizer the transport holds: the current :class:`Authorization`,
    replaced as a whole on reload (worker threads read it; one assignment)."""

    def __init__(self, current: Authorization) -> None:
        self.current = current

    def __call__(self, peer: Peer, method: str) -> bool:
        return self.current(peer, method)

    def check_call(self, ctx: CallContext, parameters: dict[str, Any]) -> None:
        self.current.check_call(ctx, parameters)


#: Settings a reload applies to the transport's limits: (dest, Server attribute).
_SERVER_LIMITS: tuple[tuple[str, str], ...] = (
    ("max_connections_per_uid", "max_connections_per_uid"),
    ("max_message_size", "max_message_size"),
    ("max_buffered_input", "max_buffered_input"),
    ("message_timeout", "message_timeout"),
)


class _Daemon:
    """What Reload (the Varlink method) and SIGHUP change: the settings in force,
    re-read from the configuration file and applied on the event loop."""

    def __init__(self, settings: _Settings, args: argparse.Namespace) -> None:
        self.settings = settings
        self.args = args
        self.polkit_client = PolkitClient()
        self.polkit_check = PolkitCheck(self.polkit_client)
        self.authorize = _AuthorizationSwitch(Authorization(os.geteuid(), None, args.restrict_read))
        self.server: Server | None = None
        self.service: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.status: StatusReporter | None = None

    def authorization(self, args: argparse.Namespace, group: int | None) -> Authorization:
        """The rule ``args`` set (the polkit connection and counts carry over)."""
        mode = PolkitMode(args.polkit)
        self.polkit_check.required = mode is PolkitMode.YES
        self.polkit_client.timeout = args.polkit_timeout
        polkit = None if mode is PolkitMode.NO else self.polkit_check
        return Authorization(os.geteuid(), group, args.restrict_read, polkit)

    def reload_from_call(self) -> None:
        """io.systemd.service.Reload, in a worker thread: reload on the loop and
        wait; a bad file is the caller's error, naming its line and key."""
        loop = self.loop
        if loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._reload_async(), loop)
        try:
            # Bounded: a loop that is shutting down may never run it, and a worker
            # waiting for ever would hold up the exit.
            future.result(RELOAD_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise VarlinkReplyError(
                SYSTEM_ERROR, {"errnoName": "ETIMEDOUT", "message": "the reload did not run"}
            ) from None
        except ConfigError as exc:
            raise VarlinkReplyError(
                SYSTEM_ERROR, {"errnoName": "EINVAL", "message": str(exc)}
            ) from None

    async def _reload_async(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Re-read the file and apply what may change while running (on the loop).
        sd_notify's reload protocol around it: RELOADING=1 with the time, then
        READY=1, whether it worked or not (the old settings stay in force)."""
        usec = time.monotonic_ns() // 1000
        notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        if self.status is not None:
            self.status.update("reloading the configuration")
        try:
            new, lines = self.settings.load()
            group = _config_group(new.group, self.settings, lines.get("group"))
            self._apply(new, lines, group)
        except ConfigError as exc:
            log.error("reload failed, the settings stay as they were: %s", exc)
            raise
        finally:
            notify("READY=1")
            if self.status is not None:
                self.status.update()

    def _apply(self, new: argparse.Namespace, lines: dict[str, int], group: int | None) -> None:
        old = self.args
        for dest, value in vars(new).items():
            if getattr(old, dest, None) == value:
                continue
            key = self.settings.key(dest)
            if key in _RESTART_KEYS:
                log.warning("%s changed: it takes effect when composefsd restarts", key)
                setattr(new, dest, getattr(old, dest))
            else:
                log.info("%s is now %s", key, value)
        for dest in lines:
            if dest in self.settings.explicit:
                log.info(
                    "%s: the command line's value stays (the file's is ignored)",
                    self.settings.key(dest),
                )
        set_log_level(_level(new.log_level))
        self.authorize.current = self.authorization(new, group)
        server = self.server
        if server is not None:
            server.max_connections = _connection_limit(
                new.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            )
            for dest, attribute in _SERVER_LIMITS:
                setattr(server, attribute, getattr(new, dest))
        if self.service is not None:
            handler = self.service.interfaces_handlers.get(INTERFACE)
            if isinstance(handler, RepositoryInterface):
                handler.max_source_entries = new.max_source_entries
                handler.set_mount_dumpfile_rate(new.mount_dumpfile_rate)
        self.args = new
        log.info("configuration reloaded")

    def on_sighup(self) -> None:
        with contextlib.suppress(ConfigError):  # logged by reload()
            self.reload()


def _level(name: str) -> int:
    return logging.getLevelName(name.upper())  # type: ignore[no-any-return]


def _config_group(text: str | None, settings: _Settings, line: int | None) -> int | None:
    try:
        return _group(text)
    except _StartupError as exc:
        raise ConfigError(settings.config, str(exc), line=line, key="group") from None


async def _serve(
    server: Server,
    sockets: Sequence[socket.socket],
    daemon: _Daemon,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    daemon.loop = loop

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, daemon.on_sighup)

    serving = asyncio.create_task(server.serve(sockets))
    await asyncio.sleep(0)
    status = StatusReporter(server)
    daemon.status = status
    notify(f"READY=1\nMAINPID={os.getpid()}")
    status.update()
    log.info("composefsd %s ready", composefsd.version())

    async def idle_watch() -> None:
        while not stop.is_set():
            limit: float | None = daemon.args.idle_timeout
            await asyncio.sleep(1.0 if limit is None else min(1.0, limit / 4))
            if limit is None or daemon.args.idle_timeout != limit:
                continue
            idle = time.monotonic() - server.last_activity
            if server.connections == 0 and server.calls_in_flight == 0 and idle >= limit:
                log.info("idle for %.0f s, exiting", idle)
                stop.set()

    watchers: list[asyncio.Task[Any]] = [
        asyncio.create_task(stop.wait()),
        asyncio.create_task(idle_watch()),
        asyncio.create_task(status.run()),
    ]
    interval = watchdog_interval()
    if interval is not None:
        log.info("watchdog: keep-alive every %.3g s", interval / 2)
        watchers.append(asyncio.create_task(keep_alive(interval)))
    try:
        await asyncio.wait([serving, watchers[0]], return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            notify("STOPPING=1\nSTATUS=stopping")
            await server.shutdown(SHUTDOWN_GRACE)
        else:
            notify("STOPPING=1\nSTATUS=stopping")
            log.info("the connection closed, exiting")
        await serving
    finally:
        for task in watchers:
            task.cancel()
        loop.remove_signal_handler(signal.SIGHUP)
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Stopping already: another signal must not kill the rest of the shutdown.
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return 0


def _registry_dir(args: argparse.Namespace, listener: _Listener | None) -> Path | None:
    """Where to register the interfaces: --registry-dir; else, for root listening on
    the default socket, systemd's registry; else nowhere (a socket of systemd's is
    registered by the socket unit's Symlinks=)."""
    if listener is None or args.no_registry:
        return None
    if args.registry_dir:
        return Path(args.registry_dir)
    if os.geteuid() == 0 and args.listen is None:
        return SYSTEM_REGISTRY
    return None


def _register(
    directory: Path | None, service: Any, listener: _Listener | None
) -> Registration | None:
    if directory is None or listener is None:
        return None
    try:
        return register(directory, service.interfaces.keys(), listener.path)
    except UnsafeDirectoryError as exc:
        log.warning("not registering in %s: %s", directory, _untrusted(exc))
    except OSError as exc:
        log.warning("cannot register in %s: %s", directory, exc.strerror or exc)
    return None


#: Seconds --reload waits for the reply (systemd's own TimeoutSec for ExecReload= is 90).
RELOAD_TIMEOUT = 80.0


def _reload_running(listen: str | None) -> int:
    """``composefsd --reload``: io.systemd.service.Reload on the daemon's socket."""
    address = listen if listen is not None else str(default_socket_path())
    try:
        with client.connect(
            address if address.startswith("@") else f"unix:{address}",
            timeout=RELOAD_TIMEOUT,
            check_directory=listen is None,
        ) as conn:
            conn.call(f"{SYSTEMD_INTERFACE}.Reload")
    except client.VarlinkCallError as exc:
        message = exc.parameters.get("message")
        log.error("reload failed: %s", message if isinstance(message, str) else exc)
        return 1
    except client.VarlinkClientError as exc:
        log.error("cannot ask %s to reload: %s", address, exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = _Settings.from_argv(argv)
    _setup_logging(args.log_level)
    if args.reload:
        return _reload_running(args.listen)
    listener: _Listener | None = None
    registration: Registration | None = None
    sockets: list[socket.socket] = []
    try:
        try:
            args, _lines = settings.load()
        except ConfigError as exc:
            raise _StartupError(str(exc)) from None
        set_log_level(_level(args.log_level))
        daemon = _Daemon(settings, args)
        group = _group(args.group)
        daemon.authorize.current = daemon.authorization(args, group)
        repo = _repository(
            args.repo,
            create=not args.no_create,
            algorithm=args.algorithm,
            erofs_version=args.erofs_version,
        )
        tracker = MountTracker(_runtime_dir(args.runtime_dir))
        try:
            tracker.rediscover(repo)
        except OSError as exc:
            log.warning("cannot look for mounts in use: %s", exc)
        service = build_service(
            repo,
            tracker,
            max_source_entries=args.max_source_entries,
            mount_dumpfile_rate=args.mount_dumpfile_rate,
            reload=daemon.reload_from_call,
        )
        daemon.service = service
        sockets, listener = _sockets(args.listen, args.socket_mode, group)
    except _StartupError as exc:
        log.error("%s", exc)
        return 1
    # The one place that says where to connect, whatever chose the socket (--listen,
    # the default for this user, or systemd).
    log.info(
        "serving %r (%s, images V%d, verity %s) on %s",
        str(repo.path),
        repo.algorithm,
        int(repo.erofs_version),
        repo.verity.value,
        ", ".join(describe_socket(s) for s in sockets),
    )

    server = _server(service, daemon.authorize, args)
    daemon.server = server
    try:
        registration = _register(_registry_dir(args, listener), service, listener)
        return asyncio.run(_serve(server, sockets, daemon))
    except KeyboardInterrupt:
        return 0
    finally:
        daemon.polkit_client.close()
        if registration is not None:
            registration.remove()
        for sock in sockets:
            sock.close()
        if listener is not None:
            listener.remove()


if __name__ == "__main__":
    sys.exit(main())
