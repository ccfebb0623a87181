"""composefsctl in client mode: every command through a running composefsd, human
and --json output (compared with direct mode on the same repository), progress,
exit codes, error lines naming the Varlink error, and the choice between the
daemon and direct access."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from composefsd.cli import composefsctl
from composefsd.cli.composefsctl import EXIT_UNREACHABLE, main
from composefsd.cli.composefsctl.output import ProgressPrinter
from composefsd.cli.composefsctl.remote import call_error_text
from composefsd.kernel.mountinfo import composefs_mount_at
from composefsd.repository import Progress
from composefsd.service.client import Reply, VarlinkCallError
from conftest import TestUsers
from ctlrun import FORGED_REF, check_escaped, plant_refs, run_ctl
from servicehelpers import CTL, Daemon, exec_wrapper, short_dir, start_daemon


@pytest.fixture(autouse=True)
def _no_ambient_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests choose the daemon explicitly: no default socket, no environment."""
    monkeypatch.delenv("COMPOSEFSD_SOCKET", raising=False)
    monkeypatch.delenv("COMPOSEFSD_REPOSITORY", raising=False)
    monkeypatch.setattr(composefsctl, "default_address", lambda: str(tmp_path / "no-daemon"))


def _create(capsys: pytest.CaptureFixture[str], d: Daemon, tree: Path, *extra: str) -> str:
    status, out, err = run_ctl(capsys, "--connect", d.address, "create-image", str(tree), *extra)
    assert (status, err) == (0, ""), err
    return out.strip()


# -- status ---------------------------------------------------------------------------------------


def test_status(capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path) -> None:
    _create(capsys, daemon, tree, "--ref", "status/v1")
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "status", "--json")
    assert (status, err) == (0, "")
    doc = json.loads(out)
    assert doc["path"] == str(daemon.repo)
    assert doc["algorithm"] == "sha256" and doc["verity"] == "try"
    assert doc["images"] >= 1 and doc["refs"] >= 1 and doc["mounts"] == 0
    # Direct mode on the same repository gives the same document.
    status, direct_out, _ = run_ctl(capsys, "--repo", str(daemon.repo), "status", "--json")
    assert status == 0
    assert json.loads(direct_out) == doc

    status, out, _ = run_ctl(capsys, "status", "--connect", daemon.address)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"repository:  {daemon.repo}"
    assert lines[1:3] == ["algorithm:   sha256", "fs-verity:   try"]
    assert lines[-1] == f"service:     composefsd {doc['version']} at {daemon.address}"
    status, direct_out, _ = run_ctl(capsys, "--repo", str(daemon.repo), "status")
    assert direct_out.splitlines()[:-1] == lines[:-1]
    assert direct_out.splitlines()[-1] == "service:     none (working on the repository directly)"


# -- create-image ---------------------------------------------------------------------------------


def test_create_image_same_as_direct(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path, tmp_path: Path
) -> None:
    status, out, err = run_ctl(
        capsys, "--connect", daemon.address, "create-image", str(tree), "--ref", "c/v1", "--json"
    )
    assert (status, err) == (0, "")
    doc = json.loads(out)
    # The same image, built directly in another repository.
    other = tmp_path / "other"
    assert run_ctl(capsys, "--repo", str(other), "init")[0] == 0
    status, out, _ = run_ctl(
        capsys, "--repo", str(other), "create-image", str(tree), "--ref", "c/v1", "--json"
    )
    direct = json.loads(out)
    # Direct mode's keys, in its order, less those the service does not report.
    assert list(doc) == [k for k in direct if k in doc]
    assert {"bytes_total", "image_written"}.isdisjoint(doc)
    for key in ("digest", "ref", "files", "verity_enabled"):
        assert doc[key] == direct[key], key
    # (the daemon's repository may have had some objects already)
    assert doc["objects_written"] + doc["objects_reused"] == direct["objects_written"]
    # Human output: the digest; -v adds a summary on stderr.
    status, out, err = run_ctl(
        capsys, "--connect", daemon.address, "create-image", str(tree), "-v", "--by-path"
    )
    assert status == 0
    assert out == f"{doc['digest']}\n"
    assert err.startswith(f"{doc['files']} files, 0 objects written (0 B), ")
    assert err.endswith(", fs-verity: no\n")


