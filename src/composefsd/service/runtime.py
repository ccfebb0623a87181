"""Where composefsd keeps its socket and runtime files, and whether anyone else can
change them.

Defaults (:func:`user_runtime_dir`): ``/run/<name>`` for root; for other users
``$XDG_RUNTIME_DIR/<name>`` (only an absolute one counts, as in systemd), else
``/tmp/<name>-<uid>``. The socket is :func:`default_socket_path`, the one place
that says where it is (the daemon listens there, the client's
``default_address`` looks there); the pins of handed-out mounts live under
:func:`default_runtime_dir`.

A socket whose directory another user can write is a socket that user can
replace with a server of their own; a directory of pins they control steers
what composefsd reads and removes. ``/tmp/composefs-<uid>`` is the obvious
case: anyone may create it before the owner does. So a directory is *trusted*
by a process with effective uid E when it and every directory on the way to it
(symbolic links resolved, each link owned by root or E)

* are owned by root or E, and
* are not writable by group or others, except ancestors with the sticky bit
  (like ``/tmp``: others may add entries there, but not remove or rename ours).

:func:`secure_directory` creates what is missing (each directory made gets its
mode exactly, whatever the umask: :mod:`composefsd.dirs`) and refuses an untrusted one;
:func:`check_directory` only checks (the client side). Both walk the path with
``O_PATH|O_NOFOLLOW`` file descriptors, so what is checked is what is used.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Final

from composefsd.dirs import make_dir

__all__ = [
    "UnsafeDirectoryError",
    "check_directory",
    "default_runtime_dir",
    "default_socket_path",
    "secure_directory",
    "user_runtime_dir",
]

#: The socket's name, which is the interface's.
SOCKET_NAME: Final = "io.composefs.Repository"
#: Mode of the directories made on the way to the one asked for.
PARENT_MODE: Final = 0o755
_MAX_SYMLINKS: Final = 40
_PATH_FLAGS: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeDirectoryError(PermissionError):
    """``path`` (a directory on the way to the one asked for) could be changed by
    someone other than root and the caller: ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(errno.EPERM, reason, path)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path} {self.reason}"


def user_runtime_dir(name: str, uid: int | None = None) -> Path:
    """``/run/NAME`` for root, else ``$XDG_RUNTIME_DIR/NAME`` or ``/tmp/NAME-UID``."""
    if uid is None:
        uid = os.geteuid()
    if uid == 0:
        return Path("/run") / name
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    # systemd's rule (sd-path.c, from_environment() for SD_PATH_USER_RUNTIME, which
    # xdg_user_runtime_dir() uses): a relative or empty value counts as unset.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / name
    return Path(f"/tmp/{name}-{uid}")


def default_socket_path(uid: int | None = None) -> Path:
    """Where composefsd listens and composefsctl looks for it by default."""
    return user_runtime_dir("composefs", uid) / SOCKET_NAME


def default_runtime_dir(uid: int | None = None) -> Path:
    """Where composefsd keeps the pins of detached mounts it handed out."""
    return user_runtime_dir("composefsd", uid)


def _problem(st: os.stat_result, euid: int, last: bool) -> str | None:
    if st.st_uid not in (0, euid):
        who = "root" if euid == 0 else f"root or uid {euid}"
        return f"is owned by uid {st.st_uid}, not by {who}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and (last or not mode & stat.S_ISVTX):
        return f"is writable by other users (mode {mode:04o})"
    return None


def _walk(path: str | os.PathLike[str], create: int | None) -> None:
    euid = os.geteuid()
    shown = os.path.abspath(os.fspath(path))
    todo = [c for c in reversed(shown.split("/")) if c]
    # The directories entered so far, as (fd, path shown in messages).
    stack = [(os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "/")]
    links = 0
    try:
        while True:
            fd, here = stack[-1]
            # Every directory on the way counts as an ancestor; the one reached last
            # (whatever the symbolic links) must not even be sticky and writable.
            problem = _problem(os.fstat(fd), euid, last=not todo)
            if problem is not None:
                raise UnsafeDirectoryError(here, problem)
            if not todo:
                return
            name = todo.pop()
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            here = os.path.join(here, name)
            try:
                child = os.open(name, _PATH_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), here) from None
                # One made by someone faster is judged below like any existing entry.
                make_dir(name, create if not todo else PARENT_MODE, dir_fd=fd, exist_ok=True)
                child = os.open(name, _PATH_FLAGS, dir_fd=fd)
            try:
                st = os.fstat(child)
                target = None
                if stat.S_ISLNK(st.st_mode):
                    if st.st_uid not in (0, euid):
                        raise UnsafeDirectoryError(
                            here, f"is a symbolic link owned by uid {st.st_uid}"
                        )
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), here)
                    target = os.readlink(name, dir_fd=fd)
                elif not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), here)
            except BaseException:
                os.close(child)
                raise
            if target is None:
                stack.append((child, here))
                continue
            os.close(child)
            todo.extend(c for c in reversed(target.split("/")) if c)
            if target.startswith("/"):
                while len(stack) > 1:
                    os.close(stack.pop()[0])
    finally:
        for fd, _ in stack:
            os.close(fd)


def secure_directory(path: str | os.PathLike[str], mode: int = 0o700) -> None:
    """Make ``path`` a trusted directory (module notes): missing directories are
    created, ``path`` itself with ``mode`` and those on the way with 0755, whatever
    the umask; an existing one is kept as it is if trusted.

    Raises :class:`UnsafeDirectoryError` for an untrusted directory or symbolic
    link, ``NotADirectoryError`` or another ``OSError`` when it cannot be made.
    """
    _walk(path, mode)


def check_directory(path: str | os.PathLike[str]) -> None:
    """Raise :class:`UnsafeDirectoryError` unless ``path`` is a trusted directory
    (``FileNotFoundError`` if it does not exist); nothing is created."""
    _walk(path, None)
