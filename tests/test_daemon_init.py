"""The repository composefsd creates when none exists: bootc's and ``cfsctl init``'s
(sha512, images V1) unless --algorithm / --erofs-version say otherwise; for an existing
repository the options are checks that refuse to start on a disagreeing one.

Everything runs the real daemon (``python -m composefsd.service.daemon``)."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefsd.image.formats import ErofsVersion
from composefsd.repository import InvalidNameError, Repository
from composefsd.repository.meta import parse_erofs_version
from composefsd.service.client import connect
from composefsd.service.options import erofs_version_argument
from ctlrun import run_ctl
from rsgolden import read_json
from servicehelpers import DAEMON, running_daemon, short_dir

DESCRIBE = "io.composefs.Repository.Describe"


@pytest.fixture(scope="module")
def rs_meta() -> dict[str, bytes]:
    """cfsctl's meta.json texts (``cfsctl init --insecure [--hash] [--erofs-version 2]``)."""
    summary = read_json("expected/oci/summary.json")
    return {name: text.encode() for name, text in summary["meta_json"].items()}


@pytest.fixture
def rundir() -> Iterator[Path]:
    path = short_dir()
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def _run(repo: Path, rundir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """composefsd on ``repo``, expected not to start (it would stop idle after 2 s)."""
    return subprocess.run(
        [
            *DAEMON,
            "--repo",
            str(repo),
            "--listen",
            str(rundir / "sock"),
            "--runtime-dir",
            str(rundir / "run"),
            "--idle-timeout",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _snapshot(root: Path) -> list[tuple[str, int, int, bytes]]:
    """Every path below ``root`` with its mode, mtime and (for files) content."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted([*dirnames, *filenames]):
            path = Path(dirpath) / name
            st = path.lstat()
            content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
            found.append((str(path.relative_to(root)), st.st_mode, st.st_mtime_ns, content))
    return sorted(found)


def test_created_repository_is_what_bootc_and_cfsctl_init_make(
    tmp_path: Path, rs_meta: dict[str, bytes]
) -> None:
    repo = tmp_path / "composefs"
    with running_daemon(repo, algorithm=None) as daemon, connect(daemon.address) as conn:
        described = conn.call(DESCRIBE)
        log = daemon.log_text()
    assert (repo / "meta.json").read_bytes() == rs_meta["sha512"]
    assert described["algorithm"] == "sha512"
    assert described["erofsVersion"] == 1
    assert "fsverity-sha512-12, images V1" in log


@pytest.mark.parametrize(
    ("args", "golden"),
    [
        (("--algorithm", "sha256", "--erofs-version", "2"), "sha256-erofs-v2"),
        (("--algorithm", "fsverity-sha256-12"), "sha256"),
        (("--algorithm", "fsverity-sha512-12", "--erofs-version", "1"), "sha512"),
    ],
)
def test_options_choose_what_is_created(
    tmp_path: Path, rs_meta: dict[str, bytes], args: tuple[str, ...], golden: str
) -> None:
    repo = tmp_path / "r"
    with running_daemon(repo, *args, algorithm=None):
        pass
    assert (repo / "meta.json").read_bytes() == rs_meta[golden]
    # The same options agree with the repository they made: the daemon starts again.
    with running_daemon(repo, *args, algorithm=None):
        pass


def test_erofs_version_0_is_created(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    with running_daemon(repo, "--erofs-version", "0", algorithm=None):
        pass
    opened = Repository.open(repo)
    assert opened.algorithm == "fsverity-sha512-12"
    assert opened.erofs_version is ErofsVersion.V0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--algorithm", "sha512"),
            "is fsverity-sha256-12, not fsverity-sha512-12 (--algorithm sha512)",
        ),
        (
            ("--algorithm", "fsverity-sha512-12", "--erofs-version", "2"),
            "is fsverity-sha256-12, not fsverity-sha512-12",
        ),
        (("--erofs-version", "2"), "writes images in V1, not V2 (--erofs-version 2)"),
        (("--algorithm", "sha256", "--erofs-version", "0"), "writes images in V1, not V0"),
        (("--no-create", "--erofs-version", "2"), "writes images in V1, not V2"),
    ],
)
def test_disagreeing_option_refuses_an_existing_repository(
    tmp_path: Path, rundir: Path, args: tuple[str, ...], message: str
) -> None:
    repo = Repository.init(tmp_path / "r", algorithm="sha256").path
    before = _snapshot(repo)
    out = _run(repo, rundir, *args)
    assert out.returncode == 1, out.stderr
    assert f"repository {repo} {message}" in out.stderr
    assert _snapshot(repo) == before
    assert not (rundir / "sock").exists()


def test_omitted_options_keep_an_existing_repository(tmp_path: Path) -> None:
    # sha256 and V2 are not what composefsd would create; given nothing, it serves them.
    repo = Repository.init(tmp_path / "r", algorithm="sha256", erofs_version=2).path
    meta = (repo / "meta.json").read_bytes()
    with running_daemon(repo, algorithm=None) as daemon, connect(daemon.address) as conn:
        described = conn.call(DESCRIBE)
    assert described["algorithm"] == "sha256"
    assert described["erofsVersion"] == 2
    assert (repo / "meta.json").read_bytes() == meta


def test_no_create_with_options_creates_nothing(tmp_path: Path, rundir: Path) -> None:
    out = _run(tmp_path / "r", rundir, "--no-create", "--algorithm", "sha256")
    assert out.returncode == 1
    assert f"repository {tmp_path / 'r'} does not exist" in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--algorithm", "md5", "invalid choice: 'md5'"),
        ("--algorithm", "SHA512", "invalid choice: 'SHA512'"),
        ("--algorithm", "fsverity-sha512-13", "invalid choice"),
        ("--algorithm", "sha512\n", "invalid choice"),
        ("--algorithm", "", "invalid choice"),
        ("--erofs-version", "3", "not an EROFS format version (0, 1 or 2): '3'"),
        ("--erofs-version", "-1", "not an EROFS format version"),
        ("--erofs-version", "V1", "not an EROFS format version"),
        ("--erofs-version", "01", "not an EROFS format version"),
        ("--erofs-version", " 1", "not an EROFS format version"),
        ("--erofs-version", "\u00b2", "not an EROFS format version"),
        ("--erofs-version", "1" * 5000, "not an EROFS format version"),
        ("--erofs-version", "", "not an EROFS format version"),
    ],
)
def test_hostile_values_are_refused(
    tmp_path: Path, rundir: Path, option: str, value: str, message: str
) -> None:
    out = _run(tmp_path / "r", rundir, option, value)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_option_parsing_has_one_strict_spelling() -> None:
    assert [erofs_version_argument(t) for t in ("0", "1", "2")] == list(ErofsVersion)
    for bad in ("V1", "1.0", "+1", "\u0661"):
        with pytest.raises(argparse.ArgumentTypeError, match="not an EROFS format version"):
            erofs_version_argument(bad)
    # The API's looser spelling still refuses digits int() does not take.
    with pytest.raises(InvalidNameError, match="unknown EROFS format version"):
        parse_erofs_version("\u00b2")


def test_composefsctl_init_takes_the_same_spellings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rs_meta: dict[str, bytes]
) -> None:
    path = tmp_path / "r"
    status, out, _ = run_ctl(
        capsys, "init", "--repo", str(path), "--algorithm", "fsverity-sha512-12"
    )
    assert status == 0 and "fsverity-sha512-12" in out
    assert (path / "meta.json").read_bytes() == rs_meta["sha512"]
    status, _, err = run_ctl(capsys, "init", "--repo", str(path), "--erofs-version", "V1")
    assert status == 2 and "not an EROFS format version (0, 1 or 2): 'V1'" in err
