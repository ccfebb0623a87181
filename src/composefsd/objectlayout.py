"""Where an object lives: ``XX/rest`` below an objects directory, named by its digest.

One home for the layout that a repository's ``objects/``, C ``mkcomposefs
--digest-store`` and overlayfs data-only layers (the payloads of an image) share:
an object's path is its lowercase hex digest with a ``/`` after the first two
digits. Temporaries live directly in the objects directory, never in ``XX/``:
ours are ``.tmp-object-*`` (named files where ``O_TMPFILE`` is not available),
C's ``.tmpXXXXXX``.

Why here, a top-level module that imports nothing of composefsd: the digest store
the scanner fills (:mod:`composefsd.sources.directory`) has this layout, and
``sources/`` is below ``repository/``; :mod:`composefsd.kernel.mount` samples the
objects of any basedir, not only a repository's. So the layout sits beside
:mod:`composefsd.fsverity`, below both, and :class:`composefsd.repository.store.ObjectStore`
is the repository's use of it. It does I/O only to answer :func:`contains` and
:func:`iter_objects`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from composefsd.kernel.verity import Algorithm

__all__ = [
    "C_TMP_PREFIX",
    "HEX_DIGITS",
    "TMP_PREFIX",
    "contains",
    "digest_of_link_target",
    "digest_of_relpath",
    "is_hex",
    "is_hex_digest",
    "is_object_dir_name",
    "is_object_rest",
    "is_temp_name",
    "iter_objects",
    "join_store_path",
    "link_file_name",
    "object_link_digest",
    "object_link_target",
    "object_payload",
    "object_relpath",
]

HEX_DIGITS = frozenset("0123456789abcdef")
#: Our named temporaries in an objects directory.
TMP_PREFIX = ".tmp-object-"
#: C mkcomposefs's temporaries (``mkostemp(".tmpXXXXXX")``); a prefix of ours too.
C_TMP_PREFIX = ".tmp"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


def is_hex(text: str) -> bool:
    """Non-empty lowercase hex (uppercase is not a name the layout ever makes)."""
    return bool(text) and HEX_DIGITS.issuperset(text)


def is_hex_digest(name: str, algorithm: Algorithm) -> bool:
    """A whole digest of ``algorithm`` in lowercase hex."""
    return len(name) == 2 * algorithm.digest_size and HEX_DIGITS.issuperset(name)


def is_object_dir_name(name: str) -> bool:
    """``XX``: two lowercase hex digits."""
    return len(name) == 2 and HEX_DIGITS.issuperset(name)


def is_object_rest(name: str, algorithm: Algorithm) -> bool:
    """The rest of a digest of ``algorithm`` after its first two hex digits."""
    return len(name) == 2 * algorithm.digest_size - 2 and HEX_DIGITS.issuperset(name)


def is_temp_name(name: str) -> bool:
    """A temporary in an objects directory, ours or C's."""
    return name.startswith(C_TMP_PREFIX)


def object_relpath(hexdigest: str) -> str:
    """``XX/rest``: the object's path relative to the objects directory.

    Not checked (this is on the import's hot path): callers pass digests they
    computed, or names they checked with :func:`is_hex`/:func:`is_hex_digest`.
    """
    return f"{hexdigest[:2]}/{hexdigest[2:]}"


def object_payload(digest: bytes) -> bytes:
    """``XX/rest`` of a raw digest, as bytes: an image's payload, C's path in a digest store."""
    hexed = digest.hex().encode()
    return hexed[:2] + b"/" + hexed[2:]


def digest_of_relpath(rel: str, algorithm: Algorithm) -> str | None:
    """The hex digest an ``XX/rest`` path names, or None for anything else: a wrong
    length, uppercase or other non-hex characters, ``..``, more or fewer components."""
    if len(rel) != 2 * algorithm.digest_size + 1 or rel[2:3] != "/":
        return None
    hexdigest = rel[:2] + rel[3:]
    return hexdigest if HEX_DIGITS.issuperset(hexdigest) else None


