"""Fetching OCI images into a repository (ocipull.fetch_image): the golden layout,
re-fetches, bad input, a fetch killed mid-layer, two fetches at once, memory."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from backports import zstd

from composefsd import splitstream as ss
from composefsd.repository import Repository
from composefsd.repository.oci import open_image
from composefsd.repository.ocilayer import LayerDigestError, TarFormatError, import_layer
from composefsd.repository.ocilayout import OciLayoutSource
from composefsd.repository.ocipull import (
    BlobDigestError,
    BlobTransferError,
    ConfigFormatError,
    FetchResult,
    LayerFormatError,
    ManifestFormatError,
    PlatformError,
    PullResult,
    TagNotFoundError,
    UnsupportedMediaTypeError,
    fetch_image,
    pull,
)
from composefsd.repository.progress import Progress
from composefsd.repository.streams import cat, existing_stream, read_stream
from rsgolden import ALGORITHMS, RS
from test_oci_layer_import import layer_tar
from test_oci_write import _pulled_verity

SAME_ZSTD = ss.zstd_version_info()[:3] == (1, 5, 4)
LAYOUT = RS / "inputs" / "oci" / "layout"
MANIFEST = json.loads((RS / "inputs" / "oci" / "MANIFEST.json").read_text())
IMAGES = {i["tag"]: i for i in MANIFEST["images"]}
TAGS = [i["tag"] for i in MANIFEST["images"]]
LAYERS = {layer["name"]: layer for i in MANIFEST["images"] for layer in i["layers"]}
CHILD = Path(__file__).with_name("pullchild.py")
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = OCI_TAR + "+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _repo(tmp_path: Path, algorithm: str = "sha256") -> Repository:
    return Repository.init(
        tmp_path / "repo", algorithm=f"fsverity-{algorithm}-12", verity="disabled"
    )


def _fetch(repo: Repository, tag: str, layout: Path = LAYOUT, **kw: Any) -> FetchResult:
    with OciLayoutSource.open(layout, tag) as source:
        return fetch_image(repo, source, **kw)


def _state(repo: Repository) -> list[tuple[str, str]]:
    """Every entry below the repository: path and link target or size."""
    out = []
    for root, dirs, files in os.walk(repo.path):
        for name in dirs + files:
            path = Path(root, name)
            rel = str(path.relative_to(repo.path))
            if path.is_symlink():
                out.append((rel, os.readlink(path)))
            elif path.is_file():
                out.append((rel, str(path.stat().st_size)))
    return sorted(out)


def _assert_clean(repo: Repository, *absent: str) -> None:
    """fsck finds nothing fatal; none of the ``absent`` streams, and no manifest or
    config stream, is linked."""
    report = repo.fsck()
    assert report.ok, report.problems
    streams = repo.path / "streams"
    names = os.listdir(streams) if streams.exists() else []
    assert not [n for n in names if n.startswith(("oci-manifest-", "oci-config-"))]
    for content_id in absent:
        assert existing_stream(repo, content_id) is None, content_id


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class MemSource:
    """An image held in memory; ``short`` blobs end early, ``fail_exit`` blobs
    report a transfer error when closed."""

    def __init__(
        self,
        manifest: bytes,
        blobs: dict[str, bytes],
        *,
        short: dict[str, int] | None = None,
        fail_exit: frozenset[str] = frozenset(),
    ) -> None:
        self.manifest = manifest
        self.blobs = blobs
        self.short = short or {}
        self.fail_exit = fail_exit
        self.opened: list[str] = []

    def fetch_manifest(self) -> tuple[str, bytes]:
        return _sha256(self.manifest), self.manifest

    def fetch_config(self, digest: str, size: int) -> bytes:
        return self.blobs[digest]

    @contextlib.contextmanager
    def open_blob(self, digest: str, size: int) -> Iterator[BinaryIO]:
        self.opened.append(digest)
        data = self.blobs[digest][: self.short.get(digest)]
        yield io.BytesIO(data)
        if digest in self.fail_exit:
            raise OSError(5, "Input/output error")

    def close(self) -> None:
        pass


def _image(
    layers: list[tuple[bytes, str]],
    *,
    diff_ids: list[str] | None = None,
    config_media: str = OCI_CONFIG,
    arch: str = "amd64",
) -> MemSource:
    """An image of ``(blob, media type)`` layers; diff_ids default to the digests
    of the gunzipped blobs."""
    blobs: dict[str, bytes] = {}
    descs = []
    computed = []
    for blob, media in layers:
        digest = _sha256(blob)
        blobs[digest] = blob
        descs.append({"mediaType": media, "digest": digest, "size": len(blob)})
        gzipped = media.endswith("gzip") and diff_ids is None
        computed.append(_sha256(gzip.decompress(blob) if gzipped else blob))
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids or computed},
        }
    ).encode()
    blobs[_sha256(config)] = config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_media, "digest": _sha256(config), "size": len(config)},
            "layers": descs,
        }
    ).encode()
    return MemSource(manifest, blobs)


def _small_tar(name: str = "f", data: bytes = b"x" * 100) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- the golden layout ------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_golden_layout(tmp_path: Path, algorithm: str) -> None:
    """Tag by tag as cfsctl pulled them: layers stored once (reused layers
    skipped), every layer stream rebuilding its tar, and (same libzstd) the
    import-time manifest stream and the layer streams byte for byte cfsctl's."""
    repo = _repo(tmp_path, algorithm)
    seen: set[str] = set()
    caller = threading.get_ident()
    for tag in TAGS:
        events: list[Progress] = []

        def record(event: Progress, events: list[Progress] = events) -> None:
            assert threading.get_ident() == caller
            events.append(event)

        result = _fetch(repo, tag, progress=record, parallel=3)
        image = IMAGES[tag]
        assert result.manifest_digest == image["manifest_digest"]
        assert result.config_digest == image["config_digest"]
        assert result.is_container
        assert [x.diff_id for x in result.layers] == [x["diff_id"] for x in image["layers"]]
        assert [x.blob_digest for x in result.layers] == [x["blob_digest"] for x in image["layers"]]
        assert [x.skipped for x in result.layers] == [x["diff_id"] in seen for x in image["layers"]]
        if SAME_ZSTD:
            assert result.manifest_verity == _pulled_verity(algorithm, tag)
        # Progress: config first, manifest last; per fetched layer 0 .. total.
        assert events[0] == Progress("config", 0, None, image["config_digest"])
        assert events[-1] == Progress("manifest", 0, None, image["manifest_digest"])
        for layer in image["layers"]:
            mine = [e for e in events if e.detail == layer["diff_id"]]
            if layer["diff_id"] in seen:
                assert mine == [Progress("skip", 0, 0, layer["diff_id"])]
            else:
                assert mine[0] == Progress("fetch", 0, layer["blob_size"], layer["diff_id"])
                assert mine[-1] == Progress(
                    "fetch", layer["blob_size"], layer["blob_size"], layer["diff_id"]
                )
            seen.add(layer["diff_id"])
    assert_golden_layers(repo, algorithm)
    report = repo.fsck()
    assert report.ok, report.problems
    assert not [n for n in os.listdir(repo.objects_dir) if n.startswith(".")]


