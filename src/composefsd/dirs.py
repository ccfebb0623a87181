"""Directories made with exactly the mode asked for, whatever the umask.

composefsd runs under systemd with ``UMask=0077``, so that nothing it creates is
readable by others by accident; but a repository must stay as readable as
before (directories 0755, objects 0644) and some runtime directories must be
traversable. ``mkdir``'s mode is narrowed by the umask, so every directory made
here is chmod'ed to its mode afterwards. (The umask itself is process-wide and
shared with other threads: it is not to be changed for a moment.)
"""

from __future__ import annotations

import errno
import os

__all__ = ["make_dir", "make_dirs"]


def make_dir(
    path: str | os.PathLike[str],
    mode: int,
    *,
    dir_fd: int | None = None,
    exist_ok: bool = False,
) -> bool:
    """``mkdir(path, mode)``, then exactly ``mode``. True if it was made; False if
    something was there already and ``exist_ok`` (else ``FileExistsError``)."""
    try:
        os.mkdir(path, mode, dir_fd=dir_fd)
    except FileExistsError:
        if exist_ok:
            return False
        raise
    # chmod follows a symlink, but whoever could swap the new directory for one
    # can write its parent, and so has the run of it anyway.
    os.chmod(path, mode, dir_fd=dir_fd)
    return True


def make_dirs(path: str | os.PathLike[str], mode: int) -> None:
    """``os.makedirs(path, mode, exist_ok=True)``, with every directory it makes
    (parents too) getting exactly ``mode``. Something other than a directory at
    ``path`` is ``FileExistsError``, on the way there ``NotADirectoryError``."""
    text = os.fspath(path)
    head, tail = os.path.split(text)
    if not tail:
        head, tail = os.path.split(head)
    if head and tail and not os.path.exists(head):
        make_dirs(head, mode)
    if tail == os.curdir:
        return
    if not make_dir(text, mode, exist_ok=True) and not os.path.isdir(text):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), text)
