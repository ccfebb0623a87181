"""One front door for the three composefs EROFS formats composefs-rs knows.

* **V0**: C ``mkcomposefs --min-version=0 --max-version=0``. composefs-rs's V0
  writes ``composefs_version = 0`` even when the tree has whiteouts and adds no
  ``opaque`` marks for them, so unlike C's default (``--max-version=1``) it never
  upgrades to 1.
* **V1**: C ``mkcomposefs --min-version=1`` (composefs-rs's default).
* **V2**: composefs-rs's older layout (:mod:`composefsd.image.writer_v2`).

The version an image was written in is its header's ``composefs_version``.
"""

from __future__ import annotations

import errno
import mmap

from .format import ErofsVersion
from .reader import format_version, read_header
from .tree import Node
from .writer import WriteError, write_image
from .writer_v2 import write_image_v2

__all__ = ["ErofsVersion", "image_version", "write_format"]


def write_format(root: Node, version: ErofsVersion) -> bytes:
    """Serialise ``root`` exactly as composefs-rs 0.9 writes ``version``.

    Raises :class:`~composefsd.image.writer.WriteError` for a tree that cannot be
    written and for a version that is not one of :class:`ErofsVersion`.
    """
    if version == ErofsVersion.V2:
        return write_image_v2(root)
    if version == ErofsVersion.V0 or version == ErofsVersion.V1:
        return write_image(root, min_version=int(version), max_version=int(version))
    raise WriteError(errno.EINVAL, f"unknown EROFS format version {version!r}")


def image_version(data: bytes | bytearray | memoryview | mmap.mmap) -> ErofsVersion:
    """The format of an image, from its composefs header.

    Raises :class:`~composefsd.image.reader.ImageFormatError` for a bad header and
    for a ``composefs_version`` outside 0..2.
    """
    return format_version(read_header(data))
