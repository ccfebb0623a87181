"""Mounting an image of a repository, and which repository images are mounted.

A repository mount is named ``composefs:<image digest>``, so that mountinfo says
which image it shows; :func:`mounted_images` reads that back, for GC to keep
mounted images and their objects (composefs-rs #346) even across daemon restarts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from composefsd.kernel.mount import (
    WRONG_VERITY,
    DetachedMount,
    ImageVerityError,
    LayerMode,
    MountOptions,
    PathOrFd,
    mount_image,
    normalize_digest,
)
from composefsd.kernel.mountinfo import ComposefsMount, list_composefs_mounts
from composefsd.kernel.userns import IdMapping
from composefsd.repository import Repository, VerityPolicy, reader_lock
from composefsd.repository.images import open_image_object

__all__ = ["mount_repository_image", "mounted_images", "repository_mounts"]


def mount_repository_image(
    repo: Repository,
    name: str,
    *,
    verity: VerityPolicy | None = None,
    read_only: bool | None = None,
    upperdir: PathOrFd | None = None,
    workdir: PathOrFd | None = None,
    userns_fd: int | None = None,
    uid_map: Sequence[IdMapping] | None = None,
    gid_map: Sequence[IdMapping] | None = None,
    expected_digest: str | None = None,
    layer_mode: LayerMode | None = None,
) -> DetachedMount:
    """Mount the image ``name`` (a ref, or a digest bare or ``sha256:``-prefixed), detached.

    The image's own digest is always the expected digest, so a damaged or swapped
    image file is refused under every policy; ``expected_digest``, if given, must
    name the same image. ``verity`` defaults to the repository's policy.
    """
    with reader_lock(repo.path):
        digest = repo.resolve_image(name)
        if (
            expected_digest is not None
            and normalize_digest(expected_digest, repo.hash_algorithm) != digest
        ):
            # Refuse before touching the image: the caller asked for another image.
            raise ImageVerityError(
                WRONG_VERITY, f"image {name!r} is {digest}, expected {expected_digest}"
            )
        options = MountOptions(
            basedirs=[repo.objects_dir],
            verity=repo.verity if verity is None else verity,
            expected_digest=digest,
            algorithm=repo.hash_algorithm,
            read_only=read_only,
            upperdir=upperdir,
            workdir=workdir,
            userns_fd=userns_fd,
            uid_map=uid_map,
            gid_map=gid_map,
            name=digest,
            layer_mode=layer_mode,
        )
        # The image's object by its digest, never through images/<digest> (which
        # whoever writes the repository could aim outside it).
        fd = open_image_object(repo, digest)
        try:
            return mount_image(fd, options)
        finally:
            os.close(fd)


def repository_mounts(
    repo: Repository, mounts: Sequence[ComposefsMount] | None = None
) -> list[ComposefsMount]:
    """The composefs mounts of this repository's images.

    A mount counts when its source names a digest of the repository's algorithm
    and either its data layers include the repository's objects or (string-form
    mounts list only ``/proc/self/fd/N`` layers) the repository has that image.
    """
    objects = os.path.realpath(repo.objects_dir)
    width = repo.hash_algorithm.digest_size * 2
    listed = list_composefs_mounts() if mounts is None else mounts
    return [
        m
        for m in listed
        if m.digest is not None
        and len(m.digest) == width
        and (
            objects in m.datadirs
            or os.path.lexists(repo.image_path(m.digest))
            or os.path.lexists(repo.object_path(m.digest))
        )
    ]


def mounted_images(repo: Repository) -> set[str]:
    """Digests of this repository's images that are mounted in this mount namespace."""
    return {m.digest for m in repository_mounts(repo) if m.digest is not None}
