"""How a ``composefsctl`` command stops short of what it was asked, in either mode:
each exception is one exit status of :func:`composefsd.cli.composefsctl.main`."""

from __future__ import annotations

__all__ = ["Failed", "Unreachable", "Usage"]


class Failed(Exception):
    """Stop with exit status 1 after printing the message as an error."""


class Usage(Exception):
    """A usage error found after parsing: the subcommand's usage, then exit status 2."""


class Unreachable(Exception):
    """The daemon named explicitly cannot be reached: exit status 3."""
