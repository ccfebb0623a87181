"""SELinux labelling of a tree from its own policy, as composefs-rs 0.9 does for boot.

The bootable transform (:func:`composefsd.image.transforms.apply_transform`) labels
every inode from the policy the tree itself carries, the way composefs-boot's
``selabel`` does:

* ``/etc/selinux/config`` names the policy (``SELINUXTYPE=``); no ``/etc/selinux``,
  no config or no such line means no policy, and then every ``security.selinux``
  xattr is removed;
* the policy is ``/etc/selinux/<type>/contexts/files/file_contexts`` (required),
  ``.local`` and ``.homedirs`` (lines ``REGEX [-TYPE] CONTEXT``, a later line wins),
  and the aliases in ``.subs`` and ``.subs_dist`` (``ALIAS ORIGINAL``: a path equal to
  ALIAS is looked up as ORIGINAL, and so are the paths below a directory alias);
* a path matches a line when ``^(REGEX)T$`` matches the path followed by its type
  character (``-`` file, ``d`` directory, ``l`` symlink, ``p`` fifo, ``s`` socket,
  ``b``/``c`` devices; no ``-TYPE`` matches any); its label becomes the line's
  context, or is removed for ``<<none>>`` or no match;
* a hardlinked inode is labelled at its first path (image order); a later path
  that gets another label is split off into an inode of its own (each such path
  its own copy).

Patterns are Python ``re`` bytes patterns with ``.`` matching newlines, where
composefs-rs compiles them with the Rust ``regex`` crate (Unicode off), falling back
to PCRE2: the file_contexts syntax (classes, groups, ``?*+{}``, alternation, escapes)
means the same in all three; a pattern Python cannot compile (POSIX ``[[:alpha:]]``
classes are not Python's, a mid-pattern ``(?i)`` neither) is an error naming its line.
All rules are one alternation tried in priority order, so a lookup is one
``fullmatch`` in C, not a Python loop over thousands of rules.
"""

from __future__ import annotations

import re
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from composefsd.image.transforms import (
    ContentReader,
    TransformError,
    TransformErrorKind,
    directory,
    directory_opt,
    inodes,
    set_xattrs,
)
from composefsd.image.tree import S_IFMT, Node

__all__ = ["POLICY_FILE_MAX", "Policy", "parse_config", "selabel"]

SELINUX = b"security.selinux"
#: The largest policy file read (Fedora's file_contexts is about 1 MiB).
POLICY_FILE_MAX = 64 << 20
#: The most rules a policy may have (Fedora has about 7000).
POLICY_RULES_MAX = 1_000_000
_TYPE_CODES = frozenset("bcdpls-")
_IFMT_CHAR = {
    stat.S_IFREG: b"-",
    stat.S_IFDIR: b"d",
    stat.S_IFLNK: b"l",
    stat.S_IFIFO: b"p",
    stat.S_IFSOCK: b"s",
    stat.S_IFBLK: b"b",
    stat.S_IFCHR: b"c",
}
_NONE = "<<none>>"
#: POSIX classes as the Rust regex crate reads them (ASCII), for a bracket expression.
_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7F",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1F\\x7F",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}


def _posix_classes(regex: str) -> str:
    """``regex`` with each ``[:name:]`` inside a bracket expression spelled out, as
    Python's ``re`` has no POSIX classes (it would read ``[[:alpha:]]`` as a set of
    ``[:alph`` followed by ``]``)."""
    if "[:" not in regex:
        return regex
    out: list[str] = []
    i, n, in_class = 0, len(regex), False
    while i < n:
        c = regex[i]
        if c == "\\":
            out.append(regex[i : i + 2])
            i += 2
            continue
        if not in_class:
            out.append(c)
            i += 1
            if c == "[":
                in_class = True
                if i < n and regex[i] == "^":
                    out.append("^")
                    i += 1
                if i < n and regex[i] == "]":
                    out.append("\\]")
                    i += 1
            continue
        if regex.startswith("[:", i):
            end = regex.find(":]", i + 2)
            spelled = _POSIX_CLASSES.get(regex[i + 2 : end]) if end > 0 else None
            if spelled is not None:
                out.append(spelled)
                i = end + 2
                continue
        if c == "]":
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _policy_error(message: str) -> TransformError:
    return TransformError(TransformErrorKind.POLICY, None, message)