def digest_of_link_target(target: str, algorithm: Algorithm) -> str | None:
    """The object a link to an object names (``images/<id>``, ``streams/<name>``:
    ``../objects/XX/rest``), read as composefs-rs's ``from_object_pathname`` reads
    it, so that both agree on what a repository's links keep alive: the last
    ``2 * size + 1`` characters are ``XX/rest`` in hex of either case (returned in
    lowercase); whatever comes before is not looked at. None if they are not."""
    width = 2 * algorithm.digest_size + 1
    tail = target[-width:]
    if len(target) < width or tail[2] != "/" or not tail.isascii():
        return None
    hexdigest = (tail[:2] + tail[3:]).lower()
    return hexdigest if HEX_DIGITS.issuperset(hexdigest) else None


#: What composefsd and composefs-rs write as the target of ``images/<id>`` and
#: ``streams/<name>`` (both one level below the repository), before ``XX/rest``.
OBJECT_LINK_PREFIX = "../objects/"


def object_link_target(hexdigest: str) -> str:
    """``../objects/XX/rest``: the target of the ``images/`` or ``streams/`` link to
    the object ``hexdigest``."""
    return OBJECT_LINK_PREFIX + object_relpath(hexdigest)


def object_link_digest(target: str, algorithm: Algorithm) -> str | None:
    """The object an ``images/<id>`` or ``streams/<name>`` link leads to, for those
    that open it: None unless ``target`` is exactly ``../objects/XX/rest`` in
    lowercase hex of ``algorithm``. Such a link is then opened as the object of that
    digest below ``objects/``, never by following the link, so that a link planted
    to lead elsewhere (``/etc/shadow``, ``../../x/objects/XX/rest``) is never read.
    The digest is :func:`digest_of_link_target`'s (what GC keeps alive for it)."""
    digest = digest_of_link_target(target, algorithm)
    if digest is None or target != object_link_target(digest):
        return None
    return digest


def link_file_name(target: str) -> str | None:
    """The name a ref link's target ends in, as composefs-rs reads refs (Rust's
    ``Path::file_name``): the last component, ignoring ``.`` components and
    trailing slashes; None when that is ``..`` or there is none."""
    parts = [p for p in target.split("/") if p not in ("", ".")]
    if not parts or parts[-1] == "..":
        return None
    return parts[-1]


def join_store_path(base: bytes, rel: bytes) -> bytes:
    """C ``join_paths``: trailing slashes of ``base`` are trimmed; an empty base stays empty."""
    if not base:
        return rel
    return base.rstrip(b"/") + b"/" + rel


def _open_dir(objects_dir: int | str | bytes) -> int:
    if isinstance(objects_dir, int):
        # Also works where ``objects_dir`` is an O_PATH fd, which scandir cannot read.
        return os.open(".", _DIR_FLAGS, dir_fd=objects_dir)
    return os.open(objects_dir, _DIR_FLAGS)


def contains(objects_dir: int | str | bytes, hexdigest: str) -> bool:
    """Whether anything is at ``hexdigest``'s path below ``objects_dir`` (a directory
    fd or path): C mkcomposefs's test (an ``lstat``) of whether an object exists."""
    rel = object_relpath(hexdigest)
    try:
        if isinstance(objects_dir, int):
            os.lstat(rel, dir_fd=objects_dir)
        else:
            os.lstat(os.path.join(os.fsdecode(objects_dir), rel))
    except OSError:
        return False
    return True


def iter_objects(objects_dir: int | str | bytes, algorithm: Algorithm) -> Iterator[str]:
    """The hex digests of the regular files below ``objects_dir`` (a directory fd or
    path) that are well-named objects of ``algorithm``, in directory order.

    Temporaries, other names and other types are skipped; directories that cannot
    be read are too (the caller only wants what is there, e.g. a sample). An
    unreadable ``objects_dir`` raises ``OSError``.
    """
    top = _open_dir(objects_dir)
    try:
        with os.scandir(top) as entries:
            subdirs = [
                e.name
                for e in entries
                if is_object_dir_name(e.name) and e.is_dir(follow_symlinks=False)
            ]
        for name in subdirs:
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=top)
            except OSError:
                continue
            try:
                with os.scandir(sub) as objects:
                    found = [
                        o.name
                        for o in objects
                        if is_object_rest(o.name, algorithm) and o.is_file(follow_symlinks=False)
                    ]
            except OSError:
                found = []
            finally:
                os.close(sub)
            for rest in found:
                yield name + rest
    finally:
        os.close(top)
