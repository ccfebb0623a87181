"""The digest cache: digests of a source tree's files from its previous import.

Re-importing an unchanged tree would read and hash every byte of it again (C
mkcomposefs does: 5.4 GB for /usr). The cache remembers, per path of a tree, the
file's key as the scan saw it, ``(st_dev, st_ino, st_size, st_mtime_ns,
st_ctime_ns)``, and the digest its content had; a file the next scan finds with
exactly that key is not opened at all. Two more things an import of an unchanged
tree would otherwise redo: the inodes found without xattrs, by ``(st_dev, st_ino,
st_ctime_ns)``, which the scan then does not ask (:meth:`DigestCache.known_bare`),
and the images, by a key of everything they are made of (:meth:`DigestCache.image_key`),
which are then not written again.

What it trusts, and why that cannot be fooled from the tree's side:

* that a file whose key is unchanged has unchanged content. The kernel sets the
  change time to the current time at every write, truncate, ``fallocate`` or
  metadata change, and no system call sets a chosen one (restoring the
  modification time and size of a file rewritten in place moves its change time);
  a file put in its place (rename, delete and create) is another inode, or the
  same inode number with its own, later, change time. An entry is only kept when
  the file was the same before and after it was hashed and its change time lay
  settled before the hashing began (:func:`composefsd.sources.beneath.settled`:
  change times come from a coarse clock, so a write in the same tick as the
  change before could keep the key). Outside that: root setting the clock back and
  writing within the remembered tick, a shared writable mapping made before the
  hashing, the disk written beneath the filesystem: each needs root;
* that an inode whose key is unchanged has the xattrs it had: setting or removing
  one moves the change time too. Kept under the same settle rule, and only for
  the boot that found them (``boot_id``): a reboot may bring another kernel,
  other mounts or another security policy;
* that images are a function of their :meth:`DigestCache.image_key`: the scan's
  fingerprint of the tree, every file's digest or inline content, the options,
  formats, algorithm and composefsd's version. An image is reused only if it is
  in the store whole (its size, and its digest measured or hashed again);
* the cache file itself. It lives in the repository (``cache/digests-<alg>-<hash
  of the source path>``, directory 0700, file 0600: only the daemon, root, can
  write it), so whoever could write it could write the objects anyway. It is
  still read as untrusted bytes: a checksum over it, every count and length
  checked, the algorithm and source path it names compared; a damaged,
  truncated, foreign or oversized file is an empty cache, never an error;
* nothing about the objects: every use looks the object up in the store again
  (its presence, that it is a regular file and its size; with fs-verity, its
  verity as :meth:`~composefsd.repository.store.ObjectStore.existing` checks it).
  A hit whose object is gone is hashed again while it is copied; one that is
  damaged is imported afresh, replacing it. Without fs-verity those lookups are
  made by a worker process while the tree is scanned (:meth:`DigestCache.look_up_objects`,
  :mod:`composefsd.sources.presence`): the same ``lstat`` and checks, under the
  same repository lock, on an fd of the same objects directory; any other
  answer than present, missing or damaged is looked up again here.

A tree imported before also has its scan shared with a worker process
(:meth:`DigestCache.scan_split`, :class:`~composefsd.sources.directory.ScanSplit`):
the cache only says how big its top directories were, to balance the work, and
which inodes are bare (as above); the worker reads with the same rights and the
scan's own code, beneath directories the scan opened and checked.

It is used only where opening the file proves nothing the caller needs: imports
with the importing process's own rights (root's CreateImage, the library). A
caller's tree read with the caller's rights (the daemon for other users) opens
every file as the caller, so no cache is used there
(:func:`composefsd.repository.images.create_from_scan`).

Bounded: at most ``MAX_ENTRIES`` entries per tree (those found unchanged first,
then new ones in scan order), as many bare inodes, at most ``MAX_FILES`` trees per
repository (the least recently written go), and GC drops trees not imported for
30 days. The file is rewritten atomically (without fsync: losing it only costs
time) after an import that changed it; a tree imported once, all of it changed
within the settle window, gets none.

The file: ``MAGIC``, a header (lengths and counts), the algorithm name and source
path, the relative paths joined by NUL (which no path holds), five arrays of
64-bit key fields, the digests end to end, the image key and images, the boot id
and three arrays of the bare inodes, and the SHA-256 of all of it.
"""

