"""``mount.composefs``: mount a composefs image, a drop-in for the C 1.0.8 tool.

Usage: ``mount.composefs [-t composefs] [-o OPTS] IMAGE MOUNTPOINT``, also as the
helper ``mount -t composefs`` runs (it passes ``IMAGE MOUNTPOINT -o OPTS``, so
options may follow the operands, as with glibc ``getopt``). The options, their
parsing (``,`` splits, the first ``=`` separates key and value, ``\\`` escapes the
next character and is dropped from values), the checks and their order, the
messages on stderr (with C's blank line after most of them) and the exit status
are C's (reference notes, section 11). The mount itself is
:func:`composefsd.kernel.mount.mount_image`:

* ``verity`` or ``digest=`` -> :attr:`VerityPolicy.REQUIRED` (with the digest
  as the expected image digest), ``tryverity`` -> ``TRY``, else ``DISABLED``;
* ``ro`` -> a read-only overlay; the default is rw, as in C (without an
  upperdir the overlay cannot be written anyway);
* the mount source is ``composefs:<digest>`` with a (non-empty) ``digest=``, else
  ``composefs``.

A failed mount prints C's line, "Failed to mount composefs IMAGE: <strerror>".
With ``COMPOSEFSD_DEBUG`` set (non-empty) in the environment, a line saying why in
our words follows it, and the library's log goes to stderr at debug level.

This runs once per mount, so only what a mount needs is imported, and only
once the command line has been checked.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Sequence
from typing import NoReturn

from composefsd.cli.getopt import GetoptError, gnu_getopt

__all__ = ["main"]

PROG = "mount.composefs"
DEBUG_ENV = "COMPOSEFSD_DEBUG"

_USAGE = """\
usage: {0} [-t type] [-o opt[,opts..]] IMAGE MOUNTPOINT
Example:
  {0} -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage
or, as a mount helper:
  mount -t composefs -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage

Supported options:
  basedir=PATH[:PATH]    Specify location of basedir(s)
  digest=DIGEST          Specify required image digest
  idmap=PATH             Specify path to a user namespace whose ID mapping should be used
  verity                 Require all files to have specified and valid fs-verity digests
  tryverity              If supported by kernel, require fs-verity
  ro                     Read only
  rw                     Read/write
  upperdir               Overlayfs upperdir
  workdir                Overlayfs workdir
"""

# The C errnos behind its two verity messages (lcfs-mount.h).
_ENOVERITY = errno.ENOTTY
_EWRONGVERITY = errno.EILSEQ
_MAX_DIGEST_SIZE = 64
_LCFS_DIGEST_SIZE = 32


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _write(data: bytes) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def _errx(msg: str) -> NoReturn:
    """C ``errx(EXIT_FAILURE, ...)``: the short program name, ": ", the message. C's
    formats end in "\\n" themselves, hence the blank line after every one of them."""
    _write(os.fsencode(f"{_prog_short()}: {msg}\n"))
    raise _Exit(1)


def _argv0() -> str:
    return sys.argv[0] if sys.argv and sys.argv[0] else PROG


def _prog_short() -> str:
    # glibc's program_invocation_short_name; C's usage() takes the same basename.
    return os.path.basename(_argv0())


def _usage() -> None:
    _write(os.fsencode(_USAGE.format(_prog_short())))


def _getopt(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """glibc ``getopt(argc, argv, "ht:o:")`` with C's actions on each option, in the
    order they come; returns the last ``-o`` value and the operands."""
    mount_options: str | None = None
    operands: list[str] = []
    try:
        for opt, value in gnu_getopt(args, "ht:o:", None, operands):
            if opt == "h":
                _usage()
                raise _Exit(0)
            if opt == "t":
                if value != "composefs":
                    _errx(f"Unsupported fs type '{value}'\n")
            else:
                mount_options = value
    except GetoptError as e:
        _write(os.fsencode(f"{_argv0()}: {e}\n"))
        _usage()
        raise _Exit(1) from None
    return mount_options, operands


def _unescape(value: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "\\":
            i += 1
            if i == len(value):
                break
        out.append(value[i])
        i += 1
    return "".join(out)


def _parse_option(options: str) -> tuple[str, str | None, str | None]:
    """C ``parse_option``: (key, unescaped value or None, rest or None)."""
    equal = -1
    p = 0
    while p < len(options):
        c = options[p]
        if c == "=" and equal < 0:
            equal = p
        elif c == "\\" and p + 1 < len(options):
            p += 1
        elif c == ",":
            break
        p += 1
    rest = options[p + 1 :] if p < len(options) else None
    item = options[:p]
    if equal >= 0:
        return item[:equal], _unescape(item[equal + 1 :]), rest
    return item, None, rest


def _digest_to_raw(digest: str) -> bytes | None:
    """C ``digest_to_raw``: pairs of hex digits, at most 64 bytes; None if malformed."""
    if len(digest) % 2 or len(digest) > 2 * _MAX_DIGEST_SIZE:
        return None
    if any(c not in "0123456789abcdefABCDEF" for c in digest):
        return None
    return bytes.fromhex(digest)


class _MountFailure(Exception):
    def __init__(self, err: int, detail: str | None = None) -> None:
        super().__init__(err, detail)
        self.err = err
        self.detail = detail


def _measure(fd: int) -> bytes:
    """C ``lcfs_fd_measure_fsverity``: the image's 32-byte (SHA-256) fs-verity digest."""
    from composefsd.kernel.verity import (
        VerityAlgorithmMismatchError,
        VerityError,
        VerityNotEnabledError,
        VerityUnsupportedError,
        measure_verity,
    )

    try:
        return measure_verity(fd, "sha256")
    except (VerityNotEnabledError, VerityUnsupportedError) as e:
        raise _MountFailure(_ENOVERITY, f"the image has no fs-verity ({e})") from None
    except VerityAlgorithmMismatchError as e:
        raise _MountFailure(_EWRONGVERITY, str(e)) from None
    except VerityError as e:
        err = e.errno or errno.EIO
        raise _MountFailure(err, f"cannot measure the image: {e}") from None


