"""End to end: ``pull()`` through :class:`ImageProxyPool` (skopeo's proxies, as the
daemon runs them) from a real registry on loopback and from skopeo's local
transports, checked against composefs-rs's golden data, ``umoci unpack`` and the
native ``oci:`` reader; bad input, kills and concurrent pulls."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any, BinaryIO

import pytest

import treecompare
from composefsd.repository import Repository
from composefsd.repository.oci import iter_tags, list_images, open_stored, open_tag
from composefsd.repository.ocibuild import OciBuildError, build_tree
from composefsd.repository.ocilayer import TarFormatError
from composefsd.repository.ocilayout import OciLayoutSource
from composefsd.repository.ocipull import BlobDigestError, PullResult, pull
from composefsd.repository.progress import Progress
from composefsd.repository.streams import existing_stream
from composefsd.service.imageproxy import BlobTransferError as ProxyBlobTransferError
from composefsd.service.imageproxy import (
    ImageNotFoundError,
    ImageProxyPool,
    PlatformNotFoundError,
    ProxyAuthError,
    ProxyDiedError,
    ProxyOptions,
    ProxyTLSError,
)
from holdproxy import BOUND, HoldingProxy
from registry import (
    AUTH,
    GOLDEN_TAGS,
    CuttingProxy,
    LayoutImage,
    Registry,
    add_index,
    copy,
    pid_is_reaped,
    vfs_storage,
    write_layout,
)
from rsgolden import ALGORITHMS
from servicehelpers import unmount_below
from test_oci_build import _compute_id_stdout
from test_oci_pull import IMAGES, SAME_ZSTD, _state, assert_golden_layers
from test_oci_umoci import _layers as umoci_layers
from test_oci_umoci import _mounted as mounted_tree
from test_oci_umoci import _umocis as umocis_tree
from test_oci_umoci import default_transformed
from test_oci_write import _pulled_verity

PLAIN = ProxyOptions(tls_verify=False)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _repo(tmp_path: Path, algorithm: str = "sha256", name: str = "repo") -> Repository:
    return Repository.init(tmp_path / name, algorithm=f"fsverity-{algorithm}-12", verity="disabled")


class Counting:
    """An image source handing on a pool's, recording which blobs were opened."""

    def __init__(self, pool: ImageProxyPool) -> None:
        self.pool = pool
        self.opened: list[str] = []

    def fetch_manifest(self) -> tuple[str, bytes]:
        return self.pool.fetch_manifest()

    def fetch_config(self, digest: str, size: int) -> bytes:
        return self.pool.fetch_config(digest, size)

    def open_blob(self, digest: str, size: int) -> contextlib.AbstractContextManager[BinaryIO]:
        self.opened.append(digest)
        return self.pool.open_blob(digest, size)

    def close(self) -> None:
        self.pool.close()


def _pull(
    repo: Repository,
    reference: str,
    options: ProxyOptions = PLAIN,
    *,
    tag: str | None = None,
    bootable: bool = False,
    parallel: int = 2,
) -> tuple[PullResult, list[Progress], list[str]]:
    """``pull()`` from ``reference`` through a pool of ``parallel`` proxies:
    the result, every progress event, the blobs opened."""
    events: list[Progress] = []
    with ImageProxyPool(reference, options, creds=None, size=parallel) as pool:
        source = Counting(pool)
        result = pull(
            repo, source, tag=tag, bootable=bootable, progress=events.append, parallel=parallel
        )
    return result, events, source.opened


def _phase(events: list[Progress], phase: str) -> set[str | None]:
    return {e.detail for e in events if e.phase == phase}


def _native(repo: Repository, layout: Path, tag: str) -> PullResult:
    """The same image pulled by the native ``oci:`` reader (no skopeo)."""
    with OciLayoutSource.open(layout, tag) as source:
        return pull(repo, source)


