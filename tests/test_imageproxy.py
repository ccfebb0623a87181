"""The skopeo image proxy client against real parts: Debian's docker-registry on
loopback (plain, TLS, basic auth), oci:, oci-archive:, docker-archive: and
containers-storage: references, a forwarder that hangs up mid-blob, a skopeo killed
mid-blob, a caller without rights, and a fake skopeo that breaks the protocol."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefsd.credentials import Credentials
from composefsd.service.imageproxy import (
    MAX_MANIFEST_SIZE,
    BlobTransferError,
    ContentTooLargeError,
    ImageAccessDeniedError,
    ImageNotFoundError,
    ImageProxyBusyError,
    ImageProxyError,
    ImageProxySource,
    PlatformNotFoundError,
    ProxyAuthError,
    ProxyDiedError,
    ProxyOptions,
    ProxyOptionsError,
    ProxyProtocolError,
    ProxyStartError,
    ProxyTLSError,
    RequestError,
    open_image_proxy,
)
from registry import (
    AUTH,
    GOLDEN_TAGS,
    CuttingProxy,
    LayoutImage,
    Registry,
    add_index,
    copy,
    pid_is_reaped,
    read_layout,
    vfs_storage,
    write_layout,
)
from rsgolden import RS

GOLDEN_LAYOUT = RS / "inputs" / "oci" / "layout"
#: A uid no account has: a caller without any rights of its own.
NOBODY = Credentials(64123, 64123)
PLAIN = ProxyOptions(tls_verify=False)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob_bytes(source: ImageProxySource, digest: str, size: int) -> bytes:
    with source.open_blob(digest, size) as stream:
        return stream.read()


def _check_image(source: ImageProxySource, expected: LayoutImage) -> None:
    """The proxy gives exactly the layout's manifest, config and layers."""
    digest, manifest = source.fetch_manifest()
    assert (digest, manifest) == (expected.manifest.digest, expected.manifest.data)
    doc = json.loads(manifest)
    config = source.fetch_config(doc["config"]["digest"], doc["config"]["size"])
    assert config == expected.config.data
    for layer, want in zip(doc["layers"], expected.layers, strict=True):
        data = _blob_bytes(source, layer["digest"], layer["size"])
        assert _sha256(data) == layer["digest"] == want.digest
        assert data == want.data


def _check_consistent(source: ImageProxySource) -> dict[str, object]:
    """Whatever the transport made of the image: every blob is its digest."""
    digest, manifest = source.fetch_manifest()
    assert digest.startswith("sha256:")
    doc = json.loads(manifest)
    assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config = source.fetch_config(doc["config"]["digest"], doc["config"]["size"])
    assert _sha256(config) == doc["config"]["digest"]
    for layer in doc["layers"]:
        assert _sha256(_blob_bytes(source, layer["digest"], layer["size"])) == layer["digest"]
    result: dict[str, object] = json.loads(config)
    return result


