"""``composefs-dump SRC DEST``: read an image and write it again (C tools/composefs-dump.c).

The image is rewritten with the format version its header records as both minimum
and (through the writer's ``max(max, min)`` fix-up) maximum, so for any image C
mkcomposefs produced the output is byte-identical to the input.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
from collections.abc import Sequence
from typing import NoReturn

from composefsd.cli.cerr import Exit as _Exit
from composefsd.cli.cerr import err, usage_error
from composefsd.cli.cerr import stderr as _stderr
from composefsd.cli.info import LoadError, load_image_file
from composefsd.image.format import HEADER_SIZE
from composefsd.image.reader import ImageFormatError, read_header
from composefsd.image.writer import write_image

__all__ = ["main"]

_PROG = "composefs-dump"


def _err(msg: bytes, errnum: int) -> NoReturn:
    err(_PROG, msg, errnum)


def _usage(argv0: str) -> bytes:
    return b"usage: %s SRC DEST\n" % os.fsencode(argv0)


def _image_version(path: str, bsrc: bytes) -> int:
    """C ``lcfs_version_from_fd``: every header problem is reported as EINVAL."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        _err(b"Failed to open '%s'" % bsrc, e.errno or errno.EINVAL)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            # C maps the header even past the end of a short file (reading zeros).
            header = os.pread(fd, HEADER_SIZE, 0)
        else:
            with mmap.mmap(fd, HEADER_SIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as mm:
                header = mm[:]
    except OSError as e:
        _err(b"Failed to get image version '%s'" % bsrc, e.errno or errno.EINVAL)
    finally:
        os.close(fd)
    try:
        version = read_header(header).composefs_version
    except ImageFormatError:
        _err(b"Failed to get image version '%s'" % bsrc, errno.EINVAL)
    if version >= 1 << 31:
        # C returns it as a negative int and reports the untouched errno (0).
        _stderr(b"%s: Failed to get image version '%s': Success\n" % (_PROG.encode(), bsrc))
        raise _Exit(1)
    return version


def _run(argv: Sequence[str]) -> None:
    argv0 = argv[0] if argv else _PROG
    if len(argv) <= 1:
        usage_error(b"No source path specified\n", _usage(argv0))
    src = argv[1]
    if len(argv) <= 2:
        usage_error(b"No destination path specified\n", _usage(argv0))
    dst = argv[2]
    bsrc = os.fsencode(src)

    version = _image_version(src, bsrc)
    try:
        info = load_image_file(src)
    except LoadError as e:
        _err(b"Failed to load '%s'" % bsrc, e.errno or errno.EINVAL)
    except OSError as e:
        _err(b"Failed to open '%s'" % bsrc, e.errno or errno.EINVAL)

    try:
        out = open(dst, "wb")  # noqa: SIM115 - closed below, after the write
    except OSError as e:
        _err(b"failed to open '%s'" % os.fsencode(dst), e.errno or errno.EINVAL)
    with out:
        try:
            image = write_image(info.root, min_version=version, max_version=0)
        except OSError as e:
            _err(b"cannot write file", e.errno or errno.EINVAL)
        try:
            out.write(image)
            out.flush()
        except OSError as e:
            _err(b"cannot write file", e.errno or errno.EIO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; ``argv`` excludes the program name (default: ``sys.argv[1:]``)."""
    try:
        _run(list(sys.argv) if argv is None else [sys.argv[0], *argv])
    except _Exit as e:
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
