"""The composefs object repository: objects, images, refs, verification, GC.

The on-disk layout is composefs-rs's (``meta.json``, ``objects/XX/rest``,
``images/<hex>``, ``images/refs/<name>``), so that either tool opens the other's
repositories. Start with :class:`Repository` (``Repository.init(path)`` or
``Repository.open(path)``). The lock discipline is documented in
:mod:`composefsd.repository.locking`, the verity policy in
:mod:`composefsd.repository.meta`, object publishing in
:mod:`composefsd.repository.store` (bulk imports in
:mod:`composefsd.repository.importer`), CreateImage in
:mod:`composefsd.repository.images` and GC in :mod:`composefsd.repository.gc`.
"""

from typing import TYPE_CHECKING

from composefsd.repository.errors import (
    CorruptObjectError,
    CorruptRepositoryError,
    ImageNotFoundError,
    ImageReferencedError,
    InvalidNameError,
    NotARepositoryError,
    ReadOnlyRepositoryError,
    RepositoryBusyError,
    RepositoryError,
    SourceError,
    UnknownFeatureError,
    UnsupportedRepositoryError,
    VerityRequiredError,
)
from composefsd.repository.images import (
    CreateOptions,
    CreateResult,
    ImageDetails,
    ImageEntry,
)
from composefsd.repository.locking import gc_lock, reader_lock, writer_lock
from composefsd.repository.meta import FormatConfig, RepoMetadata, VerityPolicy
from composefsd.repository.progress import Progress, ProgressCallback
from composefsd.repository.repo import Repository, default_path
from composefsd.repository.store import ObjectResult

if TYPE_CHECKING:
    from composefsd.repository.gc import GcResult

__all__ = [
    "CorruptObjectError",
    "CorruptRepositoryError",
    "CreateOptions",
    "CreateResult",
    "FormatConfig",
    "GcResult",
    "ImageDetails",
    "ImageEntry",
    "ImageNotFoundError",
    "ImageReferencedError",
    "InvalidNameError",
    "NotARepositoryError",
    "ObjectResult",
    "Progress",
    "ProgressCallback",
    "ReadOnlyRepositoryError",
    "RepoMetadata",
    "Repository",
    "RepositoryBusyError",
    "RepositoryError",
    "SourceError",
    "UnknownFeatureError",
    "UnsupportedRepositoryError",
    "VerityPolicy",
    "VerityRequiredError",
    "default_path",
    "gc_lock",
    "reader_lock",
    "writer_lock",
]


def __getattr__(name: str) -> object:
    # GC's code (its module and what only it uses) is loaded when GC runs, not
    # by every caller that opens a repository (Verify, the mount code).
    if name == "GcResult":
        from composefsd.repository.gc import GcResult

        return GcResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
