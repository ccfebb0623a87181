"""Verify's object lists: the objects an image uses, remembered per image digest.

The objects an image uses, and the size it records for each, are a function of
the image's bytes alone; and an image is named by its fs-verity digest, which
Verify checks anyway. So once Verify has scanned the image whose digest it has
just confirmed, it keeps the list of (object digest, size) the scan found in
``cache/objects-<alg>-<image digest>``; a later Verify of that image first
confirms again that the image file's digest equals its name, and only then
checks the objects of the list instead of scanning the image
(:func:`composefsd.repository.verify.verify_image`).

What it trusts, and why that cannot be fooled:

* that equal digests mean equal bytes: the list is used only for the image whose
  digest it was made under, and only after the image file just read was hashed
  (or measured by the kernel) to that digest. An image damaged, replaced or
  swapped for another no longer has that digest: it is scanned and reported as
  before. A list is written only from a scan of bytes whose digest was confirmed
  to be the name, never from an image that had any problem (not even a payload
  that is not an object path, or an object recorded with two sizes), and never
  used for another digest: the digest is both in the file's name and inside it,
  under its checksum;
* the cache file itself, as the digest cache does: it lives in the repository's
  ``cache/`` (directory 0700, file 0600), which only the repository's owner (the
  daemon, root) writes. A list edited by root to leave out an object would hide
  that object's damage; so could root editing composefsd's code, or the
  repository's images: no caller below root can do either. It is still read as
  untrusted bytes
  (:mod:`composefsd.repository.cachefile`): a checksum over it, its magic, the
  algorithm, the image digest and every count and length checked, every
  payload ``XX/rest`` in lowercase hex and all distinct (so no name in the file
  can lead outside ``objects/``); a damaged, truncated, foreign or oversized file
  is simply no list (the image is scanned and the list written again);
* nothing about the objects: every one is checked as after a scan (present, a
  regular file of the recorded size, its digest its name).

Bounded: at most ``MAX_OBJECTS`` objects per list (an image naming more is not
listed), at most ``MAX_FILES`` lists (those of images no longer in ``images/``
go first, then the least recently written), and GC drops every cache file not
written for 30 days.

The file: ``MAGIC``, a header (digest size, object count), the algorithm's name
and the image digest, the objects' payloads (``XX/rest``, each after a NUL, so
that their paths are made in C), their sizes (64-bit little-endian), and the
SHA-256 of all of it.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass

from composefsd.kernel.verity import Algorithm
from composefsd.repository import cachefile
from composefsd.repository.errors import os_error_text

__all__ = ["MAX_FILES", "MAX_OBJECTS", "Listed", "file_name", "load", "save"]

log = logging.getLogger(__name__)

MAGIC = b"cfsd-ol1"
_HEX = b"0123456789abcdef"
#: magic, digest size, object count
_HEADER = struct.Struct("<8sIQ")
_LITTLE = sys.byteorder == "little"
_PREFIX = "objects-"

#: Objects per list, and lists per repository (module notes).
MAX_OBJECTS = 1 << 24
MAX_FILES = 256


def file_name(algorithm: Algorithm, digest: str) -> str:
    """The name of the list of the image ``digest`` (lowercase hex, checked by the caller)."""
    return f"{_PREFIX}{algorithm.value}-{digest}"


def _meta(algorithm: Algorithm, digest: str) -> bytes:
    return algorithm.value.encode() + b"\0" + bytes.fromhex(digest)


@dataclass(slots=True)
class Listed:
    """An image's object list as :func:`load` read it."""

    #: Payload (``XX/rest``) -> size, in the order of the list.
    sizes: dict[bytes, int]
    #: The payloads, each after a NUL: ``\0XX/rest\0XX/rest...``.
    _records: bytes

    def paths(self, objects: bytes) -> list[tuple[bytes, int]]:
        """(``objects/XX/rest``, size) for each object, in the order of :attr:`sizes`
        (made in C: one replace and one split, not a Python step per object)."""
        joined = self._records.replace(b"\0", b"\0" + objects + b"/")
        return list(zip(joined.split(b"\0")[1:], self.sizes.values(), strict=True))


