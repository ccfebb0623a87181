"""The ``composefsctl`` commands as io.composefs.Repository calls to a composefsd:
each sends the command line's parameters (and fds on the directories it names),
and turns the replies into the documents direct mode prints. Nothing here loads
repository code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from composefsd.cli.composefsctl import generic, output
from composefsd.cli.composefsctl.arguments import (
    check_mount,
    check_verify,
    check_xattrs,
    id_mappings,
    open_userns,
)
from composefsd.cli.composefsctl.errors import Failed, Usage
from composefsd.service.client import INTERFACE, Connection, Reply, VarlinkCallError

__all__ = [
    "ASKS_POLKIT",
    "COMMANDS",
    "DAEMON_ONLY",
    "asks_password",
    "call_error_text",
    "more_replies",
    "mount_call",
]


#: ``--xattrs`` values (cfsctl's) as the IDL's XattrFilter names them.
_XATTR_FILTERS = {"allowlist-only": "allowlistOnly", "keep-user-xattrs": "keepUserXattrs"}


def _method(name: str) -> str:
    return f"{INTERFACE}.{name}"


def _opt(params: dict[str, Any], key: str, value: Any) -> None:
    if value is not None and value is not False:
        params[key] = value


def more_replies(
    conn: Connection,
    method: str,
    params: dict[str, Any],
    printer: output.ProgressPrinter | None,
    fds: Sequence[int] = (),
) -> Iterator[Reply]:
    """The non-progress replies of a ``more`` call (of io.composefs.Repository unless
    ``method`` is qualified); progress goes to ``printer``."""
    try:
        for reply in conn.call(
            method if "." in method else _method(method), params, more=True, fds=fds
        ):
            if "progress" in reply:
                if printer is not None:
                    printer.reply(reply)
                continue
            if printer is not None:
                printer.finish()
            yield reply
    finally:
        if printer is not None:
            printer.finish()


def _open_dir_fd(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise Failed(f"{what} {path}: {exc.strerror}") from None


def _client_status(conn: Connection, args: argparse.Namespace) -> int:
    doc = dict(conn.call(_method("Describe")))
    if args.json:
        output.print_json(doc, sys.stdout)
    else:
        output.print_status(doc, f"composefsd {doc.get('version', '?')} at {conn.address}")
    return 0


def _client_create_image(conn: Connection, args: argparse.Namespace) -> int:
    if args.source is None:
        raise Usage("give SOURCE, the directory to import")
    check_xattrs(args)
    params: dict[str, Any] = {}
    fds: list[int] = []
    if args.by_path:
        params["sourcePath"] = os.path.abspath(args.source)
    else:
        fds.append(_open_dir_fd(args.source, "source"))
        params["sourceDirectoryFileDescriptor"] = 0
    _opt(params, "ref", args.ref)
    _opt(params, "useEpoch", args.use_epoch)
    _opt(params, "skipXattrs", args.skip_xattrs)
    _opt(params, "userXattrs", args.user_xattrs)
    _opt(params, "skipDevices", args.skip_devices)
    _opt(params, "minVersion", args.min_version)
    _opt(params, "maxVersion", args.max_version)
    _opt(params, "erofsVersion", args.erofs_version)
    _opt(params, "propagateUsrToRoot", args.propagate_usr_to_root)
    if args.xattrs is not None:
        params["xattrs"] = _XATTR_FILTERS[args.xattrs]
    _opt(params, "bootable", args.bootable)
    printer = output.progress(args)
    result: Reply | None = None
    try:
        for reply in more_replies(conn, "CreateImage", params, printer, fds):
            result = reply
    finally:
        for fd in fds:
            os.close(fd)
    assert result is not None
    doc = {
        "digest": result["digest"],
        "ref": result.get("ref"),
        "files": result.get("files", 0),
        "objects_written": result.get("objectsWritten", 0),
        "objects_reused": result.get("objectsReused", 0),
        "bytes_written": result.get("bytesWritten", 0),
        "verity_enabled": result.get("verityEnabled", False),
        "erofs_version": result.get("erofsVersion"),
        "extra_images": {
            str(image["erofsVersion"]): image["digest"] for image in result.get("extraImages", [])
        },
    }
    output.report_created(doc, args)
    return 0


def _verify_doc(reply: Reply) -> dict[str, Any]:
    """A Verify result in the shape of ``VerifyReport.to_dict()`` (less bytes_checked
    and verity_required, which the service does not report)."""
    problems = reply.get("problems") or []
    own = "stream" if "stream" in reply else "image"
    doc: dict[str, Any] = {
        "digest": reply.get("digest", ""),
        "ok": bool(reply.get("ok")),
        "image_problems": [p["message"] for p in problems if p.get("kind") == own],
        "missing": [p.get("object") for p in problems if p.get("kind") == "missing-object"],
        "corrupt": [
            {
                "digest": p.get("object"),
                "reason": p["message"].removeprefix(f"object {p.get('object')}: "),
            }
            for p in problems
            if p.get("kind") == "corrupt-object"
        ],
        "no_verity": [p.get("object") for p in problems if p.get("kind") == "no-verity"],
        "objects_checked": reply.get("objectsChecked", 0),
        "verity_measured": reply.get("verityMeasured", 0),
    }
    if "stream" in reply:
        doc["stream"] = reply["stream"]
    return doc


def _client_verify(conn: Connection, args: argparse.Namespace) -> int:
    check_verify(args)
    printer = output.progress(args)
    docs: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = [{}] if args.all else [{"image": n} for n in args.images]
    calls += [{"stream": n} for n in args.stream]
    for params in calls:
        for reply in more_replies(conn, "Verify", params, printer):
            if "digest" not in reply and "stream" not in reply:
                continue  # Verify of everything in an empty repository
            doc = _verify_doc(reply)
            docs.append(doc)
            if not args.json:
                output.print_verify(doc, sys.stdout)
                sys.stdout.flush()
    if args.json:
        output.print_json(docs, sys.stdout)
    return 0 if all(d["ok"] for d in docs) else 1


def _client_images(conn: Connection, args: argparse.Namespace) -> int:
    entries = conn.call(_method("ListImages"))["images"]
    docs = [
        {
            "digest": e["digest"],
            "size": e["size"],
            "refs": list(e["refs"]),
            "created": e["createdUSec"] / 1_000_000,
        }
        for e in entries
    ]
    output.report_images(docs, args)
    return 0


def _client_remove_image(conn: Connection, args: argparse.Namespace) -> int:
    refs = conn.call(_method("RemoveImage"), {"image": args.image})["removedRefs"]
    output.report_removed(args, refs)
    return 0


def _client_gc(conn: Connection, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    _opt(params, "dryRun", args.dry_run)
    if args.root:
        params["roots"] = list(args.root)
    result: Reply | None = None
    for reply in more_replies(conn, "GarbageCollect", params, output.progress(args)):
        result = reply
    assert result is not None
    doc = {
        "objects_removed": result.get("objectsRemoved", 0),
        "bytes_removed": result.get("bytesRemoved", 0),
        "images_removed": result.get("imagesRemoved", 0),
        "links_removed": result.get("linksRemoved", 0),
        "streams_pruned": result.get("streamsPruned", 0),
        "dry_run": bool(result.get("dryRun", args.dry_run)),
    }
    output.report_gc(doc, args)
    return 0


def _client_mount(conn: Connection, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"image": args.image}
    _opt(params, "expectedDigest", args.expected_digest)
    reply, where = mount_call(conn, _method("Mount"), params, args)
    digest = reply["digest"]
    output.report_mount(
        output.mount_doc(where, f"composefs:{digest}", digest, reply), args, attached=args.fd_attach
    )
    return 0


def mount_call(
    conn: Connection, method: str, params: dict[str, Any], args: argparse.Namespace
) -> tuple[Reply, str]:
    """Call ``method`` (io.composefs.Repository.Mount or io.composefs.Oci.Mount) with
    ``params`` and the mount options of ``args`` (fds on the directories and user
    namespace it names), attaching the mount here with ``--fd-attach``: the reply
    and the absolute mount point."""
    check_mount(args)
    where = os.path.abspath(args.where)
    _opt(params, "verity", args.verity)
    if args.rw:
        params["readOnly"] = False
    fds: list[int] = []
    try:
        if args.upperdir is not None:
            params["upperDirectoryFileDescriptor"] = len(fds)
            fds.append(_open_dir_fd(args.upperdir, "upperdir"))
            params["workDirectoryFileDescriptor"] = len(fds)
            fds.append(_open_dir_fd(args.workdir, "workdir"))
        if args.idmap_userns is not None:
            params["userNamespaceFileDescriptor"] = len(fds)
            fds.append(open_userns(args.idmap_userns))
        uid_map, gid_map = id_mappings(args)
        if uid_map is not None or gid_map is not None:
            from dataclasses import (
                asdict,
            )  # mappings are dataclasses; not loaded for other commands
        if uid_map is not None:
            params["uidMap"] = [asdict(m) for m in uid_map]
        if gid_map is not None:
            params["gidMap"] = [asdict(m) for m in gid_map]
        if not args.fd_attach:
            params["where"] = where
        reply = conn.call(method, params, fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    if args.fd_attach:
        from composefsd.kernel.syscalls import move_mount

        mount_fd = reply.take_fd("mountFileDescriptor")
        reply.close_fds()
        try:
            move_mount(mount_fd, where)
        finally:
            os.close(mount_fd)
    return reply, where


def _client_unmount(conn: Connection, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"where": os.path.abspath(args.where)}
    _opt(params, "lazy", args.lazy)
    reply = conn.call(_method("Unmount"), params)
    digest = reply.get("digest")
    source = f"composefs:{digest}" if digest else "composefs"
    output.report_unmounted(args, params["where"], source, digest)
    return 0


def _client_mounts(conn: Connection, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    _opt(params, "all", args.all)
    mounts = conn.call(_method("ListMounts"), params)["mounts"]
    docs = [
        {
            "mountpoint": m["where"],
            "source": m["source"],
            "digest": m.get("digest"),
            "readOnly": m["readOnly"],
            "verity": m["verity"],
        }
        for m in mounts
    ]
    output.report_mounts(docs, args)
    return 0


def _client_mount_dumpfile(conn: Connection, args: argparse.Namespace) -> int:
    from composefsd.cli.composefsctl import mountdumpfile  # loads the kernel layer

    return mountdumpfile.run(conn, args)


def _client_oci(conn: Connection, args: argparse.Namespace) -> int:
    from composefsd.cli.composefsctl import oci  # it builds on this module

    return oci.run(conn, args)


#: Commands that have no direct mode: they need a daemon.
DAEMON_ONLY = frozenset({"oci", "mount-dumpfile", *generic.COMMANDS})

#: Commands whose calls composefsd may put to polkit (``oci`` with its subcommand).
ASKS_POLKIT = frozenset(
    {
        "create-image",
        "mount",
        "unmount",
        "remove-image",
        "gc",
        "oci pull",
        "oci tag",
        "oci untag",
        "oci mount",
    }
)


def asks_password(args: argparse.Namespace) -> bool:
    """Whether this command lets polkit ask for a password, as systemd's tools do:
    not root, stdin a terminal (it is about input), no ``--no-ask-password``."""
    command = args.command
    if command == "oci":
        command = f"oci {args.oci_command}"
    if command not in ASKS_POLKIT or args.no_ask_password or os.geteuid() == 0:
        return False
    return os.isatty(0)


COMMANDS: dict[str, Callable[[Connection, argparse.Namespace], int]] = {
    "status": _client_status,
    "create-image": _client_create_image,
    "verify": _client_verify,
    "images": _client_images,
    "remove-image": _client_remove_image,
    "gc": _client_gc,
    "mount": _client_mount,
    "unmount": _client_unmount,
    "mounts": _client_mounts,
    "mount-dumpfile": _client_mount_dumpfile,
    "oci": _client_oci,
    **generic.COMMANDS,
}


def call_error_text(exc: VarlinkCallError) -> str:
    """One line naming the error and saying what it means."""
    p = exc.parameters
    short = exc.name.rpartition(".")[2]
    if short == "DumpfileRejected" and isinstance(p.get("message"), str):
        line = p.get("line")
        where = f"line {line}: " if isinstance(line, int) else ""
        text = f"the dumpfile is refused: {where}{p['message']}"
    elif short == "BadFileDescriptor" and isinstance(p.get("message"), str):
        # composefsd's messages name the parameter already; others may not.
        parameter = str(p.get("parameter"))
        text = p["message"]
        if not text.startswith(parameter):
            text = f"{parameter}: {text}"
    elif short == "LimitExceeded" and isinstance(p.get("message"), str):
        text = f"{p['message']} (limit {p.get('limit')!s}: {p.get('value')!s})"
    elif short == "AuthorizationUnavailable" and isinstance(p.get("message"), str):
        text = f"polkit could not decide: {p['message']}"
    elif isinstance(p.get("message"), str):
        text = p["message"]
        if p.get("errnoName"):
            text += f" ({p['errnoName']})"
    elif short == "NoSuchImage":
        text = f"no image or ref {p.get('image')!r}"
    elif short == "ImageNotFound":
        text = f"no OCI image {p.get('image')!r}"
    elif short == "NotMounted":
        text = f"nothing composefs is mounted at {p.get('where')}"
    elif short == "ImageInUse":
        where = ", ".join(p.get("where") or []) or "?"
        text = f"image {p.get('image')!r} is in use: {where}"
    elif short == "InvalidParameter":
        text = f"invalid parameter {p.get('parameter')!r}"
    elif short == "PermissionDenied":
        text = "permission denied (composefsd refuses this call to this user)"
    elif short == "InteractiveAuthenticationRequired":
        text = (
            "polkit wants you to authenticate: run this on a terminal without "
            "--no-ask-password (with an authentication agent), or ask for a polkit rule"
        )
    elif short == "MethodNotFound":
        text = f"the service has no method {p.get('method')!r} (an older composefsd?)"
    elif short == "InterfaceNotFound":
        text = f"the service does not offer {p.get('interface')!r} (not composefsd?)"
    elif short == "ExpectedMore":
        text = "the method must be called with 'more'"
    elif p:
        text = json.dumps(p, sort_keys=True)
    else:
        text = "failed"
    return f"{exc.name}: {text}"
