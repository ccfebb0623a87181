"""The active composefs mounts, read from /proc/self/mountinfo.

A composefs mount is an overlayfs whose source is ``composefs`` (C
``mount.composefs``) or ``composefs:<name>`` (composefs-rs and us). We name our
mounts by the image's hex digest, so the digest comes straight from the source;
that is how a restarted daemon finds which images are still mounted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "ComposefsMount",
    "MountEntry",
    "composefs_mount_at",
    "composefs_mount_with_id",
    "composefs_mounts",
    "list_composefs_mounts",
    "mount_of",
    "parse_mountinfo",
]

_OCTAL = re.compile(r"\\([0-7]{3})")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}|[0-9a-f]{128}")


def _unescape(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash (and, in overlay's
    # options, commas and '=') as \ooo.
    if "\\" not in field_text:
        return field_text
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field_text)


@dataclass(slots=True, frozen=True)
class MountEntry:
    """One line of mountinfo, unescaped."""

    mount_id: int
    parent_id: int
    root: str
    mountpoint: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class ComposefsMount:
    """An active composefs mount."""

    mount_id: int
    mountpoint: str
    source: str
    #: The name after ``composefs:`` (empty for C's plain ``composefs`` source).
    name: str
    #: The image's hex digest when the name is one, else None.
    digest: str | None
    read_only: bool
    #: overlayfs ``verity=`` (``off`` when the option is absent).
    verity: str
    datadirs: tuple[str, ...] = field(default=())
    upperdir: str | None = None


def parse_mountinfo(text: str) -> Iterator[MountEntry]:
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            yield MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                mount_options=tuple(fields[5].split(",")),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                # Option values escape commas as \054, so raw commas only separate.
                super_options=tuple(_unescape(o) for o in fields[sep + 3].split(",")),
            )
        except (ValueError, IndexError):
            continue


def _composefs(entry: MountEntry) -> ComposefsMount | None:
    if entry.fstype != "overlay":
        return None
    if entry.source == "composefs":
        name = ""
    elif entry.source.startswith("composefs:"):
        name = entry.source[len("composefs:") :]
    else:
        return None
    verity = "off"
    datadirs: list[str] = []
    upperdir = None
    for opt in entry.super_options:
        key, _, value = opt.partition("=")
        if key == "verity":
            verity = value
        elif key == "datadir+":
            datadirs.append(value)
        elif key == "lowerdir":
            # String form: "erofs::data1::data2".
            datadirs.extend(p for p in value.split("::")[1:] if p)
        elif key == "upperdir":
            upperdir = value
    return ComposefsMount(
        mount_id=entry.mount_id,
        mountpoint=entry.mountpoint,
        source=entry.source,
        name=name,
        digest=name if _HEX_DIGEST.fullmatch(name) else None,
        read_only="ro" in entry.mount_options,
        verity=verity,
        datadirs=tuple(datadirs),
        upperdir=upperdir,
    )


def composefs_mount_at(
    mountpoint: str, path: str = "/proc/self/mountinfo"
) -> ComposefsMount | None:
    """The topmost mount at ``mountpoint`` (the last one listed there) if it is a
    composefs mount; None if nothing or something else is mounted on top."""
    top = None
    for entry in parse_mountinfo(_read(path)):
        if entry.mountpoint == mountpoint:
            top = entry
    return None if top is None else _composefs(top)


def composefs_mount_with_id(
    mount_id: int, path: str = "/proc/self/mountinfo"
) -> ComposefsMount | None:
    """The mount with mountinfo's ``mount_id`` if it is a composefs mount; None if
    there is none or it is something else."""
    for entry in parse_mountinfo(_read(path)):
        if entry.mount_id == mount_id:
            return _composefs(entry)
    return None


def composefs_mounts(entries: Iterable[MountEntry]) -> list[ComposefsMount]:
    """The composefs mounts among ``entries``, in their order."""
    return [m for e in entries if (m := _composefs(e)) is not None]


def list_composefs_mounts(path: str = "/proc/self/mountinfo") -> list[ComposefsMount]:
    """Every composefs mount visible in this mount namespace, in mount order."""
    return composefs_mounts(parse_mountinfo(_read(path)))


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def mount_of(path: str, mountinfo: str = "/proc/self/mountinfo") -> MountEntry | None:
    """The mount ``path`` (absolute, symlinks resolved) is on: the last-mounted
    entry with the longest mount point that contains it; None if mountinfo cannot
    be read."""
    try:
        entries = list(parse_mountinfo(_read(mountinfo)))
    except OSError:
        return None
    best: MountEntry | None = None
    for entry in entries:
        point = entry.mountpoint
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mountpoint)):
            best = entry
    return best
