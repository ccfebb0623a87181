"""The repository's stream catalogue (composefsd.repository.streams) on the
cfsctl-written golden repositories, and on hostile copies of them."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path

import pytest

from composefsd.image.reader import iter_objects, read_image
from composefsd.repository import Repository
from composefsd.repository.streams import (
    StreamError,
    StreamNotFoundError,
    cat,
    iter_stream_refs,
    iter_streams,
    reachable,
    read_stream,
    resolve_stream,
)
from rsgolden import ALGORITHMS, RS, commands, expected_listing, listed_objects, unpack_repo


def listed_links(lines: list[str], prefix: str) -> dict[str, str]:
    found = (re.match(rf"l {re.escape(prefix)}(\S+) -> (\S+)$", line) for line in lines)
    return {m.group(1): m.group(2) for m in found if m}


def image_part(repo: Repository) -> set[str]:
    """What composefs-rs's GC keeps for ``images/refs`` (the other half of gc_impl)."""
    live: set[str] = set()
    for dirpath, _dirs, files in os.walk(repo.refs_dir):
        for name in files:
            image = os.readlink(os.path.join(dirpath, name)).rsplit("/", 1)[-1]
            live.add(image)
            root = read_image((repo.images_dir / image).read_bytes()).root
            live.update(p.decode().replace("/", "") for p in iter_objects(root))
    return live


@pytest.fixture(params=ALGORITHMS)
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Repository]:
    return request.param, Repository.open(unpack_repo(request.param, tmp_path))


def test_streams_listing_matches(golden: tuple[str, Repository]) -> None:
    algorithm, repo = golden
    lines = expected_listing(f"repo-{algorithm}.listing.txt")
    links = listed_links(lines, "streams/")
    expected = {cid: target for cid, target in links.items() if not cid.startswith("refs/")}
    found = list(iter_streams(repo))
    assert {s.content_id: s.target for s in found} == expected
    for link in found:
        assert link.well_formed
        assert link.target == f"../objects/{link.digest[:2]}/{link.digest[2:]}"  # type: ignore[index]
    refs = {r.name: r for r in iter_stream_refs(repo)}
    assert {name: r.target for name, r in refs.items()} == {
        cid.removeprefix("refs/"): t for cid, t in links.items() if cid.startswith("refs/")
    }
    for ref in refs.values():
        assert ref.content_id == ref.target.rsplit("/", 1)[-1]
    assert refs["oci/multi:v2"].content_id == refs["oci/multi"].content_id


def test_every_stream_object_parses(golden: tuple[str, Repository]) -> None:
    _algorithm, repo = golden
    with repo.object_store() as store:
        for link in iter_streams(repo):
            assert link.digest is not None
            parsed = read_stream(store, link.digest)
            assert parsed.refs.content_type


def test_reachable_is_what_cfsctl_gc_keeps(golden: tuple[str, Repository]) -> None:
    """Stream reach plus image refs is exactly the set of objects left by cfsctl gc."""
    algorithm, repo = golden
    reach = reachable(repo)
    present = {
        d + r for d in os.listdir(repo.objects_dir) for r in os.listdir(repo.objects_dir / d)
    }
    kept = listed_objects(expected_listing(f"repo-{algorithm}.after-gc.listing.txt"))
    assert (reach.objects | image_part(repo)) & present == kept
    assert len(present - kept) == 12  # the README's "Objects: 12 removed"
    assert reach.streams == {s.content_id for s in iter_streams(repo)}


def test_reachable_after_untag(golden: tuple[str, Repository]) -> None:
    """cfsctl's "untag single, untag multi, gc" on a copy of the repository."""
    algorithm, repo = golden
    (repo.path / "streams" / "refs" / "oci" / "single").unlink()
    (repo.path / "streams" / "refs" / "oci" / "multi").unlink()
    reach = reachable(repo)
    present = {
        d + r for d in os.listdir(repo.objects_dir) for r in os.listdir(repo.objects_dir / d)
    }
    kept = listed_objects(expected_listing(f"repo-{algorithm}.after-untag-gc.listing.txt"))
    assert (reach.objects | image_part(repo)) & present == kept


def test_additional_roots_name_streams(golden: tuple[str, Repository]) -> None:
    _algorithm, repo = golden
    layer = next(s for s in iter_streams(repo) if s.content_id.startswith("oci-layer-"))
    only = reachable(repo, [layer.content_id, "no-such-stream"], with_refs=False)
    shutil.rmtree(repo.path / "streams" / "refs")
    assert reachable(repo).objects == set()
    reach = reachable(repo, [layer.content_id, "no-such-stream"])
    assert reach == only
    assert reach.streams == {layer.content_id}
    with repo.object_store() as store:
        assert layer.digest is not None
        refs = read_stream(store, layer.digest).refs
    assert reach.objects == {layer.digest, *refs.object_refs}


