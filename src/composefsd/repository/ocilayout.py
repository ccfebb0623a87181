"""An ``oci:DIR[:TAG]`` image layout read directly, as composefs-rs's native
``oci:`` path (``oci_layout.rs``) reads it: an :class:`~composefsd.repository.ocipull.ImageSource`.

The layout is named by the caller, who controls everything in it: every file is
opened beneath the layout directory's fd, one component at a time, never
following a symlink (``blobs``, ``blobs/<alg>`` and the blob itself, and
``index.json``); digests are checked (``sha256:`` or ``sha512:`` and lowercase
hex of the right length) before they become a path; index, manifests and config
are read at most :data:`~composefsd.repository.ocipull.JSON_MAX` bytes and
checked against their descriptor's digest and size; a blob must be a regular
file of its descriptor's size.

The image: with a tag, the ``index.json`` entry whose
``org.opencontainers.image.ref.name`` is the tag; without, every entry. Entries
that are indexes are followed (a few levels deep); manifests whose ``platform``
is not this machine's (``linux`` and its Go architecture name, as skopeo
chooses) are left out; of those left, the first is the image, but without a
tag there must be exactly one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO

from composefsd.repository.errors import os_error_text
from composefsd.repository.oci import json_object
from composefsd.repository.ocipull import (
    INDEX_MEDIA_TYPES,
    JSON_MAX,
    BlobDigestError,
    Descriptor,
    LayoutError,
    ManifestFormatError,
    PlatformError,
    TagNotFoundError,
    check_blob,
    parse_descriptor,
)

__all__ = ["REF_NAME", "OciLayoutSource", "go_arch", "parse_layout_ref"]

#: The index annotation that tags an image.
REF_NAME = "org.opencontainers.image.ref.name"
#: How deep indexes may nest.
_INDEX_DEPTH = 4
#: ``platform.machine()`` → Go's GOARCH (what OCI platforms name).
_GO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "ppc64": "ppc64",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64": "mips64",
    "loongarch64": "loong64",
}
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def go_arch(machine: str | None = None) -> str:
    """This machine's (or ``machine``'s) architecture as OCI platforms name it."""
    name = machine if machine is not None else platform.machine()
    return _GO_ARCH.get(name, name)


def parse_layout_ref(ref: str) -> tuple[str, str | None]:
    """``DIR[:TAG]`` → ``(DIR, TAG)``: composefs-rs's ``parse_oci_layout_ref``. The
    last colon separates a tag unless a ``/`` follows it."""
    before, colon, tag = ref.rpartition(":")
    if not colon or "/" in tag:
        return ref, None
    return before, tag


class OciLayoutSource:
    """The image of one tag (or the only one) of an OCI layout directory."""

    def __init__(
        self,
        dir_fd: int,
        tag: str | None = None,
        *,
        name: str | None = None,
        os_name: str = "linux",
        arch: str | None = None,
    ) -> None:
        """Read the layout at ``dir_fd`` (duplicated: the caller keeps its fd).
        ``name`` names the layout in messages; ``os_name``/``arch`` the platform
        wanted (default: this machine's)."""
        self._fd = os.dup(dir_fd)
        self.tag = tag
        self.name = name if name is not None else f"the OCI layout at fd {dir_fd}"
        self.platform = (os_name, arch if arch is not None else go_arch())
        self._manifest: tuple[str, bytes] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], tag: str | None = None) -> OciLayoutSource:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise LayoutError(
                f"cannot open the OCI layout {os.fspath(path)}: {os_error_text(exc)}",
                errno=exc.errno,
            ) from exc
        try:
            return cls(fd, tag, name=f"the OCI layout {os.fspath(path)}")
        finally:
            os.close(fd)

    @classmethod
    def from_ref(cls, ref: str) -> OciLayoutSource:
        """An ``oci:`` reference without its transport: ``DIR[:TAG]``."""
        path, tag = parse_layout_ref(ref)
        return cls.open(path, tag)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OciLayoutSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files ---------------------------------------------------------------------------

    def _open(self, parts: list[str], what: str) -> int:
        """The regular file ``parts`` names beneath the layout; no symlinks."""
        if self._fd < 0:
            raise LayoutError(f"{self.name} is closed")
        fd = self._fd
        opened: list[int] = []
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                try:
                    fd = os.open(part, _FILE if last else _DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise LayoutError(
                            f"{self.name}: {'/'.join(parts[: i + 1])} is a symlink or not "
                            f"a directory; {what} must be below the layout itself"
                        ) from None
                    if exc.errno == errno.ENOENT:
                        raise LayoutError(
                            f"{self.name} has no {what} ({'/'.join(parts)})", errno=exc.errno
                        ) from None
                    raise LayoutError(
                        f"{self.name}: cannot open {'/'.join(parts)}: {os_error_text(exc)}",
                        errno=exc.errno,
                    ) from exc
                opened.append(fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise LayoutError(f"{self.name}: {'/'.join(parts)} is not a regular file")
            os.set_blocking(fd, True)
            opened.pop()
            return fd
        finally:
            for other in opened:
                os.close(other)

    def _read(self, parts: list[str], what: str) -> bytes:
        fd = self._open(parts, what)
        try:
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
                data = fh.read(JSON_MAX + 1)
        except OSError as exc:
            raise LayoutError(
                f"{self.name}: cannot read {what}: {os_error_text(exc)}", errno=exc.errno
            ) from exc
        finally:
            os.close(fd)
        if len(data) > JSON_MAX:
            raise LayoutError(f"{self.name}: {what} is larger than {JSON_MAX} bytes")
        return data

    @staticmethod
    def _blob_path(digest: str) -> list[str]:
        # Only check_digest-ed digests get here: "<alg>:<lowercase hex>".
        algorithm, _, hexed = digest.partition(":")
        return ["blobs", algorithm, hexed]

    def _read_blob(self, desc: Descriptor, what: str) -> bytes:
        if desc.size > JSON_MAX:
            raise LayoutError(f"{self.name}: {what} {desc.digest} is larger than {JSON_MAX} bytes")
        data = self._read(self._blob_path(desc.digest), f"{what} {desc.digest}")
        check_blob(data, desc.digest, desc.size, what)
        return data

    # -- the image -----------------------------------------------------------------------

    def _index_entries(self, index: dict[str, Any], what: str) -> list[tuple[Descriptor, Any]]:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise LayoutError(f"{self.name}: {what} has no manifest list")
        out = []
        for i, entry in enumerate(entries):
            try:
                desc = parse_descriptor(entry, f"{self.name}: {what} entry {i}")
            except ManifestFormatError as exc:
                raise LayoutError(str(exc)) from None
            out.append((desc, entry))
        return out

    def _platform_ok(self, entry: Any) -> bool | None:
        """None: the entry names no platform; else whether it is ours."""
        found = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(found, dict):
            return None
        return (found.get("os"), found.get("architecture")) == self.platform

    def _select(
        self, entries: list[tuple[Descriptor, Any]], depth: int, foreign: list[str]
    ) -> list[Descriptor]:
        """The manifests of ``entries`` for our platform, indexes followed."""
        out: list[Descriptor] = []
        for desc, entry in entries:
            if desc.media_type in INDEX_MEDIA_TYPES:
                if depth >= _INDEX_DEPTH:
                    raise LayoutError(f"{self.name}: indexes nest deeper than {_INDEX_DEPTH}")
                nested = json_object(
                    self._read_blob(desc, "index"), f"index {desc.digest}", LayoutError, JSON_MAX
                )
                out += self._select(
                    self._index_entries(nested, f"index {desc.digest}"), depth + 1, foreign
                )
                continue
            ours = self._platform_ok(entry)
            if ours is False:
                plat = entry["platform"]
                foreign.append(f"{plat.get('os')}/{plat.get('architecture')}")
                continue
            out.append(desc)
        return out

    def _resolve(self) -> Descriptor:
        self._read(["oci-layout"], "oci-layout file")
        index = json_object(
            self._read(["index.json"], "index.json"), "index.json", LayoutError, JSON_MAX
        )
        entries = self._index_entries(index, "index.json")
        if self.tag is not None:
            entries = [
                (desc, entry)
                for desc, entry in entries
                if isinstance(entry.get("annotations"), dict)
                and entry["annotations"].get(REF_NAME) == self.tag
            ]
            if not entries:
                raise TagNotFoundError(f"{self.name} has no image tagged {self.tag!r}")
        foreign: list[str] = []
        found = self._select(entries, 0, foreign)
        wanted = "/".join(self.platform)
        if not found:
            if foreign:
                others = ", ".join(sorted(set(foreign)))
                raise PlatformError(f"{self.name}: no manifest for {wanted}, only for {others}")
            raise TagNotFoundError(f"{self.name} has no image")
        if self.tag is None and len(found) > 1:
            raise LayoutError(
                f"{self.name} holds {len(found)} images for {wanted}: name one with :TAG"
            )
        return found[0]

    # -- ImageSource -----------------------------------------------------------------------

    def fetch_manifest(self) -> tuple[str, bytes]:
        if self._manifest is None:
            desc = self._resolve()
            self._manifest = (desc.digest, self._read_blob(desc, "manifest"))
        return self._manifest

    def fetch_config(self, digest: str, size: int) -> bytes:
        return self._read_blob(self._descriptor(digest, size), "config")

    def _descriptor(self, digest: str, size: int) -> Descriptor:
        try:
            return parse_descriptor({"mediaType": "", "digest": digest, "size": size}, "a blob")
        except ManifestFormatError as exc:
            raise LayoutError(f"{self.name}: {exc}") from None

    @contextlib.contextmanager
    def open_blob(self, digest: str, size: int) -> Iterator[BinaryIO]:
        desc = self._descriptor(digest, size)
        fd = self._open(self._blob_path(desc.digest), f"blob {desc.digest}")
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise BlobDigestError(
                    f"{self.name}: blob {digest} is {actual} bytes, not {size}", digest=digest
                )
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
                yield fh
        finally:
            os.close(fd)