def _assert_safe(repo: Repository, tags: dict[str, str]) -> None:
    """fsck is clean and the tags are exactly ``tags`` (none written, none moved)."""
    report = repo.fsck()
    assert report.ok, report.problems
    assert dict(iter_tags(repo)) == tags


# -- the golden images ------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_golden_tags(golden_registry: dict[str, str], tmp_path: Path, algorithm: str) -> None:
    """Tag by tag as cfsctl pulled them: its image ids (``--bootable`` for boot),
    its printed manifest verity, its layer streams; a layer present is never
    fetched (``shared`` fetches only its own last layer)."""
    repo = _repo(tmp_path, algorithm)
    seen: set[str] = set()
    results: dict[str, PullResult] = {}
    for tag in GOLDEN_TAGS:
        image = IMAGES[tag]
        bootable = tag.startswith("boot")
        result, events, opened = _pull(repo, golden_registry[tag], tag=tag, bootable=bootable)
        results[tag] = result
        assert result.manifest_digest == image["manifest_digest"]
        assert result.config_digest == image["config_digest"]
        assert result.image_id == _compute_id_stdout(algorithm, tag)
        boot = _compute_id_stdout(algorithm, tag, "--bootable ") if bootable else None
        assert result.boot_image_id == boot
        if SAME_ZSTD:
            assert result.manifest_verity == _pulled_verity(algorithm, tag)
        new = [x for x in image["layers"] if x["diff_id"] not in seen]
        assert _phase(events, "fetch") == {x["diff_id"] for x in new}
        assert _phase(events, "skip") == {x["diff_id"] for x in image["layers"]} - {
            x["diff_id"] for x in new
        }
        assert sorted(opened) == sorted(x["blob_digest"] for x in new)
        seen |= {x["diff_id"] for x in image["layers"]}
        with repo.object_store() as store:
            assert open_tag(repo, store, tag).manifest_digest == image["manifest_digest"]
    assert len(IMAGES["shared"]["layers"]) == 3  # two shared with multi: one fetched
    assert_golden_layers(repo, algorithm)
    report = repo.fsck()
    assert report.ok, report.problems
    assert dict(iter_tags(repo)) == {t: IMAGES[t]["manifest_digest"] for t in GOLDEN_TAGS}

    # Again: every layer skipped, no blob opened, not one byte written.
    before = _state(repo)
    for tag in GOLDEN_TAGS:
        again, events, opened = _pull(
            repo, golden_registry[tag], tag=tag, bootable=tag.startswith("boot")
        )
        assert opened == [] and _phase(events, "fetch") == set()
        assert _phase(events, "skip") == {x["diff_id"] for x in IMAGES[tag]["layers"]}
        assert (again.image_id, again.boot_image_id) == (
            results[tag].image_id,
            results[tag].boot_image_id,
        )
        # The manifest stream now names its image (rewritten by the first pull).
        current = existing_stream(repo, "oci-manifest-" + IMAGES[tag]["manifest_digest"])
        assert again.manifest_verity == current
        assert all(x.skipped for x in again.layers)
    assert _state(repo) == before


# -- images of our own: registries with TLS and auth, skopeo's transports ---------------------