def test_hostile_stream_links_are_refused(golden: tuple[str, Repository]) -> None:
    _algorithm, repo = golden
    streams = repo.path / "streams"
    (streams / "refs" / "dangling").symlink_to("../oci-layer-sha256:" + "0" * 64)
    with pytest.raises(StreamError, match="no stream"):
        reachable(repo)
    (streams / "refs" / "dangling").unlink()
    (streams / "refs" / "parent").symlink_to("..")  # no file name: skipped, as by cfsctl
    (streams / "refs" / "file").write_text("x")
    with pytest.raises(StreamError, match="neither a symlink nor a directory"):
        reachable(repo)
    (streams / "refs" / "file").unlink()
    (streams / "plain").write_text("x")
    with pytest.raises(StreamError, match="not a symlink"):
        reachable(repo)
    (streams / "plain").unlink()
    reachable(repo)


def test_stream_links_outside_the_repository_are_not_followed(
    golden: tuple[str, Repository], tmp_path: Path
) -> None:
    """A stream link pointing out of the repository: only its last XX/rest is used,
    and that object is opened below objects/ (so the outside file is never read)."""
    _algorithm, repo = golden
    outside = tmp_path / "outside" / "ab"
    outside.mkdir(parents=True)
    digest = "ab" + "c" * (2 * repo.hash_algorithm.digest_size - 2)
    (outside / digest[2:]).write_bytes(b"SplitStream")
    cid = "oci-layer-sha256:" + "1" * 64
    (repo.path / "streams" / cid).symlink_to(outside / digest[2:])
    (repo.path / "streams" / "refs" / "evil").symlink_to("../" + cid)
    with pytest.raises(StreamError, match="cannot open stream object"):
        reachable(repo)


def test_damaged_stream_is_refused(golden: tuple[str, Repository]) -> None:
    _algorithm, repo = golden
    link = next(s for s in iter_streams(repo) if s.content_id.startswith("oci-manifest-"))
    assert link.digest is not None
    path = repo.object_path(link.digest)
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data[:40])
    with pytest.raises(StreamError, match=link.content_id):
        reachable(repo)


def test_cycles_and_long_chains_are_walked_once(tmp_path: Path) -> None:
    """Streams naming each other in a cycle, and a chain deeper than Python's
    recursion limit, are traced without recursion."""
    from composefsd.splitstream import CONTENT_TYPE_OCI_CONFIG

    repo = Repository.init(tmp_path / "repo", algorithm="sha256")
    size = 32
    (repo.path / "streams" / "refs").mkdir(parents=True)
    with repo.object_store() as store:

        def put(data: bytes) -> str:
            return store.store_bytes(data).digest

        count = 1500
        # Write from the tail: each stream names the next one's object.
        nxt: str | None = None
        digests: list[str] = []
        for i in reversed(range(count)):
            data = _tiny_stream(CONTENT_TYPE_OCI_CONFIG, [nxt] if nxt else [], size)
            nxt = put(data)
            digests.append(nxt)
            (repo.path / "streams" / f"s{i}").symlink_to(f"../objects/{nxt[:2]}/{nxt[2:]}")
    (repo.path / "streams" / "refs" / "head").symlink_to("../s0")
    reach = reachable(repo)
    assert reach.objects == set(digests)
    assert len(reach.streams) == count


def _tiny_stream(content_type: int, named: list[str], size: int) -> bytes:
    """A splitstream with named refs only (the writer proper is tested elsewhere)."""
    import struct

    from composefsd.splitstream import zstd_compress

    refs = b"".join(bytes.fromhex(d) for d in named)
    names = zstd_compress(b"".join(f"{i}:n{i}\0".encode() for i in range(len(named))))
    stream = zstd_compress(b"")
    info_start = 32
    sr = (info_start + 80, info_start + 80 + len(refs))
    nr = (sr[1], sr[1] + len(names))
    st = (nr[1], nr[1] + len(stream))
    header = struct.pack("<11sBHBBQQ", b"SplitStream", 0, 0, 1 if size == 32 else 2, 12, 32, 112)
    info = struct.pack("<10Q", *sr, sr[1], sr[1], *st, *nr, content_type, 0)
    return header + info + refs + names + stream