@pytest.fixture(scope="module")
def small() -> Iterator[tuple[Path, dict[str, LayoutImage]]]:
    """A layout the test writes: two tags, gzip layers; world-readable so that a
    caller without rights can read copies of it."""
    layout = Path(tempfile.mkdtemp(prefix="imageproxy-layout-"))
    layout.chmod(0o755)
    images = write_layout(
        layout,
        {
            "one": [[("etc/hostname", b"one\n")]],
            "two": [
                [("usr/bin/tool", b"#!/bin/sh\n" * 100)],
                [("etc/os-release", b"ID=test\n"), ("var/data", os.urandom(70_000))],
            ],
        },
    )
    for path in [layout, *layout.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield layout, images
    for path in sorted(layout.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    layout.rmdir()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LayoutImage]:
    """An image with one 4 MiB incompressible layer: larger than any pipe or
    socket buffer, so a transfer is surely under way when it is cut."""
    layout = tmp_path_factory.mktemp("big") / "layout"
    images = write_layout(layout, {"big": [[("blob", os.urandom(4 << 20))]]})
    return layout, images["big"]


# --- registries -------------------------------------------------------------------


@pytest.mark.parametrize("tag", GOLDEN_TAGS)
def test_golden_layout_through_plain_registry(golden_registry: dict[str, str], tag: str) -> None:
    with open_image_proxy(golden_registry[tag], PLAIN, creds=None) as source:
        _check_image(source, read_layout(GOLDEN_LAYOUT, tag))


def test_plain_registry_needs_tls_verify_false(
    registry: Registry, small: tuple[Path, dict[str, LayoutImage]]
) -> None:
    layout, _ = small
    ref = registry.push(f"oci:{layout}:one", "small", "one")
    # skopeo speaks HTTPS by default; the registry answers in plain HTTP.
    with pytest.raises(RequestError):
        open_image_proxy(ref, ProxyOptions(), creds=None)


def test_tls_registry_with_cert_dir(
    tls_registry: Registry, small: tuple[Path, dict[str, LayoutImage]]
) -> None:
    layout, images = small
    ref = tls_registry.push(f"oci:{layout}:two", "small", "two")
    options = ProxyOptions(cert_dir=str(tls_registry.cert_dir))
    with open_image_proxy(ref, options, creds=None) as source:
        _check_image(source, images["two"])


def test_tls_registry_without_the_cert_is_a_tls_error(
    tls_registry: Registry, small: tuple[Path, dict[str, LayoutImage]]
) -> None:
    layout, _ = small
    ref = tls_registry.push(f"oci:{layout}:one", "small", "one")
    with pytest.raises(ProxyTLSError) as info:
        open_image_proxy(ref, ProxyOptions(), creds=None)
    assert info.value.skopeo_message and "certificate" in info.value.skopeo_message


def test_basic_auth_with_creds(
    auth_registry: Registry, small: tuple[Path, dict[str, LayoutImage]]
) -> None:
    layout, images = small
    ref = auth_registry.push(f"oci:{layout}:two", "small", "two")
    options = ProxyOptions(tls_verify=False, creds=auth_registry.creds)
    with open_image_proxy(ref, options, creds=None) as source:
        # The password is handed over in a file, never on the command line.
        cmdline = Path(f"/proc/{source.pid}/cmdline").read_bytes()
        assert AUTH[1].encode() not in cmdline
        _check_image(source, images["two"])


def test_basic_auth_with_authfile(
    auth_registry: Registry, small: tuple[Path, dict[str, LayoutImage]], tmp_path: Path
) -> None:
    layout, images = small
    ref = auth_registry.push(f"oci:{layout}:one", "small", "one")
    authfile = tmp_path / "auth.json"
    token = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
    authfile.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    options = ProxyOptions(tls_verify=False, authfile=str(authfile))
    with open_image_proxy(ref, options, creds=None) as source:
        _check_image(source, images["one"])


@pytest.mark.parametrize("creds", [f"{AUTH[0]}:wrong", None])
def test_basic_auth_refused(
    auth_registry: Registry,
    small: tuple[Path, dict[str, LayoutImage]],
    tmp_path: Path,
    creds: str | None,
) -> None:
    layout, _ = small
    ref = auth_registry.push(f"oci:{layout}:one", "small", "one")
    # An empty authfile: the machine's own credentials play no part.
    empty = tmp_path / "auth.json"
    empty.write_text('{"auths": {}}')
    options = ProxyOptions(tls_verify=False, creds=creds, authfile=str(empty))
    with pytest.raises(ProxyAuthError):
        open_image_proxy(ref, options, creds=None)


@pytest.mark.parametrize("what", ["tag", "repository"])
def test_registry_not_found(
    registry: Registry, small: tuple[Path, dict[str, LayoutImage]], what: str
) -> None:
    layout, _ = small
    registry.push(f"oci:{layout}:one", "small", "one")
    ref = registry.ref("small", "nope") if what == "tag" else registry.ref("nothere", "one")
    with pytest.raises(ImageNotFoundError):
        open_image_proxy(ref, PLAIN, creds=None)


def test_registry_hangs_up_mid_blob(registry: Registry, big: tuple[Path, LayoutImage]) -> None:
    layout, image = big
    registry.push(f"oci:{layout}:big", "big", "cut")
    layer = image.layers[0]
    cutter = CuttingProxy(registry.host, layer.digest, cut_after=64 * 1024)
    try:
        ref = f"docker://{cutter.host}/big:cut"
        with open_image_proxy(ref, PLAIN, creds=None) as source:
            _check_manifest = source.fetch_manifest()
            assert _check_manifest[0] == image.manifest.digest
            with source.open_blob(layer.digest, layer.size) as stream:
                with pytest.raises(BlobTransferError) as info:
                    stream.read()
                assert info.value.skopeo_message
                # The error stays: a later read is no clean end of the blob.
                with pytest.raises(BlobTransferError):
                    stream.read()
            assert cutter.cuts >= 1
            # The proxy survives a failed transfer: the next request works.
            assert source.fetch_manifest()[1] == image.manifest.data
    finally:
        cutter.close()


@pytest.fixture(scope="module")
def multiarch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, LayoutImage]]:
    """A layout whose tag ``multi`` is an index of an amd64 and an arm64 image."""
    layout = tmp_path_factory.mktemp("multiarch") / "layout"
    images = write_layout(
        layout, {"amd64": [[("arch", b"amd64\n")]], "arm64": [[("arch", b"arm64\n")]]}
    )
    add_index(layout, "multi", {"amd64": "amd64", "arm64": "arm64"})
    return layout, images


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_manifest_list_resolves_to_the_platform(
    registry: Registry, multiarch: tuple[Path, dict[str, LayoutImage]], arch: str
) -> None:
    """The index is resolved to the instance for the (overridden) architecture;
    its manifest and digest are that instance's."""
    layout, images = multiarch
    ref = registry.push(f"oci:{layout}:multi", "multiarch", "multi", "--all")
    for reference in (ref, f"oci:{layout}:multi"):
        options = ProxyOptions(tls_verify=False if reference == ref else None, override_arch=arch)
        with open_image_proxy(reference, options, creds=None) as source:
            _check_image(source, images[arch])


