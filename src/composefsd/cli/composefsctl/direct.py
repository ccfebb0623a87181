"""The ``composefsctl`` commands run against the repository in this process
(``--direct``, or when no daemon answers): they open it and take its locks like any
other user of it. Only imported when a command runs directly, so that commands sent
to the daemon load no repository code."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from composefsd.cli.composefsctl import output
from composefsd.cli.composefsctl.arguments import (
    check_mount,
    check_verify,
    check_xattrs,
    id_mappings,
    open_userns,
)
from composefsd.cli.composefsctl.errors import Failed, Usage
from composefsd.image.transforms import Transform, XattrFilter
from composefsd.kernel.mount import unmount
from composefsd.kernel.mountinfo import ComposefsMount, list_composefs_mounts
from composefsd.kernel.repomount import (
    mount_repository_image,
    mounted_images,
    repository_mounts,
)
from composefsd.repository import (
    CreateOptions,
    Repository,
    RepositoryError,
    VerityPolicy,
    default_path,
)
from composefsd.repository.verify import stream_names
from composefsd.service.replies import describe_repository, mount_reply

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Run the command of ``args`` on the repository; its errors become :class:`Failed`."""
    try:
        return _COMMANDS[args.command](args)
    except RepositoryError as exc:
        raise Failed(str(exc)) from exc


def _open(args: argparse.Namespace) -> Repository:
    return Repository.open(args.repo)


def _cmd_init(args: argparse.Namespace) -> int:
    path = args.repo if args.repo is not None else default_path()
    repo = Repository.init(
        path,
        algorithm=args.algorithm,
        verity=VerityPolicy(args.verity),
        erofs_version=args.erofs_version,
    )
    output.say(
        f"initialized {repo.algorithm} repository in {repo.path} (fs-verity: "
        f"{repo.verity}, images: V{int(repo.erofs_version)})"
    )
    return 0


def _create_options(args: argparse.Namespace) -> CreateOptions:
    check_xattrs(args)
    try:
        return CreateOptions(
            use_epoch=args.use_epoch,
            skip_xattrs=args.skip_xattrs,
            user_xattrs=args.user_xattrs,
            skip_devices=args.skip_devices,
            min_version=args.min_version,
            max_version=args.max_version,
            erofs_version=args.erofs_version,
            transform=Transform(
                propagate_usr_to_root=args.propagate_usr_to_root,
                xattrs=(
                    XattrFilter(args.xattrs or XattrFilter.ALLOWLIST_ONLY.value)
                    if args.propagate_usr_to_root
                    else XattrFilter.ALL
                ),
                bootable=args.bootable,
            ),
            preserve_hardlinks=args.preserve_hardlinks,
            threads=args.threads,
        )
    except ValueError as exc:
        raise Failed(str(exc)) from exc


def _cmd_create_image(args: argparse.Namespace) -> int:
    if (args.source is None) == (args.from_dumpfile is None):
        raise Usage("give either SOURCE (a directory) or --from-dumpfile DUMP --objects DIR")
    if args.from_dumpfile is not None and args.objects is None:
        raise Usage("--from-dumpfile needs --objects DIR, the directory holding its objects")
    if args.objects is not None and args.from_dumpfile is None:
        raise Usage("--objects only goes with --from-dumpfile")
    options = _create_options(args)
    repo = _open(args)
    printer = output.progress(args)
    try:
        if args.from_dumpfile is not None:
            dump: str | bytes = args.from_dumpfile
            if args.from_dumpfile == "-":
                dump = sys.stdin.buffer.read()
            result = repo.create_image_from_dumpfile(
                dump, args.objects, options=options, ref=args.ref, progress=printer
            )
        else:
            result = repo.create_image(args.source, options=options, ref=args.ref, progress=printer)
    finally:
        if printer is not None:
            printer.finish()
    output.report_created(asdict(result), args)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    check_verify(args)
    repo = _open(args)
    names = [entry.digest for entry in repo.list_images()] if args.all else args.images
    # --all is everything, as the daemon's Verify without image or stream.
    streams = [*stream_names(repo), *args.stream] if args.all else args.stream
    printer = output.progress(args)
    docs: list[dict[str, Any]] = []
    jobs = [(name, repo.verify_image) for name in names]
    jobs += [(name, repo.verify_stream) for name in streams]
    try:
        for name, verify in jobs:
            report = verify(name, progress=printer)
            if printer is not None:
                printer.finish()
            doc = report.to_dict()
            docs.append(doc)
            if not args.json:
                output.print_verify(doc, sys.stdout)
    finally:
        if printer is not None:
            printer.finish()
    if args.json:
        output.print_json(docs, sys.stdout)
    return 0 if all(d["ok"] for d in docs) else 1


