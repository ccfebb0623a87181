"""Describe's counts in the daemon (composefsd.service.replies.RepositoryCounts): kept
while the directories they were listed from are unchanged, listed again after any
change to them (images and refs added, removed, retargeted; directories replaced,
even with the same mtime), never kept while a directory's timestamps are too recent
to tell a later change apart; and RepositoryInterface.describe_now, the daemon's
answer from the event loop, which is Describe's reply or nothing.
 It
answers only for a repository on a local filesystem (kernel.mountinfo.mount_of
finds its mount) with a bounded number of directories.

The settling time is tested with a clock handed to RepositoryCounts, not by waiting.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from composefsd.kernel.mountinfo import MountEntry, mount_of
from composefsd.repository import Repository
from composefsd.repository.images import iter_refs
from composefsd.service import methods, replies
from composefsd.service.codec import parse_reply
from composefsd.service.context import CallContext, Peer
from composefsd.service.methods import INTERFACE, RepositoryInterface
from composefsd.service.mounts import MountTracker
from composefsd.service.replies import (
    SETTLE_NS,
    SETTLE_WHOLE_SECONDS_NS,
    RepositoryCounts,
    count_images,
)
from privatens import in_private_mount_namespace

LATER = 3600 * 10**9


def _later() -> int:
    """A clock an hour ahead: every directory's timestamps look settled."""
    return time.time_ns() + LATER


def _digest(n: int) -> str:
    return f"{n:064x}"


def _image(repo: Repository, n: int) -> str:
    """An image link as the repository makes them (its target need not exist)."""
    digest = _digest(n)
    os.symlink(f"../objects/{digest[:2]}/{digest[2:]}", repo.images_dir / digest)
    return digest


def _ref(repo: Repository, name: str, digest: str) -> None:
    link = repo.refs_dir / name
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink("../" * (name.count("/") + 1) + digest, link)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", algorithm="sha256")


def _truth(repo: Repository) -> tuple[int, int]:
    return count_images(repo), sum(1 for _ in iter_refs(repo))


def test_counts_what_describe_counted(repo: Repository) -> None:
    digests = [_image(repo, n) for n in range(5)]
    _ref(repo, "app", digests[0])
    _ref(repo, "os/v1", digests[1])
    _ref(repo, "os/v2", digests[1])
    _ref(repo, "a/b/c/d", digests[2])
    (repo.images_dir / "not-a-digest").symlink_to("x")  # not an image
    (repo.images_dir / _digest(99)).write_bytes(b"")  # a file, not a link
    (repo.refs_dir / "dangling").symlink_to("../../nowhere")  # a ref all the same
    counts = RepositoryCounts(repo, clock=_later)
    assert counts.count() == _truth(repo) == (5, 5)
    assert counts.current() == (5, 5)


