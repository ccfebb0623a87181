"""io.composefs.Oci through a real composefsd, on the repositories composefs-rs wrote
(golden data): ListImages and Inspect as the repository holds the images (the ids
cfsctl oci inspect printed), Tag and Untag written as cfsctl writes them, Mount by
tag (a real mount whose tree is cfsctl's dump of the image), authorization of an
unprivileged peer, and hostile names refused with typed errors."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import users
from composefsd.repository import Repository, ocipull
from composefsd.repository import oci as repo_oci
from composefsd.repository.ocibuild import OciBuildError
from composefsd.repository.ocilayer import LayerDigestError, TarFormatError
from composefsd.service import client, imageproxy
from composefsd.service.client import Connection, VarlinkCallError
from composefsd.service.context import Peer
from composefsd.service.daemon import HEAVY_METHODS, Authorization
from composefsd.service.ocimethods import parse_reference, pull_reply_error
from conftest import TestUsers
from registry import CuttingProxy, Registry, write_layout
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
        results = users.call_errors(user_python, test_users.bob, d.address, calls)
        assert results == ["ok", "ok"] + [denied] * 5
        with client.connect(d.address) as conn:
            assert [i["tag"] for i in call(conn, "ListImages")["images"]] == GOLDEN_TAGS
    assert not os.path.ismount(mnt)


# -- Pull -------------------------------------------------------------------------------------

LAYOUT = RS / "inputs" / "oci" / "layout"


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon on a new (sha256, V1) repository of this test's own."""
    with running_daemon(tmp_path / "repo") as d:
        yield d
    unmount_below(tmp_path)


