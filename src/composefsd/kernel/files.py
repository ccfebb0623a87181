"""File-level ioctls and fcntls the standard library has no wrapper for: FICLONE
(reflink a whole file) and pipe sizes.

A leaf of :mod:`composefsd.kernel`: it imports nothing else of composefsd, so the
scanner and the object store may call it. Errors are the ``OSError`` of the call,
with the kernel's errno.
"""

from __future__ import annotations

import fcntl

__all__ = ["FICLONE", "clone_file", "set_pipe_size"]

#: ``_IOW(0x94, 9, int)`` from linux/fs.h.
FICLONE = 0x40049409


def clone_file(src_fd: int, dst_fd: int) -> None:
    """Make ``dst_fd`` share all of ``src_fd``'s data (a reflink), or raise OSError
    (EXDEV, EOPNOTSUPP, EINVAL, ... where the filesystems cannot)."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def set_pipe_size(fd: int, size: int) -> int:
    """Ask for a pipe buffer of ``size`` bytes (``F_SETPIPE_SZ``); return the size the
    pipe has afterwards (``F_GETPIPE_SZ``)."""
    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
