"""``ocipull.pull``: fetch, composefs image and tag together, as ``cfsctl oci pull``
(from the golden layout, read natively)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from composefsd.repository import Repository
from composefsd.repository.fsck import fsck
from composefsd.repository.oci import (
    BOOT_IMAGE_REF_KEY_V1,
    OciTagError,
    iter_tags,
    open_tag,
    untag_image,
)
from composefsd.repository.ocilayout import OciLayoutSource
from composefsd.repository.ocipull import BlobDigestError, PullResult, pull
from composefsd.repository.progress import Progress
from rsgolden import ALGORITHMS, RS, listing
from test_oci_build import OCI, _compute_id_stdout, _written
from test_oci_pull import OCI_TAR, _image, _small_tar
from test_oci_write import IMAGES, SAME_ZSTD, _pulled_verity, _repo

LAYOUT = RS / "inputs" / "oci" / "layout"


def _pull(repo: Repository, tag: str, layout: Path = LAYOUT, **kw: object) -> PullResult:
    with OciLayoutSource.open(layout, tag) as source:
        return pull(repo, source, tag=tag, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pull_every_golden_tag(tmp_path: Path, algorithm: str) -> None:
    repo = _repo(tmp_path, algorithm)
    for tag in ("single", "multi", "shared", "boot", "boot-t1"):
        events: list[Progress] = []
        result = _pull(repo, tag, progress=events.append)
        assert result.image_id == _compute_id_stdout(algorithm, tag)
        assert result.boot_image_id is None
        if SAME_ZSTD:
            assert result.manifest_verity == _pulled_verity(algorithm, tag)
        assert result.manifest_digest == IMAGES[tag]["manifest_digest"]
        assert [x.diff_id for x in result.layers] == [x["diff_id"] for x in IMAGES[tag]["layers"]]
        assert events[-1] == Progress("image", 0, None, result.manifest_digest)
        with repo.object_store() as store:
            assert open_tag(repo, store, tag).image_ref_v1 == result.image_id
    # "shared" reuses multi's first two layers.
    assert dict(iter_tags(repo)) == {t: IMAGES[t]["manifest_digest"] for t in IMAGES}
    assert fsck(repo).ok


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_shared_layers_are_skipped(tmp_path: Path, algorithm: str) -> None:
    repo = _repo(tmp_path, algorithm)
    _pull(repo, "multi")
    events: list[Progress] = []
    result = _pull(repo, "shared", progress=events.append)
    skipped = {e.detail for e in events if e.phase == "skip"}
    fetched = {e.detail for e in events if e.phase == "fetch"}
    layers = [x["diff_id"] for x in IMAGES["shared"]["layers"]]
    assert skipped == set(layers[:2])
    assert fetched == {layers[2]}
    assert [x.skipped for x in result.layers] == [True, True, False]


@pytest.mark.skipif(not SAME_ZSTD, reason="stream ids need libzstd 1.5.4 (CI builds against it)")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_listing_after_pull_single_is_cfsctls(tmp_path: Path, algorithm: str) -> None:
    repo = _repo(tmp_path, algorithm)
    _pull(repo, "single")
    expected = (OCI / algorithm / "listing.1-after-pull-single.txt").read_text().splitlines()
    assert _written(listing(repo.path)) == _written(expected)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bootable_pull(tmp_path: Path, algorithm: str) -> None:
    repo = _repo(tmp_path, algorithm)
    result = _pull(repo, "boot", bootable=True)
    assert result.image_id == _compute_id_stdout(algorithm, "boot")
    assert result.boot_image_id == _compute_id_stdout(algorithm, "boot", "--bootable ")
    with repo.object_store() as store:
        image = open_tag(repo, store, "boot")
    assert image.image_ref_v1 == result.image_id
    assert image.boot_image_refs == {BOOT_IMAGE_REF_KEY_V1: result.boot_image_id}


def test_again_writes_nothing(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "sha256")
    first = _pull(repo, "multi")
    before = listing(repo.path)
    events: list[Progress] = []
    again = _pull(repo, "multi", progress=events.append)
    assert again.image_id == first.image_id
    assert all(x.skipped for x in again.layers)
    assert not [e for e in events if e.phase == "fetch"]
    assert listing(repo.path) == before


def test_failed_pull_leaves_the_tag_alone(tmp_path: Path) -> None:
    """A pull that fails writes no tag and does not move an existing one."""
    repo = _repo(tmp_path, "sha256")
    _pull(repo, "single")
    layout = tmp_path / "layout"
    shutil.copytree(LAYOUT, layout)
    blob = (
        layout / "blobs" / "sha256" / IMAGES["multi"]["layers"][1]["blob_digest"].partition(":")[2]
    )
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    for tag in ("single", "new"):
        with OciLayoutSource.open(layout, "multi") as source, pytest.raises(BlobDigestError):
            pull(repo, source, tag=tag)
    assert dict(iter_tags(repo)) == {"single": IMAGES["single"]["manifest_digest"]}
    assert fsck(repo).ok


def test_bad_tag_refused_before_anything(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "sha256")
    with OciLayoutSource.open(LAYOUT, "single") as source, pytest.raises(OciTagError):
        pull(repo, source, tag="..")
    assert not (repo.path / "streams").exists() or not os.listdir(repo.path / "streams")


def test_artifact_is_tagged_without_image(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "sha256")
    source = _image([(_small_tar(), OCI_TAR)], config_media="application/vnd.example+json")
    result = pull(repo, source, tag="artifact")
    assert result.image_id is None
    assert dict(iter_tags(repo)) == {"artifact": result.manifest_digest}
    assert fsck(repo).ok


def test_gc_keeps_tagged_images_and_frees_untagged(tmp_path: Path) -> None:
    """After pulls, GC removes only what the pulls left behind (the import-time
    config and manifest streams); untagging ``multi`` frees its own layer and
    image, and keeps the layers ``shared`` still uses."""
    repo = _repo(tmp_path, "sha256")
    pulled = {tag: _pull(repo, tag) for tag in ("single", "multi", "shared")}
    first = repo.gc()
    assert first.objects_removed > 0
    assert fsck(repo).ok
    for tag, result in pulled.items():
        with repo.object_store() as store:
            assert open_tag(repo, store, tag).image_ref_v1 == result.image_id
        assert (repo.path / "images" / str(result.image_id)).is_symlink()
    assert repo.gc().objects_removed == 0

    untag_image(repo, "multi")
    repo.gc()
    assert fsck(repo).ok
    streams = set(os.listdir(repo.path / "streams"))
    multi_layers = [x["diff_id"] for x in IMAGES["multi"]["layers"]]
    shared_layers = [x["diff_id"] for x in IMAGES["shared"]["layers"]]
    assert "oci-layer-" + multi_layers[2] not in streams
    assert {"oci-layer-" + d for d in shared_layers} <= streams
    assert "oci-manifest-" + IMAGES["multi"]["manifest_digest"] not in streams
    assert not (repo.path / "images" / str(pulled["multi"].image_id)).exists()
    assert (repo.path / "images" / str(pulled["shared"].image_id)).is_symlink()
    again = _pull(repo, "multi")
    assert [x.skipped for x in again.layers] == [True, True, False]
    assert again.image_id == pulled["multi"].image_id
