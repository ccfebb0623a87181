"""composefsctl: every subcommand, its output, its errors and exit codes.

Most cases call ``main(argv)`` in-process (fast); a few run ``python -m
composefsd.cli.composefsctl`` to check the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from composefsd.repository import Repository, VerityPolicy
from ctlrun import FORGED_REF, PLANTED_REFS, check_escaped, plant_refs, run_ctl
from trees import random_tree

CTL = [sys.executable, "-m", "composefsd.cli.composefsctl"]


def _tree(root: Path, seed: int = 1) -> Path:
    random_tree(root, seed=seed)
    os.utime(root / "d1" / "f1", (1_000_000, 1_000_000))
    return root


def _c_digest(reference_bin: Path, tree: Path, *options: str) -> str:
    out = subprocess.run(
        [str(reference_bin / "mkcomposefs"), "--print-digest-only", *options, str(tree)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "repo"
    status, out, _ = run_ctl(capsys, "--repo", str(path), "init")
    assert status == 0
    assert out == (
        f"initialized fsverity-sha256-12 repository in {path} (fs-verity: try, images: V1)\n"
    )
    return path


# -- init -------------------------------------------------------------------------------------


def test_init_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r512"
    status, out, _ = run_ctl(
        capsys, "init", "--repo", str(path), "--algorithm", "sha512", "--verity", "disabled"
    )
    assert status == 0, out
    repo = Repository.open(path)
    assert repo.algorithm == "fsverity-sha512-12" and repo.verity is VerityPolicy.DISABLED
    meta = json.loads((path / "meta.json").read_text())
    assert meta["algorithm"] == "fsverity-sha512-12"
    # Again with the same settings: fine; with others: refused.
    assert (
        run_ctl(
            capsys, "--repo", str(path), "init", "--algorithm", "sha512", "--verity", "disabled"
        )[0]
        == 0
    )
    status, _, err = run_ctl(capsys, "--repo", str(path), "init")
    assert status == 1
    assert err.startswith(f"composefsctl: error: {path} is already a repository with")


def test_init_refuses_other_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep").write_text("mine")
    status, _, err = run_ctl(capsys, "--repo", str(tmp_path / "data"), "init")
    assert status == 1
    assert "is not empty and not a composefs repository" in err
    assert sorted(os.listdir(tmp_path / "data")) == ["keep"]


def test_init_verity_required_unsupported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """This kernel/filesystem has no fs-verity: required fails clearly, leaves nothing."""
    path = tmp_path / "secure"
    status, _, err = run_ctl(capsys, "--repo", str(path), "init", "--verity", "required")
    assert status == 1
    assert err.startswith("composefsctl: error: fs-verity unsupported")
    assert not path.exists()


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_ctl(capsys, "frobnicate")
    assert status == 2 and "invalid choice: 'frobnicate'" in err
    status, _, err = run_ctl(capsys, "init", "--algorithm", "md5")
    assert status == 2 and "invalid choice: 'md5'" in err
    status, _, err = run_ctl(capsys, "--repo", str(tmp_path), "verify")
    assert status == 2 and err.endswith(
        "composefsctl: error: give the IMAGE(s) to verify, or --all, or --stream NAME\n"
    )
    status, _, err = run_ctl(capsys, "--repo", str(tmp_path), "create-image")
    assert status == 2 and "give either SOURCE" in err
    status, _, err = run_ctl(capsys, "create-image", "x", "--skip-xattrs", "--user-xattrs")
    assert status == 2 and "exclude each other" in err
    status, _, err = run_ctl(capsys, "create-image", "x", "--threads", "0")
    assert status == 2 and "must be at least 1" in err


def test_not_a_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_ctl(capsys, "--repo", str(tmp_path / "nope"), "images")
    assert (status, out) == (1, "")
    assert err == (
        f"composefsctl: error: repository {tmp_path / 'nope'} does not exist "
        "(create one with `composefsctl init`)\n"
    )
    status, _, err = run_ctl(capsys, "--repo", str(tmp_path), "fsck")
    assert status == 1 and "is not a composefs repository: it has no meta.json" in err


def test_default_repository_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMPOSEFSD_REPOSITORY", str(tmp_path / "env-repo"))
    assert run_ctl(capsys, "init")[0] == 0
    assert (tmp_path / "env-repo" / "meta.json").is_file()
    status, out, _ = run_ctl(capsys, "images")
    assert (status, out) == (0, "")


# -- create-image ---------------------------------------------------------------------------


def test_create_image_matches_c(
    tmp_path: Path, repo: Path, reference_bin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = _tree(tmp_path / "tree")
    status, out, err = run_ctl(capsys, "--repo", str(repo), "create-image", str(tree), "--ref", "t")
    assert status == 0, err
    digest = out.strip()
    assert out == digest + "\n" and err == ""
    # A new repository's images are V1: C mkcomposefs --min-version=1's.
    assert digest == _c_digest(reference_bin, tree, "--min-version=1")
    assert Repository.open(repo).resolve_image("t") == digest

    status, out, _ = run_ctl(
        capsys,
        "--repo",
        str(repo),
        "create-image",
        str(tree),
        "--use-epoch",
        "--skip-xattrs",
        "--min-version",
        "1",
        "--json",
    )
    assert status == 0
    result = json.loads(out)
    assert result["digest"] == _c_digest(
        reference_bin, tree, "--use-epoch", "--skip-xattrs", "--min-version=1"
    )
    assert result["objects_written"] == 0  # every object is already there
    assert result["objects_reused"] > 0 and result["ref"] is None


def test_create_image_from_dumpfile(
    tmp_path: Path, repo: Path, reference_bin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = _tree(tmp_path / "tree", 2)
    store = tmp_path / "store"
    subprocess.run(
        [
            str(reference_bin / "mkcomposefs"),
            f"--digest-store={store}",
            str(tree),
            str(tmp_path / "img"),
        ],
        check=True,
    )
    dump = tmp_path / "dump"
    with dump.open("wb") as f:
        subprocess.run(
            [str(reference_bin / "composefs-info"), "dump", str(tmp_path / "img")],
            check=True,
            stdout=f,
        )
    # Written in the repository's format, V1: C mkcomposefs --min-version=1's image.
    expected = _c_digest(reference_bin, dump, "--from-file", "--min-version=1")
    status, out, err = run_ctl(
        capsys,
        "--repo",
        str(repo),
        "create-image",
        "--from-dumpfile",
        str(dump),
        "--objects",
        str(store),
        "--ref",
        "dumped",
    )
    assert status == 0, err
    assert out.strip() == expected
    assert Repository.open(repo).verify_image("dumped").ok

    # The dumpfile on stdin (a real process, for its stdin).
    result = subprocess.run(
        [
            *CTL,
            "--repo",
            str(repo),
            "create-image",
            "--from-dumpfile",
            "-",
            "--objects",
            str(store),
        ],
        input=dump.read_bytes(),
        capture_output=True,
        check=True,
    )
    assert result.stdout.decode().strip() == expected

    status, _, err = run_ctl(
        capsys, "--repo", str(repo), "create-image", "--from-dumpfile", str(dump)
    )
    assert status == 2 and "--from-dumpfile needs --objects DIR" in err
    status, _, err = run_ctl(
        capsys,
        "--repo",
        str(repo),
        "create-image",
        "--from-dumpfile",
        str(tmp_path / "none"),
        "--objects",
        str(store),
    )
    assert status == 1 and err.startswith(
        f"composefsctl: error: cannot read dumpfile {tmp_path / 'none'}"
    )


def test_create_image_progress_and_verbose(
    tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = _tree(tmp_path / "tree", 3)
    status, out, err = run_ctl(
        capsys, "--repo", str(repo), "create-image", "--progress", "-v", str(tree)
    )
    assert status == 0
    phases = [line.split(":")[0] for line in err.splitlines()[:-1]]
    assert phases[0] == "scan" and phases[-1] == "publish"
    assert {"import", "image", "sync"} <= set(phases)
    assert err.splitlines()[-1].startswith("12 files, ")
    assert len(out.split()) == 1


def test_create_image_bad_ref(
    tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_ctl(
        capsys, "--repo", str(repo), "create-image", str(_tree(tmp_path / "t")), "--ref", "../x"
    )
    assert (status, out) == (1, "")
    assert err.startswith("composefsctl: error: invalid ref name '../x'")


# -- verify, fsck ---------------------------------------------------------------------------


def test_verify_and_fsck(tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = str(repo)
    one = run_ctl(
        capsys, "--repo", r, "create-image", str(_tree(tmp_path / "a", 4)), "--ref", "one"
    )[1].strip()
    two = run_ctl(
        capsys, "--repo", r, "create-image", str(_tree(tmp_path / "b", 5)), "--ref", "two"
    )[1].strip()
    status, out, _ = run_ctl(capsys, "--repo", r, "verify", "one", two)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{one}: ok (") and lines[1].startswith(f"{two}: ok (")
    status, out, _ = run_ctl(capsys, "--repo", r, "verify", "--all", "--json")
    assert status == 0
    assert [d["digest"] for d in json.loads(out)] == [one, two]
    status, out, _ = run_ctl(capsys, "--repo", r, "fsck")
    assert status == 0 and out.endswith("2 images, 2 refs: clean\n")

    # Damage one object of image one only.
    repository = Repository.open(repo)
    data = (tmp_path / "a" / "d1" / "f4").read_bytes()
    objects = {
        e.name: e for d in os.scandir(repo / "objects") if d.is_dir() for e in os.scandir(d.path)
    }
    victim = next(
        name
        for name, entry in objects.items()
        if os.path.getsize(entry.path) == len(data) and Path(entry.path).read_bytes() == data
    )
    victim_path = Path(objects[victim].path)
    digest = victim_path.parent.name + victim
    os.truncate(victim_path, 1)

    status, out, _ = run_ctl(capsys, "--repo", r, "verify", "one", "two")
    assert status == 1
    assert out.splitlines()[:2] == [
        f"{one}: FAILED",
        f"  corrupt object: {digest}: size 1 != expected {len(data)}",
    ]
    assert f"{two}: ok (" in out
    status, out, _ = run_ctl(capsys, "--repo", r, "verify", "--json", "one")
    assert status == 1
    assert json.loads(out)[0]["corrupt"] == [
        {"digest": digest, "reason": f"size 1 != expected {len(data)}"}
    ]

    status, out, _ = run_ctl(capsys, "--repo", r, "fsck")
    assert status == 1
    assert out.splitlines()[0].startswith(
        f"fsck: object-digest-mismatch: objects/{digest[:2]}/{digest[2:]}: computed "
    )
    assert out.endswith("2 images, 2 refs: 1 problem\n")
    status, out, _ = run_ctl(capsys, "--repo", r, "fsck", "--json")
    assert status == 1
    doc = json.loads(out)
    assert doc["ok"] is False and [p["kind"] for p in doc["problems"]] == ["object-digest-mismatch"]
    assert repository.verify_image("two").ok

    status, _, err = run_ctl(capsys, "--repo", r, "verify", "nonesuch")
    assert (
        status == 1 and err == f"composefsctl: error: no image or ref named 'nonesuch' in {repo}\n"
    )


def test_fsck_harmless_findings_exit_zero(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "objects" / ".tmp-object-leftover01").write_bytes(b"x")
    status, out, _ = run_ctl(capsys, "--repo", str(repo), "fsck")
    assert status == 0
    assert out.splitlines() == [
        "fsck: stray-temp-file: objects/.tmp-object-leftover01: leftover temporary file (harmless)",
        "fsck: 0 objects (0 measured by fs-verity), 0 images, 0 refs: clean",
    ]


# -- images, describe, remove, gc ------------------------------------------------------------


def test_image_management(tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = str(repo)
    one = run_ctl(
        capsys, "--repo", r, "create-image", str(_tree(tmp_path / "a", 6)), "--ref", "one"
    )[1].strip()
    two = run_ctl(
        capsys, "--repo", r, "create-image", str(_tree(tmp_path / "b", 7)), "--ref", "x/two"
    )[1].strip()
    assert run_ctl(capsys, "--repo", r, "create-image", str(_tree(tmp_path / "c", 8)))[0] == 0

    status, out, _ = run_ctl(capsys, "--repo", r, "images")
    assert status == 0
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 3
    assert rows[0][0] == one and rows[0][-1] == "one"
    assert rows[1][0] == two and rows[1][-1] == "x/two"
    assert rows[2][-1] == "-"
    listed = json.loads(run_ctl(capsys, "--repo", r, "images", "--json")[1])
    assert [e["refs"] for e in listed] == [["one"], ["x/two"], []]

    status, out, _ = run_ctl(capsys, "--repo", r, "describe", "x/two")
    assert status == 0
    assert out.splitlines()[0] == f"digest:            {two}"
    assert "refs:              x/two" in out
    details = json.loads(run_ctl(capsys, "--repo", r, "describe", "--json", two)[1])
    assert details["digest"] == two and details["object_count"] > 0

    # gc: the unreferenced third image goes (dry run first), pins keep images.
    status, out, _ = run_ctl(capsys, "--repo", r, "gc", "--dry-run")
    assert status == 0 and out.startswith("gc: would remove ") and ", 1 images," in out
    assert len(json.loads(run_ctl(capsys, "--repo", r, "images", "--json")[1])) == 3
    status, out, _ = run_ctl(capsys, "--repo", r, "remove-ref", "one")
    assert (status, out) == (0, "")
    status, out, _ = run_ctl(capsys, "--repo", r, "gc", "--pin", one, "--json")
    assert status == 0 and json.loads(out)["images_removed"] == 1
    assert [
        e["digest"] for e in json.loads(run_ctl(capsys, "--repo", r, "images", "--json")[1])
    ] == [
        one,
        two,
    ]

    status, _, _ = run_ctl(capsys, "--repo", r, "remove-image", "x/two")
    assert status == 0
    assert not (repo / "images" / "refs" / "x" / "two").exists()
    status, _, err = run_ctl(capsys, "--repo", r, "describe", two)
    assert status == 1 and err.startswith("composefsctl: error: no image")
    status, _, err = run_ctl(capsys, "--repo", r, "remove-ref", "one")
    assert status == 1 and err.startswith("composefsctl: error: ")
    assert run_ctl(capsys, "--repo", r, "gc")[0] == 0
    assert run_ctl(capsys, "--repo", r, "fsck")[0] == 0


def test_untrusted_names_are_printed_escaped(
    tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = str(repo)
    src = str(_tree(tmp_path / "t"))
    digest = run_ctl(capsys, "--repo", r, "create-image", src, "--ref", "good")[1].strip()
    # New refs with such names are refused...
    status, out, err = run_ctl(capsys, "--repo", r, "create-image", src, "--ref", FORGED_REF)
    assert (status, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("composefsctl: error: invalid ref name ")
    check_line = err.rstrip("\n")
    assert check_line.isprintable()
    # ...and old ones are printed escaped: one image, one row.
    plant_refs(repo, digest)
    status, out, _ = run_ctl(capsys, "--repo", r, "images")
    assert status == 0 and out.count("\n") == 1, out
    assert out.startswith(digest)
    check_escaped(out)
    listed = json.loads(run_ctl(capsys, "--repo", r, "images", "--json")[1])
    assert sorted(listed[0]["refs"]) == sorted(["good", *PLANTED_REFS])
    status, out, _ = run_ctl(capsys, "--repo", r, "describe", "good")
    assert status == 0 and len(out.splitlines()) == 8
    check_escaped(out)
    status, out, _ = run_ctl(capsys, "--repo", r, "remove-image", "good", "-v")
    assert status == 0 and out.count("\n") == 1
    check_escaped(out)


def test_entry_point(tmp_path: Path) -> None:
    """``python -m composefsd.cli.composefsctl``: output, stderr and exit codes."""
    repo = tmp_path / "repo"
    subprocess.run([*CTL, "--repo", str(repo), "init"], check=True, capture_output=True)
    tree = _tree(tmp_path / "tree", 9)
    made = subprocess.run(
        [*CTL, "create-image", "--repo", str(repo), str(tree), "--ref", "e"],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0 and made.stderr == ""
    bad = subprocess.run(
        [*CTL, "--repo", str(repo), "create-image", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr == f"composefsctl: error: source {tmp_path / 'missing'}: does not exist\n"
    usage = subprocess.run([*CTL], capture_output=True, text=True)
    assert usage.returncode == 2 and "composefsctl: error:" in usage.stderr
    # A closed pipe ends the command quietly.
    pipe = subprocess.run(
        f"{' '.join(CTL)} --repo {repo} images | head -c 1 >/dev/null; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )
    assert pipe.stderr == ""