@pytest.mark.parametrize(
    "options",
    [
        ["--use-epoch"],
        ["--skip-xattrs"],
        ["--user-xattrs"],
        ["--skip-devices"],
        ["--max-version", "0"],
    ],
)
def test_create_image_options(
    capsys: pytest.CaptureFixture[str],
    daemon: Daemon,
    tree: Path,
    tmp_path: Path,
    options: list[str],
) -> None:
    digest = _create(capsys, daemon, tree, *options)
    other = tmp_path / "other"
    run_ctl(capsys, "--repo", str(other), "init")
    status, out, _ = run_ctl(capsys, "--repo", str(other), "create-image", str(tree), *options)
    assert (status, out.strip()) == (0, digest)


def test_create_image_progress(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path
) -> None:
    status, out, err = run_ctl(
        capsys, "--connect", daemon.address, "create-image", str(tree), "--progress"
    )
    assert status == 0 and len(out.strip()) == 64
    phases = [line.split(":")[0] for line in err.splitlines()]
    assert "scan" in phases and "import" in phases, err
    # Without --progress and without a terminal: nothing on stderr.
    status, _, err = run_ctl(capsys, "--connect", daemon.address, "create-image", str(tree))
    assert (status, err) == (0, "")


def test_progress_bar_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    printer = ProgressPrinter(stream)
    printer(Progress("import", 50, 200))
    printer(Progress("import", 200, 200))
    printer(Progress("sync", 3))
    printer.finish()
    text = stream.getvalue()
    bar25 = "#" * 7 + "." * 23
    assert f"\rimport [{bar25}]  25% 50/200" in text
    assert f"\rimport [{'#' * 30}] 100% 200/200" in text
    # A shorter line blanks out the rest of the longer one; finish() clears the line.
    assert f"\rsync: 3{' ' * (52 - 7)}\r       \r" in text
    assert text.endswith("\r       \r")
    printer.reply(Reply({"progress": {"phase": "mark", "done": 1, "total": 2}}))
    assert "mark [" in stream.getvalue()


def test_create_image_errors(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path, tmp_path: Path
) -> None:
    status, _, err = run_ctl(
        capsys, "--connect", daemon.address, "create-image", str(tmp_path / "none")
    )
    assert status == 1
    assert err == f"composefsctl: error: source {tmp_path}/none: No such file or directory\n"
    status, _, err = run_ctl(
        capsys, "--connect", daemon.address, "create-image", "--by-path", str(tmp_path / "none")
    )
    assert status == 1
    assert err.startswith("composefsctl: error: io.composefs.Repository.SourceError: ")
    status, _, err = run_ctl(
        capsys, "--connect", daemon.address, "create-image", str(tree), "--ref", "bad//ref"
    )
    assert status == 1
    assert err.startswith("composefsctl: error: io.composefs.Repository.InvalidName: ")
    status, _, err = run_ctl(
        capsys,
        "--connect",
        daemon.address,
        "create-image",
        str(tree),
        "--skip-xattrs",
        "--user-xattrs",
    )
    assert status == 2 and "--skip-xattrs and --user-xattrs exclude each other" in err
    for extra, flag in (
        (["--threads", "2"], "--threads"),
        (["--preserve-hardlinks"], "--preserve-hardlinks"),
    ):
        status, _, err = run_ctl(
            capsys, "--connect", daemon.address, "create-image", str(tree), *extra
        )
        assert status == 2
        assert f"create-image {flag} has no daemon equivalent; use --direct" in err


# -- images, verify ------------------------------------------------------------------------------


