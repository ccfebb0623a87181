"""The C composefs 1.0.8 test suite's assets, run against our console scripts.

Mirrors tests/test-checksums.sh, test-should-fail.sh and test-dump-filtered.sh of the C project
(spec section 12, testdata/README.md), plus the fuzzing corpus. Everything goes through the
installed console scripts (``mkcomposefs``, ``composefs-info``, ``composefs-dump``) in
subprocesses, exactly as the C scripts drive the C tools.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

from conftest import TESTDATA, without_line_numbers

# Needed at collection time, before any fixture exists.
ASSETS = TESTDATA / "assets"
FUZZING = TESTDATA / "fuzzing"
# Where our console scripts are; COMPOSEFS_SCRIPTS_DIR points the tests at other builds.
SCRIPTS = Path(os.environ.get("COMPOSEFS_SCRIPTS_DIR") or sysconfig.get_path("scripts"))

NON_STRICT_ASSETS = {"no-newline.dump", "longlink.dump", "honggfuzz-longlink-unterminated.dump"}

SHOULD_FAIL = {
    "should-fail-big-inline.dump": "Inline content size 5004 exceeds maximum 5000",
    "should-fail-dir-hardlink.dump": "Directories can't be hardlinked",
    "should-fail-dot-name.dump": "Invalid . or .. in path: /.",
    "should-fail-dotdot-name.dump": "Invalid . or .. in path: /..",
    "should-fail-empty-link-name.dump": "Invalid symlink",
    "should-fail-empty-name.dump": "Can't add child",
    "should-fail-empty-xattr-key.dump": "Can't set xattr",
    "should-fail-honggfuzz-long-xattr.dump": "Can't set xattr",
    "should-fail-long-link.dump": "Invalid symlink",
    "should-fail-long-xattr-key.dump": "Too many xattrs",
    "should-fail-long-xattr-value.dump": "Invalid mode 644",
    "should-fail-no-ftype.dump": "Invalid mode 0",
    "should-fail-self-hardlink.dump": "Self-referential hardlink /037blockdev",
    "should-fail-too-big.dump": "cannot write file: File too large",
}
FUZZ_FAIL = {
    "dot-root": "Root node not present",
    "embedded-nul-1.fuzz": "Invalid embedded NUL character",
    "embedded-nul-2.fuzz": "Invalid embedded NUL character",
}
FUZZ_VALID = ["alpine", "busybox", "fedora", "dump-example"]


def _checksum_assets() -> list[str]:
    if not ASSETS.is_dir():
        return ["<assets missing>"]
    return sorted(p.name.removesuffix(".sha256") for p in ASSETS.glob("*.sha256"))


def _asset_bytes(name: str) -> bytes:
    path = ASSETS / name
    data = path.read_bytes()
    # special_v1.dump is a git symlink; a checkout without symlink support holds the target name.
    if len(data) < 256 and b"\n" not in data.strip() and (ASSETS / data.strip().decode()).is_file():
        data = (ASSETS / data.strip().decode()).read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return data


def _version_args(name: str) -> list[str]:
    vfile = ASSETS / f"{name}.version"
    if not vfile.exists():
        return []
    v = vfile.read_text().strip()
    return [f"--min-version={v}", f"--max-version={v}"]


def _env(strict: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CFS_PARSE_STRICT"}
    if strict:
        env["CFS_PARSE_STRICT"] = "1"
    return env


def _ours(name: str) -> str:
    path = SCRIPTS / name
    assert path.exists(), f"console script {name} is not installed in {SCRIPTS} (pip install -e .)"
    return str(path)


def _run(
    argv: list[str], *, stdin: bytes = b"", strict: bool = False
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=stdin, capture_output=True, env=_env(strict), timeout=600)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_diff(expect: bytes, got: bytes) -> str:
    for i, (x, y) in enumerate(zip(expect, got, strict=False)):
        if x != y:
            return f"first difference at byte {i:#x} (expected {x:#04x}, got {y:#04x})"
    return f"lengths differ: expected {len(expect)}, got {len(got)}"


@pytest.fixture(scope="module")
def c_images(reference_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every checksum asset built by C mkcomposefs (each checked against its .sha256)."""
    out: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("c-assets")
    for name in _checksum_assets():
        img = base / f"{name}.img"
        r = _run(
            [
                str(reference_bin / "mkcomposefs"),
                *_version_args(name),
                "--from-file",
                "-",
                str(img),
            ],
            stdin=_asset_bytes(name),
            strict=name not in NON_STRICT_ASSETS,
        )
        assert r.returncode == 0, f"C mkcomposefs rejects {name}: {r.stderr!r}"
        expect = (ASSETS / f"{name}.sha256").read_text().strip()
        assert _sha256(img) == expect, f"C image of {name} does not match its .sha256"
        out[name] = img
    return out


# ---------------------------------------------------------------------------------------------
# test-checksums.sh


@pytest.mark.parametrize("name", _checksum_assets())
def test_checksum(name: str, tmp_path: Path) -> None:
    """`mkcomposefs [ver] --from-file - OUT` gives the image whose sha256 is in NAME.sha256."""
    out = tmp_path / "out.img"
    r = _run(
        [_ours("mkcomposefs"), *_version_args(name), "--from-file", "-", str(out)],
        stdin=_asset_bytes(name),
        strict=name not in NON_STRICT_ASSETS,
    )
    assert r.returncode == 0, f"mkcomposefs failed on {name}: {r.stderr.decode(errors='replace')}"
    assert r.stdout == b""
    expect = (ASSETS / f"{name}.sha256").read_text().strip()
    assert _sha256(out) == expect, f"image of {name} has the wrong sha256"


