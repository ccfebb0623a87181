"""bootc's repository as bootc lays it (issue 13, item 5), insecure: the golden
SHA-512 repository cfsctl wrote, made into ``<root>/composefs`` with bootc's OCI tags
(``localhost/bootc-<manifest digest>``) and no image refs (rsgolden.bootc_repository
says exactly what was changed and why). composefsd serves it; every method of
io.composefs.Repository is called on it over Varlink, as bootc's host would; then
everything composefs-rs needs must still be there byte for byte (what cfsctl gc
keeps, from its recorded listing), and what went must be exactly cfsctl's garbage.

The verity-enabled variant of the same repository runs in the fs-verity VM suite
(tests/test_verity.py, ``-k bootc``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from composefsd.repository import Repository, oci
from composefsd.service.client import INTERFACE, Connection, VarlinkCallError, connect
from ctlrun import run_ctl
from rsgolden import (
    BOOTC_AFTER_GC,
    BOOTC_TAG_PREFIX,
    bootc_deployments,
    bootc_listing,
    bootc_repository,
    check_tree,
    expected_listing,
    listing,
    settled_listing,
)
from servicehelpers import Daemon, running_daemon, unmount_below
from test_service_methods import check_reply
from trees import small_tree


@dataclass
class Bootc:
    root: Path
    repo: Path
    daemon: Daemon
    conn: Connection
    #: The golden after-GC listing as the bootc repository shows it: everything
    #: composefs-rs needs.
    needed: list[str]
    before: list[str]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return check_reply(method, dict(self.conn.call(f"{INTERFACE}.{method}", params)))

    def calls(self, method: str, **params: Any) -> list[dict[str, Any]]:
        """Every reply of a "more" call."""
        return [
            check_reply(method, dict(r))
            for r in self.conn.call(f"{INTERFACE}.{method}", params, more=True)
        ]

    def error(self, method: str, **params: Any) -> VarlinkCallError:
        with pytest.raises(VarlinkCallError) as info:
            self.conn.call(f"{INTERFACE}.{method}", params)
        return info.value

    def current(self) -> list[str]:
        return settled_listing(self.repo, self.before)

    def check_needed_unchanged(self) -> None:
        now = set(listing(self.repo))
        missing = [line for line in self.needed if line not in now]
        assert not missing, missing[:5]


@pytest.fixture
def bootc(tmp_path: Path) -> Iterator[Bootc]:
    root = tmp_path / "sysroot"
    repo = bootc_repository(root)
    before = listing(repo)
    needed = bootc_listing(expected_listing(BOOTC_AFTER_GC))
    assert set(needed) <= set(before)
    with running_daemon(repo) as d, connect(d.address, timeout=300) as conn:
        try:
            yield Bootc(root, repo, d, conn, needed, before)
        finally:
            unmount_below(tmp_path)


def test_layout_is_bootcs(bootc: Bootc) -> None:
    assert stat.S_IMODE(os.stat(bootc.repo).st_mode) == 0o700
    tags = sorted(os.listdir(bootc.repo / "streams" / "refs" / "oci"))
    assert len(tags) == 4
    assert all(t.startswith("localhost%2Fbootc-sha256:") for t in tags)
    assert not (bootc.repo / "images" / "refs").exists() or not os.listdir(
        bootc.repo / "images" / "refs"
    )


def test_every_method_keeps_what_composefs_rs_needs(
    bootc: Bootc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = bootc.repo
    oci_before = [
        (tag, img.manifest_digest, img.images)
        for tag, img in oci.list_images(Repository.open(repo))
    ]
    assert [tag for tag, _, _ in oci_before] == sorted(
        BOOTC_TAG_PREFIX + digest for _, digest, _ in oci_before
    )
    deployed = bootc_deployments(repo)
    assert len(deployed) == 5

    desc = bootc.call("Describe")
    assert (desc["path"], desc["algorithm"], desc["verity"]) == (str(repo), "sha512", "try")
    assert (desc["erofsVersion"], desc.get("readOnlyReason")) == (1, None)
    assert (desc["images"], desc["refs"], desc["mounts"]) == (9, 0, 0)

    images = {i["digest"]: i for i in bootc.call("ListImages")["images"]}
    assert len(images) == 9 and {d.digest for d in deployed} <= set(images)
    assert all(i["refs"] == [] for i in images.values())

    verified = [r for r in bootc.calls("Verify") if "progress" not in r or r["progress"] is None]
    # Every image, then every stream (each streams/ entry), all sound.
    assert {r["digest"] for r in verified if r.get("stream") is None} == set(images)
    streams = sorted(e.name for e in (repo / "streams").iterdir() if e.name != "refs")
    assert sorted(r["stream"] for r in verified if r.get("stream") is not None) == streams
    assert all(r["ok"] and r["problems"] == [] for r in verified), verified
    for d in deployed:
        (one,) = [r for r in bootc.calls("Verify", image=d.digest) if r.get("digest")]
        assert (one["digest"], one["ok"]) == (d.digest, True)
        assert one["verityMeasured"] == 0  # insecure: every digest computed
    # Verify's object lists (composefsd's own cache/, which composefs-rs never reads)
    # stay through the GCs below, which still find exactly cfsctl's garbage.
    assert len(list((repo / "cache").glob("objects-*"))) == len(images)

    # Mount each deployment by its digest, as bootc's initramfs does, and read it.
    mounts = []
    for i, d in enumerate(deployed):
        mnt = tmp_path / f"mnt{i}"
        mnt.mkdir()
        reply = bootc.call("Mount", image=d.digest, where=str(mnt))
        assert (reply["digest"], reply["imageCheck"], reply["readOnly"]) == (
            d.digest,
            "userspace",
            True,
        )
        assert check_tree(mnt, d.dump) > 0
        mounts.append(mnt)
    # Exactly ours: mounts of the same images from another repository (a concurrent
    # run's copy) are not this repository's.
    listed = bootc.call("ListMounts")["mounts"]
    assert sorted((m["where"], m["digest"]) for m in listed) == sorted(
        (str(m), d.digest) for m, d in zip(mounts, deployed, strict=True)
    )
    assert all(m["inRepository"] and m["readOnly"] for m in listed)

    # GC while mounted: exactly cfsctl's garbage goes.
    garbage = sorted(set(bootc.before) - set(bootc.needed))
    objects = [line for line in garbage if line.startswith("f objects/")]
    expect = (len(objects), sum(int(line.split()[2].removeprefix("size=")) for line in objects))
    dry = bootc.call("GarbageCollect", dryRun=True)
    assert (dry["objectsRemoved"], dry["bytesRemoved"], dry["dryRun"]) == (*expect, True)
    assert bootc.current() == bootc.before
    real = bootc.call("GarbageCollect")
    assert (real["objectsRemoved"], real["bytesRemoved"], real["dryRun"]) == (*expect, False)
    assert real["imagesRemoved"] == 4 and real["streamsPruned"] == 2
    bootc.check_needed_unchanged()
    assert bootc.current() == bootc.needed

    # A deployment image: in use while mounted; referenced by its tag otherwise.
    first = deployed[0]
    err = bootc.error("RemoveImage", image=first.digest)
    assert (err.name, err.parameters["where"]) == (f"{INTERFACE}.ImageInUse", [str(mounts[0])])
    bootc.call("Unmount", where=str(mounts[0]))
    err = bootc.error("RemoveImage", image=first.digest)
    assert err.name == f"{INTERFACE}.ImageReferenced"
    assert err.parameters["streamRefs"] == [f"oci/{first.tag.replace('/', '%2F')}"]
    bootc.call("Mount", image=first.digest, where=str(mounts[0]))

    # A new image of composefsd's own, with a ref, and its removal.
    tree = small_tree(tmp_path / "tree")
    made = bootc.call("CreateImage", sourcePath=str(tree), ref="composefsd/test")
    assert made["erofsVersion"] == 1
    (new,) = bootc.call("ListImages", image="composefsd/test")["images"]
    assert (new["digest"], new["refs"]) == (made["digest"], ["composefsd/test"])
    assert bootc.call("RemoveImage", image="composefsd/test")["removedRefs"] == ["composefsd/test"]
    bootc.check_needed_unchanged()

    for mnt in mounts:
        bootc.call("Unmount", where=str(mnt))
    assert bootc.call("ListMounts")["mounts"] == []
    final = bootc.call("GarbageCollect")
    # What goes is the new image and the objects its CreateImage added.
    assert (final["objectsRemoved"], final["bytesRemoved"]) == (
        made["objectsWritten"] + 1,
        made["bytesWritten"] + new["size"],
    )
    assert final["streamsPruned"] == 0 and final["imagesRemoved"] == 0

    assert bootc.current() == bootc.needed
    assert Repository.open(repo).fsck().ok
    oci_after = [
        (tag, img.manifest_digest, img.images)
        for tag, img in oci.list_images(Repository.open(repo))
    ]
    assert oci_after == oci_before

    # composefsctl reads the same repository through the daemon.
    status, out, err_text = run_ctl(capsys, "--connect", bootc.daemon.address, "status")
    assert (status, err_text) == (0, ""), err_text
    assert str(repo) in out
    status, out, err_text = run_ctl(capsys, "--connect", bootc.daemon.address, "images")
    assert status == 0 and all(d.digest[:12] in out for d in deployed), out


def test_deployment_unmounted_is_referenced_by_its_tag(bootc: Bootc) -> None:
    for d in bootc_deployments(bootc.repo):
        err = bootc.error("RemoveImage", image=d.digest)
        assert err.name == f"{INTERFACE}.ImageReferenced", err
        assert err.parameters["image"] == d.digest
        assert all(
            r.startswith("oci/localhost%2Fbootc-sha256:") for r in err.parameters["streamRefs"]
        )
    assert bootc.current() == bootc.before
