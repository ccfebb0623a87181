"""A multi-layer OCI image built here, unpacked by ``umoci unpack`` and built into a
composefs image by composefsd (repository.ocibuild): the mounted image equals
umoci's rootfs, but for the exact differences composefs-rs makes on purpose."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import treecompare
from composefsd.fsverity import digest_bytes
from composefsd.image.formats import write_format
from composefsd.kernel.mount import unmount
from composefsd.kernel.repomount import mount_repository_image
from composefsd.repository import Repository
from composefsd.repository.images import link_image
from composefsd.repository.oci import open_image
from composefsd.repository.ocibuild import build_tree, ensure_image
from servicehelpers import unmount_below
from test_oci_build import Documents, image_of_layers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="umoci unpack and mounts need root")

MTIME = 1_700_000_000
LONG_DIR = "/".join(["deep" + "d" * 56] * 5)  # a path of more than 255 bytes
LONG_NAME = "n" * 150  # a name of more than 100 bytes


def _info(name: str | bytes, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(os.fsdecode(name))
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = MTIME
    for key, value in kw.items():
        setattr(info, key, value)
    return info


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return out.getvalue()


def _layers() -> list[bytes]:
    d = tarfile.DIRTYPE
    big = bytes(range(256)) * 40
    xattr = _info("usr/bin/tool", mode=0o755)
    xattr.pax_headers = {
        "SCHILY.xattr.user.note": "hello",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00" + "\0" * 12,
        "mtime": f"{MTIME}.123456789",
    }
    owned = _info("srv/owned", uid=3_000_000, gid=4_000_000)
    dirs = [_info("/".join(LONG_DIR.split("/")[: i + 1]), d) for i in range(5)]
    l1 = _tar(
        [
            (_info("./", d), b""),
            (_info("usr", d), b""),
            (_info("usr/bin", d), b""),
            (xattr, b"tool"),
            (_info("usr/bin/big", mode=0o755), big),
            (_info("etc", d), b""),
            (_info("etc/keep"), b"keep v1"),
            (_info("etc/gone"), b"gone"),
            (_info("etc/src"), b"source v1, long enough to be an object: " + b"s" * 64),
            (_info("opq", d), b""),
            (_info("opq/old"), b"old"),
            (_info("opq/olddir", d), b""),
            (_info("opq/olddir/x"), b"x"),
            (_info("thing"), b"a file"),
            (_info("data", d), b""),
            (_info("data/inner"), b"inner"),
            (_info("dev", d), b""),
            (_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), b""),
            (_info("dev/loop0", tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o660), b""),
            (_info("dev/fifo", tarfile.FIFOTYPE), b""),
            (_info("srv", d), b""),
            (owned, b"owned"),
            *[(x, b"") for x in dirs],
            (_info(f"{LONG_DIR}/{LONG_NAME}"), b"long"),
            (_info("srv/sym", tarfile.SYMTYPE, linkname="../" + LONG_DIR + "/" + LONG_NAME), b""),
        ],
        tarfile.PAX_FORMAT,
    )
    l2 = _tar(
        [
            (_info("etc", d), b""),
            (_info("etc/.wh.gone"), b""),
            (_info(".wh.nonexistent"), b""),
            (_info("opq", d, mode=0o700), b""),
            (_info("opq/.wh..wh..opq"), b""),
            (_info("opq/new"), b"new"),
            (_info("link", tarfile.LNKTYPE, linkname="etc/src"), b""),
            (_info("etc/src"), b"source v2"),
            (_info("thing", d), b""),
            (_info("thing/x"), b"x"),
            (_info(".wh.data"), b""),
            (_info("data"), b"now a file"),
            (_info("srv", d), b""),
            (_info("srv/" + LONG_NAME, tarfile.LNKTYPE, linkname=f"{LONG_DIR}/{LONG_NAME}"), b""),
            (_info(b"srv/caf\xe9-\xff"), b"not utf-8"),
        ],
        tarfile.GNU_FORMAT,
    )
    l3 = _tar(
        [
            (_info("etc", d), b""),
            (_info("etc/keep"), b"keep v3"),
            (_info(".wh.thing"), b""),
            (_info("thing"), b"a file again"),
            (_info("usr", d, mode=0o750, mtime=MTIME + 5), b""),
        ],
        tarfile.USTAR_FORMAT,
    )
    return [l1, l2, l3]


def _layout(root: Path, docs: Documents, tag: str) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for data in (*docs.layers, docs.config, docs.manifest):
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": docs.manifest_digest,
                "size": len(docs.manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))


@pytest.fixture
def built(tmp_path: Path) -> Iterator[tuple[Repository, Documents, Path]]:
    umoci = shutil.which("umoci")
    assert umoci is not None, "umoci is not installed (run-tests installs it)"
    repo = Repository.init(tmp_path / "repo", algorithm="fsverity-sha256-12", verity="disabled")
    docs = image_of_layers(repo, _layers())
    _layout(tmp_path / "layout", docs, "test")
    bundle = tmp_path / "bundle"
    subprocess.run(
        [umoci, "unpack", "--image", f"{tmp_path / 'layout'}:test", str(bundle)],
        check=True,
        capture_output=True,
    )
    try:
        yield repo, docs, bundle / "rootfs"
    finally:
        unmount_below(tmp_path)


def _xattrs(name: bytes) -> bool:
    return name.startswith(b"user.") or name == b"security.capability"


def _umocis(rootfs: Path) -> dict[bytes, treecompare.Entry]:
    """umoci's rootfs, but for the one difference composefs-rs always makes: a
    symlink keeps the mode its tar header gives (here 0644), where the symlinks
    umoci makes are 0777 as every Linux symlink."""
    snap = treecompare.snapshot(rootfs, _xattrs)
    assert snap[b"/srv/sym"].mode == 0o777
    snap[b"/srv/sym"] = dataclasses.replace(snap[b"/srv/sym"], mode=0o644)
    return snap


#: Paths whose inodes are compared: a hardlink across layers to a long name, and
#: one whose source a later entry replaced (it keeps the old inode).
LINKED = (f"{LONG_DIR}/{LONG_NAME}", f"srv/{LONG_NAME}", "link", "etc/src")


def _inodes(root: Path) -> list[int]:
    """Which of :data:`LINKED` share an inode: each one's index of its first path."""
    inos = [os.lstat(root / p).st_ino for p in LINKED]
    return [inos.index(i) for i in inos]


