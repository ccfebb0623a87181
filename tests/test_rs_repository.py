"""org.composefs.Repository beyond cfsctl's transcript: who may open what (the
daemon's own repository for everyone admitted, other paths only with the daemon's
rights, handles per uid and bounded), hostile paths, creation next to what is
already there, old-format repositories, concurrent handles, and mounts of the
daemon's own repository (pinned: its GC keeps them) and of another (not)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import users
from composefsd.repository import Repository
from composefsd.service.context import CallCancelled, CallContext, Peer
from composefsd.service.methods import RepositoryInterface
from composefsd.service.mounts import MountTracker
from composefsd.service.rshandles import MAX_HANDLES_PER_UID, HandleTable
from composefsd.service.rsrepository import RsRepositoryInterface
from conftest import TestUsers
from rsgolden import unpack_repo
from rsreplay import Client, received_fd_inspection
from servicehelpers import Daemon, running_daemon

R = "org.composefs.Repository"
DENIED = {"error": "org.varlink.service.PermissionDenied"}
T1_ENTRIES = ["empty-dir", "files", "links", "private", "usr"]


def _denied(reply: dict[str, Any]) -> bool:
    return reply.get("error") == DENIED["error"]


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    """A public composefsd whose own repository is a copy of cfsctl's repo-sha256,
    and another copy (a foreign repository)."""
    root = tmp_path_factory.mktemp("rs-repo")
    own = unpack_repo("sha256", root / "own")
    foreign = unpack_repo("sha256", root / "foreign")
    with running_daemon(own, public=True) as daemon:
        yield daemon, foreign


def call(address: str, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One call as root; the reply (its fds closed)."""
    client = Client(address)
    try:
        doc: dict[str, Any] = {"method": f"{R}.{method}"}
        if params is not None:
            doc["parameters"] = params
        result = client.call(json.dumps(doc).encode())
    finally:
        client.close()
    for fd in result.fds:
        os.close(fd)
    assert result.closed is None and len(result.replies) == 1, result
    return result.replies[0]


