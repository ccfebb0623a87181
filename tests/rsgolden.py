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
import shutil
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from composefsd.fsverity import digest_bytes
from composefsd.image.escape import unescape
from composefsd.image.formats import ErofsVersion
from composefsd.image.reader import iter_objects
from composefsd.image.transforms import CFSCTL_DEFAULT, Transform, XattrFilter
from composefsd.image.tree import Node
from composefsd.repository import Repository, oci
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


# -- bootc's repository ------------------------------------------------------------------

#: bootc tags the manifest of each image it deploys ``localhost/bootc-<manifest digest>``
#: (``tag_image``), stored percent-encoded below ``streams/refs/oci``.
BOOTC_TAG_PREFIX = "localhost/bootc-"
#: The golden tags whose images the bootc repository deploys: ``single`` is an
#: image bootc has untagged (a deployment removed), so what it alone kept is the
#: garbage a bootc GC finds; ``multi:v2`` names ``multi``'s manifest again.
BOOTC_DEPLOYED = ("boot", "boot-t1", "multi", "shared")
#: cfsctl's listing of the golden repository with exactly the bootc repository's
#: roots (tags of BOOTC_DEPLOYED's manifests, no images/refs, the import-layer
#: stream refs) after ``cfsctl gc``.
BOOTC_AFTER_GC = "repo-sha512.after-unref-images-gc.listing.txt"


def bootc_tag(manifest_digest: str) -> str:
    """The tag bootc gives an image it pulls: ``localhost/bootc-sha256:<hex>``."""
    return BOOTC_TAG_PREFIX + manifest_digest


def _bootc_link_name(target: str) -> str:
    """A tag link's file name for the manifest stream ``target`` names, as
    composefs-rs's ``encode_tag`` writes it."""
    digest = target.rsplit("/", 1)[-1].removeprefix("oci-manifest-")
    return bootc_tag(digest).replace("%", "%25").replace("/", "%2F")


def bootc_repository(root: Path) -> Path:
    """The golden SHA-512 repository laid out as bootc lays it, at ``root/composefs``
    (mode 0700): the OCI tags replaced by one bootc tag per deployed manifest, and no
    ``images/refs`` (bootc makes none: a config stream's ``composefs.image.v1``
    keeps its EROFS image). Kept as cfsctl wrote them: meta.json, every object,
    stream and ``images/`` link (those of the untagged image and of the
    create-image images are garbage a GC removes), and the two ``oci
    import-layer`` stream refs, composefs-rs roots a tool sharing the repository
    may make, which composefsd must keep as well. The result's after-GC state is
    then cfsctl's recorded :data:`BOOTC_AFTER_GC`."""
    root.mkdir(parents=True, exist_ok=True)
    repo = unpack_repo("sha512", root).rename(root / "composefs")
    repo.chmod(0o700)
    tags = repo / "streams" / "refs" / "oci"
    for tag in sorted(os.listdir(tags)):
        target = os.readlink(tags / tag)
        os.unlink(tags / tag)
        if tag in BOOTC_DEPLOYED:
            (tags / _bootc_link_name(target)).symlink_to(target)
    shutil.rmtree(repo / "images" / "refs")
    return repo


def bootc_listing(lines: list[str]) -> list[str]:
    """A golden listing of the SHA-512 repository as the bootc repository would show
    it: each tag line as bootc's tag of the same manifest (once per manifest),
    ``images/refs`` left out."""
    out: dict[str, str] = {}
    for line in lines:
        path = line.split(" ", 2)[1]
        if path.startswith("images/refs"):
            continue
        if path.startswith("streams/refs/oci/"):
            target = line.partition(" -> ")[2]
            path = f"streams/refs/oci/{_bootc_link_name(target)}"
            line = f"l {path} -> {target}"
        out[path] = line
    return [out[path] for path in sorted(out)]


def settled_listing(repo: Path, before: list[str]) -> list[str]:
    """``repo``'s listing without the directories composefsd may add beside
    composefs-rs's files once they are empty again: ``images/refs`` (made at open)
    and the ``objects/XX`` of objects it wrote and collected; nor composefsd's own
    ``cache/`` (Verify's object lists, digest caches), which composefs-rs never
    reads. Any other line not in ``before`` stays in, and such a directory must
    be empty."""
    out = []
    for line in listing(repo):
        kind, path = line.split(" ", 2)[:2]
        if path == "cache" or path.startswith("cache/"):
            continue
        if line not in before and kind == "d":
            assert path == "images/refs" or path.startswith("objects/"), line
            assert not os.listdir(repo / path), line
            continue
        out.append(line)
    return out


#: What cfsctl printed for each OCI image's tree (``cfsctl oci dump``, fresh pulls
#: of the same layout into a SHA-512 repository), by golden tag.
OCI_DUMPS = EXPECTED / "oci" / "sha512" / "images"


@dataclass(frozen=True, slots=True)
class Deployment:
    """One EROFS image an OCI tag of the bootc repository owns."""

    tag: str
    #: The config stream's named ref that names it (``composefs.image.v1``, ...).
    key: str
    digest: str
    #: The golden dumpfile of its tree.
    dump: Path


def bootc_deployments(repo: Path) -> list[Deployment]:
    """The images the bootc tags own, by tag and key, each with its golden dump
    (``boot`` was pulled --bootable: its config also names the bootable image)."""
    with open(RS / "inputs" / "oci" / "MANIFEST.json") as fh:
        golden = {i["manifest_digest"]: i["tag"] for i in json.load(fh)["images"]}
    out = []
    for tag, image in oci.list_images(Repository.open(repo)):
        for key, digest in sorted(image.images.items()):
            name = "dump.bootable.txt" if key.startswith(oci.BOOT_IMAGE_REF_KEY) else "dump.txt"
            dump = OCI_DUMPS / golden[image.manifest_digest] / name
            out.append(Deployment(tag, key, digest, dump))
    return out


def check_tree(mnt: Path, dump: Path) -> int:
    """Every entry of a golden SHA-512 dump read through the mount ``mnt``: type,
    mode, owner, size, symlink target, hardlinks, and each file's content (inline
    bytes, or its fs-verity digest for an external file). Returns the number of
    regular files read."""
    read = 0
    for line in dump.read_bytes().splitlines():
        fields = line.split(b" ")
        path = mnt / os.fsdecode(unescape(fields[0])).lstrip("/")
        st = os.lstat(path)
        if fields[2].startswith(b"@"):  # a hardlink: the same inode as its target
            target = mnt / os.fsdecode(unescape(fields[8])).lstrip("/")
            assert os.lstat(target).st_ino == st.st_ino, path
            continue
        size, mode, _nlink, uid, gid, rdev = (
            int(f, 8 if i == 1 else 10) for i, f in enumerate(fields[1:7])
        )
        if stat.S_ISCHR(mode) and rdev == 0:
            # A whiteout shows as an "xattr whiteout" (test_mount._whiteout_view).
            mode = stat.S_IFREG | stat.S_IMODE(mode)
        assert (st.st_mode, st.st_uid, st.st_gid) == (mode, uid, gid), path
        if stat.S_ISLNK(mode):
            assert os.fsencode(os.readlink(path)) == unescape(fields[8]), path
        elif stat.S_ISREG(mode):
            data = path.read_bytes()
            assert len(data) == size, path
            if fields[8] != b"-":
                assert digest_bytes(data, "sha512").hex() == fields[10].decode(), path
            else:
                assert data == (unescape(fields[9]) if fields[9] != b"-" else b""), path
            read += 1
    return read
