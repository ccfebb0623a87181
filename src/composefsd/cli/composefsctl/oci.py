"""``composefsctl oci pull|images|inspect|tag|untag|mount``: io.composefs.Oci calls to a
composefsd (there is no direct mode for OCI images), and what they print.

``pull`` shows a bar per layer on a terminal (:class:`~.output.LayerProgressPrinter`),
a line per report with ``--progress``, nothing otherwise; ``--json`` prints the
final reply. ``images`` prints one row per tag, ``inspect`` the manifest, config
and image ids as JSON (as ``cfsctl oci inspect`` does). Credentials given with
``--creds`` go to the daemon only, never to the output.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from typing import Any

from composefsd.cli.composefsctl import output
from composefsd.cli.composefsctl.errors import Usage
from composefsd.cli.composefsctl.remote import more_replies, mount_call
from composefsd.service.client import Connection, Reply

__all__ = ["INTERFACE", "run"]

INTERFACE = "io.composefs.Oci"
#: Transports whose reference after the colon is a path (made absolute here: the
#: daemon has its own working directory).
_PATH_TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:")


def _method(name: str) -> str:
    return f"{INTERFACE}.{name}"


def _short(digest: str | None, n: int = 12) -> str:
    if not digest:
        return "-"
    return digest.partition(":")[2][:n] if ":" in digest else digest[:n]


def absolute_reference(reference: str) -> str:
    """``reference`` with the path of a file transport made absolute."""
    for prefix in _PATH_TRANSPORTS:
        if reference.startswith(prefix):
            rest = reference[len(prefix) :]
            if rest and not rest.startswith("/"):
                return prefix + os.path.abspath(rest)
    return reference


def _credentials(text: str | None) -> str | None:
    if text is None:
        return None
    if ":" not in text:
        return f"{text}:{getpass.getpass(f'password for {text}: ')}"
    return text


def _pull(conn: Connection, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"reference": absolute_reference(args.reference)}
    if args.tag is not None:
        params["tag"] = args.tag
    if args.bootable:
        params["bootable"] = True
    if args.authfile is not None:
        params["authFile"] = os.path.abspath(args.authfile)
    if args.cert_dir is not None:
        params["certDirectory"] = os.path.abspath(args.cert_dir)
    if args.tls_verify is not None:
        params["tlsVerify"] = args.tls_verify == "true"
    creds = _credentials(args.creds)
    if creds is not None:
        params["credentials"] = creds
    printer = (
        output.LayerProgressPrinter(sys.stderr) if args.progress or sys.stderr.isatty() else None
    )
    result: Reply | None = None
    for reply in more_replies(conn, _method("Pull"), params, printer):
        result = reply
    assert result is not None
    doc = dict(result)
    if args.json:
        output.print_json(doc, sys.stdout)
        return 0
    layers = doc.get("layers") or []
    skipped = sum(1 for layer in layers if layer.get("skipped"))
    output.say(f"manifest {doc.get('manifestDigest')}")
    output.say(f"config   {doc.get('configDigest')}")
    output.say(f"image    {doc.get('imageId', '-')}")
    if doc.get("bootImageId"):
        output.say(f"boot     {doc['bootImageId']}")
    if args.verbose:
        output.say(
            f"{len(layers)} layers, {skipped} already present",
            file=sys.stderr,
        )
    return 0


def _images(conn: Connection, args: argparse.Namespace) -> int:
    images = [dict(i) for i in conn.call(_method("ListImages"))["images"]]
    if args.json:
        output.print_json(images, sys.stdout)
        return 0
    if not images:
        return 0
    width = max(len(i["tag"]) for i in images)
    output.say(
        f"{'TAG':<{width}}  {'MANIFEST':<12}  {'IMAGE ID':<12}  {'PLATFORM':<12}  "
        f"{'LAYERS':>6}  {'SIZE':>10}  CREATED"
    )
    for i in images:
        platform = f"{i['os']}/{i['architecture']}" if i["os"] or i["architecture"] else "-"
        output.say(
            f"{i['tag']:<{width}}  {_short(i['manifestDigest']):<12}  "
            f"{_short(i.get('imageId')):<12}  {platform:<12}  {len(i['layers']):>6}  "
            f"{output.size(i['size']):>10}  {i.get('created') or '-'}"
        )
    return 0


def _inspect(conn: Connection, args: argparse.Namespace) -> int:
    output.print_json(dict(conn.call(_method("Inspect"), {"image": args.image})), sys.stdout)
    return 0


def _tag(conn: Connection, args: argparse.Namespace) -> int:
    reply = conn.call(_method("Tag"), {"image": args.image, "tag": args.tag})
    if args.json:
        output.print_json({"tag": args.tag, "manifestDigest": reply["manifestDigest"]}, sys.stdout)
    elif args.verbose:
        output.say(f"tagged {reply['manifestDigest']} as {args.tag}")
    return 0


def _untag(conn: Connection, args: argparse.Namespace) -> int:
    reply = conn.call(_method("Untag"), {"tag": args.tag})
    if args.json:
        output.print_json({"tag": args.tag, "manifestDigest": reply["manifestDigest"]}, sys.stdout)
    elif args.verbose:
        output.say(f"untagged {args.tag} ({reply['manifestDigest']})")
    return 0


def _mount(conn: Connection, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"image": args.image}
    if args.bootable:
        params["bootable"] = True
    reply, where = mount_call(conn, _method("Mount"), params, args)
    digest = reply["digest"]
    doc = output.mount_doc(where, f"composefs:{digest}", digest, reply)
    output.report_mount(doc, args, attached=args.fd_attach)
    return 0


_COMMANDS: dict[str, Callable[[Connection, argparse.Namespace], int]] = {
    "pull": _pull,
    "images": _images,
    "inspect": _inspect,
    "tag": _tag,
    "untag": _untag,
    "mount": _mount,
}


def run(conn: Connection, args: argparse.Namespace) -> int:
    """Run ``composefsctl oci <command>`` through the daemon at ``conn``."""
    command = _COMMANDS.get(args.oci_command)
    if command is None:
        raise Usage(f"unknown oci command {args.oci_command!r}")
    return command(conn, args)
