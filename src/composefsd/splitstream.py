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
"""

from __future__ import annotations

import io
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

import zstandard

from composefsd.kernel.verity import LOG_BLOCK_SIZE, Algorithm

__all__ = [
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
    "Buffer",
    "SplitStream",
    "SplitStreamError",
    "StreamRefs",
    "parse",
    "read_refs",
]

Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap

MAGIC = b"SplitStream"

#: composefs-rs's content types: eight ASCII letters read as a little-endian u64.
CONTENT_TYPE_OCI_LAYER = int.from_bytes(b"ocilayer", "little")
CONTENT_TYPE_OCI_CONFIG = int.from_bytes(b"ociconfg", "little")
CONTENT_TYPE_OCI_MANIFEST = int.from_bytes(b"ocimanif", "little")

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

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE_MASK = 0xFFFFFFF0
_ZSTD_SKIPPABLE = 0x184D2A50
_ZSTD_BLOCK_MAX = 128 << 10


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


def _frame_end(data: memoryview, pos: int, what: str) -> tuple[int, int]:
    """Walk one zstd frame's block headers from ``pos``: (where it ends, an upper
    bound of what it decompresses to). Refuses a truncated frame, which libzstd's
    streaming reader would silently stop at, and bytes that are no frame at all."""
    if len(data) - pos < 4:
        raise SplitStreamError(f"zstd {what}: {len(data) - pos} stray bytes at offset {pos}")
    (magic,) = struct.unpack_from("<I", data, pos)
    if magic & _ZSTD_SKIPPABLE_MASK == _ZSTD_SKIPPABLE:
        if len(data) - pos < 8:
            raise SplitStreamError(f"zstd {what}: skippable frame at {pos} is truncated")
        (size,) = struct.unpack_from("<I", data, pos + 4)
        end = pos + 8 + size
        if end > len(data):
            raise SplitStreamError(f"zstd {what}: skippable frame at {pos} is truncated")
        return end, 0
    if magic != _ZSTD_MAGIC:
        raise SplitStreamError(f"zstd {what}: no zstd frame at offset {pos}")
    if len(data) - pos < 5:
        raise SplitStreamError(f"zstd {what}: frame header at {pos} is truncated")
    descriptor = data[pos + 4]
    fcs_flag = descriptor >> 6
    single_segment = bool(descriptor & 0x20)
    if descriptor & 0x08:
        raise SplitStreamError(f"zstd {what}: frame at {pos} sets a reserved bit")
    checksum = bool(descriptor & 0x04)
    header = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    header += (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    cursor = pos + header
    bound = 0
    while True:
        if len(data) - cursor < 3:
            raise SplitStreamError(f"zstd {what}: frame at {pos} is truncated at {cursor}")
        block = data[cursor] | data[cursor + 1] << 8 | data[cursor + 2] << 16
        last, kind, size = block & 1, (block >> 1) & 3, block >> 3
        cursor += 3
        if kind == 3:
            raise SplitStreamError(f"zstd {what}: reserved block type at offset {cursor - 3}")
        cursor += 1 if kind == 1 else size
        bound += _ZSTD_BLOCK_MAX if kind == 2 else size
        if cursor > len(data):
            raise SplitStreamError(f"zstd {what}: frame at {pos} is truncated at {len(data)}")
        if last:
            break
    if checksum:
        cursor += 4
        if cursor > len(data):
            raise SplitStreamError(f"zstd {what}: frame checksum at {pos} is truncated")
    return cursor, bound


def zstd_check(data: Buffer, what: str) -> int:
    """Check that ``data`` is whole zstd frames and nothing else; return an upper
    bound of their decompressed size. No frames at all (empty data) is accepted."""
    view = memoryview(data).cast("B")
    pos = 0
    bound = 0
    while pos < len(view):
        pos, frame_bound = _frame_end(view, pos, what)
        bound += frame_bound
    return bound


def zstd_reader(data: Buffer, limit: int, what: str) -> Iterator[bytes]:
    """Decompress checked ``data`` in pieces, refusing more than ``limit`` bytes."""
    zstd_check(data, what)
    reader = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(memoryview(data).cast("B")), read_across_frames=True, closefd=False
    )
    total = 0
    while True:
        try:
            piece = reader.read(min(1 << 20, limit - total + 1))
        except zstandard.ZstdError as exc:
            raise SplitStreamError(f"zstd {what}: {exc}") from None
        if not piece:
            return
        total += len(piece)
        if total > limit:
            raise SplitStreamError(f"zstd {what}: decompresses to more than {limit} bytes")
        yield piece


def zstd_decompress(data: Buffer, limit: int, what: str) -> bytes:
    """All of checked ``data`` decompressed, refusing more than ``limit`` bytes."""
    if not len(data):
        return b""
    return b"".join(zstd_reader(data, limit, what))
