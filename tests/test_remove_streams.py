"""RemoveImage / remove-ref next to composefs-rs streams: an image an OCI tag needs
(its config stream names it) is not removed, by the library, the service
interface and the daemon over Varlink; nor is a mounted one. Refusal leaves the
repository unchanged; GC after remove-ref keeps what the streams need."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from composefsd.repository import CorruptRepositoryError, ImageReferencedError, Repository
from composefsd.service.context import CallContext, Peer, VarlinkReplyError
from composefsd.service.methods import INTERFACE, RepositoryInterface
from composefsd.service.mounts import MountTracker
from ctlrun import run_ctl
from rsgolden import listing, unpack_repo
from servicehelpers import running_daemon, unmount_below
from test_service_methods import _mount_args, check_error, check_reply

# The images the golden OCI tags own (sha256 repository): boot's image and its
# bootable variant, and multi's image (tagged twice: multi and multi:v2).
BOOT = "7fdea99661172744fa7e0a3ce8f64081b5c61122980ef13e0f3b5ea360446c65"
BOOT_BOOTABLE = "ad74f7e429a87d709263696c836a25f91507a276dda4f7c5deb3e4f88f0146ec"
MULTI = "fa6fe6ccfded151794659a96a5775f88038279d42dd95d49f67c2ba1ba452428"
T1 = "ac11430a3a0f2e6d1768e70d36f8dbb1a493ac2abb7193a210a1184438e149e8"


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    return unpack_repo("sha256", tmp_path)


def test_remove_image_refuses_what_streams_need(golden: Path) -> None:
    repo = Repository.open(golden)
    before = listing(golden)
    for image, refs in (
        (BOOT, ["oci/boot"]),
        (BOOT_BOOTABLE, ["oci/boot"]),
        (MULTI, ["oci/multi", "oci/multi:v2"]),
    ):
        with pytest.raises(ImageReferencedError) as info:
            repo.remove_image(image)
        assert (info.value.image, info.value.refs) == (image, refs)
        assert "streams/refs/oci/" in str(info.value)
        assert listing(golden) == before
    # Untagging both tags of multi frees its image.
    for tag in ("multi", "multi:v2"):
        os.unlink(golden / "streams" / "refs" / "oci" / tag)
    assert repo.remove_image(MULTI) == []
    assert repo.remove_image("t1-basic") == ["t1-basic"]
    assert repo.fsck().ok


def test_remove_ref_then_gc_keeps_what_streams_need(golden: Path) -> None:
    repo = Repository.open(golden)
    (golden / "images" / "refs" / "boot").symlink_to(f"../{BOOT}")
    repo.remove_ref("boot")
    repo.gc()
    assert (golden / "images" / BOOT).exists()
    assert repo.verify_image(BOOT).ok
    assert repo.fsck().ok


def test_a_stream_that_cannot_be_read_stops_removal(golden: Path) -> None:
    repo = Repository.open(golden)
    manifest = (golden / "streams" / "refs" / "oci" / "boot").resolve()
    manifest.chmod(0o644)
    manifest.write_bytes(b"garbage")
    before = listing(golden)
    with pytest.raises(CorruptRepositoryError, match=f"not removing image {T1}"):
        repo.remove_image("t1-basic")
    assert listing(golden) == before


# -- the service interface ----------------------------------------------------------------


@pytest.fixture
def iface(golden: Path, tmp_path: Path) -> Iterator[RepositoryInterface]:
    yield RepositoryInterface(Repository.open(golden), MountTracker(tmp_path / "run"))
    unmount_below(tmp_path)


def _call(iface: RepositoryInterface, method: str, *args: object) -> dict[str, Any]:
    """A call made the way the transport makes it; the reply checked against the IDL."""
    ctx = CallContext(
        peer=Peer(os.getpid(), 0, 0),
        method=f"{INTERFACE}.{method}",
        more=False,
        fds=[],
        send_continues=lambda _reply: None,
    )
    return check_reply(method, getattr(iface, method)(*args, _request=ctx))


def _error(iface: RepositoryInterface, method: str, *args: object) -> VarlinkReplyError:
    with pytest.raises(VarlinkReplyError) as info:
        _call(iface, method, *args)
    return check_error(info.value)


def test_service_remove_image_refused(iface: RepositoryInterface, golden: Path) -> None:
    before = listing(golden)
    e = _error(iface, "RemoveImage", BOOT)
    assert e.name.endswith(".ImageReferenced")
    assert (e.parameters["image"], e.parameters["streamRefs"]) == (BOOT, ["oci/boot"])
    assert listing(golden) == before


def test_service_remove_image_mounted(
    iface: RepositoryInterface, golden: Path, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _call(iface, "Mount", *_mount_args("t1-basic", mnt))
    e = _error(iface, "RemoveImage", "t1-basic")
    # Only this repository's mount: the same image mounted from another copy of the
    # golden repository (a concurrent run) is not named, nor does it hold this one.
    assert (e.name.rpartition(".")[2], e.parameters) == (
        "ImageInUse",
        {"image": "t1-basic", "where": [str(mnt)]},
    )
    # A mounted image whose ref is gone stays through GC, with its objects.
    os.unlink(golden / "images" / "refs" / "t1-basic")
    result = _call(iface, "GarbageCollect", None)
    assert (golden / "images" / T1).exists()
    assert result["streamsPruned"] == 0
    assert iface.repo.verify_image(T1).ok
    _call(iface, "Unmount", str(mnt), None)
    result = _call(iface, "GarbageCollect", None)
    assert not (golden / "images" / T1).exists()


# -- the daemon over Varlink ----------------------------------------------------------------


def test_daemon_gc_and_remove_image(capsys: pytest.CaptureFixture[str], golden: Path) -> None:
    with running_daemon(golden) as d:
        status, out, err = run_ctl(capsys, "--connect", d.address, "remove-image", MULTI)
        assert status == 1
        assert "io.composefs.Repository.ImageReferenced" in err and "oci/multi:v2" in err
        status, out, err = run_ctl(capsys, "--connect", d.address, "gc", "--json")
        assert (status, err) == (0, "")
        doc = json.loads(out)
        assert (doc["objects_removed"], doc["bytes_removed"], doc["streams_pruned"]) == (
            12,
            4265,
            0,
        )
        os.unlink(golden / "streams" / "refs" / "oci" / "single")
        status, out, err = run_ctl(capsys, "--connect", d.address, "gc")
        assert status == 0
        assert out.endswith(", 2 stream links\n")
