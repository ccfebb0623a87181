"""The dumpfile source: a composefs dumpfile whose regular files name objects.

Each regular file of the dumpfile with external data names its content by a
relative path (its payload, ``XX/rest`` for canonical ones) beneath an objects
directory; the importer reads those files beneath that directory's fd. The tree
is what C ``mkcomposefs --from-file`` makes of the dumpfile; the digests it gives
are kept, and checked against the contents where the repository's objects are
named by the same (SHA-256) digests.
"""

from __future__ import annotations

import errno
import os
import stat

from composefsd.image.dump_parse import DumpfileError, parse_dumpfile
from composefsd.image.tree import S_IFMT, gc_paused
from composefsd.kernel.verity import Algorithm
from composefsd.sources.base import ImportTask, SourceTree, SourceTreeError
from composefsd.sources.beneath import check_relpath

__all__ = ["dumpfile_tree"]


def dumpfile_tree(data: bytes, objects_fd: int, display: bytes, algorithm: Algorithm) -> SourceTree:
    """The tree of the dumpfile ``data``; its files are read beneath ``objects_fd``
    (named ``display``). Digests it gives become the objects' expected digests
    when the repository's ``algorithm`` is SHA-256."""
    try:
        with gc_paused():
            root = parse_dumpfile(data)
    except DumpfileError as exc:
        raise SourceTreeError(f"invalid dumpfile: {exc}", errno.EINVAL) from exc
    tree = SourceTree(root, objects_fd, display, set_digests=False)
    walked = root.walk()
    for _path, node in walked:
        if node.link_to is not None or node.mode & S_IFMT != stat.S_IFREG:
            continue
        tree.files += 1
        if node.size == 0 or node.content is not None or node.payload is None:
            continue
        try:
            check_relpath(node.payload)
        except ValueError:
            raise SourceTreeError(
                f"object path {os.fsdecode(node.payload)!r} in the dumpfile is not a plain "
                f"relative path"
            ) from None
        expected = node.digest if algorithm is Algorithm.SHA256 else None
        tree.imports.append(ImportTask(node.payload, node.size, expected, False))
        tree.nodes.append(node)
    tree.entries = len(walked)
    return tree
