"""composefs-dump(5) parser, faithful to C ``mkcomposefs --from-file`` 1.0.8.

Acceptance, rejection and the resulting tree match C exactly, including its
quirks (documented in the reference notes, section 8.2): integer fields parsed
like ``strtoull``, GID/RDEV errors ignored when UID != 0, NUL-truncated
paths/payloads/keys, hardlink fixups in reverse order.
Error messages are C's, with the line number appended.

Built for speed (a 137,000-line dump must parse in well under a second): the
common case takes a fast path, with a cache of directory paths so that parent
lookup is one dict access instead of a walk.
"""

from __future__ import annotations

import binascii
import operator
import stat
from binascii import unhexlify
from collections.abc import Iterable
from itertools import chain

from .escape import UnescapeError, unescape
from .tree import INLINE_CONTENT_MAX, PATH_MAX, VALID_FILE_TYPES, Node, TreeError, gc_paused

__all__ = ["DumpfileError", "parse_dumpfile", "parse_dumpfile_lines"]

_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_S_IFLNK = stat.S_IFLNK
_S_IFCHR = stat.S_IFCHR
_S_IFBLK = stat.S_IFBLK
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
_C_SPACE = b" \t\n\v\f\r"


class DumpfileError(ValueError):
    """A dumpfile was rejected. ``message`` is C's text; ``lineno`` is 1-based (0: none)."""

    def __init__(self, message: str, lineno: int = 0) -> None:
        self.message = message
        self.lineno = lineno
        super().__init__(f"{message} (line {lineno})" if lineno else message)


class _LineError(ValueError):
    """Internal: carries a C message up to the line loop, which adds the line number."""

    def __init__(self, message: str) -> None:
        self.message = message


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstr(value: bytes) -> bytes:
    """C string view of an unescaped field: everything before the first NUL."""
    nul = value.find(b"\0")
    return value if nul < 0 else value[:nul]


def _strtoull(s: bytes, base: int) -> tuple[int, bool]:
    """C ``parse_int_field``: ``strtoull`` then ``*s == 0 || *endptr != 0`` means failure.

    Returns (value, failed); a failed parse has value 0, as in C.
    """
    if s.isdigit():
        try:
            return min(int(s, base), _U64), False
        except ValueError:
            pass  # a digit outside the base: fall through to the exact emulation
    i = 0
    n = len(s)
    while i < n and s[i] in _C_SPACE:
        i += 1
    neg = False
    if i < n and s[i] in b"+-":
        neg = s[i] == 0x2D
        i += 1
    start = i
    value = 0
    while i < n:
        d = s[i] - 0x30
        if not 0 <= d < base:
            break
        value = value * base + d
        i += 1
    if i == start:
        return 0, True  # no conversion: endptr is the start of the string
    if i != n:
        return 0, True
    if value > _U64:
        value = _U64
    elif neg:
        value = -value & _U64
    return value, False


def _int_error(raw: bytes) -> str:
    return f"Invalid integer {_text(raw)}"


def _lookup_parent(root: Node, path: bytes) -> tuple[Node | None, bytes]:
    """C ``lookup_parent_path``: walk all but the last component, skipping repeated ``/``."""
    node = root
    i = 0
    n = len(path)
    while True:
        while i < n and path[i] == 0x2F:
            i += 1
        j = path.find(b"/", i)
        if j < 0:
            return node, path[i:]
        children = node.children
        child = children.get(path[i:j]) if children else None
        if child is None:
            return None, b""
        node = child
        i = j


def _lookup_path(root: Node, path: bytes) -> Node | None:
    """C ``lookup_path``: every component, skipping empty ones."""
    node = root
    for comp in path.split(b"/"):
        if not comp:
            continue
        children = node.children
        child = children.get(comp) if children else None
        if child is None:
            return None
        node = child
    return node


def _follow_cycles(node: Node) -> bool:
    """True when the link chain starting at ``node`` loops.

    C's ``follow_links`` only notices a loop back to its start and spins forever
    on any other; both are refused here.
    """
    seen = {id(node)}
    cur = node.link_to
    while cur is not None:
        if id(cur) in seen:
            return True
        seen.add(id(cur))
        cur = cur.link_to
    return False