from __future__ import annotations

import hashlib
import logging
import marshal
import os
import stat
import struct
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from composefsd.kernel.verity import Algorithm
from composefsd.repository import cachefile
from composefsd.repository.errors import os_error_text
from composefsd.repository.importer import ImportResult, ImportTask
from composefsd.repository.store import ObjectResult, ObjectStore
from composefsd.sources.beneath import SETTLE_NS, settled_until
from composefsd.sources.directory import BareKey, ScanSplit
from composefsd.sources.presence import DAMAGED, FAILED, MISSING, PRESENT, PresenceCheck

__all__ = ["DigestCache"]

log = logging.getLogger(__name__)

MAGIC = b"cfsd-dc5"
#: magic, digest size, meta length, count, paths length, images length, bare count
_HEADER = struct.Struct("<8sIIQQIQ")
_BOOT_ID = 16
_IMAGE = struct.Struct("<IQ")  # erofs version, size; then the digest
_SUM = cachefile.SUM_SIZE
_LITTLE = sys.byteorder == "little"


def _copy_task(task: ImportTask) -> ImportTask:
    """``task``, hashed as it is copied (an unchanged file whose object is gone)."""
    return ImportTask(task.rel, task.size, task.expected, False, True, task.key)


@dataclass(slots=True)
class _Columns:
    """Entries column by column: row ``i`` is ``rels[i]``, its key from the five
    arrays, and digest ``digests[i * size:(i + 1) * size]``."""

    rels: list[bytes]
    dev: array[int]
    ino: array[int]
    size: array[int]
    mtime: array[int]
    ctime: array[int]
    digests: bytes
    #: The key of the images the last import made (:meth:`DigestCache.image_key`),
    #: and those images: (erofs version, hex digest, size).
    image_key: bytes = b""
    images: tuple[tuple[int, str, int], ...] = ()
    #: Inodes found without xattrs, and the boot (``boot_id``) that found them.
    bare: list[BareKey] = field(default_factory=list)
    bare_boot: bytes = b""
    #: The same as three arrays of native 64-bit integers end to end (as read).
    bare_wire: bytes = b""
    #: Row by path, if made already.
    index: dict[bytes, int] | None = None

    @classmethod
    def empty(cls) -> _Columns:
        return cls([], array("Q"), array("Q"), array("Q"), array("q"), array("q"), b"")

    def arrays(self) -> tuple[array[int], ...]:
        return self.dev, self.ino, self.size, self.mtime, self.ctime


_Corrupt = cachefile.CacheFileError


def _meta(algorithm: Algorithm, source: bytes) -> bytes:
    return algorithm.value.encode() + b"\0" + source