@pytest.mark.parametrize("name", _checksum_assets())
def test_composefs_dump_roundtrip(name: str, c_images: dict[str, Path], tmp_path: Path) -> None:
    """`composefs-dump IMAGE OUT` rewrites the image byte for byte."""
    img = c_images[name]
    out = tmp_path / "rewritten.img"
    r = _run([_ours("composefs-dump"), str(img), str(out)], strict=name not in NON_STRICT_ASSETS)
    assert r.returncode == 0, (
        f"composefs-dump failed on {name}: {r.stderr.decode(errors='replace')}"
    )
    expect, got = img.read_bytes(), out.read_bytes()
    assert got == expect, f"composefs-dump of {name}: {_first_diff(expect, got)}"


@pytest.mark.parametrize("name", _checksum_assets())
def test_info_dump_roundtrip(
    name: str, c_images: dict[str, Path], reference_bin: Path, tmp_path: Path
) -> None:
    """`composefs-info dump IMAGE | mkcomposefs [ver] --from-file - OUT` gives the same bytes."""
    img = c_images[name]
    strict = name not in NON_STRICT_ASSETS
    info = _run([_ours("composefs-info"), "dump", str(img)], strict=strict)
    assert info.returncode == 0, (
        f"composefs-info dump failed: {info.stderr.decode(errors='replace')}"
    )
    c_info = _run([str(reference_bin / "composefs-info"), "dump", str(img)])
    assert info.stdout == c_info.stdout, f"composefs-info dump of {name} differs from C's"
    out = tmp_path / "rebuilt.img"
    r = _run(
        [_ours("mkcomposefs"), *_version_args(name), "--from-file", "-", str(out)],
        stdin=info.stdout,
        strict=strict,
    )
    assert r.returncode == 0, f"mkcomposefs of the dump failed: {r.stderr.decode(errors='replace')}"
    expect, got = img.read_bytes(), out.read_bytes()
    assert got == expect, f"info dump | mkcomposefs of {name}: {_first_diff(expect, got)}"


# ---------------------------------------------------------------------------------------------
# test-should-fail.sh and the failing fuzz inputs


def _check_rejected(path: Path, message: str, tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    r = _run([_ours("mkcomposefs"), "--from-file", str(path), str(out)])
    stderr = r.stderr.decode(errors="replace")
    assert r.returncode != 0, f"{path.name} was accepted"
    assert f"mkcomposefs: {message}" in stderr, f"{path.name}: expected {message!r}, got {stderr!r}"
    assert "Traceback" not in stderr, stderr
    assert not out.exists(), f"{path.name}: a failed run left {out} behind"


@pytest.mark.parametrize("name", sorted(SHOULD_FAIL))
def test_should_fail(name: str, tmp_path: Path) -> None:
    _check_rejected(ASSETS / name, SHOULD_FAIL[name], tmp_path)


def test_should_fail_list_is_complete() -> None:
    """Every should-fail asset on disk has an expected message here (and vice versa)."""
    assert sorted(p.name for p in ASSETS.glob("should-fail-*.dump")) == sorted(SHOULD_FAIL)


@pytest.mark.parametrize("name", sorted(FUZZ_FAIL))
def test_fuzz_should_fail(name: str, tmp_path: Path) -> None:
    _check_rejected(FUZZING / name, FUZZ_FAIL[name], tmp_path)


# ---------------------------------------------------------------------------------------------
# the valid fuzzing corpus: identical to C, strict (rejected, same message) and not


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("name", FUZZ_VALID)
def test_fuzz_corpus_matches_c(
    name: str, strict: bool, reference_bin: Path, tmp_path: Path
) -> None:
    path = FUZZING / name
    c_img, our_img = tmp_path / "c.img", tmp_path / "ours.img"
    c = _run(
        [
            str(reference_bin / "mkcomposefs"),
            "--print-digest",
            "--from-file",
            str(path),
            str(c_img),
        ],
        strict=strict,
    )
    ours = _run(
        [_ours("mkcomposefs"), "--print-digest", "--from-file", str(path), str(our_img)],
        strict=strict,
    )
    if c.returncode != 0:
        assert ours.returncode != 0, f"C rejects {name} ({c.stderr!r}), ours accepts it"
        assert without_line_numbers(ours.stderr).splitlines()[:1] == c.stderr.splitlines()[:1]
        return
    assert ours.returncode == 0, (
        f"mkcomposefs failed on {name}: {ours.stderr.decode(errors='replace')}"
    )
    expect, got = c_img.read_bytes(), our_img.read_bytes()
    assert got == expect, f"{name}: {_first_diff(expect, got)}"
    assert ours.stdout == c.stdout


# ---------------------------------------------------------------------------------------------
# test-dump-filtered.sh


def test_dump_filtered(reference_bin: Path, tmp_path: Path) -> None:
    img = tmp_path / "special.img"
    r = _run([_ours("mkcomposefs"), "--from-file", str(ASSETS / "special.dump"), str(img)])
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    argv = ["--filter=chardev", "--filter=inline", "--filter=whiteout", "dump", str(img)]
    ours = _run([_ours("composefs-info"), *argv])
    assert ours.returncode == 0, ours.stderr.decode(errors="replace")
    lines = ours.stdout.decode().splitlines()
    patterns = [
        r"^/ 4096 40555.*trusted.foo1",
        r"^/chardev 0 20777",
        r"^/inline 15 100777.*FOOBAR",
        r"^/whiteout 0 20777",
    ]
    assert len(lines) == 4, ours.stdout.decode()
    for pattern in patterns:
        assert sum(1 for line in lines if re.search(pattern, line)) == 1, (pattern, lines)
    c = _run([str(reference_bin / "composefs-info"), *argv])
    assert ours.stdout == c.stdout