class _Parser:
    __slots__ = ("dircache", "fixups", "ints", "modes", "mtimes", "root", "strict")

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.root: Node | None = None
        # Parent lookup cache: exact path text of every directory added so far.
        self.dircache: dict[bytes, Node] = {}
        self.fixups: list[tuple[Node, bytes | None, int]] = []
        # Field text -> value caches for the fast path; only plain, valid text is cached.
        self.ints: dict[bytes, int] = {}
        self.mtimes: dict[bytes, tuple[int, int]] = {}
        # Octal mode text -> mode, for canonical texts of valid modes; learnt on use.
        self.modes: dict[bytes, int] = {}

    def add_node(self, path: bytes, node: Node) -> None:
        if path == b"/":
            if node.mode & _S_IFMT != _S_IFDIR:
                raise _LineError("Root must be a directory")
            if self.root is not None:
                raise _LineError("Can't have multiple roots")
            self.root = node
            self.dircache[b""] = node
            return
        root = self.root
        if root is None:
            raise _LineError("Root node not present")
        slash = path.rfind(b"/")
        parent = self.dircache.get(path[:slash]) if slash >= 0 else None
        if parent is not None:
            name = path[slash + 1 :]
        else:
            parent, name = _lookup_parent(root, path)
            if parent is None:
                raise _LineError(f"Parent directory missing for {_text(path)}")
            if parent.mode & _S_IFMT != _S_IFDIR:
                raise _LineError(f"Parent must be a directory for {_text(path)}")
        if name == b"." or name == b"..":
            raise _LineError(f"Invalid . or .. in path: {_text(path)}")
        children = parent.children
        if children is None or not name or len(name) > 255 or name in children:
            # C's "Path %s already exist" branch is unreachable: EEXIST is
            # caught by the bsearch before the add, giving this message.
            raise _LineError("Can't add child")
        children[name] = node
        if node.children is not None:
            self.dircache[path] = node

    def line(self, line: bytes, lineno: int) -> None:
        """A line the fast path of :func:`_parse` declines: C's rules to the letter."""
        nul = line.find(b"\0")
        if nul >= 0:
            raise _LineError(f"Invalid embedded NUL character at position {nul}")
        fields = line.split(b" ", 11)
        if len(fields) < 12:
            fields.extend([b""] * (12 - len(fields)))
        self.exact_line(fields, lineno)

    def learn(self, fields: list[bytes]) -> bool:
        """Cache the plain-number fields of this line; False if any needs C's exact rules."""
        f_mode = fields[2]
        if f_mode not in self.modes:
            # Only a valid mode's canonical octal text (no sign, no leading
            # zero, a known file type, permission bits only) takes the fast path.
            if not 0 < len(f_mode) <= 6 or f_mode.lstrip(b"01234567"):
                return False
            mode = int(f_mode, 8)
            if b"%o" % mode != f_mode or (mode & ~0o7777) not in VALID_FILE_TYPES:
                return False
            self.modes[f_mode] = mode
        ints = self.ints
        for f in (fields[1], fields[3], fields[4], fields[5], fields[6]):
            if f not in ints:
                if not (f.isdigit() and len(f) <= 19):
                    return False
                ints[f] = int(f)
        f_mtime = fields[7]
        if f_mtime not in self.mtimes:
            sec_s, dot, nsec_s = f_mtime.partition(b".")
            if not (dot and sec_s.isdigit() and nsec_s.isdigit()):
                return False
            if len(sec_s) > 19 or len(nsec_s) > 19:
                return False
            sec = int(sec_s)
            self.mtimes[f_mtime] = (sec - (1 << 64) if sec >> 63 else sec, int(nsec_s) & _U32)
        return True

    @staticmethod
    def digest(node: Node, text: bytes) -> None:
        # C's digest_to_raw stops at the first bad hex pair and leaves the rest
        # of its buffer uninitialised, so only text whose first 64 characters
        # are hex has a meaning. Where the digest is never used (anything but
        # an external regular file) C's output does not depend on it, so bad
        # text is ignored there, as C does; where it would be used, it is refused.
        if len(text) >= 64:
            try:
                node.digest = binascii.unhexlify(text[:64])
                return
            except binascii.Error:
                pass
        if node.mode & _S_IFMT == stat.S_IFREG and node.size > 0 and node.content is None:
            raise _LineError(f"Invalid digest {_text(text)}")

    def symlink(self, node: Node, payload: bytes | None, content: bytes | None, size: int) -> None:
        target = payload if payload is not None else b""
        if not target or len(target) >= PATH_MAX:
            raise _LineError("Invalid symlink")
        node.payload = target
        node.size = len(target)
        if self.strict:
            if size != len(target):
                raise _LineError(f"Invalid symlink size {len(target)}, must match size {size}")
            if content:
                raise _LineError("Symlink cannot have content")

    def xattrs(self, node: Node, rest: bytes) -> None:
        if len(rest) > 0xFFFF:
            raise _LineError("Too many xattrs")
        parts = rest.split(b" ")
        if rest[-1] == 0x20:
            parts.pop()
        for part in parts:
            eq = part.find(b"=")
            if eq < 0:
                raise _LineError("Missing = in xattr")
            key = _cstr(unescape(part[:eq]))
            value = unescape(part[eq + 1 :])
            try:
                node.set_xattr(key, value)
            except TreeError:
                raise _LineError("Can't set xattr") from None

    def exact_line(self, fields: list[bytes], lineno: int) -> None:
        """Every line the fast path declines: C's parsing rules to the letter."""
        (
            f_path,
            f_size,
            f_mode,
            f_nlink,
            f_uid,
            f_gid,
            f_rdev,
            f_mtime,
            f_payload,
            f_content,
            f_digest,
            rest,
        ) = fields

        path = _cstr(unescape(f_path))
        if not path:
            raise _LineError("Invalid empty path")

        is_hardlink = f_mode[:1] == b"@"
        if is_hardlink:
            f_mode = f_mode[1:]
        mode, bad = _strtoull(f_mode, 8)
        if bad:
            raise _LineError(_int_error(f_mode))
        mode &= _U32
        ftype = mode & _S_IFMT
        if ftype not in VALID_FILE_TYPES:
            raise _LineError(f"Invalid mode {mode:o}")

        node = Node(mode=mode)
        if ftype == _S_IFDIR:
            node.children = {}
        self.add_node(path, node)

        if is_hardlink:
            if ftype == _S_IFDIR:
                raise _LineError("Directories can't be hardlinked")
            target = None if f_payload == b"-" else _cstr(unescape(f_payload))
            self.fixups.append((node, target, lineno))
            return

        size, bad = _strtoull(f_size, 10)
        if bad:
            raise _LineError(_int_error(f_size))
        nlink, bad = _strtoull(f_nlink, 10)
        if bad:
            raise _LineError(_int_error(f_nlink))
        uid, bad = _strtoull(f_uid, 10)
        if bad:
            raise _LineError(_int_error(f_uid))
        # C checks UID instead of GID/RDEV here, so with UID != 0 a bad GID or
        # RDEV is silently 0.
        gid, bad = _strtoull(f_gid, 10)
        if bad and uid == 0:
            raise _LineError(_int_error(f_gid))
        rdev, bad = _strtoull(f_rdev, 10)
        if bad and uid == 0:
            raise _LineError(_int_error(f_rdev))
        sec_s, _, nsec_s = f_mtime.partition(b".")
        sec, bad = _strtoull(sec_s, 10)
        if bad:
            raise _LineError(_int_error(sec_s))
        nsec, bad = _strtoull(nsec_s, 10)
        if bad:
            raise _LineError(_int_error(nsec_s))

        payload = None if f_payload == b"-" else unescape(f_payload)
        content = None if f_content == b"-" else unescape(f_content)
        if content is not None and len(content) != size:
            raise _LineError(f"Invalid content size {len(content)}, must match size {size}")
        digest_text = None if f_digest == b"-" else _cstr(unescape(f_digest))

        node.nlink = nlink & _U32
        node.uid = uid & _U32
        node.gid = gid & _U32
        if ftype == _S_IFCHR or ftype == _S_IFBLK:
            node.rdev = rdev & _U32
        elif self.strict and rdev != 0:
            raise _LineError("Non-zero devnum on non-device")
        node.mtime_sec = sec - (1 << 64) if sec >> 63 else sec
        node.mtime_nsec = nsec & _U32

        if ftype == _S_IFLNK:
            self.symlink(node, _cstr(payload) if payload is not None else None, content, size)
        else:
            node.size = size
            if payload is not None:
                payload = _cstr(payload)
                if len(payload) >= PATH_MAX:
                    raise _LineError("Invalid payload")
                node.payload = payload
            if content is not None:
                if len(content) > INLINE_CONTENT_MAX:
                    raise _LineError(
                        f"Inline content size {len(content)} exceeds maximum {INLINE_CONTENT_MAX}"
                    )
                node.content = content or None
                node.size = len(content)

        if digest_text is not None:
            self.digest(node, digest_text)
        if rest:
            self.xattrs(node, rest)

    def resolve_hardlinks(self) -> None:
        root = self.root
        assert root is not None
        for node, target_path, lineno in reversed(self.fixups):
            if target_path is None:
                raise DumpfileError("No target path for the hardlink", lineno)
            target = _lookup_path(root, target_path)
            if target is None:
                raise DumpfileError(f"No target at {_text(target_path)} for hardlink", lineno)
            if target is node:
                raise DumpfileError(f"Self-referential hardlink {_text(target_path)}", lineno)
            # C refuses (lazily, by leaving the node unlinked) a link into a
            # chain that already loops; the loop itself fails the write.
            if not _follow_cycles(target):
                node.link_to = target


