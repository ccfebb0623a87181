"""``composefsd-install-units``: put a pip-installed composefsd under systemd.

The wheel carries ``systemd/`` (the units, the boot-mount generator,
``mounts.conf.example`` and the ``install-units`` script) as data files under
``share/composefsd/systemd/``, and the polkit actions under
``share/composefsd/polkit/`` (``install-units`` puts them where polkit reads them), of
the installation's prefix: a venv, ``/usr/local`` for root's ``pip install
--break-system-packages``, ``~/.local`` for ``--user``.
This command runs that ``install-units`` with ``--composefsd`` naming the
``composefsd`` script installed beside it, so that the unit's ``ExecStart=`` is the
daemon that was installed, whatever PATH says; every argument is passed on
(``--root DIR``, ``--unit-dir DIR``, ``--enable``, ..., and a ``--composefsd PATH``
of one's own, which wins). Both are found through the distribution's RECORD,
which names every file the installation wrote wherever its scheme put it; in a
source checkout (an editable install) the checkout's ``systemd/`` serves.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

__all__ = ["UnitFilesMissing", "installed_composefsd", "main", "systemd_dir"]

_DIST = "composefsd"
_DATA_PARTS = ("share", "composefsd", "systemd", "install-units")


class UnitFilesMissing(Exception):
    """The installation has no systemd files, or no composefsd script."""


def _record() -> list[tuple[PurePosixPath, Path]]:
    """(path as RECORD names it, where it is) of every file installed."""
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        return []
    return [(PurePosixPath(f.as_posix()), Path(str(f.locate()))) for f in dist.files or ()]


def _checkout_systemd() -> Path | None:
    # src/composefsd/cli/install_units.py -> the checkout's root.
    root = Path(__file__).resolve().parents[3]
    script = root / "systemd" / "install-units"
    if (root / "pyproject.toml").is_file() and script.is_file():
        return script.parent
    return None


def systemd_dir() -> Path:
    """The folder holding the installed ``install-units`` and the files it installs."""
    for name, where in _record():
        if name.parts[-len(_DATA_PARTS) :] == _DATA_PARTS and where.is_file():
            return where.resolve().parent
    checkout = _checkout_systemd()
    if checkout is not None:
        return checkout
    raise UnitFilesMissing(
        "this installation of composefsd carries no systemd files "
        "(share/composefsd/systemd/install-units is not in its RECORD)"
    )


def installed_composefsd() -> Path:
    """The ``composefsd`` script this installation wrote."""
    for name, where in _record():
        if name.parts[-2:] == ("bin", "composefsd") and where.is_file():
            return where.resolve()
    # No RECORD entry (running from a bare checkout): the interpreter's own bin/.
    beside = Path(sys.executable).parent / "composefsd"
    if beside.is_file():
        return beside.absolute()
    raise UnitFilesMissing("no installed composefsd script found; give --composefsd PATH")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the installed ``install-units`` with ``argv`` (default: sys.argv[1:])."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        script = systemd_dir() / "install-units"
        # An explicit --composefsd comes later on the command line and wins.
        wanted = [] if "--composefsd" in args else ["--composefsd", str(installed_composefsd())]
    except UnitFilesMissing as exc:
        sys.stderr.write(f"composefsd-install-units: {exc}\n")
        return 1
    # exec: the script's exit status and messages are this command's.
    os.execv("/bin/sh", ["/bin/sh", str(script), *wanted, *args])
