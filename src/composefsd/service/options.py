"""Command-line spellings composefsd and ``composefsctl`` share: ``--version``, and
(with ``composefsctl init``) the algorithm and the image format of a repository
they create. Free of repository code, which composefsctl's client path must not
load; the algorithm and format names are made when first used (module
``__getattr__``), since every composefsctl command needs ``--version`` and only
``init`` and ``create-image`` these (their enums cost 1.5 ms of each start)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import composefsd

if TYPE_CHECKING:
    from composefsd.image.format import ErofsVersion

    #: An algorithm as cfsctl's ``--hash`` spells it and as meta.json does
    #: (``Repository.init`` takes both).
    ALGORITHM_NAMES: tuple[str, ...]
    #: An image format: its number, nothing looser (not ``V1``, ``01`` or `` 1``).
    EROFS_VERSION_NAMES: tuple[str, ...]

__all__ = ["ALGORITHM_NAMES", "EROFS_VERSION_NAMES", "VersionAction", "erofs_version_argument"]


def _names(name: str) -> tuple[str, ...]:
    made: tuple[str, ...] | None = globals().get(name)
    if made is not None:
        return made
    if name == "ALGORITHM_NAMES":
        from composefsd.kernel.verity import Algorithm

        names = tuple(n for a in Algorithm for n in (a.value, a.composefs_rs_name))
    elif name == "EROFS_VERSION_NAMES":
        from composefsd.image.format import ErofsVersion

        names = tuple(str(int(v)) for v in ErofsVersion)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = names
    return names


def __getattr__(name: str) -> tuple[str, ...]:
    """``ALGORITHM_NAMES`` and ``EROFS_VERSION_NAMES``, made when first asked for."""
    return _names(name)


def erofs_version_argument(text: str) -> ErofsVersion:
    """argparse ``type`` for ``--erofs-version``."""
    from composefsd.image.format import ErofsVersion

    known_names = _names("EROFS_VERSION_NAMES")
    if text not in known_names:
        known = f"{', '.join(known_names[:-1])} or {known_names[-1]}"
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
