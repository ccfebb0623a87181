"""``composefs-info``: inspect composefs images, a drop-in for the C 1.0.8 tool.

Usage: ``composefs-info [--basedir=PATH] [--filter=NAME]... COMMAND IMAGE...`` with
COMMAND one of ls, dump, objects, missing-objects, measure-file. Output, messages and
exit codes are C's byte for byte, including its odd spots ("Def" on stdout for a bad
option, the doubled newline after "Unknown command", "Success" as the reason a
filter with a ``/`` is refused).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO, NoReturn

from composefsd.cli.cerr import Exit as _Exit
from composefsd.cli.cerr import err, usage_error
from composefsd.cli.cerr import stderr as _stderr
from composefsd.cli.getopt import GetoptError, gnu_getopt

if TYPE_CHECKING:
    from composefsd.image.reader import ImageInfo

# The image and digest code is imported where it is used, not here: a usage error
# or --help loads none of it, and each command only what it needs.

__all__ = ["load_image_file", "main"]

_PROG = "composefs-info"
_LONGOPTS = {"basedir": True, "filter": True}


def _err(msg: bytes, errnum: int) -> NoReturn:
    err(_PROG, msg, errnum)


def _usage(argv0: str) -> bytes:
    return (
        b"usage: %s [--basedir=path] [ls|objects|dump|missing-objects|measure-file] IMAGES...\n"
        % os.fsencode(argv0)
    )


class LoadError(OSError):
    """Loading an image file failed; ``errno`` is what C would report."""


def load_image_file(path: str | bytes, *, filters: Sequence[bytes] | None = None) -> ImageInfo:
    """Open, mmap and read an image like C ``lcfs_load_node_from_fd_ext``.

    Raises ``FileNotFoundError`` and friends from ``open`` unchanged (C reports
    those as "Failed to open"), and :class:`LoadError` for everything after that.
    """
    from composefsd.image.reader import read_image

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                # mmap() of length 0 fails with EINVAL in C.
                raise LoadError(errno.EINVAL, "empty file")
            with mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as mm:
                return read_image(mm, filters=filters)
        except LoadError:
            raise
        except OSError as e:
            raise LoadError(e.errno or errno.EINVAL, str(e)) from e
        except ValueError as e:  # mmap's own checks, e.g. a file that shrank
            raise LoadError(errno.EINVAL, str(e)) from e
    finally:
        os.close(fd)


def _measure_files(argv0: str, files: Sequence[str], out: BinaryIO) -> None:
    if not files:
        usage_error(b"No files specified\n", _usage(argv0))
    from composefsd.fsverity import measure_or_compute
    from composefsd.kernel.verity import VerityError

    for path in files:
        bpath = os.fsencode(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            out.flush()
            _err(b"Failed to open '%s'" % bpath, e.errno or errno.EINVAL)
        try:
            digest = measure_or_compute(fd, c_compat=True)
        except OSError as e:
            # C's userspace fallback turns any read error into ENODATA.
            err = (e.errno or errno.EIO) if isinstance(e, VerityError) else errno.ENODATA
            out.flush()
            _stderr(b"failed to measure '%s': %s" % (bpath, os.strerror(err).encode()))
            raise _Exit(1) from e
        finally:
            os.close(fd)
        out.write(digest.hex().encode() + b"\n")


def _missing(payload: bytes, basedir_fd: int) -> bool:
    """C: ``fstatat(basedir_fd, payload without leading '/', AT_EMPTY_PATH)`` fails."""
    rel = payload.lstrip(b"/")
    try:
        if rel:
            os.stat(rel, dir_fd=basedir_fd)
        else:
            os.stat(basedir_fd)
    except (OSError, ValueError):
        return True
    return False


def _run(argv: Sequence[str], out: BinaryIO) -> None:
    argv0 = argv[0] if argv else _PROG
    try:
        operands: list[str] = []
        opts = list(gnu_getopt(argv[1:], "", _LONGOPTS, operands))
    except GetoptError as e:
        _stderr(b"%s: %s\n" % (os.fsencode(argv0), str(e).encode()))
        out.write(b"Def\n")
        out.flush()
        _stderr(_usage(argv0))
        raise _Exit(1) from e

    basedir: str | None = None
    filters: list[bytes] | None = None
    for name, value in opts:
        assert value is not None  # both options take a value
        if name == "basedir":
            basedir = value
        else:
            if "/" in value:
                # C calls err() with errno still 0.
                _stderr(
                    b"%s: Filter must be a single name: %s: Success\n"
                    % (_PROG.encode(), os.fsencode(value))
                )
                raise _Exit(1)
            if filters is None:
                filters = []
            filters.append(os.fsencode(value))

    if not operands:
        usage_error(b"No command specified\n", _usage(argv0))
    command, images = operands[0], operands[1:]

    if command == "measure-file":
        _measure_files(argv0, images, out)
        return
    handlers: dict[str, Callable[[ImageInfo], None]]
    objects: set[bytes] = set()
    basedir_fd = 0  # C's global default: without --basedir it stats against stdin

    from composefsd.image.dump_print import print_dump, print_ls
    from composefsd.image.reader import iter_objects

    def collect(info: ImageInfo) -> None:
        objects.update(iter_objects(info.root))

    def collect_missing(info: ImageInfo) -> None:
        objects.update(p for p in iter_objects(info.root) if _missing(p, basedir_fd))

    handlers = {
        "ls": lambda info: print_ls(info.root, out),
        "dump": lambda info: print_dump(info.root, out),
        "objects": collect,
        "missing-objects": collect_missing,
    }
    handler = handlers.get(command)
    if handler is None:
        _stderr(b"%s: Unknown command '%s'\n\n" % (_PROG.encode(), os.fsencode(command)))
        raise _Exit(1)

    if basedir is not None:
        try:
            basedir_fd = os.open(
                basedir, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY | getattr(os, "O_PATH", 0)
            )
        except OSError as e:
            _err(b"Can't open basedir `%s`\n" % os.fsencode(basedir), e.errno or errno.EINVAL)

    if not images:
        usage_error(b"No image path specified\n", _usage(argv0))

    for image in images:
        bimage = os.fsencode(image)
        try:
            info = load_image_file(image, filters=filters)
        except LoadError as e:
            out.flush()
            _err(b"Failed to load '%s'" % bimage, e.errno or errno.EINVAL)
        except OSError as e:
            out.flush()
            _err(b"Failed to open '%s'" % bimage, e.errno or errno.EINVAL)
        handler(info)

    if command in ("objects", "missing-objects"):
        out.write(b"".join(p + b"\n" for p in sorted(objects)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; ``argv`` excludes the program name (default: ``sys.argv[1:]``)."""
    out = sys.stdout.buffer
    try:
        try:
            _run(list(sys.argv) if argv is None else [sys.argv[0], *argv], out)
        except _Exit as e:
            out.flush()
            return e.code
        out.flush()
    except BrokenPipeError:
        # C dies of SIGPIPE here ("composefs-info dump x | head"): end quietly with
        # the status a shell reports for that, and keep Python's exit-time flush of
        # stdout from failing again. (Not signal(SIGPIPE, SIG_DFL): main() is also
        # called in-process, where changing signal dispositions is not ours to do.)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
