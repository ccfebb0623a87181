"""Scanning a caller's source tree with the caller's rights, in a worker process.

A caller of CreateImage other than root must get exactly the files it could open
itself, never what composefsd could read as root. Everything about its tree is
therefore read with its credentials (from SO_PEERCRED/SO_PEERGROUPS at connect
time):

1. :func:`scan_as` starts a worker process (as root, with nothing but a socket
   and, for a directory fd the caller passed, that fd). Before it touches
   anything of the caller's, the worker takes on the caller's uid, gid and
   groups for good (:func:`composefsd.credentials.drop_to`): it has no
   capabilities, and the kernel marks it non-dumpable, so the caller can neither
   ptrace it nor reach into it through ``/proc``; it never ``exec``\\ s.
2. As the caller, the worker opens the source (a path is resolved with the
   caller's rights; a passed fd is reopened, which needs the caller's read
   permission), sends that directory fd back over the socket (SCM_RIGHTS),
   walks the tree (:func:`composefsd.repository.images.scan_source_directory`:
   directory listings, stat, symlink targets and xattrs as the caller sees them)
   and sends the tree back, with progress on the way, then exits.
3. The importer opens each file beneath the returned directory fd, in worker
   processes that switch to the caller's rights for the opens
   (:func:`composefsd.repository.images.create_from_scan`).

Work is bounded per call: a tree with more than ``max_entries`` entries fails,
and the worker is killed when the call is cancelled (the caller went away) or
fails, which also ends a scan stuck in a FUSE filesystem the caller mounted.
"""

from __future__ import annotations

import logging
import marshal
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from composefsd import workerproc
from composefsd.credentials import Credentials, CredentialsError, drop_to
from composefsd.image.tree import Node, gc_paused
from composefsd.repository import CreateOptions, Progress, SourceError
from composefsd.repository.images import (
    open_source_directory,
    scan_options,
    scan_source_directory,
)
from composefsd.service.fds import close_all, receive_fds
from composefsd.sources.base import SourceTree
from composefsd.sources.directory import ScanOptions, SourceScan, source_tree

__all__ = ["decode_scan", "encode_scan", "scan_as"]

log = logging.getLogger(__name__)

#: One node on the wire: (parent index, name, mode, nlink, uid, gid, rdev, size,
#: mtime_sec, mtime_nsec, payload, xattrs, index of the hardlink target or -1).
_WireNode = tuple[
    int, bytes, int, int, int, int, int, int, int, int, "bytes | None", list[Any], int
]


def encode_scan(scan: SourceScan) -> bytes:
    """``scan`` as one marshal blob: the nodes in pre-order, then the files."""
    index: dict[int, int] = {}
    order: list[tuple[int, bytes, Node]] = []
    stack: list[tuple[int, bytes, Node]] = [(-1, b"", scan.root)]
    while stack:
        parent, name, node = stack.pop()
        index[id(node)] = len(order)
        me = len(order)
        order.append((parent, name, node))
        if node.link_to is None and node.children:
            stack.extend((me, n, c) for n, c in node.children.items())
    nodes: list[_WireNode] = [
        (
            parent,
            name,
            node.mode,
            node.nlink,
            node.uid,
            node.gid,
            node.rdev,
            node.size,
            node.mtime_sec,
            node.mtime_nsec,
            node.payload,
            node.xattrs,
            index[id(node.link_to)] if node.link_to is not None else -1,
        )
        for parent, name, node in order
    ]
    files = [(index[id(node)], rel, key) for rel, node, key in scan.files]
    return marshal.dumps((nodes, files, scan.entries, scan.regular_files))


def decode_scan(blob: bytes) -> SourceScan:
    """The :class:`SourceScan` :func:`encode_scan` made; ``ValueError`` if malformed."""
    try:
        with gc_paused():
            nodes_w, files_w, entries, regular = marshal.loads(blob)
            nodes: list[Node] = []
            for item in nodes_w:
                parent, name, mode, nlink, uid, gid, rdev, size, sec, nsec, payload, xattrs, _ = (
                    item
                )
                node = Node(mode, nlink, uid, gid, rdev, size, sec, nsec, payload)
                if mode & 0o170000 == 0o040000:
                    node.children = {}
                for key, value in xattrs:
                    node.set_xattr(key, value)
                if parent >= 0:
                    siblings = nodes[parent].children
                    if siblings is None or not name or b"/" in name or name in siblings:
                        raise ValueError(f"bad entry {name!r} under node {parent}")
                    siblings[name] = node
                elif nodes:
                    raise ValueError("a second root")
                nodes.append(node)
            for node, item in zip(nodes, nodes_w, strict=True):
                if item[12] >= 0:
                    node.link_to = nodes[item[12]]
            files = [(rel, nodes[i], tuple(key)) for i, rel, key in files_w]
    except (ValueError, TypeError, IndexError, EOFError, OSError) as exc:
        raise ValueError(f"malformed scan from the scan worker: {exc}") from exc
    if not nodes:
        raise ValueError("malformed scan from the scan worker: no root")
    return SourceScan(nodes[0], files, int(entries), int(regular))


