"""Differential tests: our mkcomposefs / composefs-info / composefs-dump against C 1.0.8.

Random dumpfiles (tests/gen_dumpfile.py) and random directory trees (tests/gen_tree.py) are
built by both implementations with the same arguments; everything observable must agree:
exit status (and the first line of the error message), image bytes, ``--print-digest``
output, digest-store contents, and ``composefs-info ls/dump/objects`` on C's image.

The C side runs as one shell script per module (hundreds of cases, one process start), ours
in-process through the console-script ``main`` functions.

Environment:
- ``COMPOSEFS_DIFF_SEED``: base seed (default: the current time). Case seeds are
  ``<base>-<i>`` (``<base>-big-<i>`` for the big ones, ``<base>-tree-<i>`` for trees), and
  appear in the test ids.
- ``COMPOSEFS_DIFF_CASE``: run only this one case seed (e.g. ``1732700000-17``).
- ``COMPOSEFS_DIFF_CASES`` / ``COMPOSEFS_DIFF_TREES``: how many (default 300 / 4).

To reproduce a dump case by hand: ``python tests/gen_dumpfile.py SEED case.dump`` prints the
mkcomposefs arguments; the failure message also names the saved dumpfile.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import itertools
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import gen_dumpfile
import gen_tree
from conftest import without_line_numbers

BASE_SEED = os.environ.get("COMPOSEFS_DIFF_SEED") or str(int(time.time()))
N_CASES = int(os.environ.get("COMPOSEFS_DIFF_CASES", "300"))
N_BIG = 3
N_TREES = int(os.environ.get("COMPOSEFS_DIFF_TREES", "4"))
ONLY_CASE = os.environ.get("COMPOSEFS_DIFF_CASE")

if ONLY_CASE:
    DUMP_SEEDS = [] if "-tree-" in ONLY_CASE else [ONLY_CASE]
    TREE_SEEDS = [ONLY_CASE] if "-tree-" in ONLY_CASE else []
else:
    DUMP_SEEDS = [f"{BASE_SEED}-{i}" for i in range(N_CASES)]
    DUMP_SEEDS += [f"{BASE_SEED}-big-{i}" for i in range(N_BIG)]
    TREE_SEEDS = [f"{BASE_SEED}-tree-{i}" for i in range(N_TREES)]

TREE_FLAGS = ["--use-epoch", "--skip-devices", "--skip-xattrs", "--user-xattrs", "--digest-store"]
FLAG_COMBOS = [
    tuple(f for f, on in zip(TREE_FLAGS, bits, strict=True) if on)
    for bits in itertools.product([False, True], repeat=len(TREE_FLAGS))
]


def _combo_id(combo: tuple[str, ...]) -> str:
    return "+".join(f.removeprefix("--") for f in combo) or "plain"


# ---------------------------------------------------------------------------------------------
# running our tools in-process


@dataclass(slots=True)
class Result:
    rc: int
    stdout: bytes
    stderr: bytes
    #: Traceback text if ``main`` raised something other than SystemExit.
    exc: str | None = None

    def first_err_line(self) -> bytes:
        return self.stderr.split(b"\n", 1)[0]


@contextmanager
def _environ(strict: bool) -> Iterator[None]:
    old = os.environ.pop("CFS_PARSE_STRICT", None)
    if strict:
        os.environ["CFS_PARSE_STRICT"] = "1"
    try:
        yield
    finally:
        os.environ.pop("CFS_PARSE_STRICT", None)
        if old is not None:
            os.environ["CFS_PARSE_STRICT"] = old


def run_inproc(tool: str, argv: Sequence[str], *, strict: bool = False) -> Result:
    """Run our console script ``tool`` in-process as its entry point would (``sys.argv`` set,
    ``main()``), with fds 1/2 and sys.stdout/err captured."""
    main = _ours(tool)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, _environ(strict):
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        old_streams = sys.stdout, sys.stderr
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        # Text wrappers over the redirected fds, for code that writes to sys.stdout(.buffer).
        new_out = io.TextIOWrapper(open(1, "wb", closefd=False), errors="surrogateescape")  # noqa: SIM115
        new_err = io.TextIOWrapper(open(2, "wb", closefd=False), errors="backslashreplace")  # noqa: SIM115
        sys.stdout, sys.stderr = new_out, new_err
        old_argv = sys.argv
        sys.argv = [tool, *argv]
        exc = None
        try:
            try:
                code = main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) or e.code is None else 1
                if isinstance(e.code, str):
                    new_err.write(e.code + "\n")
            rc = 0 if code is None else int(code)
        except BaseException:
            exc = traceback.format_exc()
            rc = -1
        finally:
            for s in (new_out, new_err):
                try:
                    s.flush()
                except (OSError, ValueError):
                    pass
            sys.stdout, sys.stderr = old_streams
            sys.argv = old_argv
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return Result(rc, out.read(), err.read(), exc)


def _ours(tool: str) -> Callable[[], int | None]:
    # Imported late so that a missing module fails the tests, not their collection.
    if tool == "mkcomposefs":
        from composefsd.cli.mkcomposefs import main
    elif tool == "composefs-info":
        from composefsd.cli.info import main
    else:
        from composefsd.cli.dump import main
    return main


# ---------------------------------------------------------------------------------------------
# reporting helpers


def _head(data: bytes, lines: int = 6, width: int = 240) -> str:
    out = []
    for line in data.split(b"\n")[:lines]:
        text = repr(line[:width])[2:-1]
        out.append(text + (" ..." if len(line) > width else ""))
    return "\n".join("    " + t for t in out)


def _first_diff(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at byte {i:#x} (C {x:#04x}, ours {y:#04x})"
    return f"one is a prefix of the other (C {len(a)} bytes, ours {len(b)} bytes)"


def _text_diff(c: bytes, ours: bytes, what: str, limit: int = 30) -> str:
    diff = list(
        difflib.unified_diff(
            c.decode(errors="backslashreplace").splitlines(),
            ours.decode(errors="backslashreplace").splitlines(),
            f"C {what}",
            f"our {what}",
            lineterm="",
            n=1,
        )
    )
    text = "\n".join(line[:300] for line in diff[:limit])
    return text + ("\n..." if len(diff) > limit else "")


def _c_info_dump(reference_bin: Path, image: Path) -> bytes:
    return subprocess.run(
        [str(reference_bin / "composefs-info"), "dump", str(image)], capture_output=True
    ).stdout


# ---------------------------------------------------------------------------------------------
# dumpfile cases


def _announce_seed(request: pytest.FixtureRequest) -> None:
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capman is None:
        return
    with capman.global_and_fixture_disabled():
        reporter.write_line(
            f"\ntest_differential: COMPOSEFS_DIFF_SEED={BASE_SEED} "
            f"({len(DUMP_SEEDS)} dump cases, {len(TREE_SEEDS)} trees)"
        )


@dataclass(slots=True)
class DumpCase:
    seed: str
    dir: Path
    case: gen_dumpfile.Case
    #: "image" (write a file), "digest-only" (--print-digest-only) or "stdout" (IMAGE is -)
    output: str
    #: composefs-info argument lists (the image path follows each) to compare on C's image.
    info_cmds: list[list[str]]

    @property
    def dump_path(self) -> Path:
        return self.dir / "in.dump"

    def argv(self, image: str) -> list[str]:
        args = [*self.case.args]
        if self.output == "digest-only":
            args.append("--print-digest-only")
        else:
            args.append("--print-digest")
        args += ["--from-file", str(self.dump_path)]
        if self.output != "digest-only":
            args.append("-" if self.output == "stdout" else image)
        return args

    def describe(self) -> str:
        env = "CFS_PARSE_STRICT=1 " if self.case.strict else ""
        return (
            f"case seed {self.seed} (generator mutation: {self.case.mutation})\n"
            f"  dumpfile: {self.dump_path}\n"
            f"  reproduce: {env}mkcomposefs {shlex.join(self.argv('OUT.img'))}\n"
            f"  regenerate: python tests/gen_dumpfile.py {self.seed} case.dump\n"
            f"  first lines:\n{_head(self.case.dump)}"
        )


def _c_script(reference_bin: Path, cases: list[DumpCase]) -> str:
    mk = shlex.quote(str(reference_bin / "mkcomposefs"))
    info = shlex.quote(str(reference_bin / "composefs-info"))
    lines: list[str] = []
    for dc in cases:
        env = "CFS_PARSE_STRICT=1 " if dc.case.strict else ""
        argv = shlex.join(dc.argv("c.img"))
        lines.append(f"cd {shlex.quote(str(dc.dir))}")
        lines.append(f"{env}{mk} {argv} >c.out 2>c.err; echo $? >c.rc")
        if dc.output != "digest-only":
            if dc.output == "stdout":
                # The digest line follows the image on stdout; split it off.
                lines.append(
                    "if [ $(cat c.rc) = 0 ]; then head -c -65 c.out >c.img;"
                    " tail -c 65 c.out >c.digest; fi"
                )
            lines.append(
                "if [ $(cat c.rc) = 0 ]; then"
                + "".join(
                    f" {info} {shlex.join(cmd)} c.img >c.info{i} 2>c.info{i}.err;"
                    f" echo $? >c.info{i}.rc;"
                    for i, cmd in enumerate(dc.info_cmds)
                )
                + " v=$(od -An -tu4 -j12 -N4 c.img | tr -d ' ');"
                f" {info} dump c.img | {mk} --min-version=$v --from-file - c.rt.img"
                " 2>c.rt.err; echo $? >c.rt.rc; fi"
            )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def dump_cases(
    reference_bin: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict[str, DumpCase]:
    _announce_seed(request)
    base = tmp_path_factory.mktemp("diff-dumps")
    cases: dict[str, DumpCase] = {}
    for i, seed in enumerate(DUMP_SEEDS):
        case = gen_dumpfile.case_for_seed(seed)
        d = base / f"case{i:04d}"
        d.mkdir()
        (d / "in.dump").write_bytes(case.dump)
        rng = random.Random(seed + "-output")
        r = rng.random()
        output = "digest-only" if r < 0.08 else "stdout" if r < 0.13 else "image"
        info_cmds = [["ls"], ["dump"], ["objects"]]
        names = _simple_root_names(case.dump)
        if names and rng.random() < 0.3:
            picked = rng.sample(names, min(len(names), rng.randint(1, 2)))
            info_cmds.append([*(f"--filter={n}" for n in picked), "dump"])
        if rng.random() < 0.1:
            info_cmds.append([f"--basedir={d}", "missing-objects"])
        cases[seed] = DumpCase(seed, d, case, output, info_cmds)
    _run_c_scripts(base, [_c_script(reference_bin, [dc]) for dc in cases.values()])
    return cases


def _run_c_scripts(base: Path, chunks: list[str]) -> None:
    """Run shell snippets (independent of each other) in a few parallel bash processes."""
    n = max(1, min(os.cpu_count() or 1, 8))
    procs = []
    for i in range(n):
        script = base / f"run-c-{i}.sh"
        script.write_text("set -u\nunset CFS_PARSE_STRICT\n" + "".join(chunks[i::n]))
        procs.append(subprocess.Popen(["bash", str(script)], env={**os.environ, "LC_ALL": "C"}))
    for p in procs:
        assert p.wait() == 0, "running the C reference tools failed"


def _read(p: Path) -> bytes:
    return p.read_bytes() if p.exists() else b""


@pytest.mark.parametrize("seed", DUMP_SEEDS)
def test_dumpfile(seed: str, dump_cases: dict[str, DumpCase], reference_bin: Path) -> None:
    dc = dump_cases[seed]
    d = dc.dir
    c_rc = int((d / "c.rc").read_text())
    c_out, c_err = _read(d / "c.out"), _read(d / "c.err")
    our_img = d / "ours.img"
    ours = run_inproc("mkcomposefs", dc.argv(str(our_img)), strict=dc.case.strict)
    assert ours.exc is None, f"our mkcomposefs raised\n{ours.exc}\n{dc.describe()}"

    if c_rc != 0:
        assert ours.rc != 0, f"C failed ({c_err.strip()!r}) but ours succeeded\n{dc.describe()}"
        # Ours is C's message with the dumpfile line number added.
        assert without_line_numbers(ours.first_err_line()) == c_err.split(b"\n", 1)[0], (
            f"different error messages\n  C:    {c_err.strip()!r}\n"
            f"  ours: {ours.stderr.strip()!r}\n{dc.describe()}"
        )
        assert not our_img.exists(), f"ours left {our_img} behind after failing\n{dc.describe()}"
        return
    assert ours.rc == 0, (
        f"C succeeded but ours failed (rc {ours.rc}): {ours.stderr.strip()!r}\n{dc.describe()}"
    )

    if dc.output == "digest-only":
        assert ours.stdout == c_out, (
            f"--print-digest-only: C {c_out!r}, ours {ours.stdout!r}\n{dc.describe()}"
        )
        return
    if dc.output == "stdout":
        c_img = _read(d / "c.img")
        our_bytes, our_digest = ours.stdout[:-65], ours.stdout[-65:]
        c_digest = _read(d / "c.digest")
        our_img.write_bytes(our_bytes)
    else:
        c_img = _read(d / "c.img")
        our_bytes = our_img.read_bytes()
        our_digest, c_digest = ours.stdout, c_out
    if our_bytes != c_img:
        pytest.fail(
            f"image bytes differ: {_first_diff(c_img, our_bytes)}\n"
            f"  C image: {d / 'c.img'}  ours: {our_img}\n"
            f"{_text_diff(_c_info_dump(reference_bin, d / 'c.img'), _c_info_dump(reference_bin, our_img), 'info dump (by C)')}\n"
            f"{dc.describe()}"
        )
    assert our_digest == c_digest, (
        f"--print-digest: C {c_digest!r}, ours {our_digest!r}\n{dc.describe()}"
    )

    _compare_info(dc)
    _compare_composefs_dump(d, dc.describe)


def _simple_root_names(dump: bytes) -> list[str]:
    """Top-level names of a dumpfile that need no escaping (usable as --filter values)."""
    out = []
    for line in dump.split(b"\n"):
        path = line.split(b" ", 1)[0]
        name = path[1:]
        if (
            path.startswith(b"/")
            and name
            and re.fullmatch(rb"[A-Za-z0-9._+,~#!@%^&()\[\]{}-]+", name)
        ):
            out.append(name.decode())
    return out


def _compare_info(dc: DumpCase) -> None:
    """composefs-info (ls, dump, objects, ...) of ours on C's image == C's output."""
    d = dc.dir
    for i, cmd in enumerate(dc.info_cmds):
        c_rc = int((d / f"c.info{i}.rc").read_text())
        c_out = _read(d / f"c.info{i}")
        ours = run_inproc("composefs-info", [*cmd, str(d / "c.img")])
        describe = dc.describe
        assert ours.exc is None, f"our composefs-info {cmd} raised\n{ours.exc}\n{describe()}"
        assert (ours.rc == 0) == (c_rc == 0), (
            f"composefs-info {cmd}: C rc {c_rc}, ours rc {ours.rc} {ours.stderr!r}\n{describe()}"
        )
        if ours.stdout != c_out:
            pytest.fail(
                f"composefs-info {cmd} output differs on {d / 'c.img'}\n"
                f"{_text_diff(c_out, ours.stdout, shlex.join(cmd))}\n{describe()}"
            )


def _compare_composefs_dump(d: Path, describe: Callable[[], str]) -> None:
    """Our composefs-dump of C's image == C's `info dump | mkcomposefs --min-version=V`.

    That pipeline is what C's composefs-dump does (load, write at the image's version with
    max 0), except where a dumpfile cannot carry the tree (a directory hardlink): when C's
    pipeline fails, there is nothing to compare against.
    """
    if (d / "c.rt.rc").read_text().strip() != "0":
        return
    out = d / "ours.rt.img"
    ours = run_inproc("composefs-dump", [str(d / "c.img"), str(out)])
    assert ours.exc is None, f"our composefs-dump raised\n{ours.exc}\n{describe()}"
    assert ours.rc == 0, f"our composefs-dump failed: {ours.stderr!r}\n{describe()}"
    expect = (d / "c.rt.img").read_bytes()
    got = out.read_bytes()
    assert got == expect, (
        f"composefs-dump {d / 'c.img'}: {_first_diff(expect, got)} "
        f"(expected {d / 'c.rt.img'}, got {out})\n{describe()}"
    )


# ---------------------------------------------------------------------------------------------
# directory trees


@dataclass(slots=True)
class TreeCase:
    seed: str
    tree: Path
    dir: Path
    combo: tuple[str, ...]
    threads: str
    #: Spelling variants C accepts: trailing slashes on the store and source paths.
    store_suffix: str
    source_suffix: str
    digest_only: bool

    def argv(self, side: str) -> list[str]:
        args = [f for f in self.combo if f != "--digest-store"]
        if "--digest-store" in self.combo:
            args.append(f"--digest-store={self.dir / (side + '.store')}{self.store_suffix}")
        args.append(self.threads)
        source = str(self.tree) + self.source_suffix
        if self.digest_only:
            return [*args, "--print-digest-only", source]
        return [*args, "--print-digest", source, str(self.dir / f"{side}.img")]

    def describe(self) -> str:
        return (
            f"tree seed {self.seed}, flags {_combo_id(self.combo)}\n"
            f"  tree: {self.tree}\n"
            f"  reproduce: mkcomposefs {shlex.join(self.argv('ours'))}"
        )


@pytest.fixture(scope="module")
def tree_cases(
    reference_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], TreeCase]:
    base = tmp_path_factory.mktemp("diff-trees")
    cases: dict[tuple[str, str], TreeCase] = {}
    mk = shlex.quote(str(reference_bin / "mkcomposefs"))
    lines: list[str] = []
    for ti, seed in enumerate(TREE_SEEDS):
        tree = base / f"tree{ti}"
        rng = random.Random(seed)
        gen_tree.generate_tree(rng, tree, big_files=ti == 0)
        for combo in FLAG_COMBOS:
            d = base / f"tree{ti}-{_combo_id(combo)}"
            d.mkdir()
            tc = TreeCase(
                seed,
                tree,
                d,
                combo,
                threads=rng.choice(["--threads=1", "--threads=2", "--threads=7"]),
                store_suffix=rng.choice(["", "", "/", "//"]),
                source_suffix=rng.choice(["", "", "/"]),
                digest_only=rng.random() < 0.15,
            )
            cases[(seed, _combo_id(combo))] = tc
            lines.append(
                f"{mk} {shlex.join(tc.argv('c'))} >{d}/c.out 2>{d}/c.err; echo $? >{d}/c.rc\n"
            )
    _run_c_scripts(base, lines)
    return cases


def _store_listing(store: Path) -> dict[str, tuple[int, bytes]]:
    """relative path -> (mode, sha256) for files; (mode, b'dir') for directories."""
    out: dict[str, tuple[int, bytes]] = {}
    if not store.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(store):
        for n in dirnames:
            p = Path(dirpath) / n
            out[str(p.relative_to(store))] = (p.lstat().st_mode, b"dir")
        for n in filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(store))] = (
                p.lstat().st_mode,
                hashlib.sha256(p.read_bytes()).digest(),
            )
    return out


@pytest.mark.parametrize("combo", [_combo_id(c) for c in FLAG_COMBOS])
@pytest.mark.parametrize("seed", TREE_SEEDS)
def test_tree(
    seed: str, combo: str, tree_cases: dict[tuple[str, str], TreeCase], reference_bin: Path
) -> None:
    tc = tree_cases[(seed, combo)]
    d = tc.dir
    c_rc = int((d / "c.rc").read_text())
    c_out, c_err = _read(d / "c.out"), _read(d / "c.err")
    ours = run_inproc("mkcomposefs", tc.argv("ours"))
    assert ours.exc is None, f"our mkcomposefs raised\n{ours.exc}\n{tc.describe()}"
    if c_rc != 0:
        assert ours.rc != 0, f"C failed ({c_err.strip()!r}) but ours succeeded\n{tc.describe()}"
        assert ours.first_err_line() == c_err.split(b"\n", 1)[0], (
            f"different error messages\n  C:    {c_err!r}\n  ours: {ours.stderr!r}\n{tc.describe()}"
        )
        return
    assert ours.rc == 0, f"C succeeded but ours failed: {ours.stderr.strip()!r}\n{tc.describe()}"
    c_img = b"" if tc.digest_only else (d / "c.img").read_bytes()
    our_img = b"" if tc.digest_only else (d / "ours.img").read_bytes()
    if c_img != our_img:
        pytest.fail(
            f"image bytes differ: {_first_diff(c_img, our_img)}\n"
            f"{_text_diff(_c_info_dump(reference_bin, d / 'c.img'), _c_info_dump(reference_bin, d / 'ours.img'), 'info dump (by C)')}\n"
            f"{tc.describe()}"
        )
    assert ours.stdout == c_out, (
        f"--print-digest: C {c_out!r}, ours {ours.stdout!r}\n{tc.describe()}"
    )
    if "--digest-store" in tc.combo:
        c_store = _store_listing(d / "c.store")
        our_store = _store_listing(d / "ours.store")
        assert our_store == c_store, (
            f"digest stores differ: only C {sorted(set(c_store) - set(our_store))[:5]}, "
            f"only ours {sorted(set(our_store) - set(c_store))[:5]}, "
            f"different {[k for k in c_store if k in our_store and c_store[k] != our_store[k]][:5]}\n"
            f"{tc.describe()}"
        )


# With COMPOSEFS_DIFF_CASE naming one case, the other kind of test has no cases at all: drop it
# rather than let pytest report an empty parameter set as a skip.
if not DUMP_SEEDS:
    del test_dumpfile
if not TREE_SEEDS:
    del test_tree
