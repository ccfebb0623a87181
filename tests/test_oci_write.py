"""Writing OCI config and manifest streams and tags as composefs-rs does (oci.py)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from composefsd import splitstream as ss
from composefsd.repository import Repository
from composefsd.repository.oci import (
    IMAGE_REF_KEY_V1,
    OciError,
    OciTagError,
    check_tag,
    iter_tags,
    open_tag,
    tag_image,
    untag_image,
    write_config_stream,
    write_manifest_stream,
)
from composefsd.repository.ocilayer import import_layer
from composefsd.repository.streams import StreamNotFoundError, existing_stream, read_stream
from rsgolden import ALGORITHMS, RS, read_json
from test_oci_layer_import import layer_tar

SAME_ZSTD = ss.zstd_version_info()[:3] == (1, 5, 4)
LAYOUT = RS / "inputs" / "oci" / "layout"
IMAGES = {
    i["tag"]: i for i in json.loads((RS / "inputs" / "oci" / "MANIFEST.json").read_text())["images"]
}


def _blob(digest: str) -> bytes:
    return (LAYOUT / "blobs" / "sha256" / digest.partition(":")[2]).read_bytes()


def _repo(tmp_path: Path, algorithm: str) -> Repository:
    return Repository.init(
        tmp_path / "repo", algorithm=f"fsverity-{algorithm}-12", verity="disabled"
    )


def _pulled_verity(algorithm: str, tag: str) -> str:
    """The ``verity`` ``cfsctl oci pull`` printed: the import-time manifest stream."""
    for run in read_json(f"expected/oci/{algorithm}/commands.json"):
        if run["command"].endswith(f"oci pull oci:$LAYOUT:{tag} {tag}"):
            for line in run["stdout"].splitlines():
                if line.startswith("verity"):
                    return str(line.split()[1])
    raise KeyError(tag)


def _import_time(repo: Repository, tag: str) -> tuple[str, str]:
    """Layers, config and manifest streams of ``tag`` as a pull writes them before
    the image is built: (config verity, manifest verity)."""
    image = IMAGES[tag]
    refs = [
        (layer["diff_id"], import_layer(repo, _io(layer_tar(layer["name"])), layer["diff_id"]))
        for layer in image["layers"]
    ]
    with repo.object_store() as store:
        config = write_config_stream(repo, store, _blob(image["config_digest"]), refs)
        manifest = write_manifest_stream(
            repo, store, _blob(image["manifest_digest"]), image["config_digest"], config, refs
        )
    return config, manifest


def _io(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


@pytest.mark.skipif(not SAME_ZSTD, reason="stream ids need libzstd 1.5.4 (CI builds against it)")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("tag", sorted(IMAGES))
def test_import_time_manifest_is_cfsctls(tmp_path: Path, algorithm: str, tag: str) -> None:
    repo = _repo(tmp_path, algorithm)
    _, manifest = _import_time(repo, tag)
    assert manifest == _pulled_verity(algorithm, tag)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_streams_read_back(tmp_path: Path, algorithm: str) -> None:
    repo = _repo(tmp_path, algorithm)
    image = IMAGES["multi"]
    config, manifest = _import_time(repo, "multi")
    assert existing_stream(repo, "oci-config-" + image["config_digest"]) == config
    assert existing_stream(repo, "oci-manifest-" + image["manifest_digest"]) == manifest
    with repo.object_store() as store:
        parsed = read_stream(store, manifest)
        names = [n for n, _ in parsed.refs.named_refs]
        assert names == sorted(
            ["config:" + image["config_digest"]] + [x["diff_id"] for x in image["layers"]]
        )
        # rewritten with an image ref: the link moves, the JSON stays byte for byte
        refs = [
            (x["diff_id"], existing_stream(repo, "oci-layer-" + x["diff_id"]) or "")
            for x in image["layers"]
        ]
        image_id = "ab" * repo.hash_algorithm.digest_size
        new_config = write_config_stream(
            repo, store, _blob(image["config_digest"]), refs, {IMAGE_REF_KEY_V1: image_id}
        )
        assert new_config != config
        assert existing_stream(repo, "oci-config-" + image["config_digest"]) == new_config
        write_manifest_stream(
            repo,
            store,
            _blob(image["manifest_digest"]),
            image["config_digest"],
            new_config,
            refs,
            tag="a/b:c",
        )
        opened = open_tag(repo, store, "a/b:c")
    assert opened.image_ref_v1 == image_id
    assert opened.config_json == _blob(image["config_digest"])
    assert (
        os.readlink(repo.path / "streams/refs/oci/a%2Fb:c")
        == "../../oci-manifest-" + image["manifest_digest"]
    )


def test_tag_untag(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "sha256")
    _import_time(repo, "single")
    digest = IMAGES["single"]["manifest_digest"]
    tag_image(repo, digest, "x%y/z")
    tag_image(repo, digest, "plain")
    tag_image(repo, digest, "plain")  # idempotent
    assert list(iter_tags(repo)) == [("plain", digest), ("x%y/z", digest)]
    assert os.readlink(repo.path / "streams/refs/oci/x%25y%2Fz") == "../../oci-manifest-" + digest
    assert untag_image(repo, "x%y/z") == digest
    assert list(iter_tags(repo)) == [("plain", digest)]
    with pytest.raises(StreamNotFoundError):
        untag_image(repo, "x%y/z")
    with pytest.raises(StreamNotFoundError):
        tag_image(repo, "sha256:" + "0" * 64, "other")
    with pytest.raises(OciError):
        tag_image(repo, "sha256:../../etc", "other")
    assert not (repo.path / "streams/refs/oci/other").exists()


@pytest.mark.parametrize(
    "tag", ["", "@sha256:00", ".", "..", "a\nb", "a\0b", "x" * 256, "\udcff", "%" * 90]
)
def test_hostile_tags(tmp_path: Path, tag: str) -> None:
    repo = _repo(tmp_path, "sha256")
    _import_time(repo, "single")
    with pytest.raises(OciTagError):
        tag_image(repo, IMAGES["single"]["manifest_digest"], tag)
    with pytest.raises(OciTagError):
        untag_image(repo, tag)
    assert list(iter_tags(repo)) == []
    assert not (repo.path / "streams" / "refs").exists()


def test_fine_tags() -> None:
    for tag in ["a", "localhost/bootc-sha256:abc", "x" * 255, "%2F", "ümlaut:1"]:
        assert check_tag(tag) == tag


def test_converted_manifest_under_its_source_digest(tmp_path: Path) -> None:
    """skopeo's OCI conversion of a Docker manifest keeps the Docker digest: stored
    under it, and read back through the tag (which names the stream's object)."""
    repo = _repo(tmp_path, "sha256")
    config, _ = _import_time(repo, "single")
    image = IMAGES["single"]
    docker_digest = "sha256:" + "d0" * 32
    refs = [
        (x["diff_id"], existing_stream(repo, "oci-layer-" + x["diff_id"]) or "")
        for x in image["layers"]
    ]
    with repo.object_store() as store:
        write_manifest_stream(
            repo,
            store,
            _blob(image["manifest_digest"]),
            image["config_digest"],
            config,
            refs,
            manifest_digest=docker_digest,
            tag="converted",
        )
        assert open_tag(repo, store, "converted").manifest_digest == docker_digest
        with pytest.raises(OciError):
            write_manifest_stream(
                repo,
                store,
                b"{}",
                image["config_digest"],
                config,
                [],
                manifest_digest="sha256:../x",
            )
