"""Import an OCI layer tar as composefs-rs 0.9 does (``cfsctl oci import-layer``).

The tar becomes an ``ocilayer`` splitstream (:mod:`composefsd.splitstream`):
headers (extension headers included), padding, the data of entries that are not
regular files and regular-file data of at most 64 bytes inline; larger regular
files as objects, then their padding inline. Everything after the end-of-archive
blocks (record padding) is kept inline, so ``cat`` gives back the exact tar.

The stream is linked as ``streams/oci-layer-<diff_id>`` and, with a name,
``streams/refs/<name>`` (relative symlinks), after the objects are durable. As
composefs-rs, an existing ``oci-layer-<diff_id>`` is reused without reading the
tar. Unlike ``cfsctl oci import-layer``, the tar's digest is checked against
``diff_id`` unless ``verify=False``; a mismatch links nothing (the objects
written stay for GC, as for other failed writes).

The tar is read in bounded chunks: memory does not grow with the layer's size.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from composefsd.image.ocitar import (
    BLOCK,
    EXTENSION_MAX,
    INLINE_MAX,
    TarError,
    checksum_ok,
    header_number,
    padded,
    pax_records,
)
from composefsd.objectlayout import is_hex
from composefsd.repository.errors import InvalidNameError, RepositoryError, os_error_text
from composefsd.repository.images import normalize_ref
from composefsd.repository.locking import writer_lock
from composefsd.repository.streams import existing_stream, name_stream, write_stream
from composefsd.splitstream import CONTENT_TYPE_OCI_LAYER, OCI_LAYER_PREFIX, SplitStreamWriter

if TYPE_CHECKING:
    from composefsd.repository.repo import Repository
    from composefsd.repository.store import ObjectStore

__all__ = [
    "ImportStats",
    "LayerDigestError",
    "TarFormatError",
    "check_diff_id",
    "import_layer",
    "layer_content_id",
]

log = logging.getLogger(__name__)

_READ = 1 << 20
_REGULAR = (b"0", b"\0")
_EXTENSIONS = (b"x", b"L", b"K")
_DIGEST_HEX = {"sha256": 64, "sha512": 128}


class TarFormatError(RepositoryError):
    """The layer is not a tar composefs-rs can split; the message names the offset."""


class LayerDigestError(RepositoryError):
    """The layer's bytes do not hash to the diff_id it was given."""


@dataclass(slots=True)
class ImportStats:
    """What importing layers stored (composefs-rs's ``ImportStats``, which ``cfsctl``
    prints after a pull): external objects new and already present, the bytes of
    the new ones, and the bytes kept inline in the streams."""

    objects_new: int = 0
    objects_present: int = 0
    bytes_new: int = 0
    bytes_inlined: int = 0

    def add(self, other: ImportStats) -> None:
        self.objects_new += other.objects_new
        self.objects_present += other.objects_present
        self.bytes_new += other.bytes_new
        self.bytes_inlined += other.bytes_inlined

    def __str__(self) -> str:
        """cfsctl's summary line (objects are always copied here: no reflinks)."""
        return (
            f"{self.objects_new} new + {self.objects_present} already present objects; "
            f"{human_bytes(self.bytes_new)} stored, {human_bytes(self.bytes_inlined)} inlined"
        )


