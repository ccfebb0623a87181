"""Directory scanning into a composefs tree, and filling a digest store, like C mkcomposefs.

:func:`scan_directory` reproduces C ``mkcomposefs`` 1.0.8 on a directory SOURCE
(reference notes, sections 7.3, 7.4 and 9.2): the same nodes, so the writer
produces the same image bytes, the same error messages, and, with a digest
store, the same objects. :func:`scan_source` only walks a tree (no hashing) and
lists its regular files for an importer; the repository uses it.

Every access after the source itself is opened goes through file descriptors:

* the source is opened ``O_PATH | O_NOFOLLOW`` and, if a directory, reopened
  through that fd; each directory is opened from its parent's fd with
  ``O_NOFOLLOW`` and must be the inode its entry was stat'ed as; each entry is
  opened ``O_PATH | O_NOFOLLOW`` from its directory's fd, and its stat, xattrs
  and symlink target are read from that fd (``/proc/self/fd/N``, as C does for
  long paths), so they all belong to one inode, whatever is renamed meanwhile;
* regular files are hashed and copied by relative path beneath the source's fd,
  never following a symlink, and only if they are still the inode scanned
  (:mod:`composefsd.sources.beneath`): someone who can write the tree cannot make us read
  a file outside it (C reopens by full path, and would). A file that changed
  after it was scanned fails with a message naming it.

How it differs from C, none of which changes the image or the store of a tree
that holds still:

* Files are hashed while the tree is still being scanned, in ``threads`` lanes:
  in-process for small trees, in worker processes once a scan has queued
  ``_PROCESS_MIN_BYTES`` (per-block fs-verity hashing is GIL-bound in threads;
  see :class:`_Pipeline`). C scans first, then hashes. Copying into the store
  starts once every digest is known, by ``threads`` threads, as in C; a failed
  scan or digest leaves the store untouched, also as in C.
* ``--skip-devices`` decides by the ``lstat`` mode where C looks at readdir's
  ``d_type``. They differ only on filesystems that report ``DT_UNKNOWN``, where C
  keeps device nodes it was asked to skip.
* Paths longer than ``PATH_MAX`` are scanned relative to directory fds, as C
  does; C then fails to hash files down there (ENAMETOOLONG, it opens them by
  full path), we hash them.
* A file that changed between scan and hash (another inode, size or mtime) is an
  error here; C reads whatever is there then.

:func:`scan_source` (the repository's scan) can share its walk with a worker
process (:class:`ScanSplit`): some top directories are opened by the scan, as it
opens every directory (``O_NOFOLLOW`` from their parent's fd, checked to be the
inode listed), and walked beneath those fds by a worker running the scan's own
code with this process's rights; the records it read of each directory (those
the fingerprint is made of) then become nodes here as if read here
(:meth:`_Walker.adopt`).

Opt-in beyond C, ``ScanOptions.preserve_hardlinks``: paths sharing one
``(st_dev, st_ino)`` become one inode. The first path in image order (depth
first, names sorted bytewise, as ``composefs-info dump`` lists them) is the
inode; the others become hardlink entries to it (``Node.link_to``), and the
inode's ``nlink`` is the number of its paths inside the scanned tree, which is
what a mounted image then reports (links outside the tree cannot be reached
through it). Files with a single path keep ``nlink`` 1, as in C. Without this
option every path is its own inode with ``nlink`` 1, exactly as C does it.

``ScanOptions.style = ReadStyle.COMPOSEFS_RS`` reads as composefs-rs 0.9
``read_filesystem`` does (what CreateImage in a repository uses), which differs
from C in exactly these ways, each visible in the golden
``dumpfile.*.no-propagate-usr-to-root.txt`` of its trees:

* hardlinks are kept for every file type: symlinks, fifos, devices and sockets
  with several paths are one inode too, not just regular files (t2-special
  ``/hl/dev-link``, ``/hl/fifo-link``, ``/hl/sym-link``);
* a file of at most 64 bytes is inline content and nothing else: no digest, so
  no ``trusted.overlay.metacopy`` digest and no payload (every small file);
* xattrs are in name order (composefs-rs keeps them in a sorted map; t3-xattrs
  ``/x/escapes``), which the image writer does anyway but a dump shows;
* a directory's size is 0 (the writer computes directory sizes itself).

Device numbers, modes, owners, nanosecond mtimes and xattr values are read the same
way. One deliberate difference: a path is only looked up among the others when
the filesystem reports ``st_nlink > 1`` for it (composefs-rs compares every path's
inode, which costs a table of every file), so a filesystem that reports 1 for a
linked file gives separate inodes here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import marshal
import os
import queue
import stat
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from composefsd import workerproc
from composefsd.credentials import Credentials
from composefsd.fsverity import c_compat_digest_bytes, digest_fd
from composefsd.image.tree import PATH_MAX, RECOMMENDED_INLINE_CONTENT_MAX, Node, gc_paused
from composefsd.objectlayout import join_store_path, object_payload
from composefsd.sources.base import ImportTask, ReadStyle, SourceTree
from composefsd.sources.beneath import BeneathOpener, ChangedError, FileKey, file_key
from composefsd.sources.objcopy import CopyState, store_object

__all__ = [
    "BareKey",
    "ScanError",
    "ScanOptions",
    "ScanProgress",
    "ScanSplit",
    "SourceScan",
    "default_threads",
    "fill_digest_store",
    "scan_directory",
    "scan_source",
    "source_tree",
]

log = logging.getLogger(__name__)

_U32 = 0xFFFFFFFF
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
_NS = 1_000_000_000
_S_IFMT = stat.S_IFMT
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_DEVICE_TYPES = frozenset((stat.S_IFBLK, stat.S_IFCHR))
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_PROGRESS_INTERVAL = 0.25
# Hashing work is handed out in batches of this many files, bytes of data or bytes of
# paths, whichever is hit first. The path limit keeps a worker request (and 256 replies
# of at most ~110 bytes) well inside one _PIPE_SIZE pipe buffer.
_BATCH_FILES = 256
_BATCH_BYTES = 32 << 20
_BATCH_PATH_BYTES = 128 << 10
_PIPE_SIZE = 1 << 20
# From this much queued data on, hashing moves to worker processes (see _Pipeline).
_PROCESS_MIN_BYTES = 128 << 20

Progress = Callable[["ScanProgress"], None]
#: Where the walk hands each regular file with data: (path relative to the source,
#: its node, its key).
_Sink = Callable[[bytes, Node, FileKey], None]


class ScanError(OSError):
    """A scan, digest or store failure; ``str()`` is C mkcomposefs's message without its prefix.

    ``errno`` is the failing call's errno and ``path`` (bytes, or None) the entry
    concerned, e.g. ``error accessing /src/dir/file: Permission denied``.
    """

    def __init__(self, err: int, message: str, path: bytes | None = None) -> None:
        super().__init__(err, message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


@dataclass(slots=True, frozen=True)
class ScanOptions:
    """What to read and compute; the defaults are C mkcomposefs's."""

    #: Every mtime becomes 0.0 (``--use-epoch``).
    use_epoch: bool = False
    #: Leave out block and character devices, whiteouts included (``--skip-devices``).
    skip_devices: bool = False
    #: Read no xattrs (``--skip-xattrs``).
    skip_xattrs: bool = False
    #: Read only ``user.*`` xattrs (``--user-xattrs``); with ``skip_xattrs`` it is EINVAL.
    user_xattrs: bool = False
    #: Parallel hashers (threads, or worker processes for big trees) and store-copying
    #: threads (``--threads``); 0 means one per CPU this process may run on.
    threads: int = 0
    #: Give every non-empty regular file its fs-verity digest and ``XX/rest`` payload.
    compute_digests: bool = True
    #: Inline regular files of 1..64 bytes as content.
    inline_small: bool = True
    #: Turn paths of one inode into hardlinks (not done by C; see the module notes).
    preserve_hardlinks: bool = False
    #: Read as C mkcomposefs or as composefs-rs does (:class:`ReadStyle`; the module
    #: notes list what differs). ``COMPOSEFS_RS`` implies ``preserve_hardlinks``.
    style: ReadStyle = ReadStyle.C

    def to_wire(self) -> tuple[bool | int | str, ...]:
        """The options as plain values, for a worker process (:meth:`from_wire`)."""
        return (
            self.use_epoch,
            self.skip_devices,
            self.skip_xattrs,
            self.user_xattrs,
            self.threads,
            self.compute_digests,
            self.inline_small,
            self.preserve_hardlinks,
            self.style.value,
        )

    @classmethod
    def from_wire(cls, wire: tuple[bool | int | str, ...]) -> ScanOptions:
        """The options :meth:`to_wire` gave; ValueError or TypeError for anything else."""
        epoch, devices, no_xattrs, user_xattrs, threads, compute, inline, links, style = wire
        if not isinstance(threads, int) or not isinstance(style, str):
            raise TypeError("scan options: wrong value types")
        return cls(
            use_epoch=bool(epoch),
            skip_devices=bool(devices),
            skip_xattrs=bool(no_xattrs),
            user_xattrs=bool(user_xattrs),
            threads=threads,
            compute_digests=bool(compute),
            inline_small=bool(inline),
            preserve_hardlinks=bool(links),
            style=ReadStyle(style),
        )


