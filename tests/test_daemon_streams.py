"""The daemon over Varlink on repositories composefs-rs wrote (golden data): GC with
extra roots as ``cfsctl gc --root`` takes them, Verify of streams (all of them,
or one), hostile roots and stream names refused, damaged streams reported while
the daemon keeps serving; and a V2 image in a SHA-512 repository through
CreateImage, Verify, GC and RemoveImage."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from composefsd.image.formats import ErofsVersion, image_version
from composefsd.image.reader import iter_objects, read_image
from composefsd.repository import Repository
from composefsd.repository.verify import verify_stream
from composefsd.service import client
from composefsd.service.client import INTERFACE, Connection, VarlinkCallError
from composefsd.splitstream import read_refs
from ctlrun import run_ctl
from rsgolden import ALGORITHMS, listing, unpack_repo
from servicehelpers import Daemon, running_daemon
from trees import write_tree

_INVALID = "org.varlink.service.InvalidParameter"


@pytest.fixture(params=ALGORITHMS)
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    return request.param, unpack_repo(request.param, tmp_path)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Daemon, Connection]]:
    """The sha256 golden repository, served."""
    path = unpack_repo("sha256", tmp_path)
    with running_daemon(path) as d, client.connect(d.address) as conn:
        yield path, d, conn


def _call(conn: Connection, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return dict(conn.call(f"{INTERFACE}.{method}", params or {}))


def _results(conn: Connection, method: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The result replies of a ``more`` call (progress left out)."""
    return [
        dict(r)
        for r in conn.call(f"{INTERFACE}.{method}", params, more=True)
        if "progress" not in r
    ]


def _refused(conn: Connection, method: str, params: dict[str, Any]) -> VarlinkCallError:
    with pytest.raises(VarlinkCallError) as info:
        conn.call(f"{INTERFACE}.{method}", params)
    return info.value


def _first(directory: Path, prefix: str = "") -> str:
    return sorted(
        p.name for p in directory.iterdir() if p.name != "refs" and p.name.startswith(prefix)
    )[0]


def _stream_object(path: Path, name: str) -> Path:
    """The object file behind ``streams/<name>``, made writable."""
    obj = (path / "streams" / name).resolve()
    obj.chmod(0o644)
    return obj


# -- GarbageCollect with roots ----------------------------------------------------------------


def test_gc_roots_through_the_daemon(
    capsys: pytest.CaptureFixture[str], golden: tuple[str, Path]
) -> None:
    """Without refs, the roots alone keep things: the daemon removes what the library
    computes for the same roots, and keeps what they name."""
    _alg, path = golden
    shutil.rmtree(path / "streams" / "refs")
    shutil.rmtree(path / "images" / "refs")
    config = _first(path / "streams", "oci-config-")
    image = _first(path / "images")
    repo = Repository.open(path)
    cases: list[list[str]] = [[], [config], [image], [config, image], ["t1-basic"]]
    expected = [repo.gc(dry_run=True, roots=roots) for roots in cases]
    everything = expected[0]
    assert expected[1].objects_removed < everything.objects_removed
    assert expected[2].objects_removed < everything.objects_removed
    # A ref name is no entry of images/ or streams/: it keeps nothing (as cfsctl).
    assert expected[4] == everything
    before = listing(path)
    with running_daemon(path) as d, client.connect(d.address) as conn:
        for roots, want in zip(cases, expected, strict=True):
            got = _call(conn, "GarbageCollect", {"dryRun": True, "roots": roots})
            assert (
                got["objectsRemoved"],
                got["bytesRemoved"],
                got["imagesRemoved"],
                got["streamsPruned"],
            ) == (
                want.objects_removed,
                want.bytes_removed,
                want.images_removed,
                want.streams_pruned,
            ), roots
        assert listing(path) == before
        status, out, err = run_ctl(
            capsys, "--connect", d.address, "gc", "--root", config, "--root", image, "--json"
        )
        assert (status, err) == (0, "")
        assert json.loads(out)["objects_removed"] == expected[3].objects_removed
    assert (path / "streams" / config).exists()
    assert (path / "images" / image).exists()
    assert repo.gc(dry_run=True, roots=[config, image]).objects_removed == 0
    assert repo.fsck().ok


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "..",
        "../objects",
        "oci/boot",
        "refs/oci/boot",
        "/abs",
        "name\n",
        "tab\there",
        "del\x7f",
        "c1\u0085",
        ".hidden",
        "a" * 256,
        "\u00e9" * 128,
    ],
)
def test_gc_refuses_hostile_roots(served: tuple[Path, Daemon, Connection], bad: str) -> None:
    path, _d, conn = served
    shutil.rmtree(path / "images" / "refs")
    before = listing(path)
    e = _refused(conn, "GarbageCollect", {"roots": [_first(path / "images"), bad]})
    assert (e.name, e.parameters) == (_INVALID, {"parameter": "roots[1]"})
    assert listing(path) == before
    assert _call(conn, "Describe")["images"] == 9


