"""composefs-rs splitstreams: the files behind a repository's ``streams/``.

A splitstream stores a file (an OCI layer tar, a config or manifest JSON) as
inline bytes plus references to objects of the repository, so that the file can
be rebuilt exactly while its large parts are shared as objects. The format is
composefs-rs 0.9's (``splitstream.rs``); all integers are little-endian:

* a 32-byte header: ``b"SplitStream"``, version 0, flags (ignored), the fs-verity
  algorithm's kernel id, log2 block size 12, and the ``[start, end)`` range of the
  info section. composefs-rs before its ``repr(C)`` fix (bootc <= 1.15) wrote the
  same fields in another order (the info range first, the magic at byte 18); it
  still reads those, and so do we.
* the info section (at least 80 bytes; more is allowed and ignored): the ranges of
  the stream-refs array, the object-refs array, the zstd-compressed stream and the
  zstd-compressed named refs, the content type and the size of the rebuilt file.
* stream refs and object refs: flat arrays of raw digests.
* named refs: ``"<index into stream refs>:<name>\\0"`` records.
* the stream: chunks, each an i64: negative ``-n`` is ``n`` inline bytes that
  follow, non-negative ``i`` is object ref ``i``'s whole content.

Every offset and count comes from the file, which anyone who could write to the
repository controls: each is bounds-checked against the data before use, and
decompression is bounded. Where composefs-rs refuses a file, so do we; where it
accepts one (trailing bytes after the last section, overlapping sections, an
empty range anywhere), we do too, so that both agree on what a repository holds.

:func:`parse` / :func:`read_refs` read everything but the stream section (what GC
and fsck need; composefs-rs's reader does not look into it when opening either),
:func:`iter_chunks` decodes the stream section, :class:`SplitStreamWriter` writes
byte for byte what composefs-rs writes. zstd is the standard library's
``compression.zstd`` (``backports.zstd`` before Python 3.14); the compressed bytes
equal composefs-rs's where both use the same libzstd (:func:`zstd_version_info`).
It is imported by the functions that compress or decompress, on first use: a
process that never decodes a stream (the daemon at start, ``composefsctl --help``,
a caller's scan worker) never loads the extension.
"""

from __future__ import annotations

import mmap
import struct
import sys
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TypeAlias

from composefsd.kernel.verity import LOG_BLOCK_SIZE, Algorithm
from composefsd.objectlayout import is_hex

__all__ = [
    "CONTENT_TYPE_OCI_BLOB",
    "CONTENT_TYPE_OCI_CONFIG",
    "CONTENT_TYPE_OCI_LAYER",
    "CONTENT_TYPE_OCI_MANIFEST",
    "HEADER_SIZE",
    "INFO_SIZE",
    "MAGIC",
    "NAMED_REFS_MAX",
    "OCI_BLOB_PREFIX",
    "OCI_CONFIG_PREFIX",
    "OCI_LAYER_PREFIX",
    "OCI_MANIFEST_PREFIX",
    "ZSTD_LEVEL",
    "Buffer",
    "Chunk",
    "ObjectChunk",
    "SplitStream",
    "SplitStreamError",
    "SplitStreamWriter",
    "StreamRefs",
    "ZstdSection",
    "iter_chunks",
    "parse",
    "read_refs",
    "stream_limit",
    "write_splitstream",
    "zstd_compress",
    "zstd_decompress",
    "zstd_module",
    "zstd_pieces",
    "zstd_version_info",
]

Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap

MAGIC = b"SplitStream"

#: composefs-rs's content types: eight ASCII letters read as a little-endian u64.
CONTENT_TYPE_OCI_LAYER = int.from_bytes(b"ocilayer", "little")
CONTENT_TYPE_OCI_CONFIG = int.from_bytes(b"ociconfg", "little")
CONTENT_TYPE_OCI_MANIFEST = int.from_bytes(b"ocimanif", "little")
#: An OCI artifact's non-tar layer: one object, the blob as it is.
CONTENT_TYPE_OCI_BLOB = int.from_bytes(b"oci_blob", "little")

#: Prefixes of the content ids (the names under ``streams/``) of OCI streams.
OCI_LAYER_PREFIX = "oci-layer-"
OCI_CONFIG_PREFIX = "oci-config-"
OCI_MANIFEST_PREFIX = "oci-manifest-"
OCI_BLOB_PREFIX = "oci-blob-"