def tree_tar(files: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed layer of regular files and every parent directory of
    theirs (deterministic: fixed mtimes and owners)."""
    out = io.BytesIO()
    dirs: set[str] = set()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            parts = name.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent not in dirs:
                    dirs.add(parent)
                    info = tarfile.TarInfo(parent)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, LayoutImage]]:
    """``base`` (two gzip layers) and ``more`` (base's first layer and a new one)."""
    layout = tmp_path_factory.mktemp("small") / "layout"
    shared = tree_tar(
        [("usr/bin/tool", b"#!/bin/sh\n" * 500), ("usr/lib/lib.so", os.urandom(20_000))]
    )
    base = tree_tar([("etc/os-release", b"ID=base\n"), ("var/data", os.urandom(9000))])
    more = tree_tar([("etc/os-release", b"ID=more\n")])
    images = write_layout(layout, {"base": [shared, base], "more": [shared, more]})
    return layout, images


@pytest.fixture(scope="module")
def expected(
    small: tuple[Path, dict[str, LayoutImage]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, PullResult]:
    """Each tag of ``small`` as the native ``oci:`` reader pulls it."""
    repo = _repo(tmp_path_factory.mktemp("native"))
    layout, images = small
    return {tag: _native(repo, layout, tag) for tag in images}


def _fresh(result: PullResult) -> PullResult:
    """The result as a pull into an empty repository gives it (nothing skipped)."""
    layers = tuple(dataclasses.replace(x, skipped=False) for x in result.layers)
    return dataclasses.replace(result, layers=layers)


def _same_image(result: PullResult, want: PullResult) -> None:
    assert result.image_id == want.image_id
    assert [x.diff_id for x in result.layers] == [x.diff_id for x in want.layers]


def test_shared_layers_fetch_only_the_new_one(
    registry: Registry,
    small: tuple[Path, dict[str, LayoutImage]],
    expected: dict[str, PullResult],
    tmp_path: Path,
) -> None:
    layout, images = small
    repo = _repo(tmp_path)
    base = registry.push(f"oci:{layout}:base", "e2e", "base")
    more = registry.push(f"oci:{layout}:more", "e2e", "more")
    result, _, opened = _pull(repo, base, tag="base")
    assert result == expected["base"]
    assert sorted(opened) == sorted(x.digest for x in images["base"].layers)
    result, events, opened = _pull(repo, more, tag="more")
    assert result == expected["more"]  # pulled after base there too
    assert opened == [images["more"].layers[1].digest]
    assert _phase(events, "skip") == {result.layers[0].diff_id}
    assert _phase(events, "fetch") == {result.layers[1].diff_id}
    _assert_safe(repo, {t: images[t].manifest.digest for t in ("base", "more")})


def test_tls_registry_with_cert_dir(
    tls_registry: Registry,
    small: tuple[Path, dict[str, LayoutImage]],
    expected: dict[str, PullResult],
    tmp_path: Path,
) -> None:
    layout, _ = small
    ref = tls_registry.push(f"oci:{layout}:base", "e2e", "base")
    repo = _repo(tmp_path)
    options = ProxyOptions(cert_dir=str(tls_registry.cert_dir))
    result, _, _ = _pull(repo, ref, options, tag="base")
    assert result == expected["base"]
    _assert_safe(repo, {"base": result.manifest_digest})


def test_tls_registry_without_the_cert(
    tls_registry: Registry, small: tuple[Path, dict[str, LayoutImage]], tmp_path: Path
) -> None:
    layout, _ = small
    ref = tls_registry.push(f"oci:{layout}:base", "e2e", "base")
    repo = _repo(tmp_path)
    with pytest.raises(ProxyTLSError):
        _pull(repo, ref, ProxyOptions(), tag="base")
    _assert_safe(repo, {})


def _authfile(tmp_path: Path, registry: Registry, password: str) -> str:
    path = tmp_path / "auth.json"
    auth = base64.b64encode(f"{AUTH[0]}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
    return str(path)


@pytest.mark.parametrize("how", ["creds", "authfile"])
def test_basic_auth(
    auth_registry: Registry,
    small: tuple[Path, dict[str, LayoutImage]],
    expected: dict[str, PullResult],
    tmp_path: Path,
    how: str,
) -> None:
    layout, _ = small
    ref = auth_registry.push(f"oci:{layout}:base", "e2e", "base")
    if how == "creds":
        options = ProxyOptions(tls_verify=False, creds=auth_registry.creds)
    else:
        options = ProxyOptions(
            tls_verify=False, authfile=_authfile(tmp_path, auth_registry, AUTH[1])
        )
    repo = _repo(tmp_path)
    result, _, _ = _pull(repo, ref, options, tag="base")
    assert result == expected["base"]
    _assert_safe(repo, {"base": result.manifest_digest})


@pytest.mark.parametrize("how", ["creds", "authfile", "none"])
def test_basic_auth_refused(
    auth_registry: Registry,
    small: tuple[Path, dict[str, LayoutImage]],
    tmp_path: Path,
    how: str,
) -> None:
    layout, _ = small
    ref = auth_registry.push(f"oci:{layout}:base", "e2e", "base")
    options = {
        "creds": ProxyOptions(tls_verify=False, creds=f"{AUTH[0]}:wrong"),
        "authfile": ProxyOptions(
            tls_verify=False, authfile=_authfile(tmp_path, auth_registry, "wrong")
        ),
        "none": PLAIN,
    }[how]
    repo = _repo(tmp_path)
    with pytest.raises(ProxyAuthError):
        _pull(repo, ref, options, tag="base")
    _assert_safe(repo, {})


@pytest.mark.parametrize(
    "transport",
    [
        "oci",
        "oci-archive",
        "docker-archive",
        "docker-v2s2",
    ],
)
def test_transports(
    registry: Registry,
    small: tuple[Path, dict[str, LayoutImage]],
    expected: dict[str, PullResult],
    tmp_path: Path,
    transport: str,
) -> None:
    """skopeo's local transports give the image the native reader does. docker-archive
    keeps Docker formats (another manifest and config digest) and uncompressed layers
    that skopeo 1.9.3 labels tar+gzip: the pull goes by the bytes. docker-v2s2: a
    registry holding the image as a Docker schema 2 manifest (as most do)."""
    layout, images = small
    archive = tmp_path / "image.tar"
    options = ProxyOptions()
    if transport == "oci":
        reference = f"oci:{layout}:more"
    elif transport == "oci-archive":
        reference = f"oci-archive:{archive}:more"
        copy(f"oci:{layout}:more", reference, "--preserve-digests")
    elif transport == "docker-archive":
        reference = f"docker-archive:{archive}"
        copy(f"oci:{layout}:more", f"docker-archive:{archive}:small:more")
    else:
        reference = registry.ref("e2e-v2s2", "more")
        copy(f"oci:{layout}:more", reference, "--format", "v2s2", *registry.dest_flags())
        options = PLAIN
    repo = _repo(tmp_path)
    result, _, _ = _pull(repo, reference, options, tag="more")
    _same_image(result, expected["more"])
    if transport.startswith("docker"):
        assert result.manifest_digest != images["more"].manifest.digest
    else:
        assert result == _fresh(expected["more"])
    _assert_safe(repo, {"more": result.manifest_digest})
    # Listed and opened by digest too, though a converted manifest is not its
    # digest's JSON (cfsctl oci images leaves such images out).
    assert [(t, i.manifest_digest) for t, i in list_images(repo)] == [
        ("more", result.manifest_digest)
    ]
    with repo.object_store() as store:
        assert open_stored(repo, store, result.manifest_digest).image_ref_v1 == result.image_id


def test_containers_storage(tmp_path: Path) -> None:
    """Uncompressed layers only: skopeo 1.9.3's proxy serves a layer of
    containers-storage only by the digest storage knows (see test_imageproxy)."""
    layout = tmp_path / "layout"
    layers = [tree_tar([("usr/a", b"a" * 5000)]), tree_tar([("usr/b", os.urandom(9000))])]
    write_layout(layout, {"two": layers}, compress=False)
    want = _native(_repo(tmp_path, name="native"), layout, "two")
    ref = "containers-storage:localhost/e2e:two"
    with vfs_storage(tmp_path) as (conf, env):
        copy(f"oci:{layout}:two", ref, "--preserve-digests", env=env)
        repo = _repo(tmp_path)
        options = ProxyOptions(storage_conf=conf)
        result, _, _ = _pull(repo, ref, options, tag="two")
        assert result == want
        with pytest.raises(ImageNotFoundError):
            _pull(repo, "containers-storage:localhost/e2e:nope", options, tag="nope")
        _assert_safe(repo, {"two": result.manifest_digest})


# -- the umoci oracle ------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="umoci unpack and mounts need root")
def test_pulled_tree_is_umocis_rootfs(registry: Registry, tmp_path: Path) -> None:
    """Three gzip layers with whiteouts, an opaque directory, hardlinks across
    layers, a file replaced by a directory (and back), xattrs, devices, long and
    non-UTF-8 names, pushed to the registry and pulled: the mounted image is the
    rootfs ``umoci unpack`` makes of the image copied back from the registry, but
    for what cfsctl's default transform changes."""
    umoci = shutil.which("umoci")
    assert umoci is not None, "umoci is not installed (run-tests installs it)"
    write_layout(tmp_path / "layout", {"test": umoci_layers()})
    ref = registry.push(f"oci:{tmp_path / 'layout'}:test", "umoci", "test")
    copy(ref, f"oci:{tmp_path / 'back'}:test", "--src-tls-verify=false", "--preserve-digests")
    bundle = tmp_path / "bundle"
    subprocess.run(
        [umoci, "unpack", "--image", f"{tmp_path / 'back'}:test", str(bundle)],
        check=True,
        capture_output=True,
    )
    repo = _repo(tmp_path)
    result, _, _ = _pull(repo, ref, tag="test", parallel=3)
    assert result.image_id is not None
    try:
        ours, links = mounted_tree(repo, result.image_id, tmp_path / "mnt")
    finally:
        unmount_below(tmp_path)
    theirs = umocis_tree(bundle / "rootfs")
    problems = treecompare.diff(default_transformed(theirs), ours)
    assert not problems, "\n".join(problems)
    assert b"/srv/caf\xe9-\xff" in ours and b"/opq/old" not in ours and b"/data" in ours
    assert links == [0, 0, 2, 3]


# -- bad input: a typed error, fsck clean, no tag written or moved ---------------------------


@pytest.fixture
def victim(
    registry: Registry, small: tuple[Path, dict[str, LayoutImage]], tmp_path: Path
) -> tuple[Repository, dict[str, str]]:
    """A repository where the tag ``t`` names ``small:base``."""
    layout, images = small
    repo = _repo(tmp_path, name="victim")
    _pull(repo, registry.push(f"oci:{layout}:base", "e2e", "base"), tag="t")
    tags = {"t": images["base"].manifest.digest}
    _assert_safe(repo, tags)
    return repo, tags


def _push_layers(
    registry: Registry, tmp_path: Path, name: str, layers: list[bytes], *, compress: bool = True
) -> tuple[str, LayoutImage]:
    layout = tmp_path / f"layout-{name}"
    image = write_layout(layout, {"x": layers}, compress=compress)["x"]
    return registry.push(f"oci:{layout}:x", name, "x"), image


def _registry_blob(registry: Registry, digest: str) -> Path:
    hexdigest = digest.partition(":")[2]
    return registry.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


def test_corrupted_blob(
    registry: Registry, victim: tuple[Repository, dict[str, str]], tmp_path: Path
) -> None:
    """The registry serves a layer with one byte changed (same size): the pull's
    own check of the blob's digest names it; the layer is not linked."""
    repo, tags = victim
    ref, image = _push_layers(
        registry,
        tmp_path,
        "corrupt",
        [tree_tar([("usr/a", os.urandom(30_000))]), tree_tar([("usr/b", os.urandom(30_000))])],
        compress=False,
    )
    bad = image.layers[1]
    path = _registry_blob(registry, bad.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BlobDigestError) as info:
        _pull(repo, ref, tag="t")
    assert info.value.digest == bad.digest
    _assert_safe(repo, tags)
    assert existing_stream(repo, "oci-layer-" + _sha256(bad.data)) is None


def test_truncated_layer(
    registry: Registry, victim: tuple[Repository, dict[str, str]], tmp_path: Path
) -> None:
    """A layer whose tar ends mid-member (its digests those of the short bytes)."""
    repo, tags = victim
    whole = tree_tar([("usr/a", os.urandom(20_000))])
    ref, _ = _push_layers(registry, tmp_path, "truncated", [whole[:12_000]])
    with pytest.raises(TarFormatError):
        _pull(repo, ref, tag="t")
    _assert_safe(repo, tags)


def test_truncated_blob_in_the_registry(
    registry: Registry, victim: tuple[Repository, dict[str, str]], tmp_path: Path
) -> None:
    """The registry's copy of a blob lost its tail: shorter than the manifest says."""
    repo, tags = victim
    ref, image = _push_layers(
        registry, tmp_path, "short", [tree_tar([("usr/a", os.urandom(50_000))])]
    )
    path = _registry_blob(registry, image.layers[0].digest)
    path.write_bytes(path.read_bytes()[:20_000])
    with pytest.raises((ProxyBlobTransferError, BlobDigestError)):
        _pull(repo, ref, tag="t")
    _assert_safe(repo, tags)


@pytest.mark.parametrize(
    "name", ["../escape", "usr/../../etc/passwd", "/../etc/shadow", "/usr/../../x"]
)
def test_tar_escaping_the_root(
    registry: Registry, victim: tuple[Repository, dict[str, str]], tmp_path: Path, name: str
) -> None:
    repo, tags = victim
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        usr = tarfile.TarInfo("usr")
        usr.type = tarfile.DIRTYPE
        tar.addfile(usr)
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    ref, _ = _push_layers(registry, tmp_path, "escape", [out.getvalue()])
    with pytest.raises(OciBuildError, match=r"'\.\.'"):
        _pull(repo, ref, tag="t")
    _assert_safe(repo, tags)


def test_absolute_paths_stay_inside(registry: Registry, tmp_path: Path) -> None:
    """An absolute member name is a path below the image's root (as composefs-rs
    and umoci read it), not an escape."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("/usr", "/usr/lib"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        info = tarfile.TarInfo("/usr/lib/abs")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abs"))
    ref, _ = _push_layers(registry, tmp_path, "absolute", [out.getvalue()])
    repo = _repo(tmp_path)
    result, _, _ = _pull(repo, ref, tag="abs")
    with repo.object_store() as store:
        root = build_tree(repo, store, open_tag(repo, store, "abs"))
    assert [p for p, _ in root.walk()] == [b"/", b"/usr", b"/usr/lib", b"/usr/lib/abs"]
    _assert_safe(repo, {"abs": result.manifest_digest})


def test_manifest_list_without_this_architecture(
    registry: Registry, victim: tuple[Repository, dict[str, str]], tmp_path: Path
) -> None:
    repo, tags = victim
    layout = tmp_path / "multiarch"
    write_layout(
        layout,
        {"arm64": [tree_tar([("usr/arch", b"arm64")])], "s390x": [tree_tar([("usr/arch", b"s")])]},
    )
    add_index(layout, "list", {"arm64": "arm64", "s390x": "s390x"})
    ref = registry.push(f"oci:{layout}:list", "multiarch-e2e", "list", "--all")
    with pytest.raises(PlatformNotFoundError):
        _pull(repo, ref, ProxyOptions(tls_verify=False, override_arch="amd64"), tag="t")
    _assert_safe(repo, tags)


def test_registry_hangs_up_mid_blob(
    registry: Registry, victim: tuple[Repository, dict[str, str]], tmp_path: Path
) -> None:
    """Every transfer of one layer is cut: the pull fails typed; the larger layer,
    fetched before it (largest first, one at a time), stays and is reused once the
    registry is whole again."""
    repo, tags = victim
    whole = tree_tar([("usr/big", os.urandom(1 << 20))])
    ref, image = _push_layers(
        registry, tmp_path, "cut", [whole, tree_tar([("usr/cut", os.urandom(200_000))])]
    )
    cut = image.layers[1]
    cutter = CuttingProxy(registry.host, cut.digest, cut_after=64 * 1024)
    try:
        with pytest.raises(ProxyBlobTransferError):
            _pull(repo, f"docker://{cutter.host}/cut:x", tag="t", parallel=1)
        assert cutter.cuts >= 1
    finally:
        cutter.close()
    _assert_safe(repo, tags)
    assert existing_stream(repo, "oci-layer-" + _sha256(whole)) is not None
    result, events, opened = _pull(repo, ref, tag="t")
    assert opened == [cut.digest]
    assert _phase(events, "skip") == {_sha256(whole)}
    assert dict(iter_tags(repo)) == {"t": result.manifest_digest}


@pytest.mark.parametrize("what", ["tag", "repository"])
def test_not_found(
    registry: Registry, victim: tuple[Repository, dict[str, str]], what: str
) -> None:
    repo, tags = victim
    ref = registry.ref("e2e", "nope") if what == "tag" else registry.ref("nothere", "base")
    with pytest.raises(ImageNotFoundError):
        _pull(repo, ref, tag="t")
    _assert_safe(repo, tags)


# -- killed and concurrent pulls --------------------------------------------------------------

CHILD = Path(__file__).with_name("proxypullchild.py")


def _two_layers(registry: Registry, tmp_path: Path, name: str) -> tuple[str, LayoutImage, bytes]:
    """An image whose larger layer (fetched first) comes before the one a test
    holds; returns the reference, the image and the larger layer's tar."""
    first = tree_tar([("usr/big", os.urandom(1 << 20))])
    ref, image = _push_layers(
        registry, tmp_path, name, [first, tree_tar([("usr/held", os.urandom(300_000))])]
    )
    return ref, image, first


def _same_as_clean(resumed: PullResult, clean: PullResult) -> None:
    assert _fresh(resumed) == clean


def _child(repo: Repository, reference: str, tag: str, **kw: Any) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CHILD.parent), *sys.path]))
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(repo.path), reference, tag],
        env=env,
        stdout=subprocess.PIPE,
        **kw,
    )


