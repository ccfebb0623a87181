"""OCI images as composefs-rs (``cfsctl oci pull``) stores them in a repository.

An image is three kinds of splitstream (:mod:`composefsd.repository.streams`):

* ``oci-manifest-<digest>``: the manifest JSON as its one object ref; named refs
  ``config:<config digest>`` (the config stream's object) and, per layer,
  ``<diff_id>`` (the layer stream's object);
* ``oci-config-<digest>``: the config JSON as its one object ref; named refs
  ``<diff_id>`` per layer and the EROFS images made from it: ``composefs.image``
  (format V2), ``composefs.image.v1`` (V0/V1), ``composefs.image.boot[.v1]`` and
  ``composefs.image.boot[.v1].xattrs=<mode>`` (bootable variants);
* ``oci-layer-<diff_id>``: the layer tar, inline headers and file objects.

Tags are ``streams/refs/oci/<tag>`` → ``../../oci-manifest-<digest>``, the tag
percent-encoded (``%`` → ``%25``, ``/`` → ``%2F``). This module reads them as
composefs-rs 0.9 does (``oci_image.rs``), lists them (``cfsctl oci images``),
describes one (``cfsctl oci inspect``) and traces what one tag keeps alive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from composefsd.image.formats import ErofsVersion
from composefsd.objectlayout import is_hex, link_file_name
from composefsd.repository.errors import InvalidNameError, RepositoryError, os_error_text
from composefsd.repository.images import fsync_dir
from composefsd.repository.locking import writer_lock
from composefsd.repository.streams import (
    StreamError,
    StreamNotFoundError,
    existing_stream,
    name_stream,
    read_stream,
    stream_links,
    trace_streams,
    write_stream,
)
from composefsd.splitstream import (
    CONTENT_TYPE_OCI_CONFIG,
    CONTENT_TYPE_OCI_MANIFEST,
    OCI_CONFIG_PREFIX,
    OCI_MANIFEST_PREFIX,
    SplitStreamWriter,
    StreamRefs,
)

if TYPE_CHECKING:
    from composefsd.repository.repo import Repository
    from composefsd.repository.store import ObjectStore

__all__ = [
    "BOOT_IMAGE_REF_KEY",
    "BOOT_IMAGE_REF_KEY_V1",
    "IMAGE_REF_KEY",
    "IMAGE_REF_KEY_V1",
    "OCI_REF_PREFIX",
    "OciError",
    "OciImage",
    "OciTagError",
    "OciTrace",
    "check_tag",
    "decode_tag",
    "encode_tag",
    "iter_tags",
    "json_object",
    "list_images",
    "open_image",
    "open_stored",
    "open_tag",
    "read_external",
    "tag_image",
    "trace_tag",
    "untag_image",
    "write_config_stream",
    "write_manifest_stream",
]

log = logging.getLogger(__name__)

#: Below ``streams/refs``: where tags live.
OCI_REF_PREFIX = "oci/"
#: Named refs of a config stream that name EROFS images rather than layers.
IMAGE_REF_KEY = "composefs.image"
IMAGE_REF_KEY_V1 = "composefs.image.v1"
#: Every boot image key starts with this (also ``.v1`` and ``.xattrs=<mode>`` ones).
BOOT_IMAGE_REF_KEY = "composefs.image.boot"
BOOT_IMAGE_REF_KEY_V1 = "composefs.image.boot.v1"
_CONFIG_KEY_PREFIX = "config:"
_MEDIA_TYPE_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
#: Manifests and configs are small JSON documents; refuse to read more.
_JSON_MAX = 16 << 20
#: Algorithms of OCI digests, with their hex length (oci-spec's ``Digest`` parse).
_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}


class OciError(RepositoryError):
    """An OCI image that cannot be read: a tag to no manifest, a stream that is not
    what its name says, a manifest or config that is not valid JSON."""


class OciTagError(InvalidNameError):
    """A tag that cannot name an image (:func:`check_tag`)."""


def encode_tag(tag: str) -> str:
    """A tag as its file name below ``streams/refs/oci``."""
    return tag.replace("%", "%25").replace("/", "%2F")


def decode_tag(encoded: str) -> str:
    """composefs-rs's single-pass decoding: ``%2F`` → ``/``, ``%25`` → ``%``, any
    other ``%`` kept as it is."""
    out: list[str] = []
    i = 0
    while i < len(encoded):
        c = encoded[i]
        if c == "%":
            code = encoded[i + 1 : i + 3]
            out.append({"2F": "/", "25": "%"}.get(code, "%" + code))
            i += 1 + len(code)
        else:
            out.append(c)
            i += 1
    return "".join(out)


def check_tag(tag: str) -> str:
    """``tag`` if it can name an image: its file name below ``streams/refs/oci``.
    composefs-rs refuses only a leading ``@`` (a digest reference); names that
    cannot be one file (empty, ``.``, ``..``, longer than a file name, NUL) or
    carry control characters (they end up in logs and listings) are refused too.
    :class:`OciTagError` if bad."""
    if not isinstance(tag, str) or not tag:
        raise OciTagError("an OCI tag must be a non-empty string")
    if tag.startswith("@"):
        raise OciTagError(f"invalid tag {tag!r}: a leading '@' is reserved for digests")
    encoded = encode_tag(tag)
    if encoded in (".", ".."):
        raise OciTagError(f"invalid tag {tag!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in tag):
        raise OciTagError(f"invalid tag {tag!r}: control characters")
    try:
        size = len(encoded.encode("utf-8"))
    except UnicodeEncodeError:
        raise OciTagError(f"invalid tag {tag!r}: not valid Unicode") from None
    if size > 255:
        raise OciTagError(f"invalid tag {tag[:64]!r}...: longer than 255 bytes as a file name")
    return tag


def _valid_digest(text: str) -> bool:
    algorithm, colon, hexed = text.partition(":")
    return bool(colon) and _DIGEST_HEX.get(algorithm) == len(hexed) and is_hex(hexed)


def _manifest_digest_of(target: str) -> str | None:
    """The manifest digest a tag link names (its last component after ``oci-manifest-``)."""
    part = link_file_name(target)
    if part is None or not part.startswith(OCI_MANIFEST_PREFIX):
        return None
    digest = part.removeprefix(OCI_MANIFEST_PREFIX)
    return digest if _valid_digest(digest) else None


def iter_tags(repo: Repository) -> Iterator[tuple[str, str]]:
    """``(tag, manifest digest)`` for every tag (``cfsctl oci images``' list), sorted
    by tag; links that name no manifest are left out, as composefs-rs does."""
    top = repo.path / "streams" / "refs" / OCI_REF_PREFIX
    found: list[tuple[str, str]] = []
    stack = [(top, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise OciError(f"cannot list {directory}: {os_error_text(exc)}") from exc
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append((directory / entry.name, f"{prefix}{entry.name}/"))
                continue
            try:
                target = os.readlink(entry.path)
            except OSError:
                continue
            digest = _manifest_digest_of(target)
            if digest is not None:
                found.append((decode_tag(prefix + entry.name), digest))
    return iter(sorted(found))


@dataclass(frozen=True, slots=True)
class OciImage:
    """One OCI image of the repository, read as composefs-rs's ``OciImage::open``."""

    manifest_digest: str
    #: The manifest stream's object.
    manifest_verity: str
    manifest_json: bytes
    config_digest: str
    #: The config stream's object (the manifest's ``config:<digest>`` named ref).
    config_verity: str
    config_json: bytes
    manifest: dict[str, Any]
    #: None for an artifact (a config of another media type).
    config: dict[str, Any] | None
    #: diff_id (container) or layer digest (artifact) → layer stream object.
    layer_refs: dict[str, str]
    #: ``composefs.image`` (V2) and ``composefs.image.v1`` (V0/V1): EROFS image objects.
    image_ref: str | None
    image_ref_v1: str | None
    #: ``composefs.image.boot*`` key → EROFS image object.
    boot_image_refs: dict[str, str] = field(default_factory=dict)

    @property
    def is_container(self) -> bool:
        return _media_type(self.manifest.get("config")) == _MEDIA_TYPE_IMAGE_CONFIG

    @property
    def architecture(self) -> str:
        return str((self.config or {}).get("architecture", ""))

    @property
    def os(self) -> str:
        return str((self.config or {}).get("os", ""))

    @property
    def created(self) -> str | None:
        created = (self.config or {}).get("created")
        return created if isinstance(created, str) else None

    @property
    def layer_count(self) -> int:
        layers = self.manifest.get("layers")
        return len(layers) if isinstance(layers, list) else 0

    @property
    def images(self) -> dict[str, str]:
        """Every EROFS image the config stream owns: named-ref key → image object."""
        out = dict(self.boot_image_refs)
        if self.image_ref is not None:
            out[IMAGE_REF_KEY] = self.image_ref
        if self.image_ref_v1 is not None:
            out[IMAGE_REF_KEY_V1] = self.image_ref_v1
        return out

    def erofs_image(self, erofs_version: int) -> str | None:
        """The image for a repository whose images are in that format: V0 and V1
        share the ``.v1`` slot, V2 has the plain one (no fallback, as composefs-rs)."""
        return self.image_ref if erofs_version == ErofsVersion.V2 else self.image_ref_v1

    def boot_erofs_image(self, erofs_version: int) -> str | None:
        key = BOOT_IMAGE_REF_KEY if erofs_version == ErofsVersion.V2 else BOOT_IMAGE_REF_KEY_V1
        return self.boot_image_refs.get(key)

    def info(self, name: str) -> dict[str, Any]:
        """``cfsctl oci images --json``'s entry for this image under tag ``name``
        (no referrers are stored by composefsd, nor listed here: 0)."""
        return {
            "name": name,
            "manifest_digest": self.manifest_digest,
            "is_container": self.is_container,
            "architecture": self.architecture,
            "os": self.os,
            "created": self.created,
            "layer_count": self.layer_count,
            "referrer_count": 0,
        }

    def inspect(self, erofs_version: int) -> dict[str, Any]:
        """``cfsctl oci inspect``'s document (manifest and config as their JSON text)."""
        return {
            "manifest": self.manifest_json.decode(),
            "config": self.config_json.decode(),
            "referrers": [],
            "composefs_erofs": self.erofs_image(erofs_version),
            "composefs_boot_erofs": self.boot_erofs_image(erofs_version),
        }


def _media_type(descriptor: object) -> str | None:
    if isinstance(descriptor, dict):
        value = descriptor.get("mediaType")
        return value if isinstance(value, str) else None
    return None


def read_external(
    store: ObjectStore, content_id: str, digest: str, content_type: int
) -> tuple[bytes, StreamRefs]:
    """composefs-rs's ``read_external_splitstream``: a stream of that content type
    holding exactly one object, and that object's content."""
    refs = read_stream(store, digest).refs
    if refs.content_type != content_type:
        raise OciError(f"stream {content_id} has content type {refs.content_type:#x}")
    if len(refs.object_refs) != 1:
        raise OciError(f"stream {content_id} holds {len(refs.object_refs)} objects, not exactly 1")
    try:
        fd = store.open(refs.object_refs[0])
    except OSError as exc:
        raise OciError(
            f"stream {content_id}: cannot open object {refs.object_refs[0]}: {os_error_text(exc)}"
        ) from exc
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(_JSON_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > _JSON_MAX:
        raise OciError(f"stream {content_id}: its object is larger than {_JSON_MAX} bytes")
    return data, refs


def json_object(
    data: bytes,
    what: str,
    error: type[RepositoryError] = OciError,
    limit: int | None = None,
) -> dict[str, Any]:
    """``data`` as a JSON object (a manifest, config or index), else ``error``
    naming ``what``; longer than ``limit`` bytes is an error too."""
    if limit is not None and len(data) > limit:
        raise error(f"{what} is larger than {limit} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise error(f"{what} is not a JSON object")
    return doc


def open_image(
    repo: Repository, store: ObjectStore, manifest_digest: str, verity: str | None = None
) -> OciImage:
    """The image of that manifest digest. Without ``verity`` (the manifest stream's
    object, as a tag gives it) the manifest's sha256 must be its digest, as
    composefs-rs checks. :class:`OciError` / :class:`StreamError` if it is damaged,
    :class:`StreamNotFoundError` if there is no such manifest stream."""
    manifest_id = OCI_MANIFEST_PREFIX + manifest_digest
    links = stream_links(repo)
    verified = verity is not None
    if verity is None:
        link = links.get(manifest_id)
        if link is None or link.digest is None:
            raise StreamNotFoundError(f"no OCI manifest {manifest_digest} in {repo.path}")
        verity = link.digest
    manifest_json, manifest_refs = read_external(
        store, manifest_id, verity, CONTENT_TYPE_OCI_MANIFEST
    )
    computed = "sha256:" + hashlib.sha256(manifest_json).hexdigest()
    if not verified and computed != manifest_digest:
        raise OciError(f"manifest {manifest_digest} has the digest {computed}")
    manifest = json_object(manifest_json, f"manifest {manifest_digest}")
    config_desc = manifest.get("config")
    config_digest = config_desc.get("digest") if isinstance(config_desc, dict) else None
    if not isinstance(config_digest, str) or not _valid_digest(config_digest):
        raise OciError(f"manifest {manifest_digest} names no valid config digest")
    named = dict(manifest_refs.named_refs)
    config_verity = named.get(_CONFIG_KEY_PREFIX + config_digest)
    if config_verity is None:
        raise OciError(f"manifest {manifest_digest} has no config reference")
    config_json, config_refs = read_external(
        store, OCI_CONFIG_PREFIX + config_digest, config_verity, CONTENT_TYPE_OCI_CONFIG
    )
    if _media_type(config_desc) == _MEDIA_TYPE_IMAGE_CONFIG:
        config: dict[str, Any] | None = json_object(config_json, f"config {config_digest}")
        layer_refs = dict(config_refs.named_refs)
    else:
        # An artifact: the layers are the manifest's named refs of its layer digests.
        config = None
        layers = manifest.get("layers")
        digests = {
            d.get("digest") for d in (layers if isinstance(layers, list) else [])
            if isinstance(d, dict)
        }  # fmt: skip
        layer_refs = {k: v for k, v in named.items() if k in digests}
    image_ref = layer_refs.pop(IMAGE_REF_KEY, None)
    image_ref_v1 = layer_refs.pop(IMAGE_REF_KEY_V1, None)
    boot = {k: v for k, v in layer_refs.items() if k.startswith(BOOT_IMAGE_REF_KEY)}
    for key in boot:
        del layer_refs[key]
    return OciImage(
        manifest_digest=manifest_digest,
        manifest_verity=verity,
        manifest_json=manifest_json,
        config_digest=config_digest,
        config_verity=config_verity,
        config_json=config_json,
        manifest=manifest,
        config=config,
        layer_refs=layer_refs,
        image_ref=image_ref,
        image_ref_v1=image_ref_v1,
        boot_image_refs=boot,
    )


def open_tag(repo: Repository, store: ObjectStore, tag: str) -> OciImage:
    """The image a tag names (``cfsctl oci inspect <tag>``)."""
    link = repo.path / "streams" / "refs" / (OCI_REF_PREFIX + encode_tag(tag))
    try:
        target = os.readlink(link)
    except OSError:
        raise StreamNotFoundError(f"no OCI tag {tag!r} in {repo.path}") from None
    digest = _manifest_digest_of(target)
    if digest is None:
        raise OciError(f"OCI tag {tag!r} points to {target!r}, which is no manifest")
    return open_stored(repo, store, digest, f"OCI tag {tag!r}: ")


def open_stored(repo: Repository, store: ObjectStore, digest: str, what: str = "") -> OciImage:
    """The image of the manifest stream ``oci-manifest-<digest>``, by the object its
    link names. Not by its JSON's sha256, which composefs-rs checks when it has no
    verity: skopeo hands out a Docker manifest converted to OCI under the Docker
    digest, so for such an image (most of a registry's) that check always fails
    (``cfsctl oci images`` leaves them out)."""
    stream = existing_stream(repo, OCI_MANIFEST_PREFIX + digest)
    if stream is None:
        raise StreamNotFoundError(f"{what}no manifest {digest} in {repo.path}")
    return open_image(repo, store, digest, stream)


def list_images(repo: Repository) -> list[tuple[str, OciImage]]:
    """``(tag, image)`` for every tag whose image can be read (``cfsctl oci
    images``: others are skipped with a warning)."""
    out: list[tuple[str, OciImage]] = []
    with repo.object_store() as store:
        for tag, digest in iter_tags(repo):
            try:
                out.append((tag, open_stored(repo, store, digest)))
            except (OciError, StreamError, StreamNotFoundError) as exc:
                log.warning("skipping OCI image %s: %s", tag, exc)
    return out


@dataclass(frozen=True, slots=True)
class OciTrace:
    """What one tag keeps alive: objects (stream objects, the JSON objects, layer
    file objects, image objects), the streams traced and the EROFS images owned."""

    tag: str
    image: OciImage
    objects: frozenset[str]
    streams: frozenset[str]
    #: Named-ref key → image object, as :attr:`OciImage.images`.
    images: dict[str, str]


def trace_tag(repo: Repository, tag: str) -> OciTrace:
    """Everything ``tag`` keeps alive in composefs-rs's GC: the manifest stream
    traced as a root (:func:`composefsd.repository.streams.trace_streams`)."""
    with repo.object_store() as store:
        image = open_tag(repo, store, tag)
    reach = trace_streams(repo, [OCI_MANIFEST_PREFIX + image.manifest_digest])
    return OciTrace(
        tag=tag,
        image=image,
        objects=frozenset(reach.objects),
        streams=frozenset(reach.streams),
        images=image.images,
    )


# -- writing ---------------------------------------------------------------------------------


def _sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _with_json(
    store: ObjectStore, writer: SplitStreamWriter, data: bytes, written: list[str]
) -> None:
    """The JSON document as the stream's one external object (composefs-rs's
    ``write_external``: fs-verity covers it on its own)."""
    stored = store.store_bytes(data)
    if stored.written:
        written.append(stored.digest)
    writer.write_object(stored.digest, len(data))


def write_config_stream(
    repo: Repository,
    store: ObjectStore,
    config_json: bytes,
    layer_refs: Iterable[tuple[str, str]],
    image_refs: Mapping[str, str] | None = None,
) -> str:
    """Write ``oci-config-<sha256 of config_json>`` as composefs-rs's
    ``write_config_raw``: named refs ``<diff_id>`` → layer stream (``layer_refs``, in
    the config's diff_id order), then the EROFS images (``image_refs``, named-ref
    key → image: ``composefs.image``, ``composefs.image.v1``, then boot keys in name
    order), then the JSON, byte for byte, as one object. Replaces the link of an
    existing config stream (the old stream is left for GC). The stream's digest."""
    writer = SplitStreamWriter(repo.hash_algorithm.digest_size, CONTENT_TYPE_OCI_CONFIG)
    for diff_id, verity in layer_refs:
        writer.add_named_ref(diff_id, verity)
    images = dict(image_refs or {})
    for key in (IMAGE_REF_KEY, IMAGE_REF_KEY_V1):
        if key in images:
            writer.add_named_ref(key, images.pop(key))
    for key in sorted(images):
        if not key.startswith(BOOT_IMAGE_REF_KEY):
            raise ValueError(f"not an image named-ref key: {key!r}")
        writer.add_named_ref(key, images[key])
    written: list[str] = []
    _with_json(store, writer, config_json, written)
    content_id = OCI_CONFIG_PREFIX + _sha256_digest(config_json)
    return write_stream(repo, store, writer, content_id, written=written)


def write_manifest_stream(
    repo: Repository,
    store: ObjectStore,
    manifest_json: bytes,
    config_digest: str,
    config_verity: str,
    layer_refs: Iterable[tuple[str, str]],
    *,
    manifest_digest: str | None = None,
    tag: str | None = None,
) -> str:
    """Write ``oci-manifest-<digest>`` as composefs-rs's ``write_manifest`` /
    ``rewrite_manifest``: named refs ``config:<config_digest>`` → config stream,
    then ``<diff_id>`` → layer stream per layer (config order), then the JSON as one
    object; with ``tag``, also the tag. ``manifest_digest`` defaults to the JSON's
    sha256; a source may name it otherwise: skopeo hands out a Docker schema 2
    manifest converted to OCI under the Docker manifest's digest (which it
    verified), and composefs-rs stores it so.
    Replaces the link of an existing manifest stream. The stream's digest."""
    if manifest_digest is None:
        manifest_digest = _sha256_digest(manifest_json)
    elif not _valid_digest(manifest_digest):
        raise OciError(f"not a manifest digest: {manifest_digest[:200]!r}")
    if tag is not None:
        check_tag(tag)
    writer = SplitStreamWriter(repo.hash_algorithm.digest_size, CONTENT_TYPE_OCI_MANIFEST)
    writer.add_named_ref(_CONFIG_KEY_PREFIX + config_digest, config_verity)
    for diff_id, verity in layer_refs:
        writer.add_named_ref(diff_id, verity)
    written: list[str] = []
    _with_json(store, writer, manifest_json, written)
    ref = OCI_REF_PREFIX + encode_tag(tag) if tag is not None else None
    return write_stream(
        repo, store, writer, OCI_MANIFEST_PREFIX + manifest_digest, ref=ref, written=written
    )


def tag_image(repo: Repository, manifest_digest: str, tag: str) -> None:
    """Point ``tag`` at the manifest (``cfsctl oci tag``), replacing what it named.
    :class:`StreamNotFoundError` if the repository has no such manifest."""
    check_tag(tag)
    if not _valid_digest(manifest_digest):
        raise OciError(f"not a manifest digest: {manifest_digest[:200]!r}")
    content_id = OCI_MANIFEST_PREFIX + manifest_digest
    repo.ensure_writable()
    # A writer: a GC must not run between finding the manifest and naming it.
    with writer_lock(repo.path):
        if existing_stream(repo, content_id) is None:
            raise StreamNotFoundError(f"no OCI manifest {manifest_digest} in {repo.path}")
        name_stream(repo, content_id, OCI_REF_PREFIX + encode_tag(tag))


def untag_image(repo: Repository, tag: str) -> str:
    """Remove ``tag`` (``cfsctl oci untag``); the manifest digest it named. The image
    stays until GC finds nothing else keeps it. :class:`StreamNotFoundError` if
    there is no such tag."""
    check_tag(tag)
    directory = repo.path / "streams" / "refs" / OCI_REF_PREFIX.rstrip("/")
    link = directory / encode_tag(tag)
    repo.ensure_writable()
    with writer_lock(repo.path):
        try:
            target = os.readlink(link)
        except OSError:
            raise StreamNotFoundError(f"no OCI tag {tag!r} in {repo.path}") from None
        try:
            os.unlink(link)
        except FileNotFoundError:
            raise StreamNotFoundError(f"no OCI tag {tag!r} in {repo.path}") from None
        except OSError as exc:
            raise RepositoryError(f"cannot remove OCI tag {tag!r}: {os_error_text(exc)}") from exc
        fsync_dir(directory)
    return _manifest_digest_of(target) or target