def test_images_same_as_direct(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path
) -> None:
    _create(capsys, daemon, tree, "--ref", "img/v1")
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "images")
    assert (status, err) == (0, "")
    status, direct, _ = run_ctl(capsys, "--repo", str(daemon.repo), "images")
    assert out == direct and "img/v1" in out
    status, out, _ = run_ctl(capsys, "--connect", daemon.address, "images", "--json")
    status, direct, _ = run_ctl(capsys, "--repo", str(daemon.repo), "images", "--json")
    mine, theirs = json.loads(out), json.loads(direct)
    assert [list(e) for e in mine] == [list(e) for e in theirs]
    for a, b in zip(mine, theirs, strict=True):
        assert a["created"] == pytest.approx(b["created"], abs=1e-5)
        assert {**a, "created": 0} == {**b, "created": 0}


def test_untrusted_names_are_printed_escaped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tree: Path
) -> None:
    d = start_daemon(tmp_path / "repo")
    try:
        digest = _create(capsys, d, tree, "--ref", "good")
        status, out, err = run_ctl(
            capsys, "--connect", d.address, "create-image", str(tree), "--ref", FORGED_REF
        )
        assert (status, out) == (1, "")
        assert err.count("\n") == 1 and err.rstrip("\n").isprintable()
        assert "io.composefs.Repository.InvalidName" in err and "control characters" in err
        plant_refs(d.repo, digest)
        status, out, _ = run_ctl(capsys, "--connect", d.address, "images")
        assert status == 0 and out.count("\n") == 1, out
        check_escaped(out)
        status, out, _ = run_ctl(capsys, "--connect", d.address, "remove-image", "good", "-v")
        assert status == 0 and out.count("\n") == 1
        check_escaped(out)
    finally:
        assert d.stop() == 0, d.log_text()


def test_verify(capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path) -> None:
    digest = _create(capsys, daemon, tree, "--ref", "ver/v1")
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "verify", "ver/v1")
    assert (status, err) == (0, "")
    assert out.startswith(f"{digest}: ok (") and "measured by fs-verity)" in out
    status, out, _ = run_ctl(capsys, "--connect", daemon.address, "verify", "ver/v1", "--json")
    (doc,) = json.loads(out)
    _, direct, _ = run_ctl(capsys, "--repo", str(daemon.repo), "verify", "ver/v1", "--json")
    (ddoc,) = json.loads(direct)
    assert list(doc) == [k for k in ddoc if k not in ("bytes_checked", "verity_required")]
    assert doc == {k: ddoc[k] for k in doc}
    # --all: one result per image, the same as direct mode's.
    status, out, _ = run_ctl(capsys, "--connect", daemon.address, "verify", "--all", "--json")
    _, direct, _ = run_ctl(capsys, "--repo", str(daemon.repo), "verify", "--all", "--json")
    assert status == 0
    assert sorted(d["digest"] for d in json.loads(out)) == sorted(
        d["digest"] for d in json.loads(direct)
    )
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "verify", "--all", "--progress")
    assert status == 0 and out.count(": ok (") == len(json.loads(direct))
    assert "objects: " in err


def test_verify_finds_damage(
    capsys: pytest.CaptureFixture[str], tree: Path, tmp_path: Path
) -> None:
    d = start_daemon(tmp_path / "repo")
    try:
        digest = _create(capsys, d, tree, "--ref", "dmg/v1")
        objects = sorted(
            p for p in (d.repo / "objects").rglob("*") if p.is_file() and p.stat().st_size > 1000
        )
        image_object = d.repo / "objects" / digest[:2] / digest[2:]
        victims = [p for p in objects if p != image_object]
        victims[0].unlink()
        corrupt = victims[1]
        corrupt.chmod(0o644)
        with open(corrupt, "r+b") as f:
            f.write(b"X")
        status, out, err = run_ctl(capsys, "--connect", d.address, "verify", "dmg/v1")
        assert (status, err) == (1, "")
        missing = victims[0].parent.name + victims[0].name
        bad = corrupt.parent.name + corrupt.name
        _, direct, _ = run_ctl(capsys, "--repo", str(d.repo), "verify", "dmg/v1")
        lines = out.splitlines()
        assert lines[0] == f"{digest}: FAILED"
        assert f"  missing object: {missing}" in lines
        assert any(line.startswith(f"  corrupt object: {bad}: ") for line in lines)
        assert out == direct  # the same report as direct mode's
        status, out, _ = run_ctl(capsys, "--connect", d.address, "verify", "--all", "--json")
        assert status == 1
        (doc,) = json.loads(out)
        assert doc["ok"] is False and doc["missing"] == [missing]
        assert doc["corrupt"][0]["digest"] == bad
    finally:
        assert d.stop() == 0