def parse_dumpfile(data: bytes, *, strict: bool = False) -> Node:
    """Parse a whole dumpfile into a tree; raises :class:`DumpfileError` like C would."""
    lines = data.split(b"\n")
    tail = lines.pop()  # text after the last newline: b"" when the input ends with one
    with gc_paused():
        return _parse(lines, tail, strict)


def parse_dumpfile_lines(lines: list[bytes], *, strict: bool = False) -> Node:
    """:func:`parse_dumpfile` of the lines ``readlines()`` gives (each ending in a
    newline but maybe the last), so that the input is never one large buffer.

    Freeing such a buffer (tens of MB, allocated by mmap) makes glibc raise its
    mmap threshold, after which the image writer's growing buffer lives on the
    heap and may be copied as it grows: reading by lines keeps the peak memory of
    ``mkcomposefs --from-file`` at C's.
    """
    tail = b""
    if lines and not lines[-1].endswith(b"\n"):
        tail = lines.pop()
    with gc_paused():
        return _parse(map(_chop, lines), tail, strict)


#: A line without its final newline.
_chop = operator.itemgetter(slice(None, -1))


def _parse(lines: Iterable[bytes], tail: bytes, strict: bool) -> Node:
    """Parse newline-free ``lines``, then ``tail`` (text after the last newline)."""
    parser = _Parser(strict)
    modes = parser.modes
    ints = parser.ints
    mtimes = parser.mtimes
    dircache = parser.dircache
    learn = parser.learn
    exact = parser.line
    add_node = parser.add_node
    u32 = _U32
    if tail and not strict:
        lines = chain(lines, (tail,))
    lineno = 0
    try:
        for lineno, line in enumerate(lines, 1):
            # The fast path, for a line without escapes or NULs whose numbers
            # are plain decimal and whose mode is valid (almost every line of
            # a real dump); anything else takes C's rules to the letter. One
            # loop, no call per line: this runs once per entry.
            # Bytes searched by their int value: ``b"x" in line`` first tries
            # the needle as an int and raises and clears a TypeError, a tenth
            # of the parse.
            if 0x5C in line or 0 in line:  # a backslash or a NUL
                exact(line, lineno)
                continue
            fields = line.split(b" ", 11)
            if len(fields) < 11:
                exact(line, lineno)
                continue
            mode = modes.get(fields[2])
            size = ints.get(fields[1])
            nlink = ints.get(fields[3])
            uid = ints.get(fields[4])
            gid = ints.get(fields[5])
            rdev = ints.get(fields[6])
            mtime = mtimes.get(fields[7])
            if (
                mode is None
                or size is None
                or nlink is None
                or uid is None
                or gid is None
                or rdev is None
                or mtime is None
            ):
                # A number or mode seen for the first time (one line in five
                # of a real dump: sizes and mtimes are mostly unique).
                if not learn(fields):
                    exact(line, lineno)
                    continue
                mode = modes[fields[2]]
                size = ints[fields[1]]
                nlink = ints[fields[3]]
                uid = ints[fields[4]]
                gid = ints[fields[5]]
                rdev = ints[fields[6]]
                mtime = mtimes[fields[7]]
            f_path = fields[0]
            if not f_path:
                raise _LineError("Invalid empty path")
            f_payload = fields[8]
            f_content = fields[9]
            payload = None if f_payload == b"-" else f_payload
            content = None if f_content == b"-" else f_content
            f_digest = fields[10]
            digest = None
            if f_digest != b"-" and len(f_digest) == 64:
                try:
                    digest = unhexlify(f_digest)
                except binascii.Error:
                    pass
            ftype = mode & _S_IFMT
            sec, nsec = mtime
            # Positional arguments only: a keyword argument makes the
            # constructor half again as slow.
            if ftype == _S_IFLNK:
                node = Node(mode, nlink & u32, uid & u32, gid & u32, 0, 0, sec, nsec)
            else:
                node = Node(
                    mode,
                    nlink & u32,
                    uid & u32,
                    gid & u32,
                    rdev & u32 if ftype == _S_IFCHR or ftype == _S_IFBLK else 0,
                    size,
                    sec,
                    nsec,
                    payload,
                    content or None,
                    digest,
                    [],
                    {} if ftype == _S_IFDIR else None,
                )
            # The common case of add_node: a known parent directory and a
            # new, ordinary name.
            slash = f_path.rfind(b"/")
            parent = dircache.get(f_path[:slash]) if slash >= 0 else None
            name = f_path[slash + 1 :]
            siblings = parent.children if parent is not None else None
            if (
                siblings is not None
                and name
                and len(name) <= 255
                and name not in siblings
                and name != b"."
                and name != b".."
            ):
                siblings[name] = node
                if ftype == _S_IFDIR:
                    dircache[f_path] = node
            else:
                add_node(f_path, node)
            # The checks C makes after adding the node, in C's order.
            if content is not None and len(content) != size:
                raise _LineError(f"Invalid content size {len(content)}, must match size {size}")
            if rdev and strict and ftype != _S_IFCHR and ftype != _S_IFBLK:
                raise _LineError("Non-zero devnum on non-device")
            if ftype == _S_IFLNK:
                parser.symlink(node, payload, content, size)
            else:
                if payload is not None and len(payload) >= PATH_MAX:
                    raise _LineError("Invalid payload")
                if content is not None and len(content) > INLINE_CONTENT_MAX:
                    raise _LineError(
                        f"Inline content size {len(content)} exceeds maximum {INLINE_CONTENT_MAX}"
                    )
            if digest is None and f_digest != b"-":
                parser.digest(node, f_digest)
            if len(fields) == 12 and fields[11]:
                parser.xattrs(node, fields[11])
        if tail and strict:
            lineno += 1
            raise _LineError("Missing trailing newline")
    except _LineError as e:
        raise DumpfileError(e.message, lineno) from None
    except UnescapeError as e:
        raise DumpfileError(str(e), lineno) from None
    except TreeError as e:  # pragma: no cover - every TreeError is mapped above
        raise DumpfileError(str(e), lineno) from None
    if parser.root is None:
        raise DumpfileError("No files in dump file")
    parser.resolve_hardlinks()
    return parser.root
