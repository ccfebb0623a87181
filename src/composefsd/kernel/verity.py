"""The fs-verity ioctls (``FS_IOC_ENABLE_VERITY``, ``FS_IOC_MEASURE_VERITY``), the
hash algorithms as the kernel numbers them, and the errors the kernel answers with.

A leaf of :mod:`composefsd.kernel`: it imports nothing else of composefsd, so that
every layer that needs the kernel's verity (the scanner, the repository, mounts and
CLIs) may call it, while :mod:`composefsd.fsverity` computes the same digests in
userspace without any ioctl.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
from typing import TypeAlias

__all__ = [
    "BLOCK_SIZE",
    "FS_IOC_ENABLE_VERITY",
    "FS_IOC_MEASURE_VERITY",
    "LOG_BLOCK_SIZE",
    "Algorithm",
    "AlgorithmLike",
    "VerityAlgorithmMismatchError",
    "VerityAlreadyEnabledError",
    "VerityError",
    "VerityFileBusyError",
    "VerityNotEnabledError",
    "VerityUnsupportedError",
    "enable_verity",
    "measure_verity",
]

#: The Merkle tree block size composefs uses (and the only one composefsd supports).
BLOCK_SIZE = 4096
LOG_BLOCK_SIZE = 12

#: ``_IOW('f', 133, struct fsverity_enable_arg)``; the argument is 128 bytes.
FS_IOC_ENABLE_VERITY = 0x40806685
#: ``_IOWR('f', 134, struct fsverity_digest)``; the size encodes only the 4-byte header.
FS_IOC_MEASURE_VERITY = 0xC0046686

# version, hash_algorithm, block_size, salt_size, salt_ptr, sig_size, reserved1,
# sig_ptr, reserved2[11]
_ENABLE_ARG = struct.Struct("<IIIIQIIQ88x")
_MEASURE_HEADER = struct.Struct("<HH")
_MAX_DIGEST_SIZE = 64


class Algorithm(enum.Enum):
    """An fs-verity hash algorithm; the value is its name as ``hashlib`` and
    ``fsverity`` (fsverity-utils) spell it."""

    SHA256 = "sha256"
    SHA512 = "sha512"

    @property
    def kernel_id(self) -> int:
        """``FS_VERITY_HASH_ALG_*``: 1 for SHA-256, 2 for SHA-512."""
        return 1 if self is Algorithm.SHA256 else 2

    @property
    def digest_size(self) -> int:
        return 32 if self is Algorithm.SHA256 else 64

    @property
    def composefs_rs_name(self) -> str:
        """The composefs-rs spelling, e.g. ``fsverity-sha256-12`` (12 = log2 block size)."""
        return f"fsverity-{self.value}-{LOG_BLOCK_SIZE}"

    @classmethod
    def parse(cls, value: AlgorithmLike) -> Algorithm:
        """Accept an :class:`Algorithm`, ``"sha256"``/``"sha512"`` (any case), the
        composefs-rs names ``"fsverity-sha256-12"``/``"fsverity-sha512-12"``, or a
        kernel id (1 or 2)."""
        if isinstance(value, Algorithm):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            for alg in cls:
                if alg.kernel_id == value:
                    return alg
            raise ValueError(f"unknown fs-verity hash algorithm id {value} (known: 1, 2)")
        if isinstance(value, str):
            name = value.lower()
            if name.startswith("fsverity-"):
                base, sep, lg = name[len("fsverity-") :].rpartition("-")
                if not sep or lg != str(LOG_BLOCK_SIZE):
                    raise ValueError(
                        f"unsupported fs-verity algorithm {value!r}: only 4096-byte blocks "
                        f"(fsverity-sha256-12, fsverity-sha512-12) are supported"
                    )
                name = base
            try:
                return cls(name)
            except ValueError:
                pass
        raise ValueError(
            f"unknown fs-verity hash algorithm {value!r} (expected sha256, sha512, "
            f"fsverity-sha256-12 or fsverity-sha512-12)"
        )


AlgorithmLike: TypeAlias = Algorithm | str | int


class VerityError(OSError):
    """An fs-verity ioctl failed. ``errno``/``strerror`` are the kernel's (``strerror``
    is C's text, for CLIs that print it), ``filename`` the path if one was given, and
    ``str()`` a full sentence."""

    def __init__(self, err: int, message: str, *, path: str | None = None) -> None:
        super().__init__(err, os.strerror(err))
        self.message = message
        if path is not None:
            self.filename = path

    def __str__(self) -> str:
        return self.message


class VerityUnsupportedError(VerityError):
    """The kernel or the filesystem cannot do fs-verity (ENOTTY, EOPNOTSUPP), or not
    with this hash algorithm (ENOPKG)."""


class VerityNotEnabledError(VerityError):
    """The filesystem supports fs-verity but this file does not have it (ENODATA)."""


class VerityAlreadyEnabledError(VerityError):
    """FS_IOC_ENABLE_VERITY on a file that already has fs-verity (EEXIST)."""


class VerityFileBusyError(VerityError):
    """FS_IOC_ENABLE_VERITY while the file is open for writing somewhere (ETXTBSY), or
    while another enable runs on it (EBUSY). Retrying later may succeed."""


class VerityAlgorithmMismatchError(VerityError):
    """The file's fs-verity uses another hash algorithm than the one asked for."""

    def __init__(
        self, err: int, message: str, *, expected: int, actual: int, path: str | None = None
    ) -> None:
        super().__init__(err, message, path=path)
        self.expected = expected
        self.actual = actual