def test_verify_usage_and_unknown(capsys: pytest.CaptureFixture[str], daemon: Daemon) -> None:
    status, _, err = run_ctl(capsys, "--connect", daemon.address, "verify")
    assert status == 2 and "give the IMAGE(s) to verify, or --all" in err
    status, _, err = run_ctl(capsys, "--connect", daemon.address, "verify", "x", "--all")
    assert status == 2
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "verify", "no/such")
    assert (status, out) == (1, "")
    assert err == (
        "composefsctl: error: io.composefs.Repository.NoSuchImage: no image or ref 'no/such'\n"
    )


def test_verify_all_of_an_empty_repository(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = start_daemon(tmp_path / "repo")
    try:
        assert run_ctl(capsys, "--connect", d.address, "verify", "--all") == (0, "", "")
        assert run_ctl(capsys, "--connect", d.address, "verify", "--all", "--json") == (
            0,
            "[]\n",
            "",
        )
    finally:
        assert d.stop() == 0


# -- mount, mounts, unmount, remove-image, gc -----------------------------------------------------


def test_mount_through_the_daemon(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path, mnt: Path
) -> None:
    digest = _create(capsys, daemon, tree, "--ref", "m/v1")
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "mount", "m/v1", str(mnt), "-v")
    assert (status, err) == (0, "")
    assert out.startswith(f"mounted composefs:{digest} at {mnt}: image digest checked ")
    assert (mnt / "hello").read_text() == "hello from composefs\n"
    assert (mnt / "d0" / "f0").read_bytes() == (tree / "d0" / "f0").read_bytes()
    # mounts: the same listing as direct mode's, human and JSON.
    status, out, _ = run_ctl(capsys, "--connect", daemon.address, "mounts")
    _, direct, _ = run_ctl(capsys, "--repo", str(daemon.repo), "mounts")
    assert status == 0 and out == direct
    assert out == f"{mnt}  {digest}  ro  verity=off\n"
    _, out, _ = run_ctl(capsys, "--connect", daemon.address, "mounts", "--json")
    _, direct, _ = run_ctl(capsys, "--repo", str(daemon.repo), "mounts", "--json")
    (doc,) = json.loads(out)
    (ddoc,) = json.loads(direct)
    assert doc == {k: ddoc[k] for k in doc}
    assert list(doc) == ["mountpoint", "source", "digest", "readOnly", "verity"]
    _, out, _ = run_ctl(capsys, "--connect", daemon.address, "mounts", "--all", "--json")
    assert str(mnt) in [m["mountpoint"] for m in json.loads(out)]
    # Mounted: the image cannot go.
    status, _, err = run_ctl(capsys, "--connect", daemon.address, "remove-image", "m/v1")
    assert status == 1
    assert err.startswith(
        "composefsctl: error: io.composefs.Repository.ImageInUse: image 'm/v1' is in use: "
    )
    assert str(mnt) in err
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "unmount", str(mnt), "--json")
    assert (status, err) == (0, "")
    assert json.loads(out) == {"where": str(mnt), "digest": digest}
    assert composefs_mount_at(str(mnt)) is None
    status, _, err = run_ctl(capsys, "--connect", daemon.address, "unmount", str(mnt))
    assert status == 1
    assert (
        err
        == f"composefsctl: error: io.composefs.Repository.NotMounted: nothing composefs is mounted at {mnt}\n"
    )


