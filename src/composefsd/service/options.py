"""Command-line spellings composefsd and ``composefsctl init`` share: the algorithm
and the image format of a repository they create. Free of repository code, which
composefsctl's client path must not load."""

from __future__ import annotations

import argparse

from composefsd.image.format import ErofsVersion
from composefsd.kernel.verity import Algorithm

__all__ = ["ALGORITHM_NAMES", "EROFS_VERSION_NAMES", "erofs_version_argument"]

#: An algorithm as cfsctl's ``--hash`` spells it and as meta.json does
#: (``Repository.init`` takes both).
ALGORITHM_NAMES = tuple(name for a in Algorithm for name in (a.value, a.composefs_rs_name))
#: An image format: its number, nothing looser (not ``V1``, ``01`` or `` 1``).
EROFS_VERSION_NAMES = tuple(str(int(v)) for v in ErofsVersion)


def erofs_version_argument(text: str) -> ErofsVersion:
    """argparse ``type`` for ``--erofs-version``."""
    if text not in EROFS_VERSION_NAMES:
        known = f"{', '.join(EROFS_VERSION_NAMES[:-1])} or {EROFS_VERSION_NAMES[-1]}"
        raise argparse.ArgumentTypeError(f"not an EROFS format version ({known}): {text!r}")
    return ErofsVersion(int(text))
