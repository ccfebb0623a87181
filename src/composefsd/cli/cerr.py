"""How the C-compatible tools (composefs-info, composefs-dump) stop, after C's
``err.h`` and ``usage()``: their messages on stderr byte for byte, then
:class:`Exit` with C's exit status, which each tool's ``main`` returns."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

__all__ = ["Exit", "err", "stderr", "usage_error"]


class Exit(Exception):
    """Stop the tool with exit status ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def stderr(msg: bytes) -> None:
    """Write ``msg`` to stderr as it is, after what Python buffered for it."""
    sys.stderr.flush()
    sys.stderr.buffer.write(msg)
    sys.stderr.buffer.flush()


def err(prog: str, msg: bytes, errnum: int) -> NoReturn:
    """C ``err(EXIT_FAILURE, ...)``: program name, message, ": ", strerror."""
    stderr(b"%s: %s: %s\n" % (prog.encode(), msg, os.strerror(errnum).encode()))
    raise Exit(1)


def usage_error(msg: bytes, usage: bytes) -> NoReturn:
    """C's ``fprintf(stderr, msg); usage(argv0); exit(EXIT_FAILURE)``."""
    stderr(msg)
    stderr(usage)
    raise Exit(1)
