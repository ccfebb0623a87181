"""Reading ``oci:DIR[:TAG]`` layouts directly (ocilayout.OciLayoutSource): tags,
platforms, nested indexes, and hostile layout files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from composefsd.repository.errors import ImageNotFoundError
from composefsd.repository.ocilayout import OciLayoutSource, go_arch, parse_layout_ref
from composefsd.repository.ocipull import (
    JSON_MAX,
    BlobDigestError,
    LayoutError,
    PlatformError,
    TagNotFoundError,
)
from rsgolden import RS

LAYOUT = RS / "inputs" / "oci" / "layout"
MANIFEST = json.loads((RS / "inputs" / "oci" / "MANIFEST.json").read_text())
IMAGES = {i["tag"]: i for i in MANIFEST["images"]}
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "layout"
    shutil.copytree(LAYOUT, copy)
    return copy


def _index(layout: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((layout / "index.json").read_text())
    return doc


def _write_index(layout: Path, doc: dict[str, Any]) -> None:
    (layout / "index.json").write_text(json.dumps(doc))


def _add_blob(layout: Path, data: bytes) -> str:
    digest = _sha256(data)
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return digest


def _manifest(layout: Path, tag: str | None) -> tuple[str, bytes]:
    with OciLayoutSource.open(layout, tag) as source:
        return source.fetch_manifest()


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("/path/to/oci", ("/path/to/oci", None)),
        ("ocidir", ("ocidir", None)),
        ("/path/to/oci:latest", ("/path/to/oci", "latest")),
        ("/path/to/oci:tag:with:colons", ("/path/to/oci:tag:with", "colons")),
        ("/path/to/oci:", ("/path/to/oci", "")),
        ("/path:middle/to/oci", ("/path:middle/to/oci", None)),
        ("/path:middle/to/oci:tag", ("/path:middle/to/oci", "tag")),
    ],
)
def test_parse_layout_ref(ref: str, expected: tuple[str, str | None]) -> None:
    assert parse_layout_ref(ref) == expected


def test_go_arch() -> None:
    assert go_arch("x86_64") == "amd64"
    assert go_arch("aarch64") == "arm64"
    assert go_arch("s390x") == "s390x"


@pytest.mark.parametrize("tag", sorted(IMAGES))
def test_golden_tags(tag: str) -> None:
    image = IMAGES[tag]
    with OciLayoutSource.from_ref(f"{LAYOUT}:{tag}") as source:
        digest, manifest = source.fetch_manifest()
        assert digest == image["manifest_digest"] == _sha256(manifest)
        config = source.fetch_config(image["config_digest"], image["config_size"])
        assert _sha256(config) == image["config_digest"]
        for layer in image["layers"]:
            with source.open_blob(layer["blob_digest"], layer["blob_size"]) as blob:
                assert _sha256(blob.read()) == layer["blob_digest"]


def test_from_an_open_directory(tmp_path: Path) -> None:
    """The source keeps its own fd: the caller's may be closed, and the directory
    renamed, after the source was made."""
    layout = _copy(tmp_path)
    fd = os.open(layout, os.O_RDONLY | os.O_DIRECTORY)
    source = OciLayoutSource(fd, "single", name="the caller's layout")
    os.close(fd)
    layout.rename(tmp_path / "moved")
    with source:
        assert source.fetch_manifest()[0] == IMAGES["single"]["manifest_digest"]
    with pytest.raises(LayoutError, match="closed"):
        source.fetch_config(IMAGES["single"]["config_digest"], 1)


def test_missing_tag() -> None:
    for tag in ("nope", ""):
        with pytest.raises(TagNotFoundError, match=repr(tag)) as caught:
            _manifest(LAYOUT, tag)
        assert isinstance(caught.value, ImageNotFoundError)


def test_no_tag_needs_exactly_one_image(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="name one with :TAG"):
        _manifest(LAYOUT, None)
    layout = _copy(tmp_path)
    doc = _index(layout)
    doc["manifests"] = [
        m
        for m in doc["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == "boot"
    ]
    del doc["manifests"][0]["annotations"]
    _write_index(layout, doc)
    assert _manifest(layout, None)[0] == IMAGES["boot"]["manifest_digest"]
    _write_index(layout, {"schemaVersion": 2, "manifests": []})
    with pytest.raises(TagNotFoundError):
        _manifest(layout, None)


def test_platform(tmp_path: Path) -> None:
    layout = _copy(tmp_path)
    doc = _index(layout)
    doc["manifests"][0]["platform"] = {"architecture": "arm64", "os": "linux"}
    _write_index(layout, doc)
    with pytest.raises(PlatformError, match="linux/arm64"):
        _manifest(layout, "single")
    # Without a platform, an entry is taken as it is.
    del doc["manifests"][0]["platform"]
    _write_index(layout, doc)
    assert _manifest(layout, "single")[0] == IMAGES["single"]["manifest_digest"]
    fd = os.open(layout, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with OciLayoutSource(fd, "multi", arch="arm64") as source, pytest.raises(PlatformError):
            source.fetch_manifest()
    finally:
        os.close(fd)


def test_nested_index_picks_this_platform(tmp_path: Path) -> None:
    layout = _copy(tmp_path)
    doc = _index(layout)
    single, multi = doc["manifests"][0], doc["manifests"][1]
    foreign = dict(single, platform={"architecture": "riscv64", "os": "linux"})
    ours = dict(multi, platform={"architecture": go_arch(), "os": "linux"})
    for entry in (foreign, ours):
        entry.pop("annotations")
    nested = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [foreign, ours]})
    digest = _add_blob(layout, nested.encode())
    top = {"mediaType": OCI_INDEX, "digest": digest, "size": len(nested)}
    top["annotations"] = {"org.opencontainers.image.ref.name": "multiarch"}
    doc["manifests"].append(top)
    _write_index(layout, doc)
    assert _manifest(layout, "multiarch")[0] == IMAGES["multi"]["manifest_digest"]


def test_index_naming_itself(tmp_path: Path) -> None:
    """An index that names itself (through a blob that names the blob): bounded."""
    layout = _copy(tmp_path)
    inner = {"schemaVersion": 2, "manifests": []}
    data = json.dumps(inner).encode()
    # Two indexes that name each other, through their digests.
    a_digest = _add_blob(layout, data)
    b = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_INDEX, "digest": a_digest, "size": len(data)}],
        }
    ).encode()
    b_digest = _add_blob(layout, b)
    loop = {"mediaType": OCI_INDEX, "digest": b_digest, "size": len(b)}
    # a names b: rewrite a's file in place (its digest no longer matches: refused too).
    (layout / "blobs/sha256" / a_digest[7:]).write_text(
        json.dumps({"schemaVersion": 2, "manifests": [loop]})
    )
    doc = _index(layout)
    doc["manifests"] = [dict(loop, annotations={"org.opencontainers.image.ref.name": "loop"})]
    _write_index(layout, doc)
    with pytest.raises((LayoutError, BlobDigestError)):
        _manifest(layout, "loop")
    # A chain deeper than allowed, every digest right.
    entry = {"mediaType": OCI_INDEX, "digest": a_digest, "size": len(data)}
    (layout / "blobs/sha256" / a_digest[7:]).write_bytes(data)
    for _ in range(6):
        blob = json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()
        entry = {"mediaType": OCI_INDEX, "digest": _add_blob(layout, blob), "size": len(blob)}
    doc["manifests"] = [dict(entry, annotations={"org.opencontainers.image.ref.name": "deep"})]
    _write_index(layout, doc)
    with pytest.raises(LayoutError, match="deeper"):
        _manifest(layout, "deep")


def test_symlinks_are_refused(tmp_path: Path) -> None:
    layout = _copy(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    manifest = IMAGES["single"]["manifest_digest"][7:]
    blob = layout / "blobs/sha256" / manifest
    shutil.copy(blob, outside / manifest)
    # the blob itself
    blob.unlink()
    blob.symlink_to(outside / manifest)
    with pytest.raises(LayoutError, match="symlink"):
        _manifest(layout, "single")
    blob.unlink()
    shutil.copy(outside / manifest, blob)
    # the blobs/sha256 directory
    shutil.move(layout / "blobs/sha256", outside / "sha256")
    (layout / "blobs/sha256").symlink_to(outside / "sha256")
    with pytest.raises(LayoutError, match="symlink"):
        _manifest(layout, "single")
    (layout / "blobs/sha256").unlink()
    shutil.move(outside / "sha256", layout / "blobs/sha256")
    # index.json
    shutil.move(layout / "index.json", outside / "index.json")
    (layout / "index.json").symlink_to(outside / "index.json")
    with pytest.raises(LayoutError, match="symlink"):
        _manifest(layout, "single")


def test_not_regular_files(tmp_path: Path) -> None:
    layout = _copy(tmp_path)
    blob = layout / "blobs/sha256" / IMAGES["single"]["manifest_digest"][7:]
    blob.unlink()
    os.mkfifo(blob)  # opened without waiting for a writer, then refused
    with pytest.raises(LayoutError, match="not a regular file"):
        _manifest(layout, "single")
    blob.unlink()
    blob.mkdir()
    with pytest.raises(LayoutError):
        _manifest(layout, "single")


@pytest.mark.parametrize(
    "digest",
    ["sha256:../../secret", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "../x"],
)
def test_hostile_digests_are_never_opened(tmp_path: Path, digest: str) -> None:
    layout = _copy(tmp_path)
    (layout / "secret").write_text("{}")
    doc = _index(layout)
    doc["manifests"][0]["digest"] = digest
    _write_index(layout, doc)
    with pytest.raises(LayoutError, match="digest"):
        _manifest(layout, "single")
    with OciLayoutSource.open(LAYOUT, "single") as source:
        with pytest.raises(LayoutError, match="digest"):
            source.fetch_config(digest, 2)
        with pytest.raises(LayoutError, match="digest"), source.open_blob(digest, 2):
            pass


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"manifests": 3}', "no manifest list"),
        (b'{"manifests": [{"digest": 3}]}', "media type"),
        (b" " * (JSON_MAX + 1), "larger than"),
    ],
)
def test_bad_index_json(tmp_path: Path, content: bytes, match: str) -> None:
    layout = _copy(tmp_path)
    (layout / "index.json").write_bytes(content)
    with pytest.raises(LayoutError, match=match):
        _manifest(layout, "single")


def test_wrong_blobs(tmp_path: Path) -> None:
    layout = _copy(tmp_path)
    image = IMAGES["single"]
    manifest = layout / "blobs/sha256" / image["manifest_digest"][7:]
    original = manifest.read_bytes()
    manifest.write_bytes(original.replace(b"amd64", b"arm64").replace(b"2", b"3", 1))
    with pytest.raises(BlobDigestError, match="digest"):
        _manifest(layout, "single")
    manifest.write_bytes(original[:-1])
    with pytest.raises(BlobDigestError, match="bytes, not"):
        _manifest(layout, "single")
    manifest.write_bytes(original)
    layer = image["layers"][0]
    with OciLayoutSource.open(layout, "single") as source:
        with (
            pytest.raises(BlobDigestError, match="bytes, not"),
            source.open_blob(layer["blob_digest"], layer["blob_size"] + 1),
        ):
            pass
        with pytest.raises(LayoutError, match="larger than"):
            source.fetch_config(image["config_digest"], JSON_MAX + 1)
        (layout / "blobs/sha256" / layer["blob_digest"][7:]).unlink()
        with (
            pytest.raises(LayoutError, match="has no blob"),
            source.open_blob(layer["blob_digest"], layer["blob_size"]),
        ):
            pass


def test_not_a_layout(tmp_path: Path) -> None:
    layout = _copy(tmp_path)
    (layout / "oci-layout").unlink()
    with pytest.raises(LayoutError, match="oci-layout"):
        _manifest(layout, "single")
    with pytest.raises(LayoutError, match="cannot open"):
        OciLayoutSource.open(tmp_path / "none")
    (tmp_path / "file").write_text("")
    with pytest.raises(LayoutError, match="cannot open"):
        OciLayoutSource.open(tmp_path / "file")
