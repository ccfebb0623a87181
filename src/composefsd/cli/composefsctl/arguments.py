"""The checks of a ``composefsctl`` command line that need more than the parser,
made the same way whether the command goes to the daemon or runs directly."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from composefsd.cli.composefsctl.errors import Failed, Usage

if TYPE_CHECKING:
    from composefsd.kernel.userns import IdMapping

__all__ = ["check_mount", "check_verify", "check_xattrs", "id_mappings", "open_userns"]


def check_xattrs(args: argparse.Namespace) -> None:
    """``create-image``: the xattr and format options that exclude each other."""
    if args.skip_xattrs and args.user_xattrs:
        raise Usage("--skip-xattrs and --user-xattrs exclude each other")
    if args.erofs_version is not None and (
        args.min_version is not None or args.max_version is not None
    ):
        raise Usage("--erofs-version and --min-version/--max-version exclude each other")
    if args.xattrs is not None and not args.propagate_usr_to_root:
        raise Usage("--xattrs only goes with --propagate-usr-to-root")
    if (args.propagate_usr_to_root or args.bootable) and (
        args.min_version is not None or args.max_version is not None
    ):
        raise Usage(
            "--min-version/--max-version (C mkcomposefs's image) exclude composefs-rs's "
            "transforms (--propagate-usr-to-root, --bootable)"
        )


def check_verify(args: argparse.Namespace) -> None:
    """``verify``: IMAGE names or ``--all``, not both; or only ``--stream`` names."""
    if args.all and args.images:
        raise Usage("give IMAGE names or --all, not both")
    if not args.all and not args.images and not args.stream:
        raise Usage("give the IMAGE(s) to verify, or --all, or --stream NAME")


def check_mount(args: argparse.Namespace) -> None:
    """``mount``: the options that go together or exclude each other."""
    if (args.upperdir is None) != (args.workdir is None):
        raise Usage("--upperdir and --workdir go together")
    if args.idmap_userns is not None and (args.uid_map or args.gid_map):
        raise Usage("--idmap-userns and --uid-map/--gid-map exclude each other")
    if args.gid_map and not args.uid_map:
        raise Usage("--gid-map needs --uid-map")


def id_mappings(args: argparse.Namespace) -> tuple[list[IdMapping] | None, list[IdMapping] | None]:
    """``mount``: the uid and gid mappings given, parsed."""
    if not args.uid_map and not args.gid_map:
        return None, None
    # Here, not above, and only for a mapping: the kernel module loads ctypes and
    # dataclasses (10 ms, more than the rest of a client's start).
    from composefsd.kernel.userns import parse_mapping

    try:
        uid_map = parse_mapping(args.uid_map) if args.uid_map else None
        gid_map = parse_mapping(args.gid_map) if args.gid_map else None
    except ValueError as exc:
        raise Usage(str(exc)) from None
    return uid_map, gid_map


def open_userns(path: str) -> int:
    """``mount --idmap-userns PATH``: the user namespace's fd."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise Failed(f"cannot open user namespace {path}: {exc.strerror}") from None