def human_bytes(n: int) -> str:
    """A size as composefs-rs prints one (indicatif's ``HumanBytes``: binary units,
    two decimals)."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    units = ("KiB", "MiB", "GiB", "TiB", "PiB")
    step = 0
    while value >= 1024 and step < len(units) - 1:
        value /= 1024
        step += 1
    return f"{value:.2f} {units[step]}"


def layer_content_id(diff_id: str) -> str:
    """``oci-layer-<diff_id>``; :class:`InvalidNameError` for a malformed diff_id."""
    algorithm, sep, hexdigest = diff_id.partition(":")
    if not sep or _DIGEST_HEX.get(algorithm) != len(hexdigest) or not is_hex(hexdigest):
        raise InvalidNameError(f"not a sha256/sha512 diff_id: {diff_id[:200]!r}")
    return OCI_LAYER_PREFIX + diff_id


class _Input:
    """The tar, read in bounded chunks, hashed as it goes, its offset counted.

    The chunk read last is kept as it came (bytes): a file's data is handed on
    as slices of it (one copy), or as the chunk itself when it is all file data
    (none); only a header cut by a chunk's end joins two (at most a few KiB and
    the next chunk)."""

    def __init__(self, reader: BinaryIO, hash_name: str | None) -> None:
        self._reader = reader
        self._buf = b""
        self._pos = 0
        self.offset = 0
        self.hasher = hashlib.new(hash_name) if hash_name is not None else None

    def _fill(self, need: int) -> bool:
        while len(self._buf) - self._pos < need:
            data = self._reader.read(max(_READ, need))
            if not data:
                return False
            if self.hasher is not None:
                self.hasher.update(data)
            if self._pos < len(self._buf):
                data = self._buf[self._pos :] + data
            self._buf = data
            self._pos = 0
        return True

    def available(self) -> int:
        return len(self._buf) - self._pos

    def take(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise TarFormatError(
                f"the tar ends at offset {self.offset + self.available()} in {what}"
            )
        if self._pos == 0 and n == len(self._buf):
            data = self._buf
        else:
            data = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.offset += n
        return data

    def at_eof(self) -> bool:
        return not self._fill(1)

    def pieces(self, n: int, what: str) -> Iterator[bytes]:
        """``n`` bytes in chunks of at most ``_READ``."""
        while n:
            step = min(n, _READ)
            if not self._fill(1):
                raise TarFormatError(f"the tar ends at offset {self.offset} in {what}")
            step = min(step, self.available())
            yield self.take(step, what)
            n -= step

    def rest(self) -> Iterator[bytes]:
        while not self.at_eof():
            yield self.take(self.available(), "trailing padding")


def _size(header: bytes, offset: int) -> int:
    try:
        return header_number(header[124:136], "size")
    except TarError as exc:
        raise TarFormatError(f"the header at offset {offset}: {exc}") from None


def _pax_size(data: bytes, offset: int) -> int | None:
    """The ``size`` record of a PAX extension, if any (the last one wins)."""
    try:
        records = pax_records(data)
    except TarError as exc:
        raise TarFormatError(f"the PAX extension at offset {offset}: {exc}") from None
    size: int | None = None
    for key, value in records:
        if key == b"size":
            if not value.isdigit():
                raise TarFormatError(f"the PAX extension at offset {offset} has a bad size")
            size = int(value)
    return size


def _split(
    inp: _Input,
    store: ObjectStore,
    writer: SplitStreamWriter,
    written: list[str],
    stats: ImportStats,
) -> None:
    """The tar into ``writer``: composefs-rs's ``split_async``; ``stats`` counts the
    objects and the inline bytes."""
    external = 0
    pax_size: int | None = None
    pending = False
    while True:
        if inp.at_eof():
            if pending:
                raise TarFormatError(
                    f"the tar ends at offset {inp.offset} after an extension header"
                )
            # composefs-rs accepts a clean end at a header boundary, end blocks or not.
            stats.bytes_inlined += writer.total_size - external
            return
        start = inp.offset
        header = inp.take(BLOCK, "a header")
        if header == bytes(BLOCK):
            second = inp.take(BLOCK, "the end-of-archive blocks")
            if second != bytes(BLOCK):
                raise TarFormatError(f"a lone zero block at offset {start}")
            writer.write_inline(header + second)
            for piece in inp.rest():
                writer.write_inline(piece)
            stats.bytes_inlined += writer.total_size - external
            return
        if not checksum_ok(header):
            raise TarFormatError(f"the header at offset {start} has a bad checksum")
        writer.write_inline(header)
        kind = header[156:157]
        size = _size(header, start)
        if kind == b"S":
            raise TarFormatError(f"the entry at offset {start} is sparse, which is not supported")
        if kind in _EXTENSIONS or kind == b"g":
            if size > EXTENSION_MAX:
                raise TarFormatError(
                    f"the extension header at offset {start} is {size} bytes, "
                    f"at most {EXTENSION_MAX}"
                )
            data = inp.take(padded(size), "an extension header")
            writer.write_inline(data)
            pending = kind != b"g"
            if kind == b"x":
                found = _pax_size(data[:size], start)
                if found is not None:
                    pax_size = found
            continue
        pending = False
        if pax_size is not None:
            size = pax_size
            pax_size = None
        stored = padded(size)
        if kind in _REGULAR and size > INLINE_MAX:
            result = store.store_chunks(
                inp.pieces(size, f"the data of the entry at offset {start}")
            )
            if result.written:
                written.append(result.digest)
                stats.objects_new += 1
                stats.bytes_new += size
            else:
                stats.objects_present += 1
            external += size
            writer.write_object(result.digest, size)
            writer.write_inline(inp.take(stored - size, "padding"))
        else:
            for piece in inp.pieces(stored, f"the data of the entry at offset {start}"):
                writer.write_inline(piece)


def check_diff_id(diff_id: str, actual: str) -> None:
    """:class:`LayerDigestError` unless ``actual`` (hex) is the digest ``diff_id`` names."""
    if actual != diff_id.partition(":")[2]:
        raise LayerDigestError(
            f"the layer's {diff_id.partition(':')[0]} is {actual}, not its diff_id {diff_id}"
        )


def import_layer(
    repo: Repository,
    reader: BinaryIO,
    diff_id: str,
    name: str | None = None,
    *,
    verify: bool = True,
    check: Callable[[], None] | None = None,
    stats: ImportStats | None = None,
) -> str:
    """Import the layer tar read from ``reader`` (uncompressed); the hex id of its
    splitstream object. ``name``: also ``streams/refs/<name>``. ``verify``: check
    that the tar's digest is ``diff_id`` (:class:`LayerDigestError`); a caller
    that hashes the tar itself passes False and checks in ``check``. ``check``:
    called once the whole tar is read and before anything is linked (a puller
    checks the compressed blob's digest there); what it raises links nothing.
    Neither runs when the stream exists already (nothing is read then).
    ``stats``: what was stored is added to it (nothing for an existing stream)."""
    content_id = layer_content_id(diff_id)
    if name is not None:
        # Checked as image refs are, but kept as given: cfsctl makes
        # streams/refs/refs/x of "refs/x".
        normalize_ref(name)
    ref = name
    repo.ensure_writable()
    try:
        with writer_lock(repo.path), repo.object_store() as store:
            store.probe_verity()
            found = existing_stream(repo, content_id)
            if found is not None:
                if ref is not None:
                    name_stream(repo, content_id, ref)
                return found
            hash_name = diff_id.partition(":")[0]
            inp = _Input(reader, hash_name if verify else None)
            writer = SplitStreamWriter(repo.hash_algorithm.digest_size, CONTENT_TYPE_OCI_LAYER)
            written: list[str] = []
            counted = ImportStats()
            _split(inp, store, writer, written, counted)
            if inp.hasher is not None:
                check_diff_id(diff_id, inp.hasher.hexdigest())
            if check is not None:
                check()
            digest = write_stream(repo, store, writer, content_id, ref=ref, written=written)
            if stats is not None:
                stats.add(counted)
            log.info("imported layer %s as stream %s", diff_id, digest)
            return digest
    except OSError as exc:
        raise RepositoryError(
            f"cannot import layer {diff_id}: {os_error_text(exc)}",
            errno=exc.errno if exc.errno is not None else errno.EIO,
        ) from exc