@dataclass(slots=True, frozen=True)
class ScanProgress:
    """A snapshot of a running scan, given to the progress callback a few times a second.

    ``phase`` is ``"scan"`` (walking the tree, while hashing has already started),
    then ``"digest"`` (hashing the rest), then ``"store"`` (copying into the digest
    store, if one was given).
    """

    phase: str
    entries: int
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    objects_stored: int = 0


@dataclass(slots=True)
class SourceScan:
    """What :func:`scan_source` found: the tree, and its regular files to import."""

    root: Node
    #: Regular files of at least one byte, in scan order, as (path relative to the
    #: source, node, key); a hardlinked inode once (``preserve_hardlinks``).
    files: list[tuple[bytes, Node, FileKey]] = field(default_factory=list)
    #: Nodes in the tree, hardlink entries and the root included.
    entries: int = 0
    #: Regular files (empty ones included, hardlink entries not).
    regular_files: int = 0
    #: With ``fingerprint=True``: the SHA-256 of everything the tree was made of
    #: (each entry's name, stat fields, link target and xattrs, directory by
    #: directory), so that equal fingerprints under equal options mean equal trees.
    fingerprint: bytes | None = None
    #: With ``known_bare``: the entries found without xattrs (:func:`scan_source`).
    bare: list[BareKey] = field(default_factory=list)


def default_threads() -> int:
    """C's default ``--threads``: the CPUs in this process's affinity mask."""
    return workerproc.cpus()


def _error(kind: str, path: bytes | None, err: int | None) -> ScanError:
    code = err or errno.EIO
    subject = f"{kind} {os.fsdecode(path)}" if path is not None else kind
    return ScanError(code, f"{subject}: {os.strerror(code)}", path)


def _access_error(path: bytes, exc: OSError) -> ScanError:
    return _error("error accessing", path, exc.errno)


def _changed_error(kind: str, exc: ChangedError) -> ScanError:
    return ScanError(exc.errno or errno.EAGAIN, f"{kind}: {exc}", exc.path)


def join_display(display: bytes, rel: bytes) -> bytes:
    """C ``maybe_join_path``: the source as named, then ``rel``; no separator is added
    after a trailing slash."""
    if not rel:
        return display
    return display + rel if display.endswith(b"/") else display + b"/" + rel


# -- phase 1: the tree ----------------------------------------------------------------------


class _DirFd:
    """A directory fd kept open until all of its subdirectories have been opened from it."""

    __slots__ = ("fd", "pending")

    def __init__(self, fd: int, pending: int) -> None:
        self.fd = fd
        self.pending = pending


#: A subdirectory waiting to be opened: its parent, name, node, path relative to the
#: source, and the (st_dev, st_ino) its entry had.
_Pending = tuple[_DirFd, bytes, Node, bytes, tuple[int, int]]


#: An inode and its change time: ``(st_dev, st_ino, st_ctime_ns)``.
BareKey = tuple[int, int, int]
#: Given a directory's fd and its subdirectories as :meth:`_Walker._read_dir` lists
#: them, returns those the walk is to scan itself (:meth:`_Walker.walk`).
_Delegate = Callable[
    [int, list[tuple[bytes, Node, bytes, tuple[int, int]]]],
    list[tuple[bytes, Node, bytes, tuple[int, int]]],
]
#: What of one entry goes into a scan's fingerprint (:func:`_record`): name, mode,
#: uid, gid, rdev, size, mtime (ns), nlink, dev, inode, ctime (ns), link target, xattrs.
_Record = tuple[
    bytes,
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    "bytes | None",
    "list[tuple[bytes, bytes]] | None",
]


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...


def _record(name: bytes, st: os.stat_result, node: Node) -> _Record:
    """Everything the tree takes from one entry: its name, the stat fields its node,
    the hardlink grouping and its file key are made of, its link target and xattrs
    as read (enough to make the node again: :meth:`_Walker.adopt`)."""
    return (
        name,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_rdev,
        st.st_size,
        st.st_mtime_ns,
        st.st_nlink,
        st.st_dev,
        st.st_ino,
        st.st_ctime_ns,
        node.payload,
        node.xattrs or None,
    )