def test_kept_counts_take_no_listing(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    _ref(repo, "os/v1", _image(repo, 1))
    counts = RepositoryCounts(repo, clock=_later)
    assert counts.count() == (1, 1)

    def no_listing(path: Any) -> Any:
        raise AssertionError(f"listed {path}")

    monkeypatch.setattr(os, "scandir", no_listing)
    assert counts.current() == (1, 1)
    assert counts.count() == (1, 1)


@pytest.mark.parametrize(
    "change",
    [
        "add image",
        "remove image",
        "add ref",
        "add ref in a subdirectory",
        "remove ref in a subdirectory",
        "retarget ref",
        "add ref directory",
        "remove refs",
        "replace images directory, same mtime",
        "replace ref subdirectory, same mtime",
    ],
)
def test_any_change_is_seen(repo: Repository, change: str) -> None:
    a = _image(repo, 1)
    b = _image(repo, 2)
    _ref(repo, "app", a)
    _ref(repo, "os/v1", b)
    counts = RepositoryCounts(repo, clock=_later)
    counts.count()
    assert counts.current() == (2, 2)
    sub = repo.refs_dir / "os"
    if change == "add image":
        _image(repo, 3)
    elif change == "remove image":
        os.unlink(repo.images_dir / b)
    elif change == "add ref":
        _ref(repo, "other", a)
    elif change == "add ref in a subdirectory":
        _ref(repo, "os/v2", a)
    elif change == "remove ref in a subdirectory":
        os.unlink(sub / "v1")
    elif change == "retarget ref":
        # A rename over the link, as set_ref_link does: the count stays, but the
        # listing must not be trusted past the change.
        os.symlink("../../" + a, sub / "tmp")
        os.replace(sub / "tmp", sub / "v1")
    elif change == "add ref directory":
        (repo.refs_dir / "empty").mkdir()
    elif change == "remove refs":
        os.unlink(sub / "v1")
        sub.rmdir()
        os.unlink(repo.refs_dir / "app")
    elif change == "replace images directory, same mtime":
        old = repo.images_dir
        st = os.stat(old)
        new = repo.path / "images.new"
        new.mkdir()
        for entry in os.scandir(old):
            if entry.name != "refs":
                os.symlink(os.readlink(entry.path), new / entry.name)
        _image_in = new / _digest(7)
        os.symlink("x", _image_in)
        os.rename(old / "refs", new / "refs")
        os.rename(old, repo.path / "images.old")
        os.rename(new, old)
        os.utime(old, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "replace ref subdirectory, same mtime":
        st = os.stat(sub)
        new = repo.refs_dir / "os.new"
        new.mkdir()
        os.symlink("../../" + a, new / "v1")
        os.symlink("../../" + a, new / "v9")
        os.rename(sub, repo.path / "os.old")
        os.rename(new, sub)
        os.utime(sub, ns=(st.st_atime_ns, st.st_mtime_ns))
        # The parent's timestamps too: only the directory's own identity is left.
        os.utime(repo.refs_dir, ns=(st.st_atime_ns, os.stat(repo.refs_dir).st_mtime_ns))
    assert counts.current() is None
    assert counts.count() == _truth(repo)


def test_recent_listing_is_not_kept(repo: Repository) -> None:
    """Two changes within one timestamp tick leave the same mtime: a listing taken
    between them must not be kept, or the second change would never be seen."""
    _image(repo, 1)
    st = os.stat(repo.images_dir)
    changed = max(st.st_mtime_ns, st.st_ctime_ns)
    # The listing happens "right after" the change: within the settling time.
    counts = RepositoryCounts(repo, clock=lambda: changed + SETTLE_NS // 2)
    assert counts.count() == (1, 0)
    assert counts.current() is None
    # Later, once settled, it is kept.
    counts.clock = lambda: changed + SETTLE_NS + 1
    counts.count()
    assert counts.current() == (1, 0)


def test_whole_second_timestamps_settle_later(repo: Repository) -> None:
    """A filesystem with timestamps in whole seconds: a listing is kept only two
    seconds after the last change (the key is what decides, whatever the fs)."""
    key = (1, 2, 3, 4, 1_700_000_000 * 10**9, 1_700_000_000 * 10**9)
    fine = (1, 2, 3, 4, 1_700_000_000 * 10**9 + 123, 1_700_000_000 * 10**9 + 456)
    t = 1_700_000_000 * 10**9 + 1_500_000_000
    assert not replies._settled(key, t)
    assert replies._settled(fine, t)
    assert replies._settled(key, 1_700_000_000 * 10**9 + SETTLE_WHOLE_SECONDS_NS + 1)
    assert replies._settled(None, t)


def test_missing_directories(repo: Repository) -> None:
    os.rmdir(repo.refs_dir)
    counts = RepositoryCounts(repo, clock=_later)
    assert counts.count() == (0, 0)
    assert counts.current() == (0, 0)
    _ref(repo, "app", _image(repo, 1))
    assert counts.current() is None
    assert counts.count() == (1, 1)


def test_refs_symlinked_directories_are_not_followed(repo: Repository, tmp_path: Path) -> None:
    """A symlink to a directory under refs is one ref, as iter_refs lists it; a loop
    does not hang the count."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(3):
        (outside / f"r{i}").symlink_to("x")
    (repo.refs_dir / "dir").symlink_to(outside)
    (repo.refs_dir / "loop").symlink_to(".")
    counts = RepositoryCounts(repo, clock=_later)
    assert counts.count() == _truth(repo) == (0, 2)


# -- describe_now ---------------------------------------------------------------------------


def _ctx() -> CallContext:
    return CallContext(peer=Peer(os.getpid(), 0, 0), method=f"{INTERFACE}.Describe")


@pytest.fixture
def iface(repo: Repository, tmp_path: Path) -> Iterator[RepositoryInterface]:
    # A mount table of its own that nothing else changes: the machine's changes
    # whenever any process mounts, which would make describe_now (rightly) step
    # aside at moments no test controls.
    mountinfo = tmp_path / "proc" / "self" / "mountinfo"
    mountinfo.parent.mkdir(parents=True)
    mountinfo.write_text("")
    tracker = MountTracker(tmp_path / "run", proc=str(tmp_path / "proc"))
    iface = RepositoryInterface(repo, tracker)
    iface.counts.clock = _later
    yield iface
    tracker.close()


def _now(iface: RepositoryInterface) -> dict[str, Any] | None:
    """describe_now's reply, decoded."""
    reply = iface.describe_now({}, _ctx())
    if reply is None:
        return None
    assert reply.endswith(b"\0")
    out = parse_reply(reply[:-1])
    assert out.ok
    return out.parameters


def test_describe_now_is_describe_or_nothing(repo: Repository, iface: RepositoryInterface) -> None:
    # Nothing kept yet: the worker's Describe first.
    assert iface.describe_now({}, _ctx()) is None
    _ref(repo, "app", _image(repo, 1))
    full = iface.Describe(_request=_ctx())
    assert (full["images"], full["refs"]) == (1, 1)
    assert _now(iface) == full
    # Unchanged: the same reply, not made again.
    assert iface.describe_now({}, _ctx()) is iface.describe_now({}, _ctx())
    _image(repo, 2)
    assert iface.describe_now({}, _ctx()) is None
    assert iface.Describe(_request=_ctx())["images"] == 2
    assert _now(iface) == {**full, "images": 2}


def test_describe_now_sees_the_repository_become_read_only(
    repo: Repository, iface: RepositoryInterface, tmp_path: Path
) -> None:
    iface.Describe(_request=_ctx())
    assert "readOnlyReason" not in (_now(iface) or {})
    view = tmp_path / "ro"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(repo.path), str(view)], check=True)
    try:
        ro = RepositoryInterface(Repository.open(view), iface.tracker)
        ro.counts.clock = _later
        ro.Describe(_request=_ctx())
        assert "readOnlyReason" not in (_now(ro) or {})
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        ro.Describe(_request=_ctx())
        assert "read-only" in (_now(ro) or {})["readOnlyReason"]
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_describe_now_waits_for_nobody(repo: Repository, iface: RepositoryInterface) -> None:
    iface.Describe(_request=_ctx())
    assert iface.describe_now({}, _ctx()) is not None
    # Another thread holds the mount table's watch: the loop does not wait for it.
    with iface.tracker._mounts_lock:
        assert iface.describe_now({}, _ctx()) is None
    assert iface.describe_now({}, _ctx()) is not None


def test_describe_now_leaves_many_mounts_to_a_worker(
    repo: Repository, iface: RepositoryInterface, monkeypatch: pytest.MonkeyPatch
) -> None:
    iface.Describe(_request=_ctx())
    generation, _ = iface.tracker.own_mounts_parsed()
    assert generation is not None
    many = (object(),) * (iface.inline_mounts + 1)
    monkeypatch.setattr(iface.tracker, "own_mounts_now", lambda: (generation, many))
    assert iface.describe_now({}, _ctx()) is None


def test_describe_now_after_the_mount_table_changed(repo: Repository, tmp_path: Path) -> None:
    def body() -> dict[str, object]:
        # The real mount table, in a namespace of this test's own: only its mount
        # changes it.
        tracker = MountTracker(tmp_path / "run")
        iface = RepositoryInterface(repo, tracker)
        iface.counts.clock = _later
        iface.Describe(_request=_ctx())
        seen = [iface.describe_now({}, _ctx()) is not None]
        where = tmp_path / "m"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "none", str(where)], check=True)
        # Changed: a worker parses the table again, and from then on the loop answers.
        seen.append(iface.describe_now({}, _ctx()) is None)
        seen.append(iface.describe_now({}, _ctx()) is None)
        iface.Describe(_request=_ctx())
        seen.append(iface.describe_now({}, _ctx()) is not None)
        tracker.close()
        return {"seen": seen}

    assert in_private_mount_namespace(body) == {"seen": [True, True, True, True]}


