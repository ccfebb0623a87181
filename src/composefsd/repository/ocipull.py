"""Pull an OCI image into the repository: composefs-rs 0.9's ``pull_image``.
:func:`fetch_image` is its ``ImageOp::pull`` (``skopeo.rs``) and
``import_oci_layout`` (``oci_layout.rs``); :func:`pull` adds the composefs image
(:func:`~composefsd.repository.ocibuild.ensure_image`) and the tag.

An :class:`ImageSource` hands over the manifest, the config and the layer blobs
(the skopeo image proxy, an ``oci:`` layout read directly, a test's dict). The
fetch stores, as composefs-rs does:

* every layer as ``oci-layer-<diff_id>`` (:func:`~composefsd.repository.ocilayer.import_layer`),
  largest first, several at once; a layer whose stream exists is reused unread.
  A tar layer (OCI or Docker tar media types) is decompressed as its first
  bytes say (gzip, zstd or none: see :class:`_Decompressed`); an artifact's
  non-tar layer is kept as one object in an ``oci_blob`` stream named
  ``oci-layer-<blob digest>``, as composefs-rs's pull names it;
* the config as ``oci-config-<digest>`` (named refs ``<diff_id>`` in config
  order); an existing config stream is reused, its layer refs read from it;
* the manifest as ``oci-manifest-<digest>``, reused if it exists.

Unlike composefs-rs (which trusts skopeo), every byte is checked here: the
config's digest (the manifest's is the source's to check: :class:`ImageSource`),
each blob's digest and size (before its layer's stream is linked), each tar's
diff_id. A failure links nothing for the layer concerned (objects already
written stay for GC) and leaves the repository fsck-clean; layers completed
before it stay and are reused by the next fetch.

Locking: the calling thread holds the repository's shared writer lock for the
whole fetch (GC waits, as for a composefs-rs pull, whose open repository holds
it); the worker threads join it (:func:`~composefsd.repository.locking.join_lock`).
Two fetches of one layer, in threads or processes, store it once: each takes
the layer's lock (:func:`_content_lock`) and looks for the stream again before
reading the blob.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast

from composefsd.image.transforms import XattrFilter
from composefsd.objectlayout import is_hex, object_link_target, object_relpath
from composefsd.repository.errors import (
    ImageNotFoundError,
    InvalidNameError,
    RepositoryError,
    os_error_text,
)
from composefsd.repository.locking import RepoLock, join_lock, writer_lock
from composefsd.repository.oci import (
    check_tag,
    json_object,
    open_image,
    read_external,
    tag_image,
    write_config_stream,
    write_manifest_stream,
)
from composefsd.repository.ocilayer import (
    ImportStats,
    LayerDigestError,
    TarFormatError,
    check_diff_id,
    import_layer,
    layer_content_id,
)
from composefsd.repository.progress import Progress, ProgressCallback
from composefsd.repository.streams import existing_stream, write_stream
from composefsd.splitstream import (
    CONTENT_TYPE_OCI_BLOB,
    CONTENT_TYPE_OCI_CONFIG,
    OCI_CONFIG_PREFIX,
    OCI_MANIFEST_PREFIX,
    SplitStreamWriter,
    zstd_module,
)

if TYPE_CHECKING:
    from composefsd.repository.repo import Repository

__all__ = [
    "JSON_MAX",
    "BlobDigestError",
    "BlobTransferError",
    "ConfigFormatError",
    "Descriptor",
    "FetchResult",
    "ImageSource",
    "LayerFormatError",
    "LayerResult",
    "LayoutError",
    "ManifestFormatError",
    "OciPullError",
    "PlatformError",
    "PullResult",
    "TagNotFoundError",
    "UnsupportedMediaTypeError",
    "check_blob",
    "check_digest",
    "fetch_image",
    "parse_descriptor",
    "pull",
]

log = logging.getLogger(__name__)

#: Index, manifest and config documents are small; refuse to hold more.
JSON_MAX = 4 << 20

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_MEDIA_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
#: What a manifest may call itself (none is allowed: the field is optional).
_MANIFEST_MEDIA_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})

#: Tar layer media types → compression (composefs-rs's ``is_tar_media_type``,
#: plus the Docker names skopeo converts to them).
TAR_MEDIA_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}

#: Digest algorithms of blobs we can check, with their hex length.
_DIGEST_HEX = {"sha256": 64, "sha512": 128}
#: Largest size a descriptor may give (JSON's exact integers; OCI's int64).
_SIZE_MAX = 1 << 53
_CHUNK = 1 << 20
#: Decompressed chunks a layer's reading thread may be ahead of its import.
_AHEAD = 4
_PROGRESS_INTERVAL = 0.2
#: Per-layer lock files in ``objects/``: see :func:`_content_lock`.
_LOCK_PREFIX = ".tmp-fetch-"


class OciPullError(RepositoryError):
    """An OCI image that cannot be fetched; the message names what and why."""


class ManifestFormatError(OciPullError):
    """The manifest (or an index where a manifest belongs) is not one we can pull:
    not JSON, an index or manifest list, schema 1, bad descriptors."""


class ConfigFormatError(ManifestFormatError):
    """The image config is not valid JSON or its diff_ids do not fit the manifest."""


class UnsupportedMediaTypeError(ManifestFormatError):
    """A manifest or layer media type we cannot import."""


class PlatformError(OciPullError):
    """No manifest for this machine's platform."""


