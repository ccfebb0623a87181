"""Command-line spellings composefsd and ``composefsctl`` share: ``--version``, and
(with ``composefsctl init``) the algorithm and the image format of a repository
they create. Free of repository code, which composefsctl's client path must not
load."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import composefsd
from composefsd.image.format import ErofsVersion
from composefsd.kernel.verity import Algorithm

__all__ = ["ALGORITHM_NAMES", "EROFS_VERSION_NAMES", "VersionAction", "erofs_version_argument"]

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


class VersionAction(argparse.Action):
    """``--version``: print ``PROG VERSION`` (the parser's prog, the package's
    version) and exit 0. Unlike argparse's own, the version is looked up only when
    asked for (:func:`composefsd.version`)."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str = argparse.SUPPRESS,
        default: Any = argparse.SUPPRESS,
        help: str = "print the version and exit",
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        # On stdout, as argparse's own and GNU programs print it.
        sys.stdout.write(f"{parser.prog} {composefsd.version()}\n")
        parser.exit()
