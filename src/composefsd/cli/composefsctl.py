"""``composefsctl``: manage a composefsd object repository, through the daemon or directly.

**Through the daemon** (client mode): when ``--connect ADDRESS`` is given, or
``$COMPOSEFSD_SOCKET`` is set, or neither ``--repo`` nor ``$COMPOSEFSD_REPOSITORY``
is set and composefsd's default socket (``/run/composefs/io.composefs.Repository``
for root, ``$XDG_RUNTIME_DIR/composefs/io.composefs.Repository`` otherwise) accepts
a connection, commands become io.composefs.Repository calls. ADDRESS is a socket
path, ``unix:PATH`` or ``exec:PATH`` (a composefsd to start for this one command).
A socket served by another user than root or the caller is refused, and so is a
default socket in a directory another user could change (exit status 3): nothing,
no call and no directory fd, goes to such a server.

**Directly** (``--direct``, or when no daemon answers): every subcommand opens the
repository given by ``--repo PATH`` (or ``$COMPOSEFSD_REPOSITORY``, or the default
location: ``/sysroot/composefs`` for root, ``~/.var/lib/composefs`` otherwise) and
takes the repository's locks, so it may run beside the service and other
``composefsctl`` processes. ``init``, ``fsck``, ``describe``, ``remove-ref`` and a
few options (``create-image --from-dumpfile/--preserve-hardlinks/--threads``,
``gc --pin``) have no daemon method: they run directly when the daemon was only
found at its default address, and are a usage error with an explicit one.

Output is the same in both modes where they overlap (``--json`` gives the same
keys, less those the service does not report). Exit status: 0 on success; 1 when
the operation failed or when ``verify`` or ``fsck`` found problems; 2 for a usage
error; 3 when the daemon cannot be reached (or the connection broke, or the server
is not trusted). Errors are
one line on stderr, ``composefsctl: error: <what went wrong>``; through the daemon
the line names the Varlink error, e.g. ``io.composefs.Repository.NoSuchImage: no
image or ref 'os/v9'``. Long operations show their progress on stderr when it is a
terminal (a bar), or always with ``--progress`` (a line per report).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any, NoReturn, TextIO

from composefsd.image.escape import printable
from composefsd.kernel import MountError, parse_mapping, unmount
from composefsd.kernel.mountinfo import ComposefsMount, list_composefs_mounts
from composefsd.kernel.repomount import (
    mount_repository_image,
    mounted_images,
    repository_mounts,
)
from composefsd.repository import (
    CreateOptions,
    Progress,
    Repository,
    RepositoryError,
    VerityPolicy,
    default_path,
)
from composefsd.repository.fsck import FsckReport
from composefsd.repository.verify import VerifyReport
from composefsd.service import client
from composefsd.service.client import (
    INTERFACE,
    Connection,
    Reply,
    VarlinkCallError,
    VarlinkClientError,
    VarlinkUntrustedError,
    default_address,
)
from composefsd.service.replies import describe_repository

__all__ = ["main"]

PROG = "composefsctl"
log = logging.getLogger(__name__)
#: Exit status when the daemon cannot be reached (or is not to be trusted).
EXIT_UNREACHABLE = 3


class _Failed(Exception):
    """Stop with exit status 1 after printing ``message`` as an error."""


class _Usage(Exception):
    """A usage error found after parsing: the subcommand's usage, then exit status 2."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


# -- output helpers --------------------------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _say(text: str, file: TextIO | None = None) -> None:
    """Print one line of human-readable output. Names in it come from callers, the
    repository or the daemon: escaped, they cannot forge rows or drive the terminal."""
    print(printable(text), file=sys.stdout if file is None else file)


def _print_json(doc: Any, out: TextIO) -> None:
    json.dump(doc, out, indent=2, sort_keys=False)
    out.write("\n")


