"""The generic Varlink commands of ``composefsctl`` (``call``, ``introspect``,
``info``, ``list-methods``): what ``varlinkctl`` offers, for systems without one
(Debian 12's systemd 252 has none), on the connection every other command uses.

Output follows varlinkctl 257 where it can: a reply is one JSON object (indented
on a terminal or with ``--json=pretty``, one line otherwise), the replies of a
``--more`` call one line each as they come (JSON lines, where varlinkctl writes
an RFC 7464 sequence, each reply after an RS character); an error reply prints
its parameters on stdout and ``method call M() failed: ERROR`` on stderr, with
exit status 1 (0 for an error named by ``--graceful``). Unlike varlinkctl's, the
JSON is ASCII, other characters escaped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

from composefsd.cli.composefsctl.errors import Usage
from composefsd.image.printable import printable
from composefsd.service.client import Connection, Reply, VarlinkCallError, VarlinkProtocolError

__all__ = ["COMMANDS", "method_names", "parse_parameters"]

# The Varlink specification's grammar for interface and member names. Patterns,
# compiled (and cached by re) on first use: most runs of composefsctl need none.
_INTERFACE_NAME = r"[A-Za-z](?:-*[A-Za-z0-9])*(?:\.[A-Za-z0-9](?:-*[A-Za-z0-9])*)+"
_MEMBER_NAME = r"[A-Z][A-Za-z0-9]*"
_METHOD_LINE = r"^\s*method\s+([A-Z][A-Za-z0-9]*)\s*\("


def _check_method(method: str) -> None:
    interface, dot, member = method.rpartition(".")
    if (
        not dot
        or not re.fullmatch(_INTERFACE_NAME, interface)
        or not re.fullmatch(_MEMBER_NAME, member)
    ):
        raise Usage(
            f"not a qualified method name: {method!r} (an interface name, a dot and a "
            "method name, e.g. io.composefs.Repository.ListImages)"
        )


def _check_interface(interface: str) -> None:
    if not re.fullmatch(_INTERFACE_NAME, interface):
        raise Usage(f"not an interface name: {interface!r} (e.g. io.composefs.Repository)")


class _NotJson(ValueError):
    """Python's extensions of JSON (NaN, Infinity), which a Varlink peer would refuse."""


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def parse_parameters(text: str, source: str) -> dict[str, Any]:
    """The call parameters in ``text`` (read from ``source``, for messages): a JSON
    object, or a usage error saying what is wrong with it."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except _NotJson as exc:
        raise Usage(f"the parameters ({source}) are not JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise Usage(
            f"the parameters ({source}) are not JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}"
        ) from None
    except RecursionError:
        raise Usage(f"the parameters ({source}) are nested too deeply") from None
    if not isinstance(value, dict):
        raise Usage(f"the parameters ({source}) must be a JSON object, not {type(value).__name__}")
    return value


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    if args.parameters is None:
        return {}
    if args.parameters == "-":
        return parse_parameters(sys.stdin.read(), "stdin")
    return parse_parameters(args.parameters, "the command line")


def _pretty(args: argparse.Namespace, out: TextIO) -> bool:
    mode: str | None = args.json_mode
    if mode is None:
        return out.isatty()
    return mode == "pretty"


def _print(doc: Mapping[str, Any] | list[Any], out: TextIO, pretty: bool) -> None:
    # ASCII only: a name in a reply cannot reorder what the terminal shows (U+202E),
    # and the JSON read back is the same.
    if pretty:
        out.write(json.dumps(doc, indent=4) + "\n")
    else:
        out.write(json.dumps(doc, separators=(",", ":")) + "\n")
    out.flush()


def _reply_doc(reply: Reply) -> dict[str, Any]:
    # Descriptors that came with a reply (a detached mount, say) are of no use to a
    # command that only prints: closing them releases what they hold.
    reply.close_fds()
    return dict(reply)


def _call(conn: Connection, args: argparse.Namespace) -> int:
    method: str = args.method
    _check_method(method)
    more = args.more or args.E
    if args.oneway and (more or args.collect):
        raise Usage("--oneway excludes --more, -E and --collect")
    if args.collect and not more:
        raise Usage("--collect goes with --more (or -E)")
    params = _parameters(args)
    out = sys.stdout
    pretty = _pretty(args, out)
    timeout: Any = None if args.E else conn.timeout
    try:
        if args.oneway:
            conn.call(method, params, oneway=True)
            return 0
        if more:
            collected: list[dict[str, Any]] = []
            # One line a reply unless asked otherwise, even on a terminal.
            each_pretty = args.json_mode == "pretty"
            for reply in conn.call(method, params, more=True, timeout=timeout):
                doc = _reply_doc(reply)
                if args.collect:
                    collected.append(doc)
                elif not args.quiet:
                    _print(doc, out, each_pretty)
            if args.collect and not args.quiet:
                _print(collected, out, pretty)
            return 0
        doc = _reply_doc(conn.call(method, params, timeout=timeout))
    except VarlinkCallError as exc:
        return _call_failed(method, exc, args, out)
    if not args.quiet:
        _print(doc, out, pretty)
    return 0


def _call_failed(method: str, exc: VarlinkCallError, args: argparse.Namespace, out: TextIO) -> int:
    if exc.name in args.graceful:
        if not args.quiet:
            _print(exc.parameters, out, _pretty(args, out))
        return 0
    _print(exc.parameters, out, _pretty(args, out))
    sys.stderr.write(f"composefsctl: error: method call {method}() failed: {exc.name}\n")
    return 1


def _interfaces(conn: Connection) -> list[str]:
    interfaces = conn.get_info().get("interfaces")
    if not isinstance(interfaces, list) or not all(isinstance(i, str) for i in interfaces):
        raise VarlinkProtocolError(f"{conn.address}: GetInfo: no list of interface names")
    return sorted(interfaces)


def method_names(description: str) -> list[str]:
    """The methods an interface description (IDL text) declares, in its order."""
    return re.findall(_METHOD_LINE, description, re.MULTILINE)


def _introspect(conn: Connection, args: argparse.Namespace) -> int:
    names: list[str] = args.interfaces
    if not names:
        for name in _interfaces(conn):
            print(printable(name))
        return 0
    for name in names:
        _check_interface(name)
    for i, name in enumerate(names):
        description = conn.get_interface_description(name)
        if i:
            print()
        sys.stdout.write(description if description.endswith("\n") else description + "\n")
    return 0


def _list_methods(conn: Connection, args: argparse.Namespace) -> int:
    names: list[str] = args.interfaces or _interfaces(conn)
    for name in names:
        _check_interface(name)
    methods: list[str] = []
    for name in names:
        methods.extend(f"{name}.{m}" for m in method_names(conn.get_interface_description(name)))
    for method in sorted(methods):
        print(printable(method))
    return 0


_INFO_FIELDS = (
    ("vendor", "Vendor"),
    ("product", "Product"),
    ("version", "Version"),
    ("url", "URL"),
)


def _info(conn: Connection, args: argparse.Namespace) -> int:
    info = _reply_doc(conn.get_info())
    if args.json:
        _print(info, sys.stdout, sys.stdout.isatty())
        return 0
    # Laid out as varlinkctl info lays it out: labels right-aligned, one
    # interface a line.
    for key, label in _INFO_FIELDS:
        print(f"{label:>10}: {printable(str(info.get(key, '')))}")
    interfaces: Iterable[Any] = info.get("interfaces") or ()
    for i, name in enumerate(sorted(str(n) for n in interfaces)):
        print(f"{'Interfaces' if i == 0 else '':>10}{':' if i == 0 else ' '} {printable(name)}")
    return 0


COMMANDS: dict[str, Callable[[Connection, argparse.Namespace], int]] = {
    "call": _call,
    "introspect": _introspect,
    "list-methods": _list_methods,
    "info": _info,
}