class _Walker:
    """Builds the tree and hands each regular file of non-zero size to ``sink``.
    With ``fingerprint``, each directory's entries are fed to it as read
    (:func:`scan_source`)."""

    def __init__(
        self,
        options: ScanOptions,
        display: bytes,
        sink: _Sink,
        progress: Callable[[int], None] | None,
        max_entries: int | None = None,
        fingerprint: _Hash | None = None,
        bare: tuple[Container[BareKey], list[BareKey]] | None = None,
    ) -> None:
        self.options = options
        self.display = display
        self.sink = sink
        self.progress = progress
        self.max_entries = max_entries
        self.fingerprint = fingerprint
        self.bare = None if options.skip_xattrs else bare
        self.entries = 0
        self.regular_files = 0
        self.inodes: dict[tuple[int, int], list[tuple[Node, bytes, Node, bytes, FileKey]]] = {}
        self._next_report = time.monotonic() + _PROGRESS_INTERVAL
        self._open_fds: set[int] = set()
        self.rs_style = options.style is ReadStyle.COMPOSEFS_RS
        self.track_links = options.preserve_hardlinks or self.rs_style

    def full_path(self, rel: bytes) -> bytes:
        return join_display(self.display, rel)

    # Node construction mirrors C lcfs_load_node_from_file: stat, readlink, mtime, xattrs.
    def _node(self, st: os.stat_result) -> Node:
        mode = st.st_mode
        if self.options.use_epoch:
            sec = nsec = 0
        else:
            sec, nsec = divmod(st.st_mtime_ns, _NS)
        # Positional: this runs once per entry, and keywords cost noticeably more.
        node = Node(mode, 1, st.st_uid, st.st_gid, st.st_rdev & _U32, st.st_size, sec, nsec)
        if mode & 0o170000 == _S_IFDIR:
            node.children = {}
            if self.rs_style:
                node.size = 0
        return node

    def _set_target(self, node: Node, target: bytes, rel: bytes) -> None:
        if not target:
            raise _error("error accessing", self.full_path(rel), errno.EINVAL)
        if len(target) >= PATH_MAX:
            raise _error("error accessing", self.full_path(rel), errno.ENAMETOOLONG)
        node.payload = target
        node.size = len(target)

    def from_fd(self, fd: int, rel: bytes) -> tuple[Node, os.stat_result] | None:
        """The node of the inode an ``O_PATH | O_NOFOLLOW`` fd stands for; None for a
        device that ``skip_devices`` leaves out."""
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise _access_error(self.full_path(rel), exc) from exc
        if self.options.skip_devices and st.st_mode & 0o170000 in _DEVICE_TYPES and rel:
            return None
        node = self._node(st)
        proc = f"/proc/self/fd/{fd}"
        if st.st_mode & 0o170000 == _S_IFLNK:
            try:
                target = os.readlink(b"", dir_fd=fd)
            except OSError as exc:
                raise _access_error(self.full_path(rel), exc) from exc
            self._set_target(node, target, rel)
        if not self.options.skip_xattrs:
            try:
                names = os.listxattr(proc)
            except OSError as exc:
                raise _access_error(self.full_path(rel), exc) from exc
            if names:
                self._add_xattrs(node, names, proc, rel)
        return node, st

    def _entry(
        self, dir_fd: int, entry: os.DirEntry[str], name: bytes, rel: bytes
    ) -> tuple[Node, os.stat_result] | None:
        """The node of one directory entry (None: a device left out).

        Stat and link target come from the entry in its directory's fd. Xattrs are
        listed there too, and only an entry that has any is opened (``O_PATH``)
        to read them from the very inode stat'ed: most entries have none, and the
        open costs a third of the scan. (If the entry is swapped meanwhile, its
        xattrs are either read from the inode stat'ed or missing, never another
        file's.)
        """
        opts = self.options
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            raise _access_error(self.full_path(rel), exc) from exc
        ftype = st.st_mode & 0o170000
        if opts.skip_devices and ftype in _DEVICE_TYPES:
            return None
        node = self._node(st)
        if ftype == _S_IFLNK:
            # Whoever can swap the entry meanwhile could read its link target anyway.
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except OSError as exc:
                raise _access_error(self.full_path(rel), exc) from exc
            self._set_target(node, target, rel)
        if not opts.skip_xattrs:
            bare = self.bare
            if bare is not None:
                key = (st.st_dev, st.st_ino, st.st_ctime_ns)
                if key in bare[0]:
                    bare[1].append(key)
                    return node, st
            try:
                names = os.listxattr(b"/proc/self/fd/%d/%b" % (dir_fd, name), follow_symlinks=False)
            except OSError as exc:
                raise _access_error(self.full_path(rel), exc) from exc
            if names:
                self._xattrs_of(node, st, dir_fd, name, rel)
            elif bare is not None:
                bare[1].append(key)
        return node, st

    def _check_same(self, fd: int, ident: tuple[int, int], rel: bytes) -> None:
        """ScanError unless ``fd`` is the inode (st_dev, st_ino) ``ident`` the entry
        at ``rel`` was stat'ed as."""
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise _access_error(self.full_path(rel), exc) from exc
        if (st.st_dev, st.st_ino) != ident:
            path = self.full_path(rel)
            raise ScanError(
                errno.EAGAIN,
                f"error accessing {os.fsdecode(path)}: it was replaced while the tree "
                f"was being scanned",
                path,
            )

    def _xattrs_of(
        self, node: Node, st: os.stat_result, dir_fd: int, name: bytes, rel: bytes
    ) -> None:
        """Read the xattrs of the inode ``st`` describes, through an fd on it."""
        try:
            fd = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise _access_error(self.full_path(rel), exc) from exc
        try:
            self._check_same(fd, (st.st_dev, st.st_ino), rel)
            proc = f"/proc/self/fd/{fd}"
            try:
                names = os.listxattr(proc)
            except OSError as exc:
                raise _access_error(self.full_path(rel), exc) from exc
            self._add_xattrs(node, names, proc, rel)
        finally:
            os.close(fd)

    def _add_xattrs(self, node: Node, names: list[str], proc: str, rel: bytes) -> None:
        user_only = self.options.user_xattrs
        keys = [os.fsencode(k) for k in names]
        if self.rs_style:
            # composefs-rs keeps xattrs in a map sorted by name.
            keys.sort()
        for key in keys:
            if user_only and not key.startswith(b"user."):
                continue
            try:
                value = os.getxattr(proc, key)
                node.set_xattr(key, value)
            except OSError as exc:  # TreeError is an OSError too
                raise _access_error(self.full_path(rel), exc) from exc

    def open_source(self, src: bytes) -> tuple[Node, os.stat_result, int]:
        """The root node of ``src`` (C semantics: ``lstat``, so a symlink or a file is a
        one-node tree) and the fd its files are read through afterwards: the
        directory, or for a regular file an ``O_PATH`` fd on it, else -1. The caller
        closes it, and calls :meth:`walk` for a directory and :meth:`add_root_file`
        for a file."""
        try:
            fd = os.open(src, _PATH_FLAGS)
        except OSError as exc:
            raise _access_error(src, exc) from exc
        try:
            made = self.from_fd(fd, b"")
            assert made is not None
            root, st = made
            self.entries = 1
            ftype = st.st_mode & 0o170000
            if ftype == _S_IFREG:
                keep, fd = fd, -1
                return root, st, keep
            if ftype != _S_IFDIR:
                return root, st, -1
            try:
                return root, st, os.open(".", _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _access_error(src, exc) from exc
        finally:
            if fd >= 0:
                os.close(fd)

    def add_root_file(self, root: Node, st: os.stat_result) -> None:
        """The source is a regular file: it is the one file of the tree."""
        self.regular_files = 1
        if st.st_size > 0:
            self.sink(b"", root, file_key(st))

    def walk(
        self, root_fd: int, root: Node, rel: bytes = b"", delegate: _Delegate | None = None
    ) -> None:
        """Scan the directory open at ``root_fd`` (not closed), at ``rel`` in the tree,
        into ``root``'s children. ``delegate`` is given the subdirectories of that
        first directory and returns those this walk is to scan."""
        stack: list[_Pending] = []
        try:
            subdirs = self._read_dir(root_fd, root, rel)
            if delegate is not None:
                subdirs = delegate(root_fd, subdirs)
            self._push(stack, root_fd, subdirs, own=False)
            while stack:
                parent, name, node, rel, ident = stack.pop()
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
                except OSError as exc:
                    raise _access_error(self.full_path(rel), exc) from exc
                self._open_fds.add(fd)
                self._check_same(fd, ident, rel)
                parent.pending -= 1
                if parent.pending == 0 and parent.fd != root_fd:
                    self._close(parent.fd)
                subdirs = self._read_dir(fd, node, rel)
                self._push(stack, fd, subdirs, own=True)
        finally:
            for leftover in self._open_fds:
                os.close(leftover)
            self._open_fds.clear()

    def _close(self, fd: int) -> None:
        self._open_fds.discard(fd)
        os.close(fd)

    def _push(
        self,
        stack: list[_Pending],
        fd: int,
        subdirs: list[tuple[bytes, Node, bytes, tuple[int, int]]],
        *,
        own: bool,
    ) -> None:
        if not subdirs:
            if own:
                self._close(fd)
            return
        holder = _DirFd(fd, len(subdirs))
        stack.extend(
            (holder, name, node, rel, ident) for name, node, rel, ident in reversed(subdirs)
        )

    def _read_dir(
        self, fd: int, node: Node, rel: bytes
    ) -> list[tuple[bytes, Node, bytes, tuple[int, int]]]:
        children = node.children
        assert children is not None
        subdirs: list[tuple[bytes, Node, bytes, tuple[int, int]]] = []
        sink = self.sink
        track_links = self.track_links
        any_type = self.rs_style
        prefix = rel + b"/" if rel else b""
        fingerprint = self.fingerprint
        record: list[_Record] | None = None if fingerprint is None else []
        try:
            it = os.scandir(fd)
        except OSError as exc:
            raise _access_error(self.full_path(rel), exc) from exc
        with it:
            while True:
                try:
                    entry = next(it)
                except StopIteration:
                    break
                except OSError as exc:
                    raise _access_error(self.full_path(rel), exc) from exc
                # os.fsencode, without its call: this runs once per entry.
                name = entry.name.encode(_FS_ENCODING, _FS_ERRORS)
                child_rel = prefix + name
                made = self._entry(fd, entry, name, child_rel)
                if made is None:
                    continue
                child, st = made
                children[name] = child
                if record is not None:
                    # _record, inline.
                    record.append(
                        (
                            name,
                            st.st_mode,
                            st.st_uid,
                            st.st_gid,
                            st.st_rdev,
                            st.st_size,
                            st.st_mtime_ns,
                            st.st_nlink,
                            st.st_dev,
                            st.st_ino,
                            st.st_ctime_ns,
                            child.payload,
                            child.xattrs or None,
                        )
                    )
                ftype = st.st_mode & 0o170000
                if ftype == _S_IFDIR:
                    subdirs.append((name, child, child_rel, (st.st_dev, st.st_ino)))
                elif any_type and ftype != _S_IFREG:
                    # composefs-rs links paths of one inode whatever its type.
                    if st.st_nlink > 1:
                        key = (st.st_dev, st.st_ino)
                        self.inodes.setdefault(key, []).append(
                            (node, name, child, child_rel, file_key(st))
                        )
                elif ftype == _S_IFREG:
                    if track_links and st.st_nlink > 1:
                        # Handed on once its paths are known to be one inode (link_hardlinks).
                        key = (st.st_dev, st.st_ino)
                        self.inodes.setdefault(key, []).append(
                            (node, name, child, child_rel, file_key(st))
                        )
                    else:
                        self.regular_files += 1
                        if st.st_size > 0:
                            sink(child_rel, child, file_key(st))
                self.entries += 1
                if not self.entries & 1023:
                    self._tick()
        if fingerprint is not None:
            fingerprint.update(marshal.dumps((rel, record), 2))
        return subdirs

    def _tick(self) -> None:
        if self.max_entries is not None and self.entries > self.max_entries:
            raise ScanError(
                errno.E2BIG,
                f"{os.fsdecode(self.display)} has more than {self.max_entries} entries, "
                f"the most a tree may have here",
                self.display,
            )
        now = time.monotonic()
        if self.progress is not None and now >= self._next_report:
            self._next_report = now + _PROGRESS_INTERVAL
            self.progress(self.entries)

    def link_hardlinks(self) -> None:
        for group in self.inodes.values():
            # Image order: depth first, names bytewise; all paths share the source prefix.
            group.sort(key=lambda item: item[3].split(b"/"))
            _parent, _name, target, target_rel, key = group[0]
            if len(group) > 1:
                target.nlink = len(group)
                for parent, name, _node, _rel, _key in group[1:]:
                    assert parent.children is not None
                    parent.children[name] = Node(mode=target.mode, link_to=target)
            if target.mode & 0o170000 != _S_IFREG:
                continue
            self.regular_files += 1
            if target.size > 0:
                self.sink(target_rel, target, key)
        self.inodes.clear()

    def adopt(self, blobs: Sequence[bytes], roots: dict[bytes, Node]) -> None:
        """Add what a worker's walk of some subtrees read (:func:`_scan_subtrees`): each
        directory's fingerprint record as :meth:`_read_dir` made it, in the worker's
        walk order, beneath ``roots`` (their nodes, by path), exactly as if this
        walker had read them: the same nodes, files handed to the sink, hardlinks
        gathered, entries counted, and the records fed to the fingerprint."""
        opts = self.options
        epoch = opts.use_epoch
        rs_style = self.rs_style
        track_links = self.track_links
        sink = self.sink
        inodes = self.inodes
        fingerprint = self.fingerprint
        dirs = dict(roots)
        for blob in blobs:
            rel, record = marshal.loads(blob)
            if fingerprint is not None:
                fingerprint.update(blob)
            parent = dirs.get(rel)
            if parent is None or parent.children is None:
                raise _error("error accessing", self.full_path(rel), errno.EIO)
            children = parent.children
            prefix = rel + b"/"
            for (name, mode, uid, gid, rdev, size, mtime, nlink, dev, ino, ctime, target,
                 xattrs) in record:  # fmt: skip
                sec, nsec = (0, 0) if epoch else divmod(mtime, _NS)
                child = Node(mode, 1, uid, gid, rdev & _U32, size, sec, nsec)
                child_rel = prefix + name
                ftype = mode & 0o170000
                if ftype == _S_IFDIR:
                    child.children = {}
                    if rs_style:
                        child.size = 0
                    dirs[child_rel] = child
                elif target is not None:
                    self._set_target(child, target, child_rel)
                if xattrs:
                    for key, value in xattrs:
                        child.set_xattr(key, value)
                children[name] = child
                # As _read_dir places what it reads.
                if ftype == _S_IFDIR:
                    pass
                elif rs_style and ftype != _S_IFREG:
                    if nlink > 1:
                        inodes.setdefault((dev, ino), []).append(
                            (parent, name, child, child_rel, (dev, ino, size, mtime, ctime))
                        )
                elif ftype == _S_IFREG:
                    if track_links and nlink > 1:
                        inodes.setdefault((dev, ino), []).append(
                            (parent, name, child, child_rel, (dev, ino, size, mtime, ctime))
                        )
                    else:
                        self.regular_files += 1
                        if size > 0:
                            sink(child_rel, child, (dev, ino, size, mtime, ctime))
                self.entries += 1

    def finish(self) -> None:
        """After the walk: link hardlinks (if asked) and check the entry limit."""
        if self.track_links:
            self.link_hardlinks()
        if self.max_entries is not None and self.entries > self.max_entries:
            self._tick()


# -- phase 2: digests and the store ---------------------------------------------------------


def _read_all(fd: int) -> bytes:
    parts: list[bytes] = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


#: One hashing result: (digest, inline content, already in the store), or the failure:
#: its errno, or (errno, full path, what changed) for a file that is not the one scanned.
_HashResult = tuple[bytes | None, bytes | None, bool] | int | tuple[int, bytes, str]
#: A file to hash: (path relative to the source, lstat size, key).
_HashItem = tuple[bytes, int, FileKey]
#: A batch to hash: :func:`_hash_batch`'s arguments.
_HashRequest = tuple[list[_HashItem], bool, bool, "bytes | None", int, bytes, bool]


def _hash_one(
    opener: BeneathOpener,
    rel: bytes,
    size: int,
    key: FileKey,
    compute: bool,
    inline: bool,
    inline_digest: bool = True,
) -> tuple[bytes | None, bytes | None]:
    """C lcfs_node_set_from_content for one regular file whose lstat size is ``size`` > 0;
    without ``inline_digest`` (composefs-rs), an inlined file gets no digest."""
    small = inline and size <= RECOMMENDED_INLINE_CONTENT_MAX
    if not (compute or small):
        return None, None
    fd = opener.open(rel, key)
    try:
        if small:
            data = _read_all(fd)
            digest = c_compat_digest_bytes(data) if compute and inline_digest else None
            if len(data) < size:
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
            return digest, data[:size]
        return digest_fd(fd, threads=1, c_compat=True), None
    finally:
        os.close(fd)


def _hash_batch(
    items: list[_HashItem],
    compute: bool,
    inline: bool,
    store: bytes | None,
    root_fd: int,
    display: bytes,
    inline_digest: bool = True,
) -> list[_HashResult]:
    """Hash a batch of files beneath ``root_fd``; stops at the first failure, which
    ends the list.

    With a ``store``, also say whether each object to store is already there (the
    lstat C's copy phase would do; doing it here spares the copying threads a round
    of GIL-bound no-ops when the store is already full). Module-level and free of
    tree objects, so that worker processes can run it (``root_fd`` is inherited).
    """
    out: list[_HashResult] = []
    with BeneathOpener(root_fd, display) as opener:
        for rel, size, key in items:
            try:
                digest, content = _hash_one(opener, rel, size, key, compute, inline, inline_digest)
            except ChangedError as exc:
                out.append((exc.errno or errno.EAGAIN, exc.path, exc.reason))
                break
            except OSError as exc:
                out.append(exc.errno or errno.EIO)
                break
            present = False
            if store is not None and content is None and digest is not None:
                try:
                    os.lstat(join_store_path(store, object_payload(digest)))
                    present = True
                except OSError:
                    pass
            out.append((digest, content, present))
    return out


def _hash_request(
    request: _HashRequest,
) -> list[_HashResult]:
    """:func:`_hash_batch` of a request (:meth:`_Pipeline.request`), in a lane or a worker."""
    return _hash_batch(*request)


def _start_worker(root_fd: int) -> subprocess.Popen[bytes]:
    return workerproc.start("composefsd.sources.directory", "_worker_main", pass_fds=(root_fd,))


def _worker_main() -> None:
    """The worker process: hash batches from stdin, answer on stdout, until EOF."""
    workerproc.serve(_hash_request)


#: A file queued for hashing: (path relative to the source, node, key); key None for
#: files of a tree scanned earlier (:func:`fill_digest_store`).
_Item = tuple[bytes, Node, FileKey | None]


class _Pipeline:
    """Hash files in batches while the tree is still being scanned, then copy the ones to
    store with ``threads`` copying threads.

    Hashing runs in ``threads`` lanes (:class:`composefsd.workerproc.Pool`), in-process for small
    trees and in worker processes for large ones. Every file is opened beneath
    ``root_fd`` (:mod:`composefsd.sources.beneath`); ``display`` is the source as named,
    for messages.

    Errors are reported the way C's phase order would report them: a scan error wins
    over a digest error, which wins over a store error; so a digest failure stops
    hashing but not the scan, and a store failure stops copying but not hashing.
    """

    def __init__(
        self,
        *,
        root_fd: int,
        display: bytes,
        threads: int,
        compute: bool,
        inline: bool,
        store: bytes | None,
        progress: Progress | None,
        hash_files: bool = True,
        inline_digest: bool = True,
    ) -> None:
        self.root_fd = root_fd
        self.inline_digest = inline_digest
        self.display = display
        self.threads = max(1, threads)
        self.compute = compute
        self.inline = inline
        self.store = store
        self.progress = progress
        self.hash_files = hash_files
        self.entries = 0
        self.files_total = 0
        self.bytes_total = 0
        self.files_done = 0
        self.bytes_done = 0
        self.digest_error: ScanError | None = None
        self.store_error: ScanError | None = None
        self.internal_error: BaseException | None = None
        self.cancelled = False
        self.copy_state = CopyState()
        self.claimed: dict[bytes, object] = {}
        self.copy_queue: queue.SimpleQueue[tuple[bytes, FileKey | None, bytes] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._batch: list[_Item] = []
        self._batch_bytes = 0
        self._batch_path_bytes = 0
        self._queued_bytes = 0
        # fs-verity hashes every 4 KiB block with its own hashlib call, so hashing
        # threads spend most of their time holding the GIL and several of them do not
        # add up to more than one CPU. Once the scan has queued _PROCESS_MIN_BYTES of
        # data, each lane relays batches to a worker process instead, two in flight so
        # that the worker never waits for its lane to get the GIL. A worker that cannot
        # be started or dies leaves its lane hashing in-process.
        self.lanes: workerproc.Pool[list[_Item], _HashRequest, _HashResult] = workerproc.Pool(
            "cfs-hash",
            self.threads,
            request=self.request,
            local=lambda: contextlib.nullcontext(_hash_request),
            done=self.done,
            fail=self.fail,
            start=lambda: _start_worker(self.root_fd),
            skip=self._hashing_stopped,
            depth=2,
            pipe_size=_PIPE_SIZE,
            note="hashing",
        )
        self._copiers: list[threading.Thread] = []
        self.stored = [0] * self.threads

    # -- hashing ------------------------------------------------------------------------
    def add(self, rel: bytes, node: Node, key: FileKey | None) -> None:
        size = node.size
        self.files_total += 1
        self.bytes_total += size
        if not self.hash_files:
            self.files_done += 1
            self.bytes_done += size
            if self.store is not None and node.content is None and node.payload is not None:
                self.copy_queue.put((rel, key, node.payload))
            return
        self._batch.append((rel, node, key))
        self._batch_bytes += size
        self._batch_path_bytes += len(rel)
        if (
            len(self._batch) >= _BATCH_FILES
            or self._batch_bytes >= _BATCH_BYTES
            or self._batch_path_bytes >= _BATCH_PATH_BYTES
        ):
            self._submit()

    def request(self, batch: list[_Item]) -> _HashRequest:
        """The arguments of :func:`_hash_batch` for ``batch`` (also a worker's request)."""
        items: list[_HashItem] = []
        for rel, node, key in batch:
            assert key is not None
            items.append((rel, node.size, key))
        return (
            items,
            self.compute,
            self.inline,
            self.store,
            self.root_fd,
            self.display,
            self.inline_digest,
        )

    def _submit(self) -> None:
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes, self._batch_path_bytes = [], 0, 0
        if not batch or self._hashing_stopped():
            return
        self.lanes.start()
        self._queued_bytes += size
        if self.threads > 1 and self._queued_bytes >= _PROCESS_MIN_BYTES:
            self.lanes.processes = True
        self.lanes.put(batch)

    def _hashing_stopped(self) -> bool:
        return self.cancelled or self.digest_error is not None

    def done(self, batch: list[_Item], results: list[_HashResult]) -> None:
        """Apply a batch's results to its nodes (called from the lanes)."""
        store = self.store
        put = self.copy_queue.put
        files = size = 0
        for (rel, node, key), result in zip(batch, results, strict=False):
            if isinstance(result, int):
                self._digest_failed(_error("error computing digest", None, result))
                break
            if len(result) == 3 and isinstance(result[1], bytes) and isinstance(result[2], str):
                err, path, reason = result
                assert isinstance(err, int)
                self._digest_failed(
                    ScanError(err, f"error computing digest: {os.fsdecode(path)}: {reason}", path)
                )
                break
            digest, content, present = result
            assert digest is None or isinstance(digest, bytes)
            assert content is None or isinstance(content, bytes)
            if digest is not None:
                node.digest = digest
                node.payload = object_payload(digest)
            if content is not None:
                node.set_content(content)
            files += 1
            size += node.size
            if (
                store is not None
                and not present
                and node.content is None
                and node.payload is not None
            ):
                put((rel, key, node.payload))
        with self._lock:
            self.files_done += files
            self.bytes_done += size

    def _digest_failed(self, error: ScanError) -> None:
        with self._lock:
            if self.digest_error is None:
                self.digest_error = error

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.internal_error is None:
                self.internal_error = exc

    # -- copying ------------------------------------------------------------------------
    def _start_copying(self) -> None:
        if self.store is None:
            return
        for i in range(self.threads):
            t = threading.Thread(target=self._copy_worker, args=(i,), name=f"cfs-store-{i}")
            t.start()
            self._copiers.append(t)

    def _copy_worker(self, slot: int) -> None:
        store = self.store
        assert store is not None
        get = self.copy_queue.get
        claimed = self.claimed
        with BeneathOpener(self.root_fd, self.display) as opener:
            while True:
                item = get()
                if item is None:
                    return
                if self.cancelled or self.digest_error is not None or self.store_error is not None:
                    continue
                rel, key, payload = item
                if claimed.setdefault(payload, item) is not item:
                    continue
                try:
                    if self._copy_one(opener, rel, key, store, payload):
                        self.stored[slot] += 1
                except ChangedError as exc:
                    self._store_failed(_changed_error("cannot fill store", exc))
                except OSError as exc:
                    self._store_failed(_error("cannot fill store", None, exc.errno))

    def _copy_one(
        self, opener: BeneathOpener, rel: bytes, key: FileKey | None, store: bytes, payload: bytes
    ) -> bool:
        # C lstat()s the object first and copies only if it is missing: same here, so
        # that a full store does not even open the sources.
        try:
            os.lstat(join_store_path(store, payload))
            return False
        except OSError:
            pass
        fd = opener.open(rel, key)
        try:
            return store_object(fd, store, payload, self.copy_state)
        finally:
            os.close(fd)

    def _store_failed(self, error: ScanError) -> None:
        with self._lock:
            if self.store_error is None:
                self.store_error = error

    # -- control ------------------------------------------------------------------------
    def snapshot(self, phase: str) -> ScanProgress:
        return ScanProgress(
            phase,
            self.entries,
            files_total=self.files_total,
            files_done=self.files_done,
            bytes_total=self.bytes_total,
            bytes_done=self.bytes_done,
            objects_stored=sum(self.stored),
        )

    def finish(self) -> None:
        """The scan is complete: hash the rest, copy, and raise the first error, if any."""
        try:
            self._submit()
            self.lanes.close()
            self._join(self.lanes.lanes, "digest")
            # Copy only now, as C does: copying while hashing was measured to slow both
            # down (file creation and fsync contend with the hashers for the CPUs).
            if self.internal_error is None and self.digest_error is None:
                self._start_copying()
                for _ in self._copiers:
                    self.copy_queue.put(None)
                self._join(self._copiers, "store")
        except BaseException:
            self.abort()
            raise
        if self.internal_error is not None:
            raise self.internal_error
        if self.digest_error is not None:
            raise self.digest_error
        if self.store_error is not None:
            raise self.store_error
        if self.progress is not None:
            self.progress(self.snapshot("store" if self._copiers else "digest"))

    def _join(self, threads: Sequence[threading.Thread], phase: str) -> None:
        for t in threads:
            while t.is_alive():
                t.join(_PROGRESS_INTERVAL)
                if self.progress is not None and t.is_alive():
                    self.progress(self.snapshot(phase))

    def abort(self) -> None:
        """Stop every worker without doing more work; used when the scan failed."""
        self.cancelled = True
        self.lanes.cancel()
        self.lanes.close()
        for _ in self._copiers:
            self.copy_queue.put(None)
        for t in (*self.lanes.lanes, *self._copiers):
            if t.is_alive():
                t.join()


def scan_directory(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    options: ScanOptions | None = None,
    progress: Progress | None = None,
    *,
    digest_store: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None,
) -> Node:
    """Scan ``path`` into a tree, as C mkcomposefs does for a directory SOURCE.

    Regular files get their digests and payloads (and small ones their content) per
    ``options``; with ``digest_store``, files that are not inlined are copied into
    that store as they are hashed. ``progress`` is called from this thread a few
    times a second. Raises :class:`ScanError` with C's message: ``error accessing
    <path>: ...``, ``error computing digest: ...`` or ``cannot fill store: ...``.

    A non-directory ``path`` gives a one-node tree, as in C (the writer then
    rejects it with ENOTDIR).
    """
    opts = options or ScanOptions()
    src = os.fsencode(path)
    if opts.skip_xattrs and opts.user_xattrs:
        raise _error("error accessing", src, errno.EINVAL)
    pipeline = _Pipeline(
        root_fd=-1,
        display=src,
        threads=opts.threads or default_threads(),
        compute=opts.compute_digests,
        inline=opts.inline_small,
        store=os.fsencode(digest_store) if digest_store is not None else None,
        progress=progress,
        inline_digest=opts.style is ReadStyle.C,
    )

    def entries(count: int) -> None:
        pipeline.entries = count
        if progress is not None:
            progress(pipeline.snapshot("scan"))

    walker = _Walker(opts, src, pipeline.add, entries if progress is not None else None)
    root, st, root_fd = walker.open_source(src)
    pipeline.root_fd = root_fd
    try:
        # Hashing overlaps the scan; copying into the store waits for the scan to
        # succeed, so that a tree C would reject adds nothing to the store.
        try:
            if stat.S_ISDIR(st.st_mode):
                walker.walk(root_fd, root)
            elif stat.S_ISREG(st.st_mode):
                walker.add_root_file(root, st)
            walker.finish()
        except BaseException:
            pipeline.abort()
            raise
        pipeline.entries = walker.entries
        if progress is not None:
            progress(pipeline.snapshot("scan"))
        pipeline.finish()
    finally:
        if root_fd >= 0:
            os.close(root_fd)
    return root


# -- a second process for part of the walk --------------------------------------------------


@dataclass(slots=True, frozen=True)
class ScanSplit:
    """How :func:`scan_source` may hand part of a tree to a worker process, which
    walks it on another CPU while the scan walks the rest (:class:`_SubtreeScan`).

    ``weights``: how big each directory at the top of the tree is expected to be
    (files the last import found beneath it, say): the worker is given the top
    directories that make about ``share`` of the total. ``bare``: the known bare
    inodes (``known_bare``) as three arrays of native 64-bit integers, device,
    inode and change time, end to end, for the worker to take on trust as the scan
    does."""

    weights: dict[bytes, int]
    bare: bytes = b""
    share: float = 0.5


#: A request to a subtree worker: the scan options and source name, the subtrees as
#: (inherited directory fd, path), the known bare inodes (:attr:`ScanSplit.bare`), and
#: whether to list the bare inodes found.
_SubtreeRequest = tuple[tuple[bool | int | str, ...], bytes, list[tuple[int, bytes]], bytes, bool]


def _ignore_file(rel: bytes, node: Node, key: FileKey) -> None:
    pass


class _Records:
    """A worker walk's "fingerprint": keeps each directory's record as it is fed."""

    __slots__ = ("blobs",)

    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    def update(self, data: bytes, /) -> None:
        self.blobs.append(data)


def _scan_subtrees(request: _SubtreeRequest) -> tuple[object, ...]:
    """A subtree worker's walk: ``("ok", records, bare inodes)`` or ``("error", errno,
    message, path)`` for the scan's first error (:class:`ScanError`)."""
    wire, display, subtrees, bare_wire, list_bare = request
    options = ScanOptions.from_wire(wire)
    known: set[BareKey] = set()
    if bare_wire:
        third = len(bare_wire) // 3
        columns = [
            array(code, bare_wire[i * third : (i + 1) * third]) for i, code in enumerate("QQq")
        ]
        known = set(zip(*columns, strict=True))
    found: list[BareKey] = []
    records = _Records()
    roots = [Node(stat.S_IFDIR, children={}) for _subtree in subtrees]
    # Kept until the process ends: freeing the subtrees' nodes would only delay the
    # answer, and the worker ends without freeing them (_subtree_worker_main).
    _kept_alive.append(roots)
    walker = _Walker(
        options,
        display,
        _ignore_file,
        None,
        fingerprint=records,
        bare=(known, found) if list_bare else None,
    )
    try:
        # The records and nodes have no cycles; collecting would only walk them.
        with gc_paused():
            for (fd, rel), root in zip(subtrees, roots, strict=True):
                walker.walk(fd, root, rel)
    except ScanError as exc:
        return ("error", exc.errno, exc.message, exc.path)
    return ("ok", records.blobs, found)


#: What a subtree worker's walks built, never freed (:func:`_subtree_worker_main`).
_kept_alive: list[object] = []


def _subtree_worker_main() -> None:
    """The subtree worker: one walk per request, until EOF (:func:`_scan_subtrees`).

    It ends without the interpreter's teardown: each answer is written and flushed
    already, and freeing the walks' nodes one by one (a tenth of a second for half
    of /usr) would only keep the scan, which waits for its exit, waiting."""
    workerproc.serve(_scan_subtrees)
    os._exit(0)


class _SubtreeScan:
    """Some subtrees of a scan, walked by a worker process from a thread while the
    scan walks the rest (:meth:`_Walker.adopt` then takes what it read).

    The subtrees' directories are opened by the scan itself, from their parent's fd
    with ``O_NOFOLLOW`` and checked to be the inodes listed, as its own walk opens
    every directory; the worker inherits those fds and walks beneath them with the
    scan's own code and this process's rights (only a scan with the process's own
    rights is split). A worker that cannot be started or fails leaves
    :meth:`result` None: the scan then walks the subtrees itself, from the same fds.
    """

    def __init__(self, request: _SubtreeRequest) -> None:
        self._request = request
        self._result: tuple[object, ...] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cancelled = False
        self._lock = threading.Lock()
        # Set once the answer is in (or there will be none): the worker is reaped
        # after, while the scan goes on with the answer.
        self._answered = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cfs-scan", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._talk()
        finally:
            self._answered.set()

    def _talk(self) -> None:
        fds = tuple(fd for fd, _rel in self._request[2])
        with self._lock:
            if self._cancelled:
                return
            try:
                proc = workerproc.start(__name__, "_subtree_worker_main", pass_fds=fds, site=False)
            except OSError as exc:
                log.info("cannot start a scanning worker: %s", exc.strerror)
                return
            self._proc = proc
        try:
            workerproc.send(proc, self._request)
            assert proc.stdout is not None
            reply = workerproc.receive(proc.stdout)
            if isinstance(reply, tuple) and reply and reply[0] in ("ok", "error"):
                self._result = reply
            else:
                log.info("scanning worker: an answer of the wrong shape")
        except (OSError, EOFError, ValueError, TypeError) as exc:
            if not self._cancelled:
                log.info("scanning worker failed: %s", exc)
        finally:
            self._answered.set()
            workerproc.stop(proc, kill=self._result is None, timeout=10)

    def result(self) -> tuple[object, ...] | None:
        """The worker's answer, None if there is none; returns once it is read,
        while the worker may still be ending (its thread reaps it)."""
        self._answered.wait()
        return self._result

    def cancel(self) -> None:
        """Stop the worker without waiting for its walk (the scan failed)."""
        with self._lock:
            self._cancelled = True
            proc = self._proc
        if proc is not None:
            # Killed first: its thread, reading the answer, then sees the end and
            # stops (reaps) it.
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        self._thread.join()


def _split_names(
    subdirs: Sequence[tuple[bytes, Node, bytes, tuple[int, int]]], split: ScanSplit
) -> set[bytes]:
    """The top directories to give the worker: the biggest first, each that still
    fits in ``split.share`` of the whole."""
    weights = split.weights
    room = sum(weights.values()) * split.share
    names: set[bytes] = set()
    candidates = sorted(
        ((weights.get(name, 0), name) for name, _node, _rel, _ident in subdirs), reverse=True
    )
    for weight, name in candidates:
        if 0 < weight <= room:
            names.add(name)
            room -= weight
    return names


def scan_source(
    root_fd: int,
    display: bytes,
    options: ScanOptions | None = None,
    progress: Progress | None = None,
    *,
    max_entries: int | None = None,
    fingerprint: bool = False,
    known_bare: Container[BareKey] | None = None,
    split: ScanSplit | None = None,
) -> SourceScan:
    """Walk the directory open at ``root_fd`` (read, not closed) into a tree, without
    reading any file's data; list its regular files for an importer, which reads
    them beneath ``root_fd`` (:mod:`composefsd.sources.beneath`). With
    ``fingerprint``, also fingerprint the tree (:attr:`SourceScan.fingerprint`).

    With ``known_bare`` (inodes by :data:`BareKey` known to have no xattrs: a
    caller's promise, see :class:`composefsd.repository.digestcache.DigestCache`),
    entries found there are not asked for their xattrs, and every entry below the
    root found without xattrs, asked or not, is listed in :attr:`SourceScan.bare`.

    Of ``options`` only what selects metadata applies (``use_epoch``,
    ``skip_devices``, the xattr choices, ``preserve_hardlinks``). ``display`` names
    the source in messages. More than ``max_entries`` entries is a
    :class:`ScanError` (E2BIG). Errors are :class:`ScanError`, as for
    :func:`scan_directory`.

    With ``split`` (and no ``max_entries``), some top directories are walked by a
    worker process meanwhile (:class:`ScanSplit`, :class:`_SubtreeScan`): the same
    tree, files, bare inodes and fingerprint records, those of the worker's part
    after the others'. Only for a walk with this process's own rights.
    """
    opts = options or ScanOptions()
    if opts.skip_xattrs and opts.user_xattrs:
        raise _error("error accessing", display, errno.EINVAL)
    result = SourceScan(Node(stat.S_IFDIR))

    def add(rel: bytes, node: Node, key: FileKey) -> None:
        result.files.append((rel, node, key))

    def entries(count: int) -> None:
        if progress is not None:
            progress(ScanProgress("scan", count))

    hasher = hashlib.sha256() if fingerprint else None
    bare = None if known_bare is None else (known_bare, result.bare)
    walker = _Walker(opts, display, add, entries, max_entries, hasher, bare)
    made = walker.from_fd(root_fd, b"")
    assert made is not None
    root, st = made
    if not stat.S_ISDIR(st.st_mode):
        raise _error("error accessing", display, errno.ENOTDIR)
    if hasher is not None:
        hasher.update(marshal.dumps((opts.to_wire(), _record(b"", st, root)), 2))
    walker.entries = 1
    if split is None or max_entries is not None:
        walker.walk(root_fd, root)
    else:
        _split_walk(walker, root_fd, root, opts, display, split, known_bare is not None)
    walker.finish()
    if hasher is not None:
        result.fingerprint = hasher.digest()
    result.root = root
    result.entries = walker.entries
    result.regular_files = walker.regular_files
    if progress is not None:
        progress(ScanProgress("scan", walker.entries))
    return result


def _split_walk(
    walker: _Walker,
    root_fd: int,
    root: Node,
    options: ScanOptions,
    display: bytes,
    split: ScanSplit,
    list_bare: bool,
) -> None:
    """:meth:`_Walker.walk` of the tree, with the top directories :func:`_split_names`
    picks walked by a worker meanwhile (:class:`_SubtreeScan`)."""
    given: list[tuple[int, bytes, Node]] = []
    job: _SubtreeScan | None = None

    def delegate(
        fd: int, subdirs: list[tuple[bytes, Node, bytes, tuple[int, int]]]
    ) -> list[tuple[bytes, Node, bytes, tuple[int, int]]]:
        nonlocal job
        names = _split_names(subdirs, split)
        keep = []
        for item in subdirs:
            name, node, rel, ident = item
            if name not in names:
                keep.append(item)
                continue
            # Opened and checked as the walk opens every directory; a failure is left
            # to the walk, which reports it in its order.
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                keep.append(item)
                continue
            given.append((sub, rel, node))
            try:
                walker._check_same(sub, ident, rel)
            except ScanError:
                given.pop()
                os.close(sub)
                keep.append(item)
        if given:
            job = _SubtreeScan(
                (options.to_wire(), display, [(f, r) for f, r, _n in given], split.bare, list_bare)
            )
        return keep

    try:
        walker.walk(root_fd, root, delegate=delegate)
        if job is None:
            return
        reply = job.result()
        job = None
        if reply is None:
            for sub, rel, node in given:
                walker.walk(sub, node, rel)
            return
        if reply[0] == "error":
            _kind, err, message, path = reply
            assert isinstance(err, int) and isinstance(message, str)
            assert path is None or isinstance(path, bytes)
            raise ScanError(err, message, path)
        _kind, blobs, found = reply
        assert isinstance(blobs, list) and isinstance(found, list)
        walker.adopt(blobs, {rel: node for _f, rel, node in given})
        if walker.bare is not None:
            walker.bare[1].extend(found)
    finally:
        if job is not None:
            job.cancel()
        for sub, _rel, _node in given:
            os.close(sub)


def source_tree(
    scan: SourceScan, fd: int, display: bytes, credentials: Credentials | None = None
) -> SourceTree:
    """The :class:`~composefsd.sources.base.SourceTree` of a scan of the directory open
    at ``fd``: every regular file with data is imported (hardlinked inodes once),
    those of at most 64 bytes to be inlined."""
    imports: list[ImportTask] = []
    nodes: list[Node] = []
    for rel, node, key in scan.files:
        inline = node.size <= RECOMMENDED_INLINE_CONTENT_MAX
        imports.append(ImportTask(rel, node.size, None, inline, False, key))
        nodes.append(node)
    return SourceTree(
        scan.root,
        fd,
        display,
        imports,
        nodes,
        credentials,
        scan.regular_files,
        scan.entries,
        fingerprint=scan.fingerprint,
    )


def _open_for_reading(src: bytes) -> int:
    """The fd :class:`BeneathOpener` reads a tree scanned from ``src`` through (see
    :meth:`_Walker.open_source`)."""
    fd = os.open(src, _PATH_FLAGS)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            return os.open(".", _DIR_FLAGS, dir_fd=fd)
    except BaseException:
        os.close(fd)
        raise
    keep, fd = fd, -1
    return keep


def fill_digest_store(
    source: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    root: Node,
    store: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    threads: int = 0,
    progress: Progress | None = None,
) -> int:
    """Copy the files of an already scanned tree into ``store``, as C ``fill_store`` does.

    ``source`` is the directory ``root`` was scanned from. Every regular file with
    a payload and no inline content is copied from ``source/<its path>`` (walked to
    beneath ``source`` without following symlinks) to ``store/<payload>`` unless
    that exists. Returns the number of objects added. Raises :class:`ScanError`
    ``cannot fill store: ...``.
    """
    src = os.fsencode(source)
    try:
        root_fd = _open_for_reading(src)
    except OSError as exc:
        raise _error("cannot fill store", None, exc.errno) from exc
    try:
        pipeline = _Pipeline(
            root_fd=root_fd,
            display=src,
            threads=threads or default_threads(),
            compute=False,
            inline=False,
            store=os.fsencode(store),
            progress=progress,
            hash_files=False,
        )
        stack: list[tuple[bytes, Node]] = [(b"", root)]
        while stack:
            rel, node = stack.pop()
            if node.link_to is not None:
                continue
            if node.children is not None:
                prefix = rel + b"/" if rel else b""
                stack.extend(
                    (prefix + name, child) for name, child in sorted(node.children.items())
                )
            elif node.mode & 0o170000 == _S_IFREG and node.content is None and node.payload:
                pipeline.add(rel, node, None)
        pipeline.finish()
    finally:
        os.close(root_fd)
    return sum(pipeline.stored)