_UNSUPPORTED = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOPKG})


def _target(fd: int, path: str | os.PathLike[str] | None) -> str:
    return os.fspath(path) if path is not None else f"fd {fd}"


def _path_str(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.fspath(path)


def enable_verity(
    fd: int, algorithm: AlgorithmLike = "sha256", *, path: str | os.PathLike[str] | None = None
) -> None:
    """FS_IOC_ENABLE_VERITY with 4096-byte blocks, no salt, no signature.

    ``fd`` must be open read-only and no writable fd to the file may exist anywhere
    (else :class:`VerityFileBusyError`). ``path`` only names the file in messages.
    """
    alg = Algorithm.parse(algorithm)
    arg = _ENABLE_ARG.pack(1, alg.kernel_id, BLOCK_SIZE, 0, 0, 0, 0, 0)
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
    except OSError as e:
        err = e.errno if e.errno is not None else errno.EIO
        what = f"cannot enable fs-verity ({alg.value}) on {_target(fd, path)}"
        reason = os.strerror(err)
        p = _path_str(path)
        if err in _UNSUPPORTED:
            raise VerityUnsupportedError(
                err, f"{what}: the kernel or filesystem does not support it ({reason})", path=p
            ) from e
        if err == errno.EEXIST:
            raise VerityAlreadyEnabledError(
                err, f"{what}: fs-verity is already enabled ({reason})", path=p
            ) from e
        if err in (errno.ETXTBSY, errno.EBUSY):
            raise VerityFileBusyError(
                err, f"{what}: the file is open for writing or being enabled ({reason})", path=p
            ) from e
        raise VerityError(err, f"{what}: {reason}", path=p) from e


def measure_verity(
    fd: int, algorithm: AlgorithmLike = "sha256", *, path: str | os.PathLike[str] | None = None
) -> bytes:
    """FS_IOC_MEASURE_VERITY: the digest the kernel holds for the file.

    Raises :class:`VerityNotEnabledError` if the file has no fs-verity,
    :class:`VerityUnsupportedError` if the kernel or filesystem cannot do it, and
    :class:`VerityAlgorithmMismatchError` if the file's verity uses another algorithm.
    """
    alg = Algorithm.parse(algorithm)
    # Ask with the largest capacity so that a file using another algorithm reports
    # which one instead of failing with EOVERFLOW.
    buf = bytearray(_MEASURE_HEADER.size + _MAX_DIGEST_SIZE)
    _MEASURE_HEADER.pack_into(buf, 0, alg.kernel_id, _MAX_DIGEST_SIZE)
    what = f"cannot measure fs-verity of {_target(fd, path)}"
    p = _path_str(path)
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
    except OSError as e:
        err = e.errno if e.errno is not None else errno.EIO
        reason = os.strerror(err)
        if err == errno.ENODATA:
            raise VerityNotEnabledError(
                err, f"{what}: fs-verity is not enabled on the file ({reason})", path=p
            ) from e
        if err in _UNSUPPORTED:
            raise VerityUnsupportedError(
                err, f"{what}: the kernel or filesystem does not support it ({reason})", path=p
            ) from e
        raise VerityError(err, f"{what}: {reason}", path=p) from e
    got_alg, got_size = _MEASURE_HEADER.unpack_from(buf, 0)
    if got_alg != alg.kernel_id or got_size != alg.digest_size:
        try:
            actual = Algorithm.parse(got_alg).value
        except ValueError:
            actual = f"algorithm id {got_alg}"
        # EOVERFLOW is what C composefs (which passes a 32-byte buffer) reports for a
        # file with a larger digest.
        err = errno.EOVERFLOW if got_size > alg.digest_size else errno.EINVAL
        raise VerityAlgorithmMismatchError(
            err,
            f"{what}: its fs-verity uses {actual} with a {got_size}-byte digest, "
            f"expected {alg.value} ({alg.digest_size} bytes)",
            expected=alg.kernel_id,
            actual=got_alg,
            path=p,
        )
    return bytes(buf[_MEASURE_HEADER.size : _MEASURE_HEADER.size + got_size])