def test_mount_json_same_keys_as_direct(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path, mnt: Path, tmp_path: Path
) -> None:
    digest = _create(capsys, daemon, tree, "--ref", "mj/v1")
    status, out, _ = run_ctl(
        capsys,
        "--connect",
        daemon.address,
        "mount",
        "mj/v1",
        str(mnt),
        "--json",
        "--verity",
        "disabled",
    )
    assert status == 0
    doc = json.loads(out)
    mnt2 = tmp_path / "direct"
    mnt2.mkdir()
    status, direct_out, _ = run_ctl(
        capsys,
        "--repo",
        str(daemon.repo),
        "mount",
        "mj/v1",
        str(mnt2),
        "--json",
        "--verity",
        "disabled",
    )
    assert status == 0
    try:
        direct = json.loads(direct_out)
        assert list(doc) == [k for k in direct if k not in ("layerMode", "backing", "notes")]
        assert doc == {**{k: direct[k] for k in doc}, "where": str(mnt)}
        assert doc["imageDigest"] == digest and doc["readOnly"] is True
    finally:
        assert run_ctl(capsys, "--repo", str(daemon.repo), "unmount", str(mnt2))[0] == 0
    assert run_ctl(capsys, "--connect", daemon.address, "unmount", str(mnt), "-v") == (
        0,
        f"unmounted composefs:{digest} from {mnt}\n",
        "",
    )


def test_mount_fd_attach(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path, mnt: Path
) -> None:
    """The daemon hands over a detached mount; composefsctl attaches it itself."""
    digest = _create(capsys, daemon, tree, "--ref", "fd/v1")
    status, out, err = run_ctl(
        capsys, "--connect", daemon.address, "mount", "fd/v1", str(mnt), "--fd-attach", "--json"
    )
    assert (status, err) == (0, "")
    doc = json.loads(out)
    assert doc["where"] == str(mnt) and doc["imageDigest"] == digest
    found = composefs_mount_at(str(mnt))
    assert found is not None and found.digest == digest
    assert (mnt / "hello").read_text() == "hello from composefs\n"
    # Attached by us, unmounted by the daemon (same mount namespace here).
    assert run_ctl(capsys, "--connect", daemon.address, "unmount", str(mnt))[0] == 0
    assert composefs_mount_at(str(mnt)) is None


def test_mount_writable_and_idmapped(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path, mnt: Path, tmp_path: Path
) -> None:
    _create(capsys, daemon, tree, "--ref", "rw/v1")
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    status, out, err = run_ctl(
        capsys,
        "--connect",
        daemon.address,
        "mount",
        "rw/v1",
        str(mnt),
        "--rw",
        "--upperdir",
        str(upper),
        "--workdir",
        str(work),
        "--json",
    )
    assert (status, err) == (0, ""), err
    assert json.loads(out)["readOnly"] is False
    (mnt / "new").write_text("written")
    assert (upper / "new").read_text() == "written"
    assert run_ctl(capsys, "--connect", daemon.address, "unmount", str(mnt))[0] == 0

    status, out, err = run_ctl(
        capsys,
        "--connect",
        daemon.address,
        "mount",
        "rw/v1",
        str(mnt),
        "--uid-map",
        "0:1000:65536",
        "--json",
    )
    assert (status, err) == (0, ""), err
    assert json.loads(out)["idmapped"] is True
    assert os.stat(mnt / "hello").st_uid == 1000
    assert run_ctl(capsys, "--connect", daemon.address, "unmount", str(mnt))[0] == 0


def test_mount_errors(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, tree: Path, mnt: Path, tmp_path: Path
) -> None:
    digest = _create(capsys, daemon, tree, "--ref", "me/v1")
    status, _, err = run_ctl(capsys, "--connect", daemon.address, "mount", "no/such", str(mnt))
    assert status == 1
    assert (
        err
        == "composefsctl: error: io.composefs.Repository.NoSuchImage: no image or ref 'no/such'\n"
    )
    wrong = "0" * 64
    status, _, err = run_ctl(
        capsys, "--connect", daemon.address, "mount", "me/v1", str(mnt), "--expected-digest", wrong
    )
    assert status == 1
    assert err.startswith("composefsctl: error: io.composefs.Repository.ImageVerityFailed: ")
    status, _, err = run_ctl(
        capsys, "--connect", daemon.address, "mount", "me/v1", str(mnt), "--upperdir", str(tmp_path)
    )
    assert status == 2 and "--upperdir and --workdir go together" in err
    status, _, err = run_ctl(
        capsys, "--connect", daemon.address, "mount", "me/v1", str(mnt), "--uid-map", "nonsense"
    )
    assert status == 2 and "is not INSIDE:OUTSIDE:COUNT" in err
    status, _, err = run_ctl(
        capsys,
        "--connect",
        daemon.address,
        "mount",
        "me/v1",
        str(mnt),
        "--idmap-userns",
        str(tmp_path / "x"),
    )
    assert status == 1 and "cannot open user namespace" in err
    status, _, err = run_ctl(
        capsys, "--connect", daemon.address, "mount", digest, str(tmp_path / "none")
    )
    assert status == 1
    assert err.startswith("composefsctl: error: io.composefs.Repository.")
    assert composefs_mount_at(str(mnt)) is None


