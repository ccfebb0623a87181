"""The man pages in man/: each renders through man-db and groff without a warning,
and each command's page documents exactly the options its --help (or usage) lists:
every option listed has a ``.TP`` entry in the page, and every option a ``.TP``
entry names is one the command takes."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from composefsd.cli.composefsctl.parser import _parser as ctl_parser
from composefsd.service.daemon import _parser as daemon_parser

ROOT = Path(__file__).resolve().parents[1]
MAN = ROOT / "man"
PAGES = {
    "composefsctl.1",
    "composefsd.8",
    "mounts.conf.5",
    "mkcomposefs.1",
    "composefs-info.1",
    "composefs-dump.1",
    "mount.composefs.8",
}
#: An option in roff source, its hyphens escaped: \-x, \-\-long\-name.
_ROFF_OPTION = re.compile(r"(?<![\w\\-])((?:\\-){1,2}[A-Za-z][A-Za-z0-9]*(?:\\-[A-Za-z0-9]+)*)")


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"}


def test_the_pages_are_there() -> None:
    assert {p.name for p in MAN.iterdir() if p.suffix in (".1", ".5", ".8")} >= PAGES


@pytest.mark.parametrize("page", sorted(PAGES))
def test_renders_without_warnings(page: str) -> None:
    path = MAN / page
    proc = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    name = page.rsplit(".", 1)[0].upper()
    assert proc.stdout.startswith(f"{name}(")
    assert "\nNAME\n" in proc.stdout and "\nSEE ALSO\n" in proc.stdout
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(path)], capture_output=True, text=True, env=_env()
    )
    assert (proc.returncode, proc.stderr) == (0, "")


def _tagged_options(page: str) -> set[str]:
    """The options named by the tags of the page's ``.TP`` entries."""
    lines = (MAN / page).read_text(encoding="utf-8").splitlines()
    found: set[str] = set()
    for i, line in enumerate(lines[:-1]):
        if line.startswith(".TP"):
            found.update(m.replace("\\-", "-") for m in _ROFF_OPTION.findall(lines[i + 1]))
    return found


def test_tagged_options() -> None:
    # The extraction itself: escaped hyphens, several options in one tag.
    assert _ROFF_OPTION.findall(r".BI \-\-min\-version " + '" N\\fR, " ' + r"\-\-max\-version") == [
        r"\-\-min\-version",
        r"\-\-max\-version",
    ]
    assert _ROFF_OPTION.findall(r".BR \-v \(dq, \(dq \-\-verbose") == [r"\-v", r"\-\-verbose"]
    assert _ROFF_OPTION.findall(r".B fsverity\-sha256\-12") == []


def _argparse_options(parser: argparse.ArgumentParser) -> set[str]:
    found = {o for a in parser._actions for o in a.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _argparse_options(sub)
    return found


def _run(module: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60
    )
    return proc.stdout + proc.stderr


def test_composefsctl_page_has_every_option() -> None:
    parser = ctl_parser()
    # The help of every (sub)command lists what argparse knows.
    assert _tagged_options("composefsctl.1") == _argparse_options(parser)
    text = _run("composefsd.cli.composefsctl", "--help")
    assert set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", text)) <= _argparse_options(parser)


def test_composefsd_page_has_every_option() -> None:
    text = _run("composefsd", "--help")
    listed = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", text.split("\noptions:", 1)[1]))
    assert listed == _argparse_options(daemon_parser())
    assert _tagged_options("composefsd.8") == listed


def test_mkcomposefs_page_has_every_option() -> None:
    text = _run("composefsd.cli.mkcomposefs", "--help")
    listed = set(re.findall(r"^  (--[a-z-]+)", text, re.MULTILINE))
    assert "--digest-store" in listed and "--threads" in listed
    # --help is ours (C has none); the page has it too.
    assert _tagged_options("mkcomposefs.1") == listed | {"--help"}


def test_composefs_info_page_has_every_option() -> None:
    text = _run("composefsd.cli.info", "--help")  # C's: no --help, the usage
    listed = set(re.findall(r"(--[a-z-]+)=", text))
    commands = set(re.search(r"\[(ls\|[\w|-]+)\]", text).group(1).split("|"))  # type: ignore[union-attr]
    assert listed == {"--basedir"}
    # --filter is in C's getopt table though not in its usage line.
    assert _tagged_options("composefs-info.1") == listed | {"--filter"}
    page = (MAN / "composefs-info.1").read_text(encoding="utf-8")
    tags = {m.replace("\\-", "-") for m in re.findall(r"^\.TP\n\.B (\S+)$", page, re.MULTILINE)}
    assert commands <= tags


def test_composefs_dump_page() -> None:
    text = _run("composefsd.cli.dump")
    assert "usage:" in text and "--" not in text  # no options
    assert _tagged_options("composefs-dump.1") == set()


def test_mount_composefs_page_has_every_option() -> None:
    text = _run("composefsd.cli.mountcomposefs", "-h")
    short = set(re.findall(r"\[(-[a-z])[\] ]", text))
    assert short == {"-t", "-o"}
    page = (MAN / "mount.composefs.8").read_text(encoding="utf-8")
    assert _tagged_options("mount.composefs.8") == short | {"-h"}
    supported = text.split("Supported options:", 1)[1]
    mount_options = set(re.findall(r"^  ([a-z]+)", supported, re.MULTILINE))
    assert mount_options >= {"basedir", "digest", "verity", "tryverity", "upperdir"}
    tags = set(re.findall(r"^\.TP\n\.BI? ([a-z]+)", page, re.MULTILINE))
    assert tags - {"composefs"} == mount_options


def test_man_finds_the_pages_beside_a_venv(tmp_path: Path) -> None:
    """man-db maps a PATH entry DIR/bin to DIR/share/man: with a venv's bin/ on PATH,
    ``man composefsctl`` finds the pages the wheel installs in its share/man."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    man1 = tmp_path / "venv" / "share" / "man" / "man1"
    man1.mkdir(parents=True)
    (man1 / "composefsctl.1").write_bytes((MAN / "composefsctl.1").read_bytes())
    env = {**_env(), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    env.pop("MANPATH", None)
    proc = subprocess.run(["man", "-w", "composefsctl"], capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == str(man1 / "composefsctl.1"), proc.stderr
