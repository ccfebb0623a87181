"""OCI layer tars as composefs-rs 0.9 reads them back from their splitstreams, and
the layers applied in order to a :class:`~composefsd.image.tree.Node` tree.

Pure: the layer comes as its splitstream's chunks in order, inline bytes and the
hex digests of external objects (``str``), and nothing is read from anywhere else.

Entries (composefs-rs ``tar::get_entry`` on tar-core's parser): PAX ``path``,
``linkpath``, ``size``, ``uid``, ``gid``, ``mtime`` (nanoseconds from its fraction)
and ``SCHILY.xattr.*`` records override the header; GNU ``././@LongLink`` names and
link targets override the header's fields (PAX wins over both); the ustar prefix
field is joined to the name. Global PAX headers are skipped. Paths are made
absolute, ``.`` components and repeated or trailing slashes dropped; a path of no
component is the root directory. A ``..`` component anywhere is refused here
(composefs-rs refuses it too, with a less telling error).

Layers (composefs-rs ``image::process_entry``): a directory over a directory takes
the new metadata and keeps the old entries; anything else replaces what was there;
``.wh.<name>`` removes ``<name>`` (nothing if it is missing); ``.wh..wh..opq``
empties its directory when it is met, entries of the same layer before it
included; a hardlink names the inode its target is now, which it keeps when the
target is later replaced. The parent of every entry must already exist.

Everything here reads untrusted bytes: every problem is a :class:`TarError` naming
the entry (its raw path) and the offset of its header in the tar.
"""

from __future__ import annotations

import enum
import re
import stat
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from composefsd.image.transforms import relink
from composefsd.image.tree import Node, TreeError, new_directory

__all__ = [
    "BLOCK",
    "EXTENSION_MAX",
    "INLINE_MAX",
    "EntryKind",
    "LayerTree",
    "TarEntry",
    "TarError",
    "checksum_ok",
    "entry_node",
    "header_number",
    "iter_entries",
    "makedev",
    "padded",
    "pax_records",
]