def test_remove_image_and_gc(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tree: Path
) -> None:
    d = start_daemon(tmp_path / "repo")
    try:
        digest = _create(capsys, d, tree, "--ref", "gc/v1")
        status, out, err = run_ctl(capsys, "--connect", d.address, "gc", "--dry-run", "--json")
        assert (status, err) == (0, "")
        assert json.loads(out) == {
            "objects_removed": 0,
            "bytes_removed": 0,
            "images_removed": 0,
            "links_removed": 0,
            "streams_pruned": 0,
            "dry_run": True,
        }
        status, out, _ = run_ctl(capsys, "--connect", d.address, "remove-image", "gc/v1", "--json")
        assert status == 0
        assert json.loads(out) == {"image": "gc/v1", "removed_refs": ["gc/v1"]}
        status, out, _ = run_ctl(capsys, "--connect", d.address, "remove-image", "gc/v1")
        assert status == 1
        status, out, err = run_ctl(capsys, "--connect", d.address, "gc", "--dry-run")
        assert status == 0
        assert out.startswith("gc: would remove ")
        status, out, err = run_ctl(capsys, "--connect", d.address, "gc", "--progress")
        assert status == 0
        assert out.startswith("gc: removed ") and not out.startswith("gc: removed 0 objects")
        assert "sweep" in err
        assert not (d.repo / "objects" / digest[:2] / digest[2:]).exists()
        status, _, err = run_ctl(capsys, "--connect", d.address, "gc", "--pin", digest)
        assert status == 2 and "gc --pin has no daemon equivalent" in err
        digest2 = _create(capsys, d, tree)
        status, out, _ = run_ctl(capsys, "--connect", d.address, "remove-image", digest2, "-v")
        assert (status, out) == (0, f"removed image {digest2} (refs: -)\n")
    finally:
        assert d.stop() == 0


# -- choosing the daemon or direct access ---------------------------------------------------------


def test_unreachable_daemon_exit_3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = tmp_path / "nothing"
    status, out, err = run_ctl(capsys, "--connect", str(sock), "images")
    assert (status, out) == (EXIT_UNREACHABLE, "")
    assert err == f"composefsctl: error: cannot connect to {sock}: No such file or directory\n"
    monkeypatch.setenv("COMPOSEFSD_SOCKET", f"unix:{sock}")
    status, _, err = run_ctl(capsys, "images")
    assert status == EXIT_UNREACHABLE
    assert err == f"composefsctl: error: cannot connect to unix:{sock}: No such file or directory\n"
    # --repo beats the environment: direct mode.
    repo = tmp_path / "repo"
    assert run_ctl(capsys, "--repo", str(repo), "init")[0] == 0
    assert run_ctl(capsys, "--repo", str(repo), "images") == (0, "", "")


def test_daemon_that_does_not_answer(capsys: pytest.CaptureFixture[str]) -> None:
    """Connected, but no reply: --timeout ends it with exit status 3."""
    rundir = short_dir()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(rundir / "sock"))
    lsock.listen()
    try:
        status, _, err = run_ctl(
            capsys, "--connect", str(rundir / "sock"), "--timeout", "0.3", "status"
        )
        assert status == EXIT_UNREACHABLE
        assert (
            err
            == f"composefsctl: error: {rundir}/sock: no reply to io.composefs.Repository.Describe within 0.3 s\n"
        )
        status, _, err = run_ctl(capsys, "--timeout", "-1", "status")
        assert status == 2 and "must be 0 or more seconds" in err
    finally:
        lsock.close()
        (rundir / "sock").unlink()
        rundir.rmdir()


