"""io.composefs.Repository.MountDumpfile: any local peer mounts its own image.

The caller hands over a composefs-dump(5) file and its object directories as fds
and gets a detached, read-only, nosuid, nodev, idmapped composefs mount back.
It needs no privilege (composefsd's Authorization lets every peer call it), so
everything it sends is hostile input; the README's "Unprivileged mounts of a
caller's own image" is the threat model. Here:

* **fds** are checked for their kind before anything is read: the dumpfile a
  regular file open for reading, each object directory a directory, the user
  namespace a user namespace the caller owns (never O_PATH fds); a wrong one is
  ``BadFileDescriptor`` naming the field.
* **the dumpfile** is read once into memory (at most :attr:`OwnMountLimits.max_dumpfile_bytes`,
  whatever its size says: a file growing or shrinking meanwhile is only read
  up to the limit, and what was read is all that is parsed), split into lines
  (at most ``max_entries`` of at most ``max_line_bytes``), parsed by composefsd's
  own parser and checked: every object path (payload of a regular file with
  external data) relative, without empty, ``.`` or ``..`` components, and no
  ``security.*`` or ``trusted.*`` xattr (:data:`_FORBIDDEN_XATTRS`). The
  image is written by composefsd's writer (which escapes every
  ``trusted.overlay.*`` xattr of the dumpfile, so the caller cannot set overlay
  redirects, metacopy or opaque marks of its own), at most ``max_image_bytes``,
  into a sealed memfd: no byte of it comes from the caller unparsed, and nothing
  is written to the repository or anywhere else.
* **the mount** is :func:`composefsd.kernel.ownmount.mount_caller_image`: the
  objects are read with the caller's rights, never root's.
* **limits**: calls run in the transport's light lane (at most
  ``--workers-per-uid`` of one uid); on top of that one uid has at most
  ``calls_per_uid`` of these calls running (more are refused at once with
  ``LimitExceeded``, not queued), all uids together at most ``concurrent_calls``
  (others wait their turn: this bounds the daemon's memory), and one uid at most
  ``live_images_per_uid`` images still mounted somewhere (each holds its memfd in
  the daemon's memory until its last mount is gone) and starts at most
  ``calls_per_minute`` calls a minute, in bursts of at most ``burst`` (a token
  bucket per uid; refused calls take no token).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from composefsd.credentials import Credentials
from composefsd.image.dump_parse import DumpfileError, parse_dumpfile_lines
from composefsd.image.tree import Node, TreeError
from composefsd.image.writer import WriteError, write_image
from composefsd.kernel.mount import MountError
from composefsd.kernel.ownmount import (
    FdKindError,
    caller_mount_namespace,
    check_directory_fd,
    check_regular_fd,
    image_alive,
    mount_caller_image,
    sealed_image,
    userns_owner,
)
from composefsd.service.context import CallContext, VarlinkReplyError
from composefsd.service.methods import INTERFACE, reply_error

__all__ = ["OwnMountLimits", "OwnMounts", "build_image", "payload_ok", "read_dumpfile"]

log = logging.getLogger(__name__)

_S_IFMT = 0o170000
_S_IFREG = 0o100000
_S_IFDIR = 0o040000
_S_IFCHR = 0o020000
_S_IFBLK = 0o060000
_S_ISUID = 0o4000
_S_ISGID = 0o2000


@dataclass(slots=True)
class OwnMountLimits:
    """What MountDumpfile calls may take (README: "Limits").

    Measured at the limits (100,000 entries of external files, a 15 MiB dumpfile,
    a 20 MiB image): about 1 s of one CPU and 110 MiB of the daemon's memory at
    its peak per call, so ``concurrent_calls`` bounds the daemon's memory at a few
    hundred MiB; each live image then holds its bytes (``max_image_bytes`` at most)
    until its last mount is gone.
    """

    max_dumpfile_bytes: int = 16 << 20
    max_entries: int = 100_000
    max_line_bytes: int = 256 << 10
    max_object_dirs: int = 8
    max_image_bytes: int = 64 << 20
    calls_per_uid: int = 1
    concurrent_calls: int = 2
    live_images_per_uid: int = 16
    #: Calls one uid may start per minute on average, and at once after a pause:
    #: each call makes a loop device and an image, so a uid that unmounts as fast
    #: as it mounts is held to this rate rather than to live_images_per_uid alone.
    calls_per_minute: int = 60
    burst: int = 10


#: Token buckets kept before the full ones are dropped (OwnMounts._take_token).
_MAX_BUCKETS = 1024


def _error(name: str, **parameters: Any) -> VarlinkReplyError:
    return VarlinkReplyError(f"{INTERFACE}.{name}", parameters)


def _limit(limit: str, value: int, message: str) -> VarlinkReplyError:
    return _error("LimitExceeded", limit=limit, value=value, message=message)


def _rejected(message: str, line: int | None = None) -> VarlinkReplyError:
    params: dict[str, Any] = {"message": message}
    if line:
        params["line"] = line
    return _error("DumpfileRejected", **params)


def _bad_fd(parameter: str, message: str) -> VarlinkReplyError:
    return _error("BadFileDescriptor", parameter=parameter, message=message)


def payload_ok(payload: bytes) -> bool:
    """An object path the caller may name: relative, every component a plain name."""
    if not payload or payload.startswith(b"/"):
        return False
    return all(part not in (b"", b".", b"..") for part in payload.split(b"/"))


#: xattr namespaces a caller may not set: ``security.*`` is the system's policy
#: (an SELinux label picks the domain an exec enters, ``security.capability``
#: grants capabilities), ``trusted.*`` is what only CAP_SYS_ADMIN may set and
#: root's readers rely on (``trusted.overlay.*``, escaped by the writer, would
#: become a redirect again in an overlay stacked on the caller's mount).
_FORBIDDEN_XATTRS = (b"security.", b"trusted.")


def _check_tree(root: Node) -> None:
    """Object paths plain and relative, no xattr in a forbidden namespace, no
    device node (but a whiteout, 0:0, which the writer turns into an empty file)
    and no setuid or setgid file: the mount's nodev and nosuid are not a defence,
    since the caller can clear them (mount_setattr on the mount it gets back, from
    its own user namespace: tested), so the image carries nothing they would have
    to neutralise."""
    stack: list[tuple[bytes, Node]] = [(b"/", root)]
    while stack:
        path, node = stack.pop()
        if node.children:
            base = path.rstrip(b"/") + b"/"
            stack.extend((base + name, child) for name, child in node.children.items())
        kind = node.mode & _S_IFMT
        if node.link_to is None and (
            kind == _S_IFBLK
            or (kind == _S_IFCHR and node.rdev != 0)
            or (kind != _S_IFDIR and node.mode & (_S_ISUID | _S_ISGID))
        ):
            shown = path.decode("utf-8", "backslashreplace")
            raise _rejected(
                f"{shown!r}: device nodes (but whiteouts, character devices 0:0) and "
                "setuid or setgid files are not the caller's to make"
            )
        for key, _ in node.xattrs:
            if key.startswith(_FORBIDDEN_XATTRS):
                raise _rejected(
                    f"xattr {key.decode('utf-8', 'backslashreplace')!r}: security.* and "
                    "trusted.* xattrs are not the caller's to set"
                )
        payload = node.payload
        regular = node.link_to is None and node.mode & _S_IFMT == _S_IFREG
        if regular and payload is not None and not payload_ok(payload):
            raise _rejected(
                f"object path {payload.decode('utf-8', 'backslashreplace')!r} "
                "is not relative to the object directory (absolute, empty or with "
                "'.' or '..' components)"
            )


def read_dumpfile(fd: int, limits: OwnMountLimits) -> list[bytes]:
    """The dumpfile's lines (with their newlines), read from ``fd`` once and checked
    against ``limits``; the file's size is never trusted."""
    limit = limits.max_dumpfile_bytes
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        try:
            chunk = os.pread(fd, min(1 << 20, limit + 1 - total), total)
        except OSError as e:
            raise _bad_fd("dumpfileFileDescriptor", f"cannot read: {e.strerror}") from None
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:
        raise _limit("dumpfileBytes", limit, f"the dumpfile is larger than {limit} bytes")
    data = b"".join(chunks)
    del chunks
    count = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if count > limits.max_entries:
        raise _limit(
            "entries", limits.max_entries, f"the dumpfile has more than {limits.max_entries} lines"
        )
    lines = data.splitlines(keepends=True)
    longest = max(map(len, lines), default=0)
    if longest > limits.max_line_bytes:
        raise _limit(
            "lineBytes",
            limits.max_line_bytes,
            f"a dumpfile line is longer than {limits.max_line_bytes} bytes",
        )
    return lines


