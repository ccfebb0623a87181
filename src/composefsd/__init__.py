"""composefsd: a composefs object repository, image builder and mounter served over Varlink."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

__all__ = ["version"]


@cache
def version() -> str:
    """This package's version, from its installed metadata (pyproject.toml is the one
    place that sets it); ``0+unknown`` in a source tree that was never installed."""
    # Imported here, not above: importlib.metadata costs every command about 15 ms
    # at start, and only --version and the daemon ask.
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("composefsd")
    except PackageNotFoundError:
        return "0+unknown"


if TYPE_CHECKING:
    __version__: str
else:

    def __getattr__(name: str) -> str:
        # ``composefsd.__version__``, the usual spelling, read on first use (PEP 562).
        if name == "__version__":
            return version()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
