"""Errors of the object repository.

Every error raised on purpose by :mod:`composefsd.repository` is a
:class:`RepositoryError` whose ``str()`` is a complete sentence naming the
repository, path or image concerned, so that the CLI and the service can show it
as is. Where an OS call failed, ``errno`` carries its errno (else None).
"""

from __future__ import annotations

import os

__all__ = [
    "CorruptObjectError",
    "CorruptRepositoryError",
    "ImageNotFoundError",
    "ImageReferencedError",
    "InvalidNameError",
    "NotARepositoryError",
    "ReadOnlyRepositoryError",
    "RepositoryBusyError",
    "RepositoryError",
    "SourceError",
    "UnknownFeatureError",
    "UnsupportedRepositoryError",
    "VerityRequiredError",
]


class RepositoryError(Exception):
    """Base class: ``str()`` is the message; ``errno`` the OS error behind it, if any."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        return self.message


class NotARepositoryError(RepositoryError):
    """The path does not exist, is not a directory, or holds no ``meta.json``."""


class UnsupportedRepositoryError(RepositoryError):
    """``meta.json`` names a newer format version, an unknown algorithm, or an
    incompatible feature flag this implementation does not know."""


class UnknownFeatureError(UnsupportedRepositoryError):
    """``meta.json`` lists incompatible feature flags this implementation does not
    know (``features``, in the file's order): the repository must not be opened."""

    def __init__(self, message: str, *, features: list[str]) -> None:
        super().__init__(message)
        self.features = list(features)


class CorruptRepositoryError(RepositoryError):
    """Damaged content: ``meta.json`` exists but cannot be read or parsed, or (as
    :class:`CorruptObjectError`) an image or object is damaged."""


class CorruptObjectError(CorruptRepositoryError):
    """An image is empty or does not parse, or an object is not what its name says."""


class ImageNotFoundError(RepositoryError):
    """No image or ref of that name."""


class ImageReferencedError(RepositoryError):
    """The image cannot be removed: composefs-rs streams still need it (an OCI
    image's config stream names its EROFS image). ``refs`` are the refs under
    ``streams/refs`` (relative to it) through which they are live."""

    def __init__(self, message: str, *, image: str, refs: list[str]) -> None:
        super().__init__(message)
        self.image = image
        self.refs = refs


class InvalidNameError(RepositoryError, ValueError):
    """A ref name or digest that is not well formed."""


class VerityRequiredError(RepositoryError):
    """The repository requires fs-verity and the kernel or filesystem cannot enable it."""


class ReadOnlyRepositoryError(RepositoryError):
    """A write was asked of a repository on a read-only filesystem, one this process
    may not write to, or one whose ``meta.json`` has a read-only-compatible feature
    flag we do not know."""


class RepositoryBusyError(RepositoryError):
    """The lock could not be taken within the time allowed."""


class SourceError(RepositoryError):
    """A bad CreateImage source: missing, not a directory, an unreadable file, a
    file that changed while it was being imported, a missing or wrong object."""


def os_error_text(exc: OSError) -> str:
    """``exc``'s strerror, or the errno's text, or its ``str()``."""
    if exc.strerror:
        return exc.strerror
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc)
