"""Closing batches of file descriptors, for the transport and the client."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["close_all"]


def close_all(fds: Sequence[int | None]) -> None:
    """Close every fd (skipping None), ignoring errors: used on paths that are
    already failing or tearing down, where one bad fd must not keep the others open."""
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
