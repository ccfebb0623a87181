"""GC with composefs-rs's roots on the repositories cfsctl wrote (golden data): the
same objects go as with ``cfsctl gc``, the same links are pruned, and the
repository looks the same afterwards, through every step the generator recorded
(gc, untag + gc, removing image refs + gc, extra roots)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from composefsd.repository import Repository
from composefsd.repository.gc import GcResult, discard_added
from composefsd.repository.streams import reachable
from rsgolden import (
    ALGORITHMS,
    expected_listing,
    gc_counts,
    listing,
    runs_of,
    unpack_repo,
)


def _recorded(algorithm: str, command: str) -> list[str]:
    """Stdout of every recorded run of ``cfsctl <command>``, in order."""
    return [c["stdout"] for c in runs_of(algorithm, f"cfsctl {command}")]


def _same_counts(result: GcResult, stdout: str, *, pruned: bool = False) -> None:
    objects, nbytes, links = gc_counts(stdout)
    assert (result.objects_removed, result.bytes_removed) == (objects, nbytes)
    if pruned:
        images, streams = links or (0, 0)
        assert (result.images_removed + result.links_removed, result.streams_pruned) == (
            images,
            streams,
        )


def _without_ref_dirs(lines: list[str]) -> list[str]:
    """Directory lines under images/refs dropped: composefsd's GC removes the empty
    ones cfsctl leaves (its symlinks, which are what matters, stay compared)."""
    return [line for line in lines if not line.startswith("d images/refs/")]


@pytest.fixture(params=ALGORITHMS)
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    return request.param, unpack_repo(request.param, tmp_path)


def test_snapshot_opens_unchanged_and_dry_run_matches(golden: tuple[str, Path]) -> None:
    alg, path = golden
    before = listing(path)
    assert before == expected_listing(f"repo-{alg}.listing.txt")
    repo = Repository.open(path)
    result = repo.gc(dry_run=True)
    _same_counts(result, _recorded(alg, "--repo $REPO gc --dry-run")[0])
    assert result.streams_kept == 18 and result.streams_pruned == 0
    assert listing(path) == before


def test_gc_untag_and_unref_match_cfsctl(golden: tuple[str, Path]) -> None:
    alg, path = golden
    repo = Repository.open(path)
    runs = _recorded(alg, "--repo $COPY gc")
    dry_runs = _recorded(alg, "--repo $COPY gc --dry-run")

    _same_counts(repo.gc(), runs[0], pruned=True)
    assert listing(path) == expected_listing(f"repo-{alg}.after-gc.listing.txt")

    for tag in ("single", "multi"):  # cfsctl oci untag
        os.unlink(path / "streams" / "refs" / "oci" / tag)
    _same_counts(repo.gc(dry_run=True), dry_runs[0])
    _same_counts(repo.gc(), runs[1], pruned=True)
    assert listing(path) == expected_listing(f"repo-{alg}.after-untag-gc.listing.txt")
    assert repo.fsck().ok

    # --root takes names of images/ and streams/ entries; a ref name is none of them.
    (root_dry,) = _recorded(alg, "--repo $COPY gc --root t1-basic --dry-run")
    _same_counts(repo.gc(dry_run=True, roots=["t1-basic"]), root_dry)

    for ref in ("t1-basic", "t1-basic-v2", "nested/t3-xattrs"):
        os.unlink(path / "images" / "refs" / ref)
    _same_counts(repo.gc(dry_run=True), dry_runs[1])
    (rooted,) = _recorded(alg, "--repo $COPY gc --dry-run --root t1-basic")
    _same_counts(repo.gc(dry_run=True, roots=["t1-basic"]), rooted)
    _same_counts(repo.gc(), runs[2], pruned=True)
    assert _without_ref_dirs(listing(path)) == _without_ref_dirs(
        expected_listing(f"repo-{alg}.after-unref-images-gc.listing.txt")
    )
    assert repo.fsck().ok
    again = repo.gc()
    assert (again.objects_removed, again.streams_pruned, again.images_removed) == (0, 0, 0)


def test_extra_roots_name_images_and_streams(golden: tuple[str, Path]) -> None:
    _alg, path = golden
    repo = Repository.open(path)
    shutil.rmtree(path / "streams" / "refs")
    shutil.rmtree(path / "images" / "refs")
    everything = repo.gc(dry_run=True)
    config = next(p.name for p in (path / "streams").iterdir() if p.name.startswith("oci-config"))
    image = next(p.name for p in (path / "images").iterdir() if p.name != "refs")
    with_stream = repo.gc(dry_run=True, roots=[config])
    with_image = repo.gc(dry_run=True, roots=[image])
    assert with_stream.objects_removed < everything.objects_removed
    assert with_image.objects_removed < everything.objects_removed
    # The config stream keeps itself, its layer streams and its EROFS image.
    assert with_stream.streams_kept >= 2
    assert with_stream.streams_pruned == everything.streams_pruned - with_stream.streams_kept
    assert with_stream.images_kept == 1 and with_image.images_kept == 1
    repo.gc(roots=[config, image])
    assert (path / "streams" / config).exists()
    assert (path / "images" / image).exists()
    assert repo.fsck().ok


def test_failed_create_keeps_objects_streams_use(golden: tuple[str, Path]) -> None:
    """A failed CreateImage removes the objects it wrote, but not one a stream uses
    (a cfsctl import may have found it there and reused it)."""
    alg, path = golden
    repo = Repository.open(path)
    used = sorted(reachable(repo).objects)[0]
    before = repo.gc(dry_run=True).objects_removed
    # An object cfsctl gc removed from the snapshot.
    after = set(expected_listing(f"repo-{alg}.after-gc.listing.txt"))
    gone = [line for line in expected_listing(f"repo-{alg}.listing.txt") if line not in after]
    garbage = gone[0].split()[1].removeprefix("objects/").replace("/", "")
    assert discard_added(repo, [used, garbage], time.time()) == 1
    assert repo.object_path(used).exists() and not repo.object_path(garbage).exists()
    assert repo.gc(dry_run=True).objects_removed == before - 1
