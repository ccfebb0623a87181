"""CreateImage of composefs-rs's golden trees, end to end through the repository,
against what ``cfsctl create-image`` printed and stored (expected/trees.json).

Each golden tree goes into a fresh repository of each algorithm whose default
format is the one cfsctl wrote (V0, V1, V2): with cfsctl's default transform
(``--propagate-usr-to-root``, allowlisted xattrs) the id, the image bytes and the
objects it uses are cfsctl's; with no transform (our default) they are cfsctl
``--no-propagate-usr-to-root``'s. The daemon and composefsctl give the same ids
as ``cfsctl compute-id`` for the transforms and the bootable variant.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from composefsd.image.formats import ErofsVersion
from composefsd.image.reader import read_image
from composefsd.image.transforms import CFSCTL_DEFAULT
from composefsd.repository import CreateOptions, Repository
from composefsd.service.client import connect
from ctlrun import run_ctl
from rsgolden import ALGORITHMS, TREES, VARIANTS, golden_image, image_objects, trees_json
from servicehelpers import running_daemon


@pytest.mark.parametrize("version", [ErofsVersion.V0, ErofsVersion.V1, ErofsVersion.V2])
@pytest.mark.parametrize("hash_name", ALGORITHMS)
def test_create_image_in_each_format_is_cfsctls(
    tmp_path: Path,
    rs_trees: Path,
    hash_name: str,
    version: ErofsVersion,
) -> None:
    repo = Repository.init(tmp_path / "r", algorithm=hash_name, erofs_version=version)
    checked = 0
    for tree in TREES:
        for entry in trees_json()[tree]["images"]:
            if entry["hash"] != hash_name or ErofsVersion(int(entry["erofs_version"])) != version:
                continue
            options = CreateOptions(transform=VARIANTS[entry["variant"]])
            result = repo.create_image(rs_trees / tree, options=options, ref=f"{tree}.x")
            where = f"{tree} {hash_name} V{int(version)} {entry['variant']}"
            assert f"{hash_name}:{result.digest}" == entry["stdout"], where
            assert result.erofs_version is version and result.extra_images == {}
            image = (repo.images_dir / result.digest).read_bytes()
            assert image == golden_image(entry["image_file"]), where
            root = read_image(image, c_quirks=False).root
            assert image_objects(root, hash_name) == entry["image_objects_sorted"], where
            checked += 1
    # Every tree in cfsctl's default variant, and in V1 without the transform too.
    assert checked == len(TREES) * (2 if version is ErofsVersion.V1 else 1)
    assert repo.fsck().ok


def test_dual_format_repository_writes_cfsctls_v1_and_v2(
    tmp_path: Path,
    rs_trees: Path,
) -> None:
    """A repository with V1 and an extra V2 (as bootc configures one): both images
    are cfsctl's, the V1 one named."""
    from composefsd.repository import FormatConfig

    formats = FormatConfig(ErofsVersion.V1, (ErofsVersion.V2,))
    repo = Repository.init(tmp_path / "r", formats=formats)
    expected = {
        entry["erofs_version"]: entry["stdout"].partition(":")[2]
        for entry in trees_json()["t3-xattrs"]["images"]
        if entry["hash"] == "sha256" and entry["variant"] == "default"
    }
    result = repo.create_image(
        rs_trees / "t3-xattrs", options=CreateOptions(transform=CFSCTL_DEFAULT), ref="t3"
    )
    assert result.digest == expected["1"]
    assert result.extra_images == {ErofsVersion.V2: expected["2"]}
    assert repo.resolve_image("t3") == expected["1"]


def _compute_id(tree: str, version: str, variant: str) -> str:
    for entry in trees_json()[tree]["compute_id"]:
        if (entry["hash"], entry["erofs_version"], entry["variant"]) == (
            "sha256",
            version,
            variant,
        ):
            return str(entry["id"])
    raise AssertionError(f"no compute-id for {tree} {version} {variant}")


def test_transforms_through_the_daemon_and_composefsctl(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rs_trees: Path,
) -> None:
    tree = rs_trees / "t6-rootfs"
    repo_path = tmp_path / "r"
    Repository.init(repo_path, erofs_version=2)
    method = "io.composefs.Repository.CreateImage"
    with running_daemon(repo_path) as daemon, connect(daemon.address) as conn:
        boot = conn.call(
            method,
            {
                "sourcePath": str(tree),
                "propagateUsrToRoot": True,
                "xattrs": "keepUserXattrs",
                "bootable": True,
                "erofsVersion": 1,
            },
        )
        assert boot["digest"] == _compute_id("t6-rootfs", "1", "bootable+keep-user-xattrs")
        assert boot["erofsVersion"] == 1 and "extraImages" not in boot
        plain = conn.call(method, {"sourcePath": str(tree), "bootable": True})
        assert plain["erofsVersion"] == 2
        # cfsctl --no-propagate-usr-to-root --bootable has no golden id; the
        # transform still changes the image.
        assert plain["digest"] != _compute_id("t6-rootfs", "2", "no-propagate-usr-to-root")
        status, out, err = run_ctl(
            capsys,
            "--connect",
            daemon.address,
            "create-image",
            str(tree),
            "--propagate-usr-to-root",
            "--xattrs",
            "keep-user-xattrs",
        )
        assert (status, err) == (0, "")
        assert out.strip() == _compute_id("t6-rootfs", "2", "keep-user-xattrs")
    # Directly, the same options give the same ids.
    status, out, err = run_ctl(
        capsys,
        "--repo",
        str(repo_path),
        "--direct",
        "create-image",
        str(tree),
        "--bootable",
        "--propagate-usr-to-root",
        "--erofs-version",
        "0",
    )
    assert (status, err) == (0, "")
    assert out.strip() == _compute_id("t6-rootfs", "0", "bootable")
    status, out, err = run_ctl(
        capsys, "--repo", str(repo_path), "--direct", "create-image", str(tree)
    )
    assert out.strip() == _compute_id("t6-rootfs", "2", "no-propagate-usr-to-root")
    # A tree without /boot cannot be made bootable: SourceError, nothing named.
    status, out, err = run_ctl(
        capsys,
        "--repo",
        str(repo_path),
        "create-image",
        str(rs_trees / "t1-basic"),
        "--bootable",
        "--ref",
        "nope",
    )
    assert status == 1 and 'Directory entry "boot" does not exist' in err
    assert not (repo_path / "images" / "refs" / "nope").exists()