def scan_as(
    credentials: Credentials,
    *,
    path: str | None = None,
    fd: int | None = None,
    display: bytes,
    options: CreateOptions,
    progress: Callable[[Progress], None] | None = None,
    max_entries: int | None = None,
) -> SourceTree:
    """Scan the caller's source (``path``, or the directory ``fd`` it passed, which
    is not closed) with ``credentials``' rights (module notes). The returned
    :class:`~composefsd.sources.base.SourceTree` holds the source directory's fd
    (``source_fd``); the caller closes it.

    ``progress`` gets ``scan`` reports and may raise (a cancelled call): the worker
    is then killed. Raises :class:`SourceError` for what the caller's rights do not
    allow or a bad tree, :class:`~composefsd.repository.RepositoryError` if the
    worker cannot do its job.
    """
    if (path is None) == (fd is None):
        raise ValueError("give exactly one of path and fd")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = None
    root_fd = -1
    done = False
    try:
        pass_fds = [child.fileno()] if fd is None else [child.fileno(), fd]
        proc = workerproc.start("composefsd.service.sourcescan", "_worker_main", pass_fds=pass_fds)
        child.close()
        workerproc.send(
            proc,
            (
                credentials.to_wire(),
                os.fsencode(path) if path is not None else None,
                fd,
                pass_fds[0],
                scan_options(options).to_wire(),
                max_entries,
                display,
            ),
        )
        assert proc.stdout is not None
        while True:
            try:
                message = workerproc.receive(proc.stdout)
            except (EOFError, ValueError) as exc:
                # Its output ends when it exits: the status is there at once.
                try:
                    status: int | str = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    status = "unknown"
                raise SourceError(
                    f"the scan of {os.fsdecode(display)} ended unexpectedly "
                    f"(the scan worker exited with status {status})"
                ) from exc
            kind = message[0]
            if kind == "progress":
                if progress is not None:
                    progress(Progress("scan", int(message[1]), None))
            elif kind == "opened":
                _, fds = receive_fds(parent, 1, 1)
                if len(fds) != 1:
                    close_all(fds)
                    raise SourceError(f"the scan of {os.fsdecode(display)} sent no directory")
                root_fd = fds[0]
            elif kind == "error":
                _, err, text = message
                raise SourceError(str(text), errno=err)
            elif kind == "done":
                if root_fd < 0:
                    raise SourceError(f"the scan of {os.fsdecode(display)} sent no directory")
                try:
                    scan = decode_scan(message[1])
                except ValueError as exc:
                    raise SourceError(str(exc)) from exc
                keep, root_fd = root_fd, -1
                done = True
                return source_tree(scan, keep, display, credentials)
            else:
                raise SourceError(f"the scan worker sent {kind!r}")
    finally:
        child.close()
        parent.close()
        if root_fd >= 0:
            os.close(root_fd)
        if proc is not None:
            # Done, it exits by itself; otherwise (an error, a cancelled call) it
            # must not go on reading the caller's tree.
            workerproc.stop(proc, kill=not done, timeout=10)


def _worker_main() -> None:
    """The scan worker (module notes): one request on stdin, messages on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout.buffer

    def send(message: tuple[Any, ...]) -> None:
        workerproc.write_message(out, message)

    try:
        request = workerproc.receive(sys.stdin.buffer)
    except EOFError:
        return
    creds_wire, path, fd, channel_fd, options_wire, max_entries, display = request
    channel = socket.socket(fileno=channel_fd)
    try:
        drop_to(Credentials.from_wire(creds_wire))
    except CredentialsError as exc:
        send(("error", exc.errno, f"cannot read {os.fsdecode(display)}: {exc.strerror}"))
        return
    try:
        root_fd, _ = open_source_directory(path if path is not None else fd, display)
    except SourceError as exc:
        send(("error", exc.errno, exc.message))
        return
    if fd is not None:
        os.close(fd)
    socket.send_fds(channel, [b"R"], [root_fd])
    send(("opened",))
    options = ScanOptions.from_wire(options_wire)

    def report(p: Progress) -> None:
        send(("progress", p.done))

    try:
        scan = scan_source_directory(root_fd, display, options, report, max_entries=max_entries)
    except SourceError as exc:
        send(("error", exc.errno, exc.message))
        return
    send(("done", encode_scan(scan)))