def _open_layer(what: str, path: str, fds: list[int]) -> int:
    """Open an overlay layer directory as C's kernel call would see it: missing ->
    its errno; not a directory -> EINVAL, the overlay's answer (mount_image() would
    say ENOTDIR)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise _MountFailure(e.errno or errno.EIO, f"{what} {path}: {e.strerror}") from None
    fds.append(fd)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        raise _MountFailure(errno.EINVAL, f"{what} {path} is not a directory")
    return fd


def _mount(
    image_fd: int,
    mount_path: str,
    basedirs: list[str],
    *,
    digest: str | None,
    verity: bool,
    tryverity: bool,
    read_only: bool,
    upperdir: str | None,
    workdir: str | None,
    userns_fd: int | None,
) -> None:
    """C ``lcfs_mount_fd``'s checks in C's order, then our mount; raises _MountFailure."""
    expected: str | None = None
    if digest is not None:
        raw = _digest_to_raw(digest)
        if raw is None:
            raise _MountFailure(errno.EINVAL, f"digest {digest!r} is not a hex string")
        if raw:
            measured = _measure(image_fd)
            # C compares the first 32 bytes of the (zero-padded) expected digest.
            if raw.ljust(_LCFS_DIGEST_SIZE, b"\0")[:_LCFS_DIGEST_SIZE] != measured:
                raise _MountFailure(
                    _EWRONGVERITY, f"the image measures {measured.hex()}, expected {digest}"
                )
            expected = measured.hex()
    # Loaded here, as the mount code below loads it anyway: --help and bad options stay cheap.
    from composefsd.image.format import COMPOSEFS_MAGIC, HEADER_SIZE

    try:
        header = os.pread(image_fd, HEADER_SIZE, 0)
    except OSError as e:
        raise _MountFailure(e.errno or errno.EIO, f"cannot read the image: {e.strerror}") from None
    if len(header) != HEADER_SIZE:
        raise _MountFailure(errno.EINVAL, "the image is shorter than a composefs header")
    if int.from_bytes(header[:4], "little") != COMPOSEFS_MAGIC:
        raise _MountFailure(errno.EINVAL, "the image has no composefs magic number")

    from composefsd.kernel.mount import MountError, MountOptions, VerityPolicy, mount_image
    from composefsd.kernel.syscalls import KernelError, move_mount

    if verity or digest is not None:
        policy = VerityPolicy.REQUIRED
    elif tryverity:
        policy = VerityPolicy.TRY
    else:
        policy = VerityPolicy.DISABLED
    fds: list[int] = []
    try:
        opts = MountOptions(
            basedirs=[_open_layer("basedir", b, fds) for b in basedirs],
            verity=policy,
            expected_digest=expected,
            read_only=read_only,
            upperdir=None if upperdir is None else _open_layer("upperdir", upperdir, fds),
            workdir=None if workdir is None else _open_layer("workdir", workdir, fds),
            userns_fd=userns_fd,
        )
        with mount_image(image_fd, opts) as mnt:
            # move_mount itself, not attach(): C reports the kernel's errno here
            # (EINVAL for a file as the mount point, where attach() says ENOTDIR).
            move_mount(mnt.fd, mount_path)
    except MountError as e:
        raise _MountFailure(e.errno or errno.EIO, str(e)) from None
    except KernelError as e:
        raise _MountFailure(
            e.errno or errno.EIO, f"cannot attach the mount at {mount_path}: {e.strerror}"
        ) from None
    finally:
        for fd in fds:
            os.close(fd)


def _run(args: Sequence[str]) -> None:
    mount_options, operands = _getopt(args)
    if not operands:
        _write(b"No source path specified\n")
        _usage()
        raise _Exit(1)
    image_path = operands[0]
    if len(operands) < 2:
        _write(b"No mount path specified\n")
        _usage()
        raise _Exit(1)
    mount_path = operands[1]

    basedir = digest = idmap = upperdir = workdir = None
    verity = tryverity = read_only = False
    while mount_options is not None:
        key, value, mount_options = _parse_option(mount_options)
        if key in ("basedir", "digest", "upperdir", "workdir", "idmap"):
            if value is None:
                _errx(f"No value specified for {key} option\n")
            if key == "basedir":
                basedir = value
            elif key == "digest":
                digest = value
            elif key == "upperdir":
                upperdir = value
            elif key == "workdir":
                workdir = value
            else:
                idmap = value
        elif key == "verity":
            verity = True
        elif key == "tryverity":
            tryverity = True
        elif key == "rw":
            read_only = False
        elif key == "ro":
            read_only = True
        else:
            _errx(f"Unsupported option {key}\n")

    basedirs: list[str] = []
    if basedir is not None:
        basedirs = basedir.split(":")
        if "" in basedirs:
            _errx("Value for basedir option has incorrect format\n")
    if not basedirs:
        _write(b"No object dirs specified\n")
        _usage()
        raise _Exit(1)
    if (upperdir is None) != (workdir is None):
        _errx("Both workdir and upperdir must be specified if used\n")

    userns_fd = None
    if idmap is not None:
        try:
            userns_fd = os.open(idmap, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            _errx(f"Failed to open userns {idmap}: {os.strerror(e.errno or 0)}\n")
    try:
        image_fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        _errx(f"Failed to open {image_path}: {os.strerror(e.errno or 0)}\n")
    try:
        _mount(
            image_fd,
            mount_path,
            basedirs,
            digest=digest,
            verity=verity,
            tryverity=tryverity,
            read_only=read_only,
            upperdir=upperdir,
            workdir=workdir,
            userns_fd=userns_fd,
        )
    except _MountFailure as e:
        if e.err == _ENOVERITY:
            reason = "Image has no fs-verity"
        elif e.err == _EWRONGVERITY:
            reason = "Image has wrong fs-verity"
        else:
            reason = os.strerror(e.err)
        _write(
            os.fsencode(f"{_prog_short()}: Failed to mount composefs {image_path}: {reason}\n\n")
        )
        if e.detail and os.environ.get(DEBUG_ENV):
            _write(os.fsencode(f"{_prog_short()}: {image_path}: {e.detail}\n"))
        raise _Exit(1) from None
    finally:
        os.close(image_fd)
        if userns_fd is not None:
            os.close(userns_fd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; ``argv`` excludes the program name (default: ``sys.argv[1:]``)."""
    if os.environ.get(DEBUG_ENV):
        import logging

        logging.basicConfig(level=logging.DEBUG, format=f"{_prog_short()}: %(name)s: %(message)s")
    try:
        _run(sys.argv[1:] if argv is None else argv)
    except _Exit as e:
        return e.code
    return 0


if __name__ == "__main__":
    if sys.argv and sys.argv[0].endswith(".py"):
        sys.argv[0] = PROG
    sys.exit(main())