BLOCK = 512
#: composefs-rs's INLINE_CONTENT_MAX_V0: larger regular files are objects.
INLINE_MAX = 64
#: The largest PAX or GNU long-name extension accepted: they are held in memory.
EXTENSION_MAX = 1 << 20
_NAME_MAX = 255
_U32 = (1 << 32) - 1
#: mode, uid, gid, size and mtime as most tar writers fill them: zero-padded
#: octal, each ended by one NUL; they read as :func:`header_number` reads them.
_PLAIN_NUMBERS = re.compile(rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0")
_ZERO_BLOCK = bytes(BLOCK)
_WHITEOUT = b".wh."
_OPAQUE = b".wh..opq"


class TarError(ValueError):
    """A layer tar composefs-rs would not read, or one that would escape its tree."""

    def __init__(self, message: str, *, path: bytes | None = None, offset: int | None = None):
        where = []
        if path is not None:
            where.append(f"entry {path!r}")
        if offset is not None:
            where.append(f"header at offset {offset}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.path = path
        self.offset = offset


# -- header fields (shared with repository.ocilayer, which splits tars) ------------------------


def padded(size: int) -> int:
    """``size`` rounded up to whole tar blocks."""
    return -(-size // BLOCK) * BLOCK


def checksum_ok(header: bytes) -> bool:
    field_ = header[148:156].split(b"\0", 1)[0].strip(b" ")
    try:
        stored = int(field_, 8)
    except ValueError:
        return False
    # The low half of an Adler-32 is 1 + the byte sum mod 65521: the exact sum
    # for up to 256 bytes (at most 65281), and far faster than sum() over ints.
    view = memoryview(header)
    unsigned = (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2
    if len(header) > 512:
        unsigned = sum(header)
    # The checksum field itself counts as eight spaces.
    unsigned += 8 * 0x20 - sum(view[148:156])
    if stored == unsigned:
        return True
    # Some old tars summed signed chars.
    blanked = header[:148] + b" " * 8 + header[156:]
    return stored == unsigned - 256 * sum(1 for b in blanked if b > 127)


def header_number(data: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte's high bit)."""
    if data and data[0] & 0x80:
        if data[0] & 0x40:
            raise TarError(f"the {what} field is negative")
        return int.from_bytes(bytes([data[0] & 0x7F]) + data[1:], "big")
    text = data.partition(b"\0")[0]
    try:
        # int() itself ignores the spaces around the digits.
        return int(text, 8)
    except ValueError:
        text = text.strip(b" ")
        if not text:
            return 0
        raise TarError(f"the {what} field is not a number: {text[:32]!r}") from None


def pax_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """The ``<length> <key>=<value>\\n`` records of a PAX extension, in order."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        length_text = data[pos:space] if space > 0 else b""
        if not length_text.isdigit() or int(length_text) <= 0:
            raise TarError(f"the PAX extension has a bad record at byte {pos}")
        end = pos + int(length_text)
        if end > len(data) or end <= space or data[end - 1 : end] != b"\n":
            raise TarError(f"the PAX extension has a bad record at byte {pos}")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if eq:
            out.append((key, value))
        pos = end
    return out


# -- entries ---------------------------------------------------------------------------------


class EntryKind(enum.Enum):
    DIRECTORY = "directory"
    REGULAR = "regular"
    HARDLINK = "hardlink"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


_KINDS = {
    b"0": EntryKind.REGULAR,
    b"\0": EntryKind.REGULAR,
    b"7": EntryKind.REGULAR,
    b"1": EntryKind.HARDLINK,
    b"2": EntryKind.SYMLINK,
    b"3": EntryKind.CHAR,
    b"4": EntryKind.BLOCK,
    b"5": EntryKind.DIRECTORY,
    b"6": EntryKind.FIFO,
}
_FILE_TYPES = {
    EntryKind.DIRECTORY: stat.S_IFDIR,
    EntryKind.REGULAR: stat.S_IFREG,
    EntryKind.SYMLINK: stat.S_IFLNK,
    EntryKind.CHAR: stat.S_IFCHR,
    EntryKind.BLOCK: stat.S_IFBLK,
    EntryKind.FIFO: stat.S_IFIFO,
}


@dataclass(slots=True)
class TarEntry:
    """One entry, as composefs-rs's ``TarEntry``."""

    #: The raw path (for messages) and its components; no component: the root.
    path: bytes
    components: tuple[bytes, ...]
    kind: EntryKind
    #: The header's permission bits (``0o7777``; the file type comes from ``kind``).
    mode: int
    uid: int
    gid: int
    mtime_sec: int
    mtime_nsec: int
    #: Sorted by key, as composefs-rs keeps them.
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    size: int = 0
    #: A regular file's inline content (at most :data:`INLINE_MAX` bytes).
    content: bytes | None = None
    #: A regular file's object (hex digest), for larger files.
    object: str | None = None
    #: A symlink's or hardlink's target, as stored.
    link: bytes | None = None
    #: A hardlink's target, as components below the root.
    link_components: tuple[bytes, ...] = ()
    rdev: int = 0
    offset: int = 0


def _components(path: bytes, what: str, offset: int) -> tuple[bytes, ...]:
    """composefs-rs's ``make_absolute_path`` then Rust's ``Path::components``:
    empty and ``.`` components dropped; ``..`` refused, NUL refused."""
    if b"\0" in path:
        raise TarError(f"the {what} contains a NUL byte", path=path, offset=offset)
    split = path.split(b"/")
    if b"" in split or b"." in split:
        split = [p for p in split if p and p != b"."]
    parts = tuple(split)
    if b".." in parts:
        raise TarError(f"the {what} has a '..' component", path=path, offset=offset)
    if len(path) <= _NAME_MAX:
        return parts
    for part in parts:
        if len(part) > _NAME_MAX:
            raise TarError(
                f"the {what} has a component of {len(part)} bytes, at most {_NAME_MAX}",
                path=path,
                offset=offset,
            )
    return parts


def makedev(major: int, minor: int) -> int:
    """glibc's ``makedev``, as composefs-rs computes a device number, cut to the
    32 bits an EROFS inode keeps."""
    dev = ((major & 0xFFFFF000) << 32) | ((major & 0xFFF) << 8)
    dev |= ((minor & 0xFFFFFF00) << 12) | (minor & 0xFF)
    return dev & _U32


def _mtime_nsec(value: bytes) -> int:
    """composefs-rs's ``pax_mtime_nsec``: the fraction's first nine digits; 0 when
    there is none or it does not parse."""
    _, dot, frac = value.partition(b".")
    if not dot or not frac.isdigit():
        return 0
    return int(frac[:9].ljust(9, b"0"))


def _pax_int(value: bytes, what: str, path: bytes, offset: int, limit: int) -> int:
    number = int(value) if value.isdigit() and len(value) <= 20 else -1
    if not 0 <= number <= limit:
        raise TarError(
            f"the PAX {what} {value[:32]!r} is not a number up to {limit}",
            path=path,
            offset=offset,
        )
    return number


class _Chunks:
    """Exact reads over a layer splitstream's chunks (composefs-rs's
    ``SplitStreamReader``): inline bytes, or ``str`` for an external object."""

    def __init__(self, chunks: Iterable[bytes | str]) -> None:
        self._it = iter(chunks)
        self._buf = b""
        self._pos = 0
        self._external: str | None = None
        self.offset = 0

    def _next(self) -> bool:
        """Load the next chunk; False at the end."""
        chunk = next(self._it, None)
        if chunk is None:
            return False
        if isinstance(chunk, str):
            self._external = chunk
        else:
            self._buf, self._pos = chunk, 0
        return True

    def _inline_left(self) -> int:
        return len(self._buf) - self._pos

    def read_inline(self, n: int, what: str) -> bytes | None:
        """``n`` inline bytes; None at a clean end of the stream before any."""
        pos = self._pos
        if pos + n <= len(self._buf) and self._external is None:
            # Headers and small files sit in long inline chunks: one slice.
            self._pos = pos + n
            self.offset += n
            return self._buf[pos : pos + n]
        parts: list[bytes] = []
        have = 0
        while have < n:
            if self._external is not None:
                raise TarError(f"an object where {what} should be inline", offset=self.offset)
            if not self._inline_left():
                if not self._next():
                    if not have:
                        return None
                    raise TarError(f"the layer ends in {what}", offset=self.offset)
                continue
            take = min(n - have, self._inline_left())
            parts.append(self._buf[self._pos : self._pos + take])
            self._pos += take
            have += take
            self.offset += take
        return b"".join(parts)

    def skip_inline(self, n: int, what: str) -> None:
        while n:
            step = min(n, 1 << 20)
            if self.read_inline(step, what) is None:
                raise TarError(f"the layer ends in {what}", offset=self.offset)
            n -= step

    def read_data(self, size: int, keep: int, path: bytes | None) -> bytes | str | None:
        """An entry's data (``path``'s, None: an extension header's): its object's
        digest (then its padding, inline), or its inline bytes (all of them read;
        the first ``size`` returned if that is at most ``keep``, else None: hostile
        data is never held)."""
        stored = (size + BLOCK - 1) & -BLOCK
        if not stored:
            return b""
        pos = self._pos
        if size <= keep and pos + stored <= len(self._buf) and self._external is None:
            self._pos = pos + stored
            self.offset += stored
            return self._buf[pos : pos + size]
        while self._external is None and not self._inline_left():
            if not self._next():
                raise TarError(f"the layer ends in {_data(path)}", offset=self.offset)
        if self._external is not None:
            digest, self._external = self._external, None
            self.offset += size
            pad = stored - size
            if pad and not self._inline_left():
                self._next()
            pos = self._pos
            if pad and self._external is None and pos + pad <= len(self._buf):
                self._pos = pos + pad
                self.offset += pad
            elif pad:
                self.skip_inline(pad, f"the padding of {_data(path)}")
            return digest
        what = _data(path)
        if size > keep:
            self.skip_inline(stored, what)
            return None
        data = self.read_inline(stored, what)
        if data is None:
            raise TarError(f"the layer ends in {what}", offset=self.offset)
        return data[:size]


def _data(path: bytes | None) -> str:
    """What :meth:`_Chunks.read_data` reads, for messages."""
    return "an extension header" if path is None else f"the data of {path!r}"


@dataclass(slots=True)
class _Pending:
    """What extension headers said about the next entry."""

    pax: dict[bytes, bytes] = field(default_factory=dict)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    long_name: bytes | None = None
    long_link: bytes | None = None
    seen: bool = False


def _cstring(data: bytes) -> bytes:
    return data.split(b"\0", 1)[0]


def iter_entries(chunks: Iterable[bytes | str]) -> Iterator[TarEntry]:
    """The entries of a layer's splitstream chunks, in order. :class:`TarError` for
    anything composefs-rs would not read (and for ``..`` components)."""
    reader = _Chunks(chunks)
    pending = _Pending()
    while True:
        start = reader.offset
        header = reader.read_inline(BLOCK, "a header")
        if header is None:
            if pending.seen:
                raise TarError("the layer ends after an extension header", offset=start)
            return
        if header == _ZERO_BLOCK:
            return
        if not checksum_ok(header):
            raise TarError("bad header checksum", offset=start)
        flag = header[156:157]
        plain = _PLAIN_NUMBERS.match(header, 100)
        if plain is not None:
            size = int(plain[4], 8)
        else:
            try:
                size = header_number(header[124:136], "size")
            except TarError as exc:
                raise TarError(str(exc), offset=start) from None
        if flag in (b"x", b"g", b"L", b"K"):
            if size > EXTENSION_MAX:
                raise TarError(
                    f"an extension header of {size} bytes, at most {EXTENSION_MAX}",
                    offset=start,
                )
            data = reader.read_data(size, EXTENSION_MAX, None)
            if not isinstance(data, bytes):
                raise TarError("an extension header stored as an object", offset=start)
            if flag == b"g":
                continue
            pending.seen = True
            if flag == b"L":
                pending.long_name = _cstring(data)
            elif flag == b"K":
                pending.long_link = _cstring(data)
            else:
                try:
                    records = pax_records(data)
                except TarError as exc:
                    raise TarError(str(exc), offset=start) from None
                for key, value in records:
                    if key.startswith(b"SCHILY.xattr."):
                        pending.xattrs[key.removeprefix(b"SCHILY.xattr.")] = value
                    else:
                        pending.pax[key] = value
            continue
        yield _entry(reader, header, flag, size, plain, pending, start)
        if pending.seen:
            pending = _Pending()


def _entry(
    reader: _Chunks,
    header: bytes,
    flag: bytes,
    size: int,
    plain: re.Match[bytes] | None,
    pending: _Pending,
    start: int,
) -> TarEntry:
    pax = pending.pax
    if b"path" in pax:
        path = pax[b"path"]
    elif pending.long_name is not None:
        path = pending.long_name
    else:
        end = header.find(0, 0, 100)
        path = header[: end if end >= 0 else 100]
        if header[257:263] == b"ustar\0" and header[345] != 0:
            path = _cstring(header[345:500]) + b"/" + path
    if not path:
        raise TarError("an entry with an empty path", offset=start)
    kind = _KINDS.get(flag)
    if kind is None:
        if flag == b"S":
            raise TarError("sparse entries are not supported", path=path, offset=start)
        raise TarError(f"unsupported entry type {flag!r}", path=path, offset=start)
    if plain is not None:
        mode = int(plain[1], 8) & 0o7777
        uid = int(plain[2], 8)
        gid = int(plain[3], 8)
        mtime = int(plain[5], 8)
    else:
        try:
            mode = header_number(header[100:108], "mode") & 0o7777
            uid = header_number(header[108:116], "uid")
            gid = header_number(header[116:124], "gid")
            mtime = header_number(header[136:148], "mtime")
        except TarError as exc:
            raise TarError(str(exc), path=path, offset=start) from None
    nsec = 0
    if pax:
        if b"size" in pax:
            size = _pax_int(pax[b"size"], "size", path, start, 1 << 63)
        if b"uid" in pax:
            uid = _pax_int(pax[b"uid"], "uid", path, start, _U32)
        if b"gid" in pax:
            gid = _pax_int(pax[b"gid"], "gid", path, start, _U32)
        if b"mtime" in pax:
            value = pax[b"mtime"]
            seconds = value.partition(b".")[0]
            mtime = _pax_int(seconds, "mtime", path, start, (1 << 63) - 1)
            nsec = _mtime_nsec(value)
    if uid > _U32 or gid > _U32:
        raise TarError("a uid or gid beyond 32 bits", path=path, offset=start)
    if mtime > (1 << 63) - 1:
        raise TarError("an mtime beyond 64 bits", path=path, offset=start)
    entry = TarEntry(
        path,
        _components(path, "path", start),
        kind,
        mode,
        uid,
        gid,
        mtime,
        nsec,
        sorted(pending.xattrs.items()) if pending.xattrs else [],
        size,
        offset=start,
    )
    data = reader.read_data(size, INLINE_MAX if kind is EntryKind.REGULAR else 0, path)
    if isinstance(data, str):
        if kind is not EntryKind.REGULAR:
            raise TarError(f"a {kind.value} entry stored as an object", path=path, offset=start)
        if size <= INLINE_MAX:
            raise TarError(f"a {size}-byte file stored as an object", path=path, offset=start)
        entry.object = data
        return entry
    if kind is EntryKind.REGULAR:
        if data is None:
            raise TarError(f"a {size}-byte file stored inline", path=path, offset=start)
        entry.content = data
        return entry
    if b"linkpath" in pax:
        link: bytes = pax[b"linkpath"]
    elif pending.long_link is not None:
        link = pending.long_link
    else:
        link = _cstring(header[157:257])
    if kind is EntryKind.SYMLINK:
        if not link or b"\0" in link:
            raise TarError("a symlink with an empty or NUL-holding target", path=path, offset=start)
        entry.link = link
    elif kind is EntryKind.HARDLINK:
        entry.link = link
        entry.link_components = _components(link, "hardlink target", start)
        if not entry.link_components:
            raise TarError("a hardlink to the root directory", path=path, offset=start)
    elif kind in (EntryKind.CHAR, EntryKind.BLOCK):
        if header[257:262] != b"ustar":
            raise TarError("a device entry without device numbers", path=path, offset=start)
        try:
            major = header_number(header[329:337], "devmajor")
            minor = header_number(header[337:345], "devminor")
        except TarError as exc:
            raise TarError(str(exc), path=path, offset=start) from None
        entry.rdev = makedev(major, minor)
    return entry


# -- applying layers -------------------------------------------------------------------------


def _set_stat(node: Node, entry: TarEntry) -> None:
    node.uid = entry.uid
    node.gid = entry.gid
    node.mtime_sec = entry.mtime_sec
    node.mtime_nsec = entry.mtime_nsec
    node.xattrs = []
    node.xattr_estimate = 0
    try:
        for key, value in entry.xattrs:
            node.set_xattr(key, value)
    except TreeError as exc:
        raise TarError(
            f"bad xattrs: {exc.strerror}", path=entry.path, offset=entry.offset
        ) from None


def entry_node(entry: TarEntry) -> Node:
    """The inode a directory or leaf entry makes (not a hardlink's: it has none).
    A regular file that is an object gets payload ``XX/rest`` and its digest."""
    kind = entry.kind
    if kind is EntryKind.HARDLINK:
        raise TarError("a hardlink makes no inode", path=entry.path, offset=entry.offset)
    node = Node(
        _FILE_TYPES[kind] | entry.mode,
        uid=entry.uid,
        gid=entry.gid,
        mtime_sec=entry.mtime_sec,
        mtime_nsec=entry.mtime_nsec,
    )
    if entry.xattrs:
        _set_stat(node, entry)
    if kind is EntryKind.REGULAR:
        if entry.object is not None:
            node.payload = f"{entry.object[:2]}/{entry.object[2:]}".encode()
            node.digest = bytes.fromhex(entry.object)
            node.size = entry.size
        else:
            node.set_content(entry.content)
    elif kind is EntryKind.DIRECTORY:
        node.children = {}
    elif kind is EntryKind.SYMLINK:
        assert entry.link is not None
        node.payload = entry.link
        node.size = len(entry.link)
    elif kind is EntryKind.CHAR or kind is EntryKind.BLOCK:
        node.rdev = entry.rdev
    return node


class LayerTree:
    """A tree that layers are applied to, entry by entry, as composefs-rs does.

    Regular files that are objects get ``payload`` ``XX/rest`` and their digest;
    hardlinks are entries whose ``link_to`` is the inode; call :meth:`finish` for
    the tree with every inode's first path the inode (``nlink`` counted).
    """

    def __init__(self) -> None:
        # composefs-rs starts from Stat::uninitialized(); the OCI transform always
        # replaces the root's metadata with /usr's.
        self.root = new_directory(stat.S_IFDIR)
        # The last parent directory found: tars list a directory's entries
        # together. It stays in the tree: only an entry of its own parent can
        # remove or replace it, and that parent is then the one remembered.
        self._parent_parts: tuple[bytes, ...] | None = None
        self._parent = self.root
        # Without hardlinks every inode has one path and nlink 1 already: nothing
        # for finish() to settle.
        self._hardlinks = False

    def _directory(self, parts: tuple[bytes, ...], entry: TarEntry, what: str) -> Node:
        node = self.root
        for name in parts:
            assert node.children is not None
            child = node.children.get(name)
            if child is None:
                raise TarError(
                    f"{what} {name!r} does not exist", path=entry.path, offset=entry.offset
                )
            if child.link_to is not None or not child.is_dir:
                raise TarError(
                    f"{what} {name!r} is not a directory", path=entry.path, offset=entry.offset
                )
            node = child
        return node

    def apply(self, entry: TarEntry) -> None:
        """Apply one entry of the layer being read."""
        if not entry.components:
            if entry.kind is not EntryKind.DIRECTORY:
                raise TarError("the root must be a directory", path=entry.path, offset=entry.offset)
            self.root.mode = stat.S_IFDIR | entry.mode
            _set_stat(self.root, entry)
            return
        if entry.kind is EntryKind.HARDLINK:
            parent = self._directory(
                entry.link_components[:-1], entry, "the directory of its hardlink target,"
            )
            assert parent.children is not None
            found = parent.children.get(entry.link_components[-1])
            if found is None:
                raise TarError(
                    "its hardlink target does not exist", path=entry.path, offset=entry.offset
                )
            if found.link_to is None and found.is_dir:
                raise TarError(
                    "its hardlink target is a directory", path=entry.path, offset=entry.offset
                )
            target = found.target()
            node = Node(mode=target.mode, link_to=target)
            self._hardlinks = True
        else:
            node = entry_node(entry)
        parent_parts = entry.components[:-1]
        if parent_parts == self._parent_parts:
            directory = self._parent
        else:
            directory = self._directory(parent_parts, entry, "its parent")
            self._parent_parts, self._parent = parent_parts, directory
        children = directory.children
        assert children is not None
        name = entry.components[-1]
        if name.startswith(_WHITEOUT):
            hidden = name.removeprefix(_WHITEOUT)
            if hidden == _OPAQUE:
                children.clear()
            else:
                children.pop(hidden, None)
            return
        old = children.get(name)
        if node.is_dir and old is not None and old.link_to is None and old.is_dir:
            old.mode = node.mode
            _set_stat(old, entry)
            return
        children[name] = node

    def apply_layer(self, chunks: Iterable[bytes | str]) -> None:
        for entry in iter_entries(chunks):
            self.apply(entry)

    def finish(self) -> Node:
        """The tree, hardlinks settled (the first path of an inode in image order
        holds it; ``nlink`` counts its paths)."""
        if self._hardlinks:
            relink(self.root)
        return self.root
