"""The composefs image of an OCI image, built from its layer streams as composefs-rs
0.9 builds it (``image::create_filesystem``, ``cfsctl oci compute-id``/``dump``),
and committed beside the image (``ensure_oci_composefs_erofs[_boot]``).

The layers are read from their splitstreams (never from tars) and applied in
the config's ``rootfs.diff_ids`` order (:class:`composefsd.image.ocitar.LayerTree`);
then composefs-rs's OCI transform (root metadata from ``/usr``, ``/run`` emptied,
xattrs filtered) and, for boot images, its boot transform: the same
:mod:`composefsd.image.transforms` CreateImage uses. Images are written in the
repository's formats by :func:`composefsd.image.formats.write_format`.

:func:`ensure_image` commits them as CreateImage does (``images/<id>``, no
``images/refs``) and rewrites the config stream with the images as named refs
(the config JSON byte for byte), then the manifest stream with the new config
stream (and the tag). The images are built, in memory, before anything is
written: a layer that cannot be applied leaves the repository as it was.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from composefsd.fsverity import digest_bytes
from composefsd.image.formats import ErofsVersion, write_format
from composefsd.image.ocitar import LayerTree, TarError
from composefsd.image.transforms import (
    Transform,
    TransformError,
    XattrFilter,
    apply_transform,
)
from composefsd.image.tree import Node, gc_paused
from composefsd.image.writer import WriteError
from composefsd.objectlayout import object_relpath
from composefsd.repository.errors import RepositoryError, os_error_text
from composefsd.repository.images import link_image
from composefsd.repository.locking import writer_lock
from composefsd.repository.oci import (
    BOOT_IMAGE_REF_KEY,
    BOOT_IMAGE_REF_KEY_V1,
    IMAGE_REF_KEY,
    IMAGE_REF_KEY_V1,
    OciError,
    OciImage,
    json_object,
    open_image,
    read_external,
    write_config_stream,
    write_manifest_stream,
)
from composefsd.repository.store import sync_objects
from composefsd.repository.streams import StreamNotFoundError, existing_stream, use_chunks
from composefsd.splitstream import (
    CONTENT_TYPE_OCI_CONFIG,
    CONTENT_TYPE_OCI_LAYER,
    OCI_CONFIG_PREFIX,
    Chunk,
    SplitStream,
)

if TYPE_CHECKING:
    from composefsd.repository.repo import Repository
    from composefsd.repository.store import ObjectStore

__all__ = [
    "OciBuildError",
    "build_tree",
    "compute_config_id",
    "compute_id",
    "config_tree",
    "ensure_image",
    "image_transform",
    "transformed_tree",
    "write_images",
]

log = logging.getLogger(__name__)


class OciBuildError(OciError):
    """The image cannot be built: a layer that cannot be applied (the message names
    the layer and the entry), a missing layer stream, a transform that fails."""


def image_transform(
    *, bootable: bool = False, xattrs: XattrFilter = XattrFilter.ALLOWLIST_ONLY
) -> Transform:
    """What ``cfsctl oci compute-id [--bootable] [--xattrs MODE]`` applies."""
    return Transform(propagate_usr_to_root=True, xattrs=xattrs, bootable=bootable)


def _diff_ids(config_digest: str, config: dict[str, Any]) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise OciBuildError(f"config {config_digest} has no list of rootfs.diff_ids")
    return list(diff_ids)


def _apply_layer(store: ObjectStore, tree: LayerTree, diff_id: str, verity: str) -> None:
    def use(parsed: SplitStream, chunks: Iterator[Chunk]) -> None:
        if parsed.refs.content_type != CONTENT_TYPE_OCI_LAYER:
            raise OciBuildError(
                f"layer {diff_id}: stream {verity} has content type "
                f"{parsed.refs.content_type:#x}, not a layer's"
            )
        tree.apply_layer(c if isinstance(c, bytes) else c.digest for c in chunks)

    try:
        use_chunks(store, verity, use)
    except TarError as exc:
        raise OciBuildError(f"layer {diff_id}: {exc}") from None


def build_tree(repo: Repository, store: ObjectStore, image: OciImage) -> Node:
    """The image's layers applied in order, untransformed (hardlinks settled)."""
    if image.config is None:
        raise OciBuildError(f"image {image.manifest_digest} is not a container image")
    return config_tree(store, image.config_digest, image.config, image.layer_refs)