def test_gc_refuses_too_many_roots_and_non_strings(
    capsys: pytest.CaptureFixture[str], served: tuple[Path, Daemon, Connection]
) -> None:
    path, d, conn = served
    shutil.rmtree(path / "images" / "refs")
    before = listing(path)
    image = _first(path / "images")
    e = _refused(conn, "GarbageCollect", {"roots": [image] * 1025})
    assert e.parameters == {"parameter": "roots"}
    e = _refused(conn, "GarbageCollect", {"roots": [image, 7]})
    assert e.parameters == {"parameter": "roots[1]"}
    e = _refused(conn, "GarbageCollect", {"roots": image})
    assert e.parameters == {"parameter": "roots"}
    # 1024 is allowed (a dry run: nothing goes).
    assert _call(conn, "GarbageCollect", {"roots": [image] * 1024, "dryRun": True})["dryRun"]
    status, _out, err = run_ctl(capsys, "--connect", d.address, "gc", "--root", "../x")
    assert status == 1 and f"{_INVALID}: invalid parameter 'roots[0]'" in err
    assert listing(path) == before


# -- Verify of streams ------------------------------------------------------------------------


def test_verify_all_covers_every_stream(golden: tuple[str, Path]) -> None:
    alg, path = golden
    repo = Repository.open(path)
    streams = sorted(p.name for p in (path / "streams").iterdir() if p.name != "refs")
    images = sorted(p.name for p in (path / "images").iterdir() if p.name != "refs")
    with running_daemon(path) as d, client.connect(d.address) as conn:
        results = _results(conn, "Verify", {})
        one = _call(conn, "Verify", {"stream": "refs/oci/boot"})
    assert [r["digest"] for r in results if "stream" not in r] != []
    assert sorted(r["digest"] for r in results if "stream" not in r) == images
    stream_results = [r for r in results if "stream" in r]
    assert [r["stream"] for r in stream_results] == streams
    for r in stream_results:
        report = verify_stream(repo, r["stream"])
        assert r["ok"] and r["problems"] == [], r
        assert (r["digest"], r["objectsChecked"]) == (report.digest, report.objects_checked)
    manifest = os.readlink(path / "streams" / "refs" / "oci" / "boot").rsplit("/", 1)[-1]
    (by_name,) = [r for r in stream_results if r["stream"] == manifest]
    assert one == {**by_name, "stream": "refs/oci/boot"}
    assert one["objectsChecked"] > 0, alg


