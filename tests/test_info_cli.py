"""``composefs-info`` and ``composefs-dump`` command lines against C 1.0.8.

Our tools run as real processes (with ``argv[0]`` set to the bare tool name), C's
through the reference folder; stdout, stderr and exit status must agree byte for
byte once the program path in the usage line is normalised.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from composefsd.cli.getopt import GetoptError, gnu_getopt

SPECIAL = (
    b"""\
/ 4096 40755 2 0 0 0 1000.0 - - - user.shared=1
/a 4096 40755 2 0 0 0 1000.0 - - -
/a/ext 10000 100644 1 0 0 0 1000.0 ab/cdef01234 - """
    + b"0123456789abcdef" * 4
    + b"""
/a/same 20000 100644 1 0 0 0 1000.0 ab/cdef01234 - -
/a/other 1 100644 1 0 0 0 1000.0 cd/ef - -
/b\\x20c 3 120777 1 0 0 0 1000.0 x\\x20y - -
/inline 5 100644 1 0 0 0 1000.0 - hello -
/w 0 20000 1 0 0 0 1000.0 - - -
"""
)


def _launcher(module: str, name: str) -> list[str]:
    code = f"import sys; from {module} import main; sys.argv[0] = {name!r}; sys.exit(main())"
    return [sys.executable, "-c", code]


OURS_INFO = _launcher("composefsd.cli.info", "composefs-info")
OURS_DUMP = _launcher("composefsd.cli.dump", "composefs-dump")
_C_ARGV0 = re.compile(rb"\S*/composefs-info\b")


def _run(cmd: list[str], args: list[str], cwd: Path | None = None) -> tuple[int, bytes, bytes]:
    res = subprocess.run([*cmd, *args], capture_output=True, cwd=cwd, stdin=subprocess.DEVNULL)
    return res.returncode, res.stdout, _C_ARGV0.sub(b"composefs-info", res.stderr)


@pytest.fixture(scope="module")
def images(reference_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    out = {}
    args: list[str]
    for name, dump, args in (
        ("special", SPECIAL, []),
        ("v0", b"/ 4096 40755 2 0 0 0 0.0 - - -\n/x 9 100644 1 0 0 0 0.0 zz/top - -\n", []),
    ):
        subprocess.run(
            [
                str(reference_bin / "mkcomposefs"),
                *args,
                "--from-file",
                "-",
                str(d / (name + ".cfs")),
            ],
            input=dump,
            check=True,
        )
        out[name] = d / (name + ".cfs")
    bad_magic = d / "bad-magic.cfs"
    bad_magic.write_bytes(b"\0" * 8192)
    out["bad-magic"] = bad_magic
    bad_version = d / "bad-version.cfs"
    data = bytearray(out["special"].read_bytes())
    data[4] = 2
    bad_version.write_bytes(bytes(data))
    out["bad-version"] = bad_version
    short = d / "short.cfs"
    short.write_bytes(out["special"].read_bytes()[:4000])
    out["short"] = short
    empty = d / "empty"
    empty.write_bytes(b"")
    out["empty"] = empty
    out["dir"] = d
    return out


CASES = [
    [],
    ["foo"],
    ["ls"],
    ["dump"],
    ["objects"],
    ["--filter=a/b", "ls", "{special}"],
    ["--filter=a/b"],
    ["--bogus", "ls"],
    ["--bogus=1", "ls"],
    ["-x", "ls"],
    ["--basedir"],
    ["--filter"],
    ["ls", "{bad-magic}"],
    ["dump", "{bad-version}"],
    ["dump", "{short}"],
    ["ls", "{empty}"],
    ["ls", "{dir}"],
    ["ls", "/nonexistent/image"],
    ["--basedir=/nonexistent/dir", "objects", "{special}"],
    ["ls", "{special}", "/nonexistent/image"],
    ["dump", "{special}", "{bad-magic}"],
    ["ls", "{special}"],
    ["dump", "{special}", "{v0}"],
    ["objects", "{special}", "{v0}"],
    ["missing-objects", "{special}"],
    ["--base={dir}", "missing-objects", "{special}"],
    ["--filter=a", "--filter", "w", "dump", "{special}"],
    ["dump", "--filter=inline", "{special}"],
    ["--filter=nothing", "ls", "{special}"],
    ["--", "ls", "{v0}"],
    ["measure-file"],
    ["measure-file", "/nonexistent/file"],
    ["measure-file", "{v0}", "{empty}", "{special}"],
    ["measure-file", "{dir}"],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) or "(none)" for c in CASES])
def test_composefs_info_matches_c(
    args: list[str], images: dict[str, Path], reference_bin: Path
) -> None:
    argv = [a.format(**{k: str(v) for k, v in images.items()}) for a in args]
    c = _run([str(reference_bin / "composefs-info")], argv)
    ours = _run(OURS_INFO, argv)
    assert ours == c


def test_missing_objects_with_a_basedir(images: dict[str, Path], reference_bin: Path) -> None:
    base = images["dir"] / "objects"
    (base / "ab").mkdir(parents=True, exist_ok=True)
    (base / "ab" / "cdef01234").write_bytes(b"x")
    argv = [f"--basedir={base}", "missing-objects", str(images["special"]), str(images["v0"])]
    c = _run([str(reference_bin / "composefs-info")], argv)
    ours = _run(OURS_INFO, argv)
    assert ours == c
    assert ours[1] == b"cd/ef\nzz/top\n"  # ab/cdef01234 exists


def test_getopt_permutes_and_accepts_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    longopts = {"basedir": True, "filter": True, "base": False, "verbose": False}
    operands: list[str] = []
    argv = ["ls", "--filt", "a", "img", "--basedir=/x", "--base", "--verb", "--", "--filter=b"]
    assert list(gnu_getopt(argv, "", longopts, operands)) == [
        ("filter", "a"),
        ("basedir", "/x"),
        ("base", None),  # an exact match wins over being a prefix of "basedir"
        ("verbose", None),
    ]
    assert operands == ["ls", "img", "--filter=b"]
    for args, kind, message in (
        (["--nope=1"], "unrecognized", "unrecognized option '--nope=1'"),
        (["--f"], "ambiguous", "option '--f' is ambiguous; possibilities: '--filter'"),
        (["--filter"], "missing", "option '--filter' requires an argument"),
        (["--verbose=1"], "unexpected", "option '--verbose' doesn't allow an argument"),
        (["-q"], "invalid", "invalid option -- 'q'"),
        (["-t"], "missing", "option requires an argument -- 't'"),
    ):
        with pytest.raises(GetoptError) as info:
            list(gnu_getopt(args, "ht:", {**longopts, "fil": True}, []))
        assert (info.value.kind, str(info.value)) == (
            kind,
            message.replace("'--filter'", "'--filter' '--fil'") if kind == "ambiguous" else message,
        )
    # Short clusters, values in the cluster or the next argument; errors come in order.
    got = list(gnu_getopt(["-hto", "x", "-t", "y", "op"], "ht:o:", {}, operands := []))
    assert got == [("h", None), ("t", "o"), ("t", "y")] and operands == ["x", "op"]
    monkeypatch.setenv("POSIXLY_CORRECT", "1")
    operands = []
    assert list(gnu_getopt(["-h", "op", "-h"], "h", {}, operands)) == [("h", None)]
    assert operands == ["op", "-h"]


# --------------------------------------------------------------------------------------
# composefs-dump (not shipped by C 1.0.8; messages follow tools/composefs-dump.c)


def test_composefs_dump_round_trips(images: dict[str, Path], tmp_path: Path) -> None:
    for name in ("special", "v0"):
        out = tmp_path / (name + ".again")
        rc, stdout, stderr = _run(OURS_DUMP, [str(images[name]), str(out)])
        assert (rc, stdout, stderr) == (0, b"", b"")
        assert out.read_bytes() == images[name].read_bytes()


def test_composefs_dump_errors(images: dict[str, Path], tmp_path: Path) -> None:
    usage = b"usage: composefs-dump SRC DEST\n"
    assert _run(OURS_DUMP, []) == (1, b"", b"No source path specified\n" + usage)
    assert _run(OURS_DUMP, ["x"]) == (1, b"", b"No destination path specified\n" + usage)
    out = str(tmp_path / "out")
    cases = {
        "/nonexistent/image": b"Failed to open '/nonexistent/image': No such file or directory",
        str(images["bad-magic"]): b"Failed to get image version '%s': Invalid argument",
        str(images["bad-version"]): b"Failed to get image version '%s': Invalid argument",
        str(images["dir"]): b"Failed to get image version '%s': No such device",
        str(images["short"]): b"Failed to load '%s': Invalid argument",
    }
    for src, message in cases.items():
        if b"%s" in message:
            message = message % os.fsencode(src)
        assert _run(OURS_DUMP, [src, out]) == (1, b"", b"composefs-dump: " + message + b"\n")
    bad_dest = "/nonexistent/dir/out"
    assert _run(OURS_DUMP, [str(images["v0"]), bad_dest]) == (
        1,
        b"",
        b"composefs-dump: failed to open '/nonexistent/dir/out': No such file or directory\n",
    )