# magic, version, flags, algorithm, lg_blocksize, info.start, info.end
_HEADER = struct.Struct("<11sBHBBQQ")
# The pre-repr(C) layout: info.start, info.end, flags, magic, version, algorithm, lg_blocksize
_OLD_HEADER = struct.Struct("<QQH11sBBB")
# stream_refs, object_refs, stream, named_refs (start, end each), content_type, stream_size
_INFO = struct.Struct("<10Q")
HEADER_SIZE = _HEADER.size
INFO_SIZE = _INFO.size

#: Refuse named refs that decompress to more than this: composefs-rs writes a few
#: short records (an OCI config has one per layer plus a few image refs).
NAMED_REFS_MAX = 16 << 20

#: composefs-rs compresses with the zstd crate's default level, 3, without checksums.
ZSTD_LEVEL = 3
_PIECE = 1 << 20
_I64 = struct.Struct("<q")


class SplitStreamError(Exception):
    """A splitstream that composefs-rs would not read either. The message names
    what is wrong and, where there is one, the byte offset in the file."""


@dataclass(frozen=True, slots=True)
class StreamRefs:
    """What a splitstream references, as a GC or fsck needs it (the stream itself
    is not decompressed)."""

    content_type: int
    #: Lower-case hex digests, in file order.
    stream_refs: tuple[str, ...]
    object_refs: tuple[str, ...]
    #: ``(name, hex digest of stream_refs[index])`` in file order. composefs-rs keeps
    #: named refs in a map, so of two records with one name the later one wins (at
    #: the position of the first): that is what it keeps alive.
    named_refs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class SplitStream:
    """A parsed splitstream: its references and where its stream section is."""

    refs: StreamRefs
    #: The size of the rebuilt file, as the writer declared it.
    stream_size: int
    #: ``[start, end)`` of the zstd-compressed stream section in the file.
    stream_start: int
    stream_end: int
    #: Written with the pre-``repr(C)`` header layout (bootc <= 1.15).
    old_header: bool


def _algorithm_for(digest_size: int) -> Algorithm:
    for algorithm in Algorithm:
        if algorithm.digest_size == digest_size:
            return algorithm
    raise ValueError(f"no fs-verity algorithm has {digest_size}-byte digests")


def _range(data: memoryview, start: int, end: int, what: str) -> memoryview:
    """The bytes of ``[start, end)``, refused as composefs-rs's ``read_range`` does:
    a negative size, or one reaching past the end of the file. An empty range is
    accepted wherever it points."""
    if end < start:
        raise SplitStreamError(f"splitstream {what} range [{start}, {end}) has a negative size")
    if start == end:
        return data[0:0]
    if end > len(data):
        raise SplitStreamError(
            f"splitstream {what} range [{start}, {end}) reaches past the end of the "
            f"{len(data)}-byte file"
        )
    return data[start:end]


def _digests(section: memoryview, digest_size: int, start: int, what: str) -> tuple[str, ...]:
    if len(section) % digest_size:
        raise SplitStreamError(
            f"splitstream {what} at offset {start} are {len(section)} bytes, "
            f"not a whole number of {digest_size}-byte digests"
        )
    hexed = section.hex()
    width = 2 * digest_size
    return tuple(hexed[i : i + width] for i in range(0, len(hexed), width))


def _parse_rust_usize(text: str) -> int | None:
    """``str::parse::<usize>``: an optional ``+`` and at least one ASCII digit."""
    digits = text[1:] if text.startswith("+") else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = int(digits)
    return value if value < 1 << 64 else None