def _decode(body: bytes, meta: bytes, digest_size: int, max_entries: int) -> _Columns:
    """The entries of a cache file's body (its checksum checked by
    :func:`composefsd.repository.cachefile.read`); :class:`_Corrupt` for anything
    but a whole file of this algorithm and source."""
    if len(body) < _HEADER.size:
        raise _Corrupt("truncated")
    magic, size, meta_len, count, paths_len, images_len, bare = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise _Corrupt("not a digest cache of this version")
    if size != digest_size or count > max_entries or bare > max_entries:
        raise _Corrupt(f"{count} entries of {size}-byte digests, {bare} bare inodes")
    pos = _HEADER.size
    bare_len = _BOOT_ID + 24 * bare if bare else 0
    if len(body) != (
        pos + meta_len + paths_len + count * (40 + digest_size) + images_len + bare_len
    ):
        raise _Corrupt("lengths do not add up")
    if body[pos : pos + meta_len] != meta:
        raise _Corrupt("another algorithm or source")
    pos += meta_len
    rels = body[pos : pos + paths_len].split(b"\0") if count else []
    pos += paths_len
    if len(rels) != count or (count and not all(rels)):
        raise _Corrupt("bad paths")
    index = _index(rels)
    if len(index) != count:
        raise _Corrupt("a path twice")
    cols = _Columns.empty()
    cols.rels = rels
    cols.index = index
    for arr in cols.arrays():
        arr.frombytes(body[pos : pos + 8 * count])
        if not _LITTLE:
            arr.byteswap()
        pos += 8 * count
    cols.digests = body[pos : pos + count * digest_size]
    pos += count * digest_size
    if images_len:
        one = _IMAGE.size + digest_size
        if images_len < _SUM + one or (images_len - _SUM) % one:
            raise _Corrupt("bad image list")
        cols.image_key = body[pos : pos + _SUM]
        images = []
        for at in range(pos + _SUM, pos + images_len, one):
            version, image_size = _IMAGE.unpack_from(body, at)
            images.append((version, body[at + _IMAGE.size : at + one].hex(), image_size))
        cols.images = tuple(images)
        pos += images_len
    if bare:
        cols.bare_boot = body[pos : pos + _BOOT_ID]
        pos += _BOOT_ID
        columns = []
        for typecode in "QQq":
            arr = array(typecode, body[pos : pos + 8 * bare])
            if not _LITTLE:
                arr.byteswap()
            columns.append(arr)
            pos += 8 * bare
        cols.bare = list(zip(*columns, strict=True))
        cols.bare_wire = b"".join(arr.tobytes() for arr in columns)
    return cols


def _index(rels: list[bytes]) -> dict[bytes, int]:
    return dict(zip(rels, range(len(rels)), strict=True))


def _le_bytes(arr: array[int]) -> bytes:
    if not _LITTLE:
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


def _encode(cols: _Columns, meta: bytes, digest_size: int) -> bytes:
    paths = b"\0".join(cols.rels)
    images = b""
    if cols.image_key and cols.images:
        images = cols.image_key + b"".join(
            _IMAGE.pack(version, size) + bytes.fromhex(hexdigest)
            for version, hexdigest, size in cols.images
        )
    bare = cols.bare if len(cols.bare_boot) == _BOOT_ID else []
    header = _HEADER.pack(
        MAGIC, digest_size, len(meta), len(cols.rels), len(paths), len(images), len(bare)
    )
    parts = [header, meta, paths, *map(_le_bytes, cols.arrays()), cols.digests, images]
    if bare:
        dev, ino, ctime = zip(*bare, strict=True)
        parts.append(cols.bare_boot)
        parts += map(_le_bytes, (array("Q", dev), array("Q", ino), array("q", ctime)))
    return b"".join(parts)


