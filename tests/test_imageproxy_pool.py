"""ImageProxyPool: several skopeo proxies of one reference as one image source.
Synchronised by a forwarder that holds blob responses (tests/holdproxy.py), never
by timing."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import signal
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from composefsd.repository import Repository
from composefsd.repository.ocilayout import OciLayoutSource
from composefsd.repository.ocipull import pull
from composefsd.service.imageproxy import (
    BlobTransferError,
    ImageProxyError,
    ImageProxyPool,
    ProxyDiedError,
    ProxyOptions,
)
from holdproxy import BOUND, HoldingProxy
from registry import CuttingProxy, LayoutImage, Registry, pid_is_reaped, write_layout

PLAIN = ProxyOptions(tls_verify=False)


def _tar(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        usr = tarfile.TarInfo("usr")
        usr.type, usr.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(usr)
        info = tarfile.TarInfo(f"usr/{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture(scope="module")
def three(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, LayoutImage, str]:
    """An image of three incompressible 300 kB layers in the registry: (layout,
    image, reference)."""
    layout = tmp_path_factory.mktemp("pool") / "layout"
    layers = [_tar(f"f{i}", os.urandom(300_000)) for i in range(3)]
    image = write_layout(layout, {"three": layers})["three"]
    return layout, image, registry.push(f"oci:{layout}:three", "pool", "three")


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _read(pool: ImageProxyPool, digest: str, size: int) -> bytes:
    with pool.open_blob(digest, size) as blob:
        return blob.read()


def test_layers_are_fetched_in_parallel(
    registry: Registry, three: tuple[Path, LayoutImage, str], tmp_path: Path
) -> None:
    """All three layer transfers are held at once, each by its own live skopeo:
    the pull fetches them in parallel. Released, it ends as the native reader's."""
    layout, image, _ = three
    repo = Repository.init(tmp_path / "repo", algorithm="fsverity-sha256-12", verity="disabled")
    before = _fds()
    digests = [x.digest for x in image.layers]
    with (
        HoldingProxy(registry.host, digests, 64 * 1024) as proxy,
        ImageProxyPool(f"docker://{proxy.host}/pool:three", PLAIN, creds=None) as pool,
    ):
        result: list[object] = []
        thread, errors = _in_thread(
            lambda: result.append(pull(repo, pool, tag="three", parallel=3))
        )
        try:
            held = proxy.wait_held(3)
            assert sorted(held) == sorted(x.digest for x in image.layers)
            pids = pool.pids
            assert len(set(pids)) == 3
            for pid in pids:
                os.kill(pid, 0)  # alive, each in the middle of its transfer
        finally:
            proxy.release()
            thread.join(BOUND)
        assert not thread.is_alive() and not errors, errors
    assert all(pid_is_reaped(pid) for pid in pids)
    assert _fds() <= before
    native = Repository.init(tmp_path / "native", algorithm="fsverity-sha256-12", verity="disabled")
    with OciLayoutSource.open(layout, "three") as source:
        want = pull(native, source)
    assert result == [want]


def test_a_failed_transfer_drops_its_proxy(
    registry: Registry, three: tuple[Path, LayoutImage, str]
) -> None:
    """The registry hangs up in one blob: that proxy is closed (reaped, gone from
    the pool), and the next blob comes through a fresh one."""
    _, image, _ = three
    cut, good = image.layers[0], image.layers[1]
    before = _fds()
    cutter = CuttingProxy(registry.host, cut.digest, cut_after=64 * 1024)
    try:
        with ImageProxyPool(
            f"docker://{cutter.host}/pool:three", PLAIN, creds=None, size=1
        ) as pool:
            (first,) = pool.pids
            with pytest.raises(BlobTransferError):
                _read(pool, cut.digest, cut.size)
            assert pid_is_reaped(first)
            assert pool.pids == []
            data = _read(pool, good.digest, good.size)
            assert data == good.data
            (second,) = pool.pids
            assert second != first
            # The proxy that served a complete blob stays for the next one.
            assert _read(pool, image.layers[2].digest, image.layers[2].size) == image.layers[2].data
            assert pool.pids == [second]
        assert pid_is_reaped(second)
    finally:
        cutter.close()
    assert _fds() <= before


def test_close_during_transfers_reaps_every_skopeo(
    registry: Registry, three: tuple[Path, LayoutImage, str]
) -> None:
    """close() while two transfers are held: both readers get a typed error (no
    hang), every skopeo is reaped, the pool refuses further work, no fd is left."""
    _, image, _ = three
    layers = image.layers[:2]
    before = _fds()
    with HoldingProxy(registry.host, [x.digest for x in layers], 64 * 1024) as proxy:
        pool = ImageProxyPool(f"docker://{proxy.host}/pool:three", PLAIN, creds=None, size=2)
        readers = [_in_thread(functools.partial(_read, pool, x.digest, x.size)) for x in layers]
        try:
            proxy.wait_held(2)
            pids = pool.pids
            assert len(set(pids)) == 2
        finally:
            pool.close()
            for thread, _ in readers:
                thread.join(BOUND)
        assert not any(thread.is_alive() for thread, _ in readers), "a reader hangs after close()"
        for _, errors in readers:
            assert len(errors) == 1 and isinstance(errors[0], ImageProxyError), errors
        assert all(pid_is_reaped(pid) for pid in pids)
        with pytest.raises(ProxyDiedError):
            pool.fetch_manifest()
        pool.close()  # idempotent
    assert _fds() <= before


def test_a_killed_skopeo_is_dropped(three: tuple[Path, LayoutImage, str]) -> None:
    """An idle proxy killed from outside fails the next request typed and leaves
    the pool; the request after that opens a new one."""
    layout, image, _ = three
    with ImageProxyPool(f"oci:{layout}:three", ProxyOptions(), creds=None, size=1) as pool:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ProxyDiedError):
            pool.fetch_manifest()
        assert pid_is_reaped(pid) and pool.pids == []
        digest, _ = pool.fetch_manifest()
        assert digest == image.manifest.digest
        layer = image.layers[0]
        assert (
            hashlib.sha256(_read(pool, layer.digest, layer.size)).hexdigest()
            == (layer.digest.partition(":")[2])
        )


def test_pool_size_must_be_positive(three: tuple[Path, LayoutImage, str]) -> None:
    layout, _, _ = three
    with pytest.raises(ValueError):
        ImageProxyPool(f"oci:{layout}:three", ProxyOptions(), creds=None, size=0)