def config_tree(
    store: ObjectStore, config_digest: str, config: dict[str, Any], layer_refs: dict[str, str]
) -> Node:
    """The layers a config names (``layer_refs``: diff_id → layer stream) applied
    in its diff_id order, untransformed (composefs-rs's ``create_filesystem``,
    which starts from the config)."""
    tree = LayerTree()
    with gc_paused():
        for diff_id in _diff_ids(config_digest, config):
            verity = layer_refs.get(diff_id)
            if verity is None:
                raise OciBuildError(f"config {config_digest} has no stream for layer {diff_id}")
            _apply_layer(store, tree, diff_id, verity)
        return tree.finish()


def _content_reader(store: ObjectStore) -> Callable[[Node], bytes]:
    def read_content(node: Node) -> bytes:
        if node.content is not None or node.digest is None:
            return node.content or b""
        hexdigest = node.digest.hex()
        try:
            fd = store.open(hexdigest)
        except OSError as exc:
            raise OciBuildError(
                f"cannot read object {hexdigest}: {os_error_text(exc)}", errno=exc.errno
            ) from exc
        with os.fdopen(fd, "rb") as fh:
            return fh.read(node.size + 1)

    return read_content


def transformed_tree(
    repo: Repository, store: ObjectStore, image: OciImage, transform: Transform
) -> Node:
    """:func:`build_tree` then ``transform`` (:func:`image_transform`)."""
    root = build_tree(repo, store, image)
    _transform(store, root, transform, f"image {image.manifest_digest}")
    return root


def _transform(store: ObjectStore, root: Node, transform: Transform, what: str) -> None:
    try:
        with gc_paused():
            apply_transform(root, transform, _content_reader(store))
    except TransformError as exc:
        raise OciBuildError(f"{what}: {exc}") from exc


def _write(root: Node, version: ErofsVersion) -> bytes:
    try:
        with gc_paused():
            return write_format(root, version)
    except WriteError as exc:
        raise OciBuildError(f"cannot write the image: {exc}", errno=exc.errno) from exc


def write_images(root: Node, versions: Iterable[ErofsVersion]) -> list[tuple[ErofsVersion, bytes]]:
    """The tree in each format, once per format."""
    out: list[tuple[ErofsVersion, bytes]] = []
    for version in versions:
        if all(v != version for v, _ in out):
            out.append((version, _write(root, version)))
    return out


def compute_id(
    repo: Repository,
    store: ObjectStore,
    image: OciImage,
    *,
    bootable: bool = False,
    xattrs: XattrFilter = XattrFilter.ALLOWLIST_ONLY,
    version: ErofsVersion | None = None,
) -> str:
    """``cfsctl oci compute-id``: the hex id of the image's composefs image in
    ``version`` (default: the repository's format), nothing written."""
    root = transformed_tree(repo, store, image, image_transform(bootable=bootable, xattrs=xattrs))
    fmt = repo.erofs_version if version is None else version
    data = _write(root, fmt)
    return digest_bytes(data, repo.hash_algorithm).hex()


def compute_config_id(
    repo: Repository,
    store: ObjectStore,
    config_digest: str,
    config_verity: str | None = None,
    *,
    bootable: bool = False,
    xattrs: XattrFilter = XattrFilter.ALLOWLIST_ONLY,
    version: ErofsVersion | None = None,
) -> str:
    """:func:`compute_id` of the image a config names (``cfsctl oci compute-id
    @<config digest>``): its stream ``oci-config-<digest>`` read by
    ``config_verity`` or, without it, by its link."""
    config_id = OCI_CONFIG_PREFIX + config_digest
    if config_verity is None:
        config_verity = existing_stream(repo, config_id)
        if config_verity is None:
            raise StreamNotFoundError(f"no OCI config {config_digest} in {repo.path}")
    config_json, refs = read_external(store, config_id, config_verity, CONTENT_TYPE_OCI_CONFIG)
    config = json_object(config_json, f"config {config_digest}")
    layer_refs = dict(refs.named_refs)
    root = config_tree(store, config_digest, config, layer_refs)
    _transform(
        store, root, image_transform(bootable=bootable, xattrs=xattrs), f"config {config_digest}"
    )
    data = _write(root, repo.erofs_version if version is None else version)
    return digest_bytes(data, repo.hash_algorithm).hex()


