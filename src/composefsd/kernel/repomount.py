"""Mounting an image of a repository, and which repository images are mounted.

A repository mount is named ``composefs:<image digest>``, so that mountinfo says
which image it shows; :func:`mounted_images` reads that back, for GC to keep
mounted images and their objects (composefs-rs #346) even across daemon restarts.

Which mounts are *this* repository's is decided here, in :func:`is_repository_mount`,
for everything that asks (GC, RemoveImage, ListMounts, Describe, the direct CLI):
the same image can be in several repositories on one machine, and a mount of it
from another must not hold this one's copy. A mount is this repository's when one
of its overlay data-only layers is this repository's ``objects/`` directory: the
same directory (device and inode) where the layer's path can be looked up, the
same path where it cannot. That holds whoever made the mount (composefsd,
``cfsctl``, ``mount.composefs``) and whichever path reached the directory (a
symlink, a bind mount). Mountinfo shows no usable path for layers given as
``/proc/self/fd/N`` strings (the string form of :mod:`composefsd.kernel.mount`)
or as relative paths; such a mount is counted when this repository has its image,
erring towards keeping it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from composefsd.kernel.imagecache import ImageDigestCache

__all__ = [
    "ObjectsDirectory",
    "has_image",
    "is_repository_mount",
    "mount_repository_image",
    "mounted_images",
    "repository_mounts",
]


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
    digest_cache: ImageDigestCache | None = None,
) -> DetachedMount:
    """Mount the image ``name`` (a ref, or a digest bare or ``sha256:``-prefixed), detached.

    The image's own digest is always the expected digest, so a damaged or swapped
    image file is refused under every policy; ``expected_digest``, if given, must
    name the same image. ``verity`` defaults to the repository's policy.
    ``digest_cache`` remembers digests computed in userspace, for a caller that
    mounts the same images again (the daemon).
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
            digest_cache=digest_cache,
        )
        # The image's object by its digest, never through images/<digest> (which
        # whoever writes the repository could aim outside it).
        fd = open_image_object(repo, digest)
        try:
            return mount_image(fd, options)
        finally:
            os.close(fd)


@dataclass(slots=True, frozen=True)
class ObjectsDirectory:
    """A repository's ``objects/`` directory, as its mounts are told apart by."""

    #: Its path with symlinks resolved.
    path: str
    #: Device and inode; None when it cannot be looked up.
    dev: int | None = None
    ino: int | None = None

    @classmethod
    def of(cls, repo: Repository) -> ObjectsDirectory:
        path = os.path.realpath(repo.objects_dir)
        try:
            st = os.stat(path)
        except OSError:
            return cls(path)
        return cls(path, st.st_dev, st.st_ino)

    def same(self, other: ObjectsDirectory) -> bool:
        """Whether ``other`` is this directory (by inode when both know theirs)."""
        if self.dev is not None and other.dev is not None:
            return (self.dev, self.ino) == (other.dev, other.ino)
        return self.path == other.path

    def is_layer(self, layer: str, root: str = "") -> bool | None:
        """Whether the overlay layer path ``layer`` (as mountinfo shows it, from
        the view of the root ``root``, e.g. ``/proc/PID/root``; empty: ours) is
        this directory; None when the path says nothing (relative, or an fd of
        whoever mounted: ``/proc/...``)."""
        if not layer.startswith("/") or layer == "/proc" or layer.startswith("/proc/"):
            return None
        try:
            if self.dev is None:
                raise FileNotFoundError(self.path)
            st = os.stat(root + layer)
        except (OSError, ValueError):
            # Either is gone or hidden from us, or not a path at all (NUL): by text.
            return os.path.normpath(layer) == self.path
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)


def has_image(repo: Repository, digest: str) -> bool:
    """Whether ``repo`` has the image ``digest``: its ``images/`` link or its object
    (a mount may show our objects under an image file of its own), looked at
    without following links."""
    return os.path.lexists(repo.image_path(digest)) or os.path.lexists(repo.object_path(digest))


def is_repository_mount(
    repo: Repository,
    mount: ComposefsMount,
    *,
    root: str = "",
    objects: ObjectsDirectory | None = None,
) -> bool:
    """Whether ``mount`` is a mount of an image of ``repo`` (module notes).

    ``root`` is the root the mount's layer paths are relative to (``/proc/PID/root``
    of a process of the mount namespace it was seen in; empty for our own);
    ``objects`` the repository's :meth:`ObjectsDirectory.of`, to look it up once
    for many mounts.
    """
    if mount.digest is None or len(mount.digest) != repo.hash_algorithm.digest_size * 2:
        return False
    if objects is None:
        objects = ObjectsDirectory.of(repo)
    unknown = not mount.datadirs
    for layer in mount.datadirs:
        found = objects.is_layer(layer, root)
        if found:
            return True
        unknown = unknown or found is None
    return unknown and has_image(repo, mount.digest)


def repository_mounts(
    repo: Repository, mounts: Sequence[ComposefsMount] | None = None
) -> list[ComposefsMount]:
    """The composefs mounts of this repository's images (:func:`is_repository_mount`)
    among ``mounts`` (default: those of this mount namespace)."""
    objects = ObjectsDirectory.of(repo)
    listed = list_composefs_mounts() if mounts is None else mounts
    return [m for m in listed if is_repository_mount(repo, m, objects=objects)]


def mounted_images(repo: Repository) -> set[str]:
    """Digests of this repository's images that are mounted in this mount namespace."""
    return {m.digest for m in repository_mounts(repo) if m.digest is not None}