def test_damaged_streams_are_reported_and_the_daemon_keeps_serving(
    capsys: pytest.CaptureFixture[str], served: tuple[Path, Daemon, Connection]
) -> None:
    path, d, conn = served
    repo = Repository.open(path)
    layers = sorted(p.name for p in (path / "streams").iterdir() if p.name.startswith("oci-layer-"))
    robbed = next(name for name in layers if _referenced(repo, name))
    victim = _referenced(repo, robbed)[0]
    truncated, garbled = [name for name in layers if name != robbed][:2]
    obj = _stream_object(path, truncated)
    obj.write_bytes(obj.read_bytes()[:40])
    obj = _stream_object(path, garbled)
    obj.write_bytes(b"SplitStream" + bytes(range(256)) * 4)
    repo.object_path(victim).unlink()
    (path / "streams" / "refs" / "oci" / "dangling").symlink_to("../../oci-manifest-sha256:00")

    results = {r["stream"]: r for r in _results(conn, "Verify", {}) if "stream" in r}
    for name in (truncated, garbled):
        r = results[name]
        assert not r["ok"]
        kinds = {p["kind"] for p in r["problems"]}
        assert "stream" in kinds, r
        assert any("not a valid splitstream" in p["message"] for p in r["problems"]), r
    assert not results[robbed]["ok"]
    assert {
        "kind": "missing-object",
        "object": victim,
        "message": f"object {victim} is missing",
    } in results[robbed]["problems"]
    dangling = results["refs/oci/dangling"]
    assert not dangling["ok"] and "digest" not in dangling
    assert [p["kind"] for p in dangling["problems"]] == ["stream"]
    damaged = {truncated, garbled, robbed, "refs/oci/dangling"}
    # Streams not touched (and not sharing the removed object) stay ok.
    assert any(r["ok"] for name, r in results.items() if name not in damaged)

    one = _call(conn, "Verify", {"stream": truncated})
    assert one == results[truncated]
    status, out, _err = run_ctl(capsys, "--connect", d.address, "verify", "--stream", garbled)
    assert status == 1
    assert out.startswith(f"stream {garbled}: FAILED\n")
    assert "  stream: not a valid splitstream" in out
    status, out, _err = run_ctl(
        capsys, "--connect", d.address, "verify", "--stream", "refs/oci/dangling", "--json"
    )
    (doc,) = json.loads(out)
    assert (status, doc["stream"], doc["ok"]) == (1, "refs/oci/dangling", False)
    # The daemon still serves, and GC still refuses what it cannot follow.
    assert d.proc.poll() is None
    assert _call(conn, "Describe")["images"] == 9
    e = _refused(conn, "GarbageCollect", {"dryRun": True})
    assert e.name == f"{INTERFACE}.RepositoryCorrupt"


def _referenced(repo: Repository, name: str) -> list[str]:
    """Objects the stream ``name`` references."""
    data = (repo.path / "streams" / name).read_bytes()
    return list(read_refs(data, repo.hash_algorithm.digest_size).object_refs)


def test_verify_stream_refuses_hostile_names(served: tuple[Path, Daemon, Connection]) -> None:
    _path, _d, conn = served
    for bad in (
        "../meta.json",
        "..",
        ".",
        "",
        "refs",
        "refs/",
        "refs/../../meta.json",
        "refs/oci/../../../meta.json",
        "a/b",
        "/etc/passwd",
        "x\n",
        "refs/oci/\x1b[2J",
        "a" * 256,
        "refs/" + "/".join(["a"] * 65),
    ):
        e = _refused(conn, "Verify", {"stream": bad})
        assert (e.name, e.parameters) == (_INVALID, {"parameter": "stream"}), bad
    e = _refused(conn, "Verify", {"stream": "refs/oci/boot", "image": "t1-basic"})
    assert e.parameters == {"parameter": "stream"}
    # A good name of nothing is a failed check, not an error.
    r = _call(conn, "Verify", {"stream": "oci-config-sha256:nothing"})
    assert not r["ok"] and [p["kind"] for p in r["problems"]] == ["stream"]
    assert r["stream"] == "oci-config-sha256:nothing" and "digest" not in r


def test_a_stream_name_that_is_not_utf8_is_shown_escaped(
    served: tuple[Path, Daemon, Connection],
) -> None:
    path, _d, conn = served
    config = _first(path / "streams", "oci-config-")
    target = os.readlink(path / "streams" / config)
    os.symlink(target, os.path.join(os.fsencode(path / "streams"), b"odd\xc3\xa9\xff"))
    results = [r for r in _results(conn, "Verify", {}) if "stream" in r]
    (odd,) = [r for r in results if r["stream"].startswith("odd")]
    assert odd["stream"] == "odd\u00e9\\udcff"
    assert odd["ok"], odd
    # A broken one: its problem's message names it, escaped too.
    os.symlink("../objects/00/" + "0" * 62, os.path.join(os.fsencode(path / "streams"), b"bad\xff"))
    results = [r for r in _results(conn, "Verify", {}) if "stream" in r]
    (bad,) = [r for r in results if r["stream"].startswith("bad")]
    assert bad["stream"] == "bad\\udcff" and not bad["ok"]
    assert [p["kind"] for p in bad["problems"]] == ["stream"]
    assert "bad\\udcff" in bad["problems"][0]["message"]


# -- a V2 image in a SHA-512 repository -------------------------------------------------------


def _v2_tree(src: Path) -> None:
    write_tree(src, {"a": b"a" * 5000, "d/b": b"b" * 70000, "small": b"s"}, {"l": "a"})
    os.mknod(src / "d" / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))