class LayoutError(OciPullError):
    """An ``oci:`` layout that cannot be read: missing or hostile files."""


class TagNotFoundError(LayoutError, ImageNotFoundError):
    """The layout has no image of that tag."""


class BlobDigestError(OciPullError):
    """A blob whose bytes do not have the digest or size its descriptor gives
    (truncated, corrupted). ``digest`` is the descriptor's; ``layer`` the
    diff_id of the layer concerned, if it is one."""

    def __init__(self, message: str, *, digest: str, layer: str | None = None) -> None:
        super().__init__(message)
        self.digest = digest
        self.layer = layer


class BlobTransferError(OciPullError):
    """The source failed while a blob was read."""


class LayerFormatError(OciPullError):
    """A layer blob that does not decompress as its media type says."""


class _Cancelled(Exception):
    """Another layer failed: this one stops (never leaves :func:`fetch_image`)."""


class ImageSource(Protocol):
    """Where an image comes from (skopeo's image proxy, an ``oci:`` layout, ...)."""

    def fetch_manifest(self) -> tuple[str, bytes]:
        """``("sha256:<hex>", raw manifest JSON)`` of the image manifest for this
        platform (an index resolved). The source has checked the manifest it got
        against the digest; the JSON's own sha256 may differ when the source
        converted it (skopeo hands out a Docker schema 2 manifest as OCI under
        the Docker manifest's digest)."""
        ...

    def fetch_config(self, digest: str, size: int) -> bytes:
        """The raw config JSON (the source verifies its sha256)."""
        ...

    def open_blob(self, digest: str, size: int) -> contextlib.AbstractContextManager[BinaryIO]:
        """The raw (compressed) blob, streamed; transfer errors raise on read or
        on exit."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class LayerResult:
    #: The layer's key: its diff_id (container images) or blob digest (artifacts).
    diff_id: str
    blob_digest: str
    media_type: str
    #: Compressed size (the descriptor's).
    size: int
    #: The layer stream's object.
    verity: str
    #: True when the stream existed and the blob was not read.
    skipped: bool
    #: What importing it stored (nothing when skipped): this run's accounting, not
    #: the layer's identity, so results of one image compare equal without it.
    stats: ImportStats = field(default_factory=ImportStats, compare=False)


@dataclass(frozen=True, slots=True)
class FetchResult:
    manifest_digest: str
    #: The import-time manifest stream's object.
    manifest_verity: str
    config_digest: str
    config_verity: str
    #: False for an artifact (a config of another media type than OCI's image config).
    is_container: bool
    #: In manifest order.
    layers: tuple[LayerResult, ...]


# -- documents -----------------------------------------------------------------------------


def check_digest(value: object, what: str) -> str:
    """``value`` if it is a ``sha256:``/``sha512:`` digest in lowercase hex, else
    :class:`ManifestFormatError`. Nothing else may become a path or a content id."""
    if isinstance(value, str):
        algorithm, colon, hexed = value.partition(":")
        if colon and _DIGEST_HEX.get(algorithm) == len(hexed) and is_hex(hexed):
            return value
    raise ManifestFormatError(f"{what}: not a sha256 or sha512 digest: {str(value)[:200]!r}")


def parse_descriptor(value: object, what: str) -> Descriptor:
    """An OCI descriptor: ``mediaType`` (string), ``digest`` (:func:`check_digest`),
    ``size`` (a non-negative integer). :class:`ManifestFormatError` if not."""
    if not isinstance(value, dict):
        raise ManifestFormatError(f"{what} is not a descriptor (a JSON object)")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str):
        raise ManifestFormatError(f"{what} has no media type")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < _SIZE_MAX:
        raise ManifestFormatError(f"{what} has no valid size: {str(size)[:100]!r}")
    return Descriptor(media_type, check_digest(value.get("digest"), what), size)


def check_blob(data: bytes, digest: str, size: int, what: str, layer: str | None = None) -> None:
    """:class:`BlobDigestError` unless ``data`` has that size and digest."""
    if len(data) != size:
        raise BlobDigestError(
            f"{what} {digest} is {len(data)} bytes, not {size}", digest=digest, layer=layer
        )
    algorithm, _, expected = digest.partition(":")
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != expected:
        raise BlobDigestError(
            f"{what} {digest} has the digest {algorithm}:{actual}", digest=digest, layer=layer
        )


@dataclass(frozen=True, slots=True)
class _Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def _parse_manifest(data: bytes, digest: str) -> _Manifest:
    what = f"manifest {digest}"
    doc = json_object(data, what, ManifestFormatError, JSON_MAX)
    media_type = doc.get("mediaType")
    if media_type in INDEX_MEDIA_TYPES or (media_type is None and "manifests" in doc):
        raise ManifestFormatError(
            f"{what} is an image index or manifest list, not an image manifest"
        )
    if media_type is not None and media_type not in _MANIFEST_MEDIA_TYPES:
        raise UnsupportedMediaTypeError(f"{what} has the media type {str(media_type)[:200]!r}")
    if doc.get("schemaVersion") != 2:
        raise ManifestFormatError(f"{what} is not schema version 2")
    config = parse_descriptor(doc.get("config"), f"{what}: the config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ManifestFormatError(f"{what} has no layer list")
    return _Manifest(
        config,
        tuple(parse_descriptor(d, f"{what}: layer {i}") for i, d in enumerate(layers)),
    )


def _layer_keys(config_json: bytes, manifest: _Manifest) -> list[str]:
    """composefs-rs's ``extract_diff_ids``: the config's diff_ids for a container
    image, the layer digests for an artifact."""
    if manifest.config.media_type != MEDIA_OCI_CONFIG:
        return [d.digest for d in manifest.layers]
    what = f"config {manifest.config.digest}"
    doc = json_object(config_json, what, ConfigFormatError, JSON_MAX)
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ConfigFormatError(f"{what} has no rootfs.diff_ids list")
    if len(diff_ids) != len(manifest.layers):
        raise ConfigFormatError(
            f"{what} has {len(diff_ids)} diff_ids for the manifest's {len(manifest.layers)} layers"
        )
    for diff_id in diff_ids:
        if not isinstance(diff_id, str):
            raise ConfigFormatError(f"{what}: a diff_id is not a string")
        try:
            layer_content_id(diff_id)
        except InvalidNameError as exc:
            raise ConfigFormatError(f"{what}: {exc}") from None
    return list(diff_ids)


# -- per-layer lock ----------------------------------------------------------------------


@contextlib.contextmanager
def _content_lock(repo: Repository, content_id: str) -> Iterator[None]:
    """Exclusive across threads and processes for one content id.

    An ``flock`` on ``objects/.tmp-fetch-<hash of the id>``, removed by its holder
    when done. Why there: composefs-rs's fsck and GC only look into
    ``objects/XX/`` and ``streams``/``images`` entries, so a file in ``objects/``
    itself is invisible to them; ours treat ``.tmp*`` there as a stray temporary,
    which fsck only notes (never damage) and GC removes. A lock file left by a
    killed fetch is therefore harmless; GC removes it under its exclusive lock, when
    no fetch (they hold the shared lock) can hold it. The holder unlinks it before
    letting go; a waiter that then wins the lock on the unlinked file sees that the
    name no longer leads to its file and starts again.
    """
    name = _LOCK_PREFIX + hashlib.sha256(content_id.encode()).hexdigest()[:40]
    try:
        dir_fd = os.open(repo.objects_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RepositoryError(
            f"cannot open {repo.objects_dir}: {os_error_text(exc)}", errno=exc.errno
        ) from exc
    try:
        while True:
            try:
                fd = os.open(
                    name,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dir_fd,
                )
            except OSError as exc:
                raise RepositoryError(
                    f"cannot create the lock objects/{name} in {repo.path}: {os_error_text(exc)}",
                    errno=exc.errno,
                ) from exc
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("waiting for another fetch of %s", content_id)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                mine = os.fstat(fd)
                try:
                    now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                    continue
                try:
                    yield
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dir_fd)
                return
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)


# -- streaming a blob -------------------------------------------------------------------------


class _Events:
    """Worker → calling thread: progress and completions, through one queue."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Progress | None] = queue.SimpleQueue()
        self.cancel = threading.Event()

    def put(self, event: Progress) -> None:
        self.queue.put(event)


