"""What ``composefsctl`` prints: progress on stderr, and each command's result as
text or ``--json``, the same whether it came from the daemon or the repository.

Results arrive here as the documents ``--json`` prints (the repository's records
as dicts, the daemon's replies converted to the same keys); the keys one mode lacks
(the daemon does not report every number) leave their part of the text out. Only
type names of the repository are imported: printing a daemon's reply loads no
repository code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from composefsd.image.printable import printable
from composefsd.service.client import Reply

if TYPE_CHECKING:
    from composefsd.repository import Progress
    from composefsd.repository.fsck import FsckReport
    from composefsd.repository.images import ImageDetails

__all__ = [
    "LayerProgressPrinter",
    "ProgressPrinter",
    "mount_doc",
    "print_description",
    "print_fsck",
    "print_json",
    "print_status",
    "print_verify",
    "progress",
    "report_created",
    "report_gc",
    "report_images",
    "report_mount",
    "report_mounts",
    "report_removed",
    "report_unmounted",
    "say",
    "size",
]


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def say(text: str, file: TextIO | None = None) -> None:
    """Print one line of human-readable output. Names in it come from callers, the
    repository or the daemon: escaped, they cannot forge rows or drive the terminal."""
    print(printable(text), file=sys.stdout if file is None else file)


def print_json(doc: Any, out: TextIO) -> None:
    json.dump(doc, out, indent=2, sort_keys=False)
    out.write("\n")


class ProgressPrinter:
    """Shows progress on stderr: on a terminal one rewritten line, a bar when the total
    is known; else a line per report (the library and the daemon already throttle
    them to a few a second)."""

    BAR = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.width = 0

    def __call__(self, p: Progress) -> None:
        self.show(p.phase, p.done, p.total, p.detail)

    def line(self, phase: str, done: int, total: int | None, detail: str | None = None) -> str:
        """One report as shown: a bar on a terminal when the total is known."""
        count = f"{done}" + (f"/{total}" if total is not None else "")
        if self.tty and total:
            frac = min(1.0, max(0.0, done / total))
            filled = int(frac * self.BAR)
            text = f"{phase} [{'#' * filled}{'.' * (self.BAR - filled)}] {frac:4.0%} {count}"
        else:
            text = f"{phase}: {count}"
        if detail:
            text += f" {detail}"
        return printable(text)

    def show(self, phase: str, done: int, total: int | None, detail: str | None = None) -> None:
        text = self.line(phase, done, total, detail)
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
        self.show(str(p.get("phase", "")), int(p.get("done", 0)), p.get("total"))
        return True

    def finish(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


class LayerProgressPrinter(ProgressPrinter):
    """Pull progress. On a terminal, one line per layer (and per other phase), each
    with its bar, all redrawn in place as reports come (layers are fetched several at
    a time); elsewhere a line per report, naming the layer."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: dict[str, str] = {}
        self._drawn = 0

    def reply(self, reply: Reply) -> bool:
        p = reply.get("progress")
        if not isinstance(p, dict):
            return False
        phase = str(p.get("phase", ""))
        layer = p.get("layer") if isinstance(p.get("layer"), str) else None
        shown = f"{phase} {layer[:19]}" if layer else phase
        total = p.get("total")
        text = self.line(shown, int(p.get("done", 0)), total if isinstance(total, int) else None)
        if not self.tty:
            self.stream.write(text + "\n")
            self.stream.flush()
            return True
        # A layer keeps its line from "fetch" to "skip"; other phases have one each.
        self._lines[f"layer {layer}" if layer else phase] = text
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.stream.write(up + "".join(f"\x1b[2K{t}\n" for t in self._lines.values()))
        self.stream.flush()
        self._drawn = len(self._lines)
        return True

    def finish(self) -> None:
        # The bars stay on the screen; the next display starts below them.
        self._lines.clear()
        self._drawn = 0


