"""The splitdirfdstream format of composefs-rs 0.9 (``splitdirfdstream-v0``), pure bytes:
how ``org.composefs.Oci.GetLayer`` hands out a layer and ``PutLayer`` takes one in.

A stream is a sequence of chunks, no header, no trailer; it ends at a clean end of
input before a type byte. Integers are little-endian:

* ``0x00`` Metadata: ``u32`` length, then that many bytes (tar headers, padding),
  copied to the output as they are;
* ``0x01`` InlineData: ``u32`` length, then that many bytes of file content the
  producer sends inline (zero-length is allowed: an empty file);
* ``0x02`` FileBackedData: ``u64`` length, ``u32`` dirfd index, ``u32`` name length,
  the name: the first ``length`` bytes of the file ``name`` beneath directory fd
  number ``index`` of the fds that came with the stream.

The stream says nothing about the whole (no size, no digest): a consumer checks the
rebuilt bytes against the layer's diff_id itself.

Everything read comes from the other end of a pipe, so every length is bounded
before anything is allocated (:data:`MAX_INLINE_CHUNK`, :data:`MAX_FILENAME`), a
dirfd index is checked against the fds actually present, and a name must be
relative, without ``..`` or NUL (:func:`check_filename`; opening it still has to
stay beneath the directory, which is the caller's business). Long bodies are read
in pieces of at most :data:`PIECE` bytes, so memory does not follow the lengths the
stream declares.

The second half of the module is the fd layout GetLayer replies with (pure
arithmetic, no fds): the pipe, ``dir_count`` directory slots with the real
directories at seed-chosen places among placeholders, the lifetime fds, spread over
several ``continues`` frames. cfsctl derives all of it from a seed (the first 8
bytes of the sha256 of the layer's content id); :func:`plan_layout` does the same,
so composefsd hands out the same layout for the same layer. A consumer never needs
it: every FileBackedData chunk names its slot.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

__all__ = [
    "MAX_FDS_PER_FRAME",
    "MAX_FILENAME",
    "MAX_INLINE_CHUNK",
    "PIECE",
    "Chunk",
    "ChunkTooLargeError",
    "DirfdIndexError",
    "FileBacked",
    "FilenameError",
    "InlineData",
    "LayoutPlan",
    "Metadata",
    "Readable",
    "SplitdirfdError",
    "StreamReader",
    "StreamWriter",
    "TruncatedError",
    "UnknownChunkTypeError",
    "Writable",
    "check_filename",
    "frame_sizes",
    "plan_layout",
    "seed_from_id",
]

#: The longest Metadata or InlineData body composefs-rs accepts (256 MiB).
MAX_INLINE_CHUNK: Final = 256 << 20
#: The longest FileBackedData name.
MAX_FILENAME: Final = 4096
#: The most bytes of a body read (or written) at once.
PIECE: Final = 1 << 20
#: The most fds one reply carries (safely below the kernel's 253 per sendmsg).
MAX_FDS_PER_FRAME: Final = 240

METADATA: Final = 0x00
INLINE_DATA: Final = 0x01
FILE_BACKED: Final = 0x02

_U32 = struct.Struct("<I")
_FILE_HEADER = struct.Struct("<QII")


class SplitdirfdError(ValueError):
    """A malformed splitdirfdstream; the message names what and where."""


class TruncatedError(SplitdirfdError):
    """The stream ends inside a chunk."""


class UnknownChunkTypeError(SplitdirfdError):
    """A type byte other than 0, 1, 2."""


class ChunkTooLargeError(SplitdirfdError):
    """A body or name longer than the format allows."""


class FilenameError(SplitdirfdError):
    """A FileBackedData name that is empty, absolute, has ``..`` or NUL."""


class DirfdIndexError(SplitdirfdError):
    """A FileBackedData chunk names a directory slot that was not passed."""


@dataclass(frozen=True, slots=True)
class Metadata:
    """A Metadata chunk's header; its body follows (:meth:`StreamReader.body`)."""

    length: int


@dataclass(frozen=True, slots=True)
class InlineData:
    """An InlineData chunk's header; its body follows (:meth:`StreamReader.body`)."""

    length: int


@dataclass(frozen=True, slots=True)
class FileBacked:
    """The first ``length`` bytes of ``filename`` beneath directory slot ``index``."""

    index: int
    length: int
    filename: bytes


Chunk: TypeAlias = Metadata | InlineData | FileBacked


def check_filename(name: bytes) -> None:
    """:class:`FilenameError` (or :class:`ChunkTooLargeError`) unless ``name`` is a
    relative path without ``..`` components or NUL bytes (composefs-rs's
    ``validate_filename``; ``.`` and empty components are the opener's to refuse)."""
    if not name:
        raise FilenameError("empty file name")
    if len(name) > MAX_FILENAME:
        raise ChunkTooLargeError(f"file name of {len(name)} bytes, at most {MAX_FILENAME}")
    if b"\0" in name:
        raise FilenameError(f"file name {name[:200]!r} contains NUL")
    if name.startswith(b"/"):
        raise FilenameError(f"file name {name[:200]!r} is absolute")
    if b".." in name.split(b"/"):
        raise FilenameError(f"file name {name[:200]!r} has a '..' component")