class _ProgressPrinter:
    """Shows progress on stderr: on a terminal one rewritten line, a bar when the total
    is known; else a line per report (the library and the daemon already throttle
    them to a few a second)."""

    BAR = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.width = 0

    def __call__(self, p: Progress) -> None:
        count = f"{p.done}" + (f"/{p.total}" if p.total is not None else "")
        if self.tty and p.total:
            frac = min(1.0, max(0.0, p.done / p.total))
            filled = int(frac * self.BAR)
            text = f"{p.phase} [{'#' * filled}{'.' * (self.BAR - filled)}] {frac:4.0%} {count}"
        else:
            text = f"{p.phase}: {count}"
        if p.detail:
            text += f" {p.detail}"
        text = printable(text)
        if self.tty:
            pad = max(0, self.width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def reply(self, reply: Reply) -> bool:
        """Show the progress a daemon reply carries; False if it carries none."""
        p = reply.get("progress")
        if not isinstance(p, dict):
            return False
        self(Progress(str(p.get("phase", "")), int(p.get("done", 0)), p.get("total")))
        return True

    def finish(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def _progress(args: argparse.Namespace) -> _ProgressPrinter | None:
    if args.progress or sys.stderr.isatty():
        return _ProgressPrinter(sys.stderr)
    return None


def _open(args: argparse.Namespace) -> Repository:
    return Repository.open(args.repo)


# -- commands ---------------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    path = args.repo if args.repo is not None else default_path()
    repo = Repository.init(
        path,
        algorithm=f"fsverity-{args.algorithm}-12",
        verity=VerityPolicy(args.verity),
    )
    _say(f"initialized {repo.algorithm} repository in {repo.path} (fs-verity: {repo.verity})")
    return 0


def _create_options(args: argparse.Namespace) -> CreateOptions:
    if args.skip_xattrs and args.user_xattrs:
        raise _Usage("--skip-xattrs and --user-xattrs exclude each other")
    try:
        return CreateOptions(
            use_epoch=args.use_epoch,
            skip_xattrs=args.skip_xattrs,
            user_xattrs=args.user_xattrs,
            skip_devices=args.skip_devices,
            min_version=args.min_version,
            max_version=args.max_version,
            preserve_hardlinks=args.preserve_hardlinks,
            threads=args.threads,
        )
    except ValueError as exc:
        raise _Failed(str(exc)) from exc


def _cmd_create_image(args: argparse.Namespace) -> int:
    if (args.source is None) == (args.from_dumpfile is None):
        raise _Usage("give either SOURCE (a directory) or --from-dumpfile DUMP --objects DIR")
    if args.from_dumpfile is not None and args.objects is None:
        raise _Usage("--from-dumpfile needs --objects DIR, the directory holding its objects")
    if args.objects is not None and args.from_dumpfile is None:
        raise _Usage("--objects only goes with --from-dumpfile")
    options = _create_options(args)
    repo = _open(args)
    printer = _progress(args)
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
    if args.json:
        _print_json(asdict(result), sys.stdout)
    else:
        _say(result.digest)
        if args.verbose:
            _say(
                f"{result.files} files, {result.objects_written} objects written "
                f"({_size(result.bytes_written)}), {result.objects_reused} reused, "
                f"{_size(result.bytes_total)} in objects, "
                f"fs-verity: {'yes' if result.verity_enabled else 'no'}",
                file=sys.stderr,
            )
    return 0


def _print_verify(report: VerifyReport, out: TextIO) -> None:
    if report.ok:
        line = (
            f"{report.digest}: ok ({report.objects_checked} objects, "
            f"{_size(report.bytes_checked)}, {report.verity_measured} measured by fs-verity)"
        )
        if report.no_verity:
            line += f", {len(report.no_verity)} without fs-verity"
        _say(line, file=out)
        return
    _say(f"{report.digest}: FAILED", file=out)
    for text in report.image_problems:
        _say(f"  image: {text}", file=out)
    for digest in report.missing:
        _say(f"  missing object: {digest}", file=out)
    for digest, reason in report.corrupt:
        _say(f"  corrupt object: {digest}: {reason}", file=out)
    if report.verity_required:
        for digest in report.no_verity:
            _say(f"  no fs-verity: {digest}", file=out)
    _say(
        f"  ({report.objects_checked} objects checked, {len(report.missing)} missing, "
        f"{len(report.corrupt)} corrupt)",
        file=out,
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.all and args.images:
        raise _Usage("give IMAGE names or --all, not both")
    if not args.all and not args.images:
        raise _Usage("give the IMAGE(s) to verify, or --all")
    repo = _open(args)
    names = [entry.digest for entry in repo.list_images()] if args.all else args.images
    printer = _progress(args)
    reports: list[VerifyReport] = []
    try:
        for name in names:
            report = repo.verify_image(name, progress=printer)
            if printer is not None:
                printer.finish()
            reports.append(report)
            if not args.json:
                _print_verify(report, sys.stdout)
    finally:
        if printer is not None:
            printer.finish()
    if args.json:
        _print_json([r.to_dict() for r in reports], sys.stdout)
    return 0 if all(r.ok for r in reports) else 1


def _print_fsck(report: FsckReport, out: TextIO) -> None:
    for problem in report.problems:
        note = "" if problem.fatal else " (harmless)"
        _say(f"fsck: {problem.kind}: {problem.path}: {problem.message}{note}", file=out)
    fatal = sum(1 for p in report.problems if p.fatal)
    verdict = "clean" if report.ok else f"{fatal} problem{'s' if fatal != 1 else ''}"
    _say(
        f"fsck: {report.objects_checked} objects ({report.verity_measured} measured by "
        f"fs-verity), {report.images_checked} images, {report.refs_checked} refs: {verdict}",
        file=out,
    )


def _cmd_fsck(args: argparse.Namespace) -> int:
    repo = _open(args)
    printer = _progress(args)
    try:
        report = repo.fsck(progress=printer)
    finally:
        if printer is not None:
            printer.finish()
    if args.json:
        _print_json(report.to_dict(), sys.stdout)
    else:
        _print_fsck(report, sys.stdout)
    return 0 if report.ok else 1


def _cmd_images(args: argparse.Namespace) -> int:
    repo = _open(args)
    entries = repo.list_images()
    if args.json:
        _print_json([asdict(e) for e in entries], sys.stdout)
        return 0
    for e in entries:
        refs = ", ".join(e.refs) if e.refs else "-"
        _say(f"{e.digest}  {_size(e.size):>10}  {_time(e.created)}  {refs}")
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    repo = _open(args)
    d = repo.describe_image(args.image)
    if args.json:
        _print_json(asdict(d), sys.stdout)
        return 0
    _say(f"digest:            {d.digest}")
    _say(f"size:              {_size(d.size)} ({d.size} bytes)")
    _say(f"created:           {_time(d.created)}")
    _say(f"refs:              {', '.join(d.refs) if d.refs else '-'}")
    _say(f"composefs version: {d.composefs_version}")
    _say(f"objects:           {d.object_count} ({_size(d.objects_size)})")
    _say(f"entries:           {d.entries}")
    _say(f"fs-verity:         {'yes' if d.verity else 'no'}")
    return 0


def _cmd_remove_ref(args: argparse.Namespace) -> int:
    _open(args).remove_ref(args.name)
    return 0


def _cmd_remove_image(args: argparse.Namespace) -> int:
    refs = _open(args).remove_image(args.image)
    _report_removed(args, refs)
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    repo = _open(args)
    printer = _progress(args)
    try:
        # Mounted images are roots: their files are in use (composefs-rs #346).
        pins = [*args.pin, *sorted(mounted_images(repo))]
        result = repo.gc(pins=pins, dry_run=args.dry_run, progress=printer)
    finally:
        if printer is not None:
            printer.finish()
    if args.json:
        _print_json(asdict(result), sys.stdout)
        return 0
    verb = "would remove" if result.dry_run else "removed"
    _say(
        f"gc: {verb} {result.objects_removed} objects ({_size(result.bytes_removed)}), "
        f"{result.images_removed} images, {result.links_removed} dangling links"
    )
    return 0


def _check_mount_args(args: argparse.Namespace) -> None:
    if (args.upperdir is None) != (args.workdir is None):
        raise _Usage("--upperdir and --workdir go together")
    if args.idmap_userns is not None and (args.uid_map or args.gid_map):
        raise _Usage("--idmap-userns and --uid-map/--gid-map exclude each other")
    if args.gid_map and not args.uid_map:
        raise _Usage("--gid-map needs --uid-map")


def _open_userns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise _Failed(f"cannot open user namespace {path}: {exc.strerror}") from None


def _cmd_mount(args: argparse.Namespace) -> int:
    repo = _open(args)
    _check_mount_args(args)
    try:
        uid_map = parse_mapping(args.uid_map) if args.uid_map else None
        gid_map = parse_mapping(args.gid_map) if args.gid_map else None
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    userns_fd = None if args.idmap_userns is None else _open_userns(args.idmap_userns)
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
    result = {
        "where": os.path.abspath(args.where),
        "source": mount.source,
        "imageCheck": mount.image_check,
        "imageDigest": mount.image_digest,
        "objectVerity": mount.object_verity,
        "readOnly": mount.read_only,
        "idmapped": mount.idmapped,
        "layerMode": mount.layer_mode,
        "backing": mount.backing,
        "notes": mount.notes,
    }
    if args.json:
        _print_json(result, sys.stdout)
    elif args.verbose:
        checked = {
            "kernel": "image digest checked by fs-verity",
            "userspace": "image digest checked in userspace",
            "none": "image digest not checked",
        }[mount.image_check]
        objects = "object verity enforced" if mount.object_verity else "object verity off"
        _say(f"mounted {mount.source} at {result['where']}: {checked}, {objects}")
        for note in mount.notes:
            _say(f"  note: {note}")
    return 0


def _cmd_unmount(args: argparse.Namespace) -> int:
    gone = unmount(args.where, lazy=args.lazy)
    if args.json:
        _print_json({"where": gone.mountpoint, "digest": gone.digest}, sys.stdout)
    elif args.verbose:
        _say(f"unmounted {gone.source} from {gone.mountpoint}")
    return 0


def _mount_dict(m: ComposefsMount) -> dict[str, Any]:
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
    if args.json:
        _print_json([_mount_dict(m) for m in mounts], sys.stdout)
        return 0
    for m in mounts:
        mode = "ro" if m.read_only else "rw"
        _say(f"{m.mountpoint}  {m.digest or m.source}  {mode}  verity={m.verity}")
    return 0


def _print_status(d: dict[str, Any], service: str) -> None:
    _say(f"repository:  {d['path']}")
    _say(f"algorithm:   {d['algorithm']}")
    _say(f"fs-verity:   {d['verity']}")
    _say(f"images:      {d['images']} ({d['refs']} ref{'s' if d['refs'] != 1 else ''})")
    _say(f"mounts:      {d['mounts']}")
    if d.get("readOnlyReason"):
        _say(f"read-only:   {d['readOnlyReason']}")
    _say(f"service:     {service}")


def _cmd_status(args: argparse.Namespace) -> int:
    doc = describe_repository(_open(args), list_composefs_mounts())
    if args.json:
        _print_json(doc, sys.stdout)
    else:
        _print_status(doc, "none (working on the repository directly)")
    return 0


# -- client mode: the same commands as io.composefs.Repository calls ---------------------------


def _method(name: str) -> str:
    return f"{INTERFACE}.{name}"


def _opt(params: dict[str, Any], key: str, value: Any) -> None:
    if value is not None and value is not False:
        params[key] = value


def _more(
    conn: Connection,
    method: str,
    params: dict[str, Any],
    printer: _ProgressPrinter | None,
    fds: Sequence[int] = (),
) -> Iterator[Reply]:
    """The non-progress replies of a ``more`` call; progress goes to ``printer``."""
    try:
        for reply in conn.call(_method(method), params, more=True, fds=fds):
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
        raise _Failed(f"{what} {path}: {exc.strerror}") from None


def _client_status(conn: Connection, args: argparse.Namespace) -> int:
    doc = dict(conn.call(_method("Describe")))
    if args.json:
        _print_json(doc, sys.stdout)
    else:
        _print_status(doc, f"composefsd {doc.get('version', '?')} at {conn.address}")
    return 0


def _client_create_image(conn: Connection, args: argparse.Namespace) -> int:
    if args.source is None:
        raise _Usage("give SOURCE, the directory to import")
    if args.skip_xattrs and args.user_xattrs:
        raise _Usage("--skip-xattrs and --user-xattrs exclude each other")
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
    if args.min_version != 0:
        params["minVersion"] = args.min_version
    if args.max_version != 1:
        params["maxVersion"] = args.max_version
    printer = _progress(args)
    result: Reply | None = None
    try:
        for reply in _more(conn, "CreateImage", params, printer, fds):
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
    }
    if args.json:
        _print_json(doc, sys.stdout)
    else:
        _say(doc["digest"])
        if args.verbose:
            _say(
                f"{doc['files']} files, {doc['objects_written']} objects written "
                f"({_size(doc['bytes_written'])}), {doc['objects_reused']} reused, "
                f"fs-verity: {'yes' if doc['verity_enabled'] else 'no'}",
                file=sys.stderr,
            )
    return 0


def _verify_doc(reply: Reply) -> dict[str, Any]:
    """A Verify result in the shape of ``VerifyReport.to_dict()`` (less bytes_checked
    and verity_required, which the service does not report)."""
    problems = reply.get("problems") or []
    return {
        "digest": reply.get("digest", ""),
        "ok": bool(reply.get("ok")),
        "image_problems": [p["message"] for p in problems if p.get("kind") == "image"],
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


def _print_verify_doc(d: dict[str, Any], out: TextIO) -> None:
    if d["ok"]:
        line = (
            f"{d['digest']}: ok ({d['objects_checked']} objects, "
            f"{d['verity_measured']} measured by fs-verity)"
        )
        if d["no_verity"]:
            line += f", {len(d['no_verity'])} without fs-verity"
        _say(line, file=out)
        return
    _say(f"{d['digest']}: FAILED", file=out)
    for text in d["image_problems"]:
        _say(f"  image: {text}", file=out)
    for digest in d["missing"]:
        _say(f"  missing object: {digest}", file=out)
    for c in d["corrupt"]:
        _say(f"  corrupt object: {c['digest']}: {c['reason']}", file=out)
    for digest in d["no_verity"]:
        _say(f"  no fs-verity: {digest}", file=out)
    _say(
        f"  ({d['objects_checked']} objects checked, {len(d['missing'])} missing, "
        f"{len(d['corrupt'])} corrupt)",
        file=out,
    )


def _client_verify(conn: Connection, args: argparse.Namespace) -> int:
    if args.all and args.images:
        raise _Usage("give IMAGE names or --all, not both")
    if not args.all and not args.images:
        raise _Usage("give the IMAGE(s) to verify, or --all")
    printer = _progress(args)
    docs: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = [{}] if args.all else [{"image": n} for n in args.images]
    for params in calls:
        for reply in _more(conn, "Verify", params, printer):
            if "digest" not in reply:
                continue  # Verify of all images in an empty repository
            doc = _verify_doc(reply)
            docs.append(doc)
            if not args.json:
                _print_verify_doc(doc, sys.stdout)
                sys.stdout.flush()
    if args.json:
        _print_json(docs, sys.stdout)
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
    if args.json:
        _print_json(docs, sys.stdout)
        return 0
    for e in docs:
        refs = ", ".join(e["refs"]) if e["refs"] else "-"
        _say(f"{e['digest']}  {_size(e['size']):>10}  {_time(e['created'])}  {refs}")
    return 0


def _client_remove_image(conn: Connection, args: argparse.Namespace) -> int:
    refs = conn.call(_method("RemoveImage"), {"image": args.image})["removedRefs"]
    _report_removed(args, refs)
    return 0


def _report_removed(args: argparse.Namespace, refs: list[str]) -> None:
    if args.json:
        _print_json({"image": args.image, "removed_refs": refs}, sys.stdout)
    elif args.verbose:
        _say(f"removed image {args.image} (refs: {', '.join(refs) if refs else '-'})")


def _client_gc(conn: Connection, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    _opt(params, "dryRun", args.dry_run)
    result: Reply | None = None
    for reply in _more(conn, "GarbageCollect", params, _progress(args)):
        result = reply
    assert result is not None
    doc = {
        "objects_removed": result.get("objectsRemoved", 0),
        "bytes_removed": result.get("bytesRemoved", 0),
        "images_removed": result.get("imagesRemoved", 0),
        "links_removed": result.get("linksRemoved", 0),
        "dry_run": bool(result.get("dryRun", args.dry_run)),
    }
    if args.json:
        _print_json(doc, sys.stdout)
        return 0
    verb = "would remove" if doc["dry_run"] else "removed"
    _say(
        f"gc: {verb} {doc['objects_removed']} objects ({_size(doc['bytes_removed'])}), "
        f"{doc['images_removed']} images, {doc['links_removed']} dangling links"
    )
    return 0


def _client_mount(conn: Connection, args: argparse.Namespace) -> int:
    _check_mount_args(args)
    where = os.path.abspath(args.where)
    params: dict[str, Any] = {"image": args.image}
    _opt(params, "expectedDigest", args.expected_digest)
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
            fds.append(_open_userns(args.idmap_userns))
        try:
            if args.uid_map:
                params["uidMap"] = [asdict(m) for m in parse_mapping(args.uid_map)]
            if args.gid_map:
                params["gidMap"] = [asdict(m) for m in parse_mapping(args.gid_map)]
        except ValueError as exc:
            raise _Usage(str(exc)) from None
        if not args.fd_attach:
            params["where"] = where
        reply = conn.call(_method("Mount"), params, fds=fds)
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
    digest = reply["digest"]
    result = {
        "where": where,
        "source": f"composefs:{digest}",
        "imageCheck": reply["imageCheck"],
        "imageDigest": digest,
        "objectVerity": reply["objectVerity"],
        "readOnly": reply["readOnly"],
        "idmapped": reply["idmapped"],
    }
    if args.json:
        _print_json(result, sys.stdout)
    elif args.verbose:
        checked = {
            "kernel": "image digest checked by fs-verity",
            "userspace": "image digest checked in userspace",
            "none": "image digest not checked",
        }.get(reply["imageCheck"], f"image check: {reply['imageCheck']}")
        objects = "object verity enforced" if reply["objectVerity"] else "object verity off"
        how = " (attached here)" if args.fd_attach else ""
        _say(f"mounted composefs:{digest} at {where}{how}: {checked}, {objects}")
    return 0


def _client_unmount(conn: Connection, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"where": os.path.abspath(args.where)}
    _opt(params, "lazy", args.lazy)
    reply = conn.call(_method("Unmount"), params)
    digest = reply.get("digest")
    if args.json:
        _print_json({"where": params["where"], "digest": digest}, sys.stdout)
    elif args.verbose:
        what = f"composefs:{digest}" if digest else "composefs"
        _say(f"unmounted {what} from {params['where']}")
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
    if args.json:
        _print_json(docs, sys.stdout)
        return 0
    for m in docs:
        mode = "ro" if m["readOnly"] else "rw"
        _say(f"{m['mountpoint']}  {m['digest'] or m['source']}  {mode}  verity={m['verity']}")
    return 0


_CLIENT: dict[str, Callable[[Connection, argparse.Namespace], int]] = {
    "status": _client_status,
    "create-image": _client_create_image,
    "verify": _client_verify,
    "images": _client_images,
    "remove-image": _client_remove_image,
    "gc": _client_gc,
    "mount": _client_mount,
    "unmount": _client_unmount,
    "mounts": _client_mounts,
}


def _direct_only(args: argparse.Namespace) -> str | None:
    """Why this command line needs direct access to the repository, if it does."""
    if args.command not in _CLIENT:
        return f"'{args.command}' has no daemon method"
    if args.command == "create-image":
        for flag, used in (
            ("--from-dumpfile", args.from_dumpfile is not None),
            ("--objects", args.objects is not None),
            ("--preserve-hardlinks", args.preserve_hardlinks),
            ("--threads", args.threads is not None),
        ):
            if used:
                return f"create-image {flag} has no daemon equivalent"
    if args.command == "gc" and args.pin:
        return "gc --pin has no daemon equivalent (the daemon pins mounted images itself)"
    return None


def _call_error_text(exc: VarlinkCallError) -> str:
    """One line naming the error and saying what it means."""
    p = exc.parameters
    short = exc.name.rpartition(".")[2]
    if isinstance(p.get("message"), str):
        text = p["message"]
        if p.get("errnoName"):
            text += f" ({p['errnoName']})"
    elif short == "NoSuchImage":
        text = f"no image or ref {p.get('image')!r}"
    elif short == "NotMounted":
        text = f"nothing composefs is mounted at {p.get('where')}"
    elif short == "ImageInUse":
        where = ", ".join(p.get("where") or []) or "?"
        text = f"image {p.get('image')!r} is in use: {where}"
    elif short == "InvalidParameter":
        text = f"invalid parameter {p.get('parameter')!r}"
    elif short == "PermissionDenied":
        text = "permission denied (composefsd refuses this call to this user)"
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


# -- parser -----------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _version(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _timeout(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value != value or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return None if value in (0.0, float("inf")) else value


def _parser() -> argparse.ArgumentParser:
    common = _ArgumentParser(add_help=False)
    common.add_argument(
        "--repo",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="the repository (default: $COMPOSEFSD_REPOSITORY, else /sysroot/composefs for "
        "root, ~/.var/lib/composefs otherwise)",
    )
    common.add_argument(
        "--progress",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show progress on stderr even when it is not a terminal",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="say more about what was done",
    )
    common.add_argument(
        "--connect",
        metavar="ADDRESS",
        default=argparse.SUPPRESS,
        help="go through the composefsd at ADDRESS (a socket path, unix:PATH or exec:PATH; "
        "default: $COMPOSEFSD_SOCKET, else the default socket if a daemon answers there)",
    )
    common.add_argument(
        "--direct",
        action="store_true",
        default=argparse.SUPPRESS,
        help="work on the repository directly even if a daemon runs",
    )
    common.add_argument(
        "--timeout",
        metavar="SEC",
        type=_timeout,
        default=argparse.SUPPRESS,
        help="through the daemon: wait at most SEC seconds for each reply (default 45; 0: forever)",
    )

    parser = _ArgumentParser(
        prog=PROG,
        description="Manage a composefs object repository (composefs-rs compatible layout), "
        "through composefsd when one answers, else directly.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func, parser=p)
        return p

    p = command("status", _cmd_status, "show the repository (and the daemon serving it)")
    p.add_argument("--json", action="store_true")

    p = command("init", _cmd_init, "create a new repository")
    p.add_argument("--algorithm", choices=("sha256", "sha512"), default="sha256")
    p.add_argument(
        "--verity",
        choices=[v.value for v in VerityPolicy],
        default=VerityPolicy.TRY.value,
        help="fs-verity on objects: required (fail where unsupported), try (default), or disabled",
    )

    p = command("create-image", _cmd_create_image, "import a directory tree as an image")
    p.add_argument("source", metavar="SOURCE", nargs="?", help="the directory to import")
    p.add_argument("--ref", metavar="NAME", help="name the image with this ref")
    p.add_argument(
        "--from-dumpfile",
        metavar="DUMP",
        help="build the image from a composefs dumpfile ('-': stdin) instead of SOURCE",
    )
    p.add_argument(
        "--objects", metavar="DIR", help="with --from-dumpfile: the directory of its objects"
    )
    p.add_argument("--use-epoch", action="store_true", help="make all mtimes zero")
    p.add_argument("--skip-xattrs", action="store_true", help="don't store file xattrs")
    p.add_argument("--user-xattrs", action="store_true", help="only store user.* xattrs")
    p.add_argument("--skip-devices", action="store_true", help="don't store device nodes")
    p.add_argument("--min-version", type=_version, default=0, metavar="N")
    p.add_argument("--max-version", type=_version, default=1, metavar="N")
    p.add_argument(
        "--preserve-hardlinks",
        action="store_true",
        help="keep hardlinked files as hardlinks in the image (C mkcomposefs does not)",
    )
    p.add_argument("--threads", type=_positive, metavar="N", help="hashing and copying lanes")
    p.add_argument(
        "--by-path",
        action="store_true",
        help="through the daemon: send SOURCE's path (as the daemon sees it) instead of an "
        "fd on the directory",
    )
    p.add_argument("--json", action="store_true", help="print the full result as JSON")

    p = command("verify", _cmd_verify, "check images and every object they use")
    p.add_argument("images", metavar="IMAGE", nargs="*", help="digest or ref name")
    p.add_argument("--all", action="store_true", help="verify every image")
    p.add_argument("--json", action="store_true", help="machine-readable report")

    p = command("fsck", _cmd_fsck, "check the whole repository")
    p.add_argument("--json", action="store_true", help="machine-readable report")

    p = command("images", _cmd_images, "list the images")
    p.add_argument("--json", action="store_true")

    p = command("describe", _cmd_describe, "show one image")
    p.add_argument("image", metavar="IMAGE", help="digest or ref name")
    p.add_argument("--json", action="store_true")

    p = command("remove-ref", _cmd_remove_ref, "remove a ref (the image stays until GC)")
    p.add_argument("name", metavar="NAME")

    p = command("remove-image", _cmd_remove_image, "remove an image and its refs")
    p.add_argument("image", metavar="IMAGE", help="digest or ref name")
    p.add_argument("--json", action="store_true", help="print the refs that named it as JSON")

    p = command("gc", _cmd_gc, "remove what no ref or pin reaches")
    p.add_argument(
        "--pin",
        metavar="IMAGE",
        action="append",
        default=[],
        help="also keep this image (repeatable)",
    )
    p.add_argument("--dry-run", "-n", action="store_true", help="only report what would go")
    p.add_argument("--json", action="store_true")

    p = command("mount", _cmd_mount, "mount an image (needs root)")
    p.add_argument("image", metavar="IMAGE", help="digest or ref name")
    p.add_argument("where", metavar="WHERE", help="the directory to mount it on")
    p.add_argument(
        "--verity",
        choices=[v.value for v in VerityPolicy],
        help="fs-verity checks: required, try or disabled (default: the repository's policy)",
    )
    p.add_argument("--expected-digest", metavar="HEX", help="refuse unless IMAGE is this digest")
    p.add_argument("--rw", action="store_true", help="writable (needs --upperdir/--workdir)")
    p.add_argument("--upperdir", metavar="DIR", help="overlay upper directory for writes")
    p.add_argument("--workdir", metavar="DIR", help="overlay work directory (same filesystem)")
    p.add_argument(
        "--idmap-userns",
        metavar="PATH",
        help="idmap through this user namespace (/proc/PID/ns/user)",
    )
    p.add_argument(
        "--uid-map",
        metavar="MAP",
        help="idmap with this uid mapping, INSIDE:OUTSIDE:COUNT[,...]",
    )
    p.add_argument("--gid-map", metavar="MAP", help="gid mapping (default: the uid mapping)")
    p.add_argument(
        "--fd-attach",
        action="store_true",
        help="through the daemon: receive the detached mount and attach it here (in this "
        "process's mount namespace) instead of having the daemon attach it",
    )
    p.add_argument("--json", action="store_true", help="print what was mounted and checked")

    p = command("unmount", _cmd_unmount, "unmount a composefs mount")
    p.add_argument("where", metavar="WHERE")
    p.add_argument("--lazy", action="store_true", help="detach even if files are open")
    p.add_argument("--json", action="store_true", help="print what was unmounted as JSON")

    p = command("mounts", _cmd_mounts, "list the mounted images of the repository")
    p.add_argument("--all", action="store_true", help="every composefs mount, any repository")
    p.add_argument("--json", action="store_true")
    return parser


class _Unreachable(Exception):
    """The daemon named explicitly cannot be reached: exit status 3."""


def _connect(args: argparse.Namespace) -> Connection | None:
    """The daemon connection for this command, or None to work directly (module notes)."""
    explicit = args.connect
    if args.direct:
        if explicit is not None:
            raise _Usage("--direct and --connect exclude each other")
        return None
    if explicit is not None and args.repo is not None:
        raise _Usage(
            "--repo works on a repository directly; with --connect the daemon "
            "serves its own (use --direct --repo PATH)"
        )
    if explicit is None and args.repo is None:
        explicit = os.environ.get("COMPOSEFSD_SOCKET") or None
    why_direct = _direct_only(args)
    if explicit is not None:
        if why_direct is not None:
            raise _Usage(f"{why_direct}; use --direct (with --repo PATH) to run it directly")
        try:
            return client.connect(explicit, timeout=args.timeout)
        except VarlinkClientError as exc:
            raise _Unreachable(str(exc)) from None
    if args.repo is not None or os.environ.get("COMPOSEFSD_REPOSITORY") or why_direct:
        return None
    address = default_address()
    if not os.path.exists(address):
        return None
    try:
        return client.connect(address, timeout=args.timeout, check_directory=True)
    except VarlinkUntrustedError as exc:
        # Someone else's socket where ours belongs: say so rather than quietly
        # working directly, so that it gets removed.
        raise _Unreachable(str(exc)) from None
    except VarlinkClientError as exc:
        log.debug("no daemon at %s (%s): working directly", address, exc)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``composefsctl`` with ``argv`` (without the program name; default: sys.argv[1:])."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    defaults: dict[str, Any] = {
        "repo": None,
        "progress": False,
        "verbose": False,
        "connect": None,
        "direct": False,
        "timeout": client.DEFAULT_TIMEOUT,
    }
    for name, value in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    func: Callable[[argparse.Namespace], int] = args.func
    command_parser: argparse.ArgumentParser = args.parser
    conn: Connection | None = None
    try:
        conn = _connect(args)
        if conn is not None:
            return _CLIENT[args.command](conn, args)
        return func(args)
    except _Usage as exc:
        command_parser.error(str(exc))
    except _Unreachable as exc:
        sys.stderr.write(f"{PROG}: error: {printable(str(exc))}\n")
        return EXIT_UNREACHABLE
    except VarlinkCallError as exc:
        return _error(_call_error_text(exc))
    except VarlinkClientError as exc:
        sys.stderr.write(f"{PROG}: error: {printable(str(exc))}\n")
        return EXIT_UNREACHABLE
    except (_Failed, RepositoryError, MountError) as exc:
        return _error(str(exc))
    except BrokenPipeError:
        # "composefsctl images | head": end quietly, with the status a shell reports
        # for SIGPIPE, and keep the exit-time flush of stdout from failing again.
        # (Not signal(SIGPIPE, SIG_DFL): main() may run in-process.)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except OSError as exc:
        return _error(_os_error_text(exc))
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 128 + signal.SIGINT
    finally:
        if conn is not None:
            conn.close()


def _os_error_text(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{os.fsdecode(exc.filename)}: {text}"
    return text


def _error(message: str) -> int:
    sys.stderr.write(f"{PROG}: error: {printable(message)}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
