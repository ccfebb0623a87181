"""The command line of ``composefsctl``: its options and subcommands, parsed into
the namespace both modes run from (the module notes of
:mod:`composefsd.cli.composefsctl` say what they do)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Container, Sequence
from typing import Any, NoReturn, cast

from composefsd.service import options
from composefsd.service.client import DEFAULT_TIMEOUT
from composefsd.service.options import VersionAction, erofs_version_argument

__all__ = ["PROG", "ArgumentParser", "parse_args"]

PROG = "composefsctl"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


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


def _verity_policies() -> list[str]:
    # Here: the enum's module costs a start 0.7 ms; only init and mount need it.
    from composefsd.verity_policy import VerityPolicy

    return [v.value for v in VerityPolicy]


def _mount_options(p: argparse.ArgumentParser) -> None:
    """The options ``mount`` and ``oci mount`` share (io.composefs.Repository.Mount's)."""
    if isinstance(p, _Unused):
        return
    p.add_argument(
        "--verity",
        choices=_verity_policies(),
        help="fs-verity checks: required, try or disabled (default: the repository's policy)",
    )
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


class _Unused:
    """The stand-in for a subcommand's parser when the command line does not name
    that subcommand: it takes the subcommand's arguments and drops them. (Building
    all of them, two dozen parsers with a hundred and more options, cost more than
    the rest of a client command's start; even an empty ArgumentParser costs some
    forty gettext look-ups, each a few stat calls, so none is made.)"""

    def __getattr__(self, name: str) -> Callable[..., _Unused]:
        return self._drop

    def _drop(self, *args: object, **kwargs: object) -> _Unused:
        return self


class _Parsers:
    """The ``parser_class`` of a subparsers action: an :class:`ArgumentParser` for a
    subcommand in ``wanted`` (the words of the command line), else an
    :class:`_Unused`, which argparse only lists (a subcommand is chosen by a whole
    word of the command line, so one not among them is never chosen)."""

    def __init__(self, wanted: Container[str] | None) -> None:
        self.wanted = wanted

    def __call__(self, *, prog: str, **kwargs: Any) -> argparse.ArgumentParser:
        if self.wanted is not None and prog.rpartition(" ")[2] not in self.wanted:
            return cast(argparse.ArgumentParser, _Unused())
        return ArgumentParser(prog=prog, **kwargs)


def _parsers(wanted: Container[str] | None) -> type[argparse.ArgumentParser]:
    # argparse calls parser_class, so a factory serves; typeshed asks for a class.
    return cast("type[argparse.ArgumentParser]", _Parsers(wanted))


def _init_options(p: argparse.ArgumentParser) -> None:
    if isinstance(p, _Unused):
        return  # not built: the names would load the algorithms' module (options' notes)
    from composefsd.verity_policy import VerityPolicy

    p.add_argument(
        "--algorithm",
        choices=options.ALGORITHM_NAMES,
        default="sha256",
        help="the fs-verity digest of objects and images: sha256 (default) or sha512 "
        "(fsverity-sha256-12, fsverity-sha512-12: the same)",
    )
    p.add_argument(
        "--verity",
        choices=_verity_policies(),
        default=VerityPolicy.TRY.value,
        help="fs-verity on objects: required (fail where unsupported), try (default), or disabled",
    )
    p.add_argument(
        "--erofs-version",
        type=erofs_version_argument,
        default=1,
        metavar="N",
        help="the format of the repository's images, as cfsctl init's: 1 (default; C "
        "mkcomposefs --min-version=1), 0 (C mkcomposefs --max-version=0) or 2 "
        "(composefs-rs's older format)",
    )


def _parser(wanted: Container[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``wanted`` (the words of a command line) one whose
    subcommands not among them are listed but take no arguments (they cannot be the
    one argparse chooses: its subcommand names match whole words only)."""
    common = ArgumentParser(add_help=False)
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
        "--no-ask-password",
        action="store_true",
        default=argparse.SUPPRESS,
        help="through the daemon: never let polkit ask for a password (default: it may, "
        "for a user other than root on a terminal)",
    )
    common.add_argument(
        "--timeout",
        metavar="SEC",
        type=_timeout,
        default=argparse.SUPPRESS,
        help="through the daemon: wait at most SEC seconds for each reply (default 45; 0: forever)",
    )

    parser = ArgumentParser(
        prog=PROG,
        description="Manage a composefs object repository (composefs-rs compatible layout), "
        "through composefsd when one answers, else directly.",
        parents=[common],
    )
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_parsers(wanted)
    )

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        p.set_defaults(parser=p)
        return p

    p = command("status", "show the repository (and the daemon serving it)")
    p.add_argument("--json", action="store_true")

    _init_options(command("init", "create a new repository"))

    p = command("create-image", "import a directory tree as an image")
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
    p.add_argument(
        "--erofs-version",
        type=erofs_version_argument,
        metavar="N",
        help="write one image in this format (0, 1 or 2) instead of the repository's formats",
    )
    p.add_argument(
        "--min-version",
        type=_version,
        metavar="N",
        help="write one image in the format C mkcomposefs chooses from --min-version "
        "(default 0) to --max-version (default 1)",
    )
    p.add_argument("--max-version", type=_version, metavar="N")
    p.add_argument(
        "--propagate-usr-to-root",
        action="store_true",
        help="composefs-rs's container transform (cfsctl's default): the root directory "
        "takes /usr's metadata, /run is emptied, xattrs are filtered (--xattrs)",
    )
    p.add_argument(
        "--xattrs",
        choices=("allowlist-only", "keep-user-xattrs"),
        help="with --propagate-usr-to-root: keep security.capability only (allowlist-only, "
        "the default) or also user.* xattrs",
    )
    p.add_argument(
        "--bootable",
        action="store_true",
        help="as cfsctl --bootable: empty /boot and /sysroot, label from the tree's own "
        "SELinux policy",
    )
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

    p = command("verify", "check images or composefs-rs streams and every object they use")
    p.add_argument("images", metavar="IMAGE", nargs="*", help="digest or ref name")
    p.add_argument(
        "--all", action="store_true", help="verify every image and every composefs-rs stream"
    )
    p.add_argument(
        "--stream",
        metavar="NAME",
        action="append",
        default=[],
        help="also verify this composefs-rs stream (a streams/ entry or refs/NAME; repeatable)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")

    p = command("fsck", "check the whole repository")
    p.add_argument("--json", action="store_true", help="machine-readable report")

    p = command("images", "list the images")
    p.add_argument("--json", action="store_true")

    p = command("describe", "show one image")
    p.add_argument("image", metavar="IMAGE", help="digest or ref name")
    p.add_argument("--json", action="store_true")

    p = command("remove-ref", "remove a ref (the image stays until GC)")
    p.add_argument("name", metavar="NAME")

    p = command("remove-image", "remove an image and its refs")
    p.add_argument("image", metavar="IMAGE", help="digest or ref name")
    p.add_argument("--json", action="store_true", help="print the refs that named it as JSON")

    p = command("gc", "remove what no ref or pin reaches")
    p.add_argument(
        "--pin",
        metavar="IMAGE",
        action="append",
        default=[],
        help="also keep this image (repeatable)",
    )
    p.add_argument(
        "--root",
        metavar="NAME",
        action="append",
        default=[],
        help="also keep this entry of images/ or streams/, as cfsctl gc --root does (repeatable)",
    )
    p.add_argument("--dry-run", "-n", action="store_true", help="only report what would go")
    p.add_argument("--json", action="store_true")

    p = command("mount", "mount an image (needs root)")
    p.add_argument("image", metavar="IMAGE", help="digest or ref name")
    p.add_argument("where", metavar="WHERE", help="the directory to mount it on")
    p.add_argument("--expected-digest", metavar="HEX", help="refuse unless IMAGE is this digest")
    _mount_options(p)

    p = command("unmount", "unmount a composefs mount")
    p.add_argument("where", metavar="WHERE")
    p.add_argument("--lazy", action="store_true", help="detach even if files are open")
    p.add_argument("--json", action="store_true", help="print what was unmounted as JSON")

    p = command("mounts", "list the mounted images of the repository")
    p.add_argument("--all", action="store_true", help="every composefs mount, any repository")
    p.add_argument("--json", action="store_true")

    p = command(
        "mount-dumpfile",
        "mount your own composefs dumpfile over your own object directories, in a user "
        "and mount namespace of your own, and run COMMAND there (no privilege needed)",
    )
    p.epilog = (
        "Then: -- COMMAND [ARG...], everything after the first --, run with the mount "
        "at DIR (default: $SHELL); its exit status is composefsctl's."
    )
    p.add_argument("dumpfile", metavar="DUMPFILE", help="a composefs-dump(5) file")
    p.add_argument(
        "objdirs", metavar="OBJDIR", nargs="+", help="object directories, searched in order"
    )
    p.add_argument("--at", metavar="DIR", required=True, help="where to attach the mount")
    p.add_argument(
        "--keep-ids",
        action="store_true",
        help="run COMMAND as your own uid and gid (as unshare -c), not as 0; files of "
        "the dumpfile's 0 are yours either way",
    )
    p.add_argument(
        "--userns-of",
        metavar="PID",
        type=_positive,
        help="idmap through PID's user namespace (one you own) and run COMMAND in it",
    )
    p.add_argument("--json", action="store_true", help="as root without COMMAND: print the mount")
    p.set_defaults(exec_command=[])

    _oci_commands(command("oci", "OCI container images (through composefsd only)"), common, wanted)
    _varlink_commands(command)
    return parser


def _varlink_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``call``, ``introspect``, ``list-methods``, ``info``: varlinkctl's generic
    commands, on the daemon composefsctl talks to (through composefsd only)."""
    p = command("call", "call any Varlink method of the daemon and print the reply as JSON")
    p.add_argument(
        "method",
        metavar="METHOD",
        help="the qualified method, e.g. io.composefs.Repository.Describe",
    )
    p.add_argument(
        "parameters",
        metavar="PARAMETERS",
        nargs="?",
        help="the parameters as a JSON object (default {}; '-': read them from stdin)",
    )
    p.add_argument("--more", action="store_true", help="ask for more replies; print each as a line")
    p.add_argument(
        "-E",
        action="store_true",
        help="--more, and wait for each reply as long as it takes (as varlinkctl -E)",
    )
    p.add_argument("--collect", action="store_true", help="with --more: print one JSON array")
    p.add_argument("--oneway", action="store_true", help="ask for no reply; print nothing")
    p.add_argument(
        "--json",
        dest="json_mode",
        metavar="MODE",
        choices=("short", "pretty"),
        help="short (one line) or pretty (indented); default: pretty on a terminal",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the reply")
    p.add_argument(
        "--graceful",
        metavar="ERROR",
        action="append",
        default=[],
        help="take this error reply (a qualified error name) as success (repeatable)",
    )

    p = command("introspect", "print the daemon's interfaces, or the description of some")
    p.add_argument(
        "interfaces", metavar="INTERFACE", nargs="*", help="e.g. io.composefs.Repository"
    )

    p = command("list-methods", "list the methods of the daemon's interfaces (or of some)")
    p.add_argument("interfaces", metavar="INTERFACE", nargs="*")

    p = command("info", "the daemon's vendor, product, version, URL and interfaces")
    p.add_argument("--json", action="store_true")


def _oci_commands(
    oci: argparse.ArgumentParser,
    common: argparse.ArgumentParser,
    wanted: Container[str] | None,
) -> None:
    """``composefsctl oci ...``: io.composefs.Oci's methods. IMAGE is a tag or
    ``@sha256:<manifest digest>``, as cfsctl takes it."""
    sub = oci.add_subparsers(
        dest="oci_command", metavar="OCI_COMMAND", required=True, parser_class=_parsers(wanted)
    )

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        p.set_defaults(parser=p)
        return p

    p = command("pull", "pull an image into the repository and build its composefs image")
    p.add_argument(
        "reference",
        metavar="REFERENCE",
        help="docker://HOST/NAME[:TAG], oci:DIR[:TAG], oci-archive:FILE[:TAG], "
        "docker-archive:FILE or containers-storage:REF (relative paths are made absolute)",
    )
    p.add_argument("tag", metavar="TAG", nargs="?", help="tag the pulled image with this name")
    p.add_argument("--bootable", action="store_true", help="also build the bootable image")
    p.add_argument("--authfile", metavar="PATH", help="registry credentials file, as skopeo's")
    p.add_argument("--cert-dir", metavar="DIR", help="TLS certificates directory, as skopeo's")
    p.add_argument(
        "--tls-verify",
        choices=("true", "false"),
        help="verify the registry's TLS certificate (default true)",
    )
    p.add_argument(
        "--creds",
        metavar="USER[:PASSWORD]",
        help="registry credentials (without a password, it is asked for on the terminal)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("images", "list the tagged images")
    p.add_argument("--json", action="store_true")

    p = command("inspect", "show an image's manifest and config")
    p.add_argument("image", metavar="IMAGE", help="tag or @sha256:<manifest digest>")
    p.add_argument("--json", action="store_true", help="(the output is JSON either way)")

    p = command("tag", "tag an image (replacing what the tag named)")
    p.add_argument("image", metavar="IMAGE", help="tag or @sha256:<manifest digest>")
    p.add_argument("tag", metavar="TAG")
    p.add_argument("--json", action="store_true")

    p = command("untag", "remove a tag (the image stays until gc)")
    p.add_argument("tag", metavar="TAG")
    p.add_argument("--json", action="store_true")

    p = command("mount", "mount an image's composefs image (needs root)")
    p.add_argument("image", metavar="IMAGE", help="tag or @sha256:<manifest digest>")
    p.add_argument("where", metavar="WHERE", help="the directory to mount it on")
    p.add_argument("--bootable", action="store_true", help="mount the bootable image")
    _mount_options(p)


#: The values of the options every subcommand takes (given before or after it, so
#: the parsers leave them out unless given).
_COMMON_DEFAULTS: dict[str, Any] = {
    "repo": None,
    "progress": False,
    "verbose": False,
    "connect": None,
    "direct": False,
    "no_ask_password": False,
    "timeout": DEFAULT_TIMEOUT,
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line ``argv`` (without the program name), every common option set;
    ``args.parser`` is the subcommand's parser, for usage errors found later."""
    argv = list(argv)
    # mount-dumpfile's COMMAND is everything after the first "--", as unshare(1)
    # and bwrap(1) take theirs (its options and OBJDIRs stay before it).
    exec_command: list[str] | None = None
    if "mount-dumpfile" in argv and "--" in argv[argv.index("mount-dumpfile") :]:
        split = argv.index("--", argv.index("mount-dumpfile"))
        exec_command, argv = argv[split + 1 :], argv[:split]
    args = _parser(frozenset(argv)).parse_args(argv)
    if exec_command is not None:
        args.exec_command = exec_command
    for name, value in _COMMON_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args