def test_manifest_list_without_the_platform(
    registry: Registry, multiarch: tuple[Path, dict[str, LayoutImage]]
) -> None:
    layout, _ = multiarch
    ref = registry.push(f"oci:{layout}:multi", "multiarch", "multi", "--all")
    options = ProxyOptions(tls_verify=False, override_arch="s390x")
    with open_image_proxy(ref, options, creds=None) as source:
        with pytest.raises(PlatformNotFoundError):
            source.fetch_manifest()
        # Not for this platform is a kind of not found.
        assert issubclass(PlatformNotFoundError, ImageNotFoundError)


def test_registries_conf_rewrites_the_location(
    registry: Registry, small: tuple[Path, dict[str, LayoutImage]], tmp_path: Path
) -> None:
    """registries.conf reaches skopeo: a name under an unused loopback address is
    served from the test registry (nothing leaves the machine if it did not)."""
    layout, images = small
    registry.push(f"oci:{layout}:one", "small", "one")
    conf = tmp_path / "registries.conf"
    conf.write_text(
        "[[registry]]\n"
        'prefix = "127.0.0.2:9/mirrored"\n'
        f'location = "{registry.host}/small"\n'
        "insecure = true\n"
    )
    options = ProxyOptions(registries_conf=str(conf))
    with open_image_proxy("docker://127.0.0.2:9/mirrored:one", options, creds=None) as source:
        _check_image(source, images["one"])