class _Blob:
    """The source's blob, read at most ``size`` bytes, hashed and counted as it
    goes, reporting ``fetch`` progress; :meth:`finish` reads what the
    decompressor left and checks size and digest."""

    def __init__(self, raw: BinaryIO, desc: Descriptor, layer: str, events: _Events) -> None:
        self._raw = raw
        self._desc = desc
        self._layer = layer
        self._events = events
        self._hasher = hashlib.new(desc.digest.partition(":")[0])
        self.done = 0
        self._next_report = 0.0
        self._report(force=True)

    def _report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next_report:
            self._next_report = now + _PROGRESS_INTERVAL
            self._events.put(Progress("fetch", self.done, self._desc.size, self._layer))

    def read(self, n: int = -1) -> bytes:
        if self._events.cancel.is_set():
            raise _Cancelled()
        left = self._desc.size - self.done
        want = left if n is None or n < 0 else min(n, left)
        if want <= 0:
            # composefs-rs reads the blob with take(size): what follows is not its.
            return b""
        try:
            data = self._raw.read(want)
        except RepositoryError:
            raise
        except OSError as exc:
            raise BlobTransferError(
                f"layer {self._layer}: reading blob {self._desc.digest} failed after "
                f"{self.done} bytes: {os_error_text(exc)}",
                errno=exc.errno,
            ) from exc
        if not data:
            raise BlobDigestError(
                f"layer {self._layer}: blob {self._desc.digest} ends after {self.done} of "
                f"{self._desc.size} bytes",
                digest=self._desc.digest,
                layer=self._layer,
            )
        self._hasher.update(data)
        self.done += len(data)
        self._report()
        return data

    def chunks(self) -> Iterator[bytes]:
        while data := self.read(_CHUNK):
            yield data

    def finish(self) -> None:
        for _ in self.chunks():
            pass
        actual = self._hasher.hexdigest()
        if actual != self._desc.digest.partition(":")[2]:
            raise BlobDigestError(
                f"layer {self._layer}: blob {self._desc.digest} has the digest "
                f"{self._desc.digest.partition(':')[0]}:{actual}",
                digest=self._desc.digest,
                layer=self._layer,
            )
        self._report(force=True)