def test_v2_sha512_image_through_gc_and_remove_image(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _v2_tree(src)
    repo = Repository.init(tmp_path / "repo", algorithm="fsverity-sha512-12", erofs_version=2)
    with running_daemon(repo.path) as d, client.connect(d.address) as conn:
        created = _call(conn, "CreateImage", {"sourcePath": str(src), "ref": "v2"})
        digest = created["digest"]
        assert (len(digest), created["erofsVersion"]) == (128, 2)
        data = repo.image_path(digest).read_bytes()
        assert image_version(data) is ErofsVersion.V2
        tree = read_image(data, c_quirks=False).root
        sub = (tree.children or {})[b"d"].children or {}
        whiteout = sub[b"wh"]  # V2 keeps it, in a repository's reading
        assert stat.S_ISCHR(whiteout.mode) and whiteout.rdev == 0
        objects = iter_objects(tree)
        assert len(objects) == 2
        (verified,) = _results(conn, "Verify", {})
        assert verified["ok"] and verified["objectsChecked"] == 2
        kept = _call(conn, "GarbageCollect", {})
        assert (kept["objectsRemoved"], kept["imagesRemoved"]) == (0, 0)
        assert all((repo.objects_dir / os.fsdecode(o)).exists() for o in objects)
        assert _call(conn, "RemoveImage", {"image": "v2"})["removedRefs"] == ["v2"]
        gone = _call(conn, "GarbageCollect", {})
        # Both objects and the image object (its link went with RemoveImage).
        assert (gone["objectsRemoved"], gone["imagesRemoved"]) == (3, 0)
    assert list(repo.objects_dir.glob("*/*")) == []
    assert [p.name for p in repo.images_dir.iterdir()] == ["refs"]


def test_gc_refuses_an_image_the_repository_reader_refuses(tmp_path: Path) -> None:
    """An image object longer than its superblock says (C's reader takes it; the
    repository way, as composefs-rs, does not): GC stops before removing anything."""
    src = tmp_path / "src"
    _v2_tree(src)
    repo = Repository.init(tmp_path / "repo", algorithm="fsverity-sha512-12", erofs_version=2)
    digest = repo.create_image(src, ref="v2").digest
    write_tree(tmp_path / "garbage", {"x": b"x" * 100})
    repo.create_image(tmp_path / "garbage")  # an image no ref keeps
    image = repo.image_path(digest).resolve()
    image.chmod(0o644)
    with open(image, "ab") as f:
        f.write(bytes(4096))
    before = listing(repo.path)
    with running_daemon(repo.path) as d, client.connect(d.address) as conn:
        e = _refused(conn, "GarbageCollect", {})
        assert e.name == f"{INTERFACE}.RepositoryCorrupt"
        assert f"image {digest} does not parse" in e.parameters["message"]
    assert listing(repo.path) == before


def test_verify_all_output_is_the_same_through_the_daemon_and_directly(
    capsys: pytest.CaptureFixture[str], served: tuple[Path, Daemon, Connection]
) -> None:
    path, d, _conn = served
    config = _first(path / "streams", "oci-config-")
    obj = _stream_object(path, config)
    obj.write_bytes(obj.read_bytes()[:-3])
    status, out, _ = run_ctl(capsys, "--connect", d.address, "verify", "--all", "--json")
    dstatus, direct, _ = run_ctl(capsys, "--repo", str(path), "verify", "--all", "--json")
    assert (status, dstatus) == (1, 1)
    docs, ddocs = json.loads(out), json.loads(direct)
    assert len(docs) == len(ddocs) == 9 + 18
    for doc, ddoc in zip(docs, ddocs, strict=True):
        assert doc == {
            k: v for k, v in ddoc.items() if k not in ("bytes_checked", "verity_required")
        }
    # The config stream, and the manifest naming it (its object is now corrupt).
    failed = {doc.get("stream"): doc for doc in docs if not doc["ok"]}
    assert failed[config]["image_problems"]
    assert all(name.startswith("oci-manifest-") for name in set(failed) - {config})
    status, out, _ = run_ctl(capsys, "--connect", d.address, "verify", "--all")
    _, direct, _ = run_ctl(capsys, "--repo", str(path), "verify", "--all")
    # The same lines but for the bytes checked, which only direct mode knows.
    assert len(out.splitlines()) == len(direct.splitlines())
    assert f"stream {config}: FAILED\n" in out and f"stream {config}: FAILED\n" in direct
