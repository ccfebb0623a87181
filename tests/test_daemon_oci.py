"""io.composefs.Oci through a real composefsd, on the repositories composefs-rs wrote
(golden data): ListImages and Inspect as the repository holds the images (the ids
cfsctl oci inspect printed), Tag and Untag written as cfsctl writes them, Mount by
tag (a real mount whose tree is cfsctl's dump of the image), authorization of an
unprivileged peer, and hostile names refused with typed errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import users
from composefsd.repository import Repository
from composefsd.repository import oci as repo_oci
from composefsd.service import client
from composefsd.service.client import Connection, VarlinkCallError
from composefsd.service.context import Peer
from composefsd.service.daemon import HEAVY_METHODS, Authorization
from conftest import TestUsers
from rsgolden import ALGORITHMS, EXPECTED, OCI_DUMPS, RS, check_tree, unpack_repo
from servicehelpers import Daemon, running_daemon, unmount_below

OCI = "io.composefs.Oci"
REPOSITORY = "io.composefs.Repository"
#: The tags of the golden repositories (``multi:v2`` names multi's manifest again).
GOLDEN_TAGS = ["boot", "boot-t1", "multi", "multi:v2", "shared", "single"]


def _golden_manifests() -> dict[str, str]:
    with open(RS / "inputs" / "oci" / "MANIFEST.json") as fh:
        return {i["tag"]: i["manifest_digest"] for i in json.load(fh)["images"]}


def _inspected(algorithm: str, tag: str) -> dict[str, Any]:
    """What ``cfsctl oci inspect TAG`` printed after a fresh pull of the golden layout."""
    with open(EXPECTED / "oci" / algorithm / "images" / tag / "inspect.json") as fh:
        doc: dict[str, Any] = json.load(fh)
    return doc


def call(conn: Connection, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return dict(conn.call(f"{OCI}.{method}", params or {}))


def refused(conn: Connection, method: str, params: dict[str, Any]) -> VarlinkCallError:
    with pytest.raises(VarlinkCallError) as info:
        conn.call(f"{OCI}.{method}", params)
    return info.value


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Daemon, Connection]]:
    """The sha256 golden repository, served."""
    path = unpack_repo("sha256", tmp_path)
    with running_daemon(path) as d, client.connect(d.address) as conn:
        yield path, d, conn
    unmount_below(tmp_path)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_list_images_and_inspect(tmp_path: Path, algorithm: str) -> None:
    path = unpack_repo(algorithm, tmp_path)
    manifests = _golden_manifests()
    with running_daemon(path) as d, client.connect(d.address) as conn:
        images = call(conn, "ListImages")["images"]
        assert [i["tag"] for i in images] == GOLDEN_TAGS
        for entry in images:
            golden = entry["tag"].partition(":")[0]
            assert entry["manifestDigest"] == manifests[golden]
            inspected = _inspected(algorithm, golden)
            manifest = json.loads(inspected["manifest"])
            config = json.loads(inspected["config"])
            assert entry["configDigest"] == manifest["config"]["digest"]
            assert entry["imageId"] == inspected["composefs_erofs"]
            assert entry["layers"] == config["rootfs"]["diff_ids"]
            assert entry["size"] == sum(layer["size"] for layer in manifest["layers"])
            assert (entry["architecture"], entry["os"]) == ("amd64", "linux")
            assert entry["created"] == config["created"]

            by_tag = call(conn, "Inspect", {"image": entry["tag"]})
            by_digest = call(conn, "Inspect", {"image": "@" + entry["manifestDigest"]})
            assert by_tag == by_digest
            assert by_tag["manifest"] == manifest and by_tag["config"] == config
            assert by_tag["manifestDigest"] == entry["manifestDigest"]
            assert by_tag["imageId"] == inspected["composefs_erofs"]
            assert by_tag["images"] == {
                k: v for k, v in by_tag["images"].items() if k.startswith("composefs.image")
            }
            assert inspected["composefs_erofs"] in by_tag["images"].values()
        # boot was pulled --bootable into the tarred repositories: both images are named.
        boot = call(conn, "Inspect", {"image": "boot"})["images"]
        assert set(boot) == {repo_oci.IMAGE_REF_KEY_V1, repo_oci.BOOT_IMAGE_REF_KEY_V1}
        # The library's view of the same repository.
        repo = Repository.open(path)
        assert [(t, i.manifest_digest) for t, i in repo_oci.list_images(repo)] == [
            (i["tag"], i["manifestDigest"]) for i in images
        ]
    assert d.stop() == 0


def test_empty_repository(daemon: Daemon) -> None:
    with client.connect(daemon.address) as conn:
        assert call(conn, "ListImages") == {"images": []}
        err = refused(conn, "Inspect", {"image": "nothing"})
        assert (err.name, err.parameters) == (f"{OCI}.ImageNotFound", {"image": "nothing"})


def test_tag_and_untag(served: tuple[Path, Daemon, Connection]) -> None:
    path, _d, conn = served
    multi = _golden_manifests()["multi"]
    assert call(conn, "Tag", {"image": "multi", "tag": "os/v1"}) == {"manifestDigest": multi}
    # Written as cfsctl oci tag writes it: the tag percent-encoded, a relative link.
    link = path / "streams" / "refs" / "oci" / "os%2Fv1"
    assert os.readlink(link) == f"../../oci-manifest-{multi}"
    assert call(conn, "Inspect", {"image": "os/v1"})["manifestDigest"] == multi
    # By digest, and replacing what a tag named.
    single = _golden_manifests()["single"]
    assert call(conn, "Tag", {"image": "@" + single, "tag": "os/v1"}) == {"manifestDigest": single}
    tags = {i["tag"]: i["manifestDigest"] for i in call(conn, "ListImages")["images"]}
    assert tags["os/v1"] == single and tags["multi"] == multi

    assert call(conn, "Untag", {"tag": "os/v1"}) == {"manifestDigest": single}
    assert not os.path.lexists(link)
    err = refused(conn, "Untag", {"tag": "os/v1"})
    assert (err.name, err.parameters) == (f"{OCI}.ImageNotFound", {"image": "os/v1"})
    # The image stays (other tags, GC) after its last tag goes.
    assert call(conn, "Untag", {"tag": "single"}) == {"manifestDigest": single}
    assert call(conn, "Inspect", {"image": "@" + single})["manifestDigest"] == single
    # A missing image is not tagged.
    err = refused(conn, "Tag", {"image": "@sha256:" + "0" * 64, "tag": "x"})
    assert err.name == f"{OCI}.ImageNotFound"
    assert not (path / "streams" / "refs" / "oci" / "x").exists()


@pytest.mark.parametrize(
    "tag",
    ["", ".", "..", "@x", "a\nb", "tab\there", "del\x7f", "x" * 256, "é" * 200],
)
def test_bad_tags_refused(served: tuple[Path, Daemon, Connection], tag: str) -> None:
    path, _d, conn = served
    before = sorted(os.listdir(path / "streams" / "refs" / "oci"))
    for method, params in (
        ("Tag", {"image": "multi", "tag": tag}),
        ("Untag", {"tag": tag}),
    ):
        err = refused(conn, method, params)
        assert err.name == f"{OCI}.InvalidTag", (method, err)
        assert isinstance(err.parameters["message"], str)
    if tag:  # "" and "@x" are image names of another kind: not a tag, no such digest
        err = refused(conn, "Inspect", {"image": tag})
        assert err.name in (f"{OCI}.InvalidTag", f"{OCI}.ImageNotFound")
    assert sorted(os.listdir(path / "streams" / "refs" / "oci")) == before


def test_hostile_names(served: tuple[Path, Daemon, Connection]) -> None:
    path, _d, conn = served
    # A tag with "/" and ".." is one file name below streams/refs/oci, never a path.
    err = refused(conn, "Inspect", {"image": "../../../etc/passwd"})
    assert err.name == f"{OCI}.ImageNotFound"
    assert call(conn, "Tag", {"image": "multi", "tag": "../../x"})["manifestDigest"]
    assert os.path.islink(path / "streams" / "refs" / "oci" / "..%2F..%2Fx")
    assert not os.path.lexists(path / "streams" / "x")
    assert call(conn, "Untag", {"tag": "../../x"})
    # Digests: only sha256/sha512 hex of the right length.
    for bad in ("@sha256:../../x", "@sha256:" + "A" * 64, "@md5:" + "0" * 32, "@", "@sha256:"):
        err = refused(conn, "Inspect", {"image": bad})
        assert err.name == f"{OCI}.ImageNotFound", bad
    # A huge name is refused without being echoed whole.
    huge = "t" * 200_000
    for method, params in (("Inspect", {"image": huge}), ("Tag", {"image": "multi", "tag": huge})):
        err = refused(conn, method, params)
        assert err.name == f"{OCI}.InvalidTag"
        assert len(json.dumps(err.parameters)) < 2000
    # Wrong types and unknown fields never reach the methods.
    wrong: list[tuple[str, dict[str, Any]]] = [
        ("Inspect", {"image": 1}),
        ("Tag", {"image": "multi"}),
        ("Mount", {"image": "multi", "verity": "sometimes"}),
        ("ListImages", {"all": True}),
    ]
    for method, typed in wrong:
        err = refused(conn, method, typed)
        assert err.name == "org.varlink.service.InvalidParameter", (method, err)


def test_mount_by_tag(served: tuple[Path, Daemon, Connection], tmp_path: Path) -> None:
    _path, d, conn = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    image_id = call(conn, "Inspect", {"image": "multi"})["imageId"]
    reply = call(conn, "Mount", {"image": "multi", "where": str(mnt)})
    assert reply["digest"] == image_id and reply["where"] == str(mnt)
    assert reply["readOnly"] is True and reply["imageCheck"] == "userspace"
    # The tree is the one cfsctl dumped for the image (whiteouts, hardlinks, ...).
    assert check_tree(mnt, OCI_DUMPS / "multi" / "dump.txt") > 0
    # The same mount io.composefs.Repository makes of the id, and its ListMounts sees it.
    mounts = dict(conn.call(f"{REPOSITORY}.ListMounts"))["mounts"]
    assert [m["digest"] for m in mounts if m["where"] == str(mnt)] == [image_id]
    conn.call(f"{REPOSITORY}.Unmount", {"where": str(mnt)})

    # Bootable: the image the boot transform made, by @digest too.
    boot = call(conn, "Inspect", {"image": "boot"})
    boot_id = boot["images"][repo_oci.BOOT_IMAGE_REF_KEY_V1]
    reply = call(
        conn,
        "Mount",
        {"image": "@" + boot["manifestDigest"], "bootable": True, "where": str(mnt)},
    )
    assert reply["digest"] == boot_id
    assert check_tree(mnt, OCI_DUMPS / "boot" / "dump.bootable.txt") > 0
    conn.call(f"{REPOSITORY}.Unmount", {"where": str(mnt)})

    # Without "where": a detached mount fd with the reply, pinned like Repository's.
    reply = conn.call(f"{OCI}.Mount", {"image": "single"})
    fd = reply.take_fd("mountFileDescriptor")
    os.close(fd)
    assert reply["digest"] == call(conn, "Inspect", {"image": "single"})["imageId"]

    err = refused(conn, "Mount", {"image": "multi", "bootable": True, "where": str(mnt)})
    assert err.name == f"{OCI}.ImageNotFound" and "bootable" in err.parameters["message"]
    err = refused(conn, "Mount", {"image": "nope", "where": str(mnt)})
    assert err.name == f"{OCI}.ImageNotFound"
    err = refused(conn, "Mount", {"image": "multi", "where": "relative"})
    assert err.parameters == {"parameter": "where"}
    assert not os.path.ismount(mnt)
    assert "Traceback" not in d.log_text()


def test_mount_of_a_removed_image(served: tuple[Path, Daemon, Connection], tmp_path: Path) -> None:
    """A config naming an image the repository no longer has: Repository's NoSuchImage."""
    path, _d, conn = served
    image_id = call(conn, "Inspect", {"image": "single"})["imageId"]
    os.unlink(path / "images" / image_id)
    err = refused(conn, "Mount", {"image": "single", "where": str(tmp_path)})
    assert err.name == f"{REPOSITORY}.NoSuchImage"