def progress(args: argparse.Namespace) -> ProgressPrinter | None:
    """The progress display this command line asks for, if any."""
    if args.progress or sys.stderr.isatty():
        return ProgressPrinter(sys.stderr)
    return None


# -- results ----------------------------------------------------------------------------------


def print_status(d: dict[str, Any], service: str) -> None:
    say(f"repository:  {d['path']}")
    say(f"algorithm:   {d['algorithm']}")
    say(f"fs-verity:   {d['verity']}")
    if "erofsVersion" in d:
        extra = "".join(f" +V{v}" for v in d.get("extraErofsVersions", []))
        say(f"format:      V{d['erofsVersion']}{extra}")
    say(f"images:      {d['images']} ({d['refs']} ref{'s' if d['refs'] != 1 else ''})")
    say(f"mounts:      {d['mounts']}")
    if d.get("readOnlyReason"):
        say(f"read-only:   {d['readOnlyReason']}")
    say(f"service:     {service}")


def report_created(doc: dict[str, Any], args: argparse.Namespace) -> None:
    """``create-image``: ``doc`` has the keys of a CreateResult (``bytes_total`` only
    when known)."""
    if args.json:
        print_json(doc, sys.stdout)
        return
    say(doc["digest"])
    if args.verbose:
        stored = f"{size(doc['bytes_total'])} in objects, " if "bytes_total" in doc else ""
        say(
            f"{doc['files']} files, {doc['objects_written']} objects written "
            f"({size(doc['bytes_written'])}), {doc['objects_reused']} reused, "
            f"{stored}fs-verity: {'yes' if doc['verity_enabled'] else 'no'}",
            file=sys.stderr,
        )


def print_verify(d: dict[str, Any], out: TextIO) -> None:
    """One image's verification: ``d`` in the shape of ``VerifyReport.to_dict()``
    (``bytes_checked`` and ``verity_required`` only when known)."""
    counted = f"{d['objects_checked']} objects"
    if "bytes_checked" in d:
        counted += f", {size(d['bytes_checked'])}"
    # A stream is shown by its name (its digest is its object's).
    shown = f"stream {d['stream']}" if d.get("stream") is not None else d["digest"]
    if d["ok"]:
        line = f"{shown}: ok ({counted}, {d['verity_measured']} measured by fs-verity)"
        if d["no_verity"]:
            line += f", {len(d['no_verity'])} without fs-verity"
        say(line, file=out)
        return
    say(f"{shown}: FAILED", file=out)
    what = "stream" if d.get("stream") is not None else "image"
    for text in d["image_problems"]:
        say(f"  {what}: {text}", file=out)
    for digest in d["missing"]:
        say(f"  missing object: {digest}", file=out)
    for c in d["corrupt"]:
        say(f"  corrupt object: {c['digest']}: {c['reason']}", file=out)
    # The daemon reports objects without fs-verity as problems only where they are.
    if d.get("verity_required", True):
        for digest in d["no_verity"]:
            say(f"  no fs-verity: {digest}", file=out)
    say(
        f"  ({d['objects_checked']} objects checked, {len(d['missing'])} missing, "
        f"{len(d['corrupt'])} corrupt)",
        file=out,
    )


def print_fsck(report: FsckReport, out: TextIO) -> None:
    for problem in report.problems:
        note = "" if problem.fatal else " (harmless)"
        say(f"fsck: {problem.kind}: {problem.path}: {problem.message}{note}", file=out)
    fatal = sum(1 for p in report.problems if p.fatal)
    verdict = "clean" if report.ok else f"{fatal} problem{'s' if fatal != 1 else ''}"
    # Only repositories composefs-rs wrote to have streams; say so only there.
    streams = (
        f", {report.streams_checked} streams, {report.stream_refs_checked} stream refs"
        if report.streams_checked or report.stream_refs_checked
        else ""
    )
    say(
        f"fsck: {report.objects_checked} objects ({report.verity_measured} measured by "
        f"fs-verity), {report.images_checked} images, {report.refs_checked} refs"
        f"{streams}: {verdict}",
        file=out,
    )