def test_close_from_another_thread_ends_a_stalled_transfer(
    registry: Registry, big: tuple[Path, LayoutImage]
) -> None:
    """A registry that stops answering mid-blob blocks the reader (no timer bounds
    a transfer); close() from another thread ends skopeo and the reader gets a
    typed error instead of hanging."""
    layout, image = big
    registry.push(f"oci:{layout}:big", "big", "stall")
    layer = image.layers[0]
    cutter = CuttingProxy(registry.host, layer.digest, cut_after=64 * 1024, stall=True)
    errors: list[BaseException] = []
    try:
        source = open_image_proxy(f"docker://{cutter.host}/big:stall", PLAIN, creds=None)

        def read() -> None:
            try:
                _blob_bytes(source, layer.digest, layer.size)
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        assert cutter.stalled.wait(120), "the blob request never reached the registry"
        source.close()
        reader.join(120)
        assert not reader.is_alive(), "the reader still hangs after close()"
        assert len(errors) == 1 and isinstance(errors[0], ProxyDiedError), errors
        assert pid_is_reaped(source.pid)
    finally:
        cutter.close()


# --- local transports ---------------------------------------------------------------


def test_oci_layout(small: tuple[Path, dict[str, LayoutImage]]) -> None:
    layout, images = small
    before = set(os.listdir("/proc/self/fd"))
    for tag, image in images.items():
        with open_image_proxy(f"oci:{layout}:{tag}", ProxyOptions(), creds=None) as source:
            _check_image(source, image)
    # Every pipe, socket and file of the proxy is closed again.
    assert set(os.listdir("/proc/self/fd")) <= before


def test_golden_layout_direct() -> None:
    for tag in GOLDEN_TAGS:
        reference = f"oci:{GOLDEN_LAYOUT}:{tag}"
        with open_image_proxy(reference, ProxyOptions(), creds=None) as source:
            _check_image(source, read_layout(GOLDEN_LAYOUT, tag))


def test_oci_archive(small: tuple[Path, dict[str, LayoutImage]], tmp_path: Path) -> None:
    layout, images = small
    archive = tmp_path / "image.tar"
    copy(f"oci:{layout}:two", f"oci-archive:{archive}:two", "--preserve-digests")
    with open_image_proxy(f"oci-archive:{archive}:two", ProxyOptions(), creds=None) as source:
        _check_image(source, images["two"])


def test_docker_archive(small: tuple[Path, dict[str, LayoutImage]], tmp_path: Path) -> None:
    """docker-archive stores Docker formats and uncompressed layers: skopeo hands
    out the manifest converted to OCI (its digest the Docker manifest's, its config
    containers/image's OCI conversion, which fetch_config takes from GetFullConfig),
    and skopeo 1.9.3 labels the uncompressed layers ``tar+gzip``: a puller must go
    by the bytes, not the media type. Every blob is still its digest."""
    layout, images = small
    archive = tmp_path / "image.tar"
    copy(f"oci:{layout}:two", f"docker-archive:{archive}:small:two")
    with open_image_proxy(f"docker-archive:{archive}", ProxyOptions(), creds=None) as source:
        config = _check_consistent(source)
    want = json.loads(images["two"].config.data)
    assert config["rootfs"] == want["rootfs"]


def test_containers_storage(tmp_path: Path) -> None:
    """containers-storage keeps layers uncompressed, and skopeo 1.9.3's proxy serves
    a layer only by the digest storage knows it by (GetLayerInfo, which maps a
    manifest's compressed digests, came in protocol 0.2.5): an image with
    uncompressed layers comes through whole."""
    layout = tmp_path / "layout"
    images = write_layout(
        layout, {"two": [[("a", b"a" * 5000)], [("b", os.urandom(9000))]]}, compress=False
    )
    ref = "containers-storage:localhost/small:two"
    with vfs_storage(tmp_path) as (conf, env):
        copy(f"oci:{layout}:two", ref, "--preserve-digests", env=env)
        options = ProxyOptions(storage_conf=conf)
        with open_image_proxy(ref, options, creds=None) as source:
            _check_image(source, images["two"])
        with pytest.raises(ImageNotFoundError):
            open_image_proxy("containers-storage:localhost/small:nope", options, creds=None)


