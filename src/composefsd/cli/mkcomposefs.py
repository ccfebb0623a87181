"""``mkcomposefs``: build a composefs image from a directory or a dumpfile.

A drop-in for C mkcomposefs 1.0.8 (reference notes, section 9): the same options
(parsed with getopt_long's rules: ``--opt=value`` or ``--opt value``, unique
prefixes, options and operands in any order, ``--`` ends options), the same
messages on stderr, exit status 1 on every failure, and byte-identical images,
digests and digest stores.

Deliberate differences from C:

* On failure the output file is removed instead of being left empty or half
  written, when it is a regular file this run opened (C creates and truncates it
  before reading the input, and so do we, since a SOURCE may contain IMAGE).
* ``--help`` prints the usage on stdout and exits 0 (C has no such option).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from composefsd.cli.getopt import GetoptError, gnu_getopt
from composefsd.cpus import cpus as default_threads  # what sources.directory defaults to

if TYPE_CHECKING:
    from composefsd.image.tree import Node

# The image code is imported where it is used, not here: --help and usage errors
# then start as fast as a C tool, and --from-file never loads the directory scanner.

__all__ = ["main"]

PROG = "mkcomposefs"

# Long options and whether each takes an argument, as C's getopt_long table has them.
_LONGOPTS: dict[str, bool] = {
    "skip-xattrs": False,
    "user-xattrs": False,
    "skip-devices": False,
    "use-epoch": False,
    "digest-store": True,
    "print-digest": False,
    "print-digest-only": False,
    "from-file": False,
    "max-version": True,
    "min-version": True,
    "threads": True,
    "help": False,
}

_USAGE = """\
Usage: {prog} [OPTIONS] SOURCE IMAGE
Options:
  --digest-store=PATH   Store content files in this directory
  --use-epoch           Make all mtimes zero
  --skip-devices        Don't store device nodes
  --skip-xattrs         Don't store file xattrs
  --user-xattrs         Only store user.* xattrs
  --print-digest        Print the digest of the image
  --print-digest-only   Print the digest of the image, don't write image
  --from-file           The source is a dump file, not a directory
  --min-version=N       Use this minimal format version (default=0)
  --max-version=N       Use this maximum format version (default=1)
  --threads=N           Use this to override the default number of threads used to calculate \
digest and copy files (default={threads})
"""

_C_SPACE = " \t\n\v\f\r"
_LONG_MIN = -(1 << 63)
_LONG_MAX = (1 << 63) - 1


class _Exit(Exception):
    """Stop with ``status``; ``message`` (if any) goes to stderr as is."""

    def __init__(self, status: int, message: str | None = None, usage: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.usage = usage


def _fail(message: str) -> _Exit:
    """C ``errx``: the program name, a colon, the message."""
    return _Exit(1, f"{PROG}: {message}")


class _Args:
    # A plain class, not a dataclass: building one costs more than this whole
    # module at start-up, and nothing compares or prints these.
    __slots__ = (
        "digest_store",
        "from_file",
        "help",
        "max_version",
        "min_version",
        "print_digest",
        "print_digest_only",
        "skip_devices",
        "skip_xattrs",
        "threads",
        "use_epoch",
        "user_xattrs",
        "version_set",
    )

    def __init__(self) -> None:
        self.use_epoch = False
        self.skip_xattrs = False
        self.user_xattrs = False
        self.skip_devices = False
        self.digest_store: str | None = None
        self.print_digest = False
        self.print_digest_only = False
        self.from_file = False
        self.min_version = 0
        self.max_version = 0
        self.version_set = False
        self.threads = 0
        self.help = False


def _strtol(text: str) -> int | None:
    """C ``strtol(text, &end, 10)`` plus mkcomposefs's ``*text == 0 || *end != 0`` check."""
    i = 0
    n = len(text)
    while i < n and text[i] in _C_SPACE:
        i += 1
    sign = 1
    if i < n and text[i] in "+-":
        sign = -1 if text[i] == "-" else 1
        i += 1
    start = i
    while i < n and "0" <= text[i] <= "9":
        i += 1
    if not text or i != n or i == start:
        return None
    return max(_LONG_MIN, min(_LONG_MAX, sign * int(text[start:i])))