def report_images(docs: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    """``images``: each doc has the keys of an ImageEntry."""
    if args.json:
        print_json(list(docs), sys.stdout)
        return
    for e in docs:
        refs = ", ".join(e["refs"]) if e["refs"] else "-"
        say(f"{e['digest']}  {size(e['size']):>10}  {_time(e['created'])}  {refs}")


def print_description(d: ImageDetails) -> None:
    say(f"digest:            {d.digest}")
    say(f"size:              {size(d.size)} ({d.size} bytes)")
    say(f"created:           {_time(d.created)}")
    say(f"refs:              {', '.join(d.refs) if d.refs else '-'}")
    say(f"composefs version: {d.composefs_version}")
    say(f"objects:           {d.object_count} ({size(d.objects_size)})")
    say(f"entries:           {d.entries}")
    say(f"fs-verity:         {'yes' if d.verity else 'no'}")


def report_removed(args: argparse.Namespace, refs: list[str]) -> None:
    if args.json:
        print_json({"image": args.image, "removed_refs": refs}, sys.stdout)
    elif args.verbose:
        say(f"removed image {args.image} (refs: {', '.join(refs) if refs else '-'})")


def report_gc(doc: dict[str, Any], args: argparse.Namespace) -> None:
    """``gc``: ``doc`` has the keys of a GcResult."""
    if args.json:
        print_json(doc, sys.stdout)
        return
    verb = "would remove" if doc["dry_run"] else "removed"
    say(
        f"gc: {verb} {doc['objects_removed']} objects ({size(doc['bytes_removed'])}), "
        f"{doc['images_removed']} images, {doc['links_removed']} dangling links, "
        f"{doc.get('streams_pruned', 0)} stream links"
    )


def mount_doc(
    where: str, source: str, image_digest: str | None, reply: Mapping[str, Any]
) -> dict[str, Any]:
    """What ``mount --json`` prints, from a Mount reply (the daemon's, or
    :func:`composefsd.service.replies.mount_reply` of a mount made here): the
    mount at ``where`` of ``source``, whose digest ``image_digest`` was checked."""
    return {
        "where": where,
        "source": source,
        "imageCheck": reply["imageCheck"],
        "imageDigest": image_digest,
        "objectVerity": reply["objectVerity"],
        "readOnly": reply["readOnly"],
        "idmapped": reply["idmapped"],
    }


_IMAGE_CHECKS = {
    "kernel": "image digest checked by fs-verity",
    "userspace": "image digest checked in userspace",
    "none": "image digest not checked",
}


def report_mount(doc: dict[str, Any], args: argparse.Namespace, *, attached: bool) -> None:
    """``mount``: ``doc`` from :func:`mount_doc`, with the mount's ``notes`` if known;
    ``attached``: this process attached the mount the daemon sent."""
    if args.json:
        print_json(doc, sys.stdout)
    elif args.verbose:
        check = doc["imageCheck"]
        checked = _IMAGE_CHECKS.get(check, f"image check: {check}")
        objects = "object verity enforced" if doc["objectVerity"] else "object verity off"
        how = " (attached here)" if attached else ""
        say(f"mounted {doc['source']} at {doc['where']}{how}: {checked}, {objects}")
        for note in doc.get("notes", ()):
            say(f"  note: {note}")


def report_unmounted(args: argparse.Namespace, where: str, source: str, digest: str | None) -> None:
    if args.json:
        print_json({"where": where, "digest": digest}, sys.stdout)
    elif args.verbose:
        say(f"unmounted {source} from {where}")


def report_mounts(docs: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    """``mounts``: each doc has the keys of a ComposefsMount (camelCase)."""
    if args.json:
        print_json(list(docs), sys.stdout)
        return
    for m in docs:
        mode = "ro" if m["readOnly"] else "rw"
        say(f"{m['mountpoint']}  {m['digest'] or m['source']}  {mode}  verity={m['verity']}")