def _boot_id() -> bytes:
    """This boot's id (16 bytes), or b"" where the kernel does not tell it."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            text = f.read(64).strip().replace(b"-", b"")
        boot = bytes.fromhex(text.decode("ascii"))
    except (OSError, ValueError):
        return b""
    return boot if len(boot) == _BOOT_ID else b""


class DigestCache:
    """Digests of one source tree's files from the previous import of that tree
    (module notes: what it trusts)."""

    #: How long before an import a file's change time must lie for its digest to be
    #: kept (:func:`composefsd.sources.beneath.settled`).
    RACY_NS = SETTLE_NS
    #: Entries kept per tree, and trees per repository (module notes).
    MAX_ENTRIES = 4_000_000
    MAX_FILES = 64
    #: From this many files on, a re-import looks its objects up and shares its
    #: scan with worker processes (:meth:`look_up_objects`, :meth:`scan_split`):
    #: below, starting one costs more than it saves.
    WORKER_MIN_FILES = 20_000
    #: About how much of the walk the worker takes (:attr:`ScanSplit.share`). Less
    #: than half: the worker shares its CPU with the object lookups' worker
    #: (:meth:`look_up_objects`), starts later and sends its part back to be
    #: adopted, so with half the caller waited for it (/usr: 0.3-0.4 s idle).
    SPLIT_SHARE = 0.42

    def __init__(
        self, path: str | None, algorithm: Algorithm, source: bytes, cols: _Columns
    ) -> None:
        self.path = path
        self.algorithm = algorithm
        self.source = source
        self._cols = cols
        self._index = cols.index if cols.index is not None else _index(cols.rels)
        #: Rows of the loaded entries the last :meth:`resolve` found unchanged.
        self._kept: dict[bytes, int] = {}
        #: When the import began: only files settled before it are kept.
        self.stamp_ns = time.time_ns()
        #: The objects of the loaded entries, being looked up (:meth:`look_up_objects`).
        self._presence: PresenceCheck | None = None
        self._presence_fd = -1

    def __len__(self) -> int:
        return len(self._cols.rels)

    @classmethod
    def file_name(cls, algorithm: Algorithm, source: bytes) -> str:
        real = os.path.realpath(source)
        return f"digests-{algorithm.value}-{hashlib.sha256(real).hexdigest()[:32]}"

    @classmethod
    def open(
        cls, cache_dir: str | os.PathLike[str], source: bytes, algorithm: Algorithm
    ) -> DigestCache:
        """The cache of the tree at ``source`` (empty if there is none, or it is
        unreadable or damaged)."""
        path = os.path.join(os.fspath(cache_dir), cls.file_name(algorithm, source))
        cols = _Columns.empty()
        size = algorithm.digest_size
        limit = _HEADER.size + _SUM * 2 + 2 * len(source) + cls.MAX_ENTRIES * (64 + size + 4096)
        try:
            data = cachefile.read(path, limit)
            if data is not None:
                cols = _decode(data, _meta(algorithm, source), size, cls.MAX_ENTRIES)
        except _Corrupt as exc:
            log.info("ignoring digest cache %s: %s", path, exc)
        except OSError as exc:
            log.info("ignoring unreadable digest cache %s: %s", path, os_error_text(exc))
        return cls(path, algorithm, source, cols)

    def look_up_objects(self, store: ObjectStore) -> None:
        """Start looking up the objects of every loaded entry in ``store`` (present, a
        regular file, the entry's size), in a worker process, for :meth:`resolve` to
        use: it depends on the cache alone, so it runs while the caller scans the
        tree (:class:`~composefsd.sources.presence.PresenceCheck`). Only where a
        lookup is that one ``stat`` (no fs-verity to look at), and for at least
        ``WORKER_MIN_FILES`` entries; under the caller's repository lock, as
        :meth:`resolve`'s own would be. :meth:`close` ends it."""
        cols = self._cols
        if (
            self._presence is not None
            or len(cols.rels) < self.WORKER_MIN_FILES
            or store._wants_verity()
        ):
            return
        # Its own fd on the objects directory: the worker inherits it, whatever
        # becomes of the store's meanwhile.
        self._presence_fd = os.dup(store.dir_fd)
        self._presence = PresenceCheck(
            self._presence_fd, cols.digests, self.algorithm.digest_size, cols.size
        )

    def _object_statuses(self) -> bytes | None:
        presence = self._presence
        return presence.result() if presence is not None else None

    def close(self) -> None:
        """Wait for :meth:`look_up_objects`' worker, if any, and let go of its fd."""
        if self._presence is not None:
            self._presence.result()
            self._presence = None
        if self._presence_fd >= 0:
            os.close(self._presence_fd)
            self._presence_fd = -1

    def resolve(
        self, store: ObjectStore, tasks: Sequence[ImportTask]
    ) -> tuple[dict[int, ImportResult], list[ImportTask]]:
        """Split ``tasks``: results for the cache hits (by index), and the tasks left
        to import. A file that is unchanged but whose object is gone is marked to be
        hashed as it is copied; one whose object is damaged is imported afresh."""
        hits: dict[int, ImportResult] = {}
        rest: list[ImportTask] = []
        kept: dict[bytes, int] = {}
        self._kept = kept
        if not self._index:
            return hits, list(tasks)
        index = self._index
        cols = self._cols
        width = self.algorithm.digest_size
        # Rows as tuples, compared in one go: cheaper than field by field here.
        keys = list(zip(*cols.arrays(), strict=True))
        digests = [cols.digests[i : i + width] for i in range(0, len(keys) * width, width)]
        # Without verity to look at, a hit costs one stat call; this loop is most of
        # what re-importing an unchanged tree costs, so it avoids per-call overhead.
        plain = not store._wants_verity()
        dir_fd = store.dir_fd
        # The lookups look_up_objects made meanwhile (by row: the row's size is the
        # task's, as their keys are equal); FAILED ones, or none, are made here.
        statuses = self._object_statuses() if plain else None
        for i, task in enumerate(tasks):
            key = task.key
            row = index.get(task.rel) if key is not None and not task.inline else None
            if row is None or key != keys[row] or key[2] != task.size:
                rest.append(task)
                continue
            digest = digests[row]
            status = statuses[row] if statuses is not None else FAILED
            if status == PRESENT:
                hits[i] = ImportResult(digest, None, False, False, None)
                kept[task.rel] = row
                continue
            if status == MISSING:
                rest.append(_copy_task(task))
                continue
            if status == DAMAGED:
                rest.append(task)  # damaged: the import replaces it
                continue
            if plain:
                hexed = digest.hex()
                try:
                    ost = os.stat(f"{hexed[:2]}/{hexed[2:]}", dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    rest.append(_copy_task(task))
                    continue
                if not stat.S_ISREG(ost.st_mode) or ost.st_size != task.size:
                    rest.append(task)  # damaged: the import replaces it
                    continue
                hits[i] = ImportResult(digest, None, False, False, None)
                kept[task.rel] = row
                continue
            found = store.existing(digest, task.size)
            if isinstance(found, ObjectResult):
                hits[i] = ImportResult(digest, None, False, found.verity, None)
                kept[task.rel] = row
            elif found is None:
                rest.append(_copy_task(task))
            else:
                rest.append(task)  # damaged: the import replaces it
        return hits, rest

    def known_bare(self) -> set[BareKey]:
        """Inodes (device, inode, change time) the last import of the tree found
        without xattrs, for the scan to take on trust (module notes); none after a
        reboot."""
        cols = self._cols
        if not cols.bare or cols.bare_boot != _boot_id():
            return set()
        return set(cols.bare)

    def scan_split(self) -> ScanSplit | None:
        """How the scan of the tree may share its walk with a worker process
        (:class:`~composefsd.sources.directory.ScanSplit`): its top directories
        weighted by the files the last import found beneath them, and the inodes
        known to be bare. None for a tree too small to be worth a second process,
        or not imported before.

        The weights are counted whole, not sampled: the split decides the order of
        the scan's files and fingerprint records, and so the image key, which must
        come out the same for the same tree (the set of paths, not their order in
        the file)."""
        rels = self._cols.rels
        if len(rels) < self.WORKER_MIN_FILES:
            return None
        weights = Counter(rel.partition(b"/")[0] for rel in rels)
        cols = self._cols
        bare = cols.bare_wire if cols.bare and cols.bare_boot == _boot_id() else b""
        return ScanSplit(dict(weights), bare, self.SPLIT_SHARE)

    @staticmethod
    def image_key(fingerprint: bytes, settings: bytes, results: Sequence[ImportResult]) -> bytes:
        """What the images of an import are a function of: the scan's fingerprint of
        the tree (:attr:`composefsd.sources.directory.SourceScan.fingerprint`), the
        ``settings`` that shape the images (options, formats, algorithm, version of
        this code), and every file's digest or inline content."""
        h = hashlib.sha256(b"composefsd image key 1\0")
        h.update(len(settings).to_bytes(8, "little") + settings)
        h.update(fingerprint)
        h.update(marshal.dumps([(r.digest, r.content) for r in results], 2))
        return h.digest()

    def images_for(self, key: bytes) -> tuple[tuple[int, str, int], ...]:
        """The images (erofs version, hex digest, size) the previous import made from
        inputs with this :meth:`image_key`, if it was the same; else none. Whoever
        uses them checks that the objects are there and are those images."""
        cols = self._cols
        return cols.images if key and cols.image_key == key else ()

    def save(
        self,
        tasks: Sequence[ImportTask],
        results: Sequence[ImportResult],
        image_key: bytes = b"",
        images: Sequence[tuple[int, str, int]] = (),
        bare: Sequence[BareKey] = (),
    ) -> None:
        """Keep this import's digests: the hits of :meth:`resolve` as they were, and
        the files hashed now whose change time had settled; the images made from
        ``image_key``'s inputs; and the inodes the scan found without xattrs whose
        change time had settled. Written only if something changed."""
        if self.path is None:
            return
        images = tuple(images) if image_key else ()
        same_rest = (image_key, images) == (self._cols.image_key, self._cols.images)
        boot = _boot_id()
        until = settled_until(self.stamp_ns, self.RACY_NS)
        fresh_bare = [k for k in bare if k[2] <= until] if boot else []
        fresh_bare = fresh_bare[: self.MAX_ENTRIES]
        same_rest = same_rest and boot == self._cols.bare_boot and fresh_bare == self._cols.bare
        old = self._cols
        kept = self._kept
        new = [
            (task, result)
            for task, result in zip(tasks, results, strict=True)
            if result.stat is not None
            and result.digest is not None
            and task.rel not in kept
            and result.stat[4] <= until
        ]
        if not new and len(kept) == len(old.rels) and same_rest:
            return  # the same entries (every old row was found unchanged), images, bare inodes
        fresh = _Columns.empty()
        if images:
            fresh.image_key = image_key
            fresh.images = images
        if fresh_bare:
            fresh.bare = fresh_bare
            fresh.bare_boot = boot
        rels = fresh.rels
        digests: list[bytes] = []
        arrays = fresh.arrays()
        width = self.algorithm.digest_size
        limit = self.MAX_ENTRIES
        old_arrays = old.arrays()
        for rel, row in kept.items():
            if len(rels) >= limit:
                break
            rels.append(rel)
            digests.append(old.digests[row * width : (row + 1) * width])
            for arr, col in zip(arrays, old_arrays, strict=True):
                arr.append(col[row])
        for task, result in new:
            if len(rels) >= limit:
                break
            assert result.stat is not None and result.digest is not None
            rels.append(task.rel)
            digests.append(result.digest)
            for arr, value in zip(arrays, result.stat, strict=True):
                arr.append(value)
        if not rels and not fresh.bare and not (old.rels or old.bare or old.images):
            # Nothing settled in a tree met for the first time: no file (a repository
            # composefs-rs shares gets no cache/ for a tree imported once, fresh).
            return
        fresh.digests = b"".join(digests)
        self._write(_encode(fresh, _meta(self.algorithm, self.source), width))
        self._cols = fresh
        self._index = _index(rels)
        self._kept = {}

    def _write(self, data: bytes) -> None:
        assert self.path is not None
        if cachefile.write(self.path, data):
            # At most MAX_FILES trees' caches: the least recently written go.
            cachefile.prune(os.path.dirname(self.path), "digests-", self.MAX_FILES, self.path)