class Readable(Protocol):
    """What a stream is read from (a file, a pipe wrapper)."""

    def read(self, n: int = -1, /) -> bytes: ...


class Writable(Protocol):
    """What a stream is written to."""

    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...


class StreamReader:
    """Chunks of a stream read from ``source`` (anything with ``read``), in order.

    :meth:`next` returns the next chunk's header, None at the clean end. The body of
    a Metadata or InlineData chunk is read by :meth:`body` (pieces) or
    :meth:`read_body` (whole, for short bodies); what the caller leaves unread is
    skipped by the next :meth:`next`. ``dir_count``: the directory slots present;
    a FileBackedData chunk naming another is a :class:`DirfdIndexError`. Names are
    checked with :func:`check_filename`.
    """

    def __init__(self, source: Readable, dir_count: int | None = None) -> None:
        self._source = source
        self.dir_count = dir_count
        #: Bytes consumed so far (for messages).
        self.offset = 0
        self._left = 0

    def _exact(self, n: int, what: str) -> bytes:
        parts: list[bytes] = []
        have = 0
        while have < n:
            piece = self._source.read(n - have)
            if not piece:
                raise TruncatedError(
                    f"splitdirfdstream ends at offset {self.offset + have} inside {what} "
                    f"({n - have} more bytes expected)"
                )
            parts.append(piece)
            have += len(piece)
        self.offset += n
        return b"".join(parts)

    def next(self) -> Chunk | None:
        while self._left:
            for _ in self.body():
                pass
        start = self.offset
        kind = self._source.read(1)
        if not kind:
            return None
        self.offset += 1
        if kind[0] in (METADATA, INLINE_DATA):
            (length,) = _U32.unpack(self._exact(4, "a chunk length"))
            if length > MAX_INLINE_CHUNK:
                raise ChunkTooLargeError(
                    f"chunk at offset {start} declares {length} bytes, at most {MAX_INLINE_CHUNK}"
                )
            self._left = length
            return Metadata(length) if kind[0] == METADATA else InlineData(length)
        if kind[0] == FILE_BACKED:
            length, index, name_len = _FILE_HEADER.unpack(
                self._exact(_FILE_HEADER.size, "a file chunk header")
            )
            if name_len > MAX_FILENAME:
                raise ChunkTooLargeError(
                    f"file chunk at offset {start} declares a name of {name_len} bytes, "
                    f"at most {MAX_FILENAME}"
                )
            name = self._exact(name_len, "a file name")
            check_filename(name)
            if self.dir_count is not None and index >= self.dir_count:
                raise DirfdIndexError(
                    f"file chunk at offset {start} names directory {index} of {self.dir_count}"
                )
            return FileBacked(index, length, name)
        raise UnknownChunkTypeError(f"unknown chunk type 0x{kind[0]:02x} at offset {start}")

    def body(self) -> Iterator[bytes]:
        """The rest of the current Metadata/InlineData body, in pieces of at most
        :data:`PIECE` bytes."""
        while self._left:
            piece = self._exact(min(self._left, PIECE), "a chunk body")
            self._left -= len(piece)
            yield piece

    def read_body(self) -> bytes:
        return b"".join(self.body())

    def chunks(self) -> Iterator[tuple[Chunk, bytes]]:
        """Every chunk with its whole body (b"" for FileBacked): for tests and short
        streams only, a body is held whole."""
        while (chunk := self.next()) is not None:
            yield chunk, b"" if isinstance(chunk, FileBacked) else self.read_body()


class StreamWriter:
    """Encodes chunks onto ``out``; byte for byte composefs-rs's writer (an empty
    Metadata write writes nothing, an empty InlineData chunk is written)."""

    def __init__(self, out: Writable) -> None:
        self._out = out

    def metadata(self, data: bytes | bytearray | memoryview) -> None:
        if len(data):
            self._inline(METADATA, data)

    def inline_data(self, data: bytes | bytearray | memoryview) -> None:
        self._inline(INLINE_DATA, data)

    def _inline(self, kind: int, data: bytes | bytearray | memoryview) -> None:
        if len(data) > MAX_INLINE_CHUNK:
            raise ChunkTooLargeError(f"chunk of {len(data)} bytes, at most {MAX_INLINE_CHUNK}")
        self._out.write(bytes((kind,)) + _U32.pack(len(data)))
        self._out.write(data)

    def file_backed(self, index: int, length: int, filename: bytes) -> None:
        check_filename(filename)
        self._out.write(
            bytes((FILE_BACKED,)) + _FILE_HEADER.pack(length, index, len(filename)) + filename
        )