class _Prefixed:
    """``head`` (already read) and then the rest of ``blob``."""

    def __init__(self, head: bytes, blob: _Blob) -> None:
        self._head = head
        self._blob = blob

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0 or n >= len(self._head):
                data, self._head = self._head, b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._blob.read(n)


_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _Gunzip:
    """Gzip decompressed in large pieces: what :class:`gzip.GzipFile` accepts
    (members one after another, zero bytes after a member), but reading the blob
    1 MiB at a time where GzipFile (Python 3.11) reads 8 KiB: its Python work per
    read, with the blob's hashing and progress under it, was a third of a layer
    import's time. zlib checks each member's header, CRC and length itself
    (``wbits`` 31); errors raise as ``zlib.error`` and ``EOFError``."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dec: Any = zlib.decompressobj(31)
        self._in = b""
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        limit = n if n is not None and n > 0 else _CHUNK
        while not self._eof:
            if self._dec is None:
                # Between members: zero padding, then another member or the end.
                self._in = self._in.lstrip(b"\0")
                if not self._in:
                    self._in = self._raw.read(_CHUNK)
                    self._eof = not self._in
                    continue
                self._dec = zlib.decompressobj(31)
            src = self._dec.unconsumed_tail
            if not src:
                src, self._in = self._in or self._raw.read(_CHUNK), b""
            # Called without input too: output held back by ``limit`` may be
            # pending after the last input byte was taken.
            out: bytes = self._dec.decompress(src, limit)
            if self._dec.eof:
                self._in = self._dec.unused_data
                self._dec = None
            if out:
                return out
            if not src and self._dec is not None:
                raise EOFError("the compressed data ends inside a gzip member")
        return b""


class _Decompressed:
    """A tar layer's decompressed bytes; the decompressor's errors as
    :class:`LayerFormatError`. The compression is told by the blob's first bytes,
    not by its media type: skopeo 1.9.3 hands out docker-archive's uncompressed
    layers as ``tar+gzip``, and a tar never starts with either magic (its first
    bytes are a file name)."""

    def __init__(self, blob: _Blob, what: str) -> None:
        self._what = what
        self._zstd_error: type[Exception] = zstd_module().ZstdError
        self._inner: Any
        head = b""
        while len(head) < len(_ZSTD_MAGIC) and (piece := blob.read(len(_ZSTD_MAGIC) - len(head))):
            head += piece
        raw = cast(BinaryIO, _Prefixed(head, blob))
        if head.startswith(_GZIP_MAGIC):
            self._inner = _Gunzip(raw)
        elif head.startswith(_ZSTD_MAGIC):
            self._inner = zstd_module().ZstdFile(raw, mode="rb")
        else:
            self._inner = raw

    def read(self, n: int = -1) -> bytes:
        try:
            data: bytes = self._inner.read(n)
        except (RepositoryError, _Cancelled):
            raise
        except (OSError, EOFError, zlib.error, self._zstd_error) as exc:
            raise LayerFormatError(f"{self._what}: cannot decompress: {exc}") from None
        return data


class _ReadAhead:
    """``inner`` read in a thread of its own, at most ``_AHEAD`` chunks ahead of
    the reader. For a tar layer that thread receives the blob, hashes it and
    decompresses it while the caller's splits the tar and stores its files:
    hashlib and zlib work on 1 MiB without the GIL, so the two run on two cores
    (a pull was one core bound, whatever the number of layers at once). What
    ``inner`` raises is raised by :meth:`read`. :meth:`close` stops the thread and
    waits for it; nothing else may read ``inner`` before."""

    def __init__(self, inner: _Decompressed, name: str, hash_name: str | None) -> None:
        self._inner = inner
        #: Of everything read (the tar's diff_id), when asked for.
        self.hasher = hashlib.new(hash_name) if hash_name is not None else None
        self._cond = threading.Condition()
        self._items: collections.deque[bytes | BaseException] = collections.deque()
        self._closed = False
        self._ended = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item: bytes | BaseException
            try:
                item = self._inner.read(_CHUNK)
                if self.hasher is not None:
                    self.hasher.update(item)
            except BaseException as exc:  # handed to the reader, raised there
                item = exc
            with self._cond:
                while len(self._items) >= _AHEAD and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._items.append(item)
                self._cond.notify_all()
            if not isinstance(item, bytes) or not item:
                return

    def read(self, n: int = -1) -> bytes:
        """The next chunk (at most 1 MiB, whatever ``n``); b"" at the end."""
        if self._ended:
            return b""
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            self._cond.notify_all()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        self._ended = not item
        return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()
        self._thread.join()


# -- fetching ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    key: str
    desc: Descriptor
    #: The content id's diff_id is the tar's digest (container images only).
    verify_tar: bool


def _fetch_layer(
    repo: Repository, source: ImageSource, lock: RepoLock, job: _Job, events: _Events
) -> LayerResult:
    desc = job.desc
    content_id = layer_content_id(job.key)

    stats = ImportStats()

    def result(verity: str, skipped: bool) -> LayerResult:
        return LayerResult(job.key, desc.digest, desc.media_type, desc.size, verity, skipped, stats)

    def skip(verity: str) -> LayerResult:
        log.debug("layer %s is present", job.key)
        events.put(Progress("skip", 0, 0, job.key))
        return result(verity, True)

    with join_lock(lock):
        found = existing_stream(repo, content_id)
        if found is not None:
            return skip(found)
        if events.cancel.is_set():
            raise _Cancelled()
        with _content_lock(repo, content_id):
            found = existing_stream(repo, content_id)
            if found is not None:
                return skip(found)
            with contextlib.ExitStack() as stack:
                raw = stack.enter_context(source.open_blob(desc.digest, desc.size))
                blob = _Blob(raw, desc, job.key, events)

                def check() -> None:
                    blob.finish()
                    # Leaving the source's context reports transfer errors it
                    # found only at the end: they too must come before the link.
                    try:
                        stack.close()
                    except OSError as exc:
                        raise BlobTransferError(
                            f"layer {job.key}: blob {desc.digest}: {os_error_text(exc)}",
                            errno=exc.errno,
                        ) from exc

                if desc.media_type in TAR_MEDIA_TYPES:
                    # The reading thread hashes the tar too (off the split's thread).
                    reader = _ReadAhead(
                        _Decompressed(blob, f"layer {job.key}"),
                        f"oci-read-{desc.digest[7:19]}",
                        job.key.partition(":")[0] if job.verify_tar else None,
                    )

                    def read_then_check() -> None:
                        reader.close()
                        check()
                        if reader.hasher is not None:
                            check_diff_id(job.key, reader.hasher.hexdigest())

                    try:
                        verity = import_layer(
                            repo,
                            cast(BinaryIO, reader),
                            job.key,
                            verify=False,
                            check=read_then_check,
                            stats=stats,
                        )
                    except (LayerFormatError, TarFormatError, LayerDigestError):
                        reader.close()
                        # A damaged blob is the cause to name, if it is one.
                        blob.finish()
                        raise
                    finally:
                        reader.close()
                else:
                    verity = _store_blob(repo, content_id, blob, check, stats)
            return result(verity, False)


def _store_blob(
    repo: Repository,
    content_id: str,
    blob: _Blob,
    check: Callable[[], None],
    stats: ImportStats,
) -> str:
    """An artifact's non-tar layer: the blob as one object and an ``oci_blob``
    stream naming it (composefs-rs's ``store_blob_async`` + ``write_stream``)."""
    with repo.object_store() as store:
        stored = store.store_chunks(blob.chunks())
        check()
        if stored.written:
            stats.objects_new += 1
            stats.bytes_new += stored.size
        else:
            stats.objects_present += 1
        writer = SplitStreamWriter(repo.hash_algorithm.digest_size, CONTENT_TYPE_OCI_BLOB)
        writer.write_object(stored.digest, stored.size)
        written = [stored.digest] if stored.written else []
        verity = write_stream(repo, store, writer, content_id, written=written)
    log.info("stored blob %s as stream %s", content_id, verity)
    return verity


def _run_layers(
    repo: Repository,
    source: ImageSource,
    lock: RepoLock,
    jobs: list[_Job],
    progress: ProgressCallback | None,
    parallel: int,
) -> dict[tuple[str, str], LayerResult]:
    """Every job's result (by blob digest and key), largest blob first,
    ``parallel`` at a time; events reported from this thread. The first
    failure stops the others (at their next read) and is raised once all have
    ended."""
    events = _Events()
    failures: list[BaseException] = []
    results: dict[tuple[str, str], LayerResult] = {}
    order = sorted(jobs, key=lambda j: j.desc.size, reverse=True)

    def run(job: _Job) -> LayerResult:
        try:
            return _fetch_layer(repo, source, lock, job, events)
        except _Cancelled:
            raise
        except BaseException as exc:
            failures.append(exc)
            events.cancel.set()
            raise

    def ended(_: Future[LayerResult]) -> None:
        events.queue.put(None)

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="oci-fetch") as pool:
        futures = []
        for job in order:
            future = pool.submit(run, job)
            future.add_done_callback(ended)
            futures.append(future)
        try:
            left = len(futures)
            while left:
                event = events.queue.get()
                if event is None:
                    left -= 1
                elif progress is not None:
                    progress(event)
        except BaseException:
            events.cancel.set()
            raise
    if failures:
        raise failures[0]
    for job, future in zip(order, futures, strict=True):
        if future.cancelled() or future.exception() is not None:
            raise OciPullError(f"layer {job.key} was not fetched")
        results[job.desc.digest, job.key] = future.result()
    return results


