"""``composefsctl``: manage a composefsd object repository, through the daemon or directly.

**Through the daemon** (client mode): when ``--connect ADDRESS`` is given, or
``$COMPOSEFSD_SOCKET`` is set, or neither ``--repo`` nor ``$COMPOSEFSD_REPOSITORY``
is set and composefsd's default socket (``/run/composefs/io.composefs.Repository``
for root, ``$XDG_RUNTIME_DIR/composefs/io.composefs.Repository`` otherwise) accepts
a connection, commands become io.composefs.Repository calls. ADDRESS is a socket
path, ``unix:PATH`` or ``exec:PATH`` (a composefsd to start for this one command).
A socket served by another user than root or the caller is refused, and so is a
default socket in a directory another user could change (exit status 3): nothing,
no call and no directory fd, goes to such a server.

**Directly** (``--direct``, or when no daemon answers): every subcommand opens the
repository given by ``--repo PATH`` (or ``$COMPOSEFSD_REPOSITORY``, or the default
location: ``/sysroot/composefs`` for root, ``~/.var/lib/composefs`` otherwise) and
takes the repository's locks, so it may run beside the service and other
``composefsctl`` processes. ``init``, ``fsck``, ``describe``, ``remove-ref`` and a
few options (``create-image --from-dumpfile/--preserve-hardlinks/--threads``,
``gc --pin``) have no daemon method: they run
directly when the daemon was only found at its default address, and are a usage
error with an explicit one. ``oci`` (io.composefs.Oci: pull, images, inspect, tag,
untag, mount) has no direct mode: without a daemon it fails with exit status 3,
and neither have the generic Varlink commands ``call``, ``introspect``,
``list-methods`` and ``info`` (:mod:`.generic`; varlinkctl's, for systems without it).

Output is the same in both modes where they overlap (``--json`` gives the same
keys, less those the service does not report). Exit status: 0 on success; 1 when
the operation failed or when ``verify`` or ``fsck`` found problems; 2 for a usage
error; 3 when the daemon cannot be reached (or the connection broke, or the server
is not trusted). Errors are
one line on stderr, ``composefsctl: error: <what went wrong>``; through the daemon
the line names the Varlink error, e.g. ``io.composefs.Repository.NoSuchImage: no
image or ref 'os/v9'``. Long operations show their progress on stderr when it is a
terminal (a bar), or always with ``--progress`` (a line per report).

This module chooses the mode and maps errors to exit statuses; the command line is
:mod:`.parser`'s, the commands are :mod:`.remote`'s (daemon calls) and :mod:`.direct`'s
(imported only when a command runs directly: a command sent to the daemon loads no
repository code), and both print through :mod:`.output`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import cast

from composefsd.cli.composefsctl import remote
from composefsd.cli.composefsctl.errors import Failed, Unreachable, Usage
from composefsd.cli.composefsctl.parser import PROG, parse_args
from composefsd.image.printable import printable
from composefsd.service import client
from composefsd.service.client import (
    Connection,
    VarlinkCallError,
    VarlinkClientError,
    VarlinkUntrustedError,
    default_address,
)

__all__ = ["EXIT_UNREACHABLE", "main"]

#: Exit status when the daemon cannot be reached (or is not to be trusted).
EXIT_UNREACHABLE = 3


def _direct_only(args: argparse.Namespace) -> str | None:
    """Why this command line needs direct access to the repository, if it does."""
    if args.command not in remote.COMMANDS:
        return f"'{args.command}' has no daemon method"
    if args.command == "create-image":
        for flag, used in (
            ("--from-dumpfile", args.from_dumpfile is not None),
            ("--objects", args.objects is not None),
            ("--preserve-hardlinks", args.preserve_hardlinks),
            ("--threads", args.threads is not None),
        ):
            if used:
                return f"create-image {flag} has no daemon equivalent"
    if args.command == "gc" and args.pin:
        return "gc --pin has no daemon equivalent (the daemon pins mounted images itself)"
    return None


def _connect(args: argparse.Namespace) -> Connection | None:
    """The daemon connection for this command, or None to work directly (module notes)."""
    explicit = args.connect
    if args.direct:
        if explicit is not None:
            raise Usage("--direct and --connect exclude each other")
        if args.command in remote.DAEMON_ONLY:
            raise Usage(f"'{args.command}' works through composefsd only (no --direct)")
        return None
    if explicit is not None and args.repo is not None:
        raise Usage(
            "--repo works on a repository directly; with --connect the daemon "
            "serves its own (use --direct --repo PATH)"
        )
    if explicit is None and args.repo is None:
        explicit = os.environ.get("COMPOSEFSD_SOCKET") or None
    why_direct = _direct_only(args)
    if explicit is not None:
        if why_direct is not None:
            raise Usage(f"{why_direct}; use --direct (with --repo PATH) to run it directly")
        try:
            return client.connect(explicit, timeout=args.timeout)
        except VarlinkClientError as exc:
            raise Unreachable(str(exc)) from None
    if args.command in remote.DAEMON_ONLY:
        if args.repo is not None:
            raise Usage(f"'{args.command}' works through composefsd only (no --repo)")
    elif args.repo is not None or os.environ.get("COMPOSEFSD_REPOSITORY") or why_direct:
        return None
    address = default_address()
    if not os.path.exists(address):
        return None
    try:
        return client.connect(address, timeout=args.timeout, check_directory=True)
    except VarlinkUntrustedError as exc:
        # Someone else's socket where ours belongs: say so rather than quietly
        # working directly, so that it gets removed.
        raise Unreachable(str(exc)) from None
    except VarlinkClientError as exc:
        import logging  # here: loading logging costs a client's start several ms

        logging.getLogger(__name__).debug("no daemon at %s (%s): working directly", address, exc)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``composefsctl`` with ``argv`` (without the program name; default: sys.argv[1:])."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command_parser: argparse.ArgumentParser = args.parser
    conn: Connection | None = None
    try:
        conn = _connect(args)
        if conn is not None:
            if remote.asks_password(args):
                # Only here: the agent's code costs every other start.
                from composefsd.cli.composefsctl.polkitagent import AskingConnection, agent

                with agent():
                    return remote.COMMANDS[args.command](
                        cast(Connection, AskingConnection(conn)), args
                    )
            return remote.COMMANDS[args.command](conn, args)
        if args.command in remote.DAEMON_ONLY:
            raise Unreachable(
                f"'{args.command}' works through composefsd only, and no daemon answers "
                f"at {default_address()} (start it, or give --connect ADDRESS)"
            )
        # Only a command that runs here loads the repository code (and the mount
        # code, whose errors are then reported like any failure).
        from composefsd.cli.composefsctl import direct
        from composefsd.kernel.mount import MountError

        try:
            return direct.run(args)
        except MountError as exc:
            raise Failed(str(exc)) from exc
    except Usage as exc:
        command_parser.error(str(exc))
    except Unreachable as exc:
        sys.stderr.write(f"{PROG}: error: {printable(str(exc))}\n")
        return EXIT_UNREACHABLE
    except VarlinkCallError as exc:
        return _error(remote.call_error_text(exc))
    except VarlinkClientError as exc:
        sys.stderr.write(f"{PROG}: error: {printable(str(exc))}\n")
        return EXIT_UNREACHABLE
    except Failed as exc:
        return _error(str(exc))
    except BrokenPipeError:
        # "composefsctl images | head": end quietly, with the status a shell reports
        # for SIGPIPE, and keep the exit-time flush of stdout from failing again.
        # (Not signal(SIGPIPE, SIG_DFL): main() may run in-process.)
        import signal  # here: its enums cost every start 1 ms

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except OSError as exc:
        return _error(_os_error_text(exc))
    except KeyboardInterrupt:
        import signal

        sys.stderr.write(f"{PROG}: interrupted\n")
        return 128 + signal.SIGINT
    finally:
        if conn is not None:
            conn.close()


def _os_error_text(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{os.fsdecode(exc.filename)}: {text}"
    return text


def _error(message: str) -> int:
    sys.stderr.write(f"{PROG}: error: {printable(message)}\n")
    return 1