def _lines(data: bytes, what: str) -> list[str]:
    """Rust ``BufRead::lines``: UTF-8 lines without their ``\\n`` / ``\\r\\n``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _policy_error(f"{what}: stream did not contain valid UTF-8") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def parse_config(data: bytes) -> str | None:
    """The policy name ``/etc/selinux/config`` gives (``SELINUXTYPE=``), or None."""
    for line in _lines(data, "SELinux config"):
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "selinuxtype":
            return value.strip()
    return None


@dataclass(slots=True)
class Policy:
    """A parsed file_contexts policy: rules in priority order, and aliases."""

    #: (pattern source, context) in priority order: the last line read comes first.
    rules: list[tuple[bytes, str]] = field(default_factory=list)
    aliases: dict[bytes, bytes] = field(default_factory=dict)
    #: How many groups each rule's pattern has, in the order of ``rules``.
    _groups: list[int] = field(default_factory=list)
    _combined: re.Pattern[bytes] | None = None
    _group_rule: dict[int, int] = field(default_factory=dict)

    def add_spec(self, data: bytes, name: str) -> None:
        """Add the lines of a file_contexts file (``name`` for messages)."""
        what = f"SELinux spec file {name}"
        added: list[tuple[bytes, str]] = []
        for line_nr, line in enumerate(_lines(data, what)):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) < 2:
                raise _policy_error(f"{what}: {line_nr}: missing separator after regex")
            regex, nxt = parts[0], parts[1]
            if nxt.startswith("-"):
                code = nxt[1:]
                if code not in _TYPE_CODES or len(code) != 1:
                    raise _policy_error(f"{what}: {line_nr}: invalid type code -{code}")
                if len(parts) < 3:
                    raise _policy_error(f"{what}: {line_nr}: missing context field")
                ifmt, context, rest = re.escape(code.encode()), parts[2], parts[3:]
            else:
                ifmt, context, rest = b".", nxt, parts[2:]
            if rest:
                raise _policy_error(f"{what}: {line_nr}: trailing data")
            source = b"(?:" + _posix_classes(regex).encode() + b")" + ifmt
            try:
                with warnings.catch_warnings():
                    # Python warns where it reads a pattern otherwise than it may be
                    # meant (a nested set): refuse rather than match differently.
                    warnings.simplefilter("error", FutureWarning)
                    compiled = re.compile(source, re.DOTALL)
            except (re.error, FutureWarning, OverflowError, RecursionError) as exc:
                raise _policy_error(f"{what}: {line_nr}: bad regex {regex!r}: {exc}") from exc
            added.append((source, context))
            self._groups.append(compiled.groups)
            if len(self._groups) > POLICY_RULES_MAX:
                raise _policy_error(f"{what}: more than {POLICY_RULES_MAX} rules")
        # Kept in reading order until finish() reverses them.
        self.rules.extend(added)

    def add_subs(self, data: bytes, name: str) -> None:
        """Add the aliases of a file_contexts.subs file."""
        what = f"SELinux subs file {name}"
        for line_nr, line in enumerate(_lines(data, what)):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) < 2:
                raise _policy_error(f"{what}: {line_nr}: missing original path")
            if len(parts) > 2:
                raise _policy_error(f"{what}: {line_nr}: trailing data")
            self.aliases[parts[0].encode()] = parts[1].encode()

    def finish(self) -> None:
        """Put the rules in priority order and build the matcher."""
        self.rules.reverse()
        self._groups.reverse()
        # One alternation tried in order finds the first rule that matches the whole
        # key, as composefs-rs's leftmost-first DFA does; the group of the rule that
        # matched closes last, so it is the match's lastindex.
        parts: list[bytes] = []
        group = 1
        self._group_rule = {}
        for i, (source, _context) in enumerate(self.rules):
            parts.append(b"(" + source + b")")
            self._group_rule[group] = i
            group += 1 + self._groups[i]
        try:
            self._combined = re.compile(b"|".join(parts), re.DOTALL) if parts else None
        except (re.error, OverflowError, RecursionError) as exc:
            raise _policy_error(f"SELinux policy: cannot combine its rules: {exc}") from exc

    def lookup(self, path: bytes, ifmt: bytes) -> str | None:
        """The label for ``path`` of type ``ifmt``, or None (no match, ``<<none>>``)."""
        key = path + ifmt
        if self._combined is None:
            return None
        m = self._combined.fullmatch(key)
        if m is None or m.lastindex is None:
            return None
        index = self._group_rule[m.lastindex]
        context = self.rules[index][1]
        return None if context == _NONE else context


def _file_opt(parent: Node, name: bytes) -> Node | None:
    """The regular file ``name`` in ``parent`` (None if absent; another type is an error)."""
    assert parent.children is not None
    entry = parent.children.get(name)
    if entry is None:
        return None
    target = entry.target()
    if target.is_dir:
        raise TransformError(TransformErrorKind.IS_A_DIRECTORY, name)
    if target.mode & S_IFMT != stat.S_IFREG:
        raise TransformError(TransformErrorKind.NOT_REGULAR, name)
    return target


def _read(node: Node, read_content: ContentReader, name: str) -> bytes:
    if node.size > POLICY_FILE_MAX:
        raise _policy_error(f"SELinux policy file {name} is larger than {POLICY_FILE_MAX} bytes")
    data = read_content(node)
    if len(data) > POLICY_FILE_MAX:
        raise _policy_error(f"SELinux policy file {name} is larger than {POLICY_FILE_MAX} bytes")
    return data


def _components(name: str) -> list[bytes]:
    """Rust ``Path::components`` of a policy name, refusing ``..`` and a leading ``.``."""
    raw = name.encode()
    if raw == b"." or raw.startswith(b"./") or b".." in raw.split(b"/"):
        raise TransformError(TransformErrorKind.INVALID_FILENAME, raw)
    return [c for c in raw.split(b"/") if c and c != b"."]


def load_policy(root: Node, read_content: ContentReader) -> Policy | None:
    """The tree's own policy, or None when it has none."""
    etc_selinux = directory_opt(root, [b"etc", b"selinux"])
    if etc_selinux is None:
        return None
    config = _file_opt(etc_selinux, b"config")
    if config is None:
        return None
    name = parse_config(_read(config, read_content, "config"))
    if name is None:
        return None
    files = directory(directory(etc_selinux, _components(name)), [b"contexts", b"files"])
    policy = Policy()
    for suffix in ("", ".local", ".homedirs"):
        filename = "file_contexts" + suffix
        node = _file_opt(files, filename.encode())
        if node is not None:
            policy.add_spec(_read(node, read_content, filename), filename)
        elif not suffix:
            raise _policy_error("SELinux policy is missing mandatory file_contexts file")
    for suffix in (".subs", ".subs_dist"):
        filename = "file_contexts" + suffix
        node = _file_opt(files, filename.encode())
        if node is not None:
            policy.add_subs(_read(node, read_content, filename), filename)
    policy.finish()
    return policy