def test_cat_rebuilds_every_stream(golden: tuple[str, Repository]) -> None:
    """Each stream's content has the sha256 its content id names: layers are the
    uncompressed layer tars (diff_id), configs and manifests the OCI layout's blobs."""
    _algorithm, repo = golden
    blobs = RS / "inputs" / "oci" / "layout" / "blobs" / "sha256"
    with repo.object_store() as store:
        for link in iter_streams(repo):
            assert link.digest is not None
            out = io.BytesIO()
            size = cat(store, link.digest, out)
            data = out.getvalue()
            assert size == len(data) == read_stream(store, link.digest).stream_size
            sha = link.content_id.rsplit("sha256:", 1)[1]
            assert hashlib.sha256(data).hexdigest() == sha, link.content_id
            if not link.content_id.startswith("oci-layer-"):
                assert data == (blobs / sha).read_bytes()


def test_cat_command_output(golden: tuple[str, Repository]) -> None:
    """``cfsctl cat refs/named/single-layer`` as recorded."""
    algorithm, repo = golden
    cats = [c for c in commands(algorithm) if c["command"].startswith("cfsctl --repo $REPO cat ")]
    assert cats
    with repo.object_store() as store:
        for command in cats:
            name = command["command"].rsplit(" ", 1)[1]
            _content_id, digest = resolve_stream(repo, name)
            out = io.BytesIO()
            cat(store, digest, out)
            assert len(out.getvalue()) == command["stdout_size"]
            assert hashlib.sha256(out.getvalue()).hexdigest() == command["stdout_sha256"]


def test_resolve_stream_names(golden: tuple[str, Repository]) -> None:
    _algorithm, repo = golden
    layer = next(s for s in iter_streams(repo) if s.content_id.startswith("oci-layer-"))
    assert resolve_stream(repo, layer.content_id) == (layer.content_id, layer.digest)
    tag = resolve_stream(repo, "refs/oci/multi:v2")
    assert tag == resolve_stream(repo, "refs/oci/multi")
    assert tag[0].startswith("oci-manifest-sha256:")
    for bad in ("refs/", "refs/../x", "refs/oci/nope", "nope", "refs", "..", "a/b", "", "refs/oci"):
        with pytest.raises(StreamNotFoundError):
            resolve_stream(repo, bad)


def test_cat_refuses_content_longer_than_declared(golden: tuple[str, Repository]) -> None:
    """An object that grew (a damaged repository) cannot make cat write more than the
    stream declares; a missing object is reported."""
    _algorithm, repo = golden
    link = next(s for s in iter_streams(repo) if s.content_id.startswith("oci-config-"))
    assert link.digest is not None
    with repo.object_store() as store:
        (obj,) = read_stream(store, link.digest).refs.object_refs
        path = repo.object_path(obj)
        data = path.read_bytes()
        path.chmod(0o644)
        path.write_bytes(data + b"more")
        out = io.BytesIO()
        with pytest.raises(StreamError, match="longer than"):
            cat(store, link.digest, out)
        path.unlink()
        with pytest.raises(StreamError, match="cannot open object"):
            cat(store, link.digest, io.BytesIO())


def test_stream_link_targets_are_read_as_composefs_rs_reads_them(tmp_path: Path) -> None:
    """Only the last ``XX/rest`` of a stream link counts, in either case; a ref's
    stream is its target's last component."""
    repo = Repository.init(tmp_path / "repo", algorithm="sha256")
    streams = repo.path / "streams"
    (streams / "refs" / "sub").mkdir(parents=True)
    digest = "ab" + "0" * 62
    targets = {
        "plain": f"../objects/ab/{'0' * 62}",
        "upper": f"elsewhere/AB/{'0' * 62}",
        "short": "../objects/ab/00",
        "not-hex": f"../objects/zz/{'0' * 62}",
        "non-ascii": f"../objects/a\u0130/{'0' * 61}",
        "no-slash": f"../objects/ab0{'0' * 62}",
    }
    for name, target in targets.items():
        (streams / name).symlink_to(target)
    (streams / "dir").mkdir()
    found = {s.content_id: s for s in iter_streams(repo)}
    assert {k: v.digest for k, v in found.items()} == {
        "dir": None,
        "no-slash": None,
        "non-ascii": None,
        "not-hex": None,
        "plain": digest,
        "short": None,
        "upper": digest,
    }
    assert found["plain"].well_formed and not found["upper"].well_formed
    assert found["dir"].target is None
    refs = {
        "a": "../plain",
        "sub/b": "../../upper/",
        "c": "../plain/.",
        "d": "..",
        "e": "/",
        "f": "../missing",
    }
    for name, target in refs.items():
        (streams / "refs" / name).symlink_to(target)
    assert {r.name: r.content_id for r in iter_stream_refs(repo)} == {
        "a": "plain",
        "sub/b": "upper",
        "c": "plain",
        "d": None,
        "e": None,
        "f": None,
    }