def params(reply: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in reply, reply
    out: dict[str, Any] = reply.get("parameters", {})
    return out


#: Runs as a test user: every call of argv[2] (a JSON list of [method, parameters],
#: where parameters may say {"handle": "$0"} for the handle the first reply gave)
#: on one connection; prints the replies as a JSON list.
_USER_CALLS = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
buf = b""
out = []
for method, params in json.loads(sys.argv[2]):
    if params.get("handle") == "$0":
        params["handle"] = out[0]["parameters"]["handle"]
    s.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
    while b"\0" not in buf:
        data = s.recv(65536)
        if not data:
            raise SystemExit("connection closed")
        buf += data
    msg, buf = buf.split(b"\0", 1)
    out.append(json.loads(msg))
print(json.dumps(out))
"""


def user_calls(
    user: users.TestUser,
    py: users.UserPython,
    address: str,
    calls: list[tuple[str, dict[str, Any]]],
) -> list[dict[str, Any]]:
    out = users.run_as(
        user,
        py.command("-c", _USER_CALLS, address, json.dumps([[f"{R}.{m}", p] for m, p in calls])),
        env=py.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    replies: list[dict[str, Any]] = json.loads(out.stdout)
    return replies


# -- policy --------------------------------------------------------------------------------


def test_non_root_peer_policy(
    golden: tuple[Daemon, Path], test_users: TestUsers, user_python: users.UserPython
) -> None:
    daemon, foreign = golden
    own = daemon.repo
    root_handle = params(call(daemon.address, "OpenRepository", {"path": str(foreign)}))["handle"]
    links = users.public_dir("cfsd-rslinks-")
    try:
        (links / "to-own").symlink_to(own)
        (links / "to-foreign").symlink_to(foreign)
        replies = user_calls(
            test_users.bob,
            user_python,
            daemon.address,
            [
                ("OpenRepository", {"path": str(own)}),
                ("ListImageRefs", {"handle": "$0"}),
                ("ImageObjects", {"handle": "$0", "name": "t1-basic"}),
                ("Fsck", {"handle": "$0", "metadata_only": True}),
                ("OpenRepository", {"path": str(foreign)}),
                ("OpenRepository", {"system": True}),
                ("OpenRepository", {"user": True}),
                ("OpenRepository", {"path": str(links / "to-own")}),
                ("OpenRepository", {"path": f"{own}/../{own.name}"}),
                ("OpenRepository", {"path": str(links / "to-foreign")}),
                ("OpenRepository", {"path": f"{own}/../../foreign/{foreign.name}"}),
                ("OpenRepository", {"path": "/nonexistent"}),
                ("ListImageRefs", {"handle": root_handle}),
                ("CloseRepository", {"handle": root_handle}),
                ("InitRepository", {"path": str(links / "new"), "insecure": True}),
                ("Gc", {"handle": "$0", "dry_run": True, "roots": []}),
                ("Mount", {"handle": "$0", "name": "t1-basic", "options": {}}),
            ],
        )
    finally:
        users.remove_tree(links)
    opened = params(replies[0])
    assert opened["hash_algorithm"] == "sha256"
    assert {i["name"] for i in params(replies[1])["images"]} >= {"t1-basic", "nested/t3-xattrs"}
    assert params(replies[2])["object_ids"]
    assert params(replies[3])["ok"] is True
    # Paths that are not the daemon's repository, however named: refused before
    # anything is looked at (a missing path included, so nothing is probed).
    assert all(_denied(r) for r in replies[4:7]), replies[4:7]
    assert "handle" in params(replies[7]) and "handle" in params(replies[8])
    assert all(_denied(r) for r in replies[9:12]), replies[9:12]
    # Root's handle does not exist for bob.
    invalid = {"error": f"{R}.InvalidHandle", "parameters": {"handle": root_handle}}
    assert replies[12] == invalid and replies[13] == invalid
    # Writing methods need a privileged peer.
    assert all(_denied(r) for r in replies[14:]), replies[14:]
    # And bob's handle does not exist for root.
    assert call(daemon.address, "ListImageRefs", {"handle": opened["handle"]}) == {
        "error": f"{R}.InvalidHandle",
        "parameters": {"handle": opened["handle"]},
    }
    assert params(call(daemon.address, "ListImageRefs", {"handle": root_handle}))["images"]


def test_handle_limit_per_uid(
    golden: tuple[Daemon, Path], test_users: TestUsers, user_python: users.UserPython
) -> None:
    daemon, _ = golden
    path = str(daemon.repo)
    replies = user_calls(
        test_users.alice,
        user_python,
        daemon.address,
        [("OpenRepository", {"path": path})] * (MAX_HANDLES_PER_UID + 1)
        + [("CloseRepository", {"handle": "$0"}), ("OpenRepository", {"path": path})],
    )
    handles = [params(r)["handle"] for r in replies[:MAX_HANDLES_PER_UID]]
    assert len(set(handles)) == MAX_HANDLES_PER_UID
    over = replies[MAX_HANDLES_PER_UID]
    assert over["error"] == f"{R}.InternalError"
    assert f"holds {MAX_HANDLES_PER_UID} open repository handles" in over["parameters"]["message"]
    # Closing one makes room for one; other uids are not limited by alice's.
    assert "error" not in replies[-2]
    assert params(replies[-1])["handle"] not in handles
    assert "handle" in params(call(daemon.address, "OpenRepository", {"path": path}))


# -- hostile paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["relative/repo", "", "/tmp/a\0b", "/" + "a" * 5000],
    ids=["relative", "empty", "nul", "long"],
)
def test_bad_paths_are_invalid_parameters(golden: tuple[Daemon, Path], path: str) -> None:
    daemon, _ = golden
    for method, extra in (("OpenRepository", {}), ("InitRepository", {"insecure": True})):
        reply = call(daemon.address, method, {"path": path, **extra})
        assert reply == {
            "error": "org.varlink.service.InvalidParameter",
            "parameters": {"parameter": "path"},
        }
    assert not Path("relative").exists()


def test_root_paths_through_links_and_dots(golden: tuple[Daemon, Path], tmp_path: Path) -> None:
    daemon, foreign = golden
    (tmp_path / "link").symlink_to(foreign)
    for path in (tmp_path / "link", f"{foreign}/../{foreign.name}"):
        assert params(call(daemon.address, "OpenRepository", {"path": str(path)}))[
            "hash_algorithm"
        ] == ("sha256")
    for path, shown in (
        (tmp_path / "missing", "No such file or directory (os error 2)"),
        (tmp_path / "link" / "meta.json", "Not a directory (os error 20)"),
    ):
        reply = call(daemon.address, "OpenRepository", {"path": str(path)})
        assert reply == {
            "error": f"{R}.RepoNotFound",
            "parameters": {"message": f"opening repository {path}: {shown}"},
        }
    # A directory that is not a repository: not found either, and left alone.
    (tmp_path / "plain").mkdir()
    reply = call(daemon.address, "OpenRepository", {"path": str(tmp_path / "plain")})
    assert reply["error"] == f"{R}.RepoNotFound"
    assert list((tmp_path / "plain").iterdir()) == []


def test_init_on_a_directory_that_is_not_a_repository(
    golden: tuple[Daemon, Path], tmp_path: Path
) -> None:
    daemon, _ = golden
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious").write_text("keep me")
    for method in ("InitRepository", "EnsureRepository"):
        reply = call(daemon.address, method, {"path": str(target), "insecure": True})
        assert reply["error"] == f"{R}.InternalError", reply
        assert "not empty and not a composefs repository" in reply["parameters"]["message"]
    assert sorted(p.name for p in target.iterdir()) == ["precious"]
    assert (target / "precious").read_text() == "keep me"
    # An empty one is fine; the parents are made.
    new = tmp_path / "a" / "b" / "repo"
    reply = call(
        daemon.address,
        "InitRepository",
        {"path": str(new), "algorithm": "fsverity-sha256-12", "insecure": True},
    )
    assert params(reply) == {"created": True}
    assert Repository.open(new).algorithm == "fsverity-sha256-12"
    reply = call(daemon.address, "InitRepository", {"path": str(new), "algorithm": "sha1"})
    assert reply["error"] == f"{R}.InvalidSpec"
    assert reply["parameters"]["message"].startswith("invalid algorithm: ")


def test_ensure_upgrades_an_old_format_repository(
    golden: tuple[Daemon, Path], tmp_path: Path
) -> None:
    daemon, _ = golden
    old = unpack_repo("sha256", tmp_path)
    meta = (old / "meta.json").read_bytes()
    (old / "meta.json").unlink()
    before = sorted(str(p.relative_to(old)) for p in old.rglob("*"))
    # The default algorithm (sha512) is not the objects': refused, nothing written.
    reply = call(daemon.address, "EnsureRepository", {"path": str(old)})
    assert reply["error"] == f"{R}.InternalError"
    assert "inferred algorithm fsverity-sha256-12" in reply["parameters"]["message"]
    assert not (old / "meta.json").exists()
    ensure = {"path": str(old), "algorithm": "fsverity-sha256-12"}
    assert params(call(daemon.address, "EnsureRepository", ensure)) == {"status": "Upgraded"}
    # cfsctl's meta.json for such a repository, and nothing else changed.
    assert (old / "meta.json").read_bytes() == meta
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == sorted([*before, "meta.json"])
    assert params(call(daemon.address, "EnsureRepository", ensure)) == {"status": "Opened"}
    handle = params(call(daemon.address, "OpenRepository", {"path": str(old)}))["handle"]
    assert params(call(daemon.address, "Fsck", {"handle": handle}))["ok"] is True
    # OpenRepository upgrades too, as cfsctl's does.
    (old / "meta.json").unlink()
    assert params(call(daemon.address, "OpenRepository", {"path": str(old)}))["hash_algorithm"] == (
        "sha256"
    )
    assert (old / "meta.json").read_bytes() == meta


# -- handles ---------------------------------------------------------------------------------


def test_concurrent_open_and_close(golden: tuple[Daemon, Path]) -> None:
    daemon, foreign = golden
    seen: list[int] = []
    errors: list[Any] = []
    lock = threading.Lock()

    def worker(path: str) -> None:
        client = Client(daemon.address)
        try:
            for _ in range(15):
                req = {"method": f"{R}.OpenRepository", "parameters": {"path": path}}
                (opened,) = client.call(json.dumps(req).encode()).replies
                handle = opened["parameters"]["handle"]
                with lock:
                    seen.append(handle)
                req = {"method": f"{R}.CloseRepository", "parameters": {"handle": handle}}
                (closed,) = client.call(json.dumps(req).encode()).replies
                if "error" in closed:
                    errors.append(closed)
        except Exception as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [
        threading.Thread(target=worker, args=(str(p),))
        for p in (daemon.repo, foreign, daemon.repo, foreign)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(seen) == len(set(seen)) == 60
    for handle in seen:
        assert call(daemon.address, "CloseRepository", {"handle": handle})["error"] == (
            f"{R}.InvalidHandle"
        )


# -- fsck ------------------------------------------------------------------------------------


def test_fsck_counts_damage(golden: tuple[Daemon, Path], tmp_path: Path) -> None:
    daemon, _ = golden
    repo = unpack_repo("sha256", tmp_path)
    handle = params(call(daemon.address, "OpenRepository", {"path": str(repo)}))["handle"]
    clean = params(call(daemon.address, "Fsck", {"handle": handle}))
    # An image (one no ref names) whose object is gone: its link is broken.
    refs = {
        os.readlink(p).rsplit("/", 1)[-1]
        for p in (repo / "images" / "refs").rglob("*")
        if p.is_symlink()
    }
    image = sorted(p for p in (repo / "images").iterdir() if p.name not in refs | {"refs"})[0]
    gone = (image.parent / os.readlink(image)).resolve()
    gone.unlink()
    # And another object with other contents than its name says.
    victim = next(p for p in sorted((repo / "objects").glob("*/*")) if p != gone)
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes() + b"x")
    report = params(call(daemon.address, "Fsck", {"handle": handle}))
    assert report["ok"] is False
    assert report["objects_corrupted"] == 1
    assert report["images_corrupted"] == 1
    assert report["broken_links"] == 1
    assert report["objects_checked"] == clean["objects_checked"] - 1
    assert any(e.startswith("fsck: object-digest-mismatch: ") for e in report["errors"])
    metadata = params(call(daemon.address, "Fsck", {"handle": handle, "metadata_only": True}))
    assert metadata["objects_checked"] == 0 and metadata["objects_corrupted"] == 0
    assert metadata["images_corrupted"] == 1


# -- mounts ----------------------------------------------------------------------------------


def _mount(address: str, handle: int, name: str) -> int:
    client = Client(address)
    try:
        req = {
            "method": f"{R}.Mount",
            "parameters": {"handle": handle, "name": name, "options": {}},
        }
        result = client.call(json.dumps(req).encode())
    finally:
        client.close()
    assert result.replies == [{"parameters": {"fd_index": 0}}], result.replies
    (fd,) = result.fds
    return fd


def test_mount_own_and_foreign_and_gc_keeps_the_own_mounted_image(
    golden: tuple[Daemon, Path], tmp_path: Path
) -> None:
    daemon, _ = golden
    own = daemon.repo
    foreign = unpack_repo("sha256", tmp_path)
    digest = os.readlink(own / "images" / "refs" / "t1-basic").rsplit("/", 1)[-1]
    handles = {
        repo: params(call(daemon.address, "OpenRepository", {"path": str(repo)}))["handle"]
        for repo in (own, foreign)
    }
    fds = {repo: _mount(daemon.address, handles[repo], "t1-basic") for repo in (own, foreign)}
    try:
        for fd in fds.values():
            assert received_fd_inspection(fd) == {"readlink": "/", "top_level_entries": T1_ENTRIES}
        # Make the image garbage in both (as `rm` of its ref would), then collect.
        for repo in (own, foreign):
            (repo / "images" / "refs" / "t1-basic").unlink()
            gc = params(
                call(daemon.address, "Gc", {"handle": handles[repo], "dry_run": False, "roots": []})
            )
            assert gc["dry_run"] is False
        # The daemon's own repository keeps what its detached mount pins; the other
        # one (no pins) lets the image go.
        assert os.path.lexists(own / "images" / digest)
        assert not os.path.lexists(foreign / "images" / digest)
        assert sorted(os.listdir(f"/proc/self/fd/{fds[own]}")) == T1_ENTRIES
        assert params(call(daemon.address, "Fsck", {"handle": handles[own]}))["ok"] is True
    finally:
        for fd in fds.values():
            os.close(fd)
        shutil.rmtree(foreign, ignore_errors=True)


def test_mount_errors(golden: tuple[Daemon, Path]) -> None:
    daemon, _ = golden
    handle = params(call(daemon.address, "OpenRepository", {"path": str(daemon.repo)}))["handle"]
    reply = call(daemon.address, "Mount", {"handle": handle, "name": "../../etc", "options": {}})
    assert reply["error"] == f"{R}.InternalError"
    # overlay wants two fds; none came.
    reply = call(
        daemon.address,
        "Mount",
        {"handle": handle, "name": "t1-basic", "options": {"overlay": True}},
    )
    assert reply == {
        "error": f"{R}.InvalidSpec",
        "parameters": {"message": "Mount expects 2 fds for the requested options, got 0"},
    }


# -- cancellation ----------------------------------------------------------------------------


def test_fsck_and_gc_stop_when_the_client_has_gone(tmp_path: Path) -> None:
    """Neither streams progress, but both look at the call's cancellation at each
    progress point (the transport sets it when the client goes away)."""
    own = Repository.open(unpack_repo("sha256", tmp_path / "own"))
    foreign = unpack_repo("sha256", tmp_path / "foreign")
    tracker = MountTracker(tmp_path / "state")
    rs = RsRepositoryInterface(RepositoryInterface(own, tracker), HandleTable(own))
    ctx = CallContext(Peer(os.getpid(), 0, 0), f"{R}.Fsck")
    handles = [
        rs.OpenRepository(str(path), None, None, _request=ctx)["handle"]
        for path in (own.path, foreign)
    ]
    ctx.cancelled.set()
    for handle in handles:
        with pytest.raises(CallCancelled):
            rs.Fsck(handle, None, _request=ctx)
        with pytest.raises(CallCancelled):
            rs.Gc(handle, False, [], _request=ctx)
    # Nothing was collected.
    assert Repository.open(foreign).gc(dry_run=True).objects_removed == 12


def test_own_repository_path_is_looked_at_once(tmp_path: Path) -> None:
    """A caller without the daemon's rights names the daemon's repository through
    a link it controls and re-points the link right after the check: the call
    still works on the daemon's repository, never on the new target."""
    own = Repository.open(unpack_repo("sha256", tmp_path / "own"))
    rs = RsRepositoryInterface(
        RepositoryInterface(own, MountTracker(tmp_path / "state")), HandleTable(own)
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(own.path)
    checked = rs.handles.is_own

    def swapping(path: str | os.PathLike[str]) -> bool:
        answer = checked(path)
        if Path(path) == link:
            link.unlink()
            link.symlink_to(elsewhere)
        return answer

    rs.handles.is_own = swapping  # type: ignore[method-assign]
    ctx = CallContext(Peer(os.getpid(), 4321, 4321), f"{R}.InitRepository")
    algorithm = "fsverity-sha256-12"
    assert rs.InitRepository(str(link), algorithm, True, _request=ctx) == {"created": False}
    link.unlink()
    link.symlink_to(own.path)
    assert rs.EnsureRepository(str(link), algorithm, True, _request=ctx) == {"status": "Opened"}
    link.unlink()
    link.symlink_to(own.path)
    opened = rs.OpenRepository(str(link), None, None, _request=ctx)
    assert rs.handles.get(opened["handle"], 4321).repo is own
    assert list(elsewhere.iterdir()) == []
