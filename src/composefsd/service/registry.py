"""Registration under ``/run/varlink/registry/``, as systemd (260 and later) does
for its public Varlink services: one symbolic link per interface, named after
the interface, pointing at the socket that serves it (``varlinkctl
list-registry`` lists them). systemd makes these with its socket units'
``Symlinks=``; a daemon that listens on a socket of its own makes them itself,
here. The interfaces every service has (``org.varlink.service``,
``io.systemd.service``) are not registered: systemd registers only a service's
own interfaces.

Links are made when serving starts and removed at exit; an entry that exists
and is not a link to our socket (another service's, or anything else) is left
alone, with a warning, and never removed. The directory must be trusted
(:func:`~composefsd.service.runtime.secure_directory`: only root and our uid may
change it); it is created (0755) when missing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from composefsd.service.runtime import secure_directory

__all__ = [
    "SYSTEM_REGISTRY",
    "UNREGISTERED_INTERFACES",
    "Registration",
    "register",
    "registered_interfaces",
]

log = logging.getLogger(__name__)

SYSTEM_REGISTRY: Final = Path("/run/varlink/registry")
UNREGISTERED_INTERFACES: Final = frozenset({"org.varlink.service", "io.systemd.service"})
#: The Varlink specification's interface names: only these become file names.
_INTERFACE_NAME: Final = re.compile(r"[A-Za-z]([-]*[A-Za-z0-9])*(\.[A-Za-z0-9]([-]*[A-Za-z0-9])*)+")


def registered_interfaces(interfaces: Iterable[str]) -> list[str]:
    """Of a service's ``interfaces``, those to register (module notes), sorted."""
    return sorted(
        name
        for name in interfaces
        if name not in UNREGISTERED_INTERFACES and _INTERFACE_NAME.fullmatch(name)
    )


@dataclass(slots=True)
class Registration:
    """The links one daemon made (or found already pointing at its socket)."""

    directory: Path
    target: str
    entries: list[Path] = field(default_factory=list)

    def remove(self) -> None:
        """Remove the entries that still point at our socket."""
        for path in self.entries:
            try:
                if os.readlink(path) == self.target:
                    os.unlink(path)
            except OSError:
                pass
        self.entries.clear()


def register(directory: Path, interfaces: Iterable[str], socket_path: Path) -> Registration:
    """Link ``directory/<interface>`` to ``socket_path`` for each interface to
    register. Raises :class:`~composefsd.service.runtime.UnsafeDirectoryError` for an
    untrusted directory, another ``OSError`` if it cannot be made."""
    secure_directory(directory, 0o755)
    target = os.path.abspath(socket_path)
    reg = Registration(directory, target)
    for name in registered_interfaces(interfaces):
        path = directory / name
        try:
            os.symlink(target, path)
        except FileExistsError:
            try:
                existing = os.readlink(path)
            except OSError:
                existing = None
            if existing != target:
                log.warning(
                    "not registering %s: %s exists and is not a link to %s", name, path, target
                )
                continue
        except OSError as exc:
            log.warning("cannot register %s in %s: %s", name, directory, exc.strerror or exc)
            continue
        reg.entries.append(path)
    if reg.entries:
        log.info("registered %s in %s", ", ".join(p.name for p in reg.entries), directory)
    return reg
