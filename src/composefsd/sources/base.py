"""What every source gives the repository: a :class:`SourceTree`.

A source turns something a caller names into the tree of an image and the files
whose contents must become objects (:class:`ImportTask`, read by the importer
beneath ``SourceTree.source_fd``). It fails with :class:`SourceTreeError` (or,
for the directory scanner, its :class:`~composefsd.sources.directory.ScanError`);
the repository reports either as a bad source.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from composefsd.credentials import Credentials
from composefsd.image.tree import Node
from composefsd.sources.beneath import FileKey

__all__ = ["ImportTask", "ReadStyle", "SourceTree", "SourceTreeError"]


class ReadStyle(enum.Enum):
    """Whose reading of a directory tree a source reproduces.

    ``C``: C ``mkcomposefs`` 1.0.8 (every path its own inode unless hardlinks are
    asked for, and then only regular files; xattrs in the order the filesystem
    lists them; inline files also carry their digest). ``COMPOSEFS_RS``:
    composefs-rs 0.9 ``read_filesystem``, which CreateImage in a repository uses so
    that its ids equal ``cfsctl create-image --no-propagate-usr-to-root``: paths of
    one inode are always one inode, whatever its type (symlinks, devices and fifos
    too); xattrs sorted by name; a file of at most 64 bytes is inline content only,
    with no digest; a directory's size is 0.
    """

    C = "c"
    COMPOSEFS_RS = "composefs-rs"


# Not frozen: a scan makes one per file, and a frozen dataclass's __init__ costs
# three times as much.
@dataclass(slots=True)
class ImportTask:
    """One file to import, at ``rel`` beneath the import's source directory.

    ``inline``: only read its content (a file of at most 64 bytes that the image
    stores inline). ``expected``: the digest it must have; when given and the
    object exists, the source is not even read. ``key``: the file as the scan saw
    it; the file opened must still be that one (:mod:`composefsd.sources.beneath`)."""

    rel: bytes
    size: int
    expected: bytes | None = None
    inline: bool = False
    #: Hash it while copying it (it is known to need copying).
    hashing_copy: bool = False
    key: FileKey | None = None


@dataclass(slots=True)
class SourceTree:
    """A source read into an image's tree, with the file contents still to import.

    ``imports[i]`` fills ``nodes[i]`` (its payload, or its inline content). Files
    are read beneath ``source_fd`` (open; whoever opened it closes it), with the
    rights of ``credentials`` (None: the importing process's own); ``display``
    names the source in messages.
    """

    root: Node
    source_fd: int
    display: bytes
    imports: list[ImportTask] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    credentials: Credentials | None = None
    #: Regular files in the tree (hardlink entries not counted).
    files: int = 0
    #: Nodes in the tree, hardlink entries and the root included.
    entries: int = 0
    #: Whether the imported objects' digests become the files' fs-verity digests
    #: (a directory); False keeps the digests the source gave (a dumpfile).
    set_digests: bool = True
    #: The scan's fingerprint of the tree, if it took one
    #: (:attr:`composefsd.sources.directory.SourceScan.fingerprint`).
    fingerprint: bytes | None = None


class SourceTreeError(Exception):
    """A source that cannot become a tree; ``str()`` says why, ``errno`` (or None)
    is the cause."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        return self.message