def _join(path: bytes, name: bytes) -> bytes:
    """Rust ``PathBuf::push`` of a plain name."""
    return path + name if path.endswith(b"/") else path + b"/" + name


def _label(node: Node, label: str | None) -> None:
    kept = [(k, v) for k, v in node.xattrs if k != SELINUX]
    if label is not None:
        kept.append((SELINUX, label.encode()))
    if kept != node.xattrs:
        set_xattrs(node, kept)


def _clone(node: Node) -> Node:
    return Node(
        node.mode,
        1,
        node.uid,
        node.gid,
        node.rdev,
        node.size,
        node.mtime_sec,
        node.mtime_nsec,
        node.payload,
        node.content,
        node.digest,
        list(node.xattrs),
        None,
        None,
        node.xattr_estimate,
    )


def _relabel(root: Node, policy: Policy) -> None:
    """Label every inode in image order (depth first, names bytewise), as composefs-rs
    walks: a hardlinked inode's first path decides its label."""
    labeled: dict[int, str | None] = {}
    lookup: Callable[[bytes, bytes], str | None] = policy.lookup
    aliases = policy.aliases
    _label(root, lookup(b"/", b"d"))
    assert root.children is not None
    # (directory, its effective path, its names still to visit, reversed).
    stack: list[tuple[Node, bytes, list[bytes]]] = [
        (root, b"/", sorted(root.children, reverse=True))
    ]
    while stack:
        node, path, names = stack[-1]
        if not names:
            stack.pop()
            continue
        name = names.pop()
        children = node.children
        assert children is not None
        entry = children[name]
        child_path = _join(path, name)
        effective = aliases.get(child_path, child_path)
        if entry.link_to is None and entry.is_dir:
            _label(entry, lookup(effective, b"d"))
            assert entry.children is not None
            stack.append((entry, effective, sorted(entry.children, reverse=True)))
            continue
        target = entry.target()
        label = lookup(effective, _IFMT_CHAR.get(target.mode & S_IFMT, b"-"))
        key = id(target)
        if key in labeled and labeled[key] != label:
            # Another label than this inode's first path got: a copy of its own.
            clone = _clone(target)
            children[name] = clone
            _label(clone, label)
            continue
        labeled.setdefault(key, label)
        _label(target, label)


def selabel(root: Node, read_content: ContentReader) -> bool:
    """Label ``root`` from its own policy (True), or strip every ``security.selinux``
    when it has none (False)."""
    policy = load_policy(root, read_content)
    if policy is None:
        for node in inodes(root):
            if node.get_xattr(SELINUX) is not None:
                _label(node, None)
        return False
    _relabel(root, policy)
    return True
