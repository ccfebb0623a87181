"""fsck and GC on composefs-rs's splitstreams: the golden repositories check clean
(with cfsctl fsck's counts), and every kind of damage to a stream is reported
with composefs-rs's kind, never crashes, and stops GC before anything goes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from composefsd.repository import Repository
from composefsd.repository.errors import CorruptRepositoryError
from composefsd.repository.fsck import FsckReport
from composefsd.splitstream import StreamRefs, read_refs
from rsgolden import ALGORITHMS, listing, runs_of, unpack_repo


def _kinds(report: FsckReport) -> set[tuple[str, str]]:
    return {(p.kind, p.path) for p in report.problems}


def _stream(path: Path, prefix: str) -> str:
    return sorted(p.name for p in (path / "streams").iterdir() if p.name.startswith(prefix))[0]


def _object_of(path: Path, stream: str) -> Path:
    return (path / "streams" / stream).resolve()


def _refs(repo: Repository, stream: str) -> StreamRefs:
    data = (repo.path / "streams" / stream).read_bytes()
    return read_refs(data, repo.hash_algorithm.digest_size)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_golden_repositories_fsck_clean_like_cfsctl(algorithm: str, tmp_path: Path) -> None:
    path = unpack_repo(algorithm, tmp_path)
    (recorded,) = [
        json.loads(c["stdout"]) for c in runs_of(algorithm, "cfsctl --repo $REPO fsck --json")
    ]
    report = Repository.open(path).fsck()
    assert report.ok and report.problems == []
    assert recorded["ok"] is True
    assert (report.objects_checked, report.streams_checked, report.images_checked) == (
        recorded["objects_checked"],
        recorded["streams_checked"],
        recorded["images_checked"],
    )
    assert report.stream_refs_checked == 8


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(unpack_repo("sha256", tmp_path))


def test_truncated_stream(repo: Repository) -> None:
    layer = _stream(repo.path, "oci-layer-")
    obj = _object_of(repo.path, layer)
    obj.chmod(0o644)
    with open(obj, "r+b") as fh:
        fh.truncate(40)
    report = repo.fsck()
    assert ("stream-open-failed", f"streams/{layer}") in _kinds(report)
    assert not report.ok


@pytest.mark.parametrize("offset", [0, 16, 24, 40, 56, 88])
def test_garbled_stream(repo: Repository, offset: int) -> None:
    """Magic, the info range, and the ends of the reference ranges inside info
    (stream refs, object refs, named refs) turned into nonsense."""
    config = _stream(repo.path, "oci-config-")
    obj = _object_of(repo.path, config)
    data = bytearray(obj.read_bytes())
    data[offset : offset + 8] = b"\xff" * 8
    obj.write_bytes(bytes(data))
    report = repo.fsck()
    assert ("stream-open-failed", f"streams/{config}") in _kinds(report)
    before = listing(repo.path)
    with pytest.raises(CorruptRepositoryError, match="refusing to collect garbage"):
        repo.gc()  # a root's stream: what it uses is unknown, so nothing goes
    assert listing(repo.path) == before


def test_stream_object_deleted(repo: Repository) -> None:
    manifest = os.readlink(repo.path / "streams" / "refs" / "oci" / "boot").rsplit("/", 1)[1]
    _object_of(repo.path, manifest).unlink()
    kinds = _kinds(repo.fsck())
    assert ("broken-symlink", f"streams/{manifest}") in kinds
    assert ("broken-symlink", "streams/refs/oci/boot") in kinds
    # A tag whose stream is gone stops GC (as with cfsctl): what it kept is unknown.
    before = listing(repo.path)
    with pytest.raises(CorruptRepositoryError, match="refusing to collect garbage"):
        repo.gc()
    assert listing(repo.path) == before
    os.unlink(repo.path / "streams" / "refs" / "oci" / "boot")  # cfsctl oci untag
    result = repo.gc()
    assert not (repo.path / "streams" / manifest).is_symlink()
    assert result.streams_pruned >= 2  # the manifest's dangling link, boot's config
    assert repo.fsck().ok


def test_referenced_object_deleted(repo: Repository) -> None:
    layer = next(
        s
        for s in sorted(p.name for p in (repo.path / "streams").iterdir())
        if s.startswith("oci-layer-") and _refs(repo, s).object_refs
    )
    missing = _refs(repo, layer).object_refs[0]
    repo.object_path(missing).unlink()
    report = repo.fsck()
    assert any(
        p.kind == "missing-object-ref" and p.path == f"streams/{layer}" and missing in p.message
        for p in report.problems
    )


def test_named_ref_object_deleted(repo: Repository) -> None:
    config = _stream(repo.path, "oci-config-")
    name, ref = sorted(_refs(repo, config).named_refs)[-1]
    repo.object_path(ref).unlink()
    report = repo.fsck()
    assert any(
        p.kind == "missing-named-ref" and p.path == f"streams/{config}" and name in p.message
        for p in report.problems
    )


def test_broken_and_strange_entries(repo: Repository) -> None:
    streams = repo.path / "streams"
    (streams / "refs" / "oci" / "gone").symlink_to("../../oci-manifest-sha256:" + "0" * 64)
    (streams / "not-a-link").write_bytes(b"SplitStream")
    (streams / "outside").symlink_to("/etc/passwd")
    (streams / "dangling").symlink_to("../objects/00/" + "1" * 62)
    (streams / "refs" / "oci" / "file").write_bytes(b"")
    kinds = _kinds(repo.fsck())
    assert {
        ("broken-symlink", "streams/refs/oci/gone"),
        ("entry-not-symlink", "streams/not-a-link"),
        ("stream-open-failed", "streams/outside"),
        ("broken-symlink", "streams/dangling"),
        ("unexpected-file-type", "streams/refs/oci/file"),
    } <= kinds
    # GC refuses what cfsctl gc refuses, and changes nothing.
    before = listing(repo.path)
    with pytest.raises(CorruptRepositoryError, match="refusing to collect garbage"):
        repo.gc()
    assert listing(repo.path) == before
    for name in ("refs/oci/gone", "not-a-link", "outside", "refs/oci/file"):
        os.unlink(streams / name)
    # A dangling stream link goes, as cfsctl prunes it.
    assert repo.gc().streams_pruned == 1
    assert not (streams / "dangling").is_symlink()
    assert repo.fsck().ok


# -- verify_stream ----------------------------------------------------------------------------


def test_verify_stream_golden(repo: Repository) -> None:
    for name in sorted(p.name for p in (repo.path / "streams").iterdir() if p.name != "refs"):
        report = repo.verify_stream(name)
        assert report.ok, report.to_dict()
        assert report.digest == os.readlink(repo.path / "streams" / name).replace("/", "")[-64:]
    report = repo.verify_stream("refs/oci/boot")
    assert report.ok and report.objects_checked >= 2  # the config and its JSON object
    assert report.to_dict()["stream"] == "refs/oci/boot"


def test_verify_stream_damage(repo: Repository) -> None:
    layer = next(
        s
        for s in sorted(p.name for p in (repo.path / "streams").iterdir())
        if s.startswith("oci-layer-") and _refs(repo, s).object_refs
    )
    refs = _refs(repo, layer).object_refs
    gone, damaged = refs[0], refs[-1]
    assert gone != damaged
    repo.object_path(gone).unlink()
    victim = repo.object_path(damaged)
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:-1] + b"!")
    report = repo.verify_stream(layer)
    assert not report.ok
    assert report.missing == [gone]
    assert [d for d, _ in report.corrupt] == [damaged]
    for bad in ("nope", "refs/nope", "refs/../x", "../objects", "refs", ""):
        report = repo.verify_stream(bad)
        assert not report.ok and "names no stream" in report.image_problems[0]
    obj = _object_of(repo.path, layer)
    obj.write_bytes(b"SplitStream\0")
    report = repo.verify_stream(layer)
    assert not report.ok
    assert any("not a valid splitstream" in p for p in report.image_problems)
    assert any("digest mismatch" in p for p in report.image_problems)