def _named_refs(
    section: memoryview, start: int, stream_refs: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    raw = zstd_decompress(section, NAMED_REFS_MAX, f"named refs at offset {start}")
    *records, tail = raw.split(b"\0")
    if tail:
        raise SplitStreamError(
            f"splitstream named refs at offset {start} end in {len(tail)} bytes without "
            "a terminating NUL"
        )
    named: dict[str, str] = {}
    for number, record in enumerate(records):
        try:
            text = record.decode("utf-8")
        except UnicodeDecodeError:
            raise SplitStreamError(
                f"splitstream named ref #{number} at offset {start} is not UTF-8"
            ) from None
        index_text, colon, name = text.partition(":")
        if not colon:
            raise SplitStreamError(
                f"splitstream named ref #{number} at offset {start} has no colon: {text!r}"
            )
        index = _parse_rust_usize(index_text)
        if index is None:
            raise SplitStreamError(
                f"splitstream named ref #{number} at offset {start} has a bad index {index_text!r}"
            )
        if index >= len(stream_refs):
            raise SplitStreamError(
                f"splitstream named ref {name!r} at offset {start} has index {index}, "
                f"past the {len(stream_refs)} stream refs"
            )
        named[name] = stream_refs[index]
    return tuple(named.items())


def parse(data: Buffer, digest_size: int) -> SplitStream:
    """Parse a splitstream's header, info and references (not its stream section).

    ``digest_size`` is the repository's (32 for SHA-256, 64 for SHA-512); a stream of
    the other algorithm is refused, as composefs-rs does.
    """
    algorithm = _algorithm_for(digest_size)
    view = memoryview(data).cast("B")
    if len(view) < HEADER_SIZE:
        raise SplitStreamError(
            f"splitstream is {len(view)} bytes, shorter than its {HEADER_SIZE}-byte header"
        )
    magic, version, _flags, alg_id, lg_blocksize, info_start, info_end = _HEADER.unpack_from(view)
    old_header = False
    if magic != MAGIC:
        (info_start, info_end, _flags, magic, version, alg_id, lg_blocksize) = (
            _OLD_HEADER.unpack_from(view)
        )
        if magic != MAGIC:
            raise SplitStreamError("splitstream has no SplitStream magic at offset 0 or 18")
        old_header = True
    if version != 0:
        raise SplitStreamError(f"splitstream version {version} (at offset 11) is not 0")
    if alg_id != algorithm.kernel_id:
        raise SplitStreamError(
            f"splitstream fs-verity algorithm {alg_id} is not the repository's "
            f"{algorithm.value} ({algorithm.kernel_id})"
        )
    if lg_blocksize != LOG_BLOCK_SIZE:
        raise SplitStreamError(
            f"splitstream fs-verity block size 2^{lg_blocksize} is not 2^{LOG_BLOCK_SIZE}"
        )
    info = _range(view, info_start, info_end, "info")
    if len(info) < INFO_SIZE:
        raise SplitStreamError(
            f"splitstream info at offset {info_start} is {len(info)} bytes, "
            f"shorter than {INFO_SIZE}"
        )
    (sr_start, sr_end, or_start, or_end, s_start, s_end, nr_start, nr_end, content_type, size) = (
        _INFO.unpack_from(info)
    )
    stream_refs = _digests(
        _range(view, sr_start, sr_end, "stream refs"), digest_size, sr_start, "stream refs"
    )
    object_refs = _digests(
        _range(view, or_start, or_end, "object refs"), digest_size, or_start, "object refs"
    )
    named_refs = _named_refs(_range(view, nr_start, nr_end, "named refs"), nr_start, stream_refs)
    if s_end < s_start:
        raise SplitStreamError(f"splitstream stream range [{s_start}, {s_end}) has a negative size")
    refs = StreamRefs(content_type, stream_refs, object_refs, named_refs)
    return SplitStream(refs, size, s_start, s_end, old_header)


def read_refs(data: Buffer, digest_size: int) -> StreamRefs:
    """The references of a splitstream, without decompressing its stream section
    (only the small named-refs section is). Raises :class:`SplitStreamError`."""
    return parse(data, digest_size).refs


# --- zstd --------------------------------------------------------------------------


def zstd_module() -> ModuleType:
    """The zstd binding (module notes: imported only where it is used)."""
    if sys.version_info >= (3, 14):
        from compression import zstd
    else:
        from backports import zstd
    return zstd


def zstd_pieces(data: Buffer, limit: int, what: str) -> Generator[bytes, None, None]:
    """Decompress ``data`` (zero or more whole zstd frames, as the zstd crate's
    reader takes them) in pieces of at most 1 MiB, refusing more than ``limit``
    bytes in all, a truncated frame and bytes that are no frame."""
    zstd = zstd_module()
    rest: Buffer = memoryview(data).cast("B")
    total = 0
    while len(rest):
        decompressor = zstd.ZstdDecompressor()
        pending: Buffer = rest
        while not decompressor.eof:
            if decompressor.needs_input and not len(pending):
                raise SplitStreamError(f"zstd {what}: truncated frame")
            try:
                piece = decompressor.decompress(pending, max_length=min(_PIECE, limit - total + 1))
            except zstd.ZstdError as exc:
                raise SplitStreamError(f"zstd {what}: {exc}") from None
            pending = b""
            total += len(piece)
            if total > limit:
                raise SplitStreamError(f"zstd {what}: decompresses to more than {limit} bytes")
            if piece:
                yield piece
        rest = decompressor.unused_data


def zstd_decompress(data: Buffer, limit: int, what: str) -> bytes:
    """All of ``data`` decompressed (see :func:`zstd_pieces`)."""
    return b"".join(zstd_pieces(data, limit, what))


class ZstdSection:
    """Compresses one section as composefs-rs's zstd ``Encoder`` does: every write
    goes in with ``ZSTD_e_continue`` and the frame is ended by an empty
    ``ZSTD_e_end``, so the frame header declares no content size, except for an
    empty section, where the first call already ends the frame (and declares 0).
    With the same libzstd (composefs-rs 0.9 as packaged links the system's), the
    bytes are the same."""

    __slots__ = ("_compressor", "_out", "_written")

    def __init__(self) -> None:
        self._compressor = zstd_module().ZstdCompressor(level=ZSTD_LEVEL)
        self._out: list[bytes] = []
        self._written = False

    def write(self, data: Buffer) -> None:
        if len(data):
            self._written = True
            self._out.append(self._compressor.compress(data, self._compressor.CONTINUE))

    def finish(self) -> bytes:
        if self._written:
            self._out.append(self._compressor.flush(self._compressor.FLUSH_FRAME))
        else:
            self._out.append(self._compressor.compress(b"", self._compressor.FLUSH_FRAME))
        return b"".join(self._out)


def zstd_compress(data: Buffer) -> bytes:
    """One section compressed as composefs-rs does (see :class:`ZstdSection`)."""
    section = ZstdSection()
    section.write(data)
    return section.finish()


# --- the stream section ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectChunk:
    """An external chunk: the whole content of object ``digest`` (object ref ``index``)."""

    index: int
    digest: str


Chunk: TypeAlias = bytes | ObjectChunk


class _Pieces:
    """Exact reads over an iterator of byte pieces."""

    __slots__ = ("_buf", "_it", "_pos")

    def __init__(self, it: Iterator[bytes]) -> None:
        self._it = it
        self._buf = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, fewer only at the end."""
        if self._pos + n <= len(self._buf):
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            return out
        parts = [self._buf[self._pos :]]
        have = len(parts[0])
        self._buf, self._pos = b"", 0
        while have < n:
            piece = next(self._it, None)
            if piece is None:
                break
            take = n - have
            if len(piece) > take:
                parts.append(piece[:take])
                self._buf, self._pos = piece, take
                have = n
            else:
                parts.append(piece)
                have += len(piece)
        return b"".join(parts)


def stream_limit(stream: SplitStream) -> int:
    """The most the stream section may decompress to: every chunk is an 8-byte
    header plus at least one byte of the rebuilt file (the declared
    ``stream_size``), except external chunks of empty objects, allowed once per
    object ref."""
    return 9 * stream.stream_size + 8 * len(stream.refs.object_refs)


def iter_chunks(data: Buffer, stream: SplitStream) -> Generator[Chunk, None, None]:
    """The chunks of ``stream`` (parsed from ``data``) in order: inline bytes (a long
    inline chunk comes in pieces of at most 1 MiB) and :class:`ObjectChunk`.

    Raises :class:`SplitStreamError` for a stream section outside the file, bad
    zstd, a chunk header cut short, an inline chunk running past the end, an object
    index past the object refs, or more inline bytes than ``stream_size``.
    """
    view = memoryview(data).cast("B")
    section = _range(view, stream.stream_start, stream.stream_end, "stream")
    reader = _Pieces(zstd_pieces(section, stream_limit(stream), "stream"))
    objects = stream.refs.object_refs
    inline_left = stream.stream_size
    offset = 0
    while True:
        header = reader.read(8)
        if not header:
            return
        if len(header) < 8:
            raise SplitStreamError(
                f"splitstream chunk header at stream offset {offset} is cut short"
            )
        (value,) = _I64.unpack(header)
        offset += 8
        if value >= 0:
            if value >= len(objects):
                raise SplitStreamError(
                    f"splitstream chunk at stream offset {offset - 8} names object {value} "
                    f"of {len(objects)}"
                )
            yield ObjectChunk(value, objects[value])
            continue
        size = -value
        if size > inline_left:
            raise SplitStreamError(
                f"splitstream inline chunk of {size} bytes at stream offset {offset - 8} "
                f"is more than the declared stream size leaves ({inline_left})"
            )
        inline_left -= size
        while size:
            piece = reader.read(min(size, _PIECE))
            if not piece:
                raise SplitStreamError(
                    f"splitstream inline chunk at stream offset {offset} is cut short"
                )
            size -= len(piece)
            offset += len(piece)
            yield piece


# --- writing -----------------------------------------------------------------------


class SplitStreamWriter:
    """Builds a splitstream byte for byte as composefs-rs's ``SplitStreamWriter``:

    * stream refs in the order they are first added; named refs sorted by name
      (a name added again points to the new stream, the old one stays in the
      stream refs);
    * object refs in order of first use; adjacent inline writes coalesced;
    * header, info, stream refs, object refs, named refs, stream, back to back.
    """

    def __init__(self, digest_size: int, content_type: int) -> None:
        self._algorithm = _algorithm_for(digest_size)
        self._digest_size = digest_size
        self.content_type = content_type
        self._stream_refs: dict[str, int] = {}
        self._object_refs: dict[str, int] = {}
        self._named: dict[str, int] = {}
        self._inline: list[bytes] = []
        self._inline_size = 0
        self._stream = ZstdSection()
        self.total_size = 0

    def _check_digest(self, digest: str) -> None:
        if len(digest) != 2 * self._digest_size or not is_hex(digest):
            raise ValueError(f"not a {self._algorithm.value} digest: {digest!r}")

    def add_stream_ref(self, digest: str) -> int:
        """The index of stream ``digest`` (added if new)."""
        self._check_digest(digest)
        return self._stream_refs.setdefault(digest, len(self._stream_refs))

    def add_named_ref(self, name: str, digest: str) -> None:
        if "\0" in name:
            raise ValueError(f"a named ref cannot contain NUL: {name!r}")
        self._named[name] = self.add_stream_ref(digest)

    def add_object_ref(self, digest: str) -> int:
        """The index of object ``digest`` (added if new)."""
        self._check_digest(digest)
        return self._object_refs.setdefault(digest, len(self._object_refs))

    def _flush_inline(self) -> None:
        if self._inline_size:
            self._stream.write(_I64.pack(-self._inline_size))
            for data in self._inline:
                self._stream.write(data)
            self._inline.clear()
            self._inline_size = 0

    def write_inline(self, data: Buffer) -> None:
        if len(data):
            self._inline.append(bytes(data))
            self._inline_size += len(data)
            self.total_size += len(data)

    def write_object(self, digest: str, size: int) -> None:
        """An external chunk: object ``digest``, whose content is ``size`` bytes."""
        self._flush_inline()
        index = self.add_object_ref(digest)
        self._stream.write(_I64.pack(index))
        self.total_size += size

    def finish(self) -> bytes:
        self._flush_inline()
        stream = self._stream.finish()
        names = ZstdSection()
        for name in sorted(self._named):
            names.write(f"{self._named[name]}:{name}\0".encode())
        named = names.finish()
        stream_refs = b"".join(bytes.fromhex(d) for d in self._stream_refs)
        object_refs = b"".join(bytes.fromhex(d) for d in self._object_refs)
        info_start = HEADER_SIZE
        sr_start = info_start + INFO_SIZE
        or_start = sr_start + len(stream_refs)
        nr_start = or_start + len(object_refs)
        s_start = nr_start + len(named)
        s_end = s_start + len(stream)
        header = _HEADER.pack(
            MAGIC, 0, 0, self._algorithm.kernel_id, LOG_BLOCK_SIZE, info_start, sr_start
        )
        info = _INFO.pack(
            sr_start, or_start, or_start, nr_start, s_start, s_end, nr_start, s_start,
            self.content_type, self.total_size,
        )  # fmt: skip
        return b"".join((header, info, stream_refs, object_refs, named, stream))


def write_splitstream(
    digest_size: int,
    content_type: int,
    chunks: Iterable[Buffer | tuple[str, int]],
    *,
    named_refs: Iterable[tuple[str, str]] = (),
    stream_refs: Iterable[str] = (),
) -> bytes:
    """A whole splitstream: ``stream_refs`` first (in order), then ``named_refs``
    (``(name, stream digest)``), then ``chunks``: inline bytes or ``(object digest,
    object size)``."""
    writer = SplitStreamWriter(digest_size, content_type)
    for digest in stream_refs:
        writer.add_stream_ref(digest)
    for name, digest in named_refs:
        writer.add_named_ref(name, digest)
    for chunk in chunks:
        if isinstance(chunk, tuple):
            writer.write_object(*chunk)
        else:
            writer.write_inline(chunk)
    return writer.finish()


def zstd_version_info() -> tuple[int, ...]:
    """The version of the libzstd in use: its bytes are the golden data's only with
    the same version (1.5.4)."""
    return tuple(zstd_module().zstd_version_info)
