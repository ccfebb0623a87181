"""``mkcomposefs`` (composefsd.cli.mkcomposefs) against C mkcomposefs 1.0.8.

Both are run with the same arguments on the same tree or dumpfile; exit status,
stdout (image digests, images on stdout), stderr (every message, usage included)
and the digest store must agree byte for byte. The one intended difference: on
failure our IMAGE file is removed where C leaves it empty.
"""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from composefsd.cli import mkcomposefs as cli
from conftest import without_line_numbers
from test_scanner import store_listing
from trees import private_tmpfs, scanner_tree

FLAGS = ["--use-epoch", "--skip-devices", "--skip-xattrs", "--user-xattrs", "--digest-store"]


@dataclass(slots=True)
class Run:
    rc: int
    stdout: bytes
    stderr: bytes


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    yield from private_tmpfs("cfs-cli-")


@pytest.fixture(scope="module")
def cli_tree(scratch: Path) -> Path:
    root = scratch / "cli-tree"
    scanner_tree(os.fsencode(root), big_xattrs=False, seed=7)
    return root


@pytest.fixture
def outdir(scratch: Path, request: pytest.FixtureRequest) -> Path:
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:80]
    path = scratch / "cli" / name
    path.mkdir(parents=True)
    return path


def run_c(ref: Path, args: Sequence[str | os.PathLike[str]], stdin: bytes | None = None) -> Run:
    proc = subprocess.run(
        [str(ref / "mkcomposefs"), *map(str, args)], input=stdin, capture_output=True
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def run_ours(
    capfd: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
    args: Sequence[str | os.PathLike[str]],
    stdin: bytes | None = None,
) -> Run:
    capfd.readouterr()
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    rc = cli.main([str(a) for a in args])
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = capfd.readouterr()
    return Run(rc, out, err)


def run_ours_subprocess(args: Sequence[str | os.PathLike[str]], stdin: bytes | None = None) -> Run:
    proc = subprocess.run(
        [sys.executable, "-m", "composefsd.cli.mkcomposefs", *map(str, args)],
        input=stdin,
        capture_output=True,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


COMBOS = [
    combo
    for bits in itertools.product([False, True], repeat=len(FLAGS))
    for combo in [tuple(f for f, on in zip(FLAGS, bits, strict=True) if on)]
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(f[2:] for f in c) or "plain")
def test_directory_flags_identical(
    reference_bin: Path,
    cli_tree: Path,
    outdir: Path,
    combo: tuple[str, ...],
    capfdbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def args(side: str) -> list[str]:
        out = [
            f if f != "--digest-store" else f"--digest-store={outdir}/{side}-store" for f in combo
        ]
        return [*out, "--print-digest", str(cli_tree), str(outdir / f"{side}.img")]

    c = run_c(reference_bin, args("c"))
    ours = run_ours(capfdbinary, monkeypatch, args("ours"))
    assert (ours.rc, ours.stderr) == (c.rc, c.stderr)
    assert ours.stdout == c.stdout
    if "--skip-xattrs" in combo and "--user-xattrs" in combo:
        assert c.rc == 1 and b"Invalid argument" in c.stderr
        assert not (outdir / "ours.img").exists() and (outdir / "c.img").exists()
        return
    assert c.rc == 0 and len(c.stdout) == 65
    assert (outdir / "ours.img").read_bytes() == (outdir / "c.img").read_bytes()
    if "--digest-store" in combo:
        ours_store = store_listing(outdir / "ours-store")
        assert ours_store == store_listing(outdir / "c-store") and ours_store


def test_print_digest_only_and_stdout(
    reference_bin: Path,
    cli_tree: Path,
    outdir: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    only_c = run_c(reference_bin, ["--print-digest-only", cli_tree])
    only = run_ours(capfdbinary, monkeypatch, ["--print-digest-only", cli_tree])
    assert (only.rc, only.stdout, only.stderr) == (0, only_c.stdout, b"")
    assert list(outdir.iterdir()) == []
    # IMAGE "-": the image on stdout, then the digest line.
    c = run_c(reference_bin, ["--print-digest", cli_tree, "-"])
    ours = run_ours_subprocess(["--print-digest", cli_tree, "-"])
    assert (ours.rc, ours.stderr) == (0, b"") and ours.stdout == c.stdout
    assert ours.stdout.endswith(only_c.stdout) and len(ours.stdout) > 4096


def test_from_file(
    reference_bin: Path,
    testdata: Path,
    outdir: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dump = testdata / "assets" / "special.dump"
    data = dump.read_bytes()
    for extra in (
        [],
        ["--min-version=1"],
        ["--max-version=0"],
        ["--min-version=1", "--max-version=1"],
    ):
        c = run_c(reference_bin, [*extra, "--print-digest", "--from-file", dump, outdir / "c.img"])
        ours = run_ours(
            capfdbinary,
            monkeypatch,
            [*extra, "--print-digest", "--from-file", dump, outdir / "o.img"],
        )
        assert (
            (ours.rc, ours.stdout, ours.stderr) == (c.rc, c.stdout, c.stderr) == (0, c.stdout, b"")
        )
        assert (outdir / "o.img").read_bytes() == (outdir / "c.img").read_bytes()
    # From stdin, with the (ignored) directory-only options.
    c = run_c(reference_bin, ["--from-file", "--use-epoch", "-", outdir / "c.img"], stdin=data)
    ours = run_ours(
        capfdbinary, monkeypatch, ["--from", "--use-epoch", "-", outdir / "o.img"], stdin=data
    )
    assert (ours.rc, ours.stderr) == (c.rc, c.stderr) == (0, b"")
    assert (outdir / "o.img").read_bytes() == (outdir / "c.img").read_bytes()


def test_strict_mode_from_environment(
    reference_bin: Path,
    outdir: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dump = outdir / "no-newline.dump"
    dump.write_bytes(b"/ 4096 40755 2 0 0 0 0.0 - - -")
    for strict in (False, True):
        if strict:
            monkeypatch.setenv("CFS_PARSE_STRICT", "")
        env = dict(os.environ)
        proc = subprocess.run(
            [str(reference_bin / "mkcomposefs"), "--from-file", str(dump), str(outdir / "c.img")],
            capture_output=True,
            env=env,
        )
        ours = run_ours(capfdbinary, monkeypatch, ["--from-file", dump, outdir / "o.img"])
        assert (ours.rc, without_line_numbers(ours.stderr)) == (proc.returncode, proc.stderr)
        assert ours.rc == (1 if strict else 0)
        assert (outdir / "o.img").exists() == (not strict)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["{missing}", "{out}"], id="missing-source"),
        pytest.param(["{file}", "{out}"], id="source-is-a-file"),
        pytest.param(["{tree}/links/to-dir", "{out}"], id="source-is-a-symlink"),
        pytest.param(["--print-digest-only", "{tree}", "{out}"], id="digest-only-with-image"),
        pytest.param(["{tree}"], id="missing-image"),
        pytest.param([], id="no-arguments"),
        pytest.param(["", "{out}"], id="empty-source"),
        pytest.param(["{tree}", "{out}", "extra"], id="too-many"),
        pytest.param(["--min-version=x1", "{tree}", "{out}"], id="bad-min-version"),
        pytest.param(["--max-version", "", "{tree}", "{out}"], id="empty-max-version"),
        pytest.param(["--min-version=2", "{tree}", "{out}"], id="min-version-2"),
        pytest.param(["--max-version=-1", "{tree}", "{out}"], id="max-version-negative"),
        pytest.param(["--min-version=4294967297", "{tree}", "{out}"], id="min-version-wraps-to-1"),
        pytest.param(["--min-version= +0", "{tree}", "{out}"], id="min-version-strtol-space-sign"),
        pytest.param(["--threads=0", "{tree}", "{out}"], id="threads-0"),
        pytest.param(["--threads=-3", "{tree}", "{out}"], id="threads-negative"),
        pytest.param(["--threads=4294967296", "{tree}", "{out}"], id="threads-wraps-to-0"),
        pytest.param(["--threads=2x", "{tree}", "{out}"], id="threads-junk"),
        pytest.param(["--threads=7", "{tree}", "{out}"], id="threads-7"),
        pytest.param(["{tree}", "{out}", "--threads"], id="missing-option-value"),
        pytest.param(["--bogus", "{tree}", "{out}"], id="unknown-option"),
        pytest.param(["-C", "{tree}", "{out}"], id="short-C"),
        pytest.param(["-x", "{tree}", "{out}"], id="short-unknown"),
        pytest.param(["--print", "{tree}", "{out}"], id="ambiguous-prefix"),
        pytest.param(["--use-epoch=1", "{tree}", "{out}"], id="flag-with-value"),
        pytest.param(
            ["--print-digest", "--us", "--skip-d", "{tree}", "{out}"], id="unique-prefixes"
        ),
        pytest.param(["{tree}", "--print-digest", "{out}", "--use-epoch"], id="permuted"),
        pytest.param(["--", "{tree}", "{out}"], id="double-dash"),
        pytest.param(["--digest-store", "{store}", "{tree}", "{out}"], id="store-separate-value"),
        pytest.param(["--digest-store={file}/store", "{tree}", "{out}"], id="store-not-a-dir"),
        pytest.param(
            ["--skip-xattrs", "--user-xattrs", "{tree}", "{out}"], id="conflicting-xattrs"
        ),
        pytest.param(["{tree}", "{nodir}/img"], id="output-dir-missing"),
        pytest.param(["--from-file", "{missing}", "{out}"], id="dumpfile-missing"),
        pytest.param(["--from-file", "{tree}", "{out}"], id="dumpfile-is-a-directory"),
        pytest.param(["--from-file", "{baddump}", "{out}"], id="dumpfile-bad-line"),
        pytest.param(["--from-file", "{emptydump}", "{out}"], id="dumpfile-empty"),
    ],
)
def test_messages_and_exit_codes(
    reference_bin: Path,
    cli_tree: Path,
    outdir: Path,
    args: list[str],
    capfdbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (outdir / "file").write_bytes(b"x" * 100)
    (outdir / "bad.dump").write_bytes(
        b"/ 4096 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0 - - -\n"
    )
    (outdir / "empty.dump").write_bytes(b"")

    def expand(side: str) -> list[str]:
        values = {
            "tree": str(cli_tree),
            "missing": str(outdir / "missing"),
            "file": str(outdir / "file"),
            "out": str(outdir / f"{side}.img"),
            "store": str(outdir / f"{side}-store"),
            "nodir": str(outdir / "nodir"),
            "baddump": str(outdir / "bad.dump"),
            "emptydump": str(outdir / "empty.dump"),
        }
        return [a.format(**values) for a in args]

    c = run_c(reference_bin, expand("c"))
    ours = run_ours(capfdbinary, monkeypatch, expand("ours"))
    assert without_line_numbers(ours.stderr) == c.stderr
    assert (ours.rc, ours.stdout) == (c.rc, c.stdout)
    if c.rc == 0:
        assert (outdir / "ours.img").read_bytes() == (outdir / "c.img").read_bytes()
    else:
        assert c.rc == 1
        # C leaves the empty IMAGE it created behind; we remove it.
        assert not (outdir / "ours.img").exists()
    if (outdir / "c-store").exists():
        assert store_listing(outdir / "ours-store") == store_listing(outdir / "c-store")


def test_existing_output_is_replaced(
    reference_bin: Path,
    cli_tree: Path,
    outdir: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = outdir / "img"
    out.write_bytes(b"x" * 10_000_000)
    assert run_ours(capfdbinary, monkeypatch, [cli_tree / "many", out]).rc == 0
    run_c(reference_bin, [cli_tree / "many", outdir / "c.img"])
    assert out.read_bytes() == (outdir / "c.img").read_bytes()
    # A failing run does not delete what the name points to when it is not a regular file.
    link = outdir / "link"
    os.symlink("/dev/null", link)
    assert run_ours(capfdbinary, monkeypatch, [outdir / "missing", link]).rc == 1
    assert link.is_symlink() and Path("/dev/null").exists()


def test_image_inside_source(
    reference_bin: Path,
    outdir: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # IMAGE is created (empty) before SOURCE is read, so it is part of the image, as in C.
    src = outdir / "src"
    src.mkdir()
    (src / "file").write_bytes(b"data" * 100)
    os.utime(src / "file", ns=(0, 0))
    assert run_c(reference_bin, ["--use-epoch", src, src / "c.img"]).rc == 0
    (src / "c.img").rename(outdir / "c.img")
    assert run_ours(capfdbinary, monkeypatch, ["--use-epoch", src, src / "c.img"]).rc == 0
    assert (src / "c.img").read_bytes() == (outdir / "c.img").read_bytes()


def test_help(
    capfdbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch, reference_bin: Path
) -> None:
    ours = run_ours(capfdbinary, monkeypatch, ["--help"])
    assert ours.rc == 0 and ours.stdout.startswith(b"Usage: mkcomposefs [OPTIONS] SOURCE IMAGE\n")
    c = run_c(reference_bin, ["--nonsense"])
    assert c.stderr == ours.stdout  # the same text C prints with its usage


def test_stdout_tty_refused(tmp_path: Path) -> None:
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "composefsd.cli.mkcomposefs", str(tmp_path), "-"],
            stdout=follower,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 1
    assert proc.stderr == b"mkcomposefs: stdout is a tty.  Refusing to use it\n"