def build_image(lines: list[bytes], limits: OwnMountLimits) -> bytes:
    """Parse, check and write: the image bytes, or DumpfileRejected/LimitExceeded."""
    try:
        root = parse_dumpfile_lines(lines)
    except DumpfileError as e:
        raise _rejected(e.message, e.lineno) from None
    except (TreeError, ValueError, RecursionError) as e:
        raise _rejected(str(e)) from None
    _check_tree(root)
    try:
        image = write_image(root)
    except (WriteError, TreeError) as e:
        detail = getattr(e, "detail", "")
        raise _rejected(
            f"cannot write the image: {e}" + (f" ({detail})" if detail else "")
        ) from None
    except RecursionError:
        raise _rejected("cannot write the image: the tree is too deep") from None
    if len(image) > limits.max_image_bytes:
        raise _limit(
            "imageBytes",
            limits.max_image_bytes,
            f"the image would be {len(image)} bytes, more than {limits.max_image_bytes}",
        )
    return image


def _caller_mount_namespace(ctx: CallContext) -> int | None:
    """The calling process's mount namespace (an fd), None when it is composefsd's
    own or the call came without a connection (in-process tests). Taken from a
    pidfd of the connection's peer, so never another process's; a caller that has
    gone is :class:`MountError` (ESRCH)."""
    if ctx.peer_pidfd is None:
        return None
    try:
        pidfd = ctx.peer_pidfd()
    except OSError as e:
        raise MountError(
            e.errno or errno.ESRCH, f"cannot name the calling process: {e.strerror}"
        ) from None
    try:
        return caller_mount_namespace(pidfd)
    finally:
        os.close(pidfd)