def _cmd_fsck(args: argparse.Namespace) -> int:
    repo = _open(args)
    printer = output.progress(args)
    try:
        report = repo.fsck(progress=printer)
    finally:
        if printer is not None:
            printer.finish()
    if args.json:
        output.print_json(report.to_dict(), sys.stdout)
    else:
        output.print_fsck(report, sys.stdout)
    return 0 if report.ok else 1


def _cmd_images(args: argparse.Namespace) -> int:
    output.report_images([asdict(e) for e in _open(args).list_images()], args)
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    d = _open(args).describe_image(args.image)
    if args.json:
        output.print_json(asdict(d), sys.stdout)
    else:
        output.print_description(d)
    return 0


def _cmd_remove_ref(args: argparse.Namespace) -> int:
    _open(args).remove_ref(args.name)
    return 0


def _cmd_remove_image(args: argparse.Namespace) -> int:
    refs = _open(args).remove_image(args.image)
    output.report_removed(args, refs)
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    repo = _open(args)
    printer = output.progress(args)
    try:
        # Mounted images are roots: their files are in use (composefs-rs #346).
        pins = [*args.pin, *sorted(mounted_images(repo))]
        result = repo.gc(pins=pins, roots=args.root, dry_run=args.dry_run, progress=printer)
    finally:
        if printer is not None:
            printer.finish()
    output.report_gc(asdict(result), args)
    return 0


def _cmd_mount(args: argparse.Namespace) -> int:
    repo = _open(args)
    check_mount(args)
    uid_map, gid_map = id_mappings(args)
    userns_fd = None if args.idmap_userns is None else open_userns(args.idmap_userns)
    try:
        mount = mount_repository_image(
            repo,
            args.image,
            verity=VerityPolicy(args.verity) if args.verity else None,
            read_only=not args.rw if args.rw else None,
            upperdir=args.upperdir,
            workdir=args.workdir,
            userns_fd=userns_fd,
            uid_map=uid_map,
            gid_map=gid_map,
            expected_digest=args.expected_digest,
        )
    finally:
        if userns_fd is not None:
            os.close(userns_fd)
    with mount:
        mount.attach(args.where)
    doc = output.mount_doc(
        os.path.abspath(args.where), mount.source, mount.image_digest, mount_reply(mount)
    )
    doc |= {"layerMode": mount.layer_mode, "backing": mount.backing, "notes": mount.notes}
    output.report_mount(doc, args, attached=False)
    return 0


def _cmd_unmount(args: argparse.Namespace) -> int:
    gone = unmount(args.where, lazy=args.lazy)
    output.report_unmounted(args, gone.mountpoint, gone.source, gone.digest)
    return 0


def _mount_doc(m: ComposefsMount) -> dict[str, Any]:
    return {
        "mountpoint": m.mountpoint,
        "source": m.source,
        "digest": m.digest,
        "readOnly": m.read_only,
        "verity": m.verity,
        "datadirs": list(m.datadirs),
        "upperdir": m.upperdir,
    }


def _cmd_mounts(args: argparse.Namespace) -> int:
    if args.all:
        mounts = list_composefs_mounts()
    else:
        mounts = repository_mounts(_open(args))
    output.report_mounts([_mount_doc(m) for m in mounts], args)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    doc = describe_repository(_open(args), list_composefs_mounts())
    if args.json:
        output.print_json(doc, sys.stdout)
    else:
        output.print_status(doc, "none (working on the repository directly)")
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": _cmd_status,
    "init": _cmd_init,
    "create-image": _cmd_create_image,
    "verify": _cmd_verify,
    "fsck": _cmd_fsck,
    "images": _cmd_images,
    "describe": _cmd_describe,
    "remove-ref": _cmd_remove_ref,
    "remove-image": _cmd_remove_image,
    "gc": _cmd_gc,
    "mount": _cmd_mount,
    "unmount": _cmd_unmount,
    "mounts": _cmd_mounts,
}
