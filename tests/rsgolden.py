"""composefs-rs golden data (``testdata/composefs-rs`` of the shared directory), the
one home for every test that reads it: its paths, its JSON files and images (read
once, cached: callers must not modify what they get), its cfsctl-written
repositories unpacked, the commands recorded on them, its trees extracted by the
data's own extractor (the session fixture ``rs_trees`` in conftest.py does that
once), and a repository listed the way the generator listed it
(``gen/common.py: list_tree``)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
from functools import cache
from pathlib import Path
from typing import Any

from composefsd.image.formats import ErofsVersion
from composefsd.image.reader import iter_objects
from composefsd.image.transforms import CFSCTL_DEFAULT, Transform, XattrFilter
from composefsd.image.tree import Node
from conftest import SHARED

RS = SHARED / "testdata" / "composefs-rs"
EXPECTED = RS / "expected"
EXPECTED_REPOS = EXPECTED / "repos"
ALGORITHMS = ("sha256", "sha512")
#: The golden trees, ``inputs/trees/<name>.tar.gz``.
TREES = ("t1-basic", "t2-special", "t3-xattrs", "t4-names", "t5-big", "t6-rootfs")

#: cfsctl's flags, as trees.json names them, and the transform with their effect.
VARIANTS: dict[str, Transform] = {
    "default": CFSCTL_DEFAULT,
    "no-propagate-usr-to-root": Transform(),
    "keep-user-xattrs": Transform(True, XattrFilter.KEEP_USER_XATTRS),
    "bootable": Transform(True, XattrFilter.ALLOWLIST_ONLY, True),
    "bootable+keep-user-xattrs": Transform(True, XattrFilter.KEEP_USER_XATTRS, True),
}
#: trees.json's erofs_version -> the format (``default(1)``: no --erofs-version).
VERSIONS = {
    "0": ErofsVersion.V0,
    "1": ErofsVersion.V1,
    "2": ErofsVersion.V2,
    "default(1)": ErofsVersion.V1,
}

_GC_LINE = re.compile(r"Objects: (\d+) removed \((\d+) bytes\)")
_PRUNED_LINE = re.compile(r"Pruned symlinks: (\d+) images, (\d+) streams")


@cache
def read_json(rel: str) -> Any:
    """The JSON file ``rel`` of the golden data, parsed once."""
    return json.loads((RS / rel).read_text())


def trees_json() -> dict[str, Any]:
    """``expected/trees.json``'s trees: what cfsctl printed and wrote for each."""
    trees: dict[str, Any] = read_json("expected/trees.json")["trees"]
    return trees


@cache
def golden_image(rel: str) -> bytes:
    """The gzipped image ``rel`` of the golden data, decompressed once."""
    return gzip.decompress((RS / rel).read_bytes())


def repo_tar(algorithm: str) -> Path:
    """``repos/repo-<algorithm>.tar.gz``: the cfsctl-written repository."""
    return RS / "repos" / f"repo-{algorithm}.tar.gz"


def unpack_repo(algorithm: str, dest: Path) -> Path:
    """Unpack ``repos/repo-<algorithm>.tar.gz`` into ``dest``; its repository's path."""
    with tarfile.open(repo_tar(algorithm)) as tar:
        tar.extractall(dest, filter="tar")
    return dest / f"repo-{algorithm}"


def unpack_trees(dest: Path) -> Path:
    """Every golden tree extracted exactly by the data's own ``gen/extract.py``
    into ``dest/<tree>`` (needs root: the trees hold devices and other owners).
    Tests take the session fixture ``rs_trees`` rather than calling this."""
    assert os.geteuid() == 0, "the golden trees hold devices and other owners: run as root"
    for name in TREES:
        subprocess.run(
            [
                sys.executable,
                str(RS / "gen" / "extract.py"),
                str(RS / "inputs" / "trees" / f"{name}.tar.gz"),
                str(dest / name),
            ],
            check=True,
        )
    return dest


def commands(algorithm: str) -> list[dict[str, Any]]:
    """The cfsctl commands recorded on the repository and its copy, in order."""
    recorded: list[dict[str, Any]] = read_json(f"expected/repos/repo-{algorithm}.commands.json")
    return [c for c in recorded if "command" in c]


def runs_of(algorithm: str, command: str) -> list[dict[str, Any]]:
    """Every recorded run of ``command`` (as recorded: ``cfsctl --repo $REPO ...``)."""
    return [c for c in commands(algorithm) if c["command"] == command]


def stdout_of(algorithm: str, command: str) -> str:
    """What the one recorded run of ``command`` printed; it must have succeeded."""
    (found,) = runs_of(algorithm, command)
    assert found["exit"] == 0
    return str(found["stdout"])


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


def image_objects(root: Node, hash_name: str) -> list[str]:
    """``cfsctl image-objects`` of an image whose tree is ``root``: the objects its
    files name, ``<alg>:<hex>``, sorted."""
    return sorted(f"{hash_name}:{p.replace(b'/', b'').decode()}" for p in iter_objects(root))


def listed_objects(lines: list[str]) -> set[str]:
    """The objects (hex digests) a listing holds."""
    found = (re.match(r"f objects/(\w\w)/(\w+) ", line) for line in lines)
    return {m.group(1) + m.group(2) for m in found if m}


def expected_listing(name: str) -> list[str]:
    """``expected/repos/<name>`` (e.g. ``repo-sha256.after-gc.listing.txt``)."""
    return (EXPECTED_REPOS / name).read_text().splitlines()
