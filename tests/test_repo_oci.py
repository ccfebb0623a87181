"""OCI images in composefs-rs repositories (composefsd.repository.oci) against what
cfsctl printed for the golden repositories."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from composefsd.repository import Repository
from composefsd.repository.oci import (
    OciError,
    decode_tag,
    encode_tag,
    iter_tags,
    list_images,
    open_image,
    open_tag,
    trace_tag,
)
from composefsd.repository.streams import (
    StreamNotFoundError,
    iter_streams,
    read_stream,
    trace_streams,
)
from composefsd.splitstream import CONTENT_TYPE_OCI_MANIFEST, write_splitstream
from rsgolden import (
    ALGORITHMS,
    EXPECTED,
    commands,
    expected_listing,
    listed_objects,
    read_json,
    stdout_of,
    unpack_repo,
)


@pytest.fixture(params=ALGORITHMS)
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Repository]:
    return request.param, Repository.open(unpack_repo(request.param, tmp_path))


def test_tags_are_listed(golden: tuple[str, Repository]) -> None:
    algorithm, repo = golden
    listed = json.loads(stdout_of(algorithm, "cfsctl --repo $REPO oci images --json"))
    expected = sorted((i["name"], i["manifest_digest"]) for i in listed["images"])
    assert list(iter_tags(repo)) == expected


def test_oci_images_json(golden: tuple[str, Repository]) -> None:
    algorithm, repo = golden
    listed = json.loads(stdout_of(algorithm, "cfsctl --repo $REPO oci images --json"))
    ours = [image.info(tag) for tag, image in list_images(repo)]
    key = "name"
    assert sorted(ours, key=lambda i: i[key]) == sorted(listed["images"], key=lambda i: i[key])


def test_oci_inspect(golden: tuple[str, Repository]) -> None:
    algorithm, repo = golden
    inspects = [c for c in commands(algorithm) if " oci inspect " in c["command"]]
    assert len(inspects) >= 2
    version = repo.erofs_version
    assert version == 1
    with repo.object_store() as store:
        for command in inspects:
            tag = command["command"].rsplit(" ", 1)[1]
            assert open_tag(repo, store, tag).inspect(version) == json.loads(command["stdout"])


def test_image_parts(golden: tuple[str, Repository]) -> None:
    _algorithm, repo = golden
    manifest = read_json("inputs/oci/MANIFEST.json")
    with repo.object_store() as store:
        for entry in manifest["images"]:
            image = open_tag(repo, store, entry["tag"])
            assert image.manifest_digest == entry["manifest_digest"]
            assert image.config_digest == entry["config_digest"]
            assert list(image.layer_refs) == sorted(layer["diff_id"] for layer in entry["layers"])
            assert image.is_container
            assert image.image_ref is None and image.image_ref_v1 is not None
            # "boot" was pulled with --bootable
            assert bool(image.boot_image_refs) == (entry["tag"] == "boot")
            unverified = open_image(repo, store, entry["manifest_digest"])
            assert unverified == image


def test_tag_encoding() -> None:
    for tag in ("plain", "a/b", "100%", "%2F", "x:y/z%25"):
        assert decode_tag(encode_tag(tag)) == tag
    assert encode_tag("localhost/bootc:1") == "localhost%2Fbootc:1"
    assert decode_tag("%252F") == "%2F"
    assert decode_tag("%zz%") == "%zz%"


def _kept_after_untag(algorithm: str) -> set[str]:
    return listed_objects(expected_listing(f"repo-{algorithm}.after-untag-gc.listing.txt"))


def test_traces_are_what_cfsctl_keeps(golden: tuple[str, Repository]) -> None:
    """After cfsctl untagged single and multi and collected, what is left is what
    the other tags, the other stream refs and the image refs keep."""
    algorithm, repo = golden
    from test_repo_streams import image_part

    objects: set[str] = set()
    for tag in ("shared", "boot", "boot-t1", "multi:v2"):
        trace = trace_tag(repo, tag)
        objects |= trace.objects
        assert set(trace.images.values()) <= trace.objects
        assert trace.image.manifest_verity in trace.objects
        assert trace.image.config_verity in trace.objects
    others = trace_streams(
        repo,
        [
            next(s.content_id for s in iter_streams(repo) if s.content_id.endswith(d))
            for d in (
                "75ec5fc207bf04ed80bdf00113363d5e73152da8711eacccbea7e45cd13bfc5c",
                "16d122e2a3549ceb5e22d898f58b5fb17214d3db39a13fcf6a53e607265baf45",
            )
        ],
    )
    present = {p.parent.name + p.name for p in repo.objects_dir.glob("*/*")}
    assert (objects | others.objects | image_part(repo)) & present == _kept_after_untag(algorithm)


def test_trace_of_single(golden: tuple[str, Repository]) -> None:
    _algorithm, repo = golden
    trace = trace_tag(repo, "single")
    assert {s.split("-sha256:")[0] for s in trace.streams} == {
        "oci-manifest",
        "oci-config",
        "oci-layer",
    }
    assert len(trace.streams) == 3
    assert set(trace.images) == {"composefs.image.v1"}
    with repo.object_store() as store:
        layer = read_stream(store, next(iter(trace.image.layer_refs.values()))).refs
    assert set(layer.object_refs) <= trace.objects


def test_bad_tags(golden: tuple[str, Repository], caplog: pytest.LogCaptureFixture) -> None:
    _algorithm, repo = golden
    refs = repo.path / "streams" / "refs" / "oci"
    (refs / "to-a-layer").symlink_to("../../oci-layer-sha256:" + "1" * 64)
    (refs / "bad-digest").symlink_to("../../oci-manifest-sha256:xyz")
    (refs / "missing").symlink_to("../../oci-manifest-sha256:" + "2" * 64)
    assert "to-a-layer" not in dict(iter_tags(repo))
    assert "bad-digest" not in dict(iter_tags(repo))
    with caplog.at_level(logging.WARNING):
        names = [tag for tag, _image in list_images(repo)]
    assert "missing" not in names and "shared" in names
    assert "skipping OCI image missing" in caplog.text
    with repo.object_store() as store:
        with pytest.raises(OciError):
            open_tag(repo, store, "to-a-layer")
        with pytest.raises(StreamNotFoundError):
            open_tag(repo, store, "missing")
        with pytest.raises(StreamNotFoundError):
            open_tag(repo, store, "no-such-tag")
    with pytest.raises(StreamNotFoundError):
        trace_streams(repo, ["no-such-stream"])


def test_manifest_stream_with_two_objects_is_refused(golden: tuple[str, Repository]) -> None:
    algorithm, repo = golden
    size = repo.hash_algorithm.digest_size
    with repo.object_store() as store:
        image = open_tag(repo, store, "single")
        (json_obj,) = read_stream(store, image.manifest_verity).refs.object_refs
        data = write_splitstream(
            size, CONTENT_TYPE_OCI_MANIFEST, [(json_obj, 1), (image.config_verity, 1)]
        )
        bad = store.store_bytes(data).digest
        with pytest.raises(OciError, match="not exactly 1"):
            open_image(repo, store, image.manifest_digest, bad)
        # Without the verity the manifest's digest is checked.
        link = repo.path / "streams" / f"oci-manifest-{image.manifest_digest}"
        link.unlink()
        link.symlink_to(f"../objects/{image.config_verity[:2]}/{image.config_verity[2:]}")
        with pytest.raises(OciError):
            open_image(repo, store, image.manifest_digest)
    assert algorithm


def test_fresh_pulls_recorded_beside_the_repositories(golden: tuple[str, Repository]) -> None:
    """expected/oci/<alg>: the same images pulled into a fresh repository (``boot``
    without --bootable there). Their ``oci images`` list and ``inspect`` documents
    are ours on the golden repository, but for the extra tag and the boot image."""
    algorithm, repo = golden
    pulls = EXPECTED / "oci" / algorithm
    pulled = read_json(f"expected/oci/{algorithm}/commands.json")
    # The first listing, right after the five pulls (later ones follow tag/untag).
    listed = next(c for c in pulled if c.get("command") == "cfsctl --repo $REPO oci images --json")
    ours = {tag: image.info(tag) for tag, image in list_images(repo) if tag != "multi:v2"}
    assert {i["name"]: i for i in json.loads(listed["stdout"])["images"]} == ours
    version = repo.erofs_version
    with repo.object_store() as store:
        for inspect in sorted(pulls.glob("images/*/inspect.json")):
            tag = inspect.parent.name
            expected = json.loads(inspect.read_text())
            ours_doc = open_tag(repo, store, tag).inspect(version)
            if tag == "boot":
                assert ours_doc["composefs_boot_erofs"] is not None
                ours_doc["composefs_boot_erofs"] = None
            assert ours_doc == expected, tag
            # inspect --manifest / --config print the JSON text and a newline.
            assert (inspect.parent / "manifest.json").read_text() == ours_doc["manifest"] + "\n"
            assert (inspect.parent / "config.json").read_text() == ours_doc["config"] + "\n"


def test_erofs_version_follows_meta(golden: tuple[str, Repository]) -> None:
    """The golden repositories are V1 (meta.json's rule is tested in test_repo_formats);
    a V2 repository's inspect shows the composefs.image ref (none here)."""
    _algorithm, repo = golden
    assert repo.erofs_version == 1
    with repo.object_store() as store:
        image = open_tag(repo, store, "boot")
    assert image.inspect(2)["composefs_erofs"] is None
    assert image.inspect(2)["composefs_boot_erofs"] is None
    assert image.inspect(0) == image.inspect(1)
