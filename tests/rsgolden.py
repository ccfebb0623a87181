"""composefs-rs golden data (``testdata/composefs-rs`` of the shared directory):
unpack its cfsctl-written repositories, read the commands recorded on them, list a
repository the way the generator listed it (``gen/common.py: list_tree``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
from pathlib import Path
from typing import Any

from conftest import SHARED

RS = SHARED / "testdata" / "composefs-rs"
EXPECTED_REPOS = RS / "expected" / "repos"
ALGORITHMS = ("sha256", "sha512")

_GC_LINE = re.compile(r"Objects: (\d+) removed \((\d+) bytes\)")
_PRUNED_LINE = re.compile(r"Pruned symlinks: (\d+) images, (\d+) streams")


def unpack_repo(algorithm: str, dest: Path) -> Path:
    """Unpack ``repos/repo-<algorithm>.tar.gz`` into ``dest``; its repository's path."""
    with tarfile.open(RS / "repos" / f"repo-{algorithm}.tar.gz") as tar:
        tar.extractall(dest, filter="tar")
    return dest / f"repo-{algorithm}"


def commands(algorithm: str) -> list[dict[str, Any]]:
    """The cfsctl commands recorded on the repository and its copy, in order."""
    with open(EXPECTED_REPOS / f"repo-{algorithm}.commands.json") as fh:
        recorded: list[dict[str, Any]] = json.load(fh)
    return [c for c in recorded if "command" in c]


def gc_counts(stdout: str) -> tuple[int, int, tuple[int, int] | None]:
    """(objects, bytes, (images pruned, streams pruned) or None) of ``cfsctl gc``."""
    m = _GC_LINE.search(stdout)
    assert m is not None, stdout
    p = _PRUNED_LINE.search(stdout)
    pruned = (int(p.group(1)), int(p.group(2))) if p else None
    return int(m.group(1)), int(m.group(2)), pruned


def listing(root: Path) -> list[str]:
    """The generator's listing lines of ``root`` (sorted paths; files with size,
    mode and sha256, symlinks with their targets, directories)."""
    lines: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rp = name if rel == "." else os.path.join(rel, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                lines.append((rp, f"l {rp} -> {os.readlink(path)}"))
            elif stat.S_ISDIR(st.st_mode):
                lines.append((rp, f"d {rp}"))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                mode = f"{stat.S_IMODE(st.st_mode):o}"
                lines.append((rp, f"f {rp} size={st.st_size} mode={mode} sha256={digest}"))
            else:
                lines.append((rp, f"? {rp}"))
    return [line for _, line in sorted(lines)]


def expected_listing(name: str) -> list[str]:
    """``expected/repos/<name>`` (e.g. ``repo-sha256.after-gc.listing.txt``)."""
    return (EXPECTED_REPOS / name).read_text().splitlines()