@pytest.mark.parametrize(
    "reference",
    ["oci:{layout}:nope", "oci:{missing}:one", "oci-archive:{missing}", "docker-archive:{missing}"],
)
def test_local_not_found(
    small: tuple[Path, dict[str, LayoutImage]], tmp_path: Path, reference: str
) -> None:
    layout, _ = small
    ref = reference.format(layout=layout, missing=tmp_path / "missing")
    with pytest.raises(ImageNotFoundError):
        open_image_proxy(ref, ProxyOptions(), creds=None)


# --- callers and their rights ----------------------------------------------------------


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory anyone may enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="imageproxy-"))
    path.chmod(0o755)
    yield path
    for sub in sorted(path.rglob("*"), reverse=True):
        sub.rmdir() if sub.is_dir() else sub.unlink()
    path.rmdir()


def test_caller_reads_what_it_may(
    small: tuple[Path, dict[str, LayoutImage]], public_dir: Path
) -> None:
    layout, images = small
    archive = public_dir / "image.tar"
    copy(f"oci:{layout}:one", f"oci-archive:{archive}:one", "--preserve-digests")
    archive.chmod(0o644)
    with open_image_proxy(f"oci-archive:{archive}:one", ProxyOptions(), creds=NOBODY) as source:
        assert Path(f"/proc/{source.pid}/status").read_text().count("\t64123") >= 4
        _check_image(source, images["one"])


def test_caller_cannot_read_root_only_archive(
    small: tuple[Path, dict[str, LayoutImage]], public_dir: Path
) -> None:
    layout, _ = small
    archive = public_dir / "image.tar"
    copy(f"oci:{layout}:one", f"oci-archive:{archive}:one", "--preserve-digests")
    archive.chmod(0o600)
    with pytest.raises(ImageAccessDeniedError):
        open_image_proxy(f"oci-archive:{archive}:one", ProxyOptions(), creds=NOBODY)
    # root reads it: the refusal was the caller's rights, not the archive.
    with open_image_proxy(f"oci-archive:{archive}:one", ProxyOptions(), creds=None) as source:
        source.fetch_manifest()


def test_caller_cannot_read_root_only_authfile(
    auth_registry: Registry, small: tuple[Path, dict[str, LayoutImage]], public_dir: Path
) -> None:
    layout, _ = small
    ref = auth_registry.push(f"oci:{layout}:one", "small", "one")
    authfile = public_dir / "auth.json"
    token = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
    authfile.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    authfile.chmod(0o600)
    options = ProxyOptions(tls_verify=False, authfile=str(authfile))
    with pytest.raises(ImageAccessDeniedError):
        open_image_proxy(ref, options, creds=NOBODY)
    # Credentials given as such reach skopeo whoever it runs as.
    options = ProxyOptions(tls_verify=False, creds=auth_registry.creds)
    with open_image_proxy(ref, options, creds=NOBODY) as source:
        source.fetch_manifest()


# --- a dying skopeo, transfers, lifecycle ------------------------------------------------


def test_skopeo_killed_mid_blob(big: tuple[Path, LayoutImage]) -> None:
    layout, image = big
    layer = image.layers[0]
    source = open_image_proxy(f"oci:{layout}:big", ProxyOptions(), creds=None)
    pid = source.pid
    try:
        with (
            pytest.raises(ProxyDiedError) as info,
            source.open_blob(layer.digest, layer.size) as stream,
        ):
            assert stream.read(1)
            os.kill(pid, signal.SIGKILL)
            while stream.read(65536):
                pass
        assert "signal 9" in str(info.value)
        assert source.returncode == -signal.SIGKILL
        assert pid_is_reaped(pid)
        with pytest.raises(ProxyDiedError):
            source.fetch_manifest()
    finally:
        source.close()