def test_damaged_manifest(served: tuple[Path, Daemon, Connection]) -> None:
    """A tag whose manifest stream is gone, or names no manifest: typed errors, and the
    listing leaves the tag out while the daemon keeps serving."""
    path, _d, conn = served
    oci_refs = path / "streams" / "refs" / "oci"
    (oci_refs / "dangling").symlink_to("../../oci-manifest-sha256:" + "1" * 64)
    (oci_refs / "elsewhere").symlink_to("../../../meta.json")
    err = refused(conn, "Inspect", {"image": "dangling"})
    assert err.name == f"{OCI}.ImageNotFound"
    err = refused(conn, "Inspect", {"image": "elsewhere"})
    assert err.name == f"{OCI}.ImageCorrupt" and err.parameters["image"] == "elsewhere"
    assert [i["tag"] for i in call(conn, "ListImages")["images"]] == GOLDEN_TAGS


# -- authorization ----------------------------------------------------------------------------


def test_authorization_policy() -> None:
    auth = Authorization(daemon_uid=1000, group=50)
    other = Peer(1, 3000, 3000)
    member = Peer(1, 2000, 2000, frozenset({50}))
    for method in ("ListImages", "Inspect"):
        assert auth(other, f"{OCI}.{method}")
    for method in ("Pull", "Tag", "Untag", "Mount"):
        assert not auth(other, f"{OCI}.{method}")
        assert auth(member, f"{OCI}.{method}")
    strict = Authorization(daemon_uid=1000, group=None, restrict_read=True)
    assert not strict(other, f"{OCI}.ListImages")
    assert f"{OCI}.Pull" in HEAVY_METHODS
    assert {f"{OCI}.{m}" for m in ("ListImages", "Inspect", "Tag", "Untag", "Mount")}.isdisjoint(
        HEAVY_METHODS
    )