def _c_int(value: int) -> int:
    """A C ``long`` stored into an ``int``: keep the low 32 bits, signed."""
    return ((value + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _apply(args: _Args, opt: str, value: str | None) -> None:
    if opt == "use-epoch":
        args.use_epoch = True
    elif opt == "skip-xattrs":
        args.skip_xattrs = True
    elif opt == "user-xattrs":
        args.user_xattrs = True
    elif opt == "skip-devices":
        args.skip_devices = True
    elif opt == "digest-store":
        args.digest_store = value
    elif opt == "print-digest":
        args.print_digest = True
    elif opt == "print-digest-only":
        args.print_digest = args.print_digest_only = True
    elif opt == "from-file":
        args.from_file = True
    elif opt in ("min-version", "max-version"):
        assert value is not None
        args.version_set = True
        number = _strtol(value)
        if number is None:
            raise _Exit(1, f"Invalid {opt[:3]} version {value}")
        if opt == "min-version":
            args.min_version = number
        else:
            args.max_version = number
    elif opt == "threads":
        assert value is not None
        number = _strtol(value)
        if number is None:
            raise _Exit(1, f"Invalid threads count {value}")
        count = _c_int(number)
        if count <= 0:
            raise _Exit(1, f"Invalid threads count {count}")
        args.threads = count
    elif opt == "help":
        args.help = True


def _parse(argv: Sequence[str]) -> tuple[_Args, list[str]]:
    """getopt_long with optstring ``:CR``: errors are silent except a missing value."""
    args = _Args()
    operands: list[str] = []
    try:
        for opt, value in gnu_getopt(argv, "", _LONGOPTS, operands):
            _apply(args, opt, value)
            if args.help:
                return args, operands
    except GetoptError as e:
        if e.kind == "missing":
            raise _Exit(1, "option needs a value") from None
        # Unknown options, and -C and -R, which C accepts and then answers with
        # the usage like any unknown option.
        raise _Exit(1, usage=True) from None
    if not args.version_set:
        args.min_version, args.max_version = 0, 1
    return args, operands


class _Output:
    """The IMAGE file: created up front like C, removed again if the run fails."""

    def __init__(self, fd: int, path: str | None) -> None:
        self.fd = fd
        self.path = path
        self.identity: tuple[int, int] | None = None
        if path is not None:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                self.identity = (st.st_dev, st.st_ino)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]

    def close(self) -> None:
        if self.path is not None:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def discard(self) -> None:
        """Remove the file, unless the name now points at something else."""
        if self.path is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path is None or self.identity is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(self.path)
        except OSError:
            pass


def _open_output(args: _Args, image: str | None) -> _Output | None:
    if args.print_digest_only:
        return None
    assert image is not None
    if image == "-":
        if os.isatty(1):
            raise _fail("stdout is a tty.  Refusing to use it")
        return _Output(1, None)
    try:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise _fail(f"failed to open output file: {os.strerror(exc.errno or errno.EIO)}") from exc
    return _Output(fd, image)


def _read_dumpfile(source: str) -> Node:
    from composefsd.image.dump_parse import DumpfileError, parse_dumpfile_lines

    if source == "-":
        stream = sys.stdin.buffer
        try:
            lines = stream.readlines()
        except OSError as exc:
            raise _fail("Error reading from file") from exc
    else:
        try:
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _fail(f"open `{source}`: {os.strerror(exc.errno or errno.EIO)}") from exc
        try:
            with os.fdopen(fd, "rb") as f:
                lines = f.readlines()
        except OSError as exc:
            raise _fail("Error reading from file") from exc
    try:
        return parse_dumpfile_lines(lines, strict="CFS_PARSE_STRICT" in os.environ)
    except DumpfileError as exc:
        raise _fail(str(exc)) from exc  # C's message, plus the line number


def _scan(args: _Args, source: str) -> Node:
    from composefsd.sources.directory import ScanError, ScanOptions, scan_directory

    options = ScanOptions(
        use_epoch=args.use_epoch,
        skip_devices=args.skip_devices,
        skip_xattrs=args.skip_xattrs,
        user_xattrs=args.user_xattrs,
        threads=args.threads or default_threads(),
    )
    try:
        return scan_directory(source, options, digest_store=args.digest_store)
    except ScanError as exc:
        raise _fail(exc.message) from exc


def _run(argv: Sequence[str]) -> int:
    args, operands = _parse(argv)
    if args.help:
        sys.stdout.write(_USAGE.format(prog=PROG, threads=default_threads()))
        return 0
    if not operands:
        raise _Exit(1, "No source path specified", usage=True)
    source = operands[0]
    if not source:
        raise _fail("Empty source path specified")
    if len(operands) > 2:
        raise _Exit(1, "Too many arguments", usage=True)
    image: str | None = None
    if len(operands) == 1:
        if not args.print_digest_only:
            raise _Exit(1, "No destination path specified", usage=True)
    elif not args.print_digest_only:
        image = operands[1]
    else:
        raise _Exit(1, "Cannot specify destination path with --print-digest-only", usage=True)

    from composefsd.image.writer import write_image

    out = _open_output(args, image)
    if args.from_file:
        # One acyclic tree in a short-lived process: the cyclic collector could
        # only walk it, never free it (a gen-0 pass over all 300,000 objects of
        # the /usr tree as soon as parsing ends: 0.06-0.1 s). Peak memory is
        # unchanged now that the dump is read by lines.
        import gc

        gc.disable()
    try:
        root = _read_dumpfile(source) if args.from_file else _scan(args, source)
        try:
            data = write_image(
                root,
                min_version=_c_int(args.min_version),
                max_version=_c_int(args.max_version),
            )
            if out is not None:
                out.write(data)
        except OSError as exc:
            raise _fail(f"cannot write file: {os.strerror(exc.errno or errno.EIO)}") from exc
        if args.print_digest:
            # After the image: with IMAGE "-" the digest line follows it on stdout.
            from composefsd.fsverity import digest_bytes

            _stdout(digest_bytes(data).hex() + "\n")
        if out is not None:
            try:
                out.close()
            except OSError as exc:
                raise _fail(f"close output file: {os.strerror(exc.errno or errno.EIO)}") from exc
    except BaseException:
        if out is not None:
            out.discard()
        raise
    return 0


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run mkcomposefs with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except _Exit as stop:
        sys.stdout.flush()
        err = sys.stderr
        if stop.message is not None:
            err.flush()
            err.buffer.write(os.fsencode(stop.message) + b"\n")
            err.buffer.flush()
        if stop.usage:
            err.write(_USAGE.format(prog=PROG, threads=default_threads()))
            err.flush()
        return stop.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