def test_skopeo_killed_while_idle(small: tuple[Path, dict[str, LayoutImage]]) -> None:
    layout, _ = small
    source = open_image_proxy(f"oci:{layout}:one", ProxyOptions(), creds=None)
    try:
        os.kill(source.pid, signal.SIGKILL)
        with pytest.raises(ProxyDiedError):
            source.fetch_manifest()
        assert pid_is_reaped(source.pid)
    finally:
        source.close()


def test_leaving_a_blob_early_and_one_transfer_at_a_time(big: tuple[Path, LayoutImage]) -> None:
    layout, image = big
    layer = image.layers[0]
    with open_image_proxy(f"oci:{layout}:big", ProxyOptions(), creds=None) as source:
        with source.open_blob(layer.digest, layer.size) as stream:
            assert stream.read(10) == layer.data[:10]
            with pytest.raises(ImageProxyBusyError):
                source.fetch_manifest()
        # The abandoned transfer is wound up: the source serves the next one.
        assert _blob_bytes(source, layer.digest, layer.size) == layer.data


def test_blob_of_wrong_size_or_digest(small: tuple[Path, dict[str, LayoutImage]]) -> None:
    layout, images = small
    layer = images["one"].layers[0]
    config = images["one"].config
    with open_image_proxy(f"oci:{layout}:one", ProxyOptions(), creds=None) as source:
        with pytest.raises(BlobTransferError):
            _blob_bytes(source, layer.digest, layer.size - 1)
        with pytest.raises(BlobTransferError):
            _blob_bytes(source, layer.digest, layer.size + 1)
        with pytest.raises(ImageProxyError):
            _blob_bytes(source, "sha256:" + "0" * 64, 10)
        with pytest.raises(ContentTooLargeError):
            source.fetch_config(config.digest, MAX_MANIFEST_SIZE + 1)
        for digest, size in (("sha256:abc", 1), ("md5:" + "0" * 32, 1), (layer.digest, -1)):
            with pytest.raises(ProxyOptionsError):
                _blob_bytes(source, digest, size)
        # After every failure the proxy still serves.
        assert _blob_bytes(source, layer.digest, layer.size) == layer.data


def test_close_reaps_and_is_idempotent(small: tuple[Path, dict[str, LayoutImage]]) -> None:
    layout, _ = small
    source = open_image_proxy(f"oci:{layout}:one", ProxyOptions(), creds=None)
    pid = source.pid
    source.close()
    source.close()
    assert source.returncode == 0
    assert pid_is_reaped(pid)
    with pytest.raises(ImageProxyError):
        source.fetch_manifest()