def test_describe_now_leaves_many_ref_directories_to_a_worker(
    repo: Repository, iface: RepositoryInterface
) -> None:
    digest = _image(repo, 1)
    for i in range(iface.inline_dirs):
        _ref(repo, f"d{i}/r", digest)
    iface.Describe(_request=_ctx())
    assert iface.counts.current() == (1, iface.inline_dirs)
    assert iface.describe_now({}, _ctx()) is None


def test_describe_now_not_on_a_network_filesystem(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def on(fstype: str) -> Any:
        return lambda path: MountEntry(1, 0, "/", "/", ("rw",), fstype, "srv:/x", ("rw",))

    for fstype, local in [("ext4", True), ("nfs4", False), ("fuse.sshfs", False), ("cifs", False)]:
        monkeypatch.setattr(methods, "mount_of", on(fstype))
        assert methods.on_local_filesystem(repo.path) is local, fstype
    monkeypatch.setattr(methods, "mount_of", lambda path: None)
    assert not methods.on_local_filesystem(repo.path)
    monkeypatch.setattr(methods, "mount_of", on("nfs"))
    iface = RepositoryInterface(repo, MountTracker(tmp_path / "run"))
    iface.counts.clock = _later
    iface.Describe(_request=_ctx())
    assert iface.counts.current() is not None
    assert iface.describe_now({}, _ctx()) is None
    iface.tracker.close()


def test_mount_of(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 0:40 / /mnt rw - tmpfs none rw\n"
        "3 2 0:41 / /mnt/a rw - nfs4 srv:/a rw\n"
        "4 2 0:42 / /mnt/a\\040b rw - xfs /dev/sdb rw\n"
        "5 3 0:43 / /mnt/a rw - overlay overlay rw\n"  # mounted over /mnt/a
        "garbage line\n"
    )

    def fstype(path: str) -> str | None:
        mount = mount_of(path, str(info))
        return None if mount is None else mount.fstype

    assert fstype("/") == "ext4"
    assert fstype("/etc/x") == "ext4"
    assert fstype("/mnt") == "tmpfs"
    assert fstype("/mntx") == "ext4"
    assert fstype("/mnt/ab/c") == "tmpfs"
    assert fstype("/mnt/a b/c") == "xfs"
    assert fstype("/mnt/a/c") == "overlay"
    assert mount_of("/", str(tmp_path / "none")) is None