def load(cache_dir: str, algorithm: Algorithm, digest: str) -> Listed | None:
    """The objects of the image ``digest``, as the scan found them, or None if there
    is no intact list of it (module notes). The caller must have confirmed that the
    image's digest is ``digest``."""
    path = os.path.join(cache_dir, file_name(algorithm, digest))
    width = algorithm.digest_size
    meta = _meta(algorithm, digest)
    limit = _HEADER.size + len(meta) + MAX_OBJECTS * _record_size(width) + cachefile.SUM_SIZE
    try:
        body = cachefile.read(path, limit)
        if body is None:
            return None
        return _decode(body, meta, width)
    except cachefile.CacheFileError as exc:
        log.info("ignoring object list %s: %s", path, exc)
    except OSError as exc:
        log.info("ignoring unreadable object list %s: %s", path, os_error_text(exc))
    return None


def _record_size(width: int) -> int:
    """Bytes per object: NUL, ``XX/rest`` (hex), the size."""
    return 2 + 2 * width + 8


def _decode(body: bytes, meta: bytes, width: int) -> Listed:
    if len(body) < _HEADER.size:
        raise cachefile.CacheFileError("truncated")
    magic, size, count = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise cachefile.CacheFileError("not an object list of this version")
    if size != width or count > MAX_OBJECTS:
        raise cachefile.CacheFileError(f"{count} objects of {size}-byte digests")
    pos = _HEADER.size
    if len(body) != pos + len(meta) + count * _record_size(width):
        raise cachefile.CacheFileError("lengths do not add up")
    if body[pos : pos + len(meta)] != meta:
        raise cachefile.CacheFileError("another algorithm or image")
    pos += len(meta)
    step = 2 + 2 * width
    records = body[pos : pos + count * step]
    pos += count * step
    # Every record is NUL, two hex digits, "/", the rest in hex: a NUL and a "/"
    # where they belong, and nothing else but lowercase hex digits (checked in C,
    # not per object). So no name leads outside objects/.
    if (
        records[0::step] != b"\0" * count
        or records[3::step] != b"/" * count
        or records.translate(None, _HEX) != b"\0/" * count
    ):
        raise cachefile.CacheFileError("not object payloads")
    sizes = array("Q", body[pos : pos + 8 * count])
    if not _LITTLE:
        sizes.byteswap()
    objects = dict(zip(records.split(b"\0")[1:], sizes, strict=True))
    if len(objects) != count:
        raise cachefile.CacheFileError("an object listed twice")
    return Listed(objects, records)


def save(cache_dir: str, algorithm: Algorithm, digest: str, objects: Mapping[bytes, int]) -> None:
    """Keep the objects (payload ``XX/rest`` -> size) of the image ``digest``, whose
    digest the caller confirmed and whose scan found no problem (module notes)."""
    if len(objects) > MAX_OBJECTS:
        return
    width = algorithm.digest_size
    meta = _meta(algorithm, digest)
    records = b"".join(b"\0" + p for p in objects)
    if len(records) != len(objects) * (2 + 2 * width):
        return  # not payloads of this algorithm: never the case after a clean scan
    sizes = array("Q", objects.values())
    if not _LITTLE:
        sizes.byteswap()
    body = b"".join((_HEADER.pack(MAGIC, width, len(objects)), meta, records, sizes.tobytes()))
    path = os.path.join(cache_dir, file_name(algorithm, digest))
    if cachefile.write(path, body):
        images = os.path.join(os.path.dirname(cache_dir), "images")
        cachefile.prune(cache_dir, _PREFIX, MAX_FILES, path, lambda name: _gone(images, name))


def _gone(images: str, name: str) -> bool:
    """Whether the list ``name`` is of an image no longer in ``images/``."""
    return not os.path.lexists(os.path.join(images, name.rpartition("-")[2]))