def _mounted(
    repo: Repository, hexdigest: str, where: Path
) -> tuple[dict[bytes, treecompare.Entry], list[int]]:
    where.mkdir()
    with mount_repository_image(repo, hexdigest) as dm:
        dm.attach(where)
    try:
        return treecompare.snapshot(where, _xattrs), _inodes(where)
    finally:
        unmount(where)


def default_transformed(theirs: dict[bytes, treecompare.Entry]) -> dict[bytes, treecompare.Entry]:
    """umoci's rootfs as cfsctl's default transform makes it (see
    test_default_image_differs_from_umoci_as_composefs_rs_says)."""
    usr = theirs[b"/usr"]
    expected = {
        path: dataclasses.replace(
            entry, xattrs=tuple((k, v) for k, v in entry.xattrs if k == b"security.capability")
        )
        for path, entry in theirs.items()
    }
    expected[b"/"] = dataclasses.replace(
        expected[b"/"], mode=usr.mode, uid=usr.uid, gid=usr.gid, mtime_ns=usr.mtime_ns
    )
    return expected


def test_untransformed_image_is_umocis_rootfs(
    built: tuple[Repository, Documents, Path], tmp_path: Path
) -> None:
    repo, docs, rootfs = built
    with repo.object_store() as store:
        root = build_tree(repo, store, open_image(repo, store, docs.manifest_digest))
        data = write_format(root, repo.erofs_version)
        hexdigest = digest_bytes(data, repo.hash_algorithm).hex()
        assert store.store_bytes(data).digest == hexdigest
    link_image(repo, hexdigest)
    ours, links = _mounted(repo, hexdigest, tmp_path / "mnt")
    theirs = _umocis(rootfs)
    problems = treecompare.diff(theirs, ours)
    assert not problems, "\n".join(problems)
    assert b"/srv/caf\xe9-\xff" in ours and b"/opq/old" not in ours and b"/data" in ours
    assert links == _inodes(rootfs) == [0, 0, 2, 3]


def test_default_image_differs_from_umoci_as_composefs_rs_says(
    built: tuple[Repository, Documents, Path], tmp_path: Path
) -> None:
    """``ensure_image``'s image (cfsctl's default transform): the root takes /usr's
    mode, owner and mtime, and xattrs but security.capability are dropped; nothing
    else differs (this image has no /run)."""
    repo, docs, rootfs = built
    hexdigest = ensure_image(repo, docs.manifest_digest, tag="t")
    assert hexdigest is not None
    ours, links = _mounted(repo, hexdigest, tmp_path / "mnt")
    assert links == [0, 0, 2, 3]
    theirs = _umocis(rootfs)
    problems = treecompare.diff(default_transformed(theirs), ours)
    assert not problems, "\n".join(problems)
    assert ours[b"/usr/bin/tool"].xattrs == theirs[b"/usr/bin/tool"].xattrs[:1]