def _pull(conn: Connection, params: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(progress replies, final reply) of a Pull with ``more``."""
    replies = [dict(r) for r in conn.call(f"{OCI}.Pull", params, more=True)]
    assert all("progress" in r for r in replies[:-1]) and "progress" not in replies[-1]
    return [r["progress"] for r in replies[:-1]], replies[-1]


def _golden_layers(tag: str) -> list[dict[str, Any]]:
    with open(RS / "inputs" / "oci" / "MANIFEST.json") as fh:
        (image,) = [i for i in json.load(fh)["images"] if i["tag"] == tag]
    layers: list[dict[str, Any]] = image["layers"]
    return layers


def test_pull_from_a_layout(fresh: Daemon, tmp_path: Path) -> None:
    """The golden oci: layout, read by the daemon itself: progress per layer, the
    ids cfsctl computed, the image mountable by tag; a second pull fetches nothing,
    an image sharing layers fetches only its own."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layers = _golden_layers("multi")
    with client.connect(fresh.address) as conn:
        progress, result = _pull(conn, {"reference": f"oci:{LAYOUT}:multi", "tag": "m/1"})
        assert result["manifestDigest"] == _golden_manifests()["multi"]
        assert result["imageId"] == _inspected("sha256", "multi")["composefs_erofs"]
        assert result["layers"] == [
            {"diffId": layer["diff_id"], "size": layer["blob_size"], "skipped": False}
            for layer in layers
        ]
        phases = [p["phase"] for p in progress]
        assert {"config", "manifest", "fetch"} <= set(phases)
        fetched = {p["layer"]: p for p in progress if p["phase"] == "fetch"}
        assert sorted(fetched) == sorted(layer["diff_id"] for layer in layers)
        # Each layer's last report is complete: done == total == its blob size.
        by_diff = {layer["diff_id"]: layer["blob_size"] for layer in layers}
        for diff_id, p in fetched.items():
            assert p["done"] == p["total"] == by_diff[diff_id]
        assert call(conn, "Inspect", {"image": "m/1"})["imageId"] == result["imageId"]

        reply = call(conn, "Mount", {"image": "m/1", "where": str(mnt)})
        assert reply["digest"] == result["imageId"]
        assert check_tree(mnt, OCI_DUMPS / "multi" / "dump.txt") > 0
        conn.call(f"{REPOSITORY}.Unmount", {"where": str(mnt)})

        progress, again = _pull(conn, {"reference": f"oci:{LAYOUT}:multi"})
        assert again["imageId"] == result["imageId"]
        assert [layer["skipped"] for layer in again["layers"]] == [True] * len(layers)
        assert not [p for p in progress if p["phase"] == "fetch"]

        progress, shared = _pull(conn, {"reference": f"oci:{LAYOUT}:shared", "tag": "s"})
        assert [layer["skipped"] for layer in shared["layers"]] == [True, True, False]
        assert shared["imageId"] == _inspected("sha256", "shared")["composefs_erofs"]
        # Without "more": one reply, the result.
        plain = conn.call(f"{OCI}.Pull", {"reference": f"oci:{LAYOUT}:single"})
        assert plain["manifestDigest"] == _golden_manifests()["single"]
        tags = [i["tag"] for i in call(conn, "ListImages")["images"]]
        assert tags == ["m/1", "s"]
    assert "Traceback" not in fresh.log_text()


def test_pull_bootable(fresh: Daemon) -> None:
    with client.connect(fresh.address) as conn:
        _progress, result = _pull(
            conn, {"reference": f"oci:{LAYOUT}:boot", "tag": "b", "bootable": True}
        )
        images = call(conn, "Inspect", {"image": "b"})["images"]
        assert result["bootImageId"] == images[repo_oci.BOOT_IMAGE_REF_KEY_V1]
        assert result["imageId"] == images[repo_oci.IMAGE_REF_KEY_V1]


@pytest.mark.parametrize(
    ("reference", "why"),
    [
        ("", "transport"),
        ("ftp://example.com/x", "transport"),
        ("dir:/srv", "transport"),
        ("oci:", "nothing after"),
        ("oci:relative/layout", "absolute"),
        ("oci:/srv/../etc:tag", "'..'"),
        ("oci-archive:/a/b/../../etc/shadow", "'..'"),
        ("docker-archive:x.tar", "absolute"),
        ("docker://reg.example/../x", "valid image name"),
        ("docker://reg.example/a b", "valid image name"),
        ("oci:/srv/layout\n:x", "control"),
        ("oci:/" + "x" * 5000, "longer than"),
    ],
)
def test_pull_bad_references(daemon: Daemon, reference: str, why: str) -> None:
    with client.connect(daemon.address) as conn:
        err = refused(conn, "Pull", {"reference": reference})
        assert err.name == f"{OCI}.InvalidReference"
        assert why in err.parameters["message"]
        assert len(err.parameters["reference"]) <= 303


def test_pull_bad_options_and_sources(fresh: Daemon, tmp_path: Path) -> None:
    repo = Path(fresh.repo)
    with client.connect(fresh.address) as conn:
        for params, parameter in (
            ({"authFile": "relative.json"}, "authFile"),
            ({"certDirectory": "certs"}, "certDirectory"),
            ({"credentials": "nocolon"}, "credentials"),
            ({"credentials": ":password"}, "credentials"),
        ):
            err = refused(conn, "Pull", {"reference": f"oci:{LAYOUT}:multi", **params})
            assert (err.name, err.parameters) == (
                "org.varlink.service.InvalidParameter",
                {"parameter": parameter},
            )
        err = refused(conn, "Pull", {"reference": f"oci:{LAYOUT}:multi", "tag": ".."})
        assert err.name == f"{OCI}.InvalidTag"
        err = refused(conn, "Pull", {"reference": f"oci:{LAYOUT}:nonexistent", "tag": "x"})
        assert err.name == f"{OCI}.PullFailed" and err.parameters["reason"] == "not-found"
        err = refused(conn, "Pull", {"reference": f"oci:{tmp_path}/none", "tag": "x"})
        assert err.name == f"{OCI}.PullFailed"
        assert call(conn, "ListImages") == {"images": []}
    assert not (repo / "streams" / "refs" / "oci").exists() or not os.listdir(
        repo / "streams" / "refs" / "oci"
    )


def test_pull_credentials_never_shown(fresh: Daemon) -> None:
    """A registry that is not there: RegistryUnavailable, and the password appears
    neither in the error nor in the daemon's log (at debug level)."""
    secret = "s3cr3t-Pa55word"
    with client.connect(fresh.address) as conn:
        err = refused(
            conn,
            "Pull",
            {
                "reference": "docker://127.0.0.1:9/nothing/here:1",
                "credentials": f"user:{secret}",
                "tlsVerify": False,
            },
        )
    assert err.name.startswith(f"{OCI}."), err
    assert err.name in (f"{OCI}.RegistryUnavailable", f"{OCI}.PullFailed"), err
    assert secret not in json.dumps(err.parameters)
    assert secret not in fresh.log_text()


def test_pull_with_the_callers_rights(
    tmp_path: Path, test_users: TestUsers, user_python: users.UserPython, registry: Registry
) -> None:
    """A privileged caller other than root (a --group member) pulls through skopeo
    run as itself: a layout it can read is pulled, one it cannot is refused, and so
    is a registry pull with an authFile it cannot read."""
    import shutil
    import stat

    public = users.public_dir()
    try:
        readable = public / "layout"
        shutil.copytree(LAYOUT, readable)
        hidden_dir = public / "hidden"
        hidden_dir.mkdir(mode=0o700)
        shutil.copytree(LAYOUT, hidden_dir / "layout")
        for p in [readable, *readable.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))
        secret_auth = hidden_dir / "auth.json"
        secret_auth.write_text("{}")
        calls = [
            (f"{OCI}.Pull", {"reference": f"oci:{readable}:single", "tag": "mine"}),
            (f"{OCI}.Pull", {"reference": f"oci:{hidden_dir}/layout:single", "tag": "no"}),
            (
                f"{OCI}.Pull",
                {
                    "reference": registry.push(f"oci:{LAYOUT}:multi", "svc/rights", "1"),
                    "tlsVerify": False,
                    "tag": "no",
                    "authFile": str(secret_auth),
                },
            ),
        ]
        group = str(test_users.group)
        with running_daemon(tmp_path / "repo", "--group", group, public=True) as d:
            results = users.call_errors(
                user_python, test_users.alice, d.address, calls, timeout=120
            )
            assert results[0] == "ok"
            # skopeo, run as alice, cannot read the layout: access denied.
            assert results[1] == f"{OCI}.AuthenticationFailed", results
            assert results[2] in (f"{OCI}.AuthenticationFailed", f"{OCI}.PullFailed"), results
            with client.connect(d.address) as conn:
                tags = [i["tag"] for i in call(conn, "ListImages")["images"]]
                assert tags == ["mine"]
                single = call(conn, "Inspect", {"image": "mine"})
                assert single["manifestDigest"] == _golden_manifests()["single"]
    finally:
        shutil.rmtree(public)


