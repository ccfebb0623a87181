"""The three fs-verity policies, shared by the repository (writing) and mounting.

A module of its own so that ``mount.composefs`` can name a policy without
importing the repository package.
"""

from __future__ import annotations

import enum

__all__ = ["VerityPolicy"]


class VerityPolicy(enum.StrEnum):
    """How hard to insist on fs-verity.

    For a repository, what it does with the objects it writes:

    * ``REQUIRED``: every object and image gets fs-verity; writing fails with
      :class:`~composefsd.repository.errors.VerityRequiredError` where the kernel
      or filesystem cannot do it.
    * ``TRY``: verity is enabled where possible; where not, objects are written
      without it and results say so.
    * ``DISABLED``: verity is never attempted.

    For a mount, see :mod:`composefsd.kernel.mount`: ``REQUIRED`` makes overlayfs
    demand verity on every object and the kernel measure the image, ``TRY`` uses
    whatever verity is available, ``DISABLED`` none.
    """

    REQUIRED = "required"
    TRY = "try"
    DISABLED = "disabled"
