"""``composefsctl mount-dumpfile DUMPFILE OBJDIR... --at DIR [-- COMMAND [ARG...]]``:
a composefs image of the caller's own, mounted by an unprivileged user
(io.composefs.Repository.MountDumpfile).

The files are opened here, with the caller's rights, and sent as fds: composefsd
writes the image from the dumpfile and mounts it over the object directories.
The detached mount it returns can be attached only by a process with
CAP_SYS_ADMIN over its mount namespace, which for an unprivileged user means a
user and mount namespace of its own: so, before the call, this process enters
new ones as ``unshare -Urm`` does (its uid and gid are 0 inside; mounts are not
seen outside) and sends that user namespace, through which composefsd idmaps the
mount (the dumpfile's uid and gid 0 are the caller, inside as outside; other ids
show as the overflow id, 65534). It then attaches the mount at DIR and execs
COMMAND (default: ``$SHELL``, else ``/bin/sh``) there, as ``unshare`` does: the
mount lives as long as the namespace, that is as long as COMMAND and what it
starts. With ``--keep-ids`` the caller's uid and gid are mapped to themselves
instead (``unshare -cm``, podman's ``--userns=keep-id``): COMMAND runs as the
caller's own ids, and the files the dumpfile gives to 0 are the caller's inside
too (composefsd's default idmap, no user namespace sent). With ``--userns-of
PID`` the user namespace is PID's (one the caller owns, such as a rootless
container's, whose mappings may cover many ids): the mount is idmapped through
it, and COMMAND runs in it (as ``nsenter -U -t PID``) in a new mount namespace.
Exit status: COMMAND's; 126
when COMMAND cannot be run, 127 when it is
not found (as ``unshare``); else composefsctl's (1 failed, 2 usage, 3 no
daemon).

As root without COMMAND, the mount is attached at DIR in the current mount
namespace instead (composefsd's default idmap, the dumpfile's 0 as root), and
stays after composefsctl exits: ``umount DIR`` removes it.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import Any

from composefsd.cli.composefsctl import output
from composefsd.cli.composefsctl.errors import Failed, Usage
from composefsd.image.printable import printable
from composefsd.kernel.syscalls import move_mount
from composefsd.kernel.userns import enter_own_namespaces, enter_userns_with_own_mounts
from composefsd.service.client import INTERFACE, Connection

__all__ = ["EXIT_CANNOT_RUN", "EXIT_NOT_FOUND", "run"]

#: Exit statuses when COMMAND cannot be run or is not found (as unshare(1)).
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127


def _open(path: str, what: str, *, directory: bool) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise Failed(f"{what} {path}: {exc.strerror}") from None
    if not directory:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise Failed(f"{what} {path}: not a regular file")
    return fd


def _userns_of(pid: int) -> int:
    try:
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Failed(f"--userns-of {pid}: {exc.strerror}") from None


def run(conn: Connection, args: argparse.Namespace) -> int:
    """Mount, attach and exec (module notes); returns only on failure, or as root
    without a command."""
    command: list[str] = list(args.exec_command or ())
    if command and not command[0]:
        raise Usage("COMMAND is empty")
    where = os.path.abspath(args.at)
    if not os.path.isdir(where):
        raise Failed(f"--at {args.at}: not a directory")
    if args.userns_of is not None and args.keep_ids:
        raise Usage("--userns-of and --keep-ids exclude each other")
    in_namespace = bool(command) or os.geteuid() != 0 or args.userns_of is not None
    if in_namespace and not command:
        command = [os.environ.get("SHELL") or "/bin/sh"]
    fds: list[int] = []
    try:
        fds.append(_open(args.dumpfile, "DUMPFILE", directory=False))
        for path in args.objdirs:
            fds.append(_open(path, "OBJDIR", directory=True))
        params: dict[str, Any] = {
            "dumpfileFileDescriptor": 0,
            "objectDirectoryFileDescriptors": list(range(1, len(fds))),
        }
        # The files are opened before the namespaces are entered, with the rights
        # and in the mount namespace the caller came with: composefsd creates the
        # overlay in the caller's namespace and, when that refuses these layers,
        # in its own (where they are when the caller shares it).
        if args.userns_of is not None:
            fds.append(_userns_of(args.userns_of))
            params["userNamespaceFileDescriptor"] = len(fds) - 1
        elif in_namespace:
            try:
                userns_fd = enter_own_namespaces(map_current_user=args.keep_ids)
            except OSError as exc:
                raise Failed(
                    f"cannot make a user and mount namespace ({exc}): "
                    "are unprivileged user namespaces disabled?"
                ) from None
            if args.keep_ids:
                # composefsd's own idmap (the dumpfile's 0 is the caller): in a
                # namespace that maps the caller to itself, its files are its own.
                os.close(userns_fd)
            else:
                fds.append(userns_fd)
                params["userNamespaceFileDescriptor"] = len(fds) - 1
        reply = conn.call(f"{INTERFACE}.MountDumpfile", params, fds=fds)
        if args.userns_of is not None:
            # After the call: the fds were opened, and the call made, from here.
            try:
                enter_userns_with_own_mounts(fds[-1])
            except OSError as exc:
                reply.close_fds()
                raise Failed(
                    f"--userns-of {args.userns_of}: cannot enter its user namespace "
                    f"({exc.strerror})"
                ) from None
    finally:
        for fd in fds:
            os.close(fd)
    mount_fd = reply.take_fd("mountFileDescriptor")
    reply.close_fds()
    try:
        move_mount(mount_fd, where)
    except OSError as exc:
        raise Failed(f"cannot attach the mount at {where}: {exc.strerror}") from None
    finally:
        os.close(mount_fd)
    conn.close()
    if not in_namespace:
        doc = {"mountpoint": where, "source": "composefs", "idmapped": reply.get("idmapped")}
        if args.json:
            output.print_json(doc, sys.stdout)
        elif args.verbose:
            sys.stdout.write(f"mounted {args.dumpfile} at {where}\n")
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"composefsctl: error: {printable(command[0])}: {exc.strerror}\n")
        return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_RUN
    raise AssertionError("unreachable")  # execvp returns only by raising