def test_pull_from_registries(
    fresh: Daemon, auth_registry: Registry, tls_registry: Registry
) -> None:
    """A real registry through skopeo's image proxy: basic auth with the caller's
    credentials (a wrong password is AuthenticationFailed, and neither password is
    shown anywhere), TLS with the certificate directory (without it the registry's
    certificate is refused)."""
    assert auth_registry.creds is not None and auth_registry.password is not None
    assert tls_registry.cert_dir is not None
    source = f"oci:{LAYOUT}:single"
    auth_ref = auth_registry.push(source, "svc/auth", "1")
    tls_ref = tls_registry.push(source, "svc/tls", "1")
    single = _golden_manifests()["single"]
    wrong = "wrong-" + auth_registry.password
    with client.connect(fresh.address) as conn:
        err = refused(conn, "Pull", {"reference": auth_ref, "tlsVerify": False, "tag": "a"})
        assert err.name == f"{OCI}.AuthenticationFailed", err
        err = refused(
            conn,
            "Pull",
            {"reference": auth_ref, "tlsVerify": False, "credentials": f"composefsd:{wrong}"},
        )
        assert err.name == f"{OCI}.AuthenticationFailed", err
        assert wrong not in json.dumps(err.parameters)
        _progress, result = _pull(
            conn,
            {
                "reference": auth_ref,
                "tlsVerify": False,
                "credentials": auth_registry.creds,
                "tag": "a",
            },
        )
        assert result["manifestDigest"] == single
        assert result["imageId"] == _inspected("sha256", "single")["composefs_erofs"]

        err = refused(conn, "Pull", {"reference": tls_ref, "tag": "t"})
        assert err.name == f"{OCI}.RegistryUnavailable", err
        _progress, result = _pull(
            conn, {"reference": tls_ref, "certDirectory": str(tls_registry.cert_dir), "tag": "t"}
        )
        assert result["manifestDigest"] == single
        assert [layer["skipped"] for layer in result["layers"]] == [True]
        tags = [i["tag"] for i in call(conn, "ListImages")["images"]]
        assert tags == ["a", "t"]
    log = fresh.log_text()
    assert auth_registry.password not in log and wrong not in log


def _proxy_error(cls: type[imageproxy.RequestError], text: str) -> imageproxy.RequestError:
    return cls(text, method="OpenImage", skopeo_message=text)


@pytest.mark.parametrize(
    ("exc", "name", "reason"),
    [
        (_proxy_error(imageproxy.ProxyAuthError, "unauthorized"), "AuthenticationFailed", None),
        (_proxy_error(imageproxy.ImageAccessDeniedError, "denied"), "AuthenticationFailed", None),
        (_proxy_error(imageproxy.ProxyTLSError, "x509"), "RegistryUnavailable", None),
        (imageproxy.ProxyDiedError("skopeo died"), "RegistryUnavailable", None),
        (_proxy_error(imageproxy.BlobTransferError, "hung up"), "RegistryUnavailable", None),
        (imageproxy.DigestMismatchError("bad"), "DigestMismatch", None),
        (LayerDigestError("bad tar"), "DigestMismatch", None),
        (
            _proxy_error(imageproxy.ImageNotFoundError, "manifest unknown"),
            "PullFailed",
            "not-found",
        ),
        (_proxy_error(imageproxy.PlatformNotFoundError, "no image"), "PullFailed", "platform"),
        (imageproxy.ProxyStartError("no skopeo"), "PullFailed", "skopeo"),
        (imageproxy.ProxyOptionsError("bad"), "PullFailed", "options"),
        (ocipull.ManifestFormatError("index"), "PullFailed", "invalid-image"),
        (ocipull.LayerFormatError("not gzip"), "PullFailed", "invalid-layer"),
        (TarFormatError("bad header"), "PullFailed", "invalid-layer"),
        (ocipull.LayoutError("no index.json"), "PullFailed", "source"),
        (ocipull.TagNotFoundError("no tag"), "PullFailed", "not-found"),
        (OciBuildError("no diff_ids"), "PullFailed", "build"),
        (ocipull.OciPullError("other"), "PullFailed", "pull"),
    ],
)
def test_pull_error_mapping(exc: Exception, name: str, reason: str | None) -> None:
    mapped = pull_reply_error(exc)
    assert mapped is not None
    assert mapped.name == f"{OCI}.{name}"
    assert mapped.parameters.get("reason") == reason
    assert mapped.parameters["message"] == str(exc)


