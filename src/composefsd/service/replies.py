"""Replies of io.composefs.Repository that composefsctl's direct mode gives too:
built here once, so that the daemon and ``composefsctl --direct`` report the same
repository and the same mount the same way."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import composefsd
from composefsd.kernel.mount import DetachedMount
from composefsd.kernel.mountinfo import ComposefsMount
from composefsd.kernel.repomount import repository_mounts
from composefsd.objectlayout import is_hex_digest
from composefsd.repository import ReadOnlyRepositoryError, Repository
from composefsd.repository.images import iter_refs

__all__ = ["describe_repository", "mount_reply"]


def describe_repository(repo: Repository, mounts: Sequence[ComposefsMount]) -> dict[str, Any]:
    """The Describe reply for ``repo``, given the composefs mounts to count
    (composefsctl's direct ``status`` prints the same)."""
    images = 0
    try:
        with os.scandir(repo.images_dir) as it:
            for entry in it:
                if is_hex_digest(entry.name, repo.hash_algorithm) and entry.is_symlink():
                    images += 1
    except FileNotFoundError:
        pass
    try:
        repo.ensure_writable()
        reason = None
    except ReadOnlyRepositoryError as exc:
        reason = str(exc)
    out: dict[str, Any] = {
        "path": str(repo.path),
        "algorithm": repo.hash_name,
        "verity": repo.verity.value,
        "images": images,
        "refs": sum(1 for _ in iter_refs(repo)),
        # Without composefs mounts there is nothing to tell apart: no realpath and
        # stat of objects/ (under load, a quarter of Describe's own time).
        "mounts": len(repository_mounts(repo, mounts)) if mounts else 0,
        "erofsVersion": int(repo.erofs_version),
        "extraErofsVersions": [int(v) for v in repo.formats.versions()][1:],
        "version": composefsd.version(),
    }
    if reason is not None:
        out["readOnlyReason"] = reason
    return out


def mount_reply(mount: DetachedMount) -> dict[str, Any]:
    """The Mount reply for ``mount``, less where it went (``where`` or the mount's fd):
    what was mounted and how it was checked (composefsctl's direct ``mount`` prints
    the same)."""
    return {
        "digest": mount.source.partition(":")[2],
        "imageCheck": mount.image_check,
        "objectVerity": mount.object_verity,
        "readOnly": mount.read_only,
        "idmapped": mount.idmapped,
    }