_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
out = []
for method, params in json.loads(sys.argv[2]):
    s.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
    buf = b""
    while not buf.endswith(b"\0"):
        buf += s.recv(1 << 20)
    out.append(json.loads(buf[:-1]).get("error", "ok"))
print(json.dumps(out))
"""


def test_unprivileged_peer(
    tmp_path: Path, test_users: TestUsers, user_python: users.UserPython
) -> None:
    """Another uid may list and inspect; Pull, Tag, Untag and Mount are refused before
    their parameters are looked at, and change nothing."""
    path = unpack_repo("sha256", tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    calls: list[tuple[str, dict[str, Any]]] = [
        (f"{OCI}.ListImages", {}),
        (f"{OCI}.Inspect", {"image": "multi"}),
        (f"{OCI}.Pull", {"reference": "oci:/nonexistent"}),
        (f"{OCI}.Tag", {"image": "multi", "tag": "mine"}),
        (f"{OCI}.Untag", {"tag": "multi"}),
        (f"{OCI}.Mount", {"image": "multi", "where": str(mnt)}),
        (f"{OCI}.Pull", {"bogus": 1}),
    ]
    denied = "org.varlink.service.PermissionDenied"
    with running_daemon(path, public=True) as d:
        proc = users.run_as(
            test_users.bob,
            user_python.command("-c", _CLIENT, d.address, json.dumps(calls)),
            env=user_python.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(proc.stdout) == ["ok", "ok"] + [denied] * 5
        with client.connect(d.address) as conn:
            assert [i["tag"] for i in call(conn, "ListImages")["images"]] == GOLDEN_TAGS
    assert not os.path.ismount(mnt)