def test_pull_errors_scrubbed() -> None:
    secret = "me:hunter2-pw"
    exc = _proxy_error(imageproxy.ProxyAuthError, "bad auth me:hunter2-pw (hunter2-pw)")
    mapped = pull_reply_error(exc, secret=secret)
    assert mapped is not None and "hunter2" not in json.dumps(mapped.parameters)
    digest = ocipull.BlobDigestError("short", digest="sha256:" + "0" * 64, layer="sha256:ab")
    mapped = pull_reply_error(digest)
    assert mapped is not None
    assert (mapped.name, mapped.parameters["layer"]) == (f"{OCI}.DigestMismatch", "sha256:ab")


def test_parse_reference() -> None:
    ref = parse_reference("oci:/srv/layout:v1")
    assert (ref.transport, ref.path, ref.name) == ("oci:", "/srv/layout", "v1")
    ref = parse_reference("oci:/srv/a:b/layout")
    assert (ref.path, ref.name) == ("/srv/a:b/layout", None)
    ref = parse_reference("oci-archive:/srv//x.tar")
    assert (ref.transport, ref.path) == ("oci-archive:", "/srv/x.tar")
    ref = parse_reference("docker://reg.example:5000/os/base@sha256:" + "0" * 64)
    assert (ref.transport, ref.path) == ("docker://", None)
    assert parse_reference("containers-storage:localhost/x:1").transport == "containers-storage:"


def test_pull_cancelled_on_a_stalled_registry(
    fresh: Daemon, registry: Registry, tmp_path: Path
) -> None:
    """A registry that stops answering mid-blob sends no progress: when the client
    leaves, the daemon closes skopeo under the transfer, the pull stops, no tag is
    written and the repository stays fsck-clean; a later pull from a working
    registry completes. SIGTERM during such a pull still ends the daemon cleanly."""
    layout = tmp_path / "layout"
    image = write_layout(layout, {"big": [[("blob", os.urandom(4 << 20))]]})["big"]
    registry.push(f"oci:{layout}:big", "svc/stall", "1")
    layer = image.layers[0]
    cutter = CuttingProxy(registry.host, layer.digest, cut_after=64 * 1024, stall=True)
    try:
        params = {
            "reference": f"docker://{cutter.host}/svc/stall:1",
            "tlsVerify": False,
            "tag": "stalled",
        }
        conn = client.connect(fresh.address)
        replies = conn.call(f"{OCI}.Pull", params, more=True)
        assert "progress" in next(iter(replies))
        assert cutter.stalled.wait(120), "the blob request never reached the registry"
        conn.close()
        deadline = time.monotonic() + 120
        while "pull of docker://" not in fresh.log_text():
            assert time.monotonic() < deadline, fresh.log_text()
            time.sleep(0.1)
        assert "cancelled for pid" in fresh.log_text()
        with client.connect(fresh.address) as conn:
            assert call(conn, "ListImages") == {"images": []}
            # (The stalled image has no /usr, which the composefs image needs.)
            working = registry.push(f"oci:{LAYOUT}:single", "svc/ok", "1")
            _progress, result = _pull(conn, {"reference": working, "tlsVerify": False, "tag": "ok"})
            assert result["manifestDigest"] == _golden_manifests()["single"]
        assert Repository.open(fresh.repo).fsck().ok

        # The daemon stopping cancels a stalled pull too (within its grace period).
        conn = client.connect(fresh.address)
        replies = conn.call(f"{OCI}.Pull", {**params, "tag": "stalled-2"}, more=True)
        assert "progress" in next(iter(replies))
        cutter.stalled.clear()
        assert fresh.stop() == 0
        conn.close()
        assert "stalled-2" not in os.listdir(fresh.repo / "streams" / "refs" / "oci")
        assert Repository.open(fresh.repo).fsck().ok
    finally:
        cutter.close()