class OwnMounts:
    """MountDumpfile's state: the limits, the calls running per uid, the images
    handed out per uid (module notes)."""

    def __init__(self, limits: OwnMountLimits | None = None) -> None:
        self.limits = limits or OwnMountLimits()
        self._lock = threading.Lock()
        self._running: dict[int, int] = {}
        self._slots = threading.BoundedSemaphore(max(1, self.limits.concurrent_calls))
        #: uid -> (image device, memfd name) of the images handed out.
        self._images: dict[int, list[tuple[int, str]]] = {}
        self._serial = itertools.count(1)
        #: uid -> (tokens, when they were counted): a token bucket per uid.
        self._buckets: dict[int, tuple[float, float]] = {}
        #: Monotonic seconds (replaceable in tests: the rate is tested without waiting).
        self.clock: Callable[[], float] = time.monotonic

    def _take_token(self, uid: int) -> None:
        """One call's worth of ``calls_per_minute`` for ``uid``, or LimitExceeded."""
        limits = self.limits
        now = self.clock()
        rate = limits.calls_per_minute / 60.0
        tokens, then = self._buckets.get(uid, (float(limits.burst), now))
        tokens = min(float(limits.burst), tokens + max(0.0, now - then) * rate)
        if tokens < 1.0:
            self._buckets[uid] = (tokens, now)
            raise _limit(
                "callsPerMinute",
                limits.calls_per_minute,
                f"uid {uid} called MountDumpfile more than {limits.calls_per_minute} "
                f"times a minute (bursts of {limits.burst}); try again in "
                f"{(1.0 - tokens) / rate:.1f} s",
            )
        self._buckets[uid] = (tokens - 1.0, now)
        if len(self._buckets) > _MAX_BUCKETS:
            # Full buckets say nothing a missing one would not: only uids that
            # called lately are kept, at most as many as called within a refill.
            full = float(limits.burst)
            self._buckets = {
                u: (t, w) for u, (t, w) in self._buckets.items() if t + (now - w) * rate < full
            }

    def _enter(self, uid: int) -> None:
        with self._lock:
            running = self._running.get(uid, 0)
            if running >= self.limits.calls_per_uid:
                raise _limit(
                    "callsPerUid",
                    self.limits.calls_per_uid,
                    f"uid {uid} has {running} MountDumpfile calls running already",
                )
            images = [
                (dev, name)
                for dev, name in self._images.get(uid, ())
                if image_alive(dev, name) is not False
            ]
            self._images[uid] = images
            if len(images) >= self.limits.live_images_per_uid:
                raise _limit(
                    "liveImagesPerUid",
                    self.limits.live_images_per_uid,
                    f"uid {uid} has {len(images)} images mounted already; "
                    "unmount (close) some first",
                )
            self._take_token(uid)
            self._running[uid] = running + 1

    def _leave(self, uid: int) -> None:
        with self._lock:
            left = self._running[uid] - 1
            if left:
                self._running[uid] = left
            else:
                del self._running[uid]

    def call(
        self,
        ctx: CallContext,
        dumpfile_index: int,
        object_indexes: Sequence[int],
        userns_index: int | None,
    ) -> dict[str, Any]:
        limits = self.limits
        if not object_indexes:
            raise VarlinkReplyError(
                "org.varlink.service.InvalidParameter",
                {"parameter": "objectDirectoryFileDescriptors"},
            )
        if len(object_indexes) > limits.max_object_dirs:
            raise _limit(
                "objectDirectories",
                limits.max_object_dirs,
                f"at most {limits.max_object_dirs} object directories",
            )
        uid = ctx.peer.uid
        self._enter(uid)
        try:
            with self._slots:
                return self._call(ctx, dumpfile_index, object_indexes, userns_index)
        finally:
            self._leave(uid)

    def _call(
        self,
        ctx: CallContext,
        dumpfile_index: int,
        object_indexes: Sequence[int],
        userns_index: int | None,
    ) -> dict[str, Any]:
        peer = ctx.peer
        taken: list[int] = []
        try:
            dump_fd = ctx.take_fd(dumpfile_index, "dumpfileFileDescriptor")
            taken.append(dump_fd)
            object_fds = []
            for index in object_indexes:
                fd = ctx.take_fd(index, "objectDirectoryFileDescriptors")
                taken.append(fd)
                object_fds.append(fd)
            userns_fd = None
            if userns_index is not None:
                userns_fd = ctx.take_fd(userns_index, "userNamespaceFileDescriptor")
                taken.append(userns_fd)
            try:
                check_regular_fd(dump_fd, "dumpfileFileDescriptor")
                for fd in object_fds:
                    check_directory_fd(fd, "objectDirectoryFileDescriptors")
                if userns_fd is not None:
                    owner = userns_owner(userns_fd, "userNamespaceFileDescriptor")
                    if owner != peer.uid:
                        raise FdKindError(
                            "userNamespaceFileDescriptor",
                            f"owned by uid {owner}, not by the caller (uid {peer.uid})",
                        )
            except FdKindError as e:
                raise _bad_fd(e.parameter, str(e)) from None
            lines = read_dumpfile(dump_fd, self.limits)
            image = build_image(lines, self.limits)
            del lines
            # Unique among this daemon's and its predecessors' images (image_alive).
            name = f"composefsd-own-{os.getpid()}-{peer.uid}-{next(self._serial)}"
            memfd = sealed_image(image, name)
            taken.append(memfd)
            del image
            # The caller's rights, whoever it is (root too: the same checks, the
            # same lack of DAC overrides).
            creds = Credentials(peer.uid, peer.gid, tuple(sorted(peer.groups)))
            try:
                mntns_fd = _caller_mount_namespace(ctx)
                if mntns_fd is not None:
                    taken.append(mntns_fd)
                mount = mount_caller_image(
                    memfd,
                    object_fds,
                    creds,
                    userns_fd,
                    label=f"the image of uid {peer.uid}'s dumpfile",
                    userns_what="userNamespaceFileDescriptor",
                    mntns_fd=mntns_fd,
                )
            except FdKindError as e:
                raise _bad_fd(e.parameter, str(e)) from None
            except OSError as e:
                mapped = reply_error(e)
                raise (mapped or e) from None
            with self._lock:
                self._images.setdefault(peer.uid, []).append((mount.image_dev, name))
            log.info(
                "mounted uid %d's dumpfile image (%s-backed, idmap %s) for pid %d",
                peer.uid,
                mount.backing,
                mount.idmapped_by,
                peer.pid,
            )
            return {
                "mountFileDescriptor": ctx.push_fd(mount.fd),
                "idmapped": mount.idmapped_by,
            }
        finally:
            for fd in taken:
                os.close(fd)
