"""EROFS image writer for composefs-rs's format V2 (its original layout)."""

from __future__ import annotations

import errno

from .tree import Node
from .writer import WriteError

__all__ = ["write_image_v2"]


def write_image_v2(root: Node) -> bytes:
    """Serialise ``root`` in format V2; raises :class:`WriteError`."""
    raise WriteError(errno.ENOTSUP, "format V2 is not written yet")