def test_refetch_skips_everything_and_writes_nothing(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    first = _fetch(repo, "multi")
    before = _state(repo)
    events: list[Progress] = []
    again = _fetch(repo, "multi", progress=events.append)
    assert again == FetchResult(
        first.manifest_digest,
        first.manifest_verity,
        first.config_digest,
        first.config_verity,
        True,
        tuple(
            type(x)(x.diff_id, x.blob_digest, x.media_type, x.size, x.verity, True)
            for x in first.layers
        ),
    )
    assert [e.phase for e in events] == ["config", "skip", "skip", "skip", "manifest"]
    assert _state(repo) == before


def test_existing_config_stream_is_reused(tmp_path: Path) -> None:
    """As composefs-rs: the layers come from the config stream's refs, the blobs
    are not opened, the manifest stream is written again the same."""
    repo = _repo(tmp_path)
    first = _fetch(repo, "multi")
    (repo.path / "streams" / ("oci-manifest-" + first.manifest_digest)).unlink()
    image = IMAGES["multi"]
    source = MemSource(
        (LAYOUT / "blobs/sha256" / image["manifest_digest"][7:]).read_bytes(), blobs={}
    )
    again = fetch_image(repo, source)
    assert source.opened == []
    assert again.manifest_verity == first.manifest_verity
    assert all(x.skipped for x in again.layers)


def test_layer_present_from_another_image_is_not_read(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    _fetch(repo, "multi")
    shared = IMAGES["shared"]
    blobs = {
        d: (LAYOUT / "blobs/sha256" / d[7:]).read_bytes()
        for d in [shared["config_digest"]] + [x["blob_digest"] for x in shared["layers"]]
    }
    source = MemSource(
        (LAYOUT / "blobs/sha256" / shared["manifest_digest"][7:]).read_bytes(), blobs
    )
    result = fetch_image(repo, source)
    assert source.opened == [shared["layers"][2]["blob_digest"]]
    assert [x.skipped for x in result.layers] == [True, True, False]


# -- bad input ---------------------------------------------------------------------------


def _copy_layout(tmp_path: Path) -> Path:
    copy = tmp_path / "layout"
    shutil.copytree(LAYOUT, copy)
    return copy


@pytest.mark.parametrize("name", ["multi-l1", "multi-l2", "multi-l3"])
def test_corrupted_blob(tmp_path: Path, name: str) -> None:
    """One byte of a tar, gzip or zstd blob changed: BlobDigestError naming the
    layer (whatever the decompressor or tar reader made of it), nothing linked
    for it, fsck clean."""
    layout = _copy_layout(tmp_path)
    layer = LAYERS[name]
    blob = layout / "blobs/sha256" / layer["blob_digest"][7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x20
    blob.write_bytes(bytes(data))
    repo = _repo(tmp_path)
    with pytest.raises(BlobDigestError) as caught:
        _fetch(repo, "multi", layout)
    assert caught.value.layer == layer["diff_id"]
    assert caught.value.digest == layer["blob_digest"]
    assert layer["diff_id"] in str(caught.value)
    _assert_clean(repo, "oci-layer-" + layer["diff_id"])
    # The layout repaired, the next fetch completes and reuses what was done.
    blob.write_bytes((LAYOUT / "blobs/sha256" / layer["blob_digest"][7:]).read_bytes())
    result = _fetch(repo, "multi", layout)
    assert not next(x for x in result.layers if x.diff_id == layer["diff_id"]).skipped


@pytest.mark.parametrize("keep", [0, 1, 100, 3000])
def test_truncated_layer(tmp_path: Path, keep: int) -> None:
    gz = gzip.compress(layer_tar("multi-l2"), mtime=0)
    source = _image([(gz, OCI_GZIP)])
    source.short = {_sha256(gz): keep}
    repo = _repo(tmp_path)
    with pytest.raises(BlobDigestError, match=f"ends after {keep} of {len(gz)} bytes"):
        fetch_image(repo, source)
    _assert_clean(repo, "oci-layer-" + LAYERS["multi-l2"]["diff_id"])


def test_truncated_blob_in_layout(tmp_path: Path) -> None:
    layout = _copy_layout(tmp_path)
    layer = LAYERS["multi-l1"]
    blob = layout / "blobs/sha256" / layer["blob_digest"][7:]
    blob.write_bytes(blob.read_bytes()[:-512])
    repo = _repo(tmp_path)
    with pytest.raises(BlobDigestError, match="bytes, not"):
        _fetch(repo, "multi", layout)
    _assert_clean(repo, "oci-layer-" + layer["diff_id"])


def test_wrong_diff_id(tmp_path: Path) -> None:
    tar = _small_tar()
    wrong = _sha256(b"something else")
    source = _image([(tar, OCI_TAR)], diff_ids=[wrong])
    repo = _repo(tmp_path)
    with pytest.raises(LayerDigestError, match=wrong):
        fetch_image(repo, source)
    _assert_clean(repo, "oci-layer-" + wrong, "oci-layer-" + _sha256(tar))


def test_transfer_error_at_the_end_links_nothing(tmp_path: Path) -> None:
    tar = _small_tar()
    source = _image([(tar, OCI_TAR)])
    source.fail_exit = frozenset({_sha256(tar)})
    repo = _repo(tmp_path)
    with pytest.raises(BlobTransferError, match="Input/output error"):
        fetch_image(repo, source)
    _assert_clean(repo, "oci-layer-" + _sha256(tar))


def test_compression_told_by_the_bytes(tmp_path: Path) -> None:
    """skopeo 1.9.3 labels docker-archive's uncompressed layers ``tar+gzip``: the
    blob's first bytes decide, and a zstd blob labelled gzip is read too."""
    tar = _small_tar()
    zstd_blob = bytes(zstd.compress(tar))
    source = _image([(tar, OCI_GZIP), (zstd_blob, OCI_GZIP)], diff_ids=[_sha256(tar), _sha256(tar)])
    repo = _repo(tmp_path)
    result = fetch_image(repo, source)
    assert [layer.diff_id for layer in result.layers] == [_sha256(tar), _sha256(tar)]
    report = repo.fsck()
    assert report.ok, report.problems


def test_broken_gzip(tmp_path: Path) -> None:
    """A blob with the right digest that starts as gzip and is not."""
    tar = _small_tar()
    blob = b"\x1f\x8b\x08\x00" + b"\xff" * 600
    source = _image([(blob, OCI_GZIP)], diff_ids=[_sha256(tar)])
    repo = _repo(tmp_path)
    with pytest.raises(LayerFormatError, match="cannot decompress"):
        fetch_image(repo, source)
    _assert_clean(repo, "oci-layer-" + _sha256(tar))


def test_not_a_tar(tmp_path: Path) -> None:
    blob = b"\x01" * 1024
    source = _image([(blob, OCI_TAR)])
    repo = _repo(tmp_path)
    with pytest.raises(TarFormatError):
        fetch_image(repo, source)
    _assert_clean(repo, "oci-layer-" + _sha256(blob))


def _reading_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("oci-read-")]


@pytest.mark.parametrize("where", ["tar", "gzip"])
def test_failure_far_behind_the_reading_thread(tmp_path: Path, where: str) -> None:
    """The tar breaks at its first header, the layer's reading thread blocked
    many chunks ahead; or the gzip stream breaks in the middle, in that thread:
    the typed error comes out, the thread ends, nothing is linked."""
    big = hashlib.sha256(b"seed").digest() * (12 << 15)  # 12 MiB, compressible
    tar = bytearray(_small_tar("big", big))
    if where == "tar":
        tar[148] ^= 1  # the header's checksum
        blob = gzip.compress(bytes(tar), mtime=0)
        error: type[Exception] = TarFormatError
    else:
        whole = gzip.compress(bytes(tar), mtime=0)
        blob = whole[: len(whole) // 2] + bytes(len(whole) - len(whole) // 2)
        error = LayerFormatError
    source = _image([(blob, OCI_GZIP)], diff_ids=[_sha256(bytes(tar))])
    repo = _repo(tmp_path)
    with pytest.raises(error):
        fetch_image(repo, source)
    assert _reading_threads() == []
    _assert_clean(repo, "oci-layer-" + _sha256(bytes(tar)))


def test_one_bad_layer_of_several(tmp_path: Path) -> None:
    """The good layers may complete (and are reused later); the bad one is not linked."""
    good = [gzip.compress(_small_tar(f"f{i}", bytes([i]) * 200), mtime=0) for i in range(4)]
    bad = _small_tar("bad")
    source = _image([(g, OCI_GZIP) for g in good] + [(bad, OCI_TAR)], diff_ids=None)
    source.short = {_sha256(bad): 10}
    repo = _repo(tmp_path)
    with pytest.raises(BlobDigestError):
        fetch_image(repo, source, parallel=2)
    _assert_clean(repo, "oci-layer-" + _sha256(bad))
    source.short = {}
    result = fetch_image(repo, source, parallel=2)
    assert not result.layers[-1].skipped


def test_other_architecture(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    fd = os.open(LAYOUT, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with (
            OciLayoutSource(fd, "multi", arch="s390x") as source,
            pytest.raises(PlatformError, match=r"linux/s390x.*linux/amd64"),
        ):
            fetch_image(repo, source)
    finally:
        os.close(fd)
    _assert_clean(repo)


def test_missing_tag(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    with pytest.raises(TagNotFoundError, match="'nope'"):
        _fetch(repo, "nope")
    _assert_clean(repo)


def test_index_instead_of_manifest(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    index = (LAYOUT / "index.json").read_bytes()
    with pytest.raises(ManifestFormatError, match="index"):
        fetch_image(repo, MemSource(index, {}))
    _assert_clean(repo)


@pytest.mark.parametrize(
    "change, error",
    [
        (
            {"mediaType": "application/vnd.docker.distribution.manifest.v1+json"},
            UnsupportedMediaTypeError,
        ),
        ({"schemaVersion": 1}, ManifestFormatError),
        ({"layers": "no"}, ManifestFormatError),
        (
            {"config": {"mediaType": OCI_CONFIG, "digest": "sha256:../../etc/shadow", "size": 1}},
            ManifestFormatError,
        ),
        (
            {"config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + "A" * 64, "size": 1}},
            ManifestFormatError,
        ),
        (
            {"config": {"mediaType": OCI_CONFIG, "digest": "md5:" + "a" * 32, "size": 1}},
            ManifestFormatError,
        ),
        (
            {"config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + "a" * 64, "size": -1}},
            ManifestFormatError,
        ),
        (
            {"config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + "a" * 64, "size": True}},
            ManifestFormatError,
        ),
        (
            {"config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + "a" * 64, "size": 1 << 40}},
            ConfigFormatError,
        ),
        (
            {
                "layers": [
                    {"mediaType": "application/x-foo", "digest": "sha256:" + "a" * 64, "size": 1}
                ]
            },
            UnsupportedMediaTypeError,
        ),
        (
            {"layers": [{"mediaType": OCI_TAR, "digest": "sha256:../" + "a" * 61, "size": 1}]},
            ManifestFormatError,
        ),
    ],
)
def test_hostile_manifest(tmp_path: Path, change: dict[str, Any], error: type[Exception]) -> None:
    tar = _small_tar()
    source = _image([(tar, OCI_TAR)])
    doc = json.loads(source.manifest)
    doc.update(change)
    source.manifest = json.dumps(doc).encode()
    repo = _repo(tmp_path)
    with pytest.raises(error):
        fetch_image(repo, source)
    assert source.opened == []
    _assert_clean(repo)


@pytest.mark.parametrize(
    "manifest",
    [b"", b"[]", b"{", b"\xff", b"[" * 100000, b" " * (5 << 20)],
)
def test_manifest_not_json(tmp_path: Path, manifest: bytes) -> None:
    repo = _repo(tmp_path)
    with pytest.raises(ManifestFormatError):
        fetch_image(repo, MemSource(manifest, {}))


def test_manifest_stored_under_the_source_digest(tmp_path: Path) -> None:
    """A source names the manifest; skopeo's OCI conversion of a Docker manifest
    keeps the Docker digest, which is not the JSON's sha256: stored under it."""
    source = _image([(_small_tar(), OCI_TAR)])
    real = source.manifest
    named = _sha256(b"the docker manifest")
    source.fetch_manifest = lambda: (named, real)  # type: ignore[method-assign]
    repo = _repo(tmp_path)
    result = fetch_image(repo, source)
    assert result.manifest_digest == named
    assert existing_stream(repo, "oci-manifest-" + named) == result.manifest_verity
    report = repo.fsck()
    assert report.ok, report.problems


@pytest.mark.parametrize(
    "config",
    [
        b"not json",
        json.dumps({"rootfs": {}}).encode(),
        json.dumps({"rootfs": {"diff_ids": []}}).encode(),
        json.dumps({"rootfs": {"diff_ids": ["sha256:../../x"]}}).encode(),
        json.dumps({"rootfs": {"diff_ids": [7]}}).encode(),
    ],
)
def test_hostile_config(tmp_path: Path, config: bytes) -> None:
    source = _image([(_small_tar(), OCI_TAR)])
    doc = json.loads(source.manifest)
    doc["config"] = {"mediaType": OCI_CONFIG, "digest": _sha256(config), "size": len(config)}
    source.blobs[_sha256(config)] = config
    source.manifest = json.dumps(doc).encode()
    repo = _repo(tmp_path)
    with pytest.raises(ConfigFormatError):
        fetch_image(repo, source)
    assert source.opened == []
    _assert_clean(repo)


def test_config_digest_checked(tmp_path: Path) -> None:
    source = _image([(_small_tar(), OCI_TAR)])
    config_digest = json.loads(source.manifest)["config"]["digest"]
    source.blobs[config_digest] = source.blobs[config_digest].replace(b"amd64", b"arm64")
    repo = _repo(tmp_path)
    with pytest.raises(BlobDigestError, match="config"):
        fetch_image(repo, source)
    _assert_clean(repo)


def test_artifact(tmp_path: Path) -> None:
    """A non-tar layer of an artifact: one object in an ``oci_blob`` stream named
    by the blob's digest, as composefs-rs's pull stores it."""
    blob = b"an SBOM, say\n" * 10
    source = _image(
        [(blob, "application/spdx+json")], config_media="application/vnd.oci.empty.v1+json"
    )
    repo = _repo(tmp_path)
    result = fetch_image(repo, source)
    assert not result.is_container
    assert [x.diff_id for x in result.layers] == [_sha256(blob)]
    verity = existing_stream(repo, "oci-layer-" + _sha256(blob))
    assert verity == result.layers[0].verity
    with repo.object_store() as store:
        assert read_stream(store, verity).refs.content_type == int.from_bytes(b"oci_blob", "little")
        out = io.BytesIO()
        cat(store, verity, out)
        assert out.getvalue() == blob
        image = open_image(repo, store, result.manifest_digest)
    assert image.layer_refs == {_sha256(blob): verity}
    assert repo.fsck().ok
    # corrupted: nothing linked
    repo2 = Repository.init(tmp_path / "repo2", algorithm="fsverity-sha256-12", verity="disabled")
    source.blobs[_sha256(blob)] = blob.upper()
    with pytest.raises(BlobDigestError):
        fetch_image(repo2, source)
    _assert_clean(repo2, "oci-layer-" + _sha256(blob))


def test_parallel_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        fetch_image(_repo(tmp_path), _image([(_small_tar(), OCI_TAR)]), parallel=0)


# -- killed, concurrent, memory ------------------------------------------------------------


def _child(
    repo: Repository, tag: str, *args: str, layout: Path = LAYOUT, **kw: Any
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CHILD.parent), *sys.path]))
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(repo.path), str(layout), tag, *args],
        env=env,
        stdout=subprocess.PIPE,
        **kw,
    )


def _wait_byte(fd: int) -> bytes:
    # A guard against a hang, not a timing assertion: the byte comes at once.
    ready, _, _ = select.select([fd], [], [], 300)
    assert ready, "the child never reached its pause"
    return os.read(fd, 1)


def test_killed_mid_layer(tmp_path: Path) -> None:
    """SIGKILL while the last layer is half read: fsck is clean, the layers
    completed before are kept and reused, the next fetch completes."""
    repo = _repo(tmp_path)
    image = IMAGES["multi"]
    l1, l2, l3 = image["layers"]  # fetched in this order: largest first, one at a time
    signal_r, signal_w = os.pipe()
    wait_r, wait_w = os.pipe()
    child = _child(
        repo,
        "multi",
        "--pause",
        f"{l3['blob_digest']}:1000:{signal_w}:{wait_r}",
        pass_fds=(signal_w, wait_r),
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_byte(signal_r) == b"P"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
        for fd in (signal_r, signal_w, wait_r, wait_w):
            os.close(fd)
    assert child.returncode == -signal.SIGKILL
    assert existing_stream(repo, "oci-layer-" + l1["diff_id"]) is not None
    assert existing_stream(repo, "oci-layer-" + l2["diff_id"]) is not None
    _assert_clean(repo, "oci-layer-" + l3["diff_id"])
    events: list[Progress] = []
    result = _fetch(repo, "multi", progress=events.append)
    assert [x.skipped for x in result.layers] == [True, True, False]
    if SAME_ZSTD:
        assert result.manifest_verity == _pulled_verity("sha256", "multi")
    report = repo.fsck()
    assert report.ok, report.problems


def test_concurrent_fetches_store_each_layer_once(tmp_path: Path) -> None:
    """Fetch A (multi) pauses inside the shared first layer; fetch B (shared)
    then waits for that layer's lock (its log says so) and reuses it once A
    finishes. Every layer is imported exactly once across both."""
    repo = _repo(tmp_path)
    multi, shared = IMAGES["multi"], IMAGES["shared"]
    l1 = multi["layers"][0]
    signal_r, signal_w = os.pipe()
    wait_r, wait_w = os.pipe()
    a_log = tmp_path / "a.log"
    with open(a_log, "wb") as a_err:
        a = _child(
            repo,
            "multi",
            "--pause",
            f"{l1['blob_digest']}:1000:{signal_w}:{wait_r}",
            pass_fds=(signal_w, wait_r),
            stderr=a_err,
        )
    b_lines: list[str] = []
    try:
        assert _wait_byte(signal_r) == b"P"
        b = _child(repo, "shared", stderr=subprocess.PIPE)
        assert b.stderr is not None
        waiting = "waiting for another fetch of oci-layer-" + l1["diff_id"]
        while True:
            ready, _, _ = select.select([b.stderr], [], [], 300)
            assert ready, "fetch B never waited for the layer lock"
            line = b.stderr.readline().decode()
            assert line, "fetch B ended before waiting for the layer"
            b_lines.append(line)
            if waiting in line:
                break
        os.write(wait_w, b"go")
        a_out, _ = a.communicate()
        b_out, b_rest = b.communicate()
        b_lines += b_rest.decode().splitlines()
    finally:
        for fd in (signal_r, signal_w, wait_r, wait_w):
            os.close(fd)
    assert a.returncode == 0 and b.returncode == 0
    a_result, b_result = json.loads(a_out), json.loads(b_out)
    assert not any(a_result["layers"].values())
    assert b_result["layers"][l1["diff_id"]] is True
    logs = a_log.read_text() + "".join(b_lines)
    for layer in {x["diff_id"] for x in multi["layers"] + shared["layers"]}:
        assert logs.count(f"imported layer {layer} ") == 1, layer
    report = repo.fsck()
    assert report.ok, report.problems
    assert not [n for n in os.listdir(repo.objects_dir) if n.startswith(".")]


class _Zeros(io.RawIOBase):
    def __init__(self, size: int, head: bytes) -> None:
        self.left = size
        self.head = head

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        if self.head:
            k = min(n, len(self.head))
            buf[:k] = self.head[:k]
            self.head = self.head[k:]
        self.left -= n
        return n


class _Hashing(io.RawIOBase):
    def __init__(self, out: BinaryIO | gzip.GzipFile) -> None:
        self.out = out
        self.hash = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return self.out.write(data)


def _big_layout(root: Path, files: int, size: int) -> None:
    """An OCI layout of one gzip layer: ``files`` files of ``size`` bytes, zeros
    but for a distinct head (distinct objects), written without holding it."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tmp = root / "layer.tmp"
    with open(tmp, "wb") as raw:
        blob_hash = _Hashing(raw)
        with gzip.GzipFile(fileobj=blob_hash, mode="wb", compresslevel=1, mtime=0) as gz:
            tar_hash = _Hashing(gz)
            with tarfile.open(fileobj=tar_hash, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for i in range(files):
                    info = tarfile.TarInfo(f"f{i:04d}")
                    info.size = size
                    tar.addfile(info, _Zeros(size, f"file {i}\n".encode()))
    blob_digest = "sha256:" + blob_hash.hash.hexdigest()
    diff_id = "sha256:" + tar_hash.hash.hexdigest()
    tmp.rename(blobs / blob_digest[7:])
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    (blobs / _sha256(config)[7:]).write_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": _sha256(config), "size": len(config)},
            "layers": [
                {
                    "mediaType": OCI_GZIP,
                    "digest": blob_digest,
                    "size": (blobs / blob_digest[7:]).stat().st_size,
                }
            ],
        }
    ).encode()
    (blobs / _sha256(manifest)[7:]).write_bytes(manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": _sha256(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "big"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def test_memory_stays_bounded(tmp_path: Path) -> None:
    """A 200 MB layer (gzip, a few hundred KB): the fetching process's peak RSS
    grows by far less than the layer."""
    layout = tmp_path / "big"
    _big_layout(layout, files=100, size=2 << 20)
    repo = _repo(tmp_path)
    child = _child(repo, "big", "--rss", layout=layout, stderr=subprocess.PIPE)
    out, err = child.communicate()
    assert child.returncode == 0, err.decode()
    result = json.loads(out)
    growth_kib = result["rss_after"] - result["rss_before"]
    assert growth_kib < 64 * 1024, growth_kib
    assert list(result["layers"].values()) == [False]
    stored = sum(p.stat().st_size for p in repo.objects_dir.glob("??/*"))
    assert stored >= 100 * (2 << 20)
    assert repo.fsck().ok


# -- threads -------------------------------------------------------------------------------


class _Gate:
    """Wraps a blob: the first read announces itself and waits to be released."""

    def __init__(self, raw: BinaryIO, started: threading.Event, release: threading.Event) -> None:
        self.raw = raw
        self.started = started
        self.release = release

    def read(self, n: int = -1) -> bytes:
        if not self.started.is_set():
            self.started.set()
            assert self.release.wait(300), "never released"
        return self.raw.read(n)


class GatedSource(MemSource):
    def __init__(self, base: MemSource, gated: str) -> None:
        super().__init__(base.manifest, base.blobs)
        self.gated = gated
        self.started = threading.Event()
        self.release = threading.Event()

    @contextlib.contextmanager
    def open_blob(self, digest: str, size: int) -> Iterator[BinaryIO]:
        with super().open_blob(digest, size) as raw:
            if digest == self.gated:
                yield _Gate(raw, self.started, self.release)  # type: ignore[misc]
            else:
                yield raw


class _Seen(logging.Handler):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def _in_thread(target: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = target(*args)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_threads_fetching_one_layer_store_it_once(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    gz = gzip.compress(_small_tar("f", b"y" * 5000), mtime=0)
    base = _image([(gz, OCI_GZIP)])
    first = GatedSource(base, _sha256(gz))
    diff_id = _sha256(gzip.decompress(gz))
    seen = _Seen("waiting for another fetch of oci-layer-" + diff_id)
    logger = logging.getLogger("composefsd.repository.ocipull")
    logger.addHandler(seen)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        t1, out1 = _in_thread(fetch_image, repo, first)
        assert first.started.wait(300)
        second = MemSource(base.manifest, base.blobs)
        t2, out2 = _in_thread(fetch_image, repo, second)
        assert seen.event.wait(300), "the second fetch never waited for the layer"
        first.release.set()
        t1.join()
        t2.join()
    finally:
        first.release.set()
        logger.removeHandler(seen)
        logger.setLevel(old_level)
    assert "error" not in out1 and "error" not in out2, (out1, out2)
    assert second.opened == []
    assert out2["result"].layers[0].skipped and not out1["result"].layers[0].skipped
    assert out1["result"].manifest_verity == out2["result"].manifest_verity
    assert repo.fsck().ok


def test_gc_waiting_does_not_block_the_fetch_workers(tmp_path: Path) -> None:
    """GC asks for the repository while a fetch is under way: it waits at the
    turnstile, the fetch's workers go on (they join the caller's lock instead of
    passing the turnstile), the fetch completes, then GC runs."""
    repo = _repo(tmp_path)
    big = _small_tar("big", b"b" * 20000)
    small = _small_tar("small", b"s" * 100)
    source = GatedSource(_image([(big, OCI_TAR), (small, OCI_TAR)]), _sha256(big))
    fetch, fetch_out = _in_thread(lambda: fetch_image(repo, source, parallel=1))
    try:
        assert source.started.wait(300)
        gc, gc_out = _in_thread(repo.gc)
        turnstile = os.open(repo.objects_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # Until GC holds the turnstile (a condition, not a timing).
            while True:
                try:
                    fcntl.flock(turnstile, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    break
                fcntl.flock(turnstile, fcntl.LOCK_UN)
                threading.Event().wait(0.01)
        finally:
            os.close(turnstile)
    finally:
        source.release.set()
    fetch.join(300)
    assert not fetch.is_alive(), "the fetch deadlocked behind GC"
    gc.join(300)
    assert "error" not in fetch_out and "error" not in gc_out, (fetch_out, gc_out)
    assert [x.skipped for x in fetch_out["result"].layers] == [False, False]
    assert repo.fsck().ok


@pytest.mark.parametrize(
    "media, compress",
    [
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", lambda d: gzip.compress(d, mtime=0)),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", lambda d: d),
        ("application/vnd.oci.image.layer.v1.tar+zstd", lambda d: bytes(zstd.compress(d))),
    ],
)
def test_layer_media_types(tmp_path: Path, media: str, compress: Any) -> None:
    tar = _small_tar("f", b"z" * 3000)
    source = _image([(compress(tar), media)], diff_ids=[_sha256(tar)])
    repo = _repo(tmp_path)
    result = fetch_image(repo, source)
    assert result.layers[0].verity == existing_stream(repo, "oci-layer-" + _sha256(tar))
    with repo.object_store() as store:
        out = io.BytesIO()
        cat(store, result.layers[0].verity, out)
    assert out.getvalue() == tar


def test_import_layer_check_runs_before_the_link(tmp_path: Path) -> None:
    """ocilayer.import_layer's ``check``: after the whole tar, before any link;
    not at all when the stream exists."""
    repo = _repo(tmp_path)
    tar = _small_tar()
    calls: list[bool] = []

    def refuse() -> None:
        calls.append(existing_stream(repo, "oci-layer-" + _sha256(tar)) is None)
        raise BlobDigestError("no", digest=_sha256(tar))

    with pytest.raises(BlobDigestError):
        import_layer(repo, io.BytesIO(tar), _sha256(tar), check=refuse)
    assert calls == [True]
    assert existing_stream(repo, "oci-layer-" + _sha256(tar)) is None
    import_layer(repo, io.BytesIO(tar), _sha256(tar), check=lambda: calls.append(False))
    import_layer(repo, io.BytesIO(b""), _sha256(tar), check=refuse)
    assert calls == [True, False]


# -- pull: the composefs image of a re-pull ----------------------------------------------


def _pull_tag(repo: Repository, tag: str, **kw: Any) -> PullResult:
    with OciLayoutSource.open(LAYOUT, tag) as source:
        return pull(repo, source, tag=tag, **kw)


def test_repull_reuses_the_built_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image the config stream names (present in images/) is not built again;
    the result, the tag and every file are as before. With that image file gone,
    the pull builds it again."""
    from composefsd.repository import ocibuild

    repo = _repo(tmp_path)
    first = _pull_tag(repo, "multi")
    assert first.image_id is not None
    before = _state(repo)
    built: list[str] = []
    real = ocibuild.ensure_image

    def counting(*args: Any, **kw: Any) -> str | None:
        built.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(ocibuild, "ensure_image", counting)
    again = _pull_tag(repo, "multi")
    assert built == []
    assert again.image_id == first.image_id
    assert _state(repo) == before
    (repo.images_dir / first.image_id).unlink()
    assert _pull_tag(repo, "multi").image_id == first.image_id
    assert built == [first.manifest_digest]
    assert _state(repo) == before
    # A bootable pull of an image built plain builds the boot image, then reuses both.
    _pull_tag(repo, "boot")
    assert len(built) == 2
    boot = _pull_tag(repo, "boot", bootable=True)
    assert boot.boot_image_id is not None and len(built) == 4
    again = _pull_tag(repo, "boot", bootable=True)
    assert (again.image_id, again.boot_image_id) == (boot.image_id, boot.boot_image_id)
    assert len(built) == 4
    report = repo.fsck()
    assert report.ok, report.problems


def assert_golden_layers(repo: Repository, algorithm: str) -> None:
    """Every golden layer is in ``repo``: its stream gives back the exact tar and
    (same libzstd) is byte for byte cfsctl's."""
    golden = RS / "expected" / "oci" / algorithm / "streams-after-pulls"
    with repo.object_store() as store:
        for layer in LAYERS.values():
            verity = existing_stream(repo, "oci-layer-" + layer["diff_id"])
            assert verity is not None
            out = io.BytesIO()
            cat(store, verity, out)
            assert out.getvalue() == layer_tar(layer["name"])
            if SAME_ZSTD:
                name = "oci-layer-" + layer["diff_id"].replace(":", "_") + ".splitstream"
                assert repo.object_path(verity).read_bytes() == (golden / name).read_bytes()