def _gone(pid: int) -> bool:
    """No such process any more (or only a zombie for its new parent to reap)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return status.rpartition(")")[2].split()[0] == "Z"


def test_skopeo_killed_mid_pull(registry: Registry, tmp_path: Path) -> None:
    """kill -9 of skopeo while a layer streams: a typed error, fsck clean, no tag,
    the layer completed before kept; the next pull fetches only the other one and
    ends where a clean pull does."""
    ref, image, first = _two_layers(registry, tmp_path, "killskopeo")
    clean, _, _ = _pull(_repo(tmp_path, name="clean"), ref, tag="t")
    repo = _repo(tmp_path)
    held = image.layers[1]
    errors: list[BaseException] = []
    with HoldingProxy(registry.host, [held.digest], 64 * 1024) as proxy:
        pool = ImageProxyPool(f"docker://{proxy.host}/killskopeo:x", PLAIN, creds=None, size=1)

        def run() -> None:
            try:
                pull(repo, pool, tag="t", parallel=1)
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert proxy.wait_held(1) == [held.digest]
            pids = pool.pids
            assert pids
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            thread.join(BOUND)
            assert not thread.is_alive(), "the pull hangs after skopeo died"
        finally:
            pool.close()
            thread.join()
    assert len(errors) == 1 and isinstance(errors[0], ProxyDiedError), errors
    assert all(pid_is_reaped(pid) for pid in pids)
    _assert_safe(repo, {})
    assert existing_stream(repo, "oci-layer-" + _sha256(first)) is not None
    resumed, events, opened = _pull(repo, ref, tag="t")
    assert opened == [held.digest]
    assert _phase(events, "skip") == {_sha256(first)}
    _same_as_clean(resumed, clean)
    _assert_safe(repo, {"t": clean.manifest_digest})


def test_puller_killed_mid_pull(registry: Registry, tmp_path: Path) -> None:
    """kill -9 of the pulling process while a layer streams: fsck clean, no tag,
    its skopeo children end too; the next pull reuses the completed layer and ends
    where a clean pull does."""
    ref, image, first = _two_layers(registry, tmp_path, "killpuller")
    clean, _, _ = _pull(_repo(tmp_path, name="clean"), ref, tag="t")
    repo = _repo(tmp_path)
    held = image.layers[1]
    with HoldingProxy(registry.host, [held.digest], 64 * 1024) as proxy:
        child = _child(repo, f"docker://{proxy.host}/killpuller:x", "t", stderr=subprocess.DEVNULL)
        try:
            assert child.stdout is not None
            pids = json.loads(child.stdout.readline())["pids"]
            assert proxy.wait_held(1) == [held.digest]
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait()
            assert child.stdout is not None
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    # Orphaned, skopeo sees its socket end and exits (bounded poll, no timing).
    pause = threading.Event()  # never set: a bounded poll interval
    for _ in range(int(BOUND * 20)):
        if all(_gone(pid) for pid in pids):
            break
        pause.wait(0.05)
    assert all(_gone(pid) for pid in pids), "skopeo outlived its killed puller"
    _assert_safe(repo, {})
    assert existing_stream(repo, "oci-layer-" + _sha256(first)) is not None
    resumed, events, opened = _pull(repo, ref, tag="t")
    assert opened == [held.digest]
    assert _phase(events, "skip") == {_sha256(first)}
    _same_as_clean(resumed, clean)
    _assert_safe(repo, {"t": clean.manifest_digest})


def test_concurrent_pulls_store_each_layer_once(registry: Registry, tmp_path: Path) -> None:
    """Pull A is held inside the layer both images share; pull B (another process)
    waits for that layer's lock (its log says so) and reuses it once A goes on.
    Every layer is imported exactly once across both."""
    common = tree_tar([("usr/common", os.urandom(1 << 20))])
    own_a = tree_tar([("usr/a", os.urandom(5000))])
    own_b = tree_tar([("usr/b", os.urandom(6000))])
    _, image_a = _push_layers(registry, tmp_path, "concur-a", [common, own_a])
    ref_b, _ = _push_layers(registry, tmp_path, "concur-b", [common, own_b])
    repo = _repo(tmp_path)
    a_log = tmp_path / "a.log"
    waiting = "waiting for another fetch of oci-layer-" + _sha256(common)
    b_lines: list[str] = []
    with HoldingProxy(registry.host, [image_a.layers[0].digest], 64 * 1024) as proxy:
        with open(a_log, "wb") as a_err:
            a = _child(repo, f"docker://{proxy.host}/concur-a:x", "a", stderr=a_err)
        b: subprocess.Popen[bytes] | None = None
        try:
            proxy.wait_held(1)
            b = _child(repo, ref_b, "b", stderr=subprocess.PIPE)
            assert b.stderr is not None
            while True:
                ready, _, _ = select.select([b.stderr], [], [], BOUND)
                assert ready, "pull B never waited for the shared layer"
                line = b.stderr.readline().decode()
                assert line, "pull B ended before waiting for the shared layer"
                b_lines.append(line)
                if waiting in line:
                    break
            proxy.release()
            a_out, _ = a.communicate()
            b_out, b_rest = b.communicate()
            b_lines += b_rest.decode().splitlines()
        finally:
            for p in (a, b):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.communicate()
    assert a.returncode == 0 and b is not None and b.returncode == 0
    a_result = json.loads(a_out.splitlines()[-1])
    b_result = json.loads(b_out.splitlines()[-1])
    assert not any(a_result["layers"].values())
    assert b_result["layers"] == {_sha256(common): True, _sha256(own_b): False}
    logs = a_log.read_text() + "".join(b_lines)
    for layer in (common, own_a, own_b):
        assert logs.count(f"imported layer {_sha256(layer)} ") == 1
    report = repo.fsck()
    assert report.ok, report.problems
    assert sorted(dict(iter_tags(repo))) == ["a", "b"]
