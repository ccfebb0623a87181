"""Where the server's sockets come from, and telling systemd how it is doing.

* :func:`sockets_from_environment`: systemd socket activation (``LISTEN_FDS``,
  ``LISTEN_PID``, ``LISTEN_FDNAMES``; the fds start at 3), which hands over either
  listening sockets (``Accept=no``) or one connected socket (``Accept=yes``, or
  ``varlinkctl call exec:…``); then ``SYSTEMD_VARLINK_LISTEN=<path>``, which asks
  a Varlink service to listen on that path (``-`` means a connected socket on
  stdin).
* :func:`listen_unix`: bind and listen on a path with a given mode, in a directory
  nobody else controls.
* :func:`notify`: ``sd_notify`` over ``$NOTIFY_SOCKET``.
* :func:`is_listening`: ``SO_ACCEPTCONN``, which tells the two kinds of activated
  sockets apart.
* :func:`describe_socket`: how the log names a socket the server was given.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from typing import Final

from composefsd.service.runtime import secure_directory

__all__ = [
    "SD_LISTEN_FDS_START",
    "describe_socket",
    "is_listening",
    "listen_unix",
    "notify",
    "sockets_from_environment",
]

log = logging.getLogger(__name__)

#: The first fd systemd passes.
SD_LISTEN_FDS_START: Final = 3

_LISTEN_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")


def is_listening(sock: socket.socket) -> bool:
    """Whether ``sock`` is a listening socket (rather than a connected one)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0


def describe_socket(sock: socket.socket) -> str:
    """``sock`` as the start-up log names it: a listening socket by its path (quoted
    as a Python string, so that any name reads unambiguously) or ``@name`` in the
    abstract namespace (as ``ss`` and systemd show it); a connected one (``Accept=yes``,
    ``varlinkctl call exec:``) as such, with its fd."""
    try:
        name: object = sock.getsockname()
    except OSError:
        name = None
    if isinstance(name, bytes) and name.startswith(b"\0"):
        where = "@" + name[1:].decode(errors="backslashreplace")
    elif name:
        where = repr(name)
    else:
        where = ""
    try:
        listening = is_listening(sock)
    except OSError:
        listening = False
    if listening:
        return where or f"fd {sock.fileno()}"
    return f"the connection on fd {sock.fileno()}" + (f" (to {where})" if where else "")


def _activated_sockets(fd_start: int) -> list[socket.socket] | None:
    env = os.environ
    pid_text = env.get("LISTEN_PID")
    count_text = env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    if count_text is None:
        return None
    # Whatever happens, children must not see these.
    for name in _LISTEN_VARS:
        env.pop(name, None)
    if pid_text is None:
        log.debug("LISTEN_FDS without LISTEN_PID: ignored")
        return None
    try:
        pid = int(pid_text)
        count = int(count_text)
    except ValueError:
        raise ValueError(
            f"bad socket activation variables: LISTEN_PID={pid_text!r} LISTEN_FDS={count_text!r}"
        ) from None
    if pid != os.getpid():
        log.debug("LISTEN_PID=%d is not this process (%d): ignored", pid, os.getpid())
        return None
    if count <= 0:
        return None
    fds = list(range(fd_start, fd_start + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    names = names_text.split(":") if names_text else []
    if count > 1 and len(names) == count and "varlink" in names:
        chosen = [fd for fd, name in zip(fds, names, strict=True) if name == "varlink"]
        log.debug("using the fds named 'varlink' of %s", names)
    else:
        chosen = fds
    sockets = []
    for fd in chosen:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise OSError(e.errno, f"activation fd {fd} is not a socket: {e.strerror}") from None
        sockets.append(sock)
    return sockets


def sockets_from_environment(*, fd_start: int = SD_LISTEN_FDS_START) -> list[socket.socket] | None:
    """The sockets systemd (or ``varlinkctl``) handed over, or that
    ``SYSTEMD_VARLINK_LISTEN`` asks for; None if the environment names none.

    ``LISTEN_FDS`` counts fds from ``fd_start`` (3; other values are for tests);
    they are used only if ``LISTEN_PID`` is this process. With several fds and
    ``LISTEN_FDNAMES`` naming some "varlink", only those are used. The ``LISTEN_*``
    variables are removed from the environment and the fds made close-on-exec.
    A listening socket is to be accepted on; a connected one is the only client.
    """
    sockets = _activated_sockets(fd_start) or []
    path = os.environ.get("SYSTEMD_VARLINK_LISTEN")
    if path == "-":
        try:
            sock = socket.socket(fileno=os.dup(0))
        except OSError as e:
            raise OSError(
                e.errno, f"SYSTEMD_VARLINK_LISTEN=-: stdin is not a socket: {e.strerror}"
            ) from None
        sockets.append(sock)
    elif path:
        sockets.append(listen_unix(path))
    return sockets or None


def _check_stale(path: str) -> None:
    """Unlink a socket nobody listens on; refuse to steal a live one's path."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    except OSError as e:
        log.debug("probing %s: %s; replacing it", path, e)
    else:
        raise OSError(errno.EADDRINUSE, f"{path}: another server is listening there")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def listen_unix(path: str, mode: int = 0o600) -> socket.socket:
    """A listening AF_UNIX stream socket at ``path`` with permissions ``mode``.

    The directory must be trusted (:func:`~composefsd.service.runtime.secure_directory`,
    else :class:`~composefsd.service.runtime.UnsafeDirectoryError`): missing, it is
    created with 0700, or 0755 when ``mode`` lets others connect. A stale socket
    is replaced, a live one (something accepts connections on it) is an error.
    ``@name`` is an abstract address (no file, no mode).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path.startswith("@"):
            sock.bind("\0" + path[1:])
        else:
            # Others can reach a socket of a wider mode only through a directory they may enter.
            directory_mode = 0o755 if mode & 0o077 else 0o700
            secure_directory(os.path.dirname(os.path.abspath(path)), directory_mode)
            _check_stale(path)
            sock.bind(path)
            # Nobody can connect before listen(), so there is no window with a looser mode.
            os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


def notify(state: str) -> bool:
    """Send ``state`` ("READY=1", "STOPPING=1", "STATUS=…") to ``$NOTIFY_SOCKET``.

    False if there is no NOTIFY_SOCKET or the message could not be sent (logged).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        target = "\0" + address[1:]
    elif address[0] == "/":
        target = address
    else:
        log.warning("NOTIFY_SOCKET=%s: unsupported address", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            # Never wait: a notify socket nobody reads must not stop the event loop.
            sock.send(state.encode(), socket.MSG_DONTWAIT)
    except OSError as e:
        log.warning("sd_notify(%s) to %s: %s", state, address, e)
        return False
    return True