# -- GetLayer's fd layout ------------------------------------------------------------------


def seed_from_id(content_id: str) -> int:
    """cfsctl's layout seed: the first 8 bytes of sha256(content id), little-endian."""
    return int.from_bytes(hashlib.sha256(content_id.encode()).digest()[:8], "little")


_M64 = (1 << 64) - 1
_M128 = (1 << 128) - 1
_PCG128_MUL = 0x2360_ED05_1FC6_5DA4_4385_DF64_9FCC_F645


class _Pcg64:
    """PCG XSL-RR 128/64 (rand_pcg's ``Pcg64``), seeded as rand_core's
    ``seed_from_u64``: the only generator the layout needs, reproduced so that the
    placeholders sit where cfsctl puts them."""

    def __init__(self, seed: int) -> None:
        state = seed & _M64
        words = []
        for _ in range(8):
            state = (state * 6364136223846793005 + 11634580027462260723) & _M64
            xorshifted = (((state >> 18) ^ state) >> 27) & 0xFFFFFFFF
            rot = state >> 59
            words.append(((xorshifted >> rot) | (xorshifted << (32 - rot))) & 0xFFFFFFFF)
        raw = b"".join(w.to_bytes(4, "little") for w in words)
        self._inc = int.from_bytes(raw[16:], "little") | 1
        self._state = (int.from_bytes(raw[:16], "little") + self._inc) & _M128
        self._step()

    def _step(self) -> None:
        self._state = (self._state * _PCG128_MUL + self._inc) & _M128

    def next_u64(self) -> int:
        self._step()
        rot = self._state >> 122
        xsl = ((self._state >> 64) ^ self._state) & _M64
        return ((xsl >> rot) | (xsl << (64 - rot))) & _M64

    def below_u32(self, bound: int) -> int:
        """Uniform in [0, bound) for a u32 bound, as rand 0.9's ``random_range``."""
        product = (self.next_u64() & 0xFFFFFFFF) * bound
        result, low = product >> 32, product & 0xFFFFFFFF
        if low > (-bound) & 0xFFFFFFFF:
            high2 = ((self.next_u64() & 0xFFFFFFFF) * bound) >> 32
            result += (low + high2) >> 32
        return result


def _shuffle(items: list[int], rng: _Pcg64) -> None:
    """rand 0.9's ``SliceRandom::shuffle`` (Fisher-Yates with batched indices)."""
    if len(items) <= 1:
        return
    n, chunk, remaining = 0, 0, 1
    for i in range(len(items)):
        next_n = n + 1
        if remaining:
            remaining -= 1
        else:
            bound, count = next_n, next_n + 1
            while bound * count <= 0xFFFFFFFF:
                bound *= count
                count += 1
            chunk = rng.below_u32(bound)
            remaining = count - next_n - 1
        if remaining == 0:
            index = chunk
        else:
            index, chunk = chunk % next_n, chunk // next_n
        n = next_n
        items[i], items[index] = items[index], items[i]


@dataclass(frozen=True, slots=True)
class LayoutPlan:
    """Where GetLayer's fds go: ``[pipe, slot 0 .. slot dir_count-1, keepalive,
    extras...]``; ``real_slots[i]`` holds real directory ``i``, the other slots
    placeholders; ``frames`` fds per reply."""

    dir_count: int
    real_slots: tuple[int, ...]
    extra_lifetime: int
    frames: tuple[int, ...]

    @property
    def total(self) -> int:
        return 1 + self.dir_count + 1 + self.extra_lifetime


def frame_sizes(fd_count: int, seed: int, more: bool) -> tuple[int, ...]:
    """How many fds each reply carries: one reply without ``more``; with it as
    cfsctl: at least 3 frames (seed-chosen), no more than ``fd_count``, none
    over :data:`MAX_FDS_PER_FRAME`; the first frames take one more when uneven."""
    if not more or fd_count == 0:
        return (fd_count,)
    if fd_count < 3:
        n = max(fd_count, 1)
    else:
        n = min(max(3, seed % (fd_count + 1)), fd_count)
    n = max(1, min(max(n, -(-fd_count // MAX_FDS_PER_FRAME)), fd_count))
    base, extra = divmod(fd_count, n)
    return tuple(base + (1 if i < extra else 0) for i in range(n))


def plan_layout(real_dirs: int, seed: int, more: bool) -> LayoutPlan:
    """The layout of ``real_dirs`` directories for ``seed`` (module notes)."""
    dummies = (seed >> 8) % (real_dirs + 1) + 1
    dir_count = real_dirs + dummies
    slots = list(range(dir_count))
    _shuffle(slots, _Pcg64(seed))
    real = tuple(sorted(slots[:real_dirs]))
    extra = (seed >> 16) % 3
    total = 1 + dir_count + 1 + extra
    return LayoutPlan(dir_count, real, extra, frame_sizes(total, seed, more))