def test_daemon_dies_mid_call(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rundir = short_dir()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(rundir / "sock"))
    lsock.listen()
    import threading

    def hang_up() -> None:
        conn, _ = lsock.accept()
        conn.recv(4096)
        conn.close()

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        status, _, err = run_ctl(capsys, "--connect", str(rundir / "sock"), "images")
        assert status == EXIT_UNREACHABLE
        assert "closed the connection before replying to io.composefs.Repository.ListImages" in err
    finally:
        t.join()
        lsock.close()
        (rundir / "sock").unlink()
        rundir.rmdir()


def test_default_socket_is_used_when_a_daemon_answers(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(composefsctl, "default_address", lambda: daemon.address)
    status, out, _ = run_ctl(capsys, "status")
    assert status == 0 and out.endswith(f"at {daemon.address}\n")
    # --direct works on the (default) repository directly instead; here:
    # COMPOSEFSD_REPOSITORY names it, which also means direct access.
    monkeypatch.setenv("COMPOSEFSD_REPOSITORY", str(daemon.repo))
    status, out, _ = run_ctl(capsys, "status")
    assert out.endswith("service:     none (working on the repository directly)\n")
    monkeypatch.delenv("COMPOSEFSD_REPOSITORY")
    status, out, _ = run_ctl(capsys, "status", "--direct", "--repo", str(daemon.repo))
    assert out.endswith("service:     none (working on the repository directly)\n")
    # Commands the daemon does not offer run directly (on the default repository,
    # which does not exist here, hence the repository's own error).
    monkeypatch.setattr(
        "composefsd.repository.repo.default_path", lambda: daemon.repo.parent / "nope"
    )
    status, _, err = run_ctl(capsys, "fsck")
    assert status == 1
    assert "has no daemon method" not in err


def test_fallback_to_direct_mode_without_daemon(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tree: Path
) -> None:
    repo = tmp_path / "repo"
    assert run_ctl(capsys, "--repo", str(repo), "init")[0] == 0
    monkeypatch.setattr("composefsd.repository.repo.default_path", lambda: repo)
    monkeypatch.setattr("composefsd.cli.composefsctl.direct.default_path", lambda: repo)
    # No socket at the default address.
    status, out, _ = run_ctl(capsys, "create-image", str(tree))
    assert status == 0 and len(out.strip()) == 64
    assert run_ctl(capsys, "status")[1].endswith("(working on the repository directly)\n")
    # A stale socket file that nobody listens on.
    stale = tmp_path / "stale"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    monkeypatch.setattr(composefsctl, "default_address", lambda: str(stale))
    status, out, _ = run_ctl(capsys, "images")
    assert status == 0 and out.startswith(out.split()[0]) and len(out.splitlines()) == 1


def test_explicit_address_and_direct_only_commands(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, tmp_path: Path
) -> None:
    for argv in (["fsck"], ["init"], ["describe", "x"], ["remove-ref", "x"]):
        status, _, err = run_ctl(capsys, "--connect", daemon.address, *argv)
        assert status == 2
        assert f"'{argv[0]}' has no daemon method; use --direct (with --repo PATH)" in err
    status, _, err = run_ctl(capsys, "--connect", daemon.address, "--direct", "images")
    assert status == 2 and "--direct and --connect exclude each other" in err
    status, _, err = run_ctl(capsys, "--connect", daemon.address, "--repo", str(tmp_path), "images")
    assert status == 2 and "with --connect the daemon serves its own" in err


def test_exec_address(capsys: pytest.CaptureFixture[str], tmp_path: Path, tree: Path) -> None:
    """--connect exec:PROGRAM starts a composefsd for the one command."""
    repo = tmp_path / "repo"
    wrapper = exec_wrapper(tmp_path / "composefsd-exec", repo, tmp_path / "runtime")
    status, out, err = run_ctl(
        capsys, "--connect", f"exec:{wrapper}", "create-image", str(tree), "--ref", "e/v1"
    )
    assert status == 0, err
    digest = out.strip()
    status, out, _ = run_ctl(capsys, "--connect", f"exec:{wrapper}", "images")
    assert status == 0 and out.startswith(digest) and out.rstrip().endswith("e/v1")
    status, out, _ = run_ctl(capsys, "--connect", f"exec:{wrapper}", "status")
    assert out.splitlines()[0] == f"repository:  {repo}"


def test_refused_for_another_user(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tree: Path, test_users: TestUsers
) -> None:
    """A non-root client of a world-connectable daemon: read-only calls work,
    mutating ones fail with PermissionDenied, named on the error line."""
    d = start_daemon(tmp_path / "repo", public=True)
    try:
        _create(capsys, d, tree, "--ref", "p/v1")
        results: dict[str, Any] = {}
        for argv in (["images"], ["remove-image", "p/v1"], ["gc"]):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                status = 99
                try:
                    os.close(r)
                    bob = test_users.bob
                    os.setgroups([])
                    os.setresgid(bob.gid, bob.gid, bob.gid)
                    os.setresuid(bob.uid, bob.uid, bob.uid)
                    err = io.StringIO()
                    out = io.StringIO()
                    import contextlib

                    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                        status = main(["--connect", d.address, *argv])
                    os.write(w, json.dumps([status, out.getvalue(), err.getvalue()]).encode())
                finally:
                    os._exit(status)
            os.close(w)
            with os.fdopen(r) as f:
                data = f.read()
            os.waitpid(pid, 0)
            results[argv[0]] = json.loads(data)
        assert results["images"][0] == 0 and "p/v1" in results["images"][1]
        for name in ("remove-image", "gc"):
            assert results[name][0] == 1
            assert results[name][2] == (
                "composefsctl: error: org.varlink.service.PermissionDenied: "
                "permission denied (composefsd refuses this call to this user)\n"
            )
    finally:
        assert d.stop() == 0


def test_error_texts() -> None:
    text = call_error_text
    assert text(
        VarlinkCallError(
            "io.composefs.Repository.SystemError", {"message": "boom", "errnoName": "EIO"}
        )
    ) == ("io.composefs.Repository.SystemError: boom (EIO)")
    assert text(VarlinkCallError("org.varlink.service.MethodNotFound", {"method": "a.B"})) == (
        "org.varlink.service.MethodNotFound: the service has no method 'a.B' (an older composefsd?)"
    )
    assert text(VarlinkCallError("org.varlink.service.InterfaceNotFound", {"interface": "a"})) == (
        "org.varlink.service.InterfaceNotFound: the service does not offer 'a' (not composefsd?)"
    )
    assert text(
        VarlinkCallError("org.varlink.service.InvalidParameter", {"parameter": "where"})
    ) == ("org.varlink.service.InvalidParameter: invalid parameter 'where'")
    assert text(VarlinkCallError("org.varlink.service.ExpectedMore")) == (
        "org.varlink.service.ExpectedMore: the method must be called with 'more'"
    )
    assert text(VarlinkCallError("x.y.Other", {"b": 1})) == 'x.y.Other: {"b": 1}'
    assert text(VarlinkCallError("x.y.Other")) == "x.y.Other: failed"


def test_entry_point_exit_codes(tmp_path: Path, daemon: Daemon) -> None:
    """The real command: exit codes 0, 1, 2, 3 as a process sees them."""
    env = dict(os.environ)
    env.pop("COMPOSEFSD_SOCKET", None)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CTL, *argv], capture_output=True, text=True, env=env)

    assert run("--connect", daemon.address, "status").returncode == 0
    r = run("--connect", daemon.address, "verify", "no/such")
    assert r.returncode == 1 and "io.composefs.Repository.NoSuchImage" in r.stderr
    assert run("--connect", daemon.address, "fsck").returncode == 2
    r = run("--connect", str(tmp_path / "none"), "status")
    assert r.returncode == 3 and r.stderr.startswith("composefsctl: error: cannot connect to ")
