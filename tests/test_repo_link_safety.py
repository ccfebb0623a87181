"""Links of ``images/`` and ``streams/`` planted to lead outside the repository are
never followed: whoever can write the repository must not make the root daemon read
(and report the digest of) a file elsewhere on behalf of a Verify, fsck, GC, Mount
or RemoveImage caller.

Each planted link ends in ``objects/XX/rest`` (so that the composefs-rs way of
reading a link, its last ``XX/rest``, names an object) but leads to a file outside
the repository whose content digest we know: that digest must appear in no reply,
and nothing below the outside directory may be opened (``os.open`` is watched: what
each fd it returns is open on).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from composefsd.fsverity import digest_bytes
from composefsd.kernel.repomount import mount_repository_image
from composefsd.objectlayout import object_link_digest, object_relpath
from composefsd.repository import Repository
from composefsd.repository.errors import CorruptObjectError, CorruptRepositoryError
from composefsd.repository.fsck import fsck
from composefsd.repository.verify import verify_image, verify_stream
from composefsd.service.context import CallContext, Peer
from composefsd.service.methods import INTERFACE, RepositoryInterface
from composefsd.service.mounts import MountTracker
from trees import write_tree

STREAM = "oci-config-sha256:" + "5" * 64
SECRET = b"root:x:0:0:secret content of a file outside the repository\n"


@dataclasses.dataclass
class Planted:
    repo: Repository
    image: str  # the digest of the good image (ref "app")
    bad_image: str  # images/<bad_image> leads outside
    outside: Path
    secret_digest: str


def _outside_object(outside: Path, name: str) -> Path:
    path = outside / "objects" / object_relpath(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SECRET)
    return path


@pytest.fixture
def planted(tmp_path: Path) -> Planted:
    tree = tmp_path / "tree"
    write_tree(tree, {"a": b"a" * 5000, "b": b"bee\n"}, {})
    repo = Repository.init(tmp_path / "repo", algorithm="sha256")
    image = repo.create_image(tree, ref="app").digest
    outside = tmp_path / "outside"
    bad_image = "7" * 64
    _outside_object(outside, bad_image)
    (repo.images_dir / bad_image).symlink_to(f"../../outside/objects/{object_relpath(bad_image)}")
    streams = repo.path / "streams"
    (streams / "refs").mkdir(parents=True)
    stream_object = "8" * 64
    target = _outside_object(outside, stream_object)
    # An absolute target, as a planted /etc/shadow-style link would be.
    (streams / STREAM).symlink_to(target)
    (streams / "refs" / "tag").symlink_to(f"../{STREAM}")
    secret = digest_bytes(SECRET, "sha256").hex()
    return Planted(repo, image, bad_image, outside, secret)


@pytest.fixture
def watched(planted: Planted, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """What below the outside directory ``os.open`` opened (after all links)."""
    seen: list[str] = []
    real_open = os.open
    outside = os.path.realpath(planted.outside)

    def watching_open(
        path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        opened = os.readlink(f"/proc/self/fd/{fd}")  # what was opened, after all links
        if opened == outside or opened.startswith(outside + "/"):
            seen.append(opened)
        return fd

    monkeypatch.setattr(os, "open", watching_open)
    yield seen


def test_planted_links_are_what_the_tests_mean(planted: Planted) -> None:
    """The links name objects the composefs-rs way but are no ../objects/XX/rest."""
    alg = planted.repo.hash_algorithm
    for link in (
        planted.repo.images_dir / planted.bad_image,
        planted.repo.path / "streams" / STREAM,
    ):
        target = os.readlink(link)
        assert os.path.realpath(link).startswith(os.path.realpath(planted.outside))
        assert target.endswith("/objects/" + object_relpath(target[-65:].replace("/", "")))
        assert object_link_digest(target, alg) is None
    good = os.readlink(planted.repo.images_dir / planted.image)
    assert object_link_digest(good, alg) == planted.image


def test_verify_never_follows(planted: Planted, watched: list[str]) -> None:
    link = planted.repo.images_dir / planted.bad_image
    report = verify_image(planted.repo, planted.bad_image)
    assert not report.ok and report.objects_checked == 0
    assert len(report.image_problems) == 1
    assert str(link) in report.image_problems[0] and "not followed" in report.image_problems[0]
    report = verify_stream(planted.repo, STREAM)
    assert not report.ok and report.objects_checked == 0 and report.digest == ""
    (problem,) = report.image_problems
    assert "a stream link leading outside objects/" in problem and STREAM in problem
    # Through the ref too.
    report = verify_stream(planted.repo, "refs/tag")
    assert not report.ok and "leading outside objects/" in report.image_problems[0]
    assert verify_image(planted.repo, planted.image).ok
    assert watched == []


def test_fsck_never_follows(planted: Planted, watched: list[str]) -> None:
    report = fsck(planted.repo)
    found = {(p.kind, p.path) for p in report.problems}
    assert ("image-invalid", f"images/{planted.bad_image}") in found
    assert ("stream-open-failed", f"streams/{STREAM}") in found
    assert planted.secret_digest not in repr(report.to_dict())
    assert watched == []


def test_gc_dry_run_never_follows(planted: Planted, watched: list[str]) -> None:
    # The stream ref leads to a stream whose object is not in objects/: GC refuses,
    # as cfsctl gc does, having looked for the object only there.
    with pytest.raises(CorruptRepositoryError, match=f"stream {STREAM}: cannot open") as info:
        planted.repo.gc(dry_run=True)
    assert planted.secret_digest not in str(info.value)
    (planted.repo.path / "streams" / "refs" / "tag").unlink()
    result = planted.repo.gc(dry_run=True)
    assert planted.secret_digest not in repr(result)
    assert watched == []


def test_mount_and_remove_never_follow(planted: Planted, watched: list[str]) -> None:
    with pytest.raises(CorruptObjectError, match="not followed") as info:
        mount_repository_image(planted.repo, planted.bad_image)
    assert str(planted.repo.images_dir / planted.bad_image) in str(info.value)
    with pytest.raises(CorruptObjectError):
        planted.repo.describe_image(planted.bad_image)
    assert planted.bad_image not in [e.digest for e in planted.repo.list_images()]
    # Refused while the stream ref cannot be followed; then removed, only the link.
    with pytest.raises(CorruptRepositoryError, match=f"stream {STREAM}: cannot open"):
        planted.repo.remove_image(planted.bad_image)
    (planted.repo.path / "streams" / "refs" / "tag").unlink()
    assert planted.repo.remove_image(planted.bad_image) == []
    assert not os.path.lexists(planted.repo.images_dir / planted.bad_image)
    assert (planted.outside / "objects" / object_relpath(planted.bad_image)).read_bytes() == SECRET
    assert watched == []


def _call(iface: RepositoryInterface, method: str, *args: Any, more: bool = False) -> Any:
    replies: list[dict[str, Any]] = []
    ctx = CallContext(
        peer=Peer(os.getpid(), 0, 0),
        method=f"{INTERFACE}.{method}",
        more=more,
        fds=[],
        send_continues=replies.append,
    )
    last = getattr(iface, method)(*args, _request=ctx)
    return [*replies, last]


def test_daemon_verify_never_follows(planted: Planted, tmp_path: Path, watched: list[str]) -> None:
    iface = RepositoryInterface(planted.repo, MountTracker(tmp_path / "run"))
    replies = _call(iface, "Verify", planted.bad_image)
    (out,) = [r for r in replies if "ok" in r]
    assert out["ok"] is False
    assert [p["kind"] for p in out["problems"]] == ["image"]
    assert "not followed" in out["problems"][0]["message"]
    replies = _call(iface, "Verify", None, STREAM)
    (out,) = [r for r in replies if "ok" in r]
    assert out["ok"] is False and [p["kind"] for p in out["problems"]] == ["stream"]
    replies = _call(iface, "Verify", None, more=True)
    results = {r.get("digest") or r.get("stream"): r for r in replies if "ok" in r}
    assert results[planted.image]["ok"] is True
    assert results[planted.bad_image]["ok"] is False
    assert results[STREAM]["ok"] is False
    assert "leading outside objects/" in results[STREAM]["problems"][0]["message"]
    assert planted.secret_digest not in repr(replies)
    assert watched == []


def test_object_directory_link_never_followed(planted: Planted, watched: list[str]) -> None:
    """An ``objects/XX`` directory swapped for a link to a copy outside: its objects
    are reported, not read there."""
    objects = planted.repo.objects_dir
    report = verify_image(planted.repo, planted.image)
    assert report.ok and report.objects_checked > 0
    victim = next(
        d.name
        for d in sorted(objects.iterdir())
        if d.name != planted.image[:2] and any(d.iterdir())
    )
    moved = planted.outside / "objects" / victim
    os.rename(objects / victim, moved)
    (objects / victim).symlink_to(moved)
    report = verify_image(planted.repo, planted.image)
    assert not report.ok and report.corrupt
    assert all(d.startswith(victim) for d, _ in report.corrupt)
    kinds = {(p.kind, p.path) for p in fsck(planted.repo).problems}
    assert ("unexpected-file-type", f"objects/{victim}") in kinds
    assert watched == []