def test_oversized_manifest(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_layout(layout, {"big": [[("f", b"x")]]})
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    blob = layout / "blobs" / "sha256" / desc["digest"].split(":")[1]
    doc = json.loads(blob.read_bytes())
    doc["annotations"] = {"padding": "x" * MAX_MANIFEST_SIZE}
    data = json.dumps(doc).encode()
    digest = _sha256(data)
    (layout / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    desc.update(digest=digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    with (
        open_image_proxy(f"oci:{layout}:big", ProxyOptions(), creds=None) as source,
        pytest.raises(ContentTooLargeError),
    ):
        source.fetch_manifest()


@pytest.mark.parametrize(
    ("reference", "options"),
    [
        ("quay.io/x:y", ProxyOptions()),
        ("dir:/tmp/x", ProxyOptions()),
        ("oci:/x\n:y", ProxyOptions()),
        ("oci:/x:y", ProxyOptions(creds="u:p")),
        ("docker://127.0.0.1:1/x:y", ProxyOptions(creds="user-without-password")),
        ("docker://127.0.0.1:1/x:y", ProxyOptions(creds=":p")),
    ],
)
def test_bad_reference_or_options(reference: str, options: ProxyOptions) -> None:
    with pytest.raises(ProxyOptionsError):
        open_image_proxy(reference, options, creds=None)


# --- a fake skopeo that breaks the protocol ----------------------------------------------

_FAKE = r"""
import json, os, socket, sys
mode = os.environ["FAKE_MODE"]
sock = socket.socket(fileno=int(sys.argv[sys.argv.index("--sockfd") + 1]))
def reply(value=None, **kw):
    sock.send(json.dumps({"success": True, "value": value, "pipeid": 0, **kw}).encode())
sock.recv(65536)
if mode == "exit":
    sys.exit(3)
if mode == "garbage":
    sock.send(b"not json")
elif mode == "huge":
    sock.send(b"[" * (200 * 1024))
elif mode == "version":
    reply("1.0.0")
elif mode == "fds":
    r, w = os.pipe()
    socket.send_fds(sock, [json.dumps({"success": True, "value": "0.2.3"}).encode()], [r, w])
elif mode == "image":
    reply("0.2.3"); sock.recv(65536); reply("seven")
elif mode == "digest":
    reply("0.2.3"); sock.recv(65536); reply(1)
    sock.recv(65536)
    r, w = os.pipe()
    os.write(w, b"{}")
    socket.send_fds(sock, [json.dumps({"success": True, "value": "md5:0", "pipeid": 5}).encode()], [r])
elif mode == "optional":
    reply("0.2.8"); sock.recv(65536); reply(0)
elif mode == "failure":
    reply("0.2.8"); sock.recv(65536)
    sock.send(json.dumps({"success": False, "error": "boom", "error_code": "other"}).encode())
sock.recv(65536)
"""


@pytest.fixture
def fake_skopeo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "skopeo"
    script.write_text(f"#!{sys.executable}\n{_FAKE}")
    script.chmod(0o755)
    monkeypatch.setenv("COMPOSEFSD_SKOPEO", str(script))
    return script


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("exit", ProxyDiedError),
        ("garbage", ProxyProtocolError),
        ("huge", ProxyProtocolError),
        ("version", ProxyProtocolError),
        ("fds", ProxyProtocolError),
        ("image", ProxyProtocolError),
        ("optional", ImageNotFoundError),
    ],
)
def test_fake_skopeo_breaks_protocol(
    fake_skopeo: Path, monkeypatch: pytest.MonkeyPatch, mode: str, error: type[Exception]
) -> None:
    monkeypatch.setenv("FAKE_MODE", mode)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(error):
        open_image_proxy("oci:/nowhere:x", ProxyOptions(), creds=None)
    # Nothing leaks: no fd passed by the fake stays open here.
    assert set(os.listdir("/proc/self/fd")) <= before


def test_fake_skopeo_bad_manifest_digest(
    fake_skopeo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODE", "digest")
    source = open_image_proxy("oci:/nowhere:x", ProxyOptions(), creds=None)
    try:
        with pytest.raises(ProxyProtocolError):
            source.fetch_manifest()
        # Requests and replies may no longer pair up: the proxy is ended.
        assert source.returncode is not None
        with pytest.raises(ProxyDiedError):
            source.fetch_manifest()
    finally:
        source.close()


def test_fake_skopeo_error_code(fake_skopeo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "failure")
    with pytest.raises(ImageProxyError) as info:
        open_image_proxy("oci:/nowhere:x", ProxyOptions(), creds=None)
    assert getattr(info.value, "error_code", None) == "other"
    assert info.value.skopeo_message == "boom"


def test_missing_skopeo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COMPOSEFSD_SKOPEO", str(tmp_path / "no-such-skopeo"))
    with pytest.raises(ProxyStartError):
        open_image_proxy("oci:/nowhere:x", ProxyOptions(), creds=None)