def _boot_key(version: ErofsVersion, xattrs: XattrFilter) -> str:
    base = BOOT_IMAGE_REF_KEY if version == ErofsVersion.V2 else BOOT_IMAGE_REF_KEY_V1
    if xattrs is XattrFilter.ALLOWLIST_ONLY:
        return base
    return f"{base}.xattrs={xattrs.value}"


def ensure_image(
    repo: Repository,
    manifest_digest: str,
    manifest_verity: str | None = None,
    tag: str | None = None,
    *,
    bootable: bool = False,
    xattrs: XattrFilter = XattrFilter.ALLOWLIST_ONLY,
) -> str | None:
    """composefs-rs's ``ensure_oci_composefs_erofs`` (``bootable``: ``..._boot``):
    build and commit the image in the repository's formats, name them in the
    config stream (``composefs.image[.v1]``, or the boot keys, the other image
    refs kept), rewrite the manifest stream (and point ``tag`` at it). The hex id
    of the image in the repository's format; None for an artifact."""
    repo.ensure_writable()
    with repo.object_store() as store:
        image = open_image(repo, store, manifest_digest, manifest_verity)
        if not image.is_container:
            return None
        transform = image_transform(bootable=bootable, xattrs=xattrs)
        root = transformed_tree(repo, store, image, transform)
        images = write_images(root, repo.formats.versions())
        del root
    try:
        with writer_lock(repo.path), repo.object_store() as store:
            store.probe_verity()
            return _commit(
                repo, store, manifest_digest, manifest_verity, tag, images, bootable, xattrs
            )
    except OSError as exc:
        raise RepositoryError(
            f"cannot commit the image of {manifest_digest}: {os_error_text(exc)}",
            errno=exc.errno if exc.errno is not None else errno.EIO,
        ) from exc


def _commit(
    repo: Repository,
    store: ObjectStore,
    manifest_digest: str,
    manifest_verity: str | None,
    tag: str | None,
    images: list[tuple[ErofsVersion, bytes]],
    bootable: bool,
    xattrs: XattrFilter,
) -> str:
    # Read again under the lock: another writer may have rewritten the streams.
    image = open_image(repo, store, manifest_digest, manifest_verity)
    ids: dict[ErofsVersion, str] = {}
    fresh: list[str] = []
    for version, data in images:
        stored = store.store_bytes(data)
        if stored.written:
            fresh.append(stored.digest)
        ids[version] = stored.digest
    sync_objects(repo.objects_dir, [object_relpath(d) for d in fresh])
    for digest in ids.values():
        link_image(repo, digest)
    v1 = next((ids[v] for v in ids if v != ErofsVersion.V2), None)
    v2 = ids.get(ErofsVersion.V2)
    refs: dict[str, str] = dict(image.boot_image_refs)
    if bootable:
        if image.image_ref is not None:
            refs[IMAGE_REF_KEY] = image.image_ref
        if image.image_ref_v1 is not None:
            refs[IMAGE_REF_KEY_V1] = image.image_ref_v1
        if v2 is not None:
            refs[_boot_key(ErofsVersion.V2, xattrs)] = v2
        if v1 is not None:
            refs[_boot_key(ErofsVersion.V1, xattrs)] = v1
    else:
        if v2 is not None:
            refs[IMAGE_REF_KEY] = v2
        if v1 is not None:
            refs[IMAGE_REF_KEY_V1] = v1
    layer_refs = []
    if image.config is None:
        raise OciBuildError(f"image {image.manifest_digest} is not a container image")
    for diff_id in _diff_ids(image.config_digest, image.config):
        verity = image.layer_refs.get(diff_id)
        if verity is None:
            raise OciBuildError(f"config {image.config_digest} has no stream for layer {diff_id}")
        layer_refs.append((diff_id, verity))
    config_verity = write_config_stream(repo, store, image.config_json, layer_refs, refs)
    write_manifest_stream(
        repo,
        store,
        image.manifest_json,
        image.config_digest,
        config_verity,
        layer_refs,
        manifest_digest=manifest_digest,
        tag=tag,
    )
    # The repository's default format comes first (FormatConfig.versions).
    result = ids[images[0][0]]
    log.info("image of %s: %s", manifest_digest, result)
    return result