def fetch_image(
    repo: Repository,
    source: ImageSource,
    *,
    progress: ProgressCallback | None = None,
    parallel: int | None = None,
) -> FetchResult:
    """Store the image ``source`` gives: layers, config and manifest streams (see
    the module's notes). ``parallel``: layers fetched at once (default
    half the CPUs, 1 to 4). Progress, from this thread: ``config`` and ``manifest``
    (detail: the digest), ``skip`` per reused layer, ``fetch`` with compressed
    bytes done/total per layer read (detail: the diff_id). Raises
    :class:`OciPullError` subclasses for bad images,
    :class:`~composefsd.repository.ocilayer.LayerDigestError` /
    :class:`~composefsd.repository.ocilayer.TarFormatError` for bad layer tars."""
    if parallel is None:
        # Each layer keeps two threads busy (_ReadAhead); more layers at once than
        # cores for them only fight over the GIL (measured: 2 at once on 2 cores
        # was slower than 1).
        parallel = max(1, min(4, (os.cpu_count() or 1) // 2))
    if parallel < 1:
        raise ValueError("parallel must be at least 1")
    repo.ensure_writable()
    manifest_digest, manifest_json = source.fetch_manifest()
    manifest_digest = check_digest(manifest_digest, "the manifest digest")
    if not manifest_digest.startswith("sha256:"):
        raise ManifestFormatError(f"manifest {manifest_digest}: only sha256 manifests are stored")
    if len(manifest_json) > JSON_MAX:
        raise ManifestFormatError(f"manifest {manifest_digest} is larger than {JSON_MAX} bytes")
    # The source has checked the manifest against its digest; the digest is not
    # always the JSON's sha256 (ImageSource.fetch_manifest).
    manifest = _parse_manifest(manifest_json, manifest_digest)
    config_desc = manifest.config
    is_container = config_desc.media_type == MEDIA_OCI_CONFIG
    if is_container:
        for i, desc in enumerate(manifest.layers):
            if desc.media_type not in TAR_MEDIA_TYPES:
                raise UnsupportedMediaTypeError(
                    f"manifest {manifest_digest}: layer {i} ({desc.digest}) has the media type "
                    f"{desc.media_type[:200]!r}, which is no tar layer"
                )
    config_id = OCI_CONFIG_PREFIX + config_desc.digest
    with writer_lock(repo.path) as lock:
        if progress is not None:
            progress(Progress("config", 0, None, config_desc.digest))
        config_verity = existing_stream(repo, config_id)
        layers: list[LayerResult]
        if config_verity is not None:
            layers = _reuse_config(repo, config_id, config_verity, manifest)
            if progress is not None:
                for layer in layers:
                    progress(Progress("skip", 0, 0, layer.diff_id))
        else:
            if config_desc.size > JSON_MAX:
                raise ConfigFormatError(
                    f"config {config_desc.digest} is larger than {JSON_MAX} bytes"
                )
            config_json = source.fetch_config(config_desc.digest, config_desc.size)
            check_blob(config_json, config_desc.digest, config_desc.size, "config")
            keys = _layer_keys(config_json, manifest)
            jobs = [
                _Job(key, desc, is_container)
                for key, desc in zip(keys, manifest.layers, strict=True)
            ]
            done = _run_layers(repo, source, lock, jobs, progress, parallel)
            layers = [done[d.digest, k] for k, d in zip(keys, manifest.layers, strict=True)]
            refs = [(layer.diff_id, layer.verity) for layer in layers]
            with repo.object_store() as store:
                config_verity = write_config_stream(repo, store, config_json, refs)
        refs = [(layer.diff_id, layer.verity) for layer in layers]
        if progress is not None:
            progress(Progress("manifest", 0, None, manifest_digest))
        manifest_verity = existing_stream(repo, OCI_MANIFEST_PREFIX + manifest_digest)
        if manifest_verity is None:
            with repo.object_store() as store:
                manifest_verity = write_manifest_stream(
                    repo,
                    store,
                    manifest_json,
                    config_desc.digest,
                    config_verity,
                    refs,
                    manifest_digest=manifest_digest,
                )
    log.info("fetched OCI image %s (manifest stream %s)", manifest_digest, manifest_verity)
    return FetchResult(
        manifest_digest=manifest_digest,
        manifest_verity=manifest_verity,
        config_digest=config_desc.digest,
        config_verity=config_verity,
        is_container=is_container,
        layers=tuple(layers),
    )


def _reuse_config(
    repo: Repository, config_id: str, config_verity: str, manifest: _Manifest
) -> list[LayerResult]:
    """The layers an existing config stream names (composefs-rs reuses it
    without fetching anything)."""
    with repo.object_store() as store:
        config_json, refs = read_external(store, config_id, config_verity, CONTENT_TYPE_OCI_CONFIG)
    keys = _layer_keys(config_json, manifest)
    named = dict(refs.named_refs)
    layers = []
    for key, desc in zip(keys, manifest.layers, strict=True):
        verity = named.get(key)
        if verity is None:
            raise ConfigFormatError(f"stream {config_id} has no reference to layer {key}")
        layers.append(LayerResult(key, desc.digest, desc.media_type, desc.size, verity, True))
    return layers


# -- pulling -------------------------------------------------------------------------------


def _built_images(
    repo: Repository, fetched: FetchResult, bootable: bool
) -> tuple[str, str | None] | None:
    """(image, boot image or None) when the config stream already names an image
    (and with ``bootable`` a boot image) of every format of the repository, each
    present in ``images/``; None when one must be built.

    Building again would write the very same image and streams (the image id
    depends only on the layers, the streams only on the image ids), but it reads
    every layer stream: on a re-pull that is nearly all the time spent. This is
    what composefs-rs's layer sync does (``composefs_erofs_for_manifest`` before
    ``ensure_oci_composefs_erofs``). A missing or damaged image file builds
    again, which repairs it."""
    with repo.object_store() as store:
        image = open_image(repo, store, fetched.manifest_digest, fetched.manifest_verity)
    found: dict[bool, str] = {}
    for boot in (False, True) if bootable else (False,):
        for version in repo.formats.versions():
            ref = image.boot_erofs_image(version) if boot else image.erofs_image(version)
            if ref is None or not _image_linked(repo, ref):
                return None
            found.setdefault(boot, ref)
    return found[False], found.get(True)


def _image_linked(repo: Repository, ref: str) -> bool:
    """Whether ``images/<ref>`` links to its object and the object is a file, read
    without following the link (links of ``images/`` are never followed)."""
    try:
        if os.readlink(repo.images_dir / ref) != object_link_target(ref):
            return False
        return stat.S_ISREG(os.lstat(repo.objects_dir / object_relpath(ref)).st_mode)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class PullResult:
    manifest_digest: str
    #: The import-time manifest stream (what ``cfsctl oci pull`` prints as ``verity``).
    manifest_verity: str
    config_digest: str
    config_verity: str
    #: The composefs image in the repository's format; None for an artifact.
    image_id: str | None
    #: The boot image (``bootable``), in the repository's format.
    boot_image_id: str | None
    #: In manifest order.
    layers: tuple[LayerResult, ...]

    @property
    def stats(self) -> ImportStats:
        """What the layers' import stored, all together."""
        total = ImportStats()
        for layer in self.layers:
            total.add(layer.stats)
        return total


def pull(
    repo: Repository,
    source: ImageSource,
    *,
    tag: str | None = None,
    bootable: bool = False,
    progress: ProgressCallback | None = None,
    parallel: int | None = None,
    xattrs: XattrFilter = XattrFilter.ALLOWLIST_ONLY,
) -> PullResult:
    """Fetch the image (:func:`fetch_image`), build and commit its composefs image
    for the repository's formats (and with ``bootable`` the boot image too) and
    point ``tag`` at it, as ``cfsctl oci pull [--bootable] REF TAG`` does. The tag
    is written last, so a pull that fails leaves no tag (and never moves an
    existing one). Progress as :func:`fetch_image`'s, then ``image`` (detail: the
    manifest digest) while the composefs image is built. ``xattrs``: what the boot
    image keeps (``cfsctl oci pull --bootable --xattrs``)."""
    from composefsd.repository.ocibuild import ensure_image

    if tag is not None:
        check_tag(tag)
    # One shared lock from the first stream to the tag: the streams written are
    # no GC root until the tag names them.
    with writer_lock(repo.path):
        fetched = fetch_image(repo, source, progress=progress, parallel=parallel)
        if progress is not None:
            progress(Progress("image", 0, None, fetched.manifest_digest))
        image_id = boot_id = None
        reusable = fetched.is_container and xattrs is XattrFilter.ALLOWLIST_ONLY
        built = _built_images(repo, fetched, bootable) if reusable else None
        if built is not None:
            image_id, boot_id = built
            if tag is not None:
                tag_image(repo, fetched.manifest_digest, tag)
        elif fetched.is_container:
            # By the manifest stream's object, not by the digest: a manifest that
            # skopeo converted from Docker's format is not its digest's JSON.
            image_id = ensure_image(
                repo,
                fetched.manifest_digest,
                fetched.manifest_verity,
                None if bootable else tag,
            )
            if bootable:
                rewritten = existing_stream(repo, OCI_MANIFEST_PREFIX + fetched.manifest_digest)
                boot_id = ensure_image(
                    repo, fetched.manifest_digest, rewritten, tag, bootable=True, xattrs=xattrs
                )
        elif tag is not None:
            tag_image(repo, fetched.manifest_digest, tag)
    log.info(
        "pulled OCI image %s%s (composefs image %s)",
        fetched.manifest_digest,
        f" as {tag}" if tag is not None else "",
        image_id,
    )
    return PullResult(
        manifest_digest=fetched.manifest_digest,
        manifest_verity=fetched.manifest_verity,
        config_digest=fetched.config_digest,
        config_verity=fetched.config_verity,
        image_id=image_id,
        boot_image_id=boot_id,
        layers=fetched.layers,
    )
